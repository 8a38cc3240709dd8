"""The stress variant: the bundled model's function, bit for bit, with the planted outliers there."""

from __future__ import annotations

import json
import random

import pytest
import torch

from splitq_toyvqa.data import chat_messages, load_split
from splitq_toyvqa.evaluate import load_transformers
from splitq_toyvqa.stress import BUNDLED, SITES, apply_plants, build_stress_model, load_plants, plan_site


@pytest.fixture(scope="module")
def stress_dir(tmp_path_factory, single_thread):
    return build_stress_model(tmp_path_factory.mktemp("stress") / "toyvqa-stress", num_samples=16)


def _logits(model_dir, dtype, samples):
    model, processor = load_transformers(model_dir, dtype)
    texts = [processor.apply_chat_template(chat_messages(s.question, s.image), add_generation_prompt=True) for s in samples]
    images = [s.image for s in samples if s.image is not None]
    tok = processor.tokenizer
    tok.padding_side = "left"
    inputs = processor(text=texts, images=images or None, return_tensors="pt", padding=True)
    with torch.no_grad():
        return model(**inputs).logits


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_stress_model_computes_the_same_logits_bit_for_bit(stress_dir, dtype):
    samples = [s for s in load_split("test", 40) if s.image is not None][:3] + [
        s for s in load_split("test", 40) if s.image is None
    ][:1]
    a = _logits(BUNDLED, dtype, samples)
    b = _logits(stress_dir, dtype, samples)
    assert torch.equal(a, b)


def test_the_weights_did_change_where_planted(stress_dir):
    from safetensors.torch import load_file

    src = load_file(BUNDLED / "model.safetensors")
    out = load_file(stress_dir / "model.safetensors")
    plants = load_plants(stress_dir)
    assert {p.site for p in plants} == set(SITES) and {p.modality for p in plants} == {"vision", "text"}
    changed = [k for k in src if not torch.equal(src[k], out[k])]
    assert changed and all("visual" not in k for k in changed)
    p = next(p for p in plants if p.site == "qkv" and p.log2_factor > 0)
    norm = f"model.layers.{p.layer}.input_layernorm.weight"
    assert torch.equal(out[norm][p.channel].float(), src[norm][p.channel].float() * 2**p.log2_factor)
    record = json.loads((stress_dir / "stress_plants.json").read_text())
    assert record["num_samples"] == 16 and len(record["plants"]) == len(plants)
    # the same function, so the source's training record (and the data version it is scored on) holds
    assert (stress_dir / "training_log.json").read_bytes() == (BUNDLED / "training_log.json").read_bytes()


def test_the_planted_channels_are_modality_outliers_of_the_stress_model(stress_dir, tmp_path, single_thread):
    """Measured again on the written model (not the plan): every planted vision channel is a huge
    outlier on vision tokens and larger there than on text; text channels the other way round."""
    from splitq_calibration.inspect_channels import layer_input_stats
    from splitq_calibration.recipe import CalibrationConfig
    from splitq_toyvqa.data import export_sharegpt4v, model_data_version

    # the pictures the plants were chosen on: the version the source model was trained on
    data = export_sharegpt4v(tmp_path / "data", "calibration", 16, version=model_data_version(BUNDLED))
    cfg = CalibrationConfig(num_samples=16, image_dir=str(data.parent / "images"), device="cpu").resolved()
    plants = [p for p in load_plants(stress_dir) if p.layer == 1 and p.site in ("qkv", "down")]
    stats, _ = layer_input_stats(stress_dir, str(data), 1, ["qkv", "down"], cfg)
    for p in plants:
        st = stats[p.site]
        v, t = st.vision_absmax / st.vision_absmax.median(), st.text_absmax / st.text_absmax.median()
        if p.modality == "vision":
            assert v[p.channel] > 16 and v[p.channel] > t[p.channel], p
        else:
            assert t[p.channel] > 4 and t[p.channel] > v[p.channel], p


def test_plan_site_picks_the_modality_dominant_channels_and_scales_them_to_the_target():
    gen = torch.Generator().manual_seed(0)
    d = 300
    vision = torch.rand(d, generator=gen) + 0.5
    text = torch.rand(d, generator=gen) + 0.5
    vision[[7, 11, 200]] *= 10.0  # vision-dominant: a vision/text ratio above any other channel's
    text[[3, 40, 41, 42, 99, 250]] *= 10.0
    plants = plan_site(0, "qkv", vision, text, random.Random(0))
    got_v = {p.channel for p in plants if p.modality == "vision"}
    got_t = {p.channel for p in plants if p.modality == "text"}
    assert got_v == {7, 11, 200}  # 1% of 300
    assert got_t == {3, 40, 41, 42, 99, 250}  # 2% of 300
    for p in plants:
        values, median, (lo, hi) = (vision, vision.median(), (32, 128)) if p.modality == "vision" else (text, text.median(), (8, 32))
        gain = values[p.channel] * 2**p.log2_factor / median
        assert lo / 2**0.5 <= gain <= hi * 2**0.5


def test_apply_plants_is_exact_and_only_touches_the_named_tensors():
    from splitq_toyvqa.stress import Plant

    cfg = {"num_attention_heads": 4, "num_key_value_heads": 2, "hidden_size": 16}
    gen = torch.Generator().manual_seed(1)
    pre = "model.layers.0."
    t = {pre + "input_layernorm.weight": torch.randn(16, generator=gen).bfloat16(),
         pre + "self_attn.v_proj.weight": torch.randn(8, 16, generator=gen).bfloat16(),
         pre + "self_attn.v_proj.bias": torch.randn(8, generator=gen).bfloat16(),
         pre + "self_attn.o_proj.weight": torch.randn(16, 16, generator=gen).bfloat16()}  # fmt: skip
    out = apply_plants(t, [Plant(0, "o", 5, "vision", 3)], cfg)
    # kv channel 5 = kv head 1, dim 1; query heads 2 and 3 read it: o input columns 2*4+1, 3*4+1
    assert torch.equal(out[pre + "self_attn.v_proj.weight"][5].float(), t[pre + "self_attn.v_proj.weight"][5].float() * 8)
    assert torch.equal(out[pre + "self_attn.v_proj.bias"][5].float(), t[pre + "self_attn.v_proj.bias"][5].float() * 8)
    o, o0 = out[pre + "self_attn.o_proj.weight"].float(), t[pre + "self_attn.o_proj.weight"].float()
    assert torch.equal(o[:, [9, 13]], o0[:, [9, 13]] / 8)
    others = [c for c in range(16) if c not in (9, 13)]
    assert torch.equal(o[:, others], o0[:, others])
    assert torch.equal(out[pre + "input_layernorm.weight"], t[pre + "input_layernorm.weight"])
    with pytest.raises(ValueError, match="decoder layer 3"):
        apply_plants(t, [Plant(3, "qkv", 0, "text", 1)], cfg)
