"""kickcall: the kick (driver -> device) and call (device -> driver) paths of virtual devices.

Layers, bottom up (see DESIGN.md): notify, loop, memory, hv, pci, virtio, guest, machine, cli.
"""

__version__ = "0.1.0"
