"""The calibration set's activations between decoder layers: host memory up to a budget, then disk.

A run keeps two sets at a time, the current layer's inputs and its FP outputs (the training
targets, then the next layer's inputs), one tensor (1, T, H) per sample in `offload_dtype`
(bf16 by default: 2 bytes x tokens x hidden per set). Both draw on one `ActivationSpace`: while
the resident total stays under `budget_bytes` a tensor stays in memory; past it, it is written
to `<work dir>/activations/` and read back when it is used (one sample at a time: the training
loop visits samples in order). The directory is the run's, removed with it.
"""

from __future__ import annotations

import itertools
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file


class ActivationSpace:
    """The budget and the spill directory shared by a run's activation stores."""

    def __init__(self, directory: Path, budget_bytes: float) -> None:
        self.directory = Path(directory)
        self.budget_bytes = budget_bytes
        self.resident_bytes = 0
        self.spilled_bytes = 0
        self._ids = itertools.count()

    def store(self) -> "ActivationStore":
        return ActivationStore(self, next(self._ids))

    def remove(self) -> None:
        shutil.rmtree(self.directory, ignore_errors=True)


class ActivationStore:
    """One tensor per calibration sample, in memory or spilled to a file of the space."""

    def __init__(self, space: ActivationSpace, ident: int) -> None:
        self.space = space
        self.ident = ident
        self._items: list[torch.Tensor | Path] = []

    def append(self, t: torch.Tensor) -> None:
        t = t.detach().to("cpu").contiguous()
        nbytes = t.numel() * t.element_size()
        if self.space.resident_bytes + nbytes <= self.space.budget_bytes:
            self.space.resident_bytes += nbytes
            self._items.append(t)
            return
        self.space.directory.mkdir(parents=True, exist_ok=True)
        path = self.space.directory / f"set{self.ident}_{len(self._items):06d}.safetensors"
        save_file({"x": t}, str(path))
        self.space.spilled_bytes += nbytes
        self._items.append(path)

    def __getitem__(self, i: int) -> torch.Tensor:
        item = self._items[i]
        return load_file(str(item))["x"] if isinstance(item, Path) else item

    def __len__(self) -> int:
        return len(self._items)

    def __iter__(self):
        return (self[i] for i in range(len(self)))

    def release(self) -> None:
        """Free the memory and the files of this set."""
        for item in self._items:
            if isinstance(item, Path):
                item.unlink(missing_ok=True)
            else:
                self.space.resident_bytes -= item.numel() * item.element_size()
        self._items = []
