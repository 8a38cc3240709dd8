"""The settings of one calibration run: defaults, method presets, YAML recipes.

One dataclass holds every setting the CLI, the YAML recipe and the Python API accept; its field
names are the recipe keys and (with `-` for `_`) the CLI flags. Defaults are the paper's
(Sec. 5.1: 2% outlier channels per modality, CWS rank 2%, MAC rank 3%, k = 3) and FlatQuant's
training recipe (15 epochs, AdamW lr 5e-3, 10x for clipping factors, cosine decay to lr * 1e-3,
batches of 4 samples, layer in float32, smoothing scale initialised SmoothQuant-style with
alpha 0.3, random orthogonal Kronecker factors).

`method` picks a preset for the fields left unset (None); anything set explicitly wins, so every
row of the paper's ablation tables is one invocation (README.md, "Calibration"):

| method      | channel selection | CWS  | MAC  | transforms                         | trained |
|-------------|-------------------|------|------|------------------------------------|---------|
| splitq      | mocd              | 2%   | 3%   | smooth + Kronecker (+ outlier P_t, P_v) | yes |
| mocd_cws    | mocd              | 2%   | off  | same                               | yes     |
| mocd        | mocd              | off  | off  | same                               | yes     |
| flatquant   | none              | off  | off  | smooth + Kronecker                 | yes     |
| smoothquant | none              | off  | off  | SmoothQuant scale (alpha 0.5) only | no      |
| rtn         | none              | off  | off  | identity                           | no      |
| mbq         | none              | off  | off  | MBQ's modality-balanced scale search | no    |
| masquant    | none              | off  | off  | MASQuant's text smoothing (MAS)    | MAS only |
| vlmq        | none              | off  | off  | identity; importance-aware GPTQ    | no      |

mbq, masquant and vlmq are the paper's baselines, each its own module (baselines/: its paper's
algorithm, run per layer in place of the train step; docs/calibration.md, "Baselines").

A recipe is the settings themselves (optionally under `splitq:`), or llm-compressor's shape: a
stage whose modifiers are one `SplitQModifier` with the settings as its arguments (what
`oneshot(recipe=SplitQModifier(...))` takes in Python). Any other modifier is refused with the
expected shape (`EXPECTED_SHAPE`): SplitQ is one method, not a pipeline of modifiers.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from splitq_kernels.reference import SplitQScheme
from splitq_kernels.reference.scheme import MAC_ROWS
from splitq_vllm.checkpoint import DEFAULT_IGNORE

METHODS = ("splitq", "mocd_cws", "mocd", "flatquant", "smoothquant", "rtn", "mbq", "masquant", "vlmq")
SELECTIONS = ("mocd", "none", "random", "text_max", "vision_max", "multi_max", "multi_mean")
LOWRANK_MODES = ("learnable", "fixed")
TRANSFORM_INITS = ("orthogonal", "identity")
SMOOTH_INITS = ("flatquant", "smoothquant", "none")
ON_BAD_SAMPLE = ("error", "skip")

# method -> values for the fields the user left unset
_FLATQUANT_TRAINING = dict(train=True, transform_init="orthogonal", smooth_init="flatquant")
PRESETS: dict[str, dict[str, Any]] = {
    "splitq": dict(selection="mocd", cws_ratio=0.02, mac_ratio=0.03, **_FLATQUANT_TRAINING),
    "mocd_cws": dict(selection="mocd", cws_ratio=0.02, mac_ratio=0.0, **_FLATQUANT_TRAINING),
    "mocd": dict(selection="mocd", cws_ratio=0.0, mac_ratio=0.0, **_FLATQUANT_TRAINING),
    "flatquant": dict(selection="none", cws_ratio=0.0, mac_ratio=0.0, **_FLATQUANT_TRAINING),
    "smoothquant": dict(
        selection="none", cws_ratio=0.0, mac_ratio=0.0, train=False, transform_init="identity", smooth_init="smoothquant"
    ),
    "rtn": dict(
        selection="none", cws_ratio=0.0, mac_ratio=0.0, train=False, transform_init="identity", smooth_init="none"
    ),
}
# The baselines write plain SplitQ groups (one main set, identity transforms, no branches): their
# own modules set the smoothing (MBQ, MASQuant) or the integer weights (VLMQ).
for _m in ("mbq", "masquant", "vlmq"):
    PRESETS[_m] = dict(PRESETS["rtn"])

# Settings that do not change the checkpoint: a resumed run may differ in these.
RUNTIME_ONLY = {
    "device",
    "overwrite",
    "restart",
    "keep_work_dir",
    "log_every",
    "report",
    "max_memory_gb",
    "activation_memory_gb",
}


class RecipeError(ValueError):
    """A setting with a bad value; the message names the setting."""


MODIFIER = "SplitQModifier"
EXPECTED_SHAPE = """a recipe is one SplitQModifier in a stage (llm-compressor's shape), e.g.
    quant_stage:
      quant_modifiers:
        SplitQModifier:
          scheme: w4a4
          ignore: ["lm_head", "re:.*visual.*", "re:.*vision_tower.*", "re:.*multi_modal_projector.*"]
or the settings themselves (`splitq: {scheme: w4a4, ...}`); in Python
oneshot(recipe=SplitQModifier(scheme="w4a4")) (docs/calibration.md lists the settings)"""
# Keys of llm-compressor recipes that carry no setting.
_RECIPE_META = {"version"}
_STAGE_META = {"run_type"}


def _modifier_settings(args: Any, where: str) -> dict[str, Any]:
    """A SplitQModifier's arguments as settings: llm-compressor's `targets: Linear` (the default,
    all that SplitQ quantizes) is accepted, its upper-case scheme names too."""
    if args is None:
        args = {}
    if not isinstance(args, dict):
        raise RecipeError(f"{where}: expected the modifier's settings as a mapping, got {type(args).__name__}")
    settings = dict(args)
    targets = settings.pop("targets", "Linear")
    if targets not in ("Linear", ["Linear"]):
        raise RecipeError(
            f"{where}.targets: SplitQ quantizes the language model's decoder linears (targets: Linear), got "
            f"{targets!r}; leave layers out with `ignore`"
        )
    if isinstance(settings.get("scheme"), str):
        settings["scheme"] = settings["scheme"].lower()
    return settings


def _is_staged(d: dict[str, Any]) -> bool:
    return any(isinstance(v, dict) and any(str(k).endswith("modifiers") for k in v) for v in d.values())


def _staged_settings(d: dict[str, Any], where: str) -> dict[str, Any]:
    """The settings of the one SplitQModifier of an llm-compressor-shaped recipe."""
    found = []
    for stage, groups in d.items():
        if stage in _RECIPE_META:
            continue
        if not isinstance(groups, dict):
            raise RecipeError(f"{where}: stage '{stage}' is not a mapping of modifier groups; {EXPECTED_SHAPE}")
        for group, modifiers in groups.items():
            if group in _STAGE_META:
                continue
            if not str(group).endswith("modifiers") or not isinstance(modifiers, dict):
                raise RecipeError(f"{where}: '{stage}.{group}' is not a mapping of modifiers; {EXPECTED_SHAPE}")
            found += [(f"{stage}.{group}.{name}", name, args) for name, args in modifiers.items()]
    names = [name for _, name, _ in found]
    if names != [MODIFIER]:
        found_names = names or "none"
        raise RecipeError(f"{where}: modifiers {found_names}: splitq-calibrate runs one {MODIFIER}; {EXPECTED_SHAPE}")
    return _modifier_settings(found[0][2], f"{where}: {found[0][0]}")


class SplitQModifier:
    """SplitQ as llm-compressor's recipe object: `oneshot(model, dataset, recipe=SplitQModifier(
    scheme="w4a4", ignore=[...]))`; the arguments are CalibrationConfig fields (checked here)."""

    def __init__(self, **settings: Any) -> None:
        self.settings = _modifier_settings(settings, MODIFIER)
        self.config()  # unknown settings and bad values fail here, naming the setting

    def config(self) -> "CalibrationConfig":
        cfg = CalibrationConfig.from_dict(self.settings, where=MODIFIER)
        cfg.resolved()
        return cfg

    def __repr__(self) -> str:
        return f"{MODIFIER}({', '.join(f'{k}={v!r}' for k, v in self.settings.items())})"


@dataclass
class CalibrationConfig:
    """Every setting of a calibration run (see the module docstring for the presets)."""

    # --- what to produce
    method: str = "splitq"
    scheme: str = "w4a4"
    act_symmetric: bool = True
    mac_rows: str = "text"  # which rows get the MAC compensation (Table 5): text | vision | all
    ignore: list[str] = field(default_factory=lambda: list(DEFAULT_IGNORE))
    # the vision tower's blocks too (the paper's A.4; every row a vision row: no text set, no MAC)
    quantize_vision_tower: bool = False
    # --- channel selection (MOCD, Eq. 7-12, and the rules of Table 4)
    selection: str | None = None
    text_ratio: float = 0.02
    vision_ratio: float = 0.02
    mocd_k: int = 3
    mocd_max_tokens: int = 8192  # text tokens sampled for the rank clustering (Eq. 9-10)
    # --- low-rank branches (Eq. 16-21, Tables 8-11)
    cws_ratio: float | None = None
    mac_ratio: float | None = None
    cws_lowrank: str = "learnable"
    mac_lowrank: str = "learnable"
    # --- transforms and training (FlatQuant's recipe)
    train: bool | None = None
    transform_init: str | None = None
    smooth_init: str | None = None
    smooth_alpha: float = 0.3  # FlatQuant's diagonal-scale init
    smoothquant_alpha: float = 0.5  # the SmoothQuant baseline's migration strength
    weight_clip: bool = True  # learnable per-output-channel weight clipping (LWC)
    act_clip: bool = True  # learnable per-tensor activation clipping (LAC)
    clip_init: float = 4.0  # clipping factor = sigmoid(param), param initialised here
    epochs: int = 15
    lr: float = 5e-3
    clip_lr: float | None = None  # default 10 x lr
    weight_decay: float = 0.0
    batch_size: int = 4
    # --- data
    num_samples: int = 128
    max_seq_len: int = 2048
    seed: int = 0
    image_dir: str | None = None
    prompt: str = "Describe this image in detail."
    on_bad_sample: str = "error"
    # --- runtime (not part of the checkpoint's identity)
    device: str = "auto"
    offload_dtype: str = "bfloat16"  # activations between layers on the host: bfloat16 | float16 | float32
    max_memory_gb: float | None = None  # host memory the run may use (default: 90% of what is available)
    activation_memory_gb: float | None = None  # activations kept in memory, the rest spilled (default: what fits)
    overwrite: bool = False
    restart: bool = False  # discard an unfinished run's work directory instead of resuming it
    keep_work_dir: bool = False
    log_every: int = 1
    report: str | None = None
    # --- the baselines (baselines/*.py)
    baseline_max_tokens: int = 8192  # sampled group-input rows the baselines search / build Hessians on
    mbq_grid: int = 20  # MBQ's (AWQ's) grid of migration strengths in [0, 1)
    masquant_epochs: int = 2  # MASQuant's MAS training (Table 5)
    masquant_rank_ratio: float = 0.08  # CMC rank / min(D_in, D_out) (layer level only: not in the format)
    vlmq_damp: float = 0.01  # VLMQ's (GPTQ's) dampening ratio

    # ------------------------------------------------------------------------------------------
    def resolved(self) -> "CalibrationConfig":
        """A copy with the preset filled in and every value checked."""
        if self.method not in PRESETS:
            raise RecipeError(f"method: expected one of {', '.join(METHODS)}, got {self.method!r}")
        out = dataclasses.replace(self, ignore=list(self.ignore))
        for k, v in PRESETS[self.method].items():
            if getattr(out, k) is None:
                setattr(out, k, v)
        if out.clip_lr is None:
            out.clip_lr = 10 * out.lr
        out.validate()
        return out

    def validate(self) -> None:
        def choice(name: str, options) -> None:
            if getattr(self, name) not in options:
                raise RecipeError(
                    f"{name}: expected one of {', '.join(map(str, options))}, got {getattr(self, name)!r}"
                )

        try:
            SplitQScheme.from_name(self.scheme)
        except ValueError as e:
            raise RecipeError(f"scheme: {e}") from None
        choice("mac_rows", MAC_ROWS)
        choice("selection", SELECTIONS)
        choice("cws_lowrank", LOWRANK_MODES)
        choice("mac_lowrank", LOWRANK_MODES)
        choice("transform_init", TRANSFORM_INITS)
        choice("smooth_init", SMOOTH_INITS)
        choice("on_bad_sample", ON_BAD_SAMPLE)
        choice("offload_dtype", ("float32", "bfloat16", "float16"))
        for name in ("text_ratio", "vision_ratio", "cws_ratio", "mac_ratio"):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or not 0 <= v < 0.5:
                raise RecipeError(f"{name}: expected a fraction in [0, 0.5), got {v!r}")
        for name in (
            "mocd_k", "mocd_max_tokens", "batch_size", "num_samples", "max_seq_len", "log_every",
            "baseline_max_tokens", "mbq_grid",
        ):  # fmt: skip
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise RecipeError(f"{name}: expected a positive integer, got {v!r}")
        for name in ("max_memory_gb", "activation_memory_gb"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, (int, float)) or isinstance(v, bool) or v < 0):
                raise RecipeError(f"{name}: expected a non-negative number of GB, got {v!r}")
        if not isinstance(self.epochs, int) or self.epochs < 0:
            raise RecipeError(f"epochs: expected a non-negative integer, got {self.epochs!r}")
        if not isinstance(self.masquant_epochs, int) or self.masquant_epochs < 0:
            raise RecipeError(f"masquant_epochs: expected a non-negative integer, got {self.masquant_epochs!r}")
        if not isinstance(self.masquant_rank_ratio, (int, float)) or not 0 <= self.masquant_rank_ratio <= 1:
            raise RecipeError(f"masquant_rank_ratio: expected a fraction in [0, 1], got {self.masquant_rank_ratio!r}")
        for name in ("lr", "clip_lr", "smooth_alpha", "smoothquant_alpha", "vlmq_damp"):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or v < 0:
                raise RecipeError(f"{name}: expected a non-negative number, got {v!r}")
        if not isinstance(self.ignore, list) or not all(isinstance(p, str) for p in self.ignore):
            raise RecipeError(f"ignore: expected a list of strings, got {self.ignore!r}")
        if not isinstance(self.quantize_vision_tower, bool):
            raise RecipeError(f"quantize_vision_tower: expected true or false, got {self.quantize_vision_tower!r}")
        if self.quantize_vision_tower and self.method in ("mbq", "masquant", "vlmq"):
            raise RecipeError(
                f"quantize_vision_tower: supported with the SplitQ-family methods, not with the {self.method} baseline"
            )

    # ------------------------------------------------------------------------------------------
    @property
    def quant_scheme(self) -> SplitQScheme:
        return SplitQScheme.from_name(self.scheme, act_symmetric=self.act_symmetric, mac_rows=self.mac_rows)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def identity(self) -> dict[str, Any]:
        """The settings that determine the checkpoint (what a resumed run must repeat).
        quantize_vision_tower appears only when on: checkpoints without it stay as they were."""
        out = {k: v for k, v in self.to_dict().items() if k not in RUNTIME_ONLY}
        if not out["quantize_vision_tower"]:
            del out["quantize_vision_tower"]
        return out

    def fingerprint(self, extra: dict[str, Any] | None = None) -> str:
        blob = json.dumps({"config": self.identity(), **(extra or {})}, sort_keys=True, default=str)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    @classmethod
    def from_dict(cls, d: dict[str, Any], where: str = "recipe") -> "CalibrationConfig":
        """The settings, `{"splitq": settings}`, or an llm-compressor-shaped recipe (module docstring)."""
        if not isinstance(d, dict):
            raise RecipeError(f"{where}: expected a mapping of settings, got {type(d).__name__}; {EXPECTED_SHAPE}")
        if set(d) == {"splitq"}:
            d = d["splitq"] or {}
        elif _is_staged(d):
            d = _staged_settings(d, where)
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise RecipeError(
                f"{where}: unknown setting(s) {', '.join(map(str, unknown))} (known: {', '.join(sorted(known))}); "
                + EXPECTED_SHAPE
            )
        return cls(**d)

    def updated(self, **overrides: Any) -> "CalibrationConfig":
        known = {f.name for f in fields(self)}
        unknown = sorted(set(overrides) - known)
        if unknown:
            raise RecipeError(f"unknown setting(s) {', '.join(unknown)}")
        return dataclasses.replace(self, **overrides)


def load_recipe(path: str | os.PathLike) -> CalibrationConfig:
    """A YAML (or JSON) recipe file (`CalibrationConfig.from_dict` says which shapes)."""
    import yaml

    p = Path(path)
    if not p.is_file():
        raise RecipeError(f"recipe {p}: file not found")
    try:
        data = yaml.safe_load(p.read_text())
    except yaml.YAMLError as e:
        raise RecipeError(f"recipe {p}: not valid YAML: {e}") from None
    return CalibrationConfig.from_dict(data or {}, where=f"recipe {p}")


def resolve_recipe(recipe: Any) -> CalibrationConfig:
    """Whatever llm-compressor's `oneshot(recipe=...)` users pass: None, a CalibrationConfig, a
    SplitQModifier (or a list holding just one), a mapping, a YAML file, or YAML text."""
    if recipe is None:
        return CalibrationConfig()
    if isinstance(recipe, CalibrationConfig):
        return recipe
    if isinstance(recipe, SplitQModifier):
        return recipe.config()
    if isinstance(recipe, (list, tuple)):
        if len(recipe) == 1 and isinstance(recipe[0], SplitQModifier):
            return recipe[0].config()
        kinds = [type(m).__name__ for m in recipe]
        raise RecipeError(f"recipe: modifiers {kinds}: splitq-calibrate runs one {MODIFIER}; {EXPECTED_SHAPE}")
    if isinstance(recipe, dict):
        return CalibrationConfig.from_dict(recipe)
    if isinstance(recipe, (str, os.PathLike)):
        if isinstance(recipe, str) and "\n" in recipe and not Path(recipe).is_file():  # YAML text
            import yaml

            try:
                data = yaml.safe_load(recipe)
            except yaml.YAMLError as e:
                raise RecipeError(f"recipe (YAML text): not valid YAML: {e}") from None
            return CalibrationConfig.from_dict(data or {}, where="recipe (YAML text)")
        return load_recipe(recipe)
    raise RecipeError(f"recipe: a {type(recipe).__name__} is not a SplitQ recipe; {EXPECTED_SHAPE}")


def dump_recipe(config: CalibrationConfig) -> str:
    import yaml

    return yaml.safe_dump({"splitq": config.to_dict()}, sort_keys=False)
