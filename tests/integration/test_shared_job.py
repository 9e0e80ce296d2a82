"""Two exporters of different scopes (`include_experiments`) on one Pushgateway job.

Against a real MLflow and a real Pushgateway of the test's own (restarted to make each
exporter push everything and sweep against the Pushgateway's own list of groups): each
sweep deletes only groups that exporter pushed, the registry group included, and the
registry group has one owner (`export.registry_group` false on the other exporter), so
its series are not overwritten by the other scope's counts at every cycle.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from tests.integration.conftest import ExporterEnv
from tests.support import servers
from tests.support.seed import make_run

pytestmark = pytest.mark.integration


@pytest.fixture
def gateway(tmp_path: Path) -> Iterator[servers.Server]:
    (tmp_path / "pushgateway").mkdir()
    server = servers.start_pushgateway(tmp_path / "pushgateway")
    yield server
    server.stop()


def _groups(gateway: servers.Server, job: str) -> set[str]:
    data = requests.get(f"{gateway.url}/api/v1/metrics", timeout=10).json()["data"]
    return {
        g["labels"].get("experiment_id") or g["labels"].get("group", "?")
        for g in data
        if g["labels"]["job"] == job
    }


def _active_experiments(gateway: servers.Server, job: str) -> float | None:
    """`mlflow_experiments{lifecycle_stage="active"}` of the job's registry group."""
    text = requests.get(f"{gateway.url}/metrics", timeout=10).text
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = sample.labels
            if (
                sample.name == "mlflow_experiments"
                and labels.get("job") == job
                and labels.get("group") == "registry"
                and labels.get("lifecycle_stage") == "active"
            ):
                return float(sample.value)
    return None


def _exporter(env: ExporterEnv, tmp_path: Path, name: str, include: list[str]) -> dict[str, str]:
    config = tmp_path / f"{name}.yaml"
    patterns = ", ".join(f"'^{p}$'" for p in include)
    config.write_text(f"export:\n  include_experiments: [{patterns}]\n  max_experiments: 0\n")
    return {
        "EXPORTER_CONFIG": str(config),
        "EXPORTER_STATE_DIR": str(tmp_path / f"state-{name}"),
        "PRAMATHUS_ENABLED": "false",
    }


def test_two_scopes_on_one_job_keep_each_others_groups_and_one_owns_the_registry(
    exporter_env: ExporterEnv, gateway: servers.Server, tmp_path: Path
) -> None:
    env, job = exporter_env, exporter_env.job
    env.env["PROMETHEUS_GATEWAY"] = gateway.url
    alpha = [env.experiment("alpha1"), env.experiment("alpha2")]
    beta = env.experiment("beta")
    for exp in [*alpha, beta]:
        make_run(env.client, exp, {"loss": [0.5, 0.25]})
    a = _exporter(env, tmp_path, "a", [f"{env.prefix}alpha1", f"{env.prefix}alpha2"])
    b = _exporter(env, tmp_path, "b", [f"{env.prefix}beta"])

    def run(exporter: dict[str, str], **extra: str) -> None:
        done = env.run("export-once", timeout=120, **exporter, **extra)
        assert done.returncode == 0, done.stderr

    # Both left to push the registry group (the default): the last one to push wins, and
    # the experiment count of the job flips between the two scopes' (2, then 1).
    run(a)
    assert _active_experiments(gateway, job) == 2
    run(b)
    assert _active_experiments(gateway, job) == 1

    # The operator gives the registry group to A. A restarted Pushgateway makes both push
    # everything and sweep against its list of groups: B, which pushed the registry group
    # before, must not delete it now that A owns it, and neither deletes the other's.
    gateway.restart("/-/ready")
    run(a)
    run(b, EXPORTER_REGISTRY_GROUP="false")
    assert _groups(gateway, job) == {*alpha, beta, "registry"}
    assert _active_experiments(gateway, job) == 2  # A's scope, not overwritten by B

    gateway.restart("/-/ready")
    run(b, EXPORTER_REGISTRY_GROUP="false")
    run(a)
    assert _groups(gateway, job) == {*alpha, beta, "registry"}
    assert _active_experiments(gateway, job) == 2

    # Each exporter still deletes its own groups that lost their data.
    env.client.delete_experiment(beta)
    gateway.restart("/-/ready")
    run(a)
    run(b, EXPORTER_REGISTRY_GROUP="false")
    assert _groups(gateway, job) == {*alpha, "registry"}
