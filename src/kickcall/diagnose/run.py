"""``kickcall diagnose``: sample, judge, and (if asked) inject the one event that recovers a queue."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from .sample import Monitor, Sample, Sampler
from .verdict import HEALTHY, IDLE, UNDECIDED, Verdict, judge

__all__ = ["QueueReport", "Report", "diagnose", "apply_fixes", "format_report"]


@dataclass
class QueueReport:
    path: str
    name: str
    queue: int
    verdict: Verdict
    fix_result: dict | None = None

    def as_dict(self) -> dict:
        d = {"path": self.path, "name": self.name, "queue": self.queue}
        d.update(self.verdict.as_dict())
        if self.fix_result is not None:
            d["fix-result"] = self.fix_result
        return d


@dataclass
class Report:
    target: str
    run_state: str
    samples: int
    interval: float
    queues: list[QueueReport] = field(default_factory=list)

    @property
    def problems(self) -> list[QueueReport]:
        return [q for q in self.queues if q.verdict.problem]

    def unresolved(self) -> list[QueueReport]:
        return [q for q in self.problems if not (q.fix_result and q.fix_result.get("moved"))]

    def as_dict(self) -> dict:
        return {"target": self.target, "run-state": self.run_state, "samples": self.samples,
                "interval": self.interval, "queues": [q.as_dict() for q in self.queues]}


def diagnose(mon: Monitor, *, target: str = "", samples: int = 4, interval: float = 0.5, max_time: float = 15.0,
             dev: str | None = None, queue: int | None = None) -> Report:
    """Sample until every queue has a verdict (*samples* equal samples, or progress in each interval)."""
    sampler = Sampler(mon, dev=dev, queue=queue)
    history: list[Sample] = []
    t0 = time.monotonic()
    verdicts: dict[tuple[str, int], Verdict] = {}
    while True:
        history.append(sampler.sample())
        history = history[-max(samples, 2) * 4:]
        last = history[-1]
        keys = [(p, q.queue) for p, d in last.devices.items() for q in d.queues]
        verdicts = {k: judge(history, k[0], k[1], samples) for k in keys}
        done = all(v.kind != UNDECIDED for v in verdicts.values())
        if done or time.monotonic() - t0 >= max_time:
            break
        time.sleep(interval)
    rep = Report(target, history[-1].run_state, len(history), interval)
    for (path, q), v in verdicts.items():
        if v.kind == UNDECIDED:  # out of time while the queue kept moving on and off: that is progress
            v = Verdict(HEALTHY, [f"intermittent progress within {max_time:.0f} s"] + v.evidence)
        rep.queues.append(QueueReport(path, history[-1].devices[path].name, q, v))
    return rep


def _ring(mon: Monitor, path: str, queue: int) -> tuple:
    st = mon.execute("x-query-virtio-queue-status", {"path": path, "queue": queue}) or {}
    return tuple(st.get(k) for k in ("avail-idx", "last-avail-idx", "used-idx-ring", "used-idx", "used-event"))


def apply_fixes(mon: Monitor, rep: Report, *, force: bool = False, confirm_timeout: float = 10.0,
                log=print) -> None:
    """Inject the single event each problem calls for and confirm the queue moved.

    A masked vector is refused unless *force*; with it, one message goes past the mask (the
    monitor logs it and announces X_DEVICE_EVENT_INJECTED with forced=true).  The guest's mask is
    never touched."""
    from ..monitor.client import QMPCommandError

    for q in rep.problems:
        v = q.verdict
        if v.fix is None:
            q.fix_result = {"injected": False, "reason": "no single event recovers this: " + v.kind}
            continue
        if v.needs_force and not force:
            q.fix_result = {"injected": False, "reason": "refused: the guest masked this vector; an injected call "
                            "would only set its PBA bit. --force delivers one interrupt past the mask"}
            continue
        before = _ring(mon, q.path, q.queue)
        try:
            res = mon.execute("x-debug-device-event", {"dev": q.path, "event": v.fix, "queue": q.queue,
                                                       "force": bool(v.needs_force and force)})
        except QMPCommandError as e:
            q.fix_result = {"injected": False, "reason": f"{e.cls}: {e.desc}"}
            continue
        log(f"kickcall diagnose: injected {v.fix} on {q.path} queue {q.queue} through {res.get('path')}"
            + (" (FORCED past the guest's mask)" if res.get("forced") else ""))
        deadline = time.monotonic() + confirm_timeout
        after = before
        while time.monotonic() < deadline:
            after = _ring(mon, q.path, q.queue)
            if after != before:
                break
            time.sleep(0.05)
        names = ("avail-idx", "last-avail-idx", "used-idx-ring", "used-idx", "used-event")
        q.fix_result = {"injected": True, "event": v.fix, "path": res.get("path"), "forced": bool(res.get("forced")),
                        "moved": after != before,
                        "before": dict(zip(names, before, strict=True)), "after": dict(zip(names, after, strict=True))}
        if after == before:
            q.fix_result["note"] = (
                "the kick was delivered and the device still took nothing: it (or its back-end) is not processing"
                if v.fix == "kick" else
                "the call was delivered and the driver consumed nothing: the guest is not handling this "
                "interrupt (or is not running)")


def format_report(rep: Report) -> str:
    lines = [f"kickcall diagnose: {rep.target} ({rep.run_state}), {rep.samples} samples {rep.interval:g} s apart"]
    cur = None
    for q in rep.queues:
        if q.path != cur:
            lines.append(f"{q.path} [{q.name}]")
            cur = q.path
        v = q.verdict
        tag = v.kind.upper() if v.problem else v.kind
        lines.append(f"  queue {q.queue}: {tag}")
        for e in v.evidence:
            lines.append(f"    - {e}")
        if v.problem:
            if q.fix_result is None:
                if v.fix:
                    lines.append(f"    fix: inject one {v.fix}" + (" (needs --force: masked vector)" if v.needs_force
                                                                   else "") + " -- run with --fix")
                else:
                    lines.append("    fix: none by injection")
            elif q.fix_result.get("injected"):
                r = q.fix_result
                lines.append(f"    fixed: {r['event']} injected through {r['path']}"
                             + (" (forced)" if r["forced"] else "")
                             + ("; the queue moved" if r["moved"] else "; the queue did NOT move"))
                if r.get("note"):
                    lines.append(f"    - {r['note']}")
            else:
                lines.append(f"    not fixed: {q.fix_result['reason']}")
    if not rep.queues:
        lines.append("  no virtio queues")
    quiet = all(q.verdict.kind in (HEALTHY, IDLE) for q in rep.queues)
    lines.append("kickcall diagnose: " + ("no stalled queue" if quiet else
                                          f"{len(rep.problems)} stalled queue(s), {len(rep.unresolved())} unresolved"))
    return "\n".join(lines)
