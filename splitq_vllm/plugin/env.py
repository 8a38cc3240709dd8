"""The plugin's environment settings: one parser, one error message shape."""

from __future__ import annotations

import os


def env_choice(name: str, choices: tuple[str, ...], default: str) -> str:
    """`$name` lower-cased, `default` when unset or empty; any other value not in `choices` raises."""
    value = os.environ.get(name, default).strip().lower() or default
    if value not in choices:
        raise ValueError(f"{name}={value!r}: expected one of {list(choices)}")
    return value
