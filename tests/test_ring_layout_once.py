"""The split ring's layout is defined once (kickcall.virtio.layout) and used everywhere.

(a) the layout functions give the virtio 1.2 section 2.7 numbers, checked against the spec's own
    arithmetic and against C structures built with ctypes (an independent oracle);
(b) the device's VirtQueue and the driver's Vring, whose hot paths use 16-bit view indices, put
    every field where the layout functions say;
(c) a source scan: no module of src/kickcall outside the layout module computes a ring offset by
    hand (``avail + 4 + 2 * n``, ``6 + 8 * num``, ``desc + 16 * i``, ``a16[2 + ...]``, ...).
    The scanner is shown to catch the expressions the tree used to have, and to leave the
    look-alikes (MSI-X table entries, hex parsing, prose) alone.
"""

from __future__ import annotations

import ctypes
import io
import pathlib
import re
import struct
import tokenize

import pytest

from kickcall.guest.virtio_ring import Vring
from kickcall.memory import GuestMemory
from kickcall.virtio import layout as L
from kickcall.virtio.queue import VirtQueue

SRC = pathlib.Path(__file__).resolve().parent.parent / "src" / "kickcall"
LAYOUT_MODULE = SRC / "virtio" / "layout.py"
SIZES = [1, 2, 8, 128, 256, 1024, 32768]
BASE = 0x7000_0000  # any guest address: every *_addr is base + offset


# -- (a) the numbers -----------------------------------------------------------------------------------
@pytest.mark.parametrize("n", SIZES)
def test_sizes_are_the_specs(n: int) -> None:
    assert L.desc_table_size(n) == 16 * n
    assert L.avail_size(n) == 6 + 2 * n
    assert L.avail_size(n, event_idx=False) == 4 + 2 * n
    assert L.used_size(n) == 6 + 8 * n
    assert L.used_size(n, event_idx=False) == 4 + 8 * n


@pytest.mark.parametrize("n", SIZES)
def test_field_addresses_are_the_specs(n: int) -> None:
    for i in {0, 1, n // 2, n - 1}:
        assert L.desc_addr(BASE, i) == BASE + 16 * i
        assert L.avail_ring_addr(BASE, i) == BASE + 4 + 2 * i
        assert L.used_elem_addr(BASE, i) == BASE + 4 + 8 * i
    assert L.avail_flags_addr(BASE) == BASE
    assert L.avail_idx_addr(BASE) == BASE + 2
    assert L.used_flags_addr(BASE) == BASE
    assert L.used_idx_addr(BASE) == BASE + 2
    # vring_used_event(): avail->ring[num]; vring_avail_event(): the u16 after used->ring[num - 1]
    assert L.used_event_addr(BASE, n) == BASE + 4 + 2 * n == BASE + L.avail_size(n) - 2
    assert L.avail_event_addr(BASE, n) == BASE + 4 + 8 * n == BASE + L.used_size(n) - 2
    # the 16-bit view indices are the byte offsets halved
    assert L.used_event_u16(n) * 2 == 4 + 2 * n
    assert L.avail_event_u16(n) * 2 == 4 + 8 * n
    assert (L.AVAIL_FLAGS_U16, L.AVAIL_IDX_U16, L.AVAIL_RING_U16) == (0, 1, 2)
    assert (L.USED_FLAGS_U16, L.USED_IDX_U16) == (0, 1)


def test_alignment_and_element_formats() -> None:
    assert (L.DESC_ALIGN, L.AVAIL_ALIGN, L.USED_ALIGN) == (16, 2, 4)  # virtio 1.2 2.7 "Virtqueue Alignment"
    assert L.DESC.size == L.DESC_SIZE == 16
    assert L.USED_ELEM.size == L.USED_ELEM_SIZE == 8
    assert L.DESC.pack(0x1122334455667788, 0x99AABBCC, 0xDDEE, 0x0F10) == bytes.fromhex(
        "8877665544332211" "ccbbaa99" "eedd" "100f")
    assert L.USED_ELEM.pack(1, 2) == struct.pack("<II", 1, 2)


def _c_rings(n: int) -> tuple[type[ctypes.Structure], type[ctypes.Structure], type[ctypes.Structure]]:
    """struct vring_desc, vring_avail and vring_used (with their event fields) for *n* entries."""
    u16, u32, u64 = ctypes.c_uint16, ctypes.c_uint32, ctypes.c_uint64

    class Desc(ctypes.LittleEndianStructure):
        _fields_ = [("addr", u64), ("len", u32), ("flags", u16), ("next", u16)]

    class Avail(ctypes.LittleEndianStructure):
        _fields_ = [("flags", u16), ("idx", u16), ("ring", u16 * n), ("used_event", u16)]

    class UsedElem(ctypes.LittleEndianStructure):
        _fields_ = [("id", u32), ("len", u32)]

    class Used(ctypes.LittleEndianStructure):
        _fields_ = [("flags", u16), ("idx", u16), ("ring", UsedElem * n), ("avail_event", u16)]

    return Desc, Avail, Used


@pytest.mark.parametrize("n", [1, 8, 256, 1024])
def test_layout_matches_the_c_structures(n: int) -> None:
    Desc, Avail, Used = _c_rings(n)
    assert ctypes.sizeof(Desc) * n == L.desc_table_size(n)
    assert L.avail_idx_addr(0) == Avail.idx.offset
    assert L.avail_ring_addr(0, 0) == Avail.ring.offset
    assert L.used_event_addr(0, n) == Avail.used_event.offset
    assert L.avail_size(n) == Avail.used_event.offset + 2 == ctypes.sizeof(Avail)
    assert L.used_idx_addr(0) == Used.idx.offset
    assert L.used_elem_addr(0, 0) == Used.ring.offset
    assert L.avail_event_addr(0, n) == Used.avail_event.offset
    assert L.used_size(n) == Used.avail_event.offset + 2  # sizeof() adds tail padding to 4


# -- (b) the hot paths agree with the functions ------------------------------------------------------------
@pytest.mark.parametrize("num", [4, 256])
def test_device_and_driver_put_every_field_where_the_layout_says(num: int) -> None:
    mem = GuestMemory.create(1 << 21)
    nxt = [0x10000]

    def alloc(size: int, align: int) -> int:
        a = (nxt[0] + align - 1) & ~(align - 1)
        nxt[0] = a + size
        return a

    u16 = lambda addr: struct.unpack("<H", mem.read(addr, 2))[0]  # noqa: E731
    vr = Vring(mem, alloc, 0, num, event_idx=True, indirect=False, notify=lambda v: None)
    q = VirtQueue(0, num, name="layout.vq0")
    q.mem = mem
    q.event_idx = True
    assert q.set_num(num)
    q.set_rings(vr.desc, vr.avail, vr.used)
    q.enabled = True
    q.map(mem)
    buf = alloc(4096, 4096)
    try:
        for k in range(num + 3):  # wraps the rings
            with vr.lock:
                assert vr.add([(buf, 512)], [(buf + 512, 1)], k)
            slot = k % num
            head = u16(L.avail_ring_addr(vr.avail, slot))
            assert u16(L.avail_idx_addr(vr.avail)) == (k + 1) & 0xFFFF
            d_addr, d_len, _f, d_next = L.DESC.unpack(mem.read(L.desc_addr(vr.desc, head), L.DESC_SIZE))
            assert (d_addr, d_len) == (buf, 512)
            assert L.DESC.unpack(mem.read(L.desc_addr(vr.desc, d_next), L.DESC_SIZE))[:2] == (buf + 512, 1)
            # the driver's used_event, as the device reads it
            mem.write(L.used_event_addr(vr.avail, num), struct.pack("<H", 0x1234 + k))
            assert q.used_event() == 0x1234 + k
            e = q.pop()
            assert e is not None and e.index == head
            assert u16(L.avail_event_addr(vr.used, num)) == (k + 1) & 0xFFFF  # the device's avail_event
            assert q.avail_event() == (k + 1) & 0xFFFF
            q.push(e, 7 + k)
            assert L.USED_ELEM.unpack(mem.read(L.used_elem_addr(vr.used, slot), L.USED_ELEM_SIZE)) == (head, 7 + k)
            assert u16(L.used_idx_addr(vr.used)) == (k + 1) & 0xFFFF
            with vr.lock:
                assert vr.get_buf() == (k, 7 + k)
            # the driver's used_event write lands where the layout says, after the next-to-last slot
            assert u16(L.used_event_addr(vr.avail, num)) == (k + 1) & 0xFFFF
        q.set_notification(False)  # with EVENT_IDX: nothing; used.flags stays clear
        assert u16(L.used_flags_addr(vr.used)) == 0
        q.event_idx = False
        q.set_notification(False)
        assert u16(L.used_flags_addr(vr.used)) == 1  # VRING_USED_F_NO_NOTIFY
        q.set_notification(True)
        assert u16(L.used_flags_addr(vr.used)) == 0
    finally:
        q.unmap()
        vr.release()
        mem.close()


# -- (c) the source scan -------------------------------------------------------------------------------------
_N = r"(?:n|num|self\.num|N)"
HAND_OFFSETS: dict[str, re.Pattern[str]] = {
    # avail->ring[i] / used->ring[i] / used_event / avail_event by hand: x + 4 + 2 * i, x + 4 + 8 * n
    "ring entry": re.compile(r"\+\s*4\s*\+\s*[28]\s*\*"),
    # ring sizes: 6 + 2 * n, 4 + 8 * num, ...
    "ring size": re.compile(rf"(?<![\w.])[46]\s*\+\s*[28]\s*\*\s*{_N}\b"),
    # avail.idx / used.idx (or the first ring entry) by hand: avail + 2, q.used + 2, used + 4
    "ring index": re.compile(r"\b(?:avail|used)\w*\s*\+\s*[24]\b(?!\s*\*)"),
    # descriptor i: desc + 16 * i, doff + 16 * i, table + 16 * i (an MSI-X table is not a ring)
    "descriptor": re.compile(r"(?:\b(?:desc|doff|toff)\w*|(?<![\w.])table)\s*\+\s*16\s*\*"),
    # descriptor table size: 16 * n
    "table size": re.compile(rf"\b16\s*\*\s*{_N}\b|\b{_N}\s*\*\s*16\b"),
    # an indirect table's length checked or divided by hand
    "descriptor size": re.compile(r"(?:%|//)\s*16\b"),
    # a literal index into a ring's 16-bit view (a16[1], _u16[0], a16[2 + slot])
    "u16 view index": re.compile(r"\b_?[au]16\s*\[\s*\d"),
    # used_event / avail_event in 16-bit units by hand: 2 + num, 2 + 4 * n
    "u16 event index": re.compile(rf"(?<![\w.])2\s*\+\s*(?:4\s*\*\s*)?{_N}\b"),
    # the descriptor's format spelled out again
    "descriptor format": re.compile(r"""["']<QIHH["']"""),
}


def _code_only(source: str) -> list[str]:
    """*source*'s lines with comments and string contents blanked (a docstring may show the layout).
    The format of a struct (a string) is kept: it is code."""
    lines = source.splitlines(keepends=True)
    blank = [list(line) for line in lines]
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT or (tok.type == tokenize.STRING and "QIHH" not in tok.string):
            (r0, c0), (r1, c1) = tok.start, tok.end
            for r in range(r0, r1 + 1):
                row = blank[r - 1]
                lo = c0 if r == r0 else 0
                hi = c1 if r == r1 else len(row)
                for c in range(lo, hi):
                    if row[c] != "\n":
                        row[c] = " "
    return ["".join(row) for row in blank]


def hand_computed_offsets(source: str) -> list[tuple[int, str, str]]:
    """(line number, pattern name, line) for every ring offset computed by hand in *source*."""
    found = []
    for no, line in enumerate(_code_only(source), 1):
        for name, rx in HAND_OFFSETS.items():
            if rx.search(line):
                found.append((no, name, line.strip()))
    return found


# What the tree used to say (one line each from the files that now use the layout module).
BEFORE = [
    'ue = self._xp(avail + 4 + 2 * num, 1) if num else None',
    'ae = self._xp(used + 4 + 8 * num, 1) if num else None',
    '"avail-idx": self._u16(q.avail + 2),',
    '"used-idx-ring": self._u16(q.used + 2),',
    '"desc-phys": q.desc, "desc-size": 16 * n, "avail-phys": q.avail, "avail-size": 6 + 2 * n,',
    '"used-phys": q.used, "used-size": 6 + 8 * n,',
    'gavail = self.memory.uva_to_gpa(avail, 6 + 2 * n)',
    'self.desc = self.alloc(16 * num, 4096)',
    'return self.mem.read_u16(q.used + 2)',
    'raw += self.qt.memread(self.used + 4, 8 * (pending - first))',
    'self.qt.memwrite(self.desc + 16 * s.head, chain)',
    'addr, length, flags, nxt = DESC.unpack_from(tmm, toff + 16 * i)',
    'addr, length, flags, nxt = DESC.unpack(mem.read(table + 16 * i, 16))',
    'USED_ELEM.pack_into(self._umm, self._uoff + 4 + 8 * slot, elem.index, length)',
    'self._ae = 2 + 4 * n',
    'self._ue = 2 + num',
    'return self._a16[2 + self.num]',
    'head = a16[2 + last % self.num]',
    'self._u16[1] = self.used_idx',
    'v = self._a16[1]',
    'if length == 0 or length % 16:',
    'n_ind = length // 16',
    'return 4 + 2 * num + (2 if event_idx else 0)',
    'chain = struct.pack("<QIHH", s.hdr, 16, VRING_DESC_F_NEXT, s.head + 1)',
]

# Look-alikes that are not ring offsets.
UNRELATED = [
    'e = self._msix_table + 16 * i',  # an MSI-X table entry
    'e = self.msix.table + 16 * vec',
    'self.qt.writel(self.msix.table + 16 * vector + 12, 1 if masked else 0)',
    'vals = [int(data[off + 6 + 8 * i: off + 14 + 8 * i], 16) for i in range(13)]',
    'off = 0x10 + 4 * bar',
    'hi = self.k.readl(self._msix_pba + 8 * q + 4)',
    'x = "avail ring    6 + 2*N  {le16 flags; le16 idx}"',
    '# used ring 6 + 8*N, avail + 2 is avail.idx',
    'self.qt.memwrite(s.hdr, struct.pack("<IIQB", r.op, 0, r.sector, STATUS_SENTINEL))',
    'bad = j + 2 if buf[j] == 0x5C else j + 1',
    'head = a16[AVAIL_RING_U16 + last % self.num]',
    'USED_ELEM.pack_into(self._umm, self._uoff + USED_RING + USED_ELEM_SIZE * slot, elem.index, length)',
]


@pytest.mark.parametrize("line", BEFORE)
def test_scanner_catches_what_the_tree_used_to_compute_by_hand(line: str) -> None:
    assert hand_computed_offsets(line + "\n"), f"the scan misses {line!r}"


@pytest.mark.parametrize("line", UNRELATED)
def test_scanner_leaves_look_alikes_alone(line: str) -> None:
    assert hand_computed_offsets(line + "\n") == []


def test_scanner_skips_docstrings_but_not_code_after_them() -> None:
    src = '"""Layout::\n\n    avail ring 6 + 2*N, used_event at avail + 4 + 2 * N\n"""\n\nx = used + 2\n'
    assert [no for no, _name, _line in hand_computed_offsets(src)] == [6]


def test_no_ring_offset_is_computed_outside_the_layout_module() -> None:
    files = sorted(SRC.rglob("*.py"))
    assert LAYOUT_MODULE in files and len(files) > 50
    found = [f"{p.relative_to(SRC)}:{no}: [{name}] {line}"
             for p in files if p != LAYOUT_MODULE
             for no, name, line in hand_computed_offsets(p.read_text())]
    assert not found, "ring offsets computed by hand (use kickcall.virtio.layout):\n" + "\n".join(found)


def test_layout_module_is_the_one_the_ring_modules_use() -> None:
    # ring.py re-exports the layout for existing importers: the same objects, not copies
    from kickcall.virtio import ring

    assert ring.DESC is L.DESC and ring.USED_ELEM is L.USED_ELEM and ring.U16 is L.U16
    assert ring.avail_size is L.avail_size and ring.used_size is L.used_size
    assert ring.desc_size is L.desc_table_size
