#!/usr/bin/env python
"""The project's one GPU check (issue 13), driven by benchmarks/gpu_check.sh OUTDIR.

    python benchmarks/gpu_check.py --out OUTDIR                      # bare H100/H200: every step, < 8 minutes
    python benchmarks/gpu_check.py --out OUTDIR --dry-run            # CPU: the same steps in their CPU modes
    python benchmarks/gpu_check.py --out OUTDIR --steps env,capture  # a subset
    python benchmarks/gpu_check.py --print-plan [--dry-run]          # the commands, nothing run

Steps, in order, each a subprocess with its own log (OUTDIR/<step>.log) and a time limit cut to
what is left of the overall budget (--budget-s, default 450 s), so a slow step costs only itself:
- env:        GPU, torch, Triton, transformers versions
- cost_model: the predictions of benchmarks/cost_model.py, written before anything is timed
- gpu_tests:  pytest -m gpu (kernel correctness at real shapes against the reference, CUDA graphs)
- kernels:    benchmarks/bench_kernels.py per 7B layer (correctness at the real shape, then bf16,
              w4a4_gemm, mocd, mocd+cws, splitq at 1, 16, 256, 2048, 16384 rows; CUDA graphs,
              cold L2, median), one call per layer so a cut keeps what finished
- capture:    the SplitQ linear under torch.compile (fullgraph) captured in a CUDA graph and
              replayed, as vLLM runs decode steps; output equal to eager
- e2e:        benchmarks/bench_e2e_qwen25vl.py (transformers, Qwen2.5-VL-7B shapes, random
              weights): prefill and decode latency and peak memory, SplitQ vs bf16
- calibrate:  benchmarks/calibrate_layer.py --device cuda (one 7B decoder layer, reduced data)
- summary:    OUTDIR/results.json and OUTDIR/results.md (measured beside predicted)
Needs only torch, triton and transformers (no vLLM, no network). With --dry-run each step runs
its CPU mode (Triton interpreter, tiny shapes): it checks the code paths, not the speed.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "benchmarks"
STEPS = ("env", "cost_model", "gpu_tests", "kernels", "capture", "e2e", "calibrate", "summary")
KERNEL_LAYERS = ("qkv", "down", "o_proj", "gate_up")  # 7B; the costliest to miss first
ROWS = "1,16,256,2048,16384"
# per-step caps in seconds (GPU); the overall budget cuts them further
CAPS = {"gpu_tests": 60, "kernels": 50, "capture": 35, "e2e": 100, "calibrate": 45}  # 440 s; guesses, never timed


def _env() -> dict[str, str]:
    env = dict(os.environ)
    paths = [str(ROOT), str(ROOT / "kernels"), str(ROOT / "calibration"), str(ROOT / "toyvqa")]
    env["PYTHONPATH"] = os.pathsep.join(paths + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    env.pop("TRITON_INTERPRET", None)  # the scripts switch to the interpreter themselves (--cpu-check)
    env.pop("OUT", None)
    return env


def plan(out: Path, dry_run: bool) -> list[tuple[str, str, list[str]]]:
    """(step, label, argv) for every subprocess, in order."""
    py = sys.executable
    cmds: list[tuple[str, str, list[str]]] = [
        ("env", "env", [py, str(Path(__file__)), "--env-only", "--out", str(out)]),
        ("cost_model", "cost_model", [py, str(BENCH / "cost_model.py"), "--precision", "float32,bf16", "--json",
                                      str(out / "cost_model.json")]),
    ]
    if dry_run:
        cmds += [
            ("kernels", "kernels", [py, str(BENCH / "bench_kernels.py"), "--cpu-check", "--json",
                                    str(out / "bench_kernels.cpu.json")]),
            ("capture", "capture", [py, str(Path(__file__)), "--capture-only", "--dry-run", "--out", str(out)]),
            ("e2e", "e2e", [py, str(BENCH / "bench_e2e_qwen25vl.py"), "--cpu-check", "--json",
                            str(out / "bench_e2e.cpu.json")]),
            ("calibrate", "calibrate", [py, str(BENCH / "calibrate_layer.py"), "--quick", "--json",
                                        str(out / "calibrate_layer.cpu.json")]),
        ]
        return cmds
    cmds.append(("gpu_tests", "gpu_tests", [py, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider",
                                            str(ROOT / "tests" / "kernels" / "triton" / "test_gpu.py")]))
    for layer in KERNEL_LAYERS:
        cmds.append(("kernels", f"kernels.{layer}",
                     [py, str(BENCH / "bench_kernels.py"), "--models", "7b", "--layers", layer, "--rows", ROWS,
                      "--json", str(out / f"bench_kernels.7b.{layer}.json")]))
    cmds += [
        ("capture", "capture", [py, str(Path(__file__)), "--capture-only", "--out", str(out)]),
        ("e2e", "e2e", [py, str(BENCH / "bench_e2e_qwen25vl.py"), "--batches", "1,8", "--decode", "16",
                        "--repeats", "2", "--json", str(out / "bench_e2e.json")]),
        ("calibrate", "calibrate", [py, str(BENCH / "calibrate_layer.py"), "--device", "cuda", "--samples", "16",
                                    "--tokens", "512", "--epochs", "2", "--json", str(out / "calibrate_layer.json")]),
    ]
    return cmds


# ---------------------------------------------------------------------------------------------
# in-process steps (run as subprocesses of the driver: `--env-only`, `--capture-only`)
# ---------------------------------------------------------------------------------------------


def env_info() -> dict:
    import torch

    info = {"date_utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()), "python": sys.version.split()[0],
            "torch": torch.__version__, "cuda": torch.cuda.is_available()}
    for mod in ("triton", "transformers"):
        try:
            info[mod] = __import__(mod).__version__
        except ImportError:
            info[mod] = None
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        info.update(gpu=p.name, sms=p.multi_processor_count, memory_gib=round(p.total_memory / 2**30, 1),
                    capability=f"sm_{p.major}{p.minor}")
    return info


def capture_check(dry_run: bool) -> dict:
    """The full SplitQ linear (7B qkv shape on the GPU; a tiny awkward one in the interpreter)
    under torch.compile(fullgraph=True), captured in a CUDA graph at 1 and 16 rows and replayed on
    new inputs: the replay must equal eager bit for bit (the kernels are deterministic)."""
    import torch

    if dry_run:
        import splitq_kernels.triton as skt

        skt.use_interpreter()
    from splitq_kernels.layout import prepare_kernel_layer
    from splitq_kernels.ops import splitq_linear_triton
    from splitq_kernels.reference import SplitQScheme

    from splitq_vllm.testing.layers import default_layer_dims, random_quantized_layer

    device = torch.device("cpu" if dry_run else "cuda")
    d_in, d_out = (200, 72) if dry_run else (3584, 4608)
    scheme = SplitQScheme.from_name("w4a4")
    dims = default_layer_dims(d_in, d_out, main_multiple=16 if dry_run else 64)
    layer = random_quantized_layer(d_in, d_out, scheme=scheme, bias=True, seed=0, **dims).to(device)
    kl = prepare_kernel_layer(layer, scheme, device, precision="ieee" if dry_run else "tf32x3")
    fn = torch.compile(lambda x, m: splitq_linear_triton(x, m, kl), fullgraph=True,
                       backend="aot_eager" if dry_run else "inductor")
    out = {"shape": [d_in, d_out], "backend": "aot_eager" if dry_run else "inductor", "cases": []}
    for rows in (1, 16):
        gen = torch.Generator(device=device).manual_seed(rows)
        x = torch.randn(rows, d_in, generator=gen, device=device).to(torch.bfloat16)
        mask = torch.ones(rows, dtype=torch.bool, device=device)  # decode rows are text
        eager = splitq_linear_triton(x, mask, kl)  # also sizes the shared split-K workspace
        compiled = fn(x, mask)
        case = {"rows": rows, "compiled_equals_eager": bool(torch.equal(compiled, eager))}
        if device.type == "cuda":
            s = torch.cuda.Stream()
            s.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(s):
                for _ in range(2):
                    fn(x, mask)
            torch.cuda.current_stream().wait_stream(s)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                y_static = fn(x, mask)
            x.copy_(torch.randn(rows, d_in, generator=gen, device=device).to(torch.bfloat16))
            graph.replay()
            torch.cuda.synchronize()
            case["graph_replay_equals_eager"] = bool(torch.equal(y_static, splitq_linear_triton(x, mask, kl)))
        out["cases"].append(case)
    out["ok"] = all(all(v for k, v in c.items() if k != "rows") for c in out["cases"])
    return out


# ---------------------------------------------------------------------------------------------
# summary
# ---------------------------------------------------------------------------------------------


def _load(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def summarize(out: Path, steps: list[dict]) -> dict:
    """results.json (everything) and results.md (the kernel table, measured beside predicted)."""
    res: dict = {"steps": steps, "env": _load(out / "env.json"), "capture": _load(out / "capture.json"),
                 "e2e": _load(out / "bench_e2e.json"), "calibrate": _load(out / "calibrate_layer.json"),
                 "kernels": []}
    for layer in KERNEL_LAYERS:
        k = _load(out / f"bench_kernels.7b.{layer}.json")
        if k:
            res["kernels"] += k.get("rows", [])
            res.setdefault("kernel_checks_passed", {})[layer] = k.get("checks_passed")
            res["peaks"] = k.get("peaks")
    cost = _load(out / "cost_model.json")
    pred = {}
    gpu = (res["env"] or {}).get("gpu") or ""
    hw = "h200" if "H200" in gpu else "h100"
    if cost:
        for r in cost["results"]:
            if r["hardware"] == hw:
                pred[(r["design"], r.get("precision", "float32"), r["layer"], r["rows"])] = r
    lines = [f"# gpu_check: {gpu or 'no GPU'} ({(res['env'] or {}).get('date_utc', '?')} UTC)", "",
             "| step | status | seconds |", "|---|---|---|"]
    lines += [f"| {s['label']} | {s['status']} | {s['seconds']:.0f} |" for s in steps]
    variants = ("w4a4_gemm", "mocd", "mocd+cws", "splitq")
    head = ("| layer | rows | bf16 ms | " + " | ".join(f"{v} x" for v in variants)
            + " | splitq x predicted | splitq / w4a4 | a ms | b ms | splitq bf16 x | predicted |")
    lines += ["", f"Kernels, 7B (ratio to bf16 measured; predicted by cost_model.py for {hw}, design as built; "
              "'splitq bf16': SPLITQ_PRECISION=bf16):", "", head, "|---" * (9 + len(variants)) + "|"]
    for r in res["kernels"]:
        p = pred.get(("decode", "float32", f"7b.{r['layer']}", r["rows"]))  # the design as built (= current above 16 rows)
        ps = f"{p['variants']['splitq']['ratio_to_bf16']:.2f}" if p else "-"
        pb = pred.get(("decode", "bf16", f"7b.{r['layer']}", r["rows"]))
        pbs = f"{pb['variants']['splitq']['ratio_to_bf16']:.2f}" if pb else "-"
        sq, w4 = r.get("splitq_ms"), r.get("w4a4_gemm_ms")

        def f(v):
            return f"{v:.3f}" if isinstance(v, float) else "-"

        lines.append(f"| {r['layer']} | {r['rows']} | {f(r.get('bf16_ms'))} | "
                     + " | ".join(f(r.get(f"{v}_speedup")) for v in variants)
                     + f" | {ps} | {f(sq / w4) if sq and w4 else '-'} | {f(r.get('splitq_a_ms'))} "
                     f"| {f(r.get('splitq_b_ms'))} | {f(r.get('splitq_bf16_speedup'))} | {pbs} |")
    if res["capture"]:
        ok = "ok" if res["capture"].get("ok") else "FAILED"
        lines += ["", f"Capture (torch.compile + CUDA graph): {ok} {json.dumps(res['capture'].get('cases'))}"]
    for key in ("e2e", "calibrate"):
        if res[key]:
            lines += ["", f"{key}:", "```", json.dumps(res[key], indent=1)[:4000], "```"]
    (out / "results.json").write_text(json.dumps(res, indent=1))
    (out / "results.md").write_text("\n".join(lines) + "\n")
    return res


def run_steps(out: Path, dry_run: bool, wanted: list[str], budget_s: float) -> list[dict]:
    deadline = time.time() + budget_s
    done = []
    for step, label, argv in plan(out, dry_run):
        if step not in wanted:
            continue
        left = deadline - time.time() - 5  # keep a few seconds for the summary
        cap = 600 if dry_run else CAPS.get(step, 60)
        if left < 5:
            done.append({"label": label, "status": "skipped (budget spent)", "seconds": 0.0, "argv": argv})
            continue
        t0 = time.time()
        with open(out / f"{label}.log", "w") as log:
            log.write(" ".join(argv) + "\n")
            log.flush()
            try:
                rc = subprocess.run(argv, cwd=ROOT, env=_env(), stdout=log, stderr=subprocess.STDOUT,
                                    timeout=min(cap, left), check=False).returncode
                status = "ok" if rc == 0 else f"failed (exit {rc})"
            except subprocess.TimeoutExpired:
                status = f"timed out after {min(cap, left):.0f}s"
        done.append({"label": label, "status": status, "seconds": time.time() - t0, "argv": argv})
        print(f"[gpu_check] {label}: {status} ({done[-1]['seconds']:.0f}s)", flush=True)
    return done


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, help="output folder (created)")
    ap.add_argument("--dry-run", action="store_true", help="CPU modes of every step (interpreter, tiny shapes)")
    ap.add_argument("--steps", default=",".join(STEPS), help=f"comma list of {STEPS}")
    ap.add_argument("--budget-s", type=float, default=450.0, help="overall time budget in seconds")
    ap.add_argument("--print-plan", action="store_true", help="print the commands and exit")
    ap.add_argument("--env-only", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--capture-only", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    wanted = [s for s in a.steps.split(",") if s]
    bad = [s for s in wanted if s not in STEPS]
    if bad:
        ap.error(f"unknown steps {bad}; known: {', '.join(STEPS)}")
    if a.budget_s <= 0:
        ap.error("--budget-s must be positive")
    if a.print_plan:
        for step, label, cmd in plan(a.out or Path("OUTDIR"), a.dry_run):
            if step in wanted:
                print(f"{label}: {' '.join(cmd)}")
        return 0
    if a.out is None:
        ap.error("--out OUTDIR is required")
    a.out.mkdir(parents=True, exist_ok=True)
    if a.env_only:
        (a.out / "env.json").write_text(json.dumps(env_info(), indent=1))
        return 0
    if a.capture_only:
        res = capture_check(a.dry_run)
        (a.out / "capture.json").write_text(json.dumps(res, indent=1))
        print(json.dumps(res))
        return 0 if res["ok"] else 1
    if not a.dry_run:
        import torch

        if not torch.cuda.is_available():
            print("gpu_check: no CUDA device; use --dry-run on a CPU machine", file=sys.stderr)
            return 2
    steps = run_steps(a.out, a.dry_run, wanted, a.budget_s)
    if "summary" in wanted:
        summarize(a.out, steps)
        print(f"[gpu_check] wrote {a.out / 'results.json'} and {a.out / 'results.md'}", flush=True)
    return 0 if all(s["status"] == "ok" for s in steps) else 1


if __name__ == "__main__":
    sys.exit(main())
