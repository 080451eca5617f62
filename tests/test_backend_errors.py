"""The vhost-user back-end's errors, over a real socket: refusals by kind, reports, bugs apart.

* requests are checked as rust-vmm's ``is_valid`` checks them (issue 9): header flags other than
  NEED_REPLY, SET_VRING_ADDR flags other than VHOST_VRING_F_LOG, misaligned ring addresses are
  refused, each a ``ProtocolError`` of its own kind; the ``validate-messages`` fix off shows what
  the back-end did before (accepted, or refused only later, after translation, as a ring error);
* a ring error met while polling a ring that has no kick fd is reported as a kick that met it
  would be (``report-poll-errors`` off: swallowed, as before);
* an exception the back-end did not expect (a bug in the device's handler, or in a handler of a
  message) is counted in ``internal_errors`` with a crash report, never as the front-end's fault;
* every ``ProtocolErrorKind`` has a test (this file, the fuzz tests, the bounded tests);
* the back-end's per-queue faults (``lose-kick``, ``lose-call``) and the monitor's listing.
"""

from __future__ import annotations

import os
import re
import socket
import threading
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

import pytest

from vu_raw import raw_connect, read_message, send
from helpers import kickcall_argv, spawn, stop_process, wait_for
from kickcall.apps.backend_monitor import BackendDevice
from kickcall.guest.virtio_ring import Vring
from kickcall.loop import IOThread
from kickcall.memory import GuestMemory
from kickcall.monitor.target import TargetError
from kickcall.notify import EventNotifier
from kickcall.vhost_user.backend import FIXES, VhostUserBackend
from kickcall.vhost_user.device import VhostUserBlkDevice
from kickcall.vhost_user.frontend import VhostUserFrontend
from kickcall.vhost_user.inflight import HDR as INFLIGHT_HDR
from kickcall.vhost_user.protocol import (
    FLAG_NEED_REPLY,
    FLAG_REPLY,
    HDR,
    INFLIGHT,
    SINGLE_MEM_REGION,
    U64,
    VERSION,
    VHOST_USER_F_PROTOCOL_FEATURES,
    VHOST_VRING_F_LOG,
    VRING_ADDR,
    VRING_NOFD_MASK,
    VRING_STATE,
    FrontendReq,
    MemRegion,
    Message,
    ProtocolError,
    ProtocolErrorKind,
    ProtocolFeature,
    pack_regions,
)
from kickcall.virtio.blk import VirtIOBlk, make_image
from kickcall.virtio.device import VirtIODevice
from kickcall.virtio.queue import VirtQueue
from kickcall.virtio.ring import VIRTIO_F_VERSION_1

FR = FrontendReq
PF = ProtocolFeature
K = ProtocolErrorKind
CEILING = 30.0
USER_BASE = 0x7F00_0000_0000
RAM = 1 << 20
ON_OFF = pytest.mark.parametrize("fix", [True, False], ids=["fix-on", "fix-off"])
ALL_PF = (1 << PF.REPLY_ACK) | (1 << PF.MQ) | (1 << PF.CONFIG) | (1 << PF.INFLIGHT_SHMFD) | \
    (1 << PF.CONFIGURE_MEM_SLOTS)


# -- devices -------------------------------------------------------------------------------------------
class EchoDevice(VirtIODevice):
    """Copies each request's readable buffers into its writable ones (a test device)."""

    device_id = 0x7F
    type_name = "echo"

    def __init__(self, name: str = "echo", queue_size: int = 256) -> None:
        super().__init__(name, queue_sizes=[queue_size])

    def handle_output(self, vq: VirtQueue) -> None:
        self.process_queue_loop(vq, self._echo)

    def _echo(self, vq: VirtQueue, elem) -> None:
        assert self.mem is not None
        data = b"".join(self.mem.read(gpa, n) for gpa, n in elem.out_sg)
        done = 0
        for gpa, n in elem.in_sg:
            piece = data[done:done + n]
            self.mem.write(gpa, piece)
            done += len(piece)
        vq.push(elem, done)
        self.notify(vq)


class BuggyDevice(EchoDevice):
    """A device with a bug: its queue handler raises."""

    def handle_output(self, vq: VirtQueue) -> None:
        raise RuntimeError("a bug in the device's queue handler")


@dataclass
class Served:
    loop: IOThread
    dev: VirtIODevice
    be: VhostUserBackend
    sock: str

    def status(self) -> dict:
        return self.loop.run_sync(self.be.status, timeout=CEILING)

    def queue(self, i: int = 0) -> dict:
        return self.status()["queues"][i]


@contextmanager
def served(workdir: str, dev: VirtIODevice | None = None, fixes: dict[str, bool] | None = None,
           **kw) -> Iterator[Served]:
    loop = IOThread("be-errors")
    dev = dev if dev is not None else EchoDevice()
    sock = os.path.join(workdir, "s")
    be = VhostUserBackend(dev, socket_path=sock, loop=loop, name="errs", **kw)
    for name, on in (fixes or {}).items():
        be.faults.set_fix(name, on)
    loop.start()
    be.start()
    try:
        yield Served(loop, dev, be, sock)
    finally:
        be.stop()
        loop.stop()


# -- a front-end with a guest ring ----------------------------------------------------------------------
class MiniDriver:
    """kickcall's VhostUserFrontend with guest RAM in a memfd and one driver-side ring
    (``kickcall.guest.virtio_ring``): connect, set up queue 0, send requests, read replies."""

    def __init__(self, sock: str, *, num: int = 16, kick: bool = True) -> None:
        self.fe = VhostUserFrontend(sock, name="mini", timeout=CEILING)
        self.mem = GuestMemory.create(RAM, "mini-ram")
        self.call = EventNotifier("mini.call")
        self.err = EventNotifier("mini.err")
        self.kick = EventNotifier("mini.kick") if kick else None
        self._next = 0x1000
        self.vq = Vring(self.mem, self.alloc, 0, num, event_idx=False, indirect=False, notify=self._notify)

    def alloc(self, size: int, align: int = 16) -> int:
        a = (self._next + align - 1) // align * align
        self._next = a + size
        assert self._next <= RAM
        return a

    def _notify(self, vq: Vring) -> None:
        if self.kick is not None:
            self.kick.set()

    def connect(self, pf: int = (1 << PF.REPLY_ACK)) -> None:
        fe = self.fe
        fe.connect(wait=CEILING)
        fe.get_features()
        fe.get_protocol_features()
        fe.set_protocol_features(pf)
        fe.set_owner()
        fe.set_vring_call(0, self.call.fd)
        fe.set_vring_err(0, self.err.fd)
        fe.set_features((1 << VIRTIO_F_VERSION_1) | (1 << VHOST_USER_F_PROTOCOL_FEATURES))
        regions, fds = self.mem.layout()
        fe.set_mem_table([MemRegion(r["gpa"], r["size"], USER_BASE + r["gpa"], r["block_offset"]) for r in regions],
                         [fds[r["block"]] for r in regions])

    def start(self, desc: int | None = None, avail: int | None = None, used: int | None = None) -> None:
        fe, vq = self.fe, self.vq
        fe.set_vring_num(0, vq.num)
        fe.set_vring_base(0, 0)
        fe.set_vring_addr(0, USER_BASE + (vq.desc if desc is None else desc), USER_BASE + (vq.used if used is None else used),
                          USER_BASE + (vq.avail if avail is None else avail))
        fe.set_vring_kick(0, self.kick.fd if self.kick is not None else None)
        fe.set_vring_enable(0, True)

    def post(self, data: bytes) -> tuple[int, int]:
        """Add a request (data out, as many bytes in) and kick; returns the buffers' addresses."""
        out, inn = self.alloc(len(data)), self.alloc(len(data))
        self.mem.write(out, data)
        with self.vq.lock:
            assert self.vq.add([(out, len(data))], [(inn, len(data))], token=inn)
        self.vq.kick()
        return out, inn

    def reply(self) -> bytes:
        wait_for(self.vq.more_used, CEILING, "the request to complete")
        with self.vq.lock:
            got = self.vq.get_buf()
        assert got is not None
        inn, n = got
        return self.mem.read(inn, n)

    def close(self) -> None:
        self.fe.close()
        for n in (self.call, self.err, self.kick):
            if n is not None:
                n.close()
        self.mem.close()


# -- a raw front-end: tests/vu_raw.py (raw_connect, send, read_message) ----------------------------


def ack(s: socket.socket, req: int, payload: bytes = b"", fds: list[int] | tuple[int, ...] = ()) -> int | None:
    """Send with NEED_REPLY; the acknowledgement's status, or None if the back-end closed instead."""
    send(s, req, payload, fds, flags=VERSION | FLAG_NEED_REPLY)
    m = read_message(s)
    return None if m is None else m.u64()


def refused(sv: Served, s: socket.socket, kind: ProtocolErrorKind, errors: int) -> None:
    """The back-end closed this connection on one protocol error of *kind*, and no internal error."""
    assert read_message(s) is None, "the back-end answered instead of closing the connection"
    wait_for(lambda: sv.be.conn is None, CEILING, "the back-end to drop the connection")
    assert sv.be.protocol_errors == errors + 1 and sv.be.last_error_kind is kind, sv.be.last_error
    assert sv.status()["protocol-error-kinds"].get(kind.value, 0) >= 1
    assert sv.be.internal_errors == 0


def negotiated(sv: Served, memfd: int, *, user: int = USER_BASE, pf: int = ALL_PF) -> socket.socket:
    """A raw connection with REPLY_ACK (and the rest) negotiated and a 1 MiB memory table at *user*."""
    s = raw_connect(sv)
    send(s, FR.SET_PROTOCOL_FEATURES, U64.pack(pf))
    assert ack(s, FR.SET_MEM_TABLE, pack_regions([MemRegion(0, RAM, user, 0)]), [memfd]) == 0
    assert ack(s, FR.SET_VRING_NUM, VRING_STATE.pack(0, 16)) == 0
    return s


@pytest.fixture
def memfd():
    fd = os.memfd_create("errs-ram", os.MFD_CLOEXEC)
    os.ftruncate(fd, RAM)
    yield fd
    os.close(fd)


# == 1. header flags (rust-vmm VhostUserMsgHeader::is_valid, BackendReqHandler::check_request_size) ===========
@pytest.mark.parametrize("flags", [VERSION | 0x10, VERSION | 0x100, VERSION | 0x8000_0000, VERSION | FLAG_REPLY,
                                   VERSION | FLAG_REPLY | FLAG_NEED_REPLY],
                         ids=["bit4", "bit8", "bit31", "reply", "reply-need-reply"])
@ON_OFF
def test_request_with_bad_header_flags_is_refused(workdir, flags, fix):
    """A request whose header has flags beside the version and NEED_REPLY (reserved bits, or
    REPLY: a request is not a reply) closes the connection, a ``bad-flags`` error.  Off: it is
    answered, as before."""
    with served(workdir, fixes={"validate-messages": fix}) as sv:
        s = raw_connect(sv)
        try:
            send(s, FR.GET_FEATURES, flags=flags)
            if fix:
                refused(sv, s, K.BAD_FLAGS, 0)
            else:
                m = read_message(s)
                assert m is not None and m.u64() == sv.be.offered_features()
                assert sv.be.protocol_errors == 0
        finally:
            s.close()


def test_need_reply_alone_is_a_valid_request_flag(workdir):
    with served(workdir) as sv:
        s = raw_connect(sv)
        try:
            send(s, FR.SET_PROTOCOL_FEATURES, U64.pack(1 << PF.REPLY_ACK))
            assert ack(s, FR.SET_OWNER) == 0
            assert sv.be.protocol_errors == 0
        finally:
            s.close()


# == 2. SET_VRING_ADDR (rust-vmm VhostUserVringAddr::is_valid) ================================================
DESC0, AVAIL0, USED0 = 0x1000, 0x2000, 0x3000  # a ring of 16 in the first pages of RAM


@pytest.mark.parametrize("flags", [0x2, 0x8000_0000, VHOST_VRING_F_LOG | 0x4])
@ON_OFF
def test_set_vring_addr_with_undefined_flags_is_refused(workdir, memfd, flags, fix):
    """SET_VRING_ADDR flags other than VHOST_VRING_F_LOG: refused (``bad-vring-flags``).  Off:
    unpacked and dropped, the ring set up, as before."""
    with served(workdir, fixes={"validate-messages": fix}) as sv:
        s = negotiated(sv, memfd)
        try:
            status = ack(s, FR.SET_VRING_ADDR, VRING_ADDR.pack(0, flags, USER_BASE + DESC0, USER_BASE + USED0,
                                                             USER_BASE + AVAIL0, 0))
            if fix:
                assert status is None
                refused(sv, s, K.BAD_VRING_FLAGS, 0)
            else:
                assert status == 0 and sv.queue()["ring-state"] == "not-started"
        finally:
            s.close()


def test_set_vring_addr_with_the_log_flag_is_accepted(workdir, memfd):
    with served(workdir) as sv:
        s = negotiated(sv, memfd)
        try:
            assert ack(s, FR.SET_VRING_ADDR, VRING_ADDR.pack(0, VHOST_VRING_F_LOG, USER_BASE + DESC0, USER_BASE + USED0,
                                                           USER_BASE + AVAIL0, 0)) == 0
        finally:
            s.close()


@pytest.mark.parametrize("which,off", [("desc", 8), ("desc", 2), ("avail", 1), ("used", 2), ("used", 1)],
                         ids=["desc+8", "desc+2", "avail+1", "used+2", "used+1"])
@ON_OFF
def test_misaligned_ring_address_is_refused(workdir, memfd, which, off, fix):
    """A descriptor table not 16-byte, an available ring not 2-byte, a used ring not 4-byte
    aligned (virtio 1.x 2.7): refused on the front-end's address, ``misaligned-ring-address``.
    Off: the back-end refused it only once translated, when the queue mapped the ring (a ring
    error, ``ring-not-mappable``)."""
    addrs = {"desc": DESC0, "avail": AVAIL0, "used": USED0}
    addrs[which] += off
    with served(workdir, fixes={"validate-messages": fix}) as sv:
        s = negotiated(sv, memfd)
        try:
            send(s, FR.SET_VRING_ADDR, VRING_ADDR.pack(0, 0, USER_BASE + addrs["desc"], USER_BASE + addrs["used"],
                                                       USER_BASE + addrs["avail"], 0))
            refused(sv, s, K.MISALIGNED_RING_ADDRESS if fix else K.RING_NOT_MAPPABLE, 0)
        finally:
            s.close()


@ON_OFF
def test_misaligned_front_end_address_of_an_aligned_ring_is_refused(workdir, memfd, fix):
    """A memory region whose user address is 8 bytes past a 16-byte boundary: a descriptor table
    at a misaligned front-end address lands on an aligned guest address.  Refused (rust-vmm checks
    the address the front-end sent).  Off: accepted, as before (the queue saw an aligned ring)."""
    with served(workdir, fixes={"validate-messages": fix}) as sv:
        s = negotiated(sv, memfd, user=USER_BASE + 8)
        try:
            u = USER_BASE + 8
            status = ack(s, FR.SET_VRING_ADDR, VRING_ADDR.pack(0, 0, u + DESC0, u + USED0, u + AVAIL0, 0))
            if fix:
                assert status is None
                refused(sv, s, K.MISALIGNED_RING_ADDRESS, 0)
            else:
                assert status == 0 and sv.be.protocol_errors == 0
        finally:
            s.close()


# == 3. SET_VRING_KICK/CALL/ERR's u64 ==========================================================================
@pytest.mark.parametrize("req", [FR.SET_VRING_KICK, FR.SET_VRING_CALL, FR.SET_VRING_ERR])
@pytest.mark.parametrize("bits", [0x200, 0x8000_0000_0000_0000, 0xFE00])
def test_vring_file_with_bits_beyond_index_and_nofd_is_refused(workdir, req, bits):
    """Bits other than the index (0-7) and VRING_NOFD (8): ``bad-vring-file`` (refused before issue
    9 too, by the handler; now by ``VringFile.validate``)."""
    with served(workdir) as sv:
        s = raw_connect(sv)
        try:
            send(s, req, U64.pack(bits | VRING_NOFD_MASK))
            refused(sv, s, K.BAD_VRING_FILE, 0)
        finally:
            s.close()


# == 4. kinds the fuzz and bounded tests do not reach ==========================================================
def test_set_features_without_version_1_is_refused_by_the_device(workdir):
    with served(workdir) as sv:
        s = raw_connect(sv)
        try:
            send(s, FR.SET_FEATURES, U64.pack(1 << VHOST_USER_F_PROTOCOL_FEATURES))
            refused(sv, s, K.DEVICE_REFUSED_FEATURES, 0)
        finally:
            s.close()


def test_dirty_logging_is_refused(workdir):
    with served(workdir) as sv:
        s = raw_connect(sv)
        try:
            send(s, FR.SET_FEATURES, U64.pack((1 << VIRTIO_F_VERSION_1) | (1 << 26)))
            refused(sv, s, K.BAD_LOG, 0)
        finally:
            s.close()


def test_set_vring_enable_other_than_0_or_1(workdir):
    with served(workdir) as sv:
        s = raw_connect(sv)
        try:
            send(s, FR.SET_VRING_ENABLE, VRING_STATE.pack(0, 2))
            refused(sv, s, K.BAD_VRING_ENABLE, 0)
        finally:
            s.close()


def test_add_mem_reg_beyond_the_advertised_slots(workdir):
    with served(workdir) as sv:
        s = raw_connect(sv)
        fds = [os.memfd_create(f"slot{i}", os.MFD_CLOEXEC) for i in range(9)]
        try:
            for fd in fds:
                os.ftruncate(fd, 4096)
            send(s, FR.SET_PROTOCOL_FEATURES, U64.pack(ALL_PF))
            assert ack(s, FR.GET_MAX_MEM_SLOTS) is not None  # (a reply, not an ack: read and dropped)
            for i, fd in enumerate(fds[:8]):
                assert ack(s, FR.ADD_MEM_REG, SINGLE_MEM_REGION.pack(0, i * 0x10000, 4096, USER_BASE + i * 0x10000, 0),
                           [fd]) == 0
            send(s, FR.ADD_MEM_REG, SINGLE_MEM_REGION.pack(0, 8 * 0x10000, 4096, USER_BASE + 8 * 0x10000, 0), [fds[8]])
            refused(sv, s, K.TOO_MANY_REGIONS, 0)
        finally:
            s.close()
            for fd in fds:
                os.close(fd)


def test_memory_region_that_cannot_be_mapped(workdir):
    """A regular file opened read-only: fstat says it is big enough, mmap (shared, writable) fails."""
    path = os.path.join(workdir, "ro")
    with open(path, "wb") as f:
        f.truncate(RAM)
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    with served(workdir) as sv:
        s = raw_connect(sv)
        try:
            send(s, FR.SET_MEM_TABLE, pack_regions([MemRegion(0, RAM, USER_BASE, 0)]), [fd])
            refused(sv, s, K.MMAP_FAILED, 0)
        finally:
            s.close()
            os.close(fd)


def test_inflight_region_whose_state_cannot_be_recovered(workdir, memfd):
    """SET_INFLIGHT_FD with a region whose queue 0 says it was in use (version 1) for a ring of 7
    descriptors, not the 16 it holds: recovering it at SET_VRING_KICK fails (``inflight-corrupt``)."""
    region = os.memfd_create("inflight", os.MFD_CLOEXEC)
    os.ftruncate(region, 4096)
    os.pwrite(region, INFLIGHT_HDR.pack(0, 1, 7, 0, 0), 0)
    kick = EventNotifier("kick")
    with served(workdir) as sv:
        s = negotiated(sv, memfd)
        try:
            assert ack(s, FR.SET_INFLIGHT_FD, INFLIGHT.pack(4096, 0, 1, 16), [region]) == 0
            assert ack(s, FR.SET_VRING_ADDR, VRING_ADDR.pack(0, 0, USER_BASE + DESC0, USER_BASE + USED0,
                                                           USER_BASE + AVAIL0, 0)) == 0
            send(s, FR.SET_VRING_KICK, U64.pack(0), [kick.fd])
            refused(sv, s, K.INFLIGHT_CORRUPT, 0)
        finally:
            s.close()
            os.close(region)
            kick.close()


def test_ring_that_cannot_be_read_at_set_vring_kick_is_a_protocol_error(workdir, memfd):
    """With an inflight region, SET_VRING_KICK reads the ring's used index.  A ring that fitted at
    SET_VRING_ADDR and no longer does after a larger SET_VRING_NUM cannot be mapped: a protocol
    error (``ring-not-mappable``, the queue's VirtQueueError translated), not a bug."""
    region = os.memfd_create("inflight", os.MFD_CLOEXEC)
    os.ftruncate(region, 8192)
    kick = EventNotifier("kick")
    with served(workdir) as sv:
        s = negotiated(sv, memfd)
        try:
            assert ack(s, FR.SET_INFLIGHT_FD, INFLIGHT.pack(8192, 0, 1, 256), [region]) == 0
            end = RAM - 16 * 16  # a table of 16 ends at the end of RAM
            assert ack(s, FR.SET_VRING_ADDR, VRING_ADDR.pack(0, 0, USER_BASE + end, USER_BASE + USED0,
                                                           USER_BASE + AVAIL0, 0)) == 0
            assert ack(s, FR.SET_VRING_NUM, VRING_STATE.pack(0, 256)) == 0
            send(s, FR.SET_VRING_KICK, U64.pack(0), [kick.fd])
            refused(sv, s, K.RING_NOT_MAPPABLE, 0)
        finally:
            s.close()
            os.close(region)
            kick.close()


def test_front_end_that_does_not_read_its_replies(workdir):
    """Thousands of GET_FEATURES, no reply read: once the socket is full the back-end gives up on
    the front-end (``peer-not-reading``) instead of blocking."""
    with served(workdir) as sv:
        s = raw_connect(sv)
        burst = HDR.pack(FR.GET_FEATURES, VERSION, 0) * 1024
        stop = threading.Event()

        def flood() -> None:
            try:
                while not stop.is_set():
                    s.sendall(burst)
            except OSError:
                pass  # the back-end closed the connection

        t = threading.Thread(target=flood, daemon=True)
        t.start()
        try:
            wait_for(lambda: sv.be.conn is None, 60, "the back-end to give up on the front-end")
            assert sv.be.last_error_kind is K.PEER_NOT_READING and sv.be.protocol_errors == 1
        finally:
            stop.set()
            s.close()
            t.join(CEILING)


def test_socket_error_while_reading(workdir):
    """The front-end closes its end with a reply unread: the back-end's next read fails
    (ECONNRESET) -- a ``socket-error``, counted as the front-end's, not a bug."""
    with served(workdir) as sv:
        s = raw_connect(sv)
        send(s, FR.GET_FEATURES)
        wait_for(lambda: sv.be.message_counts.get("GET_FEATURES", 0) >= 1, CEILING, "the reply to be sent")
        sv.loop.run_sync(lambda: None)  # the reply is in the socket
        s.close()
        wait_for(lambda: sv.be.conn is None, CEILING, "the back-end to drop the connection")
        assert sv.be.last_error_kind is K.SOCKET_ERROR and sv.be.internal_errors == 0


def test_os_error_while_handling_a_message_is_the_front_ends(workdir):
    """An OSError while a message is handled (here from the back-end's test seam) is a protocol
    error (``os-error``): a system call on the front-end's behalf failed, not a bug."""
    with served(workdir) as sv:
        def hook(msg: Message) -> None:
            if msg.request == FR.SET_OWNER:
                raise OSError(9, "Bad file descriptor")

        sv.be.message_hook = hook
        s = raw_connect(sv)
        try:
            send(s, FR.SET_OWNER)
            refused(sv, s, K.OS_ERROR, 0)
        finally:
            s.close()


def test_device_front_end_refuses_a_back_end_with_too_few_queues(workdir):
    """kickcall's vhost-user-blk device (the front-end in a machine) configured with 2 queues
    against a back-end that has 1: ``too-few-queues`` at realize."""
    img = os.path.join(workdir, "d.img")
    make_image(img, 1 << 20)
    loop = IOThread("blk-be")
    dev = VirtIOBlk("vublk", img, num_queues=1, queue_size=64, aio="sync", loop=loop)
    sock = os.path.join(workdir, "s")
    be = VhostUserBackend(dev, socket_path=sock, loop=loop)
    loop.start()
    be.start()
    try:
        with pytest.raises(ProtocolError) as ei:
            VhostUserBlkDevice("vub", sock, num_queues=2, connect_wait=CEILING, reconnect=False)
        assert ei.value.kind is K.TOO_FEW_QUEUES
    finally:
        be.stop()
        loop.stop()
        dev.close()


# == 5. a ring error while polling ==============================================================================
@ON_OFF
def test_ring_error_while_polling_is_reported(workdir, fix):
    """Queue 0 has no kick fd (VRING_NOFD): the back-end polls it.  Its descriptor table sits at
    the end of RAM, where a ring of 16 fits; SET_VRING_NUM 256 then makes it run past RAM, and the
    next poll cannot map the ring.  Reported as a kick would report it: the device needs a reset,
    the queue counts the error, the ring stops and the err fd is written; the connection stays.
    Off: swallowed (``except VirtQueueError: pass``), polled on for ever."""
    with served(workdir, fixes={"report-poll-errors": fix}) as sv:
        d = MiniDriver(sv.sock, kick=False)
        try:
            d.connect()
            desc = RAM - 16 * 16  # the table of 16 ends exactly at the end of RAM
            d.start(desc=desc)
            wait_for(lambda: sv.queue()["polls"] > 0, CEILING, "the back-end to poll the ring")
            d.fe.set_vring_num(0, 256)
            polls = sv.queue()["polls"]
            if fix:
                wait_for(lambda: sv.status()["broken"], CEILING, "the device to break")
                q = sv.queue()
                assert q["poll-errors"] == 1 and q["errors"] == 1 and not q["started"]
                assert sv.status()["needs-reset-count"] == 1
                wait_for(d.err.test_and_clear, CEILING, "the err fd")
                assert sv.status()["connected"] and sv.be.protocol_errors == 0
            else:
                wait_for(lambda: sv.queue()["polls"] > polls + 20, CEILING, "more polls")
                st = sv.status()
                assert not st["broken"] and st["queues"][0]["poll-errors"] == 0 and d.err.peek() == 0
        finally:
            d.close()


# == 6. bugs are not the front-end's ============================================================================
def _crash_reports() -> set[str]:
    d = os.environ["KICKCALL_CRASH_DIR"]
    return {n for n in os.listdir(d) if n.startswith("kickcall-crash-")}


@pytest.mark.crash_reports_expected
def test_a_bug_in_the_devices_queue_handler_is_an_internal_error(workdir):
    """The device's handle_output raises RuntimeError on a kick: ``internal_errors`` 1 (shown in
    the status beside ``protocol-errors``), ``protocol_errors`` unchanged, a crash report with the
    traceback; the connection stays."""
    before = _crash_reports()
    with served(workdir, dev=BuggyDevice()) as sv:
        d = MiniDriver(sv.sock)
        try:
            d.connect()
            d.start()
            d.post(b"ping")
            wait_for(lambda: sv.status()["internal-errors"] == 1, CEILING, "the bug to be counted")
            st = sv.status()
            assert st["protocol-errors"] == 0 and st["connected"]
            assert "RuntimeError" in sv.be.last_internal_error
        finally:
            d.close()
    new = _crash_reports() - before
    assert len(new) == 1
    with open(os.path.join(os.environ["KICKCALL_CRASH_DIR"], new.pop())) as f:
        assert "a bug in the device's queue handler" in f.read()


@pytest.mark.crash_reports_expected
def test_a_bug_while_handling_a_message_is_an_internal_error(workdir):
    """A handler that raises (here through the test seam): the connection closes as before, but
    the error is an internal one, not a protocol error of the front-end."""
    with served(workdir) as sv:
        def hook(msg: Message) -> None:
            if msg.request == FR.SET_OWNER:
                raise KeyError("bug")

        sv.be.message_hook = hook
        s = raw_connect(sv)
        try:
            send(s, FR.SET_OWNER)
            assert read_message(s) is None
            wait_for(lambda: sv.be.conn is None, CEILING, "the back-end to drop the connection")
            st = sv.status()
            assert st["internal-errors"] == 1 and st["protocol-errors"] == 0 and st["last-error-kind"] == ""
        finally:
            s.close()


def test_echo_device_works_end_to_end(workdir):
    """The test device works (the baseline of the two tests above)."""
    with served(workdir) as sv:
        d = MiniDriver(sv.sock)
        try:
            d.connect()
            d.start()
            d.post(b"hello")
            assert d.reply() == b"hello"
            assert sv.status()["internal-errors"] == 0 and sv.be.protocol_errors == 0
        finally:
            d.close()


# == 7. faults in the registry ====================================================================================
def test_lose_kick_and_lose_call(workdir):
    """``lose-kick`` drop-next: a kick is counted and ignored (the request waits for the next
    kick); ``lose-call`` drop-next: the request completes but its call fd is not written."""
    with served(workdir) as sv:
        d = MiniDriver(sv.sock)
        try:
            d.connect()
            d.start()
            sv.be.faults.arm("lose-kick", "drop-next", 0)
            d.post(b"one")
            wait_for(lambda: sv.queue()["kicks"] == 1, CEILING, "the kick to reach the back-end")
            sv.loop.run_sync(lambda: None)
            assert d.vq.used_idx() == 0  # ignored
            d.post(b"two")
            assert d.reply() == b"one" and d.reply() == b"two"
            calls = d.call.test_and_clear()
            assert calls >= 1
            sv.be.faults.arm("lose-call", "drop-next", 0)
            d.post(b"three")
            assert d.reply() == b"three"
            sv.loop.run_sync(lambda: None)
            assert d.call.peek() == 0  # completed, never signalled
            lost = {f["name"]: f["state"] for f in sv.be.faults.describe()}
            assert lost["lose-kick"]["queues"][0]["dropped"] == 1 and lost["lose-call"]["queues"][0]["dropped"] == 1
        finally:
            d.close()


def test_backend_device_lists_and_arms_the_registry(workdir):
    """The monitor's device view: ``faults()`` is the registry's listing (every fix of the
    back-end, the monitor's, the per-queue faults); ``set_fault`` arms by name and turns a
    FaultError into a TargetError; ``fault`` keeps x-debug-fault's paths."""
    img = os.path.join(workdir, "d.img")
    make_image(img, 1 << 20)
    loop = IOThread("mon-be")
    dev = VirtIOBlk("vublk", img, num_queues=1, queue_size=64, aio="sync", loop=loop)
    be = VhostUserBackend(dev, socket_path=os.path.join(workdir, "s"), loop=loop)
    loop.start()
    be.start()
    try:
        view = BackendDevice(be)
        names = {f["name"] for f in view.faults()}
        assert names == set(FIXES) | {"lose-kick", "lose-call", "hold-completion", "refuse-stopped-ring"}
        for f in view.faults():
            assert f["effect"] and f["kind"] in ("fix-off", "injected")
        assert view.set_fault("validate-messages", "off", None)["fix"] == "off"
        assert not be.faults.fix_on("validate-messages")
        with pytest.raises(TargetError):
            view.set_fault("no-such-fault", "off", None)
        with pytest.raises(TargetError):
            view.set_fault("lose-kick", "off", 0)  # a per-queue fault does not switch
        out = view.fault(0, "kick", "drop-all")
        assert out == {"path": "kick", "action": "drop-all", "dropped-so-far": 0}
        assert view.fault(0, "complete", "clear")["held"] == 0
        with pytest.raises(TargetError):
            view.fault(0, "nowhere", "drop-next")
    finally:
        be.stop()
        loop.stop()
        dev.close()


def test_x_fix_off_with_an_unknown_name_is_a_clear_error(workdir):
    img = os.path.join(workdir, "d.img")
    make_image(img, 1 << 20)
    sock = os.path.join(workdir, "s")
    err = os.path.join(workdir, "err")
    with open(err, "wb") as f:
        p = spawn(kickcall_argv("vhost-user-blk", "--socket-path", sock, "--blk-file", img,
                                "--x-fix-off", "no-such-fix"), stderr=f)
    try:
        assert p.wait(CEILING) == 2
    finally:
        stop_process(p)
    with open(err) as f:
        text = f.read()
    assert "--x-fix-off no-such-fix" in text and "validate-messages" in text and "Traceback" not in text
    assert not os.path.exists(sock)


def test_x_fix_off_is_not_in_the_main_help():
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-m", "kickcall", "vhost-user-blk", "--help"], capture_output=True,
                         text=True, env=dict(os.environ, PYTHONPATH=os.path.join(os.path.dirname(__file__), "..",
                                                                                  "src")), timeout=CEILING)
    assert out.returncode == 0 and "--blk-file" in out.stdout and "--x-fix-off" not in out.stdout


# == 8. every kind has a test ======================================================================================
def test_every_protocol_error_kind_has_a_test():
    """Each ``ProtocolErrorKind`` is asserted by name in some test file (``K.NAME`` or
    ``ProtocolErrorKind.NAME``)."""
    here = os.path.dirname(__file__)
    text = ""
    for n in os.listdir(here):
        if n.startswith("test_") and n.endswith(".py"):
            with open(os.path.join(here, n)) as f:
                text += f.read()
    used = set(re.findall(r"\b(?:K|ProtocolErrorKind)\.([A-Z_]+)\b", text))
    missing = [k.name for k in ProtocolErrorKind if k.name not in used]
    assert not missing, f"kinds without a test: {missing}"

