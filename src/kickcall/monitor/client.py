"""kickcall's one synchronous QMP client (``kickcall diagnose``, ``kickcall shell``, the test peers
in :mod:`kickcall.peers`, ``bench``).

It works with QEMU, qemu-storage-daemon and kickcall's own monitors: reads the greeting,
negotiates, sends commands with ids, skips events while waiting for a reply (keeping them for
``events()``), and turns error replies into ``QMPCommandError``.  Nothing else in ``src/`` writes a
QMP command on a socket (tests/test_one_of_each.py scans for a second client).
"""

from __future__ import annotations

import enum
import itertools
import json
import socket
import struct
import time
from collections.abc import Callable
from typing import Any

__all__ = ["QMPClient", "QMPCommandError", "QMPConnectionError", "ConnectionProblem", "peer_pid", "process_state"]


class QMPCommandError(Exception):
    def __init__(self, cls: str, desc: str) -> None:
        super().__init__(f"{cls}: {desc}")
        self.cls = cls
        self.desc = desc


MAX_EVENTS = 1000  # events kept for events(); older ones are dropped
MAX_REPLY = 64 << 20  # one reply may not exceed this (a hostile monitor must not exhaust memory)


class ConnectionProblem(enum.Enum):
    """Why a monitor could not be used (the kind a QMPConnectionError carries)."""

    NO_SOCKET = "no-socket"  # nothing at the path
    REFUSED = "refused"  # a socket nobody listens on
    NOT_QMP = "not-qmp"  # it answered, but not with a QMP greeting
    NO_GREETING = "no-greeting"  # accepted the connection and never greeted (busy, or not running)
    BACKLOG_FULL = "backlog-full"  # the listener's backlog is full: connect() would block
    NO_REPLY = "no-reply"  # greeted, then did not answer a command in time
    CLOSED = "closed"  # the monitor closed the connection
    OTHER = "other"


class QMPConnectionError(ConnectionError):
    def __init__(self, msg: str, kind: ConnectionProblem = ConnectionProblem.OTHER) -> None:
        super().__init__(msg)
        self.kind = kind


def peer_pid(sock: socket.socket) -> int | None:
    """The pid of the process that owns the other end of a Unix socket (SO_PEERCRED): for a
    listening socket's connection, the process that called listen() -- known even before it
    accepts.  None when the kernel does not say (another pid namespace gives 0)."""
    try:
        pid, _uid, _gid = struct.unpack("3i", sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                                              struct.calcsize("3i")))
    except OSError:
        return None
    return pid or None


def process_state(pid: int) -> tuple[str, str] | None:
    """(state letter, command name) from /proc/PID/stat; None if the process is not visible."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            text = f.read()
    except OSError:
        return None
    try:
        comm = text[text.index("(") + 1:text.rindex(")")]
        return text[text.rindex(")") + 1:].split()[0], comm
    except (ValueError, IndexError):
        return None


class QMPClient:
    """A synchronous QMP client on a Unix socket: ``QMPClient(path).connect()``, then ``execute()``.

    Every read waits at most *timeout* seconds; connection failures raise QMPConnectionError with a
    ConnectionProblem ``kind``.  kickcall has no other QMP client (tests/test_one_of_each.py)."""

    def __init__(self, path: str, *, timeout: float = 10.0) -> None:
        self.path = path
        self.timeout = timeout
        self.sock: socket.socket | None = None
        self.greeting: dict = {}
        self._buf = b""
        self._ids = itertools.count(1)
        self._events: list[dict] = []
        self._dec = json.JSONDecoder()

    def connect(self, wait: float = 0.0, *, greeting_timeout: float | None = None,
                on_connected: Callable[[socket.socket], None] | None = None) -> "QMPClient":
        """Connect (retrying for *wait* seconds while nothing listens), read the greeting (within
        *greeting_timeout*, default the client's timeout) and negotiate.  *on_connected* sees the
        socket before the greeting is awaited (it may raise QMPConnectionError)."""
        deadline = time.monotonic() + wait
        while True:
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.settimeout(self.timeout)
            try:
                s.connect(self.path)
                break
            except BlockingIOError:  # EAGAIN: a Unix listener whose backlog is full
                s.close()
                raise QMPConnectionError(f"cannot connect to {self.path}: its listen backlog is full",
                                         ConnectionProblem.BACKLOG_FULL) from None
            except (FileNotFoundError, ConnectionRefusedError) as e:
                s.close()
                if time.monotonic() >= deadline:
                    kind = ConnectionProblem.NO_SOCKET if isinstance(e, FileNotFoundError) else ConnectionProblem.REFUSED
                    raise QMPConnectionError(f"cannot connect to {self.path}: {e}", kind) from None
                time.sleep(0.05)
            except OSError:
                s.close()
                raise
        self.sock = s
        if on_connected is not None:
            on_connected(s)
        s.settimeout(self.timeout if greeting_timeout is None else greeting_timeout)
        try:
            g = self._read()
        except QMPConnectionError as e:
            if e.kind is ConnectionProblem.NO_REPLY:
                e.kind = ConnectionProblem.NO_GREETING
            raise
        if not isinstance(g, dict) or "QMP" not in g or not isinstance(g["QMP"], dict):
            raise QMPConnectionError(f"{self.path} is not a QMP monitor (greeting {g!r:.200})",
                                     ConnectionProblem.NOT_QMP)
        s.settimeout(self.timeout)
        self.greeting = g["QMP"]
        self.execute("qmp_capabilities")
        return self

    def peer_pid(self) -> int | None:
        """The monitor's process, as the kernel names it (SO_PEERCRED)."""
        return None if self.sock is None else peer_pid(self.sock)

    def set_timeout(self, seconds: float) -> None:
        """How long any one read may wait from now on."""
        self.timeout = seconds
        if self.sock is not None:
            self.sock.settimeout(seconds)

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None

    def __enter__(self) -> "QMPClient":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _read(self) -> dict:
        assert self.sock is not None
        while True:
            text = self._buf.lstrip()
            if text:
                try:
                    obj, end = self._dec.raw_decode(text.decode("utf-8", errors="replace"))
                    consumed = len(text.decode("utf-8", errors="replace")[:end].encode())
                    self._buf = text[consumed:]
                    return obj
                except json.JSONDecodeError:
                    pass
            try:
                chunk = self.sock.recv(65536)
            except TimeoutError:
                raise QMPConnectionError(f"{self.path}: no answer within {self.timeout:g} s",
                                         ConnectionProblem.NO_REPLY) from None
            except ConnectionResetError:  # the monitor closed with our request unread (ECONNRESET)
                raise QMPConnectionError(f"{self.path}: the monitor reset the connection",
                                         ConnectionProblem.CLOSED) from None
            except OSError as e:
                raise QMPConnectionError(f"{self.path}: {e}") from None
            if not chunk:
                raise QMPConnectionError(f"{self.path}: the monitor closed the connection", ConnectionProblem.CLOSED)
            self._buf += chunk
            if len(self._buf) > MAX_REPLY:
                raise QMPConnectionError(f"{self.path}: a reply larger than {MAX_REPLY} bytes", ConnectionProblem.NOT_QMP)

    def execute(self, command: str, arguments: dict | None = None, *, allow_eof: bool = False) -> Any:
        """Run *command* and return its ``return`` value; an error reply raises QMPCommandError.

        With *allow_eof*, a monitor that closes the connection (or resets it) before the reply
        returns None instead of raising QMPConnectionError(CLOSED): QEMU and qemu-storage-daemon
        may exit on ``quit`` before their reply reaches the client."""
        if self.sock is None:
            raise QMPConnectionError("not connected")
        rid = f"kc-{next(self._ids)}"
        msg: dict = {"execute": command, "id": rid}
        if arguments:
            msg["arguments"] = arguments
        self.sock.sendall(json.dumps(msg).encode() + b"\r\n")
        while True:
            try:
                obj = self._read()
            except QMPConnectionError as e:
                if allow_eof and e.kind is ConnectionProblem.CLOSED:
                    return None
                raise
            if not isinstance(obj, dict):
                continue  # not a QMP message: skipped, as QEMU's own clients do
            if "event" in obj:
                self._events.append(obj)
                del self._events[:-MAX_EVENTS]
                continue
            if obj.get("id") != rid:
                continue
            if "error" in obj:
                err = obj["error"] if isinstance(obj["error"], dict) else {}
                raise QMPCommandError(str(err.get("class", "GenericError")), str(err.get("desc", "")))
            return obj.get("return")

    def events(self) -> list[dict]:
        ev, self._events = self._events, []
        return ev
