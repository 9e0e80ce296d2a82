"""A fake Prometheus remote write receiver, standing in for `requests.post` (no socket).

`FakeReceiver` decodes each body and answers the way Prometheus 2.42 answered in the
integration tests (tests/integration/test_remote_write_receivers.py):

- a request is all or nothing: one refused sample refuses the whole request, nothing is stored;
- a sample older than `oldest_ms` (the receiver's lower bound) is refused with `too_old`
  (default HTTP 400 "out of bounds", Prometheus without an out-of-order window; pass
  `(500, "too old sample\\n")` for a window shorter than the data's age);
- with `in_order=True` (no out-of-order window) a sample older than its series' newest stored
  one is refused with HTTP 400 "out of order sample";
- a different value at a stored timestamp is refused with HTTP 400
  "duplicate sample for timestamp"; the same value again is accepted and stored once;
- otherwise HTTP 204 with an empty body.

Statuses in `outages` are answered first, one per call, before any of the above (e.g. 503 to
play a receiver that is restarting). Every call is recorded in `calls`, whatever it answered.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from exporter.sinks import remote_write as rw
from tests.fakes import FakeResponse

Labels = tuple[tuple[str, str], ...]


@dataclass(frozen=True)
class ReceivedCall:
    """One POST as the receiver saw it: where, which headers, and the decoded series."""

    url: str
    headers: Mapping[str, str]
    series: list[rw.TimeSeries]
    status: int


class FakeReceiver:
    """Stands in for `requests.post` to a Prometheus remote write receiver, storing samples."""

    def __init__(
        self,
        oldest_ms: int | None = None,
        in_order: bool = True,
        too_old: tuple[int, str] = (400, "out of bounds\n"),
        outages: Iterable[int] = (),
    ) -> None:
        self.oldest_ms = oldest_ms
        self.in_order = in_order
        self.too_old = too_old
        self.outages: deque[int] = deque(outages)
        self.stored: dict[Labels, dict[int, float]] = {}
        self.calls: list[ReceivedCall] = []

    def __call__(
        self,
        url: str,
        data: bytes = b"",
        headers: Mapping[str, str] | None = None,
        **_: Any,
    ) -> FakeResponse:
        series = rw.decode(data)
        if self.outages:
            status, text = self.outages.popleft(), "unavailable\n"
        else:
            status, text = self._refusal(series) or (204, "")
            if status == 204:
                for ts in series:
                    self.stored.setdefault(ts.labels, {}).update(ts.samples)
        self.calls.append(ReceivedCall(url, dict(headers or {}), series, status))
        return FakeResponse(status_code=status, text=text)

    def samples(self, labels: Labels) -> list[tuple[int, float]]:
        """What is stored for one series, oldest first."""
        return sorted(self.stored.get(labels, {}).items())

    def _refusal(self, series: list[rw.TimeSeries]) -> tuple[int, str] | None:
        for ts in series:
            stored = self.stored.get(ts.labels, {})
            newest = max(stored, default=None)
            for timestamp, value in ts.samples:
                if self.oldest_ms is not None and timestamp < self.oldest_ms:
                    return self.too_old
                if timestamp in stored:
                    if stored[timestamp] != value:
                        return 400, "duplicate sample for timestamp\n"
                elif self.in_order and newest is not None and timestamp < newest:
                    return 400, "out of order sample\n"
        return None
