"""The paths a kick and a call take, as the queue's counters and the monitor name them.

A kick is the driver telling the device "the avail ring has new entries" (QEMU's
``virtio_queue_notify``); a call is the device telling the driver "the used ring has new entries"
(``virtio_notify``).  Each travels one of a few paths, depending on ioeventfd/irqfd, MSI-X and the
vector's mask; ``VirtQueue.count_kick``/``count_call`` count them per path, and QMP shows the counts
(``kicks-by-path``, ``calls-by-path``) and the path an injected event took (``x-debug-virtio-inject``).

Both are ``StrEnum``: a member *is* its string (``KickPath.MMIO == "mmio"``, same hash), so the
counters' dictionaries, their JSON and the monitor's replies carry the same strings as before.
"""

from __future__ import annotations

from enum import StrEnum

__all__ = ["KickPath", "CallPath"]


class KickPath(StrEnum):
    """How a kick reached the device."""

    IOEVENTFD = "ioeventfd"
    """The doorbell write matched the queue's ioeventfd: the host notifier was signalled in the
    hypervisor and the main loop handled it (no exit to the VMM)."""
    MMIO = "mmio"
    """A heavyweight exit: the doorbell write reached the VMM's notify-region handler
    (``VirtIOPCIProxy.notify_write``; ioeventfd off, not started, or failed to start)."""
    RELEASE_SCAN = "release-scan"
    """Not a driver kick: vhost handed the host notifiers back (``release_ioeventfd``) and the
    proxy scans each ring once, so a kick the back-end never saw is not lost."""
    VHOST = "vhost-kick"
    """An injected kick that the VMM wrote to the vhost back-end's kick fd (the host notifiers are
    grabbed); the back-end counts its read of it too."""
    VHOST_START = "vhost-start"
    """The kick the VMM writes to a queue's kick fd when it (re)starts a vhost back-end's ring, so
    that a kick the previous back-end read and never acted on is not lost."""
    BACKEND = "vhost-user"
    """A doorbell write that the hypervisor matched on the ioeventfd of a queue whose kick fd a
    vhost-user back-end owns: the VMM never sees it, so it is counted where it happens, by the
    hypervisor's hit counter of that ioeventfd (read from the shared stats page, never asked for).
    It counts writes; the back-end counts its reads of the kick fd, which coalesce."""


class CallPath(StrEnum):
    """How a call reached (or was parked for) the driver."""

    IRQFD = "irqfd"
    """The guest notifier is assigned to the vector's GSI as an irqfd: the hypervisor injects the
    MSI without the VMM."""
    MASKED_POLL = "masked-poll"
    """The guest notifier was signalled while its vector is masked (irqfd deassigned): the VMM
    polls it and turns it into the vector's PBA bit."""
    MSI = "msi"
    """No irqfd: the VMM sent the MSI-X message itself (``msix_notify`` on an unmasked vector)."""
    PBA = "pba"
    """No irqfd, vector masked: ``msix_notify`` set the vector's pending bit."""
    INTX = "intx"
    """MSI-X disabled: the VMM set the ISR and raised INTx."""
    POLLED = "polled"
    """A vhost device without a guest notifier (INTx, or irqfd off): the VMM polls the back-end's
    call fd (the masked notifier) and raises the transport's interrupt for it."""
    MSI_FORCED = "msi-forced"
    """An injected call whose MSI-X message was sent although the vector is masked (``force``);
    never taken by the device itself."""
    BACKEND_IRQFD = "vhost-irqfd"
    """A vhost-user back-end's call, injected by the hypervisor's irqfd on the queue's vector (the
    vector's GSI injections while the back-end owns the queue's call fd).  Queues that share a
    vector share its count."""
