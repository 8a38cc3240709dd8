"""The published configs of the models users run (Qwen2.5-VL 3B/7B/32B/72B, LLaVA-1.5 7B/13B),
written once as data, and offline random-weight model directories of exactly those widths.

    from splitq_vllm.testing.published import PUBLISHED, build_published, linear_shapes
    linear_shapes("qwen2.5-vl-7b")["gate_up"]           # (3584, 37888)
    build_published("qwen2.5-vl-7b", "qwen7b-2l", layers=2)   # the real vocab and vision tower, 2 layers

The numbers are those of the releases' config.json files (Qwen/Qwen2.5-VL-*-Instruct,
llava-hf/llava-1.5-*-hf). A directory from `build_published` has the release's tensor names
(`model.layers.N...`, `visual.blocks...` for Qwen2.5-VL; llava-hf's `language_model.model...`,
`vision_tower.vision_model...`), random bf16 weights and this project's offline BPE tokenizer
(its special-token ids go into the config; the vocabulary size stays the release's). It is built
without ever holding the model in memory: the skeleton lives on the meta device and each tensor
is generated and streamed to its shard in chunks, so a 72B-width layer costs no more RAM than a
tiny one. Same arguments give byte-identical files.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal

import torch

from .models import (
    llava_hf_name,
    llava_processor,
    llava_tokenizer,
    qwen25vl_processor,
    qwen25vl_tokenizer,
    save_llava_side_files,
    save_qwen25vl_side_files,
)

Family = Literal["qwen2_5_vl", "llava"]


@dataclass(frozen=True)
class TextSpec:
    """The language model's config (the text_config of the release)."""

    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int
    rope_theta: float
    rms_eps: float
    tie_word_embeddings: bool
    max_positions: int

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads


@dataclass(frozen=True)
class QwenVisionSpec:
    """Qwen2.5-VL's window-attention ViT (the same 32-block tower in every size; the merger
    projects to the LM's hidden size)."""

    out_hidden: int
    intermediate: int = 3420
    depth: int = 32
    hidden: int = 1280
    heads: int = 16
    window_size: int = 112
    fullatt_block_indexes: tuple[int, ...] = (7, 15, 23, 31)
    spatial_merge: int = 2
    patch: int = 14
    temporal_patch: int = 2
    tokens_per_second: int = 2


@dataclass(frozen=True)
class ClipVisionSpec:
    """LLaVA-1.5's CLIP ViT-L/14-336 tower and its 2-layer GELU projector."""

    hidden: int = 1024
    intermediate: int = 4096
    layers: int = 24
    heads: int = 16
    image_size: int = 336
    patch: int = 14
    projection_dim: int = 768
    projector_act: str = "gelu"
    feature_layer: int = -2
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5

    @property
    def image_tokens(self) -> int:
        return (self.image_size // self.patch) ** 2


@dataclass(frozen=True)
class Published:
    """One released model's configuration."""

    name: str
    family: Family
    source: str  # the Hugging Face repository the numbers come from
    text: TextSpec
    vision: QwenVisionSpec | ClipVisionSpec
    qkv_bias: bool = False  # q/k/v projections with bias (Qwen2)

    def scaled(self, name: str, **text: int) -> Published:
        """A copy with other text widths (for tests: the same code path at small sizes)."""
        return replace(self, name=name, text=replace(self.text, **text))


def _qwen(name: str, source: str, hidden: int, intermediate: int, layers: int, heads: int, kv_heads: int,
          vocab: int, tie: bool, vision_intermediate: int) -> Published:  # fmt: skip
    return Published(
        name=name, family="qwen2_5_vl", source=source, qkv_bias=True,
        text=TextSpec(hidden, intermediate, layers, heads, kv_heads, vocab, rope_theta=1000000.0, rms_eps=1e-6,
                      tie_word_embeddings=tie, max_positions=128000),
        vision=QwenVisionSpec(out_hidden=hidden, intermediate=vision_intermediate),
    )  # fmt: skip


def _llava(name: str, source: str, hidden: int, intermediate: int, layers: int, heads: int) -> Published:
    return Published(
        name=name, family="llava", source=source,
        text=TextSpec(hidden, intermediate, layers, heads, heads, vocab=32064, rope_theta=10000.0, rms_eps=1e-5,
                      tie_word_embeddings=False, max_positions=4096),
        vision=ClipVisionSpec(),
    )  # fmt: skip


PUBLISHED: dict[str, Published] = {
    p.name: p
    for p in (
        _qwen("qwen2.5-vl-3b", "Qwen/Qwen2.5-VL-3B-Instruct", 2048, 11008, 36, 16, 2, 151936, True, 3420),
        _qwen("qwen2.5-vl-7b", "Qwen/Qwen2.5-VL-7B-Instruct", 3584, 18944, 28, 28, 4, 152064, False, 3420),
        _qwen("qwen2.5-vl-32b", "Qwen/Qwen2.5-VL-32B-Instruct", 5120, 27648, 64, 40, 8, 152064, False, 3456),
        _qwen("qwen2.5-vl-72b", "Qwen/Qwen2.5-VL-72B-Instruct", 8192, 29568, 80, 64, 8, 152064, False, 3456),
        _llava("llava-1.5-7b", "llava-hf/llava-1.5-7b-hf", 4096, 11008, 32, 32),
        _llava("llava-1.5-13b", "llava-hf/llava-1.5-13b-hf", 5120, 13824, 40, 40),
    )
}

# Scaled-down specs for tests: the same families and code path, widths a CPU runs in seconds
# (head_dim 32, the smallest vLLM's CPU attention takes). Not published models.
TEST_SPECS: dict[str, Published] = {
    "tiny-qwen2.5-vl": Published(
        name="tiny-qwen2.5-vl", family="qwen2_5_vl", source="(test spec)", qkv_bias=True,
        text=TextSpec(128, 320, 2, 4, 2, vocab=1024, rope_theta=1000000.0, rms_eps=1e-6,
                      tie_word_embeddings=False, max_positions=4096),
        vision=QwenVisionSpec(out_hidden=128, intermediate=128, depth=4, hidden=64, heads=2,
                              fullatt_block_indexes=(1, 3)),
    ),
    "tiny-llava-1.5": Published(
        name="tiny-llava-1.5", family="llava", source="(test spec)",
        text=TextSpec(128, 320, 2, 4, 4, vocab=1024, rope_theta=10000.0, rms_eps=1e-5,
                      tie_word_embeddings=False, max_positions=4096),
        vision=ClipVisionSpec(hidden=64, intermediate=128, layers=3, heads=2, image_size=112, projection_dim=64),
    ),
}  # fmt: skip

# The releases' special-token ids (published_config's default; build_published uses its tokenizer's)
RELEASE_TOKEN_IDS: dict[Family, dict[str, int]] = {
    "qwen2_5_vl": {"bos": 151643, "eos": 151645, "pad": 151643, "image": 151655, "video": 151656,
                   "vision_start": 151652, "vision_end": 151653},
    "llava": {"bos": 1, "eos": 2, "pad": 32001, "image": 32000},
}  # fmt: skip


def get_spec(name_or_spec: str | Published) -> Published:
    """A Published by name (PUBLISHED, then TEST_SPECS), or the spec itself."""
    if isinstance(name_or_spec, Published):
        return name_or_spec
    spec = PUBLISHED.get(name_or_spec) or TEST_SPECS.get(name_or_spec)
    if spec is None:
        raise ValueError(
            f"unknown model {name_or_spec!r}: published ones are {sorted(PUBLISHED)} (tests: {sorted(TEST_SPECS)})"
        )
    return spec


def linear_shapes(name_or_spec: str | Published) -> dict[str, tuple[int, int]]:
    """(in_features, out_features) of the LM's four linear-input groups: q/k/v and gate/up fused."""
    t = get_spec(name_or_spec).text
    q, kv = t.heads * t.head_dim, t.kv_heads * t.head_dim
    return {"qkv": (t.hidden, q + 2 * kv), "o": (q, t.hidden), "gate_up": (t.hidden, 2 * t.intermediate),
            "down": (t.intermediate, t.hidden)}  # fmt: skip


def mrope_section(head_dim: int) -> list[int]:
    """M-RoPE (temporal, height, width) sections in the release's 1:1.5:1.5 split of head_dim / 2
    ([16, 24, 24] at head_dim 128)."""
    t, h = head_dim // 8, 3 * head_dim // 16
    return [t, h, head_dim // 2 - t - h]


def text_config_kwargs(
    spec: str | Published, layers: int | None = None, token_ids: dict[str, int] | None = None
) -> dict:
    """The text_config keywords of `spec` (transformers' names) with `layers` decoder layers
    (default: the release's) and special-token ids (keys as in RELEASE_TOKEN_IDS; default: the release's)."""
    spec = get_spec(spec)
    t = spec.text
    ids = token_ids or RELEASE_TOKEN_IDS[spec.family]
    rope: dict = {"rope_type": "default", "rope_theta": t.rope_theta}
    if spec.family == "qwen2_5_vl":
        rope["mrope_section"] = mrope_section(t.head_dim)
    kw = dict(
        vocab_size=t.vocab, hidden_size=t.hidden, intermediate_size=t.intermediate,
        num_hidden_layers=t.layers if layers is None else layers, num_attention_heads=t.heads,
        num_key_value_heads=t.kv_heads, max_position_embeddings=t.max_positions, rms_norm_eps=t.rms_eps,
        tie_word_embeddings=t.tie_word_embeddings, bos_token_id=ids["bos"], eos_token_id=ids["eos"],
        pad_token_id=ids["pad"], rope_parameters=rope,
    )  # fmt: skip
    if spec.family == "llava":
        kw["model_type"] = "llama"
    return kw


def vision_config_kwargs(spec: str | Published) -> dict:
    """The vision_config keywords of `spec` (transformers' names)."""
    v = get_spec(spec).vision
    if isinstance(v, QwenVisionSpec):
        return dict(
            depth=v.depth, hidden_size=v.hidden, intermediate_size=v.intermediate, num_heads=v.heads,
            out_hidden_size=v.out_hidden, patch_size=v.patch, spatial_merge_size=v.spatial_merge,
            temporal_patch_size=v.temporal_patch, window_size=v.window_size,
            fullatt_block_indexes=list(v.fullatt_block_indexes), tokens_per_second=v.tokens_per_second,
        )  # fmt: skip
    return dict(
        model_type="clip_vision_model", hidden_size=v.hidden, intermediate_size=v.intermediate,
        num_hidden_layers=v.layers, num_attention_heads=v.heads, image_size=v.image_size, patch_size=v.patch,
        projection_dim=v.projection_dim, hidden_act=v.hidden_act, layer_norm_eps=v.layer_norm_eps,
    )  # fmt: skip


def published_config(spec: str | Published, layers: int | None = None, token_ids: dict[str, int] | None = None):
    """The transformers config of `spec` with `layers` decoder layers (default: the release's) and
    the given special-token ids (keys as in RELEASE_TOKEN_IDS; default: the release's)."""
    spec = get_spec(spec)
    ids = token_ids or RELEASE_TOKEN_IDS[spec.family]
    text, vision = text_config_kwargs(spec, layers, ids), vision_config_kwargs(spec)
    tie = spec.text.tie_word_embeddings
    if spec.family == "qwen2_5_vl":
        from transformers import Qwen2_5_VLConfig

        return Qwen2_5_VLConfig(
            text_config=text, vision_config=vision, image_token_id=ids["image"], video_token_id=ids["video"],
            vision_start_token_id=ids["vision_start"], vision_end_token_id=ids["vision_end"], tie_word_embeddings=tie,
        )  # fmt: skip
    from transformers import LlavaConfig

    assert isinstance(spec.vision, ClipVisionSpec)
    return LlavaConfig(
        vision_config=vision, text_config=text, image_token_index=ids["image"],
        vision_feature_layer=spec.vision.feature_layer, vision_feature_select_strategy="default",
        projector_hidden_act=spec.vision.projector_act, image_seq_length=spec.vision.image_tokens,
        tie_word_embeddings=tie,
    )  # fmt: skip


def meta_model(spec: str | Published, layers: int | None = None, token_ids: dict[str, int] | None = None):
    """The transformers model of `spec` on the meta device (shapes only, no memory), bf16."""
    from transformers import AutoModelForImageTextToText

    cfg = published_config(spec, layers, token_ids)
    with torch.device("meta"):
        return AutoModelForImageTextToText.from_config(cfg, dtype=torch.bfloat16)


# ---------------------------------------------------------------------------------------------
# Random weights, streamed to safetensors
# ---------------------------------------------------------------------------------------------

INIT_STD = 0.02  # linear, conv and embedding weights (transformers' initializer_range)
BIAS_STD = 0.01  # biases of linears and convs: small, not zero (q/k/v biases matter in Qwen)
CHUNK = 1 << 24  # elements generated at once (32 MiB of bf16): bounds the RAM of any tensor
_ST_DTYPES = {torch.bfloat16: "BF16", torch.float16: "F16", torch.float32: "F32"}


def file_tensors(model) -> list[tuple[str, str, torch.Tensor]]:
    """(name in the files, kind, meta tensor) in the order save_pretrained would write them.
    Names: transformers' own save mapping (Qwen2.5-VL releases' `model.layers.N...`, llava-hf's
    `language_model.model...`), CLIP towers renamed to llava-hf's `vision_tower.vision_model...`.
    kind: "ones" (norm weights), "zeros" (norm biases), "bias", "weight"."""
    from transformers.core_model_loading import revert_weight_conversion
    from transformers.modeling_utils import remove_tied_weights_from_state_dict

    state = remove_tied_weights_from_state_dict(model.state_dict(), model)
    origin = {id(t): name for name, t in state.items()}
    saved = revert_weight_conversion(model, state)
    llava = type(model).__name__.startswith("Llava")
    out = []
    for fname, t in saved.items():
        name = origin.get(id(t))
        if name is None:  # a converter built a new tensor: its source (and module) is unknown
            raise RuntimeError(f"{type(model).__name__}: cannot map saved tensor {fname!r} back to a parameter")
        module = model.get_submodule(name.rsplit(".", 1)[0])
        is_norm = isinstance(module, torch.nn.LayerNorm) or "Norm" in type(module).__name__
        leaf = name.rsplit(".", 1)[1]
        kind = ("ones" if leaf == "weight" else "zeros") if is_norm else ("bias" if leaf == "bias" else "weight")
        out.append((llava_hf_name(fname) if llava else fname, kind, t))
    return out


def stable_seed(seed: int, name: str) -> int:
    """A per-tensor seed that depends only on (seed, name): not on Python's hash or tensor order."""
    return int.from_bytes(hashlib.sha256(f"{seed}/{name}".encode()).digest()[:8], "little") & ((1 << 63) - 1)


def _tensor_chunks(name: str, kind: str, numel: int, dtype: torch.dtype, seed: int):
    gen = torch.Generator().manual_seed(stable_seed(seed, name))
    for start in range(0, numel, CHUNK):
        n = min(CHUNK, numel - start)
        if kind == "ones":
            t = torch.ones(n, dtype=dtype)
        elif kind == "zeros":
            t = torch.zeros(n, dtype=dtype)
        else:
            t = torch.empty(n, dtype=dtype).normal_(0.0, BIAS_STD if kind == "bias" else INIT_STD, generator=gen)
        yield t.view(torch.uint8).numpy()


def _plan_shards(tensors: list[tuple[str, str, torch.Tensor]], shard_bytes: int) -> list[list[int]]:
    """Consecutive tensors per shard, at most shard_bytes each (a bigger tensor gets its own)."""
    shards: list[list[int]] = [[]]
    size = 0
    for i, (_, _, t) in enumerate(tensors):
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(i)
        size += nbytes
    return shards


def write_random_shards(tensors: list[tuple[str, str, torch.Tensor]], out: Path, seed: int, shard_bytes: int) -> int:
    """Write the tensors as safetensors shards plus model.safetensors.index.json, generating each
    tensor chunk by chunk straight into its file. Returns the total bytes of tensor data."""
    shards = _plan_shards(tensors, shard_bytes)
    weight_map: dict[str, str] = {}
    total = 0
    for s, members in enumerate(shards):
        fname = f"model-{s + 1:05d}-of-{len(shards):05d}.safetensors"
        header: dict[str, object] = {"__metadata__": {"format": "pt"}}
        offset = 0
        for i in members:
            name, _, t = tensors[i]
            nbytes = t.numel() * t.element_size()
            header[name] = {
                "dtype": _ST_DTYPES[t.dtype],
                "shape": list(t.shape),
                "data_offsets": [offset, offset + nbytes],
            }
            offset += nbytes
            weight_map[name] = fname
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned
        with open(out / fname, "wb") as fh:
            fh.write(len(raw).to_bytes(8, "little"))
            fh.write(raw)
            for i in members:
                name, kind, t = tensors[i]
                for chunk in _tensor_chunks(name, kind, t.numel(), t.dtype, seed):
                    fh.write(memoryview(chunk))
        total += offset
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    return total


def build_published(
    name_or_spec: str | Published,
    out_dir: str | os.PathLike,
    layers: int,
    seed: int = 0,
    shard_bytes: int = 2**31,
    min_pixels: int = 56 * 56,
    max_pixels: int = 1024 * 28 * 28,
) -> Path:
    """Write a random-weight model directory of `name_or_spec`'s widths with `layers` decoder
    layers to `out_dir` (which must not exist or be empty): config.json, safetensors shards of at
    most `shard_bytes` with their index, tokenizer, processor, chat template, generation config.

    Written in a temporary sibling directory and renamed at the end, so an interrupted build never
    leaves a directory that looks complete. Qwen2.5-VL: images between min_pixels and max_pixels
    (default up to 1024 image tokens; 224x224 gives 64); LLaVA: resize and crop to the tower's 336.
    """
    spec = get_spec(name_or_spec)
    if layers < 1:
        raise ValueError(f"layers must be >= 1, got {layers}")
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out} exists and is not empty: build_published writes a new directory")
    if spec.family == "qwen2_5_vl":
        tokenizer, special, tok_vocab = qwen25vl_tokenizer()
        ids = {"bos": special["<|endoftext|>"], "eos": special["<|im_end|>"], "pad": special["<|endoftext|>"],
               "image": special["<|image_pad|>"], "video": special["<|video_pad|>"],
               "vision_start": special["<|vision_start|>"], "vision_end": special["<|vision_end|>"]}  # fmt: skip
    else:
        tokenizer, special, tok_vocab = llava_tokenizer()
        ids = {"bos": special["<s>"], "eos": special["</s>"], "pad": special["<pad>"], "image": special["<image>"]}
    if tok_vocab > spec.text.vocab:
        raise ValueError(f"{spec.name}: vocab {spec.text.vocab} is smaller than the tokenizer's {tok_vocab}")
    model = meta_model(spec, layers, ids)
    tmp = out.parent / f".{out.name}.building-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    try:
        write_random_shards(file_tensors(model), tmp, seed, shard_bytes)
        model.config.architectures = [type(model).__name__]
        model.config.save_pretrained(tmp)
        if spec.family == "qwen2_5_vl":
            processor = qwen25vl_processor(tokenizer, min_pixels, max_pixels)
            save_qwen25vl_side_files(tmp, processor, tokenizer, special)
        else:
            assert isinstance(spec.vision, ClipVisionSpec)
            save_llava_side_files(tmp, llava_processor(tokenizer, spec.vision.image_size), tokenizer, special)
        if out.exists():
            out.rmdir()  # empty (checked above)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
