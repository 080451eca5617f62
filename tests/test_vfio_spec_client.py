"""Self-tests of the specification-only vfio-user test client (tests/vfio_spec), with no server:
the header, the layout tables against the sizes the specification states, the client's own struct
formats against those tables, SCM_RIGHTS through a socketpair, and a fake server thread that
answers VERSION (and a DMA round trip) so negotiation and reply checking are exercised, including
replies the client must refuse."""

from __future__ import annotations

import errno
import json
import os
import socket
import struct
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import pytest

from vfio_spec import client as vc
from vfio_spec import tables
from vfio_spec.client import Client, Message, SpecViolation

# -- the header


@pytest.mark.parametrize("fields", [
    (0, 0, 16, 0, 0),
    (1, vc.VFIO_USER_VERSION, 16 + 4, vc.TYPE_COMMAND, 0),
    (0xFFFF, vc.VFIO_USER_DEVICE_RESET, 16, vc.TYPE_REPLY | vc.FLAG_ERROR, errno.EINVAL),
    (0x1234, 0xFFFF, 0xFFFFFFFF, 0xFFFFFFFF, 0xFFFFFFFF),
])
def test_header_round_trip(fields: tuple[int, int, int, int, int]) -> None:
    msg_id, command, size, flags, error = fields
    raw = vc.pack_header(msg_id, command, size, flags, error)
    assert len(raw) == 16
    assert vc.unpack_header(raw) == fields
    assert raw == tables.encode("header", message_id=msg_id, command=command, message_size=size,
                                flags=flags, error=error)
    assert tables.decode("header", raw) == dict(message_id=msg_id, command=command, message_size=size,
                                                flags=flags, error=error)


def test_header_flag_bits_are_the_tables() -> None:
    """§Header: bits 0-3 Type (0 command, 1 reply), bit 4 No_reply, bit 5 Error."""
    assert (vc.TYPE_MASK, vc.TYPE_COMMAND, vc.TYPE_REPLY) == (0b1111, 0, 1)
    assert (vc.FLAG_NO_REPLY, vc.FLAG_ERROR) == (0x10, 0x20)
    raw = vc.pack_header(7, 8, 16, vc.TYPE_REPLY | vc.FLAG_ERROR, 22)
    assert raw == bytes([7, 0, 8, 0, 16, 0, 0, 0, 0x21, 0, 0, 0, 22, 0, 0, 0])


# -- the tables


@pytest.mark.parametrize("name", sorted(tables.LAYOUTS))
def test_table_is_contiguous_and_has_the_stated_size(name: str) -> None:
    layout = tables.LAYOUTS[name]
    at = 0
    for i, (field, offset, size) in enumerate(layout):
        assert offset == at, f"{name}.{field} at {offset}, the previous field ends at {at}"
        if size is None:
            assert i == len(layout) - 1, f"{name}.{field} is variable but not last"
        else:
            assert size in (1, 2, 4, 8), f"{name}.{field} has size {size}"
            at += size
    assert len({f for f, _, _ in layout}) == len(layout), f"{name} repeats a field name"
    stated, source = tables.STATED_SIZES[name]
    assert at == stated == tables.fixed_size(name), f"{name}: the table ends at {at}, {source} says {stated}"


def test_every_table_has_a_stated_size() -> None:
    assert set(tables.STATED_SIZES) == set(tables.LAYOUTS)


def test_every_command_has_a_request_and_a_reply_table() -> None:
    # the 13 commands this client speaks; REGION_WRITE_MULTI, DEVICE_FEATURE and the migration
    # commands (15-18) are only named, for a server's "not supported" answer to be checked
    names = [n for n in dir(vc) if n.startswith("VFIO_USER_") and getattr(vc, n) <= 13]
    assert len(names) == 13
    for n in names:
        assert f"{n}.request" in tables.LAYOUTS and f"{n}.reply" in tables.LAYOUTS, n


def _distinct(layout: tuple[tables.Field, ...]) -> dict[str, int]:
    """A value per fixed field, each byte different, so a swapped or shifted field shows."""
    out, b = {}, 1
    for name, _, size in layout:
        if size is not None:
            out[name] = int.from_bytes(bytes(range(b, b + size)), "little")
            b += size
    return out


# (the client's struct, the table it must match)
CLIENT_STRUCTS = [
    (vc.HEADER, "header"),
    (vc.VERSION, "VFIO_USER_VERSION.request"),
    (vc.DMA_MAP, "VFIO_USER_DMA_MAP.request"),
    (vc.DMA_UNMAP, "VFIO_USER_DMA_UNMAP.request"),
    (vc.DMA_UNMAP, "VFIO_USER_DMA_UNMAP.reply"),
    (vc.DEVICE_INFO, "VFIO_USER_DEVICE_GET_INFO.request"),
    (vc.DEVICE_INFO, "vfio_device_info"),
    (vc.REGION_INFO, "VFIO_USER_DEVICE_GET_REGION_INFO.request"),
    (vc.REGION_INFO, "vfio_region_info"),
    (vc.IO_FDS, "VFIO_USER_DEVICE_GET_REGION_IO_FDS.request"),
    (vc.IRQ_INFO, "VFIO_USER_DEVICE_GET_IRQ_INFO.request"),
    (vc.IRQ_INFO, "vfio_irq_info"),
    (vc.IRQ_SET, "VFIO_USER_DEVICE_SET_IRQS.request"),
    (vc.REGION_ACCESS, "VFIO_USER_REGION_READ.request"),
    (vc.REGION_ACCESS, "VFIO_USER_REGION_WRITE.reply"),
    (vc.DMA_ACCESS, "VFIO_USER_DMA_READ.request"),
    (vc.DMA_WRITE_REPLY["spec"], "VFIO_USER_DMA_WRITE.reply"),
    (vc.DMA_WRITE_REPLY["libvfio-user"], "VFIO_USER_DMA_WRITE.reply/libvfio-user"),
    (vc.CAP_HEADER, "vfio_info_cap_header"),
    (vc.SPARSE_AREA, "vfio_region_sparse_mmap_area"),
]


@pytest.mark.parametrize(("st", "name"), CLIENT_STRUCTS, ids=[n for _, n in CLIENT_STRUCTS])
def test_client_struct_matches_the_table(st: struct.Struct, name: str) -> None:
    """The client's struct formats and the tables are two transcriptions of the specification."""
    values = _distinct(tables.LAYOUTS[name])
    assert st.size == tables.fixed_size(name)
    assert st.pack(*values.values()) == tables.encode(name, **values)


def test_encode_fills_zeroes_and_appends_the_variable_field() -> None:
    raw = tables.encode("VFIO_USER_DEVICE_SET_IRQS.request", argsz=23, flags=0x22, count=3, data=b"\1\0\1")
    assert raw == struct.pack("<IIIII", 23, 0x22, 0, 0, 3) + b"\1\0\1"
    assert tables.decode("vfio_irq_set", raw)["data"] == b"\1\0\1"
    with pytest.raises(KeyError):
        tables.encode("vfio_irq_info", nonsense=1)
    with pytest.raises(ValueError):
        tables.decode("vfio_irq_info", b"\0" * 15)
    with pytest.raises(ValueError):
        tables.decode("vfio_irq_info", b"\0" * 17)


def test_region_info_with_sparse_mmap_parses() -> None:
    """A GET_REGION_INFO reply built from the tables: vfio_region_info, then at cap_offset 32 the
    sparse mmap capability (cap header, nr_areas, reserved, areas)."""
    areas = [(0x0, 0x1000), (0x3000, 0x1000)]
    cap = tables.encode("vfio_region_info_cap_sparse_mmap", id=vc.VFIO_REGION_INFO_CAP_SPARSE_MMAP, version=1,
                        next=0, nr_areas=2,
                        areas=b"".join(tables.encode("vfio_region_sparse_mmap_area", offset=o, size=s)
                                       for o, s in areas))
    flags = vc.VFIO_REGION_INFO_FLAG_READ | vc.VFIO_REGION_INFO_FLAG_MMAP | vc.VFIO_REGION_INFO_FLAG_CAPS
    payload = tables.encode("vfio_region_info", argsz=32 + len(cap), flags=flags, index=0, cap_offset=32,
                            size=0x4000, offset=0) + cap
    # the literal §"VFIO region info cap sparse mmap" table starts after the 8-byte cap header
    assert tables.decode("sparse_mmap_info", cap[8:8 + 24]) == dict(nr_areas=2, reserved=0, offset=0, size=0x1000)
    info = vc.parse_region_info(payload)
    assert (info.argsz, info.size, info.cap_offset) == (32 + len(cap), 0x4000, 32)
    assert [c[:2] for c in info.caps] == [(vc.VFIO_REGION_INFO_CAP_SPARSE_MMAP, 1)]
    assert info.sparse_areas == areas
    looped = payload[:32] + tables.encode("vfio_info_cap_header", id=9, version=1, next=32)
    with pytest.raises(SpecViolation) as e:
        vc.parse_region_info(looped)
    assert e.value.kind == "region-caps"


# -- SCM_RIGHTS


def test_eventfd_travels_as_scm_rights() -> None:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    efd = os.eventfd(0, os.EFD_NONBLOCK)
    with Client(a) as ca, Client(b) as cb:
        msg_id = ca.send_message(vc.VFIO_USER_DEVICE_SET_IRQS, tables.encode(
            "vfio_irq_set", argsz=20, flags=vc.VFIO_IRQ_SET_DATA_EVENTFD | vc.VFIO_IRQ_SET_ACTION_TRIGGER,
            index=vc.VFIO_PCI_MSIX_IRQ_INDEX, start=0, count=1), [efd])
        m = cb.read_message()
        assert m is not None and m.msg_id == msg_id and m.command == vc.VFIO_USER_DEVICE_SET_IRQS
        assert len(m.fds) == 1 and m.fds[0] != efd
        try:
            os.eventfd_write(m.fds[0], 5)  # the server's end signals ...
            assert os.eventfd_read(efd) == 5  # ... the client's end sees it
            os.eventfd_write(efd, 2)
            assert os.eventfd_read(m.fds[0]) == 2
        finally:
            os.close(m.fds[0])
            os.close(efd)


def test_read_message_refuses_a_size_below_the_header() -> None:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    with Client(a) as ca, Client(b) as cb:
        ca.send_raw(vc.pack_header(1, vc.VFIO_USER_DEVICE_RESET, 15))
        with pytest.raises(SpecViolation) as e:
            cb.read_message()
        assert e.value.kind == "framing"
        a.shutdown(socket.SHUT_WR)
        assert cb.read_message() is None  # clean close between messages


# -- a fake server thread on a socketpair


@contextmanager
def fake_server(handler: Callable[[Client], None], dma_write_reply: str = "spec") -> Iterator[Client]:
    """A Client on one end of a socketpair; ``handler`` runs in a thread with a Client on the
    other end (used only for read_message/send_message) playing the server."""
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    server = Client(b)
    failure: list[BaseException] = []

    def run() -> None:
        try:
            handler(server)
        except BaseException as e:  # noqa: B036 -- re-raised in the test's thread
            failure.append(e)
            b.shutdown(socket.SHUT_RDWR)  # the client sees a close now, not after its timeout

    t = threading.Thread(target=run, name="fake-vfio-user-server", daemon=True)
    t.start()
    c = Client(a, timeout=10.0, dma_write_reply=dma_write_reply)
    try:
        yield c
    finally:
        c.close()
        t.join(30)
        server.close()
        assert not t.is_alive(), "the fake server thread did not finish"
        if failure:  # the server side's failure is the cause of whatever the client then saw
            raise failure[0]


def reply_to_version(payload_of: Callable[[Message], bytes] | None = None, *, msg_id_delta: int = 0,
                     command: int = vc.VFIO_USER_VERSION, flags: int = vc.TYPE_REPLY, error: int = 0,
                     fds: list[int] | None = None) -> Callable[[Client], None]:
    """A server handler that reads one VERSION and answers it as told (default: echo the proposal
    with max_msg_fds 8, NUL-terminated)."""
    def handler(s: Client) -> None:
        m = s.read_message()
        assert m is not None and m.command == vc.VFIO_USER_VERSION and m.type == vc.TYPE_COMMAND
        major, minor, obj, nul = vc.parse_version(m.payload)
        assert nul and "capabilities" in obj
        payload = payload_of(m) if payload_of else vc.VERSION.pack(major, minor) + json.dumps(
            {"capabilities": {"max_msg_fds": 8}}).encode() + b"\0"
        s.send_message(command, payload, fds or [], msg_id=(m.msg_id + msg_id_delta) & 0xFFFF, flags=flags,
                       error=error)
        s.read_message()  # wait for the client to go away
    return handler


def test_version_negotiates() -> None:
    with fake_server(reply_to_version()) as c:
        r = c.version()
        assert r.errno == 0 and r.fds == []
        assert c.server_caps == {"max_msg_fds": 8} and c.max_msg_fds == 8
        assert c.max_data_xfer_size == vc.DEFAULT_MAX_DATA_XFER_SIZE  # the default when not given
        assert c.server_version_nul is True


def test_version_accepts_json_without_nul_and_no_json() -> None:
    def unterminated(m: Message) -> bytes:
        return m.payload[:4] + b'{"capabilities": {}}'
    with fake_server(reply_to_version(unterminated)) as c:
        assert c.version().errno == 0 and c.server_version_nul is False and c.max_msg_fds == 1
    with fake_server(reply_to_version(lambda m: m.payload[:4])) as c:
        assert c.version().errno == 0 and c.server_caps == {}


@pytest.mark.parametrize(("handler", "kind"), [
    (reply_to_version(msg_id_delta=1), "reply-id"),
    (reply_to_version(msg_id_delta=-1), "reply-id"),
    (reply_to_version(command=vc.VFIO_USER_DMA_MAP), "reply-command"),
    (reply_to_version(flags=0x2), "type"),
    (reply_to_version(flags=vc.TYPE_REPLY | vc.FLAG_ERROR, error=errno.EINVAL), "error-reply"),
    (reply_to_version(lambda m: vc.VERSION.pack(1, 1) + b"\0"), "version"),
    (reply_to_version(lambda m: vc.VERSION.pack(0, 2) + b"\0"), "version"),
    (reply_to_version(lambda m: m.payload[:4] + b'{"capabilities": {"pgsizes": 4096}}\0'), "version-caps"),
    (reply_to_version(lambda m: m.payload[:4] + b"{not json\0"), "version-json"),
], ids=["id+1", "id-1", "command", "type", "error-with-payload", "major", "minor", "caps", "json"])
def test_a_bad_version_reply_is_refused(handler: Callable[[Client], None], kind: str) -> None:
    with fake_server(handler) as c:
        with pytest.raises(SpecViolation) as e:
            c.version()
        assert e.value.kind == kind


@pytest.mark.parametrize(("error", "expect"), [(errno.ENOTSUP, errno.ENOTSUP), (0, vc.ERROR_WITHOUT_ERRNO)])
def test_an_error_reply_gives_its_errno(error: int, expect: int) -> None:
    handler = reply_to_version(lambda m: b"", flags=vc.TYPE_REPLY | vc.FLAG_ERROR, error=error)
    with fake_server(handler) as c:
        r = c.version()
        assert (r.errno, r.payload) == (expect, b"")
        with pytest.raises(OSError):
            r.ok()


def test_a_close_instead_of_a_reply_is_reported() -> None:
    def close(s: Client) -> None:
        assert s.read_message() is not None
        s.sock.shutdown(socket.SHUT_RDWR)
    with fake_server(close) as c:
        with pytest.raises(SpecViolation) as e:
            c.version()
        assert e.value.kind == "closed"


# -- server -> client DMA while a request is pending, on the main socket or the twin socket


def dma_then_reply(twin: bool, fmt: struct.Struct) -> Callable[[Client], None]:
    """Negotiate (with a twin socket if asked), then on REGION_READ: DMA_WRITE b"kick" to 0x1004,
    DMA_READ 8 bytes at 0x1000, DMA_READ outside client memory, then reply to the REGION_READ."""
    def handler(s: Client) -> None:
        m = s.read_message()
        assert m is not None
        caps: dict[str, object] = {}
        fds: list[int] = []
        chan = s.sock
        if twin:
            assert json.loads(m.payload[4:-1])["capabilities"]["twin_socket"] == {"supported": True}
            mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
            caps["twin_socket"] = {"supported": True, "fd_index": 0}
            fds, chan = [theirs.fileno()], mine
        s.send_message(m.command, m.payload[:4] + json.dumps({"capabilities": caps}).encode() + b"\0", fds,
                       msg_id=m.msg_id, flags=vc.TYPE_REPLY)
        if twin:
            theirs.close()
        req = s.read_message()
        assert req is not None and req.command == vc.VFIO_USER_REGION_READ
        s.send_message(vc.VFIO_USER_DMA_WRITE, vc.DMA_ACCESS.pack(0x1004, 4) + b"kick", msg_id=req.msg_id,
                       sock=chan)  # ids belong to the sender: the same id as the pending request
        w = s.read_message(chan)
        assert w is not None and (w.msg_id, w.command, w.type) == (req.msg_id, vc.VFIO_USER_DMA_WRITE, vc.TYPE_REPLY)
        assert w.payload == fmt.pack(0x1004, 4)
        s.send_message(vc.VFIO_USER_DMA_READ, vc.DMA_ACCESS.pack(0x1000, 8), msg_id=77, sock=chan)
        r = s.read_message(chan)
        assert r is not None and r.payload == vc.DMA_ACCESS.pack(0x1000, 8) + b"\xaa" * 4 + b"kick"
        s.send_message(vc.VFIO_USER_DMA_READ, vc.DMA_ACCESS.pack(0x9000, 8), msg_id=78, sock=chan)
        r = s.read_message(chan)
        assert r is not None and r.flags == vc.TYPE_REPLY | vc.FLAG_ERROR and r.error == errno.EFAULT
        assert r.payload == b""
        s.send_message(req.command, req.payload + b"\x01\x02", msg_id=req.msg_id, flags=vc.TYPE_REPLY)
        s.read_message()
        if twin:
            mine.close()
    return handler


@pytest.mark.parametrize("twin", [False, True], ids=["main-socket", "twin-socket"])
@pytest.mark.parametrize("dma_write_reply", ["spec", "libvfio-user"])
def test_dma_is_served_while_a_request_is_pending(twin: bool, dma_write_reply: str) -> None:
    with fake_server(dma_then_reply(twin, vc.DMA_WRITE_REPLY[dma_write_reply]),
                     dma_write_reply=dma_write_reply) as c:
        assert c.version(twin_socket=twin).errno == 0
        assert (c.twin is not None) == twin
        mem = bytearray(b"\xaa" * 16)
        c.add_memory(0x1000, mem)
        r = c.region_read(vc.VFIO_PCI_BAR0_REGION_INDEX, 0x10, 2)
        assert r.errno == 0 and r.payload == vc.REGION_ACCESS.pack(0x10, 0, 2) + b"\x01\x02"
        assert mem == b"\xaa" * 4 + b"kick" + b"\xaa" * 8
        assert c.server_commands == [(vc.VFIO_USER_DMA_WRITE, 0x1004, 4), (vc.VFIO_USER_DMA_READ, 0x1000, 8),
                                     (vc.VFIO_USER_DMA_READ, 0x9000, 8)]
        assert c.violations == ["DMA 11 at 0x9000+8 outside client memory"]


def test_twin_socket_without_fd_index_is_refused() -> None:
    bad = reply_to_version(lambda m: m.payload[:4] + b'{"capabilities": {"twin_socket": {"supported": true}}}\0')
    with fake_server(bad) as c:
        with pytest.raises(SpecViolation) as e:
            c.version(twin_socket=True)
        assert e.value.kind == "twin-socket"


def test_set_irqs_sends_the_vfio_irq_set_and_the_fds() -> None:
    """device_set_irqs: argsz counts the BOOL data; eventfds go as SCM_RIGHTS, not in the payload."""
    seen: list[Message] = []

    def handler(s: Client) -> None:
        for _ in range(2):
            m = s.read_message()
            assert m is not None
            seen.append(m)
            s.send_message(m.command, b"", msg_id=m.msg_id, flags=vc.TYPE_REPLY)
        s.read_message()

    efds = [os.eventfd(0), os.eventfd(0)]
    try:
        with fake_server(handler) as c:
            c.device_set_irqs(vc.VFIO_PCI_MSIX_IRQ_INDEX, vc.VFIO_IRQ_SET_DATA_EVENTFD | vc.VFIO_IRQ_SET_ACTION_TRIGGER,
                              3, 2, fds=efds).ok()
            c.device_set_irqs(vc.VFIO_PCI_MSIX_IRQ_INDEX, vc.VFIO_IRQ_SET_DATA_BOOL | vc.VFIO_IRQ_SET_ACTION_TRIGGER,
                              0, 3, data=b"\1\0\1").ok()
    finally:
        for fd in efds:
            os.close(fd)
    assert seen[0].payload == tables.encode("vfio_irq_set", argsz=20, flags=0x24, index=2, start=3, count=2)
    assert len(seen[0].fds) == 2
    assert seen[1].payload == tables.encode("vfio_irq_set", argsz=23, flags=0x22, index=2, start=0, count=3,
                                            data=b"\1\0\1")
    assert seen[1].fds == []
    for fd in seen[0].fds:
        os.close(fd)


def test_region_info_asks_again_with_the_argsz_the_server_needs() -> None:
    """§Message sizes: a reply's argsz larger than the request's means "the full payload is not
    included"; region_info() asks again with that argsz and parses the capability chain."""
    cap = tables.encode("vfio_region_info_cap_sparse_mmap", id=vc.VFIO_REGION_INFO_CAP_SPARSE_MMAP, version=1,
                        nr_areas=1, areas=tables.encode("vfio_region_sparse_mmap_area", offset=0x2000, size=0x2000))
    asked: list[int] = []

    def handler(s: Client) -> None:
        for _ in range(2):
            m = s.read_message()
            assert m is not None and m.command == vc.VFIO_USER_DEVICE_GET_REGION_INFO
            req = tables.decode("VFIO_USER_DEVICE_GET_REGION_INFO.request", m.payload)
            asked.append(int(req["argsz"]))
            full = tables.encode("vfio_region_info", argsz=32 + len(cap), flags=0xF, index=req["index"],
                                 cap_offset=32, size=0x4000) + cap
            s.send_message(m.command, full[:int(req["argsz"])], msg_id=m.msg_id, flags=vc.TYPE_REPLY)
        s.read_message()

    with fake_server(handler) as c:
        info, fds = c.region_info(vc.VFIO_PCI_BAR0_REGION_INDEX + 2)
    assert asked == [32, 32 + len(cap)]
    assert (info.index, info.size, info.sparse_areas, fds) == (2, 0x4000, [(0x2000, 0x2000)], [])


def test_serve_until_answers_server_commands_with_no_request_pending() -> None:
    """A DMA_WRITE with No_reply is applied and not answered; one without is answered."""
    def handler(s: Client) -> None:
        s.send_message(vc.VFIO_USER_DMA_WRITE, vc.DMA_ACCESS.pack(0x2000, 2) + b"hi", flags=vc.FLAG_NO_REPLY)
        s.send_message(vc.VFIO_USER_DMA_WRITE, vc.DMA_ACCESS.pack(0x2002, 2) + b"yo", msg_id=9)
        r = s.read_message()
        assert r is not None and (r.msg_id, r.type, r.payload) == (9, vc.TYPE_REPLY, vc.DMA_WRITE_REPLY["spec"].pack(0x2002, 2))
        s.read_message()

    with fake_server(handler) as c:
        mem = bytearray(4)
        c.add_memory(0x2000, mem)
        c.serve_until(lambda: mem == b"hiyo")
        assert c.violations == []
