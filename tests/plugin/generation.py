"""Shared pieces of the vLLM plugin tests: conversations, server arguments, the served and the
reference greedy generations, and their comparison.

Dtype: both sides run in float32. The SplitQ layers compute the same integer products in either
dtype, but everything around them (RMSNorm, rotary, attention, the vision tower, lm_head) is
vLLM's CPU kernels on one side and transformers' eager torch on the other. In bfloat16 those
differ by ~1e-2 relative; in float32 by ~1e-7.

Why the log-probability tolerance is not 1e-6: a 4-bit per-token activation quantizer is a step
function. A perturbation of the layer input moves nothing until an activation crosses a rounding
boundary, then one code changes by one step. Measured on the tiny W4A4 checkpoint with the
reference alone: multiplying the input embeddings by (1 + 1e-7 * noise) leaves the log-probs of
the four conversations below unchanged in 27 of 32 runs (4 prompts x 8 seeds) and moves them by
3.5e-3 in the other 5 (tokens unchanged); at 1e-6 noise about half the runs move by 0.05-0.09 and
some greedy tokens change. Served vs reference in
float32 measured 2e-7..5e-7 on most prompts and 3.5e-3 on one (such a flip). A wrong mask moves
the same log-probs by 4e-2..1e-1. Hence LOGPROB_ATOL = 1e-2: above a single flip, well below a
wrong mask. The plugin's own arithmetic is held to the reference bit for bit on identical inputs
(test_plugin_linear_method.py).
"""

from __future__ import annotations

import io
import json
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image

MAX_TOKENS = 12
# Tolerance on per-token log-probabilities, served vs reference (both float32): see the module doc.
LOGPROB_ATOL = 1e-2

def server_args(
    *extra: str, eager: bool = True, quantization_flag: bool = True, max_num_batched_tokens: int = 64
) -> list[str]:
    """Arguments of the test servers. max-num-batched-tokens 64 is below the longer prompts, so
    they are prefilled in chunks (an image's placeholder rows split across steps); KV blocks of 32
    tokens (the CPU default, 128, is longer than the prompts) let repeated prompts hit the prefix
    cache, image rows included."""
    args = [
        "--dtype", "float32",
        "--max-model-len", "1024",
        "--max-num-seqs", "8",
        "--max-num-batched-tokens", str(max_num_batched_tokens),
        "--block-size", "32",
        "--limit-mm-per-prompt", json.dumps({"image": 2}),
        "--seed", "0",
    ]  # fmt: skip
    if quantization_flag:  # optional: vLLM reads quant_method "splitq" from config.json
        args += ["--quantization", "splitq"]
    if eager:
        args.append("--enforce-eager")
    return [*args, *extra]


@dataclass
class Generation:
    prompt_ids: list[int]
    token_ids: list[int]
    logprobs: list[float]
    text: str = ""


def served_chat(server, messages: list[dict], max_tokens: int = MAX_TOKENS) -> Generation:
    """Greedy chat completion through the openai client; EOS ignored so every run decodes max_tokens."""
    r = server.client().chat.completions.create(
        model=server.model,
        messages=messages,
        max_tokens=max_tokens,
        temperature=0.0,
        logprobs=True,
        extra_body={"ignore_eos": True, "return_token_ids": True},
    )
    c = r.choices[0]
    return Generation(
        prompt_ids=list(r.prompt_token_ids),
        token_ids=list(c.token_ids),
        logprobs=[t.logprob for t in c.logprobs.content],
        text=c.message.content or "",
    )


def _hf_messages(messages: list[dict]) -> list[dict]:
    """OpenAI content parts -> the processor's ({"type": "image"} in place of image_url)."""
    out = []
    for m in messages:
        content = m["content"]
        if not isinstance(content, str):
            content = [{"type": "image"} if p["type"] == "image_url" else p for p in content]
        out.append({"role": m["role"], "content": content})
    return out


class Reference:
    """The same checkpoint through the reference math outside vLLM: transformers + SplitQ modules."""

    def __init__(self, ckpt: str | Path) -> None:
        from transformers import AutoProcessor

        from splitq_vllm.hf.model import SplitQLinearModule, load_quantized_model

        self.processor = AutoProcessor.from_pretrained(ckpt)
        self.model = load_quantized_model(ckpt, dtype=torch.float32)
        self.text_mask = next(m for m in self.model.modules() if isinstance(m, SplitQLinearModule)).text_mask
        self.generation_config = self.model.generation_config
        self.generation_config.eos_token_id = None  # like ignore_eos: always max_new_tokens
        self.generation_config.do_sample = False
        self.generation_config.output_logits = True  # raw logits, like vLLM's default logprobs
        self.generation_config.return_dict_in_generate = True

    def generate(self, messages: list[dict], pngs: list[bytes], max_tokens: int = MAX_TOKENS, mask: str = "tokens") -> Generation:
        """Greedy generation; mask = "tokens" (the method), "text" or "vision" (every row)."""
        text = self.processor.apply_chat_template(_hf_messages(messages), add_generation_prompt=True)
        images = [Image.open(io.BytesIO(p)).convert("RGB") for p in pngs] or None
        inputs = self.processor(text=[text], images=images, return_tensors="pt")
        update = type(self.text_mask).update.__get__(self.text_mask)

        def forced(input_ids):
            update(input_ids)
            if mask != "tokens" and self.text_mask.mask is not None:
                self.text_mask.mask = torch.full_like(self.text_mask.mask, mask == "text")

        self.text_mask.update = forced
        try:
            self.generation_config.max_new_tokens = max_tokens
            with torch.no_grad():
                out = self.model.generate(**inputs, generation_config=self.generation_config)
        finally:
            self.text_mask.update = update
        n = inputs["input_ids"].shape[1]
        tokens = out.sequences[0, n:].tolist()
        logprobs = [float(torch.log_softmax(lg[0].double(), -1)[t]) for lg, t in zip(out.logits, tokens)]
        return Generation(inputs["input_ids"][0].tolist(), tokens, logprobs)


def max_logprob_gap(a: Generation, b: Generation) -> float:
    n = min(len(a.logprobs), len(b.logprobs))
    return max(abs(x - y) for x, y in zip(a.logprobs[:n], b.logprobs[:n]))


def assert_same_generation(served: Generation, ref: Generation, what: str, atol: float = LOGPROB_ATOL) -> None:
    assert served.prompt_ids == ref.prompt_ids, f"{what}: prompts differ ({len(served.prompt_ids)} vs {len(ref.prompt_ids)} tokens)"
    assert served.token_ids == ref.token_ids, f"{what}: tokens differ\nserved    {served.token_ids}\nreference {ref.token_ids}"
    gap = max_logprob_gap(served, ref)
    assert gap <= atol, f"{what}: log-probabilities differ by up to {gap:.2e} (> {atol})"


def prefix_cache_hits(server) -> float:
    """vllm:prefix_cache_hits (tokens) from the server's /metrics."""
    with urllib.request.urlopen(server.url + "/metrics", timeout=10) as r:
        text = r.read().decode()
    total = 0.0
    for line in text.splitlines():
        name = line.split("{", 1)[0].split(" ", 1)[0]
        if name in ("vllm:prefix_cache_hits", "vllm:prefix_cache_hits_total"):
            total += float(line.rsplit(" ", 1)[1])
    return total
