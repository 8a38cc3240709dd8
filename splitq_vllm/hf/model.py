"""A SplitQ checkpoint loaded back into its transformers model, for evaluation without vLLM.

Every quantized linear becomes a SplitQLinearModule that runs the reference integer forward
(`splitq_kernels.reference.splitq_linear`), so this model computes exactly what the checkpoint
defines. The text mask comes from the token ids of each forward call: a row is vision when its
token is an image or video placeholder and the call carries pixel values (the rows the vision
tower fills), text otherwise; so decoded tokens are text, even a generated placeholder token
(its row holds the token's text embedding): the rule the vLLM plugin applies (`is_multimodal`).
Vision-tower linears (a checkpoint calibrated with `quantize_vision_tower`) see patch rows only:
they run with an all-vision mask of their own input's row count, not the language model's.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from splitq_kernels.decode_mode import reference_linear_for_step
from splitq_kernels.precision import product_precision
from splitq_kernels.reference import SplitQLinear, SplitQScheme, splitq_linear
from splitq_vllm.checkpoint import read_checkpoint
from splitq_vllm.families import is_vision_tower_layer
from splitq_vllm.model_layout import linear_groups, vision_token_ids, vision_tower_groups


# the forward arguments that carry images / videos (every supported family's names); generate()
# encodes them first and passes `mm_encoder_outputs` (modality -> output) instead
PIXEL_KEYS = ("pixel_values", "pixel_values_videos")


def carries_pixels(kwargs: dict) -> bool:
    """Whether a forward call brings vision-tower input (so placeholder rows get its embeddings)."""
    encoded = kwargs.get("mm_encoder_outputs")
    if isinstance(encoded, dict) and any(v is not None for v in encoded.values()):
        return True
    return any(kwargs.get(k) is not None for k in PIXEL_KEYS)


class TextMask:
    """Which rows of the current forward are text; shared by all SplitQ modules of one model."""

    def __init__(self, vision_ids: list[int]) -> None:
        self.vision_ids = torch.tensor(vision_ids)
        self.mask: torch.Tensor | None = None
        self.has_pixels = True  # whether the current forward call carries images or videos

    def update(self, input_ids: torch.Tensor | None) -> None:
        if input_ids is None:
            self.mask = None
        elif not self.has_pixels:
            self.mask = torch.ones_like(input_ids, dtype=torch.bool)
        else:
            self.mask = ~torch.isin(input_ids, self.vision_ids.to(input_ids.device))


def target_device(fn, like: torch.Tensor) -> torch.device:
    """Where an `nn.Module._apply` function sends tensors (asked with an empty integer tensor,
    which no dtype cast touches)."""
    return fn(torch.zeros(0, dtype=torch.int8, device=like.device)).device


class SplitQLinearModule(nn.Module):
    """nn.Linear stand-in running the SplitQ reference forward on the current text mask.

    The layer's tensors keep their checkpoint dtypes (float32 transforms and scales, integer
    codes): `model.to(dtype)` moves them but does not cast them; the output follows x's dtype.
    `layer` is None only in a subclass that builds it later (quantizer.SplitQCheckpointLinear).
    """

    def __init__(
        self, layer: SplitQLinear | None, scheme: SplitQScheme, text_mask: TextMask | None, all_vision: bool = False
    ) -> None:
        super().__init__()
        self.layer = layer
        self.scheme = scheme
        self.text_mask = text_mask
        self.all_vision = all_vision  # a vision-tower linear: every row is a vision row
        if layer is not None:
            self.in_features = layer.in_features
            self.out_features = layer.out_features

    def _apply(self, fn, recurse=True):
        self.layer = self.layer.to(target_device(fn, self.layer.main_w.codes))
        return super()._apply(fn, recurse)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // x.shape[-1]
        if self.all_vision:
            vision_rows = torch.zeros(x.shape[:-1], dtype=torch.bool, device=x.device)
            return splitq_linear(x, vision_rows, self.layer, self.scheme, product_precision())  # SPLITQ_PRECISION
        mask = self.text_mask.mask
        if mask is None or mask.numel() != rows:
            raise RuntimeError(
                "SplitQ layers need the token ids of each forward call to know which rows are text "
                f"(got {None if mask is None else mask.numel()} mask rows for {rows} input rows); "
                "call the model with input_ids, not inputs_embeds"
            )
        return reference_linear_for_step(x, mask, self.layer, self.scheme)  # SPLITQ_DECODE_MODE, SPLITQ_PRECISION

    def extra_repr(self) -> str:
        l = self.layer
        if l is None:
            return f"in={self.in_features}, out={self.out_features}, {self.scheme.name}, not built"
        return (
            f"in={self.in_features}, out={self.out_features}, {self.scheme.name}, "
            f"{'all vision, ' if self.all_vision else ''}main={l.idx_main.numel()}, "
            f"text={l.idx_text.numel()}, vision={l.idx_vision.numel()}, cws={l.cws_rank}, mac={l.mac_rank}"
        )


def install_text_mask(model: nn.Module) -> TextMask:
    """A TextMask refreshed from `input_ids` before every forward of `model`."""
    text_mask = TextMask(vision_token_ids(model.config))

    def hook(module, args, kwargs):
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        text_mask.has_pixels = carries_pixels(kwargs)
        text_mask.update(input_ids)

    model.register_forward_pre_hook(hook, with_kwargs=True)
    return text_mask


def quantizable_modules(
    model: nn.Module, tensor_names: list[str], quantized: list[str] = ()
) -> dict[str, tuple[str, bool]]:
    """Checkpoint layer name (the files') -> (module name in `model`, whether it is a vision-tower
    linear): the language model's decoder linears and, when `quantized` (the checkpoint's
    layers) has tower linears, the tower blocks' linears (families.VisionTower)."""
    out = {n: (m, False) for g in linear_groups(model, tensor_names) for n, m in zip(g.names, g.modules)}
    if any(is_vision_tower_layer(n) for n in quantized):
        out.update({n: (m, True) for g in vision_tower_groups(model, tensor_names) for n, m in zip(g.names, g.modules)})
    return out


def replace_linears(
    model: nn.Module, layers: dict[str, SplitQLinear], scheme: SplitQScheme, vision: set[str] = frozenset()
) -> TextMask:
    """Swap the named nn.Linear modules (transformers names) for SplitQ modules sharing one mask
    (those in `vision`, tower linears, with an all-vision mask)."""
    text_mask = install_text_mask(model)
    for module_name, layer in layers.items():
        parent_name, child = module_name.rsplit(".", 1)
        old = model.get_submodule(module_name)
        if (old.in_features, old.out_features) != (layer.in_features, layer.out_features):
            raise ValueError(
                f"{module_name}: checkpoint layer is {layer.in_features}->{layer.out_features}, "
                f"model layer is {old.in_features}->{old.out_features}"
            )
        device = old.weight.device
        module = SplitQLinearModule(layer.to(device), scheme, text_mask, all_vision=module_name in vision)
        setattr(model.get_submodule(parent_name), child, module)
    return text_mask


def load_quantized_model(
    path: str | os.PathLike, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"
) -> nn.Module:
    """Load a SplitQ checkpoint directory as a transformers model (validated first)."""
    from transformers import AutoConfig, AutoModelForImageTextToText

    ckpt = read_checkpoint(path)
    config = AutoConfig.from_pretrained(path)
    for cfg in (config, getattr(config, "text_config", None)):
        if cfg is not None and hasattr(cfg, "quantization_config"):
            delattr(cfg, "quantization_config")
    # The quantized layers have no 16-bit weight in the files: transformers reports them missing
    # (and the SplitQ tensors unexpected) before they are replaced below.
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        model = AutoModelForImageTextToText.from_pretrained(Path(path), config=config, dtype=dtype)
    finally:
        hf_logging.set_verbosity(level)
    model = model.to(device).eval()
    by_file_name = quantizable_modules(model, list(ckpt.weight_map), list(ckpt.quant_config.layers))
    missing = [n for n in ckpt.quant_config.layers if n not in by_file_name]
    if missing:
        raise ValueError(
            f"{path}: quantized layers {missing[:4]} are not language-model decoder linears (or vision-tower "
            "linears) of this model"
        )
    layers = {by_file_name[n][0]: ckpt.layer(n) for n in ckpt.quant_config.layers}
    vision = {by_file_name[n][0] for n in ckpt.quant_config.layers if by_file_name[n][1]}
    replace_linears(model, layers, ckpt.scheme, vision)
    return model


def with_vision_tower_from(model: nn.Module, tower_checkpoint: str | os.PathLike) -> nn.Module:
    """`model` (a reference model: `load_quantized_model` of a checkpoint with a 16-bit tower)
    with its vision tower's linears replaced by those of `tower_checkpoint` (calibrated with
    `quantize_vision_tower`, from the same source model), each at its own checkpoint's bits.

    This is how the reference scores a tower and a language model at different bit settings
    (Table 13: tower W4A4, LM W3A3): the format has one bit setting per checkpoint. Calibration
    gives the language model the FP tower's outputs, so a checkpoint's LM groups do not depend on
    whether (or at which bits) its tower was quantized, and the tower's groups do not depend on
    the LM's: the composition is the model a run with both bit settings would give."""
    ckpt = read_checkpoint(tower_checkpoint)
    if model.config.architectures != ckpt.model_config.get("architectures"):
        archs = ckpt.model_config.get("architectures")
        raise ValueError(f"{tower_checkpoint}: architectures {archs} are not the model's")
    names = list(ckpt.quant_config.layers)
    tower = {n: m for g in vision_tower_groups(model, list(ckpt.weight_map)) for n, m in zip(g.names, g.modules)}
    chosen = [n for n in names if n in tower]
    if not chosen:
        raise ValueError(f"{tower_checkpoint}: no vision-tower layers (calibrate it with quantize_vision_tower)")
    device = model.get_input_embeddings().weight.device
    for name in chosen:
        parent_name, child = tower[name].rsplit(".", 1)
        module = SplitQLinearModule(ckpt.layer(name).to(device), ckpt.scheme, None, all_vision=True)
        setattr(model.get_submodule(parent_name), child, module)
    return model
