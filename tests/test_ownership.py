"""State records and marks have their writers: `PushRecord` is written by the push stage only,
and so are the push marks' clean states; the marks are set dirty only by the stages that
change what a Pushgateway group holds.

The rule for records, checked on the source with `ast` (simple on purpose, not a proof): a
module writes `PushRecord` when it constructs one (`PushRecord(...)`), or when one of its
functions names `PushRecord` and calls `save(...)` (a `load(PushRecord)` then
`save(replace(record, ...))`). Only `WRITER` may do either. Reading it is free: the
planner takes it as an argument, the pull view reads the selection from it. Marks other
stages set for the push (a group or the registry to push again) live in the push marks
(`state/push_marks.py`: `mark_dirty`, `mark_registry_dirty`), not in the record.

The push marks (the experiments' `dirty` and `cut_runs` columns, the `RegistryMark` record)
are written through `PushMarks` and, where one statement does both, by the mirror:
- set dirty (`mark_dirty`, `mark_registry_dirty`) by the modules in `DIRTY_SETTERS`: the
  mirror (a run written or tombstoned), the refresh (the registry or the experiment
  counts changed), the label length (a longer `run_id` label), the trace stage (live
  trace series) and the push stage's `prepare` (the per-run selection or the run window
  moved);
- set clean (`mark_clean`, `mark_registry_clean`) and `set_cut_runs` by the push stage only,
  after it pushed the groups;
- in SQL, the columns are written by `push_marks.py`, by the mirror's experiment upsert
  (dirty when what a group shows changed) and by a schema migration (every group dirty).
"""

from __future__ import annotations

import ast
import re
from collections.abc import Iterator
from pathlib import Path

import exporter

PACKAGE = Path(exporter.__file__).parent
WRITER = "exporter/sinks/push_stage.py"
RECORD = "PushRecord"


def _names(node: ast.AST) -> set[str]:
    return {n.id for n in ast.walk(node) if isinstance(n, ast.Name)}


def _called(node: ast.AST) -> set[str]:
    """Names of what is called in `node`: `f(...)` and `x.f(...)` both give `f`."""
    out = set()
    for call in ast.walk(node):
        if isinstance(call, ast.Call):
            if isinstance(call.func, ast.Name):
                out.add(call.func.id)
            elif isinstance(call.func, ast.Attribute):
                out.add(call.func.attr)
    return out


def writes_record(tree: ast.AST, record: str = RECORD) -> bool:
    """Whether this module constructs `record`, or saves in a function that names it."""
    if record in _called(tree):
        return True
    functions = (n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef))
    return any(record in _names(f) and "save" in _called(f) for f in functions)


def _modules() -> Iterator[tuple[str, ast.AST]]:
    """Every module of the `exporter` package, parsed, by path."""
    for path in sorted(PACKAGE.rglob("*.py")):
        yield path.relative_to(PACKAGE.parent).as_posix(), ast.parse(path.read_text(), str(path))


def writers(record: str = RECORD) -> list[str]:
    """The modules of the `exporter` package that write `record`, by path."""
    return [path for path, tree in _modules() if writes_record(tree, record)]


MARKS = "exporter/state/push_marks.py"
DIRTY = {"mark_dirty", "mark_registry_dirty"}
CLEAN = {"mark_clean", "mark_registry_clean", "set_cut_runs"}
DIRTY_SETTERS = [
    "exporter/labels.py",
    "exporter/refresh.py",
    "exporter/sinks/push_stage.py",
    "exporter/state/mirror.py",
    "exporter/traces.py",
]
# SQL that assigns a push mark's column (`SET dirty = ...`, `, cut_runs = ...`).
MARK_SQL = re.compile(r"(\bSET|,)\s*(dirty|cut_runs)\s*=")
MARK_SQL_WRITERS = [
    "exporter/state/mirror.py",  # the experiment upsert: dirty when what a group shows changed
    MARKS,
    "exporter/state/schema.py",  # a migration: every group pushed again
]


def callers(names: set[str]) -> list[str]:
    """The modules of the `exporter` package that call any of `names`, by path."""
    return [path for path, tree in _modules() if names & _called(tree)]


def sql_writers(pattern: re.Pattern[str] = MARK_SQL) -> list[str]:
    """The modules of the `exporter` package with a string constant matching `pattern`."""
    return [
        path
        for path, tree in _modules()
        if any(
            isinstance(n, ast.Constant) and isinstance(n.value, str) and pattern.search(n.value)
            for n in ast.walk(tree)
        )
    ]


def test_push_record_is_written_by_the_push_stage_only() -> None:
    assert writers() == [WRITER]


def test_push_marks_are_set_dirty_only_by_the_stages_that_change_a_group() -> None:
    assert callers(DIRTY) == DIRTY_SETTERS


def test_push_marks_are_set_clean_and_the_cut_recorded_by_the_push_stage_only() -> None:
    assert callers(CLEAN) == [WRITER]


def test_the_registry_mark_is_written_by_the_push_marks_only() -> None:
    assert writers("RegistryMark") == [MARKS]


def test_the_push_marks_columns_are_written_in_sql_only_where_documented() -> None:
    assert sql_writers() == MARK_SQL_WRITERS


def test_the_sql_rule_sees_an_assignment_not_a_longer_name_or_a_read() -> None:
    assert MARK_SQL.search("UPDATE experiment SET dirty = 0")
    assert MARK_SQL.search("SET cut_runs = ? WHERE")
    assert MARK_SQL.search("DO UPDATE SET name = excluded.name, dirty = 1")
    assert not MARK_SQL.search("SELECT experiment_id FROM experiment WHERE dirty = 1")
    assert not MARK_SQL.search("replace(record, registry_dirty=True)")


def test_the_rule_sees_a_construction_and_a_load_then_save() -> None:
    built = ast.parse("def f(state):\n    state.save(PushRecord(groups=None))\n")
    replaced = ast.parse(
        "def f(state):\n"
        "    record = state.load(PushRecord)\n"
        "    state.save(replace(record, registry_dirty=True))\n"
    )
    read = ast.parse("def f(state):\n    return state.load(PushRecord).selected\n")
    assert writes_record(built)
    assert writes_record(replaced)
    assert not writes_record(read)
