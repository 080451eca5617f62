"""A QMP server in QEMU's wire format (docs/interop/qmp-spec.rst).

* greeting ``{"QMP": {"version": ..., "capabilities": []}}`` (no ``oob``: exec-oob is not
  implemented), then only ``qmp_capabilities`` until negotiation is done, with QEMU's error texts;
* replies ``{"return": ...}`` / ``{"error": {"class", "desc"}}`` echoing any ``id`` of any JSON type;
* events ``{"event", "data", "timestamp": {"seconds", "microseconds"}}`` to negotiated clients;
* a streaming JSON decoder: a command needs no newline (``qemu.qmp`` sends none); input is bounded
  in size and nesting; garbage gets an error and the parser resynchronises; a client that keeps
  sending garbage, or too much, is disconnected; every other client is served throughout;
* a Unix socket created with mode 0600, TCP only on a loopback address and only when asked.

Commands come from a ``CommandRegistry``: each has a typed argument schema checked before the
handler runs (missing, unexpected or mistyped arguments are refused with QEMU's messages).
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import logging
import os
import socket
import stat
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from .. import __version__

__all__ = ["QMPServer", "CommandRegistry", "QMPError", "Arg", "ERROR_CLASSES"]

log = logging.getLogger("kickcall.monitor")

ERROR_CLASSES = ("GenericError", "CommandNotFound", "DeviceNotActive", "DeviceNotFound", "KVMMissingCap")
MAX_MESSAGE = 1 << 20  # bytes of one JSON value
MAX_DEPTH = 64
MAX_BAD_INPUTS = 64  # parse errors before the client is disconnected


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
        known = {a.name: a for a in cmd.args}
        for k in arguments:
            if k not in known:
                raise QMPError(f"Parameter '{k}' is unexpected")
        out = {}
        for a in cmd.args:
            if a.name not in arguments:
                if not a.optional:
                    raise QMPError(f"Parameter '{a.name}' is missing")
                continue
            v = arguments[a.name]
            ok = {
                "int": isinstance(v, int) and not isinstance(v, bool),
                "str": isinstance(v, str),
                "bool": isinstance(v, bool),
                "number": isinstance(v, (int, float)) and not isinstance(v, bool),
                "object": isinstance(v, dict),
                "array": isinstance(v, list),
                "any": True,
            }[a.type]
            if not ok:
                raise QMPError(f"Invalid parameter type for '{a.name}', expected: {_TYPE_NAMES[a.type]}")
            if a.enum is not None and v not in a.enum:
                raise QMPError(f"Parameter '{a.name}' does not accept value '{v}'")
            if a.type == "int" and ((a.min is not None and v < a.min) or (a.max is not None and v > a.max)):
                raise QMPError(f"Parameter '{a.name}' expects {_range_text(a)}")
            out[a.name.replace("-", "_")] = v
        return out


def _range_text(a: Arg) -> str:
    if a.min == 0 and a.max == 0xFFFF:
        return "uint16"
    if a.min == 0 and a.max == 0xFFFFFFFF:
        return "uint32"
    return f"an integer in {a.min}..{a.max}"


def _depth(v: Any, limit: int) -> int:
    stack = [(v, 1)]
    deepest = 0
    while stack:
        x, d = stack.pop()
        deepest = max(deepest, d)
        if d > limit:
            return d
        if isinstance(x, dict):
            stack.extend((y, d + 1) for y in x.values())
        elif isinstance(x, list):
            stack.extend((y, d + 1) for y in x)
    return deepest


class _Client:
    def __init__(self, server: "QMPServer", reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.server = server
        self.reader = reader
        self.writer = writer
        self.negotiated = False
        self.buf = ""
        self.bad = 0
        self.id = next(server._ids)

    async def send(self, obj: dict) -> None:
        data = (json.dumps(obj, ensure_ascii=True) + "\r\n").encode()
        self.writer.write(data)
        await self.writer.drain()

    async def run(self) -> None:
        await self.send(self.server.greeting())
        decoder = json.JSONDecoder()
        while True:
            chunk = await self.reader.read(65536)
            if not chunk:
                return
            self.buf += chunk.decode("utf-8", errors="replace")
            while True:
                self.buf = self.buf.lstrip(" \t\r\n")
                if not self.buf:
                    break
                # QEMU resets its parser on an ASCII control character other than \t \r \n
                if ord(self.buf[0]) < 0x20 or self.buf[0] == "\x7f" or self.buf[0] == "\ufffd":
                    self.buf = self.buf[1:]
                    continue
                try:
                    obj, end = decoder.raw_decode(self.buf)
                except json.JSONDecodeError as e:
                    if e.pos >= len(self.buf) - 1 and len(self.buf) < MAX_MESSAGE and _incomplete(self.buf):
                        break  # wait for more input
                    await self._bad_input(f"JSON parse error, {e.msg.lower()}")
                    self._resync()
                    continue
                except RecursionError:
                    await self._bad_input("JSON parse error, too many nested objects")
                    self._resync()
                    continue
                self.buf = self.buf[end:]
                await self.handle(obj)
            if len(self.buf) > MAX_MESSAGE:
                await self._bad_input("JSON parse error, message too large")
                raise ConnectionError("message too large")

    async def _bad_input(self, desc: str) -> None:
        self.bad += 1
        await self.send({"error": {"class": "GenericError", "desc": desc}})
        if self.bad > MAX_BAD_INPUTS:
            raise ConnectionError("too much malformed input")

    def _resync(self) -> None:
        """Drop input up to the next point where a new value may start."""
        i = 1
        while i < len(self.buf) and self.buf[i] not in "{[":
            i += 1
        self.buf = self.buf[i:]

    async def handle(self, obj: Any) -> None:
        rid_present = isinstance(obj, dict) and "id" in obj
        rid = obj.get("id") if rid_present else None
        try:
            if _depth(obj, MAX_DEPTH) > MAX_DEPTH:
                raise QMPError("JSON parse error, too many nested objects")
            if not isinstance(obj, dict):
                raise QMPError("QMP input must be a JSON object")
            if "exec-oob" in obj:
                raise QMPError("QMP input member 'exec-oob' is unexpected" if "execute" not in obj else
                               "QMP input member 'exec-oob' is unexpected")
            for k in obj:
                if k not in ("execute", "arguments", "id"):
                    raise QMPError(f"QMP input member '{k}' is unexpected")
            if "execute" not in obj:
                raise QMPError("QMP input lacks member 'execute'")
            name = obj["execute"]
            if not isinstance(name, str):
                raise QMPError("QMP input member 'execute' must be a string")
            args = obj.get("arguments", {})
            if not isinstance(args, dict):
                raise QMPError("QMP input member 'arguments' must be an object")
            result = await self.server.dispatch(self, name, args)
            reply: dict = {"return": result}
        except QMPError as e:
            reply = {"error": {"class": e.cls, "desc": e.desc}}
        if rid_present:
            reply["id"] = rid
        await self.send(reply)


def _incomplete(buf: str) -> bool:
    """True if *buf* may be the beginning of a valid JSON value (more bytes to come)."""
    depth = 0
    in_str = False
    esc = False
    for ch in buf:
        if in_str:
            if esc:
                esc = False
            elif ch == "\\":
                esc = True
            elif ch == '"':
                in_str = False
        elif ch == '"':
            in_str = True
        elif ch in "{[":
            depth += 1
        elif ch in "}]":
            depth -= 1
            if depth < 0:
                return False
    return in_str or depth > 0 or buf.strip() in ("", "t", "tr", "tru", "f", "fa", "fal", "fals", "n", "nu",
                                                   "nul") or buf.strip().lstrip("-").replace(".", "").isdigit()


class QMPServer:
    """Serve a CommandRegistry on a Unix socket (and optionally a loopback TCP port)."""

    def __init__(self, registry: CommandRegistry, *, path: str | None = None, tcp: tuple[str, int] | None = None,
                 name: str = "kickcall") -> None:
        self.registry = registry
        self.path = path
        self.tcp = tcp
        self.name = name
        if tcp is not None and not ipaddress.ip_address(tcp[0]).is_loopback:
            raise ValueError(f"QMP over TCP is only offered on a loopback address, not {tcp[0]}")
        self.clients: set[_Client] = set()
        import itertools

        self._ids = itertools.count(1)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._servers: list[asyncio.AbstractServer] = []
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self.tcp_port: int | None = None
        self.on_quit: Callable[[], None] | None = None
        self.commands_run = 0
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
            if client.negotiated:
                raise QMPError(f"Capabilities negotiation is already complete, command '{name}' ignored",
                               "CommandNotFound")
            extra = set(args) - {"enable"}
            if extra:
                raise QMPError(f"Parameter '{sorted(extra)[0]}' is unexpected")
            enable = args.get("enable", [])
            if not isinstance(enable, list):
                raise QMPError("Invalid parameter type for 'enable', expected: array")
            for cap in enable:
                if cap != "oob":
                    raise QMPError(f"Parameter 'enable' does not accept value '{cap}'")
                raise QMPError("Capability oob not available")
            client.negotiated = True
            return {}
        if not client.negotiated:
            raise QMPError("Expecting capabilities negotiation with 'qmp_capabilities'", "CommandNotFound")
        cmd = self.registry.commands.get(name)
        if cmd is None:
            raise QMPError(f"The command {name} has not been found", "CommandNotFound")
        kwargs = self.registry.check_args(cmd, args)
        self.commands_run += 1
        loop = asyncio.get_running_loop()
        try:
            result = await loop.run_in_executor(None, lambda: cmd.handler(**kwargs))
        except QMPError:
            raise
        except Exception as e:  # a handler bug must not take the monitor down
            log.exception("QMP command %s failed", name)
            raise QMPError(f"{name}: {type(e).__name__}: {e}") from None
        if name == "quit" and self.on_quit is not None:
            loop.call_later(0.05, self.on_quit)
        return {} if result is None else result

    # -- events ---------------------------------------------------------------------------------------
    def emit(self, event: str, data: dict | None = None) -> None:
        """Send an event to every negotiated client (from any thread)."""
        loop = self._loop
        if loop is None:
            return
        t = time.time()
        msg = {"event": event, "data": data or {},
               "timestamp": {"seconds": int(t), "microseconds": int((t % 1) * 1e6)}}

        def send_all() -> None:
            for c in list(self.clients):
                if c.negotiated:
                    asyncio.ensure_future(self._safe_send(c, msg))

        loop.call_soon_threadsafe(send_all)

    async def _safe_send(self, c: _Client, msg: dict) -> None:
        try:
            await c.send(msg)
        except (ConnectionError, OSError):
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
                c.writer.close()
            loop.run_until_complete(asyncio.sleep(0))
            loop.close()

    async def _open(self) -> None:
        if self.path is not None:
            try:
                if stat.S_ISSOCK(os.stat(self.path).st_mode):
                    os.unlink(self.path)
            except FileNotFoundError:
                pass
            old = os.umask(0o177)
            try:
                srv = await asyncio.start_unix_server(self._serve, path=self.path)
            finally:
                os.umask(old)
            os.chmod(self.path, 0o600)
            self._servers.append(srv)
        if self.tcp is not None:
            srv = await asyncio.start_server(self._serve, host=self.tcp[0], port=self.tcp[1],
                                             family=socket.AF_INET6 if ":" in self.tcp[0] else socket.AF_INET)
            self.tcp_port = srv.sockets[0].getsockname()[1]
            self._servers.append(srv)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        c = _Client(self, reader, writer)
        self.clients.add(c)
        try:
            await c.run()
        except (ConnectionError, OSError, asyncio.IncompleteReadError):
            pass
        except Exception:
            log.exception("QMP client %d", c.id)
        finally:
            self.clients.discard(c)
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
        if self.path is not None:
            try:
                os.unlink(self.path)
            except OSError:
                pass
