"""SplitQ calibration of Hugging Face VLMs (`splitq-calibrate`).

Python API (notebooks):

    from splitq_calibration import calibrate
    calibrate("Qwen2.5-VL-7B-Instruct", "sharegpt4v_coco.jsonl", "qwen25vl-splitq-w4a4",
              scheme="w4a4", image_dir="coco/")            # any CalibrationConfig field
    calibrate(model, data, out, recipe="recipe.yaml")      # the same settings from YAML

`oneshot(model=..., dataset=..., output_dir=..., recipe=..., num_calibration_samples=...,
max_seq_length=...)` is the same call spelled the llm-compressor way.
"""

from .recipe import CalibrationConfig, dump_recipe, load_recipe

__all__ = ["CalibrationConfig", "calibrate", "dump_recipe", "load_recipe", "oneshot"]


def __getattr__(name):  # import torch/transformers-heavy modules on first use
    if name in ("calibrate", "oneshot"):
        from . import pipeline as _c

        return getattr(_c, name)
    raise AttributeError(name)
