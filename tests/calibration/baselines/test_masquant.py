"""MASQuant (baselines/masquant.py): the compensation touches only vision rows, the whitened
low-rank correction is the best of its rank for the vision rows' output (Theorem 2), and MAS's
training lowers each modality's loss from the Eq. 12 init."""

from __future__ import annotations

import torch

from splitq_calibration.baselines import masquant
from splitq_calibration.baselines.common import GroupSamples
from splitq_calibration.mocd import ChannelStats
from splitq_calibration.recipe import CalibrationConfig
from splitq_kernels.reference.quantizer import fake_quantize


def _data(seed=0, n=240, d=32, out=20):
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(out, d, generator=gen) / d**0.5
    x = torch.randn(n, d, generator=gen) * torch.exp(0.5 * torch.randn(d, generator=gen))
    m = torch.rand(n, generator=gen) < 0.4
    x[~m, :2] *= 50.0  # vision outliers
    x[m, 5] *= 20.0  # a text outlier
    return w, x, m


def _stats(x, m):
    s = ChannelStats.empty(x.shape[1])
    s.update(x, m, None)
    return s


def test_whitened_correction_is_optimal_for_the_vision_output():
    w, x, m = _data()
    xv = x[~m]
    s_v = masquant.init_smoothing(w, xv.abs().amax(0)).float()
    delta = torch.randn(w.shape, generator=torch.Generator().manual_seed(1))
    xs = (xv / s_v).double()
    target = xs @ delta.double().T
    for r in (1, 4, 10):
        l1, l2 = masquant.whitened_correction(xv, s_v, delta, r)
        err = float(((xs @ l1.double() @ l2.double()) - target).norm() ** 2)
        # the minimum over rank-r L of ||Xs (dW - L)||: the tail of Xs dW's singular values
        sv = torch.linalg.svdvals(target)
        torch.testing.assert_close(err, float((sv[r:] ** 2).sum()), rtol=1e-4, atol=1e-6)
        # and better than the SVD of dW itself (the non-whitened baseline of Fig. 6)
        u, s, vh = torch.linalg.svd(delta.double().T, full_matrices=False)
        plain = float(((xs @ (u[:, :r] * s[:r]) @ vh[:r]) - target).norm() ** 2)
        assert err <= plain + 1e-9


def test_compensation_applies_only_to_vision_rows():
    w, x, m = _data(2)
    cfg = CalibrationConfig(method="masquant", scheme="w4a4", masquant_rank_ratio=0.25).resolved()
    samples = GroupSamples([x], [m], [torch.arange(len(m))], int(m.sum()), int((~m).sum()))
    full, info = masquant.calibrate(w, None, samples, _stats(x, m), cfg, torch.Generator().manual_seed(0))
    assert info["cmc_rank"] == 5 and full.l1.shape == (32, 5)
    y = full(x, m)
    base = fake_quantize(x / full.s_text, 4, True, dim=-1) @ full.weight_q.T  # Eq. 29, text branch
    torch.testing.assert_close(y[m], base[m])
    xs_v = x[~m] / full.s_vision
    no_cmc = fake_quantize(xs_v, 4, True, dim=-1) @ full.weight_q.T
    torch.testing.assert_close(y[~m], no_cmc + xs_v @ full.l1 @ full.l2)
    fp = x @ w.T
    assert float((y[~m] - fp[~m]).norm()) < 0.5 * float((no_cmc - fp[~m]).norm())


def test_mas_training_keeps_the_best_and_learns_from_a_poor_start():
    w, x, m = _data(3, n=600)
    cfg = CalibrationConfig(method="masquant", scheme="w4a4").resolved()
    gen = torch.Generator().manual_seed(0)
    for rows in (x[m], x[~m]):
        s0 = masquant.init_smoothing(w, rows.abs().amax(0))
        s, losses = masquant.learn_smoothing(rows, w, s0, cfg.quant_scheme, 2, cfg.lr, gen)
        assert len(losses) == 3
        torch.testing.assert_close(float(masquant.mae_loss(rows, w, s, cfg.quant_scheme)), min(losses))
        # from no smoothing at all (the vision outliers unsmoothed) the training has a lot to find
        s, losses = masquant.learn_smoothing(rows, w, torch.ones(32), cfg.quant_scheme, 3, 5e-2, gen)
        assert losses[-1] < 0.9 * losses[0]


def test_init_is_eq_12():
    w, x, m = _data(4)
    s = masquant.init_smoothing(w, x.abs().amax(0))
    torch.testing.assert_close(s, (x.abs().amax(0).double() / w.abs().amax(0).double()).sqrt())
