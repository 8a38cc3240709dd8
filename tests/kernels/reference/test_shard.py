"""Tensor-parallel shards of a row-parallel layer: the partial outputs of 2 and 4 ranks sum to the
full reference output (the TP=1 numerics), on fresh random layers and inputs whose sizes are no
multiple of the block sizes; the block rule and its refusal."""

import dataclasses

import pytest
import torch

from splitq_kernels.reference import (
    ShardError,
    SplitQScheme,
    main_k_shards,
    shard_layer,
    splitq_linear,
    splitq_linear_shard,
)
from splitq_kernels.reference.shard import SHARD_ALIGN, can_shard, working_sizes
from splitq_vllm.testing.layers import random_activations, random_quantized_layer, random_text_masks

# main = 7 x 11 = 77 channels (not a multiple of 8), 3 text + 5 vision outliers, 37 outputs, ranks 3 / 4
SHAPE = dict(in_features=85, out_features=37, n_text=3, n_vision=5, kron=(7, 11), cws_rank=3, mac_rank=4)
ROWS = 29


@pytest.mark.parametrize("scheme_name", ["w4a4", "w3a2"])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("tp", [2, 4])
def test_partial_outputs_sum_to_the_full_output(tp, symmetric, scheme_name):
    scheme = dataclasses.replace(SplitQScheme.from_name(scheme_name), act_symmetric=symmetric)
    seed = 100 * tp + 10 * symmetric + len(scheme_name)
    layer = random_quantized_layer(**SHAPE, scheme=scheme, seed=seed)
    shards = main_k_shards(layer.idx_main.numel(), tp)
    assert [s.start for s in shards][1:] == [s.stop for s in shards][:-1] and shards[-1].stop == 77
    for dtype, tol in ((torch.float64, 1e-10), (torch.float32, 2e-5)):
        x = random_activations(ROWS, SHAPE["in_features"], seed=seed, outlier_channels=4, dtype=dtype)
        for name, mask in random_text_masks(ROWS, seed).items():
            full = splitq_linear(x, mask, layer, scheme)
            parts = [splitq_linear_shard(x, mask, shard_layer(layer, s), scheme, s) for s in shards]
            total = torch.stack(parts).sum(0)
            err = (total - full).abs().max().item() / full.abs().max().item()
            assert err < tol, (name, dtype, err)
            # ranks other than 0 add the main product of their block only: no bias, no outliers
            if name == "mixed":
                assert not torch.allclose(parts[1], parts[0])


def test_rank_zero_adds_the_rest_once():
    scheme = SplitQScheme.from_name("w4a4")
    layer = random_quantized_layer(**SHAPE, scheme=scheme, seed=7)
    x = random_activations(ROWS, SHAPE["in_features"], seed=7, dtype=torch.float64)
    shards = main_k_shards(77, 2)
    no_rest = dataclasses.replace(layer, text_w=None, vision_w=None, cws_down=None, cws_up=None, mac_down=None,
                                  mac_up=None, bias=None, idx_text=layer.idx_text[:0], idx_vision=layer.idx_vision[:0])
    # a rank > 0's output is exactly the block's main product, the same with or without the rest
    a = splitq_linear_shard(x, None, shard_layer(layer, shards[1]), scheme, shards[1])
    b = splitq_linear_shard(x, None, shard_layer(no_rest, shards[1]), scheme, shards[1])
    assert torch.equal(a, b)


def test_blocks_start_on_packing_groups():
    for main, tp in ((77, 2), (77, 4), (3456, 2), (3456, 4), (18816, 4), (722, 4)):
        shards = main_k_shards(main, tp)
        assert len(shards) == tp and all(s.width > 0 and s.start % SHARD_ALIGN == 0 for s in shards)
        assert sum(s.width for s in shards) == main
        assert [s.owns_rest for s in shards] == [True] + [False] * (tp - 1)


def test_a_size_that_leaves_a_rank_empty_is_refused_with_the_sizes_that_work():
    assert can_shard(17, 3) and not can_shard(16, 3)  # blocks of 8: 8 + 8 + 1, but 8 + 8 + 0
    with pytest.raises(ShardError) as e:
        main_k_shards(16, 3, layer="model.layers.0.mlp.down_proj")
    msg = str(e.value)
    assert "model.layers.0.mlp.down_proj" in msg and "16 channels" in msg and "size 3" in msg
    assert str(working_sizes(16)) in msg and working_sizes(16) == [1, 2]
