"""kickcall.vfio's message layouts against the specification's tables (tests/vfio_spec/tables.py,
transcribed from docs/interop/vfio-user.rst and linux/vfio.h without looking at kickcall).

One definition serves both of kickcall's ends (server and client), so a wrong offset in it would
be shared by both and invisible between them: here each record is encoded with distinct values in
every field and compared byte for byte with the table's own encoding, and decoded back.
"""

from __future__ import annotations

import pytest

from kickcall.vfio import protocol as P
from kickcall.vfio import uapi as U
from vfio_spec import tables as T


def _vals(name: str, **fixed: int) -> dict[str, int]:
    """A distinct value per fixed-size field of layout *name* (each byte of each field differs)."""
    out: dict[str, int] = {}
    for i, (field, _off, size) in enumerate(T.LAYOUTS[name]):
        if size is None:
            continue
        v = int.from_bytes(bytes((0x11 * (i + 1) + k) & 0xFF for k in range(size)), "little")
        out[field] = fixed.get(field, v)
    return out


def test_header():
    v = _vals("header")
    m = P.Message(v["message_id"], v["command"], v["flags"], v["error"], b"")
    raw = m.encode()
    # the header's size field is the whole message's: kickcall computes it; the table takes it
    assert raw == T.encode("header", **{**v, "message_size": 16})
    assert P.HEADER.size == T.fixed_size("header") == 16
    assert (P.VFIO_USER_F_TYPE_REPLY, P.VFIO_USER_F_NO_REPLY, P.VFIO_USER_F_ERROR) == (1, 1 << 4, 1 << 5)


def test_command_numbers():
    # §Commands, the table's names and numbers, kept in the spec client (independent of kickcall)
    from vfio_spec import client as SC

    spec = {v for k, v in vars(SC).items() if k.startswith("VFIO_USER_") and isinstance(v, int)}
    for c in P.VfioUserCommand:
        if c.name.startswith("X_KICKCALL_"):
            # kickcall's extension (docs/vfio-user-hot-reset.md): outside the specification's numbers
            assert c.value not in spec and c.value > max(n for n in spec if n < 0x100), c
            continue
        assert getattr(SC, f"VFIO_USER_{c.name}") == c.value, c


def test_dma_map_and_unmap():
    v = _vals("VFIO_USER_DMA_MAP.request", flags=3)
    assert P.DmaMap(**v).encode() == T.encode("VFIO_USER_DMA_MAP.request", **v)
    assert P.DmaMap.decode(T.encode("VFIO_USER_DMA_MAP.request", **{**v, "size": 4096, "address": 0x1000})) == \
        P.DmaMap(v["argsz"], 3, v["offset"], 0x1000, 4096)
    u = _vals("VFIO_USER_DMA_UNMAP.request", flags=0)
    assert P.DmaUnmap(**u).encode() == T.encode("VFIO_USER_DMA_UNMAP.request", **u)
    assert P.DmaUnmap.STRUCT.size == T.fixed_size("VFIO_USER_DMA_UNMAP.request") == 24


@pytest.mark.parametrize("name, cls", [("vfio_device_info", U.VfioDeviceInfo), ("vfio_irq_info", U.VfioIrqInfo),
                                       ("VFIO_USER_DEVICE_GET_INFO.reply", U.VfioDeviceInfo),
                                       ("VFIO_USER_DEVICE_GET_IRQ_INFO.reply", U.VfioIrqInfo)])
def test_info_structures(name, cls):
    v = _vals(name)
    assert cls(**v).pack() == T.encode(name, **v)
    assert cls.unpack(T.encode(name, **v)) == cls(**v)


def test_irq_set_with_bool_data():
    v = _vals("vfio_irq_set")
    data = bytes([1, 0, 1])
    s = U.VfioIrqSet(v["argsz"], v["flags"], v["index"], v["start"], v["count"], data)
    assert s.pack() == T.encode("VFIO_USER_DEVICE_SET_IRQS.request", **v, data=data)
    assert U.VfioIrqSet.unpack(s.pack()) == s


def test_region_info_with_sparse_mmap_capability():
    info = U.VfioRegionInfo(flags=U.VfioRegionInfoFlag.READ | U.VfioRegionInfoFlag.MMAP, index=4, size=0x10000,
                            offset=0x123000, sparse=[U.SparseMmapArea(0x9000, 0x7000), U.SparseMmapArea(0xA0, 0x10)])
    raw = info.pack()
    fixed = T.fixed_size("vfio_region_info")
    cap_hdr = T.fixed_size("vfio_info_cap_header")
    expect = T.encode("vfio_region_info", argsz=len(raw), flags=int(info.flags | U.VfioRegionInfoFlag.CAPS), index=4,
                      cap_offset=fixed, size=0x10000, offset=0x123000)
    expect += T.encode("vfio_info_cap_header", id=U.VFIO_REGION_INFO_CAP_SPARSE_MMAP, version=1, next=0)
    expect += T.encode("sparse_mmap_info", nr_areas=2, reserved=0, offset=0x9000, size=0x7000)
    expect += T.encode("vfio_region_sparse_mmap_area", offset=0xA0, size=0x10)
    assert raw == expect
    assert len(raw) == fixed + cap_hdr + 8 + 2 * 16


@pytest.mark.parametrize("cmd", ["VFIO_USER_REGION_READ", "VFIO_USER_REGION_WRITE"])
def test_region_access(cmd):
    v = _vals(f"{cmd}.request", count=5)
    data = b"abcde"
    with_data = cmd == "VFIO_USER_REGION_WRITE"
    raw = P.RegionAccess(v["offset"], v["region"], 5, data if with_data else b"").encode()
    assert raw == T.encode(f"{cmd}.request", **v, **({"data": data} if with_data else {}))
    assert P.RegionAccess.decode(raw, with_data=with_data).count == 5


def test_dma_access_and_both_dma_write_replies():
    v = _vals("VFIO_USER_DMA_WRITE.request", count=3)
    raw = P.DmaAccess(v["address"], 3, b"xyz").encode()
    assert raw == T.encode("VFIO_USER_DMA_WRITE.request", **v, data=b"xyz")
    spec = T.encode("VFIO_USER_DMA_WRITE.reply", address=0x1000, count=3)  # the table: count u32
    lib = T.encode("VFIO_USER_DMA_WRITE.reply/libvfio-user", address=0x1000, count=3)  # libvfio-user: u64
    assert P.decode_dma_write_reply(spec) == P.decode_dma_write_reply(lib) == (0x1000, 3)
    assert P.DMA_WRITE_REPLY.pack(0x1000, 3) == lib  # what kickcall's client sends
    assert P.DMA_WRITE_REPLY.pack(0x1000, 3)[:12] == spec  # ... whose first 12 bytes are the table's reply


def test_version_payload():
    raw = P.Version(0, 1).encode()
    d = T.decode("VFIO_USER_VERSION.request", raw)
    assert (d["version_major"], d["version_minor"]) == (0, 1)
    assert raw[4:].endswith(b"\0")  # "variable (including terminating NUL)"


def test_uapi_enum_values():
    # linux/vfio.h, by value (the spec client carries the same constants, written from the header)
    from vfio_spec import client as SC

    assert U.VfioPciIrqIndex.MSIX == SC.VFIO_PCI_MSIX_IRQ_INDEX and U.VfioPciRegion.CONFIG == SC.VFIO_PCI_CONFIG_REGION_INDEX
    assert U.VfioIrqSetFlag.ACTION_TRIGGER == SC.VFIO_IRQ_SET_ACTION_TRIGGER
    assert U.VfioIrqInfoFlag.NORESIZE == SC.VFIO_IRQ_INFO_NORESIZE
    assert U.VfioRegionInfoFlag.CAPS == SC.VFIO_REGION_INFO_FLAG_CAPS
