"""The vfio-user client: the VMM's end of a passthrough device's socket.

``VfioUserClient`` negotiates VERSION (offering a twin socket), then sends the device commands and
waits for each reply by message id.  Server-to-client commands (DMA_READ / DMA_WRITE, for DMA
windows mapped without an fd) are served from a ``ClientMemory`` while a command waits, on the
main socket or on the twin socket -- a reader thread does it, so a server that needs DMA to
finish a command never deadlocks with a client waiting for that command's reply.

``set_irqs`` splits an eventfd array as QEMU's vfio-user client does: at most the server's
``max_msg_fds`` fds per message, and a message carries either only valid fds or only "no fd"
(-1) entries, which it sends as no fds at all (the specification's de-assign).
"""

from __future__ import annotations

import errno
import logging
import os
import socket
import threading
from typing import Protocol, Sequence

from .. import trace
from ..threads import start_thread
from .protocol import (
    DMA_WRITE_REPLY, Capabilities, DmaAccess, DmaMap, DmaMapFlag, DmaUnmap, Message, MessageReader, PayloadError,
    RegionAccess, Version, VfioUserCommand, VfioUserError, VfioUserErrorKind, VFIO_USER_F_TYPE_COMMAND,
    send_message, MAX_MSG_FDS_LIMIT, HOT_RESET_CAPABILITY, HotReset, HotResetInfo, HotResetOffer, PciAddress,
)
from .uapi import UapiError, VfioDeviceInfo, VfioIrqInfo, VfioIrqSet, VfioIrqSetFlag, VfioRegionInfo

__all__ = ["VfioUserClient", "VfioRequestError", "ClientMemory", "split_eventfds"]

log = logging.getLogger("kickcall.vfio.client")

_t_set_irqs = trace.event("vfio_user_set_irqs", "the client sent SET_IRQS (index, start, count, flags)")

REPLY_TIMEOUT = 30.0


class VfioRequestError(Exception):
    """The server answered a command with an error (``errno``), or never answered."""

    def __init__(self, command: str, err: int, msg: str = "") -> None:
        super().__init__(msg or f"{command}: {os.strerror(err)} (errno {err})")
        self.command = command
        self.errno = err


class ClientMemory(Protocol):
    """The client memory a server reaches by DMA_READ / DMA_WRITE (IOVA = guest-physical address)."""

    def read(self, addr: int, n: int) -> bytes: ...

    def write(self, addr: int, data: bytes) -> None: ...


def split_eventfds(fds: Sequence[int], max_fds: int) -> list[tuple[int, list[int]]]:
    """Split a SET_IRQS eventfd array as QEMU's vfio-user client does: (offset, fds) pieces of
    at most *max_fds* entries, each all valid fds or all -1 (a -1 piece is sent with no fds)."""
    out: list[tuple[int, list[int]]] = []
    i = 0
    while i < len(fds):
        valid = fds[i] != -1
        n = 1
        while n < max_fds and i + n < len(fds) and (fds[i + n] != -1) == valid:
            n += 1
        out.append((i, list(fds[i:i + n]) if valid else [-1] * n))
        i += n
    return out


class VfioUserClient:
    """A connected, negotiated vfio-user client.  Thread-safe: commands may be sent from several
    threads; each waits for its own reply."""

    def __init__(self, path: str, *, memory: ClientMemory | None = None, twin_socket: bool = True,
                 max_msg_fds: int = MAX_MSG_FDS_LIMIT, timeout: float = 30.0, name: str = "vfio-user",
                 propose_hot_reset: bool = True) -> None:
        self.path = path
        self.propose_hot_reset = propose_hot_reset
        """Propose kickcall's hot reset extension in VERSION (False: a client that does not know it)."""
        self.name = name
        self.memory = memory
        self.timeout = timeout
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        try:
            self.sock.connect(path)
        except OSError:
            self.sock.close()
            raise
        self.sock.settimeout(None)
        self._send_mu = threading.Lock()
        self._wait_mu = threading.Lock()
        self._waiters: dict[int, list] = {}
        self._next_id = 0
        self.closed = threading.Event()
        self.twin: socket.socket | None = None
        self.server_caps = Capabilities()
        self.stats: dict[str, int] = {"set-irqs-messages": 0, "dma-read": 0, "dma-write": 0, "errors": 0}
        self._reader = MessageReader(max_fds=MAX_MSG_FDS_LIMIT)
        self._threads: list[threading.Thread] = []
        try:
            self._negotiate(twin_socket, max_msg_fds)
        except BaseException:
            self.close()
            raise
        self._threads.append(start_thread(self._read_loop, "kc-vfu-client"))
        if self.twin is not None:
            self._threads.append(start_thread(self._twin_loop, "kc-vfu-twin"))

    # -- negotiation ------------------------------------------------------------------------------------
    def _negotiate(self, twin_socket: bool, max_msg_fds: int) -> None:
        ours = Capabilities(max_msg_fds=max_msg_fds, twin_socket=twin_socket,
                            extensions={HOT_RESET_CAPABILITY: {}} if self.propose_hot_reset else {})
        msg = Message(self._alloc_id(), VfioUserCommand.VERSION, VFIO_USER_F_TYPE_COMMAND, 0, Version(caps=ours).encode())
        send_message(self.sock, msg)
        self.sock.settimeout(self.timeout)
        try:
            rep = self._reader.feed(self.sock)
        finally:
            self.sock.settimeout(None)
        if rep is None or not rep.is_reply or rep.msg_id != msg.msg_id or rep.command != VfioUserCommand.VERSION:
            raise VfioUserError(VfioUserErrorKind.UNEXPECTED_REPLY, "no VERSION reply")
        if rep.is_error:
            rep.close_fds()
            raise VfioRequestError("VERSION", rep.error or errno.EIO)
        try:
            v = Version.decode(rep.payload)
        except PayloadError as e:
            rep.close_fds()
            raise VfioUserError(VfioUserErrorKind.BAD_VERSION, f"VERSION reply: {e}") from None
        self.server_caps = v.caps
        self.version = (v.major, v.minor)
        fds = rep.take_fds()
        if twin_socket and v.caps.twin_socket:
            idx = v.caps.twin_fd_index
            if idx is None or idx >= len(fds):  # the specification: inconsistent -- abort
                for fd in fds:
                    os.close(fd)
                raise VfioUserError(VfioUserErrorKind.BAD_VERSION, "twin_socket.supported without a valid fd_index")
            self.twin = socket.socket(fileno=fds.pop(idx))
        for fd in fds:
            os.close(fd)

    # -- sending and waiting ----------------------------------------------------------------------------
    def _alloc_id(self) -> int:
        self._next_id = (self._next_id + 1) & 0xFFFF
        return self._next_id

    def request(self, cmd: VfioUserCommand, payload: bytes = b"", fds: Sequence[int] = ()) -> Message:
        """Send a command and wait for its reply; VfioRequestError on an error reply."""
        if self.closed.is_set():
            raise VfioRequestError(cmd.name, errno.ENOTCONN, f"{cmd.name}: the connection is closed")
        slot: list = [threading.Event(), None]
        with self._wait_mu:
            mid = self._alloc_id()
            self._waiters[mid] = slot
        try:
            with self._send_mu:
                send_message(self.sock, Message(mid, cmd, VFIO_USER_F_TYPE_COMMAND, 0, payload, list(fds)))
            if not slot[0].wait(REPLY_TIMEOUT):
                raise VfioRequestError(cmd.name, errno.ETIMEDOUT, f"{cmd.name}: no reply in {REPLY_TIMEOUT:.0f} s")
        except OSError as e:
            raise VfioRequestError(cmd.name, errno.EPIPE, f"{cmd.name}: {e}") from None
        finally:
            with self._wait_mu:
                self._waiters.pop(mid, None)
        rep: Message | None = slot[1]
        if rep is None:
            raise VfioRequestError(cmd.name, errno.ENOTCONN, f"{cmd.name}: the server went away")
        if rep.command != cmd:
            rep.close_fds()
            raise VfioRequestError(cmd.name, errno.EPROTO, f"{cmd.name}: the reply is for command {rep.command}")
        if rep.is_error:
            self.stats["errors"] += 1
            rep.close_fds()
            raise VfioRequestError(cmd.name, rep.error or errno.EIO)
        return rep

    def _read_loop(self) -> None:
        try:
            while not self.closed.is_set():
                msg = self._reader.feed(self.sock)
                if msg is None:
                    continue
                if msg.is_reply:
                    with self._wait_mu:
                        slot = self._waiters.get(msg.msg_id)
                    if slot is None:
                        log.warning("%s: a reply to nothing outstanding (id %d)", self.name, msg.msg_id)
                        msg.close_fds()
                        continue
                    slot[1] = msg
                    slot[0].set()
                else:
                    self._serve_command(self.sock, msg, self._send_mu)
        except (EOFError, OSError, VfioUserError) as e:
            if not self.closed.is_set():
                log.warning("%s: the server connection ended: %s", self.name, e)
        finally:
            self.closed.set()
            with self._wait_mu:
                for slot in self._waiters.values():
                    slot[0].set()

    def _twin_loop(self) -> None:
        assert self.twin is not None
        reader = MessageReader()
        mu = threading.Lock()
        try:
            while not self.closed.is_set():
                msg = reader.feed(self.twin)
                if msg is not None and not msg.is_reply:
                    self._serve_command(self.twin, msg, mu)
                elif msg is not None:
                    msg.close_fds()
        except (EOFError, OSError, VfioUserError):
            pass

    def _serve_command(self, sock: socket.socket, msg: Message, mu: threading.Lock) -> None:
        """A server-to-client command: DMA_READ / DMA_WRITE from ``memory``."""
        msg.close_fds()
        try:
            if self.memory is None:
                raise PayloadError(errno.EFAULT, "no client memory is shared")
            if msg.command == VfioUserCommand.DMA_READ:
                acc = DmaAccess.decode(msg.payload, with_data=False)
                if acc.count > self.server_caps.max_data_xfer_size and acc.count > (1 << 20):
                    raise PayloadError(errno.EINVAL, f"DMA_READ of {acc.count} bytes")
                data = self.memory.read(acc.address, acc.count)
                self.stats["dma-read"] += 1
                rep = msg.reply(DmaAccess(acc.address, len(data), data).encode())
            elif msg.command == VfioUserCommand.DMA_WRITE:
                acc = DmaAccess.decode(msg.payload, with_data=True)
                self.memory.write(acc.address, acc.data)
                self.stats["dma-write"] += 1
                rep = msg.reply(DMA_WRITE_REPLY.pack(acc.address, acc.count))
            else:
                raise PayloadError(errno.EINVAL, f"server sent {msg.command_name()}")
        except PayloadError as e:
            rep = msg.error_reply(e.errno)
        except Exception as e:  # noqa: BLE001 -- guest memory refused the access
            log.debug("%s: %s failed: %s", self.name, msg.command_name(), e)
            rep = msg.error_reply(errno.EFAULT)
        if msg.no_reply and not rep.is_error:
            return
        try:
            with mu:
                send_message(sock, rep)
        except OSError:
            pass

    def close(self) -> None:
        self.closed.set()
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        if self.twin is not None:
            try:
                self.twin.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        for t in self._threads:
            t.join(5)
        self._reader.close()
        self.sock.close()
        if self.twin is not None:
            self.twin.close()

    # -- the device commands ----------------------------------------------------------------------------
    def dma_map(self, iova: int, size: int, fd: int | None = None, offset: int = 0,
                flags: int = DmaMapFlag.READ | DmaMapFlag.WRITE) -> None:
        self.request(VfioUserCommand.DMA_MAP, DmaMap(32, flags, offset if fd is not None else 0, iova, size).encode(),
                     [fd] if fd is not None else [])

    def dma_unmap(self, iova: int, size: int, flags: int = 0) -> None:
        self.request(VfioUserCommand.DMA_UNMAP, DmaUnmap(24, flags, iova, size).encode())

    def get_device_info(self) -> VfioDeviceInfo:
        rep = self.request(VfioUserCommand.DEVICE_GET_INFO, VfioDeviceInfo().pack())
        return VfioDeviceInfo.unpack(rep.payload)

    def get_region_info(self, index: int) -> tuple[VfioRegionInfo, int | None]:
        """The region's info (capability chain decoded) and its fd when it is mmappable (owned by
        the caller)."""
        argsz = VfioRegionInfo.STRUCT.size
        for _ in range(2):
            req = VfioRegionInfo.STRUCT.pack(argsz, 0, index, 0, 0, 0)  # argsz: the reply size we take
            rep = self.request(VfioUserCommand.DEVICE_GET_REGION_INFO, req)
            fds = rep.take_fds()
            try:
                info = VfioRegionInfo.unpack(rep.payload)
            except UapiError as e:  # a server's reply that does not decode: its capability chain, its size
                for fd in fds:
                    os.close(fd)
                raise VfioRequestError("DEVICE_GET_REGION_INFO", errno.EPROTO, f"region {index}: {e}") from None
            if info.argsz > argsz and len(rep.payload) < info.argsz:
                for fd in fds:
                    os.close(fd)
                argsz = min(info.argsz, 1 << 16)
                continue
            for fd in fds[1:]:
                os.close(fd)
            return info, (fds[0] if fds else None)
        raise VfioRequestError("DEVICE_GET_REGION_INFO", errno.EPROTO, f"region {index}: the info kept growing")

    def get_irq_info(self, index: int) -> VfioIrqInfo:
        rep = self.request(VfioUserCommand.DEVICE_GET_IRQ_INFO, VfioIrqInfo(index=index).pack())
        return VfioIrqInfo.unpack(rep.payload)

    def set_irqs(self, index: int, flags: int, start: int, count: int, *, fds: Sequence[int] | None = None,
                 bools: bytes | None = None) -> int:
        """SET_IRQS.  *fds* (DATA_EVENTFD): one entry per sub-index, -1 for none, split across
        messages by the server's ``max_msg_fds``.  Returns the number of messages sent."""
        if flags & VfioIrqSetFlag.DATA_EVENTFD and fds is not None:
            if len(fds) != count:
                raise ValueError("one fd (or -1) per sub-index")
            n = 0
            for off, piece in split_eventfds(fds, max(1, self.server_caps.max_msg_fds)):
                send = [fd for fd in piece if fd != -1]
                self._send_irq_set(VfioIrqSet(20, flags, index, start + off, len(piece)), send)
                n += 1
            if not fds:  # count 0 with EVENTFD: one message, as the ioctl would be one call
                self._send_irq_set(VfioIrqSet(20, flags, index, start, 0), [])
                n = 1
            return n
        data = bools or b""
        self._send_irq_set(VfioIrqSet(20 + len(data), flags, index, start, count, data), [])
        return 1

    def _send_irq_set(self, irq: VfioIrqSet, fds: list[int]) -> None:
        if _t_set_irqs.enabled:
            _t_set_irqs.emit(index=irq.index, start=irq.start, count=irq.count, flags=irq.flags, fds=len(fds))
        self.stats["set-irqs-messages"] += 1
        self.request(VfioUserCommand.DEVICE_SET_IRQS, irq.pack(), fds)

    def region_read(self, region: int, offset: int, count: int) -> bytes:
        rep = self.request(VfioUserCommand.REGION_READ, RegionAccess(offset, region, count).encode())
        acc = RegionAccess.decode(rep.payload, with_data=True)
        if acc.count != count:
            raise VfioRequestError("REGION_READ", errno.EIO, f"REGION_READ returned {acc.count} of {count} bytes")
        return acc.data

    def region_write(self, region: int, offset: int, data: bytes) -> None:
        self.request(VfioUserCommand.REGION_WRITE, RegionAccess(offset, region, len(data), data).encode())

    def reset(self) -> None:
        self.request(VfioUserCommand.DEVICE_RESET)

    # -- kickcall's hot reset extension ---------------------------------------------------------------------
    @property
    def hot_reset_offer(self) -> HotResetOffer | None:
        """This function's address and ownership token, when the server announced the extension
        (None: a server that does not know it -- it is never sent the extension's commands)."""
        v = self.server_caps.extensions.get(HOT_RESET_CAPABILITY)
        if v is None:
            return None
        try:
            return HotResetOffer.from_capability(v)
        except PayloadError:
            return None

    def _need_hot_reset(self, what: str) -> None:
        if self.hot_reset_offer is None:
            raise VfioRequestError(what, errno.ENOTSUP, f"{what}: the server did not announce {HOT_RESET_CAPABILITY}")

    def hot_reset_info(self) -> list[PciAddress]:
        """The functions a hot reset through this endpoint resets (this one included)."""
        self._need_hot_reset("X_KICKCALL_PCI_HOT_RESET_INFO")
        rep = self.request(VfioUserCommand.X_KICKCALL_PCI_HOT_RESET_INFO, HotResetInfo.request())
        try:
            return HotResetInfo.decode(rep.payload).devices
        except PayloadError as e:
            raise VfioRequestError("X_KICKCALL_PCI_HOT_RESET_INFO", errno.EPROTO, str(e)) from None

    def hot_reset(self, tokens: Sequence[bytes]) -> None:
        """Reset the bus of this function; *tokens*: the ownership tokens of every function of the
        set (``hot_reset_offer.token`` of each endpoint this client holds)."""
        self._need_hot_reset("X_KICKCALL_PCI_HOT_RESET")
        self.request(VfioUserCommand.X_KICKCALL_PCI_HOT_RESET, HotReset(list(tokens)).encode())
