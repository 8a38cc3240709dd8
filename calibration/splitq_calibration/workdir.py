"""The work directory of a run, `<output>.partial/`: what makes a killed run resumable.

It holds `run.json` (a fingerprint of the settings, the model and the processed samples) and one
safetensors file per finished decoder layer (its quantized groups, in checkpoint layout, written
atomically). A run started with the same fingerprint continues after the finished layers; one with
another fingerprint is refused, naming what differs. The export always reads the layer files, so a
resumed run and an uninterrupted one write the same checkpoint.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from splitq_kernels.reference import SplitQLinear, SplitQScheme
from splitq_vllm.checkpoint import LayerDims
from splitq_vllm.checkpoint.tensors import layer_dims, layer_to_tensors, tensors_to_layer

from splitq_vllm.model_layout import LinearGroup

from .data import CalibSample
from .errors import CalibrationError
from .export import PackedGroup

STATE_VERSION = 1


def samples_fingerprint(samples: list[CalibSample]) -> str:
    """A hash of the processed samples (ids and every tensor the processor made)."""
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


class WorkDir:
    """`<output>.partial/`: the run fingerprint and the finished layers."""

    def __init__(self, path: Path) -> None:
        self.path = path

    @classmethod
    def for_output(cls, output: Path) -> "WorkDir":
        return cls(output.with_name(output.name + ".partial"))

    def layer_file(self, layer: int) -> Path:
        return self.path / f"layer_{layer:05d}.safetensors"

    def vision_block_file(self, block: int) -> Path:
        """A finished vision-tower block (`quantize_vision_tower`)."""
        return self.path / f"vision_block_{block:05d}.safetensors"

    def done_vision_blocks(self) -> set[int]:
        return {int(p.stem.rsplit("_", 1)[1]) for p in self.path.glob("vision_block_*.safetensors")}

    def open(self, fingerprint: dict[str, Any], restart: bool) -> set[int]:
        """Start or resume the run with this fingerprint; returns the finished layers."""
        run_file = self.path / "run.json"
        if self.path.exists() and restart:
            shutil.rmtree(self.path)
        if run_file.is_file():
            old = json.loads(run_file.read_text()).get("fingerprint", {})
            if old != fingerprint:
                old_cfg, new_cfg = old.get("config", {}), fingerprint["config"]
                diff = sorted(k for k in set(old_cfg) | set(new_cfg) if old_cfg.get(k) != new_cfg.get(k))
                other = [k for k in ("model", "samples", "state_version") if old.get(k) != fingerprint.get(k)]
                raise CalibrationError(
                    f"{self.path} holds an unfinished run with different settings ({', '.join(diff + other)}); "
                    "rerun with the same arguments to resume it, or pass --restart to discard it"
                )
            return {int(p.stem.split("_")[1]) for p in sorted(self.path.glob("layer_*.safetensors"))}
        self.path.mkdir(parents=True, exist_ok=True)
        tmp = run_file.with_name("run.json.tmp")
        tmp.write_text(json.dumps({"fingerprint": fingerprint}, indent=2, sort_keys=True, default=str))
        os.replace(tmp, run_file)
        return set()

    def save_layer(
        self, layer: int, quantized: dict[str, SplitQLinear], scheme: SplitQScheme, info: dict, path: Path | None = None
    ) -> None:
        """The layer's quantized groups by group name (the checkpoint's), written atomically
        (to `path` instead of the layer's file: a vision block's)."""
        tensors, dims = {}, {}
        for gname, q in quantized.items():
            for suffix, t in layer_to_tensors(q, scheme).items():
                tensors[f"{gname}.{suffix}"] = t.detach().to("cpu").contiguous().clone()
            dims[gname] = layer_dims(q, gname).to_dict()
        if not tensors:
            tensors["_empty"] = torch.zeros(1)
        meta = {"dims": json.dumps(dims, sort_keys=True), "info": json.dumps(info, sort_keys=True)}
        path = path or self.layer_file(layer)
        tmp = path.with_name(path.name + ".tmp")
        save_file(tensors, str(tmp), metadata=meta)
        os.replace(tmp, path)

    def load_layer(self, layer: int, scheme: SplitQScheme) -> tuple[dict[str, SplitQLinear], dict]:
        path = self.layer_file(layer)
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

    def layer_info(self, layer: int, vision: bool = False) -> dict:
        with safe_open(str(self.vision_block_file(layer) if vision else self.layer_file(layer)), "pt") as fh:
            return json.loads(fh.metadata()["info"])

    def packed_groups(
        self, num_layers: int, by_layer: dict[int, list[LinearGroup]], vision: bool = False
    ) -> list[PackedGroup]:
        """Every quantized group of the run as it lies in the layer files (nothing loaded);
        `vision`: the vision-tower blocks' (by_layer keyed by block)."""
        out = []
        for i in range(num_layers):
            groups = by_layer.get(i, [])
            if not groups:
                continue
            path = self.vision_block_file(i) if vision else self.layer_file(i)
            with safe_open(str(path), "pt") as fh:
                dims = json.loads(fh.metadata()["dims"])
            for g in groups:
                if g.name not in dims:
                    raise CalibrationError(f"{path}: no group {g.name} (the work directory does not match the run)")
                out.append(PackedGroup(g, path, LayerDims.from_dict(dims[g.name], f"{path}: {g.name}")))
        return out

    def remove(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)
