"""The vLLM plugin on the tiny Qwen2.5-VL: the real OpenAI server on a SplitQ checkpoint, answers
through the openai client, fidelity to the reference math outside vLLM, batch invariance with
chunked prefill and prefix caching, and the text/vision mask.

One synthetic W4A4 checkpoint (every part of the format non-trivial: outlier sets, transforms,
CWS and MAC branches). The module's main server runs the way `vllm serve` does by default, with
torch.compile (vLLM's CPU inductor backend; no --enforce-eager); one more server, eager, serves
the mask override.
"""

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
    prefix_cache_hits,
    served_chat,
    server_args,
)

pytestmark = pytest.mark.vllm


@pytest.fixture(scope="module")
def ckpt(tiny_qwen_dir, tmp_path_factory):
    path = synthesize_checkpoint(tiny_qwen_dir, tmp_path_factory.mktemp("splitq") / "qwen-w4a4", SplitQScheme.from_name("w4a4"))
    dims = read_checkpoint(path).quant_config.layers
    assert all(d.mac_rank > 0 and d.cws_rank > 0 and d.text > 0 and d.vision > 0 for d in dims.values())
    return path


@pytest.fixture(scope="module")
def server(ckpt, tmp_path_factory):
    """Compiled (no --enforce-eager), like a default `vllm serve`."""
    env = server_env(tmp_path_factory.mktemp("vllm-cache"))
    with OpenAIServer(ckpt, server_args(eager=False), env=env) as s:
        print(f"\ncompiled server start-up: {s.startup_seconds:.1f} s")
        yield s


@pytest.fixture(scope="module")
def reference(ckpt):
    return Reference(ckpt)


@pytest.fixture(scope="module")
def served(server):
    """Each conversation sent alone, in turn."""
    return {name: served_chat(server, msgs) for name, (msgs, _) in CONVERSATIONS.items()}


@pytest.fixture(scope="module")
def expected(reference):
    return {name: reference.generate(msgs, pngs) for name, (msgs, pngs) in CONVERSATIONS.items()}


def test_server_loaded_and_compiled_the_splitq_model(server):
    logs = server.logs()
    assert "SplitQ:" in logs and "files checked" in logs  # front end: the checkpoint was validated
    assert "neither quantized nor in the ignore list" not in logs
    assert "Warming up model for the compilation" in logs and "Enforce eager set" not in logs


def test_chat_with_one_image(server):
    r = server.client().chat.completions.create(
        model=server.model, messages=CONVERSATIONS["one_image"][0], max_tokens=8, temperature=0.0
    )
    assert isinstance(r.choices[0].message.content, str)  # may be empty: random weights, special tokens skipped
    assert r.usage.completion_tokens > 0
    assert r.usage.prompt_tokens > 16  # the image's 16 placeholder rows plus the text


def test_chat_with_two_images(server, served):
    r = server.client().chat.completions.create(
        model=server.model, messages=CONVERSATIONS["two_images"][0], max_tokens=8, temperature=0.0
    )
    assert isinstance(r.choices[0].message.content, str)  # may be empty: random weights, special tokens skipped
    assert len(served["two_images"].prompt_ids) > 64  # > max-num-batched-tokens: prefilled in chunks


def test_text_only_chat(server):
    r = server.client().chat.completions.create(
        model=server.model, messages=CONVERSATIONS["text_only"][0], max_tokens=8, temperature=0.0
    )
    assert isinstance(r.choices[0].message.content, str)  # may be empty: random weights, special tokens skipped
    assert r.choices[0].finish_reason in ("length", "stop")


def test_streamed_chat(server, served):
    stream = server.client().chat.completions.create(
        model=server.model,
        messages=CONVERSATIONS["one_image"][0],
        max_tokens=MAX_TOKENS,
        temperature=0.0,
        stream=True,
        extra_body={"ignore_eos": True},
    )
    chunks = [c.choices[0].delta.content or "" for c in stream if c.choices]
    assert sum(1 for c in chunks if c) >= 2
    assert "".join(chunks) == served["one_image"].text  # the same greedy answer as unstreamed


@pytest.mark.parametrize("name", list(CONVERSATIONS))
def test_served_tokens_match_the_reference(served, reference, name):
    assert_matches_reference(served[name], reference, *CONVERSATIONS[name], name)


def test_batch_invariance_with_prefix_caching(server, served):
    """All conversations at once, twice (several requests per step, images and text mixed,
    chunked prefill, prompts already in the prefix cache): the same tokens as each alone."""
    hits_before = prefix_cache_hits(server)
    names = list(CONVERSATIONS) * 2
    with ThreadPoolExecutor(len(names)) as pool:
        results = list(pool.map(lambda n: served_chat(server, CONVERSATIONS[n][0]), names))
    for name, got in zip(names, results):
        assert got.token_ids == served[name].token_ids, name
        assert max_logprob_gap(got, served[name]) <= LOGPROB_ATOL, name
    assert prefix_cache_hits(server) > hits_before  # image prompts were partly served from the cache


def test_the_mask_matters(reference, served, expected):
    """Marking every row text (or vision) changes this checkpoint's output, and the server follows
    the token mask: its output is far closer to the reference run with that mask than to runs
    with every row text or every row vision."""
    for name in ("one_image", "two_images", "image_last"):
        msgs, pngs = CONVERSATIONS[name]
        gap = max_logprob_gap(served[name], expected[name])
        for mode in ("text", "vision"):
            wrong = reference.generate(msgs, pngs, mask=mode)
            effect = max_logprob_gap(wrong, expected[name])
            print(f"\n{name}: all-{mode} mask moves the reference by {effect:.1e}; served vs reference {gap:.1e}")
            assert wrong.token_ids != expected[name].token_ids or effect > 2 * LOGPROB_ATOL, (name, mode)
            assert max_logprob_gap(served[name], wrong) > max(3 * gap, 2 * LOGPROB_ATOL), (name, mode)
    msgs, pngs = CONVERSATIONS["text_only"]  # no image: every row is text anyway
    assert reference.generate(msgs, pngs, mask="text").logprobs == expected["text_only"].logprobs


def test_mask_override_for_ablations(ckpt, served, reference, tmp_path):
    """SPLITQ_TEXT_MASK=text (eager engine) serves the checkpoint with every row marked text (MAC
    on image rows too): image prompts change, the text-only prompt does not. (This server is
    started without --quantization splitq: config.json's quant_method selects the plugin.)"""
    env = server_env(tmp_path, SPLITQ_TEXT_MASK="text")
    with OpenAIServer(ckpt, server_args(quantization_flag=False), env=env) as s:
        assert "quantization=splitq" in s.logs()
        assert "text mask mode text" in s.logs()
        for name in ("one_image", "two_images"):
            got = served_chat(s, CONVERSATIONS[name][0])
            assert got.token_ids != served[name].token_ids or max_logprob_gap(got, served[name]) > 2 * LOGPROB_ATOL, name
        # eager engine, text only: the mask changes nothing, and eager matches the reference too
        assert_matches_reference(served_chat(s, CONVERSATIONS["text_only"][0]), reference, *CONVERSATIONS["text_only"], "text_only (eager)")
