"""Exporting quantized groups from a real (tiny) model, and loading the checkpoint back into
transformers: names on disk, untouched 16-bit tensors, the text mask, closeness to FP."""

import json

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForImageTextToText, AutoProcessor

from splitq_kernels.reference import SplitQScheme
from splitq_vllm.checkpoint import read_checkpoint
from splitq_vllm.hf.model import SplitQLinearModule, load_quantized_model
from splitq_vllm.model_layout import linear_groups, source_tensor_files, vision_token_ids
from splitq_vllm.testing.images import draw_image
from splitq_vllm.testing.synthetic import synthesize_checkpoint


def _inputs(path):
    processor = AutoProcessor.from_pretrained(path)
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What colour is the shape?"}]}]
    text = processor.apply_chat_template(msgs, add_generation_prompt=True)
    return processor(text=[text], images=[draw_image("square", (30, 30, 220))], return_tensors="pt")


@pytest.fixture(scope="module", params=["qwen", "llava"])
def model_and_ckpt(request, tmp_path_factory, tiny_qwen_dir, tiny_llava_dir):
    src = tiny_qwen_dir if request.param == "qwen" else tiny_llava_dir
    ckpts = {}
    for scheme in ("w8a8", "w4a4"):
        ckpts[scheme] = synthesize_checkpoint(src, tmp_path_factory.mktemp("ckpt") / scheme, SplitQScheme.from_name(scheme))
    return request.param, src, ckpts


def test_checkpoint_names_groups_and_untouched_tensors(model_and_ckpt):
    which, src, ckpts = model_and_ckpt
    ckpt = read_checkpoint(ckpts["w4a4"])
    names = list(ckpt.quant_config.layers)
    assert len(names) == 2 * 7  # two decoder layers, seven linears each
    prefix = "model.layers" if which == "qwen" else "language_model.model.layers"  # as in the source files
    assert all(n.startswith(prefix) for n in names)
    dims = ckpt.quant_config.layers
    assert dims[f"{prefix}.0.self_attn.q_proj"].group == dims[f"{prefix}.0.self_attn.v_proj"].group == f"{prefix}.0.self_attn.qkv"
    assert dims[f"{prefix}.1.mlp.up_proj"].group == f"{prefix}.1.mlp.gate_up"
    assert all(d.cws_rank > 0 and d.mac_rank > 0 and d.text > 0 and d.vision > 0 for d in dims.values())
    src_files = source_tensor_files(src)
    for name, t in ckpt.unquantized_tensors():
        with safe_open(str(src / src_files[name]), "pt") as fh:
            assert torch.equal(fh.get_tensor(name), t), name
    quantized_weights = {f"{n}.weight" for n in names}
    assert set(src_files) - quantized_weights - {f"{n}.bias" for n in names} == {n for n, _ in ckpt.unquantized_tensors()}
    if which == "qwen":  # q/k/v have biases: kept in the model's dtype
        assert ckpt.tensor(f"{prefix}.0.self_attn.k_proj.bias").dtype == torch.bfloat16
    for f in ("tokenizer.json", "chat_template.jinja", "processor_config.json"):
        assert (ckpts["w4a4"] / f).is_file()
    assert json.loads((ckpts["w4a4"] / "config.json").read_text())["quantization_config"]["calibration"]["method"] == "synthetic"


def test_quantized_model_tracks_fp_and_sees_the_mask(model_and_ckpt):
    which, src, ckpts = model_and_ckpt
    fp = AutoModelForImageTextToText.from_pretrained(src, dtype=torch.float32).eval()
    inputs = _inputs(src)
    with torch.no_grad():
        ref = fp(**inputs).logits
    errors = {}
    for scheme, path in ckpts.items():
        model = load_quantized_model(path)
        mods = [m for m in model.modules() if isinstance(m, SplitQLinearModule)]
        assert len(mods) == 14
        with torch.no_grad():
            logits = model(**inputs).logits
        errors[scheme] = float((logits - ref).norm() / ref.norm())
        mask = mods[0].text_mask.mask
        assert int((~mask).sum()) == 16  # the image's rows are vision, every other row text
    # W8A8 (with random transforms folded in) stays close to FP; W4A4 is further away.
    assert errors["w8a8"] < 0.05, errors
    assert errors["w8a8"] < errors["w4a4"] < 1.0, errors


def test_generation_runs_on_the_quantized_model(model_and_ckpt):
    _, src, ckpts = model_and_ckpt
    model = load_quantized_model(ckpts["w4a4"])
    inputs = _inputs(src)
    out = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    assert out.shape[1] > inputs["input_ids"].shape[1]
    # decode steps: every row is text
    mask = next(m for m in model.modules() if isinstance(m, SplitQLinearModule)).text_mask.mask
    assert bool(mask.all())


def test_linear_groups_match_the_files(tiny_qwen_dir):
    model = AutoModelForImageTextToText.from_pretrained(tiny_qwen_dir)
    groups = linear_groups(model, list(source_tensor_files(tiny_qwen_dir)))
    assert [g.kind for g in groups[:4]] == ["qkv", "o", "gate_up", "down"]
    qkv = groups[0]
    assert qkv.modules[0] == "model.language_model.layers.0.self_attn.q_proj"
    assert qkv.out_features == (128, 64, 64) and qkv.in_features == 128


def test_a_placeholder_token_without_pixels_is_a_text_row(model_and_ckpt):
    """A generated image-placeholder token holds its text embedding (no pixels in that forward):
    its row is text, as in vLLM, whose is_multimodal marks only rows the vision tower filled."""
    _, src, ckpts = model_and_ckpt
    model = load_quantized_model(ckpts["w4a4"])
    image_id = vision_token_ids(model.config)[0]
    mask = next(m for m in model.modules() if isinstance(m, SplitQLinearModule)).text_mask
    with torch.no_grad():
        model(input_ids=torch.tensor([[5, image_id, 7]]))
    assert mask.mask.tolist() == [[True, True, True]]
    with torch.no_grad():
        model(**_inputs(src))
    assert int((~mask.mask).sum()) == 16
    model.generate(**_inputs(src), max_new_tokens=1, do_sample=False)  # one forward: the prefill,
    assert int((~mask.mask).sum()) == 16  # whose images generate() passes as mm_encoder_outputs
