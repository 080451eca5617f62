"""``kickcall bench vfio``: a passthrough function's interrupts, measured in one run.

Three processes, as a vfio-user deployment has them: the host function (``kickcall
vfio-user-server``, kickcall-nic behind vfio-pci's rules), the VMM (this process: a kickcall machine
with a ``type = "vfio-user"`` device), and the guest (``guest = "process"``) with kickcall-nic's
driver.  What is measured, all in the same run:

* **throughput**: the guest's queues brought up (``nic-request-irq``: MSI-X entry *q* per queue q,
  each an irqfd), N records asked for per queue with one DOORBELL write each; the device writes
  them by DMA in batches of at most ``NicFunction.BATCH`` records and raises the queue's vector
  once per batch; the guest's handler consumes them.  Reported: records/s and interrupts/s, both
  counted by the guest (records consumed, handler invocations per entry), and the device's
  batches raised and MSI-X messages sent (an eventfd coalesces signals the guest has not taken
  yet, so the guest may count fewer interrupts than the device sent, never more);
* **latency**, one-way, CLOCK_MONOTONIC taken in this process just before the notification
  starts and in the guest's handler when it arrives (``nic-bench-irq-start``: a stamping handler
  placed first on the queue's irq, the acknowledgement placed last), rounds never overlapping:

  - floor: ``bench notify``'s eventfd between two processes (``measure_floor``);
  - irqfd: the VMM writes the vector's irqfd-bound eventfd (``VFIOMSIVector.kvm_interrupt``, the
    eventfd the server was given by SET_IRQS) -> irqfd -> MSI route -> guest handler: what the
    host's interrupt costs once it is signalled (``bench notify``'s call path, on this device);
  - host function: the VMM writes DOORBELL=1 (a vfio-user REGION_WRITE to the server) -> the
    device's engine writes one record by DMA and raises the vector -> host MSI-X -> the eventfd
    the VMM passed -> irqfd -> guest handler.  The difference to the irqfd row is the server's
    share (the vfio-user message, the engine's wake-up, the DMA, vfio-pci's signal);

* **growth** of the vector set while queues run at a rate: the dynamic path (QEMU 8.2, Linux 6.5:
  SET_IRQS start=v count=1 per new vector) from the queues' 4 vectors to 2048 with ``nic-bring-up``
  (entries brought up one at a time on a shared irq), and the NORESIZE path (host without dynamic
  MSI-X: disable the index, re-enable it with v+1 eventfds in one SET_IRQS) as far as one message
  can carry the fds (the server's ``max_msg_fds``, at most 253), with the attempt past it, which
  stops the VM with ``X_VFIO_IRQ_FATAL`` -- where and why are reported.  For each: time, SET_IRQS
  calls (the VMM's count by kind, the host's by kind from the server's ``x-query-vfio``), the host
  MSI-X disables, and what the active queues lost: once traffic stops and the device is idle, a
  record the device wrote and the guest did not consume within ``LOST_AFTER`` seconds is lost;
  interrupts raised while host MSI-X was off (to INTx, or dropped with DisINTx set) are counted
  from the server.  The server's ``fire-in-msix-disable-window`` fault is off: the NORESIZE loss
  reported is the natural one.

Placement as ``bench notify``: the guest's vCPUs on CPU 0; the VMM and the server on CPU 1.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import shutil
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from typing import Any, Callable

from .bench import (GUEST_CPU, STAMP_GPA, VMM_CPU, BenchRun, figure_lines, latency_summary, machine_description,
                    measure_floor, p50_us, pin_process, restore_affinity, round_summary)
from .child import start_helper
from .drive.latency import LatencyHistogram

__all__ = ["run_vfio", "render_vfio", "render_vfio_markdown", "vfio_plan", "VFIO_BLOCK_START", "VFIO_BLOCK_END"]

VFIO_BLOCK_START = "<!-- bench vfio: begin -->"
VFIO_BLOCK_END = "<!-- bench vfio: end -->"

DEV = "nic0"  # the machine's device id and the server's
QUEUES = 4
LOST_AFTER = 2.0  # seconds an idle device's record may stay unconsumed before it counts as lost
MAX_VECTORS = 2048

Log = Callable[[str], None]


class BenchError(RuntimeError):
    """The bench could not take a measurement (a process did not start, the guest stalled)."""

    def __init__(self, kind: str, msg: str) -> None:
        super().__init__(msg)
        self.kind = kind


# -- the three processes ------------------------------------------------------------------------------
class _Rig:
    """A ``kickcall vfio-user-server`` process and a machine (guest process) with its device,
    kickcall-nic's queues brought up on MSI-X entries 0..3."""

    def __init__(self, workdir: str, name: str, server_args: list[str]) -> None:
        self.workdir = workdir
        self.sock = os.path.join(workdir, f"{name}.sock")
        self.qmp = os.path.join(workdir, f"{name}.qmp")
        self.server_args = server_args
        self.server: subprocess.Popen | None = None
        self.m: Any = None
        self.slot = -1
        self._errlog = os.path.join(workdir, f"{name}.err")

    def start(self) -> "_Rig":
        env = dict(os.environ)
        env["PYTHONPATH"] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        with open(self._errlog, "w") as err:
            self.server = start_helper([sys.executable, "-m", "kickcall", "vfio-user-server", "--socket", self.sock,
                                        "--qmp", self.qmp, *self.server_args],
                                       env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=err,
                                       text=True)
        assert self.server.stdout is not None
        line = self.server.stdout.readline()  # {"ready": true, ...} once both sockets listen
        try:
            ready = json.loads(line).get("ready") is True
        except ValueError:
            ready = False
        if not ready:
            raise BenchError("server", f"kickcall vfio-user-server did not start: {self._server_err()}")
        pin_process(self.server.pid, VMM_CPU)
        from .machine import Machine, parse_config

        toml = f"""
[machine]
ram = "64M"
vcpus = 2
guest = "process"
[[device]]
type = "vfio-user"
id = "{DEV}"
socket = "{self.sock}"
"""
        self.m = Machine(parse_config(toml, "<bench vfio>"))
        self.m.start()
        if self.m.guest_pid:
            pin_process(self.m.guest_pid, GUEST_CPU)
        self.slot = self.dev.devfn >> 3
        for q in range(QUEUES):
            self.cmd("nic-request-irq", queue=q)
        return self

    def _server_err(self) -> str:
        try:
            with open(self._errlog) as f:
                return f.read()[-2000:].strip() or "no message"
        except OSError:
            return "no message"

    @property
    def dev(self) -> Any:
        return self.m.passthrough[DEV]

    def cmd(self, name: str, timeout: float = 120.0, **kw: Any) -> dict:
        return self.m.guest_cmd({"cmd": name, "slot": self.slot, **kw}, timeout=timeout)

    def stats(self) -> dict:
        return self.cmd("nic-stats")

    def host(self) -> dict:
        """The server's ``x-query-vfio``: the host's view and the function's (``nic``)."""
        from .monitor.client import QMPClient

        with QMPClient(self.qmp, timeout=30).connect() as c:
            r: dict = c.execute("x-query-vfio", {"dev": DEV})
            return r

    def stop(self) -> None:
        try:
            if self.m is not None:
                self.m.stop()
        finally:
            p = self.server
            if p is not None and p.poll() is None:
                p.terminate()
                try:
                    p.wait(30)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()
            if p is not None and p.stdout is not None:
                p.stdout.close()


def _wait(cond: Callable[[], bool], what: str, ceiling: float = 120.0, step: float = 0.005) -> None:
    deadline = time.monotonic() + ceiling
    while not cond():
        if time.monotonic() > deadline:
            raise BenchError("stall", f"timed out after {ceiling:.0f} s waiting for {what}")
        time.sleep(step)


def _guest_records(st: dict, queues: range = range(QUEUES)) -> int:
    return sum(st["queues"][q]["records"] for q in queues)


def _guest_interrupts(st: dict, entries: range = range(QUEUES)) -> int:
    return sum(st["interrupts"].get(str(e), 0) for e in entries)


def _device_counts(h: dict, queues: range = range(QUEUES)) -> dict:
    nic = h["nic"]
    vec = nic["msix"]["vectors"]
    qs = [nic["queues"][q] for q in queues]
    return {"written": sum(q["records-written"] for q in qs), "raised": sum(q["raised"] for q in qs),
            "to_intx": sum(q["to-intx"] for q in qs), "intx_disabled": sum(q["intx-disabled"] for q in qs),
            "sent": sum(vec[q["vector"]]["sent"] for q in qs),
            "pended": sum(vec[q["vector"]]["pended"] for q in qs),
            "delivered_on_unmask": sum(vec[q["vector"]]["delivered-on-unmask"] for q in qs),
            "lost_on_disable": sum(vec[q["vector"]]["lost-on-disable"] for q in qs),
            "backlog": sum(q["backlog"] for q in qs)}


def _diff(a: dict, b: dict) -> dict:
    return {k: b[k] - a.get(k, 0) for k in b if isinstance(b[k], int)}


# -- 1. throughput -------------------------------------------------------------------------------------
def measure_throughput(rig: _Rig, per_queue: int) -> dict:
    """*per_queue* records on each queue, one DOORBELL write each, until the guest consumed all."""
    st0, h0 = rig.stats(), _device_counts(rig.host())
    want = _guest_records(st0) + QUEUES * per_queue
    t0 = time.perf_counter()
    for q in range(QUEUES):
        rig.cmd("nic-generate", queue=q, n=per_queue)
    _wait(lambda: _guest_records(rig.stats()) >= want, "the guest to consume the records", step=0.002)
    secs = time.perf_counter() - t0
    st1, h1 = rig.stats(), _device_counts(rig.host())
    dev = _diff(h0, h1)
    irqs = _guest_interrupts(st1) - _guest_interrupts(st0)
    recs = _guest_records(st1) - _guest_records(st0)
    return {"records": recs, "seconds": secs, "interrupts": irqs,
            "empty_interrupts": sum(st1["empty-interrupts"].values()) - sum(st0["empty-interrupts"].values()),
            "device_written": dev["written"], "device_batches": dev["raised"], "device_msix_sent": dev["sent"],
            "gaps": sum(q["gaps"] for q in st1["queues"]), "intx_unexpected": st1["intx-unexpected"]}


def _merge_throughput(runs: list[dict], per_queue: int, st: dict) -> dict:
    out: dict = {"queues": QUEUES, "records_per_queue": per_queue, "passes": len(runs), "runs": runs}
    for k in ("records", "seconds", "interrupts", "empty_interrupts", "device_written", "device_batches",
              "device_msix_sent"):
        out[k] = sum(r[k] for r in runs)
    out["gaps"] = max(r["gaps"] for r in runs)
    out["intx_unexpected"] = max(r["intx_unexpected"] for r in runs)
    s = out["seconds"]
    out["records_per_s"] = out["records"] / s if s else 0.0
    out["interrupts_per_s"] = out["interrupts"] / s if s else 0.0
    out["records_per_interrupt"] = out["records"] / out["interrupts"] if out["interrupts"] else 0.0
    out["records_per_batch"] = out["device_written"] / out["device_batches"] if out["device_batches"] else 0.0
    out["guest_interrupts_by_entry"] = {e: st["interrupts"].get(str(e), 0) for e in range(QUEUES)}
    return out


# -- 2. latency ----------------------------------------------------------------------------------------
def _timed_rounds(rig: _Rig, n: int, fire: Callable[[], None], spin: bool) -> list[int]:
    """*n* notifications on queue 0's vector, each after the previous one was fully handled.  The
    VMM waits for the acknowledgement spinning (*spin*, as ``bench notify``'s call path does) or
    polling with 20 µs sleeps (its CPU idle between rounds, free for the server on the same CPU)."""
    m = rig.m
    st = m.memory.view(STAMP_GPA, 16).cast("Q")
    st[1] = 0
    rig.cmd("nic-bench-irq-start", queue=0, stamp_gpa=STAMP_GPA)
    try:
        for _ in range(n):
            ack = st[1]
            st[0] = time.monotonic_ns()
            fire()
            deadline = time.monotonic() + 10
            while st[1] == ack:
                if not spin:
                    time.sleep(0.00002)
                if time.monotonic() > deadline:
                    raise BenchError("stall", "the guest did not take the interrupt")
    finally:
        st.release()
        lat: list[int] = rig.m.guest_cmd({"cmd": "nic-bench-irq-stop"})["latencies_ns"]
    return lat


def measure_irqfd(rig: _Rig, n: int, spin: bool = True) -> list[int]:
    """The VMM writes queue 0's irqfd-bound eventfd (what the server signals) -> guest handler."""
    vec = rig.dev.vectors[0]
    note = vec.kvm_interrupt
    if note is None:
        raise BenchError("irqfd", f"{DEV}: MSI-X vector 0 is not on an irqfd (trigger {vec.trigger})")
    return _timed_rounds(rig, n, note.set, spin)


def measure_server_raise(rig: _Rig, n: int) -> list[int]:
    """The VMM writes DOORBELL=1 to the server (REGION_WRITE) -> one record by DMA and the vector
    raised -> host MSI-X -> eventfd -> irqfd -> guest handler."""
    from .vfio import nic as N

    off = N.QUEUE_BASE + N.Q_DOORBELL  # queue 0
    one = struct.pack("<I", 1)
    client = rig.dev.client

    def fire() -> None:
        client.region_write(0, off, one)

    before = _guest_records(rig.stats(), range(1))
    lat = _timed_rounds(rig, n, fire, spin=False)  # spinning here would take the CPU from the server
    got = _guest_records(rig.stats(), range(1)) - before
    if got != n:
        raise BenchError("records", f"{n} doorbells, {got} records consumed on queue 0")
    return lat


# -- 3. growth -----------------------------------------------------------------------------------------
def _settle(rig: _Rig, h_start: dict) -> tuple[dict, dict]:
    """Traffic stopped: wait until the device is idle (no backlog, nothing written for 0.2 s),
    then up to LOST_AFTER for the guest to consume what it wrote.  Returns (device counts, stats)."""
    last = None
    stable_since = time.monotonic()
    deadline = time.monotonic() + 60
    while True:
        h = _device_counts(rig.host())
        if (h["written"], h["backlog"]) != last:
            last, stable_since = (h["written"], h["backlog"]), time.monotonic()
        elif h["backlog"] == 0 and time.monotonic() - stable_since > 0.2:
            break
        if time.monotonic() > deadline:
            raise BenchError("stall", "the device did not go idle after its rates were set to 0")
        time.sleep(0.02)
    t_idle = time.monotonic()
    while True:
        st = rig.stats()
        if _guest_records(st) >= h["written"] or time.monotonic() - t_idle > LOST_AFTER:
            return h, st
        time.sleep(0.02)


def _steps(first: int, limit: int) -> list[int]:
    """Chunk ends (exclusive) from *first* up to *limit*: powers of two, and 253 (the NORESIZE
    ceiling) so both paths have a figure there."""
    ends = sorted({e for e in (16, 64, 128, 253, 256, 512, 1024, 2048) if first < e < limit} | {limit})
    return ends


def measure_growth(rig: _Rig, target: int, rate: int, log: Log) -> dict:
    """Bring MSI-X entries QUEUES..target-1 up one at a time while the queues run at *rate*
    records/s each; then stop the traffic and count what was lost."""
    dev = rig.dev
    q0 = dev.query_vfio()
    noresize = q0["path"] == "noresize"
    from .vfio.pci import NORESIZE_LIMIT

    limit = min(target, min(max(1, q0["max-msg-fds"]), NORESIZE_LIMIT)) if noresize else target
    h0 = rig.host()
    c0, st0 = _device_counts(h0), rig.stats()
    out: dict = {"path": q0["path"], "noresize_reason": q0["noresize-reason"], "max_msg_fds": q0["max-msg-fds"],
                 "target": target, "start_vectors": QUEUES, "rate_per_queue": rate, "active_queues": QUEUES,
                 "steps": [], "stopped": None}
    for q in range(QUEUES):
        rig.cmd("nic-generate", queue=q, n=0, rate=rate)
    t_all = time.perf_counter()
    first = QUEUES
    try:
        for end in _steps(first, limit):
            t = time.perf_counter()
            rig.cmd("nic-bring-up", first=first, count=end - first, timeout=900)
            dt = time.perf_counter() - t
            out["steps"].append({"from": first, "to": end, "seconds": dt, "ms_per_vector": 1000 * dt / (end - first),
                                 "elapsed": time.perf_counter() - t_all})
            log(f"  {q0['path']}: vectors {first}..{end - 1} up in {dt:.2f} s ({1000 * dt / (end - first):.2f} ms each)")
            first = end
        out["seconds"] = time.perf_counter() - t_all
        out["vectors_reached"] = first
        if first < target:  # the NORESIZE ceiling: one more vector, the VM stops with the reason
            out["stopped"] = _attempt_past_limit(rig, first)
            log(f"  {q0['path']}: vector {first} refused: {out['stopped']['reason']}")
    finally:
        for q in range(QUEUES):
            rig.cmd("nic-generate", queue=q, n=0, rate=0)
    c1, st1 = _settle(rig, h0)
    h1 = rig.host()
    q1 = dev.query_vfio()
    d = _diff(c0, c1)
    consumed = _guest_records(st1) - _guest_records(st0)
    unconsumed = rig.cmd("nic-unconsumed")["queues"]
    out.update({
        "set_irqs_vmm": _diff(q0["set-irqs"], q1["set-irqs"]),
        "set_irqs_messages": q1["set-irqs-messages"] - q0["set-irqs-messages"],
        "set_irqs_host": _diff(h0["host"]["set-irqs"]["by-kind"], h1["host"]["set-irqs"]["by-kind"]),
        "set_irqs_host_errors": {k: v for k, v in _diff(h0["host"]["set-irqs"]["by-result"],
                                                        h1["host"]["set-irqs"]["by-result"]).items() if k != "ok"},
        "host_msix_disables": h1["host"]["counts"].get("msix-disables", 0) - h0["host"]["counts"].get("msix-disables", 0),
        "host_vectors": len(h1["host"]["vectors"]),
        "records_written": d["written"], "records_consumed": consumed,
        "records_lost": d["written"] - consumed,
        "unconsumed_in_rings": sum(u["unconsumed"] for u in unconsumed),
        "interrupts_raised": d["raised"], "interrupts_sent": d["sent"], "interrupts_pended": d["pended"],
        "interrupts_delivered_on_unmask": d["delivered_on_unmask"],
        "interrupts_to_intx": d["to_intx"], "interrupts_dropped_intx_disabled": d["intx_disabled"],
        "interrupts_lost_on_disable": d["lost_on_disable"],
        "host_intx_unhandled": h1["host"]["intx-unhandled"] - h0["host"]["intx-unhandled"],
        "guest_intx_unexpected": st1["intx-unexpected"] - st0["intx-unexpected"],
        "guest_interrupts": _guest_interrupts(st1) - _guest_interrupts(st0),
        "gaps": sum(q["gaps"] for q in st1["queues"]),
        "fault_fire_in_msix_disable_window": _fault_state(h1),
    })
    return out


def _fault_state(h: dict) -> Any:
    for f in h["host"].get("faults", []):
        if f.get("name") == "fire-in-msix-disable-window":
            return f.get("state", f)
    return None


def _attempt_past_limit(rig: _Rig, entry: int) -> dict:
    """Bring entry *entry* up past the NORESIZE ceiling: the VMM refuses to send the SET_IRQS and
    stops the VM (``X_VFIO_IRQ_FATAL``, emitted once the vCPUs are paused); resume it so the
    guest's access completes.  The stop runs on its own thread and may land after the guest's
    command returned: the event, not the command, says when the stop is done."""
    m = rig.m
    n_events = len(m.events)

    def fatal_event() -> dict | None:
        return next((e["data"] for e in m.events[n_events:] if e["event"] == "X_VFIO_IRQ_FATAL"), None)

    with concurrent.futures.ThreadPoolExecutor(1) as ex:
        fut = ex.submit(rig.cmd, "nic-bring-up", 60.0, first=entry, count=1)
        _wait(lambda: fut.done() or fatal_event() is not None, "the vector to come up or the VM to stop", 60)
        if rig.dev.fatal is not None or fatal_event() is not None:
            _wait(lambda: fatal_event() is not None, "the fatal event", 60)
            m.resume()
        fut.result(60)
    ev = fatal_event()
    if ev is None:
        return {"vector": entry, "reason": "no stop: the vector came up", "errno": None, "error": None}
    return {"vector": ev["vector"], "errno": ev["errno"], "error": ev["error"], "reason": ev["reason"],
            "event": "X_VFIO_IRQ_FATAL", "vm_running_after_resume": bool(m.running)}


# -- the run -------------------------------------------------------------------------------------------
LAT_PATHS: tuple[tuple[str, str], ...] = (
    ("floor", "floor: eventfd between two processes"),
    ("irqfd", "irqfd: VMM writes the vector's eventfd -> guest ISR"),
    ("irqfd_vmm_idle", "irqfd, the VMM's CPU idle between rounds"),
    ("server_raise", "host function: DOORBELL -> record + MSI-X -> guest ISR"),
)


def vfio_plan(quick: bool) -> dict:
    """The vfio job's parameters (the job line echoes them)."""
    return {"rounds": 4 if quick else 20, "per": 25 if quick else 200, "per_queue": 2000 if quick else 25000,
            "tp_passes": 1 if quick else 3, "target": 256 if quick else MAX_VECTORS, "rate": 500 if quick else 1000}


def run_vfio(quick: bool = False, log: Log = print, ctx: BenchRun | None = None) -> dict:
    plan = vfio_plan(quick)
    rounds, per, per_queue = plan["rounds"], plan["per"], plan["per_queue"]
    tp_passes, target, rate = plan["tp_passes"], plan["target"], plan["rate"]
    ctx = ctx if ctx is not None else BenchRun("vfio", {}, tty=False)
    out: dict = {"machine": machine_description(), "quick": quick}
    from .ownership import temp_dir

    workdir = tempfile.mkdtemp(prefix="kcbv", dir=temp_dir())
    saved = os.sched_getaffinity(0)
    pinned = (os.cpu_count() or 1) >= 2
    if pinned:
        pin_process(os.getpid(), VMM_CPU)
    out["placement"] = (f"guest vCPUs and the floor's writer on CPU {GUEST_CPU}; the VMM (this process), the "
                        f"vfio-user server and the floor's reader on CPU {VMM_CPU}" if pinned else "unpinned (one CPU)")
    hi = str(2 * MAX_VECTORS)
    rigs: list[_Rig] = []
    try:
        log("dynamic MSI-X: server, machine, guest driver ...")
        dyn = _Rig(workdir, "dyn", ["--vectors", str(MAX_VECTORS), "--host-irqs", hi])
        rigs.append(dyn)
        dyn.start()
        log(f"throughput: {QUEUES} queues x {per_queue} records, {tp_passes} pass(es) ...")
        runs = []
        for i in range(tp_passes):
            ctx.progress(0.1 * i / tp_passes, 0.0, f"throughput, pass {i + 1}/{tp_passes}")
            x = measure_throughput(dyn, per_queue)
            runs.append(x)
            rps = x["records"] / x["seconds"] if x["seconds"] else 0.0
            ctx.record("throughput", f"throughput pass {i + 1}: {rps:.0f} records/s, {x['interrupts']} interrupts",
                       **{"pass": i + 1, "records": x["records"], "seconds": round(x["seconds"], 4),
                          "records-per-s": round(rps, 1), "interrupts": x["interrupts"],
                          "device-batches": x["device_batches"], "gaps": x["gaps"]})
        out["throughput"] = _merge_throughput(runs, per_queue, dyn.stats())
        log(f"latency: {rounds} rounds x {per}: floor, irqfd (VMM spinning, VMM idle), host function ...")
        hists = {key: ctx.hist(key, label) for key, label in LAT_PATHS}
        per_round: list[dict] = []
        t_lat = time.monotonic()
        for r in range(rounds):
            steps = [lambda: measure_floor(per), lambda: measure_irqfd(dyn, per, spin=True),
                     lambda: measure_irqfd(dyn, per, spin=False), lambda: measure_server_raise(dyn, per)]
            order = [0, 1, 2, 3] if r % 2 == 0 else [3, 2, 1, 0]
            res = {i: LatencyHistogram().record_all(steps[i]()) for i in order}
            rh = {key: res[i] for i, (key, _label) in enumerate(LAT_PATHS)}
            for key, h in rh.items():
                hists[key].add(h)
            fp = p50_us(res[0])
            pr = {"floor_p50_us": fp, "irqfd_over_floor": p50_us(res[1]) / fp if fp else None,
                  "irqfd_idle_over_floor": p50_us(res[2]) / fp if fp else None,
                  "server_over_floor": p50_us(res[3]) / fp if fp else None}
            per_round.append(pr)
            ctx.record("round", f"round {r + 1}/{rounds}: p50 floor {fp:.1f} us, irqfd {p50_us(res[1]):.1f} us, "
                                f"irqfd (VMM idle) {p50_us(res[2]):.1f} us, host function {p50_us(res[3]):.1f} us",
                       round=r + 1, rounds=rounds, paths={k.replace("_", "-"): round_summary(h) for k, h in rh.items()},
                       **{k.replace("_", "-"): (round(v, 4) if v is not None else None) for k, v in pr.items()})
            each = (time.monotonic() - t_lat) / (r + 1)
            ctx.progress(0.1 + 0.4 * (r + 1) / rounds, each * (rounds - r - 1),
                         f"latency round {r + 1}/{rounds}: floor p50 {fp:.1f} us")
        lat: dict = {"rounds": rounds, "iterations": per * rounds,
                     **{key: latency_summary(h) for key, h in hists.items()}, "per_round": per_round}
        f = lat["floor"]["p50_us"]
        lat["ratios"] = {"irqfd_over_floor_p50": lat["irqfd"]["p50_us"] / f if f else None,
                         "irqfd_vmm_idle_over_floor_p50": lat["irqfd_vmm_idle"]["p50_us"] / f if f else None,
                         "server_raise_over_floor_p50": lat["server_raise"]["p50_us"] / f if f else None,
                         # like for like: both with the VMM's CPU idle between rounds
                         "server_share_p50_us": lat["server_raise"]["p50_us"] - lat["irqfd_vmm_idle"]["p50_us"]}
        for k in ("irqfd_over_floor", "irqfd_idle_over_floor", "server_over_floor"):
            xs: list[float] = sorted(float(x[k]) for x in per_round if x[k] is not None)
            if xs:
                lat["ratios"][k + "_per_round"] = {"min": xs[0], "median": statistics.median(xs), "max": xs[-1]}
        out["latency"] = lat
        log(f"growth, dynamic path: {QUEUES} -> {target} vectors, queues at {rate} records/s each ...")
        ctx.progress(0.5, 0.0, "growth, dynamic path")
        out["growth"] = {"dynamic": measure_growth(dyn, target, rate, log)}
        dyn.stop()
        rigs.remove(dyn)
        log("growth, NORESIZE path (server --no-dynamic-msix --max-msg-fds 253) ...")
        ctx.progress(0.75, 0.0, "growth, NORESIZE path")
        old = _Rig(workdir, "old", ["--vectors", str(MAX_VECTORS), "--host-irqs", hi, "--no-dynamic-msix",
                                    "--max-msg-fds", "253"])
        rigs.append(old)
        old.start()
        out["growth"]["noresize"] = measure_growth(old, target, rate, log)
    finally:
        for rig in rigs:
            rig.stop()
        if pinned:
            restore_affinity(saved)
        shutil.rmtree(workdir, ignore_errors=True)
    return out


# -- output --------------------------------------------------------------------------------------------
def _at(g: dict, vectors: int) -> float | None:
    """Seconds from the start of growth until *vectors* vectors were up (a step boundary)."""
    for s in g["steps"]:
        if s["to"] == vectors:
            return float(s["elapsed"])
    return None


def _growth_rows(g: dict) -> list[tuple[str, str]]:
    vm = g["set_irqs_vmm"]
    stop = g["stopped"]
    return [
        ("vectors", f"{g['start_vectors']} -> {g['vectors_reached']}" + (f" (target {g['target']})"
                                                                         if g["vectors_reached"] < g["target"] else "")),
        ("stopped at", "-" if stop is None else f"vector {stop['vector']}: {stop['error']} ({stop['reason']})"),
        ("time", f"{g['seconds']:.2f} s ({1000 * g['seconds'] / max(1, g['vectors_reached'] - g['start_vectors']):.2f} "
                 "ms per vector)"),
        ("SET_IRQS, VMM", ", ".join(f"{k} {v}" for k, v in vm.items() if v) + f"; {g['set_irqs_messages']} messages"),
        ("SET_IRQS, host", ", ".join(f"{k} {v}" for k, v in g["set_irqs_host"].items() if v)
         + (f"; refused {g['set_irqs_host_errors']}" if g["set_irqs_host_errors"] else "")),
        ("host MSI-X disables", str(g["host_msix_disables"])),
        ("records written / consumed / lost", f"{g['records_written']} / {g['records_consumed']} / {g['records_lost']}"),
        ("interrupts raised / with host MSI-X off", f"{g['interrupts_raised']} / {g['interrupts_to_intx']}"
         + (f" ({g['interrupts_dropped_intx_disabled']} with DisINTx)" if g["interrupts_dropped_intx_disabled"] else "")),
        ("host: INTx with no trigger (unhandled)", str(g["host_intx_unhandled"])),
        ("guest: unexpected INTx", str(g["guest_intx_unexpected"])),
    ]


def render_vfio(r: dict) -> str:
    """The human table for stdout (plain text)."""
    md = r["machine"]
    t = r["throughput"]
    lat = r["latency"]
    ra = lat["ratios"]
    lines = [f"kickcall bench vfio{' (quick)' if r['quick'] else ''}: {md['cpu']}, {md['cores']} cores, "
             f"Linux {md['kernel']}, Python {md['python']}, {md['date']}",
             f"placement: {r['placement']}", "",
             f"throughput, {t['queues']} queues x {t['records_per_queue']} records, {t['passes']} pass(es):",
             f"  records/s {t['records_per_s']:12.0f}   ({t['records']} records in {t['seconds']:.2f} s, gaps {t['gaps']})",
             f"  interrupts/s {t['interrupts_per_s']:9.0f}   (guest handler: {t['interrupts']}, "
             f"{t['records_per_interrupt']:.1f} records each; empty {t['empty_interrupts']})",
             f"  device: {t['device_batches']} batches raised ({t['records_per_batch']:.1f} records each), "
             f"{t['device_msix_sent']} MSI-X messages sent", "",
             f"one-way latency, {lat['iterations']} samples per path in {lat['rounds']} rounds:",
             f"  {'path':58s} {'p50 us':>8s} {'p99 us':>8s} {'mean us':>8s} {'/floor':>7s}"]
    f = lat["floor"]["p50_us"]
    for name, key in (("floor: eventfd between two processes (bench notify)", "floor"),
                      ("irqfd: VMM writes the vector's eventfd -> guest ISR", "irqfd"),
                      ("  the same, the VMM's CPU idle between rounds", "irqfd_vmm_idle"),
                      ("host function: DOORBELL -> record + MSI-X -> guest ISR", "server_raise")):
        s = lat[key]
        lines.append(f"  {name:58s} {s['p50_us']:8.1f} {s['p99_us']:8.1f} {s['mean_us']:8.1f} "
                     f"{s['p50_us'] / f if f else 0:6.2f}x")
    lines.append(f"  the server's share (host function - irqfd with the VMM idle, p50): {ra['server_share_p50_us']:.1f} us")
    lines.append("")
    gd, gn = r["growth"]["dynamic"], r["growth"]["noresize"]
    lines.append(f"growth while {gd['active_queues']} queues run at {gd['rate_per_queue']} records/s each:")
    lines.append(f"  {'':40s} {'dynamic':>30s}   {'NORESIZE':>30s}")
    for (k, a), (_k, b) in zip(_growth_rows(gd), _growth_rows(gn), strict=True):
        lines.append(f"  {k:40s} {a:>30s}   {b}")
    cmp_at = gn["vectors_reached"]
    ta, tb = _at(gd, cmp_at), _at(gn, cmp_at)
    if ta is not None and tb is not None:
        lines.append(f"  up to {cmp_at} vectors: dynamic {ta:.2f} s, NORESIZE {tb:.2f} s ({tb / ta:.1f}x)")
    return "\n".join(lines) + "\n"


def render_vfio_markdown(r: dict, figures: dict[str, str] | None = None) -> str:
    """The BENCHMARKS.md section, between its markers; *figures*: {path key: SVG link}."""
    from .vfio.nic import NicFunction

    md = r["machine"]
    t = r["throughput"]
    lat = r["latency"]
    ra = lat["ratios"]
    f = lat["floor"]["p50_us"]
    gd, gn = r["growth"]["dynamic"], r["growth"]["noresize"]
    lines = [
        VFIO_BLOCK_START,
        "## `kickcall bench vfio`",
        "",
        f"Machine: {md['cpu']}, {md['cores']} cores, Linux {md['kernel']}, Python {md['python']}; measured "
        f"{md['date']} in one run of `kickcall bench vfio`{' --quick' if r['quick'] else ''}. Three processes: "
        "`kickcall vfio-user-server` (kickcall-nic behind vfio-pci's rules), the VMM (a kickcall machine with a "
        "`vfio-user` device), the guest (its kickcall-nic driver, each queue's MSI-X vector on an irqfd). "
        f"Placement: {r['placement']}.",
        "",
        f"Throughput: {t['queues']} queues, {t['records_per_queue']} records asked for per queue with one DOORBELL "
        f"write, {t['passes']} pass(es); the device writes at most {NicFunction.BATCH} records per batch and raises the queue's "
        "vector once per batch; records and interrupts counted by the guest's handler.",
        "",
        "| records/s | interrupts/s | records per interrupt | guest interrupts | device batches | MSI-X messages sent | empty interrupts | sequence gaps |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|",
        f"| {t['records_per_s']:.0f} | {t['interrupts_per_s']:.0f} | {t['records_per_interrupt']:.1f} | "
        f"{t['interrupts']} | {t['device_batches']} | {t['device_msix_sent']} | {t['empty_interrupts']} | {t['gaps']} |",
        "",
        f"One-way latency (CLOCK_MONOTONIC in the VMM before the notification starts -> in the guest handler, "
        f"placed first on the queue's irq), {lat['iterations']} samples per path in {lat['rounds']} interleaved "
        "rounds:",
        "",
        "| path | p50 µs | p99 µs | mean µs | p50 / floor |",
        "|---|---:|---:|---:|---:|",
    ]
    for name, key in (("floor: eventfd between two processes (`bench notify`'s)", "floor"),
                      ("irqfd: the VMM writes the vector's irqfd-bound eventfd -> MSI route -> guest ISR (the VMM "
                       "spins for the acknowledgement, as `bench notify`'s call path)", "irqfd"),
                      ("irqfd, the same with the VMM's CPU idle between rounds (it polls with 20 µs sleeps)",
                       "irqfd_vmm_idle"),
                      ("host function: REGION_WRITE DOORBELL=1 -> server writes a record by DMA, raises MSI-X -> "
                       "eventfd -> irqfd -> guest ISR (VMM idle between rounds)", "server_raise")):
        s = lat[key]
        lines.append(f"| {name} | {s['p50_us']:.1f} | {s['p99_us']:.1f} | {s['mean_us']:.1f} | "
                     f"{s['p50_us'] / f if f else 0:.2f}x |")
    lines.append("")
    per = [(label, ra.get(k + "_per_round")) for label, k in (("irqfd", "irqfd_over_floor"),
                                                              ("irqfd with the VMM idle", "irqfd_idle_over_floor"),
                                                              ("host function", "server_over_floor"))]
    spread = "; ".join(f"{label} min {x['min']:.2f}x / median {x['median']:.2f}x / max {x['max']:.2f}x"
                       for label, x in per if x)
    fl = " ".join(f"{x['floor_p50_us']:.1f}" for x in lat["per_round"])
    lines.append(f"The server's share (host function - irqfd with the VMM idle, p50): {ra['server_share_p50_us']:.1f} µs. "
                 f"Per round against that round's floor: {spread}. Floor p50 per round (µs): {fl}.")
    lines += [
        "",
        f"Growth of the MSI-X vector set while {gd['active_queues']} queues run at {gd['rate_per_queue']} records/s "
        "each (`nic-bring-up`: entries unmasked one at a time); lost = written by the device and not consumed "
        f"{LOST_AFTER:.0f} s after the device went idle; the server's `fire-in-msix-disable-window` fault off:",
        "",
        "| | dynamic MSI-X (SET_IRQS start=v count=1) | NORESIZE (disable, re-enable with v+1 fds) |",
        "|---|---|---|",
    ]
    for (k, a), (_k, b) in zip(_growth_rows(gd), _growth_rows(gn), strict=True):
        lines.append(f"| {k} | {a} | {b} |")
    lines.append("")
    steps = ", ".join(f"{s['to']}: {s['elapsed']:.2f} s" for s in gd["steps"])
    steps_n = ", ".join(f"{s['to']}: {s['elapsed']:.2f} s" for s in gn["steps"])
    lines.append(f"Time until N vectors were up, dynamic: {steps}; NORESIZE: {steps_n}.")
    lines += figure_lines(figures, dict(LAT_PATHS))
    lines.append(VFIO_BLOCK_END)
    return "\n".join(lines) + "\n"
