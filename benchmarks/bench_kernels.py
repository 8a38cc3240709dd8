#!/usr/bin/env python
"""SplitQ kernel benchmark: correctness at real Qwen2.5-VL shapes, then timings, in one call.

    python benchmarks/bench_kernels.py                      # GPU: 7B and 3B shapes, all row counts
    python benchmarks/bench_kernels.py --models 7b --rows 1,2048
    python benchmarks/bench_kernels.py --cpu-check          # CPU: correctness only, tiny shapes, interpreter

For each model (notes/anchors.md shapes: fused qkv, o_proj, fused gate_up, down_proj) and each row
count (1, 16, 256, 2048, 8x2048 = 16384) it times, in the same process and on the same device:
- bf16:      torch.nn.functional.linear with bf16 weights (the baseline; + bias on qkv)
- w4a4_gemm: this project's GEMM kernel alone on pre-quantized int8 activations, main path only
             (no outliers, no branches): the plain W4A4 GEMM
- mocd:      full SplitQ linear (kernel a + kernel b), outlier paths, no low-rank branches
- mocd+cws:  + the CWS branch (rank 2%)
- splitq:    + the MAC branch (rank 3%) on a mixed text/vision mask: the full method
with the default channel split (2% text + 2% vision outliers, main a multiple of 64), prints
each time, its ratio to bf16, achieved TOP/s (2 * rows * D_in * D_out / time) against the
measured int8 and bf16 matmul peaks, and achieved GB/s (weights + activations in and out / time)
against the measured device-copy bandwidth. Timings replay CUDA graphs over enough copies of the
weights to defeat the L2 cache, as in a real model where every layer's weights are cold.

Correctness first (before any timing): kernel (a) + (b) against the reference at the real shapes
of every layer, for 64 rows (prefill tiles) and 5 rows (decode, split-K), with the criteria of
splitq_kernels.testing (see that module). A failure is printed and the run goes on, so the
timings still come back; the exit status is 1 if any check failed.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import time
import traceback

import torch

MODELS = {
    "7b": {"qkv": (3584, 4608), "o_proj": (3584, 3584), "gate_up": (3584, 37888), "down": (18944, 3584)},
    "3b": {"qkv": (2048, 2560), "o_proj": (2048, 2048), "gate_up": (2048, 22016), "down": (11008, 2048)},
}
TINY = {"tiny": {"qkv": (200, 72), "down": (331, 45)}}  # --cpu-check: awkward sizes, interpreter
ROWS = [1, 16, 256, 2048, 16384]
VARIANTS = ["w4a4_gemm", "mocd", "mocd+cws", "splitq"]
FAILURES: list[str] = []  # timing runs that raised (reported at the end; exit status 1)


def log(*a) -> None:
    print(*a, flush=True)


# ---------------------------------------------------------------------------------------------
# layers
# ---------------------------------------------------------------------------------------------


def layer_for(variant: str, d_in: int, d_out: int, scheme, bias: bool, seed: int):
    from splitq_vllm.testing.layers import default_layer_dims, random_quantized_layer

    multiple = 64 if d_in >= 1024 else 16
    if variant == "w4a4_gemm":
        dims = default_layer_dims(d_in, d_out, outlier_frac=0.0, main_multiple=multiple)
        dims.update(cws_rank=0, mac_rank=0)
        bias = False
    else:
        dims = default_layer_dims(d_in, d_out, main_multiple=multiple)
        if variant == "mocd":
            dims.update(cws_rank=0, mac_rank=0)
        elif variant == "mocd+cws":
            dims.update(mac_rank=0)
    return random_quantized_layer(d_in, d_out, scheme=scheme, bias=bias, seed=seed, **dims)


def inputs(rows: int, d_in: int, device, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Gaussian rows with 1% of the channels 20x larger, drawn on the device; an image-heavy
    prompt's mask: the first 60% of the rows are vision tokens, the rest text."""
    gen = torch.Generator(device=device).manual_seed(seed)
    x = torch.randn(rows, d_in, generator=gen, device=device, dtype=torch.float32)
    x[:, torch.randperm(d_in, generator=gen, device=device)[: max(1, d_in // 100)]] *= 20.0
    mask = torch.arange(rows, device=device) >= int(0.6 * rows)
    return x.to(torch.bfloat16), mask


# ---------------------------------------------------------------------------------------------
# correctness
# ---------------------------------------------------------------------------------------------


def check_layer(name: str, d_in: int, d_out: int, scheme, device, rows_list, precision: str) -> bool:
    from splitq_kernels.layout import prepare_kernel_layer
    from splitq_kernels.testing import check_linear
    from splitq_kernels.triton.gemm import gemm_triton
    from splitq_kernels.triton.quantize_decode import (
        can_implement_decode,
        linear_decode_triton,
        quantize_input_decode_triton,
    )
    from splitq_kernels.triton.quantize_input import quantize_input_triton

    ok = True
    for variant in ("mocd", "splitq"):
        layer = layer_for(variant, d_in, d_out, scheme, bias=name == "qkv", seed=1).to(device)
        kl = prepare_kernel_layer(layer, scheme, device, precision=precision)
        for rows in rows_list:
            x, mask = inputs(rows, d_in, device, seed=rows)
            mask = torch.rand(rows, generator=torch.Generator().manual_seed(rows)).lt(0.5).to(device)
            t0 = time.time()
            try:
                # kernel (a) as the op runs it: the split decode launches at <= 16 rows
                quantize = quantize_input_decode_triton if can_implement_decode(kl, rows)[0] else quantize_input_triton
                act = quantize(x, mask, kl, store_mac=True)
                y = gemm_triton(act, kl, torch.bfloat16)
                report, r_own, r_full = check_linear(y, act, x, mask, layer, scheme, kl)
                # float32 output: no final rounding, so the ratio shows the rescaling noise margin
                _, r32, _ = check_linear(gemm_triton(act, kl, torch.float32), act, x, mask, layer, scheme, kl)
                if can_implement_decode(kl, rows)[0]:  # the op's three launches (MAC down in the GEMM's grid)
                    y3, act3 = linear_decode_triton(x, mask, kl, store_mac=True)
                    check_linear(y3, act3, x, mask, layer, scheme, kl)
                    if not torch.equal(y3, y):
                        raise AssertionError("the op's three decode launches and the two halves' four disagree")
                if rows <= 16:  # SPLITQ_DECODE_MODE=w4a16: the W4A16 form (tf32 weight product on a GPU)
                    from splitq_kernels.reference import splitq_linear_w4a16
                    from splitq_kernels.triton.w4a16 import linear_w4a16_triton

                    y16 = linear_w4a16_triton(x, kl).float()
                    e16 = splitq_linear_w4a16(x.float(), None, layer).float()
                    rel = float((y16 - e16).abs().amax() / e16.abs().amax().clamp(min=1e-30))
                    if rel > 1e-2:  # bf16 output and tf32 products: ~4e-3 at most
                        raise AssertionError(f"W4A16 decode: max error {rel:.2e} of the output's max > 1e-2")
                    log(f"  check {name:8s} {variant:8s} rows={rows:5d}: W4A16 ok (max error {rel:.1e} of max |y|)")
                log(f"  check {name:8s} {variant:8s} rows={rows:5d}: ok  (worst error/tolerance bf16 "
                    f"{max(r_own, r_full):.2f}, float32 {r32:.3f}, "
                    f"explained code flips {report.explained_flips} of {report.codes_compared}, "
                    f"rows set aside {len(report.rows_with_flips())}; {time.time() - t0:.1f}s)")
            except Exception as e:  # report and go on: the timings still come back
                ok = False
                log(f"  check {name:8s} {variant:8s} rows={rows:5d}: FAILED {type(e).__name__}: {e}")
                traceback.print_exc(limit=3)
    return ok


# ---------------------------------------------------------------------------------------------
# timing (GPU)
# ---------------------------------------------------------------------------------------------


def wall_time_ms(fn, iters: int = 1) -> float:
    """--cpu-check stand-in for graph_time_ms: exercises the timing code, times nothing useful."""
    fn()
    t = time.perf_counter()
    for _ in range(iters):
        fn()
    return (time.perf_counter() - t) * 1e3 / iters


def graph_time_ms(fn, iters: int = 10) -> float:
    """Mean time of one fn() call, replaying a CUDA graph of it (no launch overhead from Python,
    as under vLLM's CUDA graphs). fn must allocate its outputs (graph-pool allocations)."""
    fn()  # compile and grow workspaces outside the capture
    torch.cuda.synchronize()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    graph.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    del graph
    return start.elapsed_time(end) / iters


def device_peaks(device) -> dict:
    n = 8192
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    bf16 = 2 * n**3 / (graph_time_ms(lambda: a @ b) * 1e-3) / 1e12
    ai = torch.randint(-8, 8, (n, n), device=device, dtype=torch.int8)
    bi = torch.randint(-8, 8, (n, n), device=device, dtype=torch.int8)
    try:
        int8 = 2 * n**3 / (graph_time_ms(lambda: torch._int_mm(ai, bi)) * 1e-3) / 1e12
    except Exception as e:  # noqa: BLE001
        log(f"  (torch._int_mm unavailable: {e}); int8 peak assumed 2x bf16")
        int8 = 2 * bf16
    src = torch.empty(1 << 30, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    copy = 2 * src.numel() / (graph_time_ms(lambda: dst.copy_(src)) * 1e-3) / 1e9
    del a, b, ai, bi, src, dst
    torch.cuda.empty_cache()
    return {"bf16_tflops": bf16, "int8_tops": int8, "copy_gbs": copy}


def copies_for(nbytes: int, cap: int = 48) -> int:
    """Enough distinct weight copies that one graph replay streams > 256 MB (cold L2)."""
    return max(1, min(cap, math.ceil((256 << 20) / max(1, nbytes))))


def time_layer(name: str, d_in: int, d_out: int, scheme, device, rows_list, precision: str, peaks: dict,
               timer=None) -> list[dict]:
    from splitq_kernels.layout import prepare_kernel_layer
    from splitq_kernels.ops import quantize_input_auto, splitq_linear_triton
    from splitq_kernels.triton.gemm import gemm_triton
    from splitq_kernels.triton.quantize_input import quantize_input_triton

    timer = timer or graph_time_ms
    results = []
    bias = name == "qkv"
    w = torch.randn(d_out, d_in, device=device, dtype=torch.bfloat16) / d_in**0.5
    b = torch.randn(d_out, device=device, dtype=torch.bfloat16) if bias else None
    cap = 48 if device.type == "cuda" else 2  # the interpreter is slow: two copies exercise the code
    n_w = copies_for(w.numel() * 2, cap)
    ws = [w] + [w.clone() for _ in range(n_w - 1)]
    kls = {}
    for variant in VARIANTS:
        layer = layer_for(variant, d_in, d_out, scheme, bias, seed=2).to(device)  # packs on the device
        kl = prepare_kernel_layer(layer, scheme, device, precision=precision)
        del layer
        n = copies_for(kl.nbytes(), cap)
        clone = lambda k: dataclasses.replace(  # noqa: E731
            k, **{f.name: getattr(k, f.name).clone() for f in dataclasses.fields(k)
                  if isinstance(getattr(k, f.name), torch.Tensor)})
        kls[variant] = [kl] + [clone(kl) for _ in range(n - 1)]
    # the full method at SPLITQ_PRECISION=bf16 too (bf16 float products, bfloat16 scratch), beside it
    bf16_kls = [] if precision == "bf16" else [dataclasses.replace(k, precision="bf16") for k in kls["splitq"]]
    for rows in rows_list:
        x, mask = inputs(rows, d_in, device, seed=3)
        act_bytes = rows * (d_in + d_out) * 2
        row = {"layer": name, "d_in": d_in, "d_out": d_out, "rows": rows}
        try:
            t_bf16 = timer(lambda: [torch.nn.functional.linear(x, wi, b) for wi in ws]) / len(ws)
        except torch.cuda.OutOfMemoryError:
            log(f"  {name} rows={rows}: out of memory for bf16; skipped")
            continue
        row["bf16_ms"] = t_bf16
        flops = 2 * rows * d_in * d_out
        for variant, layers in kls.items():
            try:
                if variant == "w4a4_gemm":
                    acts = quantize_input_triton(x, mask, layers[0])
                    fn = lambda: [gemm_triton(acts, k, torch.bfloat16) for k in layers]  # noqa: E731
                else:
                    fn = lambda: [splitq_linear_triton(x, mask, k) for k in layers]  # noqa: E731
                t = timer(fn) / len(layers)
            except Exception as e:  # noqa: BLE001
                FAILURES.append(f"{name} rows={rows} {variant}: {type(e).__name__}: {e}")
                log(f"  {FAILURES[-1]}: FAILED")
                continue
            row[f"{variant}_ms"] = t
            row[f"{variant}_speedup"] = t_bf16 / t
            row[f"{variant}_tops"] = flops / (t * 1e-3) / 1e12
            row[f"{variant}_gbs"] = (layers[0].nbytes() + act_bytes) / (t * 1e-3) / 1e9
        if bf16_kls:
            try:
                row["splitq_bf16_ms"] = timer(lambda: [splitq_linear_triton(x, mask, k) for k in bf16_kls]) / len(bf16_kls)
                row["splitq_bf16_speedup"] = t_bf16 / row["splitq_bf16_ms"]
            except Exception as e:  # noqa: BLE001
                FAILURES.append(f"{name} rows={rows} splitq at bf16: {type(e).__name__}: {e}")
                log(f"  {FAILURES[-1]}: FAILED")
        # kernel (a) and (b) of the full method, separately
        try:
            k0 = kls["splitq"][0]
            row["splitq_a_ms"] = timer(lambda: quantize_input_auto(x, mask, k0))  # as the op runs it
            if rows <= 16:  # the persistent kernel (a) the decode launches replace (one program)
                row["splitq_a_persistent_ms"] = timer(lambda: quantize_input_triton(x, mask, k0))
            acts = quantize_input_auto(x, mask, k0)
            row["splitq_b_ms"] = timer(lambda: gemm_triton(acts, k0, torch.bfloat16))
            if rows <= 16:  # SPLITQ_DECODE_MODE=w4a16 (triton/w4a16.py), as the op would run it
                from splitq_kernels.triton.w4a16 import linear_w4a16_triton

                row["splitq_w4a16_ms"] = timer(lambda: [linear_w4a16_triton(x, k) for k in kls["splitq"]]) / len(
                    kls["splitq"])
                row["splitq_w4a16_speedup"] = t_bf16 / row["splitq_w4a16_ms"]
        except Exception as e:  # noqa: BLE001
            FAILURES.append(f"{name} rows={rows} split timing: {type(e).__name__}: {e}")
            log(f"  {FAILURES[-1]}: FAILED")
        row["bf16_tflops"] = flops / (t_bf16 * 1e-3) / 1e12
        row["bf16_gbs"] = (w.numel() * 2 + act_bytes) / (t_bf16 * 1e-3) / 1e9
        results.append(row)
        log(format_row(row, peaks))
    del ws, kls
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return results


def format_row(r: dict, peaks: dict) -> str:
    s = f"  {r['layer']:8s} rows={r['rows']:5d}  bf16 {r['bf16_ms'] * 1e3:9.1f} us ({r['bf16_tflops']:6.1f} TFLOP/s, " \
        f"{100 * r['bf16_tflops'] / peaks['bf16_tflops']:3.0f}% of bf16 peak, {r['bf16_gbs']:6.0f} GB/s)"
    for v in VARIANTS:
        if f"{v}_ms" in r:
            s += (f"\n      {v:10s} {r[f'{v}_ms'] * 1e3:9.1f} us  x{r[f'{v}_speedup']:5.2f} vs bf16  "
                  f"{r[f'{v}_tops']:6.1f} TOP/s ({100 * r[f'{v}_tops'] / peaks['int8_tops']:3.0f}% of int8 peak)  "
                  f"{r[f'{v}_gbs']:6.0f} GB/s ({100 * r[f'{v}_gbs'] / peaks['copy_gbs']:3.0f}% of copy)")
    if "splitq_a_ms" in r and "splitq_b_ms" in r:
        s += f"\n      splitq = kernel a {r['splitq_a_ms'] * 1e3:.1f} us + kernel b {r['splitq_b_ms'] * 1e3:.1f} us"
    if "splitq_ms" in r and "w4a4_gemm_ms" in r:
        s += f"; full SplitQ / plain W4A4 GEMM = {r['splitq_ms'] / r['w4a4_gemm_ms']:.2f}"
    if "splitq_bf16_ms" in r:
        s += f"\n      splitq, SPLITQ_PRECISION=bf16 {r['splitq_bf16_ms'] * 1e3:.1f} us  x{r['splitq_bf16_speedup']:5.2f} vs bf16"
    if "splitq_w4a16_ms" in r:
        s += f"\n      splitq, SPLITQ_DECODE_MODE=w4a16 {r['splitq_w4a16_ms'] * 1e3:.1f} us  x{r['splitq_w4a16_speedup']:5.2f} vs bf16"
    return s


# ---------------------------------------------------------------------------------------------


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="7b,3b")
    ap.add_argument("--layers", default="", help="comma list of layer names (default: all)")
    ap.add_argument("--rows", default=",".join(map(str, ROWS)))
    ap.add_argument("--scheme", default="w4a4")
    ap.add_argument("--precision", default="tf32x3",
                    help="precision of the float products: ieee, tf32x3, tf32 or bf16 (splitq is timed at bf16 too)")
    ap.add_argument("--no-check", action="store_true", help="skip the correctness checks")
    ap.add_argument("--cpu-check", action="store_true", help="correctness only, on the CPU through the interpreter")
    ap.add_argument("--json", default=None, help="write the results here (default: $OUT/bench_kernels.json if $OUT)")
    args = ap.parse_args()

    if args.cpu_check:
        import splitq_kernels.triton as skt

        skt.use_interpreter()
    from splitq_kernels.reference import SplitQScheme
    from splitq_kernels.triton.gemm import splitk_workspace

    scheme = SplitQScheme.from_name(args.scheme)
    device = torch.device("cpu" if args.cpu_check else "cuda")
    models = TINY if args.cpu_check else {m: MODELS[m] for m in args.models.split(",")}
    wanted = set(filter(None, args.layers.split(",")))
    t_start = time.time()
    info = {"date": time.strftime("%Y-%m-%d %H:%M:%S"), "scheme": args.scheme, "precision": args.precision,
            "torch": torch.__version__, "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"}
    import triton

    info["triton"] = triton.__version__
    log(f"SplitQ kernel benchmark: {json.dumps(info)}")
    if device.type == "cuda":
        splitk_workspace(device, max(d for m in models.values() for _, d in m.values()), 1024)

    all_ok = True
    if not args.no_check:
        log("correctness at real shapes (criteria: splitq_kernels.testing)")
        for model, layers in models.items():
            for name, (d_in, d_out) in layers.items():
                if wanted and name not in wanted:
                    continue
                rows = [5, 37] if args.cpu_check else [5, 64]
                all_ok &= check_layer(f"{model}.{name}" if args.cpu_check else name, d_in, d_out, scheme, device,
                                      rows, "ieee" if args.cpu_check else args.precision)
        log(f"correctness: {'all passed' if all_ok else 'FAILURES above'} ({time.time() - t_start:.0f}s)")
    results = {"info": info, "checks_passed": all_ok, "peaks": None, "rows": []}
    if args.cpu_check:  # exercise the timing code on the CPU (interpreter wall-clock times mean nothing)
        fake = {"bf16_tflops": 1.0, "int8_tops": 1.0, "copy_gbs": 1.0}
        for model, layers in models.items():
            for name, (d_in, d_out) in layers.items():
                results["rows"] += time_layer(name, d_in, d_out, scheme, device, [1, 37], "ieee", fake, wall_time_ms)
        log(f"timing code path exercised on the CPU ({len(results['rows'])} rows)")
    if device.type == "cuda":
        peaks = device_peaks(device)
        results["peaks"] = peaks
        log(f"measured peaks: bf16 {peaks['bf16_tflops']:.0f} TFLOP/s, int8 {peaks['int8_tops']:.0f} TOP/s, "
            f"copy {peaks['copy_gbs']:.0f} GB/s")
        rows_list = [int(r) for r in args.rows.split(",")]
        for model, layers in models.items():
            log(f"{model}: times per linear (CUDA graphs, cold weights)")
            for name, (d_in, d_out) in layers.items():
                if wanted and name not in wanted:
                    continue
                results["rows"] += [dict(r, model=model) for r in
                                    time_layer(name, d_in, d_out, scheme, device, rows_list, args.precision, peaks)]
                log(f"  ({time.time() - t_start:.0f}s elapsed)")
    out = args.json or (os.path.join(os.environ["OUT"], "bench_kernels.json") if os.environ.get("OUT") else None)
    if out:
        with open(out, "w") as f:
            json.dump(results, f, indent=1)
        log(f"wrote {out}")
    if FAILURES:
        log(f"{len(FAILURES)} timing runs failed:\n  " + "\n  ".join(FAILURES))
    return 0 if all_ok and not FAILURES else 1


if __name__ == "__main__":
    sys.exit(main())
