"""Fixtures shared by the tests, the benchmarks and the demo, built offline and deterministic:

- `models`: tiny Qwen2.5-VL / LLaVA-1.5 model directories (tokenizer, processor, weights);
- `layers`: random SplitQ layers of any shape and channel split;
- `synthetic`: synthetic SplitQ checkpoints of a real model directory (random sets and transforms).

Nothing here is imported by the serving or calibration paths.
"""
