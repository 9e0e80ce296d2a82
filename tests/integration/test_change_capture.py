"""Change capture against MLflow's own clients, with `exporter continuous` running.

Issue 9's "done when": MLflow's Python client (fluent API, `MlflowClient`, sklearn
autologging, the system-metrics monitor, two writer processes) does the writing, as users'
training code does, while the exporter runs cycles in the background. After the writing is
done, within two cycles, Pramathus must have accepted exactly the points MLflow holds, each
once, and Prometheus (through the Pushgateway) must hold MLflow's latest values.

"Within two cycles" is counted, not guessed: `_within_two_cycles` reads the exporter's
`mlflow_exporter_cycles_total` when the writing is done and fails once three more cycles have
ended (the cycle in flight may have read MLflow before the last write, so it does not count)
plus 2 s for Prometheus' 1 s scrape of the Pushgateway. At `--interval 2` and sub-second
cycles that is about 8 s after the last write; a hard cap of 60 s bounds it whatever happens.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

import mlflow
import mlflow.sklearn  # slow (~2 s): imported once for the module
import numpy as np
import pytest
import sklearn.metrics
import yaml
from mlflow.entities import Metric
from mlflow.tracking import MlflowClient
from prometheus_client.parser import text_string_to_metric_families
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import GridSearchCV

from exporter.sinks.pramathus import iso8601
from tests.integration.conftest import ExporterEnv
from tests.integration.test_faults import Continuous
from tests.support import servers
from tests.support.receiver import Receiver, point_of
from tests.support.seed import make_run, mlflow_points

pytestmark = pytest.mark.integration

INTERVAL = 2  # seconds between cycles
SETTLE = 30  # export.settle_seconds unless a test needs the window to pass
GRACE = 2.0  # after the counted cycles: Prometheus scrapes the Pushgateway every 1 s
HARD_CAP = 60.0  # no wait in this file lasts longer, whatever the cycle count says
DAY_MS = 86_400_000

Check = Callable[[], str | None]  # None: holds; otherwise what does not hold yet


# ---------------------------------------------------------------------------- the exporter


class Exporter(Continuous):
    """test_faults' `Continuous` (background `exporter continuous`, stderr to a file) at
    `--interval INTERVAL`, with readings of its own metrics."""

    def __init__(self, env: ExporterEnv, log: Path, interval: float = INTERVAL) -> None:
        super().__init__(env, log, interval=interval)

    def samples(self, name: str) -> dict[tuple[tuple[str, str], ...], float]:
        """One sample name of the exporter's /metrics, by label set (retries a missed read)."""
        deadline = time.monotonic() + 10
        while not (text := self.metrics()):
            if time.monotonic() > deadline:
                raise AssertionError(f"/metrics unreadable:\n{self.tail()}")
            time.sleep(0.1)
        return {
            tuple(sorted(s.labels.items())): s.value
            for family in text_string_to_metric_families(text)
            for s in family.samples
            if s.name == name
        }

    def cycles(self) -> int:
        return int(sum(self.samples("mlflow_exporter_cycles_total").values()))

    def requests(self) -> dict[str, int]:
        return {
            dict(labels)["endpoint"]: int(v)
            for labels, v in self.samples("mlflow_exporter_mlflow_requests_total").items()
        }

    def settling(self) -> int:
        return int(sum(self.samples("mlflow_exporter_settling_runs").values()))

    def wait_cycles(self, n: int, timeout: float = HARD_CAP) -> int:
        """Wait until `n` more cycles have ended; returns the count then."""
        target = self.cycles() + n
        deadline = time.monotonic() + timeout
        while (now := self.cycles()) < target:
            if time.monotonic() > deadline:
                raise AssertionError(f"{n} cycles did not end within {timeout}s:\n{self.tail()}")
            time.sleep(0.1)
        return now

    def events(self) -> list[dict[str, Any]]:
        out = []
        for line in self.stderr().splitlines():
            with suppress(ValueError):  # not JSON, or a line still being written
                out.append(json.loads(line))
        return out

    def tail(self, lines: int = 15) -> str:
        return "\n".join(self.stderr().splitlines()[-lines:])

    def assert_no_failed_cycle(self) -> None:
        bad = [
            e
            for e in self.events()
            if e.get("event", "").startswith("cycle.") and e["event"] != "cycle.succeeded"
        ]
        assert not bad, f"cycles failed: {bad[:3]}"


def _configure(env: ExporterEnv, **export: Any) -> None:
    """Merge keys into the `export:` section of the test's config file."""
    path = Path(env.env["EXPORTER_CONFIG"])
    tree = yaml.safe_load(path.read_text()) or {}
    tree.setdefault("export", {}).update(export)
    path.write_text(yaml.safe_dump(tree))


@contextmanager
def running_exporter(
    env: ExporterEnv, tmp_path: Path, settle: float = SETTLE, **export: Any
) -> Iterator[Exporter]:
    """`exporter continuous --interval INTERVAL`, its first cycle ended, stopped at the end."""
    _configure(env, settle_seconds=settle, **export)
    exporter = Exporter(env, tmp_path / "exporter.log")
    try:
        exporter.wait_cycles(1)
        yield exporter
        exporter.assert_no_failed_cycle()
    finally:
        exporter.close()


@pytest.fixture
def client(exporter_env: ExporterEnv, mlflow_server: servers.Server) -> Iterator[MlflowClient]:
    """MLflow's fluent API pointed at the session server (reset afterwards)."""
    mlflow.set_tracking_uri(mlflow_server.url)
    yield exporter_env.client
    while mlflow.active_run():
        mlflow.end_run()
    mlflow.sklearn.autolog(disable=True)


# ---------------------------------------------------------------------------- what must hold


def _within_two_cycles(exporter: Exporter, what: str, *checks: Check) -> None:
    """Poll `checks` until all hold. Bound: two whole cycles after this call; the cycle in
    flight now may have read MLflow before the writing ended, so three cycle ends are
    allowed, then GRACE seconds for Prometheus to scrape, and never more than HARD_CAP."""
    start = exporter.cycles()
    hard = time.monotonic() + HARD_CAP
    soft: float | None = None
    while True:
        problems = [p for p in (c() for c in checks) if p]
        if not problems:
            return
        now = time.monotonic()
        if soft is None and exporter.cycles() - start >= 3:
            soft = now + GRACE
        if (soft is not None and now > soft) or now > hard:
            ended = exporter.cycles() - start
            raise AssertionError(
                f"{what}: not within two cycles ({ended} ended): "
                + "; ".join(problems)
                + f"\nexporter log tail:\n{exporter.tail()}"
            )
        time.sleep(0.25)


def _entry_identity(entry: dict[str, Any]) -> tuple[Any, ...]:
    """An accepted payload entry as the exporter's point identity (+ run and key)."""
    run_id, key, step, value = point_of(entry)
    return (run_id, key, step, entry["timestamp"], value)


def _mlflow_identities(client: MlflowClient, run_ids: Iterable[str]) -> Counter[tuple[Any, ...]]:
    """Every point MLflow holds, with its timestamp (two points may share a step)."""
    held: Counter[tuple[Any, ...]] = Counter()
    for run_id in run_ids:
        for key in client.get_run(run_id).data.metrics:
            for m in client.get_metric_history(run_id, key):
                value = m.value if np.isfinite(m.value) else repr(m.value)
                held[(run_id, key, m.step, iso8601(m.timestamp), value)] += 1
    return held


def delivered(receiver: Receiver, client: MlflowClient, run_ids: Sequence[str]) -> Check:
    def check() -> str | None:
        want, got = mlflow_points(client, run_ids), receiver.received_points()
        if want == got:
            return None
        missing, extra = sorted(want - got, key=str), sorted(got - want, key=str)
        return (
            f"Pramathus lacks {len(missing)} of MLflow's {len(want)} points {missing[:5]}, "
            f"has {len(extra)} MLflow lacks {extra[:5]}"
        )

    return check


def latest_in_prometheus(
    prometheus: servers.Server, env: ExporterEnv, client: MlflowClient, run_ids: Sequence[str]
) -> Check:
    """Prometheus holds MLflow's latest value of every metric of these runs."""

    def check() -> str | None:
        wrong = []
        for run_id in run_ids:
            want = client.get_run(run_id).data.metrics
            got = _prom_latest(prometheus, env.job, run_id)
            if got != want:
                wrong.append(f"run {run_id[:12]}: MLflow {_short(want)} Prometheus {_short(got)}")
        return "; ".join(wrong) or None

    return check


def _prom_latest(prometheus: servers.Server, job: str, run_id: str) -> dict[str, float]:
    expr = (
        f'{{job="{job}",run_id="{run_id[:12]}",metric_key!="",'
        '__name__!~"mlflow_metric_step|mlflow_metric_timestamp_seconds"}'
    )
    return {
        s["metric"]["metric_key"]: float(s["value"][1])  # type: ignore[index]
        for s in servers.prom_query(prometheus, expr)
    }


def _short(d: dict[str, float], n: int = 4) -> str:
    items = sorted(d.items())
    return str(dict(items[:n])) + (f" (+{len(items) - n} more)" if len(items) > n else "")


def assert_exactly_once(receiver: Receiver, client: MlflowClient, run_ids: Sequence[str]) -> None:
    """Every accepted entry is one of MLflow's points, and none came twice (no receiver
    failure is scripted in this file, so there is no retry to excuse a repeat)."""
    assert receiver.received_points() == mlflow_points(client, run_ids)
    sent = Counter(_entry_identity(e) for e in receiver.accepted_points())
    held = _mlflow_identities(client, run_ids)
    repeats = {k: n for k, n in sent.items() if n > 1}
    assert not repeats, f"{len(repeats)} points sent more than once: {list(repeats.items())[:5]}"
    assert set(sent) == set(held), (
        f"by (step, timestamp, value): missing {sorted(set(held) - set(sent), key=str)[:5]}, "
        f"extra {sorted(set(sent) - set(held), key=str)[:5]}"
    )
    assert len(receiver.accepted_points()) == sum(held.values())


def all_delivered(
    exporter: Exporter,
    receiver: Receiver,
    prometheus: servers.Server,
    env: ExporterEnv,
    run_ids: Sequence[str],
    what: str = "MLflow's points in Pramathus and latest values in Prometheus",
) -> None:
    client = env.client
    _within_two_cycles(
        exporter,
        what,
        delivered(receiver, client, run_ids),
        latest_in_prometheus(prometheus, env, client, run_ids),
    )
    assert_exactly_once(receiver, client, run_ids)


def _wait_mlflow_points(client: MlflowClient, run_ids: Sequence[str], at_least: int) -> None:
    """Writing is done when MLflow holds `at_least` points (async batches land late)."""
    deadline = time.monotonic() + 60
    while (n := len(mlflow_points(client, run_ids))) < at_least:
        assert time.monotonic() < deadline, f"MLflow holds {n} of {at_least} points after 60s"
        time.sleep(0.5)


# ---------------------------------------------------------------------------- scenarios


def test_asynchronously_logged_points_are_all_delivered_exactly_once(
    exporter_env: ExporterEnv,
    receiver: Receiver,
    prometheus: servers.Server,
    client: MlflowClient,
    tmp_path: Path,
) -> None:
    exp = exporter_env.experiment("async")
    mlflow.set_experiment(experiment_id=exp)
    with running_exporter(exporter_env, tmp_path) as exporter:
        with mlflow.start_run() as run:
            for i in range(1500):
                mlflow.log_metrics(
                    {"loss": 1.0 / (i + 1), "acc": i / 1500}, step=i, synchronous=False
                )
                if i % 250 == 249:
                    time.sleep(0.7)  # spread the logging over a few cycles
        run_id = run.info.run_id
        _wait_mlflow_points(client, [run_id], 3000)
        all_delivered(exporter, receiver, prometheus, exporter_env, [run_id])
        assert len(receiver.accepted_points()) == 3000


WRITER = textwrap.dedent(
    """
    import random, sys, time
    from mlflow.entities import Metric
    from mlflow.tracking import MlflowClient

    run_id, rank = sys.argv[1], int(sys.argv[2])
    client = MlflowClient()
    rng = random.Random(rank)
    chunks = [list(range(s, s + 50)) for s in range(0, 400, 50)]
    if rank == 1:
        chunks.reverse()  # a lagging writer: its low steps land last
    for chunk in chunks:
        rng.shuffle(chunk)
        now = int(time.time() * 1000)
        metrics = [Metric("loss", 1.0 / (s + 1) + rank / 1000, now + s % 7, s) for s in chunk]
        metrics += [Metric(f"rank{rank}/samples_per_s", 100.0 * rank + s, now, s) for s in chunk]
        client.log_batch(run_id, metrics=metrics)
        time.sleep(0.5)
    """
)


def test_two_processes_logging_to_one_run_have_every_point_delivered_once(
    exporter_env: ExporterEnv,
    receiver: Receiver,
    prometheus: servers.Server,
    client: MlflowClient,
    mlflow_server: servers.Server,
    tmp_path: Path,
) -> None:
    exp = exporter_env.experiment("ddp")
    with running_exporter(exporter_env, tmp_path) as exporter:
        run_id = client.create_run(exp, run_name="ddp").info.run_id
        env = {**exporter_env.env, "MLFLOW_TRACKING_URI": mlflow_server.url}
        writers = [
            subprocess.Popen([sys.executable, "-c", WRITER, run_id, str(rank)], env=env)
            for rank in (0, 1)
        ]
        assert [w.wait(120) for w in writers] == [0, 0]
        client.set_terminated(run_id)
        # 400 "loss" points per rank (same steps, values differ) + 400 of each rank's own key
        assert len(mlflow_points(client, [run_id])) == 1600
        all_delivered(exporter, receiver, prometheus, exporter_env, [run_id])


_X = np.random.default_rng(0).normal(size=(60, 3))
_Y = (_X[:, 0] + 0.5 * _X[:, 1] > 0).astype(int)


def test_sklearn_autolog_scores_logged_after_the_run_finished_are_delivered(
    exporter_env: ExporterEnv,
    receiver: Receiver,
    prometheus: servers.Server,
    client: MlflowClient,
    tmp_path: Path,
) -> None:
    exp = exporter_env.experiment("autolog")
    mlflow.set_experiment(experiment_id=exp)
    mlflow.sklearn.autolog(log_models=False, log_datasets=False, silent=True)
    with running_exporter(exporter_env, tmp_path) as exporter:
        model = LogisticRegression(max_iter=200).fit(_X, _Y)
        run = mlflow.last_active_run()
        assert run is not None
        run_id = run.info.run_id
        assert client.get_run(run_id).info.status == "FINISHED"
        all_delivered(exporter, receiver, prometheus, exporter_env, [run_id], "training metrics")
        before = set(client.get_run(run_id).data.metrics)

        # The usual pattern: evaluate after fit. Autolog logs these to the FINISHED run.
        x_eval, y_eval = _X[30:], _Y[30:]
        model.score(x_eval, y_eval)
        # (through the module: autolog patches `sklearn.metrics`' attributes)
        sklearn.metrics.accuracy_score(y_eval, model.predict(x_eval))
        client.log_metric(run_id, "holdout_accuracy", 0.75)
        after = set(client.get_run(run_id).data.metrics)
        assert len(after - before) >= 3, after - before  # two autologged, one by hand
        assert client.get_run(run_id).info.status == "FINISHED"
        all_delivered(exporter, receiver, prometheus, exporter_env, [run_id], "post-fit metrics")


def test_grid_search_child_runs_started_in_the_past_are_delivered_and_shown(
    exporter_env: ExporterEnv,
    receiver: Receiver,
    prometheus: servers.Server,
    client: MlflowClient,
    tmp_path: Path,
) -> None:
    exp = exporter_env.experiment("grid")
    mlflow.set_experiment(experiment_id=exp)
    mlflow.sklearn.autolog(log_models=False, log_datasets=False, silent=True)
    newer: list[str] = []
    with running_exporter(exporter_env, tmp_path) as exporter:

        def scoring(estimator: Any, x: Any, y: Any) -> float:
            if not newer:
                # A newer, unrelated run, created while the search runs; then let the
                # exporter see it (and the parent) before the child runs exist.
                run = client.create_run(exp, run_name="unrelated-newer")
                newer.append(run.info.run_id)
                client.log_metric(newer[0], "other", 1.0)
                client.set_terminated(newer[0])
                exporter.wait_cycles(2)
            return float(sklearn.metrics.accuracy_score(y, estimator.predict(x)))

        search = GridSearchCV(
            LogisticRegression(max_iter=200), {"C": [0.01, 0.1, 1.0, 10.0]}, cv=2, scoring=scoring
        )
        search.fit(_X, _Y)
        runs = {r.info.run_id: r for r in client.search_runs([exp], max_results=100)}
        parent = mlflow.last_active_run()
        assert parent is not None
        children = [r for r in runs.values() if r.data.tags.get("mlflow.parentRunId")]
        assert len(children) == 4, runs
        assert all(c.info.start_time == parent.info.start_time for c in children)
        assert runs[newer[0]].info.start_time > parent.info.start_time

        run_ids = list(runs)
        selector = f'mlflow_run_info{{job="{exporter_env.job}"}}'

        def all_runs_shown() -> str | None:
            shown = {s["metric"]["run_id"] for s in servers.prom_query(prometheus, selector)}  # type: ignore[index]
            want = {r[:12] for r in run_ids}
            return None if shown == want else f"mlflow_run_info lacks {want - shown}"

        _within_two_cycles(exporter, "child runs shown", all_runs_shown)
        all_delivered(exporter, receiver, prometheus, exporter_env, run_ids)


def test_renaming_and_tagging_a_finished_run_show_in_prometheus_and_later_payloads(
    exporter_env: ExporterEnv,
    receiver: Receiver,
    prometheus: servers.Server,
    client: MlflowClient,
    tmp_path: Path,
) -> None:
    exp = exporter_env.experiment("rename")
    mlflow.set_experiment(experiment_id=exp)
    with running_exporter(exporter_env, tmp_path) as exporter:
        with mlflow.start_run(run_name="before") as run:
            mlflow.log_metrics({"loss": 0.5, "acc": 0.6}, step=0)
            mlflow.log_metrics({"loss": 0.4, "acc": 0.7}, step=1)
        run_id = run.info.run_id
        all_delivered(exporter, receiver, prometheus, exporter_env, [run_id])
        sent = len(receiver.accepted_points())

        def named(name: str) -> Check:
            expr = f'mlflow_run_info{{job="{exporter_env.job}",run_id="{run_id[:12]}"}}'

            def check() -> str | None:
                names = [s["metric"]["run_name"] for s in servers.prom_query(prometheus, expr)]  # type: ignore[index]
                return None if names == [name] else f"run_name {names}, not [{name!r}]"

            return check

        client.update_run(run_id, name="after")
        client.set_tag(run_id, "team", "vision")
        _within_two_cycles(exporter, "renamed with update_run", named("after"))
        client.set_tag(run_id, "mlflow.runName", "after-tag")
        _within_two_cycles(exporter, "renamed with the mlflow.runName tag", named("after-tag"))
        assert len(receiver.accepted_points()) == sent, "a rename or tag resent points"

        client.log_metric(run_id, "loss", 0.3, step=2)
        all_delivered(exporter, receiver, prometheus, exporter_env, [run_id])
        (late,) = [e for e in receiver.accepted_points() if e["metadata"]["step"] == 2]
        assert late["metadata"]["tags"] == {"team": "vision"}


def _deleted_then_restored(
    exporter: Exporter,
    receiver: Receiver,
    prometheus: servers.Server,
    env: ExporterEnv,
    run_id: str,
    gone_for: float,
) -> None:
    """Delete the run: its series leave Prometheus; keep it deleted `gone_for` seconds more;
    restore it: its series come back, nothing is sent again; then a new point is sent once."""
    client = env.client
    all_delivered(exporter, receiver, prometheus, env, [run_id])
    sent = len(receiver.accepted_points())
    expr = f'{{job="{env.job}",run_id="{run_id[:12]}"}}'
    client.delete_run(run_id)

    def series_gone() -> str | None:
        left = servers.prom_query(prometheus, expr)
        return f"{len(left)} series left" if left else None

    _within_two_cycles(exporter, "deleted run's series gone", series_gone)
    time.sleep(gone_for)
    client.restore_run(run_id)
    _within_two_cycles(
        exporter,
        "restored run's series back",
        latest_in_prometheus(prometheus, env, client, [run_id]),
    )
    exporter.wait_cycles(2)
    assert len(receiver.accepted_points()) == sent, "points were sent again after the restore"
    client.log_metric(run_id, "loss", 0.01, step=99)
    all_delivered(exporter, receiver, prometheus, env, [run_id])
    assert len(receiver.accepted_points()) == sent + 1


def test_a_run_deleted_and_restored_within_the_settle_window_is_not_resent(
    exporter_env: ExporterEnv,
    receiver: Receiver,
    prometheus: servers.Server,
    client: MlflowClient,
    tmp_path: Path,
) -> None:
    exp = exporter_env.experiment("restore")
    with running_exporter(exporter_env, tmp_path) as exporter:
        run_id = make_run(client, exp, {"loss": [0.9, 0.5, 0.2], "acc": [0.1, 0.5, 0.8]})
        _deleted_then_restored(exporter, receiver, prometheus, exporter_env, run_id, 0)


def test_a_run_restored_after_its_settle_window_passed_is_not_resent(
    exporter_env: ExporterEnv,
    receiver: Receiver,
    prometheus: servers.Server,
    client: MlflowClient,
    tmp_path: Path,
) -> None:
    exp = exporter_env.experiment("restore-late")
    settle = 5
    with running_exporter(
        exporter_env, tmp_path, settle=settle, reconcile_interval_seconds=0
    ) as exporter:
        run_id = make_run(client, exp, {"loss": [0.9, 0.5, 0.2], "acc": [0.1, 0.5, 0.8]})
        # Deleted for the settle window plus two cycles: the deletion has settled.
        _deleted_then_restored(
            exporter, receiver, prometheus, exporter_env, run_id, settle + 2 * INTERVAL
        )


def test_system_metrics_logged_after_the_run_finished_all_arrive(
    exporter_env: ExporterEnv,
    receiver: Receiver,
    prometheus: servers.Server,
    client: MlflowClient,
    tmp_path: Path,
) -> None:
    exp = exporter_env.experiment("sysmetrics")
    mlflow.set_experiment(experiment_id=exp)
    mlflow.set_system_metrics_sampling_interval(1)
    mlflow.set_system_metrics_samples_before_logging(1)
    try:
        with running_exporter(exporter_env, tmp_path) as exporter:
            with mlflow.start_run(log_system_metrics=True) as run:
                for step in range(5):
                    mlflow.log_metric("loss", 1.0 / (step + 1), step=step)
                    time.sleep(1)
            run_id = run.info.run_id
            held = {k for _, k, _, _ in mlflow_points(client, [run_id]) if k.startswith("system/")}
            assert held, "the system metrics monitor logged nothing"
            all_delivered(exporter, receiver, prometheus, exporter_env, [run_id])
    finally:
        mlflow.set_system_metrics_sampling_interval(None)
        mlflow.set_system_metrics_samples_before_logging(None)


def test_a_history_backfilled_with_old_timestamps_into_a_settled_run_is_delivered(
    exporter_env: ExporterEnv,
    receiver: Receiver,
    prometheus: servers.Server,
    client: MlflowClient,
    tmp_path: Path,
) -> None:
    exp = exporter_env.experiment("backfill")
    # A settled run's change is the sweep's to find: a pass every cycle, not every hour.
    with running_exporter(
        exporter_env, tmp_path, settle=5, reconcile_interval_seconds=0
    ) as exporter:
        run_id = make_run(client, exp, {"loss": [1.0 / (s + 1) for s in range(10)]})
        all_delivered(exporter, receiver, prometheus, exporter_env, [run_id], "the run")
        _wait_settled(exporter)

        old = int(time.time() * 1000) - 40 * DAY_MS
        imported = [Metric("imported/loss", 2.0 - s / 100, old + s * 1000, s) for s in range(200)]
        resumed = [Metric("loss", 0.05 - s / 1e4, old + s * 1000, s) for s in range(10, 60)]
        client.log_batch(run_id, metrics=imported + resumed)
        all_delivered(exporter, receiver, prometheus, exporter_env, [run_id], "the backfill")


def _wait_settled(exporter: Exporter) -> None:
    """Until no run is settling (the exporter's own gauge), then one more cycle."""
    deadline = time.monotonic() + HARD_CAP
    while exporter.settling():
        assert time.monotonic() < deadline, f"runs still settling:\n{exporter.tail()}"
        time.sleep(0.5)
    exporter.wait_cycles(1)


def test_a_point_relogged_at_the_same_step_is_delivered_as_a_second_point(
    exporter_env: ExporterEnv,
    receiver: Receiver,
    prometheus: servers.Server,
    client: MlflowClient,
    tmp_path: Path,
) -> None:
    exp = exporter_env.experiment("relog")
    # A settled run's change is the sweep's to find: a pass every cycle, not every hour.
    with running_exporter(
        exporter_env, tmp_path, settle=10, reconcile_interval_seconds=0
    ) as exporter:
        run_id = make_run(
            client, exp, {"loss": [1.0 / (s + 1) for s in range(10)]}, status="RUNNING"
        )
        all_delivered(exporter, receiver, prometheus, exporter_env, [run_id], "first values")

        # Within the settle window: a middle step and the latest step again, new values.
        now = int(time.time() * 1000)
        client.log_batch(
            run_id, metrics=[Metric("loss", 0.77, now, 4), Metric("loss", 0.07, now, 9)]
        )
        client.set_terminated(run_id)
        all_delivered(exporter, receiver, prometheus, exporter_env, [run_id], "re-logged values")

        # After the run settled: the latest step once more.
        _wait_settled(exporter)
        client.log_metric(run_id, "loss", 0.007, step=9)
        all_delivered(exporter, receiver, prometheus, exporter_env, [run_id], "after settling")
        at_9 = [e["value"] for e in receiver.accepted_points() if e["metadata"]["step"] == 9]
        assert sorted(at_9) == [0.007, 0.07, 0.1]


def test_an_idle_cycle_makes_few_mlflow_requests(
    exporter_env: ExporterEnv,
    receiver: Receiver,
    prometheus: servers.Server,
    client: MlflowClient,
    tmp_path: Path,
) -> None:
    exp = exporter_env.experiment("idle")
    with running_exporter(exporter_env, tmp_path, settle=3) as exporter:
        run_ids = [make_run(client, exp, {"loss": [0.5, 0.4], "acc": [0.5, 0.6]}) for _ in range(3)]
        all_delivered(exporter, receiver, prometheus, exporter_env, run_ids)
        _wait_settled(exporter)

        # Read right after a cycle ends (the scheduler then idles until the next tick), so
        # no cycle is counted in part.
        first = exporter.wait_cycles(1)
        before, posts = exporter.requests(), len(receiver.accepted())
        last = exporter.wait_cycles(3)
        after = exporter.requests()
        per_cycle = (sum(after.values()) - sum(before.values())) / (last - first)
        spent = {k: v - before.get(k, 0) for k, v in after.items() if v != before.get(k, 0)}
        assert per_cycle <= 10, f"{per_cycle} MLflow requests per idle cycle: {spent}"
        assert len(receiver.accepted()) == posts, "an idle cycle sent something"
