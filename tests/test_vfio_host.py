"""kickcall.vfio.host and kickcall.vfio.nic in one process: vfio-pci's rules on the host side.

A dict-backed DmaSpace stands for the client's memory; triggers are real eventfds (os.eventfd),
passed the way the vfio-user server passes the fds it received (the host keeps dups).

SET_IRQS validation, each rule a case of ``test_set_irqs_rule`` (vfio-pci's errno):

=================================================  ======  ==========================================
rule                                               errno   where in vfio-pci
=================================================  ======  ==========================================
argsz < 20                                         EINVAL  vfio_set_irqs_validate_and_prepare
index >= 5                                         EINVAL  idem
start + count overflows u32                        EINVAL  idem
flag bits outside DATA|ACTION                      EINVAL  idem
start >= count of the index / start+count beyond   EINVAL  idem (ERR on conventional PCI: count 0)
no DATA type, or two                               EINVAL  idem
DATA_BOOL shorter than count                       EINVAL  idem (argsz - minsz < count)
no ACTION, or two                                  ENOTTY  vfio_pci_set_irqs_ioctl (no handler)
fds with DATA_NONE/BOOL; len(fds) != count         EINVAL  vfio-user (fds travel as SCM_RIGHTS)
INTx MASK/UNMASK with INTx not enabled             EINVAL  vfio_pci_set_intx_mask/unmask
INTx MASK with DATA_EVENTFD                        ENOTTY  vfio_pci_set_intx_mask ("implement me")
INTx TRIGGER while MSI-X is enabled                EINVAL  vfio_pci_set_intx_trigger
INTx loopback with INTx not enabled                EINVAL  idem
MSI/MSI-X MASK or UNMASK                           ENOTTY  vfio_pci_set_irqs_ioctl (no masking)
MSI-X TRIGGER while INTx / MSI is enabled          EINVAL  vfio_pci_set_msi_trigger (one type)
MSI-X loopback or disable with MSI-X not enabled   EINVAL  idem
ERR/REQ MASK or UNMASK                             ENOTTY  vfio_pci_set_irqs_ioctl
ERR/REQ count > 1 or start != 0                    EINVAL  validate (count 1) / ctx_trigger_single
ERR/REQ DATA_NONE with no trigger                  EINVAL  vfio_pci_set_ctx_trigger_single
ERR/REQ DATA_BOOL or EVENTFD with count 0          EINVAL  idem
an fd that is not an eventfd                       EINVAL  eventfd_ctx_fdget
an fd that is not open                             EBADF   eventfd_ctx_fdget
MSI-X vector beyond the set on the NORESIZE path   EINVAL  vfio_msi_alloc_irq (pci_irq_vector)
MSI vector beyond the enabled set                  EINVAL  idem (MSI never resizes)
host vectors exhausted (enable or dynamic add)     ENOSPC  vfio_msi_enable / pci_msix_alloc_irq_at
=================================================  ======  ==========================================
"""

from __future__ import annotations

import errno
import os
import struct
import threading
import time
from typing import Callable, Iterator

import pytest

from kickcall.notify import peek_fd
from kickcall.pci import regs as R
from kickcall.vfio.host import FAULT_MSIX_WINDOW, HostIrqPool, VfioError, VfioPciDevice
from kickcall.pci.regs import PCI_MSI_PENDING_64
from kickcall.vfio.nic import (Q_CONSUMER, Q_DOORBELL, Q_ENABLE, Q_PRODUCER, Q_RATE,
                               Q_RING_HI, Q_RING_LO, Q_SIZE, Q_STATUS, Q_STATUS_DMA_ERROR, Q_VECTOR,
                               QUEUE_BASE, QUEUE_STRIDE, RECORD, REG_INT_STATUS, NicFunction, RecordFlag)
from kickcall.vfio.uapi import (VfioIrqInfoFlag, VfioIrqSet, VfioIrqSetFlag, VfioPciIrqIndex,
                                VfioPciRegion, VfioRegionInfoFlag)

F = VfioIrqSetFlag
INTX, MSI, MSIX, ERR, REQ = (VfioPciIrqIndex.INTX, VfioPciIrqIndex.MSI, VfioPciIrqIndex.MSIX,
                             VfioPciIrqIndex.ERR, VfioPciIrqIndex.REQ)
TRIG_EFD = F.DATA_EVENTFD | F.ACTION_TRIGGER
RING_IOVA = 0x10_0000
RING_SIZE = 64


def wait_for(cond: Callable[[], bool], timeout: float = 60.0, what: str = "condition") -> None:
    end = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > end:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.002)


class DictDma:
    """The client's memory: mapped ranges backed by bytearrays."""

    def __init__(self) -> None:
        self.ranges: list[tuple[int, bytearray]] = []
        self.writes = 0

    def map(self, iova: int, size: int) -> None:
        self.ranges.append((iova, bytearray(size)))

    def _find(self, iova: int, n: int) -> tuple[bytearray, int]:
        for base, buf in self.ranges:
            if base <= iova and iova + n <= base + len(buf):
                return buf, iova - base
        raise VfioError(errno.EFAULT, f"{n} bytes at {iova:#x} not mapped")

    def dma_write(self, iova: int, data: bytes) -> None:
        buf, off = self._find(iova, len(data))
        buf[off:off + len(data)] = data
        self.writes += 1

    def dma_read(self, iova: int, n: int) -> bytes:
        buf, off = self._find(iova, n)
        return bytes(buf[off:off + n])


class Rig:
    """A function, its vfio-pci instance, a DMA space, and the eventfds a test made."""

    def __init__(self, *, queues: int = 4, vectors: int = 16, pool: int = 64, dynamic: bool = True,
                 pcie: bool = True, intx_pin: int = 1) -> None:
        self.pool = HostIrqPool(pool)
        self.nic = NicFunction(queues=queues, vectors=vectors, pcie=pcie, intx_pin=intx_pin)
        self.dev = VfioPciDevice(self.nic, self.pool, dynamic_msix=dynamic)
        self.dma = DictDma()
        self.dma.map(RING_IOVA, 0x10_0000)
        self.efds: list[int] = []

    def efd(self) -> int:
        fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self.efds.append(fd)
        return fd

    def close(self) -> None:
        self.dev.close()
        for fd in self.efds:
            os.close(fd)

    # client-side helpers
    def set_irqs(self, index: int, flags: int, start: int, count: int, fds: list[int] | None = None,
                 data: bytes = b"", argsz: int | None = None) -> None:
        s = VfioIrqSet(argsz=20 + len(data) if argsz is None else argsz, flags=int(flags), index=int(index),
                       start=start, count=count, data=data)
        self.dev.set_irqs(s, fds or [])

    def cfg_write16(self, off: int, v: int) -> None:
        self.dev.region_write(VfioPciRegion.CONFIG, off, struct.pack("<H", v))

    def cfg_read16(self, off: int) -> int:
        return struct.unpack("<H", self.dev.region_read(VfioPciRegion.CONFIG, off, 2))[0]

    def reg_write(self, off: int, v: int) -> None:
        self.dev.region_write(VfioPciRegion.BAR0, off, struct.pack("<I", v))

    def reg_read(self, off: int) -> int:
        return struct.unpack("<I", self.dev.region_read(VfioPciRegion.BAR0, off, 4))[0]

    def qreg(self, q: int, r: int) -> int:
        return QUEUE_BASE + QUEUE_STRIDE * q + r

    def start_device(self) -> None:
        """What a driver does: memory decode and bus master on, the DMA space attached."""
        self.cfg_write16(R.PCI_COMMAND, R.PCI_COMMAND_MEMORY | R.PCI_COMMAND_MASTER)
        self.nic.set_dma(self.dma)

    def setup_queue(self, q: int, vector: int, size: int = RING_SIZE) -> None:
        base = RING_IOVA + q * size * RECORD.size
        self.reg_write(self.qreg(q, Q_RING_LO), base & 0xFFFFFFFF)
        self.reg_write(self.qreg(q, Q_RING_HI), base >> 32)
        self.reg_write(self.qreg(q, Q_SIZE), size)
        self.reg_write(self.qreg(q, Q_VECTOR), vector)
        self.reg_write(self.qreg(q, Q_ENABLE), 1)

    def producer(self, q: int) -> int:
        return self.reg_read(self.qreg(q, Q_PRODUCER))

    def doorbell(self, q: int, n: int = 1) -> None:
        self.reg_write(self.qreg(q, Q_DOORBELL), n)

    def record(self, q: int, i: int, size: int = RING_SIZE) -> tuple[int, int, int, int]:
        base = RING_IOVA + q * size * RECORD.size
        return RECORD.unpack(self.dma.dma_read(base + (i % size) * RECORD.size, RECORD.size))


@pytest.fixture
def rig_factory() -> Iterator[Callable[..., Rig]]:
    rigs: list[Rig] = []

    def make(**kw: object) -> Rig:
        r = Rig(**kw)  # type: ignore[arg-type]  # keyword arguments forwarded as given
        rigs.append(r)
        return r

    yield make
    for r in rigs:
        r.close()


@pytest.fixture
def rig(rig_factory: Callable[..., Rig]) -> Rig:
    return rig_factory()


def consume(fd: int) -> int:
    try:
        return os.eventfd_read(fd)
    except BlockingIOError:
        return 0


def _is_eventfd(fd: int) -> bool:
    try:
        return os.readlink(f"/proc/self/fd/{fd}") == "anon_inode:[eventfd]"
    except OSError:
        return False


def copies_of(fds: list[int]) -> int:
    """How many fds of this process refer to the eventfds *fds* (their ``eventfd-id``): the host's
    dups show here, and nothing another test's threads open or close does."""
    from kickcall.notify import read_fdinfo

    ids = {read_fdinfo(fd).get("eventfd-id") for fd in fds if fd >= 0}
    ids.discard(None)
    n = 0
    for name in os.listdir("/proc/self/fd"):
        try:
            if read_fdinfo(int(name)).get("eventfd-id") in ids:
                n += 1
        except OSError:
            pass
    return n


# -- SET_IRQS validation ------------------------------------------------------------------------------

def _prep_intx(r: Rig) -> None:
    r.set_irqs(INTX, TRIG_EFD, 0, 1, [r.efd()])


def _prep_msix(r: Rig) -> None:
    r.set_irqs(MSIX, TRIG_EFD, 0, 1, [])  # QEMU's fd -1 enable


def _prep_msi(r: Rig) -> None:
    r.set_irqs(MSI, TRIG_EFD, 0, 2, [r.efd(), r.efd()])


def _not_an_eventfd(r: Rig) -> list[int]:
    rd, wr = os.pipe()
    r.efds += [rd, wr]
    return [rd]


def _closed_fd(r: Rig) -> list[int]:
    fd = os.eventfd(0)
    os.close(fd)
    return [fd]


# (name, prep, index, flags, start, count, fds (a number: that many new eventfds, or a maker), data,
#  argsz or None, rig kwargs, errno)
CASES: list[tuple] = [
    ("argsz-short", None, MSIX, TRIG_EFD, 0, 1, 1, b"", 19, {}, errno.EINVAL),
    ("index-5", None, 5, TRIG_EFD, 0, 1, 1, b"", None, {}, errno.EINVAL),
    ("index-huge", None, 0xFFFFFFFF, TRIG_EFD, 0, 1, 1, b"", None, {}, errno.EINVAL),
    ("start-count-overflow", None, MSIX, F.DATA_NONE | F.ACTION_TRIGGER, 1, 0xFFFFFFFF, 0, b"", None, {},
     errno.EINVAL),
    ("unknown-flag", None, MSIX, TRIG_EFD | (1 << 6), 0, 1, 1, b"", None, {}, errno.EINVAL),
    ("start-beyond", None, MSIX, TRIG_EFD, 16, 1, 1, b"", None, {}, errno.EINVAL),
    ("start-plus-count-beyond", None, MSIX, TRIG_EFD, 2047, 2, 2, b"", None, {"vectors": 2048}, errno.EINVAL),
    ("count-beyond-2048", None, MSIX, TRIG_EFD, 0, 2049, 0, b"", None, {"vectors": 2048}, errno.EINVAL),
    ("no-data-type", None, MSIX, F.ACTION_TRIGGER, 0, 1, 0, b"", None, {}, errno.EINVAL),
    ("none-and-bool", None, MSIX, F.DATA_NONE | F.DATA_BOOL | F.ACTION_TRIGGER, 0, 1, 0, b"\x01", None, {},
     errno.EINVAL),
    ("bool-short", _prep_msix, MSIX, F.DATA_BOOL | F.ACTION_TRIGGER, 0, 2, 0, b"\x01", None, {}, errno.EINVAL),
    ("bool-argsz-short", _prep_msix, MSIX, F.DATA_BOOL | F.ACTION_TRIGGER, 0, 2, 0, b"\x01\x01", 21, {},
     errno.EINVAL),
    ("no-action", None, MSIX, F.DATA_NONE, 0, 1, 0, b"", None, {}, errno.ENOTTY),
    ("mask-and-unmask", _prep_intx, INTX, F.DATA_NONE | F.ACTION_MASK | F.ACTION_UNMASK, 0, 1, 0, b"", None, {},
     errno.ENOTTY),
    ("fds-with-data-none", _prep_msix, MSIX, F.DATA_NONE | F.ACTION_TRIGGER, 0, 1, 1, b"", None, {}, errno.EINVAL),
    ("fds-with-data-bool", _prep_msix, MSIX, F.DATA_BOOL | F.ACTION_TRIGGER, 0, 1, 1, b"\x01", None, {},
     errno.EINVAL),
    ("fd-count-mismatch", None, MSIX, TRIG_EFD, 0, 3, 2, b"", None, {}, errno.EINVAL),
    ("intx-mask-not-enabled", None, INTX, F.DATA_NONE | F.ACTION_MASK, 0, 1, 0, b"", None, {}, errno.EINVAL),
    ("intx-unmask-not-enabled", None, INTX, F.DATA_NONE | F.ACTION_UNMASK, 0, 1, 0, b"", None, {}, errno.EINVAL),
    ("intx-mask-count-0", _prep_intx, INTX, F.DATA_NONE | F.ACTION_MASK, 0, 0, 0, b"", None, {}, errno.EINVAL),
    ("intx-mask-eventfd", _prep_intx, INTX, F.DATA_EVENTFD | F.ACTION_MASK, 0, 1, 1, b"", None, {}, errno.ENOTTY),
    ("intx-count-2", None, INTX, TRIG_EFD, 0, 2, 2, b"", None, {}, errno.EINVAL),
    ("intx-no-pin", None, INTX, TRIG_EFD, 0, 1, 1, b"", None, {"intx_pin": 0}, errno.EINVAL),
    ("intx-while-msix", _prep_msix, INTX, TRIG_EFD, 0, 1, 1, b"", None, {}, errno.EINVAL),
    ("intx-loopback-not-enabled", None, INTX, F.DATA_NONE | F.ACTION_TRIGGER, 0, 1, 0, b"", None, {},
     errno.EINVAL),
    ("intx-disable-not-enabled", None, INTX, F.DATA_NONE | F.ACTION_TRIGGER, 0, 0, 0, b"", None, {},
     errno.EINVAL),
    ("msix-mask", _prep_msix, MSIX, F.DATA_NONE | F.ACTION_MASK, 0, 1, 0, b"", None, {}, errno.ENOTTY),
    ("msix-unmask", _prep_msix, MSIX, F.DATA_NONE | F.ACTION_UNMASK, 0, 1, 0, b"", None, {}, errno.ENOTTY),
    ("msi-mask-eventfd", None, MSI, F.DATA_EVENTFD | F.ACTION_MASK, 0, 1, 1, b"", None, {}, errno.ENOTTY),
    ("msix-while-intx", _prep_intx, MSIX, TRIG_EFD, 0, 1, 1, b"", None, {}, errno.EINVAL),
    ("msix-while-msi", _prep_msi, MSIX, TRIG_EFD, 0, 1, 1, b"", None, {}, errno.EINVAL),
    ("msi-disable-while-msix", _prep_msix, MSI, F.DATA_NONE | F.ACTION_TRIGGER, 0, 0, 0, b"", None, {},
     errno.EINVAL),
    ("msix-loopback-not-enabled", None, MSIX, F.DATA_NONE | F.ACTION_TRIGGER, 0, 1, 0, b"", None, {},
     errno.EINVAL),
    ("msix-disable-not-enabled", None, MSIX, F.DATA_NONE | F.ACTION_TRIGGER, 0, 0, 0, b"", None, {},
     errno.EINVAL),
    ("msi-vector-beyond-enabled", _prep_msi, MSI, TRIG_EFD, 2, 1, 1, b"", None, {}, errno.EINVAL),
    ("err-mask", None, ERR, F.DATA_NONE | F.ACTION_MASK, 0, 1, 0, b"", None, {}, errno.ENOTTY),
    ("req-unmask", None, REQ, F.DATA_NONE | F.ACTION_UNMASK, 0, 1, 0, b"", None, {}, errno.ENOTTY),
    ("err-count-2", None, ERR, TRIG_EFD, 0, 2, 2, b"", None, {}, errno.EINVAL),
    ("req-start-1", None, REQ, TRIG_EFD, 1, 1, 1, b"", None, {}, errno.EINVAL),
    ("err-none-no-trigger", None, ERR, F.DATA_NONE | F.ACTION_TRIGGER, 0, 1, 0, b"", None, {}, errno.EINVAL),
    ("req-bool-count-0", None, REQ, F.DATA_BOOL | F.ACTION_TRIGGER, 0, 0, 0, b"", None, {}, errno.EINVAL),
    ("req-eventfd-count-0", None, REQ, TRIG_EFD, 0, 0, 0, b"", None, {}, errno.EINVAL),
    ("err-conventional-pci", None, ERR, TRIG_EFD, 0, 1, 1, b"", None, {"pcie": False}, errno.EINVAL),
    ("not-an-eventfd", None, MSIX, TRIG_EFD, 0, 1, _not_an_eventfd, b"", None, {}, errno.EINVAL),
    ("fd-not-open", None, REQ, TRIG_EFD, 0, 1, _closed_fd, b"", None, {}, errno.EBADF),
    ("noresize-beyond-set", _prep_msix, MSIX, TRIG_EFD, 1, 1, 1, b"", None, {"dynamic": False}, errno.EINVAL),
    ("enable-exhausts-pool", None, MSIX, TRIG_EFD, 0, 3, 3, b"", None, {"pool": 2}, errno.ENOSPC),
    ("dynamic-add-exhausts-pool", _prep_msix, MSIX, TRIG_EFD, 1, 1, 1, b"", None, {"pool": 1}, errno.ENOSPC),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_set_irqs_rule(rig_factory: Callable[..., Rig], case: tuple) -> None:
    name, prep, index, flags, start, count, nfds, data, argsz, kw, want = case
    r = rig_factory(**kw)
    if prep is not None:
        prep(r)
    fds = nfds(r) if callable(nfds) else [r.efd() for _ in range(nfds)]
    before = r.dev.describe()
    mine = [fd for fd in fds if isinstance(fd, int) and fd >= 0 and _is_eventfd(fd)]
    copies = copies_of(mine)
    with pytest.raises(VfioError) as ei:
        r.set_irqs(index, flags, start, count, fds, data=data, argsz=argsz)
    assert ei.value.errno == want, f"{name}: {ei.value}"
    assert r.dev.set_irqs_by_result[errno.errorcode[want]] == 1
    after = r.dev.describe()
    # a refused call changes nothing (and keeps no fd)
    assert after["irq-type"] == before["irq-type"]
    assert [(v["vector"], v["host-irq"], v["trigger-fd"]) for v in after["vectors"]] == \
        [(v["vector"], v["host-irq"], v["trigger-fd"]) for v in before["vectors"]]
    assert copies_of(mine) == copies == len(mine)  # the host kept no dup of a refused call's fds
    # and the next valid call still works
    r.set_irqs(REQ, TRIG_EFD, 0, 1, [r.efd()])


# -- GET_IRQ_INFO -------------------------------------------------------------------------------------

@pytest.mark.parametrize("dynamic", [True, False], ids=["dynamic", "noresize"])
def test_get_irq_info(rig_factory: Callable[..., Rig], dynamic: bool) -> None:
    r = rig_factory(vectors=2048, dynamic=dynamic)
    Info = VfioIrqInfoFlag
    want = {
        INTX: (Info.EVENTFD | Info.MASKABLE | Info.AUTOMASKED, 1),
        MSI: (Info.EVENTFD | Info.NORESIZE, 32),
        MSIX: (Info.EVENTFD if dynamic else Info.EVENTFD | Info.NORESIZE, 2048),
        ERR: (Info.EVENTFD | Info.NORESIZE, 1),
        REQ: (Info.EVENTFD | Info.NORESIZE, 1),
    }
    for index, (flags, count) in want.items():
        info = r.dev.get_irq_info(index)
        assert (info.flags, info.count, info.index, info.argsz) == (flags, count, index, 16), index.name
    with pytest.raises(VfioError) as ei:
        r.dev.get_irq_info(5)
    assert ei.value.errno == errno.EINVAL


def test_get_irq_info_conventional_pci_and_no_pin(rig_factory: Callable[..., Rig]) -> None:
    r = rig_factory(pcie=False, intx_pin=0)
    with pytest.raises(VfioError) as ei:
        r.dev.get_irq_info(ERR)
    assert ei.value.errno == errno.EINVAL
    assert r.dev.get_irq_info(INTX).count == 0
    assert r.dev.get_irq_info(REQ).count == 1


def test_device_and_region_info(rig: Rig) -> None:
    info = rig.dev.get_device_info()
    assert (info.flags, info.num_regions, info.num_irqs) == (3, 9, 5)
    cfg, fd = rig.dev.get_region_info(VfioPciRegion.CONFIG)
    assert (cfg.size, fd) == (4096, None)
    bar0, fd = rig.dev.get_region_info(VfioPciRegion.BAR0)
    assert bar0.size == 0x2000 and not bar0.flags & VfioRegionInfoFlag.MMAP and fd is None
    bar4, fd = rig.dev.get_region_info(VfioPciRegion.BAR4)
    assert bar4.flags & VfioRegionInfoFlag.MMAP and fd == rig.nic.bar4_memfd
    assert bar4.sparse is not None and len(bar4.sparse) == 1
    area = bar4.sparse[0]
    assert area.offset % os.sysconf("SC_PAGE_SIZE") == 0
    assert area.offset >= rig.nic.msix_pba_offset + len(rig.nic.msix_pba)
    assert area.offset + area.size == bar4.size
    for idx in (VfioPciRegion.BAR1, VfioPciRegion.BAR5, VfioPciRegion.ROM):
        assert rig.dev.get_region_info(idx)[0].size == 0
    for bad in (VfioPciRegion.VGA, 9):
        with pytest.raises(VfioError):
            rig.dev.get_region_info(bad)
    with pytest.raises(VfioError) as ei:
        rig.dev.region_read(VfioPciRegion.BAR0, 0x1FFE, 4)
    assert ei.value.errno == errno.EINVAL
    # the table reads as all-ones and drops writes; the mmap area is the memfd
    assert rig.dev.region_read(VfioPciRegion.BAR4, 0, 16) == b"\xff" * 16
    rig.dev.region_write(VfioPciRegion.BAR4, 0, b"\0" * 16)
    assert rig.nic.msix_entry(0)[2]  # still masked
    rig.dev.region_write(VfioPciRegion.BAR4, area.offset + 64, b"hello")
    assert os.pread(fd, 5, area.offset + 64) == b"hello"


def test_config_msix_enable_is_virtual(rig: Rig) -> None:
    cap = rig.nic.msix_cap + R.PCI_MSIX_FLAGS
    rig.cfg_write16(cap, R.PCI_MSIX_FLAGS_ENABLE | R.PCI_MSIX_FLAGS_MASKALL)
    assert rig.cfg_read16(cap) & (R.PCI_MSIX_FLAGS_ENABLE | R.PCI_MSIX_FLAGS_MASKALL) == \
        R.PCI_MSIX_FLAGS_ENABLE | R.PCI_MSIX_FLAGS_MASKALL
    assert rig.cfg_read16(cap) & R.PCI_MSIX_FLAGS_QSIZE == 15
    assert not rig.nic.msix_enabled  # only SET_IRQS enables MSI-X
    rig.set_irqs(MSIX, TRIG_EFD, 0, 1, [])
    assert rig.nic.msix_enabled


# -- MSI-X: enable with fd -1, dynamic growth, NORESIZE ---------------------------------------------------

def test_msix_fd_minus_one_enable_takes_one_host_vector(rig: Rig) -> None:
    rig.set_irqs(MSIX, TRIG_EFD, 0, 1, [])
    d = rig.dev.describe()
    assert d["irq-type"] == "MSIX" and rig.nic.msix_enabled
    assert d["pool"]["allocated"] == 1
    assert [(v["vector"], v["trigger-fd"]) for v in d["vectors"]] == [(0, None)]
    assert rig.nic.msix_entry(0)[2], "an entry with no trigger stays masked"
    assert rig.nic.intx_disabled


@pytest.mark.parametrize("vectors", [8, 64])
def test_dynamic_growth_one_vector_at_a_time(rig_factory: Callable[..., Rig], vectors: int) -> None:
    queues = min(vectors, 32)
    r = rig_factory(queues=queues, vectors=vectors, pool=vectors)
    r.start_device()
    r.set_irqs(MSIX, TRIG_EFD, 0, 1, [])
    fds: dict[int, int] = {}
    for v in range(vectors):
        fds[v] = r.efd()
        before = {x["vector"]: x["trigger-fd"] for x in r.dev.describe()["vectors"]}
        r.set_irqs(MSIX, TRIG_EFD, v, 1, [fds[v]])
        after = {x["vector"]: x["trigger-fd"] for x in r.dev.describe()["vectors"]}
        assert {k: after[k] for k in before if k != v} == {k: before[k] for k in before if k != v}, \
            "a SET_IRQS for one vector touched another"
        assert r.nic.msix_enabled
        assert r.dev.pool.allocated == v + 1
        if v < queues:
            r.setup_queue(v, v)
        # every active queue writes one record: every vector's eventfd counts exactly one interrupt
        active = range(min(v + 1, queues))
        want = {q: r.producer(q) + 1 for q in active}
        for q in active:
            r.doorbell(q)
        wait_for(lambda: all(r.producer(q) == want[q] for q in active), what="records")
        for q in active:
            wait_for(lambda: peek_fd(fds[q]) > 0, what=f"vector {q}'s interrupt")
            assert consume(fds[q]) == 1
            seq, qq, vec, flags = r.record(q, want[q] - 1)
            assert (seq, qq, vec, flags) == (want[q], q, q, RecordFlag.DOORBELL)
    c = r.dev.counts
    assert c["msix-disables"] == 0 and c["msix-enables"] == 1
    assert c["dynamic-allocs"] == vectors - 1
    assert r.dev.set_irqs_by_result == {"ok": vectors + 1}
    assert r.dev.counts["intx-unhandled"] == 0


@pytest.mark.parametrize("dynamic", [True, False], ids=["dynamic", "noresize"])
def test_growth_beyond_the_set(rig_factory: Callable[..., Rig], dynamic: bool) -> None:
    r = rig_factory(dynamic=dynamic)
    r.set_irqs(MSIX, TRIG_EFD, 0, 1, [])
    if dynamic:
        r.set_irqs(MSIX, TRIG_EFD, 1, 1, [r.efd()])
        assert r.dev.pool.allocated == 2
    else:
        with pytest.raises(VfioError) as ei:
            r.set_irqs(MSIX, TRIG_EFD, 1, 1, [r.efd()])
        assert ei.value.errno == errno.EINVAL
        assert r.dev.counts["noresize-refusals"] == 1
        assert r.dev.pool.allocated == 1
        # the old way: disable, re-enable with one more
        r.set_irqs(MSIX, F.DATA_NONE | F.ACTION_TRIGGER, 0, 0)
        r.set_irqs(MSIX, TRIG_EFD, 0, 2, [r.efd(), r.efd()])
        assert r.dev.pool.allocated == 2 and r.dev.counts["msix-disables"] == 1


@pytest.mark.parametrize("fault", [True, False], ids=["fault-on", "fault-off"])
def test_noresize_window_loses_interrupts(rig_factory: Callable[..., Rig], fault: bool) -> None:
    """The NORESIZE path's disable -> re-enable: with the fault on (``fire-in-msix-disable-window``), every active queue writes a
    record inside the window; its interrupt goes to the unhandled INTx and never reaches a vector."""
    r = rig_factory(queues=4, vectors=8, dynamic=False)
    r.start_device()
    fds = [r.efd() for _ in range(4)]
    r.set_irqs(MSIX, TRIG_EFD, 0, 4, fds)
    for q in range(4):
        r.setup_queue(q, q)
    if fault:
        r.dev.faults.arm(FAULT_MSIX_WINDOW, "on")
    r.set_irqs(MSIX, F.DATA_NONE | F.ACTION_TRIGGER, 0, 0)  # disable ...
    assert not r.nic.msix_enabled
    new = [r.efd() for _ in range(5)]
    r.set_irqs(MSIX, TRIG_EFD, 0, 5, new)  # ... and re-enable with one more
    written = [r.producer(q) for q in range(4)]
    signalled = [peek_fd(fd) for fd in fds + new]
    if fault:
        assert written == [1, 1, 1, 1]
        assert [r.record(q, 0)[3] for q in range(4)] == [RecordFlag.FAULT_WINDOW] * 4
        assert signalled == [0] * 9, "the window's records got no MSI-X interrupt: lost"
        assert r.dev.counts["intx-unhandled"] >= 1
        assert sum(q["to-intx"] for q in r.nic.describe()["queues"]) == 4
        assert r.dev.window_fault.records == 4
    else:
        assert written == [0, 0, 0, 0]
        assert signalled == [0] * 9
        assert r.dev.counts["intx-unhandled"] == 0


def test_dynamic_path_has_no_window(rig_factory: Callable[..., Rig]) -> None:
    """The same growth on the dynamic path, fault on: MSI-X is never disabled, so it never fires,
    and every record's interrupt arrives."""
    r = rig_factory(queues=4, vectors=8, dynamic=True)
    r.start_device()
    r.dev.faults.arm(FAULT_MSIX_WINDOW, "on")
    fds = [r.efd() for _ in range(5)]
    r.set_irqs(MSIX, TRIG_EFD, 0, 4, fds[:4])
    for q in range(4):
        r.setup_queue(q, q)
    r.set_irqs(MSIX, TRIG_EFD, 4, 1, [fds[4]])
    for q in range(4):
        r.doorbell(q)
    wait_for(lambda: all(peek_fd(fds[q]) == 1 for q in range(4)), what="interrupts")
    assert r.dev.window_fault.fired == 0 and r.dev.counts["intx-unhandled"] == 0


# -- pool exhaustion ------------------------------------------------------------------------------------

def test_pool_exhaustion_enable_and_dynamic_add(rig_factory: Callable[..., Rig]) -> None:
    r = rig_factory(pool=2)
    with pytest.raises(VfioError) as ei:
        r.set_irqs(MSIX, TRIG_EFD, 0, 3, [r.efd() for _ in range(3)])
    assert (ei.value.errno, ei.value.available) == (errno.ENOSPC, 2)
    p = r.pool.describe()
    assert (p["allocated"], p["refused"], p["refused-vectors"]) == (0, 1, 3)
    assert r.dev.describe()["irq-type"] == "none"
    fds = [r.efd(), r.efd()]
    r.set_irqs(MSIX, TRIG_EFD, 0, 2, fds)
    with pytest.raises(VfioError) as ei:
        r.set_irqs(MSIX, TRIG_EFD, 2, 1, [r.efd()])
    assert (ei.value.errno, ei.value.available) == (errno.ENOSPC, 0)
    p = r.pool.describe()
    assert (p["allocated"], p["free"], p["refused"]) == (2, 0, 2)
    assert r.dev.describe()["last-refusal"] == {"index": "MSIX", "path": "dynamic", "vector": 2,
                                               "requested": 1, "available": 0}
    # the vectors in use are untouched
    r.set_irqs(MSIX, F.DATA_NONE | F.ACTION_TRIGGER, 0, 2)
    assert [consume(fd) for fd in fds] == [1, 1]


# -- loopback, MSI, INTx ----------------------------------------------------------------------------------

def test_loopback_triggers(rig: Rig) -> None:
    fds = [rig.efd() for _ in range(3)]
    rig.set_irqs(MSIX, TRIG_EFD, 0, 3, fds)
    rig.set_irqs(MSIX, F.DATA_NONE | F.ACTION_TRIGGER, 0, 3)
    assert [consume(fd) for fd in fds] == [1, 1, 1]
    rig.set_irqs(MSIX, F.DATA_BOOL | F.ACTION_TRIGGER, 0, 3, data=b"\x01\x00\x01")
    assert [consume(fd) for fd in fds] == [1, 0, 1]
    err, req = rig.efd(), rig.efd()
    rig.set_irqs(ERR, TRIG_EFD, 0, 1, [err])
    rig.set_irqs(REQ, TRIG_EFD, 0, 1, [req])
    rig.set_irqs(ERR, F.DATA_NONE | F.ACTION_TRIGGER, 0, 1)
    rig.set_irqs(REQ, F.DATA_BOOL | F.ACTION_TRIGGER, 0, 1, data=b"\x01")
    assert (consume(err), consume(req)) == (1, 1)
    assert rig.dev.request_release() and consume(req) == 1
    rig.set_irqs(REQ, F.DATA_NONE | F.ACTION_TRIGGER, 0, 0)  # unregister
    assert not rig.dev.request_release()


def test_msi_multivector(rig: Rig) -> None:
    rig.start_device()
    fds = [rig.efd() for _ in range(4)]
    rig.set_irqs(MSI, TRIG_EFD, 0, 3, fds[:3])  # 3 vectors: MME 2 (4 messages)
    assert rig.nic.msi_enabled and rig.nic.msi_mme == 2 and rig.dev.pool.allocated == 3
    assert rig.nic.intx_disabled
    for q in range(4):
        rig.setup_queue(q, q)
        rig.doorbell(q)
    wait_for(lambda: all(peek_fd(fds[q]) == 1 for q in range(3)), what="MSI interrupts")
    # vector 3 is within MME but has no host vector: nothing reaches any trigger for it
    wait_for(lambda: rig.producer(3) == 1, what="queue 3's record")
    assert rig.dev.counts["spurious-msi"] == 0  # masked in the function: pending, not sent
    assert rig.nic.get32(rig.nic.msi_cap + PCI_MSI_PENDING_64) & 0x8
    # de-assign vector 1: its interrupt latches in the pending bits; re-assign: delivered once
    rig.set_irqs(MSI, TRIG_EFD, 1, 1, [])
    rig.doorbell(1, 1)
    wait_for(lambda: rig.producer(1) == 2, what="queue 1's record")
    wait_for(lambda: rig.nic.get32(rig.nic.msi_cap + PCI_MSI_PENDING_64) & 0x2, what="pending bit")
    rig.set_irqs(MSI, TRIG_EFD, 1, 1, [fds[1]])
    assert peek_fd(fds[1]) == 2
    assert rig.nic.msi_counts[1].unmask_delivered == 1


@pytest.mark.parametrize("unmask_by", ["eventfd", "set_irqs"])
def test_intx_automask_unmask_no_storm(rig: Rig, unmask_by: str) -> None:
    rig.start_device()
    trig, unmask = rig.efd(), rig.efd()
    rig.set_irqs(INTX, TRIG_EFD, 0, 1, [trig])
    rig.set_irqs(INTX, F.DATA_EVENTFD | F.ACTION_UNMASK, 0, 1, [unmask])
    rig.setup_queue(0, 0)
    rig.doorbell(0, 1)
    wait_for(lambda: peek_fd(trig) == 1, what="INTx")
    assert rig.dev.describe()["intx"]["masked"] and rig.nic.intx_disabled
    # more records while masked: the level stays, no more signals
    rig.doorbell(0, 5)
    wait_for(lambda: rig.producer(0) == 6, what="records")
    assert peek_fd(trig) == 1 and rig.nic.irq_level == 1

    def do_unmask() -> None:
        if unmask_by == "eventfd":
            n = rig.dev.counts["intx-unmasks"]
            os.eventfd_write(unmask, 1)
            wait_for(lambda: rig.dev.counts["intx-unmasks"] == n + 1, what="the unmask eventfd")
        else:
            rig.set_irqs(INTX, F.DATA_NONE | F.ACTION_UNMASK, 0, 1)

    # unmask with the level still asserted: it fires exactly once more, and masks again
    do_unmask()
    assert peek_fd(trig) == 2 and rig.dev.describe()["intx"]["masked"]
    # the driver handles it: INT_STATUS read clears the level; unmask: nothing more
    assert rig.reg_read(REG_INT_STATUS) == 1
    do_unmask()
    assert peek_fd(trig) == 2 and not rig.dev.describe()["intx"]["masked"]
    assert rig.dev.counts["intx-automasks"] == 2 and rig.dev.counts["intx-unhandled"] == 0
    # loopback, then disable
    rig.set_irqs(INTX, F.DATA_NONE | F.ACTION_TRIGGER, 0, 1)
    assert peek_fd(trig) == 3
    rig.set_irqs(INTX, F.DATA_NONE | F.ACTION_TRIGGER, 0, 0)
    assert rig.dev.describe()["irq-type"] == "none"


def test_intx_unhandled_when_nothing_enabled(rig: Rig) -> None:
    rig.start_device()
    rig.setup_queue(0, 0)
    rig.doorbell(0)
    wait_for(lambda: rig.dev.counts["intx-unhandled"] == 1, what="the unhandled INTx")
    # the user's (virtual) INTx disable does not reach the function while INTx is not enabled
    rig.cfg_write16(R.PCI_COMMAND, R.PCI_COMMAND_MEMORY | R.PCI_COMMAND_MASTER | R.PCI_COMMAND_INTX_DISABLE)
    assert rig.cfg_read16(R.PCI_COMMAND) & R.PCI_COMMAND_INTX_DISABLE
    assert not rig.nic.intx_disabled


# -- PBA latching -------------------------------------------------------------------------------------------

def test_pba_latches_without_trigger_and_delivers_once(rig: Rig) -> None:
    rig.start_device()
    rig.set_irqs(MSIX, TRIG_EFD, 0, 1, [])
    rig.setup_queue(0, 0)
    rig.doorbell(0, 1)
    wait_for(lambda: rig.nic.msix_pending(0), what="the PBA bit")
    rig.doorbell(0, 2)
    wait_for(lambda: rig.producer(0) == 3, what="records")
    pba = rig.dev.region_read(VfioPciRegion.BAR4, rig.nic.msix_pba_offset, 8)
    assert pba[0] & 1
    fd = rig.efd()
    rig.set_irqs(MSIX, TRIG_EFD, 0, 1, [fd])
    assert peek_fd(fd) == 1, "the pending interrupt is delivered once, to the new trigger"
    assert not rig.nic.msix_pending(0)
    c = rig.nic.msix_counts[0]
    assert (c.unmask_delivered, c.sent) == (1, 1) and c.pended >= 2


# -- queues: DMA, full ring, no client -------------------------------------------------------------------------

def test_ring_full_waits_and_dma_pause(rig: Rig) -> None:
    rig.start_device()
    rig.set_irqs(MSIX, TRIG_EFD, 0, 1, [rig.efd()])
    rig.setup_queue(0, 0, size=4)
    rig.doorbell(0, 10)
    wait_for(lambda: rig.producer(0) == 4, what="a full ring")
    wait_for(lambda: rig.nic.queues[0].ring_full_waits == 1, what="the full-ring wait")
    assert rig.producer(0) == 4 and rig.nic.queues[0].doorbell == 6
    rig.nic.set_dma(None)
    rig.reg_write(rig.qreg(0, Q_CONSUMER), 4)
    time.sleep(0)  # (no wait: nothing may happen without a DMA space)
    assert rig.producer(0) == 4
    rig.nic.set_dma(rig.dma)
    wait_for(lambda: rig.producer(0) == 8, what="records after the DMA space came back")
    assert [rig.record(0, i, size=4)[0] for i in range(4, 8)] == [5, 6, 7, 8]
    rig.reg_write(rig.qreg(0, Q_CONSUMER), 8)
    wait_for(lambda: rig.producer(0) == 10, what="the rest")


def test_dma_error_halts_the_queue(rig: Rig) -> None:
    rig.start_device()
    rig.reg_write(rig.qreg(0, Q_RING_LO), 0x9000_0000)
    rig.reg_write(rig.qreg(0, Q_SIZE), 8)
    rig.reg_write(rig.qreg(0, Q_ENABLE), 1)
    rig.doorbell(0)
    wait_for(lambda: rig.nic.queues[0].dma_errors == 1, what="the DMA error")
    assert rig.reg_read(rig.qreg(0, Q_STATUS)) & Q_STATUS_DMA_ERROR and rig.producer(0) == 0


def test_rate_generates_records(rig: Rig) -> None:
    rig.start_device()
    fd = rig.efd()
    rig.set_irqs(MSIX, TRIG_EFD, 0, 1, [fd])
    rig.setup_queue(0, 0, size=256)
    rig.reg_write(rig.qreg(0, Q_RATE), 2000)
    wait_for(lambda: rig.producer(0) >= 50, what="rate records")
    rig.reg_write(rig.qreg(0, Q_RATE), 0)
    assert peek_fd(fd) >= 1
    assert rig.record(0, 0)[3] == RecordFlag.RATE


# -- reset and release ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("reset", [True, False], ids=["reset", "no-reset"])
def test_release(rig_factory: Callable[..., Rig], reset: bool) -> None:
    r = rig_factory(pool=8)
    cfg0 = r.dev.region_read(VfioPciRegion.CONFIG, 0, 256)
    fds = [r.efd() for _ in range(5)]
    r.start_device()
    r.set_irqs(MSIX, TRIG_EFD, 0, 3, fds[:3])
    r.set_irqs(ERR, TRIG_EFD, 0, 1, [fds[3]])
    r.set_irqs(REQ, TRIG_EFD, 0, 1, [fds[4]])
    r.cfg_write16(r.nic.msix_cap + R.PCI_MSIX_FLAGS, R.PCI_MSIX_FLAGS_ENABLE)
    r.setup_queue(0, 0)
    r.set_irqs(MSIX, TRIG_EFD, 1, 1, [])  # vector 1 loses its trigger: its interrupt latches
    r.reg_write(r.qreg(0, Q_VECTOR), 1)
    r.doorbell(0)
    wait_for(lambda: r.nic.msix_pending(1), what="a pending bit")
    assert copies_of(fds) == 5 + 4  # ours, and the host's dups: vectors 0 and 2, ERR, REQ
    r.dev.release(reset=reset)
    assert copies_of(fds) == 5, "every fd the host kept is closed"
    assert r.pool.describe()["allocated"] == 0 and r.pool.available == 8
    assert not r.nic.msix_enabled and r.nic.dma is None
    assert all(r.nic.msix_entry(v)[2] for v in range(r.nic.nvectors))
    assert r.nic.msix_pba == bytes(len(r.nic.msix_pba))
    cfg = r.dev.region_read(VfioPciRegion.CONFIG, 0, 256)
    if reset:
        assert cfg == cfg0
        assert r.nic.queues[0].enabled is False and r.producer(0) == 0
    else:
        assert cfg != cfg0  # the device state is retained for a reconnecting client
        assert r.nic.queues[0].enabled and r.producer(0) == 1


def test_device_reset_keeps_header_and_disables_irqs(rig: Rig) -> None:
    rig.start_device()
    rig.set_irqs(MSIX, TRIG_EFD, 0, 2, [rig.efd(), rig.efd()])
    rig.setup_queue(0, 0)
    rig.dev.reset()
    assert rig.dev.describe()["irq-type"] == "none" and rig.pool.allocated == 0
    assert rig.cfg_read16(R.PCI_COMMAND) & R.PCI_COMMAND_MASTER  # pci_try_reset_function restores it
    assert not rig.nic.queues[0].enabled and rig.nic.flr_count == 1


def test_user_flr_restores_host_msix(rig: Rig) -> None:
    rig.start_device()
    fd = rig.efd()
    rig.set_irqs(MSIX, TRIG_EFD, 0, 1, [fd])
    devctl = rig.nic.exp_cap + R.PCI_EXP_DEVCTL
    rig.cfg_write16(devctl, R.PCI_EXP_DEVCTL_BCR_FLR)
    assert rig.nic.flr_count == 1 and rig.nic.msix_enabled and not rig.nic.msix_entry(0)[2]
    rig.setup_queue(0, 0)
    rig.doorbell(0)
    wait_for(lambda: peek_fd(fd) == 1, what="the interrupt after the FLR")


def test_failed_block_is_rolled_back_as_vfio_pci_does(rig: Rig) -> None:
    """vfio_msi_set_block: a vector that fails de-assigns every vector of the call up to and
    including it (their old triggers are gone too); the vectors after it are not touched."""
    old = [rig.efd() for _ in range(3)]
    rig.set_irqs(MSIX, TRIG_EFD, 0, 3, old)
    rd, wr = os.pipe()
    rig.efds += [rd, wr]
    with pytest.raises(VfioError) as ei:
        rig.set_irqs(MSIX, TRIG_EFD, 0, 2, [rig.efd(), rd])
    assert ei.value.errno == errno.EINVAL
    trig = {v["vector"]: v["trigger-fd"] for v in rig.dev.describe()["vectors"]}
    assert trig[0] is None and trig[1] is None and trig[2] is not None
    assert rig.pool.allocated == 3  # host vectors stay cached until the index is disabled
    rig.set_irqs(MSIX, F.DATA_NONE | F.ACTION_TRIGGER, 0, 3)
    assert [consume(fd) for fd in old] == [0, 0, 1]


def _thread_cpu_ticks(native_id: int) -> int:
    with open(f"/proc/self/task/{native_id}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])  # utime + stime


def test_engine_idles_without_cpu(rig: Rig) -> None:
    """A queue waiting on a full ring and a paused DMA space: the engine sleeps on its condition
    variable (a polling loop would burn a whole core; we allow 30% of the window)."""
    rig.start_device()
    rig.set_irqs(MSIX, TRIG_EFD, 0, 1, [rig.efd()])
    rig.setup_queue(0, 0, size=4)
    rig.doorbell(0, 100)
    wait_for(lambda: rig.nic.queues[0].ring_full_waits == 1, what="the full ring")
    rig.setup_queue(1, 0)
    rig.nic.set_dma(None)
    rig.doorbell(1, 5)
    engine = next(t for t in threading.enumerate() if t.name == "kc-nic-engine")
    assert engine.native_id is not None
    t0, c0 = time.monotonic(), _thread_cpu_ticks(engine.native_id)
    time.sleep(0.5)  # the measurement window, not a wait for an event
    dt, dc = time.monotonic() - t0, _thread_cpu_ticks(engine.native_id) - c0
    hz = os.sysconf("SC_CLK_TCK")
    assert dc / hz < 0.3 * dt, f"engine used {dc / hz:.3f}s of CPU in {dt:.3f}s idle"
