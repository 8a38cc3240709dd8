"""Session fixtures: tiny offline models (built once per session) and the single-thread setting."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from splitq_vllm.testing.models import TINY_BUILDERS, build_tiny_llava, build_tiny_qwen25vl


@pytest.fixture(scope="session")
def tiny_qwen_dir(tmp_path_factory) -> Path:
    return build_tiny_qwen25vl(tmp_path_factory.mktemp("models") / "tiny-qwen25vl")


@pytest.fixture(scope="session")
def tiny_llava_dir(tmp_path_factory) -> Path:
    return build_tiny_llava(tmp_path_factory.mktemp("models") / "tiny-llava")


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    """family name -> its tiny model directory (each built once per session, on first use)."""
    built: dict[str, Path] = {}

    def get(family: str) -> Path:
        if family not in built:
            slug = family.lower().replace(".", "").replace("-", "")
            built[family] = TINY_BUILDERS[family](tmp_path_factory.mktemp("models") / f"tiny-{slug}")
        return built[family]

    return get


@pytest.fixture(scope="module")
def single_thread():
    """The tiny models' ops are microseconds long: on a shared 2-core machine, torch's thread pool
    costs more than it gives (a calibration run takes ~5x longer with 2 threads under load)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
