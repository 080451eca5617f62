"""What the monitor sees of a machine or a back-end: small query and injection interfaces.

The monitor never reaches into device internals; a machine (``kickcall.machine.monitor``) and the
vhost-user back-end program (``kickcall.apps.vhost_user_blk``) each implement these.  Every query
must be read-only -- in particular nothing here may consume an eventfd or stop a vhost ring.
The fault registry (``faults``) is listed only for the operator's ``x-debug-fault``:
``kickcall diagnose`` never asks for it (its allowlist, docs/diagnose.md) and must find faults
from their effects, as it would a real bug.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from ..faults import FaultRegistry
    from ..pci.aer import PCIEAERErr

__all__ = ["Target", "DeviceView", "TargetError", "AerView"]


class TargetError(Exception):
    """A request the target refuses (unknown queue, no such notifier, ...): a GenericError."""

    def __init__(self, desc: str, cls: str = "GenericError") -> None:
        super().__init__(desc)
        self.desc = desc
        self.cls = cls


class DeviceView(Protocol):
    id: str  # qdev id ("blk0")
    path: str  # QOM path of the VirtIODevice ("/machine/peripheral/blk0/virtio-backend")
    type_name: str  # "virtio-blk", "vhost-user-blk", ...
    virtio: bool  # a VirtIODevice (x-query-virtio lists it); False: a passthrough function

    def num_queues(self) -> int: ...

    def virtio_status(self) -> dict: ...  # QEMU's VirtioStatus

    def queue_status(self, queue: int) -> dict: ...  # VirtQueueStatus (+ kickcall's ring fields)

    def vhost_queue_status(self, queue: int) -> dict: ...  # VirtVhostQueueStatus

    def queue_element(self, queue: int, index: int | None) -> dict: ...  # VirtioQueueElement

    def pci_info(self) -> dict | None: ...  # PciDeviceInfo (None: not on PCI)

    def msix(self) -> dict: ...  # x-query-pci-msix

    def vfio(self) -> dict: ...  # x-query-vfio (TargetError: not a passthrough device)

    def notifiers(self) -> list[dict]: ...  # x-query-device-notifiers

    def notifier_write(self, id: int) -> dict: ...

    def inject(self, event: str, queue: int, force: bool) -> dict: ...  # {"path": ..., "forced": ...}

    def fault(self, queue: int, path: str, action: str) -> dict: ...  # lose a kick/call/completion

    def faults(self) -> list[dict]: ...  # the device's FaultRegistry.describe()

    def set_fault(self, name: str, action: str, queue: int | None) -> dict: ...  # FaultRegistry.arm


class AerView(Protocol):
    """A PCIe function with the AER capability, as ``pcie_aer_inject_error`` and
    ``x-query-pci-aer`` see it (a passthrough function, a root port, a host function)."""

    id: str

    def aer_inject(self, err: "PCIEAERErr") -> dict: ...  # {"rc": 0|-errno, "root-bus", "bus", "devfn"}

    def aer_status(self) -> dict: ...  # x-query-pci-aer: registers, last header log, recovery state


class Target(Protocol):
    name: str

    def run_state(self) -> str: ...  # QEMU RunState: running, paused, prelaunch, shutdown, ...

    def stop(self) -> None: ...

    def cont(self) -> None: ...

    def system_reset(self) -> None: ...

    def quit(self) -> None: ...

    def devices(self) -> list[DeviceView]: ...

    def fault_owners(self) -> "dict[str, FaultRegistry]": ...  # x-debug-fault owners that are no device

    def aer_device(self, id: str) -> AerView: ...  # TargetError: not found / not a PCIe device
