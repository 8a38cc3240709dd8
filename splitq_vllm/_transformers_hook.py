"""Register the `splitq` quantizer with transformers when, and only when, transformers' quantizer
registry (`transformers.quantizers.auto`) is imported.

`import splitq_vllm` has to stay cheap and vLLM-free (it runs where neither vLLM nor, for the
format alone, transformers is wanted), so it imports neither: `install()` registers at once if
the registry is already imported, and otherwise puts a finder on `sys.meta_path` that waits for
that module, lets it execute, registers, and removes itself. Standard library only.
"""

from __future__ import annotations

import importlib.abc
import sys
import warnings

TARGET = "transformers.quantizers.auto"


def _register() -> None:
    try:
        import transformers

        if int(transformers.__version__.split(".")[0]) < 5:
            return  # the quantizer uses transformers 5's loading hooks; 4.x: load_quantized_model
        import splitq_vllm.hf.quantizer  # noqa: F401  (registers when its body has run)
    except Exception as e:  # never break `import transformers` for someone who only imported splitq_vllm
        warnings.warn(
            f"splitq_vllm: could not register the 'splitq' quantizer with transformers ({type(e).__name__}: {e}); "
            "from_pretrained will not load SplitQ checkpoints, splitq_vllm.hf.load_quantized_model still does",
            stacklevel=2,
        )


class _RegisteringLoader(importlib.abc.Loader):
    """The registry module's own loader, plus the registration once it has executed."""

    def __init__(self, loader) -> None:
        self.loader = loader

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module) -> None:
        self.loader.exec_module(module)
        _register()

    def __getattr__(self, name):  # get_source, get_filename, ... for tracebacks and inspect
        return getattr(self.loader, name)


class _Finder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path, target=None):
        if fullname != TARGET:
            return None
        sys.meta_path.remove(self)  # once, and the other finders find the real module
        for finder in sys.meta_path:
            spec = finder.find_spec(fullname, path, target) if hasattr(finder, "find_spec") else None
            if spec is not None:
                if spec.loader is not None:
                    spec.loader = _RegisteringLoader(spec.loader)
                return spec
        return None


def install() -> None:
    """Register now if transformers' registry is imported, else when it is."""
    if TARGET in sys.modules:
        _register()
    elif not any(isinstance(f, _Finder) for f in sys.meta_path):
        sys.meta_path.insert(0, _Finder())
