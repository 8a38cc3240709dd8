"""Triton helpers shared by the SplitQ kernels: the reference's rounding, the quantization grid,
and a small matmul that also works below tensor-core tile sizes.

Numerics follow splitq_kernels.reference.quantizer exactly:
- scale = (clip * max) / qmax with an IEEE division (`div_rn`: Triton's `/` on fp32 is the
  approximate `div.full.f32` on NVIDIA GPUs), floored at 1e-8;
- code = clamp(rint(x / scale) + zero), rint = round half to even. `rint` uses the fp32
  magic-number trick, which is exact for |v| <= 2^22 under IEEE round-to-nearest-even addition
  and behaves the same compiled and interpreted; |v| is clamped to 2^22 first, which cannot
  change a clamped code (the code range is far smaller and the bounds are integers).

Float products (`fdot`) run at the layer's precision: a tl.dot input precision ("ieee", "tf32",
"tf32x3"), or "bf16" (SPLITQ_PRECISION=bf16; reference.transforms.operand): both operands rounded
to the nearest bfloat16 (`bf16_round`, ties to even, as torch rounds), float32 accumulation, on
bf16 tensor cores. In Triton's interpreter the rounding is done by bit arithmetic (its float32 ->
bfloat16 cast truncates) and the product in float32 (its bf16 tl.dot returns garbage; a product of
two bfloat16 values is exact in float32, so the result is the same).
"""

from __future__ import annotations

import os

import triton
import triton.language as tl

# fixed when the module is (re)loaded, as the kernels' mode is (splitq_kernels.triton.use_interpreter)
BF16_MMA = tl.constexpr(os.environ.get("TRITON_INTERPRET", "0") != "1")

SCALE_EPS = 1e-8  # == reference.quantizer.SCALE_EPS; qgrid writes it as a literal (jit code reads no float globals)


@triton.jit
def rint(v):
    """Round half to even for fp32 (exact for |v| <= 2^22; larger |v| are clamped first)."""
    v = tl.minimum(tl.maximum(v, -4194304.0), 4194304.0)
    return (v + 12582912.0) - 12582912.0


@triton.jit
def qgrid(hi, lo, clip, BITS: tl.constexpr, SYMMETRIC: tl.constexpr):
    """Per-row scale and zero point of Q (Eq. 1). Symmetric: hi = max |x| (lo unused), zero = 0.
    Asymmetric: hi = max x, lo = min x; zero = rint(-lo' / scale) in [0, 2^b - 1]."""
    if SYMMETRIC:
        s = tl.math.div_rn(clip * hi, tl.full(hi.shape, (1 << (BITS - 1)) - 1, tl.float32))
        s = tl.maximum(s, 1e-8)
        z = tl.zeros_like(s)
    else:
        # the grid must contain 0 (lo' <= 0 <= hi'), as in the reference
        h = tl.maximum(clip * hi, 0.0)
        l = tl.minimum(clip * lo, 0.0)
        s = tl.maximum(tl.math.div_rn(h - l, tl.full(hi.shape, (1 << BITS) - 1, tl.float32)), 1e-8)
        z = rint(tl.math.div_rn(-l, s))
    return s, z


@triton.jit
def stored_zero(z, BITS: tl.constexpr, SYMMETRIC: tl.constexpr):
    """The zero point in the domain of the stored codes, as int32: 0 when symmetric, z - 2^(b-1)
    otherwise (asymmetric codes are stored minus 2^(b-1), see qcodes). This is what kernel (a)
    writes next to the codes and what every zero-point correction subtracts:
    sum_k (q - z) d = sum_k stored * d - stored_zero * sum_k d."""
    # single exit: Triton 3.6 does not stop at a `return` inside a constexpr `if`
    if SYMMETRIC:
        zs = tl.zeros(z.shape, tl.int32)
    else:
        zs = (z - (1 << (BITS - 1))).to(tl.int32)
    return zs


@triton.jit
def qcodes(x, s, z, BITS: tl.constexpr, SYMMETRIC: tl.constexpr):
    """Quantize x (rows broadcast against s, z). Returns (stored, centered), both fp32 holding
    integers: `stored` is the int8 the kernels keep (the code itself when symmetric, code - 2^(b-1)
    when asymmetric, so 8-bit asymmetric codes fit int8), `centered` = code - zero."""
    v = rint(tl.math.div_rn(x, s))
    if SYMMETRIC:
        q = tl.minimum(tl.maximum(v, -(1 << (BITS - 1)) * 1.0), ((1 << (BITS - 1)) - 1) * 1.0)
        stored = q
        centered = q
    else:
        q = tl.minimum(tl.maximum(v + z, 0.0), ((1 << BITS) - 1) * 1.0)
        stored = q - (1 << (BITS - 1))
        centered = q - z
    return stored, centered


@triton.jit
def row_stats(x, valid, SYMMETRIC: tl.constexpr):
    """Per-row statistics of a [R, C] tile for Q: (max |x|, max |x|) when symmetric (the second is
    unused), (max, min) when not. Invalid entries are ignored."""
    if SYMMETRIC:
        hi = tl.max(tl.where(valid, tl.abs(x), 0.0), axis=1)
        lo = hi
    else:
        hi = tl.max(tl.where(valid, x, float("-inf")), axis=1)
        lo = tl.min(tl.where(valid, x, float("inf")), axis=1)
    return hi, lo


@triton.jit
def merge_stats(hi, lo, hi2, lo2, SYMMETRIC: tl.constexpr):
    """Combine two row_stats results (e.g. of consecutive column blocks)."""
    if SYMMETRIC:
        lo_out = lo
    else:
        lo_out = tl.minimum(lo, lo2)
    return tl.maximum(hi, hi2), lo_out


@triton.jit
def init_stats(ROWS: tl.constexpr, SYMMETRIC: tl.constexpr):
    """The neutral element of merge_stats for ROWS rows: 0 (max |x| >= 0) when symmetric,
    (-inf, +inf) when not."""
    if SYMMETRIC:
        hi = tl.zeros([ROWS], tl.float32)
        lo = tl.zeros([ROWS], tl.float32)
    else:
        hi = tl.full([ROWS], float("-inf"), tl.float32)
        lo = tl.full([ROWS], float("inf"), tl.float32)
    return hi, lo


@triton.jit
def bf16_round(x):
    """float32 x rounded to the nearest bfloat16 (ties to even), as float32. Bit arithmetic, so
    that the compiled kernel and the interpreter round alike (compiled Triton rounds to nearest
    even too; Triton 3.9's interpreter truncates, even with fp_downcast_rounding="rtne"). Finite x;
    |x| beyond bfloat16's range rounds to inf, as torch does."""
    bits = x.to(tl.uint32, bitcast=True)
    bits = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16) << 16
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def at_precision(x, PRECISION: tl.constexpr):
    """x as the layer's float products and scratch hold it: bfloat16-rounded under "bf16", else x."""
    if PRECISION == "bf16":
        out = bf16_round(x)
    else:
        out = x
    return out


@triton.jit
def fdot(a, b, acc, PRECISION: tl.constexpr):
    """acc + a @ b of float32 tiles (acc None: a @ b) at PRECISION (module doc)."""
    if PRECISION == "bf16":
        a16 = bf16_round(a)
        b16 = bf16_round(b)
        if BF16_MMA:
            out = tl.dot(a16.to(tl.bfloat16), b16.to(tl.bfloat16), acc)  # exact casts: already rounded
        else:
            out = tl.dot(a16, b16, acc, input_precision="ieee")
    else:
        out = tl.dot(a, b, acc, input_precision=PRECISION)
    return out


@triton.jit
def small_mm(a, b, acc, USE_DOT: tl.constexpr, INPUT_PRECISION: tl.constexpr):
    """acc + a @ b. tl.dot when every dim is at least a tensor-core tile (USE_DOT), else a
    broadcast-multiply-sum on CUDA cores (decode blocks of fewer than 16 rows)."""
    # single exit: Triton 3.6 does not stop at a `return` inside a constexpr `if`
    if USE_DOT:
        if a.dtype == tl.int8:
            out = tl.dot(a, b, acc, out_dtype=tl.int32)  # Triton 3.6 wants out_dtype spelled out
        else:
            out = fdot(a, b, acc, INPUT_PRECISION)
    else:
        if a.dtype == tl.int8:
            out = acc + tl.sum(a[:, :, None].to(acc.dtype) * b[None, :, :].to(acc.dtype), axis=1)
        else:  # float32 products of the rounded operands, as fdot's
            a_r = at_precision(a.to(tl.float32), INPUT_PRECISION)
            b_r = at_precision(b.to(tl.float32), INPUT_PRECISION)
            out = acc + tl.sum(a_r[:, :, None] * b_r[None, :, :], axis=1)
    return out
