"""Unit tests for exporter.durations: one parser for settings' lengths of time and rules'."""

from __future__ import annotations

import pytest

from exporter.durations import prometheus_duration, prometheus_seconds, seconds


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("0", 0.0),
        ("90s", 90),
        ("15m", 900),
        ("1h30m", 5400),
        ("2w1d", 1_296_000),
        ("1y", 31_536_000),
        ("250ms", 0.25),
    ],
)
def test_prometheus_durations_are_read_as_prometheus_reads_them(text: str, expected: float) -> None:
    assert prometheus_seconds(text) == expected
    assert prometheus_duration(f" {text} ") == text


@pytest.mark.parametrize("text", ["", "1.5h", "30m1h", "3600", "1 h", "5x"])
def test_what_prometheus_refuses_is_refused_with_the_form_it_wants(text: str) -> None:
    with pytest.raises(ValueError, match="not a Prometheus duration"):
        prometheus_seconds(text)
    if text != "3600":
        with pytest.raises(ValueError, match="Prometheus duration"):
            prometheus_duration(text)


def test_a_number_is_not_a_prometheus_duration_string() -> None:
    with pytest.raises(ValueError, match="must be a Prometheus duration string"):
        prometheus_duration(30)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (3600, 3600),
        (1.5, 1.5),
        ("3600", 3600),
        ("90s", 90),
        ("1.5h", 5400),
        (" 60d ", 5_184_000),
        ("1h30m", 5400),
        ("0", 0),
    ],
)
def test_a_settings_length_of_time_takes_numbers_one_unit_or_a_prometheus_duration(
    value: object, expected: float
) -> None:
    assert seconds(value) == expected


@pytest.mark.parametrize("text", ["", "soon", "1.5h30m", "-5s", "10 minutes"])
def test_a_settings_length_of_time_refuses_anything_else_naming_the_forms(text: str) -> None:
    with pytest.raises(ValueError, match=r"not a duration like 3600, 90s, 15m, 1h30m"):
        seconds(text)
