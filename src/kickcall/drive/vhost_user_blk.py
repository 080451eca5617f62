"""A vhost-user-blk front-end without a VM, for testing any back-end from the shell.

It plays QEMU's part with a memfd for RAM, driver-side split rings (kickcall.guest.virtio_ring),
an eventfd kick and call per queue, and the message order QEMU 7.2 uses.  Its requests are the
guest driver's: one request type and one request path (kickcall.guest.blk_request).
Completions are taken only when the call eventfd fires (the used index decides: a spurious call
is counted and ignored).  When the back-end dies, the driver waits for the socket, negotiates again, hands the
inflight region back (INFLIGHT_SHMFD) and the back-end resubmits what was in flight.

The workload verifies data: every block it uses is first written with a known content (block
number, generation, CRC32 of a payload derived from both); every read is checked against the
contents the block may hold.  A block is never the target of two requests at once.
"""

from __future__ import annotations

import logging
import os
import random
import select
import struct
import threading
import time
from typing import Callable

from ..guest.blk_request import BlkItem, BlkRequest, complete_requests, submit_requests
from ..guest.kernel import PageAllocator
from ..guest.virtio_ring import Vring
from ..guest.blkverify import BlockVerifier, InitialContent, block_content
from .latency import LatencyHistogram
from ..memory import GuestMemory
from ..notify import EventNotifier, NotifierError
from ..virtio.blk import BLK_F_BLK_SIZE, BLK_F_FLUSH, BLK_F_MQ, BLK_F_RO, BLK_F_SEG_MAX, BLK_T_FLUSH, \
    BLK_T_GET_ID, BLK_T_IN, BLK_T_OUT
from ..virtio.ring import VIRTIO_F_VERSION_1, VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC
from ..vhost_user.frontend import BackendGone, InflightInfo, VhostUserFrontend
from ..vhost_user.protocol import VHOST_USER_F_PROTOCOL_FEATURES, MemRegion, ProtocolError, ProtocolFeature
from ..threads import named_thread, start_thread

__all__ = ["VhostUserBlkDriver", "DriverError", "run_test", "BlkRequest"]

log = logging.getLogger("kickcall.drive")

PF = ProtocolFeature
USER_BASE = 0x7F00_0000_0000
WANTED = ((1 << VIRTIO_F_VERSION_1) | (1 << VIRTIO_RING_F_EVENT_IDX) | (1 << VIRTIO_RING_F_INDIRECT_DESC)
          | (1 << BLK_F_FLUSH) | (1 << BLK_F_BLK_SIZE) | (1 << BLK_F_SEG_MAX) | (1 << BLK_F_MQ) | (1 << BLK_F_RO)
          | (1 << VHOST_USER_F_PROTOCOL_FEATURES))
PF_WANTED = (1 << PF.MQ) | (1 << PF.REPLY_ACK) | (1 << PF.CONFIG) | (1 << PF.INFLIGHT_SHMFD)


class DriverError(RuntimeError):
    pass


class VhostUserBlkDriver:
    """Drive a vhost-user-blk back-end on *socket_path*."""

    def __init__(self, socket_path: str, *, ram: int = 64 << 20, num_queues: int = 1, queue_size: int = 128,
                 event_idx: bool = True, indirect: bool = True, use_inflight: bool = True,
                 reconnect: bool = True, reconnect_wait: float = 30.0, name: str = "vu-blk") -> None:
        self.path = socket_path
        self.name = name
        self.mem = GuestMemory.create(ram, f"{name}-ram")
        self.pages = PageAllocator(0x100000, ram)
        self.want_queues = num_queues
        self.queue_size = queue_size
        self.event_idx = event_idx
        self.indirect = indirect
        self.use_inflight = use_inflight
        self.reconnect_enabled = reconnect
        self.reconnect_wait = reconnect_wait
        self.fe = VhostUserFrontend(socket_path, name=name)
        self.vqs: list[Vring] = []
        self.kicks: list[EventNotifier] = []
        self.calls: list[EventNotifier] = []
        self.errs: list[EventNotifier] = []
        self.features = 0
        self.capacity = 0
        self.num_queues = 0
        self.inflight: InflightInfo | None = None
        self.config = b""
        self.stop_event = threading.Event()
        self.error: str | None = None
        self.connected = threading.Event()
        self.reconnects = 0
        self.spurious_calls = 0
        self.thread_reaps = 0  # calls the completion thread took (a queue reaped by its own thread: none)
        self.completions = 0
        self.out_of_order = 0
        self.vring_errors = 0
        self._ep: select.epoll | None = None
        self._thread: threading.Thread | None = None
        self._wake = EventNotifier(f"{name}-wake")
        self._sock_fd = -1  # the back-end's socket while connected (its hang-up ends the connection)
        self._last_done_seq = [0] * 64

    # -- setup (QEMU 7.2's order) -------------------------------------------------------------------
    def _realize(self) -> None:
        fe = self.fe
        offered = fe.get_features()
        if not offered >> VHOST_USER_F_PROTOCOL_FEATURES & 1:
            raise DriverError("the back-end does not offer VHOST_USER_F_PROTOCOL_FEATURES")
        pf = fe.get_protocol_features() & PF_WANTED
        if not self.use_inflight:
            pf &= ~(1 << PF.INFLIGHT_SHMFD)
        fe.set_protocol_features(pf)
        nq = fe.get_queue_num() if pf >> PF.MQ & 1 else 1
        self.num_queues = min(self.want_queues, nq)
        if self.num_queues < self.want_queues:
            raise DriverError(f"the back-end has {nq} queues, {self.want_queues} wanted")
        fe.set_owner()
        fe.get_features()
        for i in range(self.num_queues):
            fe.set_vring_call(i, self.calls[i].fd if i < len(self.calls) else None)
            fe.set_vring_err(i, self.errs[i].fd if i < len(self.errs) else None)
        if pf >> PF.CONFIG & 1:
            self.config = fe.get_config(0, 60)
            self.capacity = struct.unpack_from("<Q", self.config)[0]

    def _start(self, first: bool) -> None:
        fe = self.fe
        if fe.has_pf(PF.INFLIGHT_SHMFD):
            if self.inflight is None:
                self.inflight = fe.get_inflight_fd(self.num_queues, self.queue_size)
            fe.set_inflight_fd(self.inflight)
        f = fe.backend_features & WANTED
        if not self.event_idx:
            f &= ~(1 << VIRTIO_RING_F_EVENT_IDX)
        if not self.indirect:
            f &= ~(1 << VIRTIO_RING_F_INDIRECT_DESC)
        if first:
            self.features = f
        fe.set_features(self.features)
        regions, fds = self.mem.layout()
        mr = [MemRegion(r["gpa"], r["size"], USER_BASE + r["gpa"], r["block_offset"]) for r in regions]
        fe.set_mem_table(mr, [fds[r["block"]] for r in regions])
        for i in range(self.num_queues):
            vq = self.vqs[i]
            fe.set_vring_num(i, vq.num)
            # after a crash the back-end's position is unknown: start from the used index
            base = 0 if first else vq.used_idx()
            fe.set_vring_base(i, base)
            fe.set_vring_addr(i, USER_BASE + vq.desc, USER_BASE + vq.used, USER_BASE + vq.avail)
            fe.set_vring_kick(i, self.kicks[i].fd)
            fe.set_vring_call(i, self.calls[i].fd)
        for i in range(self.num_queues):
            fe.set_vring_enable(i, True)

    def connect(self, wait: float = 10.0) -> None:
        self.fe.connect(wait=wait)
        nq = self.want_queues
        if not self.vqs:
            self.kicks = [EventNotifier(f"{self.name}.vq{i}.kick") for i in range(nq)]
            self.calls = [EventNotifier(f"{self.name}.vq{i}.call") for i in range(nq)]
            self.errs = [EventNotifier(f"{self.name}.vq{i}.err") for i in range(nq)]
        self._realize()
        if not self.vqs:
            ei = bool(self.fe.backend_features >> VIRTIO_RING_F_EVENT_IDX & 1) and self.event_idx
            ind = bool(self.fe.backend_features >> VIRTIO_RING_F_INDIRECT_DESC & 1) and self.indirect
            self.event_idx, self.indirect = ei, ind
            for i in range(self.num_queues):
                self.vqs.append(Vring(self.mem, self.pages.alloc, i, self.queue_size, event_idx=ei, indirect=ind,
                                      notify=lambda vr: self.kicks[vr.index].set(), name=f"req.{i}"))
            self._start(first=True)
            self._ep = select.epoll()
            for i in range(self.num_queues):
                self._ep.register(self.calls[i].fd, select.EPOLLIN)
                self._ep.register(self.errs[i].fd, select.EPOLLIN)
            self._ep.register(self._wake.fd, select.EPOLLIN)
            self._watch_socket()
            self._thread = named_thread(self._completions, "kc-fe-compl")
            self._thread.start()
        else:
            self._start(first=False)
            self._watch_socket()
        self.connected.set()

    def _watch_socket(self) -> None:
        assert self._ep is not None and self.fe.sock is not None
        self._sock_fd = self.fe.sock.fileno()
        # the hang-up only: replies on this socket belong to whoever sent the request
        self._ep.register(self._sock_fd, select.EPOLLRDHUP)

    def close(self) -> None:
        self.stop_event.set()
        try:
            self._wake.set()
        except Exception:
            pass
        if self._thread is not None:
            self._thread.join(10)
        if self.fe.connected:
            try:
                for i in range(self.num_queues):
                    self.fe.set_vring_enable(i, False)
                for i in range(self.num_queues):
                    self.fe.get_vring_base(i)
            except (BackendGone, ProtocolError, OSError):
                pass
        self.fe.close()
        if self._ep is not None:
            self._ep.close()
        for n in self.kicks + self.calls + self.errs + [self._wake]:
            n.close()
        for vq in self.vqs:
            vq.release()
        if self.inflight is not None:
            os.close(self.inflight.fd)
        self.mem.close()

    # -- completions and reconnect ----------------------------------------------------------------------
    def _completions(self) -> None:
        assert self._ep is not None
        call_fds = {self.calls[i].fd: i for i in range(self.num_queues)}
        err_fds = {self.errs[i].fd: i for i in range(self.num_queues)}
        while not self.stop_event.is_set():
            try:
                events = self._ep.poll(1.0)
            except InterruptedError:
                continue
            for fd, _ev in events:
                if fd in call_fds:
                    if self.calls[call_fds[fd]].test_and_clear():
                        self.thread_reaps += 1
                        self._reap(call_fds[fd])
                elif fd in err_fds:
                    if self.errs[err_fds[fd]].test_and_clear():
                        self.vring_errors += 1
                        self.error = f"the back-end reported a ring error on queue {err_fds[fd]}"
                elif fd == self._wake.fd:
                    self._wake.test_and_clear()
                elif fd == self._sock_fd:
                    self._ep.unregister(fd)
                    self._sock_fd = -1
                    self._backend_died()

    def own_completions(self, q: int) -> int:
        """Hand queue *q*'s completions to the calling thread: the completion thread stops watching
        its call fd, and the caller waits on the returned fd and calls ``reap(q)`` (one thread
        wake-up per completion instead of two).  ``return_completions(q)`` gives them back."""
        assert self._ep is not None
        fd = self.calls[q].fd
        try:
            self._ep.unregister(fd)
        except (OSError, ValueError):
            pass
        return fd

    def return_completions(self, q: int) -> None:
        """The completion thread watches queue *q*'s call fd again (and reaps what came meanwhile)."""
        if self._ep is None or self.stop_event.is_set():
            return
        try:
            self._ep.register(self.calls[q].fd, select.EPOLLIN)
        except (OSError, ValueError):
            return
        self._wake.set()  # a call that came while nobody watched: the thread looks at the fd now

    def reap(self, q: int) -> None:
        """Take queue *q*'s call (if it was signalled) and complete what its used ring holds."""
        if self.calls[q].test_and_clear():
            self._reap(q)

    def _reap(self, q: int) -> None:
        """Complete what queue *q*'s used ring holds (the call fired, or after a reconnect); a call
        that finds nothing is spurious (counted)."""
        try:
            n = complete_requests(self.vqs[q], self.mem, self._account)
        except RuntimeError as e:  # Vring.get_buf: the back-end returned a head we did not publish
            self.error = f"queue {q}: {e}"
            return
        if not n:
            self.spurious_calls += 1

    def _account(self, r: BlkRequest) -> None:
        """Bookkeeping of a completion, before its waiter can see it: completion order per queue."""
        q = r.queue
        if r.seq < self._last_done_seq[q]:
            self.out_of_order += 1
        else:
            self._last_done_seq[q] = r.seq
        self.completions += 1

    def _backend_died(self) -> None:
        self.connected.clear()
        self.fe.close()
        if not self.reconnect_enabled or self.stop_event.is_set():
            self.error = self.error or "the back-end went away"
            return
        log.warning("%s: the back-end went away; waiting for it to come back", self.name)
        start_thread(self._reconnect, "kc-reconnect")

    def _reconnect(self) -> None:
        deadline = time.monotonic() + self.reconnect_wait
        while not self.stop_event.is_set():
            try:
                self.connect(wait=max(0.1, deadline - time.monotonic()))
                self.reconnects += 1
                log.warning("%s: reconnected", self.name)
                # any completion that landed while we were away is in the used ring
                for q in range(self.num_queues):
                    self._reap(q)
                return
            except (BackendGone, ProtocolError, OSError) as e:
                self.fe.close()
                if time.monotonic() > deadline:
                    self.error = f"reconnect failed: {e}"
                    return
                time.sleep(0.05)

    # -- requests --------------------------------------------------------------------------------------
    def new_req(self, nbytes: int) -> BlkRequest:
        """A request with a header page and *nbytes* of data from this front-end's RAM."""
        return BlkRequest(self, nbytes)

    def free_req(self, r: BlkRequest) -> None:
        r.free()

    def submit(self, q: int, reqs: list[BlkItem]) -> int:
        """Queue (req, type, sector, nbytes) items on queue *q* and kick once; returns how many went in."""
        return submit_requests(self.vqs[q], self.mem, reqs, q)

    def io(self, rtype: int, sector: int, nbytes: int, data: bytes | None = None, q: int = 0,
           timeout: float = 30.0) -> tuple[int, bytes]:
        r = self.new_req(nbytes)
        try:
            if data is not None:
                self.mem.write(r.data, data)
            if self.submit(q, [(r, rtype, sector, nbytes)]) != 1:
                raise DriverError("queue full")
            if not r.done.wait(timeout):
                raise DriverError(f"request not completed within {timeout}s ({self.error or 'no error seen'})")
            out = self.mem.read(r.data, nbytes) if rtype in (BLK_T_IN, BLK_T_GET_ID) and nbytes else b""
            return r.status_val, out
        finally:
            self.free_req(r)

    def out_of_order_now(self, q: int = 0) -> bool:
        """True when a completed request is newer than the oldest one still in flight: the completed
        ones are then not a prefix of the ring, and restarting a back-end from used.idx without
        knowing what it had taken would redo a completed request and skip an in-flight one."""
        vq = self.vqs[q]
        with vq.lock:
            pending = [t.seq for t in vq.data if t is not None and not t.done.is_set()]
        return bool(pending) and self._last_done_seq[q] > min(pending)

    def in_flight(self, q: int = 0) -> tuple[int, int, int]:
        """(avail.idx, the back-end's avail_event, used.idx) read from the ring: with EVENT_IDX,
        avail_event - used.idx is what the back-end has taken and not completed."""
        vq = self.vqs[q]
        return vq.avail_idx_shadow, vq.avail_event(), vq.used_idx()


class BlkVerifyWorkload:
    """Data-verified random I/O from submitter threads, one per queue."""

    def __init__(self, drv: VhostUserBlkDriver, *, depth: int = 16, block_size: int = 4096, read_ratio: float = 0.5,
                 nblocks: int = 256, seed: int = 1, stall_timeout: float = 30.0, reap_inline: bool = True) -> None:
        self.drv = drv
        self.reap_inline = reap_inline  # each queue's thread reaps its own completions (one wake-up per request)
        self.depth = depth
        self.bs = block_size
        self.read_ratio = read_ratio
        cap_blocks = drv.capacity * 512 // block_size if drv.capacity else nblocks
        self.nblocks = max(1, min(nblocks, cap_blocks))
        self.seed = seed
        self.stall_timeout = stall_timeout
        # what each block may hold: only what this workload wrote (prefill() writes every block first)
        self.verifier = BlockVerifier(block_size, InitialContent({"kind": "unknown"}, block_size))
        self.errors: list[str] = []
        self.ops = self.reads = self.writes = 0
        self._stat_mu = threading.Lock()  # ops/reads/writes: each queue's thread checks its completions
        self.hist = LatencyHistogram()       # the whole run's completion latencies
        self.interval_hist = LatencyHistogram()  # since the last interval() (per-interval logs)
        self._last_reads = self._last_writes = 0
        self.elapsed = 0.0
        self.stop_event = threading.Event()  # stop submitting, complete what is in flight (Ctrl-C)
        self.aborted = threading.Event()  # leave at once, requests in flight included (interrupted)
        self.started = threading.Event()  # run() began: from here on a stop leaves partial results
        self._gen = 1
        self._mu = threading.Lock()
        self.duplicates = 0

    def prefill(self) -> None:
        """Write every block of the working set once (generation 1), so every read can be checked."""
        d = self.drv
        for b in range(self.nblocks):
            st, _ = d.io(BLK_T_OUT, b * self.bs // 512, self.bs, block_content(b, 1, self.bs),
                         q=b % d.num_queues, timeout=self.stall_timeout)
            if st != 0:
                raise DriverError(f"prefill of block {b} failed with status {st}")
            self.verifier.write_completed(b, 1)
        self._gen = 2

    def run(self, duration: float, *, tick: Callable[[float], None] | None = None, interval: float = 1.0) -> None:
        """Run for *duration* seconds; *tick(elapsed)* is called from this (the caller's) thread every
        *interval* seconds while it runs.  :attr:`stop_event` ends the run early with what is in
        flight completed and checked (a graceful stop); :attr:`aborted` abandons it.  If the caller
        is interrupted (an exception here), the submitter threads are told to abandon their
        requests and are joined before this returns, so that nobody touches the driver's memory
        after the caller closes it."""
        d = self.drv
        threads = [named_thread(self._queue_loop, f"kc-wl-q{q}", args=(q, duration))
                   for q in range(d.num_queues)]
        t0 = time.monotonic()
        deadline = t0 + duration + self.stall_timeout + 30
        next_tick = t0 + interval
        self.started.set()
        try:
            for t in threads:
                t.start()
            while True:
                alive = [t for t in threads if t.is_alive()]
                now = time.monotonic()
                if not alive or now >= deadline:
                    break
                alive[0].join(max(0.0, min(deadline, next_tick if tick else deadline) - now))
                now = time.monotonic()
                if tick is not None and now >= next_tick and any(t.is_alive() for t in threads):
                    self.elapsed = now - t0
                    tick(now - t0)
                    next_tick += interval * max(1, int((now - next_tick) // interval) + 1)
        finally:
            if any(t.is_alive() for t in threads):
                self.aborted.set()
                self.stop_event.set()
                for t in threads:
                    if t.is_alive():
                        t.join(10)
        self.elapsed = time.monotonic() - t0

    def _queue_loop(self, q: int, duration: float) -> None:
        d = self.drv
        rng = random.Random(self.seed * 97 + q)
        per_q = max(1, self.depth // d.num_queues)
        owned = list(range(q, self.nblocks, d.num_queues))
        if not owned:
            return
        slots = [d.new_req(self.bs) for _ in range(per_q)]
        free = list(slots)
        inflight: set[BlkRequest] = set()
        busy: set[int] = set()
        end = time.monotonic() + duration
        # this thread reaps its queue's completions itself (no hand-off through the completion
        # thread): the instrument's own cost per request is one wake-up, not two
        call_fd = d.own_completions(q) if self.reap_inline else -1
        try:
            while True:
                if self.aborted.is_set():
                    return
                stopping = time.monotonic() >= end or self.stop_event.is_set() or d.error
                if not stopping and free:
                    batch = []
                    while free:
                        b = owned[rng.randrange(len(owned))]
                        if b in busy:
                            break
                        r = free.pop()
                        busy.add(b)
                        if rng.random() < self.read_ratio:
                            r.tag = (b, None)
                            batch.append((r, BLK_T_IN, b * self.bs // 512, self.bs))
                        else:
                            with self._mu:
                                g = self._gen
                                self._gen += 1
                            d.mem.write(r.data, block_content(b, g, self.bs))
                            self.verifier.write_submitted(b, g)
                            r.tag = (b, g)
                            batch.append((r, BLK_T_OUT, b * self.bs // 512, self.bs))
                    try:
                        n = d.submit(q, batch)
                    except NotifierError as e:  # the driver was closed under us (an interrupted run)
                        if not (self.aborted.is_set() or self.stop_event.is_set()):
                            self.errors.append(f"queue {q}: the driver went away: {e}")
                        return
                    for r, *_ in batch[:n]:
                        inflight.add(r)
                    for r, *_ in batch[n:]:
                        busy.discard(r.tag[0])
                        free.append(r)
                if not inflight:
                    if stopping:
                        return
                    continue
                deadline = time.monotonic() + self.stall_timeout
                got: list[BlkRequest] = []
                while not got:
                    if self.aborted.is_set():
                        return
                    got = [r for r in list(inflight) if r.done.is_set()]
                    if got:
                        break
                    if time.monotonic() > deadline:
                        self.errors.append(f"queue {q}: {len(inflight)} requests not completed within "
                                           f"{self.stall_timeout}s ({d.error or 'no error reported'})")
                        return
                    if call_fd >= 0:
                        try:
                            if select.select([call_fd], [], [], 0.05)[0]:
                                d.reap(q)
                        except (NotifierError, OSError, ValueError) as e:  # closed under us (Ctrl-C)
                            if not (self.aborted.is_set() or self.stop_event.is_set()):
                                self.errors.append(f"queue {q}: the driver went away: {e}")
                            return
                    else:
                        next(iter(inflight)).done.wait(0.05)
                for r in got:
                    inflight.discard(r)
                    self._check(r)
                    busy.discard(r.tag[0])
                    free.append(r)
        finally:
            if call_fd >= 0:
                d.return_completions(q)
            for r in free:
                d.free_req(r)

    def _check(self, r: BlkRequest) -> None:
        b, gen = r.tag
        with self._stat_mu:
            self.ops += 1
        self.hist.record(r.t_done - r.t_submit)
        self.interval_hist.record(r.t_done - r.t_submit)
        if r.completions != 1:
            self.duplicates += 1
            self.errors.append(f"block {b}: request completed {r.completions} times")
        if r.status_val != 0:
            self.errors.append(f"block {b}: status {r.status_val}")
            return
        if gen is not None:
            with self._stat_mu:
                self.writes += 1
            self.verifier.write_completed(b, gen)
            return
        with self._stat_mu:
            self.reads += 1
        self.errors.extend(self.verifier.check_read(b, self.drv.mem.read(r.data, self.bs)))

    def interval(self) -> dict:
        """What completed since the last call: reads, writes and the latency ladder of those."""
        with self._stat_mu:
            reads, writes = self.reads, self.writes
        h = self.interval_hist.take()
        out = {"reads": reads - self._last_reads, "writes": writes - self._last_writes,
               "lat-us-mean": round(h.mean_us(), 3), "lat-us-max": h.max_ns / 1000.0,
               "lat-us-percentiles": h.ladder_us()}
        self._last_reads, self._last_writes = reads, writes
        return out

    def result(self) -> dict:
        el = self.elapsed

        def pct(p: float) -> float:
            return self.hist.percentile_ns(p) / 1000.0

        return {"ops": self.ops, "reads": self.reads, "writes": self.writes, "iops": self.ops / el if el else 0.0,
                "elapsed": el, "lat_us_p50": pct(50), "lat_us_p90": pct(90), "lat_us_p99": pct(99),
                "latency": self.hist.summary(),
                "errors": self.errors[:20], "error_count": len(self.errors), "duplicates": self.duplicates}


def run_test(socket_path: str, *, depth: int = 16, block_size: int = 4096, duration: float = 5.0,
             read_ratio: float = 0.5, queues: int = 1, nblocks: int = 256, queue_size: int = 128,
             use_inflight: bool = True, connect_wait: float = 10.0, seed: int = 1,
             tick: Callable[[BlkVerifyWorkload, float], None] | None = None, interval: float = 1.0,
             on_workload: Callable[[BlkVerifyWorkload], None] | None = None) -> dict:
    """Connect, prefill, run the verified workload, disconnect; the result dict has IOPS, latency
    percentiles and every error.  *on_workload(wl)* is called once the workload exists (before its
    prefill): a caller that sets ``wl.stop_event`` once ``wl.started`` is set gets the partial
    results of what completed (``"stopped": true``).  *tick(wl, elapsed)* runs every *interval*
    seconds of the run, in the caller's thread."""
    drv = VhostUserBlkDriver(socket_path, num_queues=queues, queue_size=queue_size, use_inflight=use_inflight)
    try:
        drv.connect(wait=connect_wait)
        st, ident = drv.io(BLK_T_GET_ID, 0, 20)
        wl = BlkVerifyWorkload(drv, depth=depth, block_size=block_size, read_ratio=read_ratio, nblocks=nblocks,
                               seed=seed)
        if on_workload is not None:
            on_workload(wl)
        wl.prefill()
        wl.run(duration, tick=None if tick is None else (lambda el: tick(wl, el)), interval=interval)
        res = wl.result()
        res["stopped"] = wl.stop_event.is_set()
        res["blocks"] = wl.nblocks
        res.update(get_id_status=st, serial=ident.rstrip(b"\0").decode(errors="replace"),
                   capacity_sectors=drv.capacity, queues=drv.num_queues, spurious_calls=drv.spurious_calls,
                   reconnects=drv.reconnects, out_of_order=drv.out_of_order, backend_error=drv.error,
                   messages=list(drv.fe.sent[:40]))
        if drv.error:
            res["errors"].append(drv.error)
            res["error_count"] += 1
        if wl.aborted.is_set():  # requests were abandoned in flight: the ring is not ours to use
            return res
        st, _ = drv.io(BLK_T_FLUSH, 0, 0)
        if st != 0:
            res["errors"].append(f"flush failed with status {st}")
            res["error_count"] += 1
        return res
    finally:
        drv.close()

