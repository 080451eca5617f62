"""What ``kickcall run`` shows: per queue kicks/s, calls/s, in flight, vector and mask state.

``LiveView`` redraws a table on a terminal (ANSI, no dependency); ``PlainView`` prints one line per
device per period, for logs and pipes.  Both compute rates from two snapshots.
"""

from __future__ import annotations

import sys
from typing import TextIO

__all__ = ["LiveView", "PlainView", "rates", "summary_lines"]


def _mask_state(q: dict) -> str:
    if q.get("irq-mode") == "intx":  # no MSI-X (msix = false, or the driver fell back): the queue's calls are INTx
        return "intx"
    if q["vector"] == 0xFFFF:
        return "no-vector"
    if q["masked"] is None:
        return "intx"
    return "masked" if q["masked"] else "unmasked"


def rates(prev: dict | None, cur: dict) -> dict[str, list[dict]]:
    """Per device, per queue: kicks/s and calls/s between two snapshots, plus current state."""
    out: dict[str, list[dict]] = {}
    dt = cur["time"] - prev["time"] if prev else 0.0
    for name, d in cur["devices"].items():
        rows = []
        pq = prev["devices"][name]["queues"] if prev and name in prev["devices"] else None
        for i, q in enumerate(d["queues"]):
            kr = cr = 0.0
            if pq is not None and dt > 0:
                kr = (q["kicks"] - pq[i]["kicks"]) / dt
                cr = (q["calls"] - pq[i]["calls"]) / dt
            path = "irqfd" if q["irqfd"] else ("polled" if q["polled"] else "")
            rows.append({"queue": q["queue"], "kicks_s": kr, "calls_s": cr, "inflight": q["inuse"],
                         "vector": q["vector"], "mask": _mask_state(q), "path": path,
                         "kicks": q["kicks"], "calls": q["calls"]})
        out[name] = rows
    return out


class PlainView:
    def __init__(self, out: TextIO = sys.stdout) -> None:
        self.out = out
        self.prev: dict | None = None
        self.t0: float | None = None

    def update(self, snap: dict, note: str = "") -> None:
        if self.t0 is None:
            self.t0 = snap["time"]
        r = rates(self.prev, snap)
        t = snap["time"] - self.t0
        state = "running" if snap["running"] else "paused"
        for name, rows in r.items():
            qs = "  ".join(
                f"q{x['queue']} kicks/s={x['kicks_s']:.0f} calls/s={x['calls_s']:.0f} inflight={x['inflight']} "
                f"vec={x['vector'] if x['vector'] != 0xFFFF else '-'} {x['mask']}" for x in rows)
            print(f"t={t:6.1f}s {state} {name}: {qs}{(' ' + note) if note else ''}", file=self.out, flush=True)
        self.prev = snap

    def close(self) -> None:
        pass


class LiveView:
    """A full-screen table redrawn in place (a terminal is required)."""

    def __init__(self, out: TextIO = sys.stdout, title: str = "kickcall") -> None:
        self.out = out
        self.prev: dict | None = None
        self.title = title
        self.t0: float | None = None
        self.out.write("\x1b[?25l")  # hide the cursor

    def update(self, snap: dict, note: str = "") -> None:
        if self.t0 is None:
            self.t0 = snap["time"]
        r = rates(self.prev, snap)
        lines = [f"{self.title}   t={snap['time'] - self.t0:.1f}s   "
                 f"{'RUNNING' if snap['running'] else 'PAUSED'}   [p] pause/resume  [q] quit   {note}", ""]
        hdr = f"{'device':<10} {'queue':>5} {'kicks/s':>10} {'calls/s':>10} {'in flight':>9} {'vector':>6}  " \
              f"{'mask':<10} {'path':<7} {'kicks':>10} {'calls':>10}"
        lines += [hdr, "-" * len(hdr)]
        for name, rows in r.items():
            for x in rows:
                vec = "-" if x["vector"] == 0xFFFF else str(x["vector"])
                lines.append(f"{name:<10} {x['queue']:>5} {x['kicks_s']:>10.0f} {x['calls_s']:>10.0f} "
                             f"{x['inflight']:>9} {vec:>6}  {x['mask']:<10} {x['path']:<7} "
                             f"{x['kicks']:>10} {x['calls']:>10}")
        hv = snap.get("hv", {})
        lines += ["", f"hypervisor: ioeventfd writes {hv.get('ioeventfd-writes', 0)}   "
                      f"irqfd injections {hv.get('irqfd-injections', 0)}   "
                      f"MSI {hv.get('msi-injections', 0)}   exits {sum(snap.get('exits', {}).values())}"]
        self.out.write("\x1b[H\x1b[2J" + "\n".join(lines) + "\n")
        self.out.flush()
        self.prev = snap

    def close(self) -> None:
        self.out.write("\x1b[?25h")
        self.out.flush()


def summary_lines(snap: dict, results: dict[str, dict]) -> list[str]:
    lines = ["", "per-queue counters:"]
    for name, d in snap["devices"].items():
        for q in d["queues"]:
            kp = ",".join(f"{k}={v}" for k, v in sorted(q["kicks-by-path"].items())) or "-"
            cp = ",".join(f"{k}={v}" for k, v in sorted(q["calls-by-path"].items())) or "-"
            vec = "-" if q["vector"] == 0xFFFF else q["vector"]
            lines.append(f"  {name} q{q['queue']}: kicks={q['kicks']} ({kp}) calls={q['calls']} ({cp}) "
                         f"suppressed={q['calls-suppressed']} vector={vec} {_mask_state(q)}")
    lines.append("workload:")
    for dev, r in results.items():
        if r["kind"] == "blk":
            lines.append(f"  {dev} (blk): {r['ops']} ops ({r['reads']} reads, {r['writes']} writes), "
                         f"{r['iops']:.0f} IOPS, p50 {r['lat-us-p50']:.0f} us, p99 {r['lat-us-p99']:.0f} us, "
                         f"data errors {r['error-count']}")
        else:
            lines.append(f"  {dev} (net): {r['ops']} ping-pongs, {r['pps']:.0f}/s, "
                         f"p50 {r['lat-us-p50']:.0f} us, payload errors {r['error-count']}")
        for e in r["errors"]:
            lines.append(f"    error: {e}")
    return lines
