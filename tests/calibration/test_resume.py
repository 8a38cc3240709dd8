"""A real `splitq-calibrate` process killed mid-run and restarted with the same arguments finishes
the remaining layers and writes a checkpoint identical to an uninterrupted run's: every tensor byte and every file byte,
except the order of the two keys of the safetensors `__metadata__` map (see safetensors_content)."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from splitq_vllm.testing.images import write_sharegpt
from splitq_vllm.testing.models import TinySize, build_tiny_qwen25vl

CLI = str(Path(sys.executable).with_name("splitq-calibrate"))


def _env():
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    return env


def _cmd(model, data, out, *extra):
    return [
        CLI,
        "--model",
        str(model),
        "--data",
        str(data),
        "--output",
        str(out),
        "--scheme",
        "w3a3",
        "--num-samples",
        "6",
        "--batch-size",
        "2",
        "--epochs",
        "4",
        *extra,
    ]


def test_killed_run_resumes_to_an_identical_checkpoint(tmp_path):
    model = build_tiny_qwen25vl(tmp_path / "tiny-qwen-4l", size=TinySize(layers=4))
    data = write_sharegpt(tmp_path / "data", n=6)
    cwd = tmp_path

    full = tmp_path / "full"
    done = subprocess.run(_cmd(model, data, full), cwd=cwd, env=_env(), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]

    out = tmp_path / "resumed"
    work = out.with_name(out.name + ".partial")
    proc = subprocess.Popen(_cmd(model, data, out), cwd=cwd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + 600
    while not (work / "layer_00001.safetensors").exists():
        assert proc.poll() is None, "the run ended before it could be killed"
        assert time.time() < deadline
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    finished = sorted(p.name for p in work.glob("layer_*.safetensors"))
    assert proc.returncode == -signal.SIGKILL
    assert "layer_00003.safetensors" not in finished, "killed too late to test anything"
    assert not out.exists()  # (a kill during a layer's write may leave a .tmp file: ignored on resume)

    # other settings refuse to reuse the unfinished run
    other = subprocess.run(
        _cmd(model, data, out, "--epochs", "2"), cwd=cwd, env=_env(), capture_output=True, text=True, timeout=600
    )
    assert other.returncode == 2 and "different settings (epochs)" in other.stderr and "--restart" in other.stderr

    again = subprocess.run(_cmd(model, data, out), cwd=cwd, env=_env(), capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resuming" in again.stderr and "layer 1/4: done earlier" in again.stderr
    assert not work.exists()
    names = sorted(p.name for p in full.iterdir())
    assert names == sorted(p.name for p in out.iterdir())
    for name in names:  # byte for byte, safetensors files included
        assert (full / name).read_bytes() == (out / name).read_bytes(), name

