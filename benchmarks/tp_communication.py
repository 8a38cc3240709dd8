"""Bytes each decoder layer communicates under tensor parallelism with SplitQ's row-parallel design
(docs/vllm_plugin.md, "Serving across GPUs"): the all-gather of the o_proj and down_proj inputs that
SplitQ adds (T x K_in x 2 bytes each, bf16) against the all-reduces of their outputs that vLLM
already does (T x N_out x 2 bytes each). Computed from the published configs
(splitq_vllm.testing.published), per token; no measurement.

    .venv/bin/python benchmarks/tp_communication.py
"""

from __future__ import annotations

from splitq_vllm.testing.published import linear_shapes

MODELS = ("qwen2.5-vl-3b", "qwen2.5-vl-7b", "qwen2.5-vl-32b", "qwen2.5-vl-72b")
BYTES = 2  # bf16 activations


def rows() -> list[dict]:
    out = []
    for name in MODELS:
        s = linear_shapes(name)
        (k_o, n_o), (k_d, n_d) = s["o"], s["down"]
        gather, reduce = (k_o + k_d) * BYTES, (n_o + n_d) * BYTES
        out.append(dict(model=name, o=(k_o, n_o), down=(k_d, n_d), gather=gather, reduce=reduce))
    return out


def markdown() -> str:
    lines = ["| model | o_proj K -> N | down_proj K -> N | all-gathers added, bytes/token/layer | "
             "all-reduces vLLM does, bytes/token/layer | added / existing |", "|---|---|---|---|---|---|"]
    for r in rows():
        lines.append(f"| {r['model']} | {r['o'][0]} -> {r['o'][1]} | {r['down'][0]} -> {r['down'][1]} | "
                     f"{r['gather']:,} | {r['reduce']:,} | {r['gather'] / r['reduce']:.2f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(markdown())
