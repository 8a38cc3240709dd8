"""splitq-inspect (the paper's Fig. 2 as a PNG) and splitq-eval (scoring a checkpoint in
transformers on image questions)."""

import json

import pytest
from PIL import Image

from splitq_calibration import calibrate
from splitq_calibration.cli import eval_main, inspect_main
from splitq_calibration.errors import CalibrationError
from splitq_calibration.evaluate import _normalise, score_questions
from splitq_calibration.inspect_channels import inspect_layer
from splitq_calibration.recipe import CalibrationConfig
from splitq_vllm.testing.images import write_sharegpt

pytestmark = pytest.mark.usefixtures("single_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_sharegpt(tmp_path_factory.mktemp("inspect-data"), n=6)


@pytest.fixture(scope="module")
def ckpt(tiny_qwen_dir, data, tmp_path_factory):
    return calibrate(
        tiny_qwen_dir, data, tmp_path_factory.mktemp("ck") / "w4a4", method="mocd", epochs=0, num_samples=6
    )


def test_inspect_plots_and_marks_the_channels_calibration_picks(tiny_qwen_dir, data, ckpt, tmp_path, capsys):
    png = tmp_path / "fig2.png"
    assert (
        inspect_main(
            [
                "--model",
                str(tiny_qwen_dir),
                "--data",
                str(data),
                "--layer",
                "1",
                "--group",
                "gate_up",
                "--output",
                str(png),
                "--num-samples",
                "6",
                "-q",
            ]
        )
        == 0
    )
    assert capsys.readouterr().out.strip() == str(png)
    with Image.open(png) as im:
        assert im.format == "PNG" and im.size[0] > 800 and im.size[1] > 500
    cfg = CalibrationConfig(num_samples=6)
    picked = inspect_layer(tiny_qwen_dir, data, 1, "gate_up", tmp_path / "again.png", cfg)
    stored = inspect_layer(tiny_qwen_dir, data, 1, "gate_up", tmp_path / "ckpt.png", cfg, checkpoint=ckpt)
    # MOCD on the inspected activations picks exactly what calibration stored for that layer
    assert (picked["text_channels"], picked["vision_channels"]) == (stored["text_channels"], stored["vision_channels"])
    assert picked["n_vision"] == 6 * 16 and len(picked["vision_channels"]) > 0 and len(picked["text_channels"]) > 0
    top_vision = sorted(range(len(picked["vision_absmax"])), key=lambda c: -picked["vision_absmax"][c])
    assert sorted(picked["vision_channels"]) == sorted(top_vision[: len(picked["vision_channels"])])  # Eq. 7-8
    with pytest.raises(CalibrationError, match="decoder layers 0..1"):
        inspect_layer(tiny_qwen_dir, data, 5, "qkv", tmp_path / "x.png", cfg)


def test_score_questions_on_checkpoint_and_fp(tiny_qwen_dir, data, ckpt, tmp_path, capsys):
    qs = tmp_path / "questions.jsonl"
    qs.write_text(
        "".join(
            json.dumps(q) + "\n"
            for q in [
                {"id": "q1", "image": "images/img00.png", "question": "What colour is the shape?", "answer": "red"},
                {"id": "q2", "image": "images/img01.png", "question": "What shape is it?"},
            ]
        )
    )
    (tmp_path / "images").symlink_to(data.parent / "images")
    for model in (ckpt, tiny_qwen_dir):
        result = score_questions(model, qs, max_new_tokens=4, device="cpu")
        assert [a["id"] for a in result["answers"]] == ["q1", "q2"]
        assert all(isinstance(a["prediction"], str) for a in result["answers"])
        assert result["scored"] == 1 and result["accuracy"] in (0.0, 1.0)
        assert "correct" not in result["answers"][1]
    out = tmp_path / "answers.json"
    assert (
        eval_main(["--model", str(ckpt), "--questions", str(qs), "--max-new-tokens", "3", "--output", str(out), "-q"])
        == 0
    )
    assert "accuracy" in capsys.readouterr().out and json.loads(out.read_text())["scored"] == 1


def test_relaxed_answer_match():
    assert _normalise("The shape is RED.") == "the shape is red"
    assert _normalise("red") in _normalise("I think it's red!")
    assert _normalise("New Hampshire") in _normalise("It is New  Hampshire.")
    assert _normalise("blue") not in _normalise("red")
