"""Independent re-statements of the two reference GMCNN generators, for faithfulness tests.

Nothing here imports ``models``: the layer tables are written out again from the
reference code (shepnerd/inpainting_gmcnn, ``tensorflow/net/network.py`` and
``pytorch/model/net.py``), so a mistake in ``models/gmcnn.py`` cannot hide by being
shared with the test.

* TF: :func:`tf_reference_layers` lists every ``inpaint_net/...`` conv in graph
  order; :func:`write_tf_checkpoint` saves random weights under the reference
  variable names (plus discriminator / optimizer distractors) with a TF1 ``Saver``;
  :func:`run_tf_reference` runs the generator built from TensorFlow ops.
  Tensors are NHWC; images in [-1, 1], in the channel order the weights expect.
* PyTorch: :class:`ReferenceTorchGMCNN` follows the reference module list, its
  state-dict keys (``EB1.0.weight`` ... ``decoding_layers.1.bias``) and its forward.
"""
from __future__ import annotations

import os
from typing import Dict, List, NamedTuple

import numpy as np

# ------------------------------------------------------------------------------------ TF


class TFConv(NamedTuple):
    var_scope: str  # variable path under inpaint_net/ (without /kernel, /bias)
    kernel: int
    cin: int
    cout: int
    stride: int
    dilation: int
    elu: bool


def _tf_branch_trunk(prefix: str, cin: int, c: int, k_first: int, k: int) -> List[TFConv]:
    rows = [
        TFConv(f"{prefix}conv1", k_first, cin, c, 1, 1, True),
        TFConv(f"{prefix}conv2_downsample", k, c, 2 * c, 2, 1, True),
        TFConv(f"{prefix}conv3", k, 2 * c, 2 * c, 1, 1, True),
        TFConv(f"{prefix}conv4_downsample", k, 2 * c, 4 * c, 2, 1, True),
        TFConv(f"{prefix}conv5", k, 4 * c, 4 * c, 1, 1, True),
        TFConv(f"{prefix}conv6", k, 4 * c, 4 * c, 1, 1, True),
        TFConv(f"{prefix}conv7_atrous", k, 4 * c, 4 * c, 1, 2, True),
        TFConv(f"{prefix}conv8_atrous", k, 4 * c, 4 * c, 1, 4, True),
        TFConv(f"{prefix}conv9_atrous", k, 4 * c, 4 * c, 1, 8, True),
        TFConv(f"{prefix}conv10_atrous", k, 4 * c, 4 * c, 1, 16, True),
    ]
    if c > 32:  # the reference adds a rate-32 layer for wide networks
        rows.append(TFConv(f"{prefix}conv11_atrous", k, 4 * c, 4 * c, 1, 32, True))
    rows += [
        TFConv(f"{prefix}conv11", k, 4 * c, 4 * c, 1, 1, True),
        TFConv(f"{prefix}conv12", k, 4 * c, 4 * c, 1, 1, True),
    ]
    return rows


def tf_reference_layers(cnum: int) -> Dict[str, List[TFConv]]:
    """The reference TF generator's convs per stage, in the order the graph applies them."""
    c = cnum
    return {
        "b1": _tf_branch_trunk("b1", 5, c, 7, 7),
        "b2": _tf_branch_trunk("b2", 5, c, 5, 5),
        "b2_tail1": [TFConv("b2conv13_upsample/b2conv13_upsample_conv", 3, 4 * c, 2 * c, 1, 1, True),
                     TFConv("b2conv14", 5, 2 * c, 2 * c, 1, 1, True)],
        "b3": _tf_branch_trunk("b3", 5, c, 5, 3),
        "b3_tail1": [TFConv("b3conv13_upsample/b3conv13_upsample_conv", 3, 4 * c, 2 * c, 1, 1, True),
                     TFConv("b3conv14", 3, 2 * c, 2 * c, 1, 1, True)],
        "b3_tail2": [TFConv("b3conv15_upsample/b3conv15_upsample_conv", 3, 2 * c, c, 1, 1, True),
                     TFConv("b3conv16", 3, c, c // 2, 1, 1, True)],
        "merge": [TFConv("mergeconv17", 3, 4 * c + 2 * c + c // 2, c // 2, 1, 1, True),
                  TFConv("mergeconv18", 3, c // 2, 3, 1, 1, False)],
    }


def tf_reference_parameter_count(cnum: int) -> int:
    return sum(r.kernel * r.kernel * r.cin * r.cout + r.cout
               for rows in tf_reference_layers(cnum).values() for r in rows)


def random_tf_weights(cnum: int, seed: int = 0, std: float = 0.1) -> Dict[str, np.ndarray]:
    """``inpaint_net/<scope>/kernel`` (HWIO) and ``/bias`` arrays, float32.

    Weights are N(0, min(std, 1.4/sqrt(fan_in))) and biases N(0, 0.05): larger than the
    reference init (0.02, zero bias), so that at cnum 4 the output of ~40 layers
    keeps a spread of about 0.2 without reaching the [-1, 1] clip (measured), and
    every tensor, bias included, affects it.
    """
    rng = np.random.default_rng(seed)
    out = {}
    for rows in tf_reference_layers(cnum).values():
        for r in rows:
            fan_in = r.kernel * r.kernel * r.cin
            scale = min(std, 1.4 / np.sqrt(fan_in))
            out[f"inpaint_net/{r.var_scope}/kernel"] = rng.normal(0, scale, (r.kernel, r.kernel, r.cin, r.cout)).astype(np.float32)
            out[f"inpaint_net/{r.var_scope}/bias"] = rng.normal(0, 0.05, (r.cout,)).astype(np.float32)
    return out


def write_tf_checkpoint(directory: os.PathLike, weights: Dict[str, np.ndarray], distractors: bool = True,
                        prefix: str = "snap", step: int = 0) -> str:
    """Save ``weights`` under their exact names with a TF1 ``Saver``; returns the prefix (``DIR/snap-0``).

    The directory also gets TF's ``checkpoint`` state file. ``distractors`` adds what a
    training checkpoint holds besides the generator: discriminator weights, Adam slots
    of generator variables, ``beta1_power``/``beta2_power`` and the learning rate.
    """
    import tensorflow as tf

    variables = dict(weights)
    if distractors:
        rng = np.random.default_rng(1)
        variables["discriminator/disc_global/conv1/kernel"] = rng.normal(size=(5, 5, 3, 8)).astype(np.float32)
        variables["discriminator/disc_global/conv1/bias"] = np.zeros(8, np.float32)
        variables["discriminator/dout_global_fc/kernel"] = rng.normal(size=(16, 1)).astype(np.float32)
        for name in list(weights)[:6]:
            variables[name + "/Adam"] = np.zeros_like(weights[name])
            variables[name + "/Adam_1"] = np.ones_like(weights[name])
        variables["beta1_power"] = np.float32(0.5)
        variables["beta2_power"] = np.float32(0.9)
        variables["lr"] = np.float32(1e-4)
    graph = tf.Graph()
    with graph.as_default():
        var_list = {name: tf.compat.v1.Variable(value, name=name.replace("/", "_")) for name, value in variables.items()}
        saver = tf.compat.v1.train.Saver(var_list=var_list)
        with tf.compat.v1.Session(graph=graph) as sess:
            sess.run(tf.compat.v1.global_variables_initializer())
            return saver.save(sess, os.path.join(str(directory), prefix), global_step=step, write_meta_graph=False)


def run_tf_reference(weights: Dict[str, np.ndarray], image_nhwc: np.ndarray, mask_nhw1: np.ndarray) -> np.ndarray:
    """Reference TF generator output (N,H,W,3) from TensorFlow ops.

    ``image_nhwc`` is already in [-1, 1] and in the channel order of the weights; the
    input is ``[image*(1-mask), ones, mask]`` as the reference ``evaluate`` builds it.
    """
    import tensorflow as tf

    cnum = weights["inpaint_net/b1conv1/kernel"].shape[3]
    layers = tf_reference_layers(cnum)
    x = tf.constant(image_nhwc, tf.float32)
    m = tf.constant(mask_nhw1, tf.float32)
    h, w = image_nhwc.shape[1:3]
    x = x * (1.0 - m)
    net_in = tf.concat([x, tf.ones_like(x)[:, :, :, 0:1], tf.ones_like(x)[:, :, :, 0:1] * m], axis=3)

    def run(stage: str, t):
        for r in layers[stage]:
            kernel = tf.constant(weights[f"inpaint_net/{r.var_scope}/kernel"])
            bias = tf.constant(weights[f"inpaint_net/{r.var_scope}/bias"])
            t = tf.nn.conv2d(t, kernel, strides=r.stride, padding="SAME", dilations=r.dilation) + bias
            if r.elu:
                t = tf.nn.elu(t)
        return t

    resize_bilinear = tf.compat.v1.image.resize_bilinear
    resize_nearest = tf.compat.v1.image.resize_nearest_neighbor
    x_b1 = resize_bilinear(run("b1", net_in), [h, w], align_corners=True)

    t = resize_nearest(run("b2", net_in), [h // 2, w // 2], align_corners=True)
    x_b2 = resize_bilinear(run("b2_tail1", t), [h, w], align_corners=True)

    t = resize_nearest(run("b3", net_in), [h // 2, w // 2], align_corners=True)
    t = resize_nearest(run("b3_tail1", t), [h, w], align_corners=True)
    x_b3 = run("b3_tail2", t)

    y = run("merge", tf.concat([x_b1, x_b2, x_b3], axis=3))
    return tf.clip_by_value(y, -1.0, 1.0).numpy()


# --------------------------------------------------------------------------------- PyTorch


def _make_torch_reference():
    import torch
    import torch.nn as nn
    import torch.nn.functional as F

    class PureUpsampling(nn.Module):
        def __init__(self, scale: int, mode: str = "bilinear"):
            super().__init__()
            self.scale, self.mode = scale, mode

        def forward(self, x):
            size = (x.size(2) * self.scale, x.size(3) * self.scale)
            if self.mode == "nearest":
                return F.interpolate(x, size=size, mode="nearest")
            return F.interpolate(x, size=size, mode="bilinear", align_corners=True)

    class ReferenceTorchGMCNN(nn.Module):
        """Reference PyTorch generator: input (N,4,H,W) ``[x*(1-m), m]`` -> (N,3,H,W) in [-1,1]."""

        def __init__(self, cnum: int = 32, in_channels: int = 4):
            super().__init__()
            c = cnum

            def trunk(k_all: int) -> list:
                return [
                    nn.Conv2d(in_channels, c, k_all), nn.Conv2d(c, 2 * c, k_all, stride=2),
                    nn.Conv2d(2 * c, 2 * c, k_all), nn.Conv2d(2 * c, 4 * c, k_all, stride=2),
                    nn.Conv2d(4 * c, 4 * c, k_all), nn.Conv2d(4 * c, 4 * c, k_all),
                    nn.Conv2d(4 * c, 4 * c, k_all, dilation=2), nn.Conv2d(4 * c, 4 * c, k_all, dilation=4),
                    nn.Conv2d(4 * c, 4 * c, k_all, dilation=8), nn.Conv2d(4 * c, 4 * c, k_all, dilation=16),
                    nn.Conv2d(4 * c, 4 * c, k_all), nn.Conv2d(4 * c, 4 * c, k_all),
                ]

            self.EB1 = nn.ModuleList(trunk(7) + [PureUpsampling(4)])
            self.EB1_pad_rec = [3, 3, 3, 3, 3, 3, 6, 12, 24, 48, 3, 3, 0]
            self.EB2 = nn.ModuleList(trunk(5) + [
                PureUpsampling(2, "nearest"), nn.Conv2d(4 * c, 2 * c, 5), nn.Conv2d(2 * c, 2 * c, 5), PureUpsampling(2)])
            self.EB2_pad_rec = [2, 2, 2, 2, 2, 2, 4, 8, 16, 32, 2, 2, 0, 2, 2, 0]
            self.EB3 = nn.ModuleList(trunk(3) + [
                PureUpsampling(2, "nearest"), nn.Conv2d(4 * c, 2 * c, 3), nn.Conv2d(2 * c, 2 * c, 3),
                PureUpsampling(2, "nearest"), nn.Conv2d(2 * c, c, 3), nn.Conv2d(c, c, 3)])
            self.EB3_pad_rec = [1, 1, 1, 1, 1, 1, 2, 4, 8, 16, 1, 1, 0, 1, 1, 0, 1, 1]
            self.decoding_layers = nn.ModuleList([nn.Conv2d(7 * c, c // 2, 3), nn.Conv2d(c // 2, 3, 3)])
            self.decoding_pad_rec = [1, 1]
            self.pads = nn.ModuleList([nn.ReflectionPad2d(i) for i in range(49)])

        def forward(self, x):
            outs = []
            for layers, pad_rec in ((self.EB1, self.EB1_pad_rec), (self.EB2, self.EB2_pad_rec),
                                    (self.EB3, self.EB3_pad_rec)):
                t = x
                for layer, pad in zip(layers, pad_rec):
                    t = layer(self.pads[pad](t))
                    if pad != 0:
                        t = F.elu(t)
                outs.append(t)
            y = torch.cat(outs, 1)
            y = F.elu(self.decoding_layers[0](self.pads[self.decoding_pad_rec[0]](y)))
            y = self.decoding_layers[1](self.pads[self.decoding_pad_rec[1]](y))
            return torch.clamp(y, -1, 1)

    return ReferenceTorchGMCNN


def reference_torch_gmcnn(cnum: int, seed: int = 0, std: float = 0.1):
    """A :class:`ReferenceTorchGMCNN` with random weights (see :func:`random_tf_weights` for ``std``)."""
    import torch

    net = _make_torch_reference()(cnum)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for mod in net.modules():
            if isinstance(mod, torch.nn.Conv2d):
                fan_in = mod.weight[0].numel()
                mod.weight.normal_(0, min(std, 1.4 / fan_in ** 0.5), generator=g)
                mod.bias.normal_(0, 0.05, generator=g)
    return net.eval()


# ------------------------------------------------------------------------------- fixtures

DATA_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data")
KITE_IMAGE = os.path.join(DATA_DIR, "kite_200x216.jpg")
KITE_MASK = os.path.join(DATA_DIR, "kite_200x216_mask.png")


def kite_rgb_and_mask(height: int = 200, width: int = 216):
    """The bundled real photo as (H,W,3) float32 RGB in [-1,1] and its hand-drawn mask (H,W,1) {0,1}, 1 = hole.

    Other sizes are centre crops around the kite (the masked object)."""
    import cv2

    bgr = cv2.imread(KITE_IMAGE, cv2.IMREAD_COLOR)
    mask = cv2.imread(KITE_MASK, cv2.IMREAD_GRAYSCALE)
    assert bgr is not None and mask is not None, "tests/data fixture missing"
    cy, cx = 108, 64  # around the kite
    top = int(np.clip(cy - height // 2, 0, bgr.shape[0] - height))
    left = int(np.clip(cx - width // 2, 0, bgr.shape[1] - width))
    bgr = bgr[top:top + height, left:left + width]
    mask = mask[top:top + height, left:left + width]
    rgb = bgr[:, :, ::-1].astype(np.float32) / 127.5 - 1.0
    return np.ascontiguousarray(rgb), (mask > 127).astype(np.float32)[:, :, None]
