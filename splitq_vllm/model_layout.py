"""Where the quantizable linears of a Hugging Face VLM are, and what they are called on disk.

SplitQ quantizes the language model's decoder linears in input groups (linears that read the same
input; per family and layer type in `splitq_vllm.families`: q/k/v, o, gate/up, down for the
standard decoder layer). The
transformers module names (`model.language_model.layers.0.self_attn.q_proj`) can differ from the
tensor names in the model's files (Qwen2.5-VL: `model.layers.0...`, llava-hf:
`language_model.model.layers.0...`); a checkpoint
keeps the names of the files, so vLLM's and transformers' own name mappings keep working.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
from torch import nn

from splitq_vllm.checkpoint.reader import tensor_files
from splitq_vllm.families import STANDARD_GROUPS, Family, family_of, family_of_config

# (sub-module, group kind, members) of the standard decoder layer (memory estimates use it).
GROUP_SPECS = tuple((g.parent, g.kind, g.members) for g in STANDARD_GROUPS)


@dataclass(frozen=True)
class LinearGroup:
    """Linears of one decoder layer that read the same input.

    modules: their names in the transformers model; names: their names in the checkpoint files;
    name: the group's name in the checkpoint (`quantization_config.layers[*].group`).
    """

    layer: int
    kind: str
    modules: tuple[str, ...]
    names: tuple[str, ...]
    out_features: tuple[int, ...]
    in_features: int

    @property
    def name(self) -> str:
        return self.names[0].rsplit(".", 1)[0] + "." + self.kind


def source_tensor_files(model_dir: str | os.PathLike) -> dict[str, str]:
    """Tensor name -> safetensors file name for a Hugging Face model directory."""
    return tensor_files(model_dir)


def language_model_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The decoder layers of the language model and their module-name prefix (per its family)."""
    family = family_of(model)
    try:
        layers = model.get_submodule(family.layers)
    except AttributeError:
        layers = None
    if not isinstance(layers, nn.ModuleList):
        raise ValueError(f"{type(model).__name__}: no decoder layers at {family.layers!r} (family {family.name})")
    return family.layers, layers


def text_config(config):
    """The language model's config (the top-level config of a text-only model)."""
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def _file_name(layer_names: set[str], layer: int, parent: str, member: str) -> str:
    # Files name the LM `model.layers.N` (Qwen2.5-VL releases), `language_model.model.layers.N`
    # (llava-hf) or `model.language_model.layers.N` (new transformers); CLIP towers have the same
    # `layers.N.self_attn.q_proj` tails, so vision-tower names are left out.
    tail = f"layers.{layer}.{parent}.{member}"
    hits = [n for n in layer_names if n.endswith(tail) and "vision" not in n and "visual" not in n]
    if len(hits) != 1:
        raise ValueError(f"cannot find language-model layer {layer} {parent}.{member} in the files: {hits}")
    return hits[0]


def linear_groups(model: nn.Module, tensor_names: list[str]) -> list[LinearGroup]:
    """Every quantizable input group of the language model, in execution order.

    tensor_names: the tensor names in the model's files (source_tensor_files(dir) of a source model
    or a SplitQ checkpoint), used to find each linear's file name.
    """
    family = family_of(model)
    prefix, layers = language_model_layers(model)
    text_cfg = text_config(model.config)
    layer_names = {n.rsplit(".", 1)[0] for n in tensor_names}
    groups = []
    for i, layer in enumerate(layers):
        for spec in family.layer_kind(text_cfg, i).groups:
            parent, kind, members = spec.parent, spec.kind, spec.members
            mods = [getattr(getattr(layer, parent), m) for m in members]
            if not all(isinstance(m, nn.Linear) for m in mods):
                raise ValueError(f"layer {i}: {parent}.{members} are not all nn.Linear")
            groups.append(
                LinearGroup(
                    layer=i,
                    kind=kind,
                    modules=tuple(f"{prefix}.{i}.{parent}.{m}" for m in members),
                    names=tuple(_file_name(layer_names, i, parent, m) for m in members),
                    out_features=tuple(m.out_features for m in mods),
                    in_features=mods[0].in_features,
                )
            )
    return groups


def vision_tower_groups(model: nn.Module, tensor_names: list[str]) -> list[LinearGroup]:
    """Every quantizable input group of the vision tower's blocks (`Family.vision_tower`), in
    execution order; `layer` is the block index. Empty for a family without that description."""
    tower = family_of(model).vision_tower
    if tower is None:
        return []
    blocks = model.get_submodule(tower.blocks)
    present = {n.rsplit(".", 1)[0] for n in tensor_names}
    groups = []
    for i, block in enumerate(blocks):
        for spec in tower.block.groups:
            mods = [getattr(getattr(block, spec.parent), m) for m in spec.members]
            if not all(isinstance(m, nn.Linear) for m in mods):
                raise ValueError(f"vision block {i}: {spec.parent}.{spec.members} are not all nn.Linear")
            names = []
            for m in spec.members:
                tail = f"{tower.file_prefix}{i}.{spec.parent}.{m}"
                hits = [n for n in present if n == tail or n.endswith("." + tail)]
                if len(hits) != 1:
                    raise ValueError(f"cannot find vision-tower linear {tail} in the files: {hits}")
                names.append(hits[0])
            names = tuple(names)
            groups.append(
                LinearGroup(
                    layer=i,
                    kind=spec.kind,
                    modules=tuple(f"{tower.blocks}.{i}.{spec.parent}.{m}" for m in spec.members),
                    names=names,
                    out_features=tuple(m.out_features for m in mods),
                    in_features=mods[0].in_features,
                )
            )
    return groups


def group_weight(model: nn.Module, group: LinearGroup) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The group's weights concatenated along the output (out, in) and its bias (or None)."""
    mods = [model.get_submodule(m) for m in group.modules]
    weight = torch.cat([m.weight.detach() for m in mods])
    if all(m.bias is None for m in mods):
        return weight, None
    bias = torch.cat(
        [m.bias.detach() if m.bias is not None else torch.zeros(m.out_features, dtype=weight.dtype) for m in mods]
    )
    return weight, bias


def vision_token_ids(config) -> list[int]:
    """Token ids whose rows come from the vision tower (image and video placeholders)."""
    keys = family_of_config(config).vision_token_keys if getattr(config, "architectures", None) else Family.vision_token_keys
    ids = []
    for key in keys:
        v = getattr(config, key, None)
        if isinstance(v, int) and v not in ids:
            ids.append(v)
    if not ids:
        raise ValueError(f"{type(config).__name__}: no image/video token id in the config")
    return ids
