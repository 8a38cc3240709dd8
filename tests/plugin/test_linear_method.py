"""The SplitQ linear method inside vLLM's real linear layers (QKVParallelLinear,
MergedColumnParallelLinear, RowParallelLinear) and vLLM's real weight loading (AutoWeightsLoader
with Qwen2.5-VL's name mappers), without an engine: bit-exact agreement with the reference on
identical inputs, and every corrupt-tensor case failing with a message that names the
checkpoint tensor. (The served tests compare whole models, where float differences between
vLLM's and transformers' kernels can move a 4-bit quantizer by one step; here the inputs are
identical and so must be the outputs, bit for bit.)"""

from __future__ import annotations

from pathlib import Path

import pytest

from splitq_kernels.reference import SplitQScheme
from splitq_vllm.testing.synthetic import synthesize_checkpoint
from tests.helpers.engine import run_case_script

pytestmark = pytest.mark.vllm

SCRIPT = Path(__file__).with_name("linear_cases.py")


@pytest.fixture(scope="module")
def results(tiny_qwen_dir, tmp_path_factory):
    ckpt = synthesize_checkpoint(tiny_qwen_dir, tmp_path_factory.mktemp("splitq") / "qwen-w4a4", SplitQScheme.from_name("w4a4"))
    return run_case_script(SCRIPT, ckpt)


@pytest.mark.parametrize("layer", ["qkv", "o", "gate_up", "down"])
def test_vllm_layer_equals_the_reference_bit_for_bit(results, layer):
    r = results["exact"]
    assert "crash" not in r, r.get("crash")
    assert r[layer]["equal"]
    assert r[layer]["mask_changes_output"]  # the layer reads the shared mask buffer
    assert r[layer]["backend"] == "reference"
    assert r[layer]["loaded_params_left"] == []  # packed copies freed after preparation


@pytest.mark.parametrize(
    "case, expected",
    [
        ("missing_output_tensor", ["'model.layers.0.self_attn.k_proj.mac_up_qweight' was not loaded", "qkv_proj"]),
        ("missing_input_tensor", ["'model.layers.0.mlp.up_proj.main_p2' was not loaded", "gate_up_proj"]),
        ("missing_bias", ["'model.layers.0.self_attn.v_proj.bias' was not loaded"]),
        ("missing_row_parallel_tensor", ["'model.layers.0.mlp.down_proj.idx_vision' was not loaded"]),
        ("wrong_shape", ["'model.layers.0.self_attn.o_proj.main_wscale' has shape [127], expected [128]"]),
        ("wrong_dtype", ["'model.layers.0.mlp.gate_proj.idx_main' has dtype int64, expected int32"]),
        ("input_side_differs", ["k_proj.main_p1", "q_proj.main_p1", "must be identical"]),
        ("overlapping_channel_sets", ["model.layers.0.mlp.down_proj", "disjoint"]),
        ("unmapped_names", ["matches no quantized layer of the checkpoint by name", "model.layers.0.self_attn.q_proj"]),
    ],
)
def test_corrupt_tensors_fail_while_loading_with_the_tensor_name(results, case, expected):
    r = results[case]
    assert "crash" not in r, r.get("crash")
    assert r["error"] is not None, f"{case}: loading succeeded"
    assert r["error"].startswith("CheckpointError"), r["error"]
    for text in expected:
        assert text in r["error"], (case, r["error"])


@pytest.mark.parametrize(
    "variant, expected",
    [
        ("tensor_parallel_3", "attention heads (4) must be divisible by tensor parallel size (3)"),
        ("tensor_parallel_4_vision_split", "4 does not divide the vision tower's 2 heads; serve with --mm-encoder-tp-mode data"),
        ("micro_batching", "micro-batching (--enable-dbo / --ubatch-size) is not supported"),
        ("speculative_decoding", "speculative decoding (--speculative-config) is not supported"),
        ("inductor_freezing", "inductor freezing"),
        ("unsupported_architecture", "'Gemma3nForConditionalGeneration' is not supported by SplitQ; supported: Qwen2.5-VL"),
    ],
)
def test_what_the_mask_cannot_serve_is_refused_at_start_up(results, variant, expected):
    r = results["refusals"]
    assert "crash" not in r, r.get("crash")
    assert r["plain"] is None
    assert r[variant] is not None and expected in r[variant], r[variant]


@pytest.mark.parametrize("variant", ["tensor_parallel", "tensor_parallel_4", "pipeline_parallel"])
def test_tensor_and_pipeline_parallel_settings_pass_the_checks(results, variant):
    assert results["refusals"][variant] is None, results["refusals"][variant]
