"""Subprocess body of test_plugin_linear_method.py: vLLM's real linear layers with the SplitQ
method, loaded through vLLM's real weight-loading path, without an engine.

Builds one decoder layer's linears the way Qwen2.5-VL's language model does (QKVParallelLinear
with bias, MergedColumnParallelLinear gate_up, RowParallelLinear o/down), each with the quant
method `SplitQVllmConfig.get_quant_method` picks under the model's real `hf_to_vllm_mapper` and
`packed_modules_mapping`, loads a checkpoint's tensors through `AutoWeightsLoader` with the
model's real stacked mapper (q/k/v -> qkv_proj with shard ids), runs process_weights_after_loading,
and compares the layers' outputs with the reference. Cases corrupt the tensors on the way in.

Usage: python vllm_linear_cases.py CHECKPOINT_DIR OUT_JSON
"""

from __future__ import annotations

import json
import sys
import traceback


def main() -> None:
    ckpt_dir, out_path = sys.argv[1], sys.argv[2]
    import torch
    from torch import nn
    from vllm.model_executor.layers.linear import MergedColumnParallelLinear, QKVParallelLinear, RowParallelLinear
    from vllm.model_executor.models.qwen2 import Qwen2Model
    from vllm.model_executor.models.qwen2_5_vl import Qwen2_5_VLForConditionalGeneration as VL
    from vllm.model_executor.models.utils import AutoWeightsLoader

    from splitq_kernels.reference import concat_outputs, splitq_linear
    from splitq_vllm.checkpoint import read_checkpoint
    from splitq_vllm.plugin.config import SplitQVllmConfig
    from splitq_vllm.plugin.linear import SplitQLinearMethod
    from splitq_vllm.plugin.text_mask import BUFFER_NAME, new_mask_buffer
    from case_support import engine_config_refusals, init_single_rank

    init_single_rank()

    ckpt = read_checkpoint(ckpt_dir)
    hf_cfg = json.loads((__import__("pathlib").Path(ckpt_dir) / "config.json").read_text())
    text = hf_cfg.get("text_config", hf_cfg)
    hidden, inter = text["hidden_size"], text["intermediate_size"]
    heads, kv_heads = text["num_attention_heads"], text["num_key_value_heads"]
    head_dim = hidden // heads
    file_tensors = {
        name: ckpt.tensor(name)
        for name in ckpt.weight_map
        if name.startswith(("model.layers.0.self_attn.", "model.layers.0.mlp."))
    }
    mapper = VL.hf_to_vllm_mapper | Qwen2Model.hf_to_vllm_mapper

    def build(tensors: dict[str, torch.Tensor], map_names: bool = True):
        config = SplitQVllmConfig.from_config(hf_cfg["quantization_config"])
        config.packed_modules_mapping = dict(VL.packed_modules_mapping)
        if map_names:
            config.apply_vllm_mapper(VL.hf_to_vllm_mapper.get_rename_mapper())
        config._runtime_checked = True  # the engine-level checks need a whole VllmConfig/model
        config._mask = new_mask_buffer(256)
        p = "language_model.model.layers.0"
        root = nn.Module()
        root.language_model = nn.Module()
        root.language_model.model = nn.Module()
        root.language_model.model.layers = nn.ModuleList([nn.Module()])
        layer = root.language_model.model.layers[0]
        layer.self_attn = nn.Module()
        layer.self_attn.qkv_proj = QKVParallelLinear(hidden, head_dim, heads, kv_heads, bias=True, quant_config=config, prefix=f"{p}.self_attn.qkv_proj")
        layer.self_attn.o_proj = RowParallelLinear(heads * head_dim, hidden, bias=False, quant_config=config, prefix=f"{p}.self_attn.o_proj")
        layer.mlp = nn.Module()
        layer.mlp.gate_up_proj = MergedColumnParallelLinear(hidden, [inter, inter], bias=False, quant_config=config, prefix=f"{p}.mlp.gate_up_proj")
        layer.mlp.down_proj = RowParallelLinear(inter, hidden, bias=False, quant_config=config, prefix=f"{p}.mlp.down_proj")
        linears = {
            "qkv": (layer.self_attn.qkv_proj, ["q_proj", "k_proj", "v_proj"], "self_attn"),
            "o": (layer.self_attn.o_proj, ["o_proj"], "self_attn"),
            "gate_up": (layer.mlp.gate_up_proj, ["gate_proj", "up_proj"], "mlp"),
            "down": (layer.mlp.down_proj, ["down_proj"], "mlp"),
        }
        for lin, _, _ in linears.values():
            assert isinstance(lin.quant_method, SplitQLinearMethod), type(lin.quant_method)
        AutoWeightsLoader(root).load_weights(list(tensors.items()), mapper=mapper)
        for lin, _, _ in linears.values():
            lin.quant_method.process_weights_after_loading(lin)
        return config, linears

    def exact() -> dict:
        config, linears = build(dict(file_tensors))
        gen = torch.Generator().manual_seed(0)
        out = {}
        for key, (lin, members, parent) in linears.items():
            names = [f"model.layers.0.{parent}.{m}" for m in members]
            ref_layer = concat_outputs([ckpt.layer(n) for n in names])
            x = torch.randn(9, lin.input_size, generator=gen)
            mask = torch.tensor([1, 1, 0, 0, 0, 1, 0, 1, 1], dtype=torch.bool)
            buf = getattr(lin, BUFFER_NAME)
            assert buf is config._mask  # one buffer shared by every SplitQ layer
            buf.fill_(True)
            buf[:9] = mask
            y = lin(x)[0]
            if ref_layer.bias is not None:
                ref_layer.bias = ref_layer.bias.to(torch.float32)
            want = splitq_linear(x, mask, ref_layer, ckpt.scheme)
            buf[:9] = True
            y_text = lin(x)[0]
            out[key] = {
                "equal": bool(torch.equal(y, want)),
                "mask_changes_output": not bool(torch.equal(y, y_text)),
                "backend": lin.splitq_backend,
                "loaded_params_left": [n for n, _ in lin.named_parameters() if n not in ("bias",)],
            }
        return out

    def failing(mutate, map_names: bool = True) -> dict:
        tensors = dict(file_tensors)
        mutate(tensors)
        try:
            build(tensors, map_names)
        except Exception as e:  # noqa: BLE001
            return {"error": f"{type(e).__name__}: {e}"}
        return {"error": None}

    def drop(name):
        return lambda t: t.pop(name)

    def replace(name, fn):
        def mutate(t):
            t[name] = fn(t[name])

        return mutate

    def overlap(t):  # down_proj's last text channel replaced by its first main channel
        d = "model.layers.0.mlp.down_proj"
        t[f"{d}.idx_text"] = torch.cat([t[f"{d}.idx_text"][:-1], t[f"{d}.idx_main"][:1]])

    cases = {
        "exact": exact,
        "missing_output_tensor": lambda: failing(drop("model.layers.0.self_attn.k_proj.mac_up_qweight")),
        "missing_input_tensor": lambda: failing(drop("model.layers.0.mlp.up_proj.main_p2")),
        "missing_bias": lambda: failing(drop("model.layers.0.self_attn.v_proj.bias")),
        "missing_row_parallel_tensor": lambda: failing(drop("model.layers.0.mlp.down_proj.idx_vision")),
        "wrong_shape": lambda: failing(replace("model.layers.0.self_attn.o_proj.main_wscale", lambda v: v[:-1].clone())),
        "wrong_dtype": lambda: failing(replace("model.layers.0.mlp.gate_proj.idx_main", lambda v: v.to(torch.int64))),
        "input_side_differs": lambda: failing(replace("model.layers.0.self_attn.k_proj.main_p1", lambda v: v * 1.001)),
        "overlapping_channel_sets": lambda: failing(overlap),
        # the model's hf_to_vllm_mapper not applied: file names and vLLM prefixes do not meet
        "unmapped_names": lambda: failing(lambda t: None, map_names=False),
    }
    def refusals() -> dict:
        """What the text-mask design cannot serve is refused: in the front end (building the engine
        config: parallel settings, parallel.py) or when the model is built (_check_runtime)."""
        from vllm.model_executor.models.gemma3n_mm import Gemma3nForConditionalGeneration

        from splitq_vllm.plugin.text_mask import check_model_class, install_embed_hook

        variants = {
            "pipeline_parallel": dict(pipeline_parallel_size=2),
            "tensor_parallel": dict(tensor_parallel_size=2),
            "tensor_parallel_4": dict(tensor_parallel_size=4, mm_encoder_tp_mode="data"),
            "tensor_parallel_4_vision_split": dict(tensor_parallel_size=4),
            "tensor_parallel_3": dict(tensor_parallel_size=3),
            "micro_batching": dict(enable_dbo=True),
            "speculative_decoding": dict(speculative_config={"method": "ngram", "num_speculative_tokens": 2, "prompt_lookup_max": 3}),
            "inductor_freezing": dict(compilation_config={"inductor_compile_config": {"freezing": True}}),
            "plain": {},
        }
        out = engine_config_refusals(ckpt_dir, variants)
        install_embed_hook()
        try:
            check_model_class(Gemma3nForConditionalGeneration)  # no family in splitq_vllm.families
            out["unsupported_architecture"] = None
        except NotImplementedError as e:
            out["unsupported_architecture"] = str(e)
        check_model_class(VL)  # must not raise
        return out

    cases["refusals"] = refusals
    results = {}
    for name, fn in cases.items():
        try:
            results[name] = fn()
        except Exception:  # noqa: BLE001
            results[name] = {"crash": traceback.format_exc()}
    with open(out_path, "w") as f:
        json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
