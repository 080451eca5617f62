"""The vhost-user front-end's side of the protocol: a synchronous client of one back-end socket.

Requests go out in order; with REPLY_ACK negotiated every SET_* request carries NEED_REPLY, so each
one is acknowledged before the next (that ordering is what the MSI-X masking sequence relies on).
Every reply is checked (its request code, REPLY flag, size and fds); a wrong one is a
``ProtocolError`` and the connection is closed.  Back-end initiated messages (BACKEND_REQ:
CONFIG_CHANGE_MSG, VRING_CALL, VRING_ERR) arrive on a separate socket pair, served by a thread.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from dataclasses import dataclass
from typing import Callable

from .. import trace
from .protocol import (
    CONFIG_HDR,
    FLAG_NEED_REPLY,
    FLAG_REPLY,
    INFLIGHT,
    U64,
    VERSION,
    VRING_ADDR,
    VRING_NOFD_MASK,
    VRING_STATE,
    BACKEND_RULES,
    BackendReq,
    FrontendReq,
    MemRegion,
    Message,
    ProtocolError,
    ProtocolErrorKind,
    ProtocolFeature,
    pack_regions,
    recv_message,
    send_message,
    validate_reply,
)
from ..threads import named_thread

__all__ = ["VhostUserFrontend", "InflightInfo", "BackendGone"]

_t_write = trace.event("vhost_user_write", "the front-end sent a vhost-user request")
log = logging.getLogger("kickcall.vhost_user.frontend")

FR = FrontendReq
PF = ProtocolFeature
_HAS_REPLY = {FR.GET_FEATURES, FR.GET_PROTOCOL_FEATURES, FR.GET_QUEUE_NUM, FR.GET_VRING_BASE, FR.GET_CONFIG,
              FR.GET_MAX_MEM_SLOTS, FR.GET_INFLIGHT_FD, FR.GET_STATUS}


class BackendGone(ConnectionError):
    """The back-end closed the connection (or broke the protocol and we closed it)."""


@dataclass
class InflightInfo:
    fd: int
    mmap_size: int
    mmap_offset: int
    num_queues: int
    queue_size: int


class VhostUserFrontend:
    """A connection to one vhost-user back-end."""

    def __init__(self, path: str, *, name: str = "vhost-user", timeout: float = 30.0) -> None:
        self.path = path
        self.name = name
        self.timeout = timeout
        self.sock: socket.socket | None = None
        self._mu = threading.Lock()
        self.protocol_features = 0
        self.backend_features = 0
        self.backend_protocol_features = 0
        self.sent: list[str] = []  # every request sent, in order (tests compare with QEMU's order)
        self.on_config_change: Callable[[], None] | None = None
        self.on_vring_err: Callable[[int], None] | None = None
        self._req_sock: socket.socket | None = None
        self._req_thread: threading.Thread | None = None
        self.spurious_replies = 0

    # -- connection --------------------------------------------------------------------------------
    def connect(self, wait: float = 0.0) -> None:
        """Connect, retrying for up to *wait* seconds while the socket is not there yet (said
        once, at WARNING: "waiting for the back-end at PATH"); then BackendGone naming the path
        and how long it waited."""
        deadline = time.monotonic() + wait
        said = False
        while True:
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                s.connect(self.path)
                break
            except (FileNotFoundError, ConnectionRefusedError) as e:
                s.close()
                if time.monotonic() >= deadline:
                    waited = f" after waiting {wait:g} s" if wait > 0 else ""
                    raise BackendGone(f"{self.name}: cannot connect to the back-end at {self.path}{waited}: "
                                      f"{e.strerror}") from None
                if not said:
                    log.warning("%s: waiting for the back-end at %s (up to %g s)", self.name, self.path, wait)
                    said = True
                time.sleep(0.02)
        s.settimeout(self.timeout)
        self.sock = s
        self.sent = []
        self.protocol_features = 0

    @property
    def connected(self) -> bool:
        return self.sock is not None

    def close(self) -> None:
        with self._mu:
            s, self.sock = self.sock, None
        if s is not None:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            s.close()
        rs, self._req_sock = self._req_sock, None
        if rs is not None:
            try:
                rs.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            rs.close()
        t = self._req_thread
        if t is not None and t is not threading.current_thread():
            t.join(5)
        self._req_thread = None

    def has_pf(self, bit: ProtocolFeature) -> bool:
        return bool(self.protocol_features >> bit & 1)

    # -- requests ------------------------------------------------------------------------------------
    def request(self, req: FrontendReq, payload: bytes = b"", fds: list[int] | tuple[int, ...] = (),
                *, ack: bool | None = None) -> Message | None:
        """Send one request; return its reply (or None for an un-acknowledged SET)."""
        with self._mu:
            s = self.sock
            if s is None:
                raise BackendGone(f"{self.name}: not connected")
            flags = VERSION
            want_ack = req not in _HAS_REPLY and (ack if ack is not None else self.has_pf(PF.REPLY_ACK))
            if want_ack:
                flags |= FLAG_NEED_REPLY
            try:
                send_message(s, Message(req, flags, payload, list(fds)))
                self.sent.append(FR(req).name)
                if _t_write.enabled:
                    _t_write.emit(req=FR(req).name, flags=flags, size=len(payload), fds=len(fds))
                if req not in _HAS_REPLY and not want_ack:
                    return None
                rep = recv_message(s)
            except (OSError, EOFError) as e:
                self._drop()
                raise BackendGone(f"{self.name}: {FR(req).name}: {e}") from None
            except ProtocolError as e:
                self._drop()
                raise ProtocolError(e.kind, f"{self.name}: {FR(req).name}: {e}") from None
        try:
            validate_reply(req, rep)
        except ProtocolError as e:
            rep.close_fds()
            self._drop()
            log.error("%s: closing the connection: %s", self.name, e)
            raise
        if want_ack and req not in _HAS_REPLY:
            status = rep.u64()
            if status != 0:
                self._fail(ProtocolErrorKind.REQUEST_FAILED, f"{FR(req).name} failed in the back-end (status {status})")
        return rep

    def _fail(self, kind: ProtocolErrorKind, what: str) -> None:
        """Any protocol failure ends the connection (the device's reconnect logic takes over)."""
        with self._mu:
            self._drop()
        log.error("%s: closing the connection: %s", self.name, what)
        raise ProtocolError(kind, f"{self.name}: {what}")

    def _drop(self) -> None:
        s, self.sock = self.sock, None
        if s is not None:
            s.close()

    def sync(self) -> None:
        """A synchronising request when REPLY_ACK is not negotiated (GET_FEATURES has a reply)."""
        self.request(FR.GET_FEATURES)

    # -- typed helpers -------------------------------------------------------------------------------
    def get_u64(self, req: FrontendReq) -> int:
        rep = self.request(req)
        assert rep is not None
        return rep.u64()

    def get_features(self) -> int:
        self.backend_features = self.get_u64(FR.GET_FEATURES)
        return self.backend_features

    def set_features(self, f: int) -> None:
        self.request(FR.SET_FEATURES, U64.pack(f))

    def set_owner(self) -> None:
        self.request(FR.SET_OWNER)

    def get_protocol_features(self) -> int:
        self.backend_protocol_features = self.get_u64(FR.GET_PROTOCOL_FEATURES)
        return self.backend_protocol_features

    def set_protocol_features(self, pf: int) -> None:
        self.request(FR.SET_PROTOCOL_FEATURES, U64.pack(pf), ack=False)
        self.protocol_features = pf

    def get_queue_num(self) -> int:
        return self.get_u64(FR.GET_QUEUE_NUM)

    def set_mem_table(self, regions: list[MemRegion], fds: list[int]) -> None:
        self.request(FR.SET_MEM_TABLE, pack_regions(regions), fds)

    def set_vring_num(self, idx: int, num: int) -> None:
        self.request(FR.SET_VRING_NUM, VRING_STATE.pack(idx, num))

    def set_vring_base(self, idx: int, base: int) -> None:
        self.request(FR.SET_VRING_BASE, VRING_STATE.pack(idx, base))

    def set_vring_addr(self, idx: int, desc: int, used: int, avail: int) -> None:
        self.request(FR.SET_VRING_ADDR, VRING_ADDR.pack(idx, 0, desc, used, avail, 0))

    def _set_vring_fd(self, req: FrontendReq, idx: int, fd: int | None) -> None:
        if fd is None:
            self.request(req, U64.pack(idx | VRING_NOFD_MASK))
        else:
            self.request(req, U64.pack(idx), [fd])

    def set_vring_kick(self, idx: int, fd: int | None) -> None:
        self._set_vring_fd(FR.SET_VRING_KICK, idx, fd)

    def set_vring_call(self, idx: int, fd: int | None) -> None:
        self._set_vring_fd(FR.SET_VRING_CALL, idx, fd)

    def set_vring_err(self, idx: int, fd: int | None) -> None:
        self._set_vring_fd(FR.SET_VRING_ERR, idx, fd)

    def set_vring_enable(self, idx: int, on: bool) -> None:
        self.request(FR.SET_VRING_ENABLE, VRING_STATE.pack(idx, 1 if on else 0))

    def get_vring_base(self, idx: int) -> int:
        rep = self.request(FR.GET_VRING_BASE, VRING_STATE.pack(idx, 0))
        assert rep is not None
        ridx, num = VRING_STATE.unpack(rep.payload)
        if ridx != idx:
            self._fail(ProtocolErrorKind.BAD_REPLY, f"GET_VRING_BASE reply for queue {ridx}, asked {idx}")
        if num > 0xFFFF:  # a ring index is 16 bits: a back-end that says otherwise is broken or hostile
            self._fail(ProtocolErrorKind.BAD_REPLY, f"GET_VRING_BASE reply {num} for queue {idx} is not a 16-bit index")
        return num

    def get_config(self, offset: int, size: int) -> bytes:
        rep = self.request(FR.GET_CONFIG, CONFIG_HDR.pack(offset, size, 0) + bytes(size))
        assert rep is not None
        off, rsize, _flags = CONFIG_HDR.unpack_from(rep.payload)
        data = rep.payload[CONFIG_HDR.size:]
        if off != offset or rsize != size or len(data) != size:
            self._fail(ProtocolErrorKind.BAD_REPLY, f"GET_CONFIG reply ({off}, {rsize}, {len(data)} bytes) for ({offset}, {size})")
        return data

    def get_inflight_fd(self, num_queues: int, queue_size: int) -> InflightInfo:
        rep = self.request(FR.GET_INFLIGHT_FD, INFLIGHT.pack(0, 0, num_queues, queue_size))
        assert rep is not None
        size, off, nq, qs = INFLIGHT.unpack(rep.payload)
        return InflightInfo(rep.fds[0], size, off, nq, qs)

    def set_inflight_fd(self, info: InflightInfo) -> None:
        self.request(FR.SET_INFLIGHT_FD, INFLIGHT.pack(info.mmap_size, info.mmap_offset, info.num_queues,
                                                       info.queue_size), [info.fd])

    def set_backend_req_fd(self) -> None:
        """Give the back-end a socket for its own requests and serve it on a thread."""
        a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self.request(FR.SET_BACKEND_REQ_FD, b"", [b.fileno()])
        finally:
            b.close()
        self._req_sock = a
        self._req_thread = named_thread(self._serve_backend_requests, "kc-be-req", args=(a,))
        self._req_thread.start()

    def _serve_backend_requests(self, s: socket.socket) -> None:
        while True:
            try:
                msg = recv_message(s)
            except (EOFError, OSError):
                return
            except ProtocolError as e:
                log.error("%s: back-end request channel: %s; closing it", self.name, e)
                s.close()
                return
            rule = BACKEND_RULES.get(msg.request)
            ok = rule is not None and len(msg.payload) == rule[0] and len(msg.fds) == rule[1]
            msg.close_fds()
            if not ok:
                log.error("%s: malformed back-end request %d; closing the channel", self.name, msg.request)
                s.close()
                return
            # acknowledge first: handling a config change means a GET_CONFIG on the main socket, which
            # a single-threaded back-end cannot answer while it waits for this acknowledgement
            if msg.flags & FLAG_NEED_REPLY:
                try:
                    send_message(s, Message(msg.request, VERSION | FLAG_REPLY, U64.pack(0)))
                except OSError:
                    return
            try:
                if msg.request == BackendReq.CONFIG_CHANGE_MSG and self.on_config_change is not None:
                    self.on_config_change()
                elif msg.request == BackendReq.VRING_ERR and self.on_vring_err is not None:
                    self.on_vring_err(U64.unpack(msg.payload)[0] & 0xFF)
            except Exception:
                log.exception("%s: back-end request handler", self.name)


_ = os
