"""docker/estimate_memory.py: the memory numbers of docker/README.md.

- The script runs (as a user runs it) and docker/README.md shows exactly its table.
- Its model shapes are the public ones (parameter counts 3.75B / 8.29B, the quantized linears).
- Its accounting is held to a real checkpoint: on the tiny Qwen2.5-VL calibrated by
  `splitq-calibrate`'s code with default settings, the LayerDims it predicts are the ones written
  to quantization_config, and its checkpoint bytes are the bytes of the tensors in the files.
- The served (Triton layout) bytes extrapolated from two narrow copies equal a direct
  `prepare_kernel_layer` at full width.
- Its defaults are docker-compose.yml's --max-model-len and --gpu-memory-utilization.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from dataclasses import replace

import pytest
import torch

from splitq_vllm.testing.images import draw_image
from tests.deploy.compose import serve_command
from tests.helpers.engine import vllm_env
from tests.helpers.paths import DOCKER

SCRIPT = DOCKER / "estimate_memory.py"


def _module():
    spec = importlib.util.spec_from_file_location("estimate_memory", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def em():
    return _module()


@pytest.fixture(scope="module")
def rows(tmp_path_factory):
    proc = subprocess.run([sys.executable, str(SCRIPT), "--json"], cwd=tmp_path_factory.mktemp("estimate"),
                          env=vllm_env(), capture_output=True, text=True, timeout=600)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    return {r["model"]: r for r in json.loads(proc.stdout)}


def test_readme_shows_the_scripts_table(em, rows):
    table = em.markdown(list(rows.values()))
    readme = (DOCKER / "README.md").read_text()
    assert table in readme, f"docker/README.md is out of date; the script prints:\n{table}"


def test_defaults_are_the_compose_files(em):
    cmd = serve_command()
    assert em.MAX_MODEL_LEN == int(cmd[cmd.index("--max-model-len") + 1])
    assert em.GPU_MEMORY_UTILIZATION == float(cmd[cmd.index("--gpu-memory-utilization") + 1])


def test_public_shapes(rows):
    m3, m7 = rows["Qwen2.5-VL-3B"], rows["Qwen2.5-VL-7B"]
    assert m3["parameters"] == 3_754_622_976 and m7["parameters"] == 8_292_166_656  # "3.75B", "8.29B"
    assert m3["quantized_linears"] == 7 * 36 and m7["quantized_linears"] == 7 * 28
    h, i = 3584, 18944
    assert m7["quantized_linear_params"] == 28 * (h * (h + 2 * 512) + h * h + 2 * h * i + i * h)
    assert m7["unquantized_parts_bytes"]["lm_head"] == 152064 * 3584 * 2 and m3["unquantized_parts_bytes"]["lm_head"] == 0  # tied
    assert m7["kv_bytes_per_token"] == 2 * 28 * 4 * 128 * 2 and m3["kv_bytes_per_token"] == 2 * 36 * 2 * 128 * 2
    for r in rows.values():
        # 4-bit main weights dominate: a bit over a quarter of their 16-bit bytes
        ratio = r["splitq_layers_checkpoint_bytes"] / (2 * r["quantized_linear_params"])
        assert 0.25 < ratio < 0.30, ratio
        assert r["splitq_layers_fused_bytes"] < r["splitq_layers_checkpoint_bytes"] < r["splitq_layers_served_bytes"]
        assert r["served_weights_bytes"] < r["bf16_weights_bytes"] / 2
        assert r["budget"]["kv_tokens_upper_bound"] > 8 * r["max_model_len"]  # room for several full-length sequences


def test_accounting_matches_a_real_calibrated_checkpoint(em, tiny_qwen_dir, tmp_path):
    from safetensors import safe_open
    from transformers import AutoModelForImageTextToText

    from splitq_calibration import calibrate
    from splitq_vllm.checkpoint import read_checkpoint
    from splitq_vllm.model_layout import linear_groups, source_tensor_files

    data = [{"image": draw_image("circle"), "prompt": "Describe this image.", "caption": "A red circle."},
            {"image": draw_image("square", (30, 30, 220)), "prompt": "Describe this image.", "caption": "A blue square."}]  # fmt: skip
    out = calibrate(tiny_qwen_dir, data, tmp_path / "ckpt", epochs=0, num_samples=2, device="cpu")
    layers = read_checkpoint(out).quant_config.layers

    model = AutoModelForImageTextToText.from_pretrained(tiny_qwen_dir)
    predicted = {}
    for g in linear_groups(model, list(source_tensor_files(tiny_qwen_dir))):  # the files' names, as calibration
        has_bias = model.get_submodule(g.modules[0]).bias is not None
        predicted.update(zip(g.names, em.default_dims(g, has_bias)))
    assert predicted == layers

    e = em.estimate_model(model, model.config, "w4a4", dtype_bytes=model.dtype.itemsize)
    stored = 0
    for f in out.glob("*.safetensors"):
        with safe_open(f, "pt") as st:
            for name in st.keys():
                t = st.get_slice(name)
                stored += torch.Size(t.get_shape()).numel() * _itemsize(t.get_dtype())
    assert e["checkpoint_bytes"] == stored


def _itemsize(dtype: str) -> int:
    return {"F32": 4, "BF16": 2, "F16": 2, "I32": 4, "U8": 1, "I64": 8}[dtype]


def test_served_bytes_extrapolation_is_exact(em):
    from splitq_kernels.layout import prepare_kernel_layer
    from splitq_kernels.reference import SplitQScheme, concat_outputs
    from splitq_vllm.checkpoint.config import LayerDims
    from splitq_vllm.checkpoint.tensors import layer_tensor_specs, tensors_to_layer

    for scheme_name in ("w4a4", "w3a3"):
        scheme = SplitQScheme.from_name(scheme_name)
        dims = [LayerDims(in_features=640, out_features=o, main=576, text=32, vision=32, kron=(24, 24), cws_rank=13,
                          mac_rank=19, group="g", bias=True) for o in (640, 128, 128)]  # fmt: skip
        members = []
        for d in dims:
            t = {s.suffix: torch.zeros(s.shape, dtype=s.dtype or torch.float32) for s in layer_tensor_specs(d, scheme)}
            members.append(tensors_to_layer(t, d, scheme))
        direct = prepare_kernel_layer(concat_outputs(members), scheme, "cpu").nbytes()
        assert em.kernel_layout_bytes(dims, scheme) == direct
        assert em.kernel_layout_bytes([replace(dims[0], bias=False)], scheme) == prepare_kernel_layer(
            replace(members[0], bias=None), scheme, "cpu"
        ).nbytes()


def test_per_gpu_memory_under_tensor_parallelism(em):
    """--tensor-parallel-size 2 on the tiny Qwen2.5-VL's shapes: each GPU holds more than half of
    the SplitQ layers (their input side and the row-parallel layers' outlier weights, low-rank
    factors and scales are on every GPU) and less than all of them; 16-bit parts and KV cache split."""
    from splitq_vllm.testing.published import meta_model

    ids = {"bos": 1, "eos": 2, "pad": 0, "image": 5, "video": 6, "vision_start": 3, "vision_end": 4}
    model = meta_model("tiny-qwen2.5-vl", token_ids=ids)
    one = em.estimate_model(model, model.config, "w4a4")
    two = em.estimate_model(model, model.config, "w4a4", tensor_parallel_size=2)
    assert "per_gpu" not in one and two["splitq_layers_served_bytes"] == one["splitq_layers_served_bytes"]
    g = two["per_gpu"]
    assert one["splitq_layers_served_bytes"] / 2 < g["splitq_layers_served_bytes"] < one["splitq_layers_served_bytes"]
    assert g["kv_bytes_per_token"] * 2 == one["kv_bytes_per_token"]  # 2 KV heads, one per GPU
    assert g["served_weights_bytes"] < one["served_weights_bytes"]
    assert em.budget(two, 24564, 0.9)["room_after_weights_bytes"] > em.budget(one, 24564, 0.9)["room_after_weights_bytes"]


# ---------------------------------------------------------------------------------------------
# The new families (issue 15): head_dim, sliding windows, linear attention; does it fit a 4090
# ---------------------------------------------------------------------------------------------


def test_cache_of_each_layer_type(em):
    """KV per token from the config's head_dim and the layers that grow with the sequence;
    Gemma 3's sliding layers hold at most the window, Qwen3.5's Gated DeltaNet layers a fixed state."""
    from splitq_vllm.testing.published import published_config

    q3 = em.cache_bytes(published_config("qwen3-vl-32b").text_config, 16384)
    assert q3["per_token"] == 64 * 2 * 8 * 128 * 2 and q3["window"] == q3["state"] == 0  # head_dim 128, not 5120 / 64
    g = em.cache_bytes(published_config("gemma-3-27b").text_config, 16384)
    assert g["layers"] == {"full_attention": 10, "sliding_attention": 52, "linear_attention": 0}
    assert g["per_token"] == 10 * 2 * 16 * 128 * 2 and g["window"] == 52 * 2 * 16 * 128 * 2 * 1024
    assert em.cache_bytes(published_config("gemma-3-27b").text_config, 512)["window"] == 52 * 2 * 16 * 128 * 2 * 512
    q35 = em.cache_bytes(published_config("qwen3.5-27b").text_config, 16384)
    ssm, conv = 48 * 128 * 128 * 4, (2 * 16 * 128 + 48 * 128) * 3 * 2
    assert q35["layers"]["linear_attention"] == 48 and q35["state"] == 48 * (ssm + conv)
    assert q35["per_token"] == 16 * 2 * 4 * 256 * 2
    assert q35["one_sequence"] == q35["per_token"] * 16384 + q35["state"]
    # one GPU's share at TP=2: KV heads and the state's heads split
    half = em.cache_bytes(published_config("qwen3.5-27b").text_config, 16384, kv_heads=2, tp=2)
    assert 2 * half["per_token"] == q35["per_token"] and 2 * half["state"] == q35["state"]


def test_the_new_families_on_a_4090(em):
    """Estimates, not measurements: the 8B-class models fit at W4A4 with a full sequence; the
    27B-class ones only at W3A3; the 32B at neither."""
    rows = {r["model"]: r for r in em.fits_rows(["Qwen3-VL-8B", "Gemma-3-27B", "Qwen3.5-27B", "Qwen3-VL-32B"])}
    fit = {(m, s): r["schemes"][s]["fit"]["fits"] for m, r in rows.items() for s in ("w4a4", "w3a3")}
    assert fit == {("Qwen3-VL-8B", "w4a4"): True, ("Qwen3-VL-8B", "w3a3"): True,
                   ("Gemma-3-27B", "w4a4"): False, ("Gemma-3-27B", "w3a3"): True,
                   ("Qwen3.5-27B", "w4a4"): False, ("Qwen3.5-27B", "w3a3"): True,
                   ("Qwen3-VL-32B", "w4a4"): False, ("Qwen3-VL-32B", "w3a3"): False}  # fmt: skip
    for r in rows.values():
        w4, w3 = r["schemes"]["w4a4"], r["schemes"]["w3a3"]
        assert w3["served_weights_bytes"] < w4["served_weights_bytes"] < w4["bf16_weights_bytes"] / 2
        assert w4["quantized_linears"] > 0
    g = rows["Gemma-3-27B"]["schemes"]["w4a4"]
    assert g["unquantized_parts_bytes"]["vision tower + projector"] > 2 * 0.4e9  # SigLIP So400m, counted as vision
    # Qwen3.5's Gated DeltaNet layers are quantized too: 7 linears in each of the 16 full-attention
    # layers, 5 (in_proj_qkv, _z, _b, _a, out_proj) + 3 MLP in each of the 48 others
    assert rows["Qwen3.5-27B"]["schemes"]["w4a4"]["quantized_linears"] == 16 * 7 + 48 * 8


def test_benchmarks_shows_the_fits_table(em):
    """BENCHMARKS.md's table of every model is what `estimate_memory.py --fits` prints."""
    table = em.fits_markdown(em.fits_rows(list(em.MODELS)))
    text = (DOCKER.parent / "BENCHMARKS.md").read_text()
    assert table in text, f"BENCHMARKS.md is out of date; `docker/estimate_memory.py --fits` prints:\n{table}"
