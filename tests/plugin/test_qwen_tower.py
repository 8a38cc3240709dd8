"""A Qwen2.5-VL checkpoint with its vision tower quantized (`--quantize-vision-tower`, the paper's
A.4) served by the plugin: the tiny model calibrated with the tower, vLLM's real tower linears
loaded and run bit for bit like the reference (tower_cases.py, no engine), the Triton backend
on the tower layers (interpreter) within the kernels' tolerance of the reference, and the real OpenAI
server's greedy answers equal to the transformers loader's (`splitq_vllm.hf`, whose tower runs
all vision) on image and text prompts, through the openai client.

Every tower row is a vision row (patches): the served tower layers pass an all-False mask of
their own, never the language model's per-step buffer. With no text outlier set and no MAC in the
tower (calibration), the mask changes nothing there numerically; what shows that the served
tower is the quantized one is the distance to the same language model with the 16-bit tower.

Tolerance: tests/plugin/generation.assert_matches_reference (float32 on both sides). The tower
adds 4-bit quantizers fed by vLLM's and transformers' different attention/rotary kernels; measured
served vs reference here: 2.6e-7..4.4e-7 on the four conversations, while the 16-bit tower moves
the image prompts' log-probs by 0.12-0.19 (same LM groups, bit for bit), more than 3 * LOGPROB_ATOL.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from splitq_calibration.cli import calibrate_main
from splitq_vllm.checkpoint import read_checkpoint
from splitq_vllm.families import FAMILIES, check_tower_quantization, is_vision_tower_layer
from splitq_vllm.testing.conversations import CONVERSATIONS
from splitq_vllm.testing.images import write_sharegpt
from tests.helpers.engine import OpenAIServer, run_case_script, server_env
from tests.plugin.generation import (
    LOGPROB_ATOL,
    Reference,
    assert_matches_reference,
    max_logprob_gap,
    served_chat,
    server_args,
)

SCRIPT = Path(__file__).with_name("tower_cases.py")
PROMPTS = ["one_image", "two_images", "text_only"]
FLAGS = ["--num-samples", "2", "--batch-size", "2", "--epochs", "1", "--scheme", "w4a4", "-q"]


def _calibrate(src: Path, data: Path, out: Path, *extra: str) -> Path:
    assert calibrate_main(["--model", str(src), "--data", str(data), "--output", str(out), *FLAGS, *extra]) == 0
    return out


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_sharegpt(tmp_path_factory.mktemp("tower-data"), n=2)


@pytest.fixture(scope="module")
def ckpt(tiny_qwen_dir, data, tmp_path_factory):
    out = _calibrate(tiny_qwen_dir, data, tmp_path_factory.mktemp("splitq") / "tower-w4a4", "--quantize-vision-tower")
    layers = read_checkpoint(out).quant_config.layers
    tower = [d for n, d in layers.items() if is_vision_tower_layer(n)]
    assert tower and all(d.text == 0 and d.mac_rank == 0 for d in tower)  # all rows vision (calibration)
    return out


@pytest.fixture(scope="module")
def cases(ckpt):
    return run_case_script(SCRIPT, ckpt)


@pytest.fixture(scope="module")
def server(ckpt, tmp_path_factory):
    with OpenAIServer(ckpt, server_args(), env=server_env(tmp_path_factory.mktemp("vllm-cache"))) as s:
        print(f"\neager server start-up: {s.startup_seconds:.1f} s")
        yield s


@pytest.fixture(scope="module")
def served(server):
    return {name: served_chat(server, CONVERSATIONS[name][0]) for name in PROMPTS}


@pytest.fixture(scope="module")
def reference(ckpt):
    return Reference(ckpt)


# ---------------------------------------------------------------------------------------------
# vLLM's tower linears, no engine
# ---------------------------------------------------------------------------------------------


@pytest.mark.vllm
@pytest.mark.parametrize("layer", ["qkv", "proj", "gate_up", "down"])
def test_vllm_tower_layer_equals_the_all_vision_reference_bit_for_bit(cases, layer):
    r = cases["exact"]
    assert "crash" not in r, r.get("crash")
    assert r[layer]["equal"]  # [s, b, c] in, [s, b, out] out, the reference with every row vision
    assert r[layer]["all_vision"] and not r[layer]["reads_lm_buffer"] and r[layer]["buffer_independent"]
    assert r[layer]["loaded_params_left"] == []
    if layer == "qkv":  # the fused checkpoint layer is one member of vLLM's QKVParallelLinear
        assert r[layer]["members"] == ["visual.blocks.0.attn.qkv"]


@pytest.mark.vllm
def test_tensor_parallel_needs_the_tower_replicated(cases):
    r = cases["refusals"]
    assert "crash" not in r, r.get("crash")
    assert r["plain"] is None and r["tp2_data"] is None
    assert r["tp2"] is not None and "quantized vision tower" in r["tp2"] and "--mm-encoder-tp-mode data" in r["tp2"]


@pytest.mark.parametrize("members", [["attn.qkv"], ["attn.proj"], ["mlp.gate_proj", "mlp.up_proj"], ["mlp.down_proj"]])
def test_triton_backend_runs_the_tower_layers_like_the_reference(ckpt, members):
    """The kernel path on the checkpoint's tower layers (no text set, no MAC, bias in the
    epilogue), all-vision mask, 37 rows (no multiple of the block sizes), in Triton's interpreter:
    within the kernels' output tolerance of the reference (splitq_kernels.testing)."""
    import torch
    from torch import nn

    import splitq_kernels.triton
    from splitq_kernels.reference import concat_outputs, splitq_linear
    from splitq_kernels.testing import check_outputs
    from splitq_vllm.plugin.backends import TritonBackend

    splitq_kernels.triton.use_interpreter()
    ck = read_checkpoint(ckpt)
    ref = concat_outputs([ck.layer(f"visual.blocks.1.{m}") for m in members])
    ref.bias = ref.bias.float()
    module = nn.Module()
    module.bias = nn.Parameter(ref.bias.clone(), requires_grad=False)
    backend = TritonBackend(interpreter=True)
    assert backend.can_implement(ref.kron_shape, ck.scheme, torch.device("cpu"))[0]
    backend.prepare(module, ref, ck.scheme)
    x = torch.randn(37, ref.in_features, generator=torch.Generator().manual_seed(1))
    vision = torch.zeros(37, dtype=torch.bool)
    assert check_outputs(backend.apply(module, x, vision, module.bias), splitq_linear(x, vision, ref, ck.scheme)) <= 1


def test_tower_layers_of_a_family_without_tower_quantization_are_refused():
    qwen2vl = next(f for f in FAMILIES if f.name == "Qwen2-VL")  # its tower is visual.blocks.N too
    with pytest.raises(NotImplementedError, match="described .* for Qwen2.5-VL only, not Qwen2-VL"):
        check_tower_quantization(qwen2vl, ["model.layers.0.mlp.down_proj", "visual.blocks.0.attn.qkv"])
    check_tower_quantization(qwen2vl, ["model.layers.0.mlp.down_proj"])  # no tower layers: fine


# ---------------------------------------------------------------------------------------------
# The real server
# ---------------------------------------------------------------------------------------------


@pytest.mark.vllm
def test_server_loaded_the_tower_layers(server, ckpt):
    logs = server.logs()
    tower = sum(is_vision_tower_layer(n) for n in read_checkpoint(ckpt).quant_config.layers)
    assert f"; {tower} in the vision tower), files checked" in logs
    assert "neither quantized nor in the ignore list" not in logs


@pytest.mark.vllm
@pytest.mark.parametrize("name", PROMPTS)
def test_vllm_greedy_answers_equal_the_transformers_loader(served, reference, name):
    assert_matches_reference(served[name], reference, *CONVERSATIONS[name], name)


@pytest.mark.vllm
def test_the_served_tower_is_the_quantized_one(served, tiny_qwen_dir, data, tmp_path):
    """The same language model (calibrated on the FP tower's outputs, so its groups are bit for
    bit those of the tower checkpoint: tests/calibration/test_vision_tower.py) with the 16-bit
    tower is far from what was served on image prompts, and equal on the text-only one."""
    plain = Reference(_calibrate(tiny_qwen_dir, data, tmp_path / "lm-only"))
    for name in PROMPTS:
        msgs, pngs = CONVERSATIONS[name]
        fp_tower = plain.generate(msgs, pngs)
        gap = max_logprob_gap(served[name], fp_tower)
        print(f"\n{name}: served (quantized tower) vs 16-bit tower: tokens equal {served[name].token_ids == fp_tower.token_ids}, {gap:.1e}")
        if pngs:
            assert served[name].token_ids != fp_tower.token_ids or gap > 3 * LOGPROB_ATOL, name
        else:
            assert_matches_reference(served[name], plain, msgs, pngs, name)
