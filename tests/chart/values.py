"""Values the chart tests render with: the defaults, and every optional part switched on."""

from __future__ import annotations

from typing import Any

SECRET_REFS: dict[str, dict[str, str]] = {
    "pramathusApiKey": {"name": "pramathus", "key": "api-key"},
    "mlflowPassword": {"name": "mlflow-auth", "key": "password"},
    "mlflowToken": {"name": "mlflow-auth", "key": "token"},
    "pushgatewayPassword": {"name": "pushgateway-auth", "key": "password"},
    "remoteWritePassword": {"name": "remote-write", "key": "password"},
    "remoteWriteBearerToken": {"name": "remote-write", "key": "token"},
}

# What the operator puts in those Secrets (never in values): what a pod would read.
SECRET_DATA: dict[str, dict[str, str]] = {
    "pramathus": {"api-key": "pk-Zq9-never-rendered"},
    "mlflow-auth": {"password": "mlflow-pw-never-rendered", "token": "mlflow-tok-never-rendered"},
    "pushgateway-auth": {"password": "pg-pw-never-rendered"},
    "remote-write": {"password": "rw-pw-never-rendered", "token": "rw-tok-never-rendered"},
    "exporter-web": {"web-config.yml": "basic_auth_users:\n  prometheus: $2b$12$never-rendered\n"},
    "exporter-tls": {
        "tls.crt": "cert-never-rendered",
        "tls.key": "key-never-rendered",
        "ca.crt": "ca-never",
    },
}

ALL_ON: dict[str, Any] = {
    "shards": 3,
    "config": {
        "mlflow": {"tracking_uri": "https://mlflow.example.com", "username": "exporter"},
        "prometheus": {"mode": "both", "gateway": "http://pushgateway:9091"},
        "pramathus": {"enabled": True, "endpoint": "https://pramathus.example.com/api/metrics"},
        "remote_write": {"enabled": True, "url": "http://vm:8428/api/v1/write"},
        "export": {"interval_seconds": 30, "include_experiments": ["prod-.*"]},
        "logging": {"level": "INFO"},
    },
    "env": [{"name": "MLFLOW_HTTP_REQUEST_MAX_RETRIES", "value": "2"}],
    "secrets": SECRET_REFS,
    "web": {
        "configSecret": {"name": "exporter-web", "key": "web-config.yml"},
        "tlsSecret": {"name": "exporter-tls"},
        "tls": True,
    },
    "persistence": {"enabled": True, "storageClassName": "fast", "size": "5Gi"},
    "serviceMonitor": {
        "enabled": True,
        "labels": {"release": "kube-prometheus-stack"},
        "basicAuth": {"secretName": "scrape-auth"},
        "tlsConfig": {"ca": {"secret": {"name": "exporter-tls", "key": "ca.crt"}}},
    },
    "prometheusRule": {"enabled": True, "labels": {"release": "kube-prometheus-stack"}},
    "dashboards": {"enabled": True},
    "networkPolicy": {
        "enabled": True,
        "ingressFrom": [{"namespaceSelector": {"matchLabels": {"name": "monitoring"}}}],
        "egress": [{"to": [{"ipBlock": {"cidr": "10.0.0.0/8"}}]}],
    },
    "podDisruptionBudget": {"enabled": True},
}
