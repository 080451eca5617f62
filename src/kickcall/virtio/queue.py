"""The device side of a split virtqueue (QEMU VirtQueue / rust-vmm ``QueueT``).

Guest ring contents are untrusted.  ``pop()`` validates a whole descriptor chain *before* it
touches anything: a loop, a chain longer than the ring, an index out of range, an address or a
length outside RAM (or wrapping), a zero-length buffer, a device-readable descriptor after a
writable one, an indirect table that is nested, misaligned, oversized or not negotiated -- each is
a ``VirtQueueError`` whose ``kind`` (a ``RingErrorKind``) names the rule, and nothing has been
written.  The device then marks itself broken (DEVICE_NEEDS_RESET) instead of hanging or
scribbling on guest memory, and counts the error by kind on the queue (``errors_by_kind``, shown as
``errors-by-kind`` in ``status()``).

One chain walker, ``walk_chain``: ``pop()`` takes its element or raises from its verdict, and
``describe_chain()`` (what the monitors' ``x-query-virtio-queue-element`` shows) returns the same
verdict without raising -- the valid prefix, the failing descriptor and the kind -- so a monitor
never shows as fine a chain the device refuses.

Guest RAM may be several regions contiguous in guest-physical space (QEMU with several memory
backends, a vhost-user memory table of several fds).  What may cross a seam between them:

* a buffer: it becomes one scatter-gather entry per region (as libvhost-user's
  ``virtqueue_map_desc`` and the kernel's vhost ``translate_desc`` make one iovec per region), so
  every ``(gpa, len)`` in ``out_sg``/``in_sg`` lies in one region and can be ``view()``-ed.  An
  element has at most ``MAX_SG`` entries in all (``VIRTQUEUE_MAX_SIZE``, QEMU's bound on
  ``virtqueue_pop``'s iovec array; also Linux's ``UIO_MAXIOV``, the most ``preadv`` takes): a
  chain whose buffers would split into more is invalid, so a hostile chain cannot turn into an
  unbounded scatter list;
* an indirect table: it is copied out of guest RAM when it crosses a seam (libvhost-user does the
  same; QEMU's ``address_space_cache_init`` would refuse it), and walked in place otherwise;
* the rings: never.  Each of desc, avail and used must lie in one region (QEMU's "Cannot map
  desc", libvhost-user's "Invalid vring_addr message"): the device keeps live 16-bit views into
  them.

A buffer that touches a hole or runs past RAM is refused, as before.  ``CROSS_REGION_BUFFERS =
False`` in ``kickcall.memory`` restores the old rule (every buffer and table in one region).

State and names follow QEMU's ``x-query-virtio-queue-status``: ``last_avail_idx``,
``shadow_avail_idx``, ``used_idx``, ``signalled_used``, ``signalled_used_valid``, ``inuse``.

How long requests take (``timing()``): ``pop()`` stamps the element's head with the monotonic time
in a per-queue array indexed by head, ``push()`` turns the stamp into a completion time kept in a
ring of the last ``COMPLETION_WINDOW``; ``detach()`` and ``reset()`` forget stamps.  Nothing is
allocated per request beyond the float ``time.monotonic()`` returns; the oldest request still in
flight is found by a scan of the stamps when someone asks (a monitor query), never per request.
"""

from __future__ import annotations

import mmap
import time
from array import array
from dataclasses import dataclass, field
from enum import StrEnum
from typing import TYPE_CHECKING, Callable, Protocol

from ..memory import GuestMemory, GuestMemoryError
from .. import trace
from .paths import CallPath, KickPath
from .layout import (
    AVAIL_ALIGN,
    AVAIL_FLAGS_U16,
    AVAIL_IDX_U16,
    AVAIL_RING_U16,
    DESC,
    DESC_ALIGN,
    DESC_SIZE,
    USED_ALIGN,
    USED_ELEM,
    USED_ELEM_SIZE,
    USED_FLAGS_U16,
    USED_IDX_U16,
    USED_RING,
    avail_event_u16,
    avail_flags_addr,
    avail_idx_addr,
    avail_ring_addr,
    avail_size,
    desc_table_size,
    used_event_u16,
    used_flags_addr,
    used_idx_addr,
    used_size,
)
from .ring import (
    VIRTQUEUE_MAX_SIZE,
    VRING_AVAIL_F_NO_INTERRUPT,
    VRING_DESC_F_INDIRECT,
    VRING_DESC_F_NEXT,
    VRING_DESC_F_WRITE,
    VRING_USED_F_NO_NOTIFY,
    mb,
    rmb,
    vring_need_event,
    wmb,
)

if TYPE_CHECKING:
    from ..notify import EventNotifier

__all__ = ["VirtQueue", "VirtQueueElement", "VirtQueueError", "RingErrorKind", "ChainFault", "ChainDescription",
           "walk_chain", "VIRTIO_NO_VECTOR", "MAX_SG", "iov_size", "iov_to_buf", "iov_from_buf"]

VIRTIO_NO_VECTOR = 0xFFFF
MAX_CHAIN_BYTES = 1 << 32
#: Scatter-gather entries (device-readable + device-writable) one element may have once its
#: buffers are split at RAM region seams.
MAX_SG = VIRTQUEUE_MAX_SIZE
#: Completions the queue remembers the duration of (``timing()``'s p50 and max); a power of two.
COMPLETION_WINDOW = 64
_monotonic = time.monotonic

_t_pop = trace.event("virtqueue_pop", "the device took a chain from the avail ring")
_t_flush = trace.event("virtqueue_flush", "the device published used elements")
_t_should = trace.event("virtio_notify_suppressed", "event idx / NO_INTERRUPT suppressed a call")


class InflightTracker(Protocol):
    """What a queue tells an inflight log (vhost-user's INFLIGHT_SHMFD: kickcall.vhost_user.inflight)
    as requests are taken and completed, so a back-end that reconnects can resubmit them."""

    def mark_popped(self, head: int) -> None: ...

    def before_push(self, head: int) -> None: ...

    def after_push(self, head: int, used_idx: int) -> None: ...


#: ``describe_chain`` reports an invalid chain's fault (kind and failing descriptor).  False only
#: to show, in tests, what the monitors did before they used the device's walker: they showed a
#: chain the device refuses as if it were fine.
DESCRIBE_FAULTS = True


class RingErrorKind(StrEnum):
    """Why the device refused a ring or a descriptor chain: one value per rule ``pop()`` (and
    ``map()``) enforces.  Named after the reasons QEMU's ``virtqueue_pop``/``virtqueue_map_desc``
    give and rust-vmm virtio-queue's ``Error`` variants; the value is what monitors and counters
    show (``errors-by-kind``)."""

    # -- the rings themselves (map(): QEMU "Cannot map desc/avail/used") ---------------------------
    RING_NOT_MAPPED = "ring-not-mapped"
    """The queue has no guest memory to map its rings in."""
    RING_MISALIGNED = "ring-misaligned"
    """desc/avail/used not aligned to 16/2/4 (virtio 1.2 2.7 "Virtqueue Alignment")."""
    RING_OUTSIDE_RAM = "ring-outside-ram"
    """A ring starts outside RAM (or runs past its end)."""
    RING_CROSSES_REGION = "ring-crosses-region"
    """A ring runs across a RAM region boundary (the device keeps live views into it)."""
    # -- the avail ring --------------------------------------------------------------------------------
    BAD_AVAIL_IDX = "bad-avail-idx"
    """avail.idx more than the queue size ahead of last_avail_idx (QEMU "Guest moved avail index
    from %u to %u", rust-vmm ``InvalidAvailRingIndex``)."""
    HEAD_OUT_OF_RANGE = "head-out-of-range"
    """The avail ring names a head >= queue size (QEMU "Guest says index %u is available")."""
    # -- walking the chain -------------------------------------------------------------------------------
    DESC_OUT_OF_RANGE = "desc-out-of-range"
    """A ``next`` past the end of its table (QEMU "Desc next is %u", rust-vmm
    ``InvalidDescriptorIndex``)."""
    CHAIN_LOOP = "chain-loop"
    """More descriptors than the table holds: a loop (QEMU "Looped descriptor", rust-vmm
    ``InvalidChain``)."""
    ZERO_LENGTH = "zero-length"
    """A buffer descriptor of length 0."""
    ADDRESS_OVERFLOW = "address-overflow"
    """addr + len wraps the 64-bit address space (rust-vmm ``AddressOverflow``)."""
    BUFFER_OUTSIDE_RAM = "buffer-outside-ram"
    """A buffer starts outside RAM (QEMU "virtio: bogus descriptor or out of resources")."""
    BUFFER_IN_HOLE = "buffer-in-hole"
    """A buffer starts in RAM and runs into a hole or past the end of RAM (or across a region
    seam with ``CROSS_REGION_BUFFERS`` off)."""
    TOO_MANY_SG = "too-many-sg"
    """The chain's buffers need more than ``MAX_SG`` scatter-gather entries once split at RAM
    region seams (QEMU's ``VIRTQUEUE_MAX_SIZE`` iovec bound)."""
    CHAIN_TOO_BIG = "chain-too-big"
    """The buffers add up to more than 4 GiB."""
    READABLE_AFTER_WRITABLE = "readable-after-writable"
    """A device-readable descriptor after a device-writable one (QEMU "Incorrect order for
    descriptors")."""
    # -- indirect tables (rust-vmm ``InvalidIndirectDescriptor`` / ``...Table``) ------------------------
    INDIRECT_NOT_NEGOTIATED = "indirect-not-negotiated"
    """VRING_DESC_F_INDIRECT without VIRTIO_RING_F_INDIRECT_DESC."""
    INDIRECT_NOT_HEAD = "indirect-not-head"
    """An indirect descriptor reached through ``next`` instead of being the chain's head."""
    INDIRECT_NESTED = "indirect-nested"
    """An indirect descriptor inside an indirect table."""
    INDIRECT_WITH_NEXT = "indirect-with-next"
    """An indirect descriptor with VRING_DESC_F_NEXT."""
    INDIRECT_BAD_LENGTH = "indirect-bad-length"
    """An indirect table length of 0 or not a multiple of 16 (QEMU "Invalid size for indirect
    buffer table")."""
    INDIRECT_TOO_BIG = "indirect-too-big"
    """An indirect table of more than ``VIRTQUEUE_MAX_SIZE`` descriptors."""
    INDIRECT_OUTSIDE_RAM = "indirect-outside-ram"
    """An indirect table outside RAM or across a hole (QEMU "Cannot map indirect buffer")."""


class VirtQueueError(Exception):
    """The guest put something invalid in the ring; the device must be marked broken.

    ``kind`` says which rule was broken (code decides on it); the message is for operators;
    ``fault`` is the walker's verdict when there is one (the failing descriptor), as
    ``VirtQueue.describe_chain`` reports it."""

    def __init__(self, kind: RingErrorKind, msg: str, fault: ChainFault | None = None) -> None:
        super().__init__(msg)
        self.kind = kind
        self.fault = fault


@dataclass(slots=True)
class VirtQueueElement:
    """One popped chain: its head index, device-readable and device-writable buffers."""

    index: int
    # (gpa, len) pieces, each inside one RAM region (a descriptor across a seam gives several)
    out_sg: list[tuple[int, int]] = field(default_factory=list)  # device-readable
    in_sg: list[tuple[int, int]] = field(default_factory=list)  # device-writable
    ndescs: int = 0  # buffer descriptors (not sg entries)
    indirect: bool = False
    out_len: int = 0  # bytes the device may read
    in_len: int = 0  # bytes the device may write


def iov_size(sg: list[tuple[int, int]]) -> int:
    return sum(n for _, n in sg)


def iov_to_buf(mem: GuestMemory, sg: list[tuple[int, int]], offset: int, length: int) -> bytes:
    """Gather *length* bytes starting *offset* bytes into the scatter list (an entry may be any
    RAM range ``GuestMemory.read`` accepts; a popped element's entries each lie in one region)."""
    out = bytearray()
    for gpa, n in sg:
        if offset >= n:
            offset -= n
            continue
        take = min(n - offset, length - len(out))
        out += mem.read(gpa + offset, take)
        offset = 0
        if len(out) >= length:
            break
    return bytes(out)


def iov_from_buf(mem: GuestMemory, sg: list[tuple[int, int]], offset: int, data: bytes) -> int:
    """Scatter *data* into the list starting *offset* bytes in; returns bytes written."""
    done = 0
    total = len(data)
    for gpa, n in sg:
        if offset >= n:
            offset -= n
            continue
        take = min(n - offset, total - done)
        mem.write(gpa + offset, data[done:done + take])
        done += take
        offset = 0
        if done >= total:
            break
    return done


# -- the chain walker ---------------------------------------------------------------------------------

#: A descriptor the walker accepted: (in an indirect table?, index in its table, addr, len, flags, next).
WalkedDesc = tuple[bool, int, int, int, int, int]

_DESC_FLAG_NAMES = ((VRING_DESC_F_NEXT, "next"), (VRING_DESC_F_WRITE, "write"), (VRING_DESC_F_INDIRECT, "indirect"))


def desc_flag_names(flags: int) -> list[str]:
    """A descriptor's flags as QEMU's ``VirtioRingDesc.flags`` lists them."""
    return [n for bit, n in _DESC_FLAG_NAMES if flags & bit]


@dataclass(slots=True)
class ChainFault:
    """Why and where the device refuses a chain (or its rings): ``VirtQueueError``'s content,
    returned instead of raised so that a monitor can show it."""

    kind: RingErrorKind
    message: str  # as the VirtQueueError's, without the queue's name
    index: int | None = None  # the failing descriptor's index in its table (None: a ring, not a descriptor)
    indirect: bool = False  # ... in the indirect table (else in the descriptor table)
    desc: tuple[int, int, int, int] | None = None  # its (addr, len, flags, next), when it could be read

    def describe(self) -> dict:
        """As a monitor shows it: ``{"kind", "message", "desc": {"table", "index", "addr", "len",
        "flags", "next"}}`` (``desc`` without the fields that could not be read; no ``desc`` for a
        ring-level fault)."""
        d: dict = {"kind": self.kind.value, "message": self.message}
        if self.index is not None:
            at: dict = {"table": "indirect" if self.indirect else "desc", "index": self.index}
            if self.desc is not None:
                addr, length, flags, nxt = self.desc
                at.update(addr=addr, len=length, flags=desc_flag_names(flags), next=nxt)
            d["desc"] = at
        return d


@dataclass(slots=True)
class ChainDescription:
    """A chain as ``VirtQueue.describe_chain`` reads it: the descriptors the walker accepted (the
    whole chain, or the valid prefix before ``fault``), and what ``pop()`` would return."""

    head: int
    descs: list[WalkedDesc]
    fault: ChainFault | None = None
    element: VirtQueueElement | None = None  # what pop() would return (a valid chain)
    truncated: bool = False  # descs stops at the caller's limit

    @property
    def valid(self) -> bool:
        return self.fault is None

    def qmp_descs(self) -> list[dict]:
        """``descs`` as QEMU's ``VirtioRingDesc`` list (addr, len, flags)."""
        return [{"addr": a, "len": n, "flags": desc_flag_names(f)} for _ind, _i, a, n, f, _nx in self.descs]


def walk_chain(mem: GuestMemory, table: mmap.mmap | bytearray | bytes, toff: int, num: int, head: int,
               indirect_ok: bool, trail: list[WalkedDesc] | None = None) -> VirtQueueElement | ChainFault:
    """Walk and validate the chain from *head* of the descriptor table of *num* entries mapped at
    *table* + *toff*: the element ``pop()`` takes, or the first rule it breaks (a ``ChainFault``).

    This is the one chain walker (the device's ``pop()`` and the monitors' ``describe_chain`` both
    use it).  Nothing is written.  The rules, in the order they are checked: head and ``next``
    in range; no more descriptors than the table has (a loop); an indirect descriptor only at the
    head, negotiated, not nested, without NEXT, its table n*16 bytes, at most
    ``VIRTQUEUE_MAX_SIZE`` entries, in RAM; a buffer of non-zero length that does not wrap, lies
    in RAM (split at region seams into at most ``MAX_SG`` entries in all), a chain of at most 4
    GiB, device-readable buffers before device-writable ones.  With *trail*, each descriptor that
    passed is appended to it as it is accepted (so on a fault it holds the valid prefix)."""
    if head >= num:
        return ChainFault(RingErrorKind.HEAD_OUT_OF_RANGE, f"head index {head} out of range (size {num})", head)
    elem = VirtQueueElement(head)
    out_sg = elem.out_sg
    in_sg = elem.in_sg
    total = 0
    room = MAX_SG  # sg entries this element may still take
    tmm = table
    tlen = num
    i = head
    seen = 0
    max_descs = num
    in_indirect = False
    while True:
        if i >= tlen:
            return ChainFault(RingErrorKind.DESC_OUT_OF_RANGE, f"descriptor index {i} out of range ({tlen})",
                              i, in_indirect)
        seen += 1
        if seen > max_descs:
            return ChainFault(RingErrorKind.CHAIN_LOOP, f"descriptor chain loops or exceeds {max_descs}",
                              i, in_indirect, DESC.unpack_from(tmm, toff + DESC_SIZE * i))
        addr, length, flags, nxt = DESC.unpack_from(tmm, toff + DESC_SIZE * i)
        if flags & VRING_DESC_F_INDIRECT:
            if in_indirect:
                return ChainFault(RingErrorKind.INDIRECT_NESTED, "nested indirect descriptor",
                                  i, in_indirect, (addr, length, flags, nxt))
            if not indirect_ok:
                return ChainFault(RingErrorKind.INDIRECT_NOT_NEGOTIATED, "indirect descriptor without INDIRECT_DESC",
                                  i, in_indirect, (addr, length, flags, nxt))
            if seen != 1:
                return ChainFault(RingErrorKind.INDIRECT_NOT_HEAD, "indirect descriptor is not the chain's head",
                                  i, in_indirect, (addr, length, flags, nxt))
            if flags & VRING_DESC_F_NEXT:
                return ChainFault(RingErrorKind.INDIRECT_WITH_NEXT, "indirect descriptor with NEXT set",
                                  i, in_indirect, (addr, length, flags, nxt))
            if length == 0 or length % DESC_SIZE:
                return ChainFault(RingErrorKind.INDIRECT_BAD_LENGTH, f"indirect table length {length} is not n*16",
                                  i, in_indirect, (addr, length, flags, nxt))
            n_ind = length // DESC_SIZE
            if n_ind > VIRTQUEUE_MAX_SIZE:
                return ChainFault(RingErrorKind.INDIRECT_TOO_BIG, f"indirect table of {n_ind} descriptors",
                                  i, in_indirect, (addr, length, flags, nxt))
            try:
                tmm, toff = mem.translate(addr, length)
            except GuestMemoryError as e:
                # across a seam: walk a copy (read() refuses a hole, or any seam when
                # CROSS_REGION_BUFFERS is off)
                try:
                    if e.kind != "region-end":
                        raise
                    tmm, toff = mem.read(addr, length), 0
                except GuestMemoryError as e2:
                    return ChainFault(RingErrorKind.INDIRECT_OUTSIDE_RAM, f"indirect table outside RAM: {e2}",
                                      i, in_indirect, (addr, length, flags, nxt))
            if trail is not None:
                trail.append((in_indirect, i, addr, length, flags, nxt))
            tlen = max_descs = n_ind
            seen = 0
            in_indirect = True
            elem.indirect = True
            i = 0
            continue
        if length == 0:
            return ChainFault(RingErrorKind.ZERO_LENGTH, f"zero-length descriptor {i}",
                              i, in_indirect, (addr, length, flags, nxt))
        if addr + length > (1 << 64):
            return ChainFault(RingErrorKind.ADDRESS_OVERFLOW, f"descriptor {i} wraps the address space",
                              i, in_indirect, (addr, length, flags, nxt))
        if mem.contains(addr, length):  # the common case: inside one region
            if not room:
                return ChainFault(RingErrorKind.TOO_MANY_SG, f"chain needs more than {MAX_SG} buffers",
                                  i, in_indirect, (addr, length, flags, nxt))
            room -= 1
            pieces: list[tuple[int, int]] | None = None
        else:
            try:
                pieces = mem.split(addr, length, room)
            except GuestMemoryError as e:
                if e.kind == "too-many-pieces":
                    return ChainFault(RingErrorKind.TOO_MANY_SG, f"chain needs more than {MAX_SG} buffers "
                                      f"(descriptor {i} spans several RAM regions)",
                                      i, in_indirect, (addr, length, flags, nxt))
                kind = RingErrorKind.BUFFER_IN_HOLE if e.kind in ("hole", "region-end") \
                    else RingErrorKind.BUFFER_OUTSIDE_RAM
                return ChainFault(kind, f"descriptor {i} buffer {addr:#x}+{length:#x} outside RAM: {e}",
                                  i, in_indirect, (addr, length, flags, nxt))
            room -= len(pieces)
        total += length
        if total > MAX_CHAIN_BYTES:
            return ChainFault(RingErrorKind.CHAIN_TOO_BIG, "chain longer than 4 GiB",
                              i, in_indirect, (addr, length, flags, nxt))
        if flags & VRING_DESC_F_WRITE:
            if pieces is None:
                in_sg.append((addr, length))
            else:
                in_sg.extend(pieces)
            elem.in_len += length
        else:
            if in_sg:
                return ChainFault(RingErrorKind.READABLE_AFTER_WRITABLE,
                                  "device-readable descriptor after a writable one",
                                  i, in_indirect, (addr, length, flags, nxt))
            if pieces is None:
                out_sg.append((addr, length))
            else:
                out_sg.extend(pieces)
            elem.out_len += length
        elem.ndescs += 1
        if trail is not None:
            trail.append((in_indirect, i, addr, length, flags, nxt))
        if not flags & VRING_DESC_F_NEXT:
            return elem
        i = nxt


RingMappings = tuple[tuple["mmap.mmap", int], tuple["mmap.mmap", int], tuple["mmap.mmap", int]]


def map_rings(mem: GuestMemory, desc: int, avail: int, used: int, num: int) -> RingMappings | ChainFault:
    """The (mapping, offset) of each of the three rings of *num* entries, or why the device refuses
    them (QEMU's "Cannot map desc/avail/used"): each must be aligned and lie in one RAM region.
    Nothing is written or cached (``VirtQueue.map`` caches the result)."""
    if desc % DESC_ALIGN or avail % AVAIL_ALIGN or used % USED_ALIGN:
        return ChainFault(RingErrorKind.RING_MISALIGNED, "misaligned ring addresses")
    maps = []
    for gpa, size in ((desc, desc_table_size(num)), (avail, avail_size(num, True)), (used, used_size(num, True))):
        try:
            maps.append(mem.translate(gpa, size))  # each ring in one region: the device keeps live views
        except GuestMemoryError as e:
            if e.kind != "region-end":
                return ChainFault(RingErrorKind.RING_OUTSIDE_RAM, f"ring outside RAM: {e}")
            # it starts in a region and ends in another one (across a seam); or past the end of RAM
            kind = RingErrorKind.RING_CROSSES_REGION if mem.contains(gpa + size - 1, 1) \
                else RingErrorKind.RING_OUTSIDE_RAM
            return ChainFault(kind, "ring not inside one RAM region "
                              f"(rings must not cross a region boundary): {e}")
    return maps[0], maps[1], maps[2]


class VirtQueue:
    """Device-side split virtqueue."""

    def __init__(self, index: int, num_max: int, handler: Callable[["VirtQueue"], None] | None = None,
                 name: str = "") -> None:
        if num_max & (num_max - 1) or not 1 <= num_max <= VIRTQUEUE_MAX_SIZE:
            raise ValueError("queue size must be a power of two up to 1024")
        self.index = index
        self.name = name or f"vq{index}"
        self.num_max = num_max
        self.handler = handler
        self.mem: GuestMemory | None = None
        self.event_idx = False
        self.indirect = False
        self.host_notifier: EventNotifier | None = None
        self.guest_notifier: EventNotifier | None = None
        self.vector = VIRTIO_NO_VECTOR
        self.inflight: InflightTracker | None = None  # vhost-user inflight tracking (InflightQueue)
        self.resubmit: list[int] = []  # heads to hand out again before new ones (after a reconnect)
        self._pop_t = array("d", bytes(8 * num_max))  # per head: monotonic time it was popped, 0.0 if not
        self._done_s = array("d", bytes(8 * COMPLETION_WINDOW))  # the last completions' durations (s)
        self.completions = 0  # completions timed (monotonic across resets, as the other counters)
        self.reset()
        # counters (monotonic across resets)
        self.kicks = 0  # notifications the device saw, any path
        self.kicks_by_path: dict[KickPath, int] = {}
        self.popped = 0
        self.pushed = 0
        self.calls_requested = 0  # the device asked should_notify
        self.calls_suppressed = 0  # ... and event idx / NO_INTERRUPT said no
        self.calls = 0  # signalled (through irqfd, MSI, masked->PBA or INTx)
        self.calls_by_path: dict[CallPath, int] = {}
        self.errors = 0  # ring errors (VirtQueueError) the device met on this queue
        self.errors_by_kind: dict[RingErrorKind, int] = {}  # ... by RingErrorKind

    def reset(self) -> None:
        self.num = self.num_max
        self.desc = 0
        self.avail = 0
        self.used = 0
        self.enabled = False
        self.last_avail_idx = 0
        self.shadow_avail_idx = 0
        self.used_idx = 0
        self.signalled_used = 0
        self.signalled_used_valid = False
        self.inuse = 0
        self.notification = True
        self.poll_suppressed = False  # suppress_notifications() said so (a poller owns them), until re-enabled
        self.pending_kick = False
        self.resubmit = []
        self.vector = VIRTIO_NO_VECTOR
        self._pop_t = array("d", bytes(8 * self.num_max))  # what was in flight is forgotten
        self.unmap()

    def unmap(self) -> None:
        """Drop the cached ring mappings (and the 16-bit views into guest RAM)."""
        self._mapped = False
        for v in ("_a16", "_u16"):
            view = getattr(self, v, None)
            if view is not None:
                view.release()
            setattr(self, v, None)
        # (an empty buffer, not None: the rings are only touched after _need_map(), and the hot
        # paths then need no Optional check)
        self._dmm: mmap.mmap | bytearray = bytearray()
        self._umm: mmap.mmap | bytearray = bytearray()
        self._doff = self._uoff = 0

    # -- setup ----------------------------------------------------------------------------------------
    def set_rings(self, desc: int, avail: int, used: int) -> None:
        self.desc, self.avail, self.used = desc, avail, used
        self.unmap()

    def set_num(self, num: int) -> bool:
        if num & (num - 1) or not 1 <= num <= self.num_max:
            return False
        self.num = num
        self.unmap()
        return True

    def map(self, mem: GuestMemory) -> None:
        """Check the rings lie in RAM and cache their mappings (VirtQueueError if not)."""
        self.unmap()
        self.mem = mem
        n = self.num
        rings = map_rings(mem, self.desc, self.avail, self.used, n)
        if isinstance(rings, ChainFault):
            raise VirtQueueError(rings.kind, f"{self.name}: {rings.message}", rings)
        (self._dmm, self._doff), (amm, aoff), (self._umm, self._uoff) = rings
        # Indices and flags are shared with the other side: each is read and written with one
        # 16-bit access (struct would move them byte by byte and the other process could see a
        # torn value).
        self._a16 = memoryview(amm)[aoff:aoff + avail_size(n, True)].cast("H")
        self._u16 = memoryview(self._umm)[self._uoff:self._uoff + used_size(n, True)].cast("H")
        self._ae = avail_event_u16(n)  # avail_event, in u16 units of the used ring
        self._ue = used_event_u16(n)  # used_event, in u16 units of the avail ring
        self._mapped = True

    @property
    def ready(self) -> bool:
        return self.enabled and self.desc != 0

    def _need_map(self) -> None:
        if not self._mapped:
            if self.mem is None:
                fault = ChainFault(RingErrorKind.RING_NOT_MAPPED, "no guest memory")
                raise VirtQueueError(fault.kind, f"{self.name}: {fault.message}", fault)
            self.map(self.mem)

    # -- ring reads -------------------------------------------------------------------------------------
    def avail_idx(self) -> int:
        self._need_map()
        v = self._a16[AVAIL_IDX_U16]
        self.shadow_avail_idx = v
        return v

    def avail_flags(self) -> int:
        self._need_map()
        return self._a16[AVAIL_FLAGS_U16]

    def used_event(self) -> int:
        self._need_map()
        return self._a16[self._ue]

    def avail_event(self) -> int:
        self._need_map()
        return self._u16[self._ae]

    def guest_used_idx(self) -> int:
        self._need_map()
        return self._u16[USED_IDX_U16]

    def guest_avail_idx(self) -> int:
        """avail.idx as the driver last published it, without updating the shadow index."""
        self._need_map()
        return self._a16[AVAIL_IDX_U16]

    # -- indices (QEMU's virtio_queue_{get,set}_last_avail_idx, virtio_queue_update_used_idx, ...;
    #    rust-vmm QueueT's next_avail/set_next_avail, next_used/set_next_used) ----------------------------
    def get_last_avail_idx(self) -> int:
        """The device's next avail index: the avail ring position ``pop()`` reads next."""
        return self.last_avail_idx

    def set_last_avail_idx(self, idx: int) -> None:
        """Resume popping at avail position *idx* (vhost-user SET_VRING_BASE, after a GET_VRING_BASE
        or an inflight recovery): the shadow of avail.idx goes with it, as in QEMU."""
        if not 0 <= idx <= 0xFFFF:
            raise ValueError(f"{idx} is not a 16-bit ring index")
        self.last_avail_idx = self.shadow_avail_idx = idx

    def restore_last_avail_idx(self) -> None:
        """Forget what was popped and not pushed: resume at the used index (QEMU's
        virtio_queue_restore_last_avail_idx, after a back-end that lost its in-flight requests)."""
        self.last_avail_idx = self.shadow_avail_idx = self.used_idx

    def get_used_idx(self) -> int:
        """The device's used index: where ``push()`` writes next, and what it publishes as used.idx."""
        return self.used_idx

    def set_used_idx(self, idx: int) -> None:
        """Continue pushing at used position *idx* (rust-vmm's ``set_next_used``)."""
        if not 0 <= idx <= 0xFFFF:
            raise ValueError(f"{idx} is not a 16-bit ring index")
        self.used_idx = idx

    def update_used_idx(self) -> None:
        """Take the used index from the used ring in guest memory (QEMU's
        virtio_queue_update_used_idx: after someone else -- a vhost back-end, a previous connection --
        pushed to the ring).  VirtQueueError if the rings cannot be mapped."""
        self.used_idx = self.guest_used_idx()

    def invalidate_signalled_used(self) -> None:
        """The next ``should_notify()`` signals whatever used_event says (QEMU's
        virtio_queue_invalidate_signalled_used): the last signalled index is no longer known."""
        self.signalled_used_valid = False

    def count_error(self, kind: RingErrorKind) -> None:
        """Count a ring error of *kind* met on this queue (the device's ``process_queue``, net rx)."""
        self.errors += 1
        self.errors_by_kind[kind] = self.errors_by_kind.get(kind, 0) + 1

    def is_empty(self) -> bool:
        if self.shadow_avail_idx != self.last_avail_idx:
            return False
        return self.avail_idx() == self.last_avail_idx

    # -- pop -----------------------------------------------------------------------------------------------
    def pop(self) -> VirtQueueElement | None:
        """Take the next available chain, validated; None if the ring is empty."""
        self._need_map()
        if self.resubmit:
            head = self.resubmit.pop(0)
            elem = self._read_chain(head)
            self.inuse += 1
            self.popped += 1
            self._pop_t[head] = _monotonic()
            return elem
        a16 = self._a16
        avail = a16[AVAIL_IDX_U16]
        self.shadow_avail_idx = avail
        last = self.last_avail_idx
        if avail == last:
            return None
        if ((avail - last) & 0xFFFF) > self.num:
            raise VirtQueueError(RingErrorKind.BAD_AVAIL_IDX,
                                 f"{self.name}: avail.idx {avail} is more than {self.num} ahead of {last}")
        rmb()
        head = a16[AVAIL_RING_U16 + last % self.num]
        mem = self.mem
        assert mem is not None  # mapped
        walked = walk_chain(mem, self._dmm, self._doff, self.num, head, self.indirect)  # (_read_chain, inlined)
        if not isinstance(walked, VirtQueueElement):
            raise VirtQueueError(walked.kind, f"{self.name}: {walked.message}", walked)
        elem = walked
        self.last_avail_idx = (last + 1) & 0xFFFF
        self.inuse += 1
        self.popped += 1
        self._pop_t[head] = _monotonic()
        if self.inflight is not None:
            self.inflight.mark_popped(head)
        if self.event_idx:
            self._u16[self._ae] = self.last_avail_idx
        if _t_pop.enabled:
            _t_pop.emit(vq=self.name, head=head, out=len(elem.out_sg), inn=len(elem.in_sg))
        return elem

    def _read_chain(self, head: int) -> VirtQueueElement:
        """The validated chain from *head* (``walk_chain``), or VirtQueueError with its kind."""
        mem = self.mem
        assert mem is not None
        r = walk_chain(mem, self._dmm, self._doff, self.num, head, self.indirect)
        if isinstance(r, ChainFault):
            raise VirtQueueError(r.kind, f"{self.name}: {r.message}", r)
        return r

    def describe_chain(self, head: int, limit: int = 256, mem: GuestMemory | None = None) -> ChainDescription:
        """The chain from *head* as ``pop()`` would find it, read without popping it or changing
        anything (for QEMU's ``x-query-virtio-queue-element``).  The same walker as ``pop()``: an
        invalid chain comes back as its valid prefix, the failing descriptor and the
        ``RingErrorKind`` pop() would raise.  Reads through *mem* (default: the queue's memory),
        never through or into the queue's cached mappings.  At most *limit* descriptors are listed
        (the whole chain is still validated)."""
        mem = self.mem if mem is None else mem
        if mem is None:
            return ChainDescription(head, [], ChainFault(RingErrorKind.RING_NOT_MAPPED, "no guest memory")
                                    if DESCRIBE_FAULTS else None)
        rings = map_rings(mem, self.desc, self.avail, self.used, self.num)
        if isinstance(rings, ChainFault):
            return ChainDescription(head, [], rings if DESCRIBE_FAULTS else None)
        (dmm, doff), _a, _u = rings
        trail: list[WalkedDesc] = []
        r = walk_chain(mem, dmm, doff, self.num, head, self.indirect, trail)
        d = ChainDescription(head, trail[:limit], truncated=len(trail) > limit)
        if isinstance(r, ChainFault):
            if DESCRIBE_FAULTS:
                d.fault = r
        else:
            d.element = r
        return d

    def queue_element(self, slot: int, mem: GuestMemory, type_name: str) -> dict:
        """QEMU's ``VirtioQueueElement`` (``x-query-virtio-queue-element``): the chain whose head
        avail ring slot *slot* (modulo the queue size) holds, walked by ``describe_chain`` -- a chain
        the device would refuse shows its valid prefix and an ``error`` (its ``RingErrorKind`` and
        the failing descriptor).  The ring fields are read from guest memory (0 where unreadable);
        nothing is changed.  ValueError if the slot holds a head beyond the queue."""
        def u16(gpa: int) -> int:
            try:
                return mem.read_u16_atomic(gpa)
            except ValueError:
                return 0

        n = self.num
        if not n:
            raise ValueError("the virtqueue has no size (VIRTIO_PCI_QUEUE_NUM / SET_VRING_NUM never set)")
        slot %= n
        head = u16(avail_ring_addr(self.avail, slot))
        if head >= n:
            raise ValueError(f"avail ring slot {slot} holds descriptor {head}, out of range (queue size {n})")
        chain = self.describe_chain(head, mem=mem)
        el: dict = {"name": type_name, "index": head, "descs": chain.qmp_descs(),
                    "avail": {"flags": u16(avail_flags_addr(self.avail)), "idx": u16(avail_idx_addr(self.avail)),
                              "ring": head},
                    "used": {"flags": u16(used_flags_addr(self.used)), "idx": u16(used_idx_addr(self.used))}}
        if chain.fault is not None:
            el["error"] = chain.fault.describe()  # what the device refuses, and where
        return el

    # -- push --------------------------------------------------------------------------------------------
    def push(self, elem: VirtQueueElement, length: int) -> None:
        """Return *elem* to the driver with *length* bytes written (fill + flush)."""
        self._need_map()
        inflight = self.inflight
        if inflight is not None:
            inflight.before_push(elem.index)
        slot = self.used_idx % self.num
        USED_ELEM.pack_into(self._umm, self._uoff + USED_RING + USED_ELEM_SIZE * slot, elem.index, length)
        wmb()  # the element before the index
        self.used_idx = (self.used_idx + 1) & 0xFFFF
        self._u16[USED_IDX_U16] = self.used_idx
        if inflight is not None:
            inflight.after_push(elem.index, self.used_idx)
        self.inuse -= 1
        self.pushed += 1
        t0 = self._pop_t[elem.index]
        if t0:
            self._pop_t[elem.index] = 0.0
            self._done_s[self.completions & (COMPLETION_WINDOW - 1)] = _monotonic() - t0
            self.completions += 1
        if _t_flush.enabled:
            _t_flush.emit(vq=self.name, head=elem.index, len=length, used_idx=self.used_idx)

    def detach(self, elem: VirtQueueElement) -> None:
        """Forget a popped element without returning it (device reset)."""
        self.inuse -= 1
        self._pop_t[elem.index] = 0.0

    # -- notification suppression ---------------------------------------------------------------------
    def set_notification(self, enable: bool) -> None:
        """Ask the driver to kick (or not) -- avail_event with EVENT_IDX, else VRING_USED_F_NO_NOTIFY."""
        self._need_map()
        self.notification = enable
        if enable:
            self.poll_suppressed = False
        if self.event_idx:
            if enable:
                self._u16[self._ae] = self.avail_idx()
        else:
            flags = self._u16[USED_FLAGS_U16]
            flags = flags & ~VRING_USED_F_NO_NOTIFY if enable else flags | VRING_USED_F_NO_NOTIFY
            self._u16[USED_FLAGS_U16] = flags & 0xFFFF
        if enable:
            mb()  # store avail_event / used.flags -> the caller re-reads avail.idx

    def suppress_notifications(self) -> None:
        """Ask the driver not to kick at all, while the device polls the ring (QEMU's io_poll_begin):
        VRING_USED_F_NO_NOTIFY, or with EVENT_IDX an avail_event half the index space away from
        avail.idx (``vring_need_event`` then says no to whatever the driver publishes, until it
        has published 32768 more; plain ``set_notification(False)`` leaves avail_event where the
        last enable put it, so the driver's next request kicks).  ``set_notification(True)``
        undoes it (and its barrier orders the caller's re-check of avail.idx)."""
        self._need_map()
        self.notification = False
        self.poll_suppressed = True
        if self.event_idx:
            self._u16[self._ae] = (self._a16[AVAIL_IDX_U16] + 0x8000) & 0xFFFF
        else:
            self._u16[USED_FLAGS_U16] = (self._u16[USED_FLAGS_U16] | VRING_USED_F_NO_NOTIFY) & 0xFFFF

    def should_notify(self) -> bool:
        """virtio_should_notify: does the driver want a call now?  (store used.idx -> load used_event)"""
        self._need_map()
        self.calls_requested += 1
        mb()
        if not self.event_idx:
            want = not (self._a16[AVAIL_FLAGS_U16] & VRING_AVAIL_F_NO_INTERRUPT)
        else:
            v = self.signalled_used_valid
            self.signalled_used_valid = True
            old = self.signalled_used
            new = self.signalled_used = self.used_idx
            want = not v or vring_need_event(self.used_event(), new, old)
        if not want:
            self.calls_suppressed += 1
            if _t_should.enabled:
                _t_should.emit(vq=self.name, used_idx=self.used_idx)
        return want

    def save_notify_fields(self) -> tuple[int, int] | None:
        """The device-written notification fields (used.flags, avail_event), to restore if the
        chain being processed turns out to be invalid: a broken chain must leave RAM untouched."""
        try:
            self._need_map()
        except VirtQueueError:
            return None
        return self._u16[USED_FLAGS_U16], self._u16[self._ae]

    def restore_notify_fields(self, saved: tuple[int, int] | None) -> None:
        if saved is None or not self._mapped:
            return
        self._u16[USED_FLAGS_U16], self._u16[self._ae] = saved

    def count_kick(self, path: KickPath) -> None:
        self.kicks += 1
        self.kicks_by_path[path] = self.kicks_by_path.get(path, 0) + 1

    def count_call(self, path: CallPath) -> None:
        self.calls += 1
        self.calls_by_path[path] = self.calls_by_path.get(path, 0) + 1

    def timing(self) -> dict:
        """How old the oldest request in flight is and how long requests have been taking.

        ``oldest-inflight-ms``: age of the oldest element popped and not yet pushed (None if
        none); ``completion-ms``: ``count`` completions timed since the queue was created,
        ``recent`` of them in the window (the last ``COMPLETION_WINDOW``), their median ``p50``
        and ``max`` in ms (None when there are none)."""
        now = _monotonic()
        oldest = min((t for t in self._pop_t if t), default=None)
        n = min(self.completions, COMPLETION_WINDOW)
        recent = sorted(self._done_s[:n]) if n else []
        return {
            "oldest-inflight-ms": None if oldest is None else round((now - oldest) * 1000.0, 3),
            "completion-ms": {
                "count": self.completions,
                "recent": n,
                "p50": round(recent[(n - 1) // 2] * 1000.0, 3) if n else None,
                "max": round(recent[-1] * 1000.0, 3) if n else None,
            },
        }

    def status(self) -> dict:
        """The fields of QEMU's VirtQueueStatus, and the ring errors met on the queue (``errors``,
        ``errors-by-kind``: RingErrorKind value -> count)."""
        return {
            "name": self.name,
            "queue-index": self.index,
            "inuse": self.inuse,
            "vring-num": self.num,
            "vring-num-default": self.num_max,
            "vring-align": 4096,
            "vring-desc": self.desc,
            "vring-avail": self.avail,
            "vring-used": self.used,
            "last-avail-idx": self.last_avail_idx,
            "shadow-avail-idx": self.shadow_avail_idx,
            "used-idx": self.used_idx,
            "signalled-used": self.signalled_used,
            "signalled-used-valid": self.signalled_used_valid,
            "errors": self.errors,
            "errors-by-kind": {k.value: n for k, n in sorted(self.errors_by_kind.items())},
        }
