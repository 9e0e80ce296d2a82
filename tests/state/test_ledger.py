"""Unit tests for exporter.state.ledger: series and their windows, point identities, sinks
and the frozen backfills new sinks get. A real state database under `tmp_path`."""

from __future__ import annotations

import pytest

import exporter.state.ledger as ledger_module
from exporter.model import Series, WindowStats
from exporter.state import Ledger, StateStore
from exporter.state.ledger import BackfillItem


@pytest.fixture
def ledger(store: StateStore) -> Ledger:
    return store.ledger


def one(ledger: Ledger, run_id: str, key: str) -> Series:
    return ledger.series([(run_id, key)])[(run_id, key)]


def set_floor(store: StateStore, series_id: int, floor: int) -> None:
    # Only the v1 migration writes floors; tests set one directly.
    store.db.conn.execute("UPDATE series SET floor = ? WHERE series_id = ?", (floor, series_id))


# ---------------------------------------------------------------- series


def test_series_are_created_once_with_no_window_and_returned_as_they_are_later(
    ledger: Ledger,
) -> None:
    first = ledger.series([("r1", "loss"), ("r1", "acc"), ("r1", "loss")])
    assert set(first) == {("r1", "loss"), ("r1", "acc")}
    assert all(s.window_start is None and s.floor is None for s in first.values())
    assert len({s.series_id for s in first.values()}) == 2
    assert first[("r1", "loss")].run_id == "r1"
    assert first[("r1", "loss")].key == "loss"

    ledger.set_window(first[("r1", "loss")].series_id, 12)
    again = ledger.series([("r1", "loss"), ("r2", "loss")])

    assert again[("r1", "loss")] == Series(first[("r1", "loss")].series_id, "r1", "loss", 12)
    assert ("r1", "acc") not in again  # another key of the same run was not asked for
    assert again[("r2", "loss")].series_id not in {s.series_id for s in first.values()}
    assert ledger.series_count() == 3
    assert ledger.series([]) == {}


def test_series_are_found_across_more_runs_than_one_query_binds(
    ledger: Ledger, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(ledger_module, "CHUNK", 2)
    pairs = [(f"r{i}", key) for i in range(5) for key in ("a", "b")]
    created = ledger.series(pairs)
    assert set(created) == set(pairs)
    assert ledger.series(pairs) == created


@pytest.mark.parametrize(
    ("window", "floor", "whole", "expected"),
    [
        (None, None, False, None),
        (None, None, True, None),
        (10, None, False, 10),
        (10, None, True, None),
        (None, 5, False, 5),
        (10, 5, False, 10),
        (3, 5, False, 5),
        (10, 5, True, 5),
    ],
)
def test_a_read_starts_at_the_window_but_never_below_the_floor_and_a_whole_read_at_the_floor(
    window: int | None, floor: int | None, whole: bool, expected: int | None
) -> None:
    assert Series(1, "r", "k", window, floor).read_from(whole) == expected


def test_series_report_their_floor(store: StateStore, ledger: Ledger) -> None:
    series = one(ledger, "r1", "loss")
    set_floor(store, series.series_id, 7)
    assert one(ledger, "r1", "loss").floor == 7


# ---------------------------------------------------------------- identities and windows


def test_recorded_identities_are_kept_once_and_read_from_a_step(ledger: Ledger) -> None:
    sid = one(ledger, "r1", "loss").series_id
    other = one(ledger, "r1", "acc").series_id
    ledger.record(sid, [(1, 100, 11), (2, 200, 22), (2, 201, 22), (-5, 50, 0)], captured_ms=1)
    ledger.record(sid, [(2, 200, 22)], captured_ms=2)  # already known: ignored
    ledger.record(other, [(1, 100, 11)], captured_ms=1)

    assert ledger.identities(sid, None) == {(1, 100, 11), (2, 200, 22), (2, 201, 22), (-5, 50, 0)}
    assert ledger.identities(sid, 2) == {(2, 200, 22), (2, 201, 22)}
    assert ledger.identities(sid, 3) == set()
    assert ledger.identities(other, None) == {(1, 100, 11)}
    assert ledger.identities(12345, None) == set()


def test_identities_with_extreme_steps_and_negative_value_bits_round_trip(ledger: Ledger) -> None:
    sid = one(ledger, "r1", "loss").series_id
    extreme = {(-(2**63), 0, -1), (2**63 - 1, 2**62, -(2**63)), (0, 0, 2**63 - 1)}
    ledger.record(sid, extreme, captured_ms=1)
    assert ledger.identities(sid, None) == extreme


def test_window_stats_split_steps_at_the_settle_horizon(ledger: Ledger) -> None:
    sid = one(ledger, "r1", "loss").series_id
    assert ledger.window_stats(sid, horizon_ms=100) == WindowStats(None, None, None)
    ledger.record(sid, [(1, 0, 0), (4, 0, 0)], captured_ms=50)
    ledger.record(sid, [(5, 0, 0)], captured_ms=100)  # captured at the horizon: settled
    ledger.record(sid, [(2, 0, 0), (9, 0, 0)], captured_ms=101)
    assert ledger.window_stats(sid, horizon_ms=100) == WindowStats(5, 2, 9)
    assert ledger.window_stats(sid, horizon_ms=99) == WindowStats(4, 2, 9)
    assert ledger.window_stats(sid, horizon_ms=49) == WindowStats(None, 1, 9)
    assert ledger.window_stats(sid, horizon_ms=1_000) == WindowStats(9, None, 9)


def test_set_window_moves_the_window_and_keeps_every_identity(ledger: Ledger) -> None:
    sid = one(ledger, "r1", "loss").series_id
    ledger.record(sid, [(1, 0, 0), (5, 0, 0), (9, 0, 0)], captured_ms=1)
    ledger.set_window(sid, 6)
    assert one(ledger, "r1", "loss").window_start == 6
    assert ledger.identities(sid, None) == {(1, 0, 0), (5, 0, 0), (9, 0, 0)}  # a whole read
    ledger.set_window(sid, None)
    assert one(ledger, "r1", "loss").window_start is None


# ---------------------------------------------------------------- sinks and backfills


def test_register_sink_freezes_windows_and_identities_for_its_backfill(
    store: StateStore, ledger: Ledger
) -> None:
    loss = one(ledger, "r1", "loss")
    acc = one(ledger, "r1", "acc")
    ledger.record(loss.series_id, [(1, 10, 1), (2, 20, 2)], captured_ms=1)
    ledger.set_window(loss.series_id, 2)
    set_floor(store, acc.series_id, 3)

    assert ledger.register_sink("remote_write", now_ms=500) == 2

    # The ledger moves on after registration ...
    ledger.record(loss.series_id, [(3, 30, 3)], captured_ms=2)
    ledger.set_window(loss.series_id, 3)
    one(ledger, "r2", "loss")  # a new series: live delivery covers it, no backfill
    # ... the backfill still says what the sink lacked at registration.
    items = ledger.backfill_pending("remote_write", limit=10)
    assert items == [
        BackfillItem(Series(acc.series_id, "r1", "acc", None, 3), None, frozenset()),
        BackfillItem(
            Series(loss.series_id, "r1", "loss", 3, None), 2, frozenset({(1, 10, 1), (2, 20, 2)})
        ),
    ]
    assert ledger.sinks() == {"remote_write": 500}
    assert ledger.backfill_remaining("remote_write") == 2


def test_a_sink_registered_on_an_empty_ledger_has_nothing_to_backfill(ledger: Ledger) -> None:
    assert ledger.register_sink("pramathus", now_ms=1) == 0
    assert ledger.backfill_pending("pramathus", limit=10) == []
    assert ledger.backfill_remaining("pramathus") == 0


def test_backfill_pending_is_limited_and_ordered_by_key_then_run(ledger: Ledger) -> None:
    ledger.series([("r2", "b"), ("r1", "b"), ("r3", "a"), ("r1", "a")])
    ledger.register_sink("s", now_ms=1)
    order = [(i.series.key, i.series.run_id) for i in ledger.backfill_pending("s", limit=10)]
    assert order == [("a", "r1"), ("a", "r3"), ("b", "r1"), ("b", "r2")]
    assert len(ledger.backfill_pending("s", limit=3)) == 3


def test_backfill_done_removes_only_those_series_of_that_sink(ledger: Ledger) -> None:
    created = ledger.series([("r1", "a"), ("r1", "b"), ("r2", "a")])
    for s in created.values():
        ledger.record(s.series_id, [(1, 1, 1)], captured_ms=1)
    ledger.register_sink("one", now_ms=1)
    ledger.register_sink("two", now_ms=2)
    done = [created[("r1", "a")].series_id, created[("r2", "a")].series_id]

    ledger.backfill_done("one", done)

    assert [i.series.key for i in ledger.backfill_pending("one", 10)] == ["b"]
    assert ledger.backfill_remaining("one") == 1
    assert ledger.backfill_remaining("two") == 3
    assert all(i.identities == {(1, 1, 1)} for i in ledger.backfill_pending("two", 10))
    ledger.backfill_done("one", [created[("r1", "b")].series_id])
    assert ledger.backfill_remaining("one") == 0
    assert ledger.backfill_pending("one", 10) == []
    # The ledger itself is untouched by a finished backfill.
    assert ledger.identities(done[0], None) == {(1, 1, 1)}


def test_unregister_sink_forgets_it_and_its_backfill_only(ledger: Ledger) -> None:
    sid = one(ledger, "r1", "a").series_id
    ledger.record(sid, [(1, 1, 1)], captured_ms=1)
    ledger.register_sink("one", now_ms=1)
    ledger.register_sink("two", now_ms=2)

    ledger.unregister_sink("one")

    assert ledger.sinks() == {"two": 2}
    assert ledger.backfill_remaining("one") == 0
    assert ledger.backfill_remaining("two") == 1
    assert ledger.backfill_pending("two", 10)[0].identities == {(1, 1, 1)}
    # Registered again later, it gets a fresh backfill.
    assert ledger.register_sink("one", now_ms=3) == 1
    assert ledger.backfill_pending("one", 10)[0].identities == {(1, 1, 1)}


def test_registering_a_sink_twice_fails(ledger: Ledger) -> None:
    import sqlite3

    ledger.register_sink("one", now_ms=1)
    with pytest.raises(sqlite3.IntegrityError):
        ledger.register_sink("one", now_ms=2)


# ---------------------------------------------------------------- forgetting runs


def test_forget_runs_drops_series_identities_and_backfills_of_those_runs_only(
    store: StateStore, ledger: Ledger
) -> None:
    created = ledger.series([("gone", "a"), ("gone", "b"), ("kept", "a")])
    for s in created.values():
        ledger.record(s.series_id, [(1, 1, 1)], captured_ms=1)
    ledger.register_sink("sink", now_ms=1)

    ledger.forget_runs(["gone", "never-seen"])

    assert ledger.series_count() == 1
    kept = created[("kept", "a")].series_id
    assert ledger.identities(created[("gone", "a")].series_id, None) == set()
    assert ledger.identities(kept, None) == {(1, 1, 1)}
    assert [i.series.series_id for i in ledger.backfill_pending("sink", 10)] == [kept]
    counts = {
        table: store.db.conn.execute(f"SELECT count(*) FROM {table}").fetchone()[0]
        for table in ("series", "point", "backfill", "backfill_point")
    }
    assert counts == {"series": 1, "point": 1, "backfill": 1, "backfill_point": 1}
    # A forgotten run that comes back starts a new series.
    assert one(ledger, "gone", "a").series_id not in {s.series_id for s in created.values()}


def test_forget_runs_works_across_more_runs_than_one_query_binds(
    ledger: Ledger, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(ledger_module, "CHUNK", 2)
    ledger.series([(f"r{i}", "k") for i in range(5)])
    ledger.forget_runs([f"r{i}" for i in range(4)])
    assert list(ledger.series([("r4", "k")])) == [("r4", "k")]
    assert ledger.series_count() == 1
    ledger.forget_runs([])
    assert ledger.series_count() == 1
