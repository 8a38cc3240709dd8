"""One tensor-parallel rank of a row-parallel layer on the Triton kernels (splitq_kernels.shard),
in Triton's interpreter: each rank's partial output equals the reference's partial output
(reference.splitq_gemm with the shard) on the kernel's own codes, and the partial outputs of 2
and 4 ranks sum to the full kernel output. Shapes are no multiple of any block size."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from splitq_kernels.layout import prepare_kernel_layer
from splitq_kernels.ops import splitq_linear_triton
from splitq_kernels.reference import SplitQScheme, main_k_shards, shard_layer, splitq_gemm
from splitq_kernels.shard import gemm_shard_layer, splitq_linear_triton_shard
from splitq_kernels.testing import activations_to_reference
from splitq_kernels.triton.quantize_input import quantize_input_triton
from splitq_vllm.testing.layers import random_activations, random_quantized_layer
from splitq_vllm.testing.layers import random_text_masks as masks

# main 77 = 7 x 11 (not a multiple of 8 or 16), 3 text + 5 vision, 37 outputs, ranks 3 / 4, 21 rows
SHAPE = dict(in_features=85, out_features=37, n_text=3, n_vision=5, kron=(7, 11), cws_rank=3, mac_rank=4)
ROWS = 21


@pytest.fixture(scope="module", autouse=True)
def interpreter():
    import splitq_kernels.triton

    splitq_kernels.triton.use_interpreter()


def _close(actual: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    """Float32 rescaling noise: 2^-16 of the row's largest |y| (the integer sums are exact)."""
    tol = expected.abs().amax(-1, keepdim=True).clamp(min=1e-30) * 2.0**-16
    err = (actual.double() - expected.double()).abs()
    assert bool((err <= tol).all()), f"{what}: max error / tolerance {float((err / tol).max()):.3g}"


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("tp", [2, 4])
def test_rank_outputs_match_the_reference_shard_and_sum_to_the_full_output(tp, symmetric):
    scheme = dataclasses.replace(SplitQScheme.from_name("w4a4"), act_symmetric=symmetric)
    layer = random_quantized_layer(**SHAPE, scheme=scheme, seed=tp + 10 * symmetric)
    x = random_activations(ROWS, SHAPE["in_features"], seed=tp, outlier_channels=4)
    mask = masks(ROWS, tp)["mixed"]
    full = splitq_linear_triton(x, mask, prepare_kernel_layer(layer, scheme, "cpu"))
    parts = []
    for shard in main_k_shards(layer.idx_main.numel(), tp):
        rank_layer = shard_layer(layer, shard)
        kl = prepare_kernel_layer(rank_layer, scheme, "cpu")
        gemm = gemm_shard_layer(kl, shard)
        part = splitq_linear_triton_shard(x, mask, kl, gemm, shard)
        act = quantize_input_triton(x, mask, kl, store_mac=True)
        expected = splitq_gemm(activations_to_reference(act, kl), mask, rank_layer, scheme, torch.float32, shard)
        _close(part, expected, f"rank {shard.rank} of {tp}")
        parts.append(part)
    _close(torch.stack(parts).sum(0), full, f"sum of {tp} ranks")
