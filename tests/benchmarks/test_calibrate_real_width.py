"""benchmarks/calibrate_real_width.py end to end at tiny widths: the same script, the real
splitq-calibrate CLI in a subprocess, a scaled-down published spec (or a tiny model directory)."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from splitq_vllm.checkpoint import read_checkpoint
from tests.helpers.engine import vllm_env
from tests.helpers.paths import BENCHMARKS

SCRIPT = BENCHMARKS / "calibrate_real_width.py"


def _module():
    spec = importlib.util.spec_from_file_location("calibrate_real_width", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _run(tmp_path: Path, *args: str, ok: bool = True, timeout: int = 300, env=None) -> tuple[dict, str]:
    out = tmp_path / "out.json"
    cmd = [
        sys.executable,
        str(SCRIPT),
        "--work",
        str(tmp_path / "work"),
        "--json",
        str(out),
        "--device",
        "cpu",
        "-q",
        *args,
    ]
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=timeout,
                          env=env or {**os.environ, "OMP_NUM_THREADS": "1"})  # fmt: skip
    assert (proc.returncode == 0) == ok, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(out.read_text()), proc.stdout


def test_builds_calibrates_and_reports_a_scaled_down_published_model(tmp_path):
    res, stdout = _run(tmp_path, "--model", "tiny-qwen2.5-vl", "--layers", "2", "--samples", "2", "--tokens", "96",
                       "--epochs", "1", "--plot", str(tmp_path / "rss.png"))  # fmt: skip
    assert res["built"] and res["returncode"] == 0
    assert res["layers_done"] == 2 and [r["index"] for r in res["layers"]] == [0, 1]
    for r in res["layers"]:
        assert r["init_s"] >= 0 and len(r["epoch_s"]) == 1 and r["peak_rss_gb"] > 0.1
    assert 0.1 < res["peak_rss_gb"] < 6
    assert 72 <= res["tokens_per_sample"] <= 120  # about --tokens: a 224 px image (64 tokens) and a caption
    assert res["image_tokens_per_sample"] == 64 and res["image_side"] == 224
    assert res["checkpoint_gb"] < res["bf16_gb"]
    assert res["quantized_layers_checkpoint_gb"] < 0.6 * res["quantized_layers_bf16_gb"]
    assert {"cpu", "cores", "ram_gb"} <= set(res["machine"]) and res["date"] and len(res["load_avg"]["start"]) == 3
    assert "splitq_calibration.cli" in res["calibrate_command"] and "--report" in res["calibrate_command"]
    assert "| layer | init s |" in stdout and "peak host RSS" in stdout
    assert (tmp_path / "rss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    work = tmp_path / "work"
    assert all(p.read_bytes()[:4] == b"\x89PNG" for p in (work / "data" / "images").iterdir())
    read_checkpoint(work / "checkpoint").validate()  # the CLI's checkpoint, complete and readable

    # a second run reuses the model directory; another model under the same name is refused
    again, _ = _run(tmp_path, "--model", "tiny-qwen2.5-vl", "--samples", "2", "--tokens", "64", "--method", "rtn")
    assert not again["built"] and again["layers_done"] == 2
    proc = subprocess.run([sys.executable, str(SCRIPT), "--work", str(work), "--model", "tiny-llava-1.5"],
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert proc.returncode != 0 and "holds a qwen2_5_vl model" in proc.stderr


def test_a_tiny_model_directory_and_a_failing_run(tmp_path, tiny_llava_dir):
    """--model-dir takes any model directory as it is (LLaVA: its tower's image tokens, here
    (56 / 14)^2 = 16); a run the CLI rejects still writes the JSON, with its exit code, and fails."""
    res, _ = _run(tmp_path, "--model-dir", str(tiny_llava_dir), "--samples", "2", "--tokens", "10", "--method", "rtn")
    assert res["image_tokens_per_sample"] == 16 and res["layers_done"] == 2 and not res["built"]
    bad, _ = _run(tmp_path, "--model-dir", str(tiny_llava_dir), "--samples", "2", "--scheme", "w9a9", ok=False)
    assert bad["returncode"] != 0 and bad["layers_done"] == 0 and bad["layers"] == []
    assert "checkpoint_gb" not in bad


def test_layer_rows_read_old_and_new_reports():
    m = _module()
    sampler = m.TreeSampler(lambda: None)
    sampler.samples = [(0.5, 1_000_000_000), (1.5, 3_000_000_000), (2.5, 2_000_000_000)]
    old = {"layers": {"0": {"seconds": 5.0, "epoch_seconds": [1.0, 2.0]}}}
    (row,) = m.layer_rows(old, {0: 2.0}, sampler)
    assert (row["init_s"], row["init_approx"], row["epoch_s"], row["peak_rss_gb"]) == (2.0, True, [1.0, 2.0], 3.0)
    new = {"layers": {"1": {"seconds": 5.0, "epoch_seconds": [1.0], "init_s": 0.5, "load_s": 0.1, "train_s": 1.2},
                      "0": {"seconds": 1.0, "epoch_seconds": [0.2], "init_s": 0.3}}}  # fmt: skip
    rows = m.layer_rows(new, {0: 1.0, 1: 3.0}, sampler)
    assert [r["index"] for r in rows] == [0, 1]
    assert rows[1]["init_s"] == 0.5 and not rows[1]["init_approx"] and rows[1]["load_s"] == 0.1
    assert rows[0]["peak_rss_gb"] == 1.0 and rows[1]["peak_rss_gb"] == 3.0  # RSS peak inside each layer's window
    # no report at all (the run was killed): the layers its log says finished
    (killed,) = m.layer_rows(None, {0: 1.0}, sampler)
    assert killed["init_s"] is None and killed["epoch_s"] == []


@pytest.mark.vllm
@pytest.mark.timeout(1200)
def test_serve_answers_a_chat_with_an_image(tmp_path):
    """The whole path at tiny width: build_published -> splitq-calibrate -> vLLM's OpenAI server
    (bf16, reference backend) -> one chat with a picture through the openai client."""
    env = vllm_env({"VLLM_CACHE_ROOT": str(tmp_path / "vllm-cache"), "OMP_NUM_THREADS": "1"})
    res, stdout = _run(tmp_path, "--model", "tiny-qwen2.5-vl", "--samples", "2", "--tokens", "64", "--method",
                       "rtn", "--serve", timeout=1100, env=env)  # fmt: skip
    s = res["serve"]
    assert "error" not in s, s
    assert isinstance(s["answer"], str) and s["startup_s"] > 0 and s["peak_rss_gb"] > 0.5
    assert s["prompt_tokens"] > 64 and s["backend"] == "reference"  # a 224 px picture is 64 image tokens
    assert "served: start-up" in stdout
