"""What each rendered pod would run, as the exporter itself reads it: the ConfigMap as
config file, the downward-API fields resolved, Secret references as files. No servers."""

from __future__ import annotations

from pathlib import Path

import pytest

from exporter.config import load_settings
from tests.chart.values import ALL_ON, SECRET_DATA
from tests.support.chart import objects, pod_plays


@pytest.mark.parametrize("pod_index_label", [True, False], ids=["pod-index", "pod-name"])
def test_each_pod_runs_the_shard_of_its_ordinal(tmp_path: Path, pod_index_label: bool) -> None:
    pods = pod_plays(objects({"shards": 3}), tmp_path, pod_index_label=pod_index_label)
    shards = []
    for pod in pods:
        env = pod.env()
        assert (env["EXPORTER_SHARD_INDEX"] == "") is not pod_index_label
        settings = load_settings(env=env)
        shards.append((settings.export.shard_index, settings.export.shard_count))
        assert settings.export.state_dir == str(tmp_path / "volumes" / f"state-{pod.pod_name}")
        assert (settings.server.host, settings.server.port) == ("0.0.0.0", 9877)
    assert shards == [(0, 3), (1, 3), (2, 3)]


def test_the_rendered_config_and_secret_files_are_what_the_exporter_reads(
    tmp_path: Path,
) -> None:
    [pod, *_] = pod_plays(objects(ALL_ON), tmp_path, secrets=SECRET_DATA)
    settings = load_settings(env=pod.env())

    assert settings.mlflow.tracking_uri == "https://mlflow.example.com"
    assert settings.prometheus.mode == "both"
    assert settings.export.include_experiments == ["prod-.*"]
    assert settings.pramathus.enabled
    assert settings.pramathus.api_key is not None
    assert settings.pramathus.api_key.get_secret_value() == "pk-Zq9-never-rendered"
    assert settings.mlflow.token is not None
    assert settings.mlflow.token.get_secret_value() == "mlflow-tok-never-rendered"
    assert settings.remote_write.password is not None
    assert settings.remote_write.password.get_secret_value() == "rw-pw-never-rendered"


def test_a_pod_without_persistence_keeps_state_in_its_own_directory(tmp_path: Path) -> None:
    [pod] = pod_plays(objects({"persistence": {"enabled": False}}), tmp_path)
    state = load_settings(env=pod.env()).export.state_dir
    assert state == str(tmp_path / "pods" / pod.pod_name / "state")
