"""Unit tests for exporter.health: the last cycle's outcome as the probes see it."""

from __future__ import annotations

import threading

from exporter.health import Health, HealthView
from exporter.logs import MASK


def test_a_new_health_is_starting_healthy_and_not_ready() -> None:
    view = Health().view()
    assert view == HealthView("starting", "starting", ready=False)
    assert view.healthy


def test_ok_is_healthy_and_ready() -> None:
    health = Health()
    health.set("ok", "")
    assert health.view() == HealthView("ok", "", ready=True)
    assert health.view().healthy


def test_failing_and_crashed_are_unhealthy() -> None:
    health = Health()
    health.set("failing", "cannot reach MLflow")
    assert not health.view().healthy
    health.set("crashed", "KeyError")
    assert not health.view().healthy


def test_ready_stays_true_after_later_failures() -> None:
    health = Health()
    health.set("failing", "first cycle failed")
    assert health.view().ready is False
    health.set("ok", "")
    health.set("failing", "later")
    health.set("crashed", "later still")
    assert health.view() == HealthView("crashed", "later still", ready=True)


def test_secrets_are_masked_in_reasons_wherever_they_appear() -> None:
    health = Health(secrets=["hunter2-password", "tok-ABC123"])

    health.set(
        "failing", "401 for user:hunter2-password at https://x?token=tok-ABC123 (tok-ABC123)"
    )

    reason = health.view().reason
    assert reason == f"401 for user:{MASK} at https://x?token={MASK} ({MASK})"


def test_secrets_registered_later_are_masked_too() -> None:
    secrets: list[str] = []
    health = Health(secrets=secrets)
    secrets.append("late-secret-1")  # the CLI fills the list once settings are loaded
    health.set("failing", "echo late-secret-1")
    assert health.view().reason == f"echo {MASK}"


def test_views_are_consistent_under_concurrent_updates() -> None:
    health = Health()

    def flip() -> None:
        for _ in range(500):
            health.set("ok", "")
            health.set("failing", "x")

    threads = [threading.Thread(target=flip) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    view = health.view()
    assert view.status == "failing"
    assert view.reason == "x"
    assert view.ready
