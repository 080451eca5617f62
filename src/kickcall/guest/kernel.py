"""The guest kernel model: CPUs, interrupts, memory, and the PCI core with MSI-X, MSI and INTx.

Names follow Linux: ``request_irq``/``free_irq``, ``pci_alloc_irq_vectors``, ``pci_irq_vector``,
``pci_set_master``, the MSI-X enable sequence (ENABLE|MASKALL, program the table with every entry
masked, clear MASKALL, unmask each entry when its irq is requested), and MSI's
(``msi_capability_init``: every vector masked through the mask bits, address and data written
with the base of a block of ``2**MME`` CPU vectors aligned to its size, MME, INTx off, Enable;
a vector unmasked when its irq is requested).  Guest code runs on vCPU
threads; MMIO and port I/O go through the current vCPU (``this_cpu()``), so every access really
leaves through the hypervisor: an ioeventfd or a heavyweight exit.
"""

from __future__ import annotations

import errno
import logging
import threading
from abc import ABC, abstractmethod
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable

from ..hv.kernel import KernelHV, Vcpu
from ..hv.routing import msi_address
from ..pci import regs as R
from ..pci.regs import (
    PCI_MSI_ADDRESS_HI, PCI_MSI_ADDRESS_LO, PCI_MSI_DATA_32, PCI_MSI_DATA_64, PCI_MSI_FLAGS,
    PCI_MSI_FLAGS_64BIT, PCI_MSI_FLAGS_ENABLE, PCI_MSI_FLAGS_MASKBIT, PCI_MSI_FLAGS_QMASK,
    PCI_MSI_FLAGS_QSIZE, PCI_MSI_MASK_32, PCI_MSI_MASK_64,
)
from ..threads import named_thread

if TYPE_CHECKING:
    from ..pci.recovery import PciErrorHandlers
    from .xen import XenHvmMsiDomain

__all__ = ["GuestKernel", "GuestPciDev", "IrqDesc", "PageAllocator", "IRQ_HANDLED", "IRQ_NONE", "MsiDomain",
           "NativeMsiDomain", "MsiSetupError"]

log = logging.getLogger("kickcall.guest")

IRQ_NONE = False
IRQ_HANDLED = True
PAGE = 4096
FIRST_DEVICE_VECTOR = 0x30
LAST_DEVICE_VECTOR = 0xEF
MMIO32_BASE, MMIO32_END = 0xE0000000, 0xFEC00000
MMIO64_BASE = 0x80_0000_0000
IO_BASE, IO_END = 0xC000, 0x10000
PCI_IRQ_INTX, PCI_IRQ_MSI, PCI_IRQ_MSIX = 1, 2, 4


class PageAllocator:
    """First-fit allocator of 4 KiB guest pages (the guest's page allocator, simplified)."""

    def __init__(self, start: int, end: int) -> None:
        start = (start + PAGE - 1) // PAGE * PAGE
        self._free: list[list[int]] = [[start, (end - start) // PAGE]]
        self._mu = threading.Lock()
        self._sizes: dict[int, int] = {}

    def alloc(self, nbytes: int, align: int = PAGE) -> int:
        npages = max(1, (nbytes + PAGE - 1) // PAGE)
        with self._mu:
            for i, (s, n) in enumerate(self._free):
                a = (s + align - 1) // align * align
                skip = (a - s) // PAGE
                if n - skip >= npages:
                    if skip:
                        self._free.insert(i, [s, skip])
                        i += 1
                    rest = n - skip - npages
                    if rest:
                        self._free[i] = [a + npages * PAGE, rest]
                    else:
                        del self._free[i]
                    self._sizes[a] = npages
                    return a
        raise MemoryError(f"guest out of memory allocating {nbytes} bytes")

    def free(self, gpa: int) -> None:
        with self._mu:
            n = self._sizes.pop(gpa)
            self._free.append([gpa, n])
            self._free.sort()
            merged: list[list[int]] = []
            for s, c in self._free:
                if merged and merged[-1][0] + merged[-1][1] * PAGE == s:
                    merged[-1][1] += c
                else:
                    merged.append([s, c])
            self._free = merged

    @property
    def free_bytes(self) -> int:
        with self._mu:
            return sum(n for _, n in self._free) * PAGE


@dataclass
class IrqDesc:
    irq: int
    vector: int
    name: str = ""
    handlers: list[tuple[Callable[[int], bool], str]] = field(default_factory=list)
    counts: list[int] = field(default_factory=list)
    unhandled: int = 0
    cpu: int = 0


class MsiSetupError(RuntimeError):
    """An MSI domain could not set a vector up (``arch_setup_msi_irqs`` returned *rc* < 0):
    the PCI MSI core undoes the enable and ``pci_alloc_irq_vectors`` tries the next mode."""

    def __init__(self, rc: int, msg: str) -> None:
        super().__init__(msg)
        self.rc = rc
        self.kind = errno.errorcode.get(-rc, "EIO") if rc < 0 else "EIO"


class MsiDomain(ABC):
    """The x86 PCI MSI irq domain seam: how a device's MSI/MSI-X vectors become Linux irqs and
    messages (``x86_msi.setup_msi_irqs`` / ``teardown_msi_irqs`` and the irq chip's
    ``irq_startup`` / ``irq_shutdown`` / ``irq_mask``).

    The PCI MSI core (``GuestPciDev``) owns the capability and the MSI-X table: it sets ENABLE and
    MASKALL, asks the domain for each vector (the domain composes the message and writes it with
    ``GuestPciDev.write_msix_msg`` / ``write_msi_msg`` while the entry is masked), clears MASKALL,
    and unmasks an entry when its irq's first handler is requested -- in every domain.  The
    native domain gives each irq a CPU vector (``msi_address(cpu)``, data = vector); the Xen HVM
    domain (``guest.xen.XenHvmMsiDomain``) gives it a pirq and an event channel instead."""

    name = "?"

    @abstractmethod
    def setup_msix_entry(self, dev: "GuestPciDev", entry: int, name: str, desc: "IrqDesc | None" = None) -> "IrqDesc":
        """Set MSI-X entry *entry* up (a new irq, or *desc* shared): compose and write its message
        while it is masked.  Raises ``MsiSetupError`` when the domain has nothing to give."""

    @abstractmethod
    def setup_msi(self, dev: "GuestPciDev", nvec: int, name: str) -> "list[IrqDesc] | int":
        """*nvec* MSI vectors (a power of two) and their message written; or a positive int:
        "only this many" (``pci_enable_msi_range`` retries with it), as Linux's arch hook says."""

    @abstractmethod
    def compose(self, desc: "IrqDesc") -> tuple[int, int]:
        """The (64-bit address, data) of the message that reaches *desc* (``irq_compose_msi_msg``)."""

    @abstractmethod
    def teardown(self, dev: "GuestPciDev", descs: "list[IrqDesc]") -> None:
        """Free the irqs of a device whose MSI/MSI-X is being disabled (``teardown_msi_irqs``)."""

    def irq_startup(self, desc: "IrqDesc") -> None:
        """The irq's first handler was requested (before the PCI MSI core unmasks its entry)."""
        return None

    def irq_shutdown(self, desc: "IrqDesc") -> None:
        """The irq's last handler was freed (after the PCI MSI core masked its entry)."""
        return None

    def irq_mask(self, desc: "IrqDesc", masked: bool) -> bool:
        """``disable_irq``/``enable_irq``: mask the irq where this domain masks it.  False: the
        domain has no mask of its own (the PCI MSI core masks the entry / vector)."""
        return False

    def owns(self, desc: "IrqDesc") -> bool:
        """Whether *desc* is an irq this domain created (an MSI of some device)."""
        return False


class NativeMsiDomain(MsiDomain):
    """The native x86 vector domain: one CPU vector per irq, the message names the CPU's LAPIC
    and carries the vector (multi-MSI: a block of ``nvec`` vectors aligned to its size)."""

    name = "native"

    def __init__(self, kernel: "GuestKernel") -> None:
        self.k = kernel

    def setup_msix_entry(self, dev: "GuestPciDev", entry: int, name: str, desc: "IrqDesc | None" = None) -> "IrqDesc":
        d = desc if desc is not None else self.k.alloc_irq(name)
        dev.write_msix_msg(entry, *self.compose(d))
        return d

    def setup_msi(self, dev: "GuestPciDev", nvec: int, name: str) -> "list[IrqDesc] | int":
        descs = self.k.alloc_irq_block(nvec, name)
        dev.write_msi_msg(*self.compose(descs[0]))
        return descs

    def compose(self, desc: "IrqDesc") -> tuple[int, int]:
        return msi_address(desc.cpu), desc.vector

    def teardown(self, dev: "GuestPciDev", descs: "list[IrqDesc]") -> None:
        for d in descs:
            self.k.release_irq(d.irq)


class GuestKernel:
    """The guest OS: runs on the vCPUs of a KernelHV.

    Under Xen (``hv.xen`` is a domain) the kernel is a PV-on-HVM guest: at init it registers the
    shared-info page and the callback vector, takes the upcall on that vector
    (``guest.xen.XenEvtchn``) and uses the Xen HVM MSI domain for every device."""

    def __init__(self, hv: KernelHV) -> None:
        self.hv = hv
        assert hv.memory is not None
        self.memory = hv.memory
        self.ncpus = hv.nvcpus
        self._tls = threading.local()
        end = max(g + s for g, s in self.memory.regions)
        self.pages = PageAllocator(0x100000, end)
        self.irqs: dict[int, IrqDesc] = {}
        self._vector_to_irq: dict[int, int] = {}
        self._next_virq = 32
        self._irq_mu = threading.Lock()
        self._pci_mu = threading.Lock()
        self.spurious = 0
        self.pci_devices: list[GuestPciDev] = []
        self._win = [MMIO32_BASE, MMIO64_BASE, IO_BASE]
        self._next_vector_cpu = 0
        hv.set_interrupt_handler(self.do_irq)
        hv.irq_loop.run_sync(self._bind_irq_thread)
        self._tasks: set[threading.Thread] = set()
        self._task_mu = threading.Lock()
        self.console: list[str] = []
        #: system vectors (``alloc_intr_gate``): a vector with its own entry, not an irq's
        self._system_vectors: dict[int, Callable[[int], None]] = {}
        self.msi_domain: MsiDomain = NativeMsiDomain(self)
        #: the Xen HVM MSI domain (its event channel layer is ``.ev``) when the hypervisor is Xen
        self.xen: XenHvmMsiDomain | None = None
        if hv.xen is not None:
            from .xen import xen_hvm_init  # the Xen layer builds on this module

            self.xen = xen_hvm_init(self)

    def _bind_irq_thread(self) -> None:
        self._tls.cpu = self.hv.irq_vcpu

    def shutdown(self, timeout: float = 5.0) -> None:
        with self._task_mu:
            tasks = list(self._tasks)
        for t in tasks:
            t.join(timeout)

    def printk(self, msg: str) -> None:
        self.console.append(msg)
        log.info("guest: %s", msg)

    # -- CPUs -----------------------------------------------------------------------------------------
    def this_cpu(self) -> Vcpu:
        cpu = getattr(self._tls, "cpu", None)
        if cpu is None:
            raise RuntimeError("guest code must run on a vCPU (or in interrupt context)")
        return cpu

    def in_interrupt(self) -> bool:
        return getattr(self._tls, "cpu", None) is self.hv.irq_vcpu

    def halt_until(self, event: threading.Event, timeout: float) -> bool:
        """Halt the current vCPU until *event* is set or *timeout* seconds of guest time pass
        (time spent paused does not count)."""
        cpu = self.this_cpu()
        ctl = self.hv.vcpu_ctl
        deadline = ctl.guest_ns() + int(timeout * 1e9)
        while True:
            if cpu.halt_wait(lambda: event.wait(0.25)):
                return True
            if ctl.guest_ns() >= deadline:
                return event.is_set()

    def run_on(self, cpu: int, fn: Callable[[], object]) -> Future:
        """Run *fn* as a guest thread pinned to vCPU *cpu*; its MMIO goes through that vCPU."""
        fut: Future = Future()
        index = cpu % self.ncpus

        def body() -> None:
            ctx = self.hv.vcpu_context(index)
            self._tls.cpu = ctx
            ctx.enter_guest()
            try:
                fut.set_result(fn())
            except BaseException as e:  # handed to whoever waits on the future
                fut.set_exception(e)
            finally:
                ctx.leave_guest()
                self.hv.release_context(ctx)
                with self._task_mu:
                    self._tasks.discard(threading.current_thread())

        t = named_thread(body, f"kc-cpu{index}-task")
        with self._task_mu:
            self._tasks.add(t)
        t.start()
        return fut

    def run_on_idle(self, fn: Callable[[], object]) -> Future:
        return self.run_on(0, fn)

    def msleep(self, ms: float) -> None:
        """``msleep``: the current vCPU halts for *ms* milliseconds (a hardware timing such as a
        reset's Trst, not a wait for an event); a pause of the vCPUs is not held up by it."""
        cpu = self.this_cpu()
        ev = threading.Event()
        cpu.halt_wait(lambda: ev.wait(ms / 1000.0))

    # -- MMIO / PIO ------------------------------------------------------------------------------------
    def readb(self, a: int) -> int:
        return self.this_cpu().mmio_read(a, 1)

    def readw(self, a: int) -> int:
        return self.this_cpu().mmio_read(a, 2)

    def readl(self, a: int) -> int:
        return self.this_cpu().mmio_read(a, 4)

    def writeb(self, a: int, v: int) -> None:
        self.this_cpu().mmio_write(a, v, 1)

    def writew(self, a: int, v: int) -> None:
        self.this_cpu().mmio_write(a, v, 2)

    def writel(self, a: int, v: int) -> None:
        self.this_cpu().mmio_write(a, v, 4)

    def writeq(self, a: int, v: int) -> None:
        self.this_cpu().mmio_write(a, v & 0xFFFFFFFF, 4)
        self.this_cpu().mmio_write(a + 4, v >> 32, 4)

    def outl(self, port: int, v: int) -> None:
        self.this_cpu().pio_write(port, v, 4)

    def inb(self, port: int) -> int:
        return self.this_cpu().pio_read(port, 1)

    def inw(self, port: int) -> int:
        return self.this_cpu().pio_read(port, 2)

    def inl(self, port: int) -> int:
        return self.this_cpu().pio_read(port, 4)

    def outb(self, port: int, v: int) -> None:
        self.this_cpu().pio_write(port, v, 1)

    def outw(self, port: int, v: int) -> None:
        self.this_cpu().pio_write(port, v, 2)

    # -- interrupts -------------------------------------------------------------------------------------
    def _alloc_vector(self) -> int:
        used = set(self._vector_to_irq)
        for v in range(FIRST_DEVICE_VECTOR, LAST_DEVICE_VECTOR + 1):
            if v not in used:
                return v
        raise RuntimeError("no free interrupt vector")

    def alloc_irq(self, name: str = "") -> IrqDesc:
        """A new Linux irq number with its own CPU vector (MSI-X vectors take one each)."""
        with self._irq_mu:
            vec = self._alloc_vector()
            irq = self._next_virq
            self._next_virq += 1
            d = IrqDesc(irq, vec, name, counts=[0] * self.ncpus)
            d.cpu = self._next_vector_cpu % self.ncpus
            self._next_vector_cpu += 1
            self.irqs[irq] = d
            self._vector_to_irq[vec] = irq
            return d

    def alloc_irq_block(self, n: int, name: str = "") -> list[IrqDesc]:
        """*n* irqs (a power of two) on *n* consecutive CPU vectors aligned to *n*, all on one CPU:
        multi-message MSI, whose vector *i* is the data's low bits (``irq_alloc_descs`` with the
        x86 vector domain's alignment for multi-MSI)."""
        if n <= 0 or n & (n - 1):
            raise ValueError("a multi-MSI block is a power of two")
        with self._irq_mu:
            used = set(self._vector_to_irq)
            base = next((b for b in range((FIRST_DEVICE_VECTOR + n - 1) // n * n, LAST_DEVICE_VECTOR + 2 - n, n)
                         if not used & set(range(b, b + n))), None)
            if base is None:
                raise RuntimeError(f"no block of {n} free interrupt vectors")
            cpu = self._next_vector_cpu % self.ncpus
            self._next_vector_cpu += 1
            out = []
            for i in range(n):
                d = IrqDesc(self._next_virq, base + i, f"{name}{i}", counts=[0] * self.ncpus, cpu=cpu)
                self._next_virq += 1
                self.irqs[d.irq] = d
                self._vector_to_irq[d.vector] = d.irq
                out.append(d)
            return out

    def new_irq(self, name: str = "", cpu: int = 0) -> IrqDesc:
        """A new Linux irq number with no CPU vector (``irq_alloc_desc``): an irq whose interrupts
        arrive some other way (a Xen event channel)."""
        with self._irq_mu:
            d = IrqDesc(self._next_virq, 0, name, counts=[0] * self.ncpus, cpu=cpu % self.ncpus)
            self._next_virq += 1
            self.irqs[d.irq] = d
            return d

    def set_system_vector(self, vector: int, fn: Callable[[int], None]) -> None:
        """Install *fn(cpu)* as the entry of CPU vector *vector* (``alloc_intr_gate``, e.g. Xen's
        HYPERVISOR_CALLBACK_VECTOR); it runs in interrupt context."""
        with self._irq_mu:
            if vector in self._vector_to_irq:
                raise RuntimeError(f"vector {vector:#x} is an irq's")
            self._system_vectors[vector] = fn
            self._vector_to_irq[vector] = -1  # reserved: never handed to an irq

    def handle_irq(self, d: IrqDesc, cpu: int) -> bool:
        """Run irq *d*'s handlers (``generic_handle_irq``); False: it had none (spurious)."""
        if not d.handlers:
            self.spurious += 1
            return False
        d.counts[cpu % self.ncpus] += 1
        handled = False
        for h, _n in list(d.handlers):
            try:
                handled |= bool(h(d.irq))
            except Exception:
                log.exception("irq %d handler failed", d.irq)
        if not handled:
            d.unhandled += 1
        return True

    def disable_irq(self, irq: int, masked: bool = True) -> None:
        """``disable_irq_nosync`` / ``enable_irq`` (*masked* False): mask the irq at its chip.  A
        native MSI/MSI-X irq is masked at the device (the entry's Vector Control, or the MSI mask
        bit); under Xen the event channel's mask bit in shared info is what it reaches -- the MSI-X
        entry stays as the PCI MSI core left it (``XenEvtchn.mask_irq``)."""
        d = self.irqs.get(irq)
        if d is None:
            raise KeyError(f"no irq {irq}")
        if self.msi_domain.irq_mask(d, masked):
            return
        if irq < 24:
            self.hv.irqchip.program(irq, d.vector, dest=0, masked=masked or not d.handlers, level=True)
            return
        for dev in self.pci_devices:
            i = dev.entry_for_irq(irq)
            if i is not None:
                dev.vector_mask(i, masked)

    def release_irq(self, irq: int) -> None:
        with self._irq_mu:
            d = self.irqs.pop(irq, None)
            if d is not None:
                self._vector_to_irq.pop(d.vector, None)

    def gsi_irq(self, gsi: int) -> IrqDesc:
        """The irq of an IOAPIC pin (INTx), programming the pin on first use (level, active high)."""
        with self._irq_mu:
            if gsi in self.irqs:
                return self.irqs[gsi]
            vec = self._alloc_vector()
            d = IrqDesc(gsi, vec, f"IO-APIC {gsi}-fasteoi", counts=[0] * self.ncpus)
            self.irqs[gsi] = d
            self._vector_to_irq[vec] = gsi
        self.hv.irqchip.program(gsi, vec, dest=0, masked=True, level=True)
        return d

    def request_irq(self, irq: int, handler: Callable[[int], bool], name: str) -> None:
        d = self.irqs[irq]
        first = not d.handlers
        d.handlers.append((handler, name))
        d.name = d.name or name
        if first and irq < 24:
            self.hv.irqchip.program(irq, d.vector, dest=0, masked=False, level=True)
        elif first and self.msi_domain.owns(d):
            self.msi_domain.irq_startup(d)
        for dev in self.pci_devices:
            dev.irq_startup(irq)

    def free_irq(self, irq: int, handler: Callable[[int], bool] | None = None) -> None:
        d = self.irqs.get(irq)
        if d is None:
            return
        # == not `is`: a bound method (``self._handler``) is a new object at each access
        d.handlers = [(h, n) for h, n in d.handlers if handler is not None and h != handler]
        if not d.handlers:
            if irq < 24:
                self.hv.irqchip.program(irq, d.vector, dest=0, masked=True, level=True)
            for dev in self.pci_devices:
                dev.irq_shutdown(irq)
            if irq >= 24 and self.msi_domain.owns(d):
                self.msi_domain.irq_shutdown(d)

    def do_irq(self, cpu: int, vector: int) -> None:
        """Interrupt entry (runs in interrupt context)."""
        sysvec = self._system_vectors.get(vector)
        if sysvec is not None:
            try:
                sysvec(cpu)
            except Exception:
                log.exception("system vector %#x failed", vector)
            return
        irq = self._vector_to_irq.get(vector)
        d = self.irqs.get(irq) if irq is not None else None
        if d is None:
            self.spurious += 1
            return
        self.handle_irq(d, cpu)

    def proc_interrupts(self) -> list[dict]:
        return [{"irq": d.irq, "vector": d.vector, "counts": list(d.counts), "name": d.name,
                 "unhandled": d.unhandled} for d in sorted(self.irqs.values(), key=lambda d: d.irq)]

    # -- PCI core ---------------------------------------------------------------------------------------
    def pci_conf_read(self, devfn: int, off: int, size: int, bus: int = 0) -> int:
        if off >= 0x100:  # extended config space: ECAM (raw_pci_ext_ops)
            a = R.PCIE_MMCFG_BASE | bus << 20 | devfn << 12 | off
            return self.readl(a) if size == 4 else self.readw(a) if size == 2 else self.readb(a)
        with self._pci_mu:
            self.outl(0xCF8, 0x80000000 | bus << 16 | devfn << 8 | (off & 0xFC))
            if size == 4:
                return self.inl(0xCFC)
            if size == 2:
                return self.inw(0xCFC + (off & 2))
            return self.inb(0xCFC + (off & 3))

    def pci_conf_write(self, devfn: int, off: int, value: int, size: int, bus: int = 0) -> None:
        if off >= 0x100:
            a = R.PCIE_MMCFG_BASE | bus << 20 | devfn << 12 | off
            if size == 4:
                self.writel(a, value)
            elif size == 2:
                self.writew(a, value)
            else:
                self.writeb(a, value)
            return
        with self._pci_mu:
            self.outl(0xCF8, 0x80000000 | bus << 16 | devfn << 8 | (off & 0xFC))
            if size == 4:
                self.this_cpu().pio_write(0xCFC, value, 4)
            elif size == 2:
                self.outw(0xCFC + (off & 2), value)
            else:
                self.outb(0xCFC + (off & 3), value)

    def pci_enumerate(self) -> list["GuestPciDev"]:
        """Scan the buses (bus 0, then behind every bridge, depth first; functions 1..7 of a
        multi-function device), size and assign BARs (what the firmware does), enable decoding.
        Bridges keep the bus numbers the firmware gave them."""
        self._win = [MMIO32_BASE, MMIO64_BASE, IO_BASE]
        devs: list[GuestPciDev] = []
        self._scan_bus(0, devs, None)
        self.pci_devices = devs
        return devs

    def _scan_bus(self, bus: int, devs: list["GuestPciDev"], parent: "GuestPciDev | None") -> None:
        for slot in range(32):
            hdr = 0
            for fn in range(8):
                devfn = slot << 3 | fn
                if fn and not hdr & 0x80:
                    break
                vid = self.pci_conf_read(devfn, R.PCI_VENDOR_ID, 2, bus)
                if vid == 0xFFFF:
                    if fn == 0:
                        break
                    continue
                h = self.pci_conf_read(devfn, R.PCI_HEADER_TYPE, 1, bus)
                if fn == 0:
                    hdr = h
                d = GuestPciDev(self, devfn, bus=bus, parent=parent)
                self._assign_bars(d, 2 if h & 0x7F == R.PCI_HEADER_TYPE_BRIDGE else 6)
                d.save_config()
                cmd = d.read_config(R.PCI_COMMAND, 2)
                d.write_config(R.PCI_COMMAND, cmd | R.PCI_COMMAND_MEMORY | R.PCI_COMMAND_IO, 2)
                devs.append(d)
                if h & 0x7F == R.PCI_HEADER_TYPE_BRIDGE:
                    sec = d.read_config(R.PCI_SECONDARY_BUS, 1)
                    d.is_bridge = True
                    if sec and sec != bus:
                        d.secondary = sec
                        self._scan_bus(sec, devs, d)

    def _assign_bars(self, d: "GuestPciDev", nbars: int) -> None:
        mmio32, mmio64, io = self._win
        bar = 0
        while bar < nbars:
            off = R.PCI_BASE_ADDRESS_0 + 4 * bar
            orig = d.read_config(off, 4)
            d.write_config(off, 0xFFFFFFFF, 4)
            probe = d.read_config(off, 4)
            d.write_config(off, orig, 4)
            if probe == 0:  # not implemented
                bar += 1
                continue
            if orig & R.PCI_BASE_ADDRESS_SPACE_IO:
                size = (~(probe & ~0x3) & 0xFFFF) + 1
                addr = (io + size - 1) // size * size
                io = addr + size
                d.write_config(off, addr, 4)
                d.bars[bar] = (addr, size, True)
                bar += 1
                continue
            is64 = bool(orig & R.PCI_BASE_ADDRESS_MEM_TYPE_64)
            mask = probe & ~0xF
            if is64:
                hi_off = off + 4
                horig = d.read_config(hi_off, 4)
                d.write_config(hi_off, 0xFFFFFFFF, 4)
                hprobe = d.read_config(hi_off, 4)
                d.write_config(hi_off, horig, 4)
                mask |= hprobe << 32
                size = (~mask & 0xFFFFFFFFFFFFFFFF) + 1
                addr = (mmio64 + size - 1) // size * size
                mmio64 = addr + size
                d.write_config(off, addr & 0xFFFFFFFF | (orig & 0xF), 4)
                d.write_config(hi_off, addr >> 32, 4)
                d.bars[bar] = (addr, size, False)
                bar += 2
                continue
            size = (~mask & 0xFFFFFFFF) + 1
            addr = (mmio32 + size - 1) // size * size
            if addr + size > MMIO32_END:
                raise RuntimeError("32-bit MMIO window exhausted")
            mmio32 = addr + size
            d.write_config(off, addr | (orig & 0xF), 4)
            d.bars[bar] = (addr, size, False)
            bar += 1
        self._win = [mmio32, mmio64, io]


class GuestPciDev:
    """The guest's struct pci_dev: config accessors, BARs, MSI-X / MSI / INTx vectors, FLR."""

    def __init__(self, kernel: GuestKernel, devfn: int, *, bus: int = 0,
                 parent: "GuestPciDev | None" = None) -> None:
        self.k = kernel
        self.devfn = devfn
        self.bus = bus
        self.parent = parent
        """The bridge above (None on bus 0)."""
        self.is_bridge = False
        self.secondary = 0
        #: the driver bound to this function, for error recovery (``kickcall.guest.aer``)
        self.err_handlers: "PciErrorHandlers | None" = None
        self.bars: dict[int, tuple[int, int, bool]] = {}
        self.vendor = self.read_config(R.PCI_VENDOR_ID, 2)
        self.device = self.read_config(R.PCI_DEVICE_ID, 2)
        self.irq_line = self.read_config(R.PCI_INTERRUPT_LINE, 1)
        self.irq_mode = 0
        self.vectors: list[IrqDesc] = []
        self.msix_cap = self.find_capability(R.PCI_CAP_ID_MSIX)
        self.msi_cap = self.find_capability(R.PCI_CAP_ID_MSI)
        self.exp_cap = self.find_capability(R.PCI_CAP_ID_EXP)
        self._saved: bytes = b""
        self._msix_table = 0
        self._msix_pba = 0
        #: MSI-X entries brought up one at a time after a masked enable (``msix_enable_masked``):
        #: entry -> the irq behind it (several entries may share one irq)
        self.late_vectors: dict[int, IrqDesc] = {}
        #: modes ``alloc_irq_vectors`` gave up on (MSI-X -> MSI -> INTx)
        self.fallbacks = 0

    def __repr__(self) -> str:
        return f"<pci {self.bus:02x}:{self.devfn >> 3:02x}.{self.devfn & 7} {self.vendor:04x}:{self.device:04x}>"

    @property
    def requester_id(self) -> int:
        return self.bus << 8 | self.devfn

    # config
    def read_config(self, off: int, size: int) -> int:
        return self.k.pci_conf_read(self.devfn, off, size, self.bus)

    def write_config(self, off: int, v: int, size: int) -> None:
        self.k.pci_conf_write(self.devfn, off, v, size, self.bus)

    def find_capability(self, cap_id: int, start: int = 0) -> int:
        off = self.read_config(R.PCI_CAPABILITY_LIST, 1) if not start else self.read_config(start + 1, 1)
        n = 0
        while off and n < 48:
            if self.read_config(off, 1) == cap_id:
                return off
            off = self.read_config(off + 1, 1)
            n += 1
        return 0

    def capabilities(self, cap_id: int) -> list[int]:
        out = []
        off = self.read_config(R.PCI_CAPABILITY_LIST, 1)
        n = 0
        while off and n < 48:
            if self.read_config(off, 1) == cap_id:
                out.append(off)
            off = self.read_config(off + 1, 1)
            n += 1
        return out

    def find_ext_capability(self, cap_id: int) -> int:
        """``pci_find_ext_capability``: the offset of extended capability *cap_id*, walking the
        list from 0x100 (through ECAM); 0 when absent, on a conventional function (no PCIe
        capability) or when the list reads all-F's / loops."""
        if not self.exp_cap:
            return 0
        off, seen = 0x100, 0
        while off and seen < (4096 - 0x100) // 8:
            hdr = self.read_config(off, 4)
            if hdr in (0, 0xFFFFFFFF):
                return 0
            if hdr & 0xFFFF == cap_id:
                return off
            off = (hdr >> 20) & 0xFFC
            if off < 0x100:
                return 0
            seen += 1
        return 0

    @property
    def pcie_type(self) -> int | None:
        """``pci_pcie_type``: the PCI Express capability's device/port type (None: not PCIe)."""
        if not self.exp_cap:
            return None
        return (self.read_config(self.exp_cap + R.PCI_EXP_FLAGS, 2) & R.PCI_EXP_FLAGS_TYPE) >> 4

    def bar_addr(self, bar: int) -> int:
        return self.bars[bar][0]

    def set_master(self, on: bool = True) -> None:
        cmd = self.read_config(R.PCI_COMMAND, 2)
        cmd = cmd | R.PCI_COMMAND_MASTER if on else cmd & ~R.PCI_COMMAND_MASTER
        self.write_config(R.PCI_COMMAND, cmd, 2)

    def save_config(self) -> None:
        self._saved = b"".join(self.read_config(o, 4).to_bytes(4, "little") for o in range(0, 0x40, 4))

    def restore_config(self) -> None:
        """pci_restore_state: BARs first, then the command register."""
        s = self._saved
        for o in range(R.PCI_BASE_ADDRESS_0, R.PCI_BASE_ADDRESS_0 + 24, 4):
            self.write_config(o, int.from_bytes(s[o:o + 4], "little"), 4)
        self.write_config(R.PCI_INTERRUPT_LINE, s[R.PCI_INTERRUPT_LINE], 1)
        self.write_config(R.PCI_COMMAND, int.from_bytes(s[4:6], "little"), 2)

    def restore_msi_state(self) -> None:
        """The MSI part of ``pci_restore_state`` (``pci_restore_msi_state``) after the function
        was reset behind the driver's back (a secondary bus reset): the irqs stay the kernel's,
        the device lost its registers.  MSI-X: Enable with Function Mask, every entry the driver
        had (``vectors`` and the late ones) rewritten with its message while masked, an entry
        whose irq has a handler unmasked, Function Mask cleared.  MSI: the message, MME, the mask
        bits (a vector with a handler unmasked), then Enable.  INTx off in both."""
        if self.irq_mode == PCI_IRQ_MSIX and self.msix_cap:
            cap = self.msix_cap
            ctl = self.read_config(cap + R.PCI_MSIX_FLAGS, 2)
            self.write_config(cap + R.PCI_MSIX_FLAGS, ctl | R.PCI_MSIX_FLAGS_ENABLE | R.PCI_MSIX_FLAGS_MASKALL, 2)
            entries = {i: d for i, d in enumerate(self.vectors)}
            entries.update(self.late_vectors)
            for i, d in sorted(entries.items()):
                self.write_msix_msg(i, *self.k.msi_domain.compose(d))
                if d.handlers:
                    self.msix_mask(i, False)
            ctl = self.read_config(cap + R.PCI_MSIX_FLAGS, 2)
            self.write_config(cap + R.PCI_MSIX_FLAGS, ctl & ~R.PCI_MSIX_FLAGS_MASKALL, 2)
        elif self.irq_mode == PCI_IRQ_MSI and self.msi_cap and self.vectors:
            cap = self.msi_cap
            ctl, _is64, maskbit = self._msi_regs()
            self.write_msi_msg(*self.k.msi_domain.compose(self.vectors[0]))
            if maskbit:
                bits = (1 << (1 << ((ctl & PCI_MSI_FLAGS_QMASK) >> 1))) - 1
                for i, d in enumerate(self.vectors):
                    if d.handlers:
                        bits &= ~(1 << i)
                self.write_config(self._msi_mask_off(), bits, 4)
            n = len(self.vectors)
            ctl = ctl & ~(PCI_MSI_FLAGS_QSIZE | PCI_MSI_FLAGS_ENABLE) | ((n.bit_length() - 1) << 4)
            self.write_config(cap + PCI_MSI_FLAGS, ctl, 2)
            self.write_config(cap + PCI_MSI_FLAGS, ctl | PCI_MSI_FLAGS_ENABLE, 2)
        else:
            return
        self.write_config(R.PCI_COMMAND, self.read_config(R.PCI_COMMAND, 2) | R.PCI_COMMAND_INTX_DISABLE, 2)

    def flr(self) -> None:
        """pcie_flr: initiate Function Level Reset and restore config space afterwards."""
        if not self.exp_cap or not self.read_config(self.exp_cap + R.PCI_EXP_DEVCAP, 4) & R.PCI_EXP_DEVCAP_FLR:
            raise RuntimeError(f"{self!r}: no FLR capability")
        cmd = self.read_config(R.PCI_COMMAND, 2)
        self._saved = self._saved[:4] + cmd.to_bytes(2, "little") + self._saved[6:]
        ctl = self.read_config(self.exp_cap + R.PCI_EXP_DEVCTL, 2)
        self.write_config(self.exp_cap + R.PCI_EXP_DEVCTL, ctl | R.PCI_EXP_DEVCTL_BCR_FLR, 2)
        # the device is back at reset state: vectors and the MSI-X setup are gone
        for d in self.vectors:
            for h, _n in list(d.handlers):
                self.k.free_irq(d.irq, h)
        if self.irq_mode in (PCI_IRQ_MSIX, PCI_IRQ_MSI):
            self.k.msi_domain.teardown(self, self.vectors)
        self.vectors = []
        self.irq_mode = 0
        self.restore_config()

    def release_vectors(self) -> None:
        """Forget the vectors without touching the device (after a platform reset): the MSI
        domain frees MSI/MSI-X irqs, an INTx irq is released."""
        if self.irq_mode in (PCI_IRQ_MSIX, PCI_IRQ_MSI):
            self.k.msi_domain.teardown(self, self.vectors)
        else:
            for d in self.vectors:
                self.k.release_irq(d.irq)
        self.vectors = []
        self.irq_mode = 0

    # -- vectors ------------------------------------------------------------------------------------
    def alloc_irq_vectors(self, min_vecs: int, max_vecs: int, flags: int) -> int:
        """pci_alloc_irq_vectors: MSI-X if allowed and available, else MSI (a power of two
        vectors, at most what the capability can do), else INTx.

        As Linux's ``__pci_enable_msix_range`` / ``__pci_enable_msi_range``: when the MSI domain
        answers "only *n*" the mode is retried with *n* vectors (if still >= *min_vecs*); when it
        fails (``MsiSetupError``, e.g. Xen out of pirqs) the next mode is tried.  Each mode given
        up counts in ``fallbacks``."""
        if flags & PCI_IRQ_MSIX and self.msix_cap:
            ctl = self.read_config(self.msix_cap + R.PCI_MSIX_FLAGS, 2)
            table_size = (ctl & R.PCI_MSIX_FLAGS_QSIZE) + 1
            if table_size >= min_vecs:
                n = min(max_vecs, table_size)
                while True:
                    rc = self._enable_msix(n)
                    if rc == 0:
                        return n
                    if rc < 0 or rc < max(1, min_vecs):
                        break
                    n = rc
                self.fallbacks += 1
        if flags & PCI_IRQ_MSI and self.msi_cap:
            ctl = self.read_config(self.msi_cap + PCI_MSI_FLAGS, 2)
            n = min(max_vecs, 1 << ((ctl & PCI_MSI_FLAGS_QMASK) >> 1))
            n = 1 << (n.bit_length() - 1) if n > 0 else 0  # rounded down to a power of two
            while n >= max(1, min_vecs):
                rc = self._enable_msi(n)
                if rc == 0:
                    return n
                if rc < 0:
                    break
                n = 1 << (rc.bit_length() - 1)
            if n:
                self.fallbacks += 1
        if flags & PCI_IRQ_INTX and self.irq_line and min_vecs <= 1:
            self.vectors = [self.k.gsi_irq(self.irq_line)]
            self.irq_mode = PCI_IRQ_INTX
            self.write_config(R.PCI_COMMAND, self.read_config(R.PCI_COMMAND, 2) & ~R.PCI_COMMAND_INTX_DISABLE, 2)
            return 1
        raise RuntimeError(f"{self!r}: cannot allocate {min_vecs} interrupt vectors")

    def _enable_msix(self, n: int) -> int:
        """``msix_capability_init``: 0, or what the MSI domain said (< 0 failed: MSI-X left
        disabled and every vector set up so far torn down)."""
        cap = self.msix_cap
        tbl = self.read_config(cap + R.PCI_MSIX_TABLE, 4)
        pba = self.read_config(cap + R.PCI_MSIX_PBA, 4)
        self._msix_table = self.bar_addr(tbl & 7) + (tbl & ~7)
        self._msix_pba = self.bar_addr(pba & 7) + (pba & ~7)
        ctl = self.read_config(cap + R.PCI_MSIX_FLAGS, 2)
        self.write_config(cap + R.PCI_MSIX_FLAGS, ctl | R.PCI_MSIX_FLAGS_ENABLE | R.PCI_MSIX_FLAGS_MASKALL, 2)
        self.vectors = []
        try:
            for i in range(n):
                self.vectors.append(self.k.msi_domain.setup_msix_entry(self, i, f"msix{i}"))
        except MsiSetupError as e:
            self.k.printk(f"{self!r}: MSI-X setup failed: {e}")
            ctl = self.read_config(cap + R.PCI_MSIX_FLAGS, 2)
            self.write_config(cap + R.PCI_MSIX_FLAGS, ctl & ~(R.PCI_MSIX_FLAGS_ENABLE | R.PCI_MSIX_FLAGS_MASKALL), 2)
            self.k.msi_domain.teardown(self, self.vectors)
            self.vectors = []
            return e.rc
        ctl = self.read_config(cap + R.PCI_MSIX_FLAGS, 2)
        self.write_config(cap + R.PCI_MSIX_FLAGS, ctl & ~R.PCI_MSIX_FLAGS_MASKALL, 2)
        self.irq_mode = PCI_IRQ_MSIX
        # INTx off while MSI-X is on
        self.write_config(R.PCI_COMMAND, self.read_config(R.PCI_COMMAND, 2) | R.PCI_COMMAND_INTX_DISABLE, 2)
        return 0

    # -- MSI --------------------------------------------------------------------------------------------
    def _msi_regs(self) -> tuple[int, bool, bool]:
        """(Message Control, 64-bit, per-vector masking) of the MSI capability."""
        ctl = self.read_config(self.msi_cap + PCI_MSI_FLAGS, 2)
        return ctl, bool(ctl & PCI_MSI_FLAGS_64BIT), bool(ctl & PCI_MSI_FLAGS_MASKBIT)

    def _msi_mask_off(self) -> int:
        _ctl, is64, maskbit = self._msi_regs()
        return (self.msi_cap + (PCI_MSI_MASK_64 if is64 else PCI_MSI_MASK_32)) if maskbit else 0

    def _enable_msi(self, n: int) -> int:
        """``msi_capability_init``: every vector masked, the message written by the MSI domain
        (natively: address of the block's CPU, data = the block's first CPU vector), MME =
        log2(n), INTx off, then Enable.  0, or what the MSI domain said (> 0: only that many;
        < 0: failed, MSI left disabled)."""
        cap = self.msi_cap
        ctl, is64, maskbit = self._msi_regs()
        if maskbit:  # "All MSIs are unmasked by default; mask them all" (msi_multi_mask)
            self.write_config(self._msi_mask_off(), (1 << (1 << ((ctl & PCI_MSI_FLAGS_QMASK) >> 1))) - 1, 4)
        try:
            got = self.k.msi_domain.setup_msi(self, n, "msi")
        except MsiSetupError as e:
            self.k.printk(f"{self!r}: MSI setup failed: {e}")
            return e.rc
        if isinstance(got, int):
            return got
        descs = got
        ctl = ctl & ~PCI_MSI_FLAGS_QSIZE | ((n.bit_length() - 1) << 4)
        self.write_config(cap + PCI_MSI_FLAGS, ctl, 2)
        self.vectors = descs
        self.late_vectors = {}
        self.irq_mode = PCI_IRQ_MSI
        self.write_config(R.PCI_COMMAND, self.read_config(R.PCI_COMMAND, 2) | R.PCI_COMMAND_INTX_DISABLE, 2)
        self.write_config(cap + PCI_MSI_FLAGS, ctl | PCI_MSI_FLAGS_ENABLE, 2)
        return 0

    def write_msi_msg(self, address: int, data: int) -> None:
        """``pci_write_msi_msg`` for the MSI capability (address, and data's low 16 bits)."""
        cap = self.msi_cap
        _ctl, is64, _maskbit = self._msi_regs()
        self.write_config(cap + PCI_MSI_ADDRESS_LO, address & 0xFFFFFFFF, 4)
        if is64:
            self.write_config(cap + PCI_MSI_ADDRESS_HI, address >> 32, 4)
        self.write_config(cap + (PCI_MSI_DATA_64 if is64 else PCI_MSI_DATA_32), data & 0xFFFF, 2)

    def read_msi_msg(self) -> tuple[int, int]:
        """``__pci_read_msi_msg`` for the MSI capability: (address, data) as the device holds them."""
        cap = self.msi_cap
        _ctl, is64, _maskbit = self._msi_regs()
        addr = self.read_config(cap + PCI_MSI_ADDRESS_LO, 4)
        if is64:
            addr |= self.read_config(cap + PCI_MSI_ADDRESS_HI, 4) << 32
        return addr, self.read_config(cap + (PCI_MSI_DATA_64 if is64 else PCI_MSI_DATA_32), 2)

    def msi_mask(self, nr: int, masked: bool) -> None:
        """Set or clear MSI vector *nr*'s mask bit (``pci_msi_mask``/``pci_msi_unmask``); a no-op
        on a capability without per-vector masking, as on Linux."""
        off = self._msi_mask_off()
        if not off:
            return
        bits = self.read_config(off, 4)
        bits = bits | (1 << nr) if masked else bits & ~(1 << nr)
        self.write_config(off, bits, 4)

    def read_msi_pending(self) -> int:
        """The MSI capability's Pending Bits (0 without per-vector masking)."""
        off = self._msi_mask_off()
        return self.read_config(off + 4, 4) if off else 0

    def _disable_msi(self) -> None:
        """``pci_msi_shutdown``: Enable cleared, INTx back on, every vector masked."""
        cap = self.msi_cap
        ctl, _is64, _maskbit = self._msi_regs()
        self.write_config(cap + PCI_MSI_FLAGS, ctl & ~PCI_MSI_FLAGS_ENABLE, 2)
        self.write_config(R.PCI_COMMAND, self.read_config(R.PCI_COMMAND, 2) & ~R.PCI_COMMAND_INTX_DISABLE, 2)
        off = self._msi_mask_off()
        if off:
            self.write_config(off, (1 << (1 << ((ctl & PCI_MSI_FLAGS_QMASK) >> 1))) - 1, 4)

    def free_irq_vectors(self) -> None:
        """pci_free_irq_vectors: MSI / MSI-X disabled, then the MSI domain frees the irqs."""
        if self.irq_mode == PCI_IRQ_MSI:
            self._disable_msi()
            self.k.msi_domain.teardown(self, self.vectors)
        if self.irq_mode == PCI_IRQ_MSIX:
            cap = self.msix_cap
            ctl = self.read_config(cap + R.PCI_MSIX_FLAGS, 2)
            self.write_config(cap + R.PCI_MSIX_FLAGS, ctl & ~R.PCI_MSIX_FLAGS_ENABLE, 2)
            late = [d for d in {x.irq: x for x in self.late_vectors.values()}.values()
                    if all(d.irq != v.irq for v in self.vectors)]
            self.k.msi_domain.teardown(self, self.vectors + late)
        self.vectors = []
        self.late_vectors = {}
        self.irq_mode = 0

    def irq_vector(self, nr: int) -> int:
        """pci_irq_vector: the Linux irq number of vector *nr*."""
        return self.vectors[nr].irq

    def entry_for_irq(self, irq: int) -> int | None:
        """The MSI-X entry, or MSI vector, behind *irq* (None: not one of ours)."""
        if self.irq_mode not in (PCI_IRQ_MSIX, PCI_IRQ_MSI):
            return None
        for i, d in enumerate(self.vectors):
            if d.irq == irq:
                return i
        for i, d in self.late_vectors.items():
            if d.irq == irq:
                return i
        return None

    def msix_enable_masked(self) -> int:
        """Enable MSI-X with every entry masked and no vector set up, as Linux does before a
        driver requests its first interrupt (``msix_capability_init``: Function Mask set, entries
        masked, Enable, Function Mask cleared).  Vectors then come one at a time
        (``msix_setup_vector``).  Returns the table size."""
        cap = self.msix_cap
        if not cap:
            raise RuntimeError(f"{self!r}: no MSI-X capability")
        tbl = self.read_config(cap + R.PCI_MSIX_TABLE, 4)
        pba = self.read_config(cap + R.PCI_MSIX_PBA, 4)
        self._msix_table = self.bar_addr(tbl & 7) + (tbl & ~7)
        self._msix_pba = self.bar_addr(pba & 7) + (pba & ~7)
        ctl = self.read_config(cap + R.PCI_MSIX_FLAGS, 2)
        n = (ctl & R.PCI_MSIX_FLAGS_QSIZE) + 1
        self.write_config(cap + R.PCI_MSIX_FLAGS, ctl | R.PCI_MSIX_FLAGS_ENABLE | R.PCI_MSIX_FLAGS_MASKALL, 2)
        for i in range(n):
            self.k.writel(self._msix_table + 16 * i + R.PCI_MSIX_ENTRY_VECTOR_CTRL, R.PCI_MSIX_ENTRY_CTRL_MASKBIT)
        ctl = self.read_config(cap + R.PCI_MSIX_FLAGS, 2)
        self.write_config(cap + R.PCI_MSIX_FLAGS, ctl & ~R.PCI_MSIX_FLAGS_MASKALL, 2)
        self.irq_mode = PCI_IRQ_MSIX
        self.vectors = []
        self.late_vectors = {}
        self.write_config(R.PCI_COMMAND, self.read_config(R.PCI_COMMAND, 2) | R.PCI_COMMAND_INTX_DISABLE, 2)
        return n

    def msix_setup_vector(self, entry: int, desc: IrqDesc | None = None, name: str = "") -> IrqDesc:
        """Bring MSI-X entry *entry* up after a masked enable (``pci_msix_alloc_irq_at``): a new irq
        (or *desc*, shared), the entry's address and data written while it is masked.  The entry
        is unmasked when the irq's first handler is requested (``irq_startup``), or by
        ``msix_mask(entry, False)`` for a shared irq."""
        d = self.k.msi_domain.setup_msix_entry(self, entry, name or f"msix{entry}", desc)
        self.late_vectors[entry] = d
        return d

    def write_msix_msg(self, entry: int, address: int, data: int) -> None:
        """Mask MSI-X entry *entry*, then write its message (``pci_write_msi_msg``)."""
        e = self._msix_table + 16 * entry
        self.k.writel(e + R.PCI_MSIX_ENTRY_VECTOR_CTRL, R.PCI_MSIX_ENTRY_CTRL_MASKBIT)
        self.k.writel(e + R.PCI_MSIX_ENTRY_LOWER_ADDR, address & 0xFFFFFFFF)
        self.k.writel(e + R.PCI_MSIX_ENTRY_UPPER_ADDR, address >> 32)
        self.k.writel(e + R.PCI_MSIX_ENTRY_DATA, data)

    def read_msix_msg(self, entry: int) -> tuple[int, int]:
        """``__pci_read_msi_msg`` for MSI-X entry *entry*: (address, data) as the table holds them."""
        e = self._msix_table + 16 * entry
        lo = self.k.readl(e + R.PCI_MSIX_ENTRY_LOWER_ADDR)
        hi = self.k.readl(e + R.PCI_MSIX_ENTRY_UPPER_ADDR)
        return hi << 32 | lo, self.k.readl(e + R.PCI_MSIX_ENTRY_DATA)

    def msix_release_vector(self, entry: int) -> None:
        """Mask a late entry and forget it (``pci_msix_free_irq``); its irq is released unless
        another entry shares it."""
        d = self.late_vectors.pop(entry, None)
        if d is None:
            return
        self.msix_mask(entry, True)
        if all(x.irq != d.irq for x in self.late_vectors.values()):
            self.k.msi_domain.teardown(self, [d])

    def irq_startup(self, irq: int) -> None:
        """The IRQ core started *irq* (its first handler was requested): unmask the MSI-X entry
        behind it, if it is one of ours (Linux: ``irq_startup`` -> ``pci_msi_unmask_irq``)."""
        i = self.entry_for_irq(irq)
        if i is not None:
            self.vector_mask(i, False)

    def irq_shutdown(self, irq: int) -> None:
        """The IRQ core shut *irq* down (its last handler was freed): mask the MSI-X entry behind
        it, if it is one of ours (Linux: ``irq_shutdown`` -> ``pci_msi_mask_irq``)."""
        i = self.entry_for_irq(irq)
        if i is not None:
            self.vector_mask(i, True)

    def vector_mask(self, nr: int, masked: bool) -> None:
        """Mask or unmask vector *nr* in the mode in use (``pci_msi_mask_irq``): an MSI-X entry's
        Vector Control, or an MSI mask bit."""
        if self.irq_mode == PCI_IRQ_MSI:
            self.msi_mask(nr, masked)
        else:
            self.msix_mask(nr, masked)

    def msix_mask(self, entry: int, masked: bool) -> None:
        """Set or clear an entry's Vector Control mask bit (an MMIO write to the table)."""
        self.k.writel(self._msix_table + 16 * entry + R.PCI_MSIX_ENTRY_VECTOR_CTRL,
                      R.PCI_MSIX_ENTRY_CTRL_MASKBIT if masked else 0)

    def msix_function_mask(self, masked: bool) -> None:
        cap = self.msix_cap
        ctl = self.read_config(cap + R.PCI_MSIX_FLAGS, 2)
        ctl = ctl | R.PCI_MSIX_FLAGS_MASKALL if masked else ctl & ~R.PCI_MSIX_FLAGS_MASKALL
        self.write_config(cap + R.PCI_MSIX_FLAGS, ctl, 2)

    def read_pba(self) -> int:
        n = max(len(self.vectors), max(self.late_vectors, default=-1) + 1, 1)
        v = 0
        for q in range((n + 63) // 64):
            lo = self.k.readl(self._msix_pba + 8 * q)
            hi = self.k.readl(self._msix_pba + 8 * q + 4)
            v |= (lo | hi << 32) << (64 * q)
        return v

