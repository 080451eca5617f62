"""kickcall-nic: the host PCIe function behind vfio-pci, a multi-queue NIC-like device.

The function is what a physical device would be on the host: config space, BARs, an interrupt
controller that follows the PCI rules (MSI-X, MSI, INTx), and a completion engine that writes
records into memory by DMA and raises the queue's interrupt.  It knows nothing of VFIO: the host
kernel's side (``kickcall.vfio.host.VfioPciDevice``) programs its MSI/MSI-X registers as the Linux
PCI/MSI core would, and receives its messages and its INTx level through an ``InterruptSink``.

Config space (built on ``kickcall.pci.device.PCIDevice``: its byte array with ``wmask``/``w1cmask``,
capability list, BAR registers with sizing and the PCIe capability's FLR come for free; the MSI
and MSI-X capabilities are this module's own because the host, not a config write, drives them):

* vendor 0x1b36 (Red Hat, QEMU's test-device vendor), device 0x1100, class 0x020000 (Ethernet),
  interrupt pin A (``intx_pin=0``: no pin);
* PCIe capability (endpoint, FLR capable) -- ``pcie=False`` gives a conventional PCI function
  (no PCIe capability, hence no ERR index in vfio-pci and no FLR);
* MSI capability: 64-bit, per-vector masking, Multiple Message Capable ``msi_vectors`` (1..32,
  a power of two); Message Control's Enable and MME, address, data and mask bits are written by
  the host (``msi_program``, ``msi_set_mask``), never through a config write (read-only in
  ``wmask``): vfio-pci virtualizes them for the user;
* MSI-X capability, ``vectors`` entries (1..2048), table in BAR4 at 0 and PBA right after it;
  Enable and Function Mask likewise host-owned (``msix_enable``, ``msix_set_function_mask``);
* Command's INTX_DISABLE and Status' INTERRUPT bit (the device's INTx level, whatever DisINTx);
* FLR: Initiate FLR in the PCIe Device Control register resets the function (``reset()``).

BAR0 (8 KiB, trapped: the user reaches it only by region access): registers, 32-bit, little-endian.

=================  ======  ====  =============================================================
offset             name    acc.  meaning
=================  ======  ====  =============================================================
0x000              ID      RO    0x4e434b43 ("CKCN")
0x004              VERSION RO    1
0x008              NQUEUES RO    number of queues
0x00C              NVEC    RO    MSI-X table size
0x010              INT_STATUS RC one bit per queue, set when the queue raised its interrupt in
                                 INTx mode (MSI and MSI-X off); reading returns and clears it.
                                 The INTx level is asserted while any bit is set
0x100 + 0x40*q     per queue q (q < 32):
  +0x00            RING_LO RW    ring base IOVA, low 32 bits (written while the queue is off)
  +0x04            RING_HI RW    ring base IOVA, high 32 bits
  +0x08            SIZE    RW    ring size in 16-byte entries, a power of two (0: none)
  +0x0C            VECTOR  RW    MSI-X entry, or MSI vector, the queue raises
  +0x10            ENABLE  RW    bit 0: the queue runs.  0->1 resets PRODUCER and CONSUMER to 0
  +0x14            PRODUCER RO   the device's producer index (free-running u32)
  +0x18            CONSUMER RW   the driver's consumer index (free-running u32)
  +0x1C            DOORBELL WO   write N: generate N records (adds up; reads 0)
  +0x20            RATE    RW    records per second generated on their own (0: off)
  +0x24            STATUS  RO    bit 0 running, bit 1 waiting on a full ring, bit 2 DMA error
                                 (the queue stopped; re-enable it), bit 3 bad ring (size not a
                                 power of two, or CONSUMER ahead of PRODUCER)
  +0x28            BACKLOG RO    records asked for (doorbell) and not written yet
=================  ======  ====  =============================================================

A completion record (16 bytes at ``ring + (index % size) * 16``): ``seq`` u64 (per queue, from 1,
kept across ENABLE and reset only by a function reset), ``queue`` u16, ``vector`` u16, ``flags``
u32 (``RecordFlag``: 1 doorbell, 2 rate, 4 written by the ``fire-in-msix-disable-window`` fault).
The device never overwrites a record the driver has not consumed: with ``PRODUCER - CONSUMER ==
SIZE`` the queue waits (``ring-full-waits`` counts the times it started waiting) until the driver
writes CONSUMER.

BAR4: the MSI-X table at 0 (``vectors * 16`` bytes) and the PBA after it
(``ALIGN_UP(vectors, 64) / 8`` bytes, QEMU's sizing), both trapped; from the next page boundary to
the end of the BAR, device memory backed by a memfd that the server offers as a sparse mmap area
(``bar4_memfd``, ``bar4_mmap_areas``).  Its first ``4 * queues`` bytes are written by the device:
each queue's PRODUCER, mirrored after every batch (a driver may poll it instead of BAR0).

The engine: one thread per device (``kc-nic-engine``) waits on the device's condition variable
and never polls: a doorbell, a CONSUMER write, ENABLE, RATE, Bus Master, ``set_dma`` or ``stop``
wakes it; a queue with a rate sets the wait's timeout to its next record.  It reserves a batch of
records (at most ``BATCH``, contiguous in the ring) under the lock, writes them by DMA **outside
the lock** (the DMA space may be a socket to the client), then takes the lock to publish PRODUCER
and raise the queue's interrupt once for the batch.  No DMA space (``set_dma(None)``: no client)
or Bus Master off: the queues wait, nothing is lost.

Interrupt delivery (``raise_queue``), the PCI rules:

* MSI-X enabled: a masked entry, or the function mask, latches the vector's PBA bit (``pended``);
  unmasking the entry (or the function) with the bit set sends the message once
  (``unmask-delivered``) and clears it.  Unmasked: the entry's message goes to the sink (``sent``);
* MSI enabled: vector ``v`` must be below ``2**MME`` (else ``dropped-invalid``); the data is the
  programmed data with ``v`` in its low MME bits; a per-vector mask bit latches the pending bit;
* neither: INTx.  The queue's INT_STATUS bit is set (``to-intx``); the pin is asserted while
  INT_STATUS is non-zero unless Command's INTX_DISABLE is set (a raise while it is set counts
  ``intx-disabled``: the pin stays low, and goes high when DisINTx is cleared with the bit still
  set).  Nothing latches in the PBA.

PCIe errors (the AER capability, ``add_aer_cap``, at 0x100): ``inject_error`` is QEMU's
``pcie_aer_inject_error`` on the function.  An uncorrectable **fatal** error freezes the function
(``error_frozen``): its engine writes no more records and raises no interrupts, and its config and
BAR reads return all-F's, writes are dropped -- the link is down -- until a reset (a secondary bus
reset of the port above it, or an FLR) brings it back.  ``link_up`` is the link as the port sees
it: False during a secondary bus reset's link-down window (reads all-F's then too).  A non-fatal
error only sets the status: the function keeps working.  Records already written stay in memory;
a batch whose DMA was in flight when the function froze is counted (PRODUCER moves) but raises no
interrupt, so ``producers()`` says what completed before the error.  The BARs are never decoded in
a host address space (``update_mappings`` does nothing): the host reaches them through vfio-pci's
regions only.

Locking: all of the function's state is guarded by ``lock`` (an RLock) and ``cond``
(a Condition on it).  ``VfioPciDevice`` passes its own lock in, so that the host and the device
share one lock; the sink is called with the lock held.
"""

from __future__ import annotations

import enum
import errno
import logging
import mmap
import os
import struct
import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

from ..memory import IORegion
from ..pci import regs as R
from ..pci.regs import (
    PCI_MSI_ADDRESS_HI, PCI_MSI_ADDRESS_LO, PCI_MSI_DATA_64, PCI_MSI_FLAGS, PCI_MSI_FLAGS_64BIT,
    PCI_MSI_FLAGS_ENABLE, PCI_MSI_FLAGS_MASKBIT, PCI_MSI_FLAGS_QMASK, PCI_MSI_FLAGS_QSIZE,
    PCI_MSI_MASK_64, PCI_MSI_PENDING_64,
)
from ..pci.device import PCIDevice
from ..threads import start_thread

if TYPE_CHECKING:
    from ..pci.aer import PCIEAERErr
    from .host import DmaSpace

__all__ = ["NicFunction", "InterruptSink", "RecordFlag", "RECORD", "NIC_VENDOR_ID", "NIC_DEVICE_ID"]

log = logging.getLogger("kickcall.vfio.nic")

NIC_VENDOR_ID = 0x1B36
NIC_DEVICE_ID = 0x1100
NIC_CLASS = 0x020000
NIC_ID_MAGIC = 0x4E434B43
NIC_VERSION = 1
MAX_QUEUES = 32
MAX_VECTORS = 2048

BAR0_SIZE = 0x2000
REG_ID = 0x000
REG_VERSION = 0x004
REG_NQUEUES = 0x008
REG_NVEC = 0x00C
REG_INT_STATUS = 0x010
QUEUE_BASE = 0x100
QUEUE_STRIDE = 0x40
Q_RING_LO = 0x00
Q_RING_HI = 0x04
Q_SIZE = 0x08
Q_VECTOR = 0x0C
Q_ENABLE = 0x10
Q_PRODUCER = 0x14
Q_CONSUMER = 0x18
Q_DOORBELL = 0x1C
Q_RATE = 0x20
Q_STATUS = 0x24
Q_BACKLOG = 0x28

Q_STATUS_RUNNING = 0x1
Q_STATUS_RING_FULL = 0x2
Q_STATUS_DMA_ERROR = 0x4
Q_STATUS_BAD_RING = 0x8

MSIX_BAR = 4

PCI_CAP_MSI_SIZEOF_64 = 24

#: ``struct {u64 seq; u16 queue; u16 vector; u32 flags;}``
RECORD = struct.Struct("<QHHI")


class RecordFlag(enum.IntFlag):
    """``flags`` of a completion record: why the device wrote it."""

    DOORBELL = 1
    RATE = 2
    FAULT_WINDOW = 4


class InterruptSink(Protocol):
    """Where the function's interrupts go: the host's interrupt controller (MSI messages) and its
    INTx line.  Called with the function's lock held."""

    def msi_message(self, address: int, data: int) -> None: ...

    def intx_changed(self, asserted: bool) -> None: ...


def _align_up(v: int, a: int) -> int:
    return (v + a - 1) // a * a


def _pow2_at_least(v: int) -> int:
    p = 1
    while p < v:
        p <<= 1
    return p


@dataclass
class VectorCounters:
    """One interrupt vector's counts (MSI-X entry or MSI vector)."""

    raised: int = 0  # the device asked for it
    sent: int = 0  # a message went to the host
    pended: int = 0  # masked: the pending bit latched
    unmask_delivered: int = 0  # sent on unmask because its pending bit was set
    lost_on_disable: int = 0  # pending when MSI(-X) was disabled: the bit is gone

    def describe(self) -> dict:
        return {"raised": self.raised, "sent": self.sent, "pended": self.pended,
                "delivered-on-unmask": self.unmask_delivered, "lost-on-disable": self.lost_on_disable}


@dataclass
class NicQueue:
    """One completion queue's registers and counts."""

    index: int
    ring_base: int = 0
    size: int = 0
    vector: int = 0
    enabled: bool = False
    producer: int = 0
    consumer: int = 0
    doorbell: int = 0
    rate: int = 0
    credit: float = 0.0
    last_t: float = 0.0
    seq: int = 0
    halted: bool = False
    waiting_full: bool = False
    inflight: bool = False
    epoch: int = 0
    # counts
    raised: int = 0
    records: int = 0
    ring_full_waits: int = 0
    dma_errors: int = 0
    to_intx: int = 0
    intx_disabled: int = 0
    dropped_invalid: int = 0

    @property
    def used(self) -> int:
        return (self.producer - self.consumer) & 0xFFFFFFFF

    @property
    def ring_ok(self) -> bool:
        return self.size > 0 and not self.size & (self.size - 1) and self.used <= self.size

    def status(self) -> int:
        s = 0
        if self.enabled and not self.halted:
            s |= Q_STATUS_RUNNING
        if self.waiting_full:
            s |= Q_STATUS_RING_FULL
        if self.halted:
            s |= Q_STATUS_DMA_ERROR
        if self.enabled and not self.ring_ok:
            s |= Q_STATUS_BAD_RING
        return s

    def describe(self) -> dict:
        return {"queue": self.index, "enabled": self.enabled, "ring": self.ring_base, "size": self.size,
                "vector": self.vector, "producer": self.producer, "consumer": self.consumer,
                "seq": self.seq, "backlog": self.doorbell, "rate": self.rate, "status": self.status(),
                "raised": self.raised, "records-written": self.records,
                "ring-full-waits": self.ring_full_waits, "dma-errors": self.dma_errors,
                "to-intx": self.to_intx, "intx-disabled": self.intx_disabled,
                "dropped-invalid-vector": self.dropped_invalid}


@dataclass
class _Job:
    """Records reserved in one queue's ring, written by DMA outside the lock."""

    q: NicQueue
    epoch: int
    iova: int
    data: bytes
    n: int
    from_doorbell: int
    from_rate: int
    dma_gen: int
    raise_after: bool = True
    err: BaseException | None = field(default=None)


class NicFunction(PCIDevice):
    """The kickcall-nic PCIe function (see the module docstring for its registers)."""

    #: most records one DMA write carries (one interrupt per batch)
    BATCH = 64

    def __init__(self, name: str = "kickcall-nic", *, queues: int = 4, vectors: int = 16,
                 msi_vectors: int = 32, intx_pin: int = 1, pcie: bool = True,
                 lock: threading.RLock | None = None) -> None:
        if not 1 <= queues <= MAX_QUEUES:
            raise ValueError(f"queues must be 1..{MAX_QUEUES}")
        if not 1 <= vectors <= MAX_VECTORS:
            raise ValueError(f"MSI-X supports 1..{MAX_VECTORS} vectors")
        if msi_vectors not in (1, 2, 4, 8, 16, 32):
            raise ValueError("MSI's Multiple Message Capable is a power of two, 1..32")
        super().__init__(name, vendor_id=NIC_VENDOR_ID, device_id=NIC_DEVICE_ID, class_code=NIC_CLASS,
                         subsystem_vendor_id=NIC_VENDOR_ID, subsystem_id=NIC_DEVICE_ID,
                         interrupt_pin=intx_pin, pcie=pcie)
        self.lock: threading.RLock = lock if lock is not None else threading.RLock()
        self.cond = threading.Condition(self.lock)
        self.pcie = pcie
        self.sink: InterruptSink | None = None
        self.queues = [NicQueue(i) for i in range(queues)]
        self.int_status = 0
        self._intx_pin = False
        self._dma: DmaSpace | None = None
        self._dma_gen = 0
        self._engine: threading.Thread | None = None
        self._stopping = False
        self._rr = 0
        self.engine_wakeups = 0
        self.ignored_writes = 0
        self.error_frozen = False
        """A fatal uncorrectable error froze the function (cleared by a reset)."""
        self.link_up = True
        """The link as the port above sees it (False inside a secondary bus reset's window)."""
        self.freezes = 0
        self.dropped_while_down = 0
        # BAR0
        self.bar0 = IORegion(f"{name}-regs", BAR0_SIZE, self._bar0_io_read, self._bar0_io_write)
        self.register_bar(0, self.bar0)
        # BAR4: MSI-X table, PBA, then the mmappable device memory
        self.nvectors = vectors
        self.msix_table_offset = 0
        self.msix_pba_offset = vectors * R.PCI_MSIX_ENTRY_SIZE
        self.msix_table = bytearray(vectors * R.PCI_MSIX_ENTRY_SIZE)
        self.msix_pba = bytearray(_align_up(vectors, 64) // 8)
        self.bar4_mmap_start = _align_up(self.msix_pba_offset + len(self.msix_pba), mmap.PAGESIZE)
        self.bar4_size = _pow2_at_least(self.bar4_mmap_start + mmap.PAGESIZE)
        self.bar4 = IORegion(f"{name}-msix", self.bar4_size, self._bar4_io_read, self._bar4_io_write)
        self.register_bar(MSIX_BAR, self.bar4, mem64=True)
        self.bar4_memfd = os.memfd_create(f"{name}-bar4", os.MFD_CLOEXEC)
        os.ftruncate(self.bar4_memfd, self.bar4_size)
        self._bar4_map = mmap.mmap(self.bar4_memfd, self.bar4_size)
        # capabilities (the PCIe one was added by PCIDevice)
        self.msi_vectors = msi_vectors
        self.msi_cap = self.add_capability(R.PCI_CAP_ID_MSI, PCI_CAP_MSI_SIZEOF_64)
        self._msi_flags_ro = (((msi_vectors.bit_length() - 1) << 1) & PCI_MSI_FLAGS_QMASK) \
            | PCI_MSI_FLAGS_64BIT | PCI_MSI_FLAGS_MASKBIT
        self.msix_cap = self.add_capability(R.PCI_CAP_ID_MSIX, R.PCI_CAP_MSIX_SIZEOF)
        self.set_config(self.msix_cap + R.PCI_MSIX_TABLE, self.msix_table_offset | MSIX_BAR, 4)
        self.set_config(self.msix_cap + R.PCI_MSIX_PBA, self.msix_pba_offset | MSIX_BAR, 4)
        self.msix_counts = [VectorCounters() for _ in range(vectors)]
        self.msi_counts = [VectorCounters() for _ in range(msi_vectors)]
        self._reset_interrupt_regs()

    # -- lifecycle -----------------------------------------------------------------------------
    def start(self) -> None:
        """Start the engine thread (``kc-nic-engine``)."""
        with self.lock:
            if self._engine is not None:
                return
            self._stopping = False
            self._engine = start_thread(self._engine_main, "kc-nic-engine")

    def stop(self) -> None:
        """Stop the engine thread and wait for it (an in-flight DMA write finishes first)."""
        with self.lock:
            t, self._engine = self._engine, None
            self._stopping = True
            self.cond.notify_all()
        if t is not None and t is not threading.current_thread():
            t.join(timeout=60)

    def close(self) -> None:
        """Stop the engine and release the BAR4 memfd."""
        self.stop()
        with self.lock:
            if self.bar4_memfd >= 0:
                self._bar4_map.close()
                os.close(self.bar4_memfd)
                self.bar4_memfd = -1

    def set_sink(self, sink: InterruptSink | None) -> None:
        with self.lock:
            self.sink = sink

    def set_dma(self, space: DmaSpace | None, *, wait: float = 0.0) -> bool:
        """Give the function a DMA space (the client's memory), or take it away (None: the queues
        wait; no record is lost).  With *wait* > 0, wait up to that many seconds for a DMA write
        in flight on the old space to finish (do not wait from a thread that the DMA write itself
        needs, e.g. the one that reads DMA_WRITE replies).  Returns False on a timeout."""
        with self.lock:
            self._dma = space
            self._dma_gen += 1
            self.cond.notify_all()
            if wait > 0:
                return self.cond.wait_for(lambda: not any(q.inflight for q in self.queues), timeout=wait)
            return True

    @property
    def dma(self) -> DmaSpace | None:
        return self._dma

    # -- the interrupt controller's registers, as the host's PCI/MSI core writes them -----------------
    def _reset_interrupt_regs(self) -> None:
        self.set_config(self.msi_cap + PCI_MSI_FLAGS, self._msi_flags_ro, 2)
        for off in (PCI_MSI_ADDRESS_LO, PCI_MSI_ADDRESS_HI, PCI_MSI_DATA_64, PCI_MSI_MASK_64, PCI_MSI_PENDING_64):
            self.set_config(self.msi_cap + off, 0, 4)
        self.set_config(self.msix_cap + R.PCI_MSIX_FLAGS, self.nvectors - 1, 2)
        self.msix_table[:] = bytes(len(self.msix_table))
        for v in range(self.nvectors):
            self.msix_table[v * R.PCI_MSIX_ENTRY_SIZE + R.PCI_MSIX_ENTRY_VECTOR_CTRL] = R.PCI_MSIX_ENTRY_CTRL_MASKBIT
        self.msix_pba[:] = bytes(len(self.msix_pba))

    @property
    def msix_control(self) -> int:
        return self.get16(self.msix_cap + R.PCI_MSIX_FLAGS)

    @property
    def msix_enabled(self) -> bool:
        return bool(self.msix_control & R.PCI_MSIX_FLAGS_ENABLE)

    @property
    def msix_function_masked(self) -> bool:
        return bool(self.msix_control & R.PCI_MSIX_FLAGS_MASKALL)

    def msix_entry(self, v: int) -> tuple[int, int, bool]:
        """(address, data, masked) of table entry *v*."""
        lo, hi, data, ctrl = struct.unpack_from("<IIII", self.msix_table, v * R.PCI_MSIX_ENTRY_SIZE)
        return (hi << 32) | lo, data, bool(ctrl & R.PCI_MSIX_ENTRY_CTRL_MASKBIT)

    def msix_pending(self, v: int) -> bool:
        return bool(self.msix_pba[v // 8] & (1 << (v % 8)))

    def _msix_masked(self, v: int) -> bool:
        return self.msix_function_masked or self.msix_entry(v)[2]

    def msix_enable(self, on: bool) -> None:
        """Set or clear MSI-X Enable.  Disabling drops every pending bit (counted ``lost-on-disable``):
        with MSI-X off nothing latches and nothing is delivered."""
        with self.lock:
            ctl = self.msix_control
            ctl = ctl | R.PCI_MSIX_FLAGS_ENABLE if on else ctl & ~R.PCI_MSIX_FLAGS_ENABLE
            self.set_config(self.msix_cap + R.PCI_MSIX_FLAGS, ctl, 2)
            if not on:
                for v in range(self.nvectors):
                    if self.msix_pending(v):
                        self.msix_counts[v].lost_on_disable += 1
                self.msix_pba[:] = bytes(len(self.msix_pba))
            self._update_intx()

    def msix_set_function_mask(self, on: bool) -> None:
        with self.lock:
            ctl = self.msix_control
            ctl = ctl | R.PCI_MSIX_FLAGS_MASKALL if on else ctl & ~R.PCI_MSIX_FLAGS_MASKALL
            self.set_config(self.msix_cap + R.PCI_MSIX_FLAGS, ctl, 2)
            if not on and self.msix_enabled:
                for v in range(self.nvectors):
                    self._msix_deliver_pending(v)

    def msix_set_entry(self, v: int, address: int, data: int) -> None:
        """Write entry *v*'s message (software must do it while the entry is masked)."""
        with self.lock:
            struct.pack_into("<III", self.msix_table, v * R.PCI_MSIX_ENTRY_SIZE,
                             address & 0xFFFFFFFF, address >> 32, data & 0xFFFFFFFF)

    def msix_mask(self, v: int, masked: bool) -> None:
        """Set or clear entry *v*'s mask bit; unmasking with its PBA bit set sends it once."""
        with self.lock:
            off = v * R.PCI_MSIX_ENTRY_SIZE + R.PCI_MSIX_ENTRY_VECTOR_CTRL
            if masked:
                self.msix_table[off] |= R.PCI_MSIX_ENTRY_CTRL_MASKBIT
            else:
                self.msix_table[off] &= ~R.PCI_MSIX_ENTRY_CTRL_MASKBIT & 0xFF
                if self.msix_enabled:
                    self._msix_deliver_pending(v)

    def _msix_deliver_pending(self, v: int) -> None:
        if self.msix_pending(v) and not self._msix_masked(v):
            self.msix_pba[v // 8] &= ~(1 << (v % 8)) & 0xFF
            self.msix_counts[v].unmask_delivered += 1
            self._msix_send(v)

    def _msix_send(self, v: int) -> None:
        address, data, _ = self.msix_entry(v)
        self.msix_counts[v].sent += 1
        if self.sink is not None:
            self.sink.msi_message(address, data)

    @property
    def msi_control(self) -> int:
        return self.get16(self.msi_cap + PCI_MSI_FLAGS)

    @property
    def msi_enabled(self) -> bool:
        return bool(self.msi_control & PCI_MSI_FLAGS_ENABLE)

    @property
    def msi_mme(self) -> int:
        """Multiple Message Enable: log2 of the vectors the host gave the function."""
        return (self.msi_control & PCI_MSI_FLAGS_QSIZE) >> 4

    def msi_program(self, enabled: bool, mme: int, address: int, data: int) -> None:
        """Write MSI's address, data, MME and Enable (the PCI/MSI core's ``pci_msi_enable``; the
        enabled-to-disabled transition drops the pending bits)."""
        with self.lock:
            self.set_config(self.msi_cap + PCI_MSI_ADDRESS_LO, address & 0xFFFFFFFF, 4)
            self.set_config(self.msi_cap + PCI_MSI_ADDRESS_HI, address >> 32, 4)
            self.set_config(self.msi_cap + PCI_MSI_DATA_64, data & 0xFFFF, 2)
            ctl = self._msi_flags_ro | ((mme << 4) & PCI_MSI_FLAGS_QSIZE) | (PCI_MSI_FLAGS_ENABLE if enabled else 0)
            self.set_config(self.msi_cap + PCI_MSI_FLAGS, ctl, 2)
            if not enabled:
                pend = self.get32(self.msi_cap + PCI_MSI_PENDING_64)
                for v in range(self.msi_vectors):
                    if pend & (1 << v):
                        self.msi_counts[v].lost_on_disable += 1
                self.set_config(self.msi_cap + PCI_MSI_PENDING_64, 0, 4)
            self._update_intx()

    def msi_set_mask(self, v: int, masked: bool) -> None:
        """Set or clear MSI vector *v*'s mask bit; unmasking with its pending bit set sends it once."""
        with self.lock:
            off = self.msi_cap + PCI_MSI_MASK_64
            m = self.get32(off)
            m = m | (1 << v) if masked else m & ~(1 << v)
            self.set_config(off, m, 4)
            poff = self.msi_cap + PCI_MSI_PENDING_64
            pend = self.get32(poff)
            if not masked and pend & (1 << v) and self.msi_enabled:
                self.set_config(poff, pend & ~(1 << v), 4)
                self.msi_counts[v].unmask_delivered += 1
                self._msi_send(v)

    def msi_message_for(self, v: int) -> tuple[int, int]:
        """The (address, data) MSI vector *v* sends: the vector in the data's low MME bits."""
        lo = self.get32(self.msi_cap + PCI_MSI_ADDRESS_LO)
        hi = self.get32(self.msi_cap + PCI_MSI_ADDRESS_HI)
        data = self.get16(self.msi_cap + PCI_MSI_DATA_64)
        low = (1 << self.msi_mme) - 1
        return (hi << 32) | lo, (data & ~low) | v

    def _msi_send(self, v: int) -> None:
        address, data = self.msi_message_for(v)
        self.msi_counts[v].sent += 1
        if self.sink is not None:
            self.sink.msi_message(address, data)

    # -- INTx ----------------------------------------------------------------------------------------
    @property
    def intx_disabled(self) -> bool:
        return bool(self.get16(R.PCI_COMMAND) & R.PCI_COMMAND_INTX_DISABLE)

    @property
    def intx_asserted(self) -> bool:
        """The INTx pin as the host sees it (level and not DisINTx)."""
        return self._intx_pin

    def set_intx_disable(self, on: bool) -> None:
        """Set or clear Command's INTX_DISABLE (the host's ``pci_intx``)."""
        with self.lock:
            cmd = self.get16(R.PCI_COMMAND)
            cmd = cmd | R.PCI_COMMAND_INTX_DISABLE if on else cmd & ~R.PCI_COMMAND_INTX_DISABLE
            self.set_config(R.PCI_COMMAND, cmd, 2)
            self._update_intx()

    def _update_intx(self) -> None:
        level = bool(self.int_status) and not self.msix_enabled and not self.msi_enabled \
            and bool(self.config[R.PCI_INTERRUPT_PIN])
        self.set_irq(1 if level else 0)  # Status.INTERRUPT (no bus: nothing else)
        pin = level and not self.intx_disabled
        if pin != self._intx_pin:
            self._intx_pin = pin
            if self.sink is not None:
                self.sink.intx_changed(pin)

    # -- raising a queue's interrupt --------------------------------------------------------------
    def raise_queue(self, qi: int) -> None:
        """The queue's interrupt, through whichever mechanism is active (lock taken).  A frozen
        function, or one whose link is down, raises nothing."""
        with self.lock:
            if not self.accessible:
                self.dropped_while_down += 1
                return
            q = self.queues[qi]
            q.raised += 1
            v = q.vector
            if self.msix_enabled:
                if not 0 <= v < self.nvectors:
                    q.dropped_invalid += 1
                    return
                c = self.msix_counts[v]
                c.raised += 1
                if self._msix_masked(v):
                    self.msix_pba[v // 8] |= 1 << (v % 8)
                    c.pended += 1
                else:
                    self._msix_send(v)
            elif self.msi_enabled:
                if not 0 <= v < (1 << self.msi_mme):
                    q.dropped_invalid += 1
                    return
                c = self.msi_counts[v]
                c.raised += 1
                if self.get32(self.msi_cap + PCI_MSI_MASK_64) & (1 << v):
                    poff = self.msi_cap + PCI_MSI_PENDING_64
                    self.set_config(poff, self.get32(poff) | (1 << v), 4)
                    c.pended += 1
                else:
                    self._msi_send(v)
            else:
                q.to_intx += 1
                if self.intx_disabled:
                    q.intx_disabled += 1
                self.int_status |= 1 << qi
                self._update_intx()

    # -- PCIe errors and the link -----------------------------------------------------------------------
    @property
    def accessible(self) -> bool:
        """Config and BAR accesses reach the function (not frozen, link up)."""
        return self.link_up and not self.error_frozen

    def inject_error(self, err: "PCIEAERErr") -> int:
        """``pcie_aer_inject_error`` on this function (0 or -errno, QEMU's): the status is
        recorded in the AER capability and the message climbs to the root port; an unmasked
        uncorrectable error whose severity is fatal freezes the function first (its link goes
        down).  -ENOSYS without the AER capability."""
        from ..pci.aer import PCI_ERR_UNC_SUPPORTED, PCI_ERR_UNCOR_MASK

        with self.lock:
            aer = self.aer
            if aer is None:
                return -errno.ENOSYS
            st = err.status
            single = bool(st) and not st & (st - 1) and bool(st & PCI_ERR_UNC_SUPPORTED)
            fatal = not err.correctable and single and bool(st & aer.severity) \
                and not st & aer.get(PCI_ERR_UNCOR_MASK)
            if fatal and not self.error_frozen:
                self.error_frozen = True
                self.freezes += 1
                log.warning("%s: fatal uncorrectable error %#x: the function is frozen (link down)", self.name, st)
                self.cond.notify_all()
            return aer.inject(err)

    def set_link(self, up: bool) -> None:
        """The port's view of the link (a secondary bus reset takes it down, training brings it up)."""
        with self.lock:
            self.link_up = up
            self.cond.notify_all()

    def producers(self) -> list[int]:
        """Every queue's PRODUCER: the records the function wrote (what completed)."""
        with self.lock:
            return [q.producer for q in self.queues]

    def config_read(self, addr: int, size: int) -> int:
        """A config read: all-F's while the function is frozen or its link is down."""
        with self.lock:
            if not self.accessible:
                return (1 << (8 * size)) - 1
            return super().config_read(addr, size)

    def config_write(self, addr: int, value: int, size: int) -> None:
        """A config write: dropped while the function is frozen or its link is down."""
        with self.lock:
            if not self.accessible:
                self.dropped_while_down += 1
                return
            super().config_write(addr, value, size)

    def update_mappings(self) -> None:
        """The host function's BARs are not decoded in a host address space: the host reaches
        them through vfio-pci's regions (several functions may be programmed with the same
        guest addresses by their clients)."""

    # -- config space hooks ----------------------------------------------------------------------------
    def write_config_hook(self, addr: int, value: int, size: int) -> None:
        with self.lock:
            self._update_intx()

    def bus_master_changed(self, enabled: bool) -> None:
        with self.lock:
            self.cond.notify_all()

    def device_reset(self) -> None:
        """The function's own state back to power-on (queues, INT_STATUS, MSI, MSI-X)."""
        with self.lock:
            for q in self.queues:
                epoch = q.epoch + 1
                inflight = q.inflight
                counts = (q.raised, q.records, q.ring_full_waits, q.dma_errors, q.to_intx, q.intx_disabled,
                          q.dropped_invalid)
                self.queues[q.index] = nq = NicQueue(q.index, epoch=epoch, inflight=inflight)
                (nq.raised, nq.records, nq.ring_full_waits, nq.dma_errors, nq.to_intx, nq.intx_disabled,
                 nq.dropped_invalid) = counts
            self.int_status = 0
            self._reset_interrupt_regs()
            if self.bar4_memfd >= 0:
                self._bar4_map[self.bar4_mmap_start:self.bar4_mmap_start + 4 * len(self.queues)] = \
                    bytes(4 * len(self.queues))

    def reset(self) -> None:
        """Function reset (FLR, or the host's reset): config header, BARs, Command, device state."""
        with self.lock:
            self.error_frozen = False
            super().reset()
            self._update_intx()
            self.cond.notify_all()

    # -- BAR0: registers --------------------------------------------------------------------------------
    def _reg_read(self, off: int) -> int:
        if off == REG_ID:
            return NIC_ID_MAGIC
        if off == REG_VERSION:
            return NIC_VERSION
        if off == REG_NQUEUES:
            return len(self.queues)
        if off == REG_NVEC:
            return self.nvectors
        if off == REG_INT_STATUS:
            v, self.int_status = self.int_status, 0
            self._update_intx()
            return v
        qi, r = divmod(off - QUEUE_BASE, QUEUE_STRIDE)
        if off < QUEUE_BASE or qi >= len(self.queues):
            return 0
        q = self.queues[qi]
        return {Q_RING_LO: q.ring_base & 0xFFFFFFFF, Q_RING_HI: q.ring_base >> 32, Q_SIZE: q.size,
                Q_VECTOR: q.vector, Q_ENABLE: int(q.enabled), Q_PRODUCER: q.producer,
                Q_CONSUMER: q.consumer, Q_RATE: q.rate, Q_STATUS: q.status(),
                Q_BACKLOG: q.doorbell}.get(r, 0)

    def _reg_write(self, off: int, val: int) -> None:
        qi, r = divmod(off - QUEUE_BASE, QUEUE_STRIDE)
        if off < QUEUE_BASE or qi >= len(self.queues):
            self.ignored_writes += 1
            return
        q = self.queues[qi]
        if r in (Q_RING_LO, Q_RING_HI, Q_SIZE) and q.enabled:
            self.ignored_writes += 1  # the ring is fixed while the queue runs
            return
        if r == Q_RING_LO:
            q.ring_base = (q.ring_base & ~0xFFFFFFFF) | val
        elif r == Q_RING_HI:
            q.ring_base = (q.ring_base & 0xFFFFFFFF) | (val << 32)
        elif r == Q_SIZE:
            q.size = val
        elif r == Q_VECTOR:
            q.vector = val
        elif r == Q_ENABLE:
            on = bool(val & 1)
            if on and not q.enabled:
                q.producer = q.consumer = 0
                q.halted = q.waiting_full = False
                q.credit, q.last_t = 0.0, time.monotonic()
                self._write_producer_mirror(q)
            if not on:
                q.waiting_full = False
            q.enabled = on
            q.epoch += 1
        elif r == Q_CONSUMER:
            q.consumer = val
        elif r == Q_DOORBELL:
            q.doorbell += val
        elif r == Q_RATE:
            q.rate = val
            q.credit, q.last_t = 0.0, time.monotonic()
        else:
            self.ignored_writes += 1
            return
        self.cond.notify_all()

    def bar0_read(self, offset: int, count: int) -> bytes:
        """Read *count* bytes of BAR0 (whole registers are read: INT_STATUS clears on any read of it)."""
        with self.lock:
            if not self.accessible:
                return b"\xff" * count
            first = offset & ~3
            end = _align_up(offset + count, 4)
            buf = b"".join(struct.pack("<I", self._reg_read(a)) for a in range(first, end, 4))
            return buf[offset - first:offset - first + count]

    def bar0_write(self, offset: int, data: bytes) -> None:
        """Write BAR0: each whole aligned register in the range is written; a partial register
        write is ignored (counted ``ignored-writes``)."""
        with self.lock:
            if not self.accessible:
                self.dropped_while_down += 1
                return
            end = offset + len(data)
            a = offset & ~3
            while a < end:
                if a >= offset and a + 4 <= end:
                    self._reg_write(a, struct.unpack_from("<I", data, a - offset)[0])
                else:
                    self.ignored_writes += 1
                a += 4

    def _bar0_io_read(self, off: int, size: int) -> int:
        return int.from_bytes(self.bar0_read(off, size), "little")

    def _bar0_io_write(self, off: int, value: int, size: int) -> None:
        self.bar0_write(off, value.to_bytes(size, "little"))

    # -- BAR4: table, PBA, device memory -------------------------------------------------------------
    def bar4_mmap_areas(self) -> list[tuple[int, int]]:
        """(offset, size) of the mmappable part of BAR4 (offsets within the BAR and the memfd)."""
        return [(self.bar4_mmap_start, self.bar4_size - self.bar4_mmap_start)]

    def bar4_read(self, offset: int, count: int) -> bytes:
        """Read BAR4 as the device holds it: table, PBA, zeros up to the page, then device memory."""
        with self.lock:
            if not self.accessible:
                return b"\xff" * count
            out = bytearray()
            t_end = len(self.msix_table)
            p0, p1 = self.msix_pba_offset, self.msix_pba_offset + len(self.msix_pba)
            for a in range(offset, offset + count):
                if a < t_end:
                    out.append(self.msix_table[a])
                elif p0 <= a < p1:
                    out.append(self.msix_pba[a - p0])
                elif self.bar4_mmap_start <= a < self.bar4_size and self.bar4_memfd >= 0:
                    out.append(self._bar4_map[a])
                else:
                    out.append(0)
            return bytes(out)

    def bar4_write(self, offset: int, data: bytes) -> None:
        """Write BAR4's device memory; the table (the host programs it through ``msix_*``), the PBA
        (read-only) and the gap drop their bytes."""
        with self.lock:
            if not self.accessible:
                self.dropped_while_down += 1
                return
            lo = max(offset, self.bar4_mmap_start)
            hi = min(offset + len(data), self.bar4_size)
            if lo < hi and self.bar4_memfd >= 0:
                self._bar4_map[lo:hi] = data[lo - offset:hi - offset]

    def _bar4_io_read(self, off: int, size: int) -> int:
        return int.from_bytes(self.bar4_read(off, size), "little")

    def _bar4_io_write(self, off: int, value: int, size: int) -> None:
        self.bar4_write(off, value.to_bytes(size, "little"))

    def _write_producer_mirror(self, q: NicQueue) -> None:
        if self.bar4_memfd >= 0:
            struct.pack_into("<I", self._bar4_map, self.bar4_mmap_start + 4 * q.index, q.producer)

    # -- the engine -----------------------------------------------------------------------------------
    def _runnable(self) -> bool:
        return self._dma is not None and self.bus_master and self.accessible

    def _reserve(self, q: NicQueue, n_wanted: int, flag: RecordFlag, now: float) -> _Job | None:
        """Reserve up to *n_wanted* records of *q* (lock held); None if the ring has no room."""
        free = q.size - q.used
        if free <= 0:
            if not q.waiting_full:
                q.waiting_full = True
                q.ring_full_waits += 1
            return None
        q.waiting_full = False
        slot = q.producer % q.size
        n = min(n_wanted, free, q.size - slot, self.BATCH)
        from_db = min(n, q.doorbell) if flag is not RecordFlag.FAULT_WINDOW else 0
        from_rate = n - from_db if flag is not RecordFlag.FAULT_WINDOW else 0
        recs = []
        for i in range(n):
            f = flag if flag is RecordFlag.FAULT_WINDOW else (RecordFlag.DOORBELL if i < from_db else RecordFlag.RATE)
            recs.append(RECORD.pack(q.seq + 1 + i, q.index, q.vector & 0xFFFF, int(f)))
        q.seq += n
        q.doorbell -= from_db
        q.credit -= from_rate
        q.inflight = True
        return _Job(q, q.epoch, q.ring_base + slot * RECORD.size, b"".join(recs), n, from_db, from_rate,
                    self._dma_gen)

    def _pick(self, now: float) -> tuple[_Job | None, float | None]:
        timeout: float | None = None
        if not self._runnable():
            return None, None
        nq = len(self.queues)
        for k in range(nq):
            q = self.queues[(self._rr + k) % nq]
            if not q.enabled or q.halted or q.inflight or not q.ring_ok:
                continue
            if q.rate:
                q.credit = min(q.credit + (now - q.last_t) * q.rate, float(q.size))
            q.last_t = now
            work = q.doorbell + int(q.credit)
            if not work:
                if q.rate:
                    t = (1.0 - q.credit) / q.rate
                    timeout = t if timeout is None else min(timeout, t)
                continue
            job = self._reserve(q, work, RecordFlag.DOORBELL, now)
            if job is not None:
                self._rr = (q.index + 1) % nq
                return job, None
        return None, timeout

    def _commit(self, job: _Job) -> None:
        """Publish a written batch and raise the queue's interrupt, or roll the reservation back
        (lock held)."""
        q = self.queues[job.q.index]
        q.inflight = False
        if q.epoch != job.epoch or q is not job.q:
            return  # the queue was reset or re-enabled while the DMA was in flight
        if job.err is not None:
            q.seq -= job.n
            q.doorbell += job.from_doorbell
            q.credit += job.from_rate
            if job.dma_gen == self._dma_gen:
                q.dma_errors += 1
                q.halted = True
                log.warning("%s: queue %d: DMA write to %#x failed: %s", self.name, q.index, job.iova, job.err)
            return
        q.producer = (q.producer + job.n) & 0xFFFFFFFF
        q.records += job.n
        self._write_producer_mirror(q)
        if job.raise_after:
            self.raise_queue(q.index)

    def _engine_main(self) -> None:
        while True:
            with self.lock:
                job: _Job | None = None
                while job is None:
                    if self._stopping:
                        return
                    job, timeout = self._pick(time.monotonic())
                    if job is None:
                        self.engine_wakeups += 1
                        self.cond.wait(timeout)
                dma = self._dma
            self._dma_write(dma, job)
            with self.lock:
                self._commit(job)
                self.cond.notify_all()

    @staticmethod
    def _dma_write(dma: DmaSpace | None, job: _Job) -> None:
        if dma is None:
            job.err = OSError("no DMA space")
            return
        try:
            dma.dma_write(job.iova, job.data)
        except Exception as e:  # a VfioError(EFAULT), or the transport failing under it
            job.err = e

    def write_one_record_each(self, flag: RecordFlag = RecordFlag.FAULT_WINDOW, *, timeout: float = 30.0) -> int:
        """Every enabled queue with room writes one record and raises its interrupt, now, in the
        calling thread (the ``fire-in-msix-disable-window`` fault).  Waits for DMA writes the engine
        has in flight first; the DMA writes are done outside the lock.  Returns the records written."""
        with self.lock:
            if not self.cond.wait_for(lambda: not any(q.inflight for q in self.queues), timeout=timeout):
                return 0
            if not self._runnable():
                return 0
            now = time.monotonic()
            jobs = [j for q in self.queues if q.enabled and not q.halted and q.ring_ok
                    for j in [self._reserve(q, 1, flag, now)] if j is not None]
            dma = self._dma
        for j in jobs:
            self._dma_write(dma, j)
        written = 0
        with self.lock:
            for j in jobs:
                self._commit(j)
                written += 0 if j.err is not None else 1
            self.cond.notify_all()
        return written

    # -- view ----------------------------------------------------------------------------------------
    def describe(self) -> dict:
        with self.lock:
            d = super().describe()
            d.update({
                "queues": [q.describe() for q in self.queues],
                "int-status": self.int_status,
                "intx": {"pin": self.config[R.PCI_INTERRUPT_PIN], "level": bool(self.irq_level),
                         "disabled": self.intx_disabled, "asserted": self._intx_pin},
                "msix": {"enabled": self.msix_enabled, "function-masked": self.msix_function_masked,
                         "table-size": self.nvectors,
                         "vectors": [{"vector": v, "address": self.msix_entry(v)[0], "data": self.msix_entry(v)[1],
                                      "masked": self.msix_entry(v)[2], "pending": self.msix_pending(v),
                                      **c.describe()}
                                     for v, c in enumerate(self.msix_counts)]},
                "msi": {"enabled": self.msi_enabled, "mme": self.msi_mme, "capable": self.msi_vectors,
                        "mask": self.get32(self.msi_cap + PCI_MSI_MASK_64),
                        "pending": self.get32(self.msi_cap + PCI_MSI_PENDING_64),
                        "vectors": [{"vector": v, **c.describe()} for v, c in enumerate(self.msi_counts)]},
                "dma": "attached" if self._dma is not None else "none",
                "bus-master": self.bus_master,
                "engine": {"running": self._engine is not None, "wakeups": self.engine_wakeups},
                "ignored-writes": self.ignored_writes,
                "flr": self.flr_count, "resets": self.reset_count,
                "error-frozen": self.error_frozen, "link-up": self.link_up, "freezes": self.freezes,
                "dropped-while-down": self.dropped_while_down,
            })
            return d
