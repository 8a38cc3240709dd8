"""A training run's working folder, `<output>.partial/`: resumable checkpoints, and the finished
model folder renamed into place at the end.

A full ToyVQA training is an hour or more of one CPU core, long enough to be cut short (a session
ending, a shared machine's jobs being killed). The run writes `checkpoint.pt` there every
`--checkpoint-every` steps (atomically: a temporary file renamed over the old one); the same command
run again continues from it. Every step's data are drawn by index (`splitq_toyvqa.data`) and nothing
else is random, so a resumed run computes what the uninterrupted one does, bit for bit with the same
thread count (tested). The model folder is built in `<output>.partial/model` and renamed to
`<output>` only when it is complete, scored and described, so an interrupted run never leaves a
half-written model where a finished one is expected, nor destroys the one that was there.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import torch

# Arguments that do not change what is computed: a resumed run may give other values.
NOT_COMPARED = ("output", "threads", "date", "checkpoint_every")


class RunFolder:
    """`<output>.partial/` of one training run."""

    def __init__(self, output: Path | str):
        self.output = Path(output)
        self.dir = self.output.with_name(self.output.name + ".partial")
        self.path = self.dir / "checkpoint.pt"
        self.model_dir = self.dir / "model"

    def load(self, args: dict[str, Any]) -> dict[str, Any] | None:
        """The saved state of an earlier run of the same command, or None if there is none.
        A checkpoint of another command is an error that names the differing arguments (resuming
        it would mix two recipes); delete the folder to start afresh."""
        if not self.path.exists():
            return None
        try:
            state = torch.load(self.path, map_location="cpu", weights_only=False)
        except Exception as e:  # a truncated or foreign file: say which, keep it for inspection
            raise ValueError(f"{self.path}: not a readable training checkpoint ({e}); delete {self.dir} to start afresh") from e
        saved = {k: v for k, v in state["args"].items() if k not in NOT_COMPARED}
        asked = {k: v for k, v in args.items() if k not in NOT_COMPARED}
        differ = sorted(k for k in saved.keys() | asked.keys() if saved.get(k) != asked.get(k))
        if differ:
            shown = ", ".join(f"--{k.replace('_', '-')} {saved.get(k)!r} (now {asked.get(k)!r})" for k in differ)
            raise ValueError(f"{self.path} is a checkpoint of another command: {shown}; "
                             f"run that command to resume it, or delete {self.dir} to start afresh")  # fmt: skip
        return state

    def save(self, state: dict[str, Any]) -> None:
        """Write `state` as the run's checkpoint, replacing the last one only once it is complete."""
        self.dir.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(self.path.name + ".tmp")
        torch.save(state, tmp)
        os.replace(tmp, self.path)

    def fresh_model_dir(self) -> Path:
        """An empty `<output>.partial/model` (a run cut short while saving leaves one behind)."""
        shutil.rmtree(self.model_dir, ignore_errors=True)
        self.model_dir.mkdir(parents=True)
        return self.model_dir

    def finish(self) -> Path:
        """Move the finished model folder to `<output>` (replacing what was there) and delete the
        working folder with its checkpoint."""
        old = self.output.with_name(self.output.name + ".old")
        shutil.rmtree(old, ignore_errors=True)
        if self.output.exists():
            os.replace(self.output, old)
        os.replace(self.model_dir, self.output)
        shutil.rmtree(old, ignore_errors=True)
        shutil.rmtree(self.dir)
        return self.output
