"""Real QEMU 7.2 (TCG) boots a real Linux guest whose disk is served by ``kickcall vhost-user-blk``."""

from __future__ import annotations

import hashlib
import os
import tempfile
import uuid

import pytest

from helpers import start_vhost_user_blk, stop_process
from kickcall.monitor.client import QMPClient
from kickcall.peers import require_peers
from kickcall.peers.guest_image import build_initramfs, make_init
from kickcall.peers.qemu import QemuVM, VhostUserBlk, kernel_cmdline
from kickcall.virtio.blk import make_image

pytestmark = pytest.mark.slow

BOOT = 180.0
BS = 4096
HOST_BLOCK, HOST_COUNT = 1000, 16  # written by the host before boot, read by the guest
PAT_BLOCK, PAT_COUNT = 2048, 256  # written by the guest (1 MiB), read back with O_DIRECT

GUEST = r"""
i=0; while [ ! -b /dev/vda ] && [ $i -lt 300 ]; do sleep 0.1; i=$((i+1)); done
if [ ! -b /dev/vda ]; then echo "KC-NO-VDA"; fi
echo "KC-VDA sectors=$(cat /sys/block/vda/size) mq=$(ls /sys/block/vda/mq | wc -l)"
echo "KC-HOSTMD5 $(dd if=/dev/vda bs=4096 skip=__HOST_BLOCK__ count=__HOST_COUNT__ iflag=direct 2>/dev/null | md5sum | cut -d' ' -f1)"
if [ "$KC_MODE" = write ]; then
  yes "KC-PATTERN-$KC_TAG" | head -c $((__PAT_COUNT__ * 4096)) > /tmp/pat
  echo "KC-PATMD5 $(md5sum < /tmp/pat | cut -d' ' -f1)"
  dd if=/tmp/pat of=/dev/vda bs=4096 seek=__PAT_BLOCK__ oflag=direct conv=fsync 2>/dev/null && echo "KC-WRITE-OK"
fi
echo "KC-READBACK $(dd if=/dev/vda bs=4096 skip=__PAT_BLOCK__ count=__PAT_COUNT__ iflag=direct 2>/dev/null | md5sum | cut -d' ' -f1)"
grep virtio /proc/interrupts | sed 's/^/KC-IRQ /'
""".replace("__HOST_BLOCK__", str(HOST_BLOCK)).replace("__HOST_COUNT__", str(HOST_COUNT)) \
    .replace("__PAT_BLOCK__", str(PAT_BLOCK)).replace("__PAT_COUNT__", str(PAT_COUNT))


def _value(lines: list[str], key: str) -> str:
    for ln in lines:
        if ln.startswith(key + " "):
            return ln.split(" ", 1)[1].strip()
    raise AssertionError(f"{key} not in the guest's output:\n" + "\n".join(lines[-40:]))


@pytest.mark.parametrize("mem", ["add-mem-reg", "set-mem-table"])
def test_linux_guest_on_kickcall_backend_then_qemu_restarts(mem):
    """With CONFIGURE_MEM_SLOTS offered QEMU sends ADD_MEM_REG per region; without it, one
    SET_MEM_TABLE with two regions on one memfd.  Both are served."""
    assets = require_peers()
    initrd = build_initramfs(make_init(GUEST), None, assets)
    d = tempfile.mkdtemp(prefix="kc")
    img = os.path.join(d, "disk.img")
    make_image(img, 16 << 20)
    host_data = b"".join((f"KC-HOST-BLOCK-{n}-{uuid.uuid4().hex}".encode() * 200)[:BS] for n in range(HOST_COUNT))
    with open(img, "r+b") as f:
        f.seek(HOST_BLOCK * BS)
        f.write(host_data)
    sock, qmp_path = os.path.join(d, "vblk.sock"), os.path.join(d, "be.qmp")
    extra = ["--no-mem-slots"] if mem == "set-mem-table" else []
    be = start_vhost_user_blk(sock, img, "--num-queues", "2", "--qmp", qmp_path, *extra)
    tag = uuid.uuid4().hex[:12]
    pattern = (f"KC-PATTERN-{tag}\n".encode() * (PAT_COUNT * BS // 20 + 1))[:PAT_COUNT * BS]
    try:
        outs = []
        for mode in ("write", "read"):  # the second run is a new QEMU on the same back-end process
            vm = QemuVM(assets.kernel, initrd, kernel_cmdline(mode, tag=tag), smp=2,
                        vhost_user_blk=[VhostUserBlk(sock, num_queues=2)])
            try:
                vm.start()
                vm.wait_for_line("KICKCALL-POWEROFF", BOOT)
                rc = vm.wait_exit(BOOT)
            finally:
                vm.stop()
            assert rc == 0, vm.describe()
            outs.append(list(vm.lines))
        with QMPClient(qmp_path, timeout=5.0).connect() as q:
            st = q.execute("x-query-vhost-user-backend")
            assert q.execute("query-status")["status"] == "running"
            q.execute("quit", allow_eof=True)
        be.wait(30)
        assert be.returncode == 0
    finally:
        stop_process(be)
    first, second = outs
    assert "KC-VDA sectors=32768 mq=2" in first, "\n".join(first[-30:])
    # the guest read what the host wrote
    assert _value(first, "KC-HOSTMD5") == hashlib.md5(host_data).hexdigest()
    # the guest wrote its pattern and read it back with O_DIRECT
    assert _value(first, "KC-PATMD5") == hashlib.md5(pattern).hexdigest()
    assert "KC-WRITE-OK" in first
    assert _value(first, "KC-READBACK") == hashlib.md5(pattern).hexdigest()
    # the host image holds the same bytes
    with open(img, "rb") as f:
        f.seek(PAT_BLOCK * BS)
        assert f.read(PAT_COUNT * BS) == pattern
        f.seek(HOST_BLOCK * BS)
        assert f.read(HOST_COUNT * BS) == host_data
    # a new QEMU, the same back-end: it served the second connection and the data is still there
    assert _value(second, "KC-READBACK") == hashlib.md5(pattern).hexdigest()
    assert _value(second, "KC-HOSTMD5") == hashlib.md5(host_data).hexdigest()
    assert st["connections"] == 2 and st["protocol-errors"] == 0
    if mem == "add-mem-reg":
        assert st["messages"].get("ADD_MEM_REG", 0) >= 4 and "SET_MEM_TABLE" not in st["messages"]
    else:
        assert st["messages"].get("SET_MEM_TABLE", 0) >= 2 and "ADD_MEM_REG" not in st["messages"]
    # both queues carried interrupts (the guest ran with 2 vCPUs and 2 queues)
    irq_lines = [ln for ln in first if ln.startswith("KC-IRQ") and "req." in ln]
    assert len(irq_lines) == 2, irq_lines
