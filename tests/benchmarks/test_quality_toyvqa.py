"""The ToyVQA quality benchmark runs end to end on a small budget (the numbers are BENCHMARKS.md's
business; here: every row is produced, scored on the asked questions, and checkpoints are reused)."""

import json
import subprocess
import sys
from pathlib import Path

from tests.helpers.engine import vllm_env
from tests.helpers.paths import BENCHMARKS

SCRIPT = BENCHMARKS / "quality_toyvqa.py"


def _run(tmp_path: Path, *extra: str) -> dict:
    out = tmp_path / "quality.json"
    cmd = [sys.executable, str(SCRIPT), "--work", str(tmp_path / "work"), "--n", "12", "--samples", "4", "--epochs", "1",
           "--schemes", "w3a3", "--methods", "rtn", "splitq", "--jobs", "1", "--no-vllm", "--json", str(out),
           "--markdown", str(tmp_path / "quality.md"), *extra]  # fmt: skip
    proc = subprocess.run(cmd, cwd=tmp_path, env=vllm_env({"OMP_NUM_THREADS": "1"}), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(out.read_text())


def test_quality_benchmark_rows_and_reuse(tmp_path):
    first = _run(tmp_path)
    rows = {(r["scheme"], r["method"]): r for r in first["results"]}
    assert set(rows) == {("fp16", "fp16"), ("w3a3", "rtn"), ("w3a3", "splitq")}
    assert all(r["n"] == 12 and r["correct"] == round(r["accuracy"] * 12) for r in rows.values())
    assert rows[("fp16", "fp16")]["accuracy"] >= 0.75  # the bundled model answers (about 0.9 in FP)
    table = (tmp_path / "quality.md").read_text()
    assert "| W16A16 | FP16 |" in table and "| W3A3 | RTN |" in table and "| W3A3 | +MAC (SplitQ) |" in table
    ckpt = tmp_path / "work" / "splitq-w3a3-4x1"
    assert json.loads((ckpt / "config.json").read_text())["quantization_config"]["quant_method"] == "splitq"
    # a second run scores the same checkpoints again without calibrating
    mtime = (ckpt / "config.json").stat().st_mtime_ns
    second = _run(tmp_path)
    assert (ckpt / "config.json").stat().st_mtime_ns == mtime
    assert [r["accuracy"] for r in second["results"]] == [r["accuracy"] for r in first["results"]]


def _module():
    import importlib.util

    spec = importlib.util.spec_from_file_location("quality_toyvqa", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_tables_carry_standard_errors_and_every_kind():
    q = _module()
    assert abs(q.standard_error(0.9, 1000) - (0.09 / 1000) ** 0.5) < 1e-12
    kinds = {"add": {"correct": 9, "n": 10}, "position": {"correct": 3, "n": 8}}

    def result(scheme, method, acc, pk):
        return {"scheme": scheme, "method": method, "accuracy": acc, "n": 18, "image_accuracy": 0.375,
                "text_accuracy": 0.9, "per_kind": pk}  # fmt: skip

    rows = [result("fp16", "fp16", 12 / 18, kinds), result("w4a4", "rtn", 0.5, {"add": {"correct": 5, "n": 10}})]
    table = q.markdown(rows, ["w4a4"], ["rtn"])
    se = 100 * q.standard_error(12 / 18, 18)
    assert f"| W16A16 | FP16 | 66.7 ± {se:.1f} |" in table and "| W4A4 | RTN | 50.0 ± 11.8 |" in table
    per_kind = q.per_kind_markdown(rows, ["w4a4"], ["rtn"])
    assert "add (n=10, ±16)" in per_kind and "position (n=8, ±18)" in per_kind
    assert "| W16A16 | FP16 | 90 | 38 |" in per_kind and "| W4A4 | RTN | 50 |  |" in per_kind


def test_served_rows_of_several_methods_follow_their_reference_rows():
    mod = _module()
    row = lambda s, m, a: {"scheme": s, "method": m, "accuracy": a, "n": 1000, "image_accuracy": a, "text_accuracy": a}  # noqa: E731
    results = [row("fp16", "fp16", 0.9), row("w4a4", "mbq", 0.8), row("w4a4", "vlmq", 0.7),
               row("w4a4", "mbq_vllm", 0.81), row("w4a4", "vlmq_vllm", 0.72)]  # fmt: skip
    lines = mod.markdown(results, ["w4a4"], ["mbq", "vlmq"]).splitlines()
    assert [ln.split(" | ")[1] for ln in lines[2:]] == [
        "FP16", "MBQ", "VLMQ", "MBQ, served by vLLM", "VLMQ, served by vLLM"
    ]  # fmt: skip
    assert "| W4A4 | VLMQ, served by vLLM | 72.0 ± 1.4 |" in lines[-1]


def test_tower_rows_follow_their_16_bit_tower_rows():
    mod = _module()
    row = lambda s, m, a: {"scheme": s, "method": m, "accuracy": a, "n": 1000, "image_accuracy": a, "text_accuracy": a}  # noqa: E731
    results = [row("fp16", "fp16", 0.9), row("w4a4", "splitq", 0.8), row("w4a4", "splitq+tower", 0.79),
               row("w3a3", "splitq", 0.7), row("w3a3", "splitq+tower", 0.6), row("w3a3", "splitq+tower_w4a4", 0.69),
               row("w4a4", "splitq+tower_vllm", 0.78), row("w4a4", "splitq_vllm", 0.81)]  # fmt: skip
    lines = mod.markdown(results, ["w4a4", "w3a3"], ["splitq"]).splitlines()
    assert [ln.split(" | ")[:2] for ln in lines[2:]] == [
        ["| W16A16", "FP16"], ["| W4A4", "+MAC (SplitQ)"], ["| W4A4", "SplitQ, tower at the same bits"],
        ["| W4A4", "SplitQ, served by vLLM"], ["| W4A4", "SplitQ, tower at the same bits, served by vLLM"],
        ["| W3A3", "+MAC (SplitQ)"], ["| W3A3", "SplitQ, tower at the same bits"], ["| W3A3", "SplitQ, tower W4A4"],
    ]  # fmt: skip


def test_tower_rows_end_to_end(tmp_path):
    result = _run(tmp_path, "--methods", "splitq", "--schemes", "w4a4", "w3a3", "--quantize-vision-tower")
    rows = {(r["scheme"], r["method"]): r for r in result["results"]}
    assert set(rows) == {("fp16", "fp16"), ("w4a4", "splitq"), ("w4a4", "splitq+tower"), ("w3a3", "splitq"),
                         ("w3a3", "splitq+tower"), ("w3a3", "splitq+tower_w4a4")}  # fmt: skip
    assert rows[("w3a3", "splitq+tower_w4a4")]["tower_ckpt"].endswith("splitq-w4a4-4x1-tower")
    layers = json.loads((tmp_path / "work" / "splitq-w4a4-4x1-tower" / "config.json").read_text())
    assert any(n.startswith("visual.blocks.") for n in layers["quantization_config"]["layers"])
    assert "| W3A3 | SplitQ, tower W4A4 |" in (tmp_path / "quality.md").read_text()
