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
PCIE_MMCFG_BASE = R.PCIE_MMCFG_BASE
PCIE_MMCFG_BUSES = R.PCIE_MMCFG_BUSES


class PCIBus:
    """A PCI bus: 32 slots x 8 functions.  The root bus (bus 0) has no *parent*; a secondary bus
    belongs to a bridge (``kickcall.pci.bridge.PCIBridge``), shares the root's address spaces (the
    bridge's windows are not modelled: it forwards everything), swizzles its INTx pins onto the
    bridge's (``(pin - 1 + slot) % 4``) and hands its MSIs to the root bus."""

    def __init__(self, memory: AddressSpace, io: AddressSpace, *,
                 irq_line: Callable[[int, int], None] | None = None,
                 msi_sink: Callable[[int, int], object] | None = None,
                 parent: "PCIDevice | None" = None) -> None:
        self.memory = memory
        self.io = io
        self.irq_line = irq_line
        self.msi_sink = msi_sink
        self.parent = parent
        """The bridge this bus is the secondary bus of (None: the root bus)."""
        self.devices: dict[int, PCIDevice] = {}
        self._line_levels: dict[int, set[tuple[int, int]]] = {}
        self.msi_sent = 0
        self.resets = 0
        self.reset_hooks: list[Callable[["PCIBus"], None]] = []
        """Called once per secondary bus reset, before the functions' ``bus_reset`` (the machine
        turns a reset of a bus holding a passthrough card into one host hot reset here)."""

    @property
    def number(self) -> int:
        """The bus number: 0 for the root bus, the bridge's Secondary Bus Number register else."""
        if self.parent is None:
            return 0
        return self.parent.config[R.PCI_SECONDARY_BUS]

    @property
    def root(self) -> "PCIBus":
        b = self
        while b.parent is not None and b.parent.bus is not None:
            b = b.parent.bus
        return b

    def find_bus(self, number: int) -> "PCIBus | None":
        """The bus numbered *number* at or below this one (by the bridges' bus number registers)."""
        if number == self.number:
            return self
        for d in self.devices.values():
            sec = d.secondary_bus
            if sec is None:
                continue
            lo, hi = d.config[R.PCI_SECONDARY_BUS], d.config[R.PCI_SUBORDINATE_BUS]
            if lo and lo <= number <= hi:
                return sec.find_bus(number)
        return None

    def walk(self) -> list[PCIDevice]:
        """Every function at or below this bus, depth first."""
        out: list[PCIDevice] = []
        for _devfn, d in sorted(self.devices.items()):
            out.append(d)
            if d.secondary_bus is not None:
                out.extend(d.secondary_bus.walk())
        return out

    def reset(self) -> None:
        """A secondary bus reset: the hooks, then every function on the bus (and below it)."""
        self.resets += 1
        for hook in list(self.reset_hooks):
            hook(self)
        for _devfn, d in sorted(self.devices.items()):
            d.bus_reset()

    def add_device(self, dev: PCIDevice, slot: int, function: int = 0) -> None:
        if not 0 <= slot < 32 or not 0 <= function < 8:
            raise ValueError(f"bad PCI address {slot:02x}.{function}")
        devfn = slot << 3 | function
        if devfn in self.devices:
            raise ValueError(f"PCI slot {slot:02x}.{function} is already taken by {self.devices[devfn].name}")
        dev.bus = self
        dev.devfn = devfn
        if dev.config[R.PCI_INTERRUPT_PIN]:
            dev.config[R.PCI_INTERRUPT_LINE] = self.route_intx(dev)
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

    def route_intx(self, dev: PCIDevice) -> int:
        """The GSI *dev*'s pin reaches: swizzled through every bridge to the root bus."""
        pin, slot, bus = dev.config[R.PCI_INTERRUPT_PIN], dev.devfn >> 3, self
        while bus.parent is not None and bus.parent.bus is not None:
            pin = (pin - 1 + slot) % 4 + 1
            slot = bus.parent.devfn >> 3
            bus = bus.parent.bus
        return self.intx_gsi(slot, pin)

    def set_irq(self, dev: PCIDevice, level: int) -> None:
        self.root.drive_line(self.route_intx(dev), (self.number, dev.devfn), level)

    def drive_line(self, gsi: int, key: tuple[int, int], level: int) -> None:
        """Root bus: *key* (bus, devfn) drives *gsi* to *level*; the line is the wire-OR of its holders."""
        holders = self._line_levels.setdefault(gsi, set())
        before = bool(holders)
        if level:
            holders.add(key)
        else:
            holders.discard(key)
        after = bool(holders)
        if before != after and self.irq_line is not None:
            self.irq_line(gsi, 1 if after else 0)

    def msi_send(self, dev: PCIDevice, address: int, data: int) -> None:
        if not dev.bus_master:
            log.debug("%s: MSI dropped, bus master disabled", dev.name)
            return
        root = self.root
        root.msi_sent += 1
        if root.msi_sink is not None:
            root.msi_sink(address, data)

    def config_read(self, bus: int, devfn: int, offset: int, size: int) -> int:
        b = self.find_bus(bus)
        dev = b.devices.get(devfn) if b is not None else None
        if dev is None:
            return (1 << (8 * size)) - 1
        return dev.config_read(offset, size)

    def config_write(self, bus: int, devfn: int, offset: int, value: int, size: int) -> None:
        b = self.find_bus(bus)
        dev = b.devices.get(devfn) if b is not None else None
        if dev is not None:
            dev.config_write(offset, value, size)


class PCIHost:
    """Configuration mechanism #1 (the CONFIG_ADDRESS and CONFIG_DATA I/O ports, the first 256
    bytes of a function) and the PCIe ECAM window at ``PCIE_MMCFG_BASE`` (all 4 KiB)."""

    def __init__(self, bus: PCIBus) -> None:
        self.bus = bus
        self.address = 0
        self.addr_region = IORegion("pci-conf-addr", 4, self._addr_read, self._addr_write)
        self.data_region = IORegion("pci-conf-data", 4, self._data_read, self._data_write)
        bus.io.map(self.addr_region, CONFIG_ADDRESS_PORT)
        bus.io.map(self.data_region, CONFIG_DATA_PORT)
        self.mmcfg_region = IORegion("pcie-mmcfg", PCIE_MMCFG_BUSES << 20, self._mmcfg_read, self._mmcfg_write)
        bus.memory.map(self.mmcfg_region, PCIE_MMCFG_BASE)

    def _mmcfg_read(self, off: int, size: int) -> int:
        if (off & 0xFFF) + size > 0x1000:
            return (1 << (8 * size)) - 1
        return self.bus.config_read(off >> 20, (off >> 12) & 0xFF, off & 0xFFF, size)

    def _mmcfg_write(self, off: int, value: int, size: int) -> None:
        if (off & 0xFFF) + size <= 0x1000:
            self.bus.config_write(off >> 20, (off >> 12) & 0xFF, off & 0xFFF, value, size)

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
