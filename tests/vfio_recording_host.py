"""The real host model, recorded: for the tests of the VMM's side of passthrough (``kickcall.vfio.pci``).

``RecordingHost`` IS the host: a ``kickcall.vfio.host.VfioPciDevice`` (vfio-pci's GET_IRQ_INFO,
SET_IRQS, reset and release rules, a ``HostIrqPool``) bound to a ``kickcall.vfio.nic.NicFunction``
(the kickcall-nic function: config space, BAR0 registers, BAR4 with the MSI-X table, PBA and a
sparse-mmap memfd area, queues that raise their interrupt).  The only addition is a record of each
DEVICE_SET_IRQS the server hands it (index, flags, start, count, number of fds), taken before the
real ``set_irqs`` runs (refused calls are recorded too), where each DEVICE_RESET fell in that
sequence, and small helpers built on the device's
public API only:

* ``fire(v)``: the function raises an interrupt on vector *v* through its real path: a queue's
  VECTOR register is pointed at *v* and the queue raises (``NicFunction.raise_queue``) under the
  device's lock -- an MSI-X message to the host (masked: the PBA bit), or INTx while MSI/MSI-X is off;
* ``mode``, ``msix_fds``, ``resets``, ``intx_fired``: the host's state, from ``irq_type`` and
  ``describe()``;
* ``dma_read`` / ``dma_write``: the function's DMA space (the client's memory).

Constructor knobs: ``noresize`` (the host reports NORESIZE on MSI-X: ``dynamic_msix=False``),
``host_irqs`` (the ``HostIrqPool`` size), ``vectors`` (the MSI-X table size), ``queues``.
"""

from __future__ import annotations

import struct
import threading
from dataclasses import dataclass
from typing import Sequence

from kickcall.vfio.host import HostIrqPool, VfioPciDevice
from kickcall.vfio.nic import Q_VECTOR, QUEUE_BASE, QUEUE_STRIDE, NicFunction
from kickcall.vfio.uapi import VfioIrqSet, VfioPciIrqIndex

__all__ = ["RecordingHost", "SetIrqsCall"]


@dataclass
class SetIrqsCall:
    """One DEVICE_SET_IRQS as the host received it."""

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


class RecordingHost(VfioPciDevice):
    """vfio-pci bound to a kickcall-nic function, with its SET_IRQS calls recorded."""

    def __init__(self, *, vectors: int = 16, noresize: bool = False, host_irqs: int = 64, queues: int = 4,
                 name: str = "nic0") -> None:
        self.calls: list[SetIrqsCall] = []
        #: ``len(calls)`` at each DEVICE_RESET (where the resets fall in the SET_IRQS sequence)
        self.reset_marks: list[int] = []
        self._calls_mu = threading.Lock()
        super().__init__(NicFunction("kickcall-nic", queues=queues, vectors=vectors), HostIrqPool(host_irqs),
                         dynamic_msix=not noresize, name=name)

    def set_irqs(self, irq_set: VfioIrqSet, fds: Sequence[int] = ()) -> None:
        with self._calls_mu:
            self.calls.append(SetIrqsCall(irq_set.index, irq_set.flags, irq_set.start, irq_set.count, len(fds)))
        super().set_irqs(irq_set, fds)

    def reset(self) -> None:
        with self._calls_mu:
            self.reset_marks.append(len(self.calls))
        super().reset()

    # -- what tests look at ------------------------------------------------------------------------
    def msix_calls(self) -> list[SetIrqsCall]:
        with self._calls_mu:
            return [c for c in self.calls if c.index == VfioPciIrqIndex.MSIX]

    def intx_calls(self) -> list[SetIrqsCall]:
        with self._calls_mu:
            return [c for c in self.calls if c.index == VfioPciIrqIndex.INTX]

    @property
    def nvectors(self) -> int:
        return self.nic.nvectors

    def fire(self, v: int, queue: int = 0) -> None:
        """The function raises vector *v*: queue *queue*'s VECTOR register is pointed at *v* and the
        queue raises its interrupt, as its engine does after a batch (MSI-X when enabled -- a masked
        host entry latches its PBA bit --, INTx while MSI and MSI-X are off)."""
        with self.lock:
            self.nic.bar0_write(QUEUE_BASE + QUEUE_STRIDE * queue + Q_VECTOR, struct.pack("<I", v))
            self.nic.raise_queue(queue)

    @property
    def mode(self) -> str | None:
        """The enabled IRQ index: None, "intx", "msi" or "msix"."""
        with self.lock:
            return None if self.irq_type is None else self.irq_type.name.lower()

    @property
    def msix_fds(self) -> dict[int, int]:
        """MSI-X vector -> the host's trigger fd, for each vector that has a trigger."""
        d = self.describe()
        if d["irq-type"] != "MSIX":
            return {}
        return {v["vector"]: v["trigger-fd"] for v in d["vectors"] if v["trigger-fd"] is not None}

    def count(self, name: str) -> int:
        return int(self.describe()["counts"].get(name, 0))

    @property
    def resets(self) -> int:
        """DEVICE_RESETs the host performed."""
        return self.count("device-resets")

    @property
    def intx_fired(self) -> int:
        """INTx interrupts the host took (each one automasks the line and signals the trigger)."""
        return self.count("intx-automasks")

    def dma_write(self, iova: int, data: bytes) -> None:
        space = self.nic.dma
        assert space is not None, "no DMA mapping yet"
        space.dma_write(iova, data)

    def dma_read(self, iova: int, n: int) -> bytes:
        space = self.nic.dma
        assert space is not None, "no DMA mapping yet"
        return space.dma_read(iova, n)
