"""State records have one writer each: `PushRecord` is written by the push stage only.

The rule, checked on the source with `ast` (simple on purpose, not a proof): a module
writes `PushRecord` when it constructs one (`PushRecord(...)`), or when one of its
functions names `PushRecord` and calls `save(...)` (a `load(PushRecord)` then
`save(replace(record, ...))`). Only `WRITER` may do either. Reading it is free: the
planner takes it as an argument, the pull view reads the selection from it. Marks other
stages set for the push (a group or the registry to push again) live in the mirror
(`mark_dirty`, `mark_registry_dirty`), not in the record.
"""

from __future__ import annotations

import ast
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


def writers(record: str = RECORD) -> list[str]:
    """The modules of the `exporter` package that write `record`, by path."""
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if writes_record(ast.parse(path.read_text(), str(path)), record):
            found.append(path.relative_to(PACKAGE.parent).as_posix())
    return found


def test_push_record_is_written_by_the_push_stage_only() -> None:
    assert writers() == [WRITER]


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
