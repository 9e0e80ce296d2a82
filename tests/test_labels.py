"""Unit tests for exporter.labels: the run_id label length, and what a longer one marks."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from exporter.labels import decide_run_id_length
from exporter.model import Experiment, LabelRecord, Run
from exporter.state import StateStore
from exporter.state.schedule import PENDING_NONE


@pytest.fixture
def state(tmp_path: Path) -> Iterator[StateStore]:
    """A state whose mirror holds one experiment, pushed: nothing marked to push again."""
    store = StateStore(tmp_path / "state")
    with store.transaction():
        store.mirror.set_experiments([Experiment("1", "one")], now_ms=1)
        store.push_marks.mark_clean(["1"])
        store.push_marks.mark_registry_clean()
    yield store
    store.close()


def add_run(state: StateStore, run_id: str) -> None:
    with state.transaction():
        state.mirror.write_run(Run(run_id, "1", "r", "FINISHED", "u", 1, 2), 0, PENDING_NONE)
        state.push_marks.mark_clean(["1"])


def test_a_length_that_holds_marks_nothing(state: StateStore) -> None:
    add_run(state, "a" * 8 + "1")
    assert decide_run_id_length(state, 8, ["a" * 8 + "1"]) == 8
    assert state.load(LabelRecord).run_id_length == 8
    with state.transaction():
        state.push_marks.mark_clean(["1"])
        state.push_marks.mark_registry_clean()
    add_run(state, "b" * 9)
    assert decide_run_id_length(state, 8, ["b" * 9]) == 8
    marks = state.push_marks
    assert (marks.dirty_experiments(), marks.registry_dirty()) == (set(), False)


def test_a_clash_grows_the_length_and_marks_every_group_and_the_registry(
    state: StateStore,
) -> None:
    add_run(state, "a" * 8 + "1")
    decide_run_id_length(state, 8, ["a" * 8 + "1"])
    with state.transaction():
        state.push_marks.mark_clean(["1"])
        state.push_marks.mark_registry_clean()
    add_run(state, "a" * 8 + "2")

    assert decide_run_id_length(state, 8, ["a" * 8 + "2"]) == 9
    assert state.load(LabelRecord).run_id_length == 9
    assert state.push_marks.dirty_experiments() == {"1"}
    assert state.push_marks.registry_dirty() is True
