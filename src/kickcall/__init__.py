"""kickcall: the kick (driver -> device) and call (device -> driver) paths of virtual devices.

Layers, bottom up (README.md, "What is in a machine"): notify, loop, memory, hv, pci, virtio, guest,
machine, cli; the threads and locks: docs/threads.md.
"""

__version__ = "0.1.0"
