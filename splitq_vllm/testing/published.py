"""The published configs of the models users run, written once as data, and offline
random-weight model directories of exactly those widths.

    from splitq_vllm.testing.published import PUBLISHED, build_published, linear_shapes
    linear_shapes("qwen2.5-vl-7b")["gate_up"]           # (3584, 37888)
    build_published("qwen2.5-vl-7b", "qwen7b-2l", layers=2)   # the real vocab and vision tower, 2 layers

Families and sizes: Qwen2.5-VL 3B/7B/32B/72B, Qwen2-VL 2B/7B, Qwen3-VL (dense) 2B/4B/8B/32B,
Gemma 3 4B/12B/27B, Qwen3.5 (dense) 0.8B/4B/9B/27B, LLaVA-1.5 7B/13B. The numbers are those of
the releases' config.json files; each entry says where they were checked (the files' own text as
vendored by other projects' tests and model copies: no model hub here). Where a release's
config.json leaves a field out, transformers' default is what the release runs with, and that is
what is written here (e.g. Gemma 3's vocabulary, 262208).

A directory from `build_published` has the release's tensor names (`model.layers.N...`,
`visual.blocks...` for Qwen2.5-VL and Qwen2-VL; `model.language_model...`, `model.visual...` for
Qwen3-VL and Qwen3.5; llava-hf's and Gemma 3's `language_model.model...`,
`vision_tower.vision_model...`), random bf16 weights and this project's offline BPE tokenizer of
the family (its special-token ids go into the config; the vocabulary size stays the release's).
It is built without ever holding the model in memory: the skeleton lives on the meta device and
each tensor is generated and streamed to its shard in chunks, so a 72B-width layer costs no more
RAM than a tiny one. Same arguments give byte-identical files. With `layers` below the release's,
the decoder layers are the release's first ones (their types too: Gemma 3's first five are
sliding-window layers, Qwen3.5's first three Gated DeltaNet layers).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal

import torch

from .models import (
    gemma3_processor,
    gemma3_tokenizer,
    llava_hf_name,
    llava_processor,
    llava_tokenizer,
    qwen3vl_processor,
    qwen25vl_processor,
    qwen25vl_tokenizer,
    save_gemma3_side_files,
    save_llava_side_files,
    save_qwen25vl_side_files,
)

# The config's model_type of each family
Family = Literal["qwen2_5_vl", "qwen2_vl", "qwen3_vl", "gemma3", "qwen3_5", "llava"]
QWEN_STYLE: tuple[Family, ...] = ("qwen2_5_vl", "qwen2_vl", "qwen3_vl", "qwen3_5")  # Qwen tokenizer and processor


@dataclass(frozen=True)
class SlidingWindow:
    """Gemma 3's local attention: every `pattern`-th layer attends fully, the others within
    `window` tokens with their own rotary base; the full layers' rotary is linearly scaled."""

    window: int = 1024
    pattern: int = 6
    local_rope_theta: float = 10000.0
    full_rope_linear_factor: float | None = 8.0
    query_pre_attn_scalar: int = 256  # the attention scale is query_pre_attn_scalar ** -0.5


@dataclass(frozen=True)
class LinearAttention:
    """Qwen3.5's Gated DeltaNet layers: every `full_attention_interval`-th layer is a (gated)
    full-attention layer, the others linear attention with a fixed-size state instead of a KV
    cache (per layer: value_heads x key_head_dim x value_head_dim, plus the convolution's last
    conv_kernel - 1 inputs of q, k and v)."""

    value_heads: int
    key_heads: int = 16
    key_head_dim: int = 128
    value_head_dim: int = 128
    conv_kernel: int = 4
    full_attention_interval: int = 4

    @property
    def key_dim(self) -> int:
        return self.key_heads * self.key_head_dim

    @property
    def value_dim(self) -> int:
        return self.value_heads * self.value_head_dim


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
    # the config's head_dim where it is not hidden // heads (Qwen3-VL, Gemma 3, Qwen3.5)
    explicit_head_dim: int | None = None
    partial_rotary_factor: float = 1.0  # Qwen3.5 rotates a quarter of each head
    attn_output_gate: bool = False  # Qwen3.5: q_proj outputs the query and a gate (twice the width)
    sliding: SlidingWindow | None = None  # Gemma 3
    linear_attention: LinearAttention | None = None  # Qwen3.5

    @property
    def head_dim(self) -> int:
        return self.explicit_head_dim or self.hidden // self.heads

    def layer_types(self, layers: int | None = None) -> list[str] | None:
        """The first `layers` (default: all) decoder layers' types, as config.layer_types; None
        where every layer is full attention."""
        n = self.layers if layers is None else layers
        if self.sliding is not None:
            return ["full_attention" if (i + 1) % self.sliding.pattern == 0 else "sliding_attention" for i in range(n)]
        if self.linear_attention is not None:
            k = self.linear_attention.full_attention_interval
            return ["full_attention" if (i + 1) % k == 0 else "linear_attention" for i in range(n)]
        return None


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
class Qwen2VisionSpec:
    """Qwen2-VL's ViT (LayerNorm, fc1/fc2 MLP of mlp_ratio x embed_dim, full attention in every
    block; `out_hidden` is the config's vision hidden_size: the merger's output, the LM's width)."""

    out_hidden: int
    embed_dim: int = 1280
    depth: int = 32
    heads: int = 16
    mlp_ratio: int = 4
    spatial_merge: int = 2
    patch: int = 14
    temporal_patch: int = 2


@dataclass(frozen=True)
class Qwen3VisionSpec:
    """Qwen3-VL's and Qwen3.5's ViT (16 px patches, learned position embeddings interpolated to
    the image, 2x2 merge); Qwen3-VL's deepstack taps `deepstack` blocks (Qwen3.5: none)."""

    out_hidden: int
    depth: int = 27
    hidden: int = 1152
    intermediate: int = 4304
    heads: int = 16
    deepstack: tuple[int, ...] = (8, 16, 24)
    num_position_embeddings: int = 2304  # a 48 x 48 grid
    spatial_merge: int = 2
    patch: int = 16
    temporal_patch: int = 2


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
class SiglipVisionSpec:
    """Gemma 3's SigLIP So400m tower at 896 px (64 x 64 patches, no pooling head), average-pooled
    to `tokens_per_image` tokens and projected by an RMSNorm + matrix."""

    hidden: int = 1152
    intermediate: int = 4304
    layers: int = 27
    heads: int = 16
    image_size: int = 896
    patch: int = 14
    tokens_per_image: int = 256
    layer_norm_eps: float = 1e-6


VisionSpec = QwenVisionSpec | Qwen2VisionSpec | Qwen3VisionSpec | ClipVisionSpec | SiglipVisionSpec


@dataclass(frozen=True)
class Published:
    """One released model's configuration."""

    name: str
    family: Family
    source: str  # the Hugging Face repository the numbers come from
    text: TextSpec
    vision: VisionSpec
    qkv_bias: bool = False  # q/k/v projections with bias (Qwen2)

    def scaled(self, name: str, vision: VisionSpec | None = None, **text: Any) -> Published:
        """A copy with other text widths (TextSpec fields) and optionally another vision tower
        (for tests: the same code path at small sizes)."""
        return replace(self, name=name, text=replace(self.text, **text), vision=vision or self.vision)


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


def _qwen2vl(name: str, source: str, hidden: int, intermediate: int, layers: int, heads: int, kv_heads: int,
             vocab: int, tie: bool) -> Published:  # fmt: skip
    # rope_theta 1e6, rms_norm_eps 1e-6, max_position_embeddings 32768, M-RoPE [16, 24, 24]; the
    # tower: embed_dim 1280, depth 32, 16 heads, mlp_ratio 4, its hidden_size the LM's
    return Published(
        name=name, family="qwen2_vl", source=source, qkv_bias=True,
        text=TextSpec(hidden, intermediate, layers, heads, kv_heads, vocab, rope_theta=1000000.0, rms_eps=1e-6,
                      tie_word_embeddings=tie, max_positions=32768),
        vision=Qwen2VisionSpec(out_hidden=hidden),
    )  # fmt: skip


def _qwen3vl(name: str, source: str, hidden: int, intermediate: int, layers: int, heads: int, tie: bool,
             vision: Qwen3VisionSpec) -> Published:  # fmt: skip
    # every size: head_dim 128, 8 KV heads, vocab 151936, rope_theta 5e6, interleaved M-RoPE
    # [24, 20, 20], rms_norm_eps 1e-6, max_position_embeddings 262144, no q/k/v bias
    return Published(
        name=name, family="qwen3_vl", source=source,
        text=TextSpec(hidden, intermediate, layers, heads, 8, vocab=151936, rope_theta=5000000.0, rms_eps=1e-6,
                      tie_word_embeddings=tie, max_positions=262144, explicit_head_dim=128),
        vision=vision,
    )  # fmt: skip


def _gemma3(name: str, source: str, hidden: int, intermediate: int, layers: int, heads: int, kv_heads: int,
            head_dim: int, query_pre_attn_scalar: int) -> Published:  # fmt: skip
    # every size: vocab 262208, rope_theta 1e6 (full layers, linear scaling x8), 10000 (local
    # layers), sliding window 1024 with every 6th layer global, rms_norm_eps 1e-6,
    # max_position_embeddings 131072, tied embeddings; the same SigLIP tower, 256 tokens per image
    return Published(
        name=name, family="gemma3", source=source,
        text=TextSpec(hidden, intermediate, layers, heads, kv_heads, vocab=262208, rope_theta=1000000.0, rms_eps=1e-6,
                      tie_word_embeddings=True, max_positions=131072, explicit_head_dim=head_dim,
                      sliding=SlidingWindow(query_pre_attn_scalar=query_pre_attn_scalar)),
        vision=SiglipVisionSpec(),
    )  # fmt: skip


def _qwen35(name: str, source: str, hidden: int, intermediate: int, layers: int, heads: int, kv_heads: int,
            linear_value_heads: int, tie: bool, vision: Qwen3VisionSpec) -> Published:  # fmt: skip
    # every size: vocab 248320, head_dim 256, gated q_proj (attn_output_gate), partial rotary 0.25
    # with interleaved M-RoPE [11, 11, 10], rope_theta 1e7, rms_norm_eps 1e-6,
    # max_position_embeddings 262144; Gated DeltaNet: 16 key heads, key/value head dim 128, conv
    # kernel 4, every 4th layer full attention. The release's MTP layer (mtp.*) is not built:
    # transformers and this project's pipeline do not run it.
    return Published(
        name=name, family="qwen3_5", source=source,
        text=TextSpec(hidden, intermediate, layers, heads, kv_heads, vocab=248320, rope_theta=10000000.0,
                      rms_eps=1e-6, tie_word_embeddings=tie, max_positions=262144, explicit_head_dim=256,
                      partial_rotary_factor=0.25, attn_output_gate=True,
                      linear_attention=LinearAttention(value_heads=linear_value_heads)),
        vision=vision,
    )  # fmt: skip


# Qwen3-VL's two towers: 2B/4B a 24-block 1024-wide one tapped at blocks 5, 11, 17; 8B/32B the
# 27-block 1152-wide one tapped at 8, 16, 24 (Qwen3.5's towers: the same without deepstack).
def _qwen3_tower_small(out_hidden: int, deepstack: tuple[int, ...] = (5, 11, 17)) -> Qwen3VisionSpec:
    return Qwen3VisionSpec(out_hidden, depth=24, hidden=1024, intermediate=4096, heads=16, deepstack=deepstack)


PUBLISHED: dict[str, Published] = {
    p.name: p
    for p in (
        _qwen("qwen2.5-vl-3b", "Qwen/Qwen2.5-VL-3B-Instruct", 2048, 11008, 36, 16, 2, 151936, True, 3420),
        _qwen("qwen2.5-vl-7b", "Qwen/Qwen2.5-VL-7B-Instruct", 3584, 18944, 28, 28, 4, 152064, False, 3420),
        _qwen("qwen2.5-vl-32b", "Qwen/Qwen2.5-VL-32B-Instruct", 5120, 27648, 64, 40, 8, 152064, False, 3456),
        _qwen("qwen2.5-vl-72b", "Qwen/Qwen2.5-VL-72B-Instruct", 8192, 29568, 80, 64, 8, 152064, False, 3456),
        # Qwen2-VL, checked against the config.json text of huggingface.co/Qwen/Qwen2-VL-2B-Instruct-AWQ
        # and onnx-community/Qwen2-VL-2B-Instruct (_name_or_path Qwen/Qwen2-VL-2B-Instruct), and for
        # 7B the language model of huggingface.co/Efficient-Large-Model/Qwen2-VL-7B-Instruct and the
        # tower of menglc/DFN-Huge-Qwen2VL-7B (embed_dim 1280, depth 32, mlp_ratio 4, hidden 3584)
        _qwen2vl("qwen2-vl-2b", "Qwen/Qwen2-VL-2B-Instruct", 1536, 8960, 28, 12, 2, 151936, True),
        _qwen2vl("qwen2-vl-7b", "Qwen/Qwen2-VL-7B-Instruct", 3584, 18944, 28, 28, 4, 152064, False),
        # Qwen3-VL dense. 2B: an inference engine's defaults "aligned with config.json" and a
        # test fixture (hidden 2048, MLP 6144, 28 layers, 16 heads, tied; tower 24 x 1024 -> 2048);
        # 4B: two vendored copies of config.json (TensorRT-Edge/Rust test fixtures: 2560, 9728, 36
        # layers, 32 heads, tied; tower -> 2560); 8B: TensorRT-LLM's test_modeling_qwen3vl
        # (QWEN3_VL_8B_CONFIG, _name_or_path Qwen3-VL-8B-Instruct) and a Swift test's config.json;
        # 32B: huggingface.co/quanliang/F1 config.json (a Qwen3-VL-32B fine-tune) and a text
        # encoder's shipped config.json (5120, 25600, 64 layers, 64 heads, untied; tower -> 5120)
        _qwen3vl("qwen3-vl-2b", "Qwen/Qwen3-VL-2B-Instruct", 2048, 6144, 28, 16, True, _qwen3_tower_small(2048)),
        _qwen3vl("qwen3-vl-4b", "Qwen/Qwen3-VL-4B-Instruct", 2560, 9728, 36, 32, True, _qwen3_tower_small(2560)),
        _qwen3vl("qwen3-vl-8b", "Qwen/Qwen3-VL-8B-Instruct", 4096, 12288, 36, 32, False, Qwen3VisionSpec(4096)),
        _qwen3vl("qwen3-vl-32b", "Qwen/Qwen3-VL-32B-Instruct", 5120, 25600, 64, 64, False, Qwen3VisionSpec(5120)),
        # Gemma 3. 27B: TensorRT-LLM's test_modeling_gemma3 (GEMMA3_27B_CONFIG, the release's
        # config.json with fewer layers: head_dim 128, query_pre_attn_scalar 168, 32/16 heads,
        # SigLIP 1152 x 27 at 896 px, mm_tokens_per_image 256) and a mapper test citing
        # google/gemma-3-27b-it/config.json; 4B and 12B: a Rust test of gemma-3-4b's text config
        # (2560, 10240, 34 layers, 8/4 heads, head_dim 256, query_pre_attn_scalar 256, window
        # 1024, pattern 6, linear rope x8) and a model registry's gemma3-12b entry (3840, 15360,
        # 48 layers, 16/8 heads, head_dim 256, vocab 262208); 27B is the only size whose
        # query_pre_attn_scalar differs from head_dim (said by the mapper test)
        _gemma3("gemma-3-4b", "google/gemma-3-4b-it", 2560, 10240, 34, 8, 4, 256, 256),
        _gemma3("gemma-3-12b", "google/gemma-3-12b-it", 3840, 15360, 48, 16, 8, 256, 256),
        _gemma3("gemma-3-27b", "google/gemma-3-27b-it", 5376, 21504, 62, 32, 16, 128, 168),
        # Qwen3.5 dense (0.8B, 4B, 9B, 27B). Text: a packer's SUPPORTED_MODELS "that exactly
        # match" the official configs (0.8B, 4B, 9B: hidden, MLP, layers, heads, KV heads,
        # linear value heads, tie) and, for 0.8B/9B, a benchmark's "dimensions from official
        # config.json" with the towers (0.8B: 12 x 768, MLP 3072, 12 heads -> 1024; 9B: 27 x 1152
        # -> 4096); 4B's tower (24 x 1024, MLP 4096, 16 heads -> 2560) from two vendored
        # config.json copies; 27B from a vendored text_config (5120, 17408, 64 layers, 24/4
        # heads, 48 linear value heads) and an exported vision_config (27 x 1152 -> 5120).
        # Qwen3.5-2B is left out: its linear-attention and tower numbers were not found to check.
        _qwen35("qwen3.5-0.8b", "Qwen/Qwen3.5-0.8B", 1024, 3584, 24, 8, 2, 16, True,
                Qwen3VisionSpec(1024, depth=12, hidden=768, intermediate=3072, heads=12, deepstack=())),
        _qwen35("qwen3.5-4b", "Qwen/Qwen3.5-4B", 2560, 9216, 32, 16, 4, 32, True, _qwen3_tower_small(2560, ())),
        _qwen35("qwen3.5-9b", "Qwen/Qwen3.5-9B", 4096, 12288, 32, 16, 4, 32, False, Qwen3VisionSpec(4096, deepstack=())),
        _qwen35("qwen3.5-27b", "Qwen/Qwen3.5-27B", 5120, 17408, 64, 24, 4, 48, False, Qwen3VisionSpec(5120, deepstack=())),
        _llava("llava-1.5-7b", "llava-hf/llava-1.5-7b-hf", 4096, 11008, 32, 32),
        _llava("llava-1.5-13b", "llava-hf/llava-1.5-13b-hf", 5120, 13824, 40, 40),
    )
}  # fmt: skip

# Scaled-down specs for tests: the same families and code path, widths a CPU runs in seconds
# (head_dim 32, the smallest vLLM's CPU attention takes; 64 for Qwen3.5, whose tiny model uses it
# too). Not published models. The new families' are the published entries `scaled` (their
# special fields, Gemma 3's sliding window and Qwen3.5's linear attention, kept at smaller sizes).
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
    "tiny-qwen2-vl": replace(PUBLISHED["qwen2-vl-2b"], source="(test spec)").scaled(
        "tiny-qwen2-vl", Qwen2VisionSpec(out_hidden=128, embed_dim=64, depth=2, heads=2, mlp_ratio=2),
        hidden=128, intermediate=320, layers=2, heads=4, kv_heads=2, vocab=1024, tie_word_embeddings=False,
        max_positions=4096),
    "tiny-qwen3-vl": replace(PUBLISHED["qwen3-vl-8b"], source="(test spec)").scaled(
        "tiny-qwen3-vl", Qwen3VisionSpec(out_hidden=128, depth=3, hidden=64, intermediate=128, heads=2,
                                         deepstack=(0, 1), num_position_embeddings=144),
        hidden=128, intermediate=320, layers=2, heads=4, kv_heads=2, vocab=1024, explicit_head_dim=32,
        max_positions=4096),
    "tiny-gemma-3": replace(PUBLISHED["gemma-3-27b"], source="(test spec)").scaled(
        "tiny-gemma-3", SiglipVisionSpec(hidden=64, intermediate=128, layers=2, heads=2, image_size=112,
                                         tokens_per_image=16),
        hidden=128, intermediate=320, layers=2, heads=4, kv_heads=2, vocab=1024, explicit_head_dim=32,
        max_positions=4096, sliding=SlidingWindow(window=16, pattern=2, query_pre_attn_scalar=24)),
    "tiny-qwen3.5": replace(PUBLISHED["qwen3.5-27b"], source="(test spec)").scaled(
        "tiny-qwen3.5", Qwen3VisionSpec(out_hidden=128, depth=2, hidden=64, intermediate=128, heads=2,
                                        deepstack=(), num_position_embeddings=144),
        hidden=128, intermediate=320, layers=2, heads=4, kv_heads=2, vocab=1024, explicit_head_dim=64,
        max_positions=4096, tie_word_embeddings=False,
        linear_attention=LinearAttention(value_heads=2, key_heads=1, full_attention_interval=2)),
}  # fmt: skip

# The releases' special-token ids (published_config's default; build_published uses its tokenizer's)
_QWEN_IDS = {"bos": 151643, "eos": 151645, "pad": 151643, "image": 151655, "video": 151656,
             "vision_start": 151652, "vision_end": 151653}  # fmt: skip
RELEASE_TOKEN_IDS: dict[Family, dict[str, int]] = {
    "qwen2_5_vl": _QWEN_IDS,
    "qwen2_vl": _QWEN_IDS,
    "qwen3_vl": _QWEN_IDS,
    # Qwen3.5's config.json: text eos 248044, image/video 248056/248057, vision start/end
    # 248053/248054; it names no bos or pad (the eos id stands in for them here)
    "qwen3_5": {"bos": 248044, "eos": 248044, "pad": 248044, "image": 248056, "video": 248057,
                "vision_start": 248053, "vision_end": 248054},
    # Gemma 3's: bos 2, eos 1 (and 106, <end_of_turn>), pad 0, image 262144, boi/eoi 255999/256000
    "gemma3": {"bos": 2, "eos": 1, "pad": 0, "image": 262144, "boi": 255999, "eoi": 256000},
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
    """(in_features, out_features) of the LM's linear-input groups: q/k/v and gate/up fused; for
    Qwen3.5 also its Gated DeltaNet layers' `linear_in` (in_proj_qkv, _z, _b, _a fused) and
    `linear_out` (out_proj). Group names as in splitq_vllm.families."""
    t = get_spec(name_or_spec).text
    q, kv = t.heads * t.head_dim, t.kv_heads * t.head_dim
    q_out = 2 * q if t.attn_output_gate else q  # query and gate
    out = {"qkv": (t.hidden, q_out + 2 * kv), "o": (q, t.hidden), "gate_up": (t.hidden, 2 * t.intermediate),
           "down": (t.intermediate, t.hidden)}  # fmt: skip
    la = t.linear_attention
    if la is not None:
        out["linear_in"] = (t.hidden, 2 * la.key_dim + la.value_dim + la.value_dim + 2 * la.value_heads)
        out["linear_out"] = (la.value_dim, t.hidden)
    return out


def mrope_section(head_dim: int, family: Family = "qwen2_5_vl", partial_rotary_factor: float = 1.0) -> list[int]:
    """M-RoPE (temporal, height, width) sections, summing to the rotated dims / 2, in the
    family's proportions: Qwen2-VL/2.5-VL 1:1.5:1.5 ([16, 24, 24] at head_dim 128), Qwen3-VL
    24:20:20 ([24, 20, 20] at 128), Qwen3.5 thirds rounded up ([11, 11, 10] at 256 x 0.25)."""
    if family == "qwen3_vl":
        half = head_dim // 2
        t = round(half * 24 / 64)
        return [t, (half - t) // 2, half - t - (half - t) // 2]
    if family == "qwen3_5":
        half = int(head_dim * partial_rotary_factor) // 2
        a = -(-half // 3)
        b = -(-(half - a) // 2)
        return [a, b, half - a - b]
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
    n = t.layers if layers is None else layers
    rope: dict = {"rope_type": "default", "rope_theta": t.rope_theta}
    if spec.family in ("qwen2_5_vl", "qwen2_vl"):
        rope["mrope_section"] = mrope_section(t.head_dim)
    elif spec.family in ("qwen3_vl", "qwen3_5"):
        if t.partial_rotary_factor != 1.0:
            rope["partial_rotary_factor"] = t.partial_rotary_factor
        rope["mrope_section"] = mrope_section(t.head_dim, spec.family, t.partial_rotary_factor)
        rope["mrope_interleaved"] = True
    elif spec.family == "gemma3":
        assert t.sliding is not None
        full: dict = {"rope_type": "default", "rope_theta": t.rope_theta}
        if t.sliding.full_rope_linear_factor is not None:
            full = {"rope_type": "linear", "factor": t.sliding.full_rope_linear_factor, "rope_theta": t.rope_theta}
        rope = {"full_attention": full,
                "sliding_attention": {"rope_type": "default", "rope_theta": t.sliding.local_rope_theta}}  # fmt: skip
    kw = dict(
        vocab_size=t.vocab, hidden_size=t.hidden, intermediate_size=t.intermediate,
        num_hidden_layers=n, num_attention_heads=t.heads,
        num_key_value_heads=t.kv_heads, max_position_embeddings=t.max_positions, rms_norm_eps=t.rms_eps,
        tie_word_embeddings=t.tie_word_embeddings, bos_token_id=ids["bos"], eos_token_id=ids["eos"],
        pad_token_id=ids["pad"], rope_parameters=rope,
    )  # fmt: skip
    if t.explicit_head_dim is not None:
        kw["head_dim"] = t.explicit_head_dim
    if t.layer_types() is not None:
        kw["layer_types"] = t.layer_types(n)
    if t.sliding is not None:
        kw.update(sliding_window=t.sliding.window, query_pre_attn_scalar=t.sliding.query_pre_attn_scalar)
    la = t.linear_attention
    if la is not None:
        kw.update(linear_num_key_heads=la.key_heads, linear_num_value_heads=la.value_heads,
                  linear_key_head_dim=la.key_head_dim, linear_value_head_dim=la.value_head_dim,
                  linear_conv_kernel_dim=la.conv_kernel)  # fmt: skip
    if spec.family == "llava":
        kw["model_type"] = "llama"
    return kw


def vision_config_kwargs(spec: str | Published) -> dict:
    """The vision_config keywords of `spec` (transformers' names)."""
    spec = get_spec(spec)
    v = spec.vision
    if isinstance(v, QwenVisionSpec):
        return dict(
            depth=v.depth, hidden_size=v.hidden, intermediate_size=v.intermediate, num_heads=v.heads,
            out_hidden_size=v.out_hidden, patch_size=v.patch, spatial_merge_size=v.spatial_merge,
            temporal_patch_size=v.temporal_patch, window_size=v.window_size,
            fullatt_block_indexes=list(v.fullatt_block_indexes), tokens_per_second=v.tokens_per_second,
        )  # fmt: skip
    if isinstance(v, Qwen2VisionSpec):
        return dict(
            depth=v.depth, embed_dim=v.embed_dim, hidden_size=v.out_hidden, mlp_ratio=v.mlp_ratio, num_heads=v.heads,
            patch_size=v.patch, spatial_merge_size=v.spatial_merge, temporal_patch_size=v.temporal_patch,
        )  # fmt: skip
    if isinstance(v, Qwen3VisionSpec):
        kw = dict(
            depth=v.depth, hidden_size=v.hidden, intermediate_size=v.intermediate, num_heads=v.heads,
            out_hidden_size=v.out_hidden, patch_size=v.patch, spatial_merge_size=v.spatial_merge,
            temporal_patch_size=v.temporal_patch, num_position_embeddings=v.num_position_embeddings,
        )  # fmt: skip
        if spec.family == "qwen3_vl":  # Qwen3.5's config has no deepstack field
            kw["deepstack_visual_indexes"] = list(v.deepstack)
        return kw
    if isinstance(v, SiglipVisionSpec):
        return dict(
            model_type="siglip_vision_model", hidden_size=v.hidden, intermediate_size=v.intermediate,
            num_hidden_layers=v.layers, num_attention_heads=v.heads, image_size=v.image_size, patch_size=v.patch,
            layer_norm_eps=v.layer_norm_eps, vision_use_head=False,
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
    if spec.family in QWEN_STYLE:
        import transformers

        cls = {"qwen2_5_vl": "Qwen2_5_VLConfig", "qwen2_vl": "Qwen2VLConfig", "qwen3_vl": "Qwen3VLConfig",
               "qwen3_5": "Qwen3_5Config"}[spec.family]  # fmt: skip
        return getattr(transformers, cls)(
            text_config=text, vision_config=vision, image_token_id=ids["image"], video_token_id=ids["video"],
            vision_start_token_id=ids["vision_start"], vision_end_token_id=ids["vision_end"], tie_word_embeddings=tie,
        )  # fmt: skip
    if spec.family == "gemma3":
        from transformers import Gemma3Config

        assert isinstance(spec.vision, SiglipVisionSpec)
        return Gemma3Config(
            text_config=text, vision_config=vision, mm_tokens_per_image=spec.vision.tokens_per_image,
            boi_token_index=ids["boi"], eoi_token_index=ids["eoi"], image_token_index=ids["image"],
            tie_word_embeddings=tie,
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
    `language_model.model...`), CLIP and SigLIP towers renamed to the releases' `vision_tower.vision_model...`.
    kind: "ones" (norm weights), "zeros" (norm biases), "bias", "weight"."""
    from transformers.core_model_loading import revert_weight_conversion
    from transformers.modeling_utils import remove_tied_weights_from_state_dict

    state = remove_tied_weights_from_state_dict(model.state_dict(), model)
    origin = {id(t): name for name, t in state.items()}
    saved = revert_weight_conversion(model, state)
    # llava-hf's and Gemma 3's releases name their CLIP / SigLIP tower vision_tower.vision_model...
    llava = type(model).__name__.startswith(("Llava", "Gemma3"))
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


def _tokenizer_and_ids(family: Family):
    """This project's offline tokenizer of the family, its ids under RELEASE_TOKEN_IDS' keys, its vocabulary size."""
    if family in QWEN_STYLE:
        tokenizer, special, tok_vocab = qwen25vl_tokenizer()
        ids = {"bos": special["<|endoftext|>"], "eos": special["<|im_end|>"], "pad": special["<|endoftext|>"],
               "image": special["<|image_pad|>"], "video": special["<|video_pad|>"],
               "vision_start": special["<|vision_start|>"], "vision_end": special["<|vision_end|>"]}  # fmt: skip
    elif family == "gemma3":
        tokenizer, special, tok_vocab = gemma3_tokenizer()
        ids = {"bos": special["<bos>"], "eos": special["<eos>"], "pad": special["<pad>"],
               "image": special["<image_soft_token>"], "boi": special["<start_of_image>"],
               "eoi": special["<end_of_image>"]}  # fmt: skip
    else:
        tokenizer, special, tok_vocab = llava_tokenizer()
        ids = {"bos": special["<s>"], "eos": special["</s>"], "pad": special["<pad>"], "image": special["<image>"]}
    return tokenizer, special, ids, tok_vocab


def _save_side_files(spec: Published, out: Path, tokenizer, special: dict[str, int],
                     min_pixels: int | None, max_pixels: int | None) -> None:  # fmt: skip
    """The family's processor, tokenizer with chat template and generation config, as its tiny builder writes them."""
    v = spec.vision
    if spec.family in ("qwen2_5_vl", "qwen2_vl"):
        cls = "Qwen2_5_VLProcessor" if spec.family == "qwen2_5_vl" else "Qwen2VLProcessor"
        processor = qwen25vl_processor(tokenizer, min_pixels or 56 * 56, max_pixels or 1024 * 28 * 28,
                                       processor_class=cls)  # fmt: skip
        save_qwen25vl_side_files(out, processor, tokenizer, special)
    elif spec.family in ("qwen3_vl", "qwen3_5"):  # 16 px patches: 32 px per merged token
        processor = qwen3vl_processor(tokenizer, min_pixels or 64 * 64, max_pixels or 1024 * 32 * 32)
        save_qwen25vl_side_files(out, processor, tokenizer, special)
    elif spec.family == "gemma3":
        assert isinstance(v, SiglipVisionSpec)
        save_gemma3_side_files(out, gemma3_processor(tokenizer, v.image_size, v.tokens_per_image), tokenizer, special)
    else:
        assert isinstance(v, ClipVisionSpec)
        save_llava_side_files(out, llava_processor(tokenizer, v.image_size), tokenizer, special)


def build_published(
    name_or_spec: str | Published,
    out_dir: str | os.PathLike,
    layers: int,
    seed: int = 0,
    shard_bytes: int = 2**31,
    min_pixels: int | None = None,
    max_pixels: int | None = None,
) -> Path:
    """Write a random-weight model directory of `name_or_spec`'s widths with `layers` decoder
    layers to `out_dir` (which must not exist or be empty): config.json, safetensors shards of at
    most `shard_bytes` with their index, tokenizer, processor, chat template, generation config.

    Written in a temporary sibling directory and renamed at the end, so an interrupted build never
    leaves a directory that looks complete. Images: Qwen2.5-VL and Qwen2-VL between min_pixels and
    max_pixels (default 56 x 56 to 1024 x 28 x 28: up to 1024 image tokens; 224x224 gives 64),
    Qwen3-VL and Qwen3.5 likewise with 32 px per token (default 64 x 64 to 1024 x 32 x 32; 256x256
    gives 64); LLaVA resized and cropped to the tower's 336, Gemma 3 resized to its 896 (256 tokens).
    """
    spec = get_spec(name_or_spec)
    if layers < 1:
        raise ValueError(f"layers must be >= 1, got {layers}")
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out} exists and is not empty: build_published writes a new directory")
    tokenizer, special, ids, tok_vocab = _tokenizer_and_ids(spec.family)
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
        _save_side_files(spec, tmp, tokenizer, special, min_pixels, max_pixels)
        if out.exists():
            out.rmdir()  # empty (checked above)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
