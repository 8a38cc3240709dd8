"""SPLITQ_DECODE_MODE (splitq_kernels.decode_mode): validated with an error naming the variable and
its values; the reference backend's op runs the W4A16 form at <= 16 rows under w4a16 and the
integer form otherwise; the mode is part of vLLM's compile-cache key (hf_config.splitq_backend)."""

from types import SimpleNamespace

import pytest
import torch
from torch import nn

from splitq_kernels.decode_mode import DECODE_ROWS, decode_mode, reference_linear_for_step, uses_w4a16
from splitq_kernels.reference import SplitQScheme, splitq_linear, splitq_linear_w4a16
from splitq_vllm.plugin.backends import ReferenceBackend
from splitq_vllm.testing.layers import random_activations, random_quantized_layer

W3A2 = SplitQScheme.from_name("w3a2")


def test_values_and_errors(monkeypatch):
    monkeypatch.delenv("SPLITQ_DECODE_MODE", raising=False)
    assert decode_mode() == "w4a4" and not uses_w4a16(1)
    monkeypatch.setenv("SPLITQ_DECODE_MODE", " W4A16 ")
    assert decode_mode() == "w4a16"
    assert uses_w4a16(1) and uses_w4a16(DECODE_ROWS) and not uses_w4a16(DECODE_ROWS + 1) and not uses_w4a16(0)
    monkeypatch.setenv("SPLITQ_DECODE_MODE", "fp16")
    with pytest.raises(ValueError, match=r"SPLITQ_DECODE_MODE='fp16': must be one of w4a4, w4a16"):
        decode_mode()


def test_reference_backend_switches_at_the_decode_threshold(monkeypatch):
    layer = random_quantized_layer(85, 37, 3, 5, (7, 11), W3A2, cws_rank=3, mac_rank=4, bias=True, seed=5)
    module = nn.Module()
    ReferenceBackend().prepare(module, layer, W3A2)
    x = random_activations(DECODE_ROWS + 1, 85, seed=6, outlier_channels=4)
    mask = torch.arange(DECODE_ROWS + 1) % 3 > 0

    def apply(rows: int) -> torch.Tensor:
        return ReferenceBackend().apply(module, x[:rows], mask[:rows], layer.bias)

    monkeypatch.setenv("SPLITQ_DECODE_MODE", "w4a16")
    for rows in (1, DECODE_ROWS):
        assert torch.equal(apply(rows), splitq_linear_w4a16(x[:rows], mask[:rows], layer))
    assert torch.equal(apply(DECODE_ROWS + 1), splitq_linear(x, mask, layer, W3A2))  # prefill: the scheme
    monkeypatch.setenv("SPLITQ_DECODE_MODE", "w4a4")
    y = apply(DECODE_ROWS)
    assert torch.equal(y, splitq_linear(x[:DECODE_ROWS], mask[:DECODE_ROWS], layer, W3A2))
    assert not torch.equal(y, splitq_linear_w4a16(x[:DECODE_ROWS], mask[:DECODE_ROWS], layer))
    # the rows of a (batch, seq) input are all the step's rows (the transformers path)
    monkeypatch.setenv("SPLITQ_DECODE_MODE", "w4a16")
    x3 = x[:16].reshape(4, 4, 85)
    assert torch.equal(reference_linear_for_step(x3, None, layer, W3A2), splitq_linear_w4a16(x3, None, layer))
    x3 = x[:17].reshape(1, 17, 85)
    assert torch.equal(reference_linear_for_step(x3, None, layer, W3A2), splitq_linear(x3, None, layer, W3A2))


@pytest.mark.parametrize("env,values,field,bad", [
    ("SPLITQ_DECODE_MODE", ("w4a4", "w4a16"), "decode", "w8a8"),
    ("SPLITQ_PRECISION", ("float32", "bf16"), "precision", "fp8"),  # splitq_kernels.precision
])
def test_the_setting_is_in_the_compile_cache_key(monkeypatch, env, values, field, bad):
    """A setting that changes the numerics is part of the torch.compile key, and a bad value fails
    in the front end naming the variable."""
    from splitq_vllm.plugin.config import SplitQVllmConfig

    keys = {}
    for v in values:
        monkeypatch.setenv(env, v)
        hf_config = SimpleNamespace()
        # not a directory: the method records the key and returns before reading a checkpoint (no tower layers)
        SplitQVllmConfig.maybe_update_config(SimpleNamespace(tower_layers=[]), "/nonexistent/splitq", hf_config=hf_config)
        keys[v] = hf_config.splitq_backend
    assert all(f":{field}={v}" in keys[v] for v in values) and len(set(keys.values())) == len(values)
    monkeypatch.setenv(env, bad)
    with pytest.raises(ValueError, match=env):
        SplitQVllmConfig.maybe_update_config(SimpleNamespace(tower_layers=[]), "/nonexistent/splitq", hf_config=SimpleNamespace())


@pytest.mark.vllm
def test_served_w4a16_decode_matches_the_reference_in_that_mode(tiny_qwen_dir, tmp_path, monkeypatch):
    """The real OpenAI server (reference backend on the CPU) with SPLITQ_DECODE_MODE=w4a16 serves the
    tokens of the transformers reference in the same mode, one request at a time (decode steps of
    one row: W4A16; each prompt prefilled in one step of more than 16 rows: the scheme), and the
    mode changes the reference's numerics."""
    from splitq_vllm.testing.conversations import CONVERSATIONS
    from splitq_vllm.testing.synthetic import synthesize_checkpoint
    from tests.helpers.engine import OpenAIServer, server_env
    from tests.plugin.generation import Reference, assert_matches_reference, max_logprob_gap, served_chat, server_args

    ckpt = synthesize_checkpoint(tiny_qwen_dir, tmp_path / "qwen-w3a2", W3A2)
    reference = Reference(ckpt)
    default = {n: reference.generate(m, p) for n, (m, p) in CONVERSATIONS.items()}
    monkeypatch.setenv("SPLITQ_DECODE_MODE", "w4a16")
    expected = {n: reference.generate(m, p) for n, (m, p) in CONVERSATIONS.items()}
    assert any(max_logprob_gap(expected[n], default[n]) > 1e-4 for n in CONVERSATIONS)
    env = server_env(tmp_path, SPLITQ_DECODE_MODE="w4a16")
    # one prefill step per prompt (no chunk of <= 16 rows, which would run W4A16 where the reference does not)
    with OpenAIServer(ckpt, server_args(max_num_batched_tokens=2048), env=env) as server:
        for name, (msgs, pngs) in CONVERSATIONS.items():
            got = served_chat(server, msgs)
            assert len(got.prompt_ids) > 16, name
            assert_matches_reference(got, reference, msgs, pngs, name)  # the reference still in w4a16 mode

