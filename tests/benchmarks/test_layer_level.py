"""The layer-level benchmark runs (quick mode) and its synthetic data has the structure it claims."""

import importlib.util
import sys

import torch

from tests.helpers.paths import BENCHMARKS

SCRIPT = BENCHMARKS / "layer_level.py"


def _module():
    spec = importlib.util.spec_from_file_location("layer_level", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    sys.modules["layer_level"] = mod  # dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


def test_synthetic_activations_have_the_fig2_structure():
    mod = _module()
    data = mod.make_data(200, 2, 64, 32, torch.Generator().manual_seed(0))
    x, m = torch.cat(data.x), torch.cat(data.text_mask)
    vis, txt = data.vision_channels, data.text_channels
    assert set(vis.tolist()).isdisjoint(txt.tolist())
    # vision rows: the planted channels dominate by magnitude, on vision rows only
    v_absmax = x[~m].abs().amax(0)
    assert set(torch.topk(v_absmax, len(vis)).indices.tolist()) == set(vis.tolist())
    assert float(x[m][:, vis].abs().amax()) < float(x[~m][:, vis].abs().amax()) / 5
    # text rows: the planted channels' magnitudes spread over orders of magnitude (unstable ranks)
    spread = lambda cols: x[m][:, cols].abs().log().std(0).mean()  # noqa: E731
    others = torch.tensor([c for c in range(200) if c not in set(vis.tolist()) | set(txt.tolist())])
    assert float(spread(txt)) > 2 * float(spread(others))


def test_quick_run_scores_every_method_and_splitq_beats_rtn(tmp_path):
    result = _module().main(["--quick", "--json", str(tmp_path / "out.json"), "--markdown", str(tmp_path / "t.md")])
    rows = {r["method"]: r for r in result["rows"]}
    assert set(rows) == {"rtn", "splitq"}
    for r in rows.values():
        assert 0 < r["text"] < 10 and 0 < r["vision"] < 10
    assert rows["splitq"]["all"] < rows["rtn"]["all"]
    assert (tmp_path / "out.json").is_file() and "| W4A4 |" in (tmp_path / "t.md").read_text()
