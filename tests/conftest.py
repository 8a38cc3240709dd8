"""Shared fixtures: tiny offline models (built once per session) and test images."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
from PIL import Image, ImageDraw

from splitq_calibration.tiny_models import build_tiny_llava, build_tiny_qwen25vl


@pytest.fixture(scope="session")
def tiny_qwen_dir(tmp_path_factory) -> Path:
    return build_tiny_qwen25vl(tmp_path_factory.mktemp("models") / "tiny-qwen25vl")


@pytest.fixture(scope="session")
def tiny_llava_dir(tmp_path_factory) -> Path:
    return build_tiny_llava(tmp_path_factory.mktemp("models") / "tiny-llava")


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
