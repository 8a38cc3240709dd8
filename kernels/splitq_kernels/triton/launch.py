"""A planned kernel launch: run it (GPU, or CPU under TRITON_INTERPRET=1), or compile it ahead of
time for a GPU target without a GPU (what the CPU tests use to check that every configuration
still compiles for Hopper and Ada)."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any

import torch
import triton

_TORCH_TO_TRITON = {
    torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16", torch.float64: "fp64",
    torch.int8: "i8", torch.uint8: "u8", torch.int16: "i16", torch.int32: "i32", torch.int64: "i64",
    torch.bool: "i1",
}


def is_interpreted(kernel: Any) -> bool:
    return not isinstance(kernel, triton.runtime.jit.JITFunction)


_INTERPRETED_STDLIB: dict[Any, Any] = {}


@contextlib.contextmanager
def interpretable_stdlib():
    """Triton's own @jit library functions (tl.max, tl.sum, tl.cdiv, tl.zeros, ...) are compiled
    or interpreted depending on TRITON_INTERPRET when `triton` was first imported, which in a test
    process (torch, transformers, vLLM) happened long before. For the duration of an interpreted
    launch, swap them for interpreted versions of the same Python functions; restore afterwards so
    nothing else in the process sees the change."""
    import triton.language as tl
    from triton.runtime.interpreter import InterpretedFunction

    with contextlib.suppress(ImportError):  # imported lazily by a launch; it asserts on these functions
        import triton.experimental.gluon  # noqa: F401
    saved = []
    for mod in (tl, tl.core, tl.standard, tl.math):
        for name, obj in list(vars(mod).items()):
            if isinstance(obj, triton.runtime.jit.JITFunction):
                if obj not in _INTERPRETED_STDLIB:
                    _INTERPRETED_STDLIB[obj] = InterpretedFunction(obj.fn)
                saved.append((mod, name, obj))
                setattr(mod, name, _INTERPRETED_STDLIB[obj])
    try:
        yield
    finally:
        for mod, name, obj in saved:
            setattr(mod, name, obj)


@dataclass
class Launch:
    """One kernel launch: grid, runtime arguments (tensors, ints, floats; None for an absent
    tensor, which Triton treats as a compile-time constant: the kernel only touches it under a
    HAS_* guard), constexpr meta-parameters and launch options (num_warps, ...)."""

    kernel: Any
    grid: tuple[int, ...]
    args: dict[str, Any]
    constexprs: dict[str, Any]
    options: dict[str, Any] = field(default_factory=dict)

    def run(self) -> None:
        on_cpu = any(isinstance(v, torch.Tensor) and v.device.type == "cpu" for v in self.args.values())
        if on_cpu and not is_interpreted(self.kernel):
            raise RuntimeError(
                "SplitQ Triton kernels got CPU tensors but were compiled for a GPU: set "
                "TRITON_INTERPRET=1 before splitq_kernels.triton is imported, or call "
                "splitq_kernels.triton.use_interpreter() first"
            )
        if is_interpreted(self.kernel):
            with interpretable_stdlib():
                self.kernel[self.grid](**self.args, **self.constexprs, **self.options)
        else:
            self.kernel[self.grid](**self.args, **self.constexprs, **self.options)

    def signature(self) -> dict[str, str]:
        """Triton types of the arguments, as the JIT would specialize them (None -> constexpr)."""
        sig = {}
        for name, value in self.args.items():
            if value is None:
                sig[name] = "constexpr"
            elif isinstance(value, torch.Tensor):
                sig[name] = "*" + _TORCH_TO_TRITON[value.dtype]
            elif isinstance(value, bool):
                sig[name] = "i1"
            elif isinstance(value, int):
                sig[name] = "i32" if -(2**31) <= value < 2**31 else "i64"
            elif isinstance(value, float):
                sig[name] = "fp32"
            else:
                raise TypeError(f"cannot type argument {name}={value!r}")
        for name in self.constexprs:
            sig[name] = "constexpr"
        return sig

    def compile(self, arch: int, warp_size: int = 32):
        """Ahead-of-time compile for an NVIDIA target (e.g. 90 = Hopper, 89 = Ada) and return
        Triton's compiled kernel (with .asm["ptx"]); needs the non-interpreted kernel."""
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource

        if is_interpreted(self.kernel):
            raise RuntimeError("cannot compile an interpreted kernel (TRITON_INTERPRET=1 was set at import)")
        constexprs = {name: None for name, value in self.args.items() if value is None} | self.constexprs
        src = ASTSource(fn=self.kernel, signature=self.signature(), constexprs=constexprs)
        return triton.compile(src, target=GPUTarget("cuda", arch, warp_size), options=dict(self.options))
