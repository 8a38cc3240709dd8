"""Kernel (b): the SplitQ GEMM (reference: `splitq_gemm`).

One int8-MMA GEMM over three K ranges, each with its own per-token and per-output scales:
main (weight_bits codes) then text and vision outliers (aux_weight_bits). Weights are unpacked
from packed words in registers (layout.pack_words): a [WORD_SUB, BLOCK_N] word tile becomes one
[CODES_PER_WORD * WORD_SUB, BLOCK_N] int8 tile and one tl.dot with int32 accumulation (exact).
Per range, y += (acc - z * colsum(w)) * s_x * s_w (the zero-point term only for asymmetric
activations; z is the zero point of the stored codes, common.stored_zero). The epilogue adds
h_cws @ deq(cws_up) and h_mac @ deq(mac_up) (h_mac is already zero on rows MAC does not target,
see kernel (a)), then the bias, in the reference's order, and writes x's dtype (bfloat16 rounded
to nearest even explicitly).

Decode (T <= BLOCK_M = 16): the K ranges are split over SPLIT_K programs per output tile so that
enough programs stream the weights. Partial int32 sums go to a zeroed workspace with atomic adds
(exact and order-independent, so results are deterministic); the last program to arrive for a
tile (an atomic counter) reads them back while resetting them to zero, and runs the epilogue.

MAC_IN_GRID (decode with MAC, quantize_decode.plan_linear_decode): the grid has
cdiv(main, BLOCK_K_MAC) more programs, and roles come from a ticket (an atomic counter) instead of
program_id: the first tickets do the MAC down (quantize_decode._mac_down_block / _mac_finish:
residual codes from the decode scratch, h_mac), the others the GEMM, which waits for h_mac only
before its epilogue. So the decode path is three launches (D1, D2, this one) with MAC.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from ..layout import WORD_SUB, KernelLayer, codes_per_word, word_bytes
from .common import bf16_round, fdot
from .launch import Launch
from .quantize_decode import _mac_down_block, _mac_finish, reset_when_all_past, wait_until
from .quantize_input import QuantizedActivations, code_offsets


@triton.jit
def unpack_word_block(
    # packed weight words of a K range [word rows, N * WORD_BYTES] (layout.pack_words), word block kb
    words_ptr, kb, N, cols, col_valid,
    # meta-parameters: code width and packing
    BITS: tl.constexpr, CODES_PER_WORD: tl.constexpr, WORD_BYTES: tl.constexpr, WORD_SUB: tl.constexpr,
):
    """The int8 codes [CODES_PER_WORD * WORD_SUB, BLOCK_N] of word block kb (K rows kb * G * WORD_SUB
    + 0 .. G * WORD_SUB - 1) of the columns `cols` (masked columns: -2^(b-1), never stored). Shared by
    the GEMM and the W4A16 decode kernel (w4a16.py)."""
    CODE_MASK: tl.constexpr = (1 << BITS) - 1
    CODE_OFFSET: tl.constexpr = 1 << (BITS - 1)  # words hold offset-binary codes u = code + 2^(b-1)
    gshift = (tl.arange(0, CODES_PER_WORD) * BITS)[:, None, None]
    wr = (kb * WORD_SUB + tl.arange(0, WORD_SUB)).to(tl.int64)
    if WORD_BYTES == 4:  # one aligned 32-bit load per word
        w32 = words_ptr.to(tl.pointer_type(tl.int32), bitcast=True)
        w = tl.load(w32 + wr[:, None] * N + cols[None, :], mask=col_valid[None, :], other=0)
    else:  # 1..3 bytes a word (e.g. 3-bit: 8 codes in 3 bytes): assemble it little-endian
        base = words_ptr + wr[:, None] * (N * WORD_BYTES) + cols[None, :] * WORD_BYTES
        w = tl.load(base, mask=col_valid[None, :], other=0).to(tl.int32)
        for byte in tl.static_range(1, WORD_BYTES):
            w = w | (tl.load(base + byte, mask=col_valid[None, :], other=0).to(tl.int32) << (8 * byte))
    # every code of the word at once: [CODES_PER_WORD, WORD_SUB, BLOCK_N], K row g * WORD_SUB + kk
    codes = ((w[None, :, :] >> gshift) & CODE_MASK) - CODE_OFFSET
    return tl.reshape(codes.to(tl.int8), (CODES_PER_WORD * WORD_SUB, codes.shape[2]))


@triton.jit
def _segment(
    acc,
    # activation codes; this K range's columns start at codes_col
    codes_ptr, stride_codes, codes_col, rows64, row_valid,
    # packed weight words of the range [word rows, N * WORD_BYTES] (layout.pack_words)
    words_ptr, N, K, cols, col_valid,
    # word blocks [kb_lo, kb_hi) of the range to sum over
    kb_lo, kb_hi,
    # meta-parameters: code width and packing
    BITS: tl.constexpr, CODES_PER_WORD: tl.constexpr, WORD_BYTES: tl.constexpr, WORD_SUB: tl.constexpr,
):
    """acc += A[:, codes_col + k] @ W[k, cols] over word blocks [kb_lo, kb_hi) of one K range."""
    for kb in range(kb_lo, kb_hi):
        b = unpack_word_block(words_ptr, kb, N, cols, col_valid, BITS, CODES_PER_WORD, WORD_BYTES, WORD_SUB)
        k = kb * (CODES_PER_WORD * WORD_SUB) + tl.arange(0, CODES_PER_WORD * WORD_SUB)
        a = tl.load(codes_ptr + rows64[:, None] * stride_codes + codes_col + k[None, :],
                    mask=row_valid[:, None] & (k < K)[None, :], other=0)
        acc = tl.dot(a, b, acc, out_dtype=tl.int32)  # int8 MMA, exact int32 sums
    return acc


@triton.jit
def _rescale(
    acc,
    # per-row activation scale and zero point, column SLOT of [T, 4]
    scale_ptr, zero_ptr, SLOT: tl.constexpr, rows, row_valid,
    # per-output weight code sums and scales of the range
    colsum_ptr, wscale_ptr, cols, col_valid,
    SYMMETRIC: tl.constexpr,
):
    """(sum_k (q - z) w) * s_x * s_w for one K range, in float32 (sum_k (q - z) w =
    acc - z * colsum(w), the zero-point term only for asymmetric activations)."""
    s = tl.load(scale_ptr + rows * 4 + SLOT, mask=row_valid, other=0.0)
    if not SYMMETRIC:
        z = tl.load(zero_ptr + rows * 4 + SLOT, mask=row_valid, other=0)
        cs = tl.load(colsum_ptr + cols, mask=col_valid, other=0)
        acc = acc - z[:, None] * cs[None, :]
    ws = tl.load(wscale_ptr + cols, mask=col_valid, other=0.0)
    return acc.to(tl.float32) * s[:, None] * ws[None, :]


@triton.jit
def _lowrank(
    y,
    # down product h [T, RANK_PADDED] (kernel a); up factor codes [RANK_PADDED, N] and per-output scale
    h_ptr, up_ptr, up_scale_ptr, rank,
    rows64, row_valid, cols, col_valid, N,
    # meta-parameters
    RANK_PADDED: tl.constexpr, BLOCK_RANK: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    SKIP_ZERO: tl.constexpr,
):
    """y + h @ deq(up): the low-rank "up" product of one branch, accumulated into y by the dot
    itself (no second [BLOCK_M, BLOCK_N] accumulator); deq(up) = codes * scale as the reference
    forms it. SKIP_ZERO: a block of h that is all zero (MAC on a tile of rows it does not target,
    e.g. an image's rows) skips its up factor's load and product, which would add exactly zero."""
    us = tl.load(up_scale_ptr + cols, mask=col_valid, other=0.0)
    for r0 in range(0, rank, BLOCK_RANK):
        r = r0 + tl.arange(0, BLOCK_RANK)
        # the padded ranks (up to RANK_PADDED) hold zeros in h and in up (layout.padded_rank): r needs no mask
        # .cg (L2, not L1): h_mac may come from another program of the same grid (MAC_IN_GRID)
        h = tl.load(h_ptr + rows64[:, None] * RANK_PADDED + r[None, :], mask=row_valid[:, None], other=0.0,
                    cache_modifier=".cg")
        if SKIP_ZERO:
            live = tl.max(tl.max(tl.abs(h), axis=1), axis=0) > 0
        else:
            live = True
        if live:
            u = tl.load(up_ptr + r.to(tl.int64)[:, None] * N + cols[None, :], mask=col_valid[None, :], other=0)
            y = fdot(h, u.to(tl.float32) * us[None, :], y, INPUT_PRECISION)
    return y


@triton.jit
def _epilogue(
    y, rows, row_valid, cols, col_valid, N,
    # low-rank branches (None when off): down products h, up factor codes and scales, ranks
    h_cws_ptr, cws_up_ptr, cws_up_scale_ptr, cws_rank,
    h_mac_ptr, mac_up_ptr, mac_up_scale_ptr, mac_rank,
    # bias [N] (None without); output [T, N]
    bias_ptr, out_ptr, stride_out,
    # meta-parameters
    CWS_RANK_PADDED: tl.constexpr, MAC_RANK_PADDED: tl.constexpr,
    BLOCK_CWS_RANK: tl.constexpr, BLOCK_MAC_RANK: tl.constexpr,
    HAS_CWS: tl.constexpr, HAS_MAC: tl.constexpr, HAS_BIAS: tl.constexpr, INPUT_PRECISION: tl.constexpr,
):
    """y + h_cws @ deq(cws_up) + h_mac @ deq(mac_up) + bias, in the reference's order, stored in
    the output's dtype."""
    rows64 = rows.to(tl.int64)
    if HAS_CWS:
        y = _lowrank(y, h_cws_ptr, cws_up_ptr, cws_up_scale_ptr, cws_rank, rows64, row_valid, cols, col_valid, N,
                     CWS_RANK_PADDED, BLOCK_CWS_RANK, INPUT_PRECISION, False)
    if HAS_MAC:
        y = _lowrank(y, h_mac_ptr, mac_up_ptr, mac_up_scale_ptr, mac_rank, rows64, row_valid, cols, col_valid, N,
                     MAC_RANK_PADDED, BLOCK_MAC_RANK, INPUT_PRECISION, True)
    if HAS_BIAS:
        y += tl.load(bias_ptr + cols, mask=col_valid, other=0.0)[None, :]
    if out_ptr.dtype.element_ty == tl.bfloat16:
        # rounded on the bit pattern, so the cast is exact: Triton 3.9's interpreter truncates
        out = bf16_round(y).to(tl.bfloat16)
    else:
        out = y.to(out_ptr.dtype.element_ty)
    tl.store(out_ptr + rows64[:, None] * stride_out + cols[None, :], out, mask=row_valid[:, None] & col_valid[None, :])


@triton.jit
def _split_range(lo, hi, start, n):
    """The part of the global block range [lo, hi) that falls in [start, start + n), as local indices."""
    return tl.minimum(tl.maximum(lo - start, 0), n), tl.minimum(tl.maximum(hi - start, 0), n)


@triton.jit
def _gemm_kernel(
    # activations from kernel (a): int8 codes [T, main | text | vision], scale and zero point
    # [T, 4], down products h_cws / h_mac [T, rank padded] (None when the branch is off)
    codes_ptr, stride_codes, scale_ptr, zero_ptr, h_cws_ptr, h_mac_ptr,
    # weights of the three K ranges: packed words, per-output scale and code sum (text and
    # vision: None when the set is empty)
    main_words_ptr, main_wscale_ptr, main_colsum_ptr,
    text_words_ptr, text_wscale_ptr, text_colsum_ptr,
    vision_words_ptr, vision_wscale_ptr, vision_colsum_ptr,
    # low-rank "up" factors: int8 codes [rank padded, N], per-output scale (None when the branch
    # is off); bias [N] (None without)
    cws_up_ptr, cws_up_scale_ptr, mac_up_ptr, mac_up_scale_ptr, bias_ptr,
    # output y [T, N]
    out_ptr, stride_out,
    # split-K only (None otherwise): int32 partial sums [3, BLOCK_M, N], arrival counter per column tile
    workspace_ptr, counter_ptr,
    # MAC down in this grid (MAC_IN_GRID, decode; None otherwise): text mask [T] as uint8 (None: all
    # text), D1's float32 scratch, D2's statistics [16, 8], clipping [4]; MAC down factor codes, per-rank
    # scale and code sum; int32 workspace [16, MAC_RANK_PADDED]; counters [ticket, MAC arrivals,
    # h_mac ready, programs done]; residual codes (debug; None)
    mask_ptr, scratch_ptr, stride_scratch, stats_ptr, clip_ptr, mac_down_ptr, mac_down_scale_ptr,
    mac_down_colsum_ptr, mac_ws_ptr, sync_ptr, mac_codes_ptr,
    # sizes: rows, outputs, K of each range and the codes column where text and vision start, ranks
    T, N, k_main, k_text, k_vision, off_text, off_vision, cws_rank, mac_rank,
    # tiles: output tile, row tiles per group (L2 reuse), programs per output tile along K
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr, SPLIT_K: tl.constexpr,
    # weight packing (layout.pack_words): word rows per block; bits, codes per word and bytes per
    # word of the main range and of the outlier ranges
    WORD_SUB: tl.constexpr,
    WEIGHT_BITS: tl.constexpr, CODES_PER_WORD_MAIN: tl.constexpr, WORD_BYTES_MAIN: tl.constexpr,
    AUX_WEIGHT_BITS: tl.constexpr, CODES_PER_WORD_AUX: tl.constexpr, WORD_BYTES_AUX: tl.constexpr,
    # low-rank ranks padded to a power of two >= 16, and the rank blocks of the up products
    CWS_RANK_PADDED: tl.constexpr, MAC_RANK_PADDED: tl.constexpr,
    BLOCK_CWS_RANK: tl.constexpr, BLOCK_MAC_RANK: tl.constexpr,
    # scheme and which parts are present
    SYMMETRIC: tl.constexpr, HAS_TEXT: tl.constexpr, HAS_VISION: tl.constexpr, HAS_CWS: tl.constexpr,
    HAS_MAC: tl.constexpr, HAS_BIAS: tl.constexpr,
    # tl.dot input precision of the float32 products (the up products)
    INPUT_PRECISION: tl.constexpr,
    # MAC down in this grid: its programs' channels, activation bits, MAC rows (0 text, 1 vision,
    # 2 all), whether a mask is given, whether the residual codes are stored (debug)
    MAC_IN_GRID: tl.constexpr, BLOCK_K_MAC: tl.constexpr, ACT_BITS: tl.constexpr, AUX_ACT_BITS: tl.constexpr,
    MAC_ROWS: tl.constexpr, HAS_MASK: tl.constexpr, STORE_MAC_CODES: tl.constexpr,
):
    if MAC_IN_GRID:
        # roles by ticket (a dynamic program id), not by program_id: the first n_mac tickets do the
        # MAC down (they never wait), the rest are the GEMM's programs; a GEMM program that waits
        # for h_mac took its ticket after every MAC-down program had started, so the wait ends
        # whatever order the hardware schedules the grid in (no deadlock)
        ticket = tl.atomic_add(sync_ptr + 0, 1)
        n_mac = tl.cdiv(k_main, BLOCK_K_MAC)
        is_gemm = ticket >= n_mac
        n_tiles_mn = tl.cdiv(T, BLOCK_M) * tl.cdiv(N, BLOCK_N)
        work = tl.maximum(ticket - n_mac, 0)
        pid = work % n_tiles_mn
        pid_k = work // n_tiles_mn
        if ticket < n_mac:
            _mac_down_block(ticket, scratch_ptr, stride_scratch, stats_ptr, clip_ptr, mac_down_ptr, mac_ws_ptr,
                            scale_ptr, zero_ptr, mac_codes_ptr, T, k_main, BLOCK_M, BLOCK_K_MAC, MAC_RANK_PADDED,
                            ACT_BITS, AUX_ACT_BITS, SYMMETRIC, STORE_MAC_CODES)
            tl.debug_barrier()  # every thread's atomics are in before the arrival is counted
            arrived = tl.atomic_add(sync_ptr + 1, 1)
            if arrived == n_mac - 1:  # the last MAC-down program: h_mac, then announce it
                tl.atomic_xchg(sync_ptr + 1, 0)
                _mac_finish(mask_ptr, stats_ptr, clip_ptr, mac_down_scale_ptr, mac_down_colsum_ptr, mac_ws_ptr,
                            h_mac_ptr, T, BLOCK_M, MAC_RANK_PADDED, AUX_ACT_BITS, SYMMETRIC, MAC_ROWS, HAS_MASK)
                tl.debug_barrier()  # every thread's h_mac is stored before it is announced
                tl.atomic_xchg(sync_ptr + 2, 1)
    else:
        pid = tl.program_id(0)
        pid_k = tl.program_id(1)
        is_gemm = pid >= 0
    if is_gemm:
        # grouped ordering of output tiles: programs that run together share weight columns in L2
        n_m = tl.cdiv(T, BLOCK_M)
        n_n = tl.cdiv(N, BLOCK_N)
        group = GROUP_M * n_n
        first_m = (pid // group) * GROUP_M
        size_m = tl.minimum(n_m - first_m, GROUP_M)
        pid_m = first_m + (pid % group) % size_m
        pid_n = (pid % group) // size_m

        rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        row_valid = rows < T
        rows64 = rows.to(tl.int64)
        cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        col_valid = cols < N
        # word blocks of each K range (a block is CODES_PER_WORD * WORD_SUB K rows)
        nb_main = tl.cdiv(k_main, CODES_PER_WORD_MAIN * WORD_SUB)
        nb_text = tl.cdiv(k_text, CODES_PER_WORD_AUX * WORD_SUB)
        nb_vision = tl.cdiv(k_vision, CODES_PER_WORD_AUX * WORD_SUB)
        acc0 = tl.zeros([BLOCK_M, BLOCK_N], tl.int32)

        if SPLIT_K == 1:
            acc = _segment(acc0, codes_ptr, stride_codes, 0, rows64, row_valid, main_words_ptr, N, k_main, cols,
                           col_valid, 0, nb_main, WEIGHT_BITS, CODES_PER_WORD_MAIN, WORD_BYTES_MAIN, WORD_SUB)
            y = _rescale(acc, scale_ptr, zero_ptr, 0, rows, row_valid, main_colsum_ptr, main_wscale_ptr, cols,
                         col_valid, SYMMETRIC)
            if HAS_TEXT:
                acc = _segment(acc0, codes_ptr, stride_codes, off_text, rows64, row_valid, text_words_ptr, N, k_text,
                               cols, col_valid, 0, nb_text, AUX_WEIGHT_BITS, CODES_PER_WORD_AUX, WORD_BYTES_AUX,
                               WORD_SUB)
                y += _rescale(acc, scale_ptr, zero_ptr, 1, rows, row_valid, text_colsum_ptr, text_wscale_ptr, cols,
                              col_valid, SYMMETRIC)
            if HAS_VISION:
                acc = _segment(acc0, codes_ptr, stride_codes, off_vision, rows64, row_valid, vision_words_ptr, N,
                               k_vision, cols, col_valid, 0, nb_vision, AUX_WEIGHT_BITS, CODES_PER_WORD_AUX,
                               WORD_BYTES_AUX, WORD_SUB)
                y += _rescale(acc, scale_ptr, zero_ptr, 2, rows, row_valid, vision_colsum_ptr, vision_wscale_ptr, cols,
                              col_valid, SYMMETRIC)
            if MAC_IN_GRID:
                wait_until(sync_ptr + 2, 1)  # h_mac complete (the MAC-down programs)
            _epilogue(y, rows, row_valid, cols, col_valid, N,
                      h_cws_ptr, cws_up_ptr, cws_up_scale_ptr, cws_rank, h_mac_ptr, mac_up_ptr, mac_up_scale_ptr,
                      mac_rank, bias_ptr, out_ptr, stride_out, CWS_RANK_PADDED, MAC_RANK_PADDED, BLOCK_CWS_RANK,
                      BLOCK_MAC_RANK, HAS_CWS, HAS_MAC, HAS_BIAS, INPUT_PRECISION)
        else:
            # split-K (decode: one row tile, T <= BLOCK_M): this program's share of the word blocks of
            # main | text | vision, summed into the int32 workspace [3, BLOCK_M, N] (one slab per range:
            # each has its own scales)
            nb = nb_main + nb_text + nb_vision
            per = tl.cdiv(nb, SPLIT_K)
            lo = pid_k * per
            hi = tl.minimum(lo + per, nb)
            ws_mask = row_valid[:, None] & col_valid[None, :]
            ws = workspace_ptr + rows[:, None] * N + cols[None, :]
            l0, h0 = _split_range(lo, hi, 0, nb_main)
            if h0 > l0:
                acc = _segment(acc0, codes_ptr, stride_codes, 0, rows64, row_valid, main_words_ptr, N, k_main, cols,
                               col_valid, l0, h0, WEIGHT_BITS, CODES_PER_WORD_MAIN, WORD_BYTES_MAIN, WORD_SUB)
                tl.atomic_add(ws, acc, mask=ws_mask)
            if HAS_TEXT:
                l1, h1 = _split_range(lo, hi, nb_main, nb_text)
                if h1 > l1:
                    acc = _segment(acc0, codes_ptr, stride_codes, off_text, rows64, row_valid, text_words_ptr, N,
                                   k_text, cols, col_valid, l1, h1, AUX_WEIGHT_BITS, CODES_PER_WORD_AUX,
                                   WORD_BYTES_AUX, WORD_SUB)
                    tl.atomic_add(ws + BLOCK_M * N, acc, mask=ws_mask)
            if HAS_VISION:
                l2, h2 = _split_range(lo, hi, nb_main + nb_text, nb_vision)
                if h2 > l2:
                    acc = _segment(acc0, codes_ptr, stride_codes, off_vision, rows64, row_valid, vision_words_ptr, N,
                                   k_vision, cols, col_valid, l2, h2, AUX_WEIGHT_BITS, CODES_PER_WORD_AUX,
                                   WORD_BYTES_AUX, WORD_SUB)
                    tl.atomic_add(ws + 2 * BLOCK_M * N, acc, mask=ws_mask)
            tl.debug_barrier()  # every thread's partial sums are in before the arrival is counted
            arrived = tl.atomic_add(counter_ptr + pid_n, 1)
            if arrived == SPLIT_K - 1:  # the last program of this tile: read back (and zero) the sums
                acc = tl.atomic_xchg(ws, acc0, mask=ws_mask)
                y = _rescale(acc, scale_ptr, zero_ptr, 0, rows, row_valid, main_colsum_ptr, main_wscale_ptr, cols,
                             col_valid, SYMMETRIC)
                if HAS_TEXT:
                    acc = tl.atomic_xchg(ws + BLOCK_M * N, acc0, mask=ws_mask)
                    y += _rescale(acc, scale_ptr, zero_ptr, 1, rows, row_valid, text_colsum_ptr, text_wscale_ptr, cols,
                                  col_valid, SYMMETRIC)
                if HAS_VISION:
                    acc = tl.atomic_xchg(ws + 2 * BLOCK_M * N, acc0, mask=ws_mask)
                    y += _rescale(acc, scale_ptr, zero_ptr, 2, rows, row_valid, vision_colsum_ptr, vision_wscale_ptr,
                                  cols, col_valid, SYMMETRIC)
                tl.atomic_xchg(counter_ptr + pid_n, 0)  # ready for the next call
                if MAC_IN_GRID:
                    wait_until(sync_ptr + 2, 1)  # h_mac complete (the MAC-down programs)
                _epilogue(y, rows, row_valid, cols, col_valid, N,
                          h_cws_ptr, cws_up_ptr, cws_up_scale_ptr, cws_rank, h_mac_ptr, mac_up_ptr, mac_up_scale_ptr,
                          mac_rank, bias_ptr, out_ptr, stride_out, CWS_RANK_PADDED, MAC_RANK_PADDED, BLOCK_CWS_RANK,
                          BLOCK_MAC_RANK, HAS_CWS, HAS_MAC, HAS_BIAS, INPUT_PRECISION)

    if MAC_IN_GRID:
        reset_when_all_past(sync_ptr, 3, 0, 2)

@dataclass(frozen=True)
class GemmConfig:
    block_m: int
    block_n: int
    split_k: int = 1
    group_m: int = 8
    num_warps: int = 8
    num_stages: int = 3


DECODE_ROWS = 16  # up to this many rows, the decode configuration (one row tile, split-K)
BLOCK_K_MAC = 64  # main channels per MAC-down program in the GEMM's grid (== quantize_decode.BLOCK_K_DECODE)


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


def plan_gemm(act: QuantizedActivations, kl: KernelLayer, out: torch.Tensor, cfg: GemmConfig,
              mac_in_grid: tuple[dict, dict, torch.Tensor, torch.Tensor] | None = None) -> Launch:
    """The GEMM's launch. mac_in_grid (decode with MAC, quantize_decode.plan_linear_decode): the
    MAC-down programs' (arguments, constexprs) from quantize_decode.mac_down_inputs, the int32
    workspace and the four counters; the grid then gets cdiv(main, BLOCK_K_MAC) more programs
    that do D3's work, and act.h_mac is written by them."""
    T, N = out.shape
    has_text, has_vision, has_cws, has_mac = kl.text > 0, kl.vision > 0, kl.cws_rank > 0, kl.mac_rank > 0
    off_text, off_vision, _ = code_offsets(kl)
    if cfg.split_k > 1 and (T > cfg.block_m or cfg.block_m != DECODE_ROWS):
        raise ValueError(f"split-K needs one row tile of {DECODE_ROWS} rows (T={T}, block_m={cfg.block_m})")
    n_tiles = triton.cdiv(N, cfg.block_n)
    workspace, counter = splitk_workspace(out.device, N, n_tiles) if cfg.split_k > 1 else (None, None)
    # an absent branch still needs a valid shape for its (unused) blocks
    cws_rank_padded = kl.cws_rank_padded or 16
    mac_rank_padded = kl.mac_rank_padded or 16
    args = dict(
        codes_ptr=act.codes, stride_codes=act.codes.stride(0), scale_ptr=act.scale, zero_ptr=act.zero,
        h_cws_ptr=act.h_cws if has_cws else None, h_mac_ptr=act.h_mac if has_mac else None,
        main_words_ptr=kl.main_words, main_wscale_ptr=kl.main_wscale, main_colsum_ptr=kl.main_colsum,
        text_words_ptr=kl.text_words if has_text else None, text_wscale_ptr=kl.text_wscale if has_text else None,
        text_colsum_ptr=kl.text_colsum if has_text else None,
        vision_words_ptr=kl.vision_words if has_vision else None,
        vision_wscale_ptr=kl.vision_wscale if has_vision else None,
        vision_colsum_ptr=kl.vision_colsum if has_vision else None,
        cws_up_ptr=kl.cws_up if has_cws else None, cws_up_scale_ptr=kl.cws_up_scale if has_cws else None,
        mac_up_ptr=kl.mac_up if has_mac else None, mac_up_scale_ptr=kl.mac_up_scale if has_mac else None,
        bias_ptr=kl.bias,
        out_ptr=out, stride_out=out.stride(0),
        workspace_ptr=workspace, counter_ptr=counter,
        T=T, N=N, k_main=kl.main, k_text=kl.text, k_vision=kl.vision, off_text=off_text, off_vision=off_vision,
        cws_rank=kl.cws_rank, mac_rank=kl.mac_rank,
    )
    constexprs = dict(
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, GROUP_M=cfg.group_m, SPLIT_K=cfg.split_k,
        WORD_SUB=WORD_SUB,
        WEIGHT_BITS=kl.weight_bits, CODES_PER_WORD_MAIN=codes_per_word(kl.weight_bits),
        WORD_BYTES_MAIN=word_bytes(kl.weight_bits),
        AUX_WEIGHT_BITS=kl.aux_weight_bits, CODES_PER_WORD_AUX=codes_per_word(kl.aux_weight_bits),
        WORD_BYTES_AUX=word_bytes(kl.aux_weight_bits),
        CWS_RANK_PADDED=cws_rank_padded, MAC_RANK_PADDED=mac_rank_padded,
        BLOCK_CWS_RANK=min(32, cws_rank_padded), BLOCK_MAC_RANK=min(32, mac_rank_padded),
        SYMMETRIC=kl.act_symmetric, HAS_TEXT=has_text, HAS_VISION=has_vision, HAS_CWS=has_cws, HAS_MAC=has_mac,
        HAS_BIAS=kl.bias is not None,
        INPUT_PRECISION=kl.precision,
    )
    grid = (triton.cdiv(T, cfg.block_m) * n_tiles, cfg.split_k)
    mac_args = dict(mask_ptr=None, scratch_ptr=None, stride_scratch=0, stats_ptr=None, clip_ptr=None, mac_down_ptr=None,
                    mac_down_scale_ptr=None, mac_down_colsum_ptr=None, mac_ws_ptr=None, sync_ptr=None,
                    mac_codes_ptr=None)
    mac_constexprs = dict(MAC_IN_GRID=False, BLOCK_K_MAC=BLOCK_K_MAC, ACT_BITS=kl.act_bits,
                          AUX_ACT_BITS=kl.aux_act_bits, MAC_ROWS=0, HAS_MASK=False, STORE_MAC_CODES=False)
    if mac_in_grid is not None:
        if not has_mac or T > DECODE_ROWS or cfg.block_m != DECODE_ROWS:
            raise ValueError(f"the MAC down in the GEMM's grid needs MAC and one row tile of {DECODE_ROWS} rows "
                             f"(T={T}, block_m={cfg.block_m}, mac_rank={kl.mac_rank})")
        mac_inputs, mac_meta, mac_ws, sync = mac_in_grid
        mac_args.update(mac_inputs, mac_ws_ptr=mac_ws, sync_ptr=sync)
        mac_constexprs.update(mac_meta, MAC_IN_GRID=True)
        grid = (grid[0] * grid[1] + triton.cdiv(kl.main, BLOCK_K_MAC),)  # one axis: roles come from tickets
    args.update(mac_args)
    constexprs.update(mac_constexprs)
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
