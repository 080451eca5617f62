"""``kickcall diagnose`` inside a kickcall machine: each stall is produced, diagnosed from read-only
samples, and recovered by the one event the verdict calls for -- a masked vector only with
``--force``.  Plus the verdict rules on their own, under hypothesis."""

from __future__ import annotations

import json
import os
import signal
import subprocess

import pytest
from hypothesis import given
from hypothesis import strategies as st

from helpers import kickcall_argv, running_machine, spawn, start_vhost_user_blk, stop_process, wait_for
from kickcall.diagnose.sample import QueueSample
from kickcall.diagnose.verdict import (IDLE, LOST_CALL, LOST_KICK, MASKED_PENDING, NEEDS_RESET, NOT_PROCESSING,
                                       RING_CORRUPT, SLOW, judge_state)
from kickcall.monitor.client import QMPClient
from kickcall.virtio.blk import make_image

ONE_CPU = """
[machine]
vcpus = 1
[[device]]
type = "virtio-blk"
id = "blk0"
size = "4M"
queues = 1
[workload.blk]
depth = 8
stall-timeout = 600
"""




def diagnose(qmp: str, *args: str) -> tuple[int, dict, str]:
    p = subprocess.run(kickcall_argv("diagnose", "--qmp", qmp, "--json", "--interval", "0.25", *args),
                       capture_output=True, text=True, timeout=120,
                       env=dict(os.environ, PYTHONPATH=os.path.join(os.path.dirname(__file__), "..", "src")))
    assert p.returncode in (0, 1), p.stderr
    return p.returncode, json.loads(p.stdout), p.stderr


def q0(rep: dict) -> dict:
    (q,) = [q for q in rep["queues"] if q["queue"] == 0]
    return q


def completed(m) -> int:
    """Requests the guest has completed so far (from its interrupt handler)."""
    return m.device("blk0").vdev.queues[0].used_idx


# ----------------------------------------------------------------------------------------------------
# machine scenarios
# ----------------------------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("path,verdict,evidence", [
    ("kick", LOST_KICK, "had to kick"),
    ("call", LOST_CALL, "past used_event"),
])
def test_lost_notification_in_a_machine_is_diagnosed_and_fixed(workdir, path, verdict, evidence):
    qmp = os.path.join(workdir, "m.qmp")
    with running_machine(ONE_CPU) as m:
        m.start_monitor(qmp)
        m.start_workload(blk=dict(m.cfg.workload_blk), net=None)
        wait_for(lambda: completed(m) > 200, 30, "I/O")
        rc, rep, _ = diagnose(qmp)
        assert rc == 0 and q0(rep)["verdict"] == "healthy", rep
        with QMPClient(qmp).connect() as c:
            # the hypervisor swallows the next ioeventfd write / irqfd injection of queue 0
            c.execute("x-debug-fault", {"dev": "blk0", "queue": 0, "path": path, "action": "drop-next"})
        rc, rep, _ = diagnose(qmp)
        q = q0(rep)
        assert rc == 1 and q["verdict"] == verdict, json.dumps(rep, indent=1)
        assert any(evidence in e for e in q["evidence"]), q["evidence"]
        # the fault switched on and no fix: the queue stays stalled
        stalled = completed(m)
        rc, rep, _ = diagnose(qmp)
        assert q0(rep)["verdict"] == verdict and completed(m) == stalled
        rc, rep, err = diagnose(qmp, "--fix")
        r = q0(rep)["fix-result"]
        assert rc == 0 and r["injected"] and r["moved"] and r["event"] == path and not r["forced"], (rep, err)
        wait_for(lambda: completed(m) > stalled + 200, 30, "I/O after the fix")
        res = m.stop_workload()
    (blk,) = [r for r in res if r["kind"] == "blk"]
    assert blk["error_count"] == 0 and blk["ops"] > 400, blk


@pytest.mark.slow
@pytest.mark.parametrize("path,verdict", [("kick", LOST_KICK), ("call", LOST_CALL)])
def test_hypervisor_fault_on_a_vhost_user_queue(workdir, path, verdict):
    """The same knob acts on a queue a vhost-user back-end serves: the hypervisor swallows the guest's
    doorbell write into the back-end's kick fd, or the back-end's call on its way to the guest."""
    img, sock, qmp = (os.path.join(workdir, n) for n in ("disk.img", "vblk.sock", "m.qmp"))
    make_image(img, 4 << 20)
    be = start_vhost_user_blk(sock, img)
    toml = ONE_CPU.replace('size = "4M"', f'backend = "vhost-user"\nsocket = "{sock}"')
    try:
        with running_machine(toml) as m:
            m.start_monitor(qmp)
            m.start_workload(blk=dict(m.cfg.workload_blk), net=None)
            q = m.device("blk0").vdev.queues[0]
            used = lambda: m.memory.read_u16(q.used + 2)  # noqa: E731
            wait_for(lambda: used() > 100, 30, "I/O")
            with QMPClient(qmp).connect() as c:
                c.execute("x-debug-fault", {"dev": "blk0", "queue": 0, "path": path, "action": "drop-next"})
            rc, rep, _ = diagnose(qmp)
            assert rc == 1 and q0(rep)["verdict"] == verdict, json.dumps(rep, indent=1)
            stalled = used()
            rc, rep, _ = diagnose(qmp, "--fix")
            r = q0(rep)["fix-result"]
            assert rc == 0 and r["moved"] and r["path"] == ("vhost-kick" if path == "kick" else "irqfd"), rep
            wait_for(lambda: (used() - stalled) & 0xFFFF > 100, 30, "I/O after the fix")
            res = m.stop_workload()
        (blk,) = [r for r in res if r["kind"] == "blk"]
        assert blk["error_count"] == 0, blk
    finally:
        stop_process(be)


@pytest.mark.slow
def test_vector_left_masked_with_an_event_pending_needs_force(workdir):
    qmp = os.path.join(workdir, "m.qmp")
    with running_machine(ONE_CPU) as m:
        m.start_monitor(qmp)
        slot = m.device("blk0").devfn >> 3
        m.start_workload(blk=dict(m.cfg.workload_blk), net=None)
        wait_for(lambda: completed(m) > 100, 30, "I/O")
        vec = m.device("blk0").vdev.queues[0].vector
        m.guest_cmd({"cmd": "msix_mask", "slot": slot, "entry": vec, "masked": True, "cpu": 0})
        rc, rep, _ = diagnose(qmp)
        q = q0(rep)
        assert rc == 1 and q["verdict"] == MASKED_PENDING and q["needs-force"], json.dumps(rep, indent=1)
        assert any("PBA bit is set" in e for e in q["evidence"])
        # --fix alone refuses: it would only set the PBA bit again, and the mask is the guest's
        stalled = completed(m)
        rc, rep, _ = diagnose(qmp, "--fix")
        r = q0(rep)["fix-result"]
        assert rc == 1 and not r["injected"] and "refused" in r["reason"]
        assert completed(m) == stalled and m.device("blk0").msix.is_masked(vec)
        # --force delivers one message past the mask, announced; the guest's mask stays
        with QMPClient(qmp).connect() as watcher:
            rc, rep, err = diagnose(qmp, "--fix", "--force")
            r = q0(rep)["fix-result"]
            assert rc == 0 and r["injected"] and r["forced"] and r["moved"] and r["path"] == "msi-forced", rep
            assert "FORCED" in err
            wait_for(lambda: [e for e in (watcher.execute("query-status") and watcher.events())
                              if e["event"] == "X_DEVICE_EVENT_INJECTED"], 10, "the injection event")
        assert m.device("blk0").msix.is_masked(vec), "diagnose must never unmask the guest's vector"
        with QMPClient(qmp).connect() as c:
            st = c.execute("x-query-virtio-queue-status", {"path": "/machine/peripheral/blk0/virtio-backend",
                                                           "queue": 0})
        assert st["x-injected"] == {"kick": 0, "call": 1, "forced": 1, "notifier": 0}
        # one delivery: the guest consumed one batch and stalls again behind its own mask
        rc, rep, _ = diagnose(qmp)
        assert q0(rep)["verdict"] == MASKED_PENDING
        assert stalled < completed(m) <= stalled + 2 * 8
        # the guest unmasks: the pending bit delivers, I/O goes on, every data check passes
        m.guest_cmd({"cmd": "msix_mask", "slot": slot, "entry": vec, "masked": False, "cpu": 0})
        wait_for(lambda: completed(m) > stalled + 200, 30, "I/O after the unmask")
        res = m.stop_workload()
    (blk,) = [r for r in res if r["kind"] == "blk"]
    assert blk["error_count"] == 0, blk


@pytest.mark.slow
def test_injection_is_announced(workdir):
    """The injection event carries dev, queue, event, forced and path."""
    qmp = os.path.join(workdir, "m.qmp")
    with running_machine(ONE_CPU) as m:
        m.start_monitor(qmp)
        with QMPClient(qmp).connect() as c:
            c.execute("x-debug-device-event", {"dev": "blk0", "event": "kick", "queue": 0})
            wait_for(lambda: [e for e in (c.execute("query-status") and c.events())
                              if e["event"] == "X_DEVICE_EVENT_INJECTED" and
                              e["data"] == {"dev": "blk0", "queue": 0, "event": "kick", "forced": False,
                                            "path": "ioeventfd"}], 10, "the event")
            # and counted where the queue is shown
            st = c.execute("x-query-virtio-queue-status", {"path": "/machine/peripheral/blk0/virtio-backend",
                                                           "queue": 0})
            assert st["x-injected"] == {"kick": 1, "call": 0, "forced": 0, "notifier": 0}


@pytest.mark.slow
def test_idle_and_needs_reset(workdir):
    qmp = os.path.join(workdir, "m.qmp")
    with running_machine(ONE_CPU) as m:
        m.start_monitor(qmp)
        rc, rep, _ = diagnose(qmp)
        assert rc == 0 and q0(rep)["verdict"] == IDLE, rep
        # the guest publishes an avail index far past anything the ring holds, and kicks
        q = m.device("blk0").vdev.queues[0]
        idx = m.memory.read_u16(q.avail + 2)
        m.memory.write(q.avail + 2, ((idx + 1000) & 0xFFFF).to_bytes(2, "little"))
        m.guest_cmd({"cmd": "kick", "slot": m.device("blk0").devfn >> 3, "queue": 0, "cpu": 0})
        rc, rep, _ = diagnose(qmp, "--fix")
        qr = q0(rep)
        assert rc == 1 and qr["verdict"] == NEEDS_RESET, rep
        assert not qr["fix-result"]["injected"]


@pytest.mark.slow
def test_backend_not_processing(workdir):
    """A vhost-user back-end that stops running (SIGSTOP): the kicks sit unread in its kick fd."""
    img, sock, qmp = (os.path.join(workdir, n) for n in ("disk.img", "vblk.sock", "m.qmp"))
    make_image(img, 4 << 20)
    log = open(os.path.join(workdir, "be.log"), "w+")  # a file, not a pipe: tracing must never block
    be = start_vhost_user_blk(sock, img, "--trace", "vhost_user_read", "--trace", "virtio_queue_notify", stderr=log)
    toml = ONE_CPU.replace('size = "4M"', f'backend = "vhost-user"\nsocket = "{sock}"')
    try:
        with running_machine(toml) as m:
            m.start_monitor(qmp)
            m.start_workload(blk=dict(m.cfg.workload_blk), net=None)
            wait_for(lambda: m.memory.read_u16(m.device("blk0").vdev.queues[0].used + 2) > 100, 30, "I/O")
            os.kill(be.pid, signal.SIGSTOP)
            try:
                wait_for(lambda: open(f"/proc/{be.pid}/stat").read().rsplit(")", 1)[1].split()[0] == "T", 10,
                         "the back-end to stop")
                # the guest rings its doorbell again: the stopped back-end cannot read it (whatever it was
                # doing when it stopped -- between reading a kick and popping, or completing and calling)
                m.guest_cmd({"cmd": "kick", "slot": m.device("blk0").devfn >> 3, "queue": 0, "cpu": 0})
                rc, rep, _ = diagnose(qmp, "--fix")
                q = q0(rep)
                assert rc == 1 and q["verdict"] == NOT_PROCESSING, json.dumps(rep, indent=1)
                assert any("unread" in e for e in q["evidence"]), q["evidence"]
                assert not q["fix-result"]["injected"]
            finally:
                os.kill(be.pid, signal.SIGCONT)
            used = m.memory.read_u16(m.device("blk0").vdev.queues[0].used + 2)
            wait_for(lambda: m.memory.read_u16(m.device("blk0").vdev.queues[0].used + 2) != used, 30, "I/O")
            res = m.stop_workload()
        (blk,) = [r for r in res if r["kind"] == "blk"]
        assert blk["error_count"] == 0, blk
    finally:
        stop_process(be)
        log.seek(0)
        err = log.read()
        log.close()
    # --trace: the back-end's trace events, QEMU's names, on stderr
    assert "vhost_user_read req=GET_FEATURES" in err and "virtio_queue_notify vdev=vhost-user-blk n=0" in err


@pytest.mark.slow
def test_kickcall_run_serves_a_monitor_and_quits_on_request(workdir):
    qmp = os.path.join(workdir, "run.qmp")
    p = spawn(kickcall_argv("run", "--plain", "--duration", "120", "--qmp", qmp), stdout=subprocess.PIPE,
              stderr=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: os.path.exists(qmp) or p.poll() is not None, 60, "the monitor socket")
        assert oct(os.stat(qmp).st_mode & 0o777) == "0o600"
        rc, rep, _ = diagnose(qmp)
        assert rc == 0 and {q["verdict"] for q in rep["queues"]} <= {"healthy", "idle"}, rep
        assert {q["name"] for q in rep["queues"]} == {"virtio-blk", "virtio-net"}, rep
        with QMPClient(qmp).connect() as c:
            c.execute("quit")
        out, err = p.communicate(timeout=180)  # the workload stops and its results are checked first
        assert p.returncode == 0, err
        assert "all data checks passed" in out
    finally:
        stop_process(p)


# ----------------------------------------------------------------------------------------------------
# the rules on their own
# ----------------------------------------------------------------------------------------------------
def _qs(a, last, u, ue, ae, *, num=256, event_idx=True, kick_pending=0, call_pending=0, masked=None,
        pba=False, used_flags=0):
    s = QueueSample(0, {"avail-idx": a, "last-avail-idx": last, "used-idx-ring": u, "used-event": ue,
                        "avail-event": ae, "vring-num": num, "event-idx": event_idx, "used-flags": used_flags},
                    [{"role": "host", "id": 1, "fd": 5, "pending": kick_pending},
                     {"role": "guest", "id": 2, "fd": 6, "pending": call_pending}])
    if masked is not None:
        s.vector = 1
        s.msix_entry = {"masked": masked, "pending": pba}
        s.function_masked = False
    return s


def test_rules_by_example():
    assert judge_state(_qs(10, 10, 10, 10, 10), None, 4, 1).kind == IDLE
    assert judge_state(_qs(18, 10, 10, 10, 10), None, 4, 1).kind == LOST_KICK
    assert judge_state(_qs(18, 10, 10, 10, 10, kick_pending=1), None, 4, 1).kind == NOT_PROCESSING
    assert judge_state(_qs(10, 10, 10, 2, 10, kick_pending=1), None, 4, 1).kind == NOT_PROCESSING
    assert judge_state(_qs(18, 10, 10, 10, 30), None, 4, 1).kind == NOT_PROCESSING  # kicks suppressed
    assert judge_state(_qs(18, 10, 10, 10, 0, event_idx=False), None, 4, 1).kind == LOST_KICK
    assert judge_state(_qs(18, 10, 10, 10, 0, event_idx=False, used_flags=1), None, 4, 1).kind == NOT_PROCESSING
    # taken, never completed: slow while younger than the window, not processing once older
    assert judge_state(_qs(10, 10, 5, 5, 10), None, 4, 1, window=5, age=1).kind == SLOW
    assert judge_state(_qs(10, 10, 5, 5, 10), None, 4, 1, window=5, age=6).kind == NOT_PROCESSING
    assert judge_state(_qs(10, 10, 10, 2, 10), None, 4, 1).kind == LOST_CALL
    v = judge_state(_qs(10, 10, 10, 2, 10, masked=True, pba=True), None, 4, 1)
    assert v.kind == MASKED_PENDING and v.needs_force and v.fix == "call"
    assert judge_state(_qs(10, 10, 10, 2, 10, masked=False), None, 4, 1).fix == "call"
    assert judge_state(_qs(2000, 10, 10, 10, 10), None, 4, 1).kind == RING_CORRUPT
    assert judge_state(_qs(10, 10, 10, 10, 10), ["VIRTIO_CONFIG_S_NEEDS_RESET: Irrecoverable error, device needs reset"], 4,
                       1).kind == NEEDS_RESET
    # 16-bit wrap: 65530 -> 4 is 10 entries, not corruption
    assert judge_state(_qs(4, 65530, 65530, 65530, 65530), None, 4, 1).kind == LOST_KICK
    assert judge_state(_qs(4, 4, 4, 65530, 4), None, 4, 1).kind == LOST_CALL


u16 = st.integers(0, 0xFFFF)
junk = st.one_of(st.none(), st.booleans(), st.text(max_size=5), st.integers(-2**70, 2**70), st.floats(),
                 st.lists(st.integers(), max_size=2), u16)


@given(a=u16, last=u16, u=u16, ue=u16, ae=u16, num=st.sampled_from([1, 2, 128, 256, 32768]),
       ev=st.booleans(), kp=st.integers(0, 3), cp=st.integers(0, 3), masked=st.sampled_from([None, False, True]),
       pba=st.booleans())
def test_rules_are_consistent(a, last, u, ue, ae, num, ev, kp, cp, masked, pba):
    v = judge_state(_qs(a, last, u, ue, ae, num=num, event_idx=ev, kick_pending=kp, call_pending=cp, masked=masked,
                        pba=pba), None, 4, 1.0)
    ahead, taken = (a - last) & 0xFFFF, (last - u) & 0xFFFF
    assert v.evidence
    if v.kind == LOST_KICK:
        assert 0 < ahead <= num and kp == 0 and v.fix == "kick" and not v.needs_force
    if v.kind in (LOST_CALL, MASKED_PENDING):
        assert ahead == 0 and taken == 0 and v.fix == "call"
        assert v.needs_force == bool(masked)
    if v.kind == MASKED_PENDING:
        assert masked and pba
    if ahead > num or taken > num:
        assert v.kind == RING_CORRUPT and v.fix is None
    if v.kind == IDLE:
        assert ahead == 0 and taken == 0
    if ahead <= num and taken <= num and kp:
        assert v.kind == NOT_PROCESSING  # a kick fd nobody reads, whatever the rings say
    if ahead == 0 and taken == 0 and ev and (u - ue) & 0xFFFF == 0 and not kp:
        assert v.kind == IDLE


@given(st.dictionaries(st.sampled_from(["avail-idx", "last-avail-idx", "used-idx-ring", "used-idx", "used-event",
                                        "avail-event", "vring-num", "event-idx", "used-flags", "zzz"]), junk),
       st.lists(st.dictionaries(st.sampled_from(["role", "pending", "fd", "id"]), junk), max_size=3),
       st.one_of(st.none(), st.dictionaries(st.sampled_from(["masked", "pending"]), junk)))
def test_hostile_monitor_replies_never_crash_the_rules(status, notifiers, entry):
    """A monitor's reply is input too: any field of any type gives a verdict, never an exception."""
    s = QueueSample(0, status, notifiers)
    if entry is not None:
        s.vector, s.msix_entry, s.function_masked = 1, entry, False
    v = judge_state(s, [], 4, 1.0)
    assert v.kind and v.evidence
