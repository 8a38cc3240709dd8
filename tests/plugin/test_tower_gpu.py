"""The Triton kernels on the vision tower's layers at the real Qwen2.5-VL-7B tower shapes
(marker `gpu`; skipped without CUDA; no vLLM needed, so it runs on the bare GPU machine:
`pytest tests/plugin/test_tower_gpu.py -m gpu`).

A tower layer as calibration writes it (docs/calibration.md, "Vision-tower quantization"): no text
outlier set, no MAC, a vision outlier set and CWS, bias on every linear; every row a vision row
(the all-False mask the plugin passes); patch counts of whole images (a 448 x 448 picture is
1,024 patches). Same criteria as tests/kernels/triton/test_gpu.py (splitq_kernels.testing)."""

from __future__ import annotations

import pytest
import torch

# Qwen2.5-VL-7B's tower: width 1280, 16 heads, MLP 3420 (gate/up fused by vLLM)
TOWER_7B = {"qkv": (1280, 3 * 1280), "proj": (1280, 1280), "gate_up": (1280, 2 * 3420), "down": (3420, 1280)}


def tower_layer(d_in: int, d_out: int, device: str):
    """A random tower-shaped SplitQ layer: the project's default split with the text share moved
    to the vision set (tower: no text rows), no MAC."""
    from splitq_kernels.reference import SplitQScheme
    from splitq_vllm.testing.layers import default_layer_dims, random_quantized_layer

    scheme = SplitQScheme.from_name("w4a4")
    dims = default_layer_dims(d_in, d_out)
    dims.update(n_vision=dims["n_text"] + dims["n_vision"], n_text=0, mac_rank=0)
    return random_quantized_layer(d_in, d_out, scheme=scheme, bias=True, seed=d_out, **dims).to(device), scheme


def check_tower_layer(d_in: int, d_out: int, rows: int, device: str) -> None:
    from splitq_kernels.layout import prepare_kernel_layer
    from splitq_kernels.testing import check_linear
    from splitq_kernels.triton.gemm import gemm_triton
    from splitq_kernels.triton.quantize_decode import can_implement_decode, quantize_input_decode_triton
    from splitq_kernels.triton.quantize_input import quantize_input_triton

    layer, scheme = tower_layer(d_in, d_out, device)
    kl = prepare_kernel_layer(layer, scheme, device, precision="tf32x3" if device == "cuda" else "ieee")
    assert (kl.text, kl.mac_rank) == (0, 0) and kl.vision > 0
    gen = torch.Generator(device=device).manual_seed(rows)
    x = torch.randn(rows, d_in, generator=gen, device=device).to(torch.bfloat16)
    vision = torch.zeros(rows, dtype=torch.bool, device=device)  # every tower row a vision row
    quantize = quantize_input_decode_triton if can_implement_decode(kl, rows)[0] else quantize_input_triton
    act = quantize(x, vision, kl, store_mac=True)
    y = gemm_triton(act, kl, torch.bfloat16)
    _, r_own, r_full = check_linear(y, act, x, vision, layer, scheme, kl)  # raises with the details
    assert max(r_own, r_full) <= 1.0


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("layer", list(TOWER_7B))
@pytest.mark.parametrize("rows", [77, 1024, 4103])  # a small image, a 448-px one, several (no tile multiple)
def test_tower_layer_at_7b_shapes_matches_the_reference(layer, rows):
    check_tower_layer(*TOWER_7B[layer], rows, "cuda")


def test_the_check_itself_in_the_interpreter_at_a_small_shape():
    """The same check on the CPU (Triton's interpreter) at a tower-like small shape, so the GPU
    test's code path is exercised everywhere."""
    import splitq_kernels.triton

    splitq_kernels.triton.use_interpreter()
    check_tower_layer(200, 96, 37, "cpu")
