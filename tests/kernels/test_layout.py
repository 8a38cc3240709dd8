"""The kernels' weight layout and the layer preparation (plain torch, no Triton launch)."""

import pytest
import torch

from splitq_kernels.layout import (
    KernelLayer,
    codes_per_word,
    pack_words,
    prepare_kernel_layer,
    unpack_words,
    word_bytes,
)
from splitq_kernels.reference import SplitQScheme, qrange, quantize_linear
from splitq_vllm.testing.layers import random_float_layer


@pytest.mark.parametrize("bits", range(2, 9))
@pytest.mark.parametrize("k", [1, 31, 64, 200])
def test_pack_words_round_trip_and_size(bits, k):
    gen = torch.Generator().manual_seed(bits * 100 + k)
    qmin, qmax = qrange(bits, True)
    codes = torch.randint(qmin, qmax + 1, (7, k), generator=gen).to(torch.int8)
    words = pack_words(codes, bits)
    g = codes_per_word(bits)
    assert g & (g - 1) == 0  # a power of two: the kernel unpacks with one broadcast shift
    assert words.dtype == torch.uint8 and words.shape[1] == 7 * word_bytes(bits)
    # storage is ceil(bits * G / 8) bytes per G codes: exact for 2, 3, 4, 8 bits
    assert word_bytes(bits) * 8 < g * bits + 8
    assert torch.equal(unpack_words(words, k, bits), codes)
    assert torch.equal(pack_words(codes, bits, chunk=3), words)  # packing in chunks of outputs


def test_pack_words_layout_is_the_documented_one():
    # 4 bits, WORD_SUB rows per block: word (kk, n) holds codes k = g * WORD_SUB + kk at bits 4g
    from splitq_kernels.layout import WORD_SUB

    k = 8 * WORD_SUB
    codes = (torch.arange(k) % 16 - 8).to(torch.int8).reshape(1, k)
    words = pack_words(codes, 4).reshape(WORD_SUB, 1, 4).to(torch.int64)
    w0 = int((words[0, 0] << torch.arange(4) * 8).sum())
    expected = sum(((codes[0, g * WORD_SUB] + 8).item()) << (4 * g) for g in range(8))
    assert w0 == expected


def test_kernel_layer_survives_the_op_argument_round_trip():
    scheme = SplitQScheme.from_name("w3a2", act_symmetric=False, mac_rows="vision")
    fl, _ = random_float_layer(53, 37, 3, 5, (5, 9), cws_rank=3, mac_rank=4, seed=0)
    kl = prepare_kernel_layer(quantize_linear(fl, scheme), scheme, "cpu", precision="tf32x3")
    again = KernelLayer.from_op_args(kl.tensors(), kl.meta(), kl.precision)
    for name, value in vars(kl).items():
        other = getattr(again, name)
        if isinstance(value, torch.Tensor):
            assert torch.equal(value, other), name
        else:
            assert value == other, name
    assert kl.cws_down.shape == (45, 16) and kl.mac_up.shape == (16, 37)  # ranks padded to 16


def test_prepare_rejects_what_the_kernels_cannot_run():
    scheme = SplitQScheme.from_name("w4a4")
    fl, _ = random_float_layer(53, 37, 3, 5, (5, 9), seed=0)
    q = quantize_linear(fl, scheme)
    with pytest.raises(ValueError, match="precision"):
        prepare_kernel_layer(q, scheme, "cpu", precision="fp16")
    with pytest.raises(ValueError, match="bits"):
        prepare_kernel_layer(q, SplitQScheme.from_name("w3a4"), "cpu")
    big, _ = random_float_layer(257 * 2, 5, 0, 0, (257, 2), seed=1)
    with pytest.raises(ValueError, match="n1=257"):
        prepare_kernel_layer(quantize_linear(big, scheme), scheme, "cpu")
