"""The guest's virtio-blk driver: requests completed from the interrupt handler."""

from __future__ import annotations

import struct
import threading
import time
from typing import Any, Callable

from ..virtio.blk import BLK_F_BLK_SIZE, BLK_F_FLUSH, BLK_F_MQ, BLK_F_RO, BLK_F_SEG_MAX, BLK_T_FLUSH, \
    BLK_T_GET_ID, BLK_T_IN, BLK_T_OUT
from ..virtio.ring import VIRTIO_F_VERSION_1, VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC
from .kernel import GuestKernel
from .virtio_pci import VirtioPciDevice
from .virtio_ring import Vring

__all__ = ["VirtioBlkDriver", "BlkRequest", "BLK_WANTED"]

BLK_WANTED = ((1 << VIRTIO_F_VERSION_1) | (1 << VIRTIO_RING_F_EVENT_IDX) | (1 << VIRTIO_RING_F_INDIRECT_DESC)
              | (1 << BLK_F_FLUSH) | (1 << BLK_F_BLK_SIZE) | (1 << BLK_F_SEG_MAX) | (1 << BLK_F_MQ)
              | (1 << BLK_F_RO))
HDR = struct.Struct("<IIQ")


class BlkRequest:
    """A request with its own header/status page and data buffer in guest RAM."""

    __slots__ = ("type", "sector", "nbytes", "hdr", "data", "status", "done_cb", "done", "status_val",
                 "t_submit", "t_done", "owner", "tag", "queue")

    def __init__(self, kernel: GuestKernel, max_bytes: int) -> None:
        self.hdr = kernel.pages.alloc(4096)
        self.status = self.hdr + 2048
        self.data = kernel.pages.alloc(max(max_bytes, 1)) if max_bytes else 0
        self.type = BLK_T_IN
        self.sector = 0
        self.nbytes = 0
        self.done_cb: Callable[["BlkRequest"], None] | None = None
        self.done = threading.Event()
        self.status_val = -1
        self.t_submit = 0
        self.t_done = 0
        self.owner: Any = None  # the caller's (a workload's per-vCPU context): opaque to the driver
        self.tag: Any = None  # the caller's (what the request was for): opaque to the driver
        self.queue = 0


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

    # -- I/O -------------------------------------------------------------------------------------------
    def prepare(self, req: BlkRequest, rtype: int, sector: int, nbytes: int) -> tuple[list, list]:
        req.type, req.sector, req.nbytes = rtype, sector, nbytes
        req.status_val = -1
        req.done.clear()
        mem = self.k.memory
        mem.write(req.hdr, HDR.pack(rtype, 0, sector))
        mem.write(req.status, b"\xff")
        out = [(req.hdr, HDR.size)]
        inn = []
        if rtype == BLK_T_OUT:
            out.append((req.data, nbytes))
        elif rtype in (BLK_T_IN, BLK_T_GET_ID):
            inn.append((req.data, nbytes))
        inn.append((req.status, 1))
        return out, inn

    def queue_reqs(self, q: int, reqs: list[tuple[BlkRequest, list, list]]) -> int:
        """Add requests to queue *q* and kick once; returns how many went in."""
        vq = self.vqs[q]
        n = 0
        with vq.lock:
            for req, out, inn in reqs:
                req.t_submit = time.monotonic_ns()
                req.queue = q
                if not vq.add(out, inn, req):
                    break
                n += 1
            needs = vq.kick_prepare() if n else False
        if needs:
            vq.notify()
        return n

    def submit(self, q: int, req: BlkRequest, rtype: int, sector: int, nbytes: int) -> bool:
        out, inn = self.prepare(req, rtype, sector, nbytes)
        return self.queue_reqs(q, [(req, out, inn)]) == 1

    def _vq_done(self, vq: Vring) -> None:
        """The queue's interrupt handler: complete everything used, re-enable, re-check."""
        mem = self.k.memory
        while True:
            with vq.lock:
                vq.disable_cb()
                done = []
                while True:
                    got = vq.get_buf()
                    if got is None:
                        break
                    done.append(got[0])
                again = not vq.enable_cb()
            for req in done:
                req.status_val = mem.read(req.status, 1)[0]
                req.t_done = time.monotonic_ns()
                self.completed += 1
                if req.status_val != 0:
                    self.errors += 1
                req.done.set()
                if req.done_cb is not None:
                    req.done_cb(req)
            if not again:
                return

    def sync_io(self, req: BlkRequest, rtype: int, sector: int, nbytes: int, q: int = 0,
                timeout: float = 30.0) -> int:
        """Submit and wait (halted) for the interrupt; returns the status byte."""
        if not self.submit(q, req, rtype, sector, nbytes):
            raise RuntimeError("queue full")
        if not self.k.halt_until(req.done, timeout):
            raise TimeoutError(f"request {rtype} sector {sector} not completed within {timeout}s")
        return req.status_val


__all__ += ["BLK_T_IN", "BLK_T_OUT", "BLK_T_FLUSH", "BLK_T_GET_ID"]
