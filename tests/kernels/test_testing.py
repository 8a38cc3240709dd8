"""The acceptance criteria of splitq_kernels.testing, checked on their own: they must accept what
float32 rounding explains and reject anything else (else the kernel tests could not fail)."""

from __future__ import annotations

import copy

import pytest
import torch

from splitq_kernels.layout import prepare_kernel_layer
from splitq_kernels.reference import SplitQScheme, quantize_input, quantize_linear, splitq_gemm
from splitq_kernels.testing import MismatchError, check_outputs, check_quantized_input, reference_to_activations
from splitq_vllm.testing.layers import exact_tie_case, random_activations, random_float_layer


def _as_kernel_output(qin, case, scheme, kl):
    """The reference's quantized input in the kernels' layout, as if a kernel had produced it."""
    act = reference_to_activations(qin, case.mask, case.layer, scheme, kl, "cpu")
    off = 0 if scheme.act_symmetric else 1 << (scheme.aux_act_bits - 1)
    act.mac_codes = (qin.mac.codes.to(torch.int32) - off).to(torch.int8)
    return act


@pytest.mark.parametrize("sym", [True, False])
def test_reference_itself_passes_with_no_flips(sym):
    scheme = SplitQScheme.from_name("w4a4", act_symmetric=sym)
    case = exact_tie_case(scheme, seed=1)
    kl = prepare_kernel_layer(case.layer, scheme, "cpu")
    qin = quantize_input(case.x, case.layer, scheme)
    report = check_quantized_input(_as_kernel_output(qin, case, scheme, kl), case.x, case.mask, case.layer, scheme, kl)
    assert report.explained_flips == 0 and not report.explained_rows
    assert report.codes_compared > 0


@pytest.mark.parametrize("sym", [True, False])
def test_a_flip_at_a_real_tie_is_explained_and_its_row_set_aside(sym):
    scheme = SplitQScheme.from_name("w4a4", act_symmetric=sym)
    case = exact_tie_case(scheme, seed=2)
    kl = prepare_kernel_layer(case.layer, scheme, "cpu")
    qin = quantize_input(case.x, case.layer, scheme)
    z = 0 if sym else qin.main.zero.long()
    ties = ((qin.main.codes.long() - z) * qin.main.scale.double() - case.xm_t).abs() == 0.5
    r, k = ties.nonzero()[0].tolist()
    other = 2 * (case.xm_t[r, k] / qin.main.scale[r, 0].double() + (0 if sym else z[r, 0])) - qin.main.codes[r, k]
    flipped = copy.deepcopy(qin)
    flipped.main.codes[r, k] = int(other)  # the other neighbour of the tie
    act = _as_kernel_output(flipped, case, scheme, kl)
    report = check_quantized_input(act, case.x, case.mask, case.layer, scheme, kl)
    assert report.explained_flips == 1 and report.rows_with_flips() == {r}
    if not sym:  # every zero point of this case is a tie: either neighbour is explained
        zflip = copy.deepcopy(qin)
        zflip.main.zero[r + 1, 0] += 1
        zflip.main.codes[r + 1] = (zflip.main.codes[r + 1].long() + 1).clamp(0, 15).to(zflip.main.codes.dtype)
        report = check_quantized_input(_as_kernel_output(zflip, case, scheme, kl), case.x, case.mask, case.layer,
                                       scheme, kl)
        assert ("main.zero", r + 1) in report.explained_rows


@pytest.mark.parametrize("what", ["code", "code_by_two", "scale", "zero", "mac_code", "h_cws", "h_mac"])
def test_anything_else_is_rejected(what):
    """Random data: no x / s lies near a rounding tie, so any changed code, scale or zero point, and
    any down product that is not the one of the codes, must be rejected."""
    scheme = SplitQScheme.from_name("w4a4", act_symmetric=what not in ("zero",))
    fl, _ = random_float_layer(53, 37, 3, 5, (5, 9), cws_rank=3, mac_rank=4, act_clip=0.9, seed=6)
    layer = quantize_linear(fl, scheme)
    kl = prepare_kernel_layer(layer, scheme, "cpu")
    x = random_activations(17, 53, seed=7)
    mask = torch.ones(17, dtype=torch.bool)
    qin = quantize_input(x, layer, scheme)
    case = type("Case", (), {"mask": mask, "layer": layer})
    act = _as_kernel_output(qin, case, scheme, kl)
    report = check_quantized_input(act, x, mask, layer, scheme, kl)  # unchanged: accepted
    assert report.explained_flips == 0
    bad = copy.deepcopy(qin)
    if what in ("code", "code_by_two"):
        bad.main.codes[2, 5] += 1 if what == "code" else 2
    elif what == "scale":
        bad.main.scale[4, 0] *= 1 + 1e-5
    elif what == "zero":
        bad.main.zero[4, 0] += 1
    elif what == "mac_code":
        bad.mac.codes[6, 7] += 1
    act = _as_kernel_output(bad, case, scheme, kl)
    if what == "h_cws":
        act.h_cws[3, 1] *= 1 + 1e-5
    if what == "h_mac":
        act.h_mac[3, 2] *= 1 + 1e-5
    message = {"code": "main: row 2 channel 5", "code_by_two": "main: row 2 channel 5", "scale": "main: row 4 scale",
               "zero": "main: row 4 zero point", "mac_code": "mac: row 6 channel 7", "h_cws": "h_cws",
               "h_mac": "h_mac"}[what]
    with pytest.raises(MismatchError, match=message):
        check_quantized_input(act, x, mask, layer, scheme, kl)


def test_output_tolerance_is_half_an_ulp_plus_float32_noise():
    scheme = SplitQScheme.from_name("w4a4")
    case = exact_tie_case(scheme, seed=5)
    expected = splitq_gemm(quantize_input(case.x, case.layer, scheme), case.mask, case.layer, scheme, torch.float32)
    nearest = expected.to(torch.bfloat16)
    assert check_outputs(nearest, expected) <= 1.0
    # one bf16 ulp away from the nearest (in the direction away from the value) is out
    bits = nearest.view(torch.int16)
    away = torch.where((expected - nearest.float()) >= 0, bits - 1, bits + 1)
    away = torch.where(nearest.float() >= 0, away, torch.where((expected - nearest.float()) >= 0, bits + 1, bits - 1))
    with pytest.raises(MismatchError):
        check_outputs(away.view(torch.bfloat16), expected)
    # float32 outputs: only rescaling noise
    with pytest.raises(MismatchError):
        check_outputs(expected * (1 + 1e-4), expected)
    assert check_outputs(expected * (1 + 1e-7), expected) <= 1.0
