"""Passthrough devices: the VFIO uAPI, a host PCIe function behind a model of the host kernel's
vfio-pci, served in its own process over the vfio-user protocol, and the VMM's side of it (the
vfio-user client that emulates the guest-visible MSI-X table and turns it into SET_IRQS).

Modules: ``uapi`` (linux/vfio.h), ``protocol`` (the vfio-user messages), ``host`` (the host
kernel's vfio-pci interrupt and reset rules, the host IRQ pool), ``nic`` (the host function),
``server`` (the vfio-user server), ``client`` (the vfio-user client).
"""
