"""virtio-blk on a raw image file: read, write, flush (fsync), get-id; several queues.

Request layout (virtio spec 5.2.6): a 16-byte device-readable header ``{le32 type; le32 reserved;
le64 sector}``, the data (device-readable for a write, device-writable for a read or get-id) and a
1-byte device-writable status.  A chain that does not have this shape is a driver bug: the device
sets DEVICE_NEEDS_RESET rather than guess.  A request outside the disk or not a multiple of 512
bytes completes with VIRTIO_BLK_S_IOERR; an unknown type with VIRTIO_BLK_S_UNSUPP.

Two fault knobs for tests of slow and stuck devices: ``io_delay`` (seconds each I/O stalls on its
worker thread, cut short by ``cancel_io_delays()`` so that a stopping process is not held by a
sleeping request) and ``hold_completion`` (a request it says True for is taken and its I/O done,
but it is never pushed to the used ring: a device that never completes a request, until
``release_held()``).
"""

from __future__ import annotations

import errno
import functools
import logging
import os
import struct
import threading
from typing import Callable

from .device import SyncAio, ThreadPoolAio, VirtIODevice
from .image import ImageFile, create_image, open_image
from .queue import VirtQueue, VirtQueueElement, iov_from_buf, iov_to_buf

__all__ = ["VirtIOBlk", "BLK_T_IN", "BLK_T_OUT", "BLK_T_FLUSH", "BLK_T_GET_ID", "BLK_S_OK",
           "BLK_S_IOERR", "BLK_S_UNSUPP", "BLK_CONFIG_SIZE", "blk_config"]

log = logging.getLogger("kickcall.virtio.blk")

VIRTIO_ID_BLOCK = 2
BLK_T_IN, BLK_T_OUT, BLK_T_FLUSH, BLK_T_GET_ID = 0, 1, 4, 8
BLK_S_OK, BLK_S_IOERR, BLK_S_UNSUPP = 0, 1, 2
BLK_ID_BYTES = 20
SECTOR = 512
BLK_F_SIZE_MAX, BLK_F_SEG_MAX, BLK_F_RO, BLK_F_BLK_SIZE, BLK_F_FLUSH, BLK_F_MQ = 1, 2, 5, 6, 9, 12
HDR = struct.Struct("<IIQ")
BLK_CONFIG_SIZE = 60

FEATURES = {
    BLK_F_SIZE_MAX: ("VIRTIO_BLK_F_SIZE_MAX", "Max segment size is size_max"),
    BLK_F_SEG_MAX: ("VIRTIO_BLK_F_SEG_MAX", "Max segments in a request is seg_max"),
    BLK_F_RO: ("VIRTIO_BLK_F_RO", "Device is read-only"),
    BLK_F_BLK_SIZE: ("VIRTIO_BLK_F_BLK_SIZE", "Block size of disk available"),
    BLK_F_MQ: ("VIRTIO_BLK_F_MQ", "Multiqueue supported"),
    BLK_F_FLUSH: ("VIRTIO_BLK_F_FLUSH", "Flush command supported"),
}  # QEMU 7.2's texts, in its table's order (virtio.device.feature_names)


def blk_config(capacity_sectors: int, num_queues: int, seg_max: int = 126, blk_size: int = 512) -> bytes:
    """struct virtio_blk_config, 60 bytes (the size QEMU 7.2 exposes)."""
    return struct.pack(
        "<QII HBB I BBHI BBH IIIII B3x",
        capacity_sectors, 0, seg_max,  # capacity, size_max, seg_max
        0, 0, 0,  # geometry: cylinders, heads, sectors
        blk_size,
        0, 0, 1, 0,  # topology: physical_block_exp, alignment_offset, min_io_size, opt_io_size
        0, 0, num_queues,  # writeback, unused0, num_queues
        0, 0, 0, 0, 0,  # discard / write zeroes limits (not offered)
        0,  # write_zeroes_may_unmap
    )


class _Req:
    """One virtio-blk request in flight: its queue and element, header fields, device generation."""

    __slots__ = ("vq", "elem", "type", "sector", "gen", "status", "written")
    vq: VirtQueue
    elem: VirtQueueElement
    type: int
    sector: int
    gen: int
    status: int
    written: int


class VirtIOBlk(VirtIODevice):
    device_id = VIRTIO_ID_BLOCK
    type_name = "virtio-blk"
    feature_table = FEATURES

    def __init__(self, name: str, image: str | ImageFile, *, num_queues: int = 1, queue_size: int = 128,
                 read_only: bool = False, serial: str = "", aio: str = "threads", aio_workers: int = 4,
                 loop=None, inline_cached: bool = True, null: bool = False) -> None:
        """*null*: a null device (as QEMU's null-co with read-zeroes=on): reads return zeroes without
        touching the image, writes are discarded, both complete at once on the loop.
        *inline_cached*: with aio "auto", reads the page cache holds are served on the loop at depth.

        *image*: a path (opened with :func:`open_image`: FIFOs and character devices refused,
        QEMU's image locks taken; raises ``PathRefused``) or an already open :class:`ImageFile`,
        which the device then owns."""
        super().__init__(name, queue_sizes=[queue_size] * num_queues)
        img = image if isinstance(image, ImageFile) else open_image(image, writable=not read_only)
        if read_only and img.writable or not read_only and not img.writable:
            img.close()
            raise ValueError(f"{img.path}: opened {'read-write' if img.writable else 'read-only'} "
                             f"for a {'read-only' if read_only else 'writable'} device")
        self.image_file = img
        self.image = img.path
        self.read_only = read_only
        self.serial = (serial or name).encode()[:BLK_ID_BYTES]
        self.fd = img.fd
        self.capacity = img.size // SECTOR
        self.host_features |= (1 << BLK_F_SEG_MAX) | (1 << BLK_F_BLK_SIZE) | (1 << BLK_F_FLUSH)
        if num_queues > 1:
            self.host_features |= 1 << BLK_F_MQ
        if read_only:
            self.host_features |= 1 << BLK_F_RO
        self._config = blk_config(self.capacity, num_queues)
        # aio: "threads" (QEMU's aio=threads), "sync" (inline), or "auto": inline when a request is
        # alone on its queue with nothing else in flight (no thread hand-off at depth 1), threads
        # otherwise (requests overlap, completions come out of order)
        self.aio_mode = aio
        if aio in ("threads", "auto") and loop is not None:
            self.aio: SyncAio | ThreadPoolAio = ThreadPoolAio(loop, aio_workers, name=f"{name}-aio")
        else:
            self.aio = SyncAio()
        self.inline_ios = 0
        # aio "auto" at depth: a read whose data is in the page cache is served on the loop
        # (preadv2 RWF_NOWAIT: the kernel copies it or says EAGAIN, never blocks), so no worker
        # thread and no GIL hand-off for it; the rest go to the workers
        self.inline_cached = inline_cached and hasattr(os, "RWF_NOWAIT")
        self.cached_inline_ios = 0  # reads served on the loop from the page cache, at depth
        self.cached_misses = 0  # reads RWF_NOWAIT refused (not cached): handed to the workers
        self.null = null
        self.io_delay: Callable[[], float] | None = None  # fault knob: seconds to stall each I/O
        self._delays_cancelled = threading.Event()  # set: stalls end at once (the process is stopping)
        # fault knob: called with the queue when a request completes; True holds the completion
        self.hold_completion: Callable[[VirtQueue], bool] | None = None
        self._held: list[tuple[_Req, object]] = []  # (request, I/O result) taken and never pushed
        self.reads = self.writes = self.flushes = self.get_ids = self.ioerrs = self.unsupp = 0
        self.bytes_read = self.bytes_written = 0

    def cancel_io_delays(self) -> None:
        """End every ``io_delay`` stall now, and skip later ones: the process is stopping and a
        request sleeping in the fault knob must not hold up the drain (any thread)."""
        self._delays_cancelled.set()

    def held(self, queue: int) -> int:
        """Requests of *queue* whose completion ``hold_completion`` is holding."""
        return sum(1 for r, _res in self._held if r.vq.index == queue and r.gen == self.generation)

    def release_held(self, queue: int, complete: bool) -> tuple[int, int]:
        """Let go of the held requests of *queue*: with *complete*, push them (status written, the
        used ring updated, the driver notified) as if they had just finished; otherwise forget them
        (``detach``: the driver never sees them complete, until it resets the device).  Returns
        (completed, discarded).  Requests of an older device generation are dropped either way."""
        keep: list[tuple[_Req, object]] = []
        mine: list[tuple[_Req, object]] = []
        for item in self._held:
            (mine if item[0].vq.index == queue else keep).append(item)
        self._held = keep
        done = gone = 0
        for r, res in mine:
            if r.gen != self.generation:
                continue
            if complete:
                self._finish(r, res)
                done += 1
            else:
                r.vq.detach(r.elem)
                gone += 1
        return done, gone

    def device_reset(self) -> None:
        self._held = []  # the queues are reset: their in-flight requests are forgotten

    def close(self) -> None:
        self.aio.stop()
        if self.fd >= 0:
            self.image_file.close()
            self.fd = -1

    def get_config(self) -> bytes:
        return self._config

    def drain(self) -> None:
        self.aio.drain()

    # -- requests -------------------------------------------------------------------------------------
    def handle_output(self, vq: VirtQueue) -> None:
        self.process_queue_loop(vq, self._handle_request)

    def _handle_request(self, vq: VirtQueue, elem: VirtQueueElement) -> None:
        mem = self.mem
        assert mem is not None
        out_len, in_len = elem.out_len, elem.in_len
        if out_len < HDR.size or in_len < 1:
            self.virtio_error(f"{vq.name}: request without a 16-byte header and a status byte")
            return
        if elem.in_sg[-1][1] < 1:
            self.virtio_error(f"{vq.name}: bad status buffer")
            return
        rtype, _, sector = HDR.unpack(iov_to_buf(mem, elem.out_sg, 0, HDR.size))
        r = _Req()
        r.vq, r.elem, r.type, r.sector, r.gen, r.status, r.written = vq, elem, rtype, sector, self.generation, 0, 0
        data_out = out_len - HDR.size  # bytes after the header (device-readable)
        data_in = in_len - 1  # bytes before the status (device-writable)
        if rtype == BLK_T_IN:
            if data_out:
                self.virtio_error(f"{vq.name}: read request with device-readable data buffers")
                return
            self._submit_rw(r, False, data_in)
        elif rtype == BLK_T_OUT:
            if data_in:
                self.virtio_error(f"{vq.name}: write request with device-writable data buffers")
                return
            self._submit_rw(r, True, data_out)
        elif rtype == BLK_T_FLUSH:
            if data_out or data_in:
                self.virtio_error(f"{vq.name}: flush request with data buffers")
                return
            self.flushes += 1
            self.aio.submit(self._do_flush, functools.partial(self._complete, r))
        elif rtype == BLK_T_GET_ID:
            if data_out:
                self.virtio_error(f"{vq.name}: get-id request with device-readable data buffers")
                return
            self.get_ids += 1
            n = min(data_in, BLK_ID_BYTES)
            r.written = iov_from_buf(mem, _segments(elem.in_sg, 0, n), 0,
                                     self.serial.ljust(BLK_ID_BYTES, b"\0")[:n])
            self._complete(r, BLK_S_OK)
        else:
            self.unsupp += 1
            self._complete(r, BLK_S_UNSUPP)

    def _submit_rw(self, r: _Req, write: bool, nbytes: int) -> None:
        if nbytes % SECTOR or r.sector + nbytes // SECTOR > self.capacity or (write and self.read_only):
            self.ioerrs += 1
            self._complete(r, BLK_S_IOERR)
            return
        mem = self.mem
        assert mem is not None
        sg = r.elem.out_sg if write else r.elem.in_sg
        skip = HDR.size if write else 0
        segs = _segments(sg, skip, nbytes)
        off = r.sector * SECTOR
        fd = self.fd
        if write:
            self.writes += 1
            self.bytes_written += nbytes
        else:
            self.reads += 1
            self.bytes_read += nbytes
            r.written = nbytes
        if self.null:
            if not write:
                for g, n in segs:
                    mem.fill(g, n)
            self._complete(r, BLK_S_OK)
            return

        delay = self.io_delay
        cancelled = self._delays_cancelled

        def work() -> int:
            if delay is not None and not cancelled.is_set():
                cancelled.wait(delay())
            views = [mem.view(g, n) for g, n in segs]
            try:
                done = os.pwritev(fd, views, off) if write else os.preadv(fd, views, off)
            finally:
                for v in views:
                    v.release()
            if done != nbytes:
                if not write:  # past the end of a short file: the rest reads as zeroes
                    for g, n in _segments(sg, skip + done, nbytes - done):
                        mem.fill(g, n)
                    return BLK_S_OK
                return BLK_S_IOERR
            return BLK_S_OK

        vq = r.vq
        if (self.aio_mode == "auto" and delay is None and not self.aio.inflight
                and vq.shadow_avail_idx == vq.last_avail_idx and not vq.resubmit):
            self.inline_ios += 1
            try:
                res: object = work()
            except OSError as e:
                res = e
            self._complete(r, res)
            return
        if self.aio_mode == "auto" and self.inline_cached and not write and delay is None:
            res2 = self._read_cached(segs, off, nbytes)
            if res2 is not None:
                self.cached_inline_ios += 1
                self._complete(r, res2)
                return
            self.cached_misses += 1
        self.aio.submit(work, functools.partial(self._complete, r))

    def _read_cached(self, segs: list[tuple[int, int]], off: int, nbytes: int) -> int | None:
        """The whole read from the page cache without blocking (RWF_NOWAIT), or None: not all of
        it is cached (EAGAIN, or a short read), and a worker does it."""
        mem = self.mem
        assert mem is not None
        views = [mem.view(g, n) for g, n in segs]
        try:
            done = os.preadv(self.fd, views, off, os.RWF_NOWAIT)
        except BlockingIOError:
            return None
        except OSError as e:
            if e.errno in (errno.EOPNOTSUPP, errno.EINVAL):  # a file system without NOWAIT reads
                self.inline_cached = False
            return None
        finally:
            for v in views:
                v.release()
        return BLK_S_OK if done == nbytes else None

    def _do_flush(self) -> int:
        os.fsync(self.fd)
        return BLK_S_OK

    def _complete(self, r: _Req, res: object) -> None:
        if r.gen != self.generation:
            return  # the device was reset while this request was in flight
        hold = self.hold_completion
        if hold is not None and hold(r.vq):
            self._held.append((r, res))
            return
        self._finish(r, res)

    def _finish(self, r: _Req, res: object) -> None:
        status = res if isinstance(res, int) else BLK_S_IOERR
        if not isinstance(res, int):
            log.warning("%s: I/O failed: %s", self.name, res)
            self.ioerrs += 1
        mem = self.mem
        assert mem is not None
        gpa, n = r.elem.in_sg[-1]
        mem.write(gpa + n - 1, bytes([status]))
        r.vq.push(r.elem, r.written + 1)
        self.notify(r.vq)


def _segments(sg: list[tuple[int, int]], skip: int, nbytes: int) -> list[tuple[int, int]]:
    """The (gpa, len) pieces covering *nbytes* of *sg* after skipping *skip* bytes."""
    out = []
    for gpa, n in sg:
        if skip >= n:
            skip -= n
            continue
        take = min(n - skip, nbytes)
        if take <= 0:
            break
        out.append((gpa + skip, take))
        nbytes -= take
        skip = 0
        if nbytes <= 0:
            break
    return out


def make_image(path: str, size: int, pattern: bool = True) -> None:
    """(Re-)create a raw image at a path the caller owns (tests, benchmarks); with *pattern*, every
    512-byte sector carries its own label (``image.sector_label``), otherwise it is sparse zeros."""
    create_image(path, size, labelled=size if pattern else 0, exclusive=False)
