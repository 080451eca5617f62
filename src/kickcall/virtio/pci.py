"""The modern virtio-pci transport and its notification plumbing.

Layout (as QEMU's modern virtio-pci): BAR1 holds MSI-X (table at 0, PBA at 0x800); BAR4 (64-bit,
prefetchable) holds the common config at 0x0000, the ISR at 0x1000, the device config at 0x2000
and the notify area at 0x3000 (``notify_off_multiplier`` 4: queue *n* is kicked by a write at
0x3000 + 4n).

Kick path (seed 002, as QEMU refined it):

* ``start_ioeventfd`` on a status write with DRIVER_OK: per queue a *host notifier* (eventfd) is
  created, bound to the queue's notify address with an ioeventfd (length 0: any width, no
  datamatch), and watched by the IOThread;
* ``stop_ioeventfd`` on any status write without DRIVER_OK (0 included), on reset, when Bus Master
  is cleared (which also clears DRIVER_OK) and when the VM is paused: the handler is removed, the
  ioeventfd deassigned (acknowledged by the hypervisor), the notifier *tested and cleared* -- a
  kick that landed just before the deassign is processed, not lost -- and closed;
* with ``ioeventfd=off`` (or while stopped) every kick is a heavyweight exit into ``notify_write``;
* ``grab_ioeventfd``/``release_ioeventfd``: the host-notifier hand-off to vhost, a refcount; while
  grabbed the device's own handler leaves the queues alone; on release it takes them back and
  scans each ring once.

Call path: with MSI-X and ``irqfd=on`` each queue with a vector gets a *guest notifier* bound to
the vector's GSI by an irqfd while the vector is unmasked.  When the guest masks the vector the
irqfd is deassigned (acknowledged) and the VMM polls the guest notifier instead, turning calls into
PBA bits; on unmask the irqfd comes back and a pending bit is delivered exactly once.  Without
irqfd the device sends MSI messages through the hypervisor (``msix_notify``); without MSI-X it
raises INTx and sets the ISR, which the driver reads to clear.

What the proxy knows about each queue beyond the ``VirtQueue`` (the GSI its guest notifier is
routed to, whether the irqfd is assigned, whether the VMM polls it) is a ``VirtIOPCIQueue`` record
the proxy owns (QEMU's ``VirtIOPCIQueue`` in ``proxy->vqs[n]``), one per queue, created with the
proxy; ``queue_state(n)`` gives a copy to readers (the monitor, the benchmarks).  Per vector, the
GSI route and its users are a ``VirtIOIRQFD`` record (QEMU's ``proxy->vector_irqfd[vector]``).

Locking: every method runs with the machine's big lock held (an MMIO exit on ``kc-vcpu<N>``, a
handler on the main loop, a QMP handler that took it); see docs/threads.md.
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import logging
import struct
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

from .. import trace
from ..hv.abi import HypervisorError
from ..memory import IORegion
from ..notify import EventNotifier, NotifierRegistry, Role
from ..pci.device import PCIDevice
from ..pci.msix import MSIX
from ..pci import regs as R
from .device import DRIVER_OK, FEATURES_OK, VirtIODevice
from .paths import CallPath, KickPath
from .queue import VIRTIO_NO_VECTOR, VirtQueue

if TYPE_CHECKING:
    from ..hv.vmm import VM, MsiRoutes
    from ..loop import IOThread

__all__ = ["VirtIOPCIProxy", "ProxyHook", "VirtIOPCIQueue", "VirtIOIRQFD", "QUEUE_MEM_MULT", "VIRTIO_PCI_VENDOR_ID", "CFG_TYPE"]

log = logging.getLogger("kickcall.virtio.pci")

VIRTIO_PCI_VENDOR_ID = 0x1AF4
QUEUE_MEM_MULT = 4
CFG_TYPE = {"common": 1, "notify": 2, "isr": 3, "device": 4, "pci": 5}
BAR_MODERN = 4
BAR_MSIX = 1
OFF_COMMON, OFF_ISR, OFF_DEVICE, OFF_NOTIFY = 0x0000, 0x1000, 0x2000, 0x3000
REGION_SIZE = 0x1000

# common config offsets
C_DFSELECT, C_DF, C_GFSELECT, C_GF = 0x00, 0x04, 0x08, 0x0C
C_MSIX, C_NUMQ, C_STATUS, C_CFGGEN = 0x10, 0x12, 0x14, 0x15
C_Q_SELECT, C_Q_SIZE, C_Q_MSIX, C_Q_ENABLE, C_Q_NOFF = 0x16, 0x18, 0x1A, 0x1C, 0x1E
C_Q_DESCLO, C_Q_DESCHI, C_Q_AVAILLO, C_Q_AVAILHI, C_Q_USEDLO, C_Q_USEDHI = 0x20, 0x24, 0x28, 0x2C, 0x30, 0x34
COMMON_SIZE = 0x38

_t_queue_notify = trace.event("virtio_queue_notify", "a kick reached a virtqueue")
_t_notify_irqfd = trace.event("virtio_notify_irqfd", "a call was written to the queue's guest notifier")
_t_ioeventfd = trace.event("virtio_pci_ioeventfd", "host notifiers started or stopped")
_t_vector = trace.event("virtio_pci_vector_mask", "a queue's vector was masked or unmasked")


@dataclass
class VirtIOPCIQueue:
    """The transport's own state of one queue (QEMU's ``VirtIOPCIQueue``): the call-path half
    that the ``VirtQueue`` does not know about."""

    index: int
    gsi: int | None = None
    """The GSI (KVM's virq) of the queue's vector while its guest notifier is bound, else None."""
    irqfd: bool = False
    """The guest notifier is assigned to ``gsi`` as an irqfd (vector unmasked)."""
    polled: bool = False
    """The VMM polls the queue's notifier (the guest notifier, or a vhost device's masked notifier)
    into the vector's PBA bit (vector masked)."""
    backend_kicks: int = 0
    """Doorbell writes the hypervisor matched while a vhost-user back-end owned the queue's kick
    fd, on host notifiers since deassigned (``KickPath.BACKEND``)."""
    backend_calls: int = 0
    """A back-end's calls injected by the irqfd, on irqfd assignments since ended
    (``CallPath.BACKEND_IRQFD``)."""
    gsi_base: int | None = None
    """The GSI's injection count when the irqfd of a back-end's call fd was assigned (None: no such
    irqfd now)."""


@dataclass
class VirtIOIRQFD:
    """One MSI-X vector's route (QEMU's ``VirtIOIRQFD``): its GSI and how many bound guest
    notifiers use it; the route is released with its last user."""

    gsi: int
    users: int = 0


class ProxyHook(enum.StrEnum):
    """Where a test or the bench may watch the proxy's kick path (``VirtIOPCIProxy.hooks``)."""

    AFTER_DEASSIGN = "after-deassign"  # a host notifier was just removed from the ioeventfd table,
    # before its test-and-clear (the seed-002 race window)
    KICK = "kick"  # a kick reached the device (counted, before the queue handler runs)
    KICK_DONE = "kick-done"  # the device's queue handler returned for that kick


class VirtIOPCIProxy(PCIDevice):
    """A virtio device on PCI (modern, VERSION_1 only)."""

    def __init__(self, vdev: VirtIODevice, *, vm: "VM | None" = None, routes: "MsiRoutes | None" = None,
                 iothread: "IOThread | None" = None, registry: NotifierRegistry | None = None,
                 ioeventfd: bool = True, irqfd: bool = True, msix_vectors: int | None = None,
                 class_code: int = 0xFF0000, subsystem_id: int = 0x1100, pcie: bool = True) -> None:
        super().__init__(vdev.name, vendor_id=VIRTIO_PCI_VENDOR_ID, device_id=0x1040 + vdev.device_id,
                         class_code=class_code, revision=1, subsystem_vendor_id=VIRTIO_PCI_VENDOR_ID,
                         subsystem_id=subsystem_id, pcie=pcie)
        self.vdev = vdev
        vdev.transport = self
        self.vm = vm
        self.routes = routes
        self.iothread = iothread
        self.registry = registry if registry is not None else NotifierRegistry()
        self.ioeventfd_enabled = ioeventfd  # the `ioeventfd` property
        self.irqfd_enabled = irqfd and vm is not None and routes is not None
        self.ioeventfd_started = False
        self.ioeventfd_grabbed = 0
        self.deassign_test_and_clear = vdev.faults.switch(
            "deassign-test-and-clear", "off: a kick that reached the ioeventfd but was not handled when the "
            "notifier was deassigned is lost with it (the seed-002 race)")
        # observation points for tests and the bench (not faults: they change nothing by themselves)
        self.hooks: dict[ProxyHook, Callable[[VirtQueue], None]] = {}
        self.deassign_hits = 0  # kicks found in a notifier after its deassign
        self.queue_sel = 0
        self.dfselect = 0
        self.gfselect = 0
        self.guest_features_shadow = 0
        self.config_vector = VIRTIO_NO_VECTOR
        self.guest_notifiers_on = False
        self._vector_irqfd: dict[int, VirtIOIRQFD] = {}  # per vector in use by a guest notifier
        self._vqs = [VirtIOPCIQueue(q.index) for q in vdev.queues]  # proxy->vqs[n]
        self.kicks_while_grabbed = 0
        self.kicks_while_stopped = 0
        self.mask_windows: list[tuple[int, bool]] = []  # (queue, a call landed while masked), per unmask
        self.calls_no_vector = 0
        self.intx_calls = 0
        nq = len(vdev.queues)
        nvec = msix_vectors if msix_vectors is not None else nq + 1
        # BAR4: the modern regions
        self.modern = IORegion(f"{vdev.name}-modern", 0x4000, self._modern_read, self._modern_write)
        self.notify_region = self.modern  # eventfds live at OFF_NOTIFY + 4n of this region
        self.register_bar(BAR_MODERN, self.modern, mem64=True, prefetch=True)
        self.msix_vectors = nvec
        if nvec:
            # the PBA at 0x800 as QEMU's layout has it while the table fits below it (128 vectors);
            # a larger table pushes the PBA right after it (QEMU's msix_init_exclusive_bar moves it too)
            MSIX(self, nvec, BAR_MSIX, pba_offset=max(0x800, nvec * 16))
        self._add_virtio_cap(CFG_TYPE["common"], BAR_MODERN, OFF_COMMON, REGION_SIZE)
        self._add_virtio_cap(CFG_TYPE["isr"], BAR_MODERN, OFF_ISR, REGION_SIZE)
        self._add_virtio_cap(CFG_TYPE["device"], BAR_MODERN, OFF_DEVICE, REGION_SIZE)
        self._add_virtio_cap(CFG_TYPE["notify"], BAR_MODERN, OFF_NOTIFY, REGION_SIZE,
                             extra=struct.pack("<I", QUEUE_MEM_MULT))

    @property
    def path(self) -> str:
        return self.vdev.path

    def queue_state(self, index: int) -> VirtIOPCIQueue:
        """A copy of the proxy's record of queue *index* (GSI, irqfd assigned, polled).  Read it
        with the big lock held to see one consistent state."""
        return dataclasses.replace(self._vqs[index])

    def _add_virtio_cap(self, cfg_type: int, bar: int, offset: int, length: int, extra: bytes = b"") -> int:
        size = 16 + len(extra)
        off = self.add_capability(R.PCI_CAP_ID_VNDR, size)
        body = struct.pack("<BBBBBBBBII", R.PCI_CAP_ID_VNDR, self.config[off + 1], size, cfg_type, bar, 0, 0, 0,
                           offset, length) + extra
        self.config[off:off + size] = body
        return off

    # -- BAR4 dispatch --------------------------------------------------------------------------------
    def _modern_read(self, off: int, size: int) -> int:
        if OFF_COMMON <= off < OFF_COMMON + REGION_SIZE:
            return self._common_read(off - OFF_COMMON, size)
        if OFF_ISR <= off < OFF_ISR + REGION_SIZE:
            return self._isr_read() if off == OFF_ISR else 0
        if OFF_DEVICE <= off < OFF_DEVICE + REGION_SIZE:
            cfg = self.vdev.get_config()
            o = off - OFF_DEVICE
            if o + size > len(cfg):
                return 0
            return int.from_bytes(cfg[o:o + size], "little")
        return 0

    def _modern_write(self, off: int, value: int, size: int) -> None:
        if OFF_COMMON <= off < OFF_COMMON + REGION_SIZE:
            self._common_write(off - OFF_COMMON, value, size)
        elif OFF_DEVICE <= off < OFF_DEVICE + REGION_SIZE:
            self.vdev.set_config(off - OFF_DEVICE, value.to_bytes(size, "little"))
        elif OFF_NOTIFY <= off < OFF_NOTIFY + REGION_SIZE:
            self.notify_write(off - OFF_NOTIFY, value, size)

    # -- common config ----------------------------------------------------------------------------------
    def _sel_queue(self) -> VirtQueue | None:
        if 0 <= self.queue_sel < len(self.vdev.queues):
            return self.vdev.queues[self.queue_sel]
        return None

    def _common_bytes(self) -> bytes:
        v = self.vdev
        q = self._sel_queue()
        df = (v.host_features >> (32 * self.dfselect)) & 0xFFFFFFFF if self.dfselect < 2 else 0
        gf = (self.guest_features_shadow >> (32 * self.gfselect)) & 0xFFFFFFFF if self.gfselect < 2 else 0
        qs = q.num if q else 0
        qv = q.vector if q else VIRTIO_NO_VECTOR
        qe = 1 if q and q.enabled else 0
        qn = q.index if q else 0
        qd, qa, qu = (q.desc, q.avail, q.used) if q else (0, 0, 0)
        return struct.pack("<IIIIHHBBHHHHHQQQ", self.dfselect, df, self.gfselect, gf, self.config_vector,
                           len(v.queues), v.status, v.config_generation, self.queue_sel, qs, qv, qe, qn,
                           qd, qa, qu)

    def _common_read(self, off: int, size: int) -> int:
        if off + size > COMMON_SIZE:
            return 0
        b = self._common_bytes()
        return int.from_bytes(b[off:off + size], "little")

    def _common_write(self, off: int, value: int, size: int) -> None:
        v = self.vdev
        q = self._sel_queue()
        if off == C_DFSELECT and size == 4:
            self.dfselect = value
        elif off == C_GFSELECT and size == 4:
            self.gfselect = value
        elif off == C_GF and size == 4:
            if self.gfselect < 2:
                sh = 32 * self.gfselect
                self.guest_features_shadow = (self.guest_features_shadow & ~(0xFFFFFFFF << sh)) | (value << sh)
        elif off == C_MSIX and size == 2:
            self._set_config_vector(value)
        elif off == C_STATUS and size == 1:
            self.write_status(value)
        elif off == C_Q_SELECT and size == 2:
            self.queue_sel = value
        elif q is None:
            return
        elif off == C_Q_SIZE and size == 2:
            if not q.enabled:
                q.set_num(value)
        elif off == C_Q_MSIX and size == 2:
            self._set_queue_vector(q, value)
        elif off == C_Q_ENABLE and size == 2:
            if value == 1 and not q.enabled:
                q.mem = v.mem
                q.enabled = True
        elif off in (C_Q_DESCLO, C_Q_DESCHI, C_Q_AVAILLO, C_Q_AVAILHI, C_Q_USEDLO, C_Q_USEDHI) and size == 4:
            if q.enabled:
                return
            attr = {C_Q_DESCLO: "desc", C_Q_DESCHI: "desc", C_Q_AVAILLO: "avail", C_Q_AVAILHI: "avail",
                    C_Q_USEDLO: "used", C_Q_USEDHI: "used"}[off]
            cur = getattr(q, attr)
            if off in (C_Q_DESCHI, C_Q_AVAILHI, C_Q_USEDHI):
                cur = (cur & 0xFFFFFFFF) | (value << 32)
            else:
                cur = (cur & ~0xFFFFFFFF) | value
            d, a, u = q.desc, q.avail, q.used
            if attr == "desc":
                d = cur
            elif attr == "avail":
                a = cur
            else:
                u = cur
            q.set_rings(d, a, u)

    def _set_config_vector(self, value: int) -> None:
        m = self.msix
        if m is not None and self.config_vector != VIRTIO_NO_VECTOR:
            m.vector_unuse(self.config_vector)
        if m is None or value == VIRTIO_NO_VECTOR or not m.vector_use(value):
            value = VIRTIO_NO_VECTOR
        self.config_vector = value

    def _set_queue_vector(self, q: VirtQueue, value: int) -> None:
        m = self.msix
        rebind = self.guest_notifiers_on and q.guest_notifier is not None
        if rebind:
            self._unbind_guest_notifier(q)
        if m is not None and q.vector != VIRTIO_NO_VECTOR:
            m.vector_unuse(q.vector)
        if m is None or value == VIRTIO_NO_VECTOR or not m.vector_use(value):
            value = VIRTIO_NO_VECTOR
        q.vector = value
        if self.guest_notifiers_on and value != VIRTIO_NO_VECTOR:
            self._bind_guest_notifier(q)

    # -- status ---------------------------------------------------------------------------------------
    def write_status(self, val: int) -> None:
        """A driver write of device_status (or Bus Master off clearing DRIVER_OK)."""
        v = self.vdev
        val &= 0xFF
        if not val & DRIVER_OK:
            v.backend_stop()  # a vhost device stops its back-end first (QEMU's vhost_dev_stop)
            self.stop_ioeventfd()
            self.set_guest_notifiers(False)
        if val & FEATURES_OK and not v.status & FEATURES_OK:
            if not v.set_features(self.guest_features_shadow):
                val &= ~FEATURES_OK
        v.set_status(val)
        if val & DRIVER_OK and self.bus_master:
            self.set_guest_notifiers(True)
            v.backend_start()  # a vhost device hands its queues to the back-end (it grabs the notifiers)
            self.start_ioeventfd()
        if v.status == 0:
            self.virtio_reset()

    def virtio_reset(self) -> None:
        self.vdev.backend_stop()
        self.stop_ioeventfd()
        self.set_guest_notifiers(False)
        m = self.msix
        if m is not None:
            if self.config_vector != VIRTIO_NO_VECTOR:
                m.vector_unuse(self.config_vector)
            for q in self.vdev.queues:
                if q.vector != VIRTIO_NO_VECTOR:
                    m.vector_unuse(q.vector)
        self.config_vector = VIRTIO_NO_VECTOR
        self.vdev.reset()
        self.queue_sel = 0
        self.dfselect = self.gfselect = 0
        self.guest_features_shadow = 0
        self.set_irq(0)

    def device_reset(self) -> None:
        """PCI reset / FLR: the virtio device goes back to status 0."""
        self.virtio_reset()

    # -- VirtioTransport ----------------------------------------------------------------------------------
    def dma_enabled(self) -> bool:
        return self.bus_master

    def queue_select(self) -> int | None:
        return self.queue_sel

    def bus_master_changed(self, enabled: bool) -> None:
        if not enabled:
            # no more DMA: stop the host notifiers and clear DRIVER_OK (QEMU's virtio_write_config)
            self.vdev.backend_stop()
            self.stop_ioeventfd()
            self.set_guest_notifiers(False)
            if self.vdev.status & DRIVER_OK:
                self.vdev.set_status(self.vdev.status & ~DRIVER_OK)

    # -- host notifiers (kick) -----------------------------------------------------------------------
    def _notify_offset(self, q: VirtQueue) -> int:
        return OFF_NOTIFY + q.index * QUEUE_MEM_MULT

    def set_host_notifier(self, q: VirtQueue, assign: bool) -> EventNotifier | None:
        """Create and bind (or unbind, test-and-clear and close) queue *q*'s host notifier."""
        if assign:
            if q.host_notifier is not None:
                return q.host_notifier
            n = EventNotifier(f"{self.vdev.name}.vq{q.index}.host")
            self.registry.register(n, self.path, Role.HOST, queue=q.index)
            try:
                self.notify_region.add_eventfd(self._notify_offset(q), 0, None, n)
            except HypervisorError:
                self.registry.unregister(n)
                n.close()
                raise
            q.host_notifier = n
            return n
        old = q.host_notifier
        if old is None:
            return None
        n = old
        self.notify_region.del_eventfd(self._notify_offset(q), 0, None, n)
        hook = self.hooks.get(ProxyHook.AFTER_DEASSIGN)
        if hook is not None:
            hook(q)
        q.host_notifier = None
        if self.vm is not None:  # the hypervisor's count of that ioeventfd, as its deassign returned it
            writes = self.vm.ioeventfd_writes(n, retire=True)
            if self.ioeventfd_grabbed:
                self._vqs[q.index].backend_kicks += writes
        if self.deassign_test_and_clear.fix_on and n.test_and_clear():
            # the guest kicked, and the notifier was deassigned before the kick was handled
            self.deassign_hits += 1
            self.kick(q, KickPath.IOEVENTFD)
        self.registry.unregister(n)
        n.close()
        return None

    def _host_notifier_read(self, q: VirtQueue) -> None:
        n = q.host_notifier
        if n is not None and n.test_and_clear():
            self.kick(q, KickPath.IOEVENTFD)

    def _active_queues(self) -> list[VirtQueue]:
        return [q for q in self.vdev.queues if q.enabled and q.num]

    def _start_ioeventfd_impl(self) -> None:
        started = []
        try:
            for q in self._active_queues():
                n = self.set_host_notifier(q, True)
                started.append(q)
                if self.iothread is not None and n is not None:
                    self.iothread.set_fd_handler(n.fileno(), functools.partial(self._host_notifier_read, q))
        except HypervisorError as e:
            log.warning("%s: ioeventfd start failed (%s). Fallback to userspace (slower).", self.name, e)
            for q in started:
                self._stop_one(q)
            raise
        if _t_ioeventfd.enabled:
            _t_ioeventfd.emit(dev=self.name, started=True, queues=len(started))

    def _stop_one(self, q: VirtQueue) -> None:
        n = q.host_notifier
        if n is None:
            return
        if self.iothread is not None:
            self.iothread.remove_fd_handler(n.fileno())
        self.set_host_notifier(q, False)

    def _stop_ioeventfd_impl(self) -> None:
        for q in self.vdev.queues:
            self._stop_one(q)
        if _t_ioeventfd.enabled:
            _t_ioeventfd.emit(dev=self.name, started=False)

    def start_ioeventfd(self) -> None:
        if not self.ioeventfd_enabled or self.ioeventfd_started:
            return
        if not self.ioeventfd_grabbed:
            try:
                self._start_ioeventfd_impl()
            except HypervisorError:
                return  # kicks keep working as heavyweight exits
        self.ioeventfd_started = True

    def stop_ioeventfd(self) -> None:
        if not self.ioeventfd_started:
            return
        if not self.ioeventfd_grabbed:
            self._stop_ioeventfd_impl()
        self.ioeventfd_started = False

    def grab_ioeventfd(self) -> None:
        """vhost takes the host notifiers: our own handler leaves the queues alone."""
        if not self.ioeventfd_grabbed and self.ioeventfd_started:
            self._stop_ioeventfd_impl()
        self.ioeventfd_grabbed += 1

    def release_ioeventfd(self) -> None:
        """vhost hands the queues back: restart our handler and scan each ring once."""
        if not self.ioeventfd_grabbed:
            raise RuntimeError(f"{self.name}: release without grab")
        self.ioeventfd_grabbed -= 1
        if self.ioeventfd_grabbed:
            return
        if self.ioeventfd_started:
            self._start_ioeventfd_impl()
        for q in self._active_queues():
            self.kick(q, KickPath.RELEASE_SCAN)

    def notify_write(self, off: int, value: int, size: int) -> None:
        """The notify region's write handler (QEMU's ``virtio_pci_notify_write``): a heavyweight
        kick, the guest's doorbell write at *off* (``QUEUE_MEM_MULT`` * queue) of the notify area
        reached the VMM.  With a host notifier bound it is signalled (its owner handles the kick),
        else the kick is delivered here.  Big lock held (a ``kc-vcpu<N>`` exit, or a QMP handler
        injecting a kick)."""
        idx = off // QUEUE_MEM_MULT
        if not 0 <= idx < len(self.vdev.queues):
            return
        q = self.vdev.queues[idx]
        if q.host_notifier is not None:
            q.host_notifier.set()  # the grabber's notifier (or ours): it will be handled there
            if self.ioeventfd_grabbed:  # the back-end's: the VMM counts it (it would count its own read)
                q.count_kick(KickPath.MMIO)
            return
        if self.ioeventfd_grabbed:
            self.kicks_while_grabbed += 1
            return
        self.kick(q, KickPath.MMIO)

    def kick(self, q: VirtQueue, path: KickPath) -> None:
        """Deliver a kick to the device (counts it, then runs or defers the queue handler).  Big
        lock held."""
        q.count_kick(path)
        hook = self.hooks.get(ProxyHook.KICK)
        if hook is not None:
            hook(q)
        if _t_queue_notify.enabled:
            _t_queue_notify.emit(vdev=self.vdev.name, n=q.index, path=path)
        if self.ioeventfd_grabbed and path != KickPath.RELEASE_SCAN:
            self.kicks_while_grabbed += 1
            return
        self.vdev.handle_kick(q)
        if hook is not None:
            done = self.hooks.get(ProxyHook.KICK_DONE)
            if done is not None:
                done(q)

    # -- guest notifiers (call) ----------------------------------------------------------------------
    def _vector_route(self, vector: int) -> bool:
        """Make sure *vector* has its GSI route in the VMM's table (QEMU's kvm_irqchip_add_msi_route),
        without committing it; True if a route was added (the table needs a commit before an irqfd
        uses it).  HypervisorError when no GSI is free."""
        if vector in self._vector_irqfd:
            return False
        assert self.routes is not None and self.msix is not None
        addr, data = self.msix.get_message(vector)
        self._vector_irqfd[vector] = VirtIOIRQFD(self.routes.add(addr, data))
        return True

    def _vector_gsi(self, vector: int) -> int:
        """The GSI of *vector*'s route, added and committed if it has none; one more user."""
        if self._vector_route(vector):
            assert self.routes is not None
            self.routes.commit()
        ent = self._vector_irqfd[vector]
        ent.users += 1
        return ent.gsi

    def _vector_put(self, vector: int, commit: bool = True) -> bool:
        """One user fewer of *vector*'s route; the last one releases it (committed unless
        *commit* is false: the caller commits once for a batch).  True if a route was released."""
        ent = self._vector_irqfd.get(vector)
        if ent is None:
            return False
        ent.users -= 1
        if ent.users <= 0:
            del self._vector_irqfd[vector]
            assert self.routes is not None
            self.routes.release(ent.gsi)
            if commit:
                self.routes.commit()
            return True
        return False

    def set_guest_notifiers(self, on: bool) -> None:
        """Bind (or unbind) every enabled queue's guest notifier to its vector (QEMU's
        virtio_pci_set_guest_notifiers).  The routes of all the queues' vectors are added first and
        committed to the hypervisor in one KVM_SET_GSI_ROUTING (as QEMU's kvm_virtio_pci_vector_use
        adds each route and commits the batch once): a route is committed before any irqfd uses it,
        and n vectors cost one table write of n routes, not n writes of up to n routes each.  On
        the way down the released routes are committed once, after every irqfd is gone."""
        m = self.msix
        if on:
            if self.guest_notifiers_on or not self.irqfd_enabled or m is None or not m.enabled:
                return
            self.guest_notifiers_on = True
            m.set_vector_notifiers(self._vector_unmask, self._vector_mask, self._vector_poll)
            qs = [q for q in self.vdev.queues if q.vector != VIRTIO_NO_VECTOR and q.enabled]
            added = False
            for q in qs:
                try:
                    added = self._vector_route(q.vector) or added
                except HypervisorError:
                    break  # out of GSIs: the queues past here fall back in _bind_guest_notifier
            if added:
                assert self.routes is not None
                self.routes.commit()
            for q in qs:
                self._bind_guest_notifier(q)
            # a route added for a queue whose bind failed has no user: release it
            stale = [v for v, ent in self._vector_irqfd.items() if ent.users <= 0]
            for v in stale:
                ent = self._vector_irqfd.pop(v)
                assert self.routes is not None
                self.routes.release(ent.gsi)
            if stale:
                assert self.routes is not None
                self.routes.commit()
        else:
            if not self.guest_notifiers_on:
                return
            released = False
            for q in self.vdev.queues:
                if q.guest_notifier is not None:
                    released = self._unbind_guest_notifier(q, commit=False) or released
            if released:
                assert self.routes is not None
                self.routes.commit()
            if m is not None:
                m.set_vector_notifiers(None, None, None)
            self.guest_notifiers_on = False

    def _bind_guest_notifier(self, q: VirtQueue) -> None:
        assert self.msix is not None and self.vm is not None
        v = q.vector
        try:
            gsi = self._vector_gsi(v)
        except HypervisorError as e:
            log.warning("%s: queue %d falls back to userspace MSI: %s", self.name, q.index, e)
            return
        n = EventNotifier(f"{self.vdev.name}.vq{q.index}.guest")
        self.registry.register(n, self.path, Role.GUEST, queue=q.index, vector=v)
        q.guest_notifier = n
        rec = self._vqs[q.index]
        rec.gsi = gsi
        if self.msix.is_masked(v):
            self.vdev.guest_notifier_mask(q, True)
            self._start_polling(q)
        else:
            self._irqfd_assign(q)
            self.vdev.guest_notifier_mask(q, False)

    def _unbind_guest_notifier(self, q: VirtQueue, commit: bool = True) -> bool:
        """Unbind q's guest notifier; True if its vector's route was released (committed unless
        *commit* is false)."""
        n = q.guest_notifier
        if n is None:
            return False
        rec = self._vqs[q.index]
        if rec.irqfd:
            self._irqfd_deassign(q)
        self._stop_polling(q)
        self.vdev.guest_notifier_mask(q, None)  # a back-end gets the polled fallback notifier
        q.guest_notifier = None
        rec.gsi = None
        if n.test_and_clear():  # a call made just before the teardown: deliver it the slow way
            if self.vdev.masked_notifier(q) is not None:
                q.count_call(CallPath.MSI)  # the back-end's (the VMM counted its own when it made it)
            self.notify_vector(q.vector)
        self.registry.unregister(n)
        n.close()
        return self._vector_put(q.vector, commit=commit)

    def _poll_target(self, q: VirtQueue):
        """What the VMM polls while q's vector is masked: a vhost device's masked notifier (the
        back-end's call fd was switched to it), else the guest notifier itself."""
        return self.vdev.masked_notifier(q) or q.guest_notifier

    def _start_polling(self, q: VirtQueue) -> None:
        n = self._poll_target(q)
        rec = self._vqs[q.index]
        if n is None or rec.polled:
            return
        rec.polled = True
        if q.guest_notifier is not None and n is q.guest_notifier:
            self.registry.update(n, note="masked: polled by the VMM into the PBA")
        if self.iothread is not None:
            self.iothread.set_fd_handler(n.fileno(), functools.partial(self._masked_read, q, n))

    def _stop_polling(self, q: VirtQueue) -> None:
        rec = self._vqs[q.index]
        if not rec.polled:
            return
        rec.polled = False
        n = self._poll_target(q)
        if n is not None:
            if q.guest_notifier is not None and n is q.guest_notifier:
                self.registry.update(n, note="")
            if self.iothread is not None:
                self.iothread.remove_fd_handler(n.fileno())

    def _masked_read(self, q: VirtQueue, n) -> None:
        if n.test_and_clear():
            if n is not q.guest_notifier:  # a back-end's call (the VMM counted its own when it made it)
                q.count_call(CallPath.MASKED_POLL)
            self.notify_vector(q.vector)

    def _gsi_injections(self, gsi: int) -> int:
        """The hypervisor's injection count of *gsi* (the shared stats page: read, never asked)."""
        if self.vm is None:
            return 0
        try:
            return self.vm.stats.gsi(gsi)["injections"]
        except (IndexError, TypeError, ValueError):  # out of the page, or the page is closed
            return 0

    def _irqfd_assign(self, q: VirtQueue) -> None:
        rec = self._vqs[q.index]
        assert self.vm is not None and q.guest_notifier is not None and rec.gsi is not None
        self.vm.irqfd(q.guest_notifier, rec.gsi)
        rec.irqfd = True
        if self.vdev.masked_notifier(q) is not None:  # a back-end will write it: the hypervisor counts
            rec.gsi_base = self._gsi_injections(rec.gsi)

    def _irqfd_deassign(self, q: VirtQueue) -> None:
        rec = self._vqs[q.index]
        assert self.vm is not None and q.guest_notifier is not None and rec.gsi is not None
        self.vm.irqfd(q.guest_notifier, rec.gsi, deassign=True)
        rec.irqfd = False
        if rec.gsi_base is not None:
            rec.backend_calls += max(0, self._gsi_injections(rec.gsi) - rec.gsi_base)
            rec.gsi_base = None

    def queue_counters(self, q: VirtQueue) -> dict:
        """Queue *q*'s kicks and calls by path, whoever handled them: the VMM's own counts plus,
        for a vhost-user back-end, the hypervisor's (its kicks' ioeventfd hits, its calls' irqfd
        injections), which the VMM never sees one by one.  Big lock held."""
        rec = self._vqs[q.index]
        kbp: dict[str, int] = {str(k): v for k, v in q.kicks_by_path.items()}
        cbp: dict[str, int] = {str(k): v for k, v in q.calls_by_path.items()}
        bk = rec.backend_kicks
        if self.ioeventfd_grabbed and q.host_notifier is not None and self.vm is not None:
            bk += self.vm.ioeventfd_writes(q.host_notifier)
        bc = rec.backend_calls
        if rec.irqfd and rec.gsi_base is not None and rec.gsi is not None:
            bc += max(0, self._gsi_injections(rec.gsi) - rec.gsi_base)
        if bk:
            kbp[KickPath.BACKEND] = bk
        if bc:
            cbp[CallPath.BACKEND_IRQFD] = bc
        return {"kicks": sum(kbp.values()), "kicks-by-path": kbp,
                "calls": sum(cbp.values()), "calls-by-path": cbp}

    def _queues_on_vector(self, v: int) -> list[VirtQueue]:
        return [q for q in self.vdev.queues if q.vector == v and q.guest_notifier is not None]

    def _vector_unmask(self, v: int, address: int, data: int) -> None:
        ent = self._vector_irqfd.get(v)
        if ent is not None and self.routes is not None and self.routes.update(ent.gsi, address, data):
            self.routes.commit()
        for q in self._queues_on_vector(v):
            if _t_vector.enabled:
                _t_vector.emit(dev=self.name, queue=q.index, vector=v, masked=False)
            # a back-end calls the guest notifier again (acknowledged) before the poll stops
            self.vdev.guest_notifier_mask(q, False)
            saw = self.msix is not None and self.msix.is_pending(v)
            masked_n = self.vdev.masked_notifier(q)
            self._stop_polling(q)
            if masked_n is not None and masked_n.test_and_clear():
                saw = True
                q.count_call(CallPath.MASKED_POLL)  # the back-end's call, parked while masked
                if self.msix is not None:
                    self.msix.set_pending(v)  # delivered once by the unmask, below us
            rec = self._vqs[q.index]
            if not rec.irqfd:
                self._irqfd_assign(q)
            self.mask_windows.append((q.index, saw))

    def _vector_mask(self, v: int) -> None:
        for q in self._queues_on_vector(v):
            if _t_vector.enabled:
                _t_vector.emit(dev=self.name, queue=q.index, vector=v, masked=True)
            if self._vqs[q.index].irqfd:
                self._irqfd_deassign(q)
            self.vdev.guest_notifier_mask(q, True)  # a back-end now calls the masked notifier (acknowledged)
            self._start_polling(q)

    def _vector_poll(self, first: int, end: int) -> None:
        m = self.msix
        assert m is not None
        for q in self.vdev.queues:
            if q.guest_notifier is None or not first <= q.vector < end or not m.is_masked(q.vector):
                continue
            n = self._poll_target(q)
            if n is not None and n.test_and_clear():
                if n is not q.guest_notifier:  # a back-end's call
                    q.count_call(CallPath.MASKED_POLL)
                m.notify(q.vector)

    def notify_vector(self, v: int) -> None:
        m = self.msix
        if m is not None and m.enabled:
            if v != VIRTIO_NO_VECTOR:
                m.notify(v)
        else:
            self.vdev.isr |= 1
            self.intx_calls += 1
            self.set_irq(1)

    def notify_queue(self, q: VirtQueue) -> None:
        """The device signals queue *q* (after should_notify said yes)."""
        m = self.msix
        if m is not None and m.enabled:
            if q.vector == VIRTIO_NO_VECTOR:
                self.calls_no_vector += 1
                return
            n = q.guest_notifier
            if n is not None:
                q.count_call(CallPath.MASKED_POLL if self._vqs[q.index].polled else CallPath.IRQFD)
                if _t_notify_irqfd.enabled:
                    _t_notify_irqfd.emit(vdev=self.vdev.name, vq=q.index, vector=q.vector)
                n.set()
                return
            q.count_call(CallPath.MSI if not m.is_masked(q.vector) else CallPath.PBA)
            m.notify(q.vector)
            return
        q.count_call(CallPath.INTX)
        self.vdev.isr |= 1
        self.intx_calls += 1
        self.set_irq(1)

    def notify_config(self) -> None:
        m = self.msix
        self.vdev.isr |= 2
        if m is not None and m.enabled:
            if self.config_vector != VIRTIO_NO_VECTOR:
                m.notify(self.config_vector)
            return
        self.set_irq(1)

    def _isr_read(self) -> int:
        """Reading the ISR returns it and clears it, and lowers INTx."""
        v = self.vdev.isr
        self.vdev.isr = 0
        self.set_irq(0)
        return v

    def write_config_hook(self, addr: int, value: int, size: int) -> None:
        # MSI-X enabled/disabled while running: rebuild the guest notifiers for the new mode
        m = self.msix
        if m is None or not (addr < m.cap + 4 and m.cap < addr + size):
            return
        if self.vdev.status & DRIVER_OK:
            if m.enabled and not self.guest_notifiers_on and self.bus_master:
                self.set_guest_notifiers(True)
            elif not m.enabled and self.guest_notifiers_on:
                self.set_guest_notifiers(False)

    # -- VM run state ---------------------------------------------------------------------------------
    def vm_state_change(self, running: bool) -> None:
        """Pause: stop the host notifiers and the device.  Resume: restart and run deferred kicks."""
        if not running:
            self.vdev.vm_running = False
            self.stop_ioeventfd()
            self.vdev.vm_state_change(False)
            return
        self.vdev.vm_state_change(True)
        if self.vdev.status & DRIVER_OK and self.bus_master:
            self.start_ioeventfd()
        for q in self.vdev.queues:
            if q.pending_kick:
                q.pending_kick = False
                self.vdev.handle_kick(q)

    # -- introspection -----------------------------------------------------------------------------
    def queue_info(self, q: VirtQueue) -> dict:
        m = self.msix
        masked = None
        if m is not None and m.enabled and q.vector != VIRTIO_NO_VECTOR and q.vector < m.nvectors:
            masked = m.is_masked(q.vector)
        pending = None
        if masked is not None and m is not None:
            pending = m.is_pending(q.vector)
        return {
            "queue": q.index,
            "vector": q.vector,
            "masked": masked,
            "pending": pending,
            "irq-mode": "msix" if m is not None and m.enabled else "intx",
            **self.queue_counters(q),
            "calls-suppressed": q.calls_suppressed,
            "inuse": q.inuse,
            "host-notifier": q.host_notifier is not None,
            "guest-notifier": q.guest_notifier is not None,
            "irqfd": self._vqs[q.index].irqfd,
            "polled": self._vqs[q.index].polled,
            "handled-by": "vhost-user" if self.ioeventfd_grabbed else "vmm",
        }
