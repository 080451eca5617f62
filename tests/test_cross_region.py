"""A valid guest buffer across RAM regions contiguous in guest-physical space is served.

Guest RAM is often several regions: QEMU with several memory backends (NUMA nodes, pc-dimms), a
vhost-user memory table of several regions each with its own fd.  A buffer may cross the seam
between two regions that are contiguous in guest-physical space; libvhost-user and the kernel's
vhost serve it as one iovec per region.  kickcall does the same (``GuestMemory.split``, the chain
walker in ``VirtQueue._read_chain``), never through one merged mapping across fds, and still
refuses a buffer that touches a hole or runs past RAM (DEVICE_NEEDS_RESET).  Rings must lie in one
region.  the ``cross-region-buffers`` fault (``kickcall.faults.PROCESS``) switched off restores the old refusal; the "fix-off"
variants show it comes back.

Levels: GuestMemory on its own (memfd RamBlocks), a virtio-blk device driven through its ring
(aio="sync", no machine), and kickcall's vhost-user back-end driven by kickcall's front-end with a
memory table of two memfds.
"""

from __future__ import annotations

import os
import random
import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from helpers import start_vhost_user_blk, stop_process, wait_for
from kickcall.faults import PROCESS
from kickcall.memory import GuestMemory, GuestMemoryError, RamBlock
from kickcall.virtio.blk import VirtIOBlk, make_image
from kickcall.virtio.queue import MAX_SG, RingErrorKind, VirtQueueError
from kickcall.virtio.ring import VIRTIO_F_VERSION_1, VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC

MB = 1 << 20
KB = 1 << 10
SECTOR = 512
F_NEXT, F_WRITE, F_INDIRECT = 1, 2, 4
T_IN, T_OUT = 0, 1
S_OK = 0
NEEDS_RESET = 0x40
READY = 1 | 2 | 4 | 8  # ACKNOWLEDGE | DRIVER | DRIVER_OK | FEATURES_OK
DESC = struct.Struct("<QIHH")
HDR = struct.Struct("<IIQ")
U16 = struct.Struct("<H")
USED_ELEM = struct.Struct("<II")

SWITCH = pytest.mark.parametrize("cross_region", [True, False], ids=["fix", "fix-off"])


@pytest.fixture
def cross_region_switch(monkeypatch):
    def set_(on: bool) -> None:
        monkeypatch.setattr(PROCESS.get("cross-region-buffers"), "fix_on", on)
    return set_


def regions_memory(layout: list[tuple[int, int]], name: str = "r") -> tuple[GuestMemory, list[RamBlock]]:
    """One memfd RamBlock per (gpa, size) region."""
    m = GuestMemory()
    blocks = []
    for k, (gpa, size) in enumerate(layout):
        b = RamBlock(size, f"{name}{k}")
        blocks.append(b)
        m.add_region(gpa, size, b)
    return m, blocks


def fd_bytes(block: RamBlock, offset: int, n: int) -> bytes:
    """What the block's memfd holds (read through the fd, not through any mapping)."""
    return os.pread(block.fd, n, block.offset + offset)


def sector_label(k: int) -> bytes:
    return (b"SECTOR%010d" % k).ljust(SECTOR, b".")


# ==================================================================================================
# GuestMemory
# ==================================================================================================

SEAM = 0x10000  # two 64 KiB memfds: [0, SEAM) and [SEAM, 2*SEAM)


@pytest.fixture
def two():
    m, blocks = regions_memory([(0, SEAM), (SEAM, SEAM)])
    try:
        yield m, blocks
    finally:
        m.close()


def test_split_gives_one_piece_per_region(two):
    m, _ = two
    assert m.split(SEAM - 0x800, 0x1000) == [(SEAM - 0x800, 0x800), (SEAM, 0x800)]
    assert m.split(0x100, 0x200) == [(0x100, 0x200)]  # inside one region: one piece
    assert m.split(0, 2 * SEAM) == [(0, SEAM), (SEAM, SEAM)]
    assert m.split(SEAM, 0x10) == [(SEAM, 0x10)]
    assert m.split(SEAM - 1, 0) == []
    for g, n in m.split(SEAM - 0x800, 0x1000):
        assert m.contains(g, n)  # every piece can be translated / viewed on its own


@SWITCH
def test_a_valid_range_across_two_regions_is_read_and_written(two, cross_region_switch, cross_region):
    """read/write/fill across the seam reach both memfds, each at the right offset."""
    m, (lo, hi) = two
    cross_region_switch(cross_region)
    data = bytes(random.Random(7).randrange(256) for _ in range(0x1000))
    if not cross_region:
        before = m.digest_regions()
        for op in (lambda: m.write(SEAM - 0x800, data), lambda: m.read(SEAM - 0x800, 0x1000),
                   lambda: m.fill(SEAM - 0x800, 0x1000, 0xAB), lambda: m.split(SEAM - 0x800, 0x1000)):
            with pytest.raises(GuestMemoryError) as ei:
                op()
            assert ei.value.kind == "region-end"
        assert m.digest_regions() == before
        assert not m.in_ram(SEAM - 0x800, 0x1000)
        return
    assert m.in_ram(SEAM - 0x800, 0x1000)
    m.write(SEAM - 0x800, data)
    assert fd_bytes(lo, SEAM - 0x800, 0x800) == data[:0x800]
    assert fd_bytes(hi, 0, 0x800) == data[0x800:]
    assert m.read(SEAM - 0x800, 0x1000) == data
    m.write(SEAM - 3, memoryview(b"abcdef"))
    assert fd_bytes(lo, SEAM - 3, 3) == b"abc" and fd_bytes(hi, 0, 3) == b"def"
    m.fill(SEAM - 0x10, 0x20, 0x5A)
    assert fd_bytes(lo, SEAM - 0x10, 0x10) == b"\x5a" * 0x10 and fd_bytes(hi, 0, 0x10) == b"\x5a" * 0x10
    assert m.read(SEAM - 0x11, 1) == data[0x800 - 0x11:0x800 - 0x10]  # the byte before is untouched


def test_views_and_typed_accesses_stay_in_one_region(two):
    """Zero-copy views and ring-field accessors never span a seam: a caller splits first."""
    m, _ = two
    for op in (lambda: m.view(SEAM - 8, 16), lambda: m.translate(SEAM - 8, 16), lambda: m.check(SEAM - 8, 16),
               lambda: m.read_u64(SEAM - 4), lambda: m.write_u32(SEAM - 2, 1), lambda: m.read_u16_atomic(SEAM - 1)):
        with pytest.raises(GuestMemoryError) as ei:
            op()
        assert ei.value.kind == "region-end"
    assert not m.contains(SEAM - 8, 16)


@pytest.mark.parametrize("gpa,length", [
    (SEAM - 0x800, 0x1000),  # lo into the hole
    (2 * SEAM + 0x1000 - 0x10, 0x20),  # the hole into mid
    (0, 3 * SEAM),  # everything, the hole included
    (2 * SEAM + 0x1000, SEAM + 1),  # mid across its seam into hi, then one byte past the end of RAM
    (3 * SEAM + 0x1000 - 0x10, 0x20),  # past the end of RAM
    (SEAM + 0x10, 1),  # starts in the hole
])
def test_a_range_touching_a_hole_is_refused_and_changes_nothing(gpa, length):
    # lo [0, SEAM), a hole [SEAM, 2*SEAM + 0x1000), then mid and hi, contiguous, up to 3*SEAM + 0x1000
    m, _ = regions_memory([(0, SEAM), (2 * SEAM + 0x1000, SEAM // 2), (2 * SEAM + 0x1000 + SEAM // 2, SEAM // 2)])
    try:
        m.write(SEAM - 0x10, b"\x11" * 0x10)
        before = m.digest_regions()
        assert not m.in_ram(gpa, length)
        with pytest.raises(GuestMemoryError) as ei:
            m.split(gpa, length)
        assert ei.value.kind in ("hole", "outside-ram")
        with pytest.raises(GuestMemoryError):
            m.read(gpa, length)
        with pytest.raises(GuestMemoryError):
            m.write(gpa, b"\xee" * length)
        with pytest.raises(GuestMemoryError):
            m.fill(gpa, length, 0xEE)
        assert m.digest_regions() == before
        # while the contiguous pair is served across its seam
        seam2 = 2 * SEAM + 0x1000 + SEAM // 2
        m.write(seam2 - 4, b"12345678")
        assert m.read(seam2 - 4, 8) == b"12345678"
    finally:
        m.close()


def test_split_is_bounded_by_max_pieces():
    """A range over many small regions is refused once it needs more pieces than allowed, and the
    walk stops there (the work is bounded by max_pieces, not by the range's length)."""
    blk = RamBlock(64 * 0x1000, "many")
    m = GuestMemory()
    try:
        for k in range(64):
            m.add_region(k * 0x1000, 0x1000, blk, (63 - k) * 0x1000)  # reversed inside the block
        assert len(m.split(0, 64 * 0x1000)) == 64
        assert len(m.split(0x800, 4 * 0x1000, max_pieces=5)) == 5
        with pytest.raises(GuestMemoryError) as ei:
            m.split(0x800, 4 * 0x1000, max_pieces=4)
        assert ei.value.kind == "too-many-pieces"
        with pytest.raises(GuestMemoryError) as ei:
            m.split(0, 1 << 40, max_pieces=3)  # a huge length: refused after 3 pieces, not at the end of RAM
        assert ei.value.kind == "too-many-pieces"
        # contiguous guest-physical space over reversed block offsets: each piece maps on its own
        m.write(0x1000 - 2, b"ABCD")
        assert bytes(blk.mm[63 * 0x1000 - 2 + 0x1000:64 * 0x1000]) == b"AB"
        assert bytes(blk.mm[62 * 0x1000:62 * 0x1000 + 2]) == b"CD"
        assert m.read(0x1000 - 2, 4) == b"ABCD"
    finally:
        m.close()


# -- property: reading any in-RAM range through the pieces equals reading byte by byte ------------
# lo: two regions of one memfd (adjacent in the fd too), then a region of another memfd, a hole,
# then a region of a third memfd followed by one from the second memfd again.
PROP_LAYOUT = [  # (gpa, size, block, block_offset)
    (0x0000, 0x1000, 0, 0x0000),
    (0x1000, 0x0800, 1, 0x0800),
    (0x1800, 0x1800, 0, 0x1000),
    (0x4000, 0x1000, 2, 0x0000),
    (0x5000, 0x0800, 1, 0x1000),
]
PROP_END = 0x5800


def _prop_in_ram(a: int) -> bool:
    return any(g <= a < g + n for g, n, _b, _o in PROP_LAYOUT)


@pytest.fixture(scope="module")
def prop_mem():
    blocks = [RamBlock(0x2800, "p0"), RamBlock(0x1800, "p1"), RamBlock(0x1000, "p2")]
    m = GuestMemory()
    for g, n, b, o in PROP_LAYOUT:
        m.add_region(g, n, blocks[b], o)
    rnd = random.Random(1)
    for g, n, _b, _o in PROP_LAYOUT:
        m.write(g, bytes(rnd.randrange(256) for _ in range(n)))
    # the byte-by-byte reference, taken once: one single-byte access per address
    ref = {a: m.read(a, 1)[0] for a in range(PROP_END) if _prop_in_ram(a)}
    try:
        yield m, ref
    finally:
        m.close()


edges = st.sampled_from([0, 1, 0xFFF, 0x1000, 0x1001, 0x17FF, 0x1800, 0x2FFF, 0x3000, 0x3FFF, 0x4000,
                         0x4FFF, 0x5000, 0x57FF, 0x5800])


@given(gpa=st.one_of(edges, st.integers(-0x10, PROP_END + 0x10)),
       length=st.one_of(st.sampled_from([0, 1, 2, 0x800, 0x1000, 0x3000, 0x5800]), st.integers(0, 0x3800)),
       seed=st.integers(0, 1 << 32))
def test_reading_any_in_ram_range_through_pieces_equals_reading_byte_by_byte(prop_mem, gpa, length, seed):
    m, ref = prop_mem
    in_ram = gpa >= 0 and all(a in ref for a in range(gpa, gpa + length))
    if length == 0:
        in_ram = m.contains(gpa, 0)  # an empty range: as the one-region check says
    assert m.in_ram(gpa, length) == in_ram
    if not in_ram:
        before = m.digest_regions()
        with pytest.raises(GuestMemoryError):
            m.split(gpa, length)
        with pytest.raises(GuestMemoryError):
            m.read(gpa, length)
        with pytest.raises(GuestMemoryError):
            m.write(gpa, b"\0" * length)
        assert m.digest_regions() == before
        return
    pieces = m.split(gpa, length)
    # the pieces tile the range, each inside one region, none merged across a region boundary
    pos = gpa
    for g, n in pieces:
        assert g == pos and n > 0 and m.contains(g, n)
        pos += n
    assert pos == gpa + length
    touched = {i for i, (g, n, _b, _o) in enumerate(PROP_LAYOUT) if length and g < gpa + length and gpa < g + n}
    assert len(pieces) == len(touched)
    expected = bytes(ref[a] for a in range(gpa, gpa + length))
    assert b"".join(m.read(g, n) for g, n in pieces) == expected
    assert m.read(gpa, length) == expected
    # and a write across the same range lands byte for byte
    data = random.Random(seed).randbytes(length)
    m.write(gpa, data)
    for k, a in enumerate(range(gpa, gpa + length)):
        ref[a] = data[k]
    assert bytes(m.read(a, 1)[0] for a in range(gpa, gpa + length)) == data


# ==================================================================================================
# virtio-blk through its ring (aio="sync")
# ==================================================================================================

RSEAM = MB  # ring-level layout: lo [0, 1M) and hi [1M, 2M), two memfds
DESC_GPA, AVAIL_GPA, USED_GPA = 0x1000, 0x2000, 0x3000
HDR_GPA, STATUS_GPA, TABLE_GPA = 0x10000, 0x10100, 0x20000
IMAGE_SIZE = 64 * KB


class BlkRig:
    """A VirtIOBlk over guest RAM made of the given regions, rings in the first one."""

    def __init__(self, workdir: str, layout: list[tuple[int, int]], *, qsize: int = 8,
                 image_size: int = IMAGE_SIZE, rings: tuple[int, int, int] = (DESC_GPA, AVAIL_GPA, USED_GPA),
                 mem: GuestMemory | None = None) -> None:
        self.path = os.path.join(workdir, "disk.img")
        make_image(self.path, image_size)
        if mem is None:
            mem, self.blocks = regions_memory(layout, "ram")
        self.mem = mem
        self.qsize = qsize
        self.dev = VirtIOBlk("blk0", self.path, num_queues=1, queue_size=qsize, aio="sync")
        self.dev.mem = mem
        assert self.dev.set_features((1 << VIRTIO_F_VERSION_1) | (1 << VIRTIO_RING_F_EVENT_IDX)
                                     | (1 << VIRTIO_RING_F_INDIRECT_DESC))
        self.dev.set_status(READY)
        self.q = self.dev.queues[0]
        self.q.mem = mem
        self.desc, self.avail, self.used = rings
        self.q.set_rings(*rings)
        self.q.enabled = True

    def close(self) -> None:
        self.dev.close()
        self.dev.release_rings()
        self.mem.close()

    def set_desc(self, i: int, addr: int, length: int, flags: int, nxt: int = 0, table: int | None = None) -> None:
        # a descriptor is 16 bytes at a 16-byte aligned address: never across a seam
        t = self.desc if table is None else table
        self.mem.write(t + 16 * i, DESC.pack(addr, length, flags, nxt))

    def request(self, rtype: int, sector: int, data_gpa: int, nbytes: int, *, indirect_at: int | None = None) -> None:
        """hdr -> data -> status, published and kicked (an indirect table at *indirect_at*)."""
        self.mem.write(HDR_GPA, HDR.pack(rtype, 0, sector))
        self.mem.write(STATUS_GPA, b"\xff")
        dflag = F_WRITE if rtype == T_IN else 0
        if indirect_at is None:
            self.set_desc(0, HDR_GPA, 16, F_NEXT, 1)
            self.set_desc(1, data_gpa, nbytes, dflag | F_NEXT, 2)
            self.set_desc(2, STATUS_GPA, 1, F_WRITE)
        else:
            table = DESC.pack(HDR_GPA, 16, F_NEXT, 1) + DESC.pack(data_gpa, nbytes, dflag | F_NEXT, 2) \
                + DESC.pack(STATUS_GPA, 1, F_WRITE, 0)
            self.mem.write(indirect_at, table)  # across a seam itself if asked (mem.write splits)
            self.set_desc(0, indirect_at, len(table), F_INDIRECT)
        self.mem.write(self.avail + 4, U16.pack(0))
        self.mem.write(self.avail + 2, U16.pack(1))
        self.dev.handle_kick(self.q)

    def used_idx(self) -> int:
        return U16.unpack(self.mem.read(self.used + 2, 2))[0]

    def used_elem(self) -> tuple[int, int]:
        return USED_ELEM.unpack(self.mem.read(self.used + 4, 8))

    def image(self) -> bytes:
        with open(self.path, "rb") as f:
            return f.read()

    @property
    def needs_reset(self) -> bool:
        return bool(self.dev.status & NEEDS_RESET)


CONTIGUOUS = [(0, RSEAM), (RSEAM, RSEAM)]
WITH_HOLE = [(0, RSEAM), (RSEAM + 64 * KB, RSEAM)]


@SWITCH
@pytest.mark.parametrize("indirect", [False, True], ids=["direct", "indirect"])
def test_a_valid_read_buffer_across_two_regions_is_served(workdir, cross_region_switch, cross_region, indirect):
    cross_region_switch(cross_region)
    rig = BlkRig(workdir, CONTIGUOUS)
    try:
        data_gpa = RSEAM - 3 * SECTOR  # 8 sectors: 3 in lo, 5 in hi
        rig.mem.fill(data_gpa, 3 * SECTOR, 0xEE)
        rig.mem.fill(RSEAM, 5 * SECTOR, 0xEE)
        before = rig.mem.digest_regions()
        rig.request(T_IN, 16, data_gpa, 8 * SECTOR, indirect_at=TABLE_GPA if indirect else None)
        if not cross_region:
            assert rig.needs_reset and rig.dev.broken
            # (refused as a buffer running past its region, the kind that covers a seam with the fix off)
            assert set(rig.q.errors_by_kind) == {RingErrorKind.BUFFER_IN_HOLE}
            assert rig.used_idx() == 0
            # the refused chain wrote nothing: the data buffer and the status byte are as they were
            assert rig.mem.digest_regions()[1] == before[1]
            assert rig.mem.read(data_gpa, 3 * SECTOR) == b"\xee" * 3 * SECTOR
            assert rig.mem.read(STATUS_GPA, 1) == b"\xff"
            return
        assert not rig.needs_reset, rig.dev.broken_reason
        assert rig.used_idx() == 1 and rig.used_elem() == (0, 8 * SECTOR + 1)
        assert rig.mem.read(STATUS_GPA, 1) == bytes([S_OK])
        want = b"".join(sector_label(16 + k) for k in range(8))
        lo, hi = rig.blocks
        assert fd_bytes(lo, data_gpa, 3 * SECTOR) == want[:3 * SECTOR]
        assert fd_bytes(hi, 0, 5 * SECTOR) == want[3 * SECTOR:]
        assert fd_bytes(hi, 5 * SECTOR, 16) == b"\0" * 16  # nothing beyond the buffer
    finally:
        rig.close()


@SWITCH
def test_a_valid_write_buffer_across_two_regions_is_served(workdir, cross_region_switch, cross_region):
    rig = BlkRig(workdir, CONTIGUOUS)
    try:
        payload = random.Random(3).randbytes(8 * SECTOR)
        data_gpa = RSEAM - 5 * SECTOR
        rig.mem.write(data_gpa, payload)  # (the switch is set after: this is the driver's own write)
        cross_region_switch(cross_region)
        pristine = rig.image()
        rig.request(T_OUT, 40, data_gpa, 8 * SECTOR)
        img = rig.image()
        if not cross_region:
            assert rig.needs_reset and img == pristine
            return
        assert not rig.needs_reset, rig.dev.broken_reason
        assert rig.used_idx() == 1 and rig.mem.read(STATUS_GPA, 1) == bytes([S_OK])
        assert img[40 * SECTOR:48 * SECTOR] == payload
        assert img[:40 * SECTOR] == pristine[:40 * SECTOR] and img[48 * SECTOR:] == pristine[48 * SECTOR:]
    finally:
        rig.close()


def test_a_descriptor_across_the_seam_becomes_one_sg_entry_per_region(workdir):
    rig = BlkRig(workdir, CONTIGUOUS)
    try:
        rig.set_desc(0, HDR_GPA, 16, F_NEXT, 1)
        rig.set_desc(1, RSEAM - 100, 300, F_WRITE | F_NEXT, 2)
        rig.set_desc(2, STATUS_GPA, 1, F_WRITE)
        rig.mem.write(AVAIL_GPA + 4, U16.pack(0))
        rig.mem.write(AVAIL_GPA + 2, U16.pack(1))
        elem = rig.q.pop()
        assert elem is not None
        assert elem.out_sg == [(HDR_GPA, 16)]
        assert elem.in_sg == [(RSEAM - 100, 100), (RSEAM, 200), (STATUS_GPA, 1)]
        assert elem.ndescs == 3 and elem.in_len == 301
    finally:
        rig.close()


@pytest.mark.parametrize("where", ["across-the-hole", "past-the-end-of-ram", "starts-in-the-hole"])
@pytest.mark.parametrize("rtype", [T_IN, T_OUT], ids=["read", "write"])
def test_a_buffer_touching_a_hole_still_needs_reset(workdir, where, rtype):
    rig = BlkRig(workdir, WITH_HOLE)
    try:
        data_gpa = {"across-the-hole": RSEAM - 2 * SECTOR, "past-the-end-of-ram": 2 * RSEAM + 64 * KB - 2 * SECTOR,
                    "starts-in-the-hole": RSEAM + 64 * KB - 2 * SECTOR}[where]
        rig.mem.write(HDR_GPA, HDR.pack(rtype, 0, 0))
        rig.mem.write(STATUS_GPA, b"\xff")
        pristine = rig.image()
        rig.set_desc(0, HDR_GPA, 16, F_NEXT, 1)
        rig.set_desc(1, data_gpa, 4 * SECTOR, (F_WRITE if rtype == T_IN else 0) | F_NEXT, 2)
        rig.set_desc(2, STATUS_GPA, 1, F_WRITE)
        rig.mem.write(AVAIL_GPA + 4, U16.pack(0))
        rig.mem.write(AVAIL_GPA + 2, U16.pack(1))
        written = rig.mem.digest_regions()
        rig.dev.handle_kick(rig.q)
        assert rig.needs_reset
        assert set(rig.q.errors_by_kind) <= {RingErrorKind.BUFFER_OUTSIDE_RAM, RingErrorKind.BUFFER_IN_HOLE}
        assert sum(rig.q.errors_by_kind.values()) == 1
        assert rig.mem.digest_regions() == written and rig.image() == pristine
    finally:
        rig.close()


@SWITCH
def test_an_indirect_table_across_the_seam_is_walked_and_one_across_a_hole_is_refused(
        workdir, cross_region_switch, cross_region):
    """libvhost-user copies an indirect table that crosses regions; so does kickcall."""
    cross_region_switch(True)  # set the table up (the driver's own writes)
    rig = BlkRig(workdir, CONTIGUOUS)
    try:
        payload = random.Random(5).randbytes(2 * SECTOR)
        rig.mem.write(0x30000, payload)
        table_gpa = RSEAM - 16  # the table's first descriptor in lo, the other two in hi
        rig.mem.write(HDR_GPA, HDR.pack(T_OUT, 0, 2))
        rig.mem.write(STATUS_GPA, b"\xff")
        rig.mem.write(table_gpa, DESC.pack(HDR_GPA, 16, F_NEXT, 1) + DESC.pack(0x30000, 2 * SECTOR, F_NEXT, 2)
                      + DESC.pack(STATUS_GPA, 1, F_WRITE, 0))
        rig.set_desc(0, table_gpa, 48, F_INDIRECT)
        rig.mem.write(AVAIL_GPA + 4, U16.pack(0))
        rig.mem.write(AVAIL_GPA + 2, U16.pack(1))
        cross_region_switch(cross_region)
        pristine = rig.image()
        rig.dev.handle_kick(rig.q)
        if cross_region:
            assert not rig.needs_reset, rig.dev.broken_reason
            assert rig.image()[2 * SECTOR:4 * SECTOR] == payload
        else:
            assert rig.needs_reset and set(rig.q.errors_by_kind) == {RingErrorKind.INDIRECT_OUTSIDE_RAM}
            assert rig.image() == pristine
    finally:
        rig.close()
    cross_region_switch(True)
    rig = BlkRig(workdir, WITH_HOLE)
    try:
        rig.mem.write(RSEAM - 16, DESC.pack(HDR_GPA, 16, F_NEXT, 1))
        rig.set_desc(0, RSEAM - 16, 48, F_INDIRECT)  # the rest of the table would be in the hole
        rig.mem.write(AVAIL_GPA + 4, U16.pack(0))
        rig.mem.write(AVAIL_GPA + 2, U16.pack(1))
        before = rig.mem.digest_regions()
        rig.dev.handle_kick(rig.q)
        assert rig.needs_reset and set(rig.q.errors_by_kind) == {RingErrorKind.INDIRECT_OUTSIDE_RAM}
        assert rig.mem.digest_regions() == before
    finally:
        rig.close()


@pytest.mark.parametrize("ring", ["desc", "avail", "used"])
def test_a_ring_across_the_seam_needs_reset(workdir, ring):
    """Rings must lie in one region (the device keeps live views into them), as QEMU and
    libvhost-user require: a ring across a seam is refused even though the RAM is contiguous."""
    rings = {"desc": (RSEAM - 64, AVAIL_GPA, USED_GPA), "avail": (DESC_GPA, RSEAM - 8, USED_GPA),
             "used": (DESC_GPA, AVAIL_GPA, RSEAM - 32)}[ring]
    rig = BlkRig(workdir, CONTIGUOUS, rings=rings)
    try:
        with pytest.raises(VirtQueueError) as ei:
            rig.q.map(rig.mem)
        assert ei.value.kind is RingErrorKind.RING_CROSSES_REGION
        rig.dev.handle_kick(rig.q)
        assert rig.needs_reset and set(rig.q.errors_by_kind) == {RingErrorKind.RING_CROSSES_REGION}
    finally:
        rig.close()


PAGE = 0x1000
MANY_BASE = 2 * MB  # 1100 one-page regions from here, all contiguous in guest-physical space


def many_regions_memory(n: int) -> tuple[GuestMemory, RamBlock]:
    """lo [0, 1M) (rings, header, status), then *n* one-page regions of one memfd, contiguous in
    guest-physical space but shuffled in the fd: only a per-region translation gets the data right."""
    m = GuestMemory()
    lo = RamBlock(MB, "lo")
    m.add_region(0, MB, lo)
    many = RamBlock(n * PAGE, "many")
    order = list(range(n))
    random.Random(11).shuffle(order)
    for k in range(n):
        m.add_region(MANY_BASE + k * PAGE, PAGE, many, order[k] * PAGE)
    return m, many


@pytest.mark.parametrize("pages,served", [(MAX_SG - 2, True), (MAX_SG - 1, False)],
                         ids=["at-the-bound", "one-over"])
def test_a_chain_is_bounded_to_max_sg_entries_after_splitting(workdir, pages, served):
    """One descriptor over many one-page regions: hdr + data pieces + status may total MAX_SG
    (QEMU's VIRTQUEUE_MAX_SIZE, Linux's UIO_MAXIOV), not one more -- a hostile chain cannot blow
    a 3-descriptor request up into an unbounded scatter list."""
    mem, _many = many_regions_memory(MAX_SG + 8)
    rig = BlkRig(workdir, [], mem=mem, image_size=4 * MB)
    try:
        nbytes = pages * PAGE
        rig.request(T_IN, 0, MANY_BASE, nbytes)
        if not served:
            assert rig.needs_reset and set(rig.q.errors_by_kind) == {RingErrorKind.TOO_MANY_SG}
            return
        assert not rig.needs_reset, rig.dev.broken_reason
        assert rig.mem.read(STATUS_GPA, 1) == bytes([S_OK])
        want = b"".join(sector_label(k) for k in range(nbytes // SECTOR))
        assert rig.mem.read(MANY_BASE, nbytes) == want
    finally:
        rig.close()


# ==================================================================================================
# vhost-user: kickcall's front-end, kickcall's back-end, a memory table of two memfds
# ==================================================================================================

VU_SEAM = 32 * MB  # the front-end's RAM: [0, 32M) one memfd, [32M, 64M) another


def _two_memfd_driver(sock: str):
    """A VhostUserBlkDriver whose RAM is two memfds contiguous in guest-physical space; its own
    allocations (rings, headers, status bytes) stay below the seam."""
    from kickcall.drive.vhost_user_blk import VhostUserBlkDriver
    from kickcall.guest.kernel import PageAllocator

    drv = VhostUserBlkDriver(sock, ram=2 * VU_SEAM, queue_size=64, reconnect=False)
    drv.mem.close()
    drv.mem, blocks = regions_memory([(0, VU_SEAM), (VU_SEAM, VU_SEAM)], "vu")
    drv.pages = PageAllocator(MB, VU_SEAM - MB)
    return drv, blocks


def _do_io(drv, rtype: int, sector: int, data_gpa: int, nbytes: int, timeout: float):
    from kickcall.guest.blk_request import BlkRequest

    hdr = drv.pages.alloc(PAGE)
    r = BlkRequest.at(hdr, data_gpa, nbytes)
    try:
        assert drv.submit(0, [(r, rtype, sector, nbytes)]) == 1
        ok = r.done.wait(timeout)
        return (r.status_val if ok else None), r
    finally:
        if r.done.is_set():
            drv.pages.free(hdr)


@SWITCH
def test_a_valid_buffer_across_two_memfd_regions_is_served_over_vhost_user(workdir, cross_region_switch,
                                                                          cross_region):
    from kickcall.loop import IOThread
    from kickcall.vhost_user.backend import VhostUserBackend

    img = os.path.join(workdir, "d.img")
    make_image(img, 8 * MB)
    loop = IOThread("be")
    dev = VirtIOBlk("b", img, queue_size=64, aio="threads", loop=loop)
    sock = os.path.join(workdir, "s")
    be = VhostUserBackend(dev, socket_path=sock, loop=loop)
    loop.start()
    be.start()
    drv, (lo, hi) = _two_memfd_driver(sock)
    try:
        drv.connect(wait=10)
        # the back-end mapped two regions from two fds, contiguous in guest-physical space
        assert be.memory is not None and be.memory.regions == [(0, VU_SEAM), (VU_SEAM, VU_SEAM)]
        assert len(be.memory.user_regions) == 2
        cross_region_switch(cross_region)
        nbytes = 16 * SECTOR
        # a write across the seam: 5 sectors in lo, 11 in hi (the driver writes the halves itself)
        payload = random.Random(9).randbytes(nbytes)
        wgpa = VU_SEAM - 5 * SECTOR
        drv.mem.write(wgpa, payload[:5 * SECTOR])
        drv.mem.write(VU_SEAM, payload[5 * SECTOR:])
        st, _r = _do_io(drv, T_OUT, 100, wgpa, nbytes, timeout=60 if cross_region else 5)
        if not cross_region:
            assert st is None
            wait_for(lambda: dev.broken and drv.vring_errors >= 1, 30, "the back-end's ring error")
            assert set(dev.queues[0].errors_by_kind) == {RingErrorKind.BUFFER_IN_HOLE}
            with open(img, "rb") as f:
                f.seek(100 * SECTOR)
                assert f.read(nbytes) == b"".join(sector_label(100 + k) for k in range(16))
            return
        assert st == S_OK and not dev.broken
        with open(img, "rb") as f:
            f.seek(100 * SECTOR)
            assert f.read(nbytes) == payload
        # a read across the seam, 7 sectors in lo and 9 in hi, into zeroed RAM
        rgpa = VU_SEAM - 7 * SECTOR
        drv.mem.fill(rgpa, nbytes)
        st, _r = _do_io(drv, T_IN, 200, rgpa, nbytes, timeout=60)
        assert st == S_OK
        want = b"".join(sector_label(200 + k) for k in range(16))
        assert fd_bytes(lo, rgpa, 7 * SECTOR) == want[:7 * SECTOR]
        assert fd_bytes(hi, 0, 9 * SECTOR) == want[7 * SECTOR:]
        assert drv.error is None and be.protocol_errors == 0 and not dev.broken
    finally:
        drv.close()
        be.stop()
        loop.stop()
        dev.close()


def test_a_valid_buffer_across_two_memfd_regions_is_served_by_the_vhost_user_blk_process(workdir):
    """The same through ``kickcall vhost-user-blk`` in its own process (the product as QEMU meets it)."""
    img = os.path.join(workdir, "d.img")
    make_image(img, 8 * MB)
    sock = os.path.join(workdir, "s")
    p = start_vhost_user_blk(sock, img)
    drv, (lo, hi) = _two_memfd_driver(sock)
    try:
        drv.connect(wait=30)
        nbytes = 8 * SECTOR
        payload = random.Random(4).randbytes(nbytes)
        gpa = VU_SEAM - SECTOR
        drv.mem.write(gpa, payload)
        st, _r = _do_io(drv, T_OUT, 64, gpa, nbytes, timeout=60)
        assert st == S_OK
        drv.mem.fill(gpa, nbytes)
        st, _r = _do_io(drv, T_IN, 64, gpa, nbytes, timeout=60)
        assert st == S_OK
        assert fd_bytes(lo, gpa, SECTOR) + fd_bytes(hi, 0, 7 * SECTOR) == payload
        assert drv.error is None
    finally:
        drv.close()
        assert stop_process(p) == 0
    with open(img, "rb") as f:
        f.seek(64 * SECTOR)
        assert f.read(nbytes) == payload
