"""A capture step's world for unit tests: an in-memory MLflow (`FakeMlflow`), a fake clock
and the real SQLite state in a temporary directory, with the settings a step reads."""

from __future__ import annotations

from pathlib import Path

from exporter.config import Settings
from exporter.state import StateStore
from tests.fakes import FakeClock
from tests.fakes.mlflow_server import FakeMlflow


class MlflowWorld:
    """MLflow, the state and the settings (a 60 s settle window); `close()` the state."""

    def __init__(self, tmp: Path) -> None:
        self.clock = FakeClock(1_700_000_000.0)
        self.mlflow = FakeMlflow(self.clock)
        self.state = StateStore(tmp / "state", clock=self.clock)
        self.settings = Settings.model_validate(
            {"export": {"settle_seconds": 60, "state_dir": str(tmp / "state")}}
        )

    def now_ms(self) -> int:
        return int(self.clock() * 1000)

    def close(self) -> None:
        self.state.close()
