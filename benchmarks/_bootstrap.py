"""Make `splitq_kernels` importable from a bare checkout (e.g. the GPU machine, where this project
is not pip-installed): the package lives in the folder kernels/ under another name, so map it
explicitly instead of putting the repository root on sys.path (a top-level `kernels` package
would break transformers, which probes for one)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path


def ensure_splitq_kernels() -> None:
    try:
        import splitq_kernels  # noqa: F401  (installed: nothing to do)
        return
    except ImportError:
        pass
    pkg = Path(__file__).resolve().parents[1] / "kernels"
    spec = importlib.util.spec_from_file_location("splitq_kernels", pkg / "__init__.py",
                                                  submodule_search_locations=[str(pkg)])
    module = importlib.util.module_from_spec(spec)
    sys.modules["splitq_kernels"] = module
    spec.loader.exec_module(module)
