"""Kernel (a): one pass over the input rows of a SplitQ linear (reference: `quantize_input`).

Each program owns BLOCK_T token rows at a time (persistent over token blocks) and, for them:
1. gathers the main channels, multiplies them by main_smooth and applies the Kronecker transform
   X' = P1^T R P2 (R = the smoothed row as an n1 x n2 matrix, row-major) as two tl.dots per block
   of n2 columns: first Z = R P2 for TOKENS_PER_TILE tokens at once (rows (token, i)), then,
   after permuting Z in registers to rows i, P1^T Z; the transformed rows go to a float32
   scratch (bfloat16 under precision "bf16", the values rounded before their statistics) while
   their max |x| (max and min when asymmetric) is tracked;
2. quantizes them per token (act_bits), stores the codes, accumulates the CWS down product
   codes @ cws_down^T in int32 and tracks the statistics of the MAC residual X' - X^;
3. quantizes the residual (aux_act_bits) and accumulates the MAC down product; rows outside the
   MAC row selection (mac_rows: text rows by the mask, vision rows, or all) get zero, branch-free;
4. does the same for the text and vision outlier sets with their dense transforms
   (X'_o = X[:, idx_o] P_o, aux_act_bits).
The reference multiplies (P1^T R) P2, this kernel P1^T (R P2): equal in exact arithmetic, so a
code can differ only where the reference's x / scale lies within float32 rounding of a
half-integer (see splitq_kernels.testing).

Outputs (all rows T): int8 codes [T, main | text | vision] (asymmetric codes stored minus
2^(b-1)), per-token scale [T, 4] and zero point [T, 4] (int32, minus 2^(b-1) like the codes:
common.stored_zero) for main, text, vision, MAC, and the down products h_cws [T, CWS_RANK_PADDED],
h_mac [T, MAC_RANK_PADDED] (float32, already rescaled: h = (sum_k (q - z) d) * s_x * s_d).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from ..layout import KernelLayer, next_pow2, scratch_dtype
from ..reference.scheme import MAC_ROWS as MAC_ROW_CHOICES  # ("text", "vision", "all")
from .common import at_precision, fdot, init_stats, merge_stats, qcodes, qgrid, row_stats, small_mm, stored_zero
from .launch import Launch


@triton.jit
def _outlier_set(
    # input rows; the set's channel indices [n_set] and dense transform P_o [n_set, n_set]
    x_ptr, stride_x, rows, row_valid, idx_ptr, p_ptr, n_set,
    # float32 scratch: this program's rows, the set's columns from scratch_col on
    scratch_ptr, stride_scratch, scratch_rows, scratch_col,
    # outputs: codes (the set's columns from codes_col on), per-row scale and zero point in SLOT
    codes_ptr, stride_codes, codes_col, scale_ptr, zero_ptr, clip,
    # meta-parameters
    SLOT: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_PO_ROWS: tl.constexpr, BLOCK_PO_COLS: tl.constexpr,
    BITS: tl.constexpr, SYMMETRIC: tl.constexpr, INPUT_PRECISION: tl.constexpr,
):
    """X'_o = X[:, idx] @ P_o, quantized per token (outlier sets: small dense transforms). Two
    passes, as for the main set: the per-row grid needs the whole row first."""
    rows64 = rows.to(tl.int64)
    scratch_rows64 = scratch_rows.to(tl.int64)
    hi, lo = init_stats(BLOCK_T, SYMMETRIC)
    for o0 in range(0, n_set, BLOCK_PO_COLS):
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
            acc = small_mm(xv.to(tl.float32), p, acc, BLOCK_T >= 16, INPUT_PRECISION)
        acc = at_precision(acc, INPUT_PRECISION)  # as the scratch holds it
        valid = row_valid[:, None] & o_valid[None, :]
        tl.store(scratch_ptr + scratch_rows64[:, None] * stride_scratch + scratch_col + o[None, :], acc, mask=valid)
        h, l = row_stats(acc, valid, SYMMETRIC)
        hi, lo = merge_stats(hi, lo, h, l, SYMMETRIC)
    tl.debug_barrier()  # the scratch is read back below by other threads
    s, z = qgrid(hi, lo, clip, BITS, SYMMETRIC)
    for o0 in range(0, n_set, BLOCK_PO_COLS):
        o = o0 + tl.arange(0, BLOCK_PO_COLS)
        valid = row_valid[:, None] & (o < n_set)[None, :]
        xo = tl.load(scratch_ptr + scratch_rows64[:, None] * stride_scratch + scratch_col + o[None, :], mask=valid,
                     other=0.0).to(tl.float32)
        qs, qc = qcodes(xo, s[:, None], z[:, None], BITS, SYMMETRIC)
        tl.store(codes_ptr + rows64[:, None] * stride_codes + codes_col + o[None, :], qs.to(tl.int8), mask=valid)
    tl.store(scale_ptr + rows * 4 + SLOT, s, mask=row_valid)
    tl.store(zero_ptr + rows * 4 + SLOT, stored_zero(z, BITS, SYMMETRIC), mask=row_valid)


@triton.jit
def _main_codes(scratch_ptr, stride_scratch, scratch_rows64, row_valid, k0, n_main, s, z,
                BLOCK_K: tl.constexpr, BITS: tl.constexpr, SYMMETRIC: tl.constexpr):
    """Main channels k0.. of the program's scratch rows and their codes on the per-row grid (s, z):
    (k, k_valid, mask, x', stored codes as int8 (0 outside the mask), grid codes)."""
    k = k0 + tl.arange(0, BLOCK_K)
    k_valid = k < n_main
    m2 = row_valid[:, None] & k_valid[None, :]
    xp = tl.load(scratch_ptr + scratch_rows64[:, None] * stride_scratch + k[None, :], mask=m2, other=0.0).to(tl.float32)
    qs, qc = qcodes(xp, s[:, None], z[:, None], BITS, SYMMETRIC)
    return k, k_valid, m2, xp, tl.where(m2, qs, 0.0).to(tl.int8), qc


@triton.jit
def _quantize_input_kernel(
    # input rows x [T, in_features]; text mask [T] as uint8 (None: every row is text)
    x_ptr, stride_x, mask_ptr,
    # main set: channel indices [n_main], smoothing [n_main], Kronecker factors P1 [n1, n1], P2 [n2, n2]
    idx_main_ptr, smooth_ptr, p1_ptr, p2_ptr,
    # outlier sets: channel indices and dense transforms (None when the set is empty)
    idx_text_ptr, p_text_ptr, idx_vision_ptr, p_vision_ptr,
    # activation clipping factors [4]: main, text, vision, MAC
    clip_ptr,
    # low-rank "down" factors: int8 codes [n_main, rank padded], per-rank scale and code sum
    # (None when the branch is off)
    cws_down_ptr, cws_down_scale_ptr, cws_down_colsum_ptr,
    mac_down_ptr, mac_down_scale_ptr, mac_down_colsum_ptr,
    # float32 scratch for the transformed rows: BLOCK_T rows per program, in_features columns
    scratch_ptr, stride_scratch,
    # outputs: codes [T, main | text | vision], scale and zero point [T, 4], down products
    # h_cws / h_mac [T, rank padded] (None when the branch is off), MAC residual codes [T, n_main]
    # (debug; None unless asked for)
    codes_ptr, stride_codes, scale_ptr, zero_ptr, h_cws_ptr, h_mac_ptr, mac_codes_ptr,
    # sizes: rows, Kronecker factors (n_main = n1 * n2), outlier sets, their first codes column
    T, n1, n2, n_main, n_text, n_vision, off_text, off_vision,
    # tiles: token rows per program step; tokens per Kronecker tile; blocks of P2 rows (j) and
    # columns (b), of P1 columns (a), of main channels, of outlier-transform rows and columns
    BLOCK_T: tl.constexpr, TOKENS_PER_TILE: tl.constexpr, N1_PADDED: tl.constexpr,
    BLOCK_P2_ROWS: tl.constexpr, BLOCK_P2_COLS: tl.constexpr, BLOCK_P1_COLS: tl.constexpr,
    BLOCK_K: tl.constexpr, BLOCK_PO_ROWS: tl.constexpr, BLOCK_PO_COLS: tl.constexpr,
    # low-rank ranks padded to a power of two >= 16 (layout.padded_rank)
    CWS_RANK_PADDED: tl.constexpr, MAC_RANK_PADDED: tl.constexpr,
    # scheme: activation bits (main; outliers and MAC), symmetric grids, MAC rows (0 text, 1 vision, 2 all)
    ACT_BITS: tl.constexpr, AUX_ACT_BITS: tl.constexpr, SYMMETRIC: tl.constexpr, MAC_ROWS: tl.constexpr,
    # which parts are present
    HAS_MASK: tl.constexpr, HAS_TEXT: tl.constexpr, HAS_VISION: tl.constexpr, HAS_CWS: tl.constexpr,
    HAS_MAC: tl.constexpr, STORE_MAC_CODES: tl.constexpr,
    # tl.dot input precision of the float32 products
    INPUT_PRECISION: tl.constexpr,
):
    pid = tl.program_id(0)
    n_programs = tl.num_programs(0)
    n_blocks = tl.cdiv(T, BLOCK_T)
    clip_main = tl.load(clip_ptr + 0)
    USE_DOT: tl.constexpr = BLOCK_T >= 16  # below 16 rows, the down products run on CUDA cores
    for tb in range(pid, n_blocks, n_programs):  # persistent: the scratch is per program
        tl.debug_barrier()  # the scratch rows are reused: the previous block must be fully read
        t0 = tb * BLOCK_T
        rows = t0 + tl.arange(0, BLOCK_T)
        row_valid = rows < T
        rows64 = rows.to(tl.int64)
        scratch_rows = pid * BLOCK_T + tl.arange(0, BLOCK_T)  # this program's scratch rows
        scratch_rows64 = scratch_rows.to(tl.int64)

        # ---- 1. main set: gather, smooth, Kronecker transform -> scratch[:, :n_main], row stats ----
        # TOKENS_PER_TILE tokens at a time, so that Z = R P2 has enough rows (token, i) for a tl.dot
        # even when n1 is small
        hi, lo = init_stats(BLOCK_T, SYMMETRIC)
        for tt in range(0, BLOCK_T, TOKENS_PER_TILE):
            zr = tl.arange(0, TOKENS_PER_TILE * N1_PADDED)  # rows (token, i) of Z = R P2
            z_token = t0 + tt + zr // N1_PADDED
            z_i = zr % N1_PADDED
            z_valid = (z_token < T) & (z_i < n1)
            c = tl.arange(0, TOKENS_PER_TILE * BLOCK_P2_COLS)  # columns (token, b) of P1^T Z
            c_token = t0 + tt + c // BLOCK_P2_COLS
            c_scratch = pid * BLOCK_T + tt + c // BLOCK_P2_COLS  # their scratch rows
            i_all = tl.arange(0, N1_PADDED)
            tile_hi, tile_lo = init_stats(TOKENS_PER_TILE, SYMMETRIC)
            for b0 in range(0, n2, BLOCK_P2_COLS):
                b = b0 + tl.arange(0, BLOCK_P2_COLS)
                b_valid = b < n2
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
                # rows (token, i) -> rows i with columns (token, b): every token's Z is multiplied by P1^T
                zt = tl.reshape(tl.permute(tl.reshape(z, (TOKENS_PER_TILE, N1_PADDED, BLOCK_P2_COLS)), (1, 0, 2)),
                                (N1_PADDED, TOKENS_PER_TILE * BLOCK_P2_COLS))
                c_b = b0 + c % BLOCK_P2_COLS
                c_valid = (c_token < T) & (c_b < n2)
                for a0 in range(0, N1_PADDED, BLOCK_P1_COLS):
                    a = a0 + tl.arange(0, BLOCK_P1_COLS)
                    a_valid = a < n1
                    p1t = tl.load(p1_ptr + i_all[None, :] * n1 + a[:, None],
                                  mask=a_valid[:, None] & (i_all < n1)[None, :], other=0.0)  # P1[i, a] as [a, i]
                    # X'[a, b] of each token: [a, (token, b)], as the scratch holds it
                    xp = at_precision(fdot(p1t, zt, None, INPUT_PRECISION), INPUT_PRECISION)
                    valid = a_valid[:, None] & c_valid[None, :]
                    tl.store(scratch_ptr + c_scratch.to(tl.int64)[None, :] * stride_scratch + a[:, None] * n2
                             + c_b[None, :], xp, mask=valid)
                    # per-token stats of the tile: reduce over a and b, keep the token axis
                    if SYMMETRIC:
                        v3 = tl.reshape(tl.where(valid, tl.abs(xp), 0.0),
                                        (BLOCK_P1_COLS, TOKENS_PER_TILE, BLOCK_P2_COLS))
                        tile_hi = tl.maximum(tile_hi, tl.max(tl.max(v3, axis=2), axis=0))
                    else:
                        v3 = tl.reshape(tl.where(valid, xp, float("-inf")),
                                        (BLOCK_P1_COLS, TOKENS_PER_TILE, BLOCK_P2_COLS))
                        tile_hi = tl.maximum(tile_hi, tl.max(tl.max(v3, axis=2), axis=0))
                        w3 = tl.reshape(tl.where(valid, xp, float("inf")),
                                        (BLOCK_P1_COLS, TOKENS_PER_TILE, BLOCK_P2_COLS))
                        tile_lo = tl.minimum(tile_lo, tl.min(tl.min(w3, axis=2), axis=0))
            # scatter the tile's TOKENS_PER_TILE stats into the BLOCK_T-row vectors (no dynamic indexing in Triton)
            onehot = tl.arange(0, BLOCK_T)[:, None] == (tt + tl.arange(0, TOKENS_PER_TILE))[None, :]
            if SYMMETRIC:
                hi = tl.maximum(hi, tl.max(tl.where(onehot, tile_hi[None, :], 0.0), axis=1))
            else:
                hi = tl.maximum(hi, tl.max(tl.where(onehot, tile_hi[None, :], float("-inf")), axis=1))
                lo = tl.minimum(lo, tl.min(tl.where(onehot, tile_lo[None, :], float("inf")), axis=1))
        tl.debug_barrier()  # scratch written above by other threads

        # ---- 2. main codes, CWS down product, residual stats ----
        s_main, z_main = qgrid(hi, lo, clip_main, ACT_BITS, SYMMETRIC)
        zs_main = stored_zero(z_main, ACT_BITS, SYMMETRIC)
        tl.store(scale_ptr + rows * 4 + 0, s_main, mask=row_valid)
        tl.store(zero_ptr + rows * 4 + 0, zs_main, mask=row_valid)
        acc_cws = tl.zeros([BLOCK_T, CWS_RANK_PADDED], tl.int32)
        res_hi, res_lo = init_stats(BLOCK_T, SYMMETRIC)
        for k0 in range(0, n_main, BLOCK_K):
            k, k_valid, m2, xp, qs, qc = _main_codes(scratch_ptr, stride_scratch, scratch_rows64, row_valid, k0, n_main,
                                                     s_main, z_main, BLOCK_K, ACT_BITS, SYMMETRIC)
            tl.store(codes_ptr + rows64[:, None] * stride_codes + k[None, :], qs, mask=m2)
            if HAS_CWS:
                d = tl.load(cws_down_ptr + k[:, None] * CWS_RANK_PADDED + tl.arange(0, CWS_RANK_PADDED)[None, :],
                            mask=k_valid[:, None], other=0)
                acc_cws = small_mm(qs, d, acc_cws, USE_DOT, INPUT_PRECISION)
            if HAS_MAC:
                res = xp - qc * s_main[:, None]  # X' - X^ (no FMA: the kernel is compiled without fusion)
                h, l = row_stats(res, m2, SYMMETRIC)
                res_hi, res_lo = merge_stats(res_hi, res_lo, h, l, SYMMETRIC)
        if HAS_CWS:
            r = tl.arange(0, CWS_RANK_PADDED)
            d_scale = tl.load(cws_down_scale_ptr + r)
            d_colsum = tl.load(cws_down_colsum_ptr + r)
            h_cws = (acc_cws - zs_main[:, None] * d_colsum[None, :]).to(tl.float32) * s_main[:, None] * d_scale[None, :]
            tl.store(h_cws_ptr + rows64[:, None] * CWS_RANK_PADDED + r[None, :], h_cws, mask=row_valid[:, None])

        # ---- 3. MAC residual codes and down product, on the selected rows only ----
        if HAS_MAC:
            clip_res = tl.load(clip_ptr + 3)
            s_res, z_res = qgrid(res_hi, res_lo, clip_res, AUX_ACT_BITS, SYMMETRIC)
            zs_res = stored_zero(z_res, AUX_ACT_BITS, SYMMETRIC)
            tl.store(scale_ptr + rows * 4 + 3, s_res, mask=row_valid)
            tl.store(zero_ptr + rows * 4 + 3, zs_res, mask=row_valid)
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
            acc_mac = tl.zeros([BLOCK_T, MAC_RANK_PADDED], tl.int32)
            # a block without a row MAC targets (an image's rows, MAC on text rows) skips the pass:
            # its h_mac is zero whatever the residual
            if tl.max((selected & row_valid).to(tl.int32), axis=0) > 0:
                for k0 in range(0, n_main, BLOCK_K):
                    # the residual is recomputed from the scratch: its grid needs the whole row's
                    # residual stats, known only after pass 2
                    k, k_valid, m2, xp, _, qc = _main_codes(scratch_ptr, stride_scratch, scratch_rows64, row_valid, k0,
                                                            n_main, s_main, z_main, BLOCK_K, ACT_BITS, SYMMETRIC)
                    res = xp - qc * s_main[:, None]
                    rs, rc = qcodes(res, s_res[:, None], z_res[:, None], AUX_ACT_BITS, SYMMETRIC)
                    rs = tl.where(m2, rs, 0.0).to(tl.int8)
                    if STORE_MAC_CODES:
                        tl.store(mac_codes_ptr + rows64[:, None] * n_main + k[None, :], rs, mask=m2)
                    d = tl.load(mac_down_ptr + k[:, None] * MAC_RANK_PADDED + tl.arange(0, MAC_RANK_PADDED)[None, :],
                                mask=k_valid[:, None], other=0)
                    acc_mac = small_mm(rs, d, acc_mac, USE_DOT, INPUT_PRECISION)
            r = tl.arange(0, MAC_RANK_PADDED)
            d_scale = tl.load(mac_down_scale_ptr + r)
            d_colsum = tl.load(mac_down_colsum_ptr + r)
            h_mac = (acc_mac - zs_res[:, None] * d_colsum[None, :]).to(tl.float32) * s_res[:, None] * d_scale[None, :]
            h_mac = tl.where(selected[:, None], h_mac, 0.0)  # so the GEMM's epilogue needs no mask
            tl.store(h_mac_ptr + rows64[:, None] * MAC_RANK_PADDED + r[None, :], h_mac, mask=row_valid[:, None])

        # ---- 4. outlier sets (scratch columns after the main set's) ----
        if HAS_TEXT:
            _outlier_set(x_ptr, stride_x, rows, row_valid, idx_text_ptr, p_text_ptr, n_text,
                         scratch_ptr, stride_scratch, scratch_rows, n_main,
                         codes_ptr, stride_codes, off_text, scale_ptr, zero_ptr, tl.load(clip_ptr + 1),
                         1, BLOCK_T, BLOCK_PO_ROWS, BLOCK_PO_COLS, AUX_ACT_BITS, SYMMETRIC, INPUT_PRECISION)
        if HAS_VISION:
            _outlier_set(x_ptr, stride_x, rows, row_valid, idx_vision_ptr, p_vision_ptr, n_vision,
                         scratch_ptr, stride_scratch, scratch_rows, n_main + n_text,
                         codes_ptr, stride_codes, off_vision, scale_ptr, zero_ptr, tl.load(clip_ptr + 2),
                         2, BLOCK_T, BLOCK_PO_ROWS, BLOCK_PO_COLS, AUX_ACT_BITS, SYMMETRIC, INPUT_PRECISION)


@dataclass
class QuantizedActivations:
    """Kernel (a)'s outputs, the inputs of kernel (b)."""

    codes: torch.Tensor  # int8 [T, codes_width]: main at 0, text at off_text, vision at off_vision
    scale: torch.Tensor  # f32 [T, 4]: main, text, vision, mac
    zero: torch.Tensor  # int32 [T, 4], code-domain zero point minus 2^(b-1) (0 when symmetric)
    h_cws: torch.Tensor | None  # f32 [T, cws_rank_padded]
    h_mac: torch.Tensor | None  # f32 [T, mac_rank_padded], zero on rows MAC does not target
    mac_codes: torch.Tensor | None = None  # int8 [T, main] residual codes (debug only)


def _align16(n: int) -> int:
    return -(-n // 16) * 16


def code_offsets(kl: KernelLayer) -> tuple[int, int, int]:
    """Column offsets of the text and vision codes and the row width (16-byte aligned)."""
    off_t = _align16(kl.main)
    off_v = off_t + _align16(kl.text)
    return off_t, off_v, off_v + _align16(kl.vision)


# Kronecker tiles live in registers: Z = [TOKENS_PER_TILE * N1_PADDED, BLOCK_P2_COLS] has at most
# KRON_Z_ELEMENTS elements; the gathered input tile [TOKENS_PER_TILE * N1_PADDED, BLOCK_P2_ROWS] is
# live three times (indices, smoothing, values). Spill-free at 7B shapes on sm_90 (AOT check).
KRON_Z_ELEMENTS = 4096
KRON_BLOCK = 16  # BLOCK_P2_ROWS, BLOCK_P2_COLS and BLOCK_P1_COLS (16: the smallest tl.dot dim)


def plan_quantize_input(
    x: torch.Tensor,
    text_mask: torch.Tensor | None,
    kl: KernelLayer,
    out: QuantizedActivations,
    scratch: torch.Tensor,
    block_t: int,
    n_programs: int,
) -> Launch:
    T = x.shape[0]
    has_text, has_vision, has_cws, has_mac = kl.text > 0, kl.vision > 0, kl.cws_rank > 0, kl.mac_rank > 0
    n1_padded = max(16, next_pow2(kl.n1))
    block_p2_cols = 16 if kl.n2 <= 16 else KRON_BLOCK
    tokens_per_tile = max(1, min(block_t, KRON_Z_ELEMENTS // (n1_padded * block_p2_cols)))
    # an absent branch still needs a valid shape for its (unused) accumulator
    cws_rank_padded = kl.cws_rank_padded or 16
    mac_rank_padded = kl.mac_rank_padded or 16
    # below 16 rows the down products are broadcast products [BLOCK_T, BLOCK_K, rank] on CUDA cores:
    # bound their size
    block_k = 64 if block_t >= 16 else max(32, min(64, 2048 // (block_t * max(cws_rank_padded, mac_rank_padded))))
    off_text, off_vision, _ = code_offsets(kl)
    args = dict(
        x_ptr=x, stride_x=x.stride(0), mask_ptr=text_mask.view(torch.uint8) if text_mask is not None else None,
        idx_main_ptr=kl.idx_main, smooth_ptr=kl.main_smooth, p1_ptr=kl.main_p1, p2_ptr=kl.main_p2,
        idx_text_ptr=kl.idx_text if has_text else None, p_text_ptr=kl.text_p if has_text else None,
        idx_vision_ptr=kl.idx_vision if has_vision else None, p_vision_ptr=kl.vision_p if has_vision else None,
        clip_ptr=kl.act_clip,
        cws_down_ptr=kl.cws_down if has_cws else None,
        cws_down_scale_ptr=kl.cws_down_scale if has_cws else None,
        cws_down_colsum_ptr=kl.cws_down_colsum if has_cws else None,
        mac_down_ptr=kl.mac_down if has_mac else None,
        mac_down_scale_ptr=kl.mac_down_scale if has_mac else None,
        mac_down_colsum_ptr=kl.mac_down_colsum if has_mac else None,
        scratch_ptr=scratch, stride_scratch=scratch.stride(0),
        codes_ptr=out.codes, stride_codes=out.codes.stride(0), scale_ptr=out.scale, zero_ptr=out.zero,
        h_cws_ptr=out.h_cws if has_cws else None, h_mac_ptr=out.h_mac if has_mac else None,
        mac_codes_ptr=out.mac_codes,
        T=T, n1=kl.n1, n2=kl.n2, n_main=kl.main, n_text=kl.text, n_vision=kl.vision,
        off_text=off_text, off_vision=off_vision,
    )
    constexprs = dict(
        BLOCK_T=block_t, TOKENS_PER_TILE=tokens_per_tile, N1_PADDED=n1_padded,
        BLOCK_P2_ROWS=KRON_BLOCK if kl.n2 > 16 else 16, BLOCK_P2_COLS=block_p2_cols,
        BLOCK_P1_COLS=min(n1_padded, KRON_BLOCK), BLOCK_K=block_k,
        BLOCK_PO_ROWS=16, BLOCK_PO_COLS=64 if kl.text > 32 or kl.vision > 32 else 32,
        CWS_RANK_PADDED=cws_rank_padded, MAC_RANK_PADDED=mac_rank_padded,
        ACT_BITS=kl.act_bits, AUX_ACT_BITS=kl.aux_act_bits, SYMMETRIC=kl.act_symmetric,
        MAC_ROWS=MAC_ROW_CHOICES.index(kl.mac_rows),
        HAS_MASK=text_mask is not None, HAS_TEXT=has_text, HAS_VISION=has_vision,
        HAS_CWS=has_cws, HAS_MAC=has_mac, STORE_MAC_CODES=out.mac_codes is not None,
        INPUT_PRECISION=kl.precision,
    )
    grid = (max(1, min(triton.cdiv(T, block_t), n_programs)),)
    # fp fusion off: the residual x' - (q - z) * s must round like the reference (no FMA)
    return Launch(_quantize_input_kernel, grid, args, constexprs,
                  dict(num_warps=4 if block_t < 16 else 8, num_stages=1, enable_fp_fusion=False))


def default_programs(device: torch.device) -> int:
    """Persistent grid size: one program per SM (a program uses ~230 registers x 256 threads, so
    only one fits on an SM anyway); bounds the float32 scratch to n_programs * BT rows of D_in
    (132 * 16 * 18944 * 4 B = 160 MB for a 7B down_proj on an H100, at any row count)."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 1 << 30


def alloc_activations(kl: KernelLayer, T: int, device: torch.device, store_mac: bool = False) -> QuantizedActivations:
    _, _, width = code_offsets(kl)
    return QuantizedActivations(
        codes=torch.empty(T, width, dtype=torch.int8, device=device),
        scale=torch.ones(T, 4, dtype=torch.float32, device=device),
        zero=torch.zeros(T, 4, dtype=torch.int32, device=device),
        h_cws=torch.empty(T, kl.cws_rank_padded, dtype=torch.float32, device=device) if kl.cws_rank else None,
        h_mac=torch.empty(T, kl.mac_rank_padded, dtype=torch.float32, device=device) if kl.mac_rank else None,
        mac_codes=torch.empty(T, kl.main, dtype=torch.int8, device=device) if store_mac and kl.mac_rank else None,
    )


def quantize_input_triton(
    x: torch.Tensor,
    text_mask: torch.Tensor | None,
    kl: KernelLayer,
    block_t: int | None = None,
    n_programs: int | None = None,
    store_mac: bool = False,
) -> QuantizedActivations:
    """Kernel (a) on x [T, in_features] (bf16/fp16/fp32); text_mask [T] bool or None (all text)."""
    if x.dim() != 2 or x.shape[1] != kl.in_features:
        raise ValueError(f"x must be [T, {kl.in_features}], got {tuple(x.shape)}")
    if x.dtype not in (torch.bfloat16, torch.float16, torch.float32):
        raise TypeError(f"the kernels compute in float32 from bf16/fp16/fp32 inputs, got {x.dtype} "
                        "(the reference computes float64 inputs in float64: use it for those)")
    x = x if x.stride(1) == 1 else x.contiguous()
    T = x.shape[0]
    out = alloc_activations(kl, T, x.device, store_mac)
    if T == 0:
        return out
    if block_t is None:
        block_t = min(16, next_pow2(T))
    if n_programs is None:
        n_programs = default_programs(x.device)
    grid = max(1, min(triton.cdiv(T, block_t), n_programs))
    # scratch for the transformed rows (float32, bfloat16 under precision bf16): BT rows per
    # program, reused across token blocks
    scratch = torch.empty(grid * block_t, kl.in_features, dtype=scratch_dtype(kl), device=x.device)
    plan_quantize_input(x, text_mask, kl, out, scratch, block_t, n_programs).run()
    return out
