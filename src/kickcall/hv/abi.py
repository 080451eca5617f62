"""The hypervisor channel ABI: message kinds, request codes, payload layouts, errors.

The channel is one AF_UNIX SOCK_SEQPACKET socket pair between the VMM and the guest process.
Every message starts with ``HDR`` (native byte order, as KVM's ioctl structs are):
``kind:u16 code:u16 vcpu:u32 seq:u64``.  Requests (``KIND_REQ``) are answered by exactly one
``KIND_REPLY`` with the same ``seq``; ``KIND_MSG`` is one-way.  fds travel as SCM_RIGHTS on the
message that needs them.

VMM -> guest requests are the ioctls of the VM (acknowledged synchronously, as KVM's are);
guest -> VMM requests are the vCPUs' heavyweight exits (the vCPU waits for the reply).
"""

from __future__ import annotations

import errno
import struct

HDR = struct.Struct("=HHIQ")

KIND_REQ = 1
KIND_REPLY = 2
KIND_MSG = 3

# VMM -> guest: ioctls (payload JSON unless noted)
IOCTL_SET_MEMORY = 1  # fds: RAM blocks + stats page
IOCTL_IOEVENTFD = 2  # KVM_IOEVENTFD (fd on assign)
IOCTL_IRQFD = 3  # KVM_IRQFD (fd on assign)
IOCTL_SET_GSI_ROUTING = 4  # KVM_SET_GSI_ROUTING
IOCTL_SIGNAL_MSI = 5  # KVM_SIGNAL_MSI  (payload MSI struct)
IOCTL_IRQ_LINE = 6  # KVM_IRQ_LINE     (payload IRQ_LINE struct)
IOCTL_PAUSE_VCPUS = 7
IOCTL_RESUME_VCPUS = 8
IOCTL_GUEST_CMD = 9  # a command to the guest OS (JSON), run on a vCPU
IOCTL_SHUTDOWN = 10
IOCTL_FAULT = 11  # fault injection inside the hypervisor (drop a kick / a call)
IOCTL_XEN_PHYSDEV_OP = 12  # Xen flavour: the device model's HYPERVISOR_physdev_op (fd on map)
IOCTL_XEN_QUERY = 13  # Xen flavour: the domain's pirqs and event channels (read-only)
IOCTL_NAMES = {
    IOCTL_SET_MEMORY: "SET_MEMORY",
    IOCTL_IOEVENTFD: "IOEVENTFD",
    IOCTL_IRQFD: "IRQFD",
    IOCTL_SET_GSI_ROUTING: "SET_GSI_ROUTING",
    IOCTL_SIGNAL_MSI: "SIGNAL_MSI",
    IOCTL_IRQ_LINE: "IRQ_LINE",
    IOCTL_PAUSE_VCPUS: "PAUSE_VCPUS",
    IOCTL_RESUME_VCPUS: "RESUME_VCPUS",
    IOCTL_GUEST_CMD: "GUEST_CMD",
    IOCTL_SHUTDOWN: "SHUTDOWN",
    IOCTL_FAULT: "FAULT",
    IOCTL_XEN_PHYSDEV_OP: "XEN_PHYSDEV_OP",
    IOCTL_XEN_QUERY: "XEN_QUERY",
}

# guest -> VMM: exits (payload EXIT struct; reply payload EXIT_REPLY)
EXIT_MMIO_READ = 101
EXIT_MMIO_WRITE = 102
EXIT_PIO_READ = 103
EXIT_PIO_WRITE = 104
EXIT_NAMES = {EXIT_MMIO_READ: "mmio-read", EXIT_MMIO_WRITE: "mmio-write",
              EXIT_PIO_READ: "pio-read", EXIT_PIO_WRITE: "pio-write"}

# guest -> VMM: one-way messages (JSON)
MSG_GUEST_EVENT = 201

EXIT = struct.Struct("=QQIiiq")  # addr, value, size, pid, tid, t_ns (CLOCK_MONOTONIC at the write)
EXIT_REPLY = struct.Struct("=Q")
MSI = struct.Struct("=QI")  # address, data
IRQ_LINE = struct.Struct("=II")  # gsi, level
REPLY_STATUS = struct.Struct("=i")  # 0 or -errno, followed by optional JSON

SPACE_MMIO = "memory"
SPACE_PIO = "io"

IOEVENTFD_LENGTHS = (0, 1, 2, 4, 8)
KVM_MAX_IRQ_ROUTES = 4096
NR_IOAPIC_PINS = 24


class HypervisorError(OSError):
    """An ioctl that failed, with its errno (as KVM's return -1/errno)."""

    def __init__(self, err: int, msg: str) -> None:
        super().__init__(err, msg)
        self.err = err

    @property
    def errname(self) -> str:
        return errno.errorcode.get(self.err, str(self.err))


class ChannelClosed(ConnectionError):
    """The peer of the hypervisor channel went away."""
