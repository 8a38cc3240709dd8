"""Memory of a calibration run: what the process has used at its peak."""

from __future__ import annotations

import resource

import torch


def peak_memory_mb(device: torch.device) -> dict[str, float]:
    """Peak resident set size of this process (and peak CUDA allocation on a CUDA device), MiB."""
    out = {"cpu_peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    if device.type == "cuda":
        out["cuda_peak_allocated_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
    return out
