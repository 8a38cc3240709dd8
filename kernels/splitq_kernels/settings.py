"""The SPLITQ_* environment settings that change a layer's numerics (SPLITQ_DECODE_MODE,
SPLITQ_PRECISION): read and validated one way, so a bad value names its variable and choices."""

from __future__ import annotations

import os


def read_setting(env: str, choices: tuple[str, ...], value: str | None = None) -> str:
    """`value`, else $env, else choices[0] (the default); case and surrounding blanks ignored."""
    raw = os.environ.get(env, "") if value is None else value
    setting = raw.strip().lower() or choices[0]
    if setting not in choices:
        raise ValueError(f"{env}={raw!r}: must be one of {', '.join(choices)} (default {choices[0]})")
    return setting
