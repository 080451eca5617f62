"""virtio: split virtqueues (device side), the virtio-pci transport with its ioeventfd lifecycle,
and the devices (blk on an image file, net on a loopback or socket-pair backend)."""

from .device import VirtIODevice
from .queue import VirtQueue, VirtQueueElement, VirtQueueError
from .ring import mb, vring_need_event

__all__ = ["VirtIODevice", "VirtQueue", "VirtQueueElement", "VirtQueueError", "mb", "vring_need_event"]
