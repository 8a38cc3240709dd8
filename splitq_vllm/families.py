"""The model families SplitQ supports, each described once: everything model-specific lives here.

One `Family` per architecture family: its class names in transformers and in vLLM, where the
language model's decoder layers are, per decoder-layer type which linears form which input group
(members read the same input, so they share one channel selection and one transform) and which
linears are left in 16 bits and why, and what calibration must capture besides each layer's input
(Qwen3-VL's deepstack visual features). Calibration (capture, source model, pipeline, export),
the transformers loader and the vLLM plugin read these entries; nothing else tests for a family.

An architecture that is not listed gets an error that names the supported ones.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class GroupSpec:
    """Linears of one decoder layer that read the same input: `parent.member` for each member.

    kind: the group's name in the checkpoint (`<parent path>.<kind>`); unique across families, so
    that a kind alone says which members it has.
    """

    parent: str
    kind: str
    members: tuple[str, ...]


@dataclass(frozen=True)
class Skipped:
    """A linear left in 16 bits, and why. `ignore`: vLLM builds it as a linear layer, so the
    checkpoint's ignore list names it (the name is a module-name suffix)."""

    name: str
    reason: str
    ignore: bool = False


@dataclass(frozen=True)
class LayerKind:
    """What one type of decoder layer quantizes (groups, in execution order) and skips."""

    groups: tuple[GroupSpec, ...]
    skipped: tuple[Skipped, ...] = ()


# The transformer decoder layer every family here shares: q/k/v share the attention input,
# gate/up the MLP input, o_proj and down_proj read their own.
STANDARD_GROUPS = (
    GroupSpec("self_attn", "qkv", ("q_proj", "k_proj", "v_proj")),
    GroupSpec("self_attn", "o", ("o_proj",)),
    GroupSpec("mlp", "gate_up", ("gate_proj", "up_proj")),
    GroupSpec("mlp", "down", ("down_proj",)),
)
STANDARD_LAYER = LayerKind(STANDARD_GROUPS)

# Qwen3.5's Gated DeltaNet layer: the four input projections read the same (normed) input;
# vLLM fuses them as in_proj_qkvz and in_proj_ba, both inside this one group.
GATED_DELTANET_LAYER = LayerKind(
    (
        GroupSpec("linear_attn", "linear_in", ("in_proj_qkv", "in_proj_z", "in_proj_b", "in_proj_a")),
        GroupSpec("linear_attn", "linear_out", ("out_proj",)),
        STANDARD_GROUPS[2],
        STANDARD_GROUPS[3],
    ),
    skipped=(
        Skipped(
            "linear_attn.conv1d",
            "a depthwise causal convolution (kernel 4) over the projected q/k/v, not a matmul on a group "
            "input; vLLM builds it as a linear layer, so it is in the checkpoint's ignore list",
            ignore=True,
        ),
    ),
)

@dataclass(frozen=True)
class VisionTower:
    """The vision tower's blocks, for the optional tower quantization (the paper's A.4,
    `quantize_vision_tower`): calibrated block by block like the decoder layers, every row a
    vision row; run with an all-vision mask by the transformers loader and by the vLLM plugin
    (whose tower linears are found by the same file names: `is_vision_tower_layer`).

    blocks: module path of the blocks in the transformers model; file_prefix: their names in the
    files (`visual.blocks.`, possibly after a `model.` in files written by newer transformers);
    block: what one block quantizes;
    full_attention_key: the vision-config field listing the blocks with full attention (the others
    attend within windows: their kwargs differ); replaces_ignore: default ignore-list entries that
    cover the whole tower (dropped when it is quantized); ignore: what stays 16-bit then.
    """

    blocks: str
    file_prefix: str
    block: LayerKind
    full_attention_key: str | None = None
    replaces_ignore: tuple[str, ...] = ()
    ignore: tuple[str, ...] = ()

    def block_type(self, vision_config, i: int) -> str:
        full = getattr(vision_config, self.full_attention_key, None) if self.full_attention_key else None
        return "window" if full is not None and i not in full else "full"

    def ignore_list(self, ignore: list[str]) -> list[str]:
        """`ignore` with the entries covering the whole tower replaced by the tower's own."""
        return [p for p in ignore if p not in self.replaces_ignore] + [p for p in self.ignore if p not in ignore]


# Qwen2.5-VL's vision block: q/k/v fused in one linear (attn.qkv), attn.proj, a gated MLP.
# The patch embedding (a Conv3d) and the merger (the projector into the LM) stay 16-bit.
QWEN25VL_TOWER = VisionTower(
    blocks="model.visual.blocks",
    file_prefix="visual.blocks.",
    block=LayerKind(
        (
            GroupSpec("attn", "vision_qkv", ("qkv",)),
            GroupSpec("attn", "vision_proj", ("proj",)),
            GroupSpec("mlp", "vision_gate_up", ("gate_proj", "up_proj")),
            GroupSpec("mlp", "vision_down", ("down_proj",)),
        ),
        skipped=(Skipped("norm1, norm2", "RMSNorms, not linears"),),
    ),
    full_attention_key="fullatt_block_indexes",
    replaces_ignore=("re:.*visual.*",),
    ignore=(r"re:.*visual\.patch_embed.*", r"re:.*visual\.merger.*"),
)

# Outside the decoder layers nothing is quantized by default (the checkpoint's ignore list).
OUTSIDE = (
    Skipped(
        "vision tower",
        "16 bits by default (the paper quantizes the language model; A.4 is an option: quantize_vision_tower)",
    ),
    Skipped("projector / merger", "small, runs once per image"),
    Skipped("lm_head, embeddings", "not in the decoder layers; the paper keeps them in 16 bits"),
)


@dataclass(frozen=True)
class Family:
    """One supported model family.

    layers: module path of the decoder layers in the transformers model.
    layer_kinds: decoder-layer type (`text_config.layer_types[i]`, "full_attention" where the
        config has none) -> what that type quantizes.
    vision_token_keys: config fields holding the placeholder token ids whose rows the vision
        tower fills (the text/vision mask's rule).
    deepstack: the language model's forward adds visual features to the hidden states after its
        first layers (`deepstack_visual_embeds` at `visual_pos_masks`): calibration records them
        and adds them to those layers' outputs, as the model does, before the next layer.
    own_embed_input_ids: vLLM's class overrides `embed_input_ids` (with the interface's
        signature and meaning of `is_multimodal`), so the plugin wraps the class's own method to
        fill the text mask (where it also calls the interface's, as Gemma 3's does, the mask is
        written twice with the same values).
    vision_tower: the tower's blocks, where tower quantization (A.4) is supported.
    """

    name: str
    sizes: str
    hf_architectures: tuple[str, ...]
    vllm_architectures: tuple[str, ...]
    layer_kinds: dict[str, LayerKind]
    layers: str = "model.language_model.layers"
    vision_token_keys: tuple[str, ...] = ("image_token_id", "image_token_index", "video_token_id")
    deepstack: bool = False
    own_embed_input_ids: bool = False
    skipped_outside: tuple[Skipped, ...] = OUTSIDE
    vision_tower: VisionTower | None = None
    notes: str = ""
    kinds_by_name: dict[str, GroupSpec] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "kinds_by_name", {g.kind: g for k in self.layer_kinds.values() for g in k.groups})

    def layer_type(self, text_config, i: int) -> str:
        types = getattr(text_config, "layer_types", None)
        return types[i] if types else "full_attention"

    def layer_kind(self, text_config, i: int) -> LayerKind:
        t = self.layer_type(text_config, i)
        if t not in self.layer_kinds:
            raise ValueError(f"{self.name}: decoder layer {i} has type {t!r}; known: {sorted(self.layer_kinds)}")
        return self.layer_kinds[t]

    def ignore_patterns(self) -> list[str]:
        """Ignore-list entries the checkpoint needs for this family (linears vLLM builds that are
        not quantized, inside the decoder layers)."""
        out = []
        for kind in self.layer_kinds.values():
            out += [s.name for s in kind.skipped if s.ignore and s.name not in out]
        return out

    def group(self, kind: str) -> GroupSpec:
        return self.kinds_by_name[kind]


FAMILIES: tuple[Family, ...] = (
    Family(
        name="Qwen2.5-VL",
        sizes="3B, 7B, 32B, 72B",
        hf_architectures=("Qwen2_5_VLForConditionalGeneration",),
        vllm_architectures=("Qwen2_5_VLForConditionalGeneration",),
        layer_kinds={"full_attention": STANDARD_LAYER},
        vision_tower=QWEN25VL_TOWER,
    ),
    Family(
        name="Qwen2-VL",
        sizes="2B, 7B, 72B",
        hf_architectures=("Qwen2VLForConditionalGeneration",),
        vllm_architectures=("Qwen2VLForConditionalGeneration",),
        layer_kinds={"full_attention": STANDARD_LAYER},
    ),
    Family(
        name="Qwen3-VL",
        sizes="2B, 4B, 8B, 32B (dense)",
        hf_architectures=("Qwen3VLForConditionalGeneration",),
        vllm_architectures=("Qwen3VLForConditionalGeneration",),
        # q_norm / k_norm are RMSNorms after q_proj / k_proj (not linears): they stay 16-bit
        layer_kinds={"full_attention": STANDARD_LAYER},
        deepstack=True,
        own_embed_input_ids=True,  # computes the deepstack inputs; is_multimodal has the usual meaning
        notes="deepstack: the tower's per-block features are added to the outputs of the first decoder layers",
    ),
    Family(
        name="Gemma 3",
        sizes="4B, 12B, 27B",
        hf_architectures=("Gemma3ForConditionalGeneration",),
        vllm_architectures=("Gemma3ForConditionalGeneration",),
        # the sliding-window and the full-attention layers have the same linears; their
        # attention masks and rotary tables differ (captured per layer type)
        layer_kinds={"sliding_attention": STANDARD_LAYER, "full_attention": STANDARD_LAYER},
        own_embed_input_ids=True,
        notes="SigLIP tower; image tokens attend bidirectionally within their image",
    ),
    Family(
        name="Qwen3.5",
        sizes="dense, up to 27B",
        hf_architectures=("Qwen3_5ForConditionalGeneration",),
        vllm_architectures=("Qwen3_5ForConditionalGeneration",),
        # full attention: q_proj is gated (its output is query and gate), still one q/k/v group
        layer_kinds={"linear_attention": GATED_DELTANET_LAYER, "full_attention": STANDARD_LAYER},
        own_embed_input_ids=True,
        notes="hybrid: Gated DeltaNet linear-attention layers and gated full-attention layers",
    ),
    Family(
        name="LLaVA-1.5",
        sizes="7B, 13B",
        hf_architectures=("LlavaForConditionalGeneration",),
        vllm_architectures=("LlavaForConditionalGeneration",),
        layer_kinds={"full_attention": STANDARD_LAYER},
    ),
)


def supported_names() -> str:
    return ", ".join(f"{f.name} ({'/'.join(f.hf_architectures)})" for f in FAMILIES)


def _lookup(arch: str, attr: str) -> Family:
    for f in FAMILIES:
        if arch in getattr(f, attr):
            return f
    raise ValueError(f"architecture {arch!r} is not supported by SplitQ; supported: {supported_names()}")


def family_of(model_or_class) -> Family:
    """The family of a transformers model (instance or class)."""
    cls = model_or_class if isinstance(model_or_class, type) else type(model_or_class)
    return _lookup(cls.__name__, "hf_architectures")


def family_of_vllm(model_class: type) -> Family:
    """The family of a vLLM model class."""
    return _lookup(model_class.__name__, "vllm_architectures")


def family_of_config(config) -> Family:
    """The family named by a config's `architectures` (config.json)."""
    archs = list(getattr(config, "architectures", None) or [])
    for a in archs:
        for f in FAMILIES:
            if a in f.hf_architectures:
                return f
    raise ValueError(f"architectures {archs} are not supported by SplitQ; supported: {supported_names()}")


def group_spec(kind: str) -> GroupSpec:
    """The members of a group kind (kinds are unique across families and vision towers)."""
    for f in FAMILIES:
        if kind in f.kinds_by_name:
            return f.kinds_by_name[kind]
    for f in FAMILIES:
        for g in f.vision_tower.block.groups if f.vision_tower else ():
            if g.kind == kind:
                return g
    raise KeyError(kind)


def is_vision_tower_layer(name: str) -> bool:
    """Whether a checkpoint layer name (a file name) is a vision-tower linear of some family."""
    return any(f.vision_tower and ("." + name).find("." + f.vision_tower.file_prefix) >= 0 for f in FAMILIES)


def check_tower_quantization(family: Family, names) -> None:
    """Refuse vision-tower layers (`names`: checkpoint layer names) in a checkpoint of a family
    whose tower quantization is not described here (and so neither calibrated nor served)."""
    tower = [n for n in names if is_vision_tower_layer(n)]
    if tower and family.vision_tower is None:
        with_tower = [f.name for f in FAMILIES if f.vision_tower is not None]
        raise NotImplementedError(
            f"SplitQ: this checkpoint quantizes vision-tower layers ({len(tower)}, e.g. '{tower[0]}'), but "
            f"vision-tower quantization is described (calibrated, scored, served) for {', '.join(with_tower)} "
            f"only, not {family.name} (splitq_vllm/families.py: Family.vision_tower)"
        )


def all_group_kinds() -> list[str]:
    """Every group kind of every family, in first-seen order."""
    return list(dict.fromkeys(k for f in FAMILIES for k in f.kinds_by_name))


def _check_kinds_unique() -> None:
    seen: dict[str, GroupSpec] = {}
    for f in FAMILIES:
        tower = f.vision_tower.block.groups if f.vision_tower else ()
        for g in (*f.kinds_by_name.values(), *tower):
            if seen.setdefault(g.kind, g) != g:
                raise AssertionError(f"group kind {g.kind!r} means {seen[g.kind]} and {g}")


_check_kinds_unique()
