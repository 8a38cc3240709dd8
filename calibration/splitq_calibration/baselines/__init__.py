"""The SplitQ paper's baselines as methods of their own: MBQ (mbq.py), MASQuant (masquant.py) and
VLMQ (vlmq.py), each a small module with its paper's algorithm, run per decoder layer by
`calibrate_baseline_layer` in place of SplitQ's train step (method.calibrate_layer dispatches
here for these methods), with the statistics the pipeline already gathers (layer.collect_stats:
FP targets and per-modality channel statistics) plus the sampled group inputs and, for MBQ and
VLMQ, one block-wise backward (common.token_gradients). Each result is a SplitQLinear per group,
so the pipeline's export, the reference scorer and the vLLM plugin take it unchanged
(docs/calibration.md, "Baselines", says what each format mapping approximates).
"""

from __future__ import annotations

import time
import torch
from torch import nn

from ..capture import LayerInputs
from ..layer import (
    collect_stats,
    drop_fp_weights,
    prepare_work_layer,
    run_sample,
)
from ..memory import peak_memory_mb
from ..mocd import ChannelStats, text_row_plan
from ..progress import log
from ..recipe import CalibrationConfig
from . import masquant, mbq, vlmq
from .common import (
    GroupSamples,
    InputRecorder,
    TokenGradients,
    layer_loss,
    plain_params,
    sample_positions,
    token_gradients,
)

BASELINES = ("mbq", "masquant", "vlmq")
NEEDS_GRADIENTS = ("mbq", "vlmq")


def calibrate_baseline_layer(
    layer: nn.Module,
    layer_index: int,
    inputs: LayerInputs,
    kinds: list[str],
    config: CalibrationConfig,
    device: torch.device,
    offload_dtype: torch.dtype = torch.float32,
    text_rows: list[torch.Tensor] | None = None,
    want_outputs: bool = True,
    store=None,
    consume: bool = False,
):
    """method.calibrate_layer for a baseline method (same arguments and result)."""
    from ..method import LayerResult, seed_for

    cfg = config
    t0 = time.perf_counter()
    work, mask, calib, frozen = prepare_work_layer(layer, kinds, device, consume)
    if text_rows is None:
        text_rows = text_row_plan(inputs.text_masks, cfg.mocd_max_tokens, cfg.seed)

    # (a) FP targets, channel statistics and the sampled group inputs, in one FP pass
    positions = sample_positions(inputs.text_masks, cfg.baseline_max_tokens, cfg.seed + layer_index)
    samples = {kind: GroupSamples() for kind in calib}
    recorders = {kind: InputRecorder(samples[kind], positions, mask) for kind in calib}
    handles = [calib[k][0].register_forward_pre_hook(recorders[k]) for k in calib]

    class _Counting(list):  # the recorders learn which sample runs from the store's appends
        def append(self, item) -> None:
            super().append(item)
            for r in recorders.values():
                r.i = len(self)

    try:
        stats, targets = collect_stats(work, calib, mask, inputs, text_rows, device, offload_dtype, _Counting())
    finally:
        for h in handles:
            h.remove()
    for mods in calib.values():
        drop_fp_weights(mods)
    gens = {k: torch.Generator().manual_seed(seed_for(cfg.seed, layer_index, gi)) for gi, k in enumerate(calib)}
    rtn = {k: plain_params(*frozen[k], stats[k], cfg, gens[k]) for k in calib}

    # (b) the block-wise backward (MBQ's sensitivities, VLMQ's importance)
    grads, init_loss = None, None
    if cfg.method in NEEDS_GRADIENTS:
        grads, init_loss = token_gradients(work, calib, rtn, mask, inputs, targets, positions, cfg, device)
    else:
        init_loss = layer_loss(work, calib, rtn, mask, inputs, targets, cfg, device)

    # (c) the method, group by group
    quantized, info = {}, {"groups": {}}
    final = {}
    for kind, mods in calib.items():
        w, b = frozen[kind]
        s, gen = samples[kind], gens[kind]
        if cfg.method == "mbq":
            g_t, g_v = grads[kind].modality_means()
            q, gi = mbq.calibrate_group(w, b, s, stats[kind], g_t, g_v, cfg, gen)
        elif cfg.method == "masquant":
            q, gi = masquant.calibrate_group(w, b, s, stats[kind], cfg, gen)
        else:
            g_rows = torch.cat(grads[kind].rows)
            q, gi = vlmq.calibrate_group(w, b, s, stats[kind], g_rows, [m.out_features for m in mods], kind, cfg, gen)
        quantized[kind] = q.to("cpu")
        final[kind] = q
        info["groups"][kind] = gi
    del rtn

    # (d) the layer loss of the result (the integer layers, run in float: what is served)
    final_loss = _served_loss(work, calib, final, mask, inputs, targets, cfg, device)
    info.update(init_loss=init_loss, final_loss=final_loss, seconds=time.perf_counter() - t0, **peak_memory_mb(device))
    log.info(
        "%s: layer loss %.4e (RTN) -> %.4e in %.1f s", cfg.method, init_loss, final_loss, info["seconds"]
    )
    if store is not None:  # the pipeline's store (it may spill to disk): the outputs go there
        for t in targets:
            store.append(t)
        targets = store
    return LayerResult(quantized, info), (targets if want_outputs else None)


def _served_loss(work, calib, quantized, mask, inputs, targets, cfg, device) -> float:
    """Mean squared error of the layer with its groups run through the integer reference forward."""
    from splitq_kernels.reference import splitq_linear

    class _Integer:
        def __init__(self, q):
            self.q, self._x, self._y = q, None, None

        def __call__(self, x):
            if self._x is not x:
                self._y = splitq_linear(x, mask.mask, self.q, cfg.quant_scheme)
                self._x = x
            return self._y

    for kind, mods in calib.items():
        r = _Integer(quantized[kind])
        for m in mods:
            m.runner = r
    total, count = 0.0, 0
    try:
        with torch.no_grad():
            for i in range(len(inputs.hidden)):
                y = run_sample(work, mask, inputs, i, device)
                total += float(((y - targets[i].to(device=device, dtype=torch.float32)) ** 2).sum())
                count += y.numel()
    finally:
        for mods in calib.values():
            for m in mods:
                m.runner = None
    return total / max(count, 1)


def calibrate_linear(
    method: str,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    xs: list[torch.Tensor],
    masks: list[torch.Tensor],
    cfg: CalibrationConfig,
):
    """One linear on its own (benchmarks/layer_level.py): the block is the linear, so the token
    gradients are those of ||Y_rtn - Y||^2, 2 |Y_rtn - Y|. Returns (SplitQLinear, info, and for
    MASQuant the full Eq. 29 forward `MASQuantLinear`, else None)."""
    from splitq_kernels.reference import splitq_linear

    stats = ChannelStats.empty(weight.shape[1])
    for x, m in zip(xs, masks):
        stats.update(x, m, None)
    positions = sample_positions(masks, cfg.baseline_max_tokens, cfg.seed)
    samples = GroupSamples(
        [x[p] for x, p in zip(xs, positions)], [m[p] for m, p in zip(masks, positions)], positions,
        sum(int(m.sum()) for m in masks), sum(int((~m).sum()) for m in masks),
    )  # fmt: skip
    gen = torch.Generator().manual_seed(cfg.seed)
    rtn = plain_params(weight, bias, stats, cfg, gen).quantized()
    grads = TokenGradients()
    for x, m, p in zip(xs, masks, positions):
        y = torch.nn.functional.linear(x, weight, bias)
        grads.add(2 * (splitq_linear(x, m, rtn, cfg.quant_scheme) - y), m, p)
    if method == "mbq":
        g_t, g_v = grads.modality_means()
        return (*mbq.calibrate_group(weight, bias, samples, stats, g_t, g_v, cfg, gen), None)
    if method == "masquant":
        full, info = masquant.calibrate(weight, bias, samples, stats, cfg, gen)
        return masquant.checkpoint_part(full, weight, bias, stats, cfg, gen), info, full
    if method == "vlmq":
        g_rows = torch.cat(grads.rows)
        return (*vlmq.calibrate_group(weight, bias, samples, stats, g_rows, [weight.shape[0]], "qkv", cfg, gen), None)
    raise ValueError(f"not a baseline method: {method!r} (expected one of {', '.join(BASELINES)})")


__all__ = ["BASELINES", "calibrate_baseline_layer", "calibrate_linear", "mbq", "masquant", "vlmq"]
