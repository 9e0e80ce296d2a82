"""The Helm chart rendered by the real Helm engine, and its pods made concrete on loopback.

`render` uses PyPI helm-python-sdk (Helm v4's Go SDK, no `helm` binary, no cluster).
`PodPlay` is what a kubelet would hand one StatefulSet pod's container, played without one:
its environment with every downward-API field resolved (pod name, namespace, the
`apps.kubernetes.io/pod-index` label), its volumes as local directories (ConfigMaps and
Secrets written out as files, each PersistentVolumeClaim a directory named like the claim
Kubernetes would make, so a pod of the same ordinal finds the same state again) and every
path in the environment that points into a mount rewritten to the local directory.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import helm_python
import yaml

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "charts" / "mlflow-monitoring"
RELEASE = "mm"
NAMESPACE = "monitoring"


def render(
    values: Mapping[str, Any] | None = None, *, name: str = RELEASE, namespace: str = NAMESPACE
) -> dict[str, str]:
    """{template path: rendered text}, values merged over the chart's values.yaml."""
    chart = helm_python.Chart.load(CHART)
    try:
        return chart.render(dict(values or {}), name=name, namespace=namespace, is_install=True)
    finally:
        chart.close()


def objects(values: Mapping[str, Any] | None = None, **kwargs: Any) -> list[dict[str, Any]]:
    """Every Kubernetes object the chart renders (NOTES.txt left out)."""
    out: list[dict[str, Any]] = []
    for path, text in sorted(render(values, **kwargs).items()):
        if path.endswith(".txt"):
            continue
        out.extend(doc for doc in yaml.safe_load_all(text) if doc)
    return out


def notes(values: Mapping[str, Any] | None = None) -> str:
    return next(t for p, t in render(values).items() if p.endswith("NOTES.txt"))


def find(objs: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [o for o in objs if o["kind"] == kind]


def one(objs: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    found = find(objs, kind)
    assert len(found) == 1, f"{len(found)} {kind} objects rendered"
    return found[0]


def container(statefulset: dict[str, Any]) -> dict[str, Any]:
    [c] = statefulset["spec"]["template"]["spec"]["containers"]
    return c  # type: ignore[no-any-return]


@dataclass
class PodPlay:
    """One pod of the rendered StatefulSet, made concrete under `root`."""

    statefulset: dict[str, Any]
    configmaps: dict[str, dict[str, Any]]  # name -> ConfigMap
    ordinal: int
    root: Path  # pods/ and volumes/ live here; volumes outlive a pod (PVCs)
    namespace: str = NAMESPACE
    secrets: Mapping[str, Mapping[str, str]] | None = None  # Secret name -> key -> value
    pod_index_label: bool = True  # False: a cluster before 1.28 (label missing)

    @property
    def pod_name(self) -> str:
        return f"{self.statefulset['metadata']['name']}-{self.ordinal}"

    def mounts(self) -> dict[str, Path]:
        """Container mount path -> local directory, each filled as Kubernetes would fill it."""
        spec = self.statefulset["spec"]
        volumes = {v["name"]: v for v in spec["template"]["spec"].get("volumes", [])}
        claims = {t["metadata"]["name"] for t in spec.get("volumeClaimTemplates", [])}
        out: dict[str, Path] = {}
        for mount in container(self.statefulset).get("volumeMounts", []):
            name = mount["name"]
            if name in claims:  # <claim>-<pod>: the name Kubernetes gives the PVC
                local = self.root / "volumes" / f"{name}-{self.pod_name}"
            else:
                local = self.root / "pods" / self.pod_name / name
                self._fill(volumes[name], local)
            local.mkdir(parents=True, exist_ok=True)
            out[mount["mountPath"]] = local
        return out

    def _fill(self, volume: dict[str, Any], local: Path) -> None:
        local.mkdir(parents=True, exist_ok=True)
        if "configMap" in volume:
            for key, text in self.configmaps[volume["configMap"]["name"]]["data"].items():
                (local / key).write_text(text)
        elif "secret" in volume:
            data = self._secret(volume["secret"]["secretName"])
            items = volume["secret"].get("items") or [{"key": k, "path": k} for k in data]
            for item in items:
                (local / item["path"]).write_text(data[item["key"]])
        elif "projected" in volume:
            for source in volume["projected"]["sources"]:
                data = self._secret(source["secret"]["name"])
                for item in source["secret"]["items"]:
                    (local / item["path"]).write_text(data[item["key"]])
        else:
            assert set(volume) == {"name", "emptyDir"}, f"cannot play volume {volume}"

    def _secret(self, name: str) -> Mapping[str, str]:
        assert self.secrets is not None, f"the pod mounts Secret {name!r}: pass secrets="
        assert name in self.secrets, f"the pod mounts Secret {name!r}"
        return self.secrets[name]

    def env(self) -> dict[str, str]:
        """The container's environment, downward-API fields resolved, mount paths local."""
        labels = {**self.statefulset["spec"]["template"]["metadata"].get("labels", {})}
        if self.pod_index_label:
            labels["apps.kubernetes.io/pod-index"] = str(self.ordinal)
        fields = {"metadata.name": self.pod_name, "metadata.namespace": self.namespace}
        mounts = self.mounts()
        out: dict[str, str] = {}
        for var in container(self.statefulset).get("env", []):
            if "value" in var:
                value = str(var["value"])
            else:
                path = var["valueFrom"]["fieldRef"]["fieldPath"]
                label = re.fullmatch(r"metadata\.labels\['(.+)'\]", path)
                value = labels.get(label.group(1), "") if label else fields[path]
            # Longest mount first, and once: a local path may itself start like a mount.
            for mount_path in sorted(mounts, key=len, reverse=True):
                if value == mount_path or value.startswith(mount_path + "/"):
                    value = str(mounts[mount_path]) + value[len(mount_path) :]
                    break
            out[var["name"]] = value
        return out


def pod_plays(objs: list[dict[str, Any]], root: Path, **kwargs: Any) -> list[PodPlay]:
    """One PodPlay per replica of the rendered StatefulSet."""
    statefulset = one(objs, "StatefulSet")
    configmaps = {o["metadata"]["name"]: o for o in find(objs, "ConfigMap")}
    return [
        PodPlay(statefulset, configmaps, n, root, **kwargs)
        for n in range(statefulset["spec"]["replicas"])
    ]
