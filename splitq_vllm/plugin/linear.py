"""The SplitQ linear method: create, load, check and prepare every tensor of the format, then apply.

One vLLM linear layer holds one or more checkpoint layers ("members"): `qkv_proj` = q, k, v;
`gate_up_proj` = gate, up; `o_proj`, `down_proj` one each. For every tensor of the format's table
(`layer_tensor_specs`) the layer gets one vLLM parameter named by its suffix:
- "output"-side tensors (weights, scales, `*_up`): the members' rows concatenated along dim 0
  (`ModelWeightParameter` / `ChannelQuantScaleParameter`, output_dim 0): vLLM's fused loaders put
  shard q at rows [0, o_q), k after it, and so on.
- "input"-side tensors (channel sets, transforms, clips, `*_down`): one copy, identical in every
  member (`BasevLLMParameter`); vLLM copies each member's file tensor over the whole parameter, so
  the loader here checks that every member's copy equals the one already loaded.

vLLM does not check that quantized parameters were loaded (a missing one keeps `torch.empty`
garbage), nor dtypes (it casts), and fails mis-shaped tensors with a bare assert. So every
parameter's weight loader is wrapped: it checks the shape and dtype of each file tensor against the
table, checks the input-side copies, and records (suffix, member). `process_weights_after_loading`
fails on anything not loaded, naming the checkpoint tensor, checks the values (channel sets
partition the input, finite floats, positive scales), builds the reference `SplitQLinear` of the
fused layer (`concat_outputs` of the members) and hands it to the backend (backends.py), once.

Vision-tower layers (`all_vision`, config.py): the checkpoint's fused `attn.qkv` is one member of
vLLM's QKVParallelLinear (its q/k/v output shards grouped into the member's rows, as Qwen3.5's
in_proj_qkv; vLLM's fused-checkpoint loader splits each output-side tensor at the shard
offsets); `apply` passes an all-False mask of the input's row count instead of the shared
buffer's rows. Served at tensor-parallel size 1 per tower (--mm-encoder-tp-mode data at TP > 1).

Tensor parallelism (parallel.py, docs/vllm_plugin.md): in a column-parallel layer (qkv, gate_up)
vLLM's loaders split the output-side tensors by rank (k/v replicated when the TP size exceeds the
KV heads) and copy the input-side ones whole. A row-parallel layer (o_proj, down_proj) with TP > 1
keeps every tensor whole except the packed main weight, of which each rank reads only the bytes of
its block of the main K range (reference/shard.py: blocks start on 8-code packing groups); `apply`
all-gathers the input so every rank runs the input side on the whole X, and the backend computes
the rank's partial output, which vLLM's all-reduce sums.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

import torch
from torch import nn
from vllm.logger import init_logger
from vllm.model_executor.layers.linear import LinearMethodBase, register_weight_loader_v2_supported_method
from vllm.model_executor.parameter import BasevLLMParameter, ChannelQuantScaleParameter, ModelWeightParameter

from splitq_kernels.packing import packed_row_bytes, unpack_codes
from splitq_kernels.reference import KShard, QuantizedTensor, SplitQScheme, concat_outputs
from splitq_vllm.checkpoint import (
    CheckpointError,
    LayerDims,
    TensorSpec,
    check_layer_values,
    layer_tensor_specs,
    tensors_to_layer,
)

from .backends import Backend, select_backend
from .parallel import row_shard
from .text_mask import BUFFER_NAME

logger = init_logger(f"vllm.{__name__}")  # under "vllm" so that vLLM's log handler shows it

_QKV_SHARDS = {"q": 0, "k": 1, "v": 2}


@dataclass(frozen=True)
class Member:
    """One checkpoint layer inside a vLLM layer: its file name (tensor prefix) and dims."""

    name: str
    dims: LayerDims


def _dtype_name(dtype) -> str:
    return str(dtype).replace("torch.", "")


@register_weight_loader_v2_supported_method
class SplitQLinearMethod(LinearMethodBase):
    """LinearMethod of one vLLM linear layer whose members are SplitQ layers of the checkpoint."""

    def __init__(
        self,
        prefix: str,
        members: list[Member],
        scheme: SplitQScheme,
        text_mask: Callable[[], torch.Tensor],
        all_vision: bool = False,
    ) -> None:
        super().__init__()
        self.prefix = prefix
        self.members = members
        self.scheme = scheme
        self._text_mask = text_mask  # () -> the model's shared mask buffer
        # a vision-tower linear: its rows are patches, every one a vision row (no shared buffer)
        self.all_vision = all_vision
        dims0 = members[0].dims
        self.specs: list[TensorSpec] = [s for s in layer_tensor_specs(dims0, scheme) if s.suffix != "bias"]
        self.backend: Backend | None = None
        self.shard: KShard | None = None  # set in create_weights for a row-parallel layer with TP > 1

    # ------------------------------------------------------------------------------------------
    def _member_index(self, shard_id) -> int:
        if shard_id is None:
            if len(self.members) != 1:
                raise CheckpointError(
                    f"SplitQ layer '{self.prefix}': a tensor arrived without a shard id for a fused layer of "
                    f"{len(self.members)} checkpoint layers (the format stores q/k/v and gate/up separately)"
                )
            return 0
        owner = getattr(self, "_shard_member", None)  # vLLM shard -> member (set in create_weights)
        if isinstance(shard_id, str):
            idx = _QKV_SHARDS[shard_id]
        elif isinstance(shard_id, int):
            idx = owner[shard_id] if owner is not None and 0 <= shard_id < len(owner) else shard_id
        elif isinstance(shard_id, tuple) and owner is not None and len({owner[i] for i in shard_id if 0 <= i < len(owner)}) == 1:
            idx = owner[shard_id[0]]  # several vLLM shards of one checkpoint layer (Qwen3.5's in_proj_qkv)
        else:
            raise CheckpointError(f"SplitQ layer '{self.prefix}': unsupported shard id {shard_id!r}")
        if not 0 <= idx < len(self.members):
            raise CheckpointError(f"SplitQ layer '{self.prefix}': shard id {shard_id!r} out of range")
        return idx

    @staticmethod
    def _shard_arg(args, kwargs):
        if args:
            return args[0]
        for k in ("loaded_shard_id", "shard_id"):
            if k in kwargs:
                return kwargs[k]
        return None

    def _member_shape(self, spec: TensorSpec, member: Member) -> tuple[int, ...]:
        if spec.side == "output":
            return (member.dims.out_features, *spec.shape[1:])
        return spec.shape

    def _tracking_loader(self, layer: nn.Module, base_loader, spec: TensorSpec):
        def loader(param, loaded_weight, *args, **kwargs):
            idx = self._member_index(self._shard_arg(args, kwargs))
            member = self.members[idx]
            tname = f"{member.name}.{spec.suffix}"
            want = tuple(self._member_shape(spec, member))
            if tuple(loaded_weight.shape) != want:
                raise CheckpointError(
                    f"SplitQ checkpoint: tensor '{tname}' has shape {list(loaded_weight.shape)}, expected {list(want)} "
                    f"(vLLM layer '{self.prefix}')"
                )
            if loaded_weight.dtype != spec.dtype:
                raise CheckpointError(
                    f"SplitQ checkpoint: tensor '{tname}' has dtype {_dtype_name(loaded_weight.dtype)}, "
                    f"expected {_dtype_name(spec.dtype)} (vLLM layer '{self.prefix}')"
                )
            loaded = layer.splitq_loaded
            if spec.side == "input":
                first = next((i for i in range(len(self.members)) if (spec.suffix, i) in loaded), None)
                if first is not None and first != idx and not torch.equal(param.data, loaded_weight.to(param.device)):
                    raise CheckpointError(
                        f"SplitQ checkpoint: tensors '{self.members[first].name}.{spec.suffix}' and '{tname}' differ, "
                        f"but the layers read the same input (group '{member.dims.group}', fused as vLLM layer "
                        f"'{self.prefix}'): input-side tensors must be identical"
                    )
            if self.shard is not None and spec.suffix == "main_qweight":
                loaded_weight = self._shard_bytes(loaded_weight)
            base_loader(param, loaded_weight, *args, **kwargs)
            loaded.add((spec.suffix, idx))

        return loader

    def _shard_bytes(self, packed: torch.Tensor) -> torch.Tensor:
        """The rank's bytes of a packed main weight row: its block starts on an 8-code group, which
        is `bits` bytes (docs/format.md, "Packing")."""
        wb, s = self.scheme.weight_bits, self.shard
        return packed.narrow(1, s.start // 8 * wb, packed_row_bytes(s.width, wb))

    def _tracking_bias_loader(self, layer: nn.Module, base_loader):
        def loader(param, loaded_weight, *args, **kwargs):
            if getattr(layer, "_splitq_in_bias_loader", False):
                # vLLM's loader of a checkpoint-fused layer (the tower's attn.qkv) splits the tensor
                # and calls self.weight_loader, i.e. this wrapper, per shard: checked once, whole
                return base_loader(param, loaded_weight, *args, **kwargs)
            if param is getattr(layer, "bias", None):
                idx = self._member_index(self._shard_arg(args, kwargs))
                member = self.members[idx]
                tname = f"{member.name}.bias"
                if tuple(loaded_weight.shape) != (member.dims.out_features,):
                    raise CheckpointError(
                        f"SplitQ checkpoint: tensor '{tname}' has shape {list(loaded_weight.shape)}, expected "
                        f"[{member.dims.out_features}] (vLLM layer '{self.prefix}')"
                    )
                if not loaded_weight.is_floating_point():
                    raise CheckpointError(f"SplitQ checkpoint: tensor '{tname}' has dtype {_dtype_name(loaded_weight.dtype)}, expected a float dtype")
                layer.splitq_loaded.add(("bias", idx))
            layer._splitq_in_bias_loader = True
            try:
                return base_loader(param, loaded_weight, *args, **kwargs)
            finally:
                layer._splitq_in_bias_loader = False

        return loader

    def _member_sizes(self, sizes: list[int], tp: int) -> list[int]:
        """vLLM's output shards grouped per checkpoint layer: one shard each, or (Qwen3.5's
        in_proj_qkvz: q, k, v, z shards for the checkpoint's in_proj_qkv and in_proj_z)
        consecutive shards that add up to a layer's rows. Records which member owns each shard."""
        self._shard_member = list(range(len(sizes)))
        if len(sizes) == len(self.members) or tp != 1:
            return sizes
        grouped, owner, i = [], [], 0
        for j, m in enumerate(self.members):
            rows = 0
            while i < len(sizes) and rows < m.dims.out_features:
                rows += sizes[i]
                owner.append(j)
                i += 1
            grouped.append(rows)
        if i != len(sizes) or any(r != m.dims.out_features for r, m in zip(grouped, self.members)):
            return sizes  # no grouping fits: the shape check below names the mismatch
        self._shard_member = owner
        return grouped

    # ------------------------------------------------------------------------------------------
    def create_weights(
        self,
        layer: nn.Module,
        input_size_per_partition: int,
        output_partition_sizes: list[int],
        input_size: int,
        output_size: int,
        params_dtype: torch.dtype,
        **extra_weight_attrs,
    ) -> None:
        weight_loader = extra_weight_attrs.pop("weight_loader")
        output_partition_sizes = self._member_sizes(list(output_partition_sizes), getattr(layer, "tp_size", 1))
        if len(output_partition_sizes) != len(self.members):
            raise CheckpointError(
                f"SplitQ: vLLM layer '{self.prefix}' has {len(output_partition_sizes)} output shards, the checkpoint "
                f"{len(self.members)} layers for it ({[m.name for m in self.members]})"
            )
        from vllm.model_executor.layers.linear import QKVParallelLinear, RowParallelLinear

        tp = getattr(layer, "tp_size", 1)
        if self.all_vision and tp > 1:
            from .parallel import ParallelConfigError

            raise ParallelConfigError(
                f"SplitQ: vision-tower layer '{self.prefix}' is split across {tp} tensor-parallel ranks; the SplitQ "
                "tower is served replicated only: add --mm-encoder-tp-mode data"
            )
        row_parallel = isinstance(layer, RowParallelLinear) and tp > 1
        replicas = getattr(layer, "num_kv_head_replicas", 1) if isinstance(layer, QKVParallelLinear) else 1
        for i, (m, part) in enumerate(zip(self.members, output_partition_sizes)):
            # column-parallel: vLLM gives each rank 1/tp of the outputs (of k and v: replicas ranks share one block)
            out = part if row_parallel else part * tp // (replicas if i > 0 else 1)
            if m.dims.out_features != out or m.dims.in_features != input_size:
                raise CheckpointError(
                    f"SplitQ: checkpoint layer '{m.name}' is {m.dims.in_features} -> {m.dims.out_features}, but vLLM "
                    f"layer '{self.prefix}' expects {input_size} -> {out} for it (is this checkpoint for this model?)"
                )
        if input_size_per_partition != input_size and not row_parallel:
            raise CheckpointError(f"SplitQ: vLLM layer '{self.prefix}' splits its input but is not row-parallel")
        if row_parallel:
            self.shard = row_shard(self.prefix, self.members[0].dims.main, tp, layer.tp_rank)
        has_bias = bool(getattr(layer, "has_bias", False))
        for m in self.members:
            if m.dims.bias != has_bias:
                raise CheckpointError(
                    f"SplitQ: checkpoint layer '{m.name}' has bias={m.dims.bias}, but vLLM layer '{self.prefix}' "
                    f"{'has' if has_bias else 'has no'} bias"
                )
        out_total = sum(output_partition_sizes)
        layer.splitq_loaded = set()
        layer.splitq_output_sizes = list(output_partition_sizes)
        for spec in self.specs:
            if spec.side == "output":
                shape = (out_total, *spec.shape[1:])
            else:
                shape = spec.shape
            if self.shard is not None and spec.suffix == "main_qweight":
                shape = (out_total, packed_row_bytes(self.shard.width, self.scheme.weight_bits))
            data = torch.empty(shape, dtype=spec.dtype)
            loader = self._tracking_loader(layer, weight_loader, spec)
            if spec.side == "input" or self.shard is not None:
                # replicated, or a row-parallel shard's tensor: copied whole (main_qweight narrowed by the loader)
                param = BasevLLMParameter(data=data, weight_loader=loader)
            elif len(shape) == 2:
                param = ModelWeightParameter(data=data, input_dim=1, output_dim=0, weight_loader=loader)
            else:
                param = ChannelQuantScaleParameter(data=data, output_dim=0, weight_loader=loader)
            layer.register_parameter(spec.suffix, param)
        # The bias is the layer's own parameter (created after this call, loaded by layer.weight_loader):
        # shadow that bound method with a tracking wrapper so a missing bias is caught too.
        layer.weight_loader = self._tracking_bias_loader(layer, layer.weight_loader)
        layer.splitq_all_vision = self.all_vision
        if not self.all_vision:
            layer.register_buffer(BUFFER_NAME, self._text_mask(), persistent=False)

    # ------------------------------------------------------------------------------------------
    def process_weights_after_loading(self, layer: nn.Module) -> None:
        loaded: set = layer.splitq_loaded
        expected = [(s.suffix, i) for s in self.specs for i in range(len(self.members))]
        if getattr(layer, "bias", None) is not None:
            expected += [("bias", i) for i in range(len(self.members))]
        missing = [f"{self.members[i].name}.{suffix}" for suffix, i in expected if (suffix, i) not in loaded]
        if missing:
            also = ""
            if len(missing) > 1:
                also = f"; also not loaded: {missing[1:5]}" + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
            raise CheckpointError(
                f"SplitQ checkpoint: tensor '{missing[0]}' was not loaded (missing from the checkpoint?) "
                f"for vLLM layer '{self.prefix}'{also}"
            )
        members = []
        start = 0
        for m, rows in zip(self.members, layer.splitq_output_sizes):
            t = {}
            for s in self.specs:
                v = getattr(layer, s.suffix).data
                t[s.suffix] = v[start : start + rows] if s.side == "output" else v
            check_layer_values(m.name, m.dims, t)
            dims = replace(m.dims, out_features=rows, bias=False)
            if self.shard is None:
                members.append(tensors_to_layer(t, dims, self.scheme))
            else:
                members.append(self._rank_layer(t, dims))
            start += rows
        ref = concat_outputs(members) if len(members) > 1 else members[0]
        for s in self.specs:  # the packed copies are not needed any more
            delattr(layer, s.suffix)
        self.backend = select_backend(ref.kron_shape, self.scheme, ref.main_w.codes.device)
        self.backend.prepare(layer, ref, self.scheme, self.shard)
        layer.splitq_shard = self.shard
        layer.splitq_backend = self.backend.name
        logger.info_once("SplitQ: %s backend on %s", self.backend.name, ref.main_w.codes.device)

    def _rank_layer(self, t: dict[str, torch.Tensor], dims: LayerDims):
        """A row-parallel rank's reference layer (reference/shard.py): everything whole but the main
        weight, whose loaded bytes are the block's."""
        wb = self.scheme.weight_bits
        rest = tensors_to_layer({k: v for k, v in t.items() if k != "main_qweight"}, dims, self.scheme)
        codes = unpack_codes(t["main_qweight"], self.shard.width, wb)
        # shard_layer's convention (main_w = the block's columns), built from the block directly:
        # the full main weight never exists on this rank
        return replace(rest, main_w=QuantizedTensor(codes, t["main_wscale"].reshape(-1, 1), None, wb))

    # ------------------------------------------------------------------------------------------
    def apply(self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        x2 = x.reshape(-1, x.shape[-1])
        if self.shard is not None:
            # row-parallel: every rank runs the input side on the whole input (vLLM split it by rank)
            from vllm.distributed import tensor_model_parallel_all_gather

            x2 = tensor_model_parallel_all_gather(x2.contiguous(), dim=-1)
        if self.all_vision:
            # the reference's convention for the tower (splitq_vllm.hf, calibration): an explicit
            # all-False mask (None would mean all text); no data-dependent branch, graph-safe
            mask = torch.zeros(x2.shape[0], dtype=torch.bool, device=x2.device)
        else:
            mask = getattr(layer, BUFFER_NAME)[: x2.shape[0]]
        y = self.backend.apply(layer, x2, mask, bias)
        return y.reshape(*x.shape[:-1], y.shape[-1])
