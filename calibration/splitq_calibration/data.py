"""Calibration data: image + text samples through the model's own processor and chat template.

Three sources, one result (a list of `CalibSample`, each the processor's tensors for one
conversation plus its per-token text mask):

- a JSON or JSONL file in the ShareGPT4V layout (what MBQ and MASQuant calibrate on):
  `{"id": ..., "image": "coco/train2017/x.jpg", "conversations": [{"from": "human", "value":
  "<image>\\nDescribe the image."}, {"from": "gpt", "value": "<the caption>"}]}`; image paths are
  relative to `image_dir` (default: the file's folder); `image` may be a list;
- a folder of images with captions: `name.jpg` + `name.txt`, or a `metadata.jsonl` /
  `captions.jsonl` / `captions.json` with `file_name` and `caption` (or `text`); the user turn is
  the image and `prompt`, the assistant turn the caption;
- a Python list of samples: ShareGPT4V records, `{"image": PIL.Image | path | [...], "prompt":
  ..., "caption": ...}`, or `{"messages": [chat messages], "images": [...]}`.

The text mask is True for rows that are not image/video placeholder tokens (template and system
tokens included), the rule the serving path applies (model_layout.vision_token_ids).

Broken input raises CalibrationDataError naming the sample (its position and id) and the file,
or, with on_bad_sample="skip", is skipped with a warning.
"""

from __future__ import annotations

import json
import logging
import os
import random
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from splitq_vllm.model_layout import vision_token_ids

log = logging.getLogger("splitq_calibration")

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
CAPTION_FILES = ("metadata.jsonl", "captions.jsonl", "captions.json")
ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}


class CalibrationDataError(ValueError):
    """A calibration sample or data set that cannot be used; the message names it."""


@dataclass
class RawSample:
    """One conversation before processing: chat messages and the images they refer to, in order."""

    id: str
    messages: list[dict[str, Any]]
    images: list[Any] = field(default_factory=list)  # paths or PIL images
    source: str = ""

    def label(self, position: int | None = None) -> str:
        where = f" in {self.source}" if self.source else ""
        pos = f"sample {position} " if position is not None else "sample "
        return f"{pos}(id {self.id!r}{where})"


@dataclass
class CalibSample:
    """One processed sample: the processor's tensors (batch of 1) and its text mask (T,)."""

    id: str
    inputs: dict[str, torch.Tensor]
    text_mask: torch.Tensor

    @property
    def num_tokens(self) -> int:
        return int(self.text_mask.numel())

    @property
    def num_vision_tokens(self) -> int:
        return int((~self.text_mask).sum())


# ---------------------------------------------------------------------------------------------
# Raw samples from the three sources
# ---------------------------------------------------------------------------------------------


def _content(text: str) -> list[dict[str, Any]]:
    """ShareGPT4V text with `<image>` tags -> typed content parts (images where the tags are)."""
    parts: list[dict[str, Any]] = []
    for i, piece in enumerate(text.split("<image>")):
        if i > 0:
            parts.append({"type": "image"})
        if piece.strip():
            parts.append({"type": "text", "text": piece.strip()})
    return parts


def _sharegpt_sample(rec: Any, index: int, source: str, image_dir: Path | None) -> RawSample:
    sid = str(rec.get("id", index)) if isinstance(rec, dict) else str(index)
    where = f"sample {index} (id {sid!r} in {source})"
    if not isinstance(rec, dict):
        raise CalibrationDataError(f"{where}: expected an object, got {type(rec).__name__}")
    conv = rec.get("conversations")
    if not isinstance(conv, list) or not conv:
        raise CalibrationDataError(f"{where}: no 'conversations' list")
    images = rec.get("image", rec.get("images", []))
    images = [] if images is None else images if isinstance(images, list) else [images]
    refs = [_image_ref(im, image_dir) for im in images]
    messages: list[dict[str, Any]] = []
    tags = 0
    for turn in conv:
        if not isinstance(turn, dict) or "value" not in turn:
            raise CalibrationDataError(f"{where}: a conversation turn has no 'value'")
        role = ROLES.get(str(turn.get("from", turn.get("role", ""))).lower())
        if role is None:
            raise CalibrationDataError(f"{where}: unknown speaker {turn.get('from')!r} (expected human/gpt/system)")
        value = str(turn["value"])
        tags += value.count("<image>")
        messages.append({"role": role, "content": _content(value)})
    if tags == 0 and refs:  # no tag: the images open the first user turn
        first_user = next((m for m in messages if m["role"] == "user"), None)
        if first_user is None:
            raise CalibrationDataError(f"{where}: images but no human turn to attach them to")
        first_user["content"] = [{"type": "image"} for _ in refs] + first_user["content"]
    elif tags != len(refs):
        raise CalibrationDataError(f"{where}: {tags} <image> tag(s) but {len(refs)} image(s)")
    return RawSample(id=sid, messages=messages, images=refs, source=source)


def _image_ref(im: Any, image_dir: Path | None) -> Any:
    if isinstance(im, (str, os.PathLike)):
        p = Path(im)
        return p if p.is_absolute() or image_dir is None else image_dir / p
    return im  # a PIL image (checked when processed)


def _simple_sample(rec: dict[str, Any], index: int, source: str, image_dir: Path | None, prompt: str) -> RawSample:
    """{"image": ..., "prompt"/"question": ..., "caption"/"answer": ...} or {"messages", "images"}."""
    sid = str(rec.get("id", index))
    if "messages" in rec:
        images = rec.get("images", [])
        images = images if isinstance(images, list) else [images]
        return RawSample(sid, list(rec["messages"]), [_image_ref(i, image_dir) for i in images], source)
    images = rec.get("image", rec.get("images", []))
    images = [] if images is None else images if isinstance(images, list) else [images]
    question = rec.get("prompt", rec.get("question", prompt))
    answer = rec.get("caption", rec.get("answer", rec.get("text")))
    content = [{"type": "image"} for _ in images] + [{"type": "text", "text": str(question)}]
    messages = [{"role": "user", "content": content}]
    if answer is not None:
        messages.append({"role": "assistant", "content": [{"type": "text", "text": str(answer)}]})
    return RawSample(sid, messages, [_image_ref(i, image_dir) for i in images], source)


def _records_from_file(path: Path) -> list[Any]:
    text = path.read_text()
    if path.suffix == ".jsonl":
        out = []
        for n, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    out.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise CalibrationDataError(f"{path}:{n}: not valid JSON: {e}") from None
        return out
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise CalibrationDataError(f"{path}: not valid JSON: {e}") from None
    if isinstance(data, dict) and isinstance(data.get("data"), list):
        data = data["data"]
    if not isinstance(data, list):
        raise CalibrationDataError(f"{path}: expected a list of samples (ShareGPT4V layout)")
    return data


def _from_records(records: list[Any], source: str, image_dir: Path | None, prompt: str) -> list[RawSample]:
    out = []
    for i, rec in enumerate(records):
        if isinstance(rec, dict) and "conversations" in rec:
            out.append(_sharegpt_sample(rec, i, source, image_dir))
        elif isinstance(rec, dict):
            out.append(_simple_sample(rec, i, source, image_dir, prompt))
        elif isinstance(rec, RawSample):
            out.append(rec)
        else:
            raise CalibrationDataError(f"sample {i} in {source}: expected a dict, got {type(rec).__name__}")
    return out


def _from_folder(folder: Path, prompt: str) -> list[RawSample]:
    captions: dict[str, str] = {}
    for name in CAPTION_FILES:
        f = folder / name
        if f.is_file():
            for n, rec in enumerate(_records_from_file(f)):
                if not isinstance(rec, dict) or "file_name" not in rec:
                    raise CalibrationDataError(f"{f}: record {n} has no 'file_name'")
                cap = rec.get("caption", rec.get("text"))
                if cap is None:
                    raise CalibrationDataError(f"{f}: record {n} ({rec['file_name']}) has no 'caption' or 'text'")
                captions[str(rec["file_name"])] = str(cap)
            break
    images = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    listed = [folder / n for n in captions if not (folder / n).exists()]
    out = []
    for p in images + listed:
        cap = captions.get(p.name)
        if cap is None and p.with_suffix(".txt").is_file():
            cap = p.with_suffix(".txt").read_text().strip()
        rec = {"id": p.name, "image": p, "prompt": prompt}
        if cap is None:
            rec["_missing_caption"] = True
        else:
            rec["caption"] = cap
        out.append(rec)
    samples = []
    for i, rec in enumerate(out):
        s = _simple_sample(rec, i, str(folder), None, prompt)
        if rec.get("_missing_caption"):
            s.messages = []  # reported when the sample is prepared
        samples.append(s)
    return samples


def load_raw_samples(
    data: Any, image_dir: str | os.PathLike | None = None, prompt: str = "Describe this image in detail."
) -> list[RawSample]:
    """Raw samples from a JSON/JSONL file, a folder of captioned images, or a Python list."""
    if isinstance(data, (list, tuple)):
        return _from_records(list(data), "the given list", Path(image_dir) if image_dir else None, prompt)
    path = Path(data)
    if path.is_dir():
        return _from_folder(path, prompt)
    if not path.is_file():
        raise CalibrationDataError(f"data {path}: no such file or folder")
    if path.suffix not in (".json", ".jsonl"):
        raise CalibrationDataError(
            f"data {path}: expected a .json or .jsonl file (ShareGPT4V layout) or a folder of images"
        )
    base = Path(image_dir) if image_dir else path.parent
    return _from_records(_records_from_file(path), str(path), base, prompt)


# ---------------------------------------------------------------------------------------------
# Processing
# ---------------------------------------------------------------------------------------------


def _open_image(ref: Any, label: str):
    from PIL import Image, UnidentifiedImageError

    if isinstance(ref, Image.Image):
        return ref.convert("RGB")
    path = Path(ref)
    if not path.is_file():
        raise CalibrationDataError(f"{label}: image file {path} not found")
    try:
        with Image.open(path) as im:
            im.load()
            return im.convert("RGB")
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
        raise CalibrationDataError(f"{label}: cannot read image {path}: {e}") from None


def process_sample(raw: RawSample, processor, vision_ids: list[int], max_seq_len: int, label: str) -> CalibSample:
    """Chat template + processor for one sample; raises CalibrationDataError naming it."""
    if not raw.messages:
        raise CalibrationDataError(f"{label}: no caption (give name.txt beside the image or a captions file)")
    images = [_open_image(r, label) for r in raw.images]
    try:
        text = processor.apply_chat_template(raw.messages, tokenize=False, add_generation_prompt=False)
        kwargs = {"text": [text], "return_tensors": "pt"}
        if images:
            kwargs["images"] = images
        inputs = processor(**kwargs)
    except CalibrationDataError:
        raise
    except Exception as e:  # processors raise many kinds of errors for malformed input
        raise CalibrationDataError(f"{label}: the processor rejected the sample: {type(e).__name__}: {e}") from None
    ids = inputs["input_ids"]
    n = int(ids.shape[1])
    if n > max_seq_len:
        raise CalibrationDataError(
            f"{label}: {n} tokens, longer than max_seq_len {max_seq_len} "
            "(raise --max-seq-len, use smaller images, or drop the sample)"
        )
    text_mask = ~torch.isin(ids[0], torch.tensor(vision_ids))
    if images and bool(text_mask.all()):
        raise CalibrationDataError(
            f"{label}: has images but no image tokens after processing (chat template without image parts?)"
        )
    return CalibSample(id=raw.id, inputs=dict(inputs), text_mask=text_mask)


def prepare_samples(
    data: Any,
    processor,
    model_config,
    num_samples: int = 128,
    max_seq_len: int = 2048,
    seed: int = 0,
    image_dir: str | os.PathLike | None = None,
    prompt: str = "Describe this image in detail.",
    on_bad_sample: str = "error",
) -> list[CalibSample]:
    """Shuffle (seeded), then process samples in that order until `num_samples` are usable.

    on_bad_sample="error" stops at the first broken sample; "skip" warns and takes the next one.
    """
    raws = data if isinstance(data, list) and data and all(isinstance(r, RawSample) for r in data) else None
    raws = raws or load_raw_samples(data, image_dir, prompt)
    where = "the given list" if isinstance(data, (list, tuple)) else str(data)
    if not raws:
        raise CalibrationDataError(f"data {where}: no samples (empty data set)")
    order = list(range(len(raws)))
    random.Random(seed).shuffle(order)
    vids = vision_token_ids(model_config)
    out: list[CalibSample] = []
    skipped = 0
    for pos in order:
        if len(out) >= num_samples:
            break
        raw = raws[pos]
        label = raw.label(pos)
        try:
            out.append(process_sample(raw, processor, vids, max_seq_len, label))
        except CalibrationDataError as e:
            if on_bad_sample != "skip":
                raise
            skipped += 1
            warnings.warn(f"skipping {e}", stacklevel=2)
            log.warning("skipping %s", e)
    if not out:
        raise CalibrationDataError(f"data {where}: no usable samples ({skipped} skipped)")
    if len(out) < num_samples:
        log.warning(
            "using %d calibration samples (%d requested, %d in the data, %d skipped)",
            len(out),
            num_samples,
            len(raws),
            skipped,
        )
    return out
