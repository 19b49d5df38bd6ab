"""Structured logs: one JSON object per line in production, readable lines in a terminal.

Everything goes to standard error. Records from the standard library's ``logging`` (Hypercorn,
httpx) are rendered by the same processors, so an operator sees one format.

Secrets never reach a log: request lines carry the path and a query string with
``access_token`` removed; headers and bodies are never logged.
"""

from __future__ import annotations

import logging
import sys
import threading
from collections.abc import MutableMapping
from typing import Any, TextIO
from urllib.parse import unquote_plus

import structlog

__all__ = ["configure_logging", "get_logger", "loggable_query"]

_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING}
_LEVELS["error"] = logging.ERROR


class _LineLogger:
    """Writes each rendered event as one line with a single ``write`` call.

    Worker processes share one standard error: a line written in two pieces (structlog's
    ``PrintLogger`` prints the text, then the newline) can be split by another worker's line.
    """

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream
        self._lock = threading.Lock()

    def msg(self, message: str) -> None:
        with self._lock:
            self._stream.write(message + "\n")
            self._stream.flush()

    log = debug = info = warn = warning = error = critical = exception = fatal = msg


class _LineLoggerFactory:
    def __init__(self, stream: TextIO) -> None:
        self._logger = _LineLogger(stream)

    def __call__(self, *args: Any) -> _LineLogger:
        return self._logger


def configure_logging(
    format: str = "auto",
    level: str = "info",
    *,
    stream: TextIO | None = None,
    static: dict[str, Any] | None = None,
) -> None:
    """Sets up structlog and the standard library's logging for this process.

    ``format`` is "json", "console" or "auto" (console when ``stream`` is a terminal).
    ``static`` adds fixed fields to every line (e.g. the worker number).
    """
    stream = stream if stream is not None else sys.stderr
    if format == "auto":
        format = "console" if stream.isatty() else "json"
    numeric_level = _LEVELS.get(level, logging.INFO)

    shared: list[structlog.types.Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    if static:
        fields = dict(static)

        def add_static(
            _logger: Any, _name: str, event: MutableMapping[str, Any]
        ) -> MutableMapping[str, Any]:
            for key, value in fields.items():
                event.setdefault(key, value)
            return event

        shared.append(add_static)

    renderer: structlog.types.Processor
    if format == "json":
        renderer = structlog.processors.JSONRenderer()
        shared.append(structlog.processors.format_exc_info)
    else:
        renderer = structlog.dev.ConsoleRenderer(colors=stream.isatty())

    structlog.configure(
        processors=[*shared, renderer],
        wrapper_class=structlog.make_filtering_bound_logger(numeric_level),
        logger_factory=_LineLoggerFactory(stream),
        cache_logger_on_first_use=False,
    )

    handler = logging.StreamHandler(stream)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=[structlog.stdlib.add_logger_name, *shared],
            processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, renderer],
        )
    )
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(numeric_level)
    # httpx/httpcore log every request at INFO/DEBUG, including URLs: keep them quiet.
    for noisy in ("httpx", "httpcore"):
        logging.getLogger(noisy).setLevel(max(numeric_level, logging.WARNING))


def get_logger(name: str | None = None, **context: Any) -> Any:
    """A structlog logger bound to ``context``."""
    logger = structlog.get_logger(name) if name else structlog.get_logger()
    return logger.bind(**context) if context else logger


def loggable_query(query_string: bytes) -> str:
    """The query string with ``access_token`` parameters removed, for logs."""
    if not query_string:
        return ""
    text = query_string.decode("latin-1")
    if "access" not in text and "%" not in text:
        return text
    # The homeserver decodes parameter names, so an encoded name is the same secret.
    kept = [p for p in text.split("&") if unquote_plus(p.split("=", 1)[0]) != "access_token"]
    return "&".join(kept)
