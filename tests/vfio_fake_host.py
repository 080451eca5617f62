"""A small host device for the tests of the VMM's side of passthrough (``kickcall.vfio.pci``).

A STAND-IN, for tests of the VMM side only: it implements the ``VfioHostDevice`` Protocol with just
what those tests need and is served by the real ``VfioUserServer`` over a real socket.  The main
engineer will switch the tests to the real host model (``kickcall.vfio.host`` / ``nic``) once it
lands; the tests reach this class only through ``FakeHost.fire(v)``, ``FakeHost.calls``,
``FakeHost.msix_calls()`` and the constructor's knobs, so the swap is a small change.

The function: vendor 0x4b43 ("KC"), a PCIe endpoint with FLR, INTA, MSI-X with *vectors* entries.
BAR0 (16 KiB, 32-bit memory): 0x0000 registers (trapped), 0x1000 a page the server offers as a
sparse mmap area (a memfd), 0x2000 the MSI-X table, 0x3000 the PBA.

Host rules kept from vfio-pci (``drivers/vfio/pci/vfio_pci_intrs.c``), reduced: one of INTx and
MSI-X at a time (EINVAL); MSI-X TRIGGER with DATA_NONE count 0 disables the index and frees its
host vectors; with NORESIZE, the index cannot grow without a disable (EINVAL), the enable takes
start+count host vectors at once; without it (dynamic MSI-X), the enable takes one host vector and
each vector takes one on its first wiring.  Host vectors come from a pool of *host_irqs*; when it
is short, ENOSPC.  INTx is automasked when it fires; UNMASK re-arms it.
"""

from __future__ import annotations

import errno
import os
import struct
import threading
from dataclasses import dataclass

from kickcall.pci import regs as R
from kickcall.vfio.server import DmaSpace
from kickcall.vfio.uapi import (
    SparseMmapArea, VfioDeviceFlag, VfioDeviceInfo, VfioIrqInfo, VfioIrqInfoFlag, VfioIrqSet, VfioIrqSetFlag,
    VfioPciIrqIndex, VfioPciRegion, VfioRegionInfo, VfioRegionInfoFlag,
)

BAR0_SIZE = 0x4000
MMAP_OFF = 0x1000
TABLE_OFF = 0x2000
PBA_OFF = 0x3000
MSIX_CAP = 0x40
EXP_CAP = 0x50
VENDOR, DEVICE = 0x4B43, 0x0001
REG_SCRATCH = 0x10


class HostError(Exception):
    def __init__(self, err: int, msg: str) -> None:
        super().__init__(msg)
        self.errno = err


@dataclass
class SetIrqsCall:
    index: int
    flags: int
    start: int
    count: int
    nfds: int

    @property
    def action(self) -> int:
        return self.flags & 0x38

    @property
    def data(self) -> int:
        return self.flags & 0x7


class FakeHost:
    """The stand-in host function (see the module docstring)."""

    def __init__(self, *, vectors: int = 16, noresize: bool = False, host_irqs: int = 64,
                 intx: bool = True) -> None:
        self.nvectors = vectors
        self.noresize = noresize
        self.host_irqs = host_irqs
        self.intx_count = 1 if intx else 0
        self.mu = threading.Lock()
        self.calls: list[SetIrqsCall] = []
        self.config = bytearray(256)
        self.regs = bytearray(0x1000)
        self.mmap_fd = os.memfd_create("kc-fake-bar0", os.MFD_CLOEXEC)
        os.ftruncate(self.mmap_fd, BAR0_SIZE)
        self.dma: DmaSpace | None = None
        self.resets = 0
        self._reset_config()
        self._reset_irqs()

    # -- state -------------------------------------------------------------------------------------
    def _reset_config(self) -> None:
        c = self.config
        c[:] = bytes(256)
        struct.pack_into("<HH", c, 0, VENDOR, DEVICE)
        struct.pack_into("<H", c, R.PCI_STATUS, R.PCI_STATUS_CAP_LIST)
        c[R.PCI_CLASS_DEVICE + 1] = 0x02  # network controller
        struct.pack_into("<I", c, R.PCI_BASE_ADDRESS_0, 0)  # 32-bit memory
        c[R.PCI_CAPABILITY_LIST] = MSIX_CAP
        c[R.PCI_INTERRUPT_PIN] = 1 if self.intx_count else 0
        c[MSIX_CAP], c[MSIX_CAP + 1] = R.PCI_CAP_ID_MSIX, EXP_CAP
        struct.pack_into("<HII", c, MSIX_CAP + 2, self.nvectors - 1, TABLE_OFF, PBA_OFF)
        c[EXP_CAP], c[EXP_CAP + 1] = R.PCI_CAP_ID_EXP, 0
        struct.pack_into("<H", c, EXP_CAP + R.PCI_EXP_FLAGS, 0x0002)
        struct.pack_into("<I", c, EXP_CAP + R.PCI_EXP_DEVCAP, R.PCI_EXP_DEVCAP_FLR)

    def _reset_irqs(self) -> None:
        self.mode: str | None = None  # None | "intx" | "msix"
        self.msix_fds: dict[int, int] = {}  # vector -> our dup of the trigger eventfd
        self.msix_allocated: set[int] = set()  # host vectors in use (by MSI-X sub-index)
        self.msix_enabled_count = 0
        self.intx_fd: int | None = None
        self.intx_masked = False
        self.intx_level = False
        self.intx_fired = 0
        self.lost: list[int] = []  # fires that found nothing wired

    def _close_msix(self) -> None:
        for fd in self.msix_fds.values():
            os.close(fd)
        self.msix_fds = {}
        self.msix_allocated = set()
        self.msix_enabled_count = 0

    @property
    def pool_free(self) -> int:
        return self.host_irqs - len(self.msix_allocated)

    # -- what tests look at ------------------------------------------------------------------------
    def msix_calls(self) -> list[SetIrqsCall]:
        with self.mu:
            return [c for c in self.calls if c.index == VfioPciIrqIndex.MSIX]

    def fire(self, v: int) -> bool:
        """The function raises vector *v*: its trigger eventfd is signalled (INTx while MSI-X is
        off).  False when nothing is wired (the interrupt is lost)."""
        with self.mu:
            if self.mode == "msix":
                fd = self.msix_fds.get(v)
                if fd is None:
                    self.lost.append(v)
                    return False
                os.eventfd_write(fd, 1)
                return True
            if self.mode == "intx" or self.mode is None:
                return self._fire_intx_locked()
            return False

    def _fire_intx_locked(self) -> bool:
        self.intx_level = True
        if self.intx_fd is None or self.intx_masked:
            return False
        self.intx_masked = True  # AUTOMASKED
        self.intx_fired += 1
        os.eventfd_write(self.intx_fd, 1)
        return True

    def lower_intx(self) -> None:
        with self.mu:
            self.intx_level = False

    def close(self) -> None:
        with self.mu:
            self._close_msix()
            if self.intx_fd is not None:
                os.close(self.intx_fd)
                self.intx_fd = None
        os.close(self.mmap_fd)

    # -- VfioHostDevice ------------------------------------------------------------------------------
    def get_device_info(self) -> VfioDeviceInfo:
        return VfioDeviceInfo(16, VfioDeviceFlag.PCI | VfioDeviceFlag.RESET, 9, 5)

    def get_region_info(self, index: int) -> tuple[VfioRegionInfo, int | None]:
        rw = VfioRegionInfoFlag.READ | VfioRegionInfoFlag.WRITE
        if index == VfioPciRegion.CONFIG:
            return VfioRegionInfo(index=index, flags=rw, size=256), None
        if index == VfioPciRegion.BAR0:
            return VfioRegionInfo(index=index, flags=rw | VfioRegionInfoFlag.MMAP, size=BAR0_SIZE,
                                  sparse=[SparseMmapArea(MMAP_OFF, 0x1000)]), self.mmap_fd
        if 0 <= index < 9:
            return VfioRegionInfo(index=index), None
        raise HostError(errno.EINVAL, f"region {index}")

    def region_read(self, index: int, offset: int, count: int) -> bytes:
        with self.mu:
            if index == VfioPciRegion.CONFIG and offset + count <= 256:
                return bytes(self.config[offset:offset + count])
            if index == VfioPciRegion.BAR0 and offset + count <= 0x1000:
                if offset == 0 and count == 4 and self.intx_level:
                    self.intx_level = False  # reading the status register lowers the level
                return bytes(self.regs[offset:offset + count])
            if index == VfioPciRegion.BAR0 and offset + count <= BAR0_SIZE:
                return bytes(count)  # trapped table/PBA accesses should never come here
        raise HostError(errno.EINVAL, f"read {index}:{offset:#x}+{count}")

    def region_write(self, index: int, offset: int, data: bytes) -> None:
        with self.mu:
            if index == VfioPciRegion.CONFIG and offset + len(data) <= 256:
                for i, b in enumerate(data):
                    a = offset + i
                    if MSIX_CAP <= a < MSIX_CAP + 12:
                        continue  # vfio-pci virtualizes the MSI-X capability
                    if a in (0, 1, 2, 3) or 0x08 <= a < 0x10:
                        continue  # read-only ids
                    self.config[a] = b
                return
            if index == VfioPciRegion.BAR0 and offset + len(data) <= 0x1000:
                self.regs[offset:offset + len(data)] = data
                return
        raise HostError(errno.EINVAL, f"write {index}:{offset:#x}+{len(data)}")

    def get_irq_info(self, index: int) -> VfioIrqInfo:
        ev = VfioIrqInfoFlag.EVENTFD
        if index == VfioPciIrqIndex.INTX:
            return VfioIrqInfo(16, ev | VfioIrqInfoFlag.MASKABLE | VfioIrqInfoFlag.AUTOMASKED, index, self.intx_count)
        if index == VfioPciIrqIndex.MSI:
            return VfioIrqInfo(16, ev | VfioIrqInfoFlag.NORESIZE, index, 0)
        if index == VfioPciIrqIndex.MSIX:
            return VfioIrqInfo(16, ev | (VfioIrqInfoFlag.NORESIZE if self.noresize else 0), index, self.nvectors)
        if index in (VfioPciIrqIndex.ERR, VfioPciIrqIndex.REQ):
            return VfioIrqInfo(16, ev | VfioIrqInfoFlag.NORESIZE, index, 0)
        raise HostError(errno.EINVAL, f"irq index {index}")

    def set_irqs(self, irq: VfioIrqSet, fds: list[int]) -> None:
        with self.mu:
            self.calls.append(SetIrqsCall(irq.index, irq.flags, irq.start, irq.count, len(fds)))
            F = VfioIrqSetFlag
            if irq.index == VfioPciIrqIndex.MSIX and irq.flags & F.ACTION_TRIGGER:
                self._msix_trigger(irq, fds)
            elif irq.index == VfioPciIrqIndex.INTX:
                self._intx(irq, fds)
            else:
                raise HostError(errno.EINVAL, f"index {irq.index} flags {irq.flags:#x}")

    def _msix_trigger(self, irq: VfioIrqSet, fds: list[int]) -> None:
        F = VfioIrqSetFlag
        if irq.flags & F.DATA_NONE and irq.count == 0:
            if self.mode == "msix":
                self._close_msix()
                self.mode = None
            return
        if not irq.flags & F.DATA_EVENTFD:
            raise HostError(errno.EINVAL, "loopback triggers are not modelled")
        if irq.start + irq.count > self.nvectors:
            raise HostError(errno.EINVAL, "start+count beyond the index")
        if fds and len(fds) != irq.count:
            raise HostError(errno.EINVAL, "one fd per sub-index")
        if self.mode == "intx":
            raise HostError(errno.EINVAL, "INTx is enabled")
        end = irq.start + irq.count
        if self.mode is None:
            need = end if self.noresize else 1
            if need > self.pool_free:
                raise HostError(errno.ENOSPC, f"{need} host vectors asked, {self.pool_free} free")
            self.msix_allocated = set(range(need))
            self.msix_enabled_count = end
            self.mode = "msix"
        elif self.noresize and end > self.msix_enabled_count:
            raise HostError(errno.EINVAL, "NORESIZE: the index cannot grow without a disable")
        for i in range(irq.count):
            v = irq.start + i
            old = self.msix_fds.pop(v, None)
            if old is not None:
                os.close(old)
            if not fds:
                continue  # no fd: de-assign
            if v not in self.msix_allocated:
                if self.pool_free <= 0:
                    raise HostError(errno.ENOSPC, f"no host vector left for sub-index {v}")
                self.msix_allocated.add(v)
            self.msix_fds[v] = os.dup(fds[i])

    def _intx(self, irq: VfioIrqSet, fds: list[int]) -> None:
        F = VfioIrqSetFlag
        if irq.flags & F.ACTION_TRIGGER:
            if irq.flags & F.DATA_NONE and irq.count == 0:
                if self.intx_fd is not None:
                    os.close(self.intx_fd)
                self.intx_fd = None
                if self.mode == "intx":
                    self.mode = None
                return
            if self.mode == "msix":
                raise HostError(errno.EINVAL, "MSI-X is enabled")
            if not (irq.flags & F.DATA_EVENTFD and len(fds) == 1 and irq.start == 0 and irq.count == 1):
                raise HostError(errno.EINVAL, "INTx trigger takes one eventfd")
            if self.intx_fd is not None:
                os.close(self.intx_fd)
            self.intx_fd = os.dup(fds[0])
            self.intx_masked = False
            self.mode = "intx"
            return
        if irq.flags & F.ACTION_UNMASK and irq.flags & F.DATA_NONE:
            self.intx_masked = False
            if self.intx_level:  # still asserted: fires again (level-triggered)
                self._fire_intx_locked()
            return
        raise HostError(errno.EINVAL, f"INTx flags {irq.flags:#x}")

    def reset(self) -> None:
        with self.mu:
            self.resets += 1
            self._close_msix()
            if self.intx_fd is not None:
                os.close(self.intx_fd)
            self._reset_irqs()
            self._reset_config()

    def release(self, reset: bool) -> None:
        with self.mu:
            self._close_msix()
            if self.intx_fd is not None:
                os.close(self.intx_fd)
            self._reset_irqs()
            if reset:
                self._reset_config()

    def set_dma(self, space: DmaSpace | None) -> None:
        self.dma = space

    # -- DMA, for the tests --------------------------------------------------------------------------
    def dma_write(self, iova: int, data: bytes) -> None:
        assert self.dma is not None, "no DMA mapping yet"
        self.dma.dma_write(iova, data)

    def dma_read(self, iova: int, n: int) -> bytes:
        assert self.dma is not None, "no DMA mapping yet"
        return self.dma.dma_read(iova, n)
