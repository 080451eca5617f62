"""vhost-user: kickcall's front-end against kickcall's back-end and against qemu-storage-daemon."""

from __future__ import annotations

import os
import signal
import tempfile
import threading

import pytest

from helpers import start_vhost_user_blk, stop_process, wait_for
from kickcall.drive.vhost_user_blk import BlkVerifyWorkload, VhostUserBlkDriver, run_test
from kickcall.virtio.blk import make_image

pytestmark = pytest.mark.slow


@pytest.fixture
def workdir():
    d = tempfile.mkdtemp(prefix="kc")  # short: Unix socket paths must stay under 108 bytes
    yield d
    for f in os.listdir(d):
        os.unlink(os.path.join(d, f))
    os.rmdir(d)


QEMU_72_REALIZE = ["GET_FEATURES", "GET_PROTOCOL_FEATURES", "SET_PROTOCOL_FEATURES", "GET_QUEUE_NUM", "SET_OWNER",
                   "GET_FEATURES"]


def test_frontend_against_kickcall_backend_in_qemus_order(workdir):
    img = os.path.join(workdir, "d.img")
    make_image(img, 8 << 20)
    sock = os.path.join(workdir, "s")
    be = start_vhost_user_blk(sock, img, "--num-queues", "2")
    try:
        r = run_test(sock, duration=2, queues=2, depth=16)
    finally:
        assert stop_process(be) == 0
    assert r["error_count"] == 0, r["errors"]
    assert r["ops"] > 500 and r["reads"] and r["writes"]
    assert r["serial"] == "d.img" and r["capacity_sectors"] == 16384
    m = r["messages"]
    assert m[:6] == QEMU_72_REALIZE
    # realize: call and err fds per queue, then the config; start: inflight, features, memory, rings
    assert m[6:10] == ["SET_VRING_CALL", "SET_VRING_ERR"] * 2 and m[10] == "GET_CONFIG"
    start = m[11:]
    assert start[:4] == ["GET_INFLIGHT_FD", "SET_INFLIGHT_FD", "SET_FEATURES", "SET_MEM_TABLE"]
    per_q = ["SET_VRING_NUM", "SET_VRING_BASE", "SET_VRING_ADDR", "SET_VRING_KICK", "SET_VRING_CALL"]
    assert start[4:14] == per_q * 2 and start[14:16] == ["SET_VRING_ENABLE"] * 2


@pytest.mark.parametrize("inflight", [True, False], ids=["inflight-shmfd", "fix-off"])
def test_backend_sigkill_with_requests_in_flight_loses_nothing(workdir, inflight):
    """SIGKILL the back-end while >= 8 requests it took are in flight and completions have come
    out of order; restart it; the workload ends with nothing lost, duplicated or corrupted.
    Without INFLIGHT_SHMFD the restarted back-end cannot know what was in flight: it fails."""
    img = os.path.join(workdir, "d.img")
    make_image(img, 16 << 20)
    sock = os.path.join(workdir, "s")
    be = start_vhost_user_blk(sock, img, "--io-delay-ms", "40")
    drv = VhostUserBlkDriver(sock, queue_size=64, use_inflight=inflight, reconnect_wait=60)
    be2 = None
    try:
        drv.connect(wait=10)
        wl = BlkVerifyWorkload(drv, depth=16, nblocks=128, stall_timeout=30 if inflight else 10)
        wl.prefill()
        t = threading.Thread(target=wl.run, args=(8.0,), daemon=True)
        t.start()

        def taken_and_out_of_order():
            _avail, avail_event, used = drv.in_flight(0)
            n = (avail_event - used) & 0xFFFF
            return n if n >= 8 and drv.out_of_order > 0 else 0

        at_kill = wait_for(taken_and_out_of_order, 30, ">= 8 requests in flight in the back-end")
        os.kill(be.pid, signal.SIGKILL)
        be.wait(10)
        avail, avail_event, used = drv.in_flight(0)
        in_flight_at_death = (avail_event - used) & 0xFFFF
        assert in_flight_at_death >= 8, (at_kill, avail, avail_event, used)
        be2 = start_vhost_user_blk(sock, img)
        t.join(120)
        assert not t.is_alive()
        res = wl.result()
        if inflight:
            assert drv.reconnects == 1
            assert res["error_count"] == 0, res["errors"]
            assert res["duplicates"] == 0
            assert res["ops"] > 100
            assert drv.error is None
        else:
            assert res["error_count"] > 0 or drv.error, "without inflight tracking the reconnect cannot be exact"
    finally:
        drv.close()
        stop_process(be)
        if be2 is not None:
            stop_process(be2)
