"""Probes for `check-config`: one request to a backend, answered in one line.

A probe is one request with a short timeout and no retries; its answer is one line that
names the backend, its address and, when it fails, the setting to check.
"""

from __future__ import annotations

from typing import Any

import requests

from exporter.errors import reason

Probe = tuple[bool, str]  # (answers, one line for the operator)


def http_answers(
    name: str,
    variable: str,
    url: str,
    method: str = "GET",
    **kwargs: Any,
) -> Probe:
    """Whether `name` at `url` answers `method`: any status but 401/403 and 5xx counts (a
    write endpoint may refuse a bodiless HEAD with 400 or 405 and still be the right one);
    `variable` is the setting named when it does not."""
    check = f"is it running, and is {variable} right?"
    try:
        response = requests.request(method, url, timeout=5, **kwargs)
    except requests.RequestException as exc:
        return False, f"cannot reach {name} at {url} ({reason(exc)}): {check}"
    if response.status_code in (401, 403):
        return False, f"{name} at {url} answered HTTP {response.status_code}: check its key"
    if response.status_code >= 500:
        return False, f"{name} at {url} answered HTTP {response.status_code}: {check}"
    return True, f"{name} answers (HTTP {response.status_code})"
