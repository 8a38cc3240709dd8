"""How a loaded SplitQ layer computes: the torch reference, or (on CUDA) the Triton kernels.

The backend is chosen once per layer in `process_weights_after_loading`:
`SPLITQ_BACKEND=reference|triton|auto` (default auto: triton on CUDA when `splitq_kernels.triton`
can be imported, the reference otherwise). Each backend has two steps:
- `prepare(layer, ref, scheme)`: once, after loading: turn the reference `SplitQLinear` `ref`
  (codes unpacked, fused outputs concatenated) into whatever the forward wants, stored as
  buffers on the vLLM layer so that the model's `.to()`, torch.compile and CUDA graphs see them.
- `apply(layer, x, text_mask, bias)`: x (T, D_in) in the model dtype, text_mask (T,) bool;
  no data-dependent Python control flow (the mask is a tensor, never inspected).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, fields

import torch
from torch import nn

from splitq_kernels.reference import QuantizedTensor, SplitQLinear, SplitQScheme, splitq_linear

ENV_BACKEND = "SPLITQ_BACKEND"
BACKENDS = ("auto", "reference", "triton")
TRITON_MODULE = "splitq_kernels.triton"


def requested_backend() -> str:
    v = os.environ.get(ENV_BACKEND, "auto").strip().lower() or "auto"
    if v not in BACKENDS:
        raise ValueError(f"{ENV_BACKEND}={v!r}: expected one of {list(BACKENDS)}")
    return v


def triton_available() -> bool:
    try:
        import importlib

        mod = importlib.import_module(TRITON_MODULE)
    except ImportError:
        return False
    return hasattr(mod, "prepare_kernel_layer") and hasattr(mod, "splitq_linear_triton")


def select_backend(device: torch.device) -> "Backend":
    """The backend for a layer on `device` (see the module doc)."""
    want = requested_backend()
    if want == "auto":
        want = "triton" if device.type == "cuda" and triton_available() else "reference"
    if want == "triton":
        if not triton_available():
            raise RuntimeError(
                f"{ENV_BACKEND}=triton, but the SplitQ Triton kernels ({TRITON_MODULE}: prepare_kernel_layer, "
                "splitq_linear_triton) are not available in this installation"
            )
        return TritonBackend()
    return ReferenceBackend()


class Backend:
    name = "?"

    def prepare(self, layer: nn.Module, ref: SplitQLinear, scheme: SplitQScheme) -> None:
        raise NotImplementedError

    def apply(self, layer: nn.Module, x: torch.Tensor, text_mask: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        raise NotImplementedError


@dataclass(frozen=True)
class _RefLayout:
    """Which SplitQLinear fields a layer has: plain tensors, and quantized tensors with their bits."""

    tensors: tuple[str, ...]
    quantized: tuple[tuple[str, int], ...]
    absent: tuple[str, ...]


_PREFIX = "splitq_ref_"


class ReferenceBackend(Backend):
    """`splitq_kernels.reference.splitq_linear`, the one definition of the math, on any device.

    Every tensor of the SplitQLinear becomes a non-persistent buffer of the layer
    (`splitq_ref_<field>`, `splitq_ref_<field>_codes` / `_scale`); `apply` rebuilds the dataclass
    from them (a few Python objects, traced away by torch.compile) and passes the layer's bias.
    """

    name = "reference"

    def prepare(self, layer: nn.Module, ref: SplitQLinear, scheme: SplitQScheme) -> None:
        tensors, quantized, absent = [], [], []
        for f in fields(SplitQLinear):
            if f.name == "bias":
                continue  # vLLM passes the layer's bias to apply
            v = getattr(ref, f.name)
            if v is None:
                absent.append(f.name)
            elif isinstance(v, QuantizedTensor):
                if v.zero is not None:
                    raise ValueError(f"{f.name}: the format stores symmetric weights only")
                layer.register_buffer(f"{_PREFIX}{f.name}_codes", v.codes.contiguous(), persistent=False)
                layer.register_buffer(f"{_PREFIX}{f.name}_scale", v.scale.contiguous(), persistent=False)
                quantized.append((f.name, v.bits))
            else:
                layer.register_buffer(f"{_PREFIX}{f.name}", v.contiguous(), persistent=False)
                tensors.append(f.name)
        layer.splitq_ref_layout = _RefLayout(tuple(tensors), tuple(quantized), tuple(absent))
        layer.splitq_scheme = scheme

    def apply(self, layer: nn.Module, x: torch.Tensor, text_mask: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        layout: _RefLayout = layer.splitq_ref_layout
        kw: dict[str, object] = {name: None for name in layout.absent}
        for name in layout.tensors:
            kw[name] = getattr(layer, _PREFIX + name)
        for name, bits in layout.quantized:
            kw[name] = QuantizedTensor(getattr(layer, f"{_PREFIX}{name}_codes"), getattr(layer, f"{_PREFIX}{name}_scale"), None, bits)
        ref = SplitQLinear(**kw, bias=bias)
        return splitq_linear(x, text_mask, ref, layer.splitq_scheme)


class TritonBackend(Backend):
    """The Triton kernels (CUDA; or the CPU under TRITON_INTERPRET=1).

    Expects `splitq_kernels.triton.prepare_kernel_layer(layer, scheme, device) -> KernelLayer` and
    `splitq_linear_triton(x, text_mask, kernel_layer) -> y` (torch custom ops, so torch.compile and
    CUDA graphs see opaque calls). Wired against that announced API; the kernels are being written
    in parallel, so this path is not exercised by the tests yet.
    """

    name = "triton"

    def prepare(self, layer: nn.Module, ref: SplitQLinear, scheme: SplitQScheme) -> None:
        from splitq_kernels.triton import prepare_kernel_layer  # type: ignore[import-not-found]

        device = ref.main_w.codes.device
        layer.splitq_kernel_layer = prepare_kernel_layer(ref, scheme, device)
        layer.splitq_scheme = scheme

    def apply(self, layer: nn.Module, x: torch.Tensor, text_mask: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        from splitq_kernels.triton import splitq_linear_triton  # type: ignore[import-not-found]

        y = splitq_linear_triton(x, text_mask, layer.splitq_kernel_layer)
        return y if bias is None else y + bias
