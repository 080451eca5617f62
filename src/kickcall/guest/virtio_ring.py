"""The driver side of a split virtqueue (Linux ``drivers/virtio/virtio_ring.c``, modelled).

* ``add`` writes descriptors (an indirect table for multi-buffer requests when negotiated), then
  the avail ring entry, then ``avail.idx`` (store->store: ordered on x86);
* ``kick_prepare``: ``mb()`` (store avail.idx -> load avail_event / used.flags), then
  ``vring_need_event(avail_event, new, old)`` with EVENT_IDX, else ``!VRING_USED_F_NO_NOTIFY``;
* ``get_buf`` consumes used entries and, with EVENT_IDX, republishes ``used_event``;
* ``enable_cb``: write used_event, ``mb()`` (store used_event -> load used.idx), re-check.
"""

from __future__ import annotations

import threading
from typing import Any, Callable

from ..memory import GuestMemory, GuestMemoryError
from ..virtio.layout import (
    AVAIL_FLAGS_U16,
    AVAIL_IDX_U16,
    AVAIL_RING_U16,
    DESC,
    DESC_SIZE,
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
from ..virtio.ring import (
    VRING_AVAIL_F_NO_INTERRUPT,
    VRING_DESC_F_INDIRECT,
    VRING_DESC_F_NEXT,
    VRING_DESC_F_WRITE,
    VRING_USED_F_NO_NOTIFY,
    mb,
    vring_need_event,
)

__all__ = ["Vring", "INDIRECT_MAX"]

INDIRECT_MAX = 16


class Vring:
    """A guest driver's virtqueue."""

    def __init__(self, mem: GuestMemory, alloc: Callable[[int, int], int], index: int, num: int, *,
                 event_idx: bool, indirect: bool, notify: Callable[["Vring"], None], name: str = "") -> None:
        self.mem = mem
        self.index = index
        self.num = num
        self.name = name or f"vq{index}"
        self.event_idx = event_idx
        self.use_indirect = indirect
        self.notify_fn = notify
        self.desc = alloc(desc_table_size(num), 4096)
        self.avail = alloc(avail_size(num), 4096)
        self.used = alloc(used_size(num), 4096)
        self.indirect_tables = alloc(num * desc_table_size(INDIRECT_MAX), 4096) if indirect else 0
        # the indirect tables mapped once (None: they cross a seam between RAM regions; each add
        # then maps its own table)
        self._imap: tuple[Any, int] | None = None
        if indirect:
            try:
                self._imap = mem.translate(self.indirect_tables, num * desc_table_size(INDIRECT_MAX))
            except GuestMemoryError:
                pass
        mem.fill(self.desc, desc_table_size(num))
        mem.fill(self.avail, avail_size(num))
        mem.fill(self.used, used_size(num))
        self._dmm, self._doff = mem.translate(self.desc, desc_table_size(num))
        self._umm, self._uoff = mem.translate(self.used, used_size(num))
        # indices, flags and event fields: one 16-bit access each (never torn for the device)
        self._a16 = mem.view(self.avail, avail_size(num)).cast("H")
        self.released = False
        self._u16 = mem.view(self.used, used_size(num)).cast("H")
        self._ae = avail_event_u16(num)  # avail_event in the used ring
        self._ue = used_event_u16(num)  # used_event in the avail ring
        # free list threaded through desc.next
        for i in range(num):
            DESC.pack_into(self._dmm, self._doff + DESC_SIZE * i, 0, 0, 0, (i + 1) % num)
        self.free_head = 0
        self.num_free = num
        self.avail_idx_shadow = 0
        self.avail_flags_shadow = 0
        self.last_used_idx = 0
        self.num_added = 0
        self.data: list[Any] = [None] * num
        self.ndescs = [0] * num
        self.lock = threading.Lock()
        self.broken = False
        self.callback: Callable[["Vring"], None] | None = None
        # counters
        self.kicks = 0
        self.kicks_suppressed = 0
        self.added = 0
        self.completed = 0
        self.interrupts = 0
        self.spurious_interrupts = 0

    # -- submission ----------------------------------------------------------------------------------
    def add(self, out: list[tuple[int, int]], inn: list[tuple[int, int]], token: Any) -> bool:
        """virtqueue_add: False if the ring is full.  Caller holds ``lock``."""
        total = len(out) + len(inn)
        if total == 0:
            raise ValueError("empty request")
        use_ind = self.use_indirect and 1 < total <= INDIRECT_MAX
        need = 1 if use_ind else total
        if self.num_free < need:
            return False
        head = self.free_head
        dmm, doff = self._dmm, self._doff
        if use_ind:
            tbl = self.indirect_tables + head * INDIRECT_MAX * DESC_SIZE
            if self._imap is not None:
                mm, off = self._imap[0], self._imap[1] + head * INDIRECT_MAX * DESC_SIZE
            else:
                mm, off = self.mem.translate(tbl, total * DESC_SIZE)
            # entries 0..total-2 chain to the next; the last one ends the table
            i = 0
            last = total - 1
            for g, n in out:
                if i == last:
                    DESC.pack_into(mm, off + DESC_SIZE * i, g, n, 0, 0)
                else:
                    DESC.pack_into(mm, off + DESC_SIZE * i, g, n, VRING_DESC_F_NEXT, i + 1)
                i += 1
            for g, n in inn:
                if i == last:
                    DESC.pack_into(mm, off + DESC_SIZE * i, g, n, VRING_DESC_F_WRITE, 0)
                else:
                    DESC.pack_into(mm, off + DESC_SIZE * i, g, n, VRING_DESC_F_WRITE | VRING_DESC_F_NEXT, i + 1)
                i += 1
            nxt = DESC.unpack_from(dmm, doff + DESC_SIZE * head)[3]
            DESC.pack_into(dmm, doff + DESC_SIZE * head, tbl, total * DESC_SIZE, VRING_DESC_F_INDIRECT, nxt)
            self.free_head = nxt
        else:
            i = head
            bufs = [(g, n, 0) for g, n in out] + [(g, n, VRING_DESC_F_WRITE) for g, n in inn]
            for j, (g, n, f) in enumerate(bufs):
                nxt = DESC.unpack_from(dmm, doff + DESC_SIZE * i)[3]
                last = j == total - 1
                DESC.pack_into(dmm, doff + DESC_SIZE * i, g, n, f | (0 if last else VRING_DESC_F_NEXT), nxt)
                i = nxt
            self.free_head = i
        self.num_free -= need
        self.ndescs[head] = need
        self.data[head] = token
        a16 = self._a16
        a16[AVAIL_RING_U16 + self.avail_idx_shadow % self.num] = head
        # wmb(): ring entry before the index (x86 keeps store order)
        self.avail_idx_shadow = (self.avail_idx_shadow + 1) & 0xFFFF
        a16[AVAIL_IDX_U16] = self.avail_idx_shadow
        self.num_added += 1
        self.added += 1
        return True

    def kick_prepare(self) -> bool:
        """virtqueue_kick_prepare: does the device want a kick?  Caller holds ``lock``."""
        mb()  # store avail.idx -> load avail_event / used.flags
        old = (self.avail_idx_shadow - self.num_added) & 0xFFFF
        new = self.avail_idx_shadow
        self.num_added = 0
        if self.event_idx:
            needs = vring_need_event(self._u16[self._ae], new, old)
        else:
            needs = not (self._u16[USED_FLAGS_U16] & VRING_USED_F_NO_NOTIFY)
        if not needs:
            self.kicks_suppressed += 1
        return needs

    def notify(self) -> None:
        """virtqueue_notify: the doorbell write (outside the lock, as Linux does)."""
        self.kicks += 1
        self.notify_fn(self)

    def kick(self) -> None:
        with self.lock:
            needs = self.kick_prepare()
        if needs:
            self.notify()

    # -- completion ---------------------------------------------------------------------------------
    def avail_event(self) -> int:
        """The device's avail_event (EVENT_IDX): where it asked to be kicked next."""
        return self._u16[self._ae]

    def used_idx(self) -> int:
        return self._u16[USED_IDX_U16]

    def more_used(self) -> bool:
        return self.last_used_idx != self.used_idx()

    def get_buf(self) -> tuple[Any, int] | None:
        """virtqueue_get_buf: the next completed token and its written length.  Caller holds ``lock``."""
        if not self.more_used():
            return None
        # rmb(): used.idx before the element (x86 keeps load order)
        slot = self.last_used_idx % self.num
        head, length = USED_ELEM.unpack_from(self._umm, self._uoff + USED_RING + USED_ELEM_SIZE * slot)
        if head >= self.num or self.data[head] is None:
            self.broken = True
            raise RuntimeError(f"{self.name}: device returned bad id {head}")
        token = self.data[head]
        self.data[head] = None
        self._detach(head)
        self.last_used_idx = (self.last_used_idx + 1) & 0xFFFF
        self.completed += 1
        if self.event_idx and not self.avail_flags_shadow & VRING_AVAIL_F_NO_INTERRUPT:
            self._a16[self._ue] = self.last_used_idx
            mb()
        return token, length

    def _detach(self, head: int) -> None:
        n = self.ndescs[head]
        dmm, doff = self._dmm, self._doff
        i = head
        for _ in range(n - 1):
            i = DESC.unpack_from(dmm, doff + DESC_SIZE * i)[3]
        addr, length, flags, _nxt = DESC.unpack_from(dmm, doff + DESC_SIZE * i)
        DESC.pack_into(dmm, doff + DESC_SIZE * i, addr, length, flags, self.free_head)
        self.free_head = head
        self.num_free += n

    def disable_cb(self) -> None:
        if not self.event_idx and not self.avail_flags_shadow & VRING_AVAIL_F_NO_INTERRUPT:
            self.avail_flags_shadow |= VRING_AVAIL_F_NO_INTERRUPT
            self._a16[AVAIL_FLAGS_U16] = self.avail_flags_shadow

    def enable_cb(self) -> bool:
        """virtqueue_enable_cb: True if nothing is pending (safe to wait for the next interrupt)."""
        if self.avail_flags_shadow & VRING_AVAIL_F_NO_INTERRUPT:
            self.avail_flags_shadow &= ~VRING_AVAIL_F_NO_INTERRUPT
            if not self.event_idx:
                self._a16[AVAIL_FLAGS_U16] = self.avail_flags_shadow
        if self.event_idx:
            self._a16[self._ue] = self.last_used_idx
        mb()  # store used_event / flags -> load used.idx
        return not self.more_used()

    def interrupt(self) -> bool:
        """vring_interrupt: the ISR for this queue.  Returns IRQ_HANDLED / IRQ_NONE."""
        self.interrupts += 1
        try:
            more = not self.released and self.more_used()
        except ValueError:  # released meanwhile (the guest is shutting down): nothing to look at
            return False
        if self.released:
            return False
        if not more:
            self.spurious_interrupts += 1
            return False
        if self.callback is not None:
            self.callback(self)
        return True

    def in_flight(self) -> int:
        return self.num - self.num_free if not self.use_indirect else sum(1 for d in self.data if d is not None)

    def restart_view(self) -> dict:
        """What a device restarted from used.idx would redo, against what the driver still waits
        for: the avail entries from used.idx on, and the heads outstanding (added, not yet in the
        used ring).  Equal multisets mean such a restart is exact; with completions out of order
        it redoes a completed request and skips an outstanding one.  Meaningful while the device
        is not completing (stopped or dead)."""
        with self.lock:
            used = self.used_idx()
            avail = self.avail_idx_shadow
            redo = [self._a16[AVAIL_RING_U16 + p % self.num] for p in range(used, used + ((avail - used) & 0xFFFF))]
            returned = {USED_ELEM.unpack_from(self._umm, self._uoff + USED_RING + USED_ELEM_SIZE * (p % self.num))[0]
                        for p in range(self.last_used_idx, self.last_used_idx + ((used - self.last_used_idx) & 0xFFFF))}
            outstanding = [h for h, d in enumerate(self.data) if d is not None and h not in returned]
        return {"used": used, "avail": avail, "redo": redo, "outstanding": outstanding,
                "exact": sorted(redo) == sorted(outstanding)}

    def reset_state(self) -> None:
        """Forget everything in flight (after a device reset)."""
        with self.lock:
            self.data = [None] * self.num
            self.broken = True

    def release(self) -> None:
        """Drop the views into guest RAM (before the RAM is unmapped).  An interrupt that arrives
        afterwards (the guest is shutting down) finds no ring and is not handled."""
        self.released = True
        for v in (self._a16, self._u16):
            try:
                v.release()
            except ValueError:
                pass
