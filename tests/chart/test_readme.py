"""README's Kubernetes section, followed: every `helm` command it shows renders with the
real Helm engine using the values files it shows, every Secret the rendered objects refer
to is one its `kubectl create secret` commands make (with the key they make), each pod
would start with that configuration, and its web config passes the exporter's own checks."""

from __future__ import annotations

import re
import shlex
from pathlib import Path
from typing import Any

import pytest
import yaml

from exporter.config import load_settings
from exporter.web import load_web_config
from tests.support.certs import make_certs
from tests.support.chart import CHART, REPO, container, find, objects, one, pod_plays

SECTION = "## Kubernetes (Helm chart)"


def section() -> str:
    text = (REPO / "README.md").read_text()
    start = text.index(SECTION)
    end = text.index("\n## ", start + len(SECTION))
    return text[start:end]


def blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", section(), re.DOTALL)


def files() -> dict[str, str]:
    """The YAML blocks, by the file name their first line gives (`# values-prod.yaml`)."""
    out = {}
    for block in blocks("yaml"):
        first, _, _ = block.partition("\n")
        assert first.startswith("# "), f"a YAML block without its file name: {first}"
        out[first[2:].strip()] = block
    return out


def commands(program: str) -> list[list[str]]:
    lines = [line for block in blocks("bash") for line in block.splitlines()]
    return [shlex.split(line) for line in lines if line.startswith(f"{program} ")]


def helm_values(argv: list[str]) -> tuple[dict[str, Any], str]:
    """The values a `helm install|upgrade NAME CHART ...` command gives, and its release."""
    assert argv[:2] in (["helm", "install"], ["helm", "upgrade"]), argv
    assert (REPO / argv[3]).resolve() == CHART
    values: dict[str, Any] = {}
    args = iter(argv[4:])
    for arg in args:
        if arg == "-f":
            values = merge(values, yaml.safe_load(files()[next(args)]))
        elif arg == "--set":
            dotted, _, raw = next(args).partition("=")
            node = values
            *parents, leaf = dotted.split(".")
            for part in parents:
                node = node.setdefault(part, {})
            node[leaf] = yaml.safe_load(raw)  # helm --set types numbers and booleans too
        else:
            assert arg == "-n", f"unknown helm argument in README: {arg}"
            assert next(args) == "monitoring"
    return values, argv[2]


def merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out


def created_secrets() -> dict[str, set[str]]:
    """Secret name -> keys, from the README's `kubectl create secret generic` commands."""
    out: dict[str, set[str]] = {}
    for argv in commands("kubectl"):
        if argv[3:6] != ["create", "secret", "generic"]:
            continue
        keys = set()
        for arg in argv[7:]:
            if arg.startswith("--from-literal="):
                keys.add(arg.removeprefix("--from-literal=").split("=", 1)[0])
            elif arg.startswith("--from-file="):
                keys.add(Path(arg.removeprefix("--from-file=")).name)
        out[argv[6]] = keys
    return out


def referred_secrets(objs: list[dict[str, Any]]) -> dict[str, set[str]]:
    """Secret name -> keys the rendered objects need."""
    out: dict[str, set[str]] = {}
    for volume in one(objs, "StatefulSet")["spec"]["template"]["spec"]["volumes"]:
        sources = [s["secret"] for s in volume.get("projected", {}).get("sources", [])]
        if "secret" in volume:
            sources.append({"name": volume["secret"]["secretName"], **volume["secret"]})
        for s in sources:
            out.setdefault(s["name"], set()).update(i["key"] for i in s.get("items", []))
    for monitor in find(objs, "ServiceMonitor"):
        for endpoint in monitor["spec"]["endpoints"]:
            for ref in endpoint.get("basicAuth", {}).values():
                out.setdefault(ref["name"], set()).add(ref["key"])
            ca = endpoint.get("tlsConfig", {}).get("ca", {}).get("secret")
            if ca:
                out.setdefault(ca["name"], set()).add(ca["key"])
    return out


def test_the_section_shows_install_upgrade_and_reshard_commands() -> None:
    helm = commands("helm")
    assert [argv[1] for argv in helm] == ["install", "upgrade", "upgrade"]
    assert helm[1][-2:] == ["--set", "shards=4"]
    for heading in (
        "Install",
        "Shards",
        "Pull or push",
        "What the PVC",
        "Upgrade",
        "Resharding",
        "Auth",
    ):
        assert f"**{heading}" in section()


@pytest.mark.parametrize("index", range(3))
def test_every_helm_command_renders_with_the_values_files_shown(index: int) -> None:
    values, release = helm_values(commands("helm")[index])
    objs = objects(values, name=release, namespace="monitoring")
    assert one(objs, "StatefulSet")["spec"]["replicas"] == values["shards"]
    created = created_secrets()
    for name, keys in referred_secrets(objs).items():
        assert name in created, f"{name} is referred to but no README command creates it"
        assert keys <= created[name], (name, keys, created[name])


def test_the_reshard_command_gives_four_shards() -> None:
    values, release = helm_values(commands("helm")[1])
    statefulset = one(objects(values, name=release), "StatefulSet")
    env = {e["name"]: e.get("value") for e in container(statefulset)["env"]}
    assert (statefulset["spec"]["replicas"], env["EXPORTER_SHARD_COUNT"]) == (4, "4")


def test_each_pod_of_the_install_starts_with_its_configuration(tmp_path: Path) -> None:
    values, release = helm_values(commands("helm")[0])
    secrets = {name: dict.fromkeys(keys, "x-secret") for name, keys in created_secrets().items()}
    plays = pod_plays(objects(values, name=release), tmp_path, secrets=secrets)
    for play in plays:
        settings = load_settings(env=play.env())
        assert settings.export.shard_index == play.ordinal
        assert settings.prometheus.mode == "pull"
        assert settings.pramathus.api_key is not None
        assert settings.mlflow.password is not None


def test_the_web_config_shown_passes_the_exporters_checks(tmp_path: Path) -> None:
    values, release = helm_values(commands("helm")[2])
    statefulset = one(objects(values, name=release), "StatefulSet")
    mounts = {m["name"]: m["mountPath"] for m in container(statefulset)["volumeMounts"]}
    text = files()["web-config.yml"]
    certs = make_certs(tmp_path / "certs")
    # The paths it names are the chart's TLS mount and the Secret's keys ...
    tls_dir = mounts["tls"]
    assert f"{tls_dir}/tls.crt" in text
    assert f"{tls_dir}/tls.key" in text
    # ... and with certificates there, the exporter accepts it.
    text = text.replace(f"{tls_dir}/tls.crt", str(certs.server_cert))
    text = text.replace(f"{tls_dir}/tls.key", str(certs.server_key))
    path = tmp_path / "web-config.yml"
    path.write_text(text)
    config = load_web_config(str(path))
    assert config.tls is not None
    assert config.users is not None
    assert set(config.users.users) == {"prometheus"}
