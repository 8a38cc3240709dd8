"""The served-vs-reference comparison itself (tests/plugin/generation.py), on the reference alone:
teacher forcing reproduces a greedy run exactly, and the comparison fails on a wrong mask and on a
token that is no near tie. No vLLM: the "served" side is the reference run another way."""

from __future__ import annotations

import dataclasses

import pytest

from splitq_kernels.reference import SplitQScheme
from splitq_vllm.testing.conversations import CONVERSATIONS
from splitq_vllm.testing.synthetic import synthesize_checkpoint
from tests.plugin.generation import DECODE_ATOL, Reference, assert_matches_reference


@pytest.fixture(scope="module")
def reference(tiny_qwen_dir, tmp_path_factory):
    return Reference(synthesize_checkpoint(tiny_qwen_dir, tmp_path_factory.mktemp("splitq") / "w4a4", SplitQScheme.from_name("w4a4")))


@pytest.mark.parametrize("name", ["one_image", "text_only"])
def test_following_the_greedy_tokens_reproduces_the_greedy_run(reference, name):
    msgs, pngs = CONVERSATIONS[name]
    greedy = reference.generate(msgs, pngs)
    followed = assert_matches_reference(greedy, reference, msgs, pngs, name)
    assert followed.token_ids == greedy.token_ids and followed.logprobs == greedy.logprobs
    assert followed.top_logprobs == greedy.logprobs  # every step its own greedy choice


@pytest.mark.parametrize("mode", ["text", "vision"])
def test_a_wrong_mask_fails_on_the_first_token(reference, mode):
    msgs, pngs = CONVERSATIONS["one_image"]
    wrong = reference.generate(msgs, pngs, mask=mode)
    with pytest.raises(AssertionError, match="first token"):
        assert_matches_reference(wrong, reference, msgs, pngs, f"all-{mode} mask")


def test_a_token_that_is_no_near_tie_fails_at_its_step(reference):
    msgs, pngs = CONVERSATIONS["text_only"]
    greedy = reference.generate(msgs, pngs)
    # step 5 takes a token well below the greedy one (the first such id); log-probabilities the reference's own
    for token in range(3, 60):
        tokens = [*greedy.token_ids[:5], token, *greedy.token_ids[6:]]
        forced = reference.generate(msgs, pngs, follow=tokens)
        if forced.top_logprobs[5] - forced.logprobs[5] > 2 * DECODE_ATOL:
            break
    else:
        pytest.fail("no token id in 3..59 is more than 2 * DECODE_ATOL below the greedy one at step 5")
    served = dataclasses.replace(forced, top_logprobs=None)
    with pytest.raises(AssertionError, match=f"step 5, token {token}:"):
        assert_matches_reference(served, reference, msgs, pngs, "text_only")
