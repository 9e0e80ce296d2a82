"""Which Pushgateway groups a cycle pushes and deletes (pure).

Only groups whose data changed are pushed; every group is pushed when the Pushgateway may
have lost them (it restarted, or the last push failed half-way), and the Pushgateway's own
list of groups is checked for strays once per sweep pass.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

from exporter.model import PushRecord
from exporter.planners.series import REGISTRY_KEY, GroupKey, experiment_key


@dataclass(frozen=True, slots=True)
class PushPlan:
    experiments: list[str]  # experiment groups to push
    registry: bool  # push the registry group
    keep: frozenset[GroupKey]  # every group this exporter should leave on the Pushgateway
    known: list[GroupKey] | None  # groups left by the last push; None: ask the Pushgateway
    everything: bool


def plan_push(
    experiment_ids: Sequence[str],
    dirty: Iterable[str],
    record: PushRecord,
    registry_dirty: bool,
    gateway_start: str,
    owns_registry: bool,
    verify: bool,
) -> PushPlan:
    """Decide the groups to push this cycle (`registry_dirty`: the push mark that the
    registry group changed since the last push)."""
    everything = record.groups is None or gateway_start != record.gateway_start
    dirty_set = set(dirty)
    chosen = [e for e in experiment_ids if everything or e in dirty_set]
    keep = {experiment_key(e) for e in experiment_ids}
    if owns_registry:
        keep.add(REGISTRY_KEY)
    registry = owns_registry and (everything or registry_dirty)
    known = None
    if not (verify or everything or record.groups is None):
        known = [GroupKey(labels) for labels in record.groups]
    return PushPlan(chosen, registry, frozenset(keep), known, everything)


def stale_groups(
    present: Iterable[GroupKey], keep: frozenset[GroupKey], owns: Callable[[GroupKey], bool]
) -> list[GroupKey]:
    """Groups on the Pushgateway this exporter owns but no longer has data for."""
    return sorted(g for g in set(present) if owns(g) and g not in keep)
