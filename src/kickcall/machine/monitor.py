"""The machine as the monitor sees it (kickcall.monitor.target), read without disturbing anything.

Ring fields come from guest memory with single 16-bit loads; eventfd counters from fdinfo; nothing
is consumed, no vhost ring is stopped.  The fault injector's state is not shown (the effects are).
"""

from __future__ import annotations

import logging
import threading
from typing import TYPE_CHECKING, Any, Callable

from ..vhost_user.device import VhostUserBlkDevice
from ..hv.abi import ChannelClosed, HypervisorError
from ..counters import format_counters
from ..monitor.commands import add_hmp_info
from ..monitor.schema import Arg, CommandRegistry
from ..monitor.target import AerView, DeviceView, TargetError
from ..notify import Role
from ..pci import regs as R
from ..pci.aer import PCIEAERErr
from ..pci.device import PCIDevice
from ..pci.msix import MsixNotifyOutcome
from ..virtio.paths import CallPath, KickPath
from ..virtio.pci import QUEUE_MEM_MULT, VirtIOPCIProxy
from ..virtio.queue import VIRTIO_NO_VECTOR, VirtQueue
from ..virtio.layout import (
    backend_inuse,
    read_ring_fields,
    avail_event_addr,
    avail_size,
    desc_table_size,
    used_size,
)
from ..faults import FaultError, FaultRegistry
from ..vfio.pci import HostTrigger, VFIOPCIDevice, VfioDeviceError
from .faults import LOSE_HOST_INTERRUPT, register_passthrough_faults

if TYPE_CHECKING:
    from .machine import Machine

__all__ = ["MachineTarget", "MachineDevice", "PassthroughDevice", "machine_commands", "add_machine_hmp",
           "format_pirqs"]

log = logging.getLogger("kickcall.machine.monitor")

_CLASS_DESC = {0x0100: "SCSI controller", 0x0200: "Ethernet controller", 0xFF00: "Class ff00"}


def _delivered(outcome: MsixNotifyOutcome, v: int) -> None:
    """msix_notify's outcome: anything but sent or pended means the call went nowhere -- say so."""
    if not outcome.delivered:
        raise TargetError(f"vector {v}: the call was dropped ({outcome})")


def _pci_info(p: PCIDevice, qdev_id: str, lock: threading.RLock) -> dict:
    """QEMU's PciDeviceInfo, from the device model's own copy of its config space (no config
    cycle reaches a passthrough function's server)."""
    with lock:
        cls = p.get16(R.PCI_CLASS_DEVICE)
        info = {
            "bus": p.bus.number if p.bus is not None else 0, "slot": p.devfn >> 3, "function": p.devfn & 7,
            "class_info": {"desc": _CLASS_DESC.get(cls, f"Class {cls:04x}"), "class": cls},
            "id": {"device": p.get16(R.PCI_DEVICE_ID), "vendor": p.get16(R.PCI_VENDOR_ID),
                   "subsystem": p.get16(R.PCI_SUBSYSTEM_ID), "subsystem-vendor": p.get16(R.PCI_SUBSYSTEM_VENDOR_ID)},
            "irq_pin": p.config[R.PCI_INTERRUPT_PIN], "qdev_id": qdev_id,
        }
        regions: list[dict] = []
        info["regions"] = regions
        if p.config[R.PCI_INTERRUPT_PIN]:
            info["irq"] = p.config[R.PCI_INTERRUPT_LINE]
        for b in p.bars:
            if b is None:
                continue
            reg = {"bar": b.index, "type": "io" if b.io else "memory",
                   "address": -1 if b.mapped_at is None else b.mapped_at, "size": b.size}
            if not b.io:
                reg["prefetch"] = b.prefetch
                reg["mem_type_64"] = b.mem64
            regions.append(reg)
    return info


class MachineDevice:
    virtio = True

    def __init__(self, machine: "Machine", proxy: VirtIOPCIProxy) -> None:
        self.m = machine
        self.p = proxy
        self.id = proxy.vdev.name
        self.path = proxy.vdev.path
        self.type_name = proxy.vdev.type_name

    @property
    def vhost_dev(self) -> VhostUserBlkDevice | None:
        """The device as a vhost-user front-end (None: the VMM emulates it)."""
        v = self.p.vdev
        return v if isinstance(v, VhostUserBlkDevice) else None

    @property
    def vhost(self) -> bool:
        return self.vhost_dev is not None

    def _vhost_started(self) -> bool:
        v = self.vhost_dev
        return v is not None and v.started_backend

    def num_queues(self) -> int:
        return len(self.p.vdev.queues)

    def _u16(self, gpa: int) -> int | None:
        try:
            return self.m.memory.read_u16_atomic(gpa)
        except ValueError:
            return None

    def virtio_status(self) -> dict:
        with self.m.bql:
            return self.p.vdev.status_info()

    def queue_status(self, queue: int) -> dict:
        with self.m.bql:
            q = self.p.vdev.queues[queue]
            d = q.status()
            vhost_running = self._vhost_started()
            ring = self._ring_fields(q)
            timing = q.timing()
            counts = self.p.queue_counters(q)
        d.update(ring)
        if ring.get("used-idx-ring") is not None:
            d["used-idx"] = ring["used-idx-ring"] if vhost_running else d["used-idx"]
        if vhost_running:
            # the back-end's position: avail_event (EVENT_IDX), never GET_VRING_BASE (it stops the ring)
            d.pop("shadow-avail-idx", None)
            inuse = backend_inuse(ring, q.event_idx)
            if inuse is not None:
                d["last-avail-idx"] = ring["avail-event"]
                d["inuse"] = inuse
            else:
                d.pop("last-avail-idx", None)
                d["inuse"] = 0
            d["signalled-used-valid"] = False
        d["name"] = self.type_name  # QEMU: the VirtIODevice's name, not the queue's
        d["vector"] = q.vector
        d["event-idx"] = q.event_idx
        # every kick and call, whoever handled it (a vhost back-end's: the hypervisor's counts)
        d["kicks"] = counts["kicks"]
        d["calls"] = counts["calls"]
        # requests the device took and completed, timed at pop and push (a vhost queue: the
        # back-end pops and pushes, so nothing is timed here -- its own monitor has the times)
        d.update(timing)
        return d

    def _ring_fields(self, q: VirtQueue) -> dict:
        """What the rings in guest memory say now (None where the ring is not set up)."""
        return read_ring_fields(self._u16, q.avail, q.used, q.num, mapped=bool(q.desc))

    def vhost_queue_status(self, queue: int) -> dict:
        v = self.vhost_dev
        if v is None or not v.started_backend:
            raise TargetError("Error: vhost device has not started yet")
        from ..vhost_user.device import USER_BASE

        with self.m.bql:
            q = self.p.vdev.queues[queue]
            n = q.num
            call = v.call_fd(q)
            return {
                "name": self.type_name, "kick": q.host_notifier.fd if q.host_notifier else -1,
                "call": call if call else -1,
                "desc": USER_BASE + q.desc, "avail": USER_BASE + q.avail, "used": USER_BASE + q.used, "num": n,
                "desc-phys": q.desc, "desc-size": desc_table_size(n), "avail-phys": q.avail,
                "avail-size": avail_size(n), "used-phys": q.used, "used-size": used_size(n),
            }

    def queue_element(self, queue: int, index: int | None) -> dict:
        """QEMU's x-query-virtio-queue-element: *index* is a position in the avail ring (modulo the
        queue size; default: the device's next position), the element is the chain whose head
        that ring slot holds."""
        with self.m.bql:
            q = self.p.vdev.queues[queue]
            if not q.desc:
                raise TargetError(f"virtqueue {queue} is not set up")
            n = q.num
            last = q.get_last_avail_idx()
            if self._vhost_started() and q.event_idx:
                last = self._u16(avail_event_addr(q.used, n)) or 0  # the back-end's position, never GET_VRING_BASE
            try:  # the device's own walker: a chain it would refuse shows its valid prefix and an "error"
                return q.queue_element(last if index is None else index, self.m.memory, self.type_name)
            except ValueError as e:
                raise TargetError(str(e)) from None

    def pci_info(self) -> dict:
        return _pci_info(self.p, self.id, self.m.bql)

    def vfio(self) -> dict:
        raise TargetError(f"{self.id} is not a passthrough (vfio) device")

    def msix(self) -> dict:
        p = self.p
        with self.m.bql:
            if p.msix is None:
                raise TargetError(f"Device '{self.id}' has no MSI-X capability")
            d = p.msix.describe()
            d["dev"] = self.id
            d["config-vector"] = p.config_vector
            for e in d["entries"]:
                e["notifiers"] = []
            for q in p.vdev.queues:
                if q.vector == VIRTIO_NO_VECTOR or q.vector >= p.msix.nvectors:
                    continue
                st = p.queue_state(q.index)
                b = {"queue": q.index, "role": "guest", "irqfd": st.irqfd, "polled": st.polled}
                if q.guest_notifier is not None:
                    b["fd"] = q.guest_notifier.fd
                d["entries"][q.vector]["notifiers"].append(b)
        return d

    def notifiers(self) -> list[dict]:
        out = []
        with self.m.bql:
            entries = self.m.registry.entries(self.path)
            notify_base = (self.p.bars[4].mapped_at or 0) + 0x3000 if self.p.bars[4] is not None else 0
            for e in entries:
                d = e.describe()
                if e.role == Role.HOST and e.queue is not None and not e.notifier.closed:
                    st = self.m.vm.ioeventfd_stats("memory", notify_base + QUEUE_MEM_MULT * e.queue, 0, None,
                                                   e.notifier)
                    if st is not None:
                        # every guest doorbell write the hypervisor matched, whoever consumed it
                        d["writes"] = st["hits"]
                        d["last-writer-pid"] = st["last_pid"]
                        d["fd-writes"] = st["hits"]
                elif e.role == Role.GUEST and not e.notifier.closed:
                    d["fd-writes"] = d.get("sets", 0)  # the hypervisor's irqfd reads it: ours are "sets"
                if e.queue is not None and e.queue < len(self.p.vdev.queues):
                    # the queue's count, every path and whoever handled it (queue_counters)
                    c = self.p.queue_counters(self.p.vdev.queues[e.queue])
                    if e.role == Role.HOST:
                        d["lifetime"] = c["kicks"]
                    elif e.role == Role.GUEST:
                        d["lifetime"] = c["calls"]
                d["scope"] = "notifier"
                out.append(d)
        return sorted(out, key=lambda d: d["id"])

    def notifier_write(self, id: int) -> dict:
        e = self.m.registry.get(id)
        if e is None or e.owner != self.path:
            raise TargetError(f"device '{self.id}' has no notifier {id}")
        with self.m.bql:
            if e.notifier.closed:
                raise TargetError(f"notifier {id} is closed")
            e.notifier.set()
        return {"id": id, "role": e.role.value, "queue": -1 if e.queue is None else e.queue}

    def inject(self, event: str, queue: int, force: bool) -> dict:
        p = self.p
        with self.m.bql:
            q = p.vdev.queues[queue]
            if event == "kick":
                if q.host_notifier is not None:
                    q.host_notifier.set()  # what the ioeventfd would do (a vhost back-end's kick fd too)
                    path = KickPath.VHOST if p.ioeventfd_grabbed else KickPath.IOEVENTFD
                    if p.ioeventfd_grabbed:  # the back-end reads it: nobody else would count it
                        q.count_kick(path)
                else:
                    p.notify_write(q.index * QUEUE_MEM_MULT, q.index, 2)  # the heavyweight exit's handler
                    path = KickPath.MMIO
                return {"path": path, "forced": False}
            m = p.msix
            if m is not None and m.enabled:
                v = q.vector
                if v == VIRTIO_NO_VECTOR:
                    raise TargetError(f"queue {queue} has no MSI-X vector: a call has nowhere to go")
                if m.is_masked(v):
                    if force:
                        addr, data = m.get_message(v)
                        p.msi_send(addr, data)
                        m.sent[v] += 1
                        return {"path": CallPath.MSI_FORCED, "forced": True}
                    _delivered(m.notify(v), v)
                    return {"path": CallPath.PBA, "forced": False}
                if q.guest_notifier is not None and p.queue_state(q.index).irqfd:
                    q.guest_notifier.set()
                    return {"path": CallPath.IRQFD, "forced": False}
                _delivered(m.notify(v), v)
                return {"path": CallPath.MSI, "forced": False}
            p.vdev.isr |= 1
            p.set_irq(1)
            return {"path": CallPath.INTX, "forced": False}

    def fault(self, queue: int, path: str, action: str) -> dict:
        if path == "complete":
            raise TargetError("the machine's faults act on the hypervisor's ioeventfds and irqfds (kick, call); "
                              "holding completions is a vhost-user back-end's fault (kickcall vhost-user-blk)")
        res = self.set_fault("lose-kick" if path == "kick" else "lose-call", action, queue)
        return {"path": path, "action": action, "matched": res.get("matched", 0)}

    def faults(self) -> list[dict]:
        return self.p.vdev.faults.describe()

    def set_fault(self, name: str, action: str, queue: int | None) -> dict:
        if queue is not None and not 0 <= queue < len(self.p.vdev.queues):
            raise TargetError(f"{self.id} has no queue {queue}")
        try:
            return self.p.vdev.faults.arm(name, action, queue)
        except FaultError as e:
            raise TargetError(str(e)) from None


class PassthroughDevice:
    """A passthrough (vfio-user) function as the monitor sees it: PCI, both MSI-X views, the
    vfio state, its eventfds, host-interrupt injection and its faults.  It is not a VirtIODevice:
    every virtio query names it as such.  "Queue" arguments (``x-debug-device-event``,
    ``x-debug-fault``) are MSI-X vectors here (vector 0 is INTx on a function without MSI-X).

    Read without disturbing anything: eventfd counters are peeked (fdinfo), the hypervisor's
    per-GSI injection and drop counts come from its shared stats page, the guest's MSI-X view from
    the VMM's emulation, and no message goes to the vfio-user server."""

    type_name = "vfio-user-pci"
    virtio = False

    def __init__(self, machine: "Machine", dev: VFIOPCIDevice) -> None:
        self.m = machine
        self.d = dev
        self.id = dev.name
        self.path = f"/machine/peripheral/{dev.name}"  # the function's QOM path (it has no virtio-backend)

    def _not_virtio(self) -> TargetError:
        return TargetError(f"Path {self.path} is not a VirtIODevice (a vfio-user passthrough function: see "
                           f"x-query-vfio and x-query-pci-msix {{'dev': '{self.id}'}})")

    def num_queues(self) -> int:
        """The "queues" injection and faults take: the MSI-X vectors (INTx alone: one)."""
        return len(self.d.vectors) or 1

    def virtio_status(self) -> dict:
        raise self._not_virtio()

    def queue_status(self, queue: int) -> dict:
        raise self._not_virtio()

    def vhost_queue_status(self, queue: int) -> dict:
        raise self._not_virtio()

    def queue_element(self, queue: int, index: int | None) -> dict:
        raise self._not_virtio()

    def pci_info(self) -> dict:
        return _pci_info(self.d, self.id, self.m.bql)

    def vfio(self) -> dict:
        with self.m.bql:
            out = self.d.query_vfio()
        out["dev"] = self.id
        return out

    def _hv_gsi(self, gsi: int | None) -> dict | None:
        """The hypervisor's counts for *gsi* (its irqfd's injections and drops), from the shared
        stats page: read, never asked for."""
        if gsi is None:
            return None
        try:
            st = self.m.vm.stats.gsi(gsi)
        except (IndexError, TypeError, ValueError):  # out of the page, or the page is closed (VM gone)
            return None
        return {"gsi": gsi, "injections": st["injections"], "dropped": st["dropped"]}

    def msix(self) -> dict:
        """Both views.  At the top level the guest's, in the shape every device has (table, masks,
        PBA: ``MSIX.describe``); under ``host`` the host's, per vector: where the host trigger
        points, the irqfd-bound and the VMM's "interrupt" eventfd with counters read without
        consuming, the GSI and the hypervisor's injection and drop counts for it."""
        with self.m.bql:
            if self.d.msix is None:
                raise TargetError(f"Device '{self.id}' has no MSI-X capability")
            q = self.d.query_pci_msix()
            gsis = {v.nr: v.gsi for v in self.d.vectors}
        d = dict(q["guest"])
        d["dev"] = self.id
        d["passthrough"] = True
        host = q["host"]
        for hv in host["vectors"]:
            hv["hypervisor"] = self._hv_gsi(gsis.get(hv["vector"]))
        d["host"] = host
        return d

    def notifiers(self) -> list[dict]:
        """Every eventfd of the function: per MSI-X vector the irqfd-bound one (role guest) and the
        VMM's "interrupt" one (role masked), with ``host-trigger`` true on the one the host's
        trigger points at now; the INTx trigger.  (INTx unmask has no eventfd here: the VMM sends
        SET_IRQS DATA_NONE|ACTION_UNMASK.)"""
        out = []
        with self.m.bql:
            for e in self.m.registry.entries(self.id):
                d = e.describe()
                if e.vector is not None and 0 <= e.vector < len(self.d.vectors):
                    vec = self.d.vectors[e.vector]
                    irqfd = e.notifier is vec.kvm_interrupt
                    d["host-trigger"] = (vec.trigger == HostTrigger.IRQFD and irqfd) or \
                        (vec.trigger == HostTrigger.USERSPACE and e.notifier is vec.interrupt) or \
                        (vec.trigger == HostTrigger.PIRQ and e.notifier is vec.pirq_notifier)
                    if e.notifier is vec.pirq_notifier and vec.pirq is not None:
                        d["pirq"] = vec.pirq
                    if irqfd:
                        hv = self._hv_gsi(vec.gsi)
                        if hv is not None:
                            d["injections"], d["dropped"] = hv["injections"], hv["dropped"]
                            d["gsi"] = hv["gsi"]
                elif e.vector is None:
                    where, n = self.d.host_trigger(0)
                    d["host-trigger"] = where == "intx" and n is e.notifier
                out.append(d)
        return sorted(out, key=lambda d: d["id"])

    def notifier_write(self, id: int) -> dict:
        e = self.m.registry.get(id)
        if e is None or e.owner != self.id:
            raise TargetError(f"device '{self.id}' has no notifier {id}")
        with self.m.bql:
            if e.notifier.closed:
                raise TargetError(f"notifier {id} is closed")
            e.notifier.set()
        return {"id": id, "role": e.role.value, "queue": -1 if e.vector is None else e.vector}

    def inject(self, event: str, queue: int, force: bool) -> dict:
        """A host interrupt on vector *queue*: the eventfd the host's trigger points at is written,
        as the host would (masked: the VMM's eventfd, so the PBA bit; unmasked: the irqfd).  With
        *force* on a masked vector, the guest's MSI-X message is sent past the mask instead."""
        if event != "call":
            raise TargetError(f"{self.id} is a passthrough function: its doorbells are the device's own registers "
                              "(BAR writes forwarded to the vfio-user server); kickcall injects only a host "
                              "interrupt (event 'call') on it")
        with self.m.bql:
            m = self.d.msix
            if force and m is not None and m.enabled and 0 <= queue < m.nvectors and m.is_masked(queue):
                addr, data = m.get_message(queue)
                self.d.msi_send(addr, data)
                m.sent[queue] += 1
                return {"path": CallPath.MSI_FORCED, "forced": True}
            try:
                where = self.d.inject_host_interrupt(queue)
            except VfioDeviceError as e:
                raise TargetError(str(e)) from None
            masked = m is not None and m.enabled and m.is_masked(queue)
        # (Xen: "pirq" -- the hypervisor delivers it to the pirq's event channel, as an irqfd would)
        path = {"irqfd": CallPath.IRQFD, "pirq": CallPath.IRQFD, "intx": CallPath.INTX}.get(
            where, CallPath.PBA if masked else CallPath.MSI)
        return {"path": path, "forced": False, "host-trigger": where}

    def fault(self, queue: int, path: str, action: str) -> dict:
        if path != "call":
            raise TargetError(f"{self.id} is a passthrough function: its faults act on its host interrupts "
                              f"(path 'call', fault {LOSE_HOST_INTERRUPT})")
        res = self.set_fault(LOSE_HOST_INTERRUPT, action, queue)
        return {"path": path, "action": action, "matched": res.get("matched", 0)}

    def faults(self) -> list[dict]:
        return self.d.faults.describe()

    def set_fault(self, name: str, action: str, queue: int | None) -> dict:
        if queue is not None and not 0 <= queue < self.num_queues():
            raise TargetError(f"{self.id} has no MSI-X vector {queue}")
        try:
            return self.d.faults.arm(name, action, queue)
        except FaultError as e:
            raise TargetError(str(e)) from None


class MachineTarget:
    def __init__(self, machine: "Machine") -> None:
        self.m = machine
        self.name = machine.cfg.name
        self._devices: list[DeviceView] = [MachineDevice(machine, p) for p in machine.devices.values()]
        for dev in machine.passthrough.values():
            # (the machine plugs its passthrough functions without their hypervisor faults: registered
            # here, once, until Machine._add_passthrough does it as it does register_machine_faults)
            register_passthrough_faults(machine.vm, dev, machine.bql)
            self._devices.append(PassthroughDevice(machine, dev))

    def run_state(self) -> str:
        if self.m.stopped:
            return "shutdown"
        if not self.m.started:
            return "prelaunch"
        if self.m.running:
            return "running"
        return self.m.stop_reason or "paused"

    def stop(self) -> None:
        self.m.pause()

    def cont(self) -> None:
        self.m.resume()

    def system_reset(self) -> None:
        self.m.system_reset()

    def quit(self) -> None:
        self.m.quit_requested.set()

    def devices(self) -> list[DeviceView]:
        return list(self._devices)

    def fault_owners(self) -> dict[str, FaultRegistry]:
        """``machine``: the faults of no one device (the guest's Xen MSI variant)."""
        return {"machine": self.m.faults}

    def aer_device(self, id: str) -> AerView:
        """A root port or a passthrough function (the functions with the AER capability)."""
        dev = self.m.root_ports.get(id) or self.m.passthrough.get(id)
        if dev is None:
            if id in self.m.devices:
                raise TargetError(f"device '{id}' is not a PCIe device")
            raise TargetError(f"device '{id}' not found", "DeviceNotFound")
        if not dev.exp_cap:
            raise TargetError(f"device '{id}' is not a PCIe device")
        return MachineAerView(self.m, id, dev)


class MachineAerView:
    """A guest-visible function with AER, as the monitor sees it (injection under the big lock)."""

    def __init__(self, machine: "Machine", id: str, dev: PCIDevice) -> None:
        self.m = machine
        self.id = id
        self.dev = dev

    def _where(self) -> dict:
        bus = self.dev.bus.number if self.dev.bus is not None else 0
        return {"root-bus": "pcie.0", "bus": bus, "devfn": self.dev.devfn}

    def aer_inject(self, err: PCIEAERErr) -> dict:
        with self.m.bql:
            if self.dev.aer is None:  # PCIe without AER: QEMU sets only the device status bits
                return {"rc": 0, **self._where(), "note": "no AER capability: nothing was reported"}
            rc = self.dev.aer.inject(err)
        return {"rc": rc, **self._where()}

    def aer_status(self) -> dict:
        with self.m.bql:
            return self.m.aer_status(self.id)


# -- the machine's own commands ------------------------------------------------------------------------------
def machine_commands(machine: "Machine") -> dict[str, tuple[Callable, list[Arg]]]:
    """QMP commands only a machine has (``build_registry(extra=...)``)."""
    from .machine import MachineError

    def x_query_xen_pirqs() -> dict:
        """The Xen domain's pirqs and event channels joined with the device model's MSI-X entries,
        and every pirq claimed by two devices (x-query-xen-pirqs)."""
        try:
            return machine.query_xen_pirqs()
        except MachineError as e:
            raise TargetError(str(e)) from None
        except (HypervisorError, ChannelClosed, TimeoutError) as e:
            raise TargetError(f"the hypervisor did not answer: {e}") from None

    def x_query_kickcall_counters() -> dict:
        """Every device's kicks and calls by path, whoever handled them, with vector, mask and
        pending state, the hypervisor's counters and the exits: the counters document
        (kickcall.counters), the same one the live view, run --json and --metrics show."""
        return machine.counters()

    return {"x-query-xen-pirqs": (x_query_xen_pirqs, []),
            "x-query-kickcall-counters": (x_query_kickcall_counters, [])}


def _cell(v: Any) -> str:
    return "-" if v is None or v == -1 or v == [] else str(v)


def format_pirqs(q: dict) -> str:
    """HMP ``info pirqs``: the domain's pirqs (state, owner, port, mask/pending, events) with the
    device model's claims, then the conflicts, the free pool and the counters."""
    hv = q.get("hypervisor", {})
    lines = [f"domain {hv.get('domid')}: {hv.get('nr-pirqs')} pirqs (MSI pirqs from {hv.get('first-msi-pirq')}), "
             f"{hv.get('free-count')} free; guest MSI variant: "
             f"{'fresh pirq' if q.get('guest-msi-variant', {}).get('fix') == 'on' else 'reuse (pre-2017)'}",
             f"{'pirq':>5} {'state':<10} {'port':>5} {'mask':>4} {'pend':>4} {'events':>7} {'dropped':>7}  "
             f"{'owner (hypervisor)':<20} device model"]
    for p in hv.get("pirqs", []):
        own = p.get("owner") or {}
        owner = f"{own['device']} v{own.get('vector', '?')}" if own.get("device") else "-"
        dm = ", ".join(f"{c['device']} v{c['vector']} ({'+'.join(c['by'])})" for c in p.get("device-model", [])) or "-"
        lines.append(f"{p.get('pirq'):>5} {p.get('state', '?'):<10} {_cell(p.get('port') or None):>5} "
                     f"{'M' if p.get('masked') else '-':>4} {'P' if p.get('pending') else '-':>4} "
                     f"{p.get('events', 0):>7} {p.get('dropped', 0):>7}  {owner:<20} {dm}")
    lines.append("device model:")
    for d in q.get("devices", []):
        for v in d.get("vectors", []):
            warn = f"  WARNINGS {len(v['warnings'])}" if v.get("warnings") else ""
            lines.append(f"  {d['device']} ({d['kind']}) vector {v['vector']}: entry names pirq "
                         f"{_cell(v.get('entry-pirq'))}{'' if v.get('entry-live') else ' (masked or off)'}, mapped "
                         f"{_cell(v.get('mapped-pirq'))}" +
                         (f", maps {v['maps']} unmaps {v['unmaps']}" if "maps" in v else "") + warn)
    conflicts = q.get("conflicts", [])
    lines.append(f"conflicts: {len(conflicts) or 'none'}")
    for c in conflicts:
        lines.append(f"  CONFLICT {c['text']}")
    free = hv.get("free", [])
    lines.append(f"free pool ({len(free)}): {' '.join(map(str, free)) or '-'}")
    cnt = hv.get("counters", {})
    lines.append("counters: " + " ".join(f"{k}={v}" for k, v in cnt.items()))
    return "\r\n".join(lines) + "\r\n"


def add_machine_hmp(reg: CommandRegistry) -> None:
    """HMP ``info pirqs`` and ``info counters`` on top of the generic HMP (``human-monitor-command``)."""
    add_hmp_info(reg, "pirqs", "x-query-xen-pirqs", format_pirqs)
    add_hmp_info(reg, "counters", "x-query-kickcall-counters", format_counters)
