"""`oneshot`: `calibrate` with llm-compressor's contract, for scripts written for llm-compressor.

    model = AutoModelForImageTextToText.from_pretrained(MODEL_ID, dtype="auto")
    processor = AutoProcessor.from_pretrained(MODEL_ID)
    oneshot(model=model, dataset=DATA, recipe=SplitQModifier(scheme="w4a4"),
            num_calibration_samples=128, max_seq_length=2048)
    model.save_pretrained(SAVE_DIR)          # a SplitQ checkpoint: vllm serve SAVE_DIR
    processor.save_pretrained(SAVE_DIR)

`model` is a transformers model (changed in place, as llm-compressor does: its decoder linears
become SplitQ layers and save_pretrained writes the SplitQ format), a local model directory, or
a Hugging Face Hub id; the calibrated model is returned either way. `output_dir` also writes the
checkpoint there (with the processor files); `recipe` is a SplitQModifier, a YAML file or text in
llm-compressor's shape, the settings themselves, or a CalibrationConfig (recipe.resolve_recipe);
`dataset` whatever `calibrate` reads (a ShareGPT4V file, a folder, records), or any iterable of
records such as a `datasets.Dataset`.

Why a model object costs more than a path: calibration reads the model from files, one decoder
layer at a time (a 72B never fits in memory), so an object is first written to a temporary
directory beside `output_dir` (or in $TMPDIR): one extra write and read of the model, and that
much free disk.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from .errors import CalibrationError
from .recipe import resolve_recipe

_HUB_ID = re.compile(r"[\w.-]+/[\w.-]+")


def _source_dir(model: str | os.PathLike) -> Path:
    """A local model directory, or the snapshot of a Hub id (from the Hub's cache when offline)."""
    path = Path(model)
    if path.is_dir() or not _HUB_ID.fullmatch(str(model)):
        return path  # calibrate names what is missing
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(str(model)))
    except Exception as e:
        raise CalibrationError(
            f"model {model}: not a local directory, and fetching it from the Hugging Face Hub failed "
            f"({type(e).__name__}: {e})"
        ) from None


def _save_object(model, processor, where: Path) -> Path:
    """The model object and its processor as a model directory (what calibration reads)."""
    from transformers import AutoProcessor

    if processor is None:
        try:
            processor = AutoProcessor.from_pretrained(model.config._name_or_path)
        except Exception as e:
            raise CalibrationError(
                f"oneshot(model=<{type(model).__name__}>): pass processor= (the model's AutoProcessor); "
                f"loading it from {model.config._name_or_path!r} failed ({type(e).__name__}: {e})"
            ) from None
    model.save_pretrained(where)
    processor.save_pretrained(where)
    return where


def oneshot(
    model: Any,
    dataset: Any = None,
    recipe: Any = None,
    output_dir: str | os.PathLike | None = None,
    processor: Any = None,
    num_calibration_samples: int | None = None,
    max_seq_length: int | None = None,
    **settings: Any,
):
    """Calibrate `model` with SplitQ and return the calibrated transformers model (module
    docstring); `settings` are CalibrationConfig fields and win over the recipe."""
    from transformers import AutoModelForImageTextToText, PreTrainedModel

    from splitq_vllm.hf.quantizer import quantize_in_place

    from .pipeline import calibrate

    if dataset is None:
        raise CalibrationError("oneshot: dataset= is required (calibration samples: docs/calibration.md, Data)")
    if num_calibration_samples is not None:
        settings["num_samples"] = num_calibration_samples
    if max_seq_length is not None:
        settings["max_seq_len"] = max_seq_length
    config = resolve_recipe(recipe).updated(**settings)
    if isinstance(dataset, Iterable) and not isinstance(dataset, (str, os.PathLike, list, tuple, dict)):
        dataset = list(dataset)  # a datasets.Dataset, a generator: calibrate reads lists
    is_object = isinstance(model, PreTrainedModel)
    scratch_parent = Path(output_dir).resolve().parent if output_dir is not None else None
    if scratch_parent is not None:
        scratch_parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=".splitq-oneshot-", dir=scratch_parent))
    try:
        source = _save_object(model, processor, scratch / "model") if is_object else _source_dir(model)
        out = calibrate(source, dataset, Path(output_dir) if output_dir is not None else scratch / "splitq", config)
        if is_object:
            return quantize_in_place(model, out)
        return AutoModelForImageTextToText.from_pretrained(out, dtype="auto")
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
