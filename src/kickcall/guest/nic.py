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

Error recovery (``PciErrorHandlers``, set as the function's ``err_handlers`` at probe; called by
the guest's AER service, ``kickcall.guest.aer``).  Like igb's handlers, ``error_detected`` first
reads the function's vendor and device id and records what it saw; every config or MMIO read a
handler makes that returns all-F's is counted (``all-f-reads``: a VMM that lets a guest read the
device while the host resets its link makes it non-zero).  ``io_normal``: the device keeps
running, the vote is CAN_RECOVER (all-F's seen: NEED_RESET); ``io_frozen``: the driver stops
touching the device (no MMIO: doorbells, CONSUMER writes and the INTx status read are skipped
and counted), the vote is NEED_RESET; ``mmio_enabled``: the ID register must read 0x4e434b43
(RECOVERED, else DISCONNECT); ``slot_reset``: the function was reset behind the driver -- config
restored (BARs, command with Bus Master: ``restore_config`` of what probe saved), its MSI-X/MSI
state restored (``restore_msi_state``: every entry it had, those with handlers unmasked), each
queue's records still in memory taken (they were written before the reset), the rings zeroed and
reprogrammed (base, size, vector, enable) and, since a function reset restarts the device's seq
numbers at 1, the expected seq restarted (``seq-restarts``); ``resume``: the queues' rates are
set again and whatever arrived is consumed; ``io_perm_failure``: the device is dead, no more
MMIO.  ``restore_after_reset=False`` (guest command ``aer-config``) makes ``slot_reset`` answer
RECOVERED without re-initialising anything: after a fatal error the traffic never resumes.

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
from ..pci.recovery import PciChannelState, PciErsResult
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
    rate: int = 0  # what the driver last set (restored after a reset)
    seq_restarts: int = 0  # the device restarted its seq numbers at 1 (a function reset)
    irq: IrqDesc | None = None
    handler: Callable[[int], bool] | None = None  # what request_queue_irq registered (for free_irq)

    def describe(self) -> dict:
        return {"queue": self.index, "ring": self.ring, "size": self.size, "consumed": self.consumed,
                "next-seq": self.next_seq, "enabled": self.enabled, "records": self.records, "gaps": self.gaps,
                "bad-records": self.bad_records, "rate": self.rate, "seq-restarts": self.seq_restarts,
                "irq": self.irq.irq if self.irq is not None else None}


class NicDriver:
    """kickcall-nic's driver: rings in guest RAM, late MSI-X vectors or shared INTx."""

    def __init__(self, k: GuestKernel, pci: GuestPciDev, *, ring_size: int = 256, allow_msix: bool = True,
                 irq_mode: str = "msix", restore_after_reset: bool = True) -> None:
        """*irq_mode*: ``"msix"`` (MSI-X if the function has it, else INTx), ``"msi"`` or
        ``"intx"``; ``allow_msix=False`` is ``"intx"``.  *restore_after_reset* False: ``slot_reset``
        re-initialises nothing (the switch that shows what the re-initialisation is for)."""
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
        # -- error recovery
        self.restore_after_reset = restore_after_reset
        self.io_state = "normal"  # "normal", "frozen" (no MMIO until slot_reset), "dead"
        self.errors_detected = {s.value: 0 for s in PciChannelState}
        self.mmio_enabled_calls = 0
        self.slot_resets = 0
        self.recoveries = 0
        self.all_f_reads = 0
        self.mmio_skipped = 0
        self.frozen_interrupts = 0
        self.drained_at_reset = 0
        self.last_seen: dict | None = None
        self._was_reset = False

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
        p.save_config()  # pci_save_state: BARs and the command (decoding, Bus Master) as running
        p.err_handlers = self

    def _qreg(self, q: int) -> int:
        return self.bar0 + N.QUEUE_BASE + N.QUEUE_STRIDE * q

    def _mmio_ok(self) -> bool:
        """Whether the driver may touch the device (not frozen by an error, not dead); a skipped
        access is counted."""
        if self.io_state == "normal":
            return True
        self.mmio_skipped += 1
        return False

    def enable_queue(self, q: int, on: bool = True) -> None:
        with self._mu:
            qu = self.queues[q]
            if on and not qu.enabled:
                qu.consumed = 0  # ENABLE 0->1 resets PRODUCER and CONSUMER
            qu.enabled = on
        if self._mmio_ok():
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
        if self._mmio_ok():
            self.k.writel(self._qreg(q) + N.Q_DOORBELL, n)

    def set_rate(self, q: int, rate: int) -> None:
        self.queues[q].rate = rate
        if self._mmio_ok():
            self.k.writel(self._qreg(q) + N.Q_RATE, rate)

    def producer(self, q: int) -> int:
        return self.k.readl(self._qreg(q) + N.Q_PRODUCER)

    # -- interrupts ---------------------------------------------------------------------------------------
    def _msix_handler(self, q: int, entry: int) -> bool:
        self.interrupts[entry] = self.interrupts.get(entry, 0) + 1
        if self.io_state != "normal":
            self.frozen_interrupts += 1
            return True
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
        if self.io_state != "normal":
            self.frozen_interrupts += 1
            return False
        status = self.k.readl(self.bar0 + N.REG_INT_STATUS)
        self.intx_interrupts += 1
        for q in range(len(self.queues)):
            if status & (1 << q):
                self.consume(q)
        return bool(status)

    def consume(self, q: int) -> int:
        """Take every record of queue *q* that is there, in order; write CONSUMER.  Returns how many.
        Nothing while the device is frozen or dead (the ring may be mid-reset)."""
        if self.io_state != "normal":
            return 0
        with self._mu:
            qu = self.queues[q]
            n = self._take(qu)
            consumed = qu.consumed
        if n and self._mmio_ok():
            self.k.writel(self._qreg(q) + N.Q_CONSUMER, consumed)
        return n

    def _take(self, qu: _Queue) -> int:
        """The records of *qu* in memory, in order (``_mu`` held); how many were taken."""
        n = 0
        if not qu.size:
            return 0
        while n < qu.size:
            gpa = qu.ring + (qu.consumed % qu.size) * RECORD_SIZE
            seq, queue, _vector, _flags = N.RECORD.unpack(self.k.memory.read(gpa, RECORD_SIZE))
            if seq != qu.next_seq or queue != qu.index:
                if seq > qu.next_seq and queue == qu.index:
                    qu.gaps += 1
                break
            qu.next_seq += 1
            qu.consumed = (qu.consumed + 1) & 0xFFFFFFFF
            qu.records += 1
            n += 1
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
        pba: int | None = None
        if self.io_state == "normal":
            pba = self.pci.read_pba() if self.mode == "msix" else \
                self.pci.read_msi_pending() if self.mode == "msi" else 0
        with self._mu:
            return {"mode": self.mode, "table-size": self.table_size, "msi-vectors": self.msi_nvec,
                    "queues": [qu.describe() for qu in self.queues],
                    "interrupts": {str(k): v for k, v in sorted(self.interrupts.items())},
                    "empty-interrupts": {str(k): v for k, v in sorted(self.empty.items())},
                    "intx-interrupts": self.intx_interrupts, "intx-unexpected": self.intx_unexpected,
                    "spare-interrupts": self.spare_interrupts, "pba": pba,
                    "error-handling": self.error_stats()}

    def error_stats(self) -> dict:
        """The error handlers' counters (``nic-stats``'s ``error-handling``)."""
        return {"io-state": self.io_state, "dead": self.io_state == "dead",
                "errors-detected": dict(self.errors_detected), "mmio-enabled": self.mmio_enabled_calls,
                "slot-resets": self.slot_resets, "recoveries": self.recoveries, "all-f-reads": self.all_f_reads,
                "mmio-skipped": self.mmio_skipped, "frozen-interrupts": self.frozen_interrupts,
                "drained-at-reset": self.drained_at_reset,
                "seq-restarts": sum(qu.seq_restarts for qu in self.queues),
                "restore-after-reset": self.restore_after_reset, "last-seen": self.last_seen}

    # -- error recovery (struct pci_error_handlers) ------------------------------------------------------------
    def _cfg(self, off: int, size: int) -> int:
        """A config read during recovery; all-F's counted."""
        v = self.pci.read_config(off, size)
        if v == (1 << (8 * size)) - 1:
            self.all_f_reads += 1
        return v

    def error_detected(self, state: PciChannelState) -> PciErsResult:
        """What the driver does when an error is reported below its port: read the function's
        ids (what igb does first), then vote."""
        state = PciChannelState(state)
        self.errors_detected[state.value] += 1
        vendor = self._cfg(R.PCI_VENDOR_ID, 2)
        device = self._cfg(R.PCI_DEVICE_ID, 2)
        self.last_seen = {"state": state.value, "vendor": vendor, "device": device}
        self.k.printk(f"{self.pci!r}: kickcall-nic: error_detected({state.value}): config reads "
                      f"{vendor:04x}:{device:04x}")
        if state is PciChannelState.PERM_FAILURE:
            self.io_state = "dead"
            self.k.printk(f"{self.pci!r}: kickcall-nic: device dead, no more MMIO")
            return PciErsResult.DISCONNECT
        if state is PciChannelState.FROZEN or vendor == 0xFFFF:
            self.io_state = "frozen"  # stop touching the device until slot_reset
            return PciErsResult.NEED_RESET
        return PciErsResult.CAN_RECOVER

    def mmio_enabled(self) -> PciErsResult:
        """MMIO works again (a non-fatal error): does the device answer?"""
        self.mmio_enabled_calls += 1
        if self.io_state == "dead":
            return PciErsResult.DISCONNECT
        v = self.k.readl(self.bar0 + N.REG_ID)
        if v == 0xFFFFFFFF:
            self.all_f_reads += 1
        if v != N.NIC_ID_MAGIC:
            self.k.printk(f"{self.pci!r}: kickcall-nic: mmio_enabled: ID reads {v:#x}")
            return PciErsResult.DISCONNECT
        return PciErsResult.RECOVERED

    def slot_reset(self) -> PciErsResult:
        """The function was reset (a secondary bus reset): bring it back as probe left it."""
        self.slot_resets += 1
        if self.io_state == "dead":
            return PciErsResult.DISCONNECT
        vendor = self._cfg(R.PCI_VENDOR_ID, 2)
        if vendor == 0xFFFF:
            self.k.printk(f"{self.pci!r}: kickcall-nic: slot_reset: the device does not answer")
            return PciErsResult.DISCONNECT
        self._was_reset = True
        if not self.restore_after_reset:
            self.k.printk(f"{self.pci!r}: kickcall-nic: slot_reset: not re-initialising (restore-after-reset off)")
            self.io_state = "normal"
            return PciErsResult.RECOVERED
        p = self.pci
        p.restore_config()
        cmd = self._cfg(R.PCI_COMMAND, 2)
        if not cmd & R.PCI_COMMAND_MEMORY:
            self.k.printk(f"{p!r}: kickcall-nic: slot_reset: memory decoding did not come back ({cmd:#x})")
            return PciErsResult.DISCONNECT
        p.restore_msi_state()
        with self._mu:
            for qu in self.queues:
                self.drained_at_reset += self._take(qu)  # written before the reset: still records
                self.k.memory.fill(qu.ring, qu.size * RECORD_SIZE)
                qu.consumed = 0
                if qu.next_seq != 1:
                    qu.seq_restarts += 1
                qu.next_seq = 1  # a function reset restarts the device's seq numbers
        for qu in self.queues:
            base = self._qreg(qu.index)
            self.k.writel(base + N.Q_RING_LO, qu.ring & 0xFFFFFFFF)
            self.k.writel(base + N.Q_RING_HI, qu.ring >> 32)
            self.k.writel(base + N.Q_SIZE, qu.size)
            vec = qu.index % max(1, self.msi_nvec if self.mode == "msi" else self.table_size)
            self.k.writel(base + N.Q_VECTOR, vec)
            if qu.enabled:
                self.k.writel(base + N.Q_ENABLE, 1)
        self.io_state = "normal"
        self.k.printk(f"{p!r}: kickcall-nic: slot_reset: config, interrupts and {len(self.queues)} queues restored")
        return PciErsResult.RECOVERED

    def resume(self) -> None:
        """Traffic continues: after a reset the rates are set again; what arrived is consumed."""
        self.recoveries += 1
        if self.io_state != "normal":
            return
        if self._was_reset and self.restore_after_reset:
            for qu in self.queues:
                if qu.rate:
                    self.k.writel(self._qreg(qu.index) + N.Q_RATE, qu.rate)
        self._was_reset = False
        for qu in self.queues:
            if qu.enabled:
                self.consume(qu.index)
        self.k.printk(f"{self.pci!r}: kickcall-nic: resume")

    def teardown(self) -> None:
        self.pci.err_handlers = None
        for qu in self.queues:
            if qu.enabled:
                if self._mmio_ok():
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
