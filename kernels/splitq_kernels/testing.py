"""What "the kernels match the reference" means, as executable checks shared by the tests and the
GPU benchmark (benchmarks/bench_kernels.py).

Three criteria (docs in each function):
1. `check_gemm` - kernel (b) fed with the reference's own quantized input equals `splitq_gemm` up
   to float32 rescaling (the integer sums are exact) and then the output dtype's rounding.
2. `check_quantized_input` - kernel (a)'s codes equal `quantize_input`'s, except +-1 flips that
   float32 rounding explains: the kernel computes the transforms in a different order than the
   reference (P1^T (R P2) vs (P1^T R) P2, other summation orders), so a code may flip only where
   the reference's pre-rounding value x / s lies within the two computations' proven float32
   error bound of a half-integer. Rows where such a flip happened in the main codes (or a scale
   or zero point moved across a rounding boundary) get a different MAC residual by design and are
   reported, not compared further.
3. `check_outputs` - the end-to-end output equals the reference's float32 output up to the final
   rounding to the output dtype (half an ulp) plus float32 rescaling noise (2^-17 of the row's
   largest value), on every row whose codes match the reference's exactly.

A kernel layer of precision "bf16" is compared with the reference's bf16 form (precision.
reference_precision): the same bfloat16 roundings, so the bounds only grow by what a different
float32 summation order can do to them, one bfloat16 ulp where a value lies that close to a
rounding boundary (BF16_ULP).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .layout import KernelLayer
from .precision import reference_precision
from .reference.forward import (
    QuantizedInput,
    int_linear,
    mac_row_mask,
    quantize_input,
    splitq_gemm,
    transformed_inputs,
)
from .reference.layer import SplitQLinear
from .reference.quantizer import QuantizedTensor, qrange
from .reference.scheme import SplitQScheme
from .reference.transforms import main_transform
from .triton.quantize_input import QuantizedActivations, code_offsets

EPS32 = 2.0**-24  # unit roundoff of float32
BF16_ULP = 2.0**-7  # a bfloat16 ulp relative to |x| (at most): what one rounding flip can move a value
RESCALE_NOISE = 2.0**-17  # float32 rescaling noise allowed in outputs, relative to the row's max |y|


class MismatchError(AssertionError):
    pass


# ---------------------------------------------------------------------------------------------
# Conversions between the kernels' activations and the reference's QuantizedInput
# ---------------------------------------------------------------------------------------------


def _to_reference(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int, sym: bool) -> QuantizedTensor:
    if sym:
        return QuantizedTensor(codes.to(torch.int8), scale.reshape(-1, 1).float(), None, bits)
    off = 1 << (bits - 1)
    return QuantizedTensor(
        codes.to(torch.int16) + off, scale.reshape(-1, 1).float(), (zero.to(torch.int16) + off).reshape(-1, 1), bits,
    )


def activations_to_reference(act: QuantizedActivations, kl: KernelLayer) -> QuantizedInput:
    """Kernel (a)'s outputs as the reference's QuantizedInput (needs act.mac_codes when MAC is on)."""
    off_t, off_v, _ = code_offsets(kl)
    sym = kl.act_symmetric
    main = _to_reference(act.codes[:, : kl.main], act.scale[:, 0], act.zero[:, 0], kl.act_bits, sym)
    text = vision = mac = None
    if kl.text:
        text = _to_reference(act.codes[:, off_t : off_t + kl.text], act.scale[:, 1], act.zero[:, 1], kl.aux_act_bits, sym)
    if kl.vision:
        vision = _to_reference(act.codes[:, off_v : off_v + kl.vision], act.scale[:, 2], act.zero[:, 2], kl.aux_act_bits, sym)
    if kl.mac_rank:
        if act.mac_codes is None:
            raise ValueError("run kernel (a) with store_mac=True to compare the MAC residual codes")
        mac = _to_reference(act.mac_codes, act.scale[:, 3], act.zero[:, 3], kl.aux_act_bits, sym)
    return QuantizedInput(main=main, text=text, vision=vision, mac=mac)


def reference_to_activations(
    qin: QuantizedInput, text_mask: torch.Tensor, layer: SplitQLinear, scheme: SplitQScheme, kl: KernelLayer,
    device: torch.device | str,
) -> QuantizedActivations:
    """The reference's QuantizedInput in kernel (b)'s input layout, with the down products computed
    the reference's way (exact integer sums rescaled in float64, rounded to float32)."""
    T = qin.main.codes.shape[0]
    src = qin.main.codes.device
    off_t, off_v, width = code_offsets(kl)
    codes = torch.zeros(T, width, dtype=torch.int8, device=src)
    scale = torch.ones(T, 4, dtype=torch.float32, device=src)
    zero = torch.zeros(T, 4, dtype=torch.int32, device=src)

    def put(q: QuantizedTensor | None, col: int | None, slot: int, bits: int) -> None:
        if q is None:
            return
        off = 0 if q.zero is None else 1 << (bits - 1)
        if col is not None:
            codes[:, col : col + q.codes.shape[1]] = (q.codes.to(torch.int32) - off).to(torch.int8)
        scale[:, slot] = q.scale.reshape(-1).float()
        if q.zero is not None:
            zero[:, slot] = q.zero.reshape(-1).to(torch.int32) - off

    put(qin.main, 0, 0, scheme.act_bits)
    put(qin.text, off_t, 1, scheme.aux_act_bits)
    put(qin.vision, off_v, 2, scheme.aux_act_bits)
    put(qin.mac, None, 3, scheme.aux_act_bits)  # the GEMM only needs h_mac; scale/zero for completeness

    def hpad(h: torch.Tensor, rp: int) -> torch.Tensor:
        out = torch.zeros(T, rp, dtype=torch.float32, device=src)
        out[:, : h.shape[1]] = h
        return out

    h_cws = h_mac = None
    if layer.cws_down is not None:
        h_cws = hpad(int_linear(qin.main, layer.cws_down, torch.float32), kl.cws_rank_padded)
    if layer.mac_down is not None:
        h = int_linear(qin.mac, layer.mac_down, torch.float32)
        rows = mac_row_mask(text_mask.to(h.device), scheme.mac_rows)
        h_mac = hpad(torch.where(rows[:, None], h, torch.zeros((), device=src)), kl.mac_rank_padded)
    dev = torch.device(device)
    return QuantizedActivations(
        codes.to(dev), scale.to(dev), zero.to(dev),
        None if h_cws is None else h_cws.to(dev), None if h_mac is None else h_mac.to(dev),
    )


# ---------------------------------------------------------------------------------------------
# Criterion 3 (and 1): outputs
# ---------------------------------------------------------------------------------------------


def ulp(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The spacing of `dtype` numbers at |x| (float64)."""
    mant = {torch.bfloat16: 7, torch.float16: 10, torch.float32: 23}[dtype]
    tiny = {torch.bfloat16: 2.0**-126, torch.float16: 2.0**-14, torch.float32: 2.0**-126}[dtype]
    a = x.abs().double().clamp(min=tiny)
    return torch.exp2(torch.floor(torch.log2(a)) - mant)


def output_tolerance(expected: torch.Tensor, actual: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Half an ulp of `dtype` at the larger of |expected|, |actual| (the final rounding; zero for
    float32 outputs, whose rounding is part of the noise) plus float32 rescaling noise."""
    e = expected.double()
    a = actual.double()
    final = 0.5 * ulp(torch.maximum(e.abs(), a.abs()), dtype) if dtype != torch.float32 else torch.zeros_like(e)
    noise = RESCALE_NOISE * e.abs().amax(dim=-1, keepdim=True)
    return final + noise


def check_outputs(
    actual: torch.Tensor, expected: torch.Tensor, rows: torch.Tensor | None = None, what: str = "output",
    extra: torch.Tensor | None = None,
) -> float:
    """|actual - expected| <= output_tolerance (+ `extra`, per element) on the selected rows
    (default: all). `expected` is the reference in float32 (before its own cast to actual.dtype).
    Returns the worst ratio of error to tolerance (<= 1 passes)."""
    e = expected.detach().double()
    a = actual.detach().to(e.device)
    if extra is not None:
        extra = extra.detach().to(e.device).double()
    if rows is not None:
        a, e = a[rows.to(e.device)], e[rows.to(e.device)]
        extra = None if extra is None else extra[rows.to(e.device)]
    if a.numel() == 0:
        return 0.0
    tol = output_tolerance(e, a, actual.dtype) + (0 if extra is None else extra)
    err = (a.double() - e).abs()
    ratio = float((err / tol.clamp(min=1e-300)).max())
    if not bool((err <= tol).all()):
        i = int((err - tol).argmax())
        r, c = divmod(i, e.shape[-1])
        raise MismatchError(
            f"{what}: row {r} col {c}: got {float(a.reshape(-1)[i])}, reference {float(e.reshape(-1)[i])}, "
            f"error {float(err.reshape(-1)[i]):.3g} > tolerance {float(tol.reshape(-1)[i]):.3g}"
        )
    return ratio


def check_gemm(
    kernel_gemm, qin: QuantizedInput, text_mask: torch.Tensor, layer: SplitQLinear, scheme: SplitQScheme,
    kl: KernelLayer, out_dtype: torch.dtype, device: torch.device | str,
) -> float:
    """Criterion 1: kernel (b) on the reference's quantized input vs reference.splitq_gemm.
    `kernel_gemm(act, kl, out_dtype) -> y`."""
    act = reference_to_activations(qin, text_mask, layer, scheme, kl, device)
    y = kernel_gemm(act, kl, out_dtype)
    expected = splitq_gemm(qin, text_mask.to(layer.idx_main.device), layer, scheme, torch.float32,
                           precision=reference_precision(kl.precision))
    return check_outputs(y, expected, what="gemm")


# ---------------------------------------------------------------------------------------------
# Criterion 2: quantized activations
# ---------------------------------------------------------------------------------------------


@dataclass
class QuantizeReport:
    rows: int
    codes_compared: int = 0
    explained_flips: int = 0  # +-1 code flips at proven near-ties
    explained_rows: list[tuple[str, int]] = field(default_factory=list)  # (path, row) excluded downstream
    max_down_error: float = 0.0  # worst |h - h(own codes)| / bound

    def rows_with_flips(self) -> set[int]:
        return {r for _, r in self.explained_rows}


def _main_error_bound(x: torch.Tensor, layer: SplitQLinear, precision: str = "float32") -> torch.Tensor:
    """Float32 error bound of the main transform per element, valid for any summation order:
    gamma * |P1|^T |X_m * smooth| |P2| with gamma = (n1 + n2 + 2) u (float64). bf16: plus a
    bfloat16 ulp of the intermediate R P2 (carried through |P1|^T) and of the stored result, which
    a float32 difference can flip where a value lies at a rounding boundary: 2 BF16_ULP of the
    same magnitude (bounded by |P1|^T |R| |P2|, with the operands' rounding, 1 + 2^-8 each, folded in)."""
    xs = (x.double()[:, layer.idx_main] * layer.main_smooth.double()).abs()
    n1, n2 = layer.kron_shape
    mag = main_transform(xs, torch.ones_like(layer.main_smooth, dtype=torch.float64),
                         layer.main_p1.double().abs(), layer.main_p2.double().abs())
    bound = (n1 + n2 + 2) * EPS32 * mag * 1.01
    return bound if precision == "float32" else bound * 1.05 + 2 * BF16_ULP * mag * 1.05


def _dense_error_bound(x: torch.Tensor, idx: torch.Tensor, p: torch.Tensor, precision: str = "float32") -> torch.Tensor:
    mag = x.double()[:, idx].abs() @ p.double().abs()
    bound = (idx.numel() + 1) * EPS32 * mag * 1.01
    return bound if precision == "float32" else bound * 1.02 + BF16_ULP * mag * 1.02


def up_flip_tolerance(qin: QuantizedInput, layer: SplitQLinear, precision: str) -> torch.Tensor | None:
    """bf16: what the up products can differ by when the kernel's h (rescaled in float32) and the
    reference's (in float64) round to neighbouring bfloat16 values: BF16_ULP |h| |U|^T per branch
    (None under float32, where h's rescaling noise is part of the output tolerance)."""
    if precision == "float32":
        return None
    tol = None
    for q, down, up in ((qin.main, layer.cws_down, layer.cws_up), (qin.mac, layer.mac_down, layer.mac_up)):
        if down is None or q is None:
            continue
        t = BF16_ULP * int_linear(q, down, torch.float64).abs() @ up.dequantize(torch.float64).abs().transpose(0, 1)
        tol = t if tol is None else tol + t
    return tol


def _near_half(v: torch.Tensor, tol: torch.Tensor) -> torch.Tensor:
    """|v - (nearest half-integer)| <= tol."""
    return (torch.abs(v - torch.floor(v) - 0.5) <= tol)


def _compare_path(
    name: str, got: QuantizedTensor, ref: QuantizedTensor, pre: torch.Tensor, bound: torch.Tensor,
    clip: float, bits: int, sym: bool, report: QuantizeReport, skip_rows: set[int],
) -> set[int]:
    """Compare one quantized path; returns the rows with (explained) differences."""
    T = pre.shape[0]
    pre = pre.double()
    s_ref = ref.scale.double().reshape(-1)
    s_got = got.scale.double().reshape(-1)
    qmin, qmax = qrange(bits, sym)
    # scale: hi (and lo) move by at most the largest element bound; s by clip * that / qmax
    row_bound = bound.amax(dim=1) if bound.numel() else torch.zeros(T, dtype=torch.float64, device=pre.device)
    ds = clip * row_bound * (1 if sym else 2) / qmax + 4 * EPS32 * s_ref
    flipped: set[int] = set()
    bad_scale = (s_got - s_ref).abs() > ds
    if bool(bad_scale.any()):
        r = int(bad_scale.nonzero()[0])
        raise MismatchError(f"{name}: row {r} scale {float(s_got[r])} vs reference {float(s_ref[r])} (bound {float(ds[r]):.3g})")
    v = pre / s_ref[:, None]
    tol = 2 * bound / s_ref[:, None] + v.abs() * (ds / s_ref)[:, None] + 8 * EPS32 * (v.abs() + 1)
    if not sym:
        z_ref = ref.zero.reshape(-1).double()
        z_got = got.zero.reshape(-1).double()
        lo = torch.clamp(clip * pre.amin(dim=1), max=0)
        vz = -lo / s_ref
        tz = 2 * clip * row_bound / s_ref + vz.abs() * ds / s_ref + 8 * EPS32 * (vz.abs() + 1)
        dz = z_got != z_ref
        if bool(dz.any()):
            ok = dz & ((z_got - z_ref).abs() == 1) & _near_half(vz, tz)
            if not bool(ok[dz].all()):
                r = int((dz & ~ok).nonzero()[0])
                raise MismatchError(f"{name}: row {r} zero point {int(z_got[r])} vs reference {int(z_ref[r])}, not at a rounding tie")
            for r in dz.nonzero().reshape(-1).tolist():
                flipped.add(r)
                report.explained_rows.append((name + ".zero", r))
    c_got = got.codes.long()
    c_ref = ref.codes.long()
    diff = c_got != c_ref
    for r in range(T):
        if r in skip_rows or r in flipped:
            continue
        report.codes_compared += pre.shape[1]
        d = diff[r]
        if not bool(d.any()):
            continue
        explained = d & ((c_got[r] - c_ref[r]).abs() == 1) & _near_half(v[r], tol[r])
        if not bool(explained[d].all()):
            k = int((d & ~explained).nonzero()[0])
            raise MismatchError(
                f"{name}: row {r} channel {k}: code {int(c_got[r, k])} vs reference {int(c_ref[r, k])}, "
                f"x/s = {float(v[r, k]):.9g} is not within {float(tol[r, k]):.3g} of a rounding tie"
            )
        report.explained_flips += int(d.sum())
        report.explained_rows.append((name, r))
        flipped.add(r)
    return flipped


def check_quantized_input(
    act: QuantizedActivations, x: torch.Tensor, text_mask: torch.Tensor, layer: SplitQLinear,
    scheme: SplitQScheme, kl: KernelLayer,
) -> QuantizeReport:
    """Criterion 2 (see module doc), plus: the down products equal those of the kernel's own codes
    (exact integer sums; float32 rescaling only). Needs act.mac_codes when MAC is on."""
    dev = layer.idx_main.device  # the reference runs where the layer is (CPU in tests, GPU in benchmarks)
    x = x.detach().to(dev).reshape(-1, layer.in_features)
    mask = text_mask.detach().to(dev).reshape(-1)
    T = x.shape[0]
    rp = reference_precision(kl.precision)
    ref = quantize_input(x, layer, scheme, rp)
    got = activations_to_reference(act, kl)
    sym = scheme.act_symmetric
    xf = x.float()
    report = QuantizeReport(rows=T)
    pre_main, pre_text, pre_vision = transformed_inputs(xf, layer, rp)
    bound_main = _main_error_bound(x, layer, rp)
    main_rows = _compare_path("main", got.main, ref.main, pre_main, bound_main, float(layer.main_act_clip),
                              scheme.act_bits, sym, report, set())
    for name, idx, p, pre, clip, g, r in (
        ("text", layer.idx_text, layer.text_p, pre_text, layer.text_act_clip, got.text, ref.text),
        ("vision", layer.idx_vision, layer.vision_p, pre_vision, layer.vision_act_clip, got.vision, ref.vision),
    ):
        if idx.numel():
            _compare_path(name, g, r, pre, _dense_error_bound(x, idx, p, rp), float(clip),
                          scheme.aux_act_bits, sym, report, set())
    if ref.mac is not None:
        # the residual of a row depends on its main codes and scale: compare rows without main flips
        res_pre = pre_main - ref.main.dequantize(torch.float32)
        # kernel vs reference residual: the x' error, the main scale's movement times the code, and
        # the rounding of (q - z) * s, which happens at the magnitude of x', not of the residual
        s_m = ref.main.scale.double().reshape(-1, 1)
        qmax = qrange(scheme.act_bits, sym)[1]
        ds_m = float(layer.main_act_clip) * bound_main.amax(dim=1, keepdim=True) * (1 if sym else 2) / qmax
        ds_m = ds_m + 4 * EPS32 * s_m
        bound_res = bound_main + ref.main.centered().abs() * ds_m + 2 * EPS32 * pre_main.double().abs()
        # ... and on the rows MAC targets only: a block of kernel (a) without any skips the pass and
        # leaves those rows' residual codes unwritten (their h_mac is zero either way, checked below)
        untargeted = set((~mac_row_mask(mask, scheme.mac_rows)).nonzero().reshape(-1).tolist())
        _compare_path("mac", got.mac, ref.mac, res_pre, bound_res, float(layer.mac_act_clip), scheme.aux_act_bits,
                      sym, report, main_rows | untargeted)
    # down products against the kernel's own codes
    for name, h, qa, w, sel in (
        ("h_cws", act.h_cws, got.main, layer.cws_down, None),
        ("h_mac", act.h_mac, got.mac, layer.mac_down, mac_row_mask(mask, scheme.mac_rows)),
    ):
        if w is None:
            continue
        r = w.codes.shape[0]
        exact = int_linear(qa, w, torch.float64)
        if sel is not None:
            exact = torch.where(sel[:, None], exact, torch.zeros((), dtype=torch.float64, device=exact.device))
        hk = h.detach().to(dev).double()
        if bool(hk[:, r:].ne(0).any()):
            raise MismatchError(f"{name}: padding columns are not zero")
        err = (hk[:, :r] - exact).abs()
        bound = 4 * EPS32 * exact.abs() + 1e-30
        report.max_down_error = max(report.max_down_error, float((err / bound).max()))
        if not bool((err <= bound).all()):
            i = int((err - bound).argmax())
            raise MismatchError(f"{name}: element {divmod(i, r)} = {float(hk[:, :r].reshape(-1)[i])}, own codes give {float(exact.reshape(-1)[i])}")
    return report


def check_linear(
    y: torch.Tensor, act: QuantizedActivations, x: torch.Tensor, text_mask: torch.Tensor, layer: SplitQLinear,
    scheme: SplitQScheme, kl: KernelLayer,
) -> tuple[QuantizeReport, float, float]:
    """End to end: (a) criterion 2 on kernel (a)'s outputs; (b) y against the reference GEMM
    applied to the kernel's own quantized input (all rows, criterion 3); (c) y against the full
    reference splitq_linear on every row whose codes all match (criterion 3). Returns the report
    and the worst error/tolerance ratios of (b) and (c)."""
    dev = layer.idx_main.device
    x = x.detach().to(dev)
    mask = text_mask.detach().to(dev).reshape(-1)
    report = check_quantized_input(act, x, mask, layer, scheme, kl)
    rp = reference_precision(kl.precision)
    own_in = activations_to_reference(act, kl)
    own = splitq_gemm(own_in, mask, layer, scheme, torch.float32, precision=rp)
    r_own = check_outputs(y, own, what="output vs reference GEMM on the kernel's codes",
                          extra=up_flip_tolerance(own_in, layer, rp))
    full_in = quantize_input(x.reshape(-1, layer.in_features), layer, scheme, rp)
    full = splitq_gemm(full_in, mask, layer, scheme, torch.float32, precision=rp)
    keep = torch.ones(y.shape[0], dtype=torch.bool, device=dev)
    for r in report.rows_with_flips():
        keep[r] = False
    r_full = check_outputs(y, full, rows=keep, what="output vs reference", extra=up_flip_tolerance(full_in, layer, rp))
    return report, r_own, r_full
