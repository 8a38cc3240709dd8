"""Calibration on every supported family (splitq_vllm.families), end to end on its tiny model:
`splitq-calibrate` writes a checkpoint with the family's input groups, the transformers loader
runs it, and what the pipeline feeds each decoder layer is what the real model feeds it (the
kwargs of each layer type, the deepstack features of Qwen3-VL)."""

import pytest
import torch
from transformers import AutoModelForImageTextToText

from splitq_calibration.capture import capture_layer0_inputs
from splitq_calibration.cli import calibrate_main
from splitq_calibration.layer import fp_layer_forward
from splitq_calibration.pipeline import load_samples
from splitq_calibration.recipe import CalibrationConfig
from splitq_calibration.source_model import SourceModel
from splitq_vllm.checkpoint import read_checkpoint
from splitq_vllm.families import family_of_config
from splitq_vllm.hf.model import SplitQLinearModule, load_quantized_model
from splitq_vllm.model_layout import language_model_layers, text_config
from splitq_vllm.testing.images import write_sharegpt
from splitq_vllm.testing.models import TINY_BUILDERS

pytestmark = pytest.mark.usefixtures("single_thread")  # tests/conftest.py

NEW_FAMILIES = [f for f in TINY_BUILDERS if f not in ("Qwen2.5-VL", "LLaVA-1.5")]  # those: test_cli.py


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_sharegpt(tmp_path_factory.mktemp("calib-data"), n=4)


@pytest.mark.parametrize("family", NEW_FAMILIES)
def test_splitq_calibrate_quantizes_the_family_groups(family, tiny_model, data, tmp_path):
    src = tiny_model(family)
    out = tmp_path / "ckpt"
    flags = ["--num-samples", "2", "--batch-size", "2", "--epochs", "1", "--scheme", "w4a4", "-q"]
    assert calibrate_main(["--model", str(src), "--data", str(data), "--output", str(out), *flags]) == 0
    ckpt = read_checkpoint(out)  # validates every tensor
    model = load_quantized_model(out)
    fam = family_of_config(model.config)
    assert fam.name == family
    text_cfg = text_config(model.config)
    _, layers = language_model_layers(model)
    expected = {
        (i, g.kind, m) for i in range(len(layers)) for g in fam.layer_kind(text_cfg, i).groups for m in g.members
    }
    got = {(int(n.split("layers.")[1].split(".")[0]), d.group.rsplit(".", 1)[1], n.rsplit(".", 1)[1]) for n, d in ckpt.quant_config.layers.items()}
    assert got == expected
    assert not any("visual" in n or "vision" in n or "lm_head" in n for n in ckpt.quant_config.layers)
    mods = [m for m in model.modules() if isinstance(m, SplitQLinearModule)]
    assert len(mods) == len(expected)


@pytest.mark.parametrize("family", list(TINY_BUILDERS))
def test_each_layer_gets_the_input_the_model_gives_it(family, tiny_model, data, tmp_path):
    src = TINY_BUILDERS[family](tmp_path / "fp32", dtype=torch.float32)  # float32 files: exact comparison
    samples = load_samples(src, data, CalibrationConfig(num_samples=2).resolved())
    real = AutoModelForImageTextToText.from_pretrained(src, dtype=torch.float32).eval()
    prefix, real_layers = language_model_layers(real)
    # the final norm's input: the last layer's output (its type's kwargs checked too)
    watched = [*real_layers, real.get_submodule(prefix.rsplit(".", 1)[0] + ".norm")]
    seen: list[dict[int, torch.Tensor]] = []
    for s in samples:
        got: dict[int, torch.Tensor] = {}

        def record(i, args, kwargs):
            got[i] = (args[0] if args else kwargs["hidden_states"]).detach().clone()

        hooks = [
            layer.register_forward_pre_hook(lambda m, a, kw, i=i: record(i, a, kw), with_kwargs=True)
            for i, layer in enumerate(watched)
        ]
        with torch.no_grad():
            real(**s.inputs, use_cache=False)
        for h in hooks:
            h.remove()
        seen.append(got)

    source = SourceModel(src)
    source.load_before_layers()
    inputs = capture_layer0_inputs(source.model, samples, torch.device("cpu"), torch.float32)
    source.release_before_layers()
    for i in range(len(source.layers)):
        inputs.at_layer(i)
        for s in range(len(samples)):
            torch.testing.assert_close(inputs.input(s, torch.device("cpu")), seen[s][i], rtol=1e-4, atol=1e-4)
            if i == 1 and family_of_config(real.config).deepstack:  # the features matter: without them, a miss
                assert (inputs.hidden[s].float() - seen[s][i]).abs().max() > 1e-2
        layer = source.load_layer(i, dtype=torch.float32)
        inputs.hidden = fp_layer_forward(layer, inputs, torch.device("cpu"), torch.float32, consume=True)
        source.release_layer(i)
    inputs.at_layer(len(source.layers))
    for s in range(len(samples)):
        torch.testing.assert_close(inputs.input(s, torch.device("cpu")), seen[s][len(source.layers)], rtol=1e-4, atol=1e-4)
