"""Calibrate at the widths users run: time and memory of the real `splitq-calibrate` on a
random-weight model built offline from a published config (issue 12).

    python benchmarks/calibrate_real_width.py --model qwen2.5-vl-7b --layers 2 --samples 8 --tokens 256 \\
        --epochs 1 --json qwen7b.json --plot qwen7b-rss.png [--serve] [--extra='--no-train']
    python benchmarks/calibrate_real_width.py --model-dir DIR ...      # any model directory, used as it is

1. The model: `splitq_vllm.testing.published.build_published` (the release's widths, vocabulary
   and vision tower, `--layers` decoder layers, random bf16 weights) into `--model-dir` (default
   WORK/model), or reused from there when it exists with the same widths and layer count.
2. The data: `--samples` real PNG pictures with captions in ShareGPT4V JSONL. The sample length
   is about `--tokens`: the Qwen families get a square image of about `--vision-frac` of it (28 px
   per merged token for Qwen2-VL and Qwen2.5-VL, 32 px for Qwen3-VL and Qwen3.5), LLaVA its fixed
   576 image tokens, Gemma 3 its fixed 256; a caption fills the rest (counted with the model's own
   processor and chat template, as calibration counts them).
3. The run: the real CLI, `python -m splitq_calibration.cli ... --report FILE`, in a subprocess
   whose process tree's RSS is sampled every 0.5 s (psutil). Reported: per layer the init time
   (statistics, MOCD, initialisation; "approx" = layer time minus epochs when the report has no
   `init_s`), the epoch times, the other phases the report has, the peak RSS during the layer;
   export time, peak host RSS, peak CUDA memory (from the report, on CUDA), the checkpoint's size
   against the bf16 bytes of the same tensors, and the run's own memory estimate
   (splitq_calibration.memory, from the report) beside the measured peak. A failed run (killed for memory, say) still writes
   --json with what was measured and the layers its log says finished, and exits non-zero.
4. `--serve`: vLLM's OpenAI server on the CPU (splitq_vllm.server, --quantization splitq,
   --enforce-eager) serves the checkpoint and answers one chat with an image through the openai
   client: start-up seconds, the server tree's peak RSS, the answer.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import shlex
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

GB = 1e9
FILLER = " The image shows a red circle on the left and a blue square on the right."


# ---------------------------------------------------------------------------------------------
# Process-tree memory
# ---------------------------------------------------------------------------------------------


class TreeSampler(threading.Thread):
    """Samples the summed RSS of a process and all its descendants every `interval` seconds."""

    def __init__(self, pid_of: Callable[[], int | None], interval: float = 0.5) -> None:
        super().__init__(daemon=True)
        self.pid_of, self.interval = pid_of, interval
        self.t0 = time.monotonic()
        self.samples: list[tuple[float, int]] = []  # (seconds since start, bytes)
        self._halt = threading.Event()

    def rss(self) -> int | None:
        import psutil

        pid = self.pid_of()
        if pid is None:
            return None
        try:
            root = psutil.Process(pid)
            procs = [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            return None
        total = 0
        for p in procs:
            try:
                total += p.memory_info().rss
            except psutil.NoSuchProcess:  # exited between listing and reading
                pass
        return total

    def run(self) -> None:
        while not self._halt.is_set():
            r = self.rss()
            if r is not None:
                self.samples.append((time.monotonic() - self.t0, r))
            self._halt.wait(self.interval)

    def stop(self) -> None:
        self._halt.set()
        self.join()

    def peak(self, start: float = 0.0, end: float = math.inf) -> int | None:
        """Largest sample in [start, end]; a window shorter than the interval gets the first
        sample after it (the memory it left behind)."""
        vals = [r for t, r in self.samples if start <= t <= end]
        if not vals:
            vals = [r for t, r in self.samples if t >= start][:1]
        return max(vals) if vals else None


# ---------------------------------------------------------------------------------------------
# Model and data
# ---------------------------------------------------------------------------------------------


def ensure_model(name: str | None, model_dir: Path, layers: int, seed: int) -> tuple[Path, bool, float]:
    """The model directory: reused when it holds `name` at `layers` layers, else built there.
    Returns (dir, built now, build seconds)."""
    from splitq_vllm.testing.published import build_published, get_spec

    cfg_path = model_dir / "config.json"
    if cfg_path.exists():
        if name is not None:
            spec = get_spec(name)
            cfg = json.loads(cfg_path.read_text())
            text = cfg.get("text_config", cfg)
            found = (cfg.get("model_type"), text.get("hidden_size"), text.get("num_hidden_layers"))
            if found != (spec.family, spec.text.hidden, layers):
                raise SystemExit(
                    f"{model_dir} holds a {found[0]} model of hidden size {found[1]} with {found[2]} layers, not "
                    f"{name} ({spec.family}, hidden size {spec.text.hidden}) with {layers} layers: pass another "
                    "--model-dir or remove it"
                )
        return model_dir, False, 0.0
    if name is None:
        raise SystemExit(f"--model-dir {model_dir} has no config.json: pass --model to build a model there")
    t0 = time.perf_counter()
    build_published(name, model_dir, layers, seed=seed)
    return model_dir, True, time.perf_counter() - t0


def _count_tokens(processor, image, caption: str) -> int:
    """Tokens of one sample as calibration forms it: chat template (caption as the assistant turn)
    and processor."""
    messages = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is in the picture?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": caption}]},
    ]
    text = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=False)
    return int(processor(text=[text], images=[image], return_tensors="pt")["input_ids"].shape[1])


def plan_samples(model_dir: Path, tokens: int, vision_frac: float) -> dict[str, Any]:
    """Image side and caption suffix so a sample has about `tokens` tokens."""
    from transformers import AutoConfig, AutoProcessor

    from splitq_vllm.testing.images import captioned_images

    processor = AutoProcessor.from_pretrained(model_dir)
    cfg = AutoConfig.from_pretrained(model_dir)
    if cfg.model_type in ("llava", "gemma3"):
        # resized (and for LLaVA cropped) to this anyway: 576 tokens at 336, Gemma 3's 256 at 896
        side = cfg.vision_config.image_size
    else:
        ip = processor.image_processor
        max_pixels = (getattr(ip, "size", None) or {}).get("longest_edge") or getattr(ip, "max_pixels", 28 * 28 * 1024)
        unit = ip.patch_size * ip.merge_size  # pixels per merged token side
        grid = max(2, int(math.sqrt(max(vision_frac, 0.0) * tokens)))
        grid = min(grid, int(math.sqrt(max_pixels)) // unit)
        side = grid * unit
    _, image, caption = captioned_images(1, side)[0]
    base = _count_tokens(processor, image, caption)
    reps = 0
    if tokens > base:
        per = _count_tokens(processor, image, caption + FILLER) - base
        reps = max(0, round((tokens - base) / max(per, 1)))
    n = _count_tokens(processor, image, caption + FILLER * reps)
    image_id = getattr(cfg, "image_token_id", None) or getattr(cfg, "image_token_index", None)
    ids = processor(
        text=[processor.apply_chat_template([{"role": "user", "content": [{"type": "image"}]}], tokenize=False)],
        images=[image], return_tensors="pt",
    )["input_ids"]  # fmt: skip
    return {"image_side": side, "caption_repeats": reps, "tokens_per_sample": n,
            "image_tokens_per_sample": int((ids == image_id).sum()), "suffix": FILLER * reps}  # fmt: skip


def write_data(work: Path, samples: int, plan: dict[str, Any]) -> Path:
    from splitq_vllm.testing.images import write_sharegpt

    return write_sharegpt(work / "data", n=samples, size=plan["image_side"], caption_suffix=plan["suffix"])


# ---------------------------------------------------------------------------------------------
# The calibration run
# ---------------------------------------------------------------------------------------------

DONE = re.compile(r"layer (\d+)/(\d+): done in")


def run_calibration(cmd: list[str], log_path: Path, echo: bool) -> dict[str, Any]:
    """Run the CLI, sample its tree's RSS, keep its log with arrival times."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1)
    sampler = TreeSampler(lambda: proc.pid)
    sampler.start()
    done_at: dict[int, float] = {}
    with open(log_path, "w") as log:
        assert proc.stdout is not None
        for line in proc.stdout:
            log.write(line)
            log.flush()
            if echo:
                sys.stderr.write("  | " + line)
            m = DONE.search(line)
            if m:
                done_at[int(m.group(1)) - 1] = time.monotonic() - sampler.t0
    rc = proc.wait()
    wall = time.monotonic() - sampler.t0
    sampler.stop()
    return {"returncode": rc, "wall_s": wall, "sampler": sampler, "done_at": done_at}


def layer_rows(report: dict[str, Any] | None, done_at: dict[int, float], sampler: TreeSampler) -> list[dict[str, Any]]:
    """Per layer: init_s (approx when the report lacks it), epoch_s, the other phases, peak RSS."""
    infos = {int(k): v for k, v in ((report or {}).get("layers") or {}).items()}
    rows = []
    prev = 0.0
    for i in sorted(set(infos) | set(done_at)):
        info = infos.get(i, {})
        epochs = list(info.get("epoch_seconds") or [])
        row: dict[str, Any] = {"index": i, "epoch_s": epochs}
        if info.get("init_s") is not None:
            row["init_s"], row["init_approx"] = info["init_s"], False
        elif info.get("seconds") is not None:
            row["init_s"], row["init_approx"] = info["seconds"] - sum(epochs), True  # includes quantize/fold
        else:
            row["init_s"], row["init_approx"] = None, True
        for key in ("load_s", "stats_s", "train_s", "quantize_s", "seconds", "init_loss", "final_loss"):
            if info.get(key) is not None:
                row[key] = info[key]
        end = done_at.get(i, math.inf)
        peak = sampler.peak(prev, end)
        row["peak_rss_gb"] = None if peak is None else peak / GB
        prev = end if end != math.inf else prev
        rows.append(row)
    return rows


def safetensors_bytes(d: Path) -> dict[str, int]:
    """Tensor name -> data bytes, from the headers of a directory's safetensors files."""
    from splitq_vllm.checkpoint.reader import read_safetensors_header

    out = {}
    for f in sorted(d.glob("*.safetensors")):
        for name, h in read_safetensors_header(f).items():
            if name != "__metadata__":
                out[name] = h["data_offsets"][1] - h["data_offsets"][0]
    return out


def sizes(model_dir: Path, ckpt: Path) -> dict[str, float]:
    """Checkpoint against bf16: the whole directories, and the quantized layers alone."""
    from splitq_vllm.checkpoint import read_model_config

    src, out = safetensors_bytes(model_dir), safetensors_bytes(ckpt)
    layers = set(read_model_config(ckpt)[1].layers)
    q_ckpt = sum(b for n, b in out.items() if n.rsplit(".", 1)[0] in layers)
    q_src = sum(b for n, b in src.items() if n.rsplit(".", 1)[0] in layers)
    return {"checkpoint_gb": sum(out.values()) / GB, "bf16_gb": sum(src.values()) / GB,
            "quantized_layers_checkpoint_gb": q_ckpt / GB, "quantized_layers_bf16_gb": q_src / GB}  # fmt: skip


# ---------------------------------------------------------------------------------------------
# Serving
# ---------------------------------------------------------------------------------------------


def serve_and_chat(ckpt: Path, work: Path, max_model_len: int, dtype: str, timeout: float) -> dict[str, Any]:
    """Serve the checkpoint with vLLM on the CPU and ask one question about a picture."""
    from splitq_vllm.server import OpenAIServer, ServerError
    from splitq_vllm.testing.conversations import image_part
    from splitq_vllm.testing.images import draw_image, png_bytes

    args = ["--quantization", "splitq", "--enforce-eager", "--dtype", dtype, "--max-model-len", str(max_model_len),
            "--max-num-seqs", "1", "--max-num-batched-tokens", str(max(256, max_model_len // 4)),
            "--limit-mm-per-prompt", json.dumps({"image": 1, "video": 0}), "--seed", "0"]  # fmt: skip
    server = OpenAIServer(ckpt, args, env={"VLLM_CACHE_ROOT": str(work / "vllm-cache")}, startup_timeout=timeout,
                          log_dir=work)  # fmt: skip
    sampler = TreeSampler(lambda: server.proc.pid if server.proc is not None else None)
    sampler.start()
    out: dict[str, Any] = {"args": args, "log": str(server.log_path)}
    try:
        with server:
            out["startup_s"] = server.startup_seconds
            messages = [{"role": "user", "content": [image_part(png_bytes(draw_image("circle", size=224))),
                                                     {"type": "text", "text": "What is in this image?"}]}]  # fmt: skip
            t0 = time.monotonic()
            r = server.client().chat.completions.create(model=server.model, messages=messages, max_tokens=8,
                                                        temperature=0.0)  # fmt: skip
            out["request_s"] = time.monotonic() - t0
            out["answer"] = r.choices[0].message.content
            out["prompt_tokens"] = r.usage.prompt_tokens
            # random weights pick ids beyond the offline tokenizer's small vocabulary, which decode
            # to empty text: the token count says that an answer was generated
            out["completion_tokens"] = r.usage.completion_tokens
            out["finish_reason"] = r.choices[0].finish_reason
            out["backend"] = "triton" if "SplitQ: triton backend" in server.logs() else "reference"
    except (ServerError, OSError, RuntimeError) as e:
        out["error"] = f"{type(e).__name__}: {str(e)[-3000:]}"
    finally:
        sampler.stop()
    peak = sampler.peak()
    out["peak_rss_gb"] = None if peak is None else peak / GB
    return out


# ---------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------


def machine() -> dict[str, Any]:
    import psutil

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {"cpu": cpu, "cores": os.cpu_count(), "ram_gb": psutil.virtual_memory().total / GB,
            "python": platform.python_version()}  # fmt: skip
    try:
        import torch

        info["torch"] = torch.__version__
        if torch.cuda.is_available():
            info["gpu"] = torch.cuda.get_device_name(0)
    except ImportError:
        pass
    return info


def _f(x: Any, fmt: str = "{:.1f}") -> str:
    return "-" if x is None else fmt.format(x)


def _size(gb: float) -> str:
    return f"{gb:.3f} GB" if gb >= 0.1 else f"{gb * 1e3:.2f} MB"


def table(res: dict[str, Any]) -> str:
    lines = [f"{res['model']}: {res['layers_done']}/{res['layers_requested']} layers calibrated "
             f"({res['method']} {res['scheme']}, {res['samples']} samples x ~{res['tokens_per_sample']} tokens, "
             f"{res['epochs']} epochs, device {res['device']}), exit {res['returncode']}",
             "| layer | init s | epoch s (each) | train s | quantize s | layer s | peak RSS GB |",
             "|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in res["layers"]:
        init = _f(r["init_s"]) + (" (approx)" if r["init_approx"] and r["init_s"] is not None else "")
        epochs = ", ".join(f"{e:.1f}" for e in r["epoch_s"]) or "-"
        lines.append(f"| {r['index']} | {init} | {epochs} | {_f(r.get('train_s'))} | {_f(r.get('quantize_s'))} | "
                     f"{_f(r.get('seconds'))} | {_f(r['peak_rss_gb'], '{:.2f}')} |")  # fmt: skip
    lines += [
        f"capture {_f(res.get('capture_s'))} s, export {_f(res.get('export_s'))} s, "
        f"run {_f(res['calibrate_wall_s'])} s",
        f"peak host RSS {_f(res['peak_rss_gb'], '{:.2f}')} GB (sampled; the run's own figure "
        f"{_f(res.get('reported_cpu_peak_rss_gb'), '{:.2f}')} GB)"
        + (f", peak CUDA {res['cuda_peak_gb']:.2f} GB" if res.get("cuda_peak_gb") is not None else ""),
    ]
    est = res.get("estimate")
    if est:
        lines.append(f"memory model (splitq_calibration.memory): peak {est['peak_gb']:.2f} GB (capture "
                     f"{est['capture_gb']:.2f}, statistics {est['stats_gb']:.2f}, training {est['train_gb']:.2f})")  # fmt: skip
    if res.get("checkpoint_gb") is not None:
        lines.append(f"checkpoint {_size(res['checkpoint_gb'])} vs bf16 {_size(res['bf16_gb'])}; quantized layers "
                     f"{_size(res['quantized_layers_checkpoint_gb'])} vs {_size(res['quantized_layers_bf16_gb'])} bf16")  # fmt: skip
    s = res.get("serve")
    if s:
        lines.append(f"served: start-up {_f(s.get('startup_s'))} s, peak RSS {_f(s.get('peak_rss_gb'), '{:.2f}')} GB, "
                     f"answer {s.get('answer')!r} ({s.get('completion_tokens')} tokens)" + (f", ERROR {s['error'][:300]}" if s.get("error") else ""))  # fmt: skip
    return "\n".join(lines)


def plot(path: Path, sampler: TreeSampler, done_at: dict[int, float], title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4))
    ax.plot([t for t, _ in sampler.samples], [r / GB for _, r in sampler.samples], lw=1)
    for i, t in sorted(done_at.items()):
        ax.axvline(t, color="grey", ls=":", lw=0.8)
        ax.text(t, ax.get_ylim()[1] * 0.97, f"layer {i} done", fontsize=7, ha="right", va="top", rotation=90)
    ax.set_xlabel("seconds")
    ax.set_ylabel("RSS of the calibration process tree, GB")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------


def parse_args(argv: list[str]) -> argparse.Namespace:
    extra: list[str] = []
    if "--" in argv:  # everything after a bare -- goes to splitq-calibrate
        i = argv.index("--")
        argv, extra = argv[:i], argv[i + 1 :]
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--model", help="a published model (splitq_vllm.testing.published.PUBLISHED) or a test spec")
    p.add_argument(
        "--model-dir", type=Path, help="model directory: reused if present, else built there (default WORK/model)"
    )
    p.add_argument("--layers", type=int, default=2, help="decoder layers of the built model (default 2)")
    p.add_argument("--samples", type=int, default=8)
    p.add_argument("--tokens", type=int, default=256, help="approximate tokens per sample (default 256)")
    p.add_argument("--vision-frac", type=float, default=0.75, help="Qwen2.5-VL: image share of --tokens (default 0.75)")
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--scheme", default="w4a4")
    p.add_argument("--method", default="splitq")
    p.add_argument("--device", default="auto", help="cpu, cuda or auto (passed to splitq-calibrate)")
    p.add_argument("--seed", type=int, default=0, help="weights of the built model")
    p.add_argument(
        "--work",
        type=Path,
        default=Path("calibrate-real-width"),
        help="data, checkpoint, logs (default ./calibrate-real-width)",
    )
    p.add_argument("--json", type=Path, help="write the results here")
    p.add_argument("--plot", type=Path, help="PNG of RSS over time (matplotlib)")
    p.add_argument(
        "--serve", action="store_true", help="then serve the checkpoint with vLLM (CPU) and send one chat with an image"
    )
    p.add_argument("--serve-dtype", default="bfloat16", help="vLLM --dtype for --serve (default bfloat16)")
    p.add_argument("--serve-timeout", type=float, default=1800, help="seconds to wait for the server (default 1800)")
    p.add_argument(
        "--extra", default="", help="more splitq-calibrate arguments, one string: --extra='--no-train' (or after --)"
    )
    p.add_argument("-q", "--quiet", action="store_true", help="do not echo the calibration log")
    args = p.parse_args(argv)
    args.extra_args = shlex.split(args.extra) + extra
    if args.model is None and args.model_dir is None:
        p.error("pass --model (a published name) or --model-dir (an existing model directory)")
    return args


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    work = args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    load_start = os.getloadavg()
    model_dir, built, build_s = ensure_model(
        args.model, (args.model_dir or work / "model").resolve(), args.layers, args.seed
    )
    plan = plan_samples(model_dir, args.tokens, args.vision_frac)
    data = write_data(work, args.samples, plan)
    ckpt, report_path = work / "checkpoint", work / "report.json"
    report_path.unlink(missing_ok=True)
    max_len = max(2048, plan["tokens_per_sample"] + 64)
    cmd = [sys.executable, "-m", "splitq_calibration.cli", "--model", str(model_dir), "--data", str(data),
           "--output", str(ckpt), "--method", args.method, "--scheme", args.scheme, "--epochs", str(args.epochs),
           "--num-samples", str(args.samples), "--max-seq-len", str(max_len), "--device", args.device,
           "--report", str(report_path), "--overwrite", "--restart", *args.extra_args]  # fmt: skip
    print(f"calibrating {model_dir} ({'built' if built else 'reused'}): {shlex.join(cmd)}", file=sys.stderr)
    run = run_calibration(cmd, work / "calibrate.log", echo=not args.quiet)
    report = json.loads(report_path.read_text()) if report_path.exists() else None
    sampler: TreeSampler = run["sampler"]
    rows = layer_rows(report, run["done_at"], sampler)
    peak = sampler.peak()
    res: dict[str, Any] = {
        "model": args.model or str(model_dir), "model_dir": str(model_dir), "built": built, "build_s": build_s,
        "layers_requested": args.layers, "layers_done": len((report or {}).get("layers") or run["done_at"]),
        "layers": rows, "samples": args.samples, "tokens_target": args.tokens,
        "tokens_per_sample": plan["tokens_per_sample"], "image_tokens_per_sample": plan["image_tokens_per_sample"],
        "image_side": plan["image_side"], "epochs": args.epochs, "scheme": args.scheme, "method": args.method,
        "device": args.device, "returncode": run["returncode"], "calibrate_wall_s": run["wall_s"],
        "peak_rss_gb": None if peak is None else peak / GB,
    }  # fmt: skip
    if report:
        res["tokens_per_sample"] = report.get("tokens", res["tokens_per_sample"] * args.samples) / max(args.samples, 1)
        res["report_device"] = report.get("device")
        for key in ("capture_s", "export_s", "seconds", "reads", "estimate"):
            if report.get(key) is not None:
                res[key] = report[key]
        if report.get("cpu_peak_rss_mb") is not None:
            res["reported_cpu_peak_rss_gb"] = report["cpu_peak_rss_mb"] * 2**20 / GB
        if report.get("cuda_peak_allocated_mb") is not None:
            res["cuda_peak_gb"] = report["cuda_peak_allocated_mb"] * 2**20 / GB
    if run["returncode"] == 0 and (ckpt / "config.json").exists():
        res.update(sizes(model_dir, ckpt))
    if args.serve and run["returncode"] == 0:
        res["serve"] = serve_and_chat(
            ckpt, work, max_model_len=2048, dtype=args.serve_dtype, timeout=args.serve_timeout
        )
    res.update(
        command=shlex.join([sys.executable, str(Path(__file__).resolve()), *argv]), calibrate_command=shlex.join(cmd),
        machine=machine(), date=time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
        load_avg={"start": load_start, "end": os.getloadavg()},
        rss_samples=[[round(t, 2), round(r / GB, 4)] for t, r in sampler.samples[:: 1 + len(sampler.samples) // 2000]],
    )  # fmt: skip
    print(table(res))
    if args.json:
        args.json.write_text(json.dumps(res, indent=2, default=str) + "\n")
    if args.plot and sampler.samples:
        plot(args.plot, sampler, run["done_at"], f"{res['model']}: {args.layers} layers, {args.method} {args.scheme}")
    failed = run["returncode"] != 0 or bool(res.get("serve", {}).get("error"))
    if run["returncode"] != 0:
        print(f"splitq-calibrate exited with {run['returncode']}; its log: {work / 'calibrate.log'}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
