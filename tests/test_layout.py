"""The package layout: each source folder holds the import package of the same name, so importing
works the same from the repository root and from anywhere, and no top-level `kernels` package
exists for transformers' probe to pick up (it would break transformers' kernel hub integration)."""

import subprocess
import sys

import pytest

from tests.helpers.paths import REPO

PACKAGES = ["splitq_kernels", "splitq_calibration", "splitq_vllm", "splitq_toyvqa"]
PROBE = f"""
import importlib, importlib.util
from transformers.utils.import_utils import is_kernels_available
for name in {PACKAGES!r}:
    module = importlib.import_module(name)
    print(name, module.__file__)
spec = importlib.util.find_spec("kernels")
print("kernels", spec is None or spec.origin is None, is_kernels_available())
"""


@pytest.mark.parametrize("cwd", ["repository root", "elsewhere"])
def test_imports_and_the_kernels_probe(cwd, tmp_path):
    where = REPO if cwd == "repository root" else tmp_path
    # `python -c` puts the working directory on sys.path: the harshest case for the root
    out = subprocess.run([sys.executable, "-c", PROBE], cwd=where, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    lines = dict(line.split(" ", 1) for line in out.stdout.strip().splitlines())
    for name in PACKAGES:
        folder = {"splitq_kernels": "kernels", "splitq_calibration": "calibration", "splitq_toyvqa": "toyvqa"}.get(name)
        expected = REPO / (f"{folder}/{name}" if folder else name) / "__init__.py"
        assert lines[name] == str(expected), name
    # at most a namespace-package spec for the kernels/ folder (no __init__.py, no origin), which
    # transformers does not count as the `kernels` package
    assert lines["kernels"] == "True False"
