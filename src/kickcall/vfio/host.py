"""The host kernel's side of a passthrough function: vfio-pci and the PCI/MSI core, modelled.

``VfioPciDevice`` is the vfio-pci instance bound to a ``NicFunction`` (Linux's
``vfio_pci_core_device``): the device, region and IRQ ioctls with vfio-pci's validation, errnos
and dispatch (``drivers/vfio/pci/vfio_pci_core.c``, ``vfio_pci_intrs.c``, ``vfio_pci_config.c``;
re-implemented from their described behaviour, no code copied), the host's interrupt vectors
(``HostIrqPool``) and what the PCI/MSI core writes into the function's MSI and MSI-X registers.
The vfio-user server (``kickcall.vfio.server``) calls it, one method per message.

What the server calls, and when:

* ``get_device_info()``, ``get_region_info(i)``, ``get_irq_info(i)``: DEVICE_GET_INFO,
  DEVICE_GET_REGION_INFO (the fd returned with BAR4 is the function's; send it, do not close it),
  DEVICE_GET_IRQ_INFO;
* ``region_read(i, off, n)``, ``region_write(i, off, data)``: REGION_READ/REGION_WRITE;
* ``set_irqs(irq_set, fds)``: DEVICE_SET_IRQS; *fds* are the fds that came with the message (the
  server closes its copies after the call: every fd kept here is a ``dup``) or ``[]`` for none;
* ``reset()``: DEVICE_RESET; ``release(reset=...)``: the client disconnected;
* ``nic.set_dma(space)``: after DMA_MAP/DMA_UNMAP changed what the device may reach (None: no
  client); ``request_release()``: ask the client to let the device go (REQ);
* ``describe()``: ``x-query-vfio``; ``faults``: ``x-debug-fault``; ``close()``: at exit.

Errors are ``VfioError`` whose ``errno`` is what the reply carries.

Interrupt paths, as on Linux:

* MSI-X: the first EVENTFD TRIGGER enables the index with ``start + count`` vectors
  (``vfio_msi_enable`` -> ``pci_alloc_irq_vectors``): that many host vectors from the pool, their
  table entries written (address 0xfee00000, data = the host irq number) and left masked, MSI-X
  enabled, DisINTx set (``pci_intx_for_msi``).  A vector gets a trigger: its entry is re-written
  and unmasked (``request_irq``); it loses it (fd -1, or de-assign): masked again (``free_irq``).
  So an interrupt on a vector with no trigger latches in the function's PBA and is delivered once
  when a trigger is set.  On the dynamic path (``dynamic_msix``: GET_IRQ_INFO without NORESIZE) a
  vector with no host vector yet gets one in place (``pci_msix_alloc_irq_at``), nothing else is
  touched; on the NORESIZE path it is EINVAL: the client must disable and re-enable the index.
  Host vectors stay allocated until the index is disabled (vfio-pci keeps them as a cache).
* MSI: likewise with ``start + count`` vectors, MME = ceil(log2), per-vector mask bits; never
  resizable.
* INTx: the trigger, automask through DisINTx (``pci_check_and_mask_intx``: the level stays,
  the pin drops), unmask by SET_IRQS or by the unmask eventfd (polled by the ``kc-vfio-virqfd``
  thread); an unmask with the level still asserted fires once more.  INTx asserted while the INTx
  index is not enabled (nothing enabled: DisINTx clear, e.g. inside the NORESIZE window) is
  counted ``intx-unhandled``: the host's "nobody cared" interrupt.
* ERR and REQ: one trigger each (``vfio_pci_set_ctx_trigger_single``); ``request_release`` and
  ``signal_error`` signal them.

Pool exhaustion: ``vfio_msi_enable`` asks ``pci_alloc_irq_vectors(1, nvec)``; when fewer than
*nvec* are free, vfio-pci frees what it got and the ioctl returns the *positive* number it could
have had (QEMU's MSI path retries with it); with none free, -ENOSPC.  A vfio-user reply carries
only an errno, so both are ENOSPC here, and ``VfioError.available`` (and ``describe()``'s
``last-refusal``) carries the count.  The dynamic path's ``pci_msix_alloc_irq_at`` failing is
ENOSPC too.

Config space, as vfio-pci virtualizes it (``vfio_pci_config.c``): Command's INTX_DISABLE is
virtual (the user's copy; setting it masks INTx, as ``virq_disabled``); MSI's control (Enable,
MME), address, data and mask bits and MSI-X's Enable and Function Mask are virtual: the user reads
back what it wrote and the function is not touched -- SET_IRQS enables MSI/MSI-X.  (vfio-pci
passes MSI's mask bits through when the function has them; here they are virtual too, so that a
user's write cannot unmask a vector the host keeps masked.)  Initiate FLR in Device Control
resets the function through the host (``pci_try_reset_function``: config header saved and
restored, the host's MSI/MSI-X state re-written).  Everything else goes through the function's
write masks.  BAR4's MSI-X table reads as all-ones and drops writes (vfio-pci's excluded range);
the PBA reads the function's pending bits.

PCIe errors: vfio-pci's ``pci_error_handlers`` (``kickcall.pci.recovery.PciErrorHandlers``), called by
the host's AER service (``kickcall.vfio.host_aer``, thread ``kc-aer``) in ``pcie_do_recovery``:

* ``error_detected(state)`` signals the ERR trigger if the user registered one (the count means
  nothing: "look") and returns ``CAN_RECOVER``; ``io_perm_failure`` marks the device failed.
* **The user's view of the error.**  Cao's 2016 RFC signalled the status value through the
  eventfd; here the eventfd only says "look" and the status is in the user's CONFIG region:
  ``error_detected`` latches the function's AER registers (uncorrectable status, severity,
  correctable status, the First Error Pointer in Capabilities and Control, the header log) into a
  virtual copy, and the user's reads of the AER capability (0x100..0x147) return the latched
  values, while the host clears the live registers when it resumes the device.  The user's RW1C
  write to the uncorrectable (0x104) or correctable (0x110) status clears latched bits (and the
  live ones).  An error is **unhandled** from ``error_detected`` until the user has cleared every
  latched status bit, or does DEVICE_RESET, or a hot reset; a client that disconnects with an
  unhandled error has its function reset before the next client gets it (a bus reset if the
  function is frozen, else an FLR: switch ``aer-reset-on-release``), even without
  ``reset_on_disconnect`` (mst's suggestion in seed 004).
* **The access gate.**  From the start of the host's secondary bus reset until its recovery ends
  (``gate_close``/``gate_open``), the user's REGION_READ/REGION_WRITE, SET_IRQS, DEVICE_RESET and
  hot reset wait instead of reading all-F's, at most ``recovery_wait_ms`` (below the client's
  30 s reply timeout), then go on; once the device is failed (it never came back) they fail with
  EIO, now and later (switch ``aer-access-gate``: off, they reach the device during the link reset
  and read all-F's).
* A secondary bus reset (the host's recovery, a release, a hot reset) saves each function's
  config and restores it with the user's interrupt setup afterwards (``prepare_bus_reset`` /
  ``bus_reset_done``, as ``pci_reset_bus`` with save/restore).

Locking: one lock for all host and device state, the function's ``lock`` (an RLock) and its
``cond``.  Taken by the server's thread(s) for every call here, by ``kc-nic-engine`` to reserve
ring slots and to commit and raise a batch (never across its DMA write), by ``kc-vfio-virqfd``
to unmask INTx.  Eventfd writes (``eventfd_signal``) happen with it held; a DMA write never does.
``HostIrqPool`` has its own leaf lock (it may be shared by several devices).
"""

from __future__ import annotations

import enum
import errno
import logging
import os
import select
import threading
import time
from collections import Counter
from dataclasses import dataclass
from typing import Callable, Protocol, Sequence

from ..faults import Fault, FaultAction, FaultKind, FaultRegistry
from ..notify import NotifierError, peek_fd
from ..pci import regs as R
from ..pci.aer import (PCI_ERR_CAP, PCI_ERR_COR_MASK, PCI_ERR_COR_STATUS, PCI_ERR_HEADER_LOG,
                       PCI_ERR_SIZEOF, PCI_ERR_UNCOR_MASK, PCI_ERR_UNCOR_SEVER, PCI_ERR_UNCOR_STATUS)
from ..pci.recovery import PciChannelState, PciErsResult
from ..pci.regs import PCI_MSI_ADDRESS_LO, PCI_MSI_FLAGS, PCI_MSI_FLAGS_ENABLE, PCI_MSI_FLAGS_QSIZE, PCI_MSI_PENDING_64
from ..threads import start_thread
from .nic import BAR0_SIZE, MSIX_BAR, NicFunction, RecordFlag
from .uapi import (VFIO_IRQ_SET_ACTION_TYPE_MASK, VFIO_IRQ_SET_DATA_TYPE_MASK, VFIO_PCI_NUM_IRQS,
                   VFIO_PCI_NUM_REGIONS, SparseMmapArea, VfioDeviceFlag, VfioDeviceInfo, VfioIrqInfo,
                   VfioIrqInfoFlag, VfioIrqSet, VfioIrqSetFlag, VfioPciIrqIndex, VfioPciRegion,
                   VfioRegionInfo, VfioRegionInfoFlag)

__all__ = ["VfioError", "VfioReason", "DmaSpace", "HostIrqPool", "VfioPciDevice", "MsixWindowFault",
           "FAULT_MSIX_WINDOW", "MSI_ADDRESS", "IRQ_SET_MINSZ", "SWITCH_ACCESS_GATE", "SWITCH_RESET_ON_RELEASE",
           "RecoveryState", "DEFAULT_RECOVERY_WAIT_MS"]

log = logging.getLogger("kickcall.vfio.host")

#: the x86 MSI address the host programs (destination and mode bits left 0)
MSI_ADDRESS = 0xFEE00000
#: MSI's data: this base with the vector in the low MME bits (aligned to 32)
MSI_DATA_BASE = 0x8000
#: ``offsetofend(struct vfio_irq_set, count)``
IRQ_SET_MINSZ = 20
FAULT_MSIX_WINDOW = "fire-in-msix-disable-window"
SWITCH_ACCESS_GATE = "aer-access-gate"
SWITCH_RESET_ON_RELEASE = "aer-reset-on-release"
#: how long a user access waits for the host's link reset (below the client's 30 s reply timeout)
DEFAULT_RECOVERY_WAIT_MS = 10000
#: the AER registers vfio-pci latches into the user's view: (offset in the capability, size)
_LATCHED = ((PCI_ERR_UNCOR_STATUS, 4), (PCI_ERR_UNCOR_SEVER, 4), (PCI_ERR_COR_STATUS, 4), (PCI_ERR_CAP, 4),
            (PCI_ERR_HEADER_LOG, 16))


class RecoveryState(enum.StrEnum):
    """A function's error-recovery state, as ``x-query-pci-aer`` shows it."""

    IDLE = "idle"
    RECOVERING = "recovering"
    LINK_DOWN = "link-down"
    FAILED = "failed"


class VfioReason(enum.StrEnum):
    """Why a call failed (the errno says what the client sees; this says which rule)."""

    BAD_ARGSZ = "bad-argsz"
    BAD_INDEX = "bad-index"
    BAD_FLAGS = "bad-flags"
    BAD_RANGE = "bad-range"
    BAD_DATA = "bad-data"
    BAD_FDS = "bad-fds"
    NOT_SUPPORTED = "not-supported"
    WRONG_STATE = "wrong-state"
    NO_VECTOR = "no-vector"
    NO_SPACE = "no-space"
    BAD_FD = "bad-fd"
    FAULT = "fault"
    NO_DEVICE = "no-device"


class VfioError(Exception):
    """A VFIO call refused: ``errno`` is the value the server puts in the reply."""

    def __init__(self, errno_value: int, message: str, reason: VfioReason = VfioReason.BAD_DATA, *,
                 available: int | None = None) -> None:
        super().__init__(message)
        self.errno = errno_value
        self.reason = reason
        self.available = available

    def __str__(self) -> str:
        return f"{errno.errorcode.get(self.errno, str(self.errno))}: {self.args[0]}"


class DmaSpace(Protocol):
    """What the function reaches by DMA: the client's memory (mmapped DMA regions, or DMA_READ /
    DMA_WRITE messages).  Both raise ``VfioError(EFAULT)`` for an address that is not mapped."""

    def dma_write(self, iova: int, data: bytes) -> None: ...

    def dma_read(self, iova: int, n: int) -> bytes: ...


class HostIrqPool:
    """The host's interrupt vectors (Linux irqs), finite and shared by every device of a server.

    ``alloc(n)`` is all-or-nothing: fewer than *n* free -> ``VfioError(ENOSPC)`` with
    ``available`` = the free count (``vfio_msi_enable`` fails when ``pci_alloc_irq_vectors``
    gives fewer than asked; ``pci_msix_alloc_irq_at`` fails on the dynamic path)."""

    def __init__(self, size: int, first_irq: int = 64) -> None:
        if size < 0:
            raise ValueError("pool size must be >= 0")
        self.size = size
        self.first_irq = first_irq
        self._mu = threading.Lock()
        self._free = list(range(first_irq + size - 1, first_irq - 1, -1))  # pop() gives the lowest
        self.allocs = 0
        self.frees = 0
        self.refused = 0
        self.refused_vectors = 0
        self.high_water = 0

    @property
    def available(self) -> int:
        with self._mu:
            return len(self._free)

    @property
    def allocated(self) -> int:
        with self._mu:
            return self.size - len(self._free)

    def alloc(self, n: int = 1) -> list[int]:
        with self._mu:
            if n > len(self._free):
                self.refused += 1
                self.refused_vectors += n
                raise VfioError(errno.ENOSPC, f"host irq pool: {n} vectors asked, {len(self._free)} free",
                                VfioReason.NO_SPACE, available=len(self._free))
            got = [self._free.pop() for _ in range(n)]
            self.allocs += n
            self.high_water = max(self.high_water, self.size - len(self._free))
            return got

    def free(self, irqs: Sequence[int]) -> None:
        with self._mu:
            for irq in irqs:
                if not self.first_irq <= irq < self.first_irq + self.size or irq in self._free:
                    raise ValueError(f"irq {irq} is not allocated from this pool")
                self._free.append(irq)
                self.frees += 1
            self._free.sort(reverse=True)

    def describe(self) -> dict:
        with self._mu:
            return {"size": self.size, "free": len(self._free), "allocated": self.size - len(self._free),
                    "high-water": self.high_water, "allocs": self.allocs, "frees": self.frees,
                    "refused": self.refused, "refused-vectors": self.refused_vectors}


class MsixWindowFault(Fault):
    """``fire-in-msix-disable-window``: when on, the moment the MSI-X index is disabled by
    SET_IRQS, every enabled queue writes one record and raises its interrupt while MSI-X is off
    (before the reply goes out, so before the client can re-enable): the NORESIZE path's lost
    interrupts, made deterministic.  Actions ``on`` and ``off``."""

    kind = FaultKind.INJECTED
    actions = (FaultAction.FIX_ON, FaultAction.FIX_OFF)  # values "on" / "off": the fault, not a fix

    def __init__(self) -> None:
        super().__init__(FAULT_MSIX_WINDOW, "on: when SET_IRQS disables MSI-X, every enabled queue writes one "
                         "record and raises its interrupt inside the disable->re-enable window (lost, or INTx)")
        self.on = False
        self.fired = 0
        self.records = 0

    def arm(self, action: FaultAction, queue: int | None = None) -> dict:
        self._check(action)
        self.on = action is FaultAction.FIX_ON
        return {"fault": self.name, "action": action.value, "on": self.on}

    def state(self) -> dict:
        return {"on": self.on, "fired": self.fired, "records": self.records}


@dataclass
class HostVector:
    """One MSI/MSI-X vector the host allocated (vfio's ctx, when it has a trigger)."""

    vector: int
    irq: int
    trigger: int | None = None  # our dup of the user's eventfd
    signals: int = 0
    spurious: int = 0  # a message arrived with no trigger (cannot happen while the host masks it)


def _name(e: int) -> str:
    return errno.errorcode.get(e, str(e))


class VfioPciDevice:
    """vfio-pci bound to a kickcall-nic function (see the module docstring)."""

    def __init__(self, nic: NicFunction, pool: HostIrqPool, *, dynamic_msix: bool = True,
                 name: str | None = None, start: bool = True) -> None:
        self.nic = nic
        self.pool = pool
        self.name = name or nic.name
        self.dynamic_msix = dynamic_msix
        self.lock = nic.lock
        self.faults = FaultRegistry(self.name)
        self.window_fault = MsixWindowFault()
        self.faults.add(self.window_fault)
        self.gate_switch = self.faults.switch(
            SWITCH_ACCESS_GATE, "off: while the host resets the link after a PCIe error, the user's region "
            "accesses, SET_IRQS and resets reach the device and read all-F's (no wait), and a device that "
            "never came back is not refused")
        self.release_switch = self.faults.switch(
            SWITCH_RESET_ON_RELEASE, "off: a function released with an unhandled PCIe error goes to the next "
            "client as it is (the stale error status in its AER registers, frozen if the error was fatal)")
        # PCIe errors (see the module docstring)
        self.recovery_wait_ms = DEFAULT_RECOVERY_WAIT_MS
        self.unhandled = False
        self.failed = False
        self.recovery_state = RecoveryState.IDLE
        self._aer_latch: bytearray | None = None
        self._gate = threading.Condition(threading.Lock())
        self._link_reset = False
        self.gate_waits = 0
        self.gate_wait_max_ms = 0.0
        self.gate_refusals = 0
        self.bus_reset_request: Callable[[str], bool] | None = None
        """Set by the host's AER service: a secondary bus reset of the port above this function
        (True: every function came back); used to reset a frozen function on release."""
        self.error_log: list[dict] = []
        self.irq_type: VfioPciIrqIndex | None = None
        self._vectors: dict[int, HostVector] = {}
        self._irq_to_vector: dict[int, int] = {}
        self._msi_nvec = 0
        self._intx_trigger: int | None = None
        self._intx_unmask_fd: int | None = None
        self._unmask_gen = 0
        self._intx_masked = False
        self._virq_disabled = False
        self._err_trigger: int | None = None
        self._req_trigger: int | None = None
        # counts
        self.set_irqs_by_kind: Counter[str] = Counter()
        self.set_irqs_by_result: Counter[str] = Counter()
        self.counts: Counter[str] = Counter()
        self.last_refusal: dict | None = None
        # config virtualization
        self._vconfig = bytearray(nic.config_size)
        self._vmask = bytearray(nic.config_size)
        self._init_vconfig()
        # the INTx unmask eventfd's poller
        self._wake_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._virqfd: threading.Thread | None = None
        self._closing = False
        nic.set_sink(self)
        if start:
            nic.start()

    # -- small helpers -------------------------------------------------------------------------------
    def _set_virtual(self, off: int, size: int, mask: int) -> None:
        for i in range(size):
            self._vmask[off + i] = (mask >> (8 * i)) & 0xFF

    def _init_vconfig(self) -> None:
        self._vconfig[:] = bytes(len(self._vconfig))
        self._vmask[:] = bytes(len(self._vmask))
        self._set_virtual(R.PCI_COMMAND, 2, R.PCI_COMMAND_INTX_DISABLE)
        c = self.nic.msi_cap
        self._set_virtual(c + PCI_MSI_FLAGS, 2, PCI_MSI_FLAGS_ENABLE | PCI_MSI_FLAGS_QSIZE)
        self._set_virtual(c + PCI_MSI_ADDRESS_LO, 10, (1 << 80) - 1)  # address lo/hi, data
        self._set_virtual(c + PCI_MSI_ADDRESS_LO + 12, 4, 0xFFFFFFFF)  # mask bits
        self._set_virtual(self.nic.msix_cap + R.PCI_MSIX_FLAGS, 2,
                          R.PCI_MSIX_FLAGS_ENABLE | R.PCI_MSIX_FLAGS_MASKALL)
        self._virq_disabled = False

    def _take_eventfd(self, fd: int) -> int:
        """``eventfd_ctx_fdget``: our own reference (a dup) to the user's eventfd."""
        try:
            peek_fd(fd)
        except NotifierError:
            raise VfioError(errno.EINVAL, f"fd {fd} is not an eventfd", VfioReason.BAD_FD) from None
        except (OSError, ValueError):
            raise VfioError(errno.EBADF, f"fd {fd} is not open", VfioReason.BAD_FD) from None
        try:
            return os.dup(fd)
        except OSError:
            raise VfioError(errno.EBADF, f"fd {fd} is not open", VfioReason.BAD_FD) from None

    def _signal(self, fd: int | None, what: str) -> bool:
        """``eventfd_signal``."""
        if fd is None:
            self.counts[f"{what}-no-trigger"] += 1
            return False
        try:
            os.eventfd_write(fd, 1)
        except OSError:
            self.counts["signal-errors"] += 1
            return False
        self.counts[f"{what}-signals"] += 1
        return True

    @staticmethod
    def _close(fd: int | None) -> None:
        if fd is not None:
            os.close(fd)

    # -- device and region info --------------------------------------------------------------------
    def get_device_info(self) -> VfioDeviceInfo:
        """``VFIO_DEVICE_GET_INFO``: RESET|PCI, 9 regions, 5 IRQ indexes."""
        return VfioDeviceInfo(argsz=VfioDeviceInfo.STRUCT.size, flags=VfioDeviceFlag.RESET | VfioDeviceFlag.PCI,
                              num_regions=VFIO_PCI_NUM_REGIONS, num_irqs=VFIO_PCI_NUM_IRQS)

    def _region_size(self, index: int) -> int:
        if index == VfioPciRegion.CONFIG:
            return self.nic.config_size
        if index == VfioPciRegion.BAR0:
            return BAR0_SIZE
        if index == MSIX_BAR:
            return self.nic.bar4_size
        return 0

    def get_region_info(self, index: int) -> tuple[VfioRegionInfo, int | None]:
        """``VFIO_DEVICE_GET_REGION_INFO``: the info and the fd to mmap (BAR4's memfd, owned by the
        function: send it, do not close it), or None.  Unimplemented BARs and the ROM have size 0;
        VGA is EINVAL (not a VGA device), as is an index >= 9."""
        if not 0 <= index < VFIO_PCI_NUM_REGIONS or index == VfioPciRegion.VGA:
            raise VfioError(errno.EINVAL, f"no region {index}", VfioReason.BAD_INDEX)
        size = self._region_size(index)
        info = VfioRegionInfo(index=index, size=size)
        if size:
            info.flags = VfioRegionInfoFlag.READ | VfioRegionInfoFlag.WRITE
        if index == MSIX_BAR:
            info.flags |= VfioRegionInfoFlag.MMAP
            info.sparse = [SparseMmapArea(off, sz) for off, sz in self.nic.bar4_mmap_areas()]
            info.offset = 0
            info.argsz = len(info.pack())
            return info, self.nic.bar4_memfd
        return info, None

    def _check_range(self, index: int, offset: int, count: int) -> int:
        if not 0 <= index < VFIO_PCI_NUM_REGIONS:
            raise VfioError(errno.EINVAL, f"no region {index}", VfioReason.BAD_INDEX)
        size = self._region_size(index)
        if count < 0 or offset < 0 or offset + count > size:
            raise VfioError(errno.EINVAL, f"region {index}: {count} bytes at {offset:#x} outside its {size:#x}",
                            VfioReason.BAD_RANGE)
        return size

    def region_read(self, index: int, offset: int, count: int) -> bytes:
        """``REGION_READ``: config (virtualized; the AER capability shows a latched error),
        BAR0 registers, BAR4 (table all-ones, PBA, memory).  Waits while the host resets the link."""
        self._check_range(index, offset, count)
        self.gate_wait("REGION_READ")
        with self.lock:
            if index == VfioPciRegion.CONFIG:
                if not self.nic.accessible:
                    return self._overlay_latch(offset, bytearray(b"\xff" * count))
                phys = self.nic.config[offset:offset + count]
                return self._overlay_latch(offset, bytearray(
                    (p & ~m & 0xFF) | (v & m) for p, v, m in
                    zip(phys, self._vconfig[offset:offset + count], self._vmask[offset:offset + count], strict=True)))
            if index == VfioPciRegion.BAR0:
                return self.nic.bar0_read(offset, count)
            if index == MSIX_BAR:
                data = bytearray(self.nic.bar4_read(offset, count))
                t_end = len(self.nic.msix_table)
                for i in range(max(0, min(count, t_end - offset))):
                    data[i] = 0xFF
                return bytes(data)
            return b""

    def region_write(self, index: int, offset: int, data: bytes) -> None:
        """``REGION_WRITE`` (waits while the host resets the link)."""
        self._check_range(index, offset, len(data))
        self.gate_wait("REGION_WRITE")
        with self.lock:
            if index == VfioPciRegion.CONFIG:
                self._config_write(offset, bytes(data))
            elif index == VfioPciRegion.BAR0:
                self.nic.bar0_write(offset, bytes(data))
            elif index == MSIX_BAR:
                t_end = len(self.nic.msix_table)
                if offset < t_end:
                    self.counts["msix-table-writes-dropped"] += 1
                    skip = min(len(data), t_end - offset)
                    offset, data = offset + skip, data[skip:]
                if data:
                    self.nic.bar4_write(offset, bytes(data))

    def _config_write(self, offset: int, data: bytes) -> None:
        nic = self.nic
        self._latch_rw1c(offset, data)
        for i, b in enumerate(data):
            a = offset + i
            m = self._vmask[a]
            self._vconfig[a] = (self._vconfig[a] & ~m & 0xFF) | (b & m)
        merged = bytearray((nic.config[offset + i] & self._vmask[offset + i]) | (b & ~self._vmask[offset + i] & 0xFF)
                           for i, b in enumerate(data))
        flr = False
        if nic.exp_cap:
            hi = nic.exp_cap + R.PCI_EXP_DEVCTL + 1  # Initiate FLR is bit 15
            if offset <= hi < offset + len(data) and merged[hi - offset] & (R.PCI_EXP_DEVCTL_BCR_FLR >> 8):
                merged[hi - offset] &= ~(R.PCI_EXP_DEVCTL_BCR_FLR >> 8) & 0xFF
                flr = True
        a = offset
        while a < offset + len(merged):
            n = min(4 - (a & 3), offset + len(merged) - a)
            nic.config_write(a, int.from_bytes(merged[a - offset:a - offset + n], "little"), n)
            a += n
        virt_disintx = bool(int.from_bytes(self._vconfig[R.PCI_COMMAND:R.PCI_COMMAND + 2], "little")
                            & R.PCI_COMMAND_INTX_DISABLE)
        if virt_disintx and not self._virq_disabled:
            self._virq_disabled = True
            self._intx_mask()
        elif not virt_disintx and self._virq_disabled:
            self._virq_disabled = False
            self._intx_unmask()
        if flr:
            self.counts["user-flr"] += 1
            self._reset_function(restore=True)

    # -- IRQ info ----------------------------------------------------------------------------------
    def irq_count(self, index: int) -> int:
        """``vfio_pci_get_irq_count``."""
        nic = self.nic
        if index == VfioPciIrqIndex.INTX:
            return 1 if nic.config[R.PCI_INTERRUPT_PIN] else 0
        if index == VfioPciIrqIndex.MSI:
            return nic.msi_vectors
        if index == VfioPciIrqIndex.MSIX:
            return nic.nvectors
        if index == VfioPciIrqIndex.ERR:
            return 1 if nic.pcie else 0
        if index == VfioPciIrqIndex.REQ:
            return 1
        return 0

    def get_irq_info(self, index: int) -> VfioIrqInfo:
        """``VFIO_DEVICE_GET_IRQ_INFO`` as ``vfio_pci_ioctl_get_irq_info`` reports it."""
        if not 0 <= index < VFIO_PCI_NUM_IRQS or (index == VfioPciIrqIndex.ERR and not self.nic.pcie):
            raise VfioError(errno.EINVAL, f"no IRQ index {index}", VfioReason.BAD_INDEX)
        flags = VfioIrqInfoFlag.EVENTFD
        if index == VfioPciIrqIndex.INTX:
            flags |= VfioIrqInfoFlag.MASKABLE | VfioIrqInfoFlag.AUTOMASKED
        elif not (index == VfioPciIrqIndex.MSIX and self.dynamic_msix):
            flags |= VfioIrqInfoFlag.NORESIZE
        return VfioIrqInfo(argsz=VfioIrqInfo.STRUCT.size, flags=int(flags), index=index, count=self.irq_count(index))

    # -- SET_IRQS ----------------------------------------------------------------------------------
    def set_irqs(self, irq_set: VfioIrqSet, fds: Sequence[int] = ()) -> None:
        """``VFIO_DEVICE_SET_IRQS`` with vfio-pci's validation and dispatch.

        *fds*: the eventfds that came with the message, one per sub-index (``len == count``), or
        none: DATA_EVENTFD with no fds de-assigns every sub-index of the range (fd -1 each), and on
        an MSI/MSI-X index not enabled yet enables it with nothing wired (QEMU's fd -1 enable).
        Raises ``VfioError``; a call that fails part-way is rolled back as vfio-pci does."""
        kind = self._kind(irq_set)
        self.gate_wait("SET_IRQS")
        self.set_irqs_by_kind[kind] += 1
        try:
            with self.lock:
                post = self._set_irqs_locked(irq_set, list(fds))
        except VfioError as e:
            self.set_irqs_by_result[_name(e.errno)] += 1
            raise
        self.set_irqs_by_result["ok"] += 1
        if post is not None:
            post()

    @staticmethod
    def _kind(s: VfioIrqSet) -> str:
        try:
            index = VfioPciIrqIndex(s.index).name
        except ValueError:
            index = str(s.index)
        action = "|".join(f.name or "" for f in VfioIrqSetFlag if f & s.flags & VFIO_IRQ_SET_ACTION_TYPE_MASK)
        data = "|".join(f.name or "" for f in VfioIrqSetFlag if f & s.flags & VFIO_IRQ_SET_DATA_TYPE_MASK)
        return f"{index}/{action.removeprefix('ACTION_') or '-'}/{data.removeprefix('DATA_') or '-'}"

    def _set_irqs_locked(self, s: VfioIrqSet, fds: list[int]) -> Callable[[], None] | None:
        # vfio_set_irqs_validate_and_prepare
        if s.argsz < IRQ_SET_MINSZ:
            raise VfioError(errno.EINVAL, f"argsz {s.argsz} < {IRQ_SET_MINSZ}", VfioReason.BAD_ARGSZ)
        if s.index >= VFIO_PCI_NUM_IRQS:
            raise VfioError(errno.EINVAL, f"index {s.index} >= {VFIO_PCI_NUM_IRQS}", VfioReason.BAD_INDEX)
        if s.count >= 0xFFFFFFFF - s.start:
            raise VfioError(errno.EINVAL, f"start {s.start} + count {s.count} overflows", VfioReason.BAD_RANGE)
        if s.flags & ~int(VFIO_IRQ_SET_DATA_TYPE_MASK | VFIO_IRQ_SET_ACTION_TYPE_MASK):
            raise VfioError(errno.EINVAL, f"unknown flags {s.flags:#x}", VfioReason.BAD_FLAGS)
        num = self.irq_count(s.index)
        if s.start >= num or s.start + s.count > num:
            raise VfioError(errno.EINVAL, f"[{s.start}, {s.start + s.count}) outside the index's {num}",
                            VfioReason.BAD_RANGE)
        data_type = s.flags & VFIO_IRQ_SET_DATA_TYPE_MASK
        if data_type not in (VfioIrqSetFlag.DATA_NONE, VfioIrqSetFlag.DATA_BOOL, VfioIrqSetFlag.DATA_EVENTFD):
            raise VfioError(errno.EINVAL, "exactly one DATA type", VfioReason.BAD_FLAGS)
        if data_type == VfioIrqSetFlag.DATA_BOOL and (s.argsz - IRQ_SET_MINSZ < s.count or len(s.data) < s.count):
            raise VfioError(errno.EINVAL, f"DATA_BOOL: {s.count} bytes needed", VfioReason.BAD_DATA)
        # the vfio-user side of the fds (they travel as SCM_RIGHTS, not in data)
        if data_type != VfioIrqSetFlag.DATA_EVENTFD and fds:
            raise VfioError(errno.EINVAL, "fds sent without DATA_EVENTFD", VfioReason.BAD_FDS)
        if data_type == VfioIrqSetFlag.DATA_EVENTFD and fds and len(fds) != s.count:
            raise VfioError(errno.EINVAL, f"{len(fds)} fds for count {s.count}", VfioReason.BAD_FDS)
        # vfio_pci_set_irqs_ioctl
        action = s.flags & VFIO_IRQ_SET_ACTION_TYPE_MASK
        idx = VfioPciIrqIndex(s.index)
        if idx == VfioPciIrqIndex.INTX:
            if action == VfioIrqSetFlag.ACTION_MASK:
                self._set_intx_mask(s, data_type)
                return None
            if action == VfioIrqSetFlag.ACTION_UNMASK:
                self._set_intx_unmask(s, data_type, fds)
                return None
            if action == VfioIrqSetFlag.ACTION_TRIGGER:
                self._set_intx_trigger(s, data_type, fds)
                return None
        elif idx in (VfioPciIrqIndex.MSI, VfioPciIrqIndex.MSIX):
            if action == VfioIrqSetFlag.ACTION_TRIGGER:
                return self._set_msi_trigger(s, data_type, fds, idx)
        elif action == VfioIrqSetFlag.ACTION_TRIGGER and (idx == VfioPciIrqIndex.REQ or self.nic.pcie):
            self._set_ctx_trigger_single(s, data_type, fds, idx)
            return None
        raise VfioError(errno.ENOTTY, f"{idx.name}: action {action:#x} not supported", VfioReason.NOT_SUPPORTED)

    # INTx ---------------------------------------------------------------------------------------------
    def _is_intx(self) -> bool:
        return self.irq_type == VfioPciIrqIndex.INTX

    def _apply_disintx(self) -> None:
        """The function's real INTX_DISABLE: set while MSI/MSI-X is on (``pci_intx_for_msi``) and
        while INTx is masked (``pci_check_and_mask_intx``); clear otherwise."""
        if self.irq_type in (VfioPciIrqIndex.MSI, VfioPciIrqIndex.MSIX):
            self.nic.set_intx_disable(True)
        elif self._is_intx():
            self.nic.set_intx_disable(self._intx_masked)
        else:
            self.nic.set_intx_disable(False)

    def _intx_mask(self) -> None:
        if self._is_intx() and not self._intx_masked:
            self._intx_masked = True
            self.counts["intx-masks"] += 1
            self._apply_disintx()

    def _intx_unmask(self) -> None:
        """``vfio_pci_intx_unmask``: clear DisINTx; with the level still asserted the handler runs
        again at once (masks and signals once more: one interrupt, no storm)."""
        if self._is_intx() and self._intx_masked and not self._virq_disabled:
            self._intx_masked = False
            self.counts["intx-unmasks"] += 1
            self._apply_disintx()

    def _send_intx(self) -> None:
        """``vfio_send_intx_eventfd``."""
        if self._is_intx() and not self._virq_disabled:
            self._signal(self._intx_trigger, "intx")

    def _check_intx_single(self, s: VfioIrqSet) -> None:
        if not self._is_intx() or s.start != 0 or s.count != 1:
            raise VfioError(errno.EINVAL, "INTx MASK/UNMASK needs INTx enabled, start 0, count 1",
                            VfioReason.WRONG_STATE if not self._is_intx() else VfioReason.BAD_RANGE)

    def _set_intx_mask(self, s: VfioIrqSet, data_type: int) -> None:
        self._check_intx_single(s)
        if data_type == VfioIrqSetFlag.DATA_EVENTFD:
            raise VfioError(errno.ENOTTY, "INTx MASK with an eventfd is not implemented (vfio-pci)",
                            VfioReason.NOT_SUPPORTED)
        if data_type == VfioIrqSetFlag.DATA_NONE or s.data[0]:
            self._intx_mask()

    def _set_intx_unmask(self, s: VfioIrqSet, data_type: int, fds: list[int]) -> None:
        self._check_intx_single(s)
        if data_type == VfioIrqSetFlag.DATA_NONE or (data_type == VfioIrqSetFlag.DATA_BOOL and s.data[0]):
            self._intx_unmask()
        elif data_type == VfioIrqSetFlag.DATA_EVENTFD:
            if fds:
                new = self._take_eventfd(fds[0])
                self._set_unmask_fd(new)
            else:
                self._set_unmask_fd(None)

    def _set_unmask_fd(self, fd: int | None) -> None:
        old, self._intx_unmask_fd = self._intx_unmask_fd, fd
        self._unmask_gen += 1
        self._close(old)
        if fd is not None and self._virqfd is None:
            self._virqfd = start_thread(self._virqfd_main, "kc-vfio-virqfd")
        os.eventfd_write(self._wake_fd, 1)

    def _set_intx_trigger(self, s: VfioIrqSet, data_type: int, fds: list[int]) -> None:
        if self._is_intx() and s.count == 0 and data_type == VfioIrqSetFlag.DATA_NONE:
            self._intx_disable()
            return
        if not (self._is_intx() or self.irq_type is None) or s.start != 0 or s.count != 1:
            raise VfioError(errno.EINVAL, "INTx TRIGGER: another index is enabled, or not start 0 count 1",
                            VfioReason.WRONG_STATE if self.irq_type is not None else VfioReason.BAD_RANGE)
        if data_type == VfioIrqSetFlag.DATA_EVENTFD:
            trigger = self._take_eventfd(fds[0]) if fds else None
            if self._is_intx():
                self._close(self._intx_trigger)
                self._intx_trigger = trigger
            else:
                self._intx_enable(trigger)
            return
        if not self._is_intx():
            raise VfioError(errno.EINVAL, "INTx loopback with INTx not enabled", VfioReason.WRONG_STATE)
        if data_type == VfioIrqSetFlag.DATA_NONE or s.data[0]:
            self.counts["intx-loopback"] += 1
            self._send_intx()

    def _intx_enable(self, trigger: int | None) -> None:
        if not self.nic.config[R.PCI_INTERRUPT_PIN]:
            self._close(trigger)
            raise VfioError(errno.ENODEV, "the function has no INTx pin", VfioReason.NO_DEVICE)
        self.irq_type = VfioPciIrqIndex.INTX
        self._intx_trigger = trigger
        self._intx_masked = self._virq_disabled
        self.counts["intx-enables"] += 1
        self._apply_disintx()  # an asserted level fires now (the handler runs)

    def _intx_disable(self) -> None:
        self._set_unmask_fd(None)
        self._close(self._intx_trigger)
        self._intx_trigger = None
        self.irq_type = None
        self._intx_masked = False
        self.counts["intx-disables"] += 1
        self._apply_disintx()

    # MSI / MSI-X --------------------------------------------------------------------------------------
    def _set_msi_trigger(self, s: VfioIrqSet, data_type: int, fds: list[int],
                         idx: VfioPciIrqIndex) -> Callable[[], None] | None:
        msix = idx == VfioPciIrqIndex.MSIX
        if self.irq_type == idx and s.count == 0 and data_type == VfioIrqSetFlag.DATA_NONE:
            self._msi_disable(msix)
            if msix and self.window_fault.on:
                self.window_fault.fired += 1
                return self._fire_window
            return None
        if not (self.irq_type == idx or self.irq_type is None):
            raise VfioError(errno.EINVAL, f"{self.irq_type.name if self.irq_type is not None else '?'} is enabled: "
                            "one of INTx/MSI/MSI-X at a time", VfioReason.WRONG_STATE)
        if data_type == VfioIrqSetFlag.DATA_EVENTFD:
            if self.irq_type == idx:
                self._msi_set_block(s.start, s.count, fds, msix)
                return None
            self._msi_enable(s.start + s.count, msix)
            try:
                self._msi_set_block(s.start, s.count, fds, msix)
            except VfioError:
                self._msi_disable(msix)
                raise
            return None
        if self.irq_type != idx:
            raise VfioError(errno.EINVAL, f"{idx.name} loopback with the index not enabled", VfioReason.WRONG_STATE)
        for i in range(s.start, s.start + s.count):
            hv = self._vectors.get(i)
            if hv is None or hv.trigger is None:
                continue
            if data_type == VfioIrqSetFlag.DATA_NONE or s.data[i - s.start]:
                self.counts["msi-loopback"] += 1
                if self._signal(hv.trigger, "msi"):
                    hv.signals += 1
        return None

    def _fire_window(self) -> None:
        n = self.nic.write_one_record_each(RecordFlag.FAULT_WINDOW)
        self.window_fault.records += n

    def _msi_enable(self, nvec: int, msix: bool) -> None:
        """``vfio_msi_enable``: *nvec* host vectors (all or nothing), the function's MSI/MSI-X on
        with every vector masked (no trigger yet), DisINTx set."""
        if self.irq_type is not None:
            raise VfioError(errno.EINVAL, "an index is enabled", VfioReason.WRONG_STATE)
        if nvec <= 0:
            raise VfioError(errno.ERANGE, "pci_alloc_irq_vectors(1, 0)", VfioReason.BAD_RANGE)
        try:
            irqs = self.pool.alloc(nvec)
        except VfioError as e:
            self.last_refusal = {"index": "MSIX" if msix else "MSI", "path": "enable", "requested": nvec,
                                 "available": e.available}
            raise
        nic = self.nic
        self._vectors = {v: HostVector(v, irq) for v, irq in enumerate(irqs)}
        if msix:
            self._irq_to_vector = {irq: v for v, irq in enumerate(irqs)}
            for v, irq in enumerate(irqs):
                nic.msix_mask(v, True)
                nic.msix_set_entry(v, MSI_ADDRESS, irq)
            nic.msix_enable(True)
            self.irq_type = VfioPciIrqIndex.MSIX
            self.counts["msix-enables"] += 1
        else:
            self._msi_nvec = nvec
            for v in range(nic.msi_vectors):
                nic.msi_set_mask(v, True)
            nic.msi_program(True, (nvec - 1).bit_length(), MSI_ADDRESS, MSI_DATA_BASE)
            self.irq_type = VfioPciIrqIndex.MSI
            self.counts["msi-enables"] += 1
        self._apply_disintx()

    def _msi_disable(self, msix: bool) -> None:
        """``vfio_msi_disable``: every trigger released, the function's MSI(-X) off with its entries
        masked, every host vector back to the pool, DisINTx cleared (INTx is live again)."""
        nic = self.nic
        for hv in self._vectors.values():
            self._close(hv.trigger)
            hv.trigger = None
        if msix:
            for v in range(nic.nvectors):
                nic.msix_mask(v, True)
            nic.msix_enable(False)
            self.counts["msix-disables"] += 1
        else:
            for v in range(nic.msi_vectors):
                nic.msi_set_mask(v, True)
            nic.msi_program(False, 0, 0, 0)
            self.counts["msi-disables"] += 1
        self.pool.free([hv.irq for hv in self._vectors.values()])
        self._vectors = {}
        self._irq_to_vector = {}
        self._msi_nvec = 0
        self.irq_type = None
        self._apply_disintx()

    def _msi_set_block(self, start: int, count: int, fds: list[int], msix: bool) -> None:
        j = start
        try:
            for i in range(count):
                j = start + i
                self._msi_set_vector_signal(j, fds[i] if fds else -1, msix)
        except VfioError:
            for k in range(start, j + 1):
                self._msi_set_vector_signal(k, -1, msix)
            raise

    def _msi_set_vector_signal(self, v: int, fd: int, msix: bool) -> None:
        """``vfio_msi_set_vector_signal``: release the vector's trigger (its entry masked), then,
        for fd >= 0, find or allocate its host vector, re-write its message and unmask it."""
        nic = self.nic
        hv = self._vectors.get(v)
        if hv is not None and hv.trigger is not None:
            if msix:
                nic.msix_mask(v, True)
            else:
                nic.msi_set_mask(v, True)
            self._close(hv.trigger)
            hv.trigger = None
            self.counts["vector-deassigns"] += 1
        if fd < 0:
            return
        if hv is None:
            if not msix or not self.dynamic_msix:
                self.counts["noresize-refusals" if msix else "msi-vector-refusals"] += 1
                raise VfioError(errno.EINVAL, f"vector {v} is outside the enabled set (NORESIZE: disable and "
                                "re-enable the index with more vectors)", VfioReason.NO_VECTOR)
            try:
                (irq,) = self.pool.alloc(1)
            except VfioError as e:
                self.last_refusal = {"index": "MSIX", "path": "dynamic", "vector": v, "requested": 1,
                                     "available": e.available}
                raise
            hv = self._vectors[v] = HostVector(v, irq)
            self._irq_to_vector[irq] = v
            self.counts["dynamic-allocs"] += 1
        trigger = self._take_eventfd(fd)  # the host vector stays allocated on failure (vfio's cache)
        if msix:
            nic.msix_set_entry(v, MSI_ADDRESS, hv.irq)
        hv.trigger = trigger
        self.counts["vector-assigns"] += 1
        if msix:
            nic.msix_mask(v, False)  # a pending bit is delivered now, once, to the new trigger
        else:
            nic.msi_set_mask(v, False)

    # ERR / REQ ----------------------------------------------------------------------------------------
    def _set_ctx_trigger_single(self, s: VfioIrqSet, data_type: int, fds: list[int], idx: VfioPciIrqIndex) -> None:
        if s.start != 0 or s.count > 1:
            raise VfioError(errno.EINVAL, f"{idx.name}: start 0, count <= 1", VfioReason.BAD_RANGE)
        attr = "_err_trigger" if idx == VfioPciIrqIndex.ERR else "_req_trigger"
        what = idx.name.lower()
        cur: int | None = getattr(self, attr)
        if data_type == VfioIrqSetFlag.DATA_NONE:
            if cur is None:
                raise VfioError(errno.EINVAL, f"{idx.name}: no trigger to signal or release", VfioReason.WRONG_STATE)
            if s.count:
                self._signal(cur, what)
            else:
                self._close(cur)
                setattr(self, attr, None)
            return
        if not s.count:
            raise VfioError(errno.EINVAL, f"{idx.name}: count 0 with data", VfioReason.BAD_RANGE)
        if data_type == VfioIrqSetFlag.DATA_BOOL:
            if s.data[0] and cur is not None:
                self._signal(cur, what)
            return
        new = self._take_eventfd(fds[0]) if fds else None
        self._close(cur)
        setattr(self, attr, new)

    def set_dma(self, space: DmaSpace | None) -> None:
        """The client's DMA windows changed (mapped, or gone with the client): the function's
        queues reach memory through *space* from now on; None pauses them (nothing is lost)."""
        self.nic.set_dma(space)

    def request_release(self) -> bool:
        """Ask the user to release the device (REQ, ``vfio_pci_core_request``).  False: no REQ trigger."""
        with self.lock:
            self.counts["requests"] += 1
            return self._signal(self._req_trigger, "req")

    def signal_error(self) -> bool:
        """Signal the ERR trigger (an AER error was reported on the function)."""
        with self.lock:
            return self._signal(self._err_trigger, "err")

    # -- the function's interrupts arriving at the host (InterruptSink; lock held) ------------------
    def msi_message(self, address: int, data: int) -> None:
        if self.irq_type == VfioPciIrqIndex.MSIX:
            v = self._irq_to_vector.get(data)
        elif self.irq_type == VfioPciIrqIndex.MSI:
            v = data - MSI_DATA_BASE if 0 <= data - MSI_DATA_BASE < self._msi_nvec else None
        else:
            v = None
        hv = self._vectors.get(v) if v is not None else None
        if hv is None or address != MSI_ADDRESS:
            self.counts["spurious-msi"] += 1
            return
        if hv.trigger is None:
            hv.spurious += 1
            self.counts["msi-no-trigger"] += 1
            return
        if self._signal(hv.trigger, "msi"):
            hv.signals += 1

    def intx_changed(self, asserted: bool) -> None:
        """The function's INTx pin changed (``vfio_intx_handler`` on the rising edge)."""
        if not asserted:
            return
        if not self._is_intx():
            self.counts["intx-unhandled"] += 1
            return
        if self._intx_masked:
            return
        self._intx_masked = True  # automask
        self.counts["intx-automasks"] += 1
        self._apply_disintx()
        self._send_intx()

    # -- the unmask eventfd (virqfd) ----------------------------------------------------------------
    def _virqfd_main(self) -> None:
        while True:
            with self.lock:
                if self._closing:
                    return
                fd, gen = self._intx_unmask_fd, self._unmask_gen
            p = select.poll()
            p.register(self._wake_fd, select.POLLIN)
            if fd is not None:
                p.register(fd, select.POLLIN)
            for f, _ev in p.poll():
                if f == self._wake_fd:
                    try:
                        os.eventfd_read(self._wake_fd)
                    except BlockingIOError:
                        pass
                    continue
                with self.lock:
                    if fd is None or gen != self._unmask_gen or fd != self._intx_unmask_fd:
                        continue
                    q = select.poll()
                    q.register(fd, select.POLLIN)
                    if not q.poll(0):
                        continue
                    try:
                        os.eventfd_read(fd)
                    except OSError:
                        continue
                    self.counts["intx-unmask-eventfd"] += 1
                    self._intx_unmask()

    def intx_unmask_fd(self) -> int | None:
        """The unmask eventfd (our dup), for a caller that wants to see it; polled by ``kc-vfio-virqfd``."""
        with self.lock:
            return self._intx_unmask_fd

    # -- reset and release ----------------------------------------------------------------------------
    def _disable_all(self) -> None:
        if self.irq_type == VfioPciIrqIndex.INTX:
            self._intx_disable()
        elif self.irq_type == VfioPciIrqIndex.MSI:
            self._msi_disable(False)
        elif self.irq_type == VfioPciIrqIndex.MSIX:
            self._msi_disable(True)
        self._set_unmask_fd(None)

    def _reset_function(self, *, restore: bool) -> None:
        """FLR the function.  *restore*: as ``pci_try_reset_function`` (save the config header,
        reset, restore it, and re-write the host's MSI/MSI-X state)."""
        nic = self.nic
        saved = bytes(nic.config)
        nic.function_level_reset()
        if restore:
            self._restore_state(saved)

    def _restore_state(self, saved: bytes) -> None:
        """``pci_restore_state``: the config header, Device Control, the AER masks and severity,
        and the host's MSI/MSI-X programming (the user's interrupt setup) back on the function."""
        nic = self.nic
        for off, size in ((R.PCI_COMMAND, 2), (R.PCI_BASE_ADDRESS_0, 24), (R.PCI_INTERRUPT_LINE, 1)):
            nic.set_config(off, int.from_bytes(saved[off:off + size], "little"), size)
        if nic.exp_cap:
            off = nic.exp_cap + R.PCI_EXP_DEVCTL
            devctl = int.from_bytes(saved[off:off + 2], "little") & ~R.PCI_EXP_DEVCTL_BCR_FLR
            nic.set_config(off, devctl, 2)
        if nic.aer is not None:
            base = nic.aer.offset
            for reg in (PCI_ERR_UNCOR_MASK, PCI_ERR_UNCOR_SEVER, PCI_ERR_COR_MASK):
                nic.set_config(base + reg, int.from_bytes(saved[base + reg:base + reg + 4], "little"), 4)
        if self.irq_type == VfioPciIrqIndex.MSIX:
            for v, hv in self._vectors.items():
                nic.msix_set_entry(v, MSI_ADDRESS, hv.irq)
                nic.msix_mask(v, hv.trigger is None)
            nic.msix_enable(True)
        elif self.irq_type == VfioPciIrqIndex.MSI:
            for v, hv in self._vectors.items():
                nic.msi_set_mask(v, hv.trigger is None)
            nic.msi_program(True, (self._msi_nvec - 1).bit_length(), MSI_ADDRESS, MSI_DATA_BASE)
        self._apply_disintx()
        if self.bus_master_was(saved):
            nic.bus_master_changed(True)

    @staticmethod
    def bus_master_was(saved: bytes) -> bool:
        return bool(int.from_bytes(saved[R.PCI_COMMAND:R.PCI_COMMAND + 2], "little") & R.PCI_COMMAND_MASTER)

    def reset(self) -> None:
        """``VFIO_DEVICE_RESET``: every IRQ index disabled (fds closed, host vectors freed), then an
        FLR of the function with its config header saved and restored (``pci_try_reset_function``).

        vfio-pci itself keeps the interrupt contexts across a reset (the PCI core restores the MSI-X
        state around it); QEMU disables the device's interrupts before it resets (``vfio_pci_pre_reset``)
        and re-enables them after, so a QEMU-like client sees the same outcome.  ERR and REQ
        triggers are kept (they are not the function's interrupts)."""
        self.gate_wait("DEVICE_RESET")
        with self.lock:
            self.counts["device-resets"] += 1
            self._disable_all()
            self._reset_function(restore=True)
            self._clear_error("device-reset")

    def release(self, reset: bool = False) -> None:
        """The client went away: every fd closed, every host vector freed, no DMA.  *reset*:
        vfio-pci's release rule (``vfio_pci_core_disable``): the function reset to the state it had
        when it was bound (config at reset values, MSI-X off, table masked, PBA clear).  A function
        with an unhandled PCIe error is reset whatever *reset* says (``aer-reset-on-release``): by
        a secondary bus reset of its port when it is frozen (an FLR cannot reach a function whose
        link is down), else by an FLR."""
        bus_reset = False
        with self.lock:
            self.counts["releases"] += 1
            self._disable_all()
            self._close(self._err_trigger)
            self._close(self._req_trigger)
            self._err_trigger = self._req_trigger = None
            aer_reset = self.unhandled and not self.failed and self.release_switch.fix_on
            if aer_reset:
                self.counts["release-aer-resets"] += 1
                bus_reset = not self.nic.accessible and self.bus_reset_request is not None
        if bus_reset and self.bus_reset_request is not None:
            self.counts["release-bus-resets"] += 1
            self.bus_reset_request(f"{self.name} released with an unhandled error while frozen")
        with self.lock:
            if reset or aer_reset:
                self.counts["release-resets"] += 1
                self._reset_function(restore=False)
                self._init_vconfig()
            if aer_reset:
                self._clear_error("release")
        self.nic.set_dma(None)

    # -- PCIe errors: vfio-pci's pci_error_handlers ----------------------------------------------------
    def error_detected(self, state: PciChannelState) -> PciErsResult:
        """``vfio_pci_aer_err_detected``: signal ERR (if registered) and vote CAN_RECOVER; the AER
        registers are latched into the user's view.  ``io_perm_failure``: the device is failed."""
        with self.lock:
            if state is PciChannelState.PERM_FAILURE:
                with self._gate:
                    self.failed = True
                    self.recovery_state = RecoveryState.FAILED
                    self._gate.notify_all()
                self.counts["perm-failure"] += 1
                self._signal(self._err_trigger, "err")
                return PciErsResult.DISCONNECT
            self.counts["error-detected"] += 1
            aer = self.nic.aer
            logged = aer is not None and bool(aer.uncor_status | aer.cor_status)
            if logged or state is PciChannelState.FROZEN:
                # this function logged the error, or lost its state to the link reset: the user must look
                self._latch_aer()
                self.unhandled = True
            self._signal(self._err_trigger, "err")
            return PciErsResult.CAN_RECOVER

    def mmio_enabled(self) -> PciErsResult:
        """vfio-pci has no ``mmio_enabled``: the vote stands (RECOVERED)."""
        return PciErsResult.RECOVERED

    def slot_reset(self) -> PciErsResult:
        """vfio-pci has no ``slot_reset``: the vote stands (RECOVERED)."""
        return PciErsResult.RECOVERED

    def resume(self) -> None:
        """vfio-pci has no ``resume``: the user was told through ERR; nothing to do."""
        with self.lock:
            self.counts["resumed"] += 1

    def _latch_aer(self) -> None:
        aer = self.nic.aer
        if aer is None:
            return
        live = bytes(self.nic.config[aer.offset:aer.offset + PCI_ERR_SIZEOF])
        if self._aer_latch is None:
            self._aer_latch = bytearray(live)
            return
        lat = self._aer_latch  # a second error before the user looked: the status bits add up
        for reg in (PCI_ERR_UNCOR_STATUS, PCI_ERR_COR_STATUS):
            v = int.from_bytes(lat[reg:reg + 4], "little") | int.from_bytes(live[reg:reg + 4], "little")
            lat[reg:reg + 4] = v.to_bytes(4, "little")
        lat[PCI_ERR_UNCOR_SEVER:PCI_ERR_UNCOR_SEVER + 4] = live[PCI_ERR_UNCOR_SEVER:PCI_ERR_UNCOR_SEVER + 4]

    def _overlay_latch(self, offset: int, data: bytearray) -> bytes:
        lat, aer = self._aer_latch, self.nic.aer
        if lat is None or aer is None:
            return bytes(data)
        for reg, size in _LATCHED:
            for i in range(size):
                a = aer.offset + reg + i
                if offset <= a < offset + len(data):
                    data[a - offset] = lat[reg + i]
        return bytes(data)

    def _latch_rw1c(self, offset: int, data: bytes) -> None:
        """The user's RW1C write to a latched status register clears the latched bits."""
        lat, aer = self._aer_latch, self.nic.aer
        if lat is None or aer is None:
            return
        for reg in (PCI_ERR_UNCOR_STATUS, PCI_ERR_COR_STATUS):
            for i in range(4):
                a = aer.offset + reg + i
                if offset <= a < offset + len(data):
                    lat[reg + i] &= ~data[a - offset] & 0xFF
        if not any(lat[PCI_ERR_UNCOR_STATUS:PCI_ERR_UNCOR_STATUS + 4]) and \
                not any(lat[PCI_ERR_COR_STATUS:PCI_ERR_COR_STATUS + 4]):
            self._clear_error("user-cleared")

    def _clear_error(self, how: str) -> None:
        """The error is handled (lock held): the latched view goes back to the live registers."""
        if self.unhandled or self._aer_latch is not None:
            self.counts[f"error-handled-{how}"] += 1
        self.unhandled = False
        self._aer_latch = None

    def latched_aer(self) -> dict | None:
        """The user's latched view of the AER registers (None: the user sees the live ones)."""
        with self.lock:
            lat = self._aer_latch
            if lat is None:
                return None

            def g(reg: int) -> int:
                return int.from_bytes(lat[reg:reg + 4], "little")
            return {"uncor-status": g(PCI_ERR_UNCOR_STATUS), "uncor-severity": g(PCI_ERR_UNCOR_SEVER),
                    "cor-status": g(PCI_ERR_COR_STATUS), "first-error-pointer": g(PCI_ERR_CAP) & 0x1F,
                    "header-log": [f"{g(PCI_ERR_HEADER_LOG + 4 * i):08x}" for i in range(4)]}

    # -- the access gate --------------------------------------------------------------------------------
    def gate_close(self) -> None:
        """The host starts resetting the link: user accesses wait from now on."""
        with self._gate:
            self._link_reset = True
            if not self.failed:
                self.recovery_state = RecoveryState.LINK_DOWN

    def gate_open(self, state: RecoveryState = RecoveryState.IDLE) -> None:
        """The recovery ended: waiting accesses go on (and fail at once if the device is failed)."""
        with self._gate:
            self._link_reset = False
            self.recovery_state = RecoveryState.FAILED if self.failed else state
            self._gate.notify_all()

    def set_recovery_state(self, state: RecoveryState) -> None:
        with self._gate:
            if not self.failed:
                self.recovery_state = state

    def gate_wait(self, what: str) -> None:
        """Wait while the host resets the link (at most ``recovery_wait_ms``), then go on; EIO
        for a failed device.  Call without the function's lock."""
        if not self.gate_switch.fix_on:
            return
        with self._gate:
            if self._link_reset and not self.failed:
                t0 = time.monotonic()
                self.gate_waits += 1
                self._gate.wait_for(lambda: not self._link_reset or self.failed,
                                    timeout=self.recovery_wait_ms / 1000.0)
                self.gate_wait_max_ms = max(self.gate_wait_max_ms, (time.monotonic() - t0) * 1000.0)
            if self.failed:
                self.gate_refusals += 1
                raise VfioError(errno.EIO, f"{what}: {self.name} is in error recovery: the device did not come back",
                                VfioReason.NO_DEVICE)

    def gate_closed(self) -> bool:
        with self._gate:
            return self._link_reset

    # -- secondary bus reset (the host's recovery, a release, a hot reset) -----------------------------
    def prepare_bus_reset(self) -> bytes:
        """``pci_save_state`` before a secondary bus reset: the function's config."""
        with self.lock:
            return bytes(self.nic.config)

    def bus_reset_done(self, saved: bytes, *, user_reset: bool = False) -> None:
        """After a secondary bus reset: the saved config and the user's interrupt setup restored.
        *user_reset*: the user asked for it (a hot reset): the error, if any, is handled."""
        with self.lock:
            self.counts["bus-resets"] += 1
            self._restore_state(saved)
            if user_reset:
                self.counts["hot-resets"] += 1
                self._clear_error("hot-reset")

    def aer_state(self) -> dict:
        """vfio-pci's error state: recovery state, unhandled, failed, ERR eventfd counter (read
        without consuming), the latched view, the gate's counts."""
        latched = self.latched_aer()
        with self.lock:
            err = {"trigger-fd": self._err_trigger, "eventfd-count": self._peek(self._err_trigger),
                   "signals": self.counts["err-signals"], "no-trigger": self.counts["err-no-trigger"]}
            hot = self.counts["hot-resets"]
        with self._gate:
            return {"recovery-state": self.recovery_state.value, "unhandled": self.unhandled, "failed": self.failed,
                    "err-eventfd": err, "latched": latched, "hot-resets": hot,
                    "gate": {"closed": self._link_reset, "enabled": self.gate_switch.fix_on, "waits": self.gate_waits,
                             "max-wait-ms": round(self.gate_wait_max_ms, 1), "refused": self.gate_refusals,
                             "bound-ms": self.recovery_wait_ms}}

    def close(self) -> None:
        """Release (no reset), stop the threads, free the function's memfd."""
        self.release(reset=False)
        with self.lock:
            self._closing = True
            t, self._virqfd = self._virqfd, None
            os.eventfd_write(self._wake_fd, 1)
        if t is not None and t is not threading.current_thread():
            t.join(timeout=60)
        self.nic.close()
        with self.lock:
            if self._wake_fd >= 0:
                os.close(self._wake_fd)
                self._wake_fd = -1

    # -- view ---------------------------------------------------------------------------------------------
    @staticmethod
    def _peek(fd: int | None) -> int | None:
        if fd is None:
            return None
        try:
            return peek_fd(fd)
        except (OSError, ValueError):
            return -1

    def describe(self) -> dict:
        """The host's view: IRQ indexes, vectors with their host irq, trigger and its count (read
        without consuming it), the pool, SET_IRQS counts, the path."""
        with self.lock:
            vectors = [{"vector": v, "host-irq": hv.irq, "trigger-fd": hv.trigger,
                        "eventfd-count": self._peek(hv.trigger), "signals": hv.signals,
                        "no-trigger": hv.spurious}
                       for v, hv in sorted(self._vectors.items())]
            nic = self.nic
            return {
                "name": self.name,
                "path": "dynamic" if self.dynamic_msix else "noresize",
                "irq-type": self.irq_type.name if self.irq_type is not None else "none",
                "indexes": {VfioPciIrqIndex(i).name: {"count": self.irq_count(i),
                                                      "flags": self.get_irq_info(i).flags
                                                      if i != VfioPciIrqIndex.ERR or nic.pcie else None}
                            for i in range(VFIO_PCI_NUM_IRQS)},
                "vectors": vectors,
                "msi-nvec": self._msi_nvec,
                "intx": {"trigger-fd": self._intx_trigger, "eventfd-count": self._peek(self._intx_trigger),
                         "unmask-fd": self._intx_unmask_fd, "masked": self._intx_masked,
                         "virq-disabled": self._virq_disabled, "pin-asserted": nic.intx_asserted},
                "intx-unhandled": self.counts["intx-unhandled"],
                "err": {"trigger-fd": self._err_trigger, "signals": self.counts["err-signals"]},
                "recovery-state": self.recovery_state.value, "unhandled": self.unhandled, "failed": self.failed,
                "req": {"trigger-fd": self._req_trigger, "signals": self.counts["req-signals"],
                        "requests": self.counts["requests"]},
                "pool": self.pool.describe(),
                "last-refusal": self.last_refusal,
                "set-irqs": {"by-kind": dict(self.set_irqs_by_kind), "by-result": dict(self.set_irqs_by_result)},
                "counts": dict(self.counts),
                "faults": self.faults.describe(),
                "msix-pba": nic.msix_pba.hex(),
                "msi-pending": nic.get32(nic.msi_cap + PCI_MSI_PENDING_64),
            }
