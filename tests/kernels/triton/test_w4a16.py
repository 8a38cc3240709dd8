"""The W4A16 decode kernels (triton/w4a16.py) against the reference W4A16 form
(reference.splitq_linear_w4a16), on the CPU through Triton's interpreter: 1, 3 and 16 rows, shapes
that are multiples of no tile, 4-, 3- and 2-bit weight words, split-K and not, the CWS down in the
GEMM's grid and as a launch of its own; the workspaces are left at zero; SPLITQ_DECODE_MODE in
torch.ops.splitq.linear."""

from __future__ import annotations

import pytest
import torch
from splitq_kernels.layout import prepare_kernel_layer
from splitq_kernels.reference import SplitQScheme, quantize_linear, splitq_linear_w4a16
from splitq_kernels.testing import check_outputs
from splitq_kernels.triton.w4a16 import W4A16Config, linear_w4a16_triton, plan_linear_w4a16

from splitq_vllm.testing.layers import random_activations, random_float_layer


@pytest.fixture(scope="module", autouse=True)
def interpreter():
    import splitq_kernels.triton

    splitq_kernels.triton.use_interpreter()


# main 320 = 40 x 8 (five 64-channel down blocks), 45 outputs (one partial 32-column tile); rank 5 pads to 16
WIDE = dict(in_features=331, out_features=45, n_text=5, n_vision=6, kron=(40, 8), cws_rank=5, mac_rank=17)
# main 222 = 6 x 37 (the last down block partial), 29 outputs; rank 9 pads to 16
LONG = dict(in_features=234, out_features=29, n_text=7, n_vision=5, kron=(6, 37), cws_rank=9, mac_rank=3)
SPLIT1 = W4A16Config(block_n=32, split_k=1, num_stages=1)
SPLIT3 = W4A16Config(block_n=32, split_k=3, num_stages=1)


def make(shape: dict, scheme_name: str, seed: int, **kw):
    scheme = SplitQScheme.from_name(scheme_name)
    fl, _ = random_float_layer(**shape, act_clip=0.9, weight_clip=True, seed=seed, **kw)
    q = quantize_linear(fl, scheme)
    return q, prepare_kernel_layer(q, scheme, "cpu")


def _neutral() -> None:
    """Counters and sums left at zero for the next call (the partial buffers are overwritten, not summed)."""
    from splitq_kernels.triton import w4a16

    ws = w4a16._WORKSPACES[("cpu", None)]  # the module's globals after the reload
    assert int(ws.sync.abs().sum()) == 0 and int(ws.down_count.abs().sum()) == 0
    assert int(ws.counters.abs().sum()) == 0


def check(x, q, kl, config=None, in_grid=None):
    y = linear_w4a16_triton(x, kl, config, in_grid)
    expected = splitq_linear_w4a16(x.float(), None, q)  # float32, before its cast to x's dtype
    check_outputs(y, expected, what="W4A16 output")
    _neutral()
    return y


@pytest.mark.parametrize("scheme_name", ["w4a4", "w3a3", "w3a2"])
@pytest.mark.parametrize("shape", ["wide", "long"])
@pytest.mark.parametrize("rows", [1, 3, 16])
def test_w4a16_matches_the_reference(scheme_name, shape, rows):
    shp = WIDE if shape == "wide" else LONG
    q, kl = make(shp, scheme_name, seed=rows)
    x = random_activations(rows, shp["in_features"], seed=rows + 7, outlier_channels=4).to(torch.bfloat16)
    check(x, q, kl)  # default: one 64-column tile split over K ("4 SMs" on the CPU)
    check(x, q, kl, SPLIT1)  # every program a whole tile (no split-K)
    y3 = check(x, q, kl, SPLIT3)
    assert torch.equal(check(x, q, kl, SPLIT3, in_grid=False), y3)  # the down product's own launch: bit for bit


@pytest.mark.parametrize(
    "parts",
    [dict(n_text=0, n_vision=0, cws_rank=0, mac_rank=0, bias=False), dict(n_text=4, n_vision=0, cws_rank=0, mac_rank=2),
     dict(n_text=0, n_vision=4, cws_rank=2, mac_rank=0)],
    ids=["main_only", "text_and_mac", "vision_and_cws"],
)
def test_empty_sets_and_branches(parts):
    shape = dict(in_features=48 + parts["n_text"] + parts["n_vision"], out_features=21, kron=(6, 8), **parts)
    q, kl = make(shape, "w4a4", seed=15)
    x = random_activations(5, shape["in_features"], seed=16)
    check(x, q, kl)
    check(x.to(torch.float16), q, kl, SPLIT3)


def test_launch_count_and_no_host_sync_inputs():
    """Two launches (D1, the W4A16 GEMM with the CWS down in its grid); three with in_grid=False."""
    q, kl = make(LONG, "w4a4", seed=3)
    x = torch.zeros(4, LONG["in_features"])
    y = torch.empty(4, LONG["out_features"])
    scratch = torch.empty(4, LONG["in_features"])
    h = torch.empty(16, kl.cws_rank_padded)
    assert len(plan_linear_w4a16(x, kl, y, scratch, h, in_grid=True)) == 2
    assert len(plan_linear_w4a16(x, kl, y, scratch, h, in_grid=False)) == 3


def test_the_setting_switches_the_op_at_16_rows(monkeypatch):
    """torch.ops.splitq.linear under SPLITQ_DECODE_MODE: W4A16 at <= 16 rows, the W4A4 kernels above;
    the default is W4A4 everywhere; a bad value names the variable and the allowed values."""
    from splitq_kernels.ops import splitq_linear_triton
    from splitq_kernels.reference import splitq_linear

    scheme = SplitQScheme.from_name("w4a4")
    shape = dict(in_features=54, out_features=19, n_text=3, n_vision=3, kron=(6, 8), cws_rank=2, mac_rank=3)
    q, kl = make(shape, "w4a4", seed=21)
    x = random_activations(17, 54, seed=22)
    monkeypatch.setenv("SPLITQ_DECODE_MODE", "w4a16")
    check_outputs(splitq_linear_triton(x[:16], None, kl), splitq_linear_w4a16(x[:16], None, q))
    y17 = splitq_linear_triton(x, None, kl)
    monkeypatch.delenv("SPLITQ_DECODE_MODE")
    assert torch.equal(y17, splitq_linear_triton(x, None, kl))  # prefill-size steps: the default kernels
    y16 = splitq_linear_triton(x[:16], None, kl)
    assert not torch.equal(y16, splitq_linear_w4a16(x[:16], None, q))
    torch.testing.assert_close(y16, splitq_linear(x[:16], None, q, scheme), rtol=1e-4, atol=1e-4)
    monkeypatch.setenv("SPLITQ_DECODE_MODE", "w4a2")
    with pytest.raises(ValueError, match=r"SPLITQ_DECODE_MODE='w4a2': must be one of w4a4, w4a16"):
        splitq_linear_triton(x[:2], None, kl)


@pytest.mark.parametrize("tp", [2, 3])
def test_row_parallel_ranks_match_the_reference_shards(tp, monkeypatch):
    """splitq_kernels.shard under SPLITQ_DECODE_MODE=w4a16: each rank's partial output is the
    reference W4A16 form's for the rank's layer (main block from its first column of the scratch;
    outliers, CWS and bias on rank 0 only), and the ranks sum to the full W4A16 output."""
    from splitq_kernels.reference import main_k_shards, shard_layer
    from splitq_kernels.shard import gemm_shard_layer, splitq_linear_triton_shard

    scheme = SplitQScheme.from_name("w4a4")
    q, kl_full = make(LONG, "w4a4", seed=30 + tp)
    x = random_activations(3, LONG["in_features"], seed=31, outlier_channels=4)
    monkeypatch.setenv("SPLITQ_DECODE_MODE", "w4a16")
    full = splitq_linear_w4a16(x, None, q)
    parts = []
    for shard in main_k_shards(q.idx_main.numel(), tp):
        rank = shard_layer(q, shard)
        kl = prepare_kernel_layer(rank, scheme, "cpu")
        part = splitq_linear_triton_shard(x, None, kl, gemm_shard_layer(kl, shard), shard)
        check_outputs(part, splitq_linear_w4a16(x, None, rank, shard), what=f"rank {shard.rank} of {tp}")
        parts.append(part)
    torch.testing.assert_close(sum(parts), full, rtol=1e-5, atol=1e-5 * float(full.abs().max()))
