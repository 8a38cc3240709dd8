"""ToyVQA: a synthetic VQA task and the small trained Qwen2.5-VL bundled in models/toyvqa-qwen25vl/.

- `data`: the deterministic generator, the fixed splits and the ShareGPT4V export (calibration).
- `evaluate`: answer normalisation and scoring, for any generate function and for transformers.
- `train`: builds and trains the model from scratch on the CPU.
"""
