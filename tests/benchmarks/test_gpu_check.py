"""benchmarks/gpu_check.sh and its driver on the CPU: argument handling, the plan of commands it
runs on a GPU, the dry run (CPU modes, interpreter, tiny shapes) and the summary it writes."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys

import pytest

from tests.helpers.paths import BENCHMARKS

SCRIPT = BENCHMARKS / "gpu_check.sh"


def _load():
    spec = importlib.util.spec_from_file_location("gpu_check", BENCHMARKS / "gpu_check.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


gc = _load()


def _env() -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "OUT")}
    env["PYTHON"] = sys.executable
    return env


def test_shellcheck_clean():
    tool = shutil.which("shellcheck") or os.path.join(os.path.dirname(sys.executable), "shellcheck")
    if not os.path.exists(tool):
        pytest.skip("shellcheck not installed")
    proc = subprocess.run([tool, str(SCRIPT)], capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_gpu_plan_covers_the_issue(capsys):
    assert gc.main(["--print-plan"]) == 0
    plan = capsys.readouterr().out
    for layer in gc.KERNEL_LAYERS:
        assert f"--layers {layer} --rows 1,16,256,2048,16384" in plan
    assert "-m gpu" in plan and "--device cuda" in plan and "--capture-only" in plan
    assert "bench_e2e_qwen25vl.py --batches 1,8" in plan and "cost_model.py --precision float32,bf16 --json" in plan
    assert gc.main(["--print-plan", "--dry-run"]) == 0
    dry = capsys.readouterr().out
    assert dry.count("--cpu-check") == 2 and "--quick" in dry and "--device cuda" not in dry
    assert sum(gc.CAPS[s] * (4 if s == "kernels" else 1) for s in gc.CAPS) <= 450  # the budget holds the caps


def test_argument_errors(tmp_path):
    with pytest.raises(SystemExit):
        gc.main(["--out", str(tmp_path), "--steps", "env,bogus"])
    with pytest.raises(SystemExit):
        gc.main(["--steps", "env"])  # no --out
    proc = subprocess.run(["bash", str(SCRIPT)], capture_output=True, text=True, env=_env(), check=False)
    assert proc.returncode == 2 and "usage" in proc.stderr
    if not __import__("torch").cuda.is_available():
        assert gc.main(["--out", str(tmp_path / "o")]) == 2  # a GPU run without a GPU says so


def test_dry_run_capture_and_summary(tmp_path):
    """The script end to end on the CPU: env, the cost model, the torch.compile capture path of
    the full SplitQ linear in the interpreter (equal to eager), and the summary files."""
    out = tmp_path / "out"
    proc = subprocess.run(["bash", str(SCRIPT), str(out), "--dry-run", "--steps", "env,cost_model,capture,summary"],
                          capture_output=True, text=True, env=_env(), timeout=900, check=False)
    logs = "".join(p.read_text()[-2000:] for p in out.glob("*.log")) if out.exists() else ""
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:] + logs
    res = json.loads((out / "results.json").read_text())
    assert [s["status"] for s in res["steps"]] == ["ok", "ok", "ok"]
    assert res["capture"]["ok"] and [c["rows"] for c in res["capture"]["cases"]] == [1, 16]
    assert res["env"]["torch"] and len(json.loads((out / "cost_model.json").read_text())["results"]) > 0
    assert "# gpu_check: no GPU" in (out / "results.md").read_text()


def test_summary_puts_measured_beside_predicted(tmp_path):
    assert _load_cost(tmp_path)
    (tmp_path / "env.json").write_text(json.dumps({"gpu": "NVIDIA H200", "date_utc": "x"}))
    row = {"layer": "qkv", "rows": 16, "bf16_ms": 0.01, "w4a4_gemm_ms": 0.004, "w4a4_gemm_speedup": 2.5,
           "splitq_ms": 0.005, "splitq_speedup": 2.0, "splitq_a_ms": 0.002, "splitq_b_ms": 0.003}
    (tmp_path / "bench_kernels.7b.qkv.json").write_text(json.dumps({"rows": [row], "checks_passed": True}))
    res = gc.summarize(tmp_path, [{"label": "kernels.qkv", "status": "ok", "seconds": 1.0}])
    md = (tmp_path / "results.md").read_text()
    pred = next(r for r in json.loads((tmp_path / "cost_model.json").read_text())["results"]
                if r["hardware"] == "h200" and r["design"] == "decode" and r["layer"] == "7b.qkv" and r["rows"] == 16)
    assert f"{pred['variants']['splitq']['ratio_to_bf16']:.2f}" in md and "| qkv | 16 | 0.010 |" in md
    assert res["kernel_checks_passed"] == {"qkv": True}


def _load_cost(tmp_path) -> bool:
    proc = subprocess.run([sys.executable, str(BENCHMARKS / "cost_model.py"), "--models", "7b", "--json",
                           str(tmp_path / "cost_model.json")], capture_output=True, text=True, env=_env(), check=False)
    return proc.returncode == 0
