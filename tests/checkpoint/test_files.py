"""The checkpoint as files: modes that follow the umask, leftovers of killed writers removed (and
a live writer's kept), truncated or corrupt safetensors files named with what is wrong."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from splitq_vllm.checkpoint import CheckpointError, read_checkpoint
from tests.checkpoint.test_format import write
from tests.helpers.paths import REPO

# A writer of OUT with tiny shards whose 16-bit tensor "z.stall" is reached after the first shards
# are on disk: there it kills itself (SIGKILL, as `kill -9` or the OOM killer would) or waits for a
# line on stdin (a live writer).
WRITER = """
import os, signal, sys
from collections.abc import Mapping
import torch
from splitq_kernels.reference import SplitQScheme
from splitq_vllm.checkpoint import SplitQConfig, write_checkpoint
from tests.checkpoint.test_format import make_layers

class Stalling(Mapping):
    t = {"a.weight": torch.randn(64), "z.stall": torch.randn(64)}
    def __getitem__(self, name):
        if name == "z.stall":
            if sys.argv[2] == "kill":
                os.kill(os.getpid(), signal.SIGKILL)
            print("writing", flush=True)
            sys.stdin.readline()
        return self.t[name]
    def __iter__(self):
        return iter(self.t)
    def __len__(self):
        return len(self.t)
    def nbytes(self, name):
        return 256

scheme = SplitQScheme.from_name("w4a4")
write_checkpoint(sys.argv[1], model_config={}, quant_config=SplitQConfig(scheme=scheme), layers=make_layers(scheme),
                 tensors=Stalling(), max_shard_bytes=300)
"""


def _writer(out: Path, action: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-c", WRITER, str(out), action],
        cwd=REPO,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )


def _leftovers(parent: Path, name: str = "ckpt") -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith(f".{name}."))


@pytest.mark.parametrize("umask", [0o022, 0o027, 0o077], ids=oct)
def test_file_modes_follow_the_umask(tmp_path, umask):
    src = tmp_path / "model"
    src.mkdir()
    (src / "tokenizer.json").write_text("{}")
    os.chmod(src / "tokenizer.json", 0o600)  # side files do not keep their source's mode either
    old = os.umask(umask)
    try:
        path = write(tmp_path, side_files_from=src, max_shard_bytes=700)
    finally:
        os.umask(old)
    modes = {p.name: p.stat().st_mode & 0o777 for p in path.iterdir()}
    assert "model.safetensors.index.json" in modes and "tokenizer.json" in modes and len(modes) > 4
    assert modes == {name: 0o666 & ~umask for name in modes}, {n: oct(m) for n, m in modes.items()}
    assert path.stat().st_mode & 0o777 == 0o777 & ~umask


def test_a_killed_writers_temporary_is_removed_by_the_next_write(tmp_path):
    out = tmp_path / "ckpt"
    proc = _writer(out, "kill")
    proc.communicate(timeout=300)
    assert proc.returncode == -signal.SIGKILL
    left = _leftovers(tmp_path)
    assert len(left) == 1 and left[0].startswith(".ckpt.tmp-"), left
    assert any(p.suffix == ".safetensors" for p in (tmp_path / left[0]).iterdir())  # killed mid-export
    (tmp_path / ".other.tmp-0badc0de").mkdir()  # another output's: not this writer's to remove
    write(tmp_path)
    read_checkpoint(out)
    assert _leftovers(tmp_path) == []
    assert (tmp_path / ".other.tmp-0badc0de").is_dir()


def test_a_live_writers_temporary_is_kept(tmp_path):
    out = tmp_path / "ckpt"
    proc = _writer(out, "wait")
    try:
        assert proc.stdout.readline().strip() == "writing"
        live = _leftovers(tmp_path)
        assert len(live) == 1
        write(tmp_path, name="ckpt")  # the same output, written meanwhile by this process
        assert _leftovers(tmp_path) == live  # the live writer's directory was left alone
    finally:
        proc.kill()
        proc.wait()
    write(tmp_path, overwrite=True)  # now it is a dead writer's leftover
    assert _leftovers(tmp_path) == []


def _truncate(f: Path, keep: int) -> None:
    f.write_bytes(f.read_bytes()[:keep])


@pytest.mark.parametrize(
    "keep, message",
    [
        (-10, r"truncated safetensors file: its header describes \d+ bytes, the file has \d+"),
        (100, r"truncated or not a safetensors file: its header length says \d+ bytes, the file has 100"),
        (5, r"truncated safetensors file \(5 bytes"),
    ],
)
def test_truncated_file_is_named(tmp_path, keep, message):
    path = write(tmp_path)
    f = path / "model.safetensors"
    _truncate(f, keep)
    for validate in (True, False):  # listing the tensors already reads every header
        with pytest.raises(CheckpointError, match=f"^{f}: {message}"):
            read_checkpoint(path, validate=validate)


def test_truncated_16_bit_shard_is_named(tmp_path):
    """A sharded checkpoint whose last shard (16-bit tensors only, read by nothing SplitQ-specific)
    is cut short: the header check covers every file."""
    path = write(tmp_path, max_shard_bytes=700)
    last = max(path.glob("model-*.safetensors"))
    _truncate(last, -4)
    with pytest.raises(CheckpointError, match=f"^{last}: truncated safetensors file"):
        read_checkpoint(path)


def test_garbage_header_is_named(tmp_path):
    path = write(tmp_path)
    f = path / "model.safetensors"
    data = bytearray(f.read_bytes())
    data[8:12] = b"\xff\xfe{["
    f.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=f"^{f}: not a safetensors file"):
        read_checkpoint(path)
