"""benchmarks/check_checkpoint_kernels.py on synthetic checkpoints of the tiny models (every part
of the format non-trivial): the Triton kernels in the interpreter against the reference, with the
kernel tests' definition of correct; a fault in the kernels' output is caught and named."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys

import pytest

from splitq_kernels.reference import SplitQScheme
from splitq_vllm.checkpoint import read_checkpoint
from splitq_vllm.testing.synthetic import synthesize_checkpoint
from tests.helpers.paths import BENCHMARKS

SCRIPT = BENCHMARKS / "check_checkpoint_kernels.py"


def _module():
    spec = importlib.util.spec_from_file_location("check_checkpoint_kernels", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def qwen_ckpt(tiny_qwen_dir, tmp_path_factory):
    return synthesize_checkpoint(
        tiny_qwen_dir, tmp_path_factory.mktemp("ckpt") / "qwen-w4a4", SplitQScheme.from_name("w4a4")
    )


def test_every_layer_of_a_checkpoint_matches(qwen_ckpt, tmp_path):
    out = tmp_path / "check.json"
    proc = subprocess.run([sys.executable, str(SCRIPT), str(qwen_ckpt), "--device", "cpu", "--json", str(out)],
                          capture_output=True, text=True, timeout=600)  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    res = json.loads(out.read_text())
    assert res["passed"] and res["rows"] == 3
    groups = [r["group"] for r in res["layers"]]
    assert groups == [
        f"model.layers.{i}.{k}" for i in (0, 1) for k in ("self_attn.qkv", "self_attn.o", "mlp.gate_up", "mlp.down")
    ]
    qkv = res["layers"][0]
    assert qkv["members"] == [f"model.layers.0.self_attn.{m}_proj" for m in "qkv"]  # vLLM's fused order
    assert qkv["out_features"] == 128 + 2 * 64 and qkv["cws_rank"] > 0 and qkv["mac_rank"] > 0
    for r in res["layers"]:
        assert r["status"] == "ok" and r["codes_compared"] > 0 and r["tolerance_ratio_reference"] <= 1
        assert 0 < r["max_rel_diff"] < 0.05  # bf16 output rounding
    assert "kernels match the reference on every layer" in proc.stdout


@pytest.mark.parametrize("model", ["qwen", "llava"])
def test_asymmetric_low_bit_first_layer(model, tiny_qwen_dir, tiny_llava_dir, tmp_path):
    scheme = SplitQScheme.from_name("w3a3", act_symmetric=False)
    ckpt = synthesize_checkpoint(tiny_qwen_dir if model == "qwen" else tiny_llava_dir, tmp_path / "c", scheme)
    m = _module()
    assert m.main([str(ckpt), "--layers", "1", "--rows", "5", "--dtype", "float32", "--device", "cpu",
                   "--json", str(tmp_path / "r.json")]) == 0  # fmt: skip
    res = json.loads((tmp_path / "r.json").read_text())
    assert len(res["layers"]) == 4 and all(".layers.0." in r["group"] for r in res["layers"])


def test_a_wrong_output_is_a_mismatch(qwen_ckpt):
    import torch

    import splitq_kernels.triton

    m = _module()
    splitq_kernels.triton.use_interpreter()
    ckpt = read_checkpoint(qwen_ckpt)
    group, names = m.fused_groups(ckpt, 1)[3]  # down_proj

    def off_by_a_little(x, mask, kl):  # the real kernels, then one output element off by 1% of its row
        act, y = m.triton_kernels(x, mask, kl)
        y = y.clone()
        y[1, 7] += 0.01 * y[1].abs().max()
        return act, y

    r = m.check_group(ckpt, group, names, 3, torch.float32, torch.device("cpu"), 0, kernels=off_by_a_little)
    assert r["status"] == "mismatch" and "row 1 col 7" in r["error"]


def test_not_a_checkpoint_is_refused(tiny_qwen_dir, capsys):
    assert _module().main([str(tiny_qwen_dir), "--device", "cpu"]) == 2
    assert "cannot read" in capsys.readouterr().err
