"""Durations, parsed one way everywhere.

Alert rules carry Prometheus durations as Prometheus reads them (`30s`, `15m`, `1h30m`,
`1d`: whole numbers, units largest first). Settings that are a length of time take the same
strings, a bare number of seconds, or one decimal unit (`1.5h`).
"""

from __future__ import annotations

import re
from typing import Any

# Prometheus' duration grammar (model.ParseDuration): units largest first, each at most once.
PROMETHEUS = re.compile(
    r"(?:(\d+)y)?(?:(\d+)w)?(?:(\d+)d)?(?:(\d+)h)?(?:(\d+)m)?(?:(\d+)s)?(?:(\d+)ms)?"
)
_UNITS = (31_536_000, 604_800, 86_400, 3_600, 60, 1, 0.001)
_ONE_UNIT = re.compile(r"(\d+(?:\.\d+)?)([smhdwy]?)")
_UNIT = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800, "y": 31536000}


def prometheus_seconds(text: str) -> float:
    """Seconds in a Prometheus duration such as `90s`, `15m` or `1h30m`."""
    if text == "0":
        return 0.0
    match = PROMETHEUS.fullmatch(text)
    if not text or match is None:
        raise ValueError(f"not a Prometheus duration: {text!r}")
    return sum(int(n) * unit for n, unit in zip(match.groups(), _UNITS, strict=True) if n)


def prometheus_duration(value: Any) -> Any:
    """A Prometheus duration string, unchanged (validator); anything else is an error."""
    if not isinstance(value, str):
        # A bare number is ambiguous (seconds? minutes?) and Prometheus rejects it.
        # pydantic reports a ValueError raised in a validator with its key path.
        raise ValueError("must be a Prometheus duration string such as 30s, 15m, 1h30m or 1d")  # noqa: TRY004
    text = value.strip()
    if text != "0" and (not text or PROMETHEUS.fullmatch(text) is None):
        raise ValueError(
            f"{text!r} is not a Prometheus duration (like 30s, 15m, 1h30m or 1d: "
            "whole numbers, units y w d h m s ms, largest first)"
        )
    return text


def seconds(value: Any) -> Any:
    """A setting's length of time in seconds (validator): numbers as they are; strings as a
    Prometheus duration (`1h30m`), a number of seconds (`3600`) or one decimal unit (`1.5h`)."""
    if not isinstance(value, str):
        return value  # pydantic checks the number
    text = value.strip()
    one = _ONE_UNIT.fullmatch(text)
    if one:
        return float(one.group(1)) * _UNIT[one.group(2)]
    try:
        return prometheus_seconds(text)
    except ValueError:
        raise ValueError("not a duration like 3600, 90s, 15m, 1h30m, 12h, 60d, 2w or 1y") from None
