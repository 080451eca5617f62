"""QMP commands and their argument schemas, checked as QEMU's generated marshallers check them.

Commands come from a ``CommandRegistry``: each has a typed argument schema (``Arg``) checked before
the handler runs (missing, unexpected or mistyped arguments are refused with QEMU's messages, as a
``QMPError`` whose class is one of ``ERROR_CLASSES``).

Which problem is reported when a request has several (a deliberate difference from QEMU): a
command's arguments in schema order (missing, mistyped, out of range), then the first unexpected
argument in the order sent.  QEMU walks hash tables instead, so with two or more problems of the
same rank it may name another one of them; with a single problem the reply is QEMU's, word for word.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

from .json_stream import INT64_END, INT64_MIN, UINT64_END

__all__ = ["QMPError", "ERROR_CLASSES", "Arg", "Command", "CommandRegistry", "check_capabilities_args"]

ERROR_CLASSES = ("GenericError", "CommandNotFound", "DeviceNotActive", "DeviceNotFound", "KVMMissingCap")


class QMPError(Exception):
    """An error reply: class (one of QEMU's) and description."""

    def __init__(self, desc: str, cls: str = "GenericError") -> None:
        super().__init__(desc)
        self.desc = desc
        self.cls = cls


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
        return INT64_MIN <= v < (UINT64_END if _unsigned(a) else INT64_END)
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
    if _unsigned(a) and (a.max is None or a.max == UINT64_END - 1):
        return "uint64"  # (QEMU would wrap a negative number to 2**64 - n instead)
    if a.min is not None and a.max is not None:
        return f"a value between {a.min} and {a.max}"
    if a.min is not None:
        return f"a value of at least {a.min}"
    return f"a value of at most {a.max}"


def check_capabilities_args(args: dict) -> list[str]:
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
