"""Real QEMU (TCG) as a test peer, plus the process hygiene the peers share and their way to open a
QMP connection (with :class:`kickcall.monitor.client.QMPClient`, kickcall's one QMP client).

Every process started here runs in its own session (hence process group), gets
``PR_SET_PDEATHSIG(SIGKILL)`` so it dies with the thread that started it, and is always stopped and
reaped by ``stop()`` / the context manager. Console and stderr output are read by background
threads into lists of lines.
"""

from __future__ import annotations

import ctypes
import os
import re
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from ..threads import named_thread
from ..monitor.client import ConnectionProblem, QMPClient, QMPCommandError, QMPConnectionError

QEMU_BINARY = "qemu-system-x86_64"
SUN_PATH_MAX = 107  # sizeof(sun_path) - 1 for the NUL


class PeerError(RuntimeError):
    """A real peer failed: it exited early, or did not do what was awaited."""


class PeerTimeout(PeerError, TimeoutError):
    """Waiting for a real peer timed out."""


def check_socket_path(path: str) -> str:
    if len(os.fsencode(path)) > SUN_PATH_MAX:
        raise ValueError(f"unix socket path is {len(os.fsencode(path))} bytes, over the {SUN_PATH_MAX}-byte "
                         f"limit: {path!r} (make it under tempfile.mkdtemp(prefix='kc'))")
    return path


# --- process hygiene --------------------------------------------------------------------------------

_PR_SET_PDEATHSIG = 1
_prctl: Any = None  # libc's prctl, where there is one
try:
    _prctl = ctypes.CDLL(None, use_errno=True).prctl
    _prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
    _prctl.restype = ctypes.c_int
except (OSError, AttributeError):  # pragma: no cover - not Linux
    _prctl = None


def _make_preexec(parent_pid: int):
    def preexec() -> None:  # runs in the child between fork and exec: no allocation-heavy work
        if _prctl is not None:
            _prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        if os.getppid() != parent_pid:  # the parent died before prctl took effect
            os._exit(125)
    return preexec


class ManagedProcess:
    """A child in its own session with PDEATHSIG, whose stdout/stderr lines are collected by threads.

    Note: PR_SET_PDEATHSIG fires when the *thread* that forked the child exits, so start peers from a
    thread that outlives them (the test's main thread).
    """

    kind = "process"

    def __init__(self) -> None:
        self.argv: list[str] = []
        self.proc: subprocess.Popen | None = None
        self.lines: list[str] = []  # stdout (for QEMU: the guest's serial console)
        self.err_lines: list[str] = []
        self._cond = threading.Condition()
        self._threads: list[threading.Thread] = []
        self._open_readers = 0
        self.started_at = 0.0

    # -- launching and reading

    def _spawn(self, argv: Sequence[str]) -> None:
        if self.proc is not None:
            raise PeerError(f"{self.kind} already started")
        exe = shutil.which(argv[0])
        if exe is None:
            from .guest_image import INSTALL_HINT, PeerMissing
            raise PeerMissing(f"{argv[0]} is not installed; {INSTALL_HINT}")
        self.argv = [exe, *argv[1:]]
        self.started_at = time.monotonic()
        self.proc = subprocess.Popen(
            self.argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            start_new_session=True, preexec_fn=_make_preexec(os.getpid()), close_fds=True)
        for stream, sink, name in ((self.proc.stdout, self.lines, "out"),
                                   (self.proc.stderr, self.err_lines, "err")):
            t = named_thread(self._reader, f"kc-qemu-{name}", args=(stream, sink))
            self._open_readers += 1
            t.start()
            self._threads.append(t)

    def _reader(self, stream, sink: list[str]) -> None:
        pending = b""
        try:
            while True:
                chunk = stream.read1(65536)
                if not chunk:
                    break
                pending += chunk
                *complete, pending = pending.split(b"\n")
                if complete:
                    with self._cond:
                        sink.extend(c.rstrip(b"\r").decode("utf-8", "replace") for c in complete)
                        self._cond.notify_all()
        except (OSError, ValueError):
            pass
        finally:
            with self._cond:
                if pending:
                    sink.append(pending.rstrip(b"\r").decode("utf-8", "replace"))
                self._open_readers -= 1
                self._cond.notify_all()

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    @property
    def returncode(self) -> int | None:
        return self.proc.returncode if self.proc is not None else None

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def describe(self, n: int = 40) -> str:
        """The tail of the output, for error messages."""
        with self._cond:
            out, err = self.lines[-n:], self.err_lines[-20:]
        rc = self.proc.poll() if self.proc is not None else None
        parts = [f"{self.kind} pid {self.pid} rc {rc}; command: {' '.join(self.argv)}"]
        parts.append(f"last {len(out)} output lines:" + "".join(f"\n  | {ln}" for ln in out))
        if err:
            parts.append(f"last {len(err)} stderr lines:" + "".join(f"\n  ! {ln}" for ln in err))
        return "\n".join(parts)

    def wait_for_line(self, pattern: str | re.Pattern, timeout: float = 120.0, *, since: int = 0,
                      stream: str = "out") -> str:
        """The first output line at index >= *since* containing *pattern* (a substring, or a regex
        searched in the line). Raises PeerTimeout after *timeout* s, or PeerError when the process
        ended without printing it; both with the last 40 lines."""
        if self.proc is None:
            raise PeerError(f"{self.kind} not started")
        sink = self.lines if stream == "out" else self.err_lines
        match = pattern.search if isinstance(pattern, re.Pattern) else (lambda ln: pattern in ln)
        deadline = time.monotonic() + timeout
        i = since
        with self._cond:
            while True:
                while i < len(sink):
                    if match(sink[i]):
                        return sink[i]
                    i += 1
                if self._open_readers == 0:  # EOF on both pipes: the process is gone
                    break
                left = deadline - time.monotonic()
                if left <= 0:
                    raise PeerTimeout(f"{self.kind}: no line matching {pattern!r} within {timeout:.1f} s\n"
                                      + self._describe_unlocked())
                self._cond.wait(min(left, 1.0))
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass
        raise PeerError(f"{self.kind} exited without printing a line matching {pattern!r}\n" + self.describe())

    def _describe_unlocked(self) -> str:
        # called with self._cond held: copy what describe() needs without re-acquiring it
        out, err = self.lines[-40:], self.err_lines[-20:]
        rc = self.proc.poll() if self.proc is not None else None
        s = f"{self.kind} pid {self.pid} rc {rc}; command: {' '.join(self.argv)}\n"
        s += f"last {len(out)} output lines:" + "".join(f"\n  | {ln}" for ln in out)
        if err:
            s += f"\nlast {len(err)} stderr lines:" + "".join(f"\n  ! {ln}" for ln in err)
        return s

    def wait_exit(self, timeout: float = 120.0) -> int:
        """Wait for the process to end by itself; its return code (it is reaped)."""
        if self.proc is None:
            raise PeerError(f"{self.kind} not started")
        try:
            rc = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise PeerTimeout(f"{self.kind} still running after {timeout:.1f} s\n" + self.describe()) from None
        self._join_readers()
        return rc

    # -- stopping

    def _polite_stop(self, timeout: float) -> bool:
        """Ask the process to quit (QMP); True when the request was delivered."""
        return False

    def stop(self, grace: float = 10.0) -> int | None:
        """Stop the process: the polite way first, then SIGTERM, then SIGKILL to its process group.
        Always reaps it and joins the reader threads. Returns the exit code."""
        p = self.proc
        if p is None:
            return None
        try:
            if p.poll() is None and self._polite_stop(min(grace, 5.0)):
                try:
                    p.wait(timeout=grace)
                except subprocess.TimeoutExpired:
                    pass
            for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 30.0)):
                if p.poll() is not None:
                    break
                self._signal_group(sig)
                try:
                    p.wait(timeout=wait)
                except subprocess.TimeoutExpired:
                    pass
        finally:
            if p.poll() is None:
                self._signal_group(signal.SIGKILL)
                p.wait()
            self._join_readers()
        return p.returncode

    def _signal_group(self, sig: int) -> None:
        p = self.proc
        if p is None:
            return
        if p.poll() is not None:  # reaped by poll(): do not signal a pid that may be reused
            return
        try:
            os.killpg(p.pid, sig)
        except ProcessLookupError:
            pass
        except PermissionError:
            p.send_signal(sig)

    def _join_readers(self) -> None:
        for t in self._threads:
            t.join(timeout=10)
        for s in (self.proc.stdout, self.proc.stderr) if self.proc else ():
            if s is not None and not any(t.is_alive() for t in self._threads):
                s.close()

    def __enter__(self):
        if self.proc is None:
            self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def start(self):  # pragma: no cover - overridden
        raise NotImplementedError


# --- QMP: kickcall.monitor.client.QMPClient is the one client -------------------------------------

def open_qmp(path: str, timeout: float = 5.0, *, alive: Callable[[], bool] | None = None) -> QMPClient:
    """A connected, negotiated QMPClient on the QMP socket at *path*; close it when done.

    While nothing listens yet (no socket, or connection refused) it retries for up to *timeout*
    seconds, giving up at once when *alive* says the process that should listen has gone.
    Raises QMPConnectionError (its ``kind`` says why) or QMPCommandError."""
    client = QMPClient(check_socket_path(str(path)), timeout=timeout)
    deadline = time.monotonic() + timeout
    while True:
        try:
            return client.connect()
        except QMPConnectionError as e:
            client.close()
            if (e.kind not in (ConnectionProblem.NO_SOCKET, ConnectionProblem.REFUSED)
                    or time.monotonic() > deadline or (alive is not None and not alive())):
                raise
            time.sleep(0.02)
        except BaseException:
            client.close()
            raise


def qmp_quit(path: str, timeout: float = 5.0) -> bool:
    """Send ``quit`` over the QMP socket at *path*; True when it was delivered (a connection closed
    before the reply counts: QEMU may exit first)."""
    client = QMPClient(check_socket_path(str(path)), timeout=timeout)
    try:
        client.connect()
        client.execute("quit", allow_eof=True)
        return True
    except (OSError, ValueError, QMPCommandError):  # QMPConnectionError is an OSError
        return False
    finally:
        client.close()


# --- QEMU -------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class VhostUserBlk:
    """A vhost-user-blk-pci device; QEMU connects to *socket* as the client (the backend must listen)."""
    socket: str
    num_queues: int = 1
    reconnect: int | None = None  # seconds, the chardev's reconnect= option
    extra: str = ""  # appended to the -device option string, e.g. ",config-wce=off"


def kernel_cmdline(mode: str | None = None, **params) -> str:
    """``kc.mode=<mode> kc.<name>=<value>...`` for STANDARD_INIT_PRELUDE to pick up."""
    out = []
    if mode is not None:
        out.append(f"kc.mode={mode}")
    for k, v in params.items():
        out.append(f"kc.{k}={v}")
    for a in out:
        if any(c.isspace() for c in a):
            raise ValueError(f"kernel parameter {a!r} contains whitespace")
    return " ".join(out)


class QemuVM(ManagedProcess):
    """``qemu-system-x86_64`` (q35, TCG) booting *kernel* + *initrd*, serial console captured.

    Guest RAM is a shared memfd (vhost-user backends map it). Use as a context manager, or call
    ``start()`` and always ``stop()``.
    """

    kind = "qemu"

    def __init__(self, kernel: str, initrd: str | None = None, append: str = "", *, mem_mb: int = 512,
                 smp: int = 1, vhost_user_blk: Sequence[VhostUserBlk] = (), qmp_path: str | None = None,
                 extra_args: Sequence[str] = (), binary: str = QEMU_BINARY):
        super().__init__()
        self.kernel = kernel
        self.initrd = initrd
        self.append = append
        self.mem_mb = mem_mb
        self.smp = smp
        self.vhost_user_blk = list(vhost_user_blk)
        self.qmp_path = check_socket_path(qmp_path) if qmp_path else None
        self.extra_args = list(extra_args)
        self.binary = binary
        for d in self.vhost_user_blk:
            check_socket_path(d.socket)

    def command(self) -> list[str]:
        m = f"{self.mem_mb}M"
        # -net none: no default NIC, so no iPXE option ROM to run at boot
        argv = [self.binary, "-M", "q35", "-accel", "tcg", "-m", m, "-smp", str(self.smp), "-nographic",
                "-no-reboot", "-serial", "stdio", "-monitor", "none", "-net", "none",
                "-object", f"memory-backend-memfd,id=mem,size={m},share=on", "-machine", "memory-backend=mem",
                "-kernel", self.kernel]
        if self.initrd:
            argv += ["-initrd", self.initrd]
        argv += ["-append", " ".join(x for x in ("console=ttyS0 panic=-1 quiet", self.append) if x)]
        if self.qmp_path:
            argv += ["-qmp", f"unix:{self.qmp_path},server=on,wait=off"]
        for i, d in enumerate(self.vhost_user_blk):
            chardev = f"socket,id=c{i},path={d.socket}"
            if d.reconnect is not None:
                chardev += f",reconnect={int(d.reconnect)}"
            argv += ["-chardev", chardev,
                     "-device", f"vhost-user-blk-pci,chardev=c{i},num-queues={d.num_queues}{d.extra}"]
        return argv + self.extra_args

    def start(self) -> QemuVM:
        for d in self.vhost_user_blk:
            if d.reconnect is None and not os.path.exists(d.socket):
                raise PeerError(f"vhost-user socket {d.socket} does not exist: start the backend first "
                                "(QEMU is the socket client)")
        self._spawn(self.command())
        return self

    def qmp(self, timeout: float = 5.0) -> QMPClient:
        """A new QMP connection (QEMU serves one client at a time); close it when done."""
        if not self.qmp_path:
            raise PeerError("this QemuVM has no QMP socket (pass qmp_path=)")
        return open_qmp(self.qmp_path, timeout, alive=self.running)

    def _polite_stop(self, timeout: float) -> bool:
        path = self.qmp_path
        return path is not None and os.path.exists(path) and qmp_quit(path, timeout)
