#!/usr/bin/env python
"""How far float noise moves a SplitQ checkpoint's greedy log-probabilities, beside what real
errors do: the measurement behind the tolerances of tests/plugin/generation.py.

    python benchmarks/reference_noise.py --checkpoint synthetic --work /tmp/noise-synthetic
    python benchmarks/reference_noise.py --checkpoint Qwen3-VL --work /tmp/noise-qwen3vl
    python benchmarks/reference_noise.py --checkpoint Qwen3.5 --work /tmp/noise-qwen35   # bfloat16

The checkpoint is one the plugin tests serve: "synthetic" (test_qwen.py's W4A4 checkpoint of the
tiny Qwen2.5-VL) or a family's tiny model calibrated as tests/plugin/family_server.py does. The
reference (transformers + SplitQ modules) generates greedily on each test conversation; then,
teacher forced on those tokens, it runs again (a) with its input embeddings times
(1 + eps * N(0, 1)), 4 seeds per eps, standing in for another machine's float kernels; (b) with
every row marked text, and every row vision (a wrong mask); (c) as the unquantized model the
checkpoint came from. Printed per run: the largest log-probability gap over the steps, the first
token's gap, and the largest greedy deficit (how far the followed token is below the run's own
greedy choice). CPU only, one thread, about a minute per checkpoint (Qwen3.5: a few).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests.plugin: the reference and its calibration

from splitq_kernels.reference import SplitQScheme  # noqa: E402
from splitq_vllm.testing.conversations import CONVERSATIONS  # noqa: E402
from splitq_vllm.testing.models import TINY_BUILDERS, build_tiny_qwen25vl  # noqa: E402
from splitq_vllm.testing.synthetic import synthesize_checkpoint  # noqa: E402
from tests.plugin.family_server import calibrated_checkpoint  # noqa: E402
from tests.plugin.generation import Generation, Reference, greedy_deficits, max_logprob_gap  # noqa: E402

PROMPTS = ("one_image", "two_images", "text_only")
SEEDS = 4


def build(which: str, work: Path) -> tuple[Path, Path]:
    """(checkpoint, the model it came from), built once under work."""
    model, ckpt = work / "model", work / "checkpoint"
    if not ckpt.exists():
        if which == "synthetic":
            synthesize_checkpoint(build_tiny_qwen25vl(model), ckpt, SplitQScheme.from_name("w4a4"))
        else:
            calibrated_checkpoint(TINY_BUILDERS[which](model), work).rename(ckpt)
    return ckpt, model


def gaps(run: Generation, base: Generation) -> tuple[float, float, float]:
    """(largest gap, first token's gap, largest greedy deficit) of a teacher-forced run."""
    return max_logprob_gap(run, base), abs(run.logprobs[0] - base.logprobs[0]), max(greedy_deficits(run))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", required=True, choices=["synthetic", *TINY_BUILDERS])
    ap.add_argument("--work", type=Path, required=True)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    args.work.mkdir(parents=True, exist_ok=True)
    ckpt, model = build(args.checkpoint, args.work)
    bf16 = args.checkpoint == "Qwen3.5"  # vLLM's CPU Gated DeltaNet runs in bfloat16 only (test_qwen35.py)
    dtype = torch.bfloat16 if bf16 else torch.float32
    epsilons = (2**-9, 2**-8) if bf16 else (1e-7, 1e-6, 1e-5)
    ref = Reference(ckpt)
    ref.model.to(dtype)
    from transformers import AutoModelForImageTextToText

    plain = AutoModelForImageTextToText.from_pretrained(model, dtype=dtype)
    print(f"{args.checkpoint} ({dtype}): max gap / first token / greedy deficit, teacher forced on the greedy tokens")
    for name in PROMPTS:
        msgs, pngs = CONVERSATIONS[name]
        base = ref.generate(msgs, pngs)
        for eps in epsilons:
            runs = [gaps(ref.generate(msgs, pngs, follow=base.token_ids, noise=eps, seed=s), base) for s in range(SEEDS)]
            cells = "  ".join(f"{g:.1e}/{f:.1e}/{t:.1e}" for g, f, t in runs)
            print(f"  {name:10s} noise {eps:.0e}: {cells}")
        for mode in ("text", "vision"):
            g, f, t = gaps(ref.generate(msgs, pngs, follow=base.token_ids, mask=mode), base)
            print(f"  {name:10s} every row {mode}: {g:.1e}/{f:.1e}/{t:.1e}")
        quantized, ref.model = ref.model, plain
        try:
            g, f, t = gaps(ref.generate(msgs, pngs, follow=base.token_ids), base)
        finally:
            ref.model = quantized
        print(f"  {name:10s} unquantized: {g:.1e}/{f:.1e}/{t:.1e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
