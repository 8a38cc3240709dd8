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

Two versions, chosen explicitly (`version=` / `--data-version`); a model's own is in its
training_log.json (`model_data_version`), which scoring and calibration data follow:

- version 1 (the default): the bundled model's data. Frozen: the bundled model, the calibration
  data, the shipped held-out questions and the quality tables depend on its exact samples (their
  digests are pinned in tests/toyvqa/test_data.py).
- version 2 (issue 17): several wordings per question kind in UK and US spelling (phrasings.py),
  shapes of several sizes moved across cell borders (each stays inside its quadrant), words in
  several font sizes anywhere in the picture, varied shape colours and tinted or graded
  backgrounds (TRAIN_LOOK), a "describe the picture" stream for an alignment stage
  (`make_caption_conversation`), and two test slices never drawn by the other splits:
  "test_heldout_phrasing" (phrasings.HELD_OUT wordings, training look) and "test_heldout_visual"
  (training wordings, HELD_OUT_LOOK: sizes and font sizes between the trained ones, unseen tints).
  Version 2 draws from other random streams ("toyvqa-v2/..."), with ids "toyvqa-v2-<split>-NNNNN".

CLI: python -m splitq_toyvqa.data --output DIR [--split calibration] [--n 128] [--data-version 2]
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
from typing import Any, Callable, Iterator

from PIL import Image, ImageDraw, ImageFont

from . import phrasings

DEFAULT_SEED = 0
IMAGE_SIZE = 112  # 112x112 px -> 8x8 patches of 14 px -> 16 vision tokens after the 2x2 merge
SPLITS = ("train", "validation", "test", "calibration")
# version 2 only: test slices of wordings (phrasings.HELD_OUT) and looks (HELD_OUT_LOOK) never trained on
HELD_OUT_SPLITS = ("test_heldout_phrasing", "test_heldout_visual")
SPLITS_V2 = SPLITS + HELD_OUT_SPLITS
VERSIONS = (1, 2)
SPLIT_SIZES = {"validation": 512, "test": 1000, "calibration": 128,
               "test_heldout_phrasing": 1000, "test_heldout_visual": 1000}  # train: as many as wanted; fmt: skip

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


# --- version 2: varied pictures (issue 17) ------------------------------------------------------
# Version 1 draws every shape centred in its grid cell at one size, every word in one font size
# near a cell's left edge, on a plain grey; a model trained on it failed on shapes moved by 3-4 px
# and on other font sizes. Version 2 varies all of that (a `Look`); HELD_OUT_LOOK's values lie
# between or beside TRAIN_LOOK's and are drawn only by the split "test_heldout_visual".
QUADRANT = IMAGE_SIZE // 2  # 56 px: a shape stays wholly inside its quadrant, so the answer is clear


@dataclass(frozen=True)
class Look:
    """Visual variation of version 2's pictures."""

    name: str
    radii: tuple[tuple[float, float], ...]  # shape radius ranges (px), one drawn uniformly
    font_sizes: tuple[int, ...]
    tints: dict[str, tuple[int, int, int]]  # background tints (added to a grey level)
    shift: float = CELL / 2 + 4  # a shape's centre moves up to this far from its cell's centre
    colour_jitter: int = 28
    greys: tuple[int, int] = (85, 155)


TRAIN_LOOK = Look(
    "train",
    radii=((7.5, 10.0), (11.5, 14.0)),
    font_sizes=(16, 18, 20, 22, 24, 26),
    tints={"neutral": (0, 0, 0), "warm": (16, 5, -16), "cool": (-16, 0, 16)},
)
HELD_OUT_LOOK = Look(
    "held_out",
    radii=((10.0, 11.5),),  # between the training ranges
    font_sizes=(17, 19, 21, 23, 25),  # between the training sizes
    tints={"green": (-12, 16, -12), "magenta": (16, -14, 16)},  # tints never seen in training
)


def _background_v2(rng: random.Random, look: Look) -> tuple[Image.Image, str]:
    """A grey of varying level and tint, flat or a soft vertical gradient."""
    tint_name = rng.choice(sorted(look.tints))
    strength = rng.uniform(0.4, 1.0)
    g = rng.randint(*look.greys)
    base = [g + round(strength * t) + rng.randint(-6, 6) for t in look.tints[tint_name]]
    top = tuple(max(0, min(255, c)) for c in base)
    if rng.random() < 0.5:
        return Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), top), tint_name  # type: ignore[arg-type]
    d = rng.uniform(-20, 20)
    bottom = tuple(max(0, min(255, round(c + d))) for c in base)
    mask = Image.linear_gradient("L").resize((IMAGE_SIZE, IMAGE_SIZE))
    img = Image.composite(Image.new("RGB", mask.size, bottom), Image.new("RGB", mask.size, top), mask)  # type: ignore[arg-type]
    return img, tint_name


def _extent(r: float) -> float:
    return r * 1.1 + OUTLINE_WIDTH  # the farthest any shape of radius r reaches from its centre (the star)


def draw_shapes_scene_v2(rng: random.Random, n: int, look: Look = TRAIN_LOOK) -> tuple[Image.Image, list[dict[str, Any]]]:
    """`n` shapes (random kind, colour, size) at jittered places: each centre moves up to
    `look.shift` px from its grid cell's centre (into the neighbouring cells), the whole shape stays
    inside its quadrant, shapes do not touch and their centres lie in distinct cells (row, col:
    the cell of the centre)."""
    while True:  # redrawn from scratch (rarely) when the shapes do not fit
        img, tint = _background_v2(rng, look)
        d = ImageDraw.Draw(img)
        placed: list[tuple[float, float, float]] = []
        objects = []
        for pos in rng.sample(range(GRID * GRID), n):
            row, col = divmod(pos, GRID)
            shape = rng.choice(SHAPES)
            colour = rng.choice(list(COLOURS))
            r = rng.uniform(*rng.choice(look.radii))
            ext = _extent(r)
            qx, qy = (col // 2) * QUADRANT, (row // 2) * QUADRANT
            for _ in range(20):
                cx = (col + 0.5) * CELL + rng.uniform(-look.shift, look.shift)
                cy = (row + 0.5) * CELL + rng.uniform(-look.shift, look.shift)
                cx = min(max(cx, qx + ext + 1), qx + QUADRANT - ext - 1)
                cy = min(max(cy, qy + ext + 1), qy + QUADRANT - ext - 1)
                cell = (int(cy // CELL), int(cx // CELL))
                free = all(math.hypot(cx - x, cy - y) > ext + e + 1 for x, y, e in placed)
                if free and all(cell != (o["row"], o["col"]) for o in objects):
                    break
            else:
                break
            placed.append((cx, cy, ext))
            _draw_shape(d, shape, cx, cy, r, _jitter(COLOURS[colour], rng, look.colour_jitter), OUTLINE, OUTLINE_WIDTH)
            objects.append({"shape": shape, "colour": colour, "row": cell[0], "col": cell[1],
                            "cx": cx, "cy": cy, "r": r, "background": tint})  # fmt: skip
        if len(objects) == n:
            return img, objects


# where a word's box (w x h px) goes: its top-left corner, drawn from rng
WordPlacement = Callable[[random.Random, float, float], tuple[float, float]]


def _anywhere(rng: random.Random, w: float, h: float) -> tuple[float, float]:
    return rng.uniform(1, IMAGE_SIZE - 1 - w), rng.uniform(1, IMAGE_SIZE - 1 - h)


def draw_word_scene_v2(rng: random.Random, look: Look = TRAIN_LOOK) -> tuple[Image.Image, list[dict[str, Any]]]:
    """One short word in one of `look`'s font sizes, anywhere in the picture (row: the cell row
    of its middle, col: the cell of its left edge)."""
    return _word_scene_v2(rng, look, _anywhere)


def _word_scene_v2(rng: random.Random, look: Look, place: WordPlacement) -> tuple[Image.Image, list[dict[str, Any]]]:
    """Version 2's word picture with the word's box put where `place` says."""
    img, tint = _background_v2(rng, look)
    d = ImageDraw.Draw(img)
    word = rng.choice(WORDS)
    colour = rng.choice(list(COLOURS))
    size = rng.choice(look.font_sizes)
    font = _font(size)
    left, top, right, bottom = d.textbbox((0, 0), word, font=font, stroke_width=WORD_STROKE)
    bx, by = place(rng, right - left, bottom - top)
    x, y = bx - left, by - top
    d.text((x, y), word, font=font, fill=_jitter(COLOURS[colour], rng, 20), stroke_width=WORD_STROKE, stroke_fill=OUTLINE)
    x0, y0, x1, y1 = d.textbbox((x, y), word, font=font, stroke_width=WORD_STROKE)
    row, col = int(min(GRID - 1, (y0 + y1) / 2 // CELL)), int(min(GRID - 1, x0 // CELL))
    return img, [{"word": word, "colour": colour, "row": row, "col": col, "x0": x0, "x1": x1, "y0": y0, "y1": y1,
                  "font_size": size, "background": tint}]  # fmt: skip


def phrased(rng: random.Random, held_out: bool = False) -> Wording:
    """Version 2's wording: one of the kind's training (or held-out) templates, drawn from `rng`."""

    def wording(kind: str, **fields: Any) -> str:
        return rng.choice(phrasings.templates(kind, held_out)).format(**fields)

    return wording


def describe(scene: list[dict[str, Any]]) -> str:
    """The caption of a picture (the alignment stage's answer): each shape's colour, shape and
    quadrant in reading order, or the word and its colour.

    "A red circle in the top left and an orange star in the bottom right." / "The word cat in blue."
    Shapes are listed by quadrant (top left, top right, bottom left, bottom right), then row and column.
    """
    if scene and "word" in scene[0]:
        return f"The word {scene[0]['word']} in {scene[0]['colour']}."
    def quadrant(o: dict[str, Any]) -> str:
        return position_name(o["row"], o["col"])

    parts = [f"{'an' if o['colour'][0] in 'aeiou' else 'a'} {o['colour']} {o['shape']} in the {quadrant(o)}"
             for o in sorted(scene, key=lambda o: (QUADRANTS.index(quadrant(o)), o["row"], o["col"]))]  # fmt: skip
    text = parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]
    return text[0].upper() + text[1:] + "."


WORD_KINDS = ("read_word", "word_colour")
SHAPE_KINDS = tuple(k for k in IMAGE_KINDS if k not in WORD_KINDS)


Wording = Callable[..., str]  # wording(kind, **fields) -> the question


def v1_wording(kind: str, **fields: Any) -> str:
    """Version 1's one wording per kind (draws nothing from the random stream)."""
    return phrasings.V1[kind].format(**fields)


def ask_about_scene(
    kind: str, scene: list[dict[str, Any]], rng: random.Random, wording: Wording = v1_wording
) -> tuple[str, str] | None:
    """A question of `kind` about a drawn scene and its answer, or None if the scene has no
    question of that kind with exactly one answer. `wording` turns the kind and its fields into
    the question (version 1's by default; version 2 draws one of several, `phrased`)."""
    if kind == "read_word":
        return (wording(kind), scene[0]["word"]) if "word" in scene[0] else None
    if kind == "word_colour":
        return (wording(kind), scene[0]["colour"]) if "word" in scene[0] else None
    if not scene or "shape" not in scene[0]:
        return None
    shapes = [o["shape"] for o in scene]
    colours = [o["colour"] for o in scene]
    if kind == "colour_of_shape":
        unique = [o for o in scene if shapes.count(o["shape"]) == 1]
        if unique:
            o = rng.choice(unique)
            return wording(kind, shape=o["shape"]), o["colour"]
    elif kind == "shape_of_colour":
        unique = [o for o in scene if colours.count(o["colour"]) == 1]
        if unique:
            o = rng.choice(unique)
            return wording(kind, colour=o["colour"]), o["shape"]
    elif kind == "count_all":
        return wording(kind), str(len(scene))
    elif kind == "count_colour":
        # ask about a colour in the picture 3 times out of 4, so most answers are not 0
        c = rng.choice(colours) if rng.random() < 0.75 else rng.choice(list(COLOURS))
        return wording(kind, colour=c), str(colours.count(c))
    elif kind == "count_shape":
        sh = rng.choice(shapes) if rng.random() < 0.75 else rng.choice(SHAPES)
        return wording(kind, shapes=plural(sh)), str(shapes.count(sh))
    elif kind == "position":
        pairs = [(o["colour"], o["shape"]) for o in scene]
        unique = [o for o in scene if pairs.count((o["colour"], o["shape"])) == 1]
        if unique:
            o = rng.choice(unique)
            return wording(kind, colour=o["colour"], shape=o["shape"]), position_name(o["row"], o["col"])
    else:
        raise ValueError(kind)
    return None


def draw_scene_for(
    kind: str, rng: random.Random, wording: Wording = v1_wording, look: Look | None = None
) -> tuple[Image.Image, list[dict[str, Any]], tuple[str, str]]:
    """A picture with a question of `kind` about it (scenes are redrawn until one fits).
    `look`: version 2's visual variation (None: version 1's pictures)."""
    while True:
        if kind in WORD_KINDS:
            img, scene = draw_word_scene(rng) if look is None else draw_word_scene_v2(rng, look)
        else:
            n = rng.randint(1, MAX_SHAPES)
            img, scene = draw_shapes_scene(rng, n) if look is None else draw_shapes_scene_v2(rng, n, look)
        qa = ask_about_scene(kind, scene, rng, wording)
        if qa is not None:
            return img, scene, qa


def _text_question(kind: str, rng: random.Random, wording: Wording = v1_wording) -> tuple[str, str]:
    if kind == "add":
        a, b = rng.randint(0, 9), rng.randint(0, 9)
        return wording(kind, a=a, b=b), str(a + b)
    if kind == "subtract":
        a = rng.randint(0, 9)
        b = rng.randint(0, a)
        return wording(kind, a=a, b=b), str(a - b)
    if kind == "next_number":
        i = rng.randint(0, 9)
        return wording(kind, word=NUMBER_WORDS[i]), NUMBER_WORDS[i + 1]
    if kind == "opposite":
        w = rng.choice(sorted(OPPOSITES))
        return wording(kind, word=w), OPPOSITES[w]
    raise ValueError(kind)


def check_split(split: str, version: int) -> None:
    """A clear error for an unknown version, or a split that the version does not have."""
    if version not in VERSIONS:
        raise ValueError(f"ToyVQA data version must be one of {VERSIONS}, not {version!r}")
    splits = SPLITS if version == 1 else SPLITS_V2
    if split not in splits:
        extra = " (the held-out slices are version 2's: pass version=2)" if split in HELD_OUT_SPLITS else ""
        raise ValueError(f"split must be one of {splits} for ToyVQA version {version}, not {split!r}{extra}")


def make_sample(split: str, index: int, seed: int = DEFAULT_SEED, kind: str | None = None, version: int = 1) -> Sample:
    """Sample `index` of `split`, drawn from its own random stream (deterministic).

    version 1: the bundled model's data (frozen); version 2: varied wordings and pictures (the
    module docstring), with the held-out slices HELD_OUT_SPLITS."""
    check_split(split, version)
    if version == 2:
        return _make_sample_v2(split, index, seed, kind)
    rng = random.Random(f"toyvqa/{seed}/{split}/{index}")  # str seeds hash with SHA-512: stable everywhere
    if kind is None:
        kind = rng.choices(list(KINDS), weights=list(KINDS.values()))[0]
    sid = f"toyvqa-{split}-{index:05d}"
    if kind in IMAGE_KINDS:
        image, scene, (question, answer) = draw_scene_for(kind, rng)
        return Sample(sid, split, kind, question, answer, image, scene)
    question, answer = _text_question(kind, rng)
    return Sample(sid, split, kind, question, answer)


def _make_sample_v2(split: str, index: int, seed: int, kind: str | None) -> Sample:
    rng = random.Random(f"toyvqa-v2/{seed}/{split}/{index}")
    if kind is None:
        kind = rng.choices(list(KINDS), weights=list(KINDS.values()))[0]
    wording = phrased(rng, held_out=split == "test_heldout_phrasing")
    look = HELD_OUT_LOOK if split == "test_heldout_visual" else TRAIN_LOOK
    sid = f"toyvqa-v2-{split}-{index:05d}"
    if kind in IMAGE_KINDS:
        image, scene, (question, answer) = draw_scene_for(kind, rng, wording, look)
        return Sample(sid, split, kind, question, answer, image, scene)
    question, answer = _text_question(kind, rng, wording)
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


def make_conversation(
    split: str,
    index: int,
    seed: int = DEFAULT_SEED,
    max_turns: int = 4,
    text_turn_p: float = 0.15,
    version: int = 1,
    kind_weights: dict[str, float] | None = None,
    augment_p: float = 0.0,
) -> Conversation:
    """Conversation `index` of `split` (deterministic): 1..max_turns turns, all different.
    Version 2 draws its training wordings and look (never the held-out ones).

    Version 2 only, for the training stream: `kind_weights` replaces KINDS' weights for the
    first turn's kind (and the later turns' kinds, by the same weights within the picture's group), and
    `augment_p` rewords each question with that probability (`augment_question`, from a stream of
    its own, so the conversation's pictures and answers do not depend on it). The defaults draw the
    unchanged stream."""
    check_split(split, version)
    if split in HELD_OUT_SPLITS:
        raise ValueError(f"{split!r} is a test slice: training conversations come from the other splits")
    if version == 1:
        if kind_weights is not None or augment_p:
            raise ValueError("kind_weights and augment_p are version 2 options")
        rng = random.Random(f"toyvqa-conv/{seed}/{split}/{index}")
        wording, look = v1_wording, None
    else:
        rng = random.Random(f"toyvqa-v2-conv/{seed}/{split}/{index}")
        wording, look = phrased(rng), TRAIN_LOOK
    weights = KINDS if kind_weights is None else {k: kind_weights.get(k, 0.0) for k in KINDS}
    kind = rng.choices(list(weights), weights=list(weights.values()))[0]
    n_turns = rng.randint(1, max_turns)
    turns: list[tuple[str, str, str]] = []
    image, scene = None, []
    if kind in IMAGE_KINDS:
        image, scene, (q, a) = draw_scene_for(kind, rng, wording, look)
        same = WORD_KINDS if kind in WORD_KINDS else SHAPE_KINDS
    else:
        q, a = _text_question(kind, rng, wording)
        same = tuple(TEXT_KINDS)
    turns.append((kind, q, a))
    for _ in range(8 * max_turns):  # bounded: a scene may not have n_turns different questions
        if len(turns) == n_turns:
            break
        if image is not None and rng.random() >= text_turn_p:
            k = rng.choice(same) if kind_weights is None else rng.choices(same, weights=[weights[x] for x in same])[0]
            qa = ask_about_scene(k, scene, rng, wording)
        else:
            k = rng.choices(list(TEXT_KINDS), weights=list(TEXT_KINDS.values()))[0]
            qa = _text_question(k, rng, wording)
        if qa is not None and all(qa[0] != t[1] for t in turns):
            turns.append((k, *qa))
    if augment_p:
        arng = random.Random(f"toyvqa-v2-augment/{seed}/{split}/{index}")
        turns = [(k, augment_question(q, arng) if arng.random() < augment_p else q, a) for k, q, a in turns]
    return Conversation(f"toyvqa-conv-{split}-{index:06d}", image, turns, scene)


# --- question augmentation (version 2's training stream only) -----------------------------------
# A model trained on a few wordings per kind keys on their exact words: a held-out wording with
# one unseen word ("Tell me ...", "How much is ...") then gets a wrong kind of answer. Rewording the
# training questions at random (an extra neutral word, a dropped function word, other end
# punctuation, a lower-case start) teaches it to key on the words that carry the question: the
# kind words (colour, shape, how many, where, word, plus, ...) and the values. The extra words are
# neutral words that no question kind needs and that no held-out wording uses
# (phrasings.held_out_only_words() is disjoint from FILLER_WORDS, tested), and the rewordings
# never make a held-out wording (tested): the held-out slice still measures unseen wordings.
FILLER_WORDS = ("the", "a", "in", "this", "here", "now", "please", "so", "just", "then", "at", "on", "you", "see", "picture", "image")  # fmt: skip
DROPPABLE_WORDS = frozenset({"the", "a", "is", "are", "there", "in", "of", "what", "which", "can", "you", "do", "on"})


def augment_question(question: str, rng: random.Random) -> str:
    """`question` reworded by one or two random edits (module comment above), never a held-out wording."""
    for _ in range(10):
        words = question.split()
        for _ in range(rng.randint(1, 2)):
            op = rng.randrange(5)
            if op <= 1:  # an extra neutral word anywhere but after the last word
                words.insert(rng.randint(0, len(words) - 1), rng.choice(FILLER_WORDS))
            elif op == 2:  # drop one function word (not the last: it carries the end punctuation)
                idx = [i for i, w in enumerate(words[:-1]) if w.lower() in DROPPABLE_WORDS]
                if idx and len(words) > 2:
                    del words[rng.choice(idx)]
            elif op == 3:  # other end punctuation, or none
                last = words[-1].rstrip("?.!")
                words[-1] = last + rng.choice(("", "?", ".", "!"))
            else:  # lower-case start
                words[0] = words[0][:1].lower() + words[0][1:]
        out = " ".join(words)
        if out and not phrasings.is_held_out_question(out):
            return out[0].upper() + out[1:] if rng.random() < 0.5 else out
    return question


def draw_word_scene_placed(rng: random.Random, jitter: float, look: Look = TRAIN_LOOK) -> tuple[Image.Image, list[dict[str, Any]]]:
    """A word like `draw_word_scene_v2`'s (a font size of `look`), but placed near a cell's left edge
    and centred on a cell row, moved by up to `jitter` px to the right and +-jitter/2 px up or down
    (jitter 0: version 1's placement; about CELL: as free as version 2's). The vision
    pretraining's curriculum (train.py) draws these, jitter growing from 0: a tower trained from
    scratch learns to read words at one place in a few hundred steps, at any place not in
    thousands."""

    def near_a_cell_edge(rng: random.Random, w: float, h: float) -> tuple[float, float]:
        row, col = rng.randrange(GRID), rng.randrange(max(1, int(GRID - (w + 4) // CELL)))
        bx = col * CELL + 2 + rng.uniform(0, jitter)
        by = row * CELL + (CELL - h) / 2 + rng.uniform(-jitter / 2, jitter / 2)
        return min(max(bx, 1), IMAGE_SIZE - 1 - w), min(max(by, 1), IMAGE_SIZE - 1 - h)

    return _word_scene_v2(rng, look, near_a_cell_edge)


def make_picture(
    index: int, seed: int = DEFAULT_SEED, word_p: float | None = None, version: int = 1, word_jitter: float | None = None
) -> tuple[Image.Image, list[dict[str, Any]]]:
    """Picture `index` of the vision-pretraining stream (deterministic): a word scene with
    probability `word_p` (by default the word kinds' share of the image questions), else 1-MAX_SHAPES shapes.
    Version 2: the training look (TRAIN_LOOK); `word_jitter` (version 2 only): words placed by
    `draw_word_scene_placed` with that jitter instead of anywhere (None)."""
    check_split("train", version)
    rng = random.Random(f"toyvqa-picture/{seed}/{index}" if version == 1 else f"toyvqa-v2-picture/{seed}/{index}")
    if word_p is None:
        word_p = sum(IMAGE_KINDS[k] for k in WORD_KINDS) / sum(IMAGE_KINDS.values())
    if word_jitter is not None and version != 2:
        raise ValueError("word_jitter is a version 2 option")
    if version == 2:
        if rng.random() < word_p:
            if word_jitter is not None:
                return draw_word_scene_placed(rng, word_jitter, TRAIN_LOOK)
            return draw_word_scene_v2(rng, TRAIN_LOOK)
        return draw_shapes_scene_v2(rng, rng.randint(1, MAX_SHAPES), TRAIN_LOOK)
    if rng.random() < word_p:
        return draw_word_scene(rng)
    return draw_shapes_scene(rng, rng.randint(1, MAX_SHAPES))


DESCRIBE_KIND = "describe"


def make_caption_conversation(index: int, seed: int = DEFAULT_SEED, word_p: float = 0.25) -> Conversation:
    """Conversation `index` of version 2's alignment stream (deterministic): a training-look
    picture, "describe the picture" in one of the training wordings, and its caption (`describe`).
    Shape pictures are 3 in 4 (their captions carry more: colour, shape and quadrant of each)."""
    rng = random.Random(f"toyvqa-v2-caption/{seed}/{index}")
    if rng.random() < word_p:
        image, scene = draw_word_scene_v2(rng, TRAIN_LOOK)
    else:
        image, scene = draw_shapes_scene_v2(rng, rng.randint(1, MAX_SHAPES), TRAIN_LOOK)
    prompt = rng.choice(phrasings.DESCRIBE)
    return Conversation(f"toyvqa-v2-caption-{index:06d}", image, [(DESCRIBE_KIND, prompt, describe(scene))], scene)


def iter_split(split: str, n: int | None = None, seed: int = DEFAULT_SEED, start: int = 0, version: int = 1) -> Iterator[Sample]:
    """Samples start..start+n-1 of a split (n defaults to the split's fixed size)."""
    check_split(split, version)
    if n is None:
        if split not in SPLIT_SIZES:
            raise ValueError("the train split has no fixed size: pass n")
        n = SPLIT_SIZES[split]
    for i in range(start, start + n):
        yield make_sample(split, i, seed, version=version)


def load_split(split: str, n: int | None = None, seed: int = DEFAULT_SEED, version: int = 1) -> list[Sample]:
    return list(iter_split(split, n, seed, version=version))


def model_data_version(model_dir: str | Path) -> int:
    """The ToyVQA version a model was trained on, so it is calibrated and scored on that version's
    samples: `args.data_version` of its training_log.json (train.py writes it; SplitQ checkpoints
    copy the file). 1 where the log has no such field (version 1 runs predate it) or no log."""
    log = Path(model_dir) / "training_log.json"
    if not log.is_file():
        return 1
    try:
        version = json.loads(log.read_text()).get("args", {}).get("data_version", 1)
    except (json.JSONDecodeError, AttributeError) as e:
        raise ValueError(f"{log}: not a training log ({e})") from e
    if version not in VERSIONS:
        raise ValueError(f"{log}: args.data_version is {version!r}, not one of {VERSIONS}")
    return version


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


def tokenizer_corpus(version: int = 1) -> list[str]:
    """Text the ToyVQA tokenizer is trained on: every question template, answer and chat word
    (version 2: also every v2 wording, held-out ones included, and every caption word)."""
    if version not in VERSIONS:
        raise ValueError(f"ToyVQA data version must be one of {VERSIONS}, not {version!r}")
    lines = _tokenizer_corpus_v1()
    if version == 2:
        lines += _tokenizer_lines_v2() * 4
    return lines


def _tokenizer_lines_v2() -> list[str]:
    fields = [dict(shape=s, shapes=plural(s), colour=c, a=i % 10, b=(3 * i) % 10, word=NUMBER_WORDS[i % 10])
              for i, (s, c) in enumerate((s, c) for s in SHAPES for c in COLOURS)]  # fmt: skip
    lines = [t.format(**f) for t in phrasings.all_templates() for f in fields[:6]]
    for o in fields:
        lines.append(describe([{"shape": o["shape"], "colour": o["colour"], "row": 0, "col": 0},
                               {"shape": o["shape"], "colour": o["colour"], "row": 3, "col": 3}]))  # fmt: skip
    lines += [describe([{"word": w, "colour": c}]) for w in WORDS for c in COLOURS]
    lines += [describe([{"shape": s, "colour": c, "row": 2 * (q // 2), "col": 2 * (q % 2)}]) for s in SHAPES for c in COLOURS for q in range(4)]
    return lines


def _tokenizer_corpus_v1() -> list[str]:
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
    version: int = 1,
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
        s = make_sample(split, i, seed, version=version)
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
    output_dir: str | Path, split: str = "test", n: int | None = None, seed: int = DEFAULT_SEED, version: int = 1
) -> Path:
    """Write samples 0..n-1 of `split` as OUTPUT_DIR/questions.jsonl plus OUTPUT_DIR/images/<id>.png
    (module docstring); text-only questions are kept, without an "image" key. Returns the JSONL path."""
    out = Path(output_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    lines = []
    for s in iter_split(split, n, seed, version=version):
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
    ap.add_argument("--split", default="calibration", choices=SPLITS_V2)
    ap.add_argument("--data-version", type=int, default=1, choices=VERSIONS,
                    help="1: the bundled model's data (default); 2: varied wordings and pictures, held-out slices")
    ap.add_argument("--n", type=int, default=None, help="number of samples (default: the split's size)")
    ap.add_argument("--seed", type=int, default=DEFAULT_SEED)
    ap.add_argument("--with-text-only", action="store_true", help="keep text-only questions (no image key)")
    ap.add_argument("--questions", action="store_true",
                    help="write questions.jsonl for examples/evaluate_server.py instead (text-only ones kept)")
    args = ap.parse_args(argv)
    if args.questions:
        path = export_questions(args.output, args.split, args.n, args.seed, args.data_version)
    else:
        path = export_sharegpt4v(args.output, args.split, args.n, args.seed, args.with_text_only, version=args.data_version)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
