"""Tiny random vision-language models, built fully offline, that transformers and vLLM both load.

A directory written here looks like a Hugging Face model repo: config.json, safetensors weights,
a byte-level BPE tokenizer trained on the spot, the image processor, the chat template and a
generation config. Same arguments and seed give byte-identical files. They exist for tests and
for the demo until the trained model lands; the sizes respect vLLM's CPU limits (head_dim >= 32).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch

QWEN_SPECIAL_TOKENS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
]
LLAVA_SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<pad>", "<image>"]
GEMMA3_SPECIAL_TOKENS = [
    "<pad>",
    "<eos>",
    "<bos>",
    "<unk>",
    "<start_of_turn>",
    "<end_of_turn>",
    "<start_of_image>",
    "<end_of_image>",
    "<image_soft_token>",
]

# The tokenizer's training text: plain words of the kind test prompts use, so prompts are a few
# dozen tokens instead of one token per byte.
DEFAULT_CORPUS = [
    "You are a helpful assistant.",
    "What is in this image? Describe the picture in one sentence.",
    "What colour is the shape? How many circles are there? Which side is the square on?",
    "red green blue yellow black white orange purple circle square triangle star left right top bottom",
    "one two three four five six seven eight nine ten zero 0 1 2 3 4 5 6 7 8 9",
    "The image shows a red circle on the left and a blue square on the right.",
    "Hello! Tell me a short story about a cat. The answer is yes. The answer is no.",
    "Compare the two images. What is the difference between them?",
]

# Chat templates: every piece of output text is a {{ '...' }} expression, so whitespace control
# on the tags cannot eat the newlines. Content may be a string or a list of typed parts (what
# vLLM's OpenAI front end and transformers' processors pass).
QWEN_CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if loop.first and message['role'] != 'system' -%}"
    "{{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' -}}"
    "{%- endif -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' -}}"
    "{%- if message['content'] is string -%}{{- message['content'] -}}"
    "{%- else -%}{%- for part in message['content'] -%}"
    "{%- if part['type'] == 'image' or part['type'] == 'image_url' -%}"
    "{{- '<|vision_start|><|image_pad|><|vision_end|>' -}}"
    "{%- elif part['type'] == 'video' -%}{{- '<|vision_start|><|video_pad|><|vision_end|>' -}}"
    "{%- elif part['type'] == 'text' -%}{{- part['text'] -}}"
    "{%- endif -%}{%- endfor -%}{%- endif -%}"
    "{{- '<|im_end|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)

LLAVA_CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'user' -%}{{- 'USER: ' -}}"
    "{%- elif message['role'] == 'assistant' -%}{{- 'ASSISTANT: ' -}}"
    "{%- else -%}{{- message['role'] | upper + ': ' -}}{%- endif -%}"
    "{%- if message['content'] is string -%}{{- message['content'] -}}"
    "{%- else -%}{%- for part in message['content'] -%}"
    "{%- if part['type'] == 'image' or part['type'] == 'image_url' -%}{{- '<image>\\n' -}}"
    "{%- elif part['type'] == 'text' -%}{{- part['text'] -}}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "{%- if message['role'] == 'assistant' -%}{{- '</s>' -}}{%- endif -%}"
    "{{- ' ' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- 'ASSISTANT:' -}}{%- endif -%}"
)


GEMMA3_CHAT_TEMPLATE = (
    "{{- bos_token -}}"
    "{%- for message in messages -%}"
    "{{- '<start_of_turn>' + ('model' if message['role'] == 'assistant' else message['role']) + '\\n' -}}"
    "{%- if message['content'] is string -%}{{- message['content'] -}}"
    "{%- else -%}{%- for part in message['content'] -%}"
    "{%- if part['type'] == 'image' or part['type'] == 'image_url' -%}{{- '<start_of_image>' -}}"
    "{%- elif part['type'] == 'text' -%}{{- part['text'] -}}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "{{- '<end_of_turn>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<start_of_turn>model\\n' -}}{%- endif -%}"
)


def train_bpe_tokenizer(special_tokens: list[str], corpus: list[str] | None = None, vocab_size: int = 512):
    """A byte-level BPE `tokenizers.Tokenizer` trained on `corpus` (deterministic)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=special_tokens,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus or DEFAULT_CORPUS, trainer=trainer)
    return tok


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


@dataclass
class TinySize:
    """Language-model and vision-tower sizes of a tiny model."""

    hidden: int = 128
    intermediate: int = 320
    layers: int = 2
    heads: int = 4
    kv_heads: int = 2
    vision_hidden: int = 64
    vision_intermediate: int = 128
    vision_depth: int = 2
    vision_heads: int = 2


def _save_generation_config(path: Path, eos: int, bos: int | None, pad: int) -> None:
    cfg = {"eos_token_id": eos, "pad_token_id": pad, "do_sample": False}
    if bos is not None:
        cfg["bos_token_id"] = bos
    (path / "generation_config.json").write_text(json.dumps(cfg, indent=2) + "\n")


def _save_side_files(out: Path, processor, tokenizer, chat_template: str, eos: int, bos: int | None, pad: int) -> Path:
    """Write processor, tokenizer (with chat template) and generation config to `out` (no weights)."""
    processor.save_pretrained(out)
    tokenizer.chat_template = chat_template
    tokenizer.save_pretrained(out)
    _save_generation_config(out, eos, bos, pad)
    return out


def qwen25vl_tokenizer(corpus: list[str] | None = None, vocab_size: int = 512):
    """A Qwen2-style fast tokenizer (byte-level BPE trained on `corpus`) and its special-token ids."""
    from transformers import Qwen2TokenizerFast

    raw = train_bpe_tokenizer(QWEN_SPECIAL_TOKENS, corpus, vocab_size)
    tokenizer = Qwen2TokenizerFast(
        tokenizer_object=raw,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token=None,
        bos_token=None,
        errors="replace",
    )
    ids = {t: raw.token_to_id(t) for t in QWEN_SPECIAL_TOKENS}
    return tokenizer, ids, raw.get_vocab_size()


def qwen25vl_config(size: TinySize, ids: dict[str, int], tokenizer_vocab: int):
    """A `Qwen2_5_VLConfig` of the given sizes (vocab rounded up to 64; M-RoPE sections in the
    real model's 1:1.5:1.5 proportions, summing to head_dim / 2)."""
    from transformers import Qwen2_5_VLConfig

    vocab = _round_up(tokenizer_vocab, 64)
    head_dim = size.hidden // size.heads
    if head_dim < 32 or head_dim % 4:
        raise ValueError(f"head_dim {head_dim}: vLLM's CPU attention needs >= 32 (and a multiple of 4 for M-RoPE)")
    half = head_dim // 2  # M-RoPE sections (temporal, height, width) sum to head_dim / 2
    mrope = [half // 4, (half - half // 4) // 2]
    mrope.append(half - sum(mrope))
    return Qwen2_5_VLConfig(
        text_config=dict(
            vocab_size=vocab,
            hidden_size=size.hidden,
            intermediate_size=size.intermediate,
            num_hidden_layers=size.layers,
            num_attention_heads=size.heads,
            num_key_value_heads=size.kv_heads,
            max_position_embeddings=4096,
            rms_norm_eps=1e-6,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": mrope},
            tie_word_embeddings=False,
            bos_token_id=ids["<|endoftext|>"],
            eos_token_id=ids["<|im_end|>"],
            pad_token_id=ids["<|endoftext|>"],
        ),
        vision_config=dict(
            depth=size.vision_depth,
            hidden_size=size.vision_hidden,
            intermediate_size=size.vision_intermediate,
            num_heads=size.vision_heads,
            out_hidden_size=size.hidden,
            patch_size=14,
            spatial_merge_size=2,
            temporal_patch_size=2,
            window_size=112,
            fullatt_block_indexes=[size.vision_depth - 1],
        ),
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=False,
    )


def qwen25vl_processor(
    tokenizer,
    min_pixels: int = 56 * 56,
    max_pixels: int = 224 * 224,
    chat_template: str = QWEN_CHAT_TEMPLATE,
    processor_class: str = "Qwen2_5_VLProcessor",
):
    """The Qwen2.5-VL processor (Qwen2VL image/video processors, 14 px patches, 2x2 merge);
    `processor_class` "Qwen2VLProcessor" gives Qwen2-VL's, which has the same parts."""
    import transformers
    from transformers import Qwen2VLImageProcessor, Qwen2VLVideoProcessor

    pixels = {"shortest_edge": min_pixels, "longest_edge": max_pixels}
    return getattr(transformers, processor_class)(
        image_processor=Qwen2VLImageProcessor(size=pixels, patch_size=14, merge_size=2, temporal_patch_size=2),
        video_processor=Qwen2VLVideoProcessor(size=pixels, patch_size=14, merge_size=2, temporal_patch_size=2),
        tokenizer=tokenizer,
        chat_template=chat_template,
    )


def qwen2vl_config(size: TinySize, ids: dict[str, int], tokenizer_vocab: int):
    """A `Qwen2VLConfig` of the given sizes: Qwen2.5-VL's language model (M-RoPE), Qwen2-VL's
    vision tower (LayerNorm, fc1/fc2 MLP, no window attention)."""
    from transformers import Qwen2VLConfig

    ref = qwen25vl_config(size, ids, tokenizer_vocab)
    return Qwen2VLConfig(
        text_config=ref.text_config.to_dict(),
        vision_config=dict(
            depth=size.vision_depth,
            embed_dim=size.vision_hidden,
            hidden_size=size.hidden,
            mlp_ratio=size.vision_intermediate // size.vision_hidden,
            num_heads=size.vision_heads,
            patch_size=14,
            spatial_merge_size=2,
            temporal_patch_size=2,
        ),
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=False,
    )


def save_qwen25vl_side_files(out: Path, processor, tokenizer, ids: dict[str, int], chat_template: str = QWEN_CHAT_TEMPLATE) -> Path:
    """Write processor, tokenizer (with chat template) and generation config to `out` (no weights)."""
    return _save_side_files(out, processor, tokenizer, chat_template, ids["<|im_end|>"], None, ids["<|endoftext|>"])


def save_qwen25vl_dir(out: Path, model, processor, tokenizer, ids: dict[str, int], chat_template: str = QWEN_CHAT_TEMPLATE) -> Path:
    """Write model, processor, tokenizer (with chat template) and generation config to `out`."""
    model.save_pretrained(out)
    return save_qwen25vl_side_files(out, processor, tokenizer, ids, chat_template)


def llava_tokenizer(corpus: list[str] | None = None, vocab_size: int = 512):
    """A LLaMA-style fast tokenizer (byte-level BPE trained on `corpus`) and its special-token ids."""
    from transformers import PreTrainedTokenizerFast

    raw = train_bpe_tokenizer(LLAVA_SPECIAL_TOKENS, corpus, vocab_size)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=raw, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>"
    )
    ids = {t: raw.token_to_id(t) for t in LLAVA_SPECIAL_TOKENS}
    return tokenizer, ids, raw.get_vocab_size()


def llava_processor(tokenizer, image_size: int):
    """The LLaVA-1.5 processor: CLIP resize + center crop to `image_size`, 14 px patches."""
    from transformers import CLIPImageProcessor, LlavaProcessor

    return LlavaProcessor(
        image_processor=CLIPImageProcessor(
            size={"shortest_edge": image_size},
            crop_size={"height": image_size, "width": image_size},
            do_center_crop=True,
        ),
        tokenizer=tokenizer,
        patch_size=14,
        vision_feature_select_strategy="default",
        chat_template=LLAVA_CHAT_TEMPLATE,
        image_token="<image>",
        num_additional_image_tokens=1,
    )


def llava_hf_name(key: str) -> str:
    """transformers 5 saves the CLIP tower as `vision_tower.encoder...`; llava-hf checkpoints (and
    vLLM) use `vision_tower.vision_model.encoder...`, which transformers also reads."""
    return "vision_tower.vision_model." + key[len("vision_tower.") :] if key.startswith("vision_tower.") else key


def save_with_hf_tower_names(model, out: Path) -> None:
    """`model.save_pretrained(out)`, the CLIP/SigLIP tower's tensors renamed as in the released
    checkpoints (llava_hf_name)."""
    from safetensors.torch import load_file, save_file

    model.save_pretrained(out)
    rename = llava_hf_name
    for f in out.glob("*.safetensors"):
        save_file({rename(k): v for k, v in load_file(str(f)).items()}, str(f), metadata={"format": "pt"})
    index = out / "model.safetensors.index.json"
    if index.exists():
        data = json.loads(index.read_text())
        data["weight_map"] = {rename(k): v for k, v in data["weight_map"].items()}
        index.write_text(json.dumps(data, indent=2))


def save_llava_side_files(out: Path, processor, tokenizer, ids: dict[str, int]) -> Path:
    """Write processor, tokenizer (with chat template) and generation config to `out` (no weights)."""
    return _save_side_files(out, processor, tokenizer, LLAVA_CHAT_TEMPLATE, ids["</s>"], ids["<s>"], ids["<pad>"])


def _build_qwen_style(
    output_dir: str | os.PathLike, seed: int, size: TinySize | None, corpus: list[str] | None, vocab_size: int,
    dtype: torch.dtype, make_config, model_cls, make_processor,
) -> Path:
    """The Qwen builders' shared steps: the tiny tokenizer, the family's config, random weights
    drawn after torch.manual_seed(seed), then the processor and the files."""
    size = size or TinySize()
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer, ids, tokenizer_vocab = qwen25vl_tokenizer(corpus, vocab_size)
    config = make_config(size, ids, tokenizer_vocab)
    torch.manual_seed(seed)
    model = model_cls(config).to(dtype).eval()
    return save_qwen25vl_dir(out, model, make_processor(tokenizer), tokenizer, ids)


def build_tiny_qwen25vl(
    output_dir: str | os.PathLike,
    seed: int = 0,
    size: TinySize | None = None,
    corpus: list[str] | None = None,
    vocab_size: int = 512,
    dtype: torch.dtype = torch.bfloat16,
    min_pixels: int = 56 * 56,
    max_pixels: int = 224 * 224,
) -> Path:
    """Write a random-weight Qwen2.5-VL (the real transformers/vLLM architecture) to `output_dir`."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    return _build_qwen_style(output_dir, seed, size, corpus, vocab_size, dtype, qwen25vl_config,
                             Qwen2_5_VLForConditionalGeneration,
                             lambda tok: qwen25vl_processor(tok, min_pixels, max_pixels))  # fmt: skip


def build_tiny_qwen2vl(
    output_dir: str | os.PathLike,
    seed: int = 0,
    size: TinySize | None = None,
    corpus: list[str] | None = None,
    vocab_size: int = 512,
    dtype: torch.dtype = torch.bfloat16,
    min_pixels: int = 56 * 56,
    max_pixels: int = 224 * 224,
) -> Path:
    """Write a random-weight Qwen2-VL (the real transformers/vLLM architecture) to `output_dir`."""
    from transformers import Qwen2VLForConditionalGeneration

    return _build_qwen_style(output_dir, seed, size, corpus, vocab_size, dtype, qwen2vl_config,
                             Qwen2VLForConditionalGeneration,
                             lambda tok: qwen25vl_processor(tok, min_pixels, max_pixels, processor_class="Qwen2VLProcessor"))  # fmt: skip


def qwen3vl_config(size: TinySize, ids: dict[str, int], tokenizer_vocab: int):
    """A `Qwen3VLConfig` (dense) of the given sizes: q/k norms, interleaved M-RoPE (sections in
    the real 24:20:20 proportions, summing to head_dim / 2), a SigLIP-style tower with learned
    position embeddings and deepstack features from every vision block, added after the first
    decoder layers."""
    from transformers import Qwen3VLConfig

    head_dim = size.hidden // size.heads
    if head_dim < 32:
        raise ValueError(f"head_dim {head_dim}: vLLM's CPU attention needs >= 32")
    half = head_dim // 2
    t = round(half * 24 / 64)
    mrope = [t, (half - t) // 2, half - t - (half - t) // 2]
    return Qwen3VLConfig(
        text_config=dict(
            vocab_size=_round_up(tokenizer_vocab, 64),
            hidden_size=size.hidden,
            intermediate_size=size.intermediate,
            num_hidden_layers=size.layers,
            num_attention_heads=size.heads,
            num_key_value_heads=size.kv_heads,
            head_dim=head_dim,
            max_position_embeddings=4096,
            rms_norm_eps=1e-6,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": mrope, "mrope_interleaved": True},
            tie_word_embeddings=False,
            bos_token_id=ids["<|endoftext|>"],
            eos_token_id=ids["<|im_end|>"],
            pad_token_id=ids["<|endoftext|>"],
        ),
        vision_config=dict(
            depth=size.vision_depth,
            hidden_size=size.vision_hidden,
            intermediate_size=size.vision_intermediate,
            num_heads=size.vision_heads,
            out_hidden_size=size.hidden,
            patch_size=16,
            spatial_merge_size=2,
            temporal_patch_size=2,
            num_position_embeddings=144,  # a 12 x 12 grid, interpolated to the image's
            deepstack_visual_indexes=list(range(size.vision_depth)),
        ),
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=False,
    )


def qwen3vl_processor(tokenizer, min_pixels: int = 64 * 64, max_pixels: int = 256 * 256):
    """The Qwen3-VL processor: Qwen2-VL's image processor with 16 px patches, 2x2 merge."""
    from transformers import Qwen2VLImageProcessor, Qwen3VLProcessor, Qwen3VLVideoProcessor

    pixels = {"shortest_edge": min_pixels, "longest_edge": max_pixels}
    norm = dict(image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5])
    return Qwen3VLProcessor(
        image_processor=Qwen2VLImageProcessor(size=pixels, patch_size=16, merge_size=2, temporal_patch_size=2, **norm),
        video_processor=Qwen3VLVideoProcessor(size=pixels, patch_size=16, merge_size=2, temporal_patch_size=2, **norm),
        tokenizer=tokenizer,
        chat_template=QWEN_CHAT_TEMPLATE,
    )


def build_tiny_qwen3vl(
    output_dir: str | os.PathLike,
    seed: int = 0,
    size: TinySize | None = None,
    corpus: list[str] | None = None,
    vocab_size: int = 512,
    dtype: torch.dtype = torch.bfloat16,
) -> Path:
    """Write a random-weight dense Qwen3-VL (the real transformers/vLLM architecture) to `output_dir`."""
    from transformers import Qwen3VLForConditionalGeneration

    return _build_qwen_style(output_dir, seed, size, corpus, vocab_size, dtype, qwen3vl_config,
                             Qwen3VLForConditionalGeneration, qwen3vl_processor)  # fmt: skip


def gemma3_tokenizer(corpus: list[str] | None = None, vocab_size: int = 512):
    """A Gemma-style fast tokenizer (byte-level BPE trained on `corpus`, Gemma 3's special tokens
    and newline runs) and its special-token ids."""
    from tokenizers import AddedToken
    from transformers import PreTrainedTokenizerFast

    raw = train_bpe_tokenizer(GEMMA3_SPECIAL_TOKENS, corpus, vocab_size)
    # Gemma's vocabulary has runs of newlines as single tokens, which vLLM's Gemma 3 processor
    # looks up by their text (it merges the newlines around the image sequence the same way)
    raw.add_tokens([AddedToken("\n" * n, normalized=False, special=False) for n in (4, 3, 2, 1)])
    ids = {t: raw.token_to_id(t) for t in GEMMA3_SPECIAL_TOKENS}
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=raw,
        bos_token="<bos>",
        eos_token="<eos>",
        unk_token="<unk>",
        pad_token="<pad>",
        extra_special_tokens={"boi_token": "<start_of_image>", "eoi_token": "<end_of_image>", "image_token": "<image_soft_token>"},
    )
    return tokenizer, ids, raw.get_vocab_size()


def gemma3_processor(tokenizer, image_size: int, tokens_per_image: int):
    """The Gemma 3 processor: resize to `image_size` square, `tokens_per_image` soft tokens per image."""
    from transformers import Gemma3ImageProcessor, Gemma3Processor

    return Gemma3Processor(
        image_processor=Gemma3ImageProcessor(
            size={"height": image_size, "width": image_size}, image_mean=[0.5] * 3, image_std=[0.5] * 3
        ),
        tokenizer=tokenizer,
        chat_template=GEMMA3_CHAT_TEMPLATE,
        image_seq_length=tokens_per_image,
    )


def save_gemma3_side_files(out: Path, processor, tokenizer, ids: dict[str, int]) -> Path:
    """Write processor, tokenizer (with chat template) and generation config to `out` (no weights)."""
    return _save_side_files(out, processor, tokenizer, GEMMA3_CHAT_TEMPLATE, ids["<end_of_turn>"], ids["<bos>"], ids["<pad>"])


def build_tiny_gemma3(
    output_dir: str | os.PathLike,
    seed: int = 0,
    size: TinySize | None = None,
    corpus: list[str] | None = None,
    vocab_size: int = 512,
    dtype: torch.dtype = torch.bfloat16,
    image_size: int = 56,
    tokens_per_image: int = 16,
) -> Path:
    """Write a random-weight Gemma 3 (SigLIP tower, average-pooled projector, Gemma 3 language
    model with a sliding-window and a full-attention layer) to `output_dir`. Image tokens attend
    bidirectionally within their image (the processor's token_type_ids)."""
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration

    size = size or TinySize()
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer, ids, tokenizer_vocab = gemma3_tokenizer(corpus, vocab_size)
    head_dim = size.hidden // size.heads
    if head_dim < 32:
        raise ValueError(f"head_dim {head_dim}: vLLM's CPU attention needs >= 32")
    layer_types = ["sliding_attention" if (i + 1) % 2 else "full_attention" for i in range(size.layers)]
    config = Gemma3Config(
        text_config=dict(
            vocab_size=_round_up(tokenizer_vocab, 64),
            hidden_size=size.hidden,
            intermediate_size=size.intermediate,
            num_hidden_layers=size.layers,
            num_attention_heads=size.heads,
            num_key_value_heads=size.kv_heads,
            head_dim=head_dim,
            query_pre_attn_scalar=head_dim,
            sliding_window=16,  # shorter than the test prompts: the sliding layers differ from the full ones
            layer_types=layer_types,
            max_position_embeddings=4096,
            rms_norm_eps=1e-6,
            bos_token_id=ids["<bos>"],
            eos_token_id=ids["<eos>"],
            pad_token_id=ids["<pad>"],
            tie_word_embeddings=True,
        ),
        vision_config=dict(
            model_type="siglip_vision_model",
            hidden_size=size.vision_hidden,
            intermediate_size=size.vision_intermediate,
            num_hidden_layers=size.vision_depth,
            num_attention_heads=size.vision_heads,
            image_size=image_size,
            patch_size=14,
            vision_use_head=False,
        ),
        mm_tokens_per_image=tokens_per_image,
        boi_token_index=ids["<start_of_image>"],
        eoi_token_index=ids["<end_of_image>"],
        image_token_index=ids["<image_soft_token>"],
        tie_word_embeddings=True,
    )
    torch.manual_seed(seed)
    model = Gemma3ForConditionalGeneration(config).to(dtype).eval()
    save_with_hf_tower_names(model, out)  # Gemma 3 releases: vision_tower.vision_model...
    return save_gemma3_side_files(out, gemma3_processor(tokenizer, image_size, tokens_per_image), tokenizer, ids)


def build_tiny_qwen35(
    output_dir: str | os.PathLike,
    seed: int = 0,
    size: TinySize | None = None,
    corpus: list[str] | None = None,
    vocab_size: int = 512,
    dtype: torch.dtype = torch.bfloat16,
    head_dim: int = 64,
) -> Path:
    """Write a random-weight dense Qwen3.5 to `output_dir`: a Gated DeltaNet (linear-attention)
    layer, then a full-attention layer with a gated q_proj (partial rotary, interleaved M-RoPE),
    the Qwen3-VL tower without deepstack."""
    from transformers import Qwen3_5Config, Qwen3_5ForConditionalGeneration

    size = size or TinySize()
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer, ids, tokenizer_vocab = qwen25vl_tokenizer(corpus, vocab_size)
    ref = qwen3vl_config(size, ids, tokenizer_vocab)
    half = int(head_dim * 0.25) // 2  # rotary dims / 2
    mrope = [half - 2 * (half // 3), half // 3, half // 3]
    vision = {k: v for k, v in ref.vision_config.to_dict().items() if k in ("depth", "hidden_size", "intermediate_size", "num_heads", "out_hidden_size", "patch_size", "spatial_merge_size", "temporal_patch_size", "num_position_embeddings")}
    config = Qwen3_5Config(
        text_config=dict(
            vocab_size=_round_up(tokenizer_vocab, 64),
            hidden_size=size.hidden,
            intermediate_size=size.intermediate,
            num_hidden_layers=size.layers,
            num_attention_heads=size.heads,
            num_key_value_heads=size.kv_heads,
            head_dim=head_dim,
            linear_conv_kernel_dim=4,
            # vLLM's CPU chunked delta-rule kernel takes the released head size only (32 fails)
            linear_key_head_dim=128,
            linear_value_head_dim=128,
            linear_num_key_heads=1,
            linear_num_value_heads=2,
            layer_types=["full_attention" if (i + 1) % 2 == 0 else "linear_attention" for i in range(size.layers)],
            max_position_embeddings=4096,
            rms_norm_eps=1e-6,
            rope_parameters={
                "rope_type": "default",
                "rope_theta": 10000.0,
                "partial_rotary_factor": 0.25,
                "mrope_section": mrope,
                "mrope_interleaved": True,
            },
            tie_word_embeddings=False,
            bos_token_id=ids["<|endoftext|>"],
            eos_token_id=ids["<|im_end|>"],
            pad_token_id=ids["<|endoftext|>"],
        ),
        vision_config=vision,
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = Qwen3_5ForConditionalGeneration(config).to(dtype).eval()
    return save_qwen25vl_dir(out, model, qwen3vl_processor(tokenizer), tokenizer, ids)


def build_tiny_llava(
    output_dir: str | os.PathLike,
    seed: int = 0,
    size: TinySize | None = None,
    corpus: list[str] | None = None,
    vocab_size: int = 512,
    dtype: torch.dtype = torch.bfloat16,
    image_size: int = 56,
) -> Path:
    """Write a random-weight LLaVA-1.5 (CLIP tower, Llama LM) with llava-hf's tensor names."""
    from transformers import LlavaConfig, LlavaForConditionalGeneration

    size = size or TinySize(kv_heads=4)
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer, ids, tokenizer_vocab = llava_tokenizer(corpus, vocab_size)
    if size.hidden // size.heads < 32:
        raise ValueError("head_dim must be >= 32 for vLLM's CPU attention")
    config = LlavaConfig(
        vision_config=dict(
            model_type="clip_vision_model",
            hidden_size=size.vision_hidden,
            intermediate_size=size.vision_intermediate,
            num_hidden_layers=size.vision_depth + 1,  # LLaVA reads the second-to-last layer
            num_attention_heads=size.vision_heads,
            image_size=image_size,
            patch_size=14,
            projection_dim=size.vision_hidden,
        ),
        text_config=dict(
            model_type="llama",
            vocab_size=_round_up(tokenizer_vocab, 64),
            hidden_size=size.hidden,
            intermediate_size=size.intermediate,
            num_hidden_layers=size.layers,
            num_attention_heads=size.heads,
            num_key_value_heads=size.kv_heads,
            max_position_embeddings=4096,
            rms_norm_eps=1e-6,
            bos_token_id=ids["<s>"],
            eos_token_id=ids["</s>"],
            pad_token_id=ids["<pad>"],
        ),
        image_token_index=ids["<image>"],
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        projector_hidden_act="gelu",
    )
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config).to(dtype).eval()
    save_with_hf_tower_names(model, out)
    return save_llava_side_files(out, llava_processor(tokenizer, image_size), tokenizer, ids)


# Family name (splitq_vllm.families) -> the factory of its tiny model.
TINY_BUILDERS = {
    "Qwen2.5-VL": build_tiny_qwen25vl,
    "Qwen2-VL": build_tiny_qwen2vl,
    "Qwen3-VL": build_tiny_qwen3vl,
    "Gemma 3": build_tiny_gemma3,
    "Qwen3.5": build_tiny_qwen35,
    "LLaVA-1.5": build_tiny_llava,
}
