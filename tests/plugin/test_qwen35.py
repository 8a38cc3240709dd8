"""The vLLM plugin on the tiny Qwen3.5 (splitq_vllm.families; a Gated DeltaNet layer and a gated full-attention layer): tests/plugin/family_server.py."""

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
def serve_dtype():
    """vLLM's CPU Gated DeltaNet kernel refuses float32 ("CPU GDN attention requires BF16"), so the
    server and the transformers loader run in bfloat16 and the comparison's tolerances are bf16's
    (family_server.BF16_*); the float32 comparison is owed on a CUDA machine with vLLM
    (this fixture returning "float32")."""
    return "bfloat16"


@pytest.fixture(scope="module")
def family():
    return "Qwen3.5"
