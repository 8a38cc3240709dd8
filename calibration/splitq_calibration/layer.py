"""One decoder layer under calibration: its linears swapped for stand-ins that run FP (and record
the statistics of their input) or fake-quantized, and its FP forward over the calibration set.

Each member linear of a quantized input group (q/k/v, o, gate/up, down) becomes a `CalibLinear`.
In FP mode it runs the original nn.Linear; the group's first member also updates the group's
`ChannelStats` with its input. Once the group has a `GroupRunner` (the method's trainable
parameters), every member runs the fused fake-quant forward of the group, computed once per input
by the runner, and takes its slice of the outputs; the FP weights are then dropped
(`drop_fp_weights`): the runner's parameters hold the frozen weights.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

from splitq_kernels.reference import FakeQuantWeights, SplitQScheme, splitq_linear_fake
from splitq_vllm.families import group_spec

from .activations import ActivationStore
from .capture import LayerInputs, to_device
from .errors import CalibrationError
from .group_params import GroupParams
from .mocd import ChannelStats


class MaskHolder:
    """The text mask of the sample being run, shared by the layer's stand-ins."""

    def __init__(self) -> None:
        self.mask: torch.Tensor | None = None


class GroupRunner:
    """Computes the fused group output once per input and hands each member its slice.

    One training step: `begin_step` evaluates the group's weight side once (without a graph;
    as leaves that collect gradients when training), the per-sample forwards and backwards use
    it, `finish_step` carries the collected gradients into the parameters. So a step keeps one
    copy of the fake-quantized weights and the graph of one sample, not the graph of a batch.
    """

    def __init__(self, params: GroupParams, scheme: SplitQScheme, mask: MaskHolder) -> None:
        self.params = params
        self.scheme = scheme
        self.mask = mask
        self.weights: FakeQuantWeights | None = None
        self._x: torch.Tensor | None = None
        self._y: torch.Tensor | None = None

    def begin_step(self, train: bool) -> None:
        self.weights = self.params.fake_weights()
        if train:
            for t in _weight_tensors(self.weights):
                t.requires_grad_(True)
        self.clear()

    def finish_step(self, grad_scale: float) -> None:
        """Scale the collected weight-side gradients and backpropagate them into the parameters."""
        grads = {}
        for name in FakeQuantWeights.__dataclass_fields__:
            t = getattr(self.weights, name)
            if t is not None and t.grad is not None:
                grads[name] = t.grad.mul_(grad_scale)  # in place: no third copy of the weights
        self.end_step()  # the leaves go; their gradients stay
        self.params.backward_weights(
            FakeQuantWeights(**{f: grads.get(f) for f in FakeQuantWeights.__dataclass_fields__})
        )

    def end_step(self) -> None:
        self.weights = None
        self.clear()

    def clear(self) -> None:
        self._x = self._y = None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self._x is not x:
            if self.weights is None:
                raise RuntimeError("GroupRunner called outside a step (begin_step first)")
            self._y = splitq_linear_fake(x, self.mask.mask, self.params.input_side(), self.scheme, self.weights)
            self._x = x
        return self._y


def _weight_tensors(w: FakeQuantWeights) -> list[torch.Tensor]:
    """The float tensors of a weight side that gradients reach (the bias is frozen)."""
    return [getattr(w, f) for f in FakeQuantWeights.__dataclass_fields__ if f != "bias" and getattr(w, f) is not None]


class CalibLinear(nn.Module):
    """Stands in for one member linear: FP (optionally recording input statistics) or fake-quant."""

    def __init__(self, linear: nn.Linear, mask: MaskHolder, offset: int, first: bool) -> None:
        super().__init__()
        self.linear = linear
        self.mask = mask
        self.offset = offset
        self.first = first  # the member whose input statistics stand for the group
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.runner: GroupRunner | None = None
        self.stats: ChannelStats | None = None
        self.keep_rows: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.runner is not None:
            return self.runner(x)[..., self.offset : self.offset + self.out_features]
        if self.stats is not None and self.first:
            self.stats.update(x, self.mask.mask, self.keep_rows)
        return self.linear(x)


def _group_members(kind: str) -> tuple[str, tuple[str, ...]]:
    spec = group_spec(kind)  # splitq_vllm.families: kinds are unique across families
    return spec.parent, spec.members


def install_calib_linears(layer: nn.Module, kinds: list[str], mask: MaskHolder) -> dict[str, list[CalibLinear]]:
    """Replace the member linears of the given group kinds in `layer` by CalibLinear modules."""
    out = {}
    for kind in kinds:
        parent_name, members = _group_members(kind)
        parent = getattr(layer, parent_name)
        mods, offset = [], 0
        for i, m in enumerate(members):
            lin = getattr(parent, m)
            if not isinstance(lin, nn.Linear):
                raise CalibrationError(f"{parent_name}.{m} is {type(lin).__name__}, expected nn.Linear")
            cl = CalibLinear(lin, mask, offset, first=i == 0)
            setattr(parent, m, cl)
            mods.append(cl)
            offset += lin.out_features
        out[kind] = mods
    return out


def drop_fp_weights(mods: list[CalibLinear]) -> None:
    """Free the FP weights of a group's members once its runner holds the frozen weights."""
    for m in mods:
        m.linear = None


def fused_weight(mods: list[CalibLinear]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The group's weights concatenated along the output (out, in) and its bias (or None)."""
    w = torch.cat([m.linear.weight.detach() for m in mods])
    if all(m.linear.bias is None for m in mods):
        return w, None
    return w, torch.cat(
        [
            m.linear.bias.detach()
            if m.linear.bias is not None
            else torch.zeros(m.out_features, dtype=w.dtype, device=w.device)
            for m in mods
        ]
    )


def layer_output(out: Any) -> torch.Tensor:
    return out[0] if isinstance(out, (tuple, list)) else out


def run_sample(work: nn.Module, mask: MaskHolder, inputs: LayerInputs, i: int, device: torch.device) -> torch.Tensor:
    """The layer's output for sample i (float32 on `device`), with the sample's text mask set."""
    mask.mask = inputs.text_masks[i].to(device)
    x = inputs.input(i, device)
    return layer_output(work(x, **to_device(inputs.kwargs[i], device, torch.float32)))


def collect_stats(
    work: nn.Module,
    calib: dict[str, list[CalibLinear]],
    mask: MaskHolder,
    inputs: LayerInputs,
    text_rows: list[torch.Tensor],
    device: torch.device,
    offload_dtype: torch.dtype,
    store: ActivationStore | list,
) -> tuple[dict[str, ChannelStats], ActivationStore | list]:
    """FP forward of the (CalibLinear-equipped) layer over every sample: per-group input
    statistics, and the layer outputs appended to `store` in offload_dtype (on the CPU)."""
    stats = {}
    for kind, mods in calib.items():
        stats[kind] = ChannelStats.empty(mods[0].in_features)
        mods[0].stats = stats[kind]
    try:
        with torch.no_grad():
            for i in range(len(inputs.hidden)):
                for mods in calib.values():
                    mods[0].keep_rows = text_rows[i]
                store.append(run_sample(work, mask, inputs, i, device).to("cpu", offload_dtype))
    finally:
        for mods in calib.values():
            mods[0].stats = None
            mods[0].keep_rows = None
    return stats, store


def float32_layer(layer: nn.Module, device: torch.device, consume: bool) -> nn.Module:
    """The layer in float32 on `device`: converted in place when `consume` (the pipeline's
    layers, reloaded from the files whenever needed), else a converted copy."""
    work = layer if consume else copy.deepcopy(layer)
    return work.to(device=device, dtype=torch.float32).eval()


def prepare_work_layer(
    layer: nn.Module, kinds: list[str], device: torch.device, consume: bool
) -> tuple[nn.Module, MaskHolder, dict[str, list[CalibLinear]], dict[str, tuple[torch.Tensor, torch.Tensor | None]]]:
    """The layer as a calibration method runs it (SplitQ's and the baselines'): a copy, or with
    `consume` (the pipeline) the module itself, on `device` with its parameters frozen; the `kinds`
    groups' linears replaced by CalibLinear stand-ins reading one MaskHolder; each group's fused
    weight and bias taken in the layer's own dtype (bf16: the frozen weights), then the layer
    converted to float32. Returns (work, mask, calib, frozen)."""
    work = layer if consume else copy.deepcopy(layer)
    work.to(device)
    for p in work.parameters():
        p.requires_grad_(False)
    mask = MaskHolder()
    calib = install_calib_linears(work, kinds, mask)
    frozen = {kind: fused_weight(mods) for kind, mods in calib.items()}
    return float32_layer(work, device, consume=True), mask, calib, frozen


def fp_layer_forward(
    layer: nn.Module,
    inputs: LayerInputs,
    device: torch.device,
    offload_dtype: torch.dtype,
    store: ActivationStore | list | None = None,
    consume: bool = False,
) -> ActivationStore | list:
    """The FP outputs of one decoder layer (run in float32 on `device`), as calibrate_layer
    computes them, appended to `store` (a new list if None)."""
    work = float32_layer(layer, device, consume)
    for p in work.parameters():
        p.requires_grad_(False)
    mask = MaskHolder()
    out = [] if store is None else store
    with torch.no_grad():
        for i in range(len(inputs.hidden)):
            out.append(run_sample(work, mask, inputs, i, device).to("cpu", offload_dtype))
    return out
