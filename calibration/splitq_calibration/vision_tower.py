"""Vision-tower quantization (the paper's A.4, Table 13; `quantize_vision_tower`).

The tower's blocks (`splitq_vllm.families.VisionTower`: Qwen2.5-VL's attn.qkv, attn.proj,
mlp gate/up, mlp.down) are calibrated block by block with the per-group method of the decoder
layers (method.calibrate_layer), before them. Every row the tower sees is a vision row (patch
embeddings), so the text mask is all False and two of SplitQ's parts have nothing to work on:

- MOCD: the text outlier set is empty (Eq. 9-11 need text tokens), the vision set is chosen by
  magnitude alone (Eq. 7-8), at `vision_ratio` of the channels (text_ratio is 0 there);
- MAC: it compensates text rows only (mac_rows "text", the paper's), and there are none: its
  rank is 0 there (mac_ratio 0), so the checkpoint carries no MAC factors for the tower;
- CWS (on the main path, every row) and the transforms, clipping and training are unchanged.

What block 0 receives is captured like decoder layer 0 (capture._Catcher stands in for the
blocks): the patch embeddings of each sample with images, and the kwargs the blocks get
(cu_seqlens, max_seqlen, the rotary position embeddings), once per block type: Qwen2.5-VL's
window-attention blocks and its full-attention blocks get different cu_seqlens. Samples without
images do not reach the tower and are left out of its calibration.

Between blocks, as between decoder layers, the next block's input is this block's FP output
(FlatQuant's choice). The language model is calibrated on the FP tower's outputs, for the same
reason: no error propagation, so each part's result does not depend on the other and a resumed
run only recomputes FP activations.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import nn

from splitq_vllm.families import VisionTower, family_of

from .activations import ActivationStore
from .capture import LayerInputs, _Catcher, _Stop, to_device
from .data import CalibSample
from .errors import CalibrationError
from .recipe import CalibrationConfig

# the forward arguments that bring images / videos to the tower
PIXEL_KEYS = ("pixel_values", "pixel_values_videos")

# seeds of the tower's groups: seed_for(seed, VISION_SEED_BLOCK0 + block, group), apart from the
# decoder layers' (which use their index)
VISION_SEED_BLOCK0 = 1_000_000


def tower_of(model: nn.Module) -> VisionTower:
    family = family_of(model)
    if family.vision_tower is None:
        raise CalibrationError(
            f"quantize_vision_tower: the {family.name} family has no vision-tower description in "
            "splitq_vllm/families.py (supported: Qwen2.5-VL)"
        )
    return family.vision_tower


def tower_config(cfg: CalibrationConfig) -> CalibrationConfig:
    """The settings of the tower's groups: no text outlier set, no MAC (no text rows)."""
    return dataclasses.replace(cfg, text_ratio=0.0, mac_ratio=0.0)


def has_pixels(sample: CalibSample) -> bool:
    return any(sample.inputs.get(k) is not None for k in PIXEL_KEYS)


def capture_tower_inputs(
    model: nn.Module,
    samples: list[CalibSample],
    device: torch.device,
    offload_dtype: torch.dtype,
    store: ActivationStore | None = None,
) -> LayerInputs:
    """What vision block 0 receives for every sample with images (the embeddings and the tower,
    loaded by the caller, run; the forward stops at the tower's last distinct block type): its
    input (N, D) in `store` (a list if None) in offload_dtype, the kwargs per block type on the
    CPU, and an all-vision mask per sample."""
    tower = tower_of(model)
    parent_name, attr = tower.blocks.rsplit(".", 1)
    parent = model.get_submodule(parent_name)
    blocks = getattr(parent, attr)
    vcfg = model.config.vision_config
    types = [tower.block_type(vcfg, i) for i in range(len(blocks))]
    distinct = list(dict.fromkeys(types))
    last = max(types.index(t) for t in distinct)
    records: dict[str, dict[str, Any]] = {}
    catchers = [_Catcher(i, types[i], records, i == last) for i in range(last + 1)]
    setattr(parent, attr, nn.ModuleList(catchers))
    hidden = [] if store is None else store
    by_type: dict[str, list[dict[str, Any]]] = {t: [] for t in distinct}
    masks: list[torch.Tensor] = []
    try:
        with torch.no_grad():
            for s in samples:
                if not has_pixels(s):
                    continue
                records.clear()
                catchers[0].hidden = None
                try:
                    model(**to_device(s.inputs, device), use_cache=False)
                except _Stop:
                    pass
                if catchers[0].hidden is None or len(records) != len(distinct):
                    raise CalibrationError(f"sample {s.id!r}: the forward never reached vision block {last}")
                x = catchers[0].hidden.detach()
                hidden.append(x.to("cpu", offload_dtype))
                for t in distinct:
                    by_type[t].append(to_device(records[t], torch.device("cpu")))
                masks.append(torch.zeros(x.shape[:-1], dtype=torch.bool))  # every row a vision row
                catchers[0].hidden = None
                records.clear()
    finally:
        setattr(parent, attr, blocks)
    if not masks:
        raise CalibrationError(
            "quantize_vision_tower: no calibration sample has an image; the tower has nothing to see"
        )
    single = len(distinct) == 1
    return LayerInputs(
        hidden,
        by_type[types[0]],
        masks,
        kwargs_by_type=None if single else by_type,
        layer_types=None if single else types,
    )
