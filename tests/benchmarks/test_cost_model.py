"""benchmarks/cost_model.py: the roofline model's arithmetic on every real linear (no GPU; the
figures it predicts are compared with gpu_check.sh's measurements in BENCHMARKS.md)."""

from __future__ import annotations

import importlib.util
import json
import sys

import pytest
from splitq_kernels.triton.aot import MODEL_SHAPES

from tests.helpers.paths import BENCHMARKS


def _load():
    spec = importlib.util.spec_from_file_location("cost_model", BENCHMARKS / "cost_model.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["cost_model"] = mod  # dataclasses look their module up
    spec.loader.exec_module(mod)
    return mod


cm = _load()


def test_every_linear_of_every_model_is_predicted():
    assert {n.split(".")[0] for n in MODEL_SHAPES} == {"3b", "7b", "72b"}
    res = cm.table(["3b", "7b", "72b"], [1, 16, 256, 2048], list(cm.HARDWARE), list(cm.DESIGNS))
    assert len(res) == 12 * 4 * len(cm.HARDWARE) * len(cm.DESIGNS)
    for r in res:
        for v in cm.VARIANTS:
            x = r["variants"][v]
            assert x["s"] > 0 and x["bytes"] > 0 and x["ratio_to_bf16"] > 0
            for L in x["launches"]:
                assert L["s"] >= cm.LAUNCH_S and L["bound"].split(" (")[-1].strip(")") in ("memory", "mma", "cuda")


@pytest.mark.parametrize("layer", ["7b.qkv", "72b.down"])
@pytest.mark.parametrize("rows", [1, 2048])
def test_bytes_and_operations_follow_the_shapes(layer, rows):
    d_in, d_out = MODEL_SHAPES[layer]
    s = cm.Shape.of(d_in, d_out)
    assert s.main + s.text + s.vision == d_in and s.n1 * s.n2 == s.main and s.main % 64 == 0
    r = cm.predict(layer, rows, "h200", "current")["variants"]
    bf = r["bf16"]["launches"][0]
    assert bf["bytes"] == 2 * d_in * d_out + 2 * rows * (d_in + d_out)
    assert bf["mma_bf16"] == 2 * rows * d_in * d_out
    gemm = r["w4a4_gemm"]["launches"][0]
    assert s.main * d_out / 2 < gemm["bytes"] < 1.05 * s.main * d_out / 2 + 4 * rows * (d_in + d_out)
    # full SplitQ moves at least the W4A4 GEMM's bytes plus the outlier weights and low-rank factors
    assert r["splitq"]["bytes"] > gemm["bytes"] + (s.text + s.vision) * d_out / 2


def test_decode_design_launches():
    for rows in (1, 3, 16):
        pred = {d: cm.predict("7b.qkv", rows, "h100", d)["variants"]["splitq"]["launches"] for d in cm.DESIGNS}
        dec, dec3, dec4, cur = pred["decode"], pred["decode3"], pred["decode4"], pred["current"]
        assert [L["name"] for L in dec] == ["d1d2_fused", "gemm+mac_down"]  # as built: two launches
        assert [L["name"] for L in dec3] == ["d1_transform", "d2_quantize_down", "gemm+mac_down"]
        assert len(dec4) == 4 and len(cur) == 2  # before: D1, D2, D3 (MAC), GEMM
        assert cur[0]["programs"] == 1  # the serial kernel (a) the issue is about
        assert min(L["programs"] for L in dec) >= 4
        # the work moved, not dropped: same bytes and operations, fewer launch floors
        for d in (dec, dec3):
            assert sum(L["bytes"] for L in d) == sum(L["bytes"] for L in dec4)
            assert sum(L["mma_int8"] for L in d) == sum(L["mma_int8"] for L in dec4)
            assert d[-1]["programs"] == dec4[-1]["programs"] + dec4[2]["programs"]
        assert dec[0]["programs"] == dec4[0]["programs"] + dec4[1]["programs"]
        # the fused launch: one floor, both phases' work, one wait
        assert dec[0]["s"] > cm.LAUNCH_S + cm.GRID_WAIT_S and dec[0]["wait_s"] == cm.GRID_WAIT_S
        assert dec[0]["s"] < dec3[0]["s"] + dec3[1]["s"]
    # without MAC: the fused D1 + D2, then the plain GEMM
    mocd = cm.predict("7b.qkv", 1, "h100", "decode")["variants"]["mocd+cws"]["launches"]
    assert [L["name"] for L in mocd] == ["d1d2_fused", "gemm"]
    # above 16 rows the decode design is the current one
    assert (cm.predict("7b.down", 256, "h100", "decode")["variants"]
            == cm.predict("7b.down", 256, "h100", "current")["variants"])


def test_predictions_rank_designs_as_expected():
    """Sanity of the model, not a timing: at decode the weights dominate, so W4A4 beats BF16 and
    the split kernel (a) beats the serial one; at 2048 rows BF16 is compute-bound."""
    for layer in ("7b.qkv", "7b.gate_up", "7b.down", "72b.gate_up"):
        cur = cm.predict(layer, 1, "h200", "current")
        dec = cm.predict(layer, 1, "h200", "decode")
        assert cur["variants"]["w4a4_gemm"]["ratio_to_bf16"] > 2
        assert dec["variants"]["splitq"]["s"] < cur["variants"]["splitq"]["s"]
        assert cm.predict(layer, 2048, "h200", "current")["variants"]["bf16"]["launches"][0]["bound"] == "mma"


def test_cli_json_markdown_and_targets(tmp_path, capsys):
    out = tmp_path / "cost.json"
    assert cm.main(["--models", "7b", "--rows", "1,2048", "--hardware", "rtx4090", "--json", str(out)]) == 0
    md = capsys.readouterr().out
    assert md.count("| current | float32 | rtx4090 | 7b.") == 8 and md.count("| decode | float32 |") == 8
    data = json.loads(out.read_text())
    assert len(data["results"]) == 16 and data["launch_s"] == cm.LAUNCH_S
    assert cm.main(["--targets"]) == 0
    t = json.loads(capsys.readouterr().out)
    assert set(t) == {"current:float32", "decode:float32"}
    assert set(t["decode:float32"]["h100"]["decode_ratios"]) >= {"7b.qkv@1"}
    assert cm.main(["--targets", "--design", "decode", "--precision", "float32,bf16"]) == 0
    assert set(json.loads(capsys.readouterr().out)) == {"decode:float32", "decode:bf16"}


def test_bf16_precision_moves_the_float_products_and_halves_the_scratch():
    """SPLITQ_PRECISION=bf16: kernel (a)'s transforms and the GEMM's up products become one bf16 MMA
    each instead of three tf32 ones, the scratch round trip halves, the integer work is unchanged;
    so prefill gets faster and decode (bound by the weight bytes) nearly not."""
    for design, rows in (("current", 2048), ("decode", 16), ("w4a16", 16)):
        f32 = cm.predict("7b.qkv", rows, "h200", design)["variants"]["splitq"]
        b16 = cm.predict("7b.qkv", rows, "h200", design, "bf16")["variants"]["splitq"]
        assert all(L["mma_tf32"] == 0 for L in b16["launches"]) and any(L["mma_bf16"] > 0 for L in b16["launches"])
        assert sum(L["mma_int8"] for L in b16["launches"]) == sum(L["mma_int8"] for L in f32["launches"])
        tf32 = sum(L["mma_tf32"] for L in f32["launches"])
        bf16 = sum(L["mma_bf16"] for L in b16["launches"])
        if design == "w4a16":  # its weight product was one-pass tf32 already: it moves, it does not shrink
            assert tf32 / 3 < bf16 < tf32
        else:
            assert bf16 == pytest.approx(tf32 / 3)
        assert b16["bytes"] < f32["bytes"] and b16["s"] <= f32["s"]
    pre = cm.predict("7b.qkv", 2048, "h200", "current", "bf16")["variants"]["splitq"]["ratio_to_bf16"]
    assert pre > 1.2 * cm.predict("7b.qkv", 2048, "h200", "current")["variants"]["splitq"]["ratio_to_bf16"]
    with pytest.raises(ValueError, match="unknown precision"):
        cm.predict("7b.qkv", 1, "h100", "current", "fp8")


def test_prefill_blocks_without_mac_rows_skip_its_work():
    """--mac-tiles: only the MAC work of the row blocks MAC targets is counted above 16 rows (the
    kernels skip the rest); 1 is the default, and decode does not change."""
    full = cm.predict("7b.qkv", 2048, "h200", "current", "bf16")
    assert cm.predict("7b.qkv", 2048, "h200", "current", "bf16", 1.0) == full
    part = cm.predict("7b.qkv", 2048, "h200", "current", "bf16", 0.125)
    assert part["variants"]["splitq"]["s"] < full["variants"]["splitq"]["s"]
    assert part["variants"]["mocd+cws"] == full["variants"]["mocd+cws"]  # no MAC there
    for design in ("decode", "w4a16"):
        assert (cm.predict("7b.qkv", 16, "h200", design, "bf16", 0.125)["variants"]
                == cm.predict("7b.qkv", 16, "h200", design, "bf16")["variants"])
    with pytest.raises(ValueError, match="mac_tiles"):
        cm.predict("7b.qkv", 2048, "h200", "current", "bf16", 1.5)


def test_clear_errors():
    with pytest.raises(ValueError, match="unknown layer"):
        cm.predict("7b.lm_head", 1, "h100", "current")
    with pytest.raises(ValueError, match="unknown hardware"):
        cm.predict("7b.qkv", 1, "a100", "current")
    with pytest.raises(SystemExit, match="unknown model"):
        cm.main(["--models", "13b"])
    with pytest.raises(SystemExit, match="--rows"):
        cm.main(["--rows", "0"])
