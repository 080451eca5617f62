"""The Linux VFIO uAPI (``include/uapi/linux/vfio.h``): the structures and constants kickcall uses.

Declared once, with the header's names, sizes and values; the vfio-user protocol
(``kickcall.vfio.protocol``) carries the same structures as message payloads.  All structures are
in the machine's byte order (the header's ``__u32``/``__u64``); kickcall runs on little-endian
hosts and packs with ``<`` so a layout test can compare bytes with the specification's tables.

Only what vfio-pci and a vfio-user PCI device use is here: device info, region info with its
capability chain (sparse mmap), IRQ info, IRQ set, the PCI region and IRQ indexes.
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass, field
from typing import ClassVar, Self

__all__ = [
    "VFIO_TYPE", "VFIO_BASE", "VfioIoctl", "VfioPciIrqIndex", "VfioPciRegion", "VFIO_PCI_NUM_IRQS",
    "VFIO_PCI_NUM_REGIONS", "VfioDeviceFlag", "VfioRegionInfoFlag", "VfioIrqInfoFlag", "VfioIrqSetFlag",
    "VFIO_IRQ_SET_DATA_TYPE_MASK", "VFIO_IRQ_SET_ACTION_TYPE_MASK", "VFIO_REGION_INFO_CAP_SPARSE_MMAP",
    "VFIO_REGION_INFO_CAP_TYPE", "VfioDeviceInfo", "VfioRegionInfo", "SparseMmapArea", "VfioIrqInfo",
    "VfioIrqSet", "UapiError", "INFO_CAP_HEADER",
]

VFIO_TYPE = ord(";")
VFIO_BASE = 100


def _io(nr: int) -> int:
    """``_IO(VFIO_TYPE, VFIO_BASE + nr)``: the size is not encoded (``argsz`` carries it)."""
    return (VFIO_TYPE << 8) | (VFIO_BASE + nr)


class VfioIoctl(enum.IntEnum):
    """The device ioctls whose vfio-user messages kickcall implements (``VFIO_DEVICE_*``)."""

    DEVICE_GET_INFO = _io(7)
    DEVICE_GET_REGION_INFO = _io(8)
    DEVICE_GET_IRQ_INFO = _io(9)
    DEVICE_SET_IRQS = _io(10)
    DEVICE_RESET = _io(11)
    DEVICE_GET_PCI_HOT_RESET_INFO = _io(12)
    DEVICE_PCI_HOT_RESET = _io(13)
    DEVICE_IOEVENTFD = _io(16)


class VfioPciIrqIndex(enum.IntEnum):
    """``VFIO_PCI_*_IRQ_INDEX``."""

    INTX = 0
    MSI = 1
    MSIX = 2
    ERR = 3
    REQ = 4


VFIO_PCI_NUM_IRQS = 5


class VfioPciRegion(enum.IntEnum):
    """``VFIO_PCI_*_REGION_INDEX``."""

    BAR0 = 0
    BAR1 = 1
    BAR2 = 2
    BAR3 = 3
    BAR4 = 4
    BAR5 = 5
    ROM = 6
    CONFIG = 7
    VGA = 8


VFIO_PCI_NUM_REGIONS = 9


class VfioDeviceFlag(enum.IntFlag):
    """``VFIO_DEVICE_FLAGS_*`` (vfio_device_info.flags)."""

    RESET = 1 << 0
    PCI = 1 << 1


class VfioRegionInfoFlag(enum.IntFlag):
    """``VFIO_REGION_INFO_FLAG_*``."""

    READ = 1 << 0
    WRITE = 1 << 1
    MMAP = 1 << 2
    CAPS = 1 << 3


class VfioIrqInfoFlag(enum.IntFlag):
    """``VFIO_IRQ_INFO_*``.  NORESIZE: the index's vectors are set up as a set; a new one cannot be
    enabled without disabling the whole index.  Its absence on MSI-X is dynamic MSI-X (Linux 6.5)."""

    EVENTFD = 1 << 0
    MASKABLE = 1 << 1
    AUTOMASKED = 1 << 2
    NORESIZE = 1 << 3


class VfioIrqSetFlag(enum.IntFlag):
    """``VFIO_IRQ_SET_*``: one DATA type and one ACTION per call."""

    DATA_NONE = 1 << 0
    DATA_BOOL = 1 << 1
    DATA_EVENTFD = 1 << 2
    ACTION_MASK = 1 << 3
    ACTION_UNMASK = 1 << 4
    ACTION_TRIGGER = 1 << 5


VFIO_IRQ_SET_DATA_TYPE_MASK = VfioIrqSetFlag.DATA_NONE | VfioIrqSetFlag.DATA_BOOL | VfioIrqSetFlag.DATA_EVENTFD
VFIO_IRQ_SET_ACTION_TYPE_MASK = (VfioIrqSetFlag.ACTION_MASK | VfioIrqSetFlag.ACTION_UNMASK
                                 | VfioIrqSetFlag.ACTION_TRIGGER)

VFIO_REGION_INFO_CAP_SPARSE_MMAP = 1
VFIO_REGION_INFO_CAP_TYPE = 2

#: ``struct vfio_info_cap_header {__u16 id; __u16 version; __u32 next;}``
INFO_CAP_HEADER = struct.Struct("<HHI")
_SPARSE_HDR = struct.Struct("<II")  # nr_areas, reserved (after the cap header)
_SPARSE_AREA = struct.Struct("<QQ")  # offset, size


class UapiError(ValueError):
    """A structure that does not decode (too short, inconsistent); the caller answers EINVAL."""


@dataclass
class VfioDeviceInfo:
    """``struct vfio_device_info`` (16 bytes)."""

    argsz: int = 16
    flags: int = 0
    num_regions: int = 0
    num_irqs: int = 0

    STRUCT: ClassVar[struct.Struct] = struct.Struct("<IIII")

    def pack(self) -> bytes:
        return self.STRUCT.pack(self.argsz, self.flags, self.num_regions, self.num_irqs)

    @classmethod
    def unpack(cls, data: bytes) -> Self:
        if len(data) < cls.STRUCT.size:
            raise UapiError(f"vfio_device_info: {len(data)} bytes, need {cls.STRUCT.size}")
        return cls(*cls.STRUCT.unpack_from(data))


@dataclass(frozen=True)
class SparseMmapArea:
    """``struct vfio_region_sparse_mmap_area``: a part of a region the user may mmap."""

    offset: int
    size: int


@dataclass
class VfioRegionInfo:
    """``struct vfio_region_info`` (32 bytes) and its capability chain.

    ``cap_offset`` and each capability's ``next`` are offsets from the start of the structure.
    The only capability kickcall emits is ``VFIO_REGION_INFO_CAP_SPARSE_MMAP`` (version 1):
    ``sparse`` lists the areas of the region that may be mmapped (the rest is trapped)."""

    argsz: int = 32
    flags: int = 0
    index: int = 0
    cap_offset: int = 0
    size: int = 0
    offset: int = 0
    sparse: list[SparseMmapArea] | None = field(default=None)

    STRUCT: ClassVar[struct.Struct] = struct.Struct("<IIIIQQ")

    def pack(self, max_size: int | None = None) -> bytes:
        """The structure with its capability chain; ``argsz`` is the full size.  With *max_size*
        smaller than that (the caller's argsz), only the fixed part is returned, as VFIO does:
        the caller sees argsz and asks again with a larger buffer."""
        caps = b""
        flags = self.flags
        cap_offset = 0
        if self.sparse is not None:
            cap_offset = self.STRUCT.size
            caps = (INFO_CAP_HEADER.pack(VFIO_REGION_INFO_CAP_SPARSE_MMAP, 1, 0)
                    + _SPARSE_HDR.pack(len(self.sparse), 0)
                    + b"".join(_SPARSE_AREA.pack(a.offset, a.size) for a in self.sparse))
            flags |= VfioRegionInfoFlag.CAPS
        full = self.STRUCT.size + len(caps)
        if max_size is not None and max_size < full:
            return self.STRUCT.pack(full, flags & ~VfioRegionInfoFlag.CAPS, self.index, 0, self.size, self.offset)
        return self.STRUCT.pack(full, flags, self.index, cap_offset, self.size, self.offset) + caps

    @classmethod
    def unpack(cls, data: bytes) -> Self:
        """Decode, following the capability chain (bounded: offsets must move forward and stay
        inside *data*)."""
        if len(data) < cls.STRUCT.size:
            raise UapiError(f"vfio_region_info: {len(data)} bytes, need {cls.STRUCT.size}")
        argsz, flags, index, cap_offset, size, offset = cls.STRUCT.unpack_from(data)
        info = cls(argsz, flags, index, cap_offset, size, offset)
        if not flags & VfioRegionInfoFlag.CAPS:
            return info
        pos, seen = cap_offset, 0
        while pos:
            if pos < cls.STRUCT.size or pos + INFO_CAP_HEADER.size > len(data) or seen > 16:
                raise UapiError(f"vfio_region_info: capability at {pos} outside the {len(data)} bytes")
            cid, _ver, nxt = INFO_CAP_HEADER.unpack_from(data, pos)
            if cid == VFIO_REGION_INFO_CAP_SPARSE_MMAP:
                p = pos + INFO_CAP_HEADER.size
                if p + _SPARSE_HDR.size > len(data):
                    raise UapiError("sparse mmap capability cut short")
                nr, _ = _SPARSE_HDR.unpack_from(data, p)
                p += _SPARSE_HDR.size
                if p + nr * _SPARSE_AREA.size > len(data):
                    raise UapiError(f"sparse mmap capability: {nr} areas do not fit")
                info.sparse = [SparseMmapArea(*_SPARSE_AREA.unpack_from(data, p + i * _SPARSE_AREA.size))
                               for i in range(nr)]
            if nxt and nxt <= pos:
                raise UapiError("capability chain goes backwards")
            pos, seen = nxt, seen + 1
        return info


@dataclass
class VfioIrqInfo:
    """``struct vfio_irq_info`` (16 bytes)."""

    argsz: int = 16
    flags: int = 0
    index: int = 0
    count: int = 0

    STRUCT: ClassVar[struct.Struct] = struct.Struct("<IIII")

    def pack(self) -> bytes:
        return self.STRUCT.pack(self.argsz, self.flags, self.index, self.count)

    @classmethod
    def unpack(cls, data: bytes) -> Self:
        if len(data) < cls.STRUCT.size:
            raise UapiError(f"vfio_irq_info: {len(data)} bytes, need {cls.STRUCT.size}")
        return cls(*cls.STRUCT.unpack_from(data))


@dataclass
class VfioIrqSet:
    """``struct vfio_irq_set`` (20-byte header, then ``data``).

    In the ioctl, DATA_BOOL carries one byte per sub-index and DATA_EVENTFD one ``__s32`` fd per
    sub-index (-1: de-assign).  Over vfio-user the fds travel as SCM_RIGHTS and ``data`` carries
    only the booleans."""

    argsz: int = 20
    flags: int = 0
    index: int = 0
    start: int = 0
    count: int = 0
    data: bytes = b""

    STRUCT: ClassVar[struct.Struct] = struct.Struct("<IIIII")

    def pack(self) -> bytes:
        return self.STRUCT.pack(self.argsz, self.flags, self.index, self.start, self.count) + self.data

    @classmethod
    def unpack(cls, data: bytes) -> Self:
        if len(data) < cls.STRUCT.size:
            raise UapiError(f"vfio_irq_set: {len(data)} bytes, need {cls.STRUCT.size}")
        argsz, flags, index, start, count = cls.STRUCT.unpack_from(data)
        return cls(argsz, flags, index, start, count, bytes(data[cls.STRUCT.size:]))

    @property
    def data_type(self) -> VfioIrqSetFlag:
        return VfioIrqSetFlag(self.flags & VFIO_IRQ_SET_DATA_TYPE_MASK)

    @property
    def action(self) -> VfioIrqSetFlag:
        return VfioIrqSetFlag(self.flags & VFIO_IRQ_SET_ACTION_TYPE_MASK)
