"""The main job on the embedded default (`make demo`).

For now the smallest real end-to-end path that exists: build the tiny Qwen2.5-VL offline and ask
it about a picture through the real vLLM engine (16-bit; calibration and the SplitQ plugin are
the next steps, see the issues). Random weights, so the answer is noise: this shows the stack runs.
"""

from __future__ import annotations

import tempfile
from pathlib import Path


def main() -> None:
    from PIL import Image, ImageDraw
    from vllm import LLM, SamplingParams

    from splitq_calibration.tiny_models import build_tiny_qwen25vl

    with tempfile.TemporaryDirectory() as tmp:
        model = build_tiny_qwen25vl(Path(tmp) / "tiny-qwen25vl")
        print(f"built {model}")
        image = Image.new("RGB", (112, 112), "white")
        ImageDraw.Draw(image).ellipse((28, 28, 84, 84), fill="red")
        llm = LLM(model=str(model), enforce_eager=True, max_model_len=1024, seed=0)
        question = "What is in this image?"
        messages = [{"role": "user", "content": [{"type": "image_pil", "image_pil": image}, {"type": "text", "text": question}]}]
        out = llm.chat(messages, SamplingParams(max_tokens=8, temperature=0.0))
        print(f"Q: {question}\nA (random weights): {out[0].outputs[0].text!r}")


if __name__ == "__main__":
    main()
