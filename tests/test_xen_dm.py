"""The device model's side of the Xen flavour (QEMU's hw/xen/xen_pt_msi.c), across processes:
``kickcall vfio-user-server`` (the host function), the VMM (``type = "vfio-user"`` in a machine
with ``hypervisor = "xen"``) and the guest's hypervisor half (here on threads of the test, so the
test can bind event channels in the domain as the Xen guest would).

Today's guest composes native vector messages, so the tests write the pirq messages
(``compose_pirq_msi``) into the MSI-X table themselves, through the machine's MMIO dispatch (what
a vCPU's heavyweight exit runs), and enable or disable MSI-X through the function's config space.

* an entry unmasked with a pirq message is mapped (PHYSDEVOP_map_pirq with the entry's number),
  its eventfd becomes the host trigger, and the host's interrupts reach the pirq's event channel
  with no LAPIC delivery; masked, the interrupt is held in the PBA and the unmask fires the pirq;
* MSI-X disable unmaps every pirq of the function (QEMU >= 2.1.0); with ``xen-unmap-on-disable``
  off (QEMU before 2.1.0) the mapping is kept and a re-enabled entry keeps its old pirq even when
  the guest wrote a different one;
* two devices' entries naming one pirq: Xen's "already mapped" warning is detected and recorded,
  ``x-query-xen-pirqs`` lists the conflict, HMP ``info pirqs`` shows it and ``kickcall diagnose``
  names it; under KVM the command answers "not a Xen domain".
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
from typing import Any, Iterator

import pytest

from helpers import kickcall_argv, machine_toml, wait_for
from kickcall.hv.xen_abi import EvtchnBindPirq, EvtchnOp, compose_pirq_msi
from kickcall.machine.config import parse_config
from kickcall.machine.machine import XEN_FRESH_PIRQ, Machine
from kickcall.monitor.client import QMPClient, QMPCommandError
from kickcall.pci import regs as R
from kickcall.vfio.pci import XEN_UNMAP_ON_DISABLE, VFIOPCIDevice
from vfio_env import monitor, vfio_server

P = 50  # a pirq inside the default 56-entry table (MSI pirqs 24..55)
Q = 40


@contextlib.contextmanager
def xen_machine(workdir: str, n: int = 1, hypervisor: str = "xen") -> Iterator[tuple[Machine, list[str], str]]:
    """A booted machine with *n* passthrough NICs (nic0..), their server monitors, the machine's monitor."""
    with contextlib.ExitStack() as st:
        qmps, devs = [], ""
        for i in range(n):
            _p, sock, qmp = st.enter_context(vfio_server(workdir, "--vectors", "4", name=f"vfu{i}"))
            qmps.append(qmp)
            devs += f'[[device]]\ntype = "vfio-user"\nid = "nic{i}"\nsocket = "{sock}"\n'
        toml = machine_toml(guest="thread", vcpus=2, devices=f'hypervisor = "{hypervisor}"\n' + devs)
        m = Machine(parse_config(toml, "<test>"))
        st.callback(m.stop)
        m.start(boot=True)
        mqmp = os.path.join(workdir, "m.qmp")
        m.start_monitor(mqmp)
        yield m, qmps, mqmp


def dev(m: Machine, name: str) -> VFIOPCIDevice:
    return m.passthrough[name]


def g(m: Machine, name: str, cmd: str, **kw: Any) -> dict:
    return m.guest_cmd({"cmd": cmd, "slot": dev(m, name).devfn >> 3, **kw}, timeout=60)


def table_entry(m: Machine, name: str, v: int) -> int:
    d = dev(m, name)
    assert d.msix is not None
    tbl = d.get32(d.msix.cap + R.PCI_MSIX_TABLE)
    bar = d.bars[tbl & 7]
    assert bar is not None and bar.mapped_at is not None
    return bar.mapped_at + (tbl & ~7) + v * R.PCI_MSIX_ENTRY_SIZE


def write_entry(m: Machine, name: str, v: int, pirq: int | None = None, *, masked: bool) -> None:
    """The guest's MSI-X table writes, through the machine's MMIO dispatch (as a vCPU exit)."""
    a = table_entry(m, name, v)
    with m.bql:
        if pirq is not None:
            m.mmio.write(a + R.PCI_MSIX_ENTRY_VECTOR_CTRL, 1, 4)  # mask while the message changes
            addr, data = compose_pirq_msi(pirq)
            m.mmio.write(a, addr & 0xFFFFFFFF, 4)
            m.mmio.write(a + 4, addr >> 32, 4)
            m.mmio.write(a + 8, data, 4)
        m.mmio.write(a + R.PCI_MSIX_ENTRY_VECTOR_CTRL, 1 if masked else 0, 4)


def msix_enable(m: Machine, name: str, on: bool) -> None:
    d = dev(m, name)
    assert d.msix is not None
    off = d.msix.cap + R.PCI_MSIX_FLAGS
    with m.bql:
        ctl = d.config_read(off, 2)
        d.config_write(off, ctl | R.PCI_MSIX_FLAGS_ENABLE if on else ctl & ~R.PCI_MSIX_FLAGS_ENABLE, 2)


def xq(m: Machine) -> dict:
    return m.vm.xen_query()


def hv_pirq(m: Machine, pirq: int) -> dict:
    return next((p for p in xq(m)["pirqs"] if p["pirq"] == pirq), {"pirq": pirq, "state": "free", "events": 0})


def bind(m: Machine, pirq: int) -> int:
    """The Xen guest's EVTCHNOP_bind_pirq, made in the domain (the guest's hypervisor half)."""
    assert m.guest_hv is not None and m.guest_hv.xen is not None
    arg = EvtchnBindPirq(pirq)
    assert m.guest_hv.xen.event_channel_op(EvtchnOp.BIND_PIRQ, arg) == 0
    return arg.port


def host_interrupt(qmp: str, queue: int = 0) -> None:
    """The host function raises queue *queue*'s vector (its own monitor)."""
    with monitor(qmp) as c:
        c.execute("x-debug-device-event", {"dev": "nic0", "event": "call", "queue": queue})


def xen_vec(m: Machine, name: str, v: int) -> dict:
    return next((x for x in dev(m, name).query_xen() if x["vector"] == v), {})


def bring_up_with_pirq(m: Machine, name: str, pirq: int) -> None:
    """Queue 0 raises vector 0 (the guest driver's request_irq: the Xen guest maps a pirq of its
    own), then MSI-X goes off (the device model unmaps the guest's pirq) and comes back with vector
    0 rewritten with *pirq* and unmasked: the device model maps that one."""
    g(m, name, "nic-request-irq", queue=0)
    msix_enable(m, name, False)
    write_entry(m, name, 0, pirq, masked=True)
    msix_enable(m, name, True)
    write_entry(m, name, 0, masked=False)


def lapic(m: Machine) -> int:
    return int(m.vm.stats.globals()["msi_lapic_deliveries"])


def test_unmask_maps_the_pirq_and_host_interrupts_reach_its_port(workdir: str) -> None:
    """Map on unmask (index -1, the guest's pirq, entry_nr = the vector), the pirq's eventfd is the
    host trigger, a host interrupt is an event on the pirq (no LAPIC delivery); masked, it waits in
    the PBA and the unmask fires the pirq once more."""
    with xen_machine(workdir) as (m, (qmp,), _mqmp):
        bring_up_with_pirq(m, "nic0", P)
        v = xen_vec(m, "nic0", 0)
        assert (v["mapped-pirq"], v["entry-pirq"], v["maps"], v["trigger"], v["warnings"]) == (P, P, 2, "pirq", [])  # the guest's, P
        ent = hv_pirq(m, P)
        assert ent["state"] == "mapped" and ent["owner"] == {"device": "nic0", "vector": 0} and ent["entry"] == 0
        bind(m, P)
        before = lapic(m)
        host_interrupt(qmp)
        wait_for(lambda: hv_pirq(m, P)["events"] >= 1, 30, "the host interrupt on the pirq's port")
        assert lapic(m) == before
        # masked: the VMM holds it in the PBA; the unmask fires the pirq (not signal_msi)
        write_entry(m, "nic0", 0, masked=True)
        assert dev(m, "nic0").vectors[0].trigger.value == "interrupt"
        events = hv_pirq(m, P)["events"]
        host_interrupt(qmp)
        assert dev(m, "nic0").msix is not None
        wait_for(lambda: dev(m, "nic0").msix.is_pending(0), 30, "the PBA bit")  # type: ignore[union-attr]
        assert hv_pirq(m, P)["events"] == events
        write_entry(m, "nic0", 0, masked=False)
        wait_for(lambda: hv_pirq(m, P)["events"] == events + 1, 30, "the pending interrupt, on the pirq")
        assert xen_vec(m, "nic0", 0)["refires"] == 1
        assert xen_vec(m, "nic0", 0)["maps"] == 2  # no new map: the re-fire goes to P
        assert lapic(m) == before
        assert m.vm.stats.globals()["xen_pirq_events"] >= 1


@pytest.mark.parametrize("unmap", [True, False], ids=["qemu-2.1", "xen-unmap-on-disable-off"])
def test_disable_unmaps_every_pirq_or_keeps_them_with_the_switch_off(workdir: str, unmap: bool) -> None:
    """MSI-X disable: QEMU >= 2.1.0 unmaps every pirq of the function and forgets it, so a
    re-enable with another pirq maps that one.  Off (QEMU before 2.1.0): the mapping and the
    entry's pirq stay, and the re-enabled entry keeps the old pirq although the guest wrote a new
    one -- the fixed guest's fresh pirq is never mapped, and its port never hears the device."""
    with xen_machine(workdir) as (m, (qmp,), _mqmp):
        bring_up_with_pirq(m, "nic0", P)
        dev(m, "nic0").faults.set_fix(XEN_UNMAP_ON_DISABLE, unmap)
        write_entry(m, "nic0", 1, P - 1, masked=False)  # a second vector of the function
        assert hv_pirq(m, P)["state"] == hv_pirq(m, P - 1)["state"] == "mapped"
        free0 = xq(m)["free-count"]
        msix_enable(m, "nic0", False)
        v = xen_vec(m, "nic0", 0)
        if unmap:
            assert hv_pirq(m, P)["state"] == hv_pirq(m, P - 1)["state"] == "free"
            assert xq(m)["free-count"] == free0 + 2
            assert (v["mapped-pirq"], v["unmaps"]) == (-1, 2)  # the guest's own pirq, then P
        else:
            assert hv_pirq(m, P)["state"] == hv_pirq(m, P - 1)["state"] == "mapped"
            assert xq(m)["free-count"] == free0
            assert (v["mapped-pirq"], v["unmaps"]) == (P, 1)  # the guest's own pirq only
        # the (fixed) guest comes back with a fresh pirq Q in entry 0
        write_entry(m, "nic0", 0, Q, masked=False)
        msix_enable(m, "nic0", True)
        v = xen_vec(m, "nic0", 0)
        port = bind(m, Q)
        assert port > 0
        host_interrupt(qmp)
        if unmap:
            assert (v["mapped-pirq"], v["maps"]) == (Q, 3)  # the guest's, P, Q
            assert hv_pirq(m, Q)["state"] == "mapped"
            wait_for(lambda: hv_pirq(m, Q)["events"] >= 1, 30, "the host interrupt on the fresh pirq")
        else:
            assert (v["mapped-pirq"], v["guest-pirq-at-unmask"], v["maps"]) == (P, Q, 2)  # the guest's, P
            assert hv_pirq(m, Q)["state"] != "mapped"
            wait_for(lambda: hv_pirq(m, P)["events"] + hv_pirq(m, P)["dropped"] >= 1, 30,
                     "the host interrupt, on the old pirq")
            assert hv_pirq(m, Q)["events"] == 0


@pytest.mark.parametrize("order", ["both-live", "seed-interleaving"])
def test_two_devices_on_one_pirq_are_reported_and_named_by_diagnose(workdir: str, order: str) -> None:
    """nic0 and nic1 both end up with pirq P in vector 0.  ``both-live``: nic1 maps P while nic0 has
    it (Xen warns and answers 0).  ``seed-interleaving``: nic0 maps P, disables (P unmapped), nic1
    maps P, nic0 re-enables reusing P.  Either way the map warning is recorded on the late vector,
    its host interrupts reach no port while the owner's reach P's, and x-query-xen-pirqs, HMP and
    diagnose name the pirq and both devices."""
    with xen_machine(workdir, n=2) as (m, qmps, mqmp):
        if order == "both-live":
            bring_up_with_pirq(m, "nic0", P)
            bring_up_with_pirq(m, "nic1", P)
            late, owner = "nic1", "nic0"
        else:
            bring_up_with_pirq(m, "nic0", P)
            msix_enable(m, "nic0", False)
            assert hv_pirq(m, P)["state"] == "free"
            bring_up_with_pirq(m, "nic1", P)
            msix_enable(m, "nic0", True)  # entry 0 still names P, unmasked: the reuse
            late, owner = "nic0", "nic1"
        w = xen_vec(m, late, 0)["warnings"]
        assert len(w) == 1 and w[0]["pirq"] == P and w[0]["owner"] == {"device": owner, "vector": 0}, w
        assert hv_pirq(m, P)["owner"] == {"device": owner, "vector": 0}
        assert xq(m)["counters"]["map-conflicts"] == 1
        bind(m, P)
        # the late device's interrupt reaches nobody; the owner's reaches P's port
        host_interrupt(qmps[int(late[-1])])
        host_interrupt(qmps[int(owner[-1])])
        wait_for(lambda: hv_pirq(m, P)["events"] == 1, 30, "the owner's interrupt on P")
        with QMPClient(mqmp, timeout=30) as c:
            c.connect()
            q = c.execute("x-query-xen-pirqs")
            hmp = c.execute("human-monitor-command", {"command-line": "info pirqs"})
        (conf,) = q["conflicts"]
        assert conf["pirq"] == P and conf["text"] == f"pirq {P} is claimed by nic0 vector 0 and nic1 vector 0"
        assert {(x["device"], x["vector"]) for x in conf["claims"]} == {("nic0", 0), ("nic1", 0)}
        assert f"CONFLICT pirq {P} is claimed by nic0 vector 0 and nic1 vector 0" in hmp
        (ent,) = [p for p in q["hypervisor"]["pirqs"] if p["pirq"] == P]
        assert {x["device"] for x in ent["device-model"]} == {"nic0", "nic1"}
        p = subprocess.run(kickcall_argv("diagnose", "--qmp", mqmp, "--interval", "0.25", "--json"),
                           capture_output=True, text=True, timeout=120,
                           env=dict(os.environ, PYTHONPATH=os.path.join(os.path.dirname(__file__), "..", "src")))
        assert p.returncode == 1 and "Traceback" not in p.stderr, p.stderr
        rep = json.loads(p.stdout)
        named = [x for x in rep["queues"] if x["path"] in ("nic0", "nic1") and x["queue"] == 0]
        assert {x["path"] for x in named if x["verdict"] == "pirq claimed by two devices"} == {"nic0", "nic1"}, named
        assert all(x["summary"] == conf["text"] for x in named if x["verdict"] == "pirq claimed by two devices")


def test_one_device_one_pirq_is_no_conflict(workdir: str) -> None:
    """Each device on its own pirq: no conflict, no warning, diagnose does not say PIRQ_SHARED."""
    with xen_machine(workdir, n=2) as (m, _qmps, _mqmp):
        bring_up_with_pirq(m, "nic0", P)
        bring_up_with_pirq(m, "nic1", Q)
        q = m.query_xen_pirqs()
        assert q["conflicts"] == [] and q["hypervisor"]["counters"]["map-conflicts"] == 0
        assert xen_vec(m, "nic0", 0)["warnings"] == xen_vec(m, "nic1", 0)["warnings"] == []


def test_kvm_refuses_x_query_xen_pirqs(workdir: str) -> None:
    with xen_machine(workdir, hypervisor="kvm") as (m, _qmps, mqmp):
        assert not dev(m, "nic0").xen
        with QMPClient(mqmp, timeout=30) as c:
            c.connect()
            with pytest.raises(QMPCommandError) as ei:
                c.execute("x-query-xen-pirqs")
            assert "not a Xen domain" in str(ei.value)
            assert "not a Xen domain" in c.execute("human-monitor-command", {"command-line": "info pirqs"})


def test_fresh_pirq_switch_reports_the_guest_answer(workdir: str) -> None:
    """The machine's ``xen-fresh-pirq`` switch changes and tells the guest; a guest that cannot
    take the command (today's) is reported, not raised."""
    with xen_machine(workdir) as (m, _qmps, _mqmp):
        res = m.faults.arm(XEN_FRESH_PIRQ, "off")
        assert res["fix"] == "off" and res["guest"]["reuse"] is True
        assert res["guest"]["sent"] or "error" in res["guest"]
        assert m.query_xen_pirqs()["guest-msi-variant"]["fix"] == "off"
