"""The published configs (shapes checked on the meta skeleton: no weights) and build_published
(run on scaled-down specs: the same code path at widths a test can load and run)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch

from splitq_vllm.checkpoint.reader import read_safetensors_header
from splitq_vllm.testing.images import draw_image
from splitq_vllm.testing.published import (
    PUBLISHED,
    QWEN_STYLE,
    TEST_SPECS,
    build_published,
    file_tensors,
    get_spec,
    linear_shapes,
    meta_model,
    published_config,
)

# Parameter counts the model cards show (billions, as rounded there). The new families' where a
# page was found to check them: Qwen2-VL-2B "2.21" (a model index's copy of the card), Qwen3-VL-8B
# "8.77B" (LM Studio's model page), Qwen3-VL-2B from its model.safetensors, 4.26 GB of bf16 =
# 2.13B (the repository's file list). The others (Qwen3-VL 4B/32B, Gemma 3, Qwen3.5, Qwen2-VL-7B)
# are checked by their linear shapes and towers only.
CARD_PARAMS = {
    "qwen2.5-vl-3b": 3.75, "qwen2.5-vl-7b": 8.29, "qwen2.5-vl-32b": 33.5, "qwen2.5-vl-72b": 73.4,
    "llava-1.5-7b": 7.06, "llava-1.5-13b": 13.4, "qwen2-vl-2b": 2.21, "qwen3-vl-8b": 8.77, "qwen3-vl-2b": 2.13,
}  # fmt: skip


def _digits(x: float, like: float) -> float:
    return round(x, 2) if like < 10 else round(x, 1)


def _attention_shapes(attn) -> dict[str, tuple[int, int]]:
    qkv_out = sum(getattr(attn, m).out_features for m in ("q_proj", "k_proj", "v_proj"))
    return {"qkv": (attn.q_proj.in_features, qkv_out), "o": (attn.o_proj.in_features, attn.o_proj.out_features)}


def _mlp_shapes(mlp) -> dict[str, tuple[int, int]]:
    return {"gate_up": (mlp.gate_proj.in_features, mlp.gate_proj.out_features + mlp.up_proj.out_features),
            "down": (mlp.down_proj.in_features, mlp.down_proj.out_features)}  # fmt: skip


def _gdn_shapes(la) -> dict[str, tuple[int, int]]:
    members = ("in_proj_qkv", "in_proj_z", "in_proj_b", "in_proj_a")
    return {"linear_in": (la.in_proj_qkv.in_features, sum(getattr(la, m).out_features for m in members)),
            "linear_out": (la.out_proj.in_features, la.out_proj.out_features)}  # fmt: skip


def model_linear_shapes(lm) -> dict[str, tuple[int, int]]:
    """The group shapes of a transformers language model's decoder layers (every layer type's,
    each the same in all layers of that type)."""
    found: dict[str, set] = {}
    for layer in lm.layers:
        shapes = _mlp_shapes(layer.mlp)
        shapes.update(_gdn_shapes(layer.linear_attn) if hasattr(layer, "linear_attn") else _attention_shapes(layer.self_attn))
        for k, v in shapes.items():
            found.setdefault(k, set()).add(v)
    assert all(len(v) == 1 for v in found.values()), found
    return {k: v.pop() for k, v in found.items()}


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_the_skeleton_has_the_published_shapes(name):
    spec = PUBLISHED[name]
    model = meta_model(name)  # every layer: on the meta device this costs nothing
    params = sum(p.numel() for p in model.parameters()) / 1e9
    if name in CARD_PARAMS:
        assert _digits(params, CARD_PARAMS[name]) == CARD_PARAMS[name]
    lm = model.model.language_model
    assert len(lm.layers) == spec.text.layers
    assert lm.embed_tokens.weight.shape == (spec.text.vocab, spec.text.hidden)
    assert model_linear_shapes(lm) == linear_shapes(name)
    attn = next(layer.self_attn for layer in lm.layers if hasattr(layer, "self_attn"))
    assert (attn.q_proj.bias is not None) == spec.qkv_bias
    cfg = model.config
    assert getattr(cfg.text_config, "layer_types", None) in (None, spec.text.layer_types()) or set(
        cfg.text_config.layer_types
    ) == {"full_attention"}
    if spec.family == "qwen2_5_vl":
        v = model.model.visual
        assert len(v.blocks) == 32 and v.blocks[0].mlp.gate_proj.weight.shape == (spec.vision.intermediate, 1280)
        assert v.merger.mlp[-1].out_features == spec.text.hidden
        assert cfg.vision_config.fullatt_block_indexes == [7, 15, 23, 31]
        assert cfg.text_config.rope_parameters["mrope_section"] == [16, 24, 24]
    elif spec.family == "qwen2_vl":
        v = model.model.visual
        assert len(v.blocks) == 32 and v.blocks[0].mlp.fc1.weight.shape == (4 * 1280, 1280)
        assert v.merger.mlp[-1].out_features == spec.text.hidden
        assert cfg.text_config.rope_parameters["mrope_section"] == [16, 24, 24]
    elif spec.family in ("qwen3_vl", "qwen3_5"):
        v, vs = model.model.visual, spec.vision
        assert len(v.blocks) == vs.depth and v.blocks[0].mlp.linear_fc1.weight.shape == (vs.intermediate, vs.hidden)
        assert v.merger.linear_fc2.out_features == spec.text.hidden and v.pos_embed.weight.shape == (2304, vs.hidden)
        assert cfg.text_config.head_dim == attn.q_norm.weight.shape[0] == spec.text.head_dim
        if spec.family == "qwen3_vl":
            assert spec.text.head_dim == 128 and cfg.text_config.rope_parameters["mrope_section"] == [24, 20, 20]
            assert cfg.vision_config.deepstack_visual_indexes == list(vs.deepstack)
            assert len(v.deepstack_merger_list) == 3
        else:
            assert cfg.text_config.rope_parameters["mrope_section"] == [11, 11, 10]  # a quarter of 256 rotated
            assert cfg.text_config.layer_types[:4] == ["linear_attention"] * 3 + ["full_attention"]
    elif spec.family == "gemma3":
        v = model.model.vision_tower
        assert len(v.encoder.layers) == 27 and v.encoder.layers[0].mlp.fc1.weight.shape == (4304, 1152)
        assert v.embeddings.position_embedding.weight.shape == (4096, 1152)  # 64 x 64 patches of 896 px
        assert model.model.multi_modal_projector.mm_input_projection_weight.shape == (1152, spec.text.hidden)
        t = cfg.text_config
        assert (t.sliding_window, t.layer_types[:6], cfg.mm_tokens_per_image) == (
            1024, ["sliding_attention"] * 5 + ["full_attention"], 256)  # fmt: skip
        assert t.query_pre_attn_scalar == (168 if name == "gemma-3-27b" else 256) and t.vocab_size == 262208
        assert t.rope_parameters["full_attention"] == {"rope_type": "linear", "factor": 8.0, "rope_theta": 1e6}
    else:
        v = model.model.vision_tower
        assert len(v.encoder.layers) == 24 and v.encoder.layers[0].mlp.fc1.weight.shape == (4096, 1024)
        assert v.embeddings.position_embedding.weight.shape == (577, 1024)  # 24 x 24 patches of 336 px + CLS
        proj = model.model.multi_modal_projector
        assert (proj.linear_1.in_features, proj.linear_2.out_features) == (1024, spec.text.hidden)
        assert cfg.vision_feature_layer == -2


def test_linear_shapes_match_the_release_table():
    # ../shared/notes/anchors.md, from the releases' config.json files
    assert linear_shapes("qwen2.5-vl-7b") == {"qkv": (3584, 4608), "o": (3584, 3584), "gate_up": (3584, 37888),
                                              "down": (18944, 3584)}  # fmt: skip
    assert linear_shapes("qwen2.5-vl-3b") == {"qkv": (2048, 2560), "o": (2048, 2048), "gate_up": (2048, 22016),
                                              "down": (11008, 2048)}  # fmt: skip
    assert linear_shapes("qwen2.5-vl-72b")["gate_up"] == (8192, 2 * 29568)
    assert linear_shapes("llava-1.5-13b")["qkv"] == (5120, 3 * 5120)
    assert PUBLISHED["qwen2.5-vl-32b"].vision.intermediate == PUBLISHED["qwen2.5-vl-72b"].vision.intermediate == 3456


def test_new_families_linear_shapes_at_full_size():
    """Worked out by hand from the config.json numbers (head_dim from the config, not hidden / heads)."""
    # Qwen2-VL-7B: Qwen2.5-VL-7B's language model
    assert linear_shapes("qwen2-vl-7b") == linear_shapes("qwen2.5-vl-7b")
    assert linear_shapes("qwen2-vl-2b") == {"qkv": (1536, 1536 + 2 * 2 * 128), "o": (1536, 1536),
                                            "gate_up": (1536, 2 * 8960), "down": (8960, 1536)}  # fmt: skip
    # Qwen3-VL-8B: 32 heads x 128 = 4096, 8 KV heads x 128 = 1024
    assert linear_shapes("qwen3-vl-8b") == {"qkv": (4096, 4096 + 2048), "o": (4096, 4096),
                                            "gate_up": (4096, 24576), "down": (12288, 4096)}  # fmt: skip
    # Qwen3-VL-32B: 64 heads x 128 = 8192 > hidden 5120 (hidden / heads would say 80)
    assert linear_shapes("qwen3-vl-32b") == {"qkv": (5120, 8192 + 2048), "o": (8192, 5120),
                                             "gate_up": (5120, 51200), "down": (25600, 5120)}  # fmt: skip
    assert linear_shapes("qwen3-vl-2b")["qkv"] == (2048, 2048 + 2048) and linear_shapes("qwen3-vl-4b")["o"] == (4096, 2560)
    # Gemma 3: 4B 8 x 256 + 2 x 4 x 256; 27B 32 x 128 + 2 x 16 x 128
    assert linear_shapes("gemma-3-4b") == {"qkv": (2560, 2048 + 2048), "o": (2048, 2560),
                                           "gate_up": (2560, 20480), "down": (10240, 2560)}  # fmt: skip
    assert linear_shapes("gemma-3-12b")["qkv"] == (3840, 4096 + 4096)
    assert linear_shapes("gemma-3-27b") == {"qkv": (5376, 4096 + 4096), "o": (4096, 5376),
                                            "gate_up": (5376, 43008), "down": (21504, 5376)}  # fmt: skip
    # Qwen3.5-27B: gated q_proj 2 x 24 x 256, KV 4 x 256; Gated DeltaNet: q, k 16 x 128 each,
    # v and z 48 x 128, b and a one per value head
    assert linear_shapes("qwen3.5-27b") == {
        "qkv": (5120, 12288 + 2048), "o": (6144, 5120), "gate_up": (5120, 34816), "down": (17408, 5120),
        "linear_in": (5120, 4096 + 6144 + 6144 + 96), "linear_out": (6144, 5120),
    }  # fmt: skip
    assert linear_shapes("qwen3.5-0.8b")["linear_in"] == (1024, 4096 + 2048 + 2048 + 32)
    assert linear_shapes("qwen3.5-9b")["qkv"] == (4096, 8192 + 2048)


def test_layer_types_follow_the_release_pattern():
    g = PUBLISHED["gemma-3-27b"].text.layer_types()
    assert len(g) == 62 and [i for i, t in enumerate(g) if t == "full_attention"] == list(range(5, 62, 6))
    q = PUBLISHED["qwen3.5-27b"].text.layer_types()
    assert q.count("full_attention") == 16 and q[3::4] == ["full_attention"] * 16
    assert PUBLISHED["qwen3-vl-8b"].text.layer_types() is None  # every layer full attention
    assert published_config("qwen3.5-4b", layers=2).text_config.layer_types == ["linear_attention"] * 2


@pytest.mark.parametrize("name", ["qwen2.5-vl-3b", "qwen2.5-vl-7b", "llava-1.5-7b", "qwen2-vl-2b", "qwen3-vl-8b",
                                  "gemma-3-4b", "qwen3.5-4b"])  # fmt: skip
def test_file_names_follow_the_releases(name):
    names = [n for n, _, _ in file_tensors(meta_model(name, layers=4 if name.startswith("qwen3.5") else 1))]
    if name.startswith(("qwen3-vl", "qwen3.5")):
        assert {"model.language_model.embed_tokens.weight", "model.language_model.layers.0.mlp.down_proj.weight",
                "model.visual.blocks.0.attn.qkv.weight", "model.visual.merger.linear_fc2.weight"} <= set(names)  # fmt: skip
        assert ("lm_head.weight" in names) == (not PUBLISHED[name].text.tie_word_embeddings)
        if name.startswith("qwen3.5"):
            assert {"model.language_model.layers.0.linear_attn.in_proj_qkv.weight",
                    "model.language_model.layers.3.self_attn.q_proj.weight"} <= set(names)  # fmt: skip
        else:
            assert "model.visual.deepstack_merger_list.2.linear_fc2.weight" in names
    elif name.startswith("gemma"):
        assert {"language_model.model.embed_tokens.weight", "language_model.model.layers.0.self_attn.q_norm.weight",
                "vision_tower.vision_model.encoder.layers.26.mlp.fc2.weight",
                "multi_modal_projector.mm_input_projection_weight"} <= set(names)  # fmt: skip
        assert not any("lm_head" in n for n in names)  # tied to the embeddings
    elif name.startswith("qwen"):
        assert {"model.embed_tokens.weight", "model.layers.0.self_attn.q_proj.bias", "model.norm.weight",
                "visual.merger.mlp.2.weight"} <= set(names)  # fmt: skip
        mlp = "fc2" if name.startswith("qwen2-vl") else "down_proj"  # Qwen2-VL's tower: fc1/fc2
        assert f"visual.blocks.31.mlp.{mlp}.weight" in names
        assert ("lm_head.weight" in names) == (not PUBLISHED[name].text.tie_word_embeddings)
    else:
        assert {"language_model.model.layers.0.mlp.down_proj.weight", "language_model.lm_head.weight",
                "vision_tower.vision_model.encoder.layers.23.self_attn.q_proj.weight",
                "multi_modal_projector.linear_2.weight"} <= set(names)  # fmt: skip
    assert len(names) == len(set(names))


def test_unknown_names_and_bad_arguments_are_refused(tmp_path):
    with pytest.raises(ValueError, match="unknown model 'qwen9'.*qwen2.5-vl-7b"):
        get_spec("qwen9")
    with pytest.raises(ValueError, match="layers must be >= 1"):
        build_published("tiny-qwen2.5-vl", tmp_path / "x", layers=0)
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "f").write_text("x")
    with pytest.raises(FileExistsError, match="not empty"):
        build_published("tiny-qwen2.5-vl", tmp_path / "full", layers=1)
    with pytest.raises(ValueError, match="smaller than the tokenizer"):
        build_published(TEST_SPECS["tiny-qwen2.5-vl"].scaled("v", vocab=100), tmp_path / "v", layers=1)


# ---------------------------------------------------------------------------------------------
# build_published on the scaled-down specs
# ---------------------------------------------------------------------------------------------


def _hashes(d: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(d.iterdir())}


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("published")
    return {n: build_published(n, root / n, layers=2, shard_bytes=1 << 20) for n in TEST_SPECS}


# Per family: the image token and the picture side that gives 64 image tokens (Gemma 3's tiny
# tower: its fixed tokens_per_image)
IMAGE_TOKEN = {"qwen2_5_vl": "<|image_pad|>", "qwen2_vl": "<|image_pad|>", "qwen3_vl": "<|image_pad|>",
               "qwen3_5": "<|image_pad|>", "llava": "<image>", "gemma3": "<image_soft_token>"}  # fmt: skip
IMAGE_SIDE = {"qwen2_5_vl": 224, "qwen2_vl": 224, "qwen3_vl": 256, "qwen3_5": 256, "llava": 224, "gemma3": 224}


@pytest.mark.parametrize("name", sorted(TEST_SPECS))
def test_transformers_loads_it_and_runs_a_forward_with_an_image(built, name, single_thread):
    """One per family, on the scaled-down spec: the files load into the family's transformers
    class with nothing missing or left over, the linears have linear_shapes(), the processor's
    image tokens are the config's, and a forward with an image stays finite."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    d = built[name]
    spec = TEST_SPECS[name]
    model, info = AutoModelForImageTextToText.from_pretrained(d, dtype=torch.float32, output_loading_info=True)
    assert not any(info.values()), info  # no missing, unexpected or mismatched tensor
    assert model.config.model_type == spec.family
    assert model_linear_shapes(model.model.language_model) == linear_shapes(spec)
    proc = AutoProcessor.from_pretrained(d)
    tok = proc.tokenizer
    cfg = model.config
    assert cfg.text_config.vocab_size == spec.text.vocab  # the spec's vocabulary, not the tokenizer's
    assert cfg.text_config.eos_token_id == tok.eos_token_id and cfg.text_config.num_hidden_layers == 2
    assert getattr(cfg.text_config, "layer_types", None) in (None, spec.text.layer_types(2)) or spec.text.layer_types() is None
    image_id = getattr(cfg, "image_token_id", None) if spec.family in QWEN_STYLE else cfg.image_token_index
    assert image_id == tok.convert_tokens_to_ids(IMAGE_TOKEN[spec.family])
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is in this image?"}]}]
    text = proc.apply_chat_template(messages, add_generation_prompt=True)
    inputs = proc(text=[text], images=[draw_image(size=IMAGE_SIDE[spec.family])], return_tensors="pt")
    n_image = int((inputs["input_ids"] == image_id).sum())
    # Qwen: 224 px = 16 x 16 patches of 14 (256 px = 16 x 16 of 16) merged 2 x 2; LLaVA: the
    # tower's (112 / 14)^2; Gemma 3: the tower's 8 x 8 patches pooled to 16 tokens
    assert n_image == (spec.vision.tokens_per_image if spec.family == "gemma3" else 64)
    with torch.no_grad():
        out = model(**inputs, output_hidden_states=True)
    for h in out.hidden_states:  # activations stay sane through the layers (init std 0.02)
        assert torch.isfinite(h).all() and 1e-3 < float(h.abs().max()) < 100
    assert torch.isfinite(out.logits).all()


def test_same_arguments_give_the_same_bytes(built, tmp_path):
    name = "tiny-qwen2.5-vl"
    again = build_published(name, tmp_path / "again", layers=2, shard_bytes=1 << 20)
    assert _hashes(again) == _hashes(built[name])
    other = build_published(name, tmp_path / "seed1", layers=2, seed=1, shard_bytes=1 << 20)
    changed = {f for f, h in _hashes(other).items() if h != _hashes(built[name])[f]}
    assert changed == {f for f in changed if f.endswith(".safetensors")} and changed  # only the weights differ


def test_shards_stay_under_the_limit_and_the_index_lists_every_tensor(tmp_path):
    limit = 300_000
    d = build_published("tiny-llava-1.5", tmp_path / "m", layers=2, shard_bytes=limit)
    index = json.loads((d / "model.safetensors.index.json").read_text())
    files = sorted(d.glob("*.safetensors"))
    assert len(files) >= 3 and sorted(set(index["weight_map"].values())) == [f.name for f in files]
    total = 0
    for f in files:
        header = read_safetensors_header(f)
        header.pop("__metadata__", None)
        sizes = [e - b for b, e in (h["data_offsets"] for h in header.values())]
        assert sum(sizes) <= limit or len(sizes) == 1  # a tensor larger than the limit gets a shard alone
        assert all(index["weight_map"][k] == f.name for k in header)
        total += sum(sizes)
    assert index["metadata"]["total_size"] == total
    # the files agree with the skeleton's tensor list (names, shapes), and safetensors reads them
    from safetensors import safe_open
    from transformers import AutoConfig, AutoModelForImageTextToText

    with torch.device("meta"):
        skeleton = AutoModelForImageTextToText.from_config(AutoConfig.from_pretrained(d))
    expected = {n: tuple(t.shape) for n, _, t in file_tensors(skeleton)}
    got = {}
    for f in files:
        with safe_open(str(f), "pt") as fh:
            for k in fh.keys():
                got[k] = tuple(fh.get_slice(k).get_shape())
    assert got == expected


def test_published_config_defaults_to_the_release_token_ids():
    cfg = published_config("qwen2.5-vl-7b")
    assert (cfg.image_token_id, cfg.text_config.eos_token_id, cfg.text_config.num_hidden_layers) == (151655, 151645, 28)
    assert published_config("llava-1.5-7b", layers=2).image_token_index == 32000
