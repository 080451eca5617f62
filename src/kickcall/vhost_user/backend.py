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

Bounded against odd or hostile peers (issue 7), without ever blocking the loop:

* messages are read a piece at a time as the socket becomes readable; each has one deadline from
  its first byte to its last (``message_deadline``, 10 s): a peer that dribbles bytes cannot
  extend it, and one that misses it is disconnected as too slow;
* replies go out on a non-blocking socket: a front-end that does not read them is disconnected;
* accept() out of fds (EMFILE, ENFILE) pauses the listener for ``accept_pause`` and logs once
  per pause, instead of failing in a loop;
* back-end requests (CONFIG_CHANGE_MSG) are sent without waiting: their REPLY_ACK is read by the
  loop, and a front-end that has not answered within ``backend_req_timeout`` loses the channel
  (closed, with one log line; later config changes are not sent on this connection);
* a ring error stops the ring before the err fd is written, and an err fd that cannot be written
  (at its maximum count) is logged, not raised; an EFD_SEMAPHORE kick fd is refused, and a kick
  fd that stays readable after being read is polled at most every ``KICK_THROTTLE`` seconds;
* a ring larger than the inflight region's queue size is refused, in whichever order they come;
* after a ring error the device stays broken (DEVICE_NEEDS_RESET) until the front-end stops
  every ring it set up with GET_VRING_BASE and sets at least one up again completely
  (SET_VRING_NUM, _BASE, _ADDR, _KICK and _CALL each; a ring stopped and not set up again stays
  stopped) -- what QEMU sends when the guest resets the device -- or resets it (a new
  connection, RESET_OWNER, RESET_DEVICE).  A hostile ring presented again breaks it again.

Each of these is a fix with a switch in the back-end's fault registry (``faults``, a
``FaultRegistry``: ``FIXES`` lists them), on by default; the tests turn one off to show what it
prevents, and ``kickcall vhost-user-blk --x-fix-off NAME`` starts a back-end with one off.

Every front-end request decodes into a record (``kickcall.vhost_user.protocol``: ``VringAddr``,
``VringState``, ``VringFile``, ``MemTable``, ...) and is served by one handler method
(``_on_set_vring_addr``, ...); the table ``_ROUTES`` says, per request, its payload type, its fds,
the protocol feature it needs, and its handler, so the checks happen in one place (``_dispatch``).
A refused message is a ``ProtocolError`` with a ``kind`` (counted in ``protocol_errors`` and, by
kind, in ``protocol_error_kinds``); an exception the back-end did not expect is a bug, counted in
``internal_errors`` with a crash report, never as the front-end's fault.

Each ring has a lifecycle (``RingState``, ``ring_state()``), shown by the monitor: no front-end,
not set up (no ring address since the front-end connected or reset the device), not started (set
up, no kick yet: a ring starts on its first kick), started, disabled (SET_VRING_ENABLE 0), stopped
(GET_VRING_BASE: the front-end stopped it; it is started again only through a new SET_VRING_KICK
and a kick).  ``process_ring()`` and ``call_ring()`` -- what the monitor's injections use -- refuse
a ring in a state where a back-end must not act, with the reason (``RingRefused``).  Nothing else
processes a stopped ring either: GET_VRING_BASE takes the kick fd (and its handler) away and
cancels the poll timer and any remembered kick; a self-kick after a reconnect goes through a new
kick fd, which only the front-end hands over.  RESET_OWNER/RESET_DEVICE forget the rings' set-up
(``forget-rings-on-reset``): a kick that comes after the reset finds no ring to process.
"""

from __future__ import annotations

import enum
import errno
import functools
import logging
import os
import select
import socket
import stat
import struct
import threading
import traceback
from dataclasses import dataclass, field
from typing import Callable, ClassVar, TypeAlias

from .. import trace
from ..crash import crash_report
from ..faults import FaultRegistry
from ..loop import IOThread, PollHandler, Timer
from ..memory import GuestMemory, GuestMemoryError, RamBlock
from ..notify import EventNotifier, NotifierRegistry, Role
from ..ownership import SocketClaim
from ..virtio.device import DRIVER_OK, FEATURES_OK, VirtIODevice
from ..virtio.queue import VirtQueue, VirtQueueError
from ..virtio.layout import avail_size, desc_table_size, used_size
from ..virtio.ring import VIRTIO_F_VERSION_1
from .inflight import InflightRegion
from .protocol import (
    CONFIG_HDR,
    FLAG_NEED_REPLY,
    FLAG_REPLY,
    INFLIGHT,
    U64,
    VERSION,
    VHOST_F_LOG_ALL,
    VHOST_USER_F_PROTOCOL_FEATURES,
    VRING_STATE,
    BackendReq,
    ConfigAccess,
    Empty,
    FdRule,
    FrontendReq,
    Inflight,
    LogBase,
    MemRegion,
    MemTable,
    Message,
    MessageReader,
    Payload,
    ProtocolError,
    ProtocolErrorKind,
    ProtocolFeature,
    SingleMemRegion,
    U64Payload,
    VringAddr,
    VringFile,
    VringState,
    check_fds,
    check_request_flags,
    recv_message,
    send_message,
)

__all__ = ["VhostUserBackend", "VhostMemory", "BackendVring", "DEFAULT_PROTOCOL_FEATURES", "RingState",
           "RingRefused", "Route", "Reply", "FIXES"]

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

# The back-end's fixes (issues 7 and 9), each a ``Switch`` in ``VhostUserBackend.faults``, on by
# default; a test (or ``kickcall vhost-user-blk --x-fix-off NAME``) turns one off to show the harm it
# prevents.  Name -> effect of switching it off.
FIXES: dict[str, str] = {
    "per-message-deadline": "off: blocking reads whose socket timeout restarts on every byte (a front-end that "
                            "dribbles a message holds the loop)",
    "pause-listener-on-emfile": "off: accept() out of fds fails again at once, in a loop",
    "async-backend-req-ack": "off: the loop blocks in recv() for a back-end request's REPLY_ACK",
    "guard-err-signal": "off: the err fd is written before the ring is stopped, unguarded",
    "refuse-semaphore-kick": "off: an EFD_SEMAPHORE kick fd is accepted",
    "bound-stuck-kick": "off: a kick fd that stays readable is served as fast as the loop turns",
    "check-inflight-ring-size": "off: a ring larger than the inflight region's queues is accepted",
    "recover-after-ring-reinit": "off: after a ring error only a device reset makes it usable",
    "forget-rings-on-reset": "off: ring addresses survive RESET_OWNER/RESET_DEVICE (a later kick processes the "
                             "reset queue: its ring addresses are 0, and its used flags are written at GPA 0)",
    "validate-messages": "off: SET_VRING_ADDR flags other than VHOST_VRING_F_LOG, misaligned ring addresses and "
                         "header flags other than NEED_REPLY are accepted (rust-vmm's is_valid refuses them)",
    "self-kick-after-reconnect": "off: after a reconnect with INFLIGHT_SHMFD a ring that shows work is not kicked "
                                 "(a kick the previous back-end consumed is then lost unless the front-end kicks)",
    "report-poll-errors": "off: a ring error met while polling a ring that has no kick fd is swallowed (the "
                          "ring is polled on, the device is not marked broken, the err fd is not written)",
    "poll-recheck": "off: when the loop stops polling a ring, notifications are re-enabled without looking at the "
                    "avail ring again (a request the driver published while they were still suppressed waits for a "
                    "kick that never comes)",
    "restore-notifications-on-start": "off: a ring's kick fd is taken as the ring is found, notification "
                                      "suppression included (a back-end that died while polling left the driver "
                                      "not kicking: the next request waits for a kick that never comes)",
}

MESSAGE_DEADLINE = 10.0  # seconds from a message's first byte to its last
BACKEND_REQ_TIMEOUT = 5.0  # seconds the front-end has to acknowledge a back-end request
ACCEPT_PAUSE = 1.0  # seconds the listener rests after accept() ran out of fds
MESSAGES_PER_EVENT = 16  # front-end messages handled per readable event (then the loop turns)
MAX_PENDING_BACKEND_REQS = 64  # unacknowledged back-end requests before the channel is dropped
KICK_STUCK_LIMIT = 64  # reads in a row after which a kick fd was still readable: it is stuck
KICK_THROTTLE = 0.01  # seconds between polls of a stuck kick fd
MAX_CRASH_REPORTS = 10  # internal errors written to a crash report (the rest are counted and logged)
_KNOWN_REQUESTS = frozenset(int(r) for r in FrontendReq)
_OUT_OF_FDS = (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM)
_REINIT_STEPS = frozenset({"num", "base", "addr", "kick", "call"})


class RingState(enum.StrEnum):
    """Where a ring is in its vhost-user lifecycle, as the back-end sees it (wire strings)."""

    NO_FRONT_END = "no-front-end"  # no front-end is connected
    NOT_SET_UP = "not-set-up"  # connected, no SET_VRING_ADDR since the connection or a device reset
    NOT_STARTED = "not-started"  # set up, not started yet: no kick fd, or no kick on it yet
    STARTED = "started"  # started (its first kick came) and enabled: the back-end processes it
    STOPPED = "stopped"  # GET_VRING_BASE since it was last started: the front-end stopped it
    DISABLED = "disabled"  # started, but SET_VRING_ENABLE 0 (or not enabled yet)


class RingRefused(Exception):
    """The back-end will not act on a ring in this state; ``state`` is the kind, the text says why."""

    def __init__(self, state: RingState, why: str) -> None:
        super().__init__(why)
        self.state = state
        self.why = why


class VhostMemory(GuestMemory):
    """Guest memory as a vhost-user front-end describes it: regions of fds, with user addresses."""

    def __init__(self) -> None:
        super().__init__()
        self.user_regions: list[tuple[MemRegion, RamBlock]] = []

    def add_user_region(self, r: MemRegion, fd: int) -> None:
        """Map region *r* of *fd* (which the memory owns from now on, once this returns)."""
        r.validate()
        try:
            st = os.fstat(fd)
        except OSError as e:
            raise ProtocolError(ProtocolErrorKind.BAD_FD, f"memory region fd: {e}") from None
        if not stat.S_ISREG(st.st_mode) and st.st_size == 0:
            raise ProtocolError(ProtocolErrorKind.BAD_FD, "memory region fd is not a mappable file")
        if r.mmap_offset + r.size > st.st_size:
            raise ProtocolError(ProtocolErrorKind.BAD_MEMORY_REGION,
                                f"memory region {r.guest_addr:#x}+{r.size:#x} at offset {r.mmap_offset:#x} "
                                f"runs past the end of its file ({st.st_size:#x})")
        for other, _b in self.user_regions:
            if r.user_addr < other.user_addr + other.size and other.user_addr < r.user_addr + r.size:
                raise ProtocolError(ProtocolErrorKind.OVERLAPPING_REGIONS, "memory regions overlap in user address space")
            if r.guest_addr < other.guest_addr + other.size and other.guest_addr < r.guest_addr + r.size:
                raise ProtocolError(ProtocolErrorKind.OVERLAPPING_REGIONS,
                                    f"memory region {r.guest_addr:#x}+{r.size:#x} overlaps "
                                    f"{other.guest_addr:#x}+{other.size:#x} in guest-physical space")
        try:
            blk = RamBlock(r.mmap_offset + r.size, f"vu-{r.guest_addr:#x}", fd=fd, offset=0)
        except (OSError, ValueError) as e:
            raise ProtocolError(ProtocolErrorKind.MMAP_FAILED, f"cannot map memory region: {e}") from None
        try:
            self.add_region(r.guest_addr, r.size, blk, r.mmap_offset)
        except GuestMemoryError as e:
            blk.close()
            raise ProtocolError(ProtocolErrorKind.BAD_MEMORY_REGION, str(e)) from None
        blk.owns_fd = True
        self.user_regions.append((r, blk))

    def remove_user_region(self, r: MemRegion) -> None:
        for i, (have, blk) in enumerate(self.user_regions):
            if (have.guest_addr, have.size, have.user_addr) == (r.guest_addr, r.size, r.user_addr):
                del self.user_regions[i]
                self.remove_block(blk)
                blk.close()
                return
        raise ProtocolError(ProtocolErrorKind.UNKNOWN_REGION, f"REM_MEM_REG: no region {r}")

    def uva_to_gpa(self, uva: int, length: int) -> int:
        for r, _b in self.user_regions:
            if r.user_addr <= uva and uva + length <= r.user_addr + r.size:
                return r.guest_addr + (uva - r.user_addr)
        raise ProtocolError(ProtocolErrorKind.RING_OUTSIDE_MEMORY_TABLE,
                            f"ring address {uva:#x}+{length:#x} is outside the memory table")


_FD_ATTR: dict[FR, str] = {FR.SET_VRING_KICK: "kick", FR.SET_VRING_CALL: "call", FR.SET_VRING_ERR: "err"}


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
    stopped: bool = False  # GET_VRING_BASE since the front-end last handed over a kick fd
    get_vring_base: int = 0  # GET_VRING_BASE for this ring since the back-end started (all connections)
    call_nofd: bool = False  # the front-end's last SET_VRING_CALL had no fd (VRING_NOFD: it polls)
    kicks: int = 0
    calls: int = 0
    calls_without_fd: int = 0
    self_kicks: int = 0  # kicks the back-end gave itself after a reconnect
    errors: int = 0
    polls: int = 0  # times the back-end polled the ring (no kick fd: VRING_NOFD)
    poll_errors: int = 0  # ring errors met while polling a ring without a kick fd
    poll_timer: Timer | None = None
    err_write_failures: int = 0  # ring errors whose err fd could not be written
    kick_stuck: int = 0  # reads in a row after which the kick fd was still readable
    kick_throttles: int = 0
    kick_throttle_timer: Timer | None = None
    polling: bool = False  # the loop is polling this ring: its notifications are suppressed
    polled_requests: int = 0  # requests found by polling the avail ring rather than by a kick
    poll_idle_at: int = -1  # avail.idx at which processing took nothing: not polled as work again
    extra: dict = field(default_factory=dict)


def _peer_name(conn: socket.socket) -> str:
    """The front-end as the kernel knows it (SO_PEERCRED), for log lines."""
    try:
        pid, uid, _gid = struct.unpack("3i", conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                                             struct.calcsize("3i")))
    except OSError:
        return "(unknown peer)"
    return f"pid {pid} uid {uid}"


class _BackendTransport:
    """The device's ``VirtioTransport`` inside a back-end: calls go to the front-end's call fd."""

    def __init__(self, backend: "VhostUserBackend") -> None:
        self.backend = backend

    def notify_queue(self, vq: VirtQueue) -> None:
        self.backend.queue_notify(vq.index)

    def notify_config(self) -> None:
        self.backend.send_config_change()

    def dma_enabled(self) -> bool:
        return True  # the front-end stops a ring (GET_VRING_BASE) rather than the device's DMA

    def queue_select(self) -> int | None:
        return None  # vhost-user names every queue by index: there is no select register


# what a handler returns: a reply payload, a payload and the fds to send with it, or None (no
# reply; an acknowledgement if the front-end asked for one with NEED_REPLY and REPLY_ACK)
Reply: TypeAlias = bytes | tuple[bytes, list[int]] | None


@dataclass(frozen=True)
class Route:
    """How the back-end serves one front-end request (rust-vmm: one arm of BackendReqHandler's
    match): the payload record it decodes into, the fds it carries, the protocol feature it needs
    (None: none), and the handler -- called with the record, and with the fds (which it takes
    ownership of by removing them from the list) unless the request carries none.  A request
    with no handler has a known layout and is refused after its checks (not supported)."""

    payload: type[Payload]
    handler: Callable[..., Reply] | None
    fds: FdRule = FdRule.NONE
    feature: ProtocolFeature | None = None


class VhostUserBackend:
    """Serve *device* (a kickcall VirtIODevice) on a Unix socket.

    ``protocol_features`` is what the back-end offers; ``on_connect``/``on_disconnect`` are told
    of each front-end.  ``start()`` serves on the event loop (``loop``, its own ``kc-be-loop`` thread
    when none is given); ``stop()`` ends it.
    ``message_deadline`` bounds each front-end message from its first byte to its last,
    ``backend_req_timeout`` the front-end's acknowledgement of a back-end request, and
    ``accept_pause`` how long the listener rests when accept() runs out of fds (seconds).
    """

    def __init__(self, device: VirtIODevice, *, socket_path: str | None = None, listen_fd: int | None = None,
                 protocol_features: int = DEFAULT_PROTOCOL_FEATURES, name: str = "vhost-user-backend",
                 registry: NotifierRegistry | None = None, loop: IOThread | None = None,
                 message_deadline: float = MESSAGE_DEADLINE, backend_req_timeout: float = BACKEND_REQ_TIMEOUT,
                 accept_pause: float = ACCEPT_PAUSE, claim: SocketClaim | None = None) -> None:
        if claim is not None:
            socket_path = claim.path
        if (socket_path is None) == (listen_fd is None):
            raise ValueError("give exactly one of socket_path and listen_fd")
        self.device = device
        self.name = name
        self.registry = registry or NotifierRegistry()
        self.offered_protocol_features = protocol_features
        self.loop = loop or IOThread(f"{name}-loop", thread_name="kc-be-loop")
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
        self.message_deadline = message_deadline
        self.backend_req_timeout = backend_req_timeout
        self.accept_pause = accept_pause
        self.conn: socket.socket | None = None
        self.peer = ""  # the front-end, as its credentials name it ("pid 123 uid 1000")
        self._reader = MessageReader()
        self._legacy_reads = False  # this connection is read the old way (per-message-deadline off)
        self._msg_timer: Timer | None = None
        self.slow_peers = 0  # connections closed because a message missed its deadline
        self.accept_pauses = 0
        self._accept_timer: Timer | None = None
        self.backend_req: socket.socket | None = None
        self._req_reader = MessageReader()
        self._req_pending: list[tuple[int, Timer]] = []  # (request, deadline timer), oldest first
        self.backend_reqs_sent = 0
        self.backend_reqs_acked = 0
        self.backend_req_dropped = ""  # why the last back-end request channel was given up
        self._recovery: dict[int, set[str]] | None = None  # rings stopped since the device broke
        self.recoveries = 0
        self.device_resets = 0  # RESET_OWNER / RESET_DEVICE received (all connections)
        self.vrings = [BackendVring(i) for i in range(len(device.queues))]
        self.memory: VhostMemory | None = None
        self.inflight: InflightRegion | None = None
        self.features = 0
        self.protocol_features = 0
        self.owner = False
        self.connections = 0
        self.disconnects = 0
        self.protocol_errors = 0  # connections closed because the front-end broke the protocol
        self.protocol_error_kinds: dict[str, int] = {}  # the same, by ProtocolErrorKind
        self.last_error = ""
        self.last_error_kind: ProtocolErrorKind | None = None
        self.internal_errors = 0  # exceptions the back-end did not expect (bugs), never the peer's doing
        self.last_internal_error = ""
        self.message_counts: dict[str, int] = {}
        self.trace: list[str] = []  # message names of the current connection, for tests and debugging
        self.on_connect: Callable[[], None] | None = None
        self.on_disconnect: Callable[[str], None] | None = None
        # a test seam: called (loop thread) with every request that passed its checks, before its
        # handler; an exception it raises is handled as the handler's would be
        self.message_hook: Callable[[Message], None] | None = None
        self.faults = FaultRegistry(name)
        fix = {n: self.faults.switch(n, effect) for n, effect in FIXES.items()}
        self._per_message_deadline = fix["per-message-deadline"]
        self._pause_listener_on_emfile = fix["pause-listener-on-emfile"]
        self._async_backend_req_ack = fix["async-backend-req-ack"]
        self._guard_err_signal = fix["guard-err-signal"]
        self._refuse_semaphore_kick = fix["refuse-semaphore-kick"]
        self._bound_stuck_kick = fix["bound-stuck-kick"]
        self._check_inflight_ring_size = fix["check-inflight-ring-size"]
        self._recover_after_ring_reinit = fix["recover-after-ring-reinit"]
        self._forget_rings_on_reset = fix["forget-rings-on-reset"]
        self._validate_messages = fix["validate-messages"]
        self._report_poll_errors = fix["report-poll-errors"]
        self._poll_recheck = fix["poll-recheck"]
        self._restore_notifications = fix["restore-notifications-on-start"]
        # a test seam: called (loop thread) with a queue's index when the loop stops polling that
        # ring, before its notifications are re-enabled and its avail ring checked again
        self.poll_end_hook: Callable[[int], None] | None = None
        self._lose_kick = self.faults.queue_drop(
            "lose-kick", "a kick that reached the back-end's kick fd is consumed and ignored (the ring is not processed)")
        self._lose_call = self.faults.queue_drop(
            "lose-call", "a call the device asked for is never written to the queue's call fd")
        self._self_kick_after_reconnect = fix["self-kick-after-reconnect"]
        device.transport = _BackendTransport(self)
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
        self.loop.run_sync(self._watch_listener)
        return self

    def _watch_listener(self) -> None:
        self._accept_timer = None
        if self._stopped.is_set() or self.listener.fileno() < 0:
            return
        self.loop.set_fd_handler(self.listener.fileno(), self._accept)

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
        if self._accept_timer is not None:
            self._accept_timer.cancel()
            self._accept_timer = None
        self.loop.remove_fd_handler(self.listener.fileno())
        self.listener.close()
        if self.claim is not None and self._own_claim:  # the socket file only if it is still ours
            self.claim.release()

    def _accept(self) -> None:
        try:
            conn, _ = self.listener.accept()
        except (BlockingIOError, InterruptedError):
            return
        except OSError as e:
            if not self._pause_listener_on_emfile.fix_on:
                raise
            if e.errno in _OUT_OF_FDS:
                self._pause_listener(e)
            else:  # the connection died in the backlog (ECONNABORTED, EPROTO): it is gone, go on
                log.warning("%s: accept: %s", self.name, e)
            return
        if self.conn is not None:  # one front-end at a time (not reached: see below)
            conn.close()
            return
        # while a front-end is served the listener is not watched: the next one waits in the
        # backlog until this one is gone (as qemu-storage-daemon's server does), instead of being
        # accepted and closed at once -- a front-end reconnecting before the back-end has seen the
        # old connection close would otherwise be refused
        self.loop.remove_fd_handler(self.listener.fileno())
        self._legacy_reads = not self._per_message_deadline.fix_on
        if self._legacy_reads:
            conn.setblocking(True)
            conn.settimeout(self.message_deadline)  # restarts on every byte: a dribbler holds the loop
        else:
            conn.setblocking(False)  # the loop never waits on a front-end
        self.conn = conn
        self.peer = _peer_name(conn)
        self._reader = MessageReader()
        self.connections += 1
        self.trace = []
        self._recovery = None
        self.device.reset()
        self.device.mem = None
        self.loop.set_fd_handler(conn.fileno(), self._readable)
        log.info("%s: front-end connected (%s)", self.name, self.peer)
        if self.on_connect is not None:
            self.on_connect()

    def _pause_listener(self, e: OSError) -> None:
        """accept() ran out of fds: the connection stays in the backlog and the listener stays
        readable, so polling it now would spin.  Rest for ``accept_pause`` and try again; one log
        line per pause."""
        self.accept_pauses += 1
        self.loop.remove_fd_handler(self.listener.fileno())
        log.warning("%s: accept: %s; not accepting for %.1f s (pause %d)", self.name, e.strerror or e,
                    self.accept_pause, self.accept_pauses)
        if self._accept_timer is not None:
            self._accept_timer.cancel()
        self._accept_timer = self.loop.call_later(self.accept_pause, self._watch_listener)

    def _disconnect(self, why: str) -> None:
        conn = self.conn
        if conn is None:
            return
        self.loop.remove_fd_handler(conn.fileno())
        conn.close()
        self.conn = None
        if self._accept_timer is None:  # the next front-end, waiting in the backlog, is accepted now
            self._watch_listener()
        self._cancel_message_deadline()
        self._reader.close()  # and the fds of a message that never finished
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
            v.stopped = False
            v.call_nofd = False
        self.device.release_rings()
        for q in self.device.queues:
            q.inflight = None
        self._drop_backend_req(None)
        self._recovery = None
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
        if self._legacy_reads:
            self._readable_blocking(conn)
            return
        for _ in range(MESSAGES_PER_EVENT):
            try:
                msg = self._reader.feed(conn)
            except EOFError:
                self._disconnect("front-end closed the socket")
                return
            except ProtocolError as e:
                self._protocol_error(e.kind, f"bad message: {e}")
                return
            except OSError as e:
                self._protocol_error(ProtocolErrorKind.SOCKET_ERROR, f"bad message: {e}")
                return
            if msg is None:
                if self._reader.started and self._msg_timer is None:
                    self._msg_timer = self.loop.call_later(self.message_deadline, self._message_overdue, conn)
                return
            self._cancel_message_deadline()
            self._serve_message(conn, msg)
            if self.conn is not conn:
                return

    def _readable_blocking(self, conn: socket.socket) -> None:
        """``per-message-deadline`` off: the old way, a blocking read with a per-recv timeout."""
        try:
            msg = recv_message(conn)
        except EOFError:
            self._disconnect("front-end closed the socket")
            return
        except ProtocolError as e:
            self._protocol_error(e.kind, f"bad message: {e}")
            return
        except OSError as e:
            self._protocol_error(ProtocolErrorKind.SOCKET_ERROR, f"bad message: {e}")
            return
        self._serve_message(conn, msg)

    def _cancel_message_deadline(self) -> None:
        t, self._msg_timer = self._msg_timer, None
        if t is not None:
            t.cancel()

    def _message_overdue(self, conn: socket.socket) -> None:
        """A message's deadline passed (timer): the front-end is too slow; close the connection."""
        if self.conn is not conn or self._msg_timer is None:
            return
        self._msg_timer = None
        self.slow_peers += 1
        self._protocol_error(ProtocolErrorKind.MESSAGE_DEADLINE, f"front-end {self.peer} too slow: a message was not complete {self.message_deadline:g} s "
                             f"after its first byte ({self._reader.describe()})")

    def _serve_message(self, conn: socket.socket, msg: Message) -> None:
        name = msg.name()
        try:
            reply = self._dispatch(msg)
        except ProtocolError as e:
            msg.close_fds()
            self._protocol_error(e.kind, f"{name}: {e}")
            return
        except OSError as e:  # a system call on the front-end's behalf failed (an fd it sent, ...)
            msg.close_fds()
            self._protocol_error(ProtocolErrorKind.OS_ERROR, f"{name}: {e}")
            return
        except VirtQueueError as e:  # a ring the front-end set up cannot be read (SET_VRING_KICK's
            msg.close_fds()          # inflight recovery reads its indices): its kind stays in the text
            ring_kind = getattr(e, "kind", None)
            self._protocol_error(ProtocolErrorKind.RING_NOT_MAPPABLE,
                                 f"{name}: {e}" + (f" ({ring_kind})" if ring_kind is not None else ""))
            return
        except Exception as e:  # a bug in the back-end or its device: never the front-end's fault
            msg.close_fds()
            self._internal_error(f"handling {name}", e)
            return
        try:
            if reply is not None:
                payload, fds = reply if isinstance(reply, tuple) else (reply, [])
                send_message(conn, Message(msg.request, VERSION | FLAG_REPLY, payload, fds))
            elif msg.need_reply and self.protocol_features & (1 << PF.REPLY_ACK):
                send_message(conn, Message(msg.request, VERSION | FLAG_REPLY, U64.pack(0)))
        except BlockingIOError:
            self._protocol_error(ProtocolErrorKind.PEER_NOT_READING,
                                 f"front-end {self.peer} does not read its replies (the socket is full)")
        except OSError as e:
            self._disconnect(f"send failed: {e}")

    def _dispatch(self, msg: Message) -> Reply:
        """Decode and check one front-end request, then run its handler (``_ROUTES``).

        The checks, in this order and in this one place: the request is one the table knows;
        its header flags (rust-vmm: reserved bits, REPLY on a request); its payload size and
        type; the fds that came with it; the record's ``validate()``; the protocol feature it
        needs.  With the ``validate-messages`` fix off, flags and ring alignment are not checked
        (what the back-end accepted before issue 9)."""
        route = self._ROUTES.get(msg.request)
        name = msg.name()
        if route is None:
            if msg.request in _KNOWN_REQUESTS:
                raise ProtocolError(ProtocolErrorKind.UNSUPPORTED_REQUEST, f"{name} is not supported by this back-end")
            raise ProtocolError(ProtocolErrorKind.UNKNOWN_REQUEST, f"unknown front-end request {msg.request}")
        strict = self._validate_messages.fix_on
        if strict:
            check_request_flags(msg.flags)
        rec = route.payload.decode(msg.payload)
        check_fds(rec, route.fds, len(msg.fds))
        rec.validate(strict=strict)
        self.message_counts[name] = self.message_counts.get(name, 0) + 1
        self.trace.append(name)
        if _t_read.enabled:
            _t_read.emit(req=name, flags=msg.flags, size=len(msg.payload), fds=len(msg.fds))
        if self.message_hook is not None:
            self.message_hook(msg)
        if route.handler is None:
            raise ProtocolError(ProtocolErrorKind.UNSUPPORTED_REQUEST, f"{name} is not supported by this back-end")
        if route.feature is not None and not self.protocol_features & (1 << route.feature):
            raise ProtocolError(ProtocolErrorKind.INACTIVE_FEATURE,
                                f"{name} without protocol feature {route.feature.name}")
        if route.fds is FdRule.NONE:
            return route.handler(self, rec)
        return route.handler(self, rec, msg.fds)

    def _protocol_error(self, kind: ProtocolErrorKind, what: str) -> None:
        """The front-end broke the protocol: count it (by kind), log it, close the connection."""
        self.protocol_errors += 1
        self.protocol_error_kinds[kind.value] = self.protocol_error_kinds.get(kind.value, 0) + 1
        self.last_error = what
        self.last_error_kind = kind
        log.error("%s: closing the connection: %s", self.name, what)
        self._disconnect(what)

    def _internal_error(self, what: str, exc: BaseException, *, close: bool = True) -> None:
        """A Python exception the back-end did not expect (a bug here or in the device, never the
        front-end's doing): counted apart from protocol errors, the traceback written to a crash
        report (``kickcall.crash``), one log line.  With *close* (a message's handler failed:
        what the connection set up is unknown) the connection is closed, as before; a device
        handler that failed on a kick leaves it open (the loop went on before too)."""
        self.internal_errors += 1
        path = ""
        if self.internal_errors <= MAX_CRASH_REPORTS:  # a bug met on every kick writes a few, not thousands
            text = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
            path = crash_report(f"{self.name}: internal error {what}", text)
        line = f"internal error {what}: {type(exc).__name__}: {exc}"
        self.last_internal_error = line
        log.error("%s: %s%s", self.name, line, f" (crash report: {path})" if path else "")
        if close and self.conn is not None:
            self._disconnect(line)

    def _vring(self, index: int) -> BackendVring:
        if not 0 <= index < len(self.vrings):
            raise ProtocolError(ProtocolErrorKind.BAD_RING_INDEX,
                                f"no queue {index} (the device has {len(self.vrings)})")
        return self.vrings[index]

    def offered_features(self) -> int:
        """GET_FEATURES: the device's features and VHOST_USER_F_PROTOCOL_FEATURES."""
        return self.device.host_features | (1 << VHOST_USER_F_PROTOCOL_FEATURES)

    # -- one handler per front-end request (the table, ``_ROUTES``, follows the class) ------------
    def _on_get_features(self, rec: Empty) -> Reply:
        return U64.pack(self.offered_features())

    def _on_set_features(self, rec: U64Payload) -> Reply:
        f = rec.value
        if f & ~self.offered_features() & ~(1 << VHOST_F_LOG_ALL):
            raise ProtocolError(ProtocolErrorKind.FEATURE_MISMATCH,
                                f"SET_FEATURES {f:#x} has bits the back-end did not offer")
        if f & (1 << VHOST_F_LOG_ALL):
            raise ProtocolError(ProtocolErrorKind.BAD_LOG, "dirty logging (VHOST_F_LOG_ALL) is not supported")
        self.features = f
        dev_f = f & ~(1 << VHOST_USER_F_PROTOCOL_FEATURES)
        if not dev_f >> VIRTIO_F_VERSION_1 & 1 or not self.device.set_features(dev_f):
            raise ProtocolError(ProtocolErrorKind.DEVICE_REFUSED_FEATURES,
                                f"the device refused features {dev_f:#x} (VERSION_1 is required)")
        self.device.set_status(FEATURES_OK | DRIVER_OK)
        if not f & (1 << VHOST_USER_F_PROTOCOL_FEATURES):
            for v in self.vrings:
                self._enable(v, True)
        return None

    def _on_set_owner(self, rec: Empty) -> Reply:
        self.owner = True
        return None

    def _on_reset_owner(self, rec: Empty) -> Reply:
        self._reset_device(keep_owner=False)
        return None

    def _on_reset_device(self, rec: Empty) -> Reply:
        self._reset_device(keep_owner=True)
        return None

    def _reset_device(self, keep_owner: bool) -> None:
        """RESET_OWNER / RESET_DEVICE: stop every ring, reset the device, forget the rings."""
        for v in self.vrings:
            self._stop_ring(v)
        self._recovery = None
        self.device_resets += 1
        self.device.reset()
        if self._forget_rings_on_reset.fix_on:
            for v in self.vrings:  # the queues were reset: set up again before any processing
                self._forget_ring(v)
        self.owner = keep_owner and self.owner

    def _on_get_protocol_features(self, rec: Empty) -> Reply:
        return U64.pack(self.offered_protocol_features)

    def _on_set_protocol_features(self, rec: U64Payload) -> Reply:
        pf = rec.value
        if pf & ~self.offered_protocol_features:
            raise ProtocolError(ProtocolErrorKind.FEATURE_MISMATCH,
                                f"SET_PROTOCOL_FEATURES {pf:#x} has bits the back-end did not offer")
        self.protocol_features = pf
        return None

    def _on_get_queue_num(self, rec: Empty) -> Reply:
        return U64.pack(len(self.vrings))

    def _on_get_max_mem_slots(self, rec: Empty) -> Reply:
        return U64.pack(MAX_MEM_SLOTS)

    def _on_set_mem_table(self, rec: MemTable, fds: list[int]) -> Reply:
        mem = VhostMemory()
        taken = list(fds)
        fds.clear()
        used = 0  # fds now owned by mem
        try:
            for reg, fd in zip(rec.regions, taken, strict=True):
                mem.add_user_region(reg, fd)
                used += 1
        except BaseException:
            mem.close()
            for fd in taken[used:]:
                os.close(fd)
            raise
        self._swap_memory(mem)
        return None

    def _on_add_mem_reg(self, rec: SingleMemRegion, fds: list[int]) -> Reply:
        fd = fds.pop()
        mem = self.memory or VhostMemory()
        if len(mem.user_regions) >= MAX_MEM_SLOTS:
            os.close(fd)
            raise ProtocolError(ProtocolErrorKind.TOO_MANY_REGIONS, "ADD_MEM_REG beyond the advertised memory slots")
        self._quiesce_io()
        try:
            mem.add_user_region(rec.region, fd)
        except BaseException:
            os.close(fd)
            raise
        self._swap_memory(mem, same=self.memory is mem)
        return None

    def _on_rem_mem_reg(self, rec: SingleMemRegion) -> Reply:
        if self.memory is None:
            raise ProtocolError(ProtocolErrorKind.NO_MEMORY_TABLE, "REM_MEM_REG without a memory table")
        self._quiesce_io()
        for v in self.vrings:
            self.device.queues[v.index].unmap()
        self.memory.remove_user_region(rec.region)
        self._swap_memory(self.memory, same=True)
        return None

    def _on_set_vring_num(self, rec: VringState) -> Reply:
        idx, num = rec.index, rec.num
        v = self._vring(idx)
        q = self.device.queues[idx]
        if num & (num - 1) or not 1 <= num <= q.num_max:
            raise ProtocolError(ProtocolErrorKind.BAD_RING_SIZE,
                                f"queue {idx}: size {num} is not a power of two up to {q.num_max}")
        self._check_inflight_fits(idx, num)
        q.set_num(num)
        v.num = num
        self._reinit_step(v, "num")
        return None

    def _on_set_vring_addr(self, rec: VringAddr) -> Reply:
        v = self._vring(rec.index)
        self._check_inflight_fits(rec.index, self.device.queues[rec.index].num)
        v.addr = (rec.desc, rec.used, rec.avail)
        self._map_ring(v)
        self._reinit_step(v, "addr")
        return None

    def _on_set_vring_base(self, rec: VringState) -> Reply:
        idx, num = rec.index, rec.num
        v = self._vring(idx)
        if num > 0xFFFF:
            raise ProtocolError(ProtocolErrorKind.BAD_RING_BASE, f"queue {idx}: base {num} is not a 16-bit index")
        v.base = num
        self.device.queues[idx].set_last_avail_idx(num)
        self._reinit_step(v, "base")
        return None

    def _on_get_vring_base(self, rec: VringState) -> Reply:
        idx = rec.index
        v = self._vring(idx)
        self._stop_ring(v)
        v.stopped = True
        v.get_vring_base += 1
        q = self.device.queues[idx]
        base = q.get_last_avail_idx() if v.addr is not None else v.base
        for attr in ("kick", "call"):
            self._set_fd(v, attr, None)
        if self.device.broken and self._recover_after_ring_reinit.fix_on:
            if self._recovery is None:
                self._recovery = {}
            self._recovery[idx] = set()  # stopped: it may now be set up again from scratch
            self._check_recovered()
        return VRING_STATE.pack(idx, base)

    def _on_set_vring_kick(self, rec: VringFile, fds: list[int]) -> Reply:
        return self._set_vring_file("kick", rec, fds)

    def _on_set_vring_call(self, rec: VringFile, fds: list[int]) -> Reply:
        return self._set_vring_file("call", rec, fds)

    def _on_set_vring_err(self, rec: VringFile, fds: list[int]) -> Reply:
        return self._set_vring_file("err", rec, fds)

    def _set_vring_file(self, attr: str, rec: VringFile, fds: list[int]) -> Reply:
        """SET_VRING_KICK/CALL/ERR: adopt the eventfd (none with VRING_NOFD)."""
        what = f"SET_VRING_{attr.upper()}"
        v = self._vring(rec.index)
        vfd = fds.pop() if fds else None
        try:
            n = EventNotifier.adopt(vfd, f"{self.name}.vq{v.index}.{attr}") if vfd is not None else None
        except Exception as e:  # EventNotifier.adopt refuses what is not an eventfd
            if vfd is not None:
                os.close(vfd)
            raise ProtocolError(ProtocolErrorKind.BAD_FD, f"{what}: not an eventfd: {e}") from None
        if n is not None and attr == "kick" and self._refuse_semaphore_kick.fix_on:
            try:
                sem = n.is_semaphore()
            except OSError as e:
                n.close()
                raise ProtocolError(ProtocolErrorKind.BAD_FD, f"cannot read the kick fd's fdinfo: {e}") from None
            if sem:
                n.close()
                raise ProtocolError(ProtocolErrorKind.SEMAPHORE_KICK_FD,
                                    f"queue {v.index}: the kick fd is an EFD_SEMAPHORE eventfd "
                                    f"(a read takes 1, so it would stay readable); refused")
        self._set_fd(v, attr, n)
        if attr == "call":
            v.call_nofd = n is None
        if attr == "kick":
            v.stopped = False  # the front-end (re)starts the ring: it starts on a kick on this fd
            self._kick_fd_set(v)
        if attr in ("kick", "call"):
            self._reinit_step(v, attr)
        return None

    def _on_set_vring_enable(self, rec: VringState) -> Reply:
        v = self._vring(rec.index)
        if rec.num not in (0, 1):
            raise ProtocolError(ProtocolErrorKind.BAD_VRING_ENABLE, f"SET_VRING_ENABLE {rec.num}")
        self._enable(v, bool(rec.num))
        return None

    def _on_get_config(self, rec: ConfigAccess) -> Reply:
        cfg = self.device.get_config()
        off, size = rec.offset, rec.size
        data = cfg[off:off + size] if off < len(cfg) else b""
        return CONFIG_HDR.pack(off, size, rec.flags) + data.ljust(size, b"\0")

    def _on_set_config(self, rec: ConfigAccess) -> Reply:
        self.device.set_config(rec.offset, rec.data)
        return None

    def _on_set_backend_req_fd(self, rec: Empty, fds: list[int]) -> Reply:
        fd = fds.pop()
        try:
            s = socket.socket(fileno=fd)
        except OSError as e:
            os.close(fd)
            raise ProtocolError(ProtocolErrorKind.BAD_FD, f"SET_BACKEND_REQ_FD: {e}") from None
        if s.family != socket.AF_UNIX:
            s.close()
            raise ProtocolError(ProtocolErrorKind.BAD_FD, "SET_BACKEND_REQ_FD: not a Unix socket")
        self._drop_backend_req(None)
        self.backend_req_dropped = ""
        self.backend_req = s
        if self._async_backend_req_ack.fix_on:
            s.setblocking(False)
            self._req_reader = MessageReader()
            self.loop.set_fd_handler(s.fileno(), functools.partial(self._backend_req_readable, s))
        else:
            s.settimeout(self.backend_req_timeout)
        return None

    def _check_inflight_queues(self, what: str, rec: Inflight) -> None:
        if rec.num_queues > len(self.vrings):
            raise ProtocolError(ProtocolErrorKind.BAD_INFLIGHT,
                                f"{what} for {rec.num_queues} queues of {rec.queue_size} (the device has "
                                f"{len(self.vrings)})")
        self._check_rings_fit_inflight(rec.num_queues, rec.queue_size)

    def _on_get_inflight_fd(self, rec: Inflight) -> Reply:
        self._check_inflight_queues("GET_INFLIGHT_FD", rec)
        region = InflightRegion.create(rec.num_queues, rec.queue_size)
        self._attach_inflight(region)
        return INFLIGHT.pack(region.mmap_size, region.mmap_offset, rec.num_queues, rec.queue_size), [region.fd]

    def _on_set_inflight_fd(self, rec: Inflight, fds: list[int]) -> Reply:
        self._check_inflight_queues("SET_INFLIGHT_FD", rec)  # on failure the dispatcher closes the fd
        fd = fds.pop()
        try:
            region = InflightRegion(fd, rec.mmap_size, rec.mmap_offset, rec.num_queues, rec.queue_size)
        except (ValueError, OSError) as e:
            os.close(fd)
            raise ProtocolError(ProtocolErrorKind.BAD_INFLIGHT, f"SET_INFLIGHT_FD: {e}") from None
        self._attach_inflight(region)
        return None

    def _on_set_vring_endian(self, rec: VringState) -> Reply:
        return None  # legacy only; we are a VERSION_1 (little-endian) device

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
            raise ProtocolError(ProtocolErrorKind.NO_MEMORY_TABLE, f"queue {v.index}: ring addresses before a memory table")
        assert v.addr is not None
        desc, used, avail = v.addr
        q = self.device.queues[v.index]
        n = q.num
        gdesc = self.memory.uva_to_gpa(desc, desc_table_size(n))
        gavail = self.memory.uva_to_gpa(avail, avail_size(n))
        gused = self.memory.uva_to_gpa(used, used_size(n))
        q.mem = self.memory
        q.set_rings(gdesc, gavail, gused)
        try:
            q.map(self.memory)
        except VirtQueueError as e:  # the ring's kind (RingErrorKind) stays in the text
            ring_kind = getattr(e, "kind", None)
            raise ProtocolError(ProtocolErrorKind.RING_NOT_MAPPABLE,
                                f"{e}" + (f" ({ring_kind})" if ring_kind is not None else "")) from None
        if read_used:
            # the used index lives in guest memory: a stale copy across a reset would corrupt the ring
            q.update_used_idx()
            q.invalidate_signalled_used()
        q.enabled = True

    def _ring_size(self, v: BackendVring) -> int | None:
        """The size the ring has or will have: SET_VRING_NUM's, or the queue's own once mapped."""
        if v.num:
            return v.num
        if v.addr is not None:
            return self.device.queues[v.index].num
        return None

    def _check_inflight_fits(self, idx: int, num: int) -> None:
        """A ring of *num* entries on queue *idx* must fit its part of the inflight region: each
        head has a slot there, and a head past the end would land on the next queue's header."""
        if not self._check_inflight_ring_size.fix_on:
            return
        reg = self.inflight
        if reg is not None and idx < reg.num_queues and num > reg.queue_size:
            raise ProtocolError(ProtocolErrorKind.INFLIGHT_MISMATCH,
                                f"queue {idx}: a ring of {num} entries does not fit the inflight region "
                                f"(queue size {reg.queue_size})")

    def _check_rings_fit_inflight(self, nq: int, qsize: int) -> None:
        """GET/SET_INFLIGHT_FD: every ring already sized (or mapped) must fit the region."""
        if not self._check_inflight_ring_size.fix_on:
            return
        for v in self.vrings[:nq]:
            n = self._ring_size(v)
            if n is not None and n > qsize:
                raise ProtocolError(ProtocolErrorKind.INFLIGHT_MISMATCH,
                                    f"queue size {qsize} is smaller than queue {v.index}'s ring of {n} entries")

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
        if attr == "kick":
            self._leave_polling(v)
            v.kick_stuck = 0
            if v.kick_throttle_timer is not None:
                v.kick_throttle_timer.cancel()
                v.kick_throttle_timer = None
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
        iq = self.inflight.queues[v.index] if self.inflight is not None and v.index < len(
            self.inflight.queues) else None
        if v.addr is not None and iq is not None:
            # a region that already carries state is a reconnect: the back-end before us may
            # have read the guest's last kick and died before acting on it
            reconnect = iq.version != 0
            try:
                q.resubmit = iq.recover(q.guest_used_idx())
            except ValueError as e:
                raise ProtocolError(ProtocolErrorKind.INFLIGHT_CORRUPT, str(e)) from None
            if reconnect and self._self_kick_after_reconnect.fix_on:
                replay = bool(q.resubmit) or q.guest_avail_idx() != q.guest_used_idx()
            if q.resubmit:
                q.set_last_avail_idx((q.guest_used_idx() + len(q.resubmit)) & 0xFFFF)
                log.info("%s: queue %d: resubmitting %d in-flight requests", self.name, v.index, len(q.resubmit))
                v.started = True
                v.pending_kick = True
        if v.addr is not None and not v.polling and self._restore_notifications.fix_on:
            # the ring may come from a back-end that died while it polled (its suppression is
            # still in the ring, and the driver does not kick): ask for kicks again, as polling
            # off means, before the first one is awaited
            try:
                q.set_notification(True)
            except VirtQueueError:
                pass
        if v.kick is not None:
            self.loop.set_fd_handler(v.kick.fileno(), functools.partial(self._kicked, v), poll=self._poll_handler(v))
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

    # -- adaptive polling of the avail ring (the loop's PollHandler per kick fd) ---------------------
    def _poll_handler(self, v: BackendVring) -> PollHandler:
        return PollHandler(poll=functools.partial(self._ring_polled, v), ready=functools.partial(self._poll_ready, v),
                           begin=functools.partial(self._poll_begin, v), end=functools.partial(self._poll_end, v))

    def _ring_serving(self, v: BackendVring) -> bool:
        return v.started and v.enabled and not v.stopped and v.addr is not None and self.memory is not None \
            and self.conn is not None and not self.device.broken

    def _ring_polled(self, v: BackendVring) -> bool:
        """The poll check: has the driver published past what the device took?  One 16-bit load
        of avail.idx, no side effects (a ring not being served has no work to poll)."""
        if not v.polling:
            return False
        q = self.device.queues[v.index]
        try:
            a = q.guest_avail_idx()
        except VirtQueueError:
            return False
        return a != q.last_avail_idx and a != v.poll_idle_at

    def _poll_ready(self, v: BackendVring) -> None:
        """Polling (or the re-check when it ended) found work: process the ring as a kick would."""
        if not self._ring_serving(v):
            return
        q = self.device.queues[v.index]
        before = q.popped
        self._process(v)
        took = q.popped - before
        v.polled_requests += took
        if took:
            v.poll_idle_at = -1
        else:  # nothing could be taken (a chain the device refused, say): do not spin on it
            try:
                v.poll_idle_at = q.guest_avail_idx()
            except VirtQueueError:
                pass

    def _poll_begin(self, v: BackendVring) -> None:
        """The loop starts polling: ask the driver not to kick this ring (a ring not being served
        keeps its notifications: its first kick is what starts it)."""
        if v.polling or not self._ring_serving(v):
            return
        try:
            self.device.queues[v.index].suppress_notifications()
        except VirtQueueError:
            return
        v.polling = True

    def _poll_end(self, v: BackendVring) -> bool:
        """The loop stops polling: re-enable notifications, then look at avail.idx again (after
        the barrier in ``set_notification``): a request published while the driver still saw
        them suppressed was not kicked, and only this re-check finds it (``poll-recheck``)."""
        if not v.polling:
            return False
        v.polling = False
        if self.poll_end_hook is not None:
            self.poll_end_hook(v.index)
        if not self._ring_serving(v):
            return False
        q = self.device.queues[v.index]
        try:
            q.set_notification(True)
            if not self._poll_recheck.fix_on:
                return False
            a = q.guest_avail_idx()
        except VirtQueueError:
            return False
        return a != q.last_avail_idx and a != v.poll_idle_at

    def _leave_polling(self, v: BackendVring) -> None:
        """The ring stops being served while the loop polls it: give the driver its notifications
        back now (the loop will not call ``end`` for a kick fd that went away)."""
        if not v.polling:
            return
        v.polling = False
        if self.device.broken or v.addr is None or self.memory is None:
            return
        try:
            self.device.queues[v.index].set_notification(True)
        except VirtQueueError:
            pass

    def _poll(self, v: BackendVring) -> None:
        v.poll_timer = None
        if self.conn is None or v.kick is not None or v.stopped:
            return
        if v.addr is not None:
            q = self.device.queues[v.index]
            v.polls += 1
            try:
                if not q.is_empty():
                    self._ring_kicked(v)
            except VirtQueueError as e:
                if self._report_poll_errors.fix_on and not self.device.broken:
                    self._poll_error(v, q, e)  # polling goes on, as a kick fd stays watched
        v.poll_timer = self.loop.call_later(0.001, self._poll, v)

    def _poll_error(self, v: BackendVring, q: VirtQueue, e: VirtQueueError) -> None:
        """Polling met a ring error (the avail index, say): reported as a kick that met it would
        be -- the queue's error counted, the device marked as needing a reset, the ring stopped and
        its err fd written (``_ring_broke``) -- instead of being swallowed."""
        v.poll_errors += 1
        q.errors += 1
        ring_kind = getattr(e, "kind", None)
        self.device.virtio_error(f"{e}" + (f" ({ring_kind}, while polling)" if ring_kind is not None
                                           else " (while polling)"))
        self._ring_broke(v)

    def _kicked(self, v: BackendVring) -> None:
        kick = v.kick
        if kick is None:
            return
        got = kick.test_and_clear()
        if not got:
            return
        if self._bound_stuck_kick.fix_on:
            if got == 1:
                self._check_stuck_kick(v, kick)
            else:  # a read that took more than 1: a busy writer, not a semaphore
                v.kick_stuck = 0
        v.kicks += 1
        if _t_kick.enabled:
            _t_kick.emit(vdev=self.name, n=v.index)
        if self._lose_kick.take(v.index):
            return
        self._ring_kicked(v)

    def _ring_kicked(self, v: BackendVring) -> None:
        """The ring has work (a kick, or polling found some): start it and process it.  On a
        broken device the ring stays stopped; the kick is remembered for a recovery."""
        v.pending_kick = True
        if self.device.broken:
            return
        v.started = True
        if v.enabled:
            self._process(v)

    def _check_stuck_kick(self, v: BackendVring, kick: EventNotifier) -> None:
        """A read took 1 and the kick fd is still readable: an EFD_SEMAPHORE eventfd (the kernel did
        not say so at SET_VRING_KICK) or a writer racing us.  After KICK_STUCK_LIMIT reads in a
        row, stop watching the fd and look at it again every KICK_THROTTLE seconds: the ring is
        still served, the loop does not spin."""
        try:
            still = bool(select.select([kick.fileno()], [], [], 0)[0])
        except (OSError, ValueError):
            return
        if not still:
            v.kick_stuck = 0
            return
        v.kick_stuck += 1
        if v.kick_stuck < KICK_STUCK_LIMIT:
            return
        self._leave_polling(v)
        self.loop.remove_fd_handler(kick.fileno())
        v.kick_throttles += 1
        if v.kick_throttles == 1:
            log.warning("%s: queue %d: the kick fd stays readable after every read (an EFD_SEMAPHORE eventfd?); "
                        "polling it every %g s instead", self.name, v.index, KICK_THROTTLE)
        v.kick_throttle_timer = self.loop.call_later(KICK_THROTTLE, self._rewatch_kick, v, kick)

    def _rewatch_kick(self, v: BackendVring, kick: EventNotifier) -> None:
        v.kick_throttle_timer = None
        if v.kick is not kick or self.conn is None:
            return
        self.loop.set_fd_handler(kick.fileno(), functools.partial(self._kicked, v), poll=self._poll_handler(v))

    def _enable(self, v: BackendVring, on: bool) -> None:
        v.enabled = on
        if on and v.started and v.pending_kick:
            self._process(v)

    def _process(self, v: BackendVring) -> None:
        """Run the device's queue handler (rings must be started, enabled and mapped)."""
        if v.addr is None or self.memory is None:
            return
        dev = self.device
        if dev.broken:
            return  # a kick on a broken device waits: served if the front-end recovers the device
        v.pending_kick = False
        q = dev.queues[v.index]
        try:
            dev.process_queue(q)
            if v.polling and not dev.broken and not q.poll_suppressed:  # a handler that re-enabled them
                q.suppress_notifications()
        except Exception as e:  # a bug in the device's handler (ring errors are caught inside)
            self._internal_error(f"processing queue {v.index}", e, close=False)
            return
        if dev.broken:
            self._ring_broke(v)

    def _ring_broke(self, v: BackendVring) -> None:
        """A ring error broke the device (DEVICE_NEEDS_RESET): count it, stop the ring, write its
        err fd."""
        v.errors += 1
        log.error("%s: queue %d: %s", self.name, v.index, self.device.broken_reason)
        if not self._guard_err_signal.fix_on:
            if v.err is not None:
                v.err.set()
            self._stop_ring(v, drain=False)
            return
        self._stop_ring(v, drain=False)  # first: whatever the err fd does, the ring stops
        self._signal_err(v)

    def _signal_err(self, v: BackendVring) -> None:
        """Write the err fd: the front-end marks the device as needing a reset (QEMU: virtio_error).
        An err fd that cannot take it (at its maximum count: the front-end never read it, and it is
        readable anyway) is logged once per ring, never raised."""
        if v.err is None:
            return
        try:
            v.err.set()
        except OSError as e:
            v.err_write_failures += 1
            if v.err_write_failures == 1:
                log.warning("%s: queue %d: cannot write the err fd (%s); the ring is stopped anyway",
                            self.name, v.index, e.strerror or e)

    # -- recovery after a ring error ----------------------------------------------------------------
    def _reinit_step(self, v: BackendVring, step: str) -> None:
        """One step of a ring's set-up arrived.  While the device is broken, a ring stopped with
        GET_VRING_BASE counts its steps; once every ring the front-end set up has been stopped,
        none is half set up again, and at least one is set up completely, the device is usable."""
        rec = self._recovery
        if rec is None or v.index not in rec or not self.device.broken:
            return
        rec[v.index].add(step)
        self._check_recovered()

    def _check_recovered(self) -> None:
        rec = self._recovery
        if rec is None or not self.device.broken:
            return
        for w in self.vrings:
            steps = rec.get(w.index)
            if steps is None:
                if w.addr is not None:
                    return  # a ring still set up as it was when the device broke
            elif steps and steps != _REINIT_STEPS:
                return  # half set up again
        if not any(steps == _REINIT_STEPS for steps in rec.values()):
            return
        self._recovery = None
        self.recoveries += 1
        log.info("%s: every ring was stopped and set up again: the device is usable again (it broke on: %s)",
                 self.name, self.device.broken_reason)
        self.device.clear_error()
        for w in self.vrings:  # kicks that came after a ring was set up again
            if w.pending_kick and w.addr is not None:
                w.started = True
                if w.enabled:
                    self._process(w)

    def _forget_ring(self, v: BackendVring) -> None:
        """A device reset: the ring is not set up any more.  Its kick fd goes (a front-end hands one
        over each time it starts a ring); the call and err fds stay (QEMU hands them over once, at
        realize)."""
        self._set_fd(v, "kick", None)
        v.num = v.base = 0
        v.addr = None
        v.enabled = False
        v.started = False
        v.pending_kick = False
        v.stopped = False

    def _stop_ring(self, v: BackendVring, drain: bool = True) -> None:
        self._leave_polling(v)
        if drain:
            self.device.drain()
        v.started = False
        v.pending_kick = False
        if v.poll_timer is not None:
            v.poll_timer.cancel()
            v.poll_timer = None

    def queue_notify(self, index: int) -> None:
        """Signal queue *index*'s call fd (libvhost-user's vu_queue_notify, after the device's
        should-notify check): what the device's transport calls (loop thread)."""
        v = self.vrings[index]
        if self._lose_call.take(index):
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
        """Tell the front-end the device config changed (BACKEND_REQ CONFIG_CHANGE_MSG).

        Sent from the loop, never waited for there: with REPLY_ACK its acknowledgement is read
        when it comes, and a front-end that has not answered within ``backend_req_timeout``
        loses the channel.  From another thread the message is handed to the loop (True: queued).
        """
        if self._async_backend_req_ack.fix_on and self.loop.running and not self.loop.in_thread():
            try:
                self.loop.schedule(self._send_backend_req, BackendReq.CONFIG_CHANGE_MSG)
            except RuntimeError:  # the loop is stopping
                return False
            return True
        return self._send_backend_req(BackendReq.CONFIG_CHANGE_MSG)

    def _send_backend_req(self, req: BackendReq) -> bool:
        s = self.backend_req
        if s is None or not self.protocol_features & (1 << PF.BACKEND_REQ):
            return False
        ack = bool(self.protocol_features & (1 << PF.REPLY_ACK))
        flags = VERSION | (FLAG_NEED_REPLY if ack else 0)
        if not self._async_backend_req_ack.fix_on:
            try:
                send_message(s, Message(req, flags, b""))
                if ack:
                    rep = recv_message(s)
                    rep.close_fds()
            except (OSError, EOFError, ProtocolError) as e:
                log.warning("%s: config change message failed: %s", self.name, e)
                return False
            return True
        if len(self._req_pending) >= MAX_PENDING_BACKEND_REQS:
            self._drop_backend_req(f"the front-end left {len(self._req_pending)} back-end requests unanswered")
            return False
        try:
            send_message(s, Message(req, flags, b""))
        except BlockingIOError:
            self._drop_backend_req("the front-end does not read it (the socket is full)")
            return False
        except OSError as e:
            self._drop_backend_req(f"send failed: {e}")
            return False
        self.backend_reqs_sent += 1
        if ack:
            t = self.loop.call_later(self.backend_req_timeout, self._backend_req_overdue, s)
            self._req_pending.append((int(req), t))
        return True

    def _backend_req_readable(self, s: socket.socket) -> None:
        """The back-end request channel is readable: acknowledgements, in order."""
        if self.backend_req is not s:
            return
        while True:
            try:
                msg = self._req_reader.feed(s)
            except EOFError:
                self._drop_backend_req("the front-end closed it", quiet=True)
                return
            except (ProtocolError, OSError) as e:  # the channel is given up; the main connection stays
                self._drop_backend_req(f"bad message: {e}")
                return
            if msg is None:
                return
            fds = len(msg.fds)
            msg.close_fds()
            if not self._req_pending:
                self._drop_backend_req(f"unexpected message {msg.request} (flags {msg.flags:#x}): nothing was asked")
                return
            want, t = self._req_pending[0]
            if not msg.is_reply or msg.request != want or len(msg.payload) != 8 or fds:
                self._drop_backend_req(f"expected the acknowledgement of {BackendReq(want).name}, got request "
                                       f"{msg.request} flags {msg.flags:#x} with {len(msg.payload)} bytes, {fds} fds")
                return
            self._req_pending.pop(0)
            t.cancel()
            self.backend_reqs_acked += 1
            status = msg.u64()
            if status:
                log.warning("%s: the front-end answered %s with status %d", self.name, BackendReq(want).name, status)

    def _backend_req_overdue(self, s: socket.socket) -> None:
        if self.backend_req is not s or not self._req_pending:
            return
        want = BackendReq(self._req_pending[0][0]).name
        self._drop_backend_req(f"the front-end did not answer {want} within {self.backend_req_timeout:g} s")

    def _drop_backend_req(self, why: str | None, quiet: bool = False) -> None:
        """Close the back-end request channel (one log line saying why, unless *why* is None: the
        connection is going anyway).  Back-end requests are not sent again on this connection
        unless the front-end hands over a new channel (SET_BACKEND_REQ_FD)."""
        s, self.backend_req = self.backend_req, None
        for _req, t in self._req_pending:
            t.cancel()
        self._req_pending = []
        self._req_reader.close()
        if s is None:
            return
        self.loop.remove_fd_handler(s.fileno())
        s.close()
        if why is not None:
            self.backend_req_dropped = why
            (log.info if quiet else log.warning)("%s: closing the back-end request channel: %s", self.name, why)

    # -- lifecycle and what the monitor may do to a ring -------------------------------------------------
    def ring_state(self, index: int) -> RingState:
        """Where ring *index* is in its lifecycle (loop thread)."""
        v = self.vrings[index]
        if self.conn is None:
            return RingState.NO_FRONT_END
        if v.stopped:
            return RingState.STOPPED
        if v.addr is None:
            return RingState.NOT_SET_UP
        if not v.started:
            return RingState.NOT_STARTED
        if not v.enabled:
            return RingState.DISABLED
        return RingState.STARTED

    def kick_refusal(self, index: int) -> RingRefused | None:
        """Why the back-end must not process ring *index* now (None: it may).  A ring set up with a
        kick fd and not kicked yet may: a kick is what starts it."""
        v = self.vrings[index]
        st = self.ring_state(index)
        n = index
        if st == RingState.NO_FRONT_END:
            return RingRefused(st, f"no front-end is connected: queue {n} has no ring to process")
        if st == RingState.STOPPED:
            return RingRefused(st, f"the front-end stopped queue {n} with GET_VRING_BASE; a back-end must not "
                                   f"process a stopped ring (vhost-user spec); the front-end restarts it")
        if st == RingState.NOT_SET_UP:
            return RingRefused(st, f"queue {n} is not set up: no SET_VRING_ADDR since the front-end connected"
                                   + (" or reset the device" if self.device_resets else ""))
        if st == RingState.NOT_STARTED and v.kick is None:
            return RingRefused(st, f"queue {n} is not started: the front-end has not handed it a kick fd "
                                   f"(SET_VRING_KICK), and a ring starts on its first kick")
        if not v.enabled:
            return RingRefused(RingState.DISABLED if st == RingState.DISABLED else st,
                               f"queue {n} is disabled (SET_VRING_ENABLE 0, or not enabled yet): "
                               f"a disabled ring is not processed")
        if self.device.broken:
            return RingRefused(st, f"the device needs a reset (DEVICE_NEEDS_RESET: {self.device.broken_reason}); "
                                   f"it processes nothing until the front-end resets it or sets its rings up again")
        return None

    def call_refusal(self, index: int) -> RingRefused | None:
        """Why the back-end cannot signal ring *index* now (None: its call fd is there)."""
        v = self.vrings[index]
        st = self.ring_state(index)
        if v.call is not None:
            return None
        if st == RingState.NO_FRONT_END:
            return RingRefused(st, f"no front-end is connected: queue {index} has no call fd")
        if st == RingState.STOPPED:
            return RingRefused(st, f"queue {index} has no call fd: the front-end stopped the ring with "
                                   f"GET_VRING_BASE, which took its kick and call fds; nobody is polling it "
                                   f"until the front-end restarts it")
        if v.call_nofd:
            return RingRefused(st, f"queue {index} has no call fd: the front-end set none (SET_VRING_CALL "
                                   f"with VRING_NOFD), it polls the used ring")
        return RingRefused(st, f"queue {index} has no call fd: the front-end has not handed one over "
                               f"(SET_VRING_CALL)")

    def process_ring(self, index: int, *, check: bool = True) -> RingState:
        """Process ring *index* as if its kick fd had fired (the monitor's kick injection; loop
        thread).  Raises ``RingRefused`` where a back-end must not (``kick_refusal``).  With
        *check* False the ring is marked started and processed whatever its state, as the monitor
        did before lifecycles were checked (tests show the harm with it)."""
        v = self.vrings[index]
        if check:
            why = self.kick_refusal(index)
            if why is not None:
                raise why
        elif v.addr is None:
            raise RingRefused(self.ring_state(index), f"queue {index} is not set up")
        v.started = True
        v.pending_kick = True
        if v.enabled:
            self._process(v)
        return self.ring_state(index)

    def call_ring(self, index: int) -> None:
        """Write ring *index*'s call fd (the monitor's call injection; loop thread); ``RingRefused``
        when there is none, saying why."""
        why = self.call_refusal(index)
        if why is not None:
            raise why
        v = self.vrings[index]
        assert v.call is not None
        v.call.set()
        v.calls += 1

    # -- introspection ----------------------------------------------------------------------------
    def status(self) -> dict:
        out = {"connected": self.conn is not None, "connections": self.connections,
               "disconnects": self.disconnects, "protocol-errors": self.protocol_errors,
               "protocol-error-kinds": dict(self.protocol_error_kinds),
               "last-error-kind": self.last_error_kind.value if self.last_error_kind is not None else "",
               "internal-errors": self.internal_errors,
               "features": self.features, "protocol-features": self.protocol_features,
               "peer": self.peer if self.conn is not None else "",
               "partial-message-bytes": self._reader.received if self.conn is not None else 0,
               "slow-peers": self.slow_peers, "accept-pauses": self.accept_pauses,
               "backend-req": {"open": self.backend_req is not None, "sent": self.backend_reqs_sent,
                               "acked": self.backend_reqs_acked, "awaiting-ack": len(self._req_pending),
                               "dropped": self.backend_req_dropped},
               "broken": self.device.broken, "broken-reason": self.device.broken_reason,
               "needs-reset-count": self.device.needs_reset_count, "recoveries": self.recoveries,
               "device-resets": self.device_resets}
        queues: list[dict] = []
        out["queues"] = queues
        for v in self.vrings:
            q = self.device.queues[v.index]
            d = {"queue": v.index, "num": v.num, "ring-state": self.ring_state(v.index).value,
                 "get-vring-base": v.get_vring_base, "started": v.started, "enabled": v.enabled,
                 "kicks": v.kicks, "calls": v.calls, "self-kicks": v.self_kicks,
                 "kick-fd": v.kick.fd if v.kick else -1,
                 "call-fd": v.call.fd if v.call else -1, "err-fd": v.err.fd if v.err else -1,
                 "inuse": q.inuse, "last-avail-idx": q.last_avail_idx, "used-idx": q.used_idx,
                 "errors": v.errors, "polls": v.polls, "poll-errors": v.poll_errors, "err-write-failures": v.err_write_failures, "kick-throttles": v.kick_throttles,
                 "polling": v.polling, "polled-requests": v.polled_requests}
            queues.append(d)
        out["polling"] = self.loop.poll_counters()
        return out

    def counters(self) -> dict:
        """This back-end's device as the counters document has it (``kickcall.counters``; loop
        thread): per queue the kicks it read from its kick fd (``kick-fd``; ``self-kick``: the
        ones it gave itself after a reconnect) and the calls it wrote (``call-fd``), lifetime
        counts over every connection; with the connection and protocol-error counts."""
        queues = []
        for v in self.vrings:
            q = self.device.queues[v.index]
            kbp = {"kick-fd": max(0, v.kicks - v.self_kicks)}
            if v.self_kicks:
                kbp["self-kick"] = v.self_kicks
            queues.append({
                "queue": v.index, "vector": None, "masked": None, "pending": None, "irq-mode": "call-fd",
                "kicks": sum(kbp.values()), "kicks-by-path": kbp, "calls": v.calls,
                "calls-by-path": {"call-fd": v.calls} if v.calls else {},
                "calls-without-fd": v.calls_without_fd, "calls-suppressed": q.calls_suppressed,
                "inuse": q.inuse, "ring-state": self.ring_state(v.index).value,
                "ring-indices": {"last-avail-idx": q.last_avail_idx, "used-idx": q.used_idx},
                "polled-requests": v.polled_requests, "handled-by": "vhost-user"})
        return {"id": self.name, "path": f"/{self.name}", "type": self.device.type_name,
                "handled-by": "vhost-user", "connected": self.conn is not None,
                "connections": self.connections, "reconnects": max(0, self.connections - 1),
                "disconnects": self.disconnects, "protocol-errors": self.protocol_errors,
                "broken": self.device.broken, "polling": self.loop.poll_counters(), "queues": queues}

    @classmethod
    def routes(cls) -> dict[int, Route]:
        """Every front-end request the back-end knows, with its route (a copy)."""
        return dict(cls._ROUTES)

    # -- the dispatch table (its handlers are the plain functions of the class body above) --------
    _ROUTES: ClassVar[dict[int, Route]] = {
        FR.GET_FEATURES: Route(Empty, _on_get_features),
        FR.SET_FEATURES: Route(U64Payload, _on_set_features),
        FR.SET_OWNER: Route(Empty, _on_set_owner),
        FR.RESET_OWNER: Route(Empty, _on_reset_owner),
        FR.SET_MEM_TABLE: Route(MemTable, _on_set_mem_table, FdRule.REGIONS),
        FR.SET_LOG_BASE: Route(LogBase, None, FdRule.ONE),
        FR.SET_LOG_FD: Route(Empty, None, FdRule.ONE),
        FR.SET_VRING_NUM: Route(VringState, _on_set_vring_num),
        FR.SET_VRING_ADDR: Route(VringAddr, _on_set_vring_addr),
        FR.SET_VRING_BASE: Route(VringState, _on_set_vring_base),
        FR.GET_VRING_BASE: Route(VringState, _on_get_vring_base),
        FR.SET_VRING_KICK: Route(VringFile, _on_set_vring_kick, FdRule.VRING),
        FR.SET_VRING_CALL: Route(VringFile, _on_set_vring_call, FdRule.VRING),
        FR.SET_VRING_ERR: Route(VringFile, _on_set_vring_err, FdRule.VRING),
        FR.GET_PROTOCOL_FEATURES: Route(Empty, _on_get_protocol_features),
        FR.SET_PROTOCOL_FEATURES: Route(U64Payload, _on_set_protocol_features),
        FR.GET_QUEUE_NUM: Route(Empty, _on_get_queue_num),
        FR.SET_VRING_ENABLE: Route(VringState, _on_set_vring_enable),
        FR.SEND_RARP: Route(U64Payload, None),
        FR.NET_SET_MTU: Route(U64Payload, None),
        FR.SET_BACKEND_REQ_FD: Route(Empty, _on_set_backend_req_fd, FdRule.ONE, PF.BACKEND_REQ),
        FR.SET_VRING_ENDIAN: Route(VringState, _on_set_vring_endian),
        FR.GET_CONFIG: Route(ConfigAccess, _on_get_config, feature=PF.CONFIG),
        FR.SET_CONFIG: Route(ConfigAccess, _on_set_config, feature=PF.CONFIG),
        FR.GET_INFLIGHT_FD: Route(Inflight, _on_get_inflight_fd, feature=PF.INFLIGHT_SHMFD),
        FR.SET_INFLIGHT_FD: Route(Inflight, _on_set_inflight_fd, FdRule.ONE, PF.INFLIGHT_SHMFD),
        FR.RESET_DEVICE: Route(Empty, _on_reset_device),  # served whether RESET_DEVICE was negotiated or not
        FR.VRING_KICK: Route(VringState, None),
        FR.GET_MAX_MEM_SLOTS: Route(Empty, _on_get_max_mem_slots, feature=PF.CONFIGURE_MEM_SLOTS),
        FR.ADD_MEM_REG: Route(SingleMemRegion, _on_add_mem_reg, FdRule.ONE, PF.CONFIGURE_MEM_SLOTS),
        FR.REM_MEM_REG: Route(SingleMemRegion, _on_rem_mem_reg, feature=PF.CONFIGURE_MEM_SLOTS),
        FR.SET_STATUS: Route(U64Payload, None),
        FR.GET_STATUS: Route(Empty, None),
    }

