"""Structured logs: one line per event, carrying ``role``, ``model`` and the request id.

Every role calls ``configure`` once at start. A servicer binds the request id of the
call it serves with ``request_scope(rid)``; every line logged inside that call (its
asyncio task, and the tasks it starts) then carries ``request_id``, so ``grep`` on
one id finds the router's, the decode worker's and the prefill worker's lines.
``extra={"request_id": ...}`` (or any other key) on a single call works too.

Format: ``json`` (one object per line, for collectors and ``grep``), ``text``
(``time role level logger: message key=value``, for a terminal) or ``auto`` (text
on a TTY, else json); ``--log-format`` or ``$PDSERVE_LOG_FORMAT`` picks it, and
child processes inherit the environment variable.
"""

from __future__ import annotations

import argparse
import contextlib
import contextvars
import json
import logging
import os
import sys
import time
from collections.abc import Iterator
from typing import Any

LOG_FORMATS: tuple[str, ...] = ("auto", "json", "text")
FORMAT_ENV = "PDSERVE_LOG_FORMAT"

_request_id: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "pdserve_request_id", default=None)
# Attributes every LogRecord has; anything else came in through ``extra``.
_STANDARD = frozenset(logging.LogRecord("", 0, "", 0, "", (), None).__dict__) | {
    "message", "asctime", "taskName"}


@contextlib.contextmanager
def request_scope(request_id: str) -> Iterator[None]:
    """Lines logged inside carry ``request_id`` (asyncio tasks copy the context)."""
    token = _request_id.set(request_id)
    try:
        yield
    finally:
        _request_id.reset(token)


def current_request_id() -> str | None:
    return _request_id.get()


class _Fields(logging.Filter):
    """Stamps every record with role, model and the bound request id."""

    def __init__(self, role: str, model: str) -> None:
        super().__init__()
        self.role, self.model = role, model

    def filter(self, record: logging.LogRecord) -> bool:
        record.role = self.role
        record.model = self.model
        if getattr(record, "request_id", None) is None:
            record.request_id = _request_id.get()
        return True


def _extras(record: logging.LogRecord) -> dict[str, Any]:
    return {k: v for k, v in record.__dict__.items()
            if k not in _STANDARD and k not in ("role", "model", "request_id")}


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "ts": round(record.created, 6), "level": record.levelname,
            "role": getattr(record, "role", None), "model": getattr(record, "model", None),
            "request_id": getattr(record, "request_id", None), "logger": record.name,
            "msg": record.getMessage(),
        }
        line.update(_extras(record))
        if record.exc_info:
            line["exc"] = self.formatException(record.exc_info)
        return json.dumps(line, default=str)


class TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        ts = time.strftime("%H:%M:%S", time.localtime(record.created))
        rid = getattr(record, "request_id", None)
        fields = {"request_id": rid} if rid else {}
        fields.update(_extras(record))
        tail = "".join(f" {k}={v}" for k, v in fields.items())
        text = (f"{ts}.{int(record.msecs):03d} {getattr(record, 'role', '-')} "
                f"{record.levelname} {record.name}: {record.getMessage()}{tail}")
        if record.exc_info:
            text += "\n" + self.formatException(record.exc_info)
        return text


_fields: _Fields | None = None


def configure(role: str, model: str = "", fmt: str | None = None,
              level: int = logging.INFO) -> None:
    """Route the root logger to stderr in ``fmt`` (default ``$PDSERVE_LOG_FORMAT`` or auto)."""
    global _fields
    fmt = fmt or os.environ.get(FORMAT_ENV) or "auto"
    if fmt not in LOG_FORMATS:
        raise ValueError(f"log format must be one of {LOG_FORMATS}, got {fmt!r}")
    if fmt == "auto":
        fmt = "text" if sys.stderr.isatty() else "json"
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    _fields = _Fields(role, model)
    handler.addFilter(_fields)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)


def split_format_flag(argv: list[str] | None) -> tuple[str | None, list[str]]:
    """``--log-format FMT`` taken out of a role's argv (None when absent), and the rest."""
    p = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    p.add_argument("--log-format", choices=LOG_FORMATS, default=None)
    known, rest = p.parse_known_args(sys.argv[1:] if argv is None else argv)
    return known.log_format, rest


def set_model(model: str) -> None:
    """The model's name once it is known (workers learn it after loading)."""
    if _fields is not None:
        _fields.model = model
