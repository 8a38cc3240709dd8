"""Step 1 of the pipeline: what decoder layer 0 receives, for every calibration sample.

A full forward per sample with stand-ins for the decoder layers that record their input and
keyword arguments (attention mask, position ids, Qwen2.5-VL's M-RoPE position embeddings) and stop
the forward: whatever the model passes its decoder layers, so no model-specific position code is
needed. Only the embeddings, the vision tower and the projector run (the caller has loaded them
on the device; the decoder layers can stay on the meta device); the activations go to an
activation store on the CPU. The keyword arguments depend on the positions and the layer's type,
not on the hidden states: they are kept once per layer type (`text_config.layer_types`: Gemma 3's
sliding and full attention, Qwen3.5's linear and full attention), from the first layer of each
type; the stand-ins before it pass the hidden states through, and the forward stops there.

Families with deepstack (Qwen3-VL, `splitq_vllm.families`) add visual features to the outputs of
their first layers; the language model's forward receives them (`deepstack_visual_embeds`,
`visual_pos_masks`) and they are recorded here, so that `LayerInputs.input` hands layer i + 1 its
input with them added, as the model does.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from splitq_vllm.families import family_of
from splitq_vllm.model_layout import language_model_layers, text_config

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
class Deepstack:
    """One sample's deepstack features: `embeds[j]` (n_visual, H) is added at the rows of
    `positions` (T,) to the output of decoder layer j."""

    positions: torch.Tensor
    embeds: list[torch.Tensor]


@dataclass
class LayerInputs:
    """Per sample: the decoder-layer input (1, T, H) on the CPU, its kwargs, its text mask.

    `kwargs` are those of the current layer (`at_layer`); `kwargs_by_type` holds them per layer
    type where the layers differ. `hidden` holds the previous layer's outputs; `input` adds what
    the model adds between layers (deepstack) when it reads them.
    """

    hidden: ActivationStore | list[torch.Tensor]
    kwargs: list[dict[str, Any]]
    text_masks: list[torch.Tensor]
    kwargs_by_type: dict[str, list[dict[str, Any]]] | None = None
    layer_types: list[str] | None = None
    deepstack: list[Deepstack | None] | None = None
    layer: int = 0

    def at_layer(self, i: int) -> None:
        """Make these the inputs of decoder layer i (its type's kwargs; the deepstack features
        added after layer i - 1); i = the number of layers: the final norm's input."""
        self.layer = i
        if self.kwargs_by_type is not None and i < len(self.layer_types):
            self.kwargs = self.kwargs_by_type[self.layer_types[i]]

    def input(self, s: int, device: torch.device) -> torch.Tensor:
        """Sample s's input to the current layer, float32 on `device`."""
        x = self.hidden[s].to(device=device, dtype=torch.float32)
        ds = self.deepstack[s] if self.deepstack is not None else None
        j = self.layer - 1
        if ds is not None and 0 <= j < len(ds.embeds):
            x = x.clone()
            pos = ds.positions.to(device)
            x[0, pos] = x[0, pos] + ds.embeds[j].to(device=device, dtype=torch.float32)
        return x


class _Stop(Exception):
    pass


class _Catcher(nn.Module):
    """Stands in for decoder layer `index`: records its kwargs (the first layer of its type) and
    its input (layer 0), passes the hidden states on, and stops the forward at `last`."""

    def __init__(self, index: int, layer_type: str, records: dict[str, dict[str, Any]], last: bool) -> None:
        super().__init__()
        self.index, self.layer_type, self.records, self.last = index, layer_type, records, last
        self.hidden: torch.Tensor | None = None

    def forward(self, hidden_states, *args, **kwargs):
        if args:
            raise CalibrationError("decoder layer called with positional arguments besides the hidden states")
        if self.index == 0:
            self.hidden = hidden_states
        self.records.setdefault(self.layer_type, kwargs)
        if self.last:
            raise _Stop
        return hidden_states


def _clean_kwargs(kw: dict[str, Any]) -> dict[str, Any]:
    kw = {k: v for k, v in kw.items() if k not in ("past_key_values", "past_key_value", "use_cache")}
    kw["use_cache"] = False
    return to_device(kw, torch.device("cpu"))


def capture_layer0_inputs(
    model: nn.Module,
    samples: list[CalibSample],
    device: torch.device,
    offload_dtype: torch.dtype,
    store: ActivationStore | None = None,
) -> LayerInputs:
    """Run each sample through the model up to decoder layer 0 (the embeddings, the vision tower
    and the projector, which the caller has put on `device`) and keep what layer 0 receives:
    the hidden states in `store` (a list if None) in offload_dtype, the kwargs on the CPU (per
    layer type), and the deepstack features of families that have them."""
    family = family_of(model)
    prefix, layers = language_model_layers(model)
    text_cfg = text_config(model.config)
    types = [family.layer_type(text_cfg, i) for i in range(len(layers))]
    for i in range(len(layers)):
        family.layer_kind(text_cfg, i)  # an unknown layer type fails before any forward
    distinct = list(dict.fromkeys(types))
    last = max(types.index(t) for t in distinct)
    lm_name, attr = prefix.rsplit(".", 1)
    parent = model.get_submodule(lm_name)
    records: dict[str, dict[str, Any]] = {}
    catchers = [_Catcher(i, types[i], records, i == last) for i in range(last + 1)]
    setattr(parent, attr, nn.ModuleList(catchers))
    lm_kwargs: dict[str, Any] = {}
    hook = None
    if family.deepstack:
        hook = parent.register_forward_pre_hook(lambda m, a, kw: lm_kwargs.update(kw), with_kwargs=True)
    hidden = [] if store is None else store
    by_type: dict[str, list[dict[str, Any]]] = {t: [] for t in distinct}
    deepstack: list[Deepstack | None] = []
    try:
        with torch.no_grad():
            for s in samples:
                inputs = to_device(s.inputs, device)
                records.clear()
                lm_kwargs.clear()
                catchers[0].hidden = None
                try:
                    model(**inputs, use_cache=False)
                except _Stop:
                    pass
                if catchers[0].hidden is None or len(records) != len(distinct):
                    raise CalibrationError(f"sample {s.id!r}: the model forward never reached decoder layer {last}")
                hidden.append(catchers[0].hidden.detach().to("cpu", offload_dtype))
                for t in distinct:
                    by_type[t].append(_clean_kwargs(records[t]))
                if family.deepstack:
                    deepstack.append(_deepstack(lm_kwargs, s.id))
                catchers[0].hidden = None
                records.clear()
                lm_kwargs.clear()
    finally:
        setattr(parent, attr, layers)
        if hook is not None:
            hook.remove()
    single = len(distinct) == 1
    return LayerInputs(
        hidden,
        by_type[types[0]],
        [s.text_mask for s in samples],
        kwargs_by_type=None if single else by_type,
        layer_types=None if single else types,
        deepstack=deepstack if family.deepstack else None,
    )


def _deepstack(lm_kwargs: dict[str, Any], sample_id: str) -> Deepstack | None:
    """The deepstack features the language model received for one sample (None without images)."""
    embeds = lm_kwargs.get("deepstack_visual_embeds")
    positions = lm_kwargs.get("visual_pos_masks")
    if embeds is None:
        return None
    if positions is None or positions.shape[0] != 1:
        raise CalibrationError(f"sample {sample_id!r}: deepstack features without a (1, T) visual position mask")
    return Deepstack(positions[0].detach().cpu(), [e.detach().to("cpu", torch.float32) for e in embeds])
