#!/usr/bin/env python
"""Roofline cost model of a SplitQ linear, launch by launch, so that a design is judged before a
GPU measures it and a measurement is compared with a prediction after (issue 13).

    python benchmarks/cost_model.py                          # every linear of 3B/7B/72B, all rows, markdown
    python benchmarks/cost_model.py --models 7b --rows 1,16 --hardware h200 --design decode
    python benchmarks/cost_model.py --targets                # the issue's targets, predicted
    python benchmarks/cost_model.py --json cost.json

For each linear of Qwen2.5-VL-3B/7B/72B (shapes: splitq_kernels.triton.aot.MODEL_SHAPES, the
project's one copy; default channel split of splitq_vllm.testing.layers.default_layer_dims) and
each row count, every launch of a variant gets: the DRAM bytes it must move, the operations it
must do on tensor cores (int8 MMA, tf32) and on CUDA cores, and a roofline time

    t = max(bytes / (bw * f), mma_ops / (peak * f), cuda_ops / (cuda_peak * f)) + LAUNCH_S

where f = min(1, programs / SMs) is the fraction of the chip the launch's grid can use (one
program per SM at most is assumed resident: the kernels use most of an SM's registers), except
that a single program streams memory at SINGLE_SM_BW_FACTOR times its fair share. The predicted
ratio to BF16 is t(bf16) / t(variant), bf16 being one cuBLAS launch.

Variants (as benchmarks/bench_kernels.py times them): bf16, w4a4_gemm (kernel (b) alone, main
path only, pre-quantized activations: the plain W4A4 GEMM), mocd (kernels (a) + (b), outlier
paths), mocd+cws, splitq (+ MAC). Designs: `current` (the persistent kernel (a), one program
per 16 rows, so one program at decode, then the GEMM), `decode` (as built, what
torch.ops.splitq.linear runs at <= 16 rows, two launches: kernels/splitq_kernels/triton/
quantize_decode.py's D1 transform split over transform tiles and outlier-set column blocks and
D2 quantize + CWS down split over 64-channel blocks, in one grid (D2's programs wait for D1's:
`Launch.phases`, GRID_WAIT_S), then the GEMM, whose first programs do the MAC residual + down;
above 16 rows it is `current`), `decode3` (D1 and D2 as two launches, then the GEMM with the
MAC down: three launches) and `decode4` (the first design: the MAC down as a launch of its own,
D3, before the GEMM; what the two halves torch.ops.splitq.quantize_input and
torch.ops.splitq.gemm still run, with D1 + D2 fused, when called one after the other).
`w4a16` (SPLITQ_DECODE_MODE=w4a16, kernels/splitq_kernels/triton/w4a16.py): at <= 16 rows D1 then
a weight-only GEMM on float32 activations (the CWS down in its grid, no MAC); above, `decode`.
`Launch.single` models work that one program of a grid does alone (none now).
Precisions (`--precision`, SPLITQ_PRECISION, kernels/splitq_kernels/precision.py): `float32` (the
float products as tf32x3, three tf32 MMAs each; float32 scratch) or `bf16` (one bf16 MMA each, at
twice tf32's rate: a sixth of the tensor-core time; bfloat16 scratch: half its bytes; the W4A16
weight product in bf16 instead of one-pass tf32).
`--mac-tiles F` (prefill, > 16 rows): the share of row blocks that hold a row MAC targets. The
kernels skip the MAC work of the others (kernel (a)'s MAC pass per block of 16 rows, the GEMM's MAC
up product per tile of rows whose h_mac is all zero): an image's rows, with MAC on text rows, are
most of a multimodal prefill. Default 1 (every block: the benchmark's random masks).

What it leaves out (so a measurement can fall short of it): L2 traffic (split-K atomics, the
redundant reads of the gathered input, scratch that stays in L2 at decode is counted as DRAM
anyway), instruction issue limits, tile quantisation waves, pipeline ramp. Constants marked
"assumed" are not measured: the GPU run (benchmarks/gpu_check.sh) measures what they stand for.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "kernels"))

from splitq_kernels.precision import PRECISION_SETTINGS
from splitq_kernels.triton.aot import MODEL_SHAPES

# ---------------------------------------------------------------------------------------------
# hardware ceilings
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Hardware:
    name: str
    bw: float  # DRAM bytes/s (read + written)
    bf16: float  # dense tensor-core FLOP/s
    int8: float  # dense tensor-core OP/s (int8 MMA, int32 accumulation)
    tf32: float  # dense tensor-core FLOP/s at tf32 (tf32x3 costs three of these)
    cuda_fp32: float  # CUDA-core FLOP/s (an FMA = 2); integer ops are taken at half this rate
    sms: int
    source: str


HARDWARE = {
    # measured on the project's GPU machine (notes/environment.md, BENCHMARKS.md); int8 = 2x the
    # measured bf16 (Hopper's int8 MMA rate is twice bf16; not measured yet: gpu_check.sh does)
    "h100": Hardware("H100 SXM", 3.0e12, 800e12, 1600e12, 400e12, 67e12, 132,
                     "bw, bf16 measured; int8 = 2x bf16, tf32 = bf16 / 2, fp32 from the data sheet"),
    "h200": Hardware("H200", 4.3e12, 790e12, 1580e12, 395e12, 67e12, 132,
                     "bw, bf16 measured; int8 = 2x bf16, tf32 = bf16 / 2, fp32 from the data sheet"),
    # the figures (data sheet); tf32 and fp32 from the data sheet
    "rtx4090": Hardware("RTX 4090", 1.0e12, 165e12, 660e12, 82.6e12, 82.6e12, 128, "data sheet"),
}

LAUNCH_S = 1.5e-6  # assumed: time floor of one kernel in a replayed CUDA graph (launch + ramp + tail)
SINGLE_SM_BW_FACTOR = 3.0  # assumed: one SM alone streams ~3x its 1/SMs share of DRAM bandwidth
GRID_WAIT_S = 0.7e-6  # assumed: from the last producer's release atomic to a waiting program of the same grid seeing it
UNPACK_OPS_PER_CODE = 3  # CUDA-core integer ops to unpack one weight code (shift, mask, offset)
DECODE_ROWS = 16  # kernels: <= 16 rows is decode (one 16-row tile, split-K)

VARIANTS = ("bf16", "w4a4_gemm", "mocd", "mocd+cws", "splitq")
DESIGNS = ("current", "decode", "decode3", "decode4", "w4a16")
PRECISIONS = PRECISION_SETTINGS  # SPLITQ_PRECISION's values
ROWS = (1, 16, 256, 2048)


def _next_pow2(n: int) -> int:
    return 1 if n <= 1 else 1 << (n - 1).bit_length()


def _padded_rank(r: int) -> int:  # splitq_kernels.layout.padded_rank, without importing torch
    return 0 if r == 0 else max(16, _next_pow2(r))


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def layer_dims(d_in: int, d_out: int) -> dict:
    """The default channel split (splitq_vllm.testing.layers.default_layer_dims: imported when
    available so there is one definition; torch is not needed for this arithmetic)."""
    try:
        from splitq_vllm.testing.layers import default_layer_dims
    except ImportError as e:  # pragma: no cover - the repository root is not on the path
        raise ImportError("run from the repository root with it on PYTHONPATH (splitq_vllm.testing)") from e
    return default_layer_dims(d_in, d_out)


# ---------------------------------------------------------------------------------------------
# launches
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Launch:
    name: str
    programs: int
    bytes: float = 0.0  # DRAM bytes
    mma_int8: float = 0.0  # int8 MMA ops (2 per multiply-add)
    mma_tf32: float = 0.0  # tf32 MMA FLOPs (tf32x3 counted three times)
    mma_bf16: float = 0.0
    cuda_ops: float = 0.0  # CUDA-core ops (fp32 FLOPs or integer ops)
    # work done by single programs of the same grid alongside the rest (D1's outlier sets): the
    # launch lasts at least as long as the slowest of them
    single: list = dataclasses.field(default_factory=list)

    # phases run one after another inside this one launch (the fused D1 + D2: D2's programs wait
    # for D1's by an arrival counter): the launch pays one floor, each phase its work, and each wait
    # GRID_WAIT_S; bytes that a later phase loads before its wait (`prefetched`) overlap the phase
    # before when every program of the grid is resident at once (programs <= SMs)
    phases: list = dataclasses.field(default_factory=list)
    prefetched: float = 0.0

    def time(self, hw: Hardware) -> dict:
        if self.phases:
            return self._phased_time(hw)
        out = self._time(hw)
        for part in self.single:
            t = part._time(hw)
            if t["s"] > out["s"]:
                out = {**t, "bound": f"single program ({t['bound']})"}
        return out

    def _phased_time(self, hw: Hardware) -> dict:
        parts = []
        for i, ph in enumerate(self.phases):
            if i > 0 and self.prefetched and self.programs <= hw.sms:
                ph = dataclasses.replace(ph, bytes=ph.bytes - self.prefetched)
            parts.append(ph._time(hw))
        work = sum(t["s"] - LAUNCH_S for t in parts)
        waits = GRID_WAIT_S * (len(self.phases) - 1)
        slowest = max(range(len(parts)), key=lambda i: parts[i]["s"])
        return {"s": LAUNCH_S + work + waits, "bound": f"phases ({parts[slowest]['bound']})",
                **{k: sum(t[k] for t in parts) for k in ("memory_s", "mma_s", "cuda_s")}, "wait_s": waits}

    def _time(self, hw: Hardware) -> dict:
        f = min(1.0, self.programs / hw.sms)
        bw = hw.bw * min(1.0, max(f, SINGLE_SM_BW_FACTOR / hw.sms))
        parts = {
            "memory": self.bytes / bw,
            "mma": (self.mma_int8 / hw.int8 + self.mma_tf32 / hw.tf32 + self.mma_bf16 / hw.bf16) / f,
            "cuda": self.cuda_ops / (hw.cuda_fp32 * f),
        }
        bound = max(parts, key=parts.get)
        return {"s": parts[bound] + LAUNCH_S, "bound": bound, **{f"{k}_s": v for k, v in parts.items()}}


@dataclasses.dataclass(frozen=True)
class Shape:
    d_in: int
    d_out: int
    main: int
    text: int
    vision: int
    n1: int
    n2: int
    cws_rp: int  # ranks padded to a power of two >= 16 (what kernel (a) reads)
    mac_rp: int
    cws_rb: int  # ranks rounded up to the GEMM epilogue's BLOCK_RANK = 32 (what kernel (b) reads)
    mac_rb: int

    @classmethod
    def of(cls, d_in: int, d_out: int) -> Shape:
        d = layer_dims(d_in, d_out)
        return cls(d_in, d_out, d_in - d["n_text"] - d["n_vision"], d["n_text"], d["n_vision"], d["kron"][0],
                   d["kron"][1], _padded_rank(d["cws_rank"]), _padded_rank(d["mac_rank"]),
                   _cdiv(d["cws_rank"], 32) * 32, _cdiv(d["mac_rank"], 32) * 32)


def _tf32x3(flops: float) -> float:
    return 3 * flops  # "tf32x3": three tf32 products per float32 product (the default precision)


def _float_mma(L: "Launch", flops: float, precision: str) -> None:
    """Add a float product of `flops` to L: tf32x3 (float32) or one bf16 MMA (bf16)."""
    if precision == "bf16":
        L.mma_bf16 += flops
    else:
        L.mma_tf32 += _tf32x3(flops)


def _scratch_bytes(precision: str) -> int:
    return 2 if precision == "bf16" else 4  # per transformed element in the scratch


def _gemm_tiles(T: int) -> tuple[int, int]:  # gemm.default_config: (block_m, block_n)
    if T <= DECODE_ROWS:
        return 16, 64
    return (64, 128) if T <= 128 else (128, 128)


def gemm_launch(s: Shape, T: int, hw: Hardware, wbits: int, abits_aux: int, outliers: bool, cws: bool, mac: bool,
                precision: str = "float32", mac_tiles: float = 1.0) -> Launch:
    """Kernel (b): int8-MMA GEMM over the main (and outlier) K ranges, low-rank up products and
    rescaling in the epilogue (the MAC up product on `mac_tiles` of the row tiles above 16 rows)."""
    bm, bn = _gemm_tiles(T)
    tm, tiles = _cdiv(T, bm), _cdiv(s.d_out, bn)
    k = s.main + (s.text + s.vision if outliers else 0)
    ranks = (s.cws_rb if cws else 0) + (s.mac_rb if mac else 0) * (mac_tiles if T > DECODE_ROWS else 1.0)
    split = max(1, min(64, 4 * hw.sms // tiles)) if T <= DECODE_ROWS else 1
    w = s.main * s.d_out * wbits / 8 + (s.text + s.vision) * s.d_out * abits_aux / 8 * outliers
    paths = 1 + 2 * outliers
    L = Launch("gemm", tm * tiles * split)
    L.bytes = w + paths * s.d_out * 8 + ranks * s.d_out + T * k + T * ranks * 4 + T * s.d_out * 2
    rows = tm * bm  # tensor-core work is done on whole row tiles
    L.mma_int8 = 2 * rows * k * s.d_out
    _float_mma(L, 2 * rows * ranks * s.d_out, precision)
    L.cuda_ops = UNPACK_OPS_PER_CODE * k * s.d_out * tm
    return L


def mac_down_work(s: Shape, T: int, name: str, precision: str = "float32") -> Launch:
    """The MAC residual codes and down product over blocks of 64 main channels (D3's programs, or
    the GEMM's first programs in the decode design)."""
    L = Launch(name, _cdiv(s.main, 64))
    L.bytes = T * s.main * _scratch_bytes(precision) + s.main * s.mac_rp + T * s.mac_rp * 4
    L.mma_int8 = 2 * 16 * s.main * s.mac_rp
    L.cuda_ops = 12 * T * s.main
    return L


def quantize_launches(s: Shape, T: int, hw: Hardware, design: str, outliers: bool, cws: bool, mac: bool,
                      precision: str = "float32", mac_tiles: float = 1.0) -> list[Launch]:
    """Kernel (a) (design current) or D1 + D2 (+ D3 in design decode4) at <= 16 rows."""
    sb = _scratch_bytes(precision)
    ranks = (s.cws_rp if cws else 0) + (s.mac_rp if mac else 0)
    po = (s.text**2 + s.vision**2) * 4 if outliers else 0
    transforms = (s.n1**2 + s.n2**2) * 4 + s.main * 4 + po
    xform_flops = 2 * s.main * (s.n1 + s.n2) + 2 * (s.text**2 + s.vision**2) * outliers  # per row
    out_bytes = T * s.d_in + T * 16 + T * ranks * 4  # codes, scales / zeros, h_cws / h_mac
    if design in ("decode", "decode3", "decode4") and T <= DECODE_ROWS:
        # D1: transform tiles [16 x 16] of (n1, n2) and token groups per program
        # (+ the outlier sets' dense transforms, one program per 64 output columns of a set)
        po_blocks = (_cdiv(s.text, 64) + _cdiv(s.vision, 64)) * outliers
        # tokens per Kronecker tile as quantize_decode plans them (KRON_Z_ELEMENTS = 4096 elements of
        # Z, 16 columns): the products run on whole groups of tokens, one group per program
        tpt = max(1, min(DECODE_ROWS, 4096 // (max(16, _next_pow2(s.n1)) * 16)))
        d1 = Launch("d1_transform", _cdiv(s.n1, 16) * _cdiv(s.n2, 16) * _cdiv(T, tpt) + po_blocks)
        d1.bytes = T * s.d_in * 2 + transforms + T * s.d_in * sb
        _float_mma(d1, _cdiv(T, tpt) * tpt * xform_flops, precision)
        # D2: quantize + CWS down over blocks of 64 main channels (per-row stats from D1's atomics)
        d2 = Launch("d2_quantize_down", _cdiv(s.main, 64) + po_blocks)
        d2.bytes = T * s.main * sb + s.main * (s.cws_rp if cws else 0) + out_bytes
        d2.mma_int8 = 2 * 16 * s.main * (s.cws_rp if cws else 0)
        d2.cuda_ops = 8 * T * s.d_in
        if design == "decode":  # as built: D1 and D2 in one grid, D2 waiting for D1 after loading its CWS block
            fused = Launch("d1d2_fused", d1.programs + d2.programs, phases=[d1, d2],
                           prefetched=s.main * (s.cws_rp if cws else 0))
            for k in ("bytes", "mma_int8", "mma_tf32", "mma_bf16", "cuda_ops"):
                setattr(fused, k, getattr(d1, k) + getattr(d2, k))
            return [fused]
        if not mac or design == "decode3":  # the MAC down in the GEMM's grid (mac_down_work)
            return [d1, d2]
        # decode4: D3, MAC residual codes + down product over blocks of 64 main channels
        return [d1, d2, mac_down_work(s, T, "d3_mac_down", precision)]

    bt = min(16, _next_pow2(T))
    a = Launch("a_quantize_input", min(_cdiv(T, bt), hw.sms))
    ranks = (s.cws_rp if cws else 0) + (s.mac_rp if mac else 0) * mac_tiles  # the MAC pass on mac_tiles of the blocks
    a.bytes = T * s.d_in * 2 + transforms + s.main * ranks + 2 * T * s.main * sb + out_bytes  # scratch out + in
    rows = _cdiv(T, bt) * bt
    if bt >= 16:  # tl.dot on tensor cores
        _float_mma(a, rows * xform_flops, precision)
        a.mma_int8 = 2 * rows * s.main * ranks
        a.cuda_ops = 8 * rows * s.d_in  # gather, scale, round, clamp, residual per element
    else:  # below 16 rows kernel (a) runs its products on CUDA cores (USE_DOT false)
        a.cuda_ops = rows * xform_flops + 2 * 2 * rows * s.main * ranks + 8 * rows * s.d_in  # int at half rate
    return [a]


def bf16_launch(s: Shape, T: int) -> Launch:
    L = Launch("bf16", 10**6)  # cuBLAS fills the chip
    L.bytes = s.d_in * s.d_out * 2 + T * (s.d_in + s.d_out) * 2
    L.mma_bf16 = 2 * T * s.d_in * s.d_out
    return L


def w4a16_launches(s: Shape, T: int, hw: Hardware, wbits: int, aux_bits: int, outliers: bool, cws: bool,
                   precision: str = "float32") -> list[Launch]:
    """SPLITQ_DECODE_MODE=w4a16 at <= 16 rows (kernels/splitq_kernels/triton/w4a16.py): D1 alone (the
    transformed rows, float32, to the scratch), then the weight-only GEMM: float32 rows times the
    codes unpacked in registers (one-pass tf32 MMA on 16-row tiles; the per-output scales after the
    K sum), split-K partials as float32 stores of T rows summed by each tile's last program, the
    CWS down in the same grid (64 main channels a program), the up product in the epilogue. No D2
    (no quantization), no MAC (off in this form), no activation codes."""
    po = (s.text**2 + s.vision**2) * 4 if outliers else 0
    transforms = (s.n1**2 + s.n2**2) * 4 + s.main * 4 + po
    xform_flops = 2 * s.main * (s.n1 + s.n2) + 2 * (s.text**2 + s.vision**2) * outliers
    po_blocks = (_cdiv(s.text, 64) + _cdiv(s.vision, 64)) * outliers
    tpt = max(1, min(DECODE_ROWS, 4096 // (max(16, _next_pow2(s.n1)) * 16)))
    d1 = Launch("d1_transform", _cdiv(s.n1, 16) * _cdiv(s.n2, 16) * _cdiv(T, tpt) + po_blocks)
    sb = _scratch_bytes(precision)
    d1.bytes = T * s.d_in * 2 + transforms + T * s.d_in * sb
    _float_mma(d1, _cdiv(T, tpt) * tpt * xform_flops, precision)
    k = s.main + (s.text + s.vision if outliers else 0)
    tiles = _cdiv(s.d_out, 64)
    split = max(1, min(64, 4 * hw.sms // tiles))
    ranks = s.cws_rb if cws else 0
    g = Launch("w4a16_gemm" + ("+cws_down" if cws else ""), tiles * split + (_cdiv(s.main, 64) if cws else 0))
    w = s.main * s.d_out * wbits / 8 + (s.text + s.vision) * s.d_out * aux_bits / 8 * outliers
    paths = 1 + 2 * outliers
    # weights, per-output scales, up factor, the float32 rows, the output; the split-K partials
    # (2 * split * T * d_out * 4 bytes written and read back within the launch: L2) are left out, as
    # the int8 GEMM's split-K atomics are (module doc), so that the two designs are compared alike
    g.bytes = w + paths * s.d_out * 4 + ranks * s.d_out + T * k * sb + T * s.d_out * 2
    if precision == "bf16":  # the weight product in bf16 (X' is bfloat16 already: exact)
        g.mma_bf16 = 2 * 16 * k * s.d_out
    else:
        g.mma_tf32 = 2 * 16 * k * s.d_out  # one-pass tf32 (w4a16.weight_precision)
    _float_mma(g, 2 * 16 * ranks * s.d_out, precision)  # the up product
    g.cuda_ops = (UNPACK_OPS_PER_CODE + 1) * k * s.d_out  # unpack + convert to float32, one row tile
    if cws:  # the CWS down programs: 64 main channels each, partials summed by the last
        g.bytes += T * s.main * sb + s.main * s.cws_rp + 2 * _cdiv(s.main, 64) * 16 * s.cws_rp * 4
        _float_mma(g, 2 * 16 * s.main * s.cws_rp, precision)
    return [d1, g]


def variant_launches(s: Shape, T: int, hw: Hardware, variant: str, design: str, wbits: int = 4, aux_bits: int = 4,
                     precision: str = "float32", mac_tiles: float = 1.0) -> list[Launch]:
    if variant == "bf16":
        return [bf16_launch(s, T)]
    if variant == "w4a4_gemm":
        return [gemm_launch(s, T, hw, wbits, aux_bits, outliers=False, cws=False, mac=False)]
    cws, mac = variant in ("mocd+cws", "splitq"), variant == "splitq"
    if design == "w4a16":
        if T <= DECODE_ROWS:  # the same launches for splitq and mocd+cws: MAC is off in this form
            return w4a16_launches(s, T, hw, wbits, aux_bits, True, cws, precision)
        design = "decode"  # above 16 rows the mode changes nothing
    gemm = gemm_launch(s, T, hw, wbits, aux_bits, True, cws, mac, precision, mac_tiles)
    if design in ("decode", "decode3") and mac and T <= DECODE_ROWS:
        # the MAC-down programs take the GEMM grid's first tickets and run beside its programs, which
        # wait for h_mac only before their epilogue: their work adds to the launch's totals
        extra = mac_down_work(s, T, "mac_down", precision)
        gemm.name = "gemm+mac_down"
        gemm.programs += extra.programs
        gemm.bytes += extra.bytes
        gemm.mma_int8 += extra.mma_int8
        gemm.cuda_ops += extra.cuda_ops
    return quantize_launches(s, T, hw, design, True, cws, mac, precision, mac_tiles) + [gemm]


def predict(layer: str, T: int, hw_key: str, design: str, precision: str = "float32", mac_tiles: float = 1.0) -> dict:
    """One linear, one row count, one GPU, one design, one precision: every variant's launches and ratios
    (`mac_tiles`: the share of prefill row blocks MAC targets)."""
    if layer not in MODEL_SHAPES:
        raise ValueError(f"unknown layer {layer!r}; known: {sorted(MODEL_SHAPES)}")
    if hw_key not in HARDWARE:
        raise ValueError(f"unknown hardware {hw_key!r}; known: {sorted(HARDWARE)}")
    if design not in DESIGNS:
        raise ValueError(f"unknown design {design!r}; known: {DESIGNS}")
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; known: {PRECISIONS}")
    if not 0.0 <= mac_tiles <= 1.0:
        raise ValueError(f"mac_tiles is a share of the row blocks, in [0, 1], not {mac_tiles}")
    hw = HARDWARE[hw_key]
    s = Shape.of(*MODEL_SHAPES[layer])
    out = {"layer": layer, "rows": T, "hardware": hw_key, "design": design, "precision": precision,
           "mac_tiles": mac_tiles, "variants": {}}
    for v in VARIANTS:
        launches = variant_launches(s, T, hw, v, design, precision=precision, mac_tiles=mac_tiles)
        lt = [{"name": L.name, "programs": L.programs, "bytes": L.bytes, "mma_int8": L.mma_int8,
               "mma_tf32": L.mma_tf32, "mma_bf16": L.mma_bf16, "cuda_ops": L.cuda_ops, **L.time(hw)}
              for L in launches]
        out["variants"][v] = {"launches": lt, "s": sum(x["s"] for x in lt), "bytes": sum(x["bytes"] for x in lt)}
    t16 = out["variants"]["bf16"]["s"]
    for v in VARIANTS:
        out["variants"][v]["ratio_to_bf16"] = t16 / out["variants"][v]["s"]
    out["splitq_over_w4a4"] = out["variants"]["splitq"]["s"] / out["variants"]["w4a4_gemm"]["s"]
    return out


def table(models: list[str], rows: list[int], hws: list[str], designs: list[str],
          precisions: tuple[str, ...] = ("float32",), mac_tiles: float = 1.0) -> list[dict]:
    layers = [n for n in MODEL_SHAPES if n.split(".")[0] in models]
    return [predict(layer, T, h, d, p, mac_tiles)
            for p in precisions for d in designs for h in hws for layer in layers for T in rows]


def markdown(results: list[dict]) -> str:
    head = ("| design | precision | GPU | layer | rows | bf16 us | w4a4 GEMM us | splitq us (launches: us, bound) "
            "| splitq MB | ratio w4a4 / splitq to bf16 | splitq / w4a4 |")
    lines = [head, "|---" * 11 + "|"]
    for r in results:
        v = r["variants"]
        sq = ", ".join(f"{L['name']} {L['s'] * 1e6:.1f} {L['bound']}" for L in v["splitq"]["launches"])
        lines.append(
            f"| {r['design']} | {r['precision']} | {r['hardware']} | {r['layer']} | {r['rows']} | {v['bf16']['s'] * 1e6:.1f} "
            f"| {v['w4a4_gemm']['s'] * 1e6:.1f} | {v['splitq']['s'] * 1e6:.1f} ({sq}) | {v['splitq']['bytes'] / 1e6:.1f} "
            f"| {v['w4a4_gemm']['ratio_to_bf16']:.2f} / {v['splitq']['ratio_to_bf16']:.2f} "
            f"| {r['splitq_over_w4a4']:.2f} |")
    return "\n".join(lines)


def targets(design: str, hws=("h100", "h200"), precision: str = "float32") -> dict:
    """The issue's kernel targets for 7B, predicted: decode (1, 16 rows) splitq >= 2.5x bf16 on
    every linear; prefill (2048) >= 1.8x and splitq within 10% of the W4A4 GEMM."""
    out = {}
    for h in hws:
        dec = [predict(f"7b.{n}", T, h, design, precision) for n in ("qkv", "o_proj", "gate_up", "down") for T in (1, 16)]
        pre = [predict(f"7b.{n}", 2048, h, design, precision) for n in ("qkv", "o_proj", "gate_up", "down")]
        out[h] = {
            "decode_min_ratio": min(r["variants"]["splitq"]["ratio_to_bf16"] for r in dec),
            "decode_ratios": {f"{r['layer']}@{r['rows']}": round(r["variants"]["splitq"]["ratio_to_bf16"], 2)
                              for r in dec},
            "prefill_min_ratio": min(r["variants"]["splitq"]["ratio_to_bf16"] for r in pre),
            "prefill_max_splitq_over_w4a4": max(r["splitq_over_w4a4"] for r in pre),
            "prefill_ratios": {r["layer"]: round(r["variants"]["splitq"]["ratio_to_bf16"], 2) for r in pre},
        }
        out[h]["decode_target_met"] = out[h]["decode_min_ratio"] >= 2.5
        out[h]["prefill_target_met"] = out[h]["prefill_min_ratio"] >= 1.8 and out[h]["prefill_max_splitq_over_w4a4"] <= 1.1
    return out


def _csv(s: str, known, what: str) -> list[str]:
    items = [x for x in s.split(",") if x]
    bad = [x for x in items if x not in known]
    if bad:
        raise SystemExit(f"unknown {what} {bad}; known: {sorted(known)}")
    return items


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    models = sorted({n.split(".")[0] for n in MODEL_SHAPES})
    ap.add_argument("--models", default=",".join(models), help=f"comma list of {models}")
    ap.add_argument("--rows", default=",".join(map(str, ROWS)))
    ap.add_argument("--hardware", default="h100,h200,rtx4090", help=f"comma list of {sorted(HARDWARE)}")
    ap.add_argument("--design", default="current,decode", help=f"comma list of {DESIGNS} (decode3, decode4: before)")
    ap.add_argument("--precision", default="float32", help=f"comma list of {PRECISIONS} (SPLITQ_PRECISION)")
    ap.add_argument("--mac-tiles", type=float, default=1.0,
                    help="share of the prefill row blocks that hold a row MAC targets (default 1)")
    ap.add_argument("--targets", action="store_true", help="print the issue's targets, predicted, as JSON")
    ap.add_argument("--json", default=None, help="write every prediction here")
    a = ap.parse_args(argv)
    designs = _csv(a.design, DESIGNS, "design")
    precisions = tuple(_csv(a.precision, PRECISIONS, "precision"))
    if a.targets:
        print(json.dumps({f"{d}:{p}": targets(d, precision=p) for p in precisions for d in designs}, indent=1))
        return 0
    try:
        rows = [int(r) for r in a.rows.split(",") if r]
    except ValueError:
        raise SystemExit(f"--rows must be a comma list of integers, got {a.rows!r}") from None
    if not rows or min(rows) < 1:
        raise SystemExit("--rows: at least one row count, each >= 1")
    if not 0.0 <= a.mac_tiles <= 1.0:
        raise SystemExit(f"--mac-tiles must be in [0, 1], got {a.mac_tiles}")
    res = table(_csv(a.models, models, "model"), rows, _csv(a.hardware, HARDWARE, "hardware"), designs, precisions,
                a.mac_tiles)
    print(markdown(res))
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"launch_s": LAUNCH_S, "single_sm_bw_factor": SINGLE_SM_BW_FACTOR, "grid_wait_s": GRID_WAIT_S,
                       "hardware": {k: dataclasses.asdict(v) for k, v in HARDWARE.items()}, "results": res}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
