"""The checkpoint format: bit-exact round trip through writer and reader, atomic writes, and a
clear message for each kind of bad input."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from splitq_kernels.reference import SplitQScheme, quantize_linear, split_outputs, splitq_linear
from splitq_vllm.checkpoint import CheckpointError, SplitQConfig, read_checkpoint, write_checkpoint
from splitq_vllm.testing.layers import random_activations, random_float_layer

PREFIX = "model.language_model.layers.0"
QKV = [f"{PREFIX}.self_attn.{p}_proj" for p in "qkv"]
O_PROJ = f"{PREFIX}.self_attn.o_proj"


def make_layers(scheme: SplitQScheme, seed: int = 0):
    """A fused q/k/v (shared input, 53 channels, outputs 20/9/8) and an o_proj without branches."""
    fused, _ = random_float_layer(53, 37, n_text=3, n_vision=5, kron=(5, 9), cws_rank=3, mac_rank=4, seed=seed)
    q, k, v = split_outputs(quantize_linear(fused, scheme), [20, 9, 8])
    o, _ = random_float_layer(20, 53, n_text=2, n_vision=0, kron=(3, 6), bias=False, seed=seed + 1)
    return {QKV[0]: q, QKV[1]: k, QKV[2]: v, O_PROJ: quantize_linear(o, scheme)}


def write(tmp_path: Path, scheme_name: str = "w4a4", name: str = "ckpt", **kwargs) -> Path:
    scheme = SplitQScheme.from_name(scheme_name)
    layers = make_layers(scheme)
    extra = {"model.language_model.norm.weight": torch.randn(53).to(torch.bfloat16), "lm_head.weight": torch.randn(11, 53)}
    return write_checkpoint(
        tmp_path / name,
        model_config={"model_type": "qwen2_5_vl", "architectures": ["Qwen2_5_VLForConditionalGeneration"]},
        quant_config=SplitQConfig(scheme=scheme, calibration={"method": "test", "samples": 0}),
        layers=layers,
        tensors=extra,
        groups={n: f"{PREFIX}.self_attn.qkv" for n in QKV},
        **kwargs,
    )


def rewrite_tensor(ckpt: Path, name: str, value=None, delete: bool = False) -> None:
    f = ckpt / "model.safetensors"
    tensors = load_file(str(f))
    if delete:
        del tensors[name]
    else:
        tensors[name] = value
    save_file(tensors, str(f), metadata={"format": "pt"})


def edit_config(ckpt: Path, fn) -> None:
    cfg = json.loads((ckpt / "config.json").read_text())
    fn(cfg["quantization_config"])
    (ckpt / "config.json").write_text(json.dumps(cfg))


@pytest.mark.parametrize("scheme_name", ["w4a8", "w4a4", "w3a3", "w3a2"])
@pytest.mark.parametrize("shard_bytes", [None, 700])
def test_round_trip_is_bit_exact(tmp_path, scheme_name, shard_bytes):
    kwargs = {} if shard_bytes is None else {"max_shard_bytes": shard_bytes}
    path = write(tmp_path, scheme_name, **kwargs)
    if shard_bytes:
        assert (path / "model.safetensors.index.json").is_file() and len(list(path.glob("*.safetensors"))) > 2
    ckpt = read_checkpoint(path)
    scheme = SplitQScheme.from_name(scheme_name)
    assert ckpt.scheme == scheme
    assert ckpt.quant_config.layers[QKV[1]].group == f"{PREFIX}.self_attn.qkv"
    assert ckpt.quant_config.calibration == {"method": "test", "samples": 0}
    original = make_layers(scheme)
    x = random_activations(7, 53, seed=3)
    mask = torch.tensor([True, False, False, True, True, False, True])
    for name, layer in original.items():
        back = ckpt.layer(name)
        for field in ("idx_main", "idx_text", "idx_vision", "main_smooth", "main_p1", "main_p2", "bias"):
            a, b = getattr(layer, field), getattr(back, field)
            assert (a is None and b is None) or torch.equal(a, b), (name, field)
        for field in ("main_w", "text_w", "vision_w", "cws_down", "cws_up", "mac_down", "mac_up"):
            a, b = getattr(layer, field), getattr(back, field)
            assert (a is None) == (b is None), (name, field)
            if a is not None:
                assert torch.equal(a.codes, b.codes) and torch.equal(a.scale, b.scale), (name, field)
        xin = x if layer.in_features == 53 else x[:, :20]
        assert torch.equal(splitq_linear(xin, mask, layer, scheme), splitq_linear(xin, mask, back, scheme))
    unq = dict(ckpt.unquantized_tensors())
    assert set(unq) == {"model.language_model.norm.weight", "lm_head.weight"}
    assert unq["model.language_model.norm.weight"].dtype == torch.bfloat16


def test_side_files_are_copied_and_weights_are_not(tmp_path):
    src = tmp_path / "model"
    src.mkdir()
    (src / "tokenizer.json").write_text("{}")
    (src / "preprocessor_config.json").write_text("{}")
    (src / "model.safetensors").write_bytes(b"x")
    (src / "config.json").write_text("{}")
    path = write(tmp_path, side_files_from=src)
    assert (path / "tokenizer.json").is_file() and (path / "preprocessor_config.json").is_file()
    assert json.loads((path / "config.json").read_text())["quantization_config"]["quant_method"] == "splitq"


def test_write_is_atomic_and_refuses_to_overwrite(tmp_path):
    path = write(tmp_path)
    before = (path / "model.safetensors").read_bytes()
    with pytest.raises(FileExistsError):
        write(tmp_path)
    # A failure mid-way leaves the old checkpoint as it was and no temporary directory behind.
    with pytest.raises(FileNotFoundError):
        write(tmp_path, "w3a3", overwrite=True, side_files_from=tmp_path / "no-such-model")
    assert (path / "model.safetensors").read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]
    write(tmp_path, "w3a3", overwrite=True)
    assert read_checkpoint(path).scheme.weight_bits == 3
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]


def test_missing_tensor(tmp_path):
    path = write(tmp_path)
    rewrite_tensor(path, f"{QKV[0]}.cws_up_wscale", delete=True)
    with pytest.raises(CheckpointError, match=rf"missing tensor '{QKV[0]}.cws_up_wscale'.*shape \[20\]"):
        read_checkpoint(path)


def test_wrong_shape(tmp_path):
    path = write(tmp_path)
    rewrite_tensor(path, f"{O_PROJ}.main_wscale", torch.ones(52))
    with pytest.raises(CheckpointError, match=rf"tensor '{O_PROJ}.main_wscale' in model.safetensors: shape \[52\], expected \[53\]"):
        read_checkpoint(path)


def test_wrong_dtype(tmp_path):
    path = write(tmp_path)
    t = load_file(str(path / "model.safetensors"))[f"{QKV[2]}.main_qweight"]
    rewrite_tensor(path, f"{QKV[2]}.main_qweight", t.to(torch.int8))
    with pytest.raises(CheckpointError, match=rf"'{QKV[2]}.main_qweight'.*dtype int8, expected uint8"):
        read_checkpoint(path)


def test_unknown_format_version(tmp_path):
    path = write(tmp_path)
    edit_config(path, lambda q: q.update(format_version=7))
    with pytest.raises(CheckpointError, match=r"format_version: unknown format version 7 \(this splitq-vllm reads 1\)"):
        read_checkpoint(path)


def test_overlapping_channel_sets(tmp_path):
    path = write(tmp_path)
    t = load_file(str(path / "model.safetensors"))
    idx_text = t[f"{O_PROJ}.idx_text"].clone()
    idx_text[0] = t[f"{O_PROJ}.idx_main"][4]
    rewrite_tensor(path, f"{O_PROJ}.idx_text", idx_text)
    c = int(idx_text[0])
    with pytest.raises(CheckpointError, match=rf"layer '{O_PROJ}': channel {c} appears in both idx_main and idx_text"):
        read_checkpoint(path)


def test_channel_index_out_of_range(tmp_path):
    path = write(tmp_path)
    t = load_file(str(path / "model.safetensors"))
    idx = t[f"{QKV[0]}.idx_vision"].clone()
    idx[1] = 60
    rewrite_tensor(path, f"{QKV[0]}.idx_vision", idx)
    with pytest.raises(CheckpointError, match=rf"'{QKV[0]}.idx_vision': channel index 60 out of range \[0, 53\)"):
        read_checkpoint(path)


def test_duplicate_channel_within_a_set(tmp_path):
    path = write(tmp_path)
    t = load_file(str(path / "model.safetensors"))
    idx = t[f"{O_PROJ}.idx_main"].clone()
    idx[1] = idx[0]
    rewrite_tensor(path, f"{O_PROJ}.idx_main", idx)
    with pytest.raises(CheckpointError, match=rf"channel {int(idx[0])} appears twice in idx_main"):
        read_checkpoint(path)


def test_channel_counts_not_covering_the_input(tmp_path):
    path = write(tmp_path)
    edit_config(path, lambda q: q["layers"][O_PROJ].update(in_features=21))
    with pytest.raises(CheckpointError, match=r"main 18 \+ text 2 \+ vision 0 != in_features 21"):
        read_checkpoint(path)


def test_fused_shards_must_share_input_side_tensors(tmp_path):
    path = write(tmp_path)
    t = load_file(str(path / "model.safetensors"))
    rewrite_tensor(path, f"{QKV[1]}.main_p1", t[f"{QKV[1]}.main_p1"] * 1.001)
    with pytest.raises(CheckpointError, match=rf"tensors '{QKV[1]}.main_p1' and '{QKV[0]}.main_p1' differ.*group"):
        read_checkpoint(path)


def test_leftover_weight_and_non_finite_values(tmp_path):
    path = write(tmp_path)
    rewrite_tensor(path, f"{O_PROJ}.weight", torch.randn(53, 20))
    with pytest.raises(CheckpointError, match=rf"tensor '{O_PROJ}.weight'.*unexpected"):
        read_checkpoint(path)
    path = write(tmp_path, name="other")
    rewrite_tensor(path, f"{O_PROJ}.main_smooth", torch.full((18,), float("nan")))
    with pytest.raises(CheckpointError, match=rf"'{O_PROJ}.main_smooth': contains NaN"):
        read_checkpoint(path)


@pytest.mark.parametrize(
    "edit,message",
    [
        (lambda q: q.update(quant_method="gptq"), r"quant_method: expected 'splitq', got 'gptq'"),
        (lambda q: q.update(act_bits=1), r"act_bits: expected an integer in 2..8, got 1"),
        (lambda q: q.pop("weight_bits"), r"weight_bits: expected an integer in 2..8, got None"),
        (lambda q: q.update(mac_rows="image"), r"mac_rows: expected one of"),
        (lambda q: q.update(weight_symmetric=False), r"weight_symmetric: format version 1 stores symmetric"),
        (lambda q: q["layers"][O_PROJ].update(kron=[4, 6]), r"kron: 4 \* 6 != main 18"),
        (lambda q: q["layers"][O_PROJ].pop("group"), r"missing field 'group'"),
        (lambda q: q["layers"][QKV[2]].update(cws_rank=2), r"share group .* differ in their input-side dims"),
        (lambda q: q.update(ignore=["re:.*o_proj"]), r"'.*o_proj' is listed in layers but matches ignore"),
    ],
)
def test_bad_config_fields(tmp_path, edit, message):
    path = write(tmp_path)
    edit_config(path, edit)
    with pytest.raises(CheckpointError, match=message):
        read_checkpoint(path)


def test_not_a_checkpoint(tmp_path):
    with pytest.raises(CheckpointError, match="config.json: not found"):
        read_checkpoint(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llava"}))
    with pytest.raises(CheckpointError, match="no quantization_config"):
        read_checkpoint(tmp_path)
