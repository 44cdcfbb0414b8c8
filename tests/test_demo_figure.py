"""The photo fitting and model fill that ``gmcnn-mobile evaluate`` and the demo figure share, and the demo
figure itself (``python -m models.demo_figure``), on synthetic photos with a tiny checkpoint (tf, cnum 4)."""
from __future__ import annotations

import cv2
import numpy as np
import pytest

from helpers import make_checkpoint, photo
from models.evaluate import fit_photo, model_fill
from runtime_py.masks import make_mask


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("demo_figure") / "tiny.safetensors")


@pytest.mark.parametrize("rows,cols,first,last", [(100, 250, 56, 193), (250, 100, 88, 160)])
def test_fit_photo_centre_crops_to_the_aspect_then_resizes(rows, cols, first, last):
    """Fitted to 64x88, a 100x250 photo keeps its middle round(100 * 88 / 64) = 138 columns (56..193) and a
    250x100 one its middle round(100 * 64 / 88) = 73 rows (88..160); pixel values here are their column (row)."""
    wide = cols > rows
    index = np.arange(cols if wide else rows, dtype=np.uint8)
    rgb = np.zeros((rows, cols, 3), np.uint8)
    rgb[..., 0] = index[None, :] if wide else index[:, None]
    out = fit_photo(rgb, 64, 88)
    assert out.shape == (64, 88, 3) and out.dtype == np.uint8
    line = (out[0, :, 0] if wide else out[:, 0, 0]).astype(int)
    assert abs(line[0] - first) <= 1 and abs(line[-1] - last) <= 1  # area-averaged with a neighbour
    assert np.all(np.diff(line) >= 0)  # order kept, nothing mirrored


def test_model_fill_keeps_every_known_pixel(ckpt):
    from models import load_generator

    rgb = photo(64, 88, seed=1)
    mask = make_mask("blob", 64, 88, seed=0)
    out = model_fill(load_generator(ckpt), rgb, mask)
    np.testing.assert_array_equal(out[mask == 0], rgb[mask == 0])
    assert (out[mask > 0] != rgb[mask > 0]).any()


def test_demo_figure_composes_before_mask_model_and_telea(ckpt, tmp_path):
    """``python -m models.demo_figure`` on a 300x420 photo: the model panel keeps known pixels exactly and the
    figure is the documented 2 x 4 grid of 400-px panels."""
    from models import demo_figure, load_generator

    rgb = photo(300, 420, seed=4)
    mask = np.zeros((300, 420), np.uint8)
    mask[120:180, 200:290] = 255
    cv2.imwrite(str(tmp_path / "p.png"), rgb[:, :, ::-1])
    cv2.imwrite(str(tmp_path / "m.png"), mask)
    filled = demo_figure.inpaint_downscaled(load_generator(ckpt), rgb, mask)
    np.testing.assert_array_equal(filled[mask == 0], rgb[mask == 0])
    assert demo_figure.work_size(300, 420) == (484, 680)

    out = tmp_path / "fig" / "demo.jpg"
    assert demo_figure.main(["--checkpoint", str(ckpt), "--photo", str(tmp_path / "p.png"), "--mask",
                             str(tmp_path / "m.png"), "--out", str(out)]) == 0
    fig = cv2.imread(str(out))
    panel_h = round(300 * 400 / 420)
    assert fig.shape == (2 * panel_h, 4 * 400, 3) and not list(out.parent.glob("*.part*"))
    before = cv2.resize(rgb, (400, panel_h), interpolation=cv2.INTER_AREA)[:, :, ::-1]
    # JPEG quality 85 of a noisy photo: 3.2 levels mean difference measured (the label covers the top rows)
    assert np.abs(fig[40:panel_h, :400].astype(int) - before[40:].astype(int)).mean() < 5
    hole_centre = (round(150 * panel_h / 300), round(245 * 400 / 420))
    b, g, r = fig[hole_centre[0], 400 + hole_centre[1]].astype(int)  # the mask panel: the hole is tinted red
    assert r > 150 and r > g + 60 and r > b + 60
    cv2.imwrite(str(tmp_path / "small.png"), mask[:100])
    with pytest.raises(SystemExit, match="not the photo's size"):
        demo_figure.main(["--checkpoint", str(ckpt), "--photo", str(tmp_path / "p.png"), "--mask",
                          str(tmp_path / "small.png"), "--out", str(out)])
