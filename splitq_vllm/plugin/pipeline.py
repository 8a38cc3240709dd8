"""Pipeline parallelism: the step's text mask travels with the intermediate tensors.

vLLM runs `embed_input_ids` (where text_mask.py fills the mask) on the first pipeline stage only;
later stages get the previous stage's IntermediateTensors (hidden_states, residual) and, in the V2
model runner (the default on CUDA), not even the token ids. So the mask is sent along: one more
entry, `splitq_text_mask` (uint8 [T], 1 = text), in the IntermediateTensors of every stage but
the last. Both model runners (V1, used on the CPU, and V2) allocate the receiving buffers from the
model's `make_empty_intermediate_tensors` and copy every entry of it each step, and the workers
send every entry, so the extra entry rides the existing transport: T bytes per step against the
2 x T x hidden x 2 bytes of the hidden states and residual.

Why not rebuild the mask on each stage from the scheduler's multimodal positions: that needs a
patch of each model runner's private input preparation (V1 `_preprocess`, V2 `prepare_inputs`);
the model interface used here is the same for both.

`install_pipeline_relay` (from a wrapper of vLLM's BaseModelLoader.load_model, once the model is
built, when --pipeline-parallel-size > 1 and the checkpoint is SplitQ):
- registers the shared mask buffer on the model root too (so that a stage is relayed even with no
  SplitQ layer of its own, and the embed hook of the first stage fills it);
- wraps `make_empty_intermediate_tensors` to add the entry;
- a forward pre-hook: when the model gets intermediate tensors with the entry, copies it into the
  mask buffer (one device copy between persistent buffers: CUDA-graph safe, no branch on data)
  and passes the intermediate tensors on without it;
- a forward hook: when the model returns IntermediateTensors (not the last stage), adds a copy of
  the mask rows (a copy: the buffer is rewritten by the next step while the send may be in flight).
"""

from __future__ import annotations

import functools

import torch

from .text_mask import BUFFER_NAME

KEY = "splitq_text_mask"
_LOADER_FLAG = "_splitq_pipeline_relay"


def _intermediate(args: tuple, kwargs: dict):
    if "intermediate_tensors" in kwargs:
        return kwargs["intermediate_tensors"], True
    return (args[2] if len(args) > 2 else None), False


def install_pipeline_relay(model: torch.nn.Module, mask: torch.Tensor) -> None:
    """Make `model` send and receive the text mask with its intermediate tensors (module doc)."""
    from vllm.sequence import IntermediateTensors

    if BUFFER_NAME not in model._buffers:
        model.register_buffer(BUFFER_NAME, mask, persistent=False)
    make_empty = model.make_empty_intermediate_tensors

    def make_empty_intermediate_tensors(batch_size: int, dtype: torch.dtype, device: torch.device):
        it = make_empty(batch_size, dtype, device)
        it.tensors[KEY] = torch.ones(batch_size, dtype=torch.uint8, device=device)
        return it

    model.make_empty_intermediate_tensors = make_empty_intermediate_tensors

    def receive(module, args, kwargs):
        it, by_keyword = _intermediate(args, kwargs)
        if it is None or KEY not in it.tensors:
            return None
        rows = it.tensors[KEY]
        if rows.shape[0] > mask.numel():
            raise RuntimeError(
                f"SplitQ text mask: {rows.shape[0]} rows from the previous pipeline stage, the buffer has {mask.numel()}"
            )
        mask[: rows.shape[0]].copy_(rows.to(torch.bool), non_blocking=True)
        rest = IntermediateTensors({k: v for k, v in it.tensors.items() if k != KEY})
        if by_keyword:
            return args, {**kwargs, "intermediate_tensors": rest}
        return (*args[:2], rest, *args[3:]), kwargs

    def send(module, args, kwargs, output):
        if isinstance(output, IntermediateTensors):
            n = next(iter(output.tensors.values())).shape[0]
            output.tensors[KEY] = mask[:n].to(torch.uint8)
        return output

    model.register_forward_pre_hook(receive, with_kwargs=True)
    model.register_forward_hook(send, with_kwargs=True)


def install_loader_hook() -> None:
    """Wrap BaseModelLoader.load_model to install the relay on SplitQ models served with PP > 1
    (idempotent)."""
    from vllm.model_executor.model_loader.base_loader import BaseModelLoader

    original = BaseModelLoader.load_model
    if getattr(original, _LOADER_FLAG, False):
        return

    @functools.wraps(original)
    def load_model(self, vllm_config, model_config, *args, **kwargs):
        model = original(self, vllm_config, model_config, *args, **kwargs)
        from .config import SplitQVllmConfig

        quant = vllm_config.quant_config
        if isinstance(quant, SplitQVllmConfig) and vllm_config.parallel_config.pipeline_parallel_size > 1:
            device = next(iter(model.parameters())).device
            install_pipeline_relay(model, quant.text_mask_buffer(vllm_config, device))
        return model

    setattr(load_model, _LOADER_FLAG, True)
    BaseModelLoader.load_model = load_model
