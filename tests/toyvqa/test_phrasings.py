"""Version 2's wordings: both spellings, and the held-out ones never reach a training split."""

from splitq_toyvqa import data, phrasings


def _template_of(question: str, table: dict) -> str | None:
    """The template (of any kind) that `question` is an instance of, if any."""
    import re

    for ts in table.values():
        for t in ts:
            pattern = re.escape(t)
            for f in ("shape", "shapes", "colour", "a", "b", "word"):
                pattern = pattern.replace(re.escape("{" + f + "}"), r"\w+")
            if re.fullmatch(pattern, question):
                return t
    return None


def test_v2_wordings_cover_both_spellings_and_the_held_out_ones_stay_out_of_training():
    assert set(phrasings.TRAIN) == set(phrasings.HELD_OUT) == set(data.KINDS)
    for table in (phrasings.TRAIN, phrasings.HELD_OUT):
        flat = [t for ts in table.values() for t in ts]
        uk = [t for t in flat if "colour" in t.replace("{colour}", "")]
        assert uk and all(t.replace("{colour}", "#").replace("colour", "color").replace("#", "{colour}") in flat for t in uk)
    assert not set(phrasings.all_templates()[: sum(map(len, phrasings.TRAIN.values()))]) & {
        t for ts in phrasings.HELD_OUT.values() for t in ts
    }
    trained = [s.question for sp in ("train", "validation", "test", "calibration") for s in data.iter_split(sp, 250, version=2)]
    trained += [q for i in range(250) for _, q, _ in data.make_conversation("train", i, max_turns=6, version=2).turns]
    used = {_template_of(q, phrasings.TRAIN) for q in trained}
    assert None not in used and len(used) > 0.8 * sum(map(len, phrasings.TRAIN.values()))
    assert all(_template_of(q, phrasings.HELD_OUT) is None for q in trained)
    held = [s.question for s in data.iter_split("test_heldout_phrasing", 300, version=2)]
    assert all(_template_of(q, phrasings.HELD_OUT) is not None for q in held)
    assert "What color is the circle?" in {s.question for s in data.iter_split("train", 3000, version=2)}


def test_version_1_asks_the_first_training_wording_and_unknown_kinds_are_named():
    import pytest

    assert phrasings.V1["colour_of_shape"] == "What colour is the {shape}?" == phrasings.TRAIN["colour_of_shape"][0]
    assert phrasings.TRAIN["colour_of_shape"][1] == "What color is the {shape}?"  # the US twin follows
    assert all(phrasings.V1[k] == ts[0] for k, ts in phrasings.TRAIN.items())
    with pytest.raises(ValueError, match="no phrasings for question kind 'weather'"):
        phrasings.templates("weather")


def test_held_out_questions_are_recognised_and_training_ones_are_not():
    fields = dict(shape="star", shapes="stars", colour="red", a=3, b=4, word="hot")
    for kind, ts in phrasings.HELD_OUT.items():
        for t in ts:
            q = t.format(**fields)
            assert phrasings.is_held_out_question(q), q
            assert phrasings.is_held_out_question(q.lower().rstrip("?."))
    for ts in phrasings.TRAIN.values():
        for t in ts:
            assert not phrasings.is_held_out_question(t.format(**fields)), t
    assert {"tell", "me", "much", "reverse"} <= phrasings.held_out_only_words()
    assert not phrasings.held_out_only_words() & {"colour", "what", "the", "word", "shape", "shapes"}
