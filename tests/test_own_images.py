"""Images: a user's image is only read unless writes are allowed, checks assume nothing kickcall
did not write or create, images are locked as QEMU locks them, FIFOs and character devices are
refused without blocking, temporary images are sparse and always removed."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import stat
import struct
import subprocess
import sys

import pytest

from helpers import SRC, spawn, stop_process, wait_for, wait_for_listener
from kickcall.faults import PROCESS
from kickcall.guest.blkverify import BHDR, BLK_MAGIC, BlockVerifier, InitialContent, block_content
from kickcall.ownership import PathRefused, RefusalKind
from kickcall.virtio.image import create_image, open_image

pytestmark = pytest.mark.slow

BS = 4096


def kickcall(*args: str, timeout: float = 120, env: dict | None = None) -> subprocess.CompletedProcess:
    e = dict(os.environ, PYTHONPATH=SRC)
    e.update(env or {})
    return subprocess.run([sys.executable, "-m", "kickcall", *args], capture_output=True, text=True,
                          timeout=timeout, env=e, stdin=subprocess.DEVNULL)


def sha256(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def blk_config(workdir: str, image: str, *, allow_write: bool = False, read_ratio: float = 0.5,
               extra: str = "") -> str:
    p = os.path.join(workdir, "m.toml")
    with open(p, "w") as f:
        f.write(f'[machine]\nvcpus = 2\n[[device]]\ntype = "virtio-blk"\nid = "blk0"\nimage = "{image}"\n'
                f'allow-write = {str(allow_write).lower()}\n{extra}'
                f'[workload.blk]\ndepth = 8\nread-ratio = {read_ratio}\n')
    return p


def results(r: subprocess.CompletedProcess) -> dict:
    doc = json.loads(r.stdout)
    (blk,) = [x for x in doc["results"].values() if x["kind"] == "blk"]
    return blk


# -- a file the user owns -------------------------------------------------------------------------
def test_a_users_read_only_image_is_read_and_verified_and_left_unchanged(workdir):
    img = os.path.join(workdir, "user.img")
    with open(img, "wb") as f:
        f.write(os.urandom(4 << 20))
    os.chmod(img, 0o444)  # as root this stops nobody: kickcall's own O_RDONLY open is what protects it
    before = sha256(img)
    r = kickcall("run", blk_config(workdir, img), "--duration", "3", "--json")
    assert r.returncode == 0, r.stderr
    blk = results(r)
    assert blk["error-count"] == 0, blk["errors"]
    assert blk["read-only"] and blk["initial"] == "file"
    assert blk["reads"] > 100 and blk["writes"] == 0
    assert sha256(img) == before
    assert stat.S_IMODE(os.stat(img).st_mode) == 0o444


def test_checks_pass_on_a_zero_filled_user_image_and_on_a_second_run(workdir):
    img = os.path.join(workdir, "zero.img")
    with open(img, "wb") as f:
        f.truncate(4 << 20)
    cfg = blk_config(workdir, img, allow_write=True)
    for _run in range(2):  # the second run finds the first run's blocks: still no assumption about them
        r = kickcall("run", cfg, "--duration", "2", "--json")
        assert r.returncode == 0, r.stderr
        blk = results(r)
        assert blk["error-count"] == 0, blk["errors"]
        assert blk["writes"] > 50 and blk["reads"] > 50 and blk["verified-at-end"] > 0


def test_without_allow_write_the_user_image_is_not_written_even_by_a_write_workload(workdir):
    img = os.path.join(workdir, "user.img")
    with open(img, "wb") as f:
        f.write(os.urandom(1 << 20))
    before = sha256(img)
    r = kickcall("run", blk_config(workdir, img, read_ratio=0.0), "--duration", "1", "--json")
    assert r.returncode == 0, r.stderr
    blk = results(r)
    assert blk["writes"] == 0 and blk["reads"] > 0 and blk["error-count"] == 0
    assert sha256(img) == before
    r = kickcall("run", blk_config(workdir, img, read_ratio=0.0), "--duration", "1", "--json", "--allow-write")
    assert r.returncode == 0, r.stderr
    assert results(r)["writes"] > 0 and sha256(img) != before


def _written_block(img: str, nblocks: int) -> tuple[int, int] | None:
    """A block that holds a generation the workload wrote: (block, generation)."""
    with open(img, "rb") as f:
        for b in range(nblocks):
            f.seek(b * BS)
            magic, blk, gen, _crc = BHDR.unpack(f.read(BHDR.size))
            if magic == BLK_MAGIC and blk == b:
                return b, gen
    return None


def test_a_byte_flipped_on_disk_mid_run_is_reported_as_exactly_that_sector(workdir):
    """The test plays a failing disk: it flips one byte of a block the workload wrote.  The
    workload's next read of that block (at the latest its final verify pass) must name that
    sector, and nothing else.  If the workload overwrote the block after the flip before reading
    it (legitimate: the flip is gone), the round is repeated."""
    img = os.path.join(workdir, "disk.img")
    nblocks = 256
    with open(img, "wb") as f:
        f.truncate(nblocks * BS)
    cfg = blk_config(workdir, img, allow_write=True, read_ratio=0.9)
    for _round in range(5):
        p = spawn([sys.executable, "-m", "kickcall", "run", cfg, "--duration", "4", "--json"],
                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            found = wait_for(lambda: _written_block(img, nblocks) or p.poll() is not None, 60,
                             "a block the workload wrote")
            assert p.poll() is None, "the run ended before it wrote anything"
            assert isinstance(found, tuple)
            b, gen = found
            off = b * BS + 1000  # in the payload, in the block's third sector
            with open(img, "r+b") as f:
                f.seek(off)
                old = f.read(1)
                f.seek(off)
                f.write(bytes([old[0] ^ 0x5A]))
            out, err = p.communicate(timeout=120)
        finally:
            stop_process(p)
        assert p.returncode in (0, 1), err
        blk = json.loads(out)["results"]
        (blk,) = [x for x in blk.values() if x["kind"] == "blk"]
        with open(img, "rb") as f:
            f.seek(b * BS)
            _m, _b, gen_now, _c = BHDR.unpack(f.read(BHDR.size))
        sector = off // 512
        want = f"sector {sector} (block {b}, first differing byte {off % 512}): differs from generation {gen}"
        assert all(e.startswith(want) for e in blk["errors"]), blk["errors"]  # that sector, nothing else
        if gen_now == gen:  # still on disk at the end: the final verify pass at least must have seen it
            assert blk["error-count"] >= 1 and p.returncode == 1
        if blk["error-count"]:
            assert p.returncode == 1
            return
        # overwritten by the workload after the flip and before any read of it: the flip is gone,
        # nobody may report it (and nobody did); try again
    pytest.fail("the workload overwrote the flipped block in every round")


def test_the_verifier_names_the_sector_and_assumes_nothing_of_unknown_content():
    v = BlockVerifier(BS, InitialContent({"kind": "unknown"}, BS))
    first = os.urandom(BS)
    assert v.check_read(7, first) == []          # whatever an unknown image holds ...
    assert v.check_read(7, first) == []          # ... as long as it stays the same
    changed = bytearray(first)
    changed[3 * 512 + 9] ^= 1
    assert v.check_read(7, bytes(changed)) == [
        "sector 59 (block 7, first differing byte 9): differs from what the first read returned"]
    v.write_submitted(7, 5)
    v.write_completed(7, 5)
    good = block_content(7, 5, BS)
    assert v.check_read(7, good) == []
    bad = bytearray(good)
    bad[4095] ^= 0xFF
    assert v.check_read(7, bytes(bad)) == [
        "sector 63 (block 7, first differing byte 511): differs from generation 5 written in this run"]
    labels = BlockVerifier(BS, InitialContent({"kind": "labels", "labelled": 2 * BS + 1024}, BS))
    from kickcall.guest.blkverify import initial_block

    assert labels.check_read(1, initial_block(1, BS)) == []
    assert labels.check_read(3, bytes(BS)) == []  # past the labelled part: sparse zeros
    part = initial_block(2, BS)[:1024] + bytes(BS - 1024)
    assert labels.check_read(2, part) == []


# -- FIFOs, character devices, directories ------------------------------------------------------------
@pytest.mark.parametrize("kind", ["fifo", "chardev", "directory"])
def test_an_image_that_is_not_a_disk_is_refused_without_blocking(workdir, kind):
    if kind == "fifo":
        path = os.path.join(workdir, "fifo")
        os.mkfifo(path)
    elif kind == "chardev":
        path = "/dev/zero"
    else:
        path = workdir
    for ro in ("true", "false"):
        r = kickcall("run", blk_config(workdir, path, extra=f"read-only = {ro}\n"), "--duration", "1",
                     timeout=60)
        assert r.returncode == 2, r.stderr
        assert path in r.stderr and "not a disk image" in r.stderr and "Traceback" not in r.stderr
        assert len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_open_image_refuses_a_fifo_in_process_without_blocking(workdir):
    path = os.path.join(workdir, "fifo")
    os.mkfifo(path)
    for writable in (False, True):
        with pytest.raises(PathRefused) as ei:
            open_image(path, writable=writable)
        assert ei.value.kind is RefusalKind.NOT_REGULAR


# -- QEMU's image locking ---------------------------------------------------------------------------------
def _locks(path: str) -> list[tuple[int, int]]:
    ino = os.stat(path).st_ino
    out = []
    with open("/proc/locks") as f:
        for line in f:
            parts = line.split()
            if "OFDLCK" in parts and parts[-3].endswith(f":{ino}"):
                out.append((int(parts[-2]), int(parts[-1])))
    return sorted(out)


def test_image_locks_are_the_bytes_qemu_uses(workdir):
    img = os.path.join(workdir, "d.img")
    create_image(img, 1 << 20)
    with open_image(img, writable=True):
        assert _locks(img) == [(100, 101), (201, 201)]  # /proc/locks as with QEMU 7.2's virtio-blk, read-write
    with open_image(img, writable=False):
        assert _locks(img) == [(100, 100), (201, 201)]  # ... and read-only
    assert _locks(img) == []


def test_two_kickcall_users_of_one_image_for_writing_are_refused_and_the_switch_shows_it(workdir, monkeypatch):
    img = os.path.join(workdir, "d.img")
    create_image(img, 1 << 20)
    with open_image(img, writable=True):
        with pytest.raises(PathRefused) as ei:
            open_image(img, writable=True)
        assert ei.value.kind is RefusalKind.IMAGE_LOCKED
        with pytest.raises(PathRefused):
            open_image(img, writable=False)  # a reader that refuses writers cannot join a writer either
        monkeypatch.setattr(PROCESS.get("image-locking"), "fix_on", False)
        open_image(img, writable=True).close()  # the fix switched off: both would write


def _qsd(workdir: str, img: str, writable: bool):
    sock = os.path.join(workdir, "qsd.sock")
    argv = ["qemu-storage-daemon", "--blockdev", f"driver=file,node-name=f,filename={img}",
            "--blockdev", "driver=raw,node-name=r,file=f",
            "--export", f"type=vhost-user-blk,id=e,node-name=r,addr.type=unix,addr.path={sock},"
                        f"writable={'on' if writable else 'off'}"]
    p = spawn(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return p, sock


def test_kickcall_and_qemu_storage_daemon_refuse_to_share_an_image_for_writing(workdir):
    img = os.path.join(workdir, "d.img")
    create_image(img, 4 << 20)
    p, sock = _qsd(workdir, img, writable=True)
    try:
        wait_for_listener(sock, p)
        r = kickcall("run", blk_config(workdir, img, allow_write=True), "--duration", "1")
        assert r.returncode == 2 and "locked" in r.stderr and img in r.stderr, r.stderr
        r = kickcall("vhost-user-blk", "--socket-path", os.path.join(workdir, "k.sock"), "--blk-file", img)
        assert r.returncode == 2 and "locked" in r.stderr, r.stderr
        assert not os.path.exists(os.path.join(workdir, "k.sock"))
    finally:
        stop_process(p)
    # the other way round: kickcall holds it, QEMU's daemon refuses to open it for writing
    k = spawn([sys.executable, "-m", "kickcall", "vhost-user-blk", "--socket-path",
               os.path.join(workdir, "k.sock"), "--blk-file", img], stderr=subprocess.PIPE, text=True)
    try:
        wait_for_listener(os.path.join(workdir, "k.sock"), k)
        p, sock = _qsd(workdir, img, writable=True)
        try:
            p.wait(60)
            err = p.stderr.read()
            assert p.returncode != 0 and "lock" in err, err
        finally:
            stop_process(p)
    finally:
        stop_process(k)


# -- temporary images ------------------------------------------------------------------------------------
def _tmp_env(workdir: str) -> tuple[str, dict]:
    tmp = os.path.join(workdir, "tmp")
    os.mkdir(tmp)
    return tmp, {"TMPDIR": tmp}


def test_a_large_temporary_image_is_sparse_and_removed(workdir):
    tmp, env = _tmp_env(workdir)
    cfg = os.path.join(workdir, "big.toml")
    with open(cfg, "w") as f:
        f.write('[machine]\nvcpus = 1\n[[device]]\ntype = "virtio-blk"\nsize = "64G"\n'
                '[workload.blk]\ndepth = 4\n')
    p = spawn([sys.executable, "-m", "kickcall", "run", cfg, "--duration", "3", "--json"],
              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=dict(os.environ, **env))
    try:
        def image() -> str | None:
            for d in os.listdir(tmp):
                if not d.startswith("kickcall-"):
                    continue
                for n in os.listdir(os.path.join(tmp, d)):
                    if n.endswith(".img"):
                        return os.path.join(tmp, d, n)
            return None

        img = wait_for(lambda: image() or p.poll() is not None, 60, "the temporary image")
        assert isinstance(img, str), p.communicate()
        st = os.stat(img)
        assert st.st_size == 64 << 30
        assert st.st_blocks * 512 < 256 << 20  # labels only for what is used, the rest sparse
        out, err = p.communicate(timeout=120)
    finally:
        stop_process(p)
    assert p.returncode == 0, err
    blk = [x for x in json.loads(out)["results"].values() if x["kind"] == "blk"][0]
    assert blk["error-count"] == 0 and blk["ops"] > 0
    assert os.listdir(tmp) == []


def test_a_failed_build_leaves_no_temporary_directory(workdir):
    tmp, env = _tmp_env(workdir)
    cfg = os.path.join(workdir, "bad.toml")
    with open(cfg, "w") as f:  # the first device's image is made, then the second device fails
        f.write('[machine]\nvcpus = 1\n[[device]]\ntype = "virtio-blk"\nid = "a"\nsize = "32M"\n'
                f'[[device]]\ntype = "virtio-blk"\nid = "b"\nimage = "{workdir}/missing.img"\n')
    r = kickcall("run", cfg, "--duration", "1", env=env)
    assert r.returncode == 2, r.stderr
    assert "missing.img" in r.stderr and "Traceback" not in r.stderr
    assert os.listdir(tmp) == []


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_while_the_machine_runs_leaves_no_temporary_directory(workdir, sig):
    tmp, env = _tmp_env(workdir)
    p = spawn([sys.executable, "-m", "kickcall", "run", "--duration", "60", "--plain"],
              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=dict(os.environ, **env))
    try:
        line = p.stdout.readline()
        assert "up" in line, line + p.stderr.read()
        assert os.listdir(tmp)
        p.send_signal(sig)
        out, err = p.communicate(timeout=120)
    finally:
        stop_process(p)
    assert p.returncode == 0 and "Traceback" not in err, err
    assert os.listdir(tmp) == []


def test_create_image_never_replaces_a_file(workdir):
    path = os.path.join(workdir, "mine")
    with open(path, "w") as f:
        f.write("user data")
    with pytest.raises(FileExistsError):
        create_image(path, 1 << 20)
    with open(path) as f:
        assert f.read() == "user data"


def test_struct_flock_layout_matches_the_kernel():
    # fcntl's F_OFD_GETLK on an unlocked byte echoes back F_UNLCK with our layout, else EINVAL
    fd = os.memfd_create("lk")
    try:
        import fcntl

        raw = fcntl.fcntl(fd, fcntl.F_OFD_GETLK, struct.pack("hh4xqqi4x", fcntl.F_WRLCK, 0, 100, 1, 0))
        assert struct.unpack("hh4xqqi4x", raw)[0] == fcntl.F_UNLCK
    finally:
        os.close(fd)


# -- config files that are not config files -----------------------------------------------------------------
@pytest.mark.parametrize("kind", ["fifo", "dev-zero", "deep-nesting", "huge"])
def test_a_config_that_is_not_a_config_is_refused_in_one_line(workdir, kind):
    if kind == "fifo":
        path = os.path.join(workdir, "c.toml")
        os.mkfifo(path)
    elif kind == "dev-zero":
        path = "/dev/zero"
    elif kind == "deep-nesting":
        path = os.path.join(workdir, "c.toml")
        with open(path, "w") as f:
            f.write("a = " + "[" * 100_000 + "]" * 100_000 + "\n")
    else:
        path = os.path.join(workdir, "c.toml")
        with open(path, "w") as f:
            f.write("# " + "x" * (2 << 20) + "\n")
    for argv in (["run", path, "--duration", "1"], ["config", "--check", path]):
        r = kickcall(*argv, timeout=60)
        assert r.returncode == 2, r.stderr
        assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
        assert path in r.stderr


# -- an external back-end's image ------------------------------------------------------------------------------
def test_run_on_an_external_backends_fresh_image_assumes_nothing_of_its_content(workdir):
    """A vhost-user back-end serves a zero-filled image kickcall knows nothing about: the checks
    verify what the run wrote and that unwritten blocks read the same every time -- twice."""
    from helpers import start_vhost_user_blk

    img = os.path.join(workdir, "ext.img")
    with open(img, "wb") as f:
        f.truncate(4 << 20)
    sock = os.path.join(workdir, "vu.sock")
    be = start_vhost_user_blk(sock, img)
    try:
        cfg = os.path.join(workdir, "vu.toml")
        with open(cfg, "w") as f:
            f.write(f'[machine]\nvcpus = 2\n[[device]]\ntype = "virtio-blk"\nbackend = "vhost-user"\n'
                    f'socket = "{sock}"\n[workload.blk]\ndepth = 8\n')
        for _run in range(2):
            r = kickcall("run", cfg, "--duration", "2", "--json")
            assert r.returncode == 0, r.stderr
            blk = results(r)
            assert blk["error-count"] == 0, blk["errors"]
            assert blk["initial"] == "unknown" and blk["writes"] > 0 and blk["reads"] > 0
    finally:
        stop_process(be)
