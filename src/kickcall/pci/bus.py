"""The root PCI bus with slots, and the host bridge's configuration mechanism #1 (0xCF8/0xCFC).

INTx routing: function *fn* of slot *s* with pin *p* (1 = INTA) drives GSI ``16 + (s + p - 1) % 4``
(the four PIRQ lines), shared and wire-ORed between functions.  MSI messages are handed to the
hypervisor (``msi_send``).
"""

from __future__ import annotations

import logging
from typing import Callable

from ..memory import AddressSpace, IORegion
from . import regs as R
from .device import PCIDevice

__all__ = ["PCIBus", "PCIHost", "PIRQ_BASE_GSI"]

log = logging.getLogger("kickcall.pci.bus")

PIRQ_BASE_GSI = 16
CONFIG_ADDRESS_PORT = 0xCF8
CONFIG_DATA_PORT = 0xCFC


class PCIBus:
    """Bus 0: 32 slots x 8 functions."""

    def __init__(self, memory: AddressSpace, io: AddressSpace, *,
                 irq_line: Callable[[int, int], None] | None = None,
                 msi_sink: Callable[[int, int], object] | None = None) -> None:
        self.memory = memory
        self.io = io
        self.irq_line = irq_line
        self.msi_sink = msi_sink
        self.devices: dict[int, PCIDevice] = {}
        self._line_levels: dict[int, set[int]] = {}
        self.msi_sent = 0

    def add_device(self, dev: PCIDevice, slot: int, function: int = 0) -> None:
        if not 0 <= slot < 32 or not 0 <= function < 8:
            raise ValueError(f"bad PCI address {slot:02x}.{function}")
        devfn = slot << 3 | function
        if devfn in self.devices:
            raise ValueError(f"PCI slot {slot:02x}.{function} is already taken by {self.devices[devfn].name}")
        dev.bus = self
        dev.devfn = devfn
        pin = dev.config[R.PCI_INTERRUPT_PIN]
        if pin:
            dev.config[R.PCI_INTERRUPT_LINE] = self.intx_gsi(slot, pin)
        self.devices[devfn] = dev

    def remove_device(self, dev: PCIDevice) -> None:
        """Unplug *dev*: its BARs leave the address spaces, its INTx line is dropped, its slot
        reads as empty (vendor 0xffff) from now on."""
        if self.devices.get(dev.devfn) is not dev:
            return
        dev.unmap_bars()
        if dev.config[R.PCI_INTERRUPT_PIN]:
            self.set_irq(dev, 0)
        del self.devices[dev.devfn]
        dev.bus = None

    def find(self, name: str) -> PCIDevice | None:
        for d in self.devices.values():
            if d.name == name:
                return d
        return None

    @staticmethod
    def intx_gsi(slot: int, pin: int) -> int:
        return PIRQ_BASE_GSI + (slot + pin - 1) % 4

    def set_irq(self, dev: PCIDevice, level: int) -> None:
        gsi = self.intx_gsi(dev.devfn >> 3, dev.config[R.PCI_INTERRUPT_PIN])
        holders = self._line_levels.setdefault(gsi, set())
        before = bool(holders)
        if level:
            holders.add(dev.devfn)
        else:
            holders.discard(dev.devfn)
        after = bool(holders)
        if before != after and self.irq_line is not None:
            self.irq_line(gsi, 1 if after else 0)

    def msi_send(self, dev: PCIDevice, address: int, data: int) -> None:
        if not dev.bus_master:
            log.debug("%s: MSI dropped, bus master disabled", dev.name)
            return
        self.msi_sent += 1
        if self.msi_sink is not None:
            self.msi_sink(address, data)

    def config_read(self, bus: int, devfn: int, offset: int, size: int) -> int:
        dev = self.devices.get(devfn) if bus == 0 else None
        if dev is None:
            return (1 << (8 * size)) - 1
        return dev.config_read(offset, size)

    def config_write(self, bus: int, devfn: int, offset: int, value: int, size: int) -> None:
        dev = self.devices.get(devfn) if bus == 0 else None
        if dev is not None:
            dev.config_write(offset, value, size)


class PCIHost:
    """Configuration mechanism #1: the CONFIG_ADDRESS and CONFIG_DATA I/O ports."""

    def __init__(self, bus: PCIBus) -> None:
        self.bus = bus
        self.address = 0
        self.addr_region = IORegion("pci-conf-addr", 4, self._addr_read, self._addr_write)
        self.data_region = IORegion("pci-conf-data", 4, self._data_read, self._data_write)
        bus.io.map(self.addr_region, CONFIG_ADDRESS_PORT)
        bus.io.map(self.data_region, CONFIG_DATA_PORT)

    def _addr_read(self, off: int, size: int) -> int:
        return (self.address >> (8 * off)) & ((1 << (8 * size)) - 1)

    def _addr_write(self, off: int, value: int, size: int) -> None:
        if off == 0 and size == 4:
            self.address = value & 0x80FFFFFC

    def _decode(self, off: int) -> tuple[int, int, int] | None:
        a = self.address
        if not a & 0x80000000:
            return None
        return (a >> 16) & 0xFF, (a >> 8) & 0xFF, (a & 0xFC) + off

    def _data_read(self, off: int, size: int) -> int:
        d = self._decode(off)
        if d is None:
            return (1 << (8 * size)) - 1
        return self.bus.config_read(d[0], d[1], d[2], size)

    def _data_write(self, off: int, value: int, size: int) -> None:
        d = self._decode(off)
        if d is not None:
            self.bus.config_write(d[0], d[1], d[2], value, size)
