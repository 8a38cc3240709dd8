"""Read and validate a SplitQ checkpoint directory.

Validation fails on the first problem with a CheckpointError that names the file, field or tensor:
truncated or corrupt safetensors files, missing or unexpected tensors, wrong shapes or dtypes,
unknown format versions, channel sets that overlap, leave a channel out or point outside the
input, non-finite values, and layers of one input group whose shared tensors differ.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

from splitq_kernels.reference import SplitQLinear

from .config import CheckpointError, LayerDims, SplitQConfig
from .tensors import layer_tensor_specs, tensors_to_layer

SAFETENSORS_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


def read_safetensors_header(fpath: Path) -> dict[str, Any]:
    """The JSON header of a safetensors file, after checking that the file holds all the data the
    header describes (safetensors itself reports a truncated file without naming it)."""
    try:
        size = fpath.stat().st_size
        with open(fpath, "rb") as fh:
            prefix = fh.read(8)
            if len(prefix) < 8:
                raise CheckpointError(f"{fpath}: truncated safetensors file ({size} bytes, less than a header)")
            (n,) = struct.unpack("<Q", prefix)
            if 8 + n > size:
                raise CheckpointError(
                    f"{fpath}: truncated or not a safetensors file: its header length says {n} bytes, "
                    f"the file has {size}"
                )
            header = json.loads(fh.read(n))
    except CheckpointError:
        raise
    except OSError as e:
        raise CheckpointError(f"{fpath}: cannot read it ({e})") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{fpath}: not a safetensors file (its header is not JSON: {e})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{fpath}: not a safetensors file (its header is not a JSON object)")
    try:
        data_bytes = max((int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"), default=0)
    except (TypeError, KeyError, IndexError, ValueError):
        raise CheckpointError(f"{fpath}: corrupt safetensors header (a tensor without data_offsets)") from None
    if 8 + n + data_bytes > size:
        raise CheckpointError(
            f"{fpath}: truncated safetensors file: its header describes {8 + n + data_bytes} bytes, the file has "
            f"{size} (an interrupted copy or download?)"
        )
    return header


def _open(fpath: Path):
    """safe_open with errors that name the file."""
    try:
        return safe_open(str(fpath), "pt")
    except SafetensorError as e:
        read_safetensors_header(fpath)  # names the file for the common causes (truncation)
        raise CheckpointError(f"{fpath}: cannot open it as a safetensors file ({e})") from None


def read_model_config(path: str | os.PathLike) -> tuple[dict[str, Any], SplitQConfig]:
    """config.json and its parsed quantization_config."""
    cfg_path = Path(path) / "config.json"
    if not cfg_path.is_file():
        raise CheckpointError(f"{cfg_path}: not found (is {path} a SplitQ checkpoint directory?)")
    try:
        config = json.loads(cfg_path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{cfg_path}: not valid JSON: {e}") from None
    qc = config.get("quantization_config")
    if qc is None and isinstance(config.get("text_config"), dict):
        qc = config["text_config"].get("quantization_config")
    if qc is None:
        raise CheckpointError(f"{cfg_path}: no quantization_config (not a quantized checkpoint)")
    return config, SplitQConfig.from_dict(qc, source=f"{cfg_path}: quantization_config")


def tensor_files(path: str | os.PathLike) -> dict[str, str]:
    """Tensor name -> safetensors file name of a model directory (index file or the files' headers)."""
    path = Path(path)
    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            wm = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise CheckpointError(f"{index}: malformed index ({e})") from None
        for fname in set(wm.values()):
            if not (path / fname).is_file():
                raise CheckpointError(f"{index}: shard {fname} is listed but missing")
        return dict(wm)
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"{path}: no .safetensors files")
    wm = {}
    for f in files:
        for k in read_safetensors_header(f):
            if k != "__metadata__":
                wm[k] = f.name
    return wm


class SplitQCheckpoint:
    """A SplitQ checkpoint directory: its configs, its tensors (loaded on demand), its layers."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self.model_config, self.quant_config = read_model_config(self.path)
        self.weight_map = tensor_files(self.path)
        self._headers: dict[str, dict[str, Any]] = {}

    @property
    def scheme(self):
        return self.quant_config.scheme

    def file_of(self, name: str) -> str:
        return self.weight_map[name]

    def _header(self, fname: str) -> dict[str, Any]:
        """The JSON header of one safetensors file (read once: shapes and dtypes of its tensors)."""
        if fname not in self._headers:
            self._headers[fname] = read_safetensors_header(self.path / fname)
        return self._headers[fname]

    def tensor_info(self, name: str) -> tuple[tuple[int, ...], torch.dtype]:
        fname = self.weight_map[name]
        info = self._header(fname).get(name)
        if not isinstance(info, dict):
            raise CheckpointError(f"{self.path / fname}: tensor '{name}' is listed in the index but not in the file")
        return tuple(info["shape"]), SAFETENSORS_DTYPES.get(info["dtype"], info["dtype"])

    def tensor(self, name: str) -> torch.Tensor:
        if name not in self.weight_map:
            raise CheckpointError(f"{self.path}: missing tensor '{name}'")
        with _open(self.path / self.weight_map[name]) as fh:
            return fh.get_tensor(name)

    def layer_tensors(self, name: str) -> dict[str, torch.Tensor]:
        dims = self.quant_config.layers[name]
        return {s.suffix: self.tensor(f"{name}.{s.suffix}") for s in layer_tensor_specs(dims, self.scheme)}

    def layer(self, name: str) -> SplitQLinear:
        """The quantized layer `name` (an HF module name listed in quantization_config.layers)."""
        return tensors_to_layer(self.layer_tensors(name), self.quant_config.layers[name], self.scheme)

    def unquantized_tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        """Every tensor that does not belong to a quantized layer."""
        for name in sorted(self.weight_map):
            if self._owner(name) is None:
                yield name, self.tensor(name)

    def _owner(self, tensor_name: str) -> str | None:
        layer = tensor_name.rsplit(".", 1)[0]
        return layer if layer in self.quant_config.layers else None

    # -----------------------------------------------------------------------------------------
    def validate(self, check_values: bool = True) -> None:
        """Check everything the forward relies on; raise CheckpointError on the first problem.

        check_values=False checks only what the file headers say (every tensor present, shapes,
        dtypes, no unexpected tensor): cheap even for large checkpoints, no tensor is read. The
        vLLM plugin does that at start-up and checks the values of the tensors it has loaded.
        """
        qc = self.quant_config
        for fname in sorted(set(self.weight_map.values())):
            self._header(fname)  # every file whole, the 16-bit ones too (a truncated copy, say)
        for name in qc.layers:
            if qc.is_ignored(name):
                raise CheckpointError(f"quantization_config: layer '{name}' is listed in layers but matches ignore")
        expected: dict[str, set[str]] = {n: set() for n in qc.layers}
        for name, dims in qc.layers.items():
            for spec in layer_tensor_specs(dims, qc.scheme):
                full = f"{name}.{spec.suffix}"
                expected[name].add(spec.suffix)
                if full not in self.weight_map:
                    raise CheckpointError(
                        f"{self.path}: missing tensor '{full}' (layer '{name}', expected shape "
                        f"{list(spec.shape)}, dtype {str(spec.dtype or 'float').replace('torch.', '')})"
                    )
                shape, dtype = self.tensor_info(full)
                where = f"tensor '{full}' in {self.weight_map[full]}"
                if shape != spec.shape:
                    raise CheckpointError(f"{where}: shape {list(shape)}, expected {list(spec.shape)}")
                if spec.dtype is None:
                    if not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
                        raise CheckpointError(f"{where}: dtype {dtype}, expected a floating-point dtype")
                elif dtype != spec.dtype:
                    raise CheckpointError(
                        f"{where}: dtype {str(dtype).replace('torch.', '')}, expected {str(spec.dtype).replace('torch.', '')}"
                    )
        for tname in self.weight_map:
            layer = tname.rsplit(".", 1)[0]
            if layer in expected and tname.rsplit(".", 1)[1] not in expected[layer]:
                raise CheckpointError(
                    f"tensor '{tname}' in {self.weight_map[tname]}: unexpected for quantized layer '{layer}' "
                    "(not part of the SplitQ format; a leftover 16-bit weight?)"
                )
        if not check_values:
            return
        group_first: dict[str, tuple[str, dict[str, torch.Tensor]]] = {}
        for name, dims in qc.layers.items():
            t = self.layer_tensors(name)
            check_layer_values(name, dims, t)
            shared = {s.suffix: t[s.suffix] for s in layer_tensor_specs(dims, qc.scheme) if s.side == "input"}
            if dims.group in group_first:
                first_name, first = group_first[dims.group]
                for suffix, v in shared.items():
                    if not torch.equal(v, first[suffix]):
                        raise CheckpointError(
                            f"tensors '{first_name}.{suffix}' and '{name}.{suffix}' differ although both layers read "
                            f"the same input (group '{dims.group}'): shared tensors must be identical"
                        )
            else:
                group_first[dims.group] = (name, shared)


def check_layer_values(name: str, dims: LayerDims, t: dict[str, torch.Tensor]) -> None:
    """Value checks of one layer's tensors (by suffix): channel sets, finiteness, positive scales."""
    owner: dict[int, str] = {}
    for set_name in ("main", "text", "vision"):
        key = f"idx_{set_name}"
        if key not in t:
            continue
        idx = t[key].long()
        bad = idx[(idx < 0) | (idx >= dims.in_features)]
        if bad.numel():
            raise CheckpointError(
                f"tensor '{name}.{key}': channel index {int(bad[0])} out of range [0, {dims.in_features})"
            )
        for c in idx.tolist():
            if c in owner:
                other = owner[c]
                what = "twice in" if other == key else f"in both {other} and"
                raise CheckpointError(f"layer '{name}': channel {c} appears {what} {key} (channel sets must be disjoint)")
            owner[c] = key
    if len(owner) != dims.in_features:
        missing = sorted(set(range(dims.in_features)) - owner.keys())
        raise CheckpointError(
            f"layer '{name}': channels {missing[:8]}{' ...' if len(missing) > 8 else ''} are in no channel set "
            f"(idx_main, idx_text and idx_vision must cover all {dims.in_features} input channels)"
        )
    for suffix, v in t.items():
        if v.is_floating_point() and not bool(torch.isfinite(v).all()):
            raise CheckpointError(f"tensor '{name}.{suffix}': contains NaN or Inf")
        if (suffix.endswith("_wscale") or suffix.endswith("_act_clip")) and not bool((v > 0).all()):
            raise CheckpointError(f"tensor '{name}.{suffix}': scales and clipping factors must be positive")


def read_checkpoint(path: str | os.PathLike, validate: bool = True) -> SplitQCheckpoint:
    """Open a SplitQ checkpoint directory; with validate=True (default) check all of it first."""
    ckpt = SplitQCheckpoint(path)
    if validate:
        ckpt.validate()
    return ckpt
