"""`splitq-inspect`: per-channel activation magnitudes of text vs vision tokens at one linear
input of one decoder layer, with the outlier channels MOCD picks marked (the paper's Fig. 2).

The activations are the FP model's on the calibration data (the same capture and FP layer
forward calibration uses). The marked channels are MOCD's choice under the given settings, or,
with `checkpoint=`, the channel sets stored in a SplitQ checkpoint.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from splitq_vllm.model_layout import LinearGroup, linear_groups, source_tensor_files

from .capture import capture_layer0_inputs
from .dims import outlier_counts
from .errors import CalibrationError
from .layer import MaskHolder, collect_stats, float32_layer, fp_layer_forward, install_calib_linears
from .mocd import ChannelStats, select_channels, text_row_plan
from .pipeline import DTYPES, load_samples, resolve_device
from .source_model import SourceModel
from .recipe import CalibrationConfig


def layer_input_stats(
    model_dir: str | os.PathLike, data: Any, layer: int, kinds: list[str], config: CalibrationConfig
) -> tuple[dict[str, ChannelStats], list[LinearGroup]]:
    """Per-channel statistics of the inputs of `kinds` groups at decoder layer `layer` (FP model),
    reading the model part by part as the pipeline does; and the model's linear groups."""
    cfg = config
    device = resolve_device(cfg.device)
    offload = DTYPES[cfg.offload_dtype]
    samples = load_samples(model_dir, data, cfg)
    source = SourceModel(model_dir)
    if not 0 <= layer < len(source.layers):
        raise CalibrationError(f"layer {layer}: the model has decoder layers 0..{len(source.layers) - 1}")
    groups = linear_groups(source.model, list(source_tensor_files(model_dir)))
    source.load_before_layers(device)
    inputs = capture_layer0_inputs(source.model, samples, device, offload)
    source.release_before_layers()
    for i in range(layer):
        inputs.at_layer(i)
        inputs.hidden = fp_layer_forward(source.load_layer(i, device), inputs, device, offload, consume=True)
        source.release_layer(i)
    inputs.at_layer(layer)
    work = float32_layer(source.load_layer(layer, device), device, consume=True)
    mask = MaskHolder()
    calib = install_calib_linears(work, kinds, mask)
    rows = text_row_plan(inputs.text_masks, cfg.mocd_max_tokens, cfg.seed)
    stats, _ = collect_stats(work, calib, mask, inputs, rows, device, offload, [])
    source.release_layer(layer)
    return stats, groups


def inspect_layer(
    model_dir: str | os.PathLike,
    data: Any,
    layer: int,
    group: str,
    png: str | os.PathLike,
    config: CalibrationConfig | None = None,
    checkpoint: str | os.PathLike | None = None,
) -> dict[str, Any]:
    """Write the PNG; return the picked channel sets and the per-channel maxima."""
    cfg = (config or CalibrationConfig()).resolved()
    stats, groups = layer_input_stats(model_dir, data, layer, [group], cfg)
    st = stats[group]
    if checkpoint is not None:
        from splitq_vllm.checkpoint import read_checkpoint

        ckpt = read_checkpoint(checkpoint)
        g = next(g for g in groups if g.layer == layer and g.kind == group)
        q = ckpt.layer(g.names[0])
        idx_t, idx_v = q.idx_text, q.idx_vision
        source = f"checkpoint {Path(checkpoint).name}"
    else:
        rule = cfg.selection if cfg.selection != "none" else "mocd"
        k_t, k_v = outlier_counts(st.absmax.numel(), cfg.text_ratio, cfg.vision_ratio)
        idx_t, idx_v = select_channels(st, rule, k_t, k_v, cfg.mocd_k, torch.Generator().manual_seed(cfg.seed))
        source = f"{rule} (k={cfg.mocd_k})" if rule == "mocd" else rule
    plot_channels(st, idx_t, idx_v, png, title=f"decoder layer {layer}, {group} input: {source}")
    return {
        "png": str(png),
        "text_channels": idx_t.tolist(),
        "vision_channels": idx_v.tolist(),
        "text_absmax": st.text_absmax.tolist(),
        "vision_absmax": st.vision_absmax.tolist(),
        "n_text": st.n_text,
        "n_vision": st.n_vision,
    }


def plot_channels(
    st: ChannelStats, idx_t: torch.Tensor, idx_v: torch.Tensor, png: str | os.PathLike, title: str
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    d = st.absmax.numel()
    ch = torch.arange(d)
    fig, axes = plt.subplots(2, 1, figsize=(12, 6.5), sharex=True)
    panels = (
        (axes[0], st.text_absmax, f"text tokens ({st.n_text})", "tab:blue"),
        (axes[1], st.vision_absmax, f"vision tokens ({st.n_vision})", "tab:green"),
    )
    for ax, values, label, color in panels:
        ax.bar(ch.numpy(), values.numpy(), width=1.0, color=color, alpha=0.75, label=f"max |x| over {label}")
        top = float(values.max()) if values.numel() else 1.0
        for idx, mcolor, name in (
            (idx_t, "tab:orange", "text outlier set C_t"),
            (idx_v, "tab:red", "vision outlier set C_v"),
        ):
            if idx.numel():
                ax.scatter(
                    idx.numpy(),
                    values[idx].numpy(),
                    marker="v",
                    s=36,
                    color=mcolor,
                    zorder=3,
                    label=f"{name} ({idx.numel()})",
                )
                for c in idx.tolist():
                    ax.axvline(c, color=mcolor, alpha=0.25, linewidth=0.8)
        ax.set_ylabel("max |activation|")
        ax.set_ylim(0, top * 1.12 if top > 0 else 1)
        ax.legend(loc="upper right", fontsize=8)
        ax.grid(axis="y", alpha=0.3)
    axes[1].set_xlabel(f"input channel (0..{d - 1})")
    axes[0].set_title(title)
    fig.tight_layout()
    Path(png).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=110)
    plt.close(fig)
