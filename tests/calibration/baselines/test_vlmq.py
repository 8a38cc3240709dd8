"""VLMQ's importance-aware GPTQ (baselines/vlmq.py): plain GPTQ when the importances are equal,
less importance-weighted error than RTN, and an independent GPTQ written out column by column."""

from __future__ import annotations

import torch

from splitq_calibration.baselines import vlmq
from splitq_kernels.reference.quantizer import quantize


def _plain_gptq(w, h, bits, damp):
    """GPTQ without blocks or reordering, the inverse Hessian recomputed after each column
    (Frantar et al., Eq. 2-3 as OBQ: the textbook form)."""
    w = w.double().clone()
    h = h.double() + damp * torch.diagonal(h).double().mean() * torch.eye(h.shape[0], dtype=torch.float64)
    qmax = 2 ** (bits - 1) - 1
    scale = w.abs().amax(1, keepdim=True) / qmax
    codes = torch.zeros_like(w)
    hinv = torch.linalg.inv(h)
    for j in range(w.shape[1]):
        q = (w[:, j : j + 1] / scale).round().clamp(-qmax - 1, qmax)
        codes[:, j] = q[:, 0]
        err = (w[:, j] - q[:, 0] * scale[:, 0]) / hinv[j, j]
        w -= err[:, None] * hinv[j][None, :]
        w[:, j] = q[:, 0] * scale[:, 0]
        hinv = hinv - hinv[:, j : j + 1] @ hinv[j : j + 1, :] / hinv[j, j]  # remove column j
    return codes, scale


def _data(seed=0, n=200, d=24, out=16):
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(out, d, generator=gen)
    x = torch.randn(n, d, generator=gen) * torch.exp(torch.randn(d, generator=gen))
    g = torch.exp(2 * torch.randn(n, generator=gen))  # importances over orders of magnitude
    return w, x, g


def test_gptq_matches_the_textbook_form():
    w, x, _ = _data()
    h = vlmq.weighted_hessian(x)
    codes, scale = _plain_gptq(w, h, 3, 0.01)
    for block in (128, 5):  # one lazy block; blocks of 5 with a partial last one
        q = vlmq.gptq(w, h, 3, damp=0.01, act_order=False, block=block)
        assert torch.equal(q.codes.double(), codes)
        torch.testing.assert_close(q.scale.double(), scale)


def test_equal_importances_are_plain_gptq():
    w, x, _ = _data(1)
    plain = vlmq.gptq(w, vlmq.weighted_hessian(x), 4)
    equal = vlmq.gptq(w, vlmq.weighted_hessian(x, torch.full((x.shape[0],), 3.7)), 4)
    assert torch.equal(plain.codes, equal.codes)


def test_importance_weighted_gptq_has_less_weighted_error_than_rtn_and_plain_gptq():
    w, x, g = _data(2)

    def weighted_error(wq):
        return float((((x @ (wq - w).T) * g[:, None]) ** 2).sum())

    rtn = quantize(w, 3, True, dim=1).dequantize(torch.float32)
    plain = vlmq.gptq(w, vlmq.weighted_hessian(x), 3).dequantize(torch.float32)
    aware = vlmq.gptq(w, vlmq.weighted_hessian(x, g), 3).dequantize(torch.float32)
    # plain GPTQ minimises the unweighted error: on the weighted one it can lose to RTN (it does here)
    assert weighted_error(aware) < 0.5 * min(weighted_error(plain), weighted_error(rtn))


def test_codes_sit_on_the_grid_the_format_stores():
    w, x, _ = _data(3)
    q = vlmq.gptq(w, vlmq.weighted_hessian(x), 4)
    assert q.codes.dtype == torch.int8 and int(q.codes.min()) >= -8 and int(q.codes.max()) <= 7
    torch.testing.assert_close(q.scale, quantize(w, 4, True, dim=1).scale)


def test_importance_is_the_mean_absolute_gradient_per_token():
    p = torch.tensor([[1.0, -3.0], [0.0, 4.0]])
    assert torch.equal(vlmq.importance(p), torch.tensor([2.0, 2.0]))
