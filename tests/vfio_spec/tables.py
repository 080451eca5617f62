"""The vfio-user specification's message layouts, as data.

Transcribed by hand from QEMU's ``docs/interop/vfio-user.rst`` (read at qemu/qemu commit 1053bb62),
table by table, and from ``<linux/vfio.h>`` where the specification says a structure "is defined in
<linux/vfio.h>".  Nothing here is imported from kickcall: this module is the independent reference
that kickcall.vfio's encodings are compared against (issue 10, item 1).

Each layout is a tuple of ``(field name, offset, size)``; ``size`` is ``None`` for a trailing field
the specification sizes as "variable" (payload data, the VERSION JSON, an array).  Offsets are from
the end of the 16-byte header, as the specification gives them ("the offsets are given from the end
of the standard header", §Header), except ``header`` itself.

Names: a message is ``"<command name>.request"`` or ``"<command name>.reply"`` with the command
name of §Commands (``"VFIO_USER_DMA_MAP.request"``); a field is the specification's name, lower
case, with spaces and hyphens as underscores (``"Message ID"`` -> ``message_id``, ``"version
major"`` -> ``version_major``, ``"sub-regions"`` -> ``sub_regions``).  The uAPI structures carry
their linux/vfio.h names (``vfio_irq_set``).

Byte order: "all data is in the endianness of the host system" (§Protocol Specification); the host
is little-endian, and these tables pack little-endian.
"""

from __future__ import annotations

Field = tuple[str, int, int | None]

_HEADER: tuple[Field, ...] = (
    # §Header
    ("message_id", 0, 2),
    ("command", 2, 2),
    ("message_size", 4, 4),
    ("flags", 8, 4),  # bits 0-3 Type, bit 4 No_reply, bit 5 Error
    ("error", 12, 4),
)

_VERSION: tuple[Field, ...] = (
    # §VFIO_USER_VERSION, Request; "The same message format is used in the server's reply"
    ("version_major", 0, 2),
    ("version_minor", 2, 2),
    ("version_data", 4, None),  # "variable (including terminating NUL). Optional."
)

_DMA_MAP: tuple[Field, ...] = (
    # §VFIO_USER_DMA_MAP, Request; flags bit 0 readable, bit 1 writeable
    ("argsz", 0, 4),
    ("flags", 4, 4),
    ("offset", 8, 8),
    ("address", 16, 8),
    ("size", 24, 8),
)

_DMA_UNMAP: tuple[Field, ...] = (
    # §VFIO_USER_DMA_UNMAP, Request; the reply is "the original DMA entry in the request"
    ("argsz", 0, 4),
    ("flags", 4, 4),
    ("address", 8, 8),
    ("size", 16, 8),
)

_DEVICE_INFO: tuple[Field, ...] = (
    # §VFIO_USER_DEVICE_GET_INFO, Request and Reply (struct vfio_device_info, "16 bytes today")
    ("argsz", 0, 4),
    ("flags", 4, 4),  # bit 0 VFIO_DEVICE_FLAGS_RESET, bit 1 VFIO_DEVICE_FLAGS_PCI
    ("num_regions", 8, 4),
    ("num_irqs", 12, 4),
)

_REGION_INFO: tuple[Field, ...] = (
    # §VFIO_USER_DEVICE_GET_REGION_INFO, Request and Reply (struct vfio_region_info)
    ("argsz", 0, 4),
    ("flags", 4, 4),  # bits 0-3: VFIO_REGION_INFO_FLAG_READ, _WRITE, _MMAP, _CAPS
    ("index", 8, 4),
    ("cap_offset", 12, 4),
    ("size", 16, 8),
    ("offset", 24, 8),
)

_IO_FDS: tuple[Field, ...] = (
    # §VFIO_USER_DEVICE_GET_REGION_IO_FDS, Request
    ("argsz", 0, 4),
    ("flags", 4, 4),
    ("index", 8, 4),
    ("count", 12, 4),
)

_IRQ_INFO: tuple[Field, ...] = (
    # §VFIO_USER_DEVICE_GET_IRQ_INFO, Request and Reply (struct vfio_irq_info)
    ("argsz", 0, 4),
    ("flags", 4, 4),  # bits 0-3: VFIO_IRQ_INFO_EVENTFD, _MASKABLE, _AUTOMASKED, _NORESIZE
    ("index", 8, 4),
    ("count", 12, 4),
)

_IRQ_SET: tuple[Field, ...] = (
    # §VFIO_USER_DEVICE_SET_IRQS, Request (struct vfio_irq_set)
    ("argsz", 0, 4),
    ("flags", 4, 4),  # bits 0-2 DATA_NONE/BOOL/EVENTFD, bits 3-5 ACTION_MASK/UNMASK/TRIGGER
    ("index", 8, 4),
    ("start", 12, 4),
    ("count", 16, 4),
    ("data", 20, None),  # one byte per sub-index with DATA_BOOL; eventfds travel as SCM_RIGHTS
)

_REGION_ACCESS: tuple[Field, ...] = (
    # §VFIO_USER_REGION_READ / §VFIO_USER_REGION_WRITE
    ("offset", 0, 8),
    ("region", 8, 4),
    ("count", 12, 4),
)

_DMA_ACCESS: tuple[Field, ...] = (
    # §VFIO_USER_DMA_READ / §VFIO_USER_DMA_WRITE requests
    ("address", 0, 8),
    ("count", 8, 8),
)

_SUB_REGION: tuple[Field, ...] = (
    # §VFIO_USER_DEVICE_GET_REGION_IO_FDS, "Sub-Region IO FD info format" (both types share these)
    ("offset", 0, 8),
    ("size", 8, 8),
    ("fd_index", 16, 4),
    ("type", 20, 4),
    ("flags", 24, 4),
    ("padding", 28, 4),
)

LAYOUTS: dict[str, tuple[Field, ...]] = {
    "header": _HEADER,
    "VFIO_USER_VERSION.request": _VERSION,
    "VFIO_USER_VERSION.reply": _VERSION,
    "VFIO_USER_DMA_MAP.request": _DMA_MAP,
    "VFIO_USER_DMA_MAP.reply": (),  # "There is no payload in the reply message."
    "VFIO_USER_DMA_UNMAP.request": _DMA_UNMAP,
    "VFIO_USER_DMA_UNMAP.reply": _DMA_UNMAP,  # "responds with the original DMA entry in the request"
    "VFIO_USER_DEVICE_GET_INFO.request": _DEVICE_INFO,
    "VFIO_USER_DEVICE_GET_INFO.reply": _DEVICE_INFO,
    "VFIO_USER_DEVICE_GET_REGION_INFO.request": _REGION_INFO,
    # The reply's table ends at offset 32; capabilities (if VFIO_REGION_INFO_FLAG_CAPS) follow at
    # cap_offset, "relative to the beginning of the VFIO region info structure".
    "VFIO_USER_DEVICE_GET_REGION_INFO.reply": _REGION_INFO,
    "VFIO_USER_DEVICE_GET_REGION_IO_FDS.request": _IO_FDS,
    "VFIO_USER_DEVICE_GET_REGION_IO_FDS.reply": _IO_FDS + (("sub_regions", 16, None),),
    "sub_region_ioeventfd": _SUB_REGION + (("datamatch", 32, 8),),
    "sub_region_ioregionfd": _SUB_REGION + (("user_data", 32, 8),),
    "VFIO_USER_DEVICE_GET_IRQ_INFO.request": _IRQ_INFO,
    "VFIO_USER_DEVICE_GET_IRQ_INFO.reply": _IRQ_INFO,
    "VFIO_USER_DEVICE_SET_IRQS.request": _IRQ_SET,
    "VFIO_USER_DEVICE_SET_IRQS.reply": (),  # "There is no payload in the reply."
    "VFIO_USER_REGION_READ.request": _REGION_ACCESS,
    "VFIO_USER_REGION_READ.reply": _REGION_ACCESS + (("data", 16, None),),
    "VFIO_USER_REGION_WRITE.request": _REGION_ACCESS + (("data", 16, None),),
    "VFIO_USER_REGION_WRITE.reply": _REGION_ACCESS,
    "VFIO_USER_DMA_READ.request": _DMA_ACCESS,
    "VFIO_USER_DMA_READ.reply": _DMA_ACCESS + (("data", 16, None),),
    "VFIO_USER_DMA_WRITE.request": _DMA_ACCESS + (("data", 16, None),),
    # The specification's table: count is 4 bytes here (8 in every other DMA message), so the
    # reply is 12 bytes.  libvfio-user replies with its struct vfio_user_dma_region_access
    # {u64 addr; u64 count}, 16 bytes: that reading is "VFIO_USER_DMA_WRITE.reply/libvfio-user".
    "VFIO_USER_DMA_WRITE.reply": (("address", 0, 8), ("count", 8, 4)),
    "VFIO_USER_DMA_WRITE.reply/libvfio-user": _DMA_ACCESS,
    "VFIO_USER_DEVICE_RESET.request": (),  # "Neither the request or reply have a payload."
    "VFIO_USER_DEVICE_RESET.reply": (),
    # -- the uAPI structures the specification reuses
    "vfio_device_info": _DEVICE_INFO,
    "vfio_region_info": _REGION_INFO,
    "vfio_irq_info": _IRQ_INFO,
    "vfio_irq_set": _IRQ_SET,
    # §VFIO cap header format (struct vfio_info_cap_header)
    "vfio_info_cap_header": (("id", 0, 2), ("version", 2, 2), ("next", 4, 4)),
    # §VFIO region info cap sparse mmap, literally: its offsets start after the cap header
    # (id, version, next), and the offset/size pair at 8 is the first of nr_areas areas ("...").
    "sparse_mmap_info": (("nr_areas", 0, 4), ("reserved", 4, 4), ("offset", 8, 8), ("size", 16, 8)),
    # The same capability as linux/vfio.h declares it (the specification names these structs):
    # struct vfio_region_info_cap_sparse_mmap {header; nr_areas; reserved; areas[]} -- the
    # specification's table shifted by the 8-byte cap header.
    "vfio_region_info_cap_sparse_mmap": (
        ("id", 0, 2), ("version", 2, 2), ("next", 4, 4),
        ("nr_areas", 8, 4), ("reserved", 12, 4), ("areas", 16, None),
    ),
    "vfio_region_sparse_mmap_area": (("offset", 0, 8), ("size", 8, 8)),
}

# The fixed size of each layout as a source states it, with where: the self-test checks every
# table adds up to this.  "table" means the source gives no number and the size is the table's
# last offset + size, checked only for contiguity.
STATED_SIZES: dict[str, tuple[int, str]] = {
    "header": (16, "§Header: 'preceded by a 16-byte header'"),
    "VFIO_USER_VERSION.request": (4, "table"),
    "VFIO_USER_VERSION.reply": (4, "table"),
    "VFIO_USER_DMA_MAP.request": (32, "§VFIO_USER_DMA_MAP: 'This structure is 32 bytes in size'"),
    "VFIO_USER_DMA_MAP.reply": (0, "§VFIO_USER_DMA_MAP: 'There is no payload in the reply message'"),
    "VFIO_USER_DMA_UNMAP.request": (24, "table"),
    "VFIO_USER_DMA_UNMAP.reply": (24, "table (the request's entry)"),
    "VFIO_USER_DEVICE_GET_INFO.request": (16, "table"),
    "VFIO_USER_DEVICE_GET_INFO.reply": (16, "§VFIO_USER_DEVICE_GET_INFO: '(16 bytes today)'"),
    "VFIO_USER_DEVICE_GET_REGION_INFO.request": (32, "linux/vfio.h struct vfio_region_info"),
    "VFIO_USER_DEVICE_GET_REGION_INFO.reply": (32, "linux/vfio.h struct vfio_region_info"),
    "VFIO_USER_DEVICE_GET_REGION_IO_FDS.request": (16, "table"),
    "VFIO_USER_DEVICE_GET_REGION_IO_FDS.reply": (16, "table"),
    "sub_region_ioeventfd": (40, "§GET_REGION_IO_FDS: 'currently this is 40 bytes for both IO FD types'"),
    "sub_region_ioregionfd": (40, "§GET_REGION_IO_FDS: 'currently this is 40 bytes for both IO FD types'"),
    "VFIO_USER_DEVICE_GET_IRQ_INFO.request": (16, "§GET_IRQ_INFO: '(16 bytes today)'"),
    "VFIO_USER_DEVICE_GET_IRQ_INFO.reply": (16, "§GET_IRQ_INFO: '(16 bytes today)'"),
    "VFIO_USER_DEVICE_SET_IRQS.request": (20, "linux/vfio.h: vfio_irq_set is a 20-byte header + data"),
    "VFIO_USER_DEVICE_SET_IRQS.reply": (0, "§SET_IRQS: 'There is no payload in the reply'"),
    "VFIO_USER_REGION_READ.request": (16, "table"),
    "VFIO_USER_REGION_READ.reply": (16, "table"),
    "VFIO_USER_REGION_WRITE.request": (16, "table"),
    "VFIO_USER_REGION_WRITE.reply": (16, "table"),
    "VFIO_USER_DMA_READ.request": (16, "table"),
    "VFIO_USER_DMA_READ.reply": (16, "table"),
    "VFIO_USER_DMA_WRITE.request": (16, "table"),
    "VFIO_USER_DMA_WRITE.reply": (12, "table (count is 4 bytes in this one table)"),
    "VFIO_USER_DMA_WRITE.reply/libvfio-user": (16, "libvfio-user struct vfio_user_dma_region_access"),
    "VFIO_USER_DEVICE_RESET.request": (0, "§VFIO_USER_DEVICE_RESET: 'Neither the request or reply have a payload'"),
    "VFIO_USER_DEVICE_RESET.reply": (0, "§VFIO_USER_DEVICE_RESET: 'Neither the request or reply have a payload'"),
    "vfio_device_info": (16, "§VFIO_USER_DEVICE_GET_INFO: '(16 bytes today)'"),
    "vfio_region_info": (32, "linux/vfio.h struct vfio_region_info"),
    "vfio_irq_info": (16, "linux/vfio.h struct vfio_irq_info"),
    "vfio_irq_set": (20, "linux/vfio.h: 20-byte header + data"),
    "vfio_info_cap_header": (8, "linux/vfio.h struct vfio_info_cap_header"),
    "sparse_mmap_info": (24, "table (one area)"),
    "vfio_region_info_cap_sparse_mmap": (16, "linux/vfio.h: header + nr_areas + reserved"),
    "vfio_region_sparse_mmap_area": (16, "linux/vfio.h struct vfio_region_sparse_mmap_area"),
}


def fixed_size(name: str) -> int:
    """The size of the layout's fixed part (everything before a variable trailing field)."""
    return sum(size for _, _, size in LAYOUTS[name] if size is not None)


def encode(message_name: str, **fields: int | bytes) -> bytes:
    """Pack ``fields`` by the named layout, little-endian.  A fixed field not given is 0 (the
    specification's "all other fields must be zero"); the variable trailing field, if the layout
    has one, is bytes (default empty).  An unknown field name is a ``KeyError``."""
    layout = LAYOUTS[message_name]
    names = {n for n, _, _ in layout}
    for k in fields:
        if k not in names:
            raise KeyError(f"{message_name} has no field {k!r} (fields: {sorted(names)})")
    out = bytearray(fixed_size(message_name))
    tail = b""
    for name, offset, size in layout:
        value = fields.get(name, 0 if size is not None else b"")
        if size is None:
            assert isinstance(value, (bytes, bytearray)), f"{name} is variable: give bytes"
            tail = bytes(value)
        else:
            assert isinstance(value, int), f"{name} is a {size}-byte integer"
            out[offset:offset + size] = value.to_bytes(size, "little")
    return bytes(out) + tail


def decode(message_name: str, data: bytes, *, allow_trailing: bool = False) -> dict[str, int | bytes]:
    """Unpack ``data`` by the named layout.  Shorter than the fixed part is a ``ValueError``; bytes
    past it go to the variable trailing field, or are a ``ValueError`` unless ``allow_trailing``."""
    layout = LAYOUTS[message_name]
    fixed = fixed_size(message_name)
    if len(data) < fixed:
        raise ValueError(f"{message_name}: {len(data)} bytes, the fixed part is {fixed}")
    out: dict[str, int | bytes] = {}
    has_tail = False
    for name, offset, size in layout:
        if size is None:
            out[name] = bytes(data[offset:])
            has_tail = True
        else:
            out[name] = int.from_bytes(data[offset:offset + size], "little")
    if not has_tail and len(data) > fixed and not allow_trailing:
        raise ValueError(f"{message_name}: {len(data)} bytes, the layout has exactly {fixed}")
    return out
