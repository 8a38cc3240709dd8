"""Where things are in the repository, for tests that run its scripts or read its files."""

from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
BENCHMARKS = REPO / "benchmarks"
EXAMPLES = REPO / "examples"
DOCKER = REPO / "docker"
BUNDLED_MODEL = REPO / "models" / "toyvqa-qwen25vl"
