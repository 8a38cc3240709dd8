"""Shared pieces of the vLLM plugin tests: conversations, server arguments, the served and the
reference greedy generations, and their comparison.

Dtype: both sides run in float32. The SplitQ layers compute the same integer products in either
dtype, but everything around them (RMSNorm, rotary, attention, the vision tower, lm_head) is
vLLM's CPU kernels on one side and transformers' eager torch on the other. In bfloat16 those
differ by ~1e-2 relative; in float32 by ~1e-7.

Why served and reference cannot be held to 1e-6 everywhere: a 4-bit per-token activation
quantizer is a step function. A perturbation of the layer input moves nothing until an activation
crosses a rounding boundary; then one code changes by a whole step, every later layer sees inputs
moved by far more than the first perturbation, and more codes flip: the log-probabilities jump by
about what the activation quantization itself costs. Measured with the reference alone, teacher
forced on its own greedy tokens, input embeddings times (1 + eps * noise), 4 seeds, 3 prompts
(BENCHMARKS.md, "Served vs reference across machines"; two checkpoints): eps = 1e-7 leaves the
log-probs within 2.4e-7 in 22 of 24 runs (two move by 3.5e-3); eps = 1e-6 moves 15 of 24 by
2e-5..5.7e-2; eps = 1e-5 moves every run, by 1.9e-2..9.2e-2. A wrong mask (every row text, or
vision) moves them by 4.8e-2..1.3e-1, and dropping the quantization altogether by 1.3e-1..2.1e-1:
on these near-uniform random models a code-flip cascade is not smaller than a real error.

So the comparison is tiered by what the two sides' float kernels can do:
- The first generated token (the prefill's last row) to LOGPROB_ATOL = 1e-2. Served vs reference
  measured 2e-7..5e-7 here (AVX-512), and the first token agreed to 1e-4 in every prompt of a CI
  run on another CPU whose float32 decode steps drifted (below); a wrong mask moves it by more than 1e-2
  in 7 of 8 (image prompt, mask) cases.
- Every decode step teacher forced: the reference follows the served tokens, so that a near tie
  (two tokens within 3e-4, seen in CI) does not make every later step incomparable; the served
  token must be the reference's greedy choice up to DECODE_ATOL and its log-probability the
  reference's within DECODE_ATOL = 0.15, above the 1e-5 cascade (0.092) and CI's decode drift
  (0.047 on a float32 prompt whose first token matched to 1e-4; greedy deficits under noise up to
  0.062). This tier catches a model that is not the checkpoint, not a subtle error: the
  unquantized model exceeds it on 5 of 6 prompts (gaps up to 0.21, greedy deficits up to 0.29),
  and with the first-token tier fails on all 6.
The plugin's own arithmetic is held to the reference bit for bit on identical inputs
(test_linear_method.py), and the mask e2e on the synthetic checkpoint (test_qwen.py).
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
# Tolerances on per-token log-probabilities (float32; the module doc says why): LOGPROB_ATOL for
# the first served token against the reference and for served vs served, DECODE_ATOL for each
# decode step against the reference following the served tokens.
LOGPROB_ATOL = 1e-2
DECODE_ATOL = 0.15


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
    # the reference's own greedy choice's log-probability at each step (Reference.generate only)
    top_logprobs: list[float] | None = None


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

    def generate(
        self,
        messages: list[dict],
        pngs: list[bytes],
        max_tokens: int = MAX_TOKENS,
        mask: str = "tokens",
        follow: list[int] | None = None,
        noise: float = 0.0,
        seed: int = 0,
    ) -> Generation:
        """Greedy generation; mask = "tokens" (the method), "text" or "vision" (every row).
        follow: take these tokens instead of the greedy ones (teacher forcing; the log-probabilities
        are then those of the followed tokens, top_logprobs those of the greedy choices).
        noise: multiply the input embeddings by (1 + noise * N(0, 1)) (seeded), a stand-in for
        another machine's float kernels."""
        from transformers import LogitsProcessor, LogitsProcessorList

        text = self.processor.apply_chat_template(_hf_messages(messages), add_generation_prompt=True)
        images = [Image.open(io.BytesIO(p)).convert("RGB") for p in pngs] or None
        inputs = self.processor(text=[text], images=images, return_tensors="pt")
        n = inputs["input_ids"].shape[1]
        update = type(self.text_mask).update.__get__(self.text_mask)

        def forced(input_ids):
            update(input_ids)
            if mask != "tokens" and self.text_mask.mask is not None:
                self.text_mask.mask = torch.full_like(self.text_mask.mask, mask == "text")

        class Follow(LogitsProcessor):  # output_logits keeps the raw logits, from before this
            def __call__(self, input_ids, scores):
                out = torch.full_like(scores, float("-inf"))
                out[:, follow[input_ids.shape[1] - n]] = 0.0
                return out

        hook = None
        if noise:
            gen = torch.Generator().manual_seed(seed)
            hook = self.model.get_input_embeddings().register_forward_hook(
                lambda _m, _i, out: out * (1 + noise * torch.randn(out.shape, generator=gen, dtype=torch.float64)).to(out.dtype))
        self.text_mask.update = forced
        try:
            self.generation_config.max_new_tokens = len(follow) if follow is not None else max_tokens
            processors = LogitsProcessorList([Follow()] if follow is not None else [])
            with torch.no_grad():
                out = self.model.generate(**inputs, generation_config=self.generation_config, logits_processor=processors)
        finally:
            self.text_mask.update = update
            if hook is not None:
                hook.remove()
        tokens = out.sequences[0, n:].tolist()
        steps = [torch.log_softmax(lg[0].double(), -1) for lg in out.logits]
        logprobs = [float(lp[t]) for lp, t in zip(steps, tokens)]
        return Generation(inputs["input_ids"][0].tolist(), tokens, logprobs, top_logprobs=[float(lp.max()) for lp in steps])


def max_logprob_gap(a: Generation, b: Generation) -> float:
    n = min(len(a.logprobs), len(b.logprobs))
    return max(abs(x - y) for x, y in zip(a.logprobs[:n], b.logprobs[:n]))


def greedy_deficits(g: Generation) -> list[float]:
    """How far each token of a Reference.generate run is below that step's greedy choice."""
    return [top - lp for top, lp in zip(g.top_logprobs, g.logprobs, strict=True)]


def assert_same_generation(served: Generation, ref: Generation, what: str, atol: float = LOGPROB_ATOL) -> None:
    """Two generations of one engine kind (served vs served): the same tokens, log-probs within atol."""
    assert served.prompt_ids == ref.prompt_ids, f"{what}: prompts differ ({len(served.prompt_ids)} vs {len(ref.prompt_ids)} tokens)"
    assert served.token_ids == ref.token_ids, f"{what}: tokens differ\nserved    {served.token_ids}\nreference {ref.token_ids}"
    gap = max_logprob_gap(served, ref)
    assert gap <= atol, f"{what}: log-probabilities differ by up to {gap:.2e} (> {atol})"


def assert_matches_reference(
    served: Generation,
    reference: Reference,
    messages: list[dict],
    pngs: list[bytes],
    what: str,
    first_atol: float = LOGPROB_ATOL,
    atol: float = DECODE_ATOL,
) -> Generation:
    """The served greedy answer is the reference's, tiered as the module doc says: the first
    token's log-probability within first_atol; then, with the reference following the served
    tokens, each served token the reference's greedy choice up to atol and its log-probability
    the reference's within atol. Returns the reference's teacher-forced generation."""
    ref = reference.generate(messages, pngs, follow=served.token_ids)
    assert served.prompt_ids == ref.prompt_ids, f"{what}: the served prompt is not the reference's"
    gaps = [abs(a - b) for a, b in zip(served.logprobs, ref.logprobs, strict=True)]
    deficits = greedy_deficits(ref)
    print(f"\n{what}: served vs reference: first token {gaps[0]:.1e}, decode up to {max(gaps[1:], default=0):.1e}; "
          f"greedy deficit up to {max(deficits):.1e} ({sum(d > 0 for d in deficits)} of {len(deficits)} served tokens not the reference's own greedy choice)")
    assert gaps[0] <= first_atol and deficits[0] <= first_atol, (
        f"{what}: first token {served.token_ids[0]}: log-probability {served.logprobs[0]:.4f} served vs {ref.logprobs[0]:.4f}, "
        f"reference's greedy {ref.top_logprobs[0]:.4f} (tolerance {first_atol})")
    for i, (gap, deficit) in enumerate(zip(gaps, deficits)):
        assert gap <= atol and deficit <= atol, (
            f"{what}: step {i}, token {served.token_ids[i]}: log-probability {served.logprobs[i]:.4f} served vs "
            f"{ref.logprobs[i]:.4f}, reference's greedy {ref.top_logprobs[i]:.4f} (tolerance {atol})")
    return ref


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
