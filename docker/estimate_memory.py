"""GPU memory estimate for serving a SplitQ Qwen2.5-VL checkpoint with vLLM (docker/README.md).

    .venv/bin/python docker/estimate_memory.py                       # the README's table (W4A4)
    .venv/bin/python docker/estimate_memory.py --scheme w3a3 --max-model-len 32768 --json
    .venv/bin/python docker/estimate_memory.py --models Qwen2.5-VL-32B Qwen2.5-VL-72B --tensor-parallel-size 2

Computed from the format, not measured (no GPU here). For each model:
- the model is instantiated on PyTorch's meta device from the public config numbers
  (splitq_vllm.testing.published: Qwen2.5-VL-3B / 7B), so every tensor shape is transformers' own;
- `splitq_vllm.model_layout.linear_groups` lists the linears calibration quantizes (q/k/v,
  o, gate/up, down of every decoder layer), and each gets the `LayerDims` that `splitq-calibrate`
  gives it with its default settings (`CalibrationConfig` and the `splitq` preset: 2% text and 2%
  vision outlier channels via `calibration.dims.outlier_counts`, Kronecker factors via
  `kron_factors`, CWS rank 2% and MAC rank 3% of min(D_in, D_out) of the fused group);
- checkpoint bytes: `layer_tensor_specs` of every layer (docs/format.md; input-side tensors are
  stored once per member in the files, loaded once per fused group by vLLM);
- served bytes: what the plugin keeps on the GPU with the Triton backend (the default on CUDA):
  `splitq_kernels.layout.prepare_kernel_layer` of each fused group (4-bit words, int8 low-rank
  factors padded to a power-of-two rank, float32 scales and column sums). Its size is affine in
  the output width, so it is evaluated exactly on two narrow zero-filled copies of each group and
  extrapolated, instead of packing billions of codes;
- everything else (vision tower, projector, embeddings, lm_head, norms) in 16 bits, as in the
  checkpoint; KV cache in 16 bits: 2 x layers x kv_heads x head_dim x 2 bytes per token.

With --tensor-parallel-size N, the memory of each GPU (docs/vllm_plugin.md, "Serving across GPUs"):
column-parallel groups (q/k/v, gate/up) keep 1/N of their output side and the whole input side
(channel sets, transforms, the low-rank "down" factors: replicated); row-parallel groups (o, down)
keep their block of the main K range of the packed main weight (rank 0's block, the largest) and
everything else whole (input side, outlier weights, low-rank factors, per-output scales); the
vision tower, embeddings and lm_head are split N ways by vLLM, norms replicated; the KV cache per
GPU holds kv_heads / N heads (one head when N exceeds the KV heads: vLLM replicates them).

Not included (vLLM measures them at start-up and takes them out of the KV cache budget): the CUDA
context and cuBLAS/Triton workspaces, the activation peak of the profiling run (largest batch and
the vision encoder on the largest image), CUDA graphs, and the bf16 bias parameters vLLM's q/k/v
layers keep beside the kernels' float32 copy (< 1 MiB).
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace

GIB = 1024**3
MIB = 1024**2
RTX_4090_MIB = 24564  # what nvidia-smi reports for a 24 GB RTX 4090
# docker-compose.yml's settings (tests/deploy/test_memory.py keeps them equal)
MAX_MODEL_LEN = 16384
GPU_MEMORY_UTILIZATION = 0.90

# The Qwen2.5-VL Instruct releases (their config.json numbers live in splitq_vllm.testing.published)
MODELS = {"Qwen2.5-VL-3B": "qwen2.5-vl-3b", "Qwen2.5-VL-7B": "qwen2.5-vl-7b", "Qwen2.5-VL-32B": "qwen2.5-vl-32b",
          "Qwen2.5-VL-72B": "qwen2.5-vl-72b"}
DEFAULT_MODELS = ["Qwen2.5-VL-3B", "Qwen2.5-VL-7B"]  # one 4090 each (the README's first table)
ROW_PARALLEL = ("o", "down")  # the group kinds vLLM splits by input (RowParallelLinear)


def build_meta_model(name: str):
    """The transformers model with the public config's shapes, on the meta device (no memory)."""
    from splitq_vllm.testing.published import meta_model

    model = meta_model(MODELS[name])
    return model, model.config


def default_dims(group, has_bias: bool):
    """LayerDims of each member of a linear group, as splitq-calibrate sets them by default."""
    from splitq_calibration import CalibrationConfig
    from splitq_calibration.dims import kron_factors, outlier_counts, rank_for
    from splitq_vllm.checkpoint.config import LayerDims

    cfg = CalibrationConfig().resolved()  # method splitq: 2% / 2% outliers, CWS 2%, MAC 3%
    d_in, d_out = group.in_features, sum(group.out_features)
    k_t, k_v = outlier_counts(d_in, cfg.text_ratio, cfg.vision_ratio)
    main = d_in - k_t - k_v
    # group_params.GroupParams: rank of the fused group's weight, capped by its dimensions
    cws = min(rank_for(d_in, d_out, cfg.cws_ratio), main, d_out)
    mac = min(rank_for(d_in, d_out, cfg.mac_ratio), main, d_out)
    return [
        LayerDims(
            in_features=d_in, out_features=o, main=main, text=k_t, vision=k_v, kron=kron_factors(main),
            cws_rank=cws, mac_rank=mac, group=group.name, bias=has_bias,
        )
        for o in group.out_features
    ]  # fmt: skip


def spec_bytes(spec, bias_bytes: int) -> int:
    n = 1
    for s in spec.shape:
        n *= s
    size = bias_bytes if spec.dtype is None else spec.dtype.itemsize
    return n * size


def kernel_layout_bytes(dims: list, scheme, shard=None) -> int:
    """Bytes of prepare_kernel_layer(fused group): exact, from two narrow copies (affine in width).
    With `shard` (a KShard): the row-parallel rank's layer (its block of the main weight)."""
    import torch

    from splitq_kernels.layout import prepare_kernel_layer
    from splitq_kernels.reference import concat_outputs, shard_layer
    from splitq_vllm.checkpoint.tensors import layer_tensor_specs, tensors_to_layer

    def at_width(width: int) -> int:
        members = []
        for d in dims:
            narrow = replace(d, out_features=width)
            t = {}
            for s in layer_tensor_specs(narrow, scheme):
                dtype = torch.float32 if s.dtype is None else s.dtype
                t[s.suffix] = torch.zeros(s.shape, dtype=dtype)
            t["idx_main"] = torch.arange(narrow.main, dtype=torch.int32)
            members.append(tensors_to_layer(t, narrow, scheme))
        layer = concat_outputs(members) if len(members) > 1 else members[0]
        if shard is not None:
            layer = shard_layer(layer, shard)
        return prepare_kernel_layer(layer, scheme, "cpu").nbytes()

    w1, w2 = 8, 16
    b1, b2 = at_width(w1), at_width(w2)
    per_output = (b2 - b1) / ((w2 - w1) * len(dims))
    total_out = sum(d.out_features for d in dims)
    return int(round(b1 + per_output * (total_out - w1 * len(dims))))


def kernel_layout_bytes_per_gpu(dims: list, scheme, kind: str, tp: int) -> int:
    """One GPU's bytes of a fused group at tensor parallel size `tp` (module doc)."""
    if tp == 1:
        return kernel_layout_bytes(dims, scheme)
    if kind in ROW_PARALLEL:
        from splitq_kernels.reference import main_k_shards

        return kernel_layout_bytes(dims, scheme, main_k_shards(dims[0].main, tp)[0])
    # column-parallel: the rank's layer has 1/tp of every member's outputs, the whole input side
    return kernel_layout_bytes([replace(d, out_features=d.out_features // tp) for d in dims], scheme)


def estimate(name: str, scheme_name: str = "w4a4", max_model_len: int = MAX_MODEL_LEN, dtype_bytes: int = 2,
             tensor_parallel_size: int = 1) -> dict:
    """The numbers for one of MODELS (its public config's shapes)."""
    model, config = build_meta_model(name)
    e = estimate_model(model, config, scheme_name, max_model_len, dtype_bytes, tensor_parallel_size)
    return dict(e, model=name)


def estimate_model(model, config, scheme_name: str = "w4a4", max_model_len: int = MAX_MODEL_LEN, dtype_bytes: int = 2,
                   tensor_parallel_size: int = 1) -> dict:
    """The numbers for any transformers model calibration supports (meta device or real); with
    tensor_parallel_size > 1 also the memory of each GPU (module doc)."""
    from splitq_kernels.reference import SplitQScheme
    from splitq_vllm.checkpoint.tensors import layer_tensor_specs
    from splitq_vllm.model_layout import linear_groups

    scheme = SplitQScheme.from_name(scheme_name)
    groups = linear_groups(model, list(model.state_dict().keys()))

    quantized_params: set[str] = set()
    file_bytes = fused_bytes = kernel_bytes = 0
    kernel_cache: dict[tuple, int] = {}
    tp = tensor_parallel_size
    kernel_per_gpu = 0
    gpu_cache: dict[tuple, int] = {}
    quantized_weights = 0  # parameters replaced by SplitQ layers (for the 16-bit comparison)
    for g in groups:
        mods = [model.get_submodule(m) for m in g.modules]
        has_bias = mods[0].bias is not None
        for m in g.modules:
            quantized_params.update({f"{m}.weight", f"{m}.bias"})
        quantized_weights += sum(mod.weight.numel() for mod in mods)
        dims = default_dims(g, has_bias)
        specs = [layer_tensor_specs(d, scheme) for d in dims]
        for member_specs in specs:
            file_bytes += sum(spec_bytes(s, dtype_bytes) for s in member_specs)
        fused_bytes += sum(spec_bytes(s, dtype_bytes) for s in specs[0] if s.side == "input")
        fused_bytes += sum(spec_bytes(s, dtype_bytes) for ms in specs for s in ms if s.side == "output")
        key = tuple(replace(d, group="") for d in dims)  # the same in every decoder layer: compute once
        if key not in kernel_cache:
            kernel_cache[key] = kernel_layout_bytes(dims, scheme)
        kernel_bytes += kernel_cache[key]
        if tp > 1:
            if (key, g.kind) not in gpu_cache:
                gpu_cache[(key, g.kind)] = kernel_layout_bytes_per_gpu(dims, scheme, g.kind, tp)
            kernel_per_gpu += gpu_cache[(key, g.kind)]

    parts = {"vision tower + projector": 0, "embeddings": 0, "lm_head": 0, "norms": 0}
    total_params = 0
    for pname, p in model.named_parameters():  # tied parameters are listed once
        total_params += p.numel()
        if pname in quantized_params:
            continue
        if ".visual." in f".{pname}":
            parts["vision tower + projector"] += p.numel() * dtype_bytes
        elif "embed_tokens" in pname:
            parts["embeddings"] += p.numel() * dtype_bytes
        elif pname.startswith("lm_head"):
            parts["lm_head"] += p.numel() * dtype_bytes
        else:
            parts["norms"] += p.numel() * dtype_bytes
    unquantized = sum(parts.values())

    tc = config.text_config
    head_dim = getattr(tc, "head_dim", None) or tc.hidden_size // tc.num_attention_heads
    kv_per_token = 2 * tc.num_hidden_layers * tc.num_key_value_heads * head_dim * dtype_bytes
    out = {
        "model": type(model).__name__,
        "scheme": scheme_name,
        "parameters": total_params,
        "bf16_weights_bytes": total_params * dtype_bytes,
        "quantized_linears": sum(len(g.modules) for g in groups),
        "quantized_linear_params": quantized_weights,
        "splitq_layers_checkpoint_bytes": file_bytes,
        "splitq_layers_fused_bytes": fused_bytes,
        "splitq_layers_served_bytes": kernel_bytes,
        "unquantized_bytes": unquantized,
        "unquantized_parts_bytes": parts,
        "checkpoint_bytes": file_bytes + unquantized,
        "served_weights_bytes": kernel_bytes + unquantized,
        "kv_bytes_per_token": kv_per_token,
        "max_model_len": max_model_len,
        "kv_one_sequence_bytes": kv_per_token * max_model_len,
        "tensor_parallel_size": tp,
    }
    if tp > 1:
        split = parts["vision tower + projector"] + parts["embeddings"] + parts["lm_head"]
        kv_heads_per_gpu = max(1, tc.num_key_value_heads // tp)
        kv_gpu = 2 * tc.num_hidden_layers * kv_heads_per_gpu * head_dim * dtype_bytes
        out["per_gpu"] = {
            "splitq_layers_served_bytes": kernel_per_gpu,
            "unquantized_bytes": split // tp + parts["norms"],
            "served_weights_bytes": kernel_per_gpu + split // tp + parts["norms"],
            "kv_bytes_per_token": kv_gpu,
            "kv_one_sequence_bytes": kv_gpu * max_model_len,
        }
    return out


def budget(e: dict, gpu_mib: int, utilization: float) -> dict:
    """What is left of vLLM's budget (utilization x total) after the weights, and how many tokens
    of KV cache that would hold before activations and CUDA graphs are taken out (an upper bound).
    Under tensor parallelism: per GPU (each GPU holds its share of every sequence's KV cache)."""
    total = gpu_mib * MIB * utilization
    e = e.get("per_gpu", e)
    room = total - e["served_weights_bytes"]
    return {
        "gpu_mib": gpu_mib,
        "gpu_memory_utilization": utilization,
        "budget_bytes": int(total),
        "room_after_weights_bytes": int(room),
        "kv_tokens_upper_bound": int(room // e["kv_bytes_per_token"]) if room > 0 else 0,
    }


def markdown(rows: list[dict]) -> str:
    def gib(b: float) -> str:
        return f"{b / GIB:.2f}"

    lines = [
        "| GiB (estimate) | " + " | ".join(r["model"] for r in rows) + " |",
        "|---|" + "---|" * len(rows),
    ]

    def row(label: str, values: list[str]) -> None:
        lines.append(f"| {label} | " + " | ".join(values) + " |")

    row("BF16 model, all weights", [gib(r["bf16_weights_bytes"]) for r in rows])
    row(f"SplitQ {rows[0]['scheme'].upper()} linears, checkpoint files", [gib(r["splitq_layers_checkpoint_bytes"]) for r in rows])
    row(f"SplitQ {rows[0]['scheme'].upper()} linears, on the GPU (Triton layout)", [gib(r["splitq_layers_served_bytes"]) for r in rows])
    row("16-bit rest: vision tower + projector", [gib(r["unquantized_parts_bytes"]["vision tower + projector"]) for r in rows])
    row("16-bit rest: embeddings + lm_head (+ norms)", [
        gib(r["unquantized_parts_bytes"]["embeddings"] + r["unquantized_parts_bytes"]["lm_head"] + r["unquantized_parts_bytes"]["norms"])
        for r in rows
    ])  # fmt: skip
    row("**checkpoint on disk**", [gib(r["checkpoint_bytes"]) for r in rows])
    row("**weights on the GPU**", [gib(r["served_weights_bytes"]) for r in rows])
    row("KV cache per token (bf16), KiB", [f"{r['kv_bytes_per_token'] / 1024:.0f}" for r in rows])
    row(f"KV cache, one {rows[0]['max_model_len']}-token sequence", [gib(r["kv_one_sequence_bytes"]) for r in rows])
    b = rows[0]["budget"]
    row(
        f"vLLM budget: {b['gpu_memory_utilization']:.2f} x {b['gpu_mib']} MiB",
        [gib(r["budget"]["budget_bytes"]) for r in rows],
    )
    row("left for KV cache + activations + CUDA graphs", [gib(r["budget"]["room_after_weights_bytes"]) for r in rows])
    row("KV tokens that room holds (upper bound)", [f"{r['budget']['kv_tokens_upper_bound']:,}" for r in rows])
    if "per_gpu" in rows[0]:
        n = rows[0]["tensor_parallel_size"]
        lines.insert(0, f"Per GPU at --tensor-parallel-size {n} (the budget rows are per GPU):\n")
        row(f"**per GPU ({n} GPUs): SplitQ linears**", [gib(r["per_gpu"]["splitq_layers_served_bytes"]) for r in rows])
        row(f"**per GPU ({n} GPUs): 16-bit rest**", [gib(r["per_gpu"]["unquantized_bytes"]) for r in rows])
        row(f"**per GPU ({n} GPUs): weights**", [gib(r["per_gpu"]["served_weights_bytes"]) for r in rows])
        row(f"per GPU ({n} GPUs): KV cache per token, KiB",
            [f"{r['per_gpu']['kv_bytes_per_token'] / 1024:.0f}" for r in rows])
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=DEFAULT_MODELS, choices=list(MODELS))
    p.add_argument("--scheme", default="w4a4", help="w4a8, w4a4, w3a3, w3a2 (default w4a4)")
    p.add_argument("--max-model-len", type=int, default=MAX_MODEL_LEN, help=f"tokens of one sequence's KV cache (default {MAX_MODEL_LEN})")
    p.add_argument("--gpu-mib", type=int, default=RTX_4090_MIB, help=f"GPU memory in MiB (default {RTX_4090_MIB}: RTX 4090)")
    p.add_argument("--gpu-memory-utilization", type=float, default=GPU_MEMORY_UTILIZATION)
    p.add_argument("--tensor-parallel-size", type=int, default=1,
                   help="GPUs one model is split over (vLLM's --tensor-parallel-size): also print the memory per GPU")
    p.add_argument("--json", action="store_true", help="print the numbers as JSON (bytes)")
    args = p.parse_args(argv)
    rows = []
    for name in args.models:
        e = estimate(name, args.scheme, args.max_model_len, tensor_parallel_size=args.tensor_parallel_size)
        e["budget"] = budget(e, args.gpu_mib, args.gpu_memory_utilization)
        rows.append(e)
    if args.json:
        json.dump(rows, sys.stdout, indent=2)
        print()
    else:
        print(markdown(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
