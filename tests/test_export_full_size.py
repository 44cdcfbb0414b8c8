"""Full-size export (cnum 32, 512x680): slow, run with ``make test-slow``.

The default suite covers the same code paths at cnum 4 and small shapes; this checks that
nothing changes at the published size (memory, onnx2tf, calibration time, parity)."""
from __future__ import annotations

import pytest

from helpers import lively_generator

pytestmark = pytest.mark.slow
SHAPE = (512, 680)


@pytest.mark.parametrize("variant", ["tf", "torch"])
def test_full_size_fp32_and_int8(tmp_path, variant):
    from export.api import export_artifacts

    gen = lively_generator(variant, 32, seed=0)
    m = export_artifacts(gen, tmp_path, shapes=[SHAPE], formats=["tflite"], precisions=["fp32", "int8"],
                         ios=["tensor", "image"], threads=2, progress=False)
    assert len(m.artifacts) == 4
    for a in m.artifacts:
        assert a.parity.passed and a.shape == list(SHAPE)
        inv = a.op_inventory
        if a.io == "tensor":
            assert inv["xnnpack_fallback_ops"] == {"RESIZE_NEAREST_NEIGHBOR": 3}, (a.file, inv["xnnpack_fallback_ops"])
        if a.precision == "int8":
            assert inv["float_compute_ops_in_int8_graph"] == 0
            assert inv["ops"]["ELU"] == inv["before_postpass"]["ops"]["ELU"]
    assert m.find("tflite", SHAPE, "fp32", "tensor").parity.max_abs <= 1e-4
