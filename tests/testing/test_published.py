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
    TEST_SPECS,
    build_published,
    file_tensors,
    get_spec,
    linear_shapes,
    meta_model,
    published_config,
)

# Parameter counts the model cards show (billions, as rounded there)
CARD_PARAMS = {
    "qwen2.5-vl-3b": 3.75, "qwen2.5-vl-7b": 8.29, "qwen2.5-vl-32b": 33.5, "qwen2.5-vl-72b": 73.4,
    "llava-1.5-7b": 7.06, "llava-1.5-13b": 13.4,
}  # fmt: skip


def _digits(x: float, like: float) -> float:
    return round(x, 2) if like < 10 else round(x, 1)


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_the_skeleton_has_the_published_shapes(name):
    spec = PUBLISHED[name]
    model = meta_model(name)  # every layer: on the meta device this costs nothing
    params = sum(p.numel() for p in model.parameters()) / 1e9
    assert _digits(params, CARD_PARAMS[name]) == CARD_PARAMS[name]
    lm = model.model.language_model
    assert len(lm.layers) == spec.text.layers
    assert lm.embed_tokens.weight.shape == (spec.text.vocab, spec.text.hidden)
    layer = lm.layers[0]
    attn, mlp = layer.self_attn, layer.mlp
    shapes = linear_shapes(name)
    qkv_out = sum(getattr(attn, m).out_features for m in ("q_proj", "k_proj", "v_proj"))
    assert (attn.q_proj.in_features, qkv_out) == shapes["qkv"]
    assert (attn.o_proj.in_features, attn.o_proj.out_features) == shapes["o"]
    assert (mlp.gate_proj.in_features, mlp.gate_proj.out_features + mlp.up_proj.out_features) == shapes["gate_up"]
    assert (mlp.down_proj.in_features, mlp.down_proj.out_features) == shapes["down"]
    assert (attn.q_proj.bias is not None) == spec.qkv_bias
    if spec.family == "qwen2_5_vl":
        v = model.model.visual
        assert len(v.blocks) == 32 and v.blocks[0].mlp.gate_proj.weight.shape == (spec.vision.intermediate, 1280)
        assert v.merger.mlp[-1].out_features == spec.text.hidden
        assert model.config.vision_config.fullatt_block_indexes == [7, 15, 23, 31]
        assert model.config.text_config.rope_parameters["mrope_section"] == [16, 24, 24]
    else:
        v = model.model.vision_tower
        assert len(v.encoder.layers) == 24 and v.encoder.layers[0].mlp.fc1.weight.shape == (4096, 1024)
        assert v.embeddings.position_embedding.weight.shape == (577, 1024)  # 24 x 24 patches of 336 px + CLS
        proj = model.model.multi_modal_projector
        assert (proj.linear_1.in_features, proj.linear_2.out_features) == (1024, spec.text.hidden)
        assert model.config.vision_feature_layer == -2


def test_linear_shapes_match_the_release_table():
    # ../shared/notes/anchors.md, from the releases' config.json files
    assert linear_shapes("qwen2.5-vl-7b") == {"qkv": (3584, 4608), "o": (3584, 3584), "gate_up": (3584, 37888),
                                              "down": (18944, 3584)}  # fmt: skip
    assert linear_shapes("qwen2.5-vl-3b") == {"qkv": (2048, 2560), "o": (2048, 2048), "gate_up": (2048, 22016),
                                              "down": (11008, 2048)}  # fmt: skip
    assert linear_shapes("qwen2.5-vl-72b")["gate_up"] == (8192, 2 * 29568)
    assert linear_shapes("llava-1.5-13b")["qkv"] == (5120, 3 * 5120)
    assert PUBLISHED["qwen2.5-vl-32b"].vision.intermediate == PUBLISHED["qwen2.5-vl-72b"].vision.intermediate == 3456


@pytest.mark.parametrize("name", ["qwen2.5-vl-3b", "qwen2.5-vl-7b", "llava-1.5-7b"])
def test_file_names_follow_the_releases(name):
    names = [n for n, _, _ in file_tensors(meta_model(name, layers=1))]
    if name.startswith("qwen"):
        assert {"model.embed_tokens.weight", "model.layers.0.self_attn.q_proj.bias", "model.norm.weight",
                "visual.blocks.31.mlp.down_proj.weight", "visual.merger.mlp.2.weight"} <= set(names)  # fmt: skip
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


@pytest.mark.parametrize("name", sorted(TEST_SPECS))
def test_transformers_loads_it_and_runs_a_forward_with_an_image(built, name, single_thread):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    d = built[name]
    spec = TEST_SPECS[name]
    model, info = AutoModelForImageTextToText.from_pretrained(d, dtype=torch.float32, output_loading_info=True)
    assert not any(info.values()), info  # no missing, unexpected or mismatched tensor
    proc = AutoProcessor.from_pretrained(d)
    tok = proc.tokenizer
    cfg = model.config
    assert cfg.text_config.vocab_size == spec.text.vocab  # the spec's vocabulary, not the tokenizer's
    assert cfg.text_config.eos_token_id == tok.eos_token_id and cfg.text_config.num_hidden_layers == 2
    image_id = cfg.image_token_id if spec.family == "qwen2_5_vl" else cfg.image_token_index
    assert image_id == tok.convert_tokens_to_ids("<|image_pad|>" if spec.family == "qwen2_5_vl" else "<image>")
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is in this image?"}]}]
    text = proc.apply_chat_template(messages, add_generation_prompt=True)
    inputs = proc(text=[text], images=[draw_image(size=224)], return_tensors="pt")
    n_image = int((inputs["input_ids"] == image_id).sum())
    assert n_image == 64  # Qwen: 224 px = 16 x 16 patches merged 2 x 2; LLaVA: the tower's (112 / 14)^2
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
