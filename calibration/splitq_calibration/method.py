"""The per-group method, applied to one decoder layer: init, train, fold and quantize.

For the layer's quantized input groups (q/k/v, o, gate/up, down), given the layer's inputs over the
calibration set:
a. the FP forward gives the target outputs and, through the group inputs, per-channel statistics
   (layer.collect_stats);
b. per group: channel selection (MOCD by default, mocd.py) and the parameter init
   (group_params.GroupParams: transforms, clipping, CWS/MAC branches);
c. training: all linears of the layer fake-quantized at once through the reference's
   `splitq_linear_fake` with each sample's text mask; loss = MSE between the FP layer output and
   the quantized layer output; AdamW with two learning rates, cosine decay (FlatQuant's recipe; the
   loss is divided by its own detached value before backward, as FlatQuant does). A step's
   weight side is evaluated once and the samples of the batch are backpropagated one at a time
   (layer.GroupRunner), which gives the gradient of the batch loss with the memory of one
   sample; if training ends above the initial loss the initial parameters are kept (a warning);
d. fold (P^-1 into the weights, clipping into the scales) and quantize (`quantize_linear`).
Every random draw is seeded by (seed, layer, group), so a layer's result does not depend on what
ran before it.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from splitq_kernels.reference import SplitQLinear

from .activations import ActivationStore
from .baselines import BASELINES, calibrate_baseline_layer
from .capture import LayerInputs
from .dims import outlier_counts
from .errors import CalibrationError
from .group_params import GroupParams
from .layer import (
    GroupRunner,
    collect_stats,
    drop_fp_weights,
    prepare_work_layer,
    run_sample,
)
from .memory import peak_memory_mb
from .mocd import ChannelStats, select_channels, text_row_plan
from .progress import log, where
from .recipe import CalibrationConfig


def seed_for(seed: int, layer: int, group: int) -> int:
    """The seed of group `group` of decoder layer `layer` (independent of the order of the run)."""
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


@dataclass
class TrainResult:
    init_loss: float
    losses: list[float]  # per epoch (running averages), then the loss after training
    epoch_seconds: list[float]
    output_power: float  # mean square of the targets: losses relative to it are in the log


def train_groups(
    runners: dict[str, GroupRunner],
    run: Callable[[int], torch.Tensor],
    targets: ActivationStore | list[torch.Tensor],
    cfg: CalibrationConfig,
    device: torch.device,
) -> TrainResult:
    """FlatQuant's training of the groups' parameters: MSE between run(i) (the quantized forward
    of sample i) and targets[i], AdamW with two learning rates (transforms and gates; clipping),
    cosine decay, batches of cfg.batch_size samples; the runners' parameters are trained in place."""
    n = len(targets)
    power = sum(float((t.float() ** 2).sum()) for t in targets) / max(sum(t.numel() for t in targets), 1)
    params = [p for r in runners.values() for p in r.params.parameters() if p.requires_grad]

    def epoch_loss(train: bool, order: list[int], optimizer=None, scheduler=None) -> float:
        total, count = 0.0, 0
        if not train:  # the parameters do not change: one weight side for the whole pass
            for r in runners.values():
                r.begin_step(False)
        for start in range(0, len(order), cfg.batch_size):
            batch = order[start : start + cfg.batch_size]
            if train:
                for r in runners.values():
                    r.begin_step(True)
            sse, elems = 0.0, 0
            for i in batch:
                with torch.set_grad_enabled(train):
                    y = run(i)
                    t = targets[i].to(device=device, dtype=torch.float32)
                    sample_sse = ((y - t) ** 2).sum()
                if not torch.isfinite(sample_sse):
                    for r in runners.values():
                        r.end_step()
                    raise CalibrationError(where(f"the calibration loss became {sample_sse.item()} (try a lower --lr)"))
                if train:
                    sample_sse.backward()
                sse += sample_sse.item()
                elems += t.numel()
                for r in runners.values():
                    r.clear()
            if train:
                # d(loss / loss.detach()) = d(sse) / sse: FlatQuant's normalisation of the batch loss
                scale = 1.0 / max(sse, 1e-30)
                for p in params:
                    if p.grad is not None:
                        p.grad.mul_(scale)
                for r in runners.values():
                    r.finish_step(scale)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
            total += sse
            count += elems
        if not train:
            for r in runners.values():
                r.end_step()
        return total / max(count, 1)

    order = list(range(n))
    init_loss = epoch_loss(False, order)
    losses = [init_loss]
    log.info("initial loss %.4e (relative %.3e; %d samples)", init_loss, init_loss / max(power, 1e-30), n)
    main_params, clip_params = [], []
    epoch_seconds: list[float] = []
    for r in runners.values():
        a, b = r.params.param_groups()
        main_params += a
        clip_params += b
    if cfg.train and cfg.epochs > 0 and (main_params or clip_params):
        initial = {k: {n: p.detach().clone() for n, p in r.params.named_parameters()} for k, r in runners.items()}
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
                    "epoch %d/%d: loss %.4e (relative %.3e, lr %.2e, %.1f s)",
                    epoch + 1,
                    cfg.epochs,
                    loss,
                    loss / max(power, 1e-30),
                    optimizer.param_groups[0]["lr"],
                    time.perf_counter() - te,
                )
        del optimizer
        final = epoch_loss(False, order)  # the loss after training (epoch losses are running averages)
        if final > init_loss:
            log.warning(
                "training raised the loss (%.4e -> %.4e): keeping the initial parameters (try a lower --lr)",
                init_loss,
                final,
            )
            with torch.no_grad():
                for k, r in runners.items():
                    for name, p in r.params.named_parameters():
                        p.copy_(initial[k][name])
            final = init_loss
        losses.append(final)
    return TrainResult(init_loss, losses, epoch_seconds, power)


@dataclass
class LayerResult:
    quantized: dict[str, SplitQLinear]
    info: dict[str, Any] = field(default_factory=dict)


def calibrate_layer(
    layer: nn.Module,
    layer_index: int,
    inputs: LayerInputs,
    kinds: list[str],
    config: CalibrationConfig,
    device: torch.device,
    offload_dtype: torch.dtype = torch.float32,
    text_rows: list[torch.Tensor] | None = None,
    want_outputs: bool = True,
    store: ActivationStore | None = None,
    consume: bool = False,
) -> tuple[LayerResult, ActivationStore | list[torch.Tensor] | None]:
    """Calibrate one decoder layer. Returns the quantized fused groups by kind and the FP layer
    outputs (the next layer's inputs, appended to `store` or a new list) on the CPU.

    The layer runs in float32 on `device`: a converted copy, or (`consume`, the pipeline) the
    module itself, converted in place and its linears' weights freed once the frozen copies (in
    the layer's own dtype) are taken."""
    cfg = config
    if cfg.method in BASELINES:  # MBQ, MASQuant, VLMQ: their own per-layer algorithm
        return calibrate_baseline_layer(
            layer, layer_index, inputs, kinds, cfg, device, offload_dtype, text_rows, want_outputs, store, consume
        )
    t0 = time.perf_counter()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    work, mask, calib, frozen = prepare_work_layer(layer, kinds, device, consume)
    if text_rows is None:
        text_rows = text_row_plan(inputs.text_masks, cfg.mocd_max_tokens, cfg.seed)
    timings: dict[str, Any] = {}

    # (a) FP targets and statistics
    stats, targets = collect_stats(
        work, calib, mask, inputs, text_rows, device, offload_dtype, [] if store is None else store
    )
    for mods in calib.values():
        drop_fp_weights(mods)
    timings["stats_s"] = time.perf_counter() - t0

    # (b) channel selection and init
    t1 = time.perf_counter()
    runners: dict[str, GroupRunner] = {}
    info: dict[str, Any] = {"groups": {}}
    for gi, (kind, mods) in enumerate(calib.items()):
        gen = torch.Generator().manual_seed(seed_for(cfg.seed, layer_index, gi))
        w, b = frozen.pop(kind)  # on the device: the SVD of Eq. 20 runs there
        params = init_group(stats[kind], w, b, cfg, gen, device)
        del w, b
        runners[kind] = GroupRunner(params, cfg.quant_scheme, mask)
        for m in mods:
            m.runner = runners[kind]
        info["groups"][kind] = {
            "text_channels": params.idx_text.tolist(),
            "vision_channels": params.idx_vision.tolist(),
            "cws_rank": params.cws_rank,
            "mac_rank": params.mac_rank,
        }
    timings["init_s"] = time.perf_counter() - t1
    log.info("groups %s initialised (%.1f s)", ", ".join(kinds), timings["init_s"])

    # (c) training
    t2 = time.perf_counter()
    trained = train_groups(runners, lambda i: run_sample(work, mask, inputs, i, device), targets, cfg, device)
    timings["train_s"] = time.perf_counter() - t2

    # (d) fold and quantize
    t3 = time.perf_counter()
    quantized = {kind: r.params.quantized().to("cpu") for kind, r in runners.items()}
    timings["quantize_s"] = time.perf_counter() - t3
    for mods in calib.values():  # the stand-ins stay in the (consumed) layer: they must not keep
        for m in mods:  # the runners' frozen weights alive after the layer is released
            m.runner = None
    del runners
    info.update(
        init_loss=trained.init_loss,
        final_loss=trained.losses[-1],
        output_power=trained.output_power,
        epoch_losses=trained.losses[1:-1] if len(trained.losses) > 1 else [],
        epoch_seconds=trained.epoch_seconds,
        seconds=time.perf_counter() - t0,
        **timings,
        **peak_memory_mb(device),
    )
    log.info("done in %.1f s: loss %.4e -> %.4e", info["seconds"], trained.init_loss, trained.losses[-1])
    return LayerResult(quantized, info), (targets if want_outputs else None)
