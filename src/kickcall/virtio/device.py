"""VirtIODevice: features, status, config space, queues, reset, and ``virtio_error``.

A device is transport-agnostic: it asks its transport to signal a queue (``notify``) or a config
change, and its transport tells it when a queue was kicked (``handle_kick``).  A guest that breaks
the rules gets ``virtio_error``: DEVICE_NEEDS_RESET is set, the config interrupt is raised and the
device processes nothing more until it is reset.
"""

from __future__ import annotations

import logging
import threading
from abc import ABC, abstractmethod
from typing import Callable

from .. import trace
from ..memory import GuestMemory
from .queue import VirtQueue, VirtQueueError
from .ring import VIRTIO_F_VERSION_1, VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC
from ..threads import named_thread
from .transport import VirtioTransport
from ..faults import FaultRegistry

__all__ = ["VirtIODevice", "STATUS", "status_names", "feature_names", "ThreadPoolAio", "SyncAio"]

log = logging.getLogger("kickcall.virtio")

ACKNOWLEDGE = 1
DRIVER = 2
DRIVER_OK = 4
FEATURES_OK = 8
DEVICE_NEEDS_RESET = 0x40
FAILED = 0x80
# The status and feature names with QEMU 7.2's texts, in the order of QEMU's tables; QEMU builds
# its lists by prepending, so x-query-virtio-status lists them in the reverse order (which
# status_names and feature_names follow; checked against a real QEMU 7.2's reply).
STATUS = {
    "VIRTIO_CONFIG_S_DRIVER_OK": (DRIVER_OK, "Driver setup and ready"),
    "VIRTIO_CONFIG_S_FEATURES_OK": (FEATURES_OK, "Feature negotiation complete"),
    "VIRTIO_CONFIG_S_DRIVER": (DRIVER, "Guest OS compatible with device"),
    "VIRTIO_CONFIG_S_NEEDS_RESET": (DEVICE_NEEDS_RESET, "Irrecoverable error, device needs reset"),
    "VIRTIO_CONFIG_S_FAILED": (FAILED, "Error in guest, device failed"),
    "VIRTIO_CONFIG_S_ACKNOWLEDGE": (ACKNOWLEDGE, "Valid virtio device found"),
}

TRANSPORT_FEATURES = {
    24: ("VIRTIO_F_NOTIFY_ON_EMPTY", "Notify when device runs out of avail. descs. on VQ"),
    27: ("VIRTIO_F_ANY_LAYOUT", "Device accepts arbitrary desc. layouts"),
    32: ("VIRTIO_F_VERSION_1", "Device compliant for v1 spec (legacy)"),
    33: ("VIRTIO_F_IOMMU_PLATFORM", "Device can be used on IOMMU platform"),
    28: ("VIRTIO_RING_F_INDIRECT_DESC", "Indirect descriptors supported"),
    29: ("VIRTIO_RING_F_EVENT_IDX", "Used & avail. event fields enabled"),
}

_t_notify = trace.event("virtio_notify", "the device signalled a queue")
_t_error = trace.event("virtio_error", "the device detected a guest error and needs a reset")
_t_set_status = trace.event("virtio_set_status", "the driver wrote device_status")


def status_names(status: int) -> list[str]:
    return [f"{n}: {d}" for n, (bit, d) in reversed(STATUS.items()) if status & bit]


def feature_names(features: int, device_names: dict[int, tuple[str, str]]) -> tuple[list[str], list[str], int]:
    """The set bits of *features* as QEMU names them: transport features, device features (in
    the reverse of their tables' order, as QEMU lists them), and the bits neither table names."""
    transports = [f"{n}: {d}" for bit, (n, d) in reversed(TRANSPORT_FEATURES.items()) if features >> bit & 1]
    dev = [f"{n}: {d}" for bit, (n, d) in reversed(device_names.items())
           if features >> bit & 1 and bit not in TRANSPORT_FEATURES]
    unknown = 0
    for bit in range(64):
        if features >> bit & 1 and bit not in TRANSPORT_FEATURES and bit not in device_names:
            unknown |= 1 << bit
    return transports, dev, unknown


class VirtIODevice(ABC):
    """Base class of kickcall's virtio devices: a subclass provides ``handle_output``."""

    device_id = 0
    type_name = "virtio"
    feature_table: dict[int, tuple[str, str]] = {}

    def __init__(self, name: str, *, queue_sizes: list[int]) -> None:
        self.name = name
        self.path = f"/machine/peripheral/{name}/virtio-backend"
        self.host_features = (1 << VIRTIO_F_VERSION_1) | (1 << VIRTIO_RING_F_EVENT_IDX) | (
            1 << VIRTIO_RING_F_INDIRECT_DESC)
        self.guest_features = 0
        self.status = 0
        self.isr = 0
        self.config_generation = 0
        self.broken = False
        self.broken_reason = ""
        self.needs_reset_count = 0
        self.vm_running = True
        self.generation = 0  # bumped on every reset: completions of older requests are dropped
        # every switchable failure and every "fix off" switch of this device (x-debug-fault lists them)
        self.faults = FaultRegistry(name)
        self.restore_notify = self.faults.switch(
            "restore-notify-on-error", "off: a chain found invalid leaves the notification fields (used.flags, "
            "avail_event) the handler wrote before it found the chain broken")
        self.queues = [VirtQueue(i, n, self.process_queue, name=f"{name}.vq{i}")
                       for i, n in enumerate(queue_sizes)]
        self.mem: GuestMemory | None = None
        self.transport: VirtioTransport | None = None
        self.lock: threading.RLock = threading.RLock()  # replaced by the machine's big lock

    # -- features & config -------------------------------------------------------------------------
    def has_feature(self, bit: int) -> bool:
        return bool(self.guest_features >> bit & 1)

    def set_features(self, features: int) -> bool:
        """The driver's FEATURES_OK: accept only a subset of what we offer, with VERSION_1."""
        if features & ~self.host_features or not features >> VIRTIO_F_VERSION_1 & 1:
            return False
        self.guest_features = features
        ei = self.has_feature(VIRTIO_RING_F_EVENT_IDX)
        ind = self.has_feature(VIRTIO_RING_F_INDIRECT_DESC)
        for q in self.queues:
            q.event_idx = ei
            q.indirect = ind
        self.features_changed()
        return True

    def features_changed(self) -> None:  # noqa: B027  (an optional hook: a device overrides it when it needs it)
        pass

    def get_config(self) -> bytes:
        return b""

    def set_config(self, offset: int, data: bytes) -> None:  # noqa: B027  (an optional hook: a device overrides it when it needs it)
        pass

    def config_changed(self) -> None:
        """The device's config changed: bump the generation and raise the config interrupt."""
        self.config_generation = (self.config_generation + 1) & 0xFF
        if self.transport is not None:
            self.transport.notify_config()

    # -- status & reset ---------------------------------------------------------------------------
    def set_status(self, status: int) -> None:
        if _t_set_status.enabled:
            _t_set_status.emit(vdev=self.name, status=status)
        self.status = status & 0xFF

    def reset(self) -> None:
        self.generation += 1
        self.drain()
        self.status = 0
        self.isr = 0
        self.guest_features = 0
        self.broken = False
        self.broken_reason = ""
        for q in self.queues:
            q.reset()
            q.event_idx = q.indirect = False
        self.device_reset()

    def device_reset(self) -> None:  # noqa: B027  (an optional hook: a device overrides it when it needs it)
        """Device-specific reset."""

    # -- hooks for devices whose queues a back-end serves (vhost); local devices do nothing ----------
    def backend_start(self) -> None:  # noqa: B027  (an optional hook: a device overrides it when it needs it)
        """DRIVER_OK: hand the queues to the back-end (after the transport set up its notifiers)."""

    def backend_stop(self) -> None:  # noqa: B027  (an optional hook: a device overrides it when it needs it)
        """Leaving DRIVER_OK or reset: take the queues back from the back-end."""

    def guest_notifier_mask(self, vq: VirtQueue, masked: bool | None) -> None:  # noqa: B027  (an optional hook: a device overrides it when it needs it)
        """The queue's vector was masked (True) or unmasked (False), or the guest notifier is going
        away (None): a vhost device switches the back-end's call fd accordingly (acknowledged)."""

    def masked_notifier(self, vq: VirtQueue):
        """The notifier the transport polls while vq's vector is masked (None: the guest notifier)."""
        return None

    def release_rings(self) -> None:
        """Drop every view into guest RAM (before the RAM is unmapped)."""
        for q in self.queues:
            q.unmap()

    def drain(self) -> None:  # noqa: B027  (an optional hook: a device overrides it when it needs it)
        """Wait for in-flight requests (and complete them, if they are still current)."""

    def vm_state_change(self, running: bool) -> None:
        """The VM is paused (False) or resumed (True)."""
        self.vm_running = running
        if not running:
            self.drain()

    def virtio_error(self, msg: str) -> None:
        """The guest broke the rules: DEVICE_NEEDS_RESET, config interrupt, no more processing."""
        # status and reason first, ``broken`` last: whoever sees the device broken sees why
        self.broken_reason = msg
        self.needs_reset_count += 1
        self.status |= DEVICE_NEEDS_RESET
        self.broken = True
        log.warning("%s: %s (device needs reset)", self.name, msg)
        if _t_error.enabled:
            _t_error.emit(vdev=self.name, msg=msg)
        if self.status & (DRIVER_OK | FEATURES_OK):
            self.config_changed()

    def clear_error(self) -> None:
        """Leave the state ``virtio_error`` put the device in, without a full reset: for a
        vhost-user back-end whose front-end stopped its rings (GET_VRING_BASE) and set them up
        again from scratch, which is what QEMU sends when the guest resets the device.  Features
        and queue set-up are kept; ``needs_reset_count`` keeps counting."""
        self.broken = False
        self.broken_reason = ""
        self.status &= ~DEVICE_NEEDS_RESET

    # -- kicks and calls -------------------------------------------------------------------------------
    @property
    def started(self) -> bool:
        return bool(self.status & DRIVER_OK) and not self.broken

    def can_process(self) -> bool:
        t = self.transport
        return self.started and self.vm_running and (t is None or t.dma_enabled())

    def handle_kick(self, vq: VirtQueue) -> None:
        """A kick reached the device (ioeventfd handler, heavyweight exit, or injection)."""
        if not self.vm_running:
            vq.pending_kick = True
            return
        if not self.can_process() or not vq.ready:
            return
        self.process_queue(vq)

    def process_queue(self, vq: VirtQueue) -> None:
        """Run *vq*'s handler once (QEMU's virtio_queue_notify_vq), without the started/running
        checks of ``handle_kick``: a ring error is counted by its kind on the queue, breaks the
        device and undoes the notification fields the handler wrote (an invalid chain writes
        nothing)."""
        saved = vq.save_notify_fields()
        was_broken = self.broken
        try:
            self.handle_output(vq)
        except VirtQueueError as e:
            vq.count_error(e.kind)  # per RingErrorKind: the queue's status shows errors-by-kind
            self.virtio_error(str(e))
        if self.broken and not was_broken and self.restore_notify.fix_on:
            vq.restore_notify_fields(saved)  # an invalid chain writes nothing

    @abstractmethod
    def handle_output(self, vq: VirtQueue) -> None:
        """Process the queue (the device's queue handler, QEMU's VirtQueue handle_output)."""

    def notify(self, vq: VirtQueue) -> None:
        """virtio_notify: signal *vq* if the driver wants it (event idx / NO_INTERRUPT)."""
        if not vq.should_notify():
            return
        if _t_notify.enabled:
            _t_notify.emit(vdev=self.name, vq=vq.index, used_idx=vq.used_idx)
        if self.transport is not None:
            self.transport.notify_queue(vq)

    def process_queue_loop(self, vq: VirtQueue, handle_one: Callable) -> None:
        """The usual handler shape: disable notifications, pop until empty, re-enable, re-check.

        As QEMU's virtio-blk does it: only when notifications were enabled on entry.  A queue
        whose notifications are already suppressed (the loop is polling it) keeps them so: the
        poller re-enables them, and re-checks, when it stops polling."""
        toggle = not vq.poll_suppressed
        while True:
            if toggle:
                vq.set_notification(False)
            while True:
                if not self.can_process():
                    return
                elem = vq.pop()
                if elem is None:
                    break
                handle_one(vq, elem)
                if self.broken:
                    return
            if not toggle:
                return  # the poller sees what came meanwhile on its next round
            vq.set_notification(True)
            if vq.is_empty():
                return

    # -- introspection -------------------------------------------------------------------------------
    def status_info(self) -> dict:
        t, d, u = feature_names(self.guest_features, self.feature_table)
        ht, hd, hu = feature_names(self.host_features, self.feature_table)
        g: dict[str, object] = {"transports": t, "dev-features": d}
        if u:
            g["unknown-dev-features"] = u
        h: dict[str, object] = {"transports": ht, "dev-features": hd}
        if hu:
            h["unknown-dev-features"] = hu
        return {
            "name": self.type_name,
            "device-id": self.device_id,
            "vhost-started": False,
            "device-endian": "little",
            "guest-features": g,
            "host-features": h,
            "backend-features": {"transports": [], "dev-features": []},
            "num-vqs": len(self.queues),
            "status": {"statuses": status_names(self.status)},
            "isr": self.isr,
            "queue-sel": (self.transport.queue_select() if self.transport is not None else None) or 0,
            "vm-running": self.vm_running,
            "broken": self.broken,
            "disabled": self.transport is not None and not self.transport.dma_enabled(),
            "use-started": True,
            "started": bool(self.status & DRIVER_OK),
            "start-on-kick": False,
            "disable-legacy-check": False,
            "bus-name": "pcie.0",
            "use-guest-notifier-mask": True,
        }


class SyncAio:
    """Run each request's I/O inline on the calling thread."""

    inflight = 0

    def submit(self, work: Callable[[], object], done: Callable[[object], None]) -> None:
        done(work())

    def drain(self) -> None:
        pass

    def stop(self) -> None:
        pass


class ThreadPoolAio:
    """QEMU's aio=threads: I/O on worker threads, completions back on the device's IOThread.

    Completions run on the loop thread (a bottom half, under the machine's big lock).
    ``drain()`` (called with the big lock held) waits for the workers and runs the completions
    inline, so a pause or a reset never leaves a request half done.
    """

    def __init__(self, loop, workers: int = 4, name: str = "aio") -> None:
        import queue

        self.loop = loop
        self._q: queue.SimpleQueue = queue.SimpleQueue()
        self._mu = threading.Lock()
        self._cond = threading.Condition(self._mu)
        self._done: list = []
        self._bh_pending = False
        self.inflight = 0
        self.completed = 0
        self._threads = [named_thread(self._worker, f"kc-aio{i}") for i in range(workers)]
        for t in self._threads:
            t.start()

    def submit(self, work: Callable[[], object], done: Callable[[object], None]) -> None:
        with self._mu:
            self.inflight += 1
        self._q.put((work, done))

    def _worker(self) -> None:
        while True:
            item = self._q.get()
            if item is None:
                return
            work, done = item
            try:
                res = work()
            except BaseException as e:  # handed to the completion
                res = e
            with self._mu:
                self._done.append((done, res))
                self.inflight -= 1
                self._cond.notify_all()
                schedule = not self._bh_pending
                self._bh_pending = True
            if schedule:
                try:
                    self.loop.schedule(self._complete)
                except Exception:
                    pass

    def _complete(self) -> None:
        with self._mu:
            done, self._done = self._done, []
            self._bh_pending = False
        for fn, res in done:
            self.completed += 1
            try:
                fn(res)
            except Exception:
                log.exception("aio completion failed")

    def drain(self) -> None:
        with self._mu:
            while self.inflight:
                self._cond.wait(1.0)
        self._complete()

    def stop(self) -> None:
        for _ in self._threads:
            self._q.put(None)
        for t in self._threads:
            t.join(5)
