"""The monitor of ``kickcall vfio-user-server``: the host's side of a passthrough function.

What it shows is the host kernel's and the function's own state, read under the function's lock
without changing it: the IRQ indexes and vectors vfio-pci set up (host irq, the trigger eventfd
the client passed and its counter read without consuming it), the host vector pool, SET_IRQS
counts by kind and by result, the function's MSI-X table and PBA as the host programmed them,
its queues (producer and consumer indexes, records written), the client's DMA windows.

``x-debug-device-event {dev, event: "call", queue}`` raises queue *queue*'s interrupt without a
record -- a host interrupt on the queue's vector, which then goes where the host's state sends it
(the client's eventfd, the PBA of a masked entry, INTx with MSI-X off); the guest's handler finds
no record (an "empty" interrupt in its counts).
"""

from __future__ import annotations

from typing import Any, Callable

from ..faults import FaultRegistry
from ..monitor.schema import Arg
from ..monitor.target import AerView, DeviceView, TargetError
from ..pci import regs as R
from ..vfio.host import VfioPciDevice
from ..vfio.server import VfioUserServer

__all__ = ["HostDeviceView", "HostTarget", "extra_commands"]

_NOT_VIRTIO = "nic0 is a passthrough host function, not a VirtIODevice"


class HostDeviceView:
    """The host function as the monitor sees it (``DeviceView``; virtio queries are refused)."""

    type_name = "vfio-pci"
    virtio = False

    def __init__(self, host: VfioPciDevice, server: VfioUserServer) -> None:
        self.host = host
        self.server = server
        self.id = host.name
        self.path = f"/machine/host/{host.name}"

    def num_queues(self) -> int:
        return len(self.host.nic.queues)

    def virtio_status(self) -> dict:
        raise TargetError(_NOT_VIRTIO)

    def queue_status(self, queue: int) -> dict:
        raise TargetError(_NOT_VIRTIO)

    def vhost_queue_status(self, queue: int) -> dict:
        raise TargetError(_NOT_VIRTIO)

    def queue_element(self, queue: int, index: int | None) -> dict:
        raise TargetError(_NOT_VIRTIO)

    def pci_info(self) -> dict | None:
        nic = self.host.nic
        with self.host.lock:
            cls = nic.get16(R.PCI_CLASS_DEVICE)
            info: dict[str, Any] = {
                "bus": 0, "slot": 0, "function": 0,
                "class_info": {"desc": "Ethernet controller" if cls == 0x0200 else f"Class {cls:04x}", "class": cls},
                "id": {"device": nic.get16(R.PCI_DEVICE_ID), "vendor": nic.get16(R.PCI_VENDOR_ID),
                       "subsystem": nic.get16(R.PCI_SUBSYSTEM_ID),
                       "subsystem-vendor": nic.get16(R.PCI_SUBSYSTEM_VENDOR_ID)},
                "irq_pin": nic.config[R.PCI_INTERRUPT_PIN], "qdev_id": self.id, "regions": [],
            }
            for b in nic.bars:
                if b is not None:
                    info["regions"].append({"bar": b.index, "type": "io" if b.io else "memory", "address": -1,
                                            "size": b.size, "prefetch": b.prefetch, "mem_type_64": b.mem64})
        return info

    def msix(self) -> dict:
        """The function's own MSI-X state, as the host kernel programmed it."""
        nic = self.host.nic
        with self.host.lock:
            entries = []
            for v in range(nic.nvectors):
                addr, data, masked = nic.msix_entry(v)
                entries.append({"vector": v, "address": addr, "data": data, "masked": masked,
                                "pending": nic.msix_pending(v)})
            return {"view": "host", "enabled": nic.msix_enabled, "function-masked": nic.msix_function_masked,
                    "table-size": nic.nvectors, "entries": entries,
                    "vectors": self.host.describe()["vectors"]}

    def notifiers(self) -> list[dict]:
        """The eventfds the client passed (trigger, unmask, err, req), counters read without consuming."""
        d = self.host.describe()
        out: list[dict] = []
        for v in d["vectors"]:
            if v["trigger-fd"] is not None:
                out.append({"id": len(out), "role": "guest", "vector": v["vector"], "fd": v["trigger-fd"],
                            "count": v["eventfd-count"], "signals": v["signals"]})
        intx = d["intx"]
        if intx["trigger-fd"] is not None:
            out.append({"id": len(out), "role": "guest", "vector": "intx", "fd": intx["trigger-fd"],
                        "count": intx["eventfd-count"]})
        if intx["unmask-fd"] is not None:
            out.append({"id": len(out), "role": "host", "vector": "intx-unmask", "fd": intx["unmask-fd"]})
        for name in ("err", "req"):
            if d[name]["trigger-fd"] is not None:
                out.append({"id": len(out), "role": name, "fd": d[name]["trigger-fd"],
                            "signals": d[name]["signals"]})
        return out

    def notifier_write(self, id: int) -> dict:
        raise TargetError("the server does not write the client's eventfds on request; inject a call on a "
                          "queue (x-debug-device-event) to raise its vector the way the device does")

    def inject(self, event: str, queue: int, force: bool) -> dict:
        if event != "call":
            raise TargetError("a host function takes only 'call' (a completion and its interrupt); its "
                              "doorbells are the client's")
        if force:
            raise TargetError("'force' is not available on the host: the host's masking is the device's")
        nic = self.host.nic
        with self.host.lock:
            vector = nic.queues[queue].vector
            nic.raise_queue(queue)
        return {"path": f"host-interrupt:vector{vector}", "forced": False, "vector": vector}

    def faults(self) -> list[dict]:
        return self.host.faults.describe()

    def set_fault(self, name: str, action: str, queue: int | None) -> dict:
        try:
            return self.host.faults.arm(name, action, queue)
        except Exception as e:  # FaultError: its message names the problem
            raise TargetError(str(e)) from None

    def fault(self, queue: int, path: str, action: str) -> dict:
        raise TargetError("the host function has no per-queue fault paths; see x-debug-fault with 'fault'")

    def vfio(self) -> dict:
        return {"view": "host", "host": self.host.describe(), "server": self.server.describe(),
                "nic": self.host.nic.describe()}


class HostTarget:
    def __init__(self, host: VfioPciDevice, server: VfioUserServer, on_quit: Callable[[], None]) -> None:
        self.name = "vfio-user-server"
        self._dev = HostDeviceView(host, server)
        self._on_quit = on_quit

    def run_state(self) -> str:
        return "running"

    def stop(self) -> None:
        raise TargetError("a vfio-user server has no vCPUs to stop")

    def cont(self) -> None:
        raise TargetError("a vfio-user server has no vCPUs to resume")

    def system_reset(self) -> None:
        raise TargetError("the server does not reset on its own: the client sends DEVICE_RESET")

    def quit(self) -> None:
        self._on_quit()

    def devices(self) -> list[DeviceView]:
        return [self._dev]

    def fault_owners(self) -> "dict[str, FaultRegistry]":
        return {}  # every fault here is the device's

    def aer_device(self, id: str) -> AerView:
        raise TargetError(f"device '{id}' not found", "DeviceNotFound")

    def view(self, dev: str) -> HostDeviceView:
        if dev != self._dev.id:
            raise TargetError(f"Device '{dev}' not found", "DeviceNotFound")
        return self._dev


def extra_commands(target: HostTarget) -> dict[str, tuple[Callable, list[Arg]]]:
    def request_release(dev: str) -> dict:
        """REQ: ask the client to release the device (vfio_pci_core_request)."""
        v = target.view(dev)
        return {"signalled": v.host.request_release()}

    return {"x-vfio-request-release": (request_release, [Arg("dev", "str")])}
