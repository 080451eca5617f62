"""Guest workloads that verify their data.

* ``BlkWorkload``: random 4 KiB (configurable) reads and writes at a queue depth spread over the
  vCPUs.  Every block written carries a header and a payload derived from (block, generation);
  every read is checked (``blkverify.BlockVerifier``) against what the block may legitimately
  hold: what this run wrote, or the image's initial content where it is known (an image kickcall
  created and labelled, or the user's image file itself) -- never assumed.  A block is never the
  target of two requests at once.  When it stops, it reads back every block it wrote (a final
  verify pass, as fio's ``verify``), so damage done after the last write is found too.  On a
  read-only device it only reads.
* ``NetWorkload``: ping-pong -- each vCPU sends a frame with a sequence number and a random payload
  and waits for it to come back byte-identical.

Both complete requests only from the interrupt handler: a lost kick or a lost call stalls the
workload, which reports a stall error after ``stall_timeout`` instead of hanging for ever.
"""

from __future__ import annotations

import functools
import random
import struct
import threading
import time
import zlib
from collections import deque

from ..virtio.blk import BLK_T_IN, BLK_T_OUT
from .blkverify import BHDR, BLK_MAGIC, SECTOR, BlockVerifier, InitialContent, block_content, initial_block
from .kernel import GuestKernel
from .virtio_blk import BlkRequest, VirtioBlkDriver
from .virtio_net import VirtioNetDriver

__all__ = ["BlkWorkload", "NetWorkload", "initial_block", "block_content", "BHDR", "BLK_MAGIC"]

class _Cpu:
    def __init__(self) -> None:
        self.completed: deque = deque()
        self.event = threading.Event()


class BlkWorkload:
    def __init__(self, kernel: GuestKernel, drv: VirtioBlkDriver, *, depth: int = 16, block_size: int = 4096,
                 read_ratio: float = 0.5, cpus: list[int] | None = None, seed: int = 1,
                 nblocks: int | None = None, stall_timeout: float = 10.0, initial: dict | None = None,
                 read_only: bool = False, final_verify: bool = True) -> None:
        self.k = kernel
        self.drv = drv
        self.bs = block_size
        self.depth = max(1, depth)
        self.read_ratio = read_ratio
        self.cpus = cpus if cpus is not None else list(range(kernel.ncpus))
        self.seed = seed
        cap_blocks = drv.capacity * SECTOR // block_size
        self.nblocks = min(nblocks or cap_blocks, cap_blocks)
        if self.nblocks < len(self.cpus):
            raise ValueError("disk too small for the workload")
        self.stall_timeout = stall_timeout
        self.read_only = read_only
        if read_only:
            self.read_ratio = 1.0  # a read-only device (or an image the user did not allow us to write)
        self.final_verify = final_verify
        self.verifier = BlockVerifier(block_size, InitialContent(initial, block_size))
        self.verified_at_end = 0
        self.next_gen = 1
        self._gen_mu = threading.Lock()
        self.stop_event = threading.Event()
        self.ops = self.reads = self.writes = 0
        self.errors: list[str] = []
        self.latencies_ns: deque = deque(maxlen=20000)
        self.futures: list = []
        self.started_at = 0.0
        self.stopped_at = 0.0

    # -- life cycle ----------------------------------------------------------------------------------
    def start(self) -> None:
        self.started_at = time.monotonic()
        per = [self.depth // len(self.cpus) + (1 if i < self.depth % len(self.cpus) else 0)
               for i in range(len(self.cpus))]
        for i, cpu in enumerate(self.cpus):
            if per[i]:
                self.futures.append(self.k.run_on(cpu, functools.partial(self._run, i, cpu, per[i])))

    def stop(self, timeout: float = 60.0) -> dict:
        self.stop_event.set()
        for f in self.futures:
            try:
                f.result(timeout)
            except Exception as e:
                self.errors.append(f"vCPU task failed: {type(e).__name__}: {e}")
        self.stopped_at = time.monotonic()
        self.verifier.initial.close()
        return self.result()

    def result(self) -> dict:
        lat = sorted(self.latencies_ns)

        def pct(p: float) -> float:
            return lat[min(len(lat) - 1, int(p * len(lat)))] / 1000 if lat else 0.0

        elapsed = (self.stopped_at or time.monotonic()) - self.started_at
        return {"kind": "blk", "ops": self.ops, "reads": self.reads, "writes": self.writes,
                "errors": list(self.errors[:20]), "error_count": len(self.errors),
                "verified_at_end": self.verified_at_end, "initial": self.verifier.initial.kind,
                "read_only": self.read_only,
                "iops": self.ops / elapsed if elapsed > 0 else 0.0,
                "lat_us_p50": pct(0.5), "lat_us_p99": pct(0.99)}

    # -- one vCPU --------------------------------------------------------------------------------------
    def _run(self, idx: int, cpu: int, depth: int) -> None:
        k = self.k
        nq = len(self.drv.vqs)
        q = cpu % nq
        rng = random.Random(self.seed * 7919 + cpu)
        ncpu = len(self.cpus)
        owned = range(idx, self.nblocks, ncpu)
        ctx = _Cpu()
        slots = [BlkRequest(k, self.bs) for _ in range(depth)]
        busy_blocks: set[int] = set()
        free = list(slots)
        inflight = 0
        for s in slots:
            s.owner = ctx
            s.done_cb = self._on_done
        to_verify: list[int] | None = None  # the final verify pass: this vCPU's written blocks
        while True:
            stopping = self.stop_event.is_set()
            if stopping and inflight == 0 and to_verify is None and self.final_verify:
                owned_set = set(owned)
                to_verify = [b for b in self.verifier.written_blocks() if b in owned_set]
            if free and (not stopping or to_verify):
                batch = []
                while free:
                    if to_verify is not None:
                        if not to_verify:
                            break
                        b = to_verify.pop()
                        read = True
                    else:
                        for _ in range(8):
                            b = owned[rng.randrange(len(owned))]
                            if b not in busy_blocks:
                                break
                        else:
                            break
                        read = rng.random() < self.read_ratio
                    req = free.pop()
                    busy_blocks.add(b)
                    if read:
                        req.tag = (b, None, to_verify is not None)
                        batch.append((req, BLK_T_IN, b * self.bs // SECTOR, self.bs))
                    else:
                        with self._gen_mu:
                            gen = self.next_gen
                            self.next_gen += 1
                        self.k.memory.write(req.data, block_content(b, gen, self.bs))
                        self.verifier.write_submitted(b, gen)
                        req.tag = (b, gen, False)
                        batch.append((req, BLK_T_OUT, b * self.bs // SECTOR, self.bs))
                n = self.drv.submit_batch(q, batch)
                inflight += n
                for req, *_ in batch[n:]:  # ring full: put back
                    busy_blocks.discard(req.tag[0])
                    free.append(req)
                    if to_verify is not None:
                        to_verify.append(req.tag[0])
            if inflight == 0:
                if stopping and (to_verify is not None and not to_verify or not self.final_verify):
                    return
                continue
            if not ctx.completed:
                ctx.event.clear()
                if not ctx.completed:
                    got = self.k.halt_until(ctx.event, self.stall_timeout)
                    if not got and not ctx.completed:
                        self.errors.append(f"cpu{cpu}: I/O stalled: {inflight} requests on queue {q} "
                                           f"not completed within {self.stall_timeout}s")
                        return
            while ctx.completed:
                req = ctx.completed.popleft()
                inflight -= 1
                self._check(req)
                busy_blocks.discard(req.tag[0])
                free.append(req)

    def _on_done(self, req: BlkRequest) -> None:  # interrupt context
        ctx = req.owner
        ctx.completed.append(req)
        ctx.event.set()

    def _check(self, req: BlkRequest) -> None:
        b, gen, final = req.tag
        self.ops += 1
        self.latencies_ns.append(req.t_done - req.t_submit)
        if req.status_val != 0:
            self.errors.append(f"block {b}: status {req.status_val}")
            return
        if gen is not None:
            self.writes += 1
            self.verifier.write_completed(b, gen)
            return
        self.reads += 1
        if final:
            self.verified_at_end += 1
        self.errors.extend(self.verifier.check_read(b, self.k.memory.read(req.data, self.bs)))


class NetWorkload:
    """Ping-pong over each queue pair with payload checks."""

    ETHERTYPE = 0x88B5

    def __init__(self, kernel: GuestKernel, drv: VirtioNetDriver, *, cpus: list[int] | None = None,
                 seed: int = 2, min_payload: int = 32, max_payload: int = 1400,
                 stall_timeout: float = 10.0) -> None:
        self.k = kernel
        self.drv = drv
        self.cpus = cpus if cpus is not None else list(range(kernel.ncpus))
        self.seed = seed
        self.min_payload = min_payload
        self.max_payload = max_payload
        self.stall_timeout = stall_timeout
        self.stop_event = threading.Event()
        self.ops = 0
        self.errors: list[str] = []
        self.latencies_ns: deque = deque(maxlen=20000)
        self._waiting: dict[int, tuple[int, bytes, threading.Event, list]] = {}
        self._mu = threading.Lock()
        self.futures: list = []
        self.unexpected = 0
        self.started_at = 0.0
        self.stopped_at = 0.0
        drv.on_receive = self._on_receive

    def start(self) -> None:
        self.started_at = time.monotonic()
        for cpu in self.cpus:
            self.futures.append(self.k.run_on(cpu, functools.partial(self._run, cpu)))

    def stop(self, timeout: float = 60.0) -> dict:
        self.stop_event.set()
        for f in self.futures:
            try:
                f.result(timeout)
            except Exception as e:
                self.errors.append(f"vCPU task failed: {type(e).__name__}: {e}")
        self.stopped_at = time.monotonic()
        return self.result()

    def result(self) -> dict:
        elapsed = (self.stopped_at or time.monotonic()) - self.started_at
        lat = sorted(self.latencies_ns)
        p50 = lat[len(lat) // 2] / 1000 if lat else 0.0
        return {"kind": "net", "ops": self.ops, "errors": list(self.errors[:20]), "error_count": len(self.errors),
                "pps": self.ops / elapsed if elapsed > 0 else 0.0, "lat_us_p50": p50,
                "unexpected": self.unexpected}

    def _run(self, cpu: int) -> None:
        rng = random.Random(self.seed * 31 + cpu)
        pair = cpu % self.drv.pairs
        mac = self.drv.mac
        seq = 0
        while not self.stop_event.is_set():
            seq += 1
            n = rng.randint(self.min_payload, self.max_payload)
            payload = rng.randbytes(n)
            body = struct.pack("<IIII", cpu, seq, n, zlib.crc32(payload)) + payload
            frame = mac + mac + struct.pack(">H", self.ETHERTYPE) + body
            ev = threading.Event()
            box: list = []
            with self._mu:
                self._waiting[cpu] = (seq, frame, ev, box)
            t0 = time.monotonic_ns()
            if not self.drv.send(pair, frame):
                time.sleep(0.001)
                continue
            if not self.k.halt_until(ev, self.stall_timeout):
                self.errors.append(f"cpu{cpu}: packet {seq} on pair {pair} not echoed within {self.stall_timeout}s")
                return
            self.latencies_ns.append(time.monotonic_ns() - t0)
            if box[0] != frame:
                self.errors.append(f"cpu{cpu}: packet {seq} came back corrupted")
            self.ops += 1
        with self._mu:
            self._waiting.pop(cpu, None)

    def _on_receive(self, pair: int, pkt: bytes) -> None:  # interrupt context
        if len(pkt) < 30 or struct.unpack_from(">H", pkt, 12)[0] != self.ETHERTYPE:
            self.unexpected += 1
            return
        cpu, seq = struct.unpack_from("<II", pkt, 14)
        with self._mu:
            w = self._waiting.get(cpu)
        if w is None or w[0] != seq:
            self.unexpected += 1
            return
        w[3].append(pkt)
        w[2].set()
