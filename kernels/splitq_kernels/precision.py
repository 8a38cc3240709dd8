"""SPLITQ_PRECISION: the precision of a SplitQ layer's float products (online transforms, low-rank
up products), an explicit setting like SPLITQ_DECODE_MODE (docs/kernels.md, "Product precision").

- `float32` (default): the definition. The reference computes in float32; the Triton kernels run
  the products as tf32x3 on a GPU (float32-accurate on tensor cores) and exact ("ieee") on the CPU.
- `bf16`: every operand of a float product rounded to bfloat16, float32 accumulation, and the
  transformed activations stored in bfloat16 before they are quantized. On tensor cores at the
  bf16 rate: 6x less tensor-core work than tf32x3 and half the scratch bytes of kernel (a), which
  is what prefill pays for the online transforms and the up products (BENCHMARKS.md, "Product
  precision"). The integer products (codes) stay exact. The reference computes the same roundings
  (`reference.transforms.operand`), so the CPU paths (HF, the plugin's reference backend) give what
  a GPU gives, and the quality benchmark measures its accuracy beside the default.

Read at each call by the reference paths (cheap) and once at load time by the plugin's Triton
backend (a KernelLayer's precision is fixed when it is packed); the plugin also records it in the
torch.compile cache key, and a bad value fails at start-up naming the variable.
"""

from __future__ import annotations

from .reference.transforms import PRODUCT_PRECISIONS
from .settings import read_setting

ENV_PRECISION = "SPLITQ_PRECISION"
PRECISION_SETTINGS = PRODUCT_PRECISIONS  # the setting's values are the reference's precisions


def product_precision(value: str | None = None) -> str:
    """The validated setting: `value`, else $SPLITQ_PRECISION, else `float32`."""
    return read_setting(ENV_PRECISION, PRECISION_SETTINGS, value)


def kernel_precision(device_type: str, value: str | None = None) -> str:
    """The Triton kernels' `precision` (layout.PRECISIONS) for the setting on a device type:
    bf16 -> "bf16"; float32 -> "tf32x3" on CUDA, "ieee" elsewhere."""
    if product_precision(value) == "bf16":
        return "bf16"
    return "tf32x3" if device_type == "cuda" else "ieee"


def reference_precision(kernel: str) -> str:
    """The reference's precision that a kernel precision computes: "bf16" for "bf16", else
    "float32" ("tf32" is float32 up to its rounding, which the reference does not model)."""
    return "bf16" if kernel == "bf16" else "float32"
