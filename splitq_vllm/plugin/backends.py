"""How a loaded SplitQ layer computes: the Triton kernels (CUDA) or the torch reference (anywhere).

Chosen once per layer in `process_weights_after_loading`, the way vLLM chooses kernels: each
backend answers `can_implement(kron, scheme, device) -> (ok, reason)`; the candidates are tried in
order and the first that can implement the layer is used, the reasons of the others are logged.
`SPLITQ_BACKEND` sets the candidates: `auto` (default) = Triton, then the reference; `triton` =
Triton alone (on a CPU device it runs the kernels in Triton's interpreter: slow, for tests and
CI), failing the load with the reason when it cannot; `reference` = the reference alone.
Each backend has two steps:
- `prepare(layer, ref, scheme, shard)`: once, after loading: turn the reference `SplitQLinear` `ref`
  (codes unpacked, fused outputs concatenated) into whatever the forward wants, stored as
  buffers on the vLLM layer so that the model's `.to()`, torch.compile and CUDA graphs see them.
  `shard` (a KShard) for a row-parallel layer under tensor parallelism: `ref` is the rank's layer
  (reference/shard.py: main_w holds the rank's block of the main K range) and `apply` returns the
  rank's partial output.
- `apply(layer, x, text_mask, bias)`: x (T, D_in) in the model dtype (the whole input, also for a
  shard), text_mask (T,) bool; no data-dependent Python control flow (the mask is a tensor,
  never inspected).
"""

from __future__ import annotations

from dataclasses import fields, replace

import torch
from torch import nn

from splitq_kernels.decode_mode import decode_mode, reference_linear_for_step  # noqa: F401  (decode_mode: config.py)
from splitq_kernels.precision import kernel_precision, product_precision  # noqa: F401  (product_precision: config.py)
from splitq_kernels.reference import KShard, QuantizedTensor, SplitQLinear, SplitQScheme

from .env import env_choice

ENV_BACKEND = "SPLITQ_BACKEND"
BACKENDS = ("auto", "reference", "triton")
TRITON_MODULE = "splitq_kernels.ops"


def requested_backend() -> str:
    return env_choice(ENV_BACKEND, BACKENDS, "auto")


def triton_available() -> bool:
    """Whether the Triton kernels' module imports and has the two entry points. A broken install
    (an import raising something else than ImportError) counts as unavailable, with a warning."""
    import importlib
    import logging

    try:
        mod = importlib.import_module(TRITON_MODULE)
    except ImportError:
        return False
    except Exception as e:  # noqa: BLE001
        logging.getLogger(f"vllm.{__name__}").warning("SplitQ: importing %s failed (%r)", TRITON_MODULE, e)
        return False
    return hasattr(mod, "prepare_kernel_layer") and hasattr(mod, "splitq_linear_triton")


def select_backend(kron: tuple[int, int], scheme: SplitQScheme, device: torch.device) -> "Backend":
    """The first backend of SPLITQ_BACKEND's candidates that can implement the layer (module doc)."""
    import logging

    want = requested_backend()
    candidates = {
        "auto": [TritonBackend(), ReferenceBackend()],
        "triton": [TritonBackend(interpreter=True)],
        "reference": [ReferenceBackend()],
    }[want]
    passed_over = []
    for backend in candidates:
        ok, reason = backend.can_implement(kron, scheme, device)
        if ok:
            if passed_over:
                logging.getLogger(f"vllm.{__name__}").info(
                    "SplitQ: %s backend for a layer with kron %s on %s (%s)", backend.name, kron, device,
                    "; ".join(passed_over),
                )
            return backend
        passed_over.append(f"{backend.name} passed over: {reason}")
    raise RuntimeError(f"{ENV_BACKEND}={want}: no backend can run this layer ({'; '.join(passed_over)})")


class Backend:
    name = "?"

    def can_implement(self, kron: tuple[int, int], scheme: SplitQScheme, device: torch.device) -> tuple[bool, str]:
        raise NotImplementedError

    def prepare(self, layer: nn.Module, ref: SplitQLinear, scheme: SplitQScheme, shard: KShard | None = None) -> None:
        raise NotImplementedError

    def apply(self, layer: nn.Module, x: torch.Tensor, text_mask: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        raise NotImplementedError


# The reference runs as one opaque torch custom op: torch.compile (vLLM's inductor backend) and
# CUDA graphs see a single call with tensor inputs, as they will see the Triton kernels' ops,
# instead of tracing the reference's Python (which works too, but added ~55 s of inductor
# compilation on the tiny model). The persistent mask buffer's slice is an input of the op, so
# the in-place updates between steps are seen by the compiled graph.
_QUANTIZED_FIELDS = ("main_w", "text_w", "vision_w", "cws_down", "cws_up", "mac_down", "mac_up")
_TENSOR_FIELDS = tuple(f.name for f in fields(SplitQLinear) if f.name not in _QUANTIZED_FIELDS and f.name != "bias")


def _layout_of(ref: SplitQLinear) -> tuple[str, list[torch.Tensor]]:
    """A layer as (layout string, flat tensor list): `name` for a tensor field, `name:bits` for a
    quantized one (two tensors: codes, scale), absent fields left out."""
    parts, tensors = [], []
    for name in _TENSOR_FIELDS:
        v = getattr(ref, name)
        if v is not None:
            parts.append(name)
            tensors.append(v.contiguous())
    for name in _QUANTIZED_FIELDS:
        v: QuantizedTensor | None = getattr(ref, name)
        if v is not None:
            if v.zero is not None:
                raise ValueError(f"{name}: the format stores symmetric weights only")
            parts.append(f"{name}:{v.bits}")
            tensors += [v.codes.contiguous(), v.scale.contiguous()]
    return ",".join(parts), tensors


def _from_layout(layout: str, tensors: list[torch.Tensor], bias: torch.Tensor | None) -> SplitQLinear:
    kw: dict[str, object] = {name: None for name in (*_TENSOR_FIELDS, *_QUANTIZED_FIELDS)}
    it = iter(tensors)
    for part in layout.split(","):
        name, _, bits = part.partition(":")
        kw[name] = QuantizedTensor(next(it), next(it), None, int(bits)) if bits else next(it)
    return SplitQLinear(**kw, bias=bias)


@torch.library.custom_op("splitq::reference_linear", mutates_args=())
def reference_linear(
    x: torch.Tensor,
    text_mask: torch.Tensor,
    tensors: list[torch.Tensor],
    bias: torch.Tensor | None,
    layout: str,
    out_features: int,
    weight_bits: int,
    act_bits: int,
    aux_weight_bits: int,
    aux_act_bits: int,
    act_symmetric: bool,
    mac_rows: str,
    shard: list[int],
) -> torch.Tensor:
    """splitq_kernels.reference.splitq_linear(x, text_mask, layer, scheme) as a torch op; with
    shard = [rank, size, start, stop] (else []) splitq_linear_shard, the rank's partial output.
    SPLITQ_DECODE_MODE=w4a16: a step of <= 16 rows runs the W4A16 form (splitq_kernels.decode_mode);
    SPLITQ_PRECISION=bf16: the kernels' bf16 products (splitq_kernels.precision)."""
    scheme = SplitQScheme(weight_bits, act_bits, aux_weight_bits, aux_act_bits, act_symmetric, mac_rows)
    layer = _from_layout(layout, tensors, bias)
    return reference_linear_for_step(x, text_mask, layer, scheme, KShard(*shard) if shard else None)


@reference_linear.register_fake
def _(x, text_mask, tensors, bias, layout, out_features, *scheme_and_shard):
    return x.new_empty((*x.shape[:-1], out_features))


def _shard_args(shard: KShard | None) -> list[int]:
    return [] if shard is None else [shard.rank, shard.size, shard.start, shard.stop]


_PREFIX = "splitq_ref_"


class ReferenceBackend(Backend):
    """`splitq_kernels.reference.splitq_linear`, the one definition of the math, on any device.

    The SplitQLinear's tensors become non-persistent buffers of the layer (`splitq_ref_0`, ...;
    the layout string says which field each is); `apply` calls the `splitq::reference_linear` op
    with them, the mask slice and the layer's bias.
    """

    name = "reference"

    def can_implement(self, kron: tuple[int, int], scheme: SplitQScheme, device: torch.device) -> tuple[bool, str]:
        return True, ""

    def prepare(self, layer: nn.Module, ref: SplitQLinear, scheme: SplitQScheme, shard: KShard | None = None) -> None:
        layout, tensors = _layout_of(ref)
        for i, t in enumerate(tensors):
            layer.register_buffer(f"{_PREFIX}{i}", t, persistent=False)
        layer.splitq_ref_layout = layout
        layer.splitq_ref_count = len(tensors)
        layer.splitq_ref_out_features = ref.out_features
        layer.splitq_ref_shard = _shard_args(shard)
        layer.splitq_scheme = scheme

    def apply(self, layer: nn.Module, x: torch.Tensor, text_mask: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        s: SplitQScheme = layer.splitq_scheme
        tensors = [getattr(layer, f"{_PREFIX}{i}") for i in range(layer.splitq_ref_count)]
        return torch.ops.splitq.reference_linear(
            x, text_mask, tensors, bias, layer.splitq_ref_layout, layer.splitq_ref_out_features,
            s.weight_bits, s.act_bits, s.aux_weight_bits, s.aux_act_bits, s.act_symmetric, s.mac_rows,
            layer.splitq_ref_shard,
        )  # fmt: skip


class TritonBackend(Backend):
    """The Triton kernels: `splitq_kernels.ops.prepare_kernel_layer` once, then the
    `splitq::linear` custom op (kernel (a) + kernel (b)) per call.

    The kernel layer's tensors become non-persistent buffers of the vLLM layer (`splitq_kl_0`,
    ...), so `.to()`, torch.compile and CUDA graphs see them like the reference backend's; the
    op gets them with the layer's integer metadata. The bias goes into the kernel's epilogue (added
    in float32 before the output cast, as the reference does) unless vLLM asks for it separately
    (skip_bias_add: `apply` gets bias=None). On CUDA the float32 products run as tf32x3 (float32
    accuracy on tensor cores), or in bf16 under SPLITQ_PRECISION=bf16; on the CPU the kernels run
    in Triton's interpreter.
    """

    name = "triton"

    def __init__(self, interpreter: bool = False) -> None:
        self.interpreter = interpreter  # accept a CPU device (Triton's interpreter)

    def can_implement(self, kron: tuple[int, int], scheme: SplitQScheme, device: torch.device) -> tuple[bool, str]:
        if not triton_available():
            return False, f"the SplitQ Triton kernels ({TRITON_MODULE}) are not available in this installation"
        from splitq_kernels.support import can_implement

        return can_implement(kron, scheme, device, interpreter=self.interpreter)

    def prepare(self, layer: nn.Module, ref: SplitQLinear, scheme: SplitQScheme, shard: KShard | None = None) -> None:
        import logging

        from splitq_kernels.ops import KernelLayer, prepare_kernel_layer

        device = ref.main_w.codes.device
        if device.type != "cuda":
            from splitq_kernels.triton import use_interpreter

            logging.getLogger(f"vllm.{__name__}").warning(
                "SplitQ: %s=triton on %s: running the Triton kernels in Triton's CPU interpreter (slow: "
                "for tests)", ENV_BACKEND, device
            )
            use_interpreter()
        bias = getattr(layer, "bias", None)
        kl = prepare_kernel_layer(
            replace(ref, bias=None if bias is None else bias.data),
            scheme,
            device,
            precision=kernel_precision(device.type),  # SPLITQ_PRECISION: tf32x3 / ieee, or bf16
        )
        tensors = kl.tensors()
        for i, t in enumerate(tensors):
            if t is not None:
                layer.register_buffer(f"{_KL_PREFIX}{i}", t, persistent=False)
        layer.splitq_kl_present = [t is not None for t in tensors]
        layer.splitq_kl_bias_index = KernelLayer.tensor_index("bias") if bias is not None else None
        layer.splitq_kl_meta = kl.meta()
        layer.splitq_kl_precision = kl.precision
        layer.splitq_scheme = scheme
        layer.splitq_kl_shard = shard
        if shard is not None:  # kernel (b)'s view of the rank (splitq_kernels.shard)
            from splitq_kernels.shard import gemm_shard_layer

            gemm = gemm_shard_layer(kl, shard)
            layer.splitq_kl_gemm_present = [t is not None for t in gemm.tensors()]
            layer.splitq_kl_gemm_meta = gemm.meta()

    def apply(self, layer: nn.Module, x: torch.Tensor, text_mask: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        tensors = [getattr(layer, f"{_KL_PREFIX}{i}") if p else None for i, p in enumerate(layer.splitq_kl_present)]
        if bias is None and layer.splitq_kl_bias_index is not None:
            tensors[layer.splitq_kl_bias_index] = None  # skip_bias_add: the caller adds the bias
        shard = layer.splitq_kl_shard
        if shard is None:
            return torch.ops.splitq.linear(x, text_mask, tensors, layer.splitq_kl_meta, layer.splitq_kl_precision)
        from splitq_kernels.layout import KernelLayer
        from splitq_kernels.shard import splitq_linear_triton_shard

        kl = KernelLayer.from_op_args(tensors, layer.splitq_kl_meta, layer.splitq_kl_precision)
        gemm_tensors = [t if p else None for t, p in zip(tensors, layer.splitq_kl_gemm_present)]
        gemm = KernelLayer.from_op_args(gemm_tensors, layer.splitq_kl_gemm_meta, layer.splitq_kl_precision)
        return splitq_linear_triton_shard(x, text_mask, kl, gemm, shard)


_KL_PREFIX = "splitq_kl_"
