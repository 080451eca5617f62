"""QEMU-dialect JSON messages from a QMP byte stream (QEMU's json-lexer, json-streamer and
json-parser), read incrementally by kickcall's own reader, ``JSONStreamParser``.

Its observable behaviour was taken from running QEMU (tests/test_qmp_wire.py and
tests/test_qmp_fuzz.py send the same bytes to both and compare the replies): a message ends when
its brackets balance (no newline needed: ``qemu.qmp`` sends none), single-quoted strings, the
extra escape ``\\'``, modified UTF-8 (``\\xC0\\x80`` is NUL), integers beyond 64 bits read as
doubles, QEMU's error texts ("JSON parse error, stray '...'", "invalid keyword", "expecting
value", ...), its error recovery (after a bad token, skip to a bracket, brace, colon, comma,
control character or ``\\xFE``/``\\xFF``) and its nesting limit (1024; the rest is read afresh).

kickcall's own bounds where QEMU has none or a larger one: a message is at most ``MAX_MESSAGE``
bytes of tokens and ``MAX_TOKENS`` tokens (QEMU: 64 MiB, 2 Mi tokens), past which the parser
reports QEMU's limit error and sets ``fatal`` (the server then disconnects the client).
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

__all__ = ["JSONStreamParser", "MAX_MESSAGE", "MAX_TOKENS", "MAX_NESTING", "MAX_DEPTH",
           "INT64_MIN", "INT64_END", "UINT64_END"]

MAX_MESSAGE = 1 << 20  # bytes of tokens in one JSON value (QEMU: 64 MiB)
MAX_TOKENS = 1 << 17  # tokens in one JSON value (QEMU: 2 Mi)
MAX_NESTING = 1024  # open brackets + braces, as QEMU
MAX_DEPTH = MAX_NESTING  # (old name)

# The integers a message may carry as integers (QEMU's QNum: int64, or uint64 when not negative);
# anything beyond is read as a double.  The command schema checks arguments against the same range.
INT64_MIN, INT64_END, UINT64_END = -(1 << 63), 1 << 63, 1 << 64

# tokenizer -> message splitter -> parser

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
                m = _STRING[c].match(buf, i)
                j = m.end() if m is not None else i  # (the pattern matches the empty string)
                if j < n and buf[j] == c:
                    yield "s", text(i, j + 1)
                    i = j + 1
                    continue
                if j == n or (buf[j] == 0x5C and j + 1 == n):
                    self._keep(buf, i, lead, bytes([c]) + buf[j:])
                    return
                bad = j + 2 if buf[j] == 0x5C else j + 1  # a bad byte, or a backslash and a bad byte
            elif 0x61 <= c <= 0x7A:
                m = _WORD.match(buf, i)
                j = m.end() if m is not None else i  # (the pattern matches the empty string)
                if j == n:
                    self._keep(buf, i, lead, b"a")
                    return
                yield "k", text(i, j)
                i = j
                continue
            elif c == 0x2D or 0x30 <= c <= 0x39:
                m = _NUMBER.match(buf, i)
                j = m.end() if m is not None else i  # (the pattern matches the empty string)
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
        if INT64_MIN <= v < UINT64_END:
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
