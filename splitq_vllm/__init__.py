"""splitq_vllm: the SplitQ checkpoint format and the vLLM plugin that serves it.

`register()` is the `vllm.general_plugins` entry point (pyproject.toml): vLLM calls it once in
every process (front end, engine core, workers). Importing `splitq_vllm` itself does not import
vLLM, so the checkpoint format stays usable where vLLM is not installed, nor torch or
transformers: it only arranges for the `splitq` quantizer to be registered with transformers
when transformers' quantizer registry is imported (`_transformers_hook`), so that
`AutoModelForImageTextToText.from_pretrained(CKPT)` loads SplitQ checkpoints.
"""

from . import _transformers_hook

__version__ = "0.1.0"

_transformers_hook.install()

_registered = False


def register() -> None:
    """Register the `splitq` quantization method with vLLM and install the hooks (text mask,
    front-end parallel checks, pipeline mask relay: splitq_vllm.plugin.install_hooks).

    Guarded by its own flag: in engine and worker processes the config class may already be
    imported (unpickling the VllmConfig imports it, which registers the method) before vLLM calls
    this, and the mask hook must be installed regardless.
    """
    global _registered
    if _registered:
        return
    from .plugin import install_hooks  # imports vLLM; registers the quantization config

    install_hooks()
    _registered = True
