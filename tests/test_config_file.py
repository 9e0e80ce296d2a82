"""The shipped config.yaml is valid, complete and equal to the built-in defaults."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from exporter.config import Settings, load_settings

CONFIG = Path(__file__).resolve().parent.parent / "config.yaml"


def _leaves(tree: dict[str, Any], prefix: str = "") -> set[str]:
    out: set[str] = set()
    for key, value in tree.items():
        if isinstance(value, dict):
            out |= _leaves(value, f"{prefix}{key}.")
        else:
            out.add(f"{prefix}{key}")
    return out


def test_shipped_config_yaml_loads_to_the_defaults() -> None:
    assert load_settings(CONFIG, env={}) == Settings()


def test_shipped_config_yaml_documents_every_key() -> None:
    documented = _leaves(yaml.safe_load(CONFIG.read_text()))
    assert documented == _leaves(Settings().model_dump())
