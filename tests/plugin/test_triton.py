"""The Triton kernel path inside vLLM, in CI: SPLITQ_BACKEND=triton on the CPU runs the kernels in
Triton's interpreter; the served tokens must equal those of the reference backend.

Both engines serve the same synthetic W4A4 checkpoint of the tiny Qwen2.5-VL in float32 (every
part of the format non-trivial). The kernels and the reference compute the same integer products;
the float32 transforms are summed in another order, so a code can flip where a value sits on a
rounding boundary (tests/kernels/ bound this): tokens must be identical and
log-probabilities within generation.LOGPROB_ATOL (served vs served, one machine).
"""

from __future__ import annotations

import pytest

from splitq_kernels.reference import SplitQScheme
from splitq_vllm.testing.conversations import CONVERSATIONS
from splitq_vllm.testing.synthetic import synthesize_checkpoint
from tests.helpers.engine import OpenAIServer, server_env
from tests.plugin.generation import assert_same_generation, served_chat, server_args

pytestmark = pytest.mark.vllm

MAX_TOKENS = 6  # the interpreter runs ~0.3 s per linear call: keep the decode short


@pytest.fixture(scope="module")
def ckpt(tiny_qwen_dir, tmp_path_factory):
    return synthesize_checkpoint(tiny_qwen_dir, tmp_path_factory.mktemp("splitq") / "qwen-w4a4", SplitQScheme.from_name("w4a4"))


def _serve(ckpt, backend: str, tmp_path_factory, eager: bool) -> dict:
    env = server_env(tmp_path_factory.mktemp("vllm-cache"), SPLITQ_BACKEND=backend)
    # 128 batched tokens: fewer, larger prefill chunks (each chunk is one kernel call per linear)
    args = server_args(max_num_batched_tokens=128, eager=eager)
    with OpenAIServer(ckpt, args, env=env, startup_timeout=900) as s:
        assert f"SplitQ: {backend} backend" in s.logs()
        return {n: served_chat(s, CONVERSATIONS[n][0], max_tokens=MAX_TOKENS) for n in ("one_image", "text_only")}


def test_triton_kernels_in_vllm_match_the_reference_backend(ckpt, tmp_path_factory):
    reference = _serve(ckpt, "reference", tmp_path_factory, eager=True)
    # compiled (vLLM's CPU inductor backend): the kernels' custom op must be opaque to torch.compile
    triton = _serve(ckpt, "triton", tmp_path_factory, eager=False)
    for name in reference:
        assert_same_generation(triton[name], reference[name], f"{name}: triton vs reference backend")
