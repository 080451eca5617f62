"""A vhost-user back-end's rings through their lifecycle, as its monitor shows them.

Against a real ``kickcall vhost-user-blk --qmp`` process, driven by raw vhost-user messages
(``kickcall.vhost_user.frontend``) or by kickcall's front-end (``kickcall.drive``): every ring
state (no-front-end, not-set-up, not-started, started, disabled, stopped) is reached for real and
read back through ``x-query-virtio-queue-status``; kick and call injections are refused per state
with the reason; a ring the front-end stopped with GET_VRING_BASE is never processed
(``--x-fix-off refuse-stopped-ring`` brings that back); request times
(``oldest-inflight-ms``, ``completion-ms``) with ``--io-delay-ms 300 --io-delay-fixed``; the
``complete`` fault (a back-end that never completes a request); a stopping back-end is not held by
a request sleeping in ``--io-delay-ms`` (the ``cancel-io-delay-on-stop`` fix); a device
reset forgets the rings (the back-end's ``forget-rings-on-reset`` fix).
"""

from __future__ import annotations

import os
import signal
import subprocess

import pytest

from helpers import kickcall_argv, spawn, stop_process, wait_for, wait_for_listener
from kickcall.drive.vhost_user_blk import VhostUserBlkDriver
from kickcall.guest.blk_request import BlkRequest
from kickcall.memory import GuestMemory
from kickcall.monitor.client import QMPClient, QMPCommandError
from kickcall.notify import EventNotifier
from kickcall.vhost_user.frontend import VhostUserFrontend
from kickcall.vhost_user.protocol import FrontendReq, MemRegion, ProtocolFeature
from kickcall.virtio.blk import BLK_T_IN, make_image
from kickcall.virtio.ring import VIRTIO_F_VERSION_1

pytestmark = pytest.mark.slow

PATH = "/vhost-user-blk"  # the back-end's device, as its monitor names it
DEV = "vhost-user-blk"
USER_BASE = 0x7F00_0000_0000
RAM = 1 << 20
DESC, AVAIL, USED = 0x10000, 0x11000, 0x12000  # a ring of 16 in the raw front-end's RAM
STOPPED_TEXT = ("the front-end stopped queue 0 with GET_VRING_BASE; a back-end must not process a stopped ring "
                "(vhost-user spec); the front-end restarts it")


def _argv(sock: str, img: str, qmp: str, *extra: str, off: tuple[str, ...] = ()) -> list[str]:
    """``kickcall vhost-user-blk``, with some of its fixes off (``--x-fix-off NAME``: the back-end's
    fault registry)."""
    args = ["vhost-user-blk", "--socket-path", sock, "--blk-file", img, "--qmp", qmp, *extra]
    return kickcall_argv(*args, *(a for name in off for a in ("--x-fix-off", name)))


class Backend:
    """A ``kickcall vhost-user-blk --qmp`` process and its monitor."""

    def __init__(self, workdir: str, *extra: str, off: tuple[str, ...] = ()) -> None:
        self.img = os.path.join(workdir, "d.img")
        make_image(self.img, 4 << 20)
        self.sock = os.path.join(workdir, "vu.sock")
        self.qmp = os.path.join(workdir, "be.qmp")
        self.proc = spawn(_argv(self.sock, self.img, self.qmp, *extra, off=off))
        self.mon: QMPClient | None = None
        try:
            wait_for_listener(self.sock, self.proc)
            wait_for_listener(self.qmp, self.proc)
            self.mon = QMPClient(self.qmp, timeout=60).connect(wait=60)
        except BaseException:
            stop_process(self.proc)
            raise

    def qs(self, queue: int = 0) -> dict:
        assert self.mon is not None
        return self.mon.execute("x-query-virtio-queue-status", {"path": PATH, "queue": queue})

    def state(self) -> str:
        return self.qs()["ring-state"]

    def inject(self, event: str) -> dict:
        assert self.mon is not None
        return self.mon.execute("x-debug-device-event", {"dev": DEV, "event": event, "queue": 0})

    def refused(self, event: str) -> str:
        with pytest.raises(QMPCommandError) as ei:
            self.inject(event)
        return ei.value.desc

    def fault(self, path: str, action: str) -> dict:
        assert self.mon is not None
        return self.mon.execute("x-debug-fault", {"dev": DEV, "queue": 0, "path": path, "action": action})

    def close(self) -> int:
        if self.mon is not None:
            self.mon.close()
        return stop_process(self.proc)


@pytest.fixture
def backend_factory(workdir):
    made: list[Backend] = []

    def make(*extra: str, off: tuple[str, ...] = ()) -> Backend:
        b = Backend(workdir, *extra, off=off)
        made.append(b)
        return b

    yield make
    for b in made:
        b.close()


class RawFrontend:
    """A front-end made of single vhost-user messages, each acknowledged (REPLY_ACK): the test
    decides how far the ring gets.  RAM is one memfd at GPA 0 (user addresses at USER_BASE)."""

    def __init__(self, sock: str) -> None:
        self.fe = VhostUserFrontend(sock, name="raw", timeout=60)
        self.mem = GuestMemory.create(RAM, "raw-ram")
        self.kick = EventNotifier("raw.kick")
        self.call = EventNotifier("raw.call")

    def connect(self) -> None:
        fe = self.fe
        fe.connect(wait=30)
        fe.get_features()
        fe.get_protocol_features()
        fe.set_protocol_features(1 << ProtocolFeature.REPLY_ACK)
        fe.set_owner()

    def set_up(self) -> None:
        """Features, memory table, ring size, base and addresses: no kick fd."""
        fe = self.fe
        fe.set_features(1 << VIRTIO_F_VERSION_1 | 1 << 30)  # VERSION_1 + VHOST_USER_F_PROTOCOL_FEATURES
        regions, fds = self.mem.layout()
        fe.set_mem_table([MemRegion(r["gpa"], r["size"], USER_BASE + r["gpa"], r["block_offset"]) for r in regions],
                         [fds[r["block"]] for r in regions])
        fe.set_vring_num(0, 16)
        fe.set_vring_base(0, 0)
        fe.set_vring_addr(0, USER_BASE + DESC, USER_BASE + USED, USER_BASE + AVAIL)

    def close(self) -> None:
        self.fe.close()
        self.kick.close()
        self.call.close()
        self.mem.close()


def _be_queue(b: Backend) -> dict:
    assert b.mon is not None
    return b.mon.execute("x-query-vhost-user-backend")["queues"][0]


def test_every_ring_state_is_reached_and_injections_are_refused_per_state(backend_factory):
    b = backend_factory()
    q = b.qs()
    assert q["ring-state"] == "no-front-end" and q["front-end"] == "" and q["kick-fd"] == q["call-fd"] == -1
    assert q["get-vring-base"] == 0 and q["oldest-inflight-ms"] is None
    assert q["completion-ms"] == {"count": 0, "recent": 0, "p50": None, "max": None}
    assert "no front-end is connected" in b.refused("kick")
    assert "no front-end is connected" in b.refused("call")

    raw = RawFrontend(b.sock)
    try:
        raw.connect()
        q = b.qs()
        assert q["ring-state"] == "not-set-up" and q["front-end"] == f"pid {os.getpid()} uid {os.getuid()}"
        assert "is not set up" in b.refused("kick")
        assert "has not handed one over (SET_VRING_CALL)" in b.refused("call")
        raw.fe.set_vring_call(0, None)  # VRING_NOFD: the front-end polls the used ring
        assert "VRING_NOFD" in b.refused("call")
        raw.fe.set_vring_call(0, raw.call.fd)
        assert b.qs()["call-fd"] >= 0

        raw.set_up()
        q = b.qs()
        assert q["ring-state"] == "not-started" and q["kick-fd"] == -1
        assert "has not handed it a kick fd (SET_VRING_KICK)" in b.refused("kick")

        raw.fe.set_vring_kick(0, raw.kick.fd)
        assert b.state() == "not-started" and b.qs()["kick-fd"] >= 0
        raw.fe.set_vring_enable(0, True)
        assert b.state() == "not-started"  # a ring starts on its first kick
        raw.kick.set()
        wait_for(lambda: b.state() == "started", 60, "the first kick to start the ring")
        assert b.inject("kick") == {"path": "backend-process", "forced": False}
        assert b.inject("call") == {"path": "call-fd", "forced": False}
        assert raw.call.test_and_clear() == 1

        raw.fe.set_vring_enable(0, False)
        assert b.state() == "disabled"
        assert "is disabled (SET_VRING_ENABLE 0" in b.refused("kick")
        raw.fe.set_vring_enable(0, True)
        assert b.state() == "started"

        assert raw.fe.get_vring_base(0) == 0
        q = b.qs()
        assert q["ring-state"] == "stopped" and q["get-vring-base"] == 1
        assert q["kick-fd"] == q["call-fd"] == -1 and not q["started"]
        assert b.refused("kick") == STOPPED_TEXT
        why = b.refused("call")
        assert "GET_VRING_BASE" in why and "took its kick and call fds" in why and "polls" not in why
        assert _be_queue(b)["ring-state"] == "stopped" and _be_queue(b)["get-vring-base"] == 1

        # the front-end restarts it: a new kick fd, then a kick
        raw.fe.set_vring_base(0, 0)
        assert b.state() == "stopped"  # set up again in part: still stopped until a kick fd comes
        raw.fe.set_vring_kick(0, raw.kick.fd)
        raw.fe.set_vring_call(0, raw.call.fd)
        assert b.state() == "not-started"
        raw.kick.set()
        wait_for(lambda: b.state() == "started", 60, "the ring to start again")
        assert b.qs()["get-vring-base"] == 1

        # a device reset forgets the ring's set-up
        raw.fe.request(FrontendReq.RESET_OWNER)
        q = b.qs()
        assert q["ring-state"] == "not-set-up" and q["device-resets"] == 1 and q["kick-fd"] == -1
        assert "or reset the device" in b.refused("kick")

        # a broken ring (DEVICE_NEEDS_RESET): set up again, a head out of range, kicked
        raw.connect()
        raw.set_up()
        raw.fe.set_vring_kick(0, raw.kick.fd)
        raw.fe.set_vring_enable(0, True)
        raw.mem.write_u16(AVAIL + 4, 99)  # avail.ring[0]: descriptor 99 of 16
        raw.mem.write_u16(AVAIL + 2, 1)
        raw.kick.set()
        wait_for(lambda: b.qs()["needs-reset"], 60, "DEVICE_NEEDS_RESET")
        assert "DEVICE_NEEDS_RESET" in b.refused("kick")
    finally:
        raw.close()
    wait_for(lambda: b.state() == "no-front-end", 60, "the back-end to see the front-end go")
    q = b.qs()
    assert q["get-vring-base"] == 1 and q["front-end"] == "" and q["kick-fd"] == q["call-fd"] == -1


def _driver(b: Backend, **kw) -> VhostUserBlkDriver:
    drv = VhostUserBlkDriver(b.sock, ram=16 << 20, queue_size=64, reconnect=False, **kw)
    drv.connect(wait=30)
    return drv


def _submit_read(drv: VhostUserBlkDriver, sector: int = 0) -> BlkRequest:
    r = drv.new_req(4096)
    assert drv.submit(0, [(r, BLK_T_IN, sector, 4096)]) == 1
    return r


@pytest.mark.parametrize("refuse", [True, False], ids=["fix-on", "fix-off"])
def test_a_ring_the_front_end_stopped_is_never_processed(backend_factory, refuse):
    """QEMU's x-query-virtio-queue-status on a started vhost ring sends GET_VRING_BASE alone (no
    SET_VRING_ENABLE 0): the ring stays enabled, its kick and call fds go.  A request published
    after that must not be taken by the back-end, whoever asks.  Off: the monitor's kick injection
    processes the stopped ring (it pops the request and writes the used ring)."""
    off = () if refuse else ("refuse-stopped-ring",)
    b = backend_factory(off=off)
    drv = _driver(b)
    try:
        assert drv.io(BLK_T_IN, 0, 4096)[0] == 0
        assert b.state() == "started"
        drv.fe.get_vring_base(0)
        q0 = b.qs()
        assert q0["ring-state"] == "stopped" and q0["enabled"]
        r = _submit_read(drv, 8)
        assert b.qs()["avail-idx"] == (q0["last-avail-idx"] + 1) & 0xFFFF
        if refuse:
            assert b.refused("kick") == STOPPED_TEXT
            q1 = b.qs()  # processing would have popped it during the injection
            assert q1["last-avail-idx"] == q0["last-avail-idx"] and q1["used-idx-ring"] == q0["used-idx-ring"]
            assert q1["inuse"] == 0 and q1["ring-state"] == "stopped"
        else:
            assert b.inject("kick") == {"path": "backend-process", "forced": False}
            assert b.qs()["last-avail-idx"] == q0["avail-idx"] + 1 & 0xFFFF  # popped from a stopped ring
            wait_for(lambda: b.qs()["used-idx-ring"] != q0["used-idx-ring"], 60, "the stopped ring's used ring")
            assert b.qs()["calls-without-fd"] >= 1  # completed, and nobody can be told
        assert not r.done.is_set()
    finally:
        drv.close()


def test_request_times_with_a_fixed_io_delay(backend_factory):
    b = backend_factory("--io-delay-ms", "300", "--io-delay-fixed")
    drv = _driver(b)
    try:
        q = b.qs()
        assert q["oldest-inflight-ms"] is None and q["completion-ms"]["count"] == 0
        for i in range(3):
            assert drv.io(BLK_T_IN, 8 * i, 4096)[0] == 0
        c = b.qs()["completion-ms"]
        assert c["count"] == c["recent"] == 3
        assert c["p50"] >= 290 and c["max"] >= c["p50"]  # each I/O sleeps 300 ms first
        assert b.qs()["oldest-inflight-ms"] is None

        r = _submit_read(drv, 64)
        ages = []

        def seen_twice() -> bool:
            age = b.qs()["oldest-inflight-ms"]
            if age is not None:
                ages.append(age)
            return len(ages) >= 2 or r.done.is_set()

        wait_for(seen_twice, 60, "the request in flight")
        assert r.done.wait(60)
        assert ages and all(a >= 0 for a in ages) and ages == sorted(ages)
        wait_for(lambda: b.qs()["oldest-inflight-ms"] is None, 60, "nothing in flight")
        c = b.qs()["completion-ms"]
        assert c["count"] == 4 and c["p50"] >= 290
    finally:
        drv.close()


def test_complete_fault_holds_requests_and_clear_completes_them(backend_factory):
    b = backend_factory()
    drv = _driver(b)
    try:
        assert drv.io(BLK_T_IN, 0, 4096)[0] == 0
        assert b.fault("complete", "drop-all") == {"path": "complete", "action": "drop-all", "dropped-so-far": 0,
                                                   "held": 0}
        used0 = b.qs()["used-idx-ring"]
        reqs = [_submit_read(drv, 8 * i) for i in range(1, 3)]
        wait_for(lambda: b.qs()["inuse"] == 2 and b.fault("complete", "drop-all")["held"] == 2, 60,
                 "the back-end to take both requests and hold them")
        first = b.qs()["oldest-inflight-ms"]
        assert first is not None
        wait_for(lambda: b.qs()["oldest-inflight-ms"] > first + 50, 60, "the oldest request to grow older")
        q = b.qs()
        assert q["inuse"] == 2 and q["used-idx-ring"] == used0 and q["ring-state"] == "started"
        assert not any(r.done.is_set() for r in reqs)

        out = b.fault("complete", "clear")  # the ring is started: the held requests complete
        assert out["completed"] == 2 and out["discarded"] == 0 and out["held"] == 0
        assert all(r.done.wait(60) and r.status_val == 0 for r in reqs)
        assert b.qs()["inuse"] == 0

        # drop-next holds one completion only
        b.fault("complete", "drop-next")
        held = _submit_read(drv, 40)
        wait_for(lambda: b.fault("complete", "drop-next")["held"] == 1, 60, "one held request")
        b.fault("complete", "clear")
        assert held.done.wait(60)
        b.fault("complete", "drop-next")
        r1 = _submit_read(drv, 48)
        wait_for(lambda: b.qs()["inuse"] == 1, 60, "the held request")
        b.fault("complete", "clear")  # nothing more is held after this
        assert r1.done.wait(60)
        assert drv.io(BLK_T_IN, 56, 4096)[0] == 0

        # held on a ring the front-end then stops: clear cannot complete it there, it is discarded
        b.fault("complete", "drop-all")
        _submit_read(drv, 64)
        wait_for(lambda: b.qs()["inuse"] == 1, 60, "the held request")
        drv.fe.get_vring_base(0)
        out = b.fault("complete", "clear")
        assert out["completed"] == 0 and out["discarded"] == 1
        assert "drop-all on the complete path" in b.mon.execute("human-monitor-command", {
            "command-line": f"x-debug-fault {DEV} 0 complete drop-all"})
    finally:
        drv.close()


@pytest.mark.parametrize("cancel", [True, False], ids=["fix-on", "fix-off"])
def test_sigterm_is_not_held_by_a_request_sleeping_in_the_io_delay(backend_factory, cancel):
    """Every I/O sleeps 40 s (``--io-delay-ms 40000 --io-delay-fixed``); with one asleep, SIGTERM
    ends the back-end at once (the drain is not held by the sleep).  Off: it is still running 8 s
    later (its stop waits for the sleeping request)."""
    off = () if cancel else ("cancel-io-delay-on-stop",)
    b = backend_factory("--io-delay-ms", "40000", "--io-delay-fixed", off=off)
    drv = _driver(b)
    try:
        _submit_read(drv)
        wait_for(lambda: b.qs()["inuse"] == 1, 60, "the back-end to take the request")
        b.proc.send_signal(signal.SIGTERM)
        if cancel:
            assert b.proc.wait(30) == 0  # well before the 40 s sleep would end
        else:
            with pytest.raises(subprocess.TimeoutExpired):
                b.proc.wait(8)
            b.proc.kill()
            b.proc.wait(30)
    finally:
        drv.close()


@pytest.mark.parametrize("forget", [True, False], ids=["fix-on", "fix-off"])
def test_a_kick_after_a_device_reset_touches_nothing(backend_factory, forget):
    """After RESET_OWNER the device's queues are reset (ring addresses 0).  On, the rings are not
    set up any more and their kick fds are gone: a kick reaches nothing.  Off, the old kick fd is
    still watched and the ring still looks set up: a kick processes the reset queue, which writes
    its used flags (VRING_USED_F_NO_NOTIFY) at GPA 0."""
    off = () if forget else ("forget-rings-on-reset",)
    b = backend_factory(off=off)
    raw = RawFrontend(b.sock)
    try:
        raw.connect()
        raw.set_up()
        raw.fe.set_vring_kick(0, raw.kick.fd)
        raw.fe.set_vring_enable(0, True)
        raw.kick.set()
        wait_for(lambda: b.state() == "started", 60, "the ring to start")
        raw.fe.request(FrontendReq.RESET_OWNER)
        assert raw.mem.read(0, 8) == bytes(8)
        kicks = _be_queue(b)["kicks"]
        raw.kick.set()
        if forget:
            q = b.qs()
            assert q["ring-state"] == "not-set-up" and q["kick-fd"] == -1  # nobody reads that kick
            raw.fe.get_features()  # a round trip: anything the back-end did, it has done
            assert _be_queue(b)["kicks"] == kicks and raw.mem.read(0, 8) == bytes(8)
        else:
            wait_for(lambda: _be_queue(b)["kicks"] == kicks + 1, 60, "the back-end to read the kick")
            assert raw.mem.read(0, 8) != bytes(8)  # the reset queue's used flags, at GPA 0
    finally:
        raw.close()
