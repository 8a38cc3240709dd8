"""Hand-built SplitQ layers for the kernel tests (not a test module)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from splitq_kernels.reference import SplitQFloatLinear, SplitQLinear, SplitQScheme, quantize_linear


def _signed_permutation(n: int, gen: torch.Generator) -> torch.Tensor:
    p = torch.zeros(n, n, dtype=torch.float64)
    signs = torch.where(torch.rand(n, generator=gen) < 0.5, -1.0, 1.0).double()
    p[torch.arange(n), torch.randperm(n, generator=gen)] = signs
    return p


def _tie_rows(rows: int, n: int, bits: int, sym: bool, gen: torch.Generator) -> torch.Tensor:
    """Rows of half-integers whose quantization scale is exactly 1 (clip 1): every x / s is exact
    and about half of them are exact rounding ties (asymmetric: the zero point too)."""
    out = torch.empty(rows, n, dtype=torch.float64)
    for r in range(rows):
        if sym:
            qmax = 2 ** (bits - 1) - 1
            v = torch.randint(-2 * qmax, 2 * qmax + 1, (n,), generator=gen) / 2
            v[int(torch.randint(n, (1,), generator=gen))] = qmax * (1 if r % 2 else -1)
        else:
            qmax = 2**bits - 1
            low = int(torch.randint(0, qmax, (1,), generator=gen)) + 0.5
            v = torch.randint(int(-2 * low), int(2 * (qmax - low)) + 1, (n,), generator=gen) / 2
            i, j = torch.randperm(n, generator=gen)[:2].tolist()
            v[i], v[j] = -low, qmax - low
        out[r] = v
    return out


@dataclass
class ExactTieCase:
    x: torch.Tensor  # float32 input rows
    mask: torch.Tensor
    layer: SplitQLinear
    xm_t: torch.Tensor  # the transformed main rows (float64, exact half-integers)


def exact_tie_case(scheme: SplitQScheme, seed: int, rows: int = 23) -> ExactTieCase:
    """A layer whose transforms are signed permutations with power-of-two smoothing, so every
    float32 step of kernel (a) is exact in any order, and inputs whose transformed values are
    half-integers with a quantization scale of exactly 1: x / s hits exact .5 ties."""
    gen = torch.Generator().manual_seed(seed)
    n1, n2, t, v, out = 5, 6, 4, 3, 19
    m = n1 * n2
    d_in = m + t + v
    perm = torch.randperm(d_in, generator=gen)
    idx_v, idx_t, idx_m = perm[:v].sort().values, perm[v : v + t].sort().values, perm[v + t :].sort().values
    p1, p2, pt, pv = (_signed_permutation(k, gen) for k in (n1, n2, t, v))
    smooth = 2.0 ** torch.randint(-1, 2, (m,), generator=gen).double()
    one = torch.tensor(1.0, dtype=torch.float64)

    def rnd(*s):
        return torch.randn(*s, generator=gen, dtype=torch.float64)

    fl = SplitQFloatLinear(
        idx_main=idx_m, idx_text=idx_t, idx_vision=idx_v, main_smooth=smooth, main_p1=p1, main_p2=p2, text_p=pt,
        vision_p=pv, main_act_clip=one, text_act_clip=one, vision_act_clip=one, mac_act_clip=one,
        main_weight=rnd(out, m), text_weight=rnd(out, t), vision_weight=rnd(out, v), cws_down=rnd(3, m),
        cws_up=rnd(out, 3) * 0.1, mac_down=rnd(4, m), mac_up=rnd(out, 4) * 0.1, bias=rnd(out),
    )
    q = quantize_linear(fl, scheme)
    xm_t = _tie_rows(rows, m, scheme.act_bits, scheme.act_symmetric, gen)
    r = xm_t.reshape(rows, n1, n2)
    xm = (p1 @ r @ p2.T).reshape(rows, m) / smooth  # the exact inverse of P1^T R P2 (signed permutations)
    x = torch.zeros(rows, d_in, dtype=torch.float64)
    x[:, idx_m] = xm
    x[:, idx_t] = _tie_rows(rows, t, scheme.aux_act_bits, scheme.act_symmetric, gen) @ pt.T
    x[:, idx_v] = _tie_rows(rows, v, scheme.aux_act_bits, scheme.act_symmetric, gen) @ pv.T
    mask = torch.rand(rows, generator=gen) < 0.5
    return ExactTieCase(x=x.float(), mask=mask, layer=q, xm_t=xm_t)
