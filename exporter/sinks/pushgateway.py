"""The Pushgateway: PUT one group at a time, delete groups that are gone, list what is there.

Each group is rendered from a fresh `CollectorRegistry` and PUT, so a push replaces exactly
the series the group owns. `prometheus_client` does the HTTP; errors become `PushError`
with one line that names the Pushgateway and what to check.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import requests
from prometheus_client import CollectorRegistry
from prometheus_client.core import Metric
from prometheus_client.exposition import (
    basic_auth_handler,
    default_handler,
    delete_from_gateway,
    push_to_gateway,
)
from prometheus_client.parser import text_string_to_metric_families

from exporter.config import PrometheusSettings
from exporter.errors import reason
from exporter.planners.series import FixedCollector, GroupKey

CHECK = "is it running, and is PROMETHEUS_GATEWAY right?"
# Families that carry user metric values (the rest are the exporter's own, always finite).
USER_VALUE_FAMILIES = ("mlflow_",)


class PushError(Exception):
    """The Pushgateway refused or could not be reached; message safe to show."""


class PushTarget(Protocol):
    """What a cycle needs of a Pushgateway (tests swap in an in-memory one)."""

    def start_time(self) -> str: ...

    def push(self, key: GroupKey, families: Sequence[Metric]) -> PushedGroup: ...

    def delete(self, key: GroupKey) -> None: ...

    def existing_groups(self) -> list[GroupKey]: ...


@dataclass(frozen=True, slots=True)
class PushedGroup:
    series: int
    nonfinite: int


@dataclass
class Pushgateway:
    """Pushes and deletes the groups of one job."""

    settings: PrometheusSettings
    http_get: Callable[..., Any] = requests.get

    def push(self, key: GroupKey, families: Sequence[Metric]) -> PushedGroup:
        """PUT one group (replacing everything it held)."""
        registry = CollectorRegistry(auto_describe=False)
        registry.register(FixedCollector(list(families)))
        self._call(
            push_to_gateway, "push a group to", registry=registry, grouping_key=key.as_dict()
        )
        series = sum(len(f.samples) for f in families)
        nonfinite = sum(
            not math.isfinite(s.value)
            for f in families
            if f.name.startswith(USER_VALUE_FAMILIES)
            for s in f.samples
        )
        return PushedGroup(series, nonfinite)

    def delete(self, key: GroupKey) -> None:
        self._call(delete_from_gateway, "delete a group from", grouping_key=key.as_dict())

    def start_time(self) -> str:
        """When the Pushgateway process started: a change means it may have lost groups."""
        url = f"{self.settings.gateway}/api/v1/status"
        try:
            response = self.http_get(url, timeout=self.settings.timeout_seconds, auth=self._auth())
            response.raise_for_status()
            return str(response.json()["data"]["start_time"])
        # A body that is not JSON raises requests' JSONDecodeError, a RequestException
        # too: it is an answer of the wrong shape, not an unreachable gateway.
        except (ValueError, KeyError, TypeError):
            raise PushError(
                f"Pushgateway at {self.settings.gateway} answered {url} without a start time: "
                "is PROMETHEUS_GATEWAY a Pushgateway (not Prometheus or a proxy)?"
            ) from None
        except requests.RequestException as exc:
            raise PushError(
                f"Pushgateway at {self.settings.gateway} cannot be reached ({reason(exc)}): {CHECK}"
            ) from None

    def existing_groups(self) -> list[GroupKey]:
        """Grouping keys (without job) of this job's groups currently on the Pushgateway.

        Read from the `push_time_seconds` lines of its text exposition, streamed line by
        line: the JSON API returns every series of every group at once, which for a large
        Pushgateway costs more memory than the whole exporter.
        """
        s = self.settings
        groups: list[GroupKey] = []
        try:
            response = self.http_get(
                f"{s.gateway}/metrics", timeout=s.timeout_seconds, auth=self._auth(), stream=True
            )
            response.raise_for_status()
            for line in response.iter_lines(decode_unicode=True):
                if line and line.startswith("push_time_seconds{"):
                    labels = _group_labels(line)
                    if labels.pop("job", None) == s.job_name:
                        groups.append(GroupKey.of(labels))
        except (requests.RequestException, ValueError) as exc:
            raise PushError(
                f"Pushgateway at {s.gateway} did not list its groups ({reason(exc)}): {CHECK}"
            ) from None
        return groups

    def _auth(self) -> tuple[str, str] | None:
        s = self.settings
        if s.username is None or s.password is None:
            return None
        return (s.username.get_secret_value(), s.password.get_secret_value())

    def _handler(self) -> Callable[..., Callable[[], None]]:
        auth = self._auth()
        if auth is None:
            return default_handler
        user, password = auth

        def handler(
            url: str, method: str, timeout: float | None, headers: Any, data: bytes
        ) -> Callable[[], None]:
            return basic_auth_handler(url, method, timeout, headers, data, user, password)

        return handler

    def _call(self, fn: Callable[..., None], what: str, **kwargs: Any) -> None:
        s = self.settings
        try:
            fn(
                s.gateway,
                job=s.job_name,
                timeout=s.timeout_seconds,
                handler=self._handler(),
                **kwargs,
            )
        except OSError as exc:  # urllib's URLError and HTTPError are OSErrors
            raise PushError(
                f"Pushgateway at {s.gateway}: could not {what} it ({reason(exc)}): {CHECK}"
            ) from None


def _group_labels(line: str) -> dict[str, str]:
    """Grouping labels of one `push_time_seconds{...} value` exposition line."""
    family = next(iter(text_string_to_metric_families(line + "\n")))
    labels = dict(family.samples[0].labels)
    if labels.get("instance") == "":  # added by the Pushgateway, not part of our keys
        del labels["instance"]
    return labels
