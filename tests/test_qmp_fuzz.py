"""Fuzz and property tests of kickcall's QMP server: whatever a client sends, it gets well-formed
replies or is disconnected, the server keeps running, and every OTHER client keeps being served
(a witness client stays connected throughout and must answer after every case).

Also: random JSON-like input gets the same replies from kickcall as from QEMU 7.2 (except which
of several equal problems a request has is named: see test_qmp_wire.py); the parser gives the same
messages however the input is cut into pieces; random arguments against typed schemas are accepted
exactly when an independent model says they are valid; deep nesting, huge messages, many clients,
a client that never reads; socket permissions and TCP on loopback only.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import stat
import tempfile
import threading
import time

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from kickcall.monitor.json_stream import MAX_MESSAGE, MAX_TOKENS, JSONStreamParser
from kickcall.monitor.schema import ERROR_CLASSES, Arg, CommandRegistry
from kickcall.monitor.server import MAX_BAD_INPUTS, QMPServer
from kickcall.ownership import PathRefused, RefusalKind

from test_qmp_wire import QEMU, TIMEOUT, Qemu, Raw, assert_one_of_several, qemu_like_registry

FUZZ = settings(deadline=None, max_examples=120, suppress_health_check=[HealthCheck.too_slow])

# -- a registry with one command per argument type ----------------------------------------------------

TYPED = {
    "x-int": [Arg("v", "int")],
    "x-str": [Arg("v", "str")],
    "x-bool": [Arg("v", "bool")],
    "x-number": [Arg("v", "number")],
    "x-object": [Arg("v", "object")],
    "x-array": [Arg("v", "array")],
    "x-any": [Arg("v", "any")],
    "x-enum": [Arg("v", "str", enum=("kick", "call"))],
    "x-u16": [Arg("v", "int", min=0, max=0xFFFF)],
    "x-mixed": [Arg("dev", "str"), Arg("queue", "int", min=0, max=0xFFFF), Arg("force", "bool", optional=True),
                Arg("opts", "object", optional=True), Arg("count", "int", optional=True)],
}
BIG = 512 * 1024


def fuzz_registry() -> CommandRegistry:
    r = qemu_like_registry()
    for name, args in TYPED.items():
        r.add(name, lambda **kw: {"got": sorted(kw)}, args)
    r.add("x-big", lambda: "b" * BIG)
    return r


@pytest.fixture(scope="module")
def server():
    d = tempfile.mkdtemp(prefix="kc")
    srv = QMPServer(fuzz_registry(), path=os.path.join(d, "f.sock"), name="fuzz").start()
    yield srv
    assert srv._thread.is_alive(), "the server thread died"
    srv.stop()
    assert not srv._thread.is_alive()
    assert not os.path.exists(srv.path)
    shutil.rmtree(d, ignore_errors=True)


class Witness:
    """A client that stays connected through every case; it must keep being answered."""

    def __init__(self, path: str) -> None:
        self.c = Raw(path)
        self.c.negotiate()
        self.n = 0
        self.events: list[dict] = []

    def ping(self) -> None:
        self.n += 1
        tag = f"w{self.n}"
        self.c.send(b'{"execute": "query-status", "id": "%s"}' % tag.encode())
        while True:
            line = self.c.line()
            assert line is not None, "the witness was disconnected"
            msg = json.loads(line)
            if "event" in msg:
                self.events.append(msg)
                continue
            assert msg == {"return": {"status": "prelaunch", "singlestep": False, "running": False}, "id": tag}
            return


@pytest.fixture(scope="module")
def witness(server):
    w = Witness(server.path)
    yield w
    w.ping()
    w.c.close()


def well_formed(line: bytes) -> dict:
    msg = json.loads(line)
    assert isinstance(msg, dict)
    if "event" in msg:
        assert {"event", "timestamp"} <= set(msg) <= {"event", "data", "timestamp"}
    elif "error" in msg:
        assert set(msg) <= {"error", "id"}
        assert set(msg["error"]) == {"class", "desc"}
        assert msg["error"]["class"] in ERROR_CLASSES and isinstance(msg["error"]["desc"], str)
    else:
        assert set(msg) <= {"return", "id"} and "return" in msg
    return msg


def connect(path: str, negotiate: bool = True) -> Raw:
    c = Raw(path)
    assert json.loads(c.greeting)["QMP"]["capabilities"] == []
    if negotiate:
        c.negotiate()
    return c


def send_then_sync(c: Raw, data: bytes, tag: str = "sync") -> tuple[list[dict], bool]:
    """Send *data* then a resynchronisation; the replies before the sync reply, and whether the
    server hung up instead."""
    try:
        c.send(data)
        c.send(b'\x01\n{"execute": "query-version", "id": "%s"}' % tag.encode())
    except (BrokenPipeError, ConnectionResetError):
        pass
    out = []
    while True:
        try:
            line = c.line()
        except ConnectionResetError:
            return out, True
        if line is None:
            return out, True
        msg = well_formed(line)
        if msg.get("id") == tag:
            return out, False
        out.append(msg)


# -- random input ------------------------------------------------------------------------------------

@FUZZ
@given(data=st.binary(max_size=3000), negotiate=st.booleans())
def test_random_bytes(server, witness, data, negotiate):
    c = connect(server.path, negotiate)
    try:
        replies, hung_up = send_then_sync(c, data)
        assert not hung_up  # a few KiB cannot reach any limit
        assert replies and replies[-1]["error"]["desc"].startswith("JSON parse error, stray '")
    finally:
        c.close()
    witness.ping()


COMMANDS = [
    b'{"execute": "qmp_capabilities"}',
    b'{"execute": "query-status", "id": {"a": [1, 2.5, "x"]}}',
    b'{"execute": "trace-event-set-state", "arguments": {"name": "x", "enable": true, "vcpu": 3}, "id": 9}',
    b"{'execute': 'x-mixed', 'arguments': {'dev': 'blk0', 'queue': 1, 'opts': {'k': [null]}}}",
    b'{"execute": "x-str", "arguments": {"v": "\\u00e9\\ud83d\\ude00\xc3\xa9"}, "id": "s"}',
]


@FUZZ
@given(cmd=st.sampled_from(COMMANDS), cut=st.integers(min_value=0, max_value=200), tail=st.sampled_from(
    [b"", b"\n", b"}", b"]", b'"', b"'", b"\xff", b"garbage"]))
def test_truncated_json(server, witness, cmd, cut, tail):
    c = connect(server.path)
    try:
        replies, hung_up = send_then_sync(c, cmd[:cut] + tail)
        assert not hung_up
        if cut >= len(cmd) and not tail:  # the whole command was sent: it was answered
            assert "JSON parse error" not in replies[0].get("error", {}).get("desc", "")
    finally:
        c.close()
    witness.ping()


# -- random JSON-like input: the same replies as QEMU ----------------------------------------------

FRAGMENTS = [b"{", b"}", b"[", b"]", b":", b",", b'"', b"'", b"\\", b"\\u", b"00e9", b"d83d", b"dc00", b"ffff", b"0",
             b"1", b"7", b"-", b".", b"e", b"E", b"+", b"true", b"false", b"null", b"nul", b"x", b" ", b"\n", b"\t",
             b"\r", b"\x01", b"\x00", b"\x7f", b"\xff", b"\xfe", b"\xc3\xa9", b"\xc3", b"\xa9", b"\xc0\x80",
             b"\xed\xa0\x80", b"%", b"@", b'"execute"', b'"arguments"', b'"id"', b'"exec-oob"', b'"nope"',
             b'"query-status"', b'"query-version"', b'"trace-event-get-state"', b'"trace-event-set-state"',
             b'"name"', b'"vcpu"', b'"enable"', b'"qmp_capabilities"', b'{"execute": ', b'"arguments": {',
             b'"id": ', b"99999999999999999999", b"18446744073709551615"]


def _loads_qemu(line: bytes) -> dict:
    try:
        return json.loads(line)
    except ValueError:  # QEMU prints an infinite double as inf (not JSON)
        return json.loads(re.sub(rb"(?<![\w.])(-?)inf(?![\w])", rb"\1Infinity", line))


def _normal(msg: dict) -> dict:
    if "return" in msg:
        msg["return"] = "<return>"
    return msg


@pytest.fixture(scope="module")
def qemu():
    assert QEMU is not None, "qemu-system-x86_64 is missing: run ./install.sh"
    q = Qemu()
    yield q
    q.close()


@pytest.fixture(scope="module")
def kick_as_qemu():
    d = tempfile.mkdtemp(prefix="kc")
    srv = QMPServer(qemu_like_registry(), path=os.path.join(d, "k.sock"), name="diff").start()
    yield srv
    srv.stop()
    shutil.rmtree(d, ignore_errors=True)


def _exchange(path: str, negotiate: bool, data: bytes, loads) -> list[dict]:
    c = Raw(path)
    try:
        if negotiate:
            c.negotiate()
        c.send(data)
        c.send(b'\x01\n{"execute": "query-version", "id": "fuzz-sync"}')
        out = []
        while True:
            line = c.line()
            assert line is not None
            msg = loads(line)
            if msg.get("id") == "fuzz-sync":
                return out
            out.append(_normal(msg))
    finally:
        c.close()


def assert_same_replies(got: list[dict], want: list[dict], data: bytes) -> None:
    """kickcall's replies *got* are QEMU's *want*, but for a request with several problems of the same
    rank, where each names one of them (test_qmp_wire.assert_one_of_several)."""
    if got == want:
        return
    requests = [value for value, _ in JSONStreamParser().feed(data + b"\x01")]  # one reply each
    assert len(got) == len(want) == len(requests), (got, want)
    for k, q, request in zip(got, want, requests, strict=True):
        if k != q:
            assert_one_of_several(k, q, request)


@settings(deadline=None, max_examples=150, suppress_health_check=[HealthCheck.too_slow])
@given(parts=st.lists(st.sampled_from(FRAGMENTS), max_size=40), negotiate=st.booleans())
def test_json_like_input_same_replies_as_qemu(qemu, kick_as_qemu, parts, negotiate):
    data = b"".join(parts)
    want = _exchange(qemu.path, negotiate, data, _loads_qemu)
    got = _exchange(kick_as_qemu.path, negotiate, data, json.loads)
    assert_same_replies(got, want, data)


@settings(deadline=None, max_examples=100, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.binary(max_size=300), negotiate=st.booleans())
def test_random_bytes_same_replies_as_qemu(qemu, kick_as_qemu, data, negotiate):
    want = _exchange(qemu.path, negotiate, data, _loads_qemu)
    got = _exchange(kick_as_qemu.path, negotiate, data, json.loads)
    assert_same_replies(got, want, data)


@FUZZ
@given(data=st.one_of(st.binary(max_size=400), st.lists(st.sampled_from(FRAGMENTS), max_size=60).map(b"".join)),
       cuts=st.lists(st.integers(min_value=0, max_value=400), max_size=8))
@example(data=b'{"execute": "a\\"b\\\\", \'id\': \'c\\\'d\\\\\'}', cuts=[])  # a cut after a backslash
@example(data=b"[-0.5e+10, 1E-2, 0, 10, 1234567]\n[01, 0e5, 1.e5, -x]\n", cuts=[])  # numbers cut anywhere
def test_parser_same_messages_however_the_input_is_cut(data, cuts):
    """What QEMU is compared with above arrives in one piece; any cut gives the same messages, also
    one byte at a time (a token cut in the middle is read on when the rest arrives)."""
    whole = JSONStreamParser().feed(data)
    for points in (sorted(min(c, len(data)) for c in cuts), range(1, len(data))):
        p = JSONStreamParser()
        got, prev = [], 0
        for c in [*points, len(data)]:
            got += p.feed(data[prev:c])
            prev = c
        assert repr(got) == repr(whole)  # repr: 1 and 1.0 differ


def test_parser_long_tokens_in_small_pieces_take_linear_time():
    """A token fed a few bytes at a time is not scanned again from its start each time."""
    n = 400_000
    for body, want in ((b'"' + b"s" * n + b'"', "s" * n), (b"7" * n + b"\n", float("inf")),
                       (b"0." + b"5" * n + b"e-" + b"3" * 500 + b"\n", 0.0)):
        p = JSONStreamParser(max_message=2 * n)
        got = []
        t0 = time.monotonic()
        for i in range(0, len(body), 8):
            got += p.feed(body[i:i + 8])
        assert got == [(want, None)]
        assert time.monotonic() - t0 < 5  # quadratic would be ~10^10 byte steps


JSON_TEXT = st.text(st.characters(blacklist_categories=("Cs", "Cn")), max_size=12)
JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(min_value=-(2 ** 66), max_value=2 ** 66)
    | st.floats(allow_nan=False, allow_infinity=False) | JSON_TEXT,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(JSON_TEXT, inner, max_size=3),
    max_leaves=8)
SET_KEYS = ["name", "enable", "ignore-unavailable", "vcpu", "ignore_unavailable", "x", "names"]


@settings(deadline=None, max_examples=150, suppress_health_check=[HealthCheck.too_slow])
@given(args=st.dictionaries(st.sampled_from(SET_KEYS) | JSON_TEXT, JSON_VALUES | st.sampled_from(
    ["nope", "x", True, False, 0, 1]), max_size=6),
    cmd=st.sampled_from(["trace-event-get-state", "trace-event-set-state", "query-status", "qmp_capabilities"]))
def test_random_arguments_same_errors_as_qemu(qemu, kick_as_qemu, cmd, args):
    """Random argument objects (any keys, values of any type) against QEMU's own schemas."""
    if cmd.startswith("trace") and isinstance(args.get("name"), str):
        args["name"] = "x" + args["name"].replace("*", "")  # never a real event, never a pattern
    data = json.dumps({"execute": cmd, "arguments": args, "id": "a"}).encode()
    want = _exchange(qemu.path, True, data, _loads_qemu)
    got = _exchange(kick_as_qemu.path, True, data, json.loads)
    assert_same_replies(got, want, data)


INTEGERS = st.integers(min_value=-(2 ** 65), max_value=2 ** 65) | st.sampled_from(
    [0, 65535, 65536, -1, 2 ** 63 - 1, 2 ** 63, -(2 ** 63), -(2 ** 63) - 1, 2 ** 64 - 1, 2 ** 64])


@settings(deadline=None, max_examples=100, suppress_health_check=[HealthCheck.too_slow])
@given(cmd=st.sampled_from(["x-query-virtio-queue-status", "x-query-virtio-queue-element"]),
       path=JSON_TEXT | st.integers(0, 3), queue=INTEGERS | JSON_VALUES,
       index=st.none() | INTEGERS | JSON_VALUES, extra=st.dictionaries(JSON_TEXT, JSON_VALUES, max_size=1))
def test_random_unsigned_arguments_same_errors_as_qemu(qemu, kick_as_qemu, cmd, path, queue, index, extra):
    """uint16 members (QEMU 7.2's x-query-virtio-queue-* schemas): whatever value, the same error
    ("expects uint16_t", "expects uint64", ...) or the same handler error as QEMU."""
    args = {**extra, "path": path, "queue": queue}
    if index is not None and cmd.endswith("element"):  # (at most one unexpected member: see SEVERAL_PROBLEMS)
        args["index"] = index
    data = json.dumps({"execute": cmd, "arguments": args, "id": "u"}).encode()
    want = _exchange(qemu.path, True, data, _loads_qemu)
    got = _exchange(kick_as_qemu.path, True, data, json.loads)
    assert got == want


def _raw_exchange(path: str, data: bytes) -> list[bytes]:
    c = Raw(path)
    try:
        c.negotiate()
        c.send(data)
        c.send(b'\x01\n{"execute": "query-version", "id": "raw-sync"}')
        out = []
        while True:
            line = c.line()
            assert line is not None
            if line.endswith(b', "id": "raw-sync"}'):
                return out
            out.append(line)
    finally:
        c.close()


FLAT_VALUES = st.recursive(  # no object of two members: QEMU prints those in its own order
    st.none() | st.booleans() | st.integers(min_value=-(2 ** 66), max_value=2 ** 66)
    | st.floats(allow_nan=False, allow_infinity=False) | JSON_TEXT,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(JSON_TEXT, inner, max_size=1), max_leaves=8)


@settings(deadline=None, max_examples=100, suppress_health_check=[HealthCheck.too_slow])
@given(rid=FLAT_VALUES, text=JSON_TEXT)
def test_random_ids_printed_byte_for_byte_as_qemu(qemu, kick_as_qemu, rid, text):
    """The error reply to an unknown command, with any id, is QEMU's byte for byte: doubles as
    %.17g, upper-case \\u escapes for control characters, DEL and non-ASCII, surrogate pairs."""
    data = json.dumps({"execute": "nope" + text, "id": rid}).encode()
    assert _raw_exchange(kick_as_qemu.path, data) == _raw_exchange(qemu.path, data)


# -- random arguments against typed schemas: accepted exactly when valid ------------------------------

def as_qemu_reads(v):
    """What QEMU's parser makes of a value: an integer beyond int64 and uint64 becomes a double."""
    if isinstance(v, int) and not isinstance(v, bool) and not -(2 ** 63) <= v < 2 ** 64:
        return float(v)
    if isinstance(v, list):
        return [as_qemu_reads(x) for x in v]
    if isinstance(v, dict):
        return {k: as_qemu_reads(x) for k, x in v.items()}
    return v


def _model_error(args_schema: list[Arg], arguments: dict) -> str | None:
    """An independent model of QEMU's argument checks; "unexpected" when only unexpected members are
    wrong (kickcall names the first sent, QEMU any one of them)."""
    for a in args_schema:
        if a.name not in arguments:
            if not a.optional:
                return f"Parameter '{a.name}' is missing"
            continue
        v = as_qemu_reads(arguments[a.name])
        expected = {"int": "integer", "str": "string", "bool": "boolean", "number": "number", "object": "object",
                    "array": "array"}.get(a.type)
        unsigned = a.type == "int" and a.min is not None and a.min >= 0
        ok = {"int": type(v) is int and (v < 2 ** 63 or unsigned),
              "str": type(v) is str, "bool": type(v) is bool, "number": type(v) in (int, float),
              "object": type(v) is dict, "array": type(v) is list}.get(a.type, True)
        if not ok:  # QEMU's unsigned visitors all start with visit_type_uint64()
            return f"Parameter '{a.name}' expects uint64" if unsigned else \
                f"Invalid parameter type for '{a.name}', expected: {expected}"
        if a.enum and v not in a.enum:
            return f"Parameter '{a.name}' does not accept value '{v}'"
        if a.min is not None and not a.min <= v <= a.max:
            return f"Parameter '{a.name}' expects uint16_t"
    if set(arguments) - {a.name for a in args_schema}:
        return "unexpected"
    return None


@settings(deadline=None, max_examples=200, suppress_health_check=[HealthCheck.too_slow])
@given(cmd=st.sampled_from(sorted(TYPED)), data=st.data(), rid=JSON_VALUES)
def test_random_arguments_typed(server, witness, cmd, data, rid):
    schema = TYPED[cmd]
    keys = st.sampled_from([a.name for a in schema]) | JSON_TEXT
    values = JSON_VALUES | st.sampled_from(["kick", "call", 0, 65535, 65536, -1, 2 ** 63, 2 ** 64, True])
    arguments = data.draw(st.dictionaries(keys, values, max_size=5))
    c = connect(server.path)
    try:
        c.send(json.dumps({"execute": cmd, "arguments": arguments, "id": rid}).encode())
        reply = well_formed(c.line())
    finally:
        c.close()
    assert reply["id"] == as_qemu_reads(rid)
    expected = _model_error(schema, arguments)
    if expected is None:
        assert reply["return"] == {"got": sorted(a.name.replace("-", "_") for a in schema if a.name in arguments)}
    else:
        assert reply["error"]["class"] == "GenericError"
        if expected == "unexpected":
            first = next(k for k in arguments if k not in {a.name for a in schema})
            assert reply["error"]["desc"] == f"Parameter '{first}' is unexpected"
        else:
            assert reply["error"]["desc"] == expected
    witness.ping()


# -- size and depth ------------------------------------------------------------------------------------

@pytest.mark.parametrize("depth", [1025, 5000, 100_000])
@pytest.mark.parametrize("kind", ["array", "object"])
def test_deep_nesting(server, witness, depth, kind):
    opener, closer = (b"[", b"]") if kind == "array" else (b'{"a":', b"}")
    c = connect(server.path)
    t0 = time.monotonic()
    try:
        replies, hung_up = send_then_sync(c, opener * depth + b"1" * (kind == "object") + closer * depth)
    finally:
        c.close()
    assert time.monotonic() - t0 < 30
    assert replies[0]["error"]["desc"] == "JSON nesting depth limit exceeded"
    if hung_up:  # only after a long run of malformed input
        assert sum("error" in r for r in replies) >= MAX_BAD_INPUTS
    else:
        assert depth < 5000
    witness.ping()


def test_deep_id_is_echoed(server, witness):
    """QEMU lets 1024 levels through; an id that deep is echoed (past Python's recursion limit)."""
    depth = 1020
    c = connect(server.path)
    try:
        c.send(b'{"execute": "nope", "id": ' + b"[" * depth + b"]" * depth + b"}")
        line = c.line()
    finally:
        c.close()
    assert line == (b'{"id": ' + b"[" * depth + b"]" * depth +
                    b', "error": {"class": "CommandNotFound", "desc": "The command nope has not been found"}}')
    witness.ping()


@pytest.mark.parametrize("what", ["string", "number", "tokens", "key"])
def test_huge_message_disconnects_that_client(server, witness, what):
    n = 3 * MAX_MESSAGE
    body = {
        "string": b'{"execute": "x-str", "arguments": {"v": "' + b"s" * n + b'"}}',
        "number": b'{"execute": "x-int", "arguments": {"v": ' + b"1" * n + b"}}",
        "tokens": b"[" + b"1," * (MAX_TOKENS + 10) + b"1]",
        "key": b"{'" + b"k" * n + b"': 1}",
    }[what]
    c = connect(server.path)
    try:
        replies, hung_up = send_then_sync(c, body)
    finally:
        c.close()
    assert hung_up
    assert replies == [{"error": {"class": "GenericError", "desc": "JSON token count limit exceeded"
                                  if what == "tokens" else "JSON token size limit exceeded"}}]
    witness.ping()


def test_large_message_under_the_bound_is_served(server, witness):
    s = "é" * (MAX_MESSAGE // 5)  # two strings of 2/5 MiB in UTF-8
    c = connect(server.path)
    try:
        c.send(json.dumps({"execute": "x-str", "arguments": {"v": s}, "id": s}, ensure_ascii=False).encode())
        assert json.loads(c.line()) == {"return": {"got": ["v"]}, "id": s}
        c.send(b'{"execute": "x-big", "id": 1}')
        assert json.loads(c.line()) == {"return": "b" * BIG, "id": 1}
    finally:
        c.close()
    witness.ping()


def test_garbage_forever_disconnects(server, witness):
    """Each } is an error reply; a client that keeps sending only garbage is dropped after
    MAX_BAD_INPUTS of them in a row (a well-formed value in between resets the count)."""
    c = connect(server.path)
    try:
        replies, hung_up = send_then_sync(c, b"}" * (MAX_BAD_INPUTS - 10) + b"{}" + b"}" * (MAX_BAD_INPUTS - 10))
        assert not hung_up and len(replies) == 2 * (MAX_BAD_INPUTS - 10) + 2
        replies, hung_up = send_then_sync(c, b"}" * (MAX_BAD_INPUTS + 10))
        assert hung_up and len(replies) == MAX_BAD_INPUTS
    finally:
        c.close()
    witness.ping()


# -- many clients, slow clients ---------------------------------------------------------------------

def test_many_clients_at_once(server, witness):
    n, per = 20, 25
    errors: list[BaseException] = []
    barrier = threading.Barrier(n)

    def client(i: int) -> None:
        try:
            c = connect(server.path)
            barrier.wait(TIMEOUT)
            for j in range(per):
                c.send(b'{"execute": "x-int", "arguments": {"v": %d}, "id": [%d, %d]}' % (j, i, j))
                msg = json.loads(c.line())
                while "event" in msg:
                    msg = json.loads(c.line())
                assert msg == {"return": {"got": ["v"]}, "id": [i, j]}
            c.close()
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for _ in range(10):
        server.emit("X_TICK", {"n": 1})
    for t in threads:
        t.join(60)
    assert not any(t.is_alive() for t in threads)
    assert not errors, errors[0]
    witness.ping()


def _clients(server: QMPServer) -> list:
    """A snapshot of the server's clients (the set changes in the server's thread)."""
    while True:
        try:
            return list(server.clients)
        except RuntimeError:  # changed size during iteration
            continue


def test_client_that_never_reads_events(server, witness):
    """A negotiated client that stops reading while events pile up is cut off; the witness,
    reading, gets every event and keeps being answered."""
    lazy = connect(server.path)
    lazy.s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    lazy_client = max(_clients(server), key=lambda c: c.id)  # the newest connection
    payload = {"blob": "e" * 60_000}
    witness.events.clear()
    sent = 0
    t0 = time.monotonic()
    while lazy_client in server.clients:  # until the lazy client is dropped
        assert time.monotonic() - t0 < 30, "the non-reading client was never dropped"
        for _ in range(10):
            server.emit("X_FLOOD", payload)
            sent += 1
        witness.ping()  # reads the events, so it stays under the backlog bound
    assert sent * 60_000 > server.max_backlog
    witness.ping()
    assert len(witness.events) == sent and all(e["event"] == "X_FLOOD" for e in witness.events)
    # the lazy client finds its stream cut short
    lazy.s.settimeout(TIMEOUT)
    got = 0
    try:
        while True:
            chunk = lazy.s.recv(1 << 20)
            if not chunk:
                break
            got += len(chunk)
    except ConnectionResetError:
        pass
    assert got < sent * 60_000
    lazy.close()


def test_client_that_never_reads_replies(server, witness):
    """A client that sends commands with large replies and never reads blocks only itself."""
    lazy = connect(server.path)
    lazy.s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    for i in range(40):
        lazy.send(b'{"execute": "x-big", "id": %d}' % i)
    for _ in range(20):
        witness.ping()
    c = connect(server.path)
    c.send(b'{"execute": "x-big", "id": "other"}')
    assert json.loads(c.line())["id"] == "other"
    c.close()
    lazy.close()
    witness.ping()


# -- where the server listens -----------------------------------------------------------------------

def test_unix_socket_mode_0600(server):
    st_ = os.stat(server.path)
    assert stat.S_ISSOCK(st_.st_mode)
    assert stat.S_IMODE(st_.st_mode) == 0o600


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "192.0.2.1", "10.0.0.1", "localhost", "example.com", ""])
def test_tcp_refuses_non_loopback(host):
    with pytest.raises(ValueError, match="loopback"):
        QMPServer(CommandRegistry(), tcp=(host, 0))


def test_live_socket_is_not_taken_over(server):
    """A second server on the path of a live one is refused (the first keeps its socket); a stale
    socket (nobody listening) is replaced."""
    with pytest.raises(PathRefused, match="in use") as ei:  # its lock is held (and it listens)
        QMPServer(CommandRegistry(), path=server.path, name="intruder").start()
    assert ei.value.kind is RefusalKind.IN_USE
    c = connect(server.path)
    c.send(b'{"execute": "query-status", "id": "still"}')
    assert json.loads(c.line())["id"] == "still"
    c.close()
    d = tempfile.mkdtemp(prefix="kc")
    stale = os.path.join(d, "stale.sock")
    s = socket.socket(socket.AF_UNIX)
    s.bind(stale)  # bound, never listening: what a killed process leaves behind
    s.close()
    srv = QMPServer(CommandRegistry(), path=stale, name="heir").start()
    try:
        assert stat.S_IMODE(os.stat(stale).st_mode) == 0o600
        c = connect(stale, negotiate=False)
        assert json.loads(c.greeting)["QMP"]["capabilities"] == []
        c.close()
    finally:
        srv.stop()
        shutil.rmtree(d, ignore_errors=True)


def test_tcp_on_loopback():
    srv = QMPServer(fuzz_registry(), tcp=("127.0.0.1", 0), name="tcp").start()
    try:
        assert srv.tcp_port and srv.tcp_port > 0
        s = socket.create_connection(("127.0.0.1", srv.tcp_port), timeout=TIMEOUT)
        assert s.getpeername()[0] == "127.0.0.1"
        buf = b""
        s.sendall(b'{"execute": "qmp_capabilities"}{"execute": "query-status", "id": 1}')
        while buf.count(b"\r\n") < 3:
            chunk = s.recv(65536)
            assert chunk
            buf += chunk
        greeting, caps, reply = buf.split(b"\r\n")[:3]
        assert json.loads(greeting)["QMP"]["capabilities"] == []
        assert json.loads(caps) == {"return": {}}
        assert json.loads(reply)["id"] == 1
        s.close()
    finally:
        srv.stop()
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", srv.tcp_port), timeout=2).close()
