"""Compile the kernels ahead of time for NVIDIA targets without a GPU, to catch what the CPU
interpreter does not check (tl.dot shape limits, types, register pressure) and to confirm the
rounding survives compilation (the rint magic constant, IEEE division).

    python -m splitq_kernels.triton.aot        # prints one JSON line per compiled kernel

Must run in a process where TRITON_INTERPRET is not set when the kernels are imported.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile

import torch


def _resource_usage(cubin: bytes) -> dict[str, int]:
    import triton

    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    if not os.path.exists(tool):
        return {}
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(cubin)
    try:
        out = subprocess.run([tool, "-res-usage", f.name], capture_output=True, text=True, timeout=60).stdout
    finally:
        os.unlink(f.name)
    m = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", out)
    return {} if m is None else {"regs": int(m.group(1)), "stack": int(m.group(2))}


CASES = [(arch, name, sym, rows) for arch in (90, 89) for name, sym in (("w4a4", True), ("w3a2", False))
         for rows in (2048, 1)]


def compile_cases(cases=CASES) -> list[dict]:
    """cases: (arch, scheme name, symmetric activations, rows) tuples."""
    from ..layout import prepare_kernel_layer
    from ..reference import SplitQScheme, quantize_linear
    from ..reference.random_layer import random_float_layer
    from .gemm import default_config, plan_gemm
    from .launch import is_interpreted
    from .quantize_input import _quantize_input_kernel, alloc_activations, plan_quantize_input

    if is_interpreted(_quantize_input_kernel):
        raise RuntimeError("kernels were imported with TRITON_INTERPRET=1; run in a fresh process without it")
    # a layer with every part present and awkward sizes; only shapes and dtypes matter here
    fl, _ = random_float_layer(in_features=83, out_features=45, n_text=3, n_vision=8, kron=(18, 4), cws_rank=5,
                               mac_rank=17, seed=0)
    results = []
    for arch, name, sym, T in cases:
        scheme = SplitQScheme.from_name(name, act_symmetric=sym)
        kl = prepare_kernel_layer(quantize_linear(fl, scheme), scheme, "cpu", precision="tf32x3")
        x = torch.empty(T, kl.in_features, dtype=torch.bfloat16)
        act = alloc_activations(kl, T, x.device)
        block_t = min(16, 1 << (T - 1).bit_length())
        scratch = torch.empty(block_t, kl.in_features)
        cfg = default_config(kl, T, torch.device("cpu"))
        plans = {
            "quantize_input": plan_quantize_input(x, torch.ones(T, dtype=torch.bool), kl, act, scratch, block_t, 264),
            "gemm": plan_gemm(act, kl, torch.empty(T, kl.out_features, dtype=torch.bfloat16), cfg),
        }
        for kname, plan in plans.items():
            k = plan.compile(arch)
            ptx = k.asm["ptx"]
            results.append({
                "kernel": kname, "scheme": name, "symmetric": sym, "rows": T, "arch": arch,
                "split_k": cfg.split_k if kname == "gemm" else None,
                "rint_magic": "0f4B400000" in ptx, "div_rn": "div.rn.f32" in ptx,
                **_resource_usage(k.asm["cubin"]),
            })
    return results


def main() -> None:
    """Arguments: none (all of CASES) or ARCH:SCHEME:sym|asym:ROWS ... (e.g. 90:w4a4:sym:2048)."""
    cases = CASES
    if len(sys.argv) > 1:
        cases = [(int(a), n, s == "sym", int(r)) for a, n, s, r in (c.split(":") for c in sys.argv[1:])]
    for r in compile_cases(cases):
        print(json.dumps(r))
    sys.stdout.flush()


if __name__ == "__main__":
    main()
