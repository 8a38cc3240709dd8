"""Check a SplitQ checkpoint's layers on the Triton kernels against the reference, at the
checkpoint's own shapes (issue 12: the Triton backend must match the reference at real widths).

    python benchmarks/check_checkpoint_kernels.py CKPT_DIR [--layers 2] [--rows 3] [--json out.json]
    python benchmarks/check_checkpoint_kernels.py CKPT_DIR --device cuda      # on a GPU, no interpreter

For every fused layer (q/k/v and gate/up fused as vLLM loads them; the first --layers decoder
layers, default all), read through the checkpoint reader (splitq_vllm.checkpoint), it asks
`splitq_kernels.support.can_implement`, prepares the kernel layout, runs both kernels on --rows
random activation rows (Gaussian with a few large channels; text and vision rows mixed, so the
MAC branch is exercised on some rows and not on others) and holds the result to the kernel tests'
definition of correct, `splitq_kernels.testing.check_linear`: quantized codes equal up to +-1
flips at proven float32 near-ties (counted; at most max(2, codes / 500)), the output equal to
the reference GEMM on the kernel's codes on every row, and to the full reference on every row
without a flip, within half an ulp of the output dtype plus float32 rescaling noise. Also
reported: max abs / relative difference to the reference `splitq_linear` (relative to the
largest |reference| value), the flips, the worst error/tolerance ratios, the time.

On the CPU the kernels run in Triton's interpreter: slow but fine at real widths with a few rows
(measured at Qwen2.5-VL-7B's shapes, W4A4, 3 rows, 2 cores: qkv 12 s, down 49 s, gate/up 88 s,
about 3 minutes per decoder layer, 2.3 GB peak RSS).
Exit status: 0 when every layer matches; 1 on a mismatch or a layer the kernels cannot run
(unless --skip-unsupported); 2 when the checkpoint cannot be read.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

# vLLM's fused order (QKVParallelLinear, MergedColumnParallelLinear): output rows in this order
MEMBER_ORDER = ["q_proj", "k_proj", "v_proj", "gate_proj", "up_proj"]
KIND_ORDER = ["qkv", "o", "gate_up", "down"]  # a decoder layer's groups in forward order
LAYER_INDEX = re.compile(r"(?:^|\.)layers\.(\d+)\.")


def fused_groups(ckpt, first_layers: int | None = None) -> list[tuple[str, list[str]]]:
    """(group name, member layer names in fused order) for the checkpoint's quantized layers,
    those of decoder layers < first_layers only when given."""
    groups: dict[str, list[str]] = {}
    for name, dims in ckpt.quant_config.layers.items():
        m = LAYER_INDEX.search(name)
        if first_layers is not None and (m is None or int(m.group(1)) >= first_layers):
            continue
        groups.setdefault(dims.group or name, []).append(name)

    def member_key(n: str) -> int:
        leaf = n.rsplit(".", 1)[-1]
        return MEMBER_ORDER.index(leaf) if leaf in MEMBER_ORDER else len(MEMBER_ORDER)

    def group_key(item: tuple[str, list[str]]) -> tuple[int, int, str]:
        m = LAYER_INDEX.search(item[0])
        kind = item[0].rsplit(".", 1)[-1]
        return (
            int(m.group(1)) if m else -1,
            KIND_ORDER.index(kind) if kind in KIND_ORDER else len(KIND_ORDER),
            item[0],
        )

    return sorted(((g, sorted(ns, key=member_key)) for g, ns in groups.items()), key=group_key)


def row_mask(rows: int):
    """Text (True) and vision (False) rows mixed: text, vision, text, text, vision, ..."""
    import torch

    return torch.arange(rows) % 3 != 1


def triton_kernels(x, mask, kl):
    """Kernel (a) (keeping the MAC residual codes for the comparison) then kernel (b)."""
    from splitq_kernels.triton.gemm import gemm_triton
    from splitq_kernels.triton.quantize_input import quantize_input_triton

    act = quantize_input_triton(x, mask, kl, store_mac=True)
    return act, gemm_triton(act, kl, x.dtype)


def check_group(
    ckpt, group: str, names: list[str], rows: int, dtype, device, seed: int, kernels: Callable = triton_kernels
) -> dict[str, Any]:
    """Kernels vs reference on one fused layer; never raises for a mismatch (reported in 'status').
    `kernels(x, mask, kernel_layer) -> (activations, y)`: the code under check."""
    from splitq_kernels.layout import prepare_kernel_layer
    from splitq_kernels.reference import concat_outputs, splitq_linear
    from splitq_kernels.support import can_implement
    from splitq_kernels.testing import MismatchError, check_linear
    from splitq_vllm.testing.layers import random_activations

    t0 = time.perf_counter()
    scheme = ckpt.scheme
    members = [ckpt.layer(n) for n in names]
    fused = concat_outputs(members) if len(members) > 1 else members[0]
    out: dict[str, Any] = {"group": group, "members": names, "in_features": fused.in_features,
                           "out_features": fused.out_features, "kron": list(fused.kron_shape),
                           "cws_rank": fused.cws_rank, "mac_rank": fused.mac_rank, "rows": rows}  # fmt: skip
    ok, why = can_implement(fused.kron_shape, scheme, device, interpreter=device.type == "cpu")
    if not ok:
        out.update(status="unsupported", error=why, seconds=time.perf_counter() - t0)
        return out
    layer = fused.to(device)
    kl = prepare_kernel_layer(layer, scheme, device)
    x = random_activations(
        rows, fused.in_features, seed, outlier_channels=max(1, fused.in_features // 100), dtype=dtype
    )
    x, mask = x.to(device), row_mask(rows).to(device)
    act, y = kernels(x, mask, kl)
    reference = splitq_linear(x.float(), mask, layer, scheme)  # float32: before the output's rounding
    err = (y.double() - reference.double()).abs()
    out.update(max_abs_diff=float(err.max()), max_rel_diff=float(err.max() / reference.abs().max().clamp(min=1e-30)))
    try:
        report, r_own, r_full = check_linear(y, act, x, mask, layer, scheme, kl)
        out.update(codes_compared=report.codes_compared, flips=report.explained_flips,
                   flip_rows=sorted(report.rows_with_flips()), tolerance_ratio_own_codes=r_own,
                   tolerance_ratio_reference=r_full)  # fmt: skip
        limit = max(2, report.codes_compared // 500)  # tests/kernels/triton/test_kernels.py's bound
        if report.explained_flips > limit:
            out.update(status="mismatch", error=f"{report.explained_flips} explained code flips > {limit} allowed")
        else:
            out["status"] = "ok"
    except MismatchError as e:
        out.update(status="mismatch", error=str(e))
    out["seconds"] = time.perf_counter() - t0
    return out


def _table(results: list[dict[str, Any]]) -> str:
    lines = ["| layer | in -> out | kron | status | max abs | max rel | tol. ratio (own / ref) | flips | s |",
             "|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in results:
        ratio = (f"{r['tolerance_ratio_own_codes']:.2f} / {r['tolerance_ratio_reference']:.2f}"
                 if "tolerance_ratio_reference" in r else "-")  # fmt: skip
        abs_, rel = (f"{r['max_abs_diff']:.3g}", f"{r['max_rel_diff']:.3g}") if "max_abs_diff" in r else ("-", "-")
        lines.append(f"| {r['group']} | {r['in_features']} -> {r['out_features']} | {r['kron'][0]}x{r['kron'][1]} | "
                     f"{r['status']} | {abs_} | {rel} | {ratio} | {r.get('flips', '-')} | {r['seconds']:.1f} |")  # fmt: skip
    for r in results:
        if r.get("error"):
            lines.append(f"{r['group']}: {r['status']}: {r['error']}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("checkpoint", type=Path, help="SplitQ checkpoint directory")
    p.add_argument("--layers", type=int, help="only the first N decoder layers (default: all)")
    p.add_argument("--rows", type=int, default=3, help="activation rows per layer (default 3)")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"], help="activation dtype")
    p.add_argument("--device", default=None, help="cpu (Triton's interpreter) or cuda (default: cuda if available)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--skip-unsupported", action="store_true", help="layers the kernels cannot run do not fail the check"
    )
    p.add_argument("--json", type=Path, help="write the per-layer results here")
    args = p.parse_args(argv)
    if args.rows < 1:
        p.error("--rows must be >= 1")

    import torch

    from splitq_vllm.checkpoint import CheckpointError, read_checkpoint

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cpu":
        import splitq_kernels.triton

        splitq_kernels.triton.use_interpreter()
    try:
        ckpt = read_checkpoint(args.checkpoint, validate=False)
        ckpt.validate(check_values=False)  # headers only: cheap at any size; values are read per layer
    except (CheckpointError, OSError, ValueError) as e:
        print(f"cannot read {args.checkpoint}: {e}", file=sys.stderr)
        return 2
    groups = fused_groups(ckpt, args.layers)
    if not groups:
        print(f"{args.checkpoint}: no quantized layers" + (f" in the first {args.layers} layers" if args.layers else ""),
              file=sys.stderr)  # fmt: skip
        return 1
    dtype = getattr(torch, args.dtype)
    print(f"{args.checkpoint}: {len(groups)} fused layers, scheme {ckpt.scheme}, {args.rows} rows ({args.dtype}) "
          f"on {device}{' (Triton interpreter)' if device.type == 'cpu' else ''}", file=sys.stderr)  # fmt: skip
    results = []
    for i, (group, names) in enumerate(groups):
        r = check_group(ckpt, group, names, args.rows, dtype, device, args.seed + i)
        print(f"  {group}: {r['status']} ({r['seconds']:.1f} s)", file=sys.stderr)
        results.append(r)
    print(_table(results))
    bad = [
        r for r in results if r["status"] == "mismatch" or (r["status"] == "unsupported" and not args.skip_unsupported)
    ]
    summary = {"checkpoint": str(args.checkpoint), "device": str(device), "dtype": args.dtype, "rows": args.rows,
               "scheme": str(ckpt.scheme), "layers": results, "passed": not bad}  # fmt: skip
    if args.json:
        args.json.write_text(json.dumps(summary, indent=2) + "\n")
    print("kernels match the reference on every layer" if not bad else
          f"{len(bad)} of {len(results)} layers failed: {', '.join(r['group'] for r in bad)}")  # fmt: skip
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
