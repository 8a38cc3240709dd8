"""Block-wise SplitQ calibration of a Hugging Face VLM (FlatQuant style), resumable.

The run (`calibrate()` / `splitq-calibrate`):
1. Samples go through the model's processor and chat template (data.py).
2. A full forward per sample, stopped at decoder layer 0, captures that layer's input and its
   keyword arguments (attention mask, position ids, Qwen2.5-VL's M-RoPE position embeddings):
   whatever the model passes its decoder layers, so no model-specific position code is needed.
   Only the embeddings, vision tower and projector run (on the device); activations are kept in
   CPU memory.
3. Per decoder layer, alone on the device in float32:
   a. the FP forward over every sample gives the target outputs and, through the group inputs,
      per-channel statistics of each linear-input group (qkv, o, gate_up, down);
   b. per group: channel selection (MOCD by default), transforms, clipping and low-rank branches
      initialised (quantizer_init.GroupParams);
   c. training: all seven linears of the layer fake-quantized at once through the reference's
      `splitq_linear_fake` with each sample's text mask; loss = MSE between the FP layer output
      and the quantized layer output; AdamW, cosine decay (FlatQuant's recipe; the loss is
      divided by its own detached value before backward, as FlatQuant does);
   d. fold (P^-1 into the weights, clipping into the scales), quantize (`quantize_linear`), and
      write the layer's quantized groups to the work directory (atomically);
   e. the next layer's input is this layer's FP output (FlatQuant's choice: no error
      propagation, so layers are independent given the FP activations, and a resumed run only
      has to recompute FP activations to continue).
4. The checkpoint is exported from the per-layer files (export.export_checkpoint), then the
   work directory is removed.

Resuming: the work directory `<output>.partial/` holds `run.json` (a fingerprint of the settings
and of the processed samples) and one file per finished layer. A run started with the same
arguments finds it, recomputes the FP activations up to the first unfinished layer (cheap: one
forward per layer) and continues; every random draw is seeded by (seed, layer, group), so the
checkpoint is bit-identical to an uninterrupted run on the same machine and device. The
checkpoint carries no timestamps for the same reason (timings go to the log and `--report`).
"""

from __future__ import annotations

import copy
import json
import logging
import math
import os
import resource
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from splitq_kernels.reference import SplitQLinear, SplitQScheme, quantize_linear, splitq_linear_fake
from splitq_vllm.checkpoint import LayerDims, SplitQConfig
from splitq_vllm.checkpoint.tensors import layer_dims, layer_to_tensors, tensors_to_layer

from .data import CalibSample, prepare_samples
from .dims import outlier_counts
from .export import export_checkpoint
from .mocd import ChannelStats, select_channels, text_row_plan
from .model_layout import GROUP_SPECS, LinearGroup, language_model_layers, linear_groups, source_tensor_files
from .quantizer_init import GroupParams
from .recipe import CalibrationConfig, load_recipe

log = logging.getLogger("splitq_calibration")

STATE_VERSION = 1
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class CalibrationError(RuntimeError):
    pass


# ---------------------------------------------------------------------------------------------
# Small helpers
# ---------------------------------------------------------------------------------------------


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise CalibrationError(f"device {name!r}: CUDA is not available on this machine")
    return dev


def _tree_map(obj: Any, fn) -> Any:
    if isinstance(obj, torch.Tensor):
        return fn(obj)
    if isinstance(obj, tuple):
        return tuple(_tree_map(o, fn) for o in obj)
    if isinstance(obj, list):
        return [_tree_map(o, fn) for o in obj]
    if isinstance(obj, dict):
        return {k: _tree_map(v, fn) for k, v in obj.items()}
    return obj


def _to(obj: Any, device: torch.device, float_dtype: torch.dtype | None = None) -> Any:
    def move(t: torch.Tensor) -> torch.Tensor:
        if float_dtype is not None and t.is_floating_point():
            return t.to(device=device, dtype=float_dtype)
        return t.to(device)

    return _tree_map(obj, move)


def peak_memory_mb(device: torch.device) -> dict[str, float]:
    out = {"cpu_peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    if device.type == "cuda":
        out["cuda_peak_allocated_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
    return out


def _layer_output(out: Any) -> torch.Tensor:
    return out[0] if isinstance(out, (tuple, list)) else out


# ---------------------------------------------------------------------------------------------
# Capturing decoder-layer-0 inputs
# ---------------------------------------------------------------------------------------------


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


@dataclass
class LayerInputs:
    """Per sample: the decoder-layer input (1, T, H) on the CPU, its kwargs, its text mask."""

    hidden: list[torch.Tensor]
    kwargs: list[dict[str, Any]]
    text_masks: list[torch.Tensor]


def _check_layer_types(model: nn.Module) -> None:
    text_cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    types = getattr(text_cfg, "layer_types", None)
    if types and len(set(types)) > 1:
        raise CalibrationError(
            f"{type(model).__name__}: decoder layers of different attention types {sorted(set(types))} "
            "(sliding-window layers) are not supported: layer-0 arguments would not fit every layer"
        )


def capture_layer0_inputs(
    model: nn.Module, samples: list[CalibSample], device: torch.device, offload_dtype: torch.dtype
) -> LayerInputs:
    """Run each sample through the model up to decoder layer 0 (embeddings, vision tower and
    projector on `device`, decoder layers left on the CPU) and keep what layer 0 receives."""
    _check_layer_types(model)
    prefix, layers = language_model_layers(model)
    parent = model.get_submodule(prefix.rsplit(".", 1)[0])
    attr = prefix.rsplit(".", 1)[1]
    catcher = _Catcher()
    setattr(parent, attr, nn.ModuleList([catcher]))
    hidden, kwargs_list = [], []
    try:
        model.to(device)
        with torch.no_grad():
            for s in samples:
                inputs = _to(s.inputs, device)
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
                kwargs_list.append(_to(kw, torch.device("cpu")))
    finally:
        setattr(parent, attr, layers)
        model.to("cpu")
    return LayerInputs(hidden, kwargs_list, [s.text_mask for s in samples])


# ---------------------------------------------------------------------------------------------
# The layer under calibration: linears that run FP or fake-quantized, and collect statistics
# ---------------------------------------------------------------------------------------------


class MaskHolder:
    def __init__(self) -> None:
        self.mask: torch.Tensor | None = None


class GroupRunner:
    """Computes the fused group output once per input and hands each member its slice."""

    def __init__(self, params: GroupParams, scheme: SplitQScheme, mask: MaskHolder) -> None:
        self.params = params
        self.scheme = scheme
        self.mask = mask
        self.float_layer = None
        self._x: torch.Tensor | None = None
        self._y: torch.Tensor | None = None

    def refresh(self) -> None:
        self.float_layer = self.params.float_layer()
        self.clear()

    def clear(self) -> None:
        self._x = self._y = None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self._x is not x:
            self._y = splitq_linear_fake(x, self.mask.mask, self.float_layer, self.scheme)
            self._x = x
        return self._y


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


def _run_sample(work: nn.Module, mask: MaskHolder, inputs: LayerInputs, i: int, device: torch.device) -> torch.Tensor:
    mask.mask = inputs.text_masks[i].to(device)
    x = inputs.hidden[i].to(device=device, dtype=torch.float32)
    return _layer_output(work(x, **_to(inputs.kwargs[i], device, torch.float32)))


def collect_stats(
    work: nn.Module,
    calib: dict[str, list[CalibLinear]],
    mask: MaskHolder,
    inputs: LayerInputs,
    text_rows: list[torch.Tensor],
    device: torch.device,
    offload_dtype: torch.dtype,
) -> tuple[dict[str, ChannelStats], list[torch.Tensor]]:
    """FP forward of the (CalibLinear-equipped) layer over every sample: per-group input
    statistics and the layer outputs (kept in CPU memory in offload_dtype)."""
    stats = {}
    for kind, mods in calib.items():
        stats[kind] = ChannelStats.empty(mods[0].in_features)
        mods[0].stats = stats[kind]
    targets: list[torch.Tensor] = []
    try:
        with torch.no_grad():
            for i in range(len(inputs.hidden)):
                for mods in calib.values():
                    mods[0].keep_rows = text_rows[i]
                y = _run_sample(work, mask, inputs, i, device)
                targets.append(
                    y.to("cpu", offload_dtype) if device.type != "cpu" or offload_dtype != torch.float32 else y
                )
    finally:
        for mods in calib.values():
            mods[0].stats = None
            mods[0].keep_rows = None
    return stats, targets


@dataclass
class LayerResult:
    quantized: dict[str, SplitQLinear]
    info: dict[str, Any] = field(default_factory=dict)


def _group_members(layer: nn.Module, kind: str) -> tuple[str, tuple[str, ...]]:
    for parent, k, members in GROUP_SPECS:
        if k == kind:
            return parent, members
    raise KeyError(kind)


def install_calib_linears(layer: nn.Module, kinds: list[str], mask: MaskHolder) -> dict[str, list[CalibLinear]]:
    """Replace the member linears of the given group kinds in `layer` by CalibLinear modules."""
    out = {}
    for kind in kinds:
        parent_name, members = _group_members(layer, kind)
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


def _fused_weight(mods: list[CalibLinear]) -> tuple[torch.Tensor, torch.Tensor | None]:
    w = torch.cat([m.linear.weight.detach() for m in mods])
    if all(m.linear.bias is None for m in mods):
        return w, None
    return w, torch.cat(
        [
            m.linear.bias.detach() if m.linear.bias is not None else torch.zeros(m.out_features, device=w.device)
            for m in mods
        ]
    )


def _seed_for(seed: int, layer: int, group: int) -> int:
    return (seed * 1_000_003 + layer * 101 + group) % (2**63 - 1)


def init_group(
    stats: ChannelStats,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    cfg: CalibrationConfig,
    gen: torch.Generator,
    device: torch.device,
) -> GroupParams:
    """Channel selection (cfg.selection: MOCD or a Table 4 rule) and the parameter init of one
    linear-input group with weight (out, in) on `device`."""
    if cfg.selection == "none":
        k_t = k_v = 0
    else:
        k_t, k_v = outlier_counts(weight.shape[1], cfg.text_ratio, cfg.vision_ratio)
    idx_t, idx_v = select_channels(stats, cfg.selection, k_t, k_v, cfg.mocd_k, generator=gen, device=device)
    return GroupParams(weight, bias, idx_t, idx_v, stats, cfg, gen)


def train_runners(
    runners: dict[str, "GroupRunner"],
    run,
    targets: list[torch.Tensor],
    cfg: CalibrationConfig,
    device: torch.device,
    where: str,
    power: float,
    what: str = "",
) -> tuple[float, list[float], list[float]]:
    """FlatQuant's training of the groups' parameters: MSE between run(i) (the quantized forward
    of sample i) and targets[i], AdamW with two learning rates (transforms and gates; clipping),
    cosine decay, batches of cfg.batch_size samples. Returns (initial loss, [epoch losses...,
    loss after training], epoch seconds); the runners' parameters are trained in place."""
    n = len(targets)

    def epoch_loss(train: bool, order: list[int], optimizer=None, scheduler=None) -> float:
        total, count = 0.0, 0
        for start in range(0, len(order), cfg.batch_size):
            batch = order[start : start + cfg.batch_size]
            with torch.set_grad_enabled(train):
                for r in runners.values():
                    r.refresh()
                sse = torch.zeros((), device=device)
                elems = 0
                for i in batch:
                    y = run(i)
                    t = targets[i].to(device=device, dtype=torch.float32)
                    sse = sse + ((y - t) ** 2).sum()
                    elems += t.numel()
                    for r in runners.values():
                        r.clear()
                loss = sse / elems
            if not torch.isfinite(loss):
                raise CalibrationError(f"{where}: the calibration loss became {loss.item()} (try a lower --lr)")
            if train:
                optimizer.zero_grad(set_to_none=True)
                (loss / loss.detach().clamp(min=1e-30)).backward()
                optimizer.step()
                scheduler.step()
            total += loss.item() * elems
            count += elems
        for r in runners.values():
            r.float_layer = None
            r.clear()
        return total / max(count, 1)

    order = list(range(n))
    init_loss = epoch_loss(False, order)
    losses = [init_loss]
    log.info(
        "%s: initial loss %.4e (relative %.3e; %d samples, groups %s)",
        where,
        init_loss,
        init_loss / max(power, 1e-30),
        n,
        what,
    )
    main_params, clip_params = [], []
    epoch_seconds: list[float] = []
    for r in runners.values():
        a, b = r.params.param_groups()
        main_params += a
        clip_params += b
    if cfg.train and cfg.epochs > 0 and (main_params or clip_params):
        groups = []
        if main_params:
            groups.append({"params": main_params, "lr": cfg.lr})
        if clip_params:
            groups.append({"params": clip_params, "lr": cfg.clip_lr})
        optimizer = torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)
        steps = cfg.epochs * math.ceil(n / cfg.batch_size)
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=steps, eta_min=cfg.lr * 1e-3)
        for epoch in range(cfg.epochs):
            te = time.perf_counter()
            loss = epoch_loss(True, order, optimizer, scheduler)
            losses.append(loss)
            epoch_seconds.append(time.perf_counter() - te)
            if (epoch + 1) % cfg.log_every == 0 or epoch + 1 == cfg.epochs:
                log.info(
                    "%s epoch %d/%d: loss %.4e (relative %.3e, lr %.2e, %.1f s)",
                    where,
                    epoch + 1,
                    cfg.epochs,
                    loss,
                    loss / max(power, 1e-30),
                    optimizer.param_groups[0]["lr"],
                    time.perf_counter() - te,
                )
        losses.append(epoch_loss(False, order))  # the loss after training (epoch losses are running averages)
    return init_loss, losses, epoch_seconds


def calibrate_layer(
    layer: nn.Module,
    layer_index: int,
    inputs: LayerInputs,
    kinds: list[str],
    config: CalibrationConfig,
    device: torch.device,
    offload_dtype: torch.dtype = torch.float32,
    text_rows: list[torch.Tensor] | None = None,
    num_layers: int | None = None,
    want_outputs: bool = True,
) -> tuple[LayerResult, list[torch.Tensor] | None]:
    """Calibrate one decoder layer (a module of the model; it is not modified: a float32 copy
    runs on `device`). Returns the quantized fused groups by kind and the FP layer outputs
    (the next layer's inputs) in CPU memory."""
    cfg = config
    scheme = cfg.quant_scheme
    t0 = time.perf_counter()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    where = f"layer {layer_index + 1}/{num_layers}" if num_layers else f"layer {layer_index}"
    work = copy.deepcopy(layer).to(device=device, dtype=torch.float32)
    work.eval()
    for p in work.parameters():
        p.requires_grad_(False)
    mask = MaskHolder()
    calib = install_calib_linears(work, kinds, mask)
    if text_rows is None:
        text_rows = text_row_plan(inputs.text_masks, cfg.mocd_max_tokens, cfg.seed)

    # (a) FP targets and statistics
    stats, targets = collect_stats(work, calib, mask, inputs, text_rows, device, offload_dtype)
    power = sum(float((t.float() ** 2).sum()) for t in targets) / max(sum(t.numel() for t in targets), 1)

    # (b) channel selection and init
    runners: dict[str, GroupRunner] = {}
    info: dict[str, Any] = {"groups": {}}
    for gi, (kind, mods) in enumerate(calib.items()):
        gen = torch.Generator().manual_seed(_seed_for(cfg.seed, layer_index, gi))
        w, b = _fused_weight(mods)  # on the device: the SVD of Eq. 20 runs there
        params = init_group(stats[kind], w, b, cfg, gen, device)
        idx_t, idx_v = params.idx_text, params.idx_vision
        runners[kind] = GroupRunner(params, scheme, mask)
        for m in mods:
            m.runner = runners[kind]
        info["groups"][kind] = {
            "text_channels": idx_t.tolist(),
            "vision_channels": idx_v.tolist(),
            "cws_rank": params.cws_rank,
            "mac_rank": params.mac_rank,
        }

    def run(i: int) -> torch.Tensor:
        return _run_sample(work, mask, inputs, i, device)

    init_loss, losses, epoch_seconds = train_runners(
        runners, run, targets, cfg, device, where, power, ", ".join(kinds)
    )
    # (d) fold and quantize
    quantized = {}
    with torch.no_grad():
        for kind, r in runners.items():
            quantized[kind] = quantize_linear(r.params.float_layer(), scheme).to("cpu")
    info.update(
        init_loss=init_loss,
        final_loss=losses[-1],
        output_power=power,
        epoch_losses=losses[1:-1] if len(losses) > 1 else [],
        epoch_seconds=epoch_seconds,
        seconds=time.perf_counter() - t0,
        **peak_memory_mb(device),
    )
    log.info("%s done in %.1f s: loss %.4e -> %.4e", where, info["seconds"], init_loss, losses[-1])
    return LayerResult(quantized, info), (targets if want_outputs else None)


def fp_layer_forward(
    layer: nn.Module, inputs: LayerInputs, device: torch.device, offload_dtype: torch.dtype
) -> list[torch.Tensor]:
    """The FP outputs of one decoder layer (float32 copy on `device`), as calibrate_layer computes them."""
    work = copy.deepcopy(layer).to(device=device, dtype=torch.float32).eval()
    out = []
    with torch.no_grad():
        for i in range(len(inputs.hidden)):
            x = inputs.hidden[i].to(device=device, dtype=torch.float32)
            y = _layer_output(work(x, **_to(inputs.kwargs[i], device, torch.float32)))
            out.append(y.to("cpu", offload_dtype) if device.type != "cpu" or offload_dtype != torch.float32 else y)
    del work
    return out


# ---------------------------------------------------------------------------------------------
# Work directory: per-layer results and the run fingerprint
# ---------------------------------------------------------------------------------------------


def _layer_file(work_dir: Path, layer: int) -> Path:
    return work_dir / f"layer_{layer:05d}.safetensors"


def save_layer_state(
    path: Path, quantized: dict[str, tuple[LinearGroup, SplitQLinear]], scheme: SplitQScheme, info: dict
) -> None:
    tensors, dims = {}, {}
    for gname, (group, q) in quantized.items():
        for suffix, t in layer_to_tensors(q, scheme).items():
            tensors[f"{gname}.{suffix}"] = t.detach().to("cpu").contiguous().clone()
        dims[gname] = layer_dims(q, gname).to_dict()
    if not tensors:
        tensors["_empty"] = torch.zeros(1)
    meta = {"dims": json.dumps(dims, sort_keys=True), "info": json.dumps(info, sort_keys=True)}
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata=meta)
    os.replace(tmp, path)


def load_layer_state(path: Path, scheme: SplitQScheme) -> tuple[dict[str, SplitQLinear], dict]:
    with safe_open(str(path), "pt") as fh:
        meta = fh.metadata()
        dims = json.loads(meta["dims"])
        info = json.loads(meta["info"])
        out = {}
        for gname, d in dims.items():
            prefix = gname + "."
            t = {k[len(prefix) :]: fh.get_tensor(k) for k in fh.keys() if k.startswith(prefix)}
            out[gname] = tensors_to_layer(t, LayerDims.from_dict(d, f"{path}: {gname}"), scheme)
    return out, info


def samples_fingerprint(samples: list[CalibSample]) -> str:
    import hashlib

    h = hashlib.sha256()
    for s in samples:
        h.update(s.id.encode())
        for k in sorted(s.inputs):
            v = s.inputs[k]
            if isinstance(v, torch.Tensor):
                h.update(k.encode())
                h.update(str(tuple(v.shape)).encode())
                h.update(v.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes() if v.numel() else b"")
    return h.hexdigest()[:16]


# ---------------------------------------------------------------------------------------------
# The whole run
# ---------------------------------------------------------------------------------------------


def _ignored(name: str, ignore: list[str]) -> bool:
    return SplitQConfig(scheme=SplitQScheme.from_name("w4a4"), ignore=ignore).is_ignored(name)


def groups_to_quantize(groups: list[LinearGroup], ignore: list[str]) -> list[LinearGroup]:
    """The groups not matched by the ignore list; a group is ignored whole or not at all."""
    out = []
    for g in groups:
        hits = [_ignored(m, ignore) or _ignored(n, ignore) for m, n in zip(g.modules, g.names)]
        if all(hits):
            continue
        if any(hits):
            names = [m for m, h in zip(g.modules, hits) if h]
            raise CalibrationError(
                f"ignore list matches {names} but not the other linears of input group {g.name}; "
                "linears that share an input (q/k/v, gate/up) are quantized or ignored together"
            )
        out.append(g)
    return out


def load_model(model_dir: str | os.PathLike):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    path = Path(model_dir)
    if not (path / "config.json").is_file():
        raise CalibrationError(f"model {path}: no config.json (expected a Hugging Face model directory)")
    processor = AutoProcessor.from_pretrained(path)
    model = AutoModelForImageTextToText.from_pretrained(path, dtype="auto")
    return model.eval(), processor


def calibrate(
    model: str | os.PathLike,
    data: Any,
    output: str | os.PathLike,
    recipe: str | os.PathLike | dict | CalibrationConfig | None = None,
    **settings: Any,
) -> Path:
    """Calibrate `model` (a Hugging Face model directory) on `data` and write a SplitQ checkpoint
    to `output`; returns its path. `recipe`: a YAML file, a dict or a CalibrationConfig; keyword
    settings (CalibrationConfig fields, e.g. scheme="w3a3", epochs=5) override it."""
    if isinstance(recipe, CalibrationConfig):
        cfg = recipe
    elif isinstance(recipe, dict):
        cfg = CalibrationConfig.from_dict(recipe)
    elif recipe is not None:
        cfg = load_recipe(recipe)
    else:
        cfg = CalibrationConfig()
    cfg = cfg.updated(**settings).resolved()
    return Calibrator(model, data, output, cfg).run()


def oneshot(
    model: str | os.PathLike,
    dataset: Any,
    output_dir: str | os.PathLike,
    recipe: str | os.PathLike | dict | CalibrationConfig | None = None,
    num_calibration_samples: int | None = None,
    max_seq_length: int | None = None,
    **settings: Any,
) -> Path:
    """llm-compressor-style spelling of `calibrate`."""
    if num_calibration_samples is not None:
        settings["num_samples"] = num_calibration_samples
    if max_seq_length is not None:
        settings["max_seq_len"] = max_seq_length
    return calibrate(model, dataset, output_dir, recipe, **settings)


class Calibrator:
    def __init__(
        self, model_dir: str | os.PathLike, data: Any, output: str | os.PathLike, config: CalibrationConfig
    ) -> None:
        self.model_dir = Path(model_dir)
        self.data = data
        self.output = Path(output)
        self.config = config
        self.work_dir = self.output.with_name(self.output.name + ".partial")
        self.device = resolve_device(config.device)
        self.offload_dtype = DTYPES[config.offload_dtype]

    def _prepare_work_dir(self, fingerprint: dict[str, Any]) -> set[int]:
        run_file = self.work_dir / "run.json"
        if self.work_dir.exists() and self.config.restart:
            shutil.rmtree(self.work_dir)
        if run_file.is_file():
            old = json.loads(run_file.read_text())
            if old.get("fingerprint") != fingerprint:
                diff = sorted(
                    k
                    for k in set(old.get("fingerprint", {}).get("config", {})) | set(fingerprint["config"])
                    if old.get("fingerprint", {}).get("config", {}).get(k) != fingerprint["config"].get(k)
                )
                other = [
                    k
                    for k in ("model", "samples", "state_version")
                    if old.get("fingerprint", {}).get(k) != fingerprint.get(k)
                ]
                raise CalibrationError(
                    f"{self.work_dir} holds an unfinished run with different settings ({', '.join(diff + other)}); "
                    "rerun with the same arguments to resume it, or pass --restart to discard it"
                )
            done = set()
            for p in sorted(self.work_dir.glob("layer_*.safetensors")):
                done.add(int(p.stem.split("_")[1]))
            return done
        self.work_dir.mkdir(parents=True, exist_ok=True)
        tmp = run_file.with_name("run.json.tmp")
        tmp.write_text(json.dumps({"fingerprint": fingerprint}, indent=2, sort_keys=True, default=str))
        os.replace(tmp, run_file)
        return set()

    def run(self) -> Path:
        cfg = self.config
        scheme = cfg.quant_scheme
        if self.output.exists() and not cfg.overwrite:
            raise FileExistsError(f"{self.output} exists; pass --overwrite (overwrite=True) to replace it")
        t_start = time.perf_counter()
        torch.manual_seed(cfg.seed)
        model, processor = load_model(self.model_dir)
        samples = prepare_samples(
            self.data,
            processor,
            model.config,
            num_samples=cfg.num_samples,
            max_seq_len=cfg.max_seq_len,
            seed=cfg.seed,
            image_dir=cfg.image_dir,
            prompt=cfg.prompt,
            on_bad_sample=cfg.on_bad_sample,
        )
        n_tok = sum(s.num_tokens for s in samples)
        n_vis = sum(s.num_vision_tokens for s in samples)
        log.info("%d calibration samples, %d tokens (%d vision, %d text)", len(samples), n_tok, n_vis, n_tok - n_vis)
        groups = linear_groups(model, list(source_tensor_files(self.model_dir)))
        todo = groups_to_quantize(groups, cfg.ignore)
        prefix, layers = language_model_layers(model)
        fingerprint = {
            "config": cfg.identity(),
            "model": str(self.model_dir.resolve()),
            "samples": samples_fingerprint(samples),
            "state_version": STATE_VERSION,
        }
        done = self._prepare_work_dir(fingerprint)
        num_layers = len(layers)
        by_layer: dict[int, list[LinearGroup]] = {}
        for g in todo:
            by_layer.setdefault(g.layer, []).append(g)
        remaining = [i for i in range(num_layers) if i not in done]
        if done:
            log.info("resuming %s: layers %s already calibrated", self.work_dir, sorted(done))
        report: dict[str, Any] = {"layers": {}, "device": str(self.device), "samples": len(samples), "tokens": n_tok}
        if remaining:
            inputs = capture_layer0_inputs(model, samples, self.device, self.offload_dtype)
            text_rows = text_row_plan(inputs.text_masks, cfg.mocd_max_tokens, cfg.seed)
            for i in range(num_layers):
                if i > max(remaining):
                    break
                if i in done:
                    log.info("layer %d/%d: done earlier, recomputing its FP output", i + 1, num_layers)
                    inputs.hidden = fp_layer_forward(layers[i], inputs, self.device, self.offload_dtype)
                    continue
                kinds = [g.kind for g in by_layer.get(i, [])]
                result, outputs = calibrate_layer(
                    layers[i],
                    i,
                    inputs,
                    kinds,
                    cfg,
                    self.device,
                    self.offload_dtype,
                    text_rows,
                    num_layers,
                    want_outputs=i < num_layers - 1,
                )
                by_kind = {g.kind: g for g in by_layer.get(i, [])}
                save_layer_state(
                    _layer_file(self.work_dir, i),
                    {by_kind[k].name: (by_kind[k], q) for k, q in result.quantized.items()},
                    scheme,
                    {k: result.info[k] for k in ("init_loss", "final_loss")},
                )
                report["layers"][i] = result.info
                if outputs is not None:
                    inputs.hidden = outputs
            del inputs
        # export from the per-layer files (the same path for fresh and resumed runs)
        quantized: dict[str, tuple[LinearGroup, SplitQLinear]] = {}
        layer_losses = []
        for i in range(num_layers):
            states, info = load_layer_state(_layer_file(self.work_dir, i), scheme)
            layer_losses.append([info.get("init_loss"), info.get("final_loss")])
            for g in by_layer.get(i, []):
                quantized[g.name] = (g, states[g.name])
        metadata = {
            "method": cfg.method,
            "tool": "splitq-calibrate",
            "data": str(self.data)
            if not isinstance(self.data, (list, tuple))
            else f"python list of {len(self.data)} samples",
            "samples": len(samples),
            "tokens": n_tok,
            "vision_tokens": n_vis,
            "seed": cfg.seed,
            "settings": cfg.identity(),
            "layer_loss_init_final": layer_losses,
        }
        del model
        path = export_checkpoint(
            self.model_dir,
            self.output,
            quantized,
            scheme,
            ignore=list(cfg.ignore),
            calibration=metadata,
            overwrite=cfg.overwrite,
        )
        report["seconds"] = time.perf_counter() - t_start
        report.update(peak_memory_mb(self.device))
        if cfg.report:
            Path(cfg.report).write_text(json.dumps(report, indent=2, default=str))
        if not cfg.keep_work_dir:
            shutil.rmtree(self.work_dir, ignore_errors=True)
        log.info("wrote %s in %.1f s", path, report["seconds"])
        return path
