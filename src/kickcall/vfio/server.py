"""The vfio-user server: a host PCI function, behind the host kernel's vfio-pci rules, served over a
Unix socket to one client (the VMM) at a time.

The server owns the socket (created mode 0600 through ``ownership.SocketClaim``), negotiates
VERSION and its capabilities, keeps the client's DMA map (mmap'ed when the client sends an fd,
reached through DMA_READ / DMA_WRITE messages when it does not), and hands every device command to
the host device (``VfioHostDevice``: the seam to ``kickcall.vfio.host``).

Threads (docs/threads.md): ``kc-vfu-accept`` accepts; ``kc-vfu-conn`` reads the client's
messages and runs each command to its reply (commands are processed in the order received, as
the specification says); the host function's own threads raise interrupts and do DMA through
``DmaMap``.  A DMA_READ / DMA_WRITE the server sends goes on the twin socket when the client
negotiated one, else on the main socket, where ``kc-vfu-conn`` routes its reply to the waiter --
so a DMA access while a client command is pending never deadlocks (the connection thread never
waits for a DMA reply itself).

Disconnect (the specification's rule): every DMA mapping is unmapped, every fd the client passed
is closed, the host's vectors are freed, and the device state is kept for a reconnecting client;
``reset_on_disconnect`` gives vfio-pci's release rule instead (the function is reset before the
next client gets it).

kickcall's hot reset extension (docs/vfio-user-hot-reset.md), when the server is given a
``HotResetHost`` (one function of a card; ``kickcall.vfio.host_aer.HotResetEndpoint``): a client
whose VERSION proposed ``kickcall.pci-hot-reset`` gets in the reply this function's address and a
fresh random 16-byte token for this connection; only such a connection may send
X_KICKCALL_PCI_HOT_RESET_INFO and X_KICKCALL_PCI_HOT_RESET -- for any other they are unknown
commands (EINVAL), and the capability is never advertised to a client that did not propose it.
"""

from __future__ import annotations

import errno
import logging
import mmap
import os
import secrets
import socket
import threading
import time
from dataclasses import dataclass
from typing import Any, Protocol

from .. import trace
from ..ownership import SocketClaim
from ..threads import start_thread
from .protocol import (
    HOT_RESET_CAPABILITY, Capabilities, DmaAccess, DmaMap, DmaMapFlag, DmaUnmap, DmaUnmapFlag, HotReset,
    HotResetInfo, HotResetOffer, Message, PciAddress,
    MessageReader, PayloadError, RegionAccess, Version, VFIO_USER_MAJOR, VFIO_USER_MINOR, VfioUserCommand,
    VfioUserError, VFIO_USER_F_TYPE_COMMAND, decode_dma_write_reply, send_message, MAX_MSG_FDS_LIMIT,
    DEFAULT_MAX_DATA_XFER_SIZE,
)
from .host import DmaSpace, VfioError
from .uapi import VfioDeviceInfo, VfioIrqInfo, VfioIrqSet, VfioIrqSetFlag, VfioRegionInfo, UapiError

__all__ = ["VfioHostDevice", "HotResetHost", "DmaMapTable", "VfioUserServer", "ServerStats",
           "DEFAULT_SERVER_MAX_MSG_FDS"]

log = logging.getLogger("kickcall.vfio.server")

_t_cmd = trace.event("vfio_user_server_command", "the vfio-user server ran a client command")
_t_dma = trace.event("vfio_user_server_dma", "the vfio-user server accessed client memory by message")

#: the fds the server takes with one message unless told otherwise (QEMU's client splits larger
#: SET_IRQS eventfd arrays into messages of at most this many)
DEFAULT_SERVER_MAX_MSG_FDS = 16
#: how long a DMA_READ / DMA_WRITE waits for the client's reply before it fails (EIO)
DMA_REPLY_TIMEOUT = 10.0


class VfioHostDevice(Protocol):
    """The host side a vfio-user server serves: the device ioctls of a vfio-pci device.

    Every method raises an exception with an ``errno`` attribute for a request it refuses; the
    server puts that errno in its error reply."""

    def get_device_info(self) -> VfioDeviceInfo: ...

    def get_region_info(self, index: int) -> tuple[VfioRegionInfo, int | None]: ...

    def region_read(self, index: int, offset: int, count: int) -> bytes: ...

    def region_write(self, index: int, offset: int, data: bytes) -> None: ...

    def get_irq_info(self, index: int) -> VfioIrqInfo: ...

    def set_irqs(self, irq_set: VfioIrqSet, fds: list[int]) -> None: ...

    def reset(self) -> None: ...

    def release(self, reset: bool) -> None: ...

    def set_dma(self, space: DmaSpace | None) -> None: ...


class HotResetHost(Protocol):
    """The host side of kickcall's hot reset for one function of a card."""

    address: PciAddress

    def devices(self) -> list[PciAddress]: ...

    def hot_reset(self, tokens: list[bytes], own_token: bytes) -> None: ...


@dataclass
class _Mapping:
    iova: int
    size: int
    flags: int
    mm: mmap.mmap | None  # None: reached through DMA_READ / DMA_WRITE messages

    def describe(self) -> dict:
        return {"iova": self.iova, "size": self.size, "readable": bool(self.flags & DmaMapFlag.READ),
                "writable": bool(self.flags & DmaMapFlag.WRITE), "mapped": self.mm is not None}


class DmaMapTable:
    """The client's DMA windows (``VFIO_USER_DMA_MAP``), non-overlapping, at most *max_maps*."""

    def __init__(self, max_maps: int = 65535) -> None:
        self.max_maps = max_maps
        self._maps: list[_Mapping] = []
        self._mu = threading.Lock()

    def add(self, m: DmaMap, fd: int | None) -> None:
        with self._mu:
            if len(self._maps) >= self.max_maps:
                raise PayloadError(errno.ENOSPC, f"more than {self.max_maps} DMA windows")
            for x in self._maps:
                if m.address < x.iova + x.size and x.iova < m.address + m.size:
                    raise PayloadError(errno.EEXIST, f"DMA window {m.address:#x}+{m.size:#x} overlaps {x.iova:#x}")
            mm = None
            if fd is not None:
                prot = (mmap.PROT_READ if m.flags & DmaMapFlag.READ else 0) | (
                    mmap.PROT_WRITE if m.flags & DmaMapFlag.WRITE else 0)
                if m.offset % mmap.PAGESIZE:
                    raise PayloadError(errno.EINVAL, f"DMA_MAP offset {m.offset:#x} is not page aligned")
                try:
                    mm = mmap.mmap(fd, m.size, mmap.MAP_SHARED, prot or mmap.PROT_READ, offset=m.offset)
                except (OSError, ValueError, OverflowError) as e:
                    raise PayloadError(errno.EINVAL, f"DMA_MAP: cannot map the fd: {e}") from None
            self._maps.append(_Mapping(m.address, m.size, m.flags, mm))

    def remove(self, u: DmaUnmap) -> None:
        with self._mu:
            if u.flags & DmaUnmapFlag.UNMAP_ALL:
                if u.address or u.size:
                    raise PayloadError(errno.EINVAL, "DMA_UNMAP with UNMAP_ALL takes address 0, size 0")
                self._clear_locked()
                return
            for i, x in enumerate(self._maps):
                if x.iova == u.address and x.size == u.size:
                    del self._maps[i]
                    if x.mm is not None:
                        x.mm.close()
                    return
            raise PayloadError(errno.EINVAL, f"DMA_UNMAP {u.address:#x}+{u.size:#x} matches no mapping")

    def clear(self) -> None:
        with self._mu:
            self._clear_locked()

    def _clear_locked(self) -> None:
        for x in self._maps:
            if x.mm is not None:
                x.mm.close()
        self._maps = []

    def find(self, iova: int, n: int, write: bool) -> tuple[_Mapping, int]:
        """The mapping that holds [iova, iova+n) and the offset in it; EFAULT otherwise."""
        with self._mu:
            return self._find_locked(iova, n, write)

    def _find_locked(self, iova: int, n: int, write: bool) -> tuple[_Mapping, int]:
        for x in self._maps:
            if x.iova <= iova and iova + n <= x.iova + x.size:
                if not x.flags & (DmaMapFlag.WRITE if write else DmaMapFlag.READ):
                    raise PayloadError(errno.EFAULT, f"DMA window {x.iova:#x} is not {'writable' if write else 'readable'}")
                return x, iova - x.iova
        raise PayloadError(errno.EFAULT, f"IOVA {iova:#x}+{n} is not in a DMA window")

    def copy_in_mapped(self, iova: int, data: bytes) -> bool:
        """Write *data* at *iova* if its window is mmapped (under the table's lock, so an unmap
        waits for an access in flight, as the specification asks); False for a window reached by
        messages."""
        with self._mu:
            x, off = self._find_locked(iova, len(data), True)
            if x.mm is None:
                return False
            x.mm[off:off + len(data)] = data
            return True

    def copy_out_mapped(self, iova: int, n: int) -> bytes | None:
        with self._mu:
            x, off = self._find_locked(iova, n, False)
            if x.mm is None:
                return None
            return bytes(x.mm[off:off + n])

    def describe(self) -> list[dict]:
        with self._mu:
            return [x.describe() for x in self._maps]

    def __len__(self) -> int:
        return len(self._maps)


@dataclass
class ServerStats:
    clients: int = 0
    commands: int = 0
    error_replies: int = 0
    framing_errors: int = 0
    unexpected_replies: int = 0
    dma_messages: int = 0
    dma_mapped_accesses: int = 0
    refused_clients: int = 0


class _Connection:
    """One client: its socket, negotiated capabilities, DMA map and pending server->client requests."""

    def __init__(self, server: "VfioUserServer", sock: socket.socket) -> None:
        self.server = server
        self.sock = sock
        self.send_mu = threading.Lock()
        self.caps = Capabilities()  # the client's (what it can receive) until VERSION says otherwise
        self.negotiated = False
        self.dma = DmaMapTable()
        self.twin: socket.socket | None = None
        self.twin_mu = threading.Lock()
        self._next_id = 0
        self._waiters: dict[int, list[Any]] = {}
        self._wait_mu = threading.Lock()
        self.closed = threading.Event()
        self.cmd_counts: dict[str, int] = {}
        self.hot_reset_token: bytes | None = None  # set when the extension was negotiated
        self.reader = MessageReader(max_data_xfer_size=server.max_data_xfer_size, max_fds=server.max_msg_fds)

    # -- DmaSpace --------------------------------------------------------------------------------------
    def dma_write(self, iova: int, data: bytes) -> None:
        try:
            if self.dma.copy_in_mapped(iova, data):
                self.server.stats.dma_mapped_accesses += 1
                return
        except PayloadError as e:
            raise VfioError(e.errno, str(e)) from None
        step = max(1, self.caps.max_data_xfer_size)
        for pos in range(0, len(data), step):
            chunk = data[pos:pos + step]
            rep = self._request(VfioUserCommand.DMA_WRITE, DmaAccess(iova + pos, len(chunk), chunk).encode())
            try:
                decode_dma_write_reply(rep.payload)
            except PayloadError as e:
                raise VfioError(errno.EIO, f"DMA_WRITE reply: {e}") from None

    def dma_read(self, iova: int, n: int) -> bytes:
        try:
            got = self.dma.copy_out_mapped(iova, n)
        except PayloadError as e:
            raise VfioError(e.errno, str(e)) from None
        if got is not None:
            self.server.stats.dma_mapped_accesses += 1
            return got
        out = bytearray()
        step = max(1, self.caps.max_data_xfer_size)
        for pos in range(0, n, step):
            cnt = min(step, n - pos)
            rep = self._request(VfioUserCommand.DMA_READ, DmaAccess(iova + pos, cnt).encode())
            try:
                acc = DmaAccess.decode(rep.payload, with_data=True)
            except PayloadError as e:
                raise VfioError(errno.EIO, f"DMA_READ reply: {e}") from None
            if acc.count != cnt:
                raise VfioError(errno.EIO, f"DMA_READ reply carries {acc.count} bytes, asked {cnt}")
            out += acc.data
        return bytes(out)

    def _request(self, cmd: VfioUserCommand, payload: bytes) -> Message:
        """Send a server->client command and wait for its reply (twin socket if negotiated)."""
        if self.closed.is_set():
            raise VfioError(errno.ENODEV, "the client is gone")
        self.server.stats.dma_messages += 1
        if _t_dma.enabled:
            _t_dma.emit(command=cmd.name, size=len(payload))
        if self.twin is not None:
            with self.twin_mu:
                mid = self._alloc_id()
                try:
                    send_message(self.twin, Message(mid, cmd, VFIO_USER_F_TYPE_COMMAND, 0, payload))
                    self.twin.settimeout(DMA_REPLY_TIMEOUT)
                    rep = MessageReader().feed(self.twin)
                except (OSError, EOFError, VfioUserError) as e:
                    raise VfioError(errno.EIO, f"{cmd.name} on the twin socket: {e}") from None
                if rep is None or not rep.is_reply or rep.msg_id != mid or rep.command != cmd:
                    raise VfioError(errno.EIO, f"{cmd.name}: no matching reply on the twin socket")
                rep.close_fds()
                if rep.is_error:
                    raise VfioError(rep.error or errno.EIO, f"{cmd.name}: the client answered errno {rep.error}")
                return rep
        slot: list[Any] = [threading.Event(), None]
        with self._wait_mu:
            mid = self._alloc_id()
            self._waiters[mid] = slot
        try:
            self.send(Message(mid, cmd, VFIO_USER_F_TYPE_COMMAND, 0, payload))
            if not slot[0].wait(DMA_REPLY_TIMEOUT) or slot[1] is None:
                raise VfioError(errno.EIO, f"{cmd.name}: no reply from the client")
        finally:
            with self._wait_mu:
                self._waiters.pop(mid, None)
        rep = slot[1]
        if rep.is_error:
            raise VfioError(rep.error or errno.EIO, f"{cmd.name}: the client answered errno {rep.error}")
        return rep

    def _alloc_id(self) -> int:
        self._next_id = (self._next_id + 1) & 0xFFFF
        return self._next_id

    def deliver_reply(self, msg: Message) -> bool:
        msg.close_fds()
        with self._wait_mu:
            slot = self._waiters.get(msg.msg_id)
        if slot is None or msg.command not in (VfioUserCommand.DMA_READ, VfioUserCommand.DMA_WRITE):
            return False
        slot[1] = msg
        slot[0].set()
        return True

    def send(self, msg: Message) -> None:
        with self.send_mu:
            send_message(self.sock, msg)

    def close(self) -> None:
        self.closed.set()
        with self._wait_mu:
            for slot in self._waiters.values():
                slot[0].set()
        self.reader.close()
        self.dma.clear()
        if self.twin is not None:
            self.twin.close()
        try:
            self.sock.close()
        except OSError:
            pass


def _errno_of(e: BaseException) -> int | None:
    v = getattr(e, "errno", None)
    return v if isinstance(v, int) and v > 0 else None


class VfioUserServer:
    """Serve *device* on the Unix socket *path* (claimed: a live socket or a file that is not
    kickcall's is refused), one client at a time."""

    def __init__(self, path: str, device: VfioHostDevice, *, reset_on_disconnect: bool = False,
                 max_msg_fds: int = DEFAULT_SERVER_MAX_MSG_FDS,
                 max_data_xfer_size: int = DEFAULT_MAX_DATA_XFER_SIZE, offer_twin_socket: bool = True,
                 claim: SocketClaim | None = None, hot_reset: HotResetHost | None = None) -> None:
        if not 1 <= max_msg_fds <= MAX_MSG_FDS_LIMIT:
            raise ValueError(f"max_msg_fds must be 1..{MAX_MSG_FDS_LIMIT}")
        self.path = path
        self.device = device
        self.reset_on_disconnect = reset_on_disconnect
        self.max_msg_fds = max_msg_fds
        self.max_data_xfer_size = max_data_xfer_size
        self.offer_twin_socket = offer_twin_socket
        self.hot_reset = hot_reset
        self.stats = ServerStats()
        self._claim = claim if claim is not None else SocketClaim(path)
        self._own_claim = claim is None
        self._listener: socket.socket | None = None
        self._conn: _Connection | None = None
        self._conn_thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._mu = threading.Lock()
        self._accept_thread: threading.Thread | None = None
        self.connected = threading.Event()
        self.client_gone = threading.Event()
        self.last_disconnect: dict | None = None

    # -- life cycle -----------------------------------------------------------------------------------
    def start(self) -> "VfioUserServer":
        self._listener = self._claim.bind(backlog=4)
        self._listener.setblocking(True)
        self._listener.settimeout(0.2)
        self._accept_thread = start_thread(self._accept_loop, "kc-vfu-accept")
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._accept_thread is not None:
            self._accept_thread.join(10)
        conn = self._conn
        if conn is not None:
            try:
                conn.sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        if self._conn_thread is not None:
            self._conn_thread.join(10)
        if self._listener is not None:
            self._listener.close()
        if self._own_claim:
            self._claim.release()

    def _accept_loop(self) -> None:
        assert self._listener is not None
        while not self._stop.is_set():
            try:
                sock, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError as e:
                if self._stop.is_set():
                    return
                log.warning("vfio-user accept: %s", e)
                time.sleep(0.5)
                continue
            with self._mu:
                cur = self._conn
            if cur is not None and _hung_up(cur.sock):
                # the previous client has closed and is being cleaned up: the new one waits for that
                # (a client that closes and reconnects at once is not refused)
                self.client_gone.wait(10)
            with self._mu:
                busy = self._conn is not None
            if busy:
                # one client per connection and one connection at a time (the specification's
                # socket model): a second client is told by a closed socket, not left hanging
                self.stats.refused_clients += 1
                log.warning("vfio-user: a second client connected while one is served; closing it")
                sock.close()
                continue
            sock.setblocking(True)
            conn = _Connection(self, sock)
            with self._mu:
                self._conn = conn
            self.stats.clients += 1
            self.client_gone.clear()
            self.connected.set()
            self._conn_thread = start_thread(self._serve, "kc-vfu-conn", args=(conn,))

    # -- one client -----------------------------------------------------------------------------------
    def _serve(self, conn: _Connection) -> None:
        why = "closed"
        try:
            while not self._stop.is_set():
                try:
                    msg = conn.reader.feed(conn.sock)
                except EOFError:
                    break
                except VfioUserError as e:
                    self.stats.framing_errors += 1
                    why = f"{e.kind}: {e}"
                    log.warning("vfio-user client: %s; closing the connection", e)
                    break
                except OSError as e:
                    why = f"socket error: {e}"
                    break
                if msg is None:
                    continue
                if msg.is_reply:
                    if not conn.deliver_reply(msg):
                        self.stats.unexpected_replies += 1
                        log.warning("vfio-user client sent a reply (id %d, %s) to nothing outstanding",
                                    msg.msg_id, msg.command_name())
                    continue
                self._dispatch(conn, msg)
        finally:
            conn.close()
            self.device.set_dma(None)
            try:
                self.device.release(self.reset_on_disconnect)
            except Exception as e:  # noqa: BLE001 -- the next client must still be served
                log.error("vfio-user: releasing the device after the client left: %s", e)
            self.last_disconnect = {"reason": why, "reset": self.reset_on_disconnect, "time": time.time()}
            with self._mu:
                self._conn = None
            self.connected.clear()
            self.client_gone.set()

    def _dispatch(self, conn: _Connection, msg: Message) -> None:
        self.stats.commands += 1
        name = msg.command_name()
        conn.cmd_counts[name] = conn.cmd_counts.get(name, 0) + 1
        if _t_cmd.enabled:
            _t_cmd.emit(id=msg.msg_id, command=name, size=len(msg.payload), fds=len(msg.fds))
        try:
            payload, fds = self._run(conn, msg)
            reply = msg.reply(payload, fds)
        except Exception as e:  # noqa: BLE001 -- a refused command is an error reply, never a crash
            err = _errno_of(e)
            if err is None:
                if not isinstance(e, (UapiError, ValueError)):
                    log.exception("vfio-user: %s failed", name)
                err = errno.EINVAL
            else:
                log.debug("vfio-user: %s refused: %s", name, e)
            self.stats.error_replies += 1
            reply = msg.error_reply(err)
        finally:
            msg.close_fds()
        if msg.no_reply and not reply.is_error:
            for fd in reply.fds:
                os.close(fd)
            return
        try:
            conn.send(reply)
        except OSError as e:
            log.info("vfio-user: reply to %s not sent: %s", name, e)
        finally:
            # a reply's fds are the server's copies (a region's fd dup, the twin socket's client
            # end): the client has its own once the reply is sent
            reply.close_fds()

    def _run(self, conn: _Connection, msg: Message) -> tuple[bytes, list[int]]:
        cmd = msg.command
        if cmd == VfioUserCommand.VERSION:
            return self._version(conn, msg)
        if not conn.negotiated:
            raise PayloadError(errno.EINVAL, f"{msg.command_name()} before VERSION")
        if cmd != VfioUserCommand.DEVICE_SET_IRQS and cmd != VfioUserCommand.DMA_MAP and msg.fds:
            raise PayloadError(errno.EINVAL, f"{msg.command_name()} carries {len(msg.fds)} fds")
        if cmd == VfioUserCommand.DMA_MAP:
            m = DmaMap.decode(msg.payload)
            if len(msg.fds) > 1:
                raise PayloadError(errno.EINVAL, f"DMA_MAP carries {len(msg.fds)} fds")
            conn.dma.add(m, msg.fds[0] if msg.fds else None)
            self.device.set_dma(conn)
            return b"", []
        if cmd == VfioUserCommand.DMA_UNMAP:
            u = DmaUnmap.decode(msg.payload)
            conn.dma.remove(u)
            return msg.payload[:DmaUnmap.STRUCT.size], []
        if cmd == VfioUserCommand.DEVICE_GET_INFO:
            argsz = _argsz(msg.payload, VfioDeviceInfo.STRUCT.size, "DEVICE_GET_INFO")
            info = self.device.get_device_info()
            return info.pack()[:max(argsz, VfioDeviceInfo.STRUCT.size)], []
        if cmd == VfioUserCommand.DEVICE_GET_REGION_INFO:
            argsz = _argsz(msg.payload, VfioRegionInfo.STRUCT.size, "DEVICE_GET_REGION_INFO")
            req = VfioRegionInfo.unpack(msg.payload)
            rinfo, fd = self.device.get_region_info(req.index)
            return rinfo.pack(max_size=argsz), ([os.dup(fd)] if fd is not None else [])
        if cmd == VfioUserCommand.DEVICE_GET_IRQ_INFO:
            _argsz(msg.payload, VfioIrqInfo.STRUCT.size, "DEVICE_GET_IRQ_INFO")
            return self.device.get_irq_info(VfioIrqInfo.unpack(msg.payload).index).pack(), []
        if cmd == VfioUserCommand.DEVICE_SET_IRQS:
            irq = VfioIrqSet.unpack(msg.payload)
            if irq.argsz != len(msg.payload):
                raise PayloadError(errno.EINVAL, f"SET_IRQS argsz {irq.argsz} but the payload is {len(msg.payload)} bytes")
            if msg.fds and not irq.flags & VfioIrqSetFlag.DATA_EVENTFD:
                raise PayloadError(errno.EINVAL, "SET_IRQS carries fds without DATA_EVENTFD")
            self.device.set_irqs(irq, list(msg.fds))
            return b"", []
        if cmd == VfioUserCommand.REGION_READ:
            ra = RegionAccess.decode(msg.payload, with_data=False)
            self._check_xfer(ra.count)
            data = self.device.region_read(ra.region, ra.offset, ra.count)
            return RegionAccess(ra.offset, ra.region, len(data), data).encode(), []
        if cmd == VfioUserCommand.REGION_WRITE:
            ra = RegionAccess.decode(msg.payload, with_data=True)
            self._check_xfer(ra.count)
            self.device.region_write(ra.region, ra.offset, ra.data)
            return RegionAccess(ra.offset, ra.region, ra.count).encode(), []
        if cmd == VfioUserCommand.DEVICE_RESET:
            if msg.payload:
                raise PayloadError(errno.EINVAL, "DEVICE_RESET carries a payload")
            self.device.reset()
            return b"", []
        if cmd in (VfioUserCommand.X_KICKCALL_PCI_HOT_RESET_INFO, VfioUserCommand.X_KICKCALL_PCI_HOT_RESET) \
                and self.hot_reset is not None and conn.hot_reset_token is not None:
            return self._hot_reset_command(conn, msg), []
        if cmd in (VfioUserCommand.DMA_READ, VfioUserCommand.DMA_WRITE):
            raise PayloadError(errno.EINVAL, f"{msg.command_name()} goes from server to client")
        if cmd in (VfioUserCommand.DEVICE_GET_REGION_IO_FDS, VfioUserCommand.REGION_WRITE_MULTI,
                   VfioUserCommand.DEVICE_FEATURE, VfioUserCommand.MIG_DATA_READ, VfioUserCommand.MIG_DATA_WRITE):
            raise PayloadError(errno.ENOTSUP, f"{msg.command_name()} is not supported by this server")
        raise PayloadError(errno.EINVAL, f"unknown command {cmd}")

    def _hot_reset_command(self, conn: _Connection, msg: Message) -> bytes:
        assert self.hot_reset is not None and conn.hot_reset_token is not None
        if msg.command == VfioUserCommand.X_KICKCALL_PCI_HOT_RESET_INFO:
            req = HotResetInfo.decode(msg.payload)
            if req.flags or req.devices:
                raise PayloadError(errno.EINVAL, "HOT_RESET_INFO request: flags 0, count 0")
            return HotResetInfo(self.hot_reset.devices()).encode()
        hr = HotReset.decode(msg.payload)
        self.hot_reset.hot_reset(hr.tokens, conn.hot_reset_token)
        return b""

    def hot_reset_token(self) -> bytes | None:
        """The token of the client holding this function now, if it negotiated the hot reset
        extension (None: no client, or one that did not)."""
        with self._mu:
            conn = self._conn
        if conn is None or conn.closed.is_set():
            return None
        return conn.hot_reset_token

    def _check_xfer(self, count: int) -> None:
        if count > self.max_data_xfer_size:
            raise PayloadError(errno.EINVAL, f"count {count} exceeds max_data_xfer_size {self.max_data_xfer_size}")

    def _version(self, conn: _Connection, msg: Message) -> tuple[bytes, list[int]]:
        if conn.negotiated:
            raise PayloadError(errno.EINVAL, "VERSION sent twice")
        v = Version.decode(msg.payload)
        if v.major != VFIO_USER_MAJOR:
            raise PayloadError(errno.ENOTSUP, f"protocol major {v.major} (this server speaks {VFIO_USER_MAJOR})")
        conn.caps = v.caps  # what the client can receive
        ours = Capabilities(max_msg_fds=self.max_msg_fds, max_data_xfer_size=self.max_data_xfer_size,
                            max_dma_maps=conn.dma.max_maps)
        fds: list[int] = []
        if v.caps.twin_socket and self.offer_twin_socket:
            mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
            conn.twin = mine
            fds = [theirs.detach()]
            ours.twin_socket, ours.twin_fd_index = True, 0
        if self.hot_reset is not None and HOT_RESET_CAPABILITY in v.caps.proposed:
            conn.hot_reset_token = secrets.token_bytes(16)
            ours.extensions[HOT_RESET_CAPABILITY] = HotResetOffer(self.hot_reset.address,
                                                                  conn.hot_reset_token).to_capability()
        conn.negotiated = True
        minor = min(v.minor, VFIO_USER_MINOR)
        # the reply's capabilities are a subset of those proposed (the specification's rule): a
        # capability the client did not name takes its default on the client's side
        return Version(VFIO_USER_MAJOR, minor, ours).encode(only=v.caps.proposed), fds

    # -- what the monitor shows -------------------------------------------------------------------------
    def describe(self) -> dict:
        conn = self._conn
        out: dict[str, Any] = {
            "socket": self.path, "connected": conn is not None, "reset-on-disconnect": self.reset_on_disconnect,
            "max-msg-fds": self.max_msg_fds, "max-data-xfer-size": self.max_data_xfer_size,
            "stats": dict(self.stats.__dict__), "last-disconnect": self.last_disconnect,
        }
        if conn is not None:
            out["client"] = {
                "negotiated": conn.negotiated, "max-msg-fds": conn.caps.max_msg_fds,
                "max-data-xfer-size": conn.caps.max_data_xfer_size, "twin-socket": conn.twin is not None,
                "dma": conn.dma.describe(), "commands": dict(conn.cmd_counts),
                "hot-reset": conn.hot_reset_token is not None,
            }
        return out


def _hung_up(sock: socket.socket) -> bool:
    """The peer has closed its end (POLLRDHUP/POLLHUP), or the socket is gone."""
    import select

    try:
        p = select.poll()
        p.register(sock, select.POLLRDHUP)
        return any(ev & (select.POLLRDHUP | select.POLLHUP | select.POLLERR | select.POLLNVAL) for _fd, ev in p.poll(0))
    except (OSError, ValueError):
        return True


def _argsz(payload: bytes, minsz: int, what: str) -> int:
    if len(payload) < 4:
        raise PayloadError(errno.EINVAL, f"{what}: no argsz")
    argsz = int.from_bytes(payload[:4], "little")
    if argsz < minsz:
        raise PayloadError(errno.EINVAL, f"{what}: argsz {argsz} is below {minsz}")
    return argsz
