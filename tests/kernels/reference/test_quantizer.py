"""The quantizer Q (Eq. 1), the packing and the transforms, against direct float64 formulas."""

import itertools

import pytest
import torch

from splitq_kernels.packing import pack_codes, packed_row_bytes, unpack_codes
from splitq_kernels.reference import (
    fake_quantize,
    fold_dense_weight,
    fold_main_weight,
    kron_apply,
    main_transform,
    qrange,
    quantize,
)
from tests.kernels.reference.paper import direct_q


@pytest.mark.parametrize("bits,symmetric,dim", list(itertools.product(range(2, 9), [True, False], [-1, 0])))
def test_quantize_matches_eq1(bits, symmetric, dim):
    gen = torch.Generator().manual_seed(bits * 10 + symmetric)
    x = torch.randn(37, 23, generator=gen, dtype=torch.float64) * 3 + 0.5
    clip_shape = (37, 1) if dim == -1 else (1, 23)
    clip = torch.empty(clip_shape, dtype=torch.float64).uniform_(0.7, 1.0, generator=gen)
    q = quantize(x, bits, symmetric, dim=dim, clip=clip)
    qmin, qmax = qrange(bits, symmetric)
    assert int(q.codes.min()) >= qmin and int(q.codes.max()) <= qmax
    assert q.zero is None if symmetric else q.zero is not None
    expected = direct_q(x, bits, symmetric, dim, clip)
    torch.testing.assert_close(q.dequantize(torch.float64), expected, rtol=0, atol=1e-12)
    # The fake-quant form gives the same numbers.
    torch.testing.assert_close(fake_quantize(x, bits, symmetric, dim=dim, clip=clip), expected, rtol=0, atol=1e-12)


def test_quantize_error_within_half_step_without_clipping():
    x = torch.randn(64, 100, dtype=torch.float64)
    for bits in (2, 3, 4, 8):
        for sym in (True, False):
            q = quantize(x, bits, sym)
            err = (q.dequantize(torch.float64) - x).abs()
            assert bool((err <= q.scale / 2 + 1e-12).all()), (bits, sym)


def test_zero_rows_quantize_to_zero():
    x = torch.zeros(3, 8)
    for sym in (True, False):
        q = quantize(x, 4, sym)
        assert torch.equal(q.dequantize(), x)
        assert torch.isfinite(fake_quantize(x, 4, sym)).all()


def test_fake_quantize_straight_through_gradients():
    x = (torch.randn(8, 16, dtype=torch.float64) * 2).requires_grad_()
    clip = torch.tensor(0.8, dtype=torch.float64, requires_grad=True)
    y = fake_quantize(x, 4, True, clip=clip)
    y.sum().backward()
    # Inside the clipping range the rounding passes the gradient straight through; values clipped
    # away get none. (The row maximum also receives the gradient of the scale: left out.)
    scale = 0.8 * x.detach().abs().amax(-1, keepdim=True) / 7
    r = (x.detach() / scale).round()
    clipped = (r > 7) | (r < -8)
    is_max = x.detach().abs() == x.detach().abs().amax(-1, keepdim=True)
    assert clipped.any()
    assert bool((x.grad[clipped & ~is_max] == 0).all())
    assert bool((x.grad[~clipped & ~is_max] == 1).all())
    assert clip.grad is not None and clip.grad.abs() > 0  # learnable clipping is trained


def test_bits_out_of_range_rejected():
    with pytest.raises(ValueError, match="bits"):
        quantize(torch.randn(2, 2), 1)
    with pytest.raises(ValueError, match="bits"):
        quantize(torch.randn(2, 2), 9)


@pytest.mark.parametrize("bits", range(2, 9))
@pytest.mark.parametrize("k", [1, 7, 8, 13, 64, 67])
def test_packing_round_trip(bits, k):
    gen = torch.Generator().manual_seed(bits + k)
    qmin, qmax = qrange(bits, True)
    codes = torch.randint(qmin, qmax + 1, (5, k), generator=gen).to(torch.int8)
    packed = pack_codes(codes, bits)
    assert packed.dtype == torch.uint8 and packed.shape == (5, packed_row_bytes(k, bits))
    assert torch.equal(unpack_codes(packed, k, bits), codes)
    ucodes = torch.randint(0, 2**bits, (5, k), generator=gen).to(torch.int16)
    assert torch.equal(unpack_codes(pack_codes(ucodes, bits, signed=False), k, bits, signed=False), ucodes)


def test_packing_byte_layout_is_the_documented_one():
    # 4 bits: u = code + 8, low nibble first. codes [-8, 7, 0, -1] -> u [0, 15, 8, 7]
    packed = pack_codes(torch.tensor([[-8, 7, 0, -1]], dtype=torch.int8), 4)
    assert packed[0, :2].tolist() == [0 | (15 << 4), 8 | (7 << 4)]
    # 3 bits: eight codes fill three bytes as one little-endian 24-bit stream.
    u = [1, 2, 3, 4, 5, 6, 7, 0]
    stream = sum(v << (3 * j) for j, v in enumerate(u))
    packed = pack_codes(torch.tensor([u], dtype=torch.int16) - 4, 3)
    assert packed[0].tolist() == [stream & 0xFF, (stream >> 8) & 0xFF, stream >> 16]


def test_pack_rejects_out_of_range_codes():
    with pytest.raises(ValueError, match="out of range"):
        pack_codes(torch.tensor([[8]], dtype=torch.int8), 4)


def test_kron_apply_is_multiplication_by_the_kronecker_product():
    gen = torch.Generator().manual_seed(0)
    p1 = torch.randn(5, 5, generator=gen, dtype=torch.float64)
    p2 = torch.randn(7, 7, generator=gen, dtype=torch.float64)
    x = torch.randn(11, 35, generator=gen, dtype=torch.float64)
    torch.testing.assert_close(kron_apply(x, p1, p2), x @ torch.kron(p1, p2), rtol=1e-12, atol=1e-12)


def test_folded_weights_preserve_the_unquantized_product():
    gen = torch.Generator().manual_seed(1)
    w = torch.randn(9, 35, generator=gen, dtype=torch.float64)
    x = torch.randn(6, 35, generator=gen, dtype=torch.float64)
    smooth = torch.rand(35, generator=gen, dtype=torch.float64) + 0.5
    p1 = torch.randn(5, 5, generator=gen, dtype=torch.float64) + 3 * torch.eye(5, dtype=torch.float64)
    p2 = torch.randn(7, 7, generator=gen, dtype=torch.float64) + 3 * torch.eye(7, dtype=torch.float64)
    y = main_transform(x, smooth, p1, p2) @ fold_main_weight(w, smooth, p1, p2).T
    torch.testing.assert_close(y, x @ w.T, rtol=1e-10, atol=1e-10)
    p = torch.randn(35, 35, generator=gen, dtype=torch.float64) + 6 * torch.eye(35, dtype=torch.float64)
    torch.testing.assert_close((x @ p) @ fold_dense_weight(w, p).T, x @ w.T, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_packing_in_row_blocks_gives_the_same_bytes(monkeypatch, bits):
    """Big weights are packed in row blocks (bounded temporaries); the bytes do not depend on it."""
    from splitq_kernels import packing

    gen = torch.Generator().manual_seed(bits)
    rows, k = 37, 29  # neither a multiple of the block nor of 8 codes
    codes = torch.randint(-(2 ** (bits - 1)), 2 ** (bits - 1), (rows, k), generator=gen, dtype=torch.int8)
    whole = pack_codes(codes, bits)
    monkeypatch.setattr(packing, "BLOCK_CODES", 5 * k)  # 5 rows per block, the last one partial
    assert torch.equal(pack_codes(codes, bits), whole)
    assert torch.equal(unpack_codes(whole, k, bits), codes)
