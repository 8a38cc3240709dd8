"""The plugin's backend choice (SPLITQ_BACKEND): candidates tried in order by can_implement, the
reasons of those passed over logged, a forced backend that cannot run the layer refused by name."""

import logging

import pytest
import torch

from splitq_kernels.layout import MAX_N1
from splitq_kernels.reference import SplitQScheme
from splitq_vllm.plugin.backends import ReferenceBackend, TritonBackend, select_backend

W4A4 = SplitQScheme.from_name("w4a4")
CPU = torch.device("cpu")


def test_auto_on_the_cpu_is_the_reference_and_says_why(monkeypatch, caplog):
    monkeypatch.delenv("SPLITQ_BACKEND", raising=False)
    with caplog.at_level(logging.INFO):
        backend = select_backend((5, 9), W4A4, CPU)
    assert isinstance(backend, ReferenceBackend)
    assert "triton passed over: no CUDA device" in caplog.text


def test_forced_triton_runs_in_the_interpreter_on_the_cpu(monkeypatch):
    monkeypatch.setenv("SPLITQ_BACKEND", "triton")
    assert isinstance(select_backend((5, 9), W4A4, CPU), TritonBackend)


def test_forced_triton_beyond_a_kernel_limit_is_refused_with_the_reason(monkeypatch):
    monkeypatch.setenv("SPLITQ_BACKEND", "triton")
    with pytest.raises(RuntimeError, match=rf"SPLITQ_BACKEND=triton: no backend .*n1={MAX_N1 + 1}"):
        select_backend((MAX_N1 + 1, 2), W4A4, CPU)


def test_forced_reference(monkeypatch):
    monkeypatch.setenv("SPLITQ_BACKEND", "reference")
    assert isinstance(select_backend((MAX_N1 + 1, 2), W4A4, CPU), ReferenceBackend)


@pytest.mark.parametrize("backend_name", ["reference", "triton"])
def test_row_parallel_shards_through_the_backends_sum_to_the_full_layer(backend_name):
    """prepare(..., shard) / apply of each backend, as the plugin wires them for a row-parallel
    layer under TP=2 (the rank's layer, the whole input): the two partial outputs sum to the
    unsharded backend's output (Triton: in the interpreter)."""
    from torch import nn

    from splitq_kernels.reference import main_k_shards, shard_layer
    from splitq_vllm.testing.layers import random_activations, random_quantized_layer

    if backend_name == "triton":
        import splitq_kernels.triton

        splitq_kernels.triton.use_interpreter()
    make = {"reference": ReferenceBackend, "triton": lambda: TritonBackend(interpreter=True)}[backend_name]
    layer = random_quantized_layer(85, 37, 3, 5, (7, 11), W4A4, cws_rank=3, mac_rank=4, bias=False, seed=3)
    x = random_activations(19, 85, seed=3, outlier_channels=4)
    mask = torch.arange(19) % 3 > 0
    full_module = nn.Module()
    make().prepare(full_module, layer, W4A4)
    full = make().apply(full_module, x, mask, None)
    parts = []
    for shard in main_k_shards(77, 2):
        module, backend = nn.Module(), make()
        backend.prepare(module, shard_layer(layer, shard), W4A4, shard)
        parts.append(backend.apply(module, x, mask, None))
    err = (parts[0] + parts[1] - full).abs().max() / full.abs().max()
    assert err < 1e-5, float(err)
