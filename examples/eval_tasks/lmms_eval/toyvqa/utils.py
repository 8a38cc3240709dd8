"""ToyVQA held-out questions for lmms-eval, from the local file (no download).

The task reads examples/toyvqa_heldout/questions.jsonl (the shape examples/evaluate_server.py
reads), relative to the directory lmms-eval runs in: run it from the repository root. Image paths
are taken relative to that folder (absolute paths work from anywhere). Only the questions with an
image, as in the lm-eval task, so the two report the same set. Scoring is
examples/evaluate_server.py's rule: lower case, punctuation to spaces, white space collapsed;
`contains` = the answer appears in the prediction, `exact_match` = equal.
"""

from __future__ import annotations

import re
from pathlib import Path

from PIL import Image

QUESTIONS_DIR = Path(__file__).resolve().parents[3] / "toyvqa_heldout"


def image_questions(dataset):
    return dataset.filter(lambda doc: isinstance(doc.get("image"), str))


def doc_to_visual(doc: dict) -> list[Image.Image]:
    return [Image.open(QUESTIONS_DIR / doc["image"]).convert("RGB")]


def doc_to_text(doc: dict, lmms_eval_specific_kwargs: dict | None = None) -> str:
    return doc["question"]


def _normalise(s: str) -> str:
    return re.sub(r"\s+", " ", re.sub(r"[^\w\s]", " ", s.lower())).strip()


def process_results(doc: dict, results: list[str]) -> dict[str, float]:
    prediction = _normalise(results[0])
    answers = [_normalise(a) for a in (doc["answer"] if isinstance(doc["answer"], list) else [doc["answer"]])]
    return {
        "contains": float(any(a and a in prediction for a in answers)),
        "exact_match": float(prediction in answers),
    }
