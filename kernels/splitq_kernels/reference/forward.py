"""The SplitQ linear forward (Algorithm 1, Eq. 13-19): the one definition of what a layer computes.

Two forms of the same function:
- `splitq_linear`: integer form, staged like the kernels. `quantize_input` is kernel (a): gather
  the three channel sets, transform, quantize per token, form the MAC residual. `splitq_gemm` is
  kernel (b): exact integer products of codes, rescaled per token and per output channel, plus the
  low-rank branches, MAC on the masked rows only, and bias.
- `splitq_linear_fake`: differentiable fake-quant form on a SplitQFloatLinear, with
  straight-through rounding, for calibration. quantize_linear(float layer) run through the
  integer form gives the same output.

Arithmetic: float32 unless the input is float64; integer products are exact (float64 holds the
sums of products of codes exactly for any realistic K: |code| <= 255, so K < 2^37).
`precision="bf16"` (integer form) is what the kernels compute under SPLITQ_PRECISION=bf16: the float
products (online transforms, low-rank up products) on bfloat16-rounded operands, and the
transformed activations stored in bfloat16 before they are quantized (transforms.operand); the
integer products stay exact. "float32" (the default) is the definition.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .layer import ChannelSplit, SplitQFloatLinear, SplitQLinear
from .quantizer import QuantizedTensor, fake_quantize, quantize
from .scheme import SplitQScheme
from .shard import KShard, slice_columns
from .transforms import check_precision, main_transform, operand


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def mac_row_mask(text_mask: torch.Tensor, mac_rows: str) -> torch.Tensor:
    """Rows that receive the MAC compensation: text rows (the paper), vision rows, or all."""
    if mac_rows == "text":
        return text_mask
    if mac_rows == "vision":
        return ~text_mask
    return torch.ones_like(text_mask)


def _flatten(x: torch.Tensor, text_mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    x2 = x.reshape(-1, x.shape[-1])
    if text_mask is None:  # no image rows: every decoded or text-only token is text
        return x2, torch.ones(x2.shape[0], dtype=torch.bool, device=x.device)
    mask = text_mask.reshape(-1).to(torch.bool)
    if mask.numel() != x2.shape[0]:
        raise ValueError(f"text_mask has {mask.numel()} rows, input has {x2.shape[0]}")
    return x2, mask


def _act_clip(v: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return v.to(dtype).reshape(())


# ---------------------------------------------------------------------------------------------
# Integer form
# ---------------------------------------------------------------------------------------------


@dataclass
class QuantizedInput:
    """Per-token quantized activations of one layer input (kernel (a)'s outputs)."""

    main: QuantizedTensor  # Q(X_m P_m), act_bits
    text: QuantizedTensor | None  # Q(X_t P_t), aux_act_bits
    vision: QuantizedTensor | None  # Q(X_v P_v), aux_act_bits
    mac: QuantizedTensor | None  # Q(X_m P_m - X^_m), aux_act_bits; None when MAC is off


def transformed_inputs(
    x: torch.Tensor, layer: SplitQLinear, precision: str = "float32"
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """The channel split and online transforms of x (T, D_in), in float: (X_m P_m, X_t P_t,
    X_v P_v), None for an empty outlier set. What kernel (a) quantizes, and what the W4A16 form
    (w4a16.py) multiplies as it is. precision "bf16": as the kernels' bf16 products and bf16
    scratch give them (module doc)."""
    check_precision(precision)
    dt = compute_dtype(x)
    x = x.reshape(-1, x.shape[-1]).to(dt)
    xm = main_transform(x[:, layer.idx_main], layer.main_smooth.to(dt), layer.main_p1.to(dt), layer.main_p2.to(dt),
                        precision)

    def outlier(idx: torch.Tensor, p: torch.Tensor | None) -> torch.Tensor | None:
        if idx.numel() == 0:
            return None
        return operand(operand(x[:, idx], precision) @ operand(p.to(dt), precision), precision)

    return operand(xm, precision), outlier(layer.idx_text, layer.text_p), outlier(layer.idx_vision, layer.vision_p)


def quantize_input(
    x: torch.Tensor, layer: SplitQLinear, scheme: SplitQScheme, precision: str = "float32"
) -> QuantizedInput:
    """Kernel (a): channel split, online transforms, per-token quantization, MAC residual."""
    dt = compute_dtype(x)
    sym, ab, aab = scheme.act_symmetric, scheme.act_bits, scheme.aux_act_bits
    xm, xt, xv = transformed_inputs(x, layer, precision)
    main = quantize(xm, ab, sym, clip=_act_clip(layer.main_act_clip, dt))

    def outlier(v: torch.Tensor | None, clip: torch.Tensor) -> QuantizedTensor | None:
        return None if v is None else quantize(v, aab, sym, clip=_act_clip(clip, dt))

    mac = None
    if layer.mac_down is not None:
        mac = quantize(xm - main.dequantize(dt), aab, sym, clip=_act_clip(layer.mac_act_clip, dt))
    return QuantizedInput(
        main=main,
        text=outlier(xt, layer.text_act_clip),
        vision=outlier(xv, layer.vision_act_clip),
        mac=mac,
    )


def int_matmul(a: QuantizedTensor, w: QuantizedTensor) -> torch.Tensor:
    """Exact sum_k (a_code - a_zero) * w_code per (row, output), as float64 integers."""
    return a.centered() @ w.centered().transpose(0, 1)


def int_linear(a: QuantizedTensor, w: QuantizedTensor, dtype: torch.dtype) -> torch.Tensor:
    """Dequantized product: exact integer accumulation, then per-token x per-channel scales."""
    acc = int_matmul(a, w)
    return (acc * a.scale.to(torch.float64) * w.scale.to(torch.float64).transpose(0, 1)).to(dtype)


def splitq_gemm(
    qin: QuantizedInput,
    text_mask: torch.Tensor,
    layer: SplitQLinear,
    scheme: SplitQScheme,
    dtype: torch.dtype,
    shard: KShard | None = None,
    precision: str = "float32",
) -> torch.Tensor:
    """Kernel (b): Y = Y_m (+ CWS) + Y_t + Y_v (+ MAC on masked rows) + bias.

    With `shard` (tensor parallelism, shard.py): one rank's partial output: `layer` is the rank's
    layer (main_w holds the block's columns), the main product runs over the block's columns of
    the main codes, and only the rank that owns the rest adds the other terms."""
    main = qin.main if shard is None else slice_columns(qin.main, shard.start, shard.stop)
    y = int_linear(main, layer.main_w, dtype)
    if shard is not None and not shard.owns_rest:
        return y
    if qin.text is not None:
        y = y + int_linear(qin.text, layer.text_w, dtype)
    if qin.vision is not None:
        y = y + int_linear(qin.vision, layer.vision_w, dtype)

    def up(h: torch.Tensor, u: QuantizedTensor) -> torch.Tensor:  # a low-rank up product: a float product
        return operand(h, precision) @ operand(u.dequantize(dtype), precision).transpose(0, 1)

    if layer.cws_down is not None:
        y = y + up(int_linear(qin.main, layer.cws_down, dtype), layer.cws_up)
    if qin.mac is not None:
        comp = up(int_linear(qin.mac, layer.mac_down, dtype), layer.mac_up)
        rows = mac_row_mask(text_mask, scheme.mac_rows)
        y = y + torch.where(rows[:, None], comp, torch.zeros((), dtype=dtype, device=comp.device))
    if layer.bias is not None:
        y = y + layer.bias.to(dtype)
    return y


def splitq_linear(
    x: torch.Tensor, text_mask: torch.Tensor | None, layer: SplitQLinear, scheme: SplitQScheme,
    precision: str = "float32",
) -> torch.Tensor:
    """The SplitQ linear layer, integer form. x: (..., D_in); text_mask: (...) bool, True = text
    row (None: all rows are text). Returns (..., D_out) in x's dtype."""
    x2, mask = _flatten(x, text_mask)
    dt = compute_dtype(x)
    y = splitq_gemm(quantize_input(x2, layer, scheme, precision), mask, layer, scheme, dt, precision=precision)
    return y.to(x.dtype).reshape(*x.shape[:-1], y.shape[-1])


def splitq_linear_shard(
    x: torch.Tensor, text_mask: torch.Tensor | None, layer: SplitQLinear, scheme: SplitQScheme, shard: KShard,
    precision: str = "float32",
) -> torch.Tensor:
    """One tensor-parallel rank's partial output of `splitq_linear` (shard.py): x is the whole
    input (..., D_in); `layer` the rank's layer (shard.shard_layer). The partial outputs of all
    ranks sum to splitq_linear's output, up to float summation order."""
    if layer.main_w.codes.shape[1] != shard.width:
        raise ValueError(f"the rank's main weight has {layer.main_w.codes.shape[1]} columns, its block {shard.width}")
    x2, mask = _flatten(x, text_mask)
    dt = compute_dtype(x)
    y = splitq_gemm(quantize_input(x2, layer, scheme, precision), mask, layer, scheme, dt, shard, precision)
    return y.to(x.dtype).reshape(*x.shape[:-1], y.shape[-1])


# ---------------------------------------------------------------------------------------------
# Fake-quant (differentiable) form
# ---------------------------------------------------------------------------------------------


def _fq_weight(w: torch.Tensor, bits: int, clip: torch.Tensor | None) -> torch.Tensor:
    return fake_quantize(w, bits, symmetric=True, dim=1, clip=1.0 if clip is None else clip)


@dataclass
class FakeQuantWeights:
    """The weight side of a float layer: its fake-quantized weights (what `quantize_linear`
    stores, dequantized; `main` is Q(P_m^-1 W_m - U_s V_s), Eq. 17) and its bias. None where the
    part is absent."""

    main: torch.Tensor
    text: torch.Tensor | None = None
    vision: torch.Tensor | None = None
    cws_down: torch.Tensor | None = None
    cws_up: torch.Tensor | None = None
    mac_down: torch.Tensor | None = None
    mac_up: torch.Tensor | None = None
    bias: torch.Tensor | None = None


def fake_quantize_weights(
    layer: SplitQFloatLinear, scheme: SplitQScheme, dtype: torch.dtype | None = None
) -> FakeQuantWeights:
    """The weight side of `splitq_linear_fake`, differentiable (straight-through rounding).

    Computed apart from the activations so calibration can evaluate it once per step, in blocks
    of output rows (every weight quantizer is per output row), and backpropagate into it later.
    """
    wb, awb = scheme.weight_bits, scheme.aux_weight_bits

    def fq(w: torch.Tensor | None, bits: int, clip: torch.Tensor | None = None) -> torch.Tensor | None:
        if w is None:
            return None
        return _fq_weight(w if dtype is None else w.to(dtype), bits, clip)

    return FakeQuantWeights(
        main=fq(layer.main_residual_weight(), wb, layer.main_weight_clip),
        text=fq(layer.text_weight, awb, layer.text_weight_clip) if layer.idx_text.numel() else None,
        vision=fq(layer.vision_weight, awb, layer.vision_weight_clip) if layer.idx_vision.numel() else None,
        cws_down=fq(layer.cws_down, awb),
        cws_up=fq(layer.cws_up, awb),
        mac_down=fq(layer.mac_down, awb),
        mac_up=fq(layer.mac_up, awb),
        bias=layer.bias,
    )


def splitq_linear_fake(
    x: torch.Tensor,
    text_mask: torch.Tensor | None,
    layer: ChannelSplit,
    scheme: SplitQScheme,
    weights: FakeQuantWeights | None = None,
) -> torch.Tensor:
    """The SplitQ linear layer, fake-quant form with straight-through rounding (for training).

    `layer` is a SplitQFloatLinear, or only its input side (a ChannelSplit) when `weights`, the
    layer's `fake_quantize_weights`, are given."""
    x2, mask = _flatten(x, text_mask)
    dt = compute_dtype(x)
    x2 = x2.to(dt)
    if weights is None:
        weights = fake_quantize_weights(layer, scheme, dt)
    sym, ab, aab = scheme.act_symmetric, scheme.act_bits, scheme.aux_act_bits

    xm = main_transform(x2[:, layer.idx_main], layer.main_smooth.to(dt), layer.main_p1.to(dt), layer.main_p2.to(dt))
    xm_hat = fake_quantize(xm, ab, sym, clip=_act_clip(layer.main_act_clip, dt))
    y = xm_hat @ weights.main.to(dt).transpose(0, 1)

    for idx, p, w, aclip in (
        (layer.idx_text, layer.text_p, weights.text, layer.text_act_clip),
        (layer.idx_vision, layer.vision_p, weights.vision, layer.vision_act_clip),
    ):
        if idx.numel():
            xo = fake_quantize(x2[:, idx] @ p.to(dt), aab, sym, clip=_act_clip(aclip, dt))
            y = y + xo @ w.to(dt).transpose(0, 1)

    if weights.cws_down is not None:
        h = xm_hat @ weights.cws_down.to(dt).transpose(0, 1)
        y = y + h @ weights.cws_up.to(dt).transpose(0, 1)
    if weights.mac_down is not None:
        r = fake_quantize(xm - xm_hat, aab, sym, clip=_act_clip(layer.mac_act_clip, dt))
        h = r @ weights.mac_down.to(dt).transpose(0, 1)
        comp = h @ weights.mac_up.to(dt).transpose(0, 1)
        rows = mac_row_mask(mask, scheme.mac_rows)
        y = y + torch.where(rows[:, None], comp, torch.zeros((), dtype=dt, device=comp.device))
    if weights.bias is not None:
        y = y + weights.bias.to(dt)
    return y.to(x.dtype).reshape(*x.shape[:-1], y.shape[-1])
