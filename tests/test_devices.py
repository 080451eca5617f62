"""virtio-blk over several queues, virtio-net over several queue pairs (both backends), INTx mode,
FLR in the middle of I/O, and a corrupt ring reported to the guest as DEVICE_NEEDS_RESET."""

from __future__ import annotations

import os

import pytest

from helpers import blk, machine_toml, running_machine, wait_for

pytestmark = pytest.mark.slow

NET = """
[[device]]
type = "virtio-net"
id = "net0"
backend = "{backend}"
queue-pairs = {pairs}
"""


def _result(results: list[dict], kind: str) -> dict:
    (r,) = [x for x in results if x["kind"] == kind]
    return r


def _run(m, seconds_of_ops: int, blk_wl: dict | None = None, net_wl: dict | None = None) -> list[dict]:
    m.start_workload(blk=blk_wl, net=net_wl)
    # wait for work to happen rather than for time to pass
    if blk_wl is not None:
        wait_for(lambda: sum(q.pushed for p in m.devices.values() if p.vdev.type_name == "virtio-blk"
                             for q in p.vdev.queues) >= seconds_of_ops, timeout=60, what="blk I/O")
    if net_wl is not None:
        wait_for(lambda: m.device("net0").vdev.rx_packets >= seconds_of_ops // 4, timeout=60, what="net traffic")
    return m.stop_workload()


def test_blk_several_queues_verified():
    toml = machine_toml(vcpus=3, devices=blk("blk0", queues=3))
    with running_machine(toml) as m:
        res = _run(m, 3000, blk_wl={"depth": 12, "read_ratio": 0.5})
        r = _result(res, "blk")
        assert r["error_count"] == 0, r["errors"]
        assert r["reads"] > 0 and r["writes"] > 0
        p = m.device("blk0")
        for q in p.vdev.queues:
            assert q.pushed > 0 and q.kicks > 0 and q.calls > 0, p.queue_info(q)
        assert len({q.vector for q in p.vdev.queues}) == 3


def test_blk_completed_writes_are_in_the_image():
    with running_machine(machine_toml(devices=blk("blk0"))) as m:
        slot = m.slot("blk0")
        payload = os.urandom(4096)
        r = m.guest_cmd({"cmd": "blk-io", "slot": slot, "op": "write", "sector": 64, "nbytes": 4096,
                         "data": payload.hex()})
        assert r["status"] == 0
        img = m.device("blk0").vdev.image
        with open(img, "rb") as f:
            f.seek(64 * 512)
            assert f.read(4096) == payload
        r = m.guest_cmd({"cmd": "blk-io", "slot": slot, "op": "flush", "nbytes": 0})
        assert r["status"] == 0 and m.device("blk0").vdev.flushes == 1
        r = m.guest_cmd({"cmd": "blk-io", "slot": slot, "op": "get-id", "nbytes": 20})
        assert bytes.fromhex(r["data"]).rstrip(b"\0") == b"blk0"
        r = m.guest_cmd({"cmd": "blk-io", "slot": slot, "op": "read", "sector": 8191, "nbytes": 1024})
        assert r["status"] == 1  # past the end of the 4 MiB disk: IOERR


@pytest.mark.parametrize("backend", ["loopback", "socketpair"])
def test_net_several_queue_pairs_payload_checks(backend):
    toml = machine_toml(vcpus=2, devices=NET.format(backend=backend, pairs=2))
    with running_machine(toml) as m:
        res = _run(m, 800, net_wl={"min_payload": 32, "max_payload": 1400})
        r = _result(res, "net")
        assert r["error_count"] == 0, r["errors"]
        assert r["ops"] >= 200
        dev = m.device("net0").vdev
        assert dev.curr_pairs == 2, "the guest set 2 pairs through the control queue"
        for pair in range(2):
            tx = dev.queues[2 * pair + 1]
            rx = dev.queues[2 * pair]
            assert tx.pushed > 0 and rx.pushed > 0, (pair, tx.pushed, rx.pushed)
        if backend == "socketpair":
            assert dev.backend.echoed >= r["ops"]


def test_intx_mode_with_isr_read_to_clear():
    toml = machine_toml(devices=blk("blk0", msix=False))
    with running_machine(toml) as m:
        p = m.device("blk0")
        assert p.msix is None
        info = [d for d in m.boot_info["devices"] if d["slot"] == m.slot("blk0")][0]
        assert info["irq_mode"] == "intx"
        res = _run(m, 500, blk_wl={"depth": 4})
        r = _result(res, "blk")
        assert r["error_count"] == 0, r["errors"]
        assert p.intx_calls > 0
        assert m.vm.stats.globals()["irq_line_changes"] >= 2 * 1  # raised and lowered (ISR read)
        assert p.vdev.isr == 0 and p.irq_level == 0


def test_msix_disabled_by_driver_falls_back_to_intx():
    toml = machine_toml(devices=blk("blk0"))
    with running_machine(toml, msix=False) as m:
        p = m.device("blk0")
        assert p.msix is not None and not p.msix.enabled
        r = m.guest_cmd({"cmd": "blk-io", "slot": m.slot("blk0"), "op": "read", "sector": 4, "nbytes": 512})
        assert r["status"] == 0 and bytes.fromhex(r["data"]).startswith(b"SECTOR0000000004")
        assert p.vdev.queues[0].calls_by_path.get("intx", 0) >= 1


def test_flr_mid_io_resets_the_device_and_the_guest_starts_again():
    """FLR while the device has requests in flight in its I/O threads: the reset waits for the I/O,
    drops the completions (the guest never sees them), leaves the device at reset state, and the
    guest brings it up again."""
    import threading

    toml = machine_toml(devices=blk("blk0"))
    with running_machine(toml) as m:
        p = m.device("blk0")
        slot = m.slot("blk0")
        aio = p.vdev.aio
        gate = threading.Event()
        for _ in range(len(aio._threads)):  # occupy every I/O thread
            aio.submit(gate.wait, lambda r: None)
        try:
            # writes above the blocks the workload below uses (its first 1 MiB)
            ids = [m.guest_cmd({"cmd": "blk-submit", "slot": slot, "op": "write", "sector": 4096 + 16 * i,
                                "nbytes": 4096, "fill": 0xA5})["id"] for i in range(6)]
            wait_for(lambda: p.vdev.queues[0].inuse == 6, what="the device to take the requests")
            gen0 = p.vdev.generation
            box: dict = {}
            t = threading.Thread(target=lambda: box.update(
                out=m.guest_cmd({"cmd": "flr", "slot": slot, "reprobe": False})))
            t.start()
            wait_for(lambda: p.vdev.generation > gen0, what="the FLR to reach the device")
        finally:
            gate.set()
        t.join(30)
        assert box["out"]["status_after_flr"] == 0
        assert p.flr_count == 1
        assert p.vdev.status == 0 and all(q.desc == 0 and not q.enabled for q in p.vdev.queues)
        assert p.vdev.queues[0].pushed == 0, "a completion of a request from before the reset was delivered"
        assert p.msix is not None and not p.msix.enabled
        assert all(p.msix.entry_masked(v) for v in range(p.msix.nvectors))
        assert not p.ioeventfd_started and all(q.host_notifier is None for q in p.vdev.queues)
        assert not any(q.guest_notifier for q in p.vdev.queues)
        # the guest brings the device up again and it works
        m.guest_cmd({"cmd": "reprobe", "slot": slot})
        assert p.vdev.status & 4 and p.ioeventfd_started
        res = _run(m, 300, blk_wl={"depth": 8, "nblocks": 256})
        r = _result(res, "blk")
        assert r["error_count"] == 0, r["errors"]
        w = m.guest_cmd({"cmd": "blk-wait", "id": ids[-1], "timeout": 0.5})
        assert not w["completed"], "a request from before the FLR completed"


def test_corrupt_ring_sets_needs_reset_and_raises_the_config_interrupt():
    """A guest that puts an out-of-range head in the avail ring: the device stops, sets
    DEVICE_NEEDS_RESET and raises the config interrupt; the guest's config handler sees it; a
    re-probe brings the device back."""
    with running_machine(machine_toml(devices=blk("blk0"))) as m:
        p = m.device("blk0")
        q = p.vdev.queues[0]
        slot = m.slot("blk0")
        before = m.guest_cmd({"cmd": "status-read", "slot": slot})
        # play the buggy driver: publish head 0xffff
        idx = m.memory.read_u16(q.avail + 2)
        m.memory.write_u16(q.avail + 4 + 2 * (idx % q.num), 0xFFFF)
        m.memory.write_u16(q.avail + 2, (idx + 1) & 0xFFFF)
        m.guest_cmd({"cmd": "kick", "slot": slot, "queue": 0})
        wait_for(lambda: p.vdev.broken, what="the device to notice")
        assert p.vdev.status & 0x40 and "out of range" in p.vdev.broken_reason
        after = wait_for(lambda: (lambda s: s if s["needs_reset_seen"] > before["needs_reset_seen"] else None)(
            m.guest_cmd({"cmd": "status-read", "slot": slot})), what="the guest's config interrupt")
        assert after["status"] & 0x40
        assert q.pushed == 0
        m.guest_cmd({"cmd": "reprobe", "slot": slot})
        assert not p.vdev.broken
        r = m.guest_cmd({"cmd": "blk-io", "slot": slot, "op": "read", "sector": 0, "nbytes": 512})
        assert r["status"] == 0


def _fd_table() -> dict[str, str]:
    out = {}
    for fd in os.listdir("/proc/self/fd"):
        try:
            out[fd] = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:  # the listing's own fd, or one closed meanwhile
            pass
    return out


def test_a_stopped_machine_leaves_no_fd_behind():
    """Every eventfd, memfd, socket and pin of a machine is closed when it stops -- including the
    notifiers whose deassign fails because the guest's hypervisor half went away first."""
    import gc

    gc.collect()
    before = _fd_table()
    toml = machine_toml(devices=blk("blk0", queues=2) + NET.format(backend="socketpair", pairs=1))
    with running_machine(toml) as m:
        _run(m, 200, blk_wl={"depth": 4, "read_ratio": 0.5}, net_wl={})
    gc.collect()
    left = {k: v for k, v in _fd_table().items() if before.get(k) != v}
    assert not left, f"fds the machine opened are still open: {left}"
