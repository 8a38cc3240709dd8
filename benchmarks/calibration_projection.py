"""Projected cost of a real calibration run (issue 12): memory from the calibration's own memory
model, time from operation counts, for the published widths on the GPUs users have.

    python benchmarks/calibration_projection.py [--samples 128] [--tokens 2048] [--epochs 15] \
        [--pairs qwen2.5-vl-7b:rtx4090 ...] [--markdown FILE] [--json FILE]

Memory: `splitq_calibration.memory.estimate` (the model docs/calibration.md states, whose
constants come from the CPU measurements in BENCHMARKS.md) with the run on the GPU: host RAM =
the process base + the activations (two sets of N x T x H bf16 unless spilled); GPU memory = one
decoder layer's statistics and training phases.

Time per decoder layer and epoch, counted, not measured:
- per sample: the fake-quant layer's forward and backward, 6 T P_lin multiply-adds x 2 (FLOPs),
  plus attention (12 T^2 H: scores and values, forward and backward);
- per optimizer step (N / batch steps): the weight side, evaluated without a graph, recomputed
  and backpropagated by row blocks: 4 passes of the Kronecker fold, 2 P_lin (n1 + n2) FLOPs each,
  and ~30 elementwise passes over the float32 weights (fake quantization and its backward),
  memory-bound.
At an assumed fraction of each GPU's float32 peak (the layer trains in float32; TF32 tensor cores
would be faster, not assumed). These are predictions, to be put beside the GPU's measurement
(benchmarks/calibrate_layer.py --device cuda) when one is made.
"""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import dataclass
from pathlib import Path

from splitq_calibration.dims import kron_factors
from splitq_calibration.memory import GB, estimate, model_sizes
from splitq_vllm.testing.published import PUBLISHED, meta_model


@dataclass(frozen=True)
class Gpu:
    name: str
    memory_gb: float
    fp32_tflops: float  # dense float32 on CUDA cores
    bandwidth_tbs: float


GPUS = {
    "rtx4090": Gpu("RTX 4090 (24 GB)", 24, 82.6, 1.01),
    "a100-80g": Gpu("A100 80 GB", 80, 19.5, 2.0),
    "h100-80g": Gpu("H100 SXM 80 GB", 80, 67.0, 3.35),
}
EFFICIENCY = 0.4  # fraction of the float32 peak the per-sample GEMMs reach (few-thousand-row GEMMs)
ELEMENTWISE_PASSES = 30


def layer_work(name: str, samples: int, tokens: int, batch: int) -> dict[str, float]:
    """FLOPs and bytes of one decoder layer's epoch (see the module doc)."""
    spec = PUBLISHED[name]
    model = meta_model(name, layers=1)
    sizes = model_sizes(model)
    h = sizes.hidden
    per_sample = 12 * tokens * sizes.linear_params + 12 * tokens**2 * h
    n1, n2 = kron_factors(h - 2 * round(0.02 * h))
    steps = math.ceil(samples / batch)
    weight_flops = 4 * 2 * sizes.linear_params * (n1 + n2)
    weight_bytes = ELEMENTWISE_PASSES * 4 * sizes.linear_params
    return {
        "spec": spec.name,
        "sample_flops": per_sample * samples,
        "step_flops": weight_flops * steps,
        "step_bytes": weight_bytes * steps,
        "stats_flops": 2 * tokens * sizes.linear_params * samples,
        "layers": spec.text.layers,
        "sizes": sizes,
    }


def project(name: str, gpu: Gpu, samples: int, tokens: int, epochs: int, batch: int) -> dict:
    w = layer_work(name, samples, tokens, batch)
    rate = gpu.fp32_tflops * 1e12 * EFFICIENCY
    epoch_s = (w["sample_flops"] + w["step_flops"]) / rate + w["step_bytes"] / (gpu.bandwidth_tbs * 1e12)
    layer_s = epochs * epoch_s + w["stats_flops"] / rate
    est = estimate(w["sizes"], [tokens] * samples, [tokens // 2] * samples, None, 2, "cuda")
    host = 1.0 * GB + 2 * est.activations
    return {
        "model": name,
        "gpu": gpu.name,
        "epoch_s": epoch_s,
        "layer_s": layer_s,
        "total_h": layer_s * w["layers"] / 3600,
        "gpu_gb": est.device_peak / GB,
        "fits": est.device_peak / GB <= gpu.memory_gb,
        "host_gb": host / GB,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--samples", type=int, default=128)
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--epochs", type=int, default=15)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--pairs", nargs="+", default=["qwen2.5-vl-7b:rtx4090", "qwen2.5-vl-7b:h100-80g",
                                                    "qwen2.5-vl-72b:h100-80g", "qwen2.5-vl-72b:rtx4090"])  # fmt: skip
    ap.add_argument("--markdown", type=Path)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    rows = []
    for pair in args.pairs:
        name, gpu = pair.split(":")
        rows.append(project(name, GPUS[gpu], args.samples, args.tokens, args.epochs, args.batch))
    head = (f"| model | GPU | per layer-epoch | per layer ({args.epochs} epochs) | whole model | GPU memory | host RAM "
            "(activations in memory) |\n|---|---|---|---|---|---|---|\n")  # fmt: skip
    table = head + "".join(
        f"| {r['model']} | {r['gpu']} | {r['epoch_s']:.0f} s | {r['layer_s'] / 60:.1f} min | {r['total_h']:.1f} h | "
        f"{r['gpu_gb']:.1f} GB{'' if r['fits'] else ' (does not fit)'} | {r['host_gb']:.1f} GB |\n"
        for r in rows
    )
    print(f"{args.samples} samples x {args.tokens} tokens, {args.epochs} epochs, batch {args.batch}; "
          f"{EFFICIENCY:.0%} of the float32 peak\n")  # fmt: skip
    print(table)
    if args.markdown:
        args.markdown.write_text(table)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1, default=str) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
