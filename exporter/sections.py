"""The base of every configuration section (here so section models can live beside the code
that uses them, such as `alert_rules.py`, without importing `config.py` back)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class Section(BaseModel):
    # Unknown keys are errors: a typo must not silently fall back to a default.
    model_config = ConfigDict(extra="forbid", validate_default=True)
