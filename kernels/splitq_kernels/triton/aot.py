"""Compile the kernels ahead of time for NVIDIA targets without a GPU, to catch what the CPU
interpreter does not check (tl.dot shape limits, types, register pressure) and to confirm the
rounding survives compilation (the rint magic constant, IEEE division).

    python -m splitq_kernels.triton.aot                  # small awkward layer, sm_90 and sm_89
    python -m splitq_kernels.triton.aot --model-shapes   # Qwen2.5-VL 7B/3B layer shapes (BENCHMARKS.md)
    python -m splitq_kernels.triton.aot --model-shapes 72b.qkv 72b.down   # any of MODEL_SHAPES
    python -m splitq_kernels.triton.aot --decode-shapes  # split decode kernel (a), every MODEL_SHAPES layer
    python -m splitq_kernels.triton.aot --w4a16-shapes   # the W4A16 decode GEMM, every MODEL_SHAPES layer
    python -m splitq_kernels.triton.aot --precision bf16 --model-shapes   # any of the above at a precision

Prints one JSON line per compiled kernel: registers and stack (spill) bytes per thread from
cuobjdump, shared memory, and whether the rounding constants made it into the PTX.

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

from ..layout import PRECISIONS, scratch_dtype


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


def _plans(kl, T: int):
    from .gemm import default_config, plan_gemm
    from .quantize_decode import can_implement_decode, decode_workspace, plan_linear_decode, plan_quantize_decode
    from .quantize_input import alloc_activations, plan_quantize_input

    x = torch.empty(T, kl.in_features, dtype=torch.bfloat16)
    act = alloc_activations(kl, T, x.device)
    block_t = min(16, 1 << (T - 1).bit_length())
    cfg = default_config(kl, T, torch.device("cpu"))
    if T <= 16:  # what an H100 gets: 4 * 132 programs over the output tiles
        tiles = -(-kl.out_features // cfg.block_n)
        cfg = type(cfg)(**{**cfg.__dict__, "split_k": max(1, min(64, 528 // tiles))})
    plans = {
        "quantize_input": plan_quantize_input(x, torch.ones(T, dtype=torch.bool), kl, act,
                                              torch.empty(block_t, kl.in_features, dtype=scratch_dtype(kl)), block_t, 132),
        "gemm": plan_gemm(act, kl, torch.empty(T, kl.out_features, dtype=torch.bfloat16), cfg),
    }
    if can_implement_decode(kl, T)[0]:  # what the op runs at 1-16 rows instead of kernel (a)
        ws = decode_workspace(x.device, kl.act_symmetric, max(kl.cws_rank_padded, kl.mac_rank_padded))
        mask, scratch = torch.ones(T, dtype=torch.bool), torch.empty(T, kl.in_features, dtype=scratch_dtype(kl))
        # D1 + D2 fused, D3 (the quantize_input op), and D1, D2 as launches of their own (fused=False)
        for p in plan_quantize_decode(x, mask, kl, act, scratch, ws) + plan_quantize_decode(
                x, mask, kl, act, scratch, ws, mac_in_gemm=True, fused=False):
            plans[p.kernel.fn.__name__.strip("_").removesuffix("_kernel")] = p
        if kl.mac_rank:  # the linear op's third launch: the GEMM with the MAC down in its grid
            out = torch.empty(T, kl.out_features, dtype=torch.bfloat16)
            plans["gemm_mac_in_grid"] = plan_linear_decode(x, mask, kl, out, act, scratch, ws, cfg)[-1]
    if T <= 16:  # SPLITQ_DECODE_MODE=w4a16: the W4A16 GEMM (CWS down in its grid), and the down alone
        from .w4a16 import W4A16Config, plan_linear_w4a16

        out = torch.empty(T, kl.out_features, dtype=torch.bfloat16)
        scratch = torch.empty(T, kl.in_features, dtype=scratch_dtype(kl))
        h = torch.empty(16, kl.cws_rank_padded or 16)
        wcfg = W4A16Config(block_n=64, split_k=max(1, min(64, 528 // -(-kl.out_features // 64))))
        plans["w4a16"] = plan_linear_w4a16(x, kl, out, scratch, h, wcfg, in_grid=True)[-1]
        if kl.cws_rank:
            plans["w4a16_down"] = plan_linear_w4a16(x, kl, out, scratch, h, wcfg, in_grid=False)[1]
    return cfg, plans


def _compile(kl, T: int, arch: int, tags: dict) -> list[dict]:
    cfg, plans = _plans(kl, T)
    out = []
    for kname, plan in plans.items():
        k = plan.compile(arch)
        ptx = k.asm["ptx"]
        out.append({
            "kernel": kname, **tags, "rows": T, "arch": arch,
            "split_k": cfg.split_k if kname.startswith("gemm") else None,
            "rint_magic": "0f4B400000" in ptx, "div_rn": "div.rn.f32" in ptx, "shared": k.metadata.shared,
            **_resource_usage(k.asm["cubin"]),
        })
    return out


def _check_compiled_mode() -> None:
    from .launch import is_interpreted
    from .quantize_input import _quantize_input_kernel

    if is_interpreted(_quantize_input_kernel):
        raise RuntimeError("kernels were imported with TRITON_INTERPRET=1; run in a fresh process without it")


def compile_cases(cases=CASES) -> list[dict]:
    """cases: (arch, scheme name, symmetric activations, rows) tuples, on a small layer with every
    part present and awkward sizes (only shapes and dtypes matter for compilation)."""
    from splitq_vllm.testing.layers import random_float_layer

    from ..layout import prepare_kernel_layer
    from ..reference import SplitQScheme, quantize_linear

    _check_compiled_mode()
    fl, _ = random_float_layer(in_features=83, out_features=45, n_text=3, n_vision=8, kron=(18, 4), cws_rank=5,
                               mac_rank=17, seed=0)
    results = []
    for arch, name, sym, T in cases:
        scheme = SplitQScheme.from_name(name, act_symmetric=sym)
        kl = prepare_kernel_layer(quantize_linear(fl, scheme), scheme, "cpu", precision="tf32x3")
        results += _compile(kl, T, arch, {"scheme": name, "symmetric": sym})
    return results


# The project's one table of real linear shapes (d_in, d_out) of the Qwen2.5-VL language models
# (public configs; notes/anchors.md): fused qkv (with bias), o_proj, fused gate_up, down. Also read
# by benchmarks/cost_model.py. 72B: hidden 8192, MLP 29568, 64 heads / 8 KV heads of 128.
MODEL_SHAPES = {
    "7b.qkv": (3584, 4608), "7b.o_proj": (3584, 3584), "7b.gate_up": (3584, 37888), "7b.down": (18944, 3584),
    "3b.qkv": (2048, 2560), "3b.o_proj": (2048, 2048), "3b.gate_up": (2048, 22016), "3b.down": (11008, 2048),
    "72b.qkv": (8192, 10240), "72b.o_proj": (8192, 8192), "72b.gate_up": (8192, 59136), "72b.down": (29568, 8192),
}
# What `--model-shapes` compiles by default (the BENCHMARKS.md table); name others on the command line.
AOT_DEFAULT_LAYERS = ("7b.qkv", "7b.o_proj", "7b.gate_up", "7b.down", "3b.qkv", "3b.down")


def compile_model_shapes(archs=(90, 89), rows=(2048, 1), scheme_name: str = "w4a4",
                         layers: tuple[str, ...] = AOT_DEFAULT_LAYERS, precision: str = "tf32x3") -> list[dict]:
    """The kernels as configured for the real Qwen2.5-VL layer shapes (default channel split), on a
    stand-in layer whose dims are those of the real one (compilation depends on dims only)."""
    import dataclasses

    from splitq_vllm.testing.layers import default_layer_dims, random_quantized_layer

    from ..layout import prepare_kernel_layer
    from ..reference import SplitQScheme

    _check_compiled_mode()
    scheme = SplitQScheme.from_name(scheme_name)
    base = prepare_kernel_layer(random_quantized_layer(53, 37, 3, 5, (5, 9), scheme, 3, 4), scheme, "cpu",
                                precision=precision)
    results = []
    unknown = [n for n in layers if n not in MODEL_SHAPES]
    if unknown:
        raise ValueError(f"unknown layers {unknown}; known: {sorted(MODEL_SHAPES)}")
    for name in layers:
        d_in, d_out = MODEL_SHAPES[name]
        d = default_layer_dims(d_in, d_out)
        kl = dataclasses.replace(base, in_features=d_in, out_features=d_out, main=d_in - d["n_text"] - d["n_vision"],
                                 text=d["n_text"], vision=d["n_vision"], n1=d["kron"][0], n2=d["kron"][1],
                                 cws_rank=d["cws_rank"], mac_rank=d["mac_rank"])
        for arch in archs:
            for T in rows:
                results += _compile(kl, T, arch, {"layer": name, "scheme": scheme_name, "precision": precision})
    return results


def compile_decode_shapes(archs=(90, 89), layers: tuple[str, ...] = tuple(MODEL_SHAPES),
                          scheme_name: str = "w4a4", w4a16_only: bool = False, precision: str = "tf32x3") -> list[dict]:
    """The split decode kernel (a) (quantize_decode.py: D1 + D2 fused, D3, and D1, D2 unfused)
    and the GEMM with the MAC down in its grid (the linear op's second launch; split-K as on an
    H100) as configured for the real layer shapes. Its tiles do not depend on the row count (always one 16-row tile), so one
    compilation per layer covers 1..16 rows. Also the W4A16 decode GEMM (SPLITQ_DECODE_MODE=w4a16,
    w4a16.py, CWS down in its grid; its first launch is D1); w4a16_only: that kernel alone."""
    import dataclasses

    from splitq_vllm.testing.layers import default_layer_dims, random_quantized_layer

    from ..layout import prepare_kernel_layer
    from ..reference import SplitQScheme
    from .gemm import default_config, word_blocks
    from .quantize_decode import DECODE_ROWS, decode_workspace, plan_linear_decode, plan_quantize_decode
    from .quantize_input import alloc_activations

    _check_compiled_mode()
    scheme = SplitQScheme.from_name(scheme_name)
    base = prepare_kernel_layer(random_quantized_layer(53, 37, 3, 5, (5, 9), scheme, 3, 4), scheme, "cpu",
                                precision=precision)
    results = []
    for name in layers:
        d_in, d_out = MODEL_SHAPES[name]
        d = default_layer_dims(d_in, d_out)
        kl = dataclasses.replace(base, in_features=d_in, out_features=d_out, main=d_in - d["n_text"] - d["n_vision"],
                                 text=d["n_text"], vision=d["n_vision"], n1=d["kron"][0], n2=d["kron"][1],
                                 cws_rank=d["cws_rank"], mac_rank=d["mac_rank"])
        x = torch.empty(DECODE_ROWS, d_in, dtype=torch.bfloat16)
        act = alloc_activations(kl, DECODE_ROWS, x.device)
        ws = decode_workspace(x.device, kl.act_symmetric, max(kl.cws_rank_padded, kl.mac_rank_padded))
        mask = torch.ones(DECODE_ROWS, dtype=torch.bool)
        scratch = torch.empty(DECODE_ROWS, d_in, dtype=scratch_dtype(kl))
        # D1 + D2 fused, D3 (the quantize_input op); D1, D2 as launches of their own (fused=False)
        plans = plan_quantize_decode(x, mask, kl, act, scratch, ws)
        plans += plan_quantize_decode(x, mask, kl, act, scratch, ws, mac_in_gemm=True, fused=False)
        # the linear op's third launch: the GEMM with the MAC down in its grid, split as on an H100
        cfg = default_config(kl, DECODE_ROWS, torch.device("cpu"))
        cfg = dataclasses.replace(cfg, split_k=max(1, min(word_blocks(kl), 528 // -(-d_out // cfg.block_n))))
        out = torch.empty(DECODE_ROWS, d_out, dtype=torch.bfloat16)
        plans.append(plan_linear_decode(x, mask, kl, out, act, scratch, ws, cfg)[-1])
        from .w4a16 import W4A16Config, plan_linear_w4a16

        wcfg = W4A16Config(block_n=64, split_k=max(1, min(word_blocks(kl), 528 // -(-d_out // 64))))
        w4a16 = plan_linear_w4a16(x, kl, out, scratch, torch.empty(DECODE_ROWS, kl.cws_rank_padded or 16), wcfg,
                                  in_grid=True)[-1]
        plans = [w4a16] if w4a16_only else plans + [w4a16]
        for arch in archs:
            for plan in plans:
                k = plan.compile(arch)
                results.append({
                    "kernel": plan.kernel.fn.__name__ + (" MAC_IN_GRID" if plan.constexprs.get("MAC_IN_GRID") else ""),
                    "layer": name, "scheme": scheme_name, "precision": precision, "rows": "1-16", "arch": arch,
                    "programs": plan.grid[0] * (plan.grid[1] if len(plan.grid) > 1 else 1),
                    "rint_magic": "0f4B400000" in k.asm["ptx"], "div_rn": "div.rn.f32" in k.asm["ptx"],
                    "shared": k.metadata.shared, **_resource_usage(k.asm["cubin"]),
                })
    return results


def main() -> None:
    """Arguments: [--precision P] then none (all of CASES) or ARCH:SCHEME:sym|asym:ROWS ... (e.g.
    90:w4a4:sym:2048), or one of --decode-shapes / --w4a16-shapes / --model-shapes [layers]."""
    argv = sys.argv[1:]
    precision = "tf32x3"
    if argv[:1] == ["--precision"]:
        if len(argv) < 2 or argv[1] not in PRECISIONS:
            raise SystemExit(f"--precision needs one of {PRECISIONS}")
        precision, argv = argv[1], argv[2:]
    if argv[:1] == ["--decode-shapes"]:  # the split decode kernel (a); optionally layer names
        results = compile_decode_shapes(layers=tuple(argv[1:]) or tuple(MODEL_SHAPES), precision=precision)
    elif argv[:1] == ["--w4a16-shapes"]:  # the W4A16 decode GEMM alone; optionally layer names
        results = compile_decode_shapes(layers=tuple(argv[1:]) or tuple(MODEL_SHAPES), w4a16_only=True,
                                        precision=precision)
    elif argv[:1] == ["--model-shapes"]:  # optionally followed by layer names, e.g. 72b.qkv
        results = compile_model_shapes(layers=tuple(argv[1:]) or AOT_DEFAULT_LAYERS, precision=precision)
    else:
        cases = CASES
        if argv:
            cases = [(int(a), n, s == "sym", int(r)) for a, n, s, r in (c.split(":") for c in argv)]
        results = compile_cases(cases)
    for r in results:
        print(json.dumps(r))
    sys.stdout.flush()


if __name__ == "__main__":
    main()
