"""A driver model of Linux's NVMe probe pattern, on kickcall-nic (the vfio-user function).

What ``nvme_probe`` / ``nvme_reset_work`` do with interrupts, per controller:

1. ``pci_alloc_irq_vectors(pdev, 1, 1, PCI_IRQ_MSIX)`` and ``request_irq`` for the admin queue
   (queue 0 here), one admin-like command (one record on queue 0) waited for, then the vector
   freed and MSI-X disabled (``pci_free_irq_vectors``) -- under Xen with QEMU >= 2.1.0 this is
   where the device model unmaps the controller's pirq;
2. ``pci_alloc_irq_vectors(pdev, 1, nq, PCI_IRQ_ALL_TYPES)`` (MSI-X, else MSI, else INTx; a
   Xen guest out of pirqs falls back the way Linux does) and ``request_irq`` for each queue's
   vector (queue *q* raises vector ``q % nvec``).

Device records decide, never eventfd or interrupt counts (event channels coalesce): ``io``
asks the device for one record at a time on a queue and waits (bounded) until the queue's
handler consumed it.  A record never consumed is a *lost* interrupt; a vector handler that runs
and finds no new record on any of its queues is an interrupt that reached a controller that did
not raise it (*wrong-device*).  In INTx mode the handler reads INT_STATUS; an INTx that finds it
clear may be another function's on a shared line and counts as ``intx-none`` instead.

The rings, records, doorbell and consumer index are ``NicDriver``'s (this is a subclass).
"""

from __future__ import annotations

import threading
from typing import Callable

from ..vfio import nic as N
from .kernel import PCI_IRQ_INTX, PCI_IRQ_MSI, PCI_IRQ_MSIX, GuestKernel, GuestPciDev, IrqDesc
from .nic import NicDriver

__all__ = ["NvmeDriver", "IRQ_FLAGS"]

#: ``nvme-alloc``'s *types*: which modes pci_alloc_irq_vectors may use
IRQ_FLAGS = {"msix": PCI_IRQ_MSIX, "msi": PCI_IRQ_MSI, "intx": PCI_IRQ_INTX,
             "all": PCI_IRQ_MSIX | PCI_IRQ_MSI | PCI_IRQ_INTX}
_MODES = {PCI_IRQ_MSIX: "msix", PCI_IRQ_MSI: "msi", PCI_IRQ_INTX: "intx", 0: "none"}


class NvmeDriver(NicDriver):
    """One controller: queues on kickcall-nic rings, vectors allocated the NVMe way."""

    def __init__(self, k: GuestKernel, pci: GuestPciDev, *, ring_size: int = 64) -> None:
        super().__init__(k, pci, ring_size=ring_size)
        self.nvec = 0
        self.vector_queues: dict[int, list[int]] = {}
        self._handlers: list[tuple[int, Callable[[int], bool]]] = []
        self._done: dict[int, threading.Event] = {}
        self._cmu = threading.Lock()
        self.generated: dict[int, int] = {}  # per queue, records asked for through io()
        self.consumed_total = 0
        self.lost = 0
        self.wrong_device = 0
        self.intx_none = 0
        self.vec_interrupts: dict[int, int] = {}
        self.probes = 0
        self.alloc_failures = 0

    # -- probe ----------------------------------------------------------------------------------------
    def probe(self) -> None:
        """Rings only (``nvme_pci_enable`` + queue memory); interrupts come with ``alloc``.  The
        nic driver's probe sets the rings up (in INTx mode); its INTx handler is then let go."""
        self.irq_mode = "intx"
        super().probe()
        if self._intx is not None:
            self.k.free_irq(self._intx.irq, self._intx_handler)
            self._intx = None
        self.pci.free_irq_vectors()
        for qu in self.queues:
            self._done[qu.index] = threading.Event()
            self.generated[qu.index] = 0
        self.mode = "none"

    @property
    def nqueues(self) -> int:
        return len(self.queues)

    def alloc(self, min_vecs: int, max_vecs: int, flags: int) -> int:
        """``pci_alloc_irq_vectors``; queue *q* is pointed at vector ``q % nvec`` (queues beyond
        *max_vecs* share).  Returns nvec (0 and ``mode`` "none" when nothing could be had)."""
        if self.nvec:
            raise RuntimeError("vectors already allocated (free them first)")
        p = self.pci
        try:
            self.nvec = p.alloc_irq_vectors(min_vecs, max_vecs, flags)
        except RuntimeError:
            self.alloc_failures += 1
            self.nvec, self.mode = 0, "none"
            return 0
        self.mode = _MODES.get(p.irq_mode, "?")
        self.vector_queues = {v: [] for v in range(self.nvec)}
        for q in range(min(self.nqueues, max(max_vecs, 1))):
            v = q % self.nvec
            self.vector_queues[v].append(q)
            self.k.writel(self._qreg(q) + N.Q_VECTOR, v)
        return self.nvec

    def pirqs(self) -> list[int]:
        """The pirq behind each vector (Xen; empty otherwise)."""
        x = self.k.xen
        if x is None or self.mode not in ("msix", "msi"):
            return []
        out = []
        for d in self.pci.vectors:
            info = x.ev.info(d.irq)
            out.append(info.pirq if info is not None else -1)
        return out

    def request(self) -> list[int]:
        """``request_irq`` for every vector, each queue it serves enabled.  Returns the irqs."""
        if not self.nvec:
            raise RuntimeError("no vectors allocated")
        irqs = []
        for v, qs in self.vector_queues.items():
            d = self.pci.vectors[v]
            if any(i == d.irq for i, _h in self._handlers):
                continue
            h = self._intx_vector_handler(qs) if self.mode == "intx" else self._vector_handler(v, qs)
            self.k.request_irq(d.irq, h, f"nvme-q{v}")
            self._handlers.append((d.irq, h))
            irqs.append(d.irq)
            for q in qs:
                if not self.queues[q].enabled:
                    self.enable_queue(q)
        return irqs

    def free(self) -> None:
        """``free_irq`` on every vector, then ``pci_free_irq_vectors`` (queues stay enabled, as
        the admin queue does across ``nvme_setup_io_queues``)."""
        for irq, h in self._handlers:
            self.k.free_irq(irq, h)
        self._handlers = []
        self.pci.free_irq_vectors()
        self.nvec = 0
        self.vector_queues = {}
        self.mode = "none"

    def probe_pattern(self, nq: int, timeout: float) -> dict:
        """The whole NVMe pattern (see the module's docstring).  Returns what happened."""
        self.probes += 1
        out: dict = {"admin": False, "nvec": 0, "mode": "none"}
        if self.alloc(1, 1, PCI_IRQ_MSIX) == 0:
            return out
        self.request()
        r = self.io(0, 1, timeout)
        out["admin"] = r["consumed"] == 1
        self.free()
        out["nvec"] = self.alloc(1, max(1, min(nq, self.nqueues)), IRQ_FLAGS["all"])
        out["mode"] = self.mode
        if out["nvec"]:
            self.request()
        return out

    # -- records ----------------------------------------------------------------------------------------
    def io(self, q: int, n: int, timeout: float) -> dict:
        """*n* records on queue *q*, one at a time, each waited for until its handler consumed it
        (at most *timeout* guest seconds).  {consumed, lost}."""
        qu = self.queues[q]
        ev = self._done[q]
        consumed = lost = 0
        for _ in range(n):
            with self._cmu:
                self.generated[q] += 1
                want = self.generated[q]
            ev.clear()
            if qu.records >= want:
                consumed += 1
                continue
            self.generate(q, 1)
            while qu.records < want:
                if not self.k.halt_until(ev, timeout):
                    break
                ev.clear()
            if qu.records >= want:
                consumed += 1
            else:
                lost += 1
        with self._cmu:
            self.lost += lost
        return {"consumed": consumed, "lost": lost}

    def _took(self, q: int, n: int) -> None:
        if n:
            with self._cmu:
                self.consumed_total += n
            self._done[q].set()

    def _vector_handler(self, v: int, qs: list[int]) -> Callable[[int], bool]:
        def handler(_irq: int) -> bool:
            self.vec_interrupts[v] = self.vec_interrupts.get(v, 0) + 1
            got = 0
            for q in qs:
                n = self.consume(q)
                self._took(q, n)
                got += n
            if not got:
                with self._cmu:
                    self.wrong_device += 1
            return True
        return handler

    def _intx_vector_handler(self, qs: list[int]) -> Callable[[int], bool]:
        def handler(_irq: int) -> bool:
            status = self.k.readl(self.bar0 + N.REG_INT_STATUS)
            self.vec_interrupts[0] = self.vec_interrupts.get(0, 0) + 1
            if not status:
                self.intx_none += 1
                return False
            for q in qs:
                if status & (1 << q):
                    self._took(q, self.consume(q))
            return True
        return handler

    def stats(self) -> dict:
        with self._cmu:
            return {"mode": self.mode, "nvec": self.nvec, "pirqs": self.pirqs(),
                    "irqs": [d.irq for d in self.pci.vectors],
                    "consumed": self.consumed_total, "lost": self.lost, "wrong_device": self.wrong_device,
                    "intx_none": self.intx_none, "probes": self.probes, "alloc_failures": self.alloc_failures,
                    "fallbacks": self.pci.fallbacks,
                    "interrupts": {str(k): v for k, v in sorted(self.vec_interrupts.items())},
                    "queues": [qu.describe() for qu in self.queues]}

    def teardown(self) -> None:
        for qu in self.queues:
            if qu.enabled:
                self.k.writel(self._qreg(qu.index) + N.Q_ENABLE, 0)
                qu.enabled = False
        self.free()

    def describe_vectors(self) -> list[IrqDesc]:
        return list(self.pci.vectors)
