"""Tensor parallelism of a row-parallel SplitQ layer: one rank's contiguous block of the main K range.

Row-parallel layers (o_proj, down_proj) are split over the input dimension. SplitQ's input side
(channel sets, transforms, per-token quantizers) spans the whole input, so every rank runs it on
the whole input X (all-gathered), identically, and then multiplies only its block [start, stop)
of the main K range -- in the transformed coordinates, i.e. columns of Q(X_m P_m) and of the
packed main weight -- with its block of the main weight. Per-token activation scales and
per-output-channel weight scales factor out of the sum over K, so the partial outputs of the
ranks sum to the TP=1 output (up to float summation order). The rest (text and vision outlier
products, the CWS and MAC low-rank branches, whose "down" products were formed on the full input,
and the bias) is added by rank 0 only ("owns_rest").

A rank's layer (`shard_layer`) is a SplitQLinear whose `main_w` holds only its block's columns;
every other field is the full layer's (the input side is needed on every rank; the outlier
weights and the low-rank "up" factors are small and kept on every rank too, so that every rank's
layer has the full layer's structure: the kernels' layout of kernel (a) is the same on all ranks).

Blocks start on multiples of `SHARD_ALIGN` = 8 codes: the checkpoint packs 8 codes of b bits in b
bytes (docs/format.md, "Packing"), so a rank can read exactly its bytes of a packed row. Each
block has ceil(main / tp) codes rounded up to that multiple; the last block takes what is left
and is never empty (else the TP size is refused).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from .layer import SplitQLinear
from .quantizer import QuantizedTensor

SHARD_ALIGN = 8


class ShardError(ValueError):
    """A tensor-parallel size that cannot split a layer's main K range."""


@dataclass(frozen=True)
class KShard:
    """Rank `rank` of `size`: main columns [start, stop); rank 0 owns the rest of the layer."""

    rank: int
    size: int
    start: int
    stop: int

    @property
    def owns_rest(self) -> bool:
        return self.rank == 0

    @property
    def width(self) -> int:
        return self.stop - self.start


def shard_block(main: int, size: int) -> int:
    """Codes per block (all blocks but the last) for `size` ranks."""
    per = -(-main // size)
    return -(-per // SHARD_ALIGN) * SHARD_ALIGN


def can_shard(main: int, size: int) -> bool:
    """Whether `size` ranks each get a non-empty block of a main range of `main` codes."""
    return size >= 1 and main > (size - 1) * shard_block(main, size)


def working_sizes(main: int, up_to: int = 16) -> list[int]:
    return [s for s in range(1, up_to + 1) if can_shard(main, s)]


def main_k_shards(main: int, size: int, layer: str = "layer") -> list[KShard]:
    """The blocks of `size` ranks over a main K range of `main` codes (module doc)."""
    if not can_shard(main, size):
        raise ShardError(
            f"tensor parallel size {size} cannot split row-parallel layer '{layer}': its main K range has "
            f"{main} channels, and blocks of {shard_block(main, size)} (multiples of {SHARD_ALIGN}, the "
            f"packing group) leave rank {size - 1} empty; tensor parallel sizes that work for it: "
            f"{working_sizes(main)}"
        )
    block = shard_block(main, size)
    return [KShard(r, size, r * block, min(main, (r + 1) * block)) for r in range(size)]


def slice_columns(q: QuantizedTensor, start: int, stop: int) -> QuantizedTensor:
    """Columns [start, stop) of per-row quantized codes (the scales and zero points are per row)."""
    return QuantizedTensor(q.codes[:, start:stop], q.scale, q.zero, q.bits)


def shard_layer(layer: SplitQLinear, shard: KShard) -> SplitQLinear:
    """One rank's layer (module doc): main_w cut to the block's columns, the rest unchanged."""
    return replace(layer, main_w=slice_columns(layer.main_w, shard.start, shard.stop))
