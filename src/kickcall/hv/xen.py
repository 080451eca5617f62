"""The Xen flavour of the hypervisor: a domain's pirqs and 2-level event channels.

What Xen does for an HVM guest's interrupts, in the guest's process beside the KVM-like kernel
half (``kernel.py``), selected by ``hypervisor = "xen"`` in the machine config:

* **pirqs** -- a per-domain table of ``nr_pirqs`` entries.  ``PHYSDEVOP_get_free_pirq`` hands
  MSI pirqs out top-down from ``nr_pirqs - 1`` (so a pirq just freed is the next one handed out)
  and marks them allocated; ``PHYSDEVOP_map_pirq`` (the device model, for a passthrough
  function's MSI or MSI-X entry) binds a pirq to the function's host interrupt -- here the
  eventfd its host writes, which this module polls; mapping a pirq that is already mapped (or a
  host interrupt already mapped to another pirq) logs Xen's warning and *succeeds without
  changing anything*, as ``map_domain_pirq`` does; ``PHYSDEVOP_unmap_pirq`` frees it.
* **emulated MSIs** (``XEN_DMOP_inject_msi``, QEMU's ``xen_hvm_inject_msi``): a message whose
  vector is 0 names a pirq in its destination id; the pirq is bound to the emulated path on first
  delivery (``map_domain_emuirq_pirq``) and nothing unbinds it.  A message with a vector goes to
  the local APIC (``vmsi_deliver``) -- counted, so a test can show that none did.
* **event channels**, 2-level ABI: ``EVTCHNOP_bind_pirq`` (one port per pirq per domain:
  ``-EEXIST``), ``bind_ipi``, ``close``, ``send``, ``unmask``, ``status``.  A port's pending and
  mask bits live in the shared-info page in guest memory, ``evtchn_pending_sel`` and
  ``evtchn_upcall_pending`` in the vCPU's ``vcpu_info``; setting a pending bit on an unmasked
  port raises the upcall (the callback vector, HVM_PARAM_CALLBACK_IRQ).  A port masked while
  its event arrives stays pending, and ``EVTCHNOP_unmask`` replays it -- the MSI-X PBA's
  pattern.

Every operation answers as Xen does (0 or ``-errno``, OUT fields written into the argument) and
changes nothing when it fails.  Xen's console messages (``xl dmesg``) go to a ring read through
``query()`` and to the log.
"""

from __future__ import annotations

import collections
import enum
import errno
import logging
import os
import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable

from .. import trace
from ..memory import GuestMemory
from .stats import HvStats
from .xen_abi import (
    BIND_PIRQ_WILL_SHARE, DOMID_SELF, EVTCHN_MASK_OFF, EVTCHN_PENDING_OFF, NR_EVENT_CHANNELS, NR_IRQS_GSI,
    VCPU_INFO_SIZE, VCPU_PENDING_SEL_OFF, VCPU_UPCALL_PENDING_OFF, XEN_LEGACY_MAX_VCPUS, EvtchnBindIpi,
    EvtchnBindPirq, EvtchnClose, EvtchnOp, EvtchnSend, EvtchnStat, EvtchnStatus, EvtchnUnmask, MapPirqType,
    PhysdevGetFreePirq, PhysdevMapPirq, PhysdevOp, PhysdevUnmapPirq, pirq_of_msi,
)

if TYPE_CHECKING:
    from ..loop import IOThread

__all__ = ["XenHypervisor", "SharedInfo", "PirqState", "Caller", "DEFAULT_NR_PIRQS"]

log = logging.getLogger("kickcall.hv.xen")

#: Xen's default for an HVM domU: the GSIs plus 32 extra_guest_irqs
DEFAULT_NR_PIRQS = NR_IRQS_GSI + 32
#: how many pirqs and ports ``query()`` lists (its reply is one channel message)
QUERY_LIMIT = 512

_t_map = trace.event("xen_map_pirq", "the device model mapped a pirq to a passthrough function's host interrupt")
_t_unmap = trace.event("xen_unmap_pirq", "a pirq's mapping was removed")
_t_bind = trace.event("xen_evtchn_bind_pirq", "the guest bound an event channel to a pirq")
_t_close = trace.event("xen_evtchn_close", "the guest closed an event channel")
_t_emu = trace.event("xen_emu_pirq_bind", "an emulated MSI bound its pirq on first delivery")
_t_pending = trace.event("xen_evtchn_set_pending", "an event channel's pending bit was set")


class PirqState(enum.StrEnum):
    FREE = "free"
    ALLOCATED = "allocated"  # handed out by get_free_pirq, not mapped yet (Xen's PIRQ_ALLOCATED)
    MAPPED = "mapped"  # bound to a passthrough function's host interrupt
    EMULATED = "emulated"  # bound to the emulated MSI path (IRQ_MSI_EMU)


class Caller(enum.StrEnum):
    """Who issues a hypercall: the guest itself, or the device model (privileged over this domain)."""

    GUEST = "guest"
    DEVICE_MODEL = "device-model"


@dataclass
class _Pirq:
    pirq: int
    state: PirqState = PirqState.FREE
    port: int = 0  # the event channel bound to it (0: none)
    bus: int = 0
    devfn: int = 0
    entry_nr: int = 0
    table_base: int = 0
    owner: dict = field(default_factory=dict)  # what the device model said it maps (device, vector)
    fd: int = -1  # the host interrupt's eventfd (mapped)
    events: int = 0  # events delivered to its port
    dropped: int = 0  # events that found no port bound
    maps: int = 0


@dataclass
class _Port:
    port: int
    stat: EvtchnStat = EvtchnStat.CLOSED
    pirq: int = 0
    vcpu: int = 0
    sets: int = 0  # pending bit set (each event, coalesced or not)
    replays: int = 0  # pending while masked, raised on unmask


class SharedInfo:
    """The shared-info page in guest memory: the 2-level pending and mask bitmaps and each vCPU's
    ``evtchn_upcall_pending`` / ``evtchn_pending_sel``.  The hypervisor and the guest (one
    process) do their atomic bit operations under one lock -- the ``lock bts`` of the real
    thing; the VMM reads the page through its own mapping without any lock."""

    def __init__(self, memory: GuestMemory, gpa: int) -> None:
        self.memory = memory
        self.gpa = gpa
        self.lock = threading.Lock()

    # -- bitmaps ----------------------------------------------------------------------------------
    def _word(self, base: int, port: int) -> tuple[int, int]:
        return self.gpa + base + (port // 64) * 8, 1 << (port % 64)

    def _test_and_set(self, base: int, port: int) -> bool:
        a, bit = self._word(base, port)
        with self.lock:
            w = self.memory.read_u64(a)
            self.memory.write_u64(a, w | bit)
        return bool(w & bit)

    def _test_and_clear(self, base: int, port: int) -> bool:
        a, bit = self._word(base, port)
        with self.lock:
            w = self.memory.read_u64(a)
            self.memory.write_u64(a, w & ~bit)
        return bool(w & bit)

    def _test(self, base: int, port: int) -> bool:
        a, bit = self._word(base, port)
        return bool(self.memory.read_u64(a) & bit)

    def test_and_set_pending(self, port: int) -> bool:
        return self._test_and_set(EVTCHN_PENDING_OFF, port)

    def test_and_clear_pending(self, port: int) -> bool:
        return self._test_and_clear(EVTCHN_PENDING_OFF, port)

    def pending(self, port: int) -> bool:
        return self._test(EVTCHN_PENDING_OFF, port)

    def test_and_set_mask(self, port: int) -> bool:
        return self._test_and_set(EVTCHN_MASK_OFF, port)

    def test_and_clear_mask(self, port: int) -> bool:
        return self._test_and_clear(EVTCHN_MASK_OFF, port)

    def masked(self, port: int) -> bool:
        return self._test(EVTCHN_MASK_OFF, port)

    def active_word(self, word: int) -> int:
        """pending & ~mask for 64 ports (Linux's ``active_evtchns``)."""
        with self.lock:
            p = self.memory.read_u64(self.gpa + EVTCHN_PENDING_OFF + 8 * word)
            m = self.memory.read_u64(self.gpa + EVTCHN_MASK_OFF + 8 * word)
        return p & ~m

    # -- vcpu_info ---------------------------------------------------------------------------------
    def _vcpu(self, vcpu: int) -> int:
        return self.gpa + vcpu * VCPU_INFO_SIZE

    def test_and_set_sel(self, vcpu: int, word: int) -> bool:
        a = self._vcpu(vcpu) + VCPU_PENDING_SEL_OFF
        with self.lock:
            w = self.memory.read_u64(a)
            self.memory.write_u64(a, w | 1 << word)
        return bool(w >> word & 1)

    def xchg_sel(self, vcpu: int) -> int:
        a = self._vcpu(vcpu) + VCPU_PENDING_SEL_OFF
        with self.lock:
            w = self.memory.read_u64(a)
            self.memory.write_u64(a, 0)
        return w

    def test_and_set_upcall_pending(self, vcpu: int) -> bool:
        a = self._vcpu(vcpu) + VCPU_UPCALL_PENDING_OFF
        with self.lock:
            old = self.memory.read(a, 1)[0]
            self.memory.write(a, b"\x01")
        return bool(old)

    def clear_upcall_pending(self, vcpu: int) -> None:
        with self.lock:
            self.memory.write(self._vcpu(vcpu) + VCPU_UPCALL_PENDING_OFF, b"\x00")

    def upcall_pending(self, vcpu: int) -> bool:
        return bool(self.memory.read(self._vcpu(vcpu) + VCPU_UPCALL_PENDING_OFF, 1)[0])


class XenHypervisor:
    """One HVM domain's pirqs and event channels (see the module's docstring).

    *raise_vector(vcpu, vector)*: inject a vector into a vCPU's local APIC (the upcall, and the
    vector MSIs); *loop*: the interrupt-context loop that polls mapped host interrupts."""

    def __init__(self, memory: GuestMemory, *, domid: int = 1, nr_pirqs: int = DEFAULT_NR_PIRQS,
                 nvcpus: int = 1, raise_vector: Callable[[int, int], None], deliver_msi: Callable[[int, int], bool],
                 loop: "IOThread | None" = None, stats: HvStats | None = None) -> None:
        self.check_params(domid, nr_pirqs)
        self.memory = memory
        self.domid = domid
        self.nr_pirqs = nr_pirqs
        self.nvcpus = min(nvcpus, XEN_LEGACY_MAX_VCPUS)
        self._raise_vector = raise_vector
        self._deliver_msi = deliver_msi
        self.loop = loop
        self.stats = stats
        self._mu = threading.RLock()  # Xen's d->event_lock
        self._pirqs: dict[int, _Pirq] = {}
        self._ports: dict[int, _Port] = {}
        self.shared: SharedInfo | None = None
        self.callback_vector = 0
        self.console: collections.deque[tuple[float, str, str]] = collections.deque(maxlen=1024)
        self.hypercalls: dict[str, int] = {}
        self.warnings = 0
        self.map_conflicts = 0  # maps answered with Xen's "already mapped" warning
        self.upcalls = 0
        self.upcalls_lost = 0  # no shared info or no callback vector yet
        self.lapic_msis = 0  # vector MSIs delivered through the local APIC
        self.emulated_msis = 0

    @staticmethod
    def check_params(domid: int, nr_pirqs: int) -> None:
        """ValueError unless a domain can be built with these."""
        if not NR_IRQS_GSI < nr_pirqs <= NR_EVENT_CHANNELS:
            raise ValueError(f"nr_pirqs {nr_pirqs}: must be in {NR_IRQS_GSI + 1}..{NR_EVENT_CHANNELS}")
        if not 0 < domid < DOMID_SELF:
            raise ValueError(f"domid {domid}")

    # -- bookkeeping --------------------------------------------------------------------------------
    def _count(self, name: str) -> None:
        if self.stats is not None:
            w = self.stats.w
            if w is not None:
                w[self.stats.g(name)] += 1

    def _printk(self, level: str, msg: str) -> None:
        self.console.append((time.time(), level, msg))
        (log.warning if level == "warning" else log.info)("(XEN) d%d %s", self.domid, msg)
        if level == "warning":
            self.warnings += 1

    def _pirq(self, pirq: int) -> _Pirq:
        p = self._pirqs.get(pirq)
        if p is None:
            p = self._pirqs[pirq] = _Pirq(pirq)
        return p

    def _is_free(self, pirq: int) -> bool:
        p = self._pirqs.get(pirq)
        return p is None or p.state == PirqState.FREE

    def _tally(self, name: str) -> None:
        self.hypercalls[name] = self.hypercalls.get(name, 0) + 1

    # -- HVM setup ------------------------------------------------------------------------------------
    def set_shared_info(self, gpa: int) -> int:
        """XENMEM_add_to_physmap(XENMAPSPACE_shared_info) at *gpa* (a page of guest RAM)."""
        if gpa % 4096 or not self.memory.in_ram(gpa, 4096):
            return -errno.EINVAL
        with self._mu:
            self.shared = SharedInfo(self.memory, gpa)
            self.memory.fill(gpa, 4096, 0)
        return 0

    def set_callback_vector(self, vector: int) -> int:
        """HVMOP_set_param(HVM_PARAM_CALLBACK_IRQ, vector type)."""
        if not 0x10 <= vector <= 0xFF:
            return -errno.EINVAL
        self.callback_vector = vector
        return 0

    # -- PHYSDEVOP ---------------------------------------------------------------------------------------
    def physdev_op(self, cmd: int, arg: object, *, caller: Caller = Caller.GUEST, fd: int | None = None,
                   owner: dict | None = None) -> int:
        """HYPERVISOR_physdev_op.  *fd*, *owner*: the device model's map: the host interrupt's
        eventfd (this domain takes it over; closed when the map does not take it) and what it
        belongs to, for the monitor."""
        try:
            op = PhysdevOp(cmd)
        except ValueError:
            self._close_fd(fd)
            return -errno.ENOSYS
        self._tally(f"physdev_op.{op.name.lower()}")
        with self._mu:
            if op == PhysdevOp.GET_FREE_PIRQ and isinstance(arg, PhysdevGetFreePirq):
                self._close_fd(fd)
                return self._get_free_pirq(arg)
            if op == PhysdevOp.MAP_PIRQ and isinstance(arg, PhysdevMapPirq):
                return self._map_pirq(arg, caller, fd, owner or {})
            if op == PhysdevOp.UNMAP_PIRQ and isinstance(arg, PhysdevUnmapPirq):
                self._close_fd(fd)
                rc, old = self._unmap_pirq(arg, caller)
            else:
                rc, old = None, -1
        if rc is not None:
            if old >= 0:  # outside the lock: removing the handler waits for a delivery in progress
                if self.loop is not None:
                    self.loop.remove_fd_handler(old)
                os.close(old)
            return rc
        self._close_fd(fd)
        return -errno.EINVAL if op in (PhysdevOp.GET_FREE_PIRQ, PhysdevOp.MAP_PIRQ, PhysdevOp.UNMAP_PIRQ) \
            else -errno.ENOSYS

    @staticmethod
    def _close_fd(fd: int | None) -> None:
        if fd is not None and fd >= 0:
            os.close(fd)

    def _domain_ok(self, domid: int, caller: Caller) -> bool:
        """A guest names itself with DOMID_SELF (or its id); the device model names this domain.
        Any other domain: -EPERM (neither is privileged over another domain)."""
        return domid == self.domid or (domid == DOMID_SELF and caller == Caller.GUEST)

    def _get_free_pirq(self, arg: PhysdevGetFreePirq) -> int:
        if arg.type == MapPirqType.GSI:
            candidates = range(16, NR_IRQS_GSI)
        elif arg.type in (MapPirqType.MSI, MapPirqType.MSI_SEG, MapPirqType.MULTI_MSI):
            candidates = range(self.nr_pirqs - 1, NR_IRQS_GSI - 1, -1)
        else:
            return -errno.EINVAL
        for pirq in candidates:
            if self._is_free(pirq):
                self._pirq(pirq).state = PirqState.ALLOCATED
                arg.pirq = pirq
                return 0
        return -errno.ENOSPC

    def _map_pirq(self, arg: PhysdevMapPirq, caller: Caller, fd: int | None, owner: dict) -> int:
        if not self._domain_ok(arg.domid, caller):
            self._close_fd(fd)
            return -errno.EPERM
        if arg.type not in (MapPirqType.MSI, MapPirqType.MSI_SEG):
            self._close_fd(fd)
            return -errno.EINVAL  # GSI and MULTI_MSI maps are not modelled: say so, change nothing
        if caller != Caller.DEVICE_MODEL or fd is None:
            self._close_fd(fd)
            return -errno.EPERM  # only the device model maps a passthrough function's MSI
        pirq = arg.pirq
        auto = pirq == -1
        if auto:
            got = PhysdevGetFreePirq(MapPirqType.MSI)
            rc = self._get_free_pirq(got)
            if rc:
                self._close_fd(fd)
                return rc
            pirq = got.pirq
        elif not 0 < pirq < self.nr_pirqs:
            self._close_fd(fd)
            return -errno.EINVAL
        p = self._pirq(pirq)
        source = (arg.bus, arg.devfn, arg.entry_nr)
        other = next((q for q in self._pirqs.values() if q.state == PirqState.MAPPED and q.pirq != pirq
                      and (q.bus, q.devfn, q.entry_nr) == source), None)
        if p.state == PirqState.MAPPED or other is not None:
            # map_domain_pirq: "pirq %d or irq %d already mapped" -- a warning, and success
            old = p if p.state == PirqState.MAPPED else other
            assert old is not None
            self._printk("warning", f"pirq {pirq} or irq {arg.bus:02x}:{arg.devfn >> 3:02x}.{arg.devfn & 7}/"
                         f"{arg.entry_nr} already mapped ({old.pirq},{old.bus:02x}:{old.devfn >> 3:02x}."
                         f"{old.devfn & 7}/{old.entry_nr})")
            self.map_conflicts += 1
            self._close_fd(fd)
            if auto:  # picked by this map (Xen's allocate_pirq does not mark it), and the map did not take it
                p.state = PirqState.FREE
            arg.pirq = pirq
            return 0
        p.state = PirqState.MAPPED
        p.bus, p.devfn, p.entry_nr, p.table_base = arg.bus, arg.devfn, arg.entry_nr, arg.table_base
        p.owner = dict(owner)
        p.fd = fd
        p.maps += 1
        arg.pirq = pirq
        if self.loop is not None:
            os.set_blocking(fd, False)
            self.loop.set_fd_handler(fd, lambda: self._host_interrupt(pirq))
        self._printk("info", f"map pirq {pirq} -> {owner.get('device', '?')} vector {owner.get('vector', '?')}")
        if _t_map.enabled:
            _t_map.emit(domid=self.domid, pirq=pirq, devfn=arg.devfn, entry=arg.entry_nr)
        return 0

    def _unmap_pirq(self, arg: PhysdevUnmapPirq, caller: Caller) -> tuple[int, int]:
        """(rc, the host interrupt's fd the caller retires once the lock is dropped)."""
        if not self._domain_ok(arg.domid, caller):
            return -errno.EPERM, -1
        if not 0 < arg.pirq < self.nr_pirqs:
            return -errno.EINVAL, -1
        p = self._pirqs.get(arg.pirq)
        if p is None or p.state != PirqState.MAPPED:
            self._printk("warning", f"pirq {arg.pirq} not mapped")
            return -errno.EINVAL, -1
        if caller != Caller.DEVICE_MODEL:
            return -errno.EPERM, -1
        fd = p.fd
        p.fd = -1
        p.state = PirqState.FREE
        p.owner = {}
        self._printk("info", f"unmap pirq {arg.pirq}")
        if _t_unmap.enabled:
            _t_unmap.emit(domid=self.domid, pirq=arg.pirq)
        return 0, fd

    # -- EVTCHNOP ---------------------------------------------------------------------------------------
    def event_channel_op(self, cmd: int, arg: object) -> int:
        """HYPERVISOR_event_channel_op (the guest's)."""
        try:
            op = EvtchnOp(cmd)
        except ValueError:
            return -errno.ENOSYS
        self._tally(f"event_channel_op.{op.name.lower()}")
        if op == EvtchnOp.BIND_PIRQ and isinstance(arg, EvtchnBindPirq):
            return self._bind_pirq(arg)
        if op == EvtchnOp.BIND_IPI and isinstance(arg, EvtchnBindIpi):
            return self._bind_ipi(arg)
        if op == EvtchnOp.CLOSE and isinstance(arg, EvtchnClose):
            return self._close(arg.port)
        if op == EvtchnOp.SEND and isinstance(arg, EvtchnSend):
            return self._send(arg.port)
        if op == EvtchnOp.UNMASK and isinstance(arg, EvtchnUnmask):
            return self._unmask(arg.port)
        if op == EvtchnOp.STATUS and isinstance(arg, EvtchnStatus):
            return self._status(arg)
        return -errno.ENOSYS if op not in (EvtchnOp.BIND_PIRQ, EvtchnOp.BIND_IPI, EvtchnOp.CLOSE, EvtchnOp.SEND,
                                           EvtchnOp.UNMASK, EvtchnOp.STATUS) else -errno.EINVAL

    def _alloc_port(self) -> int:
        for port in range(1, NR_EVENT_CHANNELS):
            if port not in self._ports:
                return port
        return -errno.ENOSPC

    def _bind_pirq(self, arg: EvtchnBindPirq) -> int:
        with self._mu:
            if not 0 <= arg.pirq < self.nr_pirqs or arg.flags & ~BIND_PIRQ_WILL_SHARE:
                return -errno.EINVAL
            p = self._pirq(arg.pirq)
            if p.port:
                return -errno.EEXIST  # "at most one event channel per pirq per domain"
            port = self._alloc_port()
            if port < 0:
                return port
            self._ports[port] = _Port(port, EvtchnStat.PIRQ, pirq=arg.pirq)
            p.port = port
            arg.port = port
            self._printk("info", f"bind pirq {arg.pirq} -> port {port}")
        if _t_bind.enabled:
            _t_bind.emit(domid=self.domid, pirq=arg.pirq, port=port)
        return 0

    def _bind_ipi(self, arg: EvtchnBindIpi) -> int:
        with self._mu:
            if not 0 <= arg.vcpu < self.nvcpus:
                return -errno.ENOENT
            port = self._alloc_port()
            if port < 0:
                return port
            self._ports[port] = _Port(port, EvtchnStat.IPI, vcpu=arg.vcpu)
            arg.port = port
        return 0

    def _close(self, port: int) -> int:
        with self._mu:
            c = self._ports.get(port)
            if c is None:
                return -errno.EINVAL
            if c.stat == EvtchnStat.PIRQ:
                p = self._pirqs.get(c.pirq)
                if p is not None and p.port == port:
                    p.port = 0
            del self._ports[port]
            if self.shared is not None:  # a freed port starts clean (evtchn_port_clear_pending)
                self.shared.test_and_clear_pending(port)
                self.shared.test_and_clear_mask(port)
            self._printk("info", f"close port {port} ({c.stat.name.lower()}{' ' + str(c.pirq) if c.pirq else ''})")
        if _t_close.enabled:
            _t_close.emit(domid=self.domid, port=port, pirq=c.pirq)
        return 0

    def _send(self, port: int) -> int:
        with self._mu:
            c = self._ports.get(port)
            if c is None or c.stat != EvtchnStat.IPI:
                return -errno.EINVAL  # a pirq port is raised by its interrupt, never sent
        self._set_pending(c)
        return 0

    def _unmask(self, port: int) -> int:
        """evtchn_2l_unmask: clear the mask; a port pending meanwhile raises the upcall now."""
        with self._mu:
            c = self._ports.get(port)
            sh = self.shared
            if c is None or sh is None:
                return -errno.EINVAL
        if sh.test_and_clear_mask(port) and sh.pending(port):
            c.replays += 1
            if not sh.test_and_set_sel(c.vcpu, port // 64):
                self._mark_events_pending(c.vcpu)
        elif sh.pending(port) and not sh.test_and_set_sel(c.vcpu, port // 64):
            self._mark_events_pending(c.vcpu)  # the guest cleared the mask itself before asking
        return 0

    def _status(self, arg: EvtchnStatus) -> int:
        if arg.dom not in (DOMID_SELF, self.domid):
            return -errno.EPERM
        with self._mu:
            c = self._ports.get(arg.port)
            if c is None:
                if 0 < arg.port < NR_EVENT_CHANNELS:
                    arg.status = EvtchnStat.CLOSED
                    return 0
                return -errno.EINVAL
            arg.status, arg.vcpu, arg.pirq = c.stat, c.vcpu, c.pirq
        return 0

    # -- delivery ------------------------------------------------------------------------------------------
    def _set_pending(self, c: _Port) -> None:
        """evtchn_2l_set_pending."""
        sh = self.shared
        if sh is None:
            self.upcalls_lost += 1
            return
        c.sets += 1
        self._count("xen_evtchn_set_pending")
        if _t_pending.enabled:
            _t_pending.emit(domid=self.domid, port=c.port)
        if sh.test_and_set_pending(c.port):
            return  # already pending: coalesced
        if sh.masked(c.port):
            self._count("xen_evtchn_pending_masked")
            return
        if not sh.test_and_set_sel(c.vcpu, c.port // 64):
            self._mark_events_pending(c.vcpu)

    def _mark_events_pending(self, vcpu: int) -> None:
        sh = self.shared
        assert sh is not None
        if sh.test_and_set_upcall_pending(vcpu):
            return
        if not self.callback_vector:
            self.upcalls_lost += 1
            return
        self.upcalls += 1
        self._count("xen_upcalls")
        self._raise_vector(vcpu, self.callback_vector)

    def send_guest_pirq(self, pirq: int) -> bool:
        """An event on *pirq*: set its port pending (False: no port bound, the event is lost)."""
        with self._mu:
            p = self._pirqs.get(pirq)
            c = self._ports.get(p.port) if p is not None and p.port else None
            if c is None:
                if p is not None:
                    p.dropped += 1
                self._count("xen_pirq_drops")
                return False
            p.events += 1  # type: ignore[union-attr]
        self._set_pending(c)
        return True

    def _host_interrupt(self, pirq: int) -> None:
        """The interrupt loop: a mapped host interrupt fired."""
        with self._mu:
            p = self._pirqs.get(pirq)
            if p is None or p.state != PirqState.MAPPED or p.fd < 0:
                return
            try:
                os.eventfd_read(p.fd)
            except (BlockingIOError, OSError):
                return
        self._count("xen_pirq_events")
        self.send_guest_pirq(pirq)

    def inject_msi(self, address: int, data: int) -> bool:
        """XEN_DMOP_inject_msi (``hvm_inject_msi``): an emulated device's MSI."""
        pirq = pirq_of_msi(address, data)
        if pirq is None:
            self.lapic_msis += 1  # (the irqchip counts msi_lapic_deliveries)
            return self._deliver_msi(address, data)
        if not 0 < pirq < self.nr_pirqs:
            self._count("xen_pirq_drops")
            return False
        with self._mu:
            p = self._pirq(pirq)
            if p.state == PirqState.MAPPED:
                p.dropped += 1  # the pirq belongs to a passthrough function: not this path's
                self._count("xen_pirq_drops")
                return False
            if p.state != PirqState.EMULATED:  # "if it is the first time, allocate the pirq"
                p.state = PirqState.EMULATED
                self._printk("info", f"pirq {pirq} bound to the emulated MSI path")
                if _t_emu.enabled:
                    _t_emu.emit(domid=self.domid, pirq=pirq)
        self.emulated_msis += 1
        self._count("xen_emulated_msis")
        return self.send_guest_pirq(pirq)

    # -- view ----------------------------------------------------------------------------------------------
    def free_pirqs(self) -> list[int]:
        with self._mu:
            return [p for p in range(NR_IRQS_GSI, self.nr_pirqs) if self._is_free(p)]

    def query(self) -> dict:
        """The domain's pirqs, ports and counters (``x-query-xen-pirqs``'s hypervisor half).  At
        most ``QUERY_LIMIT`` pirqs and ports, lowest first (``pirqs-omitted``, ``ports-omitted``
        count the rest): the reply crosses the hypervisor channel as one message."""
        sh = self.shared
        with self._mu:
            pirqs = []
            for p in sorted(self._pirqs.values(), key=lambda p: p.pirq):
                if p.state == PirqState.FREE and not p.port and not p.events and not p.dropped:
                    continue
                pirqs.append({
                    "pirq": p.pirq, "state": p.state.value, "port": p.port, "owner": dict(p.owner),
                    "bus": p.bus, "devfn": p.devfn, "entry": p.entry_nr, "events": p.events, "dropped": p.dropped,
                    "masked": bool(sh and p.port and sh.masked(p.port)),
                    "pending": bool(sh and p.port and sh.pending(p.port)),
                })
            ports = [{"port": c.port, "status": c.stat.name.lower(), "pirq": c.pirq, "vcpu": c.vcpu,
                      "sets": c.sets, "replays": c.replays,
                      "masked": bool(sh and sh.masked(c.port)), "pending": bool(sh and sh.pending(c.port))}
                     for c in sorted(self._ports.values(), key=lambda c: c.port)]
            free = [p for p in range(NR_IRQS_GSI, self.nr_pirqs) if self._is_free(p)]
        return {
            "domid": self.domid, "nr-pirqs": self.nr_pirqs, "first-msi-pirq": NR_IRQS_GSI,
            "free": free, "free-count": len(free), "pirqs": pirqs[:QUERY_LIMIT], "ports": ports[:QUERY_LIMIT],
            "pirqs-omitted": max(0, len(pirqs) - QUERY_LIMIT), "ports-omitted": max(0, len(ports) - QUERY_LIMIT),
            "shared-info": sh.gpa if sh is not None else None, "callback-vector": self.callback_vector,
            "counters": {"upcalls": self.upcalls, "upcalls-lost": self.upcalls_lost, "lapic-msis": self.lapic_msis,
                         "emulated-msis": self.emulated_msis, "map-conflicts": self.map_conflicts,
                         "warnings": self.warnings},
            "hypercalls": dict(self.hypercalls),
            "console": [{"time": t, "level": lv, "msg": m} for t, lv, m in list(self.console)[-64:]],
        }

    def close(self) -> None:
        with self._mu:
            fds = [p.fd for p in self._pirqs.values() if p.fd >= 0]
            for p in self._pirqs.values():
                p.fd = -1
        for fd in fds:
            if self.loop is not None and self.loop.running:
                self.loop.remove_fd_handler(fd)
            os.close(fd)
