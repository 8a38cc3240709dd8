"""The reference's bf16 form (precision="bf16", reference/transforms.operand): what the kernels
compute under SPLITQ_PRECISION=bf16. Checked against a direct evaluation that rounds the same
operands with torch's own bfloat16 cast, from torch.kron's explicit P_m; the float32 default is
untouched; the bf16 form stays close to float32 (its roundings are far below a 4-bit step); fresh
random layers whose sizes are no multiple of any block."""

import pytest
import torch

from splitq_kernels.reference import (
    SplitQScheme,
    int_linear,
    kron_apply,
    quantize,
    quantize_input,
    quantize_linear,
    splitq_linear,
    splitq_linear_w4a16,
    transformed_inputs,
)
from splitq_kernels.reference.transforms import operand
from splitq_vllm.testing.layers import random_activations, random_float_layer
from splitq_vllm.testing.layers import random_text_masks as masks

# D_in = 53 = 45 main (5 x 9) + 3 text + 5 vision, D_out = 37, ranks 3 and 4, 29 tokens
SHAPE = dict(in_features=53, out_features=37, n_text=3, n_vision=5, kron=(5, 9), cws_rank=3, mac_rank=4)
ROWS = 29


def bf16(t: torch.Tensor) -> torch.Tensor:
    return t.to(torch.bfloat16).float()


def layer(scheme_name: str = "w4a4", seed: int = 0):
    scheme = SplitQScheme.from_name(scheme_name)
    fl, _ = random_float_layer(**SHAPE, act_clip=0.9, weight_clip=True, seed=seed)
    return scheme, quantize_linear(fl, scheme)


def test_operand_is_bfloat16_rounding_to_nearest_even():
    x = torch.tensor([1.0 + 2.0**-8, 1.0 + 3 * 2.0**-8, -(1.0 + 2.0**-8 + 2.0**-20), 3.0e38, 1e-40])
    assert torch.equal(operand(x, "bf16"), x.to(torch.bfloat16).float())
    assert operand(x, "bf16")[0] == 1.0 and operand(x, "bf16")[1] == 1.0 + 2.0**-6  # ties to even
    assert operand(x, "float32") is x
    x64 = torch.randn(7, dtype=torch.float64)
    assert operand(x64, "bf16").dtype == torch.float64  # the product accumulates in the compute dtype


def test_kron_bf16_is_the_kernels_order_on_rounded_operands():
    """Z = bf16(R) bf16(P2), X' = bf16(P1)^T bf16(Z), against an explicit loop-free evaluation."""
    gen = torch.Generator().manual_seed(1)
    n1, n2 = 5, 9
    x = torch.randn(4, n1 * n2, generator=gen)
    p1, p2 = torch.randn(n1, n1, generator=gen), torch.randn(n2, n2, generator=gen)
    z = bf16(x).reshape(4, n1, n2) @ bf16(p2)
    want = (bf16(p1).T @ bf16(z)).reshape(4, -1)
    assert torch.allclose(kron_apply(x, p1, p2, "bf16"), want, rtol=0, atol=1e-6)
    exact = x.double() @ torch.kron(p1.double(), p2.double())
    err = (kron_apply(x, p1, p2, "bf16").double() - exact).abs().max() / exact.abs().max()
    assert 1e-5 < err < 3e-2  # really rounded, and only by bfloat16's few ulps
    assert torch.equal(kron_apply(x, p1, p2), kron_apply(x, p1, p2, "float32"))
    with pytest.raises(ValueError, match="product precision"):
        kron_apply(x, p1, p2, "fp8")


def test_transformed_inputs_are_what_the_bf16_scratch_holds():
    scheme, q = layer()
    x = random_activations(ROWS, 53, seed=2, outlier_channels=3)
    xm, xt, xv = transformed_inputs(x, q, "bf16")
    for v in (xm, xt, xv):
        assert torch.equal(v, bf16(v))  # stored in bfloat16
    # the main set from the explicit transform on rounded operands, P_m = diag(smooth) (P1 (x) P2)
    xs = bf16(x[:, q.idx_main] * q.main_smooth)
    z = xs.reshape(ROWS, 5, 9) @ bf16(q.main_p2)
    assert torch.allclose(xm, bf16((bf16(q.main_p1).T @ bf16(z)).reshape(ROWS, -1)), rtol=0, atol=1e-6)
    assert torch.equal(xt, bf16(bf16(x[:, q.idx_text]) @ bf16(q.text_p)))
    f32 = transformed_inputs(x, q)
    assert not torch.equal(xm, f32[0])
    assert (xm - f32[0]).abs().max() < 2**-6 * f32[0].abs().max()  # a few bf16 ulps of the largest


@pytest.mark.parametrize("scheme_name", ["w4a8", "w4a4", "w3a2"])
def test_linear_bf16_rounds_only_the_float_products(scheme_name):
    """The integer form at bf16: quantize_input on the bf16 transforms, the up products on bf16
    operands; equal to splitq_gemm's terms recomputed by hand, and within a few bf16 ulps of the
    float32 output wherever the two quantized the same codes."""
    scheme, q = layer(scheme_name, seed=3)
    x = random_activations(ROWS, 53, seed=4, outlier_channels=3)
    mask = masks(ROWS, 5)["mixed"]
    y = splitq_linear(x, mask, q, scheme, "bf16")
    qin = quantize_input(x, q, scheme, "bf16")
    xm = transformed_inputs(x, q, "bf16")[0]
    main = quantize(xm, scheme.act_bits, scheme.act_symmetric, clip=q.main_act_clip.reshape(()))
    assert torch.equal(qin.main.codes, main.codes) and torch.equal(qin.main.scale, main.scale)
    by_hand = (int_linear(qin.main, q.main_w, torch.float32) + int_linear(qin.text, q.text_w, torch.float32)
               + int_linear(qin.vision, q.vision_w, torch.float32)
               + bf16(int_linear(qin.main, q.cws_down, torch.float32)) @ bf16(q.cws_up.dequantize(torch.float32)).T
               + torch.where(mask[:, None], bf16(int_linear(qin.mac, q.mac_down, torch.float32))
                             @ bf16(q.mac_up.dequantize(torch.float32)).T, torch.zeros(())))
    if q.bias is not None:
        by_hand = by_hand + q.bias
    assert torch.allclose(y, by_hand, rtol=1e-5, atol=1e-5)
    f32 = splitq_linear(x, mask, q, scheme)
    assert torch.equal(f32, splitq_linear(x, mask, q, scheme, "float32"))
    same = (qin.main.codes == quantize_input(x, q, scheme).main.codes).all(dim=1)
    assert same.any()
    rel = (y - f32)[same].abs().max() / f32.abs().max()
    assert rel < 2e-2
    assert not torch.equal(y, f32)


def test_w4a16_bf16_uses_the_bf16_transforms():
    scheme, q = layer("w4a4", seed=6)
    x = random_activations(5, 53, seed=7, outlier_channels=2)
    y = splitq_linear_w4a16(x, None, q, precision="bf16")
    xm, xt, xv = transformed_inputs(x, q, "bf16")
    h = xm @ q.cws_down.dequantize(torch.float32).T
    want = (xm @ q.main_w.dequantize(torch.float32).T + xt @ q.text_w.dequantize(torch.float32).T
            + xv @ q.vision_w.dequantize(torch.float32).T + bf16(h) @ bf16(q.cws_up.dequantize(torch.float32)).T)
    if q.bias is not None:
        want = want + q.bias
    assert torch.allclose(y, want, rtol=1e-6, atol=1e-6)
    assert torch.equal(splitq_linear_w4a16(x, None, q), splitq_linear_w4a16(x, None, q, precision="float32"))
