"""kickcall.vfio's protocol and uAPI decoders against hostile bytes, and the client's SET_IRQS split.

Property tests: whatever bytes a peer sends, a decoder either returns a record or raises its one
error class (``PayloadError`` with an errno for a payload, ``VfioUserError`` with a kind for
framing, ``UapiError`` for a uAPI structure) -- never anything else.
"""

from __future__ import annotations

import errno
import os
import socket
import struct

import pytest
from hypothesis import given, strategies as st

from kickcall.vfio.client import split_eventfds
from kickcall.vfio.protocol import (
    HEADER, Capabilities, DmaAccess, DmaMap, DmaUnmap, Message, MessageReader, PayloadError, RegionAccess,
    Version, VfioUserCommand, VfioUserError, VfioUserErrorKind, decode_dma_write_reply, send_message,
)
from kickcall.vfio.uapi import SparseMmapArea, UapiError, VfioIrqSet, VfioRegionInfo


@given(st.binary(max_size=200))
def test_version_decode_never_raises_anything_else(data):
    try:
        v = Version.decode(data)
    except PayloadError as e:
        assert e.errno == errno.EINVAL
    else:
        assert v.caps.max_msg_fds >= 1


@given(st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=5),
                    lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=12), c, max_size=4),
                    max_leaves=12))
def test_capabilities_from_any_json(doc):
    try:
        caps = Capabilities.from_json(doc)
    except PayloadError as e:
        assert e.errno == errno.EINVAL
    else:
        # accepted: an object whose numbers are the ones given, or the specification's defaults
        assert isinstance(doc, dict)
        given = doc.get("max_msg_fds")
        assert caps.max_msg_fds == (1 if given is None else given)
        given = doc.get("max_data_xfer_size")
        assert caps.max_data_xfer_size == (1 << 20 if given is None else given)
        assert caps.proposed == frozenset(k for k in doc if isinstance(k, str))


def test_version_round_trip_and_defaults():
    v = Version(0, 1, Capabilities(max_msg_fds=8, twin_socket=True, twin_fd_index=0))
    raw = v.encode()
    assert raw.endswith(b"\0")  # the specification: the JSON includes its terminating NUL
    back = Version.decode(raw)
    assert (back.major, back.minor, back.caps.max_msg_fds, back.caps.twin_socket, back.caps.twin_fd_index) == (
        0, 1, 8, True, 0)
    bare = Version.decode(struct.pack("<HH", 0, 1))  # no JSON: every capability at its default
    assert (bare.caps.max_msg_fds, bare.caps.max_data_xfer_size) == (1, 1 << 20)
    assert Version.decode(struct.pack("<HH", 0, 1) + b'{"capabilities":{"max_msg_fds":4}}').caps.max_msg_fds == 4


@pytest.mark.parametrize("decode", [DmaMap.decode, DmaUnmap.decode,
                                    lambda d: RegionAccess.decode(d, with_data=True),
                                    lambda d: RegionAccess.decode(d, with_data=False),
                                    lambda d: DmaAccess.decode(d, with_data=True), decode_dma_write_reply])
@given(data=st.binary(max_size=64))
def test_payload_decoders_raise_only_payload_errors(decode, data):
    try:
        decode(data)
    except PayloadError as e:
        assert e.errno > 0


@given(st.binary(max_size=160))
def test_region_info_decoder_follows_only_sane_chains(data):
    try:
        VfioRegionInfo.unpack(data)
    except UapiError:
        pass


def test_region_info_sparse_round_trip_and_short_argsz():
    info = VfioRegionInfo(index=4, flags=7, size=0x10000, offset=0x40000,
                          sparse=[SparseMmapArea(0x9000, 0x7000)])
    full = info.pack()
    back = VfioRegionInfo.unpack(full)
    assert back.argsz == len(full) == 32 + 8 + 8 + 16
    assert back.sparse == [SparseMmapArea(0x9000, 0x7000)]
    short = VfioRegionInfo.unpack(info.pack(max_size=32))
    assert short.argsz == len(full) and short.sparse is None  # argsz says how much to ask for


@given(st.binary(max_size=40))
def test_irq_set_unpack(data):
    try:
        s = VfioIrqSet.unpack(data)
    except UapiError:
        assert len(data) < 20
    else:
        assert len(s.data) == len(data) - 20


@given(st.lists(st.sampled_from([-1, 3, 4, 5]), max_size=40), st.integers(1, 9))
def test_split_eventfds_like_qemu(fds, max_fds):
    pieces = split_eventfds(fds, max_fds)
    rebuilt: list[int] = []
    for off, piece in pieces:
        assert off == len(rebuilt)
        assert piece, "an empty piece would be a message that sets nothing"
        assert len(piece) <= max_fds, (len(piece), max_fds)
        assert all(f == -1 for f in piece) or all(f != -1 for f in piece)
        rebuilt += piece
    assert rebuilt == fds


def _pair():
    return socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)


@pytest.mark.parametrize("size, kind", [(8, VfioUserErrorKind.SHORT_SIZE),
                                         ((1 << 20) + 16 + 8192, VfioUserErrorKind.OVERSIZED)])
def test_reader_framing_errors(size, kind):
    a, b = _pair()
    with a, b:
        a.sendall(HEADER.pack(1, VfioUserCommand.VERSION, size, 0, 0))
        with pytest.raises(VfioUserError) as ei:
            MessageReader().feed(b)
        assert ei.value.kind == kind


def test_reader_bad_type_and_partial_message_and_fds():
    a, b = _pair()
    with a, b:
        a.sendall(HEADER.pack(1, 1, 16, 0x7, 0))
        with pytest.raises(VfioUserError) as ei:
            MessageReader().feed(b)
        assert ei.value.kind == VfioUserErrorKind.BAD_TYPE
    a, b = _pair()
    with a, b:
        efd = os.eventfd(0)
        try:
            send_message(a, Message(7, VfioUserCommand.DMA_MAP, 0, 0, b"x" * 32, [efd]))
            m = MessageReader().feed(b)
            assert m is not None and (m.msg_id, m.command, len(m.fds)) == (7, 2, 1)
            os.write(efd, (5).to_bytes(8, "little"))
            assert os.read(m.fds[0], 8) == (5).to_bytes(8, "little")  # the same eventfd
            m.close_fds()
        finally:
            os.close(efd)
        a.sendall(HEADER.pack(2, 1, 40, 0, 0) + b"abc")
        a.close()
        with pytest.raises(VfioUserError) as ei:
            MessageReader().feed(b)
        assert ei.value.kind == VfioUserErrorKind.PARTIAL_MESSAGE


def test_error_reply_is_header_only():
    m = Message(9, VfioUserCommand.DEVICE_SET_IRQS, 0, 0, b"payload")
    r = m.error_reply(errno.EINVAL)
    raw = r.encode()
    assert len(raw) == 16
    mid, cmd, size, flags, err = HEADER.unpack(raw)
    assert (mid, cmd, size, flags & 0xF, bool(flags & 0x20), err) == (9, 8, 16, 1, True, errno.EINVAL)
