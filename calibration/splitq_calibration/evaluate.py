"""Evaluating a SplitQ checkpoint in transformers, without vLLM.

- `layer_output_errors`: run the FP model and a quantized checkpoint (through the reference
  integer forward, quantized_model.load_quantized_model) on the same processed samples and
  report, per decoder layer, the relative error ||Y_q - Y_fp||^2 / ||Y_fp||^2 of the layer
  outputs (errors propagate from layer to layer, as when serving), plus the logits' error.
- `score_questions`: greedy generation on a list of image questions, with an optional expected
  answer per question scored by a relaxed match (the normalised answer occurs in the normalised
  prediction).
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import torch

from splitq_vllm.hf.model import load_quantized_model
from splitq_vllm.model_layout import language_model_layers

from .data import CalibSample, _open_image, _records_from_file, prepare_samples


def is_splitq_checkpoint(path: str | os.PathLike) -> bool:
    cfg = json.loads((Path(path) / "config.json").read_text())
    qc = cfg.get("quantization_config") or (cfg.get("text_config") or {}).get("quantization_config") or {}
    return str(qc.get("quant_method", "")).lower() == "splitq"


def load_any_model(path: str | os.PathLike, device: str | torch.device = "cpu"):
    """(model, processor): a SplitQ checkpoint through the reference, or a plain FP model."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    processor = AutoProcessor.from_pretrained(path)
    if is_splitq_checkpoint(path):
        model = load_quantized_model(path, dtype=torch.float32, device=device)
    else:
        model = AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float32).to(device).eval()
    return model, processor


def _layer_outputs(model, sample: CalibSample, device) -> tuple[list[torch.Tensor], torch.Tensor]:
    _, layers = language_model_layers(model)
    outs: list[torch.Tensor] = []
    hooks = [
        layer.register_forward_hook(
            lambda m, a, o: outs.append((o[0] if isinstance(o, tuple) else o).detach().float().cpu())
        )
        for layer in layers
    ]
    try:
        with torch.no_grad():
            logits = model(**{k: v.to(device) for k, v in sample.inputs.items()}, use_cache=False).logits.float().cpu()
    finally:
        for h in hooks:
            h.remove()
    return outs, logits


def layer_output_errors(
    reference: str | os.PathLike,
    candidate: str | os.PathLike,
    data: Any,
    num_samples: int = 16,
    max_seq_len: int = 2048,
    seed: int = 0,
    image_dir: str | None = None,
    device: str | torch.device = "cpu",
) -> dict[str, Any]:
    """Relative output errors of `candidate` (a checkpoint) against the FP model `reference`,
    per decoder layer and for the logits, summed over the samples."""
    ref_model, processor = load_any_model(reference, device)
    cand_model, _ = load_any_model(candidate, device)
    samples = prepare_samples(data, processor, ref_model.config, num_samples, max_seq_len, seed, image_dir)
    num = den = None
    lnum = lden = 0.0
    for s in samples:
        ref, ref_logits = _layer_outputs(ref_model, s, device)
        cand, cand_logits = _layer_outputs(cand_model, s, device)
        e = torch.tensor([float(((c - r) ** 2).sum()) for c, r in zip(cand, ref)], dtype=torch.float64)
        p = torch.tensor([float((r**2).sum()) for r in ref], dtype=torch.float64)
        num = e if num is None else num + e
        den = p if den is None else den + p
        lnum += float(((cand_logits - ref_logits) ** 2).sum())
        lden += float((ref_logits**2).sum())
    return {"layers": (num / den).tolist(), "logits": lnum / lden, "samples": len(samples)}


# ---------------------------------------------------------------------------------------------
# Generation on image questions
# ---------------------------------------------------------------------------------------------


def _normalise(s: str) -> str:
    return re.sub(r"\s+", " ", re.sub(r"[^\w\s]", " ", s.lower())).strip()


def load_questions(questions: Any, image_dir: str | os.PathLike | None = None) -> list[dict[str, Any]]:
    """A JSON/JSONL file or a list of {id?, image, question, answer?} records."""
    if isinstance(questions, (str, os.PathLike)):
        path = Path(questions)
        records = _records_from_file(path)
        base = Path(image_dir) if image_dir else path.parent
    else:
        records = list(questions)
        base = Path(image_dir) if image_dir else None
    out = []
    for i, r in enumerate(records):
        if not isinstance(r, dict) or "question" not in r:
            raise ValueError(f"question {i}: expected an object with 'question' (and 'image', 'answer')")
        img = r.get("image")
        if isinstance(img, (str, os.PathLike)) and base is not None and not Path(img).is_absolute():
            img = base / img
        out.append({"id": str(r.get("id", i)), "image": img, "question": str(r["question"]), "answer": r.get("answer")})
    return out


def score_questions(
    model: str | os.PathLike,
    questions: Any,
    image_dir: str | os.PathLike | None = None,
    max_new_tokens: int = 32,
    device: str = "auto",
) -> dict[str, Any]:
    """Greedy answers of `model` (a SplitQ checkpoint or an FP model) to image questions."""
    dev = torch.device(
        "cuda" if device == "auto" and torch.cuda.is_available() else ("cpu" if device == "auto" else device)
    )
    m, processor = load_any_model(model, dev)
    results = []
    for q in load_questions(questions, image_dir):
        content = ([{"type": "image"}] if q["image"] is not None else []) + [{"type": "text", "text": q["question"]}]
        text = processor.apply_chat_template(
            [{"role": "user", "content": content}], tokenize=False, add_generation_prompt=True
        )
        kwargs = {"text": [text], "return_tensors": "pt"}
        if q["image"] is not None:
            kwargs["images"] = [_open_image(q["image"], f"question {q['id']!r}")]
        inputs = processor(**kwargs).to(dev)
        with torch.no_grad():
            out = m.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
        pred = processor.batch_decode(out[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)[0].strip()
        r = {"id": q["id"], "question": q["question"], "prediction": pred, "answer": q["answer"]}
        if q["answer"] is not None:
            r["correct"] = _normalise(str(q["answer"])) in _normalise(pred)
        results.append(r)
    scored = [r for r in results if "correct" in r]
    return {
        "model": str(model),
        "answers": results,
        "scored": len(scored),
        "accuracy": (sum(r["correct"] for r in scored) / len(scored)) if scored else None,
    }
