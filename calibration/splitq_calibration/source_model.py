"""The FP source model, read from its safetensors files one part at a time.

Calibration never loads the whole model: a 72B has 145 GB of bf16 weights. `SourceModel` builds
the transformers module tree with every parameter on the meta device (no memory; buffers such as
the rotary frequencies stay real), then loads the parts the pipeline needs when it needs them and
puts them back on the meta device afterwards:

- for the layer-0 capture: the embeddings, the vision tower and the projector (everything but the
  decoder layers and the output head);
- for decoder layer i: its weights, at its turn.

`reads` logs every load (which prefix, how many bytes, what was resident after it), which is
what the memory tests check and the run report shows.

File names and module names differ (Qwen2.5-VL files: `model.layers.0...`, the module:
`model.language_model.layers.0...`; llava-hf files: `language_model.model.layers.0...`, CLIP's
`vision_model.` dropped): the files' names are renamed with transformers' own conversion mapping,
the one `from_pretrained` applies, and a parameter that no file tensor maps to is an error naming
it. Checkpoints whose tensors transformers converts (fuses or splits) on load are refused.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from splitq_vllm.checkpoint.reader import SAFETENSORS_DTYPES
from splitq_vllm.model_layout import language_model_layers, source_tensor_files

from .errors import CalibrationError


def module_names(model: nn.Module, file_names: list[str]) -> dict[str, str]:
    """File tensor name -> parameter name in `model`, by transformers' load-time renaming."""
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import WeightConverter, WeightRenaming, rename_source_key

    transforms = get_model_conversion_mapping(model)
    renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
    converters = [t for t in transforms if isinstance(t, WeightConverter)]
    if converters:
        raise CalibrationError(
            f"{type(model).__name__}: transformers converts this model's tensors on load ({converters[0]}); "
            "calibration reads tensors one by one and supports models whose files it only renames"
        )
    meta = model.state_dict()
    return {n: rename_source_key(n, renamings, converters, model.base_model_prefix, meta)[0] for n in file_names}


@contextlib.contextmanager
def meta_parameters() -> Iterator[None]:
    """Create modules with their parameters on the meta device and their buffers real.

    torch's `with torch.device("meta")` would put buffers there too, and the non-persistent ones
    (rotary inverse frequencies) are not in the files to load back.
    """
    original = nn.Module.register_parameter

    def register(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        original(module, name, param)
        if param is not None and param.device.type != "meta":
            module._parameters[name] = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)

    nn.Module.register_parameter = register
    try:
        yield
    finally:
        nn.Module.register_parameter = original


@dataclass(frozen=True)
class Read:
    """One load from the files: the module prefix, the bytes read, the bytes resident after it."""

    prefix: str
    nbytes: int
    resident: int


class SourceModel:
    """A Hugging Face VLM directory as a module tree whose parts are loaded on demand."""

    def __init__(self, model_dir: str | os.PathLike) -> None:
        from transformers import AutoConfig, AutoModelForImageTextToText

        self.dir = Path(model_dir)
        if not (self.dir / "config.json").is_file():
            raise CalibrationError(f"model {self.dir}: no config.json (expected a Hugging Face model directory)")
        self.config = AutoConfig.from_pretrained(self.dir)
        with meta_parameters():
            self.model = AutoModelForImageTextToText.from_config(self.config).eval()
        self.files = source_tensor_files(self.dir)
        self.layers_prefix, self.layers = language_model_layers(self.model)
        self.reads: list[Read] = []
        self._file_name: dict[str, str] = {}  # parameter name -> file tensor name
        for file_name, param_name in module_names(self.model, list(self.files)).items():
            if param_name in self._file_name:
                raise CalibrationError(
                    f"model {self.dir}: tensors {self._file_name[param_name]} and {file_name} "
                    f"both load into {param_name}"
                )
            self._file_name[param_name] = file_name
        head = self.model.get_output_embeddings()
        self.head_prefixes = [n for n, m in self.model.named_modules() if m is head and n]

    # -- what is where -----------------------------------------------------------------------
    @staticmethod
    def _named_tensors(module: nn.Module, prefix: str = "") -> Iterator[tuple[str, nn.Parameter]]:
        yield from module.named_parameters(prefix=prefix, remove_duplicate=False)

    @property
    def dtype(self) -> torch.dtype:
        """The dtype the files store the decoder layers in (bf16 for the releases)."""
        name = self._file_name[next(n for n, _ in self._named_tensors(self.layers[0], f"{self.layers_prefix}.0"))]
        with safe_open(str(self.dir / self.files[name]), "pt") as fh:
            return SAFETENSORS_DTYPES[fh.get_slice(name).get_dtype()]

    def layer_prefix(self, i: int) -> str:
        return f"{self.layers_prefix}.{i}"

    def resident_bytes(self) -> int:
        """Bytes of parameters currently loaded (not on the meta device)."""
        seen, total = set(), 0
        for _, p in self._named_tensors(self.model):
            if p.device.type != "meta" and id(p) not in seen:
                seen.add(id(p))
                total += p.numel() * p.element_size()
        return total

    # -- loading and releasing ---------------------------------------------------------------
    def _params_under(self, prefixes: list[str], exclude: list[str]) -> list[tuple[nn.Module, str, str]]:
        """(owning module, attribute, full name) of every parameter under `prefixes`, minus `exclude`."""
        out = []
        for mod_name, module in self.model.named_modules(remove_duplicate=False):
            for attr in list(module._parameters):
                full = f"{mod_name}.{attr}" if mod_name else attr
                inside = any(full == p or full.startswith(p + ".") or p == "" for p in prefixes)
                excluded = any(full == p or full.startswith(p + ".") for p in exclude)
                if inside and not excluded and module._parameters[attr] is not None:
                    out.append((module, attr, full))
        return out

    def load(
        self,
        prefix: str = "",
        exclude: list[str] | None = None,
        device: torch.device | str = "cpu",
        dtype: torch.dtype | None = None,
    ) -> nn.Module:
        """Load every parameter under `prefix` (the whole model for "") except those under
        `exclude`, from the files, onto `device` (floating-point ones in `dtype` if given);
        returns the module at `prefix`. Tied parameters are loaded once."""
        targets = self._params_under([prefix], exclude or [])
        by_file: dict[str, list[tuple[nn.Module, str, str]]] = {}
        # keyed by id() of the replaced parameter, which `keep` holds alive: a freed object's
        # id can be reused by the next one
        loaded: dict[int, nn.Parameter] = {}
        keep: list[nn.Parameter] = []
        for module, attr, full in targets:
            name = self._file_name.get(full)
            if name is None:
                tied = self._tied_source(module._parameters[attr], full)
                if tied is None:
                    raise CalibrationError(f"model {self.dir}: no tensor in the files for parameter {full}")
                continue
            by_file.setdefault(self.files[name], []).append((module, attr, full))
        nbytes = 0
        for fname, items in sorted(by_file.items()):
            with safe_open(str(self.dir / fname), "pt", device="cpu") as fh:
                for module, attr, full in items:
                    old = module._parameters[attr]
                    if id(old) in loaded:
                        module._parameters[attr] = loaded[id(old)]
                        continue
                    t = fh.get_tensor(self._file_name[full])
                    if tuple(t.shape) != tuple(old.shape):
                        raise CalibrationError(
                            f"model {self.dir}: tensor {self._file_name[full]} in {fname} has shape "
                            f"{tuple(t.shape)}, the model's config expects {tuple(old.shape)}"
                        )
                    if dtype is not None and t.is_floating_point():
                        t = t.to(dtype)
                    new = nn.Parameter(t.to(device), requires_grad=False)
                    nbytes += t.numel() * t.element_size()
                    loaded[id(old)] = new
                    keep.append(old)
                    module._parameters[attr] = new
        self._retie(loaded)
        del keep
        self.reads.append(Read(prefix or "<model>", nbytes, self.resident_bytes()))
        return self.model.get_submodule(prefix) if prefix else self.model

    def _tied_source(self, param: nn.Parameter, full: str) -> str | None:
        """The name of a file-backed parameter that is the same object as `param` (tied weights)."""
        for name, p in self._named_tensors(self.model):
            if p is param and name != full and name in self._file_name:
                return name
        return None

    def _retie(self, loaded: dict[int, nn.Parameter]) -> None:
        """Parameters tied to one that was just loaded (same meta object) get the loaded tensor."""
        if not loaded:
            return
        for module in self.model.modules():
            for attr, p in list(module._parameters.items()):
                if p is not None and id(p) in loaded:
                    module._parameters[attr] = loaded[id(p)]

    def release(self, prefix: str = "", exclude: list[str] | None = None) -> None:
        """Put the parameters under `prefix` back on the meta device (their memory is freed once
        nothing else holds them)."""
        replaced: dict[int, nn.Parameter] = {}
        keep = []  # the released tensors stay alive until every tie is redone (ids stay unique)
        for module, attr, _ in self._params_under([prefix], exclude or []):
            p = module._parameters[attr]
            if p.device.type == "meta":
                continue
            if id(p) not in replaced:
                replaced[id(p)] = nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=False)
                keep.append(p)
            module._parameters[attr] = replaced[id(p)]
        self._retie(replaced)
        del keep

    # -- the parts the pipeline uses ---------------------------------------------------------
    def before_layers_exclude(self) -> list[str]:
        """What the layer-0 capture does not need: the decoder layers and the output head."""
        return [self.layers_prefix, *self.head_prefixes]

    def load_before_layers(self, device: torch.device | str = "cpu") -> nn.Module:
        """The embeddings, vision tower and projector (in the files' dtype): what runs before layer 0."""
        return self.load("", exclude=self.before_layers_exclude(), device=device)

    def release_before_layers(self) -> None:
        self.release("", exclude=self.before_layers_exclude())

    def load_layer(self, i: int, device: torch.device | str = "cpu", dtype: torch.dtype | None = None) -> nn.Module:
        """Decoder layer i, read from the files now."""
        return self.load(self.layer_prefix(i), device=device, dtype=dtype)

    def release_layer(self, i: int) -> None:
        self.release(self.layer_prefix(i))

    def layer_bytes(self, i: int) -> int:
        """Bytes decoder layer i takes in the files' dtype (without loading it)."""
        return sum(p.numel() for _, p in self._named_tensors(self.layers[i])) * self.file_element_size

    @property
    def file_element_size(self) -> int:
        """Bytes per weight in the files."""
        return torch.empty(0, dtype=self.dtype).element_size()
