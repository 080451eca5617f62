"""A small synchronous QMP client (for ``kickcall diagnose`` and ``kickcall shell``).

It works with QEMU, qemu-storage-daemon and kickcall's own monitors: reads the greeting,
negotiates, sends commands with ids, skips events while waiting for a reply (keeping them for
``events()``), and turns error replies into ``QMPCommandError``.
"""

from __future__ import annotations

import itertools
import json
import socket
import time

__all__ = ["QMPClient", "QMPCommandError", "QMPConnectionError"]


class QMPCommandError(Exception):
    def __init__(self, cls: str, desc: str) -> None:
        super().__init__(f"{cls}: {desc}")
        self.cls = cls
        self.desc = desc


class QMPConnectionError(ConnectionError):
    pass


class QMPClient:
    def __init__(self, path: str, *, timeout: float = 10.0) -> None:
        self.path = path
        self.timeout = timeout
        self.sock: socket.socket | None = None
        self.greeting: dict = {}
        self._buf = b""
        self._ids = itertools.count(1)
        self._events: list[dict] = []
        self._dec = json.JSONDecoder()

    def connect(self, wait: float = 0.0) -> "QMPClient":
        deadline = time.monotonic() + wait
        while True:
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.settimeout(self.timeout)
            try:
                s.connect(self.path)
                break
            except (FileNotFoundError, ConnectionRefusedError) as e:
                s.close()
                if time.monotonic() >= deadline:
                    raise QMPConnectionError(f"cannot connect to {self.path}: {e}") from None
                time.sleep(0.05)
        self.sock = s
        g = self._read()
        if "QMP" not in g:
            raise QMPConnectionError(f"{self.path} is not a QMP monitor (greeting {g!r})")
        self.greeting = g["QMP"]
        self.execute("qmp_capabilities")
        return self

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
            except OSError as e:
                raise QMPConnectionError(f"{self.path}: {e}") from None
            if not chunk:
                raise QMPConnectionError(f"{self.path}: the monitor closed the connection")
            self._buf += chunk

    def execute(self, command: str, arguments: dict | None = None) -> object:
        if self.sock is None:
            raise QMPConnectionError("not connected")
        rid = f"kc-{next(self._ids)}"
        msg: dict = {"execute": command, "id": rid}
        if arguments:
            msg["arguments"] = arguments
        self.sock.sendall(json.dumps(msg).encode() + b"\r\n")
        while True:
            obj = self._read()
            if "event" in obj:
                self._events.append(obj)
                continue
            if obj.get("id") != rid:
                continue
            if "error" in obj:
                raise QMPCommandError(obj["error"].get("class", "GenericError"), obj["error"].get("desc", ""))
            return obj.get("return")

    def events(self) -> list[dict]:
        ev, self._events = self._events, []
        return ev
