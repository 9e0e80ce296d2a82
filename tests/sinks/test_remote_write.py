"""Unit tests for exporter.sinks.remote_write: wire format, splitting, verdicts, client.

No sockets: the client gets `tests.fakes.FakePost` (scripted answers) or
`tests.fakes.remote_write.FakeReceiver` (decodes bodies, refuses like Prometheus 2.42).
The wire format is checked independently of the module's own message classes: bodies are
decompressed with cramjam's raw snappy and parsed as protobuf unknown fields, by number.
"""

from __future__ import annotations

import math
import struct
from datetime import UTC, datetime
from email.utils import format_datetime
from typing import Any

import cramjam
import pytest
import requests
from google.protobuf import empty_pb2
from google.protobuf.unknown_fields import UnknownFieldSet
from hypothesis import given, settings
from hypothesis import strategies as st

from exporter.config import RemoteWriteSettings
from exporter.logs import MASK
from exporter.sinks import remote_write as rw
from exporter.sinks.delivery import retry_after_seconds
from exporter.sinks.remote_write import RemoteWriteClient, TimeSeries, Verdict
from tests.fakes import FakeClock, FakePost, FakeResponse
from tests.fakes.remote_write import FakeReceiver

NOW_MS = 1_795_000_000_000
DAY_MS = 86_400_000
URL = "http://receiver.test:9090/api/v1/write"


def bits(value: float) -> int:
    """A double's bit pattern: equal for equal NaNs, different for 0.0 and -0.0."""
    return int(struct.unpack("<Q", struct.pack("<d", value))[0])


def comparable(series: list[TimeSeries]) -> list[Any]:
    return [(ts.labels, [(t, bits(v)) for t, v in ts.samples]) for ts in series]


def flat(series: list[TimeSeries]) -> list[Any]:
    """Every sample with its series' labels, as a sorted list (NaN-safe)."""
    return sorted((ts.labels, t, bits(v)) for ts in series for t, v in ts.samples)


# --- strategies -------------------------------------------------------------------------------

# Any text protobuf can carry as a string: every code point except lone surrogates.
texts = st.text(st.characters(exclude_categories=["Cs"]), max_size=12)
any_doubles = st.floats(allow_nan=True, allow_infinity=True) | st.sampled_from(
    [math.nan, math.inf, -math.inf, -0.0, 5e-324, struct.unpack("<d", b"\x02\0\0\0\0\0\xf0\x7f")[0]]
)
int64s = st.integers(min_value=-(2**63), max_value=2**63 - 1)


@st.composite
def time_series(draw: st.DrawFn, max_samples: int = 8) -> TimeSeries:
    labels = draw(st.dictionaries(texts.filter(lambda s: s != "__name__"), texts, max_size=4))
    name = draw(texts.filter(bool))
    stamps = draw(st.lists(int64s, unique=True, max_size=max_samples))
    values = draw(st.lists(any_doubles, min_size=len(stamps), max_size=len(stamps)))
    pairs = tuple(sorted({**labels, "__name__": name}.items()))
    return TimeSeries(pairs, tuple(sorted(zip(stamps, values, strict=True), key=lambda p: p[0])))


# --- encode / decode --------------------------------------------------------------------------


@settings(max_examples=150, deadline=None)
@given(st.lists(time_series(), max_size=12))
def test_decode_gives_back_exactly_what_was_encoded(series: list[TimeSeries]) -> None:
    assert comparable(rw.decode(rw.encode(series))) == comparable(series)


def test_a_forty_day_old_history_with_special_values_survives_the_round_trip() -> None:
    history = [
        TimeSeries.of(
            "mlflow_metric",
            {"run": "ラン-1 ✓", "key": "val/loss", "empty": ""},
            [
                (NOW_MS - 40 * DAY_MS, math.nan),
                (NOW_MS - 40 * DAY_MS + 1, math.inf),
                (NOW_MS - 39 * DAY_MS, -math.inf),
                (NOW_MS, -0.0),
            ],
        ),
        TimeSeries.of("before_1970", {}, [(-(2**63), 1.0), (-1, 0.1), (0, 2.5)]),
        *(TimeSeries.of("many", {"i": str(i)}, [(NOW_MS - i, i * 0.5)]) for i in range(500)),
    ]
    assert comparable(rw.decode(rw.encode(history))) == comparable(history)


def test_the_body_is_snappy_block_format_holding_prompb_field_numbers() -> None:
    body = rw.encode([TimeSeries.of("m", {"a": "ü"}, [(-5, 1.5), (NOW_MS, math.inf)])])

    # Block format: no "sNaPpY" stream header (that would be the framed format).
    assert not body.startswith(b"\xff\x06\x00\x00sNaPpY")
    raw = bytes(cramjam.snappy.decompress_raw(body))

    def fields(data: bytes) -> list[Any]:
        return [
            (f.field_number, f.wire_type, f.data)
            for f in UnknownFieldSet(empty_pb2.Empty.FromString(data))
        ]

    [(number, wire_type, series)] = fields(raw)
    assert (number, wire_type) == (1, 2)  # WriteRequest.timeseries = 1, length-delimited
    label_a, label_b, sample_1, sample_2 = fields(series)
    # TimeSeries: labels = 1, samples = 2, both length-delimited messages.
    assert [f[:2] for f in (label_a, label_b, sample_1, sample_2)] == [(1, 2)] * 2 + [(2, 2)] * 2
    assert fields(label_a[2]) == [(1, 2, b"__name__"), (2, 2, b"m")]  # Label name=1 value=2
    assert fields(label_b[2]) == [(1, 2, b"a"), (2, 2, "ü".encode())]
    # Sample: value = 1 as a 64-bit double, timestamp = 2 as a varint int64 (two's complement).
    assert fields(sample_1[2]) == [(1, 1, bits(1.5)), (2, 0, 2**64 - 5)]
    assert fields(sample_2[2]) == [(1, 1, bits(math.inf)), (2, 0, NOW_MS)]


@pytest.mark.parametrize(
    ("body", "why"),
    [
        (b"not snappy", "garbage"),
        (bytes(cramjam.snappy.compress(b"\x0a\x00")), "snappy framed format"),
        (bytes(cramjam.snappy.compress_raw(b"\x0a\x05\x0a")), "truncated protobuf"),
    ],
)
def test_decode_refuses_what_is_not_a_remote_write_body(body: bytes, why: str) -> None:
    with pytest.raises(ValueError, match="not a snappy-compressed remote write request"):
        rw.decode(body)


def test_an_empty_request_encodes_and_counts_zero_samples() -> None:
    assert rw.decode(rw.encode([])) == []
    assert rw.sample_count(rw.encode([])) == 0


# --- TimeSeries -------------------------------------------------------------------------------


def test_of_sorts_labels_and_samples_and_adds_the_metric_name() -> None:
    ts = TimeSeries.of("m", {"b": "2", "a": "1"}, [(3, 0.3), (1, 0.1)])
    assert ts == TimeSeries((("__name__", "m"), ("a", "1"), ("b", "2")), ((1, 0.1), (3, 0.3)))
    assert ts.name == "m"


@pytest.mark.parametrize(
    ("labels", "samples", "problem"),
    [
        ((("b", "1"), ("a", "1"), ("__name__", "m")), (), "sorted"),
        ((("__name__", "m"), ("a", "1"), ("a", "2")), (), "unique"),
        ((("a", "1"),), (), "no __name__"),
        ((("__name__", ""),), (), "no __name__"),
        ((("__name__", "m"),), ((2, 1.0), (1, 1.0)), "strictly ascending"),
        ((("__name__", "m"),), ((1, 1.0), (1, 2.0)), "strictly ascending"),
    ],
)
def test_a_series_refuses_what_receivers_would_refuse_or_misread(
    labels: Any, samples: Any, problem: str
) -> None:
    with pytest.raises(ValueError, match=problem):
        TimeSeries(labels, samples)


def test_a_series_is_frozen_and_slotted() -> None:
    ts = TimeSeries.of("m", {}, [])
    with pytest.raises(AttributeError):
        ts.labels = ()  # type: ignore[misc]
    assert not hasattr(ts, "__dict__")


# --- split ------------------------------------------------------------------------------------


@settings(max_examples=150, deadline=None)
@given(st.lists(time_series(max_samples=6), min_size=1, max_size=6))
def test_split_halves_keep_every_sample_exactly_once_oldest_first(
    series: list[TimeSeries],
) -> None:
    total = sum(len(ts.samples) for ts in series)
    body = rw.encode(series)
    if total < 2:
        with pytest.raises(ValueError, match="cannot split"):
            rw.split(body)
        return
    older, newer = rw.split(body)
    first, second = rw.decode(older), rw.decode(newer)
    assert flat(first + second) == flat(series)
    assert [rw.sample_count(older), rw.sample_count(newer)] == [total // 2, total - total // 2]
    assert max(t for ts in first for t, _ in ts.samples) <= min(
        t for ts in second for t, _ in ts.samples
    )
    assert {ts.labels for ts in first + second} <= {ts.labels for ts in series}


def test_split_cuts_a_series_in_two_keeping_its_labels() -> None:
    ts = TimeSeries.of("m", {"run": "a"}, [(t, float(t)) for t in range(5)])
    older, newer = rw.split(rw.encode([ts]))
    assert rw.decode(older) == [TimeSeries(ts.labels, ts.samples[:2])]
    assert rw.decode(newer) == [TimeSeries(ts.labels, ts.samples[2:])]


def test_split_puts_the_old_samples_of_every_series_in_the_first_half() -> None:
    old, new = NOW_MS - 40 * DAY_MS, NOW_MS
    a = TimeSeries.of("a", {}, [(old, 1.0), (new, 2.0)])
    b = TimeSeries.of("b", {}, [(old + 1, 3.0), (new + 1, 4.0)])
    older, newer = rw.split(rw.encode([a, b]))
    assert {t for ts in rw.decode(older) for t, _ in ts.samples} == {old, old + 1}
    assert {t for ts in rw.decode(newer) for t, _ in ts.samples} == {new, new + 1}


def test_split_refuses_a_body_of_one_sample() -> None:
    with pytest.raises(ValueError, match="cannot split a body of 1 sample"):
        rw.split(rw.encode([TimeSeries.of("m", {}, [(1, 1.0)])]))


def bisect(client: RemoteWriteClient, body: bytes, older_first: bool) -> tuple[Any, Any, Any]:
    """Send `body`, splitting refused bodies down to single samples: (landed, refused
    as too old, refused as out of order) series lists."""
    pending = [body]
    landed: list[TimeSeries] = []
    too_old: list[TimeSeries] = []
    out_of_order: list[TimeSeries] = []
    while pending:
        body = pending.pop()
        verdict = client.send(body).verdict
        if verdict is Verdict.ACCEPTED:
            landed += rw.decode(body)
        elif rw.sample_count(body) > 1:
            older, newer = rw.split(body)
            pending += [newer, older] if older_first else [older, newer]
        else:
            {Verdict.TOO_OLD: too_old, Verdict.OUT_OF_ORDER: out_of_order}[verdict] += rw.decode(
                body
            )
    return landed, too_old, out_of_order


# Three series, each with two samples older than the receiver's bound and three recent ones.
MIXED = [
    TimeSeries.of(
        f"m{i}", {}, [(NOW_MS - d - i, d + 0.5) for d in (40 * DAY_MS, 20 * DAY_MS, 3, 2, 1)]
    )
    for i in range(3)
]
OLD = [TimeSeries(ts.labels, ts.samples[:2]) for ts in MIXED]
NEW = [TimeSeries(ts.labels, ts.samples[2:]) for ts in MIXED]


def test_splitting_older_half_first_lands_every_good_sample_and_isolates_the_old_ones() -> None:
    receiver = FakeReceiver(oldest_ms=NOW_MS - 3600_000)
    client = RemoteWriteClient(RemoteWriteSettings(url=URL), post=receiver)
    landed, too_old, out_of_order = bisect(client, rw.encode(MIXED), older_first=True)
    assert (flat(landed), flat(too_old), out_of_order) == (flat(NEW), flat(OLD), [])
    assert all(receiver.samples(ts.labels) == list(ts.samples) for ts in NEW)


def test_splitting_newer_half_first_loses_good_samples_to_out_of_order() -> None:
    # Why the order matters: without an out-of-order window, a sample older than one already
    # stored for its series is refused for good (Prometheus 2.42 does the same, measured).
    receiver = FakeReceiver(oldest_ms=NOW_MS - 3600_000)
    client = RemoteWriteClient(RemoteWriteSettings(url=URL), post=receiver)
    landed, too_old, out_of_order = bisect(client, rw.encode(MIXED), older_first=False)
    assert flat(too_old) == flat(OLD)
    assert out_of_order
    assert flat(landed + out_of_order) == flat(NEW)


# --- classify ---------------------------------------------------------------------------------

MIMIR_TOO_OLD = (
    "the sample has been rejected because its timestamp is too old "
    "(err-mimir-sample-timestamp-too-old). The affected sample has timestamp "
    '1970-01-19T05:30:43.969Z and is from series {__name__="test"}'
)
MIMIR_TOO_OLD_OOO = (
    "the sample has been rejected because another sample with a more recent timestamp has "
    "already been ingested and this sample is beyond the out-of-order time window of 2h "
    "(err-mimir-sample-timestamp-too-old)."
)
MIMIR_OUT_OF_ORDER = (
    "the sample has been rejected because another sample with a more recent timestamp has "
    "already been ingested and out-of-order samples are not allowed "
    "(err-mimir-sample-out-of-order)."
)
MIMIR_DUPLICATE = (
    "the sample has been rejected because another sample with the same timestamp, but a "
    "different value, has already been ingested (err-mimir-sample-duplicate-timestamp)."
)


@pytest.mark.parametrize(
    ("status", "body", "verdict"),
    [
        (200, "", Verdict.ACCEPTED),
        (204, "", Verdict.ACCEPTED),  # Prometheus 2.42 and VictoriaMetrics 1.79
        # Prometheus 2.42, measured: without an out-of-order window / with one too short.
        (400, "out of bounds\n", Verdict.TOO_OLD),
        (500, "too old sample\n", Verdict.TOO_OLD),
        (400, "out of order sample\n", Verdict.OUT_OF_ORDER),
        (400, "duplicate sample for timestamp\n", Verdict.OUT_OF_ORDER),
        (400, "snappy: corrupt input\n", Verdict.REJECTED),
        # Mimir (messages from its ingester tests).
        (400, MIMIR_TOO_OLD, Verdict.TOO_OLD),
        (400, MIMIR_TOO_OLD_OOO, Verdict.TOO_OLD),
        (400, MIMIR_OUT_OF_ORDER, Verdict.OUT_OF_ORDER),
        (400, MIMIR_DUPLICATE, Verdict.OUT_OF_ORDER),
        # Cortex distributor validation and ingester.
        (400, 'timestamp too old: 1575043969 metric: "test"', Verdict.TOO_OLD),
        (400, "user=fake: err: out of bounds. timestamp=1970-01-19", Verdict.TOO_OLD),
        # Thanos receive answers storage conflicts with 409.
        (409, "add 3 samples: out of bounds", Verdict.TOO_OLD),
        (409, "add 1 samples: too old sample", Verdict.TOO_OLD),
        (409, "add 2 samples: out of order sample", Verdict.OUT_OF_ORDER),
        (409, "conflict", Verdict.REJECTED),
        # May succeed later.
        (500, "internal error", Verdict.RETRY),
        (502, "", Verdict.RETRY),
        (503, "Service Unavailable", Verdict.RETRY),
        (503, "out of bounds", Verdict.RETRY),  # a proxy's 503 is an outage whatever it says
        (504, "", Verdict.RETRY),
        (408, "", Verdict.RETRY),
        (425, "", Verdict.RETRY),
        (429, "too many requests, out of bounds", Verdict.RETRY),
        # Never taken as sent.
        (400, "bad request", Verdict.REJECTED),
        (401, "unauthorized", Verdict.REJECTED),
        (403, "forbidden", Verdict.REJECTED),
        (404, "404 page not found", Verdict.REJECTED),
        (413, "write request too large", Verdict.REJECTED),
        (415, "", Verdict.REJECTED),
    ],
)
def test_classify_reads_the_status_and_the_receivers_words(
    status: int, body: str, verdict: Verdict
) -> None:
    assert rw.classify(status, body) is verdict


@pytest.mark.parametrize(
    ("header", "seconds"),
    [
        (None, None),
        ("", None),
        ("7", 7.0),
        ("2.5", 2.5),
        ("-3", 0.0),
        ("soon", None),
        ("inf", None),
        ("nan", None),
        (format_datetime(datetime.fromtimestamp(1_000_030, UTC), usegmt=True), 30.0),
        (format_datetime(datetime.fromtimestamp(999_990, UTC), usegmt=True), 0.0),
    ],
)
def test_retry_after_is_seconds_from_now_whether_given_as_a_number_or_a_date(
    header: str | None, seconds: float | None
) -> None:
    assert retry_after_seconds(header, now=1_000_000.0) == seconds


# --- the client -------------------------------------------------------------------------------


def client_for(post: Any, **settings: Any) -> RemoteWriteClient:
    return RemoteWriteClient(
        RemoteWriteSettings(url=URL, **settings), post=post, clock=FakeClock(1_000_000.0)
    )


def test_send_posts_the_body_once_with_the_remote_write_headers() -> None:
    post = FakePost([FakeResponse(204, "")])
    body = rw.encode([TimeSeries.of("m", {}, [(NOW_MS, 1.0)])])
    result = client_for(post, timeout_seconds=3.5).send(body)
    assert result == rw.SendResult(Verdict.ACCEPTED, 204, f"POST {URL}: HTTP 204", None)
    [call] = post.calls
    assert (call.url, call.data, call.timeout, call.verify) == (URL, body, 3.5, True)
    assert call.headers == {
        "Content-Encoding": "snappy",
        "Content-Type": "application/x-protobuf",
        "X-Prometheus-Remote-Write-Version": "0.1.0",
        "User-Agent": "mlflow-monitoring-exporter",
    }


def test_basic_auth_goes_in_the_authorization_header() -> None:
    post = FakePost()
    client_for(post, username="alice", password="s3cr3t-pw").send(b"")
    # base64("alice:s3cr3t-pw")
    assert post.calls[0].headers["Authorization"] == "Basic YWxpY2U6czNjcjN0LXB3"


def test_a_bearer_token_goes_in_the_authorization_header() -> None:
    post = FakePost()
    client_for(post, bearer_token="tok-123456").send(b"")
    assert post.calls[0].headers["Authorization"] == "Bearer tok-123456"


def test_extra_headers_are_sent_but_cannot_change_how_the_body_is_described() -> None:
    post = FakePost()
    headers = {"X-Scope-OrgID": "tenant-1", "content-encoding": "gzip", "User-Agent": "mine"}
    client_for(post, headers=headers).send(b"")
    sent = post.calls[0].headers
    assert sent["X-Scope-OrgID"] == "tenant-1"
    assert sent["User-Agent"] == "mine"
    assert [v for k, v in sent.items() if k.lower() == "content-encoding"] == ["snappy"]


def test_configured_credentials_win_over_an_authorization_extra_header() -> None:
    post = FakePost()
    client_for(post, bearer_token="tok-123456", headers={"authorization": "Basic eA=="}).send(b"")
    sent = post.calls[0].headers
    assert [v for k, v in sent.items() if k.lower() == "authorization"] == ["Bearer tok-123456"]


@pytest.mark.parametrize(
    ("settings", "verify"),
    [({}, True), ({"verify_tls": False}, False), ({"ca_bundle": "/etc/ca.pem"}, "/etc/ca.pem")],
)
def test_tls_verification_follows_the_settings(settings: dict[str, Any], verify: Any) -> None:
    post = FakePost()
    client_for(post, **settings).send(b"")
    assert post.calls[0].verify == verify


@pytest.mark.parametrize(
    ("settings", "secret"),
    [
        ({"bearer_token": "tok-123456"}, "tok-123456"),
        ({"username": "alice", "password": "s3cr3t-pw"}, "s3cr3t-pw"),
        ({"username": "alice", "password": "s3cr3t-pw"}, "YWxpY2U6czNjcjN0LXB3"),
        ({"headers": {"X-Api-Key": "key-abcdef"}}, "key-abcdef"),
    ],
)
def test_a_secret_echoed_by_the_receiver_is_masked_in_the_message(
    settings: dict[str, Any], secret: str
) -> None:
    post = FakePost([FakeResponse(401, f"invalid credentials {secret!r}\n")])
    result = client_for(post, **settings).send(b"")
    assert secret not in result.message
    assert result.message == f"POST {URL}: HTTP 401: invalid credentials '{MASK}'"
    assert result.verdict is Verdict.REJECTED


def test_the_message_is_one_bounded_line() -> None:
    post = FakePost([FakeResponse(400, "out of bounds\n" + "x" * 5000 + "\nend\n")])
    result = client_for(post).send(b"")
    assert "\n" not in result.message
    assert len(result.message) < 400
    assert result.verdict is Verdict.TOO_OLD


def test_a_receiver_saying_too_old_sample_with_500_is_not_retried() -> None:
    result = client_for(FakePost([FakeResponse(500, "too old sample\n")])).send(b"")
    assert (result.verdict, result.status) == (Verdict.TOO_OLD, 500)
    assert result.message == f"POST {URL}: HTTP 500: too old sample"


def test_retry_after_is_read_from_the_answer() -> None:
    post = FakePost([FakeResponse(429, "slow down", {"Retry-After": "12"})])
    result = client_for(post).send(b"")
    assert (result.verdict, result.retry_after) == (Verdict.RETRY, 12.0)


@pytest.mark.parametrize(
    ("error", "why"),
    [
        (requests.ConnectionError("Connection refused"), "connection refused"),
        (requests.Timeout("read timed out"), "timed out"),
        (requests.exceptions.SSLError("certificate verify failed"), "certificate verify failed"),
    ],
)
def test_no_answer_is_a_retry_naming_the_url(error: Exception, why: str) -> None:
    result = client_for(FakePost([error])).send(b"")
    assert (result.verdict, result.status, result.retry_after) == (Verdict.RETRY, None, None)
    assert result.message == (
        f"POST {URL} failed ({why}): is the receiver up, and is REMOTE_WRITE_URL right?"
    )


def test_an_invalid_url_is_rejected_not_retried() -> None:
    result = client_for(FakePost([requests.exceptions.InvalidURL("bad host")])).send(b"")
    assert (result.verdict, result.status) == (Verdict.REJECTED, None)


def test_a_secret_inside_a_connection_error_is_masked() -> None:
    error = requests.ConnectionError("proxy said: Bearer tok-123456 refused")
    result = client_for(FakePost([error]), bearer_token="tok-123456").send(b"")
    assert "tok-123456" not in result.message
    assert MASK in result.message


def test_messages_leave_out_the_query_string_of_the_url() -> None:
    client = RemoteWriteClient(
        RemoteWriteSettings(url=URL + "?api_key=k-999"), post=FakePost([503])
    )
    result = client.send(b"")
    assert result.message == f"POST {URL}: HTTP 503"
    assert "k-999" not in repr(client)


def test_a_client_needs_a_url() -> None:
    with pytest.raises(ValueError, match="url is not set"):
        RemoteWriteClient(RemoteWriteSettings())
