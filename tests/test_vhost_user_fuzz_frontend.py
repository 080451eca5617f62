"""Malformed input to kickcall's vhost-user front-end (VhostUserFrontend, VhostUserBlkDriver).

A tiny scripted back-end in this file listens on a real Unix socket, reads requests with
``protocol.recv_message`` and answers the handshake correctly, then sends whatever bad reply the
test scripts.  The front-end must raise ProtocolError or BackendGone (never hang, never anything
else), drop the connection, and leave no fd behind (received fds closed).
"""

from __future__ import annotations

import gc
import os
import shutil
import socket
import tempfile
import threading
from contextlib import contextmanager
from typing import Callable, Iterator

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from helpers import wait_for
from kickcall.drive.vhost_user_blk import WANTED, DriverError, VhostUserBlkDriver
from kickcall.vhost_user.frontend import BackendGone, VhostUserFrontend
from kickcall.vhost_user.protocol import (
    CONFIG_HDR,
    FLAG_NEED_REPLY,
    FLAG_REPLY,
    HDR,
    INFLIGHT,
    MAX_FDS,
    MAX_PAYLOAD,
    U64,
    VERSION,
    VRING_STATE,
    BackendReq,
    FrontendReq,
    Message,
    ProtocolError,
    ProtocolErrorKind,
    ProtocolFeature,
    recv_message,
)
from kickcall.virtio.blk import blk_config

FR = FrontendReq
PF = ProtocolFeature
FEATURES = WANTED
PROTOCOL_FEATURES = ((1 << PF.MQ) | (1 << PF.REPLY_ACK) | (1 << PF.CONFIG) | (1 << PF.INFLIGHT_SHMFD)
                     | (1 << PF.BACKEND_REQ) | (1 << PF.CONFIGURE_MEM_SLOTS))
NUM_QUEUES = 1
CONFIG = blk_config(16384, NUM_QUEUES)
CEILING = 20.0
FE_TIMEOUT = 3.0


def fd_table() -> dict[str, str]:
    out = {}
    for fd in os.listdir("/proc/self/fd"):
        try:
            out[fd] = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            pass  # the fd listdir itself used
    return out


def wire(req: int, payload: bytes = b"", flags: int = VERSION | FLAG_REPLY, size: int | None = None) -> bytes:
    return HDR.pack(req, flags, len(payload) if size is None else size) + payload


def eventfd() -> int:
    return os.eventfd(0, os.EFD_CLOEXEC)


def memfd(size: int = 4096) -> int:
    fd = os.memfd_create("fake-inflight", os.MFD_CLOEXEC)
    os.ftruncate(fd, size)
    return fd


# A scripted reply: raw bytes; (raw bytes, fd factories); "close" (close the connection instead of
# answering); "silence" (answer nothing); or a callable(msg, conn) that does whatever it wants.
Action = object


class FakeBackend:
    """A scripted vhost-user back-end on a real Unix socket, served by a thread."""

    def __init__(self, path: str, bad: dict[int, Action] | None = None, *,
                 script: Callable[[Message], Action | None] | None = None) -> None:
        self.path = path
        self.bad = dict(bad or {})  # request -> one bad reply (used once)
        self.script = script
        self.requests: list[str] = []
        self.errors: list[BaseException] = []
        self.backend_req: socket.socket | None = None
        self.got_backend_req = threading.Event()
        self._mu = threading.Lock()
        self._conn: socket.socket | None = None
        self._stop = threading.Event()
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(path)
        self.listener.listen(4)
        self.listener.settimeout(0.05)
        self.thread = threading.Thread(target=self._serve, name="fake-vhost-user-backend", daemon=True)
        self.thread.start()

    # -- the thread --------------------------------------------------------------------------------
    def _serve(self) -> None:
        try:
            while not self._stop.is_set():
                try:
                    conn, _ = self.listener.accept()
                except TimeoutError:
                    continue
                conn.settimeout(None)
                with self._mu:
                    if self._stop.is_set():
                        conn.close()
                        return
                    self._conn = conn
                try:
                    self._serve_conn(conn)
                finally:
                    with self._mu:
                        self._conn = None
                    conn.close()
        except BaseException as e:  # reported by stop()
            self.errors.append(e)

    def _serve_conn(self, conn: socket.socket) -> None:
        while True:
            try:
                msg = recv_message(conn)
            except (EOFError, OSError):
                return
            try:
                self.requests.append(msg.name())
                if msg.request == FR.SET_BACKEND_REQ_FD and msg.fds:
                    if self.backend_req is not None:
                        self.backend_req.close()
                    self.backend_req = socket.socket(fileno=msg.fds.pop())
                    self.got_backend_req.set()
                action = self.script(msg) if self.script is not None else None
                if action is None:
                    action = self.bad.pop(msg.request, None)
                if action is None:
                    action = self.good(msg)
            finally:
                msg.close_fds()
            if action == "close":
                conn.shutdown(socket.SHUT_RDWR)
                return
            if action == "silence" or action == b"":
                continue
            if callable(action):
                action(msg, conn)
                continue
            data, factories = action if isinstance(action, tuple) else (action, ())
            fds = [f() for f in factories]
            try:
                if fds:
                    socket.send_fds(conn, [data], fds)
                else:
                    conn.sendall(data)
            except OSError:
                return
            finally:
                for fd in fds:
                    os.close(fd)

    @staticmethod
    def good(msg: Message) -> Action:
        r = msg.request
        if r == FR.GET_FEATURES:
            return wire(r, U64.pack(FEATURES))
        if r == FR.GET_PROTOCOL_FEATURES:
            return wire(r, U64.pack(PROTOCOL_FEATURES))
        if r == FR.GET_QUEUE_NUM:
            return wire(r, U64.pack(NUM_QUEUES))
        if r == FR.GET_MAX_MEM_SLOTS:
            return wire(r, U64.pack(8))
        if r == FR.GET_STATUS:
            return wire(r, U64.pack(0))
        if r == FR.GET_VRING_BASE:
            idx, _ = VRING_STATE.unpack(msg.payload)
            return wire(r, VRING_STATE.pack(idx, 0))
        if r == FR.GET_CONFIG:
            off, size, flags = CONFIG_HDR.unpack_from(msg.payload)
            return wire(r, CONFIG_HDR.pack(off, size, flags) + CONFIG[off:off + size].ljust(size, b"\0"))
        if r == FR.GET_INFLIGHT_FD:
            _s, _o, nq, qs = INFLIGHT.unpack(msg.payload)
            return wire(r, INFLIGHT.pack(8192, 0, nq, qs)), (lambda: memfd(8192),)
        if msg.need_reply:
            return wire(r, U64.pack(0))
        return b""

    # -- the test's side -------------------------------------------------------------------------
    def stop(self) -> None:
        self._stop.set()
        with self._mu:
            conn = self._conn
        if conn is not None:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        self.thread.join(CEILING)
        assert not self.thread.is_alive(), "the fake back-end's thread did not stop"
        self.listener.close()
        if self.backend_req is not None:
            self.backend_req.close()
        os.unlink(self.path)
        assert not self.errors, self.errors


@pytest.fixture
def sock_path():
    d = tempfile.mkdtemp(prefix="kcfe")  # short: Unix socket paths must stay under 108 bytes
    yield os.path.join(d, "s")
    shutil.rmtree(d, ignore_errors=True)


@contextmanager
def no_fd_leak() -> Iterator[None]:
    """No fd opened inside the block is still open after it (an fd that an unrelated object closes
    meanwhile -- a garbage-collected socket of an earlier test -- is not a leak)."""
    gc.collect()
    before = fd_table()
    yield

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
    assert not left, f"fds leaked: {left}"


@contextmanager
def session(path: str, bad: dict[int, Action] | None = None, **kw) -> Iterator[tuple[FakeBackend, VhostUserFrontend]]:
    """A fake back-end and a connected front-end; both closed, and no fd left, at the end."""
    with no_fd_leak():
        fb = FakeBackend(path, bad, **kw)
        fe = VhostUserFrontend(path, name="fuzz-fe", timeout=FE_TIMEOUT)
        try:
            fe.connect(wait=CEILING)
            yield fb, fe
        finally:
            fe.close()
            fb.stop()


def handshake(fe: VhostUserFrontend, pf: int = PROTOCOL_FEATURES & ~(1 << PF.BACKEND_REQ)) -> None:
    assert fe.get_features() == FEATURES
    assert fe.get_protocol_features() == PROTOCOL_FEATURES
    fe.set_protocol_features(pf)
    fe.set_owner()


K = ProtocolErrorKind


def fails_and_drops(fe: VhostUserFrontend, call: Callable[[], object],
                    kind: ProtocolErrorKind | None = None) -> BaseException:
    """*call* raises ProtocolError (of *kind*, when given) or BackendGone, and the connection is
    dropped."""
    with pytest.raises((ProtocolError, BackendGone)) as ei:
        call()
    if kind is not None:
        assert isinstance(ei.value, ProtocolError) and ei.value.kind is kind, repr(ei.value)
    assert not fe.connected, f"the front-end raised {ei.value!r} but kept the connection"
    with pytest.raises(BackendGone):  # and it says so on the next request
        fe.get_features()
    return ei.value


# -- bad replies -----------------------------------------------------------------------------------
def test_good_handshake_against_the_fake(sock_path):
    with session(sock_path) as (fb, fe):
        handshake(fe)
        assert fe.get_queue_num() == NUM_QUEUES
        assert fe.get_vring_base(0) == 0
        assert fe.get_config(0, 60) == CONFIG
        info = fe.get_inflight_fd(1, 128)
        os.close(info.fd)
        assert fe.connected
        assert fb.requests[:4] == ["GET_FEATURES", "GET_PROTOCOL_FEATURES", "SET_PROTOCOL_FEATURES", "SET_OWNER"]


def test_reply_without_the_reply_flag(sock_path):
    with session(sock_path, {FR.GET_FEATURES: wire(FR.GET_FEATURES, U64.pack(FEATURES), flags=VERSION)}) as (_, fe):
        fails_and_drops(fe, fe.get_features, K.UNEXPECTED_REPLY)


@pytest.mark.parametrize("code", [FR.GET_PROTOCOL_FEATURES, FR.SET_FEATURES, 0, 999])
def test_reply_with_the_wrong_request_code(sock_path, code):
    with session(sock_path, {FR.GET_FEATURES: wire(code, U64.pack(FEATURES))}) as (_, fe):
        fails_and_drops(fe, fe.get_features, K.UNEXPECTED_REPLY)


@pytest.mark.parametrize("size", [0, 7, 9, 16])
def test_get_features_reply_of_the_wrong_size(sock_path, size):
    with session(sock_path, {FR.GET_FEATURES: wire(FR.GET_FEATURES, b"\1" * size)}) as (_, fe):
        fails_and_drops(fe, fe.get_features, K.BAD_SIZE)


@pytest.mark.parametrize("flags", [0x0, 0x2 | FLAG_REPLY, 0x3 | FLAG_REPLY])
def test_reply_with_the_wrong_version(sock_path, flags):
    with session(sock_path, {FR.GET_FEATURES: wire(FR.GET_FEATURES, U64.pack(FEATURES), flags=flags)}) as (_, fe):
        fails_and_drops(fe, fe.get_features, K.BAD_VERSION)


def test_reply_larger_than_any_payload(sock_path):
    bad = {FR.GET_FEATURES: wire(FR.GET_FEATURES, b"", size=MAX_PAYLOAD + 1)}
    with session(sock_path, bad) as (_, fe):
        fails_and_drops(fe, fe.get_features, K.OVERSIZED_MESSAGE)


def test_get_vring_base_reply_for_another_queue(sock_path):
    with session(sock_path, {FR.GET_VRING_BASE: wire(FR.GET_VRING_BASE, VRING_STATE.pack(1, 0))}) as (_, fe):
        handshake(fe)
        fails_and_drops(fe, lambda: fe.get_vring_base(0), K.BAD_REPLY)


def test_get_vring_base_reply_that_is_not_a_ring_index(sock_path):
    """A ring index is 16 bits: a larger base would be set as the device's next avail index."""
    with session(sock_path, {FR.GET_VRING_BASE: wire(FR.GET_VRING_BASE, VRING_STATE.pack(0, 0x10000))}) as (_, fe):
        handshake(fe)
        fails_and_drops(fe, lambda: fe.get_vring_base(0), K.BAD_REPLY)


@pytest.mark.parametrize("how", ["offset", "size", "truncated", "longer", "no-config-header"])
def test_get_config_reply_that_does_not_match_the_request(sock_path, how):
    payload = {
        "offset": CONFIG_HDR.pack(4, 60, 0) + CONFIG,
        "size": CONFIG_HDR.pack(0, 30, 0) + CONFIG[:30],
        "truncated": CONFIG_HDR.pack(0, 60, 0) + CONFIG[:30],
        "longer": CONFIG_HDR.pack(0, 60, 0) + CONFIG + b"\0" * 4,
        "no-config-header": b"\0" * 8,
    }[how]
    with session(sock_path, {FR.GET_CONFIG: wire(FR.GET_CONFIG, payload)}) as (_, fe):
        handshake(fe)
        fails_and_drops(fe, lambda: fe.get_config(0, 60), K.BAD_SIZE if how == "no-config-header" else K.BAD_REPLY)


@pytest.mark.parametrize("status", [1, 0xFFFFFFFFFFFFFFFF])
def test_reply_ack_with_a_non_zero_status(sock_path, status):
    with session(sock_path, {FR.SET_OWNER: wire(FR.SET_OWNER, U64.pack(status))}) as (fb, fe):
        assert fe.get_features() == FEATURES
        fe.get_protocol_features()
        fe.set_protocol_features(1 << PF.REPLY_ACK)
        fails_and_drops(fe, fe.set_owner, K.REQUEST_FAILED)
        assert fb.requests[-1] == "SET_OWNER"


@pytest.mark.parametrize("nfds", [1, 2, MAX_FDS, MAX_FDS + 1])
def test_reply_carrying_unexpected_fds(sock_path, nfds):
    """The fds that came with the bad reply are closed (no_fd_leak counts them)."""
    bad = {FR.GET_FEATURES: (wire(FR.GET_FEATURES, U64.pack(FEATURES)), (eventfd,) * nfds)}
    with session(sock_path, bad) as (_, fe):
        fails_and_drops(fe, fe.get_features, K.BAD_FD_COUNT)


def test_ack_carrying_an_fd(sock_path):
    bad = {FR.SET_OWNER: (wire(FR.SET_OWNER, U64.pack(0)), (eventfd,))}
    with session(sock_path, bad) as (_, fe):
        assert fe.get_features() == FEATURES
        fe.get_protocol_features()
        fe.set_protocol_features(1 << PF.REPLY_ACK)
        fails_and_drops(fe, fe.set_owner, K.BAD_FD_COUNT)  # acknowledged: an ack with an fd is a bad reply


@pytest.mark.parametrize("nfds", [0, 2])
def test_get_inflight_fd_reply_with_the_wrong_number_of_fds(sock_path, nfds):
    bad = {FR.GET_INFLIGHT_FD: (wire(FR.GET_INFLIGHT_FD, INFLIGHT.pack(8192, 0, 1, 128)), (memfd,) * nfds)}
    with session(sock_path, bad) as (_, fe):
        handshake(fe)
        fails_and_drops(fe, lambda: fe.get_inflight_fd(1, 128), K.BAD_FD_COUNT)


@pytest.mark.parametrize("when", [FR.GET_FEATURES, FR.GET_PROTOCOL_FEATURES, FR.SET_OWNER])
def test_back_end_closes_the_socket_mid_handshake(sock_path, when):
    with session(sock_path, {when: "close"}) as (_, fe):
        def go():
            handshake(fe, 1 << PF.REPLY_ACK)
        err = fails_and_drops(fe, go)
        assert isinstance(err, BackendGone)


@pytest.mark.parametrize("cut", [3, 12, 15])
def test_back_end_closes_the_socket_mid_reply(sock_path, cut):
    def half_then_close(msg, conn):
        conn.sendall(wire(FR.GET_FEATURES, U64.pack(FEATURES))[:cut])
        conn.shutdown(socket.SHUT_RDWR)
    with session(sock_path, {FR.GET_FEATURES: half_then_close}) as (_, fe):
        # a reply cut short is a protocol error (a truncated message) or a lost back-end: either
        # way the request fails and the connection is dropped
        assert isinstance(fails_and_drops(fe, fe.get_features), (BackendGone, ProtocolError))


def test_back_end_goes_silent_mid_reply(sock_path):
    """Half a reply, then nothing: the front-end's socket timeout ends the wait."""
    bad = {FR.GET_FEATURES: wire(FR.GET_FEATURES, U64.pack(FEATURES))[:6]}
    with session(sock_path, bad) as (_, fe):
        assert isinstance(fails_and_drops(fe, fe.get_features), BackendGone)


@pytest.mark.parametrize("garbage", [b"\xff" * 12, b"not a vhost-user reply at all", b"\0" * 64,
                                     b"HTTP/1.1 400 Bad Request\r\n\r\n"], ids=["ff", "text", "zeros", "http"])
def test_garbage_instead_of_a_header(sock_path, garbage):
    def garbage_then_close(msg, conn):
        conn.sendall(garbage)
        conn.shutdown(socket.SHUT_WR)
    with session(sock_path, {FR.GET_FEATURES: garbage_then_close}) as (_, fe):
        fails_and_drops(fe, fe.get_features)


# -- the driver ------------------------------------------------------------------------------------
@contextmanager
def driver(path: str, bad: dict[int, Action] | None = None) -> Iterator[tuple[FakeBackend, VhostUserBlkDriver]]:
    with no_fd_leak():
        fb = FakeBackend(path, bad)
        drv = VhostUserBlkDriver(path, ram=4 << 20, queue_size=64, reconnect=False, name="fuzz-drv")
        drv.fe.timeout = FE_TIMEOUT
        try:
            yield fb, drv
        finally:
            drv.close()
            fb.stop()


@pytest.mark.parametrize("bad", [
    pytest.param({FR.GET_FEATURES: wire(FR.GET_FEATURES, b"\0" * 7)}, id="get-features-7-bytes"),
    pytest.param({FR.GET_QUEUE_NUM: wire(FR.GET_FEATURES, U64.pack(1))}, id="queue-num-wrong-code"),
    pytest.param({FR.SET_VRING_CALL: wire(FR.SET_VRING_CALL, U64.pack(5))}, id="call-nack"),
    pytest.param({FR.GET_CONFIG: wire(FR.GET_CONFIG, CONFIG_HDR.pack(0, 60, 0) + CONFIG[:20])}, id="config-short"),
    pytest.param({FR.GET_INFLIGHT_FD: wire(FR.GET_INFLIGHT_FD, INFLIGHT.pack(8192, 0, 1, 64))}, id="inflight-no-fd"),
    pytest.param({FR.SET_MEM_TABLE: "close"}, id="close-at-mem-table"),
    pytest.param({FR.SET_VRING_ENABLE: wire(FR.SET_VRING_ENABLE, U64.pack(0), flags=VERSION)}, id="enable-no-reply-flag"),
])
def test_driver_connect_fails_cleanly_on_a_bad_reply(sock_path, bad):
    with driver(sock_path, bad) as (_, drv):
        with pytest.raises((ProtocolError, BackendGone, DriverError)):
            drv.connect(wait=CEILING)
        assert not drv.connected.is_set()
        assert not drv.fe.connected, "the driver's front-end kept a connection that broke the protocol"


def test_driver_close_with_a_bad_get_vring_base_reply(sock_path):
    """A complete start against the fake, then a bad reply while closing: close() still frees everything."""
    with driver(sock_path, {FR.GET_VRING_BASE: wire(FR.GET_VRING_BASE, b"\0" * 3)}) as (fb, drv):
        drv.connect(wait=CEILING)
        assert drv.connected.is_set() and drv.capacity == 16384
        assert "SET_VRING_ENABLE" in fb.requests


# -- the back-end request channel ------------------------------------------------------------------
def test_backend_request_channel(sock_path):
    changes = threading.Event()
    errs: list[int] = []
    with session(sock_path) as (fb, fe):
        fe.on_config_change = changes.set
        fe.on_vring_err = errs.append
        handshake(fe, PROTOCOL_FEATURES)
        fe.set_backend_req_fd()
        assert fb.got_backend_req.wait(CEILING)
        ch = fb.backend_req
        assert ch is not None
        ch.settimeout(CEILING)
        # CONFIG_CHANGE_MSG without NEED_REPLY: the callback runs, nothing comes back
        ch.sendall(wire(BackendReq.CONFIG_CHANGE_MSG, flags=VERSION))
        assert changes.wait(CEILING)
        changes.clear()
        # with NEED_REPLY: a u64 0 reply
        ch.sendall(wire(BackendReq.CONFIG_CHANGE_MSG, flags=VERSION | FLAG_NEED_REPLY))
        rep = recv_message(ch)
        assert (rep.request, rep.flags & ~0x3, rep.payload, rep.fds) == \
            (BackendReq.CONFIG_CHANGE_MSG, FLAG_REPLY, U64.pack(0), [])
        # acknowledged first (a config change makes the front-end send GET_CONFIG, which a
        # back-end waiting for this ack could not answer), handled right after
        assert changes.wait(CEILING)
        ch.sendall(wire(BackendReq.VRING_ERR, U64.pack(0), flags=VERSION | FLAG_NEED_REPLY))
        rep = recv_message(ch)
        assert rep.request == BackendReq.VRING_ERR and rep.u64() == 0
        wait_for(lambda: errs == [0], CEILING, "the VRING_ERR callback")
        # a malformed message (CONFIG_CHANGE_MSG carries no payload): the channel is closed
        ch.sendall(wire(BackendReq.CONFIG_CHANGE_MSG, U64.pack(0), flags=VERSION | FLAG_NEED_REPLY))
        assert ch.recv(64) == b"", "the front-end answered a malformed back-end request"
        thread = fe._req_thread
        assert thread is not None
        wait_for(lambda: not thread.is_alive(), CEILING, "the back-end request thread to end")
        # the main connection still works
        assert fe.connected
        assert fe.get_features() == FEATURES
        fe.set_vring_num(0, 64)  # acknowledged (REPLY_ACK)
        assert fe.get_vring_base(0) == 0


@pytest.mark.parametrize("bad", [
    pytest.param(wire(BackendReq.VRING_CALL, b"", flags=VERSION), id="vring-call-no-payload"),
    pytest.param(wire(99, U64.pack(0), flags=VERSION), id="unknown-request"),
    pytest.param(wire(BackendReq.CONFIG_CHANGE_MSG, flags=0x2), id="bad-version"),
    pytest.param((wire(BackendReq.CONFIG_CHANGE_MSG, flags=VERSION), (eventfd,)), id="unexpected-fd"),
    pytest.param((wire(BackendReq.CONFIG_CHANGE_MSG, flags=VERSION), (eventfd,) * (MAX_FDS + 1)), id="9-fds"),
])
def test_backend_request_channel_closes_on_malformed_requests(sock_path, bad):
    changes = threading.Event()
    with session(sock_path) as (fb, fe):
        fe.on_config_change = changes.set
        handshake(fe, PROTOCOL_FEATURES)
        fe.set_backend_req_fd()
        assert fb.got_backend_req.wait(CEILING)
        ch = fb.backend_req
        ch.settimeout(CEILING)
        data, factories = bad if isinstance(bad, tuple) else (bad, ())
        fds = [f() for f in factories]
        try:
            if fds:
                socket.send_fds(ch, [data], fds)
            else:
                ch.sendall(data)
        finally:
            for fd in fds:
                os.close(fd)
        assert ch.recv(64) == b""
        assert not changes.is_set()
        wait_for(lambda: not fe._req_thread.is_alive(), CEILING, "the back-end request thread to end")
        assert fe.get_features() == FEATURES


# -- random replies ---------------------------------------------------------------------------------
CALLS: dict[int, Callable[[VhostUserFrontend], object]] = {
    FR.GET_FEATURES: lambda fe: fe.get_features(),
    FR.GET_PROTOCOL_FEATURES: lambda fe: fe.get_protocol_features(),
    FR.GET_QUEUE_NUM: lambda fe: fe.get_queue_num(),
    FR.GET_MAX_MEM_SLOTS: lambda fe: fe.get_u64(FR.GET_MAX_MEM_SLOTS),
    FR.GET_VRING_BASE: lambda fe: fe.get_vring_base(1),
    FR.GET_CONFIG: lambda fe: fe.get_config(4, 8),
    FR.GET_INFLIGHT_FD: lambda fe: fe.get_inflight_fd(1, 64),
    FR.SET_OWNER: lambda fe: fe.request(FR.SET_OWNER, ack=True),
}
FAIL = object()


def reference(req: int, data: bytes, nfds: int) -> object:
    """What a correct front-end returns for this reply, or FAIL when it must refuse it."""
    if len(data) < HDR.size:
        return FAIL
    r, flags, size = HDR.unpack_from(data)
    if flags & 0x3 != VERSION or size > MAX_PAYLOAD or len(data) < HDR.size + size:
        return FAIL
    p = data[HDR.size:HDR.size + size]
    if not flags & FLAG_REPLY or r != req or nfds != (1 if req == FR.GET_INFLIGHT_FD else 0):
        return FAIL
    if req == FR.GET_VRING_BASE:
        return VRING_STATE.unpack(p)[1] if len(p) == 8 and VRING_STATE.unpack(p)[0] == 1 else FAIL
    if req == FR.GET_CONFIG:
        ok = len(p) >= CONFIG_HDR.size and CONFIG_HDR.unpack_from(p)[:2] == (4, 8) and len(p) == CONFIG_HDR.size + 8
        return p[CONFIG_HDR.size:] if ok else FAIL
    if req == FR.GET_INFLIGHT_FD:
        return INFLIGHT.unpack(p) if len(p) == INFLIGHT.size else FAIL
    if len(p) != 8:
        return FAIL
    if req == FR.SET_OWNER:
        return "ack" if U64.unpack(p)[0] == 0 else FAIL
    return U64.unpack(p)[0]


@st.composite
def _reply(draw):
    req = draw(st.sampled_from(sorted(CALLS)))
    want_fds = 1 if req == FR.GET_INFLIGHT_FD else 0
    if draw(st.integers(0, 3)) == 0:  # plain random bytes
        return req, draw(st.binary(max_size=64)), draw(st.integers(0, 2))
    # a header that is usually right and a payload that usually has the right shape, each part
    # broken now and then
    code = draw(st.sampled_from([req] * 6 + [FR.GET_FEATURES, None]))
    if code is None:
        code = draw(st.integers(0, 0xFFFFFFFF))
    flags = draw(st.sampled_from([VERSION | FLAG_REPLY] * 6 + [VERSION, FLAG_REPLY, 0xFFFFFFFF]))
    if req == FR.GET_VRING_BASE:
        payload = VRING_STATE.pack(draw(st.sampled_from([1, 1, 1, 0])), draw(st.integers(0, 0xFFFF)))
    elif req == FR.GET_CONFIG:
        n = draw(st.sampled_from([8] * 4 + [0, 7, 9, 30]))
        payload = CONFIG_HDR.pack(draw(st.sampled_from([4, 4, 4, 0])), draw(st.sampled_from([8, 8, 8, n])), 0) + \
            draw(st.binary(min_size=n, max_size=n))
    elif req == FR.GET_INFLIGHT_FD:
        payload = draw(st.binary(min_size=INFLIGHT.size, max_size=INFLIGHT.size))
    else:
        payload = draw(st.sampled_from([U64.pack(0), U64.pack(draw(st.integers(0, 2**64 - 1)))]))
    payload = draw(st.sampled_from([payload] * 5 + [payload[:-1], payload + b"\0"]))
    size = draw(st.sampled_from([len(payload)] * 6 + [None]))
    if size is None:
        size = draw(st.integers(0, 64))
    data = (HDR.pack(code, flags, size) + payload)[:64]
    return req, data, draw(st.sampled_from([want_fds] * 4 + [0, 1, 2]))


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(reply=_reply())
def test_random_replies(sock_path, reply):
    """A random reply (then the back-end closes): the front-end raises ProtocolError/BackendGone or
    returns exactly what a correct reading of the reply gives; no hang, no other exception, no fd leak."""
    req, data, nfds = reply

    def answer(msg: Message, conn: socket.socket) -> None:
        fds = [eventfd() if req != FR.GET_INFLIGHT_FD else memfd() for _ in range(nfds)] if data else []
        try:
            if fds:
                socket.send_fds(conn, [data], fds)
            else:
                conn.sendall(data)
        finally:
            for fd in fds:
                os.close(fd)
        conn.shutdown(socket.SHUT_WR)  # the fake says no more: a short reply ends in EOF, not a wait

    want = reference(req, data, nfds if data else 0)
    with session(sock_path, {req: answer}) as (_, fe):
        try:
            got = CALLS[req](fe)
        except (ProtocolError, BackendGone) as e:
            event(f"refused: {type(e).__name__}")
            assert want is FAIL, f"refused a valid reply ({e!r}); the right answer was {want!r}"
        else:
            event("accepted")
            assert want is not FAIL, f"accepted an invalid reply, returning {got!r}"
            if req == FR.GET_INFLIGHT_FD:
                os.close(got.fd)
                assert (got.mmap_size, got.mmap_offset, got.num_queues, got.queue_size) == want
            elif req == FR.SET_OWNER:
                assert isinstance(got, Message) and got.u64() == 0
            else:
                assert got == want
            assert fe.connected
