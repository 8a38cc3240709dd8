"""Command lines: `splitq-calibrate`, `splitq-inspect`, `splitq-eval`.

Every CalibrationConfig field is a `splitq-calibrate` flag (`--text-ratio 0.02`); a YAML recipe
(`--recipe r.yaml`) holds the same settings, and flags given on the command line win over it.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
import typing
from pathlib import Path

from splitq_vllm.families import all_group_kinds

from .recipe import (
    METHODS,
    ON_BAD_SAMPLE,
    SELECTIONS,
    SMOOTH_INITS,
    TRANSFORM_INITS,
    CalibrationConfig,
    RecipeError,
    dump_recipe,
    load_recipe,
)

HELP = {
    "method": "preset for unset settings: " + ", ".join(METHODS) + " (default splitq); mbq, masquant, vlmq "
    "are the paper's baselines (docs/calibration.md, Baselines)",
    "scheme": "bits: w4a8, w4a4, w3a3, w3a2 (any wXaY, X,Y in 2..8)",
    "act_symmetric": "symmetric (default) or asymmetric per-token activations",
    "mac_rows": "rows that get MAC: text (the paper), vision, all (Table 5)",
    "ignore": "modules left in 16 bits (exact name, prefix, or re:REGEX); replaces the default list",
    "quantize_vision_tower": "also quantize the vision tower's blocks (the paper's A.4; Qwen2.5-VL): every row "
    "is a vision row, so no text outlier set and no MAC there; the merger stays 16-bit",
    "selection": "outlier channel rule: " + ", ".join(SELECTIONS) + " (Table 4)",
    "text_ratio": "fraction of input channels in the text outlier set (default 0.02)",
    "vision_ratio": "fraction of input channels in the vision outlier set (default 0.02)",
    "mocd_k": "k of MOCD's per-channel k-means (default 3)",
    "mocd_max_tokens": "text tokens sampled for MOCD's rank statistics (default 8192)",
    "cws_ratio": "CWS rank as a fraction of the full rank (splitq: 0.02; 0 = off)",
    "mac_ratio": "MAC rank as a fraction of the full rank (splitq: 0.03; 0 = off)",
    "cws_lowrank": "CWS factors: learnable gate (default) or fixed SVD (Table 10)",
    "mac_lowrank": "MAC factors: learnable gate (default) or fixed SVD (Table 11)",
    "train": "train transforms/clipping/gates (default: yes except rtn, smoothquant)",
    "transform_init": "Kronecker/outlier transform init: " + ", ".join(TRANSFORM_INITS),
    "smooth_init": "per-channel scale init: " + ", ".join(SMOOTH_INITS),
    "smooth_alpha": "FlatQuant diagonal-scale init alpha (default 0.3)",
    "smoothquant_alpha": "SmoothQuant migration strength (default 0.5)",
    "weight_clip": "learnable weight clipping (LWC)",
    "act_clip": "learnable activation clipping (LAC)",
    "clip_init": "clipping parameter init; factor = sigmoid(param) (default 4)",
    "epochs": "training epochs per layer (default 15)",
    "lr": "learning rate of transforms and gates (default 5e-3)",
    "clip_lr": "learning rate of clipping factors (default 10 x lr)",
    "weight_decay": "AdamW weight decay (default 0)",
    "batch_size": "samples per optimizer step (default 4)",
    "num_samples": "calibration samples (default 128)",
    "max_seq_len": "longest sample in tokens (default 2048); longer ones are errors",
    "seed": "seed of sample choice and every random init (default 0)",
    "image_dir": "folder image paths in a JSON/JSONL file are relative to (default: the file's folder)",
    "prompt": "user prompt for a folder of captioned images",
    "on_bad_sample": "what a broken sample does: " + ", ".join(ON_BAD_SAMPLE),
    "device": "cpu, cuda, cuda:N or auto (default)",
    "offload_dtype": "dtype of the activations kept between layers on the host (default bfloat16)",
    "max_memory_gb": "host memory the run may use; a run estimated above it stops before loading the model "
    "(default: 90%% of the available memory)",
    "activation_memory_gb": "activations kept in host memory, the rest spilled to <output>.partial/activations "
    "(default: what max-memory-gb leaves)",
    "overwrite": "replace an existing output directory",
    "restart": "discard an unfinished run instead of resuming it",
    "keep_work_dir": "keep <output>.partial/ after the export",
    "log_every": "log every N epochs",
    "report": "write timings, losses and peak memory per layer to this JSON file",
    "baseline_max_tokens": "group-input rows the baselines (mbq, masquant, vlmq) sample (default 8192)",
    "mbq_grid": "mbq: points of the migration-strength grid in [0, 1) (default 20)",
    "masquant_epochs": "masquant: MAS training epochs (default 2)",
    "masquant_rank_ratio": "masquant: CMC rank fraction, layer-level only (default 0.08)",
    "vlmq_damp": "vlmq: GPTQ dampening ratio (default 0.01)",
}



def _config_from_args(p: argparse.ArgumentParser, args: argparse.Namespace) -> CalibrationConfig:
    """The recipe (if any) with every flag given on the command line on top, resolved."""
    try:
        cfg = load_recipe(args.recipe) if args.recipe else CalibrationConfig()
        overrides = {
            f.name: getattr(args, f.name)
            for f in dataclasses.fields(CalibrationConfig)
            if getattr(args, f.name) is not None
        }
        return cfg.updated(**overrides).resolved()
    except RecipeError as e:
        p.error(str(e))

def _field_type(f: dataclasses.Field):
    hints = typing.get_type_hints(CalibrationConfig)
    t = hints[f.name]
    if typing.get_origin(t) in (typing.Union, getattr(__import__("types"), "UnionType", typing.Union)):
        t = next(a for a in typing.get_args(t) if a is not type(None))
    return t


def add_config_flags(parser: argparse.ArgumentParser) -> None:
    for f in dataclasses.fields(CalibrationConfig):
        flag = "--" + f.name.replace("_", "-")
        t = _field_type(f)
        kw = {"dest": f.name, "default": None, "help": HELP.get(f.name)}
        if t is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, **kw)
        elif typing.get_origin(t) is list or t is list:
            parser.add_argument(flag, nargs="*", metavar="PATTERN", **kw)
        else:
            parser.add_argument(flag, type=t, **kw)


def _setup_logging(verbose: bool, quiet: bool) -> None:
    level = logging.WARNING if quiet else logging.DEBUG if verbose else logging.INFO
    logging.basicConfig(
        level=level, format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S", stream=sys.stderr
    )
    logging.getLogger("splitq_calibration").setLevel(level)


def calibrate_main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="splitq-calibrate",
        description="Calibrate a Hugging Face VLM into a SplitQ checkpoint (servable with vllm serve DIR --quantization splitq).",
    )
    p.add_argument("--model", help="Hugging Face model directory (safetensors)")
    p.add_argument("--data", help="ShareGPT4V-style .json/.jsonl file, or a folder of images with captions")
    p.add_argument("--output", help="checkpoint directory to write")
    p.add_argument("--recipe", help="YAML recipe with the same settings as the flags (flags win)")
    p.add_argument("--dump-recipe", action="store_true", help="print the effective recipe as YAML and exit")
    p.add_argument("-v", "--verbose", action="store_true")
    p.add_argument("-q", "--quiet", action="store_true")
    add_config_flags(p)
    args = p.parse_args(argv)
    _setup_logging(args.verbose, args.quiet)
    cfg = _config_from_args(p, args)
    if args.dump_recipe:
        print(dump_recipe(cfg), end="")
        return 0
    missing = [n for n in ("model", "data", "output") if getattr(args, n) is None]
    if missing:
        p.error("missing " + ", ".join("--" + m for m in missing))
    from .data import CalibrationDataError
    from .errors import CalibrationError
    from .pipeline import Calibrator

    try:
        path = Calibrator(args.model, args.data, args.output, cfg).run()
    except (CalibrationDataError, CalibrationError, FileExistsError, RecipeError) as e:
        print(f"splitq-calibrate: error: {e}", file=sys.stderr)
        return 2
    print(path)
    return 0


def inspect_main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="splitq-inspect",
        description="Plot per-channel activation magnitudes of text vs vision tokens at one decoder layer input, "
        "marking the outlier channels MOCD picks (the paper's Fig. 2), as a PNG.",
    )
    p.add_argument("--model", required=True, help="Hugging Face model directory (the FP source model)")
    p.add_argument("--data", required=True, help="calibration data (as for splitq-calibrate)")
    p.add_argument("--layer", type=int, required=True, help="decoder layer index (0-based)")
    p.add_argument(
        "--group",
        default="qkv",
        choices=all_group_kinds(),
        help="which linear input (default qkv; linear_in / linear_out: Qwen3.5's Gated DeltaNet layers)",
    )
    p.add_argument("--output", required=True, help="PNG file to write")
    p.add_argument("--checkpoint", help="mark the channels stored in this SplitQ checkpoint instead of running MOCD")
    p.add_argument("--recipe", help="YAML recipe (channel ratios, k, data settings)")
    p.add_argument("-q", "--quiet", action="store_true")
    add_config_flags(p)
    args = p.parse_args(argv)
    _setup_logging(False, args.quiet)
    cfg = _config_from_args(p, args)
    from .data import CalibrationDataError
    from .errors import CalibrationError
    from .inspect_channels import inspect_layer

    try:
        result = inspect_layer(
            args.model, args.data, args.layer, args.group, args.output, cfg, checkpoint=args.checkpoint
        )
    except (CalibrationDataError, CalibrationError, ValueError) as e:
        print(f"splitq-inspect: error: {e}", file=sys.stderr)
        return 2
    print(result["png"])
    return 0


def eval_main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="splitq-eval",
        description="Answer image questions with a SplitQ checkpoint (or the FP model) in transformers and score them.",
    )
    p.add_argument("--model", required=True, help="SplitQ checkpoint directory, or an unquantized model directory")
    p.add_argument("--questions", required=True, help="JSON/JSONL: {image, question, answer?} per line")
    p.add_argument("--image-dir", help="folder the image paths are relative to (default: the file's folder)")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--device", default="auto")
    p.add_argument("--output", help="write the answers and scores as JSON here")
    p.add_argument("-q", "--quiet", action="store_true")
    args = p.parse_args(argv)
    _setup_logging(False, args.quiet)
    import json

    from .evaluate import score_questions

    result = score_questions(
        args.model, args.questions, image_dir=args.image_dir, max_new_tokens=args.max_new_tokens, device=args.device
    )
    if args.output:
        Path(args.output).write_text(json.dumps(result, indent=2))
    for r in result["answers"]:
        print(
            f"[{r['id']}] Q: {r['question']}\n    A: {r['prediction']!r}"
            + (
                f"  (expected {r['answer']!r}: {'ok' if r['correct'] else 'wrong'})"
                if r.get("answer") is not None
                else ""
            )
        )
    if result.get("accuracy") is not None:
        print(f"accuracy {result['accuracy']:.3f} on {result['scored']} questions")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(calibrate_main())
