"""The container health check (`python -m exporter.healthcheck`), with a fake opener.

`FakeProbeOpen` imitates `urllib.request.urlopen` for the two URLs the check tries: each scheme
answers a status or raises what urllib raises (an OSError for a refused connection or a
TLS/plain-text mismatch, an HTTPError for a non-2xx answer).
"""

from __future__ import annotations

import io
import ssl
import urllib.error
from dataclasses import dataclass, field

import pytest

from exporter import healthcheck


@dataclass
class FakeProbeOpen:
    """Imitates healthcheck's one HTTP probe (URL, TLS context, timeout -> status): answers
    by scheme from `answers` (a status, or an exception to raise) and records each call."""

    answers: dict[str, int | Exception]
    calls: list[tuple[str, bool]] = field(default_factory=list)

    def __call__(self, url: str, context: ssl.SSLContext | None, timeout: float) -> int:
        self.calls.append((url, context is not None))
        answer = self.answers[url.split(":", 1)[0]]
        if isinstance(answer, Exception):
            raise answer
        return answer


def http_error(url: str, code: int) -> urllib.error.HTTPError:
    return urllib.error.HTTPError(url, code, "error", {}, io.BytesIO())  # type: ignore[arg-type]


def test_a_plain_http_exporter_is_healthy_without_trying_tls() -> None:
    opener = FakeProbeOpen({"http": 200, "https": OSError("unused")})
    assert healthcheck.check({"EXPORTER_PORT": "9999"}, opener) is None
    assert opener.calls == [("http://127.0.0.1:9999/healthz", False)]


def test_a_tls_exporter_is_reached_over_https_without_verifying_its_certificate() -> None:
    opener = FakeProbeOpen({"http": ConnectionResetError("reset"), "https": 200})
    assert healthcheck.check({}, opener) is None
    assert opener.calls == [
        ("http://127.0.0.1:9877/healthz", False),
        ("https://127.0.0.1:9877/healthz", True),
    ]


def test_the_tls_context_checks_neither_the_name_nor_the_chain() -> None:
    context = healthcheck._unverified()
    assert context.check_hostname is False
    assert context.verify_mode == ssl.CERT_NONE


def test_an_exporter_that_answers_an_error_or_nothing_is_unhealthy_with_both_reasons() -> None:
    opener = FakeProbeOpen(
        {"http": http_error("http://x", 503), "https": ssl.SSLError("wrong version number")}
    )
    problem = healthcheck.check({"EXPORTER_PORT": "1"}, opener)
    assert problem is not None
    assert "http://127.0.0.1:1/healthz answered 503" in problem
    assert "https://127.0.0.1:1/healthz: " in problem


def test_a_status_other_than_200_is_not_healthy() -> None:
    opener = FakeProbeOpen({"http": 204, "https": 204})
    assert healthcheck.check({}, opener) == (
        "http://127.0.0.1:9877/healthz answered 204; https://127.0.0.1:9877/healthz answered 204"
    )


def test_main_exits_1_with_one_line_when_nothing_listens(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(healthcheck, "check", lambda env: "nothing answered")
    assert healthcheck.main() == 1
    assert capsys.readouterr().err == "unhealthy: nothing answered\n"
    monkeypatch.setattr(healthcheck, "check", lambda env: None)
    assert healthcheck.main() == 0
