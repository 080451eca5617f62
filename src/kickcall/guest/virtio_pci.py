"""The guest's modern virtio-pci driver (Linux ``virtio_pci_modern``, modelled).

Probe: find the vendor capabilities, reset, ACKNOWLEDGE|DRIVER, negotiate features, FEATURES_OK
(and check it stuck), set up the queues -- one MSI-X vector per queue plus one for config, each
written to ``queue_msix_vector``/``config_msix_vector`` and *read back* (VIRTIO_MSI_NO_VECTOR means
the device refused it); falling back to one shared vector, then to INTx with the ISR -- and finally
DRIVER_OK.  Kicks are 16-bit writes of the queue index to the queue's notify address.
"""

from __future__ import annotations

import logging
from typing import Callable

from ..pci import regs as R
from ..virtio.ring import VIRTIO_F_VERSION_1, VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC
from ..virtio.pci import (
    C_CFGGEN, C_DF, C_DFSELECT, C_GF, C_GFSELECT, C_MSIX, C_NUMQ, C_Q_AVAILLO, C_Q_DESCLO, C_Q_ENABLE,
    C_Q_MSIX, C_Q_NOFF, C_Q_SELECT, C_Q_SIZE, C_Q_USEDLO, C_STATUS, CFG_TYPE,
)
from .kernel import PCI_IRQ_INTX, PCI_IRQ_MSIX, GuestKernel, GuestPciDev
from .virtio_ring import Vring

__all__ = ["VirtioPciDevice", "VirtioError", "NO_VECTOR"]

log = logging.getLogger("kickcall.guest.virtio")

NO_VECTOR = 0xFFFF
S_ACKNOWLEDGE, S_DRIVER, S_DRIVER_OK, S_FEATURES_OK, S_NEEDS_RESET, S_FAILED = 1, 2, 4, 8, 0x40, 0x80


class VirtioError(RuntimeError):
    pass


class VirtioPciDevice:
    """A virtio device as the guest driver sees it."""

    def __init__(self, kernel: GuestKernel, pci: GuestPciDev) -> None:
        self.k = kernel
        self.pci = pci
        self.device_id = pci.device - 0x1040
        self.common = self.isr = self.device = self.notify_base = 0
        self.notify_mult = 0
        self.features = 0
        self.vqs: list[Vring] = []
        self.notify_addrs: list[int] = []
        self.irq_mode = 0
        self.per_vq_vectors = False
        self.config_changes = 0
        self.needs_reset_seen = 0
        self.on_config_change: Callable[[], None] | None = None
        self._handlers: list[tuple[int, Callable]] = []
        self._find_caps()

    def _find_caps(self) -> None:
        for off in self.pci.capabilities(R.PCI_CAP_ID_VNDR):
            cfg_type = self.pci.read_config(off + 3, 1)
            bar = self.pci.read_config(off + 4, 1)
            offset = self.pci.read_config(off + 8, 4)
            if bar not in self.pci.bars:
                continue
            addr = self.pci.bar_addr(bar) + offset
            if cfg_type == CFG_TYPE["common"]:
                self.common = addr
            elif cfg_type == CFG_TYPE["isr"]:
                self.isr = addr
            elif cfg_type == CFG_TYPE["device"]:
                self.device = addr
            elif cfg_type == CFG_TYPE["notify"]:
                self.notify_base = addr
                self.notify_mult = self.pci.read_config(off + 16, 4)
        if not (self.common and self.isr and self.notify_base):
            raise VirtioError(f"{self.pci!r}: missing virtio-pci capabilities")

    # -- registers ------------------------------------------------------------------------------------
    def get_status(self) -> int:
        return self.k.readb(self.common + C_STATUS)

    def set_status(self, s: int) -> None:
        self.k.writeb(self.common + C_STATUS, s)

    def add_status(self, bits: int) -> None:
        self.set_status(self.get_status() | bits)

    def reset(self) -> None:
        self.set_status(0)
        for _ in range(1000):
            if self.get_status() == 0:
                return
        raise VirtioError("device did not reset")

    def device_features(self) -> int:
        f = 0
        for sel in (0, 1):
            self.k.writel(self.common + C_DFSELECT, sel)
            f |= self.k.readl(self.common + C_DF) << (32 * sel)
        return f

    def write_driver_features(self, f: int) -> None:
        for sel in (0, 1):
            self.k.writel(self.common + C_GFSELECT, sel)
            self.k.writel(self.common + C_GF, (f >> (32 * sel)) & 0xFFFFFFFF)

    def num_queues(self) -> int:
        return self.k.readw(self.common + C_NUMQ)

    def config_generation(self) -> int:
        return self.k.readb(self.common + C_CFGGEN)

    def read_device_config(self, off: int, size: int) -> bytes:
        while True:
            gen = self.config_generation()
            data = b"".join(self.k.readb(self.device + off + i).to_bytes(1, "little") for i in range(size))
            if self.config_generation() == gen:
                return data

    def has(self, bit: int) -> bool:
        return bool(self.features >> bit & 1)

    # -- probe ---------------------------------------------------------------------------------------
    def begin(self, wanted_features: int) -> int:
        """reset, ACKNOWLEDGE, DRIVER, negotiate; returns the negotiated features."""
        self.reset()
        self.pci.set_master(True)
        self.add_status(S_ACKNOWLEDGE)
        self.add_status(S_DRIVER)
        offered = self.device_features()
        if not offered >> VIRTIO_F_VERSION_1 & 1:
            self.add_status(S_FAILED)
            raise VirtioError("device does not offer VIRTIO_F_VERSION_1")
        self.features = offered & wanted_features
        self.write_driver_features(self.features)
        self.add_status(S_FEATURES_OK)
        if not self.get_status() & S_FEATURES_OK:
            self.add_status(S_FAILED)
            raise VirtioError("device refused FEATURES_OK")
        return self.features

    def find_vqs(self, names: list[str], callbacks: list[Callable[[Vring], None] | None],
                 sizes: list[int] | None = None, *, allow_msix: bool = True, per_vq: bool = True) -> list[Vring]:
        """vp_find_vqs: per-vq MSI-X vectors, else one shared vector, else INTx."""
        attempts: list[tuple[str, bool | None]] = []
        if allow_msix and self.pci.msix_cap:
            if per_vq:
                attempts.append(("msix-per-vq", True))
            attempts.append(("msix-shared", False))
        attempts.append(("intx", None))
        last: Exception | None = None
        for mode, per in attempts:
            try:
                return self._find_vqs(names, callbacks, sizes, mode, per)
            except VirtioError as e:
                last = e
                self.del_vqs()
        raise VirtioError(f"no interrupt mode worked: {last}")

    def _find_vqs(self, names, callbacks, sizes, mode: str, per_vq: bool | None) -> list[Vring]:
        n = len(names)
        if mode == "intx":
            self.pci.alloc_irq_vectors(1, 1, PCI_IRQ_INTX)
            self.irq_mode = PCI_IRQ_INTX
            self.k.request_irq(self.pci.irq_vector(0), self._intx_handler, "virtio-intx")
            self._handlers.append((self.pci.irq_vector(0), self._intx_handler))
        else:
            nvec = (n + 1) if per_vq else 2
            got = self.pci.alloc_irq_vectors(nvec, nvec, PCI_IRQ_MSIX)
            if got < nvec:
                raise VirtioError("not enough MSI-X vectors")
            self.irq_mode = PCI_IRQ_MSIX
            self.per_vq_vectors = bool(per_vq)
            self.k.request_irq(self.pci.irq_vector(0), self._config_handler, "virtio-config")
            self._handlers.append((self.pci.irq_vector(0), self._config_handler))
            self.k.writew(self.common + C_MSIX, 0)
            if self.k.readw(self.common + C_MSIX) == NO_VECTOR:
                raise VirtioError("device refused the config vector")
            if not per_vq:
                self.k.request_irq(self.pci.irq_vector(1), self._vring_shared_handler, "virtio-queues")
                self._handlers.append((self.pci.irq_vector(1), self._vring_shared_handler))
        for i, name in enumerate(names):
            self.k.writew(self.common + C_Q_SELECT, i)
            qsize = self.k.readw(self.common + C_Q_SIZE)
            if not qsize:
                raise VirtioError(f"queue {i} does not exist")
            if sizes and sizes[i] and sizes[i] < qsize:
                qsize = sizes[i]
                self.k.writew(self.common + C_Q_SIZE, qsize)
            noff = self.k.readw(self.common + C_Q_NOFF)
            vr = Vring(self.k.memory, self.k.pages.alloc, i, qsize, event_idx=self.has(VIRTIO_RING_F_EVENT_IDX),
                       indirect=self.has(VIRTIO_RING_F_INDIRECT_DESC), notify=self._notify, name=name)
            vr.callback = callbacks[i]
            self.k.writeq(self.common + C_Q_DESCLO, vr.desc)
            self.k.writeq(self.common + C_Q_AVAILLO, vr.avail)
            self.k.writeq(self.common + C_Q_USEDLO, vr.used)
            if self.irq_mode == PCI_IRQ_MSIX:
                vec = (i + 1) if per_vq else 1
                self.k.writew(self.common + C_Q_MSIX, vec)
                if self.k.readw(self.common + C_Q_MSIX) == NO_VECTOR:
                    raise VirtioError(f"device refused vector {vec} for queue {i}")
                if per_vq:
                    h = (lambda irq, vr=vr: vr.interrupt())
                    self.k.request_irq(self.pci.irq_vector(vec), h, f"virtio-{name}")
                    self._handlers.append((self.pci.irq_vector(vec), h))
            self.k.writew(self.common + C_Q_ENABLE, 1)
            self.vqs.append(vr)
            self.notify_addrs.append(self.notify_base + noff * self.notify_mult)
        return self.vqs

    def ready(self) -> None:
        self.add_status(S_DRIVER_OK)

    def del_vqs(self) -> None:
        for vq in self.vqs:
            vq.release()
        for irq, h in self._handlers:
            self.k.free_irq(irq, h)
        self._handlers = []
        self.pci.free_irq_vectors()
        self.vqs = []
        self.notify_addrs = []
        self.irq_mode = 0

    def teardown(self) -> None:
        """Reset the device and release the queues and vectors (remove / before re-probe)."""
        try:
            self.reset()
        finally:
            for vq in self.vqs:
                vq.reset_state()
            self.del_vqs()

    def forget(self) -> None:
        """After an FLR the device is already reset and the vectors are gone."""
        for vq in self.vqs:
            vq.reset_state()
            vq.release()
        self._handlers = []
        self.vqs = []
        self.notify_addrs = []
        self.irq_mode = 0

    # -- kicks and interrupts -----------------------------------------------------------------------
    def _notify(self, vq: Vring) -> None:
        self.k.writew(self.notify_addrs[vq.index], vq.index)

    def notify_addr(self, q: int) -> int:
        return self.notify_addrs[q]

    def _vring_shared_handler(self, irq: int) -> bool:
        handled = False
        for vq in self.vqs:
            handled |= vq.interrupt()
        return handled

    def _config_handler(self, irq: int) -> bool:
        self.config_changes += 1
        if self.get_status() & S_NEEDS_RESET:
            self.needs_reset_seen += 1
        if self.on_config_change is not None:
            self.on_config_change()
        return True

    def _intx_handler(self, irq: int) -> bool:
        isr = self.k.readb(self.isr)  # read-to-clear, lowers INTx
        if not isr:
            return False
        if isr & 2:
            self._config_handler(irq)
        if isr & 1:
            self._vring_shared_handler(irq)
        return True

