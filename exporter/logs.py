"""structlog set-up: JSON lines off a terminal, readable console output on one.

A last processor replaces any registered secret wherever it appears in an event, as a
safety net behind the rule that secrets are never passed to a logger in the first place.
`redact` is the one redaction every output uses (logs, errors, /healthz, /readyz,
check-config): the configured secrets in every form they travel in (see `secret_forms`),
and any `Bearer`/`Basic` credential or `Authorization`/api-key value an answer echoes.
"""

from __future__ import annotations

import base64
import logging
import re
import sys
from collections.abc import Iterable, MutableMapping
from typing import Any
from urllib.parse import quote, quote_plus

import structlog

MASK = "**********"
MIN_SECRET = 4  # shorter values would mask ordinary words

# A credential in an echoed request or answer, whatever its value: the scheme word stays.
# Capitalised as HTTP clients send them (OAuth's token_type is `bearer`); a value of eight
# characters or more, so "Basic auth" or "bearer tokens" in a sentence stay readable.
_SCHEME = re.compile(r"\b(Bearer|Basic|bearer)(\s+)[A-Za-z0-9._~+/=-]{8,}")
_FIELD = re.compile(
    r"""(\b(?:proxy-)?authorization|\bx-api-key|\bapi[-_]?key|\bpassword|\bsecret)"""
    r"""(["']?\s*[:=]\s*["']?)(?!(?:Bearer|Basic)\b)([^\s"',;&}]+)""",
    re.IGNORECASE,
)


def secret_forms(secrets: Iterable[str], pairs: Iterable[tuple[str, str]] = ()) -> list[str]:
    """Every form a secret travels in, longest first: as it is, URL-encoded, base64, and
    `user:password` in base64 (HTTP basic auth) for each (user, password) pair."""
    forms: set[str] = set()
    for secret in secrets:
        if len(secret) >= MIN_SECRET:
            forms |= {secret, quote(secret, safe=""), quote_plus(secret), _b64(secret)}
    for user, password in pairs:
        if len(password) >= MIN_SECRET:
            forms.add(_b64(f"{user}:{password}"))
    return sorted(forms, key=len, reverse=True)


def _b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode("ascii")


def redact(text: str, secrets: Iterable[str] = ()) -> str:
    """`text` with every secret (longest first) and every echoed credential masked."""
    for secret in secrets:
        text = text.replace(secret, MASK)
    text = _SCHEME.sub(lambda m: f"{m.group(1)}{m.group(2)}{MASK}", text)
    return _FIELD.sub(lambda m: f"{m.group(1)}{m.group(2)}{MASK}", text)


class SecretScrubber:
    """structlog processor that masks known secret strings in every event value."""

    def __init__(self, secrets: Iterable[str] = ()) -> None:
        self.secrets = sorted({s for s in secrets if len(s) >= MIN_SECRET}, key=len, reverse=True)

    def _clean(self, value: Any) -> Any:
        if isinstance(value, str):
            return redact(value, self.secrets)
        if isinstance(value, dict):
            return {k: self._clean(v) for k, v in value.items()}
        if isinstance(value, list | tuple):
            return type(value)(self._clean(v) for v in value)
        return value

    def __call__(
        self, _logger: Any, _name: str, event: MutableMapping[str, Any]
    ) -> MutableMapping[str, Any]:
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
