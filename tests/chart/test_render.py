"""The chart rendered by the real Helm engine (helm-python-sdk), with its defaults and with
every optional part on: lint, Kubernetes' own strict schemas (1.30 and the newest
kubernetes-validate ships), `promtool check rules` on the PrometheusRule, and what each
object must say (hardened pod, one shard per pod, secrets only as mounted files)."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import helm_python
import kubernetes_validate
import pytest
import yaml

from exporter.config import SECRET_ENV
from tests.chart.values import ALL_ON, SECRET_DATA
from tests.support.chart import CHART, REPO, container, find, notes, objects, one, render

# The chart's minimum (Chart.yaml kubeVersion), 1.30, and the newest kubernetes-validate ships.
KUBE_VERSIONS = ["1.25.0", "1.30.0", kubernetes_validate.latest_version()]
OPERATOR_KINDS = {"ServiceMonitor", "PodMonitor", "PrometheusRule"}  # no schemas shipped
CASES = {"defaults": {}, "all-on": ALL_ON, "no-persistence": {"persistence": {"enabled": False}}}


@pytest.fixture(params=sorted(CASES), scope="module")
def rendered(request: pytest.FixtureRequest) -> list[dict[str, Any]]:
    return objects(CASES[request.param])


def pod_spec(objs: list[dict[str, Any]]) -> dict[str, Any]:
    return one(objs, "StatefulSet")["spec"]["template"]["spec"]  # type: ignore[no-any-return]


# ---------------------------------------------------------------- lint and schemas


@pytest.mark.parametrize("case", sorted(CASES))
def test_helm_lint_finds_no_error(case: str) -> None:
    result = helm_python.lint(CHART, CASES[case], strict=True)
    assert result["errors"] == [], result
    # Only the informational "icon is recommended" (there is no project icon).
    assert [m for m in result["messages"] if m["severity"] > 1] == [], result


@pytest.mark.parametrize("version", KUBE_VERSIONS)
def test_every_object_passes_kubernetes_strict_schemas(
    rendered: list[dict[str, Any]], version: str
) -> None:
    checked = 0
    for obj in rendered:
        if obj["kind"] in OPERATOR_KINDS:
            continue
        kubernetes_validate.validate(obj, version, strict=True)
        checked += 1
    assert checked >= 5


def test_the_oldest_schema_checked_is_the_charts_minimum_kubernetes() -> None:
    meta = yaml.safe_load((CHART / "Chart.yaml").read_text())
    assert meta["kubeVersion"] == f">={KUBE_VERSIONS[0]}-0"


def test_a_wrong_field_fails_the_strict_schema() -> None:
    """The validation above can fail: a misspelt field is refused."""
    statefulset = one(objects(), "StatefulSet")
    statefulset["spec"]["template"]["spec"]["containers"][0]["securityContexts"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(statefulset, KUBE_VERSIONS[0], strict=True)


def test_every_object_carries_the_recommended_labels(rendered: list[dict[str, Any]]) -> None:
    for obj in rendered:
        labels = obj["metadata"]["labels"]
        for key in ("name", "instance", "version", "managed-by", "component", "part-of"):
            assert f"app.kubernetes.io/{key}" in labels, (obj["kind"], labels)
        assert obj["metadata"]["namespace"] == "monitoring"


def test_defaults_render_no_optional_part() -> None:
    kinds = sorted(o["kind"] for o in objects())
    assert kinds == ["ConfigMap", "Service", "Service", "ServiceAccount", "StatefulSet"]


def test_every_optional_part_renders_when_switched_on() -> None:
    kinds = {o["kind"] for o in objects(ALL_ON)}
    assert kinds >= {"ServiceMonitor", "PrometheusRule", "NetworkPolicy", "PodDisruptionBudget"}


# ---------------------------------------------------------------- the pod


def test_the_pod_is_hardened(rendered: list[dict[str, Any]]) -> None:
    spec = pod_spec(rendered)
    assert spec["automountServiceAccountToken"] is False
    pod = spec["securityContext"]
    assert pod["runAsNonRoot"] is True
    assert pod["seccompProfile"] == {"type": "RuntimeDefault"}
    c = container(one(rendered, "StatefulSet"))
    sc = c["securityContext"]
    assert sc["allowPrivilegeEscalation"] is False
    assert sc["readOnlyRootFilesystem"] is True
    assert sc["capabilities"] == {"drop": ["ALL"]}
    assert sc["seccompProfile"] == {"type": "RuntimeDefault"}
    assert set(c["resources"]) == {"requests", "limits"}
    mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
    assert mounts["/tmp"] == "tmp"
    assert mounts["/var/lib/exporter"] == "state"
    env = {e["name"]: e for e in c["env"]}
    assert env["EXPORTER_STATE_DIR"]["value"] == "/var/lib/exporter"


def test_the_service_account_mounts_no_token(rendered: list[dict[str, Any]]) -> None:
    assert one(rendered, "ServiceAccount")["automountServiceAccountToken"] is False


def test_probes_ask_livez_and_readyz_on_the_named_port(rendered: list[dict[str, Any]]) -> None:
    c = container(one(rendered, "StatefulSet"))
    assert c["livenessProbe"]["httpGet"]["path"] == "/livez"
    assert c["startupProbe"]["httpGet"]["path"] == "/livez"
    assert c["readinessProbe"]["httpGet"]["path"] == "/readyz"
    startup = c["startupProbe"]
    # Long enough for a first bootstrap: minutes, not the liveness probe's seconds.
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 300
    assert {p["name"] for p in c["ports"]} == {"metrics"}


def test_one_pod_per_shard_with_the_index_from_the_ordinal() -> None:
    statefulset = one(objects({"shards": 3}), "StatefulSet")
    assert statefulset["spec"]["replicas"] == 3
    assert statefulset["spec"]["podManagementPolicy"] == "Parallel"
    env = {e["name"]: e for e in container(statefulset)["env"]}
    assert env["EXPORTER_SHARD_COUNT"]["value"] == "3"
    field = env["EXPORTER_SHARD_INDEX"]["valueFrom"]["fieldRef"]["fieldPath"]
    assert field == "metadata.labels['apps.kubernetes.io/pod-index']"
    assert env["EXPORTER_POD_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"


def test_state_lives_on_a_claim_per_pod_that_outlives_it() -> None:
    spec = one(objects(), "StatefulSet")["spec"]
    [claim] = spec["volumeClaimTemplates"]
    assert claim["metadata"]["name"] == "state"
    assert claim["spec"]["resources"]["requests"]["storage"] == "2Gi"
    assert spec["persistentVolumeClaimRetentionPolicy"] == {
        "whenDeleted": "Retain",
        "whenScaled": "Retain",
    }
    assert "state" not in {v["name"] for v in spec["template"]["spec"]["volumes"]}


def test_without_persistence_state_is_an_empty_dir_and_notes_say_what_is_lost() -> None:
    values = {"persistence": {"enabled": False}}
    spec = one(objects(values), "StatefulSet")["spec"]
    assert "volumeClaimTemplates" not in spec
    volumes = {v["name"]: v for v in spec["template"]["spec"]["volumes"]}
    assert volumes["state"] == {"name": "state", "emptyDir": {}}
    text = notes(values)
    assert "WARNING: persistence.enabled is false" in text
    assert "sends every point of its runs again" in text
    assert "WARNING" not in notes({})


def test_a_config_change_rolls_the_pods() -> None:
    def checksum(values: dict[str, Any]) -> str:
        sts = one(objects(values), "StatefulSet")
        return str(sts["spec"]["template"]["metadata"]["annotations"]["checksum/config"])

    assert checksum({}) != checksum({"config": {"export": {"interval_seconds": 30}}})


# ---------------------------------------------------------------- secrets


def test_secrets_reach_the_pod_only_as_files_from_secret_references() -> None:
    objs = objects(ALL_ON)
    assert not find(objs, "Secret"), "the chart must never create a Secret holding a value"
    c = container(one(objs, "StatefulSet"))
    env = {e["name"]: e.get("value") for e in c["env"]}
    for name in SECRET_ENV:
        assert name not in env, f"{name} as a plain variable"
        assert env[f"{name}_FILE"] == f"/etc/mlflow-monitoring/secrets/{_ref_of(name)}"
    volumes = {v["name"]: v for v in pod_spec(objs)["volumes"]}
    sources = volumes["secrets"]["projected"]["sources"]
    assert {s["secret"]["name"] for s in sources} == {
        "pramathus",
        "mlflow-auth",
        "pushgateway-auth",
        "remote-write",
    }


def _ref_of(variable: str) -> str:
    return {
        "PRAMATHUS_API_KEY": "pramathusApiKey",
        "MLFLOW_TRACKING_PASSWORD": "mlflowPassword",
        "MLFLOW_TRACKING_TOKEN": "mlflowToken",
        "PROMETHEUS_GATEWAY_PASSWORD": "pushgatewayPassword",
        "REMOTE_WRITE_PASSWORD": "remoteWritePassword",
        "REMOTE_WRITE_BEARER_TOKEN": "remoteWriteBearerToken",
    }[variable]


def test_no_secret_value_appears_in_any_rendered_manifest() -> None:
    text = "\n".join(_render_text(ALL_ON))
    for data in SECRET_DATA.values():
        for value in data.values():
            assert value not in text


def _render_text(values: dict[str, Any]) -> list[str]:
    return list(render(values).values())


def test_unused_secret_references_mount_nothing() -> None:
    spec = pod_spec(objects())
    assert {v["name"] for v in spec["volumes"]} == {"tmp", "config"}
    assert not [e for e in container(one(objects(), "StatefulSet"))["env"] if "FILE" in e["name"]]


# ---------------------------------------------------------------- TLS and basic auth


def test_the_web_config_secret_is_mounted_and_named_by_its_variable() -> None:
    objs = objects(ALL_ON)
    c = container(one(objs, "StatefulSet"))
    env = {e["name"]: e.get("value") for e in c["env"]}
    assert env["EXPORTER_WEB_CONFIG_FILE"] == "/etc/mlflow-monitoring/web/web-config.yml"
    mounts = {m["name"]: m["mountPath"] for m in c["volumeMounts"]}
    assert mounts["web-config"] == "/etc/mlflow-monitoring/web"
    assert mounts["tls"] == "/etc/mlflow-monitoring/tls"
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        assert c[probe]["httpGet"]["scheme"] == "HTTPS"


def test_the_service_monitor_scrapes_every_shard_with_https_and_basic_auth() -> None:
    objs = objects(ALL_ON)
    monitor = one(objs, "ServiceMonitor")
    headless = [s for s in find(objs, "Service") if s["spec"].get("clusterIP") == "None"]
    assert len(headless) == 1
    assert headless[0]["spec"]["publishNotReadyAddresses"] is True
    selector = monitor["spec"]["selector"]["matchLabels"]
    assert selector.items() <= headless[0]["metadata"]["labels"].items()
    assert one(objs, "StatefulSet")["spec"]["serviceName"] == headless[0]["metadata"]["name"]
    endpoints = {e["path"]: e for e in monitor["spec"]["endpoints"]}
    assert set(endpoints) == {"/metrics", "/mlflow/metrics"}  # mode: both
    for e in endpoints.values():
        assert e["port"] == "metrics"
        assert e["scheme"] == "https"
        assert e["basicAuth"]["password"] == {"name": "scrape-auth", "key": "password"}
        assert e["tlsConfig"] == {"ca": {"secret": {"name": "exporter-tls", "key": "ca.crt"}}}
    pulled = endpoints["/mlflow/metrics"]
    assert pulled["relabelings"] == [{"targetLabel": "job", "replacement": "mlflow_metrics"}]
    assert "honorLabels" not in pulled  # the instance tells shards apart, as in prometheus.yml
    assert (pulled["interval"], pulled["scrapeTimeout"]) == ("60s", "30s")
    assert (endpoints["/metrics"]["interval"], endpoints["/metrics"]["scrapeTimeout"]) == (
        "30s",
        "10s",
    )


def test_in_push_mode_the_service_monitor_scrapes_only_self_metrics() -> None:
    monitor = one(objects({"serviceMonitor": {"enabled": True}}), "ServiceMonitor")
    [endpoint] = monitor["spec"]["endpoints"]
    assert (endpoint["path"], endpoint["scheme"]) == ("/metrics", "http")
    assert "basicAuth" not in endpoint


# ---------------------------------------------------------------- rules and dashboards


def test_the_prometheus_rule_carries_exactly_the_stacks_rule_groups() -> None:
    rule = one(objects(ALL_ON), "PrometheusRule")
    want = []
    for path in sorted((REPO / "prometheus" / "rules").glob("*.yml")):
        want += yaml.safe_load(path.read_text())["groups"]
    assert rule["spec"]["groups"] == want


def test_promtool_accepts_the_prometheus_rule_groups(tmp_path: Path) -> None:
    promtool = shutil.which("promtool")
    assert promtool, "promtool not on PATH (apt-get install prometheus)"
    rule = one(objects(ALL_ON), "PrometheusRule")
    path = tmp_path / "rules.yml"
    path.write_text(yaml.safe_dump({"groups": rule["spec"]["groups"]}))
    done = subprocess.run(
        [promtool, "check", "rules", str(path)], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stdout + done.stderr
    path.write_text(yaml.safe_dump({"groups": [{"name": "x", "rules": [{"alert": "A"}]}]}))
    bad = subprocess.run([promtool, "check", "rules", str(path)], capture_output=True, timeout=60)
    assert bad.returncode != 0  # the check can fail


def test_dashboards_are_sidecar_config_maps_holding_the_stacks_dashboards() -> None:
    maps = [
        c
        for c in find(objects(ALL_ON), "ConfigMap")
        if c["metadata"]["labels"].get("grafana_dashboard") == "1"
    ]
    held = {k: json.loads(v) for c in maps for k, v in c["data"].items()}
    want = {
        p.name: json.loads(p.read_text()) for p in (REPO / "grafana" / "dashboards").glob("*.json")
    }
    assert held == want
    assert all(len(json.dumps(c["data"])) < 1_000_000 for c in maps)  # ConfigMap limit 1 MiB


# ---------------------------------------------------------------- network policy and PDB


def test_the_network_policy_opens_only_the_metrics_port() -> None:
    policy = one(objects(ALL_ON), "NetworkPolicy")
    [ingress] = policy["spec"]["ingress"]
    assert ingress["ports"] == [{"port": "metrics", "protocol": "TCP"}]
    assert ingress["from"] == ALL_ON["networkPolicy"]["ingressFrom"]
    assert policy["spec"]["policyTypes"] == ["Ingress", "Egress"]


def test_the_disruption_budget_evicts_one_shard_at_a_time() -> None:
    pdb = one(objects(ALL_ON), "PodDisruptionBudget")
    assert pdb["spec"]["maxUnavailable"] == 1
