"""Chat conversations with real pictures, in the OpenAI message format, for tests and benchmarks of
the serving path: one image, two images, text only, an image in a later turn."""

from __future__ import annotations

import base64
from typing import Any

from .images import draw_image, png_bytes


def image_part(png: bytes) -> dict[str, Any]:
    """An OpenAI-style image content part carrying a PNG as a data URL."""
    return {"type": "image_url", "image_url": {"url": "data:image/png;base64," + base64.b64encode(png).decode()}}


RED_CIRCLE = png_bytes(draw_image("circle", (220, 30, 30)))
BLUE_SQUARE = png_bytes(draw_image("square", (30, 30, 220)))
GREEN_TRIANGLE = png_bytes(draw_image("triangle", (30, 200, 30), size=84))

LONG_TEXT = (
    "Compare the two images. What is the difference between them? Which side is the square on? "
    "How many circles are there? What colour is the shape?"
)

# name -> (OpenAI-style messages for the server, PNGs in order)
CONVERSATIONS: dict[str, tuple[list[dict], list[bytes]]] = {
    "one_image": (
        [{"role": "user", "content": [image_part(RED_CIRCLE), {"type": "text", "text": "What is in this image?"}]}],
        [RED_CIRCLE],
    ),
    "two_images": (
        [
            {
                "role": "user",
                "content": [image_part(RED_CIRCLE), image_part(BLUE_SQUARE), {"type": "text", "text": LONG_TEXT}],
            }
        ],
        [RED_CIRCLE, BLUE_SQUARE],
    ),
    "text_only": ([{"role": "user", "content": "Hello! Tell me a short story about a cat."}], []),
    "image_last": (
        [
            {"role": "user", "content": "You are a helpful assistant. Describe the picture in one sentence."},
            {"role": "assistant", "content": "The answer is yes."},
            {"role": "user", "content": [{"type": "text", "text": "And this one?"}, image_part(GREEN_TRIANGLE)]},
        ],
        [GREEN_TRIANGLE],
    ),
}
