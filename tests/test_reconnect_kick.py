"""A reconnected ring loses no kick: a back-end that read the guest's kick and died before it took
the request leaves a ring the guest will not kick again (avail_event says it already did).
kickcall's front-end hands the next back-end an already-signalled kick fd on every ring start;
kickcall's back-end kicks itself when a reconnect finds work on the ring.  Either half alone
completes the request; with both off it hangs."""

from __future__ import annotations

import os
import random
import signal
import time

import pytest

from helpers import running_machine, start_vhost_user_blk, stop_process, vhost_toml, wait_for, wait_for_listener
from kickcall.monitor.client import QMPClient
from kickcall.virtio.blk import make_image

pytestmark = pytest.mark.slow


def _backend_queue(qmp: str) -> dict:
    with QMPClient(qmp).connect(wait=30) as c:
        return c.execute("x-query-vhost-user-backend")["queues"][0]


@pytest.mark.parametrize("front,back", [(True, True), (True, False), (False, True), (False, False)],
                         ids=["both", "front-end-only", "back-end-only", "fix-off"])
def test_a_kick_the_dead_backend_consumed_is_replayed_after_the_reconnect(workdir, front, back):
    img = os.path.join(workdir, "d.img")
    make_image(img, 8 << 20)
    sock = os.path.join(workdir, "s")
    qmp = os.path.join(workdir, "be.qmp")
    knobs = () if back else ("--x-fix-off", "self-kick-after-reconnect")
    be = start_vhost_user_blk(sock, img, "--qmp", qmp, *knobs)
    be2 = None
    try:
        wait_for_listener(qmp, be)
        with running_machine(vhost_toml(sock)) as m:
            p = m.device("vblk")
            slot = m.slot("vblk")
            p.vdev.faults.set_fix("kick-on-start", front)
            assert m.guest_cmd({"cmd": "blk-io", "slot": slot, "op": "write", "sector": 8, "fill": 0x5A})["status"] == 0
            kicks = _backend_queue(qmp)["kicks"]
            with QMPClient(qmp).connect() as c:  # the back-end will read the next kick and not act on it
                (dev,) = c.execute("x-query-virtio")
                c.execute("x-debug-fault", {"dev": dev["path"], "queue": 0, "path": "kick", "action": "drop-next"})
            r = m.guest_cmd({"cmd": "blk-submit", "slot": slot, "op": "read", "sector": 8})
            assert r["kicked"]
            wait_for(lambda: _backend_queue(qmp)["kicks"] == kicks + 1, 30, "the back-end to read the kick")
            assert not m.guest_cmd({"cmd": "blk-wait", "id": r["id"], "timeout": 0.3})["completed"]
            start_kicks = p.vdev.start_kicks
            be.send_signal(signal.SIGKILL)
            be.wait(10)
            wait_for(lambda: p.vdev.disconnects == 1, 30, "the device to notice")
            be2 = start_vhost_user_blk(sock, img, *knobs)
            wait_for(lambda: p.vdev.reconnects == 1, 60, "the reconnect")
            done = m.guest_cmd({"cmd": "blk-wait", "id": r["id"], "timeout": 30.0 if front or back else 3.0},
                               timeout=60)
            if front or back:
                assert done["completed"] and done["status"] == 0, done
                assert (p.vdev.start_kicks > start_kicks) == front
            else:  # the hang the fix removes: published, never used, and nobody will kick
                assert not done["completed"], done
                q = p.vdev.queues[0]
                assert m.memory.read_u16(q.avail + 2) != m.memory.read_u16(q.used + 2)
    finally:
        stop_process(be)
        if be2 is not None:
            stop_process(be2)


def test_random_sigkills_under_verified_io_never_hang_and_lose_no_data(workdir):
    """The back-end is SIGKILLed at random moments under a verifying workload and restarted, over
    and over.  A round counts as hung when no I/O completes within a fixed time after the restart;
    after every restart the data written so far is verified by the workload's reads (and, at the
    end, by its final verify pass)."""
    img = os.path.join(workdir, "d.img")
    make_image(img, 8 << 20)
    sock = os.path.join(workdir, "s")
    rng = random.Random(int(os.environ.get("KICKCALL_SIGKILL_SEED", "7")))
    rounds = int(os.environ.get("KICKCALL_SIGKILL_ROUNDS", "30"))
    be = start_vhost_user_blk(sock, img, "--io-delay-ms", "3")
    hung = 0
    try:
        with running_machine(vhost_toml(sock)) as m:
            p = m.device("vblk")
            m.start_workload(blk={"depth": 8, "read_ratio": 0.5, "stall_timeout": 60.0})
            for n in range(rounds):
                inj = m.vm.stats.globals()["irqfd_injections"]
                wait_for(lambda: m.vm.stats.globals()["irqfd_injections"] > inj + 5, 60, "I/O before the kill")
                time.sleep(rng.uniform(0.0, 0.3))  # a random moment in the I/O stream (not a wait for an event)
                be.send_signal(signal.SIGKILL)
                be.wait(10)
                wait_for(lambda: p.vdev.disconnects == n + 1, 30, "the device to notice")
                be = start_vhost_user_blk(sock, img, "--io-delay-ms", "3")
                wait_for(lambda: p.vdev.reconnects == n + 1, 60, "the reconnect")
                inj = m.vm.stats.globals()["irqfd_injections"]
                try:
                    wait_for(lambda: m.vm.stats.globals()["irqfd_injections"] > inj + 5, 20,
                             "I/O after the restart")
                except AssertionError:
                    hung += 1
                    break
            res = [x for x in m.stop_workload(timeout=90) if x["kind"] == "blk"][0]
    finally:
        stop_process(be)
    assert hung == 0
    assert res["error_count"] == 0, res["errors"]
    assert res["ops"] > 0 and res["verified_at_end"] > 0


def test_data_a_guest_flushed_survives_a_sigkill_of_the_backend(workdir):
    """The guest writes, flushes (VIRTIO_BLK_T_FLUSH: the back-end fsyncs the image), and the
    back-end is SIGKILLed at once; the image holds every flushed byte.  (A process kill cannot tell
    fsync from the page cache -- only a power cut could -- so this guards against a back-end that
    completes writes before they reach the file, e.g. a write-back cache of its own.)"""
    img = os.path.join(workdir, "d.img")
    make_image(img, 8 << 20, pattern=False)
    sock = os.path.join(workdir, "s")
    be = start_vhost_user_blk(sock, img)
    try:
        with running_machine(vhost_toml(sock)) as m:
            slot = m.slot("vblk")
            want = {}
            for i in range(16):
                sector = 8 * (3 * i + 1)
                fill = (i * 37 + 11) & 0xFF
                assert m.guest_cmd({"cmd": "blk-io", "slot": slot, "op": "write", "sector": sector,
                                    "fill": fill})["status"] == 0
                want[sector] = fill
            assert m.guest_cmd({"cmd": "blk-io", "slot": slot, "op": "flush"})["status"] == 0
            be.send_signal(signal.SIGKILL)
            be.wait(10)
            with open(img, "rb") as f:
                for sector, fill in want.items():
                    f.seek(sector * 512)
                    assert f.read(4096) == bytes([fill]) * 4096, f"sector {sector}"
    finally:
        stop_process(be)
