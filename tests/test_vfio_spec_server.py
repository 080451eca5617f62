"""``kickcall vfio-user-server`` driven by the specification-only client (tests/vfio_spec/client.py,
written from docs/interop/vfio-user.rst without kickcall's code).

* VERSION: the reply keeps the major, does not raise the minor, carries only capabilities the
  client proposed, and sets up a twin socket only when asked;
* a well-framed message with a bad payload gets an error reply (the header alone, with the
  errno) and the next command on the same connection succeeds;
* a framing error closes the connection and the next client is served;
* a fuzzing run of well- and badly-framed messages: the server survives it and serves the next
  client (its crash reports would fail the test, tests/conftest.py);
* DMA_WRITE's reply is accepted in both readings (the specification's 12 bytes, libvfio-user's
  16), for a window mapped without an fd;
* SET_IRQS over the wire: the vfio-user rules (fds versus count, fds with DATA_NONE/BOOL), a few
  of vfio-pci's rules (the whole table is tests/test_vfio_host.py's), loopback triggers.
"""

from __future__ import annotations

import errno
import os
import socket
import struct

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from helpers import wait_for
from vfio_env import host_view, vfio_server
from vfio_spec import client as S

TRIGGER_EFD = S.VFIO_IRQ_SET_DATA_EVENTFD | S.VFIO_IRQ_SET_ACTION_TRIGGER
TRIGGER_NONE = S.VFIO_IRQ_SET_DATA_NONE | S.VFIO_IRQ_SET_ACTION_TRIGGER
TRIGGER_BOOL = S.VFIO_IRQ_SET_DATA_BOOL | S.VFIO_IRQ_SET_ACTION_TRIGGER


@pytest.fixture(scope="module")
def server():
    import tempfile
    import shutil

    d = tempfile.mkdtemp(prefix="kc")
    try:
        with vfio_server(d, "--vectors", "8") as (p, sock, qmp):
            yield p, sock, qmp
    finally:
        shutil.rmtree(d, ignore_errors=True)


def _client(sock: str, **kw) -> S.Client:
    c = S.Client.connect(sock)
    r = c.version(**kw)
    assert r.errno == 0
    return c


def _alive(sock: str) -> None:
    """A new client negotiates and gets the device's info: the server serves the next client."""
    wait_for(lambda: not _busy(sock), 30, "the previous client to be gone")
    with _client(sock) as c:
        info = S.DEVICE_INFO.unpack(c.device_get_info().ok())
        assert info[3] == 5  # num_irqs
        assert c.violations == []


def _busy(sock: str) -> bool:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.settimeout(5)
        s.connect(sock)
        s.sendall(S.pack_header(1, S.VFIO_USER_VERSION, 20) + S.VERSION.pack(0, 1))
        return s.recv(16) == b""  # a busy server closes a second connection at once
    except OSError:
        return True
    finally:
        s.close()


def test_version_negotiation(server):
    _p, sock, _q = server
    with S.Client.connect(sock) as c:
        r = c.version(0, 7, {"max_msg_fds": 4})  # proposes minor 7 and a single capability
        assert r.errno == 0
        major, minor, obj, nul = S.parse_version(r.payload)
        assert (major, minor) == (0, 1) and nul  # minor lowered to the server's; the JSON NUL-terminated
        assert set(obj["capabilities"]) == {"max_msg_fds"}  # a subset of those proposed
        assert c.twin is None
    with S.Client.connect(sock) as c:
        c.version(twin_socket=True)
        assert c.twin is not None  # asked for, and set up
    with S.Client.connect(sock) as c:
        assert c.version(1, 0).errno == errno.ENOTSUP  # a major the server does not speak
        assert c.version().errno == 0  # ... the connection is still good for the next VERSION


def test_command_before_version(server):
    _p, sock, _q = server
    with S.Client.connect(sock) as c:
        assert c.device_get_info().errno == errno.EINVAL
        assert c.version().errno == 0
        assert c.device_get_info().errno == 0
        assert c.version().errno == errno.EINVAL  # VERSION once per connection


def _efd() -> int:
    return os.eventfd(0, os.EFD_NONBLOCK)


BAD = [  # (name, command, payload, number of eventfds to send, errno)
    ("dma-map-short", S.VFIO_USER_DMA_MAP, b"\0" * 8, 0, errno.EINVAL),
    ("dma-map-flags", S.VFIO_USER_DMA_MAP, S.DMA_MAP.pack(32, 0x80, 0, 0x1000, 0x1000), 0, errno.EINVAL),
    ("dma-map-size-0", S.VFIO_USER_DMA_MAP, S.DMA_MAP.pack(32, 3, 0, 0x1000, 0), 0, errno.EINVAL),
    ("dma-map-two-fds", S.VFIO_USER_DMA_MAP, S.DMA_MAP.pack(32, 3, 0, 0x1000, 0x1000), 2, errno.EINVAL),
    ("dma-unmap-none", S.VFIO_USER_DMA_UNMAP, S.DMA_UNMAP.pack(24, 0, 0x5000, 0x1000), 0, errno.EINVAL),
    ("dma-unmap-all-with-range", S.VFIO_USER_DMA_UNMAP, S.DMA_UNMAP.pack(24, 2, 0x5000, 0x1000), 0, errno.EINVAL),
    ("get-info-argsz", S.VFIO_USER_DEVICE_GET_INFO, S.DEVICE_INFO.pack(4, 0, 0, 0), 0, errno.EINVAL),
    ("get-info-empty", S.VFIO_USER_DEVICE_GET_INFO, b"", 0, errno.EINVAL),
    ("get-info-with-fd", S.VFIO_USER_DEVICE_GET_INFO, S.DEVICE_INFO.pack(16, 0, 0, 0), 1, errno.EINVAL),
    ("region-info-index", S.VFIO_USER_DEVICE_GET_REGION_INFO, S.REGION_INFO.pack(32, 0, 99, 0, 0, 0), 0, errno.EINVAL),
    ("irq-info-index", S.VFIO_USER_DEVICE_GET_IRQ_INFO, S.IRQ_INFO.pack(16, 0, 7, 0), 0, errno.EINVAL),
    ("irq-info-argsz", S.VFIO_USER_DEVICE_GET_IRQ_INFO, S.IRQ_INFO.pack(8, 0, 2, 0), 0, errno.EINVAL),
    ("set-irqs-short", S.VFIO_USER_DEVICE_SET_IRQS, b"\0" * 12, 0, errno.EINVAL),
    ("set-irqs-argsz", S.VFIO_USER_DEVICE_SET_IRQS, S.IRQ_SET.pack(64, TRIGGER_NONE, 2, 0, 0), 0, errno.EINVAL),
    ("set-irqs-two-actions", S.VFIO_USER_DEVICE_SET_IRQS,
     S.IRQ_SET.pack(20, S.VFIO_IRQ_SET_DATA_NONE | S.VFIO_IRQ_SET_ACTION_MASK | S.VFIO_IRQ_SET_ACTION_UNMASK, 0, 0, 1),
     0, errno.ENOTTY),
    ("set-irqs-two-data", S.VFIO_USER_DEVICE_SET_IRQS,
     S.IRQ_SET.pack(20, S.VFIO_IRQ_SET_DATA_NONE | S.VFIO_IRQ_SET_DATA_BOOL | S.VFIO_IRQ_SET_ACTION_TRIGGER, 2, 0, 1),
     0, errno.EINVAL),
    ("set-irqs-msix-mask", S.VFIO_USER_DEVICE_SET_IRQS,
     S.IRQ_SET.pack(20, S.VFIO_IRQ_SET_DATA_NONE | S.VFIO_IRQ_SET_ACTION_MASK, 2, 0, 1), 0, errno.ENOTTY),
    ("set-irqs-fds-with-none", S.VFIO_USER_DEVICE_SET_IRQS, S.IRQ_SET.pack(20, TRIGGER_NONE, 2, 0, 1), 1,
     errno.EINVAL),
    ("set-irqs-fds-not-count", S.VFIO_USER_DEVICE_SET_IRQS, S.IRQ_SET.pack(20, TRIGGER_EFD, 2, 0, 3), 2, errno.EINVAL),
    ("set-irqs-range", S.VFIO_USER_DEVICE_SET_IRQS, S.IRQ_SET.pack(20, TRIGGER_EFD, 2, 7, 2), 2, errno.EINVAL),
    ("set-irqs-overflow", S.VFIO_USER_DEVICE_SET_IRQS, S.IRQ_SET.pack(20, TRIGGER_EFD, 2, 0xFFFFFFFF, 2), 2,
     errno.EINVAL),
    ("set-irqs-err-count-2", S.VFIO_USER_DEVICE_SET_IRQS, S.IRQ_SET.pack(20, TRIGGER_EFD, 3, 0, 2), 2, errno.EINVAL),
    ("region-read-index", S.VFIO_USER_REGION_READ, S.REGION_ACCESS.pack(0, 12, 4), 0, errno.EINVAL),
    ("region-read-beyond", S.VFIO_USER_REGION_READ, S.REGION_ACCESS.pack(0x2000, 0, 4), 0, errno.EINVAL),
    ("region-read-too-big", S.VFIO_USER_REGION_READ, S.REGION_ACCESS.pack(0, 0, 2 << 20), 0, errno.EINVAL),
    ("region-read-with-data", S.VFIO_USER_REGION_READ, S.REGION_ACCESS.pack(0, 0, 4) + b"abcd", 0, errno.EINVAL),
    ("region-write-count", S.VFIO_USER_REGION_WRITE, S.REGION_ACCESS.pack(0, 0, 8) + b"abcd", 0, errno.EINVAL),
    ("dma-read-from-client", S.VFIO_USER_DMA_READ, S.DMA_ACCESS.pack(0x1000, 4), 0, errno.EINVAL),
    ("reset-with-payload", S.VFIO_USER_DEVICE_RESET, b"x", 0, errno.EINVAL),
    ("region-io-fds", S.VFIO_USER_DEVICE_GET_REGION_IO_FDS, S.IO_FDS.pack(16, 0, 0, 0), 0, errno.ENOTSUP),
    ("device-feature", S.VFIO_USER_DEVICE_FEATURE, struct.pack("<II", 8, 1 << 16 | 1), 0, errno.ENOTSUP),
    ("unknown-command", 99, b"", 0, errno.EINVAL),
    ("command-14", 14, b"", 0, errno.EINVAL),
]


@pytest.mark.parametrize("name, command, payload, nfds, err", BAD, ids=[b[0] for b in BAD])
def test_bad_payload_gets_an_error_reply_and_the_connection_carries_on(server, name, command, payload, nfds, err):
    _p, sock, _q = server
    fds = [_efd() for _ in range(nfds)]
    try:
        with _client(sock) as c:
            r = c.request(command, payload, fds)  # the spec client refuses an error reply with a payload
            assert r.errno == err, (name, r)
            assert r.payload == b""
            assert c.device_get_info().errno == 0  # the next command on the same connection
            assert c.violations == []
    finally:
        for fd in fds:
            os.close(fd)


def test_overlapping_dma_map_is_eexist(server):
    _p, sock, _q = server
    with _client(sock) as c:
        assert c.map_memory(0x10000, bytearray(0x2000)).errno == 0
        assert c.dma_map(0x11000, 0x1000).errno == errno.EEXIST  # "must be failed ... with EEXIST"
        r = c.dma_unmap(0x10000, 0x2000)
        assert r.errno == 0 and r.payload == S.DMA_UNMAP.pack(24, 0, 0x10000, 0x2000)  # the original entry


FRAMING = [
    ("size-below-header", S.pack_header(1, S.VFIO_USER_DEVICE_GET_INFO, 8)),
    ("oversized", S.pack_header(1, S.VFIO_USER_REGION_WRITE, 1 << 30)),
    ("bad-type", S.pack_header(1, S.VFIO_USER_DEVICE_GET_INFO, 16, 0x7)),
    ("cut-short", S.pack_header(1, S.VFIO_USER_DEVICE_GET_INFO, 32) + b"\0" * 4),
]


@pytest.mark.parametrize("name, data", FRAMING, ids=[f[0] for f in FRAMING])
def test_framing_error_closes_the_connection(server, name, data):
    _p, sock, qmp = server
    before = host_view(qmp)["server"]["stats"]["framing_errors"]
    c = _client(sock)
    try:
        c.send_raw(data)
        if name == "cut-short":
            c.sock.shutdown(socket.SHUT_WR)  # the message ends early: the connection closes in its middle
        assert c.read_message() is None  # the server closed the connection (no reply: nothing to reply to)
    finally:
        c.close()
    wait_for(lambda: host_view(qmp)["server"]["stats"]["framing_errors"] == before + 1, 30, "the framing error")
    _alive(sock)


_commands = st.sampled_from([1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 99, 0xFFFF])
_payloads = st.one_of(st.binary(max_size=64),
                      st.builds(lambda f, i, s, n, tail: S.IRQ_SET.pack(20 + len(tail), f, i, s, n) + tail,
                                st.integers(0, 63), st.integers(0, 6), st.integers(0, 9), st.integers(0, 9),
                                st.binary(max_size=10)),
                      st.builds(lambda o, r, n: S.REGION_ACCESS.pack(o, r, n), st.integers(0, 0x3000),
                                st.integers(0, 9), st.integers(0, 16)))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(msgs=st.lists(st.tuples(_commands, _payloads, st.integers(0, 2), st.booleans()), min_size=1, max_size=6))
def test_fuzz_then_the_next_client_is_served(server, msgs):
    _p, sock, _q = server
    c = _client(sock)
    try:
        for cmd, payload, nfds, frame_ok in msgs:
            fds = [_efd() for _ in range(nfds)]
            try:
                if frame_ok:
                    mid = c.send_message(cmd, payload, fds)
                    try:
                        r = c.wait_reply(mid, cmd)
                    except S.SpecViolation as e:
                        assert e.kind == "closed", e
                        break
                    assert r.errno >= 0 or r.errno == S.ERROR_WITHOUT_ERRNO
                else:  # a size below the header's: a framing error; the server closes (maybe at once)
                    try:
                        c.send_raw(S.pack_header(7, cmd, 15) + payload, fds)
                    except (BrokenPipeError, ConnectionResetError):
                        pass
                    assert c.read_message() is None
                    break
            finally:
                for fd in fds:
                    os.close(fd)
    finally:
        c.close()
    _alive(sock)


@pytest.mark.parametrize("reading", ["spec", "libvfio-user"])
def test_dma_write_reply_in_both_readings(server, reading):
    _p, sock, _q = server
    with S.Client.connect(sock, dma_write_reply=reading) as c:
        c.version()
        mem = bytearray(0x4000)
        assert c.map_memory(0x40000, mem).errno == 0
        c.region_write(7, 4, struct.pack("<H", 0x6)).ok()  # memory decode and bus master
        q = 0x100
        for off, v in ((0x00, 0x40000), (0x04, 0), (0x08, 64), (0x0C, 0), (0x10, 1), (0x1C, 10)):
            c.region_write(0, q + off, struct.pack("<I", v)).ok()
        def seq(i: int) -> int:
            return int(struct.unpack_from("<Q", mem, 16 * i)[0])

        # a queue's seq runs on across ENABLE (only a function reset restarts it)
        c.serve_until(lambda: seq(0) != 0 and seq(9) == seq(0) + 9)
        assert [seq(i) for i in range(10)] == list(range(seq(0), seq(0) + 10))
        assert c.violations == [] and any(cmd == S.VFIO_USER_DMA_WRITE for cmd, _a, _n in c.server_commands)
        c.region_write(0, q + 0x10, struct.pack("<I", 0)).ok()
        c.dma_unmap(0x40000, 0x4000).ok()


def test_msix_loopback_triggers(server):
    _p, sock, _q = server
    fds = [_efd() for _ in range(3)]
    try:
        with _client(sock) as c:
            assert c.device_set_irqs(2, TRIGGER_EFD, 0, 3, fds=fds).errno == 0
            assert c.device_set_irqs(2, TRIGGER_NONE, 0, 3).errno == 0  # loopback: every vector signalled
            assert [os.eventfd_read(fd) for fd in fds] == [1, 1, 1]
            assert c.device_set_irqs(2, TRIGGER_BOOL, 0, 3, data=bytes([1, 0, 1])).errno == 0
            assert os.eventfd_read(fds[0]) == 1 and os.eventfd_read(fds[2]) == 1
            with pytest.raises(BlockingIOError):
                os.eventfd_read(fds[1])
            assert c.device_set_irqs(2, TRIGGER_BOOL, 0, 3, data=b"\1").errno == errno.EINVAL  # too short
            assert c.device_set_irqs(2, TRIGGER_NONE, 0, 0).errno == 0  # count 0, DATA_NONE: disabled
            assert c.device_set_irqs(2, TRIGGER_NONE, 0, 3).errno == errno.EINVAL  # nothing to loop back
    finally:
        for fd in fds:
            os.close(fd)
