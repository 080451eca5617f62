"""The ioeventfd lifecycle of seed 002, driven by real writes from the guest process.

For each lifecycle event the guest's vCPU writes the queue's notify register and the test asserts
which path the write took -- a lightweight exit (an ioeventfd hit, counted by the hypervisor with
the writer's PID and TID) or a heavyweight exit (the VMM's MMIO handler ran; the exit message
carries the writer's PID and TID) -- and that the PID is the guest's, not the VMM's.
"""

from __future__ import annotations

import os
import threading

import pytest

from helpers import blk, machine_toml, running_machine, wait_for
from kickcall.virtio.pci import ProxyHook

pytestmark = pytest.mark.slow

ACK, DRIVER, DRIVER_OK, FEATURES_OK = 1, 2, 4, 8


def kick(m, dev: str = "blk0", queue: int = 0, cpu: int = 0) -> dict:
    """Have the guest write queue *queue*'s doorbell; return what the hypervisor saw."""
    p = m.device(dev)
    q = p.vdev.queues[queue]
    n = q.host_notifier
    light0 = m.vm.stats.globals()["ioeventfd_writes"]
    heavy0 = m.vm.exit_counts.get("mmio-write", 0)
    rep = m.guest_cmd({"cmd": "kick", "slot": m.slot(dev), "queue": queue, "cpu": cpu})
    out = {
        "rep": rep,
        "light": m.vm.stats.globals()["ioeventfd_writes"] - light0,
        "heavy": m.vm.exit_counts.get("mmio-write", 0) - heavy0,
        "notifier": n,
    }
    if n is not None:
        out["slot_stats"] = m.vm.ioeventfd_stats("memory", rep["addr"], 0, None, n)
    out["last_exit"] = m.vm.last_exit.get(cpu)
    return out


def assert_lightweight(m, k: dict) -> None:
    assert k["light"] == 1 and k["heavy"] == 0, k
    st = k["slot_stats"]
    assert st is not None
    assert st["last_pid"] == k["rep"]["pid"] == m.guest_pid != os.getpid()
    assert st["last_tid"] == k["rep"]["tid"]


def assert_heavyweight(m, k: dict) -> None:
    assert k["heavy"] == 1 and k["light"] == 0, k
    pid, tid = k["last_exit"]
    assert pid == k["rep"]["pid"] == m.guest_pid != os.getpid()
    assert tid == k["rep"]["tid"]


def path_count(q, path: str) -> int:
    return q.kicks_by_path.get(path, 0)


TOML = machine_toml(devices=blk("blk0") + blk("blkoff", ioeventfd=False))


def test_driver_ok_starts_ioeventfd_and_kicks_are_lightweight():
    with running_machine(TOML) as m:
        p = m.device("blk0")
        q = p.vdev.queues[0]
        assert p.vdev.status & DRIVER_OK and p.ioeventfd_started and q.host_notifier is not None
        before = path_count(q, "ioeventfd")
        k = kick(m)
        assert_lightweight(m, k)
        wait_for(lambda: path_count(q, "ioeventfd") == before + 1, what="the IOThread to take the kick")
        assert path_count(q, "mmio") == 0


@pytest.mark.parametrize("status", [ACK | DRIVER | FEATURES_OK, ACK, 0])
def test_status_without_driver_ok_stops_ioeventfd(status):
    with running_machine(TOML) as m:
        p = m.device("blk0")
        q = p.vdev.queues[0]
        old = q.host_notifier
        m.guest_cmd({"cmd": "status-write", "slot": m.slot("blk0"), "value": status})
        assert not p.ioeventfd_started and q.host_notifier is None and old.closed
        assert p.vdev.status == status
        k = kick(m)
        assert_heavyweight(m, k)
        assert path_count(q, "mmio") == 1
        if status == 0:  # a reset: the queue itself is gone too
            assert q.desc == 0 and not q.enabled


def test_bus_master_off_stops_ioeventfd_and_clears_driver_ok_until_a_new_driver_ok():
    with running_machine(TOML) as m:
        p = m.device("blk0")
        slot = m.slot("blk0")
        m.guest_cmd({"cmd": "bus-master", "slot": slot, "on": False})
        assert not p.ioeventfd_started and not p.vdev.status & DRIVER_OK
        assert_heavyweight(m, kick(m))
        # turning bus mastering back on does not restart it ...
        m.guest_cmd({"cmd": "bus-master", "slot": slot, "on": True})
        assert not p.ioeventfd_started
        assert_heavyweight(m, kick(m))
        # ... a new DRIVER_OK does
        m.guest_cmd({"cmd": "reprobe", "slot": slot})
        assert p.ioeventfd_started and p.vdev.status & DRIVER_OK
        assert_lightweight(m, kick(m))
        r = m.guest_cmd({"cmd": "blk-io", "slot": slot, "op": "read", "sector": 0, "nbytes": 512})
        assert r["status"] == 0 and bytes.fromhex(r["data"]).startswith(b"SECTOR0000000000")


def test_pause_parks_the_vcpu_and_resume_restarts_ioeventfd():
    with running_machine(TOML) as m:
        p = m.device("blk0")
        q = p.vdev.queues[0]
        m.pause()
        assert not p.ioeventfd_started and q.host_notifier is None
        pauses0 = m.vm.stats.vcpu(0)["pauses"]
        light0 = m.vm.stats.globals()["ioeventfd_writes"]
        heavy0 = m.vm.exit_counts.get("mmio-write", 0)
        box: dict = {}
        t = threading.Thread(target=lambda: box.update(
            rep=m.guest_cmd({"cmd": "kick", "slot": m.slot("blk0"), "queue": 0, "cpu": 0})))
        t.start()
        try:
            # the guest thread reached its vCPU's pause point and parked there: no write happened
            wait_for(lambda: m.vm.stats.vcpu(0)["pauses"] > pauses0, what="the vCPU to park")
            assert t.is_alive()
            assert m.vm.stats.globals()["ioeventfd_writes"] == light0
            assert m.vm.exit_counts.get("mmio-write", 0) == heavy0
        finally:
            m.resume()
            t.join(30)
        assert p.ioeventfd_started and q.host_notifier is not None
        # the write that was held by the pause went through the restarted ioeventfd
        assert m.vm.stats.globals()["ioeventfd_writes"] == light0 + 1
        assert m.vm.exit_counts.get("mmio-write", 0) == heavy0
        st = m.vm.ioeventfd_stats("memory", box["rep"]["addr"], 0, None, q.host_notifier)
        assert st["last_pid"] == m.guest_pid != os.getpid()
        assert_lightweight(m, kick(m))


def test_ioeventfd_off_makes_every_kick_heavyweight():
    with running_machine(TOML) as m:
        p = m.device("blkoff")
        q = p.vdev.queues[0]
        assert p.vdev.status & DRIVER_OK and not p.ioeventfd_started and q.host_notifier is None
        k = kick(m, "blkoff")
        assert_heavyweight(m, k)
        assert path_count(q, "mmio") == 1
        r = m.guest_cmd({"cmd": "blk-io", "slot": m.slot("blkoff"), "op": "read", "sector": 3, "nbytes": 512})
        assert r["status"] == 0 and bytes.fromhex(r["data"]).startswith(b"SECTOR0000000003")
        assert path_count(q, "mmio") >= 2 and path_count(q, "ioeventfd") == 0


def test_grab_release_hands_the_host_notifiers_over_and_back():
    with running_machine(TOML) as m:
        p = m.device("blk0")
        q = p.vdev.queues[0]
        slot = m.slot("blk0")
        with m.bql:
            p.grab_ioeventfd()
        assert q.host_notifier is None and p.ioeventfd_started
        # nobody holds the notifiers: the guest's kick is a heavyweight exit the device ignores
        grabbed0 = p.kicks_while_grabbed
        rep = m.guest_cmd({"cmd": "blk-submit", "slot": slot, "op": "read", "sector": 5, "nbytes": 512})
        assert rep["kicked"]
        assert p.kicks_while_grabbed == grabbed0 + 1 and m.vm.last_exit[0][0] == m.guest_pid
        assert q.pushed == 0
        # the grabber (vhost) takes a host notifier: the guest's kick is lightweight, into its eventfd
        with m.bql:
            n = p.set_host_notifier(q, True)
        k = kick(m)
        assert_lightweight(m, k)
        assert n.peek() == 1 and q.pushed == 0
        n.test_and_clear()  # the "backend" consumed it
        with m.bql:
            p.set_host_notifier(q, False)
            p.release_ioeventfd()  # ours again: restart, and scan each ring once
        w = m.guest_cmd({"cmd": "blk-wait", "id": rep["id"], "timeout": 20})
        assert w["completed"] and w["status"] == 0
        assert q.kicks_by_path.get("release-scan", 0) >= 1
        assert_lightweight(m, kick(m))


@pytest.mark.parametrize("fix", [True, False], ids=["test-and-clear", "fix-off"])
def test_deassign_race_kick_between_deassign_and_test_and_clear(fix):
    """A kick that landed in the host notifier but was not handled yet when the notifier is
    deassigned (seed 002): the test-and-clear after the deassign finds it and the request is
    processed on resume.  With the fix switched off the kick is lost with the closed notifier."""
    with running_machine(TOML) as m:
        p = m.device("blk0")
        q = p.vdev.queues[0]
        slot = m.slot("blk0")
        p.vdev.faults.set_fix("deassign-test-and-clear", fix)
        seen: dict = {}

        def after_deassign(qq):
            if qq is q:
                seen["pending"] = qq.host_notifier.peek()

        p.hooks[ProxyHook.AFTER_DEASSIGN] = after_deassign
        hits0 = p.deassign_hits
        with m.bql:  # the main loop cannot run the notifier's handler while we hold the big lock
            rep = m.guest_cmd({"cmd": "blk-submit", "slot": slot, "op": "read", "sector": 9, "nbytes": 512,
                               "cpu": 1})
            assert rep["kicked"]
            wait_for(lambda: q.host_notifier.peek() == 1, what="the kick to land in the eventfd")
            m.pause()  # vCPUs stopped; host notifiers stopped: handler off, deassign, test-and-clear
        assert seen["pending"] == 1, "the kick must sit in the notifier between deassign and test-and-clear"
        m.resume()
        if fix:
            assert p.deassign_hits == hits0 + 1
            w = m.guest_cmd({"cmd": "blk-wait", "id": rep["id"], "timeout": 20})
            assert w["completed"] and w["status"] == 0
        else:
            assert p.deassign_hits == hits0
            w = m.guest_cmd({"cmd": "blk-wait", "id": rep["id"], "timeout": 2})
            assert not w["completed"], "without test-and-clear the kick is lost"
            assert q.pushed == 0


def test_calls_raised_while_paused_are_delivered_after_resume():
    from helpers import guest_irq_count, guest_vector_of

    with running_machine(TOML) as m:
        p = m.device("blk0")
        q = p.vdev.queues[0]
        vec = guest_vector_of(m, "blk0", q.vector)
        m.pause()
        n0 = guest_irq_count(m, vec)
        held0 = m.vm.stats.globals()["interrupts_held_while_paused"]
        with m.bql:
            p.notify_queue(q)  # the device calls (irqfd write) while the VM is paused
        wait_for(lambda: m.vm.stats.globals()["interrupts_held_while_paused"] > held0, what="the call to be held")
        assert guest_irq_count(m, vec) == n0
        m.resume()
        wait_for(lambda: guest_irq_count(m, vec) == n0 + 1, what="delivery after resume")
