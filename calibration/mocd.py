"""Modality-specific Outlier Channel Decoupling (the paper's Eq. 7-12) and the other channel
selection rules of its Table 4, on per-channel statistics of one linear-input group.

MOCD, vectorised over channels:
- vision (Eq. 7-8): s_v(c) = max over vision tokens of |x_c|; C_v = the K_v channels with the
  largest s_v.
- text (Eq. 9-11), on the remaining channels C' = C \\ C_v: per text token i, the percentile rank
  r_ic = |{j in C' : |x_ij| <= |x_ic|}| / |C'|; per channel, 1-D k-means (k clusters) of its
  rank sequence over the text tokens; s_t(c) = mean over tokens of (r_ic - centre of its
  cluster)^2 (the within-cluster variance); C_t = the K_t channels of C' with the largest s_t.
- C_m = the rest (Eq. 12).

Choices the paper leaves open, fixed here so results are reproducible:
- k-means: centres start at the (j + 1/2)/k quantiles of the channel's ranks (the order
  statistic floor((j + 1/2) N / k), no randomness); Lloyd iterations until no assignment changes (at most
  `max_iter`); a token goes to the nearest centre, ties to the lower centre index; an empty
  cluster keeps its centre.
- Top-K ties go to the lower channel index (stable sort).
- The text statistics use at most `mocd_max_tokens` text tokens (a seeded sample of the
  calibration set's text tokens, the same for every layer); the vision maximum uses every vision
  token.
- Single-score rules (text_max, vision_max, multi_max, multi_mean, random) pick K_t + K_v
  channels in score order; the first K of the named modality's count go to that modality's set
  (text_max: K_t to the text set; the others: K_v to the vision set), the next to the other set.
  Both outlier paths run on every token, so the split only decides which small transform a
  channel shares.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

KMEANS_MAX_ITER = 100
_KMEANS_ELEMENTS = 8_000_000  # N * channels * k per chunk (float64: 64 MB per temporary)
_ROW_CHUNK = 4096


class ChannelSelectionError(ValueError):
    pass


@dataclass
class ChannelStats:
    """Per-channel statistics of one layer input over the calibration tokens (float32, CPU)."""

    absmax: torch.Tensor
    text_absmax: torch.Tensor
    vision_absmax: torch.Tensor
    abssum: torch.Tensor  # float64
    n_tokens: int = 0
    n_text: int = 0
    n_vision: int = 0
    text_rows: list[torch.Tensor] = field(default_factory=list)  # sampled |x| of text tokens

    @classmethod
    def empty(cls, d: int) -> "ChannelStats":
        z = torch.zeros(d, dtype=torch.float32)
        return cls(z.clone(), z.clone(), z.clone(), torch.zeros(d, dtype=torch.float64))

    def update(self, x: torch.Tensor, text_mask: torch.Tensor, keep_text_rows: torch.Tensor | None) -> None:
        """x: (T, D) one sample's input rows; keep_text_rows: positions (into T) to keep for MOCD."""
        a = x.detach().reshape(-1, x.shape[-1]).abs().float()
        m = text_mask.reshape(-1).to(a.device)
        self.absmax = torch.maximum(self.absmax, a.amax(0).cpu())
        self.abssum += a.sum(0, dtype=torch.float64).cpu()
        self.n_tokens += a.shape[0]
        if bool(m.any()):
            self.text_absmax = torch.maximum(self.text_absmax, a[m].amax(0).cpu())
            self.n_text += int(m.sum())
        if bool((~m).any()):
            self.vision_absmax = torch.maximum(self.vision_absmax, a[~m].amax(0).cpu())
            self.n_vision += int((~m).sum())
        if keep_text_rows is not None and keep_text_rows.numel():
            self.text_rows.append(a[keep_text_rows.to(a.device)].cpu())

    @property
    def absmean(self) -> torch.Tensor:
        return (self.abssum / max(self.n_tokens, 1)).float()

    def text_matrix(self) -> torch.Tensor:
        if not self.text_rows:
            return torch.zeros(0, self.absmax.numel())
        return torch.cat(self.text_rows)


def text_row_plan(text_masks: list[torch.Tensor], max_tokens: int, seed: int) -> list[torch.Tensor]:
    """For each sample, the positions of its text tokens that MOCD's rank statistics use: all of
    them when the calibration set has at most `max_tokens` text tokens, else a seeded sample."""
    positions = [torch.nonzero(m.reshape(-1), as_tuple=False).reshape(-1) for m in text_masks]
    total = sum(p.numel() for p in positions)
    if total <= max_tokens:
        return positions
    gen = torch.Generator().manual_seed(seed)
    keep = torch.zeros(total, dtype=torch.bool)
    keep[torch.randperm(total, generator=gen)[:max_tokens]] = True
    out, start = [], 0
    for p in positions:
        out.append(p[keep[start : start + p.numel()]])
        start += p.numel()
    return out


# ---------------------------------------------------------------------------------------------
# The MOCD statistics
# ---------------------------------------------------------------------------------------------


def percentile_ranks(absx: torch.Tensor) -> torch.Tensor:
    """Eq. 9: r_ic = |{j : a_ij <= a_ic}| / C for a (N, C) matrix of magnitudes (per row).

    float64, so the ranks are the exact fractions the equation defines (k-means assignments at
    a midpoint between two centres would otherwise depend on float32 rounding)."""
    n, c = absx.shape
    out = torch.empty(n, c, dtype=torch.float64, device=absx.device)
    for s in range(0, n, _ROW_CHUNK):
        rows = absx[s : s + _ROW_CHUNK].float().contiguous()
        srt = rows.sort(dim=1).values
        out[s : s + _ROW_CHUNK] = torch.searchsorted(srt, rows, right=True).to(torch.float64) / c
    return out


def kmeans_within_variance(r: torch.Tensor, k: int, max_iter: int = KMEANS_MAX_ITER) -> torch.Tensor:
    """Eq. 10 for every column of r (N tokens, C channels): 1-D k-means of the column, then the
    mean squared distance of each value to its cluster centre. Returns (C,) float64."""
    n, c = r.shape
    if n == 0:
        raise ChannelSelectionError("MOCD needs text tokens, the calibration data has none")
    out = torch.empty(c, dtype=torch.float64, device=r.device)
    qidx = torch.tensor([min(n - 1, int((j + 0.5) / k * n)) for j in range(k)], device=r.device)
    chunk = max(1, _KMEANS_ELEMENTS // (n * k))
    for s in range(0, c, chunk):
        x = r[:, s : s + chunk].to(torch.float64)  # (N, c')
        centres = x.sort(dim=0).values[qidx].transpose(0, 1).contiguous()  # (c', k)
        assign = None
        for _ in range(max_iter):
            dist = (x.unsqueeze(-1) - centres.unsqueeze(0)).abs()  # (N, c', k)
            new = dist.argmin(dim=-1)  # first minimum: ties to the lower centre
            if assign is not None and torch.equal(new, assign):
                break
            assign = new
            onehot = torch.nn.functional.one_hot(assign, k).to(torch.float64)  # (N, c', k)
            counts = onehot.sum(0)
            sums = (onehot * x.unsqueeze(-1)).sum(0)
            centres = torch.where(counts > 0, sums / counts.clamp(min=1), centres)
        mu = centres.gather(1, assign.transpose(0, 1)).transpose(0, 1)  # (N, c')
        out[s : s + chunk] = ((x - mu) ** 2).mean(0)
    return out


def _top(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the k largest scores (ties to the lower index)."""
    return torch.sort(scores, descending=True, stable=True).indices[:k]


def mocd_select(
    vision_absmax: torch.Tensor, text_abs_rows: torch.Tensor, k_text: int, k_vision: int, k: int = 3, n_vision: int = 1
) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """Eq. 7-12. Returns (idx_text, idx_vision) sorted, and the scores (s_v over C, s_t over C')."""
    d = vision_absmax.numel()
    if k_vision and n_vision == 0:
        raise ChannelSelectionError("MOCD needs vision tokens to pick vision outlier channels; the calibration data has none")
    idx_v = _top(vision_absmax, k_vision)
    keep = torch.ones(d, dtype=torch.bool)
    keep[idx_v] = False
    rest = torch.nonzero(keep).reshape(-1)  # C' in channel order
    s_t = torch.full((d,), float("nan"), dtype=torch.float64)
    if k_text:
        r = percentile_ranks(text_abs_rows[:, rest])
        s_rest = kmeans_within_variance(r, k)
        s_t[rest] = s_rest.cpu()
        idx_t = rest[_top(s_rest.cpu(), k_text)]
    else:
        idx_t = torch.zeros(0, dtype=torch.long)
    return idx_t.sort().values, idx_v.sort().values, {"s_v": vision_absmax, "s_t": s_t}


def select_channels(
    stats: ChannelStats, rule: str, k_text: int, k_vision: int, k: int = 3, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(idx_text, idx_vision), sorted int64, by one of the rules of Table 4."""
    d = stats.absmax.numel()
    if rule == "none" or k_text + k_vision == 0:
        z = torch.zeros(0, dtype=torch.long)
        return z, z.clone()
    if rule == "mocd":
        idx_t, idx_v, _ = mocd_select(stats.vision_absmax, stats.text_matrix(), k_text, k_vision, k, stats.n_vision)
        return idx_t, idx_v
    if rule == "random":
        order = torch.randperm(d, generator=generator)
        first_is = "vision"
    elif rule == "text_max":
        order, first_is = _top(stats.text_absmax, d), "text"
    elif rule == "vision_max":
        if stats.n_vision == 0:
            raise ChannelSelectionError("vision_max needs vision tokens; the calibration data has none")
        order, first_is = _top(stats.vision_absmax, d), "vision"
    elif rule == "multi_max":
        order, first_is = _top(stats.absmax, d), "vision"
    elif rule == "multi_mean":
        order, first_is = _top(stats.absmean, d), "vision"
    else:
        raise ChannelSelectionError(f"unknown channel selection rule {rule!r}")
    if first_is == "text":
        idx_t, idx_v = order[:k_text], order[k_text : k_text + k_vision]
    else:
        idx_v, idx_t = order[:k_vision], order[k_vision : k_vision + k_text]
    return idx_t.sort().values, idx_v.sort().values
