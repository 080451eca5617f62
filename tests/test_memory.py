"""GuestMemory (memfd RAM, bounds checks), parse_size, IORegion / AddressSpace with eventfds."""

from __future__ import annotations

import os

import pytest
from hypothesis import given
from hypothesis import strategies as st

from kickcall.memory import (
    AddressSpace,
    GuestMemory,
    GuestMemoryError,
    IORegion,
    RamBlock,
    parse_size,
)
from kickcall.notify import EventNotifier

MB = 1 << 20
U64_ALL = (1 << 64) - 1


@pytest.fixture
def mem():
    m = GuestMemory.create(MB)
    try:
        yield m
    finally:
        m.close()


def two_region_memory() -> GuestMemory:
    """RAM at [0, 0x1000) and [0x2000, 0x3000), a hole in between, two blocks."""
    m = GuestMemory()
    m.add_region(0, 0x1000, RamBlock(0x1000, "lo"))
    m.add_region(0x2000, 0x1000, RamBlock(0x1000, "hi"))
    return m


@pytest.fixture
def holey():
    m = two_region_memory()
    try:
        yield m
    finally:
        m.close()


# -- access ------------------------------------------------------------------------------------------

def test_create_is_zeroed_memfd_ram(mem):
    assert mem.size == MB
    assert mem.regions == [(0, MB)]
    assert mem.read(0, 16) == bytes(16)
    assert mem.read(MB - 16, 16) == bytes(16)


def test_read_write_round_trips(mem):
    mem.write(0x100, b"hello guest")
    assert mem.read(0x100, 11) == b"hello guest"
    mem.write(0x200, bytearray(b"\x01\x02"))
    mem.write(0x202, memoryview(b"\x03\x04"))
    assert mem.read(0x200, 4) == b"\x01\x02\x03\x04"
    mem.write_u16(0x300, 0xBEEF)
    mem.write_u32(0x310, 0xDEADBEEF)
    mem.write_u64(0x320, 0x0123456789ABCDEF)
    assert mem.read_u16(0x300) == 0xBEEF
    assert mem.read_u32(0x310) == 0xDEADBEEF
    assert mem.read_u64(0x320) == 0x0123456789ABCDEF
    assert mem.read(0x300, 2) == b"\xef\xbe"  # little endian
    assert mem.read(0x320, 8) == bytes.fromhex("efcdab8967452301")
    mem.write_u16(0x330, 0x12345)  # truncated to the width
    assert mem.read_u16(0x330) == 0x2345
    assert mem.read_u16(0x332) == 0
    mem.write(MB - 4, b"last")  # the very end of RAM
    assert mem.read(MB - 4, 4) == b"last"
    assert mem.read_u32(MB - 4) == int.from_bytes(b"last", "little")


def test_fill_and_view(mem):
    mem.fill(0x40, 8, 0xAA)
    assert mem.read(0x3F, 10) == b"\x00" + b"\xaa" * 8 + b"\x00"
    v = mem.view(0x40, 4)
    try:
        v[:] = b"wxyz"
    finally:
        v.release()
    assert mem.read(0x40, 4) == b"wxyz"


BAD_ACCESSES_1M = [
    (-1, 1),
    (-8, 8),
    (MB, 1),
    (MB + 0x1000, 4),
    (MB - 1, 2),
    (MB - 4, 8),
    (0, MB + 1),
    (0, 1 << 64),
    (0x1000, 1 << 70),
    (1 << 64, 1),
]


@pytest.mark.parametrize("gpa,length", BAD_ACCESSES_1M)
def test_out_of_range_access_raises_and_changes_nothing(mem, gpa, length):
    mem.write(MB - 8, b"\x11" * 8)
    mem.write(0, b"\x22" * 8)
    mem.read(0x10, 4)  # warm the translation cache
    before = mem.digest_regions()
    assert not mem.contains(gpa, length)
    with pytest.raises(GuestMemoryError):
        mem.read(gpa, length)
    with pytest.raises(GuestMemoryError):
        mem.check(gpa, length)
    with pytest.raises(GuestMemoryError):
        mem.translate(gpa, length)
    with pytest.raises(GuestMemoryError):
        mem.fill(gpa, length, 0xFF)  # refused before anything is allocated or written
    if length <= 16:
        with pytest.raises(GuestMemoryError):
            mem.write(gpa, b"\xff" * length)
    if length == 8:
        with pytest.raises(GuestMemoryError):
            mem.write_u64(gpa, U64_ALL)
        with pytest.raises(GuestMemoryError):
            mem.read_u64(gpa)
    assert mem.digest_regions() == before



@pytest.mark.parametrize("width", [2, 4, 8])
def test_typed_access_straddling_the_end(mem, width):
    gpa = MB - width + 1
    reader = {2: mem.read_u16, 4: mem.read_u32, 8: mem.read_u64}[width]
    writer = {2: mem.write_u16, 4: mem.write_u32, 8: mem.write_u64}[width]
    before = mem.digest_regions()
    with pytest.raises(GuestMemoryError):
        reader(gpa)
    with pytest.raises(GuestMemoryError):
        writer(gpa, U64_ALL)
    assert mem.digest_regions() == before


@pytest.mark.parametrize("gpa,length", [
    (0xFFF, 2),  # crosses from the first region into the hole
    (0x800, 0x1000),
    (0x1000, 1),  # starts in the hole
    (0x1FFF, 2),  # crosses from the hole into the second region
    (0xFF0, 0x1020),  # spans the whole hole into the second region
    (0x2FFF, 2),  # past the end of the second region
    (0x3000, 1),
])
def test_access_touching_a_hole_raises_and_changes_nothing(holey, gpa, length):
    holey.write(0xFF0, b"\x5a" * 16)
    holey.write(0x2000, b"\xa5" * 16)
    before = holey.digest_regions()
    assert not holey.contains(gpa, length)
    with pytest.raises(GuestMemoryError):
        holey.read(gpa, length)
    with pytest.raises(GuestMemoryError):
        holey.write(gpa, b"\xee" * length)
    with pytest.raises(GuestMemoryError):
        holey.fill(gpa, length, 0xEE)
    assert holey.digest_regions() == before


def test_two_regions_are_separate_ram(holey):
    holey.write(0xFFC, b"ab12")
    holey.write(0x2000, b"cd34")
    assert holey.read(0xFFC, 4) == b"ab12"
    assert holey.read(0x2000, 4) == b"cd34"
    assert holey.size == 0x2000
    assert holey.regions == [(0, 0x1000), (0x2000, 0x1000)]


def test_negative_length_is_refused_whether_or_not_the_cache_is_warm(mem):
    # cold translation cache
    assert not mem.contains(0x100, -1)
    with pytest.raises(GuestMemoryError):
        mem.read(0x100, -1)
    # warm it with a good access to the same region; the answer must not change
    mem.read(0x0, 4)
    assert not mem.contains(0x100, -1)
    with pytest.raises(GuestMemoryError):
        mem.read(0x100, -1)


# -- regions and sharing -----------------------------------------------------------------------------

def test_add_region_refuses_overlap_and_bad_geometry():
    m = GuestMemory()
    blk = RamBlock(0x4000, "blk")
    try:
        m.add_region(0x1000, 0x1000, blk, 0)
        for gpa, size in [(0x1000, 0x1000), (0x800, 0x1000), (0x1800, 0x100), (0, 0x3000)]:
            with pytest.raises(GuestMemoryError):
                m.add_region(gpa, size, blk, 0x2000)
        with pytest.raises(GuestMemoryError):
            m.add_region(-0x1000, 0x1000, blk, 0)
        with pytest.raises(GuestMemoryError):
            m.add_region(0x8000, 0, blk, 0)
        with pytest.raises(GuestMemoryError):
            m.add_region(0x8000, 0x1000, blk, 0x3800)  # exceeds the block
        assert m.regions == [(0x1000, 0x1000)]
        m.add_region(0x2000, 0x1000, blk, 0x1000)  # adjacent: fine
        m.add_region(0, 0x1000, blk, 0x3000)
        assert m.regions == [(0, 0x1000), (0x1000, 0x1000), (0x2000, 0x1000)]
        m.write(0x2000, b"mid")
        assert bytes(blk.mm[0x1000:0x1003]) == b"mid"
        m.write(0, b"top")
        assert bytes(blk.mm[0x3000:0x3003]) == b"top"
    finally:
        m.close()


def test_layout_and_from_layout_share_ram():
    m = GuestMemory()
    blk = RamBlock(0x3000, "shared")
    m.add_region(0, 0x1000, blk, 0x2000)
    m.add_region(0x10000, 0x2000, blk, 0)
    other = None
    try:
        regions, fds = m.layout()
        assert len(fds) == 1
        assert [r["gpa"] for r in regions] == [0, 0x10000]
        # as if received over SCM_RIGHTS: the receiver owns its own copies
        other = GuestMemory.from_layout(regions, [os.dup(fd) for fd in fds])
        assert other.regions == m.regions
        m.write(0x10, b"from the VMM")
        assert other.read(0x10, 12) == b"from the VMM"
        other.write_u64(0x11FF8, 0xCAFEF00D)
        assert m.read_u64(0x11FF8) == 0xCAFEF00D
        with pytest.raises(GuestMemoryError):
            other.read(0x1000, 1)
    finally:
        if other is not None:
            other.close()
        m.close()


def test_close_releases_fds():
    before = len(os.listdir("/proc/self/fd"))
    m = GuestMemory.create(64 * 1024)
    m.write(0, b"x")
    m.close()
    assert len(os.listdir("/proc/self/fd")) == before
    assert m.regions == []


# -- parse_size --------------------------------------------------------------------------------------

@pytest.mark.parametrize("text,expected", [
    ("64M", 64 << 20),
    ("64m", 64 << 20),
    ("1G", 1 << 30),
    ("512k", 512 << 10),
    ("512K", 512 << 10),
    ("2T", 2 << 40),
    ("64MB", 64 << 20),
    (" 16M ", 16 << 20),
    ("4096", 4096),
    (4096, 4096),
    (0, 0),
])
def test_parse_size(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize("bad", ["", "M", "abc", "12X", "-5", "1.5G", "64 M", "0x100", "M64", -1, 1.5, True,
                                 None, b"64M"])
def test_parse_size_rejects(bad):
    with pytest.raises(ValueError):
        parse_size(bad)


# -- IORegion / AddressSpace -------------------------------------------------------------------------

class Recorder:
    """An EventfdListener that records what it is told."""

    def __init__(self) -> None:
        self.calls: list[tuple] = []

    def eventfd_add(self, space, addr, length, datamatch, notifier):
        self.calls.append(("add", space, addr, length, datamatch, notifier))

    def eventfd_del(self, space, addr, length, datamatch, notifier):
        self.calls.append(("del", space, addr, length, datamatch, notifier))


@pytest.fixture
def notifiers():
    ns = [EventNotifier(f"kick{i}") for i in range(2)]
    try:
        yield ns
    finally:
        for n in ns:
            n.close()


def make_region(name="dev", size=0x100):
    log = []
    store = {}

    def rd(off, size):
        log.append(("r", off, size))
        return store.get(off, 0x1122334455667788)

    def wr(off, value, size):
        log.append(("w", off, value, size))
        store[off] = value

    return IORegion(name, size, rd, wr), log


def test_dispatch_with_offsets():
    sp = AddressSpace("memory")
    r, log = make_region()
    sp.map(r, 0x10000)
    sp.write(0x10010, 0xABCD, 2)
    assert log == [("w", 0x10, 0xABCD, 2)]
    assert sp.read(0x10010, 2) == 0xABCD
    assert sp.read(0x100F8, 4) == 0x55667788  # masked to the access width
    assert log[-1] == ("r", 0xF8, 4)
    sp.write(0x10020, 0x1_0000_00FF, 1)  # value masked to the width before dispatch
    assert log[-1] == ("w", 0x20, 0xFF, 1)
    assert (r.reads, r.writes) == (2, 2)
    assert list(sp.mappings()) == [(0x10000, 0x100, "dev")]
    assert sp.unassigned_reads == 0 and sp.unassigned_writes == 0


def test_unassigned_access_reads_all_ones_and_counts():
    sp = AddressSpace("io")
    r, log = make_region(size=0x10)
    sp.map(r, 0x100)
    assert sp.read(0x0, 1) == 0xFF
    assert sp.read(0x200, 2) == 0xFFFF
    assert sp.read(0x300, 4) == 0xFFFFFFFF
    assert sp.read(0x10E, 4) == 0xFFFFFFFF  # runs past the region's end
    assert sp.read(0x10E, 8) == U64_ALL
    sp.write(0x110, 1, 1)
    sp.write(0xFF, 1, 2)  # starts before the region
    assert sp.unassigned_reads == 5
    assert sp.unassigned_writes == 2
    assert log == []


def test_region_without_callbacks():
    sp = AddressSpace("memory")
    r = IORegion("plain", 0x10)
    sp.map(r, 0x40)
    assert sp.read(0x40, 4) == 0xFFFFFFFF
    sp.write(0x40, 5, 4)
    assert (r.reads, r.writes) == (1, 1)
    assert sp.unassigned_reads == 0


def test_overlapping_map_refused():
    sp = AddressSpace("memory")
    a, _ = make_region("a", 0x100)
    b, _ = make_region("b", 0x100)
    sp.map(a, 0x1000)
    for base in (0x1000, 0x0F01, 0x10FF, 0x1080):
        with pytest.raises(ValueError):
            sp.map(b, base)
    sp.map(b, 0x1100)  # adjacent: fine
    assert list(sp.mappings()) == [(0x1000, 0x100, "a"), (0x1100, 0x100, "b")]
    assert sp.base_of(b) == 0x1100


def test_refused_move_leaves_the_region_where_it_was(notifiers):
    """map() of an already-mapped region onto an occupied range is refused; a refused operation
    must change nothing -- the region stays mapped at its old base with its eventfds."""
    n0, _ = notifiers
    sp = AddressSpace("memory")
    li = Recorder()
    sp.add_listener(li)
    a, _ = make_region("a", 0x100)
    b, log_b = make_region("b", 0x100)
    b.add_eventfd(0x8, 4, None, n0)
    sp.map(a, 0x1000)
    sp.map(b, 0x2000)
    li.calls.clear()
    with pytest.raises(ValueError):
        sp.map(b, 0x1080)
    assert sp.base_of(b) == 0x2000
    assert list(sp.mappings()) == [(0x1000, 0x100, "a"), (0x2000, 0x100, "b")]
    sp.write(0x2010, 1, 4)
    assert log_b == [("w", 0x10, 1, 4)]
    assert li.calls == []  # the eventfd was not deleted from the hypervisor


def test_eventfds_follow_the_region(notifiers):
    n0, n1 = notifiers
    sp = AddressSpace("memory")
    li = Recorder()
    sp.add_listener(li)
    r, _ = make_region("notify", 0x1000)

    r.add_eventfd(0x10, 2, None, n0)  # not mapped yet: nobody is told
    assert li.calls == []
    sp.map(r, 0xF000_0000)
    assert li.calls == [("add", "memory", 0xF000_0010, 2, None, n0)]

    li.calls.clear()
    r.add_eventfd(0x20, 4, 7, n1)  # mapped: told at once, at base + offset
    assert li.calls == [("add", "memory", 0xF000_0020, 4, 7, n1)]

    li.calls.clear()
    sp.map(r, 0xE000_0000)  # moved: deleted at the old address, added at the new one
    dels = [c for c in li.calls if c[0] == "del"]
    adds = [c for c in li.calls if c[0] == "add"]
    assert sorted(c[2:5] for c in dels) == [(0xF000_0010, 2, None), (0xF000_0020, 4, 7)]
    assert sorted(c[2:5] for c in adds) == [(0xE000_0010, 2, None), (0xE000_0020, 4, 7)]
    assert {c[5] for c in dels} == {n0, n1} and {c[5] for c in adds} == {n0, n1}
    assert len(li.calls) == 4
    assert li.calls.index(dels[-1]) < li.calls.index(adds[0])  # deletes first

    li.calls.clear()
    sp.map(r, 0xE000_0000)  # same place: nothing happens
    assert li.calls == []

    r.del_eventfd(0x20, 4, 7, n1)
    assert li.calls == [("del", "memory", 0xE000_0020, 4, 7, n1)]
    with pytest.raises(KeyError):
        r.del_eventfd(0x20, 4, 7, n1)

    li.calls.clear()
    sp.unmap(r)
    assert li.calls == [("del", "memory", 0xE000_0010, 2, None, n0)]
    assert sp.base_of(r) is None
    assert sp.read(0xE000_0010, 2) == 0xFFFF

    li.calls.clear()
    r.add_eventfd(0x30, 0, None, n1)  # unmapped again: nobody is told
    assert li.calls == []


def test_listener_added_late_is_replayed(notifiers):
    n0, _ = notifiers
    sp = AddressSpace("io")
    r, _ = make_region("pio", 0x20)
    r.add_eventfd(0x4, 2, None, n0)
    sp.map(r, 0xC000)
    li = Recorder()
    sp.add_listener(li)
    assert li.calls == [("add", "io", 0xC004, 2, None, n0)]
    sp.remove_listener(li)
    sp.unmap(r)
    assert li.calls == [("add", "io", 0xC004, 2, None, n0)]


# -- property: contains() / read() agree with a reference interval check ----------------------------

REGIONS = [(0, 0x1000), (0x2000, 0x1000)]


def reference_contains(gpa: int, length: int) -> bool:
    if gpa < 0 or length < 0:
        return False
    return any(base <= gpa and gpa + length <= base + size for base, size in REGIONS)


@pytest.fixture(scope="module")
def shared_holey():
    m = two_region_memory()
    try:
        yield m
    finally:
        m.close()


edge_ints = st.sampled_from([0, 1, 0xFFF, 0x1000, 0x1001, 0x1FFF, 0x2000, 0x2001, 0x2FFF, 0x3000, 0x3001])


@given(
    gpa=st.one_of(st.integers(-0x100, 0x3200), edge_ints, st.integers(-(1 << 65), 1 << 65)),
    length=st.one_of(st.integers(0, 0x3100), st.sampled_from([0, 1, 2, 4, 8, 0x1000, 0x2000]),
                     st.integers(0, 1 << 70)),
    warm=st.sampled_from([None, 0x10, 0x2010]),
)
def test_contains_agrees_with_reference(shared_holey, gpa, length, warm):
    m = shared_holey
    if warm is not None:
        m.read(warm, 4)  # put either region in the translation cache
    expected = reference_contains(gpa, length)
    assert m.contains(gpa, length) == expected
    if expected:
        if length <= 0x4000:
            assert len(m.read(gpa, length)) == length
    else:
        with pytest.raises(GuestMemoryError):
            m.read(gpa, length)
