"""The guest's side of the Xen interrupt path, end to end: a real Machine with ``hypervisor = "xen"``
and real ``kickcall vfio-user-server`` processes (kickcall-nic functions driven NVMe's way).

* every virtio interrupt goes through an event channel (no LAPIC MSI delivery), and the same
  workload on KVM takes the LAPIC path (the counters are real);
* masking a port (the mask ``disable_irq`` reaches under Xen) during I/O leaves the event pending
  in shared info, and unmasking replays it; the MSI-X entry is not what got masked;
* the NVMe probe pattern on two controllers with the 2017 fix: fresh pirqs, no conflict, every
  record consumed by its own controller;
* pirq exhaustion: pci_alloc_irq_vectors falls back (MSI-X -> MSI -> INTx) as Linux does, and a
  multi-vector MSI is refused down to a single vector (xen_hvm_setup_msi_irqs returns 1).

The reuse-variant reproduction (the device model unmapping on disable) is not here: it needs
the device model's pirq mapping (vfio/pci.py).
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import pytest

from helpers import blk, machine_toml, running_machine, wait_for
from kickcall.hv.abi import HypervisorError
from kickcall.machine.machine import Machine
from vfio_env import vfio_server


def _xen_toml(devices: str, *, hypervisor: str = "xen", nr_pirqs: int = 56) -> str:
    machine = f'hypervisor = "{hypervisor}"\n' + (f"nr-pirqs = {nr_pirqs}\n" if hypervisor == "xen" else "")
    return machine_toml(vcpus=2, devices=machine + devices)


@contextlib.contextmanager
def _nvme_machine(workdir: str, n: int, *, nr_pirqs: int = 56, with_blk: bool = False,
                  queues: int = 4) -> Iterator[tuple[Machine, list[int]]]:
    """A Xen machine with *n* kickcall-nic functions (each its own server); yields (machine, slots)."""
    with contextlib.ExitStack() as stack:
        devs = blk("blk0") if with_blk else ""
        for i in range(n):
            _p, sock, _q = stack.enter_context(vfio_server(workdir, "--vectors", "8", "--queues", str(queues),
                                                           name=f"nvme{i}"))
            devs += f'[[device]]\ntype = "vfio-user"\nid = "nvme{i}"\nsocket = "{sock}"\n'
        m = stack.enter_context(running_machine(_xen_toml(devs, nr_pirqs=nr_pirqs)))
        yield m, [m.passthrough[f"nvme{i}"].devfn >> 3 for i in range(n)]


@pytest.mark.parametrize("hypervisor", ["xen", "kvm"])
def test_virtio_blk_workload_goes_through_event_channels(hypervisor: str) -> None:
    """The data-verified virtio-blk workload: under Xen no interrupt takes the LAPIC/MSI path and
    the upcall carried them; the same workload on KVM takes the LAPIC path (so the counters count)."""
    with running_machine(_xen_toml(blk("blk0", irqfd=False), hypervisor=hypervisor)) as m:
        g0 = m.vm.stats.globals()
        m.start_workload(blk={"depth": 8, "read_ratio": 0.5, "stall_timeout": 15.0})
        wait_for(lambda: m.vm.stats.globals()["msi_injections"] - g0["msi_injections"] > 200, 60)
        (r,) = [x for x in m.stop_workload() if x["kind"] == "blk"]
        assert r["error_count"] == 0, r["errors"]
        assert r["ops"] > 0
        g = m.vm.stats.globals()
        if hypervisor == "xen":
            assert g["msi_lapic_deliveries"] == 0
            assert g["xen_upcalls"] > 0
            info = m.guest_cmd({"cmd": "xen-info"})
            assert info["variant"] == "fresh"
            assert info["upcalls"] > 0 and info["bind_failures"] == 0
            assert sum(i["count"] for i in info["irqs"]) > 0
            assert all(i["port"] for i in info["irqs"] if i["handlers"])
        else:
            assert g["msi_lapic_deliveries"] > 0
            assert g["xen_upcalls"] == 0
            with pytest.raises(HypervisorError, match="not a Xen guest"):
                m.guest_cmd({"cmd": "xen-info"})


def _port_of(m: Machine, slot: int, entry: int) -> dict:
    info = m.guest_cmd({"cmd": "xen-info"})
    (irq,) = [i for i in info["irqs"] if i["slot"] == slot and i["entry"] == entry]
    return irq


def _hv_port(m: Machine, port: int) -> dict:
    (p,) = [p for p in m.vm.xen_query()["ports"] if p["port"] == port]
    return p


@pytest.mark.parametrize("unmask", [True, False])
def test_masked_port_holds_virtio_completion_and_unmask_replays_it(unmask: bool) -> None:
    """A virtio-blk completion that arrives while its port is masked stays pending in shared info
    (the request does not complete); the unmask (EVTCHNOP_unmask) replays it and the request
    completes.  Without the unmask the request stays incomplete."""
    with running_machine(_xen_toml(blk("blk0", irqfd=False))) as m:
        slot = m.slot("blk0")
        vec = m.device("blk0").vdev.queues[0].vector
        port = _port_of(m, slot, vec)["port"]
        assert port
        m.guest_cmd({"cmd": "xen-evtchn-mask", "port": port, "masked": True})
        masked0 = m.vm.stats.globals()["xen_evtchn_pending_masked"]
        sub = m.guest_cmd({"cmd": "blk-submit", "slot": slot, "op": "read", "sector": 0, "nbytes": 4096})
        wait_for(lambda: _hv_port(m, port)["pending"], 30)
        p = _hv_port(m, port)
        assert p["masked"] and p["pending"]
        assert m.vm.stats.globals()["xen_evtchn_pending_masked"] > masked0
        # the MSI-X entry is not what got masked: nothing latched in the device's PBA
        assert m.guest_cmd({"cmd": "read-pba", "slot": slot})["pba"] & (1 << vec) == 0
        if unmask:
            m.guest_cmd({"cmd": "xen-evtchn-mask", "port": port, "masked": False})
            r = m.guest_cmd({"cmd": "blk-wait", "id": sub["id"], "timeout": 30})
            assert r["completed"] and r["status"] == 0
            p = _hv_port(m, port)
            assert not p["pending"] and not p["masked"] and p["replays"] >= 1
        else:
            r = m.guest_cmd({"cmd": "blk-wait", "id": sub["id"], "timeout": 1})
            assert not r["completed"]
            assert _hv_port(m, port)["pending"]


def test_nvme_probe_two_controllers_with_the_fix(workdir: str) -> None:
    """The NVMe probe pattern on two controllers (one vector, admin record, disable, then all
    queues) with fresh pirqs: distinct pirqs, every port bound, each record consumed by its own
    controller, nothing lost, nothing on the wrong device."""
    with _nvme_machine(workdir, 2) as (m, slots):
        assert m.guest_cmd({"cmd": "xen-msi-variant", "reuse": False}) == {"reuse": False}
        pirqs: list[int] = []
        for s in slots:
            r = m.guest_cmd({"cmd": "nvme-probe", "slot": s, "nq": 4})
            assert r["admin"] and r["mode"] == "msix" and r["nvec"] == 4
            pirqs += r["pirqs"]
        assert len(set(pirqs)) == len(pirqs) == 8
        for s in slots:
            for q in range(4):
                r = m.guest_cmd({"cmd": "nvme-io", "slot": s, "queue": q, "n": 3, "timeout": 10})
                assert r == {"consumed": 3, "lost": 0, "wrong_device": 0}
        info = m.guest_cmd({"cmd": "xen-info"})
        assert info["bind_failures"] == 0 and info["pirq_shared"] == 0
        nvme_irqs = [i for i in info["irqs"] if i["slot"] in slots]
        assert len(nvme_irqs) == 8 and all(i["port"] and i["count"] == 3 for i in nvme_irqs)
        for s in slots:
            st = m.guest_cmd({"cmd": "nvme-stats", "slot": s})
            assert st["wrong_device"] == 0 and st["lost"] == 0 and st["consumed"] == 13  # admin + 12


def test_scripted_steps_are_available(workdir: str) -> None:
    """The steps the reuse reproduction scripts (alloc 1, request, free, alloc on the other
    controller, re-alloc, request, I/O on one controller only) answer as documented."""
    with _nvme_machine(workdir, 2, queues=1) as (m, (a, b)):
        m.guest_cmd({"cmd": "xen-msi-variant", "reuse": True})
        ra = m.guest_cmd({"cmd": "nvme-alloc", "slot": a, "nvec": 1})
        assert ra["nvec"] == 1 and ra["mode"] == "msix" and len(ra["pirqs"]) == 1
        m.guest_cmd({"cmd": "nvme-request", "slot": a})
        m.guest_cmd({"cmd": "nvme-free", "slot": a})
        rb = m.guest_cmd({"cmd": "nvme-alloc", "slot": b, "nvec": 1})
        ra2 = m.guest_cmd({"cmd": "nvme-alloc", "slot": a, "nvec": 1})
        assert rb["nvec"] == ra2["nvec"] == 1
        m.guest_cmd({"cmd": "nvme-request", "slot": a})
        m.guest_cmd({"cmd": "nvme-request", "slot": b})
        for s in (a, b):
            r = m.guest_cmd({"cmd": "nvme-io", "slot": s, "queue": 0, "n": 1, "timeout": 10})
            assert set(r) == {"consumed", "lost", "wrong_device"}
        info = m.guest_cmd({"cmd": "xen-info"})
        assert info["variant"] == "reuse"
        assert {"bind_failures", "pirq_shared", "reused", "spurious", "upcalls"} <= set(info)


def test_pirq_exhaustion_falls_back_to_intx(workdir: str) -> None:
    """nr-pirqs 28 leaves 4 MSI pirqs: MSI-X with 8 vectors cannot be set up (-ENODEV after the
    pirqs run out), MSI finds none either, and pci_alloc_irq_vectors ends on INTx -- which still
    works.  (An HVM guest never gives a pirq back; without the device model's unmap the pirqs
    handed out stay allocated.)"""
    with _nvme_machine(workdir, 1, nr_pirqs=28, queues=4) as (m, (s,)):
        r = m.guest_cmd({"cmd": "nvme-alloc", "slot": s, "nvec": 8, "types": "all"})
        assert r["mode"] == "intx" and r["nvec"] == 1 and r["pirqs"] == []
        st = m.guest_cmd({"cmd": "nvme-stats", "slot": s})
        assert st["fallbacks"] == 2
        assert m.guest_cmd({"cmd": "xen-info"})["pirq_alloc_failures"] >= 1
        assert m.vm.xen_query()["free-count"] == 0
        m.guest_cmd({"cmd": "nvme-request", "slot": s})
        for q in range(4):
            r = m.guest_cmd({"cmd": "nvme-io", "slot": s, "queue": q, "n": 2, "timeout": 10})
            assert r["consumed"] == 2 and r["lost"] == 0
        st = m.guest_cmd({"cmd": "nvme-stats", "slot": s})
        # every INTx found its record: no handler of an unbound driver left on the line
        assert st["intx_none"] == 0 and st["consumed"] == 8


def test_multi_vector_msi_is_refused_down_to_one(workdir: str) -> None:
    """xen_hvm_setup_msi_irqs answers 1 to a multi-vector MSI: pci_alloc_irq_vectors retries with a
    single vector, and every queue then shares it."""
    with _nvme_machine(workdir, 1, queues=4) as (m, (s,)):
        r = m.guest_cmd({"cmd": "nvme-alloc", "slot": s, "nvec": 4, "types": "msi"})
        assert r["mode"] == "msi" and r["nvec"] == 1 and len(r["pirqs"]) == 1
        m.guest_cmd({"cmd": "nvme-request", "slot": s})
        for q in range(4):
            r = m.guest_cmd({"cmd": "nvme-io", "slot": s, "queue": q, "n": 2, "timeout": 10})
            assert r == {"consumed": 2, "lost": 0, "wrong_device": 0}
        assert m.vm.stats.globals()["msi_lapic_deliveries"] == 0


def test_stress_small_with_the_fix(workdir: str) -> None:
    """A short concurrent load/unload stress on two controllers with fresh pirqs: no conflict, no
    wrong-device interrupt, no lost record."""
    with _nvme_machine(workdir, 2, nr_pirqs=512, queues=2) as (m, slots):
        r = m.guest_cmd({"cmd": "xen-msi-stress", "slots": slots, "nq": 2, "cycles": 60, "seed": 7,
                         "timeout": 10}, timeout=300)
        assert r["errors"] == []
        assert r["cycles"] == 60
        assert r["modes"] == {"msix": 60}
        assert (r["conflicts"], r["wrong_device"], r["lost"], r["fallbacks"]) == (0, 0, 0, 0)


def test_guest_cmd_errors_are_reported() -> None:
    """Hostile arguments get an error reply, not a crash."""
    with running_machine(_xen_toml(blk("blk0", irqfd=False))) as m:
        for bad in ({"cmd": "xen-evtchn-mask", "port": 0, "masked": True},
                    {"cmd": "xen-evtchn-mask", "port": 1 << 20, "masked": True},
                    {"cmd": "nvme-alloc", "slot": m.slot("blk0"), "nvec": 1},
                    {"cmd": "nvme-alloc", "slot": 31, "nvec": 1, "types": "bogus"}):
            with pytest.raises(HypervisorError):
                m.guest_cmd(bad)
        assert m.guest_cmd({"cmd": "ping"})["pid"] == m.guest_pid
