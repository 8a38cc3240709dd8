"""A training run checkpoints into OUTPUT.partial/ and the same command resumes it: the resumed
run ends with exactly the weights of an uninterrupted one, and only a finished model reaches
OUTPUT."""

import json

import pytest
import torch
from safetensors.torch import load_file

from splitq_toyvqa import checkpoint, data, train

TINY = ["--data-version", "2", "--vision-steps", "3", "--vision-batch-size", "3", "--align-steps", "2",
        "--align-batch-size", "3", "--steps", "4", "--batch-size", "3", "--val-n", "4", "--test-n", "4",
        "--eval-every", "2", "--vision-word-target", "picture", "--vision-centre-head", "--vision-aux-weight", "0.5",
        "--checkpoint-every", "1"]  # fmt: skip


class Interrupt(Exception):
    pass


def interrupting(fn, at_index):
    """`fn` (a data stream) that stops the run when asked for item `at_index`, as a kill would."""

    position = 1 if fn is data.make_conversation else 0  # (split, index, ...) or (index, ...)

    def draw(*args, **kwargs):
        index = args[position]
        if index == at_index:
            raise Interrupt
        return fn(*args, **kwargs)

    return draw


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    out = tmp_path_factory.mktemp("straight") / "model"
    train.main(["--output", str(out), *TINY])
    return out


@pytest.mark.parametrize("stream, at_index, stage", [("make_picture", 3, "vision"), ("make_conversation", 6, "questions")])
def test_an_interrupted_run_resumes_to_the_weights_of_an_uninterrupted_one(straight, tmp_path, monkeypatch, stream, at_index, stage):
    out = tmp_path / "model"
    with monkeypatch.context() as m:
        m.setattr(data, stream, interrupting(getattr(data, stream), at_index))
        with pytest.raises(Interrupt):
            train.main(["--output", str(out), *TINY])
    assert not out.exists()  # nothing half-done where the model is expected
    saved = torch.load(out.with_name("model.partial") / "checkpoint.pt", weights_only=False)
    assert saved["stage"] == stage and saved["progress"][stage]["step"] == (1 if stage == "vision" else 2)
    train.main(["--output", str(out), *TINY, "--threads", "1"])
    a, b = load_file(straight / "model.safetensors"), load_file(out / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    log, ref = (json.loads((d / "training_log.json").read_text()) for d in (out, straight))
    assert log["resumed"] == 1 and "resumed" not in ref
    for key in ("history", "vision_history", "vision_aux_history", "align_history"):
        assert [{k: v for k, v in r.items() if k != "time_s"} for r in log[key]] == \
            [{k: v for k, v in r.items() if k != "time_s"} for r in ref[key]], key
    assert log["test_bf16_transformers"] == ref["test_bf16_transformers"]
    assert not out.with_name("model.partial").exists()  # cleaned up


def test_a_checkpoint_of_another_command_is_refused_by_name(tmp_path, monkeypatch, capsys):
    out = tmp_path / "model"
    with monkeypatch.context() as m:
        m.setattr(data, "make_picture", interrupting(data.make_picture, 4))
        with pytest.raises(Interrupt):
            train.main(["--output", str(out), *TINY])
    with pytest.raises(SystemExit):
        train.main(["--output", str(out), *TINY, "--lr", "0.002"])
    err = capsys.readouterr().err
    assert "--lr 0.001 (now 0.002)" in err and "checkpoint.pt" in err


def test_an_unreadable_checkpoint_is_named_and_kept(tmp_path):
    run = checkpoint.RunFolder(tmp_path / "model")
    run.dir.mkdir()
    run.path.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="checkpoint.pt: not a readable training checkpoint"):
        run.load({})
    assert run.path.exists()


def test_finishing_replaces_the_old_model_and_removes_the_working_folder(tmp_path):
    run = checkpoint.RunFolder(tmp_path / "model")
    run.output.mkdir()
    (run.output / "old.txt").write_text("old")
    run.save({"args": {}})
    (run.fresh_model_dir() / "new.txt").write_text("new")
    assert run.finish() == run.output
    assert [p.name for p in run.output.iterdir()] == ["new.txt"] and not run.dir.exists()
    assert not run.output.with_name("model.old").exists()
