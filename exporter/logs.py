"""structlog set-up: JSON lines off a terminal, readable console output on one.

A last processor replaces any registered secret wherever it appears in an event, as a
safety net behind the rule that secrets are never passed to a logger in the first place.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterable, MutableMapping
from typing import Any

import structlog

MASK = "**********"


class SecretScrubber:
    """structlog processor that masks known secret strings in every event value."""

    def __init__(self, secrets: Iterable[str] = ()) -> None:
        self.secrets = sorted({s for s in secrets if len(s) >= 4}, key=len, reverse=True)

    def _clean(self, value: Any) -> Any:
        if isinstance(value, str):
            for secret in self.secrets:
                value = value.replace(secret, MASK)
            return value
        if isinstance(value, dict):
            return {k: self._clean(v) for k, v in value.items()}
        if isinstance(value, list | tuple):
            return type(value)(self._clean(v) for v in value)
        return value

    def __call__(
        self, _logger: Any, _name: str, event: MutableMapping[str, Any]
    ) -> MutableMapping[str, Any]:
        if not self.secrets:
            return event
        return {k: self._clean(v) for k, v in event.items()}


def configure(level: str, fmt: str, secrets: Iterable[str]) -> None:
    """Configure structlog for the process (stderr; stdout is for command output)."""
    json_out = fmt == "json" or (fmt == "auto" and not sys.stderr.isatty())
    renderer: Any = (
        structlog.processors.JSONRenderer()
        if json_out
        else structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso"),  # UTC, structlog's default
            structlog.processors.format_exc_info,
            SecretScrubber(secrets),
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelName(level)),
        # Loggers are not cached on first use (structlog's default): the CLI configures
        # logging only once the settings are read, after modules made their loggers.
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
    )
