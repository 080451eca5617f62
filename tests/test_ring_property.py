"""Random descriptor chains thrown at a real virtio-blk device (aio="sync", no machine).

The verdict (valid / invalid) comes from an independent reference validator written here from the
virtio split-ring rules and the virtio-blk request-shape rules; it reads the descriptors back from a
snapshot of guest RAM and never calls the source's validator.

For every example:
  (a) DEVICE_NEEDS_RESET (status 0x40) and ``dev.broken`` are set iff the reference says invalid;
  (b) every changed byte of guest RAM lies in a device-writable buffer of a valid chain or in the
      used ring's idx / elements / avail_event; an invalid chain changes nothing at all;
  (c) a valid chain is completed exactly once, with the right id, length, status byte and data
      (read data == the image's sector labels; written data lands in the image);
  (d) the kick returns (the device is synchronous, so a hang would hang the test).
"""

from __future__ import annotations

import os
import random
import struct
from dataclasses import dataclass, field

import pytest
from hypothesis import HealthCheck, event, given, note, settings
from hypothesis import strategies as st

from kickcall.memory import GuestMemory
from kickcall.virtio.blk import VirtIOBlk, make_image
from kickcall.virtio.queue import RingErrorKind as K
from kickcall.virtio.ring import VIRTIO_F_VERSION_1, VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC

# -- the test machine's layout ------------------------------------------------------------------------
RAM_SIZE = 1 << 20
DESC_GPA, AVAIL_GPA, USED_GPA = 0x1000, 0x2000, 0x3000
BUF_LO, BUF_HI = 0x10000, 0xF0000  # buffers and indirect tables; the top 64 KiB stay free
IMAGE_SIZE = 64 * 1024
SECTOR = 512
CAPACITY = IMAGE_SIZE // SECTOR
U64 = 1 << 64

# -- spec constants (written out here, not imported, so the reference is independent) --------------
F_NEXT, F_WRITE, F_INDIRECT = 1, 2, 4
MAX_INDIRECT_ENTRIES = 1024
MAX_CHAIN_BYTES = 1 << 32
ACK, DRIVER, DRIVER_OK, FEATURES_OK, NEEDS_RESET = 1, 2, 4, 8, 0x40
READY = ACK | DRIVER | FEATURES_OK | DRIVER_OK
T_IN, T_OUT, T_FLUSH, T_GET_ID = 0, 1, 4, 8
S_OK, S_IOERR, S_UNSUPP = 0, 1, 2
SERIAL = b"blk0".ljust(20, b"\0")  # the device is named blk0 and has no explicit serial
PREFILL = 0xEE  # device-writable buffers start out filled with this

DESC = struct.Struct("<QIHH")
HDR = struct.Struct("<IIQ")
U16 = struct.Struct("<H")
USED_ELEM = struct.Struct("<II")

PROPERTY_SETTINGS = settings(
    max_examples=300,
    deadline=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


def sector_label(k: int) -> bytes:
    return (b"SECTOR%010d" % k).ljust(SECTOR, b".")


PRISTINE_IMAGE = b"".join(sector_label(k) for k in range(CAPACITY))


def used_layout(q: int) -> dict[str, tuple[int, int]]:
    """[start, end) of each field of the used ring (with EVENT_IDX's avail_event)."""
    return {
        "flags": (USED_GPA, USED_GPA + 2),
        "idx": (USED_GPA + 2, USED_GPA + 4),
        "ring": (USED_GPA + 4, USED_GPA + 4 + 8 * q),
        "avail_event": (USED_GPA + 4 + 8 * q, USED_GPA + 6 + 8 * q),
    }


# ==================================================================================================
# A device on 1 MiB of RAM
# ==================================================================================================

class Rig:
    """A VirtIOBlk driven directly: rings at fixed addresses, one request slot at *start*."""

    def __init__(self, workdir: str, *, qsize: int = 8, event_idx: bool = True, indirect: bool = True,
                 start: int = 0) -> None:
        self.path = os.path.join(workdir, "disk.img")
        make_image(self.path, IMAGE_SIZE)
        self.qsize, self.event_idx, self.indirect, self.start = qsize, event_idx, indirect, start
        self.mem = GuestMemory.create(RAM_SIZE)
        self.dev = VirtIOBlk("blk0", self.path, num_queues=1, queue_size=qsize, aio="sync")
        try:
            self.dev.mem = self.mem
            self.setup_driver()
        except BaseException:
            self.close()
            raise

    def setup_driver(self) -> None:
        """What a driver does after a reset: features, status, rings, indices at *start*."""
        feats = 1 << VIRTIO_F_VERSION_1
        if self.event_idx:
            feats |= 1 << VIRTIO_RING_F_EVENT_IDX
        if self.indirect:
            feats |= 1 << VIRTIO_RING_F_INDIRECT_DESC
        assert self.dev.set_features(feats)
        self.dev.set_status(READY)
        q = self.q = self.dev.queues[0]
        q.mem = self.mem
        q.set_rings(DESC_GPA, AVAIL_GPA, USED_GPA)
        # Resume at *start*, as after earlier traffic (exercises index wraparound).
        q.last_avail_idx = q.shadow_avail_idx = q.used_idx = self.start
        q.enabled = True
        self.mem.write(AVAIL_GPA, U16.pack(0) + U16.pack(self.start))  # flags, idx: nothing pending
        self.mem.write(USED_GPA, U16.pack(0) + U16.pack(self.start))  # flags, idx
        self.mem.write(used_layout(self.qsize)["avail_event"][0], U16.pack(self.start))

    def close(self) -> None:
        self.dev.close()
        self.dev.release_rings()
        self.mem.close()

    # -- driver side ----------------------------------------------------------------------------------
    def set_desc(self, i: int, addr: int, length: int, flags: int, nxt: int = 0, table: int = DESC_GPA) -> None:
        self.mem.write(table + 16 * i, DESC.pack(addr, length, flags, nxt))

    def publish(self, head: int) -> None:
        slot = self.start % self.qsize
        self.mem.write(AVAIL_GPA + 4 + 2 * slot, U16.pack(head))
        self.mem.write(AVAIL_GPA + 2, U16.pack((self.start + 1) & 0xFFFF))

    def kick(self) -> None:
        self.dev.handle_kick(self.q)

    def ram(self) -> bytes:
        return self.mem.read(0, RAM_SIZE)

    def image(self) -> bytes:
        with open(self.path, "rb") as f:
            return f.read()

    def guest_used_idx(self) -> int:
        return U16.unpack(self.mem.read(USED_GPA + 2, 2))[0]

    def used_elem(self, slot: int) -> tuple[int, int]:
        return USED_ELEM.unpack(self.mem.read(USED_GPA + 4 + 8 * slot, 8))

    @property
    def needs_reset(self) -> bool:
        return bool(self.dev.status & NEEDS_RESET)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("ringprop"))


# ==================================================================================================
# Reference validator (independent of kickcall.virtio.queue / blk)
# ==================================================================================================

@dataclass
class Verdict:
    valid: bool
    reason: str  # invalid: the rule broken; valid: the outcome
    structural: bool = False  # invalid because of the ring rules (vs. the blk request shape)
    out_sg: list[tuple[int, int]] = field(default_factory=list)
    in_sg: list[tuple[int, int]] = field(default_factory=list)
    rtype: int = -1
    sector: int = -1


def _in_ram(addr: int, length: int) -> bool:
    return 0 <= addr and addr + length <= RAM_SIZE


def _gather(ram: bytes, sg: list[tuple[int, int]], skip: int, n: int) -> bytes:
    flat = b"".join(ram[a:a + ln] for a, ln in sg)
    return flat[skip:skip + n]


def reference_walk(ram: bytes, qsize: int, head: int, indirect_negotiated: bool) -> Verdict:
    """Walk the chain from *head* the way the split-ring rules allow; first broken rule wins."""

    def bad(reason: str) -> Verdict:
        return Verdict(False, reason, structural=True)

    if head >= qsize:
        return bad("head index out of range")
    table, tlen, idx = DESC_GPA, qsize, head
    in_indirect = False
    is_head = True
    visited: set[int] = set()
    out_sg: list[tuple[int, int]] = []
    in_sg: list[tuple[int, int]] = []
    total = 0
    while True:
        if idx >= tlen:
            return bad("next index out of range")
        if idx in visited:  # a chain without repeats is at most tlen long
            return bad("loop / chain longer than the table")
        visited.add(idx)
        addr, length, flags, nxt = DESC.unpack_from(ram, table + 16 * idx)
        if flags & F_INDIRECT:
            if in_indirect:
                return bad("nested indirect")
            if not indirect_negotiated:
                return bad("indirect not negotiated")
            if not is_head:
                return bad("indirect not on the head")
            if flags & F_NEXT:
                return bad("indirect with NEXT")
            if length == 0 or length % 16:
                return bad("indirect table length 0 or not n*16")
            if length // 16 > MAX_INDIRECT_ENTRIES:
                return bad("indirect table > 1024 entries")
            if not _in_ram(addr, length):
                return bad("indirect table outside RAM")
            # The WRITE flag of the descriptor pointing at the table is ignored (spec 2.7.5.3.2).
            table, tlen, idx = addr, length // 16, 0
            in_indirect, is_head = True, False
            visited = set()
            continue
        is_head = False
        if length == 0:
            return bad("zero-length buffer")
        if addr + length > U64:
            return bad("addr+len wraps 2**64")
        if not _in_ram(addr, length):
            return bad("buffer outside RAM")
        total += length
        if total > MAX_CHAIN_BYTES:  # unreachable with 1 MiB of RAM and <= 1024 entries
            return bad("chain > 4 GiB")
        if flags & F_WRITE:
            in_sg.append((addr, length))
        else:
            if in_sg:
                return bad("readable after writable")
            out_sg.append((addr, length))
        if not flags & F_NEXT:
            break
        idx = nxt
    return Verdict(True, "chain ok", out_sg=out_sg, in_sg=in_sg)


def reference_blk(ram: bytes, v: Verdict) -> Verdict:
    """Apply the virtio-blk request-shape rules to a structurally valid chain."""
    out_len = sum(n for _, n in v.out_sg)
    in_len = sum(n for _, n in v.in_sg)

    def bad(reason: str) -> Verdict:
        return Verdict(False, reason, structural=False)

    if out_len < HDR.size:
        return bad("blk: no 16-byte readable header")
    if in_len < 1:
        return bad("blk: no writable status byte")
    rtype, _reserved, sector = HDR.unpack(_gather(ram, v.out_sg, 0, HDR.size))
    data_out, data_in = out_len - HDR.size, in_len - 1
    v.rtype, v.sector = rtype, sector
    if rtype == T_IN:
        if data_out:
            return bad("blk: read with readable data")
        nbytes = data_in
    elif rtype == T_OUT:
        if data_in:
            return bad("blk: write with writable data")
        nbytes = data_out
    elif rtype == T_FLUSH:
        if data_out or data_in:
            return bad("blk: flush with data")
        v.reason = "flush"
        return v
    elif rtype == T_GET_ID:
        if data_out:
            return bad("blk: get-id with readable data")
        v.reason = "get-id"
        return v
    else:
        v.reason = "unsupported type"
        return v
    name = "read" if rtype == T_IN else "write"
    if nbytes % SECTOR:
        v.reason = f"{name} IOERR (not n*512)"
    elif sector + nbytes // SECTOR > CAPACITY:
        v.reason = f"{name} IOERR (outside the disk)"
    else:
        v.reason = f"{name} ok"
    return v


def reference_verdict(ram: bytes, qsize: int, head: int, indirect_negotiated: bool) -> Verdict:
    v = reference_walk(ram, qsize, head, indirect_negotiated)
    return reference_blk(ram, v) if v.valid else v


def _scatter(ram: bytearray, sg: list[tuple[int, int]], data: bytes) -> None:
    """Write *data* over the scatter list in order (a later overlapping buffer wins, like preadv)."""
    pos = 0
    for a, n in sg:
        if pos >= len(data):
            break
        take = min(n, len(data) - pos)
        ram[a:a + take] = data[pos:pos + take]
        pos += take


def expected_effects(ram: bytes, image: bytes, v: Verdict) -> tuple[bytearray, bytes, int, int]:
    """(RAM, image, used length, status) a valid request must produce (used ring not included)."""
    exp = bytearray(ram)
    img = image
    in_len = sum(n for _, n in v.in_sg)
    out_len = sum(n for _, n in v.out_sg)
    written = 0
    if v.reason == "read ok":
        nbytes = in_len - 1
        data = image[v.sector * SECTOR:v.sector * SECTOR + nbytes]
        _scatter(exp, v.in_sg, data)
        written, status = nbytes, S_OK
    elif v.reason == "write ok":
        nbytes = out_len - HDR.size
        data = _gather(ram, v.out_sg, HDR.size, nbytes)
        off = v.sector * SECTOR
        img = image[:off] + data + image[off + nbytes:]
        status = S_OK
    elif v.reason == "get-id":
        n = min(in_len - 1, len(SERIAL))
        _scatter(exp, v.in_sg, SERIAL[:n])
        written, status = n, S_OK
    elif v.reason == "flush":
        status = S_OK
    elif v.reason == "unsupported type":
        status = S_UNSUPP
    else:
        assert "IOERR" in v.reason, v.reason
        status = S_IOERR
    a, n = v.in_sg[-1]
    exp[a + n - 1] = status
    return exp, img, written + 1, status


# ==================================================================================================
# Chain generator
# ==================================================================================================

@dataclass
class Seg:
    length: int
    write: bool
    data: bytes | None = None  # readable buffers: their content; writable ones are prefilled
    addr: int | None = None  # an explicit (bad) address; nothing is written there

    @property
    def clean(self) -> bool:
        return self.addr is None and self.length > 0


@dataclass
class Scenario:
    kind: str
    qsize: int
    event_idx: bool
    indirect: bool
    start: int
    head: int
    writes: list[tuple[int, bytes]]
    desc: str = ""


SEG_KINDS = ["zero_len", "outside_ram", "wrap", "r_after_w", "short_header", "no_status",
             "read_readable_data", "write_writable_data", "flush_data", "getid_readable"]
DESC_KINDS = ["loop", "next_oob", "head_oob"]
IND_KINDS = ["ind_not_negotiated", "ind_next", "ind_len_zero", "ind_len_misaligned", "ind_too_big",
             "ind_outside", "ind_nested", "ind_not_head", "ind_max", "ind_write_flag"]
MUTATION_KINDS = SEG_KINDS + DESC_KINDS + IND_KINDS + ["chaos"]


def _split(rnd: random.Random, total: int, parts: int) -> list[int]:
    if total == 0:
        return []
    parts = max(1, min(parts, total))
    cuts = sorted(rnd.sample(range(1, total), parts - 1)) if parts > 1 else []
    bounds = [0, *cuts, total]
    return [b - a for a, b in zip(bounds[:-1], bounds[1:], strict=True)]


def _readable(rnd: random.Random, data: bytes, parts: int) -> list[Seg]:
    out, pos = [], 0
    for n in _split(rnd, len(data), parts):
        out.append(Seg(n, False, data[pos:pos + n]))
        pos += n
    return out


def _writable(rnd: random.Random, total: int, parts: int) -> list[Seg]:
    return [Seg(n, True) for n in _split(rnd, total, parts)]


def _garbage_desc(rnd: random.Random) -> list[int]:
    addr = rnd.choice([rnd.randrange(RAM_SIZE), rnd.randrange(U64), 0])
    return [addr, rnd.randrange(1 << 32), rnd.randrange(8), rnd.randrange(1 << 16)]


class _Alloc:
    def __init__(self, rnd: random.Random) -> None:
        self.rnd = rnd
        self.cur = BUF_LO + rnd.randrange(0, 256)

    def __call__(self, n: int, align: int = 1) -> int:
        self.cur = (self.cur + align - 1) // align * align
        a = self.cur
        self.cur += n + self.rnd.randrange(0, 48)
        assert self.cur <= BUF_HI
        return a


def _merge_clean(segs: list[Seg]) -> list[Seg]:
    out: list[Seg] = []
    for s in segs:
        p = out[-1] if out else None
        if p is not None and p.clean and s.clean and p.write == s.write:
            data = None if s.write else (p.data or b"") + (s.data or b"")
            out[-1] = Seg(p.length + s.length, s.write, data)
        else:
            out.append(Seg(s.length, s.write, s.data, s.addr))
    return out


@st.composite
def requests(draw, op: str, rnd: random.Random) -> tuple[int, int, list[Seg]]:
    """A well-shaped request for *op*: (type, sector, segments in chain order)."""
    if op in ("read", "write"):
        nbytes = draw(st.one_of(st.sampled_from([0, 512, 1024, 1536, 2048]), st.sampled_from([512, 1024, 2048]),
                                st.integers(1, 2100)))
    else:
        nbytes = 0
    edge = CAPACITY - nbytes // SECTOR  # the last sector at which the request still fits
    sector = draw(st.one_of(st.integers(0, CAPACITY - 1), st.integers(0, CAPACITY - 1),
                            st.integers(max(0, edge - 2), edge + 2),
                            st.sampled_from([U64 - 1, 1 << 63, 1 << 32])))
    if op == "unknown":
        rtype = draw(st.integers(0, (1 << 32) - 1).filter(lambda t: t not in (T_IN, T_OUT, T_FLUSH, T_GET_ID)))
    else:
        rtype = {"read": T_IN, "write": T_OUT, "flush": T_FLUSH, "get-id": T_GET_ID}[op]
    header = HDR.pack(rtype, rnd.randrange(1 << 32), sector)
    segs = _readable(rnd, header, draw(st.integers(1, 2)))
    pieces = draw(st.integers(1, 3))
    if op == "read":
        segs += _writable(rnd, nbytes, pieces)
    elif op == "write":
        segs += _readable(rnd, rnd.randbytes(nbytes), pieces)
    elif op == "get-id":
        segs += _writable(rnd, draw(st.integers(0, 40)), pieces)
    elif op == "unknown":
        segs += _readable(rnd, rnd.randbytes(draw(st.integers(0, 600))), pieces)
        segs += _writable(rnd, draw(st.integers(0, 600)), pieces)
    if segs[-1].write and draw(st.booleans()):
        segs[-1].length += 1  # the status byte shares the last data buffer
    else:
        segs.append(Seg(1, True))
    return rtype, sector, segs


@st.composite
def chaos_scenario(draw, q: int, event_idx: bool, indirect: bool, start: int) -> Scenario:
    """Every descriptor random (from interesting values); headers waiting in the buffer slots."""
    writes: list[tuple[int, bytes]] = []
    slots = [BUF_LO + 0x1000 * k for k in range(12)]
    for k, a in enumerate(slots):
        writes.append((a, HDR.pack([T_IN, T_OUT, T_FLUSH, T_GET_ID, 3][k % 5], 0, (7 * k) % (CAPACITY + 4))))
        writes.append((a + HDR.size, bytes([PREFILL]) * (0x1000 - HDR.size)))
    table = BUF_LO + 0x20000
    addrs = st.sampled_from(slots + [slots[0] + 16, RAM_SIZE - 8, RAM_SIZE, U64 - 4, 0xF8000, table])
    lens = st.sampled_from([0, 1, 8, 15, 16, 17, 512, 513, 528, 1025, 4096])

    def descs(n: int, nxt_max: int) -> list[list[int]]:
        return [[draw(addrs), draw(lens), draw(st.integers(0, 7)), draw(st.integers(0, nxt_max))]
                for _ in range(n)]

    direct = descs(q, q)
    t = draw(st.integers(1, 6))
    ind = descs(t, t)
    if draw(st.booleans()):  # make some INDIRECT descriptor point at the table
        i = draw(st.integers(0, q - 1))
        direct[i][0], direct[i][1] = table, 16 * t
        direct[i][2] |= F_INDIRECT
    writes.append((DESC_GPA, b"".join(DESC.pack(*d) for d in direct)))
    writes.append((table, b"".join(DESC.pack(*d) for d in ind)))
    head = draw(st.integers(0, q))
    return Scenario("chaos", q, event_idx, indirect, start, head, writes,
                    f"direct={direct} indirect_table={ind}")


@st.composite
def scenarios(draw, only_kind: str | None = None) -> Scenario:
    q = draw(st.sampled_from([2, 4, 8, 16]))
    event_idx = draw(st.booleans())
    indirect = draw(st.booleans())
    start = draw(st.one_of(st.just(0), st.sampled_from([0xFFFF, 0xFFFE, 0x8000]), st.integers(0, 0xFFFF)))
    kind = only_kind or draw(st.one_of(st.just("valid"), st.sampled_from(MUTATION_KINDS)))  # ~half valid
    # Layout details (splits, gaps, permutations, payload bytes) come from a seeded PRNG; the
    # choices that decide the verdict are drawn through hypothesis below.
    rnd = random.Random(draw(st.integers(0, 2**32 - 1)))
    if kind == "chaos":
        return draw(chaos_scenario(q, event_idx, indirect, start))

    # -- the request, then mutations at the level of the buffers --------------------------------------
    forced_op = {"read_readable_data": "read", "write_writable_data": "write", "flush_data": "flush",
                 "getid_readable": "get-id"}.get(kind)
    op = forced_op or draw(st.sampled_from(["read", "read", "write", "write", "flush", "get-id", "unknown"]))
    rtype, sector, segs = draw(requests(op, rnd))
    # Mutation parameters are drawn through hypothesis (better spread and shrinking than rnd).
    ri = lambda lo, hi: draw(st.integers(lo, hi))  # noqa: E731
    ch = lambda xs: draw(st.sampled_from(xs))  # noqa: E731
    if kind == "zero_len":
        pos = ri(0, len(segs))
        segs.insert(pos, Seg(0, pos > 0 and segs[pos - 1].write))
    elif kind == "outside_ram":
        s = ch([s for s in segs if s.length > 1] or segs)
        # straddle: starts inside RAM and ends past its end (if length > 1)
        straddle = RAM_SIZE - ri(1, max(1, s.length - 1))
        s.addr = ch([straddle, RAM_SIZE, straddle, RAM_SIZE + ri(0, (1 << 20) - 1), 1 << 40, 1 << 63])
    elif kind == "wrap":
        s = max(segs, key=lambda s: s.length)
        s.addr = U64 - ri(1, max(1, s.length - 1))
    elif kind == "r_after_w":
        segs.append(Seg(ri(1, 64), False, rnd.randbytes(64)))
        segs[-1].data = segs[-1].data[:segs[-1].length]
    elif kind == "short_header":
        n = ri(1, 15)
        hdr = b"".join(s.data for s in segs if not s.write)[:n]
        segs = [Seg(n, False, hdr)] + [s for s in segs if s.write]
    elif kind == "no_status":
        if segs[-1].write:
            segs.pop()
    elif kind in ("read_readable_data", "write_writable_data", "flush_data", "getid_readable"):
        n = draw(st.sampled_from([512, 1024])) if kind != "getid_readable" else draw(st.integers(1, 40))
        writable = kind == "write_writable_data" or (kind == "flush_data" and draw(st.booleans()))
        extra = _writable(rnd, n, 2) if writable else _readable(rnd, rnd.randbytes(n), 2)
        first_w = next(i for i, s in enumerate(segs) if s.write)
        segs[first_w:first_w] = extra

    # -- layout: direct or through an indirect table ----------------------------------------------------
    if kind == "ind_not_negotiated":
        indirect, use_ind = False, True
    elif kind.startswith("ind_") and kind != "ind_not_head":
        indirect, use_ind = True, True
    elif kind == "ind_not_head":
        indirect, use_ind = True, False
    else:
        use_ind = indirect and draw(st.booleans())
    if not use_ind and len(segs) > q:
        segs = _merge_clean(segs)
        if len(segs) > q:  # still too long (a mutation kept pieces apart): go indirect
            indirect, use_ind = True, True

    alloc = _Alloc(rnd)
    writes: list[tuple[int, bytes]] = []
    chain: list[tuple[int, int, int]] = []
    for s in segs:
        if s.addr is not None:
            addr = s.addr
        else:
            addr = alloc(max(s.length, 1))
            content = s.data if not s.write else bytes([PREFILL]) * s.length
            if s.length:
                writes.append((addr, content))
        chain.append((addr, s.length, F_WRITE if s.write else 0))
    m = len(chain)

    # Garbage for the descriptors off the chain comes from a seeded PRNG (a 1025-entry table would
    # otherwise exhaust hypothesis' buffer).
    junk = random.Random(rnd.getrandbits(64))

    def build_table(n: int, head_at_zero: bool) -> tuple[list[list[int]], list[int]]:
        entries = [_garbage_desc(junk) for _ in range(n)]
        if head_at_zero:
            idx = [0] + junk.sample(range(1, n), m - 1)
        else:
            idx = rnd.sample(range(n), m)
        for k, (a, ln, fl) in enumerate(chain):
            last = k + 1 == m
            entries[idx[k]] = [a, ln, fl | (0 if last else F_NEXT), ri(0, 0xFFFF) if last else idx[k + 1]]
        return entries, idx

    direct = [_garbage_desc(junk) for _ in range(q)]
    head = ri(0, q - 1)
    ind_table: tuple[int, list[list[int]]] | None = None  # (gpa, entries) to write, if in RAM
    if use_ind:
        t = m + ri(0, 3)
        if kind == "ind_too_big":
            t = ri(MAX_INDIRECT_ENTRIES + 1, MAX_INDIRECT_ENTRIES + 64)
        elif kind == "ind_max":
            t = MAX_INDIRECT_ENTRIES
        ind, chain_idx = build_table(t, True)
        tgpa = alloc(16 * t, align=ch([16, 16, 8, 1]))
        length, flags = 16 * t, F_INDIRECT
        if kind == "ind_outside":
            tgpa = ch([RAM_SIZE - 16 * t + 8, RAM_SIZE, U64 - 16, 1 << 63])
        else:
            ind_table = (tgpa, ind)
        if kind == "ind_len_zero":
            length = 0
        elif kind == "ind_len_misaligned":
            length = 16 * t - ri(1, 15)
        elif kind == "ind_next":
            flags |= F_NEXT
        elif kind == "ind_write_flag":
            flags |= F_WRITE  # must be ignored
        elif kind == "ind_nested":
            ind[chain_idx[ri(0, m - 1)]][2] |= F_INDIRECT
        direct[head] = [tgpa, length, flags, ri(0, 0xFFFF)]
        chain_table, tlen = ind, t
    else:
        if kind == "ind_not_head" and m >= 2:
            # The chain's tail goes into a good indirect table, reached from the k-th descriptor
            # (k >= 1): valid in every respect except that INDIRECT is not on the head.
            k = ri(1, min(m - 1, q - 1))
            tail = chain[k:]
            tgpa = alloc(16 * len(tail), align=16)
            ind_table = (tgpa, [[a, ln, fl | (F_NEXT if i + 1 < len(tail) else 0), i + 1 if i + 1 < len(tail) else 0]
                                for i, (a, ln, fl) in enumerate(tail)])
            chain = chain[:k] + [(tgpa, 16 * len(tail), F_INDIRECT)]
            m = len(chain)
        direct, chain_idx = build_table(q, False)
        head = chain_idx[0]
        chain_table, tlen = direct, q

    if kind == "loop":
        p = ri(0, m - 1)
        e = chain_table[chain_idx[p]]
        e[2] |= F_NEXT
        e[3] = chain_idx[ri(0, p)]
    elif kind == "next_oob":
        e = chain_table[chain_idx[ri(0, m - 1)]]
        e[2] |= F_NEXT
        e[3] = ri(tlen, 0xFFFF)
    elif kind == "head_oob":
        head = ri(q, 0xFFFF)
    if ind_table is not None:
        writes.append((ind_table[0], b"".join(DESC.pack(*d) for d in ind_table[1])))
    writes.append((DESC_GPA, b"".join(DESC.pack(*d) for d in direct)))
    return Scenario(kind, q, event_idx, indirect, start, head, writes,
                    f"op={op} type={rtype} sector={sector} segs={[(s.length, s.write, s.addr) for s in segs]} "
                    f"indirect_layout={use_ind}")


# ==================================================================================================
# The property
# ==================================================================================================

def _changed(a: bytes, b: bytes) -> list[int]:
    out: list[int] = []
    for off in range(0, len(a), 4096):
        if a[off:off + 4096] != b[off:off + 4096]:
            out.extend(i for i in range(off, min(off + 4096, len(a))) if a[i] != b[i])
    return out


def _within(i: int, ranges: list[tuple[int, int]]) -> bool:
    return any(lo <= i < hi for lo, hi in ranges)


def run_scenario(sc: Scenario, workdir: str) -> None:
    rig = Rig(workdir, qsize=sc.qsize, event_idx=sc.event_idx, indirect=sc.indirect, start=sc.start)
    try:
        _run(rig, sc)
    finally:
        rig.close()


def _run(rig: Rig, sc: Scenario) -> None:
    for gpa, data in sc.writes:
        rig.mem.write(gpa, data)
    rig.publish(sc.head)
    before = rig.ram()
    image_before = rig.image()
    assert image_before == PRISTINE_IMAGE

    v = reference_verdict(before, sc.qsize, sc.head, sc.indirect)
    label = f"{'valid' if v.valid else 'INVALID'}: {v.reason}"
    note(f"kind={sc.kind} q={sc.qsize} event_idx={sc.event_idx} indirect={sc.indirect} start={sc.start:#x} "
         f"head={sc.head} {sc.desc}")
    note(f"reference verdict: {label}  out={v.out_sg} in={v.in_sg}")
    event(label)
    event(f"generator kind: {sc.kind}")
    event(f"{'valid' if v.valid else 'invalid'} (all)")
    event(f"EVENT_IDX={sc.event_idx}, queue size {sc.qsize}")

    rig.kick()  # (d): synchronous; returning at all means no hang

    after = rig.ram()
    image_after = rig.image()
    u = used_layout(sc.qsize)
    note(f"device: status={rig.dev.status:#x} broken={rig.dev.broken} reason={rig.dev.broken_reason!r}")

    # (a) NEEDS_RESET iff invalid
    assert rig.needs_reset == (not v.valid), label
    assert rig.dev.broken == (not v.valid), label

    if not v.valid and v.structural:
        # the device counted one ring error, of the kind its walker describes the chain with
        assert rig.q.errors == 1 and set(rig.q.errors_by_kind) == {rig.q.describe_chain(sc.head).fault.kind}
    else:
        assert rig.q.errors == 0  # a blk request of the wrong shape is the device's rule, not the ring's
    if not v.valid:
        # (b) nothing changed: RAM (used ring included), image, device-side used index
        changed = _changed(before, after)
        assert not changed, f"invalid chain ({v.reason}) changed RAM at {[hex(i) for i in changed[:16]]}"
        assert image_after == image_before
        assert rig.q.used_idx == sc.start
        return

    # (b) every changed byte lies in a writable buffer of the chain or in the used ring's idx/ring/avail_event
    allowed = [(a, a + n) for a, n in v.in_sg] + [u["idx"], u["ring"], u["avail_event"]]
    stray = [i for i in _changed(before, after) if not _within(i, allowed)]
    assert not stray, f"writes outside the chain's writable buffers: {[hex(i) for i in stray[:16]]}"

    # (c) exactly one used element with the head's id and the bytes written; status; data; image
    exp, exp_image, used_len, status = expected_effects(before, image_before, v)
    new_idx = (sc.start + 1) & 0xFFFF
    assert rig.guest_used_idx() == new_idx
    assert rig.q.used_idx == new_idx
    assert rig.used_elem(sc.start % sc.qsize) == (sc.head, used_len)
    a, n = v.in_sg[-1]
    assert after[a + n - 1] == status
    assert image_after == exp_image, "image contents differ from the request's data"
    # apart from the used ring, RAM is exactly what the request asked for (read data, get-id, status)
    for name in ("idx", "ring", "avail_event"):
        lo, hi = u[name]
        exp[lo:hi] = after[lo:hi]
    diff = _changed(bytes(exp), after)
    assert not diff, f"RAM differs from the model at {[hex(i) for i in diff[:16]]}"
    if sc.event_idx:
        ae = u["avail_event"][0]
        assert U16.unpack_from(after, ae)[0] == new_idx  # the device asks for the next kick


@PROPERTY_SETTINGS
@given(sc=scenarios())
def test_random_chains_needs_reset_iff_invalid(sc: Scenario, workdir: str) -> None:
    run_scenario(sc, workdir)


# Hypothesis explores the mix above unevenly (a run can miss a kind altogether), so every kind of
# chain also gets a few random examples of its own each run.
@settings(PROPERTY_SETTINGS, max_examples=15)
@pytest.mark.parametrize("kind", MUTATION_KINDS)
@given(data=st.data())
def test_each_kind_of_chain(kind: str, data, workdir: str) -> None:
    run_scenario(data.draw(scenarios(only_kind=kind), label="scenario"), workdir)


# ==================================================================================================
# Each rule, deterministically
# ==================================================================================================

HDR_GPA, DATA_GPA, STATUS_GPA, TABLE_GPA, EXTRA_GPA = 0x10000, 0x11000, 0x12000, 0x20000, 0x30000


@pytest.fixture
def rig(workdir):
    r = Rig(workdir, qsize=8, event_idx=True, indirect=True)
    yield r
    r.close()


@pytest.fixture
def rig_no_event_idx(workdir):
    r = Rig(workdir, qsize=8, event_idx=False, indirect=True)
    yield r
    r.close()


def put_request(rig: Rig, rtype: int = T_IN, sector: int = 3, data_len: int = 512, data_write: bool = True) -> None:
    """Header, data and status buffers (prefilled) at fixed places; no descriptors yet."""
    rig.mem.write(HDR_GPA, HDR.pack(rtype, 0, sector))
    if data_write:
        rig.mem.write(DATA_GPA, bytes([PREFILL]) * data_len)
    else:
        rig.mem.write(DATA_GPA, bytes(range(256)) * (data_len // 256) + bytes(data_len % 256))
    rig.mem.write(STATUS_GPA, bytes([PREFILL]))


def plain_read(rig: Rig, table: int = DESC_GPA, idx: tuple[int, int, int] = (0, 1, 2)) -> int:
    put_request(rig)
    a, b, c = idx
    rig.set_desc(a, HDR_GPA, 16, F_NEXT, b, table=table)
    rig.set_desc(b, DATA_GPA, 512, F_WRITE | F_NEXT, c, table=table)
    rig.set_desc(c, STATUS_GPA, 1, F_WRITE, 0, table=table)
    return a


def expect_rejected(rig: Rig, head: int) -> tuple[bytes, bytes]:
    """Kick; the device must be NEEDS_RESET with nothing completed.  Returns (before, after) RAM."""
    rig.publish(head)
    before = rig.ram()
    rig.kick()
    after = rig.ram()
    assert rig.needs_reset and rig.dev.broken, "invalid chain accepted"
    assert rig.dev.status & READY == READY
    assert rig.q.used_idx == rig.start and rig.guest_used_idx() == rig.start
    assert rig.image() == PRISTINE_IMAGE
    return before, after


def expect_completed(rig: Rig, head: int, status: int, used_len: int) -> bytes:
    rig.publish(head)
    rig.kick()
    assert not rig.needs_reset and not rig.dev.broken, rig.dev.broken_reason
    assert rig.guest_used_idx() == (rig.start + 1) & 0xFFFF
    assert rig.used_elem(rig.start % rig.qsize) == (head, used_len)
    return rig.ram()


def _loop(rig):
    h = plain_read(rig)
    rig.set_desc(2, STATUS_GPA, 1, F_WRITE | F_NEXT, 1)  # status -> data -> status -> ...
    return h


def _self_loop(rig):
    put_request(rig)
    rig.set_desc(5, HDR_GPA, 16, F_NEXT, 5)
    return 5


def _next_out_of_range(rig):
    h = plain_read(rig)
    rig.set_desc(1, DATA_GPA, 512, F_WRITE | F_NEXT, rig.qsize)
    return h


def _head_out_of_range(rig):
    plain_read(rig)
    return rig.qsize


def _buffer_past_ram(rig):
    h = plain_read(rig)
    rig.set_desc(1, RAM_SIZE, 512, F_WRITE | F_NEXT, 2)
    return h


def _buffer_straddles_ram_end(rig):
    h = plain_read(rig)
    rig.set_desc(1, RAM_SIZE - 256, 512, F_WRITE | F_NEXT, 2)
    return h


def _length_wraps_2_64(rig):
    h = plain_read(rig)
    rig.set_desc(1, U64 - 256, 512, F_WRITE | F_NEXT, 2)
    return h


def _readable_after_writable(rig):
    h = plain_read(rig)
    rig.mem.write(EXTRA_GPA, b"x" * 16)
    rig.set_desc(1, DATA_GPA, 512, F_WRITE | F_NEXT, 3)
    rig.set_desc(3, EXTRA_GPA, 16, F_NEXT, 2)  # device-readable after the writable data
    return h


def _zero_length(rig):
    h = plain_read(rig)
    rig.set_desc(1, DATA_GPA, 0, F_WRITE | F_NEXT, 2)
    return h


def _indirect_head(rig, n_entries: int = 3, flags: int = F_INDIRECT, length: int | None = None,
                   table: int = TABLE_GPA) -> int:
    plain_read(rig, table=TABLE_GPA)
    rig.set_desc(4, table, 16 * n_entries if length is None else length, flags, 0)
    return 4


def _nested_indirect(rig):
    h = _indirect_head(rig)
    rig.set_desc(1, EXTRA_GPA, 48, F_INDIRECT, 0, table=TABLE_GPA)  # entry 1 of the table
    return h


def _indirect_with_next(rig):
    return _indirect_head(rig, flags=F_INDIRECT | F_NEXT)


def _indirect_not_head(rig):
    put_request(rig)
    rig.set_desc(0, DATA_GPA, 512, F_WRITE | F_NEXT, 1, table=EXTRA_GPA)
    rig.set_desc(1, STATUS_GPA, 1, F_WRITE, 0, table=EXTRA_GPA)
    rig.set_desc(0, HDR_GPA, 16, F_NEXT, 6)
    rig.set_desc(6, EXTRA_GPA, 32, F_INDIRECT, 0)  # a good table, but reached from the 2nd descriptor
    return 0


def _indirect_len_zero(rig):
    return _indirect_head(rig, length=0)


def _indirect_len_not_n16(rig):
    return _indirect_head(rig, length=40)


def _indirect_1025_entries(rig):
    return _indirect_head(rig, length=16 * 1025)


def _indirect_table_outside_ram(rig):
    return _indirect_head(rig, table=RAM_SIZE)


def _indirect_table_straddles(rig):
    return _indirect_head(rig, table=RAM_SIZE - 16)


def _indirect_table_wraps(rig):
    return _indirect_head(rig, table=U64 - 16)


def _indirect_next_out_of_range(rig):
    h = _indirect_head(rig)
    rig.set_desc(1, DATA_GPA, 512, F_WRITE | F_NEXT, 3, table=TABLE_GPA)  # table has 3 entries
    return h


def _indirect_loop(rig):
    h = _indirect_head(rig)
    rig.set_desc(2, STATUS_GPA, 1, F_WRITE | F_NEXT, 0, table=TABLE_GPA)
    return h


# each rule, and the RingErrorKind the device counts it under
STRUCTURAL_RULES = {
    "loop": (_loop, K.CHAIN_LOOP),
    "self-loop": (_self_loop, K.CHAIN_LOOP),
    "next index out of range": (_next_out_of_range, K.DESC_OUT_OF_RANGE),
    "head index out of range": (_head_out_of_range, K.HEAD_OUT_OF_RANGE),
    "address past the end of RAM": (_buffer_past_ram, K.BUFFER_OUTSIDE_RAM),
    "buffer straddles the end of RAM": (_buffer_straddles_ram_end, K.BUFFER_IN_HOLE),
    "addr+len overflows 2**64": (_length_wraps_2_64, K.ADDRESS_OVERFLOW),
    "readable after writable": (_readable_after_writable, K.READABLE_AFTER_WRITABLE),
    "zero length": (_zero_length, K.ZERO_LENGTH),
    "nested indirect": (_nested_indirect, K.INDIRECT_NESTED),
    "indirect with NEXT": (_indirect_with_next, K.INDIRECT_WITH_NEXT),
    "indirect not on the head": (_indirect_not_head, K.INDIRECT_NOT_HEAD),
    "indirect table length 0": (_indirect_len_zero, K.INDIRECT_BAD_LENGTH),
    "indirect table length not n*16": (_indirect_len_not_n16, K.INDIRECT_BAD_LENGTH),
    "indirect table of 1025 entries": (_indirect_1025_entries, K.INDIRECT_TOO_BIG),
    "indirect table outside RAM": (_indirect_table_outside_ram, K.INDIRECT_OUTSIDE_RAM),
    "indirect table straddles the end of RAM": (_indirect_table_straddles, K.INDIRECT_OUTSIDE_RAM),
    "indirect table wraps 2**64": (_indirect_table_wraps, K.INDIRECT_OUTSIDE_RAM),
    "next out of range inside an indirect table": (_indirect_next_out_of_range, K.DESC_OUT_OF_RANGE),
    "loop inside an indirect table": (_indirect_loop, K.CHAIN_LOOP),
}


def assert_counted(rig: Rig, kind: K) -> None:
    """The device counted exactly one ring error, of *kind*, on the queue."""
    assert rig.q.errors == 1 and rig.q.errors_by_kind == {kind: 1}, rig.q.errors_by_kind


@pytest.mark.parametrize("rule", list(STRUCTURAL_RULES))
def test_structural_rule_sets_needs_reset_and_writes_nothing(rig, rule):
    build, kind = STRUCTURAL_RULES[rule]
    head = build(rig)
    assert not reference_verdict(rig_ram_with_head(rig, head), rig.qsize, head, True).valid
    assert rig.q.describe_chain(head).fault.kind is kind  # what a monitor shows before the kick
    before, after = expect_rejected(rig, head)
    assert _changed(before, after) == []  # with EVENT_IDX, not one byte (used ring included)
    assert_counted(rig, kind)


def test_indirect_without_the_feature_sets_needs_reset(workdir):
    r = Rig(workdir, qsize=8, event_idx=True, indirect=False)
    try:
        head = _indirect_head(r)
        before, after = expect_rejected(r, head)
        assert _changed(before, after) == []
        assert_counted(r, K.INDIRECT_NOT_NEGOTIATED)
    finally:
        r.close()


def test_avail_idx_too_far_ahead_sets_needs_reset(rig):
    head = plain_read(rig)
    rig.publish(head)
    rig.mem.write(AVAIL_GPA + 2, U16.pack(rig.qsize + 1))  # qsize+1 new entries: impossible
    before = rig.ram()
    rig.kick()
    assert rig.needs_reset and rig.dev.broken
    assert _changed(before, rig.ram()) == []
    assert_counted(rig, K.BAD_AVAIL_IDX)


def rig_ram_with_head(rig: Rig, head: int) -> bytes:
    rig.publish(head)
    return rig.ram()


def _read_with_readable_data(rig):
    put_request(rig, T_IN, data_write=False)
    rig.set_desc(0, HDR_GPA, 16, F_NEXT, 1)
    rig.set_desc(1, DATA_GPA, 512, F_NEXT, 2)  # device-readable: wrong for a read
    rig.set_desc(2, STATUS_GPA, 1, F_WRITE, 0)
    return 0


def _write_with_writable_data(rig):
    put_request(rig, T_OUT)
    rig.set_desc(0, HDR_GPA, 16, F_NEXT, 1)
    rig.set_desc(1, DATA_GPA, 512, F_WRITE | F_NEXT, 2)  # device-writable: wrong for a write
    rig.set_desc(2, STATUS_GPA, 1, F_WRITE, 0)
    return 0


def _flush_with_data(rig):
    put_request(rig, T_FLUSH, data_write=False)
    rig.set_desc(0, HDR_GPA, 16, F_NEXT, 1)
    rig.set_desc(1, DATA_GPA, 512, F_NEXT, 2)
    rig.set_desc(2, STATUS_GPA, 1, F_WRITE, 0)
    return 0


def _get_id_with_readable_data(rig):
    put_request(rig, T_GET_ID, data_write=False)
    rig.set_desc(0, HDR_GPA, 16, F_NEXT, 1)
    rig.set_desc(1, DATA_GPA, 20, F_NEXT, 2)
    rig.set_desc(2, STATUS_GPA, 1, F_WRITE, 0)
    return 0


def _short_header(rig):
    put_request(rig)
    rig.set_desc(0, HDR_GPA, 8, F_NEXT, 1)
    rig.set_desc(1, DATA_GPA, 512, F_WRITE | F_NEXT, 2)
    rig.set_desc(2, STATUS_GPA, 1, F_WRITE, 0)
    return 0


def _no_status(rig):
    put_request(rig, T_OUT, data_write=False)
    rig.set_desc(0, HDR_GPA, 16, F_NEXT, 1)
    rig.set_desc(1, DATA_GPA, 512, 0, 0)  # a write with no device-writable byte at all
    return 0


BLK_RULES = {
    "read request with a device-readable data buffer": _read_with_readable_data,
    "write request with a device-writable data buffer": _write_with_writable_data,
    "flush with data": _flush_with_data,
    "get-id with a device-readable buffer": _get_id_with_readable_data,
    "header shorter than 16 bytes": _short_header,
    "no status byte": _no_status,
}


@pytest.mark.parametrize("event_idx", [True, False], ids=["event_idx", "no_event_idx"])
@pytest.mark.parametrize("rule", list(BLK_RULES))
def test_blk_shape_rule_sets_needs_reset(workdir, rule, event_idx):
    r = Rig(workdir, qsize=8, event_idx=event_idx, indirect=True)
    try:
        head = BLK_RULES[rule](r)
        v = reference_verdict(rig_ram_with_head(r, head), r.qsize, head, True)
        assert not v.valid and not v.structural
        before, after = expect_rejected(r, head)
        # Nothing outside the used ring's header fields changes (those: see the two strict tests below).
        u = used_layout(r.qsize)
        header = [u["flags"], u["avail_event"]]
        assert [hex(i) for i in _changed(before, after) if not _within(i, header)] == []
        assert rig_image_unchanged(r)
    finally:
        r.close()


def rig_image_unchanged(rig: Rig) -> bool:
    return rig.image() == PRISTINE_IMAGE


# -- the strict "byte-identical" requirement on the used ring -------------------------------------------

@pytest.mark.parametrize("fix", [True, False], ids=["restore", "fix-off"])
def test_invalid_chain_leaves_used_flags_untouched(rig_no_event_idx, fix):
    """An invalid chain must leave all of RAM byte-identical, used.flags included.

    Without EVENT_IDX, process_queue_loop sets VRING_USED_F_NO_NOTIFY in used.flags before pop();
    when pop() finds the chain broken, the device restores the field.  With the restore switched
    off, the flag stays set.
    """
    r = rig_no_event_idx
    r.dev.faults.set_fix("restore-notify-on-error", fix)
    head = _loop(r)
    before, after = expect_rejected(r, head)
    f = used_layout(r.qsize)["flags"][0]
    if not fix:
        assert U16.unpack_from(after, f)[0] == 1, "without the restore NO_NOTIFY is left behind"
        return
    assert U16.unpack_from(after, f)[0] == U16.unpack_from(before, f)[0], "used.flags changed"
    assert _changed(before, after) == []


@pytest.mark.parametrize("fix", [True, False], ids=["restore", "fix-off"])
def test_blk_invalid_chain_leaves_avail_event_untouched(rig, fix):
    """A chain breaking a virtio-blk shape rule must leave all RAM byte-identical, avail_event included.

    With EVENT_IDX, pop() stores avail_event = last_avail_idx once the chain passes the ring checks;
    virtio-blk then rejects the request's shape and the device restores the field.  With the restore
    switched off, avail_event has moved.
    """
    rig.dev.faults.set_fix("restore-notify-on-error", fix)
    head = _read_with_readable_data(rig)
    before, after = expect_rejected(rig, head)
    ae = used_layout(rig.qsize)["avail_event"][0]
    if not fix:
        assert U16.unpack_from(after, ae)[0] != U16.unpack_from(before, ae)[0]
        return
    assert U16.unpack_from(after, ae)[0] == U16.unpack_from(before, ae)[0], "avail_event changed"
    assert _changed(before, after) == []


# -- valid chains at the edges of the rules ---------------------------------------------------------------

def test_plain_read_completes_with_sector_data(rig):
    head = plain_read(rig)
    ram = expect_completed(rig, head, S_OK, 513)
    assert ram[DATA_GPA:DATA_GPA + 512] == sector_label(3)
    assert ram[STATUS_GPA] == S_OK


def test_read_with_status_in_the_data_buffer_and_split_header(rig):
    put_request(rig, T_IN, sector=CAPACITY - 2, data_len=1024)
    rig.set_desc(3, HDR_GPA, 5, F_NEXT, 6)
    rig.set_desc(6, HDR_GPA + 5, 11, F_NEXT, 1)
    rig.set_desc(1, DATA_GPA, 1025, F_WRITE, 0)  # 1024 data bytes + the status byte
    ram = expect_completed(rig, 3, S_OK, 1025)
    assert ram[DATA_GPA:DATA_GPA + 1024] == sector_label(CAPACITY - 2) + sector_label(CAPACITY - 1)
    assert ram[DATA_GPA + 1024] == S_OK


def test_chain_as_long_as_the_queue_is_valid(workdir):
    r = Rig(workdir, qsize=4, event_idx=False, indirect=False)
    try:
        put_request(r, T_IN, sector=7, data_len=1024)
        r.set_desc(2, HDR_GPA, 16, F_NEXT, 0)
        r.set_desc(0, DATA_GPA, 512, F_WRITE | F_NEXT, 3)
        r.set_desc(3, DATA_GPA + 512, 512, F_WRITE | F_NEXT, 1)
        r.set_desc(1, STATUS_GPA, 1, F_WRITE, 0)
        ram = expect_completed(r, 2, S_OK, 1025)
        assert ram[DATA_GPA:DATA_GPA + 1024] == sector_label(7) + sector_label(8)
        f = used_layout(r.qsize)["flags"][0]
        assert U16.unpack_from(ram, f)[0] == 0  # NO_NOTIFY cleared again after the batch
    finally:
        r.close()


def test_write_lands_in_the_image(rig):
    put_request(rig, T_OUT, sector=9, data_len=1024, data_write=False)
    payload = rig.mem.read(DATA_GPA, 1024)
    rig.set_desc(0, HDR_GPA, 16, F_NEXT, 1)
    rig.set_desc(1, DATA_GPA, 1024, F_NEXT, 2)
    rig.set_desc(2, STATUS_GPA, 1, F_WRITE, 0)
    ram = expect_completed(rig, 0, S_OK, 1)
    assert ram[STATUS_GPA] == S_OK
    img = rig.image()
    assert img[9 * SECTOR:11 * SECTOR] == payload
    assert img[:9 * SECTOR] == PRISTINE_IMAGE[:9 * SECTOR]
    assert img[11 * SECTOR:] == PRISTINE_IMAGE[11 * SECTOR:]


@pytest.mark.parametrize("sector,nbytes", [(CAPACITY, 512), (CAPACITY - 1, 1024), (U64 - 1, 512), (0, 100),
                                           (0, 513)])
def test_read_outside_the_disk_or_unaligned_is_ioerr_not_needs_reset(rig, sector, nbytes):
    put_request(rig, T_IN, sector=sector, data_len=nbytes)
    rig.set_desc(0, HDR_GPA, 16, F_NEXT, 1)
    rig.set_desc(1, DATA_GPA, nbytes, F_WRITE | F_NEXT, 2)
    rig.set_desc(2, STATUS_GPA, 1, F_WRITE, 0)
    ram = expect_completed(rig, 0, S_IOERR, 1)
    assert ram[STATUS_GPA] == S_IOERR
    assert ram[DATA_GPA:DATA_GPA + nbytes] == bytes([PREFILL]) * nbytes


def test_unknown_type_is_unsupp(rig):
    put_request(rig, 0x1234)
    rig.set_desc(0, HDR_GPA, 16, F_NEXT, 1)
    rig.set_desc(1, STATUS_GPA, 1, F_WRITE, 0)
    ram = expect_completed(rig, 0, S_UNSUPP, 1)
    assert ram[STATUS_GPA] == S_UNSUPP


def test_get_id_writes_the_serial(rig):
    put_request(rig, T_GET_ID, data_len=20)
    rig.set_desc(0, HDR_GPA, 16, F_NEXT, 1)
    rig.set_desc(1, DATA_GPA, 20, F_WRITE | F_NEXT, 2)
    rig.set_desc(2, STATUS_GPA, 1, F_WRITE, 0)
    ram = expect_completed(rig, 0, S_OK, 21)
    assert ram[DATA_GPA:DATA_GPA + 20] == SERIAL
    assert ram[STATUS_GPA] == S_OK


def test_indirect_table_of_1024_entries_is_valid(rig):
    head = _indirect_head(rig, length=16 * 1024)
    ram = expect_completed(rig, head, S_OK, 513)
    assert ram[DATA_GPA:DATA_GPA + 512] == sector_label(3)


def test_write_flag_on_the_indirect_descriptor_is_ignored(rig):
    head = _indirect_head(rig, flags=F_INDIRECT | F_WRITE)
    ram = expect_completed(rig, head, S_OK, 513)
    assert ram[DATA_GPA:DATA_GPA + 512] == sector_label(3)


def test_wraparound_of_the_ring_indices(workdir):
    r = Rig(workdir, qsize=2, event_idx=True, indirect=False, start=0xFFFF)
    try:
        put_request(r, T_IN, sector=1)
        r.set_desc(1, HDR_GPA, 16, F_NEXT, 0)
        r.set_desc(0, DATA_GPA, 513, F_WRITE, 0)
        head = 1
        ram = expect_completed(r, head, S_OK, 513)
        assert r.guest_used_idx() == 0 and r.q.last_avail_idx == 0
        assert U16.unpack_from(ram, used_layout(2)["avail_event"][0])[0] == 0
        assert ram[DATA_GPA:DATA_GPA + 512] == sector_label(1)
    finally:
        r.close()


def test_broken_device_ignores_kicks_until_reset(rig):
    head = _loop(rig)
    expect_rejected(rig, head)
    # The driver fixes the chain and kicks again: nothing happens, the device needs a reset.
    plain_read(rig)
    before = rig.ram()
    rig.kick()
    assert rig.ram() == before and rig.dev.broken
    # Reset and the driver's re-initialisation: the same valid chain now completes.
    rig.dev.reset()
    assert rig.dev.status == 0 and not rig.dev.broken
    rig.setup_driver()
    ram = expect_completed(rig, plain_read(rig), S_OK, 513)
    assert ram[DATA_GPA:DATA_GPA + 512] == sector_label(3)
