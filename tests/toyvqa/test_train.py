"""The ToyVQA trainer feeds the model exactly what it is served: same token ids, same M-RoPE
positions, labels on the answers only; the CLI runs end to end."""

import json

import pytest
import torch

from splitq_toyvqa import data, train


@pytest.fixture(scope="module")
def fresh():
    torch.manual_seed(0)
    model, processor, tokenizer, ids = train.build(0)
    return model.eval(), processor, ids


def test_prompts_and_labels_are_the_served_ones(fresh):
    _, processor, ids = fresh
    collator = train.Collator(processor, ids)
    samples = list(data.iter_split("test", 16))
    batch = collator(samples)
    tok = processor.tokenizer
    for row, s in enumerate(samples):
        text = processor.apply_chat_template(data.chat_messages(s.question, s.image), add_generation_prompt=True)
        served = processor(text=[text], images=[s.image] if s.image else None, return_tensors="pt")
        ref = served["input_ids"][0].tolist()
        answer = tok(s.answer, add_special_tokens=False)["input_ids"] + [ids["<|im_end|>"]]
        n = len(ref) + len(answer)
        assert batch["input_ids"][row, :n].tolist() == ref + answer
        assert batch["mm_token_type_ids"][row, : len(ref)].tolist() == served["mm_token_type_ids"][0].tolist()
        labels = batch["labels"][row].tolist()
        assert labels[len(ref) : n] == answer and set(labels[: len(ref)] + labels[n:]) <= {-100}


def test_multi_turn_conversations_tokenize_like_the_template(fresh):
    _, processor, ids = fresh
    collator = train.Collator(processor, ids)
    convs = [data.make_conversation("train", i) for i in range(12)]
    assert max(len(c.turns) for c in convs) > 1
    batch = collator(convs)
    newline = processor.tokenizer.convert_tokens_to_ids("Ċ")
    for row, c in enumerate(convs):
        text = processor.apply_chat_template(train.conversation_messages(c))
        ref = processor(text=[text], images=[c.image] if c.image else None)["input_ids"][0]
        n = int(batch["attention_mask"][row].sum())
        assert list(ref[:-1]) == batch["input_ids"][row, :n].tolist() and ref[-1] == newline  # ends "<|im_end|>\n"
        labelled = [t for t in batch["labels"][row].tolist() if t != -100]
        expected = []
        for _, _, a in c.turns:
            expected += processor.tokenizer(a, add_special_tokens=False)["input_ids"] + [ids["<|im_end|>"]]
        assert labelled == expected


def test_training_forward_matches_the_served_forward(fresh):
    """Same logits at the answer position from the collator's batch (right padding, mixed
    image/text rows) as from the processor's inputs for one sample (what generate() runs)."""
    model, processor, ids = fresh
    collator = train.Collator(processor, ids)
    samples = [data.make_sample("test", i, kind=k) for i, k in enumerate(["position", "add", "count_all", "read_word"])]
    batch = collator(samples)
    with torch.no_grad():
        logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
        for row, s in enumerate(samples):
            text = processor.apply_chat_template(data.chat_messages(s.question, s.image), add_generation_prompt=True)
            served = processor(text=[text], images=[s.image] if s.image else None, return_tensors="pt")
            ref = model(**served).logits[0, -1]
            n = served["input_ids"].shape[1]
            torch.testing.assert_close(logits[row, n - 1], ref, atol=2e-4, rtol=1e-4)


def test_token_targets_follow_the_scene():
    img, scene = data.draw_shapes_scene(__import__("random").Random(3), 3)
    t = train.token_targets(scene)
    assert t.shape == (16, 5) and int((t[:, 0] > 0).sum()) == 3
    for o in scene:
        i = o["row"] * data.GRID + o["col"]
        assert t[i, 0] == 1 + data.SHAPES.index(o["shape"]) and t[i, 3] == o["row"] and t[i, 4] == o["col"]
    img, scene = data.draw_word_scene(__import__("random").Random(5))
    t = train.token_targets(scene)
    covered = (t[:, 2] > 0).nonzero().flatten().tolist()
    assert 1 <= len(covered) <= 3 and all(i // data.GRID == scene[0]["row"] for i in covered)


def test_the_cli_trains_saves_and_scores(tmp_path):
    out = tmp_path / "model"
    train.main(["--output", str(out), "--steps", "3", "--vision-steps", "2", "--batch-size", "4",
                "--vision-batch-size", "4", "--val-n", "8", "--test-n", "8", "--eval-every", "3"])  # fmt: skip
    log = json.loads((out / "training_log.json").read_text())
    assert log["test_bf16_transformers"]["n"] == 8 and len(log["history"]) == 1
    assert "--steps 3" in log["command"] and (out / "README.md").read_text().startswith("# ToyVQA")
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["dtype"] == "bfloat16" and cfg["architectures"] == ["Qwen2_5_VLForConditionalGeneration"]


def test_caption_conversations_are_labelled_on_the_caption_only(fresh):
    _, processor, ids = fresh
    collator = train.Collator(processor, ids)
    convs = [data.make_caption_conversation(i) for i in range(6)]
    batch = collator(convs)
    tok = processor.tokenizer
    for row, c in enumerate(convs):
        ((_, prompt, caption),) = c.turns
        text = processor.apply_chat_template(data.chat_messages(prompt, c.image), add_generation_prompt=True)
        ref = processor(text=[text], images=[c.image])["input_ids"][0]
        labelled = [t for t in batch["labels"][row].tolist() if t != -100]
        assert labelled == tok(caption, add_special_tokens=False)["input_ids"] + [ids["<|im_end|>"]]
        assert batch["input_ids"][row, : len(ref)].tolist() == list(ref)


def test_the_v2_cli_aligns_then_trains_saves_and_scores_the_held_out_slices(tmp_path):
    out = tmp_path / "model"
    train.main(["--output", str(out), "--data-version", "2", "--align-steps", "2", "--align-batch-size", "3",
                "--steps", "2", "--vision-steps", "1", "--batch-size", "3", "--vision-batch-size", "3",
                "--val-n", "6", "--test-n", "6", "--eval-every", "2"])  # fmt: skip
    log = json.loads((out / "training_log.json").read_text())
    assert log["args"]["data_version"] == 2 and [h["step"] for h in log["align_history"]] == [2]
    for split in ("test", *data.HELD_OUT_SPLITS):
        assert log[f"{split}_bf16_transformers"]["n"] == 6
    card = (out / "README.md").read_text()
    assert "Alignment: 2 steps of 3" in card and "test_heldout_visual" in card and "--data-version 2" in card
    # the v2 tokenizer was trained on every v2 wording: a held-out question has no byte fallbacks
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(out)
    q = tok.tokenize("Tell me the colour of the triangle. What color does the word have?")
    assert len(q) <= 16, q


def test_alignment_needs_version_2(tmp_path):
    with pytest.raises(SystemExit):
        train.main(["--output", str(tmp_path / "m"), "--align-steps", "5"])


def test_v2_token_targets_cover_every_cell_a_shape_or_word_spills_into():
    import random

    spilled = 0
    for k in range(40):
        img, scene = data.draw_shapes_scene_v2(random.Random(k), 3)
        t = train.token_targets(scene)
        for o in scene:  # the centre's token always holds its shape
            i = o["row"] * data.GRID + o["col"]
            assert t[i, 0] == 1 + data.SHAPES.index(o["shape"]) and t[i, 1] == 1 + list(data.COLOURS).index(o["colour"])
        for i in (t[:, 0] > 0).nonzero().flatten().tolist():  # and every labelled token touches its shape's box
            r, c = divmod(i, data.GRID)
            (o,) = [o for o in scene if 1 + data.SHAPES.index(o["shape"]) == t[i, 0] and
                    abs(o["cx"] - (c + 0.5) * data.CELL) < data.CELL / 2 + o["r"] and
                    abs(o["cy"] - (r + 0.5) * data.CELL) < data.CELL / 2 + o["r"]][:1]  # fmt: skip
        spilled += int((t[:, 0] > 0).sum()) - len(scene)
        assert (t[:, 3] == torch.arange(16) // 4).all() and (t[:, 4] == torch.arange(16) % 4).all()
    assert spilled > 40  # shapes moved across borders label more than their centre's token
    img, scene = data.draw_word_scene_v2(random.Random(1))
    t = train.token_targets(scene)
    assert (t[:, 2] > 0).sum() >= 2 and set(t[t[:, 2] > 0, 2].tolist()) == {1 + data.WORDS.index(scene[0]["word"])}
    # version 1's targets are unchanged: the centre token only
    img, scene = data.draw_shapes_scene(random.Random(3), 3)
    assert int((train.token_targets(scene)[:, 0] > 0).sum()) == 3


def test_v2b_targets_label_every_token_of_a_word_picture_and_each_shape_centre_once():
    import random

    img, scene = data.draw_word_scene_v2(random.Random(2))
    t = train.token_targets_v2b(scene, "picture", centre=True)
    assert t.shape == (16, 6) and (t[:, 2] == 1 + data.WORDS.index(scene[0]["word"])).all() and (t[:, 5] == 0).all()
    assert (train.token_targets_v2b(scene)[:, :5] == train.token_targets(scene)).all()
    for k in range(20):
        img, scene = data.draw_shapes_scene_v2(random.Random(k), 3)
        t = train.token_targets_v2b(scene, "picture", centre=True)
        assert int((t[:, 5] > 0).sum()) == 3 and (t[:, 2] == 0).all()
        for o in scene:
            assert t[o["row"] * 4 + o["col"], 5] == 1 + data.SHAPES.index(o["shape"])
    with pytest.raises(ValueError):
        train.token_targets_v2b(scene, "letters")


def test_word_curriculum_holds_then_ramps_then_lets_words_go_anywhere():
    assert train.word_jitter_at(5, None) is None
    assert train.word_jitter_at(0, (10, 20)) == 0.0 and train.word_jitter_at(9, (10, 20)) == 0.0
    assert train.word_jitter_at(20, (10, 20)) == data.CELL / 2 and train.word_jitter_at(30, (10, 20)) is None


def test_the_v2_cli_takes_the_training_stream_options(tmp_path):
    out = tmp_path / "model"
    train.main(["--output", str(out), "--data-version", "2", "--steps", "2", "--vision-steps", "3", "--batch-size", "3",
                "--vision-batch-size", "3", "--val-n", "4", "--test-n", "4", "--eval-every", "2",
                "--vision-word-p", "0.5", "--vision-word-target", "picture", "--vision-centre-head",
                "--vision-word-curriculum", "1,1", "--kind-weights", "position=6,read_word=5", "--augment-p", "0.3"])  # fmt: skip
    log = json.loads((out / "training_log.json").read_text())
    assert log["args"]["kind_weights"] == "position=6,read_word=5" and "centre" in log["vision_history"][-1]
    card = (out / "README.md").read_text()
    assert "every token of a word picture" in card and "reworded" in card and "position=6" in card
    with pytest.raises(SystemExit):
        train.main(["--output", str(tmp_path / "m"), "--augment-p", "0.3"])
    with pytest.raises(SystemExit):
        train.main(["--output", str(tmp_path / "m"), "--data-version", "2", "--kind-weights", "nope=3"])


def test_the_vision_aux_loss_reads_the_towers_own_tokens_and_trains_the_tower(fresh):
    """The hook hands the probe exactly the merged tokens the language model got, in picture
    order, with the targets of those pictures; its loss reaches the tower's weights."""
    model, processor, ids = fresh
    collator = train.Collator(processor, ids)
    convs = [data.make_conversation("train", i, version=2) for i in range(10)]
    assert 0 < sum(c.image is not None for c in convs) < len(convs)  # text-only ones are skipped
    probe = train.VisionProbe(model.config.vision_config.out_hidden_size, "picture", True)
    aux = train.VisionAux(model, probe, 0.5)
    try:
        batch = collator(convs)
        model(**batch)
        tokens = aux.tokens
        loss = aux.loss(convs)  # consumes the caught tokens
        assert aux.tokens is None
        with torch.no_grad():  # (this forward is caught too: after the loss)
            direct = model.model.visual(batch["pixel_values"], grid_thw=batch["image_grid_thw"]).pooler_output
        assert torch.allclose(tokens, direct, atol=1e-5)
        scenes = [c.scene for c in convs if c.image is not None]
        target = probe.targets(scenes)
        assert torch.equal(target, torch.stack([train.token_targets_v2b(s, "picture", True) for s in scenes]).view(-1, 6))
        assert torch.allclose(loss, 0.5 * probe.loss(direct, target)[0], atol=1e-5)
        model.zero_grad(set_to_none=True)
        loss.backward()
        assert model.model.visual.patch_embed.proj.weight.grad.abs().sum() > 0
        assert model.model.language_model.layers[0].mlp.up_proj.weight.grad is None  # the probe's loss is the tower's
        assert set(aux.report()) == {"shape", "colour", "word", "row", "column", "centre"}
    finally:
        aux.remove()
        model.zero_grad(set_to_none=True)
    model(**collator(convs[:2]))
    assert aux.tokens is None  # removed: no longer caught
