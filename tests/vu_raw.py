"""A raw vhost-user front-end for tests: connect, send a message (with fds), read one back.

Hostile-front-end tests build their messages by hand, so they talk to the back-end through these
three functions rather than through kickcall's own front-end (which would refuse to send them)."""

from __future__ import annotations

import socket
from typing import Protocol

from helpers import wait_for
from kickcall.vhost_user.protocol import HDR, VERSION, Message

CEILING = 30.0  # seconds any single expected event may take


class _Backend(Protocol):
    connections: int


class Served(Protocol):
    """What a test's served back-end offers: the back-end and its socket path."""

    be: _Backend
    sock: str


def raw_connect(sv: Served) -> socket.socket:
    """A raw connection, once the back-end has accepted it."""
    n = sv.be.connections
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(CEILING)
    s.connect(sv.sock)
    wait_for(lambda: sv.be.connections == n + 1, CEILING, "the back-end to accept the connection")
    return s


def send(s: socket.socket, req: int, payload: bytes = b"", fds: list[int] | tuple[int, ...] = (),
         flags: int = VERSION) -> None:
    data = HDR.pack(req, flags, len(payload)) + payload
    if fds:
        socket.send_fds(s, [data], list(fds))
    else:
        s.sendall(data)


def read_message(s: socket.socket) -> Message | None:
    """One whole message (blocking, with the socket's timeout), or None when the peer closed
    between messages; a close in the middle of one fails the test."""
    hdr = b""
    while len(hdr) < HDR.size:
        try:
            chunk = s.recv(HDR.size - len(hdr))
        except ConnectionResetError:
            return None
        if not chunk:
            assert not hdr, "closed in the middle of a header"
            return None
        hdr += chunk
    req, flags, size = HDR.unpack(hdr)
    payload = b""
    while len(payload) < size:
        chunk = s.recv(size - len(payload))
        assert chunk, "closed in the middle of a payload"
        payload += chunk
    return Message(req, flags, payload)
