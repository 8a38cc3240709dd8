"""The layer-level benchmark runs (quick mode) and its synthetic data has the structure it claims."""

import importlib.util
import sys

import pytest
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


def test_quick_run_of_the_baselines_scores_masquant_in_full_and_as_its_checkpoint(tmp_path):
    result = _module().main(["--d", "96", "--samples", "4", "--epochs", "1", "--schemes", "w4a4", "--no-ablations",
                             "--methods", "rtn,mbq,masquant,vlmq"])  # the --quick sizes
    rows = {r["method"]: r for r in result["rows"]}
    assert set(rows) == {"rtn", "mbq", "masquant", "masquant_full", "vlmq"}
    for r in rows.values():
        assert 0 < r["text"] < 10 and 0 < r["vision"] < 10
    # the text rows of MASQuant's full Eq. 29 are its checkpoint's (the text-smoothed base); the
    # vision rows gain the vision smoothing and the CMC correction the format cannot hold
    assert rows["masquant_full"]["text"] == pytest.approx(rows["masquant"]["text"], rel=1e-5)
    assert rows["masquant_full"]["vision"] < 0.5 * rows["masquant"]["vision"]
    assert rows["mbq"]["all"] < rows["rtn"]["all"]  # the vision outliers are smoothed away
