"""The main job on the embedded default (`make demo`): calibrate, serve, ask.

1. Calibrate the bundled ToyVQA Qwen2.5-VL (models/toyvqa-qwen25vl) with SplitQ (W4A4 by
   default) on ToyVQA calibration pictures, with `splitq-calibrate`. The checkpoint is cached
   (~/.cache/splitq-vllm/demo/<model>-splitq-<scheme>-<hash of weights, data and recipe>), so a
   second run skips this step; an interrupted run resumes.
2. Start vLLM's OpenAI server on the checkpoint (`vllm serve CKPT --quantization splitq`).
3. Ask it about held-out ToyVQA pictures through the `openai` client; print each question, the
   answer, the expected answer and whether it is right.
4. Stop the server.

With a GPU and the real weights, the same on Qwen2.5-VL-7B is one change of the command:

    make demo MODEL=/path/to/Qwen2.5-VL-7B-Instruct

(any other model directory gets the paper's recipe: 128 samples, 15 epochs; pass DATA=file.json
IMAGE_DIR=folder for ShareGPT4V-style calibration data instead of the ToyVQA pictures).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BUNDLED = REPO / "models" / "toyvqa-qwen25vl"
CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "splitq-vllm" / "demo"
# The bundled model is small and the task simple: a shorter calibration than the paper's recipe
# (128 samples, 15 epochs) keeps its 16-bit held-out accuracy down to W3A2 (BENCHMARKS.md, ToyVQA
# quality table: 64 samples, 5 epochs).
BUNDLED_RECIPE = {"num_samples": 64, "epochs": 5}
# One question of each kind a reader can check at a glance (held-out test pictures).
DEMO_KINDS = ("colour_of_shape", "count_all", "read_word", "position")
GPU_LINE = "make demo MODEL=/path/to/Qwen2.5-VL-7B-Instruct"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("--model", type=Path, default=BUNDLED, help="Hugging Face model directory (default: the bundled ToyVQA model)")
    p.add_argument("--data", type=Path, help="ShareGPT4V-style calibration file (default: ToyVQA calibration pictures)")
    p.add_argument("--image-dir", type=Path, help="folder the --data image paths are relative to")
    p.add_argument("--scheme", default="w4a4", help="w4a8, w4a4, w3a3 or w3a2")
    p.add_argument("--output", type=Path, help="checkpoint directory (default: a cached one under " + str(CACHE) + ")")
    p.add_argument("--questions", type=int, default=len(DEMO_KINDS), help="held-out questions to ask")
    p.add_argument("--recalibrate", action="store_true", help="calibrate again even if the checkpoint is cached")
    return p.parse_args(argv)


def recipe_for(model: Path) -> dict:
    return dict(BUNDLED_RECIPE) if model.resolve() == BUNDLED.resolve() else {}


def checkpoint_dir(args: argparse.Namespace, recipe: dict) -> Path:
    """The cache entry for (model weights, data, scheme, recipe)."""
    if args.output is not None:
        return args.output
    h = hashlib.sha256()
    for f in sorted(args.model.glob("*.safetensors")) + [args.model / "config.json"]:
        h.update(f.name.encode())
        h.update(str(f.stat().st_size).encode())
        h.update(str(f.stat().st_mtime_ns).encode())  # cheap: the 7B shards are 15 GB
    h.update(json.dumps([str(args.data), args.scheme, recipe], sort_keys=True).encode())
    return CACHE / f"{args.model.name}-splitq-{args.scheme}-{h.hexdigest()[:12]}"


def calibration_data(args: argparse.Namespace, n: int) -> tuple[Path, Path]:
    """(data file, image folder): the user's, or ToyVQA calibration pictures in the cache (a fixed
    place: an interrupted calibration resumes only with the same settings, image folder included)."""
    if args.data is not None:
        return args.data, args.image_dir or args.data.parent
    from splitq_toyvqa.data import export_sharegpt4v, model_data_version

    version = model_data_version(args.model)
    folder = CACHE / (f"toyvqa-calibration-{n}" if version == 1 else f"toyvqa-v{version}-calibration-{n}")
    path = folder / "calibration.json"
    if not path.is_file():
        export_sharegpt4v(folder, "calibration", n, version=version)
    return path, folder / "images"


def calibrate(args: argparse.Namespace, ckpt: Path) -> None:
    from splitq_calibration.recipe import CalibrationConfig

    recipe = recipe_for(args.model)
    data, image_dir = calibration_data(args, recipe.get("num_samples", CalibrationConfig().num_samples))
    with tempfile.TemporaryDirectory(prefix="splitq-demo-") as work:
        script = Path(sys.executable).with_name("splitq-calibrate")
        cli = [str(script)] if script.exists() else [sys.executable, "-m", "splitq_calibration.cli"]
        cmd = [*cli, "--model", str(args.model), "--data", str(data),
               "--image-dir", str(image_dir), "--output", str(ckpt), "--scheme", args.scheme]  # fmt: skip
        for k, v in recipe.items():
            cmd += [f"--{k.replace('_', '-')}", str(v)]
        if args.recalibrate:
            cmd.append("--overwrite")
        print("$ " + " ".join(shlex.quote(c) for c in cmd), flush=True)
        t0 = time.time()
        # One thread unless the user says otherwise: the bundled model's matrices are small, and two
        # OpenMP threads on a 2-core machine with anything else running were 25x slower than one
        # (measured: 45 s against 1.9 s per layer epoch, BENCHMARKS.md).
        env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")} if recipe else None
        subprocess.run(cmd, check=True, cwd=work, env=env)
        print(f"calibrated in {time.time() - t0:.0f} s -> {ckpt}", flush=True)


def demo_samples(n: int, model: Path):
    """The first test-split question of each DEMO_KINDS kind, then more test questions (of the
    ToyVQA version `model` was trained on)."""
    from splitq_toyvqa.data import load_split, model_data_version

    test = [s for s in load_split("test", version=model_data_version(model)) if s.image is not None]
    picked = [next(s for s in test if s.kind == k) for k in DEMO_KINDS]
    picked += [s for s in test if s not in picked]
    return picked[:n]


def sixteen_bit_line(model: Path) -> str:
    """What the model scores in 16 bits (its training log's test score): the baseline to read the
    demo's answers against."""
    test = json.loads((model / "training_log.json").read_text())["test_bf16_transformers"]
    kinds = {k: v["correct"] / v["n"] for k, v in test["per_kind"].items()}
    weakest = min(kinds, key=kinds.get)
    return (f"(The bundled model in 16 bits answers {test['accuracy']:.2f} of the {test['n']:,} test questions;\n"
            f" {weakest} questions are its weak spot at {kinds[weakest]:.2f}. Accuracy per method and bit width:"
            " BENCHMARKS.md.)")  # fmt: skip


def ask(server, samples, relaxed: bool) -> int:
    from splitq_toyvqa.evaluate import is_correct, openai_messages

    client = server.client()
    model = client.models.list().data[0].id
    right = 0
    for s in samples:
        reply = client.chat.completions.create(model=model, messages=openai_messages(s), max_tokens=16, temperature=0.0)
        answer = (reply.choices[0].message.content or "").strip()
        ok = is_correct(answer, s.answer, relaxed)
        right += ok
        picture = CACHE / "pictures" / f"{s.id}.png"  # to look at
        picture.parent.mkdir(parents=True, exist_ok=True)
        s.image.save(picture)
        print(f"\n  [{s.id}: {picture}]\n  Q: {s.question}\n  A: {answer}\n"
              f"  expected: {s.answer} -> {'right' if ok else 'WRONG'}")  # fmt: skip
    return right


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    for name in ("model", "data", "image_dir", "output"):  # the calibration runs in another folder
        if getattr(args, name) is not None:
            setattr(args, name, getattr(args, name).resolve())
    if not (args.model / "config.json").is_file():
        print(f"error: {args.model} is not a Hugging Face model directory (no config.json)", file=sys.stderr)
        return 2
    from splitq_vllm.server import OpenAIServer

    ckpt = checkpoint_dir(args, recipe_for(args.model))
    print(f"== 1. calibrate {args.model.name} with SplitQ {args.scheme.upper()}", flush=True)
    if (ckpt / "config.json").is_file() and not args.recalibrate:
        print(f"cached checkpoint: {ckpt} (--recalibrate to redo)")
    else:
        calibrate(args, ckpt)

    print(f"\n== 2. serve it: vllm serve {ckpt} --quantization splitq", flush=True)
    server_args = ["--quantization", "splitq", "--max-model-len", "1024", "--limit-mm-per-prompt", '{"image": 1}']
    t0 = time.time()
    with OpenAIServer(ckpt, server_args) as server:
        print(f"server up at {server.url} in {time.time() - t0:.0f} s (log: {server.log_path})", flush=True)
        print("\n== 3. ask it about held-out pictures (openai client)", flush=True)
        samples = demo_samples(args.questions, args.model)
        right = ask(server, samples, relaxed=args.model != BUNDLED.resolve())
        print(f"\n{right}/{len(samples)} right.")
        if args.model == BUNDLED.resolve():
            print(sixteen_bit_line(args.model))
        print("\n== 4. stop the server", flush=True)
    print("server stopped.")
    print(f"\nOn a GPU with the real weights, the same on Qwen2.5-VL-7B:\n    {GPU_LINE}")
    return 0 if right > 0 else 1


if __name__ == "__main__":
    sys.exit(main())
