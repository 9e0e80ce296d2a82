"""One line out of an HTTP client's exception: what a user needs to read, nothing more."""

from __future__ import annotations

import re

# Causes worth naming as they are, whatever library wrapped them.
KNOWN_CAUSES = (
    "Connection refused",
    "Name or service not known",
    "Temporary failure in name resolution",
    "No route to host",
    "timed out",
)
_ERRNO = re.compile(r"\[Errno -?\d+\] ([^'\")\]]+)")


def reason(exc: BaseException) -> str:
    """`connection refused`, `HTTP 503 Service Unavailable`, ...: the cause of a failed
    request on one short line (urllib, requests and urllib3 wrap it differently)."""
    code = getattr(exc, "code", None)
    if isinstance(code, int):  # urllib's HTTPError
        return f"HTTP {code} {getattr(exc, 'reason', '')}".strip()
    cause = getattr(exc, "reason", None)
    text = str(cause if cause is not None else exc)
    for known in KNOWN_CAUSES:
        if known.lower() in text.lower():
            return known.lower()
    match = _ERRNO.search(text)
    if match:
        return match.group(1).strip().lower()
    first = text.splitlines()[0][:160] if text else ""
    return first or type(exc).__name__
