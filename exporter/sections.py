"""The base of every configuration section (its own module so `alert_settings.py`, the
`alerts:` section's schema, can use it without importing `config.py` back)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class Section(BaseModel):
    # Unknown keys are errors: a typo must not silently fall back to a default.
    model_config = ConfigDict(extra="forbid", validate_default=True)
