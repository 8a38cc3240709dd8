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
