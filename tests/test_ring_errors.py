"""Every RingErrorKind: a hostile ring that breaks exactly that rule, on real memfd guest memory.

For each kind: ``pop()`` raises VirtQueueError with that kind and consumes nothing; the device
(``process_queue``) needs a reset and counts the error under that kind on the queue (and in the
queue's status); and ``VirtQueue.describe_chain`` -- what the monitors show, through the same walker
-- reports the same fault at the same descriptor, without raising.  A property test then checks,
for random ring contents, that the walker's description and ``pop()`` always agree (same verdict,
same failing descriptor, and for a valid chain the same element), and that the valid prefix the
description lists is the chain in the order the descriptors link.  Finally a machine's monitor
(``x-query-virtio-queue-element``) shows a chain the device refuses with its kind, the same kind
the device then counts when it is kicked; with ``queue.DESCRIBE_FAULTS = False`` (how the monitors
behaved with their own, non-validating walker) it shows the chain as if it were fine.

Assertions are on kinds and descriptor positions, never on message text.
"""

from __future__ import annotations

import os
import signal
import struct
from dataclasses import dataclass
from typing import Callable

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from helpers import blk, machine_toml, running_machine, wait_for
from kickcall.memory import GuestMemory, RamBlock
from kickcall.monitor.client import QMPClient
from kickcall.virtio import queue as queue_mod
from kickcall.virtio.device import VirtIODevice
from kickcall.virtio.queue import MAX_SG, ChainFault, RingErrorKind, VirtQueue, VirtQueueError

K = RingErrorKind
RAM_SIZE = 1 << 20
DESC_GPA, AVAIL_GPA, USED_GPA = 0x1000, 0x2000, 0x3000
BUF, TABLE_GPA, TABLE2_GPA = 0x10000, 0x20000, 0x30000
SEAM = 0x80000  # where two RAM regions meet (the multi-region layouts)
F_NEXT, F_WRITE, F_INDIRECT = 1, 2, 4
U64 = 1 << 64
DESC = struct.Struct("<QIHH")
U16 = struct.Struct("<H")


class PopDevice(VirtIODevice):
    """A device whose queue handler takes every chain and returns it at once."""

    def handle_output(self, vq: VirtQueue) -> None:
        while (e := vq.pop()) is not None:
            vq.push(e, 0)


def one_region() -> GuestMemory:
    return GuestMemory.create(RAM_SIZE)


def two_regions(gap: int = 0) -> GuestMemory:
    """[0, SEAM) and [SEAM + gap, RAM_SIZE + gap) from one memfd: contiguous (gap 0) or with a hole."""
    m = GuestMemory()
    b = RamBlock(RAM_SIZE, "two")
    m.add_region(0, SEAM, b, 0)
    m.add_region(SEAM + gap, RAM_SIZE - SEAM, b, SEAM)
    return m


BIG_RAM = 0xA000_0000  # 2.5 GiB of sparse memfd: two 2 GiB buffers fit (nothing is touched)


def big_ram() -> GuestMemory:
    return GuestMemory.create(BIG_RAM)


class Ring:
    """A VirtQueue of a PopDevice over *mem*, the driver's side written by hand."""

    def __init__(self, mem: GuestMemory, num: int = 8, indirect: bool = True, event_idx: bool = True) -> None:
        self.mem = mem
        self.num = num
        self.dev = PopDevice("t", queue_sizes=[num])
        q = self.q = self.dev.queues[0]
        q.mem = mem
        q.indirect = indirect
        q.event_idx = event_idx
        q.set_rings(DESC_GPA, AVAIL_GPA, USED_GPA)
        q.enabled = True

    def close(self) -> None:
        self.q.unmap()
        self.mem.close()

    def desc(self, i: int, addr: int, length: int, flags: int = 0, nxt: int = 0, table: int = DESC_GPA) -> None:
        self.mem.write(table + 16 * i, DESC.pack(addr, length, flags, nxt))

    def offer(self, head: int) -> int:
        idx = U16.unpack(self.mem.read(AVAIL_GPA + 2, 2))[0]
        self.mem.write(AVAIL_GPA + 4 + 2 * (idx % self.num), U16.pack(head))
        self.mem.write(AVAIL_GPA + 2, U16.pack((idx + 1) & 0xFFFF))
        return head

    def rings(self) -> bytes:
        return self.mem.read(0, 0x4000)


# -- one hostile ring per kind ------------------------------------------------------------------------
@dataclass
class Case:
    build: Callable[[Ring], int]  # writes the ring, returns the head it offers
    where: tuple[bool, int] | None  # the failing descriptor: (in the indirect table?, index); None: a ring
    mem: Callable[[], GuestMemory] = one_region
    indirect: bool = True  # VIRTIO_RING_F_INDIRECT_DESC negotiated
    pop_only: bool = False  # a rule of the avail ring, not of the chain: the chain itself is fine


def good(r: Ring, head: int = 0) -> int:
    r.desc(head, BUF, 16, F_NEXT, head + 1)
    r.desc(head + 1, BUF + 0x100, 1, F_WRITE)
    return r.offer(head)


def _ring_not_mapped(r: Ring) -> int:
    h = good(r)
    r.q.mem = None
    return h


def _rings(desc: int, avail: int, used: int) -> Callable[[Ring], int]:
    def build(r: Ring) -> int:
        h = good(r)
        r.q.set_rings(desc, avail, used)
        return h
    return build


def _bad_avail_idx(r: Ring) -> int:
    h = good(r)
    r.mem.write(AVAIL_GPA + 2, U16.pack(r.num + 1))
    return h


def _indirect(r: Ring, length: int = 48, flags: int = F_INDIRECT, table: int = TABLE_GPA) -> int:
    r.desc(0, BUF, 16, F_NEXT, 1, table=TABLE_GPA)
    r.desc(1, BUF + 0x100, 16, F_NEXT, 2, table=TABLE_GPA)
    r.desc(2, BUF + 0x200, 1, F_WRITE, 0, table=TABLE_GPA)
    r.desc(3, table, length, flags)
    return r.offer(3)


def _simple(*descs: tuple[int, int, int, int]) -> Callable[[Ring], int]:
    """Descriptors 0.. of the direct table, chained as given; head 0."""
    def build(r: Ring) -> int:
        for i, (addr, length, flags, nxt) in enumerate(descs):
            r.desc(i, addr, length, flags, nxt)
        return r.offer(0)
    return build


def _nested(r: Ring) -> int:
    h = _indirect(r)
    r.desc(1, TABLE2_GPA, 48, F_INDIRECT, 0, table=TABLE_GPA)
    return h


def _too_many_sg(r: Ring) -> int:
    # an indirect table of 1024 buffers, each across the seam: two sg entries each; the 513th
    # would need entries 1025 and 1026
    n = 1024
    for i in range(n):
        r.desc(i, SEAM - 8, 16, F_WRITE | (F_NEXT if i < n - 1 else 0), i + 1, table=TABLE_GPA)
    r.desc(0, TABLE_GPA, 16 * n, F_INDIRECT)
    return r.offer(0)


def _too_many_sg_one_region_last(r: Ring) -> int:
    # 512 buffers across the seam fill the MAX_SG entries; the 513th lies in one region
    n = MAX_SG // 2 + 1
    for i in range(n - 1):
        r.desc(i, SEAM - 8, 16, F_WRITE | F_NEXT, i + 1, table=TABLE_GPA)
    r.desc(n - 1, BUF, 16, F_WRITE, 0, table=TABLE_GPA)
    r.desc(0, TABLE_GPA, 16 * n, F_INDIRECT)
    return r.offer(0)


CASES: dict[str, Case] = {
    K.RING_NOT_MAPPED: Case(_ring_not_mapped, None),
    K.RING_MISALIGNED: Case(_rings(DESC_GPA + 8, AVAIL_GPA, USED_GPA), None),
    K.RING_OUTSIDE_RAM: Case(_rings(DESC_GPA, AVAIL_GPA, RAM_SIZE + 0x1000), None),
    K.RING_CROSSES_REGION: Case(_rings(SEAM - 64, AVAIL_GPA, USED_GPA), None, mem=two_regions),
    K.BAD_AVAIL_IDX: Case(_bad_avail_idx, None, pop_only=True),
    K.HEAD_OUT_OF_RANGE: Case(lambda r: r.offer(r.num), (False, 8)),
    K.DESC_OUT_OF_RANGE: Case(_simple((BUF, 16, F_NEXT, 8)), (False, 8)),
    K.CHAIN_LOOP: Case(_simple((BUF, 16, F_NEXT, 1), (BUF, 16, F_NEXT, 0)), (False, 0)),
    K.ZERO_LENGTH: Case(_simple((BUF, 16, F_NEXT, 1), (BUF, 0, F_WRITE, 0)), (False, 1)),
    K.ADDRESS_OVERFLOW: Case(_simple((U64 - 256, 512, 0, 0)), (False, 0)),
    K.BUFFER_OUTSIDE_RAM: Case(_simple((BUF, 16, F_NEXT, 1), (RAM_SIZE, 16, F_WRITE, 0)), (False, 1)),
    K.BUFFER_IN_HOLE: Case(_simple((RAM_SIZE - 256, 512, 0, 0)), (False, 0)),
    K.TOO_MANY_SG: Case(_too_many_sg, (True, 512), mem=two_regions),
    K.CHAIN_TOO_BIG: Case(_simple((0x1000_0000, 0x8000_0001, F_NEXT, 1), (0x1000_0000, 0x8000_0001, F_WRITE, 0)),
                          (False, 1), mem=big_ram),
    K.READABLE_AFTER_WRITABLE: Case(_simple((BUF, 16, F_WRITE | F_NEXT, 1), (BUF, 16, 0, 0)), (False, 1)),
    K.INDIRECT_NOT_NEGOTIATED: Case(_indirect, (False, 3), indirect=False),
    K.INDIRECT_NOT_HEAD: Case(_simple((BUF, 16, F_NEXT, 1), (TABLE_GPA, 48, F_INDIRECT, 0)), (False, 1)),
    K.INDIRECT_NESTED: Case(_nested, (True, 1)),
    K.INDIRECT_WITH_NEXT: Case(lambda r: _indirect(r, flags=F_INDIRECT | F_NEXT), (False, 3)),
    K.INDIRECT_BAD_LENGTH: Case(lambda r: _indirect(r, length=40), (False, 3)),
    K.INDIRECT_TOO_BIG: Case(lambda r: _indirect(r, length=16 * 1025), (False, 3)),
    K.INDIRECT_OUTSIDE_RAM: Case(lambda r: _indirect(r, table=RAM_SIZE), (False, 3)),
}
# more than one way to break some rules: each must give the same kind
VARIANTS: dict[str, tuple[RingErrorKind, Case]] = {
    "ring straddles the end of RAM": (K.RING_OUTSIDE_RAM, Case(_rings(DESC_GPA, RAM_SIZE - 4, USED_GPA), None)),
    "misaligned used ring": (K.RING_MISALIGNED, Case(_rings(DESC_GPA, AVAIL_GPA, USED_GPA + 2), None)),
    "self loop": (K.CHAIN_LOOP, Case(_simple((BUF, 16, F_NEXT, 0)), (False, 0))),
    "loop in an indirect table": (K.CHAIN_LOOP, Case(
        lambda r: (_indirect(r), r.desc(2, BUF + 0x200, 1, F_WRITE | F_NEXT, 0, table=TABLE_GPA))[0], (True, 0))),
    "next out of range in an indirect table": (K.DESC_OUT_OF_RANGE, Case(
        lambda r: (_indirect(r), r.desc(2, BUF + 0x200, 1, F_WRITE | F_NEXT, 3, table=TABLE_GPA))[0], (True, 3))),
    "buffer across a hole between regions": (K.BUFFER_IN_HOLE, Case(
        _simple((SEAM - 256, 512, 0, 0)), (False, 0), mem=lambda: two_regions(gap=0x1000))),
    "buffer in the hole": (K.BUFFER_OUTSIDE_RAM, Case(
        _simple((SEAM + 0x10, 16, 0, 0)), (False, 0), mem=lambda: two_regions(gap=0x1000))),
    "indirect table length 0": (K.INDIRECT_BAD_LENGTH, Case(lambda r: _indirect(r, length=0), (False, 3))),
    "indirect table straddles the end of RAM": (K.INDIRECT_OUTSIDE_RAM, Case(
        lambda r: _indirect(r, table=RAM_SIZE - 16), (False, 3))),
    "indirect table into a hole": (K.INDIRECT_OUTSIDE_RAM, Case(
        lambda r: _indirect(r, table=SEAM - 16), (False, 3), mem=lambda: two_regions(gap=0x1000))),
    "too many sg, the last buffer in one region": (K.TOO_MANY_SG, Case(
        _too_many_sg_one_region_last, (True, MAX_SG // 2), mem=two_regions)),
}


def test_every_kind_has_a_hostile_ring() -> None:
    assert set(CASES) == set(RingErrorKind)


def check_case(kind: RingErrorKind, case: Case) -> None:
    r = Ring(case.mem(), indirect=case.indirect)
    try:
        head = case.build(r)
        rings_before = r.rings()
        with pytest.raises(VirtQueueError) as ei:
            r.q.pop()
        err = ei.value
        assert err.kind is kind
        assert r.q.last_avail_idx == 0 and r.q.inuse == 0 and r.q.popped == 0  # nothing consumed
        assert r.rings() == rings_before  # nothing written

        # what a monitor shows: the same walker, the same fault, nothing raised
        d = r.q.describe_chain(head)
        if case.pop_only:
            assert err.fault is None and d.fault is None and d.element is not None
        else:
            assert isinstance(d.fault, ChainFault) and d.fault.kind is kind
            assert d.fault == err.fault  # same kind, message, table, index and descriptor
            where = None if d.fault.index is None else (d.fault.indirect, d.fault.index)
            assert where == case.where
            assert d.element is None
            shown = d.fault.describe()
            assert shown["kind"] == kind.value
            if case.where is not None:
                assert (shown["desc"]["table"] == "indirect", shown["desc"]["index"]) == case.where
            else:
                assert "desc" not in shown
        assert r.rings() == rings_before

        # the device: needs reset, the error counted under its kind
        r.dev.process_queue(r.q)
        assert r.dev.broken
        assert r.q.errors == 1 and r.q.errors_by_kind == {kind: 1}
        st_ = r.q.status()
        assert st_["errors"] == 1 and st_["errors-by-kind"] == {kind.value: 1}
        assert r.q.used_idx == 0 and r.rings() == rings_before
    finally:
        r.close()


@pytest.mark.parametrize("kind", list(CASES))
def test_ring_error_kind(kind: str) -> None:
    check_case(RingErrorKind(kind), CASES[kind])


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_ring_error_variant(variant: str) -> None:
    kind, case = VARIANTS[variant]
    check_case(kind, case)


def test_the_good_chain_of_the_rigs_is_accepted() -> None:
    """The hostile rings above differ from this one by the rule they break."""
    r = Ring(one_region())
    try:
        head = good(r)
        d = r.q.describe_chain(head)
        e = r.q.pop()
        assert e is not None and d.fault is None and d.element == e
        assert [(a, n) for _ind, _i, a, n, _f, _nx in d.descs] == e.out_sg + e.in_sg
        r.q.push(e, 0)
        r.offer(head)
        r.dev.process_queue(r.q)
        assert not r.dev.broken and r.q.errors == 0 and r.q.errors_by_kind == {}
    finally:
        r.close()


def test_describe_chain_lists_at_most_limit_descriptors_and_still_validates() -> None:
    r = Ring(one_region())
    try:
        r.desc(0, BUF, 16, F_NEXT, 1)
        r.desc(1, BUF, 16, F_NEXT, 2)
        r.desc(2, BUF, 16, F_NEXT, 3)
        r.desc(3, BUF, 0, 0, 0)  # zero length, after the limit
        d = r.q.describe_chain(0, limit=2)
        assert d.truncated and [i for _ind, i, *_ in d.descs] == [0, 1]
        assert d.fault is not None and d.fault.kind is K.ZERO_LENGTH and d.fault.index == 3
        full = r.q.describe_chain(0)
        assert not full.truncated and [i for _ind, i, *_ in full.descs] == [0, 1, 2] and full.fault == d.fault
    finally:
        r.close()


# -- the walker's description and pop() agree, for any ring contents ------------------------------------
ADDRS = [BUF, BUF + 0x100, BUF + 0x800, TABLE_GPA, RAM_SIZE - 8, RAM_SIZE, U64 - 16]
LENS = [0, 1, 16, 40, 48, 96, 512]


def descs(n: int):
    return st.lists(st.tuples(st.sampled_from(ADDRS), st.sampled_from(LENS), st.integers(0, 7), st.integers(0, 9)),
                    min_size=n, max_size=n)


def linked_order(mem: GuestMemory, num: int, head: int, n: int) -> list[tuple[bool, int]]:
    """The first *n* (in the indirect table?, index) positions from *head*, following an indirect
    descriptor once and NEXT links -- no rule checked (an independent model of the walk order)."""
    out: list[tuple[bool, int]] = []
    table, tlen, i, ind = DESC_GPA, num, head, False
    while len(out) < n:
        out.append((ind, i))
        if i >= tlen:
            break
        addr, length, flags, nxt = DESC.unpack(mem.read(table + 16 * i, 16))
        if flags & F_INDIRECT and not ind:
            table, tlen, i, ind = addr, length // 16, 0, True
            continue
        if not flags & F_NEXT:
            break
        i = nxt
    return out


@settings(deadline=None, max_examples=400, suppress_health_check=[HealthCheck.too_slow])
@given(num=st.sampled_from([4, 8]), indirect=st.booleans(), head=st.integers(0, 8), data=st.data())
def test_walker_description_agrees_with_pop(num: int, indirect: bool, head: int, data) -> None:
    r = Ring(one_region(), num=num, indirect=indirect)
    try:
        for i, d in enumerate(data.draw(descs(num), label="descriptor table")):
            r.desc(i, *d)
        for i, d in enumerate(data.draw(descs(6), label="indirect table")):
            r.desc(i, *d, table=TABLE_GPA)
        r.offer(head)
        desc = r.q.describe_chain(head)
        try:
            elem = r.q.pop()
            err = None
        except VirtQueueError as e:
            elem, err = None, e
        if err is not None:
            # the same verdict: kind, message, failing descriptor and its contents
            assert desc.fault == err.fault and desc.fault is not None and desc.fault.kind is err.kind
            assert desc.element is None
            assert r.q.last_avail_idx == 0 and r.q.inuse == 0
        else:
            assert elem is not None and desc.fault is None
            assert desc.element == elem
            # the descriptors listed are exactly the buffers pop() took (one region: one sg entry each)
            bufs = [(a, n) for _ind, _i, a, n, f, _nx in desc.descs if not f & F_INDIRECT]
            assert bufs == elem.out_sg + elem.in_sg
        # the prefix (and the failing descriptor) follow the chain's links
        where = [(ind, i) for ind, i, *_ in desc.descs]
        fault = desc.fault
        if fault is not None:
            where.append((fault.indirect, fault.index))
        assert where == linked_order(r.mem, num, head, len(where))
    finally:
        r.close()


# -- a machine's monitor shows what the device refuses ------------------------------------------------
def _avail_u16(m, gpa: int) -> int:
    return U16.unpack(m.memory.read(gpa, 2))[0]


HOSTILE = {
    # head -> next -> head: a loop
    K.CHAIN_LOOP: lambda d, buf: [(d, (buf, 16, F_NEXT, d + 1)), (d + 1, (buf, 16, F_NEXT, d))],
    # a device-readable buffer after a writable one
    K.READABLE_AFTER_WRITABLE: lambda d, buf: [(d, (buf, 16, F_WRITE | F_NEXT, d + 1)), (d + 1, (buf, 16, 0, 0))],
}


@pytest.fixture
def describe_faults(request, monkeypatch):
    monkeypatch.setattr(queue_mod, "DESCRIBE_FAULTS", request.param)
    return request.param


@pytest.mark.slow
@pytest.mark.parametrize("describe_faults", [True, False], ids=["fix", "fix-off"], indirect=True)
@pytest.mark.parametrize("kind", list(HOSTILE))
def test_machine_monitor_shows_the_chain_the_device_refuses(workdir, kind, describe_faults):
    """x-query-virtio-queue-element on a chain the device refuses: the valid prefix, and an
    ``error`` with the kind and the failing descriptor -- the kind the device then counts when
    kicked.  Fix off (the monitor's description without the fault): it looks like a good chain."""
    with running_machine(machine_toml(devices=blk("blk0", size="4M"))) as m:
        path = os.path.join(workdir, "m.qmp")
        m.start_monitor(path)
        qpath = "/machine/peripheral/blk0/virtio-backend"
        with QMPClient(path, timeout=30) as mon:
            mon.connect()
            st0 = mon.execute("x-query-virtio-queue-status", {"path": qpath, "queue": 0})
            assert st0["avail-idx"] == st0["last-avail-idx"], "the device must be idle"
            q = m.device("blk0").vdev.queues[0]
            n, last = q.num, q.get_last_avail_idx()
            slot = last % n
            head = n - 2  # two descriptors the idle guest driver holds none of (free)
            buf = q.desc  # any RAM: nothing is read or written through it
            os.kill(m.guest_pid, signal.SIGSTOP)  # the guest's driver stays out of its ring meanwhile
            try:
                for i, d in HOSTILE[kind](head, buf):
                    m.memory.write(q.desc + 16 * i, DESC.pack(*d))
                m.memory.write(q.avail + 4 + 2 * slot, U16.pack(head))
                el = mon.execute("x-query-virtio-queue-element", {"path": qpath, "queue": 0})
            finally:
                # (running again before the device is kicked: it raises a config interrupt the
                # guest's hypervisor half must take)
                os.kill(m.guest_pid, signal.SIGCONT)
            assert el["index"] == head
            if not describe_faults:
                assert "error" not in el  # the chain the device refuses looks like a good one
                return
            assert el["error"]["kind"] == kind.value
            failing = el["error"]["desc"]
            assert failing["table"] == "desc" and failing["index"] in (head, head + 1)
            assert len(el["descs"]) >= 1  # the valid prefix
            # publish it and kick: the device refuses it with the kind the monitor showed
            m.memory.write(q.avail + 2, U16.pack((last + 1) & 0xFFFF))
            mon.execute("x-debug-device-event", {"dev": "blk0", "event": "kick", "queue": 0})
            wait_for(lambda: mon.execute("x-query-virtio-queue-status", {"path": qpath, "queue": 0})["errors"],
                     60, "the device to meet the chain")
            st1 = mon.execute("x-query-virtio-queue-status", {"path": qpath, "queue": 0})
            assert st1["errors-by-kind"] == {kind.value: 1}
            assert "VIRTIO_CONFIG_S_NEEDS_RESET: Irrecoverable error, device needs reset" in mon.execute(
                "x-query-virtio-status", {"path": qpath})["status"]["statuses"]
            again = mon.execute("x-query-virtio-queue-element", {"path": qpath, "queue": 0, "index": slot})
            assert again["error"] == el["error"]
