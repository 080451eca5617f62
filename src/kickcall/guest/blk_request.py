"""The driver side of a virtio-blk request: one request type and one request path, shared by
kickcall's guest driver (:mod:`kickcall.guest.virtio_blk`) and the VM-less vhost-user front-end
(:mod:`kickcall.drive.vhost_user_blk`).

Modelled on Linux ``drivers/block/virtio_blk.c``: a :class:`BlkRequest` is a ``struct
virtblk_req`` (its ``virtio_blk_outhdr``, its data buffer and its status byte in guest RAM), and
the path is ``virtblk_add_req()`` (header device-readable, then the data -- device-readable for a
write, device-writable for a read or get-id -- then the device-writable status byte, through the
driver's split ring :class:`~kickcall.guest.virtio_ring.Vring`), ``virtio_queue_rq()`` (add a batch,
``virtqueue_kick_prepare`` under the ring lock, the doorbell outside it) and ``virtblk_done()`` (the
used ring drained with callbacks disabled, re-enabled, re-checked; each request completed with its
status byte and used length).

The header layout, the request types and the status codes are the device side's
(:mod:`kickcall.virtio.blk`, virtio 1.2 section 5.2.6): defined once, there.

Where this sits: ``kickcall.virtio`` (below) is the device side and knows nothing of a driver's
ring; ``kickcall.guest`` holds the driver-side ring and page allocator this path uses, and
``kickcall.drive`` (above ``guest``) imports it from here.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from typing import Any, Callable, Protocol

from ..memory import GuestMemory
from ..virtio.blk import BLK_T_GET_ID, BLK_T_IN, BLK_T_OUT
from ..virtio.blk import HDR as BLK_OUTHDR
from .kernel import PageAllocator
from .virtio_ring import Vring

__all__ = ["BlkRequest", "BlkItem", "HasPages", "STATUS_OFFSET", "STATUS_UNSET", "BLK_OUTHDR",
           "submit_requests", "complete_requests"]

STATUS_OFFSET = 2048
"""Where a request's status byte lies in its header page (the header at offset 0)."""
STATUS_UNSET = 0xFF
"""Written into the status byte before a request is published; a device overwrites it."""
_PAGE = 4096

BlkItem = tuple["BlkRequest", int, int, int]
"""(request, type, sector, nbytes): one request of a batch handed to :func:`submit_requests`."""


class HasPages(Protocol):
    """Whoever owns the page allocator a request's buffers come from (the guest kernel, the VM-less
    front-end)."""

    @property
    def pages(self) -> PageAllocator: ...


class BlkRequest:
    """One virtio-blk request of a driver (``struct virtblk_req``): a header page in guest RAM
    (``virtio_blk_outhdr`` at ``hdr``, the status byte at ``status``), a data buffer of up to
    ``max_bytes`` at ``data``, and what the driver and its caller track about it.

    Reusable: a caller keeps a pool of them (a queue depth's worth) and submits each again once
    ``done`` is set.  ``owner``, ``tag`` and ``done_cb`` belong to the caller and are opaque to the
    driver; ``done_cb`` runs in the completion context (the guest's interrupt handler, the
    front-end's completion thread)."""

    __slots__ = ("type", "sector", "nbytes", "hdr", "data", "status", "max_bytes", "queue", "head", "seq",
                 "done", "status_val", "used_len", "completions", "t_submit", "t_done",
                 "owner", "tag", "done_cb", "_pages", "_in_page")

    def __init__(self, pages: PageAllocator | HasPages, max_bytes: int) -> None:
        """A request with its own header page and a data buffer of *max_bytes* (none if 0), both
        allocated from *pages* (a :class:`PageAllocator`, or its owner); :meth:`free` returns them."""
        alloc = pages if isinstance(pages, PageAllocator) else pages.pages
        hdr = alloc.alloc(_PAGE)
        data = alloc.alloc(max_bytes) if max_bytes else 0
        self._init(hdr, data, hdr + STATUS_OFFSET, max_bytes, alloc)

    @classmethod
    def at(cls, hdr: int, data: int, max_bytes: int, status: int | None = None) -> BlkRequest:
        """A request over buffers the caller owns (and frees): the header at *hdr*, the status byte
        at *status* (default: ``hdr + STATUS_OFFSET``), *max_bytes* of data at *data*."""
        self = cls.__new__(cls)
        self._init(hdr, data, hdr + STATUS_OFFSET if status is None else status, max_bytes, None)
        return self

    def _init(self, hdr: int, data: int, status: int, max_bytes: int, pages: PageAllocator | None) -> None:
        self.hdr = hdr
        self.data = data
        self.status = status
        self.max_bytes = max_bytes
        self._pages = pages
        # header and status byte in one page (always, for requests allocated here): one mapping each time
        self._in_page = hdr % _PAGE == 0 and status == hdr + STATUS_OFFSET
        self.type = BLK_T_IN
        self.sector = 0
        self.nbytes = 0
        self.queue = 0
        self.head = -1  # the descriptor head it went in under (the ring's id for it in the used ring)
        self.seq = 0  # the ring's add count when it went in: submission order on its queue
        self.done = threading.Event()
        self.status_val = -1  # the status byte the device wrote (VIRTIO_BLK_S_*), -1 until completed
        self.used_len = -1  # the used element's len: bytes the device wrote, status byte included
        self.completions = 0  # how often it was completed since it was submitted (1 unless a bug)
        self.t_submit = 0
        self.t_done = 0
        self.owner: Any = None
        self.tag: Any = None
        self.done_cb: Callable[[BlkRequest], None] | None = None

    def free(self) -> None:
        """Return the buffers to the allocator they came from (nothing for :meth:`at` requests)."""
        pages, self._pages = self._pages, None
        if pages is not None:
            pages.free(self.hdr)
            if self.data:
                pages.free(self.data)

    def prepare(self, mem: GuestMemory, rtype: int, sector: int, nbytes: int) -> tuple[list[tuple[int, int]],
                                                                                    list[tuple[int, int]]]:
        """Write the header ``{type, 0, sector}`` and the unset status byte into guest RAM, reset the
        completion state, and return the chain: (device-readable, device-writable) buffers as
        (gpa, len) lists -- header, [data], status."""
        self.type, self.sector, self.nbytes = rtype, sector, nbytes
        self.status_val = self.used_len = -1
        self.completions = 0
        self.done.clear()
        if self._in_page:
            mm, off = mem.translate(self.hdr, STATUS_OFFSET + 1)
            BLK_OUTHDR.pack_into(mm, off, rtype, 0, sector)
            mm[off + STATUS_OFFSET] = STATUS_UNSET
        else:
            mem.write(self.hdr, BLK_OUTHDR.pack(rtype, 0, sector))
            mem.write(self.status, _UNSET)
        out = [(self.hdr, BLK_OUTHDR.size)]
        inn = []
        if rtype == BLK_T_OUT:
            out.append((self.data, nbytes))
        elif rtype == BLK_T_IN or rtype == BLK_T_GET_ID:
            inn.append((self.data, nbytes))
        inn.append((self.status, 1))
        return out, inn


_UNSET = bytes([STATUS_UNSET])


def submit_requests(vq: Vring, mem: GuestMemory, items: Sequence[BlkItem], queue: int, *, kick: bool = True) -> int:
    """``virtio_queue_rq`` for a batch: prepare each (request, type, sector, nbytes) -- header and
    status written outside the ring lock, as Linux's ``virtblk_setup_cmd`` -- then, under the ring
    lock, add them in order until the ring is full and ``virtqueue_kick_prepare`` once; the doorbell
    outside the lock (unless the device suppressed it, or *kick* is False: published, not
    notified).  Returns how many went in; the rest were prepared but not put on the ring."""
    chains = [(req, *req.prepare(mem, rtype, sector, nbytes)) for req, rtype, sector, nbytes in items]
    n = 0
    now = time.monotonic_ns
    with vq.lock:
        for req, out, inn in chains:
            req.queue = queue
            req.head = vq.free_head  # the head add() takes
            req.t_submit = now()
            if not vq.add(out, inn, req):
                req.head = -1
                break
            req.seq = vq.added
            n += 1
        needs = vq.kick_prepare() if n and kick else False
    if needs:
        vq.notify()
    return n


def complete_requests(vq: Vring, mem: GuestMemory,
                      on_complete: Callable[[BlkRequest], None] | None = None) -> int:
    """``virtblk_done``: complete everything in *vq*'s used ring -- with callbacks disabled, then
    re-enabled and re-checked (``virtqueue_enable_cb``) so that nothing published meanwhile waits
    for an interrupt that will not come.  Each request gets its status byte, used length and
    completion time; then *on_complete* (the driver's bookkeeping, before any waiter can see the
    request), then ``done`` is set and the caller's ``done_cb`` runs.  The ring lock is held while
    the used ring is read, not while requests are completed.  Returns how many were completed.

    A used element naming a head the driver did not publish raises ``RuntimeError`` from
    ``Vring.get_buf`` (the ring is then broken); what was taken before it in that pass is lost."""
    total = 0
    now = time.monotonic_ns
    translate = mem.translate
    while True:
        with vq.lock:
            vq.disable_cb()
            done = []
            while True:
                got = vq.get_buf()
                if got is None:
                    break
                done.append(got)
            again = not vq.enable_cb()
        for req, used_len in done:
            mm, off = translate(req.status, 1)
            req.status_val = mm[off]
            req.used_len = used_len
            req.t_done = now()
            req.completions += 1
            if on_complete is not None:
                on_complete(req)
            req.done.set()
            cb = req.done_cb
            if cb is not None:
                cb(req)
        total += len(done)
        if not again:
            return total
