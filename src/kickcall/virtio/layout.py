"""Split virtqueue layout (virtio 1.2 section 2.7), defined once.

Every offset of a field in the three parts of a split virtqueue, little-endian::

    descriptor table  16 * N   {le64 addr; le32 len; le16 flags; le16 next} desc[N]     align 16
    available ring    6 + 2*N  {le16 flags; le16 idx; le16 ring[N]; le16 used_event}     align 2
    used ring         6 + 8*N  {le16 flags; le16 idx; {le32 id; le32 len} ring[N];
                                le16 avail_event}                                          align 4

(Linux ``include/uapi/linux/virtio_ring.h``: ``struct vring_desc``, ``vring_avail``,
``vring_used``, ``vring_used_event()``, ``vring_avail_event()``; QEMU ``hw/virtio/virtio.c``:
``VRingDesc``, ``VRingAvail``, ``VRingUsed``.)  ``used_event`` and ``avail_event`` exist with
VIRTIO_RING_F_EVENT_IDX only; the sizes below include them unless told otherwise, as QEMU and the
vhost-user back-ends map the rings.

Two views of the same layout:

* byte offsets and guest addresses (``*_addr``): for code that reads guest memory field by field
  (the monitors, qtest, diagnose);
* ``*_U16`` indices into a ``memoryview.cast("H")`` of a ring (``*_u16()`` for the fields that
  depend on the ring size): for the device's and the driver's hot paths, which read and write each
  index with one 16-bit access.  They are plain module constants so that a pop or a push costs a
  global load, not a function call; the size-dependent ones are computed once when a ring is
  mapped.
"""

from __future__ import annotations

import struct
from typing import Callable, Final

__all__ = [
    "read_ring_fields",
    "DESC", "USED_ELEM", "U16",
    "DESC_ALIGN", "AVAIL_ALIGN", "USED_ALIGN",
    "DESC_SIZE", "USED_ELEM_SIZE",
    "AVAIL_FLAGS", "AVAIL_IDX", "AVAIL_RING", "USED_FLAGS", "USED_IDX", "USED_RING",
    "AVAIL_FLAGS_U16", "AVAIL_IDX_U16", "AVAIL_RING_U16", "USED_FLAGS_U16", "USED_IDX_U16",
    "desc_table_size", "avail_size", "used_size",
    "desc_addr",
    "avail_flags_addr", "avail_idx_addr", "avail_ring_addr", "used_event_addr",
    "used_flags_addr", "used_idx_addr", "used_elem_addr", "avail_event_addr",
    "used_event_u16", "avail_event_u16",
]

DESC: Final = struct.Struct("<QIHH")
"""struct vring_desc: addr, len, flags, next."""
USED_ELEM: Final = struct.Struct("<II")
"""struct vring_used_elem: id, len."""
U16: Final = struct.Struct("<H")

# alignment the driver must give each part (virtio 1.2 2.7, "Virtqueue Alignment")
DESC_ALIGN: Final = 16
AVAIL_ALIGN: Final = 2
USED_ALIGN: Final = 4

DESC_SIZE: Final = 16  # == DESC.size
USED_ELEM_SIZE: Final = 8  # == USED_ELEM.size

# byte offsets inside the available ring
AVAIL_FLAGS: Final = 0
AVAIL_IDX: Final = 2
AVAIL_RING: Final = 4  # ring[0]; used_event follows ring[N-1]
# byte offsets inside the used ring
USED_FLAGS: Final = 0
USED_IDX: Final = 2
USED_RING: Final = 4  # ring[0]; avail_event follows ring[N-1]

# the same, as indices into a 16-bit view of the ring
AVAIL_FLAGS_U16: Final = AVAIL_FLAGS // 2
AVAIL_IDX_U16: Final = AVAIL_IDX // 2
AVAIL_RING_U16: Final = AVAIL_RING // 2  # avail.ring[i] is view[AVAIL_RING_U16 + i]
USED_FLAGS_U16: Final = USED_FLAGS // 2
USED_IDX_U16: Final = USED_IDX // 2


# -- sizes ----------------------------------------------------------------------------------------------
def desc_table_size(num: int) -> int:
    """Bytes of a descriptor table of *num* entries."""
    return DESC_SIZE * num


def avail_size(num: int, event_idx: bool = True) -> int:
    """Bytes of an available ring of *num* entries (with ``used_event`` unless *event_idx* is False)."""
    return AVAIL_RING + 2 * num + (2 if event_idx else 0)


def used_size(num: int, event_idx: bool = True) -> int:
    """Bytes of a used ring of *num* entries (with ``avail_event`` unless *event_idx* is False)."""
    return USED_RING + USED_ELEM_SIZE * num + (2 if event_idx else 0)


# -- descriptor table -----------------------------------------------------------------------------------
def desc_addr(desc: int, i: int) -> int:
    """Address (or offset, with *desc* an offset) of descriptor *i* of the table at *desc*."""
    return desc + DESC_SIZE * i


# -- available ring (written by the driver) ---------------------------------------------------------------
def avail_flags_addr(avail: int) -> int:
    return avail + AVAIL_FLAGS


def avail_idx_addr(avail: int) -> int:
    return avail + AVAIL_IDX


def avail_ring_addr(avail: int, i: int) -> int:
    """avail->ring[i] (*i* already reduced modulo the ring size)."""
    return avail + AVAIL_RING + 2 * i


def used_event_addr(avail: int, num: int) -> int:
    """``vring_used_event()``: avail->ring[num], the driver's used_event."""
    return avail_ring_addr(avail, num)


# -- used ring (written by the device) -------------------------------------------------------------------
def used_flags_addr(used: int) -> int:
    return used + USED_FLAGS


def used_idx_addr(used: int) -> int:
    return used + USED_IDX


def used_elem_addr(used: int, i: int) -> int:
    """used->ring[i], a ``{le32 id; le32 len}`` element (*i* already reduced modulo the ring size)."""
    return used + USED_RING + USED_ELEM_SIZE * i


def avail_event_addr(used: int, num: int) -> int:
    """``vring_avail_event()``: the 16 bits after used->ring[num - 1], the device's avail_event."""
    return used_elem_addr(used, num)


# -- size-dependent fields as 16-bit view indices (computed once per mapping) -----------------------------
def used_event_u16(num: int) -> int:
    """Index of used_event in a 16-bit view of an available ring of *num* entries."""
    return used_event_addr(0, num) // 2


def avail_event_u16(num: int) -> int:
    """Index of avail_event in a 16-bit view of a used ring of *num* entries."""
    return avail_event_addr(0, num) // 2


RING_FIELDS: Final = ("avail-idx", "used-idx-ring", "used-event", "avail-event", "avail-flags", "used-flags")


def backend_inuse(fields: dict[str, int | None], event_idx: bool) -> int | None:
    """Requests a vhost back-end holds, from the ring alone (*fields*: ``read_ring_fields``): with
    EVENT_IDX the back-end's position is its avail_event, so avail_event - used idx; without it
    the ring does not say (None).  Never GET_VRING_BASE, which stops the ring."""
    ae, ui = fields.get("avail-event"), fields.get("used-idx-ring")
    if not event_idx or ae is None or ui is None:
        return None
    return (ae - ui) & 0xFFFF


def read_ring_fields(read_u16: Callable[[int], int | None], avail: int, used: int, num: int,
                     mapped: bool = True) -> dict[str, int | None]:
    """What a split ring in guest memory says now, as the monitors report it: the driver's avail
    idx and flags and used_event, the device's used idx and flags and avail_event (each one 16-bit
    read through *read_u16*; all None when the ring is not *mapped*)."""
    if not mapped:
        return dict.fromkeys(RING_FIELDS)
    return {"avail-idx": read_u16(avail_idx_addr(avail)), "used-idx-ring": read_u16(used_idx_addr(used)),
            "used-event": read_u16(used_event_addr(avail, num)), "avail-event": read_u16(avail_event_addr(used, num)),
            "avail-flags": read_u16(avail_flags_addr(avail)), "used-flags": read_u16(used_flags_addr(used))}
