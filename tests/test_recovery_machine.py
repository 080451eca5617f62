"""A guest's disk comes back after a ring error: the back-end marks the device broken
(NEEDS_RESET) for a hostile descriptor; the guest resets the device and probes it again (what
Linux does on NEEDS_RESET, or a reboot); I/O works again -- and the same hostile descriptor
breaks it again."""

from __future__ import annotations

import os

import pytest

from helpers import running_machine, stop_process, vhost_toml, wait_for
from kickcall.hv.abi import HypervisorError
from kickcall.virtio.blk import make_image
from kickcall.virtio.device import DEVICE_NEEDS_RESET

pytestmark = pytest.mark.slow


def _break_the_ring(m, slot: int) -> None:
    """Publish a read whose request header is 8 bytes long (virtio-blk's is 16): the back-end takes
    the request from the ring (it is recorded in the inflight region) and then refuses it."""
    p = m.device("vblk")
    q = p.vdev.queues[0]
    r = m.guest_cmd({"cmd": "blk-submit", "slot": slot, "op": "read", "sector": 0, "kick": False})
    assert r["id"]
    avail_idx = m.memory.read_u16(q.avail + 2)
    head = m.memory.read_u16(q.avail + 4 + 2 * ((avail_idx - 1) % q.num))
    # a direct chain: header, data, status; or one indirect descriptor: follow it to its table
    desc = q.desc + 16 * head
    flags = m.memory.read_u16(desc + 12)
    if flags & 4:  # VIRTQ_DESC_F_INDIRECT
        desc = m.memory.read_u64(desc)
    m.memory.write_u32(desc + 8, 8)  # the header descriptor's length
    m.guest_cmd({"cmd": "kick", "slot": slot, "queue": 0, "cpu": 0})


@pytest.mark.parametrize("fix", [True, False], ids=["fix-on", "fix-off"])
def test_a_guests_disk_works_again_after_a_reset_following_a_ring_error(workdir, fix):
    """fix-off: the back-end's recover-after-ring-reinit fault switched off -- the device stays broken
    through the guest's reset (GET_VRING_BASE, then the rings set up again), and the disk is dead."""
    img = os.path.join(workdir, "d.img")
    make_image(img, 8 << 20)
    sock = os.path.join(workdir, "s")
    import subprocess

    from helpers import kickcall_argv, spawn, wait_for_listener

    log = open(os.path.join(workdir, "be.log"), "w+")
    args = ["--log-level", "INFO", "vhost-user-blk", "--socket-path", sock, "--blk-file", img]
    argv = kickcall_argv(*args, *(() if fix else ("--x-fix-off", "recover-after-ring-reinit")))
    be = spawn(argv, stderr=log, stdout=subprocess.DEVNULL)
    try:
        wait_for_listener(sock, be)
        with running_machine(vhost_toml(sock)) as m:
            p = m.device("vblk")
            slot = m.slot("vblk")
            assert m.guest_cmd({"cmd": "blk-io", "slot": slot, "op": "read", "sector": 0})["status"] == 0
            for attempt in range(2):  # the same hostile descriptor breaks the device again
                _break_the_ring(m, slot)
                wait_for(lambda: p.vdev.broken, 30, "the device to need a reset")
                assert m.guest_cmd({"cmd": "status-read", "slot": slot})["status"] & DEVICE_NEEDS_RESET
                m.guest_cmd({"cmd": "reprobe", "slot": slot})  # reset + probe: what a reboot does
                if not fix:  # nothing completes: the back-end still refuses the ring
                    with pytest.raises(HypervisorError, match="not completed"):
                        m.guest_cmd({"cmd": "blk-io", "slot": slot, "op": "read", "sector": 0, "timeout": 5.0},
                                    timeout=60)
                    return
                r = m.guest_cmd({"cmd": "blk-io", "slot": slot, "op": "read", "sector": 0, "timeout": 10.0},
                                timeout=60)
                assert r["status"] == 0 and not p.vdev.broken, (attempt, r)
                assert bytes.fromhex(r["data"])[:16] == b"SECTOR0000000000"
    finally:
        stop_process(be)
        log.close()
