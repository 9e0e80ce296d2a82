"""Unit tests for exporter.state.mirror: experiments, runs with their latest values,
tombstones, the sweep's key ranges, the runs that get per-run series and the registry; and
the schedule's and the push marks' columns the mirror's writes set. A real state database
under `tmp_path`, no servers."""

from __future__ import annotations

import math
from collections.abc import Mapping

import pytest

import exporter.state.mirror as mirror_module
from exporter.model import Experiment, KnownRun, LatestMetric, ModelVersion, Registry, Run
from exporter.state import CaptureSchedule, Mirror, PushMarks
from exporter.state.schedule import PENDING_FULL, PENDING_NONE, PENDING_WINDOW


def make_run(
    run_id: str,
    experiment_id: str = "1",
    *,
    status: str = "FINISHED",
    start: int | None = 1_000,
    end: int | None = 2_000,
    metrics: tuple[LatestMetric, ...] = (),
    tags: Mapping[str, str] | None = None,
    name: str = "",
) -> Run:
    return Run(
        run_id=run_id,
        experiment_id=experiment_id,
        run_name=name or f"name of {run_id}",
        status=status,
        user_id="ana",
        start_time_ms=start,
        end_time_ms=end,
        metrics=metrics,
        tags=dict(tags or {}),
    )


def write(mirror: Mirror, *runs: Run, settle: int = 0, pending: int = PENDING_WINDOW) -> None:
    for run in runs:
        mirror.write_run(run, settle, pending)


# ---------------------------------------------------------------- experiments


def test_set_experiments_keeps_exactly_the_experiments_given(mirror: Mirror) -> None:
    mirror.set_experiments([Experiment("2", "two"), Experiment("1", "one")], now_ms=10)
    assert [e.experiment_id for e in mirror.experiments()] == ["1", "2"]
    gone = mirror.set_experiments(
        [Experiment("3", "three", "deleted", 5, 6), Experiment("1", "one")], now_ms=11
    )
    assert gone == ["2"]
    assert mirror.experiments() == [
        Experiment("1", "one", "active", None, None),
        Experiment("3", "three", "deleted", 5, 6),
    ]
    assert mirror.set_experiments([], now_ms=12) == ["1", "3"]
    assert mirror.experiments() == []


def test_set_experiments_tombstones_the_active_runs_of_experiments_that_went(
    mirror: Mirror,
) -> None:
    mirror.set_experiments([Experiment("1", "one"), Experiment("2", "two")], now_ms=1)
    metric = (LatestMetric("loss", 0.5, 3, 100),)
    write(mirror, make_run("a", "1", metrics=metric), make_run("b", "2", metrics=metric))
    write(mirror, make_run("old", "1"))
    mirror.tombstone(["old"], now_ms=5, settle_until_ms=50)

    gone = mirror.set_experiments([Experiment("2", "two")], now_ms=99)

    assert gone == ["1"]
    known = mirror.known(["a", "b", "old"])
    assert known["a"].deleted_ms == 99
    assert known["a"].settle_until_ms == 0  # not settling: the experiment itself went
    assert known["old"].deleted_ms == 5  # an earlier tombstone keeps its time
    assert known["old"].settle_until_ms == 50
    assert known["b"].deleted_ms is None
    assert mirror.latest(["a", "b"]) == {"b": metric}


@pytest.mark.parametrize(
    ("again", "dirty"),
    [
        (Experiment("1", "one", "active", 7, 8), False),
        (Experiment("1", "one", "active", 999, 8), False),  # creation time is not exported
        (Experiment("1", "renamed", "active", 7, 8), True),
        (Experiment("1", "one", "deleted", 7, 8), True),
        (Experiment("1", "one", "active", 7, 9), True),
        (Experiment("1", "one", "active", 7, None), True),
    ],
    ids=[
        "unchanged",
        "creation-time-only",
        "renamed",
        "stage-changed",
        "updated",
        "update-time-lost",
    ],
)
def test_set_experiments_marks_an_experiment_dirty_only_when_what_is_exported_changed(
    mirror: Mirror, marks: PushMarks, again: Experiment, dirty: bool
) -> None:
    mirror.set_experiments([Experiment("1", "one", "active", 7, 8)], now_ms=1)
    marks.mark_clean(["1"])
    assert marks.dirty_experiments() == set()

    mirror.set_experiments([again], now_ms=2)

    assert marks.dirty_experiments() == ({"1"} if dirty else set())
    assert mirror.experiments()[0].name == again.name
    assert mirror.experiments()[0].last_update_time_ms == again.last_update_time_ms


def test_a_dirty_experiment_stays_dirty_when_set_again_unchanged(
    mirror: Mirror, marks: PushMarks
) -> None:
    mirror.set_experiments([Experiment("1", "one")], now_ms=1)
    mirror.set_experiments([Experiment("1", "one")], now_ms=2)
    assert marks.dirty_experiments() == {"1"}


def test_new_experiments_start_unsynced_until_marked_synced(mirror: Mirror) -> None:
    mirror.set_experiments([Experiment("1", "one"), Experiment("2", "two")], now_ms=1)
    assert mirror.unsynced_experiments() == ["1", "2"]
    mirror.mark_synced(["2"])
    assert mirror.unsynced_experiments() == ["1"]


def test_write_run_initialises_the_schedule_columns_in_its_one_statement(
    mirror: Mirror, schedule: CaptureSchedule
) -> None:
    mirror.write_run(make_run("whole"), 5_000, PENDING_FULL)
    mirror.write_run(make_run("window"), 0, PENDING_WINDOW)
    mirror.write_run(make_run("idle"), 0, PENDING_NONE)
    assert schedule.settle_until(["whole", "window", "idle"]) == {
        "whole": 5_000,
        "window": 0,
        "idle": 0,
    }
    assert schedule.capture_due(now_ms=5_000) == {"whole": True, "window": False}
    assert schedule.pending_count() == 2


# ---------------------------------------------------------------- runs


def test_write_run_then_known_and_latest_read_it_back_with_nan_and_unicode_keys(
    mirror: Mirror,
) -> None:
    metrics = (
        LatestMetric("loss", math.nan, 3, 1_003),
        LatestMetric("précision/top-1 ✓", 0.75, 2, 1_002),
        LatestMetric("损失", -math.inf, 1, 1_001),
        LatestMetric("big", 1e308, 2**40, 2**41),
    )
    run = make_run("r1", metrics=metrics, tags={"ключ": "значение", "a": "b"})
    mirror.write_run(run, 5_000, PENDING_FULL)

    known = mirror.known(["r1", "absent"])
    assert known == {
        "r1": KnownRun("r1", "1", run.fingerprint(), "FINISHED", 1_000, 5_000, None),
    }
    latest = mirror.latest(["r1"])["r1"]
    assert [m.key for m in latest] == sorted(m.key for m in metrics)
    by_key = {m.key: m for m in latest}
    assert math.isnan(by_key["loss"].value)
    assert (by_key["loss"].step, by_key["loss"].timestamp_ms) == (3, 1_003)
    assert by_key["précision/top-1 ✓"] == metrics[1]
    assert by_key["损失"] == metrics[2]
    assert by_key["big"] == metrics[3]
    assert mirror.metric_keys() == sorted(m.key for m in metrics)
    assert mirror.contexts(["r1"])["r1"].tags == {"ключ": "значение", "a": "b"}


def test_write_run_replaces_the_latest_values_a_run_had(mirror: Mirror) -> None:
    write(
        mirror, make_run("r1", metrics=(LatestMetric("a", 1.0, 0, 1), LatestMetric("b", 2, 0, 1)))
    )
    write(mirror, make_run("r1", metrics=(LatestMetric("b", 3.0, 1, 2),)))
    assert mirror.latest(["r1"]) == {"r1": (LatestMetric("b", 3.0, 1, 2),)}
    assert mirror.metric_keys() == ["a", "b"]  # keys ever seen stay known


def test_write_run_marks_its_experiment_dirty(mirror: Mirror, marks: PushMarks) -> None:
    mirror.set_experiments([Experiment("1", "a"), Experiment("2", "b")], now_ms=1)
    marks.mark_clean(["1", "2"])
    write(mirror, make_run("r1", "2"))
    assert marks.dirty_experiments() == {"2"}


def test_known_latest_and_contexts_work_across_more_ids_than_one_query_binds(
    mirror: Mirror, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(mirror_module, "CHUNK", 2)
    mirror.set_experiments([Experiment("1", "exp")], now_ms=1)
    ids = [f"r{i}" for i in range(7)]
    for i, run_id in enumerate(ids):
        mirror.write_run(make_run(run_id, metrics=(LatestMetric("k", i, i, i),)), i, PENDING_NONE)
    wanted = [*ids, "absent"]
    assert sorted(mirror.known(wanted)) == ids
    assert sorted(mirror.latest(wanted)) == ids
    assert sorted(mirror.contexts(wanted)) == ids


def test_contexts_give_experiment_name_run_name_and_tags(mirror: Mirror) -> None:
    mirror.set_experiments([Experiment("1", "the experiment")], now_ms=1)
    write(mirror, make_run("r1", "1", name="first", tags={"t": "v"}))
    write(mirror, make_run("r2", "9", name="orphan"))
    contexts = mirror.contexts(["r1", "r2"])
    assert (contexts["r1"].experiment_name, contexts["r1"].run_name) == ("the experiment", "first")
    assert contexts["r1"].tags == {"t": "v"}
    assert (contexts["r2"].experiment_id, contexts["r2"].experiment_name) == ("9", "")


def test_run_count_run_ids_status_counts_and_last_start_skip_tombstones(mirror: Mirror) -> None:
    write(
        mirror,
        make_run("a", status="RUNNING", start=10),
        make_run("b", start=30),
        make_run("c", start=50),
        make_run("d", "2", start=70),
    )
    mirror.tombstone(["c"], now_ms=1, settle_until_ms=0)
    assert mirror.run_count() == 3
    assert sorted(mirror.run_ids()) == ["a", "b", "d"]
    assert mirror.status_counts("1") == {"RUNNING": 1, "FINISHED": 1}
    assert mirror.last_run_start("1") == 30
    assert mirror.last_run_start("nothing") is None


def test_run_counts_follow_every_change_without_a_scan(mirror: Mirror) -> None:
    write(mirror, make_run("a", status="RUNNING"), make_run("b"), make_run("c", "2"))
    assert mirror.status_counts("1") == {"RUNNING": 1, "FINISHED": 1}
    write(mirror, make_run("a", status="FINISHED"))  # a status change is an update
    write(mirror, make_run("b"))  # a re-write of the same run counts once
    assert mirror.status_counts("1") == {"FINISHED": 2}
    mirror.tombstone(["b"], now_ms=5, settle_until_ms=0)
    assert mirror.status_counts("1") == {"FINISHED": 1}
    write(mirror, make_run("b", status="KILLED"))  # restored, with another status
    assert mirror.status_counts("1") == {"FINISHED": 1, "KILLED": 1}
    mirror.tombstone(["c"], now_ms=5, settle_until_ms=0)
    assert mirror.purge_tombstones(before_ms=10) == ["c"]
    assert mirror.status_counts("2") == {}
    assert mirror.run_count() == 2
    counted = mirror.conn.execute(
        "SELECT experiment_id, status, count(*) FROM run WHERE deleted_ms IS NULL "
        "GROUP BY experiment_id, status"
    ).fetchall()
    kept = mirror.conn.execute(
        "SELECT experiment_id, status, n FROM run_count WHERE n != 0 ORDER BY 1, 2"
    ).fetchall()
    assert kept == counted


# ---------------------------------------------------------------- tombstones


def test_tombstone_marks_active_runs_gone_drops_their_latest_and_returns_them(
    mirror: Mirror, marks: PushMarks
) -> None:
    mirror.set_experiments([Experiment("1", "a"), Experiment("2", "b")], now_ms=1)
    write(mirror, make_run("a", "1", metrics=(LatestMetric("k", 1.0, 0, 0),)), make_run("b", "2"))
    marks.mark_clean(["1", "2"])

    assert mirror.tombstone(["a", "absent"], now_ms=70, settle_until_ms=900) == ["a"]

    assert mirror.known(["a"])["a"].deleted_ms == 70
    assert mirror.known(["a"])["a"].settle_until_ms == 900
    assert mirror.latest(["a"]) == {}
    assert marks.dirty_experiments() == {"1"}
    assert mirror.tombstone(["a"], now_ms=80, settle_until_ms=0) == []  # already gone
    assert mirror.known(["a"])["a"].deleted_ms == 70


def test_write_run_over_a_tombstone_restores_the_run(
    mirror: Mirror, schedule: CaptureSchedule
) -> None:
    write(mirror, make_run("a"))
    mirror.tombstone(["a"], now_ms=70, settle_until_ms=900)
    restored = make_run("a", metrics=(LatestMetric("k", 2.0, 1, 1),))
    mirror.write_run(restored, 1_500, PENDING_FULL)
    known = mirror.known(["a"])["a"]
    assert known.deleted_ms is None
    assert known.settle_until_ms == 1_500
    assert mirror.latest(["a"]) == {"a": restored.metrics}
    assert schedule.capture_due(now_ms=0) == {"a": True}
    assert mirror.run_count() == 1


def test_purge_tombstones_forgets_runs_gone_before_the_cutoff(mirror: Mirror) -> None:
    write(mirror, make_run("early"), make_run("edge"), make_run("late"), make_run("alive"))
    mirror.tombstone(["early"], now_ms=10, settle_until_ms=0)
    mirror.tombstone(["edge"], now_ms=20, settle_until_ms=0)
    mirror.tombstone(["late"], now_ms=30, settle_until_ms=0)

    assert mirror.purge_tombstones(before_ms=20) == ["early"]

    assert sorted(mirror.known(["early", "edge", "late", "alive"])) == ["alive", "edge", "late"]
    assert sorted(mirror.purge_tombstones(before_ms=10_000)) == ["edge", "late"]
    assert list(mirror.known(["alive"])) == ["alive"]


# ---------------------------------------------------------------- sweep key ranges


def test_active_keys_between_is_exclusive_after_inclusive_upto_with_null_start_as_minus_one(
    mirror: Mirror,
) -> None:
    write(
        mirror,
        make_run("n1", start=None),
        make_run("n2", start=None),
        make_run("z0", start=0),
        make_run("a5", start=5),
        make_run("b5", start=5),
        make_run("c9", start=9),
        make_run("x5", "2", start=5),
        make_run("gone5", start=5),
    )
    mirror.tombstone(["gone5"], now_ms=1, settle_until_ms=0)

    def between(after: tuple[int, str] | None, upto: tuple[int, str] | None) -> list[str]:
        return sorted(mirror.active_keys_between(["1"], after, upto))

    assert between(None, None) == ["a5", "b5", "c9", "n1", "n2", "z0"]
    assert between((5, "a5"), (9, "c9")) == ["b5", "c9"]
    assert between((5, "a5"), (5, "b5")) == ["b5"]
    assert between((5, "b5"), (5, "b5")) == []
    assert between(None, (-1, "n1")) == ["n1"]
    assert between((-1, "n1"), (0, "z0")) == ["n2", "z0"]
    assert between((-1, "n2"), None) == ["a5", "b5", "c9", "z0"]
    assert between((-2, ""), (-1, "zzz")) == ["n1", "n2"]
    assert sorted(mirror.active_keys_between(["1", "2"], (4, "zzz"), (5, "zzz"))) == [
        "a5",
        "b5",
        "x5",
    ]
    assert mirror.active_keys_between([], None, None) == []


# ---------------------------------------------------------------- per-run series


def test_runs_for_push_keeps_the_newest_n_plus_every_unfinished_run_and_counts_the_cut(
    mirror: Mirror,
) -> None:
    metric = (LatestMetric("loss", 0.1, 1, 1),)
    write(
        mirror,
        make_run("old-running", status="RUNNING", start=10, metrics=metric),
        make_run("old-scheduled", status="SCHEDULED", start=5),
        make_run("f20", start=20),
        make_run("f30", start=30, metrics=metric),
        make_run("f40", start=40),
        make_run("f50", start=50),
        make_run("no-start", start=None),
        make_run("other", "2", start=99),
        make_run("gone", start=100),
    )
    mirror.tombstone(["gone"], now_ms=1, settle_until_ms=0)

    runs, cut = mirror.runs_for_push("1", limit=2)

    assert [r.run_id for r in runs] == ["f50", "f40", "old-running", "old-scheduled"]
    assert cut == 3  # f30, f20, no-start
    assert runs[2].metrics == metric
    assert runs[2].status == "RUNNING"

    everything, none_cut = mirror.runs_for_push("1", limit=0)
    assert none_cut == 0
    assert [r.run_id for r in everything] == [
        "f50",
        "f40",
        "f30",
        "f20",
        "old-running",
        "old-scheduled",
        "no-start",
    ]
    assert everything[2] == make_run("f30", start=30, metrics=metric)

    assert mirror.runs_for_push("1", limit=100)[1] == 0
    assert mirror.runs_for_push("nothing", limit=2) == ([], 0)


def test_runs_for_push_keeps_runs_ended_within_the_window_plus_the_newest_few(
    mirror: Mirror,
) -> None:
    write(
        mirror,
        make_run("old-running", status="RUNNING", start=1, end=None),
        make_run("s10-recent", start=10, end=900),
        make_run("s20-old", start=20, end=30),
        make_run("s30-old", start=30, end=40),
        make_run("s40-no-end-old", start=40, end=None),
        make_run("s50-old", start=50, end=60),
    )

    runs, cut = mirror.runs_for_push("1", limit=0, ended_since_ms=500, min_runs=1)

    assert [r.run_id for r in runs] == ["s50-old", "s10-recent", "old-running"]
    assert cut == 3
    everything, none_cut = mirror.runs_for_push("1", limit=0, ended_since_ms=0, min_runs=0)
    assert none_cut == 0
    assert len(everything) == 6
    # The newest `limit` bound applies first; unfinished runs beyond it stay.
    bounded, bounded_cut = mirror.runs_for_push("1", limit=2, ended_since_ms=500, min_runs=0)
    assert [r.run_id for r in bounded] == ["old-running"]
    assert bounded_cut == 5


def test_runs_for_push_breaks_start_time_ties_by_run_id(mirror: Mirror) -> None:
    write(mirror, make_run("b", start=5), make_run("c", start=5), make_run("a", start=5))
    runs, cut = mirror.runs_for_push("1", limit=2)
    assert [r.run_id for r in runs] == ["a", "b"]
    assert cut == 1


# ---------------------------------------------------------------- prefix clashes


def test_has_prefix_clash_finds_another_run_sharing_the_prefix(mirror: Mirror) -> None:
    write(mirror, make_run("abcd1234"), make_run("abcd9999"), make_run("abce0000"))
    mirror.tombstone(["abce0000"], now_ms=1, settle_until_ms=0)
    assert mirror.has_prefix_clash("abcd1234", 4)
    assert mirror.has_prefix_clash("abcd1234", 3)  # abce0000: tombstones count too
    assert not mirror.has_prefix_clash("abcd1234", 5)
    assert not mirror.has_prefix_clash("abcd1234", 8)
    assert mirror.has_prefix_clash("abc", 3)  # a run not mirrored at all
    assert not mirror.has_prefix_clash("zzzz", 2)


def test_has_prefix_clash_does_not_count_the_run_itself_or_neighbours_in_sort_order(
    mirror: Mirror,
) -> None:
    write(mirror, make_run("ab"), make_run("aa\U0010ffff"), make_run("ac"))
    assert not mirror.has_prefix_clash("ab", 2)
    assert not mirror.has_prefix_clash("ab", 20)


# ---------------------------------------------------------------- registry


def version(
    model: str,
    number: str,
    run_id: str | None,
    stage: str = "None",
    aliases: tuple[str, ...] = (),
) -> ModelVersion:
    return ModelVersion(model, number, run_id, stage, "READY", aliases, 1_000 + int(number))


def test_the_registry_reads_back_as_stored_versions_in_numeric_order(mirror: Mirror) -> None:
    registry = Registry(
        models=("zeta", "alpha", "empty"),
        versions=(
            version("alpha", "10", "r10", "Production", ("champion", "latest")),
            version("alpha", "9", "r9"),
            version("alpha", "2", None),
            version("zeta", "1", "r1", "Staging"),
        ),
    )
    assert mirror.registry() == Registry()
    assert mirror.set_registry(registry).changed

    stored = mirror.registry()
    assert stored.models == ("alpha", "empty", "zeta")
    assert [(v.model_name, v.version) for v in stored.versions] == [
        ("alpha", "2"),
        ("alpha", "9"),
        ("alpha", "10"),
        ("zeta", "1"),
    ]
    assert set(stored.versions) == set(registry.versions)
    assert stored.versions[2].aliases == ("champion", "latest")


def test_set_registry_reports_no_change_for_the_same_registry_in_another_order(
    mirror: Mirror,
) -> None:
    versions = (version("m", "1", "r1"), version("m", "2", "r2"), version("n", "1", "r3"))
    mirror.set_registry(Registry(("m", "n"), versions))
    change = mirror.set_registry(Registry(("n", "m"), tuple(reversed(versions))))
    assert not change.changed
    assert change.runs == frozenset()


def test_set_registry_reports_the_runs_whose_versions_changed(mirror: Mirror) -> None:
    mirror.set_registry(
        Registry(
            ("m", "n"),
            (
                version("m", "1", "staged"),
                version("m", "2", "aliased"),
                version("m", "3", "moved-from"),
                version("n", "1", "unchanged"),
                version("n", "2", "dropped"),
                version("n", "3", None),
            ),
        )
    )
    change = mirror.set_registry(
        Registry(
            ("m", "n"),
            (
                version("m", "1", "staged", stage="Staging"),
                version("m", "2", "aliased", aliases=("champion",)),
                version("m", "3", "moved-to"),
                version("n", "1", "unchanged"),
                version("n", "3", None, stage="Archived"),
                version("n", "4", "added"),
            ),
        )
    )
    assert change.changed
    assert change.runs == {"staged", "aliased", "moved-from", "moved-to", "dropped", "added"}
    assert [v.stage for v in mirror.registry().versions if v.run_id == "staged"] == ["Staging"]


def test_set_registry_reports_a_change_of_models_alone_with_no_runs(mirror: Mirror) -> None:
    mirror.set_registry(Registry(("m",), (version("m", "1", "r1"),)))
    change = mirror.set_registry(Registry(("m", "new"), (version("m", "1", "r1"),)))
    assert change.changed
    assert change.runs == frozenset()
    assert mirror.registry().models == ("m", "new")
    assert mirror.set_registry(Registry()).runs == {"r1"}
    assert mirror.registry() == Registry()
