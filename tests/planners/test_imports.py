"""Planners are pure: they import only value types, never a module that does I/O.

Each `exporter/planners/*.py` is parsed (not imported) and every exporter module it names,
anywhere in the file, must be one of the pure value-type modules below or another planner.
Those value modules are held to the same rule, so the planners stay pure transitively.
Third-party and standard-library imports are not checked here.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

EXPORTER = Path(__file__).resolve().parents[2] / "exporter"
PLANNERS = sorted((EXPORTER / "planners").glob("*.py"))
# Frozen dataclasses, NamedTuples and pure functions, no I/O. `config.py` is not one:
# its settings are pydantic models next to the YAML and environment loader, so planners
# describe the settings they read as a Protocol (`planners.scope.ScopeRules`) instead.
VALUE_MODULES = ("exporter.model", "exporter.trace_model", "exporter.naming")
# Packages whose `from ... import name` names a module.
PACKAGES = ("exporter", "exporter.planners")
VALUE_FILES = [EXPORTER / f"{name.removeprefix('exporter.')}.py" for name in VALUE_MODULES]


def allowed(module: str) -> bool:
    planner = module == "exporter.planners" or module.startswith("exporter.planners.")
    return module in VALUE_MODULES or planner


def exporter_imports(source: str, package: str) -> list[tuple[int, str]]:
    """(line, module) of every exporter module a file of `package` imports, relative
    imports resolved; `from <package> import name` counts as importing module `name`."""
    found: list[tuple[int, str]] = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.rsplit(".", node.level - 1)[0]
                base = f"{parent}.{base}" if base else parent
            for alias in node.names:
                module = f"{base}.{alias.name}" if base in PACKAGES else base
                found.append((node.lineno, module))
    return [(line, m) for line, m in found if m == "exporter" or m.startswith("exporter.")]


def imports_of(path: Path) -> list[tuple[int, str]]:
    package = ".".join(path.relative_to(EXPORTER.parent).parts[:-1])
    return exporter_imports(path.read_text(), package)


@pytest.mark.parametrize("path", PLANNERS + VALUE_FILES, ids=lambda p: p.name)
def test_planners_and_value_modules_import_only_value_types_and_planners(path: Path) -> None:
    forbidden = [f"line {line}: {m}" for line, m in imports_of(path) if not allowed(m)]
    assert not forbidden, f"{path.name} imports modules with I/O: {forbidden}"


def test_every_planner_is_checked() -> None:
    assert {p.stem for p in PLANNERS} >= {"capture", "push", "scope", "series", "sweep"}


def test_a_forbidden_import_is_caught() -> None:
    # The check itself can fail: a planner importing the state, config or source is reported.
    source = (
        "from exporter.model import Run\n"
        "from exporter.state.records import load\n"
        "from . import series\n"
        "from .. import config\n"
        "from exporter import naming\n"
        "import exporter.mlflow_source\n"
        "def later():\n"
        "    from exporter.state import StateStore\n"
    )
    imports = exporter_imports(source, "exporter.planners")
    assert [m for _, m in imports if not allowed(m)] == [
        "exporter.state.records",
        "exporter.config",
        "exporter.mlflow_source",
        "exporter.state",
    ]
