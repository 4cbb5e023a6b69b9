"""Log output for a shoal process: dated text by default, one JSON object per line on request.

``SHOAL_LOG_FORMAT=json`` makes every line of the process a JSON object (shoal's, the
app's and uvicorn's, through the root logger), with the fields log tools filter on::

    {"timestamp": "2026-11-30T02:00:05.001+00:00", "level": "INFO", "logger": "hi.jobs",
     "message": "Job running on: ...", "node": "hi@10.0.0.2", "job": "hi",
     "tick": "2026-11-30T02:00:05+00:00", "token": 3, "singleton": "shoal.scheduler"}

The structured fields come from where the work runs, not from each call site: a node binds
``node`` when it starts, a singleton's task binds ``singleton`` and ``token``, a job run
binds ``job`` and ``tick``, and mesh lines about a peer pass ``peer`` with ``extra=``.
Context variables carry them, so a job function's own log lines get them too.
"""

from __future__ import annotations

import contextlib
import logging
import sys
from collections.abc import Iterator, Mapping
from contextvars import ContextVar
from datetime import datetime
from types import MappingProxyType, TracebackType
from typing import Any, Literal, TextIO

from shoal.config import ConfigError

__all__ = [
    "FIELDS",
    "JsonFormatter",
    "LogFormat",
    "TextFormatter",
    "bind",
    "configure",
    "context",
    "log_format",
]

LogFormat = Literal["text", "json"]
#: The structured fields, in the order JSON lines show them.
FIELDS = ("node", "peer", "singleton", "token", "job", "tick", "attempt")

_fields: ContextVar[Mapping[str, Any]] = ContextVar(
    "shoal_log_fields", default=MappingProxyType({})
)


def bind(**fields: Any) -> None:
    """Add fields to every later log line of the current task (and the tasks it starts)."""
    _fields.set({**_fields.get(), **fields})


@contextlib.contextmanager
def context(**fields: Any) -> Iterator[None]:
    """Add fields to the log lines of a block."""
    reset = _fields.set({**_fields.get(), **fields})
    try:
        yield
    finally:
        _fields.reset(reset)


def _timestamp(record: logging.LogRecord) -> str:
    """ISO-8601 with date, milliseconds and the local zone's offset."""
    return datetime.fromtimestamp(record.created).astimezone().isoformat(timespec="milliseconds")


class TextFormatter(logging.Formatter):
    """``2026-11-30T02:00:05.001+00:00 INFO    hi.jobs: message`` (tracebacks follow)."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)-7s %(name)s: %(message)s")

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        return _timestamp(record)


class JsonFormatter(logging.Formatter):
    """One JSON object per record, on one line (a traceback goes into ``exception``)."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "timestamp": _timestamp(record),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        bound = _fields.get()
        for name in FIELDS:
            value = getattr(record, name, None)
            if value is None:
                value = bound.get(name)
            if value is not None:
                out[name] = value if isinstance(value, int | float | bool) else str(value)
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        elif record.exc_text:
            out["exception"] = record.exc_text
        if record.stack_info:
            out["stack"] = self.formatStack(record.stack_info)
        import json  # here: a text-format app never needs it

        return json.dumps(out, ensure_ascii=False, default=str)


def log_format(env: Mapping[str, str]) -> LogFormat:
    """``SHOAL_LOG_FORMAT`` from the environment: ``text`` (default) or ``json``."""
    value = (env.get("SHOAL_LOG_FORMAT") or "text").strip().lower()
    if value not in ("text", "json"):
        raise ConfigError(f"SHOAL_LOG_FORMAT={value!r}: use text or json.")
    return "json" if value == "json" else "text"


def configure(
    fmt: LogFormat = "text", *, level: int = logging.INFO, stream: TextIO | None = None
) -> None:
    """Send every logger's records to ``stream`` (stderr) in ``fmt``; replaces the root's
    handlers. In JSON, uncaught exceptions become log records too, so no line escapes."""
    handler = logging.StreamHandler(stream if stream is not None else sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
    logging.captureWarnings(True)
    if fmt == "json":
        sys.excepthook = _log_uncaught


def _log_uncaught(kind: type[BaseException], exc: BaseException, tb: TracebackType | None) -> None:
    logging.getLogger("shoal").critical("uncaught exception", exc_info=(kind, exc, tb))
