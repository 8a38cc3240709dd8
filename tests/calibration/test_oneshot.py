"""`oneshot` with llm-compressor's contract (calibration/splitq_calibration/oneshot.py): a model
object (changed in place), a local path or a Hub id in, the calibrated model out, and
`model.save_pretrained` + `processor.save_pretrained` writing a checkpoint vLLM serves; recipes
in llm-compressor's shape accepted as a SplitQModifier, or refused with the expected shape."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForImageTextToText, AutoProcessor

from splitq_calibration import CalibrationConfig, SplitQModifier, calibrate, load_recipe, oneshot
from splitq_calibration.cli import calibrate_main
from splitq_calibration.errors import CalibrationError
from splitq_calibration.recipe import RecipeError, resolve_recipe
from splitq_vllm.checkpoint import read_checkpoint
from splitq_vllm.hf.model import SplitQLinearModule, load_quantized_model
from splitq_vllm.testing.images import captioned_images, draw_image
from tests.helpers.paths import REPO

pytestmark = pytest.mark.usefixtures("single_thread")

STAGED = """
quant_stage:
  quant_modifiers:
    SplitQModifier:
      targets: [Linear]
      scheme: W4A4
      method: rtn
"""


@pytest.fixture(scope="module")
def samples():
    return [{"id": n, "image": img, "caption": cap} for n, img, cap in captioned_images(3)]


def _logits(model, src):
    processor = AutoProcessor.from_pretrained(src)
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What colour is the shape?"}]}]
    text = processor.apply_chat_template(msgs, add_generation_prompt=True)
    inputs = processor(text=[text], images=[draw_image("circle", (220, 30, 30))], return_tensors="pt")
    with torch.no_grad():
        return model(**inputs).logits


def _same_checkpoint(a, b):
    a, b = read_checkpoint(a), read_checkpoint(b)
    assert a.quant_config.to_dict() == b.quant_config.to_dict()
    assert set(a.weight_map) == set(b.weight_map)
    for name in a.weight_map:
        x, y = a.tensor(name), b.tensor(name)
        assert x.dtype == y.dtype and torch.equal(x, y), name


@pytest.fixture(scope="module")
def object_run(tiny_qwen_dir, samples, tmp_path_factory):
    """The llm-compressor script: a model object in, calibrated in place, saved with its processor."""
    root = tmp_path_factory.mktemp("oneshot")
    model = AutoModelForImageTextToText.from_pretrained(tiny_qwen_dir, dtype="auto")
    processor = AutoProcessor.from_pretrained(tiny_qwen_dir)
    returned = oneshot(model=model, dataset=samples, recipe=SplitQModifier(method="rtn", scheme="W4A4"),
                       num_calibration_samples=2, max_seq_length=512)  # fmt: skip
    model.save_pretrained(root / "saved", save_compressed=True)  # llm-compressor's flag: harmless
    processor.save_pretrained(root / "saved")
    reference = calibrate(tiny_qwen_dir, samples, root / "calibrated", method="rtn", scheme="w4a4",
                          num_samples=2, max_seq_len=512)  # fmt: skip
    return model, returned, root / "saved", reference


def test_a_model_object_is_calibrated_in_place(object_run, tiny_qwen_dir):
    model, returned, saved, reference = object_run
    assert returned is model
    assert sum(isinstance(m, SplitQLinearModule) for m in model.modules()) == 14
    assert model.config.quantization_config.to_dict()["calibration"]["settings"]["num_samples"] == 2
    _same_checkpoint(saved, reference)  # save_pretrained wrote what calibrate writes
    assert torch.equal(_logits(model, tiny_qwen_dir), _logits(load_quantized_model(reference, dtype=torch.bfloat16), tiny_qwen_dir))


@pytest.mark.vllm
def test_the_saved_model_and_processor_are_served_by_vllm(object_run):
    from tests.helpers.engine import OpenAIServer
    from tests.plugin.generation import server_args

    _, _, saved, _ = object_run
    with OpenAIServer(saved, server_args()) as server:
        reply = server.client().chat.completions.create(
            model=server.model, max_tokens=4, temperature=0.0,
            messages=[{"role": "user", "content": [{"type": "text", "text": "What colour is the shape?"}]}],
        )  # fmt: skip
        assert reply.usage.completion_tokens > 0
        assert "SplitQ:" in server.logs()  # the plugin loaded it as a SplitQ checkpoint


def test_a_path_with_an_llm_compressor_recipe_and_output_dir(tiny_qwen_dir, samples, tmp_path):
    out = tmp_path / "out"
    model = oneshot(model=str(tiny_qwen_dir), dataset=iter(samples), recipe=STAGED, output_dir=out,
                    num_calibration_samples=2, max_seq_length=512)  # fmt: skip
    settings = read_checkpoint(out).quant_config.calibration["settings"]
    assert (settings["method"], settings["scheme"], settings["num_samples"]) == ("rtn", "w4a4", 2)
    assert torch.equal(_logits(model, tiny_qwen_dir), _logits(load_quantized_model(out, dtype=torch.bfloat16), tiny_qwen_dir))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no scratch left behind


def test_a_hub_id_that_cannot_be_fetched_is_named(tmp_path):
    code = (
        "from splitq_calibration import oneshot\n"
        "try:\n"
        "    oneshot(model='no-such-org/no-such-model', dataset=[{'image': None, 'caption': 'x'}])\n"
        "except Exception as e:\n"
        "    print(type(e).__name__, e)\n"
    )
    env = {"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path), "PATH": "/usr/bin:/bin"}
    import os

    env["PYTHONPATH"] = os.environ.get("PYTHONPATH", "")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert out.stdout.startswith("CalibrationError model no-such-org/no-such-model: not a local directory, "
                                 "and fetching it from the Hugging Face Hub failed"), out.stdout + out.stderr  # fmt: skip


def test_a_model_object_without_a_processor_is_refused(tiny_qwen_dir, samples, tmp_path):
    """A model whose folder has no processor files (built from a bare config.json)."""
    import shutil

    from transformers import AutoConfig

    shutil.copy(tiny_qwen_dir / "config.json", tmp_path / "config.json")
    fresh = AutoModelForImageTextToText.from_config(AutoConfig.from_pretrained(tmp_path))
    with pytest.raises(CalibrationError, match=r"oneshot\(model=<Qwen2_5_VLForConditionalGeneration>\): pass processor="):
        oneshot(model=fresh, dataset=samples)


def test_recipes_in_llm_compressors_shape(tmp_path, capsys):
    staged = tmp_path / "staged.yaml"
    staged.write_text(STAGED)
    cfg = load_recipe(staged)  # what --recipe and calibrate(recipe=...) read
    assert (cfg.scheme, cfg.method) == ("w4a4", "rtn")
    assert calibrate_main(["--recipe", str(staged), "--dump-recipe"]) == 0 and "method: rtn" in capsys.readouterr().out
    for recipe in (STAGED, [SplitQModifier(scheme="w4a4", method="rtn")], {"splitq": {"scheme": "w4a4", "method": "rtn"}}):
        assert (resolve_recipe(recipe).scheme, resolve_recipe(recipe).method) == ("w4a4", "rtn")
    assert isinstance(resolve_recipe(None), CalibrationConfig)


@pytest.mark.parametrize(
    "recipe, message",
    [
        (STAGED.replace("SplitQModifier", "GPTQModifier"), r"modifiers \['GPTQModifier'\]: splitq-calibrate runs one SplitQModifier"),
        (STAGED + "    SmoothQuantModifier: {}\n", r"modifiers \['SplitQModifier', 'SmoothQuantModifier'\]"),
        (STAGED.replace("[Linear]", "[Linear, Embedding]"), r"targets: SplitQ quantizes the language model's decoder linears"),
        (STAGED.replace("method: rtn", "metod: rtn"), r"unknown setting\(s\) metod"),
        ([object()], r"modifiers \['object'\]"),
        ({"GPTQModifier": {"scheme": "W4A16"}}, r"unknown setting\(s\) GPTQModifier"),
    ],
    ids=["other-modifier", "two-modifiers", "targets", "typo", "python-object", "flat"],
)  # fmt: skip
def test_other_recipes_are_refused_with_the_expected_shape(recipe, message):
    with pytest.raises(RecipeError, match=message) as err:
        resolve_recipe(recipe)
    if "targets" not in message:
        assert "quant_stage:\n      quant_modifiers:\n        SplitQModifier:" in str(err.value)
