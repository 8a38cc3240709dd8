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
  statistic floor((j + 1/2) N / k), no randomness); Lloyd iterations until no assignment changes
  (at most `max_iter`); a token goes to the nearest centre, ties to the lower centre index; an
  empty cluster keeps its centre. Computed exactly (see kmeans_within_variance).
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


def rank_counts(absx: torch.Tensor) -> torch.Tensor:
    """|{j : a_ij <= a_ic}| for a (N, C) matrix of magnitudes, per row (int64). Eq. 9's rank is
    this count divided by C."""
    n, c = absx.shape
    out = torch.empty(n, c, dtype=torch.int64, device=absx.device)
    for s in range(0, n, _ROW_CHUNK):
        rows = absx[s : s + _ROW_CHUNK].float().contiguous()
        srt = rows.sort(dim=1).values
        out[s : s + _ROW_CHUNK] = torch.searchsorted(srt, rows, right=True)
    return out


def percentile_ranks(absx: torch.Tensor) -> torch.Tensor:
    """Eq. 9: r_ic = |{j : a_ij <= a_ic}| / C (float64)."""
    return rank_counts(absx).to(torch.float64) / absx.shape[1]


def kmeans_within_variance(values: torch.Tensor, k: int, max_iter: int = KMEANS_MAX_ITER) -> torch.Tensor:
    """Eq. 10 for every column of `values` (N tokens, C channels): 1-D k-means (Lloyd) of the
    column, then the mean squared distance of each value to its cluster centre. (C,) float64.

    Exact 1-D k-means, vectorised over channels: each column is sorted once; with sorted centres
    a cluster is a contiguous run of the sorted values, found by binary search of the midpoints
    between neighbouring centres, and its sum comes from prefix sums, so an iteration costs
    O(k log N) per channel. A value goes to the nearest centre, a tie (a value exactly at a
    midpoint, or several equal centres) to the lowest centre index. Midpoint ties are decided
    with a tolerance of 1/(4 N^2): for integer-valued data (MOCD passes rank counts, Eq. 9's ranks
    times |C'|, which k-means treats identically up to scale) a value off a midpoint is at least
    2/N^2 away from it, so the assignments are those of exact rational arithmetic.
    """
    n, c = values.shape
    if n == 0:
        raise ChannelSelectionError("MOCD needs text tokens, the calibration data has none")
    out = torch.empty(c, dtype=torch.float64, device=values.device)
    qidx = torch.tensor([min(n - 1, int((j + 0.5) / k * n)) for j in range(k)], device=values.device)
    tol = 0.25 / (n * n)
    chunk = max(1, _KMEANS_ELEMENTS // (n * k))
    ar = torch.arange(k, device=values.device)
    for s in range(0, c, chunk):
        xs = values[:, s : s + chunk].transpose(0, 1).to(torch.float64).sort(dim=1).values.contiguous()  # (c', N)
        m = xs.shape[0]
        prefix = torch.cat([torch.zeros(m, 1, dtype=torch.float64, device=xs.device), xs.cumsum(1)], 1)
        centres = xs[:, qidx]  # (c', k), ascending (and they stay sorted under Lloyd in 1-D)
        zero = torch.zeros(m, 1, dtype=torch.int64, device=xs.device)
        full = torch.full((m, 1), n, dtype=torch.int64, device=xs.device)
        state = None
        for _ in range(max_iter):
            first, bounds = _segments(xs, centres, tol, ar)
            if state is not None and torch.equal(first, state[0]) and torch.equal(bounds, state[1]):
                break
            state = (first, bounds)
            edges = torch.cat([zero, bounds, full], 1)  # segment j = sorted positions [edges_j, edges_j+1)
            seg_counts = (edges[:, 1:] - edges[:, :-1]).to(torch.float64)
            seg_sums = prefix.gather(1, edges[:, 1:]) - prefix.gather(1, edges[:, :-1])
            counts = torch.zeros_like(seg_counts).scatter_add_(1, first, seg_counts)  # segments of equal
            sums = torch.zeros_like(seg_sums).scatter_add_(1, first, seg_sums)  # centres -> lowest index
            centres = torch.where(counts > 0, sums / counts.clamp(min=1), centres)
        first, bounds = state
        pos = torch.arange(n, device=xs.device)
        seg = (pos[None, None, :] >= bounds[:, :, None]).sum(1)  # (c', N) segment of each sorted value
        mu = centres.gather(1, first.gather(1, seg))
        out[s : s + m] = ((xs - mu) ** 2).mean(1)
    return out


def _segments(
    xs: torch.Tensor, centres: torch.Tensor, tol: float, ar: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Nearest-centre assignment of sorted values to sorted centres, ties to the lower index.

    Returns (first, bounds): segment j of the sorted values (bounded by the midpoints between
    centres j-1, j and j, j+1) goes to cluster first[j], the lowest index whose centre equals
    centre j; bounds[:, i] = how many values lie at or below the i-th midpoint (+ tol)."""
    mids = (centres[:, :-1] + centres[:, 1:]) / 2 + tol
    bounds = torch.searchsorted(xs, mids.contiguous(), right=True)
    new = torch.ones_like(centres, dtype=torch.bool)
    new[:, 1:] = centres[:, 1:] != centres[:, :-1]
    first = torch.where(new, ar.expand_as(centres), torch.zeros_like(ar).expand_as(centres)).cummax(1).values
    return first, bounds


def _top(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the k largest scores (ties to the lower index)."""
    return torch.sort(scores, descending=True, stable=True).indices[:k]


def mocd_select(
    vision_absmax: torch.Tensor,
    text_abs_rows: torch.Tensor,
    k_text: int,
    k_vision: int,
    k: int = 3,
    n_vision: int = 1,
    device: torch.device | str = "cpu",
) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """Eq. 7-12. Returns (idx_text, idx_vision) sorted, and the scores (s_v over C, s_t over C').
    The rank statistics run on `device` (the accelerator, when there is one)."""
    d = vision_absmax.numel()
    if k_vision and n_vision == 0:
        raise ChannelSelectionError(
            "MOCD needs vision tokens to pick vision outlier channels; the calibration data has none"
        )
    idx_v = _top(vision_absmax, k_vision)
    keep = torch.ones(d, dtype=torch.bool)
    keep[idx_v] = False
    rest = torch.nonzero(keep).reshape(-1)  # C' in channel order
    s_t = torch.full((d,), float("nan"), dtype=torch.float64)
    if k_text:
        counts = rank_counts(text_abs_rows[:, rest].to(device))
        s_rest = kmeans_within_variance(counts, k).cpu() / float(rest.numel()) ** 2  # back to Eq. 9's rank scale
        s_t[rest] = s_rest.cpu()
        idx_t = rest[_top(s_rest.cpu(), k_text)]
    else:
        idx_t = torch.zeros(0, dtype=torch.long)
    return idx_t.sort().values, idx_v.sort().values, {"s_v": vision_absmax, "s_t": s_t}


def select_channels(
    stats: ChannelStats,
    rule: str,
    k_text: int,
    k_vision: int,
    k: int = 3,
    generator: torch.Generator | None = None,
    device: torch.device | str = "cpu",
) -> tuple[torch.Tensor, torch.Tensor]:
    """(idx_text, idx_vision), sorted int64, by one of the rules of Table 4."""
    d = stats.absmax.numel()
    if rule == "none" or k_text + k_vision == 0:
        z = torch.zeros(0, dtype=torch.long)
        return z, z.clone()
    if rule == "mocd":
        idx_t, idx_v, _ = mocd_select(
            stats.vision_absmax, stats.text_matrix(), k_text, k_vision, k, stats.n_vision, device
        )
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
