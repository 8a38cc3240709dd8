"""Step 1 of the pipeline: what decoder layer 0 receives, for every calibration sample.

A full forward per sample with a stand-in for decoder layer 0 that records its input and keyword
arguments (attention mask, position ids, Qwen2.5-VL's M-RoPE position embeddings) and stops the
forward: whatever the model passes its decoder layers, so no model-specific position code is
needed. Only the embeddings, the vision tower and the projector run (the caller has loaded them
on the device; the decoder layers can stay on the meta device); the activations go to an
activation store on the CPU. The same keyword arguments serve every decoder layer (they depend on
the positions, not on the hidden states), which is why models whose layers differ in attention
type are refused.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from splitq_vllm.model_layout import language_model_layers

from .activations import ActivationStore
from .data import CalibSample
from .errors import CalibrationError


def tree_map(obj: Any, fn) -> Any:
    """fn applied to every tensor of a nest of tuples, lists and dicts."""
    if isinstance(obj, torch.Tensor):
        return fn(obj)
    if isinstance(obj, tuple):
        return tuple(tree_map(o, fn) for o in obj)
    if isinstance(obj, list):
        return [tree_map(o, fn) for o in obj]
    if isinstance(obj, dict):
        return {k: tree_map(v, fn) for k, v in obj.items()}
    return obj


def to_device(obj: Any, device: torch.device, float_dtype: torch.dtype | None = None) -> Any:
    """Every tensor of `obj` on `device`, floating-point ones cast to `float_dtype` if given."""

    def move(t: torch.Tensor) -> torch.Tensor:
        if float_dtype is not None and t.is_floating_point():
            return t.to(device=device, dtype=float_dtype)
        return t.to(device)

    return tree_map(obj, move)


@dataclass
class LayerInputs:
    """Per sample: the decoder-layer input (1, T, H) on the CPU, its kwargs, its text mask."""

    hidden: ActivationStore | list[torch.Tensor]
    kwargs: list[dict[str, Any]]
    text_masks: list[torch.Tensor]


class _Stop(Exception):
    pass


class _Catcher(nn.Module):
    """Stands in for decoder layer 0: records its input and keyword arguments, then stops."""

    def __init__(self) -> None:
        super().__init__()
        self.record: tuple[torch.Tensor, dict[str, Any]] | None = None

    def forward(self, hidden_states, *args, **kwargs):
        if args:
            raise CalibrationError("decoder layer called with positional arguments besides the hidden states")
        self.record = (hidden_states, kwargs)
        raise _Stop


def check_layer_types(model: nn.Module) -> None:
    """Refuse models whose decoder layers differ in attention type (layer-0 kwargs would not fit all)."""
    text_cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    types = getattr(text_cfg, "layer_types", None)
    if types and len(set(types)) > 1:
        raise CalibrationError(
            f"{type(model).__name__}: decoder layers of different attention types {sorted(set(types))} "
            "(sliding-window layers) are not supported: layer-0 arguments would not fit every layer"
        )


def capture_layer0_inputs(
    model: nn.Module,
    samples: list[CalibSample],
    device: torch.device,
    offload_dtype: torch.dtype,
    store: ActivationStore | None = None,
) -> LayerInputs:
    """Run each sample through the model up to decoder layer 0 (the embeddings, the vision tower
    and the projector, which the caller has put on `device`) and keep what layer 0 receives:
    the hidden states in `store` (a list if None) in offload_dtype, the kwargs on the CPU."""
    check_layer_types(model)
    prefix, layers = language_model_layers(model)
    parent = model.get_submodule(prefix.rsplit(".", 1)[0])
    attr = prefix.rsplit(".", 1)[1]
    catcher = _Catcher()
    setattr(parent, attr, nn.ModuleList([catcher]))
    hidden = [] if store is None else store
    kwargs_list = []
    try:
        with torch.no_grad():
            for s in samples:
                inputs = to_device(s.inputs, device)
                catcher.record = None
                try:
                    model(**inputs, use_cache=False)
                except _Stop:
                    pass
                if catcher.record is None:
                    raise CalibrationError(f"sample {s.id!r}: the model forward never reached decoder layer 0")
                h, kw = catcher.record
                kw = {k: v for k, v in kw.items() if k not in ("past_key_values", "past_key_value", "use_cache")}
                kw["use_cache"] = False
                hidden.append(h.detach().to("cpu", offload_dtype))
                kwargs_list.append(to_device(kw, torch.device("cpu")))
                catcher.record = None
    finally:
        setattr(parent, attr, layers)
    return LayerInputs(hidden, kwargs_list, [s.text_mask for s in samples])
