"""Packing of integer codes into the checkpoint's bit-stream layout (docs/format.md, "Packing").

Each row of K codes of b bits is stored as ceil(K / 8) * b bytes (uint8): the codes, offset to
unsigned (u = code + 2^(b-1) for symmetric codes), form a little-endian bit stream: code j occupies
stream bits [j*b, (j+1)*b), least significant bit first, and stream bit n is bit (n % 8) of byte
n // 8. The row is padded with u = 0 to a multiple of 8 codes, so every row starts on a byte.
For b = 4 this is the usual "low nibble first"; for b = 8, one byte per code.
The kernels repack from this layout once at load time; this is the interchange form.
"""

from __future__ import annotations

import torch

# Codes per block of rows packed at once: the bit-stream temporaries are int32 per bit, 32 bytes
# per 8-bit code, so a 7B gate_up (131 M codes) in one go would take ~4 GB.
BLOCK_CODES = 2**21


def _row_step(k: int) -> int:
    return max(1, BLOCK_CODES // max(k, 1))


def packed_row_bytes(k: int, bits: int) -> int:
    """Bytes per packed row of k codes."""
    return -(-k // 8) * bits


def pack_codes(codes: torch.Tensor, bits: int, signed: bool = True) -> torch.Tensor:
    """(rows, K) integer codes -> (rows, packed_row_bytes(K, bits)) uint8."""
    if codes.dim() != 2:
        raise ValueError(f"pack_codes expects a 2-D tensor, got shape {tuple(codes.shape)}")
    rows, k = codes.shape
    out = torch.empty(rows, packed_row_bytes(k, bits), dtype=torch.uint8, device=codes.device)
    step = _row_step(k)
    for r in range(0, rows, step):  # row blocks: bounded temporaries, the same bytes
        out[r : r + step] = _pack_rows(codes[r : r + step], bits, signed)
    return out


def _pack_rows(codes: torch.Tensor, bits: int, signed: bool) -> torch.Tensor:
    rows, k = codes.shape
    u = codes.to(torch.int32) + (2 ** (bits - 1) if signed else 0)
    if u.numel() and (int(u.min()) < 0 or int(u.max()) >= 2**bits):
        raise ValueError(f"codes out of range for {bits}-bit {'signed' if signed else 'unsigned'} packing")
    k8 = -(-k // 8) * 8
    u = torch.nn.functional.pad(u, (0, k8 - k))
    shifts = torch.arange(bits, dtype=torch.int32, device=u.device)
    stream = (u.unsqueeze(-1) >> shifts) & 1  # (rows, k8, bits): the bit stream in order
    stream = stream.reshape(rows, k8 * bits // 8, 8)
    weights = (1 << torch.arange(8, dtype=torch.int32, device=u.device))
    return (stream * weights).sum(-1).to(torch.uint8)


def unpack_codes(packed: torch.Tensor, k: int, bits: int, signed: bool = True) -> torch.Tensor:
    """(rows, packed_row_bytes(K, bits)) uint8 -> (rows, K) int8 codes (int16 when unsigned 8-bit)."""
    rows, nbytes = packed.shape
    if nbytes != packed_row_bytes(k, bits):
        raise ValueError(f"packed row has {nbytes} bytes, expected {packed_row_bytes(k, bits)} for K={k}, {bits} bits")
    out = torch.empty(rows, k, dtype=torch.int8 if signed else torch.int16, device=packed.device)
    step = _row_step(k)
    for r in range(0, rows, step):
        out[r : r + step] = _unpack_rows(packed[r : r + step], k, bits, signed)
    return out


def _unpack_rows(packed: torch.Tensor, k: int, bits: int, signed: bool) -> torch.Tensor:
    rows = packed.shape[0]
    p = packed.to(torch.int32)
    stream = (p.unsqueeze(-1) >> torch.arange(8, dtype=torch.int32, device=p.device)) & 1
    stream = stream.reshape(rows, -1, bits)
    u = (stream << torch.arange(bits, dtype=torch.int32, device=p.device)).sum(-1)[:, :k]
    if signed:
        return (u - 2 ** (bits - 1)).to(torch.int8)
    return u.to(torch.int16)
