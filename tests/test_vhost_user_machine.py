"""A kickcall machine whose virtio-blk queues a vhost-user back-end serves: qemu-storage-daemon,
or kickcall's own back-end in another process."""

from __future__ import annotations

import os
import signal

import pytest

from helpers import all_threads_stopped, guest_irq_count, guest_vector_of, running_machine, start_vhost_user_blk, \
    stop_process, vhost_toml, \
    wait_for
from kickcall.peers.qsd import QSD
from kickcall.virtio.blk import make_image

pytestmark = pytest.mark.slow


def _blk(results):
    (r,) = [x for x in results if x["kind"] == "blk"]
    return r


def test_machine_blk_served_by_qemu_storage_daemon_several_queues(workdir):
    img = os.path.join(workdir, "d.img")
    make_image(img, 16 << 20)
    with QSD(img, os.path.join(workdir, "vu.sock"), num_queues=3, qmp_path=os.path.join(workdir, "qsd.qmp")) as qsd:
        with running_machine(vhost_toml(qsd.sock_path, queues=3, vcpus=3)) as m:
            p = m.device("vblk")
            assert p.vdev.started_backend and p.ioeventfd_grabbed == 1
            m.start_workload(blk={"depth": 12, "read_ratio": 0.5})
            wait_for(lambda: m.vm.stats.globals()["irqfd_injections"] > 3000, 60, "I/O through QSD")
            r = _blk(m.stop_workload())
            assert r["error_count"] == 0, r["errors"]
            assert r["reads"] > 0 and r["writes"] > 0
            # the VMM is not in the path: kicks went from the guest's ioeventfd into QSD's eventfds and
            # calls from QSD's eventfds through irqfds; each queue's notifiers moved
            notify = p.bars[4].mapped_at + 0x3000
            for q in p.vdev.queues:
                st = m.vm.ioeventfd_stats("memory", notify + 4 * q.index, 0, None, q.host_notifier)
                assert st["hits"] > 0 and st["last_pid"] == m.guest_pid  # guest doorbell -> QSD's eventfd
                assert q.guest_notifier is not None and p.queue_state(q.index).irqfd
            # the VMM never handled a kick itself (its only writes: the start kick of each ring), and
            # counts every one of QSD's through the hypervisor
            assert all(set(q.kicks_by_path) <= {"vhost-start"} for q in p.vdev.queues), \
                [q.kicks_by_path for q in p.vdev.queues]
            counted = m.counters()["devices"]["vblk"]["queues"]
            assert all(c["kicks-by-path"].get("vhost-user", 0) > 0 for c in counted), counted
            assert "SET_VRING_ENABLE" in p.vdev.fe.sent
        assert qsd.stop() == 0


def test_vector_masked_in_a_tight_loop_without_pending_delivery_loses_completions(workdir):
    """The same loop with the PBA's delivery on unmask switched off: a call that landed while the
    vector was masked is never delivered and the guest's requests stall."""
    img = os.path.join(workdir, "d.img")
    make_image(img, 16 << 20)
    sock = os.path.join(workdir, "s")
    be = start_vhost_user_blk(sock, img, "--io-delay-ms", "2")
    try:
        with running_machine(vhost_toml(sock)) as m:
            p = m.device("vblk")
            q = p.vdev.queues[0]
            slot = m.slot("vblk")
            p.msix.deliver_pending_on_unmask = False
            m.start_workload(blk={"depth": 8, "read_ratio": 0.5, "stall_timeout": 3.0})
            for _ in range(40):
                m.guest_cmd({"cmd": "msix-mask", "slot": slot, "entry": q.vector, "masked": True, "cpu": 1})
                m.guest_cmd({"cmd": "msix-mask", "slot": slot, "entry": q.vector, "masked": False, "cpu": 1})
                if any(saw for _qi, saw in p.mask_windows):
                    break
            r = _blk(m.stop_workload())
            assert any(saw for _qi, saw in p.mask_windows), "no masked window caught a call"
            assert r["error_count"] > 0 and "stalled" in " ".join(r["errors"])
    finally:
        stop_process(be)


def test_vector_masked_in_a_tight_loop_loses_no_completion(workdir):
    """The guest completes requests only from its interrupt handler while the queue's vector is
    masked and unmasked in a loop: each mask switches the back-end to the masked notifier, each
    unmask back; every window that saw a call ends with exactly one delivery."""
    img = os.path.join(workdir, "d.img")
    make_image(img, 16 << 20)
    sock = os.path.join(workdir, "s")
    be = start_vhost_user_blk(sock, img, "--io-delay-ms", "2")
    try:
        with running_machine(vhost_toml(sock)) as m:
            p = m.device("vblk")
            q = p.vdev.queues[0]
            slot = m.slot("vblk")
            vec = guest_vector_of(m, "vblk", q.vector)
            m.start_workload(blk={"depth": 8, "read_ratio": 0.5, "stall_timeout": 20.0})
            sent0, delivered0 = p.msix.sent[q.vector], p.msix.unmask_delivered[q.vector]
            for _ in range(40):
                m.guest_cmd({"cmd": "msix-mask", "slot": slot, "entry": q.vector, "masked": True, "cpu": 1})
                assert p.vdev._call_state[q.index] is True
                m.guest_cmd({"cmd": "msix-mask", "slot": slot, "entry": q.vector, "masked": False, "cpu": 1})
            r = _blk(m.stop_workload())
            assert r["error_count"] == 0, r["errors"]
            assert r["ops"] > 50
            windows = [saw for qi, saw in p.mask_windows if qi == q.index]
            assert len(windows) == 40
            with_calls = sum(windows)
            assert with_calls > 0, "no masked window caught a call"
            # exactly one delivery per window that saw a call (the PBA bit, delivered on unmask)
            assert p.msix.unmask_delivered[q.vector] - delivered0 == with_calls
            assert p.msix.sent[q.vector] - sent0 == with_calls
            assert not p.msix.is_pending(q.vector)
            assert guest_irq_count(m, vec) > 0
            msgs = p.vdev.fe.sent
            assert msgs.count("SET_VRING_CALL") >= 2 * 40
    finally:
        stop_process(be)


@pytest.mark.parametrize("inflight", [True, False], ids=["inflight-shmfd", "fix-off"])
def test_backend_crash_under_a_running_guest(workdir, inflight):
    """SIGKILL the back-end while the guest's workload has requests in it; start a new one; the
    device notices, reconnects, hands the inflight region back and the workload's checks pass.
    Without INFLIGHT_SHMFD the requests the dead back-end had taken are lost or redone wrongly."""
    img = os.path.join(workdir, "d.img")
    make_image(img, 16 << 20)
    sock = os.path.join(workdir, "s")
    be = start_vhost_user_blk(sock, img, "--io-delay-ms", "30")
    be2 = None
    try:
        with running_machine(vhost_toml(sock, inflight=inflight)) as m:
            p = m.device("vblk")
            q = p.vdev.queues[0]
            m.start_workload(blk={"depth": 12, "read_ratio": 0.5, "stall_timeout": 15.0})

            def taken():
                used = m.memory.read_u16(q.used + 2)
                avail_event = m.memory.read_u16(q.used + 4 + 8 * q.num)
                n = (avail_event - used) & 0xFFFF
                return n if n >= 6 else 0

            slot = m.slot("vblk")

            def stopped_out_of_order():
                """Stop the back-end while it holds requests; keep it stopped (then kill it) only if
                its completions are out of order, so a restart from used.idx cannot be exact."""
                if not taken():
                    return None
                os.kill(be.pid, signal.SIGSTOP)
                wait_for(lambda: all_threads_stopped(be.pid), 10, "the back-end to stop")
                view = m.guest_cmd({"cmd": "vq-restart-view", "slot": slot, "queue": 0})
                if view["exact"] or len(view["outstanding"]) < 6:
                    os.kill(be.pid, signal.SIGCONT)
                    return None
                return view

            at_stop = wait_for(stopped_out_of_order, 60, "requests in flight, completed out of order")
            os.kill(be.pid, signal.SIGKILL)
            be.wait(10)
            at_death = m.guest_cmd({"cmd": "vq-restart-view", "slot": slot, "queue": 0})
            assert not at_death["exact"], (at_stop, at_death)  # the hard case: a prefix would be easy
            wait_for(lambda: p.vdev.disconnects == 1, 10, "the device to notice")
            be2 = start_vhost_user_blk(sock, img)
            if inflight:
                wait_for(lambda: p.vdev.reconnects == 1, 30, "the reconnect")
                inj = m.vm.stats.globals()["irqfd_injections"]
                wait_for(lambda: m.vm.stats.globals()["irqfd_injections"] > inj + 20, 60,
                         "I/O to go on after the reconnect")
            res = _blk(m.stop_workload(timeout=60))
            if inflight:
                assert res["error_count"] == 0, res["errors"]
            else:
                assert res["error_count"] > 0
    finally:
        stop_process(be)
        if be2 is not None:
            stop_process(be2)


def test_qsd_reconnect_when_idle(workdir):
    """qemu-storage-daemon has no INFLIGHT_SHMFD: a reconnect is exact only when the queues are
    idle.  Restart QSD between two bursts of I/O; the second burst works."""
    img = os.path.join(workdir, "d.img")
    make_image(img, 16 << 20)
    sockp = os.path.join(workdir, "vu.sock")
    qsd = QSD(img, sockp, num_queues=1, qmp_path=os.path.join(workdir, "q1"))
    qsd.start()
    qsd2 = None
    try:
        with running_machine(vhost_toml(sockp)) as m:
            p = m.device("vblk")
            slot = m.slot("vblk")
            assert not p.vdev.fe.has_pf(12), "QSD offers no INFLIGHT_SHMFD"
            r = m.guest_cmd({"cmd": "blk-io", "slot": slot, "op": "write", "sector": 40, "nbytes": 4096, "fill": 7})
            assert r["status"] == 0
            assert qsd.stop() == 0
            wait_for(lambda: p.vdev.disconnects == 1, 10, "the device to notice")
            qsd2 = QSD(img, sockp, num_queues=1, qmp_path=os.path.join(workdir, "q2"))
            qsd2.start()
            wait_for(lambda: p.vdev.reconnects == 1, 30, "the reconnect")
            r = m.guest_cmd({"cmd": "blk-io", "slot": slot, "op": "read", "sector": 40, "nbytes": 4096})
            assert r["status"] == 0 and bytes.fromhex(r["data"]) == bytes([7]) * 4096
    finally:
        qsd.stop()
        if qsd2 is not None:
            qsd2.stop()


def test_backend_config_change_goes_through_the_config_vector(workdir):
    """CONFIG_CHANGE_MSG from the back-end: the device re-reads its config and raises the config
    interrupt through the config vector -- pended in the PBA while that vector is masked, and
    delivered once when it is unmasked."""
    from kickcall.loop import IOThread
    from kickcall.vhost_user.backend import VhostUserBackend
    from kickcall.virtio.blk import VirtIOBlk

    img = os.path.join(workdir, "d.img")
    make_image(img, 16 << 20)
    loop = IOThread("be")
    dev = VirtIOBlk("b", img, queue_size=1024, aio="auto", loop=loop)
    be = VhostUserBackend(dev, socket_path=os.path.join(workdir, "s"), loop=loop)
    loop.start()
    be.start()
    try:
        with running_machine(vhost_toml(os.path.join(workdir, "s"))) as m:
            p = m.device("vblk")
            slot = m.slot("vblk")
            cv = p.config_vector
            assert cv != 0xFFFF and p.vdev.fe.has_pf(5)  # BACKEND_REQ negotiated
            before = m.guest_cmd({"cmd": "status-read", "slot": slot})["config_changes"]
            # the disk grows: the back-end's config changes and it tells the front-end
            with open(img, "r+b") as f:
                f.truncate(32 << 20)
            dev.capacity = (32 << 20) // 512
            from kickcall.virtio.blk import blk_config

            dev._config = blk_config(dev.capacity, 1)
            assert loop.run_sync(be.send_config_change)
            wait_for(lambda: m.guest_cmd({"cmd": "status-read", "slot": slot})["config_changes"] == before + 1, 20,
                     "the guest's config interrupt")
            assert int.from_bytes(p.vdev.config[:8], "little") == 65536
            # again with the config vector masked: the PBA holds it until the unmask
            m.guest_cmd({"cmd": "msix-mask", "slot": slot, "entry": cv, "masked": True})
            assert loop.run_sync(be.send_config_change)
            wait_for(lambda: p.msix.is_pending(cv), 20, "the PBA bit")
            assert m.guest_cmd({"cmd": "status-read", "slot": slot})["config_changes"] == before + 1
            m.guest_cmd({"cmd": "msix-mask", "slot": slot, "entry": cv, "masked": False})
            wait_for(lambda: m.guest_cmd({"cmd": "status-read", "slot": slot})["config_changes"] == before + 2, 20,
                     "delivery on unmask")
            assert not p.msix.is_pending(cv)
    finally:
        be.stop()
        loop.stop()
        dev.close()
