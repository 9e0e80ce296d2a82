"""Hand-written fakes of HTTP clients and servers for sinks and endpoints (no socket anywhere).

- `FakeSlowPost`: `requests.post` to a slow server: wraps a `post` fake and moves a
  `FakeClock` on each call, playing the server's delay against the delivery budget.
- `http_response`: a real `requests.Response` built by hand (status, headers, a body read from
  memory as if streamed), so `raise_for_status`, `json` and `iter_lines` behave exactly as
  they do for an answer from the network.
- `FakeGet`: `requests.get`, answering from a script of responses and
  exceptions, recording each call's URL and keyword arguments.
- `FakeOpener`: stands in for urllib's `build_opener(...)` inside prometheus_client's push
  handlers: records each `urllib.request.Request` (method, URL, headers, body, timeout) and
  answers from a script (a status, or an exception instance to raise).
- `FakeStartResponse`: the WSGI server's `start_response`, recording what the app started;
  `environ` and `call_wsgi` call a WSGI app directly with it.
"""

from __future__ import annotations

import io
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.request import Request
from wsgiref.util import setup_testing_defaults

import requests

from tests.fakes import FakeClock


class FakeSlowPost:
    """Stands in for `requests.post` to a slow server: moves `clock` by `seconds`, asks `inner`."""

    def __init__(self, inner: Callable[..., Any], clock: FakeClock, seconds: float) -> None:
        self.inner = inner
        self.clock = clock
        self.seconds = seconds

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        self.clock.advance(self.seconds)
        return self.inner(*args, **kwargs)


def http_response(
    status: int = 200,
    body: bytes | str = b"",
    headers: Mapping[str, str] | None = None,
    url: str = "http://example.test/",
) -> requests.Response:
    """A `requests.Response` as the adapter would build it, its body read from memory."""
    response = requests.Response()
    response.status_code = status
    response.url = url
    response.reason = {200: "OK", 404: "Not Found", 500: "Internal Server Error"}.get(status, "")
    response.headers = requests.structures.CaseInsensitiveDict(headers or {})
    response.encoding = requests.utils.get_encoding_from_headers(response.headers)
    response.raw = io.BytesIO(body.encode() if isinstance(body, str) else body)
    return response


@dataclass(frozen=True)
class GetCall:
    """One request the code made: the URL and the keyword arguments it passed to `get`."""

    url: str
    kwargs: Mapping[str, Any]


class FakeGet:
    """Stands in for `requests.get`, answering from a script and recording every call.

    Each call takes the next scripted item, a `requests.Response` (returned) or an exception
    instance (raised).
    """

    def __init__(self, script: Iterable[requests.Response | BaseException]) -> None:
        self.script: deque[requests.Response | BaseException] = deque(script)
        self.calls: list[GetCall] = []

    def __call__(self, url: str, **kwargs: Any) -> requests.Response:
        self.calls.append(GetCall(url, kwargs))
        item = self.script.popleft()
        if isinstance(item, BaseException):
            raise item
        return item


@dataclass(frozen=True)
class OpenedRequest:
    """One request prometheus_client made, as urllib would have sent it."""

    method: str
    url: str
    headers: Mapping[str, str]
    body: bytes
    timeout: float | None


class _Answer:
    """What urllib's `open` returns, as far as prometheus_client reads it."""

    def __init__(self, code: int) -> None:
        self.code = code
        self.msg = "OK" if code < 400 else "error"


class FakeOpener:
    """Stands in for urllib's `build_opener` inside prometheus_client's push handlers.

    Monkeypatch it over `prometheus_client.exposition.build_opener`: calling it returns this
    object, whose `open` records the request and answers from `script` (an int status, or an
    exception instance to raise, as urllib raises URLError and HTTPError).
    """

    def __init__(self, script: Iterable[int | BaseException] = ()) -> None:
        self.script: deque[int | BaseException] = deque(script)
        self.requests: list[OpenedRequest] = []

    def __call__(self, *handlers: Any) -> FakeOpener:
        return self

    def open(self, request: Request, timeout: float | None = None) -> _Answer:
        headers = {
            k.lower(): str(v if isinstance(v, str) else v.decode())
            for k, v in request.header_items()
        }
        body = request.data or b""
        assert isinstance(body, bytes), body  # prometheus_client sends its exposition as bytes
        self.requests.append(
            OpenedRequest(request.get_method(), request.full_url, headers, body, timeout)
        )
        item = self.script.popleft() if self.script else 200
        if isinstance(item, BaseException):
            raise item
        return _Answer(item)


class FakeStartResponse:
    """Stands in for a WSGI server's `start_response`, recording the status line and headers."""

    def __init__(self) -> None:
        self.status: str | None = None
        self.headers: dict[str, str] = {}

    def __call__(self, status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Any:
        self.status = status
        self.headers = dict(headers)
        return lambda data: None

    @property
    def code(self) -> int:
        assert self.status is not None, "the app never called start_response"
        return int(self.status.split()[0])


def environ(path: str, method: str = "GET") -> dict[str, Any]:
    """A minimal WSGI environ for a GET of `path` (wsgiref fills in the required keys)."""
    env: dict[str, Any] = {"PATH_INFO": path, "REQUEST_METHOD": method}
    setup_testing_defaults(env)
    return env


def call_wsgi(
    app: Callable[..., Iterable[bytes]], path: str, headers: Mapping[str, str] | None = None
) -> tuple[FakeStartResponse, bytes]:
    """Call `app` for `path` with request `headers`; the recorded start and the whole body."""
    start = FakeStartResponse()
    env = environ(path)
    for name, value in (headers or {}).items():
        env["HTTP_" + name.upper().replace("-", "_")] = value
    body = b"".join(app(env, start))
    return start, body
