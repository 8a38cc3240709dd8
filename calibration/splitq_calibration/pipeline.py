"""The sequential pipeline of `calibrate()` / `splitq-calibrate` (FlatQuant style), resumable.

1. Samples go through the model's processor and chat template (data.py): the data set is read
   and validated before any weight is loaded.
2. The model is a skeleton (source_model.SourceModel): parameters on the meta device, each part
   read from the safetensors files at its turn. The run's peak memory is estimated from the
   widths (memory.py) and a run that will not fit stops here, with the numbers.
3. Decoder layer 0's inputs are captured for every sample (capture.py): only the embeddings,
   the vision tower and the projector are loaded and run, on the device, then released.
   Activations live in an activation store (activations.py): bf16 on the host up to a budget,
   spilled to `<output>.partial/activations/` beyond it.
4. Per decoder layer: its weights are read from the files, then the per-group method runs on it
   alone on the device in float32 (method.py: FP targets and statistics, channel selection and
   init, training, fold and quantize); its quantized groups are written to the work directory
   (workdir.py) and its weights released.
5. The next layer's input is this layer's FP output (FlatQuant's choice: no error propagation, so
   layers are independent given the FP activations, and a resumed run only has to recompute FP
   activations to continue).
   With `quantize_vision_tower` (vision_tower.py, the paper's A.4) the vision tower's blocks are
   calibrated the same way first, block by block (their own work files), every row a vision row;
   the language model is then calibrated on the FP tower's outputs.
6. The checkpoint is exported from the per-layer files, streamed (export.export_packed), then
   the work directory is removed.

Resuming: a run started with the same arguments finds `<output>.partial/`, recomputes the FP
activations up to the first unfinished layer (cheap: one forward per layer) and continues; every
random draw is seeded by (seed, layer, group), so the checkpoint is bit-identical to an
uninterrupted run on the same machine and device. The checkpoint carries no timestamps for the same
reason (timings go to the log and `--report`).
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from pathlib import Path
from typing import Any

import torch

from splitq_vllm.checkpoint import matches_ignore
from splitq_vllm.families import family_of_config
from splitq_vllm.model_layout import LinearGroup, linear_groups, source_tensor_files, vision_tower_groups

from .activations import ActivationSpace
from .capture import capture_layer0_inputs
from .data import CalibSample, prepare_samples
from .errors import CalibrationError
from .export import export_packed
from .layer import fp_layer_forward
from .memory import GB, Estimate, available_host_bytes, estimate, give_back_freed_memory, model_sizes, peak_memory_mb
from .method import calibrate_layer
from .mocd import text_row_plan
from .progress import at, log
from .recipe import CalibrationConfig, resolve_recipe
from .source_model import SourceModel
from .vision_tower import VISION_SEED_BLOCK0, capture_tower_inputs, tower_config, tower_of
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


def load_processor(model_dir: str | os.PathLike):
    from transformers import AutoConfig, AutoProcessor

    path = Path(model_dir)
    if not (path / "config.json").is_file():
        raise CalibrationError(f"model {path}: no config.json (expected a Hugging Face model directory)")
    return AutoProcessor.from_pretrained(path), AutoConfig.from_pretrained(path)


def load_samples(model_dir: str | os.PathLike, data: Any, cfg: CalibrationConfig) -> list[CalibSample]:
    """The calibration samples, processed and validated (no weights are read)."""
    processor, config = load_processor(model_dir)
    return prepare_samples(
        data,
        processor,
        config,
        num_samples=cfg.num_samples,
        max_seq_len=cfg.max_seq_len,
        seed=cfg.seed,
        image_dir=cfg.image_dir,
        prompt=cfg.prompt,
        on_bad_sample=cfg.on_bad_sample,
    )


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
    cfg = resolve_recipe(recipe).updated(**settings).resolved()
    return Calibrator(model, data, output, cfg).run()


def host_memory_limit(cfg: CalibrationConfig) -> float:
    """Bytes of host memory the run may use: --max-memory-gb, or 90% of what is available now."""
    return cfg.max_memory_gb * GB if cfg.max_memory_gb is not None else 0.9 * available_host_bytes()


def check_memory(est: Estimate, cfg: CalibrationConfig, sizes_note: str) -> None:
    """Stop a run whose estimated peak exceeds the memory it may use, with the numbers and the
    settings that would fit."""
    if est.device != "cpu" and torch.cuda.is_available():
        free, _ = torch.cuda.mem_get_info()
        if est.device_peak > free:
            raise CalibrationError(
                f"one decoder layer needs an estimated {est.device_peak / GB:.1f} GB of GPU memory ({sizes_note}), "
                f"the GPU has {free / GB:.1f} GB free; use a larger GPU, free it, or --device cpu"
            )
    limit = host_memory_limit(cfg)
    if est.peak <= limit:
        return
    phases = (
        f"capture {est.capture / GB:.1f} GB, layer statistics {est.stats / GB:.1f} GB, training {est.train / GB:.1f} GB"
    )
    hints = []
    over = est.peak - limit
    if est.activations_resident > 0:
        keep = max(0.0, 2 * est.activations_resident - over)
        if keep < 2 * est.activations_resident:
            hints.append(f"--activation-memory-gb {keep / GB:.1f} (spill the rest of the activations to disk)")
    hints.append("fewer or shorter samples (--num-samples, --max-seq-len)")
    hints.append("--device cuda (the layer phases on the GPU)")
    raise CalibrationError(
        f"this run needs an estimated {est.peak / GB:.1f} GB of host memory ({phases}; {sizes_note}), "
        f"more than the {limit / GB:.1f} GB it may use (--max-memory-gb). Settings that would fit: "
        + "; ".join(hints)
        + ". Or pass a larger --max-memory-gb if this machine has the memory."
    )


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
        samples = load_samples(self.model_dir, self.data, cfg)
        n_tok = sum(s.num_tokens for s in samples)
        n_vis = sum(s.num_vision_tokens for s in samples)
        log.info("%d calibration samples, %d tokens (%d vision, %d text)", len(samples), n_tok, n_vis, n_tok - n_vis)
        source = SourceModel(self.model_dir)
        source_config = source.config
        sizes = model_sizes(source.model, source.file_element_size)
        budget = None if cfg.activation_memory_gb is None else cfg.activation_memory_gb * GB
        est = estimate(
            sizes,
            [s.num_tokens for s in samples],
            [s.num_vision_tokens for s in samples],
            budget,
            torch.empty(0, dtype=self.offload_dtype).element_size(),
            self.device.type,
        )
        if budget is None:  # what the memory limit leaves for the activations
            budget = max(0.0, host_memory_limit(cfg) - (est.peak - 2 * est.activations_resident))
        log.info(
            "estimated peak memory %.1f GB (capture %.1f, layer statistics %.1f, training %.1f; "
            "activations %.2f GB per set)",
            est.peak / GB,
            est.capture / GB,
            est.stats / GB,
            est.train / GB,
            est.activations / GB,
        )
        check_memory(est, cfg, f"{len(source.layers)} decoder layers of {sizes.layer_params / 1e6:.0f} M parameters")
        groups = linear_groups(source.model, list(source_tensor_files(self.model_dir)))
        todo = groups_to_quantize(groups, cfg.ignore)
        ignore = cfg.ignore
        self.vision_by_block: dict[int, list[LinearGroup]] = {}
        if cfg.quantize_vision_tower:
            ignore = tower_of(source.model).ignore_list(cfg.ignore)
            tower_groups = vision_tower_groups(source.model, list(source_tensor_files(self.model_dir)))
            for g in groups_to_quantize(tower_groups, ignore):
                self.vision_by_block.setdefault(g.layer, []).append(g)
        fingerprint = {
            "config": cfg.identity(),
            "model": str(self.model_dir.resolve()),
            "samples": samples_fingerprint(samples),
            "state_version": STATE_VERSION,
        }
        done = self.work.open(fingerprint, cfg.restart)
        num_layers = len(source.layers)
        by_layer: dict[int, list[LinearGroup]] = {}
        for g in todo:
            by_layer.setdefault(g.layer, []).append(g)
        remaining = [i for i in range(num_layers) if i not in done]
        self.vision_remaining = sorted(set(self.vision_by_block) - self.work.done_vision_blocks())
        if done:
            log.info("resuming %s: layers %s already calibrated", self.work.path, sorted(done))
        report: dict[str, Any] = {
            "layers": {},
            "device": str(self.device),
            "samples": len(samples),
            "tokens": n_tok,
            "estimate": est.as_dict(),
        }
        space = ActivationSpace(self.work.path / "activations", budget)
        try:
            if remaining or self.vision_remaining:
                self._calibrate_layers(source, samples, remaining, done, by_layer, space, report)
        finally:
            space.remove()
        report["spilled_gb"] = space.spilled_bytes / GB
        del source
        give_back_freed_memory()
        t_export = time.perf_counter()
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
        }
        metadata["layer_loss_init_final"] = [
            [info.get("init_loss"), info.get("final_loss")]
            for info in (self.work.layer_info(i) for i in range(num_layers))
        ]
        packed = self.work.packed_groups(num_layers, by_layer)
        if self.vision_by_block:
            blocks = max(self.vision_by_block) + 1
            metadata["vision_block_loss_init_final"] = [
                [info.get("init_loss"), info.get("final_loss")]
                for info in (self.work.layer_info(b, vision=True) for b in sorted(self.vision_by_block))
            ]
            packed = self.work.packed_groups(blocks, self.vision_by_block, vision=True) + packed
        path = export_packed(
            self.model_dir,
            self.output,
            packed,
            scheme,
            ignore=[*ignore, *(p for p in family_of_config(source_config).ignore_patterns() if p not in ignore)],
            calibration=metadata,
            overwrite=cfg.overwrite,
        )
        report["export_s"] = time.perf_counter() - t_export
        report["seconds"] = time.perf_counter() - t_start
        report.update(peak_memory_mb(self.device))
        if cfg.report:
            Path(cfg.report).write_text(json.dumps(report, indent=2, default=str))
        if not cfg.keep_work_dir:
            self.work.remove()
        log.info("wrote %s in %.1f s", path, report["seconds"])
        return path

    def _calibrate_layers(
        self,
        source: SourceModel,
        samples: list[CalibSample],
        remaining: list[int],
        done: set[int],
        by_layer: dict[int, list[LinearGroup]],
        space: ActivationSpace,
        report: dict[str, Any],
    ) -> None:
        """Capture, then the layers up to the last unfinished one (each read, run, released)."""
        cfg = self.config
        num_layers = len(source.layers)
        t0 = time.perf_counter()
        source.load_before_layers(self.device)
        tower_inputs = None
        if self.vision_remaining:
            tower_inputs = capture_tower_inputs(source.model, samples, self.device, self.offload_dtype, space.store())
        inputs = capture_layer0_inputs(source.model, samples, self.device, self.offload_dtype, space.store())
        source.release_before_layers()
        give_back_freed_memory()
        report["capture_s"] = time.perf_counter() - t0
        log.info("layer-0 inputs captured in %.1f s", report["capture_s"])
        if tower_inputs is not None:
            self._calibrate_tower(source, tower_inputs, space, report)
        if not remaining:
            return
        text_rows = text_row_plan(inputs.text_masks, cfg.mocd_max_tokens, cfg.seed)
        for i in range(max(remaining) + 1):
            with at(f"layer {i + 1}/{num_layers}"):
                tl = time.perf_counter()
                layer = source.load_layer(i, self.device)
                load_s = time.perf_counter() - tl
                previous = inputs.hidden
                inputs.at_layer(i)  # the layer type's kwargs, the deepstack features added after layer i - 1
                if i in done:
                    log.info("done earlier, recomputing its FP output")
                    inputs.hidden = fp_layer_forward(
                        layer, inputs, self.device, self.offload_dtype, space.store(), consume=True
                    )
                else:
                    info = self._calibrate_block(layer, i, i, by_layer.get(i, []), inputs, cfg, text_rows,
                                                 i < num_layers - 1, space)  # fmt: skip
                    report["layers"][i] = {"load_s": load_s, **info}
                previous.release()
                del layer
                source.release_layer(i)
                give_back_freed_memory()
        report["reads"] = [dataclasses.asdict(r) for r in source.reads]

    def _calibrate_block(
        self,
        module: torch.nn.Module,
        index: int,
        seed: int,
        groups: list[LinearGroup],
        inputs,
        cfg: CalibrationConfig,
        text_rows: list[torch.Tensor],
        want: bool,
        space: ActivationSpace,
        path=None,
    ) -> dict[str, Any]:
        """One decoder layer or tower block (consumed): its groups calibrated and written to its work
        file (`path`, else layer `index`'s); its FP output the next one's input when `want`, else
        released. Returns the calibration info."""
        store = space.store()
        result, outputs = calibrate_layer(
            module, seed, inputs, [g.kind for g in groups], cfg, self.device, self.offload_dtype, text_rows,
            want_outputs=want, store=store, consume=True,
        )  # fmt: skip
        by_kind = {g.kind: g for g in groups}
        self.work.save_layer(
            index,
            {by_kind[k].name: q for k, q in result.quantized.items()},
            self.config.quant_scheme,
            {k: result.info[k] for k in ("init_loss", "final_loss")},
            path=path,
        )
        if want:
            inputs.hidden = outputs
        else:
            store.release()
        return result.info

    def _calibrate_tower(
        self, source: SourceModel, inputs, space: ActivationSpace, report: dict[str, Any]
    ) -> None:
        """The vision tower's blocks up to the last unfinished one (vision_tower.py): each read,
        calibrated (all rows vision) or, if done earlier, run FP; its FP output the next one's input."""
        cfg = tower_config(self.config)
        tower = tower_of(source.model)
        done = self.work.done_vision_blocks()
        text_rows = [torch.zeros(0, dtype=torch.long) for _ in inputs.text_masks]  # no text rows
        last = max(self.vision_remaining)
        depth = len(source.model.get_submodule(tower.blocks))
        report["vision_blocks"] = {}
        for b in range(last + 1):
            with at(f"vision block {b + 1}/{depth}"):
                prefix = f"{tower.blocks}.{b}"
                block = source.load(prefix, device=self.device)
                previous = inputs.hidden
                inputs.at_layer(b)
                groups = self.vision_by_block.get(b, [])
                want = b < last
                if b in done or not groups:
                    inputs.hidden = fp_layer_forward(
                        block, inputs, self.device, self.offload_dtype, space.store(), consume=True
                    )
                else:
                    report["vision_blocks"][b] = self._calibrate_block(
                        block, b, VISION_SEED_BLOCK0 + b, groups, inputs, cfg, text_rows, want, space,
                        path=self.work.vision_block_file(b),
                    )
                previous.release()
                del block
                source.release(prefix)
                give_back_freed_memory()
