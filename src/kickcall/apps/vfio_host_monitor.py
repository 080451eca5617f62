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

PCIe errors: ``aer_device(id)`` gives ``nic0``.. (the card's functions) and ``rp0`` (the host root
port) to ``x-pcie-aer-inject-error`` / HMP ``pcie_aer_inject_error`` and ``x-query-pci-aer`` / HMP
``info pci-aer``.  An injection returns at once; the message climbs to the host port and the host's
AER service recovers on its own thread (``kc-aer``).  ``x-query-pci-aer`` shows the live
registers, the user's latched view, the last header log, the recovery state
(idle/recovering/link-down/failed) and history, the ERR eventfd counter (read without consuming),
whether the error is unhandled, and the hot reset count.  ``x-debug-fault host`` lists the host's
AER switches (also listed on each function).

``x-query-kickcall-counters`` (and HMP ``info counters``, ``--metrics``): the counters document
(``kickcall.counters``) of the card's functions, ``host_counters``.
"""

from __future__ import annotations

from typing import Any, Callable

from ..counters import counters_doc
from ..faults import FaultRegistry
from ..monitor.schema import Arg
from ..monitor.target import AerView, DeviceView, TargetError
from ..pci import regs as R
from ..pci.aer import PCIEAERErr
from ..pci.device import PCIDevice
from ..vfio.host import VfioPciDevice
from ..vfio.host_aer import ROOT_PORT_ID, HostAerService
from ..vfio.protocol import PciAddress
from ..vfio.server import VfioUserServer

__all__ = ["HostDeviceView", "HostAerView", "HostTarget", "extra_commands", "host_counters", "function_counters"]

_NOT_VIRTIO = "nic0 is a passthrough host function, not a VirtIODevice"


class HostDeviceView:
    """The host function as the monitor sees it (``DeviceView``; virtio queries are refused)."""

    type_name = "vfio-pci"
    virtio = False

    def __init__(self, host: VfioPciDevice, server: VfioUserServer, aer: HostAerService | None = None) -> None:
        self.host = host
        self.server = server
        self.aer = aer
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
            bus = nic.bus.number if nic.bus is not None else 0
            devfn = max(nic.devfn, 0)
            info: dict[str, Any] = {
                "bus": bus, "slot": devfn >> 3, "function": devfn & 7,
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
        out = {"view": "host", "host": self.host.describe(), "server": self.server.describe(),
               "nic": self.host.nic.describe(), "aer": self.host.aer_state()}
        if self.aer is not None:
            out["host-recovery"] = {"state": self.aer.state.value, "counts": dict(self.aer.counts)}
        return out


class HostAerView:
    """A function of the card, or the host root port, for the AER commands."""

    def __init__(self, id: str, dev: PCIDevice, aer: HostAerService, host: VfioPciDevice | None = None) -> None:
        self.id = id
        self.dev = dev
        self.aer = aer
        self.host = host

    def aer_inject(self, err: PCIEAERErr) -> dict:
        rc = self.aer.inject(self.dev, err)
        bus = self.dev.bus.number if self.dev.bus is not None else 0
        return {"rc": rc, "root-bus": "pcie.0", "bus": bus, "devfn": self.dev.devfn}

    def aer_status(self) -> dict:
        if self.host is None:
            return self.aer.port_status()
        bus = self.dev.bus.number if self.dev.bus is not None else 0
        return self.aer.function_status(self.host, PciAddress(0, bus, self.dev.devfn))


class HostTarget:
    def __init__(self, hosts: list[VfioPciDevice], servers: list[VfioUserServer], on_quit: Callable[[], None],
                 aer: HostAerService | None = None) -> None:
        self.name = "vfio-user-server"
        self._devs = [HostDeviceView(h, s, aer) for h, s in zip(hosts, servers, strict=True)]
        self._dev = self._devs[0]
        self._aer = aer
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
        return list(self._devs)

    def function_views(self) -> list[HostDeviceView]:
        """The card's functions as this monitor shows them (typed: ``devices()`` is the protocol's)."""
        return list(self._devs)

    def fault_owners(self) -> "dict[str, FaultRegistry]":
        """``host``: the host AER service's switches and faults (also on each function)."""
        return {"host": self._aer.faults} if self._aer is not None else {}

    def aer_device(self, id: str) -> AerView:
        """``nic0``.. (the card's functions) or ``rp0`` (the host root port)."""
        if self._aer is None:
            raise TargetError(f"device '{id}' not found", "DeviceNotFound")
        if id == ROOT_PORT_ID:
            return HostAerView(id, self._aer.port, self._aer)
        for d in self._devs:
            if d.id == id:
                if not d.host.nic.exp_cap:
                    raise TargetError(f"device '{id}' is not a PCIe device")
                return HostAerView(id, d.host.nic, self._aer, d.host)
        raise TargetError(f"device '{id}' not found", "DeviceNotFound")

    def view(self, dev: str) -> HostDeviceView:
        for d in self._devs:
            if dev == d.id:
                return d
        raise TargetError(f"Device '{dev}' not found", "DeviceNotFound")


def function_counters(host: VfioPciDevice) -> dict[str, Any]:
    """One host function as the counters document has it (under the function's lock, read only).

    Per completion queue: its calls (``raised``: the interrupts the function raised for it) by
    path -- ``msi`` through its MSI-X or MSI capability (sent, or pended in the PBA of a masked
    vector), ``intx`` with both off, ``dropped-invalid-vector`` when the queue's vector is outside
    the table -- with the vector's mask and PBA bit while MSI-X is enabled, and the ring's
    ``producer``/``consumer`` indexes.  A function has no kicks of its own to count: its doorbells
    are the client's writes to BAR0.  ``broken``: frozen by a fatal error, or its recovery failed."""
    with host.lock:
        nic = host.nic
        msix_on = nic.msix_enabled
        mode = "msix" if msix_on else ("msi" if nic.msi_enabled else "intx")
        queues = []
        for qd in nic.describe()["queues"]:
            v = qd["vector"]
            masked = pending = None
            if msix_on and 0 <= v < nic.nvectors:
                masked = nic.msix_entry(v)[2]
                pending = nic.msix_pending(v)
            raised, intx, dropped = qd["raised"], qd["to-intx"], qd["dropped-invalid-vector"]
            by_path = {"msi": max(0, raised - intx - dropped), "intx": intx, "dropped-invalid-vector": dropped}
            by_path = {k: n for k, n in by_path.items() if n}
            queues.append({"queue": qd["queue"], "vector": v, "masked": masked, "pending": pending,
                           "irq-mode": mode, "calls": sum(by_path.values()), "calls-by-path": by_path,
                           "ring-indices": {"producer": qd["producer"], "consumer": qd["consumer"]},
                           "enabled": qd["enabled"], "handled-by": "host"})
        return {"id": host.name, "path": f"/machine/host/{host.name}", "type": "vfio-pci",
                "handled-by": "host", "irq-mode": mode, "broken": bool(nic.error_frozen or host.failed),
                "queues": queues}


def host_counters(hosts: list[VfioPciDevice]) -> dict[str, Any]:
    """The vfio-user server's counters document: its functions keyed by id (``nic0``..)."""
    return counters_doc("vfio-user-server", {h.name: function_counters(h) for h in hosts})


def extra_commands(target: HostTarget) -> dict[str, tuple[Callable, list[Arg]]]:
    def request_release(dev: str) -> dict:
        """REQ: ask the client to release the device (vfio_pci_core_request)."""
        v = target.view(dev)
        return {"signalled": v.host.request_release()}

    return {"x-vfio-request-release": (request_release, [Arg("dev", "str")]),
            "x-query-kickcall-counters": (lambda: host_counters([d.host for d in target.function_views()]), [])}
