"""The Triton kernels against the reference, on the CPU through Triton's interpreter.

What "matches" means is stated and implemented once, in splitq_kernels.testing:
1. GEMM stage (kernel b) fed with the reference's own quantized input: the integer accumulation is
   exact (checked bit for bit with unit scales) and the output equals reference.splitq_gemm up to
   float32 rescaling noise (2^-17 of the row's max |y|) plus half an ulp of the output dtype.
2. Quantize stage (kernel a): codes equal reference.quantize_input's except +-1 flips where the
   reference's x / s lies within the proven float32 error bound of the two transform orders of a
   half-integer; with exactly representable inputs and transforms (signed permutations), where
   every rounding tie is a real tie, codes, scales and zero points are identical and ties go to
   even. The down products equal those of the kernel's own codes (exact sums, float32 rescale).
3. End to end: the output equals the reference GEMM on the kernel's own codes (all rows), and
   the full reference on every row whose codes match, within criterion 1's tolerance; explained
   flips are counted and bounded.
Shapes are deliberately not multiples of any block size.
"""

from __future__ import annotations

import dataclasses
import itertools

import pytest
import torch

from splitq_kernels.layout import prepare_kernel_layer
from splitq_kernels.ops import splitq_linear_triton
from splitq_kernels.reference import (
    QuantizedTensor,
    mac_row_mask,
    SplitQScheme,
    quantize_input,
    quantize_linear,
    splitq_linear,
)
from splitq_kernels.testing import (
    activations_to_reference,
    check_gemm,
    check_linear,
    check_outputs,
)
from splitq_kernels.triton.gemm import GemmConfig, gemm_triton
from splitq_kernels.triton.quantize_input import QuantizedActivations, quantize_input_triton
from splitq_vllm.testing.layers import exact_tie_case, random_activations, random_float_layer
from splitq_vllm.testing.layers import random_text_masks as masks


@pytest.fixture(scope="module", autouse=True)
def interpreter():
    """The kernels run on CPU tensors through Triton's interpreter (use_interpreter reloads the kernel
    modules; the functions imported above look their kernels up at call time)."""
    import splitq_kernels.triton

    splitq_kernels.triton.use_interpreter()


SCHEMES = [("w4a8", True), ("w4a8", False), ("w4a4", True), ("w4a4", False), ("w3a3", True), ("w3a3", False),
           ("w3a2", True), ("w3a2", False)]
# small: D_in 53 = 45 main (5 x 9) + 3 text + 5 vision, 37 outputs, ranks 3 and 4, 29 rows
SMALL = dict(in_features=53, out_features=37, n_text=3, n_vision=5, kron=(5, 9), cws_rank=3, mac_rank=4)
# wide: main 320 = 40 x 8 spans several weight word blocks and two P1 row blocks; rank 17 pads to 32
WIDE = dict(in_features=331, out_features=45, n_text=5, n_vision=6, kron=(40, 8), cws_rank=5, mac_rank=17)


def make(shape: dict, scheme_name: str, sym: bool, seed: int, mac_rows: str = "text", **kw):
    scheme = SplitQScheme.from_name(scheme_name, act_symmetric=sym, mac_rows=mac_rows)
    fl, _ = random_float_layer(**shape, act_clip=0.9, weight_clip=True, seed=seed, **kw)
    q = quantize_linear(fl, scheme)
    return scheme, q, prepare_kernel_layer(q, scheme, "cpu")


def run_and_check(x, mask, q, scheme, kl, **kw):
    act = quantize_input_triton(x, mask, kl, store_mac=True, **kw)
    y = gemm_triton(act, kl, x.dtype)
    report, r_own, r_full = check_linear(y, act, x, mask, q, scheme, kl)
    # explained flips are rare: the windows are a few float32 ulps wide
    assert report.explained_flips <= max(2, report.codes_compared // 500), report
    return y, report


# ---------------------------------------------------------------------------------------------
# 1. GEMM stage
# ---------------------------------------------------------------------------------------------


def _unit_scale_activations(codes: torch.Tensor, zeros: torch.Tensor, width: int) -> QuantizedActivations:
    T = codes.shape[0]
    a = torch.zeros(T, width, dtype=torch.int8)
    a[:, : codes.shape[1]] = codes
    z = torch.zeros(T, 4, dtype=torch.int32)
    z[:, 0] = zeros
    return QuantizedActivations(a, torch.ones(T, 4), z, None, None)


@pytest.mark.parametrize("wbits", range(2, 9))
@pytest.mark.parametrize("sym", [True, False])
@pytest.mark.parametrize("rows,config", [(37, GemmConfig(16, 32, 1, 2, 4, 1)), (5, GemmConfig(16, 16, 3, 1, 4, 1))])
def test_integer_accumulation_is_exact(wbits, sym, rows, config):
    """Unit scales, no branches: the float32 output is the integer sum itself (|sum| < 2^24), so it
    must equal the int64 product exactly, including the asymmetric zero-point term, for every weight
    width, across several word blocks, partial tiles, and split-K."""
    gen = torch.Generator().manual_seed(wbits * 7 + rows)
    K, N = 301, 41
    scheme = SplitQScheme(weight_bits=wbits, act_bits=8, aux_weight_bits=8, aux_act_bits=8, act_symmetric=sym)
    fl, _ = random_float_layer(K, N, 0, 0, (7, 43), bias=False, seed=wbits)
    q = quantize_linear(fl, scheme)
    qmin, qmax = -(2 ** (wbits - 1)), 2 ** (wbits - 1) - 1
    wcodes = torch.randint(qmin, qmax + 1, (N, K), generator=gen).to(torch.int8)
    q = dataclasses.replace(q, main_w=QuantizedTensor(wcodes, torch.ones(N, 1), None, wbits))
    kl = prepare_kernel_layer(q, scheme, "cpu")
    stored = torch.randint(-128, 128, (rows, K), generator=gen).to(torch.int8)  # kernel's int8 codes
    zeros = torch.zeros(rows, dtype=torch.int32) if sym else torch.randint(-128, 128, (rows,), generator=gen).int()
    act = _unit_scale_activations(stored, zeros, kl.main + 16)
    y = gemm_triton(act, kl, torch.float32, config)
    exact = (stored.long() - zeros.long()[:, None]) @ wcodes.long().T
    assert int(exact.abs().max()) < 2**24
    assert torch.equal(y.double(), exact.double())


@pytest.mark.parametrize("scheme_name,sym", SCHEMES)
@pytest.mark.parametrize("shape", ["small", "wide"])
def test_gemm_stage_matches_reference_gemm(scheme_name, sym, shape):
    shp = SMALL if shape == "small" else WIDE
    scheme, q, kl = make(shp, scheme_name, sym, seed=1)
    rows = 29 if shape == "small" else 37
    x = random_activations(rows, shp["in_features"], seed=2, outlier_channels=4)
    for mask in masks(rows, 3).values():
        qin = quantize_input(x, q, scheme)
        for dtype in (torch.bfloat16, torch.float32):
            check_gemm(gemm_triton, qin, mask, q, scheme, kl, dtype, "cpu")


def test_gemm_stage_decode_split_k_matches_reference_gemm():
    scheme, q, kl = make(WIDE, "w4a4", False, seed=4)
    for rows in (1, 7, 16):
        x = random_activations(rows, WIDE["in_features"], seed=rows)
        qin = quantize_input(x, q, scheme)
        mask = masks(rows, rows)["mixed"]
        for split in (2, 5):
            run = lambda act, kl, dt, s=split: gemm_triton(act, kl, dt, GemmConfig(16, 16, s, 1, 4, 1))  # noqa: E731
            check_gemm(run, qin, mask, q, scheme, kl, torch.bfloat16, "cpu")


# ---------------------------------------------------------------------------------------------
# 2. Quantize stage
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("scheme_name,sym", SCHEMES)
def test_quantize_stage_is_bit_exact_on_exact_ties(scheme_name, sym):
    """Transforms that are signed permutations and power-of-two smoothing make every float32 step
    exact, and inputs are built so that x / s hits exact .5 ties (and, asymmetric, the zero point
    too). Then nothing may differ: codes, scales and zero points equal the reference bit for bit,
    so the kernel rounds half to even exactly like torch.round."""
    scheme = SplitQScheme.from_name(scheme_name, act_symmetric=sym)
    case = exact_tie_case(scheme, seed=sum(map(ord, scheme_name)) * 2 + sym)
    x, mask, q, kl, xm_t = case.x, case.mask, case.layer, prepare_kernel_layer(case.layer, scheme, "cpu"), case.xm_t
    rows, m = xm_t.shape
    act = quantize_input_triton(x, mask, kl, store_mac=True)
    got, ref = activations_to_reference(act, kl), quantize_input(x, q, scheme)
    ties = ((ref.main.codes.double() - (0 if sym else ref.main.zero.double())) * ref.main.scale.double()
            - xm_t.float().double()).abs() == 0.5
    assert int(ties.sum()) > rows * m // 8  # the test really exercises ties
    targeted = mac_row_mask(mask, scheme.mac_rows)  # a block of rows MAC does not target skips its residual codes
    for name in ("main", "text", "vision", "mac"):
        g, r_ = getattr(got, name), getattr(ref, name)
        rows_ = targeted if name == "mac" else slice(None)
        assert torch.equal(g.codes.long()[rows_], r_.codes.long()[rows_]), name
        assert torch.equal(g.scale.float(), r_.scale.float()), name
        assert (g.zero is None) == sym and (sym or torch.equal(g.zero.long(), r_.zero.long())), name
    y = gemm_triton(act, kl, torch.float32)
    check_outputs(y, splitq_linear(x, mask, q, scheme))


@pytest.mark.parametrize("scheme_name,sym", SCHEMES)
def test_quantize_stage_matches_reference(scheme_name, sym):
    scheme, q, kl = make(WIDE, scheme_name, sym, seed=6)
    x = random_activations(37, WIDE["in_features"], seed=7, outlier_channels=5)
    for mask in masks(37, 8).values():
        run_and_check(x, mask, q, scheme, kl)


# ---------------------------------------------------------------------------------------------
# 3. End to end
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("scheme_name,sym", SCHEMES)
def test_linear_matches_reference(scheme_name, sym):
    scheme, q, kl = make(SMALL, scheme_name, sym, seed=9)
    x = random_activations(29, SMALL["in_features"], seed=10, outlier_channels=4).to(torch.bfloat16)
    for mask in masks(29, 11).values():
        run_and_check(x, mask, q, scheme, kl)


@pytest.mark.parametrize("mac_rows", ["text", "vision", "all"])
def test_mac_only_on_the_rows_it_targets(mac_rows):
    scheme, q, kl = make(SMALL, "w3a3", True, seed=12, mac_rows=mac_rows)
    x = random_activations(29, SMALL["in_features"], seed=13)
    mask = masks(29, 14)["mixed"]
    y, _ = run_and_check(x, mask, q, scheme, kl)
    no_mac = prepare_kernel_layer(dataclasses.replace(q, mac_down=None, mac_up=None), scheme, "cpu")
    y0 = gemm_triton(quantize_input_triton(x, mask, no_mac), no_mac, x.dtype)
    target = {"text": mask, "vision": ~mask, "all": torch.ones_like(mask)}[mac_rows]
    assert torch.equal(y[~target], y0[~target])
    assert bool(((y[target] - y0[target]).abs().amax(-1) > 0).all())


@pytest.mark.parametrize("mac_rows", ["text", "vision"])
def test_blocks_without_mac_rows_skip_the_mac_work(mac_rows):
    """An image's rows in a prefill (MAC on text rows): kernel (a) skips the MAC pass of a block of
    rows with none MAC targets, and the GEMM the up product of a row tile whose h_mac is all zero.
    Observable: kernel (a) leaves those rows' residual codes as it found them, and with a NaN up
    scale only the tiles that do the product turn NaN. The result is the reference's either way."""
    from splitq_kernels.triton.quantize_input import alloc_activations, plan_quantize_input

    scheme, q, kl = make(WIDE, "w4a4", True, seed=40, mac_rows=mac_rows)
    T = 40
    x = random_activations(T, WIDE["in_features"], seed=41, outlier_channels=3)
    mask = torch.zeros(T, dtype=torch.bool)
    mask[:4] = mask[36:] = True  # text, then 32 image rows, then text: rows 16..31 are one block of image rows
    if mac_rows == "vision":
        mask = ~mask
    act = alloc_activations(kl, T, x.device, store_mac=True)
    act.mac_codes.fill_(99)  # outside every code range
    scratch = torch.empty(16, kl.in_features)
    plan_quantize_input(x, mask, kl, act, scratch, block_t=16, n_programs=1).run()
    skipped = torch.zeros(T, dtype=torch.bool)
    skipped[16:32] = True
    assert bool((act.mac_codes[skipped] == 99).all()) and not bool((act.mac_codes[~skipped] == 99).all(dim=1).any())
    assert bool((act.h_mac[skipped] == 0).all())
    config = GemmConfig(block_m=16, block_n=32, split_k=1, group_m=1, num_warps=4, num_stages=1)
    y = gemm_triton(act, kl, torch.float32, config)
    report, _, _ = check_linear(y, act, x, mask, q, scheme, kl)
    nan_up = dataclasses.replace(kl, mac_up_scale=torch.full_like(kl.mac_up_scale, float("nan")))
    y_nan = gemm_triton(act, nan_up, torch.float32, config)
    assert bool(torch.isfinite(y_nan[16:32]).all()) and torch.equal(y_nan[16:32], y[16:32])
    assert bool(torch.isnan(y_nan[:16]).all(dim=1).all()) and bool(torch.isnan(y_nan[32:]).all(dim=1).all())


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
        assert (kl.text, kl.vision, kl.cws_rank, kl.mac_rank) == (parts["n_text"], parts["n_vision"],
                                                                  parts["cws_rank"], parts["mac_rank"])
        x = random_activations(19, shape["in_features"], seed=16)
        run_and_check(x, masks(19, 17)["mixed"], q, scheme, kl)


@pytest.mark.parametrize("rows", [1, 3, 16])
def test_decode_rows_use_split_k_and_match(rows):
    """1-16 rows: block_t = next power of two (no tensor-core dots below 16 rows in kernel a) and
    the split-K GEMM; its workspace must be left at zero for the next call."""
    from splitq_kernels.triton.gemm import _WORKSPACE, default_config

    scheme, q, kl = make(WIDE, "w4a4", True, seed=18)
    assert default_config(kl, rows, torch.device("cpu")).split_k > 1
    for seed in (19, 20):  # twice: the second call relies on the first having reset the workspace
        x = random_activations(rows, WIDE["in_features"], seed=seed).to(torch.bfloat16)
        run_and_check(x, torch.ones(rows, dtype=torch.bool), q, scheme, kl)
    ws, cnt = _WORKSPACE[("cpu", None)]
    assert int(ws.abs().sum()) == 0 and int(cnt.abs().sum()) == 0


def test_block_sizes_and_persistent_grid_do_not_change_the_result():
    scheme, q, kl = make(WIDE, "w4a4", False, seed=21)
    x = random_activations(37, WIDE["in_features"], seed=22)
    mask = masks(37, 23)["mixed"]
    for block_t, n_programs in ((16, 1), (4, 3), (1, 2)):
        run_and_check(x, mask, q, scheme, kl, block_t=block_t, n_programs=n_programs)


def test_entry_point_dtypes_leading_dims_and_no_mask():
    scheme, q, kl = make(SMALL, "w4a4", True, seed=24)
    x = random_activations(2 * 7, 53, seed=25).reshape(2, 7, 53)
    mask = torch.rand(2, 7, generator=torch.Generator().manual_seed(26)) < 0.5
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        y = splitq_linear_triton(x.to(dtype), mask, kl)
        assert y.shape == (2, 7, 37) and y.dtype == dtype
        expected = splitq_linear(x.to(dtype).float(), mask, q, scheme)
        check_outputs(y.reshape(14, 37), expected.reshape(14, 37))
    y_none = splitq_linear_triton(x, None, kl)
    assert torch.equal(y_none, splitq_linear_triton(x, torch.ones(2, 7, dtype=torch.bool), kl))
    assert splitq_linear_triton(x[:0], mask[:0], kl).shape == (0, 7, 37)
    empty = splitq_linear_triton(x.reshape(14, 53)[:0], mask.reshape(14)[:0], kl)
    assert empty.shape == (0, 37)
    with pytest.raises(TypeError, match="float64"):
        quantize_input_triton(x.reshape(14, 53).double(), None, kl)


def test_custom_op_compiles_opaque_and_has_a_fake():
    scheme, q, kl = make(SMALL, "w4a4", False, seed=27)
    x = random_activations(9, 53, seed=28).to(torch.bfloat16)
    mask = masks(9, 29)["mixed"]
    eager = splitq_linear_triton(x, mask, kl)
    compiled = torch.compile(lambda a, m: splitq_linear_triton(a, m, kl) + 1, fullgraph=True, backend="eager")
    assert torch.equal(compiled(x, mask), eager + 1)
    torch.library.opcheck(torch.ops.splitq.linear, (x, mask, kl.tensors(), kl.meta(), kl.precision),
                          test_utils=("test_schema", "test_faketensor"))
    torch.library.opcheck(torch.ops.splitq.quantize_input, (x, mask, kl.tensors(), kl.meta(), kl.precision),
                          test_utils=("test_schema", "test_faketensor"))
    codes, scale, zero, hc, hm = torch.ops.splitq.quantize_input(x, mask, kl.tensors(), kl.meta(), kl.precision)
    y = torch.ops.splitq.gemm(codes, scale, zero, hc, hm, kl.tensors(), kl.meta(), kl.precision, torch.bfloat16)
    assert torch.equal(y, eager)


def test_other_precisions_run_the_same_math_in_the_interpreter():
    """tf32x3 / tf32 change tensor-core products on a GPU only; the interpreter computes in float32,
    so the result must still meet the criteria (this guards the precision plumbing)."""
    scheme = SplitQScheme.from_name("w4a4")
    fl, _ = random_float_layer(**SMALL, seed=30)
    q = quantize_linear(fl, scheme)
    x = random_activations(11, 53, seed=31)
    for precision in ("tf32x3", "tf32"):
        kl = prepare_kernel_layer(q, scheme, "cpu", precision=precision)
        run_and_check(x, masks(11, 32)["mixed"], q, scheme, kl)


@pytest.mark.parametrize("scheme_name,sym", list(itertools.islice(SCHEMES, 0, 8, 3)))
def test_activation_outliers_and_clipping(scheme_name, sym):
    """Heavy outlier channels (x20) and clipping < 1 exercise the clamp paths of Q."""
    scheme = SplitQScheme.from_name(scheme_name, act_symmetric=sym)
    fl, _ = random_float_layer(**WIDE, act_clip=0.6, seed=33)
    q = quantize_linear(fl, scheme)
    kl = prepare_kernel_layer(q, scheme, "cpu")
    x = random_activations(21, WIDE["in_features"], seed=34, outlier_channels=30)
    run_and_check(x, masks(21, 35)["mixed"], q, scheme, kl)
