"""The real peers: a Python-built initramfs, QEMU (TCG) booting the Debian cloud kernel with it, and
qemu-storage-daemon serving a vhost-user-blk disk to that guest.

These tests do not skip when the peers are missing: ./install.sh provides them, and a missing peer
fails with PeerMissing saying what is missing and "run ./install.sh".
"""

from __future__ import annotations

import gzip
import os
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
import uuid

import pytest

from kickcall.peers import (
    QSD,
    PeerError,
    PeerMissing,
    PeerTimeout,
    QemuVM,
    VhostUserBlk,
    build_initramfs,
    kernel_cmdline,
    load_manifest,
    make_init,
    require_peers,
)
from kickcall.peers.guest_image import VIRTIO_BLK_MODULES

pytestmark = pytest.mark.slow

SECTOR = 512
BOOT_CEILING = 120.0


def make_image(path: str, size: int) -> None:
    """Every 512-byte sector starts with its own label (as kickcall.virtio.blk.make_image)."""
    with open(path, "wb") as f:
        for i in range(size // SECTOR):
            f.write((b"SECTOR%010d" % i).ljust(SECTOR, b"."))


# The guest's /init body (after STANDARD_INIT_PRELUDE: modules loaded, KC_* set from kc.* parameters).
GUEST_BODY = r"""
if [ "$KC_MODE" = hello ]; then
  echo "KC-HELLO from busybox init uptime=$(cut -d' ' -f1 /proc/uptime)"
fi
if [ "$KC_MODE" = wait ]; then
  echo "KC-WAITING"
  sleep 600
fi
if [ "$KC_MODE" = blk ]; then
  i=0; while [ ! -b /dev/vda ] && [ $i -lt 300 ]; do sleep 0.1; i=$((i+1)); done
  if [ -b /dev/vda ]; then
    echo "KC-VDA sectors=$(cat /sys/block/vda/size) ro=$(cat /sys/block/vda/ro) mq=$(ls /sys/block/vda/mq | wc -l)"
    echo "KC-SECTOR0-BEGIN"
    dd if=/dev/vda bs=512 count=1 2>/dev/null | head -c 64; echo
    echo "KC-SECTOR0-END"
    printf '%s' "$KC_PATTERN" | dd of=/dev/vda bs=512 seek=200 count=1 conv=sync,fsync 2>/dev/null && echo "KC-WRITE-OK"
    if dd if=/dev/vda of=/dev/null bs=512 count=1 iflag=direct 2>/dev/null; then
      echo "KC-DIRECT=yes"
      echo "KC-READBACK-BEGIN"
      dd if=/dev/vda bs=512 skip=200 count=1 iflag=direct 2>/dev/null | tr -d '\000' | head -c 64; echo
      echo "KC-READBACK-END"
    else
      echo "KC-DIRECT=no"
      sync; echo 3 > /proc/sys/vm/drop_caches
      echo "KC-READBACK-BEGIN"
      dd if=/dev/vda bs=512 skip=200 count=1 2>/dev/null | tr -d '\000' | head -c 64; echo
      echo "KC-READBACK-END"
    fi
    grep virtio /proc/interrupts | sed 's/^/KC-IRQ /'
  else
    echo "KC-NO-VDA $(ls /sys/block | tr '\n' ' ')"
  fi
fi
"""


@pytest.fixture(scope="module")
def assets():
    return require_peers()  # raises PeerMissing (never skips) when ./install.sh has not been run


@pytest.fixture(scope="module")
def initrd(assets):
    return build_initramfs(make_init(GUEST_BODY), None, assets)


@pytest.fixture
def sockdir():
    d = tempfile.mkdtemp(prefix="kc")  # short: unix socket paths must stay under 108 bytes
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


def assert_reaped(p) -> None:
    assert p.proc is not None and p.proc.returncode is not None, f"{p.kind} pid {p.pid} not reaped"
    with pytest.raises(ChildProcessError):
        os.waitpid(p.pid, os.WNOHANG)  # no such child any more: reaped, and not a zombie
    with pytest.raises(ProcessLookupError):
        os.killpg(p.pid, 0)  # its process group (its own session) is empty


def parse_newc(raw: bytes) -> dict[str, dict]:
    """An independent newc reader (not kickcall's): name -> {mode, rdev, data}."""
    entries: dict[str, dict] = {}
    off = 0
    while True:
        assert raw[off:off + 6] == b"070701", f"bad magic at {off}: {raw[off:off + 6]!r}"
        f = [int(raw[off + 6 + 8 * i: off + 14 + 8 * i], 16) for i in range(13)]
        mode, filesize, rmaj, rmin, namesize = f[1], f[6], f[9], f[10], f[11]
        name = raw[off + 110: off + 110 + namesize]
        assert name.endswith(b"\0")
        name = name[:-1].decode()
        data_off = (off + 110 + namesize + 3) & ~3
        entries[name] = dict(mode=mode, rdev=(rmaj, rmin), data=raw[data_off:data_off + filesize])
        off = (data_off + filesize + 3) & ~3
        if name == "TRAILER!!!":
            assert raw[off:].strip(b"\0") == b""
            return entries


def test_manifest_names_existing_assets(assets):
    m = load_manifest()
    assert m.krel and os.path.isfile(m.kernel) and os.path.isdir(m.modules_dir) and os.access(m.busybox, os.X_OK)
    assert m.krel in m.kernel and m.modules_dir.rstrip("/").endswith(m.krel)


def test_missing_manifest_names_install_sh(tmp_path):
    with pytest.raises(PeerMissing, match=r"run \./install\.sh"):
        load_manifest(tmp_path / "nope.json")


def test_initramfs_built_once_then_cached_and_valid(assets, tmp_path):
    init = make_init(f'echo "KC-HELLO {uuid.uuid4().hex}"')
    cache = tmp_path / "cache"
    t0 = time.monotonic()
    first = build_initramfs(init, None, assets, {"etc/kc.conf": b"x=1\n"}, cache_dir=cache)
    built_in = time.monotonic() - t0
    st1 = os.stat(first)
    t0 = time.monotonic()
    second = build_initramfs(init, None, assets, {"etc/kc.conf": b"x=1\n"}, cache_dir=cache)
    cached_in = time.monotonic() - t0
    st2 = os.stat(second)
    assert second == first and os.path.dirname(first) == str(cache)
    assert (st2.st_ino, st2.st_mtime_ns, st2.st_size) == (st1.st_ino, st1.st_mtime_ns, st1.st_size), "rebuilt"
    assert len(list(cache.iterdir())) == 1
    print(f"initramfs {st1.st_size} bytes: built in {built_in:.3f} s, from cache in {cached_in:.3f} s")

    # other inputs, other image; out_path gets a copy of the cached one
    other = build_initramfs(init + "\n", str(tmp_path / "other.cpio.gz"), assets, cache_dir=cache)
    assert other == str(tmp_path / "other.cpio.gz") and len(list(cache.iterdir())) == 2

    with open(first, "rb") as f:
        e = parse_newc(gzip.decompress(f.read()))
    for d in ("bin", "dev", "proc", "sys", "lib", "lib/modules", "tmp", "sbin", "usr/bin", "usr/sbin", "mnt", "etc"):
        assert stat.S_ISDIR(e[d]["mode"]), d
    assert stat.S_ISCHR(e["dev/console"]["mode"]) and e["dev/console"]["rdev"] == (5, 1)
    assert stat.S_ISCHR(e["dev/null"]["mode"]) and e["dev/null"]["rdev"] == (1, 3)
    assert stat.S_ISREG(e["init"]["mode"]) and stat.S_IMODE(e["init"]["mode"]) == 0o755
    assert e["init"]["data"] == init.encode()
    assert stat.S_IMODE(e["bin/busybox"]["mode"]) == 0o755
    with open(assets.busybox, "rb") as f:
        assert e["bin/busybox"]["data"] == f.read()
    for name, _rel in VIRTIO_BLK_MODULES:
        assert e[f"lib/modules/{name}.ko"]["data"][:4] == b"\x7fELF", name
    assert e["etc/kc.conf"]["data"] == b"x=1\n"
    assert "TRAILER!!!" in e


def test_qemu_boots_guest_to_marker_and_powers_off(assets, initrd):
    vm = QemuVM(assets.kernel, initrd, kernel_cmdline("hello"))
    t0 = time.monotonic()
    try:
        vm.start()
        line = vm.wait_for_line("KC-HELLO from busybox init", BOOT_CEILING)
        t_hello = time.monotonic() - t0
        rc = vm.wait_exit(BOOT_CEILING)
    finally:
        vm.stop()
    print(f"hello boot: marker at {t_hello:.2f} s, exit at {time.monotonic() - t0:.2f} s")
    assert rc == 0, vm.describe()
    assert line in vm.lines and any("KICKCALL-READY mode=hello" in ln for ln in vm.lines)
    assert not any("INSMOD-FAILED" in ln for ln in vm.lines), vm.describe()
    assert_reaped(vm)
    # waiting for a line that never comes, after QEMU has gone, fails at once and shows the console
    t0 = time.monotonic()
    with pytest.raises(PeerError, match="exited without printing") as ei:
        vm.wait_for_line("NEVER-PRINTED", BOOT_CEILING)
    assert time.monotonic() - t0 < 5 and "KC-HELLO from busybox init" in str(ei.value)


@pytest.mark.parametrize("how", ["qmp", "sigterm"])
def test_qemu_stop_ends_a_running_guest(assets, initrd, sockdir, how):
    qmp = os.path.join(sockdir, "qmp.sock") if how == "qmp" else None
    vm = QemuVM(assets.kernel, initrd, kernel_cmdline("wait"), qmp_path=qmp)
    try:
        vm.start()
        vm.wait_for_line("KC-WAITING", BOOT_CEILING)
        if qmp:
            with vm.qmp() as q:
                assert q.execute("query-status")["status"] == "running"
        with pytest.raises(PeerTimeout, match="KC-WAITING"):
            vm.wait_for_line("NEVER-PRINTED", 0.5)  # the timeout error shows the console too
        t0 = time.monotonic()
        rc = vm.stop()
        took = time.monotonic() - t0
    finally:
        vm.stop()
    print(f"stop via {how}: rc {rc} in {took:.2f} s; stderr {vm.err_lines}")
    assert rc == 0 and took < 10
    assert_reaped(vm)


CHILD = """
import sys, time
import kickcall.peers.qemu
from kickcall.peers import QSD
if sys.argv[3] == "off":
    kickcall.peers.qemu._prctl = None  # the switch: no PR_SET_PDEATHSIG
q = QSD(sys.argv[1], sys.argv[2])
q.start()
print(q.pid, flush=True)
time.sleep(600)
"""


@pytest.mark.parametrize("pdeathsig", ["on", "off"])
def test_peer_dies_with_its_parent(tmp_path, sockdir, pdeathsig):
    img = str(tmp_path / "disk.img")
    make_image(img, 1 << 20)
    parent = subprocess.Popen([sys.executable, "-c", CHILD, img, os.path.join(sockdir, "vblk.sock"), pdeathsig],
                              stdout=subprocess.PIPE, text=True, start_new_session=True)
    qsd_pid = None
    try:
        qsd_pid = int(parent.stdout.readline())
        assert _alive(qsd_pid)
        parent.kill()  # SIGKILL: the parent cannot clean up; PR_SET_PDEATHSIG must end QSD
        parent.wait(timeout=30)
        if pdeathsig == "on":
            deadline = time.monotonic() + 30
            while _alive(qsd_pid) and time.monotonic() < deadline:
                time.sleep(0.02)
            assert not _alive(qsd_pid), f"qemu-storage-daemon {qsd_pid} outlived its parent"
        else:  # switched off, the orphan survives: the check above is what catches a missing prctl
            time.sleep(1.0)
            assert _alive(qsd_pid), "without PR_SET_PDEATHSIG the orphan should have survived"
    finally:
        if parent.poll() is None:
            parent.kill()
        parent.wait()
        parent.stdout.close()
        if qsd_pid is not None and _alive(qsd_pid):  # the orphan, now init's child: end it by its pid
            os.kill(qsd_pid, signal.SIGKILL)
            deadline = time.monotonic() + 30
            while _alive(qsd_pid) and time.monotonic() < deadline:
                time.sleep(0.02)
    assert not _alive(qsd_pid)


def _alive(pid: int) -> bool:
    """Running (not gone, not a zombie waiting for init to reap it)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_qsd_starts_and_quits_over_qmp(tmp_path, sockdir):
    img = str(tmp_path / "disk.img")
    make_image(img, 8 << 20)
    sock = os.path.join(sockdir, "vblk.sock")
    qsd = QSD(img, sock, qmp_path=os.path.join(sockdir, "qsd.qmp"), num_queues=2)
    try:
        qsd.start()
        appeared = time.monotonic() - qsd.started_at
        assert os.path.exists(sock) and stat.S_ISSOCK(os.stat(sock).st_mode)
        with qsd.qmp() as q:
            exports = q.execute("query-block-exports")
        assert [x["id"] for x in exports] == ["exp0"]
        rc = qsd.stop()
    finally:
        qsd.stop()
    print(f"qsd socket after {appeared * 1000:.0f} ms")
    assert rc == 0, qsd.describe()
    assert_reaped(qsd)
    assert not os.path.exists(sock) and not os.path.exists(qsd.qmp_path)


def test_guest_reads_and_writes_a_qsd_disk(assets, initrd, tmp_path, sockdir):
    img = str(tmp_path / "disk.img")
    make_image(img, 8 << 20)
    pattern = f"KC-PATTERN-{uuid.uuid4().hex[:12]}"
    sock = os.path.join(sockdir, "vblk.sock")
    qsd = QSD(img, sock, num_queues=2)
    vm = QemuVM(assets.kernel, initrd, kernel_cmdline("blk", pattern=pattern), smp=2,
                vhost_user_blk=[VhostUserBlk(sock, num_queues=2)])
    t0 = time.monotonic()
    try:
        qsd.start()
        vm.start()
        vm.wait_for_line("KC-SECTOR0-END", BOOT_CEILING)
        vm.wait_for_line("KC-READBACK-END", BOOT_CEILING)
        rc = vm.wait_exit(BOOT_CEILING)
        elapsed = time.monotonic() - t0
        qsd_rc = qsd.stop()
    finally:
        vm.stop()
        qsd.stop()
    out = vm.lines

    def between(begin: str, end: str) -> str:
        i = out.index(begin)
        return "\n".join(out[i + 1: out.index(end, i)])

    print(f"blk boot: {elapsed:.2f} s; " + "; ".join(ln for ln in out if ln.startswith(("KC-VDA", "KC-DIRECT", "KC-IRQ"))))
    assert rc == 0 and qsd_rc == 0, vm.describe() + "\n" + qsd.describe()
    assert "KC-VDA sectors=16384 ro=0 mq=2" in out, vm.describe()
    assert between("KC-SECTOR0-BEGIN", "KC-SECTOR0-END") == "SECTOR0000000000" + "." * 48
    assert "KC-WRITE-OK" in out
    assert "KC-DIRECT=yes" in out or "KC-DIRECT=no" in out
    assert between("KC-READBACK-BEGIN", "KC-READBACK-END") == pattern
    with open(img, "rb") as f:
        f.seek(200 * SECTOR)
        sector = f.read(SECTOR)
        f.seek(199 * SECTOR)
        neighbour = f.read(SECTOR)
    assert sector == pattern.encode().ljust(SECTOR, b"\0")
    assert neighbour == (b"SECTOR%010d" % 199).ljust(SECTOR, b".")
    assert_reaped(vm)
    assert_reaped(qsd)
    assert not os.path.exists(sock)
