"""The vLLM plugin: `--quantization splitq` (config.py), the linear method (linear.py), the
text/vision token mask (text_mask.py), the compute backends (backends.py), the parallel settings
and their checks (parallel.py) and the pipeline-parallel mask relay (pipeline.py).

Importing this package imports vLLM and registers the quantization method; `splitq_vllm.register`
(the `vllm.general_plugins` entry point) does that and installs the hooks, once per process.
"""

from .config import SplitQVllmConfig
from .linear import SplitQLinearMethod
from .parallel import install_front_end_check
from .pipeline import install_loader_hook
from .text_mask import install_embed_hook


def install_hooks() -> None:
    """Every vLLM hook of the plugin (each idempotent): the text mask filled by embed_input_ids,
    the parallel-settings check in the front end, the mask relay between pipeline stages."""
    install_embed_hook()
    install_front_end_check()
    install_loader_hook()


__all__ = ["SplitQLinearMethod", "SplitQVllmConfig", "install_embed_hook", "install_hooks"]
