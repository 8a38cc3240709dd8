"""`make demo`'s script end to end: calibrate the bundled model, serve it with vLLM's OpenAI server,
ask held-out questions through the openai client, stop the server."""

import json
import subprocess
import sys

import pytest

from tests.helpers.engine import vllm_env
from tests.helpers.paths import BUNDLED_MODEL, EXAMPLES

DEMO = EXAMPLES / "demo.py"


@pytest.mark.vllm
def test_demo_calibrates_serves_and_answers(tmp_path):
    ckpt = tmp_path / "toyvqa-splitq-w4a4"
    env = vllm_env({"XDG_CACHE_HOME": str(tmp_path / "cache")})  # the pictures and data it caches
    proc = subprocess.run(
        [sys.executable, str(DEMO), "--output", str(ckpt), "--questions", "4"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=1500,
    )  # fmt: skip
    out = proc.stdout
    print(out[-6000:], proc.stderr[-3000:])
    assert proc.returncode == 0, proc.stderr[-6000:]
    # a W4A4 SplitQ checkpoint was written by the calibration the demo ran
    qc = json.loads((ckpt / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "splitq" and (qc["weight_bits"], qc["act_bits"]) == (4, 4), qc
    assert list(ckpt.glob("*.safetensors")) and "layer 4/4" in proc.stderr + out
    # four held-out questions, each printed with its answer and verdict; most of them right
    assert out.count("  Q: ") == 4 and out.count("  A: ") == 4
    assert len(list((tmp_path / "cache" / "splitq-vllm" / "demo" / "pictures").glob("*.png"))) == 4
    verdicts = [line.rsplit("-> ", 1)[1] for line in out.splitlines() if line.strip().startswith("expected:")]
    assert len(verdicts) == 4 and verdicts.count("right") >= 3, verdicts
    # the 16-bit baseline it prints is the bundled model's own record, not a figure in the script
    test = json.loads((BUNDLED_MODEL / "training_log.json").read_text())["test_bf16_transformers"]
    assert f"answers {test['accuracy']:.2f} of the {test['n']:,} test questions" in out
    assert "server stopped." in out
    assert "make demo MODEL=/path/to/Qwen2.5-VL-7B-Instruct" in out


def test_demo_names_a_bad_model_directory(tmp_path):
    proc = subprocess.run([sys.executable, str(DEMO), "--model", str(tmp_path)], cwd=tmp_path, env=vllm_env(),
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert proc.returncode == 2
    assert str(tmp_path) in proc.stderr and "config.json" in proc.stderr
