"""The vhost-user protocol (QEMU docs/interop/vhost-user.rst): codes, payload layouts, framing.

A message is ``request:u32 flags:u32 size:u32`` then ``size`` bytes of payload, all in the
machine's native byte order.  File descriptors travel as SCM_RIGHTS on the sendmsg that carries
the header.  Flags: bits 0-1 version (1), 0x4 REPLY, 0x8 NEED_REPLY.

Everything a peer sends is checked before it is acted on: the payload size must be the one the
request carries, the number of fds must match (SET_VRING_KICK/CALL/ERR with the NOFD bit 0x100
carry none, and that is valid), the request must be known.  A violation is a ``ProtocolError``
and the caller closes the connection.
"""

from __future__ import annotations

import enum
import os
import socket
import struct
from dataclasses import dataclass, field

__all__ = [
    "FrontendReq", "BackendReq", "ProtocolFeature", "ProtocolError", "Message", "recv_message",
    "send_message", "HDR", "U64", "VRING_STATE", "VRING_ADDR", "MEM_REGION", "MEM_REGIONS_HDR",
    "SINGLE_MEM_REGION", "CONFIG_HDR", "INFLIGHT", "VRING_IDX_MASK", "VRING_NOFD_MASK",
    "VHOST_USER_F_PROTOCOL_FEATURES", "VERSION", "FLAG_REPLY", "FLAG_NEED_REPLY", "MAX_FDS",
    "MAX_PAYLOAD", "MemRegion", "pack_regions", "parse_regions", "MessageReader",
]

HDR = struct.Struct("=III")
U64 = struct.Struct("=Q")
VRING_STATE = struct.Struct("=II")  # index, num
VRING_ADDR = struct.Struct("=IIQQQQ")  # index, flags, desc, used, avail, log  (order: desc, used, avail)
MEM_REGIONS_HDR = struct.Struct("=II")  # nregions, padding
MEM_REGION = struct.Struct("=QQQQ")  # guest_phys_addr, memory_size, userspace_addr, mmap_offset
SINGLE_MEM_REGION = struct.Struct("=Q" + "QQQQ")  # padding, region
CONFIG_HDR = struct.Struct("=III")  # offset, size, flags
# mmap_size, mmap_offset, num_queues, queue_size -- padded to 24 bytes like the C struct (QEMU 7.2
# sends 24; the field list alone would suggest 20)
INFLIGHT = struct.Struct("=QQHH4x")
LOG = struct.Struct("=QQ")  # mmap_size, mmap_offset
VRING_AREA = struct.Struct("=QQQ")  # u64 (index|flags), size, offset

VERSION = 0x1
FLAG_REPLY = 0x4
FLAG_NEED_REPLY = 0x8
VRING_IDX_MASK = 0xFF
VRING_NOFD_MASK = 0x100
VHOST_USER_F_PROTOCOL_FEATURES = 30
VHOST_F_LOG_ALL = 26
MAX_FDS = 8  # VHOST_MEMORY_BASELINE_NREGIONS
MAX_REGIONS = 8
MAX_PAYLOAD = 4096 + CONFIG_HDR.size  # the largest payload any request may carry (config space)
MAX_CONFIG = 4096


class FrontendReq(enum.IntEnum):
    GET_FEATURES = 1
    SET_FEATURES = 2
    SET_OWNER = 3
    RESET_OWNER = 4
    SET_MEM_TABLE = 5
    SET_LOG_BASE = 6
    SET_LOG_FD = 7
    SET_VRING_NUM = 8
    SET_VRING_ADDR = 9
    SET_VRING_BASE = 10
    GET_VRING_BASE = 11
    SET_VRING_KICK = 12
    SET_VRING_CALL = 13
    SET_VRING_ERR = 14
    GET_PROTOCOL_FEATURES = 15
    SET_PROTOCOL_FEATURES = 16
    GET_QUEUE_NUM = 17
    SET_VRING_ENABLE = 18
    SEND_RARP = 19
    NET_SET_MTU = 20
    SET_BACKEND_REQ_FD = 21
    IOTLB_MSG = 22
    SET_VRING_ENDIAN = 23
    GET_CONFIG = 24
    SET_CONFIG = 25
    CREATE_CRYPTO_SESSION = 26
    CLOSE_CRYPTO_SESSION = 27
    POSTCOPY_ADVISE = 28
    POSTCOPY_LISTEN = 29
    POSTCOPY_END = 30
    GET_INFLIGHT_FD = 31
    SET_INFLIGHT_FD = 32
    GPU_SET_SOCKET = 33
    RESET_DEVICE = 34
    VRING_KICK = 35
    GET_MAX_MEM_SLOTS = 36
    ADD_MEM_REG = 37
    REM_MEM_REG = 38
    SET_STATUS = 39
    GET_STATUS = 40
    GET_SHARED_OBJECT = 41
    SET_DEVICE_STATE_FD = 42
    CHECK_DEVICE_STATE = 43


class BackendReq(enum.IntEnum):
    IOTLB_MSG = 1
    CONFIG_CHANGE_MSG = 2
    VRING_HOST_NOTIFIER_MSG = 3
    VRING_CALL = 4
    VRING_ERR = 5
    SHARED_OBJECT_ADD = 6
    SHARED_OBJECT_REMOVE = 7
    SHARED_OBJECT_LOOKUP = 8


class ProtocolFeature(enum.IntEnum):
    MQ = 0
    LOG_SHMFD = 1
    RARP = 2
    REPLY_ACK = 3
    MTU = 4
    BACKEND_REQ = 5
    CROSS_ENDIAN = 6
    CRYPTO_SESSION = 7
    PAGEFAULT = 8
    CONFIG = 9
    BACKEND_SEND_FD = 10
    HOST_NOTIFIER = 11
    INFLIGHT_SHMFD = 12
    RESET_DEVICE = 13
    INBAND_NOTIFICATIONS = 14
    CONFIGURE_MEM_SLOTS = 15
    STATUS = 16
    XEN_MMAP = 17
    SHARED_OBJECT = 18
    DEVICE_STATE = 19


class ProtocolError(Exception):
    """The peer broke the protocol; the connection must be closed."""


# (payload size rule, fd rule) per front-end request.  Size: an int (exact), "regions" (SET_MEM_TABLE),
# "config" (GET/SET_CONFIG), "any" (bounded by MAX_PAYLOAD).  Fds: an int (exact), "vring" (one unless
# the payload has NOFD), "regions" (one per region).
_F = FrontendReq
FRONTEND_RULES: dict[int, tuple[object, object]] = {
    _F.GET_FEATURES: (0, 0), _F.SET_FEATURES: (8, 0), _F.SET_OWNER: (0, 0), _F.RESET_OWNER: (0, 0),
    _F.SET_MEM_TABLE: ("regions", "regions"), _F.SET_LOG_BASE: (LOG.size, 1), _F.SET_LOG_FD: (0, 1),
    _F.SET_VRING_NUM: (8, 0), _F.SET_VRING_ADDR: (VRING_ADDR.size, 0), _F.SET_VRING_BASE: (8, 0),
    _F.GET_VRING_BASE: (8, 0), _F.SET_VRING_KICK: (8, "vring"), _F.SET_VRING_CALL: (8, "vring"),
    _F.SET_VRING_ERR: (8, "vring"), _F.GET_PROTOCOL_FEATURES: (0, 0), _F.SET_PROTOCOL_FEATURES: (8, 0),
    _F.GET_QUEUE_NUM: (0, 0), _F.SET_VRING_ENABLE: (8, 0), _F.SEND_RARP: (8, 0), _F.NET_SET_MTU: (8, 0),
    _F.SET_BACKEND_REQ_FD: (0, 1), _F.SET_VRING_ENDIAN: (8, 0), _F.GET_CONFIG: ("config", 0),
    _F.SET_CONFIG: ("config", 0), _F.GET_INFLIGHT_FD: (INFLIGHT.size, 0), _F.SET_INFLIGHT_FD: (INFLIGHT.size, 1),
    _F.RESET_DEVICE: (0, 0), _F.VRING_KICK: (8, 0), _F.GET_MAX_MEM_SLOTS: (0, 0),
    _F.ADD_MEM_REG: (SINGLE_MEM_REGION.size, 1), _F.REM_MEM_REG: (SINGLE_MEM_REGION.size, 0),
    _F.SET_STATUS: (8, 0), _F.GET_STATUS: (0, 0),
}
# reply payload sizes the front-end checks
REPLY_SIZES: dict[int, object] = {
    _F.GET_FEATURES: 8, _F.GET_PROTOCOL_FEATURES: 8, _F.GET_QUEUE_NUM: 8, _F.GET_VRING_BASE: 8,
    _F.GET_MAX_MEM_SLOTS: 8, _F.GET_STATUS: 8, _F.GET_CONFIG: "config", _F.GET_INFLIGHT_FD: INFLIGHT.size,
}
BACKEND_RULES: dict[int, tuple[object, object]] = {
    BackendReq.CONFIG_CHANGE_MSG: (0, 0),
    BackendReq.VRING_CALL: (8, 0),
    BackendReq.VRING_ERR: (8, 0),
}


@dataclass
class MemRegion:
    guest_addr: int
    size: int
    user_addr: int
    mmap_offset: int

    def pack_fields(self) -> tuple[int, int, int, int]:
        return self.guest_addr, self.size, self.user_addr, self.mmap_offset

    def pack(self) -> bytes:
        return MEM_REGION.pack(*self.pack_fields())


def pack_regions(regions: list[MemRegion]) -> bytes:
    return MEM_REGIONS_HDR.pack(len(regions), 0) + b"".join(r.pack() for r in regions)


def parse_regions(payload: bytes) -> list[MemRegion]:
    if len(payload) < MEM_REGIONS_HDR.size:
        raise ProtocolError("SET_MEM_TABLE payload too short")
    n, _pad = MEM_REGIONS_HDR.unpack_from(payload)
    if not 1 <= n <= MAX_REGIONS:
        raise ProtocolError(f"SET_MEM_TABLE with {n} regions (1..{MAX_REGIONS})")
    if len(payload) != MEM_REGIONS_HDR.size + n * MEM_REGION.size:
        raise ProtocolError(f"SET_MEM_TABLE size {len(payload)} does not hold {n} regions")
    return [MemRegion(*MEM_REGION.unpack_from(payload, MEM_REGIONS_HDR.size + i * MEM_REGION.size))
            for i in range(n)]


@dataclass
class Message:
    request: int
    flags: int = VERSION
    payload: bytes = b""
    fds: list[int] = field(default_factory=list)

    @property
    def need_reply(self) -> bool:
        return bool(self.flags & FLAG_NEED_REPLY)

    @property
    def is_reply(self) -> bool:
        return bool(self.flags & FLAG_REPLY)

    def u64(self) -> int:
        return U64.unpack(self.payload)[0]

    def name(self, backend_side: bool = False) -> str:
        table = BackendReq if backend_side else FrontendReq
        try:
            return table(self.request).name
        except ValueError:
            return f"request {self.request}"

    def close_fds(self) -> None:
        for fd in self.fds:
            try:
                os.close(fd)
            except OSError:
                pass
        self.fds = []


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:  # the message had begun: a truncated message, not a clean close
            raise ProtocolError(f"connection closed in the middle of a message ({len(buf)} of {n} bytes)")
        buf += chunk
    return bytes(buf)


def recv_message(sock: socket.socket) -> Message:
    """Read one message (fds come with the header).  EOFError on a clean close."""
    data, fds, flags, _ = socket.recv_fds(sock, HDR.size, MAX_FDS)
    if not data:
        for fd in fds:
            os.close(fd)
        raise EOFError("peer closed the connection")
    msg = Message(0, 0, b"", list(fds))
    try:
        if flags & socket.MSG_CTRUNC:
            raise ProtocolError(f"more than {MAX_FDS} fds with one message")
        if len(data) < HDR.size:
            data += _recv_exact(sock, HDR.size - len(data))
        request, mflags, size = HDR.unpack(data)
        msg.request, msg.flags = request, mflags
        if mflags & 0x3 != VERSION:
            raise ProtocolError(f"bad version in flags {mflags:#x}")
        if size > MAX_PAYLOAD:
            raise ProtocolError(f"payload of {size} bytes is too large")
        msg.payload = _recv_exact(sock, size) if size else b""
        return msg
    except BaseException:
        msg.close_fds()
        raise


class MessageReader:
    """Read vhost-user messages from a non-blocking stream socket, a piece at a time.

    An event loop calls ``feed()`` whenever the socket is readable: it reads what the socket has,
    never past the end of the current message, keeps the fds that came with any part of it
    (SCM_RIGHTS; received close-on-exec), and returns the message once its last byte is in (None
    while it is incomplete).  ``started`` is True from a message's first byte to its last: the
    caller runs its per-message deadline over exactly that span, so a peer that dribbles bytes
    cannot stretch it.

    ``EOFError`` on a clean close between messages; ``ProtocolError`` for a close in the middle of
    a message, wrong version bits, a payload over *max_payload*, or more than *max_fds* fds (or fds
    the kernel had to drop, which is what it does when this process is out of fds).  On any error,
    and on ``close()``, the fds gathered for the unfinished message are closed.
    """

    def __init__(self, *, max_payload: int = MAX_PAYLOAD, max_fds: int = MAX_FDS) -> None:
        self.max_payload = max_payload
        self.max_fds = max_fds
        self._hdr = bytearray()
        self._payload = bytearray()
        self._size: int | None = None
        self._fds: list[int] = []

    @property
    def started(self) -> bool:
        """Part of a message has arrived (and not all of it)."""
        return bool(self._hdr)

    @property
    def received(self) -> int:
        return len(self._hdr) + len(self._payload)

    @property
    def expected(self) -> int | None:
        """The size of the message being read (None until its header is complete)."""
        return None if self._size is None else HDR.size + self._size

    def describe(self) -> str:
        exp = self.expected
        return f"{self.received} of {exp if exp is not None else '12+'} bytes"

    def close(self) -> None:
        """Drop the unfinished message, closing the fds that came with it."""
        for fd in self._fds:
            try:
                os.close(fd)
            except OSError:
                pass
        self._fds = []
        self._hdr = bytearray()
        self._payload = bytearray()
        self._size = None

    def _fail(self, what: str) -> ProtocolError:
        self.close()
        return ProtocolError(what)

    def feed(self, sock: socket.socket) -> Message | None:
        """Read what is there of the current message; the message once it is complete, else None."""
        while True:
            if self._size is None:
                need = HDR.size - len(self._hdr)
            else:
                need = self._size - len(self._payload)
                if need == 0:
                    return self._finish()
            try:
                data, fds, flags, _ = socket.recv_fds(sock, need, self.max_fds, socket.MSG_CMSG_CLOEXEC)
            except (BlockingIOError, InterruptedError):
                return None
            except OSError:
                self.close()
                raise
            self._fds.extend(fds)
            if flags & socket.MSG_CTRUNC:
                raise self._fail(f"fds cut short: more than {self.max_fds} fds with one message, or this "
                                 f"process is out of file descriptors")
            if len(self._fds) > self.max_fds:
                raise self._fail(f"more than {self.max_fds} fds with one message")
            if not data:
                if not self.started and not self._fds:
                    raise EOFError("peer closed the connection")
                what = self.describe()
                raise self._fail(f"connection closed in the middle of a message ({what})")
            if self._size is None:
                self._hdr += data
                if len(self._hdr) == HDR.size:
                    _req, mflags, size = HDR.unpack(self._hdr)
                    if mflags & 0x3 != VERSION:
                        raise self._fail(f"bad version in flags {mflags:#x}")
                    if size > self.max_payload:
                        raise self._fail(f"payload of {size} bytes is too large")
                    self._size = size
            else:
                self._payload += data

    def _finish(self) -> Message:
        request, mflags, _size = HDR.unpack(self._hdr)
        msg = Message(request, mflags, bytes(self._payload), self._fds)
        self._fds = []
        self._hdr = bytearray()
        self._payload = bytearray()
        self._size = None
        return msg


def send_message(sock: socket.socket, msg: Message) -> None:
    """Send one message (its fds with the first byte).  On a non-blocking socket whose peer does
    not read, ``BlockingIOError`` (the caller gives up on the peer)."""
    data = HDR.pack(msg.request, msg.flags, len(msg.payload)) + msg.payload
    if msg.fds:
        n = socket.send_fds(sock, [data], msg.fds)
        if n < len(data):
            sock.sendall(data[n:])
    else:
        sock.sendall(data)


def validate_frontend_request(msg: Message, *, config_max: int = MAX_CONFIG) -> None:
    """Check a front-end request's payload size and fd count against the spec."""
    rule = FRONTEND_RULES.get(msg.request)
    name = msg.name()
    if rule is None:
        raise ProtocolError(f"unknown front-end request {msg.request}")
    size_rule, fd_rule = rule
    n = len(msg.payload)
    if size_rule == "regions":
        regions = parse_regions(msg.payload)
        if fd_rule == "regions" and len(msg.fds) != len(regions):
            raise ProtocolError(f"{name}: {len(regions)} regions but {len(msg.fds)} fds")
        return
    if size_rule == "config":
        if n < CONFIG_HDR.size:
            raise ProtocolError(f"{name}: payload shorter than the config header")
        _off, size, _flags = CONFIG_HDR.unpack_from(msg.payload)
        if size > config_max or n != CONFIG_HDR.size + size:
            raise ProtocolError(f"{name}: config size {size} does not match payload {n}")
    elif n != size_rule:
        raise ProtocolError(f"{name}: payload of {n} bytes, expected {size_rule}")
    if fd_rule == "vring":
        nofd = bool(U64.unpack(msg.payload)[0] & VRING_NOFD_MASK)
        want = 0 if nofd else 1
        if len(msg.fds) != want:
            raise ProtocolError(f"{name}: {len(msg.fds)} fds, expected {want}" + (" (NOFD set)" if nofd else ""))
    elif len(msg.fds) != fd_rule:
        raise ProtocolError(f"{name}: {len(msg.fds)} fds, expected {fd_rule}")


def validate_reply(req: int, msg: Message) -> None:
    if not msg.is_reply or msg.request != req:
        raise ProtocolError(f"expected a reply to {FrontendReq(req).name}, got request {msg.request} "
                            f"flags {msg.flags:#x}")
    rule = REPLY_SIZES.get(req, 8)
    if rule == "config":
        if len(msg.payload) < CONFIG_HDR.size:
            raise ProtocolError("GET_CONFIG reply too short")
    elif len(msg.payload) != rule:
        raise ProtocolError(f"reply to {FrontendReq(req).name}: {len(msg.payload)} bytes, expected {rule}")
    want_fds = 1 if req == FrontendReq.GET_INFLIGHT_FD else 0
    if len(msg.fds) != want_fds:
        raise ProtocolError(f"reply to {FrontendReq(req).name} carries {len(msg.fds)} fds, expected {want_fds}")
