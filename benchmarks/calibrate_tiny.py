"""Calibration time per decoder layer and peak memory for the tiny offline models (CPU).

    python benchmarks/calibrate_tiny.py [--samples 32] [--epochs 15] [--scheme w4a4] [--workdir DIR]

Builds the tiny Qwen2.5-VL and LLaVA-1.5 (calibration/tiny_models.py) and `--samples` captioned
pictures in the ShareGPT4V layout, runs the real `splitq-calibrate` command line on each model
in a subprocess (so peak RSS is that run's), and prints per-layer seconds and the peak memory
from its `--report` JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def write_data(folder: Path, n: int) -> Path:
    from PIL import Image, ImageDraw

    colours = {"red": (220, 30, 30), "green": (30, 180, 30), "blue": (30, 30, 220), "yellow": (230, 210, 20)}
    kinds = ["circle", "square", "triangle"]
    (folder / "images").mkdir(parents=True, exist_ok=True)
    lines = []
    for i in range(n):
        colour, kind = list(colours)[i % 4], kinds[(i // 4) % 3]
        img = Image.new("RGB", (112, 112), (255, 255, 255))
        d = ImageDraw.Draw(img)
        box = (28 + i % 5, 28, 84, 84 - i % 7)
        if kind == "circle":
            d.ellipse(box, fill=colours[colour])
        elif kind == "square":
            d.rectangle(box, fill=colours[colour])
        else:
            d.polygon([(56, 28), (28, 84), (84, 84)], fill=colours[colour])
        img.save(folder / "images" / f"{i:03d}.png")
        conv = [
            {"from": "human", "value": "<image>\nDescribe the picture."},
            {"from": "gpt", "value": f"A {colour} {kind} on a white background."},
        ]
        lines.append(json.dumps({"id": str(i), "image": f"images/{i:03d}.png", "conversations": conv}))
    (folder / "calib.jsonl").write_text("\n".join(lines) + "\n")
    return folder / "calib.jsonl"


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--samples", type=int, default=32)
    p.add_argument("--epochs", type=int, default=15)
    p.add_argument("--scheme", default="w4a4")
    p.add_argument("--method", default="splitq")
    p.add_argument("--workdir", help="where to build models and write checkpoints (default: a temp dir)")
    args = p.parse_args(argv)

    from splitq_vllm.testing.models import build_tiny_llava, build_tiny_qwen25vl

    work = Path(args.workdir or tempfile.mkdtemp(prefix="splitq-bench-"))
    data = write_data(work / "data", args.samples)
    cli = str(Path(sys.executable).with_name("splitq-calibrate"))
    results = []
    for name, build in (("tiny-qwen25vl", build_tiny_qwen25vl), ("tiny-llava", build_tiny_llava)):
        model = build(work / name)
        report = work / f"{name}-report.json"
        cmd = [
            cli,
            "--model",
            str(model),
            "--data",
            str(data),
            "--output",
            str(work / f"{name}-{args.scheme}"),
            "--scheme",
            args.scheme,
            "--method",
            args.method,
            "--num-samples",
            str(args.samples),
            "--epochs",
            str(args.epochs),
            "--report",
            str(report),
            "--overwrite",
            "-q",
        ]
        t = time.perf_counter()
        subprocess.run(cmd, check=True, cwd=work, env=dict(os.environ, PYTHONWARNINGS="ignore"))
        wall = time.perf_counter() - t
        rep = json.loads(report.read_text())
        layers = {int(k): v for k, v in rep["layers"].items()}
        row = {
            "model": name,
            "scheme": args.scheme,
            "samples": rep["samples"],
            "tokens": rep["tokens"],
            "epochs": args.epochs,
            "layer_s": [round(layers[i]["seconds"], 2) for i in sorted(layers)],
            "epoch_s_mean": round(
                sum(sum(v["epoch_seconds"]) for v in layers.values())
                / max(sum(len(v["epoch_seconds"]) for v in layers.values()), 1),
                3,
            ),
            "run_s": round(rep["seconds"], 1),
            "wall_s_with_imports": round(wall, 1),
            "cpu_peak_rss_mb": round(rep["cpu_peak_rss_mb"], 0),
            "loss_init_final": [
                (f"{layers[i]['init_loss']:.3e}", f"{layers[i]['final_loss']:.3e}") for i in sorted(layers)
            ],
            "threads": os.environ.get("OMP_NUM_THREADS", "default"),
        }
        results.append(row)
        print(json.dumps(row))
    return results


if __name__ == "__main__":
    main(sys.argv[1:])
