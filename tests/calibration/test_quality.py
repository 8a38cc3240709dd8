"""Calibrated SplitQ is closer to the FP model than RTN: layer outputs of the quantized models
(reference integer forward, end to end, errors propagating) against the FP model's, on the
calibration data itself."""

import pytest

from splitq_calibration import calibrate
from splitq_calibration.evaluate import layer_output_errors
from splitq_vllm.testing.images import write_sharegpt

pytestmark = pytest.mark.usefixtures("single_thread")  # tests/conftest.py


@pytest.mark.parametrize("which", ["qwen", "llava"])
def test_splitq_layer_outputs_are_closer_to_fp_than_rtn(which, tiny_qwen_dir, tiny_llava_dir, tmp_path):
    src = tiny_qwen_dir if which == "qwen" else tiny_llava_dir
    data = write_sharegpt(tmp_path / "data", n=8)
    common = dict(scheme="w4a4", num_samples=8, batch_size=2)
    rtn = calibrate(src, data, tmp_path / "rtn", method="rtn", **common)
    splitq = calibrate(src, data, tmp_path / "splitq", method="splitq", epochs=3, **common)
    err_rtn = layer_output_errors(src, rtn, data, num_samples=8)
    err_splitq = layer_output_errors(src, splitq, data, num_samples=8)
    print(which, "rtn", err_rtn, "splitq", err_splitq)
    assert err_rtn["samples"] == err_splitq["samples"] == 8
    for layer, (s, r) in enumerate(zip(err_splitq["layers"], err_rtn["layers"])):
        assert s < r, f"layer {layer}: SplitQ relative error {s:.3e} >= RTN {r:.3e}"
    assert err_splitq["logits"] < err_rtn["logits"]
