"""diagnose's rules over several samples, on their own: never "healthy" by default, never a verdict
from fewer equal samples than asked, a VM that stopped by itself is a problem, QEMU's view of a
vhost ring claims only what the back-end kind supports, and the vhost-or-emulated decision is made
again in every sample."""

from __future__ import annotations

from kickcall.diagnose import targets
from kickcall.diagnose.sample import DeviceSample, QemuSampler, QueueSample, Sample
from kickcall.diagnose.targets import GuardedMonitor, TargetKind
from kickcall.diagnose.verdict import (HEALTHY, LOST_CALL, NOT_TAKEN, PAUSED, STALLED, UNDECIDED, Severity, judge,
                                       judge_state)

P = "/machine/peripheral/d/virtio-backend"


def _sample(t: float, status: dict, run_state: str = "running") -> Sample:
    q = QueueSample(0, dict(status))
    return Sample(t, run_state, {P: DeviceSample(P, "virtio-blk", ["VIRTIO_CONFIG_S_DRIVER_OK: x"], [q])})


LOST = {"avail-idx": 10, "last-avail-idx": 10, "used-idx-ring": 10, "used-event": 9, "avail-event": 10,
        "vring-num": 64, "event-idx": True}


def test_out_of_time_before_enough_equal_samples_is_undecided_never_healthy():
    hist = [_sample(0.0, LOST), _sample(0.1, LOST)]
    v = judge(hist, P, 0, 4, out_of_time=True)
    assert v.kind == UNDECIDED and v.final and "2 sample(s)" in v.evidence[0] and "4 are needed" in v.evidence[0]
    assert judge(hist, P, 0, 4).final is False
    assert judge(hist + [_sample(0.2, LOST), _sample(0.3, LOST)], P, 0, 4).kind == LOST_CALL
    assert judge([], P, 0, 4, out_of_time=True).kind == UNDECIDED
    # it moved and then stood still: still undecided at the deadline, not "intermittent progress"
    moved = dict(LOST, **{"used-idx-ring": 9})
    v = judge([_sample(0.0, moved), _sample(0.1, LOST), _sample(0.2, LOST)], P, 0, 4, out_of_time=True)
    assert v.kind == UNDECIDED
    # it moved in the last interval: healthy enough to say so
    v = judge([_sample(0.0, LOST), _sample(0.1, LOST), _sample(0.2, moved)], P, 0, 4, out_of_time=True)
    assert v.kind == HEALTHY


def test_a_vm_that_stopped_by_itself_is_a_problem():
    for rs, sev in (("paused", Severity.INFO), ("inmigrate", Severity.INFO), ("io-error", Severity.PROBLEM),
                    ("guest-panicked", Severity.PROBLEM), ("internal-error", Severity.PROBLEM)):
        v = judge([_sample(0.0, LOST, rs)], P, 0, 4)
        assert v.kind == PAUSED and v.severity is sev, (rs, v)


def test_qemu_alone_claims_not_taken_only_for_vhost_user():
    # a vhost ring seen from QEMU: the back-end's position unknown; avail_event behind avail.idx
    st = {"avail-idx": 12, "last-avail-idx": None, "used-idx-ring": 10, "used-event": 10, "avail-event": 11,
          "vring-num": 64, "event-idx": True, "ring-state": None}
    q = QueueSample(0, dict(st, **{"x-avail-event-tracks": True}))
    assert judge_state(q, None, 4, 10.0, window=5).kind == NOT_TAKEN
    q = QueueSample(0, dict(st, **{"x-avail-event-tracks": False}))  # kernel vhost: avail_event lags
    v = judge_state(q, None, 4, 10.0, window=5)
    assert v.kind == STALLED and "whether the device took them is unknown" in " ".join(v.evidence)
    assert any("stopped behind QEMU's back" in e for e in v.evidence)


class _Scripted:
    def __init__(self) -> None:
        self.qtype = "virtio-blk-device"
        self.sent: list[tuple[str, dict | None]] = []

    def execute(self, command, arguments=None):
        self.sent.append((command, arguments))
        return {"query-status": {"status": "running"}, "x-query-virtio": [{"path": P, "name": "virtio-blk"}],
                "qom-get": self.qtype, "x-query-virtio-status": {"num-vqs": 1, "vhost-started": False},
                "x-query-virtio-queue-status": {"vring-num": 0}}.get(command)


def test_the_device_kind_is_asked_again_in_every_sample():
    """Under --watch a device can be unplugged and a vhost one plugged under the same id."""
    mon = _Scripted()
    g = GuardedMonitor(mon, TargetKind.QEMU)
    s = QemuSampler(g, emulated_paths=g.emulated_paths)
    s.sample()
    assert ("x-query-virtio-queue-status", {"path": P, "queue": 0}) in mon.sent
    mon.qtype = "vhost-user-blk"
    mon.sent.clear()
    s.sample()
    assert [c for c, _ in mon.sent].count("qom-get") == 1
    assert "x-query-virtio-queue-status" not in [c for c, _ in mon.sent]
    assert P not in g.emulated_paths and targets.FORBID_VHOST_QUEUE_STATUS.fix_on
