"""A monitor's replies are input: whatever a (broken, hostile or future) monitor answers, diagnose's
samplers, rules, joins and output give a verdict or a clear error -- never an exception -- and the
guard never lets a query through that the table does not allow, nor refuses one the samplers make
(a ForbiddenQuery here would be diagnose's own bug).  The monitor is a stand-in object behind the
sampler's Monitor seam; the same code against real QEMU is in test_diagnose_field.py."""

from __future__ import annotations

import json

from hypothesis import given, settings
from hypothesis import strategies as st

from kickcall.diagnose.run import QueueReport, Report, TargetReport, format_report
from kickcall.diagnose.sample import QemuSampler, Sampler, parse_mtree_ram, parse_xp
from kickcall.diagnose.targets import GuardedMonitor, TargetKind, identify
from kickcall.diagnose.verdict import judge
from kickcall.monitor.client import QMPCommandError

scalar = st.one_of(st.none(), st.booleans(), st.integers(-2**66, 2**66), st.floats(), st.text(max_size=8),
                   st.sampled_from(["/machine/peripheral/d/virtio-backend", "virtio-blk-device", "vhost-user-blk",
                                    "started", "stopped", "not-started", "no-front-end"]))
junk = st.recursive(scalar, lambda c: st.one_of(st.lists(c, max_size=4),
                                                st.dictionaries(st.text(max_size=12), c, max_size=6)), max_leaves=20)
u16 = st.integers(0, 0xFFFF)
plausible_queue = st.fixed_dictionaries({
    "avail-idx": u16, "last-avail-idx": st.one_of(st.none(), u16), "used-idx-ring": u16, "used-idx": u16,
    "used-event": u16, "avail-event": u16, "vring-num": st.sampled_from([0, 1, 64, 256, 70000]),
    "vring-desc": st.integers(0, 2**64), "vring-avail": st.integers(0, 2**64), "vring-used": st.integers(0, 2**64),
    "inuse": st.integers(-1, 300), "ring-state": st.one_of(st.text(max_size=12), st.sampled_from(
        ["started", "stopped", "not-started", "no-front-end", "not-set-up", "disabled"])),
    "kick-fd": st.integers(-2, 100), "call-fd": st.integers(-2, 100),
    "oldest-inflight-ms": st.one_of(st.none(), st.floats(), st.integers(-5, 10**12)),
    "completion-ms": junk, "x-user-addresses": junk, "needs-reset": junk,
})
COMMANDS = ["query-status", "x-query-virtio", "x-query-virtio-status", "x-query-virtio-queue-status",
            "x-query-virtio-vhost-queue-status", "x-query-device-notifiers", "x-query-pci-msix", "qom-get",
            "human-monitor-command"]
reply = st.one_of(junk, plausible_queue, st.just("__error__"),
                  st.just([{"path": "/machine/peripheral/d/virtio-backend", "name": "virtio-blk"}]),
                  st.just({"num-vqs": 2, "vhost-started": True, "status": {"statuses": ["DRIVER_OK: x"]},
                           "guest-features": {"transports": ["VIRTIO_RING_F_EVENT_IDX: y"]}}),
                  st.just("FlatView #0\r\n AS \"memory\", root: system\r\n  0000000000000000-00000000ffffffff "
                          "(prio 0, ram): mem\r\n"),
                  st.just("0000000000001000: 0x0001 0x0002\r\n"))


class HostileMonitor:
    def __init__(self, answers: dict, rounds: int) -> None:
        self.answers = answers
        self.calls = 0

    def execute(self, command: str, arguments: dict | None = None):
        self.calls += 1
        a = self.answers.get(command, None)
        if isinstance(a, list) and a and isinstance(a[0], tuple):  # a reply per call
            a = a[self.calls % len(a)][1]
        if a == "__error__":
            raise QMPCommandError("GenericError", "no")
        return a


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(st.sampled_from(COMMANDS), st.one_of(reply, st.lists(st.tuples(st.just(0), reply),
                                                                            min_size=1, max_size=3))),
       st.sampled_from([TargetKind.QEMU, TargetKind.KICKCALL_MACHINE, TargetKind.KICKCALL_BACKEND]))
def test_any_replies_give_verdicts_never_exceptions(answers, kind):
    mon = HostileMonitor(answers, 3)
    guard = GuardedMonitor(mon, kind, fix=False)
    if kind is TargetKind.QEMU:
        sampler = QemuSampler(guard, emulated_paths=guard.emulated_paths)
    else:
        sampler = Sampler(guard)
        sampler.addresses = kind is TargetKind.KICKCALL_BACKEND
    try:
        history = [sampler.sample() for _ in range(3)]
    except QMPCommandError:  # query-status or x-query-virtio refused: the session reports the target
        assert any(answers.get(c) == "__error__" or isinstance(answers.get(c), list)
                   for c in ("query-status", "x-query-virtio"))
        return
    rep = Report([TargetReport("s", kind)], 3, 0.1, 5.0)
    for path, d in history[-1].devices.items():
        for q in d.queues:
            for out_of_time in (False, True):
                v = judge(history, path, q.queue, 2, window=5.0, out_of_time=out_of_time)
                assert v.kind and v.evidence is not None
            rep.queues.append(QueueReport("s", path, d.name, q.queue, v, kind))
    json.dumps(rep.as_dict(), allow_nan=True)
    assert format_report(rep, verbose=True)


@given(junk, junk, junk)
def test_identify_takes_anything(greeting, version, commands):
    g = greeting if isinstance(greeting, dict) else {}
    assert identify(g, version, commands).kind in TargetKind


@given(st.one_of(junk, st.text(max_size=300)), st.integers(1, 9))
def test_hmp_parsers_take_anything(text, n):
    vals = parse_xp(text, n)
    assert vals is None or (len(vals) == n and all(0 <= v for v in vals))
    for lo, hi in parse_mtree_ram(text):
        assert 0 <= lo < hi
