"""splitq-calibrate end to end on the tiny models: a valid checkpoint for every scheme, every
baseline and ablation of the paper's tables as one invocation, YAML recipes, the Python API."""

import json

import pytest
import torch
import yaml
from transformers import AutoProcessor

from splitq_calibration import CalibrationConfig, calibrate, load_recipe, oneshot
from splitq_calibration.cli import calibrate_main
from splitq_vllm.checkpoint import read_checkpoint
from splitq_vllm.hf.model import SplitQLinearModule, load_quantized_model
from splitq_vllm.testing.images import captioned_images, draw_image, write_sharegpt

pytestmark = pytest.mark.usefixtures("single_thread")  # tests/conftest.py

FAST = ["--num-samples", "4", "--batch-size", "2", "-q"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_sharegpt(tmp_path_factory.mktemp("calib-data"), n=6)


def run_cli(model, data, out, *flags):
    rc = calibrate_main(["--model", str(model), "--data", str(data), "--output", str(out), *FAST, *flags])
    assert rc == 0
    return read_checkpoint(out)  # validates every tensor against the format


def _forward(path, src):
    model = load_quantized_model(path)
    processor = AutoProcessor.from_pretrained(src)
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What colour is the shape?"}]}]
    text = processor.apply_chat_template(msgs, add_generation_prompt=True)
    inputs = processor(text=[text], images=[draw_image("square", (30, 30, 220))], return_tensors="pt")
    with torch.no_grad():
        logits = model(**inputs).logits
    assert torch.isfinite(logits).all()
    return model


@pytest.mark.parametrize("scheme", ["w4a8", "w4a4", "w3a3", "w3a2"])
@pytest.mark.parametrize("which", ["qwen", "llava"])
def test_cli_writes_a_valid_checkpoint_for_each_scheme(which, scheme, tiny_qwen_dir, tiny_llava_dir, data, tmp_path):
    src = tiny_qwen_dir if which == "qwen" else tiny_llava_dir
    out = tmp_path / f"{which}-{scheme}"
    ckpt = run_cli(src, data, out, "--scheme", scheme, "--epochs", "1")
    qc = ckpt.quant_config
    wb, ab = int(scheme[1]), int(scheme[3])
    assert (qc.scheme.weight_bits, qc.scheme.act_bits) == (wb, ab)
    assert (qc.scheme.aux_weight_bits, qc.scheme.aux_act_bits) == (max(4, wb), max(4, ab))
    assert len(qc.layers) == 14  # 2 decoder layers x 7 linears; vision tower, projector, lm_head ignored
    assert all(d.text > 0 and d.vision > 0 and d.cws_rank > 0 and d.mac_rank > 0 for d in qc.layers.values())
    assert not any("visual" in n or "vision_tower" in n or "lm_head" in n for n in qc.layers)
    assert qc.calibration["method"] == "splitq" and qc.calibration["samples"] == 4
    for f in ("tokenizer.json", "chat_template.jinja", "processor_config.json", "generation_config.json"):
        assert (out / f).is_file()
    assert not out.with_name(out.name + ".partial").exists()  # the work directory is cleaned up
    mods = [m for m in _forward(out, src).modules() if isinstance(m, SplitQLinearModule)]
    assert len(mods) == 14


def _layer(ckpt, name="model.layers.0.self_attn.q_proj"):
    return ckpt.layer(name)


def test_every_table_row_is_one_invocation(tiny_qwen_dir, data, tmp_path):
    """Tables 4-6 and 8-11: baselines and ablations give valid checkpoints with the right parts."""
    base = ["--scheme", "w3a3", "--epochs", "1"]
    dims = {}
    for method in ("rtn", "smoothquant", "flatquant", "mocd", "mocd_cws", "splitq"):
        ckpt = run_cli(tiny_qwen_dir, data, tmp_path / method, "--method", method, *base)
        d = ckpt.quant_config.layers["model.layers.0.self_attn.q_proj"]
        dims[method] = (d.text + d.vision > 0, d.cws_rank > 0, d.mac_rank > 0)
        q = _layer(ckpt)
        eye = lambda p: torch.equal(p, torch.eye(p.shape[0]))  # noqa: E731
        if method == "rtn":
            assert eye(q.main_p1) and eye(q.main_p2) and torch.all(q.main_smooth == 1)
            assert float(q.main_act_clip) == 1.0
        elif method == "smoothquant":
            assert eye(q.main_p1) and eye(q.main_p2) and not torch.all(q.main_smooth == 1)
        else:
            assert not eye(q.main_p1) and float(q.main_act_clip) < 1.0  # trained transforms and LAC
        assert ckpt.quant_config.calibration["method"] == method
    assert dims == {
        "rtn": (False, False, False),
        "smoothquant": (False, False, False),
        "flatquant": (False, False, False),
        "mocd": (True, False, False),
        "mocd_cws": (True, True, False),
        "splitq": (True, True, True),
    }
    # Table 4: channel selection rules (on MOCD-only); k of MOCD
    picked = {}
    for rule in ("none", "random", "text_max", "vision_max", "multi_max", "multi_mean", "mocd"):
        ckpt = run_cli(
            tiny_qwen_dir,
            data,
            tmp_path / f"sel-{rule}",
            "--method",
            "mocd",
            "--selection",
            rule,
            "--scheme",
            "w3a3",
            "--epochs",
            "0",
        )
        q = _layer(ckpt)
        picked[rule] = (tuple(q.idx_text.tolist()), tuple(q.idx_vision.tolist()))
        assert ckpt.quant_config.calibration["settings"]["selection"] == rule
    assert picked["none"] == ((), ())
    assert len({v for k, v in picked.items() if k != "none"}) >= 5  # the rules pick different channels
    k5 = _layer(
        run_cli(
            tiny_qwen_dir,
            data,
            tmp_path / "k5",
            "--method",
            "mocd",
            "--mocd-k",
            "1",
            "--scheme",
            "w3a3",
            "--epochs",
            "0",
        )
    )
    assert tuple(k5.idx_vision.tolist()) == picked["mocd"][1]  # k only changes the text set
    # Table 5: MAC target rows
    for rows in ("vision", "all"):
        ckpt = run_cli(
            tiny_qwen_dir, data, tmp_path / f"mac-{rows}", "--mac-rows", rows, "--scheme", "w3a2", "--epochs", "0"
        )
        assert ckpt.quant_config.scheme.mac_rows == rows
    # Tables 8-9: ranks; Tables 10-11: fixed low-rank branches
    ckpt = run_cli(
        tiny_qwen_dir,
        data,
        tmp_path / "ranks",
        "--cws-ratio",
        "0.05",
        "--mac-ratio",
        "0.1",
        "--cws-lowrank",
        "fixed",
        "--mac-lowrank",
        "fixed",
        "--epochs",
        "0",
    )
    d = ckpt.quant_config.layers["model.layers.0.self_attn.q_proj"]
    assert (d.cws_rank, d.mac_rank) == (6, 13)  # 5% and 10% of rank 128
    assert ckpt.quant_config.calibration["settings"]["cws_lowrank"] == "fixed"
    # asymmetric activations
    ckpt = run_cli(tiny_qwen_dir, data, tmp_path / "asym", "--no-act-symmetric", "--scheme", "w3a2", "--epochs", "1")
    assert ckpt.quant_config.scheme.act_symmetric is False
    _forward(tmp_path / "asym", tiny_qwen_dir)


def test_fixed_low_rank_keeps_the_gates_and_learnable_trains_them(tiny_qwen_dir, data, tmp_path):
    from splitq_calibration.group_params import GroupParams
    from splitq_calibration.mocd import ChannelStats

    w = torch.randn(64, 128)
    st = ChannelStats.empty(128)
    st.absmax += 1
    idx = torch.tensor([1, 2]), torch.tensor([3])
    for mode, trained in (("fixed", False), ("learnable", True)):
        cfg = CalibrationConfig(cws_lowrank=mode, mac_lowrank=mode).resolved()
        p = GroupParams(w, None, *idx, st, cfg, torch.Generator().manual_seed(0))
        main, clip = p.param_groups()
        assert any(x is p.gate_cws for x in main) == trained and any(x is p.gate_mac for x in main) == trained
        assert p.smooth.requires_grad and p.p1.requires_grad and clip


def test_yaml_recipe_holds_the_same_settings(tiny_qwen_dir, data, tmp_path, capsys):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        yaml.safe_dump({"splitq": {"method": "mocd_cws", "scheme": "w3a3", "epochs": 0, "num_samples": 3, "seed": 7}})
    )
    cfg = load_recipe(recipe)
    assert (cfg.method, cfg.scheme, cfg.epochs) == ("mocd_cws", "w3a3", 0)
    a = run_cli(tiny_qwen_dir, data, tmp_path / "from-recipe", "--recipe", str(recipe))
    b = run_cli(
        tiny_qwen_dir,
        data,
        tmp_path / "from-flags",
        "--method",
        "mocd_cws",
        "--scheme",
        "w3a3",
        "--epochs",
        "0",
        "--seed",
        "7",
    )
    assert a.quant_config.calibration == b.quant_config.calibration
    assert a.quant_config.calibration["settings"]["num_samples"] == 4  # FAST's --num-samples 4 wins over the recipe
    # --dump-recipe prints the effective settings, which load back unchanged
    capsys.readouterr()
    assert calibrate_main(["--recipe", str(recipe), "--scheme", "w4a8", "--dump-recipe"]) == 0
    dumped = tmp_path / "dumped.yaml"
    dumped.write_text(capsys.readouterr().out)
    again = load_recipe(dumped)
    assert again.scheme == "w4a8" and again.method == "mocd_cws" and again.cws_ratio == 0.02 and again.mac_ratio == 0.0
    # unknown settings and bad values are named
    recipe.write_text("splitq:\n  epocs: 3\n")
    with pytest.raises(ValueError, match="unknown setting.*epocs"):
        load_recipe(recipe)
    with pytest.raises(SystemExit):
        calibrate_main(["--scheme", "w9a9", "--dump-recipe"])


def test_python_api(tiny_qwen_dir, tmp_path):
    samples = [{"id": n, "image": img, "caption": cap} for n, img, cap in captioned_images(3)]
    out = calibrate(tiny_qwen_dir, samples, tmp_path / "api", scheme="w4a8", epochs=1, batch_size=2)
    ckpt = read_checkpoint(out)
    assert ckpt.quant_config.scheme.name == "w4a8"
    assert ckpt.quant_config.calibration["data"] == "python list of 3 samples"
    out2 = tmp_path / "oneshot"
    oneshot(
        model=tiny_qwen_dir,
        dataset=samples,
        output_dir=out2,
        recipe={"method": "rtn", "scheme": "w4a4"},
        num_calibration_samples=2,
        max_seq_length=512,
    )  # tests/calibration/test_oneshot.py: the model it returns
    settings = read_checkpoint(out2).quant_config.calibration["settings"]
    assert (settings["method"], settings["num_samples"], settings["max_seq_len"]) == ("rtn", 2, 512)
    with pytest.raises(FileExistsError):
        calibrate(tiny_qwen_dir, samples, out2, method="rtn")
    assert calibrate(tiny_qwen_dir, samples, out2, method="rtn", overwrite=True) == out2
    assert json.loads((out2 / "config.json").read_text())["quantization_config"]["quant_method"] == "splitq"


def test_ignore_list_keeps_layers_in_16_bits(tiny_qwen_dir, data, tmp_path):
    ckpt = run_cli(
        tiny_qwen_dir,
        data,
        tmp_path / "ign",
        "--method",
        "rtn",
        "--ignore",
        "lm_head",
        "re:.*visual.*",
        r"re:.*layers\.1\.mlp\..*",
    )
    names = set(ckpt.quant_config.layers)
    assert (
        "model.layers.1.mlp.down_proj" not in names and "model.layers.1.self_attn.q_proj" in names and len(names) == 11
    )
    assert ckpt.tensor("model.layers.1.mlp.down_proj.weight").dtype == torch.bfloat16
    rc = calibrate_main(
        [
            "--model",
            str(tiny_qwen_dir),
            "--data",
            str(data),
            "--output",
            str(tmp_path / "bad"),
            *FAST,
            "--ignore",
            "k_proj",
        ]
    )
    assert rc == 2  # one member of the q/k/v group: refused with a message
