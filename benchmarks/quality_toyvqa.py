"""Held-out accuracy of the bundled ToyVQA model, FP and quantized by each method (Tables 1 and 6).

    .venv/bin/python benchmarks/quality_toyvqa.py --work /tmp/toyvqa-quality \
        --json quality.json --markdown quality.md [--jobs 2] [--n 500] [--plot-dir docs/img]

For each scheme (W4A8, W4A4, W3A3, W3A2) and method (RTN, SmoothQuant, FlatQuant, MOCD, +CWS,
+MAC = full SplitQ) it calibrates models/toyvqa-qwen25vl with the project's own calibration
(`splitq_calibration.calibrate`, the recipe presets of recipe.py; MBQ, MASQuant and VLMQ are the
paper's baselines, calibration/splitq_calibration/baselines/) on ToyVQA calibration pictures,
then scores the first `--n` questions of the test split (greedy, exact match):
- every checkpoint through the reference (transformers with the integer SplitQ forward,
  `load_quantized_model`), FP16 as the bundled bfloat16 weights;
- the checkpoints of the `--serve` methods (default: full SplitQ) also through vLLM's OpenAI
  server with the plugin (`--quantization splitq`), the path users take.
Checkpoints are kept in --work: a second run only scores (calibration resumes and skips).
`--quantize-vision-tower` adds, beside each (method, scheme) checkpoint with the 16-bit tower, one
calibrated with the vision tower quantized too at the same bits (the paper's A.4), and for the
schemes other than W4A4 Table 13's rows, tower W4A4 and LM at the scheme: the format has one bit
setting per checkpoint, so the reference composes the scheme's checkpoint with the W4A4 tower
checkpoint's tower (`splitq_vllm.hf.model.with_vision_tower_from`; exact, since the LM is
calibrated on the FP tower's outputs). The same-bits tower checkpoints of the `--serve` methods
are served by vLLM too (the composed rows are reference only: one checkpoint, one bit setting).
`--decode-mode w4a16` scores the reference with SPLITQ_DECODE_MODE=w4a16: batches of 16
questions, so each decode step (<= 16 rows) runs the W4A16 form and each prefill the scheme
(`--decode-mode w4a4`: the same batches at the scheme throughout, the row to compare against).
`--precision bf16` scores the reference with SPLITQ_PRECISION=bf16: the float products (online
transforms, up products) on bfloat16 operands, as the kernels' fast setting computes them
(splitq_kernels.precision); the same checkpoints, so a second run beside the default only scores.
`--plot-dir` draws the Fig. 2-style text vs vision channel magnitudes of one layer's qkv and down
inputs (splitq-inspect).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MODEL = REPO / "models" / "toyvqa-qwen25vl"
METHODS = ("rtn", "smoothquant", "flatquant", "mocd", "mocd_cws", "splitq", "mbq", "masquant", "vlmq")
SCHEMES = ("w4a8", "w4a4", "w3a3", "w3a2")
LABELS = {"fp16": "FP16", "rtn": "RTN", "smoothquant": "SmoothQuant", "flatquant": "FlatQuant", "mocd": "MOCD",
          "mocd_cws": "+CWS", "splitq": "+MAC (SplitQ)", "mbq": "MBQ", "masquant": "MASQuant (text base)",
          "vlmq": "VLMQ"}  # fmt: skip
LABELS.update({f"{m}_vllm": f"{'SplitQ' if m == 'splitq' else LABELS[m]}, served by vLLM" for m in METHODS})
TOWER = "+tower"  # method-name suffix of the rows with the vision tower quantized too, at the same bits
TOWER4 = "+tower_w4a4"  # ... with the W4A4 checkpoint's tower (Table 13)
LABELS.update({f"{m}{TOWER}": f"{'SplitQ' if m == 'splitq' else LABELS[m]}, tower at the same bits" for m in METHODS})
LABELS.update({f"{m}{TOWER4}": f"{'SplitQ' if m == 'splitq' else LABELS[m]}, tower W4A4" for m in METHODS})
LABELS.update({f"{m}{TOWER}_vllm": f"{LABELS[m + TOWER]}, served by vLLM" for m in METHODS})


def calib_data(work: Path, n: int, model: Path = MODEL) -> Path:
    """`n` ToyVQA calibration samples of the version `model` was trained on."""
    from splitq_toyvqa.data import export_sharegpt4v, model_data_version

    version = model_data_version(model)
    path = work / (f"data-{n}" if version == 1 else f"data-v{version}-{n}") / "calibration.json"
    if not path.exists():
        export_sharegpt4v(path.parent, "calibration", n, version=version)
    return path


def _score_reference(model_dir: Path, n: int) -> dict:
    """Test accuracy in transformers, fp32: a SplitQ checkpoint through the integer reference."""
    from splitq_calibration.evaluate import load_any_model
    from splitq_toyvqa.evaluate import evaluate_transformers

    # --decode-mode: 16 questions a batch, so every decode step has <= 16 rows (W4A16 under w4a16)
    # and every prefill more (each prompt has more than one token)
    batch = {} if not os.environ.get("SPLITQ_DECODE_MODE") else {"batch_size": 16}
    return evaluate_transformers(model_dir, "test", n, model_and_processor=load_any_model(model_dir), **batch).to_json()


def run_task(task: dict) -> dict:
    """Calibrate one (method, scheme) checkpoint if needed and score it through the reference."""
    import logging

    import torch

    torch.set_num_threads(task["threads"])
    logging.basicConfig(level=logging.WARNING)
    t0 = time.time()
    if task["method"] == "fp16":
        return {**task, **_score_reference(Path(task["model"]), task["n"]), "seconds": time.time() - t0}
    if "tower_ckpt" in task:  # two calibrated checkpoints composed: nothing to calibrate
        from splitq_calibration.evaluate import load_any_model
        from splitq_toyvqa.evaluate import evaluate_transformers
        from splitq_vllm.hf.model import with_vision_tower_from

        model, processor = load_any_model(task["ckpt"])
        with_vision_tower_from(model, task["tower_ckpt"])
        r = evaluate_transformers(task["ckpt"], "test", task["n"], model_and_processor=(model, processor)).to_json()
        return {**task, **r, "seconds": time.time() - t0}
    from splitq_calibration.pipeline import calibrate

    ckpt = Path(task["ckpt"])
    method = task["method"].removesuffix(TOWER)
    tower = {"quantize_vision_tower": True} if task["method"].endswith(TOWER) else {}
    if not (ckpt / "config.json").exists():
        calibrate(task["model"], task["data"], ckpt, method=method, scheme=task["scheme"], num_samples=task["samples"],
                  epochs=task["epochs"], image_dir=str(Path(task["data"]).parent / "images"), device="cpu", **tower)  # fmt: skip
    t_cal = time.time() - t0
    out = {**task, **_score_reference(ckpt, task["n"])}
    out.update(calibration_seconds=t_cal, seconds=time.time() - t0)
    return out


def score_vllm(ckpt: Path, n: int, concurrency: int = 8) -> dict:
    """Accuracy of a checkpoint served by vLLM's OpenAI server (--quantization splitq)."""
    from splitq_toyvqa.data import load_split, model_data_version
    from splitq_toyvqa.evaluate import openai_messages, score_answers
    from splitq_vllm.server import OpenAIServer

    samples = load_split("test", n, version=model_data_version(ckpt))
    args = ["--quantization", "splitq", "--max-model-len", "1024", "--max-num-seqs", str(concurrency),
            "--limit-mm-per-prompt", '{"image": 1}', "--seed", "0"]  # fmt: skip
    with OpenAIServer(ckpt, args) as server:
        client = server.client()
        model = client.models.list().data[0].id

        def ask(s):
            r = client.chat.completions.create(model=model, messages=openai_messages(s), max_tokens=6, temperature=0.0)
            return (r.choices[0].message.content or "").strip()

        with ThreadPoolExecutor(concurrency) as pool:
            answers = list(pool.map(ask, samples))
    return score_answers(samples, answers).to_json()


def plot_channels(model: Path, data: Path, layer: int, group: str, output: Path) -> None:
    from splitq_calibration.cli import inspect_main

    rc = inspect_main(["--model", str(model), "--data", str(data), "--image-dir", str(data.parent / "images"),
                       "--layer", str(layer), "--group", group, "--output", str(output), "--num-samples", "64", "-q"])  # fmt: skip
    if rc:
        raise SystemExit(f"splitq-inspect failed ({rc})")


def standard_error(p: float, n: int) -> float:
    """One standard error of an accuracy p measured on n questions (binomial)."""
    return (p * (1 - p) / max(1, n)) ** 0.5


def _table_rows(results: list[dict], schemes: list[str], methods: list[str]) -> list[tuple[str, str, dict]]:
    """(bits, label, result) in table order: FP16, then per scheme each method, then the served rows."""
    by = {(r["scheme"], r["method"]): r for r in results}
    rows = [("W16A16", "FP16", by[("fp16", "fp16")])]
    for s in schemes:
        for m in [*methods, *(f"{x}{TOWER}" for x in methods), *(f"{x}{TOWER4}" for x in methods),
                  *(f"{x}_vllm" for x in methods), *(f"{x}{TOWER}_vllm" for x in methods)]:  # fmt: skip
            if (s, m) in by:
                rows.append((s.upper(), LABELS[m], by[(s, m)]))
    return rows


def markdown(results: list[dict], schemes: list[str], methods: list[str]) -> str:
    """The accuracy table: all questions (with one standard error), image and text-only ones."""
    by = {(r["scheme"], r["method"]): r for r in results}
    fp = by[("fp16", "fp16")]
    head = "| bits | method | all (± 1 s.e.) | image questions | text-only | change vs FP16 |\n|---|---|---|---|---|---|\n"

    def row(bits: str, label: str, r: dict) -> str:
        d = (r["accuracy"] - fp["accuracy"]) * 100
        se = 100 * standard_error(r["accuracy"], r["n"])
        return (f"| {bits} | {label} | {100 * r['accuracy']:.1f} ± {se:.1f} | {100 * r['image_accuracy']:.1f} | "
                f"{100 * r['text_accuracy']:.1f} | {d:+.1f} |\n")  # fmt: skip

    return head + "".join(row(*r) for r in _table_rows(results, schemes, methods))


def per_kind_markdown(results: list[dict], schemes: list[str], methods: list[str]) -> str:
    """Accuracy per question kind (percent; the kind's question count and the standard error of an
    accuracy of 0.5 on it in the header, the largest a kind's s.e. can be)."""
    by = {(r["scheme"], r["method"]): r for r in results}
    fp = by[("fp16", "fp16")]
    kinds = list(fp["per_kind"])
    head = "| bits | method | " + " | ".join(
        f"{k} (n={fp['per_kind'][k]['n']}, ±{100 * standard_error(0.5, fp['per_kind'][k]['n']):.0f})" for k in kinds
    )
    out = head + " |\n|" + "---|" * (len(kinds) + 2) + "\n"

    def row(bits: str, label: str, r: dict) -> str:
        pk = r["per_kind"]
        cells = [f"{100 * pk[k]['correct'] / pk[k]['n']:.0f}" if k in pk else "" for k in kinds]
        return f"| {bits} | {label} | " + " | ".join(cells) + " |\n"

    return out + "".join(row(*r) for r in _table_rows(results, schemes, methods))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", type=Path, default=MODEL, help="FP model directory (default: the bundled one)")
    ap.add_argument("--work", type=Path, default=Path("/tmp/toyvqa-quality"), help="checkpoints and data, reused by name (method, scheme, samples, epochs): one folder per model")
    ap.add_argument("--schemes", nargs="+", default=list(SCHEMES))
    ap.add_argument("--methods", nargs="+", default=list(METHODS))
    ap.add_argument("--n", type=int, default=500, help="test questions scored per row")
    ap.add_argument("--samples", type=int, default=64, help="calibration samples")
    ap.add_argument("--epochs", type=int, default=5, help="calibration epochs (trained methods)")
    ap.add_argument("--jobs", type=int, default=2, help="calibrations in parallel (one thread each)")
    ap.add_argument("--no-vllm", action="store_true", help="skip the served-model rows")
    ap.add_argument("--quantize-vision-tower", action="store_true",
                    help="also a checkpoint per row with the vision tower quantized (A.4; served too for --serve)")
    ap.add_argument("--serve", nargs="+", default=["splitq"], help="methods whose checkpoints are also served by vLLM")
    ap.add_argument("--plot-dir", type=Path, help="write Fig. 2-style channel plots (qkv and down inputs) here")
    ap.add_argument("--plot-layer", type=int, default=1)
    ap.add_argument("--decode-mode", choices=("w4a4", "w4a16"),
                    help="score the reference with SPLITQ_DECODE_MODE set (16 questions a batch: steps of <= 16 rows, "
                         "i.e. the decode steps, run the W4A16 form under w4a16; prefill stays at the scheme)")
    ap.add_argument("--precision", choices=("float32", "bf16"),
                    help="score the reference with SPLITQ_PRECISION set (bf16: the kernels' bf16 products)")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--markdown", type=Path)
    args = ap.parse_args(argv)
    if args.decode_mode:
        os.environ["SPLITQ_DECODE_MODE"] = args.decode_mode  # read by the worker processes' SplitQ layers
    if args.precision:
        os.environ["SPLITQ_PRECISION"] = args.precision  # likewise
    args.work.mkdir(parents=True, exist_ok=True)
    data = calib_data(args.work, args.samples, args.model)

    tasks = [{"method": "fp16", "scheme": "fp16", "model": str(args.model), "n": args.n, "threads": 1}]
    for s in args.schemes:
        for m in args.methods:
            tasks.append({"method": m, "scheme": s, "model": str(args.model), "n": args.n, "threads": 1, "samples": args.samples, "epochs": args.epochs,
                          "data": str(data), "ckpt": str(args.work / f"{m}-{s}-{args.samples}x{args.epochs}")})  # fmt: skip
            if args.quantize_vision_tower:
                tasks.append({**tasks[-1], "method": f"{m}{TOWER}", "ckpt": tasks[-1]["ckpt"] + "-tower"})
    composed = []  # Table 13: tower W4A4 with the LM at another scheme, once both checkpoints exist
    if args.quantize_vision_tower and "w4a4" in args.schemes:
        for s in args.schemes:
            for m in args.methods if s != "w4a4" else []:
                lm = next(t for t in tasks if t["method"] == m and t["scheme"] == s)
                tower4 = next(t for t in tasks if t["method"] == f"{m}{TOWER}" and t["scheme"] == "w4a4")
                composed.append({**lm, "method": f"{m}{TOWER4}", "tower_ckpt": tower4["ckpt"]})
    results: list[dict] = []
    t0 = time.time()
    with ProcessPoolExecutor(args.jobs) as pool:
        for batch in (tasks, composed):  # the composed rows need the first batch's checkpoints
            for r in pool.map(run_task, batch):
                results.append(r)
                print(f"{r['scheme']:5s} {LABELS[r['method']]:14s} accuracy {r['accuracy']:.3f} (image {r['image_accuracy']:.3f}, "
                      f"text {r['text_accuracy']:.3f}) {r['seconds']:.0f} s  [{time.time() - t0:.0f} s]", flush=True)  # fmt: skip
    served = [] if args.no_vllm else [m for m in args.serve if m in args.methods]
    for m in [*served, *(f"{x}{TOWER}" for x in served if args.quantize_vision_tower)]:
        for s in args.schemes:
            ckpt = Path(next(t["ckpt"] for t in tasks if t["method"] == m and t["scheme"] == s))
            t1 = time.time()
            r = {"method": f"{m}_vllm", "scheme": s, **score_vllm(ckpt, args.n), "seconds": time.time() - t1}
            results.append(r)
            print(f"{s:5s} {LABELS[r['method']]}: accuracy {r['accuracy']:.3f} ({r['seconds']:.0f} s)", flush=True)
    if args.plot_dir:
        args.plot_dir.mkdir(parents=True, exist_ok=True)
        for group in ("qkv", "down"):
            png = args.plot_dir / f"toyvqa_channels_layer{args.plot_layer}_{group}.png"
            plot_channels(args.model, data, args.plot_layer, group, png)
            print(f"wrote {png}")
    table = markdown(results, args.schemes, args.methods) + "\nPer question kind:\n\n" + per_kind_markdown(results, args.schemes, args.methods)
    print("\n" + table)
    meta = {"command": " ".join(["benchmarks/quality_toyvqa.py", *(sys.argv[1:] if argv is None else argv)]), "n": args.n, "samples": args.samples, "epochs": args.epochs,
            "cpu_count": os.cpu_count(), "date": time.strftime("%Y-%m-%d"), "seconds": time.time() - t0}  # fmt: skip
    if args.json:
        args.json.write_text(json.dumps({"meta": meta, "results": results}, indent=1) + "\n")
    if args.markdown:
        args.markdown.write_text(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
