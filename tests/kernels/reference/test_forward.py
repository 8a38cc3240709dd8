"""The SplitQ forward (Algorithm 1): integer form, fake-quant form and a direct float64 evaluation
of the paper's formulas agree, for every bit setting, mask and awkward shape."""

import dataclasses
import itertools

import pytest
import torch

from splitq_kernels.reference import (
    SplitQScheme,
    concat_outputs,
    int_matmul,
    quantize,
    quantize_input,
    quantize_linear,
    split_outputs,
    splitq_linear,
    splitq_linear_fake,
)
from splitq_vllm.testing.layers import random_activations, random_float_layer
from splitq_vllm.testing.layers import random_text_masks as masks
from tests.kernels.reference.paper import direct_q

SCHEMES = ["w4a8", "w4a4", "w3a3", "w3a2"]
# Nothing here is a multiple of anything convenient: D_in = 53 = 45 main (5 x 9) + 3 text + 5
# vision, D_out = 37, ranks 3 and 4, 29 tokens.
SHAPE = dict(in_features=53, out_features=37, n_text=3, n_vision=5, kron=(5, 9), cws_rank=3, mac_rank=4)
ROWS = 29


def direct_algorithm1(x, text_mask, w, layer, scheme):
    """Algorithm 1 in the paper's convention (Y = X W, W of shape D_in x D_out), float64, from the
    original weight and the explicit transform matrices; shares no code with the reference."""
    x, w = x.double(), w.double().T  # paper layout: (D_in, D_out)
    d = lambda t: t.double()  # noqa: E731
    sym, ab, aab = scheme.act_symmetric, scheme.act_bits, scheme.aux_act_bits
    wb, awb = scheme.weight_bits, scheme.aux_weight_bits

    def q_act(a, bits, clip):
        return direct_q(a, bits, sym, -1, float(clip))

    def q_w(m, bits, clip=None):  # per output channel = per column in the paper's layout
        c = 1.0 if clip is None else d(clip).T
        return direct_q(m, bits, True, 0, c)

    im, it, iv = layer.idx_main, layer.idx_text, layer.idx_vision
    p_m = torch.diag(d(layer.main_smooth)) @ torch.kron(d(layer.main_p1), d(layer.main_p2))
    xm_p = x[:, im] @ p_m
    xm_hat = q_act(xm_p, ab, layer.main_act_clip)
    w_m = torch.linalg.inv(p_m) @ w[im]
    y_t = q_act(x[:, it] @ d(layer.text_p), aab, layer.text_act_clip) @ q_w(
        torch.linalg.inv(d(layer.text_p)) @ w[it], awb, layer.text_weight_clip
    )
    y_v = q_act(x[:, iv] @ d(layer.vision_p), aab, layer.vision_act_clip) @ q_w(
        torch.linalg.inv(d(layer.vision_p)) @ w[iv], awb, layer.vision_weight_clip
    )
    u_s, v_s = d(layer.cws_down).T, d(layer.cws_up).T
    y_m = xm_hat @ q_w(w_m - u_s @ v_s, wb, layer.main_weight_clip) + xm_hat @ q_w(u_s, awb) @ q_w(v_s, awb)
    u_c, v_c = d(layer.mac_down).T, d(layer.mac_up).T
    comp = q_act(xm_p - xm_hat, aab, layer.mac_act_clip) @ q_w(u_c, awb) @ q_w(v_c, awb)
    rows = {"text": text_mask, "vision": ~text_mask, "all": torch.ones_like(text_mask)}[scheme.mac_rows]
    y_m[rows] += comp[rows]
    return y_m + y_t + y_v + d(layer.bias)


@pytest.mark.parametrize("scheme_name,symmetric", list(itertools.product(SCHEMES, [True, False])))
@pytest.mark.parametrize("seed", [0, 1])
def test_integer_fake_and_direct_forms_agree(scheme_name, symmetric, seed):
    scheme = SplitQScheme.from_name(scheme_name, act_symmetric=symmetric)
    layer, w = random_float_layer(**SHAPE, act_clip=0.9, weight_clip=True, seed=seed, dtype=torch.float64)
    x = random_activations(ROWS, SHAPE["in_features"], seed=seed + 100, outlier_channels=4, dtype=torch.float64)
    qlayer = quantize_linear(layer, scheme)
    for name, mask in masks(ROWS, seed).items():
        expected = direct_algorithm1(x, mask, w, layer, scheme)
        y_int = splitq_linear(x, mask, qlayer, scheme)
        y_fake = splitq_linear_fake(x, mask, layer, scheme)
        scale = expected.abs().max()
        torch.testing.assert_close(y_int / scale, expected / scale, rtol=0, atol=1e-10, msg=f"integer vs direct, {name}")
        torch.testing.assert_close(y_fake / scale, expected / scale, rtol=0, atol=1e-10, msg=f"fake vs direct, {name}")


@pytest.mark.parametrize("scheme_name", SCHEMES)
def test_integer_and_fake_forms_agree_in_float32(scheme_name):
    scheme = SplitQScheme.from_name(scheme_name)
    layer, _ = random_float_layer(**SHAPE, act_clip=0.95, seed=7)
    x = random_activations(ROWS, SHAPE["in_features"], seed=8, outlier_channels=3)
    mask = masks(ROWS, 9)["mixed"]
    y_int = splitq_linear(x, mask, quantize_linear(layer, scheme), scheme)
    y_fake = splitq_linear_fake(x, mask, layer, scheme)
    assert y_int.dtype == torch.float32
    torch.testing.assert_close(y_int, y_fake, rtol=1e-5, atol=1e-5 * float(y_fake.abs().max()))


@pytest.mark.parametrize("mac_rows", ["text", "vision", "all"])
def test_mac_only_on_the_rows_it_targets(mac_rows):
    scheme = SplitQScheme.from_name("w3a3", mac_rows=mac_rows)
    layer, w = random_float_layer(**SHAPE, seed=3, dtype=torch.float64)
    no_mac = dataclasses.replace(layer, mac_down=None, mac_up=None)
    x = random_activations(ROWS, SHAPE["in_features"], seed=4, dtype=torch.float64)
    mask = masks(ROWS, 5)["mixed"]
    y = splitq_linear(x, mask, quantize_linear(layer, scheme), scheme)
    y0 = splitq_linear(x, mask, quantize_linear(no_mac, scheme), scheme)
    target = {"text": mask, "vision": ~mask, "all": torch.ones_like(mask)}[mac_rows]
    torch.testing.assert_close(y[~target], y0[~target], rtol=0, atol=0)
    assert bool(((y[target] - y0[target]).abs().amax(-1) > 0).all())
    torch.testing.assert_close(y, direct_algorithm1(x, mask, w, layer, scheme), rtol=0, atol=1e-10)


def test_auxiliary_paths_never_below_four_bits():
    scheme = SplitQScheme.from_name("w3a2")
    assert (scheme.weight_bits, scheme.act_bits, scheme.aux_weight_bits, scheme.aux_act_bits) == (3, 2, 4, 4)
    assert SplitQScheme.from_name("w4a8").aux_act_bits == 8
    layer, _ = random_float_layer(**SHAPE, seed=11)
    q = quantize_linear(layer, scheme)
    assert q.main_w.bits == 3 and int(q.main_w.codes.min()) >= -4 and int(q.main_w.codes.max()) <= 3
    for part in (q.text_w, q.vision_w, q.cws_down, q.cws_up, q.mac_down, q.mac_up):
        assert part.bits == 4 and int(part.codes.min()) >= -8
    qin = quantize_input(random_activations(ROWS, 53, seed=12), q, scheme)
    assert qin.main.bits == 2 and int(qin.main.codes.min()) >= -2 and int(qin.main.codes.max()) <= 1
    assert qin.text.bits == 4 and qin.vision.bits == 4 and qin.mac.bits == 4


def test_nearly_lossless_at_8_bits():
    """At W8A8 the SplitQ layer reproduces x W^T + b: catches a wrong fold or a wrong set gather."""
    scheme = SplitQScheme.from_name("w8a8")
    layer, w = random_float_layer(**SHAPE, seed=13, dtype=torch.float64)
    layer = dataclasses.replace(layer, cws_down=None, cws_up=None, mac_down=None, mac_up=None)
    x = random_activations(ROWS, 53, seed=14, dtype=torch.float64)
    y = splitq_linear(x, None, quantize_linear(layer, scheme), scheme)
    ref = x @ w.T + layer.bias
    # 8-bit rounding on 45-channel rows behind random transforms of condition ~8 costs about 2%;
    # a wrong fold or gather costs about 100%.
    assert float((y - ref).norm() / ref.norm()) < 0.05


def test_integer_accumulation_is_exact():
    gen = torch.Generator().manual_seed(0)
    a = quantize(torch.randn(17, 301, generator=gen), 8, symmetric=False)
    w = quantize(torch.randn(13, 301, generator=gen), 4, symmetric=True, dim=1)
    exact = (a.codes.long() - a.zero.long()) @ w.codes.long().T
    assert torch.equal(int_matmul(a, w).long(), exact)


def test_empty_sets_and_branches_are_allowed():
    scheme = SplitQScheme.from_name("w4a4")
    layer, w = random_float_layer(48, 20, n_text=0, n_vision=0, kron=(6, 8), seed=15, dtype=torch.float64)
    layer = dataclasses.replace(layer, cws_down=None, cws_up=None, mac_down=None, mac_up=None)
    x = random_activations(9, 48, seed=16, dtype=torch.float64)
    q = quantize_linear(layer, scheme)
    assert q.text_w is None and q.vision_w is None and q.cws_rank == 0 and q.mac_rank == 0
    torch.testing.assert_close(splitq_linear(x, None, q, scheme), splitq_linear_fake(x, None, layer, scheme))


def test_fake_form_trains_every_learnable_part():
    scheme = SplitQScheme.from_name("w3a3")
    layer, _ = random_float_layer(**SHAPE, weight_clip=True, seed=17)
    learnable = {
        n: getattr(layer, n).requires_grad_()
        for n in ("main_smooth", "main_p1", "main_p2", "text_p", "vision_p", "main_act_clip", "mac_act_clip",
                  "cws_down", "cws_up", "mac_down", "mac_up", "main_weight_clip")
    }
    x = random_activations(ROWS, 53, seed=18)
    splitq_linear_fake(x, masks(ROWS, 19)["mixed"], layer, scheme).square().mean().backward()
    for name, t in learnable.items():
        assert t.grad is not None and float(t.grad.abs().sum()) > 0, name


def test_leading_dims_and_dtype_are_kept():
    scheme = SplitQScheme.from_name("w4a4")
    layer, _ = random_float_layer(**SHAPE, seed=20)
    q = quantize_linear(layer, scheme)
    x = random_activations(2 * 5, 53, seed=21).reshape(2, 5, 53).to(torch.bfloat16)
    mask = torch.rand(2, 5) < 0.5
    y = splitq_linear(x, mask, q, scheme)
    assert y.shape == (2, 5, 37) and y.dtype == torch.bfloat16
    flat = splitq_linear(x.reshape(10, 53), mask.reshape(10), q, scheme)
    assert torch.equal(y.reshape(10, 37), flat)
    with pytest.raises(ValueError, match="text_mask has 3 rows"):
        splitq_linear(x.reshape(10, 53), mask.reshape(10)[:3], q, scheme)


def test_fused_layers_are_the_concatenation_of_their_shards():
    scheme = SplitQScheme.from_name("w4a4")
    layer, _ = random_float_layer(**SHAPE, seed=22)
    fused = quantize_linear(layer, scheme)
    shards = split_outputs(fused, [20, 9, 8])
    x = random_activations(ROWS, 53, seed=23)
    mask = masks(ROWS, 24)["mixed"]
    y = splitq_linear(x, mask, fused, scheme)
    parts = [splitq_linear(x, mask, s, scheme) for s in shards]
    torch.testing.assert_close(torch.cat(parts, -1), y, rtol=1e-6, atol=1e-6)
    again = concat_outputs(shards)
    assert torch.equal(again.main_w.codes, fused.main_w.codes) and torch.equal(again.cws_up.scale, fused.cws_up.scale)
