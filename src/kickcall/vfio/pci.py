"""The passthrough device in the VMM: a PCI function whose device is behind a vfio-user server
(QEMU's ``hw/vfio/pci.c`` semantics, in kickcall's own code).

``VFIOPCIDevice`` realizes over a ``VfioUserClient``: DEVICE_GET_INFO, the region infos (CONFIG
and the BARs; the sparse mmap areas a server offers are mapped and the guest's accesses there are
served from the mapping), GET_IRQ_INFO for INTx, MSI and MSI-X, and the config space read from the
server's CONFIG region.

What the VMM emulates and what it forwards (as QEMU does):

* config space: reads and writes go to the server, except the BAR and ROM registers, the
  interrupt line, and the MSI-X and MSI capabilities, which the VMM emulates (the guest's view
  lives in ``PCIDevice.config``; the host's MSI-X is driven by SET_IRQS, never by config writes);
* BARs: every access is trapped and forwarded with REGION_READ / REGION_WRITE, except the MSI-X
  table and PBA, which ``kickcall.pci.msix.MSIX`` emulates, and the sparse mmap areas;
* DMA: the guest's RAM is mapped to the server with DMA_MAP and the memfd (``dma = "fd"``), or
  without an fd (``dma = "message"``), in which case the server reaches it with DMA_READ /
  DMA_WRITE messages that the client serves from guest memory (``GuestRamDma``).

MSI-X, QEMU 8.2's design:

* the guest's MSI-X enable with every vector masked enables host MSI-X with no vector wired:
  SET_IRQS(MSIX, start=0, count=1, DATA_EVENTFD|ACTION_TRIGGER) with no fd (QEMU's fd -1;
  over vfio-user, "no fd" de-assigns);
* a vector's first unmask (``vfio_msix_vector_do_use``) on the dynamic path sends exactly
  SET_IRQS(start=v, count=1, EVENTFD|TRIGGER) with the vector's irqfd-bound eventfd (an
  ``EventNotifier`` bound by the hypervisor as an irqfd on the vector's MSI route); no other
  vector is touched;
* when the host reports NORESIZE on the MSI-X index (or ``x_msix_noresize`` forces the old
  behaviour), a vector v >= nr_vectors is added the old way: the index is disabled
  (DATA_NONE|TRIGGER, count 0) and re-enabled with v+1 vectors in one SET_IRQS.  vfio-user cannot
  carry -1 holes inside an fd array (a message's fds are all valid), so every vector 0..v gets an
  eventfd: the irqfd eventfd for an unmasked vector, the VMM's own "interrupt" eventfd for a masked
  or unused one.  One message carries at most the server's ``max_msg_fds`` fds (253 at most):
  past that the old path stops with a clear error (``NORESIZE_LIMIT``), its documented limit;
* vfio cannot mask a vector in the host (vfio-pci has no MSI-X MASK action), so on the guest's
  mask the vector's trigger is switched to the VMM's interrupt eventfd
  (``vfio_msix_vector_release``), which the main loop reads and turns into ``msix_notify`` (the
  PBA bit); on unmask the trigger goes back to the irqfd eventfd and a signal left in the
  interrupt eventfd becomes a pending bit first, so the MSI-X core delivers exactly one interrupt
  for it;
* every SET_IRQS is counted by kind (``SetIrqsKind``).

Host exhaustion (SET_IRQS answered ENOSPC, or any refusal, when a vector is being wired) is never
a silent loss and never a hang: the device records why (``fatal``: vector, errno, path) and calls
``on_fatal(event)``, which the machine turns into a VM stop and a QMP event.  The callback runs
inside a vCPU's heavyweight exit with the big lock held: it must hand the stop to another thread.

INTx: SET_IRQS(INTX, EVENTFD|TRIGGER) with an eventfd the main loop reads; it asserts the guest's
INTx line.  vfio-pci automasks the line; as QEMU does, the guest's next BAR access while INTx is
asserted is the end of interrupt: the line is deasserted and the host unmasked by writing the
unmask eventfd registered with SET_IRQS(INTX, EVENTFD|UNMASK) (vfio's virqfd; the role KVM's
resamplefd plays in QEMU), or with SET_IRQS(INTX, DATA_NONE|UNMASK) when the host refuses one.

MSI (``vfio_msi_enable`` / ``vfio_msi_disable`` / ``vfio_update_msi``): the VMM emulates the MSI
capability (the guest's Enable, MME, address, data, mask bits; the pending bits are the VMM's).
On the guest's Enable, INTx (or MSI-X) goes off and one SET_IRQS(MSI, start 0, count 2**MME,
DATA_EVENTFD|ACTION_TRIGGER) carries one eventfd per vector: the irqfd-bound one, on an MSI route
(address, data | v), or the VMM's interrupt eventfd for a vector the guest has masked.  Enable
cleared: SET_IRQS(MSI, DATA_NONE|TRIGGER, count 0) and INTx back on.  A change of address or data
while enabled updates the routes; a change of MME while enabled is ignored (as QEMU does: a
guest sets it before Enable).  Per-vector masking cannot be done in the host either, so it is
emulated as for MSI-X (same fix, ``MASK_EMULATION_FIX``): a masked vector's trigger is switched
to the VMM's eventfd, whose signal sets the vector's pending bit; on unmask the trigger goes back
to the irqfd and a pending bit is delivered once.  Host exhaustion on the enable stops the VM as
for MSI-X (``on_fatal``, index ``MSI``).

The Xen flavour (``xen=True``, or a ``VM`` whose ``hypervisor`` is ``"xen"``; QEMU's
``hw/xen/xen_pt_msi.c``): there is no irqfd.  When the guest unmasks an MSI-X entry whose message
carries a pirq (vector 0, the pirq in the destination id: ``pirq_of_msi``) and the entry has no
pirq yet (QEMU's ``entry->pirq`` unassigned), the device model maps it: PHYSDEVOP_map_pirq
(domid, MSI, index -1, the pirq, bus, devfn, entry_nr = the vector, table_base) with a new
eventfd that becomes the vector's host trigger (``HostTrigger.PIRQ``); the domain polls its copy
of that eventfd, so the host's interrupts reach the pirq's event channel without the VMM.  The
returned pirq is the entry's pirq from then on.  Xen answers 0 even when it only warned ("already
mapped": nothing changed, the eventfd was not taken); the device model notices it by the
returned pirq and by asking the domain who owns the pirq, and records a warning on the vector.  A
message without a pirq keeps the userspace path (``msix_notify`` -> ``signal_msi``: the domain
delivers it to the local APIC), logged.  On MSI-X disable, reset and close, every pirq of the
function is unmapped (PHYSDEVOP_unmap_pirq) and forgotten, as QEMU >= 2.1.0 does (commit
c976437c7dba); with ``XEN_UNMAP_ON_DISABLE`` off (QEMU before 2.1.0) disable and reset keep the
mappings and the entries' pirqs, and a re-enable does not map again: the old pirq stays in use even
when the guest wrote another one (close always unmaps).  Masking keeps the emulation above (the
masked vector's trigger goes to the VMM's eventfd, the PBA bit); the pending delivery the MSI-X
core makes on unmask goes to the pirq the vector mapped (``msi_send``: its eventfd is written,
the "physical interrupt" fires again) rather than to ``signal_msi``.  MSI (non-X) under Xen keeps
the userspace path (no pirq is mapped for it: not built yet).

The ROM BAR reads as absent.

Locking: every method runs with the machine's big lock held (a vCPU's exit, a main-loop handler, a
QMP handler that took it), as ``VirtIOPCIProxy``'s do.
"""

from __future__ import annotations

import enum
import errno
import functools
import logging
import mmap
import os
import struct
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Sequence

from .. import trace
from ..faults import FaultRegistry
from ..hv.abi import ChannelClosed, HypervisorError
from ..hv.xen_abi import MapPirqType, PhysdevOp, pirq_of_msi
from ..memory import GuestMemory, GuestMemoryError, IORegion
from ..notify import EventNotifier, NotifierRegistry, Role
from ..pci import regs as R
from ..pci.regs import (
    PCI_MSI_ADDRESS_HI, PCI_MSI_ADDRESS_LO, PCI_MSI_FLAGS, PCI_MSI_FLAGS_64BIT, PCI_MSI_FLAGS_ENABLE,
    PCI_MSI_FLAGS_MASKBIT, PCI_MSI_FLAGS_QMASK, PCI_MSI_FLAGS_QSIZE, PCI_ROM_ADDRESS,
)
from ..pci.aer import PCI_ERR_SIZEOF, PCI_EXT_CAP_ID_ERR, AERCap, AerErrFlag, PCIEAERErr, decode_status
from ..pci.device import PCIDevice
from ..pci.msix import MSIX
from .client import VfioRequestError, VfioUserClient
from .protocol import MAX_MSG_FDS_LIMIT, HotResetOffer, PayloadError, PciAddress
from .uapi import (
    VfioIrqInfo, VfioIrqInfoFlag, VfioIrqSetFlag, VfioPciIrqIndex, VfioPciRegion, VfioRegionInfo,
    VfioRegionInfoFlag,
)

if TYPE_CHECKING:
    from ..hv.vmm import VM, MsiRoutes
    from ..loop import IOThread

__all__ = ["VFIOPCIDevice", "SetIrqsKind", "HostTrigger", "VFIOMSIVector", "GuestRamDma", "DmaMode",
           "VfioDeviceError", "NORESIZE_LIMIT", "MASK_EMULATION_FIX", "MSI_PASSTHROUGH_FIX",
           "XEN_UNMAP_ON_DISABLE", "VfioCardReset"]

log = logging.getLogger("kickcall.vfio.pci")

_t_vector = trace.event("vfio_msix_vector", "the passthrough device rewired an MSI-X vector's host trigger")
_t_fatal = trace.event("vfio_fatal", "the passthrough device could not wire a host interrupt")
_t_card_reset = trace.event("vfio_card_hot_reset", "a guest's bus reset became one host hot reset for a card")
_t_err = trace.event("vfio_err_notifier", "the host signalled a PCIe error (ERR eventfd) and the VMM acted on it")
_t_xen_map = trace.event("vfio_xen_map_pirq", "the passthrough device mapped a pirq for an MSI-X entry (Xen)")
_t_xen_unmap = trace.event("vfio_xen_unmap_pirq", "the passthrough device unmapped an MSI-X entry's pirq (Xen)")

#: The per-device fix (``VFIOPCIDevice.faults``) that switches a masked vector's host trigger to the
#: VMM's eventfd (QEMU's masked-vector emulation; MSI-X entries and MSI mask bits alike).  Off, the
#: trigger stays on the irqfd, so the host's interrupts reach the guest while the guest has the
#: vector masked.
MASK_EMULATION_FIX = "emulate-msix-mask"

#: MSI passthrough (read when a device is realized).  Off: the old behaviour, the MSI capability
#: with a read-only Enable bit, so a guest's MSI enable does not stick and its interrupts come on
#: INTx (or nowhere).
MSI_PASSTHROUGH_FIX = "msi-passthrough"

#: The Xen flavour (per device): on MSI-X disable (and reset) every pirq of the function is unmapped
#: and forgotten, as QEMU >= 2.1.0 does.  Off: QEMU before 2.1.0, the mappings and the entries'
#: pirqs are kept and a re-enabled entry reuses its old pirq whatever the guest wrote.
XEN_UNMAP_ON_DISABLE = "xen-unmap-on-disable"

#: the most vectors the NORESIZE path can enable: one SET_IRQS carries every fd (Linux's SCM_MAX_FD)
NORESIZE_LIMIT = MAX_MSG_FDS_LIMIT

_EVENTFD_TRIGGER = VfioIrqSetFlag.DATA_EVENTFD | VfioIrqSetFlag.ACTION_TRIGGER
_NONE_TRIGGER = VfioIrqSetFlag.DATA_NONE | VfioIrqSetFlag.ACTION_TRIGGER
_NONE_UNMASK = VfioIrqSetFlag.DATA_NONE | VfioIrqSetFlag.ACTION_UNMASK
_EVENTFD_UNMASK = VfioIrqSetFlag.DATA_EVENTFD | VfioIrqSetFlag.ACTION_UNMASK



class DmaMode(enum.StrEnum):
    """How the guest's RAM reaches the server: DMA_MAP with the memfd, or by messages."""

    FD = "fd"
    MESSAGE = "message"


class SetIrqsKind(enum.StrEnum):
    """What a SET_IRQS the device sent was for (counted per kind)."""

    ENABLE_NO_VECTOR = "enable-no-vector"  # MSI-X on, nothing wired (start 0, count 1, no fd)
    VECTOR_ADD = "vector-add"  # dynamic path: a vector wired for the first time (start v, count 1)
    VECTOR_SWITCH_TO_IRQFD = "vector-switch-to-irqfd"  # unmask: the trigger back to the irqfd eventfd
    VECTOR_SWITCH_TO_USERSPACE = "vector-switch-to-userspace"  # mask: the trigger to the VMM's eventfd
    INDEX_DISABLE = "index-disable"  # MSI-X index off (DATA_NONE|TRIGGER, count 0)
    INDEX_ENABLE_ALL = "index-enable-all"  # NORESIZE path: the index re-enabled with v+1 vectors
    INTX_ENABLE = "intx-enable"
    INTX_UNMASK = "intx-unmask"
    INTX_UNMASK_FD = "intx-unmask-eventfd"
    REQ_ENABLE = "req-enable"
    ERR_ENABLE = "err-enable"
    INTX_DISABLE = "intx-disable"
    MSI_ENABLE = "msi-enable"  # MSI on: start 0, count 2**MME, one eventfd per vector
    MSI_DISABLE = "msi-disable"  # MSI off (DATA_NONE|TRIGGER, count 0)
    MSI_VECTOR_SWITCH_TO_IRQFD = "msi-vector-switch-to-irqfd"  # MSI mask bit cleared
    MSI_VECTOR_SWITCH_TO_USERSPACE = "msi-vector-switch-to-userspace"  # MSI mask bit set
    VECTOR_SWITCH_TO_PIRQ = "vector-switch-to-pirq"  # Xen: unmask, the trigger back to the pirq's eventfd


class HostTrigger(enum.StrEnum):
    """Which eventfd the host's trigger for a vector points at."""

    NONE = "none"
    IRQFD = "irqfd"  # the irqfd-bound eventfd: the hypervisor injects the MSI
    USERSPACE = "interrupt"  # the VMM's own eventfd, read by the main loop (msix_notify)
    PIRQ = "pirq"  # Xen: the eventfd mapped to the vector's pirq; the domain polls it


class VfioDeviceError(RuntimeError):
    """The passthrough device could not be realized; ``kind`` says which step failed."""

    def __init__(self, kind: str, msg: str) -> None:
        super().__init__(msg)
        self.kind = kind


class _Fatal(Exception):
    """A vector could not be wired in the host: the VM must stop."""

    def __init__(self, err: int, kind: str, msg: str) -> None:
        super().__init__(msg)
        self.errno = err
        self.kind = kind


@dataclass
class VFIOMSIVector:
    """One MSI-X or MSI vector's host side (QEMU's ``VFIOMSIVector``)."""

    nr: int
    index: int = VfioPciIrqIndex.MSIX  # MSIX or MSI
    use: bool = False
    interrupt: EventNotifier | None = None
    """The VMM's own eventfd (``vector->interrupt``): the host's trigger while the vector is masked
    (or has no irqfd); the main loop reads it into ``msix_notify``."""
    kvm_interrupt: EventNotifier | None = None
    """The irqfd-bound eventfd (``vector->kvm_interrupt``), bound to ``gsi``."""
    gsi: int | None = None
    trigger: HostTrigger = HostTrigger.NONE
    userspace_interrupts: int = 0  # signals the main loop read from ``interrupt``
    # -- Xen (QEMU's XenPTMSIXEntry) --
    pirq: int | None = None
    """The pirq the device model mapped for this entry (QEMU's ``entry->pirq``; None: unassigned)."""
    pirq_notifier: EventNotifier | None = None
    """The eventfd handed to the domain with the map: the host's trigger while the vector is unmasked."""
    guest_pirq: int | None = None  # the pirq the guest's message named at its last unmask
    pirq_maps: int = 0
    pirq_unmaps: int = 0
    pirq_refires: int = 0  # pending deliveries written to the pirq's eventfd (msi_send)
    pirq_warnings: list[dict] = field(default_factory=list)


class GuestRamDma:
    """The ``ClientMemory`` a vfio-user server reaches by DMA_READ / DMA_WRITE: guest RAM by
    guest-physical address (IOVA = GPA), refusing anything outside RAM (EFAULT)."""

    def __init__(self, memory: GuestMemory) -> None:
        self.memory = memory
        self.reads = 0
        self.writes = 0

    def read(self, addr: int, n: int) -> bytes:
        try:
            data = self.memory.read(addr, n)
        except GuestMemoryError as e:
            raise PayloadError(errno.EFAULT, f"DMA_READ {addr:#x}+{n}: {e}") from None
        self.reads += 1
        return data

    def write(self, addr: int, data: bytes) -> None:
        try:
            self.memory.write(addr, data)
        except GuestMemoryError as e:
            raise PayloadError(errno.EFAULT, f"DMA_WRITE {addr:#x}+{len(data)}: {e}") from None
        self.writes += 1


def _irq_flags(flags: int) -> list[str]:
    return [f.name for f in VfioIrqInfoFlag if flags & f and f.name]


class VfioCardReset:
    """One host hot reset for a passthrough card whose functions all sit on one virtual bus (the
    machine checks that; ``aer = true``).  Registered as the bus's reset hook: a guest's secondary
    bus reset first puts every function's interrupts off (``vfio_pci_pre_reset``), then sends
    X_KICKCALL_PCI_HOT_RESET once, through one function, with every function's ownership token
    (vfio's proof that the user owns all of them), and marks the functions so that their own reset
    sends no DEVICE_RESET.  A refused hot reset is logged and counted; the functions then reset
    one by one (DEVICE_RESET), which is all the host allows.

    *enabled*: a callable read at each reset (the machine's ``card-hot-reset`` switch); False gives
    the naive VMM, one DEVICE_RESET per function."""

    def __init__(self, devices: Sequence["VFIOPCIDevice"], enabled: Callable[[], bool] = lambda: True) -> None:
        self.devices = list(devices)
        self.enabled = enabled
        self.resets = 0
        self.failures: list[str] = []

    def bus_reset_hook(self, bus: object) -> None:
        live = [d for d in self.devices if not d.closed]
        if not live or not self.enabled():
            return
        tokens = [o.token for d in live if (o := d.hot_reset_offer) is not None]
        for d in live:
            d.pre_reset()
        try:
            live[0].hot_reset(tokens)
        except VfioRequestError as e:
            log.warning("hot reset of the card (%s) refused: %s", ", ".join(d.name for d in live), e)
            self.failures.append(str(e))
            del self.failures[:-8]
            return
        self.resets += 1
        _t_card_reset.emit(functions=",".join(d.name for d in live), resets=self.resets)
        for d in live:
            d.hot_reset_done = True

    def describe(self) -> dict:
        return {"functions": [d.name for d in self.devices], "hot-resets": self.resets,
                "failures": list(self.failures)}


class VFIOPCIDevice(PCIDevice):
    """A vfio-user passthrough PCI function (QEMU's ``vfio-pci`` over a vfio-user socket).

    *socket_path*: the server's socket.  *memory*: guest RAM, DMA-mapped to the server.  *vm*,
    *routes*, *iothread*, *registry*: the machine's hypervisor handle, MSI route allocator, main
    loop and notifier registry (without *vm*/*routes* the vectors use the userspace path only).
    *dma*: ``"fd"`` or ``"message"``.  *x_msix_noresize*: force the old NORESIZE path even when
    the host allows dynamic MSI-X (QEMU before 8.2).  *on_fatal*: called with an event dict when
    a host interrupt cannot be wired (big lock held, inside a vCPU exit: hand the stop to another
    thread)."""

    def __init__(self, name: str, socket_path: str, *, memory: GuestMemory, vm: "VM | None" = None,
                 routes: "MsiRoutes | None" = None, iothread: "IOThread | None" = None,
                 registry: NotifierRegistry | None = None, dma: str = DmaMode.FD, x_msix_noresize: bool = False,
                 on_fatal: Callable[[dict], None] | None = None, twin_socket: bool = True,
                 irqfd: bool = True, on_request: Callable[[dict], None] | None = None,
                 xen: bool | None = None, aer: bool = False, on_aer: Callable[[dict], None] | None = None) -> None:
        self.socket_path = socket_path
        self.aer_forwarding = aer
        """``aer = true``: the host's non-fatal errors are forwarded to the guest (the machine
        checks the topology first); False: every error the host signals stops the VM."""
        self.on_aer = on_aer
        self._err: EventNotifier | None = None
        self.err_signals = 0
        self.aer_events: list[dict] = []
        self.host_aer_offset = 0
        self.hot_reset_done = False
        self.hot_resets = 0
        self.faults = FaultRegistry(name)
        """The device's faults (docs/faults.md): its fixes, and what the machine registers."""
        self.faults.switch(MASK_EMULATION_FIX, "off: a masked vector's host trigger stays on the irqfd (no "
                           "userspace mask emulation), so the host's interrupts reach the guest while the guest has "
                           "the vector masked")
        self.faults.switch(MSI_PASSTHROUGH_FIX, "off: the guest's MSI Enable does not stick (no MSI passthrough: a "
                           "driver falls back to MSI-X or INTx)")
        self.faults.switch(XEN_UNMAP_ON_DISABLE, "off: QEMU before 2.1.0 (Xen flavour): MSI-X disable and reset keep "
                           "every pirq mapped and each entry's pirq, and a re-enabled entry keeps its old pirq even "
                           "when the guest wrote another")
        self.dma_mode = DmaMode(dma)
        self.memory = memory
        self.ram_dma = GuestRamDma(memory)
        self.vm = vm
        self.routes = routes
        self.iothread = iothread
        self.registry = registry if registry is not None else NotifierRegistry()
        self.xen = vm is not None and (vm.hypervisor == "xen" if xen is None else bool(xen))
        """The Xen flavour: MSI-X entries with a pirq message are mapped (PHYSDEVOP_map_pirq), no irqfd."""
        self.irqfd_enabled = irqfd and vm is not None and routes is not None and not self.xen
        self.xen_lapic_unmasks = 0  # Xen: unmasks of an entry whose message carries no pirq (userspace path)
        self.xen_errors: list[dict] = []  # Xen: maps and unmaps the hypervisor refused
        self.x_msix_noresize = x_msix_noresize
        self.on_fatal = on_fatal
        self.on_request = on_request
        self._req: EventNotifier | None = None
        self.req_requests = 0
        self.fatal: dict | None = None
        self.fatal_events: list[dict] = []
        self.errors: list[dict] = []  # non-fatal SET_IRQS refusals (a mask switch the host refused)
        self.set_irqs_counts: dict[str, int] = {k.value: 0 for k in SetIrqsKind}
        self.vectors: list[VFIOMSIVector] = []
        self.nr_vectors = 0  # QEMU's vdev->nr_vectors: the highest vector wired + 1
        self.msix_host_on = False
        # MSI: the capability's layout (0: none), the guest's last Enable and mask bits seen, the
        # host's vectors while enabled
        self.msi_cap = 0
        self._msi_size = 0
        self._msi_64 = False
        self._msi_maskbit = False
        self._msi_guest_on = False
        self._msi_guest_mask = 0
        self.msi_vectors: list[VFIOMSIVector] = []
        self.msi_host_on = False
        self.msi_pending_delivered = 0  # pending bits delivered on unmask
        self.intx_on = False
        self.intx_pending = False
        self.intx_interrupts = 0
        self.intx_eois = 0
        self._intx: EventNotifier | None = None
        self._intx_unmask: EventNotifier | None = None
        self.intx_unmask_writes = 0
        self._sparse: dict[int, list[tuple[int, int, mmap.mmap]]] = {}
        self._regions: dict[int, VfioRegionInfo] = {}
        self._emulated = bytearray()
        self._msix_bar = -1
        self.irq_info: dict[int, VfioIrqInfo] = {}
        self._closed = False
        self._dma_maps: list[tuple[int, int]] = []
        try:
            self.client = VfioUserClient(socket_path, memory=self.ram_dma, twin_socket=twin_socket, name=name)
        except (OSError, VfioRequestError) as e:
            raise VfioDeviceError("connect", f"{name}: cannot connect to the vfio-user server at {socket_path}: {e}") \
                from None
        except Exception as e:  # framing or negotiation (VfioUserError)
            raise VfioDeviceError("negotiate", f"{name}: vfio-user negotiation with {socket_path} failed: {e}") \
                from None
        try:
            self._realize(name)
        except BaseException:
            self._release_all()
            raise

    # -- realize ---------------------------------------------------------------------------------------
    def _realize(self, name: str) -> None:
        c = self.client
        try:
            info = c.get_device_info()
            cfg_info, cfg_fd = self.client.get_region_info(VfioPciRegion.CONFIG)
            if cfg_fd is not None:
                os.close(cfg_fd)
            if cfg_info.size not in (256, 4096):
                raise VfioDeviceError("config", f"{name}: CONFIG region of {cfg_info.size} bytes (256 or 4096 expected)")
            config = c.region_read(VfioPciRegion.CONFIG, 0, cfg_info.size)
        except VfioRequestError as e:
            raise VfioDeviceError("realize", f"{name}: {e}") from None
        self.device_info = info
        vendor, device = struct.unpack_from("<HH", config, 0)
        class_code = config[R.PCI_CLASS_PROG] | (struct.unpack_from("<H", config, R.PCI_CLASS_DEVICE)[0] << 8)
        super().__init__(name, vendor_id=vendor, device_id=device, class_code=class_code,
                         revision=config[R.PCI_REVISION_ID], interrupt_pin=config[R.PCI_INTERRUPT_PIN])
        if cfg_info.size != self.config_size:
            self.config_size = cfg_info.size
            self.wmask = self.wmask + bytearray(cfg_info.size - len(self.wmask))
            self.w1cmask = self.w1cmask + bytearray(cfg_info.size - len(self.w1cmask))
        self.config = bytearray(config)
        self._emulated = bytearray(self.config_size)
        self._emulate(R.PCI_BASE_ADDRESS_0, 24)
        self._emulate(PCI_ROM_ADDRESS, 4)
        self._emulate(R.PCI_INTERRUPT_LINE, 1)
        struct.pack_into("<I", self.config, PCI_ROM_ADDRESS, 0)  # no ROM BAR (not passed through)
        for idx in VfioPciIrqIndex:
            if idx < info.num_irqs:
                try:
                    self.irq_info[idx] = c.get_irq_info(idx)
                except VfioRequestError:
                    self.irq_info[idx] = VfioIrqInfo(index=idx)
        self._realize_msi()
        # MSI-X: the guest's view, emulated by MSIX on this function's own capability
        cap = self.find_capability(R.PCI_CAP_ID_MSIX)
        msix_info = self.irq_info.get(VfioPciIrqIndex.MSIX)
        if cap and msix_info is not None and msix_info.count:
            ctl = self.get16(cap + R.PCI_MSIX_FLAGS)
            tbl = self.get32(cap + R.PCI_MSIX_TABLE)
            pba = self.get32(cap + R.PCI_MSIX_PBA)
            if tbl & 7 != pba & 7:
                raise VfioDeviceError("msix", f"{name}: MSI-X table and PBA in different BARs are not supported")
            n = (ctl & R.PCI_MSIX_FLAGS_QSIZE) + 1
            self._emulate(cap, R.PCI_CAP_MSIX_SIZEOF)
            try:
                MSIX(self, n, tbl & 7, table_offset=tbl & ~7, pba_offset=pba & ~7)
            except ValueError as e:
                raise VfioDeviceError("msix", f"{name}: MSI-X capability: {e}") from None
            assert self.msix is not None
            self._msix_bar = tbl & 7
            self.vectors = [VFIOMSIVector(v) for v in range(n)]
            for v in range(n):  # every vector is the device's to use (QEMU: vfio uses them all)
                self.msix.vector_use(v)
        # PCIe FLR: the guest's Initiate FLR becomes DEVICE_RESET (never forwarded as a config write)
        exp = self.find_capability(R.PCI_CAP_ID_EXP)
        if exp:
            self.exp_cap = exp
            self.wmask[exp + R.PCI_EXP_DEVCTL + 1] |= R.PCI_EXP_DEVCTL_BCR_FLR >> 8
        self._realize_aer()
        self._emulate(R.PCI_HEADER_TYPE, 1)  # the multi-function bit is the VMM's (its virtual slot)
        self._realize_bars(name)
        self._dma_map_ram()
        self._enable_intx()
        self._enable_req()
        self._enable_err()

    def _realize_aer(self) -> None:
        """The AER extended capability: with ``aer`` the guest sees one emulated by the VMM at the
        host's offset (``kickcall.pci.aer.AERCap``: errors the host reports are injected into it
        and climb to the virtual root port); without, the extended capability list is hidden, as
        QEMU hides AER unless it is asked for.  Device Status is emulated (the detected-error
        bits are the VMM's), Device Control's reporting enables are kept in the VMM's copy too."""
        if self.config_size < 4096:
            return
        off, seen = 0x100, 0
        while off and seen < 64:
            hdr = self.get32(off)
            if hdr & 0xFFFF == PCI_EXT_CAP_ID_ERR:
                self.host_aer_offset = off
                break
            off = (hdr >> 20) & 0xFFC
            seen += 1
        self._emulate(0x100, PCI_ERR_SIZEOF)
        if not self.aer_forwarding or not self.host_aer_offset or not self.exp_cap:
            self.config[0x100:0x100 + PCI_ERR_SIZEOF] = bytes(PCI_ERR_SIZEOF)
            return
        AERCap(self, 0x100)
        self._emulate(self.exp_cap + R.PCI_EXP_DEVSTA, 2)
        self.w1cmask[self.exp_cap + R.PCI_EXP_DEVSTA] |= 0x0F
        self.wmask[self.exp_cap + R.PCI_EXP_DEVCTL] |= 0x0F

    # -- PCIe errors: the ERR eventfd (vfio_err_notifier_handler) --------------------------------------------
    def _enable_err(self) -> None:
        """Register the ERR eventfd when the host offers the index (a PCIe function): the host's
        error_detected signals it; the main loop reads the error and applies the policy."""
        info = self.irq_info.get(VfioPciIrqIndex.ERR)
        if info is None or not info.count:
            return
        n = self._bind_eventfd(SetIrqsKind.ERR_ENABLE, VfioPciIrqIndex.ERR, _EVENTFD_TRIGGER, "err", Role.ERR,
                               "the host reports a PCIe error on the function (vfio-pci error_detected)")
        self._err = n
        if n is not None and self.iothread is not None:
            self.iothread.set_fd_handler(n.fileno(), self._err_interrupt)

    def _close_err(self) -> None:
        n, self._err = self._err, None
        self._drop_eventfd(n)

    def _read_host_aer(self) -> dict | None:
        """The error the host latched for the user (its AER registers in our CONFIG view)."""
        o = self.host_aer_offset
        if not o:
            return None
        try:
            raw = self.client.region_read(VfioPciRegion.CONFIG, o, PCI_ERR_SIZEOF)
        except VfioRequestError as e:
            log.warning("%s: reading the host's AER registers: %s", self.name, e)
            return None
        words = struct.unpack_from("<18I", raw)
        return {"uncor-status": words[1], "uncor-mask": words[2], "severity": words[3], "cor-status": words[4],
                "fep": words[6] & 0x1F, "header": tuple(words[7:11])}

    def _clear_host_aer(self, st: dict) -> None:
        o = self.host_aer_offset
        try:
            if st["uncor-status"]:
                self.client.region_write(VfioPciRegion.CONFIG, o + 4, struct.pack("<I", st["uncor-status"]))
            if st["cor-status"]:
                self.client.region_write(VfioPciRegion.CONFIG, o + 0x10, struct.pack("<I", st["cor-status"]))
        except VfioRequestError as e:
            log.warning("%s: clearing the host's AER status: %s", self.name, e)

    def _err_interrupt(self) -> None:
        """Main loop: the host signalled ERR.  What the error was comes from the host's AER
        registers (the count in the eventfd means nothing).  Policy (the design seed 004 arrived
        at): with ``aer`` a non-fatal error is forwarded to the guest through the virtual root port
        and the guest's AER driver recovers the function; a fatal one, an error we cannot read, or
        any error without ``aer`` stops the VM (QEMU: "Unrecoverable error detected")."""
        n = self._err
        if n is None or n.closed or not n.test_and_clear():
            return
        self.err_signals += 1
        st = self._read_host_aer()
        if st is not None and st["uncor-status"] == 0xFFFFFFFF:
            st = None  # the function does not answer (all-F's): what happened is unknown
        # (the host reported only what its mask let through: the mask is not applied again -- a
        # frozen function's live mask reads all-F's, only the status is latched for the user)
        uncor = st["uncor-status"] if st is not None else 0
        fatal = bool(st is not None and uncor & st["severity"])
        severity = ("unknown" if st is None else "fatal" if fatal else "non-fatal" if uncor
                    else "correctable" if st["cor-status"] else "none")
        ev: dict = {"device": self.name, "severity": severity, "signal": self.err_signals}
        if st is not None:
            ev.update({"uncor-status": st["uncor-status"], "cor-status": st["cor-status"],
                       "errors": decode_status(st["uncor-status"], False) + decode_status(st["cor-status"], True)})
        if severity in ("none", "correctable"):
            ev["action"] = "ignored"  # nothing the guest must act on (an error already handled)
            if st is not None:
                self._clear_host_aer(st)
        elif severity == "non-fatal" and self.aer_forwarding and self.aer is not None and st is not None:
            self._clear_host_aer(st)
            first = 1 << st["fep"] if st["fep"] and uncor & (1 << st["fep"]) else uncor & -uncor
            delivered = []
            for bit in [first] + [b for b in (1 << i for i in range(32)) if uncor & b and b != first]:
                flags = AerErrFlag.HEADER_VALID if bit == first else AerErrFlag(0)
                rc = self.aer.inject(PCIEAERErr(bit, flags, header=st["header"] if bit == first else (0, 0, 0, 0)))
                delivered.append({"status": bit, "rc": rc})
            ev.update({"action": "forwarded", "injected": delivered})
        else:
            ev["action"] = "stop"
            log.error("%s: unrecoverable error detected (%s). Please collect any data possible and then kill "
                      "the guest", self.name, severity)
        self.aer_events.append(ev)
        del self.aer_events[:-32]
        _t_err.emit(**{k: v for k, v in ev.items() if k != "injected"})
        if self.on_aer is not None:
            self.on_aer(dict(ev))

    def aer_state(self) -> str:
        """``idle``; ``guest-recovering`` (an error was forwarded and the guest has not cleared its
        status yet); ``vm-stopped`` (the last error stopped the VM: fatal, unreadable, or no
        ``aer``)."""
        last = self.aer_events[-1] if self.aer_events else None
        if last is not None and last.get("action") == "stop":
            return "vm-stopped"
        if self.aer is not None and (self.aer.uncor_status or self.aer.cor_status):
            return "guest-recovering"
        return "idle"

    # -- hot reset (kickcall's vfio-user extension) -----------------------------------------------------------
    @property
    def hot_reset_offer(self) -> "HotResetOffer | None":
        return self.client.hot_reset_offer

    def hot_reset_info(self) -> list[PciAddress]:
        """The host functions a hot reset of this function's bus resets (VfioRequestError)."""
        return self.client.hot_reset_info()

    def pre_reset(self) -> None:
        """``vfio_pci_pre_reset``: the function's interrupts off before a reset the host does."""
        if not self._closed:
            self._disable_interrupts()

    def hot_reset(self, tokens: Sequence[bytes]) -> None:
        """Send the card's one hot reset (``VFIO_DEVICE_PCI_HOT_RESET``); VfioRequestError."""
        self.client.hot_reset(tokens)
        self.hot_resets += 1

    def _realize_msi(self) -> None:
        """The MSI capability, emulated (``vfio_msi_setup`` / ``msi_init``): Enable and MME, the
        address, the data and the mask bits are the guest's to write, the pending bits the VMM's;
        without MSI in the host's IRQ info, Enable stays read-only (the guest uses MSI-X or INTx)."""
        msi = self.find_capability(R.PCI_CAP_ID_MSI)
        if not msi:
            return
        flags = self.get16(msi + PCI_MSI_FLAGS)
        self._msi_64 = bool(flags & PCI_MSI_FLAGS_64BIT)
        self._msi_maskbit = bool(flags & PCI_MSI_FLAGS_MASKBIT)
        self._msi_size = 10 + (4 if self._msi_64 else 0) + (10 if self._msi_maskbit else 0)
        self._emulate(msi, self._msi_size)
        info = self.irq_info.get(VfioPciIrqIndex.MSI)
        if info is None or not info.count:
            self.set_config(msi + PCI_MSI_FLAGS, flags & ~(PCI_MSI_FLAGS_ENABLE | PCI_MSI_FLAGS_QSIZE), 2, wmask=0)
            return
        self.msi_cap = msi
        self._msi_reset_regs()

    def _msi_reset_regs(self) -> None:
        """The guest's view of the MSI capability at reset: disabled, MME 0, all zero (``msi_reset``)."""
        c = self.msi_cap
        flags = self.get16(c + PCI_MSI_FLAGS) & ~(PCI_MSI_FLAGS_ENABLE | PCI_MSI_FLAGS_QSIZE)
        self.set_config(c + PCI_MSI_FLAGS, flags, 2, wmask=PCI_MSI_FLAGS_ENABLE | PCI_MSI_FLAGS_QSIZE)
        self.set_config(c + PCI_MSI_ADDRESS_LO, 0, 4, wmask=0xFFFFFFFC)
        if self._msi_64:
            self.set_config(c + PCI_MSI_ADDRESS_HI, 0, 4, wmask=0xFFFFFFFF)
        self.set_config(self._msi_data_off, 0, 2, wmask=0xFFFF)
        if self._msi_maskbit:
            self.set_config(self._msi_data_off + 2, 0, 2, wmask=0)
            self.set_config(self._msi_mask_off, 0, 4, wmask=(1 << self.msi_max_vectors) - 1)
            self.set_config(self._msi_mask_off + 4, 0, 4, wmask=0)  # pending: the VMM's
        self._msi_guest_on = False
        self._msi_guest_mask = 0

    def _emulate(self, off: int, size: int) -> None:
        for i in range(off, min(off + size, self.config_size)):
            self._emulated[i] = 1

    def add_capability(self, cap_id: int, size: int) -> int:
        """The device's capabilities come from the server's config space: MSIX's setup finds the
        existing capability instead of appending one."""
        off = self.find_capability(cap_id)
        if not off:
            raise ValueError(f"{self.name}: the device has no capability {cap_id:#x}")
        return off

    def _realize_bars(self, name: str) -> None:
        i = 0
        while i < R.PCI_NUM_BARS:
            reg = self.get32(R.PCI_BASE_ADDRESS_0 + 4 * i)
            io = bool(reg & R.PCI_BASE_ADDRESS_SPACE_IO)
            mem64 = not io and reg & 0x6 == R.PCI_BASE_ADDRESS_MEM_TYPE_64
            prefetch = not io and bool(reg & R.PCI_BASE_ADDRESS_MEM_PREFETCH)
            try:
                info, fd = self.client.get_region_info(i)
            except VfioRequestError:
                info, fd = VfioRegionInfo(index=i), None
            if info.size:
                self._regions[i] = info
                region = IORegion(f"{name}-bar{i}", info.size, functools.partial(self._bar_read, i),
                                  functools.partial(self._bar_write, i))
                try:
                    self.register_bar(i, region, io=io, mem64=mem64, prefetch=prefetch)
                except ValueError as e:
                    if fd is not None:
                        os.close(fd)
                    raise VfioDeviceError("bar", f"{name}: BAR{i}: {e}") from None
                if fd is not None:
                    self._map_sparse(i, info, fd)
            elif fd is not None:
                os.close(fd)
            i += 2 if mem64 else 1

    def _map_sparse(self, index: int, info: VfioRegionInfo, fd: int) -> None:
        """mmap the areas the server offers (REGION_INFO_CAP_SPARSE_MMAP) and close the fd."""
        areas = []
        try:
            if info.flags & VfioRegionInfoFlag.MMAP:
                wanted = info.sparse if info.sparse is not None else []
                for a in wanted:
                    if not a.size or a.offset + a.size > info.size:
                        continue
                    try:
                        mm = mmap.mmap(fd, a.size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE,
                                       offset=info.offset + a.offset)
                    except (OSError, ValueError, OverflowError) as e:
                        log.warning("%s: BAR%d area %#x+%#x not mapped (trapped instead): %s", self.name, index,
                                    a.offset, a.size, e)
                        continue
                    areas.append((a.offset, a.size, mm))
        finally:
            os.close(fd)
        if areas:
            self._sparse[index] = areas

    def _dma_map_ram(self) -> None:
        regions, fds = self.memory.layout()
        for r in regions:
            gpa, size = int(r["gpa"]), int(r["size"])
            try:
                if self.dma_mode == DmaMode.FD:
                    self.client.dma_map(gpa, size, fds[int(r["block"])], int(r["block_offset"]))
                else:
                    self.client.dma_map(gpa, size, None)
            except VfioRequestError as e:
                raise VfioDeviceError("dma-map", f"{self.name}: DMA_MAP {gpa:#x}+{size:#x}: {e}") from None
            self._dma_maps.append((gpa, size))

    # -- config space ---------------------------------------------------------------------------------
    def config_read(self, addr: int, size: int) -> int:
        if addr < 0 or addr + size > self.config_size or size not in (1, 2, 4):
            return (1 << (8 * size)) - 1
        local = super().config_read(addr, size)
        if all(self._emulated[addr:addr + size]):
            return local
        try:
            dev = self.client.region_read(VfioPciRegion.CONFIG, addr, size)
        except VfioRequestError as e:
            log.warning("%s: config read at %#x: %s", self.name, addr, e)
            return (1 << (8 * size)) - 1
        lb = local.to_bytes(size, "little")
        out = bytes(lb[i] if self._emulated[addr + i] else dev[i] for i in range(size))
        return int.from_bytes(out, "little")

    def config_write(self, addr: int, value: int, size: int) -> None:
        if addr < 0 or addr + size > self.config_size or size not in (1, 2, 4):
            return
        data = bytearray(value.to_bytes(size, "little"))
        if self.exp_cap:  # Initiate FLR is ours to act on (DEVICE_RESET), never a raw config write
            hi = self.exp_cap + R.PCI_EXP_DEVCTL + 1
            if addr <= hi < addr + size:
                data[hi - addr] &= ~(R.PCI_EXP_DEVCTL_BCR_FLR >> 8) & 0xFF
        i = 0
        while i < size:  # forward the runs of bytes the VMM does not emulate
            if self._emulated[addr + i]:
                i += 1
                continue
            j = i
            while j < size and not self._emulated[addr + j]:
                j += 1
            try:
                self.client.region_write(VfioPciRegion.CONFIG, addr + i, bytes(data[i:j]))
            except VfioRequestError as e:
                log.warning("%s: config write at %#x: %s", self.name, addr + i, e)
            i = j
        super().config_write(addr, value, size)

    def write_config_hook(self, addr: int, value: int, size: int) -> None:
        if self.msi_cap and addr < self.msi_cap + self._msi_size and self.msi_cap < addr + size:
            self._msi_config_written()
        m = self.msix
        if m is None or not (addr < m.cap + R.PCI_CAP_MSIX_SIZEOF and m.cap < addr + size):
            return
        if m.enabled and not self.msix_host_on:
            self._msix_enable()
        elif not m.enabled and (self.msix_host_on or any(v.use for v in self.vectors)):
            self._msix_disable()
            self._enable_intx()

    # -- BARs -------------------------------------------------------------------------------------------
    def _in_msix(self, index: int, off: int, size: int) -> bool:
        m = self.msix
        if m is None or self._msix_bar != index:
            return False
        t0, t1 = m.table_offset, m.table_offset + len(m.table)
        p0, p1 = m.pba_offset, m.pba_offset + len(m.pba)
        return (t0 <= off and off + size <= t1) or (p0 <= off and off + size <= p1)

    def _sparse_area(self, index: int, off: int, size: int) -> tuple[mmap.mmap, int] | None:
        for a_off, a_size, mm in self._sparse.get(index, ()):
            if a_off <= off and off + size <= a_off + a_size:
                return mm, off - a_off
        return None

    def _bar_read(self, index: int, off: int, size: int) -> int:
        if self.intx_pending:
            self._intx_eoi()
        if self._in_msix(index, off, size):
            assert self.msix is not None
            return self.msix.region.read(off, size)
        hit = self._sparse_area(index, off, size)
        if hit is not None:
            mm, o = hit
            return int.from_bytes(mm[o:o + size], "little")
        try:
            return int.from_bytes(self.client.region_read(index, off, size), "little")
        except VfioRequestError as e:
            log.warning("%s: BAR%d read at %#x: %s", self.name, index, off, e)
            return (1 << (8 * size)) - 1

    def _bar_write(self, index: int, off: int, value: int, size: int) -> None:
        if self.intx_pending:
            self._intx_eoi()
        if self._in_msix(index, off, size):
            assert self.msix is not None
            self.msix.region.write(off, value, size)
            return
        data = (value & ((1 << (8 * size)) - 1)).to_bytes(size, "little")
        hit = self._sparse_area(index, off, size)
        if hit is not None:
            mm, o = hit
            mm[o:o + size] = data
            return
        try:
            self.client.region_write(index, off, data)
        except VfioRequestError as e:
            log.warning("%s: BAR%d write at %#x: %s", self.name, index, off, e)

    # -- SET_IRQS ---------------------------------------------------------------------------------------
    @property
    def noresize(self) -> bool:
        """The old path: the host says NORESIZE on MSI-X, or ``x_msix_noresize`` forces it."""
        info = self.irq_info.get(VfioPciIrqIndex.MSIX)
        host = info is not None and bool(info.flags & VfioIrqInfoFlag.NORESIZE)
        return host or self.x_msix_noresize

    @property
    def noresize_reason(self) -> str | None:
        info = self.irq_info.get(VfioPciIrqIndex.MSIX)
        if info is not None and info.flags & VfioIrqInfoFlag.NORESIZE:
            return "host-flag"
        if self.x_msix_noresize:
            return "x-msix-noresize"
        return None

    def _set_irqs(self, kind: SetIrqsKind, index: int, flags: int, start: int, count: int,
                  fds: list[int] | None = None) -> None:
        self.client.set_irqs(index, flags, start, count, fds=fds)
        self.set_irqs_counts[kind.value] += 1
        if _t_vector.enabled and index in (VfioPciIrqIndex.MSIX, VfioPciIrqIndex.MSI):
            _t_vector.emit(dev=self.name, kind=kind.value, start=start, count=count)

    def _fail(self, vector: int, e: VfioRequestError | _Fatal, kind: SetIrqsKind | str,
              index: int = VfioPciIrqIndex.MSIX) -> None:
        """A vector could not be wired: record why and have the machine stop the VM."""
        err = e.errno
        msi = index == VfioPciIrqIndex.MSI
        ev = {"device": self.name, "index": VfioPciIrqIndex(index).name, "vector": vector, "errno": err,
              "error": errno.errorcode.get(err, str(err)),
              "path": "msi" if msi else "noresize" if self.noresize else "dynamic", "kind": str(kind),
              "reason": str(e)}
        if self.fatal is None:
            self.fatal = ev
        self.fatal_events.append(ev)
        log.error("%s: %s vector %d cannot be wired in the host (%s): %s", self.name, ev["index"], vector,
                  ev["error"], e)
        if _t_fatal.enabled:
            _t_fatal.emit(dev=self.name, vector=vector, errno=err)
        if self.on_fatal is not None:
            try:
                self.on_fatal(dict(ev))
            except Exception:  # noqa: BLE001 -- the guest's access must still complete
                log.exception("%s: on_fatal failed", self.name)

    # -- MSI-X ------------------------------------------------------------------------------------------
    def _msix_enable(self) -> None:
        """The guest enabled MSI-X (``vfio_msix_enable``): INTx off, host MSI-X on with no vector
        wired, then the vectors the guest already unmasked."""
        m = self.msix
        assert m is not None
        self._msi_disable()  # one of INTx/MSI/MSI-X at a time (vfio_disable_interrupts)
        self._disable_intx()
        m.set_vector_notifiers(self._vector_use, self._vector_release, self._vector_poll)
        if not self._enable_no_vec():
            return
        for v in range(m.nvectors):
            if not m.is_masked(v):
                addr, data = m.get_message(v)
                self._vector_use(v, addr, data)

    def _enable_no_vec(self) -> bool:
        try:
            self._set_irqs(SetIrqsKind.ENABLE_NO_VECTOR, VfioPciIrqIndex.MSIX, _EVENTFD_TRIGGER, 0, 1, fds=[-1])
        except VfioRequestError as e:
            self._fail(0, e, SetIrqsKind.ENABLE_NO_VECTOR)
            return False
        self.msix_host_on = True
        return True

    def _msix_disable(self) -> None:
        """The guest disabled MSI-X (or a reset): the index off, every vector released."""
        m = self.msix
        if m is not None:
            m.set_vector_notifiers(None, None, None)
        if self.msix_host_on:
            self.msix_host_on = False
            self._disable_index(SetIrqsKind.INDEX_DISABLE, VfioPciIrqIndex.MSIX)
        for vec in self.vectors:
            self._free_vector(vec)
        self.nr_vectors = 0
        if self.xen and self.faults.fix_on(XEN_UNMAP_ON_DISABLE):
            self._xen_unmap_all("msix-disable")

    @staticmethod
    def _label(vec: VFIOMSIVector) -> str:
        return f"{'msi' if vec.index == VfioPciIrqIndex.MSI else 'msix'}{vec.nr}"

    def _ensure_interrupt(self, vec: VFIOMSIVector) -> EventNotifier:
        if vec.interrupt is None:
            msi = vec.index == VfioPciIrqIndex.MSI
            n = EventNotifier(f"{self.name}.{self._label(vec)}.interrupt")
            self.registry.register(n, self.name, Role.MASKED, vector=vec.nr,
                                   note=f"VFIO userspace trigger: read by the VMM into {'msi' if msi else 'msix'}_notify")
            vec.interrupt = n
            if self.iothread is not None:
                handler = self._msi_interrupt if msi else self._msix_interrupt
                self.iothread.set_fd_handler(n.fileno(), functools.partial(handler, vec.nr))
        return vec.interrupt

    def _ensure_irqfd(self, vec: VFIOMSIVector, address: int, data: int) -> None:
        if vec.kvm_interrupt is not None:
            assert self.routes is not None and vec.gsi is not None
            if self.routes.update(vec.gsi, address, data):
                self.routes.commit()
            return
        if not self.irqfd_enabled:
            return
        assert self.routes is not None and self.vm is not None
        try:
            gsi = self.routes.add(address, data)
            self.routes.commit()
        except HypervisorError as e:
            log.warning("%s: vector %d falls back to the userspace path: %s", self.name, vec.nr, e)
            return
        n = EventNotifier(f"{self.name}.{self._label(vec)}.irqfd")
        try:
            self.vm.irqfd(n, gsi)
        except HypervisorError as e:
            log.warning("%s: vector %d: irqfd refused, userspace path: %s", self.name, vec.nr, e)
            n.close()
            self.routes.release(gsi)
            self.routes.commit()
            return
        self.registry.register(n, self.name, Role.GUEST, vector=vec.nr, note=f"irqfd on GSI {gsi}")
        vec.kvm_interrupt, vec.gsi = n, gsi

    def _free_vector(self, vec: VFIOMSIVector) -> None:
        if vec.kvm_interrupt is not None:
            n, gsi = vec.kvm_interrupt, vec.gsi
            vec.kvm_interrupt, vec.gsi = None, None
            if self.vm is not None and gsi is not None:
                try:
                    self.vm.irqfd(n, gsi, deassign=True)
                except Exception as e:  # noqa: BLE001 -- the VM is gone: its bindings went with it
                    log.debug("%s: irqfd deassign: %s", self.name, e)
            if self.routes is not None and gsi is not None:
                self.routes.release(gsi)
                try:
                    self.routes.commit()
                except Exception as e:  # noqa: BLE001 -- the VM is gone
                    log.debug("%s: route commit: %s", self.name, e)
            self.registry.unregister(n)
            n.close()
        if vec.interrupt is not None:
            n = vec.interrupt
            vec.interrupt = None
            if self.iothread is not None:
                self.iothread.remove_fd_handler(n.fileno())
            self.registry.unregister(n)
            n.close()
        vec.use = False
        vec.trigger = HostTrigger.NONE

    def _vector_use(self, v: int, address: int, data: int) -> None:
        """The guest unmasked vector *v* (``vfio_msix_vector_do_use``)."""
        m = self.msix
        if m is None or not m.enabled:
            return
        vec = self.vectors[v]
        vec.use = True
        self._ensure_interrupt(vec)
        if self.xen:
            self._xen_vector_use(vec, address, data)
        else:
            self._ensure_irqfd(vec, address, data)
        direct = self._direct(vec)
        target = direct[0] if direct is not None else HostTrigger.USERSPACE
        try:
            if not self.msix_host_on and not self._enable_no_vec():
                return
            resizing = self.nr_vectors < v + 1
            if self.noresize and resizing:
                self._noresize_grow(v)
            elif vec.trigger != target:
                kind = (SetIrqsKind.VECTOR_ADD if vec.trigger == HostTrigger.NONE else
                        SetIrqsKind.VECTOR_SWITCH_TO_PIRQ if target == HostTrigger.PIRQ else
                        SetIrqsKind.VECTOR_SWITCH_TO_IRQFD)
                try:
                    self._set_vector_trigger(vec, target, kind)
                except VfioRequestError as e:
                    self._fail(v, e, kind)
                    return
            if resizing:
                self.nr_vectors = v + 1
        finally:
            # a signal left in the userspace eventfd becomes a pending bit: the MSI-X core
            # delivers it exactly once, right after this notifier returns
            assert vec.interrupt is not None
            if vec.interrupt.test_and_clear():
                vec.userspace_interrupts += 1
                m.set_pending(v)

    def _noresize_grow(self, v: int) -> None:
        """The old path: disable the index, re-enable it with v+1 vectors in one SET_IRQS."""
        n = v + 1
        limit = min(max(1, self.client.server_caps.max_msg_fds), NORESIZE_LIMIT)
        if n > limit:
            self._fail(v, _Fatal(errno.E2BIG, "noresize-limit",
                                 f"the NORESIZE path re-enables MSI-X with {n} vectors in one SET_IRQS, which "
                                 f"needs {n} fds; the server takes at most {limit} per message (max_msg_fds)"),
                       SetIrqsKind.INDEX_ENABLE_ALL)
            return
        m = self.msix
        assert m is not None
        if self.msix_host_on:
            try:
                self._set_irqs(SetIrqsKind.INDEX_DISABLE, VfioPciIrqIndex.MSIX, _NONE_TRIGGER, 0, 0)
            except VfioRequestError as e:
                self._fail(v, e, SetIrqsKind.INDEX_DISABLE)
                return
            self.msix_host_on = False
            for vec in self.vectors:
                vec.trigger = HostTrigger.NONE
        fds: list[int] = []
        targets: list[HostTrigger] = []
        for i in range(n):
            vec = self.vectors[i]
            intr = self._ensure_interrupt(vec)
            direct = self._direct(vec)
            if vec.use and direct is not None and (i == v or not m.is_masked(i)):
                fds.append(direct[1].fileno())
                targets.append(direct[0])
            else:
                fds.append(intr.fileno())
                targets.append(HostTrigger.USERSPACE)
        try:
            self._set_irqs(SetIrqsKind.INDEX_ENABLE_ALL, VfioPciIrqIndex.MSIX, _EVENTFD_TRIGGER, 0, n, fds=fds)
        except VfioRequestError as e:
            self._fail(v, e, SetIrqsKind.INDEX_ENABLE_ALL)
            return
        self.msix_host_on = True
        for i, t in enumerate(targets):
            self.vectors[i].trigger = t

    def _vector_release(self, v: int) -> None:
        """The guest masked vector *v* (``vfio_msix_vector_release``): the host's trigger goes to
        the VMM's interrupt eventfd, which the main loop turns into PBA bits."""
        m = self.msix
        if m is None or not m.enabled or not self.msix_host_on:
            return  # MSI-X is going away: the index is disabled next
        self._park_masked_vector(self.vectors[v], SetIrqsKind.VECTOR_SWITCH_TO_USERSPACE)

    def _set_vector_trigger(self, vec: VFIOMSIVector, target: HostTrigger, kind: SetIrqsKind) -> None:
        """Point the host's trigger for *vec* at *target*'s eventfd: SET_IRQS(MSI-X or MSI,
        start=v, count=1, EVENTFD|TRIGGER).  ``VfioRequestError`` when the host refuses it."""
        n = self._trigger_notifier(vec, target)
        assert n is not None
        self._set_irqs(kind, vec.index, _EVENTFD_TRIGGER, vec.nr, 1, fds=[n.fileno()])
        vec.trigger = target

    @staticmethod
    def _trigger_notifier(vec: VFIOMSIVector, trigger: HostTrigger) -> EventNotifier | None:
        """The eventfd behind *trigger* for *vec* (None: none, or closed)."""
        n = {HostTrigger.IRQFD: vec.kvm_interrupt, HostTrigger.USERSPACE: vec.interrupt,
             HostTrigger.PIRQ: vec.pirq_notifier}.get(trigger)
        return None if n is None or n.closed else n

    @staticmethod
    def _direct(vec: VFIOMSIVector) -> tuple[HostTrigger, EventNotifier] | None:
        """The eventfd that delivers *vec* without the VMM: the pirq's (Xen) or the irqfd."""
        if vec.pirq_notifier is not None and not vec.pirq_notifier.closed:
            return HostTrigger.PIRQ, vec.pirq_notifier
        if vec.kvm_interrupt is not None:
            return HostTrigger.IRQFD, vec.kvm_interrupt
        return None

    def _park_masked_vector(self, vec: VFIOMSIVector, kind: SetIrqsKind) -> None:
        """The guest masked *vec* (``vfio_msix_vector_release``): its host trigger goes from the
        irqfd to the VMM's interrupt eventfd (unless ``MASK_EMULATION_FIX`` is off).  A refusal is
        not fatal: the trigger stays on the irqfd, so interrupts arrive while masked (no loss)."""
        if vec.trigger not in (HostTrigger.IRQFD, HostTrigger.PIRQ) or not self.faults.fix_on(MASK_EMULATION_FIX):
            return
        self._ensure_interrupt(vec)
        try:
            self._set_vector_trigger(vec, HostTrigger.USERSPACE, kind)
        except VfioRequestError as e:
            self.errors.append({"vector": vec.nr, "index": VfioPciIrqIndex(vec.index).name, "kind": kind.value,
                                "errno": e.errno, "reason": str(e)})
            log.warning("%s: masking %s vector %d in the host: %s", self.name, VfioPciIrqIndex(vec.index).name,
                        vec.nr, e)

    def _vector_poll(self, first: int, end: int) -> None:
        """The guest reads the PBA: signals parked in the userspace eventfds become pending bits."""
        m = self.msix
        assert m is not None
        for v in range(first, min(end, len(self.vectors))):
            n = self.vectors[v].interrupt
            if n is not None and m.is_masked(v) and n.test_and_clear():
                self.vectors[v].userspace_interrupts += 1
                m.notify(v)

    def _msix_interrupt(self, v: int) -> None:
        """Main loop: the host signalled vector *v*'s userspace eventfd (``vfio_msi_interrupt``)."""
        vec = self.vectors[v]
        n = vec.interrupt
        if n is None or n.closed:
            return
        if n.test_and_clear():
            vec.userspace_interrupts += 1
            if self.msix is not None:
                self.msix.notify(v)

    # -- Xen (QEMU's hw/xen/xen_pt_msi.c) ----------------------------------------------------------------
    def _xen_alive(self) -> bool:
        return self.vm is not None and not self.vm.guest_gone.is_set()

    def _xen_table_base(self) -> int:
        """``table_base`` of the map: where the MSI-X table is (the BAR's guest address + the table's
        offset; QEMU passes the host's physical address, which a vfio-user client does not have)."""
        m = self.msix
        if m is None or not 0 <= self._msix_bar < len(self.bars):
            return 0
        bar = self.bars[self._msix_bar]
        return (bar.mapped_at or 0) + m.table_offset if bar is not None else 0

    def _xen_vector_use(self, vec: VFIOMSIVector, address: int, data: int) -> None:
        """The guest unmasked *vec* (``xen_pt_msix_update_one``): map its pirq if it has none."""
        want = pirq_of_msi(address, data)
        vec.guest_pirq = want
        if vec.pirq is not None:
            if want is not None and want != vec.pirq:
                # entry->pirq is assigned: QEMU does not map again, whatever the guest wrote now
                log.warning("%s: MSI-X vector %d: the guest's message names pirq %d, the entry keeps pirq %d "
                            "(mapped earlier, never unmapped: %s off)", self.name, vec.nr, want, vec.pirq,
                            XEN_UNMAP_ON_DISABLE)
            return
        if want is None:
            self.xen_lapic_unmasks += 1
            log.info("%s: MSI-X vector %d: message %#x/%#x carries no pirq: the userspace path (the hypervisor "
                     "delivers it to the local APIC)", self.name, vec.nr, address, data)
            return
        if not self._xen_alive():
            return
        assert self.vm is not None
        n = EventNotifier(f"{self.name}.{self._label(vec)}.pirq")
        arg = {"domid": self.vm.xen_domid, "type": int(MapPirqType.MSI), "index": -1, "pirq": want, "bus": 0,
               "devfn": self.devfn, "entry_nr": vec.nr, "table_base": self._xen_table_base()}
        owner = {"device": self.name, "vector": vec.nr}
        try:
            rep = self.vm.xen_physdev_op(PhysdevOp.MAP_PIRQ, arg, fd=n.fileno(), owner=owner)
        except (HypervisorError, ChannelClosed, TimeoutError) as e:
            n.close()
            self._xen_error(vec, "map", want, -getattr(e, "errno", 0) or -errno.EIO, str(e))
            return
        rc = int(rep.get("rc", -errno.EIO))
        got = int(rep.get("arg", {}).get("pirq", -1))
        if rc < 0:
            n.close()
            self._xen_error(vec, "map", want, rc, os.strerror(-rc))
            return
        vec.pirq, vec.pirq_notifier = got, n
        vec.pirq_maps += 1
        self.registry.register(n, self.name, Role.GUEST, vector=vec.nr,
                               note=f"Xen: the host trigger mapped to pirq {got} (the domain polls it)")
        warning = self._xen_map_warning(vec, want, got)
        if warning is not None:
            vec.pirq_warnings.append(warning)
            log.warning("%s: MSI-X vector %d: map_pirq %d answered 0 but %s", self.name, vec.nr, want,
                        warning["reason"])
        else:
            log.info("%s: MSI-X vector %d mapped to pirq %d", self.name, vec.nr, got)
        if _t_xen_map.enabled:
            _t_xen_map.emit(dev=self.name, vector=vec.nr, pirq=got, requested=want, warned=warning is not None)

    def _xen_map_warning(self, vec: VFIOMSIVector, want: int, got: int) -> dict | None:
        """Xen's map answers 0 when it only warned ("already mapped": nothing changed).  Tell by the
        returned pirq and by who the domain says owns it now."""
        if got != want:
            return {"pirq": want, "returned": got, "reason": f"the domain returned pirq {got}"}
        assert self.vm is not None
        try:
            q = self.vm.xen_query()
        except (HypervisorError, ChannelClosed, TimeoutError) as e:
            return {"pirq": got, "reason": f"the domain could not be asked who owns the pirq: {e}"}
        ent = next((p for p in q.get("pirqs", []) if p.get("pirq") == got), None)
        owner = ent.get("owner", {}) if ent is not None else {}
        if ent is None or ent.get("state") != "mapped" or owner.get("device") != self.name \
                or owner.get("vector") != vec.nr:
            return {"pirq": got, "owner": owner, "state": ent.get("state") if ent else "free",
                    "reason": f"pirq {got} is mapped to {owner.get('device', '?')} vector {owner.get('vector', '?')}"
                              " (Xen's \"already mapped\" warning): this vector's host interrupts reach no event "
                              "channel"}
        return None

    def _xen_error(self, vec: VFIOMSIVector, op: str, pirq: int, rc: int, reason: str) -> None:
        ev = {"vector": vec.nr, "op": op, "pirq": pirq, "rc": rc, "reason": reason}
        self.xen_errors.append(ev)
        log.warning("%s: MSI-X vector %d: %s_pirq %d: %s (the vector stays on the userspace path)", self.name, vec.nr,
                    op, pirq, reason)

    def _xen_unmap_all(self, why: str) -> None:
        """PHYSDEVOP_unmap_pirq for every pirq the function mapped (``xen_pt_msix_delete``), forgotten."""
        for vec in self.vectors:
            if vec.pirq is None:
                continue
            pirq, n = vec.pirq, vec.pirq_notifier
            vec.pirq, vec.pirq_notifier = None, None
            if self._xen_alive():
                assert self.vm is not None
                try:
                    rep = self.vm.xen_physdev_op(PhysdevOp.UNMAP_PIRQ, {"domid": self.vm.xen_domid, "pirq": pirq})
                    rc = int(rep.get("rc", -errno.EIO))
                except (HypervisorError, ChannelClosed, TimeoutError) as e:
                    rc = -(getattr(e, "errno", 0) or errno.EIO)
                if rc < 0:
                    self._xen_error(vec, "unmap", pirq, rc, os.strerror(-rc))
                else:
                    vec.pirq_unmaps += 1
            if _t_xen_unmap.enabled:
                _t_xen_unmap.emit(dev=self.name, vector=vec.nr, pirq=pirq, why=why)
            if n is not None:
                self.registry.unregister(n)
                n.close()
            if vec.trigger == HostTrigger.PIRQ:
                vec.trigger = HostTrigger.NONE

    def _xen_pirq_notifier(self, address: int, data: int) -> tuple[VFIOMSIVector, EventNotifier] | None:
        """The pirq eventfd a message reaches: the vector that mapped the pirq it names, else the
        vector whose entry holds this message and has a pirq mapped (its physical interrupt goes to
        that pirq, whatever the entry says now)."""
        pirq = pirq_of_msi(address, data)
        if pirq is None:
            return None
        for vec in self.vectors:
            if vec.pirq == pirq and vec.pirq_notifier is not None and not vec.pirq_notifier.closed:
                return vec, vec.pirq_notifier
        m = self.msix
        if m is None:
            return None
        for vec in self.vectors:
            n = vec.pirq_notifier
            if n is not None and not n.closed and m.get_message(vec.nr) == (address, data):
                return vec, n
        return None

    def msi_send(self, address: int, data: int) -> None:
        """Deliver a message (the MSI-X core's pending delivery, a userspace-path vector).  Xen: a
        message that reaches a pirq this function mapped fires the pirq's eventfd (the physical
        interrupt again, as the domain sees it), not ``signal_msi``."""
        if self.xen:
            hit = self._xen_pirq_notifier(address, data)
            if hit is not None:
                if not self.bus_master:
                    return  # (PCIBus.msi_send's rule: no bus master, no message)
                vec, n = hit
                vec.pirq_refires += 1
                n.set()
                return
        super().msi_send(address, data)

    def query_xen(self) -> list[dict]:
        """Per MSI-X vector: the pirq the guest's entry names now (``entry-pirq``; only while
        MSI-X is on and the entry unmasked is it a claim), the pirq mapped, map/unmap counts, warnings."""
        m = self.msix
        out = []
        for vec in self.vectors:
            addr, data = m.get_message(vec.nr) if m is not None else (0, 0)
            entry_pirq = pirq_of_msi(addr, data)
            live = m is not None and m.enabled and not m.entry_masked(vec.nr)
            if entry_pirq is None and vec.pirq is None and not vec.pirq_maps and not vec.pirq_warnings:
                continue
            out.append({"vector": vec.nr, "entry-pirq": -1 if entry_pirq is None else entry_pirq, "entry-live": live,
                        "guest-pirq-at-unmask": -1 if vec.guest_pirq is None else vec.guest_pirq,
                        "mapped-pirq": -1 if vec.pirq is None else vec.pirq, "trigger": vec.trigger.value,
                        "maps": vec.pirq_maps, "unmaps": vec.pirq_unmaps, "refires": vec.pirq_refires,
                        "warnings": list(vec.pirq_warnings),
                        "pirq-eventfd": self._counters(vec.pirq_notifier)})
        return out

    # -- MSI --------------------------------------------------------------------------------------------
    @property
    def _msi_data_off(self) -> int:
        return self.msi_cap + (12 if self._msi_64 else 8)

    @property
    def _msi_mask_off(self) -> int:
        return self.msi_cap + (16 if self._msi_64 else 12)

    @property
    def msi_max_vectors(self) -> int:
        """Multiple Message Capable, as a vector count."""
        return 1 << ((self.get16(self.msi_cap + PCI_MSI_FLAGS) & PCI_MSI_FLAGS_QMASK) >> 1)

    @property
    def msi_enabled(self) -> bool:
        """The guest's MSI Enable."""
        return bool(self.msi_cap and self.get16(self.msi_cap + PCI_MSI_FLAGS) & PCI_MSI_FLAGS_ENABLE)

    def _msi_nr_vectors(self) -> int:
        """``msi_nr_vectors_allocated``: 2**MME."""
        return 1 << ((self.get16(self.msi_cap + PCI_MSI_FLAGS) & PCI_MSI_FLAGS_QSIZE) >> 4)

    def _msi_mask(self) -> int:
        return self.get32(self._msi_mask_off) if self._msi_maskbit else 0

    def _msi_pending(self) -> int:
        return self.get32(self._msi_mask_off + 4) if self._msi_maskbit else 0

    def _msi_set_pending(self, v: int, on: bool) -> None:
        if self._msi_maskbit:
            p = self._msi_pending()
            self.set_config(self._msi_mask_off + 4, p | (1 << v) if on else p & ~(1 << v), 4)

    def _msi_message(self, v: int) -> tuple[int, int]:
        """``msi_get_message``: the capability's address, and its data with vector *v* in the
        low MME bits."""
        c = self.msi_cap
        addr = self.get32(c + PCI_MSI_ADDRESS_LO) | ((self.get32(c + PCI_MSI_ADDRESS_HI) << 32) if self._msi_64 else 0)
        n = self._msi_nr_vectors()
        data = self.get16(self._msi_data_off)
        return addr, (data & ~(n - 1)) | v

    def _msi_config_written(self) -> None:
        """A guest write to the MSI capability (``vfio_pci_write_config``'s MSI branch): Enable
        0->1 enables, 1->0 disables, otherwise the routes follow address and data
        (``vfio_update_msi``) and the mask bits are applied."""
        c = self.msi_cap
        flags = self.get16(c + PCI_MSI_FLAGS)
        if flags & PCI_MSI_FLAGS_ENABLE and not self._msi_guest_on and not self.faults.fix_on(MSI_PASSTHROUGH_FIX):
            # the switch off: Enable does not stick (what the VMM did before MSI passthrough)
            self.set_config(c + PCI_MSI_FLAGS, flags & ~PCI_MSI_FLAGS_ENABLE, 2)
            flags &= ~PCI_MSI_FLAGS_ENABLE
        mmc = (flags & PCI_MSI_FLAGS_QMASK) >> 1
        if (flags & PCI_MSI_FLAGS_QSIZE) >> 4 > mmc:  # MME above MMC is clamped (msi_write_config)
            self.set_config(c + PCI_MSI_FLAGS, flags & ~PCI_MSI_FLAGS_QSIZE | (mmc << 4), 2)
        was, on = self._msi_guest_on, self.msi_enabled
        self._msi_guest_on = on
        if not was and on:
            self._msi_enable()
        elif was and not on:
            self._msi_disable()
            self._enable_intx()
        elif on and self.msi_host_on:
            for vec in self.msi_vectors:  # vfio_update_msi
                if vec.kvm_interrupt is not None:
                    self._ensure_irqfd(vec, *self._msi_message(vec.nr))
            self._msi_apply_masks()
        self._msi_guest_mask = self._msi_mask()

    def _msi_enable(self) -> None:
        """``vfio_msi_enable``: INTx and MSI-X off, an interrupt eventfd and an irqfd (on the
        route of ``msi_get_message(v)``) per vector, then one SET_IRQS(MSI, 0, 2**MME) whose fds
        are the irqfds -- the VMM's eventfd for a vector the guest has masked."""
        if self.msix_host_on:
            self._msix_disable()
        self._disable_intx()
        n = self._msi_nr_vectors()
        mask = self._msi_mask()
        emulate = self.faults.fix_on(MASK_EMULATION_FIX)
        self.msi_vectors = [VFIOMSIVector(v, index=VfioPciIrqIndex.MSI, use=True) for v in range(n)]
        targets: list[HostTrigger] = []
        fds: list[int] = []
        for vec in self.msi_vectors:
            intr = self._ensure_interrupt(vec)
            self._ensure_irqfd(vec, *self._msi_message(vec.nr))
            if vec.kvm_interrupt is not None and not (emulate and mask >> vec.nr & 1):
                targets.append(HostTrigger.IRQFD)
                fds.append(vec.kvm_interrupt.fileno())
            else:
                targets.append(HostTrigger.USERSPACE)
                fds.append(intr.fileno())
        try:
            self._set_irqs(SetIrqsKind.MSI_ENABLE, VfioPciIrqIndex.MSI, _EVENTFD_TRIGGER, 0, n, fds=fds)
        except VfioRequestError as e:  # host exhaustion: never a silent loss (vfio_msi_disable_common)
            self._msi_free_vectors()
            self._fail(0, e, SetIrqsKind.MSI_ENABLE, VfioPciIrqIndex.MSI)
            return
        self.msi_host_on = True
        for vec, t in zip(self.msi_vectors, targets, strict=True):
            vec.trigger = t

    def _msi_disable(self) -> None:
        """``vfio_msi_disable``: SET_IRQS(MSI, DATA_NONE|TRIGGER, count 0), every vector freed."""
        if self.msi_host_on:
            self.msi_host_on = False
            self._disable_index(SetIrqsKind.MSI_DISABLE, VfioPciIrqIndex.MSI)
        self._msi_free_vectors()

    def _disable_index(self, kind: SetIrqsKind, index: VfioPciIrqIndex) -> None:
        """SET_IRQS(index, DATA_NONE|TRIGGER, count 0): the whole index off in the host (its host
        vectors freed there).  A refusal is logged: the VMM's side is released either way."""
        try:
            self._set_irqs(kind, index, _NONE_TRIGGER, 0, 0)
        except VfioRequestError as e:
            log.warning("%s: disabling %s in the host: %s", self.name, index.name, e)

    def _msi_free_vectors(self) -> None:
        for vec in self.msi_vectors:
            self._free_vector(vec)
        self.msi_vectors = []

    def _msi_apply_masks(self) -> None:
        """The guest changed MSI mask bits: park a newly masked vector's trigger in the VMM's
        eventfd; for a newly unmasked one, point it back at the irqfd, then deliver a pending bit
        (or a signal still parked in the eventfd) once."""
        old, new = self._msi_guest_mask, self._msi_mask()
        for vec in self.msi_vectors:
            bit = 1 << vec.nr
            if not (old ^ new) & bit:
                continue
            if new & bit:
                self._park_masked_vector(vec, SetIrqsKind.MSI_VECTOR_SWITCH_TO_USERSPACE)
                continue
            if vec.kvm_interrupt is not None and vec.trigger != HostTrigger.IRQFD:
                try:
                    self._set_vector_trigger(vec, HostTrigger.IRQFD, SetIrqsKind.MSI_VECTOR_SWITCH_TO_IRQFD)
                except VfioRequestError as e:  # the trigger stays on the VMM's eventfd: still delivered
                    log.warning("%s: unmasking MSI vector %d in the host: %s", self.name, vec.nr, e)
            assert vec.interrupt is not None
            if vec.interrupt.test_and_clear():
                vec.userspace_interrupts += 1
                self._msi_set_pending(vec.nr, True)
            if self._msi_pending() & bit:
                self._msi_set_pending(vec.nr, False)
                self.msi_pending_delivered += 1
                self.msi_send(*self._msi_message(vec.nr))

    def _msi_interrupt(self, v: int) -> None:
        """Main loop: the host signalled MSI vector *v*'s userspace eventfd (``vfio_msi_interrupt``
        -> ``msi_notify``): pending bit if masked, else the message."""
        if not self.msi_host_on or v >= len(self.msi_vectors):
            return
        vec = self.msi_vectors[v]
        n = vec.interrupt
        if n is None or n.closed or not n.test_and_clear():
            return
        vec.userspace_interrupts += 1
        if self._msi_mask() >> v & 1:
            self._msi_set_pending(v, True)
        else:
            self.msi_send(*self._msi_message(v))

    def query_msi(self) -> dict:
        """The MSI part of ``x-query-vfio``: the guest's capability and the host's vectors."""
        if not self.msi_cap:
            return {"present": False}
        vectors = []
        for vec in self.msi_vectors:
            trig = {HostTrigger.IRQFD: vec.kvm_interrupt, HostTrigger.USERSPACE: vec.interrupt}.get(vec.trigger)
            vectors.append({"vector": vec.nr, "trigger": vec.trigger.value,
                            "trigger-fd": trig.fd if trig is not None and not trig.closed else -1,
                            "gsi": -1 if vec.gsi is None else vec.gsi, "message": list(self._msi_message(vec.nr)),
                            "irqfd": self._counters(vec.kvm_interrupt), "interrupt": self._counters(vec.interrupt),
                            "userspace-interrupts": vec.userspace_interrupts})
        addr, data = self._msi_message(0)
        return {"present": True, "guest-enabled": self.msi_enabled, "enabled": self.msi_host_on,
                "max-vectors": self.msi_max_vectors, "nr-vectors": len(self.msi_vectors) if self.msi_host_on else 0,
                "mme-vectors": self._msi_nr_vectors(), "address": addr, "data": data,
                "per-vector-mask": self._msi_maskbit, "mask": self._msi_mask(), "pending": self._msi_pending(),
                "pending-delivered": self.msi_pending_delivered, "vectors": vectors}

    # -- INTx ---------------------------------------------------------------------------------------
    def _bind_eventfd(self, kind: SetIrqsKind, index: VfioPciIrqIndex, flags: int, label: str, role: Role,
                      note: str) -> EventNotifier | None:
        """A new eventfd given to the host with SET_IRQS(index, start 0, count 1, *flags*) and
        registered with the machine's notifiers; None (logged) when the host refuses it."""
        n = EventNotifier(f"{self.name}.{label}")
        try:
            self._set_irqs(kind, index, flags, 0, 1, fds=[n.fileno()])
        except VfioRequestError as e:
            log.info("%s: the host refused the %s eventfd: %s", self.name, label, e)
            n.close()
            return None
        self.registry.register(n, self.name, role, note=note)
        return n

    def _drop_eventfd(self, n: EventNotifier | None) -> None:
        """Forget an eventfd bound with ``_bind_eventfd``: its main-loop handler, its registry entry, the fd."""
        if n is None:
            return
        if self.iothread is not None:
            self.iothread.remove_fd_handler(n.fileno())
        self.registry.unregister(n)
        n.close()

    def _enable_intx(self) -> None:
        info = self.irq_info.get(VfioPciIrqIndex.INTX)
        if self.intx_on or info is None or not info.count or not self.config[R.PCI_INTERRUPT_PIN]:
            return
        if self.msi_host_on or self.msix_host_on:  # one of INTx/MSI/MSI-X at a time
            return
        n = self._bind_eventfd(SetIrqsKind.INTX_ENABLE, VfioPciIrqIndex.INTX, _EVENTFD_TRIGGER, "intx", Role.GUEST,
                               "INTx trigger: read by the VMM into the INTx line")
        if n is None:
            return
        self._intx = n
        self.intx_on = True
        # the unmask eventfd (vfio's virqfd; KVM's resamplefd in QEMU): the EOI writes it and the
        # host unmasks the line without a message round trip.  Without it, EOI sends SET_IRQS UNMASK.
        self._intx_unmask = self._bind_eventfd(SetIrqsKind.INTX_UNMASK_FD, VfioPciIrqIndex.INTX, _EVENTFD_UNMASK,
                                               "intx-unmask", Role.HOST,
                                               "INTx unmask (resample): written by the VMM at EOI")
        if self.iothread is not None:
            self.iothread.set_fd_handler(n.fileno(), self._intx_interrupt)

    def _enable_req(self) -> None:
        """The host's request to release the device (vfio-pci's REQ, ``vfio_req_notifier_handler``):
        an eventfd the main loop reads; each signal calls ``on_request``, which asks the guest to
        unplug the function and then lets go of it."""
        info = self.irq_info.get(VfioPciIrqIndex.REQ)
        if info is None or not info.count or self.on_request is None:
            return
        n = self._bind_eventfd(SetIrqsKind.REQ_ENABLE, VfioPciIrqIndex.REQ, _EVENTFD_TRIGGER, "req", Role.REQ,
                               "the host asks the VMM to release the device")
        self._req = n
        if n is not None and self.iothread is not None:
            self.iothread.set_fd_handler(n.fileno(), self._req_interrupt)

    def _req_interrupt(self) -> None:
        n = self._req
        if n is None or n.closed or not n.test_and_clear():
            return
        self.req_requests += 1
        log.warning("%s: the host asks for the device back (REQ)", self.name)
        if self.on_request is not None:
            self.on_request({"device": self.name, "requests": self.req_requests})

    def _close_req(self) -> None:
        n, self._req = self._req, None
        self._drop_eventfd(n)

    def _disable_intx(self) -> None:
        if not self.intx_on:
            return
        self.intx_on = False
        try:
            self._set_irqs(SetIrqsKind.INTX_DISABLE, VfioPciIrqIndex.INTX, _NONE_TRIGGER, 0, 0)
        except VfioRequestError as e:
            log.warning("%s: disabling INTx in the host: %s", self.name, e)
        n, self._intx = self._intx, None
        self._drop_eventfd(n)
        u, self._intx_unmask = self._intx_unmask, None
        self._drop_eventfd(u)  # (no handler: removing none is a no-op)
        if self.intx_pending:
            self.intx_pending = False
            self.set_irq(0)

    def _intx_interrupt(self) -> None:
        """Main loop: the host raised INTx (and automasked it)."""
        n = self._intx
        if n is None or n.closed or not n.test_and_clear():
            return
        self.intx_interrupts += 1
        self.intx_pending = True
        self.set_irq(1)

    def _intx_eoi(self) -> None:
        """QEMU's userspace EOI: the guest touched the device while INTx was asserted."""
        self.intx_pending = False
        self.intx_eois += 1
        self.set_irq(0)
        if not self.intx_on:
            return
        if self._intx_unmask is not None:
            self._intx_unmask.set()
            self.intx_unmask_writes += 1
            return
        try:
            self._set_irqs(SetIrqsKind.INTX_UNMASK, VfioPciIrqIndex.INTX, _NONE_UNMASK, 0, 1)
        except VfioRequestError as e:
            log.warning("%s: INTx unmask: %s", self.name, e)

    # -- reset and close --------------------------------------------------------------------------------
    @property
    def closed(self) -> bool:
        return self._closed

    def _disable_interrupts(self) -> None:
        if self.msix is not None:
            self._msix_disable()
        self._msi_disable()
        self._disable_intx()

    def device_reset(self) -> None:
        """System reset or the guest's FLR (``vfio_pci_reset``): interrupts off, then DEVICE_RESET
        (none after the card's hot reset: the host reset the function already)."""
        if self._closed:
            return
        self._disable_interrupts()
        if self.hot_reset_done:
            self.hot_reset_done = False
            return
        try:
            self.client.reset()
        except VfioRequestError as e:
            log.warning("%s: DEVICE_RESET: %s", self.name, e)

    def reset(self) -> None:
        super().reset()
        if self.msi_cap:
            self._msi_reset_regs()
        if not self._closed:
            self._enable_intx()  # vfio_pci_post_reset

    def close(self) -> None:
        """Release everything: interrupts disabled in the host, notifiers and mappings closed, the
        connection closed.  Idempotent."""
        if self._closed:
            return
        if not self.client.closed.is_set():
            self._disable_interrupts()
        self._release_all()

    def _release_all(self) -> None:
        self._closed = True
        m = getattr(self, "msix", None)
        if m is not None:
            m.set_vector_notifiers(None, None, None)
        for vec in self.vectors:
            self._free_vector(vec)
        self.msix_host_on = False
        self._xen_unmap_all("close")  # (QEMU's xen_pt_msix_delete at unplug: every version)
        self._msi_free_vectors()
        self.msi_host_on = False
        n, self._intx = self._intx, None
        self._drop_eventfd(n)
        u, self._intx_unmask = self._intx_unmask, None
        self._drop_eventfd(u)  # (no handler: removing none is a no-op)
        self._close_req()
        self._close_err()
        self.intx_on = False
        for areas in self._sparse.values():
            for _o, _s, mm in areas:
                mm.close()
        self._sparse = {}
        client = getattr(self, "client", None)
        if client is not None:
            client.close()

    # -- what the monitor shows -------------------------------------------------------------------------
    @property
    def path(self) -> str:
        """The MSI-X path: ``"dynamic"`` (QEMU 8.2) or ``"noresize"`` (the old one)."""
        return "noresize" if self.noresize else "dynamic"

    @staticmethod
    def _counters(n: EventNotifier | None) -> dict | None:
        if n is None or n.closed:
            return None
        d = n.counters()  # peek: read without consuming
        d["fd"] = n.fd
        return d

    def query_pci_msix(self) -> dict:
        """``x-query-pci-msix``: the guest's view (table, masks, PBA) and the host's (per vector:
        where the host trigger points, both eventfds' counters read without consuming, the GSI)."""
        m = self.msix
        out: dict[str, Any] = {"device": self.name, "passthrough": True,
                               "guest": m.describe() if m is not None else None}
        host_vectors = []
        for vec in self.vectors:
            if not vec.use and vec.interrupt is None and vec.trigger == HostTrigger.NONE and vec.pirq is None:
                continue
            trig = self._trigger_notifier(vec, vec.trigger)
            hv: dict[str, Any] = {
                "vector": vec.nr, "use": vec.use, "trigger": vec.trigger.value,
                "trigger-fd": trig.fd if trig is not None else -1,
                "gsi": -1 if vec.gsi is None else vec.gsi,
                "irqfd": self._counters(vec.kvm_interrupt), "interrupt": self._counters(vec.interrupt),
                "userspace-interrupts": vec.userspace_interrupts,
            }
            if self.xen:
                hv["pirq"] = -1 if vec.pirq is None else vec.pirq
                hv["pirq-eventfd"] = self._counters(vec.pirq_notifier)
            host_vectors.append(hv)
        out["host"] = {"enabled": self.msix_host_on, "path": self.path, "nr-vectors": self.nr_vectors,
                       "vectors": host_vectors}
        return out

    def query_vfio(self) -> dict:
        """``x-query-vfio``: IRQ info per index, SET_IRQS counts by kind, the path and why, the
        negotiated vfio-user limits, the fatal error if any."""
        caps = self.client.server_caps
        irqs = {}
        for idx, info in self.irq_info.items():
            irqs[VfioPciIrqIndex(idx).name.lower()] = {"count": info.count, "flags": _irq_flags(info.flags)}
        return {
            "device": self.name, "socket": self.socket_path, "connected": not self.client.closed.is_set(),
            "irq-info": irqs, "set-irqs": dict(self.set_irqs_counts),
            "set-irqs-messages": self.client.stats.get("set-irqs-messages", 0),
            "path": self.path, "noresize-reason": self.noresize_reason,
            "msix-enabled": self.msix_host_on, "nr-vectors": self.nr_vectors, "msi": self.query_msi(),
            "intx": {"enabled": self.intx_on, "asserted": self.intx_pending, "interrupts": self.intx_interrupts,
                     "eois": self.intx_eois, "eventfd": self._counters(self._intx),
                     "unmask-eventfd": self._counters(self._intx_unmask), "unmask-writes": self.intx_unmask_writes},
            "req": {"registered": self._req is not None, "requests": self.req_requests},
            "max-msg-fds": caps.max_msg_fds, "max-data-xfer-size": caps.max_data_xfer_size,
            "twin-socket": self.client.twin is not None, "dma": self.dma_mode.value,
            "dma-maps": [{"iova": a, "size": s} for a, s in self._dma_maps],
            "dma-messages": {"read": self.ram_dma.reads, "write": self.ram_dma.writes},
            "regions": [{"index": i, "size": r.size, "flags": r.flags,
                         "mmapped": [{"offset": o, "size": s} for o, s, _ in self._sparse.get(i, [])]}
                        for i, r in sorted(self._regions.items())],
            "fatal": self.fatal, "errors": list(self.errors),
            "xen": {"enabled": True, "unmap-on-disable": self.faults.fix_on(XEN_UNMAP_ON_DISABLE),
                    "lapic-unmasks": self.xen_lapic_unmasks, "errors": list(self.xen_errors),
                    "vectors": self.query_xen()} if self.xen else {"enabled": False},
        }

    def host_trigger(self, vector: int) -> tuple[str, EventNotifier | None]:
        """Where a host interrupt of MSI-X *vector* goes now, routed as vfio-pci routes it: while
        host MSI-X is on, the vector's trigger (``"irqfd"`` or ``"interrupt"``, the VMM's eventfd;
        ``"none"`` when the vector is not wired: vfio-pci drops the interrupt); while host MSI-X is
        off, the INTx trigger (``"intx"``) if INTx is on, otherwise ``"none"``.  While host MSI is
        on, *vector* is an MSI vector."""
        if self.msix_host_on or self.msi_host_on:
            vectors = self.vectors if self.msix_host_on else self.msi_vectors
            if not 0 <= vector < len(vectors):
                return HostTrigger.NONE.value, None
            vec = vectors[vector]
            n = self._trigger_notifier(vec, vec.trigger)
            if n is None:
                return HostTrigger.NONE.value, None
            return vec.trigger.value, n
        n = self._intx
        if self.intx_on and n is not None and not n.closed:
            return "intx", n
        return HostTrigger.NONE.value, None

    def inject_host_interrupt(self, vector: int) -> str:
        """Raise a host interrupt on *vector* as the host function would (``x-debug-device-event``):
        signal the eventfd the host trigger points at now (``host_trigger``), so a masked vector
        gets its PBA bit through the VMM's eventfd and an unmasked one reaches the guest through
        its irqfd.  Returns where it went; ``VfioDeviceError`` (kind ``not-wired``) when the host
        would drop it."""
        where, n = self.host_trigger(vector)
        if n is None:
            what = (f"MSI-X vector {vector} is not wired in the host" if self.msix_host_on else
                    f"MSI vector {vector} is not enabled in the host" if self.msi_host_on else
                    "neither MSI-X, MSI nor INTx is enabled in the host")
            raise VfioDeviceError("not-wired", f"{self.name}: {what}: vfio-pci would drop the interrupt")
        n.set()
        return where

    def query_aer(self) -> dict:
        """The guest's view of this function's AER capability and the VMM's error handling: the
        ERR eventfd (counter read without consuming), the policy, what the VMM did with each
        error, the card's hot resets."""
        return {"aer": self.aer.describe() if self.aer is not None else None,
                "state": self.aer_state(),
                "policy": "forward-non-fatal" if self.aer_forwarding else "stop-on-error",
                "err-eventfd": self._counters(self._err), "err-signals": self.err_signals,
                "host-aer-offset": self.host_aer_offset, "events": list(self.aer_events),
                "hot-resets": self.hot_resets,
                "hot-reset-offer": str(self.hot_reset_offer.address) if self.hot_reset_offer is not None else None}

    def describe(self) -> dict:
        d = super().describe()
        d["vfio"] = self.query_vfio()
        d["msix"] = self.query_pci_msix()
        return d
