"""Scoring ToyVQA answers: normalisation, exact match, and a runner for transformers models.

Any way of producing answers can be scored:

- `score(samples, generate)` with `generate(question: str, image: PIL.Image | None) -> str`;
- `score_answers(samples, answers)` when the answers come from a batched engine (vLLM, the OpenAI
  server): build each request with `openai_messages(sample)`, collect the texts, score them;
- `evaluate_transformers(model_dir, split="test")` runs a Hugging Face model (greedy) itself.

An answer is right when `normalize_answer(prediction) == normalize_answer(expected)`: lower case,
punctuation and articles dropped, whitespace collapsed, number words read as digits.

CLI: python -m splitq_toyvqa.evaluate --model models/toyvqa-qwen25vl [--split test] [--n 1000]
     [--data-version 2]   (default: the version the model was trained on; the held-out slices imply 2:)
     python -m splitq_toyvqa.evaluate --model ... --split test_heldout_phrasing   (or test_heldout_visual)
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import math
import re
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

from .data import (
    DEFAULT_SEED,
    HELD_OUT_SPLITS,
    NUMBER_WORDS,
    SPLITS_V2,
    Sample,
    chat_messages,
    load_split,
    model_data_version,
)

_WORD_TO_DIGIT = {w: str(i) for i, w in enumerate(NUMBER_WORDS)}
_WORD_TO_DIGIT.update({"eleven": "11", "twelve": "12", "thirteen": "13", "fourteen": "14", "fifteen": "15",
                       "sixteen": "16", "seventeen": "17", "eighteen": "18", "nineteen": "19", "twenty": "20"})  # fmt: skip
_SPELLING = {"centre": "center", "colour": "color", "grey": "gray", "middle": "center"}
_PUNCT = re.compile(r"[^\w\s]")


def normalize_answer(text: str) -> str:
    """Lower case, no punctuation or articles, single spaces, number words as digits."""
    words = _PUNCT.sub(" ", text.lower()).split()
    words = [_SPELLING.get(w, _WORD_TO_DIGIT.get(w, w)) for w in words if w not in ("a", "an", "the")]
    return " ".join(words)


def is_correct(prediction: str, expected: str, relaxed: bool = False) -> bool:
    """Exact match after normalisation; `relaxed`: the expected words anywhere in the prediction
    (for chatty models: "The circle is red." answers "red")."""
    got, want = normalize_answer(prediction), normalize_answer(expected)
    return got == want or (relaxed and f" {want} " in f" {got} ")


@dataclass
class EvalResult:
    """Exact-match accuracy over samples, overall and per question kind, with every answer."""

    records: list[dict[str, Any]] = field(default_factory=list)

    @property
    def n(self) -> int:
        return len(self.records)

    @property
    def correct(self) -> int:
        return sum(r["correct"] for r in self.records)

    @property
    def accuracy(self) -> float:
        return self.correct / max(1, self.n)

    def per_kind(self) -> dict[str, tuple[int, int]]:
        out: dict[str, list[int]] = defaultdict(lambda: [0, 0])
        for r in self.records:
            out[r["kind"]][0] += int(r["correct"])
            out[r["kind"]][1] += 1
        return {k: (c, n) for k, (c, n) in sorted(out.items())}

    def accuracy_on(self, with_image: bool) -> float:
        rs = [r for r in self.records if r["has_image"] == with_image]
        return sum(r["correct"] for r in rs) / max(1, len(rs))

    def summary(self) -> str:
        lines = [
            f"accuracy {self.accuracy:.4f} ({self.correct}/{self.n}); image questions "
            f"{self.accuracy_on(True):.4f}, text-only {self.accuracy_on(False):.4f}"
        ]
        for kind, (c, n) in self.per_kind().items():
            lines.append(f"  {kind:16s} {c / n:.3f} +- {standard_error(c, n):.3f} ({c}/{n})")
        return "\n".join(lines)

    def to_json(self) -> dict[str, Any]:
        return {"n": self.n, "correct": self.correct, "accuracy": self.accuracy,
                "image_accuracy": self.accuracy_on(True), "text_accuracy": self.accuracy_on(False),
                "per_kind": {k: {"correct": c, "n": n} for k, (c, n) in self.per_kind().items()}}  # fmt: skip


def standard_error(correct: int, n: int) -> float:
    """sqrt(p(1-p)/n) of an accuracy p = correct/n: the binomial spread of a score on n questions."""
    p = correct / max(1, n)
    return math.sqrt(p * (1 - p) / max(1, n))


def score_answers(samples: Sequence[Sample], answers: Sequence[str]) -> EvalResult:
    """Score `answers[i]` against `samples[i].answer`."""
    if len(samples) != len(answers):
        raise ValueError(f"{len(samples)} samples but {len(answers)} answers")
    records = [
        {
            "id": s.id,
            "kind": s.kind,
            "has_image": s.image is not None,
            "question": s.question,
            "expected": s.answer,
            "prediction": a,
            "correct": is_correct(a, s.answer),
        }
        for s, a in zip(samples, answers)
    ]
    return EvalResult(records)


def score(samples: Iterable[Sample], generate: Callable[[str, Any], str]) -> EvalResult:
    """Score `generate(question, image_or_None) -> answer text` on `samples`."""
    samples = list(samples)
    return score_answers(samples, [generate(s.question, s.image) for s in samples])


def png_data_url(image) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def openai_messages(sample: Sample) -> list[dict[str, Any]]:
    """The chat request for `sample` in OpenAI form (image as a PNG data URL, then the question):
    what vLLM's `LLM.chat` and the OpenAI server take."""
    part = None
    if sample.image is not None:
        part = {"type": "image_url", "image_url": {"url": png_data_url(sample.image)}}
    return chat_messages(sample.question, part)


def generate_transformers(model, processor, samples: Sequence[Sample], batch_size: int = 32, max_new_tokens: int = 6) -> list[str]:
    """Greedy answers of a transformers Qwen2.5-VL-style model, batched with left padding."""
    import torch

    tok = processor.tokenizer
    old_side = tok.padding_side
    tok.padding_side = "left"
    answers: list[str] = []
    try:
        for i in range(0, len(samples), batch_size):
            batch = samples[i : i + batch_size]
            texts = [processor.apply_chat_template(chat_messages(s.question, s.image), add_generation_prompt=True) for s in batch]
            images = [s.image for s in batch if s.image is not None]
            inputs = processor(text=texts, images=images or None, return_tensors="pt", padding=True)
            with torch.no_grad():
                out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
            new = out[:, inputs["input_ids"].shape[1] :]
            answers += tok.batch_decode(new, skip_special_tokens=True)
    finally:
        tok.padding_side = old_side
    return [a.strip() for a in answers]


def load_transformers(model_dir: str | Path, dtype=None):
    """(model, processor) from a model directory, in eval mode (dtype: the checkpoint's by default)."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    kwargs = {"dtype": dtype} if dtype is not None else {"dtype": "auto"}
    model = AutoModelForImageTextToText.from_pretrained(str(model_dir), **kwargs).eval()
    processor = AutoProcessor.from_pretrained(str(model_dir))
    return model, processor


def evaluate_transformers(
    model_dir: str | Path,
    split: str = "test",
    n: int | None = None,
    seed: int = DEFAULT_SEED,
    batch_size: int = 32,
    dtype=None,
    model_and_processor=None,
    version: int | None = None,
) -> EvalResult:
    """Greedy exact-match accuracy of a transformers model on the first `n` samples of `split`
    (of ToyVQA `version`: 1 or 2, which has the held-out slices; by default the version the
    model was trained on, `model_data_version`)."""
    if version is None:
        version = model_data_version(model_dir)
    samples = load_split(split, n, seed, version)  # bad split/version: an error before loading the model
    model, processor = model_and_processor or load_transformers(model_dir, dtype)
    return score_answers(samples, generate_transformers(model, processor, samples, batch_size))


def main(argv: list[str] | None = None) -> None:
    import torch

    ap = argparse.ArgumentParser(description="Held-out accuracy of a ToyVQA model with transformers (greedy).")
    ap.add_argument("--model", required=True)
    ap.add_argument("--split", default="test", choices=SPLITS_V2)
    ap.add_argument("--data-version", type=int, default=None, choices=(1, 2),
                    help="ToyVQA version (default: the model's, from its training_log.json; 2 for the held-out slices)")
    ap.add_argument("--n", type=int, default=None)
    ap.add_argument("--seed", type=int, default=DEFAULT_SEED)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--show-errors", type=int, default=10)
    ap.add_argument("--json", help="write the result (with every answer) here")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    dtype = None if args.dtype == "auto" else getattr(torch, args.dtype)
    t0 = time.time()
    version = args.data_version or (2 if args.split in HELD_OUT_SPLITS else model_data_version(args.model))
    if version == 1 and args.split in HELD_OUT_SPLITS:
        ap.error(f"--split {args.split} is a version 2 slice: use --data-version 2")
    print(f"ToyVQA version {version}, split {args.split}")
    res = evaluate_transformers(args.model, args.split, args.n, args.seed, args.batch_size, dtype, version=version)
    print(res.summary())
    print(f"({time.time() - t0:.1f} s)")
    for r in [r for r in res.records if not r["correct"]][: args.show_errors]:
        print(f"  wrong: {r['id']} {r['question']!r} expected {r['expected']!r} got {r['prediction']!r}")
    if args.json:
        Path(args.json).write_text(json.dumps({**res.to_json(), "records": res.records}, indent=1) + "\n")


if __name__ == "__main__":
    main()
