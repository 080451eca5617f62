"""A QMP server in QEMU's wire format (docs/interop/qmp-spec.rst), replying as QEMU 7.2 does.

* greeting ``{"QMP": {"version": ..., "capabilities": []}}`` (no ``oob``: exec-oob is not
  implemented), then only ``qmp_capabilities`` until negotiation is done, with QEMU's error texts;
* replies ``{"return": ...}`` / ``{"error": {"class", "desc"}}`` echoing any ``id`` of any JSON type;
* events ``{"timestamp": {"seconds", "microseconds"}, "event", "data"}`` to negotiated clients, with
  no ``data`` member for an event that has none (STOP, RESUME), as QEMU;
* output printed as QEMU prints it (``kickcall.monitor.encoder``); the envelope keys come in the
  order QEMU prints them ("return" before "id", "id" before "error"), fixed here;
* input in QEMU's JSON dialect, read by ``kickcall.monitor.json_stream.JSONStreamParser``;
* kickcall's own bounds where QEMU has none or a larger one: a message past the parser's size
  bounds gets QEMU's limit error and its client is disconnected; a client that sends
  ``MAX_BAD_INPUTS`` malformed inputs in a row, or lets more than ``MAX_BACKLOG`` bytes of events
  pile up unread, is disconnected; every other client is served throughout;
* a Unix socket created with mode 0600 (a stale socket is replaced, a live server's never), TCP
  only on a loopback IP address and only when asked.

Commands come from a ``CommandRegistry`` (``kickcall.monitor.schema``), whose arguments are
checked before the handler runs.

Handlers run one at a time across every client of a server, as QEMU runs QMP commands one at a
time under its big lock: a handler that reads the state, changes it and emits the event for the
change (``stop``, ``cont``, ``quit``) is one step that no other command can split, so two clients
sending ``stop`` together get one STOP.  Only execution is serialised: every client's input is
read, parsed and checked (and malformed input answered) while a handler runs.  The handlers
themselves run on a thread of their own, never on the server's event loop, so a slow one leaves
the server reading (``SERIALIZE_DISPATCH`` / ``serialize=`` switch this off, for tests only).

Threads (OS names, as ``/proc/<pid>/task/*/comm`` shows them): the server's asyncio loop thread
is ``kc-qmp``, the executor workers that run the handlers ``kc-qmp-exec``.

``quit`` is QEMU's: its handler (or any handler, such as ``human-monitor-command "quit"``) calls
``request_quit``; the reply of the command that asked is sent, then the quit actions run (the
owner winds the process down; its exit closes the connections).  From the moment quit is
requested no other command is executed: a request that was waiting, even a second ``quit``, gets
no reply (QEMU exits before it reaches it), and a client that connects meanwhile is closed before
the greeting.

Which problem is reported when a request has several (a deliberate difference from QEMU): a
request's members are checked in the order the client sent them, then a missing ``execute``; a
command's arguments as ``CommandRegistry.check_args`` orders them.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import ipaddress
import itertools
import logging
import socket
import threading
import time
from typing import Any, Callable

from ..threads import named_pool, named_thread
from .. import __version__
from ..ownership import SocketClaim
from .encoder import dumps
from .json_stream import MAX_MESSAGE, MAX_TOKENS, JSONStreamParser
from .schema import CommandRegistry, QMPError, check_capabilities_args
from ..faults import PROCESS

__all__ = ["QMPServer", "SERIALIZE_DISPATCH", "MAX_BAD_INPUTS", "MAX_BACKLOG"]

log = logging.getLogger("kickcall.monitor")

MAX_BAD_INPUTS = 4096  # malformed JSON inputs in a row before the client is disconnected
MAX_BACKLOG = 8 << 20  # unsent bytes (events) a client may leave unread before it is disconnected

# Handlers run one at a time across all clients of a server (QEMU: under the big lock).  The
# default for ``QMPServer(serialize=None)``; False only in tests that show what it prevents.
SERIALIZE_DISPATCH = PROCESS.switch("serialize-qmp-dispatch", "off: monitor handlers of different clients run "
                                    "at once, so a stop and a cont can interleave their reads and writes of the run state")


class _Quitting(Exception):
    """The process is quitting: the request is not executed and gets no reply (as in QEMU, which
    exits before it reaches it)."""


class _Client:
    def __init__(self, server: "QMPServer", reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.server = server
        self.reader = reader
        self.writer = writer
        self.negotiated = False
        self.parser = JSONStreamParser(server.max_message, server.max_tokens)
        self.bad = 0
        self.id = server.next_client_id()
        self.closing = False
        self.quit_after_reply = False

    async def send(self, obj: dict) -> None:
        await self.send_raw((dumps(obj) + "\r\n").encode())

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
                data = dumps(reply)
            except (TypeError, ValueError) as e:
                log.error("QMP command %s returned what JSON cannot carry: %s", obj["execute"], e)
                raise QMPError(f"{obj['execute']}: the reply cannot be encoded: {e}") from None
        except QMPError as e:
            # QEMU's key order: "id" before "error" (and after "return")
            reply = {"id": obj["id"]} if rid_present else {}
            reply["error"] = {"class": e.cls, "desc": e.desc}
            data = dumps(reply)
        try:
            await self.send_raw((data + "\r\n").encode())
        finally:
            if self.quit_after_reply:  # QEMU replies to quit, then exits
                self.quit_after_reply = False
                self.server.run_quit_actions()


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
        self.serialize = SERIALIZE_DISPATCH.fix_on if serialize is None else serialize
        # held from a handler's start to its return (not to its reply), in the order requests came
        self._dispatch_lock = asyncio.Lock()
        self.commands_waiting = 0  # checked requests waiting for the handler running now to return
        # handlers run here, never on the event loop; one at a time when serialised
        self._executor = named_pool("kc-qmp-exec", 8)
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

    def next_client_id(self) -> int:
        """A new client's id (1, 2, ...: QEMU numbers its monitor connections the same way).  On the
        server's event loop thread (``kc-qmp``)."""
        return next(self._ids)

    def greeting(self) -> dict:
        v = self.registry.commands["query-version"].handler()
        return {"QMP": {"version": v, "capabilities": []}}

    async def dispatch(self, client: _Client, name: str, args: dict) -> Any:
        if name == "qmp_capabilities":
            enable = check_capabilities_args(args)
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

    def run_quit_actions(self) -> None:
        """Once the reply of the command that requested quit is on its way (no timer): the quit
        actions, then on_quit.  Connections stay open until the owner stops the server (the process
        exits), so a client still sees every event sent meanwhile; requests get no reply.  On the
        server's event loop thread (``kc-qmp``), by the client that sent that reply."""
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
        raw = (dumps(msg) + "\r\n").encode()

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
        self._thread = named_thread(self._run, "kc-qmp")
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
