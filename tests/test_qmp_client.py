"""kickcall.monitor.client.QMPClient, the one QMP client, against a scripted monitor: what its users
(``kickcall diagnose``, ``kickcall shell``, the test peers' ``qmp()`` and ``qmp_quit``) rely on beyond
what the real-peer tests show.

``execute("quit", allow_eof=True)``: QEMU and qemu-storage-daemon may exit on ``quit`` before their
reply reaches the client, closing the connection (EOF) or, when the request is still unread in the
monitor's socket, resetting it (ECONNRESET).  With *allow_eof* both count as delivered (None);
without it both raise QMPConnectionError of kind CLOSED.
"""

from __future__ import annotations

import json
import os
import select
import socket
import threading

import pytest

from kickcall.monitor.client import ConnectionProblem, QMPClient, QMPConnectionError
from kickcall.peers.qemu import qmp_quit

GREETING = {"QMP": {"version": {"qemu": {"micro": 0, "minor": 2, "major": 7}, "package": ""}, "capabilities": []}}


class QuittingMonitor:
    """A one-client QMP monitor that answers qmp_capabilities, then meets the next command by
    going away without a reply: ``close`` reads it first (the client sees EOF), ``reset`` closes
    with it unread (Linux then resets the client's connection: ECONNRESET)."""

    def __init__(self, path: str, how: str) -> None:
        self.how = how
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(path)
        self.listener.listen(1)
        self.seen: list[bytes] = []
        self.thread = threading.Thread(target=self._serve, name="fake-qmp", daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        c, _ = self.listener.accept()
        with c:
            c.settimeout(60)
            c.sendall(json.dumps(GREETING).encode() + b"\r\n")
            buf = b""
            while b"\n" not in buf:
                buf += c.recv(4096)
            line = buf.split(b"\n", 1)[0]
            self.seen.append(line)
            c.sendall(json.dumps({"return": {}, "id": json.loads(line)["id"]}).encode() + b"\r\n")
            select.select([c], [], [], 60)  # the next command has arrived
            if self.how == "close":
                self.seen.append(c.recv(4096))
            # close (``with``): unread data makes the kernel reset the peer

    def close(self) -> None:
        self.listener.close()
        self.thread.join(timeout=60)


@pytest.mark.parametrize("how", ["close", "reset"])
@pytest.mark.parametrize("allow_eof", [True, False])
def test_quit_answered_by_a_closed_connection(workdir, how, allow_eof):
    path = os.path.join(workdir, "m.qmp")
    mon = QuittingMonitor(path, how)
    try:
        with QMPClient(path, timeout=30).connect() as c:
            if allow_eof:
                assert c.execute("quit", allow_eof=True) is None
            else:
                with pytest.raises(QMPConnectionError) as ei:
                    c.execute("quit")
                assert ei.value.kind is ConnectionProblem.CLOSED
    finally:
        mon.close()
    assert json.loads(mon.seen[0])["execute"] == "qmp_capabilities"
    if how == "close":
        assert json.loads(mon.seen[1])["execute"] == "quit"


def test_allow_eof_does_not_hide_a_silent_monitor(workdir):
    """allow_eof forgives only a closed connection: a monitor that does not answer in time is still
    NO_REPLY."""
    path = os.path.join(workdir, "m.qmp")
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(path)
    srv.listen(1)
    try:
        conn_ready = threading.Event()

        def greet_then_mute() -> None:
            s, _ = srv.accept()
            with s:
                s.sendall(json.dumps(GREETING).encode() + b"\r\n")
                buf = b""
                while b"\n" not in buf:
                    buf += s.recv(4096)
                rid = json.loads(buf.split(b"\n", 1)[0])["id"]
                s.sendall(json.dumps({"return": {}, "id": rid}).encode() + b"\r\n")
                conn_ready.wait(60)

        t = threading.Thread(target=greet_then_mute, name="mute-qmp", daemon=True)
        t.start()
        with QMPClient(path, timeout=0.5).connect() as client:
            with pytest.raises(QMPConnectionError) as ei:
                client.execute("quit", allow_eof=True)
            assert ei.value.kind is ConnectionProblem.NO_REPLY
        conn_ready.set()
        t.join(timeout=60)
    finally:
        srv.close()


@pytest.mark.parametrize("how", ["close", "reset"])
def test_qmp_quit_counts_a_closed_connection_as_delivered(workdir, how):
    path = os.path.join(workdir, "m.qmp")
    mon = QuittingMonitor(path, how)
    try:
        assert qmp_quit(path, timeout=30) is True
    finally:
        mon.close()


def test_qmp_quit_false_when_nothing_listens(workdir):
    assert qmp_quit(os.path.join(workdir, "none.qmp"), timeout=1) is False
