"""Train the bundled ToyVQA model (a small Qwen2.5-VL) from scratch on the CPU, reproducibly.

    .venv/bin/python -m splitq_toyvqa.train --output /path/to/repo/models/toyvqa-qwen25vl

The model is the real `Qwen2_5_VLForConditionalGeneration` with a small config (TOYVQA_SIZE), a
byte-level BPE tokenizer trained on the task's text, the Qwen2-VL image processor (112x112 images
-> 16 vision tokens) and the chat template it is served with. Training: AdamW, linear warm-up then
cosine decay, fp32, cross-entropy on the answer tokens (each answer and its closing <|im_end|>)
only. The data are ToyVQA training conversations (one picture, 1..--max-turns questions; the first turn is
exactly the served single-question prompt); step i uses conversations i*batch .. i*batch+batch-1,
so a run is fixed by its arguments and seed (bit-exact with the same thread count, one by default,
and the same torch build: float reductions depend on them). At the end the weights are saved in
bfloat16 with the tokenizer, processor and chat template, and the saved model is scored on the
held-out test split (greedy, exact match); `training_log.json` and the model card `README.md`
record the command, the machine, the wall time and the accuracies.

`--data-version 2` trains on ToyVQA version 2 (varied wordings and pictures, `splitq_toyvqa.data`)
and also scores the two held-out slices at the end; `--align-steps N` adds an alignment stage
between the vision pretraining and the questions: N steps of "describe the picture"
conversations (version 2's captions: each shape's colour, shape and quadrant, or the word and its
colour), LLaVA's feature-alignment stage in small. Both are off by default, so the bundled
model's command (the model card) still runs its recipe.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from splitq_vllm.testing.models import (
    QWEN_CHAT_TEMPLATE,
    TinySize,
    qwen25vl_config,
    qwen25vl_processor,
    qwen25vl_tokenizer,
    save_qwen25vl_dir,
)

from . import data
from .checkpoint import RunFolder
from .evaluate import evaluate_transformers, load_transformers

# The bundled model's sizes: head_dim 64 in both towers (vLLM's CPU attention needs >= 32).
TOYVQA_SIZE = TinySize(
    hidden=256,
    intermediate=768,
    layers=4,
    heads=4,
    kv_heads=2,
    vision_hidden=128,
    vision_intermediate=384,
    vision_depth=4,
    vision_heads=2,
)
TOKENIZER_VOCAB = 1024  # an upper bound: BPE runs out of merges on the task's text first
MIN_PIXELS, MAX_PIXELS = 56 * 56, 112 * 112  # larger images are scaled down to 16 vision tokens


def build(seed: int, size: TinySize = TOYVQA_SIZE, data_version: int = 1):
    """Fresh (model in fp32, processor, tokenizer, special ids): the untrained bundled model
    (its tokenizer trained on the text of ToyVQA `data_version`)."""
    from transformers import AutoProcessor, Qwen2_5_VLForConditionalGeneration

    tokenizer, ids, vocab = qwen25vl_tokenizer(data.tokenizer_corpus(data_version), TOKENIZER_VOCAB)
    config = qwen25vl_config(size, ids, vocab)
    torch.manual_seed(seed)
    model = Qwen2_5_VLForConditionalGeneration(config).float()
    processor = qwen25vl_processor(tokenizer, MIN_PIXELS, MAX_PIXELS)
    # Train with the tokenizer exactly as transformers and vLLM load it from the saved folder: on
    # loading, transformers' Qwen2Tokenizer replaces the byte-level pre-tokenizer with Qwen2's
    # split pattern (digits one by one), so the in-memory tokenizer would give other prompt ids.
    with tempfile.TemporaryDirectory() as tmp:
        processor.save_pretrained(tmp)
        tokenizer.chat_template = QWEN_CHAT_TEMPLATE
        tokenizer.save_pretrained(tmp)
        processor = AutoProcessor.from_pretrained(tmp)
    return model, processor, processor.tokenizer, ids


class Collator:
    """Conversations (or single-question samples) -> a right-padded batch, labels on answers only.

    The first turn's prompt is the chat template with the generation prompt (exactly what is
    served, with the M-RoPE token types the processor gives), tokenized on its own with its <|image_pad|> expanded to the image's tokens as the
    processor does; each answer is its tokens and <|im_end|>, as the served model generates them;
    a later turn continues with the template's text for one more user message and the next
    generation prompt. `conversation_messages` gives the same conversation as chat messages: the
    template renders it to the same tokens (checked in the tests).
    """

    def __init__(self, processor, ids: dict[str, int]):
        self.processor = processor
        self.tok = processor.tokenizer
        self.image_token_id = ids["<|image_pad|>"]
        self.pad = ids["<|endoftext|>"]
        self.eos = ids["<|im_end|>"]
        self.image_pad = "<|image_pad|>"
        self._cache: dict[str, list[int]] = {}

    def _ids(self, text: str) -> list[int]:
        if text not in self._cache:
            self._cache[text] = self.tok(text, add_special_tokens=False)["input_ids"]
        return self._cache[text]

    def prompt_ids(self, question: str, n_image_tokens: int) -> list[int]:
        msgs = data.chat_messages(question, "image" if n_image_tokens else None)
        text = self.processor.apply_chat_template(msgs, add_generation_prompt=True)
        return self._ids(text.replace(self.image_pad, self.image_pad * n_image_tokens))

    def answer_ids(self, answer: str) -> list[int]:
        return self._ids(answer) + [self.eos]

    def next_turn_ids(self, question: str) -> list[int]:
        return self._ids(f"\n<|im_start|>user\n{question}<|im_end|>\n<|im_start|>assistant\n")

    @staticmethod
    def as_conversation(x) -> data.Conversation:
        if isinstance(x, data.Conversation):
            return x
        return data.Conversation(x.id, x.image, [(x.kind, x.question, x.answer)], x.scene)

    def __call__(self, items: list) -> dict[str, torch.Tensor]:
        convs = [self.as_conversation(x) for x in items]
        images = [c.image for c in convs if c.image is not None]
        batch: dict[str, torch.Tensor] = {}
        n_tok = 0
        if images:
            pix = self.processor.image_processor(images=images, return_tensors="pt")
            batch["pixel_values"] = pix["pixel_values"]
            batch["image_grid_thw"] = pix["image_grid_thw"]
            merge = self.processor.image_processor.merge_size
            n_tok = int(pix["image_grid_thw"][0].prod()) // (merge * merge)
            assert all(int(g.prod()) // (merge * merge) == n_tok for g in pix["image_grid_thw"])
        seqs, labels = [], []
        for c in convs:
            seq: list[int] = []
            lab: list[int] = []
            for i, (_, q, a) in enumerate(c.turns):
                p = self.prompt_ids(q, n_tok if c.image is not None else 0) if i == 0 else self.next_turn_ids(q)
                ans = self.answer_ids(a)
                seq += p + ans
                lab += [-100] * len(p) + ans
            seqs.append(seq)
            labels.append(lab)
        width = max(map(len, seqs))
        batch["input_ids"] = torch.tensor([s + [self.pad] * (width - len(s)) for s in seqs])
        batch["attention_mask"] = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in seqs])
        # 1 marks image tokens, as the processor does: without it the model cannot build the 3-D
        # M-RoPE positions of the image tokens and silently falls back to 1-D positions, which is
        # not what generate() and vLLM use
        batch["mm_token_type_ids"] = (batch["input_ids"] == self.image_token_id).int()
        # labels are shifted inside the model's loss: label[t] is predicted at position t-1
        batch["labels"] = torch.tensor([lab + [-100] * (width - len(lab)) for lab in labels])
        return batch


def conversation_messages(conv: data.Conversation) -> list[dict]:
    """The conversation as chat messages (user turns, assistant answers)."""
    msgs: list[dict] = []
    for i, (_, q, a) in enumerate(conv.turns):
        msgs += data.chat_messages(q, conv.image if i == 0 else None)
        msgs.append({"role": "assistant", "content": a})
    return msgs


def teacher_forced_accuracy(
    model, collator: Collator, samples: list[data.Sample], batch_size: int = 64
) -> tuple[float, dict[str, float]]:
    """Share of samples whose every answer token (and <|im_end|>) is the argmax given the prefix:
    exactly the share that greedy decoding answers verbatim, at the cost of one forward.
    Returns (overall, {kind: accuracy})."""
    model.eval()
    right: dict[str, list[int]] = {}
    with torch.no_grad():
        for i in range(0, len(samples), batch_size):
            chunk = samples[i : i + batch_size]
            b = collator(chunk)
            logits = model(**{k: v for k, v in b.items() if k != "labels"}).logits
            pred = logits[:, :-1].argmax(-1)
            lab = b["labels"][:, 1:]
            ok = ((pred == lab) | (lab == -100)).all(dim=1)
            for s, good in zip(chunk, ok.tolist()):
                right.setdefault(s.kind, []).append(int(good))
    model.train()
    overall = sum(map(sum, right.values())) / len(samples)
    return overall, {k: sum(v) / len(v) for k, v in sorted(right.items())}


# --- stage 1: vision-tower pretraining --------------------------------------------------------
# Trained only through the answers, a fresh vision tower learns shapes and words very slowly: the
# gradient reaches it through the language model's attention, which does not yet know where to
# look (measured: shape and word questions stayed at chance for 1,000+ steps). So, as real VLMs
# start from a pretrained vision encoder, stage 1 trains the vision tower (with a linear probe
# that is then thrown away) to tell, for each of the 16 merged tokens, which shape, colour and
# word lies in its grid cell, and the cell's row and column (the tower has only relative 2-D
# RoPE, so absolute position must be learnt); it learns all that in a few hundred steps. Stage 2
# then trains the whole model on the answers only.
N_SHAPE, N_COLOUR, N_WORD = 1 + len(data.SHAPES), 1 + len(data.COLOURS), 1 + len(data.WORDS)
HEADS = (N_SHAPE, N_COLOUR, N_WORD, data.GRID, data.GRID)  # shape, colour, word, row, column
HEAD_NAMES = ("shape", "colour", "word", "row", "column")


def token_targets(scene: list[dict]) -> torch.Tensor:
    """(16, 5) class ids per merged token (raster order): shape, colour, word (0 = none), row, column."""
    t = torch.zeros(data.GRID * data.GRID, 5, dtype=torch.long)
    t[:, 3] = torch.arange(data.GRID * data.GRID) // data.GRID
    t[:, 4] = torch.arange(data.GRID * data.GRID) % data.GRID
    if scene and ("cx" in scene[0] or "y0" in scene[0]):
        return _token_targets_v2(scene, t)
    colours = list(data.COLOURS)
    for o in scene:
        if "shape" in o:
            i = o["row"] * data.GRID + o["col"]
            t[i, 0] = 1 + data.SHAPES.index(o["shape"])
            t[i, 1] = 1 + colours.index(o["colour"])
        else:  # a word: every cell it covers by 4 px or more
            for c in range(data.GRID):
                if min(o["x1"], (c + 1) * data.CELL) - max(o["x0"], c * data.CELL) >= 4:
                    i = o["row"] * data.GRID + c
                    t[i, 1] = 1 + colours.index(o["colour"])
                    t[i, 2] = 1 + data.WORDS.index(o["word"])
    return t


def _overlap(a0: float, a1: float, b0: float, b1: float) -> float:
    return max(0.0, min(a1, b1) - max(a0, b0))


def _token_targets_v2(scene: list[dict], t: torch.Tensor) -> torch.Tensor:
    """Version 2 moves shapes across cell borders and words across rows: a token is labelled with
    the object that covers the largest part of its cell, if it covers at least 4 x 4 px of it (a
    shape by its bounding box), not just with the object whose centre lies in it: labelled by the
    centre alone, a token half covered by a shape is taught to hold nothing. (Measured, 200 steps of
    32 v2 pictures, this batch's accuracy on labelled tokens: centre-only targets shape 0.42, colour
    0.75, word 0.00; these targets, which include the harder half-covered tokens, 0.33, 0.85, 0.06.
    Version 1 reaches 1.0, 0.97, 0.95 by step 200: version 2's pictures need a longer stage 1.)"""
    colours = list(data.COLOURS)
    for i in range(data.GRID * data.GRID):
        r, c = divmod(i, data.GRID)
        cx0, cy0 = c * data.CELL, r * data.CELL
        best, best_area = None, 0.0
        for o in scene:
            if "shape" in o:
                box = (o["cx"] - o["r"], o["cy"] - o["r"], o["cx"] + o["r"], o["cy"] + o["r"])
            else:
                box = (o["x0"], o["y0"], o["x1"], o["y1"])
            ox = _overlap(box[0], box[2], cx0, cx0 + data.CELL)
            oy = _overlap(box[1], box[3], cy0, cy0 + data.CELL)
            if ox >= 4 and oy >= 4 and ox * oy > best_area:
                best, best_area = o, ox * oy
        if best is None:
            continue
        t[i, 1] = 1 + colours.index(best["colour"])
        if "shape" in best:
            t[i, 0] = 1 + data.SHAPES.index(best["shape"])
        else:
            t[i, 2] = 1 + data.WORDS.index(best["word"])
    return t


# Options of the vision pretraining for version 2 (issue 17; off by default, so earlier commands
# run their recipes):
# - word target "picture": every token of a word picture is labelled with the word (the tower's
#   attention is global, so each token can know it), instead of the tokens the word covers
#   ("covered"; a token that sees one letter cannot tell the word).
# - a centre head: the shape class at the token of each shape's centre only, 0 elsewhere (version 2's
#   shapes spill into up to 4 tokens; counting needs one token per shape).
# - a word curriculum (HOLD, RAMP): word pictures placed near a cell's left edge for HOLD steps,
#   then moved ever more freely (data.draw_word_scene_placed, jitter growing to CELL over RAMP steps), then
#   placed anywhere (version 2's words).
WORD_TARGETS = ("covered", "picture")
CENTRE_NAME = "centre"


def token_targets_v2b(scene: list[dict], word_target: str = "covered", centre: bool = False) -> torch.Tensor:
    """`token_targets` with the version 2 options above: (16, 5), or (16, 6) with the centre head's
    class last."""
    if word_target not in WORD_TARGETS:
        raise ValueError(f"word target must be one of {WORD_TARGETS}, not {word_target!r}")
    t = token_targets(scene)
    words = [o for o in scene if "word" in o]
    if word_target == "picture" and words:
        t[:, 2] = 1 + data.WORDS.index(words[0]["word"])
    if not centre:
        return t
    c = torch.zeros(data.GRID * data.GRID, 1, dtype=torch.long)
    for o in scene:
        if "shape" in o:
            c[o["row"] * data.GRID + o["col"], 0] = 1 + data.SHAPES.index(o["shape"])
    return torch.cat([t, c], dim=1)


def word_jitter_at(step: int, curriculum: tuple[int, int] | None) -> float | None:
    """The curriculum's word jitter (px) at `step`, or None once words go anywhere (or without one)."""
    if curriculum is None:
        return None
    hold, ramp = curriculum
    if step < hold:
        return 0.0
    if step >= hold + ramp:
        return None
    return data.CELL * (step - hold) / max(1, ramp)


@dataclass
class Progress:
    """Where one stage's loop stands: steps done, its records and running loss, and (stage 1)
    its own optimizer. A checkpoint saves it; a resumed run passes it back to continue."""

    step: int = 0
    history: list[dict] = field(default_factory=list)
    loss_avg: float | None = None
    aux_history: list[dict] = field(default_factory=list)
    optimizer: Any = None  # stage 1's optimizer (the later stages share the model's)
    optimizer_state: dict | None = None  # to load into it on resuming

    def to_state(self) -> dict:
        opt = self.optimizer.state_dict() if self.optimizer is not None else self.optimizer_state
        return {"step": self.step, "history": self.history, "loss_avg": self.loss_avg,
                "aux_history": self.aux_history, "optimizer_state": opt}  # fmt: skip

    @classmethod
    def from_state(cls, state: dict) -> "Progress":
        return cls(**state)


OnStep = Callable[[Progress], None]  # called after every step (the run checkpoints from it)


class VisionProbe(torch.nn.Module):
    """The stage-1 linear probe on the merged vision tokens: one classifier per target (shape,
    colour, word, row, column, and the centre head if asked) and the targets it is trained on.
    Kept after stage 1 when `--vision-aux-weight` keeps training the tower through it in the later
    stages (the probe is never saved with the model)."""

    def __init__(self, width: int, word_target: str = "covered", centre_head: bool = False):
        super().__init__()
        token_targets_v2b([], word_target)  # a bad word target fails here, not at the first step
        self.heads = HEADS + ((N_SHAPE,) if centre_head else ())
        self.names = HEAD_NAMES + ((CENTRE_NAME,) if centre_head else ())
        self.word_target, self.centre_head = word_target, centre_head
        self.linear = torch.nn.Linear(width, sum(self.heads))

    def targets(self, scenes: list[list[dict]]) -> torch.Tensor:
        """(16 * len(scenes), len(heads)) class ids, the pictures' tokens in order."""
        t = [token_targets_v2b(s, self.word_target, self.centre_head) for s in scenes]  # version 1's too
        return torch.stack(t).view(-1, len(self.heads))

    def loss(self, tokens: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """The summed cross-entropy of every head on the merged tokens, and each head's logits."""
        parts = self.linear(tokens).split(list(self.heads), dim=-1)
        return sum(torch.nn.functional.cross_entropy(lg, target[:, k]) for k, lg in enumerate(parts)), list(parts)

    def accuracy(self, parts: list[torch.Tensor], target: torch.Tensor) -> list[float]:
        """Each head's accuracy on the tokens that hold something (row and column: on every token)."""
        acc = []
        with torch.no_grad():
            for k, lg in enumerate(parts):
                m = target[:, k] > 0 if k in (0, 1, 2, 5) else torch.ones_like(target[:, k], dtype=torch.bool)
                acc.append((lg.argmax(-1)[m] == target[m, k]).float().mean().item() if m.any() else float("nan"))
        return acc


def pretrain_vision(
    model, processor, steps: int, batch_size: int, lr: float, weight_decay: float, data_seed: int, data_version: int = 1,
    word_p: float | None = None, word_target: str = "covered", centre_head: bool = False,
    word_curriculum: tuple[int, int] | None = None, probe: VisionProbe | None = None,
    progress: Progress | None = None, on_step: OnStep | None = None,
) -> list[dict]:  # fmt: skip
    """Stage 1: the vision tower and `probe` (a fresh one unless given) on the probe's targets
    (from `progress` on, if given: a resumed run)."""
    visual = model.model.visual
    if probe is None:
        probe = VisionProbe(model.config.vision_config.out_hidden_size, word_target, centre_head)
    params = list(visual.parameters()) + list(probe.parameters())
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, betas=(0.9, 0.98))
    progress = progress or Progress()
    if progress.optimizer_state is not None:
        opt.load_state_dict(progress.optimizer_state)
    progress.optimizer, history, t0 = opt, progress.history, time.time()
    visual.train()
    for step in range(progress.step, steps):
        for g in opt.param_groups:
            g["lr"] = lr_at(step, steps, lr, max(1, steps // 20))
        jitter = word_jitter_at(step, word_curriculum)
        pics = [data.make_picture(step * batch_size + j, data_seed, word_p=word_p, version=data_version, word_jitter=jitter)
                for j in range(batch_size)]  # fmt: skip
        pix = processor.image_processor(images=[p[0] for p in pics], return_tensors="pt")
        target = probe.targets([p[1] for p in pics])
        out = visual(pix["pixel_values"], grid_thw=pix["image_grid_thw"])
        loss, parts = probe.loss(out.pooler_output, target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        if step % 50 == 49 or step == steps - 1:
            acc = probe.accuracy(parts, target)
            history.append({"step": step + 1, "loss": loss.item(), **dict(zip(probe.names, acc)),
                            **({"word_jitter": jitter} if word_curriculum else {})})  # fmt: skip
            accs = " ".join(f"{n} {a:.3f}" for n, a in zip(probe.names, acc))
            print(f"vision step {step + 1:4d} loss {loss.item():.4f} cell accuracy (this batch): {accs} ({time.time() - t0:.0f} s)", flush=True)
        progress.step = step + 1
        if on_step:
            on_step(progress)
    return history


class VisionAux:
    """The stage-1 probe's loss kept on in the later stages (`--vision-aux-weight`): the tower
    sees every conversation's picture anyway, so each step also trains it on that picture's
    dense targets, at the cost of one small linear layer. Without it the tower is trained only
    through the answers, which reach few of its tokens (a word question, the word's).

    Catches the merged tokens of the model's own vision forward (a hook), so nothing runs twice."""

    def __init__(self, model, probe: VisionProbe, weight: float):
        self.probe, self.weight, self.tokens = probe, weight, None
        self.sums: dict[str, float] = {}
        self.n = 0

        def keep(_module, _inputs, output):
            self.tokens = output.pooler_output  # the merged tokens, all pictures in order

        self.hook = model.model.visual.register_forward_hook(keep)

    def loss(self, convs: list[data.Conversation]) -> torch.Tensor:
        """The weighted probe loss on the pictures of the forward just run (0 without pictures)."""
        tokens, self.tokens = self.tokens, None
        scenes = [c.scene for c in convs if c.image is not None]
        if tokens is None or not scenes:
            return torch.zeros(())
        target = self.probe.targets(scenes)
        loss, parts = self.probe.loss(tokens, target)
        for name, a in zip(self.probe.names, self.probe.accuracy(parts, target)):
            if a == a:  # not NaN
                self.sums[name] = self.sums.get(name, 0.0) + a
        self.n += 1
        return self.weight * loss

    def report(self) -> dict[str, float]:
        """Each head's mean batch accuracy since the last report."""
        out = {k: round(v / max(1, self.n), 4) for k, v in self.sums.items()}
        self.sums, self.n = {}, 0
        return out

    def remove(self) -> None:
        self.hook.remove()
        self.tokens = None


# --- alignment stage (optional, version 2): "describe the picture" ---------------------------------
# The question kinds that need the language model to find a named object among the 16 image
# tokens (colour of a named shape, counts of a named shape, position) stayed at chance for
# hundreds to thousands of steps of question training (BENCHMARKS.md). A caption names every
# object with its colour and quadrant, so each step supervises all of them at once: the
# language model learns to read the image tokens before it is asked about them.


def answer_step(model, collator: Collator, opt, convs: list[data.Conversation], aux: VisionAux | None) -> float:
    """One optimizer step of the alignment and question stages on `convs`: the answers' loss (with
    `aux`, plus the vision probe's), clipped to norm 1; returns the answers' loss."""
    loss = model(**collator(convs)).loss
    total = loss + aux.loss(convs) if aux else loss
    opt.zero_grad(set_to_none=True)
    total.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    return loss.item()


def running_mean(avg: float | None, x: float, rate: float) -> float:
    """The loss printed: an exponential moving average that moves `rate` of the way to `x`."""
    return x if avg is None else (1 - rate) * avg + rate * x


def align(
    model, collator: Collator, opt, steps: int, batch_size: int, lr: float, data_seed: int, aux: VisionAux | None = None,
    progress: Progress | None = None, on_step: OnStep | None = None,
) -> list[dict]:  # fmt: skip
    """`steps` steps of caption conversations (the model's trainable parameters, answers only;
    with `aux`, plus the vision probe's loss on the pictures; from `progress` on, if given)."""
    progress = progress or Progress()
    history, t0 = progress.history, time.time()
    warmup = max(1, steps // 20)
    for step in range(progress.step, steps):
        for g in opt.param_groups:
            g["lr"] = lr_at(step, steps, lr, warmup)
        convs = [data.make_caption_conversation(step * batch_size + j, data_seed) for j in range(batch_size)]
        progress.loss_avg = loss_avg = running_mean(progress.loss_avg, answer_step(model, collator, opt, convs, aux), 0.05)
        if step % 50 == 49 or step == steps - 1:
            el = time.time() - t0
            probe = {"vision_probe": aux.report()} if aux else {}
            history.append({"step": step + 1, "loss": loss_avg, "time_s": round(el, 1), **probe})
            print(f"align step {step + 1:5d} loss {loss_avg:.4f} {el:7.1f} s {probe}", flush=True)
        progress.step = step + 1
        if on_step:
            on_step(progress)
    return history


# --- stage 2: the whole model on the answers ---------------------------------------------------


def lr_at(step: int, steps: int, peak: float, warmup: int, floor: float = 0.05) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    t = (step - warmup) / max(1, steps - warmup)
    return peak * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * t)))


def train_questions(
    model, collator: Collator, opt, args: argparse.Namespace, kind_weights: dict[str, float] | None,
    val: list[data.Sample], aux: VisionAux | None = None, progress: Progress | None = None, on_step: OnStep | None = None,
) -> list[dict]:  # fmt: skip
    """Stage 2: `args.steps` steps of training conversations, answers only (with `aux`, plus the
    vision probe's loss), scored on `val` (teacher-forced) every `args.eval_every` steps."""
    progress = progress or Progress()
    history, t_loop = progress.history, time.time()
    for step in range(progress.step, args.steps):
        for g in opt.param_groups:
            g["lr"] = lr_at(step, args.steps, args.lr, args.warmup)
        convs = [
            data.make_conversation("train", step * args.batch_size + j, args.data_seed, args.max_turns,
                                   version=args.data_version, kind_weights=kind_weights, augment_p=args.augment_p)
            for j in range(args.batch_size)
        ]  # fmt: skip
        progress.loss_avg = loss_avg = running_mean(progress.loss_avg, answer_step(model, collator, opt, convs, aux), 0.02)
        if step % 50 == 0 or step == args.steps - 1:
            el = time.time() - t_loop
            probe_acc = ""
            if aux:
                progress.aux_history.append({"step": step + 1, **aux.report()})
                probe_acc = f" vision probe {progress.aux_history[-1]}"
            print(f"step {step:5d} loss {loss_avg:.4f} lr {opt.param_groups[0]['lr']:.2e} {el:7.1f} s{probe_acc}", flush=True)
        if (step + 1) % args.eval_every == 0 or step == args.steps - 1:
            acc, per_kind = teacher_forced_accuracy(model, collator, val)
            # time_s: since this process entered the stage (a resumed run's totals are in Clock)
            history.append({"step": step + 1, "loss": loss_avg, "time_s": round(time.time() - t_loop, 1),
                            "val_acc": acc, "val_per_kind": per_kind})  # fmt: skip
            kinds = " ".join(f"{k}={v:.2f}" for k, v in per_kind.items())
            print(f"== step {step + 1}: validation accuracy {acc:.4f} {kinds}", flush=True)
        progress.step = step + 1
        if on_step:
            on_step(progress)
    return history


STAGES = ("vision", "align", "questions")


class Clock:
    """Wall and CPU seconds per stage ("start": building the model; "end": saving and scoring),
    carried over a resumed run's checkpoints. CPU seconds: on a machine shared with other jobs
    the wall time per step varies several-fold, the CPU time much less (what predicts a run on an
    idle core)."""

    def __init__(self, saved: dict | None = None):
        names = ("start",) + STAGES + ("end",)
        self.wall = dict(saved["wall"]) if saved else dict.fromkeys(names, 0.0)
        self.cpu = dict(saved["cpu"]) if saved else dict.fromkeys(names, 0.0)
        self.resumed = saved["resumed"] + 1 if saved else 0
        self._t, self._c = time.time(), time.process_time()

    def lap(self, stage: str) -> dict:
        """Adds the time since the last lap to `stage`; returns the state to checkpoint."""
        t, c = time.time(), time.process_time()
        self.wall[stage] += t - self._t
        self.cpu[stage] += c - self._c
        self._t, self._c = t, c
        return {"wall": dict(self.wall), "cpu": dict(self.cpu), "resumed": self.resumed}


REPO = Path(__file__).resolve().parents[2]


def command_line(argv: list[str], out: Path) -> str:
    """The training command as run, with the output folder relative to the repository root."""
    shown, skip = [], False
    for a in argv:
        if skip:
            skip = False
            continue
        if a == "--output":
            skip = True
            continue
        if a.startswith("--output="):
            continue
        shown.append(a)
    try:
        rel = out.resolve().relative_to(REPO)
        where = "$REPO/.venv/bin/python"  # $REPO: the repository root
        out_s = f"$REPO/{rel}"
    except ValueError:
        where, out_s = "python", str(out)
    return " ".join([where, "-m splitq_toyvqa.train --output", out_s, *shown])


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} logical CPUs, {platform.system()} {platform.machine()}, torch {torch.__version__}"


MODEL_CARD = """# ToyVQA Qwen2.5-VL ({params_m:.2f} M parameters)

A small model of the real Qwen2.5-VL architecture (`Qwen2_5_VLForConditionalGeneration`; vLLM loads
it as `Qwen2_5_VLForConditionalGeneration` too), trained from scratch on ToyVQA, the synthetic
visual question-answering task of `splitq_toyvqa.data`: 112x112 pictures of coloured
shapes (1-3) on a 4x4 grid or of a short printed word, with questions about colours, shapes, counts,
positions and the word, plus text-only questions (small arithmetic, number words, opposites).
Answers are one or two words. It is the bundled model of splitq-vllm: it answers well enough in
16 bits that quantization damage shows.

| | |
|---|---|
| language model | {layers} layers, hidden {hidden}, {heads} heads x {head_dim} (GQA, {kv_heads} KV heads), MLP {intermediate}, vocab {vocab}, M-RoPE sections {mrope} |
| vision tower | {vdepth} blocks, hidden {vhidden}, {vheads} heads x {vhead_dim}, MLP {vinter}, 14 px patches, 2x2 merge -> 16 tokens per 112x112 image |
| parameters | {params} ({params_m:.2f} M), stored in bfloat16 |
| tokenizer | byte-level BPE trained on the task's text ({tok_vocab} tokens), Qwen special tokens, `<\\|im_end\\|>` ends an answer |

## Training

```bash
{command}
```

{data}Stage 1: {vsteps} steps of {vbatch} pictures training the vision tower with a linear probe per
merged token (shape, colour, word, row, column of its grid cell; the probe is then dropped).
{stage1}{align}Stage 2: {steps} steps of {batch} conversations ({samples} conversations of 1-{turns} questions
about one picture or text-only, each drawn once){frozen}{stage2}, AdamW (lr {lr},
weight decay {wd}), {warmup} warm-up steps then cosine decay, fp32, loss on the answer tokens only,
seed {seed}. Wall time {wall_min:.1f} min on {machine}, {threads} threads (date {date}).

## Accuracy (greedy decoding, exact match after normalisation)

| split | samples | accuracy |
|---|---|---|
| validation (fp32, end of training) | {val_n} | {val_acc:.3f} |
| test, this bfloat16 checkpoint, transformers | {test_n} | {test_acc:.3f} |
{slices}
Per question kind on the test split{slice_names}:

{per_kind}

Score it again: `python -m splitq_toyvqa.evaluate --model models/toyvqa-qwen25vl{version_flag}`.
"""


def _cell(correct_n: tuple[int, int] | None) -> str:
    return "" if correct_n is None else f"{correct_n[0] / correct_n[1]:.3f} ({correct_n[0]}/{correct_n[1]})"


def write_model_card(out: Path, log: dict, config, tokenizer_size: int, result, slices: dict | None = None) -> None:
    """README.md of a trained model folder, from its training log and its test result
    (`slices`: {split: EvalResult} of version 2's held-out slices)."""
    a, t, v = log["args"], config.text_config, config.vision_config
    version = a.get("data_version", 1)
    align = ""
    if a.get("align_steps"):
        align = (f"Alignment: {a['align_steps']} steps of {a['align_batch_size']} \"describe the picture\" conversations\n"
                 "(ToyVQA v2 captions: each shape's colour, shape and quadrant, or the word and its colour), answers only.\n")  # fmt: skip
    data_line = f"Data: ToyVQA version {version} (`--data-version {version}`).\n" if version != 1 else ""
    stage1 = []
    if a.get("vision_word_p") is not None:
        stage1.append(f"{a['vision_word_p']:.2f} of the pictures are word pictures")
    if a.get("vision_word_target") == "picture":
        stage1.append("the word probe labels every token of a word picture")
    if a.get("vision_centre_head"):
        stage1.append("a centre probe labels each shape's centre token alone")
    if a.get("vision_word_curriculum"):
        hold, ramp = a["vision_word_curriculum"].split(",")
        stage1.append(f"words near a cell's left edge for {hold} steps, then placed ever more freely over {ramp} steps, then anywhere")
    stage1_line = ("Stage 1 options: " + "; ".join(stage1) + ".\n") if stage1 else ""
    stage2 = ""
    if a.get("kind_weights"):
        stage2 += f", question-kind weights {a['kind_weights']} (others as data.KINDS)"
    if a.get("augment_p"):
        stage2 += f", {a['augment_p']:.2f} of the training questions reworded (data.augment_question)"
    if a.get("vision_aux_weight"):
        stage2 += f", the stage-1 probe's loss kept on the pictures (weight {a['vision_aux_weight']}, alignment too)"
    rows = "".join(f"| {name}, bfloat16, transformers | {r.n} | {r.accuracy:.3f} |\n" for name, r in (slices or {}).items())
    columns = {"test" if slices else "accuracy": result, **(slices or {})}
    per_kind = "| kind | " + " | ".join(columns) + " |\n|---|" + "---|" * len(columns) + "\n" + "\n".join(
        f"| {k} | " + " | ".join(_cell(r.per_kind().get(k)) for r in columns.values()) + " |" for k in result.per_kind()
    )
    n_params = log["parameters"]
    card = MODEL_CARD.format(
        params=n_params, params_m=n_params / 1e6, layers=t.num_hidden_layers, hidden=t.hidden_size,
        heads=t.num_attention_heads, head_dim=t.hidden_size // t.num_attention_heads, kv_heads=t.num_key_value_heads,
        intermediate=t.intermediate_size, vocab=t.vocab_size, mrope=t.rope_parameters["mrope_section"],
        vdepth=v.depth, vhidden=v.hidden_size, vheads=v.num_heads, vhead_dim=v.hidden_size // v.num_heads,
        vinter=v.intermediate_size, tok_vocab=tokenizer_size, command=log["command"],
        vsteps=a["vision_steps"], vbatch=a["vision_batch_size"], turns=a["max_turns"],
        frozen=", vision tower frozen but its merger" if a.get("freeze_vision") else "",
        steps=a["steps"], batch=a["batch_size"], samples=a["steps"] * a["batch_size"], lr=a["lr"],
        wd=a["weight_decay"], warmup=a["warmup"], seed=a["seed"], wall_min=log["wall_seconds"] / 60,
        machine=log["machine"], threads=a["threads"], date=a["date"], val_n=a["val_n"],
        val_acc=log["validation_accuracy_fp32"], test_n=result.n, test_acc=result.accuracy, per_kind=per_kind,
        align=align, slices=rows, data=data_line, stage1=stage1_line, stage2=stage2,
        slice_names=(" and on " + " and ".join(slices) + " (version 2's held-out slices)") if slices else "", version_flag="" if version == 1 else f" --data-version {version}",
    )  # fmt: skip
    (out / "README.md").write_text(card)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="Train the ToyVQA Qwen2.5-VL from scratch on the CPU.")
    ap.add_argument("--output", required=True)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--data-seed", type=int, default=data.DEFAULT_SEED)
    ap.add_argument("--steps", type=int, default=3000, help="stage 2 steps")
    ap.add_argument("--batch-size", type=int, default=32, help="conversations per step")
    ap.add_argument("--max-turns", type=int, default=6, help="questions per training conversation: 1..max")
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--weight-decay", type=float, default=0.05)
    ap.add_argument("--warmup", type=int, default=150)
    ap.add_argument("--vision-steps", type=int, default=500, help="stage 1 (vision-tower pretraining) steps")
    ap.add_argument("--vision-batch-size", type=int, default=32)
    # One thread by default: on the shared 2-core development machine, two OpenMP threads ran
    # 10-20x slower than one whenever other jobs held the cores (spinning barrier waits; measured
    # 1.1 s/step with one thread against 3-22 s/step with two), and one thread also makes the run
    # bit-reproducible on any machine with the same torch build (with one thread, float reductions
    # always run in the same order). --threads 2 is about 1.6x faster on an idle machine.
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--eval-every", type=int, default=500)
    ap.add_argument("--val-n", type=int, default=512)
    ap.add_argument("--test-n", type=int, default=None, help="test samples scored at the end (default: all)")
    ap.add_argument("--date", default=time.strftime("%Y-%m-%d"))
    ap.add_argument("--freeze-vision", action="store_true", help="stage 2 trains only the merger of the vision tower")
    ap.add_argument("--data-version", type=int, default=1, choices=data.VERSIONS,
                    help="ToyVQA version: 1 (the bundled model's data) or 2 (varied wordings and pictures)")
    ap.add_argument("--align-steps", type=int, default=0,
                    help="alignment-stage steps (\"describe the picture\", before the questions; needs --data-version 2)")
    ap.add_argument("--align-batch-size", type=int, default=32)
    # version 2 training-stream options (issue 17; the validation, test and held-out splits are unchanged)
    ap.add_argument("--vision-word-p", type=float, default=None,
                    help="share of word pictures in stage 1 (default: the word kinds' share of the image questions)")
    ap.add_argument("--vision-word-target", default="covered", choices=WORD_TARGETS,
                    help="stage-1 word label: on the tokens a word covers, or on every token of a word picture")
    ap.add_argument("--vision-centre-head", action="store_true",
                    help="stage 1 also labels each shape's centre token alone (a probe for counting)")
    ap.add_argument("--vision-word-curriculum", default=None, metavar="HOLD,RAMP",
                    help="stage-1 words near a cell edge for HOLD steps, then ever freer over RAMP steps (version 2)")
    ap.add_argument("--kind-weights", default=None, metavar="KIND=W,...",
                    help="stage-2 question-kind weights replacing data.KINDS' for the named kinds (version 2)")
    ap.add_argument("--augment-p", type=float, default=0.0,
                    help="stage-2 share of training questions reworded (data.augment_question; version 2)")
    ap.add_argument("--vision-aux-weight", type=float, default=0.0,
                    help="keep the stage-1 probe's loss, times this, in the alignment and question stages (0: off)")
    ap.add_argument("--checkpoint-every", type=int, default=100,
                    help="steps between checkpoints in OUTPUT.partial/ (the same command resumes from the last one)")
    args = ap.parse_args(argv)
    curriculum = kind_weights = None
    if args.data_version < 2 and (args.vision_word_curriculum or args.kind_weights or args.augment_p):
        ap.error("--vision-word-curriculum, --kind-weights and --augment-p need --data-version 2")
    if args.vision_word_curriculum:
        try:
            hold, ramp = (int(x) for x in args.vision_word_curriculum.split(","))
        except ValueError:
            ap.error("--vision-word-curriculum takes HOLD,RAMP (two step counts)")
        curriculum = (hold, ramp)
    if args.kind_weights:
        kind_weights = dict(data.KINDS)
        for item in args.kind_weights.split(","):
            k, _, w = item.partition("=")
            if k not in data.KINDS or not w:
                ap.error(f"--kind-weights: {item!r} is not KIND=WEIGHT with a kind of {sorted(data.KINDS)}")
            kind_weights[k] = float(w)
    if args.align_steps and args.data_version < 2:
        ap.error("--align-steps needs --data-version 2 (the captions are version 2's)")
    if args.steps < 1 or args.eval_every < 1:
        ap.error("--steps and --eval-every must be at least 1")

    torch.set_num_threads(args.threads)
    run = RunFolder(args.output)
    try:
        saved = run.load(vars(args))
    except ValueError as e:
        ap.error(str(e))
    clock = Clock(saved["timing"] if saved else None)
    model, processor, tokenizer, ids = build(args.seed, data_version=args.data_version)
    model.train()
    collator = Collator(processor, ids)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"parameters: {n_params} ({n_params / 1e6:.2f} M); vocab {model.config.text_config.vocab_size}", flush=True)
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embed" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "embed" not in n)]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=args.lr,
        betas=(0.9, 0.98),
        eps=1e-8,
    )
    probe = VisionProbe(model.config.vision_config.out_hidden_size, args.vision_word_target, args.vision_centre_head)
    aux = VisionAux(model, probe, args.vision_aux_weight) if args.vision_aux_weight > 0 else None
    progress = {stage: Progress() for stage in STAGES}
    stage = STAGES[0]
    if saved:
        stage = saved["stage"]
        progress = {k: Progress.from_state(v) for k, v in saved["progress"].items()}
        model.load_state_dict(saved["model"])
        probe.load_state_dict(saved["probe"])
        if aux:
            aux.sums, aux.n = saved["aux"]
        print(f"resuming {run.path}: {stage} stage, step {progress[stage].step}", flush=True)
    clock.lap("start")

    def checkpoint(stage_now: str, force: bool = False):
        def on_step(pr: Progress) -> None:
            if force or pr.step % args.checkpoint_every == 0:
                run.save({"args": vars(args), "stage": stage_now, "progress": {k: v.to_state() for k, v in progress.items()},
                          "model": model.state_dict(), "probe": probe.state_dict(), "opt": opt.state_dict(),
                          "aux": (aux.sums, aux.n) if aux else None, "timing": clock.lap(stage_now)})  # fmt: skip
        return on_step

    if stage == "vision":
        pretrain_vision(
            model, processor, args.vision_steps, args.vision_batch_size, args.lr, args.weight_decay, args.data_seed,
            args.data_version, args.vision_word_p, args.vision_word_target, args.vision_centre_head, curriculum, probe,
            progress["vision"], checkpoint("vision"),
        )  # fmt: skip
        progress["vision"].optimizer = progress["vision"].optimizer_state = None  # done with: not checkpointed
        clock.lap("vision")
        stage = "align"
        checkpoint(stage, force=True)(progress[stage])
    if aux:
        opt.add_param_group({"params": list(probe.parameters()), "weight_decay": args.weight_decay})
    if saved and saved["stage"] != "vision":
        opt.load_state_dict(saved["opt"])
    if args.freeze_vision:
        for n, p in model.model.visual.named_parameters():
            p.requires_grad_(n.startswith("merger."))
    if stage == "align":
        align(model, collator, opt, args.align_steps, args.align_batch_size, args.lr, args.data_seed, aux,
              progress["align"], checkpoint("align"))  # fmt: skip
        clock.lap("align")
        stage = "questions"
        checkpoint(stage, force=True)(progress[stage])
    val = data.load_split("validation", args.val_n, args.data_seed, args.data_version)
    train_questions(model, collator, opt, args, kind_weights, val, aux, progress["questions"], checkpoint("questions"))
    if aux:
        aux.remove()
    clock.lap("questions")

    out = run.fresh_model_dir()
    model.eval()
    val_acc = progress["questions"].history[-1]["val_acc"]
    bf16 = model.to(torch.bfloat16)
    save_qwen25vl_dir(out, bf16, processor, tokenizer, ids)
    result = evaluate_transformers(out, "test", args.test_n, args.data_seed, version=args.data_version)
    print(result.summary(), flush=True)
    slices = {}
    if args.data_version == 2:
        loaded = load_transformers(out)
        for split in data.HELD_OUT_SPLITS:
            slices[split] = evaluate_transformers(out, split, args.test_n, args.data_seed, model_and_processor=loaded, version=2)
            print(f"{split}: {slices[split].summary()}", flush=True)
    clock.lap("end")
    wall, cpu_s = clock.wall, clock.cpu
    log = {
        "command": command_line(argv if argv is not None else sys.argv[1:], run.output),
        "args": vars(args),
        "size": asdict(TOYVQA_SIZE),
        "parameters": n_params,
        "machine": machine(),
        "vision_pretraining_seconds": round(wall["start"] + wall["vision"], 1),
        **({"align_seconds": round(wall["align"], 1), "align_history": progress["align"].history} if args.align_steps else {}),
        "train_seconds": round(sum(wall[k] for k in ("start",) + STAGES), 1),
        "wall_seconds": round(sum(wall.values()), 1),
        "cpu_seconds_per_stage": {"vision": round(cpu_s["start"] + cpu_s["vision"], 1),
                                  **{k: round(cpu_s[k], 1) for k in ("align", "questions", "end")}},  # fmt: skip
        **({"resumed": clock.resumed} if clock.resumed else {}),
        "vision_history": progress["vision"].history,
        **({"vision_aux_history": progress["questions"].aux_history} if aux else {}),
        "history": progress["questions"].history,
        "validation_accuracy_fp32": val_acc,
        "test_bf16_transformers": result.to_json(),
        **{f"{split}_bf16_transformers": r.to_json() for split, r in slices.items()},
    }
    (out / "training_log.json").write_text(json.dumps(log, indent=1) + "\n")
    write_model_card(out, log, model.config, len(tokenizer), result, slices)
    wall_s = log["wall_seconds"]
    out = run.finish()
    print(f"saved {out} ({wall_s / 60:.1f} min)", flush=True)


if __name__ == "__main__":
    main()
