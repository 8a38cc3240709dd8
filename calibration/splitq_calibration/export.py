"""Write a SplitQ checkpoint from a source model directory and its quantized linear groups.

Unquantized tensors are copied from the source files unchanged (same names, same 16-bit values,
loaded one shard at a time); each quantized group is split back into its member layers under
their file names, with the group recorded so vLLM can load q/k/v and gate/up fused.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from splitq_kernels.reference import SplitQLinear, SplitQScheme, split_outputs
from splitq_vllm.checkpoint import DEFAULT_IGNORE, SplitQConfig, write_checkpoint
from splitq_vllm.checkpoint.reader import SAFETENSORS_DTYPES
from splitq_vllm.model_layout import LinearGroup, source_tensor_files


class SourceTensors(Mapping):
    """The tensors of a Hugging Face model directory, loaded on access, minus `exclude`."""

    def __init__(self, model_dir: str | os.PathLike, exclude: set[str] = frozenset()) -> None:
        self.dir = Path(model_dir)
        self.files = {k: f for k, f in source_tensor_files(model_dir).items() if k not in exclude}

    def __getitem__(self, name: str) -> torch.Tensor:
        with safe_open(str(self.dir / self.files[name]), "pt") as fh:
            return fh.get_tensor(name)

    def __iter__(self) -> Iterator[str]:
        return iter(self.files)

    def __len__(self) -> int:
        return len(self.files)

    def info(self, name: str) -> tuple[list[int], torch.dtype]:
        with safe_open(str(self.dir / self.files[name]), "pt") as fh:
            sl = fh.get_slice(name)
            return list(sl.get_shape()), SAFETENSORS_DTYPES[sl.get_dtype()]

    def nbytes(self, name: str) -> int:
        shape, dtype = self.info(name)
        n = 1
        for d in shape:
            n *= d
        return n * torch.empty(0, dtype=dtype).element_size()


def export_checkpoint(
    source_dir: str | os.PathLike,
    output_dir: str | os.PathLike,
    quantized: Mapping[str, tuple[LinearGroup, SplitQLinear]],
    scheme: SplitQScheme,
    ignore: list[str] | None = None,
    calibration: dict[str, Any] | None = None,
    overwrite: bool = False,
    max_shard_bytes: int | None = None,
) -> Path:
    """Write the checkpoint: `quantized` maps a group name to (group, fused quantized layer).

    The fused layer's output is the concatenation of the group's members (q, k, v / gate, up).
    Bias values of quantized layers travel in the SplitQ layer (in the model's dtype).
    """
    source = Path(source_dir)
    config = json.loads((source / "config.json").read_text())
    config.pop("quantization_config", None)
    layers: dict[str, SplitQLinear] = {}
    groups: dict[str, str] = {}
    replaced: set[str] = set()
    source_tensors = SourceTensors(source)
    for group, fused in quantized.values():
        for name, part in zip(group.names, split_outputs(fused, list(group.out_features))):
            if part.bias is not None and f"{name}.bias" in source_tensors:
                # keep the bias in the source file's dtype (calibration runs in float32)
                part.bias = part.bias.to(source_tensors.info(f"{name}.bias")[1])
            layers[name] = part
            groups[name] = group.name
            replaced.update({f"{name}.weight", f"{name}.bias"})
    tensors = SourceTensors(source, exclude=replaced)
    kwargs = {} if max_shard_bytes is None else {"max_shard_bytes": max_shard_bytes}
    return write_checkpoint(
        output_dir,
        model_config=config,
        quant_config=SplitQConfig(
            scheme=scheme,
            ignore=list(DEFAULT_IGNORE if ignore is None else ignore),
            calibration=dict(calibration or {}),
        ),
        layers=layers,
        tensors=tensors,
        groups=groups,
        side_files_from=source,
        overwrite=overwrite,
        **kwargs,
    )
