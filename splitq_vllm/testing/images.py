"""Real pictures for tests and benchmarks: coloured shapes drawn with PIL, PNG bytes, and small
captioned data sets in the layouts `splitq-calibrate` reads (ShareGPT4V JSON/JSONL, a folder)."""

from __future__ import annotations

import io
import json
from pathlib import Path

from PIL import Image, ImageDraw


def draw_image(kind: str = "circle", color=(220, 30, 30), size: int = 112) -> Image.Image:
    """A small real picture: one coloured shape on a white background."""
    img = Image.new("RGB", (size, size), (255, 255, 255))
    d = ImageDraw.Draw(img)
    box = (size // 4, size // 4, 3 * size // 4, 3 * size // 4)
    if kind == "circle":
        d.ellipse(box, fill=color)
    elif kind == "square":
        d.rectangle(box, fill=color)
    else:
        d.polygon([(size // 2, size // 4), (size // 4, 3 * size // 4), (3 * size // 4, 3 * size // 4)], fill=color)
    return img


def png_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


COLOURS = {"red": (220, 30, 30), "green": (30, 180, 30), "blue": (30, 30, 220), "yellow": (230, 210, 20)}
KINDS = ["circle", "square", "triangle"]


def captioned_images(n: int, size: int = 112, suffix: str = ""):
    """n (file name, PIL image, caption) triples, deterministic; `size` px square pictures,
    `suffix` appended to every caption (longer samples)."""
    out = []
    for i in range(n):
        colour = list(COLOURS)[i % len(COLOURS)]
        kind = KINDS[(i // len(COLOURS)) % len(KINDS)]
        caption = f"A {colour} {kind} on a white background." + suffix
        out.append((f"img{i:02d}.png", draw_image(kind, COLOURS[colour], size), caption))
    return out


def write_sharegpt(
    folder: Path, n: int = 8, name: str = "calib.jsonl", image_subdir: str = "images", size: int = 112,
    caption_suffix: str = "",
) -> Path:
    """A ShareGPT4V-style JSONL file with image paths relative to `folder` (PNG pictures of `size` px)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / image_subdir).mkdir(exist_ok=True)
    records = []
    for i, (fname, img, caption) in enumerate(captioned_images(n, size, caption_suffix)):
        img.save(folder / image_subdir / fname)
        records.append(
            {
                "id": f"sample-{i}",
                "image": f"{image_subdir}/{fname}",
                "conversations": [
                    {"from": "human", "value": "<image>\nWhat is in the picture?"},
                    {"from": "gpt", "value": caption},
                ],
            }
        )
    path = folder / name
    if name.endswith(".jsonl"):
        path.write_text("".join(json.dumps(r) + "\n" for r in records))
    else:
        path.write_text(json.dumps(records))
    return path


def write_folder(folder: Path, n: int = 4, sidecar: bool = True) -> Path:
    """A folder of images with captions: name.txt beside each image, or a metadata.jsonl."""
    folder.mkdir(parents=True, exist_ok=True)
    meta = []
    for fname, img, caption in captioned_images(n):
        img.save(folder / fname)
        if sidecar:
            (folder / fname).with_suffix(".txt").write_text(caption + "\n")
        else:
            meta.append({"file_name": fname, "caption": caption})
    if not sidecar:
        (folder / "metadata.jsonl").write_text("".join(json.dumps(m) + "\n" for m in meta))
    return folder
