"""The guest's driver for kickcall-nic (the host function behind vfio-user; its registers are
declared in ``kickcall.vfio.nic``).

It brings interrupts up late, as Linux drivers do: at probe MSI-X is enabled with every entry
masked and no vector set up (``GuestPciDev.msix_enable_masked``); each queue's vector comes later
with ``request_queue_irq`` (``pci_msix_alloc_irq_at`` + ``request_irq``, which unmasks the entry),
while other queues may be busy.  Without MSI-X (or with ``allow_msix=False``) the queues share
INTx: the handler reads INT_STATUS (read-to-clear) and serves the queues whose bits are set.

In MSI mode (``mode="msi"``), the probe allocates MSI with as many vectors as queues
(``pci_alloc_irq_vectors(1, nq, PCI_IRQ_MSI)``: a power of two, at most 32) with every vector
masked; queue *q* raises MSI vector ``q % nvec`` and ``request_queue_irq`` requests that vector's
irq (the first handler unmasks it through the capability's mask bits).

A queue's interrupt handler consumes the queue's completion records in order: a record is the
next one when its ``seq`` is the one expected and its ``queue`` field is the queue's (a record
still being written is left for the interrupt that follows it); then it writes CONSUMER, which
lets the device go on when the ring was full.  Records are counted, never assumed: ``gaps``
counts a record whose seq is beyond the expected one (a record overwritten, which the device
must never do).

Counters: interrupts per MSI-X entry (and how many found no record: ``empty``), INTx interrupts
taken in INTx mode, and ``intx-unexpected``: INTx interrupts that arrived while the driver used
MSI-X (a handler on the INTx line stays registered to see them) -- the seed's "redirections to
the legacy and obviously unhandled INTx".
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from typing import Callable

from ..pci import regs as R
from ..vfio import nic as N
from .kernel import PCI_IRQ_INTX, PCI_IRQ_MSI, GuestKernel, GuestPciDev, IrqDesc

__all__ = ["NicDriver", "is_kickcall_nic", "NIC_IRQ_MODES"]

#: the interrupt modes the driver can be asked for: MSI-X if the function has it (else INTx),
#: MSI, or INTx
NIC_IRQ_MODES = ("msix", "msi", "intx")

log = logging.getLogger("kickcall.guest.nic")

RECORD_SIZE = N.RECORD.size


def is_kickcall_nic(pci: GuestPciDev) -> bool:
    return pci.vendor == N.NIC_VENDOR_ID and pci.device == N.NIC_DEVICE_ID


@dataclass
class _Queue:
    index: int
    ring: int = 0
    size: int = 0
    consumed: int = 0  # free-running, what CONSUMER says
    next_seq: int = 1
    enabled: bool = False
    records: int = 0
    gaps: int = 0
    bad_records: int = 0
    irq: IrqDesc | None = None
    handler: Callable[[int], bool] | None = None  # what request_queue_irq registered (for free_irq)

    def describe(self) -> dict:
        return {"queue": self.index, "ring": self.ring, "size": self.size, "consumed": self.consumed,
                "next-seq": self.next_seq, "enabled": self.enabled, "records": self.records, "gaps": self.gaps,
                "bad-records": self.bad_records, "irq": self.irq.irq if self.irq is not None else None}


class NicDriver:
    """kickcall-nic's driver: rings in guest RAM, late MSI-X vectors or shared INTx."""

    def __init__(self, k: GuestKernel, pci: GuestPciDev, *, ring_size: int = 256, allow_msix: bool = True,
                 irq_mode: str = "msix") -> None:
        """*irq_mode*: ``"msix"`` (MSI-X if the function has it, else INTx), ``"msi"`` or
        ``"intx"``; ``allow_msix=False`` is ``"intx"``."""
        if ring_size <= 0 or ring_size & (ring_size - 1):
            raise ValueError("ring_size must be a power of two")
        if irq_mode not in NIC_IRQ_MODES:
            raise ValueError(f"irq_mode must be one of {', '.join(NIC_IRQ_MODES)}")
        self.irq_mode = irq_mode if allow_msix or irq_mode == "msi" else "intx"
        self.k = k
        self.pci = pci
        self.ring_size = ring_size
        self.allow_msix = allow_msix
        self.bar0 = 0
        self.queues: list[_Queue] = []
        self.table_size = 0
        self.msi_nvec = 0
        self.mode = "none"
        self._mu = threading.Lock()
        self.interrupts: dict[int, int] = {}  # MSI-X entry -> interrupts taken
        self.empty: dict[int, int] = {}  # MSI-X entry -> interrupts that found no record
        self.intx_interrupts = 0
        self.intx_unexpected = 0
        self._intx: IrqDesc | None = None
        self._spare: IrqDesc | None = None
        self.spare_interrupts = 0

    # -- probe ------------------------------------------------------------------------------------------
    def probe(self) -> None:
        p = self.pci
        self.bar0 = p.bar_addr(0)
        if self.k.readl(self.bar0 + N.REG_ID) != N.NIC_ID_MAGIC:
            raise RuntimeError(f"{p!r}: not a kickcall-nic (ID register)")
        nq = self.k.readl(self.bar0 + N.REG_NQUEUES)
        self.table_size = self.k.readl(self.bar0 + N.REG_NVEC)
        p.set_master(True)
        for q in range(nq):
            ring = self.k.pages.alloc(self.ring_size * RECORD_SIZE)
            self.k.memory.fill(ring, self.ring_size * RECORD_SIZE)
            self.queues.append(_Queue(q, ring, self.ring_size))
            base = self._qreg(q)
            self.k.writel(base + N.Q_RING_LO, ring & 0xFFFFFFFF)
            self.k.writel(base + N.Q_RING_HI, ring >> 32)
            self.k.writel(base + N.Q_SIZE, self.ring_size)
            self.k.writel(base + N.Q_VECTOR, q % max(1, self.table_size))
        if self.irq_mode == "msi":
            if not p.msi_cap:
                raise RuntimeError(f"{p!r}: no MSI capability")
            self.msi_nvec = p.alloc_irq_vectors(1, min(nq, 32), PCI_IRQ_MSI)
            for q in range(nq):
                self.k.writel(self._qreg(q) + N.Q_VECTOR, q % self.msi_nvec)
            self.mode = "msi"
        elif self.irq_mode == "msix" and p.msix_cap:
            p.msix_enable_masked()
            self.mode = "msix"
        elif p.irq_line:
            p.alloc_irq_vectors(1, 1, PCI_IRQ_INTX)
            self.mode = "intx"
        if p.irq_line:  # INTx watched in every mode: in MSI-X mode an INTx is one nobody asked for
            self._intx = self.k.gsi_irq(p.irq_line)
            self.k.request_irq(self._intx.irq, self._intx_handler, "kickcall-nic-intx")

    def _qreg(self, q: int) -> int:
        return self.bar0 + N.QUEUE_BASE + N.QUEUE_STRIDE * q

    def enable_queue(self, q: int, on: bool = True) -> None:
        with self._mu:
            qu = self.queues[q]
            if on and not qu.enabled:
                qu.consumed = 0  # ENABLE 0->1 resets PRODUCER and CONSUMER
            qu.enabled = on
        self.k.writel(self._qreg(q) + N.Q_ENABLE, 1 if on else 0)

    def request_queue_irq(self, q: int) -> int:
        """Bring queue *q*'s vector up now and request its irq: its MSI-X entry (= the queue's
        VECTOR register), or in MSI mode MSI vector ``q % nvec`` (several queues may share it:
        one handler each).  Returns the irq."""
        if self.mode not in ("msix", "msi"):
            raise RuntimeError("the driver is using neither MSI-X nor MSI")
        qu = self.queues[q]
        if qu.irq is not None:
            return qu.irq.irq
        if self.mode == "msi":
            entry = q % self.msi_nvec
            d = self.pci.vectors[entry]
        else:
            entry = q % max(1, self.table_size)
            d = self.pci.msix_setup_vector(entry, name=f"kickcall-nic-q{q}")
        qu.irq = d
        self.interrupts.setdefault(entry, 0)
        self.empty.setdefault(entry, 0)

        def handler(_irq: int) -> bool:
            return self._msix_handler(q, entry)
        qu.handler = handler
        self.k.request_irq(d.irq, handler, f"kickcall-nic-q{q}")
        return d.irq

    def bring_up_entries(self, first: int, count: int) -> int:
        """Bring MSI-X entries [first, first+count) up one at a time, all on one shared irq
        ("kickcall-nic-spare", its handler counts what arrives there): a driver growing its vector
        set while its queues run.  Each entry is written while masked, then unmasked -- one
        vector at a time, as ``request_irq`` on a fresh vector would.  Returns the spare irq."""
        if self.mode != "msix":
            raise RuntimeError("the driver is not using MSI-X")
        if self._spare is None:
            d = self.k.alloc_irq("kickcall-nic-spare")
            self.k.request_irq(d.irq, self._spare_handler, "kickcall-nic-spare")
            self._spare = d
        for e in range(first, first + count):
            self.pci.msix_setup_vector(e, desc=self._spare)
            self.pci.msix_mask(e, False)
        return self._spare.irq

    def _spare_handler(self, _irq: int) -> bool:
        self.spare_interrupts += 1
        return True

    def free_queue_irq(self, q: int) -> None:
        qu = self.queues[q]
        if qu.irq is None:
            return
        d, qu.irq = qu.irq, None
        if self.mode == "msi":  # the vector stays allocated; its last handler's free_irq masks it
            if qu.handler is not None:
                self.k.free_irq(d.irq, qu.handler)
            qu.handler = None
            return
        for h, _n in list(d.handlers):
            self.k.free_irq(d.irq, h)
        self.pci.msix_release_vector(q % max(1, self.table_size))

    def generate(self, q: int, n: int) -> None:
        """Ask the device for *n* records on queue *q* (the DOORBELL register)."""
        self.k.writel(self._qreg(q) + N.Q_DOORBELL, n)

    def set_rate(self, q: int, rate: int) -> None:
        self.k.writel(self._qreg(q) + N.Q_RATE, rate)

    def producer(self, q: int) -> int:
        return self.k.readl(self._qreg(q) + N.Q_PRODUCER)

    # -- interrupts ---------------------------------------------------------------------------------------
    def _msix_handler(self, q: int, entry: int) -> bool:
        self.interrupts[entry] = self.interrupts.get(entry, 0) + 1
        if not self.consume(q):
            self.empty[entry] = self.empty.get(entry, 0) + 1
        return True

    def mask_vector(self, nr: int, masked: bool) -> None:
        """Mask or unmask MSI-X entry / MSI vector *nr* in the mode the driver uses."""
        self.pci.vector_mask(nr, masked)

    def _intx_handler(self, _irq: int) -> bool:
        if self.mode != "intx":
            self.intx_unexpected += 1
            return False
        status = self.k.readl(self.bar0 + N.REG_INT_STATUS)
        self.intx_interrupts += 1
        for q in range(len(self.queues)):
            if status & (1 << q):
                self.consume(q)
        return bool(status)

    def consume(self, q: int) -> int:
        """Take every record of queue *q* that is there, in order; write CONSUMER.  Returns how many."""
        with self._mu:
            qu = self.queues[q]
            n = 0
            while True:
                gpa = qu.ring + (qu.consumed % qu.size) * RECORD_SIZE
                seq, queue, _vector, _flags = N.RECORD.unpack(self.k.memory.read(gpa, RECORD_SIZE))
                if seq != qu.next_seq or queue != q:
                    if seq > qu.next_seq and queue == q:
                        qu.gaps += 1
                    break
                qu.next_seq += 1
                qu.consumed = (qu.consumed + 1) & 0xFFFFFFFF
                qu.records += 1
                n += 1
            consumed = qu.consumed
        if n:
            self.k.writel(self._qreg(q) + N.Q_CONSUMER, consumed)
        return n

    def unconsumed(self) -> list[dict]:
        """Per queue, the records that are in the ring and not consumed (read from memory, nothing
        changed): what a lost interrupt leaves behind."""
        out = []
        with self._mu:
            for qu in self.queues:
                seqs = []
                c, want = qu.consumed, qu.next_seq
                for _ in range(qu.size):
                    gpa = qu.ring + (c % qu.size) * RECORD_SIZE
                    seq, queue, _v, _f = N.RECORD.unpack(self.k.memory.read(gpa, RECORD_SIZE))
                    if seq != want or queue != qu.index:
                        break
                    seqs.append(seq)
                    c, want = c + 1, want + 1
                out.append({"queue": qu.index, "unconsumed": len(seqs), "first-seq": seqs[0] if seqs else None})
        return out

    def stats(self) -> dict:
        pba = self.pci.read_pba() if self.mode == "msix" else self.pci.read_msi_pending() if self.mode == "msi" else 0
        with self._mu:
            return {"mode": self.mode, "table-size": self.table_size, "msi-vectors": self.msi_nvec,
                    "queues": [qu.describe() for qu in self.queues],
                    "interrupts": {str(k): v for k, v in sorted(self.interrupts.items())},
                    "empty-interrupts": {str(k): v for k, v in sorted(self.empty.items())},
                    "intx-interrupts": self.intx_interrupts, "intx-unexpected": self.intx_unexpected,
                    "spare-interrupts": self.spare_interrupts, "pba": pba}

    def teardown(self) -> None:
        for qu in self.queues:
            if qu.enabled:
                self.k.writel(self._qreg(qu.index) + N.Q_ENABLE, 0)
                qu.enabled = False
            self.free_queue_irq(qu.index)
        if self._intx is not None:
            self.k.free_irq(self._intx.irq, self._intx_handler)
            self._intx = None
        if self._spare is not None:
            self.k.free_irq(self._spare.irq, self._spare_handler)
            self._spare = None
        self.pci.free_irq_vectors()
        self.pci.write_config(R.PCI_COMMAND, self.pci.read_config(R.PCI_COMMAND, 2) & ~R.PCI_COMMAND_MASTER, 2)
