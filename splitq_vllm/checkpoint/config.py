"""`quantization_config` of a SplitQ checkpoint (config.json): parsing, validation, serialisation.

Every error names the field (docs/format.md is the specification).
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from typing import Any

from splitq_kernels.reference import SplitQScheme
from splitq_kernels.reference.scheme import MAC_ROWS

QUANT_METHOD = "splitq"
FORMAT_VERSION = 1
SUPPORTED_VERSIONS = (1,)
DEFAULT_IGNORE = ["lm_head", "re:.*visual.*", "re:.*vision_tower.*", "re:.*multi_modal_projector.*"]


class CheckpointError(ValueError):
    """A SplitQ checkpoint that cannot be used; the message names the file, field or tensor."""


@dataclass(frozen=True)
class LayerDims:
    """Shape of one quantized linear: the channel split, the Kronecker factors, the ranks.

    Layers with the same `group` read the same input (q/k/v, gate/up) and must share every
    input-side tensor bit for bit.
    """

    in_features: int
    out_features: int
    main: int
    text: int
    vision: int
    kron: tuple[int, int]
    cws_rank: int
    mac_rank: int
    group: str
    bias: bool

    @classmethod
    def from_dict(cls, d: Any, where: str) -> "LayerDims":
        if not isinstance(d, dict):
            raise CheckpointError(f"{where}: expected an object, got {type(d).__name__}")
        ints = ("in_features", "out_features", "main", "text", "vision", "cws_rank", "mac_rank")
        for k in (*ints, "kron", "group", "bias"):
            if k not in d:
                raise CheckpointError(f"{where}: missing field '{k}'")
        for k in ints:
            if not isinstance(d[k], int) or isinstance(d[k], bool) or d[k] < 0:
                raise CheckpointError(f"{where}.{k}: expected a non-negative integer, got {d[k]!r}")
        kron = d["kron"]
        if not (isinstance(kron, list) and len(kron) == 2 and all(isinstance(v, int) and v > 0 for v in kron)):
            raise CheckpointError(f"{where}.kron: expected [n1, n2] with positive integers, got {kron!r}")
        if not isinstance(d["group"], str) or not d["group"]:
            raise CheckpointError(f"{where}.group: expected a non-empty string, got {d['group']!r}")
        if not isinstance(d["bias"], bool):
            raise CheckpointError(f"{where}.bias: expected true or false, got {d['bias']!r}")
        dims = cls(**{k: d[k] for k in ints}, kron=(kron[0], kron[1]), group=d["group"], bias=d["bias"])
        if dims.main + dims.text + dims.vision != dims.in_features:
            raise CheckpointError(
                f"{where}: channel counts main {dims.main} + text {dims.text} + vision {dims.vision} "
                f"!= in_features {dims.in_features}"
            )
        if dims.kron[0] * dims.kron[1] != dims.main:
            raise CheckpointError(f"{where}.kron: {dims.kron[0]} * {dims.kron[1]} != main {dims.main}")
        if dims.main == 0 or dims.out_features == 0:
            raise CheckpointError(f"{where}: main channels and out_features must be positive")
        return dims

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["kron"] = list(self.kron)
        return d

    def input_side(self) -> tuple:
        """What layers of one group must agree on."""
        return (self.in_features, self.main, self.text, self.vision, self.kron, self.cws_rank, self.mac_rank)


@dataclass
class SplitQConfig:
    """The checkpoint's quantization_config: global bit settings, the ignore list, per-layer dims."""

    scheme: SplitQScheme
    layers: dict[str, LayerDims] = field(default_factory=dict)
    ignore: list[str] = field(default_factory=lambda: list(DEFAULT_IGNORE))
    calibration: dict[str, Any] = field(default_factory=dict)
    format_version: int = FORMAT_VERSION

    @classmethod
    def from_dict(cls, d: Any, source: str = "quantization_config") -> "SplitQConfig":
        if not isinstance(d, dict):
            raise CheckpointError(f"{source}: expected an object, got {type(d).__name__}")
        method = str(d.get("quant_method", "")).lower()
        if method != QUANT_METHOD:
            raise CheckpointError(f"{source}.quant_method: expected '{QUANT_METHOD}', got {d.get('quant_method')!r}")
        version = d.get("format_version")
        if version not in SUPPORTED_VERSIONS:
            raise CheckpointError(
                f"{source}.format_version: unknown format version {version!r} "
                f"(this splitq-vllm reads {', '.join(map(str, SUPPORTED_VERSIONS))})"
            )
        for k in ("weight_bits", "act_bits", "aux_weight_bits", "aux_act_bits"):
            v = d.get(k)
            if not isinstance(v, int) or isinstance(v, bool) or not 2 <= v <= 8:
                raise CheckpointError(f"{source}.{k}: expected an integer in 2..8, got {v!r}")
        if d.get("weight_symmetric", True) is not True:
            raise CheckpointError(f"{source}.weight_symmetric: format version 1 stores symmetric weights only")
        act_sym = d.get("act_symmetric", True)
        if not isinstance(act_sym, bool):
            raise CheckpointError(f"{source}.act_symmetric: expected true or false, got {act_sym!r}")
        mac_rows = d.get("mac_rows", "text")
        if mac_rows not in MAC_ROWS:
            raise CheckpointError(f"{source}.mac_rows: expected one of {list(MAC_ROWS)}, got {mac_rows!r}")
        ignore = d.get("ignore", [])
        if not isinstance(ignore, list) or not all(isinstance(p, str) for p in ignore):
            raise CheckpointError(f"{source}.ignore: expected a list of strings, got {ignore!r}")
        for p in ignore:
            if p.startswith("re:"):
                try:
                    re.compile(p[3:])
                except re.error as e:
                    raise CheckpointError(f"{source}.ignore: bad regular expression {p!r}: {e}") from None
        layers_raw = d.get("layers")
        if not isinstance(layers_raw, dict) or not layers_raw:
            raise CheckpointError(f"{source}.layers: expected a non-empty object of quantized layers")
        layers = {name: LayerDims.from_dict(v, f"{source}.layers[{name!r}]") for name, v in layers_raw.items()}
        groups: dict[str, tuple[str, LayerDims]] = {}
        for name, dims in layers.items():
            first = groups.setdefault(dims.group, (name, dims))
            if first[1].input_side() != dims.input_side():
                raise CheckpointError(
                    f"{source}.layers: '{name}' and '{first[0]}' share group '{dims.group}' but differ in "
                    "their input-side dims (in_features, channel counts, kron, ranks)"
                )
        calibration = d.get("calibration", {})
        if not isinstance(calibration, dict):
            raise CheckpointError(f"{source}.calibration: expected an object")
        scheme = SplitQScheme(
            weight_bits=d["weight_bits"],
            act_bits=d["act_bits"],
            aux_weight_bits=d["aux_weight_bits"],
            aux_act_bits=d["aux_act_bits"],
            act_symmetric=act_sym,
            mac_rows=mac_rows,
        )
        return cls(scheme=scheme, layers=layers, ignore=list(ignore), calibration=calibration, format_version=version)

    def to_dict(self) -> dict[str, Any]:
        s = self.scheme
        return {
            "quant_method": QUANT_METHOD,
            "format_version": self.format_version,
            "weight_bits": s.weight_bits,
            "act_bits": s.act_bits,
            "aux_weight_bits": s.aux_weight_bits,
            "aux_act_bits": s.aux_act_bits,
            "weight_symmetric": True,
            "act_symmetric": s.act_symmetric,
            "mac_rows": s.mac_rows,
            "ignore": list(self.ignore),
            "layers": {name: dims.to_dict() for name, dims in self.layers.items()},
            "calibration": dict(self.calibration),
        }

    def is_ignored(self, name: str) -> bool:
        """True when `name` (an HF module name) matches the ignore list (`matches_ignore`)."""
        return matches_ignore(name, self.ignore)


def matches_ignore(name: str, patterns: list[str]) -> bool:
    """The ignore-list rule, for calibration and serving alike: `name` (a module name) matches a
    pattern that is `re:REGEX` (full match), equal to it, or a dotted prefix or suffix of it
    (`visual` matches `visual.blocks.0.attn.qkv`; `lm_head` matches `model.lm_head`)."""
    for pattern in patterns:
        if pattern.startswith("re:"):
            if re.fullmatch(pattern[3:], name):
                return True
        elif name == pattern or name.startswith(pattern + ".") or name.endswith("." + pattern):
            return True
    return False
