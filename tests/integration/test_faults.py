"""Fault tests for the delivery guarantees: nothing lost under outages, restarts, bad input.

Each test breaks one thing (Pramathus answers 503/429/400, is slow or gone; the Pushgateway
or MLflow stops; the exporter gets SIGTERM or SIGKILL; its state file is garbage; MLflow
holds awkward data) and then checks that the set of points Pramathus accepted is exactly the
set MLflow holds. Repeats are allowed (delivery is at-least-once); a missing point is not.
`docs/faults.md` lists every fault tried here and what happened.
"""

from __future__ import annotations

import json
import os
import random
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import closing, contextmanager
from pathlib import Path
from typing import Any, TypedDict, TypeVar

import pytest
import requests
import yaml
from mlflow.tracking import MlflowClient

from tests.integration.conftest import ExporterEnv
from tests.support import servers
from tests.support.poll import poll_until
from tests.support.receiver import Receiver, Reply, point_of, stored_points
from tests.support.seed import log_points, make_run, mlflow_points

pytestmark = pytest.mark.integration

T = TypeVar("T")
KEY = "Idempotency-Key"


# ---------------------------------------------------------------------------- helpers


def _seed(env: ExporterEnv, runs: int = 2, steps: int = 10, name: str = "exp") -> list[str]:
    """An experiment with `runs` finished runs, each logging `loss` and `acc` for `steps`."""
    exp = env.experiment(name)
    return [
        make_run(
            env.client,
            exp,
            {
                "loss": [1.0 / (s + 1) + r for s in range(steps)],
                "acc": [s / steps + r for s in range(steps)],
            },
        )
        for r in range(runs)
    ]


def _configure(env: ExporterEnv, **sections: dict[str, Any]) -> None:
    """Add YAML sections to the test's config file (for keys that have no env variable)."""
    path = Path(env.env["EXPORTER_CONFIG"])
    path.write_text(path.read_text() + yaml.safe_dump(sections))


def _db(env: ExporterEnv) -> sqlite3.Connection:
    return sqlite3.connect(env.state_dir / "state.db")


def _spool(env: ExporterEnv) -> tuple[int, int]:
    """(batches, points) waiting in the exporter's spool."""
    with closing(_db(env)) as db:
        batches, points = db.execute(
            "SELECT count(*), coalesce(sum(points), 0) FROM spool"
        ).fetchone()
    return int(batches), int(points)


def _dead_letters(env: ExporterEnv) -> list[tuple[int, set[tuple[Any, ...]]]]:
    """(HTTP status, points) of every dead-lettered batch."""
    with closing(_db(env)) as db:
        rows = db.execute("SELECT status, body FROM dead_letter ORDER BY id").fetchall()
    return [(status, stored_points(body)) for status, body in rows]


def _last_line(done: subprocess.CompletedProcess[str]) -> str:
    lines = done.stderr.strip().splitlines()
    return lines[-1] if lines else ""


def _events(stderr: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in stderr.splitlines() if line.startswith("{")]


def _wait_until(what: str, probe: Callable[[], T | None], timeout: float = 30) -> T:
    """Poll `probe` until it returns something truthy; fail naming `what` after `timeout`."""
    return poll_until(what, probe, timeout)


def _timed(
    env: ExporterEnv, *args: str, **extra: str
) -> tuple[subprocess.CompletedProcess[str], float]:
    started = time.monotonic()
    done = env.run(*args, timeout=90, **extra)
    return done, time.monotonic() - started


class Continuous:
    """`exporter continuous --interval 1` (or `interval`) in the background; stderr goes to
    a file so a long run can never block on a full pipe."""

    def __init__(
        self,
        env: ExporterEnv,
        log: Path,
        interval: float = 1,
        *,
        extra_env: Mapping[str, str] | None = None,
    ) -> None:
        self.port = servers.free_port()
        self.log = log
        self._err = log.open("wb")  # noqa: SIM115 - closed in close()
        args = ["continuous", "--interval", str(interval), "--port", str(self.port)]
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "exporter", *args],
            env={**env.env, **(extra_env or {})},
            stdout=subprocess.DEVNULL,
            stderr=self._err,
        )

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self._err.close()

    def get(self, path: str) -> requests.Response | None:
        if self.proc.poll() is not None:
            raise AssertionError(
                f"exporter exited {self.proc.returncode}:\n{self.stderr()[-3000:]}"
            )
        try:
            return requests.get(f"http://127.0.0.1:{self.port}{path}", timeout=2)
        except requests.RequestException:
            return None

    def health(self) -> tuple[int, str] | None:
        r = self.get("/healthz")
        return None if r is None else (r.status_code, r.json()["status"])

    def metrics(self) -> str:
        r = self.get("/metrics")
        return "" if r is None else r.text

    def terminate(self) -> float:
        """SIGTERM; return how long the process took to exit (fails after 10 s)."""
        started = time.monotonic()
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            raise AssertionError("exporter still running 10 s after SIGTERM") from None
        return time.monotonic() - started

    def stderr(self) -> str:
        return self.log.read_text(errors="replace")


@contextmanager
def continuous(env: ExporterEnv, log: Path, **extra_env: str) -> Iterator[Continuous]:
    proc = Continuous(env, log, extra_env=extra_env)
    try:
        yield proc
    finally:
        proc.close()


def _healthy(c: Continuous) -> bool:
    return c.health() == (200, "ok") and "mlflow_exporter_up 1.0" in c.metrics()


def _groups(pushgateway: servers.Server, job: str) -> dict[str, dict[str, Any]]:
    """This job's groups on a Pushgateway, by experiment_id (or `registry`)."""
    data = requests.get(f"{pushgateway.url}/api/v1/metrics", timeout=5).json()["data"]
    return {
        g["labels"].get("experiment_id", g["labels"].get("group", "")): g
        for g in data
        if g["labels"]["job"] == job
    }


# ---------------------------------------------------------------------------- Pramathus replies


def test_503s_then_200_are_retried_with_one_idempotency_key_and_nothing_is_lost(
    exporter_env: ExporterEnv, receiver: Receiver
) -> None:
    runs = _seed(exporter_env)
    receiver.script.extend(Reply(status=503) for _ in range(3))

    done = exporter_env.run("export-once", timeout=60)

    assert done.returncode == 0, done.stderr
    assert receiver.received_points() == mlflow_points(exporter_env.client, runs)
    refused = [r for r in receiver.requests if r.status == 503]
    assert len(refused) == 3
    first_ok = receiver.accepted()[0]
    assert {r.headers[KEY] for r in refused} == {first_ok.headers[KEY]}
    assert [point_of(m) for m in refused[0].body["metrics"]] == [
        point_of(m) for m in first_ok.body["metrics"]
    ]
    assert _spool(exporter_env) == (0, 0)


def test_429_retry_after_is_honoured_and_nothing_is_lost(
    exporter_env: ExporterEnv, receiver: Receiver
) -> None:
    runs = _seed(exporter_env)
    # 2 s is longer than the first backoff could be (0.5 s + at most 1 s of jitter).
    receiver.script.append(Reply(status=429, headers={"Retry-After": "2"}))

    done = exporter_env.run("export-once", timeout=60)

    assert done.returncode == 0, done.stderr
    limited, retried = receiver.requests[0], receiver.requests[1]
    assert (limited.status, retried.status) == (429, 200)
    assert retried.headers[KEY] == limited.headers[KEY]
    assert retried.at - limited.at >= 1.9
    assert receiver.received_points() == mlflow_points(exporter_env.client, runs)


def test_a_4xx_refusing_a_whole_batch_dead_letters_it_only_and_later_batches_are_delivered(
    exporter_env: ExporterEnv, receiver: Receiver, tmp_path: Path
) -> None:
    # 409 refuses the batch as a whole; 400 and 422 are bisected to set aside only the
    # refused points (tests/integration/test_delivery_faults.py).
    runs = _seed(exporter_env)  # 40 points in batches of 7: 6 batches
    receiver.script.extend(
        [Reply(), Reply(status=409, body=b'{"error": "metric value out of range"}\n')]
    )

    done = exporter_env.run("export-once", timeout=60)

    assert done.returncode == 1
    last = _last_line(done)
    assert last.startswith("error: pramathus: ")
    assert "HTTP 409" in last
    assert "metric value out of range" in last
    assert "Traceback" not in done.stderr
    assert [r.status for r in receiver.requests] == [200, 409, 200, 200, 200, 200]  # no retry
    dead = _dead_letters(exporter_env)
    assert len(dead) == 1
    status, dead_points = dead[0]
    assert status == 409
    assert dead_points == {point_of(m) for m in receiver.requests[1].body["metrics"]}
    expected = mlflow_points(exporter_env.client, runs)
    received = receiver.received_points()
    assert expected - received == dead_points  # the refused batch and nothing else is missing
    assert received | dead_points == expected
    assert _spool(exporter_env) == (0, 0)

    # The dead letter stays on disk and in the gauge; it is never sent again.
    with continuous(exporter_env, tmp_path / "continuous.log") as c:
        _wait_until(
            "dead-letter gauge at 1",
            lambda: "mlflow_exporter_pramathus_dead_letter_batches 1.0" in c.metrics(),
        )
        assert c.terminate() < 10
    assert c.proc.returncode == 0
    assert len(receiver.requests) == 6


def test_a_slow_receiver_bounds_the_cycle_and_points_stay_spooled(
    exporter_env: ExporterEnv, receiver: Receiver
) -> None:
    _configure(exporter_env, pramathus={"timeout_seconds": 1, "delivery_budget_seconds": 5})
    runs = _seed(exporter_env)
    expected = mlflow_points(exporter_env.client, runs)
    receiver.default = Reply(delay=3)

    done, took = _timed(exporter_env, "export-once")

    assert done.returncode == 1
    assert took < 30
    assert _last_line(done).startswith("error: pramathus: Pramathus timed out after 1s")
    assert _spool(exporter_env)[1] == len(expected)

    receiver.default = Reply()
    since = time.monotonic()
    done = exporter_env.run("export-once")
    assert done.returncode == 0, done.stderr
    assert receiver.received_points(since) == expected
    assert _spool(exporter_env) == (0, 0)


def test_a_stopped_receiver_keeps_points_spooled_and_they_drain_even_while_mlflow_is_down(
    exporter_env: ExporterEnv, receiver: Receiver
) -> None:
    _configure(exporter_env, pramathus={"delivery_budget_seconds": 5})
    runs = _seed(exporter_env)
    expected = mlflow_points(exporter_env.client, runs)
    receiver.stop()

    done, took = _timed(exporter_env, "export-once")

    assert done.returncode == 1
    assert took < 30
    assert _last_line(done).startswith("error: pramathus: cannot reach Pramathus")
    assert _spool(exporter_env)[1] == len(expected)

    back = Receiver(port=receiver.port)  # same endpoint, back up
    try:
        # MLflow gone now: the cycle fails on MLflow but still drains the spool.
        down = exporter_env.run(
            "export-once", MLFLOW_TRACKING_URI=f"http://127.0.0.1:{servers.free_port()}"
        )
        assert down.returncode == 1
        assert _last_line(down).startswith("error: mlflow: cannot reach MLflow")
        assert back.received_points() == expected
        assert _spool(exporter_env) == (0, 0)

        again = exporter_env.run("export-once")
        assert again.returncode == 0, again.stderr
        assert len(back.accepted_points()) == len(expected)  # nothing new, nothing resent
    finally:
        back.stop()


# ---------------------------------------------------------------------------- backends down


def test_pushgateway_down_fails_the_cycle_and_a_restart_gets_everything_pushed_again(
    exporter_env: ExporterEnv, receiver: Receiver, tmp_path: Path
) -> None:
    (tmp_path / "pg").mkdir()
    pg = servers.start_pushgateway(tmp_path / "pg")
    gateway = f"127.0.0.1:{pg.port}"
    job = exporter_env.job
    try:
        exp = exporter_env.experiment()
        live = make_run(exporter_env.client, exp, {"loss": [1.0, 0.5]}, status="RUNNING")
        assert exporter_env.run("export-once", PROMETHEUS_GATEWAY=gateway).returncode == 0
        assert set(_groups(pg, job)) == {exp, "registry"}

        pg.stop()
        log_points(exporter_env.client, live, "loss", [0.25], first_step=2)
        down = exporter_env.run("export-once", PROMETHEUS_GATEWAY=gateway)
        assert down.returncode == 1
        last = _last_line(down)
        assert last.startswith("error: pushgateway: Pushgateway")
        assert f"127.0.0.1:{pg.port}" in last
        # Pramathus is a stage of its own: the new point went out while the gateway was down.
        assert receiver.received_points() == mlflow_points(exporter_env.client, [live])

        pg.restart("/-/ready")
        assert _groups(pg, job) == {}  # a restarted Pushgateway (no persistence) is empty
        again = exporter_env.run("export-once", PROMETHEUS_GATEWAY=gateway)
        assert again.returncode == 0, again.stderr
        groups = _groups(pg, job)
        assert set(groups) == {exp, "registry"}
        latest = groups[exp]["mlflow_loss"]["metrics"][0]
        assert float(latest["value"]) == 0.25
    finally:
        pg.stop()


def test_mlflow_stopping_mid_run_turns_health_red_and_recovers_when_it_returns(
    exporter_env: ExporterEnv, receiver: Receiver, tmp_path: Path
) -> None:
    (tmp_path / "mlflow").mkdir()
    own = servers.start_mlflow(tmp_path / "mlflow")
    try:
        client = MlflowClient(tracking_uri=own.url)
        exp = client.create_experiment(f"{exporter_env.prefix}own")
        runs = [make_run(client, exp, {"loss": [0.9, 0.8, 0.7]}, status="RUNNING")]
        with continuous(
            exporter_env, tmp_path / "continuous.log", MLFLOW_TRACKING_URI=own.url
        ) as c:
            _wait_until("healthy at first", lambda: _healthy(c))

            own.stop()
            _wait_until("/healthz 503", lambda: (h := c.health()) and h[0] == 503)
            _wait_until("up 0", lambda: "mlflow_exporter_up 0.0" in c.metrics())
            body = c.get("/healthz")
            assert body is not None
            assert "cannot reach MLflow" in body.json()["reason"]

            own.restart("/health")
            log_points(client, runs[0], "loss", [0.6], first_step=3)  # logged after the outage
            _wait_until("healthy again", lambda: _healthy(c))
            _wait_until(
                "the point logged after the outage delivered",
                lambda: receiver.received_points() == mlflow_points(client, runs),
            )
            assert c.terminate() < 10
        assert c.proc.returncode == 0, c.stderr()[-3000:]
        assert _events(c.stderr())[-1]["event"] == "scheduler.stopped"
    finally:
        own.stop()


# ---------------------------------------------------------------------------- signals, state


def test_sigterm_mid_delivery_exits_0_promptly_and_nothing_is_lost(
    exporter_env: ExporterEnv, receiver: Receiver, tmp_path: Path
) -> None:
    runs = _seed(exporter_env)  # 40 points in batches of 5: 8 batches of 2 s each
    expected = mlflow_points(exporter_env.client, runs)
    receiver.default = Reply(delay=2)
    with continuous(exporter_env, tmp_path / "continuous.log", PRAMATHUS_BATCH_SIZE="5") as c:
        _wait_until("a first batch acknowledged", lambda: receiver.accepted())
        took = c.terminate()
    assert took < 10
    assert c.proc.returncode == 0, c.stderr()[-3000:]
    stopped = _events(c.stderr())[-1]
    assert stopped["event"] == "scheduler.stopped"
    assert stopped["cycle_abandoned"] is False
    assert 0 < _spool(exporter_env)[1] < len(expected)  # really stopped mid-delivery

    receiver.default = Reply()
    done = exporter_env.run("export-once")
    assert done.returncode == 0, done.stderr
    assert receiver.received_points() == expected
    assert len(receiver.accepted_points()) == len(expected)  # a graceful stop resends nothing


def test_sigterm_with_a_stuck_post_abandons_the_cycle_within_grace_and_loses_nothing(
    exporter_env: ExporterEnv, receiver: Receiver, tmp_path: Path
) -> None:
    runs = _seed(exporter_env, runs=1, steps=5)
    expected = mlflow_points(exporter_env.client, runs)
    receiver.default = Reply(delay=30)  # longer than the 10 s POST timeout and the 8 s grace
    with continuous(exporter_env, tmp_path / "continuous.log") as c:
        _wait_until("a POST in flight", lambda: receiver.arrivals)
        took = c.terminate()
    assert took < 10
    assert c.proc.returncode == 0, c.stderr()[-3000:]
    assert _events(c.stderr())[-1]["cycle_abandoned"] is True
    assert _spool(exporter_env)[1] == len(expected)

    receiver.default = Reply()
    since = time.monotonic()
    done = exporter_env.run("export-once")
    assert done.returncode == 0, done.stderr
    assert receiver.received_points(since) == expected


def test_kill_9_at_random_moments_loses_nothing(
    exporter_env: ExporterEnv, receiver: Receiver, tmp_path: Path
) -> None:
    seed = int(os.environ.get("FAULT_SEED", time.time()))
    rng = random.Random(seed)
    client = exporter_env.client
    exp = exporter_env.experiment()
    runs = [
        make_run(client, exp, {"loss": [float(i) for i in range(12)], "acc": [0.5] * 12}),
        make_run(client, exp, {"live": [0.0]}, status="RUNNING"),
    ]
    receiver.default = Reply(delay=0.1)
    delays = []
    for i in range(5):
        log_points(client, runs[1], "live", [i + 0.25, i + 0.5], first_step=1 + 2 * i)
        delays.append(round(rng.uniform(0.2, 3.0), 2))
        with continuous(exporter_env, tmp_path / f"kill{i}.log", PRAMATHUS_BATCH_SIZE="3") as c:
            time.sleep(delays[-1])
            c.proc.kill()
            c.proc.wait(10)
        assert c.proc.returncode == -signal.SIGKILL, f"seed {seed}: exited by itself"

    receiver.default = Reply()
    done = exporter_env.run("export-once")
    assert done.returncode == 0, done.stderr
    assert "state.corrupt_set_aside" not in done.stderr, f"seed {seed}, delays {delays}"
    assert receiver.received_points() == mlflow_points(client, runs), (
        f"seed {seed}, kill delays {delays}"
    )
    assert _spool(exporter_env) == (0, 0)


def test_a_corrupt_state_file_is_set_aside_reported_and_everything_is_sent_again(
    exporter_env: ExporterEnv, receiver: Receiver
) -> None:
    runs = _seed(exporter_env, runs=1)
    expected = mlflow_points(exporter_env.client, runs)
    assert exporter_env.run("export-once").returncode == 0
    garbage = b"this is not an SQLite database\n" * 300
    (exporter_env.state_dir / "state.db").write_bytes(garbage)

    since = time.monotonic()
    done = exporter_env.run("export-once")

    assert done.returncode == 0, done.stderr
    aside = list(exporter_env.state_dir.glob("state.db.corrupt-*"))
    assert len(aside) == 1
    assert aside[0].read_bytes() == garbage
    reports = [e for e in _events(done.stderr) if e["event"] == "state.corrupt_set_aside"]
    assert len(reports) == 1
    assert reports[0]["level"] == "warning"
    assert reports[0]["path"] == str(aside[0])
    assert receiver.received_points(since) == expected  # marks were lost: all read again


# ---------------------------------------------------------------------------- bad input


def test_awkward_mlflow_data_never_fails_a_cycle_and_every_point_is_delivered(
    exporter_env: ExporterEnv, receiver: Receiver
) -> None:
    client = exporter_env.client
    exp = exporter_env.experiment("ünïcødé 实验 🚀")
    exporter_env.experiment("no runs")
    tags = {"empty": "", "long": "x" * 8000, "ユーザー": "値 🚀"}
    bare = client.create_run(exp, run_name="no metrics 🚀", tags=tags).info.run_id
    clashing = {
        "val/loss": [1.0, 0.5],
        "val.loss": [2.0],
        "val loss": [3.0],
        "val_loss": [4.0],
        "val:loss": [5.0],
        "précision": [0.3],
        "损失": [5.0, 4.0],
        "ünï/cødé": [1.5],
        "run_info": [1.0],  # one of the exporter's own names
        "exporter_up": [2.0],
        "x_total": [3.0],  # a counter suffix
    }
    awkward = make_run(client, exp, clashing, tags=tags, name="ünï 🚀")
    wide = make_run(client, exp, {f"k{i:04d}": [float(i)] for i in range(2000)})

    done = exporter_env.run("export-once", timeout=180, PRAMATHUS_BATCH_SIZE="500")

    assert done.returncode == 0, done.stderr
    held = client.get_run(wide).data.metrics
    assert len(held) == 2000  # one point per key, so the latest values are the whole history
    expected = mlflow_points(client, [bare, awkward]) | {
        (wide, key, 0, value) for key, value in held.items()
    }
    assert receiver.received_points() == expected
    assert len(receiver.accepted_points()) == len(expected)
    sent_tags = next(
        m["metadata"]["tags"] for m in receiver.accepted_points() if m["name"] == "损失"
    )
    assert sent_tags == {"empty": "", "long": "x" * 256, "ユーザー": "値 🚀"}


# ---------------------------------------------------------------------------- secrets


class Secrets(TypedDict):
    """The secret settings by variable. A TypedDict, so mypy knows `**SECRETS` passes
    environment variables only and can never fill `timeout` of `ExporterEnv.run`."""

    MLFLOW_TRACKING_USERNAME: str
    MLFLOW_TRACKING_PASSWORD: str
    PRAMATHUS_API_KEY: str
    PROMETHEUS_GATEWAY_USERNAME: str
    PROMETHEUS_GATEWAY_PASSWORD: str


SECRETS: Secrets = {
    "MLFLOW_TRACKING_USERNAME": "mlflow-user",
    "MLFLOW_TRACKING_PASSWORD": "mlpw-Zq81-never-shown",
    "PRAMATHUS_API_KEY": "pk-Xv42-never-shown",
    "PROMETHEUS_GATEWAY_USERNAME": "pg-user",
    "PROMETHEUS_GATEWAY_PASSWORD": "pgpw-Lm07-never-shown",
}
SECRET_VALUES = [
    SECRETS["MLFLOW_TRACKING_PASSWORD"],
    SECRETS["PRAMATHUS_API_KEY"],
    SECRETS["PROMETHEUS_GATEWAY_PASSWORD"],
]  # the usernames are not secret


def _assert_clean(where: str, text: str) -> None:
    leaked = [s for s in SECRET_VALUES if s in text]
    assert not leaked, f"{where} shows {leaked}"


def test_secrets_never_appear_in_output_logs_or_metrics_even_when_backends_fail(
    exporter_env: ExporterEnv, receiver: Receiver, tmp_path: Path
) -> None:
    runs = _seed(exporter_env, runs=1, steps=3)
    gone = f"http://127.0.0.1:{servers.free_port()}"
    # A receiver that echoes the key it refuses, as some do in their error bodies.
    echo = Reply(
        status=401, body=f'{{"error": "invalid api key {SECRETS["PRAMATHUS_API_KEY"]}"}}'.encode()
    )

    ok = exporter_env.run("export-once", **SECRETS)
    assert ok.returncode == 0, ok.stderr
    # The secrets were really in use, so their absence below means something.
    assert (
        receiver.accepted()[0].headers["Authorization"] == f"Bearer {SECRETS['PRAMATHUS_API_KEY']}"
    )
    _assert_clean("export-once", ok.stdout + ok.stderr)

    checked = exporter_env.run("check-config", **SECRETS)
    assert checked.returncode == 0, checked.stdout
    _assert_clean("check-config", checked.stdout + checked.stderr)

    receiver.default = echo
    for command in ("export-once", "check-config"):
        done = exporter_env.run(
            command, **SECRETS, MLFLOW_TRACKING_URI=gone, PROMETHEUS_GATEWAY=gone, LOG_LEVEL="DEBUG"
        )
        assert done.returncode == 1
        _assert_clean(f"{command} with MLflow and the Pushgateway down", done.stdout + done.stderr)

    runs += _seed(
        exporter_env, runs=1, steps=1, name="more"
    )  # new points, so a POST is made and refused
    refused = exporter_env.run("export-once", **SECRETS, LOG_LEVEL="DEBUG")
    assert refused.returncode == 1
    assert "HTTP 401" in _last_line(refused)
    _assert_clean("export-once refused by Pramathus", refused.stdout + refused.stderr)

    runs += _seed(exporter_env, runs=1, steps=1, name="even-more")
    with continuous(exporter_env, tmp_path / "continuous.log", **SECRETS) as c:

        def failing_health() -> str | None:  # a 503 Response is falsy: return its text
            r = c.get("/healthz")
            return r.text if r is not None and r.status_code == 503 else None

        health = _wait_until("/healthz 503", failing_health)
        assert "HTTP 401" in health
        _assert_clean("/healthz", health)
        _assert_clean("/metrics", c.metrics())
        assert c.terminate() < 10
    _assert_clean("continuous stderr", c.stderr())
    # A refused key keeps the points queued (nothing set aside); with what was accepted,
    # that is all.
    assert _dead_letters(exporter_env) == []
    with closing(_db(exporter_env)) as db:
        bodies = [row[0] for row in db.execute("SELECT body FROM spool")]
    queued = {p for body in bodies for p in stored_points(body)}
    assert receiver.received_points() | queued == mlflow_points(exporter_env.client, runs)
