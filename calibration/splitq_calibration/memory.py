"""Memory of a calibration run: the peak-memory model (checked before anything big is loaded)
and what the process actually used.

The model, in the model's widths (docs/calibration.md, "Memory and time at real widths"):

    b      bytes per weight in the files (2: bf16)
    P_pre  parameters run before decoder layer 0 (embeddings, vision tower, projector)
    P_lay  parameters of one decoder layer; P_lin of its quantized linears (~ P_lay)
    H, I   hidden and MLP widths; T_max the longest sample in tokens
    A      activations of the calibration set: N samples x T tokens x H x 2 bytes (bf16), one set

    capture  = BASE + b P_pre + VISION_ACT + 2 A_res
    stats    = BASE + 4 P_lay + b P_lin + 2 A_res + 4 T_max (FORWARD_H H + FORWARD_I I)
    train    = BASE + SLACK ((b + 8) P_lin + 4 G_max) + BLOCKS + 2 A_res + 4 T_max (GRAPH_H H + GRAPH_I I)
    peak     = max(capture, stats, train)

A_res = min(A, activation budget / 2): inputs and targets of one layer are resident up to the
budget, the rest is spilled to disk. `stats` holds the layer in float32 (4 P_lay) beside the
frozen copy of its weights in the files' dtype (b P_lin); `train` holds the frozen copy, the
fake-quantized weights of one step and their gradients (8 P_lin, float32), the weight gradient
one sample's backward forms before adding it in (4 G_max, G_max the largest group: gate/up), a
few row blocks (BLOCKS), and SLACK for the allocator. The per-token terms are the forward's
intermediates of one sample (FORWARD_*) and the graph one sample's backward keeps (GRAPH_*), in
float32 words per token: estimates, small at 256 tokens; SLACK is fitted to the peaks measured at
7B and 72B width (BENCHMARKS.md, "Calibration at real widths"; 5.05 and 15.5 GB, the model gives
5.6 and 15.0 at 8 samples of 256 tokens). On CUDA the stats and train terms other than BASE and the activations are GPU
memory instead.
"""

from __future__ import annotations

import ctypes
import os
import resource
from dataclasses import dataclass

import torch

GB = 1e9  # decimal, as the benchmarks report
BASE_BYTES = 1.0 * GB  # torch, transformers, tokenizer and processor: measured ~0.9 GB RSS on the CPU
FORWARD_H, FORWARD_I = 12, 6  # float32 words per token per hidden / MLP channel, FP forward
GRAPH_H, GRAPH_I = 40, 16  # ... kept by one sample's backward graph (fake-quant forward)
BLOCK_BYTES = 12 * 2**24 * 4  # live row blocks of the weight side (group_params.ROW_BLOCK_ELEMENTS)
VISION_ACT_WORDS = 24  # float32 words per vision patch per vision channel, vision forward
SLACK = 1.15  # allocator overhead on the training phase's full-size tensors (fitted, see above)


@dataclass(frozen=True)
class ModelSizes:
    """The widths the memory model needs, read off the model's meta skeleton."""

    pre_layer_params: int
    layer_params: int
    linear_params: int
    largest_group_params: int  # the biggest linear-input group (gate/up): one sample's weight gradient
    hidden: int
    intermediate: int
    vision_hidden: int
    file_bytes: int  # per weight


@dataclass(frozen=True)
class Estimate:
    """Peak bytes per phase and the settings they assume."""

    capture: float
    stats: float
    train: float
    activations: float  # one set, all samples
    activations_resident: float  # one set, in memory
    device: str

    @property
    def peak(self) -> float:
        return max(self.capture, self.stats, self.train) if self.device == "cpu" else self.capture

    @property
    def device_peak(self) -> float:
        """GPU bytes of the per-layer phases when the layer runs on CUDA (0 on the CPU)."""
        if self.device == "cpu":
            return 0.0
        return max(self.stats, self.train) - BASE_BYTES - 2 * self.activations_resident

    def as_dict(self) -> dict[str, float]:
        return {
            "capture_gb": self.capture / GB,
            "stats_gb": self.stats / GB,
            "train_gb": self.train / GB,
            "activations_gb": self.activations / GB,
            "activations_resident_gb": self.activations_resident / GB,
            "peak_gb": self.peak / GB,
            "device_peak_gb": self.device_peak / GB,
        }


def model_sizes(model: torch.nn.Module, file_bytes: int = 2) -> ModelSizes:
    """ModelSizes of a VLM; a meta skeleton will do (only shapes are read)."""
    from splitq_vllm.families import family_of
    from splitq_vllm.model_layout import language_model_layers, text_config

    def count(module: torch.nn.Module) -> int:
        return sum(p.numel() for p in module.parameters())

    _, layers = language_model_layers(model)
    # the largest decoder layer (hybrid families: layer types differ in size)
    i = max(range(len(layers)), key=lambda j: count(layers[j]))
    layer = layers[i]
    linear = sum(m.weight.numel() for m in layer.modules() if isinstance(m, torch.nn.Linear))
    groups = [
        sum(getattr(getattr(layer, g.parent), m).weight.numel() for m in g.members)
        for g in family_of(model).layer_kind(text_config(model.config), i).groups
    ]
    head, embed = model.get_output_embeddings(), model.get_input_embeddings()
    tied = head is not None and head.weight is embed.weight
    pre = count(model) - count(layers) - (0 if head is None or tied else head.weight.numel())
    text_cfg = model.config.get_text_config()
    vis_cfg = getattr(model.config, "vision_config", None)
    return ModelSizes(
        pre_layer_params=pre,
        layer_params=count(layer),
        linear_params=linear,
        largest_group_params=max(groups),
        hidden=text_cfg.hidden_size,
        intermediate=text_cfg.intermediate_size,
        vision_hidden=getattr(vis_cfg, "hidden_size", 0) or 0,
        file_bytes=file_bytes,
    )


def estimate(
    sizes: ModelSizes,
    tokens: list[int],
    vision_tokens: list[int],
    activation_budget: float | None,
    offload_bytes: int = 2,
    device: str = "cpu",
) -> Estimate:
    """The peak-memory model of the module doc for these samples (tokens per sample)."""
    s = sizes
    t_max = max(tokens, default=0)
    acts = sum(tokens) * s.hidden * offload_bytes
    resident = acts if activation_budget is None else min(acts, activation_budget / 2)
    # vision patches before the 2x2 merge: 4 per vision token for Qwen2.5-VL, 1 for LLaVA's CLIP
    patches = 4 * max(vision_tokens, default=0)
    capture = BASE_BYTES + s.file_bytes * s.pre_layer_params + 4 * patches * s.vision_hidden * VISION_ACT_WORDS
    stats = (
        BASE_BYTES
        + 4 * s.layer_params
        + s.file_bytes * s.linear_params
        + 4 * t_max * (FORWARD_H * s.hidden + FORWARD_I * s.intermediate)
    )
    train = (
        BASE_BYTES
        + SLACK * ((s.file_bytes + 8) * s.linear_params + 4 * s.largest_group_params)
        + BLOCK_BYTES
        + 4 * t_max * (GRAPH_H * s.hidden + GRAPH_I * s.intermediate)
    )
    return Estimate(capture + 2 * resident, stats + 2 * resident, train + 2 * resident, acts, resident, device)


def available_host_bytes() -> int:
    """MemAvailable (Linux), or the physical memory where /proc is not there."""
    try:
        for line in open("/proc/meminfo"):
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def give_back_freed_memory() -> None:
    """Return freed heap pages to the OS (glibc keeps them otherwise, and RSS never drops)."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def peak_memory_mb(device: torch.device) -> dict[str, float]:
    """Peak resident set size of this process (and peak CUDA allocation on a CUDA device), MiB."""
    out = {"cpu_peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    if device.type == "cuda":
        out["cuda_peak_allocated_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
    return out
