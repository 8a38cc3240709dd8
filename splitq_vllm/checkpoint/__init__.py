"""The SplitQ checkpoint format (docs/format.md): config schema, tensor table, writer, reader."""

from .config import (
    DEFAULT_IGNORE,
    FORMAT_VERSION,
    QUANT_METHOD,
    CheckpointError,
    LayerDims,
    SplitQConfig,
    matches_ignore,
)
from .reader import SplitQCheckpoint, check_layer_values, read_checkpoint, read_model_config
from .tensors import TensorSpec, layer_dims, layer_tensor_specs, layer_to_tensors, tensors_to_layer
from .writer import copy_side_files, write_checkpoint

__all__ = [
    "DEFAULT_IGNORE",
    "FORMAT_VERSION",
    "QUANT_METHOD",
    "CheckpointError",
    "LayerDims",
    "SplitQCheckpoint",
    "SplitQConfig",
    "TensorSpec",
    "check_layer_values",
    "copy_side_files",
    "layer_dims",
    "layer_tensor_specs",
    "layer_to_tensors",
    "matches_ignore",
    "read_checkpoint",
    "read_model_config",
    "tensors_to_layer",
    "write_checkpoint",
]
