"""A virtio-blk device of a kickcall machine whose queues an external vhost-user back-end serves.

The VMM never touches the rings while the back-end runs them: the kick fd *is* the queue's host
notifier (taken over with ``grab_ioeventfd``, so a guest doorbell write lands in the back-end's
eventfd through the ioeventfd), and the call fd is the queue's guest notifier (irqfd) while the
vector is unmasked, or the device's *masked notifier* while it is masked -- the transport polls
that one into the PBA.  Switching is acknowledged (REPLY_ACK, or a synchronising request).

Messages follow QEMU 7.2:
realize  GET_FEATURES, GET_PROTOCOL_FEATURES, SET_PROTOCOL_FEATURES, GET_QUEUE_NUM, SET_OWNER,
         GET_FEATURES, per queue SET_VRING_CALL + SET_VRING_ERR, GET_CONFIG;
start    [GET_INFLIGHT_FD] SET_INFLIGHT_FD, SET_FEATURES, SET_MEM_TABLE, per queue SET_VRING_NUM,
         SET_VRING_BASE, SET_VRING_ADDR, SET_VRING_KICK, SET_VRING_CALL; SET_VRING_ENABLE 1 each;
stop     SET_VRING_ENABLE 0 each, GET_VRING_BASE each.

When the back-end dies the device notices (the socket hangs up), waits for the socket, negotiates
again and, if the driver was running, starts the rings again from the used index -- with
INFLIGHT_SHMFD the back-end resubmits what it had taken.  A back-end without it (qemu-storage-
daemon) can only be reconnected exactly when its queues are idle.

No kick is lost across a ring start: a back-end that died may have read the guest's last kick
(the eventfd's count is gone with it) before it took the request, and the guest will not kick
again -- ``avail_event`` says it already did.  So the kick fd is handed over already signalled
on every ring start, a reconnect included (QEMU kicks a queue "right away to begin processing
requests already in vring" when it starts its host notifiers); a spurious kick costs the
back-end one look at an empty ring.  The ``kick-on-start`` fault switches this off (tests, x-debug-fault).
"""

from __future__ import annotations

import logging
import os
import select
import threading
import time

from .. import trace
from ..notify import EventNotifier, NotifierRegistry, Role
from ..virtio.blk import BLK_CONFIG_SIZE, FEATURES as BLK_FEATURES
from ..virtio.device import DRIVER_OK, VirtIODevice
from ..virtio.layout import used_idx_addr
from ..virtio.queue import VirtQueue
from ..virtio.paths import CallPath, KickPath
from ..virtio.transport import VhostTransport
from .frontend import BackendGone, InflightInfo, VhostUserFrontend
from .protocol import VHOST_USER_F_PROTOCOL_FEATURES, MemRegion, ProtocolError, ProtocolErrorKind, ProtocolFeature
from ..threads import start_thread

__all__ = ["VhostUserBlkDevice", "USER_BASE"]

log = logging.getLogger("kickcall.vhost_user.device")
_t_start_kick = trace.event("vhost_user_start_kick", "a ring start handed the back-end a signalled kick fd")

PF = ProtocolFeature
USER_BASE = 0x7F00_0000_0000  # the "user addresses" we give the back-end: USER_BASE + guest physical
PF_WANTED = (1 << PF.MQ) | (1 << PF.REPLY_ACK) | (1 << PF.CONFIG) | (1 << PF.INFLIGHT_SHMFD) | (1 << PF.BACKEND_REQ)


class VhostUserBlkDevice(VirtIODevice):
    device_id = 2
    type_name = "vhost-user-blk"
    feature_table = BLK_FEATURES

    def __init__(self, name: str, socket_path: str, *, num_queues: int = 1, queue_size: int = 128,
                 registry: NotifierRegistry | None = None, loop=None, connect_wait: float = 30.0,
                 reconnect: bool = True, use_inflight: bool = True) -> None:
        super().__init__(name, queue_sizes=[queue_size] * num_queues)
        self.socket_path = socket_path
        self.registry = registry or NotifierRegistry()
        self.loop = loop
        self.reconnect_enabled = reconnect
        self.use_inflight = use_inflight
        self.fe = VhostUserFrontend(socket_path, name=f"{name}-vhost-user")
        self.fe.on_config_change = self._backend_config_changed
        self.started_backend = False
        self.backend_up = False
        self.config = bytes(BLK_CONFIG_SIZE)
        self.inflight: InflightInfo | None = None
        self.reconnects = 0
        self.disconnects = 0
        self.vring_errors = 0
        self.kick_on_start = self.faults.switch(
            "kick-on-start", "off: a ring start hands the back-end its kick fd unsignalled, so a kick a dead "
            "back-end consumed before it took the request is lost across the reconnect")
        self.keep_inflight_on_reset = False  # True: reuse the inflight region across a device reset
        self.start_kicks = 0
        self._mu = threading.RLock()
        self._call_state: dict[int, bool | None] = {}  # queue -> masked? (None: no guest notifier)
        self._fallback: set[int] = set()  # queues whose masked notifier we poll (no guest notifier)
        self.masked_notifiers: dict[int, EventNotifier] = {}
        self.err_notifiers: list[EventNotifier] = []
        for q in self.queues:
            m = EventNotifier(f"{name}.vq{q.index}.masked")
            self.registry.register(m, self.path, Role.MASKED, queue=q.index)
            self.masked_notifiers[q.index] = m
            e = EventNotifier(f"{name}.vq{q.index}.err")
            self.registry.register(e, self.path, Role.ERR, queue=q.index)
            self.err_notifiers.append(e)
        self._realize(connect_wait)

    # -- realize --------------------------------------------------------------------------------------
    def _realize(self, wait: float) -> None:
        fe = self.fe
        fe.connect(wait=wait)
        offered = fe.get_features()
        if not offered >> VHOST_USER_F_PROTOCOL_FEATURES & 1:
            raise ProtocolError(ProtocolErrorKind.FEATURE_MISMATCH,
                                f"{self.name}: the back-end lacks VHOST_USER_F_PROTOCOL_FEATURES")
        pf = fe.get_protocol_features() & PF_WANTED
        if not self.use_inflight:
            pf &= ~(1 << PF.INFLIGHT_SHMFD)
        fe.set_protocol_features(pf)
        nq = fe.get_queue_num() if pf >> PF.MQ & 1 else 1
        if nq < len(self.queues):
            raise ProtocolError(ProtocolErrorKind.TOO_FEW_QUEUES,
                                f"{self.name}: the back-end has {nq} queues, {len(self.queues)} configured")
        if pf >> PF.BACKEND_REQ & 1:
            fe.set_backend_req_fd()
        fe.set_owner()
        offered = fe.get_features()
        for q in self.queues:
            fe.set_vring_call(q.index, self.masked_notifiers[q.index].fd)
            fe.set_vring_err(q.index, self.err_notifiers[q.index].fd)
        if pf >> PF.CONFIG & 1:
            self.config = fe.get_config(0, BLK_CONFIG_SIZE)
        # what the guest may negotiate: the back-end's device features (the protocol bit is ours)
        self.host_features = offered & ~(1 << VHOST_USER_F_PROTOCOL_FEATURES) & ~(1 << 26)
        self.backend_up = True
        if self.loop is not None:
            assert fe.sock is not None
            fd = fe.sock.fileno()
            # only the hang-up: replies on this socket belong to whoever sent the request
            self.loop.set_fd_handler(fd, lambda fd=fd: self._socket_event(fd), select.EPOLLRDHUP)
            for e in self.err_notifiers:
                self.loop.set_fd_handler(e.fd, lambda e=e: self._vring_err(e))

    def get_config(self) -> bytes:
        return self.config

    def _backend_config_changed(self) -> None:
        """CONFIG_CHANGE_MSG from the back-end (its own thread): re-read, then the config interrupt."""
        try:
            cfg = self.fe.get_config(0, BLK_CONFIG_SIZE)
        except (BackendGone, ProtocolError) as e:
            log.warning("%s: re-reading the config after a change failed: %s", self.name, e)
            return
        with self.lock:
            self.config = cfg
            self.config_changed()

    # -- start / stop ----------------------------------------------------------------------------------
    def backend_start(self) -> None:
        with self._mu:
            if self.started_backend or not self.backend_up:
                return
            t = self.vhost_transport()
            assert t is not None and self.mem is not None
            t.grab_ioeventfd()
            try:
                for q in self.queues:
                    if q.enabled:
                        t.set_host_notifier(q, True)
                self._start_rings(first=True)
            except (BackendGone, ProtocolError, OSError) as e:
                log.error("%s: starting the back-end failed: %s", self.name, e)
                self.virtio_error(f"vhost-user start failed: {e}")
                return
            self.started_backend = True
            for q in self.queues:
                if self._call_state.get(q.index) is None and q.enabled:
                    self._fallback_poll(q, True)

    def call_fd(self, q: VirtQueue) -> int | None:
        """The fd the back-end is given as *q*'s call: the guest notifier (irqfd) when the vector is
        unmasked, else the masked notifier the VMM polls into the PBA."""
        state = self._call_state.get(q.index)
        if state is False and q.guest_notifier is not None:
            return q.guest_notifier.fd
        return self.masked_notifiers[q.index].fd  # masked, or no guest notifier: the VMM polls it

    def _start_rings(self, first: bool) -> None:
        fe = self.fe
        assert self.mem is not None
        if fe.has_pf(PF.INFLIGHT_SHMFD):
            if self.inflight is None:
                qs = max(q.num for q in self.queues)
                self.inflight = fe.get_inflight_fd(len(self.queues), qs)
            fe.set_inflight_fd(self.inflight)
        fe.set_features(self.guest_features | (1 << VHOST_USER_F_PROTOCOL_FEATURES))
        regions, fds = self.mem.layout()
        fe.set_mem_table([MemRegion(r["gpa"], r["size"], USER_BASE + r["gpa"], r["block_offset"]) for r in regions],
                         [fds[r["block"]] for r in regions])
        active = [q for q in self.queues if q.enabled and q.desc]
        for q in active:
            fe.set_vring_num(q.index, q.num)
            # first start: where the guest's driver left it (0 after a reset); after a back-end
            # crash: the used index (the back-end resubmits whatever else it had taken)
            base = q.get_last_avail_idx() if first else self._guest_used_idx(q)
            fe.set_vring_base(q.index, base)
            fe.set_vring_addr(q.index, USER_BASE + q.desc, USER_BASE + q.used, USER_BASE + q.avail)
            kick = q.host_notifier
            if kick is not None and self.kick_on_start.fix_on:
                kick.set()  # a kick the previous back-end read and never acted on is not lost
                q.count_kick(KickPath.VHOST_START)
                self.start_kicks += 1
                if _t_start_kick.enabled:
                    _t_start_kick.emit(vdev=self.name, n=q.index, fd=kick.fd)
            fe.set_vring_kick(q.index, kick.fd if kick is not None else None)
            fe.set_vring_call(q.index, self.call_fd(q))
        for q in active:
            fe.set_vring_enable(q.index, True)

    def _guest_used_idx(self, q: VirtQueue) -> int:
        assert self.mem is not None
        return self.mem.read_u16(used_idx_addr(q.used))

    def backend_stop(self) -> None:
        with self._mu:
            if not self.started_backend:
                return
            self.started_backend = False
            t = self.vhost_transport()
            if self.backend_up:
                try:
                    active = [q for q in self.queues if q.enabled and q.desc]
                    for q in active:
                        self.fe.set_vring_enable(q.index, False)
                    for q in active:
                        q.set_last_avail_idx(self.fe.get_vring_base(q.index))
                except (BackendGone, ProtocolError, OSError) as e:
                    log.warning("%s: stopping the back-end: %s", self.name, e)
            for q in self.queues:
                self._fallback_poll(q, False)
            if t is not None:
                for q in self.queues:
                    t.set_host_notifier(q, False)
                t.release_ioeventfd()

    def vhost_transport(self) -> VhostTransport | None:
        """The transport as a ``VhostTransport`` (its notifiers go to the back-end); None before
        the device is plugged.  A transport without host and guest notifiers cannot carry it."""
        t = self.transport
        if t is None:
            return None
        if not isinstance(t, VhostTransport):
            raise TypeError(f"{self.name}: a vhost-user device needs a transport with host and guest notifiers")
        return t

    def handle_output(self, vq: VirtQueue) -> None:
        """A kick the VMM saw itself (no back-end running the ring): start the back-end (start on kick)."""
        if self.status & DRIVER_OK and not self.started_backend:
            self.backend_start()

    # -- the call fd and masking ---------------------------------------------------------------------
    def masked_notifier(self, vq: VirtQueue):
        return self.masked_notifiers.get(vq.index)

    def _fallback_poll(self, q: VirtQueue, on: bool) -> None:
        """Without a guest notifier (INTx, or irqfd off) the back-end calls the masked notifier and
        the VMM turns each call into the transport's interrupt (ISR + INTx, or an MSI message)."""
        if self.loop is None or (q.index in self._fallback) == on:
            return
        n = self.masked_notifiers[q.index]
        if on:
            self._fallback.add(q.index)
            self.loop.set_fd_handler(n.fd, lambda q=q, n=n: self._fallback_read(q, n))
        else:
            self._fallback.discard(q.index)
            self.loop.remove_fd_handler(n.fd)

    def _fallback_read(self, q: VirtQueue, n: EventNotifier) -> None:
        t = self.vhost_transport()
        if n.test_and_clear() and t is not None:
            q.count_call(CallPath.POLLED)
            t.notify_vector(q.vector)

    def guest_notifier_mask(self, vq: VirtQueue, masked: bool | None) -> None:
        with self._mu:
            self._call_state[vq.index] = masked
            if self.started_backend:
                self._fallback_poll(vq, masked is None)
            if not (self.started_backend and self.backend_up):
                return
            try:
                self.fe.set_vring_call(vq.index, self.call_fd(vq))
                if not self.fe.has_pf(PF.REPLY_ACK):
                    self.fe.sync()
            except (BackendGone, ProtocolError, OSError) as e:
                log.warning("%s: SET_VRING_CALL on queue %d: %s", self.name, vq.index, e)

    def _vring_err(self, e: EventNotifier) -> None:
        if e.test_and_clear():
            self.vring_errors += 1
            q = self.err_notifiers.index(e)
            self.virtio_error(f"vhost vring error in virtqueue {q}")

    # -- back-end death and reconnect --------------------------------------------------------------------
    def _socket_event(self, fd: int) -> None:
        """The back-end's end of the socket hung up (EPOLLRDHUP / EPOLLHUP)."""
        self.loop.remove_fd_handler(fd)
        s = self.fe.sock
        if s is None or s.fileno() != fd:
            return
        self._backend_gone()

    def _backend_gone(self) -> None:
        self.disconnects += 1
        self.backend_up = False
        self.fe.close()
        log.warning("%s: the vhost-user back-end went away", self.name)
        if self.reconnect_enabled:
            start_thread(self._reconnect, "kc-reconnect")

    def _reconnect(self, wait: float = 300.0) -> None:
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            try:
                self._realize(wait=max(0.1, deadline - time.monotonic()))  # waits without the big lock
                with self.lock:
                    if self.started_backend:
                        self._start_rings(first=False)
                self.reconnects += 1
                log.warning("%s: reconnected to the vhost-user back-end", self.name)
                return
            except (BackendGone, ProtocolError, OSError) as e:
                self.fe.close()
                log.info("%s: reconnect: %s", self.name, e)
                time.sleep(0.1)
        log.error("%s: the back-end did not come back", self.name)

    def device_reset(self) -> None:
        """The guest reset the device (its rings were stopped first): forget the inflight region,
        as QEMU's vhost_user_blk_reset frees it; the next start asks the back-end for a fresh one,
        so nothing taken before the reset -- a request that broke the ring, say -- is resubmitted
        after it.  ``keep_inflight_on_reset = True`` switches this off (tests)."""
        if self.inflight is not None and not self.keep_inflight_on_reset:
            os.close(self.inflight.fd)
            self.inflight = None

    def close(self) -> None:
        self.reconnect_enabled = False
        s = self.fe.sock
        if self.loop is not None and s is not None and self.loop.running:
            self.loop.remove_fd_handler(s.fileno())
        if self.loop is not None and self.loop.running:
            for e in self.err_notifiers:
                self.loop.remove_fd_handler(e.fd)
        self.fe.close()
        for n in list(self.masked_notifiers.values()) + self.err_notifiers:
            self.registry.unregister(n)
            n.close()
        if self.inflight is not None:
            os.close(self.inflight.fd)
            self.inflight = None

    def status_info(self) -> dict:
        d = super().status_info()
        d["vhost-started"] = self.started_backend
        return d

