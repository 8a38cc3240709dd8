"""Vision-tower quantization (the paper's A.4, `--quantize-vision-tower`) on the tiny Qwen2.5-VL:
the tower's blocks calibrated block by block on what the real tower feeds them, every row a
vision row (no text outlier set, no MAC), the checkpoint holding the tower's groups, the
reference loaders running them with an all-vision mask, the plugin's config accepting them (served:
tests/plugin/test_qwen_tower.py)."""

import dataclasses

import pytest
import torch
from transformers import AutoModelForImageTextToText

from splitq_calibration.cli import calibrate_main
from splitq_calibration.errors import CalibrationError
from splitq_calibration.layer import fp_layer_forward
from splitq_calibration.pipeline import calibrate, load_samples
from splitq_calibration.recipe import CalibrationConfig, RecipeError
from splitq_calibration.source_model import SourceModel
from splitq_calibration.vision_tower import capture_tower_inputs, tower_config
from splitq_vllm.checkpoint import DEFAULT_IGNORE, read_checkpoint
from splitq_vllm.families import family_of_config, is_vision_tower_layer
from splitq_vllm.hf.model import SplitQLinearModule, load_quantized_model
from splitq_vllm.testing.images import write_sharegpt
from splitq_vllm.testing.models import build_tiny_qwen25vl

pytestmark = pytest.mark.usefixtures("single_thread")  # tests/conftest.py

FLAGS = ["--num-samples", "2", "--batch-size", "2", "--epochs", "1", "--scheme", "w4a4", "-q"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_sharegpt(tmp_path_factory.mktemp("tower-data"), n=4)


@pytest.fixture(scope="module")
def tower_ckpt(tiny_qwen_dir, data, tmp_path_factory):
    out = tmp_path_factory.mktemp("tower") / "ckpt"
    argv = ["--model", str(tiny_qwen_dir), "--data", str(data), "--output", str(out), *FLAGS]
    assert calibrate_main([*argv, "--quantize-vision-tower"]) == 0
    return out


def test_checkpoint_holds_the_tower_groups_without_text_set_or_mac(tower_ckpt):
    ckpt = read_checkpoint(tower_ckpt)  # validates every tensor
    config = _config(tower_ckpt)
    tower = family_of_config(config).vision_tower
    depth = config.vision_config.depth
    expected = {
        (f"visual.blocks.{b}.{g.parent}.{m}", f"visual.blocks.{b}.{g.parent}.{g.kind}")
        for b in range(depth)
        for g in tower.block.groups
        for m in g.members
    }
    layers = ckpt.quant_config.layers
    got = {(n, d.group) for n, d in layers.items() if is_vision_tower_layer(n)}
    assert got == expected
    assert len(layers) > len(expected)  # the language model's layers are there too
    for n, _ in expected:
        d = layers[n]
        assert d.text == 0 and d.mac_rank == 0  # no text rows: no text outlier set, no MAC
        assert d.vision > 0 and d.cws_rank > 0  # the vision set (by magnitude) and CWS stay
    assert any(d.text > 0 and d.mac_rank > 0 for n, d in layers.items() if not is_vision_tower_layer(n))
    ignore = ckpt.quant_config.ignore
    assert "re:.*visual.*" not in ignore and r"re:.*visual\.merger.*" in ignore
    assert not any(n.startswith("visual.merger") or n.startswith("visual.patch_embed") for n in layers)
    assert ckpt.quant_config.calibration["settings"]["quantize_vision_tower"] is True
    assert len(ckpt.quant_config.calibration["vision_block_loss_init_final"]) == depth


def _config(path):
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(path)


def test_reference_tower_is_close_to_fp_and_quantized(tower_ckpt, tiny_qwen_dir, data):
    samples = load_samples(tiny_qwen_dir, data, CalibrationConfig(num_samples=2).resolved())
    fp = AutoModelForImageTextToText.from_pretrained(tiny_qwen_dir, dtype=torch.float32).eval()
    ref = load_quantized_model(tower_ckpt)
    via_hf = AutoModelForImageTextToText.from_pretrained(tower_ckpt, dtype=torch.float32).eval()  # quantizer path
    for model in (ref, via_hf):
        tower_mods = [m for n, m in model.named_modules() if isinstance(m, SplitQLinearModule) and "visual" in n]
        assert len(tower_mods) == 5 * fp.config.vision_config.depth and all(m.all_vision for m in tower_mods)
        lm_mods = [m for n, m in model.named_modules() if isinstance(m, SplitQLinearModule) and "visual" not in n]
        assert lm_mods and not any(m.all_vision for m in lm_mods)
    x = samples[0].inputs
    with torch.no_grad():
        outs = [m.model.visual(x["pixel_values"].float(), grid_thw=x["image_grid_thw"]) for m in (fp, ref, via_hf)]
        logits = ref(**x, use_cache=False).logits
    for key in ("last_hidden_state", "pooler_output"):
        a, b, c = (getattr(o, key) for o in outs)
        rel = float((a - b).norm() / a.norm())
        assert 1e-4 < rel < 0.05, (key, rel)  # close to the FP tower, and really quantized
        torch.testing.assert_close(b, c, rtol=0, atol=0)  # both loaders compute the checkpoint's forward
    assert torch.isfinite(logits).all()


def test_tower_inputs_are_what_the_real_tower_gives_its_blocks(tmp_path):
    src = build_tiny_qwen25vl(tmp_path / "fp32", dtype=torch.float32)  # float32 files: exact comparison
    # 224-px pictures: 16 x 16 patches, four 112-px windows, so window and full attention differ
    big = write_sharegpt(tmp_path / "data", n=2, size=224)
    samples = load_samples(src, big, CalibrationConfig(num_samples=2).resolved())
    real = AutoModelForImageTextToText.from_pretrained(src, dtype=torch.float32).eval()
    blocks = real.model.visual.blocks
    seen = []
    for s in samples:
        got = {}

        def record(i, args, kwargs):  # returns None: the block's arguments stay as they are
            got[i] = ((args[0] if args else kwargs["hidden_states"]).detach().clone(), kwargs)

        hooks = [
            b.register_forward_pre_hook(lambda m, a, kw, i=i: record(i, a, kw), with_kwargs=True)
            for i, b in enumerate(blocks)
        ]
        with torch.no_grad():
            real(**s.inputs, use_cache=False)
        for h in hooks:
            h.remove()
        seen.append(got)
    source = SourceModel(src)
    source.load_before_layers()
    inputs = capture_tower_inputs(source.model, samples, torch.device("cpu"), torch.float32)
    source.release_before_layers()
    assert len(inputs.hidden) == len(samples)
    assert all(not m.any() for m in inputs.text_masks)  # every row a vision row
    for b in range(len(blocks)):
        inputs.at_layer(b)
        for s in range(len(samples)):
            x, kw = seen[s][b]
            torch.testing.assert_close(inputs.input(s, torch.device("cpu")), x, rtol=1e-4, atol=1e-4)
            assert torch.equal(inputs.kwargs[s]["cu_seqlens"], kw["cu_seqlens"])  # window vs full attention
        block = source.load(f"model.visual.blocks.{b}", dtype=torch.float32)
        inputs.hidden = fp_layer_forward(block, inputs, torch.device("cpu"), torch.float32, consume=True)
        source.release(f"model.visual.blocks.{b}")
    # the tiny tower has window blocks and a last full-attention block: kwargs kept per type
    assert inputs.layer_types == ["window"] * (len(blocks) - 1) + ["full"]
    assert not torch.equal(seen[0][0][1]["cu_seqlens"], seen[0][len(blocks) - 1][1]["cu_seqlens"])


def test_default_settings_are_unchanged():
    cfg = CalibrationConfig().resolved()
    assert cfg.ignore == DEFAULT_IGNORE and "re:.*visual.*" in cfg.ignore
    assert "quantize_vision_tower" not in cfg.identity()  # default checkpoints keep their metadata
    on = cfg.updated(quantize_vision_tower=True).resolved()
    assert on.identity()["quantize_vision_tower"] is True
    t = tower_config(on)
    assert (t.text_ratio, t.mac_ratio) == (0.0, 0.0)
    assert dataclasses.replace(t, text_ratio=on.text_ratio, mac_ratio=on.mac_ratio) == on


def test_bad_settings_are_refused(tiny_llava_dir, data, tmp_path):
    with pytest.raises(RecipeError, match="quantize_vision_tower"):
        CalibrationConfig(method="mbq", quantize_vision_tower=True).resolved()
    with pytest.raises(RecipeError, match="quantize_vision_tower"):
        CalibrationConfig(quantize_vision_tower="yes").resolved()
    with pytest.raises(CalibrationError, match="no vision-tower description.*Qwen2.5-VL"):
        calibrate(tiny_llava_dir, data, tmp_path / "out", num_samples=2, epochs=0, quantize_vision_tower=True)


def test_plugin_config_takes_the_tower_layers(tower_ckpt, tiny_qwen_dir, data, tmp_path):
    from splitq_vllm.plugin.config import SplitQVllmConfig

    cfg = SplitQVllmConfig.from_config(read_checkpoint(tower_ckpt).quant_config.to_dict())
    assert len(cfg.tower_layers) == 5 * _config(tower_ckpt).vision_config.depth  # served all-vision
    plain = tmp_path / "plain"
    argv = ["--model", str(tiny_qwen_dir), "--data", str(data), "--output", str(plain), *FLAGS, "--epochs", "0"]
    assert calibrate_main(argv) == 0
    cfg = SplitQVllmConfig.from_config(read_checkpoint(plain).quant_config.to_dict())  # the default
    assert cfg.tower_layers == [] and not any(is_vision_tower_layer(n) for n in cfg.splitq.layers)


def test_resumed_tower_run_writes_the_same_checkpoint(tiny_qwen_dir, data, tmp_path):
    from safetensors.torch import load_file

    out = tmp_path / "ckpt"
    settings = dict(num_samples=2, batch_size=2, epochs=1, quantize_vision_tower=True, keep_work_dir=True)
    calibrate(tiny_qwen_dir, data, out, **settings)
    first = {f.name: load_file(f) for f in sorted(out.glob("*.safetensors"))}
    work = out.with_name(out.name + ".partial")
    # as if killed in the tower's second block: block 0 kept (its FP output recomputed), the rest redone
    (work / "vision_block_00001.safetensors").unlink()
    for f in work.glob("layer_*.safetensors"):
        f.unlink()
    kept = (work / "vision_block_00000.safetensors").stat().st_mtime_ns
    calibrate(tiny_qwen_dir, data, out, overwrite=True, **settings)
    assert (work / "vision_block_00000.safetensors").stat().st_mtime_ns == kept  # not recalibrated
    assert (work / "vision_block_00001.safetensors").is_file()
    again = {f.name: load_file(f) for f in sorted(out.glob("*.safetensors"))}
    assert first.keys() == again.keys()
    for name in first:
        assert first[name].keys() == again[name].keys()
        for k in first[name]:
            assert torch.equal(first[name][k], again[name][k]), k


def test_lm_groups_do_not_depend_on_the_tower_so_checkpoints_compose(tower_ckpt, tiny_qwen_dir, data, tmp_path):
    from safetensors import safe_open

    from splitq_vllm.hf.model import with_vision_tower_from

    def run(name, *extra):
        out = tmp_path / name
        argv = ["--model", str(tiny_qwen_dir), "--data", str(data), "--output", str(out), *FLAGS, *extra]
        assert calibrate_main(argv) == 0
        return out

    def tensors(path):
        ckpt = read_checkpoint(path)
        out = {}
        for name, file in ckpt.weight_map.items():
            if not is_vision_tower_layer(name):
                with safe_open(str(path / file), "pt") as fh:
                    out[name] = fh.get_tensor(name)
        return out

    # the LM is calibrated on the FP tower's outputs: its groups are the same with or without the tower
    plain = tensors(run("plain-w4a4"))
    with_tower = tensors(tower_ckpt)
    assert plain.keys() == with_tower.keys()
    assert all(torch.equal(plain[k], with_tower[k]) for k in plain)
    # so Table 13's "tower W4A4, LM W3A3" is the W3A3 checkpoint with the W4A4 checkpoint's tower
    lm = run("plain-w3a3", "--scheme", "w3a3")
    composed = with_vision_tower_from(load_quantized_model(lm), tower_ckpt)
    mods = {n: m for n, m in composed.named_modules() if isinstance(m, SplitQLinearModule)}
    assert {m.scheme.name for n, m in mods.items() if "visual" in n} == {"w4a4"}
    assert {m.scheme.name for n, m in mods.items() if "visual" not in n} == {"w3a3"}
    x = load_samples(tiny_qwen_dir, data, CalibrationConfig(num_samples=1).resolved())[0].inputs
    tower_model = load_quantized_model(tower_ckpt)
    with torch.no_grad():
        a = composed.model.visual(x["pixel_values"].float(), grid_thw=x["image_grid_thw"]).pooler_output
        b = tower_model.model.visual(x["pixel_values"].float(), grid_thw=x["image_grid_thw"]).pooler_output
        assert torch.equal(a, b)
        c = load_quantized_model(lm)(**x, use_cache=False).logits
        assert not torch.equal(composed(**x, use_cache=False).logits, c)  # the quantized tower is in use
    with pytest.raises(ValueError, match="no vision-tower layers"):
        with_vision_tower_from(load_quantized_model(lm), lm)
