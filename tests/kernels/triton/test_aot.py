"""The kernels compile for NVIDIA GPUs (Hopper sm_90, Ada sm_89) with the installed Triton, without
a GPU: catches what the CPU interpreter never checks (tl.dot shape limits, types, layouts), and
checks that the reference's rounding survives compilation (the round-half-even magic constant is
not folded away; the divisions are IEEE div.rn, not the approximate default)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

CASES = ["90:w4a4:sym:2048", "90:w3a2:asym:1", "89:w4a8:asym:2048", "89:w4a4:sym:3"]


def test_kernels_compile_for_hopper_and_ada(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"  # Triton 3.9 warns when unset; 1 is its current default
    proc = subprocess.run(
        [sys.executable, "-m", "splitq_kernels.triton.aot", *CASES],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    # 1-16 rows: also the split decode kernel (a) (D1 + D2, D3: the quantize_input op) and the GEMM
    # with the MAC down in its grid (the linear op's second launch, after D1 + D2)
    # (D1 and D2 fused in one grid, and each alone)
    # and the W4A16 decode mode's GEMM and CWS down (SPLITQ_DECODE_MODE=w4a16)
    decode = {"decode_transform_quantize", "decode_transform", "decode_quantize", "decode_mac", "gemm_mac_in_grid",
              "w4a16", "w4a16_down"}
    assert len(results) == 2 * len(CASES) + 7 * sum(int(c.split(":")[-1]) <= 16 for c in CASES)
    assert {r["kernel"] for r in results} == {"quantize_input", "gemm"} | decode
    for r in results:
        if r["kernel"] in decode - {"decode_transform", "w4a16", "w4a16_down"} | {"quantize_input"}:  # those that round
            assert r["rint_magic"] and r["div_rn"], r
    assert {r["split_k"] for r in results if r["kernel"] == "gemm" and r["rows"] <= 16} != {1}
