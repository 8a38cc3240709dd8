"""MBQ's modality-balanced scale search (baselines/mbq.py) against a direct computation."""

from __future__ import annotations

import torch

from splitq_calibration.baselines import mbq
from splitq_calibration.baselines.common import TokenGradients
from splitq_kernels.reference import SplitQScheme


def _direct_error(w, x, m, alpha, scheme, g_t, g_v):
    """Eq. 13-14 written out: E from the formula, per-token / per-row symmetric RTN, |dY| sums."""
    qmax_a, qmax_w = 2 ** (scheme.act_bits - 1) - 1, 2 ** (scheme.weight_bits - 1) - 1
    x64, w64 = x.double(), w.double()
    e = (x64.abs().amax(0).clamp(min=1e-5) ** alpha / w64.abs().amax(0).clamp(min=1e-5) ** (1 - alpha)).clamp(1e-5, 1e5)
    xs, ws = x64 / e, w64 * e
    sa = xs.abs().amax(1, keepdim=True) / qmax_a
    sw = ws.abs().amax(1, keepdim=True) / qmax_w
    xq = (xs / sa).round().clamp(-qmax_a - 1, qmax_a) * sa
    wq = (ws / sw).round().clamp(-qmax_w - 1, qmax_w) * sw
    err = (xq @ wq.T - x64 @ w64.T).abs().sum(1)
    return g_t * float(err[m].sum()) + g_v * float(err[~m].sum())


def _toy(seed=0, n=96, d=32, out=24):
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(out, d, generator=gen) / d**0.5
    x = torch.randn(n, d, generator=gen)
    m = torch.arange(n) < n // 3  # a third text rows
    x[~m, 3] *= 40.0  # a vision outlier channel
    x[m, 7] *= 25.0  # a text outlier channel
    return w, x, m


def test_search_picks_the_grid_point_of_least_weighted_error():
    w, x, m = _toy()
    scheme = SplitQScheme.from_name("w4a4")
    for g_t, g_v in ((1.0, 0.1), (1.0, 1.0), (0.05, 1.0)):
        alpha, e, errors = mbq.search_alpha(w, x, m, x.abs().amax(0), scheme, g_t, g_v, grid=10)
        direct = [_direct_error(w, x, m, a, scheme, g_t, g_v) for a in mbq.alpha_grid(10)]
        f64 = lambda v: torch.tensor(v, dtype=torch.float64)  # noqa: E731
        torch.testing.assert_close(f64(errors), f64(direct), rtol=2e-3, atol=1e-3)
        assert alpha == mbq.alpha_grid(10)[min(range(10), key=lambda i: direct[i])]
        torch.testing.assert_close(e, mbq.equalization(w.abs().amax(0), x.abs().amax(0), alpha))


def test_the_modality_weights_change_the_answer():
    """A toy where the text-only and vision-only optima differ: weight 0 on one modality gives
    the other's optimum."""
    w, x, m = _toy(1)
    scheme = SplitQScheme.from_name("w4a4")
    absmax = x.abs().amax(0)
    a_text, *_ = mbq.search_alpha(w, x, m, absmax, scheme, 1.0, 0.0, grid=20)
    a_vision, *_ = mbq.search_alpha(w, x, m, absmax, scheme, 0.0, 1.0, grid=20)
    text_only = [_direct_error(w, x, m, a, scheme, 1.0, 0.0) for a in mbq.alpha_grid(20)]
    vision_only = [_direct_error(w, x, m, a, scheme, 0.0, 1.0) for a in mbq.alpha_grid(20)]
    assert a_text == mbq.alpha_grid(20)[min(range(20), key=lambda i: text_only[i])]
    assert a_vision == mbq.alpha_grid(20)[min(range(20), key=lambda i: vision_only[i])]
    assert a_text != a_vision


def test_modality_gradients_are_the_mean_per_modality():
    g = TokenGradients()
    g.add(torch.tensor([[1.0, -3.0], [2.0, 2.0], [10.0, -30.0]]), torch.tensor([True, True, False]), torch.tensor([2]))
    assert g.modality_means() == (2.0, 20.0)
    assert torch.equal(g.rows[0], torch.tensor([[10.0, 30.0]]))  # |g| at the sampled rows only
