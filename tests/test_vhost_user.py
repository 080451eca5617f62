"""vhost-user: kickcall's front-end against kickcall's back-end and against qemu-storage-daemon."""

from __future__ import annotations

import os
import signal
import threading

import pytest

from helpers import all_threads_stopped, start_vhost_user_blk, stop_process, wait_for
from kickcall.drive.vhost_user_blk import BlkVerifyWorkload, VhostUserBlkDriver, run_test
from kickcall.virtio.blk import make_image

pytestmark = pytest.mark.slow




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

        def stopped_taken_and_out_of_order():
            """Stop the back-end when it holds >= 8 requests and has completed out of order; keep it
            stopped (then kill it) only if that still holds once it cannot move any more."""
            _avail, avail_event, used = drv.in_flight(0)
            if (avail_event - used) & 0xFFFF < 8 or not drv.out_of_order_now(0):
                return 0
            os.kill(be.pid, signal.SIGSTOP)
            wait_for(lambda: all_threads_stopped(be.pid), 10, "the back-end to stop")
            _avail, avail_event, used = drv.in_flight(0)
            n = (avail_event - used) & 0xFFFF
            if n < 8 or drv.vqs[0].restart_view()["exact"]:
                os.kill(be.pid, signal.SIGCONT)
                return 0
            return n

        at_kill = wait_for(stopped_taken_and_out_of_order, 30, ">= 8 requests in flight, completed out of order")
        os.kill(be.pid, signal.SIGKILL)
        be.wait(10)
        avail, avail_event, used = drv.in_flight(0)
        in_flight_at_death = (avail_event - used) & 0xFFFF
        assert in_flight_at_death >= 8, (at_kill, avail, avail_event, used)
        # at the moment of death the completed requests were not a prefix of the ring
        assert drv.out_of_order_now(0), "completions were in order at the kill: the test proves nothing"
        assert not drv.vqs[0].restart_view()["exact"], "a restart from used.idx would be exact: proves nothing"
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


def _cli(*args: str, timeout: float = 120):
    import subprocess

    from helpers import kickcall_argv, SRC

    env = dict(os.environ, PYTHONPATH=SRC)
    return subprocess.run(kickcall_argv(*args), capture_output=True, text=True, timeout=timeout, env=env,
                          stdin=subprocess.DEVNULL)


def test_vhost_user_test_cli_against_qemu_storage_daemon(workdir):
    from kickcall.peers.qsd import QSD

    img = os.path.join(workdir, "d.img")
    make_image(img, 16 << 20)
    with QSD(img, os.path.join(workdir, "vu.sock"), num_queues=2, qmp_path=os.path.join(workdir, "q")) as qsd:
        r = _cli("vhost-user-test", "--socket", qsd.sock_path, "--queues", "2", "--duration", "2")
        assert qsd.stop() == 0
    assert r.returncode == 0, r.stdout + r.stderr
    assert "serial 'vhost_user_blk'" in r.stdout and "2 queue(s)" in r.stdout
    assert "errors: 0" in r.stdout and "IOPS" in r.stdout and "p99" in r.stdout


def test_vhost_user_test_cli_against_kickcall_backend_and_a_failing_one(workdir):
    img = os.path.join(workdir, "d.img")
    make_image(img, 16 << 20)
    sock = os.path.join(workdir, "s")
    be = start_vhost_user_blk(sock, img, "--num-queues", "2")
    try:
        r = _cli("vhost-user-test", "--socket", sock, "--queues", "2", "--duration", "2", "--json")
    finally:
        stop_process(be)
    assert r.returncode == 0, r.stdout + r.stderr
    import json

    doc = json.loads(r.stdout)
    assert doc["error-count"] == 0 and doc["ops"] > 100 and doc["queues"] == 2
    # a read-only back-end fails every write: the tool reports it and exits non-zero
    sock2 = os.path.join(workdir, "ro")
    be = start_vhost_user_blk(sock2, img, "--read-only")
    try:
        r = _cli("vhost-user-test", "--socket", sock2, "--duration", "1")
    finally:
        stop_process(be)
    assert r.returncode == 1 and "prefill of block 0 failed with status 1" in r.stderr
    r = _cli("vhost-user-test", "--socket", os.path.join(workdir, "nothing"), "--connect-wait", "0.2")
    assert r.returncode == 1 and "cannot connect" in r.stderr
    r = _cli("vhost-user-test", "--socket", sock, "--block-size", "1000")
    assert r.returncode == 2


def test_memory_table_changes_while_rings_run(workdir):
    """A new SET_MEM_TABLE while the rings run (QEMU sends one), and an extra region added and
    removed with ADD_MEM_REG / REM_MEM_REG: the workload goes on with every check passing."""
    from kickcall.loop import IOThread
    from kickcall.memory import RamBlock
    from kickcall.vhost_user.backend import VhostUserBackend
    from kickcall.vhost_user.device import USER_BASE
    from kickcall.vhost_user.protocol import SINGLE_MEM_REGION, FrontendReq, MemRegion, ProtocolFeature
    from kickcall.virtio.blk import VirtIOBlk

    img = os.path.join(workdir, "d.img")
    make_image(img, 8 << 20)
    loop = IOThread("be")
    dev = VirtIOBlk("b", img, queue_size=1024, aio="threads", loop=loop)
    be = VhostUserBackend(dev, socket_path=os.path.join(workdir, "s"), loop=loop)
    loop.start()
    be.start()
    drv = VhostUserBlkDriver(os.path.join(workdir, "s"))
    extra = RamBlock(1 << 20, "extra")
    try:
        drv.connect(wait=10)
        assert drv.fe.has_pf(ProtocolFeature.CONFIGURE_MEM_SLOTS) is False  # the driver did not ask for it
        wl = BlkVerifyWorkload(drv, depth=8, nblocks=64, stall_timeout=20)
        wl.prefill()
        t = threading.Thread(target=wl.run, args=(3.0,), daemon=True)
        t.start()
        regions, fds = drv.mem.layout()
        mr = [MemRegion(r["gpa"], r["size"], USER_BASE + r["gpa"], r["block_offset"]) for r in regions]
        for _ in range(5):
            drv.fe.set_mem_table(mr, [fds[r["block"]] for r in regions])
        t.join(60)
        assert not t.is_alive()
        res = wl.result()
        assert res["error_count"] == 0, res["errors"]
        assert be.message_counts["SET_MEM_TABLE"] == 6 and be.protocol_errors == 0
    finally:
        drv.close()
    # ADD_MEM_REG / REM_MEM_REG, on a front-end that negotiates CONFIGURE_MEM_SLOTS
    from kickcall.vhost_user.frontend import VhostUserFrontend

    fe = VhostUserFrontend(os.path.join(workdir, "s"), timeout=5)
    try:
        wait_for(lambda: be.conn is None, 10, "the first front-end to go")
        fe.connect(wait=5)
        fe.get_features()
        fe.set_protocol_features((1 << ProtocolFeature.REPLY_ACK) | (1 << ProtocolFeature.CONFIGURE_MEM_SLOTS))
        assert fe.get_u64(FrontendReq.GET_MAX_MEM_SLOTS) == 8
        reg = MemRegion(0x4000_0000, 1 << 20, 0x7E00_0000_0000, 0)
        fe.request(FrontendReq.ADD_MEM_REG, SINGLE_MEM_REGION.pack(0, *reg.pack_fields()), [extra.fd])
        wait_for(lambda: be.memory is not None and len(be.memory.user_regions) == 1, 5, "the region")
        assert be.memory.uva_to_gpa(0x7E00_0000_0000 + 4096, 16) == 0x4000_0000 + 4096
        fe.request(FrontendReq.REM_MEM_REG, SINGLE_MEM_REGION.pack(0, *reg.pack_fields()))
        assert be.memory.user_regions == []
        assert be.protocol_errors == 0
    finally:
        fe.close()
        extra.close()
        be.stop()
        loop.stop()
        dev.close()


def test_backend_serves_a_listening_fd_it_was_given(workdir):
    """libvirt's way: it creates the listening socket and hands the back-end its fd (--fd)."""
    import socket

    from helpers import kickcall_argv, spawn

    img = os.path.join(workdir, "d.img")
    make_image(img, 8 << 20)
    path = os.path.join(workdir, "lv.sock")
    ls = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    ls.bind(path)
    ls.listen(1)
    be = spawn(kickcall_argv("vhost-user-blk", "--fd", str(ls.fileno()), "--blk-file", img), pass_fds=[ls.fileno()])
    ls.close()
    try:
        r = run_test(path, duration=1, depth=4)
        assert r["error_count"] == 0 and r["ops"] > 0
    finally:
        assert stop_process(be) == 0
    r = _cli("vhost-user-blk", "--print-capabilities")
    assert r.returncode == 0 and json_loads(r.stdout) == {"type": "block", "features": ["blk-file", "read-only"]}
    r = _cli("vhost-user-blk", "--socket-path", os.path.join(workdir, "x.sock"))
    assert r.returncode == 2 and "--blk-file is required" in r.stderr


def json_loads(s: str):
    import json

    return json.loads(s)
