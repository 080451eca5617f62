"""``kickcall bench notify``: the cost of each notification path, measured in one run.

One-way latencies use CLOCK_MONOTONIC (system-wide) taken where the notification starts -- the
writer's store before its eventfd write or doorbell write -- and where it is consumed: the
device's handler for a kick, the guest's interrupt handler for a call.  The writer waits for an
acknowledgement through shared memory, given when the consumer is done with the notification
(for a kick: after the device processed it), before the next round: rounds do not overlap, and
every path starts from the same state, its reader asleep.

* floor: one process writes an eventfd, another wakes in epoll and reads it;
* kick, ioeventfd: a guest vCPU's doorbell write matched by an ioeventfd (lightweight exit) ->
  the VMM's IOThread handler;
* kick, heavyweight exit: the same write with ``ioeventfd=off`` -> the VMM's MMIO handler;
* call, irqfd: the device writes the queue's guest notifier -> irqfd -> MSI route -> the guest's
  interrupt handler;
* virtio-blk 4 KiB random reads at depth 16, 2 vCPUs, ioeventfd on and off.

Counters and trace points stay compiled in and enabled as in normal runs; no delay on any path.

Every ``kickcall bench`` reports as fio does (:class:`BenchRun`): the job's parameters on one line
before it runs, a progress line with an ETA on a terminal (stderr, rewritten in place; nothing when
stderr is not a terminal), each latency's percentile ladder (p1 ... p99.99) and log2 histogram
(:mod:`kickcall.drive.latency`), ``--log FILE`` with one JSON object a line per round or run
(NDJSON, created 0600, never over an existing file), and on Ctrl-C what was measured so far, exit
130.  Markdown only with ``--write``, with the histograms as SVG pictures in ``docs/bench/``
beside the file written.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import select
import shutil
import statistics
import subprocess
import sys
import time
import timeit
from typing import IO, Callable

from .apps.vhost_user_test import EXIT_INTERRUPTED
from .child import start_helper
from .counters import kebab_tree
from .drive.latency import LatencyHistogram, format_ladder, format_log2, open_log, svg_log2, write_record
from .virtio.paths import KickPath
from .virtio.pci import ProxyHook

__all__ = ["bench_main", "run_notify", "BenchRun"]

STAMP_GPA = 0x8000  # a page of low guest memory the guest kernel does not allocate
GUEST_CPU, VMM_CPU = 0, 1  # placement: the writer side on one core, the consumer on the other


def restore_affinity(cpus: set[int]) -> None:
    """Give every thread of this process the CPU set *cpus* again (after a pinned measurement)."""
    for tid in os.listdir("/proc/self/task"):
        try:
            os.sched_setaffinity(int(tid), cpus)
        except OSError:
            pass


def pin_process(pid: int, cpu: int) -> None:
    """Pin every thread of *pid* (threads it creates later inherit it)."""
    if (os.cpu_count() or 1) < 2:
        return
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            os.sched_setaffinity(int(tid), {cpu})
        except OSError:
            pass
BLOCK_START = "<!-- bench notify: begin -->"
BLOCK_END = "<!-- bench notify: end -->"


def p50_us(h: LatencyHistogram) -> float:
    return h.percentile_ns(50) / 1000.0


def latency_summary(h: LatencyHistogram) -> dict:
    """A path's latencies: the figures the tables use (``n``, ``p50_us``, ``p99_us``, ``mean_us``)
    and fio's (min/max, the percentile ladder, the log2 histogram)."""
    return {"n": h.n, "p50_us": h.percentile_ns(50) / 1000.0, "p99_us": h.percentile_ns(99) / 1000.0,
            "mean_us": h.mean_us(), **{k: v for k, v in h.summary().items() if k != "count"}}


def round_summary(h: LatencyHistogram) -> dict:
    """A path's latencies in one round, for the ``--log`` line (no histogram: the ladder says it)."""
    return {"n": h.n, "mean-us": round(h.mean_us(), 3), "min-us": h.min_ns / 1000.0, "max-us": h.max_ns / 1000.0,
            "percentiles-us": h.ladder_us()}


class BenchRun:
    """What a ``kickcall bench`` run reports besides its result, as fio does for a job.

    * :meth:`echo_job`: the parameters on one line before the run (stdout; stderr with ``--json``);
    * :meth:`note`: a phase starting (stderr, on a terminal only);
    * :meth:`progress`: done so far and the ETA, on a terminal only (stderr, rewritten in place);
    * :meth:`hist`: the run's latency histograms by path, what Ctrl-C prints if the run is cut short;
    * :meth:`record`: one round's or run's figures, kept for the partial report and written to the
      ``--log`` file as one NDJSON line.
    """

    def __init__(self, name: str, params: dict[str, object], *, log_path: str | None = None,
                 json_out: bool = False, tty: bool | None = None) -> None:
        self.name = name
        self.params = params
        self.json_out = json_out
        self.tty = sys.stderr.isatty() if tty is None else tty
        self.t0 = time.monotonic()
        self.hists: dict[str, tuple[str, LatencyHistogram]] = {}
        self.records: list[dict] = []
        self.lines: list[str] = []
        self._shown = False
        self.log: IO[str] | None = open_log(log_path) if log_path else None  # a refusal: exit 2, nothing ran

    def job_line(self) -> str:
        return f"bench {self.name}: " + ", ".join(f"{k}={v}" for k, v in self.params.items())

    def echo_job(self) -> None:
        print(self.job_line(), file=sys.stderr if self.json_out else sys.stdout, flush=True)

    def elapsed(self) -> float:
        return time.monotonic() - self.t0

    def note(self, msg: str) -> None:
        """A phase starting: a line on a terminal's stderr above the progress line; nothing when
        stderr is not a terminal (a piped run's output is its job line and its results)."""
        if not self.tty:
            return
        self._wipe()
        print(msg, file=sys.stderr, flush=True)

    def progress(self, done: float, eta_s: float, detail: str = "") -> None:
        """*done*: the share of the run done, 0..1; *eta_s*: the seconds it should still take."""
        if not self.tty:
            return
        line = f"[{self.elapsed():.0f}s {100 * min(1.0, done):3.0f}% ETA {max(0.0, eta_s):.0f}s] {detail}"
        width = shutil.get_terminal_size((80, 24)).columns - 1
        sys.stderr.write("\r" + line[:width].ljust(width))
        sys.stderr.flush()
        self._shown = True

    def _wipe(self) -> None:
        if self._shown:
            width = shutil.get_terminal_size((80, 24)).columns - 1
            sys.stderr.write("\r" + " " * width + "\r")
            sys.stderr.flush()
            self._shown = False

    def hist(self, key: str, label: str) -> LatencyHistogram:
        """The run's histogram of path *key* (created on first use; *label* names it in reports)."""
        if key not in self.hists:
            self.hists[key] = (label, LatencyHistogram())
        return self.hists[key][1]

    def record(self, kind: str, text: str, **fields: object) -> None:
        """One round's or run's figures: *text* for the partial report, *fields* for ``--log``."""
        rec = {"bench": self.name, "record": kind, "time": round(time.time(), 3),
               "elapsed": round(self.elapsed(), 3), **fields}
        self.records.append(rec)
        self.lines.append(text)
        if self.log is not None:
            write_record(self.log, rec)

    def close(self) -> None:
        self._wipe()
        if self.log is not None:
            self.log.close()
            self.log = None

    def latency_text(self, digits: int = 1) -> list[str]:
        """Every path's latencies as fio prints them: min/max/avg, the ladder, the log2 histogram."""
        out: list[str] = []
        for label, h in self.hists.values():
            out.append(f"{label}: {h.n} samples")
            out.append(f"    clat (usec): min={h.min_ns / 1000:.1f}, max={h.max_ns / 1000:.1f}, "
                       f"avg={h.mean_us():.1f}")
            out += format_ladder(h.ladder_us(), digits=digits) + format_log2(h.log2_buckets())
        return out

    def partial(self) -> dict:
        """What an interrupted run measured: its records and its latencies so far."""
        return {"bench": self.name, "job": self.params, "interrupted": True, "elapsed": round(self.elapsed(), 3),
                "records": self.records, "latency": {k: latency_summary(h) for k, (_l, h) in self.hists.items()}}


def write_figures(md_path: str, prefix: str, hists: dict[str, tuple[str, LatencyHistogram]]) -> dict[str, str]:
    """Each histogram of *hists* as ``docs/bench/PREFIX-KEY.svg`` beside *md_path*; returns
    {key: the path relative to *md_path*'s directory} for the Markdown's image links."""
    base = os.path.dirname(os.path.abspath(md_path))
    rel: dict[str, str] = {}
    os.makedirs(os.path.join(base, "docs", "bench"), exist_ok=True)
    for key, (label, h) in hists.items():
        if not h.n:
            continue
        name = f"docs/bench/{prefix}-{key.replace('_', '-')}.svg"
        with open(os.path.join(base, name), "w", encoding="utf-8") as f:
            f.write(svg_log2(h.log2_buckets(), f"{label}: {h.n} samples, log2 histogram"))
        rel[key] = name
    return rel


# -- the floor: eventfd between two processes ------------------------------------------------------------
def _floor_child(efd: int, memfd: int, n: int) -> None:
    import mmap
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle; it stops us

    mm = mmap.mmap(memfd, 4096)
    st = memoryview(mm).cast("Q")
    for _ in range(n):
        ack = st[1]
        st[0] = time.monotonic_ns()
        os.eventfd_write(efd, 1)
        deadline = time.monotonic() + 5
        while st[1] == ack:
            if time.monotonic() > deadline:
                raise SystemExit("reader did not acknowledge")
    st.release()
    mm.close()


def measure_floor(n: int) -> list[int]:
    import mmap

    efd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
    memfd = os.memfd_create("bench-floor", os.MFD_CLOEXEC)
    os.ftruncate(memfd, 4096)
    mm = mmap.mmap(memfd, 4096)
    st = memoryview(mm).cast("Q")
    lat: list[int] = []
    ep = select.epoll()
    ep.register(efd, select.EPOLLIN)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    child = start_helper([sys.executable, "-c",
                              f"from kickcall.bench import _floor_child; _floor_child({efd}, {memfd}, {n})"],
                             pass_fds=[efd, memfd], env=env)
    pin_process(child.pid, GUEST_CPU)
    try:
        while len(lat) < n:
            if not ep.poll(5):
                raise RuntimeError("floor writer stalled")
            os.eventfd_read(efd)
            lat.append(time.monotonic_ns() - st[0])
            st[1] += 1
        child.wait(30)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
        ep.close()
        st.release()
        mm.close()
        os.close(memfd)
        os.close(efd)
    return lat


# -- kicks and calls through a machine ----------------------------------------------------------------------
def _machine(ioeventfd: bool, vcpus: int = 2, queues: int = 1, size: str = "64M"):
    from .machine import Machine, parse_config

    toml = f"""
[machine]
ram = "64M"
vcpus = {vcpus}
guest = "process"
[[device]]
type = "virtio-blk"
id = "blk0"
size = "{size}"
queues = {queues}
ioeventfd = {str(ioeventfd).lower()}
"""
    m = Machine(parse_config(toml, "<bench>"))
    try:
        m.start()
        if m.guest_pid:
            pin_process(m.guest_pid, GUEST_CPU)
    except BaseException:  # Ctrl-C during the boot included: nothing of the machine is left behind
        m.stop()
        raise
    return m


def measure_kicks(m, n: int) -> list[int]:
    """Guest doorbell writes -> the device's kick handler (one-way, per write)."""
    p = m.device("blk0")
    q = p.vdev.queues[0]
    st = m.memory.view(STAMP_GPA, 16).cast("Q")
    st[1] = 0
    lat: list[int] = []

    def hook(qq) -> None:
        if qq is q:
            lat.append(time.monotonic_ns() - st[0])

    def done(qq) -> None:
        # the guest's next kick waits until the device is done with this one, as the floor's next
        # write waits for its handler's end: a kick never queues behind the previous one's processing
        if qq is q:
            st[1] += 1

    p.hooks[ProxyHook.KICK] = hook
    p.hooks[ProxyHook.KICK_DONE] = done
    try:
        m.guest_cmd({"cmd": "bench-kick", "slot": m.slot("blk0"), "queue": 0, "n": n, "stamp_gpa": STAMP_GPA,
                     "cpu": 0}, timeout=300)
    finally:
        p.hooks.pop(ProxyHook.KICK, None)
        p.hooks.pop(ProxyHook.KICK_DONE, None)
        st.release()
    return lat


FLOOR_ADDR = 0xFEB0_0000  # an MMIO address no BAR uses


def measure_guest_floor(m, n: int) -> list[int]:
    """The floor between the two processes of the kick path: the guest's vCPU thread writes an
    eventfd directly (no doorbell, no hypervisor matching), the VMM's own IOThread reads it in a
    minimal handler."""
    from .notify import EventNotifier

    note = EventNotifier("bench-floor")
    st = m.memory.view(STAMP_GPA, 16).cast("Q")
    st[1] = 0
    lat: list[int] = []

    def handler() -> None:
        try:
            os.eventfd_read(note.fd)
        except BlockingIOError:
            return
        lat.append(time.monotonic_ns() - st[0])
        st[1] += 1

    m.vm.ioeventfd(space="memory", addr=FLOOR_ADDR, length=0, notifier=note)
    m.iothread.set_fd_handler(note.fd, handler)
    try:
        m.guest_cmd({"cmd": "bench-kick", "slot": m.slot("blk0"), "queue": 0, "n": n, "stamp_gpa": STAMP_GPA,
                     "cpu": 0, "raw_eventfd_at": FLOOR_ADDR}, timeout=300)
    finally:
        m.iothread.remove_fd_handler(note.fd)
        m.vm.ioeventfd(space="memory", addr=FLOOR_ADDR, length=0, notifier=note, deassign=True)
        note.close()
        st.release()
    return lat


def measure_calls(m, n: int) -> list[int]:
    """The device writes the queue's guest notifier (irqfd) -> the guest's interrupt handler."""
    p = m.device("blk0")
    q = p.vdev.queues[0]
    assert q.guest_notifier is not None and p.queue_state(q.index).irqfd, "queue 0 is not on an irqfd"
    st = m.memory.view(STAMP_GPA, 16).cast("Q")
    st[1] = 0
    m.guest_cmd({"cmd": "bench-irq-start", "slot": m.slot("blk0"), "entry": q.vector, "stamp_gpa": STAMP_GPA})
    try:
        for _ in range(n):
            ack = st[1]
            st[0] = time.monotonic_ns()
            q.guest_notifier.set()
            deadline = time.monotonic() + 5
            while st[1] == ack:
                if time.monotonic() > deadline:
                    raise RuntimeError("the guest did not take the interrupt")
    finally:
        st.release()
    return m.guest_cmd({"cmd": "bench-irq-stop"})["latencies_ns"]


def measure_iops(m, seconds: float) -> dict:
    """4 KiB random reads at depth 16 on *m*'s blk0 for *seconds*; data verified."""
    p = m.device("blk0")
    kicks0 = sum(q.kicks for q in p.vdev.queues)
    exits0 = m.vm.exit_counts.get("mmio-write", 0)
    m.start_workload(blk={"depth": 16, "block_size": 4096, "read_ratio": 1.0, "nblocks": 8192})
    time.sleep(seconds)
    (r,) = [x for x in m.stop_workload() if x["kind"] == "blk"]
    r["elapsed"] = r["ops"] / r["iops"] if r["iops"] else seconds
    r["kicks"] = sum(q.kicks for q in p.vdev.queues) - kicks0
    r["mmio_exits"] = m.vm.exit_counts.get("mmio-write", 0) - exits0
    return r


def _merge_iops(runs: list[dict]) -> dict:
    ops = sum(r["ops"] for r in runs)
    t = sum(r["elapsed"] for r in runs)
    return {"iops": ops / t if t else 0.0, "ops": ops, "errors": sum(r["error_count"] for r in runs),
            "lat_us_p50": statistics.median(r["lat_us_p50"] for r in runs),
            "lat_us_p99": max(r["lat_us_p99"] for r in runs),
            "kicks": sum(r["kicks"] for r in runs), "mmio_exits": sum(r["mmio_exits"] for r in runs)}


def measure_mb(n: int = 200000) -> dict:
    from .virtio.ring import MB_KIND, mb

    def nop() -> None:
        pass

    t_mb = timeit.timeit(mb, number=n) / n
    t_nop = timeit.timeit(nop, number=n) / n
    return {"kind": MB_KIND, "ns_per_call": t_mb * 1e9, "ns_over_empty_call": (t_mb - t_nop) * 1e9}


def machine_description() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "kernel": platform.release(),
            "python": platform.python_version(), "date": time.strftime("%Y-%m-%d")}


NOTIFY_PATHS: tuple[tuple[str, str], ...] = (
    ("floor", "floor: eventfd, guest vCPU thread -> VMM IOThread"),
    ("floor_separate_processes", "reference: eventfd between two fresh processes (epoll)"),
    ("kick_ioeventfd", "kick: guest doorbell -> ioeventfd -> device handler"),
    ("kick_heavyweight", "kick: guest doorbell -> heavyweight exit -> device handler"),
    ("call_irqfd", "call: device -> irqfd -> MSI route -> guest ISR"),
)


def notify_plan(quick: bool, rounds: int | None = None) -> dict:
    """The notify job's parameters: rounds, samples per path and round, IOPS seconds and passes."""
    n_rounds = rounds if rounds is not None else (4 if quick else 40)
    per = max(1, (600 if quick else 6000) // (4 if quick else 40))
    return {"rounds": n_rounds, "per": per, "secs": 1.0 if quick else 3.0, "iops_passes": 2}


def run_notify(quick: bool = False, log: Callable[[str], None] = print, ctx: BenchRun | None = None,
               rounds: int | None = None) -> dict:
    """Everything in one run, interleaved: each round measures the floor, the two kick paths and
    the call path back to back, so every ratio compares figures taken under the same conditions.
    Each path's latencies go into *ctx*'s histograms round by round (a round counts once complete)."""
    plan = notify_plan(quick, rounds)
    rounds = plan["rounds"]
    per = plan["per"]
    secs = plan["secs"]
    ctx = ctx if ctx is not None else BenchRun("notify", {}, tty=False)
    out: dict = {"machine": machine_description(), "iterations": per * rounds, "rounds": rounds}
    hists = {key: ctx.hist(key, label) for key, label in NOTIFY_PATHS}
    on_runs: list[dict] = []
    off_runs: list[dict] = []
    per_round: list[dict] = []
    saved_affinity = os.sched_getaffinity(0)
    pinned = (os.cpu_count() or 1) >= 2
    if pinned:
        pin_process(os.getpid(), VMM_CPU)
    out["pinned"] = pinned
    out["placement"] = (f"guest vCPUs and the floor's writer on CPU {GUEST_CPU}, the VMM and the floor's reader on "
                        f"CPU {VMM_CPU}" if pinned else "unpinned (one CPU)")
    machines = []
    iops_left = lambda done: (2 * plan["iops_passes"] - done) * (secs + 0.3)  # noqa: E731
    try:
        m_on = _machine(True, size="64M")
        machines.append(m_on)
        m_off = _machine(False, size="64M")
        machines.append(m_off)
        t_rounds = time.monotonic()
        for r in range(rounds):
            if r % 10 == 0:
                log(f"rounds {r + 1}-{min(rounds, r + 10)}/{rounds}: floors, kick (ioeventfd), kick (heavyweight), "
                    "call (irqfd) ...")
            steps = [lambda: measure_floor(per), lambda: measure_guest_floor(m_on, per),
                     lambda: measure_kicks(m_on, per), lambda: measure_kicks(m_off, per),
                     lambda: measure_calls(m_on, per)]
            order = list(range(5)) if r % 2 == 0 else list(range(4, -1, -1))  # alternate the order
            res: dict[int, LatencyHistogram] = {}
            for i in order:
                res[i] = LatencyHistogram().record_all(steps[i]())
            rh = {"floor_separate_processes": res[0], "floor": res[1], "kick_ioeventfd": res[2],
                  "kick_heavyweight": res[3], "call_irqfd": res[4]}
            for key, h in rh.items():
                hists[key].add(h)
            fp = p50_us(rh["floor"])
            sp = p50_us(rh["floor_separate_processes"])
            pr = {"floor_p50_us": fp, "separate_floor_p50_us": sp,
                  "kick_over_floor": p50_us(rh["kick_ioeventfd"]) / fp,
                  "kick_over_separate_floor": p50_us(rh["kick_ioeventfd"]) / sp,
                  "heavy_over_floor": p50_us(rh["kick_heavyweight"]) / fp,
                  "call_over_floor": p50_us(rh["call_irqfd"]) / fp,
                  "call_over_separate_floor": p50_us(rh["call_irqfd"]) / sp}
            per_round.append(pr)
            ctx.record("round", f"round {r + 1}/{rounds}: p50 floor {fp:.1f} us, kick (ioeventfd) "
                                f"{p50_us(rh['kick_ioeventfd']):.1f} us, kick (heavyweight) "
                                f"{p50_us(rh['kick_heavyweight']):.1f} us, call (irqfd) {p50_us(rh['call_irqfd']):.1f} us",
                       round=r + 1, rounds=rounds, paths={k.replace("_", "-"): round_summary(h) for k, h in rh.items()},
                       **{k.replace("_", "-"): round(v, 4) for k, v in pr.items()})
            per_round_s = (time.monotonic() - t_rounds) / (r + 1)
            left = per_round_s * (rounds - r - 1) + iops_left(0)
            ctx.progress((r + 1) / rounds * 0.9, left,
                         f"round {r + 1}/{rounds}: floor p50 {fp:.1f} us, kick p50 {p50_us(rh['kick_ioeventfd']):.1f} us")
        assert m_on.device("blk0").vdev.queues[0].kicks_by_path.get(KickPath.MMIO, 0) == 0
        assert m_off.device("blk0").vdev.queues[0].kicks_by_path.get(KickPath.IOEVENTFD, 0) == 0
        done = 0
        for r in range(plan["iops_passes"]):
            log(f"IOPS: virtio-blk 4 KiB randread, depth 16, ioeventfd on/off, {secs:g} s each, "
                f"pass {r + 1}/{plan['iops_passes']}")
            for on, runs, m in ((True, on_runs, m_on), (False, off_runs, m_off)):
                ctx.progress(0.9 + 0.1 * done / (2 * plan["iops_passes"]), iops_left(done),
                             f"IOPS, ioeventfd {'on' if on else 'off'}, pass {r + 1}")
                x = measure_iops(m, secs)
                runs.append(x)
                done += 1
                ctx.record("iops", f"IOPS, ioeventfd {'on' if on else 'off'}, pass {r + 1}: {x['iops']:.0f} IOPS, "
                                   f"p50 {x['lat_us_p50']:.0f} us, p99 {x['lat_us_p99']:.0f} us, "
                                   f"errors {x['error_count']}",
                           ioeventfd=on, **{"pass": r + 1}, iops=round(x["iops"], 1), ops=x["ops"],
                           **{"lat-us-p50": x["lat_us_p50"], "lat-us-p99": x["lat_us_p99"],
                              "errors": x["error_count"], "kicks": x["kicks"], "mmio-exits": x["mmio_exits"]})
    finally:
        for m in machines:
            m.stop()
        if pinned:
            restore_affinity(saved_affinity)
    out["per_round"] = per_round
    for key, _label in NOTIFY_PATHS:
        out[key] = latency_summary(hists[key])
    out["iops_ioeventfd_on"] = _merge_iops(on_runs)
    out["iops_ioeventfd_off"] = _merge_iops(off_runs)
    out["mb"] = measure_mb(20000 if quick else 200000)
    f = out["floor"]["p50_us"]
    out["ratios"] = {
        "kick_ioeventfd_over_floor_p50": out["kick_ioeventfd"]["p50_us"] / f if f else None,
        "kick_heavyweight_over_floor_p50": out["kick_heavyweight"]["p50_us"] / f if f else None,
        "call_irqfd_over_floor_p50": out["call_irqfd"]["p50_us"] / f if f else None,
        "iops_on_over_off": (out["iops_ioeventfd_on"]["iops"] / out["iops_ioeventfd_off"]["iops"]
                             if out["iops_ioeventfd_off"]["iops"] else None),
    }
    for k in ("kick_over_floor", "call_over_floor", "heavy_over_floor", "kick_over_separate_floor",
              "call_over_separate_floor"):
        xs = sorted(r[k] for r in per_round)
        out["ratios"][k + "_per_round"] = {"min": xs[0], "median": statistics.median(xs), "max": xs[-1]}
    return out


def render_markdown(r: dict, figures: dict[str, str] | None = None) -> str:
    """The BENCHMARKS.md section; *figures*: {path key: SVG link} of the latency histograms."""
    md = r["machine"]
    ra = r["ratios"]

    def row(name: str, key: str) -> str:
        s = r[key]
        return f"| {name} | {s['p50_us']:.1f} | {s['p99_us']:.1f} | {s['mean_us']:.1f} | {s['p50_us'] / r['floor']['p50_us']:.2f}x |"

    on, off = r["iops_ioeventfd_on"], r["iops_ioeventfd_off"]
    lines = [
        BLOCK_START,
        "## `kickcall bench notify`",
        "",
        f"Machine: {md['cpu']}, {md['cores']} cores, Linux {md['kernel']}, Python {md['python']}; "
        f"measured {md['date']} in one run of `kickcall bench notify`: {r['iterations']} samples per latency, "
        f"taken in {r['rounds']} interleaved rounds; IOPS with ioeventfd on and off alternated twice.",
        "",
        f"Placement: {r['placement']}" + (" (every path, the floor included, crosses between the same two cores)."
                                          if r.get("pinned", True) else "."),
        "",
        "One-way latency (CLOCK_MONOTONIC at the writer's store -> at the consumer's handler):",
        "",
        "| path | p50 µs | p99 µs | mean µs | p50 / floor |",
        "|---|---:|---:|---:|---:|",
        row("floor: eventfd, guest vCPU thread -> VMM IOThread (no doorbell, no hypervisor)", "floor"),
        row("reference: eventfd between two fresh processes (epoll)", "floor_separate_processes"),
        row("kick: guest doorbell -> ioeventfd -> device handler", "kick_ioeventfd"),
        row("kick: guest doorbell -> heavyweight exit -> device handler", "kick_heavyweight"),
        row("call: device -> irqfd -> MSI route -> guest ISR", "call_irqfd"),
        "",
        "virtio-blk, 4 KiB random reads, depth 16, 2 guest vCPUs, data verified "
        f"(errors: {on['errors']} with ioeventfd on, {off['errors']} off):",
        "",
        "| ioeventfd | IOPS | p50 µs | p99 µs | kicks | heavyweight MMIO exits |",
        "|---|---:|---:|---:|---:|---:|",
        f"| on | {on['iops']:.0f} | {on['lat_us_p50']:.0f} | {on['lat_us_p99']:.0f} | {on['kicks']} | "
        f"{on['mmio_exits']} |",
        f"| off | {off['iops']:.0f} | {off['lat_us_p50']:.0f} | {off['lat_us_p99']:.0f} | {off['kicks']} | "
        f"{off['mmio_exits']} |",
        "",
        f"Ratios: ioeventfd kick / floor = **{ra['kick_ioeventfd_over_floor_p50']:.2f}x** (target <= 1.5x); "
        f"heavyweight kick / floor = {ra['kick_heavyweight_over_floor_p50']:.2f}x; "
        f"irqfd call / floor = {ra['call_irqfd_over_floor_p50']:.2f}x; "
        f"IOPS ioeventfd on / off = **{ra['iops_on_over_off']:.2f}x** (target > 1).",
        "",
        "The floor is an eventfd written by the same guest vCPU thread and read by the same VMM IOThread "
        "that carry the kick, so the ratio is what the doorbell, the hypervisor's ioeventfd match and the "
        "device's kick handler add. An eventfd between two fresh processes is shown for reference; its p50 "
        f"ranged from {min(x['separate_floor_p50_us'] for x in r['per_round']):.1f} to "
        f"{max(x['separate_floor_p50_us'] for x in r['per_round']):.1f} µs across this run's rounds, and the "
        f"floor's from {min(x['floor_p50_us'] for x in r['per_round']):.1f} to "
        f"{max(x['floor_p50_us'] for x in r['per_round']):.1f} µs. Each round's ratio against that round's own floor: "
        + ", ".join(f"{name} min {ra[k]['min']:.2f}x / median {ra[k]['median']:.2f}x / max {ra[k]['max']:.2f}x"
                    for name, k in (("ioeventfd kick", "kick_over_floor_per_round"),
                                    ("irqfd call", "call_over_floor_per_round"),
                                    ("heavyweight kick", "heavy_over_floor_per_round"),
                                    ("ioeventfd kick over the two-process reference",
                                     "kick_over_separate_floor_per_round"),
                                    ("irqfd call over the two-process reference",
                                     "call_over_separate_floor_per_round")))
        + ". Floor p50 per round (µs): " + " ".join(f"{x['floor_p50_us']:.1f}" for x in r["per_round"])
        + "; two-process reference: " + " ".join(f"{x['separate_floor_p50_us']:.1f}" for x in r["per_round"])
        + ".",
        "",
        f"`mb()` ({r['mb']['kind']}): {r['mb']['ns_per_call']:.0f} ns per call, "
        f"{r['mb']['ns_over_empty_call']:.0f} ns more than an empty Python call.",
    ]
    lines += _ladder_table(r, NOTIFY_PATHS)
    lines += figure_lines(figures, dict(NOTIFY_PATHS))
    lines.append(BLOCK_END)
    return "\n".join(lines) + "\n"


def _ladder_table(r: dict, paths: tuple[tuple[str, str], ...]) -> list[str]:
    """Markdown: a row of the percentile ladder per path (p1, p10, p50, p90, p99, p99.9, p99.99)."""
    cols = ("1.00", "10.00", "50.00", "90.00", "99.00", "99.90", "99.99")
    rows = ["", "Percentiles (µs), fio's ladder (`--json` has all of p1 ... p99.99):", "",
            "| path | " + " | ".join(f"p{float(c):g}" for c in cols) + " | max |",
            "|---|" + "---:|" * (len(cols) + 1)]
    for key, label in paths:
        s = r.get(key)
        if not s or "percentiles-us" not in s:
            continue
        rows.append(f"| {label} | " + " | ".join(f"{s['percentiles-us'][c]:.1f}" for c in cols)
                    + f" | {s['max-us']:.1f} |")
    return rows


def write_markdown(path: str, block: str) -> None:
    try:
        with open(path) as f:
            text = f.read()
    except FileNotFoundError:
        text = "# kickcall benchmarks\n\nFigures from `kickcall bench ...`, each measured in one run on the " \
               "machine named in its section. Re-run the command to refresh a section.\n\n"
    pat = re.compile(re.escape(BLOCK_START) + ".*?" + re.escape(BLOCK_END) + "\n?", re.S)
    text = pat.sub(block, text) if pat.search(text) else text.rstrip("\n") + "\n\n" + block
    with open(path, "w") as f:
        f.write(text)


def markdown_to_text(md: str) -> str:
    """A rendered section for a terminal: no HTML markers, no emphasis, tables as aligned columns
    (Markdown is what ``--write`` puts in BENCHMARKS.md, not what a run prints)."""
    out: list[str] = []
    table: list[list[str]] = []

    def flush() -> None:
        if not table:
            return
        widths = [max(len(row[i]) if i < len(row) else 0 for row in table) for i in range(max(map(len, table)))]
        for row in table:
            out.append("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=False)).rstrip())
        table.clear()

    for line in md.splitlines():
        if line.startswith("<!--"):
            continue
        line = line.replace("**", "").replace("`", "")
        if line.startswith("|"):
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            if all(set(c) <= set("-: ") for c in cells):
                continue  # the header separator
            table.append(cells)
            continue
        flush()
        out.append(line[2:] if line.startswith("# ") else line.lstrip("#").lstrip() if line.startswith("#") else line)
    flush()
    return "\n".join(out).strip("\n") + "\n"


def _write_target(text: str) -> str:
    """argparse type of ``--write``: a Markdown file that can be written (checked before the run,
    not after minutes of measuring); argparse names the option in the message."""
    path = os.path.abspath(text)
    if os.path.isdir(path):
        raise argparse.ArgumentTypeError(f"{text} is a directory, not a Markdown file")
    if os.path.exists(path):
        if not os.access(path, os.W_OK):
            raise argparse.ArgumentTypeError(f"{text} is not writable")
    elif not os.path.isdir(os.path.dirname(path)) or not os.access(os.path.dirname(path), os.W_OK | os.X_OK):
        raise argparse.ArgumentTypeError(f"cannot create {text}: its directory does not exist or is not writable")
    return text


BENCHES: dict[str, tuple[str, str]] = {
    "notify": ("eventfd / ioeventfd / heavyweight-exit / irqfd latency, blk IOPS", "fewer rounds (a smoke run)"),
    "vhost-user": ("kickcall's front-end against qemu-storage-daemon and kickcall's back-end",
                   "shorter runs, one pass (a smoke run)"),
    "monitor": ("blk IOPS with and without a monitor client sampling every queue",
                "shorter runs, one pass (a smoke run)"),
    "vfio": ("passthrough interrupts over vfio-user: irqfd throughput and latency, MSI-X growth on the dynamic "
             "and the NORESIZE path", "fewer samples, growth to 256 vectors (a smoke run)"),
    "scale": ("how costs grow: setup time and memory by queues and MSI-X vectors, kick latency by ioeventfds, "
              "diagnose and x-query-pci-msix by size", "a reduced ladder (a smoke run)"),
}


ROUNDS_MAX = 100000


def _rounds(text: str) -> int:
    """argparse type of ``--rounds``: an integer 1..ROUNDS_MAX (argparse names the option)."""
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if not 1 <= v <= ROUNDS_MAX:
        raise argparse.ArgumentTypeError(f"must be 1..{ROUNDS_MAX}, got {text}")
    return v


def _poll_us(text: str) -> float:
    """argparse type of ``bench vhost-user --poll-max-us``: microseconds, 1..1000000 (0 would make the
    polling back-end the same as the non-polling one)."""
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not 1 <= v <= 1_000_000:
        raise argparse.ArgumentTypeError(f"must be 1..1000000, got {text}")
    return v


def add_arguments(add_parser: Callable[..., argparse.ArgumentParser]) -> None:
    """The ``kickcall bench`` subcommands and their options; *add_parser* is the ``add_parser`` of
    cli's ``bench`` subparsers."""
    for name, (helptext, quick) in BENCHES.items():
        p = add_parser(name, help=helptext)
        p.add_argument("--json", action="store_true",
                       help="print the results as one JSON document; the job line and progress go to stderr "
                            "(default: text)")
        p.add_argument("--write", metavar="FILE", type=_write_target, default=None,
                       help=f"update the {name} section of this Markdown file (BENCHMARKS.md), its histograms "
                            "as SVG in docs/bench/ beside it; an interrupted run writes nothing (default: no file)")
        p.add_argument("--quick", action="store_true", help=f"{quick} (default: the full run)")
        p.add_argument("--log", metavar="FILE", default=None,
                       help="write each round's or run's results to FILE as NDJSON, one JSON object a line, "
                            "created owner-only; FILE must not exist (default: no log)")
        if name == "vhost-user":
            p.add_argument("--poll-max-us", type=_poll_us, default=POLL_MAX_US, metavar="N",
                           help="the polling kickcall back-end's --poll-max-us, 1..1000000 (default "
                                f"{POLL_MAX_US:g}: 25-50 us windows were measured too short for this front-end, "
                                "200-400 us paid across CPUs)")
        if name == "notify":
            p.add_argument("--rounds", type=_rounds, default=None, metavar="N",
                           help=f"interleaved rounds of the latency paths, 1..{ROUNDS_MAX} "
                                "(default: 40; 4 with --quick)")


def job_params(a: argparse.Namespace) -> dict[str, object]:
    """The job's parameters, as the job line echoes them (fio's ``name: (g=0): rw=..., bs=...``)."""
    pinned = (os.cpu_count() or 1) >= 2
    common: dict[str, object] = {"quick": "yes" if a.quick else "no"}
    if a.bench == "notify":
        pl = notify_plan(a.quick, a.rounds)
        job: dict[str, object] = {
            "rounds": pl["rounds"], "samples-per-path": pl["rounds"] * pl["per"], "samples-per-round": pl["per"],
            "paths": "floor,reference,kick-ioeventfd,kick-heavyweight,call-irqfd",
            "iops": f"randread bs=4096 iodepth=16 runtime={pl['secs']:g}s x{pl['iops_passes']} ioeventfd=on/off"}
    elif a.bench == "vhost-user":
        pl = vhost_user_plan(a.quick, a.poll_max_us)
        job = {"back-ends": ",".join(k for k, _ in VU_BACKENDS), "placements": ",".join(k for k, _ in VU_PLACEMENTS),
               "rw": "randread", "bs": 4096, "iodepth": ",".join(map(str, VU_DEPTHS)), "runtime": f"{pl['secs']:g}s",
               "passes": pl["passes"], "poll-max-us": f"{pl['poll_max_us']:g}",
               "instrument": f"null back-end, depth 1, {pl['instrument_secs']:g}s x{pl['instrument_passes']}"}
    elif a.bench == "monitor":
        pl = monitor_plan(a.quick)
        job = {"rw": "randread", "bs": 4096, "iodepth": 16, "queues": 2, "modes": "quiet,diagnose,watched",
               "runtime": f"{pl['seconds']:g}s", "passes": pl["passes"]}
    elif a.bench == "scale":
        from .bench_scale import scale_job

        job = scale_job(a.quick)
    else:
        from .bench_vfio import vfio_plan

        pl = vfio_plan(a.quick)
        job = {"queues": 4, "records-per-queue": pl["per_queue"], "throughput-passes": pl["tp_passes"],
               "rounds": pl["rounds"], "samples-per-round": pl["per"], "vectors": f"4->{pl['target']}",
               "rate": f"{pl['rate']}/s per queue"}
    job.update(common)
    job["placement"] = f"cpu{GUEST_CPU}/cpu{VMM_CPU}" if pinned else "unpinned"
    job["log"] = a.log or "-"
    job["write"] = a.write or "-"
    return job


def _print_result(a: argparse.Namespace, ctx: BenchRun, r: dict, text: str) -> None:
    if a.json:
        r["job"] = ctx.params
        r["interrupted"] = False
        print(json.dumps(kebab_tree(r), indent=1))  # kebab-case throughout, as QMP's
        return
    print(text.rstrip("\n"))
    lat = [x for x in ctx.latency_text() if x]
    if any(h.n for _l, h in ctx.hists.values()):
        print()
        print("\n".join(lat))


def _print_partial(a: argparse.Namespace, ctx: BenchRun) -> None:
    if a.json:
        print(json.dumps(kebab_tree(ctx.partial()), indent=1))
        return
    print(f"interrupted after {ctx.elapsed():.1f} s: partial results, {len(ctx.records)} complete "
          f"round(s) or run(s)" + (f"; {a.write} not updated" if a.write else ""))
    for line in ctx.lines:
        print(f"  {line}")
    if any(h.n for _l, h in ctx.hists.values()):
        print("\n".join(ctx.latency_text()))
    else:
        print("no latency measured yet")


def bench_main(a: argparse.Namespace) -> int:
    """``kickcall bench NAME``: the job line, the run (progress on a terminal, ``--log``), the
    results; on Ctrl-C what was measured so far and exit 130 (cli's SIGINT handler raised
    KeyboardInterrupt once and ignores a second while the run's machines and helpers stop)."""
    ctx = BenchRun(a.bench, job_params(a), log_path=a.log, json_out=a.json)
    ctx.echo_job()
    try:
        try:
            return _run_bench(a, ctx)
        finally:
            ctx.close()
    except KeyboardInterrupt:
        _print_partial(a, ctx)
        sys.stdout.flush()
        print("kickcall: interrupted", file=sys.stderr, flush=True)
        return EXIT_INTERRUPTED


def _run_bench(a: argparse.Namespace, ctx: BenchRun) -> int:
    log = ctx.note
    if a.bench == "scale":
        from .bench_scale import scale_main

        return scale_main(a, ctx)
    if a.bench == "monitor":
        r = run_monitor(quick=a.quick, log=log, ctx=ctx)
        ctx.close()
        _print_result(a, ctx, r, markdown_to_text(render_monitor(r)))
        if a.write:
            write_block(a.write, render_monitor(r), MON_BLOCK_START, MON_BLOCK_END)
            print(f"updated {a.write}", file=sys.stderr, flush=True)
        return 0 if r["errors"] == 0 and r["kicks_matched_consumed"] else 1
    if a.bench == "vfio":
        from .bench_vfio import VFIO_BLOCK_END, VFIO_BLOCK_START, render_vfio, render_vfio_markdown, run_vfio

        rv = run_vfio(quick=a.quick, log=log, ctx=ctx)
        ctx.close()
        _print_result(a, ctx, rv, render_vfio(rv))
        if a.write:
            figs = write_figures(a.write, "vfio", ctx.hists)
            write_block(a.write, render_vfio_markdown(rv, figs), VFIO_BLOCK_START, VFIO_BLOCK_END)
            print(f"updated {a.write}", file=sys.stderr, flush=True)
        return 0
    if a.bench == "vhost-user":
        r = run_vhost_user(quick=a.quick, log=log, ctx=ctx, poll_max_us=a.poll_max_us)
        ctx.close()
        _print_result(a, ctx, r, markdown_to_text(render_vhost_user(r)))
        if a.write:
            figs = write_figures(a.write, "vhost-user", ctx.hists)
            write_block(a.write, render_vhost_user(r, figs), VU_BLOCK_START, VU_BLOCK_END)
            print(f"updated {a.write}", file=sys.stderr, flush=True)
        return 0
    r = run_notify(quick=a.quick, log=log, ctx=ctx, rounds=a.rounds)
    ctx.close()
    _print_result(a, ctx, r, markdown_to_text(render_markdown(r)))
    if a.write:
        figs = write_figures(a.write, "notify", ctx.hists)
        write_markdown(a.write, render_markdown(r, figs))
        print(f"updated {a.write}", file=sys.stderr, flush=True)
    return 0


def figure_lines(figures: dict[str, str] | None, labels: dict[str, str]) -> list[str]:
    """Markdown: the SVG pictures of a section's latency histograms."""
    if not figures:
        return []
    out = ["", "Latency distributions of this run (log2 histogram of µs; each bucket's count and share on the right):",
           ""]
    return out + [f"![{labels.get(key, key)}]({link})" for key, link in figures.items()]


# ---------------------------------------------------------------------------------------------------
# kickcall bench vhost-user
# ---------------------------------------------------------------------------------------------------
VU_BLOCK_START = "<!-- bench vhost-user: begin -->"
VU_BLOCK_END = "<!-- bench vhost-user: end -->"


POLL_MAX_US = 300.0  # --poll-max-us's default for the polling back-end (see vhost_user_plan)

VU_BACKENDS: tuple[tuple[str, str], ...] = (
    ("kickcall", "kickcall vhost-user-blk, polling off"),
    ("kickcall-poll", "kickcall vhost-user-blk, polling on"),
    ("qsd", "qemu-storage-daemon, main loop"),
    ("qsd-iothread", "qemu-storage-daemon, iothread"),
)
VU_PLACEMENTS: tuple[tuple[str, str], ...] = (
    ("same-cpu", f"front-end and back-end on CPU {GUEST_CPU}"),
    ("cross-cpu", f"front-end on CPU {GUEST_CPU}, back-end on CPU {VMM_CPU}"),
)
VU_DEPTHS = (1, 16)


def _cpu_of(placement: str) -> int:
    return GUEST_CPU if placement == "same-cpu" else VMM_CPU


def proc_cpu_seconds(pid: int) -> float:
    """utime + stime of process *pid*, every thread included (``/proc/PID/stat`` fields 14 and 15)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def self_cpu_seconds() -> float:
    """This process's user + system CPU seconds (every thread: the front-end's submitters and its
    completion thread)."""
    t = os.times()
    return t.user + t.system


def _start_backend(kind: str, img: str, sock: str, workdir: str, *, cpu: int = VMM_CPU, poll_max_us: float = 0.0,
                   null: bool = False, profile: str | None = None) -> tuple[int, Callable[[], object]]:
    """Start back-end *kind* (see :data:`VU_BACKENDS`) pinned to *cpu*; returns (its pid, a stop
    function).  Raises :class:`kickcall.peers.qemu.PeerError` when qemu-storage-daemon does not start."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    if kind.startswith("qsd"):
        from .peers.qsd import QSD

        qsd = QSD(img, sock, num_queues=1, qmp_path=os.path.join(workdir, "qsd.qmp"),
                  iothread=kind == "qsd-iothread")
        qsd.start()
        assert qsd.pid is not None
        pin_process(qsd.pid, cpu)
        return qsd.pid, qsd.stop
    argv = [sys.executable, "-m", "kickcall", "vhost-user-blk", "--socket-path", sock, "--blk-file", img,
            "--poll-max-us", f"{poll_max_us:g}" if kind == "kickcall-poll" else "0"]
    if null:
        argv.append("--null")
    if profile:
        argv += ["--profile", profile]
    p = start_helper(argv, env=env, stdin=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 30
    while not os.path.exists(sock):
        if p.poll() is not None or time.monotonic() > deadline:
            if p.poll() is None:
                p.kill()
                p.wait()
            raise RuntimeError("kickcall vhost-user-blk did not start")
        time.sleep(0.01)
    pin_process(p.pid, cpu)

    def stop() -> int:
        import signal as _signal

        if p.poll() is None:
            p.send_signal(_signal.SIGTERM)
        try:
            return p.wait(30)
        except subprocess.TimeoutExpired:
            p.kill()
            return p.wait()

    return p.pid, stop


def _vu_run(sock: str, depth: int, seconds: float, into: LatencyHistogram | None = None, *,
            backend_pid: int | None = None, prefill: bool = True) -> dict:
    """kickcall's front-end (``vhost-user-test``'s) for *seconds* at *depth*, 4 KiB random reads,
    data verified; with *backend_pid*, the CPU seconds the back-end and this process spent during
    the timed run (``backend_cpu_s``, ``frontend_cpu_s``)."""
    from .drive.vhost_user_blk import BlkVerifyWorkload, VhostUserBlkDriver

    drv = VhostUserBlkDriver(sock, queue_size=128)
    try:
        drv.connect(wait=10)
        wl = BlkVerifyWorkload(drv, depth=depth, nblocks=512, read_ratio=1.0, stall_timeout=30)
        if prefill:
            wl.prefill()
        b0 = proc_cpu_seconds(backend_pid) if backend_pid else 0.0
        f0 = self_cpu_seconds()
        wl.run(seconds)
        f1 = self_cpu_seconds()
        b1 = proc_cpu_seconds(backend_pid) if backend_pid else 0.0
        r = wl.result()
        r["spurious_calls"] = drv.spurious_calls
        r["backend_cpu_s"] = b1 - b0
        r["frontend_cpu_s"] = f1 - f0
        if into is not None:
            into.add(wl.hist)
        return r
    finally:
        drv.close()


def minimal_frontend(sock: str, seconds: float, into: LatencyHistogram | None = None) -> dict:
    """The least Python per request a vhost-user-blk front-end can do: one queue of 8, one 4 KiB read
    at a time, the three descriptors written once, no EVENT_IDX, no verification; per request one
    header store, one avail entry and index, a kick unless the back-end set VRING_USED_F_NO_NOTIFY,
    then poll(2) and read(2) of the call eventfd until the used index moves.  The yardstick of
    ``vhost-user-test``'s own cost (issue 14's "honest instrument")."""
    import struct

    from .memory import GuestMemory
    from .vhost_user.frontend import VhostUserFrontend
    from .vhost_user.protocol import VHOST_USER_F_PROTOCOL_FEATURES, MemRegion
    from .virtio.blk import BLK_T_IN, HDR
    from .virtio.layout import DESC
    from .virtio.ring import VIRTIO_F_VERSION_1, mb

    qs, base = 8, 0x7F00_0000_0000
    desc, avail, used, hdr, status, data = 0x0, 0x1000, 0x2000, 0x3000, 0x3100, 0x4000
    mem = GuestMemory.create(1 << 20, "bench-minfe")
    fe = VhostUserFrontend(sock, name="bench-minfe")
    kick = os.eventfd(0, os.EFD_CLOEXEC)
    call = os.eventfd(0, os.EFD_CLOEXEC)
    views: list[memoryview] = []
    try:
        fe.connect(wait=10)
        offered = fe.get_features()
        if not offered >> VHOST_USER_F_PROTOCOL_FEATURES & 1:
            raise RuntimeError("the back-end does not offer VHOST_USER_F_PROTOCOL_FEATURES")
        fe.get_protocol_features()
        fe.set_protocol_features(0)
        fe.set_owner()
        fe.set_features(offered & ((1 << VIRTIO_F_VERSION_1) | (1 << VHOST_USER_F_PROTOCOL_FEATURES)))
        regions, fds = mem.layout()
        fe.set_mem_table([MemRegion(r["gpa"], r["size"], base + r["gpa"], r["block_offset"]) for r in regions],
                         [fds[r["block"]] for r in regions])
        dv = mem.view(desc, 16 * qs)
        av = mem.view(avail, 4 + 2 * qs)
        uv = mem.view(used, 4 + 8 * qs)
        hv = mem.view(hdr, 16)
        sv = mem.view(status, 1)
        views += [dv, av, uv, hv, sv]
        # VIRTQ_DESC_F_NEXT = 1, VIRTQ_DESC_F_WRITE = 2: header -> data (device-writable) -> status
        DESC.pack_into(dv, 0, hdr, 16, 1, 1)
        DESC.pack_into(dv, DESC.size, data, 4096, 3, 2)
        DESC.pack_into(dv, 2 * DESC.size, status, 1, 2, 0)
        fe.set_vring_num(0, qs)
        fe.set_vring_base(0, 0)
        fe.set_vring_addr(0, base + desc, base + used, base + avail)
        fe.set_vring_kick(0, kick)
        fe.set_vring_call(0, call)
        fe.set_vring_enable(0, True)
        h = into if into is not None else LatencyHistogram()
        pack, unpack_u16, now = struct.pack_into, struct.unpack_from, time.monotonic_ns
        pl = select.poll()
        pl.register(call, select.POLLIN)
        idx = n = 0
        f0 = self_cpu_seconds()
        t_end = time.monotonic() + seconds
        t_start = time.monotonic()
        while time.monotonic() < t_end:
            HDR.pack_into(hv, 0, BLK_T_IN, 0, (n % 512) * 8)  # 4 KiB block n % 512
            pack("<H", av, 4 + 2 * (idx % qs), 0)
            t0 = now()
            idx = (idx + 1) & 0xFFFF
            pack("<H", av, 2, idx)
            mb()
            if not unpack_u16("<H", uv, 0)[0] & 1:  # VRING_USED_F_NO_NOTIFY
                os.eventfd_write(kick, 1)
            while unpack_u16("<H", uv, 2)[0] != idx:
                if not pl.poll(10000):
                    raise RuntimeError("the back-end did not complete a request within 10 s")
                os.eventfd_read(call)
            h.record(now() - t0)
            if sv[0]:
                raise RuntimeError(f"read failed with status {sv[0]}")
            n += 1
        elapsed = time.monotonic() - t_start
        f1 = self_cpu_seconds()
        return {"ops": n, "iops": n / elapsed if elapsed else 0.0, "elapsed": elapsed,
                "lat_us_p50": h.percentile_ns(50) / 1000.0, "lat_us_p99": h.percentile_ns(99) / 1000.0,
                "frontend_cpu_s": f1 - f0}
    finally:
        for v in views:
            v.release()
        if fe.connected:
            try:
                fe.set_vring_enable(0, False)
                fe.get_vring_base(0)
            except Exception:  # the back-end went away: nothing to hand back
                pass
        fe.close()
        os.close(kick)
        os.close(call)
        mem.close()


def vu_key(kind: str, placement: str, depth: int) -> str:
    return f"{kind}/{placement}/{depth}"


def _vu_labels() -> dict[str, str]:
    labels = {f"{kind}-{pl}-d1": f"{name}, {pl}, depth 1" for kind, name in VU_BACKENDS for pl, _ in VU_PLACEMENTS}
    for pl, _ in VU_PLACEMENTS:
        labels[f"instrument-{pl}"] = f"vhost-user-test's front-end on a null back-end, {pl}"
        labels[f"minimal-{pl}"] = f"minimal front-end on a null back-end, {pl}"
    return labels


VU_LABELS = _vu_labels()


def vhost_user_plan(quick: bool, poll_max_us: float = POLL_MAX_US) -> dict:
    """The vhost-user job: seconds per run, passes (alternating the back-ends' order), the polling
    back-end's window, and the instrument's runs."""
    return {"secs": 1.0 if quick else 4.0, "passes": 1 if quick else 2, "poll_max_us": poll_max_us,
            "instrument_secs": 1.0 if quick else 3.0, "instrument_passes": 1 if quick else 2}


def run_vhost_user(quick: bool = False, log: Callable[[str], None] = print, ctx: BenchRun | None = None,
                   poll_max_us: float = POLL_MAX_US) -> dict:
    """The matrix: every back-end of :data:`VU_BACKENDS` x placement x depth, the back-ends'
    order alternating pass by pass (ABCD, DCBA) within each placement and depth, each run's CPU
    seconds (back-end process and front-end) per 1000 requests; then the instrument's own cost
    (``vhost-user-test``'s front-end against the minimal one, both on a null back-end, alternating)
    and a profile of the polling back-end's loop at depth 16."""
    import tempfile

    from .peers.qemu import PeerError
    from .virtio.blk import make_image

    ctx = ctx if ctx is not None else BenchRun("vhost-user", {}, tty=False)
    plan = vhost_user_plan(quick, poll_max_us)
    secs, passes = plan["secs"], plan["passes"]
    isecs, ipasses = plan["instrument_secs"], plan["instrument_passes"]
    n_matrix = len(VU_PLACEMENTS) * len(VU_DEPTHS) * passes * len(VU_BACKENDS)
    n_instr = len(VU_PLACEMENTS) * ipasses * 2
    total = n_matrix + n_instr + 1
    out: dict = {"machine": machine_description(), "seconds_per_run": secs, "passes": passes,
                 "poll_max_us": poll_max_us, "backends": dict(VU_BACKENDS), "placements": dict(VU_PLACEMENTS),
                 "runs": {}, "unavailable": {}}
    saved = os.sched_getaffinity(0)
    pinned = (os.cpu_count() or 1) >= 2
    if pinned:
        pin_process(os.getpid(), GUEST_CPU)
    out["pinned"] = pinned
    from .ownership import temp_dir

    workdir = tempfile.mkdtemp(prefix="kcb", dir=temp_dir())
    img = os.path.join(workdir, "d.img")
    done = 0
    t_start = time.monotonic()

    def eta() -> float:
        per = (time.monotonic() - t_start) / done if done else secs + 1.5
        return (total - done) * per

    try:
        make_image(img, 64 << 20)
        for pl, _pl_text in VU_PLACEMENTS:
            cpu = _cpu_of(pl)
            for depth in VU_DEPTHS:
                for p in range(passes):
                    order = [k for k, _ in VU_BACKENDS]
                    for kind in order if p % 2 == 0 else order[::-1]:
                        if kind in out["unavailable"]:
                            done += 1
                            continue
                        log(f"{pl}, depth {depth}, {kind}, pass {p + 1}/{passes} ...")
                        ctx.progress(done / total, eta(), f"{pl}, depth {depth}, {kind}, pass {p + 1}")
                        sock = os.path.join(workdir, f"{kind}.sock")
                        try:
                            pid, stop = _start_backend(kind, img, sock, workdir, cpu=cpu, poll_max_us=poll_max_us)
                        except (PeerError, OSError) as e:
                            if not kind.startswith("qsd"):
                                raise
                            reason = f"{kind} did not start: {str(e).splitlines()[0] if str(e) else type(e).__name__}"
                            out["unavailable"][kind] = reason
                            log(reason)
                            done += 1
                            continue
                        run_h = LatencyHistogram()
                        try:
                            r = _vu_run(sock, depth, secs, into=run_h, backend_pid=pid)
                        finally:
                            stop()
                        if r["error_count"]:
                            raise RuntimeError(f"{kind} {pl} depth {depth}: data errors {r['errors']}")
                        if depth == 1:
                            hk = f"{kind}-{pl}-d1"
                            ctx.hist(hk, VU_LABELS[hk]).add(run_h)
                        done += 1
                        cpu_b = 1000 * r["backend_cpu_s"] / r["ops"] if r["ops"] else 0.0
                        cpu_f = 1000 * r["frontend_cpu_s"] / r["ops"] if r["ops"] else 0.0
                        ctx.record("run", f"{kind}, {pl}, depth {depth}, pass {p + 1}: {r['iops']:.0f} IOPS, p50 "
                                          f"{r['lat_us_p50']:.1f} us, p99 {r['lat_us_p99']:.0f} us, CPU s/1000 req "
                                          f"back-end {cpu_b:.3f} front-end {cpu_f:.3f}",
                                   **{"back-end": kind, "placement": pl, "depth": depth, "pass": p + 1,
                                      "iops": round(r["iops"], 1), "ops": r["ops"], "errors": r["error_count"],
                                      "backend-cpu-s": round(r["backend_cpu_s"], 3),
                                      "frontend-cpu-s": round(r["frontend_cpu_s"], 3),
                                      "latency": round_summary(run_h)})
                        out["runs"].setdefault(vu_key(kind, pl, depth), []).append(r)
        out["instrument"] = _measure_instrument(img, workdir, isecs, ipasses, ctx, log,
                                                lambda: (done + 0.0) / total, eta)
        done += n_instr
        log("profiling the polling back-end at depth 16, cross-cpu ...")
        ctx.progress(done / total, eta(), "profiling the polling back-end")
        prof = os.path.join(workdir, "backend.prof")
        sock = os.path.join(workdir, "prof.sock")
        _pid, stop = _start_backend("kickcall-poll", img, sock, workdir, cpu=VMM_CPU, poll_max_us=poll_max_us,
                                    profile=prof)
        try:
            _vu_run(sock, 16, secs)
        finally:
            stop()
        out["profile"] = _profile_top(prof)
    finally:
        if pinned:
            restore_affinity(saved)
        shutil.rmtree(workdir, ignore_errors=True)
    out["cells"] = _vu_cells(out["runs"])
    out["qsd_version"] = _qsd_version()
    out["ratios"] = _vu_ratios(out["cells"], out["unavailable"])
    return out


def _vu_cells(runs: dict[str, list[dict]]) -> list[dict]:
    """One record per (back-end, placement, depth): IOPS over every pass, the median of the passes'
    p50, the worst p99, CPU seconds per 1000 requests of the back-end process and the front-end."""
    cells = []
    for kind, _ in VU_BACKENDS:
        for pl, _ in VU_PLACEMENTS:
            for depth in VU_DEPTHS:
                rs = runs.get(vu_key(kind, pl, depth))
                if not rs:
                    continue
                ops = sum(r["ops"] for r in rs)
                t = sum(r["elapsed"] for r in rs)
                cells.append({"back_end": kind, "placement": pl, "depth": depth, "passes": len(rs), "ops": ops,
                              "iops": ops / t if t else 0.0,
                              "p50_us": statistics.median(r["lat_us_p50"] for r in rs),
                              "p99_us": max(r["lat_us_p99"] for r in rs),
                              "backend_cpu_s_per_1000": 1000 * sum(r["backend_cpu_s"] for r in rs) / ops if ops else 0.0,
                              "frontend_cpu_s_per_1000": 1000 * sum(r["frontend_cpu_s"] for r in rs) / ops
                              if ops else 0.0,
                              "spurious_calls": sum(r["spurious_calls"] for r in rs)})
    return cells


def _vu_ratios(cells: list[dict], unavailable: dict[str, str]) -> dict:
    """Per placement: kickcall (polling off / on) over qemu-storage-daemon (main loop / iothread),
    depth-1 p50 latency (lower is better: < 1 means kickcall is faster) and depth-16 IOPS (higher
    is better); a ratio whose qemu-storage-daemon mode did not run is None, its reason beside it."""
    by = {(c["back_end"], c["placement"], c["depth"]): c for c in cells}
    out: dict = {}
    for pl, _ in VU_PLACEMENTS:
        lat: dict[str, float | None] = {}
        iops: dict[str, float | None] = {}
        for kc in ("kickcall", "kickcall-poll"):
            for q in ("qsd", "qsd-iothread"):
                name = f"{kc}_over_{q}"
                a1, b1 = by.get((kc, pl, 1)), by.get((q, pl, 1))
                a16, b16 = by.get((kc, pl, 16)), by.get((q, pl, 16))
                lat[name] = a1["p50_us"] / b1["p50_us"] if a1 and b1 and b1["p50_us"] else None
                iops[name] = a16["iops"] / b16["iops"] if a16 and b16 and b16["iops"] else None
        out[pl] = {"depth1_p50": lat, "depth16_iops": iops}
    if unavailable:
        out["missing"] = dict(unavailable)
    return out


def _measure_instrument(img: str, workdir: str, secs: float, passes: int, ctx: BenchRun,
                        log: Callable[[str], None], done: Callable[[], float], eta: Callable[[], float]) -> dict:
    """``vhost-user-test``'s front-end (the bench's instrument) and :func:`minimal_frontend`, each
    one 4 KiB read at a time on a null kickcall back-end (polling off), alternating, on both
    placements: the round trips, their ratio and the front-ends' CPU per 1000 requests."""
    res: dict = {"seconds_per_run": secs, "passes": passes, "back_end": "kickcall vhost-user-blk --null, polling off"}
    for pl, _ in VU_PLACEMENTS:
        cpu = _cpu_of(pl)
        runs: dict[str, list[dict]] = {"instrument": [], "minimal": []}
        for p in range(passes):
            for fe in ("instrument", "minimal") if p % 2 == 0 else ("minimal", "instrument"):
                log(f"instrument: {fe} front-end, null back-end, {pl}, pass {p + 1}/{passes} ...")
                ctx.progress(done(), eta(), f"instrument: {fe}, {pl}, pass {p + 1}")
                sock = os.path.join(workdir, f"null-{fe}.sock")
                pid, stop = _start_backend("kickcall", img, sock, workdir, cpu=cpu, null=True)
                h = LatencyHistogram()
                try:
                    if fe == "instrument":
                        r = _vu_run(sock, 1, secs, into=h, backend_pid=pid, prefill=False)
                        if r["error_count"]:
                            raise RuntimeError(f"instrument on a null back-end: data errors {r['errors']}")
                    else:
                        r = minimal_frontend(sock, secs, into=h)
                finally:
                    stop()
                ctx.hist(f"{fe}-{pl}", VU_LABELS[f"{fe}-{pl}"]).add(h)
                runs[fe].append(r)
                ctx.record("instrument", f"instrument: {fe} front-end, {pl}, pass {p + 1}: p50 {r['lat_us_p50']:.1f} us, "
                                         f"{r['iops']:.0f} IOPS",
                           **{"front-end": fe, "placement": pl, "pass": p + 1, "ops": r["ops"],
                              "iops": round(r["iops"], 1), "frontend-cpu-s": round(r["frontend_cpu_s"], 3),
                              "latency": round_summary(h)})
        cell: dict = {}
        for fe, rs in runs.items():
            ops = sum(r["ops"] for r in rs)
            cell[fe] = {"ops": ops, "p50_us": statistics.median(r["lat_us_p50"] for r in rs),
                        "p99_us": max(r["lat_us_p99"] for r in rs),
                        "iops": ops / sum(r["elapsed"] for r in rs),
                        "frontend_cpu_s_per_1000": 1000 * sum(r["frontend_cpu_s"] for r in rs) / ops if ops else 0.0}
        m = cell["minimal"]["p50_us"]
        cell["p50_ratio"] = cell["instrument"]["p50_us"] / m if m else None
        cell["p50_extra_us"] = cell["instrument"]["p50_us"] - m
        res[pl] = cell
    return res


def _qsd_version() -> str:
    """qemu-storage-daemon's version as it reports it (``7.2.22``), for the table's label."""
    try:
        p = subprocess.run(["qemu-storage-daemon", "--version"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return "?"
    m = re.search(r"version (\S+)", p.stdout)
    return m.group(1) if m else "?"


def _profile_top(path: str, n: int = 12) -> list[dict]:
    import pstats

    st = pstats.Stats(path)
    total = st.total_tt  # type: ignore[attr-defined]
    rows = []
    for (fname, line, func), (_cc, nc, tt, ct, _callers) in st.stats.items():  # type: ignore[attr-defined]
        rows.append({"function": f"{os.path.basename(fname)}:{line} {func}", "calls": nc,
                     "self_s": tt, "cumulative_s": ct, "self_share": tt / total if total else 0.0})
    rows.sort(key=lambda r: -r["self_s"])
    return rows[:n]


def render_vhost_user(r: dict, figures: dict[str, str] | None = None) -> str:
    md = r["machine"]
    by = {(c["back_end"], c["placement"], c["depth"]): c for c in r["cells"]}
    qv = r.get("qsd_version", "?")
    names = {"kickcall": "kickcall vhost-user-blk (Python), polling off",
             "kickcall-poll": f"kickcall vhost-user-blk (Python), polling on, --poll-max-us {r['poll_max_us']:g}",
             "qsd": f"qemu-storage-daemon {qv} (C, libvhost-user), main loop",
             "qsd-iothread": f"qemu-storage-daemon {qv}, iothread (AioContext polling, poll-max-ns default)"}
    placements = r["placements"]
    lines = [
        VU_BLOCK_START,
        "## `kickcall bench vhost-user`",
        "",
        f"Machine: {md['cpu']}, {md['cores']} cores, Linux {md['kernel']}, Python {md['python']}; measured "
        f"{md['date']} in one run of `kickcall bench vhost-user`. kickcall's VM-less front-end (`kickcall.drive`, "
        f"the one `kickcall vhost-user-test` uses) drives each back-end with 4 KiB random reads over a 2 MiB "
        f"prefilled working set, data verified; {r['seconds_per_run']:.1f} s per run, {r['passes']} pass(es) per "
        "cell, the back-ends' order alternating pass by pass (ABCD, DCBA) within each placement and depth, each "
        "run on a freshly started back-end. Placements: "
        + "; ".join(f"{k}: {v}" for k, v in placements.items())
        + (" (not pinned: one CPU)." if not r.get("pinned", True) else ".")
        + f" The polling back-end runs with `--poll-max-us {r['poll_max_us']:g}` (the bench's `--poll-max-us`; "
        "25-50 µs windows measured too short for this front-end, 200-400 µs paid across CPUs). CPU is "
        "utime+stime per 1000 requests: the back-end process's (/proc/PID/stat, every thread), and the "
        "front-end's (this process, os.times()), over the timed run only.",
        "",
        "| back-end | placement | depth | IOPS | p50 µs | p99 µs | back-end CPU s / 1000 req | "
        "front-end CPU s / 1000 req |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for depth in VU_DEPTHS:
        for pl in placements:
            for kind, _ in VU_BACKENDS:
                c = by.get((kind, pl, depth))
                if c is None:
                    lines.append(f"| {names[kind]} | {pl} | {depth} | - | - | - | - | - |")
                    continue
                lines.append(f"| {names[kind]} | {pl} | {depth} | {c['iops']:.0f} | {c['p50_us']:.1f} | "
                             f"{c['p99_us']:.0f} | {c['backend_cpu_s_per_1000']:.3f} | "
                             f"{c['frontend_cpu_s_per_1000']:.3f} |")
    for kind, why in r.get("unavailable", {}).items():
        lines += ["", f"**{kind} not measured**: {why}"]

    def fmt(x: float | None) -> str:
        return f"{x:.2f}x" if x is not None else "-"

    lines += ["", "kickcall over qemu-storage-daemon: depth-1 p50 latency (below 1 is kickcall faster; target with "
              "polling: <= 1.0x the iothread's across CPUs, <= 1.2x on one CPU) and depth-16 IOPS (above 1 is "
              "kickcall faster; target >= 1.0x):", "",
              "| placement | kickcall | over | depth-1 p50 | depth-16 IOPS |", "|---|---|---|---:|---:|"]
    for pl in placements:
        ra = r["ratios"][pl]
        for kc in ("kickcall", "kickcall-poll"):
            for q in ("qsd", "qsd-iothread"):
                name = f"{kc}_over_{q}"
                lines.append(f"| {pl} | {'polling on' if kc.endswith('poll') else 'polling off'} | "
                             f"{'iothread' if q.endswith('iothread') else 'main loop'} | "
                             f"**{fmt(ra['depth1_p50'][name])}** | **{fmt(ra['depth16_iops'][name])}** |")
    ins = r["instrument"]
    lines += ["", "The instrument's own cost: one 4 KiB read at a time on a null back-end "
              f"({ins['back_end']}), `vhost-user-test`'s front-end against a minimal single-purpose front-end "
              "(one queue, descriptors written once, no verification, no EVENT_IDX, poll+read of the call "
              f"eventfd), alternating, {ins['passes']} pass(es) of {ins['seconds_per_run']:.1f} s each "
              "(target: within 1.10x):", "",
              "| placement | front-end | p50 µs | p99 µs | IOPS | front-end CPU s / 1000 req |",
              "|---|---|---:|---:|---:|---:|"]
    for pl in placements:
        c = ins[pl]
        for fe, label in (("instrument", "vhost-user-test's (kickcall.drive)"), ("minimal", "minimal")):
            x = c[fe]
            lines.append(f"| {pl} | {label} | {x['p50_us']:.1f} | {x['p99_us']:.0f} | {x['iops']:.0f} | "
                         f"{x['frontend_cpu_s_per_1000']:.3f} |")
    lines += ["", "Instrument / minimal p50: " + ", ".join(
        f"**{fmt(ins[pl]['p50_ratio'])}** {pl} (+{ins[pl]['p50_extra_us']:.1f} µs)" for pl in placements) + "."]
    lines += [
        "",
        "Where the polling back-end's loop thread spends its time at depth 16, cross-cpu (cProfile, self time):",
        "",
        "| function | calls | self s | share |",
        "|---|---:|---:|---:|",
    ]
    for p in r["profile"]:
        lines.append(f"| `{p['function']}` | {p['calls']} | {p['self_s']:.3f} | {100 * p['self_share']:.1f}% |")
    lines += figure_lines(figures, VU_LABELS)
    lines.append(VU_BLOCK_END)
    return "\n".join(lines) + "\n"


def write_block(path: str, block: str, start: str, end: str) -> None:
    try:
        with open(path) as f:
            text = f.read()
    except FileNotFoundError:
        text = "# kickcall benchmarks\n\n"
    pat = re.compile(re.escape(start) + ".*?" + re.escape(end) + "\n?", re.S)
    text = pat.sub(lambda _m: block, text) if pat.search(text) else text.rstrip("\n") + "\n\n" + block
    with open(path, "w") as f:
        f.write(text)


# ---------------------------------------------------------------------------------------------------
# kickcall bench monitor: does watching disturb?
# ---------------------------------------------------------------------------------------------------
MON_BLOCK_START = "<!-- bench monitor: begin -->"
MON_BLOCK_END = "<!-- bench monitor: end -->"


_WATCHER = """
import json, signal, sys, time
signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the bench's to handle; it stops us
from kickcall.diagnose.sample import Sampler
from kickcall.monitor.client import QMPClient
path, seconds, interval = sys.argv[1], float(sys.argv[2]), float(sys.argv[3])
with QMPClient(path).connect() as c:
    s = Sampler(c)
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        s.sample()
        n += 1
        if interval:
            time.sleep(interval)
    print(json.dumps({"samples": n, "seconds": time.perf_counter() - t0}))
"""


def _watcher(path: str, seconds: float, interval: float) -> subprocess.Popen:
    """A separate process doing what ``kickcall diagnose --watch`` does: full samples of every queue,
    *interval* apart (0: back to back)."""
    return start_helper([sys.executable, "-c", _WATCHER, path, str(seconds), str(interval)],
                            stdout=subprocess.PIPE, text=True)


def _kick_books(m) -> tuple[int, int, int]:
    """(doorbell writes the hypervisor matched, values the device consumed, values pending) of blk0's kicks."""
    from .machine.monitor import MachineTarget

    (dev,) = [d for d in MachineTarget(m).devices() if d.id == "blk0"]
    rows = [n for n in dev.notifiers() if n["role"] == "host"]
    return (sum(n.get("writes", 0) for n in rows), sum(n.get("consumed", 0) for n in rows),
            sum(max(n.get("pending", 0), 0) for n in rows))


def monitor_plan(quick: bool) -> dict:
    return {"seconds": 1.5 if quick else 4.0, "passes": 1 if quick else 3}


def run_monitor(quick: bool = False, log: Callable[[str], None] = print, ctx: BenchRun | None = None) -> dict:
    """blk IOPS at depth 16 with nobody watching vs with a client sampling every queue back to back."""
    import tempfile

    ctx = ctx if ctx is not None else BenchRun("monitor", {}, tty=False)
    plan = monitor_plan(quick)
    seconds = plan["seconds"]
    passes = plan["passes"]
    out: dict = {"machine": machine_description(), "seconds_per_run": seconds, "passes": passes}
    runs: dict[str, list[dict]] = {"quiet": [], "diagnose": [], "watched": []}
    watch: dict[str, list[dict]] = {"diagnose": [], "watched": []}
    from .ownership import temp_dir

    d = tempfile.mkdtemp(prefix="kcbench", dir=temp_dir())
    qmp = os.path.join(d, "m.qmp")
    m = None
    w = None
    try:
        m = _machine(True, vcpus=2, queues=2)
        m.start_monitor(qmp)
        measure_iops(m, 1.0)  # warm-up: caches, thread pools, the guest's allocator
        modes = {"quiet": None, "diagnose": 0.5, "watched": 0.0}
        for i in range(passes):
            order = list(modes) if i % 2 == 0 else list(reversed(modes))
            for j, mode in enumerate(order):
                done = i * len(modes) + j
                ctx.progress(done / (passes * len(modes)), (passes * len(modes) - done) * (seconds + 0.5),
                             f"{mode}, pass {i + 1}/{passes}")
                before = _kick_books(m)
                pace = modes[mode]
                w = _watcher(qmp, seconds, pace) if pace is not None else None
                r = measure_iops(m, seconds)
                if w is not None:
                    out_w, _ = w.communicate(timeout=60)
                    watch[mode].append(json.loads(out_w))
                # every doorbell write the hypervisor matched was consumed by the device, none by the watcher
                after = _kick_books(m)
                r["doorbells"] = after[0] - before[0]
                r["kicks_consumed"] = after[1] - before[1] + after[2]
                runs[mode].append(r)
                rate = watch[mode][-1]["samples"] / watch[mode][-1]["seconds"] if w else None
                ctx.record("run", f"{mode} pass {i + 1}: {r['iops']:.0f} IOPS, p50 {r['lat_us_p50']:.0f} us, "
                                  f"p99 {r['lat_us_p99']:.0f} us" + (f", {rate:.0f} samples/s" if rate else ""),
                           mode=mode, **{"pass": i + 1, "iops": round(r["iops"], 1), "ops": r["ops"],
                                         "lat-us-p50": r["lat_us_p50"], "lat-us-p99": r["lat_us_p99"],
                                         "errors": r["error_count"], "doorbells": r["doorbells"],
                                         "kicks-consumed": r["kicks_consumed"],
                                         "samples-per-s": round(rate, 1) if rate else None})
                w = None
    finally:
        if w is not None and w.poll() is None:  # interrupted while a watcher ran
            w.kill()
            w.wait()
        if m is not None:
            m.stop()
        shutil.rmtree(d, ignore_errors=True)
    for mode, rs in runs.items():
        out[mode] = _merge_iops(rs)
    for mode, ws in watch.items():
        ns = sum(w["samples"] for w in ws)
        secs = sum(w["seconds"] for w in ws)
        out[mode]["samples_per_s"] = ns / secs if secs else 0.0
        out[mode]["ms_per_sample"] = 1000 * secs / ns if ns else 0.0
        out[f"ratio_{mode}_over_quiet"] = out[mode]["iops"] / out["quiet"]["iops"] if out["quiet"]["iops"] else 0.0
    out["errors"] = sum(out[mode]["errors"] for mode in runs)
    out["kicks_matched_consumed"] = all(r["kicks_consumed"] == r["doorbells"] for rs in runs.values() for r in rs)
    out["doorbells"] = sum(r["doorbells"] for rs in runs.values() for r in rs)
    return out


def render_monitor(r: dict) -> str:
    md = r["machine"]
    q, d, w = r["quiet"], r["diagnose"], r["watched"]
    return "\n".join([
        MON_BLOCK_START,
        "## `kickcall bench monitor`",
        "",
        f"Machine: {md['cpu']}, {md['cores']} cores, Linux {md['kernel']}, Python {md['python']}; measured "
        f"{md['date']} in one run of `kickcall bench monitor`. A kickcall machine (2 vCPUs, virtio-blk with 2 queues, "
        f"ioeventfd and irqfd) runs 4 KiB random reads at depth 16, data verified, {r['seconds_per_run']:.1f} s per "
        f"run, {r['passes']} interleaved passes per mode. A watcher is a separate process taking full diagnose "
        "samples over QMP (run state, and for every queue its status, notifiers and MSI-X): at `kickcall diagnose`'s "
        "default pace (0.5 s apart), or back to back.",
        "",
        "| mode | IOPS | p50 µs | p99 µs | data errors |",
        "|---|---:|---:|---:|---:|",
        f"| nobody watching | {q['iops']:.0f} | {q['lat_us_p50']:.0f} | {q['lat_us_p99']:.0f} | {q['errors']} |",
        f"| diagnose pace, {d['samples_per_s']:.1f} samples/s ({d['ms_per_sample']:.0f} ms a cycle) | {d['iops']:.0f} | "
        f"{d['lat_us_p50']:.0f} | {d['lat_us_p99']:.0f} | {d['errors']} |",
        f"| back to back, {w['samples_per_s']:.0f} samples/s ({w['ms_per_sample']:.1f} ms each) | {w['iops']:.0f} | "
        f"{w['lat_us_p50']:.0f} | {w['lat_us_p99']:.0f} | {w['errors']} |",
        "",
        f"IOPS relative to nobody watching: **{r['ratio_diagnose_over_quiet']:.2f}x at diagnose's pace**, "
        f"**{r['ratio_watched_over_quiet']:.2f}x back to back**. Every doorbell write the hypervisor matched was "
        f"consumed by the device, none by a watcher ({r['doorbells']} writes): "
        f"**{'yes' if r['kicks_matched_consumed'] else 'NO'}**.",
        MON_BLOCK_END,
    ]) + "\n"
