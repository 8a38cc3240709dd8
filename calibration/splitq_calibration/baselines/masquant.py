"""MASQuant, Modality-Aware Smoothing Quantization (../shared/papers/masquant.txt).

Two parts, per linear-input group (paper layout Y = X W; code in torch layout, W (out, in)):
- MAS (Sec. 4.2): one smoothing vector per modality, s_m initialised by Eq. 12
  (s_i = sqrt(max_t |x^m_ti| / max_j |w_ji|), SmoothQuant with beta 0.5 on that modality's
  rows) and learned by minimising Eq. 13-14, sum_m lambda_m ||Q(X_m / s_m) Q(s_m W) - X_m W||
  (absolute error, lambda_t = lambda_v = 1: the paper's best, Table 4), straight-through
  rounding, Adam, `masquant_epochs` epochs (2, Table 5) over the sampled rows in batches of
  MAS_BATCH_ROWS, learning rate `lr` (5e-3: OmniQuant's, whose learnable smoothing MAS adopts);
  log s is learned so it stays positive.
- CMC (Sec. 4.3): one stored weight Q(s_t W); vision rows get the low-rank correction of
  dW = s_v W - Q(s_t W) (Eq. 22) after whitening: (X_v / s_v)^T (X_v / s_v) = P L P^T,
  T = (P L^1/2)^T (Eq. 23), T dW ~ U_r S_r V_r^T (Eq. 24), L1 = T^-1 U_r, L2 = S_r V_r^T (Eq. 25),
  optimal for ||X_v s_v^-1 (dW - L)|| (Theorem 2). Rank r = `masquant_rank_ratio` of
  min(D_in, D_out) (0.08: the ratio at which the paper's Fig. 6 has CMC pass MAS).
- inference (Eq. 29): text rows Q(X_t / s_t) Q(s_t W); vision rows Q(X_v / s_v) Q(s_t W) +
  (X_v / s_v) L1 L2 (the correction in float, as in the paper). `MASQuantLinear` is that forward.

What the SplitQ format can hold (docs/calibration.md, "Baselines"): its main path has one
smoothing vector for every row, and its masked low-rank branch (MAC, `mac_rows`) reads the
activation quantization residual, not X / s_v. So MAS's second smoothing vector and CMC's
correction have no place in a checkpoint: the checkpoint holds Eq. 29's text branch for every
row (Q(X / s_t) Q(s_t W)); the full Eq. 29 is measured at layer level (benchmarks/layer_level.py)
with `MASQuantLinear`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from splitq_kernels.reference import SplitQLinear, SplitQScheme
from splitq_kernels.reference.quantizer import fake_quantize

from ..group_params import column_absmax
from ..mocd import ChannelStats
from ..recipe import CalibrationConfig
from .common import GroupSamples, plain_params

MAS_BATCH_ROWS = 256


def init_smoothing(w: torch.Tensor, x_absmax: torch.Tensor) -> torch.Tensor:
    """Eq. 12: sqrt(max_t |x_ti| / max_j |w_ji|) per input channel (clamped like smooth_scale)."""
    ratio = x_absmax.to(torch.float64).clamp(min=1e-5) / column_absmax(w).to(torch.float64).clamp(min=1e-5)
    return ratio.sqrt().clamp(1e-5, 1e5)


def mae_loss(x: torch.Tensor, w: torch.Tensor, s: torch.Tensor, scheme: SplitQScheme) -> torch.Tensor:
    """Eq. 14, mean absolute error: |Q(X / s) Q(s W) - X W| (s on the input channels)."""
    y = x @ w.transpose(0, 1)
    xq = fake_quantize(x / s, scheme.act_bits, scheme.act_symmetric, dim=-1)
    wq = fake_quantize(w * s, scheme.weight_bits, True, dim=1)
    return (xq @ wq.transpose(0, 1) - y).abs().mean()


def learn_smoothing(
    x: torch.Tensor, w: torch.Tensor, s0: torch.Tensor, scheme: SplitQScheme, epochs: int, lr: float, gen
) -> tuple[torch.Tensor, list[float]]:
    """MAS for one modality's rows: s minimising Eq. 14 from s0; returns s and the loss per epoch
    (the loss over all rows before training, then after each epoch)."""
    w = w.to(torch.float32)
    log_s = torch.log(s0.to(torch.float32)).clone().requires_grad_(True)
    opt = torch.optim.Adam([log_s], lr=lr)

    def full_loss() -> float:
        with torch.no_grad():
            return float(mae_loss(x, w, log_s.exp(), scheme)) if x.shape[0] else 0.0

    losses = [full_loss()]
    if x.shape[0] == 0:
        return s0.to(torch.float32), losses
    best, best_s = losses[0], log_s.detach().clone()
    for _ in range(epochs):
        order = torch.randperm(x.shape[0], generator=gen)
        for b in range(0, x.shape[0], MAS_BATCH_ROWS):
            rows = x[order[b : b + MAS_BATCH_ROWS].to(x.device)]
            loss = mae_loss(rows, w, log_s.exp(), scheme)
            opt.zero_grad()
            loss.backward()
            opt.step()
        losses.append(full_loss())
        if losses[-1] < best:
            best, best_s = losses[-1], log_s.detach().clone()
    return best_s.exp(), losses


def whitened_correction(
    x_v: torch.Tensor, s_v: torch.Tensor, delta_w: torch.Tensor, rank: int, eps: float = 1e-8
) -> tuple[torch.Tensor, torch.Tensor]:
    """CMC (Eq. 23-25): the rank-r L1 (D_in, r), L2 (r, D_out) with (X_v / s_v) L1 L2 ~
    (X_v / s_v) dW^T; delta_w in torch layout (D_out, D_in)."""
    xs = (x_v / s_v).to(torch.float64)
    cov = xs.transpose(0, 1) @ xs
    lam, p = torch.linalg.eigh(cov)  # the SVD of a symmetric PSD matrix
    lam = lam.clamp(min=eps * float(lam.max().clamp(min=eps)))
    t = lam.sqrt()[:, None] * p.transpose(0, 1)  # T = (P L^1/2)^T
    t_inv = p * lam.rsqrt()[None, :]
    u, s, vh = torch.linalg.svd(t @ delta_w.transpose(0, 1).to(torch.float64), full_matrices=False)
    l1 = t_inv @ u[:, :rank]
    l2 = s[:rank, None] * vh[:rank]
    return l1.to(torch.float32), l2.to(torch.float32)


@dataclass
class MASQuantLinear:
    """Eq. 29: one quantized weight Q(s_t W), per-modality smoothing, CMC on vision rows."""

    weight_q: torch.Tensor  # fake-quantized s_t W, (out, in)
    s_text: torch.Tensor
    s_vision: torch.Tensor
    l1: torch.Tensor | None  # (in, r)
    l2: torch.Tensor | None  # (r, out)
    bias: torch.Tensor | None
    scheme: SplitQScheme

    def __call__(self, x: torch.Tensor, text_mask: torch.Tensor) -> torch.Tensor:
        x = x.reshape(-1, x.shape[-1]).to(torch.float32)
        m = text_mask.reshape(-1)
        s = torch.where(m[:, None], self.s_text[None, :], self.s_vision[None, :])
        xs = x / s
        y = fake_quantize(xs, self.scheme.act_bits, self.scheme.act_symmetric, dim=-1) @ self.weight_q.transpose(0, 1)
        if self.l1 is not None:
            comp = (xs @ self.l1) @ self.l2
            y = y + torch.where(m[:, None], torch.zeros((), dtype=y.dtype), comp)
        if self.bias is not None:
            y = y + self.bias
        return y


def calibrate(
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    samples: GroupSamples,
    stats: ChannelStats,
    cfg: CalibrationConfig,
    gen: torch.Generator,
) -> tuple[MASQuantLinear, dict]:
    """MAS then CMC for one group: the full method (Eq. 29) and its training log."""
    w = weight.to(torch.float32)
    x, m = samples.x.to(w.device), samples.text_mask.to(w.device)
    scheme = cfg.quant_scheme
    s_t, loss_t = learn_smoothing(
        x[m], w, init_smoothing(w, stats.text_absmax.to(w.device)), scheme, cfg.masquant_epochs, cfg.lr, gen
    )
    s_v, loss_v = learn_smoothing(
        x[~m], w, init_smoothing(w, stats.vision_absmax.to(w.device)), scheme, cfg.masquant_epochs, cfg.lr, gen
    )
    wq = fake_quantize(w * s_t, scheme.weight_bits, True, dim=1).detach()
    rank = int(round(cfg.masquant_rank_ratio * min(w.shape)))
    l1 = l2 = None
    if rank and int((~m).sum()):
        l1, l2 = whitened_correction(x[~m], s_v, w * s_v - wq, rank)
    b = None if bias is None else bias.to(torch.float32)
    info = {"mas_text_loss": loss_t, "mas_vision_loss": loss_v, "cmc_rank": rank}
    return MASQuantLinear(wq, s_t, s_v, l1, l2, b, scheme), info


def calibrate_group(
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    samples: GroupSamples,
    stats: ChannelStats,
    cfg: CalibrationConfig,
    gen: torch.Generator,
) -> tuple[SplitQLinear, dict]:
    """What a SplitQ checkpoint holds of MASQuant: the text-smoothed base Q(X / s_t) Q(s_t W) on
    every row (module docstring)."""
    full, info = calibrate(weight, bias, samples, stats, cfg, gen)
    return checkpoint_part(full, weight, bias, stats, cfg, gen), info


def checkpoint_part(
    full: MASQuantLinear, weight: torch.Tensor, bias, stats: ChannelStats, cfg: CalibrationConfig, gen
) -> SplitQLinear:
    """The SplitQ group of a calibrated MASQuant layer: its text smoothing on every row."""
    params = plain_params(weight, bias, stats, cfg, gen)
    with torch.no_grad():
        params.smooth.copy_((1.0 / full.s_text).to(params.smooth))
    return params.quantized()
