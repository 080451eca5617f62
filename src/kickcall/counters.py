"""The counters document: one shape for every surface that shows kicks and calls.

Every program that counts notifications (``kickcall run``'s VMM, the vhost-user back-end, the
vfio-user server) answers QMP ``x-query-kickcall-counters`` with one JSON object of this shape,
and renders its live view, its ``--json`` output, HMP ``info counters`` and its Prometheus
metrics from that same object, so the numbers agree wherever they are read::

    {"schema": 1, "program": "kickcall-run", "time": <monotonic s>, "running": true,
     "devices": {"<id>": {"id", "path", "type", "handled-by", "irq-mode", ...,
                          "queues": [{"queue", "vector", "masked", "pending", "irq-mode",
                                      "kicks", "kicks-by-path", "calls", "calls-by-path",
                                      "calls-suppressed", "inuse", "handled-by", ...}]}},
     "hv": {...}, "exits": {...}}

Keys are kebab-case (as QMP's), devices are keyed by their id.  ``kicks`` is the sum of
``kicks-by-path`` and ``calls`` of ``calls-by-path`` (``virtio.paths`` names the paths).
``schema`` changes when a key changes meaning or goes away (a new key does not change it).
"""

from __future__ import annotations

import time
from typing import Any

__all__ = ["COUNTERS_SCHEMA", "kebab_keys", "kebab_tree", "counters_doc", "format_counters"]

COUNTERS_SCHEMA = 1


def kebab_keys(d: dict[str, Any]) -> dict[str, Any]:
    """*d* with its keys' underscores turned into dashes (one level)."""
    return {k.replace("_", "-"): v for k, v in d.items()}


def counters_doc(program: str, devices: dict[str, dict[str, Any]], *, running: bool = True,
                 extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """A counters document for *program* with *devices* (keyed by id), stamped now."""
    doc: dict[str, Any] = {"schema": COUNTERS_SCHEMA, "program": program, "time": time.monotonic(),
                           "running": running, "devices": devices}
    if extra:
        doc.update(extra)
    return doc


def _vec(q: dict[str, Any]) -> str:
    v = q.get("vector")
    if q.get("irq-mode") == "intx":
        return "intx"
    if v is None:
        return "-"
    return "none" if v == 0xFFFF else str(v)


def _paths(d: dict[str, int]) -> str:
    return ",".join(f"{k}={v}" for k, v in sorted(d.items())) or "-"


def format_counters(doc: dict[str, Any]) -> str:
    """HMP ``info counters``: one line per queue (kicks and calls with their paths, vector, mask
    and pending bit, in flight), then the program's other counters."""
    lines = [f"{doc.get('program', '?')} counters (schema {doc.get('schema')}), "
             f"{'running' if doc.get('running') else 'paused'}"]
    for dev_id, d in doc.get("devices", {}).items():
        extra = ""
        if "connections" in d:
            extra = (f", connected {'yes' if d.get('connected') else 'no'}, connections {d['connections']}, "
                     f"protocol errors {d.get('protocol-errors', 0)}")
        lines.append(f"{dev_id}: {d.get('type', '?')}, handled by {d.get('handled-by', '?')}{extra}")
        for q in d.get("queues", []):
            state = []
            if q.get("masked"):
                state.append("MASKED")
            if q.get("pending"):
                state.append("PENDING")
            lines.append(f"  q{q.get('queue')}: kicks {q.get('kicks', 0)} ({_paths(q.get('kicks-by-path', {}))})"
                         f" calls {q.get('calls', 0)} ({_paths(q.get('calls-by-path', {}))})")
            lines.append(f"      vector {_vec(q)}{' ' + ' '.join(state) if state else ''}, in flight "
                         f"{q.get('inuse', 0)}, suppressed {q.get('calls-suppressed', 0)}")
    hv = doc.get("hv")
    if hv:
        lines.append("hypervisor: " + ", ".join(f"{k} {v}" for k, v in hv.items() if v))
    exits = doc.get("exits")
    if exits:
        lines.append("exits: " + ", ".join(f"{k} {v}" for k, v in sorted(exits.items())))
    return "\n".join(lines) + "\n"


def kebab_tree(v: Any) -> Any:
    """*v* with every dictionary key's underscores turned into dashes, at every depth (the one data
    shape of kickcall's JSON output: kebab-case, as QMP's)."""
    if isinstance(v, dict):
        return {(k.replace("_", "-") if isinstance(k, str) else k): kebab_tree(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [kebab_tree(x) for x in v]
    return v
