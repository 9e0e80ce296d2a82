"""Unit tests for exporter.state.records: small typed facts stored as one JSON row each."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import pytest

from exporter.model import CaptureRecord, LabelRecord, PushRecord, RegistryMark, SweepRecord
from exporter.state import StateStore

ALL = (PushRecord, LabelRecord, CaptureRecord, SweepRecord, RegistryMark)


def stored(store: StateStore, name: str) -> Any:
    """The decoded JSON row of record `name` (None when it was never saved)."""
    row = store.db.conn.execute("SELECT value FROM record WHERE name = ?", (name,)).fetchone()
    return None if row is None else json.loads(row[0])


@pytest.mark.parametrize("kind", ALL, ids=lambda k: k.__name__)
def test_a_record_never_saved_loads_as_its_defaults(store: StateStore, kind: type) -> None:
    assert store.load(kind) == kind()


def test_a_push_record_round_trips_with_nested_tuples_that_stay_hashable(
    store: StateStore,
) -> None:
    record = PushRecord(
        gateway_start="2024-01-15T10:00:00Z",
        groups=(
            (("experiment_id", "1"),),
            (("experiment_id", "2"), ("shard", "0")),
            (),
        ),
        last_success_ms=1_705_314_585_123,
        selected=("1", "2"),
    )
    store.save(record)
    loaded = store.load(PushRecord)
    assert loaded == record
    assert isinstance(loaded.groups, tuple)
    assert all(isinstance(group, tuple) for group in loaded.groups or ())
    assert all(isinstance(pair, tuple) for group in loaded.groups or () for pair in group)
    assert hash(loaded) == hash(record)
    assert stored(store, "PushRecord")["groups"][1] == [["experiment_id", "2"], ["shard", "0"]]


def test_none_fields_round_trip_as_none(store: StateStore) -> None:
    store.save(PushRecord(groups=None, selected=None))
    assert store.load(PushRecord) == PushRecord()


def test_a_push_record_saved_with_the_old_registry_flag_still_loads(store: StateStore) -> None:
    """Older states kept `registry_dirty` in the push record; the mirror keeps it now."""
    store.db.conn.execute(
        "INSERT INTO record (name, value) VALUES ('PushRecord', ?)",
        (json.dumps({"gateway_start": "s", "registry_dirty": False, "selected": ["1"]}),),
    )
    assert store.load(PushRecord) == PushRecord(gateway_start="s", selected=("1",))
    assert store.push_marks.registry_dirty() is True  # pushed once more after the upgrade


@pytest.mark.parametrize(
    "record",
    [
        LabelRecord(run_id_length=12),
        RegistryMark(dirty=False),
        CaptureRecord(last_capture_ms=5, deleted_experiments=2, active_experiments=9),
        SweepRecord(
            chunk=3,
            after_start_ms=-1,
            after_run_id="ab\u00e9",
            page_token="tok",
            started_ms=1,
            last_completed_ms=2,
            passes=4,
        ),
    ],
    ids=lambda r: type(r).__name__,
)
def test_every_record_round_trips(store: StateStore, record: object) -> None:
    store.save(record)
    assert store.load(type(record)) == record


def test_saving_again_replaces_the_record_and_records_of_other_kinds_are_separate(
    store: StateStore,
) -> None:
    store.save(LabelRecord(run_id_length=8))
    store.save(SweepRecord(passes=1))
    store.save(LabelRecord(run_id_length=10))
    assert store.load(LabelRecord) == LabelRecord(run_id_length=10)
    assert store.load(SweepRecord) == SweepRecord(passes=1)
    assert store.load(CaptureRecord) == CaptureRecord()
    count = store.db.conn.execute("SELECT count(*) FROM record").fetchone()[0]
    assert count == 2


def test_unknown_stored_fields_are_ignored_and_missing_ones_take_their_defaults(
    store: StateStore,
) -> None:
    store.db.conn.execute(
        "INSERT INTO record (name, value) VALUES ('SweepRecord', ?)",
        (json.dumps({"chunk": 7, "renamed_long_ago": [1, 2], "passes": 3}),),
    )
    assert store.load(SweepRecord) == SweepRecord(chunk=7, passes=3)


def test_a_record_saved_inside_a_rolled_back_transaction_is_not_kept(
    store: StateStore,
) -> None:
    store.save(LabelRecord(run_id_length=4))

    def abandoned_cycle() -> None:
        with store.transaction():
            store.save(LabelRecord(run_id_length=99))
            raise KeyError("abandon the cycle")

    with pytest.raises(KeyError):
        abandoned_cycle()
    assert store.load(LabelRecord) == LabelRecord(run_id_length=4)


def test_records_are_frozen_so_a_misspelt_field_is_an_error(store: StateStore) -> None:
    with pytest.raises(TypeError):
        LabelRecord(run_id_lenght=3)  # type: ignore[call-arg]
    record = store.load(LabelRecord)
    with pytest.raises(dataclasses.FrozenInstanceError):
        record.run_id_length = 5  # type: ignore[misc]


def test_records_survive_reopening_the_store(tmp_path: Path) -> None:
    state = StateStore(tmp_path / "state")
    state.save(CaptureRecord(last_capture_ms=42))
    state.close()
    state = StateStore(tmp_path / "state")
    try:
        assert state.load(CaptureRecord) == CaptureRecord(last_capture_ms=42)
    finally:
        state.close()
