"""The stress variant of a ToyVQA model: the same function, with planted modality outliers.

The bundled model is small and trained briefly, so its activations have none of the massive,
modality-specific outlier channels of the paper's Fig. 2, and at W4A8-W3A3 every method is
within noise of 16 bits on it. This module plants that structure without changing what the
model computes: at each linear input of each decoder layer it multiplies a few channels by a
power of two and divides the weights that read them by the same power of two.

- qkv input: `input_layernorm.weight[c] * s`, `q/k/v_proj.weight[:, c] / s`;
- gate_up input: `post_attention_layernorm.weight[c] * s`, `gate/up_proj.weight[:, c] / s`;
- down input (silu(gate) * up is linear in up): `up_proj.weight[c, :] * s`, `down_proj.weight[:, c] / s`;
- o input (attention is linear in v): `v_proj.weight[c, :]` and `v_proj.bias[c] * s`,
  `o_proj.weight[:, j] / s` for every query head j that reads kv channel c (grouped-query attention).

Multiplying and dividing by a power of two is exact in binary floating point (away from overflow
and underflow), and every product a linear computes is the same number as before, so the 16-bit
model's logits are bit-identical (tested) while its activations get outliers like a 7B VLM's.

Which channels: chosen from the FP model's own calibration statistics (`splitq-inspect`'s per-channel
text and vision maxima), so that the structure matches the data:
- vision-dominant channels (1% of a site's channels, at least 2): the largest ratio of vision to
  text magnitude (each normalised by its median over channels); scaled so that their vision
  maximum becomes 32-128x the median channel's (log-uniform, seeded): a few channels with huge
  magnitudes on vision tokens only;
- text-dominant channels (2%, at least 3): the largest ratio of text to vision magnitude among the
  rest; scaled to 8-32x the median text maximum: more channels, moderate outliers on text tokens.
MOCD's default sets (2% text, 2% vision) can hold every planted channel.

What rescaling cannot do: change how much more a channel carries on one modality than on the
other (the "dominance" in the model card, each side relative to its median). That is the model's:
about 2x at the qkv, o and gate_up inputs of the bundled model, 5-36x at its down_proj inputs. So
the plants make per-token activation quantizers fail (one outlier sets a token's whole grid) and
are undone by any per-channel smoothing (SmoothQuant's among them) wherever one scale serves both
modalities; the modality split itself matters where the dominance is large.

CLI: python -m splitq_toyvqa.stress --output /tmp/toyvqa-stress [--model models/toyvqa-qwen25vl]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

REPO = Path(__file__).resolve().parents[2]
BUNDLED = REPO / "models" / "toyvqa-qwen25vl"
SITES = ("qkv", "o", "gate_up", "down")
VISION_FRACTION, VISION_MIN, VISION_GAIN = 0.01, 2, (32.0, 128.0)
TEXT_FRACTION, TEXT_MIN, TEXT_GAIN = 0.02, 3, (8.0, 32.0)
PLANTS_FILE = "stress_plants.json"


@dataclass(frozen=True)
class Plant:
    """One planted channel: at `site` of decoder `layer`, channel `channel` (an input channel of
    the site's linears; for the o site a v_proj output channel) is multiplied by 2**log2_factor."""

    layer: int
    site: str
    channel: int
    modality: str  # "vision" | "text": which tokens the channel is an outlier on
    log2_factor: int
    dominance: float = 1.0  # its magnitude on `modality` over that on the other, each / its median (unchanged by the plant)


def _medians(vision: torch.Tensor, text: torch.Tensor) -> tuple[float, float]:
    eps = 1e-12
    return max(float(vision.median()), eps), max(float(text.median()), eps)


def plan_site(
    layer: int, site: str, vision: torch.Tensor, text: torch.Tensor, rng: random.Random
) -> list[Plant]:
    """The plants of one site from its per-channel vision and text maxima (|x| over the calibration
    tokens; for the o site per v channel). Deterministic given `rng`'s state."""
    d = vision.numel()
    mv, mt = _medians(vision, text)
    v_rel, t_rel = vision / mv, text / mt
    eps = 1e-6
    k_v = min(d, max(VISION_MIN, round(VISION_FRACTION * d)))
    k_t = min(d - k_v, max(TEXT_MIN, round(TEXT_FRACTION * d)))
    vision_first = torch.argsort(v_rel / (t_rel + eps), descending=True, stable=True)
    chosen_v = vision_first[:k_v].tolist()
    rest = torch.ones(d, dtype=torch.bool)
    rest[chosen_v] = False
    text_score = torch.where(rest, t_rel / (v_rel + eps), torch.full_like(t_rel, -1.0))
    chosen_t = torch.argsort(text_score, descending=True, stable=True)[:k_t].tolist()
    plants = []
    for modality, chosen, values, median, (lo, hi), dominance in (
        ("vision", chosen_v, vision, mv, VISION_GAIN, v_rel / (t_rel + eps)),
        ("text", chosen_t, text, mt, TEXT_GAIN, t_rel / (v_rel + eps)),
    ):
        for c in chosen:
            target = math.exp(rng.uniform(math.log(lo), math.log(hi))) * median
            k = round(math.log2(target / max(float(values[c]), 1e-12)))
            plants.append(Plant(layer, site, int(c), modality, max(0, k), round(float(dominance[c]), 2)))
    return plants


def _o_site_by_v_channel(x: torch.Tensor, heads: int, kv_heads: int) -> torch.Tensor:
    """o_proj input statistics (heads * head_dim,) -> per v channel (kv_heads * head_dim,): the
    largest over the query heads that read it."""
    head_dim = x.numel() // heads
    return x.view(kv_heads, heads // kv_heads, head_dim).amax(1).reshape(-1)


def text_config(config: dict[str, Any]) -> dict[str, Any]:
    return config.get("text_config", config)


def collect_site_stats(
    model_dir: str | os.PathLike, data: str | os.PathLike, image_dir: str | os.PathLike, num_samples: int
) -> dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]]:
    """(layer, site) -> (vision maxima, text maxima) per channel of the FP model on the data,
    read by the calibration's own capture (splitq-inspect's statistics)."""
    from splitq_calibration.inspect_channels import layer_input_stats
    from splitq_calibration.recipe import CalibrationConfig

    cfg = CalibrationConfig(num_samples=num_samples, image_dir=str(image_dir), device="cpu").resolved()
    layers = text_config(json.loads((Path(model_dir) / "config.json").read_text()))["num_hidden_layers"]
    out = {}
    for layer in range(layers):
        stats, _ = layer_input_stats(model_dir, str(data), layer, list(SITES), cfg)
        for site in SITES:
            out[(layer, site)] = (stats[site].vision_absmax.clone(), stats[site].text_absmax.clone())
    return out


def plan_plants(
    site_stats: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]], config: dict[str, Any], seed: int = 0
) -> list[Plant]:
    """Every plant of the model, site by site in (layer, SITES) order."""
    tc = text_config(config)
    heads, kv_heads = tc["num_attention_heads"], tc["num_key_value_heads"]
    rng = random.Random(seed)
    plants = []
    for layer, site in sorted(site_stats, key=lambda k: (k[0], SITES.index(k[1]))):
        vision, text = site_stats[(layer, site)]
        if site == "o":
            vision, text = _o_site_by_v_channel(vision, heads, kv_heads), _o_site_by_v_channel(text, heads, kv_heads)
        plants += plan_site(layer, site, vision.float(), text.float(), rng)
    return plants


def _layer_prefix(tensors: dict[str, torch.Tensor], layer: int) -> str:
    tail = f"layers.{layer}.input_layernorm.weight"
    hits = [n for n in tensors if n.endswith(tail) and "visual" not in n and "vision" not in n]
    if len(hits) != 1:
        raise ValueError(f"cannot find the language model's decoder layer {layer} in the weights: {hits}")
    return hits[0][: -len("input_layernorm.weight")]


def apply_plants(tensors: dict[str, torch.Tensor], plants: list[Plant], config: dict[str, Any]) -> dict[str, torch.Tensor]:
    """A copy of the model's tensors with every plant applied (exact power-of-two rescaling)."""
    tc = text_config(config)
    heads, kv_heads = tc["num_attention_heads"], tc["num_key_value_heads"]
    head_dim = tc.get("head_dim") or tc["hidden_size"] // heads
    out = {k: v.clone() for k, v in tensors.items()}
    for p in plants:
        if p.log2_factor == 0:
            continue
        s = 2.0**p.log2_factor
        pre = _layer_prefix(out, p.layer)
        c = p.channel

        def scale(name: str, index: tuple, factor: float) -> None:
            t = out[pre + name]
            t[index] = (t[index].double() * factor).to(t.dtype)

        if p.site in ("qkv", "gate_up"):
            norm, readers = ("input_layernorm", ("q_proj", "k_proj", "v_proj")) if p.site == "qkv" else (
                "post_attention_layernorm", ("gate_proj", "up_proj"))  # fmt: skip
            scale(f"{norm}.weight", (c,), s)
            part = "self_attn" if p.site == "qkv" else "mlp"
            for r in readers:
                scale(f"{part}.{r}.weight", (slice(None), c), 1 / s)
        elif p.site == "down":
            scale("mlp.up_proj.weight", (c, slice(None)), s)
            if pre + "mlp.up_proj.bias" in out:
                scale("mlp.up_proj.bias", (c,), s)
            scale("mlp.down_proj.weight", (slice(None), c), 1 / s)
        elif p.site == "o":
            scale("self_attn.v_proj.weight", (c, slice(None)), s)
            if pre + "self_attn.v_proj.bias" in out:
                scale("self_attn.v_proj.bias", (c,), s)
            g, d = divmod(c, head_dim)
            for j in range(g * (heads // kv_heads), (g + 1) * (heads // kv_heads)):
                scale("self_attn.o_proj.weight", (slice(None), j * head_dim + d), 1 / s)
        else:
            raise ValueError(f"unknown site {p.site!r} (expected one of {SITES})")
    return out


def build_stress_model(
    output: str | os.PathLike,
    model_dir: str | os.PathLike = BUNDLED,
    num_samples: int = 64,
    seed: int = 0,
    overwrite: bool = False,
) -> Path:
    """Write the stress variant of `model_dir` to `output` (atomically); return its path. The
    channels are chosen on `num_samples` ToyVQA calibration pictures."""
    from .data import export_sharegpt4v, model_data_version

    model_dir, output = Path(model_dir), Path(output)
    if output.exists() and not overwrite:
        raise FileExistsError(f"{output} exists (pass overwrite=True / --overwrite to replace it)")
    files = sorted(model_dir.glob("*.safetensors"))
    if len(files) != 1:
        raise ValueError(f"{model_dir}: expected one .safetensors file, found {[f.name for f in files]}")
    config = json.loads((model_dir / "config.json").read_text())
    output.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=output.name + ".", dir=output.parent) as tmp:
        data = export_sharegpt4v(Path(tmp) / "data", "calibration", num_samples, version=model_data_version(model_dir))
        plants = plan_plants(collect_site_stats(model_dir, data, data.parent / "images", num_samples), config, seed)
        part = Path(tmp) / "model"
        part.mkdir()
        for f in model_dir.iterdir():
            # the training log too: the same function, so its record (and data version) still holds
            if f.is_file() and f.suffix != ".safetensors" and f.name != "README.md":
                shutil.copy2(f, part / f.name)
        save_file(apply_plants(load_file(files[0]), plants, config), part / files[0].name, metadata={"format": "pt"})
        record = {"source": str(model_dir), "num_samples": num_samples, "seed": seed,
                  "vision": {"fraction": VISION_FRACTION, "min": VISION_MIN, "gain": VISION_GAIN},
                  "text": {"fraction": TEXT_FRACTION, "min": TEXT_MIN, "gain": TEXT_GAIN},
                  "plants": [asdict(p) for p in plants]}  # fmt: skip
        (part / PLANTS_FILE).write_text(json.dumps(record, indent=1) + "\n")
        (part / "README.md").write_text(_model_card(model_dir, plants))
        if output.exists():
            shutil.rmtree(output)
        os.replace(part, output)
    return output


def load_plants(model_dir: str | os.PathLike) -> list[Plant]:
    record = json.loads((Path(model_dir) / PLANTS_FILE).read_text())
    return [Plant(**p) for p in record["plants"]]


def _model_card(source: Path, plants: list[Plant]) -> str:
    rows = []
    for site in SITES:
        for modality in ("vision", "text"):
            ps = [p for p in plants if p.site == site and p.modality == modality]
            if ps:
                ks = [p.log2_factor for p in ps]
                dom = sorted(p.dominance for p in ps)
                rows.append(f"| {site} | {modality} | {len(ps)} | 2^{min(ks)} .. 2^{max(ks)} | {dom[len(dom) // 2]:.1f} ({dom[0]:.1f} .. {dom[-1]:.1f}) |")
    return (
        f"# ToyVQA stress variant of {source.name}\n\n"
        "The same function as the source model (logits bit-identical), with modality-specific outlier\n"
        "channels planted by exact power-of-two rescaling (splitq_toyvqa/stress.py; every plant in\n"
        f"{PLANTS_FILE}). Planted channels over all decoder layers; dominance: a channel's magnitude on\n"
        "its modality over that on the other (each relative to its median over channels), which the\n"
        "model's own activations give and no rescaling can change:\n\n"
        "| site | outlier on | channels | factors | dominance: median (range) |\n|---|---|---|---|---|\n"
        + "\n".join(rows) + "\n"
    )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--output", type=Path, required=True)
    ap.add_argument("--model", type=Path, default=BUNDLED, help="source model (default: the bundled one)")
    ap.add_argument("--num-samples", type=int, default=64, help="calibration pictures the channels are chosen on")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--overwrite", action="store_true")
    args = ap.parse_args(argv)
    out = build_stress_model(args.output, args.model, args.num_samples, args.seed, args.overwrite)
    print(out)
    print((out / "README.md").read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
