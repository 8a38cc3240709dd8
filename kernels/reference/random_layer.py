"""Random SplitQ layers for tests and benchmarks (any shape, any channel split)."""

from __future__ import annotations

import torch

from .layer import SplitQFloatLinear
from .transforms import fold_dense_weight, fold_main_weight


def _well_conditioned(n: int, gen: torch.Generator, dtype: torch.dtype) -> torch.Tensor:
    """A random invertible matrix: orthogonal times a mild diagonal, like a trained transform."""
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=torch.float64))
    d = torch.empty(n, dtype=torch.float64).uniform_(0.5, 2.0, generator=gen)
    return (q * d).to(dtype).contiguous()


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
    d_main = in_features - n_text - n_vision
    if kron[0] * kron[1] != d_main:
        raise ValueError(f"kron {kron} does not factor the main dimension {d_main}")
    perm = torch.randperm(in_features, generator=gen)
    idx_vision = perm[:n_vision].sort().values
    idx_text = perm[n_vision : n_vision + n_text].sort().values
    idx_main = perm[n_vision + n_text :].sort().values
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
