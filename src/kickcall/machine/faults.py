"""The machine's kick and call faults: lost inside the hypervisor, where a real one would be.

``lose-kick`` drops a queue's doorbell writes in the hypervisor's ioeventfd (the write is matched
and swallowed, as a kernel that lost the eventfd signal would); ``lose-call`` drops its irqfd's
injections (the device signalled, the guest never gets the interrupt); ``lose-host-interrupt`` does
the same to a passthrough (vfio-user) function's MSI-X vector: the irqfd-bound eventfd the host's
trigger points at (the host signalled, the guest never gets it).  The drop counts live in
the hypervisor process (``kickcall.hv.kernel``); this fault forwards each action there and asks it
for the state when the monitor lists the device's faults.  Registered on the device's
``FaultRegistry`` by the machine when it plugs the device.
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING, Callable

from ..faults import Fault, FaultAction, FaultError, FaultErrorKind, FaultKind
from ..hv.vmm import VM, HypervisorError
from ..notify import EventNotifierLike
from ..virtio.queue import VirtQueue

if TYPE_CHECKING:
    from ..vfio.pci import VFIOPCIDevice
    from ..virtio.pci import VirtIOPCIProxy

__all__ = ["NotifierDrop", "register_machine_faults", "register_passthrough_faults", "LOSE_HOST_INTERRUPT"]

LOSE_HOST_INTERRUPT = "lose-host-interrupt"


class NotifierDrop(Fault):
    """Lose a queue's kicks (``target="ioeventfd"``) or calls (``"irqfd"``) in the hypervisor (for a
    passthrough function, "queue" is an MSI-X vector)."""

    kind = FaultKind.INJECTED
    actions = (FaultAction.DROP_NEXT, FaultAction.DROP_ALL, FaultAction.CLEAR)
    per_queue = True

    def __init__(self, name: str, effect: str, vm: VM, target: str, lock: threading.RLock,
                 notifier_of: Callable[[int], EventNotifierLike | None], why_none: str) -> None:
        super().__init__(name, effect)
        self.vm = vm
        self.target = target
        self.lock = lock  # the machine's big lock: the notifier must not change while we name it
        self.notifier_of = notifier_of
        self.why_none = why_none
        self.armed: set[int] = set()  # queues this fault was armed on (for the listing)

    def arm(self, action: FaultAction, queue: int | None = None) -> dict:
        self._check(action)
        if queue is None or queue < 0:
            raise FaultError(FaultErrorKind.BAD_QUEUE, f"fault {self.name} needs a queue")
        with self.lock:
            n = self.notifier_of(queue)
            if n is None:
                raise FaultError(FaultErrorKind.UNSUPPORTED, f"queue {queue} has no {self.target} now: {self.why_none}")
        try:
            res = self.vm.fault(self.target, n, action.value)
        except HypervisorError as e:
            raise FaultError(FaultErrorKind.UNSUPPORTED, str(e)) from None
        self.armed.add(queue)
        return {"fault": self.name, "queue": queue, "action": action.value, "matched": res.get("matched", 0),
                "dropped-so-far": res.get("dropped", 0)}

    def state(self) -> dict:
        out = []
        for q in sorted(self.armed):
            with self.lock:
                n = self.notifier_of(q)
            if n is None:
                out.append({"queue": q, "notifier": None})
                continue
            try:
                res = self.vm.fault(self.target, n, "query")
            except HypervisorError:
                out.append({"queue": q, "notifier": None})
                continue
            out.append({"queue": q, "drop-next": res.get("drop-next", 0), "drop-all": res.get("drop-all", False),
                        "dropped": res.get("dropped", 0)})
        return {"where": f"the hypervisor's {self.target}", "queues": out}


def register_machine_faults(vm: VM, proxy: "VirtIOPCIProxy", lock: threading.RLock) -> None:
    """Register ``lose-kick`` and ``lose-call`` on *proxy*'s device (a VirtIOPCIProxy)."""
    queues = proxy.vdev.queues

    def queue(i: int) -> VirtQueue:
        if not 0 <= i < len(queues):
            raise FaultError(FaultErrorKind.BAD_QUEUE, f"{proxy.vdev.name} has no queue {i}")
        return queues[i]

    def kick_notifier(i: int) -> EventNotifierLike | None:
        return queue(i).host_notifier

    def call_notifier(i: int) -> EventNotifierLike | None:
        q = queue(i)
        return q.guest_notifier if proxy.queue_state(i).irqfd else None

    reg = proxy.vdev.faults
    reg.add(NotifierDrop("lose-kick", "drop the queue's doorbell writes in the hypervisor's ioeventfd: the "
                         "guest kicked, the device never hears it", vm, "ioeventfd", lock, kick_notifier,
                         "its kicks are heavyweight exits (ioeventfd off, or the device is not started)"))
    reg.add(NotifierDrop("lose-call", "drop the queue's irqfd injections in the hypervisor: the device "
                         "signalled, the guest never gets the interrupt", vm, "irqfd", lock, call_notifier,
                         "no vector, masked, or irqfd off"))


def register_passthrough_faults(vm: VM, dev: "VFIOPCIDevice", lock: threading.RLock) -> None:
    """Register ``lose-host-interrupt`` on a passthrough function's ``FaultRegistry`` (once: a
    second call does nothing).  Per MSI-X vector: the hypervisor drops the injections of the
    vector's irqfd -- the eventfd the host's trigger points at while the guest has the vector
    unmasked.  The drop state lives on the hypervisor's irqfd: a vector whose irqfd is released
    (MSI-X disabled) and wired again starts clean."""
    if LOSE_HOST_INTERRUPT in dev.faults:
        return

    def irqfd_notifier(v: int) -> EventNotifierLike | None:
        if not 0 <= v < len(dev.vectors):
            raise FaultError(FaultErrorKind.BAD_QUEUE, f"{dev.name} has no MSI-X vector {v}")
        return dev.vectors[v].kvm_interrupt

    dev.faults.add(NotifierDrop(LOSE_HOST_INTERRUPT, "drop the vector's irqfd injections in the hypervisor: the "
                                "host signalled, the guest never gets the interrupt", vm, "irqfd", lock,
                                irqfd_notifier, "the guest has not unmasked it yet, or irqfd is off (the "
                                "vector's interrupts go through the VMM's eventfd)"))
