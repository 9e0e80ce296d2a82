"""Fixtures shared by the state tests: a fresh state and its parts."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from exporter.state import CaptureSchedule, Mirror, PushMarks, StateStore


@pytest.fixture
def store(tmp_path: Path) -> Iterator[StateStore]:
    """A fresh state directory, closed after the test."""
    state = StateStore(tmp_path / "state")
    yield state
    state.close()


@pytest.fixture
def mirror(store: StateStore) -> Mirror:
    return store.mirror


@pytest.fixture
def schedule(store: StateStore) -> CaptureSchedule:
    return store.schedule


@pytest.fixture
def marks(store: StateStore) -> PushMarks:
    return store.push_marks
