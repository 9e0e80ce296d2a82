"""The sink registry: built-in sinks, sinks other packages declare, names checked.

Installed packages are imitated by real `importlib.metadata.EntryPoint` objects pointing at
objects of this module (and at a module that does not exist), handed to the registry in
place of `entry_points()`.
"""

from __future__ import annotations

import ast
import re
from collections.abc import Iterator
from importlib.metadata import EntryPoint
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

import exporter
from exporter import cli
from exporter.config import ConfigError, Settings
from exporter.selfmetrics import SelfMetrics
from exporter.sinks import registry
from exporter.sinks.delivery import POINTS, TRACE_BUCKETS, DeliverySink
from exporter.sinks.registry import ENTRY_POINT_GROUP, SinkContext, SinkSpec
from tests.fakes.sinks import FakeDeliverySink


def _third(context: SinkContext) -> DeliverySink | None:
    return FakeDeliverySink(name="third") if context.env.get("THIRD_ON") else None


THIRD = SinkSpec("third", "THIRD", _third)
NOT_A_SPEC = {"name": "third"}


def installed(monkeypatch: pytest.MonkeyPatch, *values: str) -> None:
    """Entry points as installed packages would declare them, `name=module:object`."""
    eps = [EntryPoint(v.split("=")[0], v.split("=")[1], ENTRY_POINT_GROUP) for v in values]
    monkeypatch.setattr(registry, "entry_points", lambda group: eps)


def settings(**sections: Any) -> Settings:
    return Settings.model_validate(sections)


def test_the_builtin_sinks_are_built_only_while_enabled() -> None:
    off = registry.build_sinks(SinkContext(settings(), env={}), registry.BUILTIN)
    on = registry.build_sinks(
        SinkContext(
            settings(
                pramathus={"enabled": True, "endpoint": "https://p.example/ingest"},
                remote_write={"enabled": True, "url": "http://127.0.0.1:9/api/v1/write"},
            ),
            run_id_length=lambda: 14,
            env={},
        ),
        registry.BUILTIN,
    )

    assert off == []
    assert [s.name for s in on] == ["pramathus", "remote_write"]
    assert on[1].run_id_length() == 14  # type: ignore[attr-defined]


def test_an_installed_sink_comes_after_the_builtin_ones_and_reads_its_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    installed(monkeypatch, f"third={__name__}:THIRD")

    names = [spec.name for spec in registry.all_specs()]
    built = registry.build_sinks(SinkContext(settings(), env={"THIRD_ON": "1"}))

    assert names == ["pramathus", "remote_write", "otlp", "third"]
    assert [s.name for s in built] == ["third"]
    assert registry.build_sinks(SinkContext(settings(), env={})) == []


def test_a_broken_or_wrong_entry_point_is_one_problem_each_naming_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    installed(monkeypatch, "gone=tests.no_such_module:SPEC", f"odd={__name__}:NOT_A_SPEC")

    with pytest.raises(ConfigError) as caught:
        registry.all_specs()

    gone, odd = caught.value.problems
    assert gone.startswith(
        f"sink entry point 'gone' (tests.no_such_module:SPEC) in {ENTRY_POINT_GROUP} "
        "cannot be loaded (ModuleNotFoundError: No module named 'tests.no_such_module')"
    )
    assert "fix or uninstall the package" in gone
    assert odd.startswith(f"sink entry point 'odd' ({__name__}:NOT_A_SPEC)")
    assert "is a dict, not an exporter SinkSpec" in odd


@pytest.mark.parametrize(
    ("name", "problem"),
    [
        ("Bad-Name", "sink name 'Bad-Name' is invalid"),
        ("mlflow", "sink name 'mlflow' is invalid"),
        ("pramathus", "sink name 'pramathus' is registered twice: rename one"),
    ],
)
def test_sink_names_must_be_valid_unique_and_not_a_stage(name: str, problem: str) -> None:
    with pytest.raises(ConfigError) as caught:
        registry.all_specs([SinkSpec(name, "X", _third)])

    assert caught.value.problems[0].startswith(problem)


def test_a_factory_building_a_sink_of_another_name_is_refused() -> None:
    spec = SinkSpec("fourth", "X", lambda c: FakeDeliverySink(name="fifth"))

    with pytest.raises(ConfigError, match="sink 'fourth' built a sink named 'fifth'"):
        registry.build_sinks(SinkContext(settings(), env={}), [spec])


@pytest.mark.parametrize(
    ("declared", "problem"),
    [
        (
            frozenset({POINTS, "spans"}),
            "sink 'fourth' declares it consumes ['spans']: use points, trace_buckets",
        ),
        (
            frozenset({TRACE_BUCKETS}),
            "sink 'fourth' must consume 'points': every sink takes captured points",
        ),
    ],
)
def test_a_sink_consuming_what_no_stage_gives_it_is_refused_when_built(
    declared: frozenset[str], problem: str
) -> None:
    spec = SinkSpec("fourth", "X", lambda c: FakeDeliverySink(name="fourth", consumes=declared))

    with pytest.raises(ConfigError) as caught:
        registry.build_sinks(SinkContext(settings(), env={}), [spec])

    assert caught.value.problems == [problem]


class NoBucketPlan(FakeDeliverySink):
    """Declares trace buckets but has no way to plan them."""

    plan_buckets = None  # type: ignore[assignment]


def test_a_sink_declaring_trace_buckets_without_plan_buckets_is_refused_when_built() -> None:
    sink = NoBucketPlan(name="fourth", consumes=frozenset({POINTS, TRACE_BUCKETS}))
    spec = SinkSpec("fourth", "X", lambda c: sink)

    with pytest.raises(ConfigError) as caught:
        registry.build_sinks(SinkContext(settings(), env={}), [spec])

    assert caught.value.problems == [
        "sink 'fourth' declares it consumes 'trace_buckets' but has no plan_buckets"
    ]


def test_a_sink_consuming_points_and_trace_buckets_is_built() -> None:
    sink = FakeDeliverySink(name="fourth", consumes=frozenset({POINTS, TRACE_BUCKETS}))

    built = registry.build_sinks(
        SinkContext(settings(), env={}), [SinkSpec("fourth", "X", lambda c: sink)]
    )

    assert built == [sink]


def test_what_counts_count_comes_from_the_registry() -> None:
    assert registry.unit("remote_write") == "samples"
    assert registry.unit("pramathus") == "points"
    assert registry.unit("third") == "points"


def test_self_metrics_have_families_for_every_registered_sink(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from exporter.app import self_metrics

    installed(monkeypatch, f"third={__name__}:THIRD")

    metrics = self_metrics()

    assert set(metrics.sinks) == {"pramathus", "remote_write", "otlp", "third"}
    assert set(SelfMetrics().sinks) == {"pramathus", "remote_write", "otlp"}
    value = metrics.registry.get_sample_value("mlflow_exporter_errors_total", {"stage": "third"})
    assert value == 0.0


def test_the_cli_stops_with_one_line_per_broken_plugin_and_exit_2(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    installed(monkeypatch, "gone=tests.no_such_module:SPEC")
    monkeypatch.setenv("EXPORTER_STATE_DIR", str(tmp_path))

    result = CliRunner().invoke(cli.main, ["export-once"])

    assert result.exit_code == 2
    assert result.output.splitlines() == [
        "error: invalid configuration (1 problem):",
        (
            f"  - sink entry point 'gone' (tests.no_such_module:SPEC) in {ENTRY_POINT_GROUP} "
            "cannot be loaded (ModuleNotFoundError: No module named 'tests.no_such_module'): "
            "fix or uninstall the package that declares it"
        ),
    ]


def test_dead_letters_of_an_unknown_sink_name_the_registered_ones(tmp_path: Path) -> None:
    result = CliRunner().invoke(
        cli.main, ["dead-letters", "list", "--sink", "nope", "--state-dir", str(tmp_path)]
    )

    assert result.exit_code == 2
    assert "--sink 'nope' is not a registered sink: use one of pramathus, remote_write, otlp" in (
        result.output
    )


def test_a_sinks_secrets_are_masked_with_the_others(monkeypatch: pytest.MonkeyPatch) -> None:
    from exporter.app import secrets_of

    spec = SinkSpec("third", "X", _third, secrets=lambda s: ["vendor-key-123"])
    monkeypatch.setattr(registry, "BUILTIN", (*registry.BUILTIN, spec))

    assert "vendor-key-123" in secrets_of(settings())


def _code_names(tree: ast.AST) -> Iterator[str]:
    """Identifiers, imported modules and exact string constants of a module's code (not its
    docstrings or comments: prose may name any sink)."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute):
            yield node.attr
        elif isinstance(node, ast.Name):
            yield node.id
        elif isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            yield node.name
        elif isinstance(node, ast.ImportFrom):
            yield node.module or ""
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif (
            isinstance(node, ast.Constant) and isinstance(node.value, str) and " " not in node.value
        ):
            yield node.value


BUILTIN_MODULES = {
    "pramathus": {"sinks/pramathus.py"},
    "remote_write": {"sinks/history.py", "sinks/remote_write.py", "sinks/trace_history.py"},
    "otlp": {"sinks/otlp.py"},
}


@pytest.mark.parametrize("name", sorted(BUILTIN_MODULES))
def test_a_builtin_sink_is_its_own_modules_plus_registration_and_config(name: str) -> None:
    """The seam holds when adding a sink touches nothing else: no other module of the
    exporter names a built-in sink in its code (its settings, class, module or queue)."""
    package = Path(exporter.__file__).parent
    word = re.compile(name.replace("_", "_?"), re.IGNORECASE)
    naming = {
        path.relative_to(package).as_posix()
        for path in package.rglob("*.py")
        if any(word.search(n) for n in _code_names(ast.parse(path.read_text())))
    }
    assert naming == BUILTIN_MODULES[name] | {"sinks/registry.py", "config.py"}
    assert {spec.name for spec in registry.BUILTIN} == set(BUILTIN_MODULES)
