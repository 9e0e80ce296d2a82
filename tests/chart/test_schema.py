"""values.schema.json, through Helm's own validation: wrong types, unknown keys, shards < 1
and secret values are refused before anything renders, naming the key."""

from __future__ import annotations

import json
from typing import Any

import helm_python
import pytest

from exporter.config import ENV_KEYS, SECRET_ENV, Settings
from tests.chart.values import ALL_ON
from tests.support.chart import CHART, render


@pytest.mark.parametrize(
    ("values", "named"),
    [
        ({"shards": 0}, "/shards"),
        ({"shards": -1}, "/shards"),
        ({"shards": "3"}, "/shards"),
        ({"shards": 1.5}, "/shards"),
        ({"replicas": 3}, "'replicas' not allowed"),
        ({"serviceMonitor": {"enabled": "yes"}}, "/serviceMonitor/enabled"),
        ({"serviceMonitor": {"interval": "soon"}}, "/serviceMonitor/interval"),
        ({"persistence": {"enabled": True, "size": "lots"}}, "/persistence/size"),
        ({"persistence": {"sise": "2Gi"}}, "'sise' not allowed"),
        ({"service": {"port": 70000}}, "/service/port"),
        ({"config": {"mlfow": {}}}, "'mlfow' not allowed"),
        ({"secrets": {"pramathusApiKey": {"name": "x", "key": ""}}}, "/secrets/pramathusApiKey"),
        ({"web": {"tls": "true"}}, "/web/tls"),
    ],
)
def test_bad_values_are_refused_naming_the_key(values: dict[str, Any], named: str) -> None:
    with pytest.raises(helm_python.HelmValuesError) as info:
        render(values)
    assert named in str(info.value)


@pytest.mark.parametrize(
    ("section", "key"),
    [
        ("mlflow", "password"),
        ("mlflow", "token"),
        ("prometheus", "password"),
        ("pramathus", "api_key"),
        ("remote_write", "password"),
        ("remote_write", "bearer_token"),
    ],
)
def test_a_secret_value_in_values_is_refused(section: str, key: str) -> None:
    with pytest.raises(helm_python.HelmValuesError) as info:
        render({"config": {section: {key: "s3cret-value"}}})
    assert f"/config/{section}/{key}" in str(info.value)
    assert "s3cret-value" not in str(info.value)


@pytest.mark.parametrize("key", ["shard_index", "shard_count", "state_dir"])
def test_what_the_chart_sets_per_pod_cannot_be_set_in_config(key: str) -> None:
    with pytest.raises(helm_python.HelmValuesError) as info:
        render({"config": {"export": {key: 1}}})
    assert f"/config/export/{key}" in str(info.value)


def test_the_defaults_and_every_optional_part_pass_the_schema() -> None:
    assert render({})
    assert render(ALL_ON)


def test_config_takes_every_section_of_the_exporters_config_but_server() -> None:
    """A section added to exporter/config.py must be added to the chart's schema too; the
    chart sets `server` itself (listen address, web config file)."""
    schema = json.loads((CHART / "values.schema.json").read_text())
    sections = set(schema["properties"]["config"]["properties"])
    assert sections == set(Settings.model_fields) - {"server"}


@pytest.mark.parametrize("variable", SECRET_ENV)
def test_every_secret_the_exporter_reads_from_a_file_is_refused_as_a_value(
    variable: str,
) -> None:
    # (tests/chart/test_render.py checks that each has a Secret reference feeding its _FILE.)
    section, key = ENV_KEYS[variable].split(".")
    with pytest.raises(helm_python.HelmValuesError):
        render({"config": {section: {key: "s3cret-value"}}})
