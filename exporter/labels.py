"""Label identity for a cycle, decided once, before any sink encodes a point.

The `run_id` label is a run id's first N characters: N is at least
`prometheus.run_id_length` and grows, only, when two mirrored runs would share a label, so a
series keeps its identity. It is decided after the runs are mirrored and before their
points are encoded, whichever sinks are on: history sinks encode points at capture, the
Pushgateway and the pull view build series later from the same record.
"""

from __future__ import annotations

from collections.abc import Iterable

from exporter.model import LabelRecord
from exporter.naming import short_id_length
from exporter.state import StateStore


def decide_run_id_length(state: StateStore, minimum: int, runs: Iterable[str]) -> int:
    """The `run_id` label length for this cycle, stored in the state's `LabelRecord`.

    `runs` are those whose points or series may be written now (new and due ones; registry
    runs are always checked). A full recount happens only when the length must grow; when
    it grows, every Pushgateway group is marked to be pushed again with the longer label.
    Call it outside a transaction (it opens its own when the length changes).
    """
    mirror = state.mirror
    current = state.load(LabelRecord).run_id_length
    registry_ids = mirror.registry().run_ids()
    checked = dict.fromkeys([*runs, *registry_ids])
    if current >= minimum and not any(mirror.has_prefix_clash(r, current) for r in checked):
        return current
    length = max(short_id_length([*mirror.run_ids(), *registry_ids], minimum), current)
    if length != current:
        with state.transaction():
            state.save(LabelRecord(length))
            state.push_marks.mark_dirty()
            state.push_marks.mark_registry_dirty()
    return length
