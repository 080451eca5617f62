"""The guest OS: boots (PCI enumeration, driver probe), runs workloads, answers the VMM's commands.

Commands arrive as ``IOCTL_GUEST_CMD`` requests (JSON ``{"cmd": name, ...}``).  Anything that
touches a device runs on a vCPU thread, so it reaches the device through the hypervisor exactly
as guest code does.  Devices are addressed by PCI slot on bus 0, and by ``bus << 8 | devfn``
(a number >= 0x100) below a bridge.
"""

from __future__ import annotations

import functools
import logging
import os
import random
import threading
import time
import zlib

from ..hv.kernel import KernelHV
from ..pci import regs as R
from ..virtio.blk import BLK_T_FLUSH, BLK_T_GET_ID, BLK_T_IN, BLK_T_OUT
from .aer import AerService
from .kernel import GuestKernel, GuestPciDev
from .nic import NicDriver, is_kickcall_nic
from .nvme import IRQ_FLAGS, NvmeDriver
from .xen import XenHvmMsiDomain
from .virtio_blk import BlkRequest, VirtioBlkDriver
from .virtio_net import VirtioNetDriver
from .virtio_pci import VirtioPciDevice
from .workload import BlkWorkload, NetWorkload
from ..threads import start_thread

__all__ = ["GuestOS"]

log = logging.getLogger("kickcall.guest.os")

_BLK_OPS = {"read": BLK_T_IN, "write": BLK_T_OUT, "flush": BLK_T_FLUSH, "get-id": BLK_T_GET_ID}


class _Dev:
    def __init__(self, pci: GuestPciDev) -> None:
        self.pci = pci
        # bus 0: the slot; below a bridge: bus << 8 | devfn (>= 0x100), one key per function
        self.slot = pci.devfn >> 3 if pci.bus == 0 else pci.bus << 8 | pci.devfn
        self.vdev: VirtioPciDevice | None = None
        self.driver: VirtioBlkDriver | VirtioNetDriver | NicDriver | None = None
        self.kind = "unknown"

    def describe(self) -> dict:
        pci = self.pci
        d: dict[str, object] = {"slot": self.slot, "vendor": pci.vendor, "device": pci.device, "kind": self.kind,
                                "bus": pci.bus}
        drv = self.driver
        if isinstance(drv, VirtioBlkDriver):
            d.update(capacity=drv.capacity, queues=len(drv.vqs), completed=drv.completed, errors=drv.errors)
        elif isinstance(drv, VirtioNetDriver):
            d.update(pairs=drv.pairs, rx=drv.rx_packets, tx=drv.tx_packets)
        elif isinstance(drv, NicDriver):
            d.update(mode=drv.mode, queues=len(drv.queues), table_size=drv.table_size, msi_vectors=drv.msi_nvec,
                     io_state=drv.io_state)
        if pci.is_bridge:
            d.update(bridge=True, secondary=pci.secondary)
        if self.vdev is not None:
            d["irq_mode"] = {0: "none", 1: "intx", 4: "msix"}.get(self.vdev.irq_mode, "?")
            d["vqs"] = [{"index": v.index, "kicks": v.kicks, "kicks_suppressed": v.kicks_suppressed,
                         "interrupts": v.interrupts, "spurious": v.spurious_interrupts,
                         "completed": v.completed} for v in self.vdev.vqs]
        return d


class GuestOS:
    def __init__(self, hv: KernelHV, *, queue_size: int | None = None) -> None:
        self.hv = hv
        self.k = GuestKernel(hv)
        self.devs: dict[int, _Dev] = {}
        self.workloads: list = []
        self.queue_size = queue_size
        self.nic_ring_size = 256
        #: the kickcall-nic driver's slot_reset re-initialises the device (``aer-config``)
        self.nic_restore_after_reset = True
        #: the AER port service (``aer-stats``, ``aer-config``)
        self.aer = AerService(self.k)
        self._reqs: dict[int, BlkRequest] = {}
        self._req_ids = 0
        self._mu = threading.Lock()
        hv.command_handler = self._on_command
        hv.os_ready.set()

    def shutdown(self) -> None:
        for w in self.workloads:
            w.stop_event.set()
        self.k.shutdown()
        for d in self.devs.values():
            if d.vdev is not None:
                for vq in d.vdev.vqs:
                    vq.release()

    # -- command dispatch -----------------------------------------------------------------------------
    def _on_command(self, seq: int, req: dict) -> None:
        start_thread(self._run_command, "kc-guest-cmd", args=(seq, req))

    def _run_command(self, seq: int, req: dict) -> None:
        name = str(req.get("cmd", ""))
        fn = getattr(self, "cmd_" + name.replace("-", "_"), None)
        if fn is None:
            self.hv.reply_command(seq, {}, error=f"unknown guest command {name!r}")
            return
        args = {k: v for k, v in req.items() if k not in ("cmd", "cpu")}
        try:
            if getattr(fn, "on_vcpu", True):
                cpu = req.get("cpu")
                fut = self.k.run_on(int(cpu), lambda: fn(**args)) if cpu is not None else \
                    self.k.run_on_idle(lambda: fn(**args))
                result = fut.result(float(req.get("timeout", 120)) + 5)
            else:
                result = fn(**args)
            self.hv.reply_command(seq, result if isinstance(result, dict) else {"result": result})
        except Exception as e:
            log.debug("guest command %s failed", name, exc_info=True)
            self.hv.reply_command(seq, {}, error=f"{type(e).__name__}: {e}")

    def _dev(self, slot: int) -> _Dev:
        d = self.devs.get(int(slot))
        if d is None:
            raise KeyError(f"no device in slot {slot}")
        return d

    def _blk(self, slot: int) -> VirtioBlkDriver:
        drv = self._dev(slot).driver
        if not isinstance(drv, VirtioBlkDriver):
            raise TypeError(f"slot {slot} is not a virtio-blk device")
        return drv

    # -- boot ------------------------------------------------------------------------------------------
    def cmd_boot(self, msix: bool = True) -> dict:
        for pci in self.k.pci_enumerate():
            d = _Dev(pci)
            self.devs[d.slot] = d
            if is_kickcall_nic(pci):
                self._probe_nic(d, msix)
                continue
            if pci.vendor != 0x1AF4:
                continue
            self._probe(d, msix)
        ports = self.aer.probe(self.k.pci_devices)
        return {"devices": [d.describe() for d in self.devs.values()], "pid": _pid(),
                "aer-ports": [p.describe() for p in ports]}

    def _probe(self, d: _Dev, msix: bool = True) -> None:
        d.vdev = VirtioPciDevice(self.k, d.pci)
        if d.vdev.device_id == 2:
            d.kind = "virtio-blk"
            d.driver = VirtioBlkDriver(self.k, d.vdev, queue_size=self.queue_size, allow_msix=msix)
        elif d.vdev.device_id == 1:
            d.kind = "virtio-net"
            d.driver = VirtioNetDriver(self.k, d.vdev, queue_size=self.queue_size)
        else:
            return
        d.driver.probe()
        self.k.printk(f"{d.kind} at slot {d.slot}: {d.describe()}")

    def _probe_nic(self, d: _Dev, msix: bool = True, irq_mode: str = "msix") -> None:
        drv = NicDriver(self.k, d.pci, ring_size=self.nic_ring_size, allow_msix=msix, irq_mode=irq_mode,
                        restore_after_reset=self.nic_restore_after_reset)
        d.kind = "kickcall-nic"
        d.driver = drv
        drv.probe()
        self.k.printk(f"kickcall-nic at slot {d.slot}: {d.describe()}")

    def _nic(self, slot: int) -> NicDriver:
        drv = self._dev(slot).driver
        if not isinstance(drv, NicDriver):
            raise TypeError(f"slot {slot} is not a kickcall-nic")
        return drv

    # -- kickcall-nic (the passthrough function) ----------------------------------------------------------
    def cmd_nic_request_irq(self, slot: int, queue: int, enable: bool = True) -> dict:
        """Bring queue *queue*'s MSI-X vector up now (request_irq), then enable the queue."""
        drv = self._nic(slot)
        irq = drv.request_queue_irq(queue)
        if enable:
            drv.enable_queue(queue)
        return {"irq": irq}

    def cmd_nic_bring_up(self, slot: int, first: int, count: int) -> dict:
        """Bring MSI-X entries [first, first+count) up one by one on a shared spare irq."""
        return {"irq": self._nic(slot).bring_up_entries(first, count)}

    def cmd_nic_free_irq(self, slot: int, queue: int) -> dict:
        drv = self._nic(slot)
        drv.free_queue_irq(queue)
        return {}

    def cmd_nic_enable(self, slot: int, queue: int, on: bool = True) -> dict:
        drv = self._nic(slot)
        drv.enable_queue(queue, on)
        return {}

    def cmd_nic_generate(self, slot: int, queue: int, n: int = 1, rate: int | None = None) -> dict:
        """Ask the device for *n* records now (DOORBELL) and/or set its rate (records/s)."""
        drv = self._nic(slot)
        if n:
            drv.generate(queue, n)
        if rate is not None:
            drv.set_rate(queue, rate)
        return {}

    def cmd_nic_mask(self, slot: int, entry: int, masked: bool) -> dict:
        """Mask or unmask MSI-X entry (or, in MSI mode, MSI vector) *entry*."""
        d = self._dev(slot)
        d.pci.vector_mask(int(entry), bool(masked))
        return {}

    def cmd_nic_reprobe(self, slot: int, mode: str = "msix") -> dict:
        """Unbind the kickcall-nic driver (queues off, irqs freed, MSI/MSI-X disabled) and bind it
        again with interrupt mode *mode*: ``"msix"``, ``"msi"`` or ``"intx"`` (as a driver's
        module parameter would choose, e.g. ``pci=nomsi`` / a driver's ``use_msi``)."""
        d = self._dev(slot)
        self._nic(slot).teardown()
        self._probe_nic(d, irq_mode=str(mode))
        return d.describe()

    def cmd_pci_unplug(self, slot: int) -> dict:
        """The platform asks to remove the function in *slot* (an attention button, an ACPI eject):
        its driver lets go of it (queues off, interrupts freed, bus mastering off) and the OS
        forgets it."""
        d = self._dev(slot)
        drv = d.driver
        if isinstance(drv, NicDriver):
            drv.teardown()
        elif d.vdev is not None:
            d.vdev.teardown()
        self.devs.pop(d.slot, None)
        self.k.pci_devices = [p for p in self.k.pci_devices if p is not d.pci]
        self.k.printk(f"pci {d.slot:02x}.0: removed")
        return {"slot": d.slot, "kind": d.kind}

    def cmd_pci_config_read(self, slot: int, offset: int, size: int = 4) -> dict:
        """A config read of the function in *slot* (offsets >= 0x100 through ECAM)."""
        if int(size) not in (1, 2, 4) or not 0 <= int(offset) <= 0x1000 - int(size):
            raise ValueError(f"bad config access {offset:#x}/{size}")
        return {"value": self._dev(slot).pci.read_config(int(offset), int(size))}

    def cmd_pci_bus_reset(self, slot: int, timeout: float = 10.0) -> dict:
        """``pci_reset_bus`` on the bridge in *slot*: the functions below it saved
        (``pci_bus_save_and_disable``), Secondary Bus Reset set for Trst (2 ms) and cleared, each
        function waited for (its vendor id answers, bounded by *timeout*), then restored (BARs,
        command, MSI/MSI-X state)."""
        d = self._dev(slot)
        bridge = d.pci
        if not bridge.is_bridge:
            raise ValueError(f"slot {slot} is not a bridge")
        below = [x for x in self.k.pci_devices if x.parent is bridge]
        for f in below:
            f.save_config()
        ctl = bridge.read_config(R.PCI_BRIDGE_CONTROL, 2)
        bridge.write_config(R.PCI_BRIDGE_CONTROL, ctl | R.PCI_BRIDGE_CTL_BUS_RESET, 2)
        self.k.msleep(2.0)
        bridge.write_config(R.PCI_BRIDGE_CONTROL, ctl & ~R.PCI_BRIDGE_CTL_BUS_RESET, 2)
        deadline = time.monotonic() + float(timeout)
        not_ready = []
        for f in below:
            while f.read_config(R.PCI_VENDOR_ID, 2) == 0xFFFF:
                if time.monotonic() >= deadline:
                    not_ready.append(repr(f))
                    break
                self.k.msleep(1.0)
            else:
                f.restore_config()
                f.restore_msi_state()
        self.k.printk(f"{bridge!r}: secondary bus reset of {len(below)} function(s)")
        return {"functions": [repr(f) for f in below], "not-ready": not_ready}

    # -- Xen (the guest's view) -------------------------------------------------------------------------
    def _xen(self) -> XenHvmMsiDomain:
        x = self.k.xen
        if x is None:
            raise RuntimeError("not a Xen guest (the machine's hypervisor is not xen)")
        return x

    def cmd_xen_info(self) -> dict:
        """The guest's view of the Xen interrupt path: each pirq irq (irq, pirq, port, slot,
        MSI-X entry, name, interrupts taken), upcalls, spurious events, bind failures, the MSI
        variant (``reuse``: the 2010 read-back, ``fresh``: the 2017 fix)."""
        x = self._xen()
        ev = x.ev
        return {"irqs": ev.describe(), "upcalls": ev.upcalls, "spurious": ev.spurious,
                "bind_failures": ev.bind_failures, "pirq_shared": ev.pirq_shared, "reused": x.reused,
                "pirq_alloc_failures": x.pirq_alloc_failures, "variant": x.variant,
                "shared_info": ev.shared_info_gpa, "ports": dict(sorted(ev.evtchn_to_irq.items()))}

    cmd_xen_info.on_vcpu = False  # type: ignore[attr-defined]

    def cmd_xen_msi_variant(self, reuse: bool) -> dict:
        """Switch xen_hvm_setup_msi_irqs' variant: ``reuse`` True is the 2010 behaviour (reuse the
        pirq read back from the device), False the 2017 fix (always a fresh pirq)."""
        x = self._xen()
        x.reuse_cached_pirq = bool(reuse)
        return {"reuse": x.reuse_cached_pirq}

    cmd_xen_msi_variant.on_vcpu = False  # type: ignore[attr-defined]

    def cmd_xen_evtchn_mask(self, port: int, masked: bool) -> dict:
        """Mask or unmask event channel *port* as the pirq chip does (unmasking a pending port
        asks Xen to replay it)."""
        self._xen().ev.mask_port(int(port), bool(masked))
        return {}

    # -- the NVMe pattern on kickcall-nic -----------------------------------------------------------------
    def _nvme(self, slot: int) -> NvmeDriver:
        """The slot's NvmeDriver; a kickcall-nic bound to the nic driver is rebound to it."""
        d = self._dev(slot)
        drv = d.driver
        if isinstance(drv, NvmeDriver):
            return drv
        if not isinstance(drv, NicDriver):
            raise TypeError(f"slot {slot} is not a kickcall-nic")
        drv.teardown()
        nv = NvmeDriver(self.k, d.pci)
        nv.probe()
        d.driver = nv
        d.kind = "kickcall-nic/nvme"
        return nv

    def cmd_nvme_alloc(self, slot: int, nvec: int = 1, types: str = "msix", min_vecs: int = 1) -> dict:
        """``pci_alloc_irq_vectors(min_vecs, nvec, types)`` only (*types*: msix, msi, intx, all)."""
        if types not in IRQ_FLAGS:
            raise ValueError(f"types must be one of {', '.join(IRQ_FLAGS)}")
        drv = self._nvme(slot)
        n = drv.alloc(int(min_vecs), int(nvec), IRQ_FLAGS[types])
        return {"nvec": n, "mode": drv.mode, "pirqs": drv.pirqs(), "irqs": [d.irq for d in drv.pci.vectors]}

    def cmd_nvme_request(self, slot: int) -> dict:
        """``request_irq`` for every allocated vector (its queues enabled)."""
        drv = self._nvme(slot)
        return {"irqs": drv.request(), "pirqs": drv.pirqs()}

    def cmd_nvme_free(self, slot: int) -> dict:
        """``free_irq`` on every vector, then ``pci_free_irq_vectors``."""
        self._nvme(slot).free()
        return {}

    def cmd_nvme_io(self, slot: int, queue: int = 0, n: int = 1, timeout: float = 5.0) -> dict:
        """*n* records on *queue*, one at a time, each waited for.  ``wrong_device`` counts
        handlers of *any* controller that ran during the call and found nothing (an interrupt
        this one raised may land on another)."""
        drv = self._nvme(slot)
        before = self._wrong_device_total()
        r = drv.io(int(queue), int(n), float(timeout))
        r["wrong_device"] = self._wrong_device_total() - before
        return r

    def _wrong_device_total(self) -> int:
        return sum(d.driver.wrong_device for d in self.devs.values() if isinstance(d.driver, NvmeDriver))

    def cmd_nvme_stats(self, slot: int) -> dict:
        return self._nvme(slot).stats()

    def cmd_nvme_probe(self, slot: int, nq: int = 4, timeout: float = 5.0) -> dict:
        """The NVMe probe pattern: one MSI-X vector, an admin record, free; then up to *nq*
        vectors (MSI-X, MSI or INTx) and request_irq for each."""
        drv = self._nvme(slot)
        if drv.nvec:
            drv.free()
        out = drv.probe_pattern(int(nq), float(timeout))
        out["pirqs"] = drv.pirqs()
        return out

    def cmd_xen_msi_stress(self, slots: list[int], nq: int = 2, cycles: int = 100, seed: int = 0,
                           timeout: float = 5.0) -> dict:
        """Several controllers at once, a guest thread per controller on the vCPUs; *cycles* in
        all, spread over the controllers.  A cycle: the probe pattern, one record per queue,
        everything freed; the order of the queues and yields between steps are random (*seed*).
        Returns {cycles, conflicts, wrong_device, lost, fallbacks, ...}."""
        if not slots:
            raise ValueError("no controllers")
        drvs: list[NvmeDriver] = self.k.run_on(0, lambda: [self._nvme(int(s)) for s in slots]).result(60)
        x = self.k.xen
        conflicts0 = (x.ev.bind_failures + x.ev.pirq_shared) if x is not None else 0
        base = [(drv.wrong_device, drv.lost, drv.pci.fallbacks) for drv in drvs]
        per = [int(cycles) // len(drvs) + (1 if i < int(cycles) % len(drvs) else 0) for i in range(len(drvs))]
        done = [0] * len(drvs)
        modes: dict[str, int] = {}
        mu = threading.Lock()

        def run(i: int) -> None:
            drv = drvs[i]
            rng = random.Random(int(seed) * 1000 + i)
            if drv.nvec:
                drv.free()
            for _ in range(per[i]):
                r = drv.probe_pattern(int(nq), float(timeout))
                with mu:
                    modes[r["mode"]] = modes.get(r["mode"], 0) + 1
                if rng.random() < 0.5:
                    os.sched_yield()
                qs = [q for v in drv.vector_queues.values() for q in v]
                rng.shuffle(qs)
                for q in qs:
                    drv.io(q, 1, float(timeout))
                    if rng.random() < 0.3:
                        os.sched_yield()
                drv.free()
                done[i] += 1

        t0 = time.monotonic()
        futs = [self.k.run_on(i % self.k.ncpus, functools.partial(run, i)) for i in range(len(drvs))]
        errors = []
        for f in futs:
            try:
                f.result()
            except Exception as e:  # reported, not raised: the counts so far still say something
                errors.append(f"{type(e).__name__}: {e}")
        elapsed = time.monotonic() - t0
        conflicts = ((x.ev.bind_failures + x.ev.pirq_shared) if x is not None else 0) - conflicts0
        return {"cycles": sum(done), "conflicts": conflicts,
                "bind_failures": x.ev.bind_failures if x is not None else 0,
                "pirq_shared": x.ev.pirq_shared if x is not None else 0,
                "wrong_device": sum(d.wrong_device - b[0] for d, b in zip(drvs, base, strict=True)),
                "lost": sum(d.lost - b[1] for d, b in zip(drvs, base, strict=True)),
                "fallbacks": sum(d.pci.fallbacks - b[2] for d, b in zip(drvs, base, strict=True)),
                "modes": modes, "errors": errors, "seconds": round(elapsed, 3),
                "cycles_per_s": round(sum(done) / elapsed, 1) if elapsed > 0 else None}

    cmd_xen_msi_stress.on_vcpu = False  # type: ignore[attr-defined]

    def cmd_nic_stats(self, slot: int) -> dict:
        return self._nic(slot).stats()

    def cmd_nic_unconsumed(self, slot: int) -> dict:
        return {"queues": self._nic(slot).unconsumed()}

    # -- PCIe AER (guest/aer.py) ----------------------------------------------------------------------------
    def cmd_aer_stats(self) -> dict:
        """The AER service: per root port its counters, history and last error; per function the
        errors it was the source of, its channel state and, for a kickcall-nic, its driver's
        error-handling counters."""
        out = self.aer.stats()
        for d in self.devs.values():
            key = f"{d.pci.requester_id:04x}"
            if isinstance(d.driver, NicDriver) and key in out["functions"]:
                out["functions"][key]["driver"] = d.driver.error_stats()
                out["functions"][key]["slot"] = d.slot
        return out

    cmd_aer_stats.on_vcpu = False  # type: ignore[attr-defined]

    def cmd_aer_config(self, native: bool | None = None, restore_after_reset: bool | None = None,
                       ready_timeout: float | None = None) -> dict:
        """*native*: whether the kernel owns AER (False: ``pcie_ports=compat`` -- the ports' Root
        Error Command cleared and their irqs freed, errors never handled; True: the service
        enabled as at boot).  *restore_after_reset*: whether the kickcall-nic driver's
        slot_reset re-initialises the device (every bound driver and later probes).
        *ready_timeout*: seconds the functions below a port get to come back after a secondary
        bus reset."""
        if native is not None:
            self.aer.set_native(bool(native))
        if restore_after_reset is not None:
            self.nic_restore_after_reset = bool(restore_after_reset)
            for d in self.devs.values():
                if isinstance(d.driver, NicDriver):
                    d.driver.restore_after_reset = self.nic_restore_after_reset
        if ready_timeout is not None:
            self.aer.ready_timeout = float(ready_timeout)
        return {"native": self.aer.native, "restore-after-reset": self.nic_restore_after_reset,
                "ready-timeout": self.aer.ready_timeout}

    def cmd_reboot(self, msix: bool = True) -> dict:
        """After a platform reset: workloads stop, drivers forget their devices, boot again."""
        for w in self.workloads:
            w.stop_event.set()
        for w in self.workloads:
            w.stop(30)
        self.workloads = []
        for d in self.devs.values():
            if d.vdev is not None:
                d.vdev.forget()
                for dv in d.pci.vectors:
                    for h, _n in list(dv.handlers):
                        self.k.free_irq(dv.irq, h)
                d.pci.release_vectors()
        self.aer.forget()
        self.devs = {}
        return self.cmd_boot(msix)

    def cmd_reprobe(self, slot: int, msix: bool = True) -> dict:
        d = self._dev(slot)
        if d.vdev is not None:
            d.vdev.teardown()
        self._probe(d, msix)
        return d.describe()

    def cmd_flr(self, slot: int, reprobe: bool = True) -> dict:
        """Function Level Reset, then (optionally) bring the driver back up."""
        d = self._dev(slot)
        d.pci.flr()
        status = d.vdev.get_status() if d.vdev is not None else -1
        if d.vdev is not None:
            d.vdev.forget()
        out: dict[str, object] = {"status_after_flr": status}
        if reprobe:
            self._probe(d)
            out["device"] = d.describe()
        return out

    # -- workloads ------------------------------------------------------------------------------------
    def cmd_workload_start(self, blk: dict | None = None, net: dict | None = None,
                           blk_images: dict | None = None) -> dict:
        """*blk_images*: per PCI slot (a string key), what the VMM knows of the image's initial
        content (``blkverify.InitialContent``); a slot it says nothing of is ``unknown``."""
        started = []
        w: BlkWorkload | NetWorkload
        for d in self.devs.values():
            if isinstance(d.driver, VirtioBlkDriver) and blk is not None:
                initial = (blk_images or {}).get(str(d.slot))
                w = BlkWorkload(self.k, d.driver, **blk, initial=initial, read_only=d.driver.read_only)
                w.slot = d.slot  # type: ignore[attr-defined]
                self.workloads.append(w)
                started.append(("blk", d.slot))
            elif isinstance(d.driver, VirtioNetDriver) and net is not None:
                w = NetWorkload(self.k, d.driver, **net)
                w.slot = d.slot  # type: ignore[attr-defined]
                self.workloads.append(w)
                started.append(("net", d.slot))
        for w in self.workloads:
            if not w.futures:
                w.start()
        return {"started": started}

    cmd_workload_start.on_vcpu = False  # type: ignore[attr-defined]

    def cmd_workload_stop(self, timeout: float = 60.0) -> dict:
        results = []
        for w in self.workloads:
            r = w.stop(timeout)
            r["slot"] = w.slot
            results.append(r)
        self.workloads = []
        return {"results": results}

    cmd_workload_stop.on_vcpu = False  # type: ignore[attr-defined]

    def cmd_stats(self) -> dict:
        return {
            "devices": [d.describe() for d in self.devs.values()],
            "workloads": [dict(w.result(), slot=w.slot) for w in self.workloads],
            "interrupts": self.k.proc_interrupts(),
            "spurious": self.k.spurious,
            "pending": self.hv.irqchip.pending(),
        }

    cmd_stats.on_vcpu = False  # type: ignore[attr-defined]

    # -- targeted I/O (tests, scenarios) ------------------------------------------------------------------
    def cmd_blk_io(self, slot: int, op: str, sector: int = 0, nbytes: int = 4096, queue: int = 0,
                   data: str | None = None, fill: int | None = None, timeout: float = 30.0) -> dict:
        drv = self._blk(slot)
        req = BlkRequest(self.k, nbytes)
        try:
            if op == "write":
                payload = bytes.fromhex(data) if data is not None else bytes([fill or 0]) * nbytes
                self.k.memory.write(req.data, payload.ljust(nbytes, b"\0")[:nbytes])
            status = drv.sync_io(req, _BLK_OPS[op], sector, nbytes if op != "flush" else 0, q=queue,
                                 timeout=timeout)
            out: dict[str, object] = {"status": status, "latency_us": (req.t_done - req.t_submit) / 1000}
            if op in ("read", "get-id") and status == 0:
                buf = self.k.memory.read(req.data, nbytes)
                out["crc32"] = zlib.crc32(buf)
                out["data"] = buf[:min(nbytes, 4096)].hex()
            return out
        finally:
            self.k.pages.free(req.hdr)
            if req.data:
                self.k.pages.free(req.data)

    def cmd_blk_submit(self, slot: int, op: str, sector: int = 0, nbytes: int = 4096, queue: int = 0,
                       fill: int = 0, kick: bool = True) -> dict:
        """Submit without waiting; ``kick=False`` publishes the request without ringing the doorbell."""
        drv = self._blk(slot)
        req = BlkRequest(self.k, nbytes)
        if op == "write":
            self.k.memory.write(req.data, bytes([fill]) * nbytes)
        out, inn = drv.prepare(req, _BLK_OPS[op], sector, nbytes if op != "flush" else 0)
        vq = drv.vqs[queue]
        req.queue = queue
        req.t_submit = time.monotonic_ns()
        with vq.lock:
            if not vq.add(out, inn, req):
                raise RuntimeError("queue full")
            needs = vq.kick_prepare() if kick else False
        if needs:
            vq.notify()
        with self._mu:
            self._req_ids += 1
            rid = self._req_ids
            self._reqs[rid] = req
        return {"id": rid, "kicked": bool(kick and needs)}

    def cmd_blk_wait(self, id: int, timeout: float = 10.0) -> dict:
        with self._mu:
            req = self._reqs.get(int(id))
        if req is None:
            raise KeyError(f"no request {id}")
        ok = self.k.halt_until(req.done, timeout)
        if not ok:
            return {"completed": False}
        with self._mu:
            self._reqs.pop(int(id), None)
        out = {"completed": True, "status": req.status_val}
        if req.type == BLK_T_IN and req.status_val == 0:
            out["crc32"] = zlib.crc32(self.k.memory.read(req.data, req.nbytes))
        self.k.pages.free(req.hdr)
        if req.data:
            self.k.pages.free(req.data)
        return out

    def cmd_vq_restart_view(self, slot: int, queue: int = 0) -> dict:
        """Would restarting the device's queue from used.idx be exact? (see ``Vring.restart_view``)"""
        drv = self._dev(slot).driver
        if not isinstance(drv, VirtioBlkDriver):
            raise KeyError(f"no virtio-blk driver in slot {slot}")
        return drv.vqs[int(queue)].restart_view()

    cmd_vq_restart_view.on_vcpu = False  # type: ignore[attr-defined]

    def cmd_kick(self, slot: int, queue: int = 0, width: int = 2) -> dict:
        """The raw doorbell write of queue *queue* (a guest notify write, nothing else)."""
        d = self._dev(slot)
        assert d.vdev is not None
        addr = d.vdev.notify_addr(queue)
        self.k.this_cpu().mmio_write(addr, queue, width)
        return {"addr": addr, "tid": threading.get_native_id(), "pid": _pid()}

    def cmd_msix_mask(self, slot: int, entry: int, masked: bool) -> dict:
        self._dev(slot).pci.msix_mask(int(entry), bool(masked))
        return {}

    def cmd_msix_function_mask(self, slot: int, masked: bool) -> dict:
        self._dev(slot).pci.msix_function_mask(bool(masked))
        return {}

    def cmd_read_pba(self, slot: int) -> dict:
        return {"pba": self._dev(slot).pci.read_pba()}

    def cmd_bus_master(self, slot: int, on: bool) -> dict:
        self._dev(slot).pci.set_master(bool(on))
        return {}

    def cmd_status_write(self, slot: int, value: int) -> dict:
        d = self._dev(slot)
        assert d.vdev is not None
        d.vdev.set_status(int(value))
        return {"status": d.vdev.get_status()}

    def cmd_status_read(self, slot: int) -> dict:
        d = self._dev(slot)
        assert d.vdev is not None
        return {"status": d.vdev.get_status(), "config_changes": d.vdev.config_changes,
                "needs_reset_seen": d.vdev.needs_reset_seen}

    def cmd_net_ping(self, slot: int, pair: int = 0, payload: str = "", timeout: float = 10.0) -> dict:
        d = self._dev(slot)
        drv = d.driver
        if not isinstance(drv, VirtioNetDriver):
            raise TypeError("not a virtio-net device")
        ev = threading.Event()
        got: list = []
        prev = drv.on_receive

        def rx(p: int, pkt: bytes) -> None:
            got.append((p, pkt))
            ev.set()

        drv.on_receive = rx
        try:
            frame = drv.mac + drv.mac + b"\x88\xb6" + bytes.fromhex(payload)
            drv.send(pair, frame)
            ok = self.k.halt_until(ev, timeout)
        finally:
            drv.on_receive = prev
        return {"echoed": ok and bool(got) and got[0][1] == frame, "pair": got[0][0] if got else -1}

    # -- benchmark drivers (kickcall bench notify) ----------------------------------------------------
    def cmd_bench_kick(self, slot: int, queue: int, n: int, stamp_gpa: int, timeout: float = 5.0,
                       raw_eventfd_at: int | None = None) -> dict:
        """Kick *n* times: store CLOCK_MONOTONIC at stamp[0], write the doorbell, wait for the VMM's
        handler to bump stamp[1].  The VMM measures the one-way latency.

        With *raw_eventfd_at*, write the eventfd bound to that address directly instead (no
        doorbell, no hypervisor): the floor between this vCPU thread and the VMM's loop."""
        d = self._dev(slot)
        assert d.vdev is not None
        addr = d.vdev.notify_addr(queue)
        cpu = self.k.this_cpu()
        raw_fd = -1
        if raw_eventfd_at is not None:
            raw_fd = next(e.fd for e in self.hv.ioeventfds.entries() if e.addr == raw_eventfd_at)
        st = self.k.memory.view(stamp_gpa, 16).cast("Q")
        try:
            for _ in range(n):
                ack = st[1]
                st[0] = time.monotonic_ns()
                if raw_fd >= 0:
                    os.eventfd_write(raw_fd, 1)
                else:
                    cpu.mmio_write(addr, queue, 2)
                deadline = time.monotonic() + timeout
                while st[1] == ack:
                    if time.monotonic() > deadline:
                        raise TimeoutError("the VMM did not acknowledge a kick")
        finally:
            st.release()
        return {"kicks": n}

    def cmd_bench_irq_start(self, slot: int, entry: int, stamp_gpa: int) -> dict:
        """Install a timestamping handler on MSI-X entry *entry*: it records now - stamp[0] and bumps
        stamp[1]."""
        d = self._dev(slot)
        irq = d.pci.irq_vector(entry)
        st = self.k.memory.view(stamp_gpa, 16).cast("Q")
        lat: list[int] = []

        def handler(_irq: int) -> bool:
            lat.append(time.monotonic_ns() - st[0])
            st[1] += 1
            return True

        self._bench_irq = (irq, handler, st, lat)
        self.k.request_irq(irq, handler, "bench")
        return {"irq": irq}

    def cmd_nic_bench_irq_start(self, slot: int, queue: int, stamp_gpa: int) -> dict:
        """``kickcall bench vfio``: time arrivals on kickcall-nic queue *queue*'s irq.  A stamping
        handler goes first on the irq (it records now - stamp[0]), ahead of the driver's handler,
        so the figure is the arrival, not the driver's work; an acknowledging handler goes last
        (it bumps stamp[1]), after the driver consumed the record and wrote CONSUMER, so the next
        round starts with the device and the VMM idle.  Stop with ``nic-bench-irq-stop``."""
        d = self._nic(slot).queues[queue].irq
        if d is None:
            raise RuntimeError(f"kickcall-nic queue {queue} has no irq (nic-request-irq first)")
        st = self.k.memory.view(stamp_gpa, 16).cast("Q")
        lat: list[int] = []

        def stamp(_irq: int) -> bool:
            lat.append(time.monotonic_ns() - st[0])
            return True

        def ack(_irq: int) -> bool:
            st[1] += 1
            return True

        self.k.request_irq(d.irq, stamp, "bench-stamp")
        d.handlers.insert(0, d.handlers.pop())  # first: the IRQ core runs a shared irq's handlers in order
        self.k.request_irq(d.irq, ack, "bench-ack")
        self._nic_bench_irq = (d.irq, (stamp, ack), st, lat)
        return {"irq": d.irq}

    def cmd_nic_bench_irq_stop(self) -> dict:
        irq, handlers, st, lat = self._nic_bench_irq
        for h in handlers:
            self.k.free_irq(irq, h)
        st.release()
        return {"latencies_ns": lat}

    def cmd_bench_irq_stop(self) -> dict:
        irq, handler, st, lat = self._bench_irq
        self.k.free_irq(irq, handler)
        st.release()
        return {"latencies_ns": lat}

    def cmd_ping(self) -> dict:
        return {"pid": _pid(), "tid": threading.get_native_id()}


def _pid() -> int:
    return os.getpid()
