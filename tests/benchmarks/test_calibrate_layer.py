"""benchmarks/calibrate_layer.py in its quick CPU mode: the script that times one Qwen2.5-VL-7B
decoder layer on a GPU runs end to end (reduced shapes) and reports what BENCHMARKS.md needs."""

import importlib.util
import json

import pytest

from tests.helpers.paths import BENCHMARKS

pytestmark = pytest.mark.usefixtures("single_thread")  # tests/conftest.py


SCRIPT = BENCHMARKS / "calibrate_layer.py"


def test_quick_mode_reports_time_memory_and_projection(tmp_path):
    spec = importlib.util.spec_from_file_location("calibrate_layer_bench", SCRIPT)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    assert bench.QWEN25VL_7B["hidden_size"] == 3584 and bench.QWEN25VL_7B["intermediate_size"] == 18944
    out = tmp_path / "bench.json"
    result = bench.main(["--quick", "--epochs", "2", "--json", str(out)])
    assert json.loads(out.read_text()) == result
    assert result["layer_s"] > 0 and abs(result["projected_model_s"] - result["layer_s"] * 28) < 28 * 0.01
    assert 0 < result["epoch_s_mean"] * 2 < result["layer_s"]
    assert result["cpu_peak_rss_mb"] > 0 and result["device"].startswith("cpu")
    assert result["final_loss"] < result["init_loss"]  # two epochs of training help
