"""VLMQ, importance-aware PTQ for VLMs (../shared/papers/vlmq.txt).

- importance (Sec. 4.1, Eq. 4): per token n, G_n = mean over the output channels of |dL/dz_n|,
  the gradient of a block loss w.r.t. the projection's output, from one block-wise backward
  (Sec. 4.2; here baselines/common.token_gradients: the layer's RTN error stands for Eq. 5's
  error against the block with quantized inputs, which the sequential pipeline's FP inputs
  would make zero);
- objective (Sec. 4.3, Eq. 6, 15-19): GPTQ on the importance-aware Hessian
  H~ = X G^2 X^T, per projection (q, k, v, o: each its own G, Algorithm 1); the MLP projections
  (gate, up, down) use the plain Hessian X X^T (Algorithm 1's else branch);
- GPTQ (Frantar et al.) as the paper's defaults: dampening lambda = 0.01 of the mean diagonal,
  act_order (columns in decreasing Hessian diagonal), Cholesky form of the inverse, lazy blocks
  of 128 columns. The paper's precursor is GPTAQ, whose extra term r~ X~^T (Eq. 19) is the
  difference between the FP and the quantized-input activations: zero here (FP inputs), so the
  update is GPTQ's.

Format: the weights are quantized per output row, symmetric, on the grid quantize_linear uses
(scale = max|W_row| / qmax), not the paper's asymmetric groups of 128 (the SplitQ format has one
scale per row); activations are quantized per token at the scheme's bits with no transform (VLMQ
is weight-only: its A bits are those of the SplitQ scheme the row is run at). Only the integer
codes differ from RTN, so the export, the reference and the vLLM plugin serve it unchanged.
"""

from __future__ import annotations

import torch

from splitq_kernels.reference import SplitQLinear
from splitq_kernels.reference.quantizer import QuantizedTensor, qrange

from ..mocd import ChannelStats
from ..recipe import CalibrationConfig
from .common import GroupSamples, plain_params

IMPORTANCE_KINDS = ("qkv", "o")  # Algorithm 1: the attention projections
GPTQ_BLOCK = 128


def importance(grad: torch.Tensor) -> torch.Tensor:
    """Eq. 4: G_n = mean_i |P_in| for gradients (N, C_out) -> (N,)."""
    return grad.abs().mean(dim=1)


def weighted_hessian(x: torch.Tensor, g: torch.Tensor | None = None) -> torch.Tensor:
    """H~ = X G^2 X^T (paper layout) = sum_n G_n^2 x_n x_n^T, float64; g None: G = 1."""
    x = x.to(torch.float64)
    xg = x if g is None else x * g.to(torch.float64)[:, None]
    return xg.transpose(0, 1) @ xg


def gptq(
    w: torch.Tensor,
    h: torch.Tensor,
    bits: int,
    damp: float = 0.01,
    act_order: bool = True,
    block: int = GPTQ_BLOCK,
) -> QuantizedTensor:
    """GPTQ of w (out, in) for the Hessian h (in, in), symmetric per output row on the grid
    scale = max|w_row| / qmax: the integer codes minimising ||(W - W^) X||_H greedily column by
    column with the inverse-Hessian error feedback."""
    w = w.to(torch.float64).clone()
    h = h.to(torch.float64).clone()
    n = w.shape[1]
    qmin, qmax = qrange(bits, True)
    scale = (w.abs().amax(dim=1, keepdim=True) / qmax).clamp(min=1e-10)
    dead = torch.diagonal(h) == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    perm = torch.argsort(torch.diagonal(h), descending=True) if act_order else torch.arange(n)
    w, h = w[:, perm], h[perm][:, perm]
    h += damp * torch.diagonal(h).mean() * torch.eye(n, dtype=h.dtype)
    hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    codes = torch.zeros_like(w)
    for b0 in range(0, n, block):
        b1 = min(b0 + block, n)
        wb = w[:, b0:b1].clone()
        err = torch.zeros_like(wb)
        for j in range(b1 - b0):
            col = wb[:, j]
            q = torch.round(col[:, None] / scale).clamp(qmin, qmax)
            codes[:, b0 + j] = q[:, 0]
            d = hinv[b0 + j, b0 + j]
            e = (col - q[:, 0] * scale[:, 0]) / d
            wb[:, j:] -= e[:, None] * hinv[b0 + j, b0 + j : b1][None, :]
            err[:, j] = e
        w[:, b1:] -= err @ hinv[b0:b1, b1:]
    inv = torch.argsort(perm)
    return QuantizedTensor(codes[:, inv].to(torch.int8), scale.to(torch.float32), None, bits)


def calibrate_group(
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    samples: GroupSamples,
    stats: ChannelStats,
    grads: torch.Tensor | None,
    member_sizes: list[int],
    kind: str,
    cfg: CalibrationConfig,
    gen: torch.Generator,
) -> tuple[SplitQLinear, dict]:
    """VLMQ for one fused group: each member's rows GPTQ'd with its own (importance-aware for
    q/k/v/o) Hessian. grads: |dL/dY| at the sampled rows (N, D_out of the fused group)."""
    x = samples.x.to(weight.device)
    use_g = grads is not None and kind in IMPORTANCE_KINDS
    parts, info, start = [], {"importance": use_g}, 0
    for size in member_sizes:
        g = importance(grads[:, start : start + size]).to(weight.device) if use_g else None
        h = weighted_hessian(x, g)
        parts.append(gptq(weight[start : start + size], h, cfg.quant_scheme.weight_bits, cfg.vlmq_damp))
        start += size
    params = plain_params(weight, bias, stats, cfg, gen)
    q = params.quantized()  # the input side and bias; main_w replaced by the GPTQ codes
    q.main_w = QuantizedTensor(
        torch.cat([p.codes for p in parts]), torch.cat([p.scale for p in parts]), None, parts[0].bits
    )
    return q, info
