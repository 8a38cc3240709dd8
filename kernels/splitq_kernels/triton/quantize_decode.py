"""Kernel (a) for decode (1-16 rows), split over many programs (issue 13, item 1).

The persistent kernel (a) (quantize_input.py) gives each program 16 rows: at decode one program
does the whole Kronecker transform and reads all of the low-rank down factors, serially on one SM.
Here the same outputs (`QuantizedActivations`, read by the same GEMM) come from short launches
whose work is split over the main channels; per-row statistics are combined across
programs with float atomics (max, and min when asymmetric) in a small workspace:

- D1 `_transform_program`, one program per [BLOCK_P1_COLS x BLOCK_P2_COLS] tile of the
  transformed (n1 x n2) row and group of TOKENS_PER_TILE tokens, plus one per outlier-set block:
  Z = R P2[:, b-block] then P1[:, a-block]^T Z for the group's tokens, to a float32
  scratch [T, in_features]; per-row max |x| (max/min) by atomics. The outlier sets' dense
  transforms are split the same way, one program per block of output columns.
- D2 `_quantize_program`, one program per BLOCK_K main channels (and per block of an outlier
  set's columns, which only quantizes): per-token grid from D1's statistics, codes, the CWS down
  product of its channels (int8 tl.dot) added into an int32 workspace, the MAC residual's
  statistics by atomics. The last program to arrive (atomic counter) rescales h_cws and resets
  the workspace.
- D1 and D2 run in one grid (`_decode_transform_quantize_kernel`, the default): roles by ticket,
  D1's programs first; D2's load their CWS down block, then wait for D1's arrival count (a
  program waits only on programs that took earlier tickets, so it cannot deadlock). As two
  launches of their own (`_decode_transform_kernel`, `_decode_quantize_kernel`) with
  plan_quantize_decode(fused=False), for comparison.
- the MAC down (only with MAC), one program per BLOCK_K main channels (`_mac_down_block`): the
  residual's codes at aux bits and the MAC down product, summed likewise; the last program
  (`_mac_finish`) rescales h_mac, applies the MAC row selection and resets the statistics to their
  neutral values. `linear_decode_triton` (what torch.ops.splitq.linear runs: two launches) runs
  these programs in the GEMM's grid (gemm.py, MAC_IN_GRID); `quantize_input_decode_triton` (the
  quantize half alone, whose outputs must be complete) as a launch of its own, D3
  `_decode_mac_kernel`.
Every launch has a fixed grid from the shapes (the row count included), no host synchronisation and no data-dependent
allocation: CUDA-graph capturable. Integer sums by atomics are exact and order-free, and a float
max/min is order-free, so results are deterministic. The workspace is shared per device (layers
run one after another on one stream, as for the GEMM's split-K workspace) and is left neutral
after every call.

Same numerics as kernel (a) (common.py helpers, no FMA contraction for the residual); the
Kronecker product is summed as P1^T (R P2) like kernel (a), so the same flip-tolerant criterion
applies (splitq_kernels.testing).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from ..layout import KernelLayer, next_pow2, scratch_dtype
from ..reference.scheme import MAC_ROWS as MAC_ROW_CHOICES  # ("text", "vision", "all")
from .common import at_precision, fdot, init_stats, qcodes, qgrid, row_stats, stored_zero
from .launch import Launch

# The in-grid waits (D2 on D1 in one grid, the GEMM's epilogue on the MAC down in its grid) are
# ordered by tickets taken at program start, so they cannot deadlock whatever order the GPU runs
# the programs in; but no GPU has run them yet. SPLITQ_DECODE_IN_GRID_WAITS=0 (read at import) runs
# the same math as four launches without any wait (D1, D2, D3, GEMM): the fallback if they hang.
IN_GRID_WAITS = os.environ.get("SPLITQ_DECODE_IN_GRID_WAITS", "1") != "0"
from .quantize_input import (
    KRON_BLOCK,
    KRON_Z_ELEMENTS,
    QuantizedActivations,
    alloc_activations,
    code_offsets,
)

DECODE_ROWS = 16  # one 16-row tensor-core tile: the rows this path takes (gemm.DECODE_ROWS too)
BLOCK_K_DECODE = 64  # main channels per D2 / D3 program (int8 tl.dot needs K >= 32)


@triton.jit
def _atomic_stats(stats_ptr, rows, row_valid, hi, lo, SLOT: tl.constexpr, SYMMETRIC: tl.constexpr):
    """Merge this program's per-row statistics into the shared [16, 8] statistics (slots 0/1:
    main max/min, 2/3: residual, 4/5: text set, 6/7: vision set)."""
    tl.atomic_max(stats_ptr + rows * 8 + SLOT, hi, mask=row_valid)
    if not SYMMETRIC:
        tl.atomic_min(stats_ptr + rows * 8 + SLOT + 1, lo, mask=row_valid)


@triton.jit
def _load_stats(stats_ptr, rows, row_valid, SLOT: tl.constexpr, SYMMETRIC: tl.constexpr):
    # .cg (L2): written by atomics of other programs, maybe of this grid (the fused D1 + D2)
    hi = tl.load(stats_ptr + rows * 8 + SLOT, mask=row_valid, other=0.0, cache_modifier=".cg")
    if SYMMETRIC:
        lo = hi
    else:
        lo = tl.load(stats_ptr + rows * 8 + SLOT + 1, mask=row_valid, other=0.0, cache_modifier=".cg")
    return hi, lo


@triton.jit
def _reset_stats(stats_ptr, SYMMETRIC: tl.constexpr):
    """Back to the neutral element of merge_stats (0 when symmetric, (-inf, +inf) when not), for
    the next call's atomics."""
    r = tl.arange(0, 16)[:, None] * 8 + tl.arange(0, 8)[None, :]
    if SYMMETRIC:
        v = tl.zeros([16, 8], tl.float32)
    else:
        v = tl.where((tl.arange(0, 8) % 2 == 0)[None, :], float("-inf"), float("inf")) + tl.zeros([16, 8], tl.float32)
    tl.store(stats_ptr + r, v)


@triton.jit
def wait_until(count_ptr, n):
    """Spin until *count_ptr >= n, set by other programs of the same grid (atomic reads: acquire).
    Only for programs that took a ticket after every program they wait for had started."""
    seen = tl.atomic_add(count_ptr, 0)
    while seen < n:
        seen = tl.atomic_add(count_ptr, 0)
    tl.debug_barrier()


@triton.jit
def reset_when_all_past(sync_ptr, DONE: tl.constexpr, A: tl.constexpr, B: tl.constexpr):
    """Count this program past its waits (counter DONE); the grid's last one puts counters A, B and
    DONE back to zero, so the next launch (a CUDA-graph replay too) starts from a clean workspace."""
    done = tl.atomic_add(sync_ptr + DONE, 1)
    if done == tl.num_programs(0) - 1:
        tl.atomic_xchg(sync_ptr + A, 0)
        tl.atomic_xchg(sync_ptr + B, 0)
        tl.atomic_xchg(sync_ptr + DONE, 0)


@triton.jit
def _outlier_block(
    # input rows; the set's channel indices [n_set] and dense transform P_o [n_set, n_set]
    x_ptr, stride_x, rows, row_valid, idx_ptr, p_ptr, n_set, o0,
    # float32 scratch (the set's columns from scratch_col on), shared statistics
    scratch_ptr, stride_scratch, scratch_col, stats_ptr,
    # meta-parameters
    SLOT: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_PO_ROWS: tl.constexpr, BLOCK_PO_COLS: tl.constexpr,
    SYMMETRIC: tl.constexpr, INPUT_PRECISION: tl.constexpr,
):
    """Columns o0.. of X'_o = X[:, idx] @ P_o to the scratch, their per-row statistics merged
    into SLOT (D1; D2 quantizes them once every block is in)."""
    rows64 = rows.to(tl.int64)
    o = o0 + tl.arange(0, BLOCK_PO_COLS)
    o_valid = o < n_set
    acc = tl.zeros([BLOCK_T, BLOCK_PO_COLS], tl.float32)
    for j0 in range(0, n_set, BLOCK_PO_ROWS):
        j = j0 + tl.arange(0, BLOCK_PO_ROWS)
        j_valid = j < n_set
        idx = tl.load(idx_ptr + j, mask=j_valid, other=0)
        xv = tl.load(x_ptr + rows64[:, None] * stride_x + idx[None, :], mask=row_valid[:, None] & j_valid[None, :],
                     other=0.0)
        p = tl.load(p_ptr + j[:, None] * n_set + o[None, :], mask=j_valid[:, None] & o_valid[None, :], other=0.0)
        acc = fdot(xv.to(tl.float32), p, acc, INPUT_PRECISION)
    acc = at_precision(acc, INPUT_PRECISION)  # as the scratch holds it
    valid = row_valid[:, None] & o_valid[None, :]
    tl.store(scratch_ptr + rows64[:, None] * stride_scratch + scratch_col + o[None, :], acc, mask=valid)
    h, l = row_stats(acc, valid, SYMMETRIC)
    _atomic_stats(stats_ptr, rows, row_valid, h, l, SLOT, SYMMETRIC)


@triton.jit
def _quantize_outlier_block(
    # scratch (the set's columns from scratch_col on), statistics, the set's clipping factor
    scratch_ptr, stride_scratch, scratch_col, stats_ptr, clip, rows, row_valid, n_set, o0,
    # outputs: codes (the set's columns from codes_col on), scale and zero point (column SLOT)
    codes_ptr, stride_codes, codes_col, scale_ptr, zero_ptr,
    # meta-parameters
    STATS_SLOT: tl.constexpr, SLOT: tl.constexpr, BLOCK_PO_COLS: tl.constexpr, BITS: tl.constexpr,
    SYMMETRIC: tl.constexpr,
):
    """Codes of columns o0.. of an outlier set (D2), on the grid of its per-row statistics."""
    rows64 = rows.to(tl.int64)
    hi, lo = _load_stats(stats_ptr, rows, row_valid, STATS_SLOT, SYMMETRIC)
    s, z = qgrid(hi, lo, clip, BITS, SYMMETRIC)
    o = o0 + tl.arange(0, BLOCK_PO_COLS)
    valid = row_valid[:, None] & (o < n_set)[None, :]
    xo = tl.load(scratch_ptr + rows64[:, None] * stride_scratch + scratch_col + o[None, :], mask=valid, other=0.0,
                 cache_modifier=".cg").to(tl.float32)
    qs, _ = qcodes(xo, s[:, None], z[:, None], BITS, SYMMETRIC)
    tl.store(codes_ptr + rows64[:, None] * stride_codes + codes_col + o[None, :], qs.to(tl.int8), mask=valid)
    if o0 == 0:
        tl.store(scale_ptr + rows * 4 + SLOT, s, mask=row_valid)
        tl.store(zero_ptr + rows * 4 + SLOT, stored_zero(z, BITS, SYMMETRIC), mask=row_valid)


@triton.jit
def _transform_program(
    pid,
    # input rows x [T, in_features] (T <= 16)
    x_ptr, stride_x,
    # main set: channel indices [n_main], smoothing [n_main], Kronecker factors P1 [n1, n1], P2 [n2, n2]
    idx_main_ptr, smooth_ptr, p1_ptr, p2_ptr,
    # outlier sets: channel indices and dense transforms (None when the set is empty)
    idx_text_ptr, p_text_ptr, idx_vision_ptr, p_vision_ptr,
    # float32 scratch [T, in_features]; shared per-row statistics [16, 8] (neutral on entry)
    scratch_ptr, stride_scratch, stats_ptr,
    # sizes
    T, n1, n2, n_main, n_text, n_vision,
    # tiles: rows (16), tokens per Kronecker tile, P1 rows padded, blocks of P2 rows / columns and
    # of P1 columns (one (a, b) tile per program), outlier-transform blocks
    BLOCK_T: tl.constexpr, TOKENS_PER_TILE: tl.constexpr, N1_PADDED: tl.constexpr,
    BLOCK_P2_ROWS: tl.constexpr, BLOCK_P2_COLS: tl.constexpr, BLOCK_P1_COLS: tl.constexpr,
    BLOCK_PO_ROWS: tl.constexpr, BLOCK_PO_COLS: tl.constexpr,
    # scheme and which parts are present
    SYMMETRIC: tl.constexpr, HAS_TEXT: tl.constexpr, HAS_VISION: tl.constexpr, INPUT_PRECISION: tl.constexpr,
):
    """One D1 program: a transform tile for one group of TOKENS_PER_TILE tokens (pid < the count
    of both) or a block of an outlier set."""
    n_b = tl.cdiv(n2, BLOCK_P2_COLS)
    n_groups = tl.cdiv(T, TOKENS_PER_TILE)  # token groups are programs too (more programs at 16 rows)
    n_tiles = tl.cdiv(n1, BLOCK_P1_COLS) * n_b * n_groups
    rows = tl.arange(0, BLOCK_T)
    row_valid = rows < T
    if pid < n_tiles:
        g = pid % n_groups
        tile = pid // n_groups
        b0 = (tile % n_b) * BLOCK_P2_COLS
        a0 = (tile // n_b) * BLOCK_P1_COLS
        b = b0 + tl.arange(0, BLOCK_P2_COLS)
        b_valid = b < n2
        a = a0 + tl.arange(0, BLOCK_P1_COLS)
        a_valid = a < n1
        i_all = tl.arange(0, N1_PADDED)
        p1t = tl.load(p1_ptr + i_all[None, :] * n1 + a[:, None], mask=a_valid[:, None] & (i_all < n1)[None, :],
                      other=0.0)  # P1[i, a] as [a, i]
        hi, lo = init_stats(BLOCK_T, SYMMETRIC)
        for tt in range(g * TOKENS_PER_TILE, T, n_groups * TOKENS_PER_TILE):  # this group: one iteration
            zr = tl.arange(0, TOKENS_PER_TILE * N1_PADDED)  # rows (token, i) of Z = R P2
            z_token = tt + zr // N1_PADDED
            z_i = zr % N1_PADDED
            z_valid = (z_token < T) & (z_i < n1)
            z = tl.zeros([TOKENS_PER_TILE * N1_PADDED, BLOCK_P2_COLS], tl.float32)
            for j0 in range(0, n2, BLOCK_P2_ROWS):
                j = j0 + tl.arange(0, BLOCK_P2_ROWS)
                j_valid = j < n2
                ch = z_i[:, None] * n2 + j[None, :]  # R[i, j] is main channel i * n2 + j
                m2 = z_valid[:, None] & j_valid[None, :]
                idx = tl.load(idx_main_ptr + ch, mask=m2, other=0)
                sm = tl.load(smooth_ptr + ch, mask=m2, other=0.0)
                xv = tl.load(x_ptr + z_token.to(tl.int64)[:, None] * stride_x + idx, mask=m2, other=0.0)
                p2 = tl.load(p2_ptr + j[:, None] * n2 + b[None, :], mask=j_valid[:, None] & b_valid[None, :],
                             other=0.0)
                z = fdot(xv.to(tl.float32) * sm, p2, z, INPUT_PRECISION)
            # rows (token, i) -> rows i with columns (token, b), then X'[a, b] = P1[:, a]^T Z
            zt = tl.reshape(tl.permute(tl.reshape(z, (TOKENS_PER_TILE, N1_PADDED, BLOCK_P2_COLS)), (1, 0, 2)),
                            (N1_PADDED, TOKENS_PER_TILE * BLOCK_P2_COLS))
            c = tl.arange(0, TOKENS_PER_TILE * BLOCK_P2_COLS)  # columns (token, b)
            c_token = tt + c // BLOCK_P2_COLS
            c_b = b0 + c % BLOCK_P2_COLS
            c_valid = (c_token < T) & (c_b < n2)
            xp = at_precision(fdot(p1t, zt, None, INPUT_PRECISION), INPUT_PRECISION)  # as the scratch holds it
            valid = a_valid[:, None] & c_valid[None, :]
            tl.store(scratch_ptr + c_token.to(tl.int64)[None, :] * stride_scratch + a[:, None] * n2 + c_b[None, :], xp,
                     mask=valid)
            # per-token stats of the tile (reduce over a and b), scattered into the 16-row vectors
            onehot = tl.arange(0, BLOCK_T)[:, None] == (tt + tl.arange(0, TOKENS_PER_TILE))[None, :]
            if SYMMETRIC:
                v3 = tl.reshape(tl.where(valid, tl.abs(xp), 0.0), (BLOCK_P1_COLS, TOKENS_PER_TILE, BLOCK_P2_COLS))
                t_hi = tl.max(tl.max(v3, axis=2), axis=0)
                hi = tl.maximum(hi, tl.max(tl.where(onehot, t_hi[None, :], 0.0), axis=1))
            else:
                v3 = tl.reshape(tl.where(valid, xp, float("-inf")), (BLOCK_P1_COLS, TOKENS_PER_TILE, BLOCK_P2_COLS))
                t_hi = tl.max(tl.max(v3, axis=2), axis=0)
                w3 = tl.reshape(tl.where(valid, xp, float("inf")), (BLOCK_P1_COLS, TOKENS_PER_TILE, BLOCK_P2_COLS))
                t_lo = tl.min(tl.min(w3, axis=2), axis=0)
                hi = tl.maximum(hi, tl.max(tl.where(onehot, t_hi[None, :], float("-inf")), axis=1))
                lo = tl.minimum(lo, tl.min(tl.where(onehot, t_lo[None, :], float("inf")), axis=1))
        _atomic_stats(stats_ptr, rows, row_valid, hi, lo, 0, SYMMETRIC)
    else:
        # the outlier sets, split over blocks of BLOCK_PO_COLS output columns (scratch columns after main)
        q = pid - n_tiles
        n_tb = tl.cdiv(n_text, BLOCK_PO_COLS)
        if HAS_TEXT:
            if q < n_tb:
                _outlier_block(x_ptr, stride_x, rows, row_valid, idx_text_ptr, p_text_ptr, n_text, q * BLOCK_PO_COLS,
                               scratch_ptr, stride_scratch, n_main, stats_ptr, 4, BLOCK_T, BLOCK_PO_ROWS,
                               BLOCK_PO_COLS, SYMMETRIC, INPUT_PRECISION)
        if HAS_VISION:
            if q >= n_tb:
                _outlier_block(x_ptr, stride_x, rows, row_valid, idx_vision_ptr, p_vision_ptr, n_vision,
                               (q - n_tb) * BLOCK_PO_COLS, scratch_ptr, stride_scratch, n_main + n_text, stats_ptr, 6,
                               BLOCK_T, BLOCK_PO_ROWS, BLOCK_PO_COLS, SYMMETRIC, INPUT_PRECISION)


@triton.jit
def _quantize_program(
    # this program's block and the number of D2 programs (the last to arrive finishes h_cws); D1's
    # arrival counter and program count (WAIT: this grid runs D1 too, wait until all of it is in)
    pid, n_programs, d1_arrived_ptr, n_d1,
    # float32 scratch [T, in_features] (D1); shared statistics [16, 8]; clipping factors [4]
    scratch_ptr, stride_scratch, stats_ptr, clip_ptr,
    # CWS down factor: int8 codes [n_main, rank padded], per-rank scale and code sum (None when off)
    cws_down_ptr, cws_down_scale_ptr, cws_down_colsum_ptr,
    # int32 workspace [16, CWS_RANK_PADDED] (zero on entry) and this launch's arrival counter
    ws_ptr, counter_ptr,
    # outputs: codes [T, main | text | vision], scale / zero point [T, 4], h_cws [T, rank padded]
    # (None when off)
    codes_ptr, stride_codes, scale_ptr, zero_ptr, h_cws_ptr,
    # sizes: rows, main channels, outlier sets and their first codes column
    T, n_main, n_text, n_vision, off_text, off_vision,
    # tiles and scheme; which parts are present
    BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_PO_COLS: tl.constexpr, CWS_RANK_PADDED: tl.constexpr,
    ACT_BITS: tl.constexpr, AUX_ACT_BITS: tl.constexpr, SYMMETRIC: tl.constexpr,
    HAS_TEXT: tl.constexpr, HAS_VISION: tl.constexpr, HAS_CWS: tl.constexpr, HAS_MAC: tl.constexpr,
    WAIT: tl.constexpr,
):
    """One D2 program: a block of BLOCK_K main channels (pid < their count) or of an outlier set."""
    n_k = tl.cdiv(n_main, BLOCK_K)
    r = tl.arange(0, CWS_RANK_PADDED)
    k = pid * BLOCK_K + tl.arange(0, BLOCK_K)
    k_valid = k < n_main  # none for an outlier-set program
    if HAS_CWS:  # does not depend on D1: loaded before the wait
        d = tl.load(cws_down_ptr + k[:, None] * CWS_RANK_PADDED + r[None, :], mask=k_valid[:, None], other=0)
    if WAIT:
        wait_until(d1_arrived_ptr, n_d1)
    rows = tl.arange(0, BLOCK_T)
    row_valid = rows < T
    rows64 = rows.to(tl.int64)
    hi, lo = _load_stats(stats_ptr, rows, row_valid, 0, SYMMETRIC)
    s, z = qgrid(hi, lo, tl.load(clip_ptr + 0), ACT_BITS, SYMMETRIC)
    zs = stored_zero(z, ACT_BITS, SYMMETRIC)
    if pid < n_k:  # a block of main channels
        if pid == 0:
            tl.store(scale_ptr + rows * 4 + 0, s, mask=row_valid)
            tl.store(zero_ptr + rows * 4 + 0, zs, mask=row_valid)
        m2 = row_valid[:, None] & k_valid[None, :]
        xp = tl.load(scratch_ptr + rows64[:, None] * stride_scratch + k[None, :], mask=m2, other=0.0,
                     cache_modifier=".cg").to(tl.float32)  # .cg: D1 may be programs of this grid (WAIT)
        qs, qc = qcodes(xp, s[:, None], z[:, None], ACT_BITS, SYMMETRIC)
        qs = tl.where(m2, qs, 0.0).to(tl.int8)
        tl.store(codes_ptr + rows64[:, None] * stride_codes + k[None, :], qs, mask=m2)
        if HAS_CWS:
            acc = tl.dot(qs, d, out_dtype=tl.int32)
            tl.atomic_add(ws_ptr + rows[:, None] * CWS_RANK_PADDED + r[None, :], acc, mask=row_valid[:, None])
        if HAS_MAC:
            res = xp - qc * s[:, None]  # X' - X^ (no FMA: compiled without fusion)
            h, l = row_stats(res, m2, SYMMETRIC)
            _atomic_stats(stats_ptr, rows, row_valid, h, l, 2, SYMMETRIC)
    else:  # a block of an outlier set's columns
        q = pid - n_k
        n_tb = tl.cdiv(n_text, BLOCK_PO_COLS)
        if HAS_TEXT:
            if q < n_tb:
                _quantize_outlier_block(scratch_ptr, stride_scratch, n_main, stats_ptr, tl.load(clip_ptr + 1), rows,
                                        row_valid, n_text, q * BLOCK_PO_COLS, codes_ptr, stride_codes, off_text,
                                        scale_ptr, zero_ptr, 4, 1, BLOCK_PO_COLS, AUX_ACT_BITS, SYMMETRIC)
        if HAS_VISION:
            if q >= n_tb:
                _quantize_outlier_block(scratch_ptr, stride_scratch, n_main + n_text, stats_ptr, tl.load(clip_ptr + 2),
                                        rows, row_valid, n_vision, (q - n_tb) * BLOCK_PO_COLS, codes_ptr, stride_codes,
                                        off_vision, scale_ptr, zero_ptr, 6, 2, BLOCK_PO_COLS, AUX_ACT_BITS, SYMMETRIC)
    tl.debug_barrier()  # every thread's atomics are in before the arrival is counted
    arrived = tl.atomic_add(counter_ptr, 1)
    if arrived == n_programs - 1:  # the last program: finish h_cws, reset what it owns
        tl.atomic_xchg(counter_ptr, 0)
        if HAS_CWS:
            zero = tl.zeros([BLOCK_T, CWS_RANK_PADDED], tl.int32)
            acc = tl.atomic_xchg(ws_ptr + rows[:, None] * CWS_RANK_PADDED + r[None, :], zero)
            d_scale = tl.load(cws_down_scale_ptr + r)
            d_colsum = tl.load(cws_down_colsum_ptr + r)
            h_cws = (acc - zs[:, None] * d_colsum[None, :]).to(tl.float32) * s[:, None] * d_scale[None, :]
            tl.store(h_cws_ptr + rows64[:, None] * CWS_RANK_PADDED + r[None, :], h_cws, mask=row_valid[:, None])
        if not HAS_MAC:  # no D3: every program has read the statistics by now
            _reset_stats(stats_ptr, SYMMETRIC)


@triton.jit
def _decode_transform_kernel(
    # input rows x [T, in_features] (T <= 16)
    x_ptr, stride_x,
    # main set: channel indices [n_main], smoothing [n_main], Kronecker factors P1 [n1, n1], P2 [n2, n2]
    idx_main_ptr, smooth_ptr, p1_ptr, p2_ptr,
    # outlier sets: channel indices and dense transforms (None when the set is empty)
    idx_text_ptr, p_text_ptr, idx_vision_ptr, p_vision_ptr,
    # float32 scratch [T, in_features]; shared per-row statistics [16, 8] (neutral on entry)
    scratch_ptr, stride_scratch, stats_ptr,
    # sizes
    T, n1, n2, n_main, n_text, n_vision,
    # tiles: rows (16), tokens per Kronecker tile, P1 rows padded, blocks of P2 rows / columns and
    # of P1 columns (one (a, b) tile per program), outlier-transform blocks
    BLOCK_T: tl.constexpr, TOKENS_PER_TILE: tl.constexpr, N1_PADDED: tl.constexpr,
    BLOCK_P2_ROWS: tl.constexpr, BLOCK_P2_COLS: tl.constexpr, BLOCK_P1_COLS: tl.constexpr,
    BLOCK_PO_ROWS: tl.constexpr, BLOCK_PO_COLS: tl.constexpr,
    # scheme and which parts are present
    SYMMETRIC: tl.constexpr, HAS_TEXT: tl.constexpr, HAS_VISION: tl.constexpr, INPUT_PRECISION: tl.constexpr,
):
    """D1 as a launch of its own (plan_quantize_decode(fused=False))."""
    _transform_program(tl.program_id(0), x_ptr, stride_x, idx_main_ptr, smooth_ptr, p1_ptr, p2_ptr, idx_text_ptr,
                       p_text_ptr, idx_vision_ptr, p_vision_ptr, scratch_ptr, stride_scratch, stats_ptr, T, n1, n2,
                       n_main, n_text, n_vision, BLOCK_T, TOKENS_PER_TILE, N1_PADDED, BLOCK_P2_ROWS, BLOCK_P2_COLS,
                       BLOCK_P1_COLS, BLOCK_PO_ROWS, BLOCK_PO_COLS, SYMMETRIC, HAS_TEXT, HAS_VISION, INPUT_PRECISION)


@triton.jit
def _decode_quantize_kernel(
    # float32 scratch [T, in_features] (D1); shared statistics [16, 8]; clipping factors [4]
    scratch_ptr, stride_scratch, stats_ptr, clip_ptr,
    # CWS down factor: int8 codes [n_main, rank padded], per-rank scale and code sum (None when off)
    cws_down_ptr, cws_down_scale_ptr, cws_down_colsum_ptr,
    # int32 workspace [16, CWS_RANK_PADDED] (zero on entry) and this launch's arrival counter
    ws_ptr, counter_ptr,
    # outputs: codes [T, main | text | vision], scale / zero point [T, 4], h_cws [T, rank padded]
    # (None when off)
    codes_ptr, stride_codes, scale_ptr, zero_ptr, h_cws_ptr,
    # sizes: rows, main channels, outlier sets and their first codes column
    T, n_main, n_text, n_vision, off_text, off_vision,
    # tiles and scheme; which parts are present
    BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_PO_COLS: tl.constexpr, CWS_RANK_PADDED: tl.constexpr,
    ACT_BITS: tl.constexpr, AUX_ACT_BITS: tl.constexpr, SYMMETRIC: tl.constexpr,
    HAS_TEXT: tl.constexpr, HAS_VISION: tl.constexpr, HAS_CWS: tl.constexpr, HAS_MAC: tl.constexpr,
):
    """D2 as a launch of its own (plan_quantize_decode(fused=False))."""
    _quantize_program(tl.program_id(0), tl.num_programs(0), None, 0, scratch_ptr, stride_scratch, stats_ptr, clip_ptr,
                      cws_down_ptr, cws_down_scale_ptr, cws_down_colsum_ptr, ws_ptr, counter_ptr, codes_ptr,
                      stride_codes, scale_ptr, zero_ptr, h_cws_ptr, T, n_main, n_text, n_vision, off_text, off_vision,
                      BLOCK_T, BLOCK_K, BLOCK_PO_COLS, CWS_RANK_PADDED, ACT_BITS, AUX_ACT_BITS, SYMMETRIC, HAS_TEXT,
                      HAS_VISION, HAS_CWS, HAS_MAC, False)


@triton.jit
def _decode_transform_quantize_kernel(
    # D1's arguments then D2's (decode_transform / decode_quantize above; shared names once)
    x_ptr, stride_x, idx_main_ptr, smooth_ptr, p1_ptr, p2_ptr, idx_text_ptr, p_text_ptr, idx_vision_ptr, p_vision_ptr,
    scratch_ptr, stride_scratch, stats_ptr, T, n1, n2, n_main, n_text, n_vision, clip_ptr, cws_down_ptr,
    cws_down_scale_ptr, cws_down_colsum_ptr, ws_ptr, counter_ptr, codes_ptr, stride_codes, scale_ptr, zero_ptr,
    h_cws_ptr, off_text, off_vision,
    # counters [ticket, D1 arrivals, programs done] (zero on entry and on exit); D1's program count
    sync_ptr, n_d1,
    BLOCK_T: tl.constexpr, TOKENS_PER_TILE: tl.constexpr, N1_PADDED: tl.constexpr,
    BLOCK_P2_ROWS: tl.constexpr, BLOCK_P2_COLS: tl.constexpr, BLOCK_P1_COLS: tl.constexpr,
    BLOCK_PO_ROWS: tl.constexpr, BLOCK_PO_COLS: tl.constexpr, BLOCK_K: tl.constexpr, CWS_RANK_PADDED: tl.constexpr,
    ACT_BITS: tl.constexpr, AUX_ACT_BITS: tl.constexpr, SYMMETRIC: tl.constexpr,
    HAS_TEXT: tl.constexpr, HAS_VISION: tl.constexpr, HAS_CWS: tl.constexpr, HAS_MAC: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
):
    """D1 and D2 in one grid. Roles by ticket (an atomic counter, a dynamic program id): the first
    n_d1 tickets are D1's programs, which never wait; the others D2's, which load their part of
    the CWS down factor and then wait until every D1 program has arrived (D2 needs the per-row
    statistics of the whole row). A D2 program took its ticket after every D1 program had
    started, so the wait ends whatever order the hardware runs the grid in."""
    ticket = tl.atomic_add(sync_ptr + 0, 1)
    if ticket < n_d1:
        _transform_program(ticket, x_ptr, stride_x, idx_main_ptr, smooth_ptr, p1_ptr, p2_ptr, idx_text_ptr, p_text_ptr,
                           idx_vision_ptr, p_vision_ptr, scratch_ptr, stride_scratch, stats_ptr, T, n1, n2, n_main,
                           n_text, n_vision, BLOCK_T, TOKENS_PER_TILE, N1_PADDED, BLOCK_P2_ROWS, BLOCK_P2_COLS,
                           BLOCK_P1_COLS, BLOCK_PO_ROWS, BLOCK_PO_COLS, SYMMETRIC, HAS_TEXT, HAS_VISION,
                           INPUT_PRECISION)
        tl.debug_barrier()  # every thread's scratch stores and statistics atomics are in
        tl.atomic_add(sync_ptr + 1, 1)
    else:
        _quantize_program(ticket - n_d1, tl.num_programs(0) - n_d1, sync_ptr + 1, n_d1, scratch_ptr, stride_scratch,
                          stats_ptr, clip_ptr, cws_down_ptr, cws_down_scale_ptr, cws_down_colsum_ptr, ws_ptr,
                          counter_ptr, codes_ptr, stride_codes, scale_ptr, zero_ptr, h_cws_ptr, T, n_main, n_text,
                          n_vision, off_text, off_vision, BLOCK_T, BLOCK_K, BLOCK_PO_COLS, CWS_RANK_PADDED, ACT_BITS,
                          AUX_ACT_BITS, SYMMETRIC, HAS_TEXT, HAS_VISION, HAS_CWS, HAS_MAC, True)
    reset_when_all_past(sync_ptr, 2, 0, 1)


@triton.jit
def _mac_down_block(
    # this program's block of main channels; scratch, statistics, clipping [4]
    blk, scratch_ptr, stride_scratch, stats_ptr, clip_ptr,
    # MAC down factor codes [n_main, rank padded]; int32 workspace [16, MAC_RANK_PADDED] (summed into)
    mac_down_ptr, ws_ptr,
    # outputs: scale / zero point (slot 3, block 0 writes them), residual codes [T, n_main] (debug; None)
    scale_ptr, zero_ptr, mac_codes_ptr,
    # sizes
    T, n_main,
    # tiles and scheme
    BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr, MAC_RANK_PADDED: tl.constexpr, ACT_BITS: tl.constexpr,
    AUX_ACT_BITS: tl.constexpr, SYMMETRIC: tl.constexpr, STORE_MAC_CODES: tl.constexpr,
):
    """The MAC residual of main channels blk * BLOCK_K.. quantized at aux bits and its down
    product added into the workspace: D3's program, or one of the GEMM's first programs when the
    GEMM does the MAC down (gemm.py, MAC_IN_GRID)."""
    rows = tl.arange(0, BLOCK_T)
    row_valid = rows < T
    rows64 = rows.to(tl.int64)
    hi, lo = _load_stats(stats_ptr, rows, row_valid, 0, SYMMETRIC)
    s, z = qgrid(hi, lo, tl.load(clip_ptr + 0), ACT_BITS, SYMMETRIC)
    res_hi, res_lo = _load_stats(stats_ptr, rows, row_valid, 2, SYMMETRIC)
    s_res, z_res = qgrid(res_hi, res_lo, tl.load(clip_ptr + 3), AUX_ACT_BITS, SYMMETRIC)
    if blk == 0:
        tl.store(scale_ptr + rows * 4 + 3, s_res, mask=row_valid)
        tl.store(zero_ptr + rows * 4 + 3, stored_zero(z_res, AUX_ACT_BITS, SYMMETRIC), mask=row_valid)
    k = blk * BLOCK_K + tl.arange(0, BLOCK_K)
    k_valid = k < n_main
    m2 = row_valid[:, None] & k_valid[None, :]
    # the residual is recomputed from the scratch, as kernel (a) does
    xp = tl.load(scratch_ptr + rows64[:, None] * stride_scratch + k[None, :], mask=m2, other=0.0).to(tl.float32)
    _, qc = qcodes(xp, s[:, None], z[:, None], ACT_BITS, SYMMETRIC)
    res = xp - qc * s[:, None]
    rs, _ = qcodes(res, s_res[:, None], z_res[:, None], AUX_ACT_BITS, SYMMETRIC)
    rs = tl.where(m2, rs, 0.0).to(tl.int8)
    if STORE_MAC_CODES:
        tl.store(mac_codes_ptr + rows64[:, None] * n_main + k[None, :], rs, mask=m2)
    r = tl.arange(0, MAC_RANK_PADDED)
    d = tl.load(mac_down_ptr + k[:, None] * MAC_RANK_PADDED + r[None, :], mask=k_valid[:, None], other=0)
    acc = tl.dot(rs, d, out_dtype=tl.int32)
    tl.atomic_add(ws_ptr + rows[:, None] * MAC_RANK_PADDED + r[None, :], acc, mask=row_valid[:, None])


@triton.jit
def _mac_finish(
    # input text mask [T] as uint8 (None: every row is text); statistics, clipping [4]
    mask_ptr, stats_ptr, clip_ptr,
    # MAC down factor's per-rank scale and code sum; the summed int32 workspace (reset to zero here)
    mac_down_scale_ptr, mac_down_colsum_ptr, ws_ptr,
    # output h_mac [T, rank padded]
    h_mac_ptr, T,
    BLOCK_T: tl.constexpr, MAC_RANK_PADDED: tl.constexpr, AUX_ACT_BITS: tl.constexpr, SYMMETRIC: tl.constexpr,
    MAC_ROWS: tl.constexpr, HAS_MASK: tl.constexpr,
):
    """Run by the last MAC-down program to arrive: h_mac from the summed workspace (left at
    zero), the MAC row selection applied, the statistics reset to their neutral values."""
    rows = tl.arange(0, BLOCK_T)
    row_valid = rows < T
    rows64 = rows.to(tl.int64)
    res_hi, res_lo = _load_stats(stats_ptr, rows, row_valid, 2, SYMMETRIC)
    s_res, z_res = qgrid(res_hi, res_lo, tl.load(clip_ptr + 3), AUX_ACT_BITS, SYMMETRIC)
    zs_res = stored_zero(z_res, AUX_ACT_BITS, SYMMETRIC)
    r = tl.arange(0, MAC_RANK_PADDED)
    zero = tl.zeros([BLOCK_T, MAC_RANK_PADDED], tl.int32)
    acc = tl.atomic_xchg(ws_ptr + rows[:, None] * MAC_RANK_PADDED + r[None, :], zero)
    if HAS_MASK:
        is_text = tl.load(mask_ptr + rows, mask=row_valid, other=0) != 0
    else:
        is_text = row_valid  # no mask: every row is text
    if MAC_ROWS == 0:
        selected = is_text
    elif MAC_ROWS == 1:
        selected = ~is_text
    else:
        selected = row_valid | ~row_valid  # all rows
    d_scale = tl.load(mac_down_scale_ptr + r)
    d_colsum = tl.load(mac_down_colsum_ptr + r)
    h_mac = (acc - zs_res[:, None] * d_colsum[None, :]).to(tl.float32) * s_res[:, None] * d_scale[None, :]
    h_mac = tl.where(selected[:, None], h_mac, 0.0)  # so the GEMM's epilogue needs no mask
    tl.store(h_mac_ptr + rows64[:, None] * MAC_RANK_PADDED + r[None, :], h_mac, mask=row_valid[:, None])
    _reset_stats(stats_ptr, SYMMETRIC)


@triton.jit
def _decode_mac_kernel(
    # input text mask [T] as uint8 (None: every row is text); scratch, statistics, clipping [4]
    mask_ptr, scratch_ptr, stride_scratch, stats_ptr, clip_ptr,
    # MAC down factor: int8 codes [n_main, rank padded], per-rank scale and code sum
    mac_down_ptr, mac_down_scale_ptr, mac_down_colsum_ptr,
    # int32 workspace [16, MAC_RANK_PADDED] (zero on entry) and this launch's arrival counter
    ws_ptr, counter_ptr,
    # outputs: scale / zero point (slot 3), h_mac [T, rank padded], residual codes [T, n_main] (debug; None)
    scale_ptr, zero_ptr, h_mac_ptr, mac_codes_ptr,
    # sizes
    T, n_main,
    # tiles and scheme
    BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr, MAC_RANK_PADDED: tl.constexpr, ACT_BITS: tl.constexpr,
    AUX_ACT_BITS: tl.constexpr, SYMMETRIC: tl.constexpr, MAC_ROWS: tl.constexpr, HAS_MASK: tl.constexpr,
    STORE_MAC_CODES: tl.constexpr,
):
    _mac_down_block(tl.program_id(0), scratch_ptr, stride_scratch, stats_ptr, clip_ptr, mac_down_ptr, ws_ptr,
                    scale_ptr, zero_ptr, mac_codes_ptr, T, n_main, BLOCK_T, BLOCK_K, MAC_RANK_PADDED, ACT_BITS,
                    AUX_ACT_BITS, SYMMETRIC, STORE_MAC_CODES)
    tl.debug_barrier()  # every thread's atomics are in before the arrival is counted
    arrived = tl.atomic_add(counter_ptr, 1)
    if arrived == tl.num_programs(0) - 1:  # the last program: finish h_mac, reset the statistics
        tl.atomic_xchg(counter_ptr, 0)
        _mac_finish(mask_ptr, stats_ptr, clip_ptr, mac_down_scale_ptr, mac_down_colsum_ptr, ws_ptr, h_mac_ptr, T,
                    BLOCK_T, MAC_RANK_PADDED, AUX_ACT_BITS, SYMMETRIC, MAC_ROWS, HAS_MASK)


# ---------------------------------------------------------------------------------------------
# launchers
# ---------------------------------------------------------------------------------------------

# decode_workspace's counters: D2 arrivals, D3 arrivals, the GEMM's four (MAC_COUNTERS), the fused
# D1 + D2's three (FUSED_COUNTERS: ticket, D1 arrivals, programs done)
N_COUNTERS = 9
MAC_COUNTERS = slice(2, 6)
FUSED_COUNTERS = slice(6, 9)

_WORKSPACE: dict[tuple[str, int | None, bool], tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}


def decode_workspace(device: torch.device, symmetric: bool, rank_padded: int
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(statistics [16, 8] f32 at their neutral values, int32 workspace [16, R] zeroed, the
    counters: D2's and D3's arrivals, the four of the GEMM's MAC-down programs (gemm.py,
    MAC_IN_GRID: ticket, MAC arrivals, h_mac ready, programs done), the three of the fused D1 + D2
    (ticket, D1 arrivals, programs done)) of a device, shared by all layers and left so after every call. Grows on
    demand: run every layer once before capturing CUDA graphs (vLLM's warm-up does)."""
    key = (device.type, device.index, symmetric)
    stats, ws, cnt = _WORKSPACE.get(key, (None, None, None))
    if stats is None or ws.shape[1] < rank_padded:
        stats = torch.zeros(DECODE_ROWS, 8, dtype=torch.float32, device=device)
        if not symmetric:
            stats[:, 0::2] = float("-inf")
            stats[:, 1::2] = float("inf")
        ws = torch.zeros(DECODE_ROWS, max(16, rank_padded), dtype=torch.int32, device=device)
        cnt = torch.zeros(N_COUNTERS, dtype=torch.int32, device=device)
        _WORKSPACE[key] = (stats, ws, cnt)
    return stats, ws, cnt


def can_implement_decode(kl: KernelLayer, rows: int) -> tuple[bool, str]:
    """Whether the split decode kernel (a) takes `rows` rows of this layer: (True, "") or
    (False, the reason), never an exception (support.can_implement's convention)."""
    if not 1 <= rows <= DECODE_ROWS:
        return False, f"{rows} rows: the decode kernel (a) takes 1..{DECODE_ROWS} rows (one tensor-core tile)"
    if kl.main < 32:
        return False, f"main set of {kl.main} channels < 32 (int8 tl.dot needs K >= 32)"
    return True, ""


def mac_down_inputs(text_mask: torch.Tensor | None, kl: KernelLayer, out: QuantizedActivations,
                    scratch: torch.Tensor, workspace: tuple[torch.Tensor, torch.Tensor, torch.Tensor]
                    ) -> tuple[dict, dict]:
    """Arguments and constexprs of the MAC-down programs (_mac_down_block, _mac_finish) shared
    by D3 and the GEMM that runs them in its grid."""
    stats = workspace[0]
    args = dict(
        mask_ptr=text_mask.view(torch.uint8) if text_mask is not None else None,
        scratch_ptr=scratch, stride_scratch=scratch.stride(0), stats_ptr=stats, clip_ptr=kl.act_clip,
        mac_down_ptr=kl.mac_down, mac_down_scale_ptr=kl.mac_down_scale, mac_down_colsum_ptr=kl.mac_down_colsum,
        mac_codes_ptr=out.mac_codes,
    )
    constexprs = dict(
        ACT_BITS=kl.act_bits, AUX_ACT_BITS=kl.aux_act_bits, MAC_ROWS=MAC_ROW_CHOICES.index(kl.mac_rows),
        HAS_MASK=text_mask is not None, STORE_MAC_CODES=out.mac_codes is not None,
    )
    return args, constexprs


def plan_transform_decode(x: torch.Tensor, kl: KernelLayer, scratch: torch.Tensor, stats: torch.Tensor) -> Launch:
    """D1 alone (_decode_transform_kernel): the transformed rows of x [T <= 16, in_features] to the
    float32 scratch [T, in_features] (main | text | vision columns), their per-row statistics
    merged into `stats` [16, 8] (neutral on entry). Also the first launch of the W4A16 decode
    (w4a16.py), which reads the scratch and never the statistics."""
    T = x.shape[0]
    has_text, has_vision = kl.text > 0, kl.vision > 0
    n1_padded = max(16, next_pow2(kl.n1))
    block_p2_cols = 16 if kl.n2 <= 16 else KRON_BLOCK
    block_p1_cols = min(n1_padded, KRON_BLOCK)
    tokens_per_tile = max(1, min(DECODE_ROWS, KRON_Z_ELEMENTS // (n1_padded * block_p2_cols)))
    n_tiles = triton.cdiv(kl.n1, block_p1_cols) * triton.cdiv(kl.n2, block_p2_cols) * triton.cdiv(T, tokens_per_tile)
    block_po_cols = 64 if kl.text > 32 or kl.vision > 32 else 32
    n_outlier_blocks = triton.cdiv(kl.text, block_po_cols) + triton.cdiv(kl.vision, block_po_cols)
    return Launch(_decode_transform_kernel, (n_tiles + n_outlier_blocks,), dict(
        x_ptr=x, stride_x=x.stride(0),
        idx_main_ptr=kl.idx_main, smooth_ptr=kl.main_smooth, p1_ptr=kl.main_p1, p2_ptr=kl.main_p2,
        idx_text_ptr=kl.idx_text if has_text else None, p_text_ptr=kl.text_p if has_text else None,
        idx_vision_ptr=kl.idx_vision if has_vision else None, p_vision_ptr=kl.vision_p if has_vision else None,
        scratch_ptr=scratch, stride_scratch=scratch.stride(0), stats_ptr=stats,
        T=T, n1=kl.n1, n2=kl.n2, n_main=kl.main, n_text=kl.text, n_vision=kl.vision,
    ), dict(
        BLOCK_T=DECODE_ROWS, TOKENS_PER_TILE=tokens_per_tile, N1_PADDED=n1_padded,
        BLOCK_P2_ROWS=KRON_BLOCK if kl.n2 > 16 else 16, BLOCK_P2_COLS=block_p2_cols, BLOCK_P1_COLS=block_p1_cols,
        BLOCK_PO_ROWS=16, BLOCK_PO_COLS=block_po_cols,
        SYMMETRIC=kl.act_symmetric, HAS_TEXT=has_text, HAS_VISION=has_vision, INPUT_PRECISION=kl.precision,
        # no FMA (residuals round like torch); 8 warps: the [tokens x n1, 16] Z tile fits in registers (AOT check)
    ), dict(num_warps=8, num_stages=1, enable_fp_fusion=False))


def plan_quantize_decode(
    x: torch.Tensor, text_mask: torch.Tensor | None, kl: KernelLayer, out: QuantizedActivations, scratch: torch.Tensor,
    workspace: tuple[torch.Tensor, torch.Tensor, torch.Tensor], mac_in_gemm: bool = False, fused: bool | None = None,
) -> list[Launch]:
    """The launches for x [T <= 16, in_features]: D1 and D2 in one grid (fused, the default unless
    IN_GRID_WAITS is off: _decode_transform_quantize_kernel) or as two launches (fused=False), then
    D3 with MAC unless mac_in_gemm (the GEMM's first programs do D3's work then, see plan_linear_decode)."""
    fused = IN_GRID_WAITS if fused is None else fused
    T = x.shape[0]
    stats, ws, cnt = workspace
    has_text, has_vision, has_cws, has_mac = kl.text > 0, kl.vision > 0, kl.cws_rank > 0, kl.mac_rank > 0
    off_text, off_vision, _ = code_offsets(kl)
    opts = dict(num_warps=4, num_stages=1, enable_fp_fusion=False)  # no FMA: residuals round like torch
    d1 = plan_transform_decode(x, kl, scratch, stats)
    block_po_cols = d1.constexprs["BLOCK_PO_COLS"]
    n_outlier_blocks = triton.cdiv(kl.text, block_po_cols) + triton.cdiv(kl.vision, block_po_cols)
    n_k = triton.cdiv(kl.main, BLOCK_K_DECODE)
    d2 = Launch(_decode_quantize_kernel, (n_k + n_outlier_blocks,), dict(
        scratch_ptr=scratch, stride_scratch=scratch.stride(0), stats_ptr=stats, clip_ptr=kl.act_clip,
        cws_down_ptr=kl.cws_down if has_cws else None,
        cws_down_scale_ptr=kl.cws_down_scale if has_cws else None,
        cws_down_colsum_ptr=kl.cws_down_colsum if has_cws else None,
        ws_ptr=ws, counter_ptr=cnt[0:1],
        codes_ptr=out.codes, stride_codes=out.codes.stride(0), scale_ptr=out.scale, zero_ptr=out.zero,
        h_cws_ptr=out.h_cws if has_cws else None, T=T, n_main=kl.main, n_text=kl.text, n_vision=kl.vision,
        off_text=off_text, off_vision=off_vision,
    ), dict(
        BLOCK_T=DECODE_ROWS, BLOCK_K=BLOCK_K_DECODE, BLOCK_PO_COLS=block_po_cols,
        CWS_RANK_PADDED=kl.cws_rank_padded or 16, ACT_BITS=kl.act_bits, AUX_ACT_BITS=kl.aux_act_bits,
        SYMMETRIC=kl.act_symmetric, HAS_TEXT=has_text, HAS_VISION=has_vision, HAS_CWS=has_cws, HAS_MAC=has_mac,
    ), opts)
    launches = [d1, d2]
    if fused:  # D1's programs take the first tickets; D2's wait for them (no D1 -> D2 launch boundary)
        launches = [Launch(_decode_transform_quantize_kernel, (d1.grid[0] + d2.grid[0],),
                           {**d1.args, **d2.args, "sync_ptr": cnt[FUSED_COUNTERS], "n_d1": d1.grid[0]},
                           {**d1.constexprs, **d2.constexprs}, d1.options)]
    if has_mac and not mac_in_gemm:
        args, constexprs = mac_down_inputs(text_mask, kl, out, scratch, workspace)
        launches.append(Launch(_decode_mac_kernel, (n_k,), dict(
            **args, ws_ptr=ws, counter_ptr=cnt[1:2], scale_ptr=out.scale, zero_ptr=out.zero, h_mac_ptr=out.h_mac,
            T=T, n_main=kl.main,
        ), dict(
            BLOCK_T=DECODE_ROWS, BLOCK_K=BLOCK_K_DECODE, MAC_RANK_PADDED=kl.mac_rank_padded,
            SYMMETRIC=kl.act_symmetric, **constexprs,
        ), opts))
    return launches


def checked_decode_input(x: torch.Tensor, kl: KernelLayer, can_implement) -> torch.Tensor:
    """x [T, in_features] in bf16/fp16/fp32 that `can_implement(kl, T)` accepts, with unit column
    stride (the decode launchers' shared check; a clear error otherwise)."""
    if x.dim() != 2 or x.shape[1] != kl.in_features:
        raise ValueError(f"x must be [T, {kl.in_features}], got {tuple(x.shape)}")
    if x.dtype not in (torch.bfloat16, torch.float16, torch.float32):
        raise TypeError(f"the kernels compute in float32 from bf16/fp16/fp32 inputs, got {x.dtype}")
    ok, why = can_implement(kl, x.shape[0])
    if not ok:
        raise ValueError(why)
    return x if x.stride(1) == 1 else x.contiguous()


def quantize_input_decode_triton(
    x: torch.Tensor, text_mask: torch.Tensor | None, kl: KernelLayer, store_mac: bool = False
) -> QuantizedActivations:
    """Kernel (a)'s outputs for x [T <= 16, in_features] (bf16/fp16/fp32) by the split decode
    launches; text_mask [T] bool or None (all text). Same contract as quantize_input_triton."""
    x = checked_decode_input(x, kl, can_implement_decode)
    T = x.shape[0]
    out = alloc_activations(kl, T, x.device, store_mac)
    scratch = torch.empty(T, kl.in_features, dtype=scratch_dtype(kl), device=x.device)
    workspace = decode_workspace(x.device, kl.act_symmetric, max(kl.cws_rank_padded, kl.mac_rank_padded))
    for launch in plan_quantize_decode(x, text_mask, kl, out, scratch, workspace):
        launch.run()
    return out


def plan_linear_decode(
    x: torch.Tensor, text_mask: torch.Tensor | None, kl: KernelLayer, out: torch.Tensor,
    act: QuantizedActivations, scratch: torch.Tensor, workspace: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    config=None,
) -> list[Launch]:
    """The whole linear at 1-16 rows in two launches: D1 + D2 in one grid
    (_decode_transform_quantize_kernel), and the GEMM, whose first cdiv(main, 64) programs do
    D3's work (the MAC residual codes and down product, h_mac) while the others stream the
    weights; a GEMM program waits for h_mac only before its epilogue (gemm.py, MAC_IN_GRID).
    Without MAC the GEMM is the plain one (also two launches)."""
    from .gemm import default_config, plan_gemm  # gemm imports this module's MAC helpers

    has_mac = kl.mac_rank > 0
    launches = plan_quantize_decode(x, text_mask, kl, act, scratch, workspace, mac_in_gemm=has_mac)
    cfg = config or default_config(kl, x.shape[0], x.device)
    mac = None
    if has_mac:
        args, constexprs = mac_down_inputs(text_mask, kl, act, scratch, workspace)
        mac = (args, constexprs, workspace[1], workspace[2][MAC_COUNTERS])
    return launches + [plan_gemm(act, kl, out, cfg, mac_in_grid=mac)]


def linear_decode_triton(x: torch.Tensor, text_mask: torch.Tensor | None, kl: KernelLayer, store_mac: bool = False,
                         config=None) -> tuple[torch.Tensor, QuantizedActivations]:
    """y [T, out_features] in x's dtype for x [T <= 16, in_features] by plan_linear_decode's two
    launches, and kernel (a)'s outputs (as quantize_input_decode_triton's; h_mac written by the
    GEMM's MAC-down programs). What torch.ops.splitq.linear runs at 1-16 rows."""
    x = checked_decode_input(x, kl, can_implement_decode)
    T = x.shape[0]
    act = alloc_activations(kl, T, x.device, store_mac)
    scratch = torch.empty(T, kl.in_features, dtype=scratch_dtype(kl), device=x.device)
    y = torch.empty(T, kl.out_features, dtype=x.dtype, device=x.device)
    workspace = decode_workspace(x.device, kl.act_symmetric, max(kl.cws_rank_padded, kl.mac_rank_padded))
    for launch in plan_linear_decode(x, text_mask, kl, y, act, scratch, workspace, config):
        launch.run()
    return y, act
