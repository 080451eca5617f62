"""The device side of a split virtqueue (QEMU VirtQueue / rust-vmm ``QueueT``).

Guest ring contents are untrusted.  ``pop()`` validates a whole descriptor chain *before* it
touches anything: a loop, a chain longer than the ring, an index out of range, an address or a
length outside RAM (or wrapping), a zero-length buffer, a device-readable descriptor after a
writable one, an indirect table that is nested, misaligned, oversized or not negotiated -- each is
a ``VirtQueueError`` and nothing has been written.  The device then marks itself broken
(DEVICE_NEEDS_RESET) instead of hanging or scribbling on guest memory.

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
from typing import TYPE_CHECKING, Callable, Protocol

from ..memory import GuestMemory, GuestMemoryError
from .. import trace
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
    avail_size,
    desc_table_size,
    used_event_u16,
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

__all__ = ["VirtQueue", "VirtQueueElement", "VirtQueueError", "VIRTIO_NO_VECTOR", "MAX_SG",
           "iov_size", "iov_to_buf", "iov_from_buf"]

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


class VirtQueueError(Exception):
    """The guest put something invalid in the ring; the device must be marked broken."""


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
        self.kicks_by_path: dict[str, int] = {}
        self.popped = 0
        self.pushed = 0
        self.calls_requested = 0  # the device asked should_notify
        self.calls_suppressed = 0  # ... and event idx / NO_INTERRUPT said no
        self.calls = 0  # signalled (through irqfd, MSI, masked->PBA or INTx)
        self.calls_by_path: dict[str, int] = {}
        self.errors = 0

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
        if self.desc % DESC_ALIGN or self.avail % AVAIL_ALIGN or self.used % USED_ALIGN:
            raise VirtQueueError(f"{self.name}: misaligned ring addresses")
        try:
            # each ring in one region: the device keeps live views into them
            self._dmm, self._doff = mem.translate(self.desc, desc_table_size(n))
            amm, aoff = mem.translate(self.avail, avail_size(n, True))
            self._umm, self._uoff = mem.translate(self.used, used_size(n, True))
        except GuestMemoryError as e:
            if e.kind == "region-end":
                raise VirtQueueError(f"{self.name}: ring not inside one RAM region "
                                     f"(rings must not cross a region boundary): {e}") from None
            raise VirtQueueError(f"{self.name}: ring outside RAM: {e}") from None
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
                raise VirtQueueError(f"{self.name}: no guest memory")
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
            raise VirtQueueError(f"{self.name}: avail.idx {avail} is more than {self.num} ahead of {last}")
        rmb()
        head = a16[AVAIL_RING_U16 + last % self.num]
        elem = self._read_chain(head)
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
        num = self.num
        mem = self.mem
        assert mem is not None
        if head >= num:
            raise VirtQueueError(f"{self.name}: head index {head} out of range (size {num})")
        elem = VirtQueueElement(head)
        out_sg = elem.out_sg
        in_sg = elem.in_sg
        total = 0
        room = MAX_SG  # sg entries this element may still take
        # direct table
        tmm: mmap.mmap | bytearray | bytes = self._dmm
        toff, tlen = self._doff, num
        i = head
        seen = 0
        max_descs = num
        in_indirect = False
        while True:
            if i >= tlen:
                raise VirtQueueError(f"{self.name}: descriptor index {i} out of range ({tlen})")
            seen += 1
            if seen > max_descs:
                raise VirtQueueError(f"{self.name}: descriptor chain loops or exceeds {max_descs}")
            addr, length, flags, nxt = DESC.unpack_from(tmm, toff + DESC_SIZE * i)
            if flags & VRING_DESC_F_INDIRECT:
                if in_indirect:
                    raise VirtQueueError(f"{self.name}: nested indirect descriptor")
                if not self.indirect:
                    raise VirtQueueError(f"{self.name}: indirect descriptor without INDIRECT_DESC")
                if seen != 1:
                    raise VirtQueueError(f"{self.name}: indirect descriptor is not the chain's head")
                if flags & VRING_DESC_F_NEXT:
                    raise VirtQueueError(f"{self.name}: indirect descriptor with NEXT set")
                if length == 0 or length % DESC_SIZE:
                    raise VirtQueueError(f"{self.name}: indirect table length {length} is not n*16")
                n_ind = length // DESC_SIZE
                if n_ind > VIRTQUEUE_MAX_SIZE:
                    raise VirtQueueError(f"{self.name}: indirect table of {n_ind} descriptors")
                try:
                    tmm, toff = mem.translate(addr, length)
                except GuestMemoryError as e:
                    if e.kind != "region-end":
                        raise VirtQueueError(f"{self.name}: indirect table outside RAM: {e}") from None
                    # across a seam: walk a copy (read() refuses a hole, or any seam when
                    # CROSS_REGION_BUFFERS is off)
                    try:
                        tmm, toff = mem.read(addr, length), 0
                    except GuestMemoryError as e2:
                        raise VirtQueueError(f"{self.name}: indirect table outside RAM: {e2}") from None
                tlen = n_ind
                max_descs = n_ind
                seen = 0
                in_indirect = True
                elem.indirect = True
                i = 0
                continue
            if length == 0:
                raise VirtQueueError(f"{self.name}: zero-length descriptor {i}")
            if addr + length > (1 << 64):
                raise VirtQueueError(f"{self.name}: descriptor {i} wraps the address space")
            if mem.contains(addr, length):  # the common case: inside one region
                if not room:
                    raise VirtQueueError(f"{self.name}: chain needs more than {MAX_SG} buffers")
                room -= 1
                pieces: list[tuple[int, int]] | None = None
            else:
                try:
                    pieces = mem.split(addr, length, room)
                except GuestMemoryError as e:
                    if e.kind == "too-many-pieces":
                        raise VirtQueueError(f"{self.name}: chain needs more than {MAX_SG} buffers "
                                             f"(descriptor {i} spans several RAM regions)") from None
                    raise VirtQueueError(f"{self.name}: descriptor {i} buffer {addr:#x}+{length:#x} "
                                         f"outside RAM: {e}") from None
                room -= len(pieces)
            total += length
            if total > MAX_CHAIN_BYTES:
                raise VirtQueueError(f"{self.name}: chain longer than 4 GiB")
            if flags & VRING_DESC_F_WRITE:
                if pieces is None:
                    in_sg.append((addr, length))
                else:
                    in_sg.extend(pieces)
                elem.in_len += length
            else:
                if in_sg:
                    raise VirtQueueError(f"{self.name}: device-readable descriptor after a writable one")
                if pieces is None:
                    out_sg.append((addr, length))
                else:
                    out_sg.extend(pieces)
                elem.out_len += length
            elem.ndescs += 1
            if not flags & VRING_DESC_F_NEXT:
                break
            i = nxt
        return elem

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
        if self.event_idx:
            if enable:
                self._u16[self._ae] = self.avail_idx()
        else:
            flags = self._u16[USED_FLAGS_U16]
            flags = flags & ~VRING_USED_F_NO_NOTIFY if enable else flags | VRING_USED_F_NO_NOTIFY
            self._u16[USED_FLAGS_U16] = flags & 0xFFFF
        if enable:
            mb()  # store avail_event / used.flags -> the caller re-reads avail.idx

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

    def count_kick(self, path: str) -> None:
        self.kicks += 1
        self.kicks_by_path[path] = self.kicks_by_path.get(path, 0) + 1

    def count_call(self, path: str) -> None:
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
        """The fields of QEMU's VirtQueueStatus."""
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
        }
