"""Reading docker/: the compose file with its ${...} values filled in from docker/.env.example,
the serve command, and that command turned into a CPU test server's arguments."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

from tests.helpers.paths import DOCKER

COMPOSE_FILE = DOCKER / "docker-compose.yml"
ENV_EXAMPLE = DOCKER / ".env.example"
DOCKERFILE = DOCKER / "Dockerfile"

# ${VAR}, ${VAR:-default}, ${VAR-default}, ${VAR:?error}, ${VAR?error}, $VAR; $$ is a literal $.
_VAR = re.compile(r"\$(?:(\$)|\{(?P<braced>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:?[-?])(?P<arg>[^}]*))?\}|(?P<bare>[A-Za-z_][A-Za-z0-9_]*))")


class InterpolationError(ValueError):
    pass


def read_env_file(path: str | Path) -> dict[str, str]:
    """KEY=VALUE lines (comments and blank lines skipped; surrounding quotes removed)."""
    env = {}
    for n, line in enumerate(Path(path).read_text().splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if "=" not in line:
            raise ValueError(f"{path}:{n}: expected KEY=VALUE, got {line!r}")
        key, value = line.split("=", 1)
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
            value = value[1:-1]
        env[key.strip()] = value
    return env


def interpolate(value: Any, env: dict[str, str]) -> Any:
    """Compose-style interpolation of every string in a loaded YAML document."""
    if isinstance(value, dict):
        return {k: interpolate(v, env) for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate(v, env) for v in value]
    if not isinstance(value, str):
        return value

    def sub(m: re.Match) -> str:
        if m.group(1):
            return "$"
        name = m.group("braced") or m.group("bare")
        op, arg = m.group("op"), m.group("arg")
        present = name in env
        nonempty = present and env[name] != ""
        if op in (":-", "-"):
            use_default = not nonempty if op == ":-" else not present
            return arg if use_default else env[name]
        if op in (":?", "?"):
            missing = not nonempty if op == ":?" else not present
            if missing:
                raise InterpolationError(f"${{{name}}}: {arg or 'required'}")
            return env[name]
        return env.get(name, "")

    return _VAR.sub(sub, value)


# What a user pastes into VLLM_API_KEY, which .env.example leaves empty (docker/README.md).
TEST_API_KEY = "test-key-Zq3vX9b2Lk7yWm4Tr8Hn1Ds6"


def user_env() -> dict[str, str]:
    """docker/.env as the README has users write it: .env.example with a key filled in."""
    return {**read_env_file(ENV_EXAMPLE), "VLLM_API_KEY": TEST_API_KEY}


def load_compose(env: dict[str, str] | None = None) -> dict[str, Any]:
    """docker-compose.yml with its values filled in (by default from `user_env()`)."""
    raw = yaml.safe_load(COMPOSE_FILE.read_text())
    return interpolate(raw, user_env() if env is None else env)


def serve_command(compose: dict[str, Any] | None = None) -> list[str]:
    """The serving service's command: the arguments of the image's `vllm serve` entry point."""
    compose = compose or load_compose()
    return [str(a) for a in compose["services"]["splitq"]["command"]]


# Flags of the compose command that belong to the GPU box, not to a CPU test server.
_GPU_ONLY = {"--gpu-memory-utilization", "--host", "--port"}


def cpu_server_args(command: list[str], max_model_len: int = 2048) -> list[str]:
    """The compose command as arguments of a CPU test server on the tiny model: the model
    directory (positional) is given separately, host/port by the test, GPU memory settings
    dropped, --max-model-len shortened (the tiny model has 4096 positions), float32 and eager
    mode added as in the plugin tests. Every other flag (quantization, served model name,
    multimodal limits and processor settings) is kept as the 4090 box gets it."""
    args = list(command[1:])  # [0] is the model directory
    out: list[str] = []
    i = 0
    while i < len(args):
        flag = args[i]
        value = args[i + 1] if i + 1 < len(args) and not args[i + 1].startswith("--") else None
        step = 2 if value is not None else 1
        if flag in _GPU_ONLY:
            pass
        elif flag == "--max-model-len":
            out += [flag, str(max_model_len)]
        else:
            out += [flag] + ([value] if value is not None else [])
        i += step
    return out + ["--dtype", "float32", "--enforce-eager", "--seed", "0"]
