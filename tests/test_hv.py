"""The software hypervisor: ioeventfd table, GSI routing, and VM + KernelHV over a real channel."""

from __future__ import annotations

import errno
import json
import os
import socket
import threading
from typing import Any

import pytest

from kickcall.hv import socketpair
from kickcall.hv import abi
from kickcall.hv.abi import EXIT, EXIT_REPLY, HDR, HypervisorError
from kickcall.hv.ioeventfd import IoeventfdTable
from kickcall.hv.kernel import KernelHV
from kickcall.hv.routing import (
    BadMsi,
    GsiRouting,
    IrqchipRoute,
    MsiRoute,
    decode_msi,
    msi_address,
)
from kickcall.hv.vmm import VM, MsiRoutes
from kickcall.memory import GuestMemory
from kickcall.notify import EventNotifier
from helpers import fd_count, wait_for

CEIL = 10.0
MMIO = "memory"
PIO = "io"


@pytest.fixture
def notifiers():
    made: list[EventNotifier] = []

    def make(name="n"):
        n = EventNotifier(name)
        made.append(n)
        return n

    try:
        yield make
    finally:
        for n in made:
            n.close()


# ==================================================================================================
# IoeventfdTable
# ==================================================================================================

def assign(t, n, addr, length, dm=None, space=MMIO):
    return t.assign(space, addr, length, dm, n.fd, n.ident)


def err_of(fn, *args, **kw) -> int:
    with pytest.raises(HypervisorError) as ei:
        fn(*args, **kw)
    return ei.value.err


@pytest.mark.parametrize("length", [3, 5, 6, 7, 16, -1])
def test_ioeventfd_bad_length_is_einval(notifiers, length):
    t = IoeventfdTable()
    n = notifiers()
    assert err_of(assign, t, n, 0x1000, length) == errno.EINVAL
    assert t.entries() == []


def test_ioeventfd_length0_with_datamatch_is_einval(notifiers):
    t = IoeventfdTable()
    n = notifiers()
    assert err_of(assign, t, n, 0x1000, 0, 5) == errno.EINVAL
    assert err_of(assign, t, n, 0x1000, 0, 0) == errno.EINVAL  # datamatch 0 is still a datamatch


@pytest.mark.parametrize("addr,length", [((1 << 64) - 4, 8), ((1 << 64) - 8, 8), ((1 << 64) - 1, 1),
                                         (1 << 64, 0), (-4, 4)])
def test_ioeventfd_wrapping_range_is_einval(notifiers, addr, length):
    t = IoeventfdTable()
    n = notifiers()
    assert err_of(assign, t, n, addr, length) == errno.EINVAL


def test_ioeventfd_top_of_address_space_is_fine(notifiers):
    t = IoeventfdTable()
    n = notifiers()
    assign(t, n, (1 << 64) - 9, 8)  # ends at 2**64 - 1: no wrap
    assign(t, notifiers(), (1 << 64) - 1, 0)


def test_ioeventfd_bad_space_and_pio_range(notifiers):
    t = IoeventfdTable()
    n = notifiers()
    assert err_of(assign, t, n, 0x10, 2, space="dma") == errno.EINVAL
    assert err_of(assign, t, n, 0xFFFF, 2, space=PIO) == errno.EINVAL
    assert err_of(assign, t, n, 0x10, 1, 0x100) == errno.EINVAL  # datamatch wider than length
    assign(t, n, 0xFFFE, 2, space=PIO)


def test_ioeventfd_collision_rules(notifiers):
    a, b, c, d = (notifiers(x) for x in "abcd")
    t = IoeventfdTable()
    # same addr, both wildcard, same length
    assign(t, a, 0x1000, 4)
    assert err_of(assign, t, b, 0x1000, 4) == errno.EEXIST
    # same length, one wildcard, the other datamatch -> EEXIST either way round
    assert err_of(assign, t, b, 0x1000, 4, 7) == errno.EEXIST
    assign(t, a, 0x2000, 4, 7)
    assert err_of(assign, t, b, 0x2000, 4) == errno.EEXIST
    # same length, same datamatch
    assert err_of(assign, t, b, 0x2000, 4, 7) == errno.EEXIST
    # same length, different datamatch: both accepted
    assign(t, b, 0x2000, 4, 8)
    # any registration vs a length-0 one at the same addr
    assign(t, c, 0x3000, 0)
    for length, dm in [(0, None), (1, None), (2, 3), (4, None), (8, 9)]:
        assert err_of(assign, t, d, 0x3000, length, dm) == errno.EEXIST
    # a length-0 one vs existing registrations
    assert err_of(assign, t, d, 0x1000, 0) == errno.EEXIST
    assert err_of(assign, t, d, 0x2000, 0) == errno.EEXIST
    # different non-zero lengths at one addr do not collide
    assign(t, d, 0x1000, 2)
    # the same addr in the other space does not collide
    assign(t, d, 0x1000, 4, space=PIO)
    assert len(t.entries()) == 6
    assert len(t.find(MMIO, 0x2000)) == 2


def test_ioeventfd_two_datamatch_entries_each_get_their_value(notifiers):
    a, b = notifiers("a"), notifiers("b")
    t = IoeventfdTable()
    ea = assign(t, a, 0x2000, 2, 0)
    eb = assign(t, b, 0x2000, 2, 1)
    assert ea.slot != eb.slot
    assert t.write(MMIO, 0x2000, 2, 1) is eb
    assert (a.peek(), b.peek()) == (0, 1)
    assert t.write(MMIO, 0x2000, 2, 0) is ea
    assert (a.peek(), b.peek()) == (1, 1)
    assert t.write(MMIO, 0x2000, 2, 2) is None  # no datamatch: heavyweight exit
    assert t.write(MMIO, 0x2000, 4, 1) is None  # other width
    assert (a.peek(), b.peek()) == (1, 1)
    assert (ea.hits, eb.hits) == (1, 1)


def test_ioeventfd_width_must_match_a_nonzero_length(notifiers):
    n = notifiers()
    t = IoeventfdTable()
    e = assign(t, n, 0x1000, 4)
    assert t.write(MMIO, 0x1000, 2, 0) is None
    assert t.write(MMIO, 0x1000, 1, 0) is None
    assert t.write(MMIO, 0x1000, 8, 0) is None
    assert t.write(MMIO, 0x1002, 2, 0) is None  # inside the range but not the address
    assert n.peek() == 0
    assert e.hits == 0
    assert t.write(MMIO, 0x1000, 4, 0xFFFFFFFF) is e
    assert n.peek() == 1
    assert os.eventfd_read(n.fd) == 1


def test_ioeventfd_length0_matches_any_width(notifiers):
    n = notifiers()
    t = IoeventfdTable()
    e = assign(t, n, 0x1000, 0)
    for size, value in [(1, 0xFF), (2, 0), (4, 123), (8, (1 << 64) - 1)]:
        assert t.write(MMIO, 0x1000, size, value) is e
    assert n.peek() == 4
    assert t.write(PIO, 0x1000, 2, 0) is None  # other space
    assert n.peek() == 4


def test_ioeventfd_datamatch_compares_value(notifiers):
    n = notifiers()
    t = IoeventfdTable()
    e = assign(t, n, 0x40, 2, 0x1234)
    assert t.write(MMIO, 0x40, 2, 0x1235) is None
    assert n.peek() == 0
    assert t.write(MMIO, 0x40, 2, 0x1234) is e
    assert n.peek() == 1


def test_ioeventfd_deassign(notifiers):
    n, other = notifiers("n"), notifiers("other")
    t = IoeventfdTable()
    assign(t, n, 0x40, 2, 0x1234)
    assert err_of(t.deassign, MMIO, 0x40, 2, 0x1235, n.ident) == errno.ENOENT  # wrong datamatch
    assert err_of(t.deassign, MMIO, 0x40, 2, None, n.ident) == errno.ENOENT  # wildcard != datamatch
    assert err_of(t.deassign, MMIO, 0x40, 4, 0x1234, n.ident) == errno.ENOENT  # wrong length
    assert err_of(t.deassign, MMIO, 0x42, 2, 0x1234, n.ident) == errno.ENOENT  # wrong address
    assert err_of(t.deassign, PIO, 0x40, 2, 0x1234, n.ident) == errno.ENOENT  # wrong space
    assert err_of(t.deassign, MMIO, 0x40, 2, 0x1234, other.ident) == errno.ENOENT  # other eventfd
    assert t.write(MMIO, 0x40, 2, 0x1234) is not None
    assert n.test_and_clear() == 1
    e = t.deassign(MMIO, 0x40, 2, 0x1234, n.ident)
    assert e.hits == 1
    assert t.write(MMIO, 0x40, 2, 0x1234) is None
    assert n.peek() == 0
    assert t.entries() == []
    # the slot is free again and the address can be reassigned
    e2 = assign(t, other, 0x40, 2)
    assert e2.slot == e.slot
    assert err_of(t.deassign, MMIO, 0x40, 2, 0x1234, n.ident) == errno.ENOENT


def test_ioeventfd_table_full_is_enospc(notifiers):
    t = IoeventfdTable(max_entries=2)
    assign(t, notifiers(), 0x10, 0)
    assign(t, notifiers(), 0x20, 0)
    assert err_of(assign, t, notifiers(), 0x30, 0) == errno.ENOSPC


def test_ioeventfd_drop_next_and_on_hit(notifiers):
    hits = []
    n = notifiers()
    t = IoeventfdTable(on_hit=lambda e, v, dropped: hits.append((e.slot, v, dropped)))
    e = assign(t, n, 0x80, 4)
    e.drop_next = 1
    assert t.write(MMIO, 0x80, 4, 5) is e
    assert n.peek() == 0
    assert t.write(MMIO, 0x80, 4, 6) is e
    assert n.peek() == 1
    assert (e.hits, e.dropped) == (2, 1)
    assert hits == [(e.slot, 5, True), (e.slot, 6, False)]


# ==================================================================================================
# GSI routing and MSI decoding
# ==================================================================================================

def test_routing_starts_with_ioapic_pins():
    r = GsiRouting()
    assert len(r) == 24
    assert r.lookup(0) == IrqchipRoute(0, 0)
    assert r.lookup(23) == IrqchipRoute(23, 23)
    assert r.lookup(24) is None


def test_routing_limit_is_einval_with_message():
    r = GsiRouting(max_routes=30)
    routes = [IrqchipRoute(p, p) for p in range(24)] + [MsiRoute(g, msi_address(0), 0x40) for g in range(24, 31)]
    assert len(routes) == 31
    with pytest.raises(HypervisorError) as ei:
        r.set(routes)
    assert ei.value.err == errno.EINVAL
    assert "30" in str(ei.value)
    assert len(r) == 24  # unchanged
    r.set(routes[:30])
    assert len(r) == 30
    assert r.lookup(29) == MsiRoute(29, msi_address(0), 0x40)


def test_routing_refuses_duplicates_and_bad_entries():
    r = GsiRouting(max_routes=64)
    with pytest.raises(HypervisorError) as ei:
        r.set([MsiRoute(30, msi_address(0), 0x40), MsiRoute(30, msi_address(1), 0x41)])
    assert ei.value.err == errno.EINVAL
    with pytest.raises(HypervisorError):
        r.set([MsiRoute(64, msi_address(0), 0x40)])
    with pytest.raises(HypervisorError):
        r.set([IrqchipRoute(5, 24)])
    assert len(r) == 24
    r.set([MsiRoute(40, msi_address(2), 0x50)])  # replaces the whole table
    assert len(r) == 1
    assert r.lookup(0) is None
    assert [x.gsi for x in r.routes()] == [40]


def test_decode_msi():
    assert decode_msi(msi_address(3), 0x41) == (3, 0x41)
    assert decode_msi(msi_address(0), 0xFF) == (0, 0xFF)
    assert decode_msi(msi_address(255), 0x100 | 0x30) == (255, 0x30)  # lowest priority
    for addr, data in [(0xFED00000, 0x41), (0, 0x41), ((1 << 32) | msi_address(1), 0x41),
                       (msi_address(1), 0x0F), (msi_address(1), 0x200 | 0x41), (msi_address(1), 0x400 | 0x41)]:
        with pytest.raises(BadMsi):
            decode_msi(addr, data)


# ==================================================================================================
# VM + KernelHV in one process
# ==================================================================================================

class HV:
    def __init__(self, nvcpus: int = 2, max_routes: int = abi.KVM_MAX_IRQ_ROUTES, **vm_kw: Any) -> None:
        """A kernel half and a VM over a socketpair; *vm_kw*: more of VM's options (hypervisor=...)."""
        self.exits: list[tuple] = []
        self.read_value = 0x1234
        a, b = socketpair()
        self.mem = GuestMemory.create(1 << 20)
        self.k = KernelHV(b).start()
        self.vm = VM(a, self.mem, nvcpus, exit_handler=self._exit, max_routes=max_routes, **vm_kw)
        self.vm.start()
        self.k.wait_ready()
        self.irqs: list[tuple[int, int]] = []
        self.k.set_interrupt_handler(lambda cpu, v: self.irqs.append((cpu, v)))

    def _exit(self, code, addr, value, size, cpu):
        self.exits.append((code, addr, value, size, cpu))
        return self.read_value

    def close(self) -> None:
        try:
            self.vm.shutdown()
        finally:
            self.vm.close()
            self.k.close()
            self.mem.close()


@pytest.fixture
def hv():
    h = HV()
    try:
        yield h
    finally:
        h.close()


def test_snippet_lightweight_heavyweight_read_and_irqfd(hv, notifiers):
    vm, k = hv.vm, hv.k
    n = notifiers("kick")
    slot = vm.ioeventfd(space=MMIO, addr=0x1000, length=0, notifier=n)
    k.vcpus[0].mmio_write(0x1000, 0, 2)
    assert n.peek() == 1
    st = vm.stats.ioeventfd(slot)
    assert st["hits"] == 1 and st["in_use"] == 1
    assert st["last_pid"] == os.getpid()
    assert hv.exits == []  # lightweight: the VMM never saw it
    assert vm.stats.vcpu(0)["ioeventfd_writes"] == 1

    k.vcpus[0].mmio_write(0x2000, 5, 4)
    assert hv.exits == [(abi.EXIT_MMIO_WRITE, 0x2000, 5, 4, 0)]
    assert k.vcpus[1].mmio_read(0x3000, 4) == 0x1234
    assert hv.exits[-1] == (abi.EXIT_MMIO_READ, 0x3000, 0, 4, 1)
    assert vm.exit_counts == {"mmio-write": 1, "mmio-read": 1}

    r = MsiRoutes(vm)
    g = r.add(msi_address(1), 0x41)
    r.commit()
    c = notifiers("call")
    vm.irqfd(c, g)
    c.set()
    wait_for(lambda: hv.irqs == [(1, 0x41)], what="the irqfd interrupt")
    assert vm.stats.gsi(g)["injections"] == 1


def test_pio_exits_and_pio_ioeventfd(hv, notifiers):
    vm, k = hv.vm, hv.k
    n = notifiers()
    vm.ioeventfd(space=PIO, addr=0xC050, length=2, notifier=n, datamatch=3)
    k.vcpus[0].pio_write(0xC050, 3, 2)
    assert n.peek() == 1
    k.vcpus[0].pio_write(0xC050, 4, 2)
    assert hv.exits == [(abi.EXIT_PIO_WRITE, 0xC050, 4, 2, 0)]
    assert k.vcpus[0].pio_read(0xCFC, 2) == 0x1234
    assert n.peek() == 1


def test_exit_attribution_pid_and_tid(hv):
    hv.k.vcpus[0].mmio_write(0x2000, 1, 4)
    pid, tid = hv.vm.last_exit[0]
    assert pid == os.getpid()
    assert tid == threading.get_native_id()  # the thread that made the access
    assert hv.vm.stats.vcpu(0)["last_pid"] == os.getpid()
    assert hv.vm.stats.vcpu(0)["mmio_write_exits"] == 1


def test_ioeventfd_deassign_stops_lightweight_writes(hv, notifiers):
    vm, k = hv.vm, hv.k
    n = notifiers()
    vm.ioeventfd(space=MMIO, addr=0x1000, length=4, notifier=n)
    k.vcpus[0].mmio_write(0x1000, 9, 4)
    assert n.test_and_clear() == 1
    vm.ioeventfd(space=MMIO, addr=0x1000, length=4, notifier=n, deassign=True)
    k.vcpus[0].mmio_write(0x1000, 9, 4)
    assert n.peek() == 0
    assert hv.exits == [(abi.EXIT_MMIO_WRITE, 0x1000, 9, 4, 0)]
    assert k.ioeventfds.entries() == []


def test_ioeventfd_ioctl_errors_come_back_with_errno(hv, notifiers):
    vm = hv.vm
    n = notifiers()
    before = fd_count()
    with pytest.raises(HypervisorError) as ei:
        vm.ioeventfd(space=MMIO, addr=0x1000, length=3, notifier=n)
    assert ei.value.err == errno.EINVAL
    vm.ioeventfd(space=MMIO, addr=0x1000, length=4, notifier=n)
    with pytest.raises(HypervisorError) as ei:
        vm.ioeventfd(space=MMIO, addr=0x1000, length=4, notifier=notifiers())
    assert ei.value.err == errno.EEXIST
    with pytest.raises(HypervisorError) as ei:
        vm.ioeventfd(space=MMIO, addr=0x1000, length=2, notifier=n, deassign=True)
    assert ei.value.err == errno.ENOENT
    # the kernel holds exactly one copy (the assigned one) + the second notifier we made
    # (an eventfd and the dup that pins it)
    assert fd_count() == before + 3
    vm.ioeventfd(space=MMIO, addr=0x1000, length=4, notifier=n, deassign=True)
    assert fd_count() == before + 2


def test_irqfd_deassign_stops_injection(hv, notifiers):
    vm, k = hv.vm, hv.k
    r = MsiRoutes(vm)
    g = r.add(msi_address(0), 0x50)
    r.commit()
    c = notifiers("call")
    vm.irqfd(c, g)
    c.set()
    wait_for(lambda: hv.irqs == [(0, 0x50)], what="first interrupt")
    rep = vm.irqfd(c, g, deassign=True)
    assert rep["found"] is True and rep["count"] == 1
    c.set()
    assert c.peek() == 1  # nobody consumes it any more
    k.irq_loop.run_sync(lambda: None)  # the interrupt loop has made a full pass since
    assert c.peek() == 1
    assert hv.irqs == [(0, 0x50)]
    assert k.irqfd_list() == []
    assert vm.irqfd(c, g, deassign=True) == {"found": False}


def test_irqfd_with_value_already_pending_injects_at_once(hv, notifiers):
    vm = hv.vm
    r = MsiRoutes(vm)
    g = r.add(msi_address(1), 0x60)
    r.commit()
    c = notifiers("call")
    c.set()
    vm.irqfd(c, g)
    wait_for(lambda: hv.irqs == [(1, 0x60)], what="the interrupt pending before assign")
    wait_for(lambda: c.peek() == 0, what="the kernel to consume the eventfd")


def test_pause_holds_irqfd_interrupt_until_resume(hv, notifiers):
    vm, k = hv.vm, hv.k
    r = MsiRoutes(vm)
    g = r.add(msi_address(1), 0x41)
    r.commit()
    c = notifiers("call")
    vm.irqfd(c, g)
    vm.pause_vcpus()
    try:
        c.set()
        wait_for(lambda: vm.stats.globals()["interrupts_held_while_paused"] == 1, what="the held interrupt")
        wait_for(lambda: c.peek() == 0, what="the irqfd to be consumed")
        k.irq_loop.run_sync(lambda: None)
        assert hv.irqs == []
        assert k.irqchip.pending()[1] == [0x41]
    finally:
        vm.resume_vcpus()
    wait_for(lambda: hv.irqs == [(1, 0x41)], what="delivery after resume")
    assert k.irqchip.pending() == [[], []]


def test_msi_routes_limit_enospc(hv):
    r = MsiRoutes(hv.vm, limit=30)
    gsis = [r.add(msi_address(0), 0x40 + i) for i in range(6)]
    assert gsis == list(range(24, 30))
    with pytest.raises(HypervisorError) as ei:
        r.add(msi_address(0), 0x50)
    assert ei.value.err == errno.ENOSPC
    assert "30" in str(ei.value) and "route" in str(ei.value)
    assert len(r) == 6
    r.release(26)
    assert r.add(msi_address(0), 0x51) == 26


def test_vm_route_limit_applies_in_the_kernel():
    h = HV(max_routes=30)
    try:
        r = MsiRoutes(h.vm)
        assert r.limit == 30
        for i in range(6):
            r.add(msi_address(0), 0x40 + i)
        r.commit()
        assert len(h.k.routing) == 30
        with pytest.raises(HypervisorError) as ei:
            h.vm.set_gsi_routing([IrqchipRoute(p, p) for p in range(24)] +
                                 [MsiRoute(g, msi_address(0), 0x40) for g in range(24, 31)])
        assert ei.value.err == errno.EINVAL
        assert "30" in str(ei.value)
    finally:
        h.close()


def test_second_irqfd_of_same_notifier_is_ebusy_without_leaking(hv, notifiers):
    vm = hv.vm
    c = notifiers("call")
    vm.irqfd(c, 30)
    before = fd_count()
    with pytest.raises(HypervisorError) as ei:
        vm.irqfd(c, 31)
    assert ei.value.err == errno.EBUSY
    assert fd_count() == before  # the fd sent with the refused ioctl was closed
    assert [i["gsi"] for i in hv.k.irqfd_list()] == [30]


def test_fault_drop_next_swallows_exactly_one_kick(hv, notifiers):
    vm, k = hv.vm, hv.k
    n = notifiers("kick")
    slot = vm.ioeventfd(space=MMIO, addr=0x1000, length=0, notifier=n)
    rep = vm.fault("ioeventfd", n, "drop-next")
    assert rep["matched"] == 1
    k.vcpus[0].mmio_write(0x1000, 1, 4)
    assert n.peek() == 0
    st = vm.stats.ioeventfd(slot)
    assert st["dropped"] == 1 and st["hits"] == 1
    k.vcpus[0].mmio_write(0x1000, 1, 4)
    assert n.peek() == 1
    st = vm.stats.ioeventfd(slot)
    assert st["dropped"] == 1 and st["hits"] == 2
    assert hv.exits == []  # a dropped kick is still lightweight
    with pytest.raises(HypervisorError) as ei:
        vm.fault("ioeventfd", notifiers("unknown"), "drop-next")
    assert ei.value.err == errno.ENOENT


def test_signal_msi_and_irq_line(hv):
    vm, k = hv.vm, hv.k
    assert vm.signal_msi(msi_address(0), 0x70) is True
    wait_for(lambda: (0, 0x70) in hv.irqs, what="KVM_SIGNAL_MSI delivery")
    assert vm.signal_msi(0x1234, 0x70) is False
    assert vm.stats.globals()["bad_msi_drops"] == 1
    with pytest.raises(HypervisorError) as ei:
        vm.irq_line(24, 1)
    assert ei.value.err == errno.EINVAL
    # edge-triggered, so the test's ISR (which cannot lower a device line) causes no storm
    k.irqchip.program(17, 0x80, dest=1, level=False)
    vm.irq_line(17, 1)
    wait_for(lambda: (1, 0x80) in hv.irqs, what="INTx delivery")
    vm.irq_line(17, 0)
    assert k.irqchip.pins[17] == 0
    assert vm.stats.globals()["irq_line_changes"] == 2


def test_full_lifecycle_leaves_no_fds_or_threads():
    threads_before = {t.ident for t in threading.enumerate()}
    fds_before = fd_count()
    h = HV()
    n = EventNotifier("kick")
    c = EventNotifier("call")
    try:
        h.vm.ioeventfd(space=MMIO, addr=0x1000, length=0, notifier=n)
        h.vm.irqfd(c, 40)
        h.k.vcpus[0].mmio_write(0x2000, 1, 4)  # starts a VMM exit worker
    finally:
        h.close()
        n.close()
        c.close()
    wait_for(lambda: {t.ident for t in threading.enumerate() if t.is_alive()} <= threads_before,
             what="all hypervisor threads to end")
    assert fd_count() == fds_before


# ==================================================================================================
# Hostile input on the channel
# ==================================================================================================

class Peer:
    """A VM whose channel peer is the test, speaking raw bytes."""

    def __init__(self) -> None:
        self.a, self.b = socketpair()
        self.b.settimeout(CEIL)
        self.mem = GuestMemory.create(1 << 16)
        self.exits: list[tuple] = []
        self.vm = VM(self.a, self.mem, 2, exit_handler=self._exit)
        self.vm.channel.start()

    def _exit(self, code, addr, value, size, cpu):
        self.exits.append((code, addr, value, size, cpu))
        return 0xABCD

    def send(self, data: bytes, fds=()) -> None:
        if fds:
            socket.send_fds(self.b, [data], list(fds))
        else:
            self.b.send(data)

    def recv(self) -> tuple[int, int, int, int, bytes]:
        data = self.b.recv(1 << 16)
        kind, code, vcpu, seq = HDR.unpack_from(data)
        return kind, code, vcpu, seq, data[HDR.size:]

    def close(self) -> None:
        try:
            self.vm.close()
        finally:
            self.b.close()
            self.mem.close()


@pytest.fixture
def peer():
    p = Peer()
    try:
        yield p
    finally:
        p.close()


def exit_req(seq, code=abi.EXIT_MMIO_READ, addr=0x3000, value=0, size=4, vcpu=0):
    return HDR.pack(abi.KIND_REQ, code, vcpu, seq) + EXIT.pack(addr, value, size, os.getpid(), 1, 0)


def sendable_fds(n: int) -> list[int]:
    return [os.eventfd(0, os.EFD_CLOEXEC) for _ in range(n)]


def send_and_close(peer, data, nfds):
    fds = sendable_fds(nfds)
    try:
        peer.send(data, fds)
    finally:
        for fd in fds:
            os.close(fd)


def test_hostile_messages_do_not_crash_and_fds_are_closed(peer):
    ch = peer.vm.channel
    base = fd_count()

    # shorter than the header, with and without fds
    peer.send(b"\x01\x02")
    wait_for(lambda: ch.protocol_errors == 1, what="short message counted")
    send_and_close(peer, b"xx", 2)
    wait_for(lambda: ch.protocol_errors == 2, what="short message with fds counted")
    # unknown kind, with fds
    send_and_close(peer, HDR.pack(9, 1, 0, 0) + b"junk", 1)
    wait_for(lambda: ch.protocol_errors == 3, what="unknown kind counted")
    # a one-way message that carries fds nobody expects, and garbage guest events
    send_and_close(peer, HDR.pack(abi.KIND_MSG, 999, 0, 0) + b"whatever", 3)
    peer.send(HDR.pack(abi.KIND_MSG, abi.MSG_GUEST_EVENT, 0, 0) + b"\xff\xfe not json")
    peer.send(HDR.pack(abi.KIND_MSG, abi.MSG_GUEST_EVENT, 0, 0) + json.dumps([1, 2]).encode())
    # a reply nobody waits for, with an fd
    send_and_close(peer, HDR.pack(abi.KIND_REPLY, 0, 0, 4242) + b"\0\0\0\0", 1)

    # a request with an unknown exit code gets an answer, and the handler is not run
    send_and_close(peer, HDR.pack(abi.KIND_REQ, 777, 0, 11) + b"payload", 2)
    kind, code, _vcpu, seq, payload = peer.recv()
    assert (kind, code, seq) == (abi.KIND_REPLY, 777, 11)
    assert EXIT_REPLY.unpack(payload) == (0,)
    # a real exit code with a short payload
    peer.send(HDR.pack(abi.KIND_REQ, abi.EXIT_MMIO_READ, 0, 12) + b"\x01\x02\x03")
    kind, code, _vcpu, seq, payload = peer.recv()
    assert (kind, code, seq) == (abi.KIND_REPLY, abi.EXIT_MMIO_READ, 12)
    assert EXIT_REPLY.unpack(payload) == (0,)
    assert peer.exits == []

    # a well-formed exit that also carries (unexpected) fds is served, fds closed
    send_and_close(peer, exit_req(13), 2)
    kind, code, _vcpu, seq, payload = peer.recv()
    assert (kind, seq) == (abi.KIND_REPLY, 13)
    assert EXIT_REPLY.unpack(payload) == (0xABCD,)
    assert peer.exits == [(abi.EXIT_MMIO_READ, 0x3000, 0, 4, 0)]

    assert ch._thread is not None and ch._thread.is_alive()
    assert not ch.closed
    assert ch.protocol_errors == 3
    # every fd that arrived was closed (the replies above were sent after they were handled)
    assert fd_count() == base


def test_too_many_fds_is_a_protocol_error_and_nothing_leaks(peer):
    ch = peer.vm.channel
    base = fd_count()
    send_and_close(peer, exit_req(1), 70)  # more than the receiver accepts: control data truncated
    wait_for(lambda: ch.protocol_errors == 1, what="the truncated message to be counted")
    peer.send(exit_req(2))
    kind, _code, _vcpu, seq, payload = peer.recv()
    assert (kind, seq) == (abi.KIND_REPLY, 2)
    assert EXIT_REPLY.unpack(payload) == (0xABCD,)
    assert fd_count() == base
    assert ch._thread.is_alive()


def test_hostile_exit_from_unknown_vcpu_is_answered_but_not_run(peer):
    """A vCPU id the VM does not have would cost a worker thread each: answered, counted, not run."""
    threads0 = threading.active_count()
    for seq, vcpu in enumerate((63, 2**32 - 1, 4000), start=5):
        peer.send(exit_req(seq, code=abi.EXIT_PIO_WRITE, addr=0x80, value=7, size=1, vcpu=vcpu))
        kind, code, _vcpu, rseq, payload = peer.recv()
        assert (kind, code, rseq) == (abi.KIND_REPLY, abi.EXIT_PIO_WRITE, seq)
    assert peer.exits == []
    assert threading.active_count() == threads0
    assert peer.vm.channel.protocol_errors == 3
    # the interrupt-context pseudo vCPU (id == nvcpus) is a real one
    peer.send(exit_req(9, code=abi.EXIT_PIO_WRITE, addr=0x80, value=7, size=1, vcpu=2))
    assert peer.recv()[3] == 9
    assert peer.exits == [(abi.EXIT_PIO_WRITE, 0x80, 7, 1, 2)]


@pytest.mark.parametrize("size", [0, 3, 16, 2**32 - 1])
def test_hostile_exit_size_is_answered_and_not_run(peer, size):
    peer.send(exit_req(21, code=abi.EXIT_MMIO_READ, size=size))
    kind, code, _vcpu, seq, payload = peer.recv()
    assert (kind, seq) == (abi.KIND_REPLY, 21)
    assert EXIT_REPLY.unpack(payload) == (0,)
    assert peer.exits == []
    assert peer.vm.channel.protocol_errors == 1


def test_peer_going_away_is_noticed(peer):
    peer.b.shutdown(socket.SHUT_RDWR)
    assert peer.vm.guest_gone.wait(CEIL)
    assert peer.vm.channel.closed
