"""SPLITQ_PRECISION (splitq_kernels/precision.py): the validated setting, what it means for the
kernels and for the reference, and that the reference paths of a serving step read it."""

import pytest
import torch

from splitq_kernels.decode_mode import reference_linear_for_step
from splitq_kernels.precision import kernel_precision, product_precision, reference_precision
from splitq_kernels.reference import SplitQScheme, quantize_linear, splitq_linear, splitq_linear_w4a16
from splitq_vllm.testing.layers import random_activations, random_float_layer
from splitq_vllm.testing.layers import random_text_masks as masks


def test_the_setting_is_validated_and_defaults_to_float32(monkeypatch):
    monkeypatch.delenv("SPLITQ_PRECISION", raising=False)
    assert product_precision() == "float32"
    monkeypatch.setenv("SPLITQ_PRECISION", " BF16 ")
    assert product_precision() == "bf16"
    monkeypatch.setenv("SPLITQ_PRECISION", "fp8")
    with pytest.raises(ValueError, match="SPLITQ_PRECISION='fp8'.*float32, bf16"):
        product_precision()
    assert product_precision("float32") == "float32"  # an explicit value wins


def test_kernel_and_reference_precisions():
    assert kernel_precision("cuda", "float32") == "tf32x3" and kernel_precision("cpu", "float32") == "ieee"
    assert kernel_precision("cuda", "bf16") == "bf16" == kernel_precision("cpu", "bf16")
    assert [reference_precision(p) for p in ("ieee", "tf32x3", "tf32", "bf16")] == ["float32"] * 3 + ["bf16"]


def test_a_serving_step_reads_the_setting(monkeypatch):
    scheme = SplitQScheme.from_name("w4a4")
    fl, _ = random_float_layer(in_features=53, out_features=37, n_text=3, n_vision=5, kron=(5, 9), cws_rank=3,
                               mac_rank=4, seed=1)
    q = quantize_linear(fl, scheme)
    x = random_activations(20, 53, seed=2, outlier_channels=3)
    mask = masks(20, 3)["mixed"]
    monkeypatch.setenv("SPLITQ_PRECISION", "bf16")
    y = reference_linear_for_step(x, mask, q, scheme)
    assert torch.equal(y, splitq_linear(x, mask, q, scheme, "bf16"))
    assert not torch.equal(y, splitq_linear(x, mask, q, scheme))
    monkeypatch.setenv("SPLITQ_DECODE_MODE", "w4a16")
    assert torch.equal(reference_linear_for_step(x[:4], mask[:4], q, scheme), splitq_linear_w4a16(x[:4], None, q, precision="bf16"))
    monkeypatch.setenv("SPLITQ_PRECISION", "float32")
    monkeypatch.setenv("SPLITQ_DECODE_MODE", "w4a4")
    assert torch.equal(reference_linear_for_step(x, mask, q, scheme), splitq_linear(x, mask, q, scheme))
