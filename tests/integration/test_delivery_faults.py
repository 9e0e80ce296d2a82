"""Fault injection for the delivery rule, against a real MLflow and a real HTTP endpoint.

A point is delivered (a 2xx from the endpoint it was sent to, for the request that carried
it), still queued, or set aside with a reason an operator can see and replay; never counted
delivered otherwise, never lost, never sent twice. The endpoint (`tests.support.receiver`)
is switched between the behaviours real ones show: redirects (301/302/303 to a page that
answers 200 to a GET, 307/308 to the new URL), a wrong key then the right one, a proxy's
body limit (413), a validation error on some points (400), and a state file deleted under
a running exporter, and a state disk with no room (a real file size limit on the
exporter's process). Each test checks what the endpoint accepted against what MLflow holds,
and that no output of the exporter shows the key.
"""

from __future__ import annotations

import base64
import json
import resource
import signal
import sqlite3
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable
from contextlib import closing
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.integration.conftest import ExporterEnv
from tests.support.receiver import Receiver, Reply, point_of, stored_points
from tests.support.seed import make_run, mlflow_points

pytestmark = pytest.mark.integration


# ---------------------------------------------------------------------------- helpers


def _seed(env: ExporterEnv, runs: int = 2, steps: int = 10) -> list[str]:
    exp = env.experiment("faults")
    return [
        make_run(
            env.client,
            exp,
            {
                "loss": [1.0 / (s + 1) + r for s in range(steps)],
                "acc": [s / 10 for s in range(steps)],
            },
        )
        for r in range(runs)
    ]


def _configure(env: ExporterEnv, **sections: dict[str, Any]) -> None:
    path = Path(env.env["EXPORTER_CONFIG"])
    path.write_text(path.read_text() + yaml.safe_dump(sections))


def _secret_forms(key: str) -> list[str]:
    return [key, base64.b64encode(key.encode()).decode()]


def _run(env: ExporterEnv, *args: str, **extra: str) -> subprocess.CompletedProcess[str]:
    """Run the exporter and check that no output shows the configured key, in any form."""
    done = env.run(*args, timeout=120, **extra)
    key = extra.get("PRAMATHUS_API_KEY", env.env["PRAMATHUS_API_KEY"])
    for form in _secret_forms(key):
        assert form not in done.stdout
        assert form not in done.stderr
    return done


def _accepted_counts(receiver: Receiver) -> Counter[tuple[Any, ...]]:
    return Counter(point_of(m) for m in receiver.accepted_points())


def _exactly_once(receiver: Receiver, env: ExporterEnv, run_ids: list[str]) -> bool:
    counts = _accepted_counts(receiver)
    return set(counts) == mlflow_points(env.client, run_ids) and set(counts.values()) == {1}


def _queued(env: ExporterEnv) -> int:
    with closing(sqlite3.connect(env.state_dir / "state.db")) as db:
        return int(db.execute("SELECT coalesce(sum(points), 0) FROM spool").fetchone()[0])


def _set_aside(env: ExporterEnv) -> list[tuple[str, set[tuple[Any, ...]]]]:
    with closing(sqlite3.connect(env.state_dir / "state.db")) as db:
        rows = db.execute("SELECT reason, body FROM dead_letter ORDER BY id").fetchall()
    return [(reason, stored_points(body)) for reason, body in rows]


def _judge(
    receiver: Receiver, decide: Callable[[str, str, dict[str, str], bytes], Reply | None]
) -> None:
    receiver.judge = decide


# ---------------------------------------------------------------------------- redirects


@pytest.mark.parametrize("status", [301, 302, 303])
def test_a_redirect_that_would_turn_the_post_into_a_get_keeps_every_point_queued(
    exporter_env: ExporterEnv, receiver: Receiver, status: int
) -> None:
    runs = _seed(exporter_env)
    receiver.default = Reply(status, {"Location": "/moved"}, body=b"<html>moved</html>")

    moved = _run(exporter_env, "export-once")

    assert moved.returncode == 1
    assert "/moved" in moved.stderr
    assert "PRAMATHUS_ENDPOINT" in moved.stderr
    assert [r for r in receiver.requests if r.method != "POST" or r.path != "/api/metrics"] == []
    assert receiver.accepted() == []
    assert _queued(exporter_env) == len(mlflow_points(exporter_env.client, runs))

    receiver.default = Reply()
    fixed = _run(exporter_env, "export-once")

    assert fixed.returncode == 0, fixed.stderr
    assert _exactly_once(receiver, exporter_env, runs)


@pytest.mark.parametrize("status", [307, 308])
def test_307_and_308_are_followed_with_the_same_body_and_key(
    exporter_env: ExporterEnv, receiver: Receiver, status: int
) -> None:
    runs = _seed(exporter_env)
    key = exporter_env.env["PRAMATHUS_API_KEY"]

    def redirect(method: str, path: str, headers: dict[str, str], raw: bytes) -> Reply | None:
        return Reply(status, {"Location": "/v2/metrics"}) if path == "/api/metrics" else None

    _judge(receiver, redirect)
    done = _run(exporter_env, "export-once")

    assert done.returncode == 0, done.stderr
    assert _exactly_once(receiver, exporter_env, runs)
    assert {r.path for r in receiver.accepted()} == {"/v2/metrics"}
    assert {r.headers["Authorization"] for r in receiver.accepted()} == {f"Bearer {key}"}


# ---------------------------------------------------------------------------- refusals


def test_a_wrong_key_keeps_everything_queued_and_the_right_key_delivers_it_all(
    exporter_env: ExporterEnv, receiver: Receiver
) -> None:
    runs = _seed(exporter_env)
    right = exporter_env.env["PRAMATHUS_API_KEY"]
    wrong = "wrong-key-0123456789"

    def check_key(method: str, path: str, headers: dict[str, str], raw: bytes) -> Reply | None:
        if headers.get("Authorization") != f"Bearer {right}":
            echoed = f'{{"error": "bad credentials: {headers.get("Authorization")}"}}'
            return Reply(401, body=echoed.encode())
        return None

    _judge(receiver, check_key)
    refused = _run(exporter_env, "export-once", PRAMATHUS_API_KEY=wrong)

    assert refused.returncode == 1
    assert "PRAMATHUS_API_KEY" in refused.stderr
    assert len(receiver.requests) == 1  # the cycle stops at the first refusal
    assert _set_aside(exporter_env) == []

    fixed = _run(exporter_env, "export-once")

    assert fixed.returncode == 0, fixed.stderr
    assert _exactly_once(receiver, exporter_env, runs)


def test_a_body_limit_splits_batches_until_they_pass_and_nothing_is_set_aside(
    exporter_env: ExporterEnv, receiver: Receiver
) -> None:
    runs = _seed(exporter_env, runs=3, steps=40)
    limit = 4096

    def proxy(method: str, path: str, headers: dict[str, str], raw: bytes) -> Reply | None:
        return (
            Reply(413, body=b"<html>413 Request Entity Too Large</html>")
            if len(raw) > limit
            else None
        )

    _judge(receiver, proxy)
    done = _run(exporter_env, "export-once", PRAMATHUS_BATCH_SIZE="500")

    assert done.returncode == 0, done.stderr
    assert _exactly_once(receiver, exporter_env, runs)
    assert _set_aside(exporter_env) == []
    assert all(len(json.dumps(r.body)) <= limit + 64 for r in receiver.accepted())


def test_a_400_on_some_points_sets_aside_only_those_and_replay_delivers_them(
    exporter_env: ExporterEnv, receiver: Receiver
) -> None:
    runs = _seed(exporter_env)

    def validate(method: str, path: str, headers: dict[str, str], raw: bytes) -> Reply | None:
        metrics = json.loads(raw)["metrics"] if raw else []
        bad = any(m["name"] == "loss" and m["metadata"]["step"] == 3 for m in metrics)
        return Reply(400, body=b'{"error": "invalid point"}') if bad else None

    _judge(receiver, validate)
    first = _run(exporter_env, "export-once", PRAMATHUS_BATCH_SIZE="500")

    refused = {p for p in mlflow_points(exporter_env.client, runs) if p[1] == "loss" and p[2] == 3}
    # The cycle that set points aside fails, saying what was refused; the rest went out.
    assert first.returncode == 1
    assert "HTTP 400" in first.stderr
    assert set(_accepted_counts(receiver)) == mlflow_points(exporter_env.client, runs) - refused
    assert set(_accepted_counts(receiver).values()) == {1}
    assert [reason for reason, _ in _set_aside(exporter_env)] == ["rejected"] * len(refused)
    assert set().union(*(points for _, points in _set_aside(exporter_env))) == refused
    listed = _run(exporter_env, "dead-letters", "list")
    assert f"{len(refused)} set-aside batches, {len(refused)} points" in listed.stdout

    receiver.judge = None
    replay = _run(exporter_env, "dead-letters", "replay", "--reason", "rejected")
    assert replay.returncode == 0, replay.stderr
    again = _run(exporter_env, "export-once")

    assert again.returncode == 0, again.stderr
    assert _exactly_once(receiver, exporter_env, runs)
    assert _set_aside(exporter_env) == []


# ---------------------------------------------------------------------------- full batches


def _seed_1320(env: ExporterEnv) -> list[str]:
    exp = env.experiment("batches")
    run_a = make_run(env.client, exp, {f"a{k}": [float(s) for s in range(40)] for k in range(3)})
    run_b = make_run(env.client, exp, {f"b{k:03d}": [1.0, 2.0] for k in range(600)})
    return [run_a, run_b]


def test_1320_points_over_603_keys_go_out_in_3_posts_at_batch_size_500(
    exporter_env: ExporterEnv, receiver: Receiver
) -> None:
    runs = _seed_1320(exporter_env)

    done = _run(exporter_env, "export-once", PRAMATHUS_BATCH_SIZE="500")

    assert done.returncode == 0, done.stderr
    assert len(receiver.accepted()) == 3
    assert sum(_accepted_counts(receiver).values()) == 1320
    assert _exactly_once(receiver, exporter_env, runs)


def test_with_a_queue_bound_of_500_the_1320_points_all_arrive_once_in_the_next_run(
    exporter_env: ExporterEnv, receiver: Receiver
) -> None:
    runs = _seed_1320(exporter_env)
    _configure(exporter_env, pramathus={"spool_max_points": 500})
    receiver.default = Reply(503)
    down = _run(exporter_env, "export-once", PRAMATHUS_BATCH_SIZE="500")
    assert down.returncode == 1
    assert _queued(exporter_env) < 1320  # capture waited at the bound
    receiver.default = Reply()

    # One export-once runs rounds (capture to the bound, deliver, capture again) until
    # MLflow's points are all delivered.
    done = _run(exporter_env, "export-once", PRAMATHUS_BATCH_SIZE="500")
    assert done.returncode == 0, done.stderr
    assert "rounds: the queues' bound was reached" in done.stdout
    assert _exactly_once(receiver, exporter_env, runs)
    assert _queued(exporter_env) == 0


# ---------------------------------------------------------------------------- state


def test_a_state_file_deleted_under_a_running_exporter_is_written_back_and_nothing_resent(
    exporter_env: ExporterEnv, receiver: Receiver, tmp_path: Path
) -> None:
    runs = _seed(exporter_env)
    log = (tmp_path / "continuous.log").open("w")
    process = subprocess.Popen(
        [sys.executable, "-m", "exporter", "continuous", "--interval", "1", "--port", "0"],
        env=exporter_env.env,
        stdout=subprocess.DEVNULL,
        stderr=log,
        text=True,
    )
    try:
        deadline = time.monotonic() + 120
        while sum(_accepted_counts(receiver).values()) < len(
            mlflow_points(exporter_env.client, runs)
        ):
            assert time.monotonic() < deadline, "the first cycle never delivered"
            time.sleep(0.2)
        for suffix in ("", "-wal", "-shm"):
            Path(f"{exporter_env.state_dir / 'state.db'}{suffix}").unlink(missing_ok=True)
        while "state.written_back" not in (tmp_path / "continuous.log").read_text():
            assert time.monotonic() < deadline, "the deleted state was never written back"
            time.sleep(0.2)
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=60)
        log.close()

    text = (tmp_path / "continuous.log").read_text()
    assert str(exporter_env.state_dir / "state.db") in text
    assert (exporter_env.state_dir / "state.db").stat().st_mode & 0o777 == 0o600
    again = _run(exporter_env, "export-once")

    assert again.returncode == 0, again.stderr
    assert _exactly_once(receiver, exporter_env, runs)  # nothing sent again after the restart


def _queued_batches(env: ExporterEnv) -> dict[str, set[tuple[Any, ...]]]:
    """Queued batches: idempotency key -> the points it carries (stored as captured, shown
    as the Pramathus entries the sink encodes at delivery)."""
    with closing(sqlite3.connect(env.state_dir / "state.db")) as db:
        rows = db.execute("SELECT idempotency_key, body FROM spool ORDER BY id").fetchall()
    return {key: stored_points(body) for key, body in rows}


def _with_file_size_limit(limit: int) -> Callable[[], None]:
    def limit_files() -> None:  # in the exporter's process only, before it starts
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return limit_files


@pytest.mark.parametrize("limit", [40_000, 70_000])
def test_a_full_state_disk_sends_nothing_it_cannot_record_and_the_next_runs_deliver_once(
    exporter_env: ExporterEnv, receiver: Receiver, limit: int
) -> None:
    runs = _seed(exporter_env)
    every = mlflow_points(exporter_env.client, runs)
    receiver.default = Reply(503)
    down = _run(exporter_env, "export-once")
    assert down.returncode == 1
    queued = _queued_batches(exporter_env)
    assert set().union(*queued.values()) == every
    receiver.default = Reply()
    before = len(receiver.requests)

    # A real OS limit on the file sizes the exporter may write (`ulimit -f`): the state
    # files may not grow past `limit` bytes. CPython ignores SIGXFSZ, so a write past it
    # fails with EFBIG ("File too large"), which SQLite reports as "disk I/O error".
    full = subprocess.run(
        [sys.executable, "-m", "exporter", "export-once"],
        env=exporter_env.env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        preexec_fn=_with_file_size_limit(limit),  # noqa: PLW1509 - no threads in the test yet
    )

    assert full.returncode == 1
    assert "Traceback" not in full.stderr
    path = str(exporter_env.state_dir / "state.db")
    assert any(path in line and "File too large" in line for line in full.stderr.splitlines())
    # Nothing went out that the state could not record: every point that arrived left the
    # queue, every point still queued never arrived, and nothing arrived twice.
    arrived = _accepted_counts(receiver)
    still = _queued_batches(exporter_env)
    assert set(arrived.values()) <= {1}
    assert set(arrived).isdisjoint(set().union(*still.values()) if still else set())
    assert set(arrived) | set().union(*still.values()) == every
    assert still, "the limit never bit: the test proves nothing"
    sent_under_limit = receiver.requests[before:]
    assert all(r.status == 200 for r in sent_under_limit)

    for _ in range(5):  # bounded: without the limit every queued batch goes at once
        done = _run(exporter_env, "export-once")
        assert done.returncode == 0, done.stderr
        if not _queued_batches(exporter_env):
            break

    assert _exactly_once(receiver, exporter_env, runs)
    # Every batch went out under the key it was queued with before the disk filled up.
    for request in receiver.accepted():
        key = request.headers["Idempotency-Key"]
        assert {point_of(m) for m in request.body["metrics"]} == queued[key]
