"""Real qemu-storage-daemon serving a raw image as a vhost-user-blk export."""

from __future__ import annotations

import os
import time
from collections.abc import Sequence

from ..monitor.client import QMPClient
from .qemu import ManagedProcess, PeerError, PeerTimeout, check_socket_path, open_qmp, qmp_quit

QSD_BINARY = "qemu-storage-daemon"


class QSD(ManagedProcess):
    """``qemu-storage-daemon`` exporting *image* over vhost-user-blk at *sock_path*, with a QMP monitor
    at *qmp_path* (default: ``<dir of sock_path>/qsd-qmp.sock``).

    *iothread*: run the export in an IOThread (``--object iothread,id=iot0`` and the export's
    ``iothread=iot0``; QEMU's AioContext adaptive polling, poll-max-ns 32768 by default) instead of
    the daemon's main loop.

    ``start()`` returns once the export socket exists; ``stop()`` sends QMP ``quit`` (QSD then removes
    its sockets), falls back to SIGTERM/SIGKILL, and always reaps the process. Context manager.
    """

    kind = "qemu-storage-daemon"

    def __init__(self, image: str, sock_path: str, *, qmp_path: str | None = None, writable: bool = True,
                 num_queues: int = 1, extra_args: Sequence[str] = (), binary: str = QSD_BINARY,
                 iothread: bool = False):
        super().__init__()
        self.image = os.path.abspath(image)
        self.sock_path = check_socket_path(sock_path)
        self.qmp_path = check_socket_path(qmp_path or os.path.join(os.path.dirname(sock_path) or ".",
                                                                   "qsd-qmp.sock"))
        self.writable = writable
        self.num_queues = num_queues
        self.iothread = iothread
        self.extra_args = list(extra_args)
        self.binary = binary
        for p in (self.image, self.sock_path, self.qmp_path):
            if "," in p:
                raise ValueError(f"QSD option values cannot contain ',': {p!r}")

    def command(self) -> list[str]:
        iot = ["--object", "iothread,id=iot0"] if self.iothread else []
        return [
            self.binary,
            *iot,
            "--blockdev", f"driver=file,node-name=file0,filename={self.image}",
            "--blockdev", "driver=raw,node-name=disk0,file=file0",
            "--export", (f"type=vhost-user-blk,id=exp0,node-name=disk0,addr.type=unix,addr.path={self.sock_path},"
                         f"writable={'on' if self.writable else 'off'},num-queues={self.num_queues}"
                         + (",iothread=iot0" if self.iothread else "")),
            "--chardev", f"socket,id=qmp0,path={self.qmp_path},server=on,wait=off",
            "--monitor", "chardev=qmp0",
            *self.extra_args,
        ]

    def start(self, timeout: float = 30.0) -> QSD:
        if not os.path.exists(self.image):
            raise FileNotFoundError(self.image)
        for p in (self.sock_path, self.qmp_path):  # a stale socket would make the wait below lie
            if os.path.exists(p):
                raise PeerError(f"{p} already exists (another backend, or a stale socket)")
        self._spawn(self.command())
        try:
            self.wait_for_socket(timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def wait_for_socket(self, timeout: float = 30.0) -> float:
        """Poll for the export and QMP sockets; the seconds it took from launch."""
        deadline = time.monotonic() + timeout
        delay = 0.005
        while not (os.path.exists(self.sock_path) and os.path.exists(self.qmp_path)):
            if self.proc is None or self.proc.poll() is not None:
                self._join_readers()
                raise PeerError(f"{self.kind} exited before creating {self.sock_path}\n" + self.describe())
            if time.monotonic() > deadline:
                raise PeerTimeout(f"{self.kind}: {self.sock_path} did not appear within {timeout:.1f} s\n"
                                  + self.describe())
            time.sleep(delay)
            delay = min(delay * 2, 0.05)
        return time.monotonic() - self.started_at

    def qmp(self, timeout: float = 5.0) -> QMPClient:
        """A new QMP connection to the daemon (one client at a time); close it when done."""
        return open_qmp(self.qmp_path, timeout, alive=self.running)

    def _polite_stop(self, timeout: float) -> bool:
        return os.path.exists(self.qmp_path) and qmp_quit(self.qmp_path, timeout)
