"""A vhost-user back-end: serve a kickcall virtio device to any front-end over a Unix socket.

The back-end owns each queue's kick fd (the front-end's host notifier) and call fd (its guest
notifier, or its masked notifier while the vector is masked).  One epoll loop serves the socket,
the kick fds and the I/O completions.  Rules it keeps (vhost-user.rst, and what QEMU 7.2 sends):

* rings start on their first kick and stop on GET_VRING_BASE (in-flight I/O is finished first);
  a kick that comes before SET_VRING_ENABLE is remembered and the ring is scanned on enable;
* without VHOST_USER_F_PROTOCOL_FEATURES in SET_FEATURES, rings are enabled at once;
* the used index is read back from guest memory when a ring is set up;
* ring addresses are front-end user addresses, translated through the memory table; an address
  outside the table closes the connection; a new SET_MEM_TABLE may arrive while rings run;
* GET_CONFIG is answered with exactly the size asked;
* INFLIGHT_SHMFD: requests taken but not completed survive a back-end crash and are resubmitted;
* a malformed message closes the connection with a log line; the back-end then serves the next.
"""

from __future__ import annotations

import logging
import os
import socket
import stat
import threading
from dataclasses import dataclass, field
from typing import Callable

from .. import trace
from ..loop import IOThread
from ..memory import GuestMemory, GuestMemoryError, RamBlock
from ..notify import EventNotifier, NotifierRegistry, Role
from ..ownership import SocketClaim
from ..virtio.device import DRIVER_OK, FEATURES_OK, VirtIODevice
from ..virtio.queue import VirtQueue, VirtQueueError
from ..virtio.ring import VIRTIO_F_VERSION_1
from .inflight import InflightRegion
from .protocol import (
    CONFIG_HDR,
    FLAG_REPLY,
    INFLIGHT,
    SINGLE_MEM_REGION,
    U64,
    VERSION,
    VHOST_F_LOG_ALL,
    VHOST_USER_F_PROTOCOL_FEATURES,
    VRING_ADDR,
    VRING_IDX_MASK,
    VRING_NOFD_MASK,
    VRING_STATE,
    BackendReq,
    FrontendReq,
    MemRegion,
    Message,
    ProtocolError,
    ProtocolFeature,
    parse_regions,
    recv_message,
    send_message,
    validate_frontend_request,
)

__all__ = ["VhostUserBackend", "VhostMemory", "BackendVring", "DEFAULT_PROTOCOL_FEATURES"]

log = logging.getLogger("kickcall.vhost_user.backend")
_t_read = trace.event("vhost_user_read", "the back-end received a vhost-user request")
_t_kick = trace.event("virtio_queue_notify", "a kick reached a virtqueue")
_t_call = trace.event("vhost_user_backend_call", "the back-end wrote a queue's call fd")
_t_self_kick = trace.event("vhost_user_backend_self_kick", "after a reconnect the back-end kicked a queue itself")

PF = ProtocolFeature
DEFAULT_PROTOCOL_FEATURES = (
    (1 << PF.MQ) | (1 << PF.REPLY_ACK) | (1 << PF.CONFIG) | (1 << PF.INFLIGHT_SHMFD) | (1 << PF.BACKEND_REQ)
    | (1 << PF.CONFIGURE_MEM_SLOTS)
)
MAX_MEM_SLOTS = 8
FR = FrontendReq


class VhostMemory(GuestMemory):
    """Guest memory as a vhost-user front-end describes it: regions of fds, with user addresses."""

    def __init__(self) -> None:
        super().__init__()
        self.user_regions: list[tuple[MemRegion, RamBlock]] = []

    def add_user_region(self, r: MemRegion, fd: int) -> None:
        if r.size == 0 or r.size > (1 << 48) or r.guest_addr + r.size > (1 << 64) or \
                r.user_addr + r.size > (1 << 64):
            raise ProtocolError(f"bad memory region {r}")
        try:
            st = os.fstat(fd)
        except OSError as e:
            raise ProtocolError(f"memory region fd: {e}") from None
        if not stat.S_ISREG(st.st_mode) and st.st_size == 0:
            raise ProtocolError("memory region fd is not a mappable file")
        if r.mmap_offset + r.size > st.st_size:
            raise ProtocolError(f"memory region {r.guest_addr:#x}+{r.size:#x} at offset {r.mmap_offset:#x} "
                                f"runs past the end of its file ({st.st_size:#x})")
        for other, _b in self.user_regions:
            if r.user_addr < other.user_addr + other.size and other.user_addr < r.user_addr + r.size:
                raise ProtocolError("memory regions overlap in user address space")
        try:
            blk = RamBlock(r.mmap_offset + r.size, f"vu-{r.guest_addr:#x}", fd=fd, offset=0)
        except (OSError, ValueError) as e:
            raise ProtocolError(f"cannot map memory region: {e}") from None
        try:
            self.add_region(r.guest_addr, r.size, blk, r.mmap_offset)
        except GuestMemoryError as e:
            blk.close()
            raise ProtocolError(str(e)) from None
        blk.owns_fd = True
        self.user_regions.append((r, blk))

    def remove_user_region(self, r: MemRegion) -> None:
        for i, (have, blk) in enumerate(self.user_regions):
            if (have.guest_addr, have.size, have.user_addr) == (r.guest_addr, r.size, r.user_addr):
                del self.user_regions[i]
                self._regions = [x for x in self._regions if x.block is not blk]
                self._starts = [x.gpa for x in self._regions]
                self._blocks = [b for b in self._blocks if b is not blk]
                self._last = None
                blk.close()
                return
        raise ProtocolError(f"REM_MEM_REG: no region {r}")

    def uva_to_gpa(self, uva: int, length: int) -> int:
        for r, _b in self.user_regions:
            if r.user_addr <= uva and uva + length <= r.user_addr + r.size:
                return r.guest_addr + (uva - r.user_addr)
        raise ProtocolError(f"ring address {uva:#x}+{length:#x} is outside the memory table")


@dataclass
class BackendVring:
    index: int
    num: int = 0
    base: int = 0
    addr: tuple[int, int, int] | None = None  # desc, used, avail (user addresses)
    kick: EventNotifier | None = None
    call: EventNotifier | None = None
    err: EventNotifier | None = None
    started: bool = False
    enabled: bool = False
    pending_kick: bool = False
    kicks: int = 0
    calls: int = 0
    calls_without_fd: int = 0
    self_kicks: int = 0  # kicks the back-end gave itself after a reconnect
    errors: int = 0
    poll_timer: object = None
    extra: dict = field(default_factory=dict)


class _BackendTransport:
    """What the virtio device sees as its transport inside a back-end: calls go to the call fd."""

    bus_master = True
    queue_sel = 0

    def __init__(self, backend: "VhostUserBackend") -> None:
        self.backend = backend

    def notify_queue(self, vq: VirtQueue) -> None:
        self.backend._call(vq.index)

    def notify_config(self) -> None:
        self.backend.send_config_change()


class VhostUserBackend:
    """Serve *device* (a kickcall VirtIODevice) on a Unix socket.

    ``protocol_features`` is what the back-end offers; ``on_connect``/``on_disconnect`` are told
    of each front-end.  ``serve()`` runs in a thread of its own; ``stop()`` ends it.
    """

    def __init__(self, device: VirtIODevice, *, socket_path: str | None = None, listen_fd: int | None = None,
                 protocol_features: int = DEFAULT_PROTOCOL_FEATURES, name: str = "vhost-user-backend",
                 registry: NotifierRegistry | None = None, loop: IOThread | None = None,
                 claim: SocketClaim | None = None) -> None:
        if claim is not None:
            socket_path = claim.path
        if (socket_path is None) == (listen_fd is None):
            raise ValueError("give exactly one of socket_path and listen_fd")
        self.device = device
        self.name = name
        self.registry = registry or NotifierRegistry()
        self.offered_protocol_features = protocol_features
        self.loop = loop or IOThread(f"{name}-loop")
        self._own_loop = loop is None
        self.socket_path = socket_path
        self.claim: SocketClaim | None = None
        self._own_claim = claim is None  # a claim given by the caller is the caller's to release
        if socket_path is not None:
            self.claim = claim if claim is not None else SocketClaim(socket_path)
            try:
                self.listener = self._listen(self.claim)
            except BaseException:
                if claim is None:
                    self.claim.release()
                raise
        else:
            assert listen_fd is not None
            self.listener = socket.socket(fileno=listen_fd)
            self.listener.setblocking(False)
        self.conn: socket.socket | None = None
        self.backend_req: socket.socket | None = None
        self.vrings = [BackendVring(i) for i in range(len(device.queues))]
        self.memory: VhostMemory | None = None
        self.inflight: InflightRegion | None = None
        self.features = 0
        self.protocol_features = 0
        self.owner = False
        self.connections = 0
        self.disconnects = 0
        self.protocol_errors = 0
        self.last_error = ""
        self.message_counts: dict[str, int] = {}
        self.trace: list[str] = []  # message names of the current connection, for tests and debugging
        self.on_connect: Callable[[], None] | None = None
        self.on_disconnect: Callable[[str], None] | None = None
        self.fault_hooks: dict[str, Callable] = {}
        # after a reconnect with INFLIGHT_SHMFD, kick a ring that shows work (False: tests show the hang)
        self.self_kick_after_reconnect = True
        device.transport = _BackendTransport(self)  # type: ignore[assignment]
        self._stopped = threading.Event()

    # -- sockets -----------------------------------------------------------------------------------
    @staticmethod
    def _listen(claim: SocketClaim) -> socket.socket:
        """Bind the claimed path (checked and locked first: a live socket or a user's file is refused)."""
        return claim.bind(backlog=1)

    def start(self) -> "VhostUserBackend":
        """Start serving (the loop runs on its own thread)."""
        if self._own_loop:
            self.loop.start()
        self.loop.run_sync(lambda: self.loop.set_fd_handler(self.listener.fileno(), self._accept))
        return self

    def stop(self) -> None:
        if self._stopped.is_set():
            return
        self._stopped.set()
        try:
            self.loop.run_sync(self._shutdown)
        except Exception:
            log.exception("%s: shutdown", self.name)
        if self._own_loop:
            self.loop.stop()

    def _shutdown(self) -> None:
        self._disconnect("back-end stopping")
        self.loop.remove_fd_handler(self.listener.fileno())
        self.listener.close()
        if self.claim is not None and self._own_claim:  # the socket file only if it is still ours
            self.claim.release()

    def _accept(self) -> None:
        try:
            conn, _ = self.listener.accept()
        except BlockingIOError:
            return
        if self.conn is not None:  # one front-end at a time
            conn.close()
            return
        conn.setblocking(True)
        conn.settimeout(10.0)  # a half-sent message must not stall the loop for ever
        self.conn = conn
        self.connections += 1
        self.trace = []
        self.device.reset()
        self.device.mem = None
        self.loop.set_fd_handler(conn.fileno(), self._readable)
        log.info("%s: front-end connected", self.name)
        if self.on_connect is not None:
            self.on_connect()

    def _disconnect(self, why: str) -> None:
        conn = self.conn
        if conn is None:
            return
        self.loop.remove_fd_handler(conn.fileno())
        conn.close()
        self.conn = None
        self.disconnects += 1
        for v in self.vrings:
            self._stop_ring(v, drain=False)
        self.device.drain()
        for v in self.vrings:
            for attr in ("kick", "call", "err"):
                self._set_fd(v, attr, None)
            v.num = v.base = 0
            v.addr = None
            v.enabled = False
            v.pending_kick = False
        self.device.release_rings()
        for q in self.device.queues:
            q.inflight = None
        if self.backend_req is not None:
            self.backend_req.close()
            self.backend_req = None
        if self.inflight is not None:
            self.inflight.close()
            self.inflight = None
        if self.memory is not None:
            self.memory.close()
            self.memory = None
        self.device.mem = None
        self.features = self.protocol_features = 0
        self.owner = False
        log.info("%s: front-end disconnected (%s)", self.name, why)
        if self.on_disconnect is not None:
            self.on_disconnect(why)

    # -- messages ----------------------------------------------------------------------------------
    def _readable(self) -> None:
        conn = self.conn
        if conn is None:
            return
        try:
            msg = recv_message(conn)
        except EOFError:
            self._disconnect("front-end closed the socket")
            return
        except (ProtocolError, OSError) as e:
            self._protocol_error(f"bad message: {e}")
            return
        name = msg.name()
        try:
            validate_frontend_request(msg)
            self.message_counts[name] = self.message_counts.get(name, 0) + 1
            self.trace.append(name)
            if _t_read.enabled:
                _t_read.emit(req=name, flags=msg.flags, size=len(msg.payload), fds=len(msg.fds))
            hook = self.fault_hooks.get("message")
            if hook is not None:
                hook(msg)
            reply = self._handle(msg)
        except ProtocolError as e:
            msg.close_fds()
            self._protocol_error(f"{name}: {e}")
            return
        except Exception as e:  # a bug or hostile input we did not foresee: never take the process down
            msg.close_fds()
            log.exception("%s: %s failed", self.name, name)
            self._protocol_error(f"{name}: {type(e).__name__}: {e}")
            return
        try:
            if reply is not None:
                payload, fds = reply if isinstance(reply, tuple) else (reply, [])
                send_message(conn, Message(msg.request, VERSION | FLAG_REPLY, payload, fds))
            elif msg.need_reply and self.protocol_features & (1 << PF.REPLY_ACK):
                send_message(conn, Message(msg.request, VERSION | FLAG_REPLY, U64.pack(0)))
        except OSError as e:
            self._disconnect(f"send failed: {e}")

    def _protocol_error(self, what: str) -> None:
        self.protocol_errors += 1
        self.last_error = what
        log.error("%s: closing the connection: %s", self.name, what)
        self._disconnect(what)

    def _vring(self, index: int) -> BackendVring:
        if not 0 <= index < len(self.vrings):
            raise ProtocolError(f"no queue {index} (the device has {len(self.vrings)})")
        return self.vrings[index]

    def offered_features(self) -> int:
        return self.device.host_features | (1 << VHOST_USER_F_PROTOCOL_FEATURES)

    def _handle(self, msg: Message):  # noqa: C901 - one switch over the protocol
        r = msg.request
        if r == FR.GET_FEATURES:
            return U64.pack(self.offered_features())
        if r == FR.SET_FEATURES:
            f = msg.u64()
            if f & ~self.offered_features() & ~(1 << VHOST_F_LOG_ALL):
                raise ProtocolError(f"SET_FEATURES {f:#x} has bits the back-end did not offer")
            if f & (1 << VHOST_F_LOG_ALL):
                raise ProtocolError("dirty logging (VHOST_F_LOG_ALL) is not supported")
            self.features = f
            dev_f = f & ~(1 << VHOST_USER_F_PROTOCOL_FEATURES)
            if not dev_f >> VIRTIO_F_VERSION_1 & 1 or not self.device.set_features(dev_f):
                raise ProtocolError(f"the device refused features {dev_f:#x} (VERSION_1 is required)")
            self.device.set_status(FEATURES_OK | DRIVER_OK)
            if not f & (1 << VHOST_USER_F_PROTOCOL_FEATURES):
                for v in self.vrings:
                    self._enable(v, True)
            return None
        if r == FR.SET_OWNER:
            self.owner = True
            return None
        if r == FR.RESET_OWNER or r == FR.RESET_DEVICE:
            for v in self.vrings:
                self._stop_ring(v)
            self.device.reset()
            self.owner = r == FR.RESET_DEVICE and self.owner
            return None
        if r == FR.GET_PROTOCOL_FEATURES:
            return U64.pack(self.offered_protocol_features)
        if r == FR.SET_PROTOCOL_FEATURES:
            pf = msg.u64()
            if pf & ~self.offered_protocol_features:
                raise ProtocolError(f"SET_PROTOCOL_FEATURES {pf:#x} has bits the back-end did not offer")
            self.protocol_features = pf
            return None
        if r == FR.GET_QUEUE_NUM:
            return U64.pack(len(self.vrings))
        if r == FR.GET_MAX_MEM_SLOTS:
            self._need_pf(PF.CONFIGURE_MEM_SLOTS, msg)
            return U64.pack(MAX_MEM_SLOTS)
        if r == FR.SET_MEM_TABLE:
            regions = parse_regions(msg.payload)
            mem = VhostMemory()
            fds = list(msg.fds)
            msg.fds = []
            used = 0  # fds now owned by mem
            try:
                for reg, fd in zip(regions, fds, strict=True):
                    mem.add_user_region(reg, fd)
                    used += 1
            except BaseException:
                mem.close()
                for fd in fds[used:]:
                    os.close(fd)
                raise
            self._swap_memory(mem)
            return None
        if r == FR.ADD_MEM_REG:
            self._need_pf(PF.CONFIGURE_MEM_SLOTS, msg)
            reg = MemRegion(*SINGLE_MEM_REGION.unpack(msg.payload)[1:])
            fd = msg.fds.pop()
            mem = self.memory or VhostMemory()
            if len(mem.user_regions) >= MAX_MEM_SLOTS:
                os.close(fd)
                raise ProtocolError("ADD_MEM_REG beyond the advertised memory slots")
            self._quiesce_io()
            try:
                mem.add_user_region(reg, fd)
            except BaseException:
                os.close(fd)
                raise
            self._swap_memory(mem, same=self.memory is mem)
            return None
        if r == FR.REM_MEM_REG:
            self._need_pf(PF.CONFIGURE_MEM_SLOTS, msg)
            if self.memory is None:
                raise ProtocolError("REM_MEM_REG without a memory table")
            reg = MemRegion(*SINGLE_MEM_REGION.unpack(msg.payload)[1:])
            self._quiesce_io()
            for v in self.vrings:
                self.device.queues[v.index].unmap()
            self.memory.remove_user_region(reg)
            self._swap_memory(self.memory, same=True)
            return None
        if r == FR.SET_VRING_NUM:
            idx, num = VRING_STATE.unpack(msg.payload)
            v = self._vring(idx)
            q = self.device.queues[idx]
            if not q.set_num(num):
                raise ProtocolError(f"queue {idx}: size {num} is not a power of two up to {q.num_max}")
            v.num = num
            return None
        if r == FR.SET_VRING_ADDR:
            idx, _flags, desc, used, avail, _log = VRING_ADDR.unpack(msg.payload)
            v = self._vring(idx)
            v.addr = (desc, used, avail)
            self._map_ring(v)
            return None
        if r == FR.SET_VRING_BASE:
            idx, num = VRING_STATE.unpack(msg.payload)
            v = self._vring(idx)
            if num > 0xFFFF:
                raise ProtocolError(f"queue {idx}: base {num} is not a 16-bit index")
            v.base = num
            self.device.queues[idx].last_avail_idx = num
            self.device.queues[idx].shadow_avail_idx = num
            return None
        if r == FR.GET_VRING_BASE:
            idx, _ = VRING_STATE.unpack(msg.payload)
            v = self._vring(idx)
            self._stop_ring(v)
            q = self.device.queues[idx]
            base = q.last_avail_idx if v.addr is not None else v.base
            for attr in ("kick", "call"):
                self._set_fd(v, attr, None)
            return VRING_STATE.pack(idx, base)
        if r in (FR.SET_VRING_KICK, FR.SET_VRING_CALL, FR.SET_VRING_ERR):
            val = msg.u64()
            if val & ~(VRING_IDX_MASK | VRING_NOFD_MASK):
                raise ProtocolError(f"{msg.name()}: stray bits in {val:#x}")
            v = self._vring(val & VRING_IDX_MASK)
            fd = msg.fds.pop() if msg.fds else None
            attr = {FR.SET_VRING_KICK: "kick", FR.SET_VRING_CALL: "call", FR.SET_VRING_ERR: "err"}[r]
            try:
                n = EventNotifier.adopt(fd, f"{self.name}.vq{v.index}.{attr}") if fd is not None else None
            except Exception as e:
                if fd is not None:
                    os.close(fd)
                raise ProtocolError(f"{msg.name()}: not an eventfd: {e}") from None
            self._set_fd(v, attr, n)
            if attr == "kick":
                self._kick_fd_set(v)
            return None
        if r == FR.SET_VRING_ENABLE:
            idx, num = VRING_STATE.unpack(msg.payload)
            v = self._vring(idx)
            if num not in (0, 1):
                raise ProtocolError(f"SET_VRING_ENABLE {num}")
            self._enable(v, bool(num))
            return None
        if r == FR.GET_CONFIG:
            self._need_pf(PF.CONFIG, msg)
            off, size, flags = CONFIG_HDR.unpack_from(msg.payload)
            cfg = self.device.get_config()
            data = cfg[off:off + size] if off < len(cfg) else b""
            return CONFIG_HDR.pack(off, size, flags) + data.ljust(size, b"\0")
        if r == FR.SET_CONFIG:
            self._need_pf(PF.CONFIG, msg)
            off, size, _flags = CONFIG_HDR.unpack_from(msg.payload)
            self.device.set_config(off, msg.payload[CONFIG_HDR.size:CONFIG_HDR.size + size])
            return None
        if r == FR.SET_BACKEND_REQ_FD:
            self._need_pf(PF.BACKEND_REQ, msg)
            fd = msg.fds.pop()
            try:
                s = socket.socket(fileno=fd)
            except OSError as e:
                os.close(fd)
                raise ProtocolError(f"SET_BACKEND_REQ_FD: {e}") from None
            if s.family != socket.AF_UNIX:
                s.close()
                raise ProtocolError("SET_BACKEND_REQ_FD: not a Unix socket")
            s.settimeout(5.0)
            if self.backend_req is not None:
                self.backend_req.close()
            self.backend_req = s
            return None
        if r == FR.GET_INFLIGHT_FD:
            self._need_pf(PF.INFLIGHT_SHMFD, msg)
            _sz, _off, nq, qsize = INFLIGHT.unpack(msg.payload)
            if not 1 <= nq <= len(self.vrings) or qsize == 0 or qsize & (qsize - 1) or qsize > 32768:
                raise ProtocolError(f"GET_INFLIGHT_FD for {nq} queues of {qsize}")
            region = InflightRegion.create(nq, qsize)
            self._attach_inflight(region)
            return INFLIGHT.pack(region.mmap_size, region.mmap_offset, nq, qsize), [region.fd]
        if r == FR.SET_INFLIGHT_FD:
            self._need_pf(PF.INFLIGHT_SHMFD, msg)
            size, off, nq, qsize = INFLIGHT.unpack(msg.payload)
            fd = msg.fds.pop()
            if not 1 <= nq <= len(self.vrings) or qsize == 0 or qsize & (qsize - 1) or qsize > 32768:
                os.close(fd)
                raise ProtocolError(f"SET_INFLIGHT_FD for {nq} queues of {qsize}")
            try:
                region = InflightRegion(fd, size, off, nq, qsize)
            except (ValueError, OSError) as e:
                os.close(fd)
                raise ProtocolError(f"SET_INFLIGHT_FD: {e}") from None
            self._attach_inflight(region)
            return None
        if r in (FR.SET_VRING_ENDIAN,):
            return None  # legacy only; we are a VERSION_1 (little-endian) device
        raise ProtocolError(f"{msg.name()} is not supported by this back-end")

    def _need_pf(self, bit: ProtocolFeature, msg: Message) -> None:
        if not self.protocol_features & (1 << bit):
            raise ProtocolError(f"{msg.name()} without protocol feature {bit.name}")

    # -- memory ------------------------------------------------------------------------------------
    def _quiesce_io(self) -> None:
        self.device.drain()

    def _swap_memory(self, mem: VhostMemory, same: bool = False) -> None:
        """Install a new memory table; rings keep running (their user addresses are re-translated)."""
        self._quiesce_io()
        old = self.memory
        for q in self.device.queues:
            q.unmap()
        self.memory = mem
        self.device.mem = mem
        for q in self.device.queues:
            q.mem = mem
        if old is not None and not same:
            old.close()
        for v in self.vrings:
            if v.addr is not None:
                self._map_ring(v, read_used=False)

    def _map_ring(self, v: BackendVring, read_used: bool = True) -> None:
        if self.memory is None:
            raise ProtocolError(f"queue {v.index}: ring addresses before a memory table")
        assert v.addr is not None
        desc, used, avail = v.addr
        q = self.device.queues[v.index]
        n = q.num
        gdesc = self.memory.uva_to_gpa(desc, 16 * n)
        gavail = self.memory.uva_to_gpa(avail, 6 + 2 * n)
        gused = self.memory.uva_to_gpa(used, 6 + 8 * n)
        q.mem = self.memory
        q.set_rings(gdesc, gavail, gused)
        try:
            q.map(self.memory)
        except VirtQueueError as e:
            raise ProtocolError(str(e)) from None
        if read_used:
            # the used index lives in guest memory: a stale copy across a reset would corrupt the ring
            q.used_idx = q.guest_used_idx()
            q.signalled_used_valid = False
        q.enabled = True

    def _attach_inflight(self, region: InflightRegion) -> None:
        if self.inflight is not None and self.inflight is not region:
            for q in self.device.queues:
                q.inflight = None
            self.inflight.close()
        self.inflight = region
        for i, iq in enumerate(region.queues):
            self.device.queues[i].inflight = iq

    # -- rings -------------------------------------------------------------------------------------
    def _set_fd(self, v: BackendVring, attr: str, n: EventNotifier | None) -> None:
        old: EventNotifier | None = getattr(v, attr)
        if old is not None:
            if attr == "kick":
                self.loop.remove_fd_handler(old.fileno())
            self.registry.unregister(old)
            old.close()
        setattr(v, attr, n)
        if n is not None:
            role = {"kick": Role.HOST, "call": Role.GUEST, "err": Role.ERR}[attr]
            self.registry.register(n, self.name, role, queue=v.index)

    def _kick_fd_set(self, v: BackendVring) -> None:
        q = self.device.queues[v.index]
        replay = False
        if v.addr is not None and q.inflight is not None:
            # a region that already carries state is a reconnect: the back-end before us may
            # have read the guest's last kick and died before acting on it
            reconnect = q.inflight.version != 0
            try:
                q.resubmit = q.inflight.recover(q.guest_used_idx())
            except ValueError as e:
                raise ProtocolError(str(e)) from None
            if reconnect and self.self_kick_after_reconnect:
                replay = bool(q.resubmit) or q.guest_avail_idx() != q.guest_used_idx()
            if q.resubmit:
                q.last_avail_idx = (q.guest_used_idx() + len(q.resubmit)) & 0xFFFF
                q.shadow_avail_idx = q.last_avail_idx
                log.info("%s: queue %d: resubmitting %d in-flight requests", self.name, v.index, len(q.resubmit))
                v.started = True
                v.pending_kick = True
        if v.kick is not None:
            self.loop.set_fd_handler(v.kick.fileno(), lambda v=v: self._kicked(v))
            if v.poll_timer is not None:
                v.poll_timer.cancel()
                v.poll_timer = None
        elif v.addr is not None:
            self._poll(v)  # no kick fd: the back-end polls the ring
        if replay and v.kick is not None:
            # libvhost-user does this "in case of I/O hang after reconnecting"; we do it whenever
            # a reconnect finds work the ring shows (in flight, or published and not yet used)
            try:
                v.kick.set()
                v.self_kicks += 1
                if _t_self_kick.enabled:
                    _t_self_kick.emit(vdev=self.name, n=v.index)
            except OSError as e:  # a kick fd at its maximum is readable anyway
                log.warning("%s: queue %d: kicking itself: %s", self.name, v.index, e)
        if v.pending_kick and v.enabled:
            self._process(v)

    def _poll(self, v: BackendVring) -> None:
        v.poll_timer = None
        if self.conn is None or v.kick is not None:
            return
        if v.addr is not None:
            q = self.device.queues[v.index]
            try:
                if not q.is_empty():
                    v.started = True
                    v.pending_kick = True
                    if v.enabled:
                        self._process(v)
            except VirtQueueError:
                pass
        v.poll_timer = self.loop.call_later(0.001, self._poll, v)

    def _kicked(self, v: BackendVring) -> None:
        if v.kick is None or not v.kick.test_and_clear():
            return
        v.kicks += 1
        if _t_kick.enabled:
            _t_kick.emit(vdev=self.name, n=v.index)
        hook = self.fault_hooks.get("kick")
        if hook is not None and hook(v) is False:
            return
        v.started = True
        v.pending_kick = True
        if v.enabled:
            self._process(v)

    def _enable(self, v: BackendVring, on: bool) -> None:
        v.enabled = on
        if on and v.started and v.pending_kick:
            self._process(v)

    def _process(self, v: BackendVring) -> None:
        """Run the device's queue handler (rings must be started, enabled and mapped)."""
        if v.addr is None or self.memory is None:
            return
        v.pending_kick = False
        dev = self.device
        if dev.broken:
            return
        q = dev.queues[v.index]
        dev._dispatch(q)
        if dev.broken:
            v.errors += 1
            log.error("%s: queue %d: %s", self.name, v.index, dev.broken_reason)
            if v.err is not None:
                v.err.set()  # tell the front-end: it marks the device as needing a reset
            self._stop_ring(v, drain=False)

    def _stop_ring(self, v: BackendVring, drain: bool = True) -> None:
        if drain:
            self.device.drain()
        v.started = False
        v.pending_kick = False
        if v.poll_timer is not None:
            v.poll_timer.cancel()
            v.poll_timer = None

    def _call(self, index: int) -> None:
        v = self.vrings[index]
        hook = self.fault_hooks.get("call")
        if hook is not None and hook(v) is False:
            return
        if v.call is not None:
            try:
                v.call.set()
                v.calls += 1
                if _t_call.enabled:
                    _t_call.emit(vdev=self.name, n=v.index, fd=v.call.fd)
            except OSError:
                v.calls_without_fd += 1
        else:
            v.calls_without_fd += 1

    def send_config_change(self) -> bool:
        """Tell the front-end the device config changed (BACKEND_REQ CONFIG_CHANGE_MSG)."""
        s = self.backend_req
        if s is None or not self.protocol_features & (1 << PF.BACKEND_REQ):
            return False
        flags = VERSION
        ack = bool(self.protocol_features & (1 << PF.REPLY_ACK))
        if ack:
            flags |= 0x8
        try:
            send_message(s, Message(BackendReq.CONFIG_CHANGE_MSG, flags, b""))
            if ack:
                rep = recv_message(s)
                rep.close_fds()
        except (OSError, EOFError, ProtocolError) as e:
            log.warning("%s: config change message failed: %s", self.name, e)
            return False
        return True

    # -- introspection ----------------------------------------------------------------------------
    def status(self) -> dict:
        out = {"connected": self.conn is not None, "connections": self.connections,
               "disconnects": self.disconnects, "protocol-errors": self.protocol_errors,
               "features": self.features, "protocol-features": self.protocol_features, "queues": []}
        for v in self.vrings:
            q = self.device.queues[v.index]
            d = {"queue": v.index, "num": v.num, "started": v.started, "enabled": v.enabled,
                 "kicks": v.kicks, "calls": v.calls, "self-kicks": v.self_kicks,
                 "kick-fd": v.kick.fd if v.kick else -1,
                 "call-fd": v.call.fd if v.call else -1, "err-fd": v.err.fd if v.err else -1,
                 "inuse": q.inuse, "last-avail-idx": q.last_avail_idx, "used-idx": q.used_idx}
            out["queues"].append(d)
        return out

