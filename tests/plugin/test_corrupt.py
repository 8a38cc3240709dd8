"""Corrupt SplitQ checkpoints make the real OpenAI server fail at start-up, with a message naming
the tensor or field: not at the first request, and not silently.

The front end checks the files' headers before any engine process starts (missing tensors,
shapes, dtypes, the format version); what only the values show (input-side tensors that differ
between q/k/v) is caught while the worker loads them (test_plugin_linear_method.py covers the
remaining load-time cases inside vLLM's real layers).
"""

from __future__ import annotations

import json
import shutil
import time

import pytest
import torch
from safetensors.torch import load_file, save_file

from splitq_kernels.reference import SplitQScheme
from splitq_vllm.testing.synthetic import synthesize_checkpoint
from tests.helpers.engine import server_start_failure
from tests.plugin.generation import server_args

pytestmark = pytest.mark.vllm


@pytest.fixture(scope="module")
def good(tiny_qwen_dir, tmp_path_factory):
    return synthesize_checkpoint(tiny_qwen_dir, tmp_path_factory.mktemp("splitq") / "good", SplitQScheme.from_name("w4a4"))


def corrupt_copy(good, tmp_path, tensors=None, config=None):
    path = tmp_path / "corrupt"
    shutil.copytree(good, path)
    if tensors is not None:
        f = path / "model.safetensors"
        t = load_file(str(f))
        tensors(t)
        save_file(t, str(f), metadata={"format": "pt", "quant_method": "splitq"})
    if config is not None:
        cfg = json.loads((path / "config.json").read_text())
        config(cfg)
        (path / "config.json").write_text(json.dumps(cfg, indent=2))
    return path


def refused(path, *fragments):
    t0 = time.monotonic()
    code, log = server_start_failure(path, server_args())
    print(f"\nrefused after {time.monotonic() - t0:.1f} s")
    assert code not in (0, None)
    for fragment in fragments:
        assert fragment in log, f"{fragment!r} not in the server log:\n{log[-6000:]}"
    return log


def test_missing_tensor(good, tmp_path):
    name = "model.layers.1.mlp.down_proj.mac_up_wscale"
    path = corrupt_copy(good, tmp_path, tensors=lambda t: t.pop(name))
    log = refused(path, f"missing tensor '{name}'")
    assert "EngineCore" not in log  # refused by the front end, before any engine process


def test_wrong_shape(good, tmp_path):
    name = "model.layers.0.self_attn.k_proj.main_wscale"
    path = corrupt_copy(good, tmp_path, tensors=lambda t: t.__setitem__(name, t[name][:-1].clone()))
    refused(path, f"tensor '{name}'", "shape [63], expected [64]")


def test_unknown_format_version(good, tmp_path):
    path = corrupt_copy(good, tmp_path, config=lambda c: c["quantization_config"].__setitem__("format_version", 2))
    refused(path, "quantization_config.format_version: unknown format version 2")


def test_input_side_tensors_that_differ_fail_while_loading(good, tmp_path):
    """Headers fine, values not: q/k/v must share their input-side tensors bit for bit; the
    worker's loader compares them (vLLM would keep whichever shard it loaded last)."""

    def perturb(t):
        name = "model.layers.1.self_attn.v_proj.main_smooth"
        t[name] = t[name] * torch.tensor(1.0001)

    path = corrupt_copy(good, tmp_path, tensors=perturb)
    refused(path, "model.layers.1.self_attn.v_proj.main_smooth", "input-side tensors must be identical")


def test_truncated_file(good, tmp_path):
    """A copy cut short (a full disk, an interrupted rsync): the front end names the file and says
    so (safetensors' own "incomplete metadata, file not fully covered" names nothing)."""
    path = corrupt_copy(good, tmp_path)
    f = path / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-1000])
    log = refused(path, f"{f}: truncated safetensors file")
    assert "EngineCore" not in log
