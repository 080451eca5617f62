"""QMP output as QEMU prints it (QEMU's qobject_to_json, compact form).

Strings and numbers printed as QEMU prints them: upper-case ``\\uXXXX`` for control characters
other than \\b \\f \\n \\r \\t, for DEL and for everything beyond ASCII (surrogate pairs past the
BMP), ``/`` unescaped, doubles as ``%.17g`` (0.1 is 0.10000000000000001, an infinite one ``inf``);
objects in insertion order, so the reply envelopes, built in QEMU's order ("return" before "id",
"id" before "error"), are printed in that order.
"""

from __future__ import annotations

import re
from typing import Any

__all__ = ["dumps"]

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
    """Encoded JSON waiting in dumps' work list."""


def dumps(obj: Any) -> str:
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
