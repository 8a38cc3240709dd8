"""Write a SplitQ checkpoint directory atomically (a temporary directory, renamed at the end).

The temporary directory `.NAME.tmp-XXXXXXXX` is locked (flock) while it is written, so a later
writer of NAME can tell a killed run's leftover (unlocked: removed) from a live one (skipped).
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import re
import shutil
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from splitq_kernels.reference import SplitQLinear

from .config import LayerDims, SplitQConfig
from .tensors import layer_dims, layer_to_tensors

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")
SKIP_FILES = {"config.json", "model.safetensors.index.json", "pytorch_model.bin.index.json"}
DEFAULT_SHARD_BYTES = 4 * 1024**3

log = logging.getLogger(__name__)


def default_file_mode() -> int:
    """The mode `open()` gives a new file here: 0o666 minus the process umask.

    safetensors 0.8's save_file creates 0600 whatever the umask, which a server running as another
    user (the compose service, uid 2000) cannot read.
    """
    try:  # Linux >= 4.7; reading it does not change the umask under other threads
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return 0o666 & ~int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return 0o666 & ~mask


def _lock(directory: Path) -> int | None:
    """An exclusive non-blocking flock on `directory`: its fd, or None when another process holds it."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        os.close(fd)
        if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
            return None
        raise
    return fd


def remove_stale_temporaries(out: Path) -> list[Path]:
    """Remove what killed writers of `out` left beside it: `.NAME.tmp-*` directories no live
    process holds locked, and `.NAME.old-*` (the replaced checkpoint) once `out` exists again."""
    pattern = re.compile(rf"\.{re.escape(out.name)}\.(tmp|old)-[0-9a-f]{{8}}")
    removed = []
    for p in sorted(out.parent.iterdir()) if out.parent.is_dir() else []:
        m = pattern.fullmatch(p.name)
        if not m or not p.is_dir() or p.is_symlink():
            continue
        if m.group(1) == "old":
            if not out.exists():
                log.warning("%s: the previous checkpoint, left by a writer killed while replacing it; kept", p)
                continue
            shutil.rmtree(p, ignore_errors=True)
        else:
            try:
                fd = _lock(p)
            except OSError as e:  # a file system without flock: cannot tell, keep it
                log.warning("%s: cannot lock it to see whether a writer is alive (%s); kept", p, e)
                continue
            if fd is None:
                continue  # a live writer of the same output
            try:
                shutil.rmtree(p, ignore_errors=True)
            finally:
                os.close(fd)
        log.info("removed %s, left by a killed writer of %s", p, out)
        removed.append(p)
    return removed


def _nbytes(tensors: Mapping[str, torch.Tensor], name: str) -> int:
    size_of = getattr(tensors, "nbytes", None)  # lazy mappings report sizes without loading
    if size_of is not None:
        return size_of(name)
    t = tensors[name]
    return t.numel() * t.element_size()


def _plan_shards(tensors: Mapping[str, torch.Tensor], max_bytes: int) -> list[list[str]]:
    shards: list[list[str]] = [[]]
    size = 0
    for name in sorted(tensors):
        nbytes = _nbytes(tensors, name)
        if shards[-1] and size + nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    return shards


def copy_side_files(src: str | os.PathLike, dst: str | os.PathLike) -> list[str]:
    """Copy the processor, tokenizer, chat template and generation files of a model directory
    (everything but weights and config.json), so the output is servable on its own."""
    copied = []
    for p in sorted(Path(src).iterdir()):
        if p.is_file() and p.name not in SKIP_FILES and not p.name.endswith(WEIGHT_SUFFIXES):
            shutil.copy2(p, Path(dst) / p.name)
            copied.append(p.name)
    return copied


class _Combined(Mapping):
    """The caller's (possibly lazy) tensors plus the quantized layers' tensors, one mapping."""

    def __init__(self, base: Mapping[str, torch.Tensor]) -> None:
        self.base = base
        self.extra: dict[str, torch.Tensor] = {}

    def __getitem__(self, name: str) -> torch.Tensor:
        return self.extra[name] if name in self.extra else self.base[name]

    def __iter__(self):
        yield from self.base
        yield from self.extra

    def __len__(self) -> int:
        return len(self.base) + len(self.extra)

    def nbytes(self, name: str) -> int:
        return _nbytes(self.extra if name in self.extra else self.base, name)


def write_checkpoint(
    output_dir: str | os.PathLike,
    *,
    model_config: Mapping[str, Any],
    quant_config: SplitQConfig,
    layers: Mapping[str, SplitQLinear],
    tensors: Mapping[str, torch.Tensor],
    groups: Mapping[str, str] | None = None,
    side_files_from: str | os.PathLike | None = None,
    max_shard_bytes: int = DEFAULT_SHARD_BYTES,
    overwrite: bool = False,
    packed_dims: Mapping[str, LayerDims] | None = None,
) -> Path:
    """Write `output_dir` as a SplitQ checkpoint.

    model_config: the model's config.json contents (quantization_config is added).
    quant_config: scheme, ignore list, calibration metadata (its `layers` are filled in here).
    layers: quantized linears by their HF module name.
    tensors: every unquantized tensor (embeddings, norms, vision tower, lm_head) by HF name; may
        be a lazy mapping (loaded one shard at a time; an `nbytes(name)` method avoids loading
        just to plan the shards).
    groups: layer name -> input group name, for layers that share an input (q/k/v, gate/up);
        layers not listed form a group of their own.
    side_files_from: a model directory whose processor/tokenizer files are copied.
    packed_dims: quantized layers whose tensors (checkpoint layout) are already in `tensors`,
        by layer name: how calibration streams its layers from disk without unpacking them.
    Nothing appears at `output_dir` until everything is written; temporaries that killed
    writers of `output_dir` left beside it are removed first. Files get the mode `open()` would
    give them (the umask's), safetensors files included.
    """
    out = Path(output_dir)
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} exists; pass overwrite=True (--overwrite) to replace it")
    groups = dict(groups or {})
    all_tensors = _Combined(tensors)
    for name in tensors:
        if name.rsplit(".", 1)[0] in layers:
            raise ValueError(f"tensor {name} belongs to quantized layer; pass the layer, not its tensors")
    dims = dict(packed_dims or {})
    for name, layer in layers.items():
        dims[name] = layer_dims(layer, groups.get(name, name))
        for suffix, t in layer_to_tensors(layer, quant_config.scheme).items():
            all_tensors.extra[f"{name}.{suffix}"] = t
    quant_config.layers = dims
    config = dict(model_config)
    config["quantization_config"] = quant_config.to_dict()

    out.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(out)
    tmp = out.parent / f".{out.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    lock = None
    try:
        try:
            lock = _lock(tmp)  # held until the rename: marks the directory as a live writer's
        except OSError:
            pass  # no flock on this file system: a later writer will keep this one if it is left
        # One shard in memory at a time: `tensors` may be a lazy mapping over the source files.
        plan = _plan_shards(all_tensors, max_shard_bytes)
        # One metadata key: safetensors writes several in a per-process random order, and a
        # checkpoint should be byte-identical when its tensors are.
        meta = {"format": "pt"}
        weight_map = {}
        for i, names in enumerate(plan, 1):
            fname = "model.safetensors" if len(plan) == 1 else f"model-{i:05d}-of-{len(plan):05d}.safetensors"
            # clone: layers of one group share input-side tensors, and safetensors refuses aliases
            shard = {n: all_tensors[n].detach().to("cpu").contiguous().clone() for n in names}
            save_file(shard, str(tmp / fname), metadata=meta)
            weight_map.update({n: fname for n in names})
            del shard
        if len(plan) > 1:
            total = sum(_nbytes(all_tensors, n) for n in all_tensors)
            index = {"metadata": {"total_size": total}, "weight_map": weight_map}
            (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
        if side_files_from is not None:
            copy_side_files(side_files_from, tmp)
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        mode = default_file_mode()  # also for side files copied with their source's mode
        for f in tmp.iterdir():
            os.chmod(f, mode)
        if out.exists():
            old = out.parent / f".{out.name}.old-{uuid.uuid4().hex[:8]}"
            out.rename(old)
            tmp.rename(out)
            shutil.rmtree(old)
        else:
            tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        if lock is not None:
            os.close(lock)
    return out
