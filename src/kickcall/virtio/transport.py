"""The seam between a virtio device and the transport it sits on.

A device (``kickcall.virtio.device.VirtIODevice``) never knows whether it is behind a PCI function
of kickcall's machine or inside a vhost-user back-end: it asks its transport to signal a queue or
a config change, and asks whether it may touch guest memory.  This is QEMU's ``VirtioBusClass``
(``notify``, ``set_guest_notifiers``, ``set_host_notifier_mr``, ``ioeventfd_assign``) and
Firecracker's ``VirtioInterrupt`` plus its transport, written as two ``typing.Protocol`` classes:

* ``VirtioTransport`` -- what every device needs.  Implemented by the virtio-pci proxy
  (``kickcall.virtio.pci.VirtIOPCIProxy``) and by the vhost-user back-end's transport
  (``kickcall.vhost_user.backend``), whose calls go to the front-end's call fd.
* ``VhostTransport`` -- what a device whose queues another process serves (vhost-user) also needs:
  the transport's ioeventfds (host notifiers) handed to the back-end, its irqfds (guest notifiers),
  and a vector to raise for a call the VMM relays.  Only a transport that owns the guest's
  doorbells and interrupts has these: the PCI proxy.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol, runtime_checkable

if TYPE_CHECKING:
    from ..notify import EventNotifier
    from .queue import VirtQueue

__all__ = ["VirtioTransport", "VhostTransport"]


@runtime_checkable
class VirtioTransport(Protocol):
    """What a virtio device asks of its transport."""

    def notify_queue(self, vq: "VirtQueue") -> None:
        """Signal the driver that *vq*'s used ring moved (virtio_notify after the event-idx check):
        an MSI-X vector, INTx, or a vhost-user call fd."""

    def notify_config(self) -> None:
        """Signal a configuration change (the config vector, or VHOST_USER_BACKEND_CONFIG_CHANGE_MSG)."""

    def dma_enabled(self) -> bool:
        """May the device touch guest memory now?  PCI: the command register's Bus Master bit.
        A vhost-user back-end: always (its front-end stops the rings instead)."""

    def queue_select(self) -> int | None:
        """The transport's queue-select register (virtio-pci's ``queue_select``), for status
        queries; None when the transport has none (vhost-user addresses every queue by index)."""


@runtime_checkable
class VhostTransport(VirtioTransport, Protocol):
    """A transport that can hand its notifiers to a back-end in another process."""

    def grab_ioeventfd(self) -> None:
        """Stop handling kicks in the VMM (virtio_bus_grab_ioeventfd): the back-end takes them."""

    def release_ioeventfd(self) -> None:
        """Handle kicks in the VMM again (virtio_bus_release_ioeventfd)."""

    def set_host_notifier(self, vq: "VirtQueue", assign: bool) -> "EventNotifier | None":
        """Assign (or deassign, test-and-clear included) the ioeventfd of *vq*'s doorbell."""

    def set_guest_notifiers(self, on: bool) -> None:
        """Wire (or unwire) every queue's guest notifier to its vector's irqfd."""

    def notify_vector(self, vector: int) -> None:
        """Raise *vector* as the VMM (a call the VMM relays, e.g. from a masked-vector poll)."""
