"""``kickcall shell``: HMP and QMP lines against a machine's monitor, from a pipe and on a terminal
(completion with Tab, history kept between sessions with owner-only permissions)."""

from __future__ import annotations

import os
import pty
import select
import subprocess
import tempfile
import time

import pytest

from helpers import SRC, _die_with_parent, kickcall_argv, running_machine, stop_process, wait_for
from kickcall.monitor.client import QMPClient
from kickcall.monitor.shell import Shell

pytestmark = pytest.mark.slow

M = """
[machine]
vcpus = 1
[[device]]
type = "virtio-blk"
id = "blk0"
size = "4M"
"""


@pytest.fixture
def machine_qmp():
    d = tempfile.mkdtemp(prefix="kc")
    qmp = os.path.join(d, "m.qmp")
    with running_machine(M) as m:
        m.start_monitor(qmp)
        yield m, qmp, d
    for root, dirs, files in os.walk(d, topdown=False):
        for f in files:
            os.unlink(os.path.join(root, f))
        for x in dirs:
            os.rmdir(os.path.join(root, x))
    os.rmdir(d)


def test_shell_from_a_pipe(machine_qmp):
    m, qmp, d = machine_qmp
    lines = "\n".join([
        "info virtio",
        "info notifiers blk0",
        "info msix blk0",
        "query-status",
        'x-query-virtio-queue-status path=/machine/peripheral/blk0/virtio-backend queue=0',
        '{"execute": "query-version"}',
        "x-debug-device-event blk0 kick 0",
        "x-query-virtio-queue-status path=/nope queue=0",
        "info virtio-queue-status /machine/peripheral/blk0/virtio-backend 99",
        "no-such-thing",
        "query-status bad",
    ]) + "\n"
    p = subprocess.run(kickcall_argv("shell", qmp), input=lines, capture_output=True, text=True, timeout=60,
                       env=dict(os.environ, XDG_STATE_HOME=d))
    out = p.stdout
    assert p.returncode == 0, p.stderr
    assert "/machine/peripheral/blk0/virtio-backend [virtio-blk]" in out
    assert "host" in out and "guest" in out  # the notifier table
    assert "MSI-X: enabled" in out
    assert '"status": "running"' in out
    assert '"queue-index": 0' in out and '"package": "kickcall' in out
    assert "kick injected on queue 0 of blk0 through ioeventfd" in out
    assert "event X_DEVICE_EVENT_INJECTED" in out
    assert "Error: GenericError: Path /nope is not a VirtIODevice" in out
    assert "Invalid virtqueue number 99" in out
    assert "unknown command: 'no-such-thing'" in out
    assert "Error: argument 'bad' is not key=value" in out


class _Terminal:
    """The master side of a pty, read up to a needle at a time; whatever arrived after the needle in
    the same read is kept for the next wait (output and the next prompt often come in one chunk)."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.pending = b""

    def until(self, needle: bytes, timeout: float = 20.0) -> bytes:
        buf = self.pending
        deadline = time.monotonic() + timeout
        while needle not in buf:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"{needle!r} not seen; got {buf[-400:]!r}")
            r, _, _ = select.select([self.fd], [], [], left)
            if r:
                try:
                    chunk = os.read(self.fd, 4096)
                except OSError:
                    break
                if not chunk:
                    break
                buf += chunk
        if needle not in buf:
            raise AssertionError(f"{needle!r} not seen before the terminal closed; got {buf[-400:]!r}")
        end = buf.index(needle) + len(needle)
        self.pending = buf[end:]
        return buf[:end]


def test_shell_on_a_terminal_completes_and_keeps_history(machine_qmp):
    m, qmp, d = machine_qmp
    env = dict(os.environ, XDG_STATE_HOME=d, TERM="dumb", PYTHONPATH=SRC)
    for round_ in range(2):
        master, slave = pty.openpty()
        p = subprocess.Popen(kickcall_argv("shell", qmp), stdin=slave, stdout=slave, stderr=slave, env=env,
                             start_new_session=True, preexec_fn=_die_with_parent)
        os.close(slave)
        term = _Terminal(master)
        try:
            term.until(b"(kickcall) ", 60)  # (a Python start-up on a loaded machine)
            if round_ == 0:
                os.write(master, b"info virt\t")  # Tab completes "virtio" and lists the virtio-* topics
                got = term.until(b"virtio-queue-status")
                assert b"virtio-vhost-queue-status" in got and b"virtio-status" in got
                os.write(master, b"\x15info virtio\r")  # ^U clears the line
                term.until(b"[virtio-blk]")
            else:
                os.write(master, b"\x1b[A\r")  # Up: the last line of the first session
                term.until(b"[virtio-blk]")
            term.until(b"(kickcall) ")
            os.write(master, b"\x04")  # ^D
            wait_for(lambda: p.poll() is not None, 20, "the shell to exit")
            assert p.returncode == 0
        finally:
            stop_process(p)
            os.close(master)
    hist = os.path.join(d, "kickcall", "shell_history")
    assert oct(os.stat(hist).st_mode & 0o777) == "0o600"
    assert "info virtio" in open(hist).read()


def test_completion_candidates(machine_qmp):
    m, qmp, d = machine_qmp
    with QMPClient(qmp).connect() as c:
        sh = Shell(c, out=open(os.devnull, "w"))
        assert "x-debug-device-event" in sh.complete("x-debug-dev")
        assert sh.complete("info no") == ["notifiers"]
        assert "blk0" in sh.complete("info notifiers b")
        assert "/machine/peripheral/blk0/virtio-backend" in sh.complete("info virtio-queue-status /m")
        assert "query-status" in sh.complete("query-st")
