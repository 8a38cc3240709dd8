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

METHODS = ("splitq", "mocd_cws", "mocd", "flatquant", "smoothquant", "rtn")
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

# Settings that do not change the checkpoint: a resumed run may differ in these.
RUNTIME_ONLY = {"device", "overwrite", "restart", "keep_work_dir", "log_every", "report"}


class RecipeError(ValueError):
    """A setting with a bad value; the message names the setting."""


@dataclass
class CalibrationConfig:
    """Every setting of a calibration run (see the module docstring for the presets)."""

    # --- what to produce
    method: str = "splitq"
    scheme: str = "w4a4"
    act_symmetric: bool = True
    mac_rows: str = "text"  # which rows get the MAC compensation (Table 5): text | vision | all
    ignore: list[str] = field(default_factory=lambda: list(DEFAULT_IGNORE))
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
    offload_dtype: str = "float32"  # captured activations in CPU memory: float32 | bfloat16 | float16
    overwrite: bool = False
    restart: bool = False  # discard an unfinished run's work directory instead of resuming it
    keep_work_dir: bool = False
    log_every: int = 1
    report: str | None = None

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
        for name in ("mocd_k", "mocd_max_tokens", "batch_size", "num_samples", "max_seq_len", "log_every"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise RecipeError(f"{name}: expected a positive integer, got {v!r}")
        if not isinstance(self.epochs, int) or self.epochs < 0:
            raise RecipeError(f"epochs: expected a non-negative integer, got {self.epochs!r}")
        for name in ("lr", "clip_lr", "smooth_alpha", "smoothquant_alpha"):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or v < 0:
                raise RecipeError(f"{name}: expected a non-negative number, got {v!r}")
        if not isinstance(self.ignore, list) or not all(isinstance(p, str) for p in self.ignore):
            raise RecipeError(f"ignore: expected a list of strings, got {self.ignore!r}")

    # ------------------------------------------------------------------------------------------
    @property
    def quant_scheme(self) -> SplitQScheme:
        return SplitQScheme.from_name(self.scheme, act_symmetric=self.act_symmetric, mac_rows=self.mac_rows)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def identity(self) -> dict[str, Any]:
        """The settings that determine the checkpoint (what a resumed run must repeat)."""
        return {k: v for k, v in self.to_dict().items() if k not in RUNTIME_ONLY}

    def fingerprint(self, extra: dict[str, Any] | None = None) -> str:
        blob = json.dumps({"config": self.identity(), **(extra or {})}, sort_keys=True, default=str)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    @classmethod
    def from_dict(cls, d: dict[str, Any], where: str = "recipe") -> "CalibrationConfig":
        if not isinstance(d, dict):
            raise RecipeError(f"{where}: expected a mapping of settings, got {type(d).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise RecipeError(f"{where}: unknown setting(s) {', '.join(unknown)} (known: {', '.join(sorted(known))})")
        return cls(**d)

    def updated(self, **overrides: Any) -> "CalibrationConfig":
        known = {f.name for f in fields(self)}
        unknown = sorted(set(overrides) - known)
        if unknown:
            raise RecipeError(f"unknown setting(s) {', '.join(unknown)}")
        return dataclasses.replace(self, **overrides)


def load_recipe(path: str | os.PathLike) -> CalibrationConfig:
    """A YAML (or JSON) recipe: a mapping of CalibrationConfig fields, optionally under `splitq:`."""
    import yaml

    p = Path(path)
    if not p.is_file():
        raise RecipeError(f"recipe {p}: file not found")
    try:
        data = yaml.safe_load(p.read_text())
    except yaml.YAMLError as e:
        raise RecipeError(f"recipe {p}: not valid YAML: {e}") from None
    if isinstance(data, dict) and set(data) == {"splitq"}:
        data = data["splitq"]
    return CalibrationConfig.from_dict(data or {}, where=f"recipe {p}")


def dump_recipe(config: CalibrationConfig) -> str:
    import yaml

    return yaml.safe_dump({"splitq": config.to_dict()}, sort_keys=False)
