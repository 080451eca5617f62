"""VirtQueue on its own: pop/push, index checks, notification suppression, status(), barriers."""

from __future__ import annotations

import platform
import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kickcall.memory import GuestMemory
from kickcall.virtio import ring
from kickcall.virtio.queue import RingErrorKind as K
from kickcall.virtio.queue import VirtQueue, VirtQueueElement, VirtQueueError
from kickcall.virtio.ring import mb, vring_need_event

RAM_SIZE = 1 << 20
DESC_GPA, AVAIL_GPA, USED_GPA = 0x1000, 0x2000, 0x3000
BUF = 0x10000
F_NEXT, F_WRITE, F_INDIRECT = 1, 2, 4
AVAIL_F_NO_INTERRUPT = 1
USED_F_NO_NOTIFY = 1

DESC = struct.Struct("<QIHH")
U16 = struct.Struct("<H")
USED_ELEM = struct.Struct("<II")

HYP = settings(deadline=None, print_blob=True, max_examples=300,
               suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])

QEMU_STATUS_FIELDS = {
    "name", "queue-index", "inuse", "vring-num", "vring-num-default", "vring-align", "vring-desc",
    "vring-avail", "vring-used", "last-avail-idx", "shadow-avail-idx", "used-idx", "signalled-used",
    "signalled-used-valid",
}


class Ring:
    """A VirtQueue over 1 MiB of RAM, with the driver's side written by hand."""

    def __init__(self, num: int = 8, event_idx: bool = False, indirect: bool = False) -> None:
        self.mem = GuestMemory.create(RAM_SIZE)
        self.num = num
        self.q = VirtQueue(3, num, name="t.vq3")
        self.q.mem = self.mem
        self.q.event_idx = event_idx
        self.q.indirect = indirect
        self.q.set_rings(DESC_GPA, AVAIL_GPA, USED_GPA)
        self.q.enabled = True

    def close(self) -> None:
        self.q.unmap()
        self.mem.close()

    # driver side
    def desc(self, i: int, addr: int, length: int, flags: int = 0, nxt: int = 0, table: int = DESC_GPA) -> None:
        self.mem.write(table + 16 * i, DESC.pack(addr, length, flags, nxt))

    def set_avail_idx(self, v: int) -> None:
        self.mem.write(AVAIL_GPA + 2, U16.pack(v & 0xFFFF))

    def set_avail_slot(self, slot: int, head: int) -> None:
        self.mem.write(AVAIL_GPA + 4 + 2 * slot, U16.pack(head))

    def set_avail_flags(self, v: int) -> None:
        self.mem.write(AVAIL_GPA, U16.pack(v))

    def set_used_event(self, v: int) -> None:
        self.mem.write(AVAIL_GPA + 4 + 2 * self.num, U16.pack(v & 0xFFFF))

    def offer(self, head: int) -> None:
        """Put *head* in the next avail slot and publish it."""
        idx = U16.unpack(self.mem.read(AVAIL_GPA + 2, 2))[0]
        self.set_avail_slot(idx % self.num, head)
        self.set_avail_idx(idx + 1)

    # device side, read back from RAM
    def used_flags(self) -> int:
        return U16.unpack(self.mem.read(USED_GPA, 2))[0]

    def used_idx(self) -> int:
        return U16.unpack(self.mem.read(USED_GPA + 2, 2))[0]

    def used_elem(self, slot: int) -> tuple[int, int]:
        return USED_ELEM.unpack(self.mem.read(USED_GPA + 4 + 8 * slot, 8))

    def avail_event(self) -> int:
        return U16.unpack(self.mem.read(USED_GPA + 4 + 8 * self.num, 2))[0]

    def ram(self) -> bytes:
        return self.mem.read(0, RAM_SIZE)


@pytest.fixture
def r():
    x = Ring()
    yield x
    x.close()


@pytest.fixture
def rei():
    x = Ring(event_idx=True)
    yield x
    x.close()


def simple_chain(rg: Ring, head: int = 0) -> None:
    """head: 16 readable bytes -> 1 writable byte."""
    rg.desc(head, BUF, 16, F_NEXT, head + 1)
    rg.desc(head + 1, BUF + 0x100, 1, F_WRITE)


# -- pop ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("event_idx", [False, True])
def test_pop_on_an_empty_ring_returns_none_and_writes_nothing(event_idx):
    rg = Ring(event_idx=event_idx)
    try:
        before = rg.ram()
        assert rg.q.pop() is None
        assert rg.q.last_avail_idx == 0 and rg.q.inuse == 0
        assert rg.ram() == before
        assert rg.q.is_empty()
    finally:
        rg.close()


def test_pop_returns_the_chain(r):
    r.desc(5, BUF, 16, F_NEXT, 2)
    r.desc(2, BUF + 0x100, 100, F_NEXT, 7)
    r.desc(7, BUF + 0x200, 512, F_WRITE | F_NEXT, 0)
    r.desc(0, BUF + 0x400, 1, F_WRITE)
    r.offer(5)
    assert not r.q.is_empty()
    e = r.q.pop()
    assert isinstance(e, VirtQueueElement)
    assert e.index == 5
    assert e.out_sg == [(BUF, 16), (BUF + 0x100, 100)]
    assert e.in_sg == [(BUF + 0x200, 512), (BUF + 0x400, 1)]
    assert (e.out_len, e.in_len, e.ndescs, e.indirect) == (116, 513, 4, False)
    assert r.q.last_avail_idx == 1 and r.q.shadow_avail_idx == 1 and r.q.inuse == 1
    assert r.q.pop() is None


def test_queue_element_shows_the_chain_a_slot_holds_and_changes_nothing(r):
    """QEMU's VirtioQueueElement for the monitors: the chain at an avail slot, the ring fields, and
    nothing written; a slot holding a head beyond the queue, or a queue with no size, is refused."""
    r.desc(5, BUF, 16, F_NEXT, 2)
    r.desc(2, BUF + 0x400, 1, F_WRITE)
    r.offer(5)
    before = r.ram()
    el = r.q.queue_element(0, r.mem, "virtio-blk")
    assert el["index"] == 5 and el["name"] == "virtio-blk" and "error" not in el
    assert [(d["addr"], d["len"]) for d in el["descs"]] == [(BUF, 16), (BUF + 0x400, 1)]
    assert el["avail"] == {"flags": 0, "idx": 1, "ring": 5} and el["used"] == {"flags": 0, "idx": 0}
    assert r.ram() == before and r.q.get_last_avail_idx() == 0
    r.set_avail_slot(1, r.q.num)  # a head one past the last descriptor
    with pytest.raises(ValueError):
        r.q.queue_element(1, r.mem, "virtio-blk")
    empty = VirtQueue(0, 8, name="t.vq0")
    empty.num = 0  # a driver or front-end that never set the size
    with pytest.raises(ValueError):
        empty.queue_element(0, r.mem, "virtio-blk")


def test_pop_through_an_indirect_table():
    rg = Ring(indirect=True)
    try:
        t = BUF + 0x1000
        rg.desc(0, BUF, 16, F_NEXT, 2, table=t)
        rg.desc(2, BUF + 0x100, 8, F_WRITE | F_NEXT, 1, table=t)
        rg.desc(1, BUF + 0x200, 1, F_WRITE, 0, table=t)
        rg.desc(4, t, 48, F_INDIRECT)
        rg.offer(4)
        e = rg.q.pop()
        assert e.index == 4 and e.indirect and e.ndescs == 3
        assert e.out_sg == [(BUF, 16)] and e.in_sg == [(BUF + 0x100, 8), (BUF + 0x200, 1)]
    finally:
        rg.close()


@pytest.mark.parametrize("last", [0, 5, 0xFFFE, 0xFFFF])
def test_avail_idx_more_than_queue_size_ahead_raises(r, last):
    simple_chain(r)
    r.q.last_avail_idx = r.q.shadow_avail_idx = last
    for k in range(r.num):
        r.set_avail_slot(k, 0)
    r.set_avail_idx(last + r.num + 1)
    before = r.ram()
    with pytest.raises(VirtQueueError) as ei:
        r.q.pop()
    assert ei.value.kind is K.BAD_AVAIL_IDX
    assert r.q.last_avail_idx == last and r.q.inuse == 0
    assert r.ram() == before
    # exactly queue-size ahead is fine
    r.set_avail_idx(last + r.num)
    e = r.q.pop()
    assert e is not None and e.index == 0
    assert r.q.last_avail_idx == (last + 1) & 0xFFFF


def test_pop_with_event_idx_publishes_avail_event(rei):
    simple_chain(rei, 0)
    simple_chain(rei, 2)
    rei.offer(0)
    rei.offer(2)
    rei.q.pop()
    assert rei.avail_event() == 1
    rei.q.pop()
    assert rei.avail_event() == 2
    assert rei.q.pop() is None
    assert rei.avail_event() == 2


def test_pop_with_event_idx_at_wraparound(rei):
    simple_chain(rei, 0)
    rei.q.last_avail_idx = rei.q.shadow_avail_idx = 0xFFFF
    rei.set_avail_idx(0xFFFF)
    rei.offer(0)
    assert rei.q.pop().index == 0
    assert rei.q.last_avail_idx == 0 and rei.avail_event() == 0


def test_pop_without_event_idx_leaves_avail_event_alone(r):
    simple_chain(r)
    r.mem.write(USED_GPA + 4 + 8 * r.num, U16.pack(0xBEEF))
    r.offer(0)
    r.q.pop()
    assert r.avail_event() == 0xBEEF


def test_invalid_chain_is_not_consumed(rei):
    rei.desc(0, BUF, 16, F_NEXT, 0)  # loops on itself
    rei.offer(0)
    before = rei.ram()
    with pytest.raises(VirtQueueError) as ei:
        rei.q.pop()
    assert ei.value.kind is K.CHAIN_LOOP
    assert rei.q.last_avail_idx == 0 and rei.q.inuse == 0
    assert rei.ram() == before


@pytest.mark.parametrize("rings,kind", [
    ((RAM_SIZE, AVAIL_GPA, USED_GPA), K.RING_OUTSIDE_RAM),  # descriptor table past the end of RAM
    ((RAM_SIZE - 64, AVAIL_GPA, USED_GPA), K.RING_OUTSIDE_RAM),  # ... straddling the end
    ((DESC_GPA, RAM_SIZE - 4, USED_GPA), K.RING_OUTSIDE_RAM),  # avail ring straddling the end
    ((DESC_GPA, AVAIL_GPA, RAM_SIZE + 0x1000), K.RING_OUTSIDE_RAM),  # used ring outside RAM
    ((DESC_GPA, AVAIL_GPA, (1 << 64) - 64), K.RING_OUTSIDE_RAM),  # ... near 2**64
    ((DESC_GPA + 8, AVAIL_GPA, USED_GPA), K.RING_MISALIGNED),  # misaligned descriptor table
    ((DESC_GPA, AVAIL_GPA + 1, USED_GPA), K.RING_MISALIGNED),  # misaligned avail ring
    ((DESC_GPA, AVAIL_GPA, USED_GPA + 2), K.RING_MISALIGNED),  # misaligned used ring
])
def test_rings_outside_ram_or_misaligned_make_pop_raise(r, rings, kind):
    r.q.set_rings(*rings)
    with pytest.raises(VirtQueueError) as ei:
        r.q.pop()
    assert ei.value.kind is kind
    with pytest.raises(VirtQueueError) as ei:
        r.q.push(VirtQueueElement(0), 0)
    assert ei.value.kind is kind
    # the monitors' description says the same, without raising
    assert r.q.describe_chain(0).fault.kind is kind


def test_queue_size_must_be_a_power_of_two():
    for bad in (0, 3, 12, 2048):
        with pytest.raises(ValueError):
            VirtQueue(0, bad)
    q = VirtQueue(0, 16)
    assert not q.set_num(3) and not q.set_num(32) and not q.set_num(0)
    assert q.set_num(4) and q.num == 4


# -- push ----------------------------------------------------------------------------------------------

def test_push_writes_the_used_element_and_index(r):
    simple_chain(r)
    r.offer(0)
    e = r.q.pop()
    r.q.push(e, 7)
    assert r.used_elem(0) == (0, 7)
    assert r.used_idx() == 1 and r.q.used_idx == 1 and r.q.inuse == 0


def test_push_wraps_the_used_index(r):
    r.q.used_idx = 0xFFFE
    for k, head in enumerate([3, 1, 6]):
        r.q.push(VirtQueueElement(head), 100 + k)
    # slots 0xFFFE % 8 = 6, 7, then 0
    assert [r.used_elem(s) for s in (6, 7, 0)] == [(3, 100), (1, 101), (6, 102)]
    assert r.used_idx() == 1 and r.q.used_idx == 1


# -- notification suppression ------------------------------------------------------------------------------

def test_should_notify_without_event_idx_honours_no_interrupt(r):
    r.set_used_event(0)  # ignored without EVENT_IDX
    assert r.q.should_notify()
    r.set_avail_flags(AVAIL_F_NO_INTERRUPT)
    assert not r.q.should_notify()
    r.q.push(VirtQueueElement(0), 0)
    assert not r.q.should_notify()
    r.set_avail_flags(0)
    assert r.q.should_notify()
    assert r.q.calls_requested == 4 and r.q.calls_suppressed == 2


def test_should_notify_with_event_idx_first_call_is_always_true(rei):
    rei.set_used_event(0x7777)  # far from any index: would suppress
    assert not rei.q.signalled_used_valid
    assert rei.q.should_notify()
    assert rei.q.signalled_used_valid and rei.q.signalled_used == 0
    assert not rei.q.should_notify()  # nothing new: (0, 0] is empty
    # NO_INTERRUPT means nothing once EVENT_IDX is negotiated
    rei.set_avail_flags(AVAIL_F_NO_INTERRUPT)
    rei.set_used_event(0)
    rei.q.push(VirtQueueElement(0), 0)
    assert rei.q.should_notify()


def need_event_brute(event: int, new: int, old: int) -> bool:
    """Did the used index step *past* used_event while going from old to new (mod 2**16)?

    The driver's used_event E asks for a call when the device writes the used element numbered E,
    i.e. when used.idx moves from E to E+1: E is one of old, old+1, .., new-1 -- equivalently E+1
    lies in (old, new].  (Linux/QEMU vring_need_event; virtio spec 2.7.7.)
    """
    n = (new - old) & 0xFFFF  # how many elements were published
    end = old + n  # the indices old .. end-1, unwrapped
    if end <= 0x10000:
        return event in range(old, end)
    return event in range(old, 0x10000) or event in range(0, end - 0x10000)


u16_near_wrap = st.one_of(st.integers(0, 40), st.integers(0xFFFF - 40, 0xFFFF), st.integers(0x7FF0, 0x8010),
                          st.integers(0, 0xFFFF))


@HYP
@given(start=u16_near_wrap,
       steps=st.lists(st.tuples(st.integers(0, 20), st.one_of(st.integers(-3, 24), st.integers(0, 0xFFFF))),
                      min_size=1, max_size=12))
def test_should_notify_with_event_idx_follows_vring_need_event(start, steps):
    """Push k elements, set used_event, ask: after the first call, True iff used.idx stepped past
    used_event since the last call (used_event+1 in (signalled_used, used_idx])."""
    rg = Ring(event_idx=True)
    try:
        q = rg.q
        q.used_idx = start
        old, first = None, True
        for k, ev in steps:
            for _ in range(k):
                q.push(VirtQueueElement(0), 0)
            new = q.used_idx
            event = (start + ev) & 0xFFFF if ev < 25 else ev  # mostly near the indices
            rg.set_used_event(event)
            want = True if first else need_event_brute(event, new, old)
            assert q.should_notify() == want, (event, new, old)
            assert q.signalled_used == new and q.signalled_used_valid
            old, first = new, False
    finally:
        rg.close()


def test_set_notification_with_event_idx_writes_avail_event(rei):
    rei.set_avail_idx(0x1234)
    before = rei.ram()
    rei.q.set_notification(False)
    assert rei.ram() == before  # disabling writes nothing with EVENT_IDX
    assert rei.q.notification is False
    rei.q.set_notification(True)
    assert rei.avail_event() == 0x1234
    assert rei.q.notification is True
    assert rei.used_flags() == 0


def test_set_notification_without_event_idx_toggles_no_notify(r):
    r.mem.write(USED_GPA, U16.pack(0x8000))  # another bit, to be preserved
    r.q.set_notification(False)
    assert r.used_flags() == 0x8000 | USED_F_NO_NOTIFY
    r.q.set_notification(True)
    assert r.used_flags() == 0x8000
    assert r.avail_event() == 0


# -- vring_need_event ----------------------------------------------------------------------------------------

@settings(HYP, max_examples=300)
@given(event=u16_near_wrap, new=u16_near_wrap, old=u16_near_wrap)
def test_vring_need_event_matches_brute_force(event, new, old):
    assert vring_need_event(event, new, old) == need_event_brute(event, new, old)


def test_vring_need_event_exhaustive_around_the_wrap():
    window = list(range(0xFFF8, 0x10000)) + list(range(0, 8))
    for event in window:
        for new in window:
            for old in window:
                assert vring_need_event(event, new, old) == need_event_brute(event, new, old), (event, new, old)


# -- status and barriers -------------------------------------------------------------------------------------

def test_status_has_qemus_fields(r):
    simple_chain(r)
    r.offer(0)
    r.q.pop()
    st_ = r.q.status()
    assert set(st_) == QEMU_STATUS_FIELDS | {"errors", "errors-by-kind"}  # QEMU's, and the ring error counts
    assert st_["errors"] == 0 and st_["errors-by-kind"] == {}
    assert st_["name"] == "t.vq3" and st_["queue-index"] == 3
    assert st_["vring-num"] == 8 and st_["vring-num-default"] == 8 and st_["vring-align"] == 4096
    assert (st_["vring-desc"], st_["vring-avail"], st_["vring-used"]) == (DESC_GPA, AVAIL_GPA, USED_GPA)
    assert st_["last-avail-idx"] == 1 and st_["shadow-avail-idx"] == 1 and st_["inuse"] == 1
    assert st_["used-idx"] == 0 and st_["signalled-used"] == 0 and st_["signalled-used-valid"] is False


def test_mb_runs_and_is_a_locked_instruction_on_x86_64():
    for _ in range(3):
        assert mb() is None
    if platform.machine() in ("x86_64", "AMD64"):
        assert ring.MB_KIND == "lock-cmpxchg"
    else:
        assert ring.MB_KIND in ("lock-cmpxchg", "mutex")


# -- the driver's view of a restart from used.idx (what the crash tests gate on) ---------------------------

def _driver_and_device(num: int = 8):
    from kickcall.guest.virtio_ring import Vring

    mem = GuestMemory.create(RAM_SIZE)
    nxt = [0x10000]

    def alloc(size: int, align: int) -> int:
        a = (nxt[0] + align - 1) & ~(align - 1)
        nxt[0] = a + size
        return a

    drv = Vring(mem, alloc, 0, num, event_idx=True, indirect=False, notify=lambda vq: None)
    q = VirtQueue(0, num, name="t.vq0")
    q.mem = mem
    q.event_idx = True
    q.set_rings(drv.desc, drv.avail, drv.used)
    q.enabled = True
    return mem, drv, q


@pytest.mark.parametrize("order", ["in-order", "out-of-order"])
def test_restart_view_is_exact_only_when_the_completions_are_a_prefix(order):
    mem, drv, q = _driver_and_device()
    try:
        with drv.lock:
            for i in range(4):
                assert drv.add([(0x80000 + 64 * i, 16)], [(0x90000 + i, 1)], f"req{i}")
        taken = [q.pop() for _ in range(4)]
        done = taken[:2] if order == "in-order" else [taken[0], taken[2]]
        for e in done:
            q.push(e, 1)
        v = drv.restart_view()
        # the driver has not reaped the used entries yet: they count as returned, not outstanding
        assert v["used"] == 2 and v["avail"] == 4 and len(v["outstanding"]) == 2
        assert v["exact"] is (order == "in-order")
        with drv.lock:
            while drv.get_buf() is not None:
                pass
        assert drv.restart_view() == v  # reaping changes nothing
    finally:
        q.unmap()
        drv.release()
        mem.close()


# -- the public index operations (what vhost and the monitors use) -------------------------------------------

def test_last_avail_idx_get_set_and_restore(r):
    simple_chain(r)
    assert r.q.get_last_avail_idx() == 0
    r.q.set_last_avail_idx(0xFFFF)  # SET_VRING_BASE: pop resumes there, the shadow with it
    assert r.q.get_last_avail_idx() == 0xFFFF and r.q.shadow_avail_idx == 0xFFFF
    r.set_avail_idx(0xFFFF)
    r.offer(0)
    assert r.q.pop().index == 0 and r.q.get_last_avail_idx() == 0
    for bad in (-1, 0x10000):
        with pytest.raises(ValueError):
            r.q.set_last_avail_idx(bad)
    assert r.q.get_last_avail_idx() == 0
    r.q.set_used_idx(0xFFFE)
    r.q.restore_last_avail_idx()  # forget what was popped: resume at the used index
    assert r.q.get_last_avail_idx() == 0xFFFE and r.q.shadow_avail_idx == 0xFFFE


def test_used_idx_get_set_and_update_from_the_ring(r):
    r.q.set_used_idx(5)
    assert r.q.get_used_idx() == 5
    r.q.push(VirtQueueElement(0), 1)
    assert r.used_idx() == 6 and r.used_elem(5) == (0, 1)
    with pytest.raises(ValueError):
        r.q.set_used_idx(0x10000)
    r.mem.write(USED_GPA + 2, U16.pack(0x1234))  # someone else (a vhost back-end) pushed meanwhile
    r.q.update_used_idx()
    assert r.q.get_used_idx() == 0x1234
    r.q.push(VirtQueueElement(2), 0)
    assert r.used_idx() == 0x1235


def test_invalidate_signalled_used_makes_the_next_should_notify_true(rei):
    rei.set_used_event(0x7777)
    assert rei.q.should_notify()  # the first one always signals
    assert not rei.q.should_notify()
    rei.q.invalidate_signalled_used()
    assert rei.q.should_notify()


def test_update_used_idx_on_rings_outside_ram_raises_with_a_kind(r):
    r.q.set_rings(DESC_GPA, AVAIL_GPA, RAM_SIZE)
    with pytest.raises(VirtQueueError) as ei:
        r.q.update_used_idx()
    assert ei.value.kind is K.RING_OUTSIDE_RAM
