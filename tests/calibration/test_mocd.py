"""MOCD (the paper's Eq. 7-12) against a direct, loop-by-loop implementation of the equations, on
planted data: vision outliers by magnitude, text outliers by unstable per-token ranks."""

import math
from fractions import Fraction

import pytest
import torch

from splitq_calibration.mocd import (
    ChannelStats,
    kmeans_within_variance,
    mocd_select,
    percentile_ranks,
    select_channels,
    text_row_plan,
)

D = 48
VISION_OUTLIERS = [5, 17, 40]
TEXT_OUTLIERS = [2, 23, 31, 44]


def planted(seed: int = 0):
    """Rows of |x|: every channel has a stable typical magnitude (its rank barely moves from token
    to token), except TEXT_OUTLIERS, whose magnitude jumps around on text tokens, and
    VISION_OUTLIERS, which are huge on vision tokens."""
    g = torch.Generator().manual_seed(seed)
    base = torch.logspace(-1, 1, D, dtype=torch.float64)[torch.randperm(D, generator=g)]
    n_t, n_v = 120, 60
    text = base * torch.exp(0.02 * torch.randn(n_t, D, generator=g, dtype=torch.float64))
    for c in TEXT_OUTLIERS:
        text[:, c] = torch.logspace(-0.8, 0.8, n_t, dtype=torch.float64)[torch.randperm(n_t, generator=g)]
    vision = base * torch.exp(0.3 * torch.randn(n_v, D, generator=g, dtype=torch.float64))
    for j, c in enumerate(VISION_OUTLIERS):
        vision[:, c] *= 40.0 + 10 * j
    x = torch.cat([text, vision]) * torch.where(torch.rand(n_t + n_v, D, generator=g) < 0.5, -1.0, 1.0)
    mask = torch.cat([torch.ones(n_t, dtype=torch.bool), torch.zeros(n_v, dtype=torch.bool)])
    return x, mask


# ---- a direct implementation of Eq. 7-12, written to be read, not to be fast ------------------


def direct_kmeans_variance(values: list, k: int) -> Fraction:
    """Lloyd's k-means of one channel in exact rational arithmetic; ties to the lower centre."""
    values = [Fraction(v) for v in values]
    n = len(values)
    srt = sorted(values)
    centres = [srt[min(n - 1, int((j + 0.5) / k * n))] for j in range(k)]
    assign = None
    for _ in range(100):
        new = []
        for v in values:  # nearest centre, ties to the lower index
            best = 0
            for j in range(1, k):
                if abs(v - centres[j]) < abs(v - centres[best]):
                    best = j
            new.append(best)
        if new == assign:
            break
        assign = new
        for j in range(k):
            members = [v for v, a in zip(values, assign) if a == j]
            if members:  # an empty cluster keeps its centre
                centres[j] = sum(members) / len(members)
    return sum((v - centres[a]) ** 2 for v, a in zip(values, assign)) / n


def direct_mocd(x: torch.Tensor, text_mask: torch.Tensor, k_t: int, k_v: int, k: int):
    rows = x.abs().tolist()
    is_text = text_mask.tolist()
    vision_rows = [r for r, t in zip(rows, is_text) if not t]
    text_rows = [r for r, t in zip(rows, is_text) if t]
    channels = list(range(len(rows[0])))
    # Eq. 7-8: s_v(c) = max over vision tokens of |x_ic|, top K_v
    s_v = {c: max(r[c] for r in vision_rows) for c in channels}
    c_v = sorted(channels, key=lambda c: (-s_v[c], c))[:k_v]
    rest = [c for c in channels if c not in c_v]
    # Eq. 9: r_ic = (1/|C'|) sum_{j in C'} 1(|x_ij| <= |x_ic|)
    ranks = {c: [Fraction(sum(1 for j in rest if r[j] <= r[c]), len(rest)) for r in text_rows] for c in rest}
    # Eq. 10: within-cluster variance of the k-means clustering of each channel's ranks
    s_t = {c: direct_kmeans_variance(ranks[c], k) for c in rest}
    # Eq. 11-12
    c_t = sorted(rest, key=lambda c: (-s_t[c], c))[:k_t]
    return sorted(c_t), sorted(c_v), s_v, s_t


@pytest.mark.parametrize("k", [1, 3, 5])
def test_mocd_matches_the_equations_and_finds_the_planted_channels(k):
    x, mask = planted()
    k_t, k_v = len(TEXT_OUTLIERS), len(VISION_OUTLIERS)
    st = ChannelStats.empty(D)
    st.update(x.float(), mask, torch.nonzero(mask).reshape(-1))
    idx_t, idx_v, scores = mocd_select(st.vision_absmax, st.text_matrix(), k_t, k_v, k, st.n_vision)
    d_t, d_v, s_v, s_t = direct_mocd(x.float().double(), mask, k_t, k_v, k)
    assert idx_v.tolist() == d_v == sorted(VISION_OUTLIERS)
    assert idx_t.tolist() == d_t == sorted(TEXT_OUTLIERS)
    for c, v in s_v.items():
        assert math.isclose(float(scores["s_v"][c]), v, rel_tol=1e-6)
    for c, v in s_t.items():
        assert math.isclose(float(scores["s_t"][c]), float(v), rel_tol=1e-9, abs_tol=1e-15), c
    assert all(math.isnan(float(scores["s_t"][c])) for c in VISION_OUTLIERS)  # C_t is chosen from C' only
    # through the rule dispatcher as calibration calls it
    t2, v2 = select_channels(st, "mocd", k_t, k_v, k)
    assert t2.tolist() == idx_t.tolist() and v2.tolist() == idx_v.tolist()


def test_text_outliers_are_not_the_largest_text_channels():
    """The planted text outliers are picked for unstable ranks, not magnitude: text_max picks others."""
    x, mask = planted()
    st = ChannelStats.empty(D)
    st.update(x.float(), mask, torch.nonzero(mask).reshape(-1))
    t_max, _ = select_channels(st, "text_max", len(TEXT_OUTLIERS), 0)
    assert set(t_max.tolist()) != set(TEXT_OUTLIERS)


def test_vectorised_pieces_against_direct_formulas():
    g = torch.Generator().manual_seed(1)
    a = torch.randint(0, 5, (7, 9), generator=g).float()  # many ties
    r = percentile_ranks(a)
    for i in range(7):
        for c in range(9):
            assert r[i, c] == sum(1 for j in range(9) if a[i, j] <= a[i, c]) / 9
    # k-means against exact arithmetic on integer data with many ties (MOCD passes rank counts)
    vals = torch.randint(0, 7, (40, 30), generator=g)
    vals[:, :5] = torch.randint(0, 2, (40, 5), generator=g)  # two values: centres collide
    for k in (1, 2, 3, 5):
        kv = kmeans_within_variance(vals, k)
        for c in range(30):
            assert math.isclose(
                float(kv[c]), float(direct_kmeans_variance(vals[:, c].tolist(), k)), rel_tol=1e-12, abs_tol=1e-15
            ), (k, c)
    # k = 1 is the plain (population) variance
    fl = torch.rand(50, 6, generator=g, dtype=torch.float64)
    assert torch.allclose(kmeans_within_variance(fl, 1), fl.var(0, unbiased=False))


def test_other_rules_and_counts():
    x, mask = planted()
    st = ChannelStats.empty(D)
    st.update(x.float(), mask, torch.nonzero(mask).reshape(-1))
    t, v = select_channels(st, "none", 4, 3)
    assert t.numel() == v.numel() == 0
    t, v = select_channels(st, "vision_max", 2, 3)
    assert v.tolist() == sorted(VISION_OUTLIERS) and len(set(t.tolist()) & set(v.tolist())) == 0 and t.numel() == 2
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    assert [a.tolist() for a in select_channels(st, "random", 4, 3, generator=g1)] == [
        a.tolist() for a in select_channels(st, "random", 4, 3, generator=g2)
    ]
    for rule in ("text_max", "multi_max", "multi_mean", "random"):
        t, v = select_channels(st, rule, 4, 3, generator=torch.Generator().manual_seed(0))
        assert t.numel() == 4 and v.numel() == 3 and not set(t.tolist()) & set(v.tolist()), rule
    # no vision tokens: MOCD says so instead of picking arbitrary channels
    st2 = ChannelStats.empty(D)
    st2.update(x[mask].float(), mask[mask], torch.arange(int(mask.sum())))
    with pytest.raises(ValueError, match="vision tokens"):
        select_channels(st2, "mocd", 2, 2)


def test_text_row_plan_caps_and_is_seeded():
    masks = [torch.tensor([True, False, True, True]), torch.tensor([True] * 6), torch.tensor([False, True])]
    full = text_row_plan(masks, 100, 0)
    assert [p.tolist() for p in full] == [[0, 2, 3], [0, 1, 2, 3, 4, 5], [1]]
    capped = text_row_plan(masks, 4, 0)
    assert sum(p.numel() for p in capped) == 4
    assert [p.tolist() for p in capped] == [p.tolist() for p in text_row_plan(masks, 4, 0)]
    assert all(set(c.tolist()) <= set(f.tolist()) for c, f in zip(capped, full))
