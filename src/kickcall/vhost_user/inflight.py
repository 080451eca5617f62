"""Inflight I/O tracking for split virtqueues (vhost-user INFLIGHT_SHMFD).

The back-end owns a shared memory region (handed to the front-end with GET_INFLIGHT_FD and given
back with SET_INFLIGHT_FD after a reconnect) where it records, per queue, which descriptor heads it
has taken from the avail ring and not yet returned.  Layout per queue (vhost-user.rst)::

    struct QueueRegionSplit { u64 features; u16 version; u16 desc_num; u16 last_batch_head;
                              u16 used_idx; DescStateSplit desc[desc_num]; }
    struct DescStateSplit   { u8 inflight; u8 padding[5]; u16 next; u64 counter; }

Protocol: on pop ``desc[head].counter = ++counter; desc[head].inflight = 1``; before publishing a
used element ``last_batch_head = head``; after publishing ``desc[head].inflight = 0`` then
``used_idx = used.idx``.  On recovery: if ``used_idx != used.idx`` the crash hit between publishing
and clearing, so ``desc[last_batch_head].inflight = 0``; every head still in flight is resubmitted
in ``counter`` order, and ``last_avail_idx = used.idx + (number in flight)``.
"""

from __future__ import annotations

import mmap
import os
import struct

__all__ = ["InflightQueue", "InflightRegion", "queue_region_size", "INFLIGHT_VERSION"]

HDR = struct.Struct("=QHHHH")  # features, version, desc_num, last_batch_head, used_idx
DESC = struct.Struct("=B5xHQ")  # inflight, padding, next, counter
INFLIGHT_VERSION = 1
ALIGN = 64


def queue_region_size(queue_size: int) -> int:
    n = HDR.size + DESC.size * queue_size
    return (n + ALIGN - 1) // ALIGN * ALIGN


class InflightQueue:
    """One queue's part of the region (a view into the shared mapping)."""

    def __init__(self, mm: mmap.mmap, offset: int, queue_size: int) -> None:
        self.mm = mm
        self.off = offset
        self.size = queue_size
        self.counter = 0
        self.resubmitted = 0

    # header fields
    def _hdr(self) -> tuple[int, int, int, int, int]:
        return HDR.unpack_from(self.mm, self.off)

    @property
    def version(self) -> int:
        return self._hdr()[1]

    def _set_hdr(self, **kw: int) -> None:
        f, ver, num, lbh, used = self._hdr()
        HDR.pack_into(self.mm, self.off, kw.get("features", f), kw.get("version", ver), kw.get("desc_num", num),
                      kw.get("last_batch_head", lbh), kw.get("used_idx", used))

    def _desc_off(self, head: int) -> int:
        return self.off + HDR.size + DESC.size * head

    def desc(self, head: int) -> tuple[int, int, int]:
        return DESC.unpack_from(self.mm, self._desc_off(head))

    # the three hooks the virtqueue calls
    def mark_popped(self, head: int) -> None:
        self.counter += 1
        o = self._desc_off(head)
        _infl, nxt, _cnt = DESC.unpack_from(self.mm, o)
        DESC.pack_into(self.mm, o, 0, nxt, self.counter)  # the counter first, then the flag
        self.mm[o] = 1

    def before_push(self, head: int) -> None:
        o = self._desc_off(head)
        _infl, _nxt, cnt = DESC.unpack_from(self.mm, o)
        f, ver, num, lbh, used = self._hdr()
        DESC.pack_into(self.mm, o, self.mm[o], lbh, cnt)
        HDR.pack_into(self.mm, self.off, f, ver, num, head, used)

    def after_push(self, head: int, used_idx: int) -> None:
        self.mm[self._desc_off(head)] = 0
        self._set_hdr(used_idx=used_idx)

    # reconnect
    def recover(self, ring_used_idx: int) -> list[int]:
        """Make the region consistent with the ring's used.idx; return the heads to resubmit,
        in the order they were first taken."""
        f, ver, num, lbh, used = self._hdr()
        if ver == 0:  # a fresh region: nothing was ever in flight
            HDR.pack_into(self.mm, self.off, 0, INFLIGHT_VERSION, self.size, 0, ring_used_idx)
            self.counter = 0
            return []
        if num != self.size:
            raise ValueError(f"inflight region describes {num} descriptors, the queue has {self.size}")
        if used != ring_used_idx:
            # crashed after publishing the used element, before clearing its flag
            if lbh < self.size:
                self.mm[self._desc_off(lbh)] = 0
            self._set_hdr(used_idx=ring_used_idx)
        pending = []
        for head in range(self.size):
            infl, _nxt, cnt = self.desc(head)
            if infl == 1:
                pending.append((cnt, head))
        pending.sort()
        self.counter = pending[-1][0] if pending else 0
        self.resubmitted += len(pending)
        return [h for _c, h in pending]

    def in_flight(self) -> list[int]:
        return [h for h in range(self.size) if self.desc(h)[0] == 1]


class InflightRegion:
    """The whole shared region: one InflightQueue per queue."""

    def __init__(self, fd: int, mmap_size: int, mmap_offset: int, num_queues: int, queue_size: int,
                 *, owns_fd: bool = True) -> None:
        need = num_queues * queue_region_size(queue_size)
        st = os.fstat(fd)
        if mmap_size < need or mmap_offset % mmap.PAGESIZE or mmap_offset + mmap_size > st.st_size:
            raise ValueError(f"inflight region of {mmap_size} bytes at {mmap_offset} (file {st.st_size}) cannot "
                             f"hold {num_queues} queues of {queue_size}")
        self.fd = fd
        self.owns_fd = owns_fd
        self.mmap_size = mmap_size
        self.mmap_offset = mmap_offset
        self.num_queues = num_queues
        self.queue_size = queue_size
        self.mm = mmap.mmap(fd, mmap_size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE, offset=mmap_offset)
        qs = queue_region_size(queue_size)
        self.queues = [InflightQueue(self.mm, i * qs, queue_size) for i in range(num_queues)]

    @classmethod
    def create(cls, num_queues: int, queue_size: int) -> "InflightRegion":
        size = num_queues * queue_region_size(queue_size)
        size = (size + mmap.PAGESIZE - 1) // mmap.PAGESIZE * mmap.PAGESIZE
        fd = os.memfd_create("kickcall-inflight", os.MFD_CLOEXEC)
        os.ftruncate(fd, size)
        return cls(fd, size, 0, num_queues, queue_size)

    def close(self) -> None:
        self.queues = []
        self.mm.close()
        if self.owns_fd and self.fd >= 0:
            os.close(self.fd)
        self.fd = -1
