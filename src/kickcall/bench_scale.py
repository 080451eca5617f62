"""``kickcall bench scale``: how kickcall's costs grow with the size of a machine.

Curves, each measured for real on kickcall machines (``guest = "process"``: the VMM is one
process, the guest another):

* **queues**: a virtio-blk with 1 ... 1024 request queues (QEMU's VIRTIO_QUEUE_MAX), each with its
  ioeventfd, an MSI-X table of queues + 1 entries; the guest drives it with INTx (the guest model
  has one CPU-vector space of 192 vectors, so it cannot give 1024 queues a vector each -- the
  vector curves cover vectors).  Per point: the time from ``Machine()`` to a booted guest (the
  driver's DRIVER_OK), and the resident memory (``VmRSS``) of the VMM process and the guest
  process once booted;
* **vectors (machine)**: the same device with MSI-X per queue, the guest booting with MSI-X
  (queues + 1 vectors, each routed and bound to an irqfd), as far as the guest model's vector
  space goes (128 vectors);
* **vectors (VMM)**: past the guest's limit, up to 2048: on a booted machine, the VMM sets up *n*
  MSI vectors the way a device does (``MsiRoutes.add`` per vector, KVM_SET_GSI_ROUTING, one
  KVM_IRQFD per vector), committing once for the batch (what virtio-pci does since the routes of a
  device's vectors are committed together) and, for comparison, once per vector (what it did
  before: each commit sends the whole table, n commits of up to n routes);
* **kick latency** with 1 vs 1024 ioeventfds registered in the hypervisor's table: ``bench
  notify``'s ioeventfd kick path (guest doorbell -> ioeventfd -> device handler, one-way), on two
  machines measured in alternating rounds;
* **diagnose sampling**: one full ``Sampler.sample()`` (``kickcall diagnose``'s sample: run state,
  every queue's status, notifiers, MSI-X) over QMP, per number of queues;
* **x-query-pci-msix** over QMP on MSI-X tables of 2 ... 1025 entries (virtio-blk) and of 2048
  entries (a ``kickcall vfio-user-server`` function with ``--vectors 2048``).

Each machine point runs in a fresh process (so one point's memory does not stay in the next
point's RSS), pinned as ``bench notify`` pins (guest on CPU 0, VMM on CPU 1).  Every curve gets a
verdict from its per-unit cost at the low and the high end of its ladder: *linear or better*
when the high end's cost per unit is at most ``LINEAR_FACTOR`` times the low end's, else where it
is not and why.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from typing import Any, Callable

from .bench import (GUEST_CPU, VMM_CPU, BenchRun, latency_summary, machine_description, measure_kicks,
                    pin_process, restore_affinity, round_summary)
from .child import start_helper
from .drive.latency import LatencyHistogram

__all__ = ["run_scale", "render_scale_markdown", "scale_plan", "scale_job", "verdict", "point_main",
           "SCALE_BLOCK_START", "SCALE_BLOCK_END", "LINEAR_FACTOR"]

SCALE_BLOCK_START = "<!-- bench scale: begin -->"
SCALE_BLOCK_END = "<!-- bench scale: end -->"

#: a curve is "linear or better" when its cost per unit at the high end of the ladder is at most
#: this many times its cost per unit at the low end (noise on 2 shared cores is up to ~1.5x)
LINEAR_FACTOR = 2.0
#: growth below this share of the smallest point's value is "flat" (fixed costs dominate)
FLAT_SHARE = 0.10
KICK_TABLE = 1024  # the hypervisor's ioeventfd table (IoeventfdTable's max_entries; KVM's bus has 1000)
DUMMY_ADDR = 0xFEA0_0000  # MMIO addresses no BAR uses, for the registered-but-idle ioeventfds

Log = Callable[[str], None]


class ScaleError(RuntimeError):
    """A point could not be measured (its process failed, the guest did not boot)."""

    def __init__(self, kind: str, msg: str) -> None:
        super().__init__(msg)
        self.kind = kind


def scale_plan(quick: bool) -> dict:
    """The ladders: full, or reduced for a smoke run (a few seconds)."""
    if quick:
        return {"queues": [1, 4, 16], "vectors": [2, 8, 16], "vmm_vectors": [1, 8, 64],
                "kick_rounds": 2, "kick_per": 100, "samples": 5, "msix_vfio": False, "repeats": 1}
    return {"queues": [1, 4, 16, 64, 256, 1024], "vectors": [2, 8, 64, 128], "vmm_vectors": [1, 8, 64, 512, 2048],
            "kick_rounds": 10, "kick_per": 300, "samples": 20, "msix_vfio": True, "repeats": 3}


def scale_job(quick: bool) -> dict[str, object]:
    pl = scale_plan(quick)
    return {"queues": ",".join(map(str, pl["queues"])), "vectors": ",".join(map(str, pl["vectors"])),
            "vmm-vectors": ",".join(map(str, pl["vmm_vectors"])), "ioeventfds": f"1,{KICK_TABLE}",
            "kick-samples": pl["kick_rounds"] * pl["kick_per"], "samples-per-point": pl["samples"],
            "repeats": pl["repeats"]}


# -- one machine point, in its own process ------------------------------------------------------------------
def _rss_kb(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def _blk_toml(queues: int, msix: bool = True, ioeventfd: bool = True) -> str:
    return f"""
[machine]
ram = "64M"
vcpus = 2
guest = "process"
[[device]]
type = "virtio-blk"
id = "blk0"
size = "1M"
queues = {queues}
msix = {str(msix).lower()}
ioeventfd = {str(ioeventfd).lower()}
"""


def _point(spec: dict) -> dict:
    """Measure one point (see the module's docstring); runs in a fresh process."""
    from .machine import Machine, parse_config

    kind = spec["kind"]
    if kind == "vfio-msix":
        return _vfio_msix_point(spec)
    n = int(spec["n"])
    queues = n if kind == "queues" else max(1, n - 1) if kind == "vectors" else 1
    pin_process(os.getpid(), VMM_CPU)
    rss0 = _rss_kb(os.getpid())
    t0 = time.perf_counter()
    m = Machine(parse_config(_blk_toml(queues), "<bench scale>"))
    try:
        m.start(msix=kind != "queues")
        setup_s = time.perf_counter() - t0
        if m.guest_pid:
            pin_process(m.guest_pid, GUEST_CPU)
        out: dict[str, Any] = {"kind": kind, "n": n, "queues": queues, "setup-s": setup_s,
                               "vmm-rss-kb": _rss_kb(os.getpid()), "vmm-rss-before-kb": rss0,
                               "guest-rss-kb": _rss_kb(m.guest_pid) if m.guest_pid else 0,
                               "gsi-routing-commits": m.vm.ioctl_counts.get("SET_GSI_ROUTING", 0),
                               "irqfds": m.vm.ioctl_counts.get("IRQFD", 0),
                               "ioeventfds": m.vm.ioctl_counts.get("IOEVENTFD", 0),
                               "msix-table": m.device("blk0").msix_vectors}
        if kind == "queues":
            out.update(_qmp_costs(m, spec))
        elif kind == "vmm-vectors":
            out.update(_vmm_vectors(m, n, bool(spec.get("per-vector-commit"))))
        return out
    finally:
        m.stop()


def _qmp_costs(m: Any, spec: dict) -> dict:
    """diagnose's full sample and x-query-pci-msix, timed over QMP (a client in this process)."""
    from .diagnose.sample import Sampler
    from .monitor.client import QMPClient

    d = tempfile.mkdtemp(prefix="kcs")
    try:
        path = os.path.join(d, "m.qmp")
        m.start_monitor(path)
        with QMPClient(path, timeout=60).connect() as c:
            s = Sampler(c)
            s.sample()  # warm-up
            k = int(spec.get("samples", 5))
            t = time.perf_counter()
            for _ in range(k):
                s.sample()
            sample_s = (time.perf_counter() - t) / k
            c.execute("x-query-pci-msix", {"dev": "blk0"})
            t = time.perf_counter()
            for _ in range(k):
                c.execute("x-query-pci-msix", {"dev": "blk0"})
            msix_s = (time.perf_counter() - t) / k
        return {"sample-s": sample_s, "msix-query-s": msix_s}
    finally:
        shutil.rmtree(d, ignore_errors=True)


def _vmm_vectors(m: Any, n: int, per_vector_commit: bool) -> dict:
    """Set up *n* MSI vectors in the VMM of booted machine *m* as a device does: a route each
    (committed once for the batch, or after each one), then an irqfd each; then tear them down."""
    from .hv.routing import msi_address
    from .notify import EventNotifier

    routes, vm = m.routes, m.vm
    c0 = vm.ioctl_counts.get("SET_GSI_ROUTING", 0)
    rss0 = _rss_kb(os.getpid())
    grss0 = _rss_kb(m.guest_pid) if m.guest_pid else 0
    notes = [EventNotifier(f"scale.v{i}") for i in range(n)]
    t = time.perf_counter()
    gsis = []
    for _i in range(n):
        gsis.append(routes.add(msi_address(0), 0x40))
        if per_vector_commit:
            routes.commit()
    if not per_vector_commit:
        routes.commit()
    for note, gsi in zip(notes, gsis, strict=True):
        vm.irqfd(note, gsi)
    setup_s = time.perf_counter() - t
    out = {"vectors-setup-s": setup_s, "vectors-commits": vm.ioctl_counts.get("SET_GSI_ROUTING", 0) - c0,
           "vectors-vmm-rss-kb": _rss_kb(os.getpid()) - rss0,
           "vectors-guest-rss-kb": (_rss_kb(m.guest_pid) - grss0) if m.guest_pid else 0}
    for note, gsi in zip(notes, gsis, strict=True):
        vm.irqfd(note, gsi, deassign=True)
        routes.release(gsi)
        note.close()
    routes.commit()
    return out


def _vfio_msix_point(spec: dict) -> dict:
    """x-query-pci-msix on a vfio-user function with a 2048-entry MSI-X table."""
    from .machine import Machine, parse_config
    from .monitor.client import QMPClient

    pin_process(os.getpid(), VMM_CPU)
    d = tempfile.mkdtemp(prefix="kcs")
    env = dict(os.environ)
    env["PYTHONPATH"] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    sock = os.path.join(d, "nic.sock")
    srv = start_helper([sys.executable, "-m", "kickcall", "vfio-user-server", "--socket", sock,
                        "--qmp", os.path.join(d, "srv.qmp"), "--vectors", str(spec["n"])],
                       env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    m = None
    try:
        assert srv.stdout is not None
        line = srv.stdout.readline()
        if not line.strip().startswith("{"):
            raise ScaleError("server", "kickcall vfio-user-server did not start")
        toml = f'[machine]\nram = "64M"\nvcpus = 2\nguest = "process"\n[[device]]\ntype = "vfio-user"\n' \
               f'id = "nic0"\nsocket = "{sock}"\n'
        m = Machine(parse_config(toml, "<bench scale>"))
        m.start()
        path = os.path.join(d, "m.qmp")
        m.start_monitor(path)
        k = int(spec.get("samples", 5))
        with QMPClient(path, timeout=60).connect() as c:
            r = c.execute("x-query-pci-msix", {"dev": "nic0"})
            t = time.perf_counter()
            for _ in range(k):
                c.execute("x-query-pci-msix", {"dev": "nic0"})
            msix_s = (time.perf_counter() - t) / k
        entries = len(r.get("entries") or r.get("table") or []) if isinstance(r, dict) else 0
        return {"kind": "vfio-msix", "n": int(spec["n"]), "msix-query-s": msix_s, "entries-reported": entries}
    finally:
        if m is not None:
            m.stop()
        if srv.poll() is None:
            srv.terminate()
            try:
                srv.wait(30)
            except subprocess.TimeoutExpired:
                srv.kill()
                srv.wait()
        if srv.stdout is not None:
            srv.stdout.close()
        shutil.rmtree(d, ignore_errors=True)


def point_main() -> None:
    """Entry of a point's process: the spec as JSON in argv[1], the result as JSON on stdout."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the bench's to handle; it stops us
    logging_off()
    print(json.dumps(_point(json.loads(sys.argv[1]))), flush=True)


def logging_off() -> None:
    import logging

    logging.disable(logging.WARNING)


def run_point(spec: dict, timeout: float = 600.0) -> dict:
    """One point in a fresh process (killed if the bench is interrupted)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    p = start_helper([sys.executable, "-c", "from kickcall.bench_scale import point_main; point_main()",
                      json.dumps(spec)], env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                     stderr=subprocess.PIPE, text=True)
    try:
        out, err = p.communicate(timeout=timeout)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    if p.returncode != 0 or not out.strip():
        tail = (err or "").strip().splitlines()[-1:] or ["no message"]
        raise ScaleError("point", f"{spec['kind']} n={spec['n']}: exit {p.returncode}: {tail[0]}")
    r: dict = json.loads(out.strip().splitlines()[-1])
    return r


def _median_point(reps: list[dict]) -> dict:
    """Repeated runs of one point (each a fresh process): the median of every figure."""
    out = dict(reps[0])
    for k, v in reps[0].items():
        if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "n":
            xs = sorted(float(r[k]) for r in reps)
            med = xs[len(xs) // 2]
            out[k] = int(med) if isinstance(v, int) else med
    out["repeats"] = len(reps)
    return out


# -- kick latency with 1 vs 1024 ioeventfds --------------------------------------------------------------------
def _kick_machine(extra: int) -> tuple[Any, list]:
    from .machine import Machine, parse_config
    from .notify import EventNotifier

    m = Machine(parse_config(_blk_toml(1), "<bench scale>"))
    notes: list = []
    try:
        m.start()
        if m.guest_pid:
            pin_process(m.guest_pid, GUEST_CPU)
        for i in range(extra):
            n = EventNotifier(f"scale.ioeventfd{i}")
            notes.append(n)
            m.vm.ioeventfd(space="memory", addr=DUMMY_ADDR + 8 * i, length=4, notifier=n)
    except BaseException:
        m.stop()
        for n in notes:
            n.close()
        raise
    return m, notes


def measure_kick_scale(plan: dict, ctx: BenchRun, log: Log) -> dict:
    """The ioeventfd kick path's one-way latency with the table holding 1 and KICK_TABLE entries."""
    saved = os.sched_getaffinity(0)
    pinned = (os.cpu_count() or 1) >= 2
    if pinned:
        pin_process(os.getpid(), VMM_CPU)
    machines: list[tuple[Any, list]] = []
    try:
        log(f"kick latency: 1 vs {KICK_TABLE} registered ioeventfds ...")
        small = _kick_machine(0)
        machines.append(small)
        big = _kick_machine(KICK_TABLE - 1)
        machines.append(big)
        hs = {"1": ctx.hist("kick-1", "kick, 1 ioeventfd registered"),
              str(KICK_TABLE): ctx.hist(f"kick-{KICK_TABLE}", f"kick, {KICK_TABLE} ioeventfds registered")}
        rounds = plan["kick_rounds"]
        for r in range(rounds):
            order = [("1", small[0]), (str(KICK_TABLE), big[0])]
            if r % 2:
                order.reverse()
            text = []
            for key, m in order:
                h = LatencyHistogram().record_all(measure_kicks(m, plan["kick_per"]))
                hs[key].add(h)
                text.append(f"{key} ioeventfds p50 {h.percentile_ns(50) / 1000:.1f} us")
                ctx.record("kick", f"kick round {r + 1}/{rounds}, {key} ioeventfds: p50 "
                                   f"{h.percentile_ns(50) / 1000:.1f} us", ioeventfds=int(key), round=r + 1,
                           latency=round_summary(h))
            ctx.progress(0.9 + 0.1 * (r + 1) / rounds, 0, f"kick round {r + 1}/{rounds}: " + ", ".join(text))
    finally:
        for m, notes in machines:
            m.stop()
            for n in notes:
                n.close()
        if pinned:
            restore_affinity(saved)
    return {k: latency_summary(h) for k, h in hs.items()}


# -- verdicts -----------------------------------------------------------------------------------------------
def verdict(xs: list[float], ys: list[float], unit: str, why_not: str = "") -> dict:
    """Linear or better, or not: the cost per unit at the low end of the ladder (from the first
    point to the one before the last) against the high end (the last segment).  Fixed costs are
    taken out by using differences; growth under FLAT_SHARE of the first point's value is flat."""
    if len(xs) < 2:
        return {"verdict": "one point", "per-unit-low": None, "per-unit-high": None, "ratio": None}
    growth = ys[-1] - ys[0]
    if ys[0] > 0 and growth <= FLAT_SHARE * ys[0]:
        return {"verdict": "flat (linear or better)", "per-unit-low": None, "per-unit-high": None,
                "ratio": ys[-1] / ys[0], "note": f"grows {100 * growth / ys[0]:.0f}% over the ladder"}
    if len(xs) == 2:
        hi = (ys[1] - ys[0]) / (xs[1] - xs[0])
        return {"verdict": "grows", "per-unit-low": None, "per-unit-high": hi, "ratio": ys[-1] / ys[0] if ys[0] else None,
                "note": why_not}
    lo = (ys[-2] - ys[0]) / (xs[-2] - xs[0])
    hi = (ys[-1] - ys[-2]) / (xs[-1] - xs[-2])
    if lo <= 0:  # no measurable growth at the low end: judge by the exponent of the last step
        e = math.log(max(ys[-1], 1e-12) / max(ys[-2], 1e-12)) / math.log(xs[-1] / xs[-2])
        ok = e <= 1.0 + math.log(LINEAR_FACTOR) / math.log(xs[-1] / xs[-2])
        return {"verdict": "linear or better" if ok else "superlinear", "per-unit-low": lo, "per-unit-high": hi,
                "ratio": None, "exponent": e, "unit": unit, **({} if ok else {"note": why_not})}
    ratio = hi / lo
    ok = ratio <= LINEAR_FACTOR
    out = {"verdict": "linear or better" if ok else "superlinear", "per-unit-low": lo, "per-unit-high": hi,
           "ratio": ratio, "unit": unit}
    if not ok:
        out["note"] = why_not
    return out


def _curve(name: str, label: str, x_name: str, points: list[dict], y: str, unit: str, scale: float = 1.0,
           why_not: str = "") -> dict:
    xs = [float(p["n"]) for p in points]
    ys = [float(p[y]) * scale for p in points]
    return {"name": name, "label": label, "x": x_name, "unit": unit,
            "points": [{"n": p["n"], "value": v} for p, v in zip(points, ys, strict=True)],
            **verdict(xs, ys, unit, why_not)}


QUADRATIC_WHY = ("each KVM_SET_GSI_ROUTING sends the whole table (every route so far), so committing after each "
                 "of n vectors sends 1 + 2 + ... + n routes: O(n^2). virtio-pci now commits a device's routes once "
                 "(the batched row)")


def run_scale(quick: bool = False, log: Log = print, ctx: BenchRun | None = None) -> dict:
    ctx = ctx if ctx is not None else BenchRun("scale", {}, tty=False)
    plan = scale_plan(quick)
    out: dict[str, Any] = {"machine": machine_description(), "quick": quick, "linear-factor": LINEAR_FACTOR,
                           "repeats": plan["repeats"],
                           "pinned": (os.cpu_count() or 1) >= 2, "points": {}}
    specs: list[dict] = []
    specs += [{"kind": "queues", "n": n, "samples": plan["samples"]} for n in plan["queues"]]
    specs += [{"kind": "vectors", "n": n} for n in plan["vectors"]]
    specs += [{"kind": "vmm-vectors", "n": n} for n in plan["vmm_vectors"]]
    specs += [{"kind": "vmm-vectors", "n": n, "per-vector-commit": True} for n in plan["vmm_vectors"]]
    if plan["msix_vfio"]:
        specs.append({"kind": "vfio-msix", "n": 2048, "samples": plan["samples"]})
    t0 = time.monotonic()
    for i, spec in enumerate(specs):
        key = spec["kind"] + ("-per-vector-commit" if spec.get("per-vector-commit") else "")
        log(f"{key}: n={spec['n']} ...")
        left = (time.monotonic() - t0) / i * (len(specs) - i) if i else 0.0
        ctx.progress(0.9 * i / len(specs), left, f"{key} n={spec['n']}")
        reps = [run_point(spec) for _ in range(plan["repeats"])]
        r = _median_point(reps)
        out["points"].setdefault(key, []).append(r)
        ctx.record("point", f"{key} n={spec['n']}: " + ", ".join(
            f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in r.items() if k not in ("kind", "n")),
            **{"curve": key, **{k: v for k, v in r.items() if k != "kind"}})
    out["kick"] = measure_kick_scale(plan, ctx, log)
    P = out["points"]
    curves = [
        _curve("queues-setup", "machine setup (Machine() to booted guest), virtio-blk, INTx", "queues",
               P["queues"], "setup-s", "ms", 1000.0),
        _curve("queues-vmm-rss", "VMM resident memory, booted", "queues", P["queues"], "vmm-rss-kb", "KiB"),
        _curve("queues-guest-rss", "guest process resident memory, booted", "queues", P["queues"], "guest-rss-kb",
               "KiB"),
        _curve("vectors-setup", "machine setup, virtio-blk with a vector per queue, guest on MSI-X",
               "MSI-X vectors", P["vectors"], "setup-s", "ms", 1000.0),
        _curve("vectors-vmm-rss", "VMM resident memory, MSI-X per queue", "MSI-X vectors", P["vectors"],
               "vmm-rss-kb", "KiB"),
        _curve("vectors-guest-rss", "guest process resident memory, MSI-X per queue", "MSI-X vectors",
               P["vectors"], "guest-rss-kb", "KiB"),
        _curve("vmm-vectors-batched", "n vectors set up in the VMM: routes committed once, an irqfd each",
               "MSI vectors", P["vmm-vectors"], "vectors-setup-s", "ms", 1000.0),
        _curve("vmm-vectors-per-vector-commit", "n vectors set up in the VMM: a commit after each route "
               "(virtio-pci before this change)", "MSI vectors", P["vmm-vectors-per-vector-commit"],
               "vectors-setup-s", "ms", 1000.0, why_not=QUADRATIC_WHY),
        _curve("diagnose-sample", "diagnose: one full sample over QMP", "queues", P["queues"], "sample-s", "ms",
               1000.0),
        _curve("msix-query", "QMP x-query-pci-msix (virtio-blk, table of queues + 1)", "MSI-X table entries",
               [{**p, "n": p["msix-table"]} for p in P["queues"]], "msix-query-s", "ms", 1000.0),
    ]
    k = out["kick"]
    kxs = [1.0, float(KICK_TABLE)]
    kys = [k["1"]["p50_us"], k[str(KICK_TABLE)]["p50_us"]]
    curves.append({"name": "kick-latency", "label": "kick one-way latency p50 (ioeventfd path)",
                   "x": "ioeventfds registered", "unit": "µs",
                   "points": [{"n": int(x), "value": y} for x, y in zip(kxs, kys, strict=True)],
                   **verdict(kxs, kys, "µs", why_not="")})
    out["curves"] = curves
    out["commits"] = {str(p["n"]): p["gsi-routing-commits"] for p in P["vectors"]}
    if "vfio-msix" in P:
        out["vfio-msix"] = P["vfio-msix"][0]
    return out


# -- reports --------------------------------------------------------------------------------------------------
def _fmt(v: float) -> str:
    return f"{v:.3g}" if abs(v) < 100 else f"{v:.0f}"


def render_scale(r: dict) -> str:
    """Text for a terminal: each curve's points and its verdict."""
    lines = [f"kickcall bench scale ({'quick' if r['quick'] else 'full'} ladder)"]
    for c in r["curves"]:
        lines.append(f"{c['label']} [{c['unit']}] by {c['x']}:")
        lines.append("    " + "  ".join(f"{p['n']}: {_fmt(p['value'])}" for p in c["points"]))
        lines.append(f"    verdict: {_verdict_text(c)}")
    if "vfio-msix" in r:
        v = r["vfio-msix"]
        lines.append(f"x-query-pci-msix on a vfio-user function with {v['n']} vectors: "
                     f"{1000 * v['msix-query-s']:.1f} ms")
    return "\n".join(lines) + "\n"


def _verdict_text(c: dict) -> str:
    parts = [c["verdict"]]
    if c.get("per-unit-low") is not None and c.get("per-unit-high") is not None:
        parts.append(f"per unit {_fmt(c['per-unit-low'])} {c['unit']} at the low end, "
                     f"{_fmt(c['per-unit-high'])} {c['unit']} at the high end")
    if c.get("ratio") is not None:
        parts.append(f"ratio {c['ratio']:.2f}x")
    if c.get("note"):
        parts.append(c["note"])
    return "; ".join(parts)


def render_scale_markdown(r: dict) -> str:
    md = r["machine"]
    P = r["points"]
    lines = [
        SCALE_BLOCK_START,
        "## `kickcall bench scale`",
        "",
        f"Machine: {md['cpu']}, {md['cores']} cores, Linux {md['kernel']}, Python {md['python']}; measured "
        f"{md['date']} in one run of `kickcall bench scale`{' --quick' if r['quick'] else ''}. Every machine point "
        f"is the median of {r['repeats']} runs, each a fresh VMM process with its guest process (guest on CPU 0, VMM "
        "on CPU 1), 64 MiB RAM, 2 vCPUs, one virtio-blk. Setup time is `Machine()` to the booted guest (its driver at DRIVER_OK); memory is VmRSS "
        "once booted. A curve is *linear or better* when its cost per unit at the high end of the ladder (the last "
        f"step) is at most {r['linear-factor']:.0f}x its cost per unit at the low end (first point to the one before "
        "the last); growth under 10% of the first point is *flat*.",
        "",
        "Queues (virtio-blk, an ioeventfd per queue, MSI-X table of queues + 1 entries; the guest on INTx: the "
        "guest model has one CPU-vector space of 192 vectors, so 1024 queues cannot each have a vector -- vectors "
        "are the next tables):",
        "",
        "| queues | setup ms | VMM RSS MiB | guest RSS MiB | diagnose sample ms | x-query-pci-msix ms |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    for p in P["queues"]:
        lines.append(f"| {p['n']} | {1000 * p['setup-s']:.0f} | {p['vmm-rss-kb'] / 1024:.1f} | "
                     f"{p['guest-rss-kb'] / 1024:.1f} | {1000 * p['sample-s']:.1f} | {1000 * p['msix-query-s']:.2f} |")
    lines += ["", "MSI-X vectors, machine level (a vector per queue and the config vector, each routed and on an "
                  "irqfd; the guest boots on MSI-X):", "",
              "| vectors | setup ms | VMM RSS MiB | guest RSS MiB | KVM_SET_GSI_ROUTING calls |",
              "|---:|---:|---:|---:|---:|"]
    for p in P["vectors"]:
        lines.append(f"| {p['n']} | {1000 * p['setup-s']:.0f} | {p['vmm-rss-kb'] / 1024:.1f} | "
                     f"{p['guest-rss-kb'] / 1024:.1f} | {p['gsi-routing-commits']} |")
    lines += ["", "MSI vectors set up in the VMM of a booted machine (a route each, an irqfd each), up to 2048: "
                  "committed once for the batch (virtio-pci now) and after each route (virtio-pci before):", "",
              "| vectors | batched ms | batched SET_GSI_ROUTING | VMM RSS +KiB | per-vector commit ms | "
              "per-vector SET_GSI_ROUTING |", "|---:|---:|---:|---:|---:|---:|"]
    for a, b in zip(P["vmm-vectors"], P["vmm-vectors-per-vector-commit"], strict=True):
        lines.append(f"| {a['n']} | {1000 * a['vectors-setup-s']:.1f} | {a['vectors-commits']} | "
                     f"{a['vectors-vmm-rss-kb']} | {1000 * b['vectors-setup-s']:.1f} | {b['vectors-commits']} |")
    k = r["kick"]
    lines += ["", "Kick latency (guest doorbell -> ioeventfd -> device handler, one-way, CLOCK_MONOTONIC), two "
                  "machines measured in alternating rounds, one with only its queue's ioeventfd, one with "
                  f"{KICK_TABLE - 1} more registered (the table full):", "",
              "| ioeventfds registered | samples | p50 µs | p99 µs | mean µs |", "|---:|---:|---:|---:|---:|"]
    for key in ("1", str(KICK_TABLE)):
        s = k[key]
        lines.append(f"| {key} | {s['n']} | {s['p50_us']:.1f} | {s['p99_us']:.1f} | {s['mean_us']:.1f} |")
    if "vfio-msix" in r:
        v = r["vfio-msix"]
        big = P["queues"][-1]
        lines += ["", f"x-query-pci-msix on a `kickcall vfio-user-server` function with a {v['n']}-entry MSI-X "
                      f"table: **{1000 * v['msix-query-s']:.1f} ms** per query, "
                      f"{1e6 * v['msix-query-s'] / v['n']:.1f} µs per entry (virtio-blk's table of "
                      f"{big['msix-table']} entries above: {1e6 * big['msix-query-s'] / big['msix-table']:.1f} µs "
                      "per entry; a vfio-user function's reply also carries the host's view of every vector, "
                      "so the two are not one curve)."]
    lines += ["", "Verdicts:", "", "| curve | by | verdict |", "|---|---|---|"]
    for c in r["curves"]:
        lines.append(f"| {c['label']} ({c['unit']}) | {c['x']} | {_verdict_text(c)} |")
    lines.append(SCALE_BLOCK_END)
    return "\n".join(lines) + "\n"


def scale_main(a: Any, ctx: BenchRun) -> int:
    """``kickcall bench scale``'s run and its output (called by ``bench_main``)."""
    from .bench import write_block
    from .counters import kebab_tree

    r = run_scale(quick=a.quick, log=ctx.note, ctx=ctx)
    ctx.close()
    if a.json:
        r["job"] = ctx.params
        r["interrupted"] = False
        print(json.dumps(kebab_tree(r), indent=1))
    else:
        print(render_scale(r).rstrip("\n"))
        if any(h.n for _l, h in ctx.hists.values()):
            print()
            print("\n".join(ctx.latency_text()))
    if a.write:
        write_block(a.write, render_scale_markdown(r), SCALE_BLOCK_START, SCALE_BLOCK_END)
        print(f"updated {a.write}", file=sys.stderr, flush=True)
    return 0
