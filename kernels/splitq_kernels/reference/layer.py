"""The two forms of a SplitQ linear layer: float (what calibration trains) and quantized (what is
stored and served), and the step that turns one into the other.

Field names follow the checkpoint (docs/format.md). Torch convention throughout: weights are
(out_features, in_features); the low-rank factors are linears too: `*_down` maps the main
channels to the rank (shape (r, D_m), the paper's U^T) and `*_up` maps the rank to the outputs
(shape (D_out, r), the paper's V^T).

Input-side fields (channel sets, transforms, activation clipping, the `*_down` factors) depend
only on the layer's input; output-side fields (weights, scales, `*_up`, bias) have the output dim
first. Layers that share one input (q/k/v, gate/up) share the input-side fields exactly, which is
what lets vLLM load them as one fused layer: `concat_outputs` / `split_outputs` move between the
two views.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

import torch

from .quantizer import QuantizedTensor, quantize
from .scheme import SplitQScheme

INPUT_SIDE = (
    "idx_main",
    "idx_text",
    "idx_vision",
    "main_smooth",
    "main_p1",
    "main_p2",
    "text_p",
    "vision_p",
    "main_act_clip",
    "text_act_clip",
    "vision_act_clip",
    "mac_act_clip",
    "cws_down",
    "mac_down",
)
OUTPUT_SIDE = ("main_w", "text_w", "vision_w", "cws_up", "mac_up", "bias")


@dataclass(kw_only=True)
class ChannelSplit:
    """Fields common to both forms: channel sets, online transforms, activation clipping (the
    input side without the low-rank `*_down` factors, which are weights of their own).

    idx_*: int64 channel indices into the layer input; the three sets partition range(D_in).
    The main set is transformed in the order of idx_main. text_p / vision_p are None when the set
    is empty. Activation clipping factors are 0-dim float tensors (1.0 = no clipping).
    """

    idx_main: torch.Tensor
    idx_text: torch.Tensor
    idx_vision: torch.Tensor
    main_smooth: torch.Tensor
    main_p1: torch.Tensor
    main_p2: torch.Tensor
    text_p: torch.Tensor | None
    vision_p: torch.Tensor | None
    main_act_clip: torch.Tensor
    text_act_clip: torch.Tensor
    vision_act_clip: torch.Tensor
    mac_act_clip: torch.Tensor

    @property
    def in_features(self) -> int:
        return self.idx_main.numel() + self.idx_text.numel() + self.idx_vision.numel()

    @property
    def kron_shape(self) -> tuple[int, int]:
        return self.main_p1.shape[0], self.main_p2.shape[0]


@dataclass(kw_only=True)
class SplitQFloatLinear(ChannelSplit):
    """Float (differentiable) form: the transformed weights before quantization.

    main_weight = P_m^-1 W_m, text_weight = P_t^-1 W_t, vision_weight = P_v^-1 W_v (torch
    convention, see transforms.fold_*). The main path quantizes main_weight - cws_up @ cws_down
    (Eq. 17). *_weight_clip: per-output-channel clipping factors (shape (D_out, 1)) or None.
    """

    main_weight: torch.Tensor
    text_weight: torch.Tensor | None = None
    vision_weight: torch.Tensor | None = None
    cws_down: torch.Tensor | None = None
    cws_up: torch.Tensor | None = None
    mac_down: torch.Tensor | None = None
    mac_up: torch.Tensor | None = None
    bias: torch.Tensor | None = None
    main_weight_clip: torch.Tensor | None = None
    text_weight_clip: torch.Tensor | None = None
    vision_weight_clip: torch.Tensor | None = None

    @property
    def out_features(self) -> int:
        return self.main_weight.shape[0]

    def main_residual_weight(self) -> torch.Tensor:
        """P_m^-1 W_m - U_s V_s: what the main path quantizes (Eq. 17)."""
        if self.cws_down is None:
            return self.main_weight
        return self.main_weight - self.cws_up @ self.cws_down


@dataclass(kw_only=True)
class SplitQLinear(ChannelSplit):
    """Quantized form: integer codes and scales, exactly what the checkpoint stores.

    Weight QuantizedTensors are symmetric, per output channel (scale shape (rows, 1)).
    Optional parts are None: text_w / vision_w when the set is empty, cws_* / mac_* when the
    branch is off.
    """

    main_w: QuantizedTensor
    text_w: QuantizedTensor | None = None
    vision_w: QuantizedTensor | None = None
    cws_down: QuantizedTensor | None = None
    cws_up: QuantizedTensor | None = None
    mac_down: QuantizedTensor | None = None
    mac_up: QuantizedTensor | None = None
    bias: torch.Tensor | None = None

    @property
    def out_features(self) -> int:
        return self.main_w.codes.shape[0]

    @property
    def cws_rank(self) -> int:
        return 0 if self.cws_down is None else self.cws_down.codes.shape[0]

    @property
    def mac_rank(self) -> int:
        return 0 if self.mac_down is None else self.mac_down.codes.shape[0]

    def to(self, device: torch.device | str) -> "SplitQLinear":
        def move(v):
            if isinstance(v, torch.Tensor):
                return v.to(device)
            if isinstance(v, QuantizedTensor):
                z = None if v.zero is None else v.zero.to(device)
                return QuantizedTensor(v.codes.to(device), v.scale.to(device), z, v.bits)
            return v

        return replace(self, **{f.name: move(getattr(self, f.name)) for f in fields(self)})


def _quantize_weight(w: torch.Tensor | None, bits: int, clip=None) -> QuantizedTensor | None:
    if w is None:
        return None
    with torch.no_grad():
        return quantize(w.detach(), bits, symmetric=True, dim=1, clip=1.0 if clip is None else clip.detach())


def quantize_linear(layer: SplitQFloatLinear, scheme: SplitQScheme) -> SplitQLinear:
    """Freeze a float layer: quantize every weight-side tensor as the fake-quant forward does."""
    wb, awb = scheme.weight_bits, scheme.aux_weight_bits
    shared = {
        f.name: (None if getattr(layer, f.name) is None else getattr(layer, f.name).detach())
        for f in fields(ChannelSplit)
    }
    return SplitQLinear(
        **shared,
        main_w=_quantize_weight(layer.main_residual_weight(), wb, layer.main_weight_clip),
        text_w=_quantize_weight(layer.text_weight, awb, layer.text_weight_clip),
        vision_w=_quantize_weight(layer.vision_weight, awb, layer.vision_weight_clip),
        cws_down=_quantize_weight(layer.cws_down, awb),
        cws_up=_quantize_weight(layer.cws_up, awb),
        mac_down=_quantize_weight(layer.mac_down, awb),
        mac_up=_quantize_weight(layer.mac_up, awb),
        bias=None if layer.bias is None else layer.bias.detach(),
    )


def _cat_rows(parts: list) -> object:
    first = parts[0]
    if first is None:
        return None
    if isinstance(first, QuantizedTensor):
        return QuantizedTensor(
            torch.cat([p.codes for p in parts]), torch.cat([p.scale for p in parts]), None, first.bits
        )
    return torch.cat(parts)


def concat_outputs(layers: list[SplitQLinear]) -> SplitQLinear:
    """Fuse layers that share one input (q/k/v -> qkv) by concatenating their outputs.

    Input-side fields must be identical; the checkpoint reader checks this first with a message
    naming the tensor, here it is an assertion.
    """
    first = layers[0]
    for other in layers[1:]:
        for name in INPUT_SIDE:
            a, b = getattr(first, name), getattr(other, name)
            a = a.codes if isinstance(a, QuantizedTensor) else a
            b = b.codes if isinstance(b, QuantizedTensor) else b
            assert (a is None) == (b is None) and (a is None or torch.equal(a, b)), name
    return replace(first, **{name: _cat_rows([getattr(l, name) for l in layers]) for name in OUTPUT_SIDE})


def split_outputs(layer: SplitQLinear, sizes: list[int]) -> list[SplitQLinear]:
    """The inverse of concat_outputs: one layer per output block of the given sizes."""
    if sum(sizes) != layer.out_features:
        raise ValueError(f"split sizes {sizes} do not sum to out_features {layer.out_features}")

    def part(v, start: int, size: int):
        if v is None:
            return None
        if isinstance(v, QuantizedTensor):
            return QuantizedTensor(v.codes[start : start + size], v.scale[start : start + size], None, v.bits)
        return v[start : start + size]

    out, start = [], 0
    for size in sizes:
        out.append(replace(layer, **{n: part(getattr(layer, n), start, size) for n in OUTPUT_SIDE}))
        start += size
    return out
