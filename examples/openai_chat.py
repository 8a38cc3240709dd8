"""Ask a SplitQ model served by vLLM about images, through the official `openai` client.

    # one local image
    python examples/openai_chat.py --image photo.jpg "What is in this picture?"
    # an image URL (the server downloads it), answer streamed token by token
    python examples/openai_chat.py --image https://example.com/cat.jpg --stream "Describe the image."
    # two images in one question
    python examples/openai_chat.py --image left.png --image right.png "What differs between the two images?"

--image takes a local file (sent inline as a base64 data URL), an http(s) URL (fetched by the
server, which must be able to reach it) or a data URL; images go before the question, in order.

Where the server is: --base-url (default $OPENAI_BASE_URL or http://localhost:8000/v1); the API
key: --api-key (default $VLLM_API_KEY, $OPENAI_API_KEY, or "EMPTY" for a server without one);
the model: --model (default: the first model the server lists, i.e. its --served-model-name).
Needs only `pip install openai`.
"""

from __future__ import annotations

import argparse
import base64
import mimetypes
import os
import sys
from pathlib import Path


def image_part(image: str) -> dict:
    """An OpenAI `image_url` content part for a local file, an http(s) URL or a data URL."""
    if image.startswith(("http://", "https://", "data:")):
        url = image
    else:
        path = Path(image)
        if not path.is_file():
            raise SystemExit(f"error: image file not found: {image}")
        mime = mimetypes.guess_type(path.name)[0] or "image/png"
        url = f"data:{mime};base64," + base64.b64encode(path.read_bytes()).decode("ascii")
    return {"type": "image_url", "image_url": {"url": url}}


def make_client(base_url: str, api_key: str, timeout: float = 600.0):
    import openai

    return openai.OpenAI(base_url=base_url, api_key=api_key, timeout=timeout)


def default_model(client) -> str:
    models = client.models.list().data
    if not models:
        raise SystemExit("error: the server lists no model")
    return models[0].id


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("question", nargs="?", default="What is in this image?")
    p.add_argument("--image", action="append", default=[], help="local file, http(s) URL or data URL (repeatable)")
    p.add_argument("--stream", action="store_true", help="print the answer as it is generated")
    p.add_argument("--base-url", default=os.environ.get("OPENAI_BASE_URL", "http://localhost:8000/v1"))
    p.add_argument(
        "--api-key", default=os.environ.get("VLLM_API_KEY") or os.environ.get("OPENAI_API_KEY") or "EMPTY"
    )
    p.add_argument("--model", default=os.environ.get("SPLITQ_MODEL"), help="served model name (default: the first listed)")
    p.add_argument("--max-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.0)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    client = make_client(args.base_url, args.api_key)
    model = args.model or default_model(client)
    content = [image_part(i) for i in args.image] + [{"type": "text", "text": args.question}]
    messages = [{"role": "user", "content": content}]
    print(f"[model] {model}  [images] {len(args.image)}  [question] {args.question}")

    if args.stream:
        stream = client.chat.completions.create(
            model=model,
            messages=messages,
            max_tokens=args.max_tokens,
            temperature=args.temperature,
            stream=True,
            stream_options={"include_usage": True},  # a last chunk with the token counts
        )
        usage, chunks = None, 0
        for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                print(chunk.choices[0].delta.content, end="", flush=True)
                chunks += 1
            if chunk.usage is not None:
                usage = chunk.usage
        print()
        print(f"[stream] {chunks} chunks")
    else:
        r = client.chat.completions.create(
            model=model, messages=messages, max_tokens=args.max_tokens, temperature=args.temperature
        )
        print(r.choices[0].message.content)
        usage = r.usage
    if usage is not None:
        print(f"[usage] prompt_tokens={usage.prompt_tokens} completion_tokens={usage.completion_tokens}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
