"""The guest's Xen layer: Linux's PV-on-HVM event channels and the Xen HVM MSI irq domain.

Used automatically when the hypervisor is Xen (``KernelHV.xen``); every hypercall goes to that
``XenHypervisor`` and every bit operation on the shared-info page goes through its
``SharedInfo`` (its lock is the ``lock bts``).

* ``XenEvtchn`` -- ``drivers/xen/events/events_base.c`` with the 2-level ABI
  (``events_2l.c``): at init the shared-info page (``XENMEM_add_to_physmap``), every port masked,
  the callback vector (``HVM_PARAM_CALLBACK_IRQ``, ``HYPERVISOR_CALLBACK_VECTOR``) and its entry,
  the upcall (``__xen_evtchn_do_upcall`` / ``evtchn_2l_handle_events``).  An irq per port
  (``evtchn_to_irq``); a pirq irq gets its port when it is started (``startup_pirq``:
  ``EVTCHNOP_bind_pirq``) and loses it when it is shut down (``shutdown_pirq``:
  ``EVTCHNOP_close``).  ``mask_irq`` is ``xen_pirq_chip``'s mask/unmask = ``mask_evtchn`` /
  ``unmask_evtchn``: the port's mask bit in shared info, and ``EVTCHNOP_unmask`` when the port
  is pending so that Xen replays it.
* ``XenHvmMsiDomain`` -- ``arch/x86/pci/xen.c``'s ``xen_hvm_setup_msi_irqs``: per MSI-X entry
  (or MSI, single vector only) a pirq from ``PHYSDEVOP_get_free_pirq``, the message composed
  with the pirq (``xen_msi_compose_msg``), written, and an irq bound to the pirq
  (``xen_bind_pirq_msi_to_irq``).  Two variants, switchable at runtime (``reuse_cached_pirq``):
  the 2010 one (af42b8d12f8a) first reads the entry's message back from the device and, when it
  carries a pirq some irq of the guest still has, *reuses* it; the 2017 fix (c74fd80f2f41, the
  default) always asks for a fresh pirq.  An HVM guest never unmaps a pirq: the device model
  does, when MSI/MSI-X is disabled (QEMU >= 2.1.0) -- which is why a pirq read back from a
  device may already belong to another one.

Which mask the guest's ``disable_irq`` reaches: under Xen an MSI/MSI-X irq's chip is the pirq
chip, so ``disable_irq`` sets the *event channel's* mask bit; the MSI-X entry's Vector Control
mask is written only by the PCI MSI core (masked at setup, unmasked at the first
``request_irq``, masked again at the last ``free_irq``).  An event that arrives on a masked
port stays pending in shared info and is replayed by the unmask -- the PBA's pattern one level
up.
"""

from __future__ import annotations

import errno
import functools
import logging
import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

from ..hv.xen_abi import (
    HYPERVISOR_CALLBACK_VECTOR, NR_EVENT_CHANNELS, XEN_PIRQ_MSI_DATA, EvtchnBindPirq, EvtchnClose, EvtchnOp,
    EvtchnUnmask, MapPirqType, PhysdevGetFreePirq, PhysdevOp, compose_pirq_msi, pirq_of_msi,
)
from .kernel import PAGE, GuestKernel, GuestPciDev, IrqDesc, MsiDomain, MsiSetupError

if TYPE_CHECKING:
    from ..hv.xen import SharedInfo, XenHypervisor

__all__ = ["XenEvtchn", "XenHvmMsiDomain", "XenIrq", "xen_hvm_init", "REUSE_CACHED_PIRQ"]

log = logging.getLogger("kickcall.guest.xen")

#: the default MSI variant of a new guest: False is the 2017 fix (c74fd80f2f41: always a fresh
#: pirq), True the 2010 behaviour (af42b8d12f8a: reuse the pirq cached in the device's MSI data)
REUSE_CACHED_PIRQ = False


@dataclass
class XenIrq:
    """Linux's ``struct irq_info`` for a pirq irq."""

    desc: IrqDesc
    pirq: int
    port: int = 0  # 0: no event channel (not started, or its bind failed)
    dev: GuestPciDev | None = None
    entry: int = -1
    kind: str = "msi-x"
    events: int = 0  # upcalls that found its port pending
    bind_failures: int = 0

    def describe(self) -> dict:
        d = self.desc
        return {"irq": d.irq, "pirq": self.pirq, "port": self.port,
                "slot": self.dev.devfn >> 3 if self.dev is not None else None, "entry": self.entry,
                "kind": self.kind, "name": d.name, "count": sum(d.counts), "events": self.events,
                "handlers": len(d.handlers), "bind-failures": self.bind_failures}


class XenEvtchn:
    """The guest's event channel layer (events_base.c + events_2l.c) for one Xen HVM domain."""

    def __init__(self, k: GuestKernel, xen: "XenHypervisor") -> None:
        self.k = k
        self.xen = xen
        self._mu = threading.RLock()  # irq_mapping_update_lock
        self.irqs: dict[int, XenIrq] = {}
        self.evtchn_to_irq: dict[int, int] = {}
        self.shared_info_gpa = 0
        self.upcalls = 0
        self.spurious = 0  # a pending port with no irq, or an irq with no handler
        self.bind_failures = 0  # "Failed to obtain physical IRQ"
        #: an irq bound to a pirq another irq of the guest holds with a port (a live binding).  An
        #: irq still being torn down does not count: its port is closed before MSI-X is disabled
        #: (free_irq, then pci_disable_msix), and between the device model's unmap and the
        #: guest's xen_destroy_irq another controller may rightly be handed that pirq, as on Linux.
        self.pirq_shared = 0

    @property
    def shared(self) -> "SharedInfo":
        sh = self.xen.shared
        if sh is None:
            raise RuntimeError("Xen: no shared-info page")
        return sh

    def init(self) -> None:
        """``xen_hvm_init_shared_info`` + ``xen_init_IRQ`` + ``xen_set_callback_via``."""
        gpa = self.k.pages.alloc(PAGE)
        rc = self.xen.set_shared_info(gpa)
        if rc:
            raise RuntimeError(f"Xen: XENMEM_add_to_physmap(shared_info) failed: {rc}")
        self.shared_info_gpa = gpa
        sh = self.shared
        for port in range(1, NR_EVENT_CHANNELS):  # "mask all events" (xen_init_IRQ)
            sh.test_and_set_mask(port)
        self.k.set_system_vector(HYPERVISOR_CALLBACK_VECTOR, self.upcall)
        rc = self.xen.set_callback_vector(HYPERVISOR_CALLBACK_VECTOR)
        if rc:
            raise RuntimeError(f"Xen: HVM_PARAM_CALLBACK_IRQ failed: {rc}")
        self.k.printk(f"xen: shared info at {gpa:#x}, callback vector {HYPERVISOR_CALLBACK_VECTOR:#x}")

    # -- irqs ------------------------------------------------------------------------------------------
    def bind_pirq_msi_to_irq(self, pirq: int, dev: GuestPciDev | None, entry: int, kind: str, name: str) -> IrqDesc:
        """``xen_bind_pirq_msi_to_irq``: a new irq for *pirq*, no port yet (it comes at startup)."""
        with self._mu:
            if any(x.pirq == pirq and x.port for x in self.irqs.values()):
                self.pirq_shared += 1
            d = self.k.new_irq(name)
            self.irqs[d.irq] = XenIrq(d, pirq, dev=dev, entry=entry, kind=kind)
            return d

    def irq_from_pirq(self, pirq: int) -> int:
        """``xen_irq_from_pirq``: an irq of this guest that has *pirq* (the oldest), or -1."""
        with self._mu:
            return next((i for i, x in self.irqs.items() if x.pirq == pirq), -1)

    def info(self, irq: int) -> XenIrq | None:
        return self.irqs.get(irq)

    def startup_pirq(self, d: IrqDesc) -> None:
        """``__startup_pirq``: bind an event channel to the irq's pirq, then unmask it.  A failed
        bind (``-EEXIST``: the pirq already has a port, another irq's) is only a warning and the
        irq stays without a port, as Linux does."""
        with self._mu:
            x = self.irqs.get(d.irq)
            if x is None:
                return
            if not x.port:
                arg = EvtchnBindPirq(x.pirq, 0)
                rc = self.xen.event_channel_op(EvtchnOp.BIND_PIRQ, arg)
                if rc:
                    x.bind_failures += 1
                    self.bind_failures += 1
                    self.k.printk(f"xen: Failed to obtain physical IRQ {d.irq} (pirq {x.pirq}: {rc})")
                    return
                x.port = arg.port
                self.evtchn_to_irq[arg.port] = d.irq
            port = x.port
        self.unmask_evtchn(port)

    def shutdown_pirq(self, d: IrqDesc) -> None:
        """``shutdown_pirq``: mask the port, ``EVTCHNOP_close``, forget it."""
        with self._mu:
            x = self.irqs.get(d.irq)
            if x is None or not x.port:
                return
            port, x.port = x.port, 0
            self.mask_evtchn(port)
            self.xen.event_channel_op(EvtchnOp.CLOSE, EvtchnClose(port))
            if self.evtchn_to_irq.get(port) == d.irq:
                del self.evtchn_to_irq[port]

    def destroy_irq(self, d: IrqDesc) -> None:
        """``xen_destroy_irq`` in an HVM guest: close the port if any and free the irq; the pirq is
        not unmapped (only dom0 does; the device model does it for an HVM guest)."""
        self.shutdown_pirq(d)
        with self._mu:
            self.irqs.pop(d.irq, None)
        self.k.release_irq(d.irq)

    # -- masks -------------------------------------------------------------------------------------------
    def mask_evtchn(self, port: int) -> None:
        self.shared.test_and_set_mask(port)

    def unmask_evtchn(self, port: int) -> None:
        """``evtchn_2l_unmask`` in an HVM guest: a pending port is unmasked by the hypervisor
        (``EVTCHNOP_unmask``, which replays it); otherwise the mask bit is cleared here -- and if
        the port became pending meanwhile, Xen is asked after all."""
        sh = self.shared
        if sh.pending(port):
            self.xen.event_channel_op(EvtchnOp.UNMASK, EvtchnUnmask(port))
            return
        sh.test_and_clear_mask(port)
        if sh.pending(port):
            self.xen.event_channel_op(EvtchnOp.UNMASK, EvtchnUnmask(port))

    def mask_irq(self, irq: int, masked: bool) -> bool:
        """``xen_pirq_chip``'s irq_mask / irq_unmask: the port's mask bit (False: not a Xen irq)."""
        x = self.irqs.get(irq)
        if x is None:
            return False
        if x.port:
            if masked:
                self.mask_evtchn(x.port)
            else:
                self.unmask_evtchn(x.port)
        return True

    def mask_port(self, port: int, masked: bool) -> None:
        """Mask or unmask an event channel by number (a debugging hook: what ``mask_irq`` does)."""
        if not 0 < port < NR_EVENT_CHANNELS:
            raise ValueError(f"port {port} out of range")
        if masked:
            self.mask_evtchn(port)
        else:
            self.unmask_evtchn(port)

    # -- the upcall ------------------------------------------------------------------------------------
    def upcall(self, cpu: int) -> None:
        """``__xen_evtchn_do_upcall`` (interrupt context, the callback vector): clear
        ``evtchn_upcall_pending``, take ``evtchn_pending_sel``, and for each of its words every
        port pending and not masked: clear its pending bit (ack) and run its irq's handlers; again
        while the upcall is pending."""
        self.upcalls += 1
        sh = self.shared
        vcpu = cpu
        while True:
            sh.clear_upcall_pending(vcpu)
            sel = sh.xchg_sel(vcpu)
            while sel:
                word = (sel & -sel).bit_length() - 1
                sel &= sel - 1
                active = sh.active_word(word)
                while active:
                    bit = (active & -active).bit_length() - 1
                    active &= active - 1
                    self._handle_port(word * 64 + bit, cpu)
            if not sh.upcall_pending(vcpu):
                return

    def _handle_port(self, port: int, cpu: int) -> None:
        self.shared.test_and_clear_pending(port)
        irq = self.evtchn_to_irq.get(port)
        x = self.irqs.get(irq) if irq is not None else None
        if x is None:
            self.spurious += 1
            return
        x.events += 1
        if not self.k.handle_irq(x.desc, cpu):
            self.spurious += 1

    def describe(self) -> list[dict]:
        with self._mu:
            return [x.describe() for _i, x in sorted(self.irqs.items())]


class XenHvmMsiDomain(MsiDomain):
    """``xen_hvm_setup_msi_irqs`` / ``xen_teardown_msi_irqs`` and the pirq chip (see the module's
    docstring).  *reuse_cached_pirq* selects the 2010 variant (see ``REUSE_CACHED_PIRQ``)."""

    name = "xen-hvm"

    def __init__(self, ev: XenEvtchn, *, reuse_cached_pirq: bool | None = None) -> None:
        self.ev = ev
        self.k = ev.k
        self.reuse_cached_pirq = REUSE_CACHED_PIRQ if reuse_cached_pirq is None else reuse_cached_pirq
        self.reused = 0  # setups that took the pirq read back from the device
        #: pirqs this guest was given (an HVM guest never gives one back: it cannot know when the
        #: device model unmapped one); read by the 2010 variant only
        self.remembered: set[int] = set()
        self.pirq_alloc_failures = 0

    @property
    def variant(self) -> str:
        return "reuse" if self.reuse_cached_pirq else "fresh"

    def _cached_pirq(self, address: int, data: int) -> int:
        """The 2010 read-back: the pirq the device's message carries, if the guest still knows it
        (``xen_irq_from_pirq(pirq) >= 0``).  The guest knows a pirq some irq has -- another
        device's included -- and, in this variant, a pirq it was once given whose irq was torn
        down: the 2010 code relied on "the old MSI to pirq mapping is still valid" after a
        disable (its commit message), which only the guest's own record could tell it.  kickcall
        keeps that record (``remembered``) and only this variant reads it [the exact 2010
        bookkeeping is unverified; the observable behaviour is the commit's]."""
        if data != XEN_PIRQ_MSI_DATA:
            return -1
        pirq = pirq_of_msi(address, data)
        if pirq is None or (self.ev.irq_from_pirq(pirq) < 0 and pirq not in self.remembered):
            return -1
        return pirq

    def _allocate_pirq(self) -> int:
        """``xen_allocate_pirq_msi``: ``PHYSDEVOP_get_free_pirq(MAP_PIRQ_TYPE_MSI)``, -1 on failure."""
        arg = PhysdevGetFreePirq(MapPirqType.MSI)
        rc = self.ev.xen.physdev_op(PhysdevOp.GET_FREE_PIRQ, arg)
        if rc:
            self.pirq_alloc_failures += 1
            return -1
        self.remembered.add(arg.pirq)
        return arg.pirq

    def _pirq_for(self, dev: GuestPciDev, msg: tuple[int, int], write: Callable[[int, int], None],
                  kind: str) -> int:
        """One descriptor of ``xen_hvm_setup_msi_irqs``: the 2010 read-back of *msg* (the device's
        current message) when that variant is on, else a fresh pirq, composed and *write*-n."""
        pirq = self._cached_pirq(*msg) if self.reuse_cached_pirq else -1
        if pirq >= 0:
            self.reused += 1
            self.k.printk(f"{dev!r}: xen: msi already bound to pirq={pirq}")
            return pirq
        pirq = self._allocate_pirq()
        if pirq < 0:
            raise MsiSetupError(-errno.ENODEV, f"xen: Failed to create {kind}! (no free pirq)")
        write(*compose_pirq_msi(pirq))
        return pirq

    def setup_msix_entry(self, dev: GuestPciDev, entry: int, name: str, desc: IrqDesc | None = None) -> IrqDesc:
        if desc is not None:
            raise MsiSetupError(-errno.EINVAL, "xen: a pirq irq cannot serve two MSI-X entries")
        pirq = self._pirq_for(dev, dev.read_msix_msg(entry), functools.partial(dev.write_msix_msg, entry), "MSI-X")
        return self.ev.bind_pirq_msi_to_irq(pirq, dev, entry, "msi-x", name)

    def setup_msi(self, dev: GuestPciDev, nvec: int, name: str) -> list[IrqDesc] | int:
        if nvec > 1:
            return 1  # "single MSI only" (multi-MSI needs MAP_PIRQ_TYPE_MULTI_MSI, dom0's)
        pirq = self._pirq_for(dev, dev.read_msi_msg(), dev.write_msi_msg, "MSI")
        return [self.ev.bind_pirq_msi_to_irq(pirq, dev, 0, "msi", f"{name}0")]

    def compose(self, desc: IrqDesc) -> tuple[int, int]:
        x = self.ev.info(desc.irq)
        if x is None:
            raise KeyError(f"irq {desc.irq} is not a Xen pirq irq")
        return compose_pirq_msi(x.pirq)

    def teardown(self, dev: GuestPciDev, descs: list[IrqDesc]) -> None:
        for d in descs:
            self.ev.destroy_irq(d)

    def irq_startup(self, desc: IrqDesc) -> None:
        self.ev.startup_pirq(desc)

    def irq_shutdown(self, desc: IrqDesc) -> None:
        self.ev.shutdown_pirq(desc)

    def irq_mask(self, desc: IrqDesc, masked: bool) -> bool:
        return self.ev.mask_irq(desc.irq, masked)

    def owns(self, desc: IrqDesc) -> bool:
        return self.ev.info(desc.irq) is not None


def xen_hvm_init(k: GuestKernel) -> XenHvmMsiDomain:
    """Bring the PV-on-HVM interrupt path up on kernel *k* (``hv.xen`` must be the domain):
    event channels, then the Xen MSI domain in place of the native one.  Returns the domain
    (``k.xen``); its event channel layer is ``.ev``."""
    xen = k.hv.xen
    if xen is None:
        raise RuntimeError("not a Xen guest")
    ev = XenEvtchn(k, xen)
    ev.init()
    dom = XenHvmMsiDomain(ev)
    k.msi_domain = dom
    return dom
