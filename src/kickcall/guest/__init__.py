"""The guest: a kernel model (CPUs, interrupts, PCI core with MSI-X and INTx), virtio drivers and
workloads that verify their data.  It runs in its own process (``kickcall.guest.process``) or,
for unit tests, on threads of the VMM's process -- through the same hypervisor interface."""
