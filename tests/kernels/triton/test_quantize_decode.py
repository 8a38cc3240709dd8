"""The split decode kernel (a) (quantize_decode.py) against the reference, on the CPU through
Triton's interpreter, with the criteria of splitq_kernels.testing (the same as kernel (a)'s tests:
codes equal up to explained +-1 flips, down products exact on the kernel's codes, the output of
the GEMM on its outputs equal to the reference). 1, 3 and 16 rows; shapes that are multiples of no
tile (n1, n2, main, ranks, outlier sets)."""

from __future__ import annotations

import pytest
import torch
from splitq_kernels.layout import prepare_kernel_layer
from splitq_kernels.reference import SplitQScheme, quantize_linear
from splitq_kernels.testing import check_linear
from splitq_kernels.triton import quantize_decode
from splitq_kernels.triton.gemm import GemmConfig, gemm_triton
from splitq_kernels.triton.quantize_input import alloc_activations, code_offsets
from splitq_kernels.triton.quantize_decode import (
    can_implement_decode,
    linear_decode_triton,
    quantize_input_decode_triton,
)

from splitq_vllm.testing.layers import random_activations, random_float_layer
from splitq_vllm.testing.layers import random_text_masks as masks


@pytest.fixture(scope="module", autouse=True)
def interpreter():
    import splitq_kernels.triton

    splitq_kernels.triton.use_interpreter()


# main 320 = 40 x 8: three P1 blocks, n2 below one P2 block; rank 17 pads to 32
WIDE = dict(in_features=331, out_features=45, n_text=5, n_vision=6, kron=(40, 8), cws_rank=5, mac_rank=17)
# main 222 = 6 x 37: n2 spans three P2 blocks, n1 below one P1 block; 4 programs of 64 channels, the last partial
LONG = dict(in_features=234, out_features=29, n_text=7, n_vision=5, kron=(6, 37), cws_rank=9, mac_rank=3)
SCHEMES = [("w4a4", True), ("w4a4", False), ("w3a2", False), ("w4a8", True)]


def make(shape: dict, scheme_name: str, sym: bool, seed: int, mac_rows: str = "text", **kw):
    scheme = SplitQScheme.from_name(scheme_name, act_symmetric=sym, mac_rows=mac_rows)
    fl, _ = random_float_layer(**shape, act_clip=0.9, weight_clip=True, seed=seed, **kw)
    q = quantize_linear(fl, scheme)
    return scheme, q, prepare_kernel_layer(q, scheme, "cpu")


# The default decode config here is one 64-column tile split over K (4 "SMs" on the CPU). These give
# every GEMM program a whole tile (split-K 1: what 7B gate_up gets on an H100), or 3 per 32-column tile.
SPLIT1 = GemmConfig(block_m=16, block_n=32, split_k=1, group_m=1, num_warps=4, num_stages=1)
SPLIT3 = GemmConfig(block_m=16, block_n=32, split_k=3, group_m=1, num_warps=4, num_stages=1)


def run_and_check(x, mask, q, scheme, kl, config=None):
    """The four launches of the two halves (D1, D2, D3, GEMM) and the op's three (D1, D2, the GEMM
    with the MAC down in its grid) against the reference; the two agree bit for bit."""
    act = quantize_input_decode_triton(x, mask, kl, store_mac=True)
    y = gemm_triton(act, kl, x.dtype, config)
    report, _, _ = check_linear(y, act, x, mask, q, scheme, kl)  # raises with the details
    assert report.explained_flips <= max(2, report.codes_compared // 500), report
    y3, act3 = linear_decode_triton(x, mask, kl, store_mac=True, config=config)
    check_linear(y3, act3, x, mask, q, scheme, kl)
    assert torch.equal(y3, y)
    off_text, off_vision, _ = code_offsets(kl)  # the segments' alignment padding is never written
    for lo, n in ((0, kl.main), (off_text, kl.text), (off_vision, kl.vision)):
        assert torch.equal(act.codes[:, lo:lo + n], act3.codes[:, lo:lo + n])
    for name in ("scale", "zero", "h_cws", "h_mac", "mac_codes"):
        a, b = getattr(act, name), getattr(act3, name)
        assert (a is None and b is None) or torch.equal(a, b), name
    return y


def _neutral(sym: bool) -> None:
    """The shared workspace is left as found: statistics neutral, sums and counters zero."""
    stats, ws, cnt = quantize_decode._WORKSPACE[("cpu", None, sym)]  # the module's globals after the reload
    assert int(ws.abs().sum()) == 0 and int(cnt.abs().sum()) == 0
    if sym:
        assert bool((stats == 0).all())
    else:
        assert bool((stats[:, 0::2] == float("-inf")).all()) and bool((stats[:, 1::2] == float("inf")).all())  # [16, 8]


@pytest.mark.parametrize("scheme_name,sym", SCHEMES)
@pytest.mark.parametrize("shape", ["wide", "long"])
@pytest.mark.parametrize("rows", [1, 3, 16])
def test_decode_kernel_a_matches_reference(scheme_name, sym, shape, rows):
    shp = WIDE if shape == "wide" else LONG
    scheme, q, kl = make(shp, scheme_name, sym, seed=rows + 3 * sym)
    for seed, config in ((1, None), (2, SPLIT1)):  # twice: the second call relies on the first's reset workspace
        x = random_activations(rows, shp["in_features"], seed=seed + rows, outlier_channels=4).to(torch.bfloat16)
        mask = masks(rows, seed)["mixed"] if rows > 1 else torch.ones(1, dtype=torch.bool)
        run_and_check(x, mask, q, scheme, kl, config)
        _neutral(sym)


# outlier sets wider than one block of 64 columns (70 = 64 + 6 text, 33 vision): split over programs
WIDE_SETS = dict(in_features=199, out_features=23, n_text=70, n_vision=33, kron=(6, 16), cws_rank=4, mac_rank=6)


@pytest.mark.parametrize("scheme_name,sym", [("w4a4", True), ("w3a2", False)])
@pytest.mark.parametrize("rows", [3, 16])
def test_outlier_sets_split_over_programs(scheme_name, sym, rows):
    scheme, q, kl = make(WIDE_SETS, scheme_name, sym, seed=50 + rows)
    x = random_activations(rows, WIDE_SETS["in_features"], seed=51, outlier_channels=6).to(torch.bfloat16)
    run_and_check(x, masks(rows, 52)["mixed"], q, scheme, kl)
    _neutral(sym)


@pytest.mark.parametrize("mac_rows", ["text", "vision", "all"])
def test_mac_only_on_the_rows_it_targets(mac_rows):
    import dataclasses

    scheme, q, kl = make(WIDE, "w3a3", True, seed=12, mac_rows=mac_rows)
    x = random_activations(11, WIDE["in_features"], seed=13)
    mask = masks(11, 14)["mixed"]
    y = run_and_check(x, mask, q, scheme, kl)
    no_mac = prepare_kernel_layer(dataclasses.replace(q, mac_down=None, mac_up=None), scheme, "cpu")
    y0 = gemm_triton(quantize_input_decode_triton(x, mask, no_mac), no_mac, x.dtype)
    run_and_check(x, mask, q, scheme, kl, SPLIT3)  # the MAC-down programs beside split-K GEMM programs
    target = {"text": mask, "vision": ~mask, "all": torch.ones_like(mask)}[mac_rows]
    assert torch.equal(y[~target], y0[~target])
    assert bool(((y[target] - y0[target]).abs().amax(-1) > 0).all())


@pytest.mark.parametrize(
    "parts",
    [dict(n_text=0, n_vision=0, cws_rank=0, mac_rank=0, bias=False), dict(n_text=4, n_vision=0, cws_rank=0, mac_rank=2),
     dict(n_text=0, n_vision=4, cws_rank=2, mac_rank=0)],
    ids=["main_only", "text_and_mac", "vision_and_cws"],
)
def test_empty_sets_and_branches(parts):
    main = 6 * 8
    shape = dict(in_features=main + parts["n_text"] + parts["n_vision"], out_features=21, kron=(6, 8), **parts)
    for name, sym in (("w4a4", True), ("w3a2", False)):
        scheme, q, kl = make(shape, name, sym, seed=15)
        x = random_activations(5, shape["in_features"], seed=16)
        mask = masks(5, 17)["mixed"]
        run_and_check(x, mask, q, scheme, kl)
        _neutral(sym)
        # D1 and D2 as launches of their own (fused=False) give the same outputs, bit for bit
        act = quantize_input_decode_triton(x, mask, kl, store_mac=True)
        split = alloc_activations(kl, 5, x.device, store_mac=True)
        ws = quantize_decode.decode_workspace(x.device, sym, max(kl.cws_rank_padded, kl.mac_rank_padded))
        plans = quantize_decode.plan_quantize_decode(x, mask, kl, split, torch.empty(5, kl.in_features), ws,
                                                     fused=False)
        assert len(plans) == 2 + (kl.mac_rank > 0)
        for p in plans:
            p.run()
        assert torch.equal(gemm_triton(split, kl, x.dtype), gemm_triton(act, kl, x.dtype))
        _neutral(sym)


def test_no_mask_means_all_text_and_errors_are_clear():
    _, _, kl = make(WIDE, "w4a4", True, seed=30)
    x = random_activations(3, WIDE["in_features"], seed=31)
    y_none = gemm_triton(quantize_input_decode_triton(x, None, kl), kl, x.dtype)
    y_all = gemm_triton(quantize_input_decode_triton(x, torch.ones(3, dtype=torch.bool), kl), kl, x.dtype)
    assert torch.equal(y_none, y_all)
    assert torch.equal(linear_decode_triton(x, None, kl)[0], y_none)
    assert can_implement_decode(kl, 16) == (True, "")
    ok, why = can_implement_decode(kl, 17)
    assert not ok and "1..16 rows" in why
    with pytest.raises(ValueError, match="1..16 rows"):
        quantize_input_decode_triton(random_activations(17, WIDE["in_features"], seed=32), None, kl)
    with pytest.raises(ValueError, match=r"x must be \[T, 331\]"):
        quantize_input_decode_triton(x[:, :-1], None, kl)
    with pytest.raises(TypeError, match="float32"):
        quantize_input_decode_triton(x.double(), None, kl)


def test_the_op_takes_the_decode_path_up_to_16_rows():
    """splitq_linear_triton (torch.ops.splitq.linear) runs the two decode launches at 1-16 rows
    (linear_decode_triton) and the persistent kernel (a) above; both agree with the reference (the
    other tests) and the op's output is the decode path's, bit for bit, whichever way the decode
    path is run (two launches, the two halves' three, or four launches without in-grid waits)."""
    from splitq_kernels.ops import splitq_linear_triton

    scheme, q, kl = make(LONG, "w4a4", False, seed=40)
    for rows in (2, 16):
        x = random_activations(rows, LONG["in_features"], seed=41 + rows).to(torch.bfloat16)
        mask = masks(rows, 42)["mixed"]
        y = splitq_linear_triton(x, mask, kl)
        assert torch.equal(y, gemm_triton(quantize_input_decode_triton(x, mask, kl), kl, x.dtype))
        assert torch.equal(y, linear_decode_triton(x, mask, kl)[0])
        _neutral(False)


def test_without_in_grid_waits_the_decode_path_is_four_plain_launches(monkeypatch):
    """SPLITQ_DECODE_IN_GRID_WAITS=0 (the fallback if a GPU hangs on them): no fused grid, D3 on its
    own, the plain GEMM; the op's output is bit-identical to the two-launch path's."""
    from splitq_kernels.ops import splitq_linear_triton

    scheme, q, kl = make(WIDE, "w4a4", True, seed=50)
    x = random_activations(3, WIDE["in_features"], seed=51).to(torch.bfloat16)
    mask = masks(3, 52)["mixed"]
    fused = splitq_linear_triton(x, mask, kl)
    monkeypatch.setattr(quantize_decode, "IN_GRID_WAITS", False)
    act = alloc_activations(kl, 3, x.device, False)
    scratch = torch.empty(3, kl.in_features, dtype=torch.float32)
    workspace = quantize_decode.decode_workspace(x.device, kl.act_symmetric, max(kl.cws_rank_padded, kl.mac_rank_padded))
    kernels = [launch.kernel for launch in quantize_decode.plan_quantize_decode(x, mask, kl, act, scratch, workspace)]
    names = [getattr(k, "__name__", None) or k.fn.__name__ for k in kernels]
    assert names == ["_decode_transform_kernel", "_decode_quantize_kernel", "_decode_mac_kernel"]
    assert torch.equal(splitq_linear_triton(x, mask, kl), fused)
    _neutral(True)
