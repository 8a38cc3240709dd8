"""The wordings of ToyVQA version 2's questions, and which of them are held out of training.

Each question kind has several templates (str.format fields: {shape}, {shapes} (plural),
{colour}, {a}, {b}, {word}); every template that spells "colour" also comes in US spelling
("color"), so both are drawn. TRAIN templates are drawn by the train, validation, test and
calibration splits; HELD_OUT templates only by the split "test_heldout_phrasing", so that slice
measures how far the model carries a question to a wording it never saw. Version 1 asks the
first TRAIN template of each kind (the v1 wording) and nothing else.

The alignment stage's prompts ("describe the picture") are in DESCRIBE (train) and
DESCRIBE_HELD_OUT.
"""

from __future__ import annotations

import re
from functools import lru_cache

_TRAIN: dict[str, tuple[str, ...]] = {
    "colour_of_shape": (
        "What colour is the {shape}?",
        "Which colour is the {shape}?",
        "What is the colour of the {shape}?",
        "The {shape} is what colour?",
        "Name the colour of the {shape}.",
    ),
    "shape_of_colour": (
        "Which shape is {colour}?",
        "What shape is {colour}?",
        "What is the {colour} shape?",
        "Name the {colour} shape.",
        "Which shape has the colour {colour}?",
    ),
    "count_all": (
        "How many shapes are there?",
        "Count the shapes.",
        "How many shapes are in the picture?",
        "How many shapes can you see?",
        "What is the number of shapes?",
    ),
    "count_colour": (
        "How many {colour} shapes are there?",
        "Count the {colour} shapes.",
        "How many {colour} shapes are in the picture?",
        "How many shapes are {colour}?",
        "What is the number of {colour} shapes?",
    ),
    "count_shape": (
        "How many {shapes} are there?",
        "Count the {shapes}.",
        "How many {shapes} are in the picture?",
        "How many {shapes} can you see?",
        "What is the number of {shapes}?",
    ),
    "position": (
        "Where is the {colour} {shape}?",
        "In which corner is the {colour} {shape}?",
        "Where is the {colour} {shape} in the picture?",
        "Which quadrant is the {colour} {shape} in?",
        "Where can you find the {colour} {shape}?",
    ),
    "read_word": (
        "What word is written?",
        "Read the word.",
        "What does the word say?",
        "Which word is written?",
        "What is the word in the picture?",
    ),
    "word_colour": (
        "What colour is the word?",
        "Which colour is the word?",
        "What is the colour of the word?",
        "What colour is the text?",
        "The word is written in what colour?",
    ),
    "add": ("What is {a} plus {b}?", "What is {a} + {b}?", "Add {a} and {b}.", "What do {a} and {b} make?"),
    "subtract": ("What is {a} minus {b}?", "What is {a} - {b}?", "Subtract {b} from {a}.", "Take {b} from {a}."),
    "next_number": (
        "What number comes after {word}?",
        "Which number follows {word}?",
        "What comes after {word}?",
        "Count on from {word}.",
    ),
    "opposite": ("What is the opposite of {word}?", "Give the opposite of {word}.", "What word means the opposite of {word}?"),
}

_HELD_OUT: dict[str, tuple[str, ...]] = {
    "colour_of_shape": ("Tell me the colour of the {shape}.", "What colour does the {shape} have?"),
    "shape_of_colour": ("Tell me which shape is {colour}.", "Which of the shapes is {colour}?"),
    "count_all": ("Tell me how many shapes there are.", "How many shapes does the picture show?"),
    "count_colour": ("Tell me how many {colour} shapes there are.", "How many of the shapes are {colour}?"),
    "count_shape": ("Tell me how many {shapes} there are.", "How many {shapes} does the picture show?"),
    "position": ("Tell me where the {colour} {shape} is.", "In what part of the picture is the {colour} {shape}?"),
    "read_word": ("Tell me the word.", "What does the picture say?"),
    "word_colour": ("Tell me the colour of the word.", "What colour does the word have?"),
    "add": ("Tell me {a} plus {b}.", "How much is {a} plus {b}?"),
    "subtract": ("Tell me {a} minus {b}.", "How much is {a} minus {b}?"),
    "next_number": ("Tell me the number after {word}.", "What number is after {word}?"),
    "opposite": ("Tell me the opposite of {word}.", "What is the reverse of {word}?"),
}


def _with_us_spelling(templates: tuple[str, ...]) -> tuple[str, ...]:
    out: list[str] = []
    for t in templates:
        out.append(t)
        if "colour" in t.replace("{colour}", ""):
            out.append(t.replace("{colour}", "\0").replace("colour", "color").replace("\0", "{colour}"))
    return tuple(out)


TRAIN: dict[str, tuple[str, ...]] = {k: _with_us_spelling(v) for k, v in _TRAIN.items()}
HELD_OUT: dict[str, tuple[str, ...]] = {k: _with_us_spelling(v) for k, v in _HELD_OUT.items()}
V1: dict[str, str] = {k: v[0] for k, v in _TRAIN.items()}  # the one wording of version 1

DESCRIBE = ("Describe the picture.", "Describe the image.", "What is in the picture?", "What do you see?")
DESCRIBE_HELD_OUT = ("Tell me what the picture shows.",)


def templates(kind: str, held_out: bool = False) -> tuple[str, ...]:
    """The templates of `kind`: the training ones, or (held_out) the held-out ones."""
    table = HELD_OUT if held_out else TRAIN
    if kind not in table:
        raise ValueError(f"no phrasings for question kind {kind!r} (kinds: {sorted(table)})")
    return table[kind]


def all_templates() -> list[str]:
    """Every wording, training and held out (the tokenizer corpus covers them all)."""
    return [t for table in (TRAIN, HELD_OUT) for ts in table.values() for t in ts] + [*DESCRIBE, *DESCRIBE_HELD_OUT]


def _words(text: str) -> set[str]:
    return set(re.findall(r"[a-z]+", re.sub(r"\{[a-z]+\}", " ", text.lower())))


@lru_cache(maxsize=None)
def held_out_only_words() -> frozenset[str]:
    """Words of the held-out wordings that no training wording uses ("tell", "me", "much", ...)."""
    train_words = set().union(*(_words(t) for ts in TRAIN.values() for t in ts), *(_words(t) for t in DESCRIBE))
    return frozenset(set().union(*(_words(t) for ts in HELD_OUT.values() for t in ts)) - train_words)


@lru_cache(maxsize=None)
def _pattern(template: str) -> re.Pattern:
    parts = re.split(r"(\{[a-z]+\})", template)
    body = "".join(r"\S+(?: \S+)?" if p.startswith("{") else re.escape(p) for p in parts if p)
    return re.compile(body, re.IGNORECASE)


def is_held_out_question(question: str) -> bool:
    """Whether `question` is a held-out wording (any fields filled in; case and end punctuation
    ignored) or contains a word that only the held-out wordings use."""
    if _words(question) & held_out_only_words():
        return True
    q = question.strip().rstrip("?.!").strip()
    return any(_held_out_patterns_match(q))


def _held_out_patterns_match(q: str):
    for ts in HELD_OUT.values():
        for t in ts:
            yield _pattern(t.rstrip("?.!")).fullmatch(q) is not None
