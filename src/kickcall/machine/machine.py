"""A kickcall machine: RAM, the hypervisor, a PCI bus with virtio devices, an IOThread, and a guest.

The VMM side lives in this process: the main loop (an IOThread holding the big lock while it runs
handlers), one VMM vCPU thread per guest vCPU for heavyweight exits, the devices.  The guest runs
in its own process (``guest = "process"``) or, for unit tests, on threads of this one
(``guest = "thread"``) -- through the same hypervisor channel either way.

Run state: ``pause()`` stops the guest's vCPUs (acknowledged) and then the devices (host notifiers
stopped with the deassign race handled, in-flight I/O drained); ``resume()`` restarts the devices,
runs the kicks that were deferred, then the vCPUs.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from typing import TYPE_CHECKING, Any, Callable

from ..counters import counters_doc, kebab_keys
from ..child import start_helper
from ..faults import FaultAction, FaultRegistry, Switch
from ..hv.abi import SPACE_MMIO, SPACE_PIO, ChannelClosed
from ..hv import abi
from ..hv.channel import socketpair
from ..hv.kernel import KernelHV
from ..hv.vmm import VM, MsiRoutes
from ..hv.xen_abi import pirq_of_msi
from ..loop import IOThread
from ..memory import AddressSpace, GuestMemory
from ..notify import NotifierRegistry
from ..pci.bridge import PCIERootPort
from ..pci.bus import PCIBus, PCIHost
from ..pci import regs as R
from ..pci.device import PCIDevice
from ..threads import start_thread
from ..ownership import PathRefused, SocketClaim, temp_dir
from ..virtio.blk import VirtIOBlk
from ..virtio.image import create_image, open_image
from ..virtio.net import VirtIONet
from ..virtio.layout import backend_inuse, read_ring_fields
from ..virtio.pci import VirtIOPCIProxy
from ..vfio.pci import VFIOPCIDevice, VfioCardReset
from ..vfio.protocol import HOT_RESET_CAPABILITY
from .config import DeviceConfig, MachineConfig, default_config
from .faults import register_machine_faults, register_passthrough_faults

if TYPE_CHECKING:
    from ..guest.os import GuestOS
    from ..monitor.server import QMPServer
    from ..virtio.device import VirtIODevice

__all__ = ["Machine", "MachineError", "XEN_FRESH_PIRQ", "GuestVariantSwitch"]

log = logging.getLogger("kickcall.machine")


#: a temporary image carries kickcall's sector labels this far; beyond, it is sparse and reads as zeros
LABELLED_BYTES = 64 << 20

#: how long the guest has to let go of a passthrough function the host asked back (REQ)
UNPLUG_TIMEOUT = 30.0


#: The machine's switch for the guest's Xen MSI variant (Linux's xen_hvm_setup_msi_irqs): on, the
#: 2017 fix (c74fd80f2f41: always a fresh pirq from PHYSDEVOP_get_free_pirq); off, the 2010 variant
#: (af42b8d12f8a: reuse the pirq read back from the device's MSI data).  Each change is sent to the
#: guest (guest command ``xen-msi-variant``).
XEN_FRESH_PIRQ = "xen-fresh-pirq"
#: The machine's fix for a passthrough card below a root port (``aer = true``): a guest's
#: secondary bus reset of the card's bus becomes one host hot reset for the whole card (the
#: 2016 QEMU patch "vote the function 0 to do host bus reset"); off, each function is reset on its
#: own (DEVICE_RESET per function: an FLR is not a link reset).
CARD_HOT_RESET = "card-hot-reset"



class MachineError(RuntimeError):
    pass


class GuestVariantSwitch(Switch):
    """A fix that lives in the guest: each change is sent to it with *apply(on)* (what it
    answered, or why it could not be sent, is kept and listed; the switch changes either way)."""

    def __init__(self, name: str, effect: str, apply: Callable[[bool], dict]) -> None:
        super().__init__(name, effect)
        self._apply = apply
        self.guest: dict = {"sent": False, "why": "never changed"}

    def arm(self, action: FaultAction, queue: int | None = None) -> dict:
        res = super().arm(action, queue)
        self.guest = self._apply(self.fix_on)
        res["guest"] = dict(self.guest)
        return res

    def state(self) -> dict:
        d = super().state()
        d["guest"] = dict(self.guest)
        return d


class Machine:
    """Build a machine from a config; ``start()`` launches the guest and boots it."""

    def __init__(self, cfg: MachineConfig | None = None, *, workdir: str | None = None,
                 guest_log_level: str = "WARNING", connect_timeout: float = 30.0) -> None:
        """Build the machine.  If anything fails (or Ctrl-C arrives) on the way, everything built so
        far is torn down -- the temporary directory with its images included -- before the error
        propagates."""
        self.cfg = cfg or default_config()
        self.bql = threading.RLock()
        self.registry = NotifierRegistry()
        self.guest_log_level = guest_log_level
        self.connect_timeout = connect_timeout
        """Seconds a vhost-user device waits for its back-end's socket (``run --connect-timeout``)."""
        self.guest_events: list[dict] = []
        self.devices: dict[str, VirtIOPCIProxy] = {}
        # passthrough (vfio-user) functions: kept apart, the rest of the machine assumes devices are virtio
        self.passthrough: dict[str, VFIOPCIDevice] = {}
        self.root_ports: dict[str, PCIERootPort] = {}
        self.stop_reason: str | None = None
        """Why the machine stopped itself (QEMU's run state): ``internal-error`` after a PCIe error
        it would not recover (as QEMU's vfio_err_notifier_handler); None when the operator paused it."""
        self.card_resets: dict[str, VfioCardReset] = {}  # root port id -> its passthrough card's hot reset
        self._req_mu = threading.Lock()
        self._releasing: set[str] = set()  # passthrough devices being handed back to the host (REQ)
        self.events: list[dict] = []  # every event the machine emitted itself (emit_event), oldest first
        self.device_cfg: dict[str, DeviceConfig] = {}
        self.temp_images: list[str] = []
        self.blk_images: dict[str, dict] = {}  # per slot: what the guest's checker may assume of the image
        self.guest_proc: subprocess.Popen | None = None
        self.guest_hv: KernelHV | None = None
        self.guest_os: GuestOS | None = None
        self.guest_pid: int | None = None
        self.running = False
        self.started = False
        self.boot_info: dict = {}
        self._gone = threading.Event()
        self._stopped = False
        self.quit_requested = threading.Event()  # the monitor's quit
        self.qmp: QMPServer | None = None
        self._own_workdir = workdir is None
        self.workdir = workdir or tempfile.mkdtemp(prefix="kickcall-", dir=temp_dir())
        self._built: list = []  # what to close, last first, if the build fails
        self.faults = FaultRegistry(self.cfg.name)
        """The machine's own faults (those of no one device): the guest's Xen MSI variant, the card hot reset."""
        self.faults.add(GuestVariantSwitch(
            XEN_FRESH_PIRQ, "off: the guest's Xen MSI setup reuses the pirq it reads back from the device's MSI data "
            "(Linux before c74fd80f2f41) instead of asking for a fresh one (Xen flavour)", self._send_msi_variant))
        self.faults.switch(CARD_HOT_RESET, "off: a guest's secondary bus reset of a passthrough card's bus resets "
                           "each function on its own (one DEVICE_RESET, an FLR, per function) instead of one host "
                           "hot reset for the card")
        try:
            self._build()
        except BaseException:
            self._abort_build()
            raise

    @property
    def xen(self) -> bool:
        """The Xen flavour of the hypervisor: no irqfd (QEMU on Xen has none); an emulated device's
        MSI goes through ``XEN_DMOP_inject_msi``, a passthrough function's through a mapped pirq."""
        return self.cfg.hypervisor == "xen"

    @property
    def stopped(self) -> bool:
        """``stop()`` has begun (or the build failed): the machine is shut down for good (QMP's
        run state ``shutdown``).  Set on the thread that stops the machine; a plain read."""
        return self._stopped

    def _build(self) -> None:
        self.memory = GuestMemory.create(self.cfg.ram, f"{self.cfg.name}-ram")
        self._built.append(self.memory.close)
        self.mmio = AddressSpace(SPACE_MMIO)
        self.io = AddressSpace(SPACE_PIO)
        self.iothread = IOThread("main-loop", lock=self.bql, thread_name="kc-loop")
        self._vmm_sock, self._guest_sock = socketpair()
        self._built += [self._vmm_sock.close, self._guest_sock.close]
        self.vm = VM(self._vmm_sock, self.memory, self.cfg.vcpus, exit_handler=self._exit,
                     event_handler=self.guest_events.append, max_routes=self.cfg.max_irq_routes,
                     on_guest_gone=self._guest_gone, name=self.cfg.name, hypervisor=self.cfg.hypervisor,
                     xen_nr_pirqs=self.cfg.nr_pirqs)
        self._built.append(self.vm.close)
        self.routes = MsiRoutes(self.vm)
        self.mmio.add_listener(self.vm)
        self.io.add_listener(self.vm)
        self.bus = PCIBus(self.mmio, self.io, irq_line=self.vm.irq_line, msi_sink=self.vm.signal_msi)
        self.host = PCIHost(self.bus)
        next_slot = 1
        used = {d.slot for d in self.cfg.devices if d.slot is not None and not d.bus}
        for dc in self.cfg.devices:
            if dc.slot is None:
                while next_slot in used:
                    next_slot += 1
                dc.slot = next_slot
                used.add(next_slot)
        # root ports first: the devices below them need their buses
        for dc in self.cfg.devices:
            if dc.type == "pcie-root-port":
                self._add_root_port(dc)
        for dc in self.cfg.devices:
            if dc.type != "pcie-root-port":
                self._add_device(dc)
        self._set_multifunction()
        self._check_aer_topology()

    def _abort_build(self) -> None:
        """Undo a partial build: devices, VM, sockets, RAM, notifiers, and our temporary directory."""
        for vp in self.passthrough.values():
            try:
                vp.close()
            except Exception as e:
                log.debug("%s: close after a failed build: %s", vp.name, e)
        for p in self.devices.values():
            close = getattr(p.vdev, "close", None)
            try:
                if close is not None:
                    close()
            except Exception as e:
                log.debug("%s: close after a failed build: %s", p.name, e)
        for fn in reversed(self._built):
            try:
                fn()
            except Exception as e:
                log.debug("close after a failed build: %s", e)
        for ent in self.registry.entries():
            self.registry.unregister(ent)
            if not ent.notifier.closed:
                ent.notifier.close()
        self._stopped = True
        if self._own_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    # -- devices ---------------------------------------------------------------------------------------
    def _add_root_port(self, dc: DeviceConfig) -> None:
        """A PCIe Root Port on the root bus; its secondary bus gets the next bus number (as
        firmware numbers them)."""
        assert dc.slot is not None
        port = PCIERootPort(dc.id, self.mmio, self.io, secondary=len(self.root_ports) + 1)
        self.bus.add_device(port, dc.slot)
        self.root_ports[dc.id] = port
        self.device_cfg[dc.id] = dc

    def bus_of(self, dc: DeviceConfig) -> PCIBus:
        """The bus a device's config places it on."""
        return self.root_ports[dc.bus].sec_bus if dc.bus else self.bus

    def _add_device(self, dc: DeviceConfig) -> None:
        if dc.type == "vfio-user":
            self._add_passthrough(dc)
            return
        vdev: VirtIODevice
        if dc.type == "virtio-blk" and dc.backend == "vhost-user":
            from ..vhost_user.device import VhostUserBlkDevice

            try:
                vdev = VhostUserBlkDevice(dc.id, dc.socket, num_queues=dc.queues, queue_size=dc.queue_size,
                                          registry=self.registry, loop=self.iothread, use_inflight=dc.inflight,
                                          connect_wait=self.connect_timeout)
            except Exception as e:  # cannot connect, or the back-end broke the protocol
                raise MachineError(f"device {dc.id}: vhost-user back-end at {dc.socket}: {e}") from e
            class_code = 0x010000
        elif dc.type == "virtio-blk":
            if not dc.image:  # a temporary image: ours, sparse, labelled only as far as LABELLED_BYTES
                path = os.path.join(self.workdir, f"{dc.id}.img")
                labelled = min(dc.size, LABELLED_BYTES)
                create_image(path, dc.size, labelled=labelled)
                self.temp_images.append(path)
                read_only = dc.read_only
                initial: dict = {"kind": "labels", "labelled": labelled}
            else:  # the user's image: read-only unless the user allowed writes
                path = os.path.abspath(dc.image)
                read_only = dc.read_only or not dc.allow_write
                initial = {"kind": "file", "path": path}
            try:
                img = open_image(path, writable=not read_only)
            except PathRefused as e:
                raise MachineError(f"device {dc.id}: image {e}") from None
            vdev = VirtIOBlk(dc.id, img, num_queues=dc.queues, queue_size=dc.queue_size, read_only=read_only,
                             serial=dc.serial, aio=dc.aio, loop=self.iothread)
            assert dc.slot is not None
            self.blk_images[str(dc.slot)] = initial
            class_code = 0x010000
        else:
            vdev = VirtIONet(dc.id, queue_pairs=dc.queue_pairs, queue_size=dc.queue_size, backend=dc.backend,
                             loop=self.iothread)
            class_code = 0x020000
        vdev.mem = self.memory
        vdev.lock = self.bql
        try:
            proxy = VirtIOPCIProxy(vdev, vm=self.vm, routes=self.routes, iothread=self.iothread,
                                   registry=self.registry, ioeventfd=dc.ioeventfd, irqfd=dc.irqfd and not self.xen,
                                   msix_vectors=None if dc.msix else 0, class_code=class_code)
            assert dc.slot is not None
            self.bus_of(dc).add_device(proxy, dc.slot, dc.function)
            register_machine_faults(self.vm, proxy, self.bql)
        except BaseException:
            close = getattr(vdev, "close", None)
            if close is not None:
                close()
            raise
        self.devices[dc.id] = proxy
        self.device_cfg[dc.id] = dc

    def _add_passthrough(self, dc: DeviceConfig) -> None:
        """A vfio-user passthrough function: connect, realize, put it on the bus."""
        from ..vfio.pci import VfioDeviceError

        try:
            dev = VFIOPCIDevice(dc.id, dc.socket, memory=self.memory, vm=self.vm, routes=self.routes,
                                iothread=self.iothread, registry=self.registry, dma=dc.dma,
                                x_msix_noresize=dc.x_msix_noresize, irqfd=dc.irqfd and not self.xen,
                                xen=self.xen, on_fatal=self._passthrough_fatal,
                                on_request=self._passthrough_release_request, aer=dc.aer,
                                on_aer=self._passthrough_aer)
        except VfioDeviceError as e:
            raise MachineError(f"device {dc.id}: {e}") from None
        try:
            assert dc.slot is not None
            self.bus_of(dc).add_device(dev, dc.slot, dc.function)
        except BaseException:
            dev.close()
            raise
        self.passthrough[dc.id] = dev
        self.device_cfg[dc.id] = dc
        register_passthrough_faults(self.vm, dev, self.bql)

    def _set_multifunction(self) -> None:
        """Function 0 of a slot with other functions says so (header type bit 7), as QEMU's
        ``multifunction=on``: the guest scans functions 1..7 only then."""
        for bus in [self.bus] + [p.sec_bus for p in self.root_ports.values()]:
            for devfn, dev in bus.devices.items():
                if devfn & 7:
                    continue
                others = any(d >> 3 == devfn >> 3 and d & 7 for d in bus.devices)
                hdr = dev.config[R.PCI_HEADER_TYPE]
                dev.config[R.PCI_HEADER_TYPE] = hdr | 0x80 if others else hdr & 0x7F

    def _check_aer_topology(self) -> None:
        """``aer = true`` needs a topology the guest can recover in (seed 004's restrictions): every
        function of the host card (what a hot reset resets, from the server) is a passthrough
        device of this VM with ``aer = true``, all on one virtual bus below one root port, alone
        there.  Then a secondary bus reset of that bus is one host hot reset for the whole card
        (``VfioCardReset``).  Otherwise the machine refuses to start and says why."""
        from ..vfio.client import VfioRequestError

        by_addr: dict[str, VFIOPCIDevice] = {}
        for dev in self.passthrough.values():
            offer = dev.hot_reset_offer
            if offer is not None:
                by_addr[str(offer.address)] = dev
        done: set[str] = set()
        for dev_id, dev in self.passthrough.items():
            dc = self.device_cfg[dev_id]
            if not dc.aer or dev_id in done:
                continue
            where = f"device {dev_id}: aer = true"
            if dev.aer is None:
                raise MachineError(f"{where} needs a PCIe function with the AER capability; the server's function "
                                   "has none")
            if dev.hot_reset_offer is None:
                raise MachineError(f"{where} needs the server's hot reset ({HOT_RESET_CAPABILITY}); the server at "
                                   f"{dc.socket} does not offer it, so a guest's bus reset could not reach the card")
            try:
                card = dev.hot_reset_info()
            except VfioRequestError as e:
                raise MachineError(f"{where}: the server cannot say which functions a hot reset resets: {e}") from None
            members: list[VFIOPCIDevice] = []
            for addr in card:
                m = by_addr.get(str(addr))
                if m is None:
                    raise MachineError(f"{where} needs every function of its card in this VM: host function {addr} "
                                       "is not (a hot reset of the card would reset it under someone else)")
                if not self.device_cfg[m.name].aer:
                    raise MachineError(f"{where}: {m.name} (host {addr}) is a function of the same card: it needs "
                                       "aer = true too")
                members.append(m)
            if dev not in members:
                members.append(dev)
            buses = {id(m.bus) for m in members}
            if len(buses) != 1:
                raise MachineError(f"{where}: the functions of the card ({', '.join(m.name for m in members)}) must "
                                   "sit on one virtual bus (the same bus = \"...\")")
            bus = members[0].bus
            assert bus is not None
            port = bus.parent
            if port is None or not port.is_root_port:
                raise MachineError(f"{where}: the card must sit below a pcie-root-port (bus = \"<root port id>\"), "
                                   "alone on its bus, so that its errors reach the guest and a bus reset is the card's")
            strangers = [d.name for d in bus.devices.values() if d not in members]
            if strangers:
                raise MachineError(f"{where}: the bus of {port.name} must hold only the card's functions; "
                                   f"{', '.join(strangers)} is not one")
            group = VfioCardReset(members, enabled=lambda: self.faults.fix_on(CARD_HOT_RESET))
            bus.reset_hooks.append(group.bus_reset_hook)
            self.card_resets[port.name] = group
            done.update(m.name for m in members)

    def _passthrough_aer(self, event: dict) -> None:
        """A passthrough function's host reported a PCIe error (main loop, big lock held): say
        what it was and what the VMM did; stop the VM when the policy says so (on a thread: the
        stop waits for the vCPUs)."""
        self.emit_event("X_VFIO_AER_ERROR", event)
        if event.get("action") == "stop":
            self.stop_reason = "internal-error"
            start_thread(self._stop_for_passthrough, "kc-vfio-stop", args=(dict(event), None))

    def _passthrough_fatal(self, event: dict) -> None:
        """A passthrough device could not wire a host interrupt: stop the VM and say why.

        Called inside a vCPU's heavyweight exit with the big lock held: pausing the vCPUs from
        there would wait for the very exit we are in, so the stop runs on its own thread."""
        start_thread(self._stop_for_passthrough, "kc-vfio-stop", args=(dict(event), "X_VFIO_IRQ_FATAL"))

    def _stop_for_passthrough(self, event: dict, then: str | None) -> None:
        try:
            if self.running and not self._stopped:
                self.pause()
                self.emit_event("STOP", {})
        except Exception as e:  # the guest went away meanwhile: the event still says why
            log.warning("%s: stopping the VM for %s: %s", self.cfg.name, event.get("device"), e)
        if then is not None:
            self.emit_event(then, event)

    def _passthrough_release_request(self, event: dict) -> None:
        """The host asks for a passthrough function back (vfio-pci's REQ).  As QEMU does
        (``vfio_req_notifier_handler`` -> ``qdev_unplug``), the guest is asked to let go of the
        function first -- its driver is torn down -- and then the VMM lets go: its vfio-user
        connection closes, the function leaves the bus, and ``DEVICE_DELETED`` is emitted.  A guest
        that does not let go within UNPLUG_TIMEOUT keeps the device (QEMU cannot force it either);
        ``X_VFIO_RELEASE_REFUSED`` says so.  Called on the main loop: the work runs on its own
        thread, since the guest's unplug needs the main loop."""
        dev_id = str(event.get("device"))
        with self._req_mu:
            if dev_id in self._releasing:
                return
            self._releasing.add(dev_id)
        start_thread(self._release_passthrough, "kc-vfio-req", args=(dev_id,))

    def _release_passthrough(self, dev_id: str) -> None:
        try:
            dev = self.passthrough.get(dev_id)
            if dev is None or self._stopped:
                return
            slot = self.guest_slot(dev)
            try:
                self.guest_cmd({"cmd": "pci-unplug", "slot": slot}, timeout=UNPLUG_TIMEOUT)
            except Exception as e:  # the guest did not let go: the device stays
                log.warning("%s: the guest did not release %s: %s", self.cfg.name, dev_id, e)
                self.emit_event("X_VFIO_RELEASE_REFUSED", {"device": dev_id, "reason": str(e)})
                return
            with self.bql:
                (dev.bus or self.bus).remove_device(dev)
                self.passthrough.pop(dev_id, None)
                dev.close()
            self.emit_event("DEVICE_DELETED", {"device": dev_id, "path": f"/machine/peripheral/{dev_id}"})
        finally:
            with self._req_mu:
                self._releasing.discard(dev_id)

    def emit_event(self, event: str, data: dict | None = None) -> None:
        """Record an event the machine raised itself and send it to the QMP clients, if a monitor
        runs (from any thread)."""
        self.events.append({"event": event, "data": dict(data or {}), "time": time.time()})
        qmp = self.qmp
        if qmp is not None:
            qmp.emit(event, data or None)

    def device(self, dev_id: str) -> VirtIOPCIProxy:
        try:
            return self.devices[dev_id]
        except KeyError:
            raise MachineError(f"no device {dev_id!r}") from None

    def slot(self, dev_id: str) -> int:
        return self.guest_slot(self.device(dev_id))

    def aer_status(self, dev_id: str) -> dict:
        """``x-query-pci-aer`` of a root port or a passthrough function (big lock held): the AER
        registers as the guest sees them, and for a passthrough function the VMM's error handling
        (ERR eventfd, policy, what it did)."""
        port = self.root_ports.get(dev_id)
        if port is not None:
            return {"device": dev_id, "kind": "pcie-root-port", "aer": port.aer_cap.describe(),
                    "bridge": port.describe(), "aer-interrupts": port.aer_interrupts}
        dev = self.passthrough.get(dev_id)
        if dev is None:
            raise MachineError(f"no PCIe function {dev_id!r}")
        return {"device": dev_id, "kind": "vfio-user", **dev.query_aer()}

    @staticmethod
    def guest_slot(dev: PCIDevice) -> int:
        """How guest commands address *dev*: its slot on bus 0, ``bus << 8 | devfn`` below a bridge."""
        bus = dev.bus.number if dev.bus is not None else 0
        return dev.devfn >> 3 if bus == 0 else bus << 8 | dev.devfn

    # -- the hypervisor's heavyweight exits -----------------------------------------------------------
    def _exit(self, code: int, addr: int, value: int, size: int, vcpu: int) -> int:
        with self.bql:
            if code == abi.EXIT_MMIO_WRITE:
                self.mmio.write(addr, value, size)
            elif code == abi.EXIT_MMIO_READ:
                return self.mmio.read(addr, size)
            elif code == abi.EXIT_PIO_WRITE:
                self.io.write(addr, value, size)
            elif code == abi.EXIT_PIO_READ:
                return self.io.read(addr, size)
        return 0

    def _guest_gone(self) -> None:
        self._gone.set()
        if not self._stopped:
            log.warning("%s: the guest went away", self.cfg.name)

    # -- life cycle -------------------------------------------------------------------------------------
    def start(self, *, boot: bool = True, msix: bool = True) -> dict:
        """Start the main loop and the guest, set up its memory, and boot it."""
        self.iothread.start()
        if self.cfg.guest == "process":
            self._start_guest_process()
        else:
            self.guest_hv = KernelHV(self._guest_sock, name=f"{self.cfg.name}-guest").start()
        self.vm.start()
        self.guest_pid = self.vm.guest_pid
        if self.cfg.guest == "thread":
            from ..guest.os import GuestOS

            assert self.guest_hv is not None
            self.guest_hv.wait_ready()
            self.guest_os = GuestOS(self.guest_hv)
        self.running = True
        self.started = True
        if boot:
            self.boot_info = self.guest_cmd({"cmd": "boot", "msix": msix, "cpu": 0}, timeout=60)
        if self.xen and not self.faults.fix_on(XEN_FRESH_PIRQ):  # switched off before start: tell the guest now
            sw = self.faults.get(XEN_FRESH_PIRQ)
            assert isinstance(sw, GuestVariantSwitch)
            sw.guest = self._send_msi_variant(False)
        return self.boot_info

    def _send_msi_variant(self, fresh: bool) -> dict:
        """Tell the guest which Xen MSI variant to use (guest command ``xen-msi-variant``).  Never
        raises: a guest that is not running or does not know the command is reported."""
        if not self.xen:
            return {"sent": False, "why": "not a Xen domain"}
        if not self.started or self._gone.is_set():
            return {"sent": False, "why": "the guest is not running (sent when it starts)"}
        try:
            rep = self.guest_cmd({"cmd": "xen-msi-variant", "reuse": not fresh}, timeout=30)
        except Exception as e:  # noqa: BLE001 -- the guest's answer (e.g. an older guest without the command)
            log.warning("%s: the guest's Xen MSI variant (reuse=%s) not set: %s", self.cfg.name, not fresh, e)
            return {"sent": False, "error": str(e), "reuse": not fresh}
        return {"sent": True, "reuse": not fresh, "reply": rep}

    def _start_guest_process(self) -> None:
        fd = self._guest_sock.fileno()
        env = dict(os.environ)
        pkg_root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        env["PYTHONPATH"] = pkg_root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        self.guest_proc = start_helper(  # its own process group: a terminal's Ctrl-C is the VMM's
            [sys.executable, "-m", "kickcall.guest.process", "--channel-fd", str(fd), "--parent", str(os.getpid()),
             "--log-level", self.guest_log_level],
            pass_fds=[fd], env=env, stdin=subprocess.DEVNULL)
        self._guest_sock.close()

    def guest_cmd(self, cmd: dict, timeout: float | None = 120.0) -> dict:
        """Run a command in the guest OS (see ``kickcall.guest.os``)."""
        if self._gone.is_set():
            raise MachineError("the guest is gone")
        return self.vm.guest_cmd(cmd, timeout=timeout)

    def pause(self) -> None:
        """Stop the guest's vCPUs (acknowledged), then the devices."""
        if not self.running:
            return
        self.vm.pause_vcpus()
        with self.bql:
            for p in self.devices.values():
                p.vm_state_change(False)
            self.running = False

    def resume(self) -> None:
        """Restart the devices (deferred kicks are processed), then the vCPUs."""
        if self.running:
            return
        self.stop_reason = None
        with self.bql:
            for p in self.devices.values():
                p.vm_state_change(True)
            self.running = True
        self.vm.resume_vcpus()

    def system_reset(self) -> None:
        """Reset every device (as a platform reset would) and have the guest boot again."""
        was_running = self.running
        if was_running:
            self.vm.pause_vcpus()
        with self.bql:
            for p in self.devices.values():
                p.reset()
            for vp in self.passthrough.values():
                vp.reset()
        if was_running:
            self.vm.resume_vcpus()
        self.boot_info = self.guest_cmd({"cmd": "reboot", "cpu": 0}, timeout=60)

    def start_monitor(self, path: str | None = None, tcp: tuple[str, int] | None = None, *,
                      claim: SocketClaim | None = None):
        """A QMP monitor (QEMU's wire format) on a Unix socket, and on loopback TCP if asked.

        *claim*: the socket path already checked and locked (``ownership.SocketClaim``); the
        caller keeps it and releases it.  Without one, *path* is claimed here (a live socket or
        a file that is not ours is refused with ``PathRefused``)."""
        from ..monitor.commands import build_registry
        from ..monitor.server import QMPServer
        from .monitor import MachineTarget, add_machine_hmp, machine_commands

        reg, attach = build_registry(MachineTarget(self), extra=machine_commands(self))
        add_machine_hmp(reg)
        server = QMPServer(reg, path=path, tcp=tcp, name=self.cfg.name, claim=claim)
        self.qmp = server
        attach(server)
        server.start()
        return server

    def start_workload(self, blk: dict | None = None, net: dict | None = None) -> dict:
        if blk is None and net is None:
            blk, net = self.cfg.workload_blk, self.cfg.workload_net
        return self.guest_cmd({"cmd": "workload-start", "blk": blk, "net": net, "blk_images": self.blk_images})

    def stop_workload(self, timeout: float = 60.0) -> list[dict]:
        if not self.running:
            self.resume()
        rep = self.guest_cmd({"cmd": "workload-stop", "timeout": timeout}, timeout=timeout + 30)
        return rep.get("results", [])

    def guest_stats(self) -> dict:
        return self.guest_cmd({"cmd": "stats"}, timeout=30)

    def stop(self, timeout: float = 15.0) -> None:
        """Shut the guest down, stop every thread, close every fd.  Idempotent."""
        if self._stopped:
            return
        self._stopped = True
        if self.qmp is not None:
            self.qmp.stop()
        for p in self.devices.values():  # a back-end going away now is no reason to reconnect
            if hasattr(p.vdev, "reconnect_enabled"):
                p.vdev.reconnect_enabled = False
        if self.started and not self._gone.is_set():
            if not self.running:
                try:
                    self.resume()
                except Exception:
                    pass
            try:
                self.vm.shutdown(timeout=timeout)
            except (ChannelClosed, Exception):
                pass
        if self.guest_proc is not None:
            try:
                self.guest_proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.guest_proc.kill()
                self.guest_proc.wait(5)
        if self.guest_os is not None:
            self.guest_os.shutdown()
        if self.guest_hv is not None:
            self.guest_hv.close()
        elif self.guest_proc is None:
            self._guest_sock.close()
        with self.bql:
            for p in self.devices.values():
                try:
                    p.stop_ioeventfd()
                    p.set_guest_notifiers(False)
                except Exception as e:  # the guest (and its hypervisor half) is gone: nothing left to unbind
                    log.debug("%s: teardown after the VM is gone: %s", p.name, e)
            for vp in self.passthrough.values():
                try:
                    vp.close()
                except Exception as e:
                    log.debug("%s: close: %s", vp.name, e)
        self.vm.stop_workers()
        if self.iothread.running:
            self.iothread.stop()
        for p in self.devices.values():
            close = getattr(p.vdev, "close", None)
            if close is not None:
                close()
            p.vdev.release_rings()
        self.vm.close()
        # every notifier still registered is closed with the machine (when the VM went away first,
        # unbinding failed -- as with KVM, closing the VM dropped the bindings -- but the fds remain ours)
        for ent in self.registry.entries():
            self.registry.unregister(ent)
            if not ent.notifier.closed:
                ent.notifier.close()
        self.memory.close()
        if self._own_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)
        self.running = False

    def __enter__(self) -> "Machine":
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- what the live view and the monitor show -----------------------------------------------------------
    def query_xen_pirqs(self) -> dict:
        """``x-query-xen-pirqs``: the hypervisor's view (``VM.xen_query``: pirqs with state, port,
        mask, pending, events; the free pool; counters; Xen's console) joined with the device
        model's: per device (passthrough vectors and virtio-pci MSI-X entries) the pirq its MSI-X
        entry names and, for a passthrough vector, the pirq it mapped; and ``conflicts``: every
        pirq claimed by more than one (device, vector) -- by a live entry's message (MSI-X on, entry
        unmasked) or by a mapping.  ``MachineError`` when the machine is not a Xen domain."""
        if not self.xen:
            raise MachineError("not a Xen domain (hypervisor = \"kvm\")")
        hv = self.vm.xen_query()
        devices: list[dict] = []
        claims: dict[int, dict[tuple[str, int], set[str]]] = {}

        def claim(pirq: int, dev: str, vector: int, by: str) -> None:
            claims.setdefault(pirq, {}).setdefault((dev, vector), set()).add(by)

        with self.bql:
            for name, dev in self.passthrough.items():
                vecs = dev.query_xen()
                devices.append({"device": name, "kind": "passthrough", "vectors": vecs})
                for x in vecs:
                    if x["entry-live"] and x["entry-pirq"] >= 0:
                        claim(x["entry-pirq"], name, x["vector"], "entry")
                    if x["mapped-pirq"] >= 0:
                        claim(x["mapped-pirq"], name, x["vector"], "mapping")
            for name, p in self.devices.items():
                m = p.msix
                if m is None:
                    continue
                evs = []
                for v in range(m.nvectors):
                    pirq = pirq_of_msi(*m.get_message(v))
                    if pirq is None:
                        continue
                    live = m.enabled and not m.entry_masked(v)
                    evs.append({"vector": v, "entry-pirq": pirq, "entry-live": live, "mapped-pirq": -1})
                    if live:
                        claim(pirq, name, v, "entry")
                devices.append({"device": name, "kind": "virtio-pci", "vectors": evs})
        conflicts = []
        for pirq in sorted(claims):
            who = sorted(claims[pirq].items())
            if len(who) < 2:
                continue
            names = " and ".join(f"{d} vector {v}" for (d, v), _by in who)
            conflicts.append({"pirq": pirq, "claims": [{"device": d, "vector": v, "by": sorted(by)}
                                                       for (d, v), by in who],
                              "text": f"pirq {pirq} is claimed by {names}"})
        for ent in hv.get("pirqs", []):
            ent["device-model"] = [{"device": d, "vector": v, "by": sorted(by)}
                                   for (d, v), by in sorted(claims.get(ent.get("pirq", -1), {}).items())]
        sw = self.faults.get(XEN_FRESH_PIRQ)
        return {"hypervisor": hv, "devices": devices, "conflicts": conflicts,
                "guest-msi-variant": {"fault": XEN_FRESH_PIRQ, **sw.state()}}

    def counters(self) -> dict[str, Any]:
        """The counters document (``kickcall.counters``): per device (keyed by id), per queue,
        every kick and call by path, whoever handled it, with the vector's mask and pending bit;
        the hypervisor's global counters and the heavyweight exits.  One source for the live
        view, ``run --json``, QMP ``x-query-kickcall-counters``, HMP ``info counters`` and the
        metrics exporter.  Read without disturbing anything (the big lock, the shared stats page)."""
        devices: dict[str, Any] = {}
        with self.bql:
            for name, p in self.devices.items():
                qs = [p.queue_info(q) for q in p.vdev.queues]
                for q, d in zip(p.vdev.queues, qs, strict=True):
                    fields = read_ring_fields(self._ring_u16, q.avail, q.used, q.num, mapped=bool(q.desc))
                    if p.ioeventfd_grabbed:  # a back-end holds the requests: the ring says how many
                        d["inuse"] = backend_inuse(fields, q.event_idx) or 0
                        last = fields["avail-event"] if q.event_idx else None
                    else:
                        last = q.get_last_avail_idx()
                    # the ring's indices as guest memory has them, and where the device is
                    idx = {"avail-idx": fields["avail-idx"], "used-idx": fields["used-idx-ring"],
                           "last-avail-idx": last if q.desc else None}
                    d["ring-indices"] = {k: v for k, v in idx.items() if v is not None}
                msix_on = p.msix is not None and p.msix.enabled
                devices[name] = {
                    "id": name, "path": p.path, "type": p.vdev.type_name,
                    "handled-by": "vhost-user" if p.ioeventfd_grabbed else "vmm",
                    "slot": self.guest_slot(p), "status": p.vdev.status, "broken": p.vdev.broken,
                    "ioeventfd": p.ioeventfd_started, "irq-mode": "msix" if msix_on else "intx",
                    "queues": qs,
                }
        return counters_doc("kickcall-run", devices, running=self.running,
                            extra={"hv": kebab_keys(self.vm.stats.globals()), "exits": dict(self.vm.exit_counts)})

    def _ring_u16(self, gpa: int) -> int | None:
        try:
            return self.memory.read_u16_atomic(gpa)
        except ValueError:
            return None

    def workload_report(self, results: list[dict]) -> dict[str, dict]:
        """The guest's workload results (``stop_workload``) keyed by device id, kebab-case as the
        counters document is."""
        by_slot = {self.guest_slot(p): name for name, p in self.devices.items()}
        out: dict[str, dict] = {}
        for r in results:
            dev = by_slot.get(r.get("slot", -1), f"slot-{r.get('slot')}")
            doc = {"device": dev}
            doc.update(kebab_keys({k: v for k, v in r.items() if k != "slot"}))
            out[dev] = doc
        return out
