"""One tensor-parallel rank of a row-parallel layer on the Triton kernels (reference: reference/shard.py).

Built from the existing split ops, no kernel of its own:
1. `torch.ops.splitq.quantize_input` (kernel (a)) on the whole input X with the rank's kernel layer
   `kl` (prepared from the rank's reference layer: the full input side, main words of its block);
2. the block's columns of the main codes (and, on rank 0, the outlier codes behind them, at the
   offsets kernel (b) expects for a main range of the block's width);
3. `torch.ops.splitq.gemm` (kernel (b)) on `gemm_shard_layer(kl, shard)`: main K = the block's
   width; on ranks other than 0 no outlier ranges, no low-rank branches, no bias.
The partial outputs of the ranks sum to `splitq_linear_triton`'s output up to float summation order.
"""

from __future__ import annotations

from dataclasses import replace

import torch

from . import ops  # noqa: F401  (registers torch.ops.splitq.quantize_input / gemm / linear_w4a16_shard)
from .decode_mode import uses_w4a16
from .layout import KernelLayer
from .reference.shard import KShard

_REST = ("idx_text", "text_p", "idx_vision", "vision_p", "cws_down", "cws_down_scale", "cws_down_colsum", "mac_down",
         "mac_down_scale", "mac_down_colsum", "text_words", "text_wscale", "text_colsum", "vision_words",
         "vision_wscale", "vision_colsum", "cws_up", "cws_up_scale", "mac_up", "mac_up_scale", "bias")  # fmt: skip


def _align16(n: int) -> int:
    return -(-n // 16) * 16  # kernel (a)'s code columns: every range starts 16-aligned (code_offsets)


def gemm_shard_layer(kl: KernelLayer, shard: KShard) -> KernelLayer:
    """Kernel (b)'s view of one rank: `kl` is the rank's kernel layer (its main words hold the
    block, `kl.main` the full main range for kernel (a))."""
    gemm = replace(kl, main=shard.width)
    if not shard.owns_rest:
        gemm = replace(gemm, text=0, vision=0, cws_rank=0, mac_rank=0, **{name: None for name in _REST})
    return gemm


def shard_codes(codes: torch.Tensor, kl: KernelLayer, gemm: KernelLayer, shard: KShard) -> torch.Tensor:
    """Kernel (a)'s codes [T, main | text | vision] (16-aligned ranges) -> kernel (b)'s for the
    shard: the block's main columns, then (rank 0) the outlier columns at 16-aligned offsets."""
    block = codes[:, shard.start : shard.stop]
    if not (gemm.text or gemm.vision):
        return block  # a strided view: kernel (b) reads rows with codes.stride(0)
    off_t, off_v = _align16(kl.main), _align16(kl.main) + _align16(kl.text)
    g_t = _align16(gemm.main)
    g_v = g_t + _align16(gemm.text)
    out = torch.zeros(codes.shape[0], g_v + _align16(gemm.vision), dtype=codes.dtype, device=codes.device)
    out[:, : gemm.main] = block
    out[:, g_t : g_t + gemm.text] = codes[:, off_t : off_t + kl.text]
    out[:, g_v : g_v + gemm.vision] = codes[:, off_v : off_v + kl.vision]
    return out


def splitq_linear_triton_shard(
    x: torch.Tensor, text_mask: torch.Tensor | None, kl: KernelLayer, gemm: KernelLayer, shard: KShard
) -> torch.Tensor:
    """One rank's partial output: x [T, in_features] (the whole input), kl / gemm as above.
    SPLITQ_DECODE_MODE=w4a16 at <= 16 rows: the W4A16 form's partial output (triton/w4a16.py)."""
    if uses_w4a16(x.shape[0]):
        return torch.ops.splitq.linear_w4a16_shard(
            x, kl.tensors(), kl.meta(), gemm.tensors(), gemm.meta(), kl.precision,
            [shard.rank, shard.size, shard.start, shard.stop],
        )
    qi = torch.ops.splitq.quantize_input(x, text_mask, kl.tensors(), kl.meta(), kl.precision)
    codes, scale, zero, h_cws, h_mac = qi
    return torch.ops.splitq.gemm(
        shard_codes(codes, kl, gemm, shard), scale, zero, h_cws, h_mac, gemm.tensors(), gemm.meta(), gemm.precision,
        x.dtype,
    )  # fmt: skip
