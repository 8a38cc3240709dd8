"""`AutoModelForImageTextToText.from_pretrained(CKPT)` after `import splitq_vllm`: the transformers
quantizer for quant_method "splitq" (splitq_vllm/hf/quantizer.py) builds the SplitQ linears and
computes exactly what `load_quantized_model` does; `save_pretrained` writes the checkpoint back;
bad files fail naming the tensor; `import splitq_vllm` stays free of torch, transformers and vLLM."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForImageTextToText, AutoProcessor

import splitq_vllm  # noqa: F401  (registers the quantizer)
from splitq_kernels.reference import SplitQScheme
from splitq_vllm.checkpoint import CheckpointError, read_checkpoint
from splitq_vllm.hf.model import SplitQLinearModule, load_quantized_model
from splitq_vllm.hf.quantizer import SplitQCheckpointLinear
from splitq_vllm.testing.images import draw_image
from splitq_vllm.testing.synthetic import synthesize_checkpoint
from splitq_toyvqa.data import chat_messages, export_sharegpt4v, load_split
from tests.helpers.paths import BUNDLED_MODEL, REPO

QWEN_Q = "model.layers.0.self_attn.q_proj"


def _inputs(path, image=None, question="What colour is the shape?"):
    processor = AutoProcessor.from_pretrained(path)
    image = draw_image("square", (30, 30, 220)) if image is None else image
    text = processor.apply_chat_template(chat_messages(question, image), add_generation_prompt=True)
    return processor(text=[text], images=[image], return_tensors="pt")


def _from_pretrained(path, **kwargs):
    return AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float32, **kwargs).eval()


@pytest.fixture(scope="module", params=["qwen", "llava"])
def ckpt(request, tmp_path_factory, tiny_qwen_dir, tiny_llava_dir):
    src = tiny_qwen_dir if request.param == "qwen" else tiny_llava_dir
    return synthesize_checkpoint(src, tmp_path_factory.mktemp("ckpt") / "w4a4", SplitQScheme.from_name("w4a4"))


@pytest.fixture(scope="module")
def qwen_ckpt(tmp_path_factory, tiny_qwen_dir):
    return synthesize_checkpoint(tiny_qwen_dir, tmp_path_factory.mktemp("ckpt") / "w4a4", SplitQScheme.from_name("w4a4"))


def test_import_is_cheap_and_registers_in_either_order():
    """Run as a user's script would: `import splitq_vllm` first (nothing heavy imported; the
    quantizer registered when transformers' registry is), or after transformers."""
    code = """
import sys, time
t = time.perf_counter()
import splitq_vllm
cost = time.perf_counter() - t
heavy = sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'transformers', 'vllm', 'safetensors', 'numpy'})
from transformers.quantizers.auto import AUTO_QUANTIZER_MAPPING
print(heavy, 'splitq' in AUTO_QUANTIZER_MAPPING, round(cost, 3))
"""
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True).stdout
    heavy, registered, cost = out.rsplit(" ", 2)
    assert heavy == "[]" and registered == "True", out
    assert float(cost) < 0.5, out  # the stdlib hook only (about 5 ms here; transformers' registry alone takes seconds)
    check = "; print('splitq' in sys.modules['transformers.quantizers.auto'].AUTO_QUANTIZER_MAPPING)"
    # transformers first; and the quantizer module first, whose import imports the registry
    for first in ("import sys, transformers.quantizers.auto, splitq_vllm", "import sys, splitq_vllm.hf.quantizer"):
        out = subprocess.run([sys.executable, "-c", first + check], cwd=REPO, capture_output=True, text=True)
        assert out.stdout.strip() == "True", out


def test_same_logits_and_answers_as_load_quantized_model(ckpt):
    inputs = _inputs(ckpt)
    model, ref = _from_pretrained(ckpt), load_quantized_model(ckpt)
    mods = [m for m in model.modules() if isinstance(m, SplitQLinearModule)]
    assert len(mods) == 14 and all(isinstance(m, SplitQCheckpointLinear) for m in mods)
    assert not any(isinstance(m, torch.nn.Linear) and ".layers." in n and "vision" not in n and "visual" not in n
                   for n, m in model.named_modules())  # fmt: skip
    assert {p.dtype for p in model.parameters()} == {torch.float32}  # renamed keys cast like the rest
    assert model.config.quantization_config.to_dict() == read_checkpoint(ckpt).quant_config.to_dict()
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, ref(**inputs).logits)
    a = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    b = ref.generate(**inputs, max_new_tokens=4, do_sample=False)
    assert torch.equal(a, b)
    assert bool(mods[0].text_mask.mask.all())  # the last decode step: every row text


def test_moves_without_casting_the_format_tensors(qwen_ckpt):
    model = _from_pretrained(qwen_ckpt).to(torch.bfloat16)
    q = model.get_submodule(f"model.language_model.{QWEN_Q.removeprefix('model.')}")
    assert q.main_p1.dtype == torch.float32 and q.main_qweight.dtype == torch.uint8
    assert q.layer.main_p1.dtype == torch.float32 and model.lm_head.weight.dtype == torch.bfloat16


def test_save_pretrained_writes_the_checkpoint_back(qwen_ckpt, tmp_path):
    model = AutoModelForImageTextToText.from_pretrained(qwen_ckpt)  # the files' dtype (bfloat16)
    model.save_pretrained(tmp_path / "saved")
    a, b = read_checkpoint(qwen_ckpt), read_checkpoint(tmp_path / "saved")
    assert set(a.weight_map) == set(b.weight_map)
    for name in a.weight_map:
        x, y = a.tensor(name), b.tensor(name)
        assert x.dtype == y.dtype and torch.equal(x, y), name
    assert a.quant_config.to_dict() == b.quant_config.to_dict()
    inputs = _inputs(qwen_ckpt)
    with torch.no_grad():
        assert torch.equal(_from_pretrained(tmp_path / "saved")(**inputs).logits, _from_pretrained(qwen_ckpt)(**inputs).logits)


def _edited_copy(ckpt, tmp_path, edit):
    import shutil

    path = tmp_path / "edited"
    shutil.copytree(ckpt, path)
    t = load_file(str(path / "model.safetensors"))
    edit(t)
    save_file(t, str(path / "model.safetensors"), metadata={"format": "pt"})
    return path


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda t: t.pop(f"{QWEN_Q}.mac_up_wscale"), rf"missing tensor '{QWEN_Q}.mac_up_wscale'"),
        (lambda t: t.__setitem__(f"{QWEN_Q}.main_wscale", t[f"{QWEN_Q}.main_wscale"][:-1].clone()),
         rf"tensor '{QWEN_Q}.main_wscale' in model.safetensors: shape \[127\], expected \[128\]"),
        (lambda t: t[f"{QWEN_Q}.text_wscale"].__setitem__(0, float("nan")), rf"tensor '{QWEN_Q}.text_wscale': contains NaN"),
        (lambda t: t["model.layers.0.self_attn.v_proj.main_smooth"].mul_(1.0001),
         r"'model.layers.0.self_attn.v_proj.main_smooth' differ although both layers read the same input"),
    ],
    ids=["missing", "shape", "nan", "group"],
)  # fmt: skip
def test_bad_tensors_are_named(qwen_ckpt, tmp_path, edit, message):
    with pytest.raises(CheckpointError, match=message):
        _from_pretrained(_edited_copy(qwen_ckpt, tmp_path, edit))


def test_a_tensor_the_loader_does_not_deliver_is_named(qwen_ckpt):
    """transformers leaves a custom buffer it did not load as uninitialised memory and only logs
    it: here a key_mapping sends one tensor elsewhere, and the quantizer names it."""
    key_mapping = {r"^model\.layers\.0\.self_attn\.q_proj\.main_smooth$": "model.layers.0.self_attn.q_proj.elsewhere"}
    with pytest.raises(CheckpointError, match=rf"tensor '{QWEN_Q}.main_smooth' was not loaded into the model"):
        _from_pretrained(qwen_ckpt, key_mapping=key_mapping)


@pytest.fixture(scope="module")
def calibrated_bundled(tmp_path_factory, single_thread):
    """The bundled ToyVQA model calibrated by splitq-calibrate (SplitQ W4A4, 8 pictures, 1 epoch:
    a real run, short)."""
    from splitq_calibration import calibrate

    root = tmp_path_factory.mktemp("bundled")
    data = export_sharegpt4v(root / "data", n=8)
    return calibrate(BUNDLED_MODEL, str(data), root / "w4a4", image_dir=str(data.parent / "images"), num_samples=8, epochs=1)


def test_calibrated_bundled_model(calibrated_bundled):
    model, ref = _from_pretrained(calibrated_bundled), load_quantized_model(calibrated_bundled)
    assert json.loads((calibrated_bundled / "config.json").read_text())["quantization_config"]["calibration"]["method"] == "splitq"
    samples = [s for s in load_split("test", n=8) if s.image is not None][:4]
    assert len(samples) == 4
    for sample in samples:
        inputs = _inputs(calibrated_bundled, sample.image, sample.question)
        with torch.no_grad():
            assert torch.equal(model(**inputs).logits, ref(**inputs).logits), sample.id
        a = model.generate(**inputs, max_new_tokens=4, do_sample=False)
        assert torch.equal(a, ref.generate(**inputs, max_new_tokens=4, do_sample=False)), sample.id
