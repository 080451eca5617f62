"""Split virtqueue flags and feature bits, ``vring_need_event`` and the memory barriers of the
notification paths.

The layout (where each field lies) is defined once, in :mod:`kickcall.virtio.layout`; ``DESC``,
``USED_ELEM``, ``U16``, ``avail_size``, ``used_size`` and ``desc_size`` (``desc_table_size``) are
re-exported here for existing importers.

Barriers.  Python stores into guest RAM are plain stores; x86 keeps store->store and load->load
order, so publishing a ring entry before its index needs no fence there (``wmb``/``rmb`` are
named compiler-level barriers only).  Event-index suppression needs **store->load** order --
write used.idx then read used_event; write avail_event then re-read avail.idx -- which x86 does
*not* keep: a store can wait in the store buffer while a later load runs.  ``mb()`` is a real full
fence there: a ``lock cmpxchg`` executed by ``pthread_spin_trylock`` on a spinlock that is held
for ever (so it always fails, never spins and never needs an unlock).  Its cost is measured by
``kickcall bench notify``.
"""

from __future__ import annotations

import ctypes
import platform
import threading
import weakref

from .layout import DESC, U16, USED_ELEM, avail_size, used_size
from .layout import desc_table_size as desc_size

__all__ = [
    "VRING_DESC_F_NEXT", "VRING_DESC_F_WRITE", "VRING_DESC_F_INDIRECT",
    "VRING_AVAIL_F_NO_INTERRUPT", "VRING_USED_F_NO_NOTIFY",
    "VIRTIO_RING_F_INDIRECT_DESC", "VIRTIO_RING_F_EVENT_IDX", "VIRTIO_F_VERSION_1",
    "VIRTQUEUE_MAX_SIZE", "DESC", "USED_ELEM", "vring_need_event", "mb", "wmb", "rmb",
    "desc_size", "avail_size", "used_size", "U16", "MB_KIND",
]

VRING_DESC_F_NEXT = 1
VRING_DESC_F_WRITE = 2
VRING_DESC_F_INDIRECT = 4
VRING_AVAIL_F_NO_INTERRUPT = 1
VRING_USED_F_NO_NOTIFY = 1

VIRTIO_F_NOTIFY_ON_EMPTY = 24
VIRTIO_F_ANY_LAYOUT = 27
VIRTIO_RING_F_INDIRECT_DESC = 28
VIRTIO_RING_F_EVENT_IDX = 29
VIRTIO_F_VERSION_1 = 32
VIRTIO_F_ACCESS_PLATFORM = 33

VIRTQUEUE_MAX_SIZE = 1024

def vring_need_event(event_idx: int, new_idx: int, old: int) -> bool:
    """True if old <= event_idx < new (mod 2**16): the other side asked to be notified once the
    entry at *event_idx* was published, and that happened in this batch (old -> new)."""
    return ((new_idx - event_idx - 1) & 0xFFFF) < ((new_idx - old) & 0xFFFF)


def _release_spinlock(held: ctypes.c_int) -> None:
    """Called with the barrier's spinlock when the barrier is collected: nothing to undo (a held
    spinlock needs no unlock; its memory goes with the last reference, which this call drops)."""


def _make_mb():
    if platform.machine() in ("x86_64", "AMD64", "i686", "i386"):
        try:
            libc = ctypes.PyDLL(None)  # keeps the GIL: the call never blocks
            trylock = libc.pthread_spin_trylock
            trylock.argtypes = [ctypes.c_void_p]
            trylock.restype = ctypes.c_int
            held = ctypes.c_int(0)  # glibc x86: 1 = free, 0 = held; so trylock always fails
            if libc.pthread_spin_init(ctypes.byref(held), 0) != 0:
                raise OSError("pthread_spin_init failed")
            if trylock(ctypes.byref(held)) != 0:  # take it once, for ever
                raise OSError("could not take the barrier spinlock")
            addr = ctypes.addressof(held)

            def mb() -> None:
                """Full memory barrier (a locked cmpxchg)."""
                trylock(addr)

            # the spinlock must live as long as the barrier: the finalizer holds it until mb goes
            weakref.finalize(mb, _release_spinlock, held)
            return mb, "lock-cmpxchg"
        except (OSError, AttributeError):
            pass
    lock = threading.Lock()

    def mb_fallback() -> None:
        """Full memory barrier (an uncontended mutex round trip: atomic RMW with full fences)."""
        lock.acquire()
        lock.release()

    return mb_fallback, "mutex"


mb, MB_KIND = _make_mb()


def wmb() -> None:
    """Store->store barrier: x86 keeps store order, and CPython never reorders our stores."""


def rmb() -> None:
    """Load->load barrier: x86 keeps load order."""
