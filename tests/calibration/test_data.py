"""Calibration data: the three sources through the model's processor and chat template, the text
mask, and a clear message (naming the sample) for every kind of broken input."""

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, AutoProcessor

from splitq_calibration.cli import calibrate_main
from splitq_calibration.data import CalibrationDataError, prepare_samples
from splitq_vllm.model_layout import vision_token_ids
from splitq_vllm.testing.images import captioned_images, draw_image, write_folder, write_sharegpt

pytestmark = pytest.mark.usefixtures("single_thread")  # tests/conftest.py


@pytest.fixture(scope="module", params=["qwen", "llava"])
def model(request, tiny_qwen_dir, tiny_llava_dir):
    path = tiny_qwen_dir if request.param == "qwen" else tiny_llava_dir
    return path, AutoProcessor.from_pretrained(path), AutoConfig.from_pretrained(path)


def _prep(model, data, **kw):
    _, processor, config = model
    return prepare_samples(data, processor, config, **kw)


def test_sharegpt_jsonl_through_the_chat_template(model, tmp_path):
    path, processor, config = model
    data = write_sharegpt(tmp_path, n=6)
    samples = _prep(model, data, num_samples=4, seed=0)
    assert len(samples) == 4
    vids = vision_token_ids(config)
    for s in samples:
        ids = s.inputs["input_ids"][0]
        assert s.text_mask.shape == ids.shape
        assert torch.equal(~s.text_mask, torch.isin(ids, torch.tensor(vids)))
        assert s.num_vision_tokens == 16  # one 112x112 (Qwen) / 56x56 (LLaVA) image
        assert "background" in processor.decode(ids)  # the caption is the assistant turn
    # the seed picks (and orders) the samples
    again = _prep(model, data, num_samples=4, seed=0)
    other = _prep(model, data, num_samples=6, seed=1)
    assert [s.id for s in samples] == [s.id for s in again]
    assert sorted(s.id for s in other) == [f"sample-{i}" for i in range(6)]
    assert [s.id for s in other][:4] != [s.id for s in samples]


def test_json_list_with_an_image_dir(model, tmp_path):
    data = write_sharegpt(tmp_path / "a", n=3, name="calib.json", image_subdir=".")
    moved = tmp_path / "b" / "calib.json"
    moved.parent.mkdir()
    moved.write_text(data.read_text())
    with pytest.raises(CalibrationDataError, match="not found"):
        _prep(model, moved)
    assert len(_prep(model, moved, image_dir=tmp_path / "a")) == 3


@pytest.mark.parametrize("sidecar", [True, False])
def test_folder_of_captioned_images(model, tmp_path, sidecar):
    folder = write_folder(tmp_path / "imgs", n=3, sidecar=sidecar)
    samples = _prep(model, folder, prompt="Describe the picture.")
    assert sorted(s.id for s in samples) == ["img00.png", "img01.png", "img02.png"]
    _, processor, _ = model
    text = processor.decode(samples[0].inputs["input_ids"][0])
    assert "Describe the picture." in text and "background" in text


def test_python_list_of_samples(model, tmp_path):
    (_, img, cap), (_, img2, _) = captioned_images(2)
    data = [
        {"id": "pil", "image": img, "caption": cap},
        {
            "id": "msgs",
            "messages": [
                {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What colour?"}]},
                {"role": "assistant", "content": [{"type": "text", "text": "Red."}]},
            ],
            "images": [img2],
        },
        {"id": "text-only", "prompt": "Hello!", "caption": "The answer is yes."},
    ]
    samples = {s.id: s for s in _prep(model, data)}
    assert samples["pil"].num_vision_tokens == 16 and samples["msgs"].num_vision_tokens == 16
    assert samples["text-only"].num_vision_tokens == 0


# ---- broken input --------------------------------------------------------------------------


def _one_bad(tmp_path, bad: dict) -> Path:
    data = write_sharegpt(tmp_path, n=2)
    lines = data.read_text().splitlines() + [json.dumps(bad)]
    data.write_text("\n".join(lines) + "\n")
    return data


def _bad_record(image: str, sid: str = "bad-one") -> dict:
    return {
        "id": sid,
        "image": image,
        "conversations": [{"from": "human", "value": "<image>\nHi"}, {"from": "gpt", "value": "x"}],
    }


def test_missing_image_names_the_sample(model, tmp_path):
    data = _one_bad(tmp_path, _bad_record("images/nope.png"))
    with pytest.raises(
        CalibrationDataError, match=r"sample 2 \(id 'bad-one' in .*calib.jsonl\): image file .*nope.png not found"
    ):
        _prep(model, data)


def test_unreadable_image_names_the_sample(model, tmp_path):
    data = _one_bad(tmp_path, _bad_record("images/broken.png"))
    (tmp_path / "images" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nthis is not an image")
    with pytest.raises(CalibrationDataError, match=r"id 'bad-one'.*cannot read image .*broken.png"):
        _prep(model, data)


def test_empty_data_sets(model, tmp_path):
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(CalibrationDataError, match="no samples"):
        _prep(model, tmp_path / "empty.jsonl")
    (tmp_path / "nothing").mkdir()
    with pytest.raises(CalibrationDataError, match="no samples"):
        _prep(model, tmp_path / "nothing")
    with pytest.raises(CalibrationDataError, match="no samples"):
        _prep(model, [])
    with pytest.raises(CalibrationDataError, match="no such file"):
        _prep(model, tmp_path / "missing.jsonl")


def test_too_long_sample_names_the_sample(model, tmp_path):
    data = write_sharegpt(tmp_path, n=1)
    with pytest.raises(CalibrationDataError, match=r"id 'sample-0'.*\d+ tokens, longer than max_seq_len 20"):
        _prep(model, data, max_seq_len=20)


def test_malformed_records(model, tmp_path):
    data = _one_bad(
        tmp_path,
        {
            "id": "two-tags",
            "image": "images/img00.png",
            "conversations": [{"from": "human", "value": "<image><image>Hi"}, {"from": "gpt", "value": "x"}],
        },
    )
    with pytest.raises(CalibrationDataError, match="two-tags.*2 <image> tag"):
        _prep(model, data)
    folder = write_folder(tmp_path / "f", n=2)
    draw_image().save(folder / "uncaptioned.png")
    with pytest.raises(CalibrationDataError, match="uncaptioned.png.*no caption"):
        _prep(model, folder)


def test_skip_bad_samples_with_a_warning(model, tmp_path):
    data = _one_bad(tmp_path, _bad_record("images/nope.png"))
    with pytest.warns(UserWarning, match=r"skipping sample 2 \(id 'bad-one'.*not found"):
        samples = _prep(model, data, on_bad_sample="skip")
    assert sorted(s.id for s in samples) == ["sample-0", "sample-1"]
    only_bad = tmp_path / "bad.jsonl"
    only_bad.write_text(json.dumps(_bad_record("images/nope.png")) + "\n")
    with pytest.warns(UserWarning), pytest.raises(CalibrationDataError, match=r"no usable samples \(1 skipped\)"):
        _prep(model, only_bad, on_bad_sample="skip")


def test_cli_reports_bad_input_by_name(tiny_qwen_dir, tmp_path, capsys):
    data = _one_bad(tmp_path, _bad_record("images/nope.png"))
    rc = calibrate_main(["--model", str(tiny_qwen_dir), "--data", str(data), "--output", str(tmp_path / "out"), "-q"])
    assert rc == 2
    err = capsys.readouterr().err
    assert "splitq-calibrate: error:" in err and "'bad-one'" in err and "nope.png not found" in err
    assert not (tmp_path / "out").exists()
