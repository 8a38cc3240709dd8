"""Triton kernels of the SplitQ linear layer.

- quantize_input: kernel (a), one pass over the input rows (channel split, online transforms,
  per-token quantization, MAC residual, low-rank "down" products).
- gemm: kernel (b), the int8-MMA GEMM over the main and outlier K ranges with the low-rank "up"
  products, MAC rows, bias and the output cast in its epilogue; split-K for decode.
- w4a16: the optional W4A16 decode linear (SPLITQ_DECODE_MODE=w4a16, 1-16 rows): the decode
  transform stage, then a weight-only GEMM on float activations.

Whether a @triton.jit kernel runs on the GPU or in Triton's CPU interpreter is fixed when the
module defining it is imported (TRITON_INTERPRET is read then): `use_interpreter()` (re)loads
the kernel modules in interpreter mode, for tests and CPU checks.
"""

from __future__ import annotations

import importlib
import os
import sys

_KERNEL_MODULES = ("common", "quantize_input", "quantize_decode", "gemm", "w4a16")  # each imports helpers of those before it


def use_interpreter() -> None:
    """Make the kernels run on CPU tensors through Triton's interpreter (slow: small shapes).

    Reloads the kernel modules with TRITON_INTERPRET=1 and restores the variable afterwards, so
    the rest of the process (e.g. vLLM) is not switched to the interpreter. Functions imported
    from these modules before the call keep working: a reload refreshes the module's globals,
    which they look their kernels up in.
    """
    from .launch import is_interpreted

    names = [f"{__name__}.{m}" for m in _KERNEL_MODULES]
    if all(n in sys.modules for n in names[1:]):
        if is_interpreted(sys.modules[f"{__name__}.quantize_input"]._quantize_input_kernel) and is_interpreted(
            sys.modules[f"{__name__}.gemm"]._gemm_kernel
        ):
            return
    prev = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        for n in names:
            if n in sys.modules:
                importlib.reload(sys.modules[n])
            else:
                importlib.import_module(n)
    finally:
        if prev is None:
            del os.environ["TRITON_INTERPRET"]
        else:
            os.environ["TRITON_INTERPRET"] = prev


def interpreted() -> bool:
    """True when the loaded kernels run in Triton's interpreter."""
    from .gemm import _gemm_kernel
    from .launch import is_interpreted
    from .quantize_input import _quantize_input_kernel

    return is_interpreted(_quantize_input_kernel) and is_interpreted(_gemm_kernel)
