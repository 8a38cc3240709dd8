"""The tiny model factories: deterministic, loadable by transformers, served by vLLM on the CPU."""

import filecmp
import json

import pytest
import torch
from transformers import AutoModelForImageTextToText, AutoProcessor

from splitq_vllm.testing.conversations import image_part
from splitq_vllm.testing.images import draw_image, png_bytes
from splitq_vllm.testing.models import build_tiny_qwen25vl
from tests.helpers.engine import offline_chat

QUESTION = [{"type": "text", "text": "What is in this image?"}]


def test_same_seed_gives_identical_files(tmp_path, tiny_qwen_dir):
    again = build_tiny_qwen25vl(tmp_path / "again")
    names = sorted(p.name for p in tiny_qwen_dir.iterdir())
    assert "model.safetensors" in names and "tokenizer.json" in names and "chat_template.jinja" in names
    match, mismatch, errors = filecmp.cmpfiles(tiny_qwen_dir, again, names, shallow=False)
    assert not mismatch and not errors


@pytest.mark.parametrize("which", ["qwen", "llava"])
def test_transformers_loads_and_sees_the_image_tokens(which, tiny_qwen_dir, tiny_llava_dir):
    path = tiny_qwen_dir if which == "qwen" else tiny_llava_dir
    processor = AutoProcessor.from_pretrained(path)
    model = AutoModelForImageTextToText.from_pretrained(path)
    cfg = json.loads((path / "config.json").read_text())
    assert cfg["text_config"]["hidden_size"] // cfg["text_config"]["num_attention_heads"] >= 32
    text = processor.apply_chat_template([{"role": "user", "content": [{"type": "image"}, *QUESTION]}], add_generation_prompt=True)
    inputs = processor(text=[text], images=[draw_image()], return_tensors="pt")
    image_token = model.config.image_token_id
    assert int((inputs["input_ids"] == image_token).sum()) == 16  # 112 px (Qwen) / 56 px (LLaVA) -> 16 tokens
    with torch.no_grad():
        logits = model(**inputs).logits
    assert torch.isfinite(logits).all()


@pytest.mark.vllm
@pytest.mark.parametrize("which", ["qwen", "llava"])
def test_vllm_answers_a_prompt_with_an_image(which, tiny_qwen_dir, tiny_llava_dir):
    path = tiny_qwen_dir if which == "qwen" else tiny_llava_dir
    conversation = [{"role": "user", "content": [image_part(png_bytes(draw_image())), *QUESTION]}]
    (result,) = offline_chat(path, [conversation], max_tokens=6)
    assert 1 <= len(result["token_ids"]) <= 6 and isinstance(result["text"], str)
    image_token = json.loads((path / "config.json").read_text())
    image_token = image_token.get("image_token_id", image_token.get("image_token_index"))
    assert result["prompt_token_ids"].count(image_token) == 16


@pytest.mark.parametrize("family", ["Qwen2-VL", "Qwen3-VL", "Gemma 3", "Qwen3.5"])
def test_new_family_factories_are_deterministic_and_see_the_image(family, tiny_model, tmp_path):
    from splitq_vllm.families import family_of
    from splitq_vllm.model_layout import vision_token_ids
    from splitq_vllm.testing.models import TINY_BUILDERS

    path = tiny_model(family)
    again = TINY_BUILDERS[family](tmp_path / "again")
    names = sorted(p.name for p in path.iterdir())
    match, mismatch, errors = filecmp.cmpfiles(path, again, names, shallow=False)
    assert not mismatch and not errors
    model = AutoModelForImageTextToText.from_pretrained(path)
    assert family_of(model).name == family
    processor = AutoProcessor.from_pretrained(path)
    text = processor.apply_chat_template([{"role": "user", "content": [{"type": "image"}, *QUESTION]}], add_generation_prompt=True)
    inputs = processor(text=[text], images=[draw_image()], return_tensors="pt")
    assert int(torch.isin(inputs["input_ids"], torch.tensor(vision_token_ids(model.config))).sum()) == 16
    with torch.no_grad():
        assert torch.isfinite(model(**inputs).logits).all()
