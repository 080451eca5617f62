"""PCI-to-PCI bridges and PCIe Root Ports: a type 1 header with bus numbers, Bridge Control and its
Secondary Bus Reset, and a secondary bus (``kickcall.pci.bus.PCIBus`` with the bridge as parent).

Secondary Bus Reset (``PCI_BRIDGE_CTL_BUS_RESET`` in Bridge Control): setting the bit resets
every function on the secondary bus (a hot reset: ``PCIBus.reset``, whose hooks run first), on
the 0 -> 1 edge; the bit stays set until software clears it, as Linux's
``pci_reset_secondary_bus`` does after Trst.  An FLR resets one function; this resets them all --
hence vfio's ownership rule for hot resets.

``PCIERootPort`` (QEMU's ``pcie-root-port``): PCIe capability of type Root Port, the AER
capability with the root registers, and one MSI-X vector in BAR0 for its AER interrupt (INTx pin A
when MSI-X is off).  ``x-query-pci-aer`` shows its Root Error Status and the sources it recorded.
"""

from __future__ import annotations

import logging
import struct

from ..memory import AddressSpace
from .. import trace
from . import regs as R
from . import aer as _aer
from .aer import AERCap, AerMessage
from .bus import PCIBus
from .device import PCIDevice, range_covers
from .msix import MSIX

__all__ = ["PCIBridge", "PCIERootPort"]

log = logging.getLogger("kickcall.pci.bridge")

_t_sbr = trace.event("pci_bridge_secondary_bus_reset", "a bridge's Secondary Bus Reset reset its bus")

#: Red Hat's QEMU ids for the generic root port
ROOT_PORT_VENDOR, ROOT_PORT_DEVICE = 0x1B36, 0x000C


class PCIBridge(PCIDevice):
    """A PCI-to-PCI bridge (type 1 header) with a secondary bus.  *secondary*: the bus number
    programmed at creation (what firmware assigns); software may change it."""

    def __init__(self, name: str, memory: AddressSpace, io: AddressSpace, *, secondary: int,
                 vendor_id: int = ROOT_PORT_VENDOR, device_id: int = 0x0001, pcie: bool = False,
                 interrupt_pin: int = 1) -> None:
        super().__init__(name, vendor_id=vendor_id, device_id=device_id, class_code=0x060400,
                         interrupt_pin=interrupt_pin, pcie=pcie)
        self.config[R.PCI_HEADER_TYPE] = R.PCI_HEADER_TYPE_BRIDGE
        for reg in (R.PCI_PRIMARY_BUS, R.PCI_SECONDARY_BUS, R.PCI_SUBORDINATE_BUS):
            self.wmask[reg] = 0xFF
        self.config[R.PCI_SECONDARY_BUS] = secondary
        self.config[R.PCI_SUBORDINATE_BUS] = secondary
        struct.pack_into("<H", self.w1cmask, R.PCI_SEC_STATUS, R.PCI_SEC_STATUS_RCV_SYSTEM_ERROR)
        struct.pack_into("<H", self.wmask, R.PCI_BRIDGE_CONTROL, R.PCI_BRIDGE_CTL_SERR | R.PCI_BRIDGE_CTL_BUS_RESET)
        self.sec_bus = PCIBus(memory, io, parent=self)
        self.secondary_bus_resets = 0

    @property
    def secondary_bus(self) -> PCIBus:
        return self.sec_bus

    @property
    def bridge_control(self) -> int:
        return self.get16(R.PCI_BRIDGE_CONTROL)

    def forwards_serr(self, msg: AerMessage) -> bool:
        """``pcie_aer_msg_vbridge``: an uncorrectable message sets Received System Error in the
        Secondary Status; the message goes on only with SERR forwarding enabled."""
        if msg.severity.uncorrectable:
            st = self.get16(R.PCI_SEC_STATUS) | R.PCI_SEC_STATUS_RCV_SYSTEM_ERROR
            struct.pack_into("<H", self.config, R.PCI_SEC_STATUS, st)
        return bool(self.bridge_control & R.PCI_BRIDGE_CTL_SERR)

    def config_write(self, addr: int, value: int, size: int) -> None:
        before = self.bridge_control
        super().config_write(addr, value, size)
        if range_covers(addr, size, R.PCI_BRIDGE_CONTROL, 2):
            after = self.bridge_control
            if after & R.PCI_BRIDGE_CTL_BUS_RESET and not before & R.PCI_BRIDGE_CTL_BUS_RESET:
                self.secondary_bus_reset()

    def secondary_bus_reset(self) -> None:
        """Reset every function on the secondary bus (the bus reset hooks first)."""
        self.secondary_bus_resets += 1
        _t_sbr.emit(bridge=self.name, bus=self.sec_bus.number, functions=len(self.sec_bus.devices))
        log.info("%s: secondary bus reset of bus %02x", self.name, self.sec_bus.number)
        self.sec_bus.reset()

    def bus_reset(self) -> None:
        super().bus_reset()
        self.sec_bus.reset()

    def reset(self) -> None:
        super().reset()
        struct.pack_into("<H", self.config, R.PCI_BRIDGE_CONTROL, 0)

    def describe(self) -> dict:
        d = super().describe()
        d.update({"secondary-bus": self.config[R.PCI_SECONDARY_BUS],
                  "subordinate-bus": self.config[R.PCI_SUBORDINATE_BUS],
                  "bridge-control": self.bridge_control, "secondary-bus-resets": self.secondary_bus_resets,
                  "functions": [f"{self.sec_bus.number:02x}:{devfn >> 3:02x}.{devfn & 7}"
                                for devfn in sorted(self.sec_bus.devices)]})
        return d


class PCIERootPort(PCIBridge):
    """A PCIe Root Port with AER: the port's AER interrupt is its MSI-X vector 0 (INTx when MSI-X
    is off), raised when a received message's class is enabled in Root Error Command.

    In INTx mode the line is a level (QEMU's ``pcie_aer_root_write_config``): after every config
    write it is up exactly while a class received in Root Error Status is enabled in Root Error
    Command -- clearing the enabled classes' bits or disabling them drops it, enabling a pending
    class raises it.  *intx_follows_root_command* False brings back the old rule (the line dropped
    only when the whole Root Error Status was cleared), only so that a test can show it."""

    def __init__(self, name: str, memory: AddressSpace, io: AddressSpace, *, secondary: int,
                 msix: bool = True, intx_follows_root_command: bool = True) -> None:
        super().__init__(name, memory, io, secondary=secondary, device_id=ROOT_PORT_DEVICE, pcie=True)
        flags = self.get16(self.exp_cap + R.PCI_EXP_FLAGS) & ~R.PCI_EXP_FLAGS_TYPE
        self.set_config(self.exp_cap + R.PCI_EXP_FLAGS, flags | R.PCI_EXP_TYPE_ROOT_PORT << 4, 2)
        self.set_config(self.exp_cap + R.PCI_EXP_DEVCAP, 0, 4)  # no FLR on a port
        if msix:
            MSIX(self, 1, 0)
            assert self.msix is not None
            self.msix.vector_use(0)
        self.aer_cap = AERCap(self, root_port=True, notify=self._aer_interrupt)
        self.aer_interrupts = 0
        self.intx_follows_root_command = intx_follows_root_command

    @property
    def is_root_port(self) -> bool:
        return True

    def _aer_interrupt(self, msg: AerMessage) -> None:
        self.aer_interrupts += 1
        if self.msix is not None and self.msix.enabled:
            self.msix.notify(0)
        else:
            self.set_irq(1)

    def write_config_hook(self, addr: int, value: int, size: int) -> None:
        status = self.aer_cap.get(_aer.PCI_ERR_ROOT_STATUS)
        if not self.intx_follows_root_command:
            if self.irq_level and not status & 0x7F:
                self.set_irq(0)
            return
        # pcie_aer_status_to_cmd: the classes received, as Root Error Command enable bits
        received = ((_aer.PCI_ERR_ROOT_CMD_COR_EN if status & _aer.PCI_ERR_ROOT_COR_RCV else 0)
                    | (_aer.PCI_ERR_ROOT_CMD_NONFATAL_EN if status & _aer.PCI_ERR_ROOT_NONFATAL_RCV else 0)
                    | (_aer.PCI_ERR_ROOT_CMD_FATAL_EN if status & _aer.PCI_ERR_ROOT_FATAL_RCV else 0))
        want = bool(self.aer_cap.get(_aer.PCI_ERR_ROOT_COMMAND) & received)
        if self.msix is not None and self.msix.enabled:
            want = want and bool(self.irq_level)  # MSI-X mode: INTx is never raised, only dropped
        if want != bool(self.irq_level):
            self.set_irq(1 if want else 0)
