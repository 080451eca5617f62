"""Malformed input to kickcall's vhost-user back-end (VhostUserBackend), over a real Unix socket.

One back-end serves the whole module: it must survive everything.  Each case connects a raw
AF_UNIX socket, sends bytes and fds (real eventfds, pipes, memfds), then checks that

* the back-end closes that connection and counts a protocol error of the expected kind
  (``ProtocolErrorKind``), never an internal error (or, for a valid message, answers it correctly),
* its loop thread is still alive and answering,
* no fd is left behind in this process (the back-end runs in-process, so its fds count too),
* every few cases, and at the end, a fresh well-behaved front-end runs a verified workload.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import socket
import struct
import tempfile
import termios
from dataclasses import dataclass

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from helpers import wait_for
from kickcall.drive.vhost_user_blk import run_test
from kickcall.loop import IOThread
from kickcall.vhost_user.backend import DEFAULT_PROTOCOL_FEATURES, VhostUserBackend
from kickcall.vhost_user.frontend import VhostUserFrontend
from kickcall.vhost_user.protocol import (
    CONFIG_HDR,
    FLAG_NEED_REPLY,
    FLAG_REPLY,
    HDR,
    INFLIGHT,
    MAX_FDS,
    MAX_PAYLOAD,
    SINGLE_MEM_REGION,
    U64,
    VERSION,
    VRING_ADDR,
    VRING_NOFD_MASK,
    VRING_STATE,
    FrontendReq,
    ConfigAccess,
    FdRule,
    MemRegion,
    MemTable,
    Message,
    ProtocolErrorKind,
    ProtocolFeature,
    pack_regions,
    validate_reply,
)
from kickcall.virtio.blk import VirtIOBlk, make_image

FR = FrontendReq
PF = ProtocolFeature
K = ProtocolErrorKind
ROUTES = VhostUserBackend.routes()  # every request the back-end knows: payload type, fds, feature
NUM_QUEUES = 2
QUEUE_MAX = 1024
USER_BASE = 0x7F00_0000_0000
RAM = 1 << 20
CEILING = 20.0  # seconds: how long any single expected event may take before the test fails
E2E_EVERY = 8  # run a full front-end workload after every this many cases


def fd_table() -> dict[str, str]:
    out = {}
    for fd in os.listdir("/proc/self/fd"):
        try:
            out[fd] = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            pass  # the fd listdir itself used
    return out


@dataclass
class Harness:
    dir: str
    sock: str
    loop: IOThread
    dev: VirtIOBlk
    be: VhostUserBackend
    cases: int = 0
    e2e_runs: int = 0

    def idle(self) -> None:
        wait_for(lambda: self.be.conn is None, CEILING, "the back-end to have no front-end")

    def alive(self) -> None:
        assert self.loop.running, "the back-end's loop thread died"
        assert self.loop.run_sync(lambda: 42, timeout=CEILING) == 42, "the back-end's loop does not answer"

    def end_to_end(self) -> None:
        """A fresh, well-behaved front-end (kickcall's vhost-user-blk driver) works end to end."""
        self.idle()
        errors = self.be.protocol_errors
        r = run_test(self.sock, duration=0.5, depth=4, queues=NUM_QUEUES)
        assert r["error_count"] == 0, r["errors"]
        assert r["ops"] > 0 and r["reads"] > 0 and r["writes"] > 0, r
        self.idle()
        assert self.be.protocol_errors == errors, self.be.last_error
        self.e2e_runs += 1

    def case_done(self) -> None:
        self.cases += 1
        if self.cases % E2E_EVERY == 0:
            self.end_to_end()


@pytest.fixture(scope="module")
def h():
    d = tempfile.mkdtemp(prefix="kcfz")  # short: Unix socket paths must stay under 108 bytes
    img = os.path.join(d, "d.img")
    make_image(img, 8 << 20)
    loop = IOThread("fuzz-be")
    dev = VirtIOBlk("vublk", img, num_queues=NUM_QUEUES, queue_size=QUEUE_MAX, aio="threads", loop=loop)
    sock = os.path.join(d, "s")
    be = VhostUserBackend(dev, socket_path=sock, loop=loop)
    loop.start()
    be.start()
    try:
        yield Harness(d, sock, loop, dev, be)
    finally:
        be.stop()
        loop.stop()
        dev.close()
        shutil.rmtree(d, ignore_errors=True)


# -- a raw front-end -------------------------------------------------------------------------------
class Raw:
    """A raw AF_UNIX connection to the back-end; every fd it creates is closed by ``close()``."""

    def __init__(self, h: Harness) -> None:
        self.h = h
        self.owned: list[int] = []
        n = h.be.connections
        self.s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.s.settimeout(CEILING)
        self.s.connect(h.sock)
        # the back-end serves one front-end at a time: make sure this one is the one it serves
        wait_for(lambda: h.be.connections == n + 1, CEILING, "the back-end to accept the connection")
        self.send_failed = False

    # fds the test creates (its own copies; the back-end gets duplicates through SCM_RIGHTS)
    def eventfd(self) -> int:
        fd = os.eventfd(0, os.EFD_CLOEXEC)
        self.owned.append(fd)
        return fd

    def pipe(self) -> int:
        r, w = os.pipe()
        self.owned += [r, w]
        return r

    def memfd(self, size: int = RAM) -> int:
        fd = os.memfd_create("fuzz-ram", os.MFD_CLOEXEC)
        os.ftruncate(fd, size)
        self.owned.append(fd)
        return fd

    def send_bytes(self, data: bytes, fds: list[int] | tuple[int, ...] = ()) -> None:
        """Send; the back-end may already have closed the connection (that is not a failure here)."""
        try:
            if fds:
                socket.send_fds(self.s, [data], list(fds))
            else:
                self.s.sendall(data)
        except (BrokenPipeError, ConnectionResetError):
            self.send_failed = True

    def send(self, req: int, payload: bytes = b"", fds: list[int] | tuple[int, ...] = (), flags: int = VERSION,
             size: int | None = None) -> None:
        self.send_bytes(HDR.pack(req, flags, len(payload) if size is None else size) + payload, fds)

    def read_message(self) -> Message | None:
        """One whole message, or None on EOF at a message boundary.  A truncated message fails."""
        try:
            data, fds, flags, _ = socket.recv_fds(self.s, HDR.size, MAX_FDS)
        except ConnectionResetError:
            return None  # closed while our requests were unread: a close
        if not data:
            for fd in fds:
                os.close(fd)
            return None
        msg = Message(0, 0, b"", list(fds))
        try:
            assert not flags & socket.MSG_CTRUNC, "the back-end sent more than 8 fds"
            while len(data) < HDR.size:
                chunk = self.s.recv(HDR.size - len(data))
                assert chunk, "the back-end closed the connection in the middle of a header"
                data += chunk
            msg.request, msg.flags, size = HDR.unpack(data)
            assert msg.flags & 0x3 == VERSION, f"reply with version bits {msg.flags:#x}"
            assert size <= MAX_PAYLOAD, f"reply payload of {size} bytes"
            buf = b""
            while len(buf) < size:
                chunk = self.s.recv(size - len(buf))
                assert chunk, "the back-end closed the connection in the middle of a payload"
                buf += chunk
            msg.payload = buf
            return msg
        except BaseException:
            msg.close_fds()
            raise

    def reply(self, req: int) -> Message:
        msg = self.read_message()
        assert msg is not None, f"the back-end closed the connection instead of answering {FR(req).name}: " \
                                f"{self.h.be.last_error}"
        try:
            validate_reply(req, msg)
        finally:
            fds = list(msg.fds)
            msg.close_fds()
        msg.fds = fds  # numbers only (closed): callers may count them
        return msg

    def u64(self, req: int) -> int:
        self.send(req)
        return self.reply(req).u64()

    def expect_closed(self, ceiling: float = CEILING) -> None:
        """The back-end closes this connection, without sending anything first."""
        self.s.settimeout(ceiling)
        msg = self.read_message()
        assert msg is None, f"expected the connection to be closed, got request {msg.request} flags " \
                            f"{msg.flags:#x} payload {msg.payload!r}"

    def close(self) -> None:
        self.s.close()
        for fd in self.owned:
            os.close(fd)
        self.owned = []

    # -- well-formed steps ---------------------------------------------------------------------
    def negotiate(self, pf: int = DEFAULT_PROTOCOL_FEATURES) -> None:
        assert self.u64(FR.GET_FEATURES) == self.h.be.offered_features()
        assert self.u64(FR.GET_PROTOCOL_FEATURES) == DEFAULT_PROTOCOL_FEATURES
        self.send(FR.SET_PROTOCOL_FEATURES, U64.pack(pf))
        self.send(FR.SET_OWNER)

    def ack(self, req: int, payload: bytes = b"", fds: list[int] | tuple[int, ...] = ()) -> None:
        """Send with NEED_REPLY (REPLY_ACK must be negotiated) and expect a zero status."""
        self.send(req, payload, fds, flags=VERSION | FLAG_NEED_REPLY)
        assert self.reply(req).u64() == 0

    def mem_table(self, fd: int | None = None) -> None:
        fd = self.memfd() if fd is None else fd
        self.send(FR.SET_MEM_TABLE, pack_regions([MemRegion(0, RAM, USER_BASE, 0)]), [fd])


def _case(h: Harness, actions, *, kind: ProtocolErrorKind | None = None, expect_error: bool = True,
          ceiling: float = CEILING) -> None:
    """Run one case on a fresh connection.  With *expect_error* the back-end must close the
    connection and count exactly one protocol error (of *kind*, when given); never an internal
    error."""
    h.idle()
    before = fd_table()
    errors = h.be.protocol_errors
    internal = h.be.internal_errors
    raw = Raw(h)
    try:
        actions(raw)
        if expect_error:
            raw.expect_closed(ceiling)
    finally:
        raw.close()
    h.idle()
    h.alive()
    problems = []
    if expect_error:
        if h.be.protocol_errors != errors + 1:
            problems.append(f"protocol_errors went {errors} -> {h.be.protocol_errors} "
                            f"(last error {h.be.last_error!r})")
        elif kind is not None and h.be.last_error_kind != kind:
            problems.append(f"expected a {kind.value} error, got {h.be.last_error_kind} ({h.be.last_error!r})")
    elif h.be.protocol_errors != errors:
        problems.append(f"unexpected protocol error {h.be.last_error!r}")
    if h.be.internal_errors != internal:
        problems.append(f"an internal error: {h.be.last_internal_error}")
    # no fd opened meanwhile is still open (one an unrelated object closed meanwhile is no leak)
    def leaked() -> dict[str, str]:
        return {k: v for k, v in fd_table().items() if before.get(k) != v}

    left: dict[str, str] = {}

    def none_left() -> bool:  # one snapshot is both judged and reported
        nonlocal left
        left = leaked()
        return not left

    try:
        wait_for(none_left, 30.0, "the fds opened meanwhile to be closed")
    except AssertionError:
        pass
    if left:
        problems.append(f"fd(s) leaked: {left}")
    assert not problems, "; ".join(problems)
    h.case_done()


# -- framing ---------------------------------------------------------------------------------------
def test_valid_get_features_is_answered(h):
    def act(raw):
        assert raw.u64(FR.GET_FEATURES) == h.be.offered_features()
        assert raw.u64(FR.GET_PROTOCOL_FEATURES) == DEFAULT_PROTOCOL_FEATURES
        assert raw.u64(FR.GET_QUEUE_NUM) == NUM_QUEUES
    _case(h, act, expect_error=False)


@pytest.mark.parametrize("where", ["header", "payload"])
def test_truncated_message_then_eof_is_a_protocol_error(h, where):
    def act(raw):
        if where == "header":
            raw.send_bytes(HDR.pack(FR.GET_FEATURES, VERSION, 0)[:5])
        else:
            raw.send_bytes(HDR.pack(FR.SET_FEATURES, VERSION, 8) + b"\1\2\3")
        raw.s.shutdown(socket.SHUT_WR)
    _case(h, act, kind=K.PARTIAL_MESSAGE)


@pytest.mark.parametrize("flags", [0x0, 0x2, 0x3, 0x4 | 0x2, 0xFFFFFFFF], ids=lambda f: f"flags={f:#x}")
def test_wrong_version_bits(h, flags):
    _case(h, lambda raw: raw.send(FR.GET_FEATURES, flags=flags), kind=K.BAD_VERSION)


@pytest.mark.parametrize("size", [MAX_PAYLOAD + 1, 1 << 20, 0xFFFFFFFF])
def test_payload_larger_than_the_limit(h, size):
    # only the header (and a little) is sent: the back-end must refuse before reading the payload
    _case(h, lambda raw: raw.send(FR.SET_CONFIG, b"\0" * 64, size=size), kind=K.OVERSIZED_MESSAGE)


@pytest.mark.parametrize("code", [0, 44, 999, 0xFFFFFFFF])
def test_unknown_request(h, code):
    _case(h, lambda raw: raw.send(code), kind=K.UNKNOWN_REQUEST)


@pytest.mark.parametrize("req", [FR.IOTLB_MSG, FR.CREATE_CRYPTO_SESSION, FR.GPU_SET_SOCKET, FR.GET_SHARED_OBJECT,
                                 FR.SET_LOG_FD, FR.SET_STATUS, FR.GET_STATUS])
def test_request_the_backend_does_not_serve(h, req):
    """A vhost-user request this back-end does not serve: refused, as not supported (one with a
    known layout after its size and fd checks)."""
    route = ROUTES.get(req)
    size = route.payload.SIZE if route is not None else 0
    nfds = 1 if route is not None and route.fds is FdRule.ONE else 0
    _case(h, lambda raw: raw.send(req, b"\0" * (size or 0), [raw.eventfd() for _ in range(nfds)]),
          kind=K.UNSUPPORTED_REQUEST)


def _nfds(rule: FdRule) -> int:
    return 0 if rule is FdRule.NONE else 1


def _int_size_rules():
    out = []
    for req, route in sorted(ROUTES.items()):
        size_rule = route.payload.SIZE
        if size_rule is None:
            continue
        if size_rule > 0:
            out.append(pytest.param(req, size_rule - 1, route.fds, id=f"{FR(req).name}-short"))
        out.append(pytest.param(req, size_rule + 1, route.fds, id=f"{FR(req).name}-long"))
    return out


@pytest.mark.parametrize("req,size,fd_rule", _int_size_rules())
def test_payload_one_byte_off(h, req, size, fd_rule):
    def act(raw):
        raw.send(req, b"\0" * size, [raw.eventfd() for _ in range(_nfds(fd_rule))])
    _case(h, act, kind=K.BAD_SIZE)


# -- fds -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("req", [FR.SET_VRING_KICK, FR.SET_VRING_CALL, FR.SET_VRING_ERR])
def test_vring_fd_with_nofd_bit_and_an_fd(h, req):
    _case(h, lambda raw: raw.send(req, U64.pack(0 | VRING_NOFD_MASK), [raw.eventfd()]), kind=K.BAD_FD_COUNT)


@pytest.mark.parametrize("req", [FR.SET_VRING_KICK, FR.SET_VRING_CALL, FR.SET_VRING_ERR])
def test_vring_fd_without_nofd_bit_and_no_fd(h, req):
    _case(h, lambda raw: raw.send(req, U64.pack(0)), kind=K.BAD_FD_COUNT)


@pytest.mark.parametrize("req", [FR.SET_VRING_KICK, FR.SET_VRING_CALL, FR.SET_VRING_ERR])
def test_vring_fd_with_nofd_bit_is_valid(h, req):
    def act(raw):
        raw.negotiate()
        raw.ack(req, U64.pack(1 | VRING_NOFD_MASK))
        raw.ack(req, U64.pack(1), [raw.eventfd()])
    _case(h, act, expect_error=False)


def test_fd_attached_to_get_features(h):
    _case(h, lambda raw: raw.send(FR.GET_FEATURES, fds=[raw.eventfd()]), kind=K.BAD_FD_COUNT)


def test_more_than_eight_fds(h):
    _case(h, lambda raw: raw.send(FR.GET_FEATURES, fds=[raw.eventfd() for _ in range(MAX_FDS + 1)]),
          kind=K.BAD_FD_COUNT)


def test_set_vring_kick_with_a_pipe(h):
    """A pipe is not an eventfd: refused cleanly (the fd is closed once, by whoever owns it)."""
    _case(h, lambda raw: raw.send(FR.SET_VRING_KICK, U64.pack(0), [raw.pipe()]), kind=K.BAD_FD)


def test_set_backend_req_fd_with_a_pipe(h):
    def act(raw):
        raw.negotiate()
        raw.send(FR.SET_BACKEND_REQ_FD, fds=[raw.pipe()])
    _case(h, act, kind=K.BAD_FD)


# -- memory table ----------------------------------------------------------------------------------
def _regions(*rs: tuple[int, int, int, int]) -> bytes:
    return pack_regions([MemRegion(*r) for r in rs])


def test_set_mem_table_zero_regions(h):
    _case(h, lambda raw: raw.send(FR.SET_MEM_TABLE, struct.pack("=II", 0, 0)), kind=K.BAD_REGION_COUNT)


def test_set_mem_table_nine_regions(h):
    def act(raw):
        fd = raw.memfd()
        regs = [(i * 4096, 4096, USER_BASE + i * 4096, i * 4096) for i in range(9)]
        raw.send(FR.SET_MEM_TABLE, _regions(*regs), [fd] * MAX_FDS)
    _case(h, act, kind=K.BAD_REGION_COUNT)


@pytest.mark.parametrize("nregions,nfds", [(2, 1), (1, 2), (1, 0)])
def test_set_mem_table_region_fd_count_mismatch(h, nregions, nfds):
    def act(raw):
        fd = raw.memfd()
        regs = [(i * 4096, 4096, USER_BASE + i * 4096, i * 4096) for i in range(nregions)]
        raw.send(FR.SET_MEM_TABLE, _regions(*regs), [fd] * nfds)
    _case(h, act, kind=K.BAD_FD_COUNT)


def test_set_mem_table_region_past_the_end_of_its_file(h):
    def act(raw):
        raw.send(FR.SET_MEM_TABLE, _regions((0, RAM, USER_BASE, 4096)), [raw.memfd()])
    _case(h, act, kind=K.BAD_MEMORY_REGION)


def test_set_mem_table_region_of_size_zero(h):
    _case(h, lambda raw: raw.send(FR.SET_MEM_TABLE, _regions((0, 0, USER_BASE, 0)), [raw.memfd()]),
          kind=K.BAD_MEMORY_REGION)


def test_set_mem_table_pipe_is_not_mappable(h):
    _case(h, lambda raw: raw.send(FR.SET_MEM_TABLE, _regions((0, 4096, USER_BASE, 0)), [raw.pipe()]),
          kind=K.BAD_FD)


def test_set_mem_table_overlapping_user_addresses(h):
    def act(raw):
        a, b = raw.memfd(), raw.memfd()
        raw.send(FR.SET_MEM_TABLE, _regions((0, RAM, USER_BASE, 0), (RAM, RAM, USER_BASE + RAM // 2, 0)), [a, b])
    _case(h, act, kind=K.OVERLAPPING_REGIONS)


def test_set_mem_table_with_two_valid_regions_is_accepted(h):
    """Two disjoint regions, each with its own memfd: a valid table (QEMU sends several)."""
    def act(raw):
        raw.negotiate()
        a, b = raw.memfd(), raw.memfd()
        raw.ack(FR.SET_MEM_TABLE, _regions((0, RAM, USER_BASE, 0), (4 * RAM, RAM, USER_BASE + 4 * RAM, 0)), [a, b])
        # a ring in the second region is translated through it
        raw.ack(FR.SET_VRING_NUM, VRING_STATE.pack(0, 64))
        u = USER_BASE + 4 * RAM
        raw.ack(FR.SET_VRING_ADDR, VRING_ADDR.pack(0, 0, u, u + 8192, u + 4096, 0))
    _case(h, act, expect_error=False)


def test_set_mem_table_region_ending_at_2_64_is_refused_without_fd_mixups(h):
    """A region whose guest range ends exactly at 2**64 passes the first check, is mapped, and is
    then refused by the guest memory map: the refusal must close each received fd exactly once."""
    def act(raw):
        a, b = raw.memfd(), raw.memfd()
        raw.send(FR.SET_MEM_TABLE, _regions(((1 << 64) - 4096, 4096, USER_BASE, 0), (0, 4096, USER_BASE + RAM, 0)),
                 [a, b])
    _case(h, act, kind=K.BAD_MEMORY_REGION)


def test_set_vring_addr_before_any_memory_table(h):
    def act(raw):
        raw.send(FR.SET_VRING_NUM, VRING_STATE.pack(0, 64))
        raw.send(FR.SET_VRING_ADDR, VRING_ADDR.pack(0, 0, USER_BASE, USER_BASE + 8192, USER_BASE + 4096, 0))
    _case(h, act, kind=K.NO_MEMORY_TABLE)


@pytest.mark.parametrize("which", ["desc", "used", "avail", "straddles-end"])
def test_set_vring_addr_outside_the_memory_table(h, which):
    def act(raw):
        raw.mem_table()
        raw.send(FR.SET_VRING_NUM, VRING_STATE.pack(0, 64))
        desc, used, avail = USER_BASE, USER_BASE + 8192, USER_BASE + 4096
        if which == "desc":
            desc = USER_BASE + 2 * RAM
        elif which == "used":
            used = USER_BASE - 4096
        elif which == "avail":
            avail = 0x1000
        else:
            desc = USER_BASE + RAM - 16 * 32  # the table's first half is in RAM, the rest is not
        raw.send(FR.SET_VRING_ADDR, VRING_ADDR.pack(0, 0, desc, used, avail, 0))
    _case(h, act, kind=K.RING_OUTSIDE_MEMORY_TABLE)


# -- rings -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("idx,num", [(0, 0), (0, 3), (0, 2048), (1, 100), (NUM_QUEUES, 64), (0xFFFFFFFF, 64)])
def test_set_vring_num_refused(h, idx, num):
    _case(h, lambda raw: raw.send(FR.SET_VRING_NUM, VRING_STATE.pack(idx, num)),
          kind=K.BAD_RING_INDEX if idx >= NUM_QUEUES else K.BAD_RING_SIZE)


@pytest.mark.parametrize("base", [0x10000, 0xFFFFFFFF])
def test_set_vring_base_beyond_16_bits(h, base):
    _case(h, lambda raw: raw.send(FR.SET_VRING_BASE, VRING_STATE.pack(0, base)), kind=K.BAD_RING_BASE)


@pytest.mark.parametrize("req", [FR.GET_VRING_BASE, FR.SET_VRING_ENABLE, FR.SET_VRING_BASE])
def test_vring_index_out_of_range(h, req):
    _case(h, lambda raw: raw.send(req, VRING_STATE.pack(NUM_QUEUES, 0)), kind=K.BAD_RING_INDEX)


def test_set_vring_kick_stray_bits(h):
    _case(h, lambda raw: raw.send(FR.SET_VRING_KICK, U64.pack(0x200 | VRING_NOFD_MASK)), kind=K.BAD_VRING_FILE)


# -- config ----------------------------------------------------------------------------------------
def test_get_config_of_5000_bytes(h):
    def act(raw):
        raw.negotiate()
        raw.send(FR.GET_CONFIG, CONFIG_HDR.pack(0, 5000, 0) + bytes(5000))
    _case(h, act, kind=K.OVERSIZED_MESSAGE)


@pytest.mark.parametrize("claimed,sent", [(60, 59), (60, 61), (0, 4), (4096, 0)])
def test_get_config_size_disagrees_with_payload(h, claimed, sent):
    def act(raw):
        raw.negotiate()
        raw.send(FR.GET_CONFIG, CONFIG_HDR.pack(0, claimed, 0) + bytes(sent))
    _case(h, act, kind=K.BAD_SIZE)


def test_get_config_without_the_config_protocol_feature(h):
    _case(h, lambda raw: raw.send(FR.GET_CONFIG, CONFIG_HDR.pack(0, 8, 0) + bytes(8)),
          kind=K.INACTIVE_FEATURE)


# -- features --------------------------------------------------------------------------------------
def test_set_features_with_bits_never_offered(h):
    offered = h.be.offered_features()
    bit = next(i for i in range(64) if not offered >> i & 1 and i != 26)

    def act(raw):
        raw.send(FR.SET_FEATURES, U64.pack(offered | (1 << bit)))
    _case(h, act, kind=K.FEATURE_MISMATCH)


def test_set_protocol_features_with_bits_never_offered(h):
    bit = next(i for i in range(64) if not DEFAULT_PROTOCOL_FEATURES >> i & 1)

    def act(raw):
        raw.send(FR.SET_PROTOCOL_FEATURES, U64.pack(DEFAULT_PROTOCOL_FEATURES | (1 << bit)))
    _case(h, act, kind=K.FEATURE_MISMATCH)


# -- inflight --------------------------------------------------------------------------------------
@pytest.mark.parametrize("nq,qsize", [(0, 128), (1, 0), (1, 3), (NUM_QUEUES + 1, 128), (1, 65535)])
def test_get_inflight_fd_bad_geometry(h, nq, qsize):
    def act(raw):
        raw.negotiate()
        raw.send(FR.GET_INFLIGHT_FD, INFLIGHT.pack(0, 0, nq, qsize))
    _case(h, act, kind=K.BAD_INFLIGHT)


def test_get_inflight_fd_is_answered_with_an_fd(h):
    def act(raw):
        raw.negotiate()
        raw.send(FR.GET_INFLIGHT_FD, INFLIGHT.pack(0, 0, NUM_QUEUES, 128))
        rep = raw.reply(FR.GET_INFLIGHT_FD)
        size, off, nq, qs = INFLIGHT.unpack(rep.payload)
        assert (nq, qs, off) == (NUM_QUEUES, 128, 0) and size > 0 and len(rep.fds) == 1
    _case(h, act, expect_error=False)


def test_set_inflight_fd_too_small_for_its_claims(h):
    def act(raw):
        raw.negotiate()
        raw.send(FR.SET_INFLIGHT_FD, INFLIGHT.pack(1 << 20, 0, NUM_QUEUES, 1024), [raw.memfd(4096)])
    _case(h, act, kind=K.BAD_INFLIGHT)


# -- memory slots ----------------------------------------------------------------------------------
_NO_SLOTS_PF = DEFAULT_PROTOCOL_FEATURES & ~(1 << PF.CONFIGURE_MEM_SLOTS)


@pytest.mark.parametrize("req", [FR.GET_MAX_MEM_SLOTS, FR.ADD_MEM_REG, FR.REM_MEM_REG])
@pytest.mark.parametrize("negotiated", [False, True], ids=["no-set-protocol-features", "without-slots"])
def test_mem_slot_requests_without_configure_mem_slots(h, req, negotiated):
    def act(raw):
        if negotiated:
            raw.negotiate(_NO_SLOTS_PF)
        payload = b"" if req == FR.GET_MAX_MEM_SLOTS else SINGLE_MEM_REGION.pack(0, 0, 4096, USER_BASE, 0)
        raw.send(req, payload, [raw.memfd()] if req == FR.ADD_MEM_REG else [])
    _case(h, act, kind=K.INACTIVE_FEATURE)


def test_rem_mem_reg_of_a_region_that_does_not_exist(h):
    def act(raw):
        raw.negotiate()
        raw.ack(FR.ADD_MEM_REG, SINGLE_MEM_REGION.pack(0, 0, RAM, USER_BASE, 0), [raw.memfd()])
        raw.send(FR.REM_MEM_REG, SINGLE_MEM_REGION.pack(0, 4 * RAM, RAM, USER_BASE + 4 * RAM, 0))
    _case(h, act, kind=K.UNKNOWN_REGION)


def test_rem_mem_reg_without_a_memory_table(h):
    def act(raw):
        raw.negotiate()
        raw.send(FR.REM_MEM_REG, SINGLE_MEM_REGION.pack(0, 0, RAM, USER_BASE, 0))
    _case(h, act, kind=K.NO_MEMORY_TABLE)


def test_mem_slots_add_and_remove_round_trip(h):
    def act(raw):
        raw.negotiate()
        assert raw.u64(FR.GET_MAX_MEM_SLOTS) >= 1
        raw.ack(FR.ADD_MEM_REG, SINGLE_MEM_REGION.pack(0, 0, RAM, USER_BASE, 0), [raw.memfd()])
        raw.ack(FR.ADD_MEM_REG, SINGLE_MEM_REGION.pack(0, 4 * RAM, RAM, USER_BASE + 4 * RAM, 0), [raw.memfd()])
        raw.ack(FR.REM_MEM_REG, SINGLE_MEM_REGION.pack(0, 0, RAM, USER_BASE, 0))
        raw.ack(FR.REM_MEM_REG, SINGLE_MEM_REGION.pack(0, 4 * RAM, RAM, USER_BASE + 4 * RAM, 0))
    _case(h, act, expect_error=False)


def test_add_mem_reg_overlapping_guest_range(h):
    """ADD_MEM_REG whose guest-physical range overlaps a region already added: refused with the
    overlap as the reason (its fd closed exactly once)."""
    def act(raw):
        raw.negotiate()
        raw.ack(FR.ADD_MEM_REG, SINGLE_MEM_REGION.pack(0, 0, RAM, USER_BASE, 0), [raw.memfd()])
        raw.send(FR.ADD_MEM_REG, SINGLE_MEM_REGION.pack(0, 0, RAM, USER_BASE + 4 * RAM, 0), [raw.memfd()])
    _case(h, act, kind=K.OVERLAPPING_REGIONS)


# -- split and stalled messages ------------------------------------------------------------------------
def _unread(s: socket.socket) -> int:
    """Bytes this socket has sent that the peer has not read yet (SIOCOUTQ)."""
    return struct.unpack("i", fcntl.ioctl(s.fileno(), termios.TIOCOUTQ, b"\0\0\0\0"))[0]


@pytest.mark.parametrize("cut", [1, 5, 11, 12, 13, 20])
def test_message_split_in_two_sends_is_answered(h, cut):
    """GET_CONFIG (after negotiating CONFIG) sent in two parts; the back-end has read the first part
    before the second is sent.  Valid framing: the reply must be correct."""
    def act(raw):
        raw.negotiate()
        msg = HDR.pack(FR.GET_CONFIG, VERSION, CONFIG_HDR.size + 8) + CONFIG_HDR.pack(0, 8, 0) + bytes(8)
        raw.send_bytes(msg[:cut])
        wait_for(lambda: _unread(raw.s) == 0, CEILING, "the back-end to read the first part")
        raw.send_bytes(msg[cut:])
        rep = raw.reply(FR.GET_CONFIG)
        off, size, _flags = CONFIG_HDR.unpack_from(rep.payload)
        assert (off, size) == (0, 8)
        assert rep.payload[CONFIG_HDR.size:] == h.dev.get_config()[:8]
        assert raw.u64(FR.GET_FEATURES) == h.be.offered_features()  # and the stream is still in step
    _case(h, act, expect_error=False)


def test_half_message_then_silence_times_out_and_recovers(h):
    """Part of a message, then nothing: the back-end gives up on it (after ~10 s) and closes."""
    msg = HDR.pack(FR.SET_FEATURES, VERSION, 8) + U64.pack(h.be.offered_features())
    _case(h, lambda raw: raw.send_bytes(msg[:12 + 3]), ceiling=60.0,  # the whole header, part of the payload
          kind=K.MESSAGE_DEADLINE)
    h.end_to_end()


# -- random sequences ------------------------------------------------------------------------------
KNOWN = sorted(int(r) for r in ROUTES)


def _size_rule(req: int) -> object:
    """The payload size *req* carries: an int, "config", "regions", or None (unknown request)."""
    route = ROUTES.get(req)
    if route is None:
        return None
    if route.payload is ConfigAccess:
        return "config"
    if route.payload is MemTable:
        return "regions"
    return route.payload.SIZE
UNKNOWN = [0, 22, 26, 41, 44, 999, 0xFFFFFFFF]


@st.composite
def _message(draw):
    # mostly known requests with valid flags, so that sequences get past their first message
    req = draw(st.sampled_from(UNKNOWN)) if draw(st.integers(0, 9)) == 9 else draw(st.sampled_from(KNOWN))
    flags = draw(st.sampled_from([VERSION] * 3 + [VERSION | FLAG_NEED_REPLY] * 3 + [VERSION | FLAG_REPLY, None]))
    if flags is None:
        flags = draw(st.integers(0, 0xFFFFFFFF))
    rule = _size_rule(req)
    structured = draw(st.integers(0, 3)) != 3  # a quarter of the payloads are just random bytes
    if structured and rule == 8 and req in (FR.SET_VRING_KICK, FR.SET_VRING_CALL, FR.SET_VRING_ERR):
        payload = U64.pack(draw(st.integers(0, NUM_QUEUES)) | draw(st.sampled_from([0, VRING_NOFD_MASK])))
    elif structured and rule == 8 and req in (FR.SET_VRING_NUM, FR.SET_VRING_BASE, FR.GET_VRING_BASE,
                                              FR.SET_VRING_ENABLE):
        payload = VRING_STATE.pack(draw(st.integers(0, NUM_QUEUES)),
                                   draw(st.sampled_from([0, 1, 2, 3, 8, 64, 1024, 2048, 0x10000])))
    elif structured and req == FR.SET_VRING_ADDR:
        off = st.integers(0, RAM // 16).map(lambda x: USER_BASE + 16 * x)
        payload = VRING_ADDR.pack(draw(st.integers(0, NUM_QUEUES)), 0, draw(off), draw(off), draw(off), 0)
    elif structured and rule == "config":
        size = draw(st.integers(0, 80))
        payload = CONFIG_HDR.pack(draw(st.integers(0, 80)), size, 0) + bytes(size)
    elif structured and req in (FR.GET_INFLIGHT_FD, FR.SET_INFLIGHT_FD):
        payload = INFLIGHT.pack(draw(st.integers(0, 1 << 20)), 0, draw(st.integers(0, 3)),
                                draw(st.sampled_from([0, 1, 3, 64, 128, 1024])))
    elif structured and req in (FR.ADD_MEM_REG, FR.REM_MEM_REG):
        payload = SINGLE_MEM_REGION.pack(0, draw(st.sampled_from([0, RAM])), draw(st.sampled_from([0, 4096, RAM])),
                                         USER_BASE + draw(st.sampled_from([0, RAM, 2 * RAM])), 0)
    elif structured and req == FR.SET_MEM_TABLE:
        n = draw(st.integers(0, 3))
        payload = pack_regions([MemRegion(i * RAM, draw(st.sampled_from([0, 4096, RAM])), USER_BASE + i * RAM, 0)
                                for i in range(n)])
    elif structured and isinstance(rule, int):
        payload = draw(st.binary(min_size=rule, max_size=rule))
    else:
        payload = draw(st.binary(max_size=300))
    route = ROUTES.get(req)
    fd_rule = route.fds if route is not None else FdRule.NONE
    if fd_rule is FdRule.VRING:  # the fd count the request calls for, most of the time
        want = 0 if len(payload) == 8 and U64.unpack(payload)[0] & VRING_NOFD_MASK else 1
    else:
        want = 0 if fd_rule is FdRule.NONE else 1
    nfds = draw(st.sampled_from([want] * 6 + [0, 1, 2, 3]))
    return req, flags, payload, nfds


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(prefix=st.sampled_from(["none", "negotiated", "memory"]), msgs=st.lists(_message(), min_size=1, max_size=5))
def test_random_message_sequences(h, prefix, msgs):
    """Whatever arrives, the back-end answers with well-formed replies, in order, or closes the
    connection; it never hangs; a fresh front-end works afterwards."""
    h.idle()
    before = fd_table()
    errors = h.be.protocol_errors
    internal = h.be.internal_errors
    replies = 0
    raw = Raw(h)
    try:
        sent: list[int] = []
        if prefix != "none":
            raw.negotiate()
        if prefix == "memory":
            raw.mem_table()
            raw.send(FR.SET_FEATURES, U64.pack(h.be.offered_features()))
        for req, flags, payload, nfds in msgs:
            if raw.send_failed:
                break
            raw.send(req, payload, [raw.eventfd() for _ in range(nfds)], flags=flags)
            sent.append(req)
        if not raw.send_failed:
            raw.s.shutdown(socket.SHUT_WR)  # end of input: the back-end must close after answering
        j = 0
        while True:
            msg = raw.read_message()
            if msg is None:
                break
            fds = len(msg.fds)
            msg.close_fds()
            assert msg.flags & FLAG_REPLY, f"a message without the REPLY flag: {msg}"
            k = next((k for k in range(j, len(sent)) if sent[k] == msg.request), None)
            assert k is not None, f"a reply to request {msg.request}, which was not sent (sent {sent[j:]})"
            msg.fds = [-1] * fds
            try:
                validate_reply(msg.request, msg)
            finally:
                msg.fds = []
            j = k + 1
            replies += 1
    finally:
        raw.close()
    h.idle()
    h.alive()
    event(f"replies: {min(replies, 3)}{'+' if replies >= 3 else ''}")
    event("closed on a protocol error" if h.be.protocol_errors > errors else "closed at end of input")
    event(f"refused: {h.be.last_error_kind}" if h.be.protocol_errors > errors else "refused: -")
    assert h.be.internal_errors == internal, h.be.last_internal_error
    # no fd opened meanwhile is still open (one an unrelated object closed meanwhile is no leak)
    wait_for(lambda: not set(fd_table().items()) - set(before.items()), 5.0, "the fds opened meanwhile to close")
    # a fresh, well-behaved front-end is served
    fe = VhostUserFrontend(h.sock, timeout=CEILING)
    try:
        fe.connect(wait=CEILING)
        assert fe.get_features() == h.be.offered_features()
        assert fe.get_protocol_features() == DEFAULT_PROTOCOL_FEATURES
    finally:
        fe.close()
    h.case_done()


def test_zz_end_to_end_after_everything(h):
    h.end_to_end()
    assert h.e2e_runs >= 2
    assert h.be.connections > h.cases
