"""Unit tests for exporter.planners.scope: shards, name patterns, counts and run-series choice.

Shard ownership is jump consistent hash over a stable hash of the experiment id; with two
shards, experiments 17, 2 and 3 belong to shard 0 and 1, 4 and 5 to shard 1 (asserted below,
so a changed hash shows up).
"""

from __future__ import annotations

from typing import Any

import pytest

from exporter.config import ExportSettings
from exporter.model import Experiment
from exporter.planners.scope import (
    in_scope,
    jump_hash,
    metric_filter,
    owns,
    owns_group,
    owns_registry,
    shard_of,
    with_run_series,
)
from exporter.planners.series import REGISTRY_KEY, GroupKey, experiment_key

SHARD_0 = ("17", "2", "3")
SHARD_1 = ("1", "4", "5")


def export(**fields: Any) -> ExportSettings:
    return ExportSettings(**fields)


def ids(experiments: list[Experiment]) -> list[str]:
    return [e.experiment_id for e in experiments]


def test_the_shard_hash_is_stable() -> None:
    assert [shard_of(i, 2) for i in SHARD_0 + SHARD_1] == [0, 0, 0, 1, 1, 1]


def test_one_shard_mirrors_every_active_experiment_sorted_by_id() -> None:
    experiments = [Experiment("3", "c"), Experiment("1", "a"), Experiment("2", "b")]

    scope = in_scope(experiments, export())

    assert ids(scope.active) == ["1", "2", "3"]
    assert scope.counts == {"active": 3, "deleted": 0}
    assert scope.excluded == 0


@pytest.mark.parametrize(("index", "mine"), [(0, ["17", "2", "3"]), (1, ["1", "4", "5"])])
def test_each_shard_mirrors_only_its_experiments_but_counts_all(
    index: int, mine: list[str]
) -> None:
    experiments = [Experiment(i, f"exp-{i}") for i in SHARD_0 + SHARD_1]

    scope = in_scope(experiments, export(shard_count=2, shard_index=index))

    assert ids(scope.active) == mine
    assert scope.counts == {"active": 6, "deleted": 0}


def test_deleted_experiments_are_counted_but_not_mirrored() -> None:
    experiments = [
        Experiment("1", "a"),
        Experiment("2", "b", lifecycle_stage="deleted"),
        Experiment("3", "c", lifecycle_stage="deleted"),
    ]

    scope = in_scope(experiments, export())

    assert ids(scope.active) == ["1"]
    assert scope.counts == {"active": 1, "deleted": 2}


def test_an_unknown_lifecycle_stage_is_taken_as_active() -> None:
    scope = in_scope([Experiment("1", "a", lifecycle_stage="archived")], export())
    assert scope.counts == {"active": 1, "deleted": 0}
    assert ids(scope.active) == ["1"]


def test_name_patterns_narrow_scope_and_count_this_shards_active_exclusions() -> None:
    experiments = [
        Experiment("2", "prod-churn"),
        Experiment("3", "prod-scratch"),
        Experiment("17", "dev-churn"),
        Experiment("1", "dev-other"),  # shard 1: not this shard's exclusion
        Experiment(
            "9", "dev-deleted", lifecycle_stage="deleted"
        ),  # deleted: not counted as excluded
    ]
    settings = export(
        include_experiments=["prod-.*", "dev-d.*"],
        exclude_experiments=[".*scratch"],
        shard_count=2,
        shard_index=0,
    )

    scope = in_scope(experiments, settings)

    assert ids(scope.active) == ["2"]
    assert scope.counts == {"active": 1, "deleted": 1}
    assert scope.excluded == 2  # prod-scratch and dev-churn


def test_patterns_match_whole_names() -> None:
    scope = in_scope(
        [Experiment("1", "xprod"), Experiment("2", "prod")], export(include_experiments=["prod"])
    )
    assert ids(scope.active) == ["2"]


def test_owns_follows_the_shard_hash() -> None:
    assert all(owns(i, export(shard_count=2, shard_index=0)) for i in SHARD_0)
    assert not any(owns(i, export(shard_count=2, shard_index=0)) for i in SHARD_1)
    assert owns("anything", export())


def test_a_shard_owns_its_experiment_groups_and_shard_0_the_registry_group() -> None:
    zero, one = export(shard_count=2, shard_index=0), export(shard_count=2, shard_index=1)

    assert owns_group(experiment_key("2"), zero)
    assert not owns_group(experiment_key("2"), one)
    assert owns_group(experiment_key("1"), one)
    assert not owns_group(experiment_key("1"), zero)
    assert owns_group(REGISTRY_KEY, zero)
    assert not owns_group(REGISTRY_KEY, one)


def test_an_exporter_that_gave_the_registry_group_away_neither_pushes_nor_sweeps_it() -> None:
    other_scope = export(include_experiments=["^team-b-"], registry_group=False)

    assert not owns_registry(other_scope)
    assert not owns_group(REGISTRY_KEY, other_scope)
    assert owns_group(experiment_key("7"), other_scope)  # its experiments' groups stay its own
    assert owns_registry(export(include_experiments=["^team-a-"]))  # the default owner


@pytest.mark.parametrize(
    "key",
    [
        (("group", "other"),),
        (("experiment_id", "2"), ("instance", "node-1")),
        (),
        (("run_id", "2"),),
    ],
)
def test_groups_of_another_shape_are_never_owned(key: tuple[tuple[str, str], ...]) -> None:
    assert not owns_group(GroupKey(key), export())


def test_run_series_go_to_the_most_recently_active_experiments() -> None:
    activity = {"1": 100, "2": 300, "3": 200, "4": 300}

    assert with_run_series(activity, 2) == {"2", "4"}
    assert with_run_series(activity, 3) == {"2", "3", "4"}
    assert with_run_series(activity, 1) == {"4"}  # a tie goes to the higher id, stably


def test_max_experiments_0_gives_run_series_to_every_experiment() -> None:
    assert with_run_series({"1": 1, "2": 2}, 0) == {"1", "2"}
    assert with_run_series({"1": 1, "2": 2}, 10) == {"1", "2"}
    assert with_run_series({}, 0) == set()


def test_the_metric_filter_applies_include_and_exclude_patterns_to_whole_keys() -> None:
    allowed = metric_filter(export(include_metrics=["val/.*", "acc"], exclude_metrics=[".*_raw"]))

    assert [allowed(k) for k in ("val/loss", "acc", "val/loss_raw", "accuracy", "train/acc")] == [
        True,
        True,
        False,
        False,
        False,
    ]
    assert metric_filter(export())("anything")


# ---------------------------------------------------------------- resharding


KEYS = [str(i) for i in range(20_000)]


@pytest.mark.parametrize("n", [1, 2, 3, 4, 7])
def test_adding_a_shard_moves_about_one_in_n_plus_one_and_only_to_the_new_shard(n: int) -> None:
    before = {k: shard_of(k, n) for k in KEYS}
    after = {k: shard_of(k, n + 1) for k in KEYS}
    moved = [k for k in KEYS if before[k] != after[k]]

    assert {after[k] for k in moved} == {n}  # nothing moves between the shards that stay
    share = len(moved) / len(KEYS)
    assert abs(share - 1 / (n + 1)) < 0.02, f"{share:.3f} moved going {n} -> {n + 1}"


def test_three_to_four_shards_moves_a_quarter_where_a_modulo_would_move_three_quarters() -> None:
    moved = sum(shard_of(k, 3) != shard_of(k, 4) for k in KEYS) / len(KEYS)
    modulo = sum(int(k) % 3 != int(k) % 4 for k in KEYS) / len(KEYS)
    assert 0.23 < moved < 0.27
    assert modulo > 0.7


@pytest.mark.parametrize("count", [1, 3, 4, 10])
def test_every_shard_gets_an_even_share(count: int) -> None:
    shares = [0] * count
    for k in KEYS:
        shares[shard_of(k, count)] += 1
    assert all(abs(s / len(KEYS) - 1 / count) < 0.02 for s in shares), shares


@pytest.mark.parametrize(
    ("key", "buckets", "bucket"),
    [
        # Published by other ports of the paper's reference code (Lamping and Veach, "A Fast,
        # Minimal Memory, Consistent Hash Algorithm", 2014): ClickHouse's
        # jumpConsistentHash tests and Microsoft's TypeScript port.
        (1, 1, 0),
        (42, 57, 43),
        (256, 1024, 520),
        (3735883980, 1, 0),
        (3735883980, 666, 361),
        (16045690984833335023, 255, 237),
        (10863919174838991, 11, 6),
        (2016238256797177309, 11, 3),
    ],
)
def test_jump_hash_gives_the_reference_implementations_buckets(
    key: int, buckets: int, bucket: int
) -> None:
    assert jump_hash(key, buckets) == bucket
