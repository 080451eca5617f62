"""A file the user owns, a live socket, a dead one: kickcall takes only what is free or dead, and
removes only what it created."""

from __future__ import annotations

import os
import socket
import stat
import subprocess
import sys
import threading

import pytest

from helpers import SRC, spawn, stop_process, wait_for_listener
from kickcall.ownership import PathRefused, RefusalKind, SocketClaim
from kickcall.virtio.image import create_image


def kickcall(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "kickcall", *args], capture_output=True, text=True,
                          timeout=timeout, env=dict(os.environ, PYTHONPATH=SRC), stdin=subprocess.DEVNULL)


def listening(path: str) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(path)
    s.listen(4)
    return s


def accepts(path: str) -> bool:
    c = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        c.connect(path)
        return True
    except OSError:
        return False
    finally:
        c.close()


def dead_socket(path: str) -> None:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(path)
    s.close()  # the file stays: what a process that died leaves behind


# -- the claim itself --------------------------------------------------------------------------------
def test_a_users_regular_file_is_never_replaced(workdir):
    p = os.path.join(workdir, "notes.txt")
    with open(p, "w") as f:
        f.write("mine")
    with pytest.raises(PathRefused) as ei:
        SocketClaim(p)
    assert ei.value.kind is RefusalKind.EXISTS and "regular file" in str(ei.value)
    with open(p) as f:
        assert f.read() == "mine"
    assert not os.path.exists(p + ".lock")


@pytest.mark.parametrize("target", ["dangling", "file", "socket"])
def test_a_symlink_is_never_followed_or_replaced(workdir, target):
    link = os.path.join(workdir, "link")
    other = os.path.join(workdir, "other")
    srv = None
    if target == "file":
        with open(other, "w") as f:
            f.write("x")
    elif target == "socket":
        dead_socket(other)
    os.symlink(other, link)
    try:
        with pytest.raises(PathRefused) as ei:
            SocketClaim(link)
        assert ei.value.kind is RefusalKind.SYMLINK
        assert os.readlink(link) == other
        if target == "file":
            with open(other) as f:
                assert f.read() == "x"
    finally:
        if srv is not None:
            srv.close()


def test_a_live_socket_is_never_taken_over(workdir):
    p = os.path.join(workdir, "live.sock")
    srv = listening(p)
    try:
        ino = os.stat(p).st_ino
        with pytest.raises(PathRefused) as ei:
            SocketClaim(p)
        assert ei.value.kind is RefusalKind.LIVE_SOCKET
        assert os.stat(p).st_ino == ino and accepts(p)
    finally:
        srv.close()


def test_a_dead_socket_is_taken_over_and_ours_removed_at_release(workdir):
    p = os.path.join(workdir, "dead.sock")
    dead_socket(p)
    with SocketClaim(p) as c:
        s = c.bind()
        assert accepts(p)
        assert stat.S_IMODE(os.stat(p).st_mode) == 0o600
        assert os.path.exists(p + ".lock")
        s.close()
    assert not os.path.exists(p) and not os.path.exists(p + ".lock")


def test_release_leaves_a_path_someone_else_replaced(workdir):
    p = os.path.join(workdir, "x.sock")
    c = SocketClaim(p)
    s = c.bind()
    s.close()
    os.unlink(p)
    with open(p, "w") as f:  # somebody else's file now
        f.write("theirs")
    c.release()
    with open(p) as f:
        assert f.read() == "theirs"


def test_racing_claims_have_exactly_one_winner(workdir):
    """Eight threads claim one path at once, 200 times over (a loser that created the lock file
    must not remove it: the winner's lock would then guard a file nobody else can see)."""
    for n in range(200):
        p = os.path.join(workdir, f"race{n}.sock")
        results: list[object] = []
        barrier = threading.Barrier(8)

        def go() -> None:
            barrier.wait()
            try:
                results.append(SocketClaim(p))
            except PathRefused as e:
                results.append(e)

        ts = [threading.Thread(target=go) for _ in range(8)]
        for t in ts:
            t.start()
        for t in ts:
            t.join()
        won = [r for r in results if isinstance(r, SocketClaim)]
        lost = [r for r in results if isinstance(r, PathRefused)]
        assert len(won) == 1 and all(e.kind is RefusalKind.IN_USE for e in lost), (n, results)
        won[0].release()
        assert not os.path.exists(p + ".lock")


def test_a_missing_directory_is_named(workdir):
    with pytest.raises(PathRefused) as ei:
        SocketClaim(os.path.join(workdir, "no", "such", "x.sock"))
    assert ei.value.kind is RefusalKind.NO_ACCESS


def test_a_path_too_long_for_a_socket_is_refused(workdir):
    with pytest.raises(PathRefused) as ei:
        SocketClaim(os.path.join(workdir, "x" * 120))
    assert ei.value.kind is RefusalKind.TOO_LONG


# -- kickcall run --qmp -------------------------------------------------------------------------------------
def test_run_qmp_on_a_users_file_refuses_and_keeps_the_file(workdir):
    p = os.path.join(workdir, "important.txt")
    with open(p, "w") as f:
        f.write("do not delete")
    r = kickcall("run", "--qmp", p, "--duration", "1")
    assert r.returncode == 2 and p in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    with open(p) as f:
        assert f.read() == "do not delete"


def test_run_qmp_on_a_live_monitor_leaves_that_monitor_alone(workdir):
    p = os.path.join(workdir, "vm.qmp")
    first = spawn([sys.executable, "-m", "kickcall", "run", "--qmp", p, "--duration", "120", "--plain"],
                  stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        wait_for_listener(p, first)
        ino = os.stat(p).st_ino
        r = kickcall("run", "--qmp", p, "--duration", "1")
        assert r.returncode == 2 and "in use" in r.stderr, r.stderr
        assert os.stat(p).st_ino == ino and accepts(p)
    finally:
        stop_process(first)
    assert not os.path.exists(p)  # the first run removed its own socket when it stopped


# -- kickcall vhost-user-blk ---------------------------------------------------------------------------------
def test_a_second_backend_on_a_live_socket_leaves_the_first_serving(workdir):
    img = os.path.join(workdir, "d.img")
    img2 = os.path.join(workdir, "e.img")
    create_image(img, 1 << 20)
    create_image(img2, 1 << 20)
    sock = os.path.join(workdir, "vblk.sock")
    first = spawn([sys.executable, "-m", "kickcall", "vhost-user-blk", "--socket-path", sock, "--blk-file", img],
                  stderr=subprocess.PIPE, text=True)
    try:
        wait_for_listener(sock, first)
        ino = os.stat(sock).st_ino
        r = kickcall("vhost-user-blk", "--socket-path", sock, "--blk-file", img2,
                     "--qmp", os.path.join(workdir, "m.qmp"))
        assert r.returncode == 2 and sock in r.stderr and "Traceback" not in r.stderr, r.stderr
        assert os.stat(sock).st_ino == ino and accepts(sock)
        assert not os.path.exists(os.path.join(workdir, "m.qmp"))
    finally:
        stop_process(first)


@pytest.mark.parametrize("case", ["file", "dangling-symlink", "symlink-to-file", "live-monitor", "no-directory"])
def test_a_refused_qmp_path_leaves_no_vhost_user_socket_behind(workdir, case):
    img = os.path.join(workdir, "d.img")
    create_image(img, 1 << 20)
    sock = os.path.join(workdir, "vblk.sock")
    qmp = os.path.join(workdir, "be.qmp")
    srv = None
    if case == "file":
        with open(qmp, "w") as f:
            f.write("user")
    elif case == "dangling-symlink":
        os.symlink(os.path.join(workdir, "gone"), qmp)
    elif case == "symlink-to-file":
        with open(os.path.join(workdir, "target"), "w") as f:
            f.write("user")
        os.symlink(os.path.join(workdir, "target"), qmp)
    elif case == "live-monitor":
        srv = listening(qmp)
    else:
        qmp = os.path.join(workdir, "missing-dir", "be.qmp")
    try:
        before = sorted(os.listdir(workdir))
        r = kickcall("vhost-user-blk", "--socket-path", sock, "--blk-file", img, "--qmp", qmp)
        assert r.returncode == 2 and qmp in r.stderr and "Traceback" not in r.stderr, r.stderr
        assert len(r.stderr.strip().splitlines()) == 1, r.stderr
        assert sorted(os.listdir(workdir)) == before  # nothing created, nothing removed
        if srv is not None:
            assert accepts(qmp)
    finally:
        if srv is not None:
            srv.close()
