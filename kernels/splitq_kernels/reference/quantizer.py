"""The uniform quantizer Q of the paper's Eq. 1, in integer and fake-quant form.

One function computes the quantization grid (scale, zero point) and the integer codes; the
fake-quant form is the dequantized codes with straight-through rounding, so both forms give the
same numbers by construction.

Conventions (docs/format.md, "Quantizer"):
- symmetric, b bits: codes in [-2^(b-1), 2^(b-1) - 1], scale = clip * max|x| / (2^(b-1) - 1),
  no zero point; dequant = code * scale.
- asymmetric, b bits: codes in [0, 2^b - 1]; the range is widened to contain 0
  (xmax = max(clip * max x, 0), xmin = min(clip * min x, 0)), scale = (xmax - xmin) / (2^b - 1),
  zero = round(-xmin / scale); dequant = (code - zero) * scale.
- code = clamp(round(x / scale) + zero, qmin, qmax), round half to even (torch.round).
- scale is floored at SCALE_EPS so an all-zero row quantizes to zeros instead of NaN.
The statistics are taken over `dim` (the channel dim for per-token activations, the input dim for
per-output-channel weights); `clip` broadcasts against the reduced shape (a scalar for
activations, one factor per output channel for weights).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

SCALE_EPS = 1e-8


def qrange(bits: int, symmetric: bool) -> tuple[int, int]:
    """The integer code range [qmin, qmax] for `bits` bits."""
    if not 2 <= bits <= 8:
        raise ValueError(f"bits must be in 2..8, got {bits}")
    if symmetric:
        return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    return 0, 2**bits - 1


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """Round half to even in the forward pass, identity gradient in the backward pass."""
    return x + (torch.round(x) - x).detach()


@dataclass
class QuantizedTensor:
    """Integer codes with their scale (and zero point when asymmetric).

    `codes` holds integers (an integer dtype, or a float dtype holding exact integers in the
    differentiable path); `scale` and `zero` have the reduced dim kept (size 1) so they broadcast.
    """

    codes: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor | None
    bits: int

    @property
    def symmetric(self) -> bool:
        return self.zero is None

    def centered(self) -> torch.Tensor:
        """codes - zero as float64: exact integers, ready for an exact integer product."""
        c = self.codes.to(torch.float64)
        return c if self.zero is None else c - self.zero.to(torch.float64)

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        dtype = dtype or self.scale.dtype
        c = self.codes.to(dtype)
        if self.zero is not None:
            c = c - self.zero.to(dtype)
        return c * self.scale.to(dtype)


def _grid(
    x: torch.Tensor, bits: int, symmetric: bool, dim: int, clip: torch.Tensor | float, ste: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    qmin, qmax = qrange(bits, symmetric)
    if symmetric:
        amax = x.abs().amax(dim=dim, keepdim=True)
        scale = (clip * amax / qmax).clamp(min=SCALE_EPS)
        return scale, None
    xmax = (clip * x.amax(dim=dim, keepdim=True)).clamp(min=0)
    xmin = (clip * x.amin(dim=dim, keepdim=True)).clamp(max=0)
    scale = ((xmax - xmin) / qmax).clamp(min=SCALE_EPS)
    zero = -xmin / scale
    zero = round_ste(zero) if ste else torch.round(zero)
    return scale, zero


def quantize(
    x: torch.Tensor,
    bits: int,
    symmetric: bool = True,
    dim: int = -1,
    clip: torch.Tensor | float = 1.0,
) -> QuantizedTensor:
    """Integer form of Q: codes (int8 for symmetric, uint8-range int16 for asymmetric), scale, zero."""
    with torch.no_grad():
        qmin, qmax = qrange(bits, symmetric)
        scale, zero = _grid(x, bits, symmetric, dim, clip, ste=False)
        q = torch.round(x / scale)
        if zero is not None:
            q = q + zero
        q = q.clamp(qmin, qmax)
        codes = q.to(torch.int8 if symmetric else torch.int16)
        return QuantizedTensor(codes, scale, None if zero is None else zero.to(torch.int16), bits)


def fake_quantize(
    x: torch.Tensor,
    bits: int,
    symmetric: bool = True,
    dim: int = -1,
    clip: torch.Tensor | float = 1.0,
) -> torch.Tensor:
    """Differentiable form of Q: dequantize(quantize(x)) with straight-through rounding.

    Gradients reach `x` (straight through inside the clamp range) and `clip` (through the scale),
    as in FlatQuant's learnable weight/activation clipping.
    """
    qmin, qmax = qrange(bits, symmetric)
    scale, zero = _grid(x, bits, symmetric, dim, clip, ste=True)
    q = round_ste(x / scale)
    if zero is not None:
        q = (q + zero).clamp(qmin, qmax) - zero
    else:
        q = q.clamp(qmin, qmax)
    return q * scale
