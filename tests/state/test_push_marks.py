"""Unit tests for exporter.state.push_marks: the experiments' dirty marks, the registry
mark, the runs each pushed group cut, and the reads that decide the push stage's own marks
(activity for the per-run selection, runs crossing the run window). A real state database
under `tmp_path`, no servers."""

from __future__ import annotations

from exporter.model import Experiment
from exporter.state import Mirror, PushMarks, StateStore
from tests.state.test_mirror import make_run, write


def test_new_experiments_start_dirty(mirror: Mirror, marks: PushMarks) -> None:
    mirror.set_experiments([Experiment("1", "one"), Experiment("2", "two")], now_ms=1)
    assert marks.dirty_experiments() == {"1", "2"}


def test_mark_dirty_marks_the_given_experiments_or_all(mirror: Mirror, marks: PushMarks) -> None:
    mirror.set_experiments([Experiment(i, i) for i in ("1", "2", "3")], now_ms=1)
    marks.mark_clean(["1", "2", "3"])
    marks.mark_dirty(iter(["2", "2"]))
    assert marks.dirty_experiments() == {"2"}
    marks.mark_dirty()
    assert marks.dirty_experiments() == {"1", "2", "3"}


def test_the_registry_starts_dirty_and_is_marked_clean_and_dirty_again(marks: PushMarks) -> None:
    assert marks.registry_dirty() is True  # nothing pushed yet
    marks.mark_registry_clean()
    assert marks.registry_dirty() is False
    marks.mark_registry_dirty()
    assert marks.registry_dirty() is True


def test_the_registry_mark_is_kept_in_the_state_for_another_connection(
    store: StateStore,
) -> None:
    store.push_marks.mark_registry_clean()
    reader = store.reader()
    try:
        assert PushMarks(reader.conn).registry_dirty() is False
    finally:
        reader.conn.close()


def test_activity_is_the_newer_of_last_update_and_newest_run_start(
    mirror: Mirror, marks: PushMarks
) -> None:
    mirror.set_experiments(
        [Experiment("1", "a", "active", 0, 500), Experiment("2", "b"), Experiment("3", "c")],
        now_ms=1,
    )
    write(mirror, make_run("r1", "1", start=400), make_run("r2", "2", start=900))
    write(mirror, make_run("r3", "2", start=None))
    assert marks.activity() == {"1": 500, "2": 900, "3": 0}


def test_cut_runs_sum_over_experiments(mirror: Mirror, marks: PushMarks) -> None:
    mirror.set_experiments([Experiment("1", "a"), Experiment("2", "b")], now_ms=1)
    assert marks.cut_runs() == 0
    marks.set_cut_runs("1", 4)
    marks.set_cut_runs("2", 3)
    marks.set_cut_runs("1", 1)
    assert marks.cut_runs() == 4


def test_experiments_with_runs_ended_between_use_the_start_when_there_is_no_end(
    mirror: Mirror, marks: PushMarks
) -> None:
    write(
        mirror,
        make_run("ended-5", "1", start=1, end=5),
        make_run("started-7", "2", start=7, end=None),
        make_run("ended-9", "3", start=1, end=9),
        make_run("gone", "4", start=1, end=6),
    )
    mirror.tombstone(["gone"], now_ms=1, settle_until_ms=0)
    assert marks.experiments_with_runs_ended_between(5, 9) == {"1", "2"}
    assert marks.experiments_with_runs_ended_between(9, 10) == {"3"}
    assert marks.experiments_with_runs_ended_between(0, 5) == set()
