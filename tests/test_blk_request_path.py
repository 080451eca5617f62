"""One driver-side virtio-blk request path (kickcall.guest.blk_request), two front-ends: the same
requests give the same results through the guest's driver (in a machine, over virtio-pci) and
through the VM-less vhost-user front-end (kickcall.drive), each against kickcall's virtio-blk
device model (VirtIOBlk) on an image created the same way.

The shared path's own mechanics -- the chain it builds, the used length and the submission order
it records, a ring-full batch -- are checked against a device played by the test on the driver's
ring (no back-end), so a difference in what the path does is seen without a machine."""

from __future__ import annotations

import os
import struct

import pytest

from helpers import blk, machine_toml, running_machine
from kickcall.guest.blk_request import STATUS_OFFSET, STATUS_UNSET, BlkRequest, complete_requests, submit_requests
from kickcall.guest.kernel import PageAllocator
from kickcall.guest.virtio_ring import Vring
from kickcall.memory import GuestMemory
from kickcall.virtio.blk import (
    BLK_S_IOERR,
    BLK_S_OK,
    BLK_T_FLUSH,
    BLK_T_GET_ID,
    BLK_T_IN,
    BLK_T_OUT,
    HDR,
    VirtIOBlk,
)
from kickcall.virtio.image import create_image, sector_label
from kickcall.virtio.layout import AVAIL_IDX_U16, AVAIL_RING_U16, DESC, DESC_SIZE, USED_ELEM, USED_RING
from kickcall.virtio.ring import VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE

SIZE = 4 << 20  # the machine's blk("blk0") image: 4 MiB, labelled (LABELLED_BYTES covers it)
CAPACITY = SIZE // 512
PATTERN = bytes((i * 7 + 3) & 0xFF for i in range(4096))

# (name, op, sector, nbytes, payload): run in this order through each front-end
SCRIPT: list[tuple[str, str, int, int, bytes | None]] = [
    ("write a pattern", "write", 64, 4096, PATTERN),
    ("read it back", "read", 64, 4096, None),
    ("read labels never written", "read", 8, 1024, None),
    ("read past the end", "read", CAPACITY - 1, 1024, None),
    ("write past the end", "write", CAPACITY, 512, bytes(512)),
    ("read not a multiple of 512", "read", 0, 1000, None),
    ("get-id", "get-id", 0, 20, None),
    ("flush", "flush", 0, 0, None),
]
OPS = {"read": BLK_T_IN, "write": BLK_T_OUT, "flush": BLK_T_FLUSH, "get-id": BLK_T_GET_ID}
EXPECTED_STATUS = {"read past the end": BLK_S_IOERR, "write past the end": BLK_S_IOERR,
                   "read not a multiple of 512": BLK_S_IOERR}


def _through_the_guest_driver() -> tuple[dict[str, tuple[int, bytes]], bytes]:
    """The script through the guest's virtio-blk driver (``blk-io``: VirtioBlkDriver.sync_io)."""
    out = {}
    with running_machine(machine_toml(devices=blk("blk0", size="4M"))) as m:
        slot = m.slot("blk0")
        for name, op, sector, nbytes, payload in SCRIPT:
            cmd: dict = {"cmd": "blk-io", "slot": slot, "op": op, "sector": sector, "nbytes": nbytes}
            if payload is not None:
                cmd["data"] = payload.hex()
            r = m.guest_cmd(cmd)
            out[name] = (r["status"], bytes.fromhex(r.get("data", "")))
        with open(m.device("blk0").vdev.image, "rb") as f:
            f.seek(64 * 512)
            on_disk = f.read(4096)
    return out, on_disk


def _through_the_vm_less_front_end(workdir: str) -> tuple[dict[str, tuple[int, bytes]], bytes, dict[str, int]]:
    """The script through kickcall.drive's front-end, against VirtIOBlk behind kickcall's vhost-user
    back-end; also each request's used length."""
    from kickcall.drive.vhost_user_blk import VhostUserBlkDriver
    from kickcall.loop import IOThread
    from kickcall.vhost_user.backend import VhostUserBackend

    img = os.path.join(workdir, "d.img")
    create_image(img, SIZE, labelled=SIZE)
    loop = IOThread("be")
    dev = VirtIOBlk("blk0", img, queue_size=64, aio="threads", loop=loop)
    sock = os.path.join(workdir, "s")
    be = VhostUserBackend(dev, socket_path=sock, loop=loop)
    loop.start()
    be.start()
    drv = VhostUserBlkDriver(sock, ram=16 << 20, queue_size=64, reconnect=False)
    out, used = {}, {}
    try:
        drv.connect(wait=30)
        for name, op, sector, nbytes, payload in SCRIPT:
            r = drv.new_req(nbytes)
            try:
                if payload is not None:
                    drv.mem.write(r.data, payload)
                assert drv.submit(0, [(r, OPS[op], sector, nbytes)]) == 1
                assert r.done.wait(30), f"{name}: not completed ({drv.error})"
                data = drv.mem.read(r.data, nbytes) if op in ("read", "get-id") and r.status_val == 0 else b""
                out[name] = (r.status_val, data)
                used[name] = r.used_len
                assert r.completions == 1
            finally:
                drv.free_req(r)
        assert drv.error is None
        with open(img, "rb") as f:
            f.seek(64 * 512)
            on_disk = f.read(4096)
    finally:
        drv.close()
        be.stop()
        loop.stop()
        dev.close()
    return out, on_disk, used


def test_the_same_requests_give_the_same_results_through_both_front_ends(workdir):
    guest, guest_disk = _through_the_guest_driver()
    vmless, vmless_disk, used = _through_the_vm_less_front_end(workdir)
    assert guest == vmless
    for name, _op, _s, _n, _p in SCRIPT:
        assert guest[name][0] == EXPECTED_STATUS.get(name, BLK_S_OK), name
    assert guest["read it back"][1] == PATTERN == guest_disk == vmless_disk
    assert guest["read labels never written"][1] == sector_label(8) + sector_label(9)
    assert guest["get-id"][1] == b"blk0".ljust(20, b"\0")
    # the used length: bytes the device wrote, the status byte included
    assert used == {"write a pattern": 1, "read it back": 4097, "read labels never written": 1025,
                    "read past the end": 1, "write past the end": 1, "read not a multiple of 512": 1,
                    "get-id": 21, "flush": 1}


# -- the path's mechanics, against a device the test plays ----------------------------------------------

class _PlayedDevice:
    """Takes what the driver published on a ring, reads each chain like a device, and completes it."""

    def __init__(self, mem: GuestMemory, vq: Vring) -> None:
        self.mem, self.vq = mem, vq
        self.last_avail = 0
        self.used = 0

    def take(self) -> list[tuple[int, list[tuple[int, int, int]]]]:
        """(head, [(addr, len, flags without NEXT)]) for each newly published chain, indirect tables
        followed."""
        vq, mem = self.vq, self.mem
        avail_idx = struct.unpack_from("<H", mem.read(vq.avail, 4), 2 * AVAIL_IDX_U16)[0]
        chains = []
        while self.last_avail != avail_idx:
            slot = self.last_avail % vq.num
            head = struct.unpack("<H", mem.read(vq.avail + 2 * (AVAIL_RING_U16 + slot), 2))[0]
            addr, length, flags, nxt = DESC.unpack(mem.read(vq.desc + DESC_SIZE * head, DESC_SIZE))
            if flags & VRING_DESC_F_INDIRECT:
                table = [DESC.unpack(mem.read(addr + DESC_SIZE * i, DESC_SIZE)) for i in range(length // DESC_SIZE)]
            else:
                table = [(addr, length, flags, nxt)]
                while flags & VRING_DESC_F_NEXT:
                    addr, length, flags, nxt = DESC.unpack(mem.read(vq.desc + DESC_SIZE * nxt, DESC_SIZE))
                    table.append((addr, length, flags, nxt))
            # NEXT on every descriptor but the last (a chain of table entries 0, 1, ... when indirect)
            assert [f & VRING_DESC_F_NEXT for _a, _n, f, _x in table] == [VRING_DESC_F_NEXT] * (len(table) - 1) + [0]
            chains.append((head, [(a, n, f & ~VRING_DESC_F_NEXT) for a, n, f, _ in table]))
            self.last_avail = (self.last_avail + 1) & 0xFFFF
        return chains

    def complete(self, head: int, status_gpa: int, status: int, written: int) -> None:
        self.mem.write(status_gpa, bytes([status]))
        self.mem.write(self.vq.used + USED_RING + USED_ELEM.size * (self.used % self.vq.num),
                       USED_ELEM.pack(head, written + 1))
        self.used = (self.used + 1) & 0xFFFF
        self.mem.write(self.vq.used + 2, struct.pack("<H", self.used))


@pytest.fixture
def ring():
    mem = GuestMemory.create(4 << 20, "kc-blkreq")
    pages = PageAllocator(0x10000, 4 << 20)
    kicks: list[int] = []
    vq = Vring(mem, pages.alloc, 0, 8, event_idx=False, indirect=True, notify=lambda v: kicks.append(v.index))
    yield mem, pages, vq, kicks
    vq.release()
    mem.close()


@pytest.mark.parametrize("op", ["read", "write", "flush", "get-id"])
def test_the_chain_is_header_data_status_and_completion_reads_status_and_used_len(ring, op):
    mem, pages, vq, kicks = ring
    dev = _PlayedDevice(mem, vq)
    r = BlkRequest(pages, 4096)
    nbytes = {"flush": 0, "get-id": 20}.get(op, 4096)
    assert submit_requests(vq, mem, [(r, OPS[op], 77, nbytes)], 0) == 1
    assert kicks == [0] and not r.done.is_set()
    ((head, chain),) = dev.take()
    assert head == r.head and r.seq == 1
    # header device-readable, with the device side's layout; data in the direction of the op; status last
    assert chain[0] == (r.hdr, HDR.size, 0) and HDR.unpack(mem.read(r.hdr, HDR.size)) == (OPS[op], 0, 77)
    assert chain[-1] == (r.hdr + STATUS_OFFSET, 1, VRING_DESC_F_WRITE)
    assert mem.read(r.status, 1)[0] == STATUS_UNSET
    middle = {"read": [(r.data, 4096, VRING_DESC_F_WRITE)], "write": [(r.data, 4096, 0)], "flush": [],
              "get-id": [(r.data, 20, VRING_DESC_F_WRITE)]}[op]
    assert chain[1:-1] == middle
    written = nbytes if op in ("read", "get-id") else 0
    dev.complete(head, r.status, BLK_S_OK, written)
    seen = []
    r.done_cb = seen.append
    assert complete_requests(vq, mem, lambda q: seen.append(("accounted", q.done.is_set()))) == 1
    assert r.done.is_set() and r.status_val == BLK_S_OK and r.used_len == written + 1 and r.completions == 1
    assert seen == [("accounted", False), r]  # the driver's bookkeeping before any waiter sees it
    assert complete_requests(vq, mem) == 0  # nothing more in the used ring
    r.free()


def test_a_full_ring_takes_a_prefix_of_the_batch_and_completions_keep_submission_order(ring):
    mem, pages, vq, kicks = ring
    dev = _PlayedDevice(mem, vq)
    reqs = [BlkRequest(pages, 512) for _ in range(10)]  # 8 ring entries, each request one indirect descriptor
    n = submit_requests(vq, mem, [(r, BLK_T_IN, i, 512) for i, r in enumerate(reqs)], 0)
    assert n == 8 and len(kicks) == 1
    assert [r.seq for r in reqs[:8]] == list(range(1, 9)) and all(r.head == -1 for r in reqs[8:])
    chains = dev.take()
    for head, chain in reversed(chains):  # the device completes them in reverse order
        dev.complete(head, chain[-1][0], BLK_S_IOERR if head == reqs[3].head else BLK_S_OK, 512)
    order: list[BlkRequest] = []
    assert complete_requests(vq, mem, order.append) == 8
    assert order == list(reversed(reqs[:8]))
    assert [r.status_val for r in reqs[:8]] == [BLK_S_OK] * 3 + [BLK_S_IOERR] + [BLK_S_OK] * 4
    assert submit_requests(vq, mem, [(r, BLK_T_IN, 0, 512) for r in reqs[8:]], 0, kick=False) == 2
    assert len(kicks) == 1  # published, not notified
    for r in reqs:
        r.free()


def test_a_request_over_caller_buffers_is_not_freed_by_it(ring):
    mem, pages, vq, _kicks = ring
    hdr, data = pages.alloc(4096), pages.alloc(4096)
    r = BlkRequest.at(hdr, data, 4096, status=hdr + 100)
    out, inn = r.prepare(mem, BLK_T_OUT, 5, 4096)
    assert out == [(hdr, HDR.size), (data, 4096)] and inn == [(hdr + 100, 1)]
    assert mem.read(hdr + 100, 1)[0] == STATUS_UNSET and HDR.unpack(mem.read(hdr, HDR.size)) == (BLK_T_OUT, 0, 5)
    r.free()
    pages.free(hdr)  # still the caller's: the request did not free it
    pages.free(data)
