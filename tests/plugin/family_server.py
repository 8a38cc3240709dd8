"""The serving test of one model family, shared by tests/plugin/test_<family>.py: the tiny model
calibrated with `splitq-calibrate`, served by vLLM's OpenAI server (one start per module, eager),
chats with images through the openai client, and greedy answers equal to the transformers
loader's on the same checkpoint (token ids; log-probabilities within LOGPROB_ATOL).

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
from tests.plugin.generation import Reference, assert_same_generation, served_chat, server_args

PROMPTS = ["one_image", "two_images", "text_only"]
# bf16 on both sides with different kernels (8 bits of mantissa): measured on the tiny Qwen3.5, the
# first 4 greedy tokens agree on each prompt and the first log-probabilities differ by 0.03-0.05
BF16_TOKENS = 3
BF16_LOGPROB_ATOL = 0.1


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
    served, expected = served_chat(server, msgs), reference.generate(msgs, pngs)
    print(f"\n{name}: served {served.token_ids} {[round(x, 4) for x in served.logprobs]}")
    print(f"{name}: reference {expected.token_ids} {[round(x, 4) for x in expected.logprobs]}")
    if serve_dtype == "float32":
        assert_same_generation(served, expected, name)
    else:  # a weaker check (bf16 noise is of the size of a mask error): the first tokens
        assert served.prompt_ids == expected.prompt_ids
        assert served.token_ids[:BF16_TOKENS] == expected.token_ids[:BF16_TOKENS], (served.token_ids, expected.token_ids)
        assert abs(served.logprobs[0] - expected.logprobs[0]) <= BF16_LOGPROB_ATOL
