"""The sequential pipeline of `calibrate()` / `splitq-calibrate` (FlatQuant style), resumable.

1. Samples go through the model's processor and chat template (data.py).
2. Decoder layer 0's inputs are captured for every sample (capture.py): only the embeddings,
   the vision tower and the projector run, on the device; activations are kept in CPU memory.
3. Per decoder layer, alone on the device in float32, the per-group method (method.py: FP targets
   and statistics, channel selection and init, training, fold and quantize); its quantized groups
   are written to the work directory (workdir.py).
4. The next layer's input is this layer's FP output (FlatQuant's choice: no error propagation, so
   layers are independent given the FP activations, and a resumed run only has to recompute FP
   activations to continue).
5. The checkpoint is exported from the per-layer files (export.export_checkpoint), then the work
   directory is removed.

Resuming: a run started with the same arguments finds `<output>.partial/`, recomputes the FP
activations up to the first unfinished layer (cheap: one forward per layer) and continues; every
random draw is seeded by (seed, layer, group), so the checkpoint is bit-identical to an
uninterrupted run on the same machine and device. The checkpoint carries no timestamps for the same
reason (timings go to the log and `--report`).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import torch

from splitq_kernels.reference import SplitQLinear
from splitq_vllm.checkpoint import matches_ignore
from splitq_vllm.model_layout import LinearGroup, language_model_layers, linear_groups, source_tensor_files

from .capture import capture_layer0_inputs
from .data import prepare_samples
from .errors import CalibrationError
from .export import export_checkpoint
from .layer import fp_layer_forward
from .memory import peak_memory_mb
from .method import calibrate_layer
from .mocd import text_row_plan
from .progress import at, log
from .recipe import CalibrationConfig, load_recipe
from .workdir import STATE_VERSION, WorkDir, samples_fingerprint

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise CalibrationError(f"device {name!r}: CUDA is not available on this machine")
    return dev


def groups_to_quantize(groups: list[LinearGroup], ignore: list[str]) -> list[LinearGroup]:
    """The groups not matched by the ignore list; a group is ignored whole or not at all."""
    out = []
    for g in groups:
        hits = [matches_ignore(m, ignore) or matches_ignore(n, ignore) for m, n in zip(g.modules, g.names)]
        if all(hits):
            continue
        if any(hits):
            names = [m for m, h in zip(g.modules, hits) if h]
            raise CalibrationError(
                f"ignore list matches {names} but not the other linears of input group {g.name}; "
                "linears that share an input (q/k/v, gate/up) are quantized or ignored together"
            )
        out.append(g)
    return out


def load_model(model_dir: str | os.PathLike):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    path = Path(model_dir)
    if not (path / "config.json").is_file():
        raise CalibrationError(f"model {path}: no config.json (expected a Hugging Face model directory)")
    processor = AutoProcessor.from_pretrained(path)
    model = AutoModelForImageTextToText.from_pretrained(path, dtype="auto")
    return model.eval(), processor


def calibrate(
    model: str | os.PathLike,
    data: Any,
    output: str | os.PathLike,
    recipe: str | os.PathLike | dict | CalibrationConfig | None = None,
    **settings: Any,
) -> Path:
    """Calibrate `model` (a Hugging Face model directory) on `data` and write a SplitQ checkpoint
    to `output`; returns its path. `recipe`: a YAML file, a dict or a CalibrationConfig; keyword
    settings (CalibrationConfig fields, e.g. scheme="w3a3", epochs=5) override it."""
    if isinstance(recipe, CalibrationConfig):
        cfg = recipe
    elif isinstance(recipe, dict):
        cfg = CalibrationConfig.from_dict(recipe)
    elif recipe is not None:
        cfg = load_recipe(recipe)
    else:
        cfg = CalibrationConfig()
    cfg = cfg.updated(**settings).resolved()
    return Calibrator(model, data, output, cfg).run()


def oneshot(
    model: str | os.PathLike,
    dataset: Any,
    output_dir: str | os.PathLike,
    recipe: str | os.PathLike | dict | CalibrationConfig | None = None,
    num_calibration_samples: int | None = None,
    max_seq_length: int | None = None,
    **settings: Any,
) -> Path:
    """llm-compressor-style spelling of `calibrate`."""
    if num_calibration_samples is not None:
        settings["num_samples"] = num_calibration_samples
    if max_seq_length is not None:
        settings["max_seq_len"] = max_seq_length
    return calibrate(model, dataset, output_dir, recipe, **settings)


class Calibrator:
    """One calibration run: model directory, data and settings in, checkpoint directory out."""

    def __init__(
        self, model_dir: str | os.PathLike, data: Any, output: str | os.PathLike, config: CalibrationConfig
    ) -> None:
        self.model_dir = Path(model_dir)
        self.data = data
        self.output = Path(output)
        self.config = config
        self.work = WorkDir.for_output(self.output)
        self.device = resolve_device(config.device)
        self.offload_dtype = DTYPES[config.offload_dtype]

    def run(self) -> Path:
        cfg = self.config
        scheme = cfg.quant_scheme
        if self.output.exists() and not cfg.overwrite:
            raise FileExistsError(f"{self.output} exists; pass --overwrite (overwrite=True) to replace it")
        t_start = time.perf_counter()
        torch.manual_seed(cfg.seed)
        model, processor = load_model(self.model_dir)
        samples = prepare_samples(
            self.data,
            processor,
            model.config,
            num_samples=cfg.num_samples,
            max_seq_len=cfg.max_seq_len,
            seed=cfg.seed,
            image_dir=cfg.image_dir,
            prompt=cfg.prompt,
            on_bad_sample=cfg.on_bad_sample,
        )
        n_tok = sum(s.num_tokens for s in samples)
        n_vis = sum(s.num_vision_tokens for s in samples)
        log.info("%d calibration samples, %d tokens (%d vision, %d text)", len(samples), n_tok, n_vis, n_tok - n_vis)
        groups = linear_groups(model, list(source_tensor_files(self.model_dir)))
        todo = groups_to_quantize(groups, cfg.ignore)
        _, layers = language_model_layers(model)
        fingerprint = {
            "config": cfg.identity(),
            "model": str(self.model_dir.resolve()),
            "samples": samples_fingerprint(samples),
            "state_version": STATE_VERSION,
        }
        done = self.work.open(fingerprint, cfg.restart)
        num_layers = len(layers)
        by_layer: dict[int, list[LinearGroup]] = {}
        for g in todo:
            by_layer.setdefault(g.layer, []).append(g)
        remaining = [i for i in range(num_layers) if i not in done]
        if done:
            log.info("resuming %s: layers %s already calibrated", self.work.path, sorted(done))
        report: dict[str, Any] = {"layers": {}, "device": str(self.device), "samples": len(samples), "tokens": n_tok}
        if remaining:
            inputs = capture_layer0_inputs(model, samples, self.device, self.offload_dtype)
            text_rows = text_row_plan(inputs.text_masks, cfg.mocd_max_tokens, cfg.seed)
            for i in range(max(remaining) + 1):
                with at(f"layer {i + 1}/{num_layers}"):
                    if i in done:
                        log.info("done earlier, recomputing its FP output")
                        inputs.hidden = fp_layer_forward(layers[i], inputs, self.device, self.offload_dtype)
                        continue
                    kinds = [g.kind for g in by_layer.get(i, [])]
                    result, outputs = calibrate_layer(
                        layers[i],
                        i,
                        inputs,
                        kinds,
                        cfg,
                        self.device,
                        self.offload_dtype,
                        text_rows,
                        want_outputs=i < num_layers - 1,
                    )
                    by_kind = {g.kind: g for g in by_layer.get(i, [])}
                    self.work.save_layer(
                        i,
                        {by_kind[k].name: q for k, q in result.quantized.items()},
                        scheme,
                        {k: result.info[k] for k in ("init_loss", "final_loss")},
                    )
                    report["layers"][i] = result.info
                    if outputs is not None:
                        inputs.hidden = outputs
            del inputs
        # export from the per-layer files (the same path for fresh and resumed runs)
        quantized: dict[str, tuple[LinearGroup, SplitQLinear]] = {}
        layer_losses = []
        for i in range(num_layers):
            states, info = self.work.load_layer(i, scheme)
            layer_losses.append([info.get("init_loss"), info.get("final_loss")])
            for g in by_layer.get(i, []):
                quantized[g.name] = (g, states[g.name])
        metadata = {
            "method": cfg.method,
            "tool": "splitq-calibrate",
            "data": str(self.data)
            if not isinstance(self.data, (list, tuple))
            else f"python list of {len(self.data)} samples",
            "samples": len(samples),
            "tokens": n_tok,
            "vision_tokens": n_vis,
            "seed": cfg.seed,
            "settings": cfg.identity(),
            "layer_loss_init_final": layer_losses,
        }
        del model
        path = export_checkpoint(
            self.model_dir,
            self.output,
            quantized,
            scheme,
            ignore=list(cfg.ignore),
            calibration=metadata,
            overwrite=cfg.overwrite,
        )
        report["seconds"] = time.perf_counter() - t_start
        report.update(peak_memory_mb(self.device))
        if cfg.report:
            Path(cfg.report).write_text(json.dumps(report, indent=2, default=str))
        if not cfg.keep_work_dir:
            self.work.remove()
        log.info("wrote %s in %.1f s", path, report["seconds"])
        return path
