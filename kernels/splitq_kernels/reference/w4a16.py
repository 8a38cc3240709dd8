"""The W4A16 form of the SplitQ linear layer: the quantized weights, float activations.

An optional decode mode (docs/kernels.md, "W4A16 decode"): at 1-16 rows a SplitQ layer is bound by
its weight bytes, and a weight-only product (the main weights dequantized in registers, as
Marlin-style W4A16 kernels do) skips kernel (a)'s per-token quantization. It is not the
calibrated model: calibration trained the transforms, clipping factors and low-rank branches for
quantized activations, so this form is only used when asked for (SPLITQ_DECODE_MODE=w4a16).

For x (T, D_in), with X'_m = x[:, C_m] P_m (the same smoothing and Kronecker transform as the
integer form), X'_t = x[:, C_t] P_t and X'_v = x[:, C_v] P_v, all in float (no Q):

    Y = X'_m deq(W_m)^T + X'_t deq(W_t)^T + X'_v deq(W_v)^T + (X'_m deq(D_s)^T) deq(U_s)^T + bias

- weights (main, outlier sets, CWS factors) are the checkpoint's codes times their per-output
  scales, at their bits (a W3A3 checkpoint runs W3A16 here: "W4A16" names the mode);
- the outlier sets keep their transforms and are not quantized either: every activation of the
  layer is float, so the mode has one meaning (and the outlier products are small anyway);
- MAC is off: it compensates the main activation's quantization error, Q(X'_m - X^_m); with
  X^_m = X'_m that error is zero, so this is the integer form's limit as the activation bits grow
  (the MAC term vanishes), not an approximation of its own;
- the text mask plays no part (MAC was the only row-dependent term): rows are independent.

Equivalently Y = x W_eff^T + bias with the dense float weight `w4a16_dense_weight` (the transforms
folded back into the dequantized weights), which the tests check.

Arithmetic: float32 unless x is float64 (like the integer form).
"""

from __future__ import annotations

import torch

from .forward import _flatten, compute_dtype, transformed_inputs
from .layer import SplitQLinear
from .shard import KShard
from .transforms import kron_apply, operand


def splitq_linear_w4a16(
    x: torch.Tensor,
    text_mask: torch.Tensor | None,
    layer: SplitQLinear,
    shard: KShard | None = None,
    precision: str = "float32",
) -> torch.Tensor:
    """The W4A16 form (module doc). x: (..., D_in); text_mask: (...) bool or None, only checked
    against the row count (no term depends on it). Returns (..., D_out) in x's dtype.

    With `shard` (tensor parallelism, shard.py): one rank's partial output, as splitq_linear_shard:
    `layer` is the rank's layer (main_w holds the block's columns of the main K range), the main
    product runs over those columns of X'_m, and only rank 0 adds the rest.

    precision "bf16": the transforms and the CWS up product as the kernels' bf16 products give
    them (forward.transformed_inputs); the products with weight codes need no rounding (X' is
    already bfloat16, the codes are exact in it, the scales apply after the sum)."""
    x2, _ = _flatten(x, text_mask)
    dt = compute_dtype(x)
    xm, xt, xv = transformed_inputs(x2, layer, precision)
    if shard is not None and layer.main_w.codes.shape[1] != shard.width:
        raise ValueError(f"the rank's main weight has {layer.main_w.codes.shape[1]} columns, its block {shard.width}")
    xm_block = xm if shard is None else xm[:, shard.start : shard.stop]
    y = xm_block @ layer.main_w.dequantize(dt).transpose(0, 1)
    if shard is None or shard.owns_rest:
        if xt is not None:
            y = y + xt @ layer.text_w.dequantize(dt).transpose(0, 1)
        if xv is not None:
            y = y + xv @ layer.vision_w.dequantize(dt).transpose(0, 1)
        if layer.cws_down is not None:
            h = xm @ layer.cws_down.dequantize(dt).transpose(0, 1)
            y = y + operand(h, precision) @ operand(layer.cws_up.dequantize(dt), precision).transpose(0, 1)
        if layer.bias is not None:
            y = y + layer.bias.to(dt)
    return y.to(x.dtype).reshape(*x.shape[:-1], y.shape[-1])


def w4a16_dense_weight(layer: SplitQLinear, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """W_eff (D_out, D_in): the dense float weight with Y = x W_eff^T + bias in the W4A16 form.

    Main columns: (deq(W_m) + deq(U_s) deq(D_s)) P_m^T, i.e. the transform folded back (P_m =
    diag(smooth) (P1 (x) P2), so P_m^T = (P1^T (x) P2^T) diag(smooth)); outlier columns:
    deq(W_o) P_o^T. For tests and for reasoning about the mode (a 16-bit copy of the layer)."""
    a = layer.main_w.dequantize(dtype)
    if layer.cws_down is not None:
        a = a + layer.cws_up.dequantize(dtype) @ layer.cws_down.dequantize(dtype)
    w = torch.zeros(layer.out_features, layer.in_features, dtype=dtype, device=a.device)
    p1, p2 = layer.main_p1.to(dtype), layer.main_p2.to(dtype)
    w[:, layer.idx_main] = kron_apply(a, p1.transpose(0, 1), p2.transpose(0, 1)) * layer.main_smooth.to(dtype)
    for idx, q, p in ((layer.idx_text, layer.text_w, layer.text_p), (layer.idx_vision, layer.vision_w, layer.vision_p)):
        if idx.numel():
            w[:, idx] = q.dequantize(dtype) @ p.to(dtype).transpose(0, 1)
    return w
