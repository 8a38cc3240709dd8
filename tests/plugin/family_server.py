"""The serving test of one model family, shared by tests/plugin/test_<family>.py: the tiny model
calibrated with `splitq-calibrate`, served by vLLM's OpenAI server (one start per module, eager),
chats with images through the openai client, and greedy answers equal to the transformers
loader's on the same checkpoint (tests/plugin/generation.assert_matches_reference).

A test module sets FAMILY and imports the fixtures and tests below by name."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from splitq_calibration.cli import calibrate_main
from splitq_vllm.checkpoint import read_checkpoint
from splitq_vllm.testing.conversations import CONVERSATIONS
from splitq_vllm.testing.images import write_sharegpt
from tests.helpers.engine import OpenAIServer, server_env
from tests.plugin.generation import Reference, assert_matches_reference, served_chat, server_args

PROMPTS = ["one_image", "two_images", "text_only"]
# bf16 on both sides with different kernels (8 bits of mantissa): served vs reference on the tiny
# Qwen3.5 measured 0.03-0.05 on the first token here and 0-3e-3 in CI; the reference's input
# embeddings times (1 + 2^-8 noise) move its log-probs by up to 0.073 on the first token and 0.11
# on any step, with greedy deficits up to 0.12 (BENCHMARKS.md, "Served vs reference across
# machines"). At these tolerances the unquantized model passes too (all 3 prompts): in bf16 this
# checks the family's wiring end to end, not the quantization; that the SplitQ layers are the ones
# served is test_server_loaded_every_quantized_linear, their arithmetic test_linear_method.py.
BF16_FIRST_ATOL = 0.1
BF16_ATOL = 0.2


def calibrated_checkpoint(src: Path, tmp: Path) -> Path:
    """W4A4, 2 samples, 1 epoch: what `splitq-calibrate` writes for this family."""
    data = write_sharegpt(tmp / "data", n=2)
    out = tmp / "w4a4"
    flags = ["--num-samples", "2", "--batch-size", "2", "--epochs", "1", "--scheme", "w4a4", "-q"]
    assert calibrate_main(["--model", str(src), "--data", str(data), "--output", str(out), *flags]) == 0
    assert read_checkpoint(out).quant_config.layers
    return out


@pytest.fixture(scope="module")
def ckpt(family, tiny_model, tmp_path_factory):
    return calibrated_checkpoint(tiny_model(family), tmp_path_factory.mktemp("splitq"))


@pytest.fixture(scope="module")
def serve_dtype():
    """float32 on both sides (tests/plugin/generation.py says why); Qwen3.5 overrides it."""
    return "float32"


@pytest.fixture(scope="module")
def server(ckpt, serve_dtype, tmp_path_factory):
    args = server_args("--dtype", serve_dtype)  # the last --dtype wins
    with OpenAIServer(ckpt, args, env=server_env(tmp_path_factory.mktemp("vllm-cache"))) as s:
        print(f"\neager server start-up: {s.startup_seconds:.1f} s")
        yield s


@pytest.fixture(scope="module")
def causal_images():
    """Whether the transformers side must run image tokens causally to match vLLM (Gemma 3 on the
    CPU: test_gemma3.py says why)."""
    return False


@pytest.fixture(scope="module")
def reference(ckpt, causal_images, serve_dtype):
    ref = Reference(ckpt)
    ref.model.to(getattr(torch, serve_dtype))  # the SplitQ layers keep their tensors' dtypes
    if causal_images:  # without token_type_ids, transformers' Gemma 3 masks images causally
        processor = ref.processor

        def causal(*args, **kwargs):
            out = processor(*args, **kwargs)
            out.pop("token_type_ids", None)
            return out

        ref.processor = type("CausalImages", (), {"__call__": staticmethod(causal), "apply_chat_template": processor.apply_chat_template})()
    return ref


def test_server_loaded_every_quantized_linear(server):
    logs = server.logs()
    assert "SplitQ:" in logs and "files checked" in logs
    assert "neither quantized nor in the ignore list" not in logs


def test_chat_with_an_image(server):
    r = server.client().chat.completions.create(
        model=server.model, messages=CONVERSATIONS["one_image"][0], max_tokens=6, temperature=0.0
    )
    assert isinstance(r.choices[0].message.content, str) and r.usage.completion_tokens > 0


@pytest.mark.parametrize("name", PROMPTS)
def test_vllm_greedy_answers_equal_the_transformers_loader(server, reference, serve_dtype, name):
    msgs, pngs = CONVERSATIONS[name]
    served = served_chat(server, msgs)
    print(f"\n{name}: served {served.token_ids} {[round(x, 4) for x in served.logprobs]}")
    if serve_dtype == "float32":
        assert_matches_reference(served, reference, msgs, pngs, name)
    else:  # a weaker check: bf16 noise is of the size of a mask error
        assert_matches_reference(served, reference, msgs, pngs, name, first_atol=BF16_FIRST_ATOL, atol=BF16_ATOL)
