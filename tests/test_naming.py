"""Unit tests for exporter.naming: Prometheus family names, run_id prefixes, label values."""

from __future__ import annotations

import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from exporter.naming import (
    MAX_LABEL_VALUE,
    PREFIX,
    RESERVED_NAMES,
    RESERVED_SUFFIXES,
    label_value,
    metric_family_name,
    short_id_length,
)

PROMETHEUS_NAME = re.compile(r"^[a-zA-Z_:][a-zA-Z0-9_:]*$")
FAST = settings(max_examples=200, deadline=None, database=None)


def assert_safe_user_family(name: str) -> None:
    assert PROMETHEUS_NAME.match(name), name
    assert name.startswith(PREFIX), name
    assert name not in RESERVED_NAMES, name
    assert not name.endswith(RESERVED_SUFFIXES), name
    assert not name.startswith("mlflow_exporter_"), name


# ---------------------------------------------------------------- metric_family_name


@pytest.mark.parametrize(
    ("key", "expected"),
    [
        ("accuracy", "mlflow_accuracy"),
        ("val/loss", "mlflow_val_loss"),
        ("val.loss", "mlflow_val_loss"),
        ("learning rate", "mlflow_learning_rate"),
        ("train/epoch.loss  avg", "mlflow_train_epoch_loss_avg"),
        ("/leading/and/trailing/", "mlflow_leading_and_trailing"),
        ("f1-score", "mlflow_f1_score"),
        ("1st_epoch", "mlflow_1st_epoch"),
        ("Précision", "mlflow_Precision"),
        ("naïve_café_über", "mlflow_naive_cafe_uber"),
    ],
)
def test_metric_key_becomes_legal_prometheus_family_name(key: str, expected: str) -> None:
    assert metric_family_name(key) == expected


def test_mixed_cjk_and_ascii_key_keeps_its_ascii_part() -> None:
    assert metric_family_name("准确率/top1") == "mlflow_top1"


def test_all_cjk_key_gets_a_stable_digest_name() -> None:
    name = metric_family_name("准确率")
    assert re.fullmatch(r"mlflow_key_[0-9a-f]{10}", name)
    assert metric_family_name("准确率") == name
    # Pinned: the digest must not depend on the process (no hash() randomisation).
    assert name == "mlflow_key_63564f436b"
    assert metric_family_name("损失") != name  # different keys, different digests


@pytest.mark.parametrize("key", ["", "///", "   ", "…", "🚀🚀"])
def test_key_with_nothing_ascii_left_gets_a_digest_name(key: str) -> None:
    assert re.fullmatch(r"mlflow_key_[0-9a-f]{10}", metric_family_name(key))


@pytest.mark.parametrize("reserved", sorted(RESERVED_NAMES))
def test_reserved_family_names_are_never_produced_for_user_metrics(reserved: str) -> None:
    key = reserved.removeprefix(PREFIX)  # e.g. `run_info`, `metric_step`
    name = metric_family_name(key)
    assert name != reserved
    assert_safe_user_family(name)


def test_run_info_key_is_moved_off_the_exporters_own_family() -> None:
    assert metric_family_name("run_info") == "mlflow_metric_run_info_value"


@pytest.mark.parametrize("suffix", RESERVED_SUFFIXES)
def test_reserved_suffixes_are_never_produced_for_user_metrics(suffix: str) -> None:
    name = metric_family_name(f"loss{suffix}")
    assert name == f"mlflow_loss{suffix}_value"
    assert_safe_user_family(name)


def test_exporter_self_metric_namespace_is_never_produced_for_user_metrics() -> None:
    assert metric_family_name("exporter_up") == "mlflow_metric_exporter_up"


@FAST
@given(st.text())
def test_any_text_key_gives_a_legal_prefixed_safe_name(key: str) -> None:
    assert_safe_user_family(metric_family_name(key))


@FAST
@given(st.text())
def test_family_name_is_deterministic(key: str) -> None:
    assert metric_family_name(key) == metric_family_name("".join(list(key)))


@FAST
@given(
    st.sampled_from(sorted(n.removeprefix(PREFIX) for n in RESERVED_NAMES)),
    st.sampled_from(["", *RESERVED_SUFFIXES]),
    st.sampled_from(["", "/", ".", " "]),
)
def test_keys_built_from_reserved_parts_never_land_on_reserved_names(
    body: str, suffix: str, sep: str
) -> None:
    assert_safe_user_family(metric_family_name(sep + body + suffix + sep))


# ---------------------------------------------------------------- short_id_length


def test_short_id_length_is_the_minimum_when_prefixes_are_unique() -> None:
    ids = ["a" * 32, "b" * 32, "c" * 32]
    assert short_id_length(ids, 12) == 12


def test_short_id_length_grows_just_past_a_shared_prefix() -> None:
    shared = "0123456789ab"
    ids = [shared + "c" * 20, shared + "d" * 20, "f" * 32]
    assert short_id_length(ids, 12) == 13


def test_short_id_length_ignores_duplicate_ids() -> None:
    assert short_id_length(["a" * 32, "a" * 32], 8) == 8


def test_short_id_length_of_no_ids_is_the_minimum() -> None:
    assert short_id_length([], 12) == 12


def test_short_id_length_handles_one_id_being_a_prefix_of_another() -> None:
    ids = ["abcdefgh", "abcdefghij"]
    length = short_id_length(ids, 4)
    assert len({i[:length] for i in ids}) == 2


@FAST
@given(
    st.lists(st.text(alphabet="0123456789abcdef", min_size=1, max_size=32), max_size=30),
    st.integers(min_value=1, max_value=16),
)
def test_short_id_length_never_collides_and_grows_only_when_needed(
    ids: list[str], minimum: int
) -> None:
    length = short_id_length(ids, minimum)
    unique = set(ids)
    assert length >= minimum
    assert len({i[:length] for i in unique}) == len(unique)  # never collides
    if length > minimum:  # grew: one character less would have collided
        assert len({i[: length - 1] for i in unique}) < len(unique)


# ---------------------------------------------------------------- label_value


def test_label_value_of_none_is_empty() -> None:
    assert label_value(None) == ""


def test_short_label_value_is_kept_as_is() -> None:
    assert label_value("resnet-50 baseline") == "resnet-50 baseline"


def test_label_value_at_the_limit_is_kept_as_is() -> None:
    value = "x" * MAX_LABEL_VALUE
    assert label_value(value) == value


def test_long_label_value_is_cut_to_the_limit_and_marked() -> None:
    value = "y" * (MAX_LABEL_VALUE + 50)
    cut = label_value(value)
    assert len(cut) == MAX_LABEL_VALUE
    assert cut.endswith("…")
    assert cut[:-1] == value[: MAX_LABEL_VALUE - 1]


@FAST
@given(st.text(max_size=60), st.integers(min_value=1, max_value=40))
def test_label_value_never_exceeds_limit_and_keeps_a_prefix(value: str, limit: int) -> None:
    cut = label_value(value, limit)
    assert len(cut) <= limit
    if len(value) <= limit:
        assert cut == value
    else:
        assert cut == value[: limit - 1] + "…"
