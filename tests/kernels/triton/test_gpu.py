"""Kernel correctness on a real GPU at the real Qwen2.5-VL shapes (marker `gpu`; skipped without
CUDA; benchmarks/gpu_check.sh runs them). Same criteria as the interpreter tests
(splitq_kernels.testing), fresh random inputs, row counts that are not multiples of the tiles."""

from __future__ import annotations

import pytest
import torch
from splitq_kernels.triton.aot import MODEL_SHAPES

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def _layer(d_in: int, d_out: int, scheme, bias: bool):
    from splitq_vllm.testing.layers import default_layer_dims, random_quantized_layer

    return random_quantized_layer(d_in, d_out, scheme=scheme, bias=bias, seed=d_out,
                                  **default_layer_dims(d_in, d_out)).to("cuda")


@pytest.mark.parametrize("layer_name,precision", [("7b.qkv", "tf32x3"), ("7b.down", "tf32x3"), ("7b.qkv", "bf16")])
@pytest.mark.parametrize("rows", [1, 13, 77])  # decode path (1, 13), persistent (77)
def test_real_shape_matches_reference(layer_name, precision, rows):
    """tf32x3 against the float32 reference; bf16 (SPLITQ_PRECISION=bf16: bf16 tensor cores)
    against the reference's bf16 form (splitq_kernels.testing picks it by kl.precision)."""
    from splitq_kernels.layout import prepare_kernel_layer
    from splitq_kernels.reference import SplitQScheme
    from splitq_kernels.testing import check_linear
    from splitq_kernels.triton.gemm import gemm_triton
    from splitq_kernels.triton.quantize_decode import can_implement_decode, quantize_input_decode_triton
    from splitq_kernels.triton.quantize_input import quantize_input_triton

    d_in, d_out = MODEL_SHAPES[layer_name]
    scheme = SplitQScheme.from_name("w4a4")
    layer = _layer(d_in, d_out, scheme, bias=layer_name.endswith("qkv"))
    kl = prepare_kernel_layer(layer, scheme, "cuda", precision=precision)
    gen = torch.Generator(device="cuda").manual_seed(rows)
    x = torch.randn(rows, d_in, generator=gen, device="cuda").to(torch.bfloat16)
    mask = torch.rand(rows, generator=gen, device="cuda") < 0.5
    quantize = quantize_input_decode_triton if can_implement_decode(kl, rows)[0] else quantize_input_triton
    act = quantize(x, mask, kl, store_mac=True)  # as the op runs it
    y = gemm_triton(act, kl, torch.bfloat16)
    _, r_own, r_full = check_linear(y, act, x, mask, layer, scheme, kl)  # raises with the details
    assert max(r_own, r_full) <= 1.0
    if can_implement_decode(kl, rows)[0]:  # the op's two launches (in-grid waits) give the same, bit for bit
        from splitq_kernels.triton.quantize_decode import linear_decode_triton

        for _ in range(2):  # the second call relies on the first having left the counters at zero
            y2, act2 = linear_decode_triton(x, mask, kl, store_mac=True)
            check_linear(y2, act2, x, mask, layer, scheme, kl)
            assert torch.equal(y2, y)


def test_cuda_graph_capture_under_torch_compile():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[3] / "benchmarks" / "gpu_check.py"
    spec = importlib.util.spec_from_file_location("gpu_check", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    res = mod.capture_check(dry_run=False)
    assert res["ok"], res
