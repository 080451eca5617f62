"""The software hypervisor, with KVM's semantics.

``kernel`` is the half that lives with the guest's vCPUs (ioeventfd table, irqfds, GSI routing,
irqchip, vCPU pause); ``vmm`` is the VMM's handle on it (ioctls, heavyweight exits, MSI route
allocation, the shared counters).  They talk over one SOCK_SEQPACKET socket pair (``channel``).
"""

from .abi import SPACE_MMIO, SPACE_PIO, ChannelClosed, HypervisorError
from .channel import Channel, socketpair
from .ioeventfd import Ioeventfd, IoeventfdTable
from .routing import GsiRouting, IrqchipRoute, MsiRoute, decode_msi, msi_address

__all__ = [
    "SPACE_MMIO", "SPACE_PIO", "ChannelClosed", "HypervisorError", "Channel", "socketpair",
    "Ioeventfd", "IoeventfdTable", "GsiRouting", "IrqchipRoute", "MsiRoute", "decode_msi", "msi_address",
]
