"""The vhost-user request records (``kickcall.vhost_user.protocol``): each payload decodes into a
typed record whose ``validate()`` refuses what rust-vmm's ``is_valid`` refuses, with a kind.

Pure unit tests (no socket): the same refusals over a real socket are in test_backend_errors.py.
"""

from __future__ import annotations

import pytest

from kickcall.vhost_user import ProtocolError, ProtocolErrorKind
from kickcall.vhost_user.backend import VhostUserBackend
from kickcall.vhost_user.protocol import (
    CONFIG_HDR,
    FLAG_NEED_REPLY,
    FLAG_REPLY,
    INFLIGHT,
    MEM_REGIONS_HDR,
    SINGLE_MEM_REGION,
    U64,
    VERSION,
    VHOST_VRING_F_LOG,
    VRING_ADDR,
    VRING_STATE,
    ConfigAccess,
    Empty,
    FdRule,
    FrontendReq,
    Inflight,
    MemRegion,
    MemTable,
    SingleMemRegion,
    U64Payload,
    VringAddr,
    VringFile,
    VringState,
    check_fds,
    check_request_flags,
    pack_regions,
)

K = ProtocolErrorKind
FR = FrontendReq


def kind_of(fn) -> ProtocolErrorKind:
    with pytest.raises(ProtocolError) as ei:
        fn()
    return ei.value.kind


def test_protocol_error_carries_a_kind():
    e = ProtocolError(K.BAD_SIZE, "payload of 3 bytes, expected 8")
    assert e.kind is K.BAD_SIZE and str(e) == "payload of 3 bytes, expected 8"
    assert len({k.value for k in ProtocolErrorKind}) == len(ProtocolErrorKind)  # distinct wire strings


# -- header flags -----------------------------------------------------------------------------------
@pytest.mark.parametrize("flags", [VERSION, VERSION | FLAG_NEED_REPLY])
def test_request_flags_accepted(flags):
    check_request_flags(flags)


@pytest.mark.parametrize("flags,kind", [(0, K.BAD_VERSION), (2, K.BAD_VERSION), (VERSION | 0x10, K.BAD_FLAGS),
                                        (VERSION | FLAG_REPLY, K.BAD_FLAGS), (VERSION | 0xFFFF_FFF0, K.BAD_FLAGS)])
def test_request_flags_refused(flags, kind):
    assert kind_of(lambda: check_request_flags(flags)) is kind


# -- sizes ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("cls", [Empty, U64Payload, VringState, VringAddr, VringFile, SingleMemRegion, Inflight])
def test_fixed_size_payloads_refuse_any_other_size(cls):
    assert cls.SIZE is not None
    for n in (cls.SIZE - 1, cls.SIZE + 1):
        if n >= 0:
            assert kind_of(lambda n=n: cls.decode(bytes(n))) is K.BAD_SIZE


def test_decoded_records_carry_their_fields():
    assert U64Payload.decode(U64.pack(7)) == U64Payload(7)
    assert VringState.decode(VRING_STATE.pack(1, 64)) == VringState(1, 64)
    a = VringAddr.decode(VRING_ADDR.pack(1, VHOST_VRING_F_LOG, 0x1000, 0x3000, 0x2000, 0x9000))
    assert (a.index, a.flags, a.desc, a.used, a.avail, a.log) == (1, 1, 0x1000, 0x3000, 0x2000, 0x9000)
    assert VringFile.decode(U64.pack(3 | 0x100)) == VringFile(3, True, 0)
    assert SingleMemRegion.decode(SINGLE_MEM_REGION.pack(0, 1, 2, 3, 4)).region == MemRegion(1, 2, 3, 4)
    assert Inflight.decode(INFLIGHT.pack(4096, 0, 2, 128)) == Inflight(4096, 0, 2, 128)
    c = ConfigAccess.decode(CONFIG_HDR.pack(4, 3, 0) + b"abc")
    assert (c.offset, c.size, c.data) == (4, 3, b"abc")
    t = MemTable.decode(pack_regions([MemRegion(0, 4096, 0x7000, 0), MemRegion(4096, 4096, 0x9000, 0)]))
    assert len(t.regions) == 2 and t.regions[1].user_addr == 0x9000


def test_config_payload_must_match_its_size():
    assert kind_of(lambda: ConfigAccess.decode(b"\0" * 8)) is K.BAD_SIZE
    assert kind_of(lambda: ConfigAccess.decode(CONFIG_HDR.pack(0, 4, 0) + b"abc")) is K.BAD_SIZE
    assert kind_of(lambda: ConfigAccess.decode(CONFIG_HDR.pack(0, 5000, 0) + bytes(5000))) is K.BAD_SIZE


def test_memory_table_region_count_and_size():
    assert kind_of(lambda: MemTable.decode(b"\0" * 4)) is K.BAD_SIZE
    assert kind_of(lambda: MemTable.decode(MEM_REGIONS_HDR.pack(0, 0))) is K.BAD_REGION_COUNT
    assert kind_of(lambda: MemTable.decode(MEM_REGIONS_HDR.pack(9, 0) + bytes(9 * 32))) is K.BAD_REGION_COUNT
    assert kind_of(lambda: MemTable.decode(MEM_REGIONS_HDR.pack(2, 0) + bytes(32))) is K.BAD_SIZE


@pytest.mark.parametrize("region", [MemRegion(0, 0, 0x7000, 0), MemRegion((1 << 64) - 4096, 8192, 0, 0),
                                    MemRegion(0, 8192, (1 << 64) - 4096, 0), MemRegion(0, (1 << 48) + 1, 0, 0)],
                         ids=["size-0", "guest-wraps", "user-wraps", "too-large"])
def test_bad_memory_regions(region):
    assert kind_of(region.validate) is K.BAD_MEMORY_REGION
    assert kind_of(MemTable((region,)).validate) is K.BAD_MEMORY_REGION
    assert kind_of(SingleMemRegion(region).validate) is K.BAD_MEMORY_REGION


# -- SET_VRING_ADDR (rust-vmm VhostUserVringAddr::is_valid) ----------------------------------------------
def addr(flags: int = 0, desc: int = 0x1000, used: int = 0x3000, avail: int = 0x2000) -> VringAddr:
    return VringAddr(0, flags, desc, used, avail, 0)


def test_aligned_ring_addresses_with_or_without_the_log_flag_are_valid():
    addr().validate()
    addr(VHOST_VRING_F_LOG).validate()
    addr(desc=0x1010, used=0x3004, avail=0x2002).validate()


@pytest.mark.parametrize("flags", [0x2, 0x3, 0x8000_0000])
def test_vring_addr_flags_other_than_log(flags):
    assert kind_of(addr(flags).validate) is K.BAD_VRING_FLAGS
    addr(flags).validate(strict=False)  # what the back-end accepted before issue 9


@pytest.mark.parametrize("bad", [addr(desc=0x1008), addr(desc=0x1001), addr(avail=0x2001), addr(used=0x3002),
                                 addr(used=0x3001)], ids=["desc+8", "desc+1", "avail+1", "used+2", "used+1"])
def test_misaligned_ring_addresses(bad):
    assert kind_of(bad.validate) is K.MISALIGNED_RING_ADDRESS
    bad.validate(strict=False)


# -- SET_VRING_KICK/CALL/ERR ------------------------------------------------------------------------------------
@pytest.mark.parametrize("value", [0x200, 0x100 | 0x400, 1 << 63])
def test_vring_file_stray_bits(value):
    f = VringFile.decode(U64.pack(value))
    assert f.extra
    assert kind_of(f.validate) is K.BAD_VRING_FILE
    assert kind_of(lambda: f.validate(strict=False)) is K.BAD_VRING_FILE  # refused before issue 9 too


def test_vring_file_fds():
    check_fds(VringFile(0, False), FdRule.VRING, 1)
    check_fds(VringFile(0, True), FdRule.VRING, 0)
    assert kind_of(lambda: check_fds(VringFile(0, True), FdRule.VRING, 1)) is K.BAD_FD_COUNT
    assert kind_of(lambda: check_fds(VringFile(0, False), FdRule.VRING, 0)) is K.BAD_FD_COUNT
    assert kind_of(lambda: check_fds(Empty(), FdRule.NONE, 1)) is K.BAD_FD_COUNT
    t = MemTable((MemRegion(0, 4096, 0, 0), MemRegion(4096, 4096, 4096, 0)))
    check_fds(t, FdRule.REGIONS, 2)
    assert kind_of(lambda: check_fds(t, FdRule.REGIONS, 1)) is K.BAD_FD_COUNT


@pytest.mark.parametrize("nq,qs", [(0, 128), (1, 0), (1, 3), (1, 65536)])
def test_inflight_geometry(nq, qs):
    assert kind_of(Inflight(0, 0, nq, qs).validate) is K.BAD_INFLIGHT


# -- the back-end's dispatch table ---------------------------------------------------------------------------
def test_every_served_request_has_a_record_type_and_a_handler():
    routes = VhostUserBackend.routes()
    served = {FR(r).name for r, route in routes.items() if route.handler is not None}
    assert {"GET_FEATURES", "SET_FEATURES", "SET_MEM_TABLE", "SET_VRING_ADDR", "SET_VRING_KICK", "GET_CONFIG",
            "GET_INFLIGHT_FD", "ADD_MEM_REG", "RESET_DEVICE"} <= served
    for r, route in routes.items():
        assert isinstance(route.fds, FdRule)
        if route.handler is not None:
            assert route.handler.__name__ == "_on_" + FR(r).name.lower(), (FR(r).name, route.handler.__name__)
    assert routes[FR.SET_VRING_ADDR].payload is VringAddr
    assert routes[FR.GET_CONFIG].feature is not None and routes[FR.SET_MEM_TABLE].fds is FdRule.REGIONS
