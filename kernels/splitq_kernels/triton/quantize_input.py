"""Kernel (a): one pass over the input rows of a SplitQ linear (reference: `quantize_input`).

Each program owns BT token rows (persistent over token blocks) and, for them:
1. gathers the main channels, scales them by main_smooth and applies the Kronecker transform
   P1^T R P2 (R = the row as an n1 x n2 matrix) as two tl.dots per block of n2 columns: first
   Z = R P2 with rows (token, i), then, after permuting Z in registers to rows i, P1^T Z;
   the transformed rows go to a float32 scratch while their max |x| (or max/min) is tracked;
2. quantizes them per token (act_bits), stores the codes, accumulates the CWS down product
   codes @ cws_down^T in int32 and tracks the max of the MAC residual X' - X^;
3. quantizes the residual (aux_act_bits) and accumulates the MAC down product; the MAC rows
   selection (text mask / mac_rows) multiplies the result, branch-free;
4. does the same for the text and vision outlier sets with their dense transforms.
The reference multiplies (P1^T R) P2, this kernel P1^T (R P2): equal in exact arithmetic, so a
code can differ only where the reference's x / scale lies within float32 rounding of a
half-integer (see splitq_kernels.testing).

Outputs (all rows T): int8 codes [T, main | text | vision] (asymmetric codes stored minus
2^(b-1)), per-token scale [T, 4] and zero point [T, 4] (int32, minus 2^(b-1) like the codes)
for main, text, vision, MAC, and the down products h_cws [T, RP_s], h_mac [T, RP_c] (float32,
already rescaled: h = (sum_k (q - z) d) * s_x * s_d).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from ..layout import KernelLayer, next_pow2
from .common import init_stats, merge_stats, qcodes, qgrid, row_stats, small_mm
from .launch import Launch


@triton.jit
def _outlier_set(
    x_ptr, stride_x, rt, tv, sr, idx_ptr, p_ptr, NO, scr_ptr, stride_scr, scr_off, a_ptr, stride_a, a_off,
    s_ptr, z_ptr, SLOT: tl.constexpr, clip,
    BT: tl.constexpr, BO: tl.constexpr, BJO: tl.constexpr, BITS: tl.constexpr, SYM: tl.constexpr,
    PREC: tl.constexpr,
):
    """X'_o = X[:, idx] @ P_o, quantized per token (outlier sets: small dense transforms)."""
    rt64 = rt.to(tl.int64)
    sr64 = sr.to(tl.int64)
    hi, lo = init_stats(BT, SYM)
    for o0 in range(0, NO, BO):
        o = o0 + tl.arange(0, BO)
        ov = o < NO
        acc = tl.zeros([BT, BO], tl.float32)
        for j0 in range(0, NO, BJO):
            j = j0 + tl.arange(0, BJO)
            jv = j < NO
            idx = tl.load(idx_ptr + j, mask=jv, other=0)
            xv = tl.load(x_ptr + rt64[:, None] * stride_x + idx[None, :], mask=tv[:, None] & jv[None, :], other=0.0)
            p = tl.load(p_ptr + j[:, None] * NO + o[None, :], mask=jv[:, None] & ov[None, :], other=0.0)
            acc = small_mm(xv.to(tl.float32), p, acc, BT >= 16, PREC)
        valid = tv[:, None] & ov[None, :]
        tl.store(scr_ptr + sr64[:, None] * stride_scr + scr_off + o[None, :], acc, mask=valid)
        h, l = row_stats(acc, valid, SYM)
        hi, lo = merge_stats(hi, lo, h, l, SYM)
    tl.debug_barrier()  # the scratch is read back below by other threads
    s, z = qgrid(hi, lo, clip, BITS, SYM)
    for o0 in range(0, NO, BO):
        o = o0 + tl.arange(0, BO)
        valid = tv[:, None] & (o < NO)[None, :]
        xo = tl.load(scr_ptr + sr64[:, None] * stride_scr + scr_off + o[None, :], mask=valid, other=0.0)
        qs, qc = qcodes(xo, s[:, None], z[:, None], BITS, SYM)
        tl.store(a_ptr + rt64[:, None] * stride_a + a_off + o[None, :], qs.to(tl.int8), mask=valid)
    if SYM:
        zeff = tl.zeros([BT], tl.int32)
    else:
        zeff = (z - (1 << (BITS - 1))).to(tl.int32)
    tl.store(s_ptr + rt * 4 + SLOT, s, mask=tv)
    tl.store(z_ptr + rt * 4 + SLOT, zeff, mask=tv)


@triton.jit
def _quantize_input_kernel(
    x_ptr, stride_x, T, mask_ptr,
    idx_m_ptr, smooth_ptr, p1_ptr, p2_ptr, n1, n2, M,
    idx_t_ptr, pt_ptr, NT, idx_v_ptr, pv_ptr, NV,
    clip_ptr,
    dc_ptr, dc_scale_ptr, dc_colsum_ptr,
    dm_ptr, dm_scale_ptr, dm_colsum_ptr,
    scr_ptr, stride_scr,
    a_ptr, stride_a, off_t, off_v,
    s_ptr, z_ptr, hc_ptr, hm_ptr, rmac_ptr,
    BT: tl.constexpr, BTT: tl.constexpr, N1P: tl.constexpr, BB: tl.constexpr, BJ: tl.constexpr,
    BA: tl.constexpr, BK: tl.constexpr, BO: tl.constexpr, BJO: tl.constexpr,
    RSP: tl.constexpr, RCP: tl.constexpr,
    ABITS: tl.constexpr, AUXBITS: tl.constexpr, SYM: tl.constexpr, MAC_ROWS: tl.constexpr,
    HAS_MASK: tl.constexpr, HAS_TEXT: tl.constexpr, HAS_VISION: tl.constexpr, HAS_CWS: tl.constexpr,
    HAS_MAC: tl.constexpr, STORE_MAC: tl.constexpr, PREC: tl.constexpr,
):
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    n_blocks = tl.cdiv(T, BT)
    clip_m = tl.load(clip_ptr + 0)
    USE_DOT: tl.constexpr = BT >= 16
    for tb in range(pid, n_blocks, nprog):
        tl.debug_barrier()  # the scratch rows are reused: the previous block must be fully read
        t0 = tb * BT
        rt = t0 + tl.arange(0, BT)
        tv = rt < T
        rt64 = rt.to(tl.int64)
        sr = pid * BT + tl.arange(0, BT)  # this program's scratch rows
        sr64 = sr.to(tl.int64)

        # ---- 1. main set: gather, smooth, Kronecker transform -> scratch[:, :M], row stats ----
        hi, lo = init_stats(BT, SYM)
        for tt in range(0, BT, BTT):
            r = tl.arange(0, BTT * N1P)  # rows (token, i) of Z = R P2
            tr = t0 + tt + r // N1P
            ir = r % N1P
            rvalid = (tr < T) & (ir < n1)
            c = tl.arange(0, BTT * BB)  # columns (token, b) of P1^T Z
            tc = t0 + tt + c // BB
            sc = pid * BT + tt + c // BB
            i_all = tl.arange(0, N1P)
            sub_hi, sub_lo = init_stats(BTT, SYM)
            for b0 in range(0, n2, BB):
                bcol = b0 + tl.arange(0, BB)
                bvalid = bcol < n2
                z = tl.zeros([BTT * N1P, BB], tl.float32)
                for j0 in range(0, n2, BJ):
                    j = j0 + tl.arange(0, BJ)
                    jvalid = j < n2
                    ch = ir[:, None] * n2 + j[None, :]
                    m2 = rvalid[:, None] & jvalid[None, :]
                    idx = tl.load(idx_m_ptr + ch, mask=m2, other=0)
                    sm = tl.load(smooth_ptr + ch, mask=m2, other=0.0)
                    xv = tl.load(x_ptr + tr.to(tl.int64)[:, None] * stride_x + idx, mask=m2, other=0.0)
                    p2 = tl.load(p2_ptr + j[:, None] * n2 + bcol[None, :], mask=jvalid[:, None] & bvalid[None, :], other=0.0)
                    z = tl.dot(xv.to(tl.float32) * sm, p2, z, input_precision=PREC)
                zt = tl.reshape(tl.permute(tl.reshape(z, (BTT, N1P, BB)), (1, 0, 2)), (N1P, BTT * BB))
                bc = b0 + c % BB
                cvalid = (tc < T) & (bc < n2)
                for a0 in range(0, N1P, BA):
                    a = a0 + tl.arange(0, BA)
                    avalid = a < n1
                    p1t = tl.load(p1_ptr + i_all[None, :] * n1 + a[:, None],
                                  mask=avalid[:, None] & (i_all < n1)[None, :], other=0.0)  # P1[i, a] as [a, i]
                    xp = tl.dot(p1t, zt, input_precision=PREC)  # [BA, (token, b)]
                    valid = avalid[:, None] & cvalid[None, :]
                    tl.store(scr_ptr + sc.to(tl.int64)[None, :] * stride_scr + a[:, None] * n2 + bc[None, :], xp, mask=valid)
                    if SYM:
                        v3 = tl.reshape(tl.where(valid, tl.abs(xp), 0.0), (BA, BTT, BB))
                        sub_hi = tl.maximum(sub_hi, tl.max(tl.max(v3, axis=2), axis=0))
                    else:
                        v3 = tl.reshape(tl.where(valid, xp, float("-inf")), (BA, BTT, BB))
                        sub_hi = tl.maximum(sub_hi, tl.max(tl.max(v3, axis=2), axis=0))
                        w3 = tl.reshape(tl.where(valid, xp, float("inf")), (BA, BTT, BB))
                        sub_lo = tl.minimum(sub_lo, tl.min(tl.min(w3, axis=2), axis=0))
            # scatter the BTT sub-block stats into the BT-row vectors
            onehot = tl.arange(0, BT)[:, None] == (tt + tl.arange(0, BTT))[None, :]
            if SYM:
                hi = tl.maximum(hi, tl.max(tl.where(onehot, sub_hi[None, :], 0.0), axis=1))
            else:
                hi = tl.maximum(hi, tl.max(tl.where(onehot, sub_hi[None, :], float("-inf")), axis=1))
                lo = tl.minimum(lo, tl.min(tl.where(onehot, sub_lo[None, :], float("inf")), axis=1))
        tl.debug_barrier()  # scratch written above by other threads

        # ---- 2. main codes, CWS down product, residual stats ----
        s_m, z_m = qgrid(hi, lo, clip_m, ABITS, SYM)
        if SYM:
            ze_m = tl.zeros([BT], tl.int32)
        else:
            ze_m = (z_m - (1 << (ABITS - 1))).to(tl.int32)
        tl.store(s_ptr + rt * 4 + 0, s_m, mask=tv)
        tl.store(z_ptr + rt * 4 + 0, ze_m, mask=tv)
        acc_c = tl.zeros([BT, RSP], tl.int32)
        rhi, rlo = init_stats(BT, SYM)
        for k0 in range(0, M, BK):
            k = k0 + tl.arange(0, BK)
            kv = k < M
            m2 = tv[:, None] & kv[None, :]
            xp = tl.load(scr_ptr + sr64[:, None] * stride_scr + k[None, :], mask=m2, other=0.0)
            qs, qc = qcodes(xp, s_m[:, None], z_m[:, None], ABITS, SYM)
            qs = tl.where(m2, qs, 0.0).to(tl.int8)
            tl.store(a_ptr + rt64[:, None] * stride_a + k[None, :], qs, mask=m2)
            if HAS_CWS:
                d = tl.load(dc_ptr + k[:, None] * RSP + tl.arange(0, RSP)[None, :], mask=kv[:, None], other=0)
                acc_c = small_mm(qs, d, acc_c, USE_DOT, PREC)
            if HAS_MAC:
                res = xp - qc * s_m[:, None]
                h, l = row_stats(res, m2, SYM)
                rhi, rlo = merge_stats(rhi, rlo, h, l, SYM)
        if HAS_CWS:
            rr = tl.arange(0, RSP)
            dsc = tl.load(dc_scale_ptr + rr)
            dcs = tl.load(dc_colsum_ptr + rr)
            hcw = (acc_c - ze_m[:, None] * dcs[None, :]).to(tl.float32) * s_m[:, None] * dsc[None, :]
            tl.store(hc_ptr + rt64[:, None] * RSP + rr[None, :], hcw, mask=tv[:, None])

        # ---- 3. MAC residual codes and down product, on the selected rows only ----
        if HAS_MAC:
            clip_r = tl.load(clip_ptr + 3)
            s_r, z_r = qgrid(rhi, rlo, clip_r, AUXBITS, SYM)
            if SYM:
                ze_r = tl.zeros([BT], tl.int32)
            else:
                ze_r = (z_r - (1 << (AUXBITS - 1))).to(tl.int32)
            tl.store(s_ptr + rt * 4 + 3, s_r, mask=tv)
            tl.store(z_ptr + rt * 4 + 3, ze_r, mask=tv)
            acc_m = tl.zeros([BT, RCP], tl.int32)
            for k0 in range(0, M, BK):
                k = k0 + tl.arange(0, BK)
                kv = k < M
                m2 = tv[:, None] & kv[None, :]
                xp = tl.load(scr_ptr + sr64[:, None] * stride_scr + k[None, :], mask=m2, other=0.0)
                qs, qc = qcodes(xp, s_m[:, None], z_m[:, None], ABITS, SYM)
                res = xp - qc * s_m[:, None]
                rs, rc = qcodes(res, s_r[:, None], z_r[:, None], AUXBITS, SYM)
                rs = tl.where(m2, rs, 0.0).to(tl.int8)
                if STORE_MAC:
                    tl.store(rmac_ptr + rt64[:, None] * M + k[None, :], rs, mask=m2)
                d = tl.load(dm_ptr + k[:, None] * RCP + tl.arange(0, RCP)[None, :], mask=kv[:, None], other=0)
                acc_m = small_mm(rs, d, acc_m, USE_DOT, PREC)
            if HAS_MASK:
                is_text = tl.load(mask_ptr + rt, mask=tv, other=0) != 0
            else:
                is_text = tv  # no mask: every row is text
            if MAC_ROWS == 0:
                sel = is_text
            elif MAC_ROWS == 1:
                sel = ~is_text
            else:
                sel = tv | ~tv
            rr = tl.arange(0, RCP)
            dsc = tl.load(dm_scale_ptr + rr)
            dcs = tl.load(dm_colsum_ptr + rr)
            hmc = (acc_m - ze_r[:, None] * dcs[None, :]).to(tl.float32) * s_r[:, None] * dsc[None, :]
            hmc = tl.where(sel[:, None], hmc, 0.0)
            tl.store(hm_ptr + rt64[:, None] * RCP + rr[None, :], hmc, mask=tv[:, None])

        # ---- 4. outlier sets ----
        if HAS_TEXT:
            _outlier_set(x_ptr, stride_x, rt, tv, sr, idx_t_ptr, pt_ptr, NT, scr_ptr, stride_scr, M, a_ptr, stride_a,
                         off_t, s_ptr, z_ptr, 1, tl.load(clip_ptr + 1), BT, BO, BJO, AUXBITS, SYM, PREC)
        if HAS_VISION:
            _outlier_set(x_ptr, stride_x, rt, tv, sr, idx_v_ptr, pv_ptr, NV, scr_ptr, stride_scr, M + NT, a_ptr,
                         stride_a, off_v, s_ptr, z_ptr, 2, tl.load(clip_ptr + 2), BT, BO, BJO, AUXBITS, SYM, PREC)


@dataclass
class QuantizedActivations:
    """Kernel (a)'s outputs, the inputs of kernel (b)."""

    codes: torch.Tensor  # int8 [T, codes_width]: main at 0, text at off_text, vision at off_vision
    scale: torch.Tensor  # f32 [T, 4]: main, text, vision, mac
    zero: torch.Tensor  # int32 [T, 4], code-domain zero point minus 2^(b-1) (0 when symmetric)
    h_cws: torch.Tensor | None  # f32 [T, RP_s]
    h_mac: torch.Tensor | None  # f32 [T, RP_c], zero on rows MAC does not target
    mac_codes: torch.Tensor | None = None  # int8 [T, main] residual codes (debug only)


def _align16(n: int) -> int:
    return -(-n // 16) * 16


def code_offsets(kl: KernelLayer) -> tuple[int, int, int]:
    """Column offsets of the text and vision codes and the row width (16-byte aligned)."""
    off_t = _align16(kl.main)
    off_v = off_t + _align16(kl.text)
    return off_t, off_v, off_v + _align16(kl.vision)


# register budget of the Kronecker tiles: Z = [BTT * N1P, BB] <= TILE["z"] elements; the gathered
# input tile is [BTT * N1P, BJ] (three of them live: indices, smoothing, values)
TILE = {"z": 4096, "bb": 16, "bj": 16, "ba": 16}  # spill-free at 7B shapes on sm_90 (AOT check)


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
    n1p = max(16, next_pow2(kl.n1))
    bb = 16 if kl.n2 <= 16 else TILE["bb"]
    btt = max(1, min(block_t, TILE["z"] // (n1p * bb)))
    rsp = kl.cws_rank_padded or 16
    rcp = kl.mac_rank_padded or 16
    bk = 64 if block_t >= 16 else max(32, min(64, 2048 // (block_t * max(rsp, rcp))))  # broadcast down product
    off_t, off_v, _ = code_offsets(kl)
    dummy_f = kl.main_smooth
    dummy_i = kl.idx_main
    dummy_q = out.codes
    mask = text_mask.view(torch.uint8) if text_mask is not None else dummy_q
    args = dict(
        x_ptr=x, stride_x=x.stride(0), T=T, mask_ptr=mask,
        idx_m_ptr=kl.idx_main, smooth_ptr=kl.main_smooth, p1_ptr=kl.main_p1, p2_ptr=kl.main_p2,
        n1=kl.n1, n2=kl.n2, M=kl.main,
        idx_t_ptr=kl.idx_text if kl.text else dummy_i, pt_ptr=kl.text_p if kl.text else dummy_f, NT=kl.text,
        idx_v_ptr=kl.idx_vision if kl.vision else dummy_i, pv_ptr=kl.vision_p if kl.vision else dummy_f,
        NV=kl.vision,
        clip_ptr=kl.act_clip,
        dc_ptr=kl.cws_down if kl.cws_rank else dummy_q,
        dc_scale_ptr=kl.cws_down_scale if kl.cws_rank else dummy_f,
        dc_colsum_ptr=kl.cws_down_colsum if kl.cws_rank else dummy_i,
        dm_ptr=kl.mac_down if kl.mac_rank else dummy_q,
        dm_scale_ptr=kl.mac_down_scale if kl.mac_rank else dummy_f,
        dm_colsum_ptr=kl.mac_down_colsum if kl.mac_rank else dummy_i,
        scr_ptr=scratch, stride_scr=scratch.stride(0),
        a_ptr=out.codes, stride_a=out.codes.stride(0), off_t=off_t, off_v=off_v,
        s_ptr=out.scale, z_ptr=out.zero,
        hc_ptr=out.h_cws if out.h_cws is not None else dummy_f,
        hm_ptr=out.h_mac if out.h_mac is not None else dummy_f,
        rmac_ptr=out.mac_codes if out.mac_codes is not None else dummy_q,
    )
    constexprs = dict(
        BT=block_t, BTT=btt, N1P=n1p, BB=bb, BJ=TILE["bj"] if kl.n2 > 16 else 16, BA=min(n1p, TILE["ba"]), BK=bk,
        BO=64 if kl.text > 32 or kl.vision > 32 else 32, BJO=16, RSP=rsp, RCP=rcp,
        ABITS=kl.act_bits, AUXBITS=kl.aux_act_bits, SYM=kl.act_symmetric,
        MAC_ROWS=("text", "vision", "all").index(kl.mac_rows),
        HAS_MASK=text_mask is not None, HAS_TEXT=kl.text > 0, HAS_VISION=kl.vision > 0,
        HAS_CWS=kl.cws_rank > 0, HAS_MAC=kl.mac_rank > 0, STORE_MAC=out.mac_codes is not None,
        PREC=kl.precision,
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
    # float32 scratch for the transformed rows: BT rows per program, reused across token blocks
    scratch = torch.empty(grid * block_t, kl.in_features, dtype=torch.float32, device=x.device)
    plan_quantize_input(x, text_mask, kl, out, scratch, block_t, n_programs).run()
    return out
