"""The vLLM plugin on the tiny Gemma 3 (splitq_vllm.families; SigLIP tower, sliding and full attention layers, image tokens attending bidirectionally in transformers): tests/plugin/family_server.py."""

import pytest

from tests.plugin.family_server import (  # noqa: F401  (pytest collects them here)
    ckpt,
    reference,
    serve_dtype,
    server,
    test_chat_with_an_image,
    test_server_loaded_every_quantized_linear,
    test_vllm_greedy_answers_equal_the_transformers_loader,
)

pytestmark = pytest.mark.vllm


@pytest.fixture(scope="module")
def causal_images():
    """vLLM's CPU attention backend has no multimodal-prefix mode: CpuPlatform.get_attn_backend_cls
    returns CPU_ATTN whatever use_mm_prefix asks, so on the CPU vLLM's Gemma 3 attends causally
    over image tokens, where transformers (given the processor's token_type_ids) attends
    bidirectionally within an image. The CPU comparison runs transformers causally too; the
    bidirectional one needs a GPU backend (owed on a GPU: pytest tests/plugin/test_gemma3.py with
    this fixture returning False)."""
    return True


@pytest.fixture(scope="module")
def family():
    return "Gemma 3"
