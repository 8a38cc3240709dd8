"""SplitQ layers for tests and benchmarks: random ones of any shape and channel split, and hand-built
ones whose every float32 step is exact (`exact_tie_case`, for the kernels' rounding-tie tests)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from splitq_kernels.reference import (
    QuantizedTensor,
    SplitQFloatLinear,
    SplitQLinear,
    SplitQScheme,
    fold_dense_weight,
    fold_main_weight,
    qrange,
    quantize_linear,
)


def _well_conditioned(n: int, gen: torch.Generator, dtype: torch.dtype) -> torch.Tensor:
    """A random invertible matrix: orthogonal times a mild diagonal, like a trained transform."""
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=torch.float64))
    d = torch.empty(n, dtype=torch.float64).uniform_(0.5, 2.0, generator=gen)
    return (q * d).to(dtype).contiguous()


def _random_partition(
    in_features: int, n_text: int, n_vision: int, kron: tuple[int, int], gen: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Random disjoint (main, text, vision) channel sets, each sorted; kron must factor the main set."""
    d_main = in_features - n_text - n_vision
    if kron[0] * kron[1] != d_main:
        raise ValueError(f"kron {kron} does not factor the main dimension {d_main}")
    perm = torch.randperm(in_features, generator=gen)
    return (
        perm[n_vision + n_text :].sort().values,
        perm[n_vision : n_vision + n_text].sort().values,
        perm[:n_vision].sort().values,
    )


def random_float_layer(
    in_features: int,
    out_features: int,
    n_text: int,
    n_vision: int,
    kron: tuple[int, int],
    cws_rank: int = 0,
    mac_rank: int = 0,
    bias: bool = True,
    act_clip: float = 1.0,
    weight_clip: bool = False,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
) -> tuple[SplitQFloatLinear, torch.Tensor]:
    """A SplitQFloatLinear with random sets, transforms and low-rank factors, and its original W.

    kron must factor the main dimension in_features - n_text - n_vision. The returned weight is
    the untransformed W (out, in), so callers can check the folding.
    """
    gen = torch.Generator().manual_seed(seed)
    idx_main, idx_text, idx_vision = _random_partition(in_features, n_text, n_vision, kron, gen)
    d_main = idx_main.numel()
    w = torch.randn(out_features, in_features, generator=gen, dtype=torch.float64) / in_features**0.5
    smooth = torch.empty(d_main, dtype=torch.float64).uniform_(0.5, 2.0, generator=gen)
    p1 = _well_conditioned(kron[0], gen, torch.float64)
    p2 = _well_conditioned(kron[1], gen, torch.float64)
    text_p = _well_conditioned(n_text, gen, torch.float64) if n_text else None
    vision_p = _well_conditioned(n_vision, gen, torch.float64) if n_vision else None
    main_weight = fold_main_weight(w[:, idx_main], smooth, p1, p2)

    def lowrank(r: int) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        if r == 0:
            return None, None
        down = torch.randn(r, d_main, generator=gen, dtype=torch.float64) / d_main**0.5
        up = torch.randn(out_features, r, generator=gen, dtype=torch.float64) * 0.1
        return down.to(dtype), up.to(dtype)

    def clip(rows: int) -> torch.Tensor | None:
        if not weight_clip:
            return None
        return torch.empty(rows, 1, dtype=torch.float64).uniform_(0.8, 1.0, generator=gen).to(dtype)

    cws_down, cws_up = lowrank(cws_rank)
    mac_down, mac_up = lowrank(mac_rank)
    t = lambda v: None if v is None else v.to(dtype)  # noqa: E731
    layer = SplitQFloatLinear(
        idx_main=idx_main,
        idx_text=idx_text,
        idx_vision=idx_vision,
        main_smooth=t(smooth),
        main_p1=t(p1),
        main_p2=t(p2),
        text_p=t(text_p),
        vision_p=t(vision_p),
        main_act_clip=torch.tensor(act_clip, dtype=dtype),
        text_act_clip=torch.tensor(act_clip, dtype=dtype),
        vision_act_clip=torch.tensor(act_clip, dtype=dtype),
        mac_act_clip=torch.tensor(act_clip, dtype=dtype),
        main_weight=t(main_weight),
        text_weight=None if not n_text else t(fold_dense_weight(w[:, idx_text], text_p)),
        vision_weight=None if not n_vision else t(fold_dense_weight(w[:, idx_vision], vision_p)),
        cws_down=cws_down,
        cws_up=cws_up,
        mac_down=mac_down,
        mac_up=mac_up,
        bias=(torch.randn(out_features, generator=gen, dtype=torch.float64) * 0.1).to(dtype) if bias else None,
        main_weight_clip=clip(out_features),
        text_weight_clip=clip(out_features) if n_text else None,
        vision_weight_clip=clip(out_features) if n_vision else None,
    )
    return layer, w.to(dtype)


def random_activations(
    rows: int, in_features: int, seed: int = 0, outlier_channels: int = 0, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """Gaussian rows with a few large-magnitude channels, so outlier paths and clipping matter."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, in_features, generator=gen, dtype=torch.float64)
    if outlier_channels:
        ch = torch.randperm(in_features, generator=gen)[:outlier_channels]
        x[:, ch] *= 20.0
    return x.to(dtype)


def random_text_masks(rows: int, seed: int) -> dict[str, torch.Tensor]:
    """The text masks every forward is tested on: all text, all vision, and a random mix."""
    gen = torch.Generator().manual_seed(seed)
    return {
        "all_text": torch.ones(rows, dtype=torch.bool),
        "all_vision": torch.zeros(rows, dtype=torch.bool),
        "mixed": torch.rand(rows, generator=gen) < 0.5,
    }


def default_layer_dims(in_features: int, out_features: int, outlier_frac: float = 0.02, cws_frac: float = 0.02,
                       mac_frac: float = 0.03, main_multiple: int = 64) -> dict:
    """The project's default channel split for a linear: outlier_frac of the channels for text and
    for vision outliers, rounded so the main dimension is the nearest multiple of main_multiple;
    Kronecker factors n1 <= n2 as close to sqrt(main) as the divisors allow; CWS / MAC ranks as
    fractions of the full rank. E.g. 3584 -> main 3456 = 54 x 64, 64 + 64 outliers, ranks 72 / 108."""
    main = int(round((in_features - 2 * outlier_frac * in_features) / main_multiple)) * main_multiple
    main = max(main_multiple, min(main, in_features - in_features % main_multiple))
    outliers = in_features - main
    n1 = max(d for d in range(1, int(main**0.5) + 1) if main % d == 0)
    full_rank = min(in_features, out_features)
    return dict(
        n_text=outliers // 2, n_vision=outliers - outliers // 2, kron=(n1, main // n1),
        cws_rank=int(round(cws_frac * full_rank)), mac_rank=int(round(mac_frac * full_rank)),
    )


def random_quantized_layer(
    in_features: int,
    out_features: int,
    n_text: int,
    n_vision: int,
    kron: tuple[int, int],
    scheme,
    cws_rank: int = 0,
    mac_rank: int = 0,
    bias: bool = True,
    seed: int = 0,
):
    """A SplitQLinear with random codes and scales (no float weights to fold): fast at real model
    shapes, for benchmarks and large-shape checks. Codes are uniform in each path's range; scales
    make every path's output O(1) for unit-variance inputs."""
    gen = torch.Generator().manual_seed(seed)
    idx_main, idx_text, idx_vision = _random_partition(in_features, n_text, n_vision, kron, gen)
    d_main = idx_main.numel()

    def weight(rows: int, cols: int, bits: int, gain: float = 1.0) -> QuantizedTensor | None:
        if rows == 0 or cols == 0:
            return None
        lo, hi = qrange(bits, True)
        codes = torch.randint(lo, hi + 1, (rows, cols), generator=gen, dtype=torch.int8)
        scale = torch.empty(rows, 1).uniform_(0.5, 1.5, generator=gen) * gain / (hi * cols**0.5)
        return QuantizedTensor(codes, scale, None, bits)

    wb, awb = scheme.weight_bits, scheme.aux_weight_bits
    f32 = torch.float32
    return SplitQLinear(
        idx_main=idx_main,
        idx_text=idx_text,
        idx_vision=idx_vision,
        main_smooth=torch.empty(d_main).uniform_(0.5, 2.0, generator=gen),
        main_p1=_well_conditioned(kron[0], gen, f32),
        main_p2=_well_conditioned(kron[1], gen, f32),
        text_p=_well_conditioned(n_text, gen, f32) if n_text else None,
        vision_p=_well_conditioned(n_vision, gen, f32) if n_vision else None,
        main_act_clip=torch.tensor(0.95),
        text_act_clip=torch.tensor(0.95),
        vision_act_clip=torch.tensor(0.95),
        mac_act_clip=torch.tensor(0.95),
        main_w=weight(out_features, d_main, wb),
        text_w=weight(out_features, n_text, awb),
        vision_w=weight(out_features, n_vision, awb),
        cws_down=weight(cws_rank, d_main, awb),
        cws_up=weight(out_features, cws_rank, awb, 0.1),
        mac_down=weight(mac_rank, d_main, awb),
        mac_up=weight(out_features, mac_rank, awb, 0.1),
        bias=torch.randn(out_features, generator=gen) * 0.1 if bias else None,
    )


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
