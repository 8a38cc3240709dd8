"""Progress messages: the `splitq_calibration` logger, with where the pipeline is ("layer 3/28")
in front of every message. The pipeline says where it is (`at`); the method's code just logs, and
its errors say where they happened (`where`)."""

from __future__ import annotations

import contextlib
import contextvars
import logging
from collections.abc import Iterator

_WHERE: contextvars.ContextVar[str] = contextvars.ContextVar("splitq_calibration_where", default="")


@contextlib.contextmanager
def at(label: str) -> Iterator[None]:
    """Messages logged inside are prefixed with `label` (nested labels are joined)."""
    outer = _WHERE.get()
    token = _WHERE.set(f"{outer} {label}".strip())
    try:
        yield
    finally:
        _WHERE.reset(token)


def where(message: str) -> str:
    """`message` prefixed with the current label, for error messages."""
    label = _WHERE.get()
    return f"{label}: {message}" if label else message


class _Prefixed(logging.LoggerAdapter):
    def process(self, msg, kwargs):
        label = _WHERE.get()
        return (f"{label}: {msg}" if label else msg), kwargs


log = _Prefixed(logging.getLogger("splitq_calibration"), {})
