"""The tensors of one quantized linear in a SplitQ checkpoint: names, shapes, dtypes, sharing.

This table is the format (docs/format.md repeats it for people); the writer, the reader's
validation and the vLLM plugin's parameter creation all read it, so they cannot drift apart.

`side` says how fused layers (q/k/v -> qkv, gate/up -> gate_up) combine a tensor:
- "input": depends only on the shared input; identical in every layer of a group.
- "output": first dim is the output dim; a fused layer concatenates along it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from splitq_kernels.packing import pack_codes, packed_row_bytes, unpack_codes
from splitq_kernels.reference import QuantizedTensor, SplitQLinear, SplitQScheme

from .config import LayerDims


@dataclass(frozen=True)
class TensorSpec:
    suffix: str  # tensor name = f"{layer name}.{suffix}"
    shape: tuple[int, ...]
    dtype: torch.dtype
    side: str  # "input" or "output"


def layer_tensor_specs(dims: LayerDims, scheme: SplitQScheme) -> list[TensorSpec]:
    """Every tensor a layer with these dims must have, in a fixed order."""
    wb, awb = scheme.weight_bits, scheme.aux_weight_bits
    m, t, v, o = dims.main, dims.text, dims.vision, dims.out_features
    n1, n2 = dims.kron
    f32, i32, u8 = torch.float32, torch.int32, torch.uint8
    specs = [
        TensorSpec("idx_main", (m,), i32, "input"),
        TensorSpec("main_smooth", (m,), f32, "input"),
        TensorSpec("main_p1", (n1, n1), f32, "input"),
        TensorSpec("main_p2", (n2, n2), f32, "input"),
        TensorSpec("main_act_clip", (1,), f32, "input"),
        TensorSpec("main_qweight", (o, packed_row_bytes(m, wb)), u8, "output"),
        TensorSpec("main_wscale", (o,), f32, "output"),
    ]
    for name, k in (("text", t), ("vision", v)):
        if k:
            specs += [
                TensorSpec(f"idx_{name}", (k,), i32, "input"),
                TensorSpec(f"{name}_p", (k, k), f32, "input"),
                TensorSpec(f"{name}_act_clip", (1,), f32, "input"),
                TensorSpec(f"{name}_qweight", (o, packed_row_bytes(k, awb)), u8, "output"),
                TensorSpec(f"{name}_wscale", (o,), f32, "output"),
            ]
    for name, r in (("cws", dims.cws_rank), ("mac", dims.mac_rank)):
        if r:
            specs += [
                TensorSpec(f"{name}_down_qweight", (r, packed_row_bytes(m, awb)), u8, "input"),
                TensorSpec(f"{name}_down_wscale", (r,), f32, "input"),
                TensorSpec(f"{name}_up_qweight", (o, packed_row_bytes(r, awb)), u8, "output"),
                TensorSpec(f"{name}_up_wscale", (o,), f32, "output"),
            ]
            if name == "mac":
                specs.append(TensorSpec("mac_act_clip", (1,), f32, "input"))
    if dims.bias:
        specs.append(TensorSpec("bias", (o,), None, "output"))  # any float dtype (the model's)
    return specs


def layer_dims(layer: SplitQLinear, group: str) -> LayerDims:
    """The LayerDims of a quantized layer."""
    return LayerDims(
        in_features=layer.in_features,
        out_features=layer.out_features,
        main=layer.idx_main.numel(),
        text=layer.idx_text.numel(),
        vision=layer.idx_vision.numel(),
        kron=layer.kron_shape,
        cws_rank=layer.cws_rank,
        mac_rank=layer.mac_rank,
        group=group,
        bias=layer.bias is not None,
    )


# Weight parts: (field of SplitQLinear, tensor prefix, which bits).
_WEIGHTS = (
    ("main_w", "main", "weight"),
    ("text_w", "text", "aux"),
    ("vision_w", "vision", "aux"),
    ("cws_down", "cws_down", "aux"),
    ("cws_up", "cws_up", "aux"),
    ("mac_down", "mac_down", "aux"),
    ("mac_up", "mac_up", "aux"),
)


def layer_to_tensors(layer: SplitQLinear, scheme: SplitQScheme) -> dict[str, torch.Tensor]:
    """SplitQLinear -> {suffix: tensor} in checkpoint layout (packed codes, float32 scales)."""
    out: dict[str, torch.Tensor] = {}
    for name in ("main", "text", "vision"):
        idx = getattr(layer, f"idx_{name}")
        if idx.numel():
            out[f"idx_{name}"] = idx.to(torch.int32).contiguous()
            out[f"{name}_act_clip"] = getattr(layer, f"{name}_act_clip").reshape(1).to(torch.float32)
    out["main_smooth"] = layer.main_smooth.to(torch.float32).contiguous()
    out["main_p1"] = layer.main_p1.to(torch.float32).contiguous()
    out["main_p2"] = layer.main_p2.to(torch.float32).contiguous()
    for name in ("text", "vision"):
        if getattr(layer, f"idx_{name}").numel():
            out[f"{name}_p"] = getattr(layer, f"{name}_p").to(torch.float32).contiguous()
    if layer.mac_down is not None:
        out["mac_act_clip"] = layer.mac_act_clip.reshape(1).to(torch.float32)
    for field_name, prefix, which in _WEIGHTS:
        q: QuantizedTensor | None = getattr(layer, field_name)
        if q is None:
            continue
        bits = scheme.weight_bits if which == "weight" else scheme.aux_weight_bits
        if q.bits != bits or q.zero is not None:
            raise ValueError(f"{field_name}: expected symmetric {bits}-bit codes, got {q.bits}-bit")
        out[f"{prefix}_qweight"] = pack_codes(q.codes, bits)
        out[f"{prefix}_wscale"] = q.scale.reshape(-1).to(torch.float32).contiguous()
    if layer.bias is not None:
        out["bias"] = layer.bias.contiguous()
    return out


def tensors_to_layer(t: dict[str, torch.Tensor], dims: LayerDims, scheme: SplitQScheme) -> SplitQLinear:
    """{suffix: tensor} in checkpoint layout -> SplitQLinear (codes unpacked, int64 indices)."""

    def weight(prefix: str, k: int, bits: int) -> QuantizedTensor | None:
        if f"{prefix}_qweight" not in t:
            return None
        codes = unpack_codes(t[f"{prefix}_qweight"], k, bits)
        return QuantizedTensor(codes, t[f"{prefix}_wscale"].reshape(-1, 1), None, bits)

    def idx(name: str) -> torch.Tensor:
        return t[f"idx_{name}"].long() if f"idx_{name}" in t else torch.zeros(0, dtype=torch.long)

    def clip(name: str) -> torch.Tensor:
        return t[f"{name}_act_clip"].reshape(()) if f"{name}_act_clip" in t else torch.tensor(1.0)

    wb, awb = scheme.weight_bits, scheme.aux_weight_bits
    m = dims.main
    return SplitQLinear(
        idx_main=idx("main"),
        idx_text=idx("text"),
        idx_vision=idx("vision"),
        main_smooth=t["main_smooth"],
        main_p1=t["main_p1"],
        main_p2=t["main_p2"],
        text_p=t.get("text_p"),
        vision_p=t.get("vision_p"),
        main_act_clip=clip("main"),
        text_act_clip=clip("text"),
        vision_act_clip=clip("vision"),
        mac_act_clip=clip("mac"),
        main_w=weight("main", m, wb),
        text_w=weight("text", dims.text, awb),
        vision_w=weight("vision", dims.vision, awb),
        cws_down=weight("cws_down", m, awb),
        cws_up=weight("cws_up", dims.cws_rank, awb),
        mac_down=weight("mac_down", m, awb),
        mac_up=weight("mac_up", dims.mac_rank, awb),
        bias=t.get("bias"),
    )
