"""Calibrate Qwen2.5-VL-7B-Instruct into a SplitQ W4A4 checkpoint on one GPU, from a
ShareGPT4V-style caption file, then serve it. Notebook style: run it whole, or cell by cell
(`# %%`) in VS Code / Jupyter.

    python examples/calibrate_qwen25vl_7b.py \
        --model /models/Qwen2.5-VL-7B-Instruct \
        --data /data/sharegpt4v/sharegpt4v_coco.jsonl --image-dir /data/coco \
        --output /checkpoints/qwen25vl-7b-splitq-w4a4

The same run from the command line (every setting is a flag; docs/calibration.md):

    splitq-calibrate --model /models/Qwen2.5-VL-7B-Instruct --data sharegpt4v_coco.jsonl \
        --image-dir /data/coco --scheme w4a4 --output qwen25vl-7b-splitq-w4a4 --device cuda

Data: one JSON record per line (or a JSON list), ShareGPT4V's layout:
    {"id": "000000033471", "image": "train2017/000000033471.jpg",
     "conversations": [{"from": "human", "value": "<image>\\nWhat do you see?"},
                       {"from": "gpt", "value": "A long caption ..."}]}
image paths relative to --image-dir (default: the file's folder). The paper's setting is 128
COCO samples of ShareGPT4V (the defaults below).

What it needs (7B, defaults): one CUDA GPU with ~16 GB free for one decoder layer in float32,
its activations and the optimizer (a 24 GB RTX 4090 is enough), host memory for the model in
bf16 (16.6 GB) plus the captured activations (128 x 2048 tokens x 3584 x 4 bytes = 3.8 GB per
copy; --offload-dtype bfloat16 halves that), and several hours (15 epochs x 28 layers). A killed
run resumes where it stopped when started again with the same arguments.

Everything comes from arguments (or $SPLITQ_CALIB_* variables), so the same file runs on the
tiny test model on a CPU: tests/examples/test_examples.py does that with --device cpu --epochs 1.
"""

# %% Settings
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    env = os.environ.get
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=env("SPLITQ_CALIB_MODEL", "Qwen2.5-VL-7B-Instruct"), help="Hugging Face model folder")
    p.add_argument("--data", default=env("SPLITQ_CALIB_DATA", "sharegpt4v_coco.jsonl"), help="ShareGPT4V-style .json/.jsonl")
    p.add_argument("--image-dir", default=env("SPLITQ_CALIB_IMAGE_DIR"), help="folder the image paths are relative to")
    p.add_argument("--output", default=env("SPLITQ_CALIB_OUTPUT", "qwen25vl-7b-splitq-w4a4"))
    p.add_argument("--scheme", default="w4a4", help="w4a8 | w4a4 | w3a3 | w3a2")
    p.add_argument("--num-samples", type=int, default=128)
    p.add_argument("--max-seq-len", type=int, default=2048)
    p.add_argument("--epochs", type=int, default=15)
    p.add_argument("--device", default="cuda", help="cuda, cuda:N; cpu only for a tiny test model")
    p.add_argument("--offload-dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    p.add_argument("--check-layer-errors", type=int, default=0, metavar="N",
                   help="afterwards, compare FP and quantized layer outputs on N samples (both models in "
                        "float32 on the device: tiny models, or a GPU with room for two fp32 copies)")  # fmt: skip
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("splitq_calibration").setLevel(logging.INFO)

    import torch

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("error: no CUDA GPU here; calibrating a 7B model needs one (--device cpu is for tiny test models)")
        return 2

    # %% Look at the data: how many records, and does the first image exist?
    with open(args.data) as f:
        records = [json.loads(line) for line in f if line.strip()] if args.data.endswith(".jsonl") else json.load(f)
    first = records[0]
    image_dir = Path(args.image_dir) if args.image_dir else Path(args.data).parent
    first_image = first["image"][0] if isinstance(first["image"], list) else first["image"]
    print(f"{len(records)} records; first: id={first.get('id')!r} image={first_image!r} "
          f"(exists: {(image_dir / first_image).is_file()})")  # fmt: skip

    # %% Calibrate: one decoder layer at a time on the GPU (the paper's defaults: MOCD with 2% text
    # and 2% vision outlier channels, CWS rank 2%, MAC rank 3%, FlatQuant's training recipe)
    from splitq_calibration import calibrate

    report = Path(f"{args.output}.report.json")
    t0 = time.monotonic()
    checkpoint = calibrate(
        args.model,
        args.data,
        args.output,
        scheme=args.scheme,
        image_dir=args.image_dir,
        num_samples=min(args.num_samples, len(records)),
        max_seq_len=args.max_seq_len,
        epochs=args.epochs,
        device=args.device,
        offload_dtype=args.offload_dtype,
        overwrite=args.overwrite,
        report=str(report),
    )
    print(f"checkpoint: {checkpoint} ({time.monotonic() - t0:.0f} s; per-layer losses and timings in {report})")

    # %% What was written: the quantization_config that vLLM and the plugin read
    from splitq_vllm.checkpoint import read_checkpoint

    qc = read_checkpoint(checkpoint).quant_config
    size = sum(p.stat().st_size for p in Path(checkpoint).glob("*.safetensors"))
    s = qc.scheme
    print(f"{len(qc.layers)} quantized linears, W{s.weight_bits}A{s.act_bits} "
          f"(outlier paths and low-rank branches W{s.aux_weight_bits}A{s.aux_act_bits}), "
          f"{size / 2**30:.2f} GiB of tensors")  # fmt: skip

    # %% Optional: relative error of every decoder layer's output against the FP model
    if args.check_layer_errors:
        from splitq_calibration.evaluate import layer_output_errors

        errors = layer_output_errors(
            args.model, checkpoint, args.data, num_samples=args.check_layer_errors,
            image_dir=args.image_dir, device=args.device,
        )  # fmt: skip
        print("layer output errors:", " ".join(f"{e:.2e}" for e in errors["layers"]), f"logits {errors['logits']:.2e}")

    # %% Serve it
    print(f"""
serve it:
  vllm serve {checkpoint} --quantization splitq --max-model-len 16384
or with docker (docker/README.md): CHECKPOINTS_DIR={Path(checkpoint).parent} CHECKPOINT_NAME={Path(checkpoint).name} in docker/.env, then
  docker compose -f docker/docker-compose.yml up -d""")
    return 0


if __name__ == "__main__":
    sys.exit(main())
