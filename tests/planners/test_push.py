"""Unit tests for exporter.planners.push: which groups a cycle pushes and deletes (pure)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from exporter.model import PushRecord
from exporter.planners.push import PushPlan, plan_push, stale_groups
from exporter.planners.series import REGISTRY_KEY, GroupKey, experiment_key

START = "2024-01-15T10:00:00Z"
IDS = ["1", "2", "3"]
KNOWN = (experiment_key("1"), experiment_key("2"), experiment_key("3"), REGISTRY_KEY)


def pushed_before(**fields: Any) -> PushRecord:
    """The record a successful push leaves: every group known."""
    stored = tuple(k.labels for k in KNOWN)  # the record keeps the labels of each group
    base: dict[str, Any] = {"gateway_start": START, "groups": stored}
    base.update(fields)
    return PushRecord(**base)


def plan(
    record: PushRecord,
    dirty: Iterable[str] = frozenset(),
    start: str = START,
    owns_registry: bool = True,
    verify: bool = False,
    registry_dirty: bool = False,
) -> PushPlan:
    """The plan for `record`; the registry is clean unless `registry_dirty` (the mirror's
    mark, as a successful push leaves it)."""
    return plan_push(
        IDS, dirty, record, registry_dirty, start, owns_registry=owns_registry, verify=verify
    )


def test_only_dirty_experiments_are_pushed_when_the_gateway_kept_everything() -> None:
    p = plan(pushed_before(), dirty={"2", "9"})

    assert p.experiments == ["2"]  # a dirty id no longer mirrored is not pushed
    assert (p.registry, p.everything) == (False, False)
    assert p.known == list(KNOWN)


def test_nothing_dirty_pushes_nothing_and_keeps_every_group() -> None:
    p = plan(pushed_before())
    assert (p.experiments, p.registry) == ([], False)
    assert p.keep == frozenset(KNOWN)


def test_a_dirty_registry_is_pushed_alone() -> None:
    p = plan(pushed_before(), registry_dirty=True)
    assert (p.experiments, p.registry) == ([], True)


def test_everything_is_pushed_after_a_gateway_restart() -> None:
    p = plan(pushed_before(), dirty={"2"}, start="2024-01-16T08:00:00Z")

    assert p.experiments == IDS
    assert (p.registry, p.everything) == (True, True)
    assert p.known is None  # the gateway is asked what it holds


def test_everything_is_pushed_when_the_groups_left_are_unknown() -> None:
    p = plan(pushed_before(groups=None))

    assert (p.experiments, p.registry, p.everything, p.known) == (IDS, True, True, None)


def test_the_first_push_ever_pushes_everything() -> None:
    p = plan(PushRecord(), registry_dirty=True)  # a fresh mirror's registry starts dirty
    assert (p.experiments, p.registry, p.everything) == (IDS, True, True)


def test_a_clean_registry_is_pushed_anyway_when_everything_is() -> None:
    p = plan(pushed_before(), start="2024-01-16T08:00:00Z", registry_dirty=False)
    assert p.registry is True


def test_verify_asks_the_gateway_instead_of_trusting_the_record() -> None:
    p = plan(pushed_before(), dirty={"1"}, verify=True)

    assert p.known is None
    assert (p.experiments, p.everything) == (["1"], False)


def test_only_shard_0_pushes_and_keeps_the_registry_group() -> None:
    p = plan(PushRecord(), owns_registry=False)

    assert p.registry is False
    assert REGISTRY_KEY not in p.keep
    assert p.keep == frozenset(experiment_key(i) for i in IDS)


def test_stale_groups_are_owned_groups_without_data_sorted_once_each() -> None:
    keep = frozenset({experiment_key("1"), REGISTRY_KEY})
    present = [
        experiment_key("9"),
        experiment_key("1"),
        experiment_key("5"),
        experiment_key("9"),
        GroupKey((("experiment_id", "8"),)),
        REGISTRY_KEY,
        GroupKey((("group", "someone-else"),)),
    ]

    def owns(key: GroupKey) -> bool:
        return key != experiment_key("8") and key != GroupKey((("group", "someone-else"),))

    assert stale_groups(present, keep, owns) == [experiment_key("5"), experiment_key("9")]


def test_no_groups_present_means_none_stale() -> None:
    assert stale_groups([], frozenset(), lambda key: True) == []
