"""The plain-torch reference of SplitQ: the single definition every other path is tested against."""

from .forward import (
    FakeQuantWeights,
    fake_quantize_weights,
    QuantizedInput,
    int_linear,
    int_matmul,
    mac_row_mask,
    quantize_input,
    transformed_inputs,
    splitq_gemm,
    splitq_linear,
    splitq_linear_fake,
    splitq_linear_shard,
)
from .layer import ChannelSplit, SplitQFloatLinear, SplitQLinear, concat_outputs, quantize_linear, split_outputs
from .quantizer import QuantizedTensor, fake_quantize, qrange, quantize, round_ste
from .scheme import SplitQScheme
from .shard import KShard, ShardError, main_k_shards, shard_layer
from .transforms import fold_dense_weight, fold_main_weight, kron_apply, main_transform
from .w4a16 import splitq_linear_w4a16, w4a16_dense_weight

__all__ = [
    "ChannelSplit",
    "KShard",
    "ShardError",
    "FakeQuantWeights",
    "fake_quantize_weights",
    "QuantizedInput",
    "QuantizedTensor",
    "SplitQFloatLinear",
    "SplitQLinear",
    "SplitQScheme",
    "concat_outputs",
    "fake_quantize",
    "fold_dense_weight",
    "fold_main_weight",
    "int_linear",
    "int_matmul",
    "kron_apply",
    "mac_row_mask",
    "main_k_shards",
    "main_transform",
    "qrange",
    "quantize",
    "quantize_input",
    "transformed_inputs",
    "quantize_linear",
    "round_ste",
    "shard_layer",
    "split_outputs",
    "splitq_gemm",
    "splitq_linear",
    "splitq_linear_fake",
    "splitq_linear_shard",
    "splitq_linear_w4a16",
    "w4a16_dense_weight",
]
