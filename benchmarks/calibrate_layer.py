"""Time and memory of calibrating ONE decoder layer of Qwen2.5-VL-7B's language model (its real
shapes, random weights built from its config), and the projected time for the whole model.

    python benchmarks/calibrate_layer.py --device cuda --json out.json      # on a GPU (H100)
    python benchmarks/calibrate_layer.py --quick                            # CPU smoke run, reduced size

It runs the same `calibrate_layer` that `splitq-calibrate` runs per layer (FP targets and
statistics, MOCD, init, training with the paper's defaults, fold and quantize) on synthetic
activations: N samples of T tokens, a fraction of them vision tokens, with planted outlier
channels (large on vision tokens, unstable on text tokens) so MOCD has something to find.
Projection: whole model = per-layer time x 28 layers (capturing layer-0 inputs, which runs the
vision tower once per sample, and the export are not included; both are small next to 28 layers
of training).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time

import torch

from splitq_vllm.testing.published import text_config_kwargs

# Qwen2.5-VL-7B-Instruct's language model (the release's config.json, kept in splitq_vllm.testing.published)
QWEN25VL_7B = text_config_kwargs("qwen2.5-vl-7b")
QUICK = dict(
    hidden_size=256,
    intermediate_size=512,
    num_attention_heads=4,
    num_key_value_heads=2,
    num_hidden_layers=28,
    rms_norm_eps=1e-6,
    max_position_embeddings=4096,
    vocab_size=1024,
    bos_token_id=None,
    eos_token_id=None,
    rope_parameters={"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [8, 12, 12]},
)


def build_layer(shapes: dict, dtype: torch.dtype, seed: int):
    from transformers import Qwen2_5_VLTextConfig
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VLDecoderLayer, Qwen2_5_VLRotaryEmbedding

    config = Qwen2_5_VLTextConfig(**shapes)
    config._attn_implementation = "sdpa"
    torch.manual_seed(seed)
    layer = Qwen2_5_VLDecoderLayer(config, layer_idx=0)
    with torch.no_grad():
        for name, p in layer.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            else:  # linear weights and the q/k/v biases
                p.normal_(0.0, 0.02)
    return layer.to(dtype).eval(), Qwen2_5_VLRotaryEmbedding(config), config


def synthetic_inputs(hidden: int, samples: int, tokens: int, vision_frac: float, rotary, seed: int):
    from splitq_calibration.capture import LayerInputs

    g = torch.Generator().manual_seed(seed)
    v_out = torch.randperm(hidden, generator=g)[: max(1, hidden // 100)]
    t_out = torch.randperm(hidden, generator=g)[: max(1, hidden // 100)]
    scale = torch.exp(0.5 * torch.randn(hidden, generator=g))
    hs, kws, masks = [], [], []
    n_vis = int(tokens * vision_frac)
    for _ in range(samples):
        x = torch.randn(tokens, hidden, generator=g) * scale
        mask = torch.ones(tokens, dtype=torch.bool)
        start = min(16, tokens - n_vis)
        mask[start : start + n_vis] = False  # system/user text, image block, then question/caption
        xv = x[~mask]
        xv[:, v_out] *= 30.0
        x[~mask] = xv
        xt = x[mask]
        xt[:, t_out] *= torch.exp(1.5 * torch.randn(xt.shape[0], t_out.numel(), generator=g))
        x[mask] = xt
        pos = torch.arange(tokens).view(1, 1, -1).expand(3, 1, -1)
        cos, sin = rotary(x[None], pos)
        hs.append(x[None].contiguous())
        kws.append(
            {"attention_mask": None, "position_ids": None, "position_embeddings": (cos, sin), "use_cache": False}
        )
        masks.append(mask)
    return LayerInputs(hs, kws, masks)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="reduced shapes and data, CPU (a smoke test)")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda if available, cpu with --quick)")
    p.add_argument("--samples", type=int, default=None, help="calibration samples (default 128; quick 4)")
    p.add_argument("--tokens", type=int, default=None, help="tokens per sample (default 512; quick 48)")
    p.add_argument("--vision-frac", type=float, default=0.75, help="fraction of vision tokens per sample")
    p.add_argument("--epochs", type=int, default=None, help="epochs (default 15, the paper's; quick 1)")
    p.add_argument("--scheme", default="w4a4")
    p.add_argument("--method", default="splitq")
    p.add_argument("--json", help="write the result here")
    args = p.parse_args(argv)

    from splitq_calibration.memory import peak_memory_mb
    from splitq_calibration.method import calibrate_layer
    from splitq_calibration.pipeline import resolve_device
    from splitq_calibration.recipe import CalibrationConfig

    shapes = QUICK if args.quick else QWEN25VL_7B
    samples = args.samples or (4 if args.quick else 128)
    tokens = args.tokens or (48 if args.quick else 512)
    epochs = args.epochs if args.epochs is not None else (1 if args.quick else 15)
    device = resolve_device(args.device or ("cpu" if args.quick else "auto"))
    cfg = CalibrationConfig(method=args.method, scheme=args.scheme, epochs=epochs, num_samples=samples).resolved()

    t0 = time.perf_counter()
    layer, rotary, config = build_layer(shapes, torch.bfloat16, seed=0)
    inputs = synthetic_inputs(shapes["hidden_size"], samples, tokens, args.vision_frac, rotary, seed=1)
    setup_s = time.perf_counter() - t0
    if device.type == "cuda":
        torch.cuda.synchronize()
    t1 = time.perf_counter()
    result, _ = calibrate_layer(layer, 0, inputs, ["qkv", "o", "gate_up", "down"], cfg, device, want_outputs=False)
    if device.type == "cuda":
        torch.cuda.synchronize()
    layer_s = time.perf_counter() - t1
    n_layers = shapes["num_hidden_layers"]
    info = result.info
    out = {
        "what": "one Qwen2.5-VL-7B decoder layer (random weights)"
        if not args.quick
        else "quick CPU mode (reduced shapes)",
        "shapes": {k: v for k, v in shapes.items() if k != "rope_parameters"},
        "device": str(device)
        + (
            f" ({torch.cuda.get_device_name(device)})"
            if device.type == "cuda"
            else f" ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
        ),
        "torch": torch.__version__,
        "samples": samples,
        "tokens_per_sample": tokens,
        "vision_fraction": args.vision_frac,
        "method": args.method,
        "scheme": args.scheme,
        "epochs": epochs,
        "setup_s": round(setup_s, 2),
        "layer_s": round(layer_s, 2),
        "epoch_s_mean": round(sum(info["epoch_seconds"]) / max(len(info["epoch_seconds"]), 1), 3),
        "outside_epochs_s": round(layer_s - sum(info["epoch_seconds"]), 2),
        "projected_model_s": round(layer_s * n_layers, 1),
        "projected_model_min": round(layer_s * n_layers / 60, 1),
        "layers": n_layers,
        "init_loss": info["init_loss"],
        "final_loss": info["final_loss"],
        **{k: round(v, 1) for k, v in peak_memory_mb(device).items()},
    }
    print(json.dumps(out, indent=2))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(out, fh, indent=2)
    return out


if __name__ == "__main__":
    main(sys.argv[1:])
