"""A QMP server in QEMU's wire format (docs/interop/qmp-spec.rst), replying as QEMU 7.2 does.

* greeting ``{"QMP": {"version": ..., "capabilities": []}}`` (no ``oob``: exec-oob is not
  implemented), then only ``qmp_capabilities`` until negotiation is done, with QEMU's error texts;
* replies ``{"return": ...}`` / ``{"error": {"class", "desc"}}`` echoing any ``id`` of any JSON type;
* events ``{"timestamp": {"seconds", "microseconds"}, "event", "data"}`` to negotiated clients, with
  no ``data`` member for an event that has none (STOP, RESUME), as QEMU;
* strings and numbers printed as QEMU prints them: upper-case ``\\uXXXX`` for control characters
  other than \\b \\f \\n \\r \\t, for DEL and for everything beyond ASCII (surrogate pairs past the
  BMP), ``/`` unescaped, doubles as ``%.17g`` (0.1 is 0.10000000000000001, an infinite one ``inf``);
  the envelope keys come in the order QEMU prints them ("return" before "id", "id" before
  "error"), fixed here as constants;
* input in QEMU's JSON dialect, read by kickcall's own incremental reader (``JSONStreamParser``)
  whose observable behaviour was taken from running QEMU (tests/test_qmp_wire.py and
  tests/test_qmp_fuzz.py send the same bytes to both and compare the replies): a message ends when
  its brackets balance (no newline needed: ``qemu.qmp`` sends none), single-quoted strings, the
  extra escape ``\\'``, modified UTF-8 (``\\xC0\\x80`` is NUL), integers beyond 64 bits read as
  doubles, QEMU's error texts ("JSON parse error, stray '...'", "invalid keyword", "expecting
  value", ...), its error recovery (after a bad token, skip to a bracket, brace, colon, comma,
  control character or ``\\xFE``/``\\xFF``) and its nesting limit (1024; the rest is read afresh);
* kickcall's own bounds where QEMU has none or a larger one: a message is at most ``MAX_MESSAGE``
  bytes of tokens and ``MAX_TOKENS`` tokens (QEMU: 64 MiB, 2 Mi tokens), past which the client
  gets QEMU's limit error and is disconnected; a client that sends ``MAX_BAD_INPUTS`` malformed
  inputs in a row, or lets more than ``MAX_BACKLOG`` bytes of events pile up unread, is
  disconnected; every other client is served throughout;
* a Unix socket created with mode 0600 (a stale socket is replaced, a live server's never), TCP
  only on a loopback IP address and only when asked.

Commands come from a ``CommandRegistry``: each has a typed argument schema checked before the
handler runs (missing, unexpected or mistyped arguments are refused with QEMU's messages).

Handlers run one at a time across every client of a server, as QEMU runs QMP commands one at a
time under its big lock: a handler that reads the state, changes it and emits the event for the
change (``stop``, ``cont``, ``quit``) is one step that no other command can split, so two clients
sending ``stop`` together get one STOP.  Only execution is serialised: every client's input is
read, parsed and checked (and malformed input answered) while a handler runs.  The handlers
themselves run on a thread of their own, never on the server's event loop, so a slow one leaves
the server reading (``SERIALIZE_DISPATCH`` / ``serialize=`` switch this off, for tests only).

``quit`` is QEMU's: its handler (or any handler, such as ``human-monitor-command "quit"``) calls
``request_quit``; the reply of the command that asked is sent, then the quit actions run (the
owner winds the process down; its exit closes the connections).  From the moment quit is
requested no other command is executed: a request that was waiting, even a second ``quit``, gets
no reply (QEMU exits before it reaches it), and a client that connects meanwhile is closed before
the greeting.

Which problem is reported when a request has several (a deliberate difference from QEMU): a
request's members are checked in the order the client sent them, then a missing ``execute``; a
command's arguments in schema order (missing, mistyped, out of range), then the first unexpected
argument in the order sent.  QEMU walks hash tables instead, so with two or more problems of the
same rank it may name another one of them; with a single problem the reply is QEMU's, word for word.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import ipaddress
import itertools
import logging
import re
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Callable

from .. import __version__
from ..ownership import SocketClaim

__all__ = ["QMPServer", "CommandRegistry", "QMPError", "Arg", "ERROR_CLASSES", "JSONStreamParser"]

log = logging.getLogger("kickcall.monitor")

ERROR_CLASSES = ("GenericError", "CommandNotFound", "DeviceNotActive", "DeviceNotFound", "KVMMissingCap")
MAX_MESSAGE = 1 << 20  # bytes of tokens in one JSON value (QEMU: 64 MiB)
MAX_TOKENS = 1 << 17  # tokens in one JSON value (QEMU: 2 Mi)
MAX_NESTING = 1024  # open brackets + braces, as QEMU
MAX_DEPTH = MAX_NESTING  # (old name)
MAX_BAD_INPUTS = 4096  # malformed JSON inputs in a row before the client is disconnected
MAX_BACKLOG = 8 << 20  # unsent bytes (events) a client may leave unread before it is disconnected

# Handlers run one at a time across all clients of a server (QEMU: under the big lock).  The
# default for ``QMPServer(serialize=None)``; False only in tests that show what it prevents.
SERIALIZE_DISPATCH = True

_INT64_MIN, _INT64_END, _UINT64_END = -(1 << 63), 1 << 63, 1 << 64


class QMPError(Exception):
    """An error reply: class (one of QEMU's) and description."""

    def __init__(self, desc: str, cls: str = "GenericError") -> None:
        super().__init__(desc)
        self.desc = desc
        self.cls = cls


# ---------------------------------------------------------------------------------------------------
# JSON input: tokenizer -> message splitter -> parser
# ---------------------------------------------------------------------------------------------------

def _scalar_ok(cp: int) -> bool:
    """A code point QEMU keeps in a string: not a surrogate, not a noncharacter, at most U+10FFFF."""
    return 0 <= cp <= 0x10FFFF and not 0xD800 <= cp <= 0xDFFF and not 0xFDD0 <= cp <= 0xFDEF \
        and cp & 0xFFFE != 0xFFFE


_NONCHARACTERS = re.compile("[\ufdd0-\ufdef" + "".join(chr(plane << 16 | low) for plane in range(17)
                                                      for low in (0xFFFE, 0xFFFF)) + "]")
# one character's worth of bytes: an ASCII run, a lead byte with up to as many continuation bytes as
# it announces, or a byte that cannot start a character
_CHAR_BYTES = re.compile(rb"[\x00-\x7f]+|[\xc0-\xdf][\x80-\xbf]?|[\xe0-\xef][\x80-\xbf]{0,2}"
                         rb"|[\xf0-\xf7][\x80-\xbf]{0,3}|[\xf8-\xfb][\x80-\xbf]{0,4}|[\xfc\xfd][\x80-\xbf]{0,5}|.",
                         re.S)


def _utf8(b: bytes) -> str | None:
    """Bytes in modified UTF-8 (``\\xC0\\x80`` is NUL, no noncharacters), or None if they are not."""
    if b.isascii():
        return b.decode("ascii")
    try:
        s = b.replace(b"\xc0\x80", b"\0").decode("utf-8")
    except UnicodeDecodeError:
        return None
    return None if _NONCHARACTERS.search(s) else s


def _shown(b: bytes) -> str:
    """How QEMU shows raw input bytes in an error text: up to the first NUL, each malformed
    character (a lead byte and the continuation bytes that follow it) as one U+FFFD."""
    b = b.partition(b"\0")[0]
    s = _utf8(b)
    if s is not None:
        return s
    out = []
    for m in _CHAR_BYTES.finditer(b):
        chunk = m.group()
        lead = chunk[0]
        if lead < 0x80:
            out.append(chunk.decode("ascii"))
            continue
        width = 2 if lead < 0xE0 else 3 if lead < 0xF0 else 4  # (a lead byte from \xF8 up is never valid)
        s = _utf8(chunk) if 0xC0 <= lead < 0xF8 and len(chunk) == width else None
        out.append("\ufffd" if s is None else s)
    return "".join(out)


class _BadJSON(Exception):
    pass


class _Quitting(Exception):
    """The process is quitting: the request is not executed and gets no reply (as in QEMU, which
    exits before it reaches it)."""


# Token kinds: the punctuation character itself, "s" string, "i" integer, "f" other number,
# "k" keyword, "!" a malformed token (its bytes are the "stray" text).
_PUNCTUATION = frozenset(b"{}[],:")
_SPACE = re.compile(rb"[ \t\r\n]+")
# after a malformed token: skip to a bracket, brace, colon, comma, control character (not tab), \xFE, \xFF
_RECOVER = re.compile(rb"[^\x00-\x08\x0a-\x1f\xfe\xff\[\]{}:,]+")
_WORD = re.compile(rb"[a-z]+")
# a string so far: any byte from 0x20 to 0xFD but the quote and backslash, or backslash + such a byte
_STRING = {q: re.compile(rb"%c(?:[^%c\\\x00-\x1f\xfe\xff]|\\[\x20-\xfd])*" % (q, q)) for q in b"\"'"}
# the longest start of a number that can still become one (after a lone 0 no digit may follow, and
# an exponent needs digits before it that are not a lone 0); it is a number when it ends in a digit
_NUMBER = re.compile(rb"-?(?:0(?:\.(?:[0-9]+(?:[eE][+-]?[0-9]*)?)?)?"
                     rb"|[1-9][0-9]*(?:\.(?:[0-9]+(?:[eE][+-]?[0-9]*)?)?|[eE][+-]?[0-9]*)?)?")
_LONG_DIGITS = re.compile(rb"([0-9]{2})[0-9]+")


class _Tokenizer:
    """Cuts a byte stream into tokens as it arrives.

    Between tokens the next byte says what comes: punctuation, a quote, a letter, a digit or minus,
    or else a malformed token of that one byte.  A token is matched with one regular expression; a
    token that runs into the end of the bytes fed so far is kept back (``head``: its bytes) and
    scanned again when more arrive, through ``stub``: a few bytes that scan exactly as ``head`` does
    (the quote, plus a pending backslash; one letter; the number with long digit runs cut to two),
    so a long token fed in small pieces costs linear time.  A malformed token ends at the byte that
    made it so, and input is then skipped (see ``_RECOVER``)."""

    def __init__(self) -> None:
        self.head = bytearray()
        self.stub = b""
        self.recovering = False

    def tokens(self, data: bytes) -> Iterator[tuple[str, bytes]]:
        lead = len(self.stub)
        buf = self.stub + data
        self.stub = b""
        n, i = len(buf), 0

        def text(start: int, end: int) -> bytes:
            return bytes(self.head) + buf[lead:end] if start < lead else buf[start:end]

        while i < n:
            if self.recovering:
                m = _RECOVER.match(buf, i)
                if m:
                    i = m.end()
                    if i == n:
                        break
                self.recovering = False
            m = _SPACE.match(buf, i)
            if m:
                i = m.end()
                if i == n:
                    break
            c = buf[i]
            if c in _PUNCTUATION:
                yield chr(c), buf[i:i + 1]
                i += 1
                continue
            if c == 0x22 or c == 0x27:
                j = _STRING[c].match(buf, i).end()
                if j < n and buf[j] == c:
                    yield "s", text(i, j + 1)
                    i = j + 1
                    continue
                if j == n or (buf[j] == 0x5C and j + 1 == n):
                    self._keep(buf, i, lead, bytes([c]) + buf[j:])
                    return
                bad = j + 2 if buf[j] == 0x5C else j + 1  # a bad byte, or a backslash and a bad byte
            elif 0x61 <= c <= 0x7A:
                j = _WORD.match(buf, i).end()
                if j == n:
                    self._keep(buf, i, lead, b"a")
                    return
                yield "k", text(i, j)
                i = j
                continue
            elif c == 0x2D or 0x30 <= c <= 0x39:
                j = _NUMBER.match(buf, i).end()
                if j == n:
                    self._keep(buf, i, lead, _LONG_DIGITS.sub(rb"\1", buf[i:]))
                    return
                if 0x30 <= buf[j - 1] <= 0x39 and not 0x30 <= buf[j] <= 0x39:
                    t = text(i, j)
                    yield ("f" if b"." in t or b"e" in t or b"E" in t else "i"), t
                    i = j
                    continue
                bad = j + 1
            else:
                bad = i + 1
            yield "!", text(i, bad)
            i = bad
            self.recovering = True
        self.head.clear()

    def _keep(self, buf: bytes, start: int, lead: int, stub: bytes) -> None:
        if start >= lead:
            self.head[:] = buf[start:]
        else:
            self.head += buf[lead:]
        self.stub = stub


def _string_value(tok: bytes) -> str:
    """A string token (quotes included) as text; the first problem from the left is reported."""
    out = []
    pos, end = 1, len(tok) - 1
    while True:
        esc = tok.find(b"\\", pos, end)
        run = tok[pos:end if esc < 0 else esc]
        if run:
            s = _utf8(run)
            if s is None:
                raise _BadJSON("invalid UTF-8 sequence in string")
            out.append(s)
        if esc < 0:
            return "".join(out)
        c = chr(tok[esc + 1])
        if c == "u":
            cp, pos = _hex4(tok, esc + 2), esc + 6
            if 0xD800 <= cp <= 0xDBFF and tok.startswith(b"\\u", pos):
                low = _hex4(tok, pos + 2)
                cp = 0x10000 + ((cp - 0xD800) << 10 | (low - 0xDC00)) if 0xDC00 <= low <= 0xDFFF else -1
                pos += 6 if cp >= 0 else 0
            if not _scalar_ok(cp):
                raise _BadJSON(f"{_shown(tok[esc:pos])} is not a valid Unicode character")
            out.append(chr(cp))
        elif c in _ESCAPED:
            out.append(_ESCAPED[c])
            pos = esc + 2
        else:
            raise _BadJSON("invalid escape sequence in string")


_ESCAPED = {'"': '"', "'": "'", "\\": "\\", "/": "/", "b": "\b", "f": "\f", "n": "\n", "r": "\r", "t": "\t"}
_HEX4 = re.compile(rb"[0-9a-fA-F]{4}")


def _hex4(b: bytes, at: int) -> int:
    m = _HEX4.match(b, at)
    return int(m.group(), 16) if m else -1


def _number_value(kind: str, text: bytes) -> int | float:
    """An integer stays one when it fits an int64, or (not negative) a uint64; else a double."""
    if kind == "i" and len(text) <= 20:
        v = int(text)
        if _INT64_MIN <= v < _UINT64_END:
            return v
    return float(text)


_KEYWORDS: dict[bytes, Any] = {b"true": True, b"false": False, b"null": None}


def _parse_message(tokens: list[tuple[str, bytes]]) -> Any:
    """One message's tokens -> its value, or _BadJSON with the first problem.  Iterative: an open
    container waits on ``stack``; for an object, ``keys`` holds the key whose value comes next
    (None while a key is expected; a key may be any value, and is refused after it is read)."""
    stack: list[Any] = []
    keys: list[str | None] = []
    pos, n = 0, len(tokens)

    def take() -> str:
        nonlocal pos
        if pos == n:
            raise _BadJSON("premature EOI")
        pos += 1
        return tokens[pos - 1][0]

    while True:
        kind = take()  # a value starts here
        text = tokens[pos - 1][1]
        value: Any
        if kind == "[" or kind == "{":
            if pos < n and tokens[pos][0] == ("]" if kind == "[" else "}"):
                pos += 1
                value = [] if kind == "[" else {}
            else:
                stack.append([] if kind == "[" else {})
                keys.append(None)
                continue
        elif kind == "s":
            value = _string_value(text)
        elif kind == "i" or kind == "f":
            value = _number_value(kind, text)
        elif kind == "k":
            if text not in _KEYWORDS:
                raise _BadJSON(f"invalid keyword '{text.decode()}'")
            value = _KEYWORDS[text]
        else:
            raise _BadJSON("expecting value")
        while stack:  # the value goes into the innermost open container, which it may complete
            top = stack[-1]
            if isinstance(top, list):
                top.append(value)
                sep = take()
                if sep == ",":
                    break
                if sep != "]":
                    raise _BadJSON("expected separator in list")
            elif keys[-1] is None:
                if not isinstance(value, str):
                    raise _BadJSON("key is not a string in object")
                if take() != ":":
                    raise _BadJSON("missing : in object pair")
                keys[-1] = value
                break
            else:
                if keys[-1] in top:
                    raise _BadJSON("duplicate key")
                top[keys[-1]] = value
                keys[-1] = None
                sep = take()
                if sep == ",":
                    break
                if sep != "}":
                    raise _BadJSON("expected separator in dict")
            value = stack.pop()
            keys.pop()
        else:
            return value


class JSONStreamParser:
    """QEMU-dialect JSON messages from a byte stream: ``feed`` bytes, get ``(value, None)`` or
    ``(None, error text)`` per message, in order.

    Tokens gather into a message until no bracket or brace is open, or a closer has no opener
    (then the parser reports what is wrong).  A malformed token drops the message so far; opening
    more than ``MAX_NESTING`` drops it too, and reading goes on with the next token.  ``fatal`` is
    set (and a last error returned) when a message passes kickcall's size bounds; the caller then
    drops the connection."""

    def __init__(self, max_message: int = MAX_MESSAGE, max_tokens: int = MAX_TOKENS) -> None:
        self.max_message = max_message
        self.max_tokens = max_tokens
        self.fatal: str | None = None
        self._lexer = _Tokenizer()
        self._drop()

    def _drop(self) -> None:
        self._tokens: list[tuple[str, bytes]] = []
        self._size = self._braces = self._brackets = 0

    def feed(self, data: bytes) -> list[tuple[Any, str | None]]:
        out: list[tuple[Any, str | None]] = []
        if self.fatal is not None:
            return out
        for kind, text in self._lexer.tokens(data):
            if self._size + len(text) > self.max_message:
                self.fatal = "JSON token size limit exceeded"
                break
            if kind == "!":
                out.append((None, f"JSON parse error, stray '{_shown(text)}'"))
                self._drop()
                continue
            if len(self._tokens) >= self.max_tokens:
                self.fatal = "JSON token count limit exceeded"
                break
            if kind == "{" or kind == "[":
                if kind == "{":
                    self._braces += 1
                else:
                    self._brackets += 1
                if self._braces + self._brackets > MAX_NESTING:
                    out.append((None, "JSON nesting depth limit exceeded"))
                    self._drop()
                    continue
            elif kind == "}":
                self._braces -= 1
            elif kind == "]":
                self._brackets -= 1
            self._tokens.append((kind, text))
            self._size += len(text)
            if self._braces >= 0 and self._brackets >= 0 and self._braces + self._brackets > 0:
                continue  # the message goes on
            tokens = self._tokens
            self._drop()
            try:
                out.append((_parse_message(tokens), None))
            except _BadJSON as e:
                out.append((None, f"JSON parse error, {e}"))
        else:
            if self._size + len(self._lexer.head) > self.max_message:
                self.fatal = "JSON token size limit exceeded"
        if self.fatal is not None:
            out.append((None, self.fatal))
            self._drop()
        return out


# ---------------------------------------------------------------------------------------------------
# commands
# ---------------------------------------------------------------------------------------------------

_TYPE_NAMES = {"int": "integer", "str": "string", "bool": "boolean", "number": "number", "object": "object",
               "array": "array", "any": "any"}


@dataclass
class Arg:
    name: str
    type: str  # int, str, bool, number, object, array, any
    optional: bool = False
    enum: tuple[str, ...] | None = None
    min: int | None = None
    max: int | None = None


@dataclass
class Command:
    name: str
    handler: Callable[..., Any]
    args: list[Arg] = field(default_factory=list)
    doc: str = ""
    unstable: bool = False
    allow_before_negotiation: bool = False


def _unsigned(a: Arg) -> bool:
    """An "int" with a lower bound of 0 or more is one of QEMU's unsigned types (uint8..uint64)."""
    return a.type == "int" and a.min is not None and a.min >= 0


def _type_ok(a: Arg, v: Any) -> bool:
    t = a.type
    if t == "int":
        if not isinstance(v, int) or isinstance(v, bool):
            return False
        # QEMU: an int64 member takes an int64; an unsigned one (uint8..uint64) any integer that
        # is an int64 or a uint64 (and then says "expects uint16_t" etc. when out of range)
        return _INT64_MIN <= v < (_UINT64_END if _unsigned(a) else _INT64_END)
    if t == "str":
        return isinstance(v, str)
    if t == "bool":
        return isinstance(v, bool)
    if t == "number":
        return isinstance(v, (int, float)) and not isinstance(v, bool)
    if t == "object":
        return isinstance(v, dict)
    if t == "array":
        return isinstance(v, list)
    return True


def _type_error(a: Arg) -> QMPError:
    """QEMU 7.2: an unsigned member (uint8..uint64) refuses anything but an integer it can read
    with "expects uint64" (not "Invalid parameter type"); the others name the JSON type."""
    if _unsigned(a):
        return QMPError(f"Parameter '{a.name}' expects uint64")
    return QMPError(f"Invalid parameter type for '{a.name}', expected: {_TYPE_NAMES[a.type]}")


class CommandRegistry:
    """Commands with typed argument schemas (what ``query-commands`` lists)."""

    def __init__(self) -> None:
        self.commands: dict[str, Command] = {}

    def add(self, name: str, handler: Callable[..., Any], args: list[Arg] | None = None, doc: str = "",
            unstable: bool = False) -> None:
        self.commands[name] = Command(name, handler, args or [], doc, unstable or name.startswith("x-"))

    def command(self, name: str, *args: Arg, doc: str = "") -> Callable:
        def deco(fn: Callable) -> Callable:
            self.add(name, fn, list(args), doc)
            return fn

        return deco

    def check_args(self, cmd: Command, arguments: dict) -> dict:
        """Refuse what QEMU's marshaller refuses, with its texts: members in schema order (missing,
        mistyped, out of range), then the first unexpected member in the order sent (QEMU may name
        another unexpected one).  Returns the handler's keyword arguments."""
        out = {}
        for a in cmd.args:
            if a.name not in arguments:
                if not a.optional:
                    raise QMPError(f"Parameter '{a.name}' is missing")
                continue
            v = arguments[a.name]
            if not _type_ok(a, v):
                raise _type_error(a)
            if a.enum is not None and v not in a.enum:
                raise QMPError(f"Parameter '{a.name}' does not accept value '{v}'")
            if a.type == "int" and ((a.min is not None and v < a.min) or (a.max is not None and v > a.max)):
                raise QMPError(f"Parameter '{a.name}' expects {_range_text(a)}")
            out[a.name.replace("-", "_")] = v
        _check_unexpected(arguments, {a.name for a in cmd.args})
        return out


def _check_unexpected(arguments: dict, names: set[str]) -> None:
    for k in arguments:
        if k not in names:
            raise QMPError(f"Parameter '{k}' is unexpected")


def _range_text(a: Arg) -> str:
    """QEMU 7.2 names the C type of a narrow integer ("expects uint16_t", "expects int32_t"); for a
    range no C type has, the phrase QEMU's own range checks use."""
    for bits in (8, 16, 32):
        if a.min == 0 and a.max == (1 << bits) - 1:
            return f"uint{bits}_t"
        if a.min == -(1 << (bits - 1)) and a.max == (1 << (bits - 1)) - 1:
            return f"int{bits}_t"
    if _unsigned(a) and (a.max is None or a.max == _UINT64_END - 1):
        return "uint64"  # (QEMU would wrap a negative number to 2**64 - n instead)
    if a.min is not None and a.max is not None:
        return f"a value between {a.min} and {a.max}"
    if a.min is not None:
        return f"a value of at least {a.min}"
    return f"a value of at most {a.max}"


def _check_capabilities_args(args: dict) -> list[str]:
    """qmp_capabilities' schema: ``{'*enable': ['QMPCapability']}`` with QMPCapability = oob."""
    enable = args.get("enable", [])
    if "enable" in args:
        if not isinstance(enable, list):
            raise QMPError("Invalid parameter type for 'enable', expected: array")
        for i, cap in enumerate(enable):
            if not isinstance(cap, str):
                raise QMPError(f"Invalid parameter type for 'enable[{i}]', expected: string")
            if cap != "oob":  # QEMU names a list element 'null' here
                raise QMPError(f"Parameter 'null' does not accept value '{cap}'")
    _check_unexpected(args, {"enable"})
    return enable


# ---------------------------------------------------------------------------------------------------
# output
# ---------------------------------------------------------------------------------------------------

_ESCAPES = {ord('"'): '\\"', ord("\\"): "\\\\", 8: "\\b", 12: "\\f", 10: "\\n", 13: "\\r", 9: "\\t"}
_ESCAPES.update({c: f"\\u{c:04X}" for c in [*range(0x20), 0x7F] if c not in _ESCAPES})
_PLAIN = re.compile(r'[^"\\\x00-\x1f\x7f-\U0010ffff]*\Z')
_NON_ASCII = re.compile(r"[\x80-\U0010ffff]")


def _escape_non_ascii(m: "re.Match[str]") -> str:
    cp = ord(m.group())
    if 0xD800 <= cp <= 0xDFFF or 0xFDD0 <= cp <= 0xFDEF or cp & 0xFFFE == 0xFFFE:
        cp = 0xFFFD  # QEMU never holds these (its input refuses them): what it prints for junk
    if cp > 0xFFFF:
        cp -= 0x10000
        return f"\\u{0xD800 + (cp >> 10):04X}\\u{0xDC00 + (cp & 0x3FF):04X}"
    return f"\\u{cp:04X}"


def _quote(s: str) -> str:
    """A JSON string as QEMU prints one: \\" \\\\ \\b \\f \\n \\r \\t, every other control character,
    DEL and everything beyond ASCII as upper-case \\uXXXX (a surrogate pair past the BMP); '/' as is."""
    if _PLAIN.match(s):
        return '"' + s + '"'
    s = s.translate(_ESCAPES)
    if not s.isascii():
        s = _NON_ASCII.sub(_escape_non_ascii, s)
    return '"' + s + '"'


class _Text(str):
    """Encoded JSON waiting in _dumps' work list."""


def _dumps(obj: Any) -> str:
    """JSON as QEMU prints it, compact form: ``", "`` and ``": "``, strings as _quote(), doubles
    as ``%.17g``; objects in insertion order (the reply envelopes are built in QEMU's order).  No
    recursion: an id may be 1024 levels deep."""
    out: list[str] = []
    todo: list[Any] = [obj]
    while todo:
        x = todo.pop()
        t = type(x)
        if t is _Text:
            out.append(x)
        elif t is str:
            out.append(_quote(x))
        elif x is None:
            out.append("null")
        elif t is bool:
            out.append("true" if x else "false")
        elif isinstance(x, int):
            out.append(str(int(x)))
        elif isinstance(x, float):
            out.append("%.17g" % x)
        elif isinstance(x, str):  # a str subclass (a StrEnum member, ...)
            out.append(_quote(str(x)))
        elif isinstance(x, dict):
            if not x:
                out.append("{}")
                continue
            parts: list[Any] = []
            for i, (k, v) in enumerate(x.items()):
                if not isinstance(k, str):
                    raise TypeError(f"an object's keys must be strings, not {type(k).__name__}")
                parts += [_Text(("{" if i == 0 else ", ") + _quote(k) + ": "), v]
            todo += reversed(parts + [_Text("}")])
        elif isinstance(x, (list, tuple)):
            if not x:
                out.append("[]")
                continue
            parts = []
            for i, v in enumerate(x):
                parts += [_Text("[" if i == 0 else ", "), v]
            todo += reversed(parts + [_Text("]")])
        else:
            raise TypeError(f"{type(x).__name__} is not JSON")
    return "".join(out)


# ---------------------------------------------------------------------------------------------------
# a connection
# ---------------------------------------------------------------------------------------------------

class _Client:
    def __init__(self, server: "QMPServer", reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.server = server
        self.reader = reader
        self.writer = writer
        self.negotiated = False
        self.parser = JSONStreamParser(server.max_message, server.max_tokens)
        self.bad = 0
        self.id = next(server._ids)
        self.closing = False
        self.quit_after_reply = False

    async def send(self, obj: dict) -> None:
        await self.send_raw((_dumps(obj) + "\r\n").encode())

    async def send_raw(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    def push(self, data: bytes) -> None:
        """Queue an event without waiting; a client that leaves too much unread is dropped."""
        if self.closing:
            return
        transport = self.writer.transport
        if transport is None or transport.is_closing():
            return
        self.writer.write(data)
        if transport.get_write_buffer_size() > self.server.max_backlog:
            log.warning("QMP client %d does not read its events: disconnected", self.id)
            self.closing = True
            transport.abort()

    async def run(self) -> None:
        await self.send(self.server.greeting())
        handled = 0
        while True:
            chunk = await self.reader.read(65536)
            if not chunk:
                return
            events = self.parser.feed(chunk)
            for i, (value, err) in enumerate(events):
                if self.closing:
                    return
                if err is not None:
                    self.bad += 1
                    await self.send({"error": {"class": "GenericError", "desc": err}})  # no id: none was read
                    if self.parser.fatal is not None and i == len(events) - 1:  # past kickcall's bounds
                        raise ConnectionError(err)
                    if self.bad >= self.server.max_bad_inputs:
                        raise ConnectionError("too much malformed input")
                else:
                    self.bad = 0
                    await self.handle(value)
                handled += 1
                if handled % 32 == 0:
                    await asyncio.sleep(0)  # let the other clients in

    async def handle(self, obj: Any) -> None:
        """Check the request's members in the order sent, then run it; QEMU's texts throughout."""
        rid_present = isinstance(obj, dict) and "id" in obj
        try:
            if not isinstance(obj, dict):
                raise QMPError("QMP input must be a JSON object")
            for k, v in obj.items():
                if k == "execute":
                    if not isinstance(v, str):
                        raise QMPError("QMP input member 'execute' must be a string")
                elif k == "arguments":
                    if not isinstance(v, dict):
                        raise QMPError("QMP input member 'arguments' must be an object")
                elif k != "id":  # exec-oob too: out-of-band execution is not offered
                    raise QMPError(f"QMP input member '{k}' is unexpected")
            if "execute" not in obj:
                raise QMPError("QMP input lacks member 'execute'")
            try:
                result = await self.server.dispatch(self, obj["execute"], obj.get("arguments", {}))
            except _Quitting:
                return  # no reply: the process is quitting
            reply: dict = {"return": result}
            if rid_present:
                reply["id"] = obj["id"]
            try:
                data = _dumps(reply)
            except (TypeError, ValueError) as e:
                log.error("QMP command %s returned what JSON cannot carry: %s", obj["execute"], e)
                raise QMPError(f"{obj['execute']}: the reply cannot be encoded: {e}") from None
        except QMPError as e:
            # QEMU's key order: "id" before "error" (and after "return")
            reply = {"id": obj["id"]} if rid_present else {}
            reply["error"] = {"class": e.cls, "desc": e.desc}
            data = _dumps(reply)
        try:
            await self.send_raw((data + "\r\n").encode())
        finally:
            if self.quit_after_reply:  # QEMU replies to quit, then exits
                self.quit_after_reply = False
                self.server._quit()


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name: refused, it could resolve to anything
        return False


class QMPServer:
    """Serve a CommandRegistry on a Unix socket (and optionally a loopback TCP port)."""

    def __init__(self, registry: CommandRegistry, *, path: str | None = None, tcp: tuple[str, int] | None = None,
                 name: str = "kickcall", max_message: int = MAX_MESSAGE, max_tokens: int = MAX_TOKENS,
                 max_bad_inputs: int = MAX_BAD_INPUTS, max_backlog: int = MAX_BACKLOG,
                 claim: SocketClaim | None = None, serialize: bool | None = None) -> None:
        """*claim*: the socket path, already checked and locked (``ownership.SocketClaim``; the
        caller releases it).  *serialize*: run handlers one at a time across all clients (default
        ``SERIALIZE_DISPATCH``, True; False only to show in a test what it prevents)."""
        self.registry = registry
        self.claim = claim  # the socket path, checked and locked (ownership.SocketClaim)
        self._own_claim = False  # a claim given by the caller is the caller's to release
        self.path = claim.path if claim is not None else path
        self.tcp = tcp
        self.name = name
        self.max_message = max_message
        self.max_tokens = max_tokens
        self.max_bad_inputs = max_bad_inputs
        self.max_backlog = max_backlog
        if tcp is not None and not _is_loopback(tcp[0]):
            raise ValueError(f"QMP over TCP is only offered on a loopback IP address (127.0.0.0/8 or ::1), "
                             f"not {tcp[0]!r}")
        self.clients: set[_Client] = set()
        self._ids = itertools.count(1)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._servers: list[asyncio.AbstractServer] = []
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self.tcp_port: int | None = None
        self.on_quit: Callable[[], None] | None = None
        self.commands_run = 0
        self.serialize = SERIALIZE_DISPATCH if serialize is None else serialize
        # held from a handler's start to its return (not to its reply), in the order requests came
        self._dispatch_lock = asyncio.Lock()
        self.commands_waiting = 0  # checked requests waiting for the handler running now to return
        # handlers run here, never on the event loop; one at a time when serialised
        self._executor = concurrent.futures.ThreadPoolExecutor(max_workers=8,
                                                               thread_name_prefix=f"{name}-qmp-cmd")
        self._quit_requested = False
        self._quit_actions: list[Callable[[], None]] = []
        self._quit_ran = False
        self._add_builtins()

    def _add_builtins(self) -> None:
        r = self.registry
        if "query-commands" not in r.commands:
            r.add("query-commands", lambda: [{"name": n} for n in sorted(r.commands)] + [{"name": "qmp_capabilities"}])
        if "query-version" not in r.commands:
            major, minor, micro = (int(x) for x in (__version__.split(".") + ["0", "0"])[:3])
            r.add("query-version", lambda: {"qemu": {"micro": micro, "minor": minor, "major": major},
                                            "package": f"kickcall {__version__}"})

    def greeting(self) -> dict:
        v = self.registry.commands["query-version"].handler()
        return {"QMP": {"version": v, "capabilities": []}}

    async def dispatch(self, client: _Client, name: str, args: dict) -> Any:
        if name == "qmp_capabilities":
            enable = _check_capabilities_args(args)
            if client.negotiated:
                raise QMPError("Capabilities negotiation is already complete, command ignored", "CommandNotFound")
            if enable:  # QEMU's text for a capability it does not offer
                raise QMPError(f"Capability {', '.join(enable)} not available")
            client.negotiated = True
            return {}
        if not client.negotiated:
            raise QMPError("Expecting capabilities negotiation with 'qmp_capabilities'", "CommandNotFound")
        cmd = self.registry.commands.get(name)
        if cmd is None:
            raise QMPError(f"The command {name} has not been found", "CommandNotFound")
        kwargs = self.registry.check_args(cmd, args)
        if self._quit_requested:
            raise _Quitting()

        def run() -> tuple[Any, bool]:
            """The handler, in an executor thread; whether it (first) requested the quit."""
            before = self._quit_requested
            result = cmd.handler(**kwargs)
            if name == "quit" and not self._quit_requested:  # a registry whose quit does not ask itself
                self.request_quit()
            return result, not before and self._quit_requested

        try:
            result, quit_now = await self._execute(run)
        except (QMPError, _Quitting):
            raise
        except Exception as e:  # a handler bug must not take the monitor down
            log.exception("QMP command %s failed", name)
            raise QMPError(f"{name}: {type(e).__name__}: {e}") from None
        if quit_now:
            client.quit_after_reply = True
        return {} if result is None else result

    async def _execute(self, fn: Callable[[], Any]) -> Any:
        """Run *fn* on an executor thread; when serialised, under the dispatch lock, which is let go
        when *fn* has returned -- not before, even if the awaiting client is cancelled meanwhile
        (the lock follows the thread, not the coroutine).  Nothing is executed once quit has been
        requested."""
        loop = asyncio.get_running_loop()
        lock = self._dispatch_lock if self.serialize else None
        if lock is not None:
            self.commands_waiting += 1
            try:
                await lock.acquire()
            finally:
                self.commands_waiting -= 1
        try:
            if self._quit_requested:
                raise _Quitting()
            self.commands_run += 1
            cf = self._executor.submit(fn)
        except BaseException:
            if lock is not None:
                lock.release()
            raise
        if lock is not None:
            def release(_: concurrent.futures.Future) -> None:
                try:
                    loop.call_soon_threadsafe(lock.release)
                except RuntimeError:  # the loop closed meanwhile (the server stopped)
                    pass

            cf.add_done_callback(release)
        return await asyncio.wrap_future(cf)

    # -- quit ------------------------------------------------------------------------------------------
    @property
    def quitting(self) -> bool:
        """Whether quit has been requested (QEMU: a shutdown request is pending)."""
        return self._quit_requested

    def request_quit(self, action: Callable[[], None] | None = None) -> bool:
        """Ask the process to quit, from a handler (QEMU's ``qemu_system_shutdown_request``): no
        command is executed from now on; once the reply of the command running now is on its way,
        *action* runs, then ``on_quit``.  False (and nothing recorded) when a quit was already
        requested.  Handlers run one at a time, so a handler that checks ``quitting``, announces
        SHUTDOWN and then calls this cannot race another's quit."""
        if self._quit_requested:
            return False
        self._quit_requested = True
        if action is not None:
            self._quit_actions.append(action)
        return True

    def _quit(self) -> None:
        """Once the reply of the command that requested quit is on its way (no timer): the quit
        actions, then on_quit.  Connections stay open until the owner stops the server (the process
        exits), so a client still sees every event sent meanwhile; requests get no reply."""
        if self._quit_ran:
            return
        self._quit_ran = True
        for cb in [*self._quit_actions, self.on_quit]:
            if cb is None:
                continue
            try:
                cb()
            except Exception:
                log.exception("a quit action failed")

    # -- events ---------------------------------------------------------------------------------------
    def emit(self, event: str, data: dict | None = None) -> None:
        """Send an event to every negotiated client (from any thread).  As QEMU, an event without
        data (``None`` or ``{}``: STOP, RESUME, ...) has no ``data`` member."""
        loop = self._loop
        if loop is None or loop.is_closed():
            return
        us = time.time_ns() // 1000
        msg: dict = {"timestamp": {"seconds": us // 1_000_000, "microseconds": us % 1_000_000},  # QEMU's order
                     "event": event}
        if data:
            msg["data"] = data
        raw = (_dumps(msg) + "\r\n").encode()

        def send_all() -> None:
            for c in list(self.clients):
                if c.negotiated:
                    try:
                        c.push(raw)
                    except (ConnectionError, OSError, RuntimeError):
                        pass

        try:
            loop.call_soon_threadsafe(send_all)
        except RuntimeError:  # the loop closed meanwhile
            pass

    # -- life cycle ----------------------------------------------------------------------------------
    def start(self) -> "QMPServer":
        self._thread = threading.Thread(target=self._run, name=f"{self.name}-qmp", daemon=True)
        self._thread.start()
        self._ready.wait(10)
        if self._error is not None:
            raise self._error
        return self

    def _run(self) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        try:
            loop.run_until_complete(self._open())
        except BaseException as e:
            self._error = e
            self._ready.set()
            loop.close()
            return
        self._ready.set()
        try:
            loop.run_forever()
        finally:
            for s in self._servers:
                s.close()
            for c in list(self.clients):
                c.closing = True
                c.writer.close()
            tasks = [t for t in asyncio.all_tasks(loop) if not t.done()]
            for t in tasks:
                t.cancel()

            async def reap() -> None:
                await asyncio.gather(*tasks, return_exceptions=True)
                await asyncio.sleep(0)

            loop.run_until_complete(reap())
            loop.close()
            self._executor.shutdown(wait=False, cancel_futures=True)

    async def _open(self) -> None:
        if self.path is not None:
            if self.claim is None:  # checked now, before anything is created (ownership.py)
                self.claim = SocketClaim(self.path)
                self._own_claim = True
            sock = self.claim.bind(backlog=100)
            srv = await asyncio.start_unix_server(self._serve, sock=sock)
            self._servers.append(srv)
        if self.tcp is not None:
            srv = await asyncio.start_server(self._serve, host=self.tcp[0], port=self.tcp[1],
                                             family=socket.AF_INET6 if ":" in self.tcp[0] else socket.AF_INET)
            self.tcp_port = srv.sockets[0].getsockname()[1]
            self._servers.append(srv)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self._quit_requested:  # the process is quitting: as if it had gone already
            writer.close()
            return
        c = _Client(self, reader, writer)
        self.clients.add(c)
        try:
            await c.run()
        except (ConnectionError, OSError, asyncio.IncompleteReadError):
            pass
        except asyncio.CancelledError:  # stop(): asyncio's start_server callback would log a cancelled task
            pass
        except Exception:
            log.exception("QMP client %d", c.id)
        finally:
            self.clients.discard(c)
            c.closing = True
            try:
                writer.close()
            except Exception:
                pass

    def stop(self) -> None:
        loop = self._loop
        if loop is not None and loop.is_running():
            loop.call_soon_threadsafe(loop.stop)
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(10)
        if self.claim is not None and self._own_claim:  # the socket only if it is still the one we made
            self.claim.release()
