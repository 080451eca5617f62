"""Depth without the GIL ping-pong (issue 14): with aio "auto", a read the page cache holds is
served on the back-end's loop with preadv2(RWF_NOWAIT) -- the kernel copies it or says EAGAIN,
never blocks -- instead of going to a worker thread and back."""

from __future__ import annotations

import os

import pytest

from kickcall.loop import IOThread
from kickcall.virtio.blk import BLK_S_OK, BLK_T_IN, BLK_T_OUT, VirtIOBlk, make_image



@pytest.mark.parametrize("inline_cached", [True, False], ids=["inline-cached", "threads"])
def test_cached_reads_at_depth_are_served_on_the_loop(workdir, inline_cached):
    """aio "auto" at depth: a read the page cache holds is served on the loop (preadv2 RWF_NOWAIT),
    without a worker thread; the data is the data written.  Switched off, every overlapping read
    goes to the workers."""
    from kickcall.drive.vhost_user_blk import VhostUserBlkDriver
    from kickcall.vhost_user.backend import VhostUserBackend

    img = os.path.join(workdir, "d.img")
    make_image(img, 4 << 20)
    loop = IOThread("be")
    dev = VirtIOBlk("blk0", img, queue_size=64, aio="auto", loop=loop, inline_cached=inline_cached)
    be = VhostUserBackend(dev, socket_path=os.path.join(workdir, "s"), loop=loop)
    loop.start()
    be.start()
    drv = VhostUserBlkDriver(be.socket_path or "", ram=16 << 20, queue_size=64, reconnect=False)
    try:
        drv.connect(wait=30)
        blocks = {i: bytes([(i * 7) % 251 + 1]) * 4096 for i in range(32)}
        for i, data in blocks.items():  # written through the device: in the page cache now
            assert drv.io(BLK_T_OUT, 8 * i, 4096, data)[0] == BLK_S_OK
        for _ in range(4):  # 16 reads published at once, one kick: they overlap
            reqs = [drv.new_req(4096) for _ in range(16)]
            assert drv.submit(0, [(r, BLK_T_IN, 8 * (j * 2 % 32), 4096) for j, r in enumerate(reqs)]) == 16
            for j, r in enumerate(reqs):
                assert r.done.wait(30) and r.status_val == BLK_S_OK
                assert drv.mem.read(r.data, 4096) == blocks[j * 2 % 32], j
                drv.free_req(r)
        if inline_cached:
            assert dev.cached_inline_ios > 0
        else:
            assert dev.cached_inline_ios == 0 and dev.cached_misses == 0
    finally:
        drv.close()
        be.stop()
        loop.stop()
        dev.close()


@pytest.mark.parametrize("reap_inline", [True, False], ids=["inline", "completion-thread"])
def test_the_instrument_reaps_its_completions_on_the_queue_thread(workdir, reap_inline):
    """vhost-user-test's workload: each queue's thread waits on its call fd and reaps its used ring
    itself (one thread wake-up per request); the completion thread takes none of its calls.  With
    that off, every call goes through the completion thread and back."""
    from kickcall.drive.vhost_user_blk import BlkVerifyWorkload, VhostUserBlkDriver
    from kickcall.vhost_user.backend import VhostUserBackend

    img = os.path.join(workdir, "d.img")
    make_image(img, 4 << 20)
    loop = IOThread("be")
    dev = VirtIOBlk("blk0", img, queue_size=64, aio="auto", loop=loop)
    be = VhostUserBackend(dev, socket_path=os.path.join(workdir, "s"), loop=loop)
    loop.start()
    be.start()
    drv = VhostUserBlkDriver(be.socket_path or "", ram=16 << 20, queue_size=64, reconnect=False)
    try:
        drv.connect(wait=30)
        wl = BlkVerifyWorkload(drv, depth=4, nblocks=64, read_ratio=0.5, reap_inline=reap_inline)
        wl.prefill()
        before = drv.thread_reaps
        wl.run(1.0)
        r = wl.result()
        assert r["error_count"] == 0 and r["ops"] > 50, r["errors"]
        # (inline: at most a last call written after the queue thread had already reaped its
        # request, taken once the completion thread has the queue back)
        if reap_inline:
            assert drv.thread_reaps - before <= 1
        else:
            assert drv.thread_reaps - before >= 10
        assert drv.io(BLK_T_IN, 0, 512)[0] == BLK_S_OK  # the completion thread has the queue back
    finally:
        drv.close()
        be.stop()
        loop.stop()
        dev.close()
