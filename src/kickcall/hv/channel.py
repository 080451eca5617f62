"""The hypervisor channel: one SOCK_SEQPACKET socket pair, requests with synchronous replies.

Both ends run a receiver thread.  ``request()`` sends and blocks until the matching reply (or
until the peer goes away: ``ChannelClosed``).  Incoming requests are handed to ``on_request``
on the receiver thread, which must not block on the channel itself; it answers with ``reply()``
now or later from any thread.  Messages are atomic (SEQPACKET), so any thread may send.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
from typing import Callable

from .abi import HDR, KIND_MSG, KIND_REPLY, KIND_REQ, ChannelClosed
from ..threads import named_thread

__all__ = ["Channel", "socketpair"]

log = logging.getLogger("kickcall.hv.channel")

MAX_MSG = 1 << 20
MAX_FDS = 64


def socketpair() -> tuple[socket.socket, socket.socket]:
    """The channel's socket pair (close-on-exec; pass one end to the guest with pass_fds)."""
    return socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)


class _Waiter:
    __slots__ = ("lock", "payload", "fds", "code", "error")

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.lock.acquire()
        self.payload = b""
        self.fds: list[int] = []
        self.code = 0
        self.error: BaseException | None = None


OnRequest = Callable[[int, int, int, bytes, list[int]], None]  # code, vcpu, seq, payload, fds
OnMessage = Callable[[int, int, bytes, list[int]], None]  # code, vcpu, payload, fds


class Channel:
    """One end of the hypervisor channel."""

    def __init__(self, sock: socket.socket, name: str, on_request: OnRequest | None = None,
                 on_message: OnMessage | None = None,
                 on_close: Callable[[], None] | None = None) -> None:
        self.sock = sock
        self.name = name
        self.on_request = on_request
        self.on_message = on_message
        self.on_close = on_close
        self._mu = threading.Lock()
        self._seq = 0
        self._waiters: dict[int, _Waiter] = {}
        self._closed = False
        self._thread: threading.Thread | None = None
        self.requests_sent = 0
        self.requests_received = 0
        self.protocol_errors = 0

    def start(self) -> "Channel":
        self._thread = named_thread(self._rx, "kc-hvchan")
        self._thread.start()
        return self

    @property
    def closed(self) -> bool:
        return self._closed

    def peer_pid(self) -> int:
        creds = self.sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12)
        return int.from_bytes(creds[:4], "little", signed=True)

    # -- sending ----------------------------------------------------------------------------------
    def _send(self, data: bytes, fds: list[int] | tuple[int, ...]) -> None:
        if self._closed:
            raise ChannelClosed(f"{self.name}: channel closed")
        try:
            if fds:
                socket.send_fds(self.sock, [data], list(fds))
            else:
                self.sock.send(data)
        except OSError as e:
            raise ChannelClosed(f"{self.name}: send failed: {e}") from e

    def request(self, code: int, payload: bytes = b"", fds: list[int] | tuple[int, ...] = (),
                vcpu: int = 0, timeout: float | None = None) -> tuple[bytes, list[int]]:
        """Send a request and wait for its reply; returns (payload, fds) of the reply."""
        w = _Waiter()
        with self._mu:
            if self._closed:
                raise ChannelClosed(f"{self.name}: channel closed")
            self._seq += 1
            seq = self._seq
            self._waiters[seq] = w
        try:
            self._send(HDR.pack(KIND_REQ, code, vcpu, seq) + payload, fds)
            self.requests_sent += 1
            if not w.lock.acquire(timeout=-1 if timeout is None else timeout):
                raise TimeoutError(f"{self.name}: no reply to request {code} within {timeout}s")
        finally:
            with self._mu:
                self._waiters.pop(seq, None)
        if w.error is not None:
            raise w.error
        return w.payload, w.fds

    def reply(self, seq: int, code: int, payload: bytes = b"", fds: list[int] | tuple[int, ...] = (),
              vcpu: int = 0) -> None:
        self._send(HDR.pack(KIND_REPLY, code, vcpu, seq) + payload, fds)

    def send(self, code: int, payload: bytes = b"", fds: list[int] | tuple[int, ...] = (),
             vcpu: int = 0) -> None:
        self._send(HDR.pack(KIND_MSG, code, vcpu, 0) + payload, fds)

    # -- receiving ---------------------------------------------------------------------------------
    def _rx(self) -> None:
        try:
            while True:
                try:
                    data, fds, flags, _ = socket.recv_fds(self.sock, MAX_MSG, MAX_FDS)
                except OSError as e:
                    if not self._closed:
                        log.debug("%s: receive failed: %s", self.name, e)
                    return
                if not data:
                    return
                if flags & (socket.MSG_TRUNC | socket.MSG_CTRUNC) or len(data) < HDR.size:
                    self.protocol_errors += 1
                    log.error("%s: malformed message (%d bytes, flags %#x); dropped", self.name,
                              len(data), flags)
                    for fd in fds:
                        os.close(fd)
                    continue
                kind, code, vcpu, seq = HDR.unpack_from(data)
                payload = data[HDR.size:]
                try:
                    if kind == KIND_REPLY:
                        with self._mu:
                            w = self._waiters.get(seq)
                        if w is None:
                            for fd in fds:
                                os.close(fd)
                            continue
                        w.payload, w.fds, w.code = payload, fds, code
                        w.lock.release()
                    elif kind == KIND_REQ:
                        self.requests_received += 1
                        if self.on_request is None:
                            raise RuntimeError("no request handler")
                        self.on_request(code, vcpu, seq, payload, fds)
                    elif kind == KIND_MSG:
                        if self.on_message is not None:
                            self.on_message(code, vcpu, payload, fds)
                        else:
                            for fd in fds:
                                os.close(fd)
                    else:
                        self.protocol_errors += 1
                        log.error("%s: unknown message kind %d", self.name, kind)
                        for fd in fds:
                            os.close(fd)
                except Exception:
                    self.protocol_errors += 1
                    log.exception("%s: handling message kind=%d code=%d failed", self.name, kind, code)
        finally:
            self._shutdown()

    def _shutdown(self) -> None:
        with self._mu:
            already = self._closed
            self._closed = True
            waiters = list(self._waiters.values())
            self._waiters.clear()
        for w in waiters:
            w.error = ChannelClosed(f"{self.name}: peer went away")
            try:
                w.lock.release()
            except RuntimeError:
                pass
        if not already and self.on_close is not None:
            try:
                self.on_close()
            except Exception:
                log.exception("%s: on_close failed", self.name)

    def close(self) -> None:
        """Close our end; the receiver thread ends and waiters get ChannelClosed."""
        with self._mu:
            self._closed = True
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        t = self._thread
        if t is not None and t is not threading.current_thread():
            t.join(10)
        self._shutdown()
        self.sock.close()
