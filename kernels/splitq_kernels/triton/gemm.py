"""Kernel (b): the SplitQ GEMM (reference: `splitq_gemm`).

One int8-MMA GEMM over three K ranges, each with its own per-token and per-output scales:
main (weight_bits codes) then text and vision outliers (aux_weight_bits). Weights are unpacked
from packed words in registers (layout.pack_words): a [WORD_SUB, BN] word tile becomes one
[G * WORD_SUB, BN] int8 tile and one tl.dot with int32 accumulation (exact). Per range, y += (acc - z * colsum(w)) * s_x * s_w (the zero-point term only for asymmetric
activations). The epilogue adds h_cws @ up_cws and h_mac @ up_mac (h_mac is already zero on rows
MAC does not target, see kernel (a)), then the bias, in the reference's order, and writes x's dtype
(bfloat16 rounded to nearest even explicitly).

Decode (T <= BM = 16): the K ranges are split over SPLIT_K programs per output tile so that enough
programs stream the weights. Partial int32 sums go to a zeroed workspace with atomic adds (exact
and order-independent, so results are deterministic); the last program to arrive for a tile
(an atomic counter) reads them back while resetting them to zero, and runs the epilogue.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from ..layout import WORD_SUB, KernelLayer, codes_per_word, word_bytes
from .launch import Launch
from .quantize_input import QuantizedActivations, code_offsets


@triton.jit
def _segment(acc, a_ptr, stride_a, a_off, rows64, rvalid, w_ptr, N, K, cols, cvalid, kb_lo, kb_hi,
             BITS: tl.constexpr, G: tl.constexpr, NBYTES: tl.constexpr, SUB: tl.constexpr):
    """acc += A[:, a_off + k] @ W[k, cols] over word blocks [kb_lo, kb_hi) of one K range."""
    MASK: tl.constexpr = (1 << BITS) - 1
    OFF: tl.constexpr = 1 << (BITS - 1)
    gshift = (tl.arange(0, G) * BITS)[:, None, None]
    for kb in range(kb_lo, kb_hi):
        wr = (kb * SUB + tl.arange(0, SUB)).to(tl.int64)
        if NBYTES == 4:
            w32 = w_ptr.to(tl.pointer_type(tl.int32), bitcast=True)
            w = tl.load(w32 + wr[:, None] * N + cols[None, :], mask=cvalid[None, :], other=0)
        else:
            base = w_ptr + wr[:, None] * (N * NBYTES) + cols[None, :] * NBYTES
            w = tl.load(base, mask=cvalid[None, :], other=0).to(tl.int32)
            for byte in tl.static_range(1, NBYTES):
                w = w | (tl.load(base + byte, mask=cvalid[None, :], other=0).to(tl.int32) << (8 * byte))
        codes = ((w[None, :, :] >> gshift) & MASK) - OFF  # [G, SUB, BN]: K row g * SUB + kk
        b = tl.reshape(codes.to(tl.int8), (G * SUB, codes.shape[2]))
        k = kb * (G * SUB) + tl.arange(0, G * SUB)
        a = tl.load(a_ptr + rows64[:, None] * stride_a + a_off + k[None, :],
                    mask=rvalid[:, None] & (k < K)[None, :], other=0)
        acc = tl.dot(a, b, acc, out_dtype=tl.int32)  # int8 MMA, exact int32 sums
    return acc


@triton.jit
def _rescale(acc, s_ptr, z_ptr, SLOT: tl.constexpr, rows, rvalid, colsum_ptr, wscale_ptr, cols, cvalid,
             SYM: tl.constexpr):
    """(sum_k (q - z) w) * s_x * s_w for one K range, in float32."""
    s = tl.load(s_ptr + rows * 4 + SLOT, mask=rvalid, other=0.0)
    if not SYM:
        z = tl.load(z_ptr + rows * 4 + SLOT, mask=rvalid, other=0)
        cs = tl.load(colsum_ptr + cols, mask=cvalid, other=0)
        acc = acc - z[:, None] * cs[None, :]
    ws = tl.load(wscale_ptr + cols, mask=cvalid, other=0.0)
    return acc.to(tl.float32) * s[:, None] * ws[None, :]


@triton.jit
def _lowrank(y, h_ptr, u_ptr, uscale_ptr, R, RP: tl.constexpr, RB: tl.constexpr, rows64, rvalid, cols, cvalid, N,
             PREC: tl.constexpr):
    """y + h @ deq(up): the low-rank "up" product of one branch, accumulated into y by the dot
    itself (no second [BM, BN] accumulator); deq(up) = codes * scale as the reference forms it."""
    us = tl.load(uscale_ptr + cols, mask=cvalid, other=0.0)
    for r0 in range(0, R, RB):
        r = r0 + tl.arange(0, RB)
        h = tl.load(h_ptr + rows64[:, None] * RP + r[None, :], mask=rvalid[:, None], other=0.0)
        u = tl.load(u_ptr + r.to(tl.int64)[:, None] * N + cols[None, :], mask=cvalid[None, :], other=0)
        y = tl.dot(h, u.to(tl.float32) * us[None, :], y, input_precision=PREC)
    return y


@triton.jit
def _round_to_bf16(y):
    """float32 -> bfloat16 rounded to nearest even, done on the bit pattern so the cast that
    follows is exact. Compiled Triton already rounds this way; Triton 3.9's CPU interpreter
    truncates (even with fp_downcast_rounding="rtne"), and the tests run there."""
    bits = y.to(tl.int32, bitcast=True)
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & -65536
    return bits.to(tl.float32, bitcast=True).to(tl.bfloat16)


@triton.jit
def _epilogue(y, rows, rvalid, cols, cvalid, N,
              hc_ptr, uc_ptr, uc_scale_ptr, RS, hm_ptr, um_ptr, um_scale_ptr, RC, bias_ptr, out_ptr, stride_o,
              BM: tl.constexpr, BN: tl.constexpr, RSP: tl.constexpr, RCP: tl.constexpr,
              RBS: tl.constexpr, RBC: tl.constexpr, HAS_CWS: tl.constexpr, HAS_MAC: tl.constexpr,
              HAS_BIAS: tl.constexpr, PREC: tl.constexpr):
    rows64 = rows.to(tl.int64)
    if HAS_CWS:
        y = _lowrank(y, hc_ptr, uc_ptr, uc_scale_ptr, RS, RSP, RBS, rows64, rvalid, cols, cvalid, N, PREC)
    if HAS_MAC:
        y = _lowrank(y, hm_ptr, um_ptr, um_scale_ptr, RC, RCP, RBC, rows64, rvalid, cols, cvalid, N, PREC)
    if HAS_BIAS:
        y += tl.load(bias_ptr + cols, mask=cvalid, other=0.0)[None, :]
    if out_ptr.dtype.element_ty == tl.bfloat16:
        out = _round_to_bf16(y)
    else:
        out = y.to(out_ptr.dtype.element_ty)
    tl.store(out_ptr + rows64[:, None] * stride_o + cols[None, :], out, mask=rvalid[:, None] & cvalid[None, :])


@triton.jit
def _split_range(lo, hi, start, n):
    """The part of the global block range [lo, hi) that falls in [start, start + n), as local indices."""
    return tl.minimum(tl.maximum(lo - start, 0), n), tl.minimum(tl.maximum(hi - start, 0), n)


@triton.jit
def _gemm_kernel(
    a_ptr, stride_a, T, off_t, off_v, s_ptr, z_ptr,
    wm_ptr, wm_scale_ptr, wm_colsum_ptr, KM,
    wt_ptr, wt_scale_ptr, wt_colsum_ptr, KT,
    wv_ptr, wv_scale_ptr, wv_colsum_ptr, KV,
    hc_ptr, uc_ptr, uc_scale_ptr, RS,
    hm_ptr, um_ptr, um_scale_ptr, RC,
    bias_ptr, out_ptr, stride_o, N,
    ws_ptr, cnt_ptr,
    BM: tl.constexpr, BN: tl.constexpr, SUB: tl.constexpr, WBITS: tl.constexpr, AWBITS: tl.constexpr,
    GM: tl.constexpr, NBM: tl.constexpr, GA: tl.constexpr, NBA: tl.constexpr,
    SYM: tl.constexpr, HAS_TEXT: tl.constexpr, HAS_VISION: tl.constexpr, HAS_CWS: tl.constexpr,
    HAS_MAC: tl.constexpr, HAS_BIAS: tl.constexpr, RSP: tl.constexpr, RCP: tl.constexpr,
    RBS: tl.constexpr, RBC: tl.constexpr, SPLIT_K: tl.constexpr, GROUP_M: tl.constexpr, PREC: tl.constexpr,
):
    # grouped ordering of output tiles: programs that run together share weight columns in L2
    pid = tl.program_id(0)
    n_m = tl.cdiv(T, BM)
    n_n = tl.cdiv(N, BN)
    group = GROUP_M * n_n
    first_m = (pid // group) * GROUP_M
    size_m = tl.minimum(n_m - first_m, GROUP_M)
    pid_m = first_m + (pid % group) % size_m
    pid_n = (pid % group) // size_m

    rows = pid_m * BM + tl.arange(0, BM)
    rvalid = rows < T
    rows64 = rows.to(tl.int64)
    cols = pid_n * BN + tl.arange(0, BN)
    cvalid = cols < N
    nbm = tl.cdiv(KM, GM * SUB)
    nbt = tl.cdiv(KT, GA * SUB)
    nbv = tl.cdiv(KV, GA * SUB)
    zero = tl.zeros([BM, BN], tl.int32)

    if SPLIT_K == 1:
        acc = _segment(zero, a_ptr, stride_a, 0, rows64, rvalid, wm_ptr, N, KM, cols, cvalid, 0, nbm, WBITS, GM, NBM, SUB)
        y = _rescale(acc, s_ptr, z_ptr, 0, rows, rvalid, wm_colsum_ptr, wm_scale_ptr, cols, cvalid, SYM)
        if HAS_TEXT:
            acc = _segment(zero, a_ptr, stride_a, off_t, rows64, rvalid, wt_ptr, N, KT, cols, cvalid, 0, nbt, AWBITS, GA, NBA, SUB)
            y += _rescale(acc, s_ptr, z_ptr, 1, rows, rvalid, wt_colsum_ptr, wt_scale_ptr, cols, cvalid, SYM)
        if HAS_VISION:
            acc = _segment(zero, a_ptr, stride_a, off_v, rows64, rvalid, wv_ptr, N, KV, cols, cvalid, 0, nbv, AWBITS, GA, NBA, SUB)
            y += _rescale(acc, s_ptr, z_ptr, 2, rows, rvalid, wv_colsum_ptr, wv_scale_ptr, cols, cvalid, SYM)
        _epilogue(y, rows, rvalid, cols, cvalid, N, hc_ptr, uc_ptr, uc_scale_ptr, RS, hm_ptr, um_ptr, um_scale_ptr,
                  RC, bias_ptr, out_ptr, stride_o, BM, BN, RSP, RCP, RBS, RBC, HAS_CWS, HAS_MAC, HAS_BIAS, PREC)
    else:
        # split-K (decode: one row tile, T <= BM): this program's share of the word blocks of
        # main | text | vision, summed into the int32 workspace [3, BM, N]
        pid_k = tl.program_id(1)
        nb = nbm + nbt + nbv
        per = tl.cdiv(nb, SPLIT_K)
        lo = pid_k * per
        hi = tl.minimum(lo + per, nb)
        wmask = rvalid[:, None] & cvalid[None, :]
        wsp = ws_ptr + rows[:, None] * N + cols[None, :]
        l0, h0 = _split_range(lo, hi, 0, nbm)
        if h0 > l0:
            acc = _segment(zero, a_ptr, stride_a, 0, rows64, rvalid, wm_ptr, N, KM, cols, cvalid, l0, h0, WBITS, GM, NBM, SUB)
            tl.atomic_add(wsp, acc, mask=wmask)
        if HAS_TEXT:
            l1, h1 = _split_range(lo, hi, nbm, nbt)
            if h1 > l1:
                acc = _segment(zero, a_ptr, stride_a, off_t, rows64, rvalid, wt_ptr, N, KT, cols, cvalid, l1, h1,
                               AWBITS, GA, NBA, SUB)
                tl.atomic_add(wsp + BM * N, acc, mask=wmask)
        if HAS_VISION:
            l2, h2 = _split_range(lo, hi, nbm + nbt, nbv)
            if h2 > l2:
                acc = _segment(zero, a_ptr, stride_a, off_v, rows64, rvalid, wv_ptr, N, KV, cols, cvalid, l2, h2,
                               AWBITS, GA, NBA, SUB)
                tl.atomic_add(wsp + 2 * BM * N, acc, mask=wmask)
        tl.debug_barrier()  # every thread's partial sums are in before the arrival is counted
        arrived = tl.atomic_add(cnt_ptr + pid_n, 1)
        if arrived == SPLIT_K - 1:
            acc = tl.atomic_xchg(wsp, zero, mask=wmask)
            y = _rescale(acc, s_ptr, z_ptr, 0, rows, rvalid, wm_colsum_ptr, wm_scale_ptr, cols, cvalid, SYM)
            if HAS_TEXT:
                acc = tl.atomic_xchg(wsp + BM * N, zero, mask=wmask)
                y += _rescale(acc, s_ptr, z_ptr, 1, rows, rvalid, wt_colsum_ptr, wt_scale_ptr, cols, cvalid, SYM)
            if HAS_VISION:
                acc = tl.atomic_xchg(wsp + 2 * BM * N, zero, mask=wmask)
                y += _rescale(acc, s_ptr, z_ptr, 2, rows, rvalid, wv_colsum_ptr, wv_scale_ptr, cols, cvalid, SYM)
            tl.atomic_xchg(cnt_ptr + pid_n, 0)
            _epilogue(y, rows, rvalid, cols, cvalid, N, hc_ptr, uc_ptr, uc_scale_ptr, RS, hm_ptr, um_ptr,
                      um_scale_ptr, RC, bias_ptr, out_ptr, stride_o, BM, BN, RSP, RCP, RBS, RBC, HAS_CWS, HAS_MAC,
                      HAS_BIAS, PREC)


@dataclass(frozen=True)
class GemmConfig:
    block_m: int
    block_n: int
    split_k: int = 1
    group_m: int = 8
    num_warps: int = 8
    num_stages: int = 3


DECODE_ROWS = 16  # up to this many rows, the decode configuration (one row tile, split-K)


def _sm_count(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4


def word_blocks(kl: KernelLayer) -> int:
    def nb(k: int, bits: int) -> int:
        return -(-k // (codes_per_word(bits) * WORD_SUB)) if k else 0

    return nb(kl.main, kl.weight_bits) + nb(kl.text, kl.aux_weight_bits) + nb(kl.vision, kl.aux_weight_bits)


def default_config(kl: KernelLayer, T: int, device: torch.device) -> GemmConfig:
    """Tile sizes by row count (starting points: tune on the GPU with benchmarks/bench_kernels.py)."""
    if T <= DECODE_ROWS:
        bn = 64
        tiles = -(-kl.out_features // bn)
        split = max(1, min(word_blocks(kl), (4 * _sm_count(device)) // tiles))
        return GemmConfig(block_m=16, block_n=bn, split_k=split, group_m=1, num_warps=4, num_stages=4)
    if T <= 128:
        return GemmConfig(block_m=64, block_n=128, num_warps=4, num_stages=4)
    return GemmConfig(block_m=128, block_n=128, num_warps=8, num_stages=3)


_WORKSPACE: dict[tuple[str, int | None], tuple[torch.Tensor, torch.Tensor]] = {}


def splitk_workspace(device: torch.device, n: int, tiles: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The zeroed int32 split-K workspace [3, 16, n] and arrival counters of a device, shared by all
    layers (layers run one after another on one stream; each call leaves both at zero). Grows on
    demand: run every layer once (vLLM's warm-up does) before capturing CUDA graphs."""
    key = (device.type, device.index)
    ws, cnt = _WORKSPACE.get(key, (None, None))
    if ws is None or ws.numel() < 3 * DECODE_ROWS * n or cnt.numel() < tiles:
        size = max(n, 0 if ws is None else ws.numel() // (3 * DECODE_ROWS))
        ntiles = max(tiles, 0 if cnt is None else cnt.numel())
        ws = torch.zeros(3 * DECODE_ROWS * size, dtype=torch.int32, device=device)
        cnt = torch.zeros(ntiles, dtype=torch.int32, device=device)
        _WORKSPACE[key] = (ws, cnt)
    return ws, cnt


def plan_gemm(act: QuantizedActivations, kl: KernelLayer, out: torch.Tensor, cfg: GemmConfig) -> Launch:
    T, N = out.shape
    off_t, off_v, _ = code_offsets(kl)
    if cfg.split_k > 1 and (T > cfg.block_m or cfg.block_m != DECODE_ROWS):
        raise ValueError(f"split-K needs one row tile of {DECODE_ROWS} rows (T={T}, block_m={cfg.block_m})")
    n_tiles = triton.cdiv(N, cfg.block_n)
    if cfg.split_k > 1:
        ws, cnt = splitk_workspace(out.device, N, n_tiles)
    else:
        ws, cnt = act.zero, act.zero  # unused
    df, di, dq = kl.main_wscale, kl.main_colsum, act.codes
    rsp = kl.cws_rank_padded or 16
    rcp = kl.mac_rank_padded or 16
    args = dict(
        a_ptr=act.codes, stride_a=act.codes.stride(0), T=T, off_t=off_t, off_v=off_v, s_ptr=act.scale, z_ptr=act.zero,
        wm_ptr=kl.main_words, wm_scale_ptr=kl.main_wscale, wm_colsum_ptr=kl.main_colsum, KM=kl.main,
        wt_ptr=kl.text_words if kl.text else di, wt_scale_ptr=kl.text_wscale if kl.text else df,
        wt_colsum_ptr=kl.text_colsum if kl.text else di, KT=kl.text,
        wv_ptr=kl.vision_words if kl.vision else di, wv_scale_ptr=kl.vision_wscale if kl.vision else df,
        wv_colsum_ptr=kl.vision_colsum if kl.vision else di, KV=kl.vision,
        hc_ptr=act.h_cws if kl.cws_rank else df, uc_ptr=kl.cws_up if kl.cws_rank else dq,
        uc_scale_ptr=kl.cws_up_scale if kl.cws_rank else df, RS=kl.cws_rank,
        hm_ptr=act.h_mac if kl.mac_rank else df, um_ptr=kl.mac_up if kl.mac_rank else dq,
        um_scale_ptr=kl.mac_up_scale if kl.mac_rank else df, RC=kl.mac_rank,
        bias_ptr=kl.bias if kl.bias is not None else df, out_ptr=out, stride_o=out.stride(0), N=N,
        ws_ptr=ws, cnt_ptr=cnt,
    )
    constexprs = dict(
        BM=cfg.block_m, BN=cfg.block_n, SUB=WORD_SUB, WBITS=kl.weight_bits, AWBITS=kl.aux_weight_bits,
        GM=codes_per_word(kl.weight_bits), NBM=word_bytes(kl.weight_bits),
        GA=codes_per_word(kl.aux_weight_bits), NBA=word_bytes(kl.aux_weight_bits),
        SYM=kl.act_symmetric, HAS_TEXT=kl.text > 0, HAS_VISION=kl.vision > 0, HAS_CWS=kl.cws_rank > 0,
        HAS_MAC=kl.mac_rank > 0, HAS_BIAS=kl.bias is not None, RSP=rsp, RCP=rcp, RBS=min(32, rsp),
        RBC=min(32, rcp), SPLIT_K=cfg.split_k, GROUP_M=cfg.group_m, PREC=kl.precision,
    )
    grid = (triton.cdiv(T, cfg.block_m) * n_tiles, cfg.split_k)
    return Launch(_gemm_kernel, grid, args, constexprs, dict(num_warps=cfg.num_warps, num_stages=cfg.num_stages))


def gemm_triton(
    act: QuantizedActivations, kl: KernelLayer, out_dtype: torch.dtype, config: GemmConfig | None = None
) -> torch.Tensor:
    """Kernel (b): y [T, out_features] in out_dtype from kernel (a)'s outputs."""
    T = act.codes.shape[0]
    out = torch.empty(T, kl.out_features, dtype=out_dtype, device=act.codes.device)
    if T == 0:
        return out
    cfg = config or default_config(kl, T, out.device)
    plan_gemm(act, kl, out, cfg).run()
    return out
