r"""Prometheus remote write v1: wire encoding, response classification and a one-shot client.

A request body is a `prometheus.WriteRequest` protobuf, compressed with snappy's BLOCK format
(not the framed format). The message classes are built at import time from a descriptor made
in code, so there is no protoc step and no generated module. Queueing and retrying belong to
the caller: `RemoteWriteClient.send` makes exactly one POST and says what the answer means.

Measured answers (tests/integration/test_remote_write_receivers.py; bodies end with "\n"):

- Accepted: HTTP 204, empty body (Prometheus 2.42 and VictoriaMetrics 1.79).
- Prometheus 2.42 `--web.enable-remote-write-receiver` refuses a request as a whole: one
  refused sample and none of it is stored (measured for the first two cases):
  - no out-of-order window, a sample over ~1 h older than the newest in the head:
    400 `out of bounds` (an empty head takes anything: the first request sets its range);
  - a window shorter than the sample's age: 500 `too old sample` (TOO_OLD, not RETRY);
  - no window, older than its series' newest sample: 400 `out of order sample`;
  - another value at a stored timestamp: 400 `duplicate sample for timestamp`
    (window or not); the same value again: 204;
  - a body that is not snappy block format: 400 `snappy: corrupt input`.
- VictoriaMetrics 1.79 stores samples of any age within -retentionPeriod and answers 204 for
  older ones too, dropping them silently (a log warning only); it drops NaN, keeps ~12
  significant digits, stores a resent sample twice; not snappy: 400
  `...cannot decompress request with length N: snappy: corrupt input`.
"""

from __future__ import annotations

import base64
import itertools
import re
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Protocol
from urllib.parse import urlsplit, urlunsplit

import cramjam
import requests

# protobuf ships neither stubs nor a py.typed marker; the three names used here are small.
from google.protobuf import (
    descriptor_pb2,
    descriptor_pool,
    message_factory,
)
from google.protobuf.message import DecodeError

from exporter.config import RemoteWriteSettings
from exporter.errors import reason
from exporter.logs import redact
from exporter.sinks.delivery import post_without_redirects, retry_after_seconds

USER_AGENT = "mlflow-monitoring-exporter"
PROTOCOL_HEADERS = {
    "Content-Encoding": "snappy",
    "Content-Type": "application/x-protobuf",
    "X-Prometheus-Remote-Write-Version": "0.1.0",
}

# --- protobuf messages ------------------------------------------------------------------------

_F = descriptor_pb2.FieldDescriptorProto
# (message, field, number, type, repeated message type or None), as in prometheus/prompb
# types.proto and remote.proto (v1). WriteRequest's metadata (3) is left out: never sent.
_FIELDS: tuple[tuple[str, str, int, int, str | None], ...] = (
    ("Label", "name", 1, _F.TYPE_STRING, None),
    ("Label", "value", 2, _F.TYPE_STRING, None),
    ("Sample", "value", 1, _F.TYPE_DOUBLE, None),
    ("Sample", "timestamp", 2, _F.TYPE_INT64, None),
    ("TimeSeries", "labels", 1, _F.TYPE_MESSAGE, "Label"),
    ("TimeSeries", "samples", 2, _F.TYPE_MESSAGE, "Sample"),
    ("WriteRequest", "timeseries", 1, _F.TYPE_MESSAGE, "TimeSeries"),
)


def _write_request_class() -> Any:
    """Build `prometheus.WriteRequest` (and the messages it holds) from a descriptor in code."""
    proto = descriptor_pb2.FileDescriptorProto(
        name="mlflow_monitoring/prometheus_remote_write_v1.proto",
        package="prometheus",
        syntax="proto3",
    )
    messages: dict[str, Any] = {}
    for message, name, number, kind, type_name in _FIELDS:
        if message not in messages:
            messages[message] = proto.message_type.add(name=message)
        messages[message].field.add(
            name=name,
            number=number,
            type=kind,
            label=_F.LABEL_REPEATED if type_name else _F.LABEL_OPTIONAL,
            type_name=f".prometheus.{type_name}" if type_name else None,
        )
    # Field 2 of WriteRequest is reserved upstream (Cortex used it); keep it reserved here too.
    messages["WriteRequest"].reserved_range.add(start=2, end=3)
    # A private pool: another library registering `prometheus.*` in the default pool (or us
    # being imported twice) can then never clash.
    pool = descriptor_pool.DescriptorPool()
    pool.Add(proto)
    return message_factory.GetMessageClass(pool.FindMessageTypeByName("prometheus.WriteRequest"))


_WriteRequest = _write_request_class()


# --- series and bodies ------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class TimeSeries:
    """One series of a write request.

    `labels` are (name, value) pairs sorted by name, names unique, `__name__` among them (the
    remote write spec requires sorted labels and a metric name). `samples` are
    (timestamp_ms, value) pairs in strictly ascending timestamp order: two values at one
    timestamp are refused here because receivers disagree about them (Prometheus rejects the
    whole request, VictoriaMetrics keeps both), so the caller must pick one.
    """

    labels: tuple[tuple[str, str], ...]
    samples: tuple[tuple[int, float], ...]

    def __post_init__(self) -> None:
        names = [name for name, _ in self.labels]
        if any(a >= b for a, b in itertools.pairwise(names)):
            raise ValueError(f"labels must be sorted by name and unique: {names}")
        if not dict(self.labels).get("__name__"):
            raise ValueError(f"labels have no __name__: {names}")
        stamps = [t for t, _ in self.samples]
        if any(a >= b for a, b in itertools.pairwise(stamps)):
            raise ValueError(f"sample timestamps of {self.name} are not strictly ascending")

    @property
    def name(self) -> str:
        """The metric name (the `__name__` label)."""
        return dict(self.labels)["__name__"]

    @classmethod
    def of(
        cls, name: str, labels: Mapping[str, str], samples: Sequence[tuple[int, float]]
    ) -> TimeSeries:
        """Build a series from unsorted labels (without `__name__`) and unsorted samples."""
        pairs = tuple(sorted({**labels, "__name__": name}.items()))
        return cls(
            pairs, tuple(sorted(((int(t), float(v)) for t, v in samples), key=lambda p: p[0]))
        )


def encode(series: Sequence[TimeSeries]) -> bytes:
    """A snappy-compressed (block format) `WriteRequest` holding `series`, ready to POST."""
    request = _WriteRequest()
    for ts in series:
        message = request.timeseries.add()
        for name, text in ts.labels:
            message.labels.add(name=name, value=text)
        for timestamp, number in ts.samples:
            message.samples.add(timestamp=timestamp, value=number)
    return bytes(cramjam.snappy.compress_raw(request.SerializeToString()))


def decode(body: bytes) -> list[TimeSeries]:
    """The series of an encoded body (the inverse of `encode`); ValueError if it is not one."""
    try:
        request = _WriteRequest.FromString(bytes(cramjam.snappy.decompress_raw(body)))
    except (cramjam.DecompressionError, DecodeError) as exc:
        raise ValueError(f"not a snappy-compressed remote write request: {exc}") from None
    return [
        TimeSeries(
            tuple((str(label.name), str(label.value)) for label in ts.labels),
            tuple((int(s.timestamp), float(s.value)) for s in ts.samples),
        )
        for ts in request.timeseries
    ]


def sample_count(body: bytes) -> int:
    """How many samples an encoded body holds."""
    return sum(len(ts.samples) for ts in decode(body))


def split(body: bytes) -> tuple[bytes, bytes]:
    """Halve an encoded body by sample count: (older half, newer half), both non-empty.

    Samples are ordered by timestamp across all series and cut in the middle, so each half
    keeps every series' labels and the first half holds the oldest samples. Receivers refuse
    samples for their age (or their order), so cutting by time isolates the refused ones in
    few steps when a whole request is turned down. Send the older half first: a receiver
    without an out-of-order window refuses for good any sample older than one already stored
    for its series. ValueError for fewer than 2 samples.
    """
    series = decode(body)
    order = sorted(
        (timestamp, index) for index, ts in enumerate(series) for timestamp, _ in ts.samples
    )
    if len(order) < 2:
        raise ValueError(f"cannot split a body of {len(order)} sample(s)")
    # Timestamps ascend within a series, so the older half takes a prefix of each series.
    taken = [0] * len(series)
    for _, index in order[: len(order) // 2]:
        taken[index] += 1
    older = [
        TimeSeries(ts.labels, ts.samples[:k]) for ts, k in zip(series, taken, strict=True) if k
    ]
    newer = [
        TimeSeries(ts.labels, ts.samples[k:])
        for ts, k in zip(series, taken, strict=True)
        if k < len(ts.samples)
    ]
    return encode(older), encode(newer)


# --- what an answer means ---------------------------------------------------------------------


class Verdict(Enum):
    """What a receiver's answer means for the samples of the request."""

    ACCEPTED = "accepted"  # 2xx: stored
    RETRY = "retry"  # may succeed later: 5xx, 408, 425, 429, connection error, timeout
    TOO_OLD = "too_old"  # never taken: older than the receiver accepts
    OUT_OF_ORDER = "out_of_order"  # never taken: older than (or a new value for) what is stored
    REJECTED = "rejected"  # never taken as sent: other 4xx (bad request, auth, too large...)


# Lower-case fragments of receivers' answers. Too-old patterns are tried first: Mimir's too-old
# text (with an out-of-order window) also mentions "out-of-order".
_TOO_OLD = re.compile(
    "|".join(  # noqa: FLY002 - one commented fragment per line
        (
            r"out of bounds",  # Prometheus storage.ErrOutOfBounds (400), wrapped by Cortex, Thanos
            r"too old sample",  # Prometheus storage.ErrTooOldSample (500 in 2.42), Thanos (409)
            r"sample-timestamp-too-old",  # Mimir err-mimir-sample-timestamp-too-old (400)
            r"timestamp too old",  # Cortex distributor "timestamp too old: <ts> metric: ..."
            r"too far in the past",
            r"beyond the out-of-order time window",  # Mimir, window set but too small
        )
    )
)
_OUT_OF_ORDER = re.compile(
    "|".join(  # noqa: FLY002 - one commented fragment per line
        (
            r"out of order sample",  # Prometheus storage.ErrOutOfOrderSample
            r"duplicate sample for timestamp",  # Prometheus ErrDuplicateSampleForTimestamp
            r"sample-out-of-order",  # Mimir err-mimir-sample-out-of-order
            r"sample-duplicate-timestamp",  # Mimir err-mimir-sample-duplicate-timestamp
            r"new-value-for-timestamp",  # Cortex discard reason
        )
    )
)
# Statuses whose body decides: Prometheus answers too-old with 400 or 500, Thanos with 409.
_BODY_DECIDES = frozenset({400, 409, 422, 500})


def classify(status: int, body_text: str) -> Verdict:
    """What HTTP `status` with `body_text` from a remote write receiver means (pure)."""
    if 200 <= status < 300:
        return Verdict.ACCEPTED
    if status in _BODY_DECIDES:
        text = body_text.lower()
        if _TOO_OLD.search(text):
            return Verdict.TOO_OLD
        if _OUT_OF_ORDER.search(text):
            return Verdict.OUT_OF_ORDER
    if status >= 500 or status in (408, 425, 429):
        return Verdict.RETRY
    return Verdict.REJECTED


# --- the client -------------------------------------------------------------------------------


class Response(Protocol):
    """The parts of a `requests.Response` the client reads."""

    @property
    def status_code(self) -> int: ...
    @property
    def text(self) -> str: ...
    @property
    def headers(self) -> Mapping[str, str]: ...


@dataclass(frozen=True)
class SendResult:
    """The outcome of one POST: `status` is None when no HTTP answer came back."""

    verdict: Verdict
    status: int | None
    message: str
    retry_after: float | None = None
    location: str | None = None  # a redirect's Location, never followed for a 301/302/303


# Header names whose configured values are credentials (masked if a receiver echoes them).
_SECRET_HEADER = re.compile(r"authorization|token|key|secret|password|cookie", re.IGNORECASE)
_MESSAGE_LIMIT = 300


@dataclass
class RemoteWriteClient:
    """POSTs encoded bodies to one receiver, one request per `send`, never retrying itself.

    `post` (default `requests.post`) and `clock` are injectable so tests need no socket.
    """

    settings: RemoteWriteSettings
    post: Callable[..., Response] = field(default=requests.post, repr=False)
    clock: Callable[[], float] = field(default=time.time, repr=False)
    headers: dict[str, str] = field(init=False, repr=False)
    _secrets: tuple[str, ...] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if not self.settings.url:
            raise ValueError("remote_write.url is not set")
        self.headers, self._secrets = request_headers(self.settings)

    def __repr__(self) -> str:
        return f"RemoteWriteClient(url={self.shown_url!r})"

    @property
    def shown_url(self) -> str:
        """The URL as messages show it: without query or fragment (they may carry a key)."""
        return _shown(str(self.settings.url))

    def send(self, body: bytes, timeout: float | None = None) -> SendResult:
        """POST `body` once (waiting at most `timeout` when shorter than the configured
        timeout) and classify the answer; connection errors become RETRY."""
        s = self.settings
        wait = s.timeout_seconds if timeout is None else min(s.timeout_seconds, timeout)
        try:
            response, url = post_without_redirects(
                self.post,
                str(s.url),
                data=body,
                headers=dict(self.headers),
                timeout=wait,
                verify=s.ca_bundle or s.verify_tls,
            )
        except (requests.exceptions.InvalidURL, requests.exceptions.InvalidHeader) as exc:
            return SendResult(Verdict.REJECTED, None, self._failure(exc))
        except requests.RequestException as exc:
            return SendResult(Verdict.RETRY, None, self._failure(exc))
        status = int(response.status_code)
        text = self._mask(response.text or "")
        verdict = classify(status, text)
        excerpt = " ".join(text.split())[:_MESSAGE_LIMIT]
        where = "" if url == str(s.url) else f" (at {_shown(url)})"
        message = f"POST {self.shown_url}: HTTP {status}{where}" + (
            f": {excerpt}" if excerpt else ""
        )
        retry_after = retry_after_seconds(response.headers.get("Retry-After"), self.clock())
        location = response.headers.get("Location")
        return SendResult(
            verdict, status, message, retry_after, _shown(location) if location else None
        )

    def _failure(self, exc: Exception) -> str:
        detail = " ".join(self._mask(reason(exc)).split())[:_MESSAGE_LIMIT]
        check = "is the receiver up, and is REMOTE_WRITE_URL right?"
        return f"POST {self.shown_url} failed ({detail}): {check}"

    def _mask(self, text: str) -> str:
        return redact(text, self._secrets)


def _shown(url: str) -> str:
    """A URL without user info, query or fragment (any of them may carry a credential)."""
    parts = urlsplit(url)
    host = parts.netloc.rsplit("@", 1)[-1]
    return urlunsplit((parts.scheme, host, parts.path, "", ""))


def request_headers(s: RemoteWriteSettings) -> tuple[dict[str, str], tuple[str, ...]]:
    """The headers of every request, and the secret strings among them (longest first)."""
    headers = requests.structures.CaseInsensitiveDict({"User-Agent": USER_AGENT})
    # Configured extra headers (a tenant id...) may replace the User-Agent, but not the headers
    # describing the body, nor the configured credentials.
    headers.update(s.headers)
    headers.update(PROTOCOL_HEADERS)
    secrets = [v for k, v in s.headers.items() if _SECRET_HEADER.search(k) and v]
    if s.bearer_token is not None:
        token = s.bearer_token.get_secret_value()
        headers["Authorization"] = f"Bearer {token}"
        secrets.append(token)
    elif s.username is not None or s.password is not None:
        user = s.username.get_secret_value() if s.username else ""
        password = s.password.get_secret_value() if s.password else ""
        basic = base64.b64encode(f"{user}:{password}".encode()).decode("ascii")
        headers["Authorization"] = f"Basic {basic}"
        secrets += [password, basic]
    # Longest first, so a secret containing another is masked whole.
    return dict(headers), tuple(sorted({x for x in secrets if x}, key=len, reverse=True))
