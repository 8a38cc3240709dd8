"""Calibration's memory behaviour at tiny widths (issue 12): what is resident and what is read when.

The real-width figures are benchmarks (benchmarks/calibrate_real_width.py, BENCHMARKS.md); these
tests guard the behaviour that makes them hold: the whole model is never loaded, a decoder
layer's weights are read from the files only at its turn and released after it, the resident
weights do not grow with the number of layers, activations spill to disk past their budget
without changing the checkpoint, the export streams from the work directory and writes what the
unpacked export writes, and a run that will not fit stops before it loads anything.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch

from splitq_calibration import calibrate
from splitq_calibration.errors import CalibrationError
from splitq_calibration.export import export_checkpoint
from splitq_calibration.pipeline import groups_to_quantize
from splitq_calibration.recipe import CalibrationConfig
from splitq_calibration.source_model import SourceModel
from splitq_calibration.workdir import WorkDir
from splitq_vllm.model_layout import linear_groups, source_tensor_files
from splitq_vllm.testing.images import write_sharegpt
from splitq_vllm.testing.models import TinySize, build_tiny_qwen25vl

FAST = dict(num_samples=4, epochs=1, batch_size=2, scheme="w4a4")


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[int, Path]:
    root = tmp_path_factory.mktemp("scale")
    return {n: build_tiny_qwen25vl(root / f"tiny-{n}l", size=TinySize(layers=n)) for n in (2, 4)}


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return write_sharegpt(tmp_path_factory.mktemp("scale-data"), 4)


def _files(d: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(d.iterdir()) if p.is_file()}


def _run(model: Path, data: Path, out: Path, **kw) -> dict:
    report = out.with_suffix(".report.json")
    calibrate(model, data, out, report=str(report), **{**FAST, **kw})
    return json.loads(report.read_text())


def test_layers_are_read_at_their_turn_and_resident_weights_do_not_grow(models, data, tmp_path):
    peaks = {}
    for n, model in models.items():
        source = SourceModel(model)
        layer_bytes = source.layer_bytes(0)
        report = _run(model, data, tmp_path / f"out-{n}")
        reads = report["reads"]
        prefix = source.layers_prefix
        # first what runs before layer 0 (no decoder layer, no output head), then each layer once, in order
        assert [r["prefix"] for r in reads] == ["<model>"] + [f"{prefix}.{i}" for i in range(n)]
        assert reads[0]["nbytes"] < sum(p.numel() * 2 for p in source.model.parameters()) - n * layer_bytes
        # when a layer is read, nothing else is resident: the capture's parts and the previous layer are released
        for r in reads[1:]:
            assert r["nbytes"] == layer_bytes and r["resident"] == layer_bytes
        peaks[n] = max(r["resident"] for r in reads[1:])
    assert peaks[2] == peaks[4]


def test_spilled_activations_give_the_same_checkpoint(models, data, tmp_path):
    kept = _run(models[2], data, tmp_path / "kept")
    spilled = _run(models[2], data, tmp_path / "spilled", activation_memory_gb=0)
    assert kept["spilled_gb"] == 0 and spilled["spilled_gb"] > 0
    assert _files(tmp_path / "kept") == _files(tmp_path / "spilled")
    assert not (tmp_path / "spilled.partial").exists()  # the spill directory went with the work directory


def test_streamed_export_writes_what_the_unpacked_export_writes(models, data, tmp_path):
    out = tmp_path / "streamed"
    calibrate(models[2], data, out, keep_work_dir=True, **FAST)
    work = WorkDir.for_output(out)
    source = SourceModel(models[2])
    groups = groups_to_quantize(
        linear_groups(source.model, list(source_tensor_files(models[2]))), CalibrationConfig().ignore
    )
    scheme = CalibrationConfig(**FAST).resolved().quant_scheme
    quantized, losses = {}, []
    for i in range(len(source.layers)):
        states, info = work.load_layer(i, scheme)
        losses.append([info["init_loss"], info["final_loss"]])
        quantized.update({g.name: (g, states[g.name]) for g in groups if g.layer == i})
    calib = json.loads((out / "config.json").read_text())["quantization_config"]["calibration"]
    assert calib["layer_loss_init_final"] == losses
    export_checkpoint(models[2], tmp_path / "unpacked", quantized, scheme, calibration=calib)
    assert _files(out) == _files(tmp_path / "unpacked")


def test_a_run_that_will_not_fit_stops_before_loading_weights(models, data, tmp_path):
    with pytest.raises(CalibrationError, match=r"needs an estimated [0-9.]+ GB .* more than the 0\.0 GB") as e:
        calibrate(models[2], data, tmp_path / "out", max_memory_gb=0.01, **FAST)
    assert "Settings that would fit" in str(e.value) and "--activation-memory-gb" in str(e.value)
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()


def test_the_data_is_validated_before_the_model_is_read(models, tmp_path):
    """A bad data file is reported even when the model's weights are unreadable: they are not read yet."""
    model = tmp_path / "model"
    model.mkdir()
    for p in models[2].iterdir():
        (model / p.name).write_bytes(p.read_bytes())
    weights = next(model.glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes()[:1000])  # truncated
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"image": "missing.png", "conversations": [{"from": "human", "value": "<image>hi"}]}\n')
    with pytest.raises(Exception, match="missing.png"):
        calibrate(model, bad, tmp_path / "out", **FAST)


def test_source_model_loads_what_from_pretrained_loads(models):
    from transformers import AutoModelForImageTextToText

    full = AutoModelForImageTextToText.from_pretrained(models[2]).state_dict()
    source = SourceModel(models[2])
    assert source.resident_bytes() == 0
    source.load_before_layers()
    source.load_layer(1)
    loaded = {n: p for n, p in source.model.named_parameters() if p.device.type != "meta"}
    assert loaded and all(torch.equal(p, full[n]) for n, p in loaded.items())
    assert not any(n.startswith(f"{source.layers_prefix}.0.") for n in loaded)
    assert not any(n.startswith(h + ".") for h in source.head_prefixes for n in loaded)
    source.release_before_layers()
    source.release_layer(1)
    assert source.resident_bytes() == 0


def test_nothing_of_a_layer_outlives_its_turn(models, data, tmp_path, monkeypatch):
    """When a layer is released, no calibration state of it is alive (no GroupParams, whose frozen
    weights are the layer's size): what made the peak grow by a layer per layer at 7B width."""
    import gc

    from splitq_calibration.group_params import GroupParams

    alive = []
    release = SourceModel.release_layer

    def release_and_count(self, i):
        release(self, i)
        gc.collect()
        alive.append(sum(isinstance(o, GroupParams) for o in gc.get_objects()))

    monkeypatch.setattr(SourceModel, "release_layer", release_and_count)
    _run(models[4], data, tmp_path / "out")
    assert alive == [0, 0, 0, 0]
