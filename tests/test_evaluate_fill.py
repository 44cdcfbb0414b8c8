"""The photo fitting and the model fill of ``gmcnn-mobile evaluate`` (models.evaluate), on synthetic images
with a tiny checkpoint (tf, cnum 4)."""
from __future__ import annotations

import numpy as np
import pytest

from helpers import make_checkpoint, photo
from models.evaluate import fit_photo, model_fill
from runtime_py.masks import make_mask


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("evaluate_fill") / "tiny.safetensors")


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
