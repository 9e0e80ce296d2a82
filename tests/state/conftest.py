"""Fixtures shared by the state tests."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from exporter.state import StateStore


@pytest.fixture
def store(tmp_path: Path) -> Iterator[StateStore]:
    """A fresh state directory, closed after the test."""
    state = StateStore(tmp_path / "state")
    yield state
    state.close()
