# SPDX-License-Identifier: GPL-2.0-or-later
"""structlog configuration: JSON lines to the DebugFile, readable lines on a terminal.

Secrets are kept out by construction (they travel as ``Secret`` and connection strings are
never passed to a log call) and, as a second line of defence, by a redaction processor.
Tracebacks are rendered without local variables: a frame's locals can hold a password.
``reopen()`` (called on SIGHUP) lets logrotate move the file away.
"""

from __future__ import annotations

import logging
import os
import re
import sys
import threading
from collections.abc import MutableMapping
from pathlib import Path
from typing import Any, Optional, TextIO

import orjson
import structlog

_LEVELS = {"debug": 10, "info": 20, "warning": 30, "error": 40}

#: keys whose values are never written
SECRET_KEYS = frozenset(
    {
        "password",
        "passwd",
        "connection_string",
        "connectionstring",
        "authentication_key",
        "block_cipher_key",
        "dedicated_key",
        "key",
        "secret",
        "body",
    }
)
#: connection-string options that carry secrets: -P password, -A/-B/-D keys
_SECRET_OPTION = re.compile(r"(?<![\w-])(-[PABD])(\s+)(\"[^\"]*\"|'[^']*'|\S+)")
#: credentials inside URLs: amqp://user:pass@host
_URL_CREDS = re.compile(r"(\w+://[^:/@\s]+:)[^@\s]+@")
_MASK = "***"


def redact_text(text: str) -> str:
    """Mask secrets that may hide in free text (a connection string, a URL)."""
    text = _SECRET_OPTION.sub(lambda m: m.group(1) + m.group(2) + _MASK, text)
    return _URL_CREDS.sub(lambda m: m.group(1) + _MASK + "@", text)


def _redact_value(value: Any) -> Any:
    if isinstance(value, str):
        return redact_text(value)
    if isinstance(value, dict):
        return {
            k: (_MASK if str(k).lower() in SECRET_KEYS else _redact_value(v))
            for k, v in value.items()
        }
    if isinstance(value, (list, tuple)):
        return [_redact_value(v) for v in value]
    if isinstance(value, (int, float, bool)) or value is None:
        return value
    return redact_text(str(value))


def redact(_logger: Any, _name: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    """structlog processor: mask secret keys and secret-looking text."""
    for k in list(event):
        if k.lower() in SECRET_KEYS:
            event[k] = _MASK
        else:
            event[k] = _redact_value(event[k])
    return event


class _Sink:
    """The current output file; swapped under a lock by ``reopen``."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.path: Optional[Path] = None
        self.file: TextIO = sys.stderr
        self.also_stderr = False

    def open(self, path: Optional[Path]) -> None:
        with self.lock:
            old = self.file
            self.path = path
            if path is not None:
                path.parent.mkdir(parents=True, exist_ok=True)
                fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)
                self.file = os.fdopen(fd, "a", encoding="utf-8", buffering=1)
            else:
                self.file = sys.stderr
            if old not in (sys.stderr, sys.stdout, self.file):
                old.close()

    def write(self, line: str, console: Optional[str]) -> None:
        with self.lock:
            try:
                self.file.write(line + "\n")
                if console is not None:
                    sys.stderr.write(console + "\n")
                    sys.stderr.flush()
            except (OSError, ValueError):
                pass  # a full disk must not stop meter reading


_sink = _Sink()
_json = structlog.processors.JSONRenderer(serializer=lambda o, **_: orjson.dumps(o).decode())
_console = structlog.dev.ConsoleRenderer(
    colors=False, exception_formatter=structlog.dev.plain_traceback
)


class _Logger:
    def __init__(self, *args: Any) -> None:
        pass

    def msg(self, message: str) -> None:
        _sink.write(message, None)

    log = debug = info = warning = warn = error = critical = exception = msg


def _render(logger: Any, name: str, event: MutableMapping[str, Any]) -> str:
    """JSON to the file; on a terminal with no file, readable lines instead."""
    console = None
    if _sink.path is None and sys.stderr.isatty():
        return _console(logger, name, dict(event))
    if _sink.also_stderr:
        console = _console(logger, name, dict(event))
    line = str(_json(logger, name, event))  # the serializer returns str
    if console is not None:
        _sink.write(line, console)
        raise structlog.DropEvent
    return line


class _ForwardHandler(logging.Handler):
    """Send stdlib logging (pika) through structlog, so it is redacted and formatted alike."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            msg = record.getMessage()
        except Exception:  # noqa: BLE001 - a bad log call must not break us
            msg = str(record.msg)
        extra: dict[str, Any] = {}
        if record.exc_info:
            extra["exc_info"] = record.exc_info  # rendered (no locals) and redacted
        msg_id = getattr(record, "msg_id", None)
        if msg_id is not None:
            extra["msg_id"] = msg_id
        structlog.get_logger(record.name).log(record.levelno, msg, **extra)


def configure(
    debug_file: Optional[Path] = None,
    level: str = "Info",
    process: str = "master",
    console: bool = False,
) -> None:
    """Configure logging for this process (the master and each worker call it)."""
    lvl = _LEVELS[level.lower()]
    _sink.open(debug_file)
    _sink.also_stderr = console and debug_file is not None and sys.stderr.isatty()
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.CallsiteParameterAdder(
                [structlog.processors.CallsiteParameter.PROCESS]
            ),
            structlog.processors.format_exc_info,  # plain traceback, no locals
            redact,
            _render,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(lvl),
        logger_factory=_Logger,
        cache_logger_on_first_use=False,
    )
    structlog.contextvars.clear_contextvars()
    structlog.contextvars.bind_contextvars(proc=process)
    root = logging.getLogger()
    for h in list(root.handlers):
        if isinstance(h, _ForwardHandler):
            root.removeHandler(h)
    root.addHandler(_ForwardHandler())
    root.setLevel(lvl)
    # pika logs every reconnect attempt and frame error at ERROR with tracebacks: we log
    # our own summary of those, so keep only its warnings about our misuse.
    logging.getLogger("pika").setLevel(logging.CRITICAL if lvl > 10 else logging.INFO)


def reopen() -> None:
    """Reopen the log file (SIGHUP after logrotate moved it)."""
    _sink.open(_sink.path)


def get_logger(name: str = "dlms2amqp") -> Any:
    return structlog.get_logger(name)
