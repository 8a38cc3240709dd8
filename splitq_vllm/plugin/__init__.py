"""The vLLM plugin: `--quantization splitq` (config.py), the linear method (linear.py), the
text/vision token mask (text_mask.py) and the compute backends (backends.py).

Importing this package imports vLLM and registers the quantization method; `splitq_vllm.register`
(the `vllm.general_plugins` entry point) does that and installs the mask hook, once per process.
"""

from .config import SplitQVllmConfig
from .linear import SplitQLinearMethod
from .text_mask import install_embed_hook

__all__ = ["SplitQLinearMethod", "SplitQVllmConfig", "install_embed_hook"]
