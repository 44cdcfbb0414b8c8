"""What the Core ML executor's fast path (:mod:`runtime_py.mil_ops`) runs outside NumPy: 2-D convolution
in ONNX Runtime, and conversion between float32 and float16 in OpenCV.

Convolution. ONNX Runtime's CPU convolution (MLAS) ran the shipped model's layers at 47-85 GMAC/s
on the project's 2-core machine, against 26-76 for OpenCV's DNN convolution and 9-37 for an
im2col float32 matrix product in OpenBLAS (docs/COREML.md, "Convolutions in ONNX Runtime"). Each
call writes a one-node ONNX model (``Conv``, weights as initializers) straight as protobuf bytes
-- the runtime does not depend on the ``onnx`` package -- and runs it in a session made for that
call: about 1-20 ms, and nothing is held afterwards (a kept session keeps its buffers, and a
program has dozens of convolutions). The products and sums are float32, as in the exact path;
only their order differs.

Conversion. NumPy 1.26 converts float32 <-> float16 element by element in C (0.16-0.33 s for a
128x512x680 tensor here); ``cv2.convertFp16`` uses the CPU's F16C instructions (0.03 s) and gives
the same bits, round to nearest even, NaN and infinity kept (tested on every float16 value and on
float32 values of every class): :func:`to_float16` and :func:`to_float32`.
"""
from __future__ import annotations

from typing import Sequence, Tuple

import cv2
import numpy as np

from .errors import MissingDependencyError

#: what the fast path's missing-dependency error suggests instead
EXACT_HINT = "GMCNN_MIL_EXECUTOR=exact for the exact path, which needs NumPy alone"

# ONNX protobuf field numbers (onnx/onnx.proto) of the messages written here
_MODEL_IR_VERSION, _MODEL_GRAPH, _MODEL_OPSET = 1, 7, 8
_OPSET_DOMAIN, _OPSET_VERSION = 1, 2
_GRAPH_NODE, _GRAPH_NAME, _GRAPH_INITIALIZER, _GRAPH_INPUT, _GRAPH_OUTPUT = 1, 2, 5, 11, 12
_NODE_INPUT, _NODE_OUTPUT, _NODE_OP_TYPE, _NODE_ATTRIBUTE = 1, 2, 4, 5
_ATTR_NAME, _ATTR_I, _ATTR_INTS, _ATTR_TYPE = 1, 3, 8, 20
_ATTR_TYPE_INT, _ATTR_TYPE_INTS = 2, 7
_TENSOR_DIMS, _TENSOR_DATA_TYPE, _TENSOR_NAME, _TENSOR_RAW_DATA = 1, 2, 8, 9
_TENSOR_FLOAT = 1
_VALUE_NAME, _VALUE_TYPE = 1, 2
_TYPE_TENSOR, _TENSOR_TYPE_ELEM, _TENSOR_TYPE_SHAPE, _SHAPE_DIM, _DIM_VALUE = 1, 1, 2, 1, 1
IR_VERSION, OPSET = 7, 13


def _varint(value: int) -> bytes:
    out = bytearray()
    value &= (1 << 64) - 1  # negative int64 values are ten-byte two's complement varints
    while True:
        low, value = value & 0x7F, value >> 7
        out.append(low | 0x80 if value else low)
        if not value:
            return bytes(out)


def _field_int(field: int, value: int) -> bytes:
    return _varint(field << 3) + _varint(int(value))


def _field_bytes(field: int, payload: bytes) -> bytes:
    return _varint(field << 3 | 2) + _varint(len(payload)) + payload


def _field_str(field: int, text: str) -> bytes:
    return _field_bytes(field, text.encode())


def _tensor(name: str, array: np.ndarray) -> bytes:
    array = np.ascontiguousarray(array, dtype="<f4")
    return (b"".join(_field_int(_TENSOR_DIMS, d) for d in array.shape) + _field_int(_TENSOR_DATA_TYPE, _TENSOR_FLOAT)
            + _field_str(_TENSOR_NAME, name) + _field_bytes(_TENSOR_RAW_DATA, array.tobytes()))


def _float_value_info(name: str, shape: Sequence[int]) -> bytes:
    dims = b"".join(_field_bytes(_SHAPE_DIM, _field_int(_DIM_VALUE, d)) for d in shape)
    tensor_type = _field_int(_TENSOR_TYPE_ELEM, _TENSOR_FLOAT) + _field_bytes(_TENSOR_TYPE_SHAPE, dims)
    return _field_str(_VALUE_NAME, name) + _field_bytes(_VALUE_TYPE, _field_bytes(_TYPE_TENSOR, tensor_type))


def _ints_attribute(name: str, values: Sequence[int]) -> bytes:
    return (_field_str(_ATTR_NAME, name) + b"".join(_field_int(_ATTR_INTS, v) for v in values)
            + _field_int(_ATTR_TYPE, _ATTR_TYPE_INTS))


def _int_attribute(name: str, value: int) -> bytes:
    return _field_str(_ATTR_NAME, name) + _field_int(_ATTR_I, value) + _field_int(_ATTR_TYPE, _ATTR_TYPE_INT)


def conv_onnx_model(weight: np.ndarray, bias: np.ndarray, x_shape: Sequence[int], y_shape: Sequence[int],
                    pads: Tuple[int, int, int, int], strides: Sequence[int], dilations: Sequence[int],
                    groups: int) -> bytes:
    """A serialized ONNX ``ModelProto`` (IR 7, opset 13) of one ``Conv`` from input ``x`` to output ``y``.

    ``weight`` (C_out, C_in/groups, KH, KW) and ``bias`` (C_out,) are stored as float32; ``pads`` is
    ONNX's (top, left, bottom, right); ``x_shape`` and ``y_shape`` are NCHW.
    """
    _, _, kh, kw = weight.shape
    attributes = [_ints_attribute("kernel_shape", (kh, kw)), _ints_attribute("pads", pads),
                  _ints_attribute("strides", strides), _ints_attribute("dilations", dilations),
                  _int_attribute("group", groups)]
    node = (b"".join(_field_str(_NODE_INPUT, n) for n in ("x", "w", "b")) + _field_str(_NODE_OUTPUT, "y")
            + _field_str(_NODE_OP_TYPE, "Conv") + b"".join(_field_bytes(_NODE_ATTRIBUTE, a) for a in attributes))
    graph = (_field_bytes(_GRAPH_NODE, node) + _field_str(_GRAPH_NAME, "conv")
             + _field_bytes(_GRAPH_INITIALIZER, _tensor("w", weight)) + _field_bytes(_GRAPH_INITIALIZER, _tensor("b", bias))
             + _field_bytes(_GRAPH_INPUT, _float_value_info("x", x_shape))
             + _field_bytes(_GRAPH_OUTPUT, _float_value_info("y", y_shape)))
    opset = _field_str(_OPSET_DOMAIN, "") + _field_int(_OPSET_VERSION, OPSET)
    return (_field_int(_MODEL_IR_VERSION, IR_VERSION) + _field_bytes(_MODEL_GRAPH, graph)
            + _field_bytes(_MODEL_OPSET, opset))


def _session(model: bytes):
    try:
        import onnxruntime as ort
    except ImportError:
        raise MissingDependencyError("onnxruntime", "runtime",
                                     f"the Core ML executor's fast convolutions; or set {EXACT_HINT}") from None
    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.enable_cpu_mem_arena = False  # the session lives for one call: nothing to keep for the next
    options.inter_op_num_threads = 1
    # a session per call: idle pool threads that spin would take the core from the next op's NumPy work
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(model, sess_options=options, providers=["CPUExecutionProvider"])


def conv2d_float32(x: np.ndarray, weight: np.ndarray, bias: np.ndarray, pads: Tuple[int, int, int, int],
                   strides: Sequence[int], dilations: Sequence[int], groups: int,
                   out_hw: Tuple[int, int]) -> np.ndarray:
    """y = conv(x, weight) + bias in float32 through ONNX Runtime.

    ``x``: (N, C_in, H, W) float32, NCHW; ``weight``: (C_out, C_in/groups, KH, KW); ``bias``: (C_out,);
    ``pads``: zero padding (top, left, bottom, right); ``out_hw``: the output's (H_out, W_out), which
    the caller computes from the MIL padding rule. Returns (N, C_out, H_out, W_out) float32.
    """
    expected = (x.shape[0], weight.shape[0], *out_hw)
    model = conv_onnx_model(weight, bias, x.shape, expected, pads, strides, dilations, groups)
    (y,) = _session(model).run(None, {"x": np.ascontiguousarray(x, np.float32)})
    if y.shape != expected:
        raise RuntimeError(f"ONNX Runtime's convolution returned shape {y.shape}, expected {expected}")
    return y


def to_float16(y: np.ndarray) -> np.ndarray:
    """``y.astype(np.float16, copy=False)``, bit for bit, through F16C when ``y`` is a non-empty float32 array."""
    if y.dtype != np.float32 or y.ndim == 0 or y.size == 0:
        return y.astype(np.float16, copy=False)
    y = np.ascontiguousarray(y)
    return cv2.convertFp16(y.reshape(-1, y.shape[-1])).view(np.float16).reshape(y.shape)


def to_float32(x: np.ndarray) -> np.ndarray:
    """``x.astype(np.float32, copy=False)``, bit for bit, through F16C when ``x`` is a non-empty float16 array."""
    if x.dtype != np.float16 or x.ndim == 0 or x.size == 0:
        return x.astype(np.float32, copy=False)
    x = np.ascontiguousarray(x)
    return cv2.convertFp16(x.view(np.int16).reshape(-1, x.shape[-1])).reshape(x.shape)
