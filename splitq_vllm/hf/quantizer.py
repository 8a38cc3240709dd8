"""`quant_method: "splitq"` for transformers: `from_pretrained(CKPT)` builds the SplitQ linears.

Registered with transformers' `register_quantization_config` / `register_quantizer` when both
`splitq_vllm` and `transformers.quantizers.auto` are imported, in either order
(`splitq_vllm._transformers_hook`), so that after `import splitq_vllm`

    model = AutoModelForImageTextToText.from_pretrained(CKPT, dtype=torch.float32)

is the model `load_quantized_model(CKPT)` gives: every quantized linear a `SplitQLinearModule`
running the reference forward, the text mask refreshed from `input_ids` at each call.

How it loads (transformers 5): the model is built on the meta device; before the weights are
read, the checkpoint's headers are validated (every tensor present, shapes, dtypes: the reader's
errors) and each quantized nn.Linear is replaced by a `SplitQCheckpointLinear` whose buffers are
named like the file's tensors, so transformers' loader fills them through its own key renaming
(`model.layers.N...` in a Qwen2.5-VL file -> `model.language_model.layers.N...`). After loading,
each layer's buffers are checked (all loaded: transformers leaves a missing custom buffer
uninitialised and says nothing; the values as the reader checks them; one group's input-side
tensors identical), then its reference layer is built. `save_pretrained` writes the buffers back
under the file names with the same quantization_config: a SplitQ checkpoint again.

Memory: a layer holds its packed checkpoint tensors (what save_pretrained writes) and the
unpacked int8 codes of the reference forward, about 1.5x its checkpoint bytes at 4 bits
(load_quantized_model holds only the unpacked codes).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from transformers.quantizers.auto import AUTO_QUANTIZER_MAPPING, register_quantization_config, register_quantizer
from transformers.quantizers.base import HfQuantizer
from transformers.utils.quantization_config import QuantizationConfigMixin

from splitq_kernels.reference import SplitQScheme
from splitq_vllm.checkpoint import (
    QUANT_METHOD,
    CheckpointError,
    LayerDims,
    SplitQCheckpoint,
    SplitQConfig,
    check_layer_values,
    layer_tensor_specs,
    read_checkpoint,
    tensors_to_layer,
)
from .model import SplitQLinearModule, install_text_mask, quantizable_modules, target_device


class SplitQHfConfig(QuantizationConfigMixin):
    """The checkpoint's quantization_config for transformers, parsed by the format's own parser
    (errors name the field) and written back unchanged (`to_dict`)."""

    def __init__(self, **fields: Any) -> None:
        self.quant_method = QUANT_METHOD
        source = "config.json: quantization_config"
        self.splitq = SplitQConfig.from_dict({**fields, "quant_method": QUANT_METHOD}, source)

    def to_dict(self) -> dict[str, Any]:
        return self.splitq.to_dict()

    def __iter__(self):
        yield from self.to_dict().items()


class SplitQCheckpointLinear(SplitQLinearModule):
    """A quantized linear as its checkpoint tensors: one buffer per tensor of the format's table,
    named by its suffix (`main_qweight`, `idx_text`, ..., `bias`), in the format's dtype; the
    reference layer (`self.layer`) is built from them by `build()`.

    `model.to(dtype)` moves the buffers but never casts them (the format fixes their dtypes).
    """

    def __init__(self, name: str, dims: LayerDims, scheme: SplitQScheme, bias_dtype: torch.dtype) -> None:
        super().__init__(None, scheme, None)
        self.in_features, self.out_features = dims.in_features, dims.out_features
        self.name = name  # the layer's name in the checkpoint files
        self.dims = dims
        for spec in layer_tensor_specs(dims, scheme):
            self.register_buffer(spec.suffix, torch.empty(spec.shape, dtype=spec.dtype or bias_dtype))

    def build(self) -> None:
        self.layer = tensors_to_layer(dict(self._buffers), self.dims, self.scheme)

    def _apply(self, fn, recurse=True):
        device = target_device(fn, self.main_qweight)
        for key, buf in self._buffers.items():
            self._buffers[key] = buf.to(device)
        if self.layer is not None:
            self.build()
        return self


class SplitQHfQuantizer(HfQuantizer):
    """Loads pre-quantized SplitQ checkpoints (there is nothing to quantize at load time:
    `splitq-calibrate` makes them)."""

    requires_calibration = True

    def __init__(self, quantization_config: SplitQHfConfig, **kwargs: Any) -> None:
        super().__init__(quantization_config, **kwargs)
        self.dtype: torch.dtype | None = None
        self.modules: dict[str, SplitQCheckpointLinear] = {}

    def update_dtype(self, dtype):
        self.dtype = dtype if isinstance(dtype, torch.dtype) else None
        return dtype

    def _process_model_before_weight_loading(self, model, checkpoint_files=None, **kwargs) -> None:
        if not checkpoint_files:
            raise CheckpointError("SplitQ: from_pretrained needs the checkpoint's safetensors files (a directory)")
        ckpt = SplitQCheckpoint(Path(checkpoint_files[0]).parent)
        ckpt.validate(check_values=False)  # headers only: every tensor, shape and dtype, before loading
        qc = self.quantization_config.splitq
        by_file_name = quantizable_modules(model, list(ckpt.weight_map), list(qc.layers))
        for name, dims in qc.layers.items():
            if name not in by_file_name:
                raise CheckpointError(
                    f"{ckpt.path}: quantized layer '{name}' is not a language-model decoder linear (or a "
                    f"vision-tower linear) of {type(model).__name__}"
                )
            module_name, all_vision = by_file_name[name]
            parent, _, child = module_name.rpartition(".")
            bias_dtype = ckpt.tensor_info(f"{name}.bias")[1] if dims.bias else torch.float32
            with torch.device("meta"):
                module = SplitQCheckpointLinear(name, dims, qc.scheme, bias_dtype)
            module.all_vision = all_vision
            setattr(model.get_submodule(parent), child, module)
            self.modules[module_name] = module

    def _process_model_after_weight_loading(self, model, **kwargs):
        # Renamed keys load in the file's dtype (core_model_loading: a pre-quantized checkpoint
        # is "deserialized"): cast the 16-bit rest to the requested dtype, as a plain load would.
        if self.dtype is not None:
            for param in model.parameters():
                if param.is_floating_point() and param.dtype != self.dtype:
                    param.data = param.data.to(self.dtype)
        first_of_group: dict[str, SplitQCheckpointLinear] = {}
        for module in self.modules.values():
            self._check_loaded(module, first_of_group.setdefault(module.dims.group, module))
            module.build()
        text_mask = install_text_mask(model)
        for module in self.modules.values():
            module.text_mask = text_mask
        return model

    def _check_loaded(self, module: SplitQCheckpointLinear, first: SplitQCheckpointLinear) -> None:
        """What transformers does not check: every buffer loaded (a missing custom buffer is left
        as uninitialised memory), its shape (shape checks are off under a quantizer), the values,
        and one group's input-side tensors identical."""
        for spec in layer_tensor_specs(module.dims, module.scheme):
            buf = module._buffers[spec.suffix]
            tname = f"{module.name}.{spec.suffix}"
            if not getattr(buf, "_is_hf_initialized", False):
                raise CheckpointError(
                    f"SplitQ: tensor '{tname}' was not loaded into the model (it is in the files, but the "
                    "loader's key mapping did not bring it to this layer: a key_mapping argument, or a "
                    "transformers version whose renaming differs?)"
                )
            if tuple(buf.shape) != spec.shape:
                raise CheckpointError(
                    f"SplitQ: tensor '{tname}' loaded with shape {list(buf.shape)}, expected {list(spec.shape)}"
                )
            if spec.side == "input" and first is not module and not torch.equal(buf, first._buffers[spec.suffix]):
                raise CheckpointError(
                    f"tensors '{first.name}.{spec.suffix}' and '{tname}' differ although both layers read the same "
                    f"input (group '{module.dims.group}'): shared tensors must be identical"
                )
        check_layer_values(module.name, module.dims, dict(module._buffers))

    def is_serializable(self, *args: Any, **kwargs: Any) -> bool:
        return True

    @property
    def is_trainable(self) -> bool:
        return False


def register() -> None:
    """Register the config and the quantizer (once; transformers refuses a second registration).
    Importing this module does it (last line), which also covers an import of this module that
    itself triggers the import of transformers' registry (the hook finds it half-initialised)."""
    if QUANT_METHOD in AUTO_QUANTIZER_MAPPING:
        return
    register_quantization_config(QUANT_METHOD)(SplitQHfConfig)
    register_quantizer(QUANT_METHOD)(SplitQHfQuantizer)


def quantize_in_place(model, checkpoint_dir: str | Path):
    """Make `model` (the transformers model the SplitQ checkpoint at `checkpoint_dir` was
    calibrated from) that checkpoint's model: its quantized linears swapped for the checkpoint's
    layers (the other weights are the checkpoint's already), its config and quantizer set, so
    that `model.save_pretrained(DIR)` writes the SplitQ checkpoint. Returns `model`."""
    ckpt = read_checkpoint(checkpoint_dir)  # values too: these tensors skip transformers' loader
    quantizer = SplitQHfQuantizer(SplitQHfConfig(**ckpt.quant_config.to_dict()), pre_quantized=True)
    device = next(model.parameters()).device
    files = sorted({str(ckpt.path / f) for f in ckpt.weight_map.values()})
    quantizer.preprocess_model(model, checkpoint_files=files)  # SplitQ modules on the meta device
    for module in quantizer.modules.values():
        for suffix in list(module._buffers):
            tensor = ckpt.tensor(f"{module.name}.{suffix}").to(device)
            tensor._is_hf_initialized = True  # as transformers' loader marks what it loaded
            module._buffers[suffix] = tensor
    model.hf_quantizer = quantizer
    quantizer.postprocess_model(model)  # config.quantization_config, checks, reference layers, text mask
    return model


register()
