"""The layout the Triton kernels read, produced once per layer from the reference's quantized
layer (`SplitQLinear` + `SplitQScheme`): `prepare_kernel_layer`.

What changes from the checkpoint's interchange form (docs/format.md):
- Weights of the GEMM (main, text, vision) are packed into little-endian words along K, in blocks
  of `WORD_SUB` word rows. A word holds G codes (G = 16 for 2 bits, 8 for 3 and 4 bits, 4 for 5..8
  bits: always a power of two) in G * bits bits, stored in `word_bytes(bits)` bytes (3 bytes for
  3-bit, so 3-bit weights take exactly 3/8 byte per code). Word (kb * WORD_SUB + kk, n) holds the
  codes k = kb * G * WORD_SUB + g * WORD_SUB + kk (g = 0..G-1) of output n, code g in bits
  [g * bits, (g + 1) * bits), offset-binary (u = code + 2^(bits-1)). The kernel shifts a
  [WORD_SUB, BLOCK_N] word tile by g * bits for all g at once and reshapes the result to the
  [G * WORD_SUB, BLOCK_N] int8 tile of K rows kb * G * WORD_SUB + (0 .. G * WORD_SUB - 1): one
  tl.dot per word block, no interleaving. Storage: uint8 [blocks * WORD_SUB, out * word_bytes].
  (G is CODES_PER_WORD_MAIN / CODES_PER_WORD_AUX in the GEMM kernel.)
- Low-rank factors stay int8 codes, transposed so the kernels read contiguous rank vectors:
  `*_down` as [main, RP] (RP = the rank padded to a power of two >= 16 with zero codes), `*_up`
  as [RP, out]. Column sums of every weight (for the zero-point term of asymmetric activations:
  sum_k (q - z) w = sum_k q w - z * sum_k w) are precomputed.
- Everything is on the target device, contiguous, float32/int32/int8; the clipping factors live
  in one float32 tensor so no host sync is needed to read them.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch

from .reference.layer import SplitQLinear
from .reference.quantizer import QuantizedTensor
from .reference.scheme import MAC_ROWS, SplitQScheme

WORD_SUB = 8  # word rows per block: a block is G * 8 >= 32 K rows (int8 MMA needs K >= 32)
MAX_N1 = 256  # kernel (a) keeps P1 tiles of [BLOCK_P1_COLS, N1_PADDED = next_pow2(n1)] in registers
PRECISIONS = ("ieee", "tf32x3", "tf32", "bf16")  # of the float products: a tl.dot input_precision, or bf16 (common.fdot)


def codes_per_word(bits: int) -> int:
    """G: a power of two, so the kernel unpacks a word tile with one broadcast shift."""
    return 16 if bits == 2 else 8 if bits <= 4 else 4


def word_bytes(bits: int) -> int:
    return -(-codes_per_word(bits) * bits // 8)


def scratch_dtype(kl: "KernelLayer") -> torch.dtype:
    """dtype of the kernels' scratch of transformed rows: bfloat16 under precision "bf16" (what
    the reference's bf16 form quantizes, and half the bytes), else float32."""
    return torch.bfloat16 if kl.precision == "bf16" else torch.float32


def next_pow2(n: int) -> int:
    return 1 if n <= 1 else 1 << (n - 1).bit_length()


def padded_rank(rank: int) -> int:
    return 0 if rank == 0 else max(16, next_pow2(rank))


def pack_words(codes: torch.Tensor, bits: int, sub: int = WORD_SUB, chunk: int = 4096) -> torch.Tensor:
    """(rows=out, K) signed codes -> uint8 [ceil(K / (G * sub)) * sub, out * word_bytes] (module doc).
    Works `chunk` outputs at a time to bound the int64 temporaries (~40 bytes per code)."""
    if not 2 <= bits <= 8:
        raise ValueError(f"bits must be in 2..8, got {bits}")
    n, k = codes.shape
    g, nbytes = codes_per_word(bits), word_bytes(bits)
    block = g * sub
    nb = max(1, -(-k // block))
    if codes.numel() and (int(codes.min()) < -(1 << (bits - 1)) or int(codes.max()) >= 1 << (bits - 1)):
        raise ValueError(f"codes out of range for {bits} bits")
    out = torch.empty(nb * sub, n * nbytes, dtype=torch.uint8, device=codes.device)
    shifts = (torch.arange(g, dtype=torch.int64, device=codes.device) * bits).reshape(1, 1, g, 1)
    byte_shifts = torch.arange(nbytes, dtype=torch.int64, device=codes.device) * 8
    for n0 in range(0, n, chunk):
        u = codes[n0 : n0 + chunk].to(torch.int64) + (1 << (bits - 1))
        u = torch.nn.functional.pad(u, (0, nb * block - k), value=1 << (bits - 1))  # pad with code 0
        c = u.shape[0]
        words = (u.reshape(c, nb, g, sub) << shifts).sum(2).reshape(c, nb * sub).transpose(0, 1)  # < 2^32
        out[:, n0 * nbytes : (n0 + c) * nbytes] = ((words.unsqueeze(-1) >> byte_shifts) & 0xFF).reshape(nb * sub, -1)
    return out


def unpack_words(words: torch.Tensor, k: int, bits: int, sub: int = WORD_SUB) -> torch.Tensor:
    """Inverse of pack_words: (out, K) int8 codes (for tests and debugging)."""
    g, nbytes = codes_per_word(bits), word_bytes(bits)
    rows = words.shape[0]
    b = words.to(torch.int64).reshape(rows, -1, nbytes)
    w = (b << (torch.arange(nbytes, dtype=torch.int64, device=b.device) * 8)).sum(-1)  # (rows, out)
    n = w.shape[1]
    w = w.transpose(0, 1).reshape(n, rows // sub, 1, sub)
    shifts = (torch.arange(g, dtype=torch.int64, device=w.device) * bits).reshape(1, 1, g, 1)
    u = (w >> shifts) & ((1 << bits) - 1)
    return (u.reshape(n, -1)[:, :k] - (1 << (bits - 1))).to(torch.int8)


@dataclass
class KernelLayer:
    """One SplitQ linear in the kernels' layout (all tensors on one device). Optional parts are
    None when the set is empty or the branch is off. See the module docstring for layouts."""

    # dims and scheme
    in_features: int
    out_features: int
    main: int
    text: int
    vision: int
    n1: int
    n2: int
    cws_rank: int
    mac_rank: int
    weight_bits: int
    act_bits: int
    aux_weight_bits: int
    aux_act_bits: int
    act_symmetric: bool
    mac_rows: str
    precision: str
    # input side (kernel a)
    idx_main: torch.Tensor  # int32 [main]
    main_smooth: torch.Tensor  # f32 [main]
    main_p1: torch.Tensor  # f32 [n1, n1]
    main_p2: torch.Tensor  # f32 [n2, n2]
    act_clip: torch.Tensor  # f32 [4]: main, text, vision, mac
    idx_text: torch.Tensor | None = None  # int32 [text]
    text_p: torch.Tensor | None = None  # f32 [text, text]
    idx_vision: torch.Tensor | None = None
    vision_p: torch.Tensor | None = None
    cws_down: torch.Tensor | None = None  # int8 [main, RP_s] (transposed codes)
    cws_down_scale: torch.Tensor | None = None  # f32 [RP_s]
    cws_down_colsum: torch.Tensor | None = None  # int32 [RP_s]
    mac_down: torch.Tensor | None = None
    mac_down_scale: torch.Tensor | None = None
    mac_down_colsum: torch.Tensor | None = None
    # output side (kernel b)
    main_words: torch.Tensor | None = None  # uint8 [word rows, out * word_bytes]
    main_wscale: torch.Tensor | None = None  # f32 [out]
    main_colsum: torch.Tensor | None = None  # int32 [out]
    text_words: torch.Tensor | None = None
    text_wscale: torch.Tensor | None = None
    text_colsum: torch.Tensor | None = None
    vision_words: torch.Tensor | None = None
    vision_wscale: torch.Tensor | None = None
    vision_colsum: torch.Tensor | None = None
    cws_up: torch.Tensor | None = None  # int8 [RP_s, out] (transposed codes)
    cws_up_scale: torch.Tensor | None = None  # f32 [out]
    mac_up: torch.Tensor | None = None
    mac_up_scale: torch.Tensor | None = None
    bias: torch.Tensor | None = None  # f32 [out]

    @property
    def device(self) -> torch.device:
        return self.idx_main.device

    @property
    def cws_rank_padded(self) -> int:
        return padded_rank(self.cws_rank)

    @property
    def mac_rank_padded(self) -> int:
        return padded_rank(self.mac_rank)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors() if t is not None)

    # The custom ops take the layer as (list of optional tensors, list of ints, precision) so that
    # torch.compile sees plain arguments; these two functions are the only place that order lives.
    def tensors(self) -> list[torch.Tensor | None]:
        return [getattr(self, name) for name in _TENSOR_FIELDS]

    @staticmethod
    def tensor_index(name: str) -> int:
        """Position of the named tensor in tensors() (e.g. to drop the bias for one call)."""
        return _TENSOR_FIELDS.index(name)

    def meta(self) -> list[int]:
        return [
            self.in_features, self.out_features, self.main, self.text, self.vision, self.n1, self.n2,
            self.cws_rank, self.mac_rank, self.weight_bits, self.act_bits, self.aux_weight_bits,
            self.aux_act_bits, int(self.act_symmetric), MAC_ROWS.index(self.mac_rows),
        ]

    @classmethod
    def from_op_args(cls, tensors: list[torch.Tensor | None], meta: list[int], precision: str) -> "KernelLayer":
        (d_in, d_out, m, t, v, n1, n2, rs, rc, wb, ab, awb, aab, sym, mac_rows) = meta
        return cls(
            in_features=d_in, out_features=d_out, main=m, text=t, vision=v, n1=n1, n2=n2,
            cws_rank=rs, mac_rank=rc, weight_bits=wb, act_bits=ab, aux_weight_bits=awb,
            aux_act_bits=aab, act_symmetric=bool(sym), mac_rows=MAC_ROWS[mac_rows], precision=precision,
            **dict(zip(_TENSOR_FIELDS, tensors)),
        )


_SCALARS = {
    "in_features", "out_features", "main", "text", "vision", "n1", "n2", "cws_rank", "mac_rank",
    "weight_bits", "act_bits", "aux_weight_bits", "aux_act_bits", "act_symmetric", "mac_rows", "precision",
}
_TENSOR_FIELDS = tuple(f.name for f in fields(KernelLayer) if f.name not in _SCALARS)


def _weight(q: QuantizedTensor, bits: int, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Packed words, per-output scale, per-output code sum of a per-output-channel weight."""
    if q.zero is not None:
        raise ValueError("format v1 weights are symmetric per output channel")
    if q.bits != bits:
        raise ValueError(f"weight has {q.bits} bits, the scheme says {bits}")
    codes = q.codes.to(device=device, dtype=torch.int32)  # pack where the kernels run (fast on a GPU)
    return (
        pack_words(codes, bits),
        q.scale.reshape(-1).to(device=device, dtype=torch.float32).contiguous(),
        codes.sum(1).to(device=device, dtype=torch.int32).contiguous(),
    )


def _down(q: QuantizedTensor, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    r, m = q.codes.shape
    rp = padded_rank(r)
    codes = q.codes.to(device)
    codes_t = torch.zeros(m, rp, dtype=torch.int8, device=device)
    codes_t[:, :r] = codes.to(torch.int8).transpose(0, 1)
    scale = torch.zeros(rp, dtype=torch.float32, device=device)
    scale[:r] = q.scale.reshape(-1).to(device=device, dtype=torch.float32)
    colsum = torch.zeros(rp, dtype=torch.int32, device=device)
    colsum[:r] = codes.to(torch.int32).sum(1)
    return codes_t, scale, colsum


def _up(q: QuantizedTensor, device) -> tuple[torch.Tensor, torch.Tensor]:
    n, r = q.codes.shape
    codes_t = torch.zeros(padded_rank(r), n, dtype=torch.int8, device=device)
    codes_t[:r] = q.codes.to(device=device, dtype=torch.int8).transpose(0, 1)
    return codes_t, q.scale.reshape(-1).to(device=device, dtype=torch.float32).contiguous()


def prepare_kernel_layer(
    layer: SplitQLinear, scheme: SplitQScheme, device: torch.device | str, precision: str = "ieee"
) -> KernelLayer:
    """Repack one quantized layer (a fused q/k/v or gate/up layer is one layer: see
    reference.concat_outputs) for the Triton kernels. Call once at load time.

    precision: tl.dot input precision of the float32 products (online transforms and the low-rank
    "up" products): "ieee" (exact float32 products, CUDA cores), "tf32x3" (float32-accurate on
    tensor cores), "tf32" (fast, about 1e-3 relative error: more codes differ from the
    reference), or "bf16" (SPLITQ_PRECISION=bf16, splitq_kernels.precision: operands rounded to
    bfloat16, float32 accumulation, transformed rows stored in bfloat16; the reference computes the
    same with precision="bf16"). The integer products are exact in every case.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    device = torch.device(device)
    n1, n2 = layer.kron_shape
    if n1 > MAX_N1:
        raise ValueError(f"Kronecker factor n1={n1} > {MAX_N1} is not supported by the kernels")
    m, t, v = layer.idx_main.numel(), layer.idx_text.numel(), layer.idx_vision.numel()
    f32 = dict(device=device, dtype=torch.float32)
    i32 = dict(device=device, dtype=torch.int32)
    clip = torch.stack([
        layer.main_act_clip.reshape(()).float(), layer.text_act_clip.reshape(()).float(),
        layer.vision_act_clip.reshape(()).float(), layer.mac_act_clip.reshape(()).float(),
    ])
    if scheme.act_bits < 2 or scheme.aux_act_bits < 2:
        raise ValueError("activation bits must be in 2..8")
    kl = KernelLayer(
        in_features=layer.in_features, out_features=layer.out_features, main=m, text=t, vision=v,
        n1=n1, n2=n2, cws_rank=layer.cws_rank, mac_rank=layer.mac_rank,
        weight_bits=scheme.weight_bits, act_bits=scheme.act_bits, aux_weight_bits=scheme.aux_weight_bits,
        aux_act_bits=scheme.aux_act_bits, act_symmetric=scheme.act_symmetric, mac_rows=scheme.mac_rows,
        precision=precision,
        idx_main=layer.idx_main.to(**i32).contiguous(),
        main_smooth=layer.main_smooth.to(**f32).contiguous(),
        main_p1=layer.main_p1.to(**f32).contiguous(),
        main_p2=layer.main_p2.to(**f32).contiguous(),
        act_clip=clip.to(**f32).contiguous(),
    )
    kl.main_words, kl.main_wscale, kl.main_colsum = _weight(layer.main_w, scheme.weight_bits, device)
    if t:
        kl.idx_text = layer.idx_text.to(**i32).contiguous()
        kl.text_p = layer.text_p.to(**f32).contiguous()
        kl.text_words, kl.text_wscale, kl.text_colsum = _weight(layer.text_w, scheme.aux_weight_bits, device)
    if v:
        kl.idx_vision = layer.idx_vision.to(**i32).contiguous()
        kl.vision_p = layer.vision_p.to(**f32).contiguous()
        kl.vision_words, kl.vision_wscale, kl.vision_colsum = _weight(
            layer.vision_w, scheme.aux_weight_bits, device
        )
    if layer.cws_down is not None:
        kl.cws_down, kl.cws_down_scale, kl.cws_down_colsum = _down(layer.cws_down, device)
        kl.cws_up, kl.cws_up_scale = _up(layer.cws_up, device)
    if layer.mac_down is not None:
        kl.mac_down, kl.mac_down_scale, kl.mac_down_colsum = _down(layer.mac_down, device)
        kl.mac_up, kl.mac_up_scale = _up(layer.mac_up, device)
    if layer.bias is not None:
        kl.bias = layer.bias.to(**f32).contiguous()
    return kl
