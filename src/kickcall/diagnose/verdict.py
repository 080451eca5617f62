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

A verdict other than healthy is only given when several samples, some time apart, are equal.
Without EVENT_IDX the driver's consumption is invisible: a lost call on the last completion then
looks idle, and the verdict says so.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .sample import QueueSample, Sample

__all__ = ["Verdict", "HEALTHY", "IDLE", "LOST_KICK", "LOST_CALL", "MASKED_PENDING", "NOT_PROCESSING",
           "RING_CORRUPT", "PAUSED", "UNDECIDED", "judge", "judge_state", "PROBLEMS"]

HEALTHY = "healthy"
IDLE = "idle"
LOST_KICK = "lost kick"
LOST_CALL = "lost call"
MASKED_PENDING = "vector masked with an event pending"
NOT_PROCESSING = "backend not processing"
RING_CORRUPT = "ring corrupt"
PAUSED = "paused"
UNDECIDED = "undecided"
PROBLEMS = (LOST_KICK, LOST_CALL, MASKED_PENDING, NOT_PROCESSING, RING_CORRUPT)

VRING_USED_F_NO_NOTIFY = 1
VRING_AVAIL_F_NO_INTERRUPT = 1


@dataclass
class Verdict:
    kind: str
    evidence: list[str] = field(default_factory=list)
    fix: str | None = None  # "kick" or "call": the single event that recovers the queue
    needs_force: bool = False  # the event would go through a vector the guest masked
    facts: dict = field(default_factory=dict)

    @property
    def problem(self) -> bool:
        return self.kind in PROBLEMS

    def as_dict(self) -> dict:
        return {"verdict": self.kind, "evidence": list(self.evidence), "fix": self.fix,
                "needs-force": self.needs_force, "facts": dict(self.facts)}


def _in_window(x: int, start: int, end: int) -> bool:
    """x in [start, end) on 16-bit ring indices."""
    return (x - start) & 0xFFFF < (end - start) & 0xFFFF


def _num(v: object) -> int | None:
    return v if isinstance(v, int) and not isinstance(v, bool) else None


def judge_state(s: QueueSample, statuses: list[str], nsamples: int, span: float) -> Verdict:  # noqa: C901
    """The verdict for a queue whose samples were all equal to *s* (no progress)."""
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
    facts = {"avail-idx": a, "last-avail-idx": last, "used-idx": u, "used-event": ue, "avail-event": ae,
             "vring-num": num, "event-idx": event_idx}
    kick = s.notifier("host")
    call = s.notifier("guest")
    masked_n = s.notifier("masked")
    ent = s.msix_entry
    masked = None if ent is None else bool(ent.get("masked") or s.function_masked)
    pba = None if ent is None else bool(ent.get("pending"))
    if ent is not None:
        facts.update({"vector": s.vector, "vector-masked": masked, "pba": pba})

    if any("NEEDS_RESET" in x for x in statuses):
        return Verdict(RING_CORRUPT, [f"the device set DEVICE_NEEDS_RESET: it found the guest's ring invalid "
                                      f"and stopped the queue ({stable})",
                                      "no single event recovers it: the driver must reset the device"], facts=facts)
    if a is None or num == 0:
        return Verdict(IDLE, ["the queue is not set up (no ring addresses)"], facts=facts)
    ev = [f"{stable}: avail.idx {a}, device position {last if last is not None else '?'}, used.idx {u}"
          + (f", used_event {ue}, avail_event {ae}" if event_idx else "")]

    if last is not None:
        ahead = (a - last) & 0xFFFF
        taken = ((last - u) & 0xFFFF) if u is not None else 0
        if ahead > num:
            return Verdict(RING_CORRUPT, ev + [f"avail.idx is {ahead} entries past the device's position: more than "
                                               f"the ring holds ({num})"], facts=facts)
        if taken > num:
            return Verdict(RING_CORRUPT, ev + [f"the device's position is {taken} entries past used.idx: more than "
                                               f"the ring holds ({num})"], facts=facts)
    kick_pending = _num(kick.get("pending")) if kick else None
    if kick_pending and kick_pending > 0:
        # a live device reads its kick fd at once: one that stays readable over every sample is unread
        return Verdict(NOT_PROCESSING, ev + [f"the kick eventfd (fd {kick.get('fd')}) holds {kick_pending} unread "
                                             f"in every sample: nobody reads it (the device or back-end is not "
                                             "running its queue)"], facts=facts)
    if last is not None:
        if ahead:
            ev.append(f"{ahead} buffer(s) made available and not taken by the device")
            if event_idx:
                asked = ae is not None and _in_window(ae, last, a)
                if not asked:
                    return Verdict(NOT_PROCESSING, ev + [
                        f"avail_event {ae} is outside [{last}, {a}): the device suppressed kicks for these buffers "
                        "(it promised to poll) and has not taken them"], facts=facts)
                ev.append(f"avail_event {ae} lies in [{last}, {a}): the driver had to kick after publishing them")
            else:
                flags = _num(st.get("used-flags")) or 0
                if flags & VRING_USED_F_NO_NOTIFY:
                    return Verdict(NOT_PROCESSING, ev + [
                        "used.flags has NO_NOTIFY: the device suppressed kicks (it promised to poll) and has not "
                        "taken them"], facts=facts)
                ev.append("used.flags has no NO_NOTIFY: the driver had to kick after publishing them")
            if kick is not None:
                ev.append(f"kick eventfd (fd {kick.get('fd')}): nothing pending" +
                          (f"; guest doorbell writes matched so far: {kick['writes']}" if "writes" in kick else ""))
            return Verdict(LOST_KICK, ev + ["the kick never reached the device: inject one kick"], fix="kick",
                           facts=facts)
        if taken:
            return Verdict(NOT_PROCESSING, ev + [f"{taken} request(s) taken by the device and never completed"],
                           facts=facts)

    # the device side is done; did the driver see the completions?
    owed = False
    if event_idx and u is not None and ue is not None:
        gap = (u - ue) & 0xFFFF
        if 0 < gap <= num:
            owed = True
            ev.append(f"used.idx {u} is past used_event {ue}: the driver asked for an interrupt at {ue}, the device "
                      f"went past it ({gap} completion(s) the driver has not consumed)")
    elif not event_idx and masked and pba:
        owed = True
        ev.append("without EVENT_IDX the driver's consumption is invisible, but the vector holds an interrupt")
    if not owed:
        note = [] if event_idx else ["without EVENT_IDX the driver's consumption is not visible: a lost call on "
                                     "the last completion would look the same"]
        if last is None:
            note.append("the device's position is unknown (a vhost ring without EVENT_IDX is never asked: "
                        "GET_VRING_BASE would stop it)")
        return Verdict(IDLE, ev + ["nothing outstanding"] + note, facts=facts)
    if masked:
        why = "the function mask" if s.function_masked and not (ent or {}).get("masked") else "its vector mask"
        if pba:
            return Verdict(MASKED_PENDING, ev + [
                f"MSI-X vector {s.vector} is masked by the guest ({why}) and its PBA bit is set: the interrupt is "
                "held until the guest unmasks it",
                "kickcall never unmasks a vector the guest owns: --fix --force delivers one message past the mask"],
                fix="call", needs_force=True, facts=facts)
        ev.append(f"MSI-X vector {s.vector} is masked ({why}) and its PBA bit is clear: the call never reached it")
        return Verdict(LOST_CALL, ev + ["a call now would only set the PBA bit: --fix --force delivers one"],
                       fix="call", needs_force=True, facts=facts)
    if call is not None and _num(call.get("pending")):
        ev.append(f"the call eventfd (fd {call.get('fd')}) holds {call['pending']} unread: nothing delivers it "
                  "(no irqfd bound, nobody polling)")
    elif call is not None:
        ev.append(f"call eventfd (fd {call.get('fd')}): nothing pending")
    if masked_n is not None and _num(masked_n.get("pending")):
        ev.append(f"the masked notifier holds {masked_n['pending']} unread")
    if ent is not None:
        ev.append(f"MSI-X vector {s.vector}: unmasked, PBA clear")
    return Verdict(LOST_CALL, ev + ["the interrupt never reached the driver: inject one call"], fix="call",
                   facts=facts)


def _moved(first: QueueSample, last: QueueSample) -> list[str]:
    out = []
    for k in ("avail-idx", "last-avail-idx", "used-idx-ring", "used-idx", "used-event", "kicks", "calls"):
        x, y = first.status.get(k), last.status.get(k)
        if isinstance(x, int) and isinstance(y, int) and x != y:
            out.append(f"{k} {x} -> {y}")
    fn = {(n.get("role"), n.get("id")): n for n in first.notifiers}
    for n in last.notifiers:
        p = fn.get((n.get("role"), n.get("id")))
        if p is None:
            continue
        for k in ("total", "writes"):  # (total falls when another process reads the fd: only rises count)
            if isinstance(p.get(k), int) and isinstance(n.get(k), int) and p[k] < n[k]:
                out.append(f"{n.get('role')} notifier {k} {p[k]} -> {n[k]}")
    return out


def judge(samples: list[Sample], path: str, queue: int, stable_needed: int) -> Verdict:
    """A verdict from consecutive samples: UNDECIDED until enough of the latest ones agree or moved."""
    seq = []
    for s in samples:
        d = s.devices.get(path)
        q = None if d is None else next((x for x in d.queues if x.queue == queue), None)
        if q is not None:
            seq.append((s, d, q))
    if not seq:
        return Verdict(UNDECIDED, ["the queue was not seen"])
    if seq[-1][0].run_state not in ("running", "unknown"):
        return Verdict(PAUSED, [f"the target is {seq[-1][0].run_state}: a stopped machine makes no progress"])
    tail = seq[-stable_needed:]
    keys = [q.key() for _s, _d, q in tail]
    if len(tail) >= stable_needed and all(k == keys[0] for k in keys):
        s0, d, q = tail[-1]
        return judge_state(q, d.statuses, len(tail), tail[-1][0].time - tail[0][0].time)
    if len(seq) >= 2:
        moved = _moved(seq[-2][2], seq[-1][2]) if keys[-1] != keys[-2] else []
        if len(tail) >= stable_needed and all(keys[i] != keys[i + 1] for i in range(len(keys) - 1)):
            span = tail[-1][0].time - tail[0][0].time
            return Verdict(HEALTHY, [f"progress in every one of {len(tail) - 1} intervals over {span:.1f} s"]
                           + _moved(tail[0][2], tail[-1][2]))
        if moved:
            return Verdict(UNDECIDED, ["moving: " + ", ".join(moved)])
    return Verdict(UNDECIDED, ["not enough samples yet"])
