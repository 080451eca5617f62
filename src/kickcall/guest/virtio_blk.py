"""The guest's virtio-blk driver: requests completed from the interrupt handler."""

from __future__ import annotations

import struct

from ..virtio.blk import BLK_F_BLK_SIZE, BLK_F_FLUSH, BLK_F_MQ, BLK_F_RO, BLK_F_SEG_MAX, BLK_T_FLUSH, \
    BLK_T_GET_ID, BLK_T_IN, BLK_T_OUT
from ..virtio.ring import VIRTIO_F_VERSION_1, VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC
from .blk_request import BlkItem, BlkRequest, complete_requests, submit_requests
from .kernel import GuestKernel
from .virtio_pci import VirtioPciDevice
from .virtio_ring import Vring

__all__ = ["VirtioBlkDriver", "BlkRequest", "BLK_WANTED"]

BLK_WANTED = ((1 << VIRTIO_F_VERSION_1) | (1 << VIRTIO_RING_F_EVENT_IDX) | (1 << VIRTIO_RING_F_INDIRECT_DESC)
              | (1 << BLK_F_FLUSH) | (1 << BLK_F_BLK_SIZE) | (1 << BLK_F_SEG_MAX) | (1 << BLK_F_MQ)
              | (1 << BLK_F_RO))


class VirtioBlkDriver:
    def __init__(self, kernel: GuestKernel, vdev: VirtioPciDevice, *, wanted: int = BLK_WANTED,
                 queue_size: int | None = None, allow_msix: bool = True) -> None:
        self.k = kernel
        self.vdev = vdev
        self.wanted = wanted
        self.queue_size = queue_size
        self.allow_msix = allow_msix
        self.capacity = 0
        self.read_only = False  # VIRTIO_BLK_F_RO: the device refuses writes (Linux: set_disk_ro)
        self.vqs: list[Vring] = []
        self.completed = 0
        self.errors = 0
        self.started = False

    def probe(self) -> None:
        v = self.vdev
        v.begin(self.wanted)
        self.capacity = struct.unpack("<Q", v.read_device_config(0, 8))[0]
        self.read_only = v.has(BLK_F_RO)
        nq = 1
        if v.has(BLK_F_MQ):
            nq = max(1, struct.unpack("<H", v.read_device_config(34, 2))[0])
        names = [f"req.{i}" for i in range(nq)]
        self.vqs = v.find_vqs(names, [self._vq_done] * nq, [self.queue_size or 0] * nq,
                              allow_msix=self.allow_msix)
        v.ready()
        self.started = True

    def remove(self) -> None:
        self.started = False
        self.vdev.teardown()
        self.vqs = []

    # -- I/O (the shared request path: kickcall.guest.blk_request) ------------------------------------
    def prepare(self, req: BlkRequest, rtype: int, sector: int, nbytes: int) -> tuple[list, list]:
        """Write *req*'s header and unset status into guest RAM; returns its chain (out, in) for a
        caller that adds it to a ring itself."""
        return req.prepare(self.k.memory, rtype, sector, nbytes)

    def submit_batch(self, q: int, items: list[BlkItem]) -> int:
        """Add (request, type, sector, nbytes) items to queue *q* and kick once; returns how many went in."""
        return submit_requests(self.vqs[q], self.k.memory, items, q)

    def submit(self, q: int, req: BlkRequest, rtype: int, sector: int, nbytes: int) -> bool:
        return submit_requests(self.vqs[q], self.k.memory, [(req, rtype, sector, nbytes)], q) == 1

    def _vq_done(self, vq: Vring) -> None:
        """The queue's interrupt handler (``virtblk_done``): complete everything used, re-enable, re-check."""
        complete_requests(vq, self.k.memory, self._account)

    def _account(self, req: BlkRequest) -> None:
        self.completed += 1
        if req.status_val != 0:
            self.errors += 1

    def sync_io(self, req: BlkRequest, rtype: int, sector: int, nbytes: int, q: int = 0,
                timeout: float = 30.0) -> int:
        """Submit and wait (halted) for the interrupt; returns the status byte."""
        if not self.submit(q, req, rtype, sector, nbytes):
            raise RuntimeError("queue full")
        if not self.k.halt_until(req.done, timeout):
            raise TimeoutError(f"request {rtype} sector {sector} not completed within {timeout}s")
        return req.status_val


__all__ += ["BLK_T_IN", "BLK_T_OUT", "BLK_T_FLUSH", "BLK_T_GET_ID"]
