"""The W4A16 decode linear (reference: reference.w4a16.splitq_linear_w4a16), 1-16 rows.

SPLITQ_DECODE_MODE=w4a16 (decode_mode.py) runs a step of <= 16 rows as a weight-only product:
the activations are transformed (smoothing, Kronecker P1 (x) P2, the outlier sets' dense
transforms) but not quantized, and the packed weight codes are dequantized in registers. Two
launches:

1. D1 of the W4A4 decode path unchanged (quantize_decode.plan_transform_decode): the transformed
   rows, float32, to a scratch [T, in_features] (main | text | vision columns). Its per-row
   statistics go to a sink nobody reads (no quantizer needs them here).
2. `_w4a16_kernel`: per output tile of BLOCK_N columns and share of the K range (split-K), the
   float32 rows times the codes of each word block (gemm.unpack_word_block, the same unpacking as
   the int8 GEMM, converted to float32: codes are small integers, exact), scaled per output by
   each range's weight scale (main at weight_bits, text and vision at aux_weight_bits). The
   split-K partial tiles go to a float32 workspace [SPLIT_K, 16, N] with plain stores; the last
   program of a tile (an arrival counter) sums them in split order (deterministic: no float
   atomics) and runs the GEMM's epilogue (gemm._epilogue: CWS up product, bias, output cast;
   no MAC: it is off in this form).
   With CWS, the down product h = X'_m deq(D_s)^T runs in the same grid (DOWN_IN_GRID, the
   pattern of the W4A4 GEMM's MAC_IN_GRID): the first cdiv(main, BLOCK_K_DOWN) tickets each
   multiply 64 main channels and store a partial [16, RP]; the last of them sums the partials in
   order, scales by the per-rank down scale, stores h and announces it; a GEMM program waits for
   h only before its epilogue, and took its ticket after every down program started, so the wait
   cannot deadlock. With SPLITQ_DECODE_IN_GRID_WAITS=0 the down product is a launch of its own
   (three launches, same outputs).
Fixed grids from the shapes, no host synchronisation, no data-dependent allocation: CUDA-graph
capturable. Workspaces are shared per device (layers run one after another on one stream) and
left at zero after every call.

Numerics: float32 accumulation. The weight product runs at `weight_precision(kl)`: exact float32
products ("ieee", the CPU and the tests) or one-pass tf32 on a GPU (the transformed activation
rounded to a 10-bit mantissa, ~5e-4 relative, against the 4-bit weights' ~1e-1); the transforms,
the CWS products and the epilogue at the layer's precision (tf32x3 on a GPU: float32-accurate).
The reference sums in another order, so the tests compare within a float32 tolerance
(splitq_kernels.testing.check_outputs); on a GPU the tf32 rounding is the larger term.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from ..layout import WORD_SUB, KernelLayer, codes_per_word, scratch_dtype, word_bytes
from ..reference.shard import KShard
from .common import fdot
from .gemm import _epilogue, _sm_count, _split_range, unpack_word_block, word_blocks
from .launch import Launch
from .quantize_decode import (
    DECODE_ROWS,
    IN_GRID_WAITS,
    checked_decode_input,
    plan_transform_decode,
    reset_when_all_past,
    wait_until,
)

BLOCK_K_DOWN = 64  # main channels per CWS-down program


@triton.jit
def _segment_f32(
    acc,
    # float32 transformed rows (D1's scratch); this K range's columns start at a_col
    a_ptr, stride_a, a_col, rows64, row_valid,
    # packed weight words of the range (layout.pack_words)
    words_ptr, N, K, cols, col_valid,
    # word blocks [kb_lo, kb_hi) of the range
    kb_lo, kb_hi,
    BITS: tl.constexpr, CODES_PER_WORD: tl.constexpr, WORD_BYTES: tl.constexpr, WORD_SUB: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
):
    """acc += X'[:, a_col + k] @ codes[k, cols] over word blocks [kb_lo, kb_hi) of one K range (float32)."""
    for kb in range(kb_lo, kb_hi):
        b = unpack_word_block(words_ptr, kb, N, cols, col_valid, BITS, CODES_PER_WORD, WORD_BYTES, WORD_SUB)
        k = kb * (CODES_PER_WORD * WORD_SUB) + tl.arange(0, CODES_PER_WORD * WORD_SUB)
        # .cg: the scratch was written by the previous launch (L2 is coherent, L1 need not be)
        a = tl.load(a_ptr + rows64[:, None] * stride_a + a_col + k[None, :],
                    mask=row_valid[:, None] & (k < K)[None, :], other=0.0, cache_modifier=".cg").to(tl.float32)
        acc = fdot(a, b.to(tl.float32), acc, INPUT_PRECISION)
    return acc


@triton.jit
def _weight_scale(wscale_ptr, cols, col_valid):
    return tl.load(wscale_ptr + cols, mask=col_valid, other=0.0)[None, :]


@triton.jit
def _partial_tile(
    pid_k, rows64, row_valid, cols, col_valid,
    scratch_ptr, stride_scratch, main_col, text_col, vision_col,
    main_words_ptr, main_wscale_ptr, text_words_ptr, text_wscale_ptr, vision_words_ptr, vision_wscale_ptr,
    N, k_main, k_text, k_vision,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, SPLIT_K: tl.constexpr, WORD_SUB: tl.constexpr,
    WEIGHT_BITS: tl.constexpr, CODES_PER_WORD_MAIN: tl.constexpr, WORD_BYTES_MAIN: tl.constexpr,
    AUX_WEIGHT_BITS: tl.constexpr, CODES_PER_WORD_AUX: tl.constexpr, WORD_BYTES_AUX: tl.constexpr,
    HAS_TEXT: tl.constexpr, HAS_VISION: tl.constexpr, INPUT_PRECISION: tl.constexpr,
):
    """Share pid_k of SPLIT_K of the word blocks of main | text | vision: sum over the share of
    X' deq(W) for the tile's columns (each range times its own per-output weight scale)."""
    nb_main = tl.cdiv(k_main, CODES_PER_WORD_MAIN * WORD_SUB)
    nb_text = tl.cdiv(k_text, CODES_PER_WORD_AUX * WORD_SUB)
    nb_vision = tl.cdiv(k_vision, CODES_PER_WORD_AUX * WORD_SUB)
    per = tl.cdiv(nb_main + nb_text + nb_vision, SPLIT_K)
    lo = pid_k * per
    hi = tl.minimum(lo + per, nb_main + nb_text + nb_vision)
    zero = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    l0, h0 = _split_range(lo, hi, 0, nb_main)
    acc = _segment_f32(zero, scratch_ptr, stride_scratch, main_col, rows64, row_valid, main_words_ptr, N, k_main, cols,
                       col_valid, l0, h0, WEIGHT_BITS, CODES_PER_WORD_MAIN, WORD_BYTES_MAIN, WORD_SUB, INPUT_PRECISION)
    y = acc * _weight_scale(main_wscale_ptr, cols, col_valid)
    if HAS_TEXT:
        l1, h1 = _split_range(lo, hi, nb_main, nb_text)
        acc = _segment_f32(zero, scratch_ptr, stride_scratch, text_col, rows64, row_valid, text_words_ptr, N, k_text,
                           cols, col_valid, l1, h1, AUX_WEIGHT_BITS, CODES_PER_WORD_AUX, WORD_BYTES_AUX, WORD_SUB,
                           INPUT_PRECISION)
        y += acc * _weight_scale(text_wscale_ptr, cols, col_valid)
    if HAS_VISION:
        l2, h2 = _split_range(lo, hi, nb_main + nb_text, nb_vision)
        acc = _segment_f32(zero, scratch_ptr, stride_scratch, vision_col, rows64, row_valid, vision_words_ptr,
                           N, k_vision, cols, col_valid, l2, h2, AUX_WEIGHT_BITS, CODES_PER_WORD_AUX,
                           WORD_BYTES_AUX, WORD_SUB, INPUT_PRECISION)
        y += acc * _weight_scale(vision_wscale_ptr, cols, col_valid)
    return y


@triton.jit
def _down_block(
    pid, n_down, scratch_ptr, stride_scratch, cws_down_ptr, cws_down_scale_ptr, part_ptr, h_ptr, count_ptr,
    T, k_main,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, RANK_PADDED: tl.constexpr, INPUT_PRECISION: tl.constexpr,
):
    """CWS-down program pid of n_down: X'[:, 64 main channels] @ codes(D_s)^T to partial [pid, 16, RP];
    the last to arrive sums the partials in order and stores h = sum * down scale [16, RP].
    Returns whether this program finished h (it then announces it, if anyone waits). The rank is
    walked in blocks of at most 64 (a [64, 256] down tile in registers spills at the 72B shapes)."""
    BLOCK_R: tl.constexpr = 64 if RANK_PADDED > 64 else RANK_PADDED
    rows = tl.arange(0, BLOCK_M)
    row_valid = rows < T
    k = pid * BLOCK_K + tl.arange(0, BLOCK_K)
    k_valid = k < k_main
    a = tl.load(scratch_ptr + rows.to(tl.int64)[:, None] * stride_scratch + k[None, :],
                mask=row_valid[:, None] & k_valid[None, :], other=0.0, cache_modifier=".cg").to(tl.float32)
    for r0 in range(0, RANK_PADDED, BLOCK_R):
        r = r0 + tl.arange(0, BLOCK_R)
        d = tl.load(cws_down_ptr + k.to(tl.int64)[:, None] * RANK_PADDED + r[None, :], mask=k_valid[:, None], other=0)
        part = fdot(a, d.to(tl.float32), None, INPUT_PRECISION)
        tl.store(part_ptr + pid * (BLOCK_M * RANK_PADDED) + rows[:, None] * RANK_PADDED + r[None, :], part)
    tl.debug_barrier()  # every thread's partial is stored before the arrival is counted
    arrived = tl.atomic_add(count_ptr, 1)
    last = arrived == n_down - 1
    if last:
        tl.atomic_xchg(count_ptr, 0)
        for r0 in range(0, RANK_PADDED, BLOCK_R):
            r = r0 + tl.arange(0, BLOCK_R)
            tile = rows[:, None] * RANK_PADDED + r[None, :]
            h = tl.zeros([BLOCK_M, BLOCK_R], tl.float32)
            for p in range(0, n_down):  # in program order: the same sum whatever order they ran in
                h += tl.load(part_ptr + p * (BLOCK_M * RANK_PADDED) + tile, cache_modifier=".cg")
            tl.store(h_ptr + tile, h * tl.load(cws_down_scale_ptr + r)[None, :])
        tl.debug_barrier()  # every thread's h is stored before it is announced
    return last


@triton.jit
def _w4a16_down_kernel(
    scratch_ptr, stride_scratch, cws_down_ptr, cws_down_scale_ptr, part_ptr, h_ptr, count_ptr, T, k_main,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, RANK_PADDED: tl.constexpr, INPUT_PRECISION: tl.constexpr,
):
    """The CWS down product as a launch of its own (SPLITQ_DECODE_IN_GRID_WAITS=0)."""
    _down_block(tl.program_id(0), tl.num_programs(0), scratch_ptr, stride_scratch, cws_down_ptr, cws_down_scale_ptr,
                part_ptr, h_ptr, count_ptr, T, k_main, BLOCK_M, BLOCK_K, RANK_PADDED, INPUT_PRECISION)


@triton.jit
def _w4a16_kernel(
    # D1's float32 scratch [T, main | text | vision]; where this GEMM's main, text and vision K
    # ranges start in it (a tensor-parallel rank's main block starts at its first column)
    scratch_ptr, stride_scratch, main_col, text_col, vision_col,
    # weights of the three K ranges: packed words and per-output scales (text, vision: None when empty)
    main_words_ptr, main_wscale_ptr, text_words_ptr, text_wscale_ptr, vision_words_ptr, vision_wscale_ptr,
    # CWS (None when off): down codes [main, RP] and per-rank scale, up codes [RP, N] and per-output
    # scale, h [16, RP] (written by the down programs), their partials [n_down, 16, RP]; bias [N] (None without)
    cws_down_ptr, cws_down_scale_ptr, cws_up_ptr, cws_up_scale_ptr, h_ptr, down_part_ptr, bias_ptr,
    # output y [T, N]
    out_ptr, stride_out,
    # split-K float32 partial tiles [SPLIT_K, 16, N] and arrival counter per column tile (None: SPLIT_K 1);
    # grid counters [ticket, down arrivals, h ready, programs done] (zero on entry and on exit)
    part_ptr, counter_ptr, sync_ptr,
    # sizes (k_main: this GEMM's main K range; k_down: the CWS down's, the whole main set)
    T, N, k_main, k_text, k_vision, cws_rank, k_down,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, SPLIT_K: tl.constexpr, WORD_SUB: tl.constexpr,
    WEIGHT_BITS: tl.constexpr, CODES_PER_WORD_MAIN: tl.constexpr, WORD_BYTES_MAIN: tl.constexpr,
    AUX_WEIGHT_BITS: tl.constexpr, CODES_PER_WORD_AUX: tl.constexpr, WORD_BYTES_AUX: tl.constexpr,
    CWS_RANK_PADDED: tl.constexpr, BLOCK_CWS_RANK: tl.constexpr, BLOCK_K_DOWN: tl.constexpr,
    HAS_TEXT: tl.constexpr, HAS_VISION: tl.constexpr, HAS_CWS: tl.constexpr, HAS_BIAS: tl.constexpr,
    DOWN_IN_GRID: tl.constexpr, INPUT_PRECISION: tl.constexpr, WEIGHT_PRECISION: tl.constexpr,
):
    n_n = tl.cdiv(N, BLOCK_N)
    if DOWN_IN_GRID:
        # roles by ticket (module doc): the first n_down do the CWS down product, the rest the GEMM
        ticket = tl.atomic_add(sync_ptr + 0, 1)
        n_down = tl.cdiv(k_down, BLOCK_K_DOWN)
        is_gemm = ticket >= n_down
        work = tl.maximum(ticket - n_down, 0)
        if ticket < n_down:
            if _down_block(ticket, n_down, scratch_ptr, stride_scratch, cws_down_ptr, cws_down_scale_ptr,
                           down_part_ptr, h_ptr, sync_ptr + 1, T, k_down, BLOCK_M, BLOCK_K_DOWN, CWS_RANK_PADDED,
                           INPUT_PRECISION):
                tl.atomic_xchg(sync_ptr + 2, 1)
    else:
        work = tl.program_id(0)
        is_gemm = work >= 0
    if is_gemm:
        pid_n = work % n_n
        pid_k = work // n_n
        rows = tl.arange(0, BLOCK_M)
        row_valid = rows < T
        rows64 = rows.to(tl.int64)
        cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        col_valid = cols < N
        y = _partial_tile(pid_k, rows64, row_valid, cols, col_valid, scratch_ptr, stride_scratch, main_col, text_col,
                          vision_col, main_words_ptr,
                          main_wscale_ptr, text_words_ptr, text_wscale_ptr, vision_words_ptr, vision_wscale_ptr, N,
                          k_main, k_text, k_vision, BLOCK_M, BLOCK_N, SPLIT_K, WORD_SUB, WEIGHT_BITS,
                          CODES_PER_WORD_MAIN, WORD_BYTES_MAIN, AUX_WEIGHT_BITS, CODES_PER_WORD_AUX, WORD_BYTES_AUX,
                          HAS_TEXT, HAS_VISION, WEIGHT_PRECISION)
        finish = pid_k >= 0
        if SPLIT_K > 1:
            tile = rows[:, None] * N + cols[None, :]
            tile_mask = row_valid[:, None] & col_valid[None, :]  # T rows only: 1/16 of the traffic at 1 row
            tl.store(part_ptr + pid_k * (BLOCK_M * N) + tile, y, mask=tile_mask)
            tl.debug_barrier()  # every thread's partial is stored before the arrival is counted
            arrived = tl.atomic_add(counter_ptr + pid_n, 1)
            finish = arrived == SPLIT_K - 1
            if finish:  # the last program of this tile: the partials in split order
                tl.atomic_xchg(counter_ptr + pid_n, 0)
                y = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
                for s in range(0, SPLIT_K):
                    y += tl.load(part_ptr + s * (BLOCK_M * N) + tile, mask=tile_mask, other=0.0, cache_modifier=".cg")
        if finish:
            if DOWN_IN_GRID:
                wait_until(sync_ptr + 2, 1)  # h complete (the down programs)
            _epilogue(y, rows, row_valid, cols, col_valid, N, h_ptr, cws_up_ptr, cws_up_scale_ptr, cws_rank,
                      None, None, None, 0, bias_ptr, out_ptr, stride_out, CWS_RANK_PADDED, 16, BLOCK_CWS_RANK, 16,
                      HAS_CWS, False, HAS_BIAS, INPUT_PRECISION)
    if DOWN_IN_GRID:
        reset_when_all_past(sync_ptr, 3, 0, 2)


# ---------------------------------------------------------------------------------------------
# launchers
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class W4A16Config:
    block_n: int = 64
    split_k: int = 1
    num_warps: int = 4
    num_stages: int = 4


def default_w4a16_config(kl: KernelLayer, device: torch.device) -> W4A16Config:
    """64-column tiles, split over K until about 4 programs per SM stream the weights (like the
    int8 GEMM's decode configuration; tune on the GPU with benchmarks/bench_kernels.py)."""
    tiles = -(-kl.out_features // 64)
    return W4A16Config(block_n=64, split_k=max(1, min(word_blocks(kl), (4 * _sm_count(device)) // tiles)))


class _Workspace:
    """Per device: the D1 statistics sink [16, 8], split-K partials [SPLIT_K, 16, N] and counters,
    CWS-down partials [n_down, 16, RP], grid counters [4]. Grows on demand: run every layer once
    (vLLM's warm-up does) before capturing CUDA graphs."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.stats_sink = torch.zeros(DECODE_ROWS, 8, dtype=torch.float32, device=device)
        self.sync = torch.zeros(4, dtype=torch.int32, device=device)
        self.down_count = torch.zeros(1, dtype=torch.int32, device=device)
        self.part = torch.zeros(0, dtype=torch.float32, device=device)
        self.counters = torch.zeros(0, dtype=torch.int32, device=device)
        self.down_part = torch.zeros(0, dtype=torch.float32, device=device)

    def ensure(self, part: int, counters: int, down_part: int) -> None:
        if self.part.numel() < part:
            self.part = torch.zeros(part, dtype=torch.float32, device=self.device)
        if self.counters.numel() < counters:
            self.counters = torch.zeros(counters, dtype=torch.int32, device=self.device)
        if self.down_part.numel() < down_part:
            self.down_part = torch.zeros(down_part, dtype=torch.float32, device=self.device)


_WORKSPACES: dict[tuple[str, int | None], _Workspace] = {}


def _workspace(device: torch.device) -> _Workspace:
    key = (device.type, device.index)
    if key not in _WORKSPACES:
        _WORKSPACES[key] = _Workspace(device)
    return _WORKSPACES[key]


def weight_precision(kl: KernelLayer) -> str:
    """tl.dot input precision of the weight product X' deq(W): the layer's when it is "ieee" (exact
    float32 products: the CPU, the tests), else one-pass "tf32" (X' rounded to tf32, 10-bit mantissa;
    the codes are exact): tf32x3 triples the tensor-core work, and at 16 rows (one row tile for 1 row
    too) that would make the 7B gate_up compute-bound on an H100 (benchmarks/cost_model.py, w4a16).
    "bf16" under precision bf16: X' is bfloat16 already (the scratch), so the product is exact."""
    return kl.precision if kl.precision in ("ieee", "bf16") else "tf32"


def can_implement_w4a16(kl: KernelLayer, rows: int) -> tuple[bool, str]:
    """Whether the W4A16 decode kernels take `rows` rows of this layer ((ok, reason), no exception)."""
    if not 1 <= rows <= DECODE_ROWS:
        return False, f"{rows} rows: the W4A16 decode kernels take 1..{DECODE_ROWS} rows"
    return True, ""


def plan_linear_w4a16(
    x: torch.Tensor, kl: KernelLayer, out: torch.Tensor, scratch: torch.Tensor, h: torch.Tensor | None,
    config: W4A16Config | None = None, in_grid: bool | None = None, shard: KShard | None = None,
    gemm: KernelLayer | None = None,
) -> list[Launch]:
    """D1, [the CWS down product unless in the GEMM's grid,] the W4A16 GEMM (module doc).

    With `shard` (a row-parallel rank, splitq_kernels.shard): D1 and the CWS down run on `kl`, the
    rank's kernel layer (the whole input side); the GEMM on `gemm` = shard.gemm_shard_layer(kl,
    shard): the block's main columns of the scratch, and on rank 0 only the outlier ranges, CWS
    and bias."""
    in_grid = IN_GRID_WAITS if in_grid is None else in_grid
    gemm = kl if gemm is None else gemm
    T, N = out.shape
    cfg = config or default_w4a16_config(gemm, x.device)
    ws = _workspace(x.device)
    has_cws = gemm.cws_rank > 0
    rp = gemm.cws_rank_padded or 16
    n_tiles = triton.cdiv(N, cfg.block_n)
    n_down = triton.cdiv(kl.main, BLOCK_K_DOWN) if has_cws else 0
    ws.ensure(cfg.split_k * DECODE_ROWS * N if cfg.split_k > 1 else 0, n_tiles, n_down * DECODE_ROWS * rp)
    launches = [plan_transform_decode(x, kl, scratch, ws.stats_sink)]
    prec = kl.precision
    down_in_grid = has_cws and in_grid
    if has_cws and not in_grid:
        launches.append(Launch(_w4a16_down_kernel, (n_down,), dict(
            scratch_ptr=scratch, stride_scratch=scratch.stride(0), cws_down_ptr=gemm.cws_down,
            cws_down_scale_ptr=gemm.cws_down_scale, part_ptr=ws.down_part, h_ptr=h, count_ptr=ws.down_count,
            T=T, k_main=kl.main,
        ), dict(BLOCK_M=DECODE_ROWS, BLOCK_K=BLOCK_K_DOWN, RANK_PADDED=rp, INPUT_PRECISION=prec),
            dict(num_warps=4, num_stages=1)))
    args = dict(
        scratch_ptr=scratch, stride_scratch=scratch.stride(0),
        main_col=0 if shard is None else shard.start, text_col=kl.main, vision_col=kl.main + kl.text,
        main_words_ptr=gemm.main_words, main_wscale_ptr=gemm.main_wscale,
        text_words_ptr=gemm.text_words if gemm.text else None, text_wscale_ptr=gemm.text_wscale if gemm.text else None,
        vision_words_ptr=gemm.vision_words if gemm.vision else None,
        vision_wscale_ptr=gemm.vision_wscale if gemm.vision else None,
        cws_down_ptr=gemm.cws_down if has_cws else None, cws_down_scale_ptr=gemm.cws_down_scale if has_cws else None,
        cws_up_ptr=gemm.cws_up if has_cws else None, cws_up_scale_ptr=gemm.cws_up_scale if has_cws else None,
        h_ptr=h if has_cws else None, down_part_ptr=ws.down_part if down_in_grid else None, bias_ptr=gemm.bias,
        out_ptr=out, stride_out=out.stride(0),
        part_ptr=ws.part if cfg.split_k > 1 else None, counter_ptr=ws.counters if cfg.split_k > 1 else None,
        sync_ptr=ws.sync if down_in_grid else None,
        T=T, N=N, k_main=gemm.main, k_text=gemm.text, k_vision=gemm.vision, cws_rank=gemm.cws_rank, k_down=kl.main,
    )
    constexprs = dict(
        BLOCK_M=DECODE_ROWS, BLOCK_N=cfg.block_n, SPLIT_K=cfg.split_k, WORD_SUB=WORD_SUB,
        WEIGHT_BITS=gemm.weight_bits, CODES_PER_WORD_MAIN=codes_per_word(gemm.weight_bits),
        WORD_BYTES_MAIN=word_bytes(gemm.weight_bits),
        AUX_WEIGHT_BITS=gemm.aux_weight_bits, CODES_PER_WORD_AUX=codes_per_word(gemm.aux_weight_bits),
        WORD_BYTES_AUX=word_bytes(gemm.aux_weight_bits),
        CWS_RANK_PADDED=rp, BLOCK_CWS_RANK=min(32, rp), BLOCK_K_DOWN=BLOCK_K_DOWN,
        HAS_TEXT=gemm.text > 0, HAS_VISION=gemm.vision > 0, HAS_CWS=has_cws, HAS_BIAS=gemm.bias is not None,
        DOWN_IN_GRID=down_in_grid, INPUT_PRECISION=prec, WEIGHT_PRECISION=weight_precision(kl),
    )
    grid = (n_tiles * cfg.split_k + (n_down if down_in_grid else 0),)
    launches.append(Launch(_w4a16_kernel, grid, args, constexprs,
                           dict(num_warps=cfg.num_warps, num_stages=cfg.num_stages)))
    return launches


def linear_w4a16_triton(x: torch.Tensor, kl: KernelLayer, config: W4A16Config | None = None,
                        in_grid: bool | None = None, shard: KShard | None = None,
                        gemm: KernelLayer | None = None) -> torch.Tensor:
    """y [T, out_features] in x's dtype for x [T <= 16, in_features] (bf16/fp16/fp32): the W4A16
    form (reference.splitq_linear_w4a16) in two launches (three with in_grid=False and CWS).
    With `shard` and `gemm` (plan_linear_w4a16): one row-parallel rank's partial output."""
    x = checked_decode_input(x, kl, can_implement_w4a16)
    T = x.shape[0]
    scratch = torch.empty(T, kl.in_features, dtype=scratch_dtype(kl), device=x.device)
    h = torch.empty(DECODE_ROWS, kl.cws_rank_padded, dtype=torch.float32, device=x.device) if kl.cws_rank else None
    y = torch.empty(T, kl.out_features, dtype=x.dtype, device=x.device)
    for launch in plan_linear_w4a16(x, kl, y, scratch, h, config, in_grid, shard, gemm):
        launch.run()
    return y
