"""PCI: configuration space, BARs, capabilities, INTx, MSI-X (table, PBA, masks), FLR, the root bus."""

from .bus import PCIBus, PCIHost
from .device import BAR, PCIDevice
from .msix import MSIX

__all__ = ["PCIBus", "PCIHost", "PCIDevice", "BAR", "MSIX"]
