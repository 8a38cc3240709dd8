"""Subprocess body of test_qwen_tower.py: vLLM's real vision-block linears with the SplitQ method,
loaded through vLLM's real weight-loading path, without an engine.

Builds tower block 0's linears the way vLLM's Qwen2_5_VisionBlock does (QKVParallelLinear with
bias loaded from the checkpoint's fused `attn.qkv`, RowParallelLinear `attn.proj` with bias,
MergedColumnParallelLinear `mlp.gate_up_proj` from gate_proj + up_proj, RowParallelLinear
`mlp.down_proj`), each with the quant method `SplitQVllmConfig.get_quant_method` picks under the
model's real `hf_to_vllm_mapper` and `packed_modules_mapping`; loads the checkpoint's tensors
through `AutoWeightsLoader` with the tower's real stacked mapper (the vision transformer's own
`hf_to_vllm_mapper`: gate/up -> gate_up_proj with shard ids, qkv kept fused); compares the
layers' outputs, on [s, b, c] inputs as the tower passes them, with the reference's all-vision
forward; and checks the tower layers never read the language model's mask buffer. Then the
engine-level checks: TP=2 without --mm-encoder-tp-mode data refused, with it accepted.

Usage: python tower_cases.py CHECKPOINT_DIR OUT_JSON
"""

from __future__ import annotations

import json
import sys
import traceback
from pathlib import Path


def main() -> None:
    ckpt_dir, out_path = sys.argv[1], sys.argv[2]
    import torch
    from torch import nn
    from vllm.model_executor.layers.linear import MergedColumnParallelLinear, QKVParallelLinear, RowParallelLinear
    from vllm.model_executor.models.qwen2_5_vl import Qwen2_5_VisionTransformer as Tower
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
    hf_cfg = json.loads((Path(ckpt_dir) / "config.json").read_text())
    vision = hf_cfg["vision_config"]
    dim, heads, inter = vision["hidden_size"], vision["num_heads"], vision["intermediate_size"]
    prefix = next(n for n in ckpt.weight_map if ".blocks.0.attn.qkv." in n).split("blocks.0.")[0]  # (model.)visual.
    linear_prefixes = (f"{prefix}blocks.0.attn.", f"{prefix}blocks.0.mlp.")  # not the norms
    block_tensors = {name: ckpt.tensor(name) for name in ckpt.weight_map if name.startswith(linear_prefixes)}

    def exact() -> dict:
        config = SplitQVllmConfig.from_config(hf_cfg["quantization_config"])
        config.packed_modules_mapping = dict(VL.packed_modules_mapping)
        config.apply_vllm_mapper(VL.hf_to_vllm_mapper.get_rename_mapper())
        config._runtime_checked = True  # the engine-level checks need a whole VllmConfig/model
        config._mask = new_mask_buffer(256)
        p = "visual.blocks.0"
        tower = nn.Module()
        tower.blocks = nn.ModuleList([nn.Module()])
        block = tower.blocks[0]
        block.attn = nn.Module()
        block.attn.qkv = QKVParallelLinear(dim, dim // heads, heads, heads, bias=True, quant_config=config, prefix=f"{p}.attn.qkv")
        block.attn.proj = RowParallelLinear(dim, dim, bias=True, quant_config=config, prefix=f"{p}.attn.proj")
        block.mlp = nn.Module()
        block.mlp.gate_up_proj = MergedColumnParallelLinear(dim, [inter, inter], bias=True, quant_config=config, prefix=f"{p}.mlp.gate_up_proj")
        block.mlp.down_proj = RowParallelLinear(inter, dim, bias=True, quant_config=config, prefix=f"{p}.mlp.down_proj")
        linears = {
            "qkv": (block.attn.qkv, ["attn.qkv"]),
            "proj": (block.attn.proj, ["attn.proj"]),
            "gate_up": (block.mlp.gate_up_proj, ["mlp.gate_proj", "mlp.up_proj"]),
            "down": (block.mlp.down_proj, ["mlp.down_proj"]),
        }
        for lin, _ in linears.values():
            assert isinstance(lin.quant_method, SplitQLinearMethod), type(lin.quant_method)
        # the model's mapper strips the files' prefix ("visual." / "model.visual."), as when the
        # model hands the tower its weights; then the tower's own mapper, as its load_weights does
        weights = [(VL.hf_to_vllm_mapper._map_name(n).removeprefix("visual."), t) for n, t in block_tensors.items()]
        AutoWeightsLoader(tower).load_weights(weights, mapper=Tower.hf_to_vllm_mapper)
        for lin, _ in linears.values():
            lin.quant_method.process_weights_after_loading(lin)
        gen = torch.Generator().manual_seed(0)
        out = {}
        for key, (lin, members) in linears.items():
            ref_layer = concat_outputs([ckpt.layer(f"{prefix}blocks.0.{m}") for m in members])
            ref_layer.bias = ref_layer.bias.to(torch.float32)
            x = torch.randn(37, 1, lin.input_size, generator=gen)  # [s, b, c]: patches, one "batch"
            y = lin(x)[0]
            want = splitq_linear(x, torch.zeros(37, 1, dtype=torch.bool), ref_layer, ckpt.scheme)
            config._mask.fill_(True)  # whatever the language model's buffer holds: no effect
            y_again = lin(x)[0]
            out[key] = {
                "equal": bool(torch.equal(y, want)),
                "shape": list(y.shape),
                "buffer_independent": bool(torch.equal(y, y_again)),
                "reads_lm_buffer": BUFFER_NAME in lin._buffers,
                "all_vision": bool(getattr(lin, "splitq_all_vision", False)),
                "members": [m.name for m in lin.quant_method.members],
                "loaded_params_left": [n for n, _ in lin.named_parameters() if n != "bias"],
            }
        return out

    def refusals() -> dict:
        variants = {
            "tp2": dict(tensor_parallel_size=2),
            "tp2_data": dict(tensor_parallel_size=2, mm_encoder_tp_mode="data"),
            "plain": {},
        }
        return engine_config_refusals(ckpt_dir, variants)

    results = {}
    for name, fn in {"exact": exact, "refusals": refusals}.items():
        try:
            results[name] = fn()
        except Exception:  # noqa: BLE001
            results[name] = {"crash": traceback.format_exc()}
    with open(out_path, "w") as f:
        json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
