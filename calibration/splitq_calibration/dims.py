"""Sizes of a SplitQ layer: how many outlier channels, how the main set factorises, which ranks."""

from __future__ import annotations

import math


def kron_factors(n: int) -> tuple[int, int]:
    """n = n1 * n2 with n1 <= n2 as close as possible (FlatQuant's choice: 3584 -> 56 x 64)."""
    if n < 1:
        raise ValueError(f"cannot factorise {n}")
    n1 = math.isqrt(n)
    while n % n1:
        n1 -= 1
    return n1, n // n1


def factor_quality(n: int) -> float:
    """n2 / n1 of the most balanced factorisation: 1 is ideal, a prime n gives n."""
    n1, n2 = kron_factors(n)
    return n2 / n1


def outlier_counts(in_features: int, text_ratio: float, vision_ratio: float) -> tuple[int, int]:
    """(K_t, K_v) near the requested ratios, chosen so the main dimension factorises well.

    The paper's default is 2% each. Large layers keep the main dimension a multiple of 64 (what
    the kernels tile by), small ones a balanced factorisation (n2 / n1 <= 2). A zero ratio gives
    zero channels.
    """
    want_t = round(in_features * text_ratio) if text_ratio > 0 else 0
    want_v = round(in_features * vision_ratio) if vision_ratio > 0 else 0
    if text_ratio > 0:
        want_t = max(want_t, 1)
    if vision_ratio > 0:
        want_v = max(want_v, 1)
    if want_t == want_v == 0:
        return 0, 0
    best = None
    # Try total outlier counts near the requested one; split them in the requested proportion.
    total = want_t + want_v
    for delta in range(0, max(total, 8) + 1):
        for cand in (total - delta, total + delta):
            if cand < (want_t > 0) + (want_v > 0) or cand >= in_features:
                continue
            main = in_features - cand
            ok = main % 64 == 0 if in_features >= 1024 else factor_quality(main) <= 2.0
            if ok:
                kt = round(cand * want_t / total) if want_v else cand
                kt = min(max(kt, 1 if want_t else 0), cand - (1 if want_v else 0))
                best = (kt, cand - kt)
                break
        if best:
            return best
    raise ValueError(f"no outlier count near {total} leaves a well-factorising main dimension of {in_features}")


def rank_for(in_features: int, out_features: int, ratio: float) -> int:
    """Rank `ratio` of the full rank min(D_in, D_out), at least 1 when ratio > 0."""
    if ratio <= 0:
        return 0
    return max(1, round(min(in_features, out_features) * ratio))
