"""Small hand-written stand-ins for the exporter's injectable collaborators.

Unit tests never open sockets: `PramathusSink` takes `post`, `sleep` and `clock` as
arguments, and these fakes fill those slots while recording what the sink did with them.

- `FakeClock`: a `time.time` replacement that only moves when told to.
- `SleepRecorder`: a `time.sleep` replacement that records each delay (and, when given a
  clock, advances it by that delay so deadlines behave as in real time).
- `FakeResponse`: the three attributes of `requests.Response` the sink reads.
- `FakePost`: a `requests.post` replacement answering from a script of replies.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any


class FakeClock:
    """Callable returning seconds since the epoch; starts at `start`, moves on `advance()`."""

    def __init__(self, start: float = 1_705_314_585.123) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class SleepRecorder:
    """Callable standing in for `time.sleep`: records each delay instead of waiting."""

    def __init__(self, clock: FakeClock | None = None) -> None:
        self.delays: list[float] = []
        self.clock = clock

    def __call__(self, seconds: float) -> None:
        self.delays.append(seconds)
        if self.clock is not None:
            self.clock.advance(seconds)


@dataclass
class FakeResponse:
    """What the sink reads from a `requests.Response`: status, body text, headers."""

    status_code: int = 200
    text: str = '{"status": "ok"}'
    headers: Mapping[str, str] = field(default_factory=dict)
    content: bytes = b""  # the raw body, where a sink decodes it (an OTLP answer)


@dataclass(frozen=True)
class PostCall:
    """One request the sink made: exactly the arguments it passed to `post`."""

    url: str
    data: bytes
    headers: Mapping[str, str]
    timeout: float | None
    verify: bool | str | None


class FakePost:
    """Callable standing in for `requests.post`.

    Each call takes the next item of `script`: an `int` (a status with an empty body), a
    `FakeResponse`, or an exception instance (raised, as `requests` raises connection
    errors). When the script is empty every call gets `default` (200 unless set).
    Every call is recorded in `calls`, in order, whatever it answered.
    """

    def __init__(
        self,
        script: Iterable[int | FakeResponse | BaseException] = (),
        default: FakeResponse | None = None,
    ) -> None:
        self.script: deque[int | FakeResponse | BaseException] = deque(script)
        self.default = default or FakeResponse()
        self.calls: list[PostCall] = []

    def __call__(
        self,
        url: str,
        data: bytes = b"",
        headers: Mapping[str, str] | None = None,
        timeout: float | None = None,
        verify: bool | str | None = None,
        **_: Any,
    ) -> FakeResponse:
        self.calls.append(PostCall(url, data, dict(headers or {}), timeout, verify))
        reply = self.script.popleft() if self.script else self.default
        if isinstance(reply, BaseException):
            raise reply
        if isinstance(reply, int):
            return FakeResponse(status_code=reply, text="")
        return reply

    @property
    def idempotency_keys(self) -> list[str]:
        return [call.headers["Idempotency-Key"] for call in self.calls]
