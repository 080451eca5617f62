"""A recording QMP proxy for the tests: it sits between ``kickcall diagnose`` and a monitor socket,
forwards every byte both ways, and records every command (and every HMP line passed through
``human-monitor-command``) the client sends.  :func:`check` holds the record against the per-target
table of docs/diagnose.md -- the documentation, not kickcall's code, is the reference, so the code,
its documentation and its behaviour must all agree.
"""

from __future__ import annotations

import json
import os
import re
import socket
import threading
from dataclasses import dataclass

DOC = os.path.join(os.path.dirname(__file__), "..", "docs", "diagnose.md")


@dataclass
class Sent:
    command: str
    arguments: dict
    reply: object = None


@dataclass
class Rule:
    target: str
    command: str
    property_type: bool = False
    hmp: str | None = None
    emulated_only: bool = False
    fix_only: bool = False


def doc_rules() -> tuple[list[Rule], set[str]]:
    """The allowed-queries table and the emulated-only QOM types, parsed from docs/diagnose.md."""
    text = open(DOC).read()
    table = text.split("<!-- allowed-queries -->", 1)[1].split("<!-- /allowed-queries -->", 1)[0]
    rules = []
    for line in table.strip().splitlines()[2:]:
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        target, command, only = cells[0], cells[1].strip("`"), cells[2]
        m = re.search(r"HMP line matching `([^`]+)`", only)
        rules.append(Rule(target, command, "`property=type`" in only, m.group(1) if m else None,
                          "emulated devices" in only, "`--fix`" in only))
    types = text.split("<!-- emulated-types -->", 1)[1].split("<!-- /emulated-types -->", 1)[0]
    return rules, {t.strip() for t in types.replace("\n", " ").split(",") if t.strip()}


def _objects(buf: bytearray, dec: json.JSONDecoder) -> list[dict]:
    out = []
    while True:
        text = bytes(buf).lstrip()
        if not text:
            buf.clear()
            return out
        try:
            s = text.decode("utf-8", errors="replace")
            obj, end = dec.raw_decode(s)
        except json.JSONDecodeError:
            del buf[:len(buf) - len(text)]
            return out
        consumed = len(s[:end].encode())
        del buf[:]
        buf.extend(text[consumed:])
        if isinstance(obj, dict):
            out.append(obj)


class RecordingProxy:
    """Listens on *path*; each client connection is forwarded to *upstream*."""

    def __init__(self, path: str, upstream: str) -> None:
        self.path = path
        self.upstream = upstream
        self.sent: list[Sent] = []
        self.connections = 0
        self._lock = threading.Lock()
        self._ls = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._ls.bind(path)
        os.chmod(path, 0o600)
        self._ls.listen(8)
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._socks: list[socket.socket] = []
        t = threading.Thread(target=self._accept, daemon=True)
        t.start()
        self._threads.append(t)

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                c, _ = self._ls.accept()
            except OSError:
                return
            u = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                u.connect(self.upstream)
            except OSError:
                c.close()
                u.close()
                continue
            with self._lock:
                self.connections += 1
                self._socks += [c, u]
            pending: dict[object, Sent] = {}
            for src, dst, up in ((c, u, True), (u, c, False)):
                t = threading.Thread(target=self._pump, args=(src, dst, up, pending), daemon=True)
                t.start()
                self._threads.append(t)

    def _pump(self, src: socket.socket, dst: socket.socket, upward: bool, pending: dict) -> None:
        buf = bytearray()
        dec = json.JSONDecoder()
        while True:
            try:
                data = src.recv(65536)
            except OSError:
                data = b""
            if not data:
                try:
                    dst.shutdown(socket.SHUT_WR)
                except OSError:
                    pass
                return
            buf.extend(data)
            for obj in _objects(buf, dec):
                cmd = obj.get("execute") or obj.get("exec-oob")
                if upward and isinstance(cmd, str):
                    args = obj.get("arguments") if isinstance(obj.get("arguments"), dict) else {}
                    s = Sent(cmd, args)
                    with self._lock:
                        self.sent.append(s)
                        pending[json.dumps(obj.get("id"))] = s
                elif not upward and "return" in obj:
                    with self._lock:
                        s = pending.pop(json.dumps(obj.get("id")), None)
                    if s is not None:
                        s.reply = obj["return"]
            try:
                dst.sendall(data)
            except OSError:
                return

    def close(self) -> None:
        self._stop.set()
        self._ls.close()
        with self._lock:
            for s in self._socks:
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                s.close()
        for t in self._threads:
            t.join(10)
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass

    def __enter__(self) -> RecordingProxy:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def check(sent: list[Sent], target: str, *, fix: bool = False) -> list[str]:
    """Every command in *sent* that the documented table does not allow on *target* (a kind as the
    table names it: "qemu", "kickcall-backend", ...).  Empty: all allowed."""
    rules, emulated_types = doc_rules()
    types: dict[str, str] = {}  # path -> QOM type, as the monitor answered qom-get
    bad = []
    for s in sent:
        ok = False
        for r in rules:
            if r.command != s.command or r.target not in ("every monitor", target):
                continue
            if r.fix_only and not fix:
                continue
            if r.property_type and s.arguments.get("property") != "type":
                continue
            if r.hmp is not None and not re.fullmatch(r.hmp, str(s.arguments.get("command-line", ""))):
                continue
            if r.emulated_only and types.get(str(s.arguments.get("path"))) not in emulated_types:
                continue
            ok = True
            break
        if not ok:
            bad.append(f"{s.command} {json.dumps(s.arguments)}")
        if s.command == "qom-get" and s.arguments.get("property") == "type" and isinstance(s.reply, str):
            types[str(s.arguments.get("path"))] = s.reply
    return bad


__all__ = ["RecordingProxy", "Sent", "check", "doc_rules"]
