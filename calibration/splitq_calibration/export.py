"""Write a SplitQ checkpoint from a source model directory and its quantized linear groups.

Unquantized tensors are copied from the source files unchanged (same names, same 16-bit values,
loaded one shard at a time); each quantized group is split back into its member layers under
their file names, with the group recorded so vLLM can load q/k/v and gate/up fused.

The pipeline exports from the work directory's layer files (`PackedGroup`s): their tensors are
already in checkpoint layout, so a member's tensors are the group's with the output rows sliced
(the tensor table's "output" side) and are read when their shard is written, never the whole
model's quantized layers at once.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from splitq_kernels.reference import SplitQLinear, SplitQScheme, split_outputs
from splitq_vllm.checkpoint import DEFAULT_IGNORE, LayerDims, SplitQConfig, write_checkpoint
from splitq_vllm.checkpoint.reader import SAFETENSORS_DTYPES
from splitq_vllm.checkpoint.tensors import layer_tensor_specs
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


@dataclass(frozen=True)
class PackedGroup:
    """A quantized group in a work-directory layer file: tensors `{group.name}.{suffix}` in
    checkpoint layout, and the fused layer's dims."""

    group: LinearGroup
    path: Path
    dims: LayerDims


class _MemberTensors(Mapping):
    """The member layers' tensors of packed groups, read from the layer files on access."""

    def __init__(
        self, packed: Sequence[PackedGroup], scheme: SplitQScheme, bias_dtypes: dict[str, torch.dtype]
    ) -> None:
        self._where: dict[str, tuple[PackedGroup, str, int, int, torch.dtype | None]] = {}
        self._nbytes: dict[str, int] = {}
        self.dims: dict[str, LayerDims] = {}
        for pg in packed:
            specs = layer_tensor_specs(pg.dims, scheme)
            start = 0
            for name, out in zip(pg.group.names, pg.group.out_features):
                self.dims[name] = replace(pg.dims, out_features=out, group=pg.group.name)
                for spec in specs:
                    rows = (start, start + out) if spec.side == "output" else (0, spec.shape[0])
                    dtype = bias_dtypes.get(f"{name}.bias") if spec.suffix == "bias" else spec.dtype
                    key = f"{name}.{spec.suffix}"
                    self._where[key] = (pg, spec.suffix, *rows, dtype)
                    n = rows[1] - rows[0]
                    for d in spec.shape[1:]:
                        n *= d
                    self._nbytes[key] = n * torch.empty(0, dtype=dtype or torch.float32).element_size()
                start += out

    def __getitem__(self, name: str) -> torch.Tensor:
        pg, suffix, r0, r1, dtype = self._where[name]
        with safe_open(str(pg.path), "pt") as fh:
            t = fh.get_slice(f"{pg.group.name}.{suffix}")[r0:r1]
        return t if dtype is None else t.to(dtype)

    def __iter__(self) -> Iterator[str]:
        return iter(self._where)

    def __len__(self) -> int:
        return len(self._where)

    def nbytes(self, name: str) -> int:
        return self._nbytes[name]


class _Union(Mapping):
    def __init__(self, *parts: Mapping) -> None:
        self.parts = parts

    def _part(self, name: str) -> Mapping:
        for p in self.parts:
            if name in p:
                return p
        raise KeyError(name)

    def __getitem__(self, name: str) -> torch.Tensor:
        return self._part(name)[name]

    def __iter__(self) -> Iterator[str]:
        for p in self.parts:
            yield from p

    def __len__(self) -> int:
        return sum(len(p) for p in self.parts)

    def __contains__(self, name: object) -> bool:
        return any(name in p for p in self.parts)

    def nbytes(self, name: str) -> int:
        return self._part(name).nbytes(name)


def export_packed(
    source_dir: str | os.PathLike,
    output_dir: str | os.PathLike,
    packed: Sequence[PackedGroup],
    scheme: SplitQScheme,
    ignore: list[str] | None = None,
    calibration: dict[str, Any] | None = None,
    overwrite: bool = False,
    max_shard_bytes: int | None = None,
) -> Path:
    """`export_checkpoint` from work-directory layer files, streamed: the same checkpoint."""
    source = Path(source_dir)
    source_tensors = SourceTensors(source)
    replaced: set[str] = set()
    bias_dtypes: dict[str, torch.dtype] = {}
    for pg in packed:
        for name in pg.group.names:
            replaced.update({f"{name}.weight", f"{name}.bias"})
            if f"{name}.bias" in source_tensors:  # the bias in the source file's dtype
                bias_dtypes[f"{name}.bias"] = source_tensors.info(f"{name}.bias")[1]
    members = _MemberTensors(packed, scheme, bias_dtypes)
    return _write(
        source,
        output_dir,
        scheme,
        ignore,
        calibration,
        overwrite,
        max_shard_bytes,
        layers={},
        tensors=_Union(SourceTensors(source, exclude=replaced), members),
        packed_dims=members.dims,
    )


def _write(
    source: Path,
    output_dir: str | os.PathLike,
    scheme: SplitQScheme,
    ignore: list[str] | None,
    calibration: dict[str, Any] | None,
    overwrite: bool,
    max_shard_bytes: int | None,
    **parts: Any,
) -> Path:
    """write_checkpoint with the source's config (its quantization_config dropped) and side files."""
    config = json.loads((source / "config.json").read_text())
    config.pop("quantization_config", None)
    kwargs = {} if max_shard_bytes is None else {"max_shard_bytes": max_shard_bytes}
    return write_checkpoint(
        output_dir,
        model_config=config,
        quant_config=SplitQConfig(
            scheme=scheme,
            ignore=list(DEFAULT_IGNORE if ignore is None else ignore),
            calibration=dict(calibration or {}),
        ),
        side_files_from=source,
        overwrite=overwrite,
        **parts,
        **kwargs,
    )


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
    return _write(
        source,
        output_dir,
        scheme,
        ignore,
        calibration,
        overwrite,
        max_shard_bytes,
        layers=layers,
        tensors=SourceTensors(source, exclude=replaced),
        groups=groups,
    )
