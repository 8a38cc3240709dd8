"""The benchmark scripts' CPU modes: their correctness parts run on the CPU through the Triton
interpreter with small shapes (the GPU timings themselves are in BENCHMARKS.md)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers.paths import BENCHMARKS

BENCH = BENCHMARKS


def _run(script: str, tmp_path: Path, timeout: int) -> str:
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "OUT")}
    proc = subprocess.run([sys.executable, str(BENCH / script), "--cpu-check", "--json", str(tmp_path / "out.json")],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert (tmp_path / "out.json").exists()
    return proc.stdout


def test_bench_kernels_cpu_check(tmp_path):
    out = _run("bench_kernels.py", tmp_path, 600)
    assert "correctness: all passed" in out
    assert out.count(": ok") == 8  # 2 layers x (mocd, splitq) x (decode, prefill rows)


@pytest.mark.timeout(900)
def test_bench_e2e_cpu_check(tmp_path):
    out = _run("bench_e2e_qwen25vl.py", tmp_path, 900)
    assert "checked against the reference (prefill and decode): ok" in out
