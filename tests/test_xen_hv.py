"""The Xen flavour's hypervisor half: XenHypervisor in-process and through the real channel.

What is asserted is Xen's own semantics (``xen/arch/x86/irq.c``, ``physdev.c``,
``common/event_channel.c``, ``event_2l.c``, ``hvm_inject_msi``): the answers a hypercall gives,
that a failing one changes nothing, the top-down pirq allocator, the "already mapped" warning
that succeeds, the 2-level event channel delivery with its upcall, coalescing and unmask replay,
and the emulated MSI path.  Every assertion names exact values, so each can fail.
"""

from __future__ import annotations

import errno
import json
import logging
import os
from dataclasses import dataclass, field
from typing import Any, Callable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from helpers import fd_count, wait_for
from test_hv import HV
from kickcall.hv import abi, socketpair, xen
from kickcall.hv.abi import HypervisorError
from kickcall.hv.kernel import KernelHV
from kickcall.hv.stats import HvStats
from kickcall.hv.vmm import VM
from kickcall.hv.xen import Caller, XenHypervisor
from kickcall.hv.xen_abi import (
    DOMID_SELF, EVTCHN_MASK_OFF, EVTCHN_PENDING_OFF, HYPERVISOR_CALLBACK_VECTOR, EvtchnBindIpi, EvtchnBindPirq,
    EvtchnClose, EvtchnOp, EvtchnSend, EvtchnStatus, EvtchnUnmask, MapPirqType, PhysdevGetFreePirq,
    PhysdevMapPirq, PhysdevOp, PhysdevUnmapPirq, compose_pirq_msi,
)
from kickcall.loop import IOThread
from kickcall.memory import GuestMemory

DOMID = 1
OTHER_DOMID = 2
NR = 28  # MSI pirqs 27..24: small enough to exhaust
SHINFO = 0x10000
CB = HYPERVISOR_CALLBACK_VECTOR
DM = Caller.DEVICE_MODEL
GUEST = Caller.GUEST
CEIL = 30.0


# ==================================================================================================
# an in-process domain
# ==================================================================================================

@dataclass
class Dom:
    x: XenHypervisor
    mem: GuestMemory
    loop: IOThread | None
    stats: HvStats
    upcalls: list[tuple[int, int]] = field(default_factory=list)  # (vcpu, vector) raised
    lapic: list[tuple[int, int]] = field(default_factory=list)  # (address, data) to deliver_msi
    efds: list[int] = field(default_factory=list)  # the test's ends of host interrupts

    # -- the device model's hypercalls --------------------------------------------------------------
    def get_free(self, type: int = MapPirqType.MSI, caller: Caller = GUEST) -> tuple[int, int]:
        a = PhysdevGetFreePirq(type)
        return self.x.physdev_op(PhysdevOp.GET_FREE_PIRQ, a, caller=caller), a.pirq

    def host_irq(self) -> tuple[int, int]:
        """A host interrupt: (the test's eventfd to fire it, a dup the domain takes over)."""
        e = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self.efds.append(e)
        return e, os.dup(e)

    def map(self, pirq: int, *, devfn: int = 8, entry: int = 0, domid: int = DOMID, caller: Caller = DM,
            with_fd: bool = True, type: int = MapPirqType.MSI, owner: dict | None = None) -> tuple[int, int, int]:
        """PHYSDEVOP_map_pirq with a fresh host interrupt: (rc, OUT pirq, the test's eventfd or -1)."""
        e, fd = self.host_irq() if with_fd else (-1, None)
        a = PhysdevMapPirq(domid=domid, type=type, pirq=pirq, bus=0, devfn=devfn, entry_nr=entry)
        rc = self.x.physdev_op(PhysdevOp.MAP_PIRQ, a, caller=caller, fd=fd,
                               owner=owner if owner is not None else {"device": f"dev{devfn}", "vector": entry})
        return rc, a.pirq, e

    def unmap(self, pirq: int, *, domid: int = DOMID, caller: Caller = DM) -> int:
        return self.x.physdev_op(PhysdevOp.UNMAP_PIRQ, PhysdevUnmapPirq(domid, pirq), caller=caller)

    # -- the guest's -----------------------------------------------------------------------------------
    def bind(self, pirq: int) -> tuple[int, int]:
        a = EvtchnBindPirq(pirq)
        return self.x.event_channel_op(EvtchnOp.BIND_PIRQ, a), a.port

    def close_port(self, port: int) -> int:
        return self.x.event_channel_op(EvtchnOp.CLOSE, EvtchnClose(port))

    def unmask(self, port: int) -> int:
        return self.x.event_channel_op(EvtchnOp.UNMASK, EvtchnUnmask(port))

    def mask(self, port: int) -> None:
        """The guest's own ``sync_set_bit`` on evtchn_mask (no hypercall)."""
        assert self.x.shared is not None
        self.x.shared.test_and_set_mask(port)

    def pirq(self, pirq: int) -> dict | None:
        return next((p for p in self.x.query()["pirqs"] if p["pirq"] == pirq), None)

    def port(self, port: int) -> dict | None:
        return next((c for c in self.x.query()["ports"] if c["port"] == port), None)

    def fire(self, efd: int) -> None:
        os.eventfd_write(efd, 1)

    def settle(self) -> None:
        """Wait until the loop has finished whatever handler is running now (one loop thread)."""
        if self.loop is not None:
            self.loop.run_sync(lambda: None)

    def g(self, name: str) -> int:
        return self.stats.globals()[name]


def make_dom(nr_pirqs: int = NR, *, loop: bool = True, shared: bool = True) -> Dom:
    mem = GuestMemory.create(1 << 20)
    lp = IOThread("xen-test", thread_name="kc-xen-test").start() if loop else None
    stats = HvStats()
    d: Dom

    def deliver_msi(address: int, data: int) -> bool:  # the local APIC path (vmsi_deliver)
        d.lapic.append((address, data))
        return True

    x = XenHypervisor(mem, domid=DOMID, nr_pirqs=nr_pirqs, nvcpus=2,
                      raise_vector=lambda cpu, v: d.upcalls.append((cpu, v)),
                      deliver_msi=deliver_msi, loop=lp, stats=stats)
    d = Dom(x, mem, lp, stats)
    if shared:
        assert x.set_shared_info(SHINFO) == 0
        assert x.set_callback_vector(CB) == 0
    return d


def close_dom(d: Dom) -> None:
    d.x.close()
    if d.loop is not None:
        d.loop.stop()
    for e in d.efds:
        os.close(e)
    d.stats.close()
    d.mem.close()


@pytest.fixture
def dom():
    d = make_dom()
    try:
        yield d
    finally:
        close_dom(d)


def view(q: dict) -> dict:
    """query() minus what a failing hypercall may legitimately touch: the hypercall tally and the
    console (Xen's dprintk, and the warnings counter that counts its warnings)."""
    q = dict(q)
    q.pop("hypercalls")
    q.pop("console")
    q["counters"] = {k: v for k, v in q["counters"].items() if k != "warnings"}
    return q


def populated(d: Dom) -> dict[str, int]:
    """A domain with something in every state: an allocated pirq, a mapped+bound one, a mapped
    unbound one, an emulated one, an IPI port.  Returns the names."""
    _, alloc = d.get_free()  # 27
    _, mapped = d.get_free()  # 26
    assert d.map(mapped)[0] == 0
    _, port = d.bind(mapped)
    _, unbound = d.get_free()  # 25
    assert d.map(unbound, devfn=16)[0] == 0
    emu_port = d.bind(24)[1]
    assert d.x.inject_msi(*compose_pirq_msi(24)) is True
    ipi = EvtchnBindIpi(0)
    assert d.x.event_channel_op(EvtchnOp.BIND_IPI, ipi) == 0
    return {"allocated": alloc, "mapped": mapped, "port": port, "unbound": unbound, "emulated": 24,
            "emu_port": emu_port, "ipi": ipi.port}


def unchanged(d: Dom, fn: Callable[..., Any], *args: Any, **kw: Any) -> Any:
    """Run a hypercall; assert it changed nothing but the tally and console; return what it returned."""
    before = view(d.x.query())
    rc = fn(*args, **kw)
    assert view(d.x.query()) == before
    return rc


# ==================================================================================================
# Xen's own answers, each changing nothing else
# ==================================================================================================

@pytest.mark.parametrize("pirq", [NR, NR + 100, 0, -2])
def test_map_out_of_range_pirq_is_einval(dom, pirq):
    populated(dom)
    e, dup = dom.host_irq()
    before = fd_count()
    rc = unchanged(dom, lambda: dom.x.physdev_op(
        PhysdevOp.MAP_PIRQ, PhysdevMapPirq(DOMID, MapPirqType.MSI, pirq=pirq, devfn=40), caller=DM, fd=dup))
    assert rc == -errno.EINVAL
    assert fd_count() == before - 1  # the domain closed the host interrupt it did not take


@pytest.mark.parametrize("pirq", [NR, NR + 100, 0, -1])
def test_unmap_out_of_range_pirq_is_einval(dom, pirq):
    populated(dom)
    assert unchanged(dom, dom.unmap, pirq) == -errno.EINVAL


@pytest.mark.parametrize("pirq", [NR, NR + 100, -1])
def test_bind_pirq_out_of_range_is_einval(dom, pirq):
    populated(dom)
    a = EvtchnBindPirq(pirq)
    assert unchanged(dom, dom.x.event_channel_op, EvtchnOp.BIND_PIRQ, a) == -errno.EINVAL
    assert a.port == 0  # no OUT field written


def test_unmap_of_unmapped_pirq_is_einval_and_logged(dom):
    names = populated(dom)
    for pirq in (names["allocated"], 20, names["emulated"]):  # allocated, never used, emulated
        assert unchanged(dom, dom.unmap, pirq) == -errno.EINVAL
        assert dom.x.query()["console"][-1]["msg"] == f"pirq {pirq} not mapped"
    assert dom.pirq(names["allocated"])["state"] == "allocated"
    assert dom.pirq(names["emulated"])["state"] == "emulated"


def test_double_bind_is_eexist_and_the_first_port_keeps_the_pirq(dom):
    names = populated(dom)
    a = EvtchnBindPirq(names["mapped"])
    assert unchanged(dom, dom.x.event_channel_op, EvtchnOp.BIND_PIRQ, a) == -errno.EEXIST
    assert a.port == 0
    assert dom.pirq(names["mapped"])["port"] == names["port"]
    assert dom.port(names["port"])["pirq"] == names["mapped"]


def test_get_free_pirq_exhaustion_is_enospc():
    d = make_dom(nr_pirqs=26)  # two MSI pirqs: 25, 24
    try:
        assert d.get_free() == (0, 25)
        assert d.get_free() == (0, 24)
        a = PhysdevGetFreePirq(MapPirqType.MSI, pirq=0)
        assert unchanged(d, d.x.physdev_op, PhysdevOp.GET_FREE_PIRQ, a) == -errno.ENOSPC
        assert a.pirq == 0
        assert d.x.query()["free"] == []
        # a map asking for any pirq (-1) is refused the same way and closes its fd
        e, dup = d.host_irq()
        n = fd_count()
        rc = unchanged(d, lambda: d.x.physdev_op(PhysdevOp.MAP_PIRQ, PhysdevMapPirq(DOMID, MapPirqType.MSI),
                                                 caller=DM, fd=dup))
        assert rc == -errno.ENOSPC
        assert fd_count() == n - 1
    finally:
        close_dom(d)


@pytest.mark.parametrize("caller", [DM, GUEST])
@pytest.mark.parametrize("domid", [OTHER_DOMID, 0])
def test_another_domains_id_is_eperm(dom, caller, domid):
    names = populated(dom)
    e, dup = dom.host_irq()
    rc = unchanged(dom, lambda: dom.x.physdev_op(
        PhysdevOp.MAP_PIRQ, PhysdevMapPirq(domid, MapPirqType.MSI, pirq=-1, devfn=40), caller=caller, fd=dup))
    assert rc == -errno.EPERM
    assert unchanged(dom, dom.unmap, names["mapped"], domid=domid, caller=caller) == -errno.EPERM
    assert dom.pirq(names["mapped"])["state"] == "mapped"


def test_device_model_cannot_name_itself_with_domid_self(dom):
    names = populated(dom)
    assert unchanged(dom, dom.unmap, names["mapped"], domid=DOMID_SELF, caller=DM) == -errno.EPERM


@pytest.mark.parametrize("domid", [DOMID_SELF, DOMID])
@pytest.mark.parametrize("with_fd", [True, False])
def test_guest_mapping_msi_is_eperm(dom, domid, with_fd):
    populated(dom)
    n = fd_count()
    dup = dom.host_irq()[1] if with_fd else None
    rc = unchanged(dom, lambda: dom.x.physdev_op(
        PhysdevOp.MAP_PIRQ, PhysdevMapPirq(domid, MapPirqType.MSI, pirq=23, devfn=40), caller=GUEST, fd=dup))
    assert rc == -errno.EPERM
    assert fd_count() == n + (1 if with_fd else 0)  # only the test's own eventfd remains


def test_guest_unmapping_a_mapped_pirq_is_eperm(dom):
    names = populated(dom)
    assert unchanged(dom, dom.unmap, names["mapped"], domid=DOMID_SELF, caller=GUEST) == -errno.EPERM


def test_device_model_map_without_a_host_interrupt_is_eperm(dom):
    populated(dom)
    assert unchanged(dom, dom.map, 23, with_fd=False)[0] == -errno.EPERM


@pytest.mark.parametrize("type", [MapPirqType.GSI, MapPirqType.MULTI_MSI, MapPirqType.UNKNOWN, 9])
def test_unmodelled_map_types_are_einval(dom, type):
    populated(dom)
    assert unchanged(dom, dom.map, 23, type=type)[0] == -errno.EINVAL


def test_close_of_a_closed_port_is_einval(dom):
    names = populated(dom)
    assert dom.close_port(names["port"]) == 0
    assert unchanged(dom, dom.close_port, names["port"]) == -errno.EINVAL
    assert unchanged(dom, dom.close_port, 999) == -errno.EINVAL
    assert unchanged(dom, dom.close_port, 0) == -errno.EINVAL


def test_send_on_a_pirq_port_is_einval(dom):
    names = populated(dom)
    assert unchanged(dom, dom.x.event_channel_op, EvtchnOp.SEND, EvtchnSend(names["port"])) == -errno.EINVAL
    assert dom.port(names["port"])["pending"] is False
    assert dom.port(names["port"])["sets"] == 0
    # an IPI port is sent to: the contrast
    assert dom.x.event_channel_op(EvtchnOp.SEND, EvtchnSend(names["ipi"])) == 0
    assert dom.port(names["ipi"])["pending"] is True


@pytest.mark.parametrize("cmd", [99, -1, PhysdevOp.EOI])
def test_unknown_physdev_op_is_enosys(dom, cmd):
    populated(dom)
    e, dup = dom.host_irq()
    n = fd_count()
    assert unchanged(dom, dom.x.physdev_op, cmd, object(), caller=DM, fd=dup) == -errno.ENOSYS
    assert fd_count() == n - 1


@pytest.mark.parametrize("cmd", [99, EvtchnOp.BIND_VIRQ, EvtchnOp.BIND_INTERDOMAIN, EvtchnOp.ALLOC_UNBOUND,
                                 EvtchnOp.RESET])
def test_unknown_or_unmodelled_evtchn_op_is_enosys(dom, cmd):
    populated(dom)
    assert unchanged(dom, dom.x.event_channel_op, cmd, object()) == -errno.ENOSYS


def test_known_op_with_the_wrong_argument_is_einval(dom):
    populated(dom)
    assert unchanged(dom, dom.x.physdev_op, PhysdevOp.MAP_PIRQ, PhysdevUnmapPirq(DOMID, 26), caller=DM) \
        == -errno.EINVAL
    assert unchanged(dom, dom.x.event_channel_op, EvtchnOp.CLOSE, EvtchnSend(1)) == -errno.EINVAL


def test_status_reports_a_pirq_port(dom):
    names = populated(dom)
    s = EvtchnStatus(names["port"])
    assert dom.x.event_channel_op(EvtchnOp.STATUS, s) == 0
    assert (s.status, s.pirq) == (3, names["mapped"])  # EVTCHNSTAT_pirq
    s = EvtchnStatus(names["port"], dom=OTHER_DOMID)
    assert unchanged(dom, dom.x.event_channel_op, EvtchnOp.STATUS, s) == -errno.EPERM


# ==================================================================================================
# the pirq allocator and Xen's "already mapped" warning
# ==================================================================================================

def test_get_free_pirq_is_top_down_and_a_freed_pirq_comes_back_first(dom):
    assert [dom.get_free() for _ in range(3)] == [(0, 27), (0, 26), (0, 25)]
    assert dom.x.query()["free"] == [24]
    assert dom.map(26)[0] == 0
    assert dom.map(25, devfn=16)[0] == 0
    assert dom.unmap(25) == 0
    assert dom.unmap(26) == 0
    assert dom.x.query()["free"] == [24, 25, 26]
    assert dom.get_free() == (0, 26)  # the highest free one: the pirq just freed
    assert dom.get_free() == (0, 25)
    assert dom.get_free() == (0, 24)
    assert dom.get_free()[0] == -errno.ENOSPC


def test_get_free_pirq_gsi_type_hands_out_16_up(dom):
    assert dom.get_free(MapPirqType.GSI) == (0, 16)
    assert dom.get_free(MapPirqType.GSI) == (0, 17)
    assert dom.x.query()["free-count"] == NR - 24  # the MSI pool is untouched


def test_map_any_pirq_takes_the_top_free_one(dom):
    assert dom.map(-1)[:2] == (0, 27)
    assert dom.map(-1, devfn=16)[:2] == (0, 26)
    assert dom.pirq(27)["state"] == "mapped" and dom.pirq(26)["state"] == "mapped"


def test_map_of_an_already_mapped_pirq_warns_succeeds_and_changes_nothing(dom):
    assert dom.get_free() == (0, 27)
    rc, pirq, first = dom.map(27, devfn=8, entry=0)
    assert (rc, pirq) == (0, 27)
    _, port = dom.bind(27)
    before = view(dom.x.query())
    n = fd_count()
    rc, pirq, second = dom.map(27, devfn=16, entry=3, owner={"device": "B", "vector": 3})
    assert (rc, pirq) == (0, 27)
    assert fd_count() == n + 1  # the test's eventfd; the domain closed its dup of the second interrupt
    after = view(dom.x.query())
    assert after["counters"]["map-conflicts"] == 1
    after["counters"]["map-conflicts"] = 0
    assert after == before
    assert dom.pirq(27)["owner"] == {"device": "dev8", "vector": 0}
    assert dom.pirq(27)["devfn"] == 8
    msg = dom.x.query()["console"][-1]
    assert msg["level"] == "warning"
    assert msg["msg"] == "pirq 27 or irq 00:02.0/3 already mapped (27,00:01.0/0)"
    # the first owner's interrupt still arrives, the second's goes nowhere
    dom.fire(second)
    dom.fire(first)
    wait_for(lambda: dom.pirq(27)["events"] == 1, CEIL, "the first owner's event")
    dom.settle()
    assert dom.pirq(27)["events"] == 1
    assert dom.g("xen_pirq_events") == 1
    assert dom.upcalls == [(0, CB)]
    assert port


@pytest.mark.parametrize("requested", [26, -1])
def test_same_host_entry_mapped_to_a_second_pirq_warns_and_changes_nothing(dom, requested):
    assert dom.map(27, devfn=8, entry=2)[:2] == (0, 27)
    before = view(dom.x.query())
    n = fd_count()
    rc, pirq, _ = dom.map(requested, devfn=8, entry=2)
    assert (rc, pirq) == (0, 26)
    assert fd_count() == n + 1
    after = view(dom.x.query())
    assert after["counters"]["map-conflicts"] == 1
    after["counters"]["map-conflicts"] = 0
    assert after == before  # 26 is still free (Xen's allocate_pirq does not mark it: map_domain_pirq does)
    assert dom.x.query()["console"][-1]["msg"] == "pirq 26 or irq 00:01.0/2 already mapped (27,00:01.0/2)"
    assert dom.get_free() == (0, 26)


def test_auto_assigned_pirq_stays_free_on_a_map_warning(dom):
    """map(pirq=-1) that hits "already mapped": Xen's allocate_pirq picked a free pirq without
    marking it, so the warning leaves it free (a picked pirq left allocated would shrink the pool
    on every such map, and nothing would give it back)."""
    assert dom.map(27, devfn=8, entry=2)[:2] == (0, 27)
    got = [dom.map(-1, devfn=8, entry=2)[:2] for _ in range(3)]
    assert dom.x.query()["counters"]["map-conflicts"] == 3
    assert got == [(0, 26), (0, 26), (0, 26)]
    assert dom.pirq(26) is None
    assert dom.x.query()["free"] == [24, 25, 26]


def test_unmap_then_remap_gives_the_pirq_to_the_new_owner_and_keeps_its_port(dom):
    """The seed's mechanism, hypervisor side: the port stays bound across unmap and re-map."""
    _, a_irq = dom.map(-1, devfn=8)[1:]
    _, port = dom.bind(27)
    assert dom.unmap(27) == 0
    assert dom.pirq(27)["state"] == "free" and dom.pirq(27)["port"] == port
    dom.fire(a_irq)  # A's old interrupt: nobody polls it any more
    rc, pirq, b_irq = dom.map(-1, devfn=16, owner={"device": "B", "vector": 0})
    assert (rc, pirq) == (0, 27)
    dom.fire(b_irq)
    wait_for(lambda: dom.pirq(27)["events"] == 1, CEIL, "B's event on the reused pirq")
    dom.settle()
    assert dom.pirq(27)["owner"] == {"device": "B", "vector": 0}
    assert dom.port(port)["sets"] == 1


# ==================================================================================================
# event delivery
# ==================================================================================================

def sel(d: Dom, vcpu: int = 0) -> int:
    return d.mem.read_u64(SHINFO + vcpu * 64 + 8)


def test_host_interrupt_sets_pending_and_raises_one_upcall_coalescing(dom):
    _, _, efd = dom.map(-1)
    _, port = dom.bind(27)
    assert port == 1
    dom.fire(efd)
    wait_for(lambda: dom.upcalls, CEIL, "the upcall")
    dom.settle()
    assert dom.upcalls == [(0, CB)]
    assert dom.x.shared.upcall_pending(0) is True
    assert dom.mem.read_u64(SHINFO + EVTCHN_PENDING_OFF) == 1 << port
    assert dom.mem.read_u64(SHINFO + EVTCHN_MASK_OFF) == 0
    assert sel(dom) == 1  # word 0
    # the same port again while pending: coalesced in the pending bit
    dom.fire(efd)
    wait_for(lambda: dom.port(port)["sets"] == 2, CEIL, "the second event")
    dom.settle()
    assert dom.upcalls == [(0, CB)]
    # the guest consumed the port and the selector but left evtchn_upcall_pending set: a new event
    # sets pending and the selector, and raises no second upcall
    assert dom.x.shared.xchg_sel(0) == 1
    assert dom.x.shared.test_and_clear_pending(port) is True
    dom.fire(efd)
    wait_for(lambda: dom.port(port)["sets"] == 3, CEIL, "the third event")
    dom.settle()
    assert dom.upcalls == [(0, CB)]
    assert dom.port(port)["pending"] is True and sel(dom) == 1
    # the guest's handler clears evtchn_upcall_pending: the next event raises the upcall again
    dom.x.shared.clear_upcall_pending(0)
    assert dom.x.shared.test_and_clear_pending(port) is True
    assert dom.x.shared.xchg_sel(0) == 1
    dom.fire(efd)
    wait_for(lambda: len(dom.upcalls) == 2, CEIL, "the second upcall")
    g = dom.stats.globals()
    assert (g["xen_pirq_events"], g["xen_evtchn_set_pending"], g["xen_upcalls"]) == (4, 4, 2)
    assert dom.pirq(27)["events"] == 4
    assert g["msi_lapic_deliveries"] == 0 and dom.lapic == []


def test_masked_port_stays_pending_and_unmask_replays_it(dom):
    _, _, efd = dom.map(-1)
    _, port = dom.bind(27)
    dom.mask(port)
    dom.fire(efd)
    wait_for(lambda: dom.port(port)["sets"] == 1, CEIL, "the event on the masked port")
    dom.settle()
    assert dom.upcalls == []
    assert dom.port(port)["pending"] is True and dom.port(port)["masked"] is True
    assert dom.x.shared.upcall_pending(0) is False and sel(dom) == 0
    assert dom.g("xen_evtchn_pending_masked") == 1
    assert dom.unmask(port) == 0
    assert dom.upcalls == [(0, CB)]
    assert dom.port(port)["replays"] == 1
    assert dom.port(port)["masked"] is False and dom.port(port)["pending"] is True
    assert sel(dom) == 1 and dom.x.shared.upcall_pending(0) is True
    # unmasking a port with nothing pending replays nothing
    assert dom.x.shared.test_and_clear_pending(port) is True
    dom.x.shared.clear_upcall_pending(0)
    dom.x.shared.xchg_sel(0)
    dom.mask(port)
    assert dom.unmask(port) == 0
    assert dom.upcalls == [(0, CB)]
    assert dom.port(port)["replays"] == 1


def test_pirq_without_a_port_drops_the_event_and_counts_it(dom):
    _, _, efd = dom.map(-1)
    dom.fire(efd)
    wait_for(lambda: dom.pirq(27)["dropped"] == 1, CEIL, "the dropped event")
    dom.settle()
    assert dom.g("xen_pirq_drops") == 1
    assert dom.g("xen_pirq_events") == 1
    assert dom.g("xen_evtchn_set_pending") == 0
    assert dom.pirq(27)["events"] == 0
    assert dom.upcalls == []
    assert dom.mem.read_u64(SHINFO + EVTCHN_PENDING_OFF) == 0


def test_inject_msi_binds_the_pirq_as_emulated_on_first_delivery(dom):
    assert dom.get_free() == (0, 27)
    _, port = dom.bind(27)
    addr, data = compose_pirq_msi(27)
    assert dom.pirq(27)["state"] == "allocated"
    assert dom.x.inject_msi(addr, data) is True
    assert dom.pirq(27)["state"] == "emulated"
    assert dom.upcalls == [(0, CB)]
    assert dom.port(port)["pending"] is True
    assert dom.x.inject_msi(addr, data) is True  # coalesced in the pending bit
    assert dom.upcalls == [(0, CB)]
    assert dom.pirq(27)["events"] == 2
    assert dom.g("xen_emulated_msis") == 2
    assert dom.x.query()["counters"]["emulated-msis"] == 2
    assert [c["msg"] for c in dom.x.query()["console"]].count("pirq 27 bound to the emulated MSI path") == 1
    # emulated is not free: get_free_pirq skips it, and no unmap frees it
    assert dom.get_free() == (0, 26)
    assert dom.unmap(27) == -errno.EINVAL
    assert dom.g("msi_lapic_deliveries") == 0 and dom.lapic == []


def test_inject_msi_on_a_pirq_without_a_port_binds_it_and_drops(dom):
    addr, data = compose_pirq_msi(25)
    assert dom.x.inject_msi(addr, data) is False
    assert dom.pirq(25)["state"] == "emulated"
    assert dom.pirq(25)["dropped"] == 1
    assert dom.g("xen_pirq_drops") == 1
    assert dom.upcalls == []


def test_inject_msi_with_a_vector_goes_to_the_lapic_and_counts(dom):
    addr, data = 0xFEE01000, 0x4041  # dest 1, vector 0x41
    assert dom.x.inject_msi(addr, data) is True
    assert dom.lapic == [(addr, data)]
    assert dom.x.query()["counters"]["lapic-msis"] == 1
    assert dom.upcalls == []
    assert dom.g("xen_emulated_msis") == 0


def test_inject_msi_naming_a_passthrough_pirq_is_dropped(dom):
    _, _, efd = dom.map(-1)
    _, port = dom.bind(27)
    before = dom.pirq(27)
    assert dom.x.inject_msi(*compose_pirq_msi(27)) is False
    assert dom.pirq(27)["state"] == "mapped"
    assert dom.pirq(27)["dropped"] == before["dropped"] + 1
    assert dom.g("xen_pirq_drops") == 1
    assert dom.port(port)["pending"] is False
    assert dom.upcalls == [] and dom.lapic == []


@pytest.mark.parametrize("pirq", [NR, 0xFFFF])
def test_inject_msi_out_of_range_pirq_is_dropped(dom, pirq):
    assert dom.x.inject_msi(*compose_pirq_msi(pirq)) is False
    assert dom.g("xen_pirq_drops") == 1
    assert dom.x.query()["pirqs"] == [] and dom.lapic == []


def test_events_before_shared_info_are_lost_and_counted():
    d = make_dom(shared=False)
    try:
        _, port = d.bind(27)
        assert d.x.inject_msi(*compose_pirq_msi(27)) is True
        assert d.x.query()["counters"]["upcalls-lost"] == 1
        assert d.upcalls == []
        assert d.unmask(port) == -errno.EINVAL
        assert d.x.set_shared_info(SHINFO + 1) == -errno.EINVAL
        assert d.x.set_callback_vector(0x0F) == -errno.EINVAL
    finally:
        close_dom(d)


def test_closing_a_port_clears_its_bits_and_unbinds_the_pirq(dom):
    _, port = dom.bind(27)
    dom.mask(port)
    assert dom.x.inject_msi(*compose_pirq_msi(27)) is True
    assert dom.port(port)["pending"] is True
    assert dom.close_port(port) == 0
    assert dom.mem.read_u64(SHINFO + EVTCHN_PENDING_OFF) == 0
    assert dom.mem.read_u64(SHINFO + EVTCHN_MASK_OFF) == 0
    assert dom.pirq(27)["port"] == 0
    assert dom.bind(27) == (0, port)  # the port is free again


# ==================================================================================================
# through the real channel: KernelHV + VM, hypervisor = "xen"
# ==================================================================================================

class XenHV(HV):
    """test_hv's kernel half and VM pair, as a Xen domain with a shared-info page and an upcall."""

    def __init__(self, nr_pirqs: int = NR) -> None:
        super().__init__(1, hypervisor="xen", xen_nr_pirqs=nr_pirqs)
        x = self.k.xen
        assert x is not None
        self.x = x
        assert x.set_shared_info(SHINFO) == 0
        assert x.set_callback_vector(CB) == 0

    def op(self, cmd: int, arg: dict, fd: int | None = None, owner: dict | None = None) -> dict:
        return self.vm.xen_physdev_op(cmd, arg, fd=fd, owner=owner)

    def raw(self, payload: bytes, fds: list[int], code: int = abi.IOCTL_XEN_PHYSDEV_OP) -> int:
        rep, rfds = self.vm.channel.request(code, payload, fds, timeout=CEIL)
        for fd in rfds:
            os.close(fd)
        (status,) = abi.REPLY_STATUS.unpack_from(rep)
        return status


@pytest.fixture
def xhv():
    h = XenHV()
    try:
        yield h
    finally:
        h.close()


def test_channel_passthrough_event_reaches_the_guest_through_an_event_channel(xhv):
    got = xhv.op(PhysdevOp.GET_FREE_PIRQ, {"type": MapPirqType.MSI})
    assert got == {"rc": 0, "arg": {"type": 0, "pirq": 27}}
    efd = os.eventfd(0, os.EFD_CLOEXEC)
    try:
        rep = xhv.op(PhysdevOp.MAP_PIRQ, {"domid": DOMID, "type": 0, "pirq": 27, "devfn": 8, "entry_nr": 1},
                     fd=efd, owner={"device": "nvme0", "vector": 1})
        assert rep["rc"] == 0 and rep["arg"]["pirq"] == 27
        a = EvtchnBindPirq(27)
        assert xhv.x.event_channel_op(EvtchnOp.BIND_PIRQ, a) == 0
        os.eventfd_write(efd, 1)  # the host function raises its interrupt
        wait_for(lambda: (0, CB) in xhv.irqs, CEIL, "the upcall on the callback vector")
        q = xhv.vm.xen_query()
        p = next(p for p in q["pirqs"] if p["pirq"] == 27)
        assert (p["state"], p["port"], p["events"], p["owner"]) == ("mapped", a.port, 1, {"device": "nvme0",
                                                                                          "vector": 1})
        g = xhv.vm.stats.globals()
        assert (g["xen_pirq_events"], g["xen_evtchn_set_pending"], g["xen_upcalls"]) == (1, 1, 1)
        assert g["msi_lapic_deliveries"] == 0
        # the device model's failing calls: Xen's answers, as rc (not an ioctl error)
        assert xhv.op(PhysdevOp.UNMAP_PIRQ, {"domid": OTHER_DOMID, "pirq": 27})["rc"] == -errno.EPERM
        assert xhv.op(PhysdevOp.UNMAP_PIRQ, {"domid": DOMID, "pirq": 26})["rc"] == -errno.EINVAL
        assert xhv.op(99, {})["rc"] == -errno.ENOSYS
        assert xhv.op(PhysdevOp.UNMAP_PIRQ, {"domid": DOMID, "pirq": 27}) == {"rc": 0, "arg": {"domid": 1,
                                                                                               "pirq": 27}}
        assert 27 in xhv.vm.xen_query()["free"]
    finally:
        os.close(efd)


def test_channel_signal_msi_goes_through_the_pirq_and_irqfd_is_refused(xhv):
    from kickcall.notify import EventNotifier
    a = EvtchnBindPirq(26)
    assert xhv.x.event_channel_op(EvtchnOp.BIND_PIRQ, a) == 0
    assert xhv.vm.signal_msi(*compose_pirq_msi(26)) is True
    wait_for(lambda: (0, CB) in xhv.irqs, CEIL, "the upcall")
    g = xhv.vm.stats.globals()
    assert (g["msi_injections"], g["xen_emulated_msis"], g["msi_lapic_deliveries"]) == (1, 1, 0)
    assert next(p for p in xhv.vm.xen_query()["pirqs"] if p["pirq"] == 26)["state"] == "emulated"
    n = EventNotifier("call")
    try:
        with pytest.raises(HypervisorError) as ei:
            xhv.vm.irqfd(n, 40)
        assert ei.value.err == errno.ENOSYS
    finally:
        n.close()


def test_channel_xen_ioctls_on_a_kvm_domain_are_enosys():
    a, b = socketpair()
    mem = GuestMemory.create(1 << 16)
    k = KernelHV(b).start()
    vm = VM(a, mem, 1)
    try:
        vm.start()
        k.wait_ready()
        assert k.xen is None
        for fn in (vm.xen_query, lambda: vm.xen_physdev_op(PhysdevOp.GET_FREE_PIRQ, {"type": 0})):
            with pytest.raises(HypervisorError) as ei:
                fn()
            assert ei.value.err == errno.ENOSYS
    finally:
        vm.shutdown()
        vm.close()
        k.close()
        mem.close()


MAP = {"domid": DOMID, "type": 0, "pirq": 25, "devfn": 8, "entry_nr": 0}
HOSTILE = [
    ("bad json", b"{not json", 1),
    ("not utf-8", b"\xff\xfe", 1),
    ("not an object", b"[13]", 1),
    ("cmd missing", json.dumps({"arg": MAP}).encode(), 1),
    ("cmd not a number", json.dumps({"cmd": "map", "arg": MAP}).encode(), 1),
    ("extra key", json.dumps({"cmd": 13, "arg": {**MAP, "flags": 1}}).encode(), 1),
    ("missing field", json.dumps({"cmd": 13, "arg": {"type": 0}}).encode(), 1),
    ("field not a number", json.dumps({"cmd": 13, "arg": {**MAP, "domid": "one"}}).encode(), 1),
    ("field an object", json.dumps({"cmd": 13, "arg": {**MAP, "pirq": {}}}).encode(), 1),
    ("field infinite", b'{"cmd": 13, "arg": {"domid": 1, "type": 0, "pirq": 1e400}}', 1),
    ("arg a list", json.dumps({"cmd": 13, "arg": [1, 0]}).encode(), 1),
    ("owner a list", json.dumps({"cmd": 13, "arg": MAP, "owner": [1]}).encode(), 1),
    ("two fds", json.dumps({"cmd": 13, "arg": MAP}).encode(), 2),
    ("unmap extra key", json.dumps({"cmd": 14, "arg": {"domid": 1, "pirq": 25, "x": 0}}).encode(), 1),
    ("get_free extra key", json.dumps({"cmd": 23, "arg": {"type": 0, "pirq": 0, "x": 0}}).encode(), 0),
]


@pytest.mark.parametrize("payload,nfds", [h[1:] for h in HOSTILE], ids=[h[0] for h in HOSTILE])
def test_channel_malformed_physdev_op_is_einval_and_leaks_no_fd(xhv, payload, nfds):
    efd = os.eventfd(0, os.EFD_CLOEXEC)
    assert xhv.op(PhysdevOp.MAP_PIRQ, {**MAP, "pirq": 27, "devfn": 16}, fd=efd)["rc"] == 0
    os.close(efd)
    before = view(xhv.vm.xen_query())
    n = fd_count()
    fds = [os.eventfd(0, os.EFD_CLOEXEC) for _ in range(nfds)]
    try:
        assert xhv.raw(payload, fds) == -errno.EINVAL
    finally:
        for fd in fds:
            os.close(fd)
    assert fd_count() == n
    assert view(xhv.vm.xen_query()) == before


@pytest.mark.parametrize("nfds", [1, 2])
def test_channel_query_with_an_fd_is_einval_and_leaks_no_fd(xhv, nfds):
    n = fd_count()
    fds = [os.eventfd(0, os.EFD_CLOEXEC) for _ in range(nfds)]
    try:
        assert xhv.raw(b"{}", fds, code=abi.IOCTL_XEN_QUERY) == -errno.EINVAL
    finally:
        for fd in fds:
            os.close(fd)
    assert fd_count() == n


@pytest.mark.parametrize("payload", [b"{not json", b"\xff\xfe", json.dumps({"cmd": 13, "arg": [1]}).encode(),
                                     json.dumps([13]).encode(), b'{"cmd": 13, "arg": {"domid": 1e400}}'])
def test_channel_hostile_physdev_op_logs_no_traceback(xhv, caplog, payload):
    with caplog.at_level(logging.DEBUG, logger="kickcall"):
        assert xhv.raw(payload, []) == -errno.EINVAL
    assert [r for r in caplog.records if r.exc_info] == []


def test_channel_fds_of_mapped_pirqs_are_closed_at_teardown():
    n = fd_count()
    h = XenHV()
    try:
        for i in range(3):
            efd = os.eventfd(0, os.EFD_CLOEXEC)
            assert h.op(PhysdevOp.MAP_PIRQ, {**MAP, "pirq": -1, "entry_nr": i}, fd=efd)["rc"] == 0
            os.close(efd)
        assert h.op(PhysdevOp.UNMAP_PIRQ, {"domid": DOMID, "pirq": 26})["rc"] == 0
    finally:
        h.close()
    assert fd_count() == n


# ==================================================================================================
# the property: random hypercall sequences from the guest and the device model
# ==================================================================================================

PIRQS = st.sampled_from([-1, 0, 16, 24, 25, 26, 27, NR, 300])
PORTS = st.integers(min_value=0, max_value=6)
CALLER = st.sampled_from([GUEST, DM])
DOMIDS = st.sampled_from([DOMID, DOMID_SELF, OTHER_DOMID])
STEP = st.one_of(
    st.tuples(st.just("get_free"), st.sampled_from([MapPirqType.MSI, MapPirqType.GSI, 7]), CALLER),
    st.tuples(st.just("map"), PIRQS, st.integers(0, 3), DOMIDS, CALLER),
    st.tuples(st.just("map"), st.sampled_from([-1, -1, 25, 26, 27]), st.integers(0, 2), st.just(DOMID),
              st.just(DM)),  # the device model's well-formed maps, often enough to collide
    st.tuples(st.just("unmap"), PIRQS, DOMIDS, CALLER),
    st.tuples(st.just("unmap"), st.sampled_from([24, 25, 26, 27]), st.just(DOMID), st.just(DM)),
    st.tuples(st.just("bind"), PIRQS),
    st.tuples(st.just("close"), PORTS),
    st.tuples(st.just("unmask"), PORTS),
    st.tuples(st.just("mask"), PORTS),
    st.tuples(st.just("inject"), PIRQS),
)


def check_invariants(d: Dom, model: dict[int, str]) -> None:
    q = d.x.query()
    states = {p["pirq"]: p["state"] for p in q["pirqs"]}
    # the free pool is exactly the MSI-range pirqs in state free
    assert q["free"] == [p for p in range(24, NR) if states.get(p, "free") == "free"]
    assert q["free-count"] == len(q["free"])
    # the model of what each pirq should be
    assert {p: s for p, s in states.items() if s != "free"} == {p: s for p, s in model.items() if s != "free"}
    # one port per pirq, and each PIRQ port's pirq points back at it
    ports = {c["port"]: c for c in q["ports"]}
    bound = [p["port"] for p in q["pirqs"] if p["port"]]
    assert len(bound) == len(set(bound))
    for p in q["pirqs"]:
        if p["port"]:
            assert ports[p["port"]]["status"] == "pirq" and ports[p["port"]]["pirq"] == p["pirq"]
    for c in q["ports"]:
        if c["status"] == "pirq":
            assert next(p for p in q["pirqs"] if p["pirq"] == c["pirq"])["port"] == c["port"]


@settings(max_examples=150)
@given(steps=st.lists(STEP, max_size=40))
def test_property_random_hypercalls_keep_the_tables_consistent(steps):
    n = fd_count()
    d = make_dom(loop=False)
    model: dict[int, str] = {}
    entry_of: dict[int, int] = {}  # mapped pirq -> host entry
    try:
        for step in steps:
            before = view(d.x.query())
            kind = step[0]
            rc: int | None = None
            if kind == "get_free":
                _, type, caller = step
                rc, pirq = d.get_free(type, caller)
                if rc == 0:
                    assert model.get(pirq, "free") == "free"
                    model[pirq] = "allocated"
            elif kind == "map":
                _, pirq, entry, domid, caller = step
                free_before = d.x.query()["free"]
                rc, got, _ = d.map(pirq, entry=entry, domid=domid, caller=caller)
                if rc == 0:
                    if pirq == -1:
                        assert got == max(free_before)
                    conflict = model.get(got) == "mapped" or entry in entry_of.values()
                    if not conflict:
                        model[got] = "mapped"
                        entry_of[got] = entry
            elif kind == "unmap":
                _, pirq, domid, caller = step
                rc = d.unmap(pirq, domid=domid, caller=caller)
                if rc == 0:
                    assert model[pirq] == "mapped"
                    model[pirq] = "free"
                    del entry_of[pirq]
            elif kind == "bind":
                rc, _ = d.bind(step[1])
            elif kind == "close":
                rc = d.close_port(step[1])
            elif kind == "unmask":
                rc = d.unmask(step[1])
            elif kind == "mask":
                if step[1]:
                    d.mask(step[1])
            elif kind == "inject":
                pirq = step[1]
                d.x.inject_msi(*compose_pirq_msi(pirq)) if pirq >= 0 else None
                if 0 < pirq < NR and model.get(pirq) != "mapped":
                    model[pirq] = "emulated"
            if rc is not None and rc < 0:
                assert view(d.x.query()) == before, f"{step} -> {rc} changed the domain"
            check_invariants(d, model)
    finally:
        close_dom(d)
    assert fd_count() == n


@pytest.mark.parametrize("nr_pirqs", [24, 4097])
def test_a_refused_xen_domain_takes_no_fd_and_the_vmm_can_try_again(nr_pirqs):
    """SET_MEMORY with Xen parameters no domain can have is refused before the kernel takes the
    VMM's fds: nothing is closed twice, nothing leaks, and a second SET_MEMORY is not EEXIST."""
    n = fd_count()
    a, b = socketpair()
    mem = GuestMemory.create(1 << 20)
    k = KernelHV(b).start()
    vm = VM(a, mem, 1, hypervisor="xen", xen_nr_pirqs=nr_pirqs)
    try:
        with pytest.raises(HypervisorError) as e:
            vm.start()
        assert e.value.err == errno.EINVAL and "nr_pirqs" in str(e.value)
        assert k.memory is None and k.xen is None
        vm.xen_nr_pirqs = NR
        vm.start()  # the same VM, sane parameters: accepted
        assert k.xen is not None and k.xen.nr_pirqs == NR
    finally:
        vm.shutdown()
        vm.close()
        k.close()
        mem.close()
    assert fd_count() == n


def test_the_query_of_a_full_table_fits_one_channel_message():
    """Every pirq of a 4096-entry table allocated (a guest that leaks them): the query still
    crosses the channel, listing the lowest QUERY_LIMIT and counting the rest."""
    h = XenHV(nr_pirqs=4096)
    try:
        n = 0
        while h.x.physdev_op(PhysdevOp.GET_FREE_PIRQ, PhysdevGetFreePirq(MapPirqType.MSI)) == 0:
            n += 1
        assert n == 4096 - 24
        q = h.vm.xen_query()
        assert q["free-count"] == 0
        assert len(q["pirqs"]) == xen.QUERY_LIMIT
        assert q["pirqs-omitted"] == n - xen.QUERY_LIMIT
        assert q["pirqs"][0]["pirq"] == 24 and q["pirqs"][0]["state"] == "allocated"
    finally:
        h.close()
