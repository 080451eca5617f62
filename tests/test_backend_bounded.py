"""kickcall's vhost-user back-end, bounded against odd or hostile front-ends (issue 7).

Each test is named after what it protects and is parametrized over its fix's switch (a ``Switch``
in the back-end's fault registry, ``VhostUserBackend.faults``; ``--x-fix-off NAME`` for a back-end
in another process): with the switch off the harm comes back.

* a front-end that dribbles a message byte by byte cannot hold the loop, extend the message's
  deadline, or delay SIGTERM;
* accept() out of fds pauses the listener: the CPU stays idle and the log quiet;
* a front-end that never acknowledges a back-end request does not stall the loop;
* err and kick eventfds in odd states (at their maximum, EFD_SEMAPHORE) neither raise nor spin;
* the inflight region is checked against every ring's size;
* after a ring error, GET_VRING_BASE and a full ring set-up (a guest reset) make the disk usable
  again -- and nothing less does; the same hostile ring breaks it again.
"""

from __future__ import annotations

import fcntl
import logging
import os
import resource
import signal
import socket
import struct
import termios
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

import pytest

from vu_raw import raw_connect, read_message, send
from helpers import kickcall_argv, spawn, stop_process, wait_for, wait_for_listener
from kickcall.drive.vhost_user_blk import run_test
from kickcall.loop import IOThread
from kickcall.memory import GuestMemory
from kickcall.notify import EventNotifier
from kickcall.vhost_user import backend as bmod
from kickcall.vhost_user.backend import VhostUserBackend
from kickcall.vhost_user.frontend import BackendGone, VhostUserFrontend
from kickcall.vhost_user.inflight import HDR as INFLIGHT_HDR, queue_region_size
from kickcall.vhost_user.protocol import (
    CONFIG_HDR,
    FLAG_NEED_REPLY,
    FLAG_REPLY,
    HDR,
    INFLIGHT,
    MAX_FDS,
    U64,
    VERSION,
    VHOST_USER_F_PROTOCOL_FEATURES,
    BackendReq,
    FrontendReq,
    MemRegion,
    ProtocolError,
    ProtocolErrorKind,
    ProtocolFeature,
)
from kickcall.virtio.blk import BLK_T_GET_ID, VirtIOBlk, make_image
from kickcall.virtio.ring import DESC, VIRTIO_F_VERSION_1, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE

FR = FrontendReq
PF = ProtocolFeature
CEILING = 30.0  # seconds: how long any single expected event may take before the test fails
USER_BASE = 0x7F00_0000_0000
RAM = 8 << 20
SERIAL = b"bounded"
ON_OFF = pytest.mark.parametrize("fix", [True, False], ids=["fix-on", "fix-off"])
EFD_MAX = 0xFFFF_FFFF_FFFF_FFFE  # the largest value an eventfd counter holds


# -- an in-process back-end -------------------------------------------------------------------------
@dataclass
class Served:
    loop: IOThread
    dev: VirtIOBlk
    be: VhostUserBackend
    sock: str

    def status(self) -> dict:
        return self.loop.run_sync(self.be.status, timeout=CEILING)

    def queue(self, i: int) -> dict:
        return self.status()["queues"][i]


@contextmanager
def served(workdir: str, *, queues: int = 1, queue_size: int = 256, name: str = "bb",
           fixes: dict[str, bool] | None = None, **kw) -> Iterator[Served]:
    """An in-process back-end; *fixes* switches some of its fixes (registry names) before it starts."""
    img = os.path.join(workdir, "d.img")
    make_image(img, 4 << 20)
    loop = IOThread(f"{name}-loop")
    dev = VirtIOBlk("vublk", img, num_queues=queues, queue_size=queue_size, aio="sync", loop=loop,
                    serial=SERIAL.decode())
    sock = os.path.join(workdir, "s")
    be = VhostUserBackend(dev, socket_path=sock, loop=loop, name=name, **kw)
    for fix_name, on in (fixes or {}).items():
        be.faults.set_fix(fix_name, on)
    loop.start()
    be.start()
    try:
        yield Served(loop, dev, be, sock)
    finally:
        be.stop()
        loop.stop()
        dev.close()


def _unread(s: socket.socket) -> int:
    """Bytes this socket has sent that the peer has not read yet (SIOCOUTQ)."""
    return struct.unpack("i", fcntl.ioctl(s.fileno(), termios.TIOCOUTQ, b"\0\0\0\0"))[0]








class Dribbler(threading.Thread):
    """Send *data* one byte at a time, *gap* seconds apart, until done, stopped or refused."""

    def __init__(self, s: socket.socket, data: bytes, gap: float) -> None:
        super().__init__(daemon=True, name="dribbler")
        self.s, self.data, self.gap = s, data, gap
        self.sent = 0
        self.refused: OSError | None = None
        self.halt = threading.Event()

    def run(self) -> None:
        for b in self.data:
            if self.halt.is_set():
                return
            try:
                self.s.send(bytes([b]))
            except OSError as e:
                self.refused = e
                return
            self.sent += 1
            self.halt.wait(self.gap)  # the pace of the dribble, not a wait for an event

    def stop(self) -> None:
        self.halt.set()
        self.join(CEILING)


def dribbled_get_config(size: int = 4096) -> bytes:
    """GET_CONFIG with a payload of *size*: long enough to dribble for as long as a test needs."""
    return HDR.pack(FR.GET_CONFIG, VERSION, CONFIG_HDR.size + size) + CONFIG_HDR.pack(0, size, 0) + bytes(size)


# -- kickcall's own front-end with rings the test writes by hand ---------------------------------------
@dataclass
class Ring:
    desc: int
    avail: int
    used: int
    num: int
    bufs: int  # per head: a 4 KiB buffer area


class RingDriver:
    """kickcall's VhostUserFrontend, with guest RAM in a memfd and split rings written by hand, so
    a test decides every descriptor (a valid GET_ID request, a descriptor loop, a given head).
    Messages in QEMU 7.2's order; REPLY_ACK makes every SET synchronous."""

    def __init__(self, sock: str, *, queues: int = 1, num: int = 64, inflight: bool = False,
                 err_at_max: bool = False, kick_semaphore: bool = False) -> None:
        self.fe = VhostUserFrontend(sock, name="ring-driver", timeout=CEILING)
        self.mem = GuestMemory.create(RAM, "ring-ram")
        self.queues = queues
        self.num = num
        self.pf = (1 << PF.REPLY_ACK) | (1 << PF.MQ) | (1 << PF.CONFIG) | ((1 << PF.INFLIGHT_SHMFD) if inflight else 0)
        self.calls = [EventNotifier(f"rd.vq{i}.call") for i in range(queues)]
        self.errs = [EventNotifier(f"rd.vq{i}.err") for i in range(queues)]
        if err_at_max:
            for e in self.errs:
                e.set(EFD_MAX)
        self.kick_semaphore = kick_semaphore
        self.kicks: list[EventNotifier | None] = [None] * queues
        self.rings: dict[int, Ring] = {}
        self._areas = 0
        self.avail_shadow: dict[int, int] = {}

    def close(self) -> None:
        self.fe.close()
        for n in self.calls + self.errs + [k for k in self.kicks if k is not None]:
            n.close()
        self.mem.close()

    # -- set-up ---------------------------------------------------------------------------------------
    def connect(self) -> None:
        fe = self.fe
        fe.connect(wait=CEILING)
        fe.get_features()
        fe.get_protocol_features()
        fe.set_protocol_features(self.pf)
        fe.set_owner()
        fe.get_features()
        for i in range(self.queues):
            fe.set_vring_call(i, self.calls[i].fd)
            fe.set_vring_err(i, self.errs[i].fd)

    def features_and_memory(self) -> None:
        """SET_FEATURES and SET_MEM_TABLE (QEMU sends both on every vhost start)."""
        self.fe.set_features((1 << VIRTIO_F_VERSION_1) | (1 << VHOST_USER_F_PROTOCOL_FEATURES))
        regions, fds = self.mem.layout()
        self.fe.set_mem_table([MemRegion(r["gpa"], r["size"], USER_BASE + r["gpa"], r["block_offset"])
                               for r in regions], [fds[r["block"]] for r in regions])

    def new_ring(self, num: int | None = None) -> Ring:
        """A zeroed ring in an area of RAM no other ring used (a guest's fresh ring after a reset)."""
        n = num or self.num
        base = 0x10000 + self._areas * 0x80000
        self._areas += 1
        assert base + 0x80000 <= RAM
        r = Ring(base, base + 0x8000, base + 0x10000, n, base + 0x20000)
        self.mem.fill(base, 0x20000)
        return r

    def new_kick(self, q: int) -> EventNotifier:
        old = self.kicks[q]
        if old is not None:
            old.close()
        if self.kick_semaphore:
            k = EventNotifier(f"rd.vq{q}.kick", fd=os.eventfd(0, os.EFD_SEMAPHORE | os.EFD_CLOEXEC))
        else:
            k = EventNotifier(f"rd.vq{q}.kick")
        self.kicks[q] = k
        return k

    def setup_ring(self, q: int, ring: Ring, base: int = 0, steps: tuple[str, ...] = ("num", "base", "addr", "kick",
                                                                                       "call")) -> None:
        """The per-ring part of QEMU's vhost start: SET_VRING_NUM, _BASE, _ADDR, _KICK, _CALL."""
        fe = self.fe
        self.rings[q] = ring
        self.avail_shadow[q] = self.mem.read_u16(ring.avail + 2)
        if "num" in steps:
            fe.set_vring_num(q, ring.num)
        if "base" in steps:
            fe.set_vring_base(q, base)
        if "addr" in steps:
            fe.set_vring_addr(q, USER_BASE + ring.desc, USER_BASE + ring.used, USER_BASE + ring.avail)
        if "kick" in steps:
            fe.set_vring_kick(q, self.new_kick(q).fd)
        if "call" in steps:
            fe.set_vring_call(q, self.calls[q].fd)

    def start(self, queues: list[int] | None = None) -> None:
        qs = list(range(self.queues)) if queues is None else queues
        self.features_and_memory()
        for q in qs:
            self.setup_ring(q, self.new_ring())
        for q in qs:
            self.fe.set_vring_enable(q, True)

    def guest_reset(self, queues: list[int], rings: dict[int, tuple[Ring, int]] | None = None) -> None:
        """What QEMU sends when the guest resets the device and sets it up again: every ring
        disabled and stopped (GET_VRING_BASE), then features, memory and each ring from scratch
        (a fresh zeroed ring, unless *rings* names one and its base)."""
        for q in queues:
            self.fe.set_vring_enable(q, False)
        for q in queues:
            self.fe.get_vring_base(q)
        self.features_and_memory()
        for q in queues:
            ring, base = (rings or {}).get(q, (None, 0))
            self.setup_ring(q, ring or self.new_ring(), base)
        for q in queues:
            self.fe.set_vring_enable(q, True)

    # -- requests -------------------------------------------------------------------------------------
    def _publish(self, q: int, head: int) -> None:
        r = self.rings[q]
        idx = self.avail_shadow[q]
        self.mem.write_u16(r.avail + 4 + 2 * (idx % r.num), head)
        idx = (idx + 1) & 0xFFFF
        self.avail_shadow[q] = idx
        self.mem.write_u16(r.avail + 2, idx)

    def post_get_id(self, q: int, head: int) -> int:
        """A valid GET_ID request on descriptors head..head+2; returns the gpa of its status byte."""
        r = self.rings[q]
        buf = r.bufs + head * 0x1000
        self.mem.write(buf, struct.pack("<IIQ", BLK_T_GET_ID, 0, 0))
        self.mem.write(buf + 0x100, b"\xee" * 20)
        self.mem.write(buf + 0x200, b"\xff")
        for i, (addr, ln, flags) in enumerate([(buf, 16, VRING_DESC_F_NEXT),
                                               (buf + 0x100, 20, VRING_DESC_F_WRITE | VRING_DESC_F_NEXT),
                                               (buf + 0x200, 1, VRING_DESC_F_WRITE)]):
            self.mem.write(r.desc + 16 * (head + i), DESC.pack(addr, ln, flags, head + i + 1))
        self._publish(q, head)
        return buf

    def get_id_result(self, buf: int) -> tuple[int, bytes]:
        return self.mem.read(buf + 0x200, 1)[0], self.mem.read(buf + 0x100, 20)

    def post_descriptor_loop(self, q: int, head: int) -> None:
        """A hostile chain: descriptor *head* has NEXT set and points at itself."""
        r = self.rings[q]
        self.mem.write(r.desc + 16 * head, DESC.pack(r.bufs + head * 0x1000, 16, VRING_DESC_F_NEXT, head))
        self._publish(q, head)

    def kick(self, q: int) -> None:
        k = self.kicks[q]
        assert k is not None
        k.set()

    def used_idx(self, q: int) -> int:
        return self.mem.read_u16(self.rings[q].used + 2)


def wait_kicked(sv: Served, q: int, before: int) -> None:
    wait_for(lambda: sv.queue(q)["kicks"] > before, CEILING, f"the back-end to take queue {q}'s kick")


def get_id(sv: Served, d: RingDriver, q: int, head: int) -> None:
    """A GET_ID request completes, with the serial."""
    before = d.used_idx(q)
    buf = d.post_get_id(q, head)
    d.kick(q)
    wait_for(lambda: d.used_idx(q) != before, CEILING, f"the GET_ID request on queue {q} to complete")
    st, ident = d.get_id_result(buf)
    assert st == 0 and ident.rstrip(b"\0") == SERIAL


def break_ring(sv: Served, d: RingDriver, q: int, head: int) -> None:
    """A descriptor loop on queue *q*: the back-end marks the device broken and writes the err fd."""
    n = sv.status()["needs-reset-count"]
    d.post_descriptor_loop(q, head)
    d.kick(q)
    wait_for(lambda: sv.status()["needs-reset-count"] == n + 1, CEILING, "the device to break")
    assert sv.status()["broken"] and "loops" in sv.dev.broken_reason
    wait_for(lambda: d.errs[q].test_and_clear(), CEILING, f"the err fd of queue {q}")


def posted_request_stays_pending(sv: Served, d: RingDriver, q: int, head: int) -> None:
    """A valid request is kicked; the back-end takes the kick and does not serve it."""
    before_used = d.used_idx(q)
    kicks = sv.queue(q)["kicks"]
    d.post_get_id(q, head)
    d.kick(q)
    wait_kicked(sv, q, kicks)
    sv.loop.run_sync(lambda: None)  # whatever that kick started has run
    assert d.used_idx(q) == before_used
    assert sv.status()["broken"]


# == 1. per-message deadlines =========================================================================
@ON_OFF
def test_dribbling_frontend_does_not_hold_the_loop(workdir, fix):
    """A front-end sends a message one byte every 0.2 s.  The back-end's loop answers meanwhile
    and ``stop()`` returns at once.  Off: the loop sits in a blocking recv whose timeout restarts
    on every byte -- the status query times out and stop() cannot get in."""
    with served(workdir, fixes={"per-message-deadline": fix}, message_deadline=60.0) as sv:
        s = raw_connect(sv)
        drib = Dribbler(s, dribbled_get_config(), 0.2)
        drib.start()
        try:
            wait_for(lambda: drib.sent >= 3 and _unread(s) == 0, CEILING, "the back-end to read the first bytes")
            if fix:
                st = sv.loop.run_sync(sv.be.status, timeout=10.0)
                assert st["connected"] and st["partial-message-bytes"] >= 3
                assert st["peer"] == f"pid {os.getpid()} uid {os.getuid()}"
            else:
                with pytest.raises(TimeoutError):
                    sv.loop.run_sync(sv.be.status, timeout=10.0)
            stopper = threading.Thread(target=sv.be.stop, daemon=True)
            stopper.start()
            stopper.join(10.0)
            if fix:
                assert not stopper.is_alive(), "stop() did not return while a front-end dribbled"
                wait_for(lambda: drib.refused is not None or not drib.is_alive(), CEILING,
                         "the dribbler to find the connection closed")
            else:
                assert stopper.is_alive(), "the fix is off: stop() should be stuck behind the dribbler"
        finally:
            drib.stop()
            s.close()  # off: the blocking recv sees the end of the stream and the loop is free again
        if not fix:
            stopper.join(CEILING)
            assert not stopper.is_alive()


@ON_OFF
def test_dribbled_message_is_cut_off_at_its_deadline(workdir, caplog, fix):
    """A 32-byte GET_CONFIG dribbled one byte every 0.15 s (about 4.8 s in all, every gap far
    below the 1.5 s deadline): the back-end closes the connection 1.5 s after the first byte,
    with a log line naming the peer as too slow.  Off: each byte restarts the timeout and the
    message is answered, 3 times later than the deadline allowed."""
    caplog.set_level(logging.ERROR, logger="kickcall.vhost_user.backend")
    with served(workdir, fixes={"per-message-deadline": fix}, message_deadline=1.5) as sv:
        s = raw_connect(sv)
        send(s, FR.SET_PROTOCOL_FEATURES, U64.pack(1 << PF.CONFIG))
        drib = Dribbler(s, dribbled_get_config(8), 0.15)
        drib.start()
        try:
            msg = read_message(s)  # the reply, or None when the back-end closed the connection
            sent_at_close = drib.sent
        finally:
            drib.stop()
            s.close()
        if fix:
            assert msg is None, f"the dribbled message was answered: {msg}"
            assert sent_at_close < 32, "the whole message went through"
            wait_for(lambda: not sv.be.conn, CEILING, "the back-end to drop the connection")
            assert sv.be.slow_peers == 1
            assert sv.be.last_error_kind is ProtocolErrorKind.MESSAGE_DEADLINE
            assert f"pid {os.getpid()}" in sv.be.last_error  # the peer, named
            lines = [r.getMessage() for r in caplog.records if "too slow" in r.getMessage()]
            assert len(lines) == 1 and f"pid {os.getpid()}" in lines[0], lines
        else:
            assert msg is not None and msg.request == FR.GET_CONFIG and msg.flags & FLAG_REPLY
            assert sv.be.slow_peers == 0


def connect_served(path: str) -> socket.socket:
    """Connect to a back-end in another process and make sure it serves this connection (it
    serves one front-end at a time: a connection that comes while the previous one is still
    being dropped is closed at once, and this one then tries again)."""
    deadline = time.monotonic() + CEILING
    while True:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(CEILING)
        s.connect(path)
        send(s, FR.GET_FEATURES)
        if read_message(s) is not None:
            return s
        s.close()
        assert time.monotonic() < deadline, "the back-end never served a connection"
        time.sleep(0.05)


def leave(s: socket.socket) -> None:
    """Close this front-end's connection and wait until the back-end has dropped it too."""
    s.shutdown(socket.SHUT_WR)
    assert read_message(s) is None
    s.close()


def _backend_argv(sock: str, img: str, off: tuple[str, ...] = (), *extra: str) -> list[str]:
    """``kickcall vhost-user-blk``, with some of the back-end's fixes off (``--x-fix-off NAME``)."""
    return kickcall_argv("vhost-user-blk", "--socket-path", sock, "--blk-file", img,
                         *(a for name in off for a in ("--x-fix-off", name)), *extra)


@pytest.mark.parametrize("fix", [True, pytest.param(False, marks=pytest.mark.crash_reports_expected)],
                         ids=["fix-on", "fix-off"])  # off: the stuck stop ends in an internal error (exit 70)
def test_sigterm_while_a_frontend_dribbles_exits_at_once_without_a_traceback(workdir, fix):
    """``kickcall vhost-user-blk`` while a front-end dribbles a message one byte every 0.5 s:
    its monitor's x-query-vhost-user-backend (which needs the loop) answers, and SIGTERM makes
    it exit with status 0, at once and without a traceback.  Off: the query gets no answer, and
    the stop waits for a loop held by the dribbler; it ends, some 40 s later, in a traceback."""
    from kickcall.monitor.client import QMPClient

    img = os.path.join(workdir, "d.img")
    make_image(img, 4 << 20)
    sock = os.path.join(workdir, "s")
    qmp = os.path.join(workdir, "q")
    errpath = os.path.join(workdir, "stderr")
    with open(errpath, "wb") as err:
        p = spawn(_backend_argv(sock, img, () if fix else ("per-message-deadline",), "--qmp", qmp), stderr=err)
    drib = None
    s = None
    try:
        wait_for_listener(sock, p)
        s = connect_served(sock)
        drib = Dribbler(s, dribbled_get_config(), 0.5)
        drib.start()
        wait_for(lambda: drib.sent >= 2 and _unread(s) == 0, CEILING, "the back-end to read the first bytes")
        c = QMPClient(qmp, timeout=CEILING if fix else 5.0).connect(wait=CEILING)
        try:
            if fix:
                st = c.execute("x-query-vhost-user-backend")
                assert st["connected"] and st["partial-message-bytes"] >= 2
            else:
                with pytest.raises(OSError):  # (a timeout)
                    c.execute("x-query-vhost-user-backend")
        finally:
            c.close()
        t0 = time.monotonic()
        p.send_signal(signal.SIGTERM)
        p.wait(120)
        took = time.monotonic() - t0
    finally:
        if drib is not None:
            drib.stop()
        if s is not None:
            s.close()
        stop_process(p)
    with open(errpath, "rb") as f:
        stderr = f.read().decode(errors="replace")
    print(f"SIGTERM with a dribbler, fix {'on' if fix else 'off'}: exit {p.returncode} after {took:.1f} s, "
          f"{stderr.count('Traceback')} traceback(s)")
    if fix:
        assert p.returncode == 0 and "Traceback" not in stderr, stderr
        assert took < CEILING, f"the exit took {took:.1f} s"
    else:
        assert p.returncode != 0 or "Traceback" in stderr, "the fix is off: the stop should end in a traceback"


# == 2. accept() out of fds ==============================================================================
def _cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _lowest_free_fd(pid: int) -> int:
    fds = {int(x) for x in os.listdir(f"/proc/{pid}/fd")}
    return min(set(range(len(fds) + 1)) - fds)


def _count(path: str, needle: str) -> int:
    with open(path, "rb") as f:
        return f.read().decode(errors="replace").count(needle)


@ON_OFF
def test_listener_out_of_fds_leaves_the_cpu_idle_and_resumes(workdir, fix):
    """No front-end is connected (A came and went); the back-end's fd limit is then lowered to its
    lowest free fd, so accept() for front-end B fails with EMFILE.  The listener pauses: over a
    2 s window the process uses well under 30% of a core and logs at most one line per pause
    (1 s).  Once the limit is back up, B (waiting in the backlog) is served, then a full workload.
    Off: accept() fails in a loop, and every failure logs a traceback."""
    img = os.path.join(workdir, "d.img")
    make_image(img, 8 << 20)
    sock = os.path.join(workdir, "s")
    errpath = os.path.join(workdir, "stderr")
    with open(errpath, "wb") as err:
        p = spawn(_backend_argv(sock, img, () if fix else ("pause-listener-on-emfile",)), stderr=err)
    b = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    b.settimeout(CEILING)
    try:
        wait_for_listener(sock, p)
        leave(connect_served(sock))  # A: served, then gone -- the back-end is watching its listener again
        limits = resource.prlimit(p.pid, resource.RLIMIT_NOFILE)
        resource.prlimit(p.pid, resource.RLIMIT_NOFILE, (_lowest_free_fd(p.pid), limits[1]))
        b.connect(sock)  # into the backlog: accept() cannot get it an fd
        needle = "Too many open files"
        wait_for(lambda: _count(errpath, needle) > 0, CEILING, "accept() to fail with EMFILE")
        lines0, cpu0, t0 = _count(errpath, needle), _cpu_seconds(p.pid), time.monotonic()
        time.sleep(2.0)  # the measurement window
        lines1, cpu1, t1 = _count(errpath, needle), _cpu_seconds(p.pid), time.monotonic()
        share = (cpu1 - cpu0) / (t1 - t0)
        lines = lines1 - lines0
        print(f"accept out of fds, fix {'on' if fix else 'off'}: {share:.0%} of a core, {lines} log lines "
              f"in {t1 - t0:.1f} s")
        if fix:
            assert share < 0.3, f"the back-end used {share:.0%} of a core while out of fds"
            assert lines <= 4, f"{lines} log lines in {t1 - t0:.1f} s"
            assert "Traceback" not in open(errpath, "rb").read().decode(errors="replace")
        else:
            assert lines > 100, f"the fix is off: accept() should fail in a loop ({lines} lines, {share:.0%} CPU)"
        # the limit back up: B, waiting in the backlog, is served, then a whole workload (eventfds,
        # memory, an inflight region)
        resource.prlimit(p.pid, resource.RLIMIT_NOFILE, limits)
        send(b, FR.GET_FEATURES)
        rep = read_message(b)
        assert rep is not None and rep.request == FR.GET_FEATURES
        leave(b)
        r = run_test(sock, duration=0.5, depth=4, connect_wait=CEILING)
        assert r["error_count"] == 0 and r["ops"] > 0, r["errors"]
    finally:
        b.close()
        rc = stop_process(p)
    if fix:
        assert rc == 0


# == 3. back-end requests ============================================================================
def _negotiate_backend_req(s: socket.socket, sv: Served) -> socket.socket:
    """REPLY_ACK, CONFIG and BACKEND_REQ, SET_FEATURES, and a back-end request channel whose far
    end the test keeps (and never answers on)."""
    pf = (1 << PF.REPLY_ACK) | (1 << PF.CONFIG) | (1 << PF.BACKEND_REQ)
    send(s, FR.SET_PROTOCOL_FEATURES, U64.pack(pf))
    send(s, FR.SET_OWNER)
    send(s, FR.SET_FEATURES, U64.pack(sv.be.offered_features()), flags=VERSION | FLAG_NEED_REPLY)
    assert read_message(s).u64() == 0
    mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    send(s, FR.SET_BACKEND_REQ_FD, fds=[theirs.fileno()], flags=VERSION | FLAG_NEED_REPLY)
    theirs.close()
    assert read_message(s).u64() == 0
    return mine


@ON_OFF
def test_frontend_that_never_answers_a_backend_request_does_not_stall_the_loop(workdir, fix):
    """A config change is sent to a front-end that never acknowledges it (REPLY_ACK): the loop
    goes on at once and the acknowledgement is awaited in the background.  Off: the loop blocks
    in recv() for the acknowledgement, for the whole timeout."""
    with served(workdir, fixes={"async-backend-req-ack": fix}, backend_req_timeout=60.0) as sv:
        s = raw_connect(sv)
        chan = _negotiate_backend_req(s, sv)
        chan.settimeout(CEILING)
        try:
            if fix:
                sv.loop.run_sync(sv.dev.config_changed, timeout=10.0)
                msg = read_message(chan)
                assert msg.request == BackendReq.CONFIG_CHANGE_MSG and msg.flags & FLAG_NEED_REPLY
                st = sv.status()
                assert st["backend-req"]["open"] and st["backend-req"]["awaiting-ack"] == 1
                send(s, FR.GET_FEATURES)  # the front-end's own requests are served meanwhile
                assert read_message(s).u64() == sv.be.offered_features()
            else:
                with pytest.raises(TimeoutError):
                    sv.loop.run_sync(sv.dev.config_changed, timeout=10.0)
        finally:
            chan.close()  # off: the blocked recv sees the end of the stream
            s.close()
        sv.status()  # the loop answers


@ON_OFF
def test_unanswered_backend_request_gives_the_channel_up_with_one_log_line(workdir, caplog, fix):
    """Three config changes to a front-end that never acknowledges: once the first is 1 s
    overdue, the channel is closed with one log line, and later changes are not sent.  Off:
    each change waits out the timeout in the loop and logs a failure, and the channel stays."""
    caplog.set_level(logging.WARNING, logger="kickcall.vhost_user.backend")
    with served(workdir, fixes={"async-backend-req-ack": fix}, backend_req_timeout=1.0) as sv:
        s = raw_connect(sv)
        chan = _negotiate_backend_req(s, sv)
        try:
            sent = [sv.loop.run_sync(sv.be.send_config_change, timeout=CEILING) for _ in range(3)]
            assert sent == [fix] * 3  # off: each send waited out the timeout and failed
            if fix:
                wait_for(lambda: not sv.status()["backend-req"]["open"], CEILING, "the channel to be given up")
                assert sv.loop.run_sync(sv.be.send_config_change) is False
                lines = [r.getMessage() for r in caplog.records if "back-end request channel" in r.getMessage()]
                assert len(lines) == 1 and "did not answer CONFIG_CHANGE_MSG" in lines[0], lines
                assert sv.status()["connected"]
                send(s, FR.GET_FEATURES)
                assert read_message(s).u64() == sv.be.offered_features()
            else:
                lines = [r.getMessage() for r in caplog.records if "config change message failed" in r.getMessage()]
                assert len(lines) == 3, lines
                assert sv.status()["backend-req"]["open"]
        finally:
            chan.close()
            s.close()


def test_backend_request_acknowledged_by_kickcalls_frontend(workdir):
    """kickcall's own front-end answers CONFIG_CHANGE_MSG on its channel: the acknowledgement is
    matched and the channel stays open."""
    with served(workdir) as sv:
        fe = VhostUserFrontend(sv.sock, timeout=CEILING)
        changes = threading.Event()
        fe.on_config_change = changes.set
        try:
            fe.connect(wait=CEILING)
            fe.get_features()
            fe.set_protocol_features((1 << PF.REPLY_ACK) | (1 << PF.BACKEND_REQ) | (1 << PF.CONFIG))
            fe.set_backend_req_fd()
            fe.set_features((1 << VIRTIO_F_VERSION_1) | (1 << VHOST_USER_F_PROTOCOL_FEATURES))
            assert sv.loop.run_sync(sv.be.send_config_change) is True
            assert changes.wait(CEILING)
            wait_for(lambda: sv.status()["backend-req"]["acked"] == 1, CEILING, "the acknowledgement")
            assert sv.status()["backend-req"]["open"] and sv.status()["backend-req"]["awaiting-ack"] == 0
            assert sv.be.send_config_change() is True  # from another thread: handed to the loop
            wait_for(lambda: sv.status()["backend-req"]["acked"] == 2, CEILING, "the second acknowledgement")
        finally:
            fe.close()


# == 4. eventfds in odd states ==========================================================================
@ON_OFF
def test_ring_error_with_the_err_fd_at_its_maximum_still_stops_the_ring(workdir, fix):
    """The front-end's err eventfd holds its maximum count, so writing it fails (EAGAIN).  A
    descriptor loop: the ring is stopped, the device recorded as broken, the failed write
    counted, and nothing raises in the loop.  Off: BlockingIOError escapes into the loop and the
    ring keeps running."""
    with served(workdir, fixes={"guard-err-signal": fix}) as sv:
        d = RingDriver(sv.sock, err_at_max=True)
        try:
            d.connect()
            d.start()
            get_id(sv, d, 0, 0)
            errors = sv.loop.errors
            d.post_descriptor_loop(0, 3)
            d.kick(0)
            wait_for(lambda: sv.status()["broken"], CEILING, "the device to break")
            sv.loop.run_sync(lambda: None)
            q = sv.queue(0)
            assert sv.status()["needs-reset-count"] == 1
            if fix:
                assert sv.loop.errors == errors, "an exception escaped into the loop"
                assert not q["started"] and q["errors"] == 1 and q["err-write-failures"] == 1
            else:
                assert sv.loop.errors == errors + 1
                assert q["started"], "the fix is off: the ring should still be running"
            assert d.errs[0].peek() == EFD_MAX  # still signalled (it was never read)
        finally:
            d.close()


def _kernel_shows_semaphore() -> bool:
    fd = os.eventfd(0, os.EFD_SEMAPHORE)
    try:
        with open(f"/proc/self/fdinfo/{fd}") as f:
            return "eventfd-semaphore:" in f.read()
    finally:
        os.close(fd)


@pytest.mark.skipif(not _kernel_shows_semaphore(), reason="this kernel's fdinfo does not show eventfd-semaphore")
@ON_OFF
def test_semaphore_kick_fd_is_refused(workdir, fix):
    """SET_VRING_KICK with an EFD_SEMAPHORE eventfd: refused, the error naming it.  Off: taken."""
    with served(workdir, fixes={"refuse-semaphore-kick": fix}) as sv:
        d = RingDriver(sv.sock, kick_semaphore=True)
        try:
            d.connect()
            if fix:
                with pytest.raises((BackendGone, ProtocolError)):
                    d.start()
                assert sv.be.last_error_kind is ProtocolErrorKind.SEMAPHORE_KICK_FD
                assert sv.be.trace[-1] == "SET_VRING_KICK"
            else:
                d.start()
                assert sv.be.protocol_errors == 0
        finally:
            d.close()


def _thread_cpu_seconds(name: str) -> float:
    (t,) = [t for t in threading.enumerate() if t.name == name]
    with open(f"/proc/self/task/{t.native_id}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@ON_OFF
def test_kick_fd_that_stays_readable_does_not_make_the_loop_spin(workdir, fix):
    """A kick fd that is an EFD_SEMAPHORE eventfd near its maximum (accepted here: the refusal is
    switched off, as on a kernel whose fdinfo does not say) stays readable after every read.
    Over a 2 s window the loop thread uses well under 30% of a core and takes at most a few
    hundred kicks, and the ring is still served.  Off: the loop reads it as fast as it turns."""
    with served(workdir, fixes={"refuse-semaphore-kick": False, "bound-stuck-kick": fix}, name="semkick") as sv:
        d = RingDriver(sv.sock, kick_semaphore=True)
        try:
            d.connect()
            d.start()
            get_id(sv, d, 0, 0)
            d.kicks[0].set(EFD_MAX - 10)
            wait_for(lambda: sv.queue(0)["kicks"] > bmod.KICK_STUCK_LIMIT, CEILING, "kicks")
            k0, c0, t0 = sv.queue(0)["kicks"], _thread_cpu_seconds("semkick-loop"), time.monotonic()
            time.sleep(2.0)  # the measurement window
            k1, c1, t1 = sv.queue(0)["kicks"], _thread_cpu_seconds("semkick-loop"), time.monotonic()
            share, kicks = (c1 - c0) / (t1 - t0), k1 - k0
            print(f"stuck kick fd, fix {'on' if fix else 'off'}: {kicks} kicks, {share:.0%} of a core in {t1 - t0:.1f} s")
            if fix:
                assert share < 0.3, f"the loop used {share:.0%} of a core"
                assert kicks < 2 * (t1 - t0) / bmod.KICK_THROTTLE + bmod.KICK_STUCK_LIMIT, kicks
                assert sv.queue(0)["kick-throttles"] > 0
                get_id(sv, d, 0, 3)  # still served
            else:
                assert kicks > 5000, f"the fix is off: the loop should spin ({kicks} kicks, {share:.0%} CPU)"
        finally:
            d.close()


# == 5. inflight region against ring sizes ===============================================================
ORDERS = ["get-inflight-then-num", "num-then-get-inflight", "num-then-set-inflight", "addr-without-num"]


@pytest.mark.parametrize("order", ORDERS)
@ON_OFF
def test_inflight_region_smaller_than_the_ring_cannot_overwrite_another_queue(workdir, order, fix):
    """An inflight region of 2 queues of 64 entries, a ring of 128 on queue 0 (or of the queue's
    maximum, 256, when SET_VRING_NUM never comes), in either order: whichever message makes them
    inconsistent is refused.  Off: a request at head 67 of queue 0 marks its inflight slot at
    16 + 16*67 = 1088 bytes, which is queue 1's header: queue 1's state is overwritten."""
    with served(workdir, fixes={"check-inflight-ring-size": fix}, queues=2, queue_size=256) as sv:
        d = RingDriver(sv.sock, queues=2, num=128, inflight=True)
        own_region = None
        try:
            d.connect()
            fe = d.fe
            ring = d.new_ring(256 if order == "addr-without-num" else 128)
            d.rings[0] = ring
            d.avail_shadow[0] = 0

            def inflight_step() -> int:
                nonlocal own_region
                if order == "num-then-set-inflight":
                    size = 4096
                    own_region = os.memfd_create("test-inflight", os.MFD_CLOEXEC)
                    os.ftruncate(own_region, size)
                    fe.request(FR.SET_INFLIGHT_FD, INFLIGHT.pack(size, 0, 2, 64), [own_region])
                    return own_region
                info = fe.get_inflight_fd(2, 64)
                own_region = info.fd
                fe.set_inflight_fd(info)
                return info.fd

            try:
                if order in ("get-inflight-then-num", "addr-without-num"):
                    region = inflight_step()
                    d.features_and_memory()
                    if order != "addr-without-num":
                        fe.set_vring_num(0, 128)
                else:
                    fe.set_vring_num(0, 128)
                    region = inflight_step()
                    d.features_and_memory()
                fe.set_vring_base(0, 0)
                fe.set_vring_addr(0, USER_BASE + ring.desc, USER_BASE + ring.used, USER_BASE + ring.avail)
                fe.set_vring_kick(0, d.new_kick(0).fd)
                fe.set_vring_call(0, d.calls[0].fd)
                fe.set_vring_enable(0, True)
            except (BackendGone, ProtocolError):
                assert fix, f"refused with the check off: {sv.be.last_error}"
                assert sv.be.last_error_kind is ProtocolErrorKind.INFLIGHT_MISMATCH, sv.be.last_error
                return
            assert not fix, "the inconsistent inflight region was accepted"
            q1_header = queue_region_size(64)
            before = os.pread(region, INFLIGHT_HDR.size, q1_header)
            assert before == bytes(INFLIGHT_HDR.size)  # queue 1 was never used
            get_id(sv, d, 0, 67)
            after = os.pread(region, INFLIGHT_HDR.size, q1_header)
            assert after != before, "queue 1's inflight header was not touched"
            _f, _ver, desc_num, _lbh, _used = INFLIGHT_HDR.unpack(after)
            assert desc_num != 64  # a recovery of queue 1 from this region would fail
        finally:
            d.close()
            if own_region is not None:
                os.close(own_region)


# == 6. recovery after a ring error ============================================================================
@ON_OFF
def test_guest_reset_after_a_ring_error_makes_the_disk_usable_again(workdir, fix):
    """A descriptor loop breaks the device (NEEDS_RESET, err fd).  The guest resets the device,
    which QEMU turns into GET_VRING_BASE and a full ring set-up: I/O on the fresh ring completes.
    Presenting the hostile ring again (set up at its old place, from the base where it broke)
    breaks the device again and writes the err fd again.  Off: the disk stays dead."""
    with served(workdir, fixes={"recover-after-ring-reinit": fix}) as sv:
        d = RingDriver(sv.sock)
        try:
            d.connect()
            d.start()
            get_id(sv, d, 0, 0)
            hostile = d.rings[0]
            break_ring(sv, d, 0, 3)
            d.guest_reset([0])
            if not fix:
                posted_request_stays_pending(sv, d, 0, 0)
                assert sv.status()["recoveries"] == 0
                return
            st = sv.status()
            assert not st["broken"] and st["recoveries"] == 1
            get_id(sv, d, 0, 0)
            get_id(sv, d, 0, 6)
            # the hostile ring again: its loop sits at avail slot 1, where the device broke
            d.guest_reset([0], rings={0: (hostile, 1)})
            assert not sv.status()["broken"]
            kicks = sv.queue(0)["kicks"]
            d.kick(0)
            wait_kicked(sv, 0, kicks)
            wait_for(lambda: sv.status()["needs-reset-count"] == 2, CEILING, "the device to break again")
            assert sv.status()["broken"]
            wait_for(lambda: d.errs[0].test_and_clear(), CEILING, "the err fd, written again")
        finally:
            d.close()


@ON_OFF
def test_ring_left_running_keeps_the_device_broken_until_it_is_stopped_too(workdir, fix):
    """Two queues; queue 0 breaks.  Queue 0 alone stopped and set up again: still broken (queue
    1 still runs as it did).  Once queue 1 is stopped too (and not set up again), the device is
    usable: the request already kicked on queue 0 completes.  Off: it never does."""
    with served(workdir, fixes={"recover-after-ring-reinit": fix}, queues=2) as sv:
        d = RingDriver(sv.sock, queues=2)
        try:
            d.connect()
            d.start()
            get_id(sv, d, 1, 0)
            break_ring(sv, d, 0, 0)
            d.guest_reset([0])
            posted_request_stays_pending(sv, d, 0, 0)
            d.fe.set_vring_enable(1, False)
            d.fe.get_vring_base(1)
            if fix:
                wait_for(lambda: d.used_idx(0) == 1, CEILING, "the pending request on queue 0")
                st = sv.status()
                assert not st["broken"] and st["recoveries"] == 1 and not st["queues"][1]["started"]
                get_id(sv, d, 0, 3)
            else:
                sv.loop.run_sync(lambda: None)
                assert sv.status()["broken"] and d.used_idx(0) == 0
        finally:
            d.close()


@pytest.mark.parametrize("sequence", ["set-up-without-get-vring-base", "get-vring-base-only",
                                      "get-vring-base-then-kick-only", "get-vring-base-then-all-but-call"])
def test_ring_error_is_not_bypassed_by_less_than_a_full_reset(workdir, sequence):
    """After a ring error, anything short of GET_VRING_BASE followed by the whole set-up
    (SET_VRING_NUM, _BASE, _ADDR, _KICK, _CALL) leaves the device broken: a valid request on
    a fresh ring is not served."""
    with served(workdir) as sv:
        d = RingDriver(sv.sock)
        try:
            d.connect()
            d.start()
            break_ring(sv, d, 0, 0)
            fresh = d.new_ring()
            if sequence == "set-up-without-get-vring-base":
                d.setup_ring(0, fresh)
            else:
                d.fe.set_vring_enable(0, False)
                d.fe.get_vring_base(0)
                if sequence == "get-vring-base-then-kick-only":
                    d.setup_ring(0, d.rings[0], steps=("kick",))
                elif sequence == "get-vring-base-then-all-but-call":
                    d.setup_ring(0, fresh, steps=("num", "base", "addr", "kick"))
            d.fe.set_vring_enable(0, True)
            if sequence == "get-vring-base-only":
                assert sv.status()["broken"]  # (and without a kick fd nothing could be kicked)
            else:
                posted_request_stays_pending(sv, d, 0, 5)
            assert sv.status()["recoveries"] == 0
            # and a device reset (RESET_DEVICE's sibling here: a new connection) does recover it
        finally:
            d.close()
        wait_for(lambda: sv.be.conn is None, CEILING, "the front-end to go")
        d2 = RingDriver(sv.sock)
        try:
            d2.connect()
            d2.start()
            assert not sv.status()["broken"]
            get_id(sv, d2, 0, 0)
        finally:
            d2.close()


# -- the message reader itself ----------------------------------------------------------------------------
def _open_fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


def test_message_reader_closes_the_fds_of_a_message_that_never_finishes():
    """Fds that came with the first part of a message that is then cut off are closed (none is
    leaked); fds spread over the parts of one message count together against the limit."""
    from kickcall.vhost_user.protocol import MessageReader

    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    b.setblocking(False)
    r = MessageReader()
    efd = os.eventfd(0, os.EFD_CLOEXEC)
    before = _open_fds()
    try:
        socket.send_fds(a, [HDR.pack(FR.SET_VRING_KICK, VERSION, 8) + b"\0\0"], [efd])
        assert r.feed(b) is None and r.started and r.received == 14 and r.expected == 20
        assert len(_open_fds() - before) == 1  # the fd that came with it
        a.close()
        with pytest.raises(ProtocolError) as ei:
            r.feed(b)
        assert ei.value.kind is ProtocolErrorKind.PARTIAL_MESSAGE
        assert _open_fds() - before == set() and not r.started
    finally:
        os.close(efd)
        b.close()
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    b.setblocking(False)
    fds = [os.eventfd(0, os.EFD_CLOEXEC) for _ in range(MAX_FDS)]
    before = _open_fds()
    try:
        msg = HDR.pack(FR.GET_FEATURES, VERSION, 0)
        socket.send_fds(a, [msg[:6]], fds)
        assert r.feed(b) is None
        socket.send_fds(a, [msg[6:]], fds[:1])
        with pytest.raises(ProtocolError) as ei:
            r.feed(b)
        assert ei.value.kind is ProtocolErrorKind.BAD_FD_COUNT
        assert _open_fds() - before == set()
        # a whole message after an error: the reader starts afresh
        a.sendall(HDR.pack(FR.GET_FEATURES, VERSION, 0))
        m = r.feed(b)
        assert m is not None and m.request == FR.GET_FEATURES and m.fds == []
    finally:
        for fd in fds:
            os.close(fd)
        a.close()
        b.close()
