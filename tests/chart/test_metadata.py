"""The chart's metadata and its copies of the stack's rules and dashboards."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from exporter import __version__
from scripts import sync_chart
from tests.support.chart import CHART


def test_the_chart_is_helm_v2_and_runs_the_projects_version() -> None:
    meta = yaml.safe_load((CHART / "Chart.yaml").read_text())
    assert meta["apiVersion"] == "v2"
    assert meta["appVersion"] == __version__, "set Chart.yaml appVersion to exporter.__version__"


def test_the_charts_rules_and_dashboards_are_the_stacks() -> None:
    assert sync_chart.drift() == [], "run: python scripts/sync_chart.py"


def test_drift_is_reported_for_a_changed_missing_or_extra_copy(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    source, copy = tmp_path / "rules", tmp_path / "chart" / "rules"
    source.mkdir()
    (source / "a.yml").write_text("groups: []\n")
    (source / "b.yml").write_text("groups: []\n")
    monkeypatch.setattr(sync_chart, "REPO", tmp_path)
    monkeypatch.setattr(sync_chart, "CHART", tmp_path / "chart")
    monkeypatch.setattr(sync_chart, "SOURCES", {(source, "*.yml"): copy})

    assert sync_chart.main([]) == 0
    assert sync_chart.drift() == []
    (copy / "a.yml").write_text("groups: [changed]\n")
    (copy / "b.yml").unlink()
    (copy / "c.yml").write_text("groups: []\n")
    assert sync_chart.drift() == [
        "chart/rules/a.yml: differs from its original",
        "chart/rules/b.yml: missing",
        "chart/rules/c.yml: no such file in the stack (remove it)",
    ]
    assert sync_chart.main(["--check"]) == 1
    assert sync_chart.main([]) == 0
    assert sync_chart.main(["--check"]) == 0
