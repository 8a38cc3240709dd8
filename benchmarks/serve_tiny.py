"""Serve the tiny Qwen2.5-VL (or LLaVA) through the real OpenAI server, unquantized and SplitQ (synthetic
W4A4 checkpoint, reference backend), and report start-up time and generation throughput.

    .venv/bin/python benchmarks/serve_tiny.py [--model qwen|llava]
        [--compile] [--requests 16] [--max-tokens 64]

Random weights: the numbers say what the serving path costs (plugin start-up, the reference math
per step), not how fast real SplitQ kernels are. The reference runs the SplitQ layers in float32
with float64 integer products on the CPU; the Triton kernels replace it on GPUs.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path


def run(model_dir: Path, args, quantized: bool, cache: Path) -> dict:
    from splitq_vllm.server import OpenAIServer
    from splitq_vllm.testing.conversations import CONVERSATIONS

    server_args = [
        "--dtype", "float32", "--max-model-len", "1024", "--max-num-seqs", str(args.requests),
        "--limit-mm-per-prompt", json.dumps({"image": 2}), "--seed", "0",
    ]  # fmt: skip
    if quantized:
        server_args += ["--quantization", "splitq"]
    if not args.compile:
        server_args.append("--enforce-eager")
    names = [n for n in CONVERSATIONS]
    with OpenAIServer(model_dir, server_args, env={"VLLM_CACHE_ROOT": str(cache)}) as server:
        client = server.client()

        def one(i: int) -> int:
            r = client.chat.completions.create(
                model=server.model,
                messages=CONVERSATIONS[names[i % len(names)]][0],
                max_tokens=args.max_tokens,
                temperature=0.0,
                extra_body={"ignore_eos": True},
            )
            return r.usage.completion_tokens

        one(0)  # warm-up (first-request processor set-up)
        t0 = time.monotonic()
        with ThreadPoolExecutor(args.requests) as pool:
            tokens = sum(pool.map(one, range(args.requests)))
        elapsed = time.monotonic() - t0
        t1 = time.monotonic()
        single = one(2)  # text-only, alone: decode latency
        single_elapsed = time.monotonic() - t1
    return {
        "startup_s": round(server.startup_seconds, 1),
        "batch_tokens_per_s": round(tokens / elapsed, 1),
        "single_request_tokens_per_s": round(single / single_elapsed, 1),
        "requests": args.requests,
        "max_tokens": args.max_tokens,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", choices=["qwen", "llava"], default="qwen")
    ap.add_argument("--compile", action="store_true", help="torch.compile (default: --enforce-eager)")
    ap.add_argument("--requests", type=int, default=16)
    ap.add_argument("--max-tokens", type=int, default=64)
    args = ap.parse_args()

    from splitq_kernels.reference import SplitQScheme
    from splitq_vllm.testing.models import build_tiny_llava, build_tiny_qwen25vl
    from splitq_vllm.testing.synthetic import synthesize_checkpoint

    with tempfile.TemporaryDirectory() as tmp:
        build = build_tiny_qwen25vl if args.model == "qwen" else build_tiny_llava
        src = build(Path(tmp) / "model")
        ckpt = synthesize_checkpoint(src, Path(tmp) / "splitq", SplitQScheme.from_name("w4a4"))
        results = {
            "unquantized": run(src, args, False, Path(tmp) / "cache16"),
            "splitq-w4a4-reference": run(ckpt, args, True, Path(tmp) / "cacheq"),
        }
    print(json.dumps({"model": f"tiny-{args.model}", "compile": args.compile, **results}, indent=2))


if __name__ == "__main__":
    main()
