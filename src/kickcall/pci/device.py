"""A PCI function: configuration space with read-only and write-1-to-clear bits, BARs, command
register, capability list, INTx, reset and Function Level Reset.

Config space is a byte array plus ``wmask`` (bits the guest may write) and ``w1cmask`` (bits a
guest write of 1 clears), the convention QEMU's hw/pci uses.  Writes that touch the command
register or a BAR re-evaluate which BARs are mapped; clearing Bus Master tells the device
(``bus_master_changed``), which must then stop DMA.
"""

from __future__ import annotations

import logging
import struct
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..memory import IORegion
from . import regs as R

if TYPE_CHECKING:
    from .aer import AERCap, AerMessage
    from .bus import PCIBus
    from .msix import MSIX

__all__ = ["PCIDevice", "BAR"]

log = logging.getLogger("kickcall.pci")


@dataclass
class BAR:
    index: int
    region: IORegion
    io: bool
    mem64: bool
    prefetch: bool
    mapped_at: int | None = None

    @property
    def size(self) -> int:
        return self.region.size


def range_covers(addr: int, size: int, reg: int, reg_size: int = 1) -> bool:
    return addr < reg + reg_size and reg < addr + size


class PCIDevice:
    """A PCI function on a bus (type 0 header)."""

    def __init__(self, name: str, *, vendor_id: int, device_id: int, class_code: int,
                 revision: int = 0, subsystem_vendor_id: int = 0, subsystem_id: int = 0,
                 interrupt_pin: int = 1, pcie: bool = False) -> None:
        self.name = name
        self.config_size = 4096 if pcie else 256
        self.config = bytearray(self.config_size)
        self.wmask = bytearray(self.config_size)
        self.w1cmask = bytearray(self.config_size)
        self.bars: list[BAR | None] = [None] * R.PCI_NUM_BARS
        self.bus: PCIBus | None = None
        self.devfn = -1
        self.msix: MSIX | None = None
        self.exp_cap = 0
        self.aer: AERCap | None = None
        """The AER extended capability (``kickcall.pci.aer.AERCap`` sets it)."""
        self.aer_messages_dropped = 0
        self.irq_level = 0
        self._next_cap = R.PCI_CONFIG_HEADER_SIZE
        self.flr_count = 0
        self.reset_count = 0
        self._set16(R.PCI_VENDOR_ID, vendor_id)
        self._set16(R.PCI_DEVICE_ID, device_id)
        self.config[R.PCI_REVISION_ID] = revision
        self.config[R.PCI_CLASS_PROG] = class_code & 0xFF
        self._set16(R.PCI_CLASS_DEVICE, class_code >> 8)
        self._set16(R.PCI_SUBSYSTEM_VENDOR_ID, subsystem_vendor_id)
        self._set16(R.PCI_SUBSYSTEM_ID, subsystem_id)
        self.config[R.PCI_INTERRUPT_PIN] = interrupt_pin
        self.wmask[R.PCI_INTERRUPT_LINE] = 0xFF
        cmd_w = (R.PCI_COMMAND_IO | R.PCI_COMMAND_MEMORY | R.PCI_COMMAND_MASTER | R.PCI_COMMAND_SERR
                 | R.PCI_COMMAND_INTX_DISABLE)
        struct.pack_into("<H", self.wmask, R.PCI_COMMAND, cmd_w)
        struct.pack_into("<H", self.w1cmask, R.PCI_STATUS,
                         R.PCI_STATUS_SIG_SYSTEM_ERROR | R.PCI_STATUS_DETECTED_PARITY)
        if pcie:
            self.add_pcie_cap()

    # -- raw access helpers ------------------------------------------------------------------------
    def _set16(self, off: int, v: int) -> None:
        struct.pack_into("<H", self.config, off, v)

    def get16(self, off: int) -> int:
        return struct.unpack_from("<H", self.config, off)[0]

    def get32(self, off: int) -> int:
        return struct.unpack_from("<I", self.config, off)[0]

    def set_config(self, off: int, value: int, size: int, *, wmask: int | None = None,
                   w1cmask: int | None = None) -> None:
        """Device-side initialisation of config bytes (and optionally their masks)."""
        for i in range(size):
            self.config[off + i] = (value >> (8 * i)) & 0xFF
            if wmask is not None:
                self.wmask[off + i] = (wmask >> (8 * i)) & 0xFF
            if w1cmask is not None:
                self.w1cmask[off + i] = (w1cmask >> (8 * i)) & 0xFF

    # -- capabilities --------------------------------------------------------------------------------
    def add_capability(self, cap_id: int, size: int) -> int:
        """Append a capability of *size* bytes to the list; return its offset."""
        off = (self._next_cap + 3) & ~3
        if off + size > 256:
            raise ValueError(f"{self.name}: no room for capability {cap_id:#x}")
        self.config[off] = cap_id
        self.config[off + 1] = 0
        prev = R.PCI_CAPABILITY_LIST
        while self.config[prev]:
            prev = self.config[prev] + 1
        self.config[prev] = off
        st = self.get16(R.PCI_STATUS) | R.PCI_STATUS_CAP_LIST
        self._set16(R.PCI_STATUS, st)
        self._next_cap = off + size
        return off

    def find_capability(self, cap_id: int) -> int:
        seen = 0
        off = self.config[R.PCI_CAPABILITY_LIST]
        while off and seen < 48:
            if self.config[off] == cap_id:
                return off
            off = self.config[off + 1]
            seen += 1
        return 0

    def add_pcie_cap(self) -> int:
        off = self.add_capability(R.PCI_CAP_ID_EXP, R.PCI_CAP_EXP_SIZEOF)
        self.set_config(off + R.PCI_EXP_FLAGS, 0x0002, 2)  # version 2, PCI Express endpoint
        self.set_config(off + R.PCI_EXP_DEVCAP, R.PCI_EXP_DEVCAP_FLR, 4)
        self.set_config(off + R.PCI_EXP_DEVCTL, 0, 2, wmask=R.PCI_EXP_DEVCTL_BCR_FLR | 0x00FF)
        self.exp_cap = off
        return off

    def add_aer_cap(self, offset: int = 0x100) -> "AERCap":
        """Add the AER extended capability (PCIe functions only)."""
        from .aer import AERCap
        return AERCap(self, offset)

    def requester_id(self) -> int:
        """bus << 8 | devfn, the id an error message carries."""
        bus = self.bus.number if self.bus is not None else 0
        return (bus << 8 | max(self.devfn, 0)) & 0xFFFF

    @property
    def is_root_port(self) -> bool:
        return False

    def aer_send(self, msg: "AerMessage") -> bool:
        """Send an error message upstream (QEMU's ``pcie_aer_msg``): every bridge on the way must
        forward SERR (Bridge Control), the first root port receives it.  False: it went nowhere (no
        root port above, or a bridge that does not forward), counted in ``aer_messages_dropped``."""
        dev: PCIDevice = self
        while True:
            if dev.is_root_port:
                if dev.aer is None or not dev.aer.root_port:
                    break
                dev.aer.root_receive(msg)
                return True
            bus = dev.bus
            bridge = bus.parent if bus is not None else None
            if bridge is None or not bridge.forwards_serr(msg):
                break
            dev = bridge
        self.aer_messages_dropped += 1
        if self.aer is not None:
            self.aer.counters.messages_blocked += 1
        return False

    @property
    def secondary_bus(self) -> "PCIBus | None":
        """The bus behind this function (bridges only)."""
        return None

    def forwards_serr(self, msg: "AerMessage") -> bool:
        """A bridge's answer to a message from its secondary side (type 0 functions have none)."""
        return False

    # -- BARs --------------------------------------------------------------------------------------
    def register_bar(self, index: int, region: IORegion, *, io: bool = False, mem64: bool = False,
                     prefetch: bool = False) -> BAR:
        size = region.size
        if size & (size - 1) or size < (4 if io else 16):
            raise ValueError(f"{self.name}: BAR size {size:#x} must be a power of two")
        if mem64 and index >= 5:
            raise ValueError("a 64-bit BAR needs two registers")
        bar = BAR(index, region, io, mem64, prefetch)
        self.bars[index] = bar
        off = R.PCI_BASE_ADDRESS_0 + 4 * index
        if io:
            self.set_config(off, R.PCI_BASE_ADDRESS_SPACE_IO, 4, wmask=~(size - 1) & 0xFFFFFFFC)
        else:
            t = (R.PCI_BASE_ADDRESS_MEM_TYPE_64 if mem64 else 0) | (
                R.PCI_BASE_ADDRESS_MEM_PREFETCH if prefetch else 0)
            self.set_config(off, t, 4, wmask=~(size - 1) & 0xFFFFFFF0)
            if mem64:
                self.set_config(off + 4, 0, 4, wmask=0xFFFFFFFF if size <= (1 << 32) else
                                ~((size >> 32) - 1) & 0xFFFFFFFF)
        return bar

    def bar_address(self, bar: BAR) -> int | None:
        """Where *bar* decodes now, or None (decoding disabled, unassigned, or a sizing probe)."""
        cmd = self.get16(R.PCI_COMMAND)
        off = R.PCI_BASE_ADDRESS_0 + 4 * bar.index
        if bar.io:
            if not cmd & R.PCI_COMMAND_IO:
                return None
            addr = self.get32(off) & ~0x3
            if addr == 0 or addr + bar.size >= 0x10000:
                return None
            return addr
        if not cmd & R.PCI_COMMAND_MEMORY:
            return None
        addr = self.get32(off) & ~0xF
        if bar.mem64:
            addr |= self.get32(off + 4) << 32
            limit = 1 << 64
        else:
            limit = 1 << 32
        # like QEMU: a BAR whose last byte is the top of the address space (a sizing probe) is unmapped
        if addr == 0 or addr + bar.size >= limit:
            return None
        return addr

    def update_mappings(self) -> None:
        if self.bus is None:
            return
        for bar in self.bars:
            if bar is None:
                continue
            new = self.bar_address(bar)
            if new == bar.mapped_at:
                continue
            space = self.bus.io if bar.io else self.bus.memory
            if bar.mapped_at is not None:
                space.unmap(bar.region)
                bar.mapped_at = None
            if new is not None:
                try:
                    space.map(bar.region, new)
                    bar.mapped_at = new
                except ValueError as e:
                    log.warning("%s: BAR%d not mapped: %s", self.name, bar.index, e)

    def unmap_bars(self) -> None:
        """Take every BAR out of the address spaces (the function is being unplugged)."""
        if self.bus is None:
            return
        for bar in self.bars:
            if bar is not None and bar.mapped_at is not None:
                (self.bus.io if bar.io else self.bus.memory).unmap(bar.region)
                bar.mapped_at = None

    # -- config access from the guest ---------------------------------------------------------------
    def config_read(self, addr: int, size: int) -> int:
        if addr < 0 or addr + size > self.config_size:
            return (1 << (8 * size)) - 1
        if self.msix is not None:
            self.msix.before_config_read()
        return int.from_bytes(self.config[addr:addr + size], "little")

    def config_write(self, addr: int, value: int, size: int) -> None:
        if addr < 0 or addr + size > self.config_size:
            return
        old_cmd = self.get16(R.PCI_COMMAND)
        msix_was = self.msix.snapshot_masks() if self.msix is not None else None
        flr = False
        for i in range(size):
            a = addr + i
            b = (value >> (8 * i)) & 0xFF
            wm = self.wmask[a]
            self.config[a] = (self.config[a] & ~wm & 0xFF) | (b & wm)
            self.config[a] &= ~(b & self.w1cmask[a]) & 0xFF
        if self.exp_cap and range_covers(addr, size, self.exp_cap + R.PCI_EXP_DEVCTL, 2):
            devctl = self.get16(self.exp_cap + R.PCI_EXP_DEVCTL)
            if devctl & R.PCI_EXP_DEVCTL_BCR_FLR:
                self._set16(self.exp_cap + R.PCI_EXP_DEVCTL, devctl & ~R.PCI_EXP_DEVCTL_BCR_FLR)
                flr = True
        if range_covers(addr, size, R.PCI_BASE_ADDRESS_0, 24) or range_covers(addr, size, R.PCI_COMMAND, 2):
            self.update_mappings()
        new_cmd = self.get16(R.PCI_COMMAND)
        if (old_cmd ^ new_cmd) & R.PCI_COMMAND_INTX_DISABLE:
            self._update_irq()
        if (old_cmd ^ new_cmd) & R.PCI_COMMAND_MASTER:
            self.bus_master_changed(bool(new_cmd & R.PCI_COMMAND_MASTER))
        if self.msix is not None and msix_was is not None:
            self.msix.config_written(addr, size, msix_was)
        self.write_config_hook(addr, value, size)
        if flr:
            self.function_level_reset()

    def write_config_hook(self, addr: int, value: int, size: int) -> None:
        """Subclasses react to config writes here."""

    @property
    def bus_master(self) -> bool:
        return bool(self.get16(R.PCI_COMMAND) & R.PCI_COMMAND_MASTER)

    def bus_master_changed(self, enabled: bool) -> None:
        """Called when the guest sets or clears Bus Master Enable."""

    # -- INTx ----------------------------------------------------------------------------------------
    def set_irq(self, level: int) -> None:
        """Set this function's INTx level (the pin stays low while INTx Disable is set)."""
        self.irq_level = 1 if level else 0
        self._update_irq()

    def _update_irq(self) -> None:
        st = self.get16(R.PCI_STATUS)
        st = st | R.PCI_STATUS_INTERRUPT if self.irq_level else st & ~R.PCI_STATUS_INTERRUPT
        self._set16(R.PCI_STATUS, st)
        effective = self.irq_level and not (self.get16(R.PCI_COMMAND) & R.PCI_COMMAND_INTX_DISABLE)
        if self.bus is not None and self.config[R.PCI_INTERRUPT_PIN]:
            self.bus.set_irq(self, 1 if effective else 0)

    # -- MSI-X delivery (the bus forwards to the hypervisor) ------------------------------------------
    def msi_send(self, address: int, data: int) -> None:
        if self.bus is not None:
            self.bus.msi_send(self, address, data)

    # -- reset -------------------------------------------------------------------------------------
    def bus_reset(self) -> None:
        """The secondary bus this function sits on was reset (a hot reset): by default the same
        as a conventional reset of the function."""
        self.reset()

    def device_reset(self) -> None:
        """Device-specific reset (virtio: status 0, queues reset)."""

    def reset(self) -> None:
        """Reset the function: device state, MSI-X, INTx, command register and BARs."""
        self.reset_count += 1
        self.device_reset()
        if self.msix is not None:
            self.msix.reset()
        self.irq_level = 0
        cmd = self.get16(R.PCI_COMMAND)
        self._set16(R.PCI_COMMAND, 0)
        for bar in self.bars:
            if bar is None:
                continue
            off = R.PCI_BASE_ADDRESS_0 + 4 * bar.index
            t = self.get32(off) & (0x3 if bar.io else 0xF)
            struct.pack_into("<I", self.config, off, t)
            if bar.mem64:
                struct.pack_into("<I", self.config, off + 4, 0)
        self.update_mappings()
        self._update_irq()
        if self.aer is not None:
            self.aer.reset()
        if cmd & R.PCI_COMMAND_MASTER:
            self.bus_master_changed(False)

    def function_level_reset(self) -> None:
        """PCIe Function Level Reset (Initiate FLR written to Device Control)."""
        self.flr_count += 1
        log.info("%s: function level reset", self.name)
        self.reset()

    def describe(self) -> dict:
        return {
            "name": self.name,
            "devfn": self.devfn,
            "vendor": self.get16(R.PCI_VENDOR_ID),
            "device": self.get16(R.PCI_DEVICE_ID),
            "command": self.get16(R.PCI_COMMAND),
            "bars": [
                {"bar": b.index, "type": "io" if b.io else "memory", "size": b.size,
                 "address": -1 if b.mapped_at is None else b.mapped_at}
                for b in self.bars if b is not None
            ],
        }
