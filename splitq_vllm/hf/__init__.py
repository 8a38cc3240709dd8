"""The format's Hugging Face runtime: a SplitQ checkpoint loaded as a transformers model, its
quantized linears running the reference forward (`load_quantized_model`)."""

from .model import SplitQLinearModule, TextMask, load_quantized_model, replace_linears

__all__ = ["SplitQLinearModule", "TextMask", "load_quantized_model", "replace_linears"]
