"""Each baseline through splitq-calibrate on the tiny Qwen2.5-VL model: a checkpoint the
reference loads and scores, in the plain SplitQ format (baselines/__init__.py)."""

from __future__ import annotations

import json

import pytest
import torch

from splitq_calibration.cli import calibrate_main
from splitq_calibration.evaluate import layer_output_errors
from splitq_vllm.checkpoint.reader import read_checkpoint
from splitq_vllm.testing.images import write_sharegpt

pytestmark = pytest.mark.usefixtures("single_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_sharegpt(tmp_path_factory.mktemp("data"), n=6)


@pytest.fixture(scope="module")
def rtn(tiny_qwen_dir, data, tmp_path_factory):
    out = tmp_path_factory.mktemp("ckpt") / "rtn"
    assert calibrate_main(["--model", str(tiny_qwen_dir), "--data", str(data), "--output", str(out), "--method", "rtn",
                           "--scheme", "w4a4", "--num-samples", "6", "-q"]) == 0  # fmt: skip
    return layer_output_errors(tiny_qwen_dir, out, data, num_samples=6)


@pytest.mark.parametrize("method", ["mbq", "masquant", "vlmq"])
def test_baseline_checkpoint_is_scored_by_the_reference(method, tiny_qwen_dir, data, rtn, tmp_path):
    out = tmp_path / method
    report = tmp_path / "report.json"
    rc = calibrate_main(["--model", str(tiny_qwen_dir), "--data", str(data), "--output", str(out), "--method", method,
                         "--scheme", "w4a4", "--num-samples", "6", "--report", str(report), "-q"])  # fmt: skip
    assert rc == 0
    ckpt = read_checkpoint(out)  # validated
    layers = {name: ckpt.layer(name) for name in ckpt.quant_config.layers}
    assert len(layers) == 14  # 2 decoder layers x 7 linears
    for q in layers.values():  # the plain format: one main set, no branches
        assert q.idx_text.numel() == q.idx_vision.numel() == 0 and q.cws_down is None and q.mac_down is None
    rep = json.loads(report.read_text())
    groups = next(iter(rep["layers"].values()))["groups"]
    assert set(groups) == {"qkv", "o", "gate_up", "down"}
    err = layer_output_errors(tiny_qwen_dir, out, data, num_samples=6)
    assert err["samples"] == 6 and all(0 < e < 1 for e in err["layers"])
    if method == "vlmq":  # GPTQ's error feedback: closer to FP than RTN in every layer
        assert all(v < r for v, r in zip(err["layers"], rtn["layers"]))
        assert err["logits"] < rtn["logits"]
    if method == "mbq":
        assert all(0 <= g["alpha"] < 1 and g["g_text"] > 0 and g["g_vision"] > 0 for g in groups.values())
    if method == "masquant":  # the text smoothing is what the checkpoint's main smoothing holds
        assert any(not torch.allclose(q.main_smooth, torch.ones_like(q.main_smooth)) for q in layers.values())
