"""ToyVQA: a synthetic VQA task and the small trained Qwen2.5-VL bundled in models/toyvqa-qwen25vl/.

- `data`: the deterministic generator, the fixed splits and the ShareGPT4V export (calibration);
  version 1 (the bundled model's, frozen) and version 2 (varied wordings and pictures, held-out slices).
- `phrasings`: version 2's question wordings (UK and US spelling) and which are held out.
- `evaluate`: answer normalisation and scoring, for any generate function and for transformers.
- `train`: builds and trains the model from scratch on the CPU.
"""
