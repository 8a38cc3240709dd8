"""Which rows of a forward pass are text: one persistent mask buffer, filled before every step.

vLLM's model runner (v1 `GPUModelRunner._preprocess`, which the CPU runner inherits, and the v2
runner's encoder runner) calls `model.embed_input_ids(input_ids, multimodal_embeddings,
is_multimodal=...)` before every forward of a multimodal model: prefill, decode, chunked prefill,
several requests per batch; `is_multimodal` marks the scheduled tokens whose embeddings come from
the vision encoder. After that the model gets `inputs_embeds` only, so nothing else tells a
linear layer which rows are image tokens.

`install_embed_hook` wraps `SupportsMultiModal.embed_input_ids` (the implementation Qwen2.5-VL and
LLaVA use) so that it also writes `~is_multimodal` into the model's SplitQ mask buffer: rows
[0, n) get the step's mask, rows [n, end) (padding for CUDA graphs / compiled sizes) are set to
text. The buffer is one bool tensor shared by every SplitQ layer of the model (registered on each
as a non-persistent buffer): `apply` slices `buf[:num_rows]` and selects with `torch.where`, no
data-dependent control flow, so torch.compile traces it once and a CUDA graph replays it (the
buffer's address never changes; its content is updated in place outside the graph).

The same rule as the transformers loader (`splitq_vllm.hf.model`): a row is vision
when its embedding came from the vision tower (the image/video placeholder tokens), text
otherwise; every decoded token is text. A model that never calls `embed_input_ids` (a text-only
model) keeps the initial all-text mask.

`SPLITQ_TEXT_MASK` overrides the mask for ablations: `tokens` (default, the rule above), `text`
(every row text: MAC on every row, like `mac_rows: "all"`), `vision` (every row vision: the MAC
branch off for `mac_rows: "text"`) without re-exporting the checkpoint.
"""

from __future__ import annotations

import functools

import torch

from .env import env_choice

ENV_MASK = "SPLITQ_TEXT_MASK"
MASK_MODES = ("tokens", "text", "vision")
BUFFER_NAME = "splitq_text_mask"
_HOOK_FLAG = "_splitq_text_mask_hook"
_MODEL_CACHE = "_splitq_text_mask_buffers"


def mask_mode() -> str:
    return env_choice(ENV_MASK, MASK_MODES, "tokens")


def new_mask_buffer(rows: int, device: torch.device | str | None = None) -> torch.Tensor:
    """The shared mask buffer: `rows` rows, all text (or all vision under SPLITQ_TEXT_MASK=vision)."""
    return torch.full((rows,), mask_mode() != "vision", dtype=torch.bool, device=device)


def write_mask(buf: torch.Tensor, num_tokens: int, is_multimodal: torch.Tensor | None, mode: str) -> None:
    """buf[:num_tokens] = not multimodal (per `mode`), buf[num_tokens:] = the default (text)."""
    if num_tokens > buf.numel():
        raise RuntimeError(
            f"SplitQ text mask: a step with {num_tokens} tokens, but the mask buffer has {buf.numel()} rows "
            "(sized from max_num_batched_tokens at start-up)"
        )
    if mode == "tokens" and is_multimodal is not None:
        if is_multimodal.numel() != num_tokens:
            raise RuntimeError(
                f"SplitQ text mask: is_multimodal has {is_multimodal.numel()} rows for {num_tokens} input ids"
            )
        rows = buf[:num_tokens]
        rows.copy_(is_multimodal.reshape(-1), non_blocking=True)  # from the runner's pinned CPU mask
        rows.logical_not_()
        buf[num_tokens:].fill_(True)
    else:
        buf.fill_(mode != "vision")


def model_mask_buffers(model: torch.nn.Module) -> list[torch.Tensor]:
    """The distinct SplitQ mask buffers of `model` (found once, then cached on the model)."""
    cached = model.__dict__.get(_MODEL_CACHE)
    if cached is None:
        seen: dict[int, torch.Tensor] = {}
        for module in model.modules():
            buf = module._buffers.get(BUFFER_NAME)
            if buf is not None:
                seen.setdefault(id(buf), buf)
        cached = list(seen.values())
        model.__dict__[_MODEL_CACHE] = cached
    return cached


def _mask_writing(original):
    """`embed_input_ids` that also writes the step's text mask into the model's SplitQ buffers."""

    @functools.wraps(original)
    def embed_input_ids(self, input_ids, multimodal_embeddings=None, *, is_multimodal=None):
        out = original(self, input_ids, multimodal_embeddings, is_multimodal=is_multimodal)
        buffers = model_mask_buffers(self)
        if buffers:
            mode = mask_mode()
            for buf in buffers:
                write_mask(buf, input_ids.shape[0], is_multimodal, mode)
        return out

    setattr(embed_input_ids, _HOOK_FLAG, True)
    return embed_input_ids


def install_embed_hook() -> None:
    """Wrap SupportsMultiModal.embed_input_ids to fill the mask (idempotent)."""
    from vllm.model_executor.models.interfaces import SupportsMultiModal

    if not getattr(SupportsMultiModal.embed_input_ids, _HOOK_FLAG, False):
        SupportsMultiModal.embed_input_ids = _mask_writing(SupportsMultiModal.embed_input_ids)


def check_model_class(model_cls: type) -> None:
    """Refuse a model class of no supported family (splitq_vllm.families), and one whose
    embed_input_ids bypasses the hook (its mask would be wrong). A family whose vLLM class has its
    own embed_input_ids (`own_embed_input_ids`) gets that method wrapped here (idempotent)."""
    from vllm.model_executor.models.interfaces import supports_multimodal

    from splitq_vllm.families import family_of_vllm

    try:
        family = family_of_vllm(model_cls)
    except ValueError as e:
        raise NotImplementedError(f"SplitQ: {e}") from None
    if family.own_embed_input_ids and not getattr(model_cls.embed_input_ids, _HOOK_FLAG, False):
        model_cls.embed_input_ids = _mask_writing(model_cls.embed_input_ids)
    if supports_multimodal(model_cls) and not getattr(model_cls.embed_input_ids, _HOOK_FLAG, False):
        raise NotImplementedError(
            f"SplitQ: {model_cls.__name__} ({family.name}) overrides embed_input_ids, so the SplitQ text/vision "
            "token mask would not be updated for its forward passes (mark the family own_embed_input_ids in "
            "splitq_vllm/families.py once its method's is_multimodal is checked)"
        )
