"""ToyVQA held-out questions for lm-evaluation-harness, from the local file (no download).

The questions are examples/toyvqa_heldout/questions.jsonl (the shape examples/evaluate_server.py
reads); `--metadata '{"questions": "/path/to/your.jsonl"}'` takes another file of that shape.
Only the questions with an image: lm-eval decides per call whether requests carry images, from
its first request, so image and text questions go in separate runs (docs/evaluation.md).
Scoring is examples/evaluate_server.py's rule: lower case, punctuation to spaces, white space
collapsed; `contains` = the answer appears in the prediction, `exact_match` = equal.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import datasets
from PIL import Image

QUESTIONS = Path(__file__).resolve().parents[3] / "toyvqa_heldout" / "questions.jsonl"


def load(questions: str | None = None, **kwargs) -> datasets.DatasetDict:
    path = Path(questions) if questions else QUESTIONS
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    rows = [
        {"id": str(r.get("id", n)), "image": str(path.parent / r["image"]), "question": r["question"],
         "answers": r["answer"] if isinstance(r["answer"], list) else [r["answer"]]}
        for n, r in enumerate(records, 1) if isinstance(r.get("image"), str)
    ]  # fmt: skip
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)})


def doc_to_image(doc: dict) -> list[Image.Image]:
    return [Image.open(doc["image"]).convert("RGB")]


def _normalise(s: str) -> str:
    return re.sub(r"\s+", " ", re.sub(r"[^\w\s]", " ", s.lower())).strip()


def process_results(doc: dict, results: list[str]) -> dict[str, float]:
    prediction = _normalise(results[0])
    answers = [_normalise(a) for a in doc["answers"]]
    return {
        "contains": float(any(a and a in prediction for a in answers)),
        "exact_match": float(prediction in answers),
    }
