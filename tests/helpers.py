"""Helpers for machine-level tests: build a machine from TOML text, wait on conditions."""

from __future__ import annotations

import os
import time
from contextlib import contextmanager
from typing import Callable, Iterator

from kickcall.machine import Machine, parse_config


def wait_for(pred: Callable[[], object], timeout: float = 20.0, what: str = "condition") -> object:
    """Poll *pred* until it returns something truthy (never a fixed sleep)."""
    deadline = time.monotonic() + timeout
    while True:
        v = pred()
        if v:
            return v
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.002)


def fd_count() -> int:
    """How many fds this process has open (tests check nothing leaks)."""
    return len(os.listdir("/proc/self/fd"))


BLK = """
[[device]]
type = "virtio-blk"
id = "{id}"
size = "{size}"
queues = {queues}
ioeventfd = {ioeventfd}
irqfd = {irqfd}
msix = {msix}
"""


def vhost_toml(sock: str, *, queues: int = 1, vcpus: int = 2, inflight: bool = True, dev_id: str = "vblk") -> str:
    """A machine whose virtio-blk *dev_id* a vhost-user back-end at *sock* serves."""
    return f"""
[machine]
vcpus = {vcpus}
[[device]]
type = "virtio-blk"
id = "{dev_id}"
backend = "vhost-user"
socket = "{sock}"
queues = {queues}
inflight = {str(inflight).lower()}
"""


def machine_toml(*, vcpus: int = 2, guest: str = "process", devices: str = "", ram: str = "64M") -> str:
    return f"""
[machine]
ram = "{ram}"
vcpus = {vcpus}
guest = "{guest}"
{devices}
"""


def blk(id: str = "blk0", *, size: str = "4M", queues: int = 1, ioeventfd: bool = True, irqfd: bool = True,
        msix: bool = True) -> str:
    return BLK.format(id=id, size=size, queues=queues, ioeventfd=str(ioeventfd).lower(),
                      irqfd=str(irqfd).lower(), msix=str(msix).lower())


@contextmanager
def running_machine(toml: str, *, boot: bool = True, msix: bool = True) -> Iterator[Machine]:
    m = Machine(parse_config(toml, "<test>"))
    try:
        m.start(boot=boot, msix=msix)
        yield m
    finally:
        m.stop()
        if m.guest_proc is not None:
            assert m.guest_proc.poll() is not None, "the guest process outlived its machine"


def guest_irq_count(m: Machine, vector: int) -> int:
    """How many times the guest took the interrupt on CPU vector *vector* (all CPUs)."""
    for d in m.guest_stats()["interrupts"]:
        if d["vector"] == vector:
            return sum(d["counts"])
    return 0


def guest_vector_of(m: Machine, dev_id: str, msix_entry: int) -> int:
    """The CPU vector the guest programmed into an MSI-X entry (its Message Data)."""
    p = m.device(dev_id)
    assert p.msix is not None
    return p.msix.get_message(msix_entry)[1] & 0xFF


def me() -> int:
    return os.getpid()


def _die_with_parent() -> None:  # runs in the child between fork and exec
    import ctypes
    import signal as _signal

    ctypes.CDLL(None).prctl(1, _signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG


def spawn(argv: list[str], **kw):
    """Start a process in its own process group that dies with the test process."""
    import subprocess

    base = kw.pop("env", None) or os.environ
    env = dict(base, PYTHONPATH=SRC + os.pathsep + base.get("PYTHONPATH", ""))
    return subprocess.Popen(argv, process_group=0, preexec_fn=_die_with_parent, env=env,
                            stdin=subprocess.DEVNULL, **kw)


def all_threads_stopped(pid: int) -> bool:
    """Every thread of *pid* is in the stopped state (a SIGSTOP takes effect thread by thread)."""
    states = []
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/stat") as f:
                states.append(f.read().rsplit(")", 1)[1].split()[0])
        except OSError:
            pass
    return bool(states) and all(st in "Tt" for st in states)


def stop_process(p, timeout: float = 10.0) -> int:
    """Terminate (then kill) and reap; returns the exit status."""
    import subprocess

    if p.poll() is None:
        p.terminate()
        try:
            p.wait(timeout)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait(timeout)
    return p.returncode


SRC = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "src")


def kickcall_argv(*args: str) -> list[str]:
    import sys

    return [sys.executable, "-m", "kickcall", *args]


def start_vhost_user_blk(sock: str, image: str, *args: str, **kw):
    """``kickcall vhost-user-blk`` in its own process; returns once its socket exists."""
    p = spawn(kickcall_argv("vhost-user-blk", "--socket-path", sock, "--blk-file", image, *args), **kw)
    try:
        wait_for(lambda: os.path.exists(sock) or p.poll() is not None, 30, "the back-end's socket")
    except AssertionError:
        stop_process(p)
        raise
    if p.poll() is not None:
        raise AssertionError(f"kickcall vhost-user-blk exited with {p.returncode}")
    return p


def wait_for_listener(path: str, proc=None, timeout: float = 60.0) -> None:
    """Until a Unix socket at *path* accepts a connection (the file exists a moment before the
    server listens: connecting in between is refused).  Fails early if *proc* exits."""
    import socket

    def ready() -> bool:
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"the process exited with {proc.returncode} before listening on {path}")
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            s.connect(path)
            return True
        except (FileNotFoundError, ConnectionRefusedError):
            return False
        finally:
            s.close()

    wait_for(ready, timeout, f"a listener on {path}")


def run_with_stderr_on_pty(argv: list[str], timeout: float = 300.0) -> tuple[int, bytes, str]:
    """Run *argv* with stdout a pipe and stderr a pseudo-terminal (what a program shows only on a
    terminal: progress lines); returns (exit status, stdout, everything written to the pty)."""
    import errno
    import pty
    import subprocess

    master, slave = pty.openpty()
    p = spawn(argv, stdout=subprocess.PIPE, stderr=slave)
    os.close(slave)
    try:
        out, _ = p.communicate(timeout=timeout)
    finally:
        stop_process(p)
    chunks = []
    while True:  # the child is gone: what it wrote is in the pty's buffer
        try:
            b = os.read(master, 65536)
        except OSError as e:
            assert e.errno == errno.EIO
            break
        if not b:
            break
        chunks.append(b)
    os.close(master)
    return p.returncode, out, b"".join(chunks).decode()


def interrupt_when(p, ready: Callable[[], object], what: str, out_path: str, err_path: str) -> tuple[str, str]:
    """Ctrl-C (SIGINT to the process group, as a terminal sends it) to *p* once *ready*; returns its
    stdout and stderr (files), having checked what every interrupted kickcall tool does: exit 130,
    no traceback, and "kickcall: interrupted" as the last line on stderr."""
    import signal

    try:
        wait_for(lambda: p.poll() is not None or ready(), 120, what)
        assert p.poll() is None
        os.killpg(p.pid, signal.SIGINT)
        p.wait(120)
    finally:
        stop_process(p)
    with open(out_path) as f:
        stdout = f.read()
    with open(err_path) as f:
        stderr = f.read()
    assert p.returncode == 130, (p.returncode, stdout, stderr)
    assert "Traceback" not in stderr
    assert stderr.strip().splitlines()[-1] == "kickcall: interrupted"
    return stdout, stderr
