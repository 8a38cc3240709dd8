"""The W4A16 form of the reference (reference/w4a16.py): a direct float64 evaluation from the
explicit transform matrices, the dense dequantized-weight matmul, the integer form's limit as the
activation bits grow, row independence, and tensor-parallel shards; fresh random layers whose
sizes are no multiple of any block."""


import pytest
import torch

from splitq_kernels.reference import (
    SplitQScheme,
    main_k_shards,
    quantize_linear,
    shard_layer,
    splitq_linear,
    splitq_linear_w4a16,
    w4a16_dense_weight,
)
from splitq_vllm.testing.layers import random_activations, random_float_layer
from splitq_vllm.testing.layers import random_text_masks as masks

# D_in = 53 = 45 main (5 x 9) + 3 text + 5 vision, D_out = 37, ranks 3 and 4, 29 tokens
SHAPE = dict(in_features=53, out_features=37, n_text=3, n_vision=5, kron=(5, 9), cws_rank=3, mac_rank=4)
ROWS = 29


def direct_w4a16(x, layer):
    """Y = X'_m deq(W_m)^T + X'_t deq(W_t)^T + X'_v deq(W_v)^T + X'_m deq(D)^T deq(U)^T + b in the
    paper's layout, from torch.kron's explicit P_m and codes * scales; shares no code with w4a16.py."""
    d = lambda t: t.double()  # noqa: E731
    deq = lambda q: d(q.codes) * d(q.scale)  # noqa: E731  (per output row: (out, 1) scales)
    x = x.double()
    p_m = torch.diag(d(layer.main_smooth)) @ torch.kron(d(layer.main_p1), d(layer.main_p2))
    xm = x[:, layer.idx_main] @ p_m
    y = xm @ deq(layer.main_w).T
    y = y + (x[:, layer.idx_text] @ d(layer.text_p)) @ deq(layer.text_w).T
    y = y + (x[:, layer.idx_vision] @ d(layer.vision_p)) @ deq(layer.vision_w).T
    y = y + xm @ deq(layer.cws_down).T @ deq(layer.cws_up).T
    return y + d(layer.bias)


@pytest.mark.parametrize("scheme_name", ["w4a4", "w3a3", "w3a2"])
@pytest.mark.parametrize("seed", [0, 1])
def test_w4a16_equals_a_direct_float_computation_and_the_dense_weight(scheme_name, seed):
    scheme = SplitQScheme.from_name(scheme_name)
    fl, _ = random_float_layer(**SHAPE, act_clip=0.9, weight_clip=True, seed=seed, dtype=torch.float64)
    q = quantize_linear(fl, scheme)
    x = random_activations(ROWS, SHAPE["in_features"], seed=seed + 50, outlier_channels=4, dtype=torch.float64)
    y = splitq_linear_w4a16(x, None, q)
    expected = direct_w4a16(x, q)
    scale = expected.abs().max()
    torch.testing.assert_close(y / scale, expected / scale, rtol=0, atol=1e-12)
    dense = x @ w4a16_dense_weight(q).T + q.bias.double()
    torch.testing.assert_close(y / scale, dense / scale, rtol=0, atol=1e-12)


def test_w4a16_is_the_limit_of_the_integer_form_as_activation_bits_grow():
    """Same weight codes at W4A4 and W4A8 (weights keep 4 bits): the integer form moves towards the
    W4A16 form as the activation bits grow, and MAC's term (the residual's product) vanishes."""
    fl, _ = random_float_layer(**SHAPE, seed=3, dtype=torch.float64)
    x = random_activations(ROWS, SHAPE["in_features"], seed=4, dtype=torch.float64)
    mask = masks(ROWS, 5)["mixed"]
    errors = {}
    for name in ("w4a4", "w4a8"):
        scheme = SplitQScheme.from_name(name)
        q = quantize_linear(fl, scheme)
        ref = splitq_linear_w4a16(x, mask, q)
        errors[name] = float((splitq_linear(x, mask, q, scheme) - ref).abs().max() / ref.abs().max())
    assert errors["w4a8"] < errors["w4a4"] / 4, errors
    assert errors["w4a8"] < 0.02, errors
    q4, q8 = (quantize_linear(fl, SplitQScheme.from_name(n)) for n in ("w4a4", "w4a8"))
    assert torch.equal(q4.main_w.codes, q8.main_w.codes)  # the same weights: only activations differ


def test_no_row_depends_on_the_mask_or_on_other_rows():
    """No MAC, no per-token quantizer: every output row is a function of its input row alone."""
    scheme = SplitQScheme.from_name("w3a2")
    q = quantize_linear(random_float_layer(**SHAPE, seed=7)[0], scheme)
    x = random_activations(ROWS, SHAPE["in_features"], seed=8, outlier_channels=3)
    ys = [splitq_linear_w4a16(x, m, q) for m in masks(ROWS, 9).values()]
    for y in ys[1:]:
        assert torch.equal(y, ys[0])
    alone = torch.cat([splitq_linear_w4a16(x[i : i + 1], None, q) for i in range(ROWS)])
    torch.testing.assert_close(alone, ys[0], rtol=1e-6, atol=1e-6 * float(ys[0].abs().max()))


def test_leading_dims_dtypes_and_empty_parts():
    scheme = SplitQScheme.from_name("w4a4")
    shape = {**SHAPE, "in_features": 50, "n_text": 0, "cws_rank": 0, "mac_rank": 0}
    fl, _ = random_float_layer(**shape, bias=False, seed=11)
    q = quantize_linear(fl, scheme)
    assert q.text_w is None and q.cws_down is None and q.bias is None
    x = random_activations(2 * 7, 50, seed=12).reshape(2, 7, 50).to(torch.bfloat16)
    y = splitq_linear_w4a16(x, None, q)
    assert y.shape == (2, 7, SHAPE["out_features"]) and y.dtype == torch.bfloat16
    expected = x.reshape(14, 50).double() @ w4a16_dense_weight(q).T
    torch.testing.assert_close(y.reshape(14, -1).double(), expected, rtol=1e-2, atol=1e-2 * float(expected.abs().max()))
    with pytest.raises(ValueError, match="text_mask has 3 rows"):
        splitq_linear_w4a16(x, torch.ones(3, dtype=torch.bool), q)


@pytest.mark.parametrize("tp", [2, 4])
def test_w4a16_shards_sum_to_the_full_output(tp):
    shape = dict(in_features=85, out_features=37, n_text=3, n_vision=5, kron=(7, 11), cws_rank=3, mac_rank=4)
    scheme = SplitQScheme.from_name("w4a4")
    q = quantize_linear(random_float_layer(**shape, seed=13, dtype=torch.float64)[0], scheme)
    x = random_activations(ROWS, 85, seed=14, dtype=torch.float64)
    full = splitq_linear_w4a16(x, None, q)
    parts = [splitq_linear_w4a16(x, None, shard_layer(q, s), s) for s in main_k_shards(77, tp)]
    torch.testing.assert_close(sum(parts), full, rtol=0, atol=1e-12 * float(full.abs().max()))
