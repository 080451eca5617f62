"""Samples of a monitor's view of every virtqueue, taken with read-only queries.

A sample is what ``x-query-virtio-queue-status``, ``x-query-device-notifiers`` and (when the
target has one) ``x-query-pci-msix`` say at one moment.  None of these consumes an eventfd or
stops a vhost ring; the fault injector's state is never asked for -- a fault is found from its
effects, as a real bug would be.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Protocol

__all__ = ["QueueSample", "DeviceSample", "Sample", "Sampler", "Monitor"]


class Monitor(Protocol):
    """What the sampler needs of a QMP client (kickcall.monitor.client.QMPClient has it)."""

    def execute(self, command: str, arguments: dict | None = None) -> Any: ...


# ring and notifier fields that say where a queue stands; any change between two samples is progress
STATE_FIELDS = ("avail-idx", "last-avail-idx", "used-idx", "used-idx-ring", "used-event", "avail-event",
                "avail-flags", "used-flags", "inuse", "kicks", "calls")
NOTIFIER_FIELDS = ("pending", "total", "sets", "writes", "consumed")


@dataclass
class QueueSample:
    queue: int
    status: dict  # x-query-virtio-queue-status (kickcall's ring fields included)
    notifiers: list[dict] = field(default_factory=list)  # this queue's notifiers
    vector: int | None = None
    msix_entry: dict | None = None  # the vector's MSI-X entry (None: no MSI-X view)
    function_masked: bool | None = None

    def key(self) -> tuple:
        """Everything that moves when the queue makes progress (or its notifiers fire)."""
        ring = tuple(self.status.get(k) for k in STATE_FIELDS)
        nots = tuple(sorted((n.get("role"), n.get("id"), tuple(n.get(k) for k in NOTIFIER_FIELDS))
                            for n in self.notifiers))
        msix = None
        if self.msix_entry is not None:
            msix = (self.msix_entry.get("masked"), self.msix_entry.get("pending"), self.msix_entry.get("sent"),
                    self.msix_entry.get("pended"), self.function_masked)
        return ring, nots, msix

    def notifier(self, role: str) -> dict | None:
        for n in self.notifiers:
            if n.get("role") == role:
                return n
        return None


@dataclass
class DeviceSample:
    path: str
    name: str
    statuses: list[str]
    queues: list[QueueSample]
    msix_enabled: bool | None = None


@dataclass
class Sample:
    time: float
    run_state: str
    devices: dict[str, DeviceSample]


def _safe(mon: Monitor, cmd: str, args: dict | None = None) -> Any:
    from ..monitor.client import QMPCommandError

    try:
        return mon.execute(cmd, args)
    except QMPCommandError:
        return None


class Sampler:
    """Takes samples of every (or the selected) virtio device of one monitor."""

    def __init__(self, mon: Monitor, *, dev: str | None = None, queue: int | None = None) -> None:
        self.mon = mon
        self.dev = dev
        self.queue = queue

    def devices(self) -> list[dict]:
        devs = self.mon.execute("x-query-virtio") or []
        if self.dev is not None:
            devs = [d for d in devs if self.dev == d["path"] or self.dev in d["path"].strip("/").split("/")]
        return devs

    def sample(self) -> Sample:
        st = self.mon.execute("query-status") or {}
        out: dict[str, DeviceSample] = {}
        for d in self.devices():
            path = d["path"]
            vs = _safe(self.mon, "x-query-virtio-status", {"path": path}) or {}
            nvqs = int(vs.get("num-vqs", 0))
            statuses = list((vs.get("status") or {}).get("statuses", []))
            nots = _safe(self.mon, "x-query-device-notifiers", {"dev": path}) or []
            msix = _safe(self.mon, "x-query-pci-msix", {"dev": path})
            queues = []
            for q in range(nvqs):
                if self.queue is not None and q != self.queue:
                    continue
                qs = _safe(self.mon, "x-query-virtio-queue-status", {"path": path, "queue": q})
                if qs is None:
                    continue
                s = QueueSample(q, qs, [n for n in nots if n.get("queue") == q])
                vec = qs.get("vector")
                if isinstance(vec, int) and vec != 0xFFFF:
                    s.vector = vec
                if msix is not None and msix.get("enabled") and s.vector is not None:
                    ents = msix.get("entries") or []
                    if s.vector < len(ents):
                        s.msix_entry = ents[s.vector]
                        s.function_masked = bool(msix.get("function-masked"))
                queues.append(s)
            out[path] = DeviceSample(path, d.get("name", "?"), statuses, queues,
                                     None if msix is None else bool(msix.get("enabled")))
        return Sample(time.monotonic(), st.get("status", "unknown"), out)
