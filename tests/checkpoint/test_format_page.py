"""docs/format.md is enough to reimplement the format: a forward written from the page's words
alone (packing, Q, steps 1-8; numpy, nothing imported from the project's math) reads a written
checkpoint's files and gives the reference's output; the page's tensor table and config example
are the ones the code uses."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file

from splitq_kernels.reference import SplitQScheme, quantize_linear, splitq_linear
from splitq_vllm.checkpoint import LayerDims, SplitQConfig, read_checkpoint, write_checkpoint
from splitq_vllm.checkpoint.tensors import layer_tensor_specs
from splitq_vllm.testing.layers import random_activations, random_float_layer
from tests.helpers.paths import REPO

PAGE = (REPO / "docs" / "format.md").read_text()
F32 = np.float32


# ------------------------------------------------------------------ the page, as a reader codes it
def unpack(packed: np.ndarray, k: int, b: int) -> np.ndarray:
    """Packing: row-wise little-endian bit streams of u = q + 2^(b-1), LSB first."""
    bits = (packed[:, :, None] >> np.arange(8, dtype=np.uint8)) & 1  # stream bit n = bit n%8 of byte n//8
    stream = bits.reshape(packed.shape[0], -1)[:, : k * b].reshape(packed.shape[0], k, b).astype(np.int64)
    u = (stream << np.arange(b)).sum(-1)
    return u - 2 ** (b - 1)


def quant(x: np.ndarray, b: int, c: F32, symmetric: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Q per row: (codes, scale, zero), float32 arithmetic, round half to even."""
    if symmetric:
        s = np.maximum(c * np.abs(x).max(1, keepdims=True) / F32(2 ** (b - 1) - 1), F32(1e-8))
        return np.clip(np.round(x / s), -(2 ** (b - 1)), 2 ** (b - 1) - 1), s, np.zeros_like(s)
    hi = np.maximum(c * x.max(1, keepdims=True), F32(0))
    lo = np.minimum(c * x.min(1, keepdims=True), F32(0))
    s = np.maximum((hi - lo) / F32(2**b - 1), F32(1e-8))
    z = np.round(-lo / s)
    return np.clip(np.round(x / s) + z, 0, 2**b - 1), s, z


def qproduct(q, s, z, codes: np.ndarray, wscale: np.ndarray) -> np.ndarray:
    """Exact sum_k (q_x - z_x) q_w, times s_x and wscale in float64, rounded to float32."""
    acc = (q - z).astype(np.int64) @ codes.T.astype(np.int64)
    return (acc * s.astype(np.float64) * wscale.astype(np.float64)[None, :]).astype(F32)


def page_forward(t: dict, d: dict, qc: dict, x: np.ndarray, text: np.ndarray) -> np.ndarray:
    bw, ba, abw, aba, sym = qc["weight_bits"], qc["act_bits"], qc["aux_weight_bits"], qc["aux_act_bits"], qc["act_symmetric"]
    n1, n2 = d["kron"]
    deq = lambda name, k, b: (unpack(t[f"{name}_qweight"], k, b) * t[f"{name}_wscale"][:, None]).astype(F32)  # noqa: E731
    codes = lambda name, k, b: unpack(t[f"{name}_qweight"], k, b)  # noqa: E731
    X = x.astype(F32)
    xm = X[:, t["idx_main"]] * t["main_smooth"]  # step 1
    R = xm.reshape(-1, n1, n2)  # step 2
    xm = np.stack([(t["main_p1"].T @ r) @ t["main_p2"] for r in R]).reshape(len(X), -1)
    qm, sm, zm = quant(xm, ba, t["main_act_clip"][0], sym)  # step 3
    Y = qproduct(qm, sm, zm, codes("main", d["main"], bw), t["main_wscale"])  # step 4
    for name in ("text", "vision"):  # step 5
        if d[name]:
            xo = X[:, t[f"idx_{name}"]] @ t[f"{name}_p"]
            qo, so, zo = quant(xo, aba, t[f"{name}_act_clip"][0], sym)
            Y = Y + qproduct(qo, so, zo, codes(name, d[name], abw), t[f"{name}_wscale"])
    if d["cws_rank"]:  # step 6
        D = qproduct(qm, sm, zm, codes("cws_down", d["main"], abw), t["cws_down_wscale"])
        Y = Y + D @ deq("cws_up", d["cws_rank"], abw).T
    if d["mac_rank"]:  # step 7
        E = xm - ((qm - zm) * sm).astype(F32)
        qe, se, ze = quant(E, aba, t["mac_act_clip"][0], sym)
        C = qproduct(qe, se, ze, codes("mac_down", d["main"], abw), t["mac_down_wscale"]) @ deq("mac_up", d["mac_rank"], abw).T
        rows = {"text": text, "vision": ~text, "all": np.ones_like(text)}[qc["mac_rows"]]
        Y = Y + np.where(rows[:, None], C, F32(0))
    if d["bias"]:  # step 8
        Y = Y + t["bias"].astype(F32)
    return Y


# ------------------------------------------------------------------ the checks
@pytest.mark.parametrize("act_symmetric", [True, False], ids=["sym", "asym"])
@pytest.mark.parametrize("scheme_name, mac_rows", [("w4a4", "text"), ("w3a3", "vision"), ("w3a2", "all"), ("w4a8", "text")])
def test_a_forward_from_the_page_matches_the_reference(tmp_path, scheme_name, mac_rows, act_symmetric):
    base = SplitQScheme.from_name(scheme_name)
    scheme = SplitQScheme(base.weight_bits, base.act_bits, base.aux_weight_bits, base.aux_act_bits, act_symmetric, mac_rows)
    float_layer, _ = random_float_layer(53, 37, n_text=3, n_vision=5, kron=(5, 9), cws_rank=3, mac_rank=4, act_clip=0.9, seed=4)
    layer = quantize_linear(float_layer, scheme)
    name = "model.layers.0.mlp.down_proj"
    path = write_checkpoint(tmp_path / "ckpt", model_config={}, quant_config=SplitQConfig(scheme=scheme),
                            layers={name: layer}, tensors={})  # fmt: skip
    qc = json.loads((path / "config.json").read_text())["quantization_config"]
    files = load_file(str(path / "model.safetensors"))
    t = {k[len(name) + 1 :]: v for k, v in files.items()}
    x = random_activations(9, 53, seed=5) * 3
    text = np.array([True, False, False, True, True, False, True, False, True])
    got = page_forward(t, qc["layers"][name], qc, x.numpy(), text)
    want = splitq_linear(x, torch.from_numpy(text), read_checkpoint(path).layer(name), scheme).numpy()
    # Same steps, same precisions: equal up to float32 summation inside the small float matmuls
    # (a wrong order of P1/P2, a re-quantized rank intermediate or a symmetric MAC residual is
    # off by far more).
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5 * float(np.abs(want).max()))


def test_the_pages_tensor_table_is_the_codes():
    section = PAGE[PAGE.index("## Tensors of a quantized layer") : PAGE.index("### Packing")]
    rows = [line for line in section.splitlines() if line.startswith("| `L.")]
    on_page = {name for row in rows for name in re.findall(r"`L\.([a-z0-9_]+)`", row.split("|")[1])}
    dims = LayerDims(53, 37, 45, 3, 5, (5, 9), 3, 4, "g", True)  # every optional part present
    in_code = {s.suffix for s in layer_tensor_specs(dims, SplitQScheme.from_name("w4a4"))}
    assert on_page == in_code


def test_the_pages_config_example_parses():
    block = re.search(r"```json\n(.*?)```", PAGE, re.S).group(1)
    qc = SplitQConfig.from_dict(json.loads(block))
    (name,) = qc.layers
    assert name.startswith("model.layers.0.") and qc.layers[name].group.startswith("model.layers.0.")
