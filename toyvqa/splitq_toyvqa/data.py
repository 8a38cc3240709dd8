"""ToyVQA: a synthetic visual question-answering task, deterministic from a seed.

Every sample is one question with a short answer (one or two words). Most have a 112x112 picture
drawn with PIL (shapes of several colours on a 4x4 grid, or a short printed word) and ask about
colours, shapes, counts, positions or the word; the rest are text-only (small arithmetic, number
words, opposites), so the text tokens matter as well as the image tokens.

`make_sample(split, index, seed)` draws sample `index` of a split from its own random stream
(seeded by the string "toyvqa/<seed>/<split>/<index>"), so any sample can be drawn alone, in any order, on any
machine with the same Pillow/FreeType (the printed words go through FreeType). The splits are
disjoint streams; the train split is as long as training wants.

`export_sharegpt4v(...)` writes a split (by default the 128-sample calibration split) in the
ShareGPT4V/LLaVA conversation layout that the calibration tool reads:

    [{"id": "toyvqa-calibration-00000", "image": "toyvqa-calibration-00000.png",
      "conversations": [{"from": "human", "value": "<image>\\nWhat colour is the circle?"},
                        {"from": "gpt", "value": "red"}]}, ...]

`export_questions(...)` writes a split as image questions with answers, one JSON object a line,
in the shape examples/evaluate_server.py and the lm-eval / lmms-eval tasks of
examples/eval_tasks read (examples/toyvqa_heldout is the test split's first 200, exported so):

    {"id": "toyvqa-test-00000", "image": "images/toyvqa-test-00000.png", "question": "...",
     "answer": "red", "kind": "colour_of_shape"}      # no "image" for a text-only question

CLI: python -m splitq_toyvqa.data --output DIR [--split calibration] [--n 128]
     python -m splitq_toyvqa.data --questions --output DIR --split test --n 200
"""

from __future__ import annotations

import argparse
import json
import math
import random
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Iterator

from PIL import Image, ImageDraw, ImageFont

DEFAULT_SEED = 0
IMAGE_SIZE = 112  # 112x112 px -> 8x8 patches of 14 px -> 16 vision tokens after the 2x2 merge
SPLITS = ("train", "validation", "test", "calibration")
SPLIT_SIZES = {"validation": 512, "test": 1000, "calibration": 128}  # train: as many as wanted

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (215, 35, 35),
    "green": (35, 155, 55),
    "blue": (35, 75, 215),
    "yellow": (230, 195, 20),
    "purple": (135, 55, 185),
    "orange": (240, 130, 20),
}
SHAPES = ("circle", "square", "triangle", "star")
WORDS = ("cat", "dog", "sun", "car", "box", "hat", "cup", "pen", "bus", "map", "key", "egg")
NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten")
OPPOSITES = {
    "left": "right", "top": "bottom", "up": "down", "big": "small", "hot": "cold",
    "day": "night", "black": "white", "open": "closed", "fast": "slow", "yes": "no",
}  # fmt: skip
OPPOSITES.update({v: k for k, v in list(OPPOSITES.items())})
# The picture is a 4x4 grid of 28 px cells: exactly the 16 vision tokens (each token merges 2x2
# patches of 14 px), so each shape lies in one token. Shapes placed anywhere straddle tokens and
# patches, and a vision tower trained from scratch in minutes then learns shapes much more slowly.
GRID = 4
OUTLINE, OUTLINE_WIDTH, WORD_STROKE = (20, 20, 20), 2, 1
CELL = IMAGE_SIZE // GRID  # 28 px
QUADRANTS = ("top left", "top right", "bottom left", "bottom right")
MAX_SHAPES = 3  # shapes per picture: 1..MAX_SHAPES
SYSTEM_PROMPT = "You are a helpful assistant."

# Question kinds and how often each is drawn (weights). Image kinds first, text-only after.
IMAGE_KINDS = {
    "colour_of_shape": 3,  # What colour is the circle?          -> red
    "shape_of_colour": 3,  # Which shape is blue?                -> star
    "count_all": 2,  # How many shapes are there?                -> 3
    "count_colour": 2,  # How many red shapes are there?         -> 2
    "count_shape": 2,  # How many circles are there?             -> 0
    "position": 3,  # Where is the red circle?                   -> top left
    "read_word": 3,  # What word is written?                     -> cat
    "word_colour": 2,  # What colour is the word?                -> blue
}
TEXT_KINDS = {
    "add": 2,  # What is 3 plus 4?                               -> 7
    "subtract": 2,  # What is 9 minus 4?                         -> 5
    "next_number": 1,  # What number comes after three?          -> four
    "opposite": 1,  # What is the opposite of hot?               -> cold
}
KINDS = {**IMAGE_KINDS, **TEXT_KINDS}


@dataclass
class Sample:
    """One question. `image` is None for text-only questions."""

    id: str
    split: str
    kind: str
    question: str
    answer: str
    image: Image.Image | None = None
    scene: list[dict[str, Any]] = field(default_factory=list)  # what was drawn (for debugging)

    @property
    def has_image(self) -> bool:
        return self.image is not None


def position_name(row: int, col: int) -> str:
    """The quadrant of a 4x4 grid cell: 'top left', 'top right', 'bottom left' or 'bottom right'."""
    return QUADRANTS[2 * (row >= GRID // 2) + (col >= GRID // 2)]


def plural(shape: str) -> str:
    return shape + "s"


@lru_cache(maxsize=None)
def _font(size: int) -> ImageFont.FreeTypeFont:
    return ImageFont.load_default(size=size)  # Pillow's bundled FreeType font: no file needed


def _jitter(rgb: tuple[int, int, int], rng: random.Random, amount: int = 18) -> tuple[int, int, int]:
    return tuple(max(0, min(255, c + rng.randint(-amount, amount))) for c in rgb)  # type: ignore[return-value]


def _background(rng: random.Random) -> Image.Image:
    # Mid grey, near the image processor's mean (CLIP's, about (123, 117, 104)), so background
    # patches normalise to about 0. On white (about +1.9 in every channel after normalisation)
    # every patch of a fresh vision tower looks alike and the colour of a shape stayed at chance
    # for hundreds of steps; on grey it is learnt within about 100 (measured, bs 32, lr 1e-3).
    g = rng.randint(100, 140)
    return Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), (g + rng.randint(-6, 6), g + rng.randint(-6, 6), g + rng.randint(-6, 6)))


def _draw_shape(d: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float, fill, outline=None, width: int = 0) -> None:
    if shape == "circle":
        d.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill, outline=outline, width=width)
    elif shape == "square":
        s = r * 0.9
        d.rectangle((cx - s, cy - s, cx + s, cy + s), fill=fill, outline=outline, width=width)
    elif shape == "triangle":
        d.polygon([(cx, cy - r), (cx - r, cy + r * 0.85), (cx + r, cy + r * 0.85)], fill=fill, outline=outline, width=width)
    elif shape == "star":
        pts = []
        for i in range(10):
            rad = r * 1.1 if i % 2 == 0 else r * 0.45
            a = -math.pi / 2 + i * math.pi / 5
            pts.append((cx + rad * math.cos(a), cy + rad * math.sin(a)))
        d.polygon(pts, fill=fill, outline=outline, width=width)
    else:
        raise ValueError(shape)


def draw_shapes_scene(rng: random.Random, n: int) -> tuple[Image.Image, list[dict[str, Any]]]:
    """`n` shapes (random kind, colour, size) in distinct cells of the 4x4 grid."""
    img = _background(rng)
    d = ImageDraw.Draw(img)
    cell = CELL
    objects = []
    for pos in rng.sample(range(GRID * GRID), n):
        row, col = divmod(pos, GRID)
        shape = rng.choice(SHAPES)
        colour = rng.choice(list(COLOURS))
        r = rng.uniform(11.0, 12.5)
        slack = 1.0  # centred in its cell: each patch sees a consistent part of the shape
        cx = (col + 0.5) * cell + rng.uniform(-slack, slack)
        cy = (row + 0.5) * cell + rng.uniform(-slack, slack)
        _draw_shape(d, shape, cx, cy, r, _jitter(COLOURS[colour], rng), OUTLINE, OUTLINE_WIDTH)
        objects.append({"shape": shape, "colour": colour, "row": row, "col": col})
    return img, objects


def draw_word_scene(rng: random.Random) -> tuple[Image.Image, list[dict[str, Any]]]:
    """One short word printed in a colour, starting near the left edge of a grid cell."""
    img = _background(rng)
    d = ImageDraw.Draw(img)
    word = rng.choice(WORDS)
    colour = rng.choice(list(COLOURS))
    font = _font(22)
    left, top, right, bottom = d.textbbox((0, 0), word, font=font)
    row = rng.randrange(GRID)
    col = rng.randrange(GRID - (right - left + 4) // CELL)  # the word stays inside the picture
    x = col * CELL + 2 - left + rng.uniform(0, 1)
    y = row * CELL + (CELL - (bottom - top)) / 2 - top + rng.uniform(-0.5, 0.5)
    d.text((x, y), word, font=font, fill=_jitter(COLOURS[colour], rng, 12), stroke_width=WORD_STROKE, stroke_fill=OUTLINE)
    x0, _, x1, _ = d.textbbox((x, y), word, font=font, stroke_width=WORD_STROKE)
    return img, [{"word": word, "colour": colour, "row": row, "col": col, "x0": x0, "x1": x1}]


WORD_KINDS = ("read_word", "word_colour")
SHAPE_KINDS = tuple(k for k in IMAGE_KINDS if k not in WORD_KINDS)


def ask_about_scene(kind: str, scene: list[dict[str, Any]], rng: random.Random) -> tuple[str, str] | None:
    """A question of `kind` about a drawn scene and its answer, or None if the scene has no
    question of that kind with exactly one answer."""
    if kind == "read_word":
        return ("What word is written?", scene[0]["word"]) if "word" in scene[0] else None
    if kind == "word_colour":
        return ("What colour is the word?", scene[0]["colour"]) if "word" in scene[0] else None
    if not scene or "shape" not in scene[0]:
        return None
    shapes = [o["shape"] for o in scene]
    colours = [o["colour"] for o in scene]
    if kind == "colour_of_shape":
        unique = [o for o in scene if shapes.count(o["shape"]) == 1]
        if unique:
            o = rng.choice(unique)
            return f"What colour is the {o['shape']}?", o["colour"]
    elif kind == "shape_of_colour":
        unique = [o for o in scene if colours.count(o["colour"]) == 1]
        if unique:
            o = rng.choice(unique)
            return f"Which shape is {o['colour']}?", o["shape"]
    elif kind == "count_all":
        return "How many shapes are there?", str(len(scene))
    elif kind == "count_colour":
        # ask about a colour in the picture 3 times out of 4, so most answers are not 0
        c = rng.choice(colours) if rng.random() < 0.75 else rng.choice(list(COLOURS))
        return f"How many {c} shapes are there?", str(colours.count(c))
    elif kind == "count_shape":
        sh = rng.choice(shapes) if rng.random() < 0.75 else rng.choice(SHAPES)
        return f"How many {plural(sh)} are there?", str(shapes.count(sh))
    elif kind == "position":
        pairs = [(o["colour"], o["shape"]) for o in scene]
        unique = [o for o in scene if pairs.count((o["colour"], o["shape"])) == 1]
        if unique:
            o = rng.choice(unique)
            return f"Where is the {o['colour']} {o['shape']}?", position_name(o["row"], o["col"])
    else:
        raise ValueError(kind)
    return None


def draw_scene_for(kind: str, rng: random.Random) -> tuple[Image.Image, list[dict[str, Any]], tuple[str, str]]:
    """A picture with a question of `kind` about it (scenes are redrawn until one fits)."""
    while True:
        if kind in WORD_KINDS:
            img, scene = draw_word_scene(rng)
        else:
            img, scene = draw_shapes_scene(rng, rng.randint(1, MAX_SHAPES))
        qa = ask_about_scene(kind, scene, rng)
        if qa is not None:
            return img, scene, qa


def _text_question(kind: str, rng: random.Random) -> tuple[str, str]:
    if kind == "add":
        a, b = rng.randint(0, 9), rng.randint(0, 9)
        return f"What is {a} plus {b}?", str(a + b)
    if kind == "subtract":
        a = rng.randint(0, 9)
        b = rng.randint(0, a)
        return f"What is {a} minus {b}?", str(a - b)
    if kind == "next_number":
        i = rng.randint(0, 9)
        return f"What number comes after {NUMBER_WORDS[i]}?", NUMBER_WORDS[i + 1]
    if kind == "opposite":
        w = rng.choice(sorted(OPPOSITES))
        return f"What is the opposite of {w}?", OPPOSITES[w]
    raise ValueError(kind)


def make_sample(split: str, index: int, seed: int = DEFAULT_SEED, kind: str | None = None) -> Sample:
    """Sample `index` of `split`, drawn from its own random stream (deterministic)."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, not {split!r}")
    rng = random.Random(f"toyvqa/{seed}/{split}/{index}")  # str seeds hash with SHA-512: stable everywhere
    if kind is None:
        kind = rng.choices(list(KINDS), weights=list(KINDS.values()))[0]
    sid = f"toyvqa-{split}-{index:05d}"
    if kind in IMAGE_KINDS:
        image, scene, (question, answer) = draw_scene_for(kind, rng)
        return Sample(sid, split, kind, question, answer, image, scene)
    question, answer = _text_question(kind, rng)
    return Sample(sid, split, kind, question, answer)


@dataclass
class Conversation:
    """A training conversation: one picture (or none) and several question/answer turns.

    The first turn has exactly the single-question layout of a `Sample` (what is served and
    scored); later turns ask more about the same picture (or text-only questions), so one pass of
    the vision tower and of the system prompt supervises several answers, as in LLaVA's
    multi-turn instruction data.
    """

    id: str
    image: Image.Image | None
    turns: list[tuple[str, str, str]]  # (kind, question, answer)
    scene: list[dict[str, Any]] = field(default_factory=list)


def make_conversation(split: str, index: int, seed: int = DEFAULT_SEED, max_turns: int = 4, text_turn_p: float = 0.15) -> Conversation:
    """Conversation `index` of `split` (deterministic): 1..max_turns turns, all different."""
    rng = random.Random(f"toyvqa-conv/{seed}/{split}/{index}")
    kind = rng.choices(list(KINDS), weights=list(KINDS.values()))[0]
    n_turns = rng.randint(1, max_turns)
    turns: list[tuple[str, str, str]] = []
    image, scene = None, []
    if kind in IMAGE_KINDS:
        image, scene, (q, a) = draw_scene_for(kind, rng)
        same = WORD_KINDS if kind in WORD_KINDS else SHAPE_KINDS
    else:
        q, a = _text_question(kind, rng)
        same = tuple(TEXT_KINDS)
    turns.append((kind, q, a))
    for _ in range(8 * max_turns):  # bounded: a scene may not have n_turns different questions
        if len(turns) == n_turns:
            break
        if image is not None and rng.random() >= text_turn_p:
            k = rng.choice(same)
            qa = ask_about_scene(k, scene, rng)
        else:
            k = rng.choices(list(TEXT_KINDS), weights=list(TEXT_KINDS.values()))[0]
            qa = _text_question(k, rng)
        if qa is not None and all(qa[0] != t[1] for t in turns):
            turns.append((k, *qa))
    return Conversation(f"toyvqa-conv-{split}-{index:06d}", image, turns, scene)


def make_picture(index: int, seed: int = DEFAULT_SEED, word_p: float | None = None) -> tuple[Image.Image, list[dict[str, Any]]]:
    """Picture `index` of the vision-pretraining stream (deterministic): a word scene with
    probability `word_p` (by default the word kinds' share of the image questions), else 1-MAX_SHAPES shapes."""
    rng = random.Random(f"toyvqa-picture/{seed}/{index}")
    if word_p is None:
        word_p = sum(IMAGE_KINDS[k] for k in WORD_KINDS) / sum(IMAGE_KINDS.values())
    if rng.random() < word_p:
        return draw_word_scene(rng)
    return draw_shapes_scene(rng, rng.randint(1, MAX_SHAPES))


def iter_split(split: str, n: int | None = None, seed: int = DEFAULT_SEED, start: int = 0) -> Iterator[Sample]:
    """Samples start..start+n-1 of a split (n defaults to the split's fixed size)."""
    if n is None:
        if split not in SPLIT_SIZES:
            raise ValueError("the train split has no fixed size: pass n")
        n = SPLIT_SIZES[split]
    for i in range(start, start + n):
        yield make_sample(split, i, seed)


def load_split(split: str, n: int | None = None, seed: int = DEFAULT_SEED) -> list[Sample]:
    return list(iter_split(split, n, seed))


def chat_messages(question: str, image: Any = None) -> list[dict[str, Any]]:
    """The user turn as the model is trained and served: image part first, then the question.

    `image` may be a PIL image (transformers' processors take {"type": "image"} and the image
    separately, so the PIL object is only a marker here) or an OpenAI-style content part
    ({"type": "image_url", ...}) which is passed through as is.
    """
    content: list[dict[str, Any]] = []
    if image is not None:
        content.append(image if isinstance(image, dict) else {"type": "image"})
    content.append({"type": "text", "text": question})
    return [{"role": "user", "content": content}]


def tokenizer_corpus() -> list[str]:
    """Text the ToyVQA tokenizer is trained on: every question template, answer and chat word."""
    lines = [SYSTEM_PROMPT, "system user assistant"]
    cols, shapes = list(COLOURS), list(SHAPES)
    for s in shapes:
        lines.append(f"What colour is the {s}? How many {plural(s)} are there?")
        for c in cols:
            lines.append(f"Where is the {c} {s}?")
    for c in cols:
        lines.append(f"Which shape is {c}? How many {c} shapes are there?")
    lines += ["How many shapes are there?", "What word is written?", "What colour is the word?"]
    lines += [" ".join(WORDS), " ".join(cols), " ".join(shapes)]
    lines += list(QUADRANTS)
    for a in range(10):
        lines.append(" ".join(f"What is {a} plus {b}? What is {a} minus {b}?" for b in range(10)))
    lines += [" ".join(str(i) for i in range(19))]
    lines += [f"What number comes after {w}? {w}" for w in NUMBER_WORDS]
    lines += [f"What is the opposite of {w}? {o}" for w, o in OPPOSITES.items()]
    # every answer and chat role alone on a line: at the start of the assistant turn (and after
    # "<|im_start|>") words come without a leading space, a different byte-level token
    answers = [*cols, *shapes, *WORDS, *NUMBER_WORDS, *OPPOSITES, *(str(i) for i in range(19))]
    answers += [*QUADRANTS, "system", "user", "assistant"]
    lines += answers
    # repeat, so that BPE merges whole words before it runs out of pairs
    return lines * 4


def export_sharegpt4v(
    output_dir: str | Path,
    split: str = "calibration",
    n: int | None = None,
    seed: int = DEFAULT_SEED,
    with_text_only: bool = False,
    json_name: str | None = None,
    image_dir: str = "images",
) -> Path:
    """Write `n` samples of `split` as ShareGPT4V JSON plus PNGs; return the JSON path.

    Layout: OUTPUT_DIR/<split>.json and OUTPUT_DIR/images/<id>.png; each entry's "image" is the
    path relative to OUTPUT_DIR/images (pass that folder as the image root). By default only
    samples with an image are kept (ShareGPT4V entries all have one; the split is then still `n`
    long, drawn from the same stream, skipping text-only ones). With `with_text_only=True`,
    text-only questions are kept as entries without an "image" key (LLaVA's mixed-data layout).
    """
    out = Path(output_dir)
    img_root = out / image_dir
    img_root.mkdir(parents=True, exist_ok=True)
    if n is None:
        n = SPLIT_SIZES.get(split, 128)
    entries = []
    i = 0
    while len(entries) < n:
        s = make_sample(split, i, seed)
        i += 1
        if s.image is None and not with_text_only:
            continue
        entry: dict[str, Any] = {"id": s.id}
        prompt = s.question
        if s.image is not None:
            name = f"{s.id}.png"
            s.image.save(img_root / name, format="PNG")
            entry["image"] = name
            prompt = "<image>\n" + s.question
        entry["conversations"] = [{"from": "human", "value": prompt}, {"from": "gpt", "value": s.answer}]
        entry["kind"] = s.kind
        entries.append(entry)
    path = out / (json_name or f"{split}.json")
    path.write_text(json.dumps(entries, indent=1) + "\n")
    return path


def export_questions(
    output_dir: str | Path, split: str = "test", n: int | None = None, seed: int = DEFAULT_SEED
) -> Path:
    """Write samples 0..n-1 of `split` as OUTPUT_DIR/questions.jsonl plus OUTPUT_DIR/images/<id>.png
    (module docstring); text-only questions are kept, without an "image" key. Returns the JSONL path."""
    out = Path(output_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    lines = []
    for s in iter_split(split, n, seed):
        record: dict[str, Any] = {"id": s.id}
        if s.image is not None:
            record["image"] = f"images/{s.id}.png"
            s.image.save(out / record["image"], format="PNG")
        record.update(question=s.question, answer=s.answer, kind=s.kind)
        lines.append(json.dumps(record))
    path = out / "questions.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="Export a ToyVQA split in the ShareGPT4V layout, or as questions.")
    ap.add_argument("--output", required=True, help="folder for <split>.json (or questions.jsonl) and images/")
    ap.add_argument("--split", default="calibration", choices=SPLITS)
    ap.add_argument("--n", type=int, default=None, help="number of samples (default: the split's size)")
    ap.add_argument("--seed", type=int, default=DEFAULT_SEED)
    ap.add_argument("--with-text-only", action="store_true", help="keep text-only questions (no image key)")
    ap.add_argument("--questions", action="store_true",
                    help="write questions.jsonl for examples/evaluate_server.py instead (text-only ones kept)")
    args = ap.parse_args(argv)
    if args.questions:
        path = export_questions(args.output, args.split, args.n, args.seed)
    else:
        path = export_sharegpt4v(args.output, args.split, args.n, args.seed, args.with_text_only)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
