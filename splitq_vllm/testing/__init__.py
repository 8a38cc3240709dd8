"""Fixtures shared by the tests, the benchmarks and the demo, built offline and deterministic:

- `models`: tiny Qwen2.5-VL / LLaVA-1.5 model directories (tokenizer, processor, weights);
- `layers`: random SplitQ layers of any shape and channel split;
- `synthetic`: synthetic SplitQ checkpoints of a real model directory (random sets and transforms).
- `published`: the released configs (Qwen2.5-VL 3B-72B, LLaVA-1.5 7B/13B) as data, and random-weight
  model directories of those widths built offline (`build_published`).

Nothing here is imported by the serving or calibration paths.
"""
