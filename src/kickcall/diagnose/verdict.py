"""From samples of one virtqueue to a verdict, with the evidence behind it.

The rules follow the split ring's notification protocol (virtio 1.2, 2.7.7 and 2.7.10):

* the device's position ``last_avail`` behind ``avail.idx`` means buffers the device has not
  taken.  If the device asked to be notified (EVENT_IDX: ``avail_event`` lies in
  ``[last_avail, avail.idx)``; without it: ``used.flags`` has no NO_NOTIFY) the driver had to
  kick: the kick was lost.  A kick eventfd that stays readable in every sample is never read: the
  device (or back-end) is not processing, whatever the rings say.  If the device suppressed notifications it promised to
  poll, and it is not: not processing either.
* ``used.idx`` past ``used_event`` (EVENT_IDX) means the driver asked for an interrupt at
  ``used_event`` and the device went past it: it had to signal.  The driver moves
  ``used_event`` when it consumes used entries, so a stable gap means the interrupt never
  arrived: a lost call -- or, when the queue's MSI-X vector is masked with its PBA bit set, a
  vector masked with an event pending (the interrupt is held by the mask the guest set).
* indices further apart than the ring size, or a device that set DEVICE_NEEDS_RESET: the ring
  is corrupt; no single event fixes that.
* nothing outstanding: idle.  Anything moving between samples: healthy.

* a ring's lifecycle comes first: a ring the front-end stopped (GET_VRING_BASE), one not set up
  or not started yet, a back-end with no front-end, a device the driver reset or has not made
  ready, one that set DEVICE_NEEDS_RESET -- each is its own verdict, never a lost kick or call.
* a request taken and not completed is judged by its age against ``--window``: "slow" while it is
  younger (and when completions are seen to come, however late), "not processing" once older.
  The age is the target's own (``oldest-inflight-ms``) where it has one, otherwise how long
  diagnose has seen the queue stand still (a lower bound, and said so).

A passthrough (vfio-user) function is judged per MSI-X vector (``judge_vector_state``): the host
signals the eventfd its trigger points at -- the irqfd while the guest has the vector unmasked,
the VMM's own eventfd while it is masked (vfio cannot mask in the host; the VMM sets the PBA bit).
Injections the hypervisor dropped, or an eventfd that stays readable in every sample, are host
interrupts that never reached the guest; a masked vector with its PBA bit set is one the guest's
mask holds.

A verdict other than healthy is only given when several samples, some time apart, are equal.
Without EVENT_IDX the driver's consumption is invisible: a lost call on the last completion then
looks idle, and the verdict says so.
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass, field

from .sample import DeviceSample, QueueSample, Sample

__all__ = ["Verdict", "VerdictKind", "Severity", "HEALTHY", "SLOW", "IDLE", "LOST_KICK", "LOST_CALL",
           "MASKED_PENDING", "NOT_PROCESSING", "NOT_TAKEN", "STALLED", "RING_CORRUPT", "NEEDS_RESET", "STOPPED",
           "DISABLED", "NOT_STARTED", "NOT_SET_UP", "NO_FRONT_END", "NO_KICK_FD", "NO_CALL_FD", "DEVICE_RESET",
           "NOT_READY", "PAUSED", "UNDECIDED", "CALL_NOT_READ", "HOST_IRQ_LOST", "MASK_NOT_HONOURED", "PIRQ_SHARED", "ERROR_RECOVERY", "judge",
           "judge_state",
           "judge_vector_state", "ring_facts",
           "DEFAULT_WINDOW", "FAILED_RUN_STATES", "front_end_pid", "RESTART_ADVICE"]

DEFAULT_WINDOW = 5.0  # seconds a request may stay taken and not completed before "not processing"


class VerdictKind(enum.StrEnum):
    HEALTHY = "healthy"
    SLOW = "slow"
    IDLE = "idle"
    LOST_KICK = "lost kick"
    LOST_CALL = "lost call"
    MASKED_PENDING = "vector masked with an event pending"
    NOT_PROCESSING = "not processing"
    NOT_TAKEN = "buffers not taken"  # lost kick or not processing: this target cannot tell which
    STALLED = "stalled"  # requests outstanding past --window; whether the device took them is unknown
    RING_CORRUPT = "ring corrupt"
    NEEDS_RESET = "device needs reset"
    STOPPED = "ring stopped"
    DISABLED = "ring disabled"
    NOT_STARTED = "ring not started"
    NOT_SET_UP = "ring not set up"
    NO_FRONT_END = "no front-end"
    NO_KICK_FD = "no kick fd"
    NO_CALL_FD = "no call fd"
    CALL_NOT_READ = "call not read"  # the back-end signalled; its front-end does not read the call fd
    DEVICE_RESET = "device reset"
    NOT_READY = "driver not ready"
    PAUSED = "paused"
    UNDECIDED = "undecided"
    HOST_IRQ_LOST = "host interrupt not delivered"  # a passthrough vector: the host signalled, the guest never got it
    MASK_NOT_HONOURED = "vector mask not honoured"  # a passthrough vector the guest masked still goes to the irqfd
    PIRQ_SHARED = "pirq claimed by two devices"  # Xen: one pirq named or mapped by two MSI-X entries
    ERROR_RECOVERY = "PCIe error recovery"  # a passthrough function's host reported an AER error


class Severity(enum.StrEnum):
    OK = "ok"  # healthy, idle
    INFO = "info"  # a state worth knowing, nothing stuck (not set up yet, slow, paused, ...)
    PROBLEM = "problem"  # the guest waits for something that will not come


(HEALTHY, SLOW, IDLE, LOST_KICK, LOST_CALL, MASKED_PENDING, NOT_PROCESSING, NOT_TAKEN, STALLED, RING_CORRUPT,
 NEEDS_RESET, STOPPED, DISABLED, NOT_STARTED, NOT_SET_UP, NO_FRONT_END, NO_KICK_FD, NO_CALL_FD, CALL_NOT_READ,
 DEVICE_RESET, NOT_READY, PAUSED, UNDECIDED, HOST_IRQ_LOST, MASK_NOT_HONOURED, PIRQ_SHARED, ERROR_RECOVERY) = \
    tuple(VerdictKind)

_ALWAYS_PROBLEM = {LOST_KICK, LOST_CALL, MASKED_PENDING, NOT_PROCESSING, NOT_TAKEN, STALLED, RING_CORRUPT,
                   NEEDS_RESET, CALL_NOT_READ, HOST_IRQ_LOST, MASK_NOT_HONOURED, PIRQ_SHARED}

# QEMU run states in which the VM stopped by itself: a hung VM, not an operator's pause
FAILED_RUN_STATES = frozenset({"io-error", "internal-error", "guest-panicked", "watchdog", "shutdown"})
_OK = {HEALTHY, IDLE}

VRING_USED_F_NO_NOTIFY = 1
VRING_AVAIL_F_NO_INTERRUPT = 1


@dataclass
class Verdict:
    kind: VerdictKind
    evidence: list[str] = field(default_factory=list)
    fix: str | None = None  # "kick" or "call": the single event that recovers the queue
    needs_force: bool = False  # the event would go through a vector the guest masked
    facts: dict = field(default_factory=dict)
    severity: Severity | None = None  # None: from the kind (lifecycle kinds pass it: work outstanding or not)
    final: bool = True  # False: sampling on may still change it (undecided, slow and still young)
    unknown: list[str] = field(default_factory=list)  # what the target does not expose
    summary: str = ""  # a few words for the one-line report ("" : from the evidence)

    def __post_init__(self) -> None:
        if self.severity is None:
            self.severity = (Severity.PROBLEM if self.kind in _ALWAYS_PROBLEM else
                             Severity.OK if self.kind in _OK else Severity.INFO)

    @property
    def problem(self) -> bool:
        return self.severity is Severity.PROBLEM

    def as_dict(self) -> dict:
        return {"verdict": str(self.kind), "severity": str(self.severity), "summary": self.summary,
                "evidence": list(self.evidence),
                "fix": self.fix, "needs-force": self.needs_force, "facts": dict(self.facts),
                "unknown": list(self.unknown)}


# Verified on QEMU 7.2 (tests/test_qemu_query_safety.py, tests/test_diagnose_field.py): a vhost-user
# ring stopped behind QEMU's back (GET_VRING_BASE) is set up again by `stop` then `cont` on QEMU's
# monitor -- `stop` stops the rings, `cont` sends the full set-up (SET_VRING_NUM/BASE/ADDR/KICK/CALL)
# -- and the request the guest published meanwhile completes.  Empty: not verified, so not advised.
RESTART_ADVICE = ("on QEMU 7.2, `stop` then `cont` on QEMU's monitor sets the vhost rings up again (the guest "
                  "pauses for the moment between them; verified with kickcall's back-end)")


def front_end_pid(v: object) -> int | None:
    """The pid in a back-end's ``front-end`` field ("pid 123 uid 0"), if any."""
    if isinstance(v, str) and v.startswith("pid "):
        try:
            return int(v.split()[1]) or None
        except (IndexError, ValueError):
            return None
    return None


def _proc(pid: int) -> tuple[str, str] | None:
    from ..monitor.client import process_state

    return process_state(pid)


def _in_window(x: int, start: int, end: int) -> bool:
    """x in [start, end) on 16-bit ring indices."""
    return (x - start) & 0xFFFF < (end - start) & 0xFFFF


def _num(v: object) -> int | None:
    return v if isinstance(v, int) and not isinstance(v, bool) else None


def _ms_stats(v: object) -> str:
    if not isinstance(v, dict) or not _num(v.get("count")):
        return ""
    p50, mx = v.get("p50"), v.get("max")
    if not (isinstance(p50, int | float) and isinstance(mx, int | float) and math.isfinite(p50)
            and math.isfinite(mx)):
        return ""
    return (f"this device's last {v.get('recent', v.get('count'))} completions took p50 {p50 / 1000:.3g} s, "
            f"max {mx / 1000:.3g} s")


def _lifecycle(s: QueueSample, statuses: list[str] | None, ev: list[str], facts: dict,
               outstanding: int | None) -> Verdict | None:
    """A verdict from the ring's (or the device's) lifecycle, before any index is read as a loss."""
    st = s.status
    rs = st.get("ring-state")
    work = (f"{outstanding} request(s) published by the driver and not completed" if outstanding
            else "nothing outstanding" if outstanding == 0 else "outstanding work unknown")
    sev = (Severity.PROBLEM if outstanding else Severity.INFO)
    gvb = _num(st.get("get-vring-base"))
    fe = st.get("front-end")
    if (statuses is not None and any("NEEDS_RESET" in x for x in statuses)) or st.get("needs-reset") is True:
        return Verdict(NEEDS_RESET, ev + ["the device set DEVICE_NEEDS_RESET: it found the guest's ring invalid "
                                          "and stopped the queue", "no single event recovers it: the driver must "
                                          "reset the device"], facts=facts)
    if rs == "no-front-end":
        return Verdict(NO_FRONT_END, ev + ["no front-end is connected to this back-end (yet): nothing drives the "
                                           "ring; a front-end (QEMU) connects when its device starts"],
                       facts=facts, severity=Severity.INFO)
    if statuses is not None and not statuses:
        return Verdict(DEVICE_RESET, ev + ["the device status is 0: the driver reset the device, or has not "
                                           "probed it yet"], facts=facts, severity=Severity.INFO)
    if statuses is not None and not any("DRIVER_OK" in x for x in statuses):
        return Verdict(NOT_READY, ev + ["the driver has not set DRIVER_OK: the device is being set up "
                                        "(or the driver gave up: " + ", ".join(x.split(":")[0] for x in statuses)
                                        + ")"], facts=facts, severity=Severity.INFO)
    if rs == "not-set-up":
        return Verdict(NOT_SET_UP, ev + ["the front-end (or driver) has not set this ring up: no ring addresses"
                                         + (f" (front-end {fe})" if fe else "")], facts=facts, severity=Severity.INFO)
    if rs == "not-started":
        why = ("QEMU's vhost device is not started (the driver has not set DRIVER_OK, or the VM is stopping)"
               if st.get("x-qemu-vhost-started") is False else
               "the ring is set up but not started: it starts on its first kick (vhost-user), or its kick fd "
               "has not been given")
        return Verdict(NOT_STARTED, ev + [why, work], facts=facts, severity=Severity.INFO)
    if rs == "stopped":
        return Verdict(STOPPED, ev + [
            "the front-end stopped this ring (GET_VRING_BASE" + (f", {gvb} so far" if gvb is not None else "")
            + "): a back-end must not process a stopped ring until the front-end sets it up again", work,
            "normal while the VM is paused, migrating or resetting the device; a stall if the VM runs and believes "
            "the ring started (give QEMU's monitor too, --qmp again, to know)"],
            facts=facts, severity=Severity.INFO)
    if rs == "disabled":
        return Verdict(DISABLED, ev + ["the front-end disabled this ring (SET_VRING_ENABLE 0): the back-end does "
                                       "not process it", work], facts=facts, severity=sev)
    kfd = _num(st.get("kick-fd"))
    if rs == "started" and kfd is not None and kfd < 0:
        return Verdict(NO_KICK_FD, ev + ["the ring is started but has no kick fd: the driver's doorbell reaches "
                                         "nobody", work], facts=facts, severity=sev)
    return None


def ring_facts(s: QueueSample) -> dict:
    """The numbers of one sample that a report carries (JSON numbers; None where unknown)."""
    st = s.status
    u = _num(st.get("used-idx-ring"))
    facts: dict = {"avail-idx": _num(st.get("avail-idx")), "last-avail-idx": _num(st.get("last-avail-idx")),
                   "used-idx": u if u is not None else _num(st.get("used-idx")), "used-event": _num(st.get("used-event")),
                   "avail-event": _num(st.get("avail-event")), "vring-num": _num(st.get("vring-num")) or 0,
                   "event-idx": bool(st.get("event-idx"))}
    for k in ("vring-desc", "vring-avail", "vring-used", "inuse", "kick-fd", "call-fd", "get-vring-base",
              "oldest-inflight-ms"):
        if _num(st.get(k)) is not None:
            facts[k] = st[k]
    if isinstance(st.get("ring-state"), str):
        facts["ring-state"] = st["ring-state"]
    a = s.ring_addresses()
    if a is not None:
        facts["user-addresses"] = list(a)
    return facts


def judge_state(s: QueueSample, statuses: list[str] | None, nsamples: int, span: float, *,  # noqa: C901
                window: float = DEFAULT_WINDOW, age: float | None = None) -> Verdict:
    """The verdict for a queue whose samples were all equal to *s* for *span* seconds.

    *statuses* is the device's status bits (None: this target does not know them); *age* how long
    diagnose has seen the queue stand still (default *span*), used when the target does not say
    how old its oldest request is."""
    st = s.status
    a = _num(st.get("avail-idx"))
    last = _num(st.get("last-avail-idx"))
    u = _num(st.get("used-idx-ring"))
    if u is None:
        u = _num(st.get("used-idx"))
    ue = _num(st.get("used-event"))
    ae = _num(st.get("avail-event"))
    num = _num(st.get("vring-num")) or 0
    event_idx = bool(st.get("event-idx"))
    stable = f"no progress in {nsamples} samples over {span:.1f} s"
    facts = ring_facts(s)
    kick = s.notifier("host")
    call = s.notifier("guest")
    masked_n = s.notifier("masked")
    ent = s.msix_entry
    masked = None if ent is None else bool(ent.get("masked") or s.function_masked)
    pba = None if ent is None else bool(ent.get("pending"))
    if ent is not None:
        facts.update({"vector": s.vector, "vector-masked": masked, "pba": pba})
    unknown = list(s.unknown)
    ev = [f"{stable}: avail.idx {a}, device position {last if last is not None else 'unknown'}, used.idx {u}"
          + (f", used_event {ue}, avail_event {ae}" if event_idx else "")]
    outstanding = ((a - u) & 0xFFFF) if a is not None and u is not None else None
    lc = _lifecycle(s, statuses, ev, facts, outstanding)
    if lc is not None:
        lc.unknown = unknown
        return lc
    if a is None or num == 0:
        why = str(st.get("x-unread-reason") or "the ring cannot be read (no ring addresses, or guest memory not "
                  "readable)")
        return Verdict(NOT_SET_UP, ev + [why], facts=facts, severity=Severity.INFO, unknown=unknown)

    def v(kind: VerdictKind, lines: list[str], **kw) -> Verdict:
        return Verdict(kind, lines, facts=facts, unknown=unknown, **kw)

    own = _num(st.get("oldest-inflight-ms"))
    if own is None and isinstance(st.get("oldest-inflight-ms"), float) and math.isfinite(st["oldest-inflight-ms"]):
        own = int(st["oldest-inflight-ms"])
    req_age = own / 1000 if own is not None else (span if age is None else age)
    age_src = ("the target's own clock" if own is not None else
               "how long diagnose has seen the queue stand still: the request may be older")
    stats = _ms_stats(st.get("completion-ms"))

    def taken_verdict(n: int, known: bool) -> Verdict:
        what = (f"{n} request(s) taken by the device and not completed" if known else
                f"{n} request(s) outstanding; whether the device took them is unknown")
        facts["oldest-request-s"] = round(req_age, 3)
        lines = ev + [what, f"oldest request {req_age:.1f} s ({age_src})"] + ([stats] if stats else [])
        if req_age >= window:
            return v(NOT_PROCESSING if known else STALLED,
                     lines + [f"older than --window {window:g} s: the device is not processing it"])
        return v(SLOW, lines + [f"younger than --window {window:g} s: slow, not (yet) stuck"], final=False)

    ahead = taken = 0
    if last is not None:
        ahead = (a - last) & 0xFFFF
        taken = ((last - u) & 0xFFFF) if u is not None else 0
        if ahead > num:
            return v(RING_CORRUPT, ev + [f"avail.idx is {ahead} entries past the device's position: more than "
                                         f"the ring holds ({num})"])
        if taken > num:
            return v(RING_CORRUPT, ev + [f"the device's position is {taken} entries past used.idx: more than "
                                         f"the ring holds ({num})"])
    elif outstanding is not None and outstanding > num:
        return v(RING_CORRUPT, ev + [f"avail.idx is {outstanding} entries past used.idx: more than the ring holds "
                                     f"({num})"])
    kick_pending = _num(kick.get("pending")) if kick else None
    if kick is not None and kick_pending and kick_pending > 0:
        # a live device reads its kick fd at once: one that stays readable over every sample is unread
        return v(NOT_PROCESSING, ev + [f"the kick eventfd (fd {kick.get('fd')}) holds {kick_pending} unread "
                                       f"in every sample: nobody reads it (the device or back-end is not "
                                       "running its queue)"])
    if last is None and outstanding:
        # a vhost ring seen from QEMU: the back-end's position is not exposed (asking would stop the ring)
        ev.append("the back-end's position is not exposed by this target (QEMU would have to send "
                  "GET_VRING_BASE, which stops the ring); give the back-end's monitor too (--qmp again) to know")
        tracks = bool(st.get("x-avail-event-tracks"))
        stopped_too = ("or the ring was stopped behind QEMU's back (GET_VRING_BASE)"
                       + (f": {RESTART_ADVICE}" if RESTART_ADVICE else ""))
        if event_idx and tracks and ae is not None and u is not None and _in_window(ae, u, a):
            return v(NOT_TAKEN, ev + [
                f"avail_event {ae} lies in [{u}, {a}): the back-end last looked at the ring at {ae} and asked to "
                f"be kicked for more (a vhost-user back-end updates avail_event as it takes buffers); "
                f"{(a - ae) & 0xFFFF} buffer(s) published since then were not taken",
                f"either the kick was lost, or the back-end is not processing, {stopped_too}: QEMU alone cannot "
                "tell which"])
        w = taken_verdict(outstanding, event_idx and tracks and ae == a)
        if w.kind in (STALLED, NOT_PROCESSING):
            w.evidence.append(f"(a ring stopped behind QEMU's back looks the same from QEMU: {stopped_too})")
        return w
    if last is not None:
        if ahead:
            ev.append(f"{ahead} buffer(s) made available and not taken by the device")
            if event_idx:
                asked = ae is not None and _in_window(ae, last, a)
                if not asked:
                    return v(NOT_PROCESSING, ev + [
                        f"avail_event {ae} is outside [{last}, {a}): the device suppressed kicks for these buffers "
                        "(it promised to poll) and has not taken them"])
                ev.append(f"avail_event {ae} lies in [{last}, {a}): the driver had to kick after publishing them")
            else:
                flags = _num(st.get("used-flags")) or 0
                if flags & VRING_USED_F_NO_NOTIFY:
                    return v(NOT_PROCESSING, ev + [
                        "used.flags has NO_NOTIFY: the device suppressed kicks (it promised to poll) and has not "
                        "taken them"])
                ev.append("used.flags has no NO_NOTIFY: the driver had to kick after publishing them")
            if kick is not None:
                ev.append(f"kick eventfd (fd {kick.get('fd')}): nothing pending" +
                          (f"; guest doorbell writes matched so far: {kick['writes']}" if "writes" in kick else ""))
            return v(LOST_KICK, ev + ["the kick never reached the device: inject one kick"], fix="kick")
        if taken:
            return taken_verdict(taken, True)

    # the device side is done; did the driver see the completions?
    owed = False
    if event_idx and u is not None and ue is not None:
        gap = (u - ue) & 0xFFFF
        if 0 < gap <= num:
            owed = True
            ev.append(f"used.idx {u} is past used_event {ue}: the driver asked for an interrupt at {ue}, the device "
                      f"went past it ({gap} completion(s) the driver has not consumed)")
            if ue == 0:
                ev.append("(used_event 0 is also what Linux writes when it disables this queue's interrupts to "
                          "process it: if the guest hung in its completion path, the guest is the cause)")
    elif not event_idx and masked and pba:
        owed = True
        ev.append("without EVENT_IDX the driver's consumption is invisible, but the vector holds an interrupt")
    if not owed:
        note = [] if event_idx else ["without EVENT_IDX the driver's consumption is not visible: a lost call on "
                                     "the last completion would look the same"]
        return v(IDLE, ev + ["nothing outstanding"] + note)
    cfd = _num(st.get("call-fd"))
    if cfd is not None and cfd < 0:
        return v(NO_CALL_FD, ev + ["the back-end has no call fd for this ring: it cannot signal the completion "
                                   "(the front-end gave none, or took it away)"])
    if masked:
        why = "the function mask" if s.function_masked and not (ent or {}).get("masked") else "its vector mask"
        if pba:
            return v(MASKED_PENDING, ev + [
                f"MSI-X vector {s.vector} is masked by the guest ({why}) and its PBA bit is set: the interrupt is "
                "held until the guest unmasks it",
                "kickcall never unmasks a vector the guest owns: --fix --force delivers one message past the mask"],
                fix="call", needs_force=True)
        ev.append(f"MSI-X vector {s.vector} is masked ({why}) and its PBA bit is clear: the call never reached it")
        return v(LOST_CALL, ev + ["a call now would only set the PBA bit: --fix --force delivers one"],
                 fix="call", needs_force=True)
    if call is not None and _num(call.get("pending")) and isinstance(st.get("ring-state"), str):
        fe = front_end_pid(st.get("front-end"))
        who = f"the front-end (pid {fe}" + (f", state {ps[0]} {ps[1]})" if fe and (ps := _proc(fe)) else ")") \
            if fe else "the front-end"
        return v(CALL_NOT_READ, ev + [
            f"the back-end signalled: the call eventfd (fd {call.get('fd')}) holds {call['pending']} unread in every "
            f"sample, and {who} does not read it (QEMU reads it through KVM's irqfd or its own handler)",
            "the front-end is not running (stopped, hung, or its main loop blocked): another call would not help"])
    if call is not None and _num(call.get("pending")):
        ev.append(f"the call eventfd (fd {call.get('fd')}) holds {call['pending']} unread: nothing delivers it "
                  "(no irqfd bound, nobody polling)")
    elif call is not None:
        ev.append(f"call eventfd (fd {call.get('fd')}): nothing pending")
    if masked_n is not None and _num(masked_n.get("pending")):
        ev.append(f"the masked notifier holds {masked_n['pending']} unread")
    if ent is not None:
        ev.append(f"MSI-X vector {s.vector}: unmasked, PBA clear")
    return v(LOST_CALL, ev + ["the interrupt never reached the driver: one call recovers it"], fix="call")


def _moved(first: QueueSample, last: QueueSample) -> list[str]:
    out = []
    for k in ("avail-idx", "last-avail-idx", "used-idx-ring", "used-idx", "used-event", "kicks", "calls"):
        x, y = first.status.get(k), last.status.get(k)
        if isinstance(x, int) and isinstance(y, int) and x != y:
            out.append(f"{k} {x} -> {y}")
    fn = {(n.get("role"), n.get("id")): n for n in first.notifiers if isinstance(n, dict)}
    for n in last.notifiers:
        if not isinstance(n, dict):
            continue
        p = fn.get((n.get("role"), n.get("id")))
        if p is None:
            continue
        for k in ("total", "writes"):  # (total falls when another process reads the fd: only rises count)
            if isinstance(p.get(k), int) and isinstance(n.get(k), int) and p[k] < n[k]:
                out.append(f"{n.get('role')} notifier {k} {p[k]} -> {n[k]}")
    return out


def judge(samples: list[Sample], path: str, queue: int, stable_needed: int, *, window: float = DEFAULT_WINDOW,
          out_of_time: bool = False) -> Verdict:
    """A verdict from consecutive samples.  ``final`` is False while sampling on could change it:
    UNDECIDED until enough of the latest samples agree or moved, SLOW while the oldest request is
    younger than *window* and no completion has been seen to come.  With *out_of_time* the best
    verdict so far is made final."""
    seq: list[tuple[Sample, DeviceSample, QueueSample]] = []
    for s in samples:
        d = s.devices.get(path)
        q = None if d is None else next((x for x in d.queues if x.queue == queue), None)
        if d is not None and q is not None:
            seq.append((s, d, q))
    if not seq:
        return Verdict(UNDECIDED, ["the queue was not seen"], final=out_of_time, summary="not seen")
    rs = seq[-1][0].run_state
    if rs not in ("running", "unknown"):
        stopped_for = _aer_stop(seq[-1][2]) if seq[-1][1].passthrough else None
        if stopped_for is not None:
            return stopped_for
        if rs in FAILED_RUN_STATES:
            return Verdict(PAUSED, [f"the VM stopped by itself: run state {rs}" + (
                " (a disk error with werror/rerror=stop: the guest waits until the error is dealt with and "
                "`cont`)" if rs == "io-error" else ""), "nothing moves until the VM runs again"],
                severity=Severity.PROBLEM, summary=f"VM stopped: {rs}")
        return Verdict(PAUSED, [f"the target is {rs}: a stopped machine makes no progress"], summary=rs)
    if seq[-1][1].passthrough:
        return _judge_vector(seq, stable_needed, out_of_time)
    keys = [q.key() for _s, _d, q in seq]
    run = 1
    while run < len(seq) and keys[-run - 1] == keys[-1]:
        run += 1
    # earlier stand-stills with requests in flight that then moved: the device is slow, not stuck
    slow_seen = 0.0
    i = 0
    while i < len(seq) - run:
        j = i
        while j + 1 < len(seq) and keys[j + 1] == keys[i]:
            j += 1
        if j > i and j + 1 < len(seq):
            s0, d0, q0 = seq[j]
            w = judge_state(q0, d0.statuses, j - i + 1, seq[j][0].time - seq[i][0].time, window=window)
            if w.kind == SLOW:
                slow_seen = max(slow_seen, float(w.facts.get("oldest-request-s", 0.0)))
        i = j + 1
    if run >= stable_needed:
        s_last, d, q = seq[-1]
        span = s_last.time - seq[-run][0].time
        v = judge_state(q, d.statuses, run, span, window=window)
        if v.kind == SLOW and (slow_seen or out_of_time):
            if slow_seen:
                v.evidence.append(f"requests were seen to complete after standing still (up to {slow_seen:.1f} s "
                                  "old): the device is slow, not stuck")
            v.final = True
        return v
    tail = seq[-stable_needed:]
    tkeys = keys[-stable_needed:]
    if len(tail) >= stable_needed and all(tkeys[i] != tkeys[i + 1] for i in range(len(tkeys) - 1)):
        span = tail[-1][0].time - tail[0][0].time
        return Verdict(HEALTHY, [f"progress in every one of {len(tail) - 1} intervals over {span:.1f} s"]
                       + _moved(tail[0][2], tail[-1][2]), unknown=list(seq[-1][2].unknown),
                       facts=ring_facts(seq[-1][2]))
    moved = _moved(seq[-2][2], seq[-1][2]) if len(seq) >= 2 and keys[-1] != keys[-2] else []
    if out_of_time:
        if slow_seen:
            return Verdict(SLOW, [f"requests in flight stood still for a while and then completed (up to "
                                  f"{slow_seen:.1f} s old)"] + (["moving: " + ", ".join(moved)] if moved else []),
                           unknown=list(seq[-1][2].unknown), facts=dict(ring_facts(seq[-1][2]),
                                                                        **{"oldest-request-s": round(slow_seen, 3)}))
        if run == 1 and len(seq) >= 2:  # it moved in the last interval
            return Verdict(HEALTHY, ["the queue moved in the last interval (and stood still in some before)"]
                           + (["moving: " + ", ".join(moved)] if moved else []), unknown=list(seq[-1][2].unknown),
                           facts=ring_facts(seq[-1][2]), summary="moving")
        span = seq[-1][0].time - seq[-run][0].time
        return Verdict(UNDECIDED, [f"out of time: the last {run} sample(s) over {span:.1f} s agree, {stable_needed} "
                                   "are needed for a verdict (raise --timeout, or lower --samples)"],
                       facts=ring_facts(seq[-1][2]), summary=f"{run} of {stable_needed} equal samples")
    if moved:
        return Verdict(UNDECIDED, ["moving: " + ", ".join(moved)], final=False, facts=ring_facts(seq[-1][2]))
    return Verdict(UNDECIDED, ["not enough samples yet"], final=False)


# ---------------------------------------------------------------------------------------------------
# passthrough (vfio-user) MSI-X vectors
# ---------------------------------------------------------------------------------------------------
def _judge_vector(seq: list[tuple[Sample, DeviceSample, QueueSample]], stable_needed: int,
                  out_of_time: bool) -> Verdict:
    """A passthrough vector's verdict: from its state once enough samples agree, or -- while it
    moves (interrupts flowing) -- from what moved."""
    keys = [q.key() for _s, _d, q in seq]
    run = 1
    while run < len(seq) and keys[-run - 1] == keys[-1]:
        run += 1
    first, last = seq[0][2], seq[-1][2]
    span = seq[-1][0].time - seq[0][0].time
    if run >= stable_needed:
        return judge_vector_state(last, first, span, stable=True)
    tail = keys[-stable_needed:]
    moving = len(tail) >= stable_needed and all(tail[i] != tail[i + 1] for i in range(len(tail) - 1))
    if moving or out_of_time:
        return judge_vector_state(last, first, span, stable=False)
    return Verdict(UNDECIDED, ["not enough samples yet"], final=False)


def _aer_text(last: dict) -> str:
    errs = last.get("errors")
    names = ", ".join(str(e) for e in errs) if isinstance(errs, list) and errs else "an error"
    return f"{last.get('severity', '?')} ({names})"


def _aer_stop(q: QueueSample) -> Verdict | None:
    """The VM stopped because the host reported a PCIe error on this function the VMM would not
    forward (fatal, unreadable, or no ``aer``): not a lost interrupt, and no event would help."""
    st = q.status
    last = st.get("aer-last")
    if st.get("aer-state") != "vm-stopped" or not isinstance(last, dict):
        return None
    return Verdict(ERROR_RECOVERY, [
        f"the host reported a {_aer_text(last)} PCIe error on the function (vfio-pci's ERR eventfd) and the VMM "
        "stopped the VM (X_VFIO_AER_ERROR, action stop): the host resets the link on its own; the guest cannot "
        "recover this error",
        "collect what you need (x-query-pci-aer on this machine and on the vfio-user server), then reset or "
        "restart the guest"], severity=Severity.PROBLEM, facts={"vector": q.queue, "aer": last},
        summary=f"VM stopped for a {last.get('severity', '?')} PCIe error")


def judge_vector_state(s: QueueSample, first: QueueSample | None = None, span: float = 0.0, *,
                       stable: bool = True) -> Verdict:
    """One MSI-X vector of a passthrough function, from its latest sample (*s*) and the first one
    of the run (*first*: what changed while diagnose watched).  *stable*: the latest samples agree
    (an eventfd readable in each of them is one nobody reads)."""
    st = s.status
    v = s.queue
    f0 = first.status if first is not None else {}
    unknown = list(s.unknown)
    trig = st.get("trigger")
    masked = bool(st.get("masked")) or bool(st.get("function-masked"))
    pba = bool(st.get("pending"))
    inj, drop = _num(st.get("injections")), _num(st.get("dropped"))
    inj0, drop0 = _num(f0.get("injections")), _num(f0.get("dropped"))
    facts = {k: st.get(k) for k in ("trigger", "gsi", "masked", "pending", "irqfd-pending", "interrupt-pending",
                                   "injections", "dropped", "path", "pirq")}
    facts["vector"] = v
    why_mask = "the function mask" if st.get("function-masked") and not st.get("masked") else "its vector mask"
    ev = [f"MSI-X vector {v}: the guest has it {'masked (' + why_mask + ')' if masked else 'unmasked'}, PBA "
          f"{'set' if pba else 'clear'}; the host's trigger points at "
          + {"irqfd": "the irqfd-bound eventfd (the hypervisor injects the MSI)",
             "interrupt": "the VMM's own eventfd (the VMM turns it into msix_notify: the PBA bit while masked)",
             "pirq": f"the eventfd mapped to pirq {st.get('pirq')} (Xen delivers it to the pirq's event channel)",
             "none": "nothing (vfio-pci drops the vector's interrupts)"}.get(str(trig), f"{trig!r}")]
    if inj is not None and drop is not None:
        ev.append(f"the hypervisor injected {inj} and dropped {drop} of this vector's irqfd signals (GSI "
                  f"{st.get('gsi')}; counted since the GSI was first used)")

    def verdict(kind: VerdictKind, lines: list[str], **kw) -> Verdict:
        return Verdict(kind, ev + lines, facts=facts, unknown=unknown, **kw)

    last_aer = st.get("aer-last")
    if st.get("aer-state") == "guest-recovering" and isinstance(last_aer, dict):
        facts["aer"] = last_aer
        return verdict(ERROR_RECOVERY, [
            f"the host reported a {_aer_text(last_aer)} PCIe error on the function, the VMM forwarded it through the "
            "virtual root port, and the guest has not cleared the function's AER status yet: its AER driver is "
            "recovering the function (interrupts may pause meanwhile; this is not a lost interrupt)"],
            severity=Severity.INFO, summary="in PCIe error recovery (guest)")
    conflict = st.get("pirq-conflict")
    if isinstance(conflict, dict) and conflict.get("text"):
        facts["pirq-conflict"] = conflict
        return verdict(PIRQ_SHARED, [
            f"{conflict['text']} (x-query-xen-pirqs): one pirq has one event channel, so the interrupts of one device "
            "reach the other's handler and the first waits for interrupts that never come",
            "the guest reused a pirq the device model had unmapped and the hypervisor handed to another device "
            "(a guest without the 2017 fresh-pirq fix), or the device model kept a mapping the guest no longer uses "
            "(QEMU before 2.1.0): the guest must reconfigure the vector with a fresh pirq"],
            summary=str(conflict["text"]))
    if not st.get("guest-msix-enabled") or not st.get("host-msix-enabled"):
        return verdict(NOT_SET_UP, ["MSI-X is not enabled " + ("in the guest" if not st.get("guest-msix-enabled")
                                                              else "in the host") + ": no vector carries interrupts"],
                       severity=Severity.INFO, summary=f"vector {v}: MSI-X off")
    fatal = st.get("fatal")
    if isinstance(fatal, dict):
        return verdict(HOST_IRQ_LOST, [f"the VMM could not wire this vector in the host ({fatal.get('error')}: "
                                       f"{fatal.get('reason')}): its interrupts go nowhere"],
                       summary=f"vector {v}: not wired in the host ({fatal.get('error')})")
    if trig == "none":
        if st.get("use") and not masked:
            return verdict(HOST_IRQ_LOST, ["the guest unmasked it, and it is not wired in the host: the host's "
                                           "interrupts for it are dropped by vfio-pci"],
                           summary=f"vector {v}: unmasked, not wired in the host")
        return verdict(NOT_SET_UP, ["not wired in the host: the guest has not brought it up"],
                       severity=Severity.INFO, summary=f"vector {v}: not wired")
    if drop:
        seen_drop = drop0 is not None and drop > drop0
        seen_inj = inj is not None and inj0 is not None and inj > inj0
        if seen_drop or not seen_inj:
            when = (f"{drop - (drop0 or 0)} of them while diagnose watched ({span:.1f} s)" if seen_drop else
                    "before diagnose began, and none delivered since")
            return verdict(HOST_IRQ_LOST, [
                f"the host signalled and the hypervisor dropped {drop} injection(s) of this vector's irqfd ({when}): "
                "those interrupts never reached the guest, and work the host raised them for may wait unconsumed",
                "a later interrupt on the vector would deliver again (if the drops stop): no single injection is "
                "safe to make from here"],
                summary=f"vector {v}: {drop} host interrupt(s) dropped by the hypervisor")
        ev.append(f"{drop} injection(s) were dropped before diagnose began; interrupts were delivered since")
    if stable and trig == "irqfd" and _num(st.get("irqfd-pending")):
        return verdict(HOST_IRQ_LOST, [
            f"the irqfd eventfd holds {st['irqfd-pending']} unread in every sample: the host signalled and the "
            "hypervisor does not read it (the irqfd is not bound, or the hypervisor is not running)"],
            summary=f"vector {v}: host interrupt unread in the irqfd")
    if stable and _num(st.get("interrupt-pending")):
        return verdict(HOST_IRQ_LOST, [
            f"the VMM's eventfd holds {st['interrupt-pending']} unread in every sample: the host signalled and the "
            "VMM's main loop does not turn it into " + ("the PBA bit" if masked else "an interrupt")],
            summary=f"vector {v}: host interrupt unread by the VMM")
    if masked and trig == "irqfd":
        return verdict(MASK_NOT_HONOURED, [
            "the guest masked the vector and the host's trigger still points at the irqfd: the host's interrupts "
            "reach the guest past its mask, and none is kept in the PBA (the VMM's masked-vector emulation is off, "
            "or the host refused the switch: x-query-vfio's errors)"],
            summary=f"vector {v}: masked, host trigger still on the irqfd")
    if masked and pba:
        return verdict(MASKED_PENDING, [
            f"the guest masked MSI-X vector {v} ({why_mask}) and its PBA bit is set: a host interrupt is held until "
            "the guest unmasks it (kickcall never unmasks a vector the guest owns)"],
            summary=f"vector {v}: masked, PBA set")
    if trig == "interrupt" and not masked:
        ev.append("the trigger points at the VMM's eventfd while the guest has the vector unmasked: each interrupt "
                  "goes through the VMM (msix_notify), not the irqfd (irqfd off, or a switch the host refused)")
    if not stable:
        moved = [f"{k} {f0.get(k)} -> {st.get(k)}" for k in ("injections", "userspace-interrupts")
                 if _num(f0.get(k)) is not None and _num(st.get(k)) is not None and st[k] != f0[k]]
        return verdict(HEALTHY, ["host interrupts flowing" + (": " + ", ".join(moved) if moved else "")],
                       summary=f"vector {v}: interrupts flowing")
    return verdict(HEALTHY, ["nothing held: no injection dropped, no eventfd left unread" +
                             ("" if masked else ", nothing pending")],
                   summary=f"vector {v}: host interrupts delivered" + (f" ({inj} injected)" if inj is not None else ""))
