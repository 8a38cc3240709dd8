"""The per-group method's memory-bounded pieces (calibration/splitq_calibration/group_params.py,
layer.GroupRunner) against the plain definition: the gradient of a step and the quantized layer
are those of the reference's float layer on the whole batch, whatever the row blocking."""

from __future__ import annotations

import pytest
import torch

from splitq_calibration import group_params
from splitq_calibration.group_params import GroupParams
from splitq_calibration.layer import GroupRunner, MaskHolder
from splitq_calibration.mocd import ChannelStats
from splitq_calibration.recipe import CalibrationConfig
from splitq_kernels.reference import quantize_linear, splitq_linear_fake


def _group(seed: int, out_f: int, in_f: int, bias: bool, dtype: torch.dtype) -> tuple[GroupParams, CalibrationConfig]:
    gen = torch.Generator().manual_seed(seed)
    w = (torch.randn(out_f, in_f, generator=gen) / in_f**0.5).to(dtype)
    b = torch.randn(out_f, generator=gen).to(dtype) * 0.1 if bias else None
    stats = ChannelStats.empty(in_f)
    stats.absmax = torch.rand(in_f, generator=gen) + 0.5
    cfg = CalibrationConfig(method="splitq", scheme="w4a4").resolved()
    perm = torch.randperm(in_f, generator=gen)
    idx_t, idx_v = perm[:3].sort().values, perm[3:5].sort().values
    params = GroupParams(w, b, idx_t, idx_v, stats, cfg, torch.Generator().manual_seed(seed + 1))
    with torch.no_grad():  # move off the init so every parameter has a gradient worth comparing
        for p in params.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
    return params, cfg


def _batch(seed: int, n: int, rows: int, in_f: int, out_f: int):
    gen = torch.Generator().manual_seed(seed)
    xs = [torch.randn(rows + i, in_f, generator=gen) for i in range(n)]
    masks = [torch.rand(rows + i, generator=gen) < 0.6 for i in range(n)]
    ts = [torch.randn(rows + i, out_f, generator=gen) * 0.3 for i in range(n)]
    return xs, masks, ts


@pytest.mark.parametrize("block_elements", [2**24, 40 * 24])  # one block; row blocks of 40 rows
@pytest.mark.parametrize("bias", [False, True])
def test_step_gradient_matches_the_whole_batch_graph(monkeypatch, block_elements, bias):
    out_f, in_f = 101, 24  # 101 rows: the last block is partial
    monkeypatch.setattr(group_params, "ROW_BLOCK_ELEMENTS", block_elements)
    params, cfg = _group(0, out_f, in_f, bias, torch.bfloat16)
    scheme = cfg.quant_scheme
    xs, masks, ts = _batch(1, 3, 9, in_f, out_f)
    trainable = [p for p in params.parameters() if p.requires_grad]
    assert len(trainable) >= 10

    # the definition: one graph over the batch, loss / loss.detach() (FlatQuant)
    layer = params.float_layer()
    sse = sum(((splitq_linear_fake(x, m, layer, scheme) - t) ** 2).sum() for x, m, t in zip(xs, masks, ts))
    (sse / sse.detach()).backward()
    expected = [p.grad.clone() for p in trainable]
    for p in trainable:
        p.grad = None

    # the runner: weight side once, samples one by one, weight-side backward by row blocks
    mask = MaskHolder()
    runner = GroupRunner(params, scheme, mask)
    runner.begin_step(train=True)
    total = 0.0
    for x, m, t in zip(xs, masks, ts):
        mask.mask = m
        s = ((runner(x) - t) ** 2).sum()
        s.backward()
        total += s.item()
        runner.clear()
    assert total == pytest.approx(sse.item(), rel=1e-5)
    for p in trainable:  # what train_groups does; clipping factors and gates get theirs below
        if p.grad is not None:
            p.grad.mul_(1 / total)
    runner.finish_step(1 / total)
    for p, g in zip(trainable, expected):
        torch.testing.assert_close(p.grad, g, rtol=2e-4, atol=1e-6)


def test_blocked_quantized_layer_is_quantize_linear_of_the_float_layer(monkeypatch):
    monkeypatch.setattr(group_params, "ROW_BLOCK_ELEMENTS", 16 * 24)
    params, cfg = _group(3, 70, 24, True, torch.bfloat16)
    assert len(params.row_blocks()) == 5
    blocked = params.quantized()
    whole = quantize_linear(params.float_layer(), cfg.quant_scheme)
    for name in ("main_w", "text_w", "vision_w", "cws_down", "cws_up", "mac_down", "mac_up"):
        a, b = getattr(blocked, name), getattr(whole, name)
        # row blocks change the BLAS blocking of the folds: scales within a few ulp, same codes
        assert torch.equal(a.codes, b.codes), name
        torch.testing.assert_close(a.scale, b.scale, rtol=1e-6, atol=0)
    assert torch.equal(blocked.bias, whole.bias)


def test_frozen_weights_stay_in_their_dtype():
    params, _ = _group(4, 40, 24, False, torch.bfloat16)
    assert params.w_main.dtype == torch.bfloat16 and params.w_text.dtype == torch.bfloat16
    assert params.fake_weights().main.dtype == torch.float32
