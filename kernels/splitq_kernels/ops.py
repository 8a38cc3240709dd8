"""What the vLLM plugin calls: prepare a layer once, then one call per linear.

    from splitq_kernels.ops import prepare_kernel_layer, splitq_linear_triton
    kl = prepare_kernel_layer(layer, scheme, device)        # at load time (SplitQLinear, SplitQScheme)
    y = splitq_linear_triton(x, text_mask, kl)               # per forward: x [..., D_in], mask [...] bool

The launches run inside torch custom ops (`torch.ops.splitq.linear`, and its two halves
`torch.ops.splitq.quantize_input` / `torch.ops.splitq.gemm`), each with a fake (meta)
implementation, so torch.compile treats them as opaque calls and CUDA graphs capture the kernels.
The call path has no host synchronisation: the mask is read by the kernel (no .item(), no boolean
indexing), all sizes come from shapes and from the layer's integer metadata.

(No `from __future__ import annotations` here: torch.library.custom_op reads the annotations.)
"""

from typing import Optional

import torch

from .decode_mode import uses_w4a16
from .layout import KernelLayer, prepare_kernel_layer
from .reference.shard import KShard
from .triton import quantize_decode
from .triton.gemm import gemm_triton
from .triton.quantize_decode import can_implement_decode, linear_decode_triton, quantize_input_decode_triton
from .triton.quantize_input import QuantizedActivations, alloc_activations, quantize_input_triton
from .triton.w4a16 import linear_w4a16_triton

__all__ = ["KernelLayer", "prepare_kernel_layer", "splitq_linear_triton"]


def quantize_input_auto(x: torch.Tensor, text_mask: Optional[torch.Tensor], kl: KernelLayer) -> QuantizedActivations:
    """Kernel (a) as the row count asks: the split decode launches for 1-16 rows
    (quantize_decode.py: the persistent kernel would run them on one SM), the persistent kernel
    otherwise. Same outputs either way (both are tested against the reference)."""
    if can_implement_decode(kl, x.shape[0])[0]:
        return quantize_input_decode_triton(x, text_mask, kl)
    return quantize_input_triton(x, text_mask, kl)


@torch.library.custom_op("splitq::linear", mutates_args=())
def linear_op(
    x: torch.Tensor, text_mask: Optional[torch.Tensor], tensors: list[Optional[torch.Tensor]], meta: list[int],
    precision: str,
) -> torch.Tensor:
    """Kernel (a) then kernel (b): x [T, D_in] -> y [T, D_out] in x's dtype. At 1-16 rows two
    launches (quantize_decode.plan_linear_decode: D1 + D2 in one grid, the GEMM with the MAC down
    in its grid); the halves below, called one after the other, run D3 as a launch of its own.
    With SPLITQ_DECODE_IN_GRID_WAITS=0, four launches and no in-grid wait (same outputs).
    SPLITQ_DECODE_MODE=w4a16 (decode_mode.py): 1-16 rows run the W4A16 form instead
    (triton/w4a16.py, two launches), at the same threshold as the reference backend."""
    kl = KernelLayer.from_op_args(tensors, meta, precision)
    if uses_w4a16(x.shape[0]):
        return linear_w4a16_triton(x, kl)
    if can_implement_decode(kl, x.shape[0])[0]:
        if quantize_decode.IN_GRID_WAITS:
            return linear_decode_triton(x, text_mask, kl)[0]
        return gemm_triton(quantize_input_decode_triton(x, text_mask, kl), kl, x.dtype)
    return gemm_triton(quantize_input_triton(x, text_mask, kl), kl, x.dtype)


@linear_op.register_fake
def _linear_fake(x, text_mask, tensors, meta, precision):
    return x.new_empty(x.shape[0], meta[1])


@torch.library.custom_op("splitq::quantize_input", mutates_args=())
def quantize_input_op(
    x: torch.Tensor, text_mask: Optional[torch.Tensor], tensors: list[Optional[torch.Tensor]], meta: list[int],
    precision: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Kernel (a) alone: (codes, scale, zero, h_cws, h_mac); absent branches give empty [T, 0] tensors."""
    kl = KernelLayer.from_op_args(tensors, meta, precision)
    a = quantize_input_auto(x, text_mask, kl)
    empty = x.new_empty(x.shape[0], 0, dtype=torch.float32)
    return a.codes, a.scale, a.zero, a.h_cws if a.h_cws is not None else empty, a.h_mac if a.h_mac is not None else empty


@quantize_input_op.register_fake
def _quantize_input_fake(x, text_mask, tensors, meta, precision):
    kl = KernelLayer.from_op_args(tensors, meta, precision)
    a = alloc_activations(kl, x.shape[0], x.device)
    empty = x.new_empty(x.shape[0], 0, dtype=torch.float32)
    return a.codes, a.scale, a.zero, a.h_cws if a.h_cws is not None else empty, a.h_mac if a.h_mac is not None else empty


@torch.library.custom_op("splitq::gemm", mutates_args=())
def gemm_op(
    codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, h_cws: torch.Tensor, h_mac: torch.Tensor,
    tensors: list[Optional[torch.Tensor]], meta: list[int], precision: str, out_dtype: torch.dtype,
) -> torch.Tensor:
    """Kernel (b) alone, on kernel (a)'s outputs."""
    kl = KernelLayer.from_op_args(tensors, meta, precision)
    act = QuantizedActivations(codes, scale, zero, h_cws if kl.cws_rank else None, h_mac if kl.mac_rank else None)
    return gemm_triton(act, kl, out_dtype)


@gemm_op.register_fake
def _gemm_fake(codes, scale, zero, h_cws, h_mac, tensors, meta, precision, out_dtype):
    return codes.new_empty(codes.shape[0], meta[1], dtype=out_dtype)


@torch.library.custom_op("splitq::linear_w4a16_shard", mutates_args=())
def linear_w4a16_shard_op(
    x: torch.Tensor, tensors: list[Optional[torch.Tensor]], meta: list[int], gemm_tensors: list[Optional[torch.Tensor]],
    gemm_meta: list[int], precision: str, shard: list[int],
) -> torch.Tensor:
    """One row-parallel rank's partial output in the W4A16 decode mode (splitq_kernels.shard): D1
    on the rank's kernel layer, the W4A16 GEMM on its GEMM view; shard = [rank, size, start, stop]."""
    kl = KernelLayer.from_op_args(tensors, meta, precision)
    gemm = KernelLayer.from_op_args(gemm_tensors, gemm_meta, precision)
    return linear_w4a16_triton(x, kl, shard=KShard(*shard), gemm=gemm)


@linear_w4a16_shard_op.register_fake
def _linear_w4a16_shard_fake(x, tensors, meta, gemm_tensors, gemm_meta, precision, shard):
    return x.new_empty(x.shape[0], gemm_meta[1])


def splitq_linear_triton(x: torch.Tensor, text_mask: torch.Tensor | None, kl: KernelLayer) -> torch.Tensor:
    """The SplitQ linear layer on the Triton kernels. x: [..., in_features] bf16/fp16/fp32;
    text_mask: [...] bool (True = text row) or None (every row is text). Returns [..., out_features]
    in x's dtype; same math as splitq_kernels.reference.splitq_linear."""
    x2 = x.reshape(-1, x.shape[-1])
    mask = None if text_mask is None else text_mask.reshape(-1)
    y = torch.ops.splitq.linear(x2, mask, kl.tensors(), kl.meta(), kl.precision)
    return y.reshape(*x.shape[:-1], kl.out_features)
