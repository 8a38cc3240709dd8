"""ToyVQA: the generator is deterministic, the splits are fixed, the export and scoring work."""

import hashlib
import json
from collections import Counter

import pytest

from splitq_toyvqa import data, phrasings
from splitq_toyvqa.evaluate import is_correct, normalize_answer, score, score_answers
from splitq_vllm.testing.images import png_bytes


def _fingerprint(samples):
    return [(s.id, s.kind, s.question, s.answer, png_bytes(s.image) if s.image else None) for s in samples]


@pytest.mark.parametrize("split", data.SPLITS)
def test_same_seed_gives_the_same_images_and_questions(split):
    a = _fingerprint(data.iter_split(split, 40, seed=0))
    b = _fingerprint(data.iter_split(split, 40, seed=0))
    assert a == b
    # drawing one sample alone (random access) gives the same as drawing it in sequence
    assert _fingerprint([data.make_sample(split, 17, seed=0)]) == a[17:18]


def test_different_seeds_and_splits_differ():
    base = _fingerprint(data.iter_split("test", 40, seed=0))
    other_seed = _fingerprint(data.iter_split("test", 40, seed=1))
    other_split = _fingerprint(data.iter_split("validation", 40, seed=0))
    # ids are the same, content is not
    assert sum(x[1:] != y[1:] for x, y in zip(base, other_seed)) >= 35
    assert sum(x[1:] != y[1:] for x, y in zip(base, other_split)) >= 35
    images = {x[4] for x in base if x[4]}
    assert not images & {x[4] for x in other_split if x[4]}


def test_the_task_mixes_every_kind_and_short_answers():
    samples = data.load_split("test")
    assert len(samples) == data.SPLIT_SIZES["test"] == 1000
    kinds = Counter(s.kind for s in samples)
    assert set(kinds) == set(data.KINDS) and min(kinds.values()) >= 20
    with_image = sum(s.image is not None for s in samples)
    assert 0.6 * len(samples) < with_image < 0.9 * len(samples)
    assert all(1 <= len(s.answer.split()) <= 2 for s in samples)
    assert all(s.image.size == (data.IMAGE_SIZE, data.IMAGE_SIZE) for s in samples if s.image)
    # answers are not dominated by one value (a constant guess scores low)
    assert Counter(s.answer for s in samples).most_common(1)[0][1] < 0.15 * len(samples)


def test_answers_follow_from_the_scene():
    for s in data.iter_split("validation", 300):
        objs = s.scene
        if s.kind == "count_all":
            assert s.answer == str(len(objs))
        elif s.kind == "colour_of_shape":
            shape = s.question.split()[-1].rstrip("?")
            (o,) = [o for o in objs if o["shape"] == shape]
            assert o["colour"] == s.answer
        elif s.kind == "position":
            colour, shape = s.question.rstrip("?").split()[-2:]
            (o,) = [o for o in objs if (o["colour"], o["shape"]) == (colour, shape)]
            assert data.position_name(o["row"], o["col"]) == s.answer
        elif s.kind == "count_shape":
            shape = s.question.split()[2][:-1]  # How many circles are there?
            assert s.answer == str(sum(o["shape"] == shape for o in objs))
        elif s.kind == "count_colour":
            colour = s.question.split()[2]  # How many red shapes are there?
            assert s.answer == str(sum(o["colour"] == colour for o in objs))
        elif s.kind == "read_word":
            assert s.answer == objs[0]["word"]
        elif s.kind == "add":
            a, b = s.question.replace("?", "").split()[2::2]
            assert int(s.answer) == int(a) + int(b)


def test_sharegpt4v_export(tmp_path):
    path = data.export_sharegpt4v(tmp_path / "a", n=12)
    again = data.export_sharegpt4v(tmp_path / "b", n=12)
    entries = json.loads(path.read_text())
    assert path.name == "calibration.json" and len(entries) == 12
    assert path.read_bytes() == again.read_bytes()
    for e in entries:
        assert e["id"].startswith("toyvqa-calibration-")
        img = tmp_path / "a" / "images" / e["image"]
        assert img.read_bytes() == (tmp_path / "b" / "images" / e["image"]).read_bytes()
        human, gpt = e["conversations"]
        assert human["from"] == "human" and human["value"].startswith("<image>\n")
        assert gpt["from"] == "gpt" and gpt["value"]
    mixed = json.loads(data.export_sharegpt4v(tmp_path / "c", n=40, with_text_only=True).read_text())
    assert any("image" not in e and not e["conversations"][0]["value"].startswith("<image>") for e in mixed)


def test_normalisation_and_scoring():
    assert normalize_answer(" Top  Left. ") == "top left"
    assert normalize_answer("The circle!") == "circle"
    assert is_correct("three", "3") and is_correct("4", "four") and is_correct("centre", "center")
    assert not is_correct("top", "top left") and not is_correct("", "red")
    samples = data.load_split("test", 30)
    oracle = score(samples, lambda q, img: next(s.answer for s in samples if s.question == q and s.image is img))
    assert oracle.accuracy == 1.0 and oracle.n == 30
    wrong = score_answers(samples, ["nothing"] * 30)
    assert wrong.accuracy == 0.0 and sum(n for _, n in wrong.per_kind().values()) == 30


def test_the_shipped_held_out_questions_are_the_test_splits(tmp_path):
    """examples/toyvqa_heldout is `python -m splitq_toyvqa.data --questions --split test --n 200`
    (the bundled model's held-out split, of the version it was trained on): regenerated here, same
    records and same pictures."""
    import numpy as np
    from PIL import Image

    from tests.helpers.paths import BUNDLED_MODEL, EXAMPLES

    shipped = EXAMPLES / "toyvqa_heldout"
    fresh = data.export_questions(tmp_path, "test", 200, version=data.model_data_version(BUNDLED_MODEL))
    assert (shipped / "questions.jsonl").read_text() == fresh.read_text()
    records = [json.loads(line) for line in fresh.read_text().splitlines()]
    assert len(records) == 200 and {"kind", "answer", "question", "id"} <= set(records[0])
    with_image = [r for r in records if "image" in r]
    assert 100 < len(with_image) < 200  # text-only questions kept, without an image
    assert sorted(p.name for p in (shipped / "images").iterdir()) == sorted(r["image"][7:] for r in with_image)
    for r in with_image:
        a, b = Image.open(shipped / r["image"]), Image.open(tmp_path / r["image"])
        assert np.array_equal(np.asarray(a), np.asarray(b)), r["id"]


# --- version 1 is frozen ---------------------------------------------------------------------
# ToyVQA version 1 is frozen: the bundled model, the calibration data, the shipped held-out
# questions and the quality tables were all made from its exact samples. These digests were taken
# before version 2 was added (issue 17); a change to any v1 question, answer, pixel, training
# conversation, pretraining picture or tokenizer line fails here.


def _digest(parts) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(p if isinstance(p, bytes) else repr(p).encode())
    return h.hexdigest()[:16]


def _sample_parts(s):
    return (s.id, s.kind, s.question, s.answer, s.image.tobytes() if s.image else None, s.scene)


# a few samples spelt out (readable when the digest below fails)
PINNED = [
    ("train", 0, "read_word", "What word is written?", "cup", "aded557c9f11a792"),
    ("train", 12345, "subtract", "What is 9 minus 6?", "3", None),
    ("validation", 7, "next_number", "What number comes after seven?", "eight", None),
    ("test", 0, "position", "Where is the green circle?", "top right", "1706e302b36e60f8"),
    ("test", 41, "read_word", "What word is written?", "pen", "ba1ac280a611dff4"),
    ("test", 999, "shape_of_colour", "Which shape is green?", "circle", "f5f9d7cc7a7d7823"),
    ("calibration", 3, "next_number", "What number comes after zero?", "one", None),
]
SPLIT_DIGESTS = {'train': 'bdac69cb2a4eedd5', 'validation': 'c8314402c372ce48', 'test': '5694c4926e379aff', 'calibration': '75bea1afd9c0f6b1'}
CONV_DIGEST, PICTURE_DIGEST, CORPUS_DIGEST = '90f4fe05c07985d3', '16d2c7ae72d8abb9', '3de95db7c1bfe302'


@pytest.mark.parametrize("split,index,kind,question,answer,pixels", PINNED)
def test_pinned_v1_samples(split, index, kind, question, answer, pixels):
    s = data.make_sample(split, index)
    got = hashlib.sha256(s.image.tobytes()).hexdigest()[:16] if s.image else None
    assert (s.kind, s.question, s.answer, got) == (kind, question, answer, pixels)


@pytest.mark.parametrize("split", sorted(SPLIT_DIGESTS))
def test_v1_splits_are_unchanged(split):
    assert _digest(_sample_parts(s) for s in data.iter_split(split, 60)) == SPLIT_DIGESTS[split]


def test_v1_training_streams_and_tokenizer_corpus_are_unchanged():
    convs = [data.make_conversation("train", i) for i in range(40)]
    assert _digest((c.id, c.turns, c.image.tobytes() if c.image else None, c.scene) for c in convs) == CONV_DIGEST
    pics = [data.make_picture(i) for i in range(40)]
    assert _digest((p.tobytes(), scene) for p, scene in pics) == PICTURE_DIGEST
    assert _digest(data.tokenizer_corpus()) == CORPUS_DIGEST


# --- version 2 -------------------------------------------------------------------------------
V2_SPLITS = ("train", "validation", "test", "calibration", "test_heldout_phrasing", "test_heldout_visual")


@pytest.mark.parametrize("split", V2_SPLITS)
def test_v2_is_deterministic_and_apart_from_v1(split):
    a = _fingerprint(data.iter_split(split, 30, version=2))
    assert a == _fingerprint(data.iter_split(split, 30, version=2))
    assert _fingerprint([data.make_sample(split, 11, version=2)]) == a[11:12]
    assert all(x[0].startswith(f"toyvqa-v2-{split}-") for x in a)
    if split in data.SPLITS:
        v1 = _fingerprint(data.iter_split(split, 30))
        assert not {x[4] for x in a if x[4]} & {x[4] for x in v1 if x[4]}


def test_v1_has_no_held_out_slices_and_bad_versions_are_named():
    with pytest.raises(ValueError, match="version 2"):
        data.make_sample("test_heldout_phrasing", 0)
    with pytest.raises(ValueError, match="version must be one of"):
        data.make_sample("test", 0, version=3)
    with pytest.raises(ValueError, match="test slice"):
        data.make_conversation("test_heldout_visual", 0, version=2)


def test_v2_looks_vary_and_the_held_out_look_is_never_trained():
    def looks(scenes):
        radii, fonts, tints = [], set(), set()
        for scene in scenes:
            for o in scene:
                tints.add(o["background"])
                if "shape" in o:
                    radii.append(o["r"])
                else:
                    fonts.add(o["font_size"])
        return radii, fonts, tints

    train_scenes = [s.scene for sp in ("train", "validation", "test", "calibration") for s in data.iter_split(sp, 200, version=2)]
    train_scenes += [data.make_picture(i, version=2)[1] for i in range(200)]
    train_scenes += [data.make_caption_conversation(i).scene for i in range(200)]
    radii, fonts, tints = looks(sc for sc in train_scenes if sc)
    assert fonts == set(data.TRAIN_LOOK.font_sizes) and tints == set(data.TRAIN_LOOK.tints)
    assert all(any(lo <= r <= hi for lo, hi in data.TRAIN_LOOK.radii) for r in radii) and max(radii) - min(radii) > 5
    h_radii, h_fonts, h_tints = looks(s.scene for s in data.iter_split("test_heldout_visual", 300, version=2) if s.scene)
    assert h_fonts == set(data.HELD_OUT_LOOK.font_sizes) and h_tints == set(data.HELD_OUT_LOOK.tints)
    assert all(10.0 <= r <= 11.5 for r in h_radii)
    assert not (h_fonts & fonts) and not (h_tints & tints)


@pytest.mark.parametrize("split", ["test", "test_heldout_visual"])
def test_v2_shapes_move_off_their_cells_but_stay_in_their_quadrant(split):
    import numpy as np

    offsets = []
    for s in data.iter_split(split, 300, version=2):
        shapes = [o for o in s.scene if "shape" in o]
        for i, o in enumerate(shapes):
            ext = data._extent(o["r"])
            qx, qy = (o["col"] // 2) * data.QUADRANT, (o["row"] // 2) * data.QUADRANT
            assert qx < o["cx"] - ext and o["cx"] + ext < qx + data.QUADRANT, (s.id, o)
            assert qy < o["cy"] - ext and o["cy"] + ext < qy + data.QUADRANT, (s.id, o)
            assert (int(o["cy"] // data.CELL), int(o["cx"] // data.CELL)) == (o["row"], o["col"])
            offsets.append(max(abs(o["cx"] - (o["col"] + 0.5) * data.CELL), abs(o["cy"] - (o["row"] + 0.5) * data.CELL)))
            for p in shapes[i + 1 :]:  # shapes do not touch
                assert np.hypot(o["cx"] - p["cx"], o["cy"] - p["cy"]) > ext + data._extent(p["r"])
    assert max(offsets) > 6 and np.mean(offsets) > 3  # v1 moves them by 1 px at most


@pytest.mark.parametrize("split", V2_SPLITS)
def test_v2_answers_follow_from_the_scene(split):
    import re

    for s in data.iter_split(split, 300, version=2):
        words = set(re.findall(r"\w+", s.question.lower()))
        objs = s.scene
        if s.kind == "count_all":
            assert s.answer == str(len(objs))
        elif s.kind == "colour_of_shape":
            (o,) = [o for o in objs if o["shape"] in words]
            assert o["colour"] == s.answer
        elif s.kind == "shape_of_colour":
            (o,) = [o for o in objs if o["colour"] in words]
            assert o["shape"] == s.answer
        elif s.kind == "position":
            (o,) = [o for o in objs if o["colour"] in words and o["shape"] in words]
            assert data.position_name(o["row"], o["col"]) == s.answer
        elif s.kind == "count_shape":
            (shape,) = [sh for sh in data.SHAPES if data.plural(sh) in words]
            assert s.answer == str(sum(o["shape"] == shape for o in objs))
        elif s.kind == "count_colour":
            (colour,) = [c for c in data.COLOURS if c in words]
            assert s.answer == str(sum(o["colour"] == colour for o in objs))
        elif s.kind in ("read_word", "word_colour"):
            assert s.answer == objs[0]["word" if s.kind == "read_word" else "colour"]
        elif s.kind in ("add", "subtract"):
            a, b = (int(x) for x in re.findall(r"\d", s.question))
            if s.question.startswith(("Subtract", "Take")):
                a, b = b, a  # "Subtract b from a"
            assert int(s.answer) == (a + b if s.kind == "add" else a - b)


def test_captions_name_every_shape_its_colour_and_quadrant():
    for i in range(100):
        c = data.make_caption_conversation(i)
        ((kind, prompt, caption),) = c.turns
        assert kind == "describe" and prompt in phrasings.DESCRIBE and caption.endswith(".")
        if "word" in c.scene[0]:
            assert caption == f"The word {c.scene[0]['word']} in {c.scene[0]['colour']}."
            continue
        assert caption.count(" in the ") == len(c.scene)
        for o in c.scene:
            assert f"{o['colour']} {o['shape']} in the {data.position_name(o['row'], o['col'])}" in caption
    two = [{"shape": "star", "colour": "orange", "row": 3, "col": 3}, {"shape": "circle", "colour": "red", "row": 0, "col": 0}]
    assert data.describe(two) == "A red circle in the top left and an orange star in the bottom right."


def test_the_v2_tokenizer_corpus_holds_every_wording_and_caption_word():
    import re

    text = " ".join(data.tokenizer_corpus(2))
    vocab = set(re.findall(r"[A-Za-z]+", text))
    for t in phrasings.all_templates():
        assert set(re.findall(r"[A-Za-z]+", re.sub(r"\{\w+\}", "", t))) <= vocab, t
    for i in range(50):
        assert set(re.findall(r"[A-Za-z]+", data.make_caption_conversation(i).turns[0][2])) <= vocab
    assert data.tokenizer_corpus(1) == data.tokenizer_corpus()  # v1's is unchanged (pinned above)


def test_v2_export_and_spellings_are_scored_alike(tmp_path):
    path = data.export_questions(tmp_path, "test_heldout_visual", 20, version=2)
    records = [json.loads(line) for line in path.read_text().splitlines()]
    assert len(records) == 20 and all(r["id"].startswith("toyvqa-v2-test_heldout_visual-") for r in records)
    assert is_correct("grey", "gray") and is_correct("Colour", "color") and is_correct("centre", "center")


def test_the_evaluate_cli_takes_the_held_out_slices_as_version_2(tmp_path, capsys):
    from splitq_toyvqa import evaluate

    with pytest.raises(SystemExit):  # a v2 slice asked of version 1: refused before loading anything
        evaluate.main(["--model", str(tmp_path / "none"), "--split", "test_heldout_visual", "--data-version", "1"])
    assert "--data-version 2" in capsys.readouterr().err
    with pytest.raises(ValueError, match="version 2"):
        evaluate.evaluate_transformers(tmp_path / "none", "test_heldout_phrasing", 4)
    from tests.helpers.paths import BUNDLED_MODEL

    out = tmp_path / "result.json"
    evaluate.main(["--model", str(BUNDLED_MODEL), "--split", "test_heldout_phrasing", "--n", "8", "--json", str(out)])
    printed = capsys.readouterr().out
    assert "ToyVQA version 2, split test_heldout_phrasing" in printed and "+-" in printed  # per kind, with errors
    result = json.loads(out.read_text())
    assert result["n"] == 8 and all(r["id"].startswith("toyvqa-v2-test_heldout_phrasing-") for r in result["records"])


def test_a_model_is_scored_and_calibrated_on_the_version_it_was_trained_on(tmp_path, capsys):
    """The data version comes from the model's training log, so swapping the bundled model for a
    version 2 one needs no caller to change (evaluate, the demo, the quality benchmark, stress)."""
    import shutil

    from splitq_toyvqa import evaluate
    from tests.helpers.paths import BUNDLED_MODEL

    assert data.model_data_version(BUNDLED_MODEL) == 1  # its log predates the field
    assert data.model_data_version(tmp_path) == 1  # no log: not a ToyVQA run, version 1's samples
    v2 = tmp_path / "v2"
    shutil.copytree(BUNDLED_MODEL, v2)
    log = json.loads((v2 / "training_log.json").read_text())
    log["args"]["data_version"] = 2
    (v2 / "training_log.json").write_text(json.dumps(log))
    assert data.model_data_version(v2) == 2
    out = tmp_path / "result.json"
    evaluate.main(["--model", str(v2), "--n", "4", "--json", str(out)])
    assert "ToyVQA version 2, split test" in capsys.readouterr().out
    assert all(r["id"].startswith("toyvqa-v2-test-") for r in json.loads(out.read_text())["records"])
    log["args"]["data_version"] = 3
    (v2 / "training_log.json").write_text(json.dumps(log))
    with pytest.raises(ValueError, match=r"training_log.json: args.data_version is 3"):
        data.model_data_version(v2)
    (v2 / "training_log.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"v2/training_log.json: not a training log"):
        evaluate.evaluate_transformers(v2, "test", 4)


# --- version 2's training-stream options (issue 17) ----------------------------------------------


def test_augmented_questions_are_never_held_out_wordings_and_use_no_held_out_word():
    import random

    assert not set(data.FILLER_WORDS) & phrasings.held_out_only_words()
    rng = random.Random(0)
    changed = 0
    for i in range(600):
        q = data.make_sample("train", i, version=2).question
        for _ in range(3):
            a = data.augment_question(q, rng)
            assert not phrasings.is_held_out_question(a), (q, a)
            changed += a != q
    assert changed > 1000


def test_augmented_conversations_keep_pictures_and_answers_and_are_deterministic():
    for i in range(40):
        plain = data.make_conversation("train", i, max_turns=6, version=2)
        aug = data.make_conversation("train", i, max_turns=6, version=2, augment_p=0.5)
        again = data.make_conversation("train", i, max_turns=6, version=2, augment_p=0.5)
        assert [(k, a) for k, _, a in aug.turns] == [(k, a) for k, _, a in plain.turns]
        assert aug.turns == again.turns and aug.scene == plain.scene
        assert (aug.image is None) == (plain.image is None)
        if plain.image is not None:
            assert aug.image.tobytes() == plain.image.tobytes()
    assert any(data.make_conversation("train", i, version=2, augment_p=0.5).turns !=
               data.make_conversation("train", i, version=2).turns for i in range(10))  # fmt: skip


def test_kind_weights_change_the_kinds_drawn_and_v1_takes_no_options():
    from collections import Counter

    w = dict(data.KINDS, position=30)
    first = Counter(data.make_conversation("train", i, version=2, kind_weights=w).turns[0][0] for i in range(300))
    plain = Counter(data.make_conversation("train", i, version=2).turns[0][0] for i in range(300))
    assert first["position"] > 2 * plain["position"]
    default = [data.make_conversation("train", i, version=2, kind_weights=dict(data.KINDS)).turns for i in range(20)]
    assert default[0][0][0] == data.make_conversation("train", 0, version=2).turns[0][0]
    with pytest.raises(ValueError, match="version 2"):
        data.make_conversation("train", 0, augment_p=0.3)
    with pytest.raises(ValueError, match="version 2"):
        data.make_picture(0, word_jitter=0.0)


def test_placed_words_start_near_a_cell_edge_and_jitter_moves_them():
    import random

    for k in range(60):
        img, (o,) = data.draw_word_scene_placed(random.Random(k), 0.0)
        assert o["x0"] - o["col"] * data.CELL <= 4 and o["font_size"] in data.TRAIN_LOOK.font_sizes
        mid = (o["y0"] + o["y1"]) / 2
        assert abs(mid - (o["row"] + 0.5) * data.CELL) <= 2.5
    offs = [data.draw_word_scene_placed(random.Random(k), data.CELL)[1][0] for k in range(60)]
    assert max(o["x0"] - o["col"] * data.CELL for o in offs) > 10
    a = data.make_picture(3, word_p=1.0, version=2, word_jitter=5.0)
    b = data.make_picture(3, word_p=1.0, version=2, word_jitter=5.0)
    assert a[0].tobytes() == b[0].tobytes() and a[1] == b[1]
    # without word_jitter the stream is the one stage 1 always drew
    assert data.make_picture(3, word_p=1.0, version=2)[1] != a[1]
