"""Accuracy of a served model on image questions with known answers, through the OpenAI API.

    python examples/evaluate_server.py --questions heldout.jsonl --base-url http://localhost:8000/v1 \
        [--model NAME] [--api-key KEY] [--workers 8] [--output answers.jsonl] [--report report.json]

--questions: JSON Lines, one question per line:
    {"image": "images/0001.png", "question": "What colour is the shape?", "answer": "red", "id": "q1"}
`image` is a file path (relative to --image-dir, default the JSONL's folder; sent inline as a
base64 data URL), an http(s) or data URL (passed on as is), a list of those, or absent (a text
question); `id` is optional (default: the line number). `answer` is a string or a list of
accepted strings.

Scoring, by default the same rule as `splitq-eval` (calibration/evaluate.py), so a served model
and the checkpoint run in transformers are scored alike: answer and prediction are normalised
(lower-case, punctuation to spaces, runs of white space to one space) and the prediction is
correct when it contains a normalised answer (--match contains; a substring test, as in
splitq-eval, so "red" also matches "reddish"). --match exact requires equality after
normalisation; --no-normalize compares the raw strings (stripped). Greedy decoding
(temperature 0).

Output: per question (--output, JSONL: id, question, answer, prediction, correct, error, seconds)
and a summary (--report, JSON; also printed): questions, answered, failed requests, correct,
accuracy (correct / questions: a failed request counts as wrong), mean latency, requests per
second. Exit status 0 when every request got an answer, 1 otherwise (the report is written either
way). Needs only `pip install openai`.
"""

from __future__ import annotations

import argparse
import base64
import json
import mimetypes
import os
import re
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any


def normalise(s: str) -> str:
    """Lower-case, punctuation to spaces, white space collapsed (splitq-eval's rule)."""
    return re.sub(r"\s+", " ", re.sub(r"[^\w\s]", " ", s.lower())).strip()


def is_correct(prediction: str, answers: list[str], match: str = "contains", normalize: bool = True) -> bool:
    norm = normalise if normalize else str.strip
    p = norm(prediction)
    for a in answers:
        a = norm(a)
        if (match == "exact" and p == a) or (match == "contains" and a and a in p):
            return True
    return False


def load_questions(path: str | Path, image_dir: str | Path | None = None) -> list[dict[str, Any]]:
    path = Path(path)
    base = Path(image_dir) if image_dir else path.parent
    out = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            r = json.loads(line)
        except json.JSONDecodeError as e:
            raise SystemExit(f"error: {path}:{n}: not JSON: {e}") from None
        if not isinstance(r, dict) or "question" not in r or "answer" not in r:
            raise SystemExit(f'error: {path}:{n}: expected {{"image", "question", "answer"}}, got {line[:200]}')
        images = r.get("image")
        images = [] if images is None else images if isinstance(images, list) else [images]
        resolved = []
        for img in images:
            img = str(img)
            if not img.startswith(("http://", "https://", "data:")):
                p = Path(img) if Path(img).is_absolute() else base / img
                if not p.is_file():
                    raise SystemExit(f"error: {path}:{n}: image not found: {p}")
                img = str(p)
            resolved.append(img)
        answers = r["answer"] if isinstance(r["answer"], list) else [r["answer"]]
        out.append({"id": str(r.get("id", n)), "images": resolved, "question": str(r["question"]),
                    "answers": [str(a) for a in answers]})  # fmt: skip
    if not out:
        raise SystemExit(f"error: {path}: no questions")
    return out


def image_url(image: str) -> str:
    if image.startswith(("http://", "https://", "data:")):
        return image
    mime = mimetypes.guess_type(image)[0] or "image/png"
    return f"data:{mime};base64," + base64.b64encode(Path(image).read_bytes()).decode("ascii")


def ask(client, model: str, q: dict[str, Any], max_tokens: int, prompt_suffix: str) -> dict[str, Any]:
    content = [{"type": "image_url", "image_url": {"url": image_url(i)}} for i in q["images"]]
    content.append({"type": "text", "text": q["question"] + prompt_suffix})
    t0 = time.monotonic()
    try:
        r = client.chat.completions.create(
            model=model,
            messages=[{"role": "user", "content": content}],
            max_tokens=max_tokens,
            temperature=0.0,
        )
        return {"prediction": r.choices[0].message.content or "", "error": None, "seconds": time.monotonic() - t0}
    except Exception as e:  # a failed request is reported, not fatal: the others still count
        return {"prediction": "", "error": f"{type(e).__name__}: {e}", "seconds": time.monotonic() - t0}


def evaluate(
    client,
    model: str,
    questions: list[dict[str, Any]],
    workers: int = 4,
    max_tokens: int = 32,
    prompt_suffix: str = "",
    match: str = "contains",
    normalize: bool = True,
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    t0 = time.monotonic()
    with ThreadPoolExecutor(max(1, workers)) as pool:
        replies = list(pool.map(lambda q: ask(client, model, q, max_tokens, prompt_suffix), questions))
    wall = time.monotonic() - t0
    rows = []
    for q, r in zip(questions, replies):
        correct = r["error"] is None and is_correct(r["prediction"], q["answers"], match, normalize)
        rows.append({"id": q["id"], "question": q["question"], "answer": q["answers"][0] if len(q["answers"]) == 1
                     else q["answers"], "prediction": r["prediction"], "correct": correct, "error": r["error"],
                     "seconds": round(r["seconds"], 3)})  # fmt: skip
    n = len(rows)
    failed = sum(r["error"] is not None for r in rows)
    n_correct = sum(r["correct"] for r in rows)
    report = {
        "model": model,
        "questions": n,
        "answered": n - failed,
        "failed": failed,
        "correct": n_correct,
        "accuracy": n_correct / n if n else 0.0,
        "match": match,
        "normalize": normalize,
        "mean_latency_s": round(sum(r["seconds"] for r in rows) / n, 3) if n else 0.0,
        "wall_s": round(wall, 3),
        "requests_per_s": round(n / wall, 3) if wall > 0 else None,
    }
    return rows, report


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("--questions", required=True, help="JSONL of {image, question, answer}")
    p.add_argument("--image-dir", help="folder relative image paths start from (default: the JSONL's folder)")
    p.add_argument("--base-url", default=os.environ.get("OPENAI_BASE_URL", "http://localhost:8000/v1"))
    p.add_argument(
        "--api-key", default=os.environ.get("VLLM_API_KEY") or os.environ.get("OPENAI_API_KEY") or "EMPTY"
    )
    p.add_argument("--model", default=os.environ.get("SPLITQ_MODEL"), help="served model name (default: the first listed)")
    p.add_argument("--workers", type=int, default=4, help="requests in flight at once (default 4)")
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--prompt-suffix", default="", help='appended to every question, e.g. " Answer with one word."')
    p.add_argument("--match", choices=["contains", "exact"], default="contains")
    p.add_argument("--no-normalize", dest="normalize", action="store_false", help="compare raw (stripped) strings")
    p.add_argument("--limit", type=int, help="only the first N questions")
    p.add_argument("--output", help="write one JSON line per question here")
    p.add_argument("--report", help="write the summary as JSON here")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds per request")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import openai

    questions = load_questions(args.questions, args.image_dir)[: args.limit]
    client = openai.OpenAI(base_url=args.base_url, api_key=args.api_key, timeout=args.timeout, max_retries=1)
    if args.model:
        model = args.model
    else:
        models = client.models.list().data
        if not models:
            raise SystemExit("error: the server lists no model; pass --model")
        model = models[0].id
    rows, report = evaluate(
        client, model, questions, args.workers, args.max_tokens, args.prompt_suffix, args.match, args.normalize
    )
    report["questions_file"] = str(args.questions)
    if args.output:
        with open(args.output, "w") as f:
            for r in rows:
                f.write(json.dumps(r) + "\n")
    if args.report:
        Path(args.report).write_text(json.dumps(report, indent=2) + "\n")
    for r in rows:
        mark = "ERROR" if r["error"] else ("ok" if r["correct"] else "--")
        print(f"[{mark:>5}] {r['id']}: {r['question']!r} -> {r['prediction']!r} (expected {r['answer']!r})"
              + (f" {r['error']}" if r["error"] else ""))  # fmt: skip
    print(json.dumps(report, indent=2))
    return 0 if report["failed"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
