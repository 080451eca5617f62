"""kickcall's QMP monitor against real QEMU 7.2 on the wire, and against real QMP clients.

1. Differential: the same raw bytes go to ``qemu-system-x86_64 -M none -S`` and to a kickcall
   ``QMPServer`` whose registry declares QEMU's schemas for the commands both have
   (``query-version``, ``query-status``, ``trace-event-get-state``, ``trace-event-set-state``,
   ``query-commands``, ``quit``).  Every reply is compared: error class and desc exactly, ``id``
   exactly, and the raw line byte for byte where the JSON has no float and no ``\\u`` escape (QEMU
   prints doubles with ``%.17g`` and escapes in upper case: same values, other spelling).
   Successful ``return`` values are not compared (the handlers here return canned values).
2. Real clients: ``qemu.qmp``'s QMPClient and legacy QEMUMonitorProtocol, and ``qmp-shell``
   (QMP and ``-H`` HMP mode) against a kickcall socket.

Each case runs on a fresh connection on both servers, then sends a resynchronisation that any
parser state survives: an ASCII control character (QEMU answers "stray" and resets its parser)
then a command with a unique id; the replies before that id are the case's replies.

A known, deliberate difference: when a request has several problems of the same rank (several bad
request members, or several unexpected arguments), QEMU names the one its hash tables yield first;
kickcall names the first in the order the client sent them.  For those cases (``SEVERAL_PROBLEMS``)
the class, id and shape must still be QEMU's, QEMU's description must be one of the problems
present (``rival_problems`` lists them), and kickcall's must be the first of them.  Every case
with a single problem must match QEMU exactly.
"""

from __future__ import annotations

import asyncio
import fnmatch
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

import pytest

from helpers import _die_with_parent, wait_for, wait_for_listener
from kickcall.monitor.schema import Arg, CommandRegistry, QMPError
from kickcall.monitor.target import TargetError
from kickcall.monitor.server import QMPServer

QEMU = shutil.which("qemu-system-x86_64")
QMP_SHELL = os.path.join(os.path.dirname(sys.executable), "qmp-shell")
assert QEMU is not None, "qemu-system-x86_64 is missing: run ./install.sh"
assert os.path.exists(QMP_SHELL), "qmp-shell is missing from the venv: run ./install.sh"

TIMEOUT = 10.0


class Qemu:
    """qemu-system-x86_64 -M none -S with a QMP Unix socket; in its own process group, killed with us."""

    def __init__(self) -> None:
        self.dir = tempfile.mkdtemp(prefix="kc")
        self.path = os.path.join(self.dir, "q.sock")
        self.log = open(os.path.join(self.dir, "qemu.log"), "wb")
        self.p = subprocess.Popen(
            [QEMU, "-M", "none", "-nodefaults", "-nographic", "-display", "none",
             "-qmp", f"unix:{self.path},server=on,wait=off", "-S"],
            process_group=0, preexec_fn=_die_with_parent, stdin=subprocess.DEVNULL, stdout=self.log,
            stderr=subprocess.STDOUT)
        try:
            wait_for_listener(self.path, self.p, TIMEOUT)
        except BaseException:
            self.close()
            raise

    def quit(self) -> list[dict]:
        """QMP quit; returns the messages seen after it (reply and events)."""
        c = Raw(self.path)
        c.negotiate()
        c.send(b'{"execute": "quit", "id": "bye"}')
        msgs = []
        while True:
            line = c.line()
            if line is None:
                break
            msgs.append(json.loads(line))
        c.close()
        return msgs

    def close(self) -> None:
        if self.p.poll() is None:
            try:
                self.quit()
                self.p.wait(5)
            except Exception:
                pass
        if self.p.poll() is None:
            os.killpg(self.p.pid, signal.SIGKILL)
        self.p.wait(10)
        self.log.close()
        shutil.rmtree(self.dir, ignore_errors=True)


class Raw:
    """A plain socket QMP client that sees every byte."""

    def __init__(self, path: str) -> None:
        self.s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.s.settimeout(TIMEOUT)
        self.s.connect(path)
        self.buf = b""
        self.eof = False
        self.greeting = self.line()
        assert self.greeting is not None

    def send(self, data: bytes) -> None:
        self.s.sendall(data)

    def line(self) -> bytes | None:
        """The next CRLF-terminated line (without CRLF), or None at EOF; fails after TIMEOUT."""
        deadline = time.monotonic() + TIMEOUT
        while b"\r\n" not in self.buf:
            if self.eof:
                return None
            if time.monotonic() > deadline:
                raise AssertionError(f"no reply within {TIMEOUT}s; have {self.buf[:200]!r}")
            chunk = self.s.recv(1 << 20)
            if not chunk:
                self.eof = True
                if not self.buf:
                    return None
                raise AssertionError(f"connection closed amid a line: {self.buf[:200]!r}")
            self.buf += chunk
        line, self.buf = self.buf.split(b"\r\n", 1)
        return line

    def negotiate(self) -> None:
        self.send(b'{"execute": "qmp_capabilities"}')
        assert json.loads(self.line()) == {"return": {}}

    def sync(self, tag: str) -> list[bytes]:
        """Resynchronise (control character, then a command with id *tag*); the lines before it."""
        self.send(b'\x01\n{"execute": "query-version", "id": "%s"}' % tag.encode())
        out = []
        while True:
            line = self.line()
            assert line is not None, f"disconnected before the sync reply; got {out!r}"
            if json.loads(line).get("id") == tag:
                return out
            out.append(line)

    def close(self) -> None:
        self.s.close()


# -- the kickcall side: QEMU's schemas, canned handlers that fail as QEMU's do ----------------------

TRACE_EVENTS = ("handle_qmp_command", "monitor_qmp_cmd_in_band", "qmp_enter_query_status")


def _trace_check(name: str, vcpu: int | None) -> list[str]:
    """trace/qmp.c on a machine without vCPUs (-M none): the vCPU check, then the name check."""
    if vcpu is not None:
        raise QMPError(f"invalid vCPU index {vcpu & 0xFFFFFFFF}")
    if "*" in name:
        return [e for e in TRACE_EVENTS if fnmatch.fnmatchcase(e, name)]
    if name not in TRACE_EVENTS:
        raise QMPError(f'unknown event "{name}"')
    return [name]


def _hmp(command_line: str, cpu_index: int | None = None) -> str:
    if command_line == "help":
        return "info [subcommand] -- show various information\r\nquit|q  -- quit the emulator\r\n"
    if command_line == "info":
        return "info status  -- show the current VM status\r\ninfo version  -- show the version\r\n"
    if command_line == "info status":
        return "VM status: paused (prelaunch)\r\n"
    return f"unknown command: '{command_line}'\r\n"


def _no_virtio(path: str, queue: int) -> dict:
    raise QMPError(f"Path {path} is not a VirtIODevice")


def _no_virtio_element(path: str, queue: int, index: int | None = None) -> dict:
    raise QMPError(f"Path {path} is not a VirtIO device")  # (sic: QEMU 7.2 words this one otherwise)


def qemu_like_registry() -> CommandRegistry:
    r = CommandRegistry()
    r.add("query-status", lambda: {"status": "prelaunch", "singlestep": False, "running": False})
    r.add("trace-event-get-state",
          lambda name, vcpu=None: [{"name": e, "vcpu": False, "state": "disabled"} for e in _trace_check(name, vcpu)],
          [Arg("name", "str"), Arg("vcpu", "int", optional=True)])
    r.add("trace-event-set-state",
          lambda name, enable, ignore_unavailable=None, vcpu=None: _trace_check(name, vcpu) and None,
          [Arg("name", "str"), Arg("enable", "bool"), Arg("ignore-unavailable", "bool", optional=True),
           Arg("vcpu", "int", optional=True)])
    r.add("quit", lambda: None)
    r.add("human-monitor-command", _hmp, [Arg("command-line", "str"), Arg("cpu-index", "int", optional=True)])
    # QEMU 7.2's schemas with uint16 members; on -M none every path fails the device lookup
    r.add("x-query-virtio-queue-status", _no_virtio, [Arg("path", "str"), Arg("queue", "int", min=0, max=0xFFFF)])
    r.add("x-query-virtio-queue-element", _no_virtio_element,
          [Arg("path", "str"), Arg("queue", "int", min=0, max=0xFFFF),
           Arg("index", "int", optional=True, min=0, max=0xFFFF)])
    return r  # query-version and query-commands are QMPServer's own


@pytest.fixture(scope="module")
def qemu():
    q = Qemu()
    yield q
    q.close()


@pytest.fixture(scope="module")
def kick():
    d = tempfile.mkdtemp(prefix="kc")
    srv = QMPServer(qemu_like_registry(), path=os.path.join(d, "k.sock"), name="wire").start()
    yield srv
    srv.stop()
    shutil.rmtree(d, ignore_errors=True)


# -- the differential cases -------------------------------------------------------------------------

def ex(name, args=None, **extra) -> bytes:
    msg = {"execute": name}
    if args is not None:
        msg["arguments"] = args
    msg.update(extra)
    return json.dumps(msg).encode()


GET, SET = "trace-event-get-state", "trace-event-set-state"
DEEP = 1030  # past QEMU's nesting limit of 1024

# (name, negotiate first, [writes]); a pause separates writes
CASES = [
    # before negotiation
    ("pre: query-version", False, [ex("query-version")]),
    ("pre: query-status with id", False, [ex("query-status", id="a")]),
    ("pre: unknown command", False, [ex("nope", id=1)]),
    ("pre: quit with a bad argument", False, [ex("quit", {"x": 1})]),
    ("pre: garbage", False, [b"garbage\n"]),
    ("pre: execute not a string", False, [b'{"execute": 5, "id": [1]}']),
    ("pre: an array", False, [b"[1, 2]"]),
    ("pre: exec-oob", False, [b'{"exec-oob": "query-status"}']),
    ("pre: caps enable not a list", False, [ex("qmp_capabilities", {"enable": "x"})]),
    ("pre: caps unknown capability", False, [ex("qmp_capabilities", {"enable": ["nope"]})]),
    ("pre: caps capability not a string", False, [ex("qmp_capabilities", {"enable": ["oob", 5]})]),
    ("pre: caps enable null", False, [ex("qmp_capabilities", {"enable": None})]),
    ("pre: caps unexpected argument", False, [ex("qmp_capabilities", {"foo": 1})]),
    ("pre: caps bad enable and unexpected", False, [ex("qmp_capabilities", {"foo": 1, "enable": "x"})]),
    ("pre: caps twice", False, [ex("qmp_capabilities", id={"deep": [1, {"x": None}]}),
                                ex("qmp_capabilities", id=2), ex("query-status", id=3)]),
    ("pre: caps enable empty", False, [ex("qmp_capabilities", {"enable": []}), ex("query-status", id=1)]),
    ("pre: caps arguments not an object", False, [b'{"execute": "qmp_capabilities", "arguments": []}']),
    # after negotiation: the request envelope
    ("unknown command", True, [ex("nope")]),
    ("caps again, with a bad argument", True, [ex("qmp_capabilities", {"foo": 1}, id=1)]),
    ("caps again, enable oob", True, [ex("qmp_capabilities", {"enable": ["oob"]})]),
    ("execute not a string", True, [b'{"execute": 5}']),
    ("arguments not an object", True, [b'{"execute": "query-version", "arguments": []}']),
    ("arguments null", True, [b'{"execute": "query-version", "arguments": null, "id": null}']),
    ("a JSON array", True, [b"[1, 2]"]),
    ("an empty array", True, [b"[]"]),
    ("a bare string", True, [b'"str"\n']),
    ("a bare number", True, [b"5\n"]),
    ("a bare float", True, [b"1.5\n"]),
    ("true and null", True, [b"true\nnull\n"]),
    ("no execute, other member", True, [b'{"foo": 1}']),
    ("an empty object", True, [b"{}"]),
    ("no execute, with id", True, [b'{"id": 5}']),
    ("no execute, arguments", True, [b'{"arguments": {}}']),
    ("extra member", True, [b'{"execute": "query-status", "foo": 1, "id": "x"}']),
    ("three problems", True, [b'{"arguments": 5, "foo": 1, "bar": 2}']),
    ("five problems", True, [b'{"xx": 1, "yy": 2, "zz": 3, "ww": 4, "execute": 5}']),
    ("several unexpected members", True, [b'{"a": 1, "b": 2, "c": 3, "d": 4}']),
    ("exec-oob without oob", True, [b'{"exec-oob": "query-status", "id": 1}']),
    ("execute and exec-oob", True, [b'{"execute": "nope", "exec-oob": "x"}']),
    ("id: nested object", True, [ex("nope", id={"a": [1, {"b": None}], "c": {"d": "e"}})]),
    ("id: list", True, [ex("nope", id=[1, "a", {"b": False}, []])]),
    ("id: string", True, [ex("nope", id="s p a c e")]),
    ("id: number", True, [ex("nope", id=42)]),
    ("id: negative", True, [ex("nope", id=-7)]),
    ("id: float", True, [ex("nope", id=0.1)]),
    ("id: true", True, [ex("nope", id=True)]),
    ("id: false", True, [ex("nope", id=False)]),
    ("id: null", True, [ex("nope", id=None)]),
    ("id: uint64 max", True, [b'{"execute": "nope", "id": 18446744073709551615}']),
    ("id: past uint64 is a double", True, [b'{"execute": "nope", "id": 99999999999999999999}']),
    ("id: past int64 negative", True, [b'{"execute": "nope", "id": -9223372036854775809}']),
    ("id: -0 and 1e5", True, [b'{"execute": "nope", "id": [-0, 1e5, 1E+2, 0.5e-3]}']),
    ("id: escapes", True, [b'{"execute": "nope", "id": "\\/\\b\\f\\n\\r\\t\\\'\\"\\\\"}']),
    ("id: unicode", True, [b'{"execute": "nope", "id": "\\u00e9\\ud83d\\ude00 \xc3\xa9 \xf0\x9f\x98\x80\x7f"}']),
    ("id: NUL", True, [b'{"execute": "nope", "id": "a\\u0000b \xc0\x80"}']),
    ("id: 800 levels", True, [b'{"execute": "nope", "id": ' + b"[" * 800 + b"]" * 800 + b"}"]),
    ("two ids", True, [b'{"execute": "nope", "id": 1, "id": 2}']),
    # arguments
    ("get: no arguments", True, [ex(GET)]),
    ("get: name int", True, [ex(GET, {"name": 5})]),
    ("get: name null", True, [ex(GET, {"name": None})]),
    ("get: name list", True, [ex(GET, {"name": []})]),
    ("get: name object", True, [ex(GET, {"name": {}})]),
    ("get: name bool", True, [ex(GET, {"name": True})]),
    ("get: name float", True, [ex(GET, {"name": 1.0})]),
    ("get: vcpu string", True, [ex(GET, {"name": "x", "vcpu": "1"})]),
    ("get: vcpu float", True, [ex(GET, {"name": "x", "vcpu": 1.5})]),
    ("get: vcpu null", True, [ex(GET, {"name": "x", "vcpu": None})]),
    ("get: vcpu bool", True, [ex(GET, {"name": "x", "vcpu": True})]),
    ("get: vcpu uint64", True, [b'{"execute": "%s", "arguments": {"name": "x", "vcpu": 18446744073709551615}}' % GET.encode()]),
    ("get: vcpu past uint64", True, [b'{"execute": "%s", "arguments": {"name": "x", "vcpu": 99999999999999999999}}' % GET.encode()]),
    ("get: unexpected", True, [ex(GET, {"name": "x", "zzz": 3})]),
    ("get: missing before unexpected", True, [ex(GET, {"vcpu": 1, "zzz": 3})]),
    ("get: mistyped before unexpected", True, [ex(GET, {"zzz": 3, "name": 1})]),
    ("get: three unexpected", True, [ex(GET, {"name": "x", "a": 1, "b": 2, "c": 3})]),
    ("get: five unexpected", True, [ex(GET, {"name": "x", "foo": 1, "bar": 2, "baz": 3, "qux": 4, "quux": 5})]),
    ("get: nine unexpected", True,
     [ex(GET, {"name": "x", **{f"k{i}": i for i in range(9)}})]),
    ("get: twenty unexpected", True, [ex(GET, {"name": "x", **{f"arg-{i * 7}": i for i in range(20)}})]),
    ("get: unknown event", True, [ex(GET, {"name": "nope"})]),
    ("get: a vCPU on -M none", True, [ex(GET, {"name": "handle_qmp_command", "vcpu": 0})]),
    ("get: a negative vCPU", True, [ex(GET, {"name": "handle_qmp_command", "vcpu": -1})]),
    ("get: pattern (success)", True, [ex(GET, {"name": "nothing-matches*"}, id=1)]),
    ("set: enable string", True, [ex(SET, {"name": "x", "enable": "yes"})]),
    ("set: enable int", True, [ex(SET, {"name": "x", "enable": 1})]),
    ("set: enable null", True, [ex(SET, {"name": "x", "enable": None})]),
    ("set: enable list", True, [ex(SET, {"name": "x", "enable": []})]),
    ("set: enable object", True, [ex(SET, {"name": "x", "enable": {}})]),
    ("set: name int", True, [ex(SET, {"name": 5, "enable": True})]),
    ("set: no name", True, [ex(SET, {"enable": True})]),
    ("set: no enable", True, [ex(SET, {"name": "x"})]),
    ("set: both wrong, schema order", True, [ex(SET, {"enable": 1, "name": 2})]),
    ("set: optional members mistyped", True,
     [ex(SET, {"name": "a", "enable": True, "ignore-unavailable": "x", "vcpu": "y"})]),
    ("set: vcpu mistyped", True, [ex(SET, {"name": "a", "enable": True, "ignore-unavailable": True, "vcpu": "y"})]),
    ("set: underscore spelling", True, [ex(SET, {"name": "a", "enable": True, "ignore_unavailable": True})]),
    ("set: unknown event", True, [ex(SET, {"name": "nope", "enable": True})]),
    ("set: unknown event, ignore-unavailable", True,
     [ex(SET, {"name": "nope", "enable": True, "ignore-unavailable": True})]),
    ("quit: unexpected", True, [ex("quit", {"x": 1})]),
    ("query-commands: unexpected", True, [ex("query-commands", {"x": 1})]),
    ("query-version: unexpected, id", True, [ex("query-version", {"x": 1}, id="q")]),
    ("query-status: success", True, [ex("query-status", id=1)]),
    # unsigned members (uint16): QEMU's visit_type_uint16() names the C type, and anything but an
    # integer is refused by visit_type_uint64() ("expects uint64"), not "Invalid parameter type"
    *[(f"u16: queue {v}", True, [b'{"execute": "x-query-virtio-queue-status", "arguments": {"path": "p", "queue": '
                                 + v.encode() + b"}}"])
      for v in ("0", "65535", "65536", "-1", "-65535", "1.0", "1e2", '"1"', "null", "true", "[]", "{}",
                "9223372036854775807", "18446744073709551615", "18446744073709551616", "-9223372036854775808",
                "-9223372036854775809")],
    ("u16: queue missing", True, [ex("x-query-virtio-queue-status", {"path": "p"})]),
    ("u16: path mistyped before queue", True, [ex("x-query-virtio-queue-status", {"queue": "q", "path": 1})]),
    ("u16: optional index", True, [ex("x-query-virtio-queue-element", {"path": "p", "queue": 1, "index": 65536})]),
    ("u16: optional index mistyped", True, [ex("x-query-virtio-queue-element", {"path": "p", "queue": 1,
                                                                                 "index": "0"}, id=[1])]),
    ("u16: handler error, odd path", True, [ex("x-query-virtio-queue-element", {"path": "a\u0000b\"c/é\x7f",
                                                                                  "queue": 0}, id="e")]),
    # how QEMU prints: escapes, doubles
    ("print: escapes in an id", True, [b'{"execute": "nope", "id": "\\b\\f\\n\\r\\t\\u0001\\u001f\\u007f\\u0080'
                                         b'\\u00ff\\uffef\\\\\\"/\\u00e9\\ud83d\\ude00"}']),
    ("print: doubles in an id", True, [b'{"execute": "nope", "id": [0.1, 1e5, 1.5e300, 5e-324, 2.5, -1.25e-7, '
                                         b'123456789.123, 1e22, 1e16, 1e17, 0.0, -0.0, 1e-400]}']),
    # JSON the parser refuses
    ("garbage", True, [b"garbage\n"]),
    ("garbage then a command", True, [b'garbage{"execute": "nope", "id": 1}']),
    ("unfinished object", True, [b'{"execute":']),
    ("unfinished string", True, [b'{"execute": "query-st']),
    ("unfinished single-quoted string", True, [b"{'execute': 'query-st"]),
    ("trailing comma in object", True, [b'{"a": 1,}']),
    ("trailing comma in list", True, [b"[1,]"]),
    ("comma only", True, [b"[,]"]),
    ("lone }", True, [b"}"]),
    ("lone ]", True, [b"]"]),
    ("lone : and ,", True, [b": ,"]),
    ("[ then }", True, [b"[}"]),
    ("{ then ]", True, [b"{]"]),
    ("object closed by ]", True, [b'{"execute": "query-status"]']),
    ("missing colon", True, [b'{"a" 1}']),
    ("missing comma in object", True, [b'{"a": 1 "b": 2}']),
    ("missing comma in list", True, [b"[1 2]"]),
    ("key not a string", True, [b"{1: 2}"]),
    ("key an object", True, [b'{{"a": 1}: 2}']),
    ("missing value", True, [b'{"a": }']),
    ("duplicate key", True, [b'{"a": 1, "a": 2}']),
    ("duplicate key after a bad value", True, [b'{"a": 1, "a": x}']),
    ("bad escape \\q", True, [b'{"execute": "x\\q"}']),
    ("short \\u", True, [b'{"execute": "x\\u12"}']),
    ("non-hex \\u", True, [b'{"execute": "x\\u00zz"}']),
    ("lone high surrogate", True, [b'{"execute": "x\\ud800"}']),
    ("lone low surrogate", True, [b'{"execute": "x\\uDC00"}']),
    ("high surrogate, bad low", True, [b'{"execute": "x\\uD83D\\u0041"}']),
    ("high surrogate, short low", True, [b'{"execute": "x\\uD83D\\uDE0"}']),
    ("noncharacter \\uFFFF", True, [b'{"execute": "x\\uFFFF"}']),
    ("noncharacter \\uFDD0", True, [b'{"execute": "x\\uFDD0"}']),
    ("noncharacter pair", True, [b'{"execute": "x\\uD83F\\uDFFF"}']),
    ("NUL in a command name", True, [b'{"execute": "x\\u0000"}']),
    ("modified UTF-8 NUL", True, [b'{"execute": "\xc0\x80"}']),
    ("invalid UTF-8: lone continuation", True, [b'{"execute": "\x80"}']),
    ("invalid UTF-8: truncated", True, [b'{"execute": "\xc3("}']),
    ("invalid UTF-8: lone lead", True, [b'{"execute": "\xe9"}']),
    ("invalid UTF-8: surrogate", True, [b'{"execute": "\xed\xa0\x80"}']),
    ("invalid UTF-8: overlong", True, [b'{"execute": "\xc1\xbf \xe0\x80\x80"}']),
    ("invalid UTF-8: beyond U+10FFFF", True, [b'{"execute": "\xf4\x90\x80\x80"}']),
    ("invalid UTF-8: 5 bytes", True, [b'{"execute": "\xf8\x88\x80\x80\x80"}']),
    ("invalid UTF-8: noncharacter", True, [b'{"execute": "\xef\xbf\xbf \xef\xb7\x90"}']),
    ("\\xFF in a string", True, [b'{"execute": "\xff"}']),
    ("bad escape before bad UTF-8", True, [b'{"execute": "nope", "id": "\\q\xe9"}']),
    ("bad UTF-8 before bad escape", True, [b'{"execute": "nope", "id": "\xe9\\q"}']),
    ("UTF-8 outside a string", True, [b"\xc3\xa9"]),
    ("\\xFF outside a string", True, [b"\xff"]),
    ("\\xFE resets, command runs", True, [b'\xfe{"execute": "nope", "id": 1}']),
    ("tab in a string", True, [b'{"execute": "ab\tcd"}']),
    ("control character in a string", True, [b'{"execute": "ab\x01cd"}']),
    ("NUL outside a string", True, [b"\x00"]),
    ("NUL in a string", True, [b'"ab\x00c"\n']),
    ("DEL", True, [b"\x7f\n"]),
    ("@", True, [b"@\n"]),
    ("interpolation %d", True, [b"%d\n"]),
    ("number then letters", True, [b"12a\n"]),
    ("number then UTF-8", True, [b"12\xc3\n"]),
    ("keyword then control", True, [b"true\x01"]),
    ("leading zero", True, [b"012\n"]),
    ("0e5", True, [b"0e5\n"]),
    ("lone minus", True, [b"-\n"]),
    ("1. then e", True, [b"1.e5\n"]),
    ("recovery skips to a newline", True, [b"1.e5 {\"execute\": \"nope\"} 7\n8\n"]),
    ("1e", True, [b"1e\n"]),
    ("upper-case keyword", True, [b"TRUE\n"]),
    ("unknown keyword in an object", True, [b'{"execute": nope}']),
    ("nesting past 1024", True, [b"[" * DEEP + b"]" * DEEP]),
    ("objects nested 600 deep", True, [b'{"a":' * 600 + b"1" + b"}" * 600]),
    ("control character mid-stream resets", True, [b'{"execute": "query-', b"\x01", ex("nope", id=1)]),
    ("0xFF mid-stream resets", True, [b'{"execute": ["x", ', b"\xff", ex("nope", id=2)]),
    # framing
    ("a command over several writes", True, [b'{"exe', b'cute": "no', b'pe", "id"', b": 1}"]),
    ("a keyword over several writes", True, [b"gar", b"bage", b"\n"]),
    ("two commands in one write", True, [ex("nope", id=1) + ex("query-status", id=2)]),
    ("command then garbage in one write", True, [ex("nope", id=1) + b"]"]),
    ("whitespace everywhere", True, [b' \r\n\t{ "execute" \n:\t"nope" , "id"\r:\n7 }\r\n ']),
    ("single quotes", True, [b"{'execute': 'query-status', 'id': 'sq'}"]),
    ("single quotes, escaped quote", True, [b"{'execute': 'nope\\'s'}"]),
    ("single quotes holding double quotes", True, [b"{'execute': 'nope', 'id': 'a\"b'}"]),
    ("mixed quotes", True, [b'{\'execute\': "nope\'s", "arguments": {}, \'id\': "m"}']),
    ("single-quoted argument", True, [b"{'execute': 'trace-event-get-state', 'arguments': {'name': 5}}"]),
]

# Where kickcall deliberately answers otherwise: (case name) -> (QEMU's replies, kickcall's replies)
KNOWN_DIFFERENCES = {
    # kickcall does not offer the oob capability (exec-oob is not implemented), so, like QEMU on a
    # monitor that does not offer it (qmp_caps_accept), it refuses to enable it; QEMU offers it.
    "pre: caps enable oob": (
        [{"return": "<return>"}, {"id": 1, "return": "<return>"}],
        [{"error": {"class": "GenericError", "desc": "Capability oob not available"}},
         {"id": 1, "error": {"class": "CommandNotFound",
                             "desc": "Expecting capabilities negotiation with 'qmp_capabilities'"}}]),
}
CASES.append(("pre: caps enable oob", False, [ex("qmp_capabilities", {"enable": ["oob"]}), ex("query-status", id=1)]))


# Cases with several problems of the same rank: QEMU picks one by hash order, kickcall the first sent.
SEVERAL_PROBLEMS = {"three problems", "five problems", "several unexpected members", "get: three unexpected",
                    "get: five unexpected", "get: nine unexpected", "get: twenty unexpected"}

# argument names of the commands both servers have (qmp_capabilities and QMPServer's own included)
ARG_NAMES = {name: {a.name for a in cmd.args} for name, cmd in qemu_like_registry().commands.items()}
ARG_NAMES.update({"qmp_capabilities": {"enable"}, "query-version": set(), "query-commands": set()})


def rival_problems(request) -> list[str]:
    """The problems of a request that rank equal, in the order sent: the request members that are
    wrong, else (a known command, arguments an object) the unexpected arguments.  With two or more,
    QEMU reports one of them and kickcall the first; missing or mistyped arguments rank before any
    unexpected one on both, so they never compete."""
    if not isinstance(request, dict):
        return []
    wrong = []
    for k, v in request.items():
        if k == "execute":
            if not isinstance(v, str):
                wrong.append("QMP input member 'execute' must be a string")
        elif k == "arguments":
            if not isinstance(v, dict):
                wrong.append("QMP input member 'arguments' must be an object")
        elif k != "id":
            wrong.append(f"QMP input member '{k}' is unexpected")
    if wrong or request.get("execute") not in ARG_NAMES:
        return wrong
    return [f"Parameter '{k}' is unexpected" for k in request.get("arguments", {})
            if k not in ARG_NAMES[request["execute"]]]


def assert_one_of_several(k: dict, q: dict, request) -> None:
    """kickcall's reply *k* and QEMU's *q* to a request with several problems of the same rank."""
    rivals = rival_problems(request)
    assert len(rivals) >= 2, f"not a request with several problems: {rivals}"
    assert q["error"]["desc"] in rivals, "QEMU named something else: review rival_problems"
    assert k["error"]["desc"] == rivals[0], "kickcall reports the first problem in the order sent"
    assert {**k, "error": {**k["error"], "desc": None}} == {**q, "error": {**q["error"], "desc": None}}


def _normal(line: bytes) -> dict:
    msg = json.loads(line)
    if "return" in msg:
        msg["return"] = "<return>"
    return msg


def _object_with_several_keys(x) -> bool:
    """Whether an echoed value holds an object of two or more members (QEMU prints those in its hash
    order, kickcall in the order received: same JSON, other bytes)."""
    stack = [x]
    while stack:
        v = stack.pop()
        if isinstance(v, dict):
            if len(v) > 1:
                return True
            stack.extend(v.values())
        elif isinstance(v, list):
            stack.extend(v)
    return False


def _has_float(x) -> bool:
    stack = [x]
    while stack:
        v = stack.pop()
        if isinstance(v, float):
            return True
        if isinstance(v, dict):
            stack.extend(v.values())
        elif isinstance(v, list):
            stack.extend(v)
    return False


def run_case(path: str, negotiate: bool, writes: list[bytes], tag: str) -> list[bytes]:
    c = Raw(path)
    try:
        if negotiate:
            c.negotiate()
        for i, w in enumerate(writes):
            if i:
                time.sleep(0.02)  # a pause between writes is part of the input, not a wait
            c.send(w)
        return c.sync(tag)
    finally:
        c.close()


@pytest.mark.parametrize("name,negotiate,writes", CASES, ids=[c[0] for c in CASES])
def test_same_replies_as_qemu(qemu, kick, name, negotiate, writes):
    tag = f"sync-{abs(hash(name))}"
    q_lines = run_case(qemu.path, negotiate, writes, tag)
    k_lines = run_case(kick.path, negotiate, writes, tag)
    q, k = [_normal(x) for x in q_lines], [_normal(x) for x in k_lines]
    # the resynchronisation's own reply ("stray '\u0001'", maybe with a pending token) is compared too
    assert q and q[-1]["error"]["desc"].startswith("JSON parse error, stray '")
    if name in KNOWN_DIFFERENCES:
        want_q, want_k = KNOWN_DIFFERENCES[name]
        assert q[:-1] == want_q, "QEMU changed: review KNOWN_DIFFERENCES"
        assert k[:-1] == want_k
        assert k[-1] == q[-1]
        return
    if name in SEVERAL_PROBLEMS:
        assert len(k) == len(q) == 2 and k[-1] == q[-1]
        assert_one_of_several(k[0], q[0], json.loads(b"".join(writes)))
        return
    assert k == q
    for ql, kl, qm in zip(q_lines, k_lines, q, strict=True):
        if "return" not in qm and not _object_with_several_keys(qm.get("id")):
            assert kl == ql, "same values, but not the same bytes"


def test_greeting_format(qemu, kick):
    """QEMU 7.2: one line, CRLF, this key order; kickcall the same shape without oob."""
    shape = re.compile(rb'\{"QMP": \{"version": \{"qemu": \{"micro": (\d+), "minor": (\d+), "major": (\d+)\}, '
                       rb'"package": "[^"]*"\}, "capabilities": \[(.*)\]\}\}\r\n')
    for path, caps in ((qemu.path, b'"oob"'), (kick.path, b"")):
        s = socket.socket(socket.AF_UNIX)
        s.settimeout(TIMEOUT)
        s.connect(path)
        data = b""
        while not data.endswith(b"\r\n"):
            chunk = s.recv(4096)
            assert chunk, data
            data += chunk
        s.close()
        m = shape.fullmatch(data)
        assert m, data
        assert m.group(4) == caps
        g = json.loads(data)["QMP"]["version"]
        assert set(g) == {"qemu", "package"} and isinstance(g["package"], str)
        assert all(isinstance(g["qemu"][k], int) for k in ("major", "minor", "micro"))


def test_command_without_newline_is_answered(qemu, kick):
    """qemu.qmp sends no newline: a complete object is enough, on both."""
    for path in (qemu.path, kick.path):
        c = Raw(path)
        c.negotiate()
        c.send(b'{"execute":"nope","id":"nn"}')
        assert json.loads(c.line())["id"] == "nn"
        c.close()


def test_event_and_reply_key_order(kick):
    """QEMU prints "return" before "id", "id" before "error", and events as {"timestamp", "event",
    "data"}; kickcall's envelope has the same fixed order (clients may diff raw lines)."""
    c = Raw(kick.path)
    c.negotiate()
    c.send(ex("query-status", id=1) + ex("nope", id=2))
    assert c.line().startswith(b'{"return": {')
    assert c.line() == (b'{"id": 2, "error": {"class": "CommandNotFound", '
                        b'"desc": "The command nope has not been found"}}')
    kick.emit("X_ORDER", {"a": 1})
    ev = c.line()
    assert re.fullmatch(rb'\{"timestamp": \{"seconds": \d+, "microseconds": \d+\}, "event": "X_ORDER", '
                        rb'"data": \{"a": 1\}\}', ev), ev
    c.close()


class _FakeTarget:
    """The least a kickcall.monitor.commands Target needs: a run state and no devices."""

    name = "fake"

    def __init__(self) -> None:
        self.state = "prelaunch"

    def run_state(self) -> str:
        return self.state

    def stop(self) -> None:
        self.state = "paused"

    def cont(self) -> None:
        self.state = "running"

    def system_reset(self) -> None:
        pass

    def fault_owners(self) -> dict:
        return {}

    def aer_device(self, id: str):
        raise TargetError(f"device '{id}' not found", "DeviceNotFound")

    def quit(self) -> None:
        pass

    def devices(self) -> list:
        return []


def _lines_until_reply(c: Raw, tag: str) -> list[bytes]:
    out = []
    while True:
        line = c.line()
        assert line is not None
        out.append(line)
        if json.loads(line).get("id") == tag:
            return out


def test_events_without_data_as_qemu():
    """cont then stop: QEMU sends RESUME and STOP with no "data" member, each before the reply;
    kickcall's command set (which emits STOP/RESUME with {}) gives the same bytes, timestamps aside."""
    from kickcall.monitor.commands import build_registry

    ts = re.compile(rb'^\{"timestamp": \{"seconds": (\d+), "microseconds": (\d+)\}, ')
    script = [(b'{"execute": "cont", "id": "c"}', "c"), (b'{"execute": "stop", "id": "s"}', "s")]

    def exchange(path: str) -> list[bytes]:
        c = Raw(path)
        c.negotiate()
        lines = []
        for data, tag in script:
            c.send(data)
            lines += _lines_until_reply(c, tag)
        c.close()
        for line in lines:
            m = ts.match(line)
            if m:
                assert abs(int(m.group(1)) - time.time()) < 60 and 0 <= int(m.group(2)) < 10 ** 6
        return [ts.sub(b'{"timestamp": {"seconds": S, "microseconds": U}, ', line) for line in lines]

    q = Qemu()
    try:
        want = exchange(q.path)
    finally:
        q.close()
    assert want == [b'{"timestamp": {"seconds": S, "microseconds": U}, "event": "RESUME"}', b'{"return": {}, "id": "c"}',
                    b'{"timestamp": {"seconds": S, "microseconds": U}, "event": "STOP"}', b'{"return": {}, "id": "s"}']
    d = tempfile.mkdtemp(prefix="kc")
    reg, attach = build_registry(_FakeTarget())
    srv = QMPServer(reg, path=os.path.join(d, "k.sock"), name="events")
    attach(srv)
    srv.start()
    try:
        assert exchange(srv.path) == want
    finally:
        srv.stop()
        shutil.rmtree(d, ignore_errors=True)


def test_quit_as_qemu():
    """QEMU: SHUTDOWN then the return; kickcall: the return (SHUTDOWN is the command set's to emit)
    and on_quit runs."""
    q = Qemu()
    try:
        msgs = q.quit()
        assert {"return": {}, "id": "bye"} in msgs
        shut = [m for m in msgs if m.get("event") == "SHUTDOWN"]
        assert shut and shut[0]["data"] == {"guest": False, "reason": "host-qmp-quit"}
        assert set(shut[0]["timestamp"]) == {"seconds", "microseconds"}
        assert q.p.wait(TIMEOUT) == 0
    finally:
        q.close()
    d = tempfile.mkdtemp(prefix="kc")
    srv = QMPServer(qemu_like_registry(), path=os.path.join(d, "k.sock"), name="quit")
    quitted = []
    srv.on_quit = lambda: quitted.append(True)
    srv.start()
    try:
        c = Raw(srv.path)
        c.negotiate()
        c.send(b'{"execute": "quit", "id": "bye"}')
        assert json.loads(c.line()) == {"return": {}, "id": "bye"}
        wait_for(lambda: quitted, TIMEOUT, "on_quit")
        c.close()
    finally:
        srv.stop()
        shutil.rmtree(d, ignore_errors=True)


# -- real clients ------------------------------------------------------------------------------------

def test_qemu_qmp_async_client(kick):
    from qemu.qmp import ExecuteError, QMPClient

    async def main() -> None:
        c = QMPClient("wire-test")
        await c.connect(kick.path)  # greeting, then qmp_capabilities with no id and no newline
        assert c.greeting.QMP.capabilities == []
        assert set(c.greeting.QMP.version) >= {"qemu", "package"}
        assert await c.execute("query-status") == {"status": "prelaunch", "singlestep": False, "running": False}
        v = await c.execute("query-version")
        assert set(v["qemu"]) == {"major", "minor", "micro"}
        assert {"name": "trace-event-get-state"} in await c.execute("query-commands")
        assert await c.execute("trace-event-get-state", {"name": "qmp_enter_*"}) == [
            {"name": "qmp_enter_query_status", "vcpu": False, "state": "disabled"}]
        with c.listener("X_WIRE") as listener:
            kick.emit("X_WIRE", {"n": 1})
            ev = await asyncio.wait_for(listener.get(), TIMEOUT)
        assert ev["event"] == "X_WIRE" and ev["data"] == {"n": 1}
        assert isinstance(ev["timestamp"]["seconds"], int) and 0 <= ev["timestamp"]["microseconds"] < 10 ** 6
        with pytest.raises(ExecuteError) as e:
            await c.execute("nope")
        assert e.value.error_class == "CommandNotFound"
        assert e.value.error.error.desc == "The command nope has not been found"
        with pytest.raises(ExecuteError) as e:
            await c.execute("trace-event-get-state", {"name": 5})
        assert e.value.error_class == "GenericError"
        assert e.value.error.error.desc == "Invalid parameter type for 'name', expected: string"
        with pytest.raises(ExecuteError) as e:
            await c.execute("trace-event-set-state", {"name": "x"})
        assert e.value.error.error.desc == "Parameter 'enable' is missing"
        with pytest.raises(ExecuteError) as e:
            await c.execute("query-status", {"verbose": True})
        assert e.value.error.error.desc == "Parameter 'verbose' is unexpected"
        assert await c.execute("query-status")  # still connected after errors
        await c.disconnect()

    asyncio.run(main())


def test_qemu_qmp_legacy_client(kick):
    from qemu.qmp import ExecuteError
    from qemu.qmp.legacy import QEMUMonitorProtocol

    m = QEMUMonitorProtocol(kick.path)
    try:
        greeting = m.connect()
        assert greeting["QMP"]["capabilities"] == []
        assert m.cmd("query-status")["status"] == "prelaunch"
        assert m.cmd_raw("nope", None)["error"]["class"] == "CommandNotFound"
        r = m.cmd_obj({"execute": "trace-event-get-state", "arguments": {"name": "x", "vcpu": "0"}})
        assert r["error"] == {"class": "GenericError", "desc": "Invalid parameter type for 'vcpu', expected: integer"}
        with pytest.raises(ExecuteError) as e:
            m.cmd("trace-event-set-state", name="nope", enable=True)
        assert e.value.error_class == "GenericError" and e.value.error.error.desc == 'unknown event "nope"'
        kick.emit("X_LEGACY", {"k": "v"})
        ev = m.pull_event(wait=TIMEOUT)
        assert ev is not None and ev["event"] == "X_LEGACY" and ev["data"] == {"k": "v"} and "timestamp" in ev
    finally:
        m.close()


def _qmp_shell(args: list[str], stdin: str, home: str) -> str:
    p = subprocess.run([QMP_SHELL, *args], input=stdin, capture_output=True, text=True, timeout=60,
                       env=dict(os.environ, HOME=home), process_group=0, preexec_fn=_die_with_parent)
    assert p.returncode == 0, p.stderr
    return p.stdout


def test_qmp_shell(kick, tmp_path):
    out = _qmp_shell([kick.path], "query-status\ntrace-event-get-state name=qmp_enter_*\nnope\n"
                                  "trace-event-set-state name=x enable=yes\n", str(tmp_path))
    assert "Connected to QEMU" in out
    assert '{"return": {"status": "prelaunch", "singlestep": false, "running": false}}' in out
    assert '"name": "qmp_enter_query_status"' in out
    assert '{"error": {"class": "CommandNotFound", "desc": "The command nope has not been found"}}' in out
    assert "Invalid parameter type for 'enable', expected: boolean" in out


def test_qmp_shell_hmp(kick, tmp_path):
    out = _qmp_shell(["-H", kick.path], "info status\nbogus\n", str(tmp_path))
    assert "Welcome to the HMP shell!" in out
    assert "VM status: paused (prelaunch)" in out
    assert "unknown command: 'bogus'" in out
