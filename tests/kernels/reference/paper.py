"""The paper's formulas written out directly in float64, sharing no code with the reference
(the tests hold the reference to them)."""

import torch


def direct_q(x: torch.Tensor, bits: int, symmetric: bool, dim: int, clip) -> torch.Tensor:
    """Eq. 1 written out in float64: x^ = (clamp(round(x / S) + z, qmin, qmax) - z) * S."""
    x = x.double()
    if symmetric:
        qmin, qmax = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
        s = torch.clamp(clip * x.abs().amax(dim, keepdim=True) / qmax, min=1e-8)
        z = torch.zeros_like(s)
    else:
        qmin, qmax = 0, 2**bits - 1
        hi = torch.clamp(clip * x.amax(dim, keepdim=True), min=0)
        lo = torch.clamp(clip * x.amin(dim, keepdim=True), max=0)
        s = torch.clamp((hi - lo) / qmax, min=1e-8)
        z = torch.round(-lo / s)
    return (torch.clamp(torch.round(x / s) + z, qmin, qmax) - z) * s
