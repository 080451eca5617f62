"""``kickcall diagnose``: connect, identify, sample, judge, join, and (if asked) inject.

One :class:`TargetSession` per monitor socket: connected within the run's deadline, identified
(:mod:`.targets`), and from then on spoken to only through its :class:`~.targets.GuardedMonitor`.
Rounds of samples are taken until every queue has a final verdict or ``--timeout`` runs out.
A vhost device seen from QEMU and the same ring seen from its back-end's monitor (matched by the
ring's addresses, which the front-end sent to the back-end) become one joined verdict, reported
under QEMU's device path.
"""

from __future__ import annotations

import datetime
import enum
import os
import stat
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ..monitor.client import (ConnectionProblem, QMPClient, QMPCommandError, QMPConnectionError, peer_pid,
                              process_state)
from .sample import QemuSampler, Sample, Sampler, UnknownSelection
from .targets import GuardedMonitor, TargetInfo, TargetKind, identify
from .verdict import (DEFAULT_WINDOW, FAILED_RUN_STATES, HEALTHY, IDLE, LOST_CALL, LOST_KICK, MASKED_PENDING,
                      NO_CALL_FD, NOT_STARTED, PAUSED, RESTART_ADVICE, STOPPED, UNDECIDED, Severity, Verdict, front_end_pid, judge)

__all__ = ["TargetProblem", "TargetSession", "QueueReport", "TargetReport", "Report", "diagnose", "apply_fixes",
           "format_report", "exit_status", "SCHEMA"]

SCHEMA = 1  # the JSON report's schema version

GREETING_WAIT = 5.0  # longest wait for a greeting (within --timeout): a healthy monitor greets at once
QUERY_WAIT = 3.0  # longest wait for one reply (within --timeout): one silent monitor must not use up a
                  # round that other monitors share (they are sampled one after the other)


class TargetProblem(enum.StrEnum):
    NO_SOCKET = "no socket"
    NOT_A_SOCKET = "not a socket"
    REFUSED = "refused"
    NOT_QMP = "not a QMP monitor"
    BUSY = "busy"
    PROCESS_STOPPED = "process stopped"
    NOT_ANSWERING = "not answering"
    CLOSED = "closed the connection"
    NO_VIRTIO_QUERIES = "no virtio queries"
    NO_RING_STATE = "no ring state"
    UNKNOWN_MONITOR = "unknown monitor"
    QUERY_FAILED = "query failed"


_UNREACHABLE = {TargetProblem.NO_SOCKET, TargetProblem.NOT_A_SOCKET, TargetProblem.REFUSED, TargetProblem.NOT_QMP, TargetProblem.BUSY,
                TargetProblem.PROCESS_STOPPED, TargetProblem.NOT_ANSWERING, TargetProblem.CLOSED}


@dataclass
class TargetReport:
    socket: str
    kind: TargetKind | None = None
    version: str = ""
    pid: int | None = None
    run_state: str = "unknown"
    problem: TargetProblem | None = None
    detail: str = ""
    notes: list[str] = field(default_factory=list)

    def as_dict(self) -> dict:
        return {"socket": self.socket, "kind": self.kind.value if self.kind else None, "version": self.version,
                "pid": self.pid, "run-state": self.run_state, "problem": str(self.problem) if self.problem else None,
                "detail": self.detail, "notes": list(self.notes)}


@dataclass
class QueueReport:
    target: str  # the monitor socket the verdict is reported under
    path: str
    name: str
    queue: int
    verdict: Verdict
    target_kind: TargetKind | None = None
    joined: dict | None = None  # {"target", "path", "queue"} of the back-end's view of the same ring
    fix_result: dict | None = None
    vector: bool = False  # a passthrough function's MSI-X vector (``queue`` is the vector number)

    def as_dict(self) -> dict:
        d: dict[str, Any] = {"target": self.target, "target-kind": self.target_kind.value if self.target_kind else None,
                             "path": self.path, "name": self.name, "queue": self.queue}
        if self.vector:
            d["vector"] = self.queue
        d.update(self.verdict.as_dict())
        d["joined"] = self.joined
        if self.fix_result is not None:
            d["fix-result"] = self.fix_result
        return d


@dataclass
class Report:
    targets: list[TargetReport]
    samples: int
    interval: float
    window: float
    queues: list[QueueReport] = field(default_factory=list)
    wall_time: float = field(default_factory=time.time)

    @property
    def problems(self) -> list[QueueReport]:
        return [q for q in self.queues if q.verdict.problem]

    def unresolved(self) -> list[QueueReport]:
        return [q for q in self.problems if not (q.fix_result and q.fix_result.get("moved"))]

    def as_dict(self) -> dict:
        first = self.targets[0] if self.targets else None
        return {"schema": SCHEMA,
                "time": datetime.datetime.fromtimestamp(self.wall_time, datetime.UTC).isoformat(timespec="milliseconds"),
                "target": first.socket if first else "", "run-state": first.run_state if first else "unknown",
                "samples": self.samples, "interval": self.interval, "window": self.window,
                "targets": [t.as_dict() for t in self.targets], "queues": [q.as_dict() for q in self.queues]}


def _who(pid: int | None) -> str:
    if pid is None:
        return "its process is not known (SO_PEERCRED gave none: another pid namespace?)"
    ps = process_state(pid)
    if ps is None:
        return f"pid {pid}"
    return f"pid {pid} ({ps[1]}, state {ps[0]})"


class TargetSession:
    """One monitor: its connection, what it is, its sampler and its samples."""

    def __init__(self, socket_path: str, *, fix: bool = False, dev: str | None = None,
                 queue: int | None = None) -> None:
        self.socket = socket_path
        self.fix = fix
        self.dev = dev
        self.queue = queue
        self.report = TargetReport(socket_path)
        self.client: QMPClient | None = None
        self.guard: GuardedMonitor | None = None
        self.info: TargetInfo | None = None
        self.sampler: Sampler | QemuSampler | None = None
        self.history: list[Sample] = []
        self.devices: list[dict] = []  # x-query-virtio, unfiltered (to name what --dev could be)

    @property
    def live(self) -> bool:
        return self.sampler is not None and self.report.problem is None

    def _fail(self, e: QMPConnectionError, pid: int | None) -> None:
        r = self.report
        r.pid = pid
        ps = process_state(pid) if pid else None
        if ps is not None and ps[0] in "Tt":
            r.problem = TargetProblem.PROCESS_STOPPED
            r.detail = (f"the monitor's process, {_who(pid)}, is stopped (SIGSTOP, or a debugger holds it): it "
                        f"cannot answer. `kill -CONT {pid}` resumes it")
        elif e.kind in (ConnectionProblem.NO_GREETING, ConnectionProblem.BACKLOG_FULL):
            r.problem = TargetProblem.BUSY
            first = ("its listen backlog is full: it serves one client and others wait already"
                     if e.kind is ConnectionProblem.BACKLOG_FULL else
                     f"the socket accepted the connection but the monitor never greeted ({_who(pid)})")
            comm = (ps[1] if (ps := process_state(pid) if pid else None) else "")
            r.detail = (f"{first}. QEMU serves one QMP client at a time: another client (libvirt, a script) holds "
                        "this socket. Give QEMU a second monitor (-qmp unix:PATH,server=on,wait=off, or "
                        "-chardev/-mon), or go through libvirt's passthrough (virsh qemu-monitor-command DOMAIN "
                        "'{...}')" + ("" if comm.startswith("qemu") or e.kind is ConnectionProblem.BACKLOG_FULL
                                      else ". Or this is not a QMP socket: a vhost-user socket, for one, waits "
                                      "for its front-end to speak first"))
        elif e.kind is ConnectionProblem.NO_REPLY:
            r.problem = TargetProblem.NOT_ANSWERING
            r.detail = f"the monitor greeted, then did not answer a query in time ({_who(pid)}): {e}"
        elif e.kind is ConnectionProblem.NO_SOCKET:
            r.problem, r.detail = TargetProblem.NO_SOCKET, str(e)
        elif e.kind is ConnectionProblem.REFUSED:
            r.problem, r.detail = TargetProblem.REFUSED, f"{e} (nothing listens: the process exited?)"
        elif e.kind is ConnectionProblem.NOT_QMP:
            r.problem, r.detail = TargetProblem.NOT_QMP, str(e)
        else:
            r.problem, r.detail = TargetProblem.CLOSED, f"{e} ({_who(pid)})"
        if self.client is not None:
            self.client.close()

    def open(self, deadline: float) -> None:
        """Connect, greet, identify -- all before *deadline*."""
        pid: list[int | None] = [None]
        try:
            st = os.stat(self.socket)
        except FileNotFoundError:
            st = None
        except OSError as e:
            self.report.problem, self.report.detail = TargetProblem.NO_SOCKET, f"{self.socket}: {e.strerror}"
            return
        if st is not None and not stat.S_ISSOCK(st.st_mode):
            what = "a directory" if stat.S_ISDIR(st.st_mode) else "a regular file" if stat.S_ISREG(
                st.st_mode) else "not a socket"
            self.report.problem = TargetProblem.NOT_A_SOCKET
            self.report.detail = f"{self.socket} is {what}, not a QMP monitor socket: nothing was opened"
            return

        def connected(sock: Any) -> None:
            pid[0] = peer_pid(sock)
            ps = process_state(pid[0]) if pid[0] else None
            if ps is not None and ps[0] in "Tt":  # no use waiting for a greeting
                raise QMPConnectionError("stopped", ConnectionProblem.NO_GREETING)

        for attempt in range(3):
            remaining = max(0.05, deadline - time.monotonic())
            self.client = QMPClient(self.socket, timeout=remaining)
            try:
                self.client.connect(greeting_timeout=min(remaining, GREETING_WAIT), on_connected=connected)
                break
            except QMPConnectionError as e:
                # a QEMU chardev finishing with its previous client can drop the next one before
                # greeting it: try again while time remains
                if e.kind is ConnectionProblem.CLOSED and attempt < 2 and deadline - time.monotonic() > 0.5:
                    self.client.close()
                    time.sleep(0.1)
                    continue
                self._fail(e, pid[0])
                return
            except QMPCommandError as e:  # qmp_capabilities refused: whatever this is, it is not usable
                self._fail(QMPConnectionError(f"the monitor refused qmp_capabilities: {e.cls}: {e.desc}",
                                              ConnectionProblem.NOT_QMP), pid[0])
                return
            except OSError as e:
                self._fail(QMPConnectionError(f"cannot connect to {self.socket}: {e.strerror or e}"), pid[0])
                return
        self.report.pid = pid[0]
        assert self.client is not None
        try:
            self.client.set_timeout(max(0.05, deadline - time.monotonic()))
            bare = GuardedMonitor(self.client, TargetKind.UNKNOWN)
            version = _try(bare, "query-version")
            commands = _try(bare, "query-commands")
            self.info = identify(self.client.greeting, version, commands)
            self.report.kind = self.info.kind
            self.report.version = self.info.version if not self.info.package or self.info.package.startswith(
                "kickcall") else f"{self.info.version} ({self.info.package})"
            self.guard = GuardedMonitor(self.client, self.info.kind, fix=self.fix)
            self.guard.sent = bare.sent + self.guard.sent
            self._choose_sampler()
        except QMPConnectionError as e:
            self._fail(e, pid[0])
        except QMPCommandError as e:
            self.report.problem = TargetProblem.QUERY_FAILED
            self.report.detail = f"the monitor refused x-query-virtio: {e.cls}: {e.desc}"

    def _choose_sampler(self) -> None:
        assert self.guard is not None and self.info is not None
        k = self.info.kind
        r = self.report
        # --dev is applied to the report, not here: a QEMU device and its back-end's name differ, and
        # the back-end's side is needed to join them
        if k is TargetKind.KICKCALL_MACHINE or k is TargetKind.KICKCALL_BACKEND:
            self.sampler = Sampler(self.guard, queue=self.queue)
            self.sampler.addresses = k is TargetKind.KICKCALL_BACKEND
        elif k is TargetKind.QEMU:
            self.sampler = QemuSampler(self.guard, queue=self.queue, emulated_paths=self.guard.emulated_paths)
        elif k is TargetKind.QEMU_WITHOUT_VIRTIO_QUERIES:
            r.problem = TargetProblem.NO_VIRTIO_QUERIES
            r.detail = (f"QEMU {self.info.version} has no virtio queries (x-query-virtio and the rest appeared in "
                        "7.2): diagnose cannot see its rings. Give the vhost-user back-end's monitor instead, or "
                        "run QEMU 7.2 or later")
            st = _try(self.guard, "query-status")
            if isinstance(st, dict) and isinstance(st.get("status"), str):
                r.run_state = st["status"]
        elif k is TargetKind.QEMU_STORAGE_DAEMON:
            r.problem = TargetProblem.NO_RING_STATE
            ex = _try(self.guard, "query-block-exports")
            exports = [f"{e.get('id')} ({e.get('type')}, node {e.get('node-name')})" for e in ex
                       if isinstance(e, dict)] if isinstance(ex, list) else []
            r.detail = ("qemu-storage-daemon exposes no ring state over QMP: diagnose the front-end (QEMU's monitor) "
                        "for these rings" + (f"; exports: {', '.join(exports)}" if exports else "; no exports"))
        else:
            r.problem = TargetProblem.UNKNOWN_MONITOR
            r.detail = ("a QMP monitor kickcall does not know (neither QEMU, qemu-storage-daemon nor kickcall): "
                        "nothing is queried beyond its version and command list")
        if self.sampler is not None:
            devs = self.guard.execute("x-query-virtio")
            self.devices = [d for d in devs if isinstance(d, dict)] if isinstance(devs, list) else []

    def take_sample(self, deadline: float) -> None:
        if not self.live:
            return
        assert self.client is not None and self.sampler is not None
        try:
            self.client.set_timeout(max(0.05, min(QUERY_WAIT, deadline - time.monotonic())))
            s = self.sampler.sample()
        except QMPConnectionError as e:
            self._fail(e, self.report.pid)
            return
        except QMPCommandError as e:  # query-status or x-query-virtio refused: nothing to sample
            self.report.problem = TargetProblem.QUERY_FAILED
            self.report.detail = f"the monitor refused a query every sample needs: {e.cls}: {e.desc}"
            return
        self.report.run_state = s.run_state
        self.history.append(s)
        del self.history[:-200]

    def close(self) -> None:
        if self.client is not None:
            self.client.close()


def _try(mon: GuardedMonitor, cmd: str, args: dict | None = None) -> Any:
    try:
        return mon.execute(cmd, args)
    except QMPCommandError:
        return None


def _queue_keys(sess: TargetSession) -> list[tuple[str, int]]:
    if not sess.history:
        return []
    last = sess.history[-1]
    return [(p, q.queue) for p, d in last.devices.items() for q in d.queues]


def _backend_front_end(sess: TargetSession, path: str, queue: int) -> int | None:
    """The front-end's pid as a back-end's queue names it."""
    d = sess.history[-1].devices.get(path) if sess.history else None
    q = next((x for x in d.queues if x.queue == queue), None) if d else None
    return front_end_pid(q.status.get("front-end")) if q else None


def _joins(sessions: list[TargetSession]) -> tuple[dict[tuple[int, str, int], tuple[int, str, int]], list[str]]:
    """(qemu session, path, queue) -> (back-end session, path, queue): the same ring seen from both
    sides, matched by its addresses (what QEMU sent in SET_VRING_ADDR) and, where both are known,
    by QEMU's pid (the back-end's front-end).  Ambiguous matches are not joined; they are noted."""
    by_addr: dict[tuple, list[tuple[int, str, int]]] = {}
    for i, s in enumerate(sessions):
        if s.report.kind is TargetKind.KICKCALL_BACKEND and s.history:
            for p, d in s.history[-1].devices.items():
                for q in d.queues:
                    a = q.ring_addresses()
                    if a is not None:
                        by_addr.setdefault(a, []).append((i, p, q.queue))
    out: dict[tuple[int, str, int], tuple[int, str, int]] = {}
    notes: list[str] = []
    for i, s in enumerate(sessions):
        if s.report.kind is not TargetKind.QEMU or not s.history:
            continue
        for p, d in s.history[-1].devices.items():
            for q in d.queues:
                a = q.ring_addresses()
                cands = list(by_addr.get(a, [])) if a is not None else []
                pid = s.report.pid
                cands = [c for c in cands if pid is None or _backend_front_end(sessions[c[0]], c[1], c[2]) in
                         (None, pid)]
                if len(cands) == 1:
                    out[(i, p, q.queue)] = cands[0]
                elif len(cands) > 1:
                    notes.append(f"{s.socket} {p} queue {q.queue}: {len(cands)} back-end queues have its ring "
                                 "addresses; not joined")
    return out, notes


def _qemu_of(sessions: list[TargetSession], pid: int | None) -> TargetSession | None:
    """The QEMU session whose process is *pid* (a back-end's front-end)."""
    if pid is None:
        return None
    return next((s for s in sessions if s.report.kind is TargetKind.QEMU and s.report.pid == pid and s.history),
                None)


def dev_matches(dev: str | None, path: str) -> bool:
    """--dev names a device by its QOM path or by any component of it (its id)."""
    return dev is None or dev == path or dev in path.strip("/").split("/")


def _check_selection(sessions: list[TargetSession], dev: str | None, queue: int | None) -> None:
    live = [s for s in sessions if s.history]
    if not live:
        return
    if dev is not None and not any(dev_matches(dev, p) for s in live for p in s.history[-1].devices):
        names = sorted({d["path"] for s in sessions for d in s.devices})
        raise UnknownSelection(f"no virtio device {dev!r}" + (f"; the devices are: {', '.join(names)}" if names
                                                              else "; the targets have no virtio devices"))
    if queue is not None and not any(d.queues for s in live for p, d in s.history[-1].devices.items()
                                     if dev_matches(dev, p)):
        raise UnknownSelection(f"no queue {queue} on " + (f"device {dev!r}" if dev else "any device")
                               + " (queues are numbered from 0)")


def diagnose(sessions: list[TargetSession], *, samples: int = 4, interval: float = 0.5, timeout: float = 15.0,
             window: float = DEFAULT_WINDOW, dev: str | None = None, queue: int | None = None,
             deadline: float | None = None) -> Report:
    """Open (if need be) and sample every session until each queue has a final verdict."""
    t_end = deadline if deadline is not None else time.monotonic() + timeout
    for s in sessions:
        if s.client is None:
            s.open(t_end)
    for s in sessions:
        s.history.clear()
    first = True
    while True:
        for s in sessions:
            s.take_sample(t_end)
        if first:
            _check_selection(sessions, dev, queue)
            first = False
        out_of_time = time.monotonic() >= t_end
        verdicts = {(i, p, q): judge(s.history, p, q, samples, window=window, out_of_time=out_of_time)
                    for i, s in enumerate(sessions) for p, q in _queue_keys(s)}
        if out_of_time or all(v.final for v in verdicts.values()):
            break
        time.sleep(max(0.0, min(interval, t_end - time.monotonic())))
    return _report(sessions, verdicts, samples=max((len(s.history) for s in sessions), default=0),
                   interval=interval, window=window, dev=dev)


def _report(sessions: list[TargetSession], verdicts: dict, *, samples: int, interval: float,
            window: float, dev: str | None = None) -> Report:
    rep = Report([s.report for s in sessions], samples, interval, window)
    joins, notes = _joins(sessions)
    for n in notes:
        sessions[0].report.notes.append(n)
    joined_backend = set(joins.values())
    for (i, p, q), v in verdicts.items():
        s = sessions[i]
        if (i, p, q) in joined_backend:
            continue  # reported under QEMU's device path
        name = s.history[-1].devices[p].name
        j = joins.get((i, p, q))
        if not (dev_matches(dev, p) or (j is not None and dev_matches(dev, j[1]))):
            continue
        if j is not None:
            v = _join(v, verdicts[j], s, sessions[j[0]], p, q, j)
            rep.queues.append(QueueReport(s.socket, p, name, q, v, s.report.kind,
                                          {"target": sessions[j[0]].socket, "path": j[1], "queue": j[2]}))
            continue
        if s.report.kind is TargetKind.KICKCALL_BACKEND:
            v = _with_front_end(v, sessions, s, p, q)
        rep.queues.append(QueueReport(s.socket, p, name, q, v, s.report.kind,
                                      vector=s.history[-1].devices[p].passthrough))
    return rep


def _with_front_end(v: Verdict, sessions: list[TargetSession], s: TargetSession, path: str, queue: int) -> Verdict:
    """A back-end's verdict, told what its front-end (QEMU, when its monitor was given) is doing."""
    fe = _backend_front_end(s, path, queue)
    qemu = _qemu_of(sessions, fe)
    if qemu is None:
        return v
    rs = qemu.report.run_state
    if rs != "running" and v.kind in (STOPPED, UNDECIDED, IDLE, NOT_STARTED):
        return Verdict(PAUSED, [f"its front-end, QEMU pid {fe} ({qemu.socket}), is {rs}: QEMU stops the vhost rings "
                                "while the VM does not run"] + v.evidence, facts=v.facts, summary=f"front-end {rs}",
                       severity=Severity.PROBLEM if rs in FAILED_RUN_STATES else Severity.INFO)
    if v.kind == STOPPED:
        v.evidence.append(f"its front-end, QEMU pid {fe} ({qemu.socket}), runs and has not started this ring (or "
                          "has it stopped): the driver reset the device, or is setting it up")
    return v


def _join(qv: Verdict, bv: Verdict, qs: TargetSession, bs: TargetSession, path: str, queue: int,
          j: tuple[int, str, int]) -> Verdict:
    """One verdict for a ring seen from QEMU (*qv*) and from its back-end (*bv*)."""
    qsample = next(q for q in qs.history[-1].devices[path].queues if q.queue == queue)
    st = qsample.status

    def h(x: object) -> str:
        return f"{x:#x}" if isinstance(x, int) else "?"

    qemu_line = (f"QEMU ({qs.socket}) sees this ring at guest-physical avail {h(st.get('vring-avail'))}, used "
                 f"{h(st.get('vring-used'))}: avail.idx {st.get('avail-idx')}, used.idx {st.get('used-idx-ring')}, "
                 f"used_event {st.get('used-event')}, avail_event {st.get('avail-event')} (guest memory)")
    back_line = f"the back-end's monitor ({bs.socket}, {j[1]} queue {j[2]}) gives the device side:"
    if qv.kind == PAUSED:
        return Verdict(PAUSED, qv.evidence + [qemu_line], severity=qv.severity, summary=qv.summary)
    v = Verdict(bv.kind, [qemu_line, back_line] + bv.evidence, fix=bv.fix, needs_force=bv.needs_force,
                facts=dict(bv.facts), severity=bv.severity, final=bv.final, summary=bv.summary)
    v.facts.update({f"qemu-{k}": st.get(k) for k in ("avail-idx", "used-idx-ring", "used-event", "avail-event")})
    if bv.kind == STOPPED and st.get("x-qemu-vhost-started"):
        v.evidence.append("QEMU believes its vhost device is started: the ring was stopped behind QEMU's back "
                          "(a GET_VRING_BASE QEMU did not pair with a restart, e.g. x-query-virtio-queue-status)"
                          + (f"; {RESTART_ADVICE}" if RESTART_ADVICE else ""))
        v.severity = Severity.PROBLEM
        v.summary = "stopped behind QEMU's back"
    return v


# ---------------------------------------------------------------------------------------------------
# --fix
# ---------------------------------------------------------------------------------------------------
def _ring(mon: GuardedMonitor, path: str, queue: int) -> tuple:
    st = mon.execute("x-query-virtio-queue-status", {"path": path, "queue": queue}) or {}
    return tuple(st.get(k) for k in ("avail-idx", "last-avail-idx", "used-idx-ring", "used-idx", "used-event"))


def _qemu_advice(v: Verdict) -> str:
    if v.kind == STOPPED:
        return ("the front-end stopped this ring; only the front-end restarts it"
                + (f": {RESTART_ADVICE}" if RESTART_ADVICE else " (when it starts the device again)"))
    return ("QEMU has no command that injects a kick or a call, and kickcall sends QEMU nothing that changes "
            "state; give the vhost-user back-end's monitor too (--qmp again) to act on a vhost ring")


def apply_fixes(sessions: list[TargetSession], rep: Report, *, force: bool = False, confirm_timeout: float = 10.0,
                log: Callable[[str], None] = print) -> None:
    """Inject the single event each problem calls for, where the target has a safe way to, and
    confirm the queue moved.  A masked vector is refused unless *force*; the guest's mask is never
    touched.  A stopped ring is never kicked."""
    by_socket = {s.socket: s for s in sessions}
    for q in [q for q in rep.queues if q.verdict.problem or q.verdict.kind == STOPPED]:
        v = q.verdict
        fixer, path, queue = by_socket[q.target], q.path, q.queue
        if q.joined is not None:
            fixer, path, queue = by_socket[q.joined["target"]], q.joined["path"], q.joined["queue"]
        if v.kind == STOPPED:
            q.fix_result = {"injected": False, "reason": "refused: " + _qemu_advice(v)
                            + "; a back-end must not process a ring its front-end stopped"}
            continue
        if fixer.report.kind not in (TargetKind.KICKCALL_MACHINE, TargetKind.KICKCALL_BACKEND):
            q.fix_result = {"injected": False, "reason": "no safe way to act on this target: " + _qemu_advice(v)}
            continue
        if v.fix is None:
            q.fix_result = {"injected": False, "reason": "no single event recovers this: " + str(v.kind)}
            continue
        if v.needs_force and not force:
            q.fix_result = {"injected": False, "reason": "refused: the guest masked this vector; an injected call "
                            "would only set its PBA bit. --force delivers one interrupt past the mask"}
            continue
        mon = fixer.guard
        assert mon is not None
        try:
            before = _ring(mon, path, queue)
            res = mon.execute("x-debug-device-event", {"dev": path, "event": v.fix, "queue": queue,
                                                       "force": bool(v.needs_force and force)})
        except QMPCommandError as e:
            q.fix_result = {"injected": False, "reason": f"{e.cls}: {e.desc}"}
            continue
        res = res if isinstance(res, dict) else {}
        log(f"kickcall diagnose: injected {v.fix} on {path} queue {queue} through {res.get('path')}"
            + (" (FORCED past the guest's mask)" if res.get("forced") else ""))
        deadline = time.monotonic() + confirm_timeout
        after = before
        while time.monotonic() < deadline:
            after = _ring(mon, path, queue)
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


# ---------------------------------------------------------------------------------------------------
# output
# ---------------------------------------------------------------------------------------------------
def _summary(v: Verdict) -> str:
    """A few words for the one-line report."""
    f = v.facts
    if v.summary:
        return v.summary
    if f.get("oldest-request-s") is not None:
        return f"oldest request {f['oldest-request-s']:.1f} s"
    if v.kind == HEALTHY:
        return "progress in every interval"
    if v.kind == IDLE:
        return "nothing outstanding"
    if v.kind == LOST_KICK:
        return f"avail.idx {f.get('avail-idx')}, device at {f.get('last-avail-idx')}: no kick came"
    if v.kind in (LOST_CALL, MASKED_PENDING, NO_CALL_FD):
        return f"used.idx {f.get('used-idx')} past used_event {f.get('used-event')}, not consumed"
    if v.kind == STOPPED:
        return "stopped by its front-end (GET_VRING_BASE)"
    line = next((e for e in v.evidence[1:] if not e.startswith(("nothing outstanding", "outstanding work"))),
                v.evidence[-1] if v.evidence else "")
    return line if len(line) <= 60 else line[:57] + "..."


def short_path(path: str) -> str:
    """A device as an operator names it: its qdev id (``/machine/peripheral/ID/virtio-backend``)."""
    parts = path.strip("/").split("/")
    if len(parts) >= 3 and parts[0] == "machine" and parts[-1] == "virtio-backend":
        return parts[-2]
    return path


def format_report(rep: Report, *, verbose: bool = False) -> str:
    """One header line per monitor, one line per queue (-v: the evidence), a summary line."""
    lines = []
    by_target: dict[str, list[QueueReport]] = {}
    for q in rep.queues:
        by_target.setdefault(q.target, []).append(q)
    for t in rep.targets:
        if t.problem is not None:
            lines.append(f"{t.socket}: {str(t.problem).upper()}")
            lines.append(f"    {t.detail}")
            continue
        lines.append(f"{t.socket}: {t.kind.value if t.kind else '?'} {t.version}, {_who(t.pid)}, {t.run_state}"
                     if verbose else f"{t.socket}: {t.kind.value if t.kind else '?'}, {t.run_state}")
        for n in t.notes:
            lines.append(f"    note: {n}")
        for q in by_target.get(t.socket, []):
            v = q.verdict
            tag = str(v.kind).upper() if v.problem else str(v.kind)
            head = f"  {short_path(q.path)} {'v' if q.vector else 'q'}{q.queue}: {tag}"
            summ = _summary(v)
            if summ:
                head += f" -- {summ}"
            if q.joined:
                head += " [+back-end]"
            lines.append(head)
            if verbose:
                if q.path != short_path(q.path):
                    lines.append(f"    - device {q.path}")
                if q.joined:
                    lines.append(f"    - joined with {q.joined['target']} ({q.joined['path']} queue "
                                 f"{q.joined['queue']})")
                for e in v.evidence:
                    lines.append(f"    - {e}")
                for u in v.unknown:
                    lines.append(f"    - unknown: {u}")
            if v.problem or v.kind == STOPPED:
                if q.fix_result is None:
                    if v.fix and (q.target_kind in (TargetKind.KICKCALL_MACHINE, TargetKind.KICKCALL_BACKEND)
                                  or q.joined):
                        lines.append(f"    fix: inject one {v.fix}" + (" (needs --force: masked vector)"
                                                                       if v.needs_force else "") + " (--fix)")
                elif q.fix_result.get("injected"):
                    r = q.fix_result
                    lines.append(f"    fixed: {r['event']} injected through {r['path']}"
                                 + (" (forced)" if r["forced"] else "")
                                 + ("; the queue moved" if r["moved"] else "; the queue did NOT move"))
                    if r.get("note"):
                        lines.append(f"    - {r['note']}")
                else:
                    lines.append(f"    not fixed: {q.fix_result['reason']}")
    bad = [t for t in rep.targets if t.problem is not None]
    undecided = [q for q in rep.queues if q.verdict.kind == UNDECIDED]
    if rep.problems:
        summary = f"{len(rep.problems)} stalled queue(s), {len(rep.unresolved())} unresolved"
    elif not rep.queues:
        summary = "nothing diagnosed" if bad else "no virtio queues"
    else:
        summary = f"no stalled queue among {len(rep.queues)}"
    if undecided:
        summary += f"; {len(undecided)} undecided"
    if bad:
        summary += f"; {len(bad)} monitor(s) not diagnosed"
    lines.append("kickcall diagnose: " + summary)
    return "\n".join(lines)


def exit_status(rep: Report) -> int:
    """1: a stalled queue not recovered; 2: none found, but a monitor could not be read (or shows no
    rings); 0 otherwise."""
    if rep.unresolved():
        return 1
    if any(t.problem is not None for t in rep.targets) or any(q.verdict.kind == UNDECIDED for q in rep.queues):
        return 2
    return 0

