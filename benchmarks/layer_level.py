"""Layer-level comparison of the quantization methods on activations with strong modality
heterogeneity (the structure of the paper's Fig. 2), by output error.

    python benchmarks/layer_level.py [--json out.json] [--markdown table.md] [--quick]

A small model trained on synthetic data may show little text/vision heterogeneity; this puts the
methods where the paper says SplitQ matters. One linear layer (D_in = D_out = 512 by default),
its input rows drawn as:
- every channel has its own typical magnitude (log-normal across channels) with mild per-token
  noise, as in LLM activations;
- vision tokens: a few channels (1%) carry huge magnitudes (x30-x80), only on vision tokens
  ("massive activations" of the vision rows);
- text tokens: other channels (2%) whose magnitude jumps by orders of magnitude from token to
  token (log-uniform over e^-1 .. e^3): unstable per-token ranks, the text outliers MOCD looks for;
- the weight: Gaussian plus a rank-8 component (dominant singular directions, as trained weights
  have).
Each method calibrates on 16 samples (64 vision + 32 text rows each) with the project's own
calibration code (`splitq_calibration`: channel selection, GroupParams init, FlatQuant-style
training, 15 epochs by default), is frozen with `quantize_linear`, and is scored on 16 held-out
samples through the integer reference (`splitq_linear`, what is served): relative output error
||Y_q - Y||^2 / ||Y||^2 on text rows, vision rows and all rows. The paper's baselines (MBQ,
MASQuant, VLMQ: splitq_calibration/baselines/, `calibrate_linear`: the block is the linear
itself) are scored the same way; MASQuant also by its full Eq. 29 forward (`MASQuantLinear`:
per-modality smoothing and the vision-row correction, which the SplitQ format cannot hold).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass

import torch

BASELINES = ("mbq", "masquant", "vlmq")  # splitq_calibration.baselines: no training epochs
METHODS = ("rtn", "smoothquant", "flatquant", "mocd", "mocd_cws", "splitq", "mbq", "masquant", "vlmq")
SCHEMES = ("w4a8", "w4a4", "w3a3", "w3a2")
LABELS = {
    "rtn": "RTN",
    "smoothquant": "SmoothQuant",
    "flatquant": "FlatQuant",
    "mocd": "MOCD",
    "mocd_cws": "MOCD + CWS",
    "splitq": "MOCD + CWS + MAC (SplitQ)",
    "mbq": "MBQ",
    "masquant": "MASQuant, text base (the checkpoint)",
    "masquant_full": "MASQuant, full Eq. 29 (not in the format)",
    "vlmq": "VLMQ",
}


@dataclass
class Data:
    x: list[torch.Tensor]  # per sample (T, D_in)
    text_mask: list[torch.Tensor]  # per sample (T,) bool
    vision_channels: torch.Tensor
    text_channels: torch.Tensor
    channels: tuple  # (vision channels, text channels, base magnitudes, vision boosts): shared by splits


def make_weight(d_in: int, d_out: int, gen: torch.Generator) -> torch.Tensor:
    w = torch.randn(d_out, d_in, generator=gen) / d_in**0.5
    u = torch.randn(d_out, 8, generator=gen)
    v = torch.randn(8, d_in, generator=gen)
    return w + 0.5 * (u @ v) / d_in**0.5


def make_data(
    d_in: int, n_samples: int, n_vision: int, n_text: int, gen: torch.Generator, channels=None
) -> Data:
    if channels is None:
        perm = torch.randperm(d_in, generator=gen)
        vis = perm[: max(1, d_in // 100)]
        txt = perm[len(vis) : len(vis) + max(1, d_in // 50)]
        base = torch.exp(0.5 * torch.randn(d_in, generator=gen))
        boost = 30 + 50 * torch.rand(len(vis), generator=gen)
        channels = (vis, txt, base, boost)
    vis, txt, base, boost = channels
    xs, masks = [], []
    for _ in range(n_samples):
        noise = lambda n: torch.exp(0.3 * torch.randn(n, d_in, generator=gen))  # noqa: E731
        sign = lambda n: torch.where(torch.rand(n, d_in, generator=gen) < 0.5, -1.0, 1.0)  # noqa: E731
        xv = base * noise(n_vision) * sign(n_vision)
        xv[:, vis] *= boost
        xt = base * noise(n_text) * sign(n_text)
        xt[:, txt] = xt[:, txt].sign() * base[txt] * torch.exp(torch.empty(n_text, len(txt)).uniform_(-1, 3, generator=gen))
        # a text prefix, the image rows, the question (row order does not matter to a linear layer)
        x = torch.cat([xt[: n_text // 2], xv, xt[n_text // 2 :]])
        m = torch.cat([torch.ones(n_text // 2), torch.zeros(n_vision), torch.ones(n_text - n_text // 2)]).bool()
        xs.append(x)
        masks.append(m)
    return Data(xs, masks, vis.sort().values, txt.sort().values, channels)


def calibrate_one(weight, bias, train: Data, method: str, scheme: str, epochs: int, **overrides):
    """The project's calibration of one linear group: returns the frozen SplitQLinear and info."""
    from splitq_calibration.layer import GroupRunner, MaskHolder
    from splitq_calibration.method import init_group, train_groups
    from splitq_calibration.mocd import ChannelStats
    from splitq_calibration.recipe import CalibrationConfig
    from splitq_kernels.reference import quantize_linear

    cfg = CalibrationConfig(method=method, scheme=scheme, epochs=epochs, device="cpu", **overrides).resolved()
    stats = ChannelStats.empty(weight.shape[1])
    for x, m in zip(train.x, train.text_mask):
        stats.update(x, m, torch.nonzero(m).reshape(-1))
    gen = torch.Generator().manual_seed(cfg.seed)
    params = init_group(stats, weight, bias, cfg, gen, torch.device("cpu"))
    holder = MaskHolder()
    runner = GroupRunner(params, cfg.quant_scheme, holder)
    targets = [torch.nn.functional.linear(x, weight, bias) for x in train.x]

    def run(i: int) -> torch.Tensor:
        holder.mask = train.text_mask[i]
        return runner(train.x[i])

    trained = train_groups({"layer": runner}, run, targets, cfg, torch.device("cpu"))
    power = trained.output_power
    with torch.no_grad():
        q = quantize_linear(params.float_layer(), cfg.quant_scheme)
    info = {
        "text_channels": params.idx_text.tolist(),
        "vision_channels": params.idx_vision.tolist(),
        "cws_rank": params.cws_rank,
        "mac_rank": params.mac_rank,
        "train_loss": [trained.init_loss / power, trained.losses[-1] / power],
    }
    return q, cfg.quant_scheme, info


def calibrate_baseline(weight, bias, train: Data, method: str, scheme: str):
    """A baseline (MBQ, MASQuant, VLMQ) of one linear: (SplitQLinear, scheme, info, the full
    MASQuant forward or None)."""
    from splitq_calibration.baselines import calibrate_linear
    from splitq_calibration.recipe import CalibrationConfig

    cfg = CalibrationConfig(method=method, scheme=scheme, device="cpu").resolved()
    q, info, full = calibrate_linear(method, weight, bias, train.x, train.text_mask, cfg)
    keep = {k: v for k, v in info.items() if k in ("alpha", "g_text", "g_vision", "cmc_rank", "importance")}
    return q, cfg.quant_scheme, keep, full


def evaluate(q, scheme, weight, bias, test: Data, forward=None) -> dict[str, float]:
    """Relative output errors of q through the integer reference (or of `forward(x, mask)`)."""
    from splitq_kernels.reference import splitq_linear

    err = {"text": [0.0, 0.0], "vision": [0.0, 0.0]}
    for x, m in zip(test.x, test.text_mask):
        y = torch.nn.functional.linear(x.double(), weight.double(), None if bias is None else bias.double())
        yq = splitq_linear(x.double(), m, q, scheme) if forward is None else forward(x, m).double()
        for name, rows in (("text", m), ("vision", ~m)):
            err[name][0] += float(((yq[rows] - y[rows]) ** 2).sum())
            err[name][1] += float((y[rows] ** 2).sum())
    out = {k: v[0] / v[1] for k, v in err.items()}
    out["all"] = (err["text"][0] + err["vision"][0]) / (err["text"][1] + err["vision"][1])
    return out


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--d", type=int, default=512)
    ap.add_argument("--samples", type=int, default=16)
    ap.add_argument("--epochs", type=int, default=15)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--schemes", default=",".join(SCHEMES))
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--no-ablations", action="store_true", help="skip the Table 4/5-style ablation rows")
    ap.add_argument("--quick", action="store_true", help="tiny sizes, 1 epoch, two methods (a smoke test)")
    ap.add_argument("--json")
    ap.add_argument("--markdown")
    args = ap.parse_args(argv)
    if args.quick:
        args.d, args.samples, args.epochs = 96, 4, 1
        args.schemes, args.methods, args.no_ablations = "w4a4", "rtn,splitq", True
    torch.set_num_threads(1)  # reproducible sums; fast enough at these sizes
    gen = torch.Generator().manual_seed(args.seed)
    weight = make_weight(args.d, args.d, gen)
    bias = 0.1 * torch.randn(args.d, generator=gen)
    train = make_data(args.d, args.samples, 64, 32, gen)
    test = make_data(args.d, args.samples, 64, 32, gen, channels=train.channels)
    rows = []

    def record(label: str, method: str, scheme: str, overrides: dict, errors: dict, t0: float, info: dict) -> None:
        row = {"label": label, "method": method, "scheme": scheme, "overrides": overrides, **errors,
               "seconds": round(time.perf_counter() - t0, 1), **info}
        rows.append(row)
        print(f"{scheme:5s} {label:34s} text {errors['text']:.4e}  vision {errors['vision']:.4e}  "
              f"all {errors['all']:.4e}  ({row['seconds']:.1f} s)", flush=True)

    def run(label: str, method: str, scheme: str, **overrides) -> None:
        t0 = time.perf_counter()
        if method in BASELINES:
            q, sch, info, full = calibrate_baseline(weight, bias, train, method, scheme)
            record(label, method, scheme, overrides, evaluate(q, sch, weight, bias, test), t0, info)
            if full is not None:
                errors = evaluate(None, sch, weight, bias, test, forward=full)
                record(LABELS["masquant_full"], "masquant_full", scheme, overrides, errors, t0, info)
            return
        q, sch, info = calibrate_one(weight, bias, train, method, scheme, args.epochs, **overrides)
        record(label, method, scheme, overrides, evaluate(q, sch, weight, bias, test), t0, info)

    for scheme in args.schemes.split(","):
        for method in args.methods.split(","):
            run(LABELS[method], method, scheme)
    if not args.no_ablations:
        for rule in ("none", "random", "text_max", "vision_max", "multi_max", "multi_mean", "mocd"):
            run(f"selection={rule} (MOCD path)", "mocd", "w3a3", selection=rule)
        for target in ("text", "vision", "all"):
            run(f"MAC on {target} rows", "splitq", "w3a2", mac_rows=target)
    planted = {"vision": train.vision_channels.tolist(), "text": train.text_channels.tolist()}
    result = {"config": vars(args), "planted_channels": planted, "rows": rows}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(markdown(result))
    return result


def markdown(result: dict) -> str:
    lines = ["| bits | method | text rows | vision rows | all rows |", "|---|---|---|---|---|"]
    for r in result["rows"]:
        lines.append(f"| {r['scheme'].upper()} | {r['label']} | {r['text']:.2e} | {r['vision']:.2e} | {r['all']:.2e} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
