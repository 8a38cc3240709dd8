"""MBQ, Modality-Balanced Quantization (Li et al., CVPR 2025; ../shared/papers/mbq.txt).

MBQ searches the channel-wise equalization factors E of SmoothQuant/AWQ (its Eq. 5) with a
reconstruction loss whose text and vision parts are weighted by the model's sensitivity to each
modality (Sec. 3.2, Eq. 11-14):

    E* = argmin_E  |g_v| * ||W X_v - Q(W E) Q(E^-1 X_v)||  +  |g_l| * ||W X_l - Q(W E) Q(E^-1 X_l)||

with |g_v|, |g_l| the mean absolute gradient of the loss w.r.t. the linear's output on vision
and language tokens, and the norm the absolute error summed over the tokens (the "MAE" form
the paper recommends, Sec. 5.3 / Table 3; it is what Eq. 9-12 derive). As in SmoothQuant's and
AWQ's search that MBQ builds on, E is one-parameter: E_c = max|x_c|^a / max|W_c|^(1-a) for a on
a grid of `mbq_grid` points in [0, 1) (20, AWQ's grid), one E per group of linears sharing the
input (q/k/v, gate/up: their outputs' errors summed).

Defaults and approximations (docs/calibration.md, "Baselines"):
- gradients: the block-wise substitute of baselines/common.token_gradients (the layer's RTN
  error, not the SFT loss MBQ takes through the whole model: the sequential pipeline never
  holds the whole model);
- the search runs on at most `baseline_max_tokens` sampled rows per group; each modality's sum
  is rescaled to the calibration set's token count of that modality, so the balance between the
  modalities is the full set's;
- weight-activation only (the SplitQ format always quantizes activations): MBQ's W3 weight-only
  rows are run as W3A8 here.
The result is the SplitQ format with one main set: smooth = 1 / E (x * smooth, W / smooth:
reference.transforms), identity transforms; the export, the reference and the vLLM plugin serve
it unchanged.
"""

from __future__ import annotations

import torch

from splitq_kernels.reference import SplitQLinear, SplitQScheme
from splitq_kernels.reference.quantizer import fake_quantize

from ..group_params import column_absmax
from ..mocd import ChannelStats
from ..recipe import CalibrationConfig
from .common import GroupSamples, plain_params


def alpha_grid(n: int) -> list[float]:
    return [i / n for i in range(n)]


def equalization(w_absmax: torch.Tensor, x_absmax: torch.Tensor, alpha: float) -> torch.Tensor:
    """E_c = max|x_c|^a / max|W_c|^(1-a), clamped like group_params.smooth_scale (float64)."""
    x = x_absmax.to(torch.float64).clamp(min=1e-5)
    w = w_absmax.to(torch.float64).clamp(min=1e-5)
    return (x.pow(alpha) / w.pow(1 - alpha)).clamp(1e-5, 1e5)


def balanced_error(
    w: torch.Tensor,
    x: torch.Tensor,
    text_mask: torch.Tensor,
    e: torch.Tensor,
    scheme: SplitQScheme,
    g_text: float,
    g_vision: float,
    text_scale: float = 1.0,
    vision_scale: float = 1.0,
) -> float:
    """Eq. 13-14 for one E: |g_v| sum_v |dY| * vision_scale + |g_l| sum_l |dY| * text_scale
    (w: (out, in), x: (N, in); activations per token, weights per output row, as SplitQ does)."""
    e = e.to(torch.float32)
    y = x @ w.transpose(0, 1)
    xq = fake_quantize(x / e, scheme.act_bits, scheme.act_symmetric, dim=-1)
    wq = fake_quantize(w * e, scheme.weight_bits, True, dim=1)
    err = (xq @ wq.transpose(0, 1) - y).abs().sum(1)
    return float(g_text * text_scale * err[text_mask].sum() + g_vision * vision_scale * err[~text_mask].sum())


def search_alpha(
    w: torch.Tensor,
    x: torch.Tensor,
    text_mask: torch.Tensor,
    x_absmax: torch.Tensor,
    scheme: SplitQScheme,
    g_text: float,
    g_vision: float,
    grid: int = 20,
    text_scale: float = 1.0,
    vision_scale: float = 1.0,
) -> tuple[float, torch.Tensor, list[float]]:
    """The grid point with the least modality-balanced error: (alpha, E, error per grid point);
    ties go to the smaller alpha."""
    w = w.to(torch.float32)
    x = x.to(torch.float32)
    w_max = column_absmax(w)
    errors = []
    with torch.no_grad():
        for a in alpha_grid(grid):
            e = equalization(w_max, x_absmax, a)
            errors.append(balanced_error(w, x, text_mask, e, scheme, g_text, g_vision, text_scale, vision_scale))
    best = min(range(len(errors)), key=lambda i: (errors[i], i))
    a = alpha_grid(grid)[best]
    return a, equalization(w_max, x_absmax, a), errors


def calibrate_group(
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    samples: GroupSamples,
    stats: ChannelStats,
    g_text: float,
    g_vision: float,
    cfg: CalibrationConfig,
    gen: torch.Generator,
) -> tuple[SplitQLinear, dict]:
    """MBQ for one group: the searched E as the SplitQ main smoothing, then quantized."""
    x, m = samples.x.to(weight.device), samples.text_mask.to(weight.device)
    n_t, n_v = int(m.sum()), int((~m).sum())
    alpha, e, errors = search_alpha(
        weight, x, m, stats.absmax.to(weight.device), cfg.quant_scheme, g_text, g_vision, cfg.mbq_grid,
        text_scale=samples.n_text_total / max(n_t, 1), vision_scale=samples.n_vision_total / max(n_v, 1),
    )  # fmt: skip
    params = plain_params(weight, bias, stats, cfg, gen)
    with torch.no_grad():
        params.smooth.copy_((1.0 / e).to(params.smooth))
    info = {"alpha": alpha, "g_text": g_text, "g_vision": g_vision, "search_errors": errors}
    return params.quantized(), info
