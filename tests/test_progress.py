"""Unit tests for exporter.progress: the capture's progress view, its estimate and its log."""

from __future__ import annotations

import structlog.testing

from exporter.progress import CaptureProgress, ProgressView
from tests.fakes import FakeClock


def test_a_view_gives_the_rate_and_the_time_left_at_that_rate() -> None:
    view = ProgressView(
        runs_total=1000, runs_done=250, points_done=5000, points_estimated=20_000,
        elapsed_seconds=50.0,
    )  # fmt: skip
    assert view.runs_per_second == 5.0
    assert view.eta_seconds == 150.0
    shown = view.as_dict()
    assert (shown["runs_done"], shown["runs_total"], shown["points_per_second"]) == (250, 1000, 100)
    assert ProgressView(10, 0, 0, 0, 3.0).eta_seconds is None  # no rate yet
    assert ProgressView(10, 10, 0, 0, 0.0, finished=True).eta_seconds == 0.0


def test_progress_extrapolates_points_and_logs_about_every_ten_seconds() -> None:
    clock = FakeClock(100.0)
    seen: list[ProgressView] = []
    progress = CaptureProgress(clock, seen.append)
    with structlog.testing.capture_logs() as logs:
        progress.begin(runs_total=400)
        progress.planned(runs=100, points=5000)  # the first block: 50 points a run
        for _ in range(4):
            clock.advance(4.0)
            progress.advance(runs=25, points=1250)
        progress.end()

    last = seen[-1]
    assert (last.runs_done, last.points_done, last.points_estimated) == (100, 5000, 20_000)
    assert not last.finished
    assert last.eta_seconds == 48.0  # 300 runs left at 6.25 runs/s
    lines = [e for e in logs if e["event"] == "capture.progress"]
    assert [e["runs_done"] for e in lines] == [75, 100]  # at 12 s, and the end (16 s)
    assert lines[0]["runs_total"] == 400


def test_an_empty_capture_is_finished_at_once_and_logs_nothing() -> None:
    seen: list[ProgressView] = []
    progress = CaptureProgress(FakeClock(), seen.append)
    with structlog.testing.capture_logs() as logs:
        progress.begin(0)
        progress.end()
    assert seen[-1].finished
    assert progress.view == seen[-1]
    assert logs == []


def test_a_capture_ended_short_of_its_total_is_continued_by_the_next_one() -> None:
    clock = FakeClock(100.0)
    seen: list[ProgressView] = []
    progress = CaptureProgress(clock, seen.append)
    progress.begin(1000)
    clock.advance(10.0)
    progress.advance(runs=400, points=4000)
    progress.end()  # held back: 600 runs still due
    clock.advance(10.0)  # the queues drain
    progress.begin(600)
    clock.advance(10.0)
    progress.advance(runs=200, points=2000)

    view = seen[-1]
    assert (view.runs_done, view.runs_total, view.points_done) == (600, 1000, 6000)
    assert view.elapsed_seconds == 30.0  # one rate over the whole export
    progress.advance(runs=400, points=4000)
    progress.end()
    assert seen[-1].finished
    progress.begin(5)  # the next cycle's capture starts afresh
    assert (seen[-1].runs_done, seen[-1].runs_total) == (0, 5)
