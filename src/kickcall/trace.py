"""Trace events, named as QEMU names them (``virtio_queue_notify``, ``virtio_notify``, ``msix_*`` ...).

A trace event is cheap when disabled: call sites test ``ev.enabled`` before formatting anything.
Enabled events go to a bounded in-memory ring (what a monitor can show) and to any sinks
(a log file, stderr).  Patterns follow QEMU's ``-trace`` syntax: a name or a glob (``virtio_*``).
"""

from __future__ import annotations

import collections
import fnmatch
import threading
import time
from typing import Callable, Iterable

__all__ = ["TraceEvent", "event", "events", "set_state", "records", "add_sink", "remove_sink"]


class TraceEvent:
    """One named trace point."""

    __slots__ = ("name", "enabled", "doc")

    def __init__(self, name: str, doc: str = "") -> None:
        self.name = name
        self.enabled = False
        self.doc = doc

    def emit(self, **fields: object) -> None:
        rec = (time.monotonic_ns(), threading.get_ident(), self.name, fields)
        _ring.append(rec)
        for sink in list(_sinks):
            try:
                sink(rec)
            except Exception:  # a broken sink must never break a notification path
                pass

    def __repr__(self) -> str:
        return f"TraceEvent({self.name!r}, enabled={self.enabled})"


_lock = threading.Lock()
_events: dict[str, TraceEvent] = {}
_ring: collections.deque = collections.deque(maxlen=65536)
_sinks: list[Callable[[tuple], None]] = []


def event(name: str, doc: str = "") -> TraceEvent:
    """Return the trace event *name*, creating it on first use."""
    with _lock:
        ev = _events.get(name)
        if ev is None:
            ev = _events[name] = TraceEvent(name, doc)
        return ev


def events() -> list[TraceEvent]:
    with _lock:
        return sorted(_events.values(), key=lambda e: e.name)


def set_state(pattern: str, enabled: bool) -> int:
    """Enable or disable every event matching *pattern* (a name or a glob); return how many matched."""
    n = 0
    with _lock:
        for name, ev in _events.items():
            if fnmatch.fnmatchcase(name, pattern):
                ev.enabled = enabled
                n += 1
    return n


def records(names: Iterable[str] | None = None) -> list[tuple]:
    wanted = set(names) if names is not None else None
    return [r for r in list(_ring) if wanted is None or r[2] in wanted]


def clear_records() -> None:
    _ring.clear()


def add_sink(sink: Callable[[tuple], None]) -> None:
    _sinks.append(sink)


def remove_sink(sink: Callable[[tuple], None]) -> None:
    try:
        _sinks.remove(sink)
    except ValueError:
        pass


def format_record(rec: tuple) -> str:
    ts, tid, name, fields = rec
    body = " ".join(f"{k}={v}" for k, v in fields.items())
    return f"{ts / 1e9:.6f} {tid}: {name} {body}"
