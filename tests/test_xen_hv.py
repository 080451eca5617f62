"""The Xen flavour's hypervisor half: XenHypervisor in-process and through the real channel.

What is asserted is Xen's own semantics (``xen/arch/x86/irq.c``, ``physdev.c``,
``common/event_channel.c``, ``event_2l.c``, ``hvm_inject_msi``): the answers a hypercall gives,
that a failing one changes nothing, the top-down pirq allocator, the "already mapped" warning
that succeeds, the 2-level event channel delivery with its upcall, coalescing and unmask replay,
and the emulated MSI path.  Every assertion names exact values, so each can fail.
"""

from __future__ import annotations

import errno
import os
from dataclasses import dataclass, field

import pytest

from helpers import fd_count
from kickcall.hv import xen
from kickcall.hv.stats import HvStats
from kickcall.hv.xen import Caller, XenHypervisor
from kickcall.hv.xen_abi import (
    HYPERVISOR_CALLBACK_VECTOR, EvtchnBindPirq,
    EvtchnClose, EvtchnOp, EvtchnUnmask, MapPirqType, PhysdevGetFreePirq,
    PhysdevMapPirq, PhysdevOp, PhysdevUnmapPirq,
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
    x = XenHypervisor(mem, domid=DOMID, nr_pirqs=nr_pirqs, nvcpus=2,
                      raise_vector=lambda cpu, v: d.upcalls.append((cpu, v)),
                      deliver_msi=lambda a, dt: d.lapic.append((a, dt)) is None, loop=lp, stats=stats)
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


@pytest.mark.parametrize("fix", [True, False])
def test_auto_assigned_pirq_stays_free_on_a_map_warning(dom, monkeypatch, fix):
    """map(pirq=-1) that hits "already mapped": Xen's allocate_pirq picked a free pirq without
    marking it, so the warning leaves it free.  With xen.FREE_AUTO_PIRQ_ON_MAP_WARNING off the
    picked pirq stays allocated: the pool shrinks on every such map and nothing gives it back."""
    monkeypatch.setattr(xen, "FREE_AUTO_PIRQ_ON_MAP_WARNING", fix)
    assert dom.map(27, devfn=8, entry=2)[:2] == (0, 27)
    got = [dom.map(-1, devfn=8, entry=2)[:2] for _ in range(3)]
    assert dom.x.query()["counters"]["map-conflicts"] == 3
    if fix:
        assert got == [(0, 26), (0, 26), (0, 26)]
        assert dom.pirq(26) is None
        assert dom.x.query()["free"] == [24, 25, 26]
    else:
        assert got == [(0, 26), (0, 25), (0, 24)]
        assert [p["state"] for p in dom.x.query()["pirqs"]] == ["allocated", "allocated", "allocated", "mapped"]
        assert dom.x.query()["free"] == []
        assert dom.unmap(26) == -errno.EINVAL  # and nothing gives it back
