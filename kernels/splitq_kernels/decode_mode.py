"""SPLITQ_DECODE_MODE: which form of a SplitQ layer runs a step of 1-16 rows.

- `w4a4` (default): the calibrated model everywhere, the integer form (reference.splitq_linear)
  at every row count, at the checkpoint's bits (W4A4, W3A3, W3A2, ...).
- `w4a16`: a step of 1..DECODE_ROWS rows (a decode step of up to 16 sequences) runs the W4A16
  form (reference.w4a16: the weights at their bits, dequantized; activations in float; MAC off);
  larger steps (prefill) keep the integer form. Faster at decode on a GPU (no activation
  quantization: docs/kernels.md, "W4A16 decode"), but not the calibrated numerics, and the
  numerics of a token then depend on the row count of its step, i.e. on how many other requests
  share the batch, which the default mode never does. Its accuracy on the quality benchmark is in
  BENCHMARKS.md ("W4A16 decode").

DECODE_ROWS = 16 is the decode threshold of the Triton kernels (quantize_decode.can_implement_decode)
and of the reference backend alike, so both paths switch at the same row count. The variable is
read at each call (cheap: no host sync); the vLLM plugin reads it once at start-up too, so that a
bad value fails there, and records it in the torch.compile cache key.
"""

from __future__ import annotations

import torch

from .precision import product_precision
from .reference.forward import splitq_linear, splitq_linear_shard
from .reference.layer import SplitQLinear
from .reference.scheme import SplitQScheme
from .reference.shard import KShard
from .reference.w4a16 import splitq_linear_w4a16
from .settings import read_setting

ENV_DECODE_MODE = "SPLITQ_DECODE_MODE"
DECODE_MODES = ("w4a4", "w4a16")
DECODE_ROWS = 16  # == quantize_decode.DECODE_ROWS (one tensor-core tile of rows)


def decode_mode(value: str | None = None) -> str:
    """The validated mode: `value`, else $SPLITQ_DECODE_MODE, else `w4a4`."""
    return read_setting(ENV_DECODE_MODE, DECODE_MODES, value)


def uses_w4a16(rows: int, mode: str | None = None) -> bool:
    """Whether a step of `rows` rows runs the W4A16 form under `mode` (default: the environment's)."""
    return 1 <= rows <= DECODE_ROWS and decode_mode(mode) == "w4a16"


def reference_linear_for_step(
    x: torch.Tensor,
    text_mask: torch.Tensor | None,
    layer: SplitQLinear,
    scheme: SplitQScheme,
    shard: KShard | None = None,
    mode: str | None = None,
    precision: str | None = None,
) -> torch.Tensor:
    """The reference as a serving step runs it: splitq_linear (or its shard form), or the W4A16
    form when `uses_w4a16(rows of x, mode)`, at `precision` (default: $SPLITQ_PRECISION,
    precision.py). x (..., D_in): all its leading dims are the step's rows."""
    rows = x.numel() // max(1, x.shape[-1])
    p = product_precision(precision)
    if uses_w4a16(rows, mode):
        return splitq_linear_w4a16(x, text_mask, layer, shard, p)
    if shard is not None:
        return splitq_linear_shard(x, text_mask, layer, scheme, shard, p)
    return splitq_linear(x, text_mask, layer, scheme, p)
