"""The vLLM plugin on the tiny LLaVA-1.5 (CLIP tower, Llama language model, llava-hf tensor
names `language_model.model.layers.N...`): the same server test as for Qwen2.5-VL, eager engine."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest

from splitq_kernels.reference import SplitQScheme
from splitq_vllm.checkpoint import read_checkpoint
from splitq_vllm.testing.conversations import CONVERSATIONS
from splitq_vllm.testing.synthetic import synthesize_checkpoint
from tests.helpers.engine import OpenAIServer, server_env
from tests.plugin.generation import (
    LOGPROB_ATOL,
    MAX_TOKENS,
    Reference,
    assert_matches_reference,
    max_logprob_gap,
    served_chat,
    server_args,
)

pytestmark = pytest.mark.vllm


@pytest.fixture(scope="module")
def ckpt(tiny_llava_dir, tmp_path_factory):
    path = synthesize_checkpoint(tiny_llava_dir, tmp_path_factory.mktemp("splitq") / "llava-w4a4", SplitQScheme.from_name("w4a4"))
    layers = read_checkpoint(path).quant_config.layers
    assert all(n.startswith("language_model.model.layers.") for n in layers)
    assert all(d.mac_rank > 0 for d in layers.values())
    return path


@pytest.fixture(scope="module")
def server(ckpt, tmp_path_factory):
    with OpenAIServer(ckpt, server_args(), env=server_env(tmp_path_factory.mktemp("vllm-cache"))) as s:
        print(f"\neager server start-up: {s.startup_seconds:.1f} s")
        yield s


@pytest.fixture(scope="module")
def served(server):
    return {name: served_chat(server, msgs) for name, (msgs, _) in CONVERSATIONS.items()}


@pytest.fixture(scope="module")
def reference(ckpt):
    return Reference(ckpt)


def test_server_loaded_the_splitq_model(server):
    logs = server.logs()
    assert "SplitQ:" in logs and "files checked" in logs
    assert "neither quantized nor in the ignore list" not in logs


@pytest.mark.parametrize("name", ["one_image", "two_images", "text_only"])
def test_chats(server, name):
    r = server.client().chat.completions.create(
        model=server.model, messages=CONVERSATIONS[name][0], max_tokens=8, temperature=0.0
    )
    assert isinstance(r.choices[0].message.content, str)  # may be empty: random weights, special tokens skipped
    assert r.usage.completion_tokens > 0


def test_streamed_chat(server, served):
    stream = server.client().chat.completions.create(
        model=server.model,
        messages=CONVERSATIONS["two_images"][0],
        max_tokens=MAX_TOKENS,
        temperature=0.0,
        stream=True,
        extra_body={"ignore_eos": True},
    )
    chunks = [c.choices[0].delta.content or "" for c in stream if c.choices]
    assert sum(1 for c in chunks if c) >= 2
    assert "".join(chunks) == served["two_images"].text


@pytest.mark.parametrize("name", list(CONVERSATIONS))
def test_served_tokens_match_the_reference(served, reference, name):
    msgs, pngs = CONVERSATIONS[name]
    assert_matches_reference(served[name], reference, msgs, pngs, name)
    if pngs:  # and the mask matters on this model too
        wrong = reference.generate(msgs, pngs, mask="text")
        assert max_logprob_gap(served[name], wrong) > 2 * LOGPROB_ATOL


def test_batch_invariance(server, served):
    names = list(CONVERSATIONS) * 2
    with ThreadPoolExecutor(len(names)) as pool:
        results = list(pool.map(lambda n: served_chat(server, CONVERSATIONS[n][0]), names))
    for name, got in zip(names, results):
        assert got.token_ids == served[name].token_ids, name
        assert max_logprob_gap(got, served[name]) <= LOGPROB_ATOL, name
