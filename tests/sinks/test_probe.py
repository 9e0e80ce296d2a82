"""Unit tests for exporter.sinks.probe: `check-config`'s one-line answer about a backend.

`FakeRequest` stands in for `requests.request`: it records the call and answers with a
scripted status or raises a scripted `requests` error.
"""

from __future__ import annotations

from typing import Any

import pytest
import requests

from exporter.sinks.probe import http_answers
from tests.fakes.http import http_response

URL = "https://receiver.example/v1/metrics"


class FakeRequest:
    """Stands in for `requests.request`: one answer (a status or an exception) for every call."""

    def __init__(self, answer: int | Exception) -> None:
        self.answer = answer
        self.calls: list[tuple[str, str, dict[str, Any]]] = []

    def __call__(self, method: str, url: str, **kwargs: Any) -> requests.Response:
        self.calls.append((method, url, kwargs))
        if isinstance(self.answer, Exception):
            raise self.answer
        return http_response(self.answer, "", {}, url)


def probe(monkeypatch: pytest.MonkeyPatch, answer: int | Exception) -> tuple[bool, str]:
    monkeypatch.setattr(requests, "request", FakeRequest(answer))
    return http_answers("the receiver", "RECEIVER_URL", URL, "HEAD")


@pytest.mark.parametrize("status", [200, 204, 400, 404, 405])
def test_any_answer_but_a_refused_key_or_a_server_error_means_it_answers(
    monkeypatch: pytest.MonkeyPatch, status: int
) -> None:
    assert probe(monkeypatch, status) == (True, f"the receiver answers (HTTP {status})")


@pytest.mark.parametrize("status", [401, 403])
def test_a_refused_key_says_to_check_the_key(monkeypatch: pytest.MonkeyPatch, status: int) -> None:
    assert probe(monkeypatch, status) == (
        False,
        f"the receiver at {URL} answered HTTP {status}: check its key",
    )


def test_a_server_error_names_the_address_and_the_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    assert probe(monkeypatch, 503) == (
        False,
        f"the receiver at {URL} answered HTTP 503: is it running, and is RECEIVER_URL right?",
    )


def test_an_unreachable_backend_names_the_address_the_cause_and_the_setting(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    ok, line = probe(monkeypatch, requests.ConnectionError("Connection refused"))

    assert not ok
    assert line.startswith(f"cannot reach the receiver at {URL} (")
    assert line.endswith("): is it running, and is RECEIVER_URL right?")


def test_the_probe_is_one_short_request_with_what_it_is_given(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    fake = FakeRequest(200)
    monkeypatch.setattr(requests, "request", fake)

    http_answers("the receiver", "RECEIVER_URL", URL, "HEAD", headers={"api-key": "k"})

    assert fake.calls == [("HEAD", URL, {"timeout": 5, "headers": {"api-key": "k"}})]
