"""The local stack's Pramathus receiver (scripts/pramathus_sink.py) against the exporter's own
Pramathus sink: what the exporter encodes and sends is what the receiver accepts, checks and
records once. The receiver runs in-process on a free 127.0.0.1 port (a real HTTP server, no
other process); a few checks call its `receive` directly.
"""

from __future__ import annotations

import json
import math
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from exporter.config import PramathusSettings
from exporter.model import MetricPoint, RunContext
from exporter.sinks.delivery import Outcome, Outgoing
from exporter.sinks.pramathus import PramathusSink
from scripts import pramathus_sink
from tests.support.planned import outgoing

KEY = "local-key-TOPSECRET"
CONTEXTS = {"run-a": RunContext("1", "churn", "brave-owl", {"team": "ml"})}


@pytest.fixture
def sink(tmp_path: Path) -> pramathus_sink.Sink:
    return pramathus_sink.Sink(KEY, tmp_path / "pramathus.log", tmp_path / "points.ndjson")


@pytest.fixture
def endpoint(sink: pramathus_sink.Sink) -> Iterator[str]:
    server = pramathus_sink.serve(sink, 0)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_port}{pramathus_sink.PATH}"
    server.shutdown()
    server.server_close()


def exporter_sink(endpoint: str, api_key: str = KEY) -> PramathusSink:
    settings = {"enabled": True, "endpoint": endpoint, "api_key": api_key}
    return PramathusSink(PramathusSettings.model_validate(settings))


def encoded(sink: PramathusSink, values: list[float]) -> list[Outgoing]:
    points = [
        MetricPoint("run-a", "val/loss", v, i, 1_700_000_000_000 + i) for i, v in enumerate(values)
    ]
    return outgoing(sink, points, CONTEXTS, 1_700_000_100_000)


def recorded(sink: pramathus_sink.Sink) -> list[dict[str, object]]:
    lines = sink.points.read_text(encoding="utf-8").splitlines()
    return [json.loads(line) for line in lines]


def test_a_batch_from_the_exporter_is_accepted_and_every_point_recorded(
    sink: pramathus_sink.Sink, endpoint: str
) -> None:
    [batch] = encoded(exporter_sink(endpoint), [0.5, math.nan, 0.25])

    reply = exporter_sink(endpoint).send(batch)

    assert reply.outcome is Outcome.ACCEPTED
    got = recorded(sink)
    assert [(p["name"], p["value"]) for p in got] == [
        ("val/loss", 0.5),
        ("val/loss", None),
        ("val/loss", 0.25),
    ]
    assert {p["idempotency_key"] for p in got} == {batch.idempotency_key}
    log = sink.log.read_text(encoding="utf-8")
    assert f"batch {batch.idempotency_key[:8]}: 3 points from 1 run (val/loss x3)" in log


def test_a_retried_batch_is_acknowledged_but_recorded_once_also_after_a_restart(
    sink: pramathus_sink.Sink, endpoint: str
) -> None:
    exporter = exporter_sink(endpoint)
    [batch] = encoded(exporter, [1.0, 2.0])
    assert exporter.send(batch).outcome is Outcome.ACCEPTED

    assert exporter.send(batch).outcome is Outcome.ACCEPTED
    restarted = pramathus_sink.Sink(KEY, sink.log, sink.points)
    status, body = restarted.receive(
        {"authorization": f"Bearer {KEY}", "idempotency-key": batch.idempotency_key}, batch.body
    )

    assert (status, body) == (200, {"status": "duplicate", "accepted": 0})
    assert len(recorded(sink)) == 2
    assert "already recorded, not counted twice" in sink.log.read_text(encoding="utf-8")


def test_a_wrong_key_gets_401_which_blocks_the_sink_and_records_nothing(
    sink: pramathus_sink.Sink, endpoint: str
) -> None:
    exporter = exporter_sink(endpoint, api_key="not-the-key")
    [batch] = encoded(exporter, [1.0])

    reply = exporter.send(batch)

    # 401 is about the key, not the points: the exporter keeps them queued (BLOCKED).
    assert (reply.outcome, reply.status) == (Outcome.BLOCKED, 401)
    assert not sink.points.exists()


def body(**entry: object) -> bytes:
    """A request body around one entry: a good one, with `entry`'s keys replaced."""
    good = {"name": "k", "value": 1.0, "timestamp": "t", "metadata": {"run_id": "r", "step": 0}}
    return json.dumps(
        {"timestamp": "t", "source": "mlflow", "metrics": [{**good, **entry}]}
    ).encode()


@pytest.mark.parametrize(
    ("raw", "error"),
    [
        (b"{", "not JSON"),
        (b"[]", "the body must be a JSON object"),
        (b'{"timestamp": "t", "source": "mlflow", "metrics": []}', "`metrics` must be a non-empty"),
        (body(value=None), "metrics[0]: a null `value` needs `metadata.non_finite`"),
        (body(value="1"), "metrics[0]: `value` must be a number or null"),
        (body(metadata={"run_id": "r", "step": "0"}), "`metadata.step` must be an integer"),
        (body(metadata={"step": 0}), "`metadata.run_id` must be a string"),
        (body(name=3), "`name` must be a string"),
    ],
)
def test_a_body_off_the_contract_is_refused_with_400_naming_the_problem(
    sink: pramathus_sink.Sink, raw: bytes, error: str
) -> None:
    status, reply = sink.receive({"authorization": f"Bearer {KEY}", "idempotency-key": "k"}, raw)
    assert status == 400
    assert error in reply["error"]
    assert not sink.points.exists()


def test_a_batch_without_an_idempotency_key_is_refused(sink: pramathus_sink.Sink) -> None:
    status, reply = sink.receive({"authorization": f"Bearer {KEY}"}, b"{}")
    assert (status, reply) == (400, {"error": "missing `Idempotency-Key` header"})


def test_serve_refuses_to_start_without_a_key(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delenv("PRAMATHUS_API_KEY", raising=False)
    code = pramathus_sink.main(
        ["serve", "--log", str(tmp_path / "l"), "--points", str(tmp_path / "p")]
    )
    assert code == 2
    assert "set PRAMATHUS_API_KEY" in capsys.readouterr().err
