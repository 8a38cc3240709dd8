"""The vLLM plugin on the tiny Qwen3-VL (splitq_vllm.families): tests/plugin/family_server.py."""

import pytest

from tests.plugin.family_server import (  # noqa: F401  (pytest collects them here)
    causal_images,
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
def family():
    return "Qwen3-VL"
