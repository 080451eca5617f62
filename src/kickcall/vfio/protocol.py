"""The vfio-user protocol (QEMU docs/interop/vfio-user.rst): header, commands, payloads, framing.

Every message is a 16-byte header -- message id u16, command u16, message size u32 (header
included), flags u32 (bits 0-3 type: 0 command, 1 reply; bit 4 No_reply; bit 5 Error), error u32
(an errno, in replies) -- then the command's payload, in the host's byte order (kickcall packs
little-endian: it runs on x86-64 and arm64 hosts, both little-endian).  File descriptors travel as
SCM_RIGHTS with the header's first byte.  An error reply carries only the header.

Two kinds of trouble, kept apart as the specification asks:

* a message that cannot be framed (a size smaller than the header or larger than the negotiated
  ``max_data_xfer_size`` allows, a type that is neither command nor reply, more fds than
  ``max_msg_fds``, a close in the middle of a message) is a ``VfioUserError`` whose ``kind``
  (``VfioUserErrorKind``) says why: the connection cannot be trusted and is closed;
* a well-framed message whose payload is wrong is answered with an error reply carrying an errno
  (``PayloadError``), and the connection carries on.

Where the specification's tables and its reference implementation (libvfio-user) disagree, kickcall
reads both and sends what both accept; each case is named where it is handled (see
``DMA_WRITE_REPLY``, ``Version.decode``).
"""

from __future__ import annotations

import enum
import errno
import json
import os
import socket
import struct
from dataclasses import dataclass, field
from typing import Any, ClassVar, Self

__all__ = [
    "VfioUserCommand", "HEADER", "VFIO_USER_F_TYPE_MASK", "VFIO_USER_F_TYPE_COMMAND", "VFIO_USER_F_TYPE_REPLY",
    "VFIO_USER_F_NO_REPLY", "VFIO_USER_F_ERROR", "VfioUserErrorKind", "VfioUserError", "PayloadError", "Message",
    "MessageReader", "send_message", "recv_message", "Capabilities", "Version", "DmaMap", "DmaUnmap",
    "DmaMapFlag", "DmaUnmapFlag", "RegionAccess", "DmaAccess", "RegionIoFds", "DMA_WRITE_REPLY",
    "VFIO_USER_MAJOR", "VFIO_USER_MINOR", "MAX_MSG_FDS_LIMIT", "DEFAULT_MAX_DATA_XFER_SIZE",
]

VFIO_USER_MAJOR = 0  # the version QEMU's client and libvfio-user speak: 0.1 (the specification's example)
VFIO_USER_MINOR = 1

HEADER = struct.Struct("<HHIII")  # msg id, command, size, flags, error
VFIO_USER_F_TYPE_MASK = 0xF
VFIO_USER_F_TYPE_COMMAND = 0x0
VFIO_USER_F_TYPE_REPLY = 0x1
VFIO_USER_F_NO_REPLY = 1 << 4
VFIO_USER_F_ERROR = 1 << 5

#: ``max_msg_fds`` when a peer does not say (the specification's default)
DEFAULT_MAX_MSG_FDS = 1
#: the most fds kickcall takes or offers with one message (Linux's SCM_MAX_FD is 253)
MAX_MSG_FDS_LIMIT = 253
DEFAULT_MAX_DATA_XFER_SIZE = 1 << 20
DEFAULT_MAX_DMA_MAPS = 65535
DEFAULT_PGSIZES = 4096
#: the largest fixed part of any payload (VERSION's JSON aside), added to max_data_xfer_size
_PAYLOAD_SLACK = 4096


class VfioUserCommand(enum.IntEnum):
    """``VFIO_USER_*`` command ids."""

    VERSION = 1
    DMA_MAP = 2
    DMA_UNMAP = 3
    DEVICE_GET_INFO = 4
    DEVICE_GET_REGION_INFO = 5
    DEVICE_GET_REGION_IO_FDS = 6
    DEVICE_GET_IRQ_INFO = 7
    DEVICE_SET_IRQS = 8
    REGION_READ = 9
    REGION_WRITE = 10
    DMA_READ = 11
    DMA_WRITE = 12
    DEVICE_RESET = 13
    REGION_WRITE_MULTI = 15
    DEVICE_FEATURE = 16
    MIG_DATA_READ = 17
    MIG_DATA_WRITE = 18
    #: kickcall's extension (docs/vfio-user-hot-reset.md), outside the specification's command
    #: numbers; sent only to a server whose VERSION reply carried ``kickcall.pci-hot-reset``
    X_KICKCALL_PCI_HOT_RESET_INFO = 0x4B01
    X_KICKCALL_PCI_HOT_RESET = 0x4B02


class VfioUserErrorKind(enum.StrEnum):
    """Why a byte stream stopped being a vfio-user connection (the connection is closed)."""

    SHORT_SIZE = "size-below-header"
    OVERSIZED = "oversized-message"
    BAD_TYPE = "bad-message-type"
    BAD_FD_COUNT = "too-many-fds"
    PARTIAL_MESSAGE = "partial-message"
    UNEXPECTED_REPLY = "unexpected-reply"
    BAD_VERSION = "bad-version"
    PEER_ERROR = "peer-error"  # an error reply the caller cannot go on after


class VfioUserError(Exception):
    """The connection is broken (framing, negotiation); ``kind`` says how."""

    def __init__(self, kind: VfioUserErrorKind, msg: str) -> None:
        super().__init__(msg)
        self.kind = kind


class PayloadError(Exception):
    """A well-framed message the receiver refuses: answered with an error reply carrying
    ``errno``; the connection carries on."""

    def __init__(self, err: int, msg: str) -> None:
        super().__init__(msg)
        self.errno = err


def _need(data: bytes, n: int, what: str) -> None:
    if len(data) < n:
        raise PayloadError(errno.EINVAL, f"{what}: payload of {len(data)} bytes, need {n}")


@dataclass
class Message:
    """One vfio-user message: header fields, payload, and the fds that came with it (owned)."""

    msg_id: int
    command: int
    flags: int = VFIO_USER_F_TYPE_COMMAND
    error: int = 0
    payload: bytes = b""
    fds: list[int] = field(default_factory=list)

    @property
    def is_reply(self) -> bool:
        return self.flags & VFIO_USER_F_TYPE_MASK == VFIO_USER_F_TYPE_REPLY

    @property
    def is_error(self) -> bool:
        return bool(self.flags & VFIO_USER_F_ERROR)

    @property
    def no_reply(self) -> bool:
        return bool(self.flags & VFIO_USER_F_NO_REPLY)

    def command_name(self) -> str:
        try:
            return VfioUserCommand(self.command).name
        except ValueError:
            return f"command {self.command}"

    def reply(self, payload: bytes = b"", fds: list[int] | None = None) -> "Message":
        """The reply to this command: same id and command, type reply."""
        return Message(self.msg_id, self.command, VFIO_USER_F_TYPE_REPLY, 0, payload, list(fds or []))

    def error_reply(self, err: int) -> "Message":
        """An error reply: the header alone, Error set, *err* in the error field."""
        return Message(self.msg_id, self.command, VFIO_USER_F_TYPE_REPLY | VFIO_USER_F_ERROR, err)

    def encode(self) -> bytes:
        return HEADER.pack(self.msg_id, self.command, HEADER.size + len(self.payload), self.flags,
                           self.error) + self.payload

    def close_fds(self) -> None:
        for fd in self.fds:
            try:
                os.close(fd)
            except OSError:
                pass
        self.fds = []

    def take_fds(self) -> list[int]:
        """Hand the fds over to the caller (who closes them)."""
        fds, self.fds = self.fds, []
        return fds


class MessageReader:
    """Read vfio-user messages from a stream socket (blocking or not), a piece at a time.

    ``feed()`` reads what the socket has, never past the end of the current message, keeps the
    fds that came with any part of it (received close-on-exec) and returns the message once its
    last byte is in (None while incomplete, on a non-blocking socket).  ``EOFError`` on a clean
    close between messages; ``VfioUserError`` for a framing error.  On any error and on
    ``close()`` the fds gathered for the unfinished message are closed."""

    def __init__(self, *, max_data_xfer_size: int = DEFAULT_MAX_DATA_XFER_SIZE,
                 max_fds: int = MAX_MSG_FDS_LIMIT) -> None:
        self.max_size = HEADER.size + max_data_xfer_size + _PAYLOAD_SLACK
        self.max_fds = max_fds
        self._hdr = bytearray()
        self._payload = bytearray()
        self._size: int | None = None
        self._fds: list[int] = []

    @property
    def started(self) -> bool:
        return bool(self._hdr)

    def close(self) -> None:
        for fd in self._fds:
            try:
                os.close(fd)
            except OSError:
                pass
        self._fds = []
        self._hdr = bytearray()
        self._payload = bytearray()
        self._size = None

    def _fail(self, kind: VfioUserErrorKind, what: str) -> VfioUserError:
        self.close()
        return VfioUserError(kind, what)

    def feed(self, sock: socket.socket) -> Message | None:
        while True:
            if self._size is None:
                need = HEADER.size - len(self._hdr)
            else:
                need = self._size - HEADER.size - len(self._payload)
                if need == 0:
                    return self._finish()
            try:
                data, fds, flags, _ = socket.recv_fds(sock, min(need, 1 << 20), self.max_fds,
                                                      socket.MSG_CMSG_CLOEXEC)
            except (BlockingIOError, InterruptedError):
                return None
            except OSError:
                self.close()
                raise
            self._fds.extend(fds)
            if flags & socket.MSG_CTRUNC or len(self._fds) > self.max_fds:
                raise self._fail(VfioUserErrorKind.BAD_FD_COUNT,
                                 f"more than {self.max_fds} fds with one message (or this process is out of fds)")
            if not data:
                if not self.started and not self._fds:
                    raise EOFError("peer closed the connection")
                raise self._fail(VfioUserErrorKind.PARTIAL_MESSAGE,
                                 f"connection closed in the middle of a message ({len(self._hdr) + len(self._payload)} bytes in)")
            if self._size is None:
                self._hdr += data
                if len(self._hdr) == HEADER.size:
                    _mid, _cmd, size, mflags, _err = HEADER.unpack(self._hdr)
                    if size < HEADER.size:
                        raise self._fail(VfioUserErrorKind.SHORT_SIZE, f"message size {size} is below the 16-byte header")
                    if size > self.max_size:
                        raise self._fail(VfioUserErrorKind.OVERSIZED, f"message of {size} bytes exceeds {self.max_size}")
                    if mflags & VFIO_USER_F_TYPE_MASK not in (VFIO_USER_F_TYPE_COMMAND, VFIO_USER_F_TYPE_REPLY):
                        raise self._fail(VfioUserErrorKind.BAD_TYPE, f"message type {mflags & VFIO_USER_F_TYPE_MASK}")
                    self._size = size
            else:
                self._payload += data

    def _finish(self) -> Message:
        mid, cmd, _size, mflags, err = HEADER.unpack(self._hdr)
        msg = Message(mid, cmd, mflags, err, bytes(self._payload), self._fds)
        self._fds = []
        self._hdr = bytearray()
        self._payload = bytearray()
        self._size = None
        return msg


def send_message(sock: socket.socket, msg: Message) -> None:
    """Send one message, its fds with the first byte.  The caller serializes senders."""
    data = msg.encode()
    if msg.fds:
        n = socket.send_fds(sock, [data], msg.fds)
        if n < len(data):
            sock.sendall(data[n:])
    else:
        sock.sendall(data)


def recv_message(sock: socket.socket, reader: MessageReader | None = None) -> Message:
    """Read one whole message from a blocking socket."""
    r = reader or MessageReader()
    while True:
        m = r.feed(sock)
        if m is not None:
            return m


# -- VERSION ----------------------------------------------------------------------------------------
@dataclass
class Capabilities:
    """The VERSION message's ``capabilities`` object, with the specification's defaults."""

    max_msg_fds: int = DEFAULT_MAX_MSG_FDS
    max_data_xfer_size: int = DEFAULT_MAX_DATA_XFER_SIZE
    max_dma_maps: int = DEFAULT_MAX_DMA_MAPS
    pgsizes: int = DEFAULT_PGSIZES
    twin_socket: bool = False
    twin_fd_index: int | None = None
    write_multiple: bool = False
    #: kickcall's extensions a peer announced (names outside the specification, ``kickcall.*``)
    extensions: dict[str, Any] = field(default_factory=dict)
    #: the capability names the peer's JSON carried (a reply may only carry names that were proposed)
    proposed: frozenset[str] = frozenset()

    def to_json(self, only: frozenset[str] | None = None) -> dict[str, Any]:
        """The capabilities object; with *only*, just those names ("The capability list must be a
        subset of those proposed", the server's reply rule)."""
        if only is not None:
            return {k: v for k, v in self.to_json().items() if k in only}
        caps: dict[str, Any] = {"max_msg_fds": self.max_msg_fds, "max_data_xfer_size": self.max_data_xfer_size,
                                "max_dma_maps": self.max_dma_maps, "pgsizes": self.pgsizes}
        if self.twin_socket:
            twin: dict[str, Any] = {"supported": True}
            if self.twin_fd_index is not None:
                twin["fd_index"] = self.twin_fd_index
            caps["twin_socket"] = twin
        if self.write_multiple:
            caps["write_multiple"] = True
        caps.update(self.extensions)
        return caps

    @classmethod
    def from_json(cls, caps: Any) -> Self:
        """Decode a peer's capabilities, refusing what is not well-formed (EINVAL)."""
        if not isinstance(caps, dict):
            raise PayloadError(errno.EINVAL, "capabilities is not a JSON object")
        out = cls()

        def number(name: str, lo: int, hi: int) -> int | None:
            v = caps.get(name)
            if v is None:
                return None
            if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
                raise PayloadError(errno.EINVAL, f"capability {name}: {v!r} is not an integer in {lo}..{hi}")
            return v

        if (v := number("max_msg_fds", 1, 1 << 16)) is not None:
            out.max_msg_fds = v
        if (v := number("max_data_xfer_size", 1, 1 << 30)) is not None:
            out.max_data_xfer_size = v
        if (v := number("max_dma_maps", 1, 1 << 31)) is not None:
            out.max_dma_maps = v
        if (v := number("pgsizes", 1, (1 << 64) - 1)) is not None:
            out.pgsizes = v
        twin = caps.get("twin_socket")
        if twin is not None:
            if not isinstance(twin, dict):
                raise PayloadError(errno.EINVAL, "capability twin_socket is not an object")
            sup = twin.get("supported", False)
            if not isinstance(sup, bool):
                raise PayloadError(errno.EINVAL, "twin_socket.supported is not a boolean")
            out.twin_socket = sup
            idx = twin.get("fd_index")
            if idx is not None:
                if isinstance(idx, bool) or not isinstance(idx, int) or not 0 <= idx < MAX_MSG_FDS_LIMIT:
                    raise PayloadError(errno.EINVAL, "twin_socket.fd_index is not a valid index")
                out.twin_fd_index = idx
        wm = caps.get("write_multiple")
        if wm is not None:
            if not isinstance(wm, bool):
                raise PayloadError(errno.EINVAL, "write_multiple is not a boolean")
            out.write_multiple = wm
        out.extensions = {k: v for k, v in caps.items() if isinstance(k, str) and k.startswith("kickcall.")}
        out.proposed = frozenset(k for k in caps if isinstance(k, str))
        return out


_VERSION_HDR = struct.Struct("<HH")


@dataclass
class Version:
    """VERSION's payload: major u16, minor u16, then optional UTF-8 JSON ``{"capabilities": {...}}``.

    The specification says the JSON includes its terminating NUL; kickcall sends the NUL and
    accepts JSON with or without it (a peer that counts differently is not refused)."""

    major: int = VFIO_USER_MAJOR
    minor: int = VFIO_USER_MINOR
    caps: Capabilities = field(default_factory=Capabilities)

    def encode(self, only: frozenset[str] | None = None) -> bytes:
        """The payload; *only*: the capability names the reply may carry (those proposed)."""
        js = json.dumps({"capabilities": self.caps.to_json(only)}, separators=(",", ":")).encode()
        return _VERSION_HDR.pack(self.major, self.minor) + js + b"\0"

    @classmethod
    def decode(cls, data: bytes) -> Self:
        _need(data, _VERSION_HDR.size, "VERSION")
        major, minor = _VERSION_HDR.unpack_from(data)
        raw = data[_VERSION_HDR.size:]
        if raw.endswith(b"\0"):
            raw = raw[:-1]
        if not raw:
            return cls(major, minor, Capabilities())
        if b"\0" in raw:
            raise PayloadError(errno.EINVAL, "VERSION: a NUL inside the JSON")
        if len(raw) > 64 << 10:
            raise PayloadError(errno.EINVAL, "VERSION: JSON larger than 64 KiB")
        try:
            doc = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, ValueError, RecursionError) as e:
            raise PayloadError(errno.EINVAL, f"VERSION: bad JSON ({e.__class__.__name__})") from None
        if not isinstance(doc, dict):
            raise PayloadError(errno.EINVAL, "VERSION: the JSON is not an object")
        return cls(major, minor, Capabilities.from_json(doc.get("capabilities", {})))


# -- DMA_MAP / DMA_UNMAP ------------------------------------------------------------------------------
class DmaMapFlag(enum.IntFlag):
    READ = 1 << 0
    WRITE = 1 << 1


class DmaUnmapFlag(enum.IntFlag):
    GET_DIRTY_BITMAP = 1 << 0
    UNMAP_ALL = 1 << 1


@dataclass
class DmaMap:
    """DMA_MAP's payload (32 bytes): argsz, flags, offset (into the fd), address (IOVA), size."""

    argsz: int = 32
    flags: int = DmaMapFlag.READ | DmaMapFlag.WRITE
    offset: int = 0
    address: int = 0
    size: int = 0

    STRUCT: ClassVar[struct.Struct] = struct.Struct("<IIQQQ")

    def encode(self) -> bytes:
        return self.STRUCT.pack(self.argsz, self.flags, self.offset, self.address, self.size)

    @classmethod
    def decode(cls, data: bytes) -> Self:
        _need(data, cls.STRUCT.size, "DMA_MAP")
        m = cls(*cls.STRUCT.unpack_from(data))
        if m.flags & ~int(DmaMapFlag.READ | DmaMapFlag.WRITE):
            raise PayloadError(errno.EINVAL, f"DMA_MAP: unknown flags {m.flags:#x}")
        if m.size == 0 or m.address + m.size > 1 << 64:
            raise PayloadError(errno.EINVAL, f"DMA_MAP: bad range {m.address:#x}+{m.size:#x}")
        return m


@dataclass
class DmaUnmap:
    """DMA_UNMAP's payload (24 bytes): argsz, flags, address, size; the reply echoes it."""

    argsz: int = 24
    flags: int = 0
    address: int = 0
    size: int = 0

    STRUCT: ClassVar[struct.Struct] = struct.Struct("<IIQQ")

    def encode(self) -> bytes:
        return self.STRUCT.pack(self.argsz, self.flags, self.address, self.size)

    @classmethod
    def decode(cls, data: bytes) -> Self:
        _need(data, cls.STRUCT.size, "DMA_UNMAP")
        m = cls(*cls.STRUCT.unpack_from(data))
        if m.flags & DmaUnmapFlag.GET_DIRTY_BITMAP:
            raise PayloadError(errno.ENOTSUP, "DMA_UNMAP: dirty page logging is not supported")
        if m.flags & ~int(DmaUnmapFlag.UNMAP_ALL):
            raise PayloadError(errno.EINVAL, f"DMA_UNMAP: unknown flags {m.flags:#x}")
        return m


# -- region and DMA access ----------------------------------------------------------------------------
@dataclass
class RegionAccess:
    """REGION_READ / REGION_WRITE: offset u64, region u32, count u32, then data (write request,
    read reply)."""

    offset: int
    region: int
    count: int
    data: bytes = b""

    STRUCT: ClassVar[struct.Struct] = struct.Struct("<QII")

    def encode(self) -> bytes:
        return self.STRUCT.pack(self.offset, self.region, self.count) + self.data

    @classmethod
    def decode(cls, data: bytes, *, with_data: bool) -> Self:
        _need(data, cls.STRUCT.size, "region access")
        offset, region, count = cls.STRUCT.unpack_from(data)
        body = bytes(data[cls.STRUCT.size:])
        if with_data and len(body) != count:
            raise PayloadError(errno.EINVAL, f"region write: count {count} but {len(body)} data bytes")
        if not with_data and body:
            raise PayloadError(errno.EINVAL, "region read request carries data")
        return cls(offset, region, count, body)


@dataclass
class DmaAccess:
    """DMA_READ / DMA_WRITE (server to client): address u64, count u64, then data (write request,
    read reply)."""

    address: int
    count: int
    data: bytes = b""

    STRUCT: ClassVar[struct.Struct] = struct.Struct("<QQ")

    def encode(self) -> bytes:
        return self.STRUCT.pack(self.address, self.count) + self.data

    @classmethod
    def decode(cls, data: bytes, *, with_data: bool) -> Self:
        _need(data, cls.STRUCT.size, "DMA access")
        address, count = cls.STRUCT.unpack_from(data)
        body = bytes(data[cls.STRUCT.size:])
        if with_data and len(body) != count:
            raise PayloadError(errno.EINVAL, f"DMA access: count {count} but {len(body)} data bytes")
        return cls(address, count, body)


#: DMA_WRITE's reply.  The specification's table gives ``address u64, count u32`` (12 bytes);
#: libvfio-user and QEMU's client use one structure for request and reply, ``count u64``
#: (16 bytes).  kickcall sends 16 bytes (the low 32 bits of count sit where a reader of the
#: specification looks for them) and accepts either.
DMA_WRITE_REPLY = struct.Struct("<QQ")
DMA_WRITE_REPLY_SPEC = struct.Struct("<QI")


def decode_dma_write_reply(data: bytes) -> tuple[int, int]:
    """(address, count) of a DMA_WRITE reply in either reading."""
    if len(data) >= DMA_WRITE_REPLY.size:
        return DMA_WRITE_REPLY.unpack_from(data)
    if len(data) == DMA_WRITE_REPLY_SPEC.size:
        return DMA_WRITE_REPLY_SPEC.unpack_from(data)
    raise PayloadError(errno.EINVAL, f"DMA_WRITE reply of {len(data)} bytes")


@dataclass
class RegionIoFds:
    """DEVICE_GET_REGION_IO_FDS request: argsz, flags, index, count."""

    argsz: int = 16
    flags: int = 0
    index: int = 0
    count: int = 0

    STRUCT: ClassVar[struct.Struct] = struct.Struct("<IIII")

    def encode(self) -> bytes:
        return self.STRUCT.pack(self.argsz, self.flags, self.index, self.count)

    @classmethod
    def decode(cls, data: bytes) -> Self:
        _need(data, cls.STRUCT.size, "DEVICE_GET_REGION_IO_FDS")
        return cls(*cls.STRUCT.unpack_from(data))


# -- kickcall's PCI hot reset extension (docs/vfio-user-hot-reset.md) ----------------------------------------

#: the VERSION capability that announces the extension.  The client proposes it with an empty
#: object; a server that knows it answers with the function's address and this connection's
#: ownership token: ``{"bdf": "0000:01:00.0", "token": "<32 hex digits>"}``
HOT_RESET_CAPABILITY = "kickcall.pci-hot-reset"
HOT_RESET_TOKEN_SIZE = 16
_HR_HDR = struct.Struct("<III")  # argsz, flags, count
_HR_DEV = struct.Struct("<HBBI")  # segment, bus, devfn, reserved


@dataclass(frozen=True)
class PciAddress:
    """segment:bus:slot.function."""

    segment: int
    bus: int
    devfn: int

    def __str__(self) -> str:
        return f"{self.segment:04x}:{self.bus:02x}:{self.devfn >> 3:02x}.{self.devfn & 7}"

    @classmethod
    def parse(cls, text: str) -> "PciAddress":
        try:
            seg, bus, rest = text.split(":")
            slot, fn = rest.split(".")
            s, b, d, f = int(seg, 16), int(bus, 16), int(slot, 16), int(fn, 10)
        except ValueError:
            raise PayloadError(errno.EINVAL, f"bad PCI address {text!r}") from None
        if not (0 <= s <= 0xFFFF and 0 <= b <= 0xFF and 0 <= d < 32 and 0 <= f < 8):
            raise PayloadError(errno.EINVAL, f"bad PCI address {text!r}")
        return cls(s, b, d << 3 | f)


@dataclass
class HotResetOffer:
    """What a server's VERSION reply announced for the extension: this function's address and the
    token that proves, in a later hot reset, that the sender holds this connection."""

    address: PciAddress
    token: bytes

    @classmethod
    def from_capability(cls, v: Any) -> "HotResetOffer":
        if not isinstance(v, dict):
            raise PayloadError(errno.EINVAL, f"{HOT_RESET_CAPABILITY} is not an object")
        bdf, tok = v.get("bdf"), v.get("token")
        if not isinstance(bdf, str) or not isinstance(tok, str):
            raise PayloadError(errno.EINVAL, f"{HOT_RESET_CAPABILITY} needs bdf and token strings")
        try:
            raw = bytes.fromhex(tok)
        except ValueError:
            raw = b""
        if len(raw) != HOT_RESET_TOKEN_SIZE:
            raise PayloadError(errno.EINVAL, f"{HOT_RESET_CAPABILITY}.token is not {HOT_RESET_TOKEN_SIZE} bytes of hex")
        return cls(PciAddress.parse(bdf), raw)

    def to_capability(self) -> dict[str, str]:
        return {"bdf": str(self.address), "token": self.token.hex()}


@dataclass
class HotResetInfo:
    """X_KICKCALL_PCI_HOT_RESET_INFO (``struct vfio_pci_hot_reset_info``'s shape): the request is
    the 12-byte header (argsz, flags 0, count 0); the reply lists every function a hot reset of
    this function's bus would reset, this one included."""

    devices: list[PciAddress]
    flags: int = 0

    def encode(self) -> bytes:
        body = b"".join(_HR_DEV.pack(d.segment, d.bus, d.devfn, 0) for d in self.devices)
        return _HR_HDR.pack(_HR_HDR.size + len(body), self.flags, len(self.devices)) + body

    @classmethod
    def decode(cls, payload: bytes) -> "HotResetInfo":
        if len(payload) < _HR_HDR.size:
            raise PayloadError(errno.EINVAL, f"HOT_RESET_INFO of {len(payload)} bytes (12 at least)")
        argsz, flags, count = _HR_HDR.unpack_from(payload)
        if count > 256 or len(payload) != _HR_HDR.size + count * _HR_DEV.size or argsz != len(payload):
            raise PayloadError(errno.EINVAL, f"HOT_RESET_INFO: argsz {argsz}, count {count}, {len(payload)} bytes")
        devs = []
        for i in range(count):
            seg, bus, devfn, _ = _HR_DEV.unpack_from(payload, _HR_HDR.size + i * _HR_DEV.size)
            devs.append(PciAddress(seg, bus, devfn))
        return cls(devs, flags)

    @staticmethod
    def request() -> bytes:
        return _HR_HDR.pack(_HR_HDR.size, 0, 0)


@dataclass
class HotReset:
    """X_KICKCALL_PCI_HOT_RESET (``struct vfio_pci_hot_reset``'s shape): argsz, flags (must be
    0), count, then *count* 16-byte ownership tokens, one per function of the reset (the tokens
    the other endpoints gave this client in their VERSION replies; this connection's own may be
    left out).  The reply is empty; EPERM when a function of the set is not held by the sender."""

    tokens: list[bytes]
    flags: int = 0

    def encode(self) -> bytes:
        body = b"".join(self.tokens)
        return _HR_HDR.pack(_HR_HDR.size + len(body), self.flags, len(self.tokens)) + body

    @classmethod
    def decode(cls, payload: bytes) -> "HotReset":
        if len(payload) < _HR_HDR.size:
            raise PayloadError(errno.EINVAL, f"HOT_RESET of {len(payload)} bytes (12 at least)")
        argsz, flags, count = _HR_HDR.unpack_from(payload)
        if flags:
            raise PayloadError(errno.EINVAL, f"HOT_RESET flags {flags:#x} (must be 0)")
        if count > 256 or argsz != len(payload) or len(payload) != _HR_HDR.size + count * HOT_RESET_TOKEN_SIZE:
            raise PayloadError(errno.EINVAL, f"HOT_RESET: argsz {argsz}, count {count}, {len(payload)} bytes")
        toks = [payload[_HR_HDR.size + i * HOT_RESET_TOKEN_SIZE:_HR_HDR.size + (i + 1) * HOT_RESET_TOKEN_SIZE]
                for i in range(count)]
        return cls(toks, flags)
