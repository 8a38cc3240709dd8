"""Synthetic SplitQ checkpoints: every part of the format non-trivial, no calibration data needed.

For tests and benchmarks of the serving path: each linear group of a real model gets random
outlier sets, random well-conditioned transforms folded into its real weights, and CWS/MAC
branches initialised from the SVD of its weights as in Eq. 20-21 (gates 1). The model still
computes (up to quantization error) what the source model computes, so served answers are
comparable, but nothing is learned: calibrate for real use.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from splitq_calibration.dims import kron_factors, outlier_counts, rank_for
from splitq_calibration.export import export_checkpoint
from splitq_calibration.lowrank import constrained_factors, svd_basis
from splitq_kernels.reference import (
    SplitQFloatLinear,
    SplitQScheme,
    fold_dense_weight,
    fold_main_weight,
    quantize_linear,
)
from splitq_vllm.model_layout import group_weight, linear_groups, source_tensor_files


def _transform(n: int, gen: torch.Generator) -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=torch.float64))
    return (q * torch.empty(n, dtype=torch.float64).uniform_(0.7, 1.4, generator=gen)).contiguous()


def synthetic_float_layer(
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    gen: torch.Generator,
    text_ratio: float = 0.03,
    vision_ratio: float = 0.03,
    cws_ratio: float = 0.05,
    mac_ratio: float = 0.05,
    act_clip: float = 1.0,
) -> SplitQFloatLinear:
    """A float SplitQ layer around a real weight (out, in) with random sets and transforms."""
    out_f, in_f = weight.shape
    w = weight.to(torch.float64)
    n_t, n_v = outlier_counts(in_f, text_ratio, vision_ratio)
    perm = torch.randperm(in_f, generator=gen)
    idx_v, idx_t, idx_m = perm[:n_v].sort().values, perm[n_v : n_v + n_t].sort().values, perm[n_v + n_t :].sort().values
    n1, n2 = kron_factors(idx_m.numel())
    smooth = torch.empty(idx_m.numel(), dtype=torch.float64).uniform_(0.7, 1.4, generator=gen)
    p1, p2 = _transform(n1, gen), _transform(n2, gen)
    p_t = _transform(n_t, gen) if n_t else None
    p_v = _transform(n_v, gen) if n_v else None
    w_m = w[:, idx_m]
    branches = {}
    for name, ratio in (("cws", cws_ratio), ("mac", mac_ratio)):
        r = rank_for(idx_m.numel(), out_f, ratio)
        if r:
            u, s, v = svd_basis(w_m, r)
            branches[name] = constrained_factors(u, s, v, torch.ones(r, dtype=torch.float64), smooth, p1, p2)
    f32 = lambda t: None if t is None else t.to(torch.float32)  # noqa: E731
    clip = torch.tensor(act_clip, dtype=torch.float32)
    return SplitQFloatLinear(
        idx_main=idx_m,
        idx_text=idx_t,
        idx_vision=idx_v,
        main_smooth=f32(smooth),
        main_p1=f32(p1),
        main_p2=f32(p2),
        text_p=f32(p_t),
        vision_p=f32(p_v),
        main_act_clip=clip,
        text_act_clip=clip,
        vision_act_clip=clip,
        mac_act_clip=clip,
        main_weight=f32(fold_main_weight(w_m, smooth, p1, p2)),
        text_weight=f32(fold_dense_weight(w[:, idx_t], p_t)) if n_t else None,
        vision_weight=f32(fold_dense_weight(w[:, idx_v], p_v)) if n_v else None,
        cws_down=f32(branches["cws"][0]) if "cws" in branches else None,
        cws_up=f32(branches["cws"][1]) if "cws" in branches else None,
        mac_down=f32(branches["mac"][0]) if "mac" in branches else None,
        mac_up=f32(branches["mac"][1]) if "mac" in branches else None,
        bias=bias,
    )


def synthesize_checkpoint(
    model_dir: str | os.PathLike,
    output_dir: str | os.PathLike,
    scheme: SplitQScheme,
    seed: int = 0,
    overwrite: bool = False,
    **ratios: float,
) -> Path:
    """Write a synthetic SplitQ checkpoint of the model in `model_dir` (see the module doc)."""
    from transformers import AutoModelForImageTextToText

    model = AutoModelForImageTextToText.from_pretrained(model_dir, dtype=torch.float32)
    gen = torch.Generator().manual_seed(seed)
    quantized = {}
    for group in linear_groups(model, list(source_tensor_files(model_dir))):
        weight, bias = group_weight(model, group)
        layer = synthetic_float_layer(weight, bias, gen, **ratios)
        quantized[group.name] = (group, quantize_linear(layer, scheme))
    return export_checkpoint(
        model_dir,
        output_dir,
        quantized,
        scheme,
        calibration={"method": "synthetic", "seed": seed, "note": "random sets and transforms, no calibration"},
        overwrite=overwrite,
    )

