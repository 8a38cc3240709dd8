"""GPU memory estimate for serving a SplitQ checkpoint with vLLM (docker/README.md, BENCHMARKS.md).

    .venv/bin/python docker/estimate_memory.py                       # the README's table (W4A4)
    .venv/bin/python docker/estimate_memory.py --scheme w3a3 --max-model-len 32768 --json
    .venv/bin/python docker/estimate_memory.py --models Qwen2.5-VL-32B Qwen2.5-VL-72B --tensor-parallel-size 2
    .venv/bin/python docker/estimate_memory.py --fits                # every model: does it fit a 4090 at W4A4, W3A3?

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
  checkpoint; KV cache in 16 bits: 2 x kv_heads x head_dim x 2 bytes per token and layer (head_dim
  the config's: Qwen3-VL, Gemma 3 and Qwen3.5 set it apart from hidden / heads), in the layers
  that keep one per token. Gemma 3's sliding-window layers keep at most `sliding_window` tokens
  (vLLM's hybrid KV cache manager frees the blocks that slide out), so past the window only its
  full-attention layers (1 in 6) grow with the sequence; Qwen3.5's Gated DeltaNet layers keep no
  KV cache but a fixed state per sequence (value_heads x key_head_dim x value_head_dim in float32,
  the configs' mamba_ssm_dtype, plus the causal convolution's last kernel - 1 inputs of q/k/v in
  bf16). `kv_one_sequence_bytes` is what one sequence of --max-model-len tokens needs, the amount
  vLLM checks at start-up.
- `--fits`: per model, whether the weights plus one --max-model-len sequence plus a reserve for
  what vLLM measures at start-up (below; --reserve-gib, default 3) stay within
  --gpu-memory-utilization x --gpu-mib, at W4A4 and W3A3, and the longest sequence that would.

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

RESERVE_GIB = 3.0  # CUDA context, profiling activations (vision encoder included), CUDA graphs: "a few GiB"

# The releases (their config.json numbers, and where they were checked, live in
# splitq_vllm.testing.published)
MODELS = {"Qwen2.5-VL-3B": "qwen2.5-vl-3b", "Qwen2.5-VL-7B": "qwen2.5-vl-7b", "Qwen2.5-VL-32B": "qwen2.5-vl-32b",
          "Qwen2.5-VL-72B": "qwen2.5-vl-72b",
          "Qwen2-VL-2B": "qwen2-vl-2b", "Qwen2-VL-7B": "qwen2-vl-7b",
          "Qwen3-VL-2B": "qwen3-vl-2b", "Qwen3-VL-4B": "qwen3-vl-4b", "Qwen3-VL-8B": "qwen3-vl-8b",
          "Qwen3-VL-32B": "qwen3-vl-32b",
          "Gemma-3-4B": "gemma-3-4b", "Gemma-3-12B": "gemma-3-12b", "Gemma-3-27B": "gemma-3-27b",
          "Qwen3.5-0.8B": "qwen3.5-0.8b", "Qwen3.5-4B": "qwen3.5-4b", "Qwen3.5-9B": "qwen3.5-9b",
          "Qwen3.5-27B": "qwen3.5-27b",
          "LLaVA-1.5-7B": "llava-1.5-7b", "LLaVA-1.5-13B": "llava-1.5-13b"}  # fmt: skip
DEFAULT_MODELS = ["Qwen2.5-VL-3B", "Qwen2.5-VL-7B"]  # one 4090 each (the README's first table)
# the group kinds vLLM splits by input (RowParallelLinear): o_proj, down_proj, Qwen3.5's out_proj
ROW_PARALLEL = ("o", "down", "linear_out")
VISION_PARTS = (".visual.", ".vision_tower.", ".multi_modal_projector.")  # Qwen's; LLaVA's and Gemma 3's


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
        if any(v in f".{pname}" for v in VISION_PARTS):
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
    cache = cache_bytes(tc, max_model_len, dtype_bytes)
    kv_per_token = cache["per_token"]
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
        "kv_one_sequence_bytes": cache["one_sequence"],
        "kv_window_bytes": cache["window"],
        "state_bytes_per_sequence": cache["state"],
        "layer_counts": cache["layers"],
        "tensor_parallel_size": tp,
    }
    if tp > 1:
        split = parts["vision tower + projector"] + parts["embeddings"] + parts["lm_head"]
        kv_heads_per_gpu = max(1, tc.num_key_value_heads // tp)
        gpu = cache_bytes(tc, max_model_len, dtype_bytes, kv_heads=kv_heads_per_gpu, tp=tp)
        out["per_gpu"] = {
            "splitq_layers_served_bytes": kernel_per_gpu,
            "unquantized_bytes": split // tp + parts["norms"],
            "served_weights_bytes": kernel_per_gpu + split // tp + parts["norms"],
            "kv_bytes_per_token": gpu["per_token"],
            "kv_one_sequence_bytes": gpu["one_sequence"],
            "kv_window_bytes": gpu["window"],
            "state_bytes_per_sequence": gpu["state"],
        }
    return out


def cache_bytes(tc, max_model_len: int, dtype_bytes: int = 2, kv_heads: int | None = None, tp: int = 1) -> dict:
    """KV cache and recurrent state of a text config (module doc): bytes per token of the layers
    whose cache grows with the sequence, the sliding-window layers' cache at the full window, the
    linear-attention layers' state per sequence, and all of it for one `max_model_len` sequence.
    `kv_heads`/`tp`: one GPU's share under tensor parallelism (heads and state split `tp` ways)."""
    n = tc.num_hidden_layers
    types = list(getattr(tc, "layer_types", None) or ["full_attention"] * n)[:n]
    head_dim = getattr(tc, "head_dim", None) or tc.hidden_size // tc.num_attention_heads
    kv = tc.num_key_value_heads if kv_heads is None else kv_heads
    per_layer_token = 2 * kv * head_dim * dtype_bytes  # K and V
    counts = {t: types.count(t) for t in dict.fromkeys(types)}
    unknown = set(counts) - {"full_attention", "sliding_attention", "linear_attention"}
    if unknown:
        raise ValueError(f"text_config.layer_types has {sorted(unknown)}: no cache model for them")
    full, sliding, linear = (counts.get(k, 0) for k in ("full_attention", "sliding_attention", "linear_attention"))
    window_tokens = min(getattr(tc, "sliding_window", None) or max_model_len, max_model_len)
    state = 0
    if linear:
        value_heads = tc.linear_num_value_heads // tp
        key_dim = tc.linear_num_key_heads * tc.linear_key_head_dim // tp
        value_dim = value_heads * tc.linear_value_head_dim
        ssm = value_heads * tc.linear_key_head_dim * tc.linear_value_head_dim * 4  # float32 (mamba_ssm_dtype)
        conv = (2 * key_dim + value_dim) * (tc.linear_conv_kernel_dim - 1) * dtype_bytes
        state = linear * (ssm + conv)
    window = sliding * per_layer_token * window_tokens
    per_token = full * per_layer_token
    return {"per_token": per_token, "window": window, "state": state,
            "one_sequence": per_token * max_model_len + window + state,
            "layers": {"full_attention": full, "sliding_attention": sliding, "linear_attention": linear}}  # fmt: skip


def budget(e: dict, gpu_mib: int, utilization: float) -> dict:
    """What is left of vLLM's budget (utilization x total) after the weights, and how many tokens
    of KV cache that would hold before activations and CUDA graphs are taken out (an upper bound).
    Under tensor parallelism: per GPU (each GPU holds its share of every sequence's KV cache)."""
    total = gpu_mib * MIB * utilization
    e = e.get("per_gpu", e)
    room = total - e["served_weights_bytes"]
    # one sequence's windows and state come first; every further token costs kv_bytes_per_token
    fixed = e.get("kv_window_bytes", 0) + e.get("state_bytes_per_sequence", 0)
    return {
        "gpu_mib": gpu_mib,
        "gpu_memory_utilization": utilization,
        "budget_bytes": int(total),
        "room_after_weights_bytes": int(room),
        "kv_tokens_upper_bound": int((room - fixed) // e["kv_bytes_per_token"]) if room > fixed else 0,
    }


def fits(e: dict, gpu_mib: int = RTX_4090_MIB, utilization: float = GPU_MEMORY_UTILIZATION,
         reserve_gib: float = RESERVE_GIB) -> dict:  # fmt: skip
    """Whether weights + one max_model_len sequence (its KV cache, windows and state) + `reserve_gib`
    stay within the budget, and the longest sequence that would (0: the weights alone do not fit)."""
    b = budget(e, gpu_mib, utilization)
    g = e.get("per_gpu", e)
    room = b["room_after_weights_bytes"] - reserve_gib * GIB
    fixed = g["kv_window_bytes"] + g["state_bytes_per_sequence"]  # at most; shorter sequences need less
    longest = int((room - fixed) // g["kv_bytes_per_token"]) if room > fixed else 0
    return {"fits": room >= g["kv_one_sequence_bytes"], "room_after_reserve_bytes": int(room),
            "longest_sequence_tokens": longest, "reserve_gib": reserve_gib}  # fmt: skip


def fits_markdown(rows: list[dict]) -> str:
    """One line per model: weights at each scheme and whether it fits (rows: fits_rows). "no room":
    the weights and the reserve alone exceed the budget."""
    schemes = list(rows[0]["schemes"])
    ml = rows[0]["max_model_len"]
    head = ["model", "parameters", "BF16 weights GiB"]
    head += [f"{s.upper()} weights on the GPU GiB" for s in schemes]
    head += ["KV per token KiB", "sliding windows + state per sequence MiB", f"cache of one {ml}-token sequence GiB"]
    head += [f"fits a 4090 at {s.upper()} (longest sequence, tokens)" for s in schemes]
    lines = ["| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
    for r in rows:
        e0 = r["schemes"][schemes[0]]
        cells = [r["model"], f"{e0['parameters'] / 1e9:.2f} B", f"{e0['bf16_weights_bytes'] / GIB:.2f}"]
        cells += [f"{r['schemes'][s]['served_weights_bytes'] / GIB:.2f}" for s in schemes]
        cells += [f"{e0['kv_bytes_per_token'] / 1024:.0f}",
                  f"{(e0['kv_window_bytes'] + e0['state_bytes_per_sequence']) / MIB:.0f}",
                  f"{e0['kv_one_sequence_bytes'] / GIB:.2f}"]  # fmt: skip
        for s in schemes:
            f = r["schemes"][s]["fit"]
            longest = f["longest_sequence_tokens"]
            cells.append(("**yes**" if f["fits"] else "no") + (f" ({longest:,})" if longest else " (no room)"))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def fits_rows(names: list[str], schemes: tuple[str, ...] = ("w4a4", "w3a3"), max_model_len: int = MAX_MODEL_LEN,
              gpu_mib: int = RTX_4090_MIB, utilization: float = GPU_MEMORY_UTILIZATION,
              reserve_gib: float = RESERVE_GIB) -> list[dict]:  # fmt: skip
    """estimate() and fits() of each model at each scheme (the meta model is built once per model)."""
    rows = []
    for name in names:
        model, config = build_meta_model(name)
        per = {}
        for s in schemes:
            e = estimate_model(model, config, s, max_model_len)
            e["fit"] = fits(e, gpu_mib, utilization, reserve_gib)
            per[s] = e
        rows.append({"model": name, "max_model_len": max_model_len, "schemes": per})
    return rows


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


def _print(rows: list[dict], as_json: bool, to_markdown) -> None:
    if as_json:
        json.dump(rows, sys.stdout, indent=2)
        print()
    else:
        print(to_markdown(rows))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", choices=list(MODELS),
                   help=f"default {' '.join(DEFAULT_MODELS)} (with --fits: all of them)")
    p.add_argument("--scheme", default="w4a4", help="w4a8, w4a4, w3a3, w3a2 (default w4a4)")
    p.add_argument("--max-model-len", type=int, default=MAX_MODEL_LEN, help=f"tokens of one sequence's KV cache (default {MAX_MODEL_LEN})")
    p.add_argument("--gpu-mib", type=int, default=RTX_4090_MIB, help=f"GPU memory in MiB (default {RTX_4090_MIB}: RTX 4090)")
    p.add_argument("--gpu-memory-utilization", type=float, default=GPU_MEMORY_UTILIZATION)
    p.add_argument("--tensor-parallel-size", type=int, default=1,
                   help="GPUs one model is split over (vLLM's --tensor-parallel-size): also print the memory per GPU")
    p.add_argument("--json", action="store_true", help="print the numbers as JSON (bytes)")
    p.add_argument("--fits", action="store_true",
                   help="one line per model (default: all of MODELS): weights at W4A4 and W3A3, the cache of one "
                        "--max-model-len sequence, and whether it fits the GPU")  # fmt: skip
    p.add_argument("--reserve-gib", type=float, default=RESERVE_GIB,
                   help=f"--fits: GiB kept for what vLLM measures at start-up (default {RESERVE_GIB})")
    args = p.parse_args(argv)
    if args.fits:
        frows = fits_rows(args.models or list(MODELS), max_model_len=args.max_model_len, gpu_mib=args.gpu_mib,
                          utilization=args.gpu_memory_utilization, reserve_gib=args.reserve_gib)  # fmt: skip
        _print(frows, args.json, fits_markdown)
        return 0
    rows = []
    for name in args.models or DEFAULT_MODELS:
        e = estimate(name, args.scheme, args.max_model_len, tensor_parallel_size=args.tensor_parallel_size)
        e["budget"] = budget(e, args.gpu_mib, args.gpu_memory_utilization)
        rows.append(e)
    _print(rows, args.json, markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
