"""SplitQ calibration of Hugging Face VLMs (`splitq-calibrate`).

Python API (notebooks):

    from splitq_calibration import calibrate
    calibrate("Qwen2.5-VL-7B-Instruct", "sharegpt4v_coco.jsonl", "qwen25vl-splitq-w4a4",
              scheme="w4a4", image_dir="coco/")            # any CalibrationConfig field
    calibrate(model, data, out, recipe="recipe.yaml")      # the same settings from YAML

`oneshot(model=..., dataset=..., recipe=SplitQModifier(...), ...)` has llm-compressor's contract
(a model object, a local path or a Hub id in; the calibrated model out; oneshot.py).
"""

from .oneshot import oneshot  # binds the function over the submodule of the same name
from .recipe import CalibrationConfig, SplitQModifier, dump_recipe, load_recipe

__all__ = ["CalibrationConfig", "SplitQModifier", "calibrate", "dump_recipe", "load_recipe", "oneshot"]


def __getattr__(name):  # import torch/transformers-heavy modules on first use
    if name == "calibrate":
        from . import pipeline as _c

        return _c.calibrate
    raise AttributeError(name)
