"""Guest memory and the VMM's MMIO/PIO address spaces.

* ``RamBlock``: a memfd mapped MAP_SHARED; the same fd is mapped by the guest process (and by a
  vhost-user backend) so all of them see one RAM.
* ``GuestMemory``: guest-physical address -> RAM block, bounds-checked.  An address or a length
  outside RAM is a ``GuestMemoryError`` to the caller, never a crash and never a partial access.
  Guest RAM may be several regions contiguous in guest-physical space (QEMU with several memory
  backends or NUMA nodes; a vhost-user memory table of several regions, each its own fd): a
  range across such a seam is served region by region (``split()``; ``read``/``write``/``fill``),
  never through one merged mapping; ``translate``/``view`` and the typed accessors still map one
  region only.  The ``cross-region-buffers`` fault switched off restores "one region per access" everywhere.
* ``IORegion`` / ``AddressSpace``: emulated MMIO or PIO ranges (QEMU ``MemoryRegion`` with ops)
  mapped at guest addresses, with ``add_eventfd`` as in QEMU: a region's eventfds follow it when
  it is mapped, moved or unmapped, and are synced to the hypervisor through a listener.
"""

from __future__ import annotations

import bisect
import logging
import mmap
import os
import struct
import threading
from dataclasses import dataclass
from typing import Callable, Iterable, Protocol

from .faults import PROCESS
from .notify import EventNotifierLike

__all__ = [
    "GuestMemoryError",
    "RamBlock",
    "GuestMemory",
    "IORegion",
    "AddressSpace",
    "EventfdListener",
    "parse_size",
]

log = logging.getLogger("kickcall.memory")

_U16 = struct.Struct("<H")
_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")
U64_MAX = (1 << 64) - 1


#: Serve a guest-physical range that spans RAM regions contiguous in guest-physical space, one
#: piece per region (what libvhost-user's ``virtqueue_map_desc`` and the kernel's vhost
#: ``translate_desc`` do).  Off restores the old rule: every access lies in one region, and a
#: buffer across a seam is refused as if it ran past the end of RAM (kept to show, in tests, what
#: the rule refused).
CROSS_REGION_BUFFERS = PROCESS.switch(
    "cross-region-buffers", "off: a buffer across two RAM regions contiguous in guest-physical space is refused "
    "as if it ran past the end of RAM")


class GuestMemoryError(ValueError):
    """A guest-physical access outside RAM (or crossing a region boundary).

    ``kind`` says which: ``"bad-access"`` (a negative address or length), ``"outside-ram"`` (the
    range starts outside RAM), ``"region-end"`` (it starts in a region and runs past that region's
    end: refused by the one-region accessors), ``"hole"`` (it runs into a hole between regions or
    past the end of RAM), ``"too-many-pieces"`` (it would need more per-region pieces than the
    caller allows), ``"bad-region"`` (a region that cannot be added).
    """

    def __init__(self, msg: str, kind: str = "outside-ram") -> None:
        super().__init__(msg)
        self.kind = kind


def parse_size(v: int | str) -> int:
    """``4096``, ``"64M"``, ``"1G"``, ``"512k"`` -> bytes."""
    if isinstance(v, bool):
        raise ValueError("a size must be an integer or a string such as '64M'")
    if isinstance(v, int):
        if v < 0:
            raise ValueError("a size must not be negative")
        return v
    if not isinstance(v, str):
        raise ValueError("a size must be an integer or a string such as '64M'")
    s = v.strip()
    mult = 1
    suffixes = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
    if s and s[-1].lower() == "b" and len(s) > 1 and s[-2].lower() in suffixes:
        s = s[:-1]
    if s and s[-1].lower() in suffixes:
        mult = suffixes[s[-1].lower()]
        s = s[:-1]
    if not (s.isascii() and s.isdigit()) or len(s) > 24:
        shown = repr(v) if len(v) <= 40 else repr(v[:40]) + "..."
        raise ValueError(f"{shown} is not a size (examples: 4096, '64M', '1G')")
    return int(s) * mult


class RamBlock:
    """A memfd-backed block of RAM, shared across processes."""

    def __init__(self, size: int, name: str = "kickcall-ram", *, fd: int | None = None,
                 offset: int = 0) -> None:
        if size <= 0:
            raise ValueError("RAM block size must be positive")
        self.owns_fd = fd is None
        if fd is None:
            fd = os.memfd_create(name, os.MFD_CLOEXEC | getattr(os, "MFD_ALLOW_SEALING", 0))
            os.ftruncate(fd, offset + size)
        self.fd = fd
        self.size = size
        self.offset = offset
        self.name = name
        self.mm = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE, offset=offset)

    def close(self) -> None:
        """Unmap; close the fd only if this block owns it (it created it, or was given it for good)."""
        try:
            self.mm.close()
        except BufferError:
            log.warning("RAM block %s still has exported views; leaving it mapped", self.name)
            return
        if self.fd >= 0 and self.owns_fd:
            os.close(self.fd)
        self.fd = -1


@dataclass
class _Region:
    gpa: int
    size: int
    block: RamBlock
    block_offset: int  # offset of gpa inside block.mm

    @property
    def end(self) -> int:
        return self.gpa + self.size


class GuestMemory:
    """Guest-physical RAM: a sorted set of regions, every access bounds-checked."""

    def __init__(self) -> None:
        self._regions: list[_Region] = []
        self._starts: list[int] = []
        self._blocks: list[RamBlock] = []
        self._last: _Region | None = None

    # -- construction --------------------------------------------------------------------------
    @classmethod
    def create(cls, size: int, name: str = "kickcall-ram") -> "GuestMemory":
        """One memfd, mapped at guest-physical 0."""
        m = cls()
        blk = RamBlock(size, name)
        m.add_region(0, size, blk, 0)
        return m

    def add_region(self, gpa: int, size: int, block: RamBlock, block_offset: int = 0) -> None:
        if gpa < 0 or size <= 0 or gpa + size > U64_MAX:
            raise GuestMemoryError(f"bad RAM region gpa={gpa:#x} size={size:#x}", "bad-region")
        if block_offset < 0 or block_offset + size > block.size:
            raise GuestMemoryError("RAM region exceeds its block", "bad-region")
        for r in self._regions:
            if gpa < r.end and r.gpa < gpa + size:
                raise GuestMemoryError(f"RAM region {gpa:#x}+{size:#x} overlaps {r.gpa:#x}+{r.size:#x}",
                                       "bad-region")
        reg = _Region(gpa, size, block, block_offset)
        i = bisect.bisect(self._starts, gpa)
        self._regions.insert(i, reg)
        self._starts.insert(i, gpa)
        if block not in self._blocks:
            self._blocks.append(block)

    def remove_block(self, block: RamBlock) -> int:
        """Unplug every region backed by *block* (vhost-user's REM_MEM_REG); returns how many.
        The block itself stays open: its owner closes it."""
        before = len(self._regions)
        self._regions = [r for r in self._regions if r.block is not block]
        self._starts = [r.gpa for r in self._regions]
        self._blocks = [b for b in self._blocks if b is not block]
        self._last = None
        return before - len(self._regions)

    def layout(self) -> tuple[list[dict], list[int]]:
        """A description of the regions and the fds to send with it (SCM_RIGHTS)."""
        fds = [b.fd for b in self._blocks]
        regions = [
            {"gpa": r.gpa, "size": r.size, "block": self._blocks.index(r.block),
             "block_offset": r.block_offset + r.block.offset, "block_size": r.block.size + r.block.offset}
            for r in self._regions
        ]
        return regions, fds

    @classmethod
    def from_layout(cls, regions: list[dict], fds: list[int]) -> "GuestMemory":
        """Map RAM described by ``layout()`` in another process."""
        m = cls()
        blocks: dict[int, RamBlock] = {}
        for r in regions:
            bi = int(r["block"])
            if bi not in blocks:
                blocks[bi] = RamBlock(int(r["block_size"]), f"ram{bi}", fd=fds[bi], offset=0)
                blocks[bi].owns_fd = True  # received for good over the channel
            m.add_region(int(r["gpa"]), int(r["size"]), blocks[bi], int(r["block_offset"]))
        return m

    @property
    def size(self) -> int:
        return sum(r.size for r in self._regions)

    @property
    def regions(self) -> list[tuple[int, int]]:
        return [(r.gpa, r.size) for r in self._regions]

    def close(self) -> None:
        for b in self._blocks:
            b.close()
        self._regions.clear()
        self._starts.clear()
        self._blocks.clear()
        self._last = None

    # -- translation ---------------------------------------------------------------------------
    def _find(self, gpa: int, length: int) -> _Region:
        if gpa < 0 or length < 0:
            raise GuestMemoryError(f"bad guest access gpa={gpa} len={length}", "bad-access")
        r = self._last
        if r is not None and r.gpa <= gpa and gpa + length <= r.end:
            return r
        i = bisect.bisect(self._starts, gpa) - 1
        if i >= 0:
            r = self._regions[i]
            if gpa + length <= r.end:
                self._last = r
                return r
            if gpa < r.end:
                raise GuestMemoryError(
                    f"guest access {gpa:#x}+{length:#x} runs past the end of RAM region "
                    f"{r.gpa:#x}+{r.size:#x}", "region-end"
                )
        raise GuestMemoryError(f"guest access {gpa:#x}+{length:#x} is outside RAM", "outside-ram")

    def _pieces(self, gpa: int, length: int, max_pieces: int | None) -> list[tuple[_Region, int, int]]:
        """``(region, gpa, length)`` for each region ``[gpa, gpa+length)`` touches, in order;
        GuestMemoryError unless the whole range is RAM (and, with ``CROSS_REGION_BUFFERS`` off,
        one region)."""
        if gpa < 0 or length < 0:
            raise GuestMemoryError(f"bad guest access gpa={gpa} len={length}", "bad-access")
        if length == 0:
            self._find(gpa, 0)
            return []
        if max_pieces is not None and max_pieces < 1:
            raise GuestMemoryError(f"guest access {gpa:#x}+{length:#x}: no room for another piece",
                                   "too-many-pieces")
        r = self._last
        if r is not None and r.gpa <= gpa and gpa + length <= r.end:
            return [(r, gpa, length)]
        regions = self._regions
        i = bisect.bisect(self._starts, gpa) - 1
        if i < 0 or gpa >= regions[i].end:
            raise GuestMemoryError(f"guest access {gpa:#x}+{length:#x} is outside RAM", "outside-ram")
        end = gpa + length
        out: list[tuple[_Region, int, int]] = []
        pos = gpa
        while True:
            r = regions[i]
            stop = min(end, r.end)
            out.append((r, pos, stop - pos))
            if stop == end:
                if len(out) == 1:
                    self._last = r
                return out
            if not CROSS_REGION_BUFFERS.fix_on:
                raise GuestMemoryError(
                    f"guest access {gpa:#x}+{length:#x} runs past the end of RAM region "
                    f"{r.gpa:#x}+{r.size:#x}", "region-end"
                )
            i += 1
            if i == len(regions) or regions[i].gpa != stop:
                raise GuestMemoryError(
                    f"guest access {gpa:#x}+{length:#x} runs into a hole at {stop:#x} (the end of RAM "
                    f"region {r.gpa:#x}+{r.size:#x})", "hole"
                )
            if max_pieces is not None and len(out) >= max_pieces:
                raise GuestMemoryError(
                    f"guest access {gpa:#x}+{length:#x} spans more than {max_pieces} RAM regions",
                    "too-many-pieces"
                )
            pos = stop

    def split(self, gpa: int, length: int, max_pieces: int | None = None) -> list[tuple[int, int]]:
        """``[gpa, gpa+length)`` as ``(gpa, length)`` pieces, one per RAM region it touches.

        The range may cross seams between regions that are contiguous in guest-physical space
        (each piece then maps through its own region's fd, as libvhost-user's
        ``virtqueue_map_desc`` makes one iovec per region); a hole or the end of RAM anywhere in
        it is a GuestMemoryError ("hole").  At most *max_pieces* pieces (a hostile buffer must not
        turn into an unbounded scatter list): more is a GuestMemoryError ("too-many-pieces").
        With ``CROSS_REGION_BUFFERS`` off, only a range inside one region is accepted.
        A zero-length range gives no pieces.
        """
        return [(g, n) for _r, g, n in self._pieces(gpa, length, max_pieces)]

    def translate(self, gpa: int, length: int) -> tuple[mmap.mmap, int]:
        """(mapping, offset) for ``[gpa, gpa+length)``, which must lie inside one region."""
        r = self._find(gpa, length)
        return r.block.mm, r.block_offset + (gpa - r.gpa)

    def check(self, gpa: int, length: int) -> None:
        """GuestMemoryError unless ``[gpa, gpa+length)`` lies inside one region (``translate``)."""
        self._find(gpa, length)

    def contains(self, gpa: int, length: int) -> bool:
        """``[gpa, gpa+length)`` lies inside one region (what ``translate``/``view`` can map)."""
        try:
            self._find(gpa, length)
            return True
        except GuestMemoryError:
            return False

    def in_ram(self, gpa: int, length: int) -> bool:
        """``[gpa, gpa+length)`` is all RAM (it may cross seams between contiguous regions, when
        ``CROSS_REGION_BUFFERS`` allows): what ``read``/``write``/``fill`` accept."""
        try:
            self._pieces(gpa, length, None)
            return True
        except GuestMemoryError:
            return False

    # -- access ---------------------------------------------------------------------------------
    # read/write/fill take the one-region path first (the common case: one lookup, one slice);
    # a range that is not inside one region is served piece by piece, after the whole range has
    # been checked, so a refused access still changes nothing.
    def read(self, gpa: int, length: int) -> bytes:
        """The bytes of ``[gpa, gpa+length)`` (across contiguous regions if need be)."""
        try:
            mm, off = self.translate(gpa, length)
        except GuestMemoryError as e:
            if e.kind != "region-end" or not CROSS_REGION_BUFFERS.fix_on:
                raise
            return b"".join(r.block.mm[r.block_offset + (g - r.gpa):r.block_offset + (g - r.gpa) + n]
                            for r, g, n in self._pieces(gpa, length, None))
        return mm[off:off + length]

    def write(self, gpa: int, data: bytes | bytearray | memoryview) -> None:
        """Store *data* at *gpa* (across contiguous regions if need be; all or nothing)."""
        n = len(data)
        try:
            mm, off = self.translate(gpa, n)
        except GuestMemoryError as e:
            if e.kind != "region-end" or not CROSS_REGION_BUFFERS.fix_on:
                raise
            pieces = self._pieces(gpa, n, None)
            src = memoryview(data).cast("B")
            try:
                done = 0
                for r, g, k in pieces:
                    o = r.block_offset + (g - r.gpa)
                    r.block.mm[o:o + k] = src[done:done + k]
                    done += k
            finally:
                src.release()
            return
        mm[off:off + n] = data

    def fill(self, gpa: int, length: int, byte: int = 0) -> None:
        """Set ``[gpa, gpa+length)`` to *byte* (across contiguous regions if need be)."""
        try:
            pieces = [(self._find(gpa, length), gpa, length)]
        except GuestMemoryError as e:
            if e.kind != "region-end" or not CROSS_REGION_BUFFERS.fix_on:
                raise
            pieces = self._pieces(gpa, length, None)
        for r, g, k in pieces:
            o = r.block_offset + (g - r.gpa)
            r.block.mm[o:o + k] = bytes([byte]) * k

    def view(self, gpa: int, length: int) -> memoryview:
        """A writable view of guest RAM inside one region (zero copy; a range across regions is
        ``split()`` first, one view per piece).  Release it when done."""
        mm, off = self.translate(gpa, length)
        return memoryview(mm)[off:off + length]

    # The typed accessors below are one-region accesses (ring indices, ring fields, config words):
    # a field across a seam is refused like one past the end of RAM.
    def read_u16_atomic(self, gpa: int) -> int:
        """One 16-bit load (a ring index another process may be writing: never torn)."""
        mm, off = self.translate(gpa, 2)
        if off % 2:
            return _U16.unpack_from(mm, off)[0]
        v = memoryview(mm)[off:off + 2].cast("H")
        try:
            return v[0]
        finally:
            v.release()

    def read_u16(self, gpa: int) -> int:
        mm, off = self.translate(gpa, 2)
        return _U16.unpack_from(mm, off)[0]

    def read_u32(self, gpa: int) -> int:
        mm, off = self.translate(gpa, 4)
        return _U32.unpack_from(mm, off)[0]

    def read_u64(self, gpa: int) -> int:
        mm, off = self.translate(gpa, 8)
        return _U64.unpack_from(mm, off)[0]

    def write_u16(self, gpa: int, v: int) -> None:
        mm, off = self.translate(gpa, 2)
        _U16.pack_into(mm, off, v & 0xFFFF)

    def write_u32(self, gpa: int, v: int) -> None:
        mm, off = self.translate(gpa, 4)
        _U32.pack_into(mm, off, v & 0xFFFFFFFF)

    def write_u64(self, gpa: int, v: int) -> None:
        mm, off = self.translate(gpa, 8)
        _U64.pack_into(mm, off, v & U64_MAX)

    def digest_regions(self) -> list[bytes]:
        """A copy of all RAM (tests compare it byte for byte)."""
        return [bytes(r.block.mm[r.block_offset:r.block_offset + r.size]) for r in self._regions]


# ----------------------------------------------------------------------------------------------
# Emulated I/O regions and address spaces
# ----------------------------------------------------------------------------------------------

class EventfdListener(Protocol):
    """Told when an eventfd appears at or disappears from a guest address (the hypervisor)."""

    def eventfd_add(self, space: str, addr: int, length: int, datamatch: int | None,
                    notifier: EventNotifierLike) -> None: ...

    def eventfd_del(self, space: str, addr: int, length: int, datamatch: int | None,
                    notifier: EventNotifierLike) -> None: ...


@dataclass(frozen=True)
class _Eventfd:
    offset: int
    length: int
    datamatch: int | None
    notifier: EventNotifierLike


class IORegion:
    """An emulated MMIO or PIO range with read/write callbacks (QEMU MemoryRegion + ops)."""

    def __init__(self, name: str, size: int,
                 read: Callable[[int, int], int] | None = None,
                 write: Callable[[int, int, int], None] | None = None) -> None:
        self.name = name
        self.size = size
        self._read = read
        self._write = write
        self._eventfds: list[_Eventfd] = []
        self._spaces: list["AddressSpace"] = []
        self.reads = 0
        self.writes = 0

    def read(self, offset: int, size: int) -> int:
        self.reads += 1
        if self._read is None:
            return (1 << (8 * size)) - 1
        return self._read(offset, size)

    def write(self, offset: int, value: int, size: int) -> None:
        self.writes += 1
        if self._write is not None:
            self._write(offset, value, size)

    def add_eventfd(self, offset: int, length: int, datamatch: int | None, notifier: EventNotifierLike) -> None:
        """Bind *notifier* to writes at *offset* (``memory_region_add_eventfd``)."""
        e = _Eventfd(offset, length, datamatch, notifier)
        for sp in list(self._spaces):
            base = sp.base_of(self)
            if base is not None:
                sp.listener_add(base + offset, e)
        self._eventfds.append(e)

    def del_eventfd(self, offset: int, length: int, datamatch: int | None, notifier: EventNotifierLike) -> None:
        e = _Eventfd(offset, length, datamatch, notifier)
        try:
            self._eventfds.remove(e)
        except ValueError:
            raise KeyError(f"{self.name}: no eventfd at offset {offset:#x}") from None
        for sp in list(self._spaces):
            base = sp.base_of(self)
            if base is not None:
                sp.listener_del(base + offset, e)

    @property
    def eventfds(self) -> list[_Eventfd]:
        return list(self._eventfds)

    def space_mapped(self, space: "AddressSpace") -> None:
        """*space* mapped this region (``AddressSpace.map``, with the space's lock held): eventfds
        added from now on are forwarded to it as well."""
        if space not in self._spaces:
            self._spaces.append(space)

    def space_unmapped(self, space: "AddressSpace") -> None:
        """*space* unmapped this region (``AddressSpace.unmap``, with the space's lock held)."""
        if space in self._spaces:
            self._spaces.remove(space)


class AddressSpace:
    """A guest address space of emulated regions ("memory" for MMIO, "io" for port I/O)."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._mu = threading.RLock()
        self._maps: list[tuple[int, int, IORegion]] = []  # (base, end, region), sorted
        self._listeners: list[EventfdListener] = []
        self.unassigned_reads = 0
        self.unassigned_writes = 0

    def add_listener(self, listener: EventfdListener) -> None:
        with self._mu:
            self._listeners.append(listener)
            for base, _end, region in self._maps:
                for e in region.eventfds:
                    listener.eventfd_add(self.name, base + e.offset, e.length, e.datamatch, e.notifier)

    def remove_listener(self, listener: EventfdListener) -> None:
        with self._mu:
            self._listeners.remove(listener)

    def listener_add(self, addr: int, e: _Eventfd) -> None:
        for li in list(self._listeners):
            li.eventfd_add(self.name, addr, e.length, e.datamatch, e.notifier)

    def listener_del(self, addr: int, e: _Eventfd) -> None:
        for li in list(self._listeners):
            li.eventfd_del(self.name, addr, e.length, e.datamatch, e.notifier)

    def base_of(self, region: IORegion) -> int | None:
        with self._mu:
            for base, _end, r in self._maps:
                if r is region:
                    return base
        return None

    def map(self, region: IORegion, base: int) -> None:
        """Map *region* at *base* (moving it if it is already mapped)."""
        with self._mu:
            old = self.base_of(region)
            if old == base:
                return
            end = base + region.size
            for b, b_end, r in self._maps:
                if r is not region and base < b_end and b < end:
                    raise ValueError(f"{self.name}: {region.name} at {base:#x} overlaps {r.name} at {b:#x}")
            if old is not None:
                self.unmap(region)
            bisect.insort(self._maps, (base, end, region), key=lambda t: t[0])
            region.space_mapped(self)
            for e in region.eventfds:
                self.listener_add(base + e.offset, e)

    def unmap(self, region: IORegion) -> None:
        with self._mu:
            for i, (b, _e, r) in enumerate(self._maps):
                if r is region:
                    del self._maps[i]
                    for e in region.eventfds:
                        self.listener_del(b + e.offset, e)
                    region.space_unmapped(self)
                    return

    def lookup(self, addr: int, size: int) -> tuple[IORegion, int] | None:
        with self._mu:
            i = bisect.bisect_right(self._maps, addr, key=lambda t: t[0]) - 1
            if i >= 0:
                b, e, r = self._maps[i]
                if addr + size <= e:
                    return r, addr - b
        return None

    def read(self, addr: int, size: int) -> int:
        hit = self.lookup(addr, size)
        if hit is None:
            self.unassigned_reads += 1
            return (1 << (8 * size)) - 1
        region, off = hit
        return region.read(off, size) & ((1 << (8 * size)) - 1)

    def write(self, addr: int, value: int, size: int) -> None:
        hit = self.lookup(addr, size)
        if hit is None:
            self.unassigned_writes += 1
            return
        region, off = hit
        region.write(off, value & ((1 << (8 * size)) - 1), size)

    def mappings(self) -> Iterable[tuple[int, int, str]]:
        with self._mu:
            return [(b, e - b, r.name) for b, e, r in self._maps]
