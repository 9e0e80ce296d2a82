"""Hand-written fakes of the exporter's injectable collaborators: time and `requests.post`.

Unit tests never open sockets: the sinks take `post`, `sleep` and `clock` as arguments, and
these fakes fill those slots while recording what the sink did with them. Each fake is named
`Fake<RealThing>` after what it stands in for.

- `FakeClock`: `time.time`, only moving when told to.
- `FakeSleep`: `time.sleep`, recording each delay (and, when given a clock, advancing it by
  that delay so deadlines behave as in real time).
- `FakeResponse`: the attributes of `requests.Response` the sinks read.
- `FakePost`: `requests.post`, answering from a script of replies.

The package's other modules, each importing from this one (never the other way round):

- `tests.fakes.mlflow_server`: an in-memory MLflow server (`FakeMlflow`);
- `tests.fakes.sinks`: a history sink and the Pushgateway as the runner uses them;
- `tests.fakes.http`: `requests.get`, a slow server, prometheus_client's urllib opener, WSGI;
- `tests.fakes.remote_write`: a Prometheus remote write receiver (`FakeReceiver`).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any


class FakeClock:
    """Stands in for `time.time`: epoch seconds from `start`, moving only on `advance()`."""

    def __init__(self, start: float = 1_705_314_585.123) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class FakeSleep:
    """Stands in for `time.sleep`: records each delay instead of waiting."""

    def __init__(self, clock: FakeClock | None = None) -> None:
        self.delays: list[float] = []
        self.clock = clock

    def __call__(self, seconds: float) -> None:
        self.delays.append(seconds)
        if self.clock is not None:
            self.clock.advance(seconds)


@dataclass
class FakeResponse:
    """Stands in for `requests.Response`: the status, body text and headers a sink reads."""

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
    """Stands in for `requests.post`, answering from a script and recording every call.

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
