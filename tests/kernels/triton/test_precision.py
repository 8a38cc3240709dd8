"""The kernels at precision "bf16" (SPLITQ_PRECISION=bf16: float products on bfloat16 operands,
transformed rows stored in bfloat16) against the reference's bf16 form, on the CPU through Triton's
interpreter, with the criteria of splitq_kernels.testing: kernel (a) + GEMM at 37 and 5 rows, the
decode path at 1, 3 and 16 rows, the W4A16 decode kernels; shapes that are multiples of no tile.
That the kernels really round, and round as torch does (to nearest, ties to even): their codes
equal the bf16 reference's and differ from the float32 reference's in many places."""

from __future__ import annotations

import pytest
import torch

from splitq_kernels.layout import prepare_kernel_layer, scratch_dtype
from splitq_kernels.reference import (
    SplitQScheme,
    quantize_input,
    quantize_linear,
    splitq_linear_w4a16,
    transformed_inputs,
)
from splitq_kernels.reference.transforms import operand
from splitq_kernels.testing import BF16_ULP, activations_to_reference, check_linear, check_outputs
from splitq_kernels.triton.gemm import gemm_triton
from splitq_kernels.triton.quantize_decode import linear_decode_triton
from splitq_kernels.triton.quantize_input import quantize_input_triton
from splitq_kernels.triton.w4a16 import linear_w4a16_triton
from splitq_vllm.testing.layers import random_activations, random_float_layer
from splitq_vllm.testing.layers import random_text_masks as masks


@pytest.fixture(scope="module", autouse=True)
def interpreter():
    import splitq_kernels.triton

    splitq_kernels.triton.use_interpreter()


# main 320 = 40 x 8: three P1 blocks; rank 17 pads to 32
WIDE = dict(in_features=331, out_features=45, n_text=5, n_vision=6, kron=(40, 8), cws_rank=5, mac_rank=17)
# main 222 = 6 x 37: n2 spans three P2 blocks
LONG = dict(in_features=234, out_features=29, n_text=7, n_vision=5, kron=(6, 37), cws_rank=9, mac_rank=3)


def make(shape: dict, scheme_name: str, sym: bool, seed: int):
    scheme = SplitQScheme.from_name(scheme_name, act_symmetric=sym)
    fl, _ = random_float_layer(**shape, act_clip=0.9, weight_clip=True, seed=seed)
    q = quantize_linear(fl, scheme)
    return scheme, q, prepare_kernel_layer(q, scheme, "cpu", precision="bf16")


def differences(act, kl, ref) -> int:
    """Codes and per-token scales of the kernel's activations that differ from `ref`'s."""
    got = activations_to_reference(act, kl)
    n = 0
    for g, r in ((got.main, ref.main), (got.text, ref.text), (got.vision, ref.vision)):
        if r is not None:
            n += int((g.codes != r.codes).sum()) + int((g.scale != r.scale).sum())
    return n


def check_bf16(y, act, x, mask, q, scheme, kl) -> None:
    report, _, _ = check_linear(y, act, x, mask, q, scheme, kl)  # against the bf16 reference; raises with details
    assert report.explained_flips <= max(2, report.codes_compared // 2000), report
    # the float32 reference quantizes on other scales (the row maxima are rounded) and codes: the
    # roundings are really there
    to_f32 = differences(act, kl, quantize_input(x.float(), q, scheme))
    to_bf16 = differences(act, kl, quantize_input(x.float(), q, scheme, "bf16"))
    assert to_f32 >= max(x.shape[0], 10 * to_bf16), (to_f32, to_bf16)


@pytest.mark.parametrize("scheme_name,sym", [("w4a8", False), ("w4a4", True), ("w3a2", True)])
@pytest.mark.parametrize("rows", [37, 5])
def test_kernel_a_and_gemm_match_the_bf16_reference(scheme_name, sym, rows):
    scheme, q, kl = make(WIDE, scheme_name, sym, seed=rows)
    assert scratch_dtype(kl) == torch.bfloat16
    x = random_activations(rows, WIDE["in_features"], seed=rows + 1, outlier_channels=5).to(torch.bfloat16)
    mask = masks(rows, 8)["mixed"]
    act = quantize_input_triton(x, mask, kl, store_mac=True)
    check_bf16(gemm_triton(act, kl, x.dtype), act, x, mask, q, scheme, kl)


@pytest.mark.parametrize("scheme_name,sym", [("w4a4", True), ("w3a2", False)])
@pytest.mark.parametrize("rows", [1, 3, 16])
def test_decode_path_matches_the_bf16_reference(scheme_name, sym, rows):
    scheme, q, kl = make(LONG, scheme_name, sym, seed=rows + 20)
    x = random_activations(rows, LONG["in_features"], seed=rows + 21, outlier_channels=4).to(torch.bfloat16)
    mask = masks(rows, 22)["mixed"] if rows > 1 else torch.ones(1, dtype=torch.bool)
    y, act = linear_decode_triton(x, mask, kl, store_mac=True)
    check_bf16(y, act, x, mask, q, scheme, kl)


@pytest.mark.parametrize("rows", [1, 16])
def test_w4a16_matches_the_bf16_reference(rows):
    scheme, q, kl = make(WIDE, "w4a4", True, seed=rows + 30)
    x = random_activations(rows, WIDE["in_features"], seed=rows + 31, outlier_channels=4).to(torch.bfloat16)
    y = linear_w4a16_triton(x, kl)
    expected = splitq_linear_w4a16(x.float(), None, q, precision="bf16")
    # h = X' deq(D)^T sums in another order in the kernel: its bfloat16 rounding may land one ulp away
    h = transformed_inputs(x.float(), q, "bf16")[0] @ q.cws_down.dequantize(torch.float64).float().T
    extra = BF16_ULP * h.abs().double() @ q.cws_up.dequantize(torch.float64).abs().T
    check_outputs(y, expected, what="W4A16 output at bf16", extra=extra)
    f32 = splitq_linear_w4a16(x.float(), None, q)
    assert not torch.allclose(operand(expected, "bf16"), operand(f32, "bf16"), rtol=0, atol=0)
