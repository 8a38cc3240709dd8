"""Run the real vLLM engine from tests: offline `vllm.LLM.chat` in a subprocess, and the real
OpenAI-compatible server (`OpenAIServer`).

A subprocess per engine keeps tests independent (vLLM's CPU engine spawns worker processes and
holds global state).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from splitq_vllm.server import OpenAIServer, ServerError, vllm_env  # noqa: F401  (re-exported for the tests)

RUNNER = Path(__file__).with_name("offline_chat_subprocess.py")


def server_env(tmp_path: str | Path, **extra: str) -> dict[str, str]:
    """Server environment: a private vLLM cache (compiled graphs of temporary checkpoints are never
    reused, so they should not pile up in ~/.cache/vllm)."""
    return {"VLLM_CACHE_ROOT": str(Path(tmp_path) / "vllm-cache"), **extra}


def offline_chat(
    model: str | os.PathLike,
    conversations: list[list[dict[str, Any]]],
    max_tokens: int = 8,
    logprobs: int | None = None,
    llm_kwargs: dict[str, Any] | None = None,
    env: dict[str, str] | None = None,
    timeout: float = 600,
) -> list[dict[str, Any]]:
    """Greedy chat completions from vllm.LLM for each conversation: text, token ids, logprobs."""
    spec = {
        "model": str(model),
        "conversations": conversations,
        "max_tokens": max_tokens,
        "logprobs": logprobs,
        "llm_kwargs": {
            "enforce_eager": True,
            "max_model_len": 1024,
            "max_num_seqs": 8,
            "seed": 0,
            "limit_mm_per_prompt": {"image": 2},
            **(llm_kwargs or {}),
        },
    }
    with tempfile.TemporaryDirectory() as tmp:
        spec_path = Path(tmp) / "spec.json"
        out_path = Path(tmp) / "out.json"
        spec_path.write_text(json.dumps(spec))
        proc = subprocess.run(
            [sys.executable, str(RUNNER), str(spec_path), str(out_path)],
            cwd=tmp,
            env=vllm_env(env),
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        if proc.returncode != 0 or not out_path.exists():
            raise RuntimeError(f"vLLM run failed (exit {proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}")
        return json.loads(out_path.read_text())


def run_case_script(script: Path, *args: str | os.PathLike, timeout: float = 600) -> dict[str, Any]:
    """Run a subprocess body (`python script *args OUT_JSON`, in a temporary folder, vLLM's
    environment) and return the JSON it wrote; its output tails in the error if it fails."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "results.json"
        proc = subprocess.run(
            [sys.executable, str(script), *map(str, args), str(out)], cwd=tmp, env=vllm_env(), capture_output=True,
            text=True, timeout=timeout,
        )
        if proc.returncode != 0 or not out.exists():
            raise RuntimeError(f"{script.name} failed (exit {proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
        return json.loads(out.read_text())


def server_start_failure(
    model: str | os.PathLike, args: list[str] | None = None, env: dict[str, str] | None = None, timeout: float = 600
) -> tuple[int, str]:
    """Start the server on a model expected to be refused: (exit code, log). Raises if it came up."""
    server = OpenAIServer(model, args, env, startup_timeout=timeout)
    try:
        server.start()
    except ServerError:
        code = server.proc.returncode if server.proc is not None else None
        server.stop()
        return code, server.logs()
    server.stop()
    raise AssertionError(f"the vLLM server started on {model} although it should have refused it")
