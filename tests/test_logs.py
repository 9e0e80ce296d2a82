"""Unit tests for exporter.logs: the secret scrubber and the structlog set-up."""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator
from typing import Any

import pytest
import structlog

from exporter.logs import MASK, SecretScrubber, configure, redact, secret_forms

SECRET = "pk_live_9Zq-TOPSECRET"


@pytest.fixture(autouse=True)
def _reset_structlog() -> Iterator[None]:
    yield
    structlog.reset_defaults()


def scrub(event: dict[str, Any], secrets: tuple[str, ...] = (SECRET,)) -> Any:
    return SecretScrubber(secrets)(None, "info", event)


def test_a_secret_is_masked_wherever_it_appears_in_a_string() -> None:
    out = scrub({"event": f"auth {SECRET} failed", "url": f"https://x/?key={SECRET}&k={SECRET}"})
    assert out == {"event": f"auth {MASK} failed", "url": f"https://x/?key={MASK}&k={MASK}"}


def test_secrets_are_masked_in_nested_dicts_lists_and_tuples_keeping_their_types() -> None:
    event: dict[str, Any] = {
        "detail": {"errors": [f"bad {SECRET}", ("x", SECRET)], "n": 3, "none": None}
    }

    out = scrub(event)

    assert out == {"detail": {"errors": [f"bad {MASK}", ("x", MASK)], "n": 3, "none": None}}
    assert isinstance(out["detail"]["errors"][1], tuple)
    assert event["detail"]["errors"][0] == f"bad {SECRET}"  # the caller's event is not changed


def test_a_longer_secret_containing_a_shorter_one_is_masked_whole() -> None:
    out = scrub({"e": "token abcd-efgh-ijkl"}, ("abcd", "abcd-efgh-ijkl"))
    assert out == {"e": f"token {MASK}"}


def test_secrets_shorter_than_four_characters_are_not_scrubbed() -> None:
    assert scrub({"e": "a b abc"}, ("abc", "", "b")) == {"e": "a b abc"}


def test_without_secrets_the_event_passes_through_untouched() -> None:
    event = {"event": "x", "n": 1}
    assert SecretScrubber()(None, "info", event) == {"event": "x", "n": 1}


def test_json_format_writes_one_json_line_per_event_with_secrets_masked(
    capsys: pytest.CaptureFixture[str],
) -> None:
    configure("INFO", "json", [SECRET])

    structlog.get_logger("t").warning("push.failed", reason=f"401 {SECRET}", groups=[SECRET])

    captured = capsys.readouterr()
    assert captured.out == ""  # stdout is for command output
    [line] = captured.err.splitlines()
    record = json.loads(line)
    assert record["event"] == "push.failed"
    assert record["level"] == "warning"
    assert record["reason"] == f"401 {MASK}"
    assert record["groups"] == [MASK]
    assert record["timestamp"].endswith("Z")
    assert SECRET not in captured.err


def test_console_format_is_not_json_and_still_masked(capsys: pytest.CaptureFixture[str]) -> None:
    configure("INFO", "console", [SECRET])

    structlog.get_logger("t").info("cycle.done", detail=SECRET)

    err = capsys.readouterr().err
    assert "cycle.done" in err
    assert MASK in err
    assert SECRET not in err
    with pytest.raises(json.JSONDecodeError):
        json.loads(err.splitlines()[0])


def test_auto_format_is_json_off_a_terminal(capsys: pytest.CaptureFixture[str]) -> None:
    configure("INFO", "auto", [])
    structlog.get_logger("t").info("x.y")
    assert json.loads(capsys.readouterr().err)["event"] == "x.y"


def test_the_level_filters_lower_events(capsys: pytest.CaptureFixture[str]) -> None:
    configure("WARNING", "json", [])
    log = structlog.get_logger("t")
    log.info("quiet")
    log.error("loud")
    lines = capsys.readouterr().err.splitlines()
    assert [json.loads(line)["event"] for line in lines] == ["loud"]


def test_exceptions_are_rendered_into_the_event(capsys: pytest.CaptureFixture[str]) -> None:
    configure("INFO", "json", [SECRET])
    try:
        raise ValueError(f"bad {SECRET}")
    except ValueError:
        structlog.get_logger("t").error("boom", exc_info=True)
    record = json.loads(capsys.readouterr().err)
    assert "ValueError" in record["exception"]
    assert SECRET not in record["exception"]


def test_longer_secrets_are_masked_first_whatever_their_alphabetical_order() -> None:
    # Reverse alphabetical order would try "zz99" first and leave "ab" of "abzz99" showing.
    assert scrub({"e": "key abzz99"}, ("zz99", "abzz99")) == {"e": f"key {MASK}"}


def test_a_secret_of_exactly_four_characters_is_masked() -> None:
    assert scrub({"e": "pin 1234"}, ("1234",)) == {"e": f"pin {MASK}"}


def test_timestamps_are_iso_8601_in_utc(capsys: pytest.CaptureFixture[str]) -> None:
    configure("INFO", "json", [])
    structlog.get_logger("t").info("x")
    stamp = json.loads(capsys.readouterr().err)["timestamp"]
    assert stamp.endswith("Z")
    assert stamp[10] == "T"


def test_a_logger_made_before_a_reconfiguration_follows_the_new_configuration(
    capsys: pytest.CaptureFixture[str],
) -> None:
    configure("ERROR", "json", [])
    log = structlog.get_logger("t")
    log.info("dropped")
    configure("INFO", "json", [])  # e.g. the CLI configures logging once settings are read
    log.info("kept")
    assert [json.loads(line)["event"] for line in capsys.readouterr().err.splitlines()] == ["kept"]


# ---------------------------------------------------------------- the one redaction


def test_every_form_of_a_secret_is_known_longest_first() -> None:
    forms = secret_forms(["a/b+c d"], [("user", "pass-word")])

    assert forms == sorted(forms, key=len, reverse=True)
    assert set(forms) == {
        "a/b+c d",
        "a%2Fb%2Bc%20d",
        "a%2Fb%2Bc+d",
        base64.b64encode(b"a/b+c d").decode(),
        base64.b64encode(b"user:pass-word").decode(),
    }


def test_short_secrets_and_short_passwords_have_no_forms() -> None:
    assert secret_forms(["abc"], [("user", "abc")]) == []
    assert secret_forms(["abcd"], [("u", "abcd")])[-1] == "abcd"
    assert base64.b64encode(b"u:abcd").decode() in secret_forms([], [("u", "abcd")])


def test_an_echoed_basic_authorization_header_is_masked_without_knowing_it() -> None:
    echoed = "401: got Authorization: Basic dXNlcjpodW50ZXIy from 10.0.0.1"

    assert redact(echoed) == f"401: got Authorization: Basic {MASK} from 10.0.0.1"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("bearer abc.def-ghi", f"bearer {MASK}"),
        ("Basic auth and bearer tokens", "Basic auth and bearer tokens"),
        ('{"authorization": "Bearer xyz12345"}', f'{{"authorization": "Bearer {MASK}"}}'),
        ('{"Authorization":"tok123"}', f'{{"Authorization":"{MASK}"}}'),
        ("x-api-key=abc123&x=1", f"x-api-key={MASK}&x=1"),
        ("api_key: hunter22", f"api_key: {MASK}"),
        ("password='s3cr3t', user=bob", f"password='{MASK}', user=bob"),
        ("Proxy-Authorization: Basic Zm9vOmJhcg==", f"Proxy-Authorization: Basic {MASK}"),
        ("no credential here: status 401", "no credential here: status 401"),
    ],
)
def test_credential_values_echoed_in_bodies_are_masked(text: str, expected: str) -> None:
    assert redact(text) == expected


def test_the_scrubber_masks_base64_forms_and_echoed_credentials_in_events() -> None:
    basic = base64.b64encode(b"alice:pass-word").decode()
    forms = secret_forms([], [("alice", "pass-word")])

    out = SecretScrubber(forms)(None, "info", {"event": f"seen {basic} in a log", "n": 1})

    assert out == {"event": f"seen {MASK} in a log", "n": 1}
    assert SecretScrubber()(None, "info", {"e": "Bearer abcdefgh"}) == {"e": f"Bearer {MASK}"}


def test_every_secret_keeps_its_forms_when_several_are_configured() -> None:
    forms = secret_forms(["first-secret", "second/secret"])

    assert {"first-secret", "second/secret", "second%2Fsecret"} <= set(forms)
    assert base64.b64encode(b"first-secret").decode() in forms
