"""The ioeventfd table, with KVM's semantics (virt/kvm/eventfd.c, described, not copied).

* length must be 0, 1, 2, 4 or 8; ``addr + length`` must not wrap; length 0 with a datamatch is
  refused (EINVAL);
* a registration collides (EEXIST) with one on the same bus and address when either has length 0,
  or both have the same length and either is a wildcard or both match the same data;
* a write matches an entry when the address is equal and either the entry's length is 0 (any
  width) or the width is equal and the entry is a wildcard or the value equals the datamatch --
  a write of another width does not match a non-zero length;
* a match signals the eventfd (a lightweight exit: the vCPU carries on at once);
* deassign identifies the entry by bus, address, length, eventfd and datamatch; ENOENT otherwise.

The table lock is held across the lookup and the eventfd write, so once ``deassign`` has
returned no vCPU can still be writing the old eventfd (KVM gets this from SRCU).
"""

from __future__ import annotations

import errno
import os
import threading
from dataclasses import dataclass, field
from typing import Callable

from .abi import IOEVENTFD_LENGTHS, SPACE_MMIO, SPACE_PIO, HypervisorError

__all__ = ["Ioeventfd", "IoeventfdTable"]


@dataclass(eq=False)
class Ioeventfd:
    space: str
    addr: int
    length: int
    datamatch: int | None  # None = wildcard
    fd: int
    ident: int  # eventfd identity (eventfd-id), the same in every process
    slot: int  # index into the shared stats page
    hits: int = 0
    dropped: int = 0
    drop_next: int = 0  # fault injection: swallow the next N matched writes
    drop_all: bool = False
    meta: dict = field(default_factory=dict)

    @property
    def wildcard(self) -> bool:
        return self.datamatch is None

    def describe(self) -> dict:
        d = {"space": self.space, "addr": self.addr, "length": self.length,
             "ident": self.ident, "slot": self.slot, "hits": self.hits, "dropped": self.dropped}
        if self.datamatch is not None:
            d["datamatch"] = self.datamatch
        return d


class IoeventfdTable:
    """(space, addr) -> ioeventfds; thread-safe; KVM's collision and match rules."""

    def __init__(self, max_entries: int = 1024,
                 on_hit: Callable[[Ioeventfd, int, bool], None] | None = None) -> None:
        self._mu = threading.Lock()
        self._by_addr: dict[tuple[str, int], list[Ioeventfd]] = {}
        self._free_slots = list(range(max_entries - 1, -1, -1))
        self._on_hit = on_hit
        self.max_entries = max_entries

    # -- registration --------------------------------------------------------------------------
    @staticmethod
    def validate(space: str, addr: int, length: int, datamatch: int | None) -> None:
        if space not in (SPACE_MMIO, SPACE_PIO):
            raise HypervisorError(errno.EINVAL, f"unknown address space {space!r}")
        if length not in IOEVENTFD_LENGTHS:
            raise HypervisorError(errno.EINVAL, f"ioeventfd length {length} is not 0, 1, 2, 4 or 8")
        if addr < 0 or addr + length > (1 << 64) - 1:
            raise HypervisorError(errno.EINVAL, f"ioeventfd range {addr:#x}+{length} wraps")
        if space == SPACE_PIO and addr + length > 0x10000:
            raise HypervisorError(errno.EINVAL, f"PIO address {addr:#x} is beyond the 64 KiB port space")
        if length == 0 and datamatch is not None:
            raise HypervisorError(errno.EINVAL, "an ioeventfd with length 0 cannot have a datamatch")
        if datamatch is not None and length and datamatch >> (8 * length):
            raise HypervisorError(errno.EINVAL, f"datamatch {datamatch:#x} wider than {length} bytes")

    def assign(self, space: str, addr: int, length: int, datamatch: int | None, fd: int,
               ident: int) -> Ioeventfd:
        self.validate(space, addr, length, datamatch)
        with self._mu:
            for p in self._by_addr.get((space, addr), ()):
                if (not p.length or not length or
                        (p.length == length and (p.wildcard or datamatch is None or
                                                 p.datamatch == datamatch))):
                    raise HypervisorError(
                        errno.EEXIST,
                        f"ioeventfd {space} {addr:#x} len {length} collides with len {p.length}"
                        + ("" if p.wildcard else f" datamatch {p.datamatch:#x}"))
            if not self._free_slots:
                raise HypervisorError(errno.ENOSPC, f"ioeventfd table full ({self.max_entries})")
            e = Ioeventfd(space, addr, length, datamatch, fd, ident, self._free_slots.pop())
            self._by_addr.setdefault((space, addr), []).append(e)
            return e

    def deassign(self, space: str, addr: int, length: int, datamatch: int | None,
                 ident: int) -> Ioeventfd:
        with self._mu:
            lst = self._by_addr.get((space, addr), [])
            for i, p in enumerate(lst):
                if p.ident == ident and p.length == length and p.datamatch == datamatch:
                    del lst[i]
                    if not lst:
                        del self._by_addr[(space, addr)]
                    self._free_slots.append(p.slot)
                    return p
        raise HypervisorError(errno.ENOENT, f"no ioeventfd {space} {addr:#x} len {length} for that eventfd")

    def entries(self) -> list[Ioeventfd]:
        with self._mu:
            return [e for lst in self._by_addr.values() for e in lst]

    def find(self, space: str, addr: int) -> list[Ioeventfd]:
        with self._mu:
            return list(self._by_addr.get((space, addr), ()))

    # -- the vCPU's write -----------------------------------------------------------------------
    def write(self, space: str, addr: int, size: int, value: int) -> Ioeventfd | None:
        """A guest write of *size* bytes; signal the matching eventfd and return its entry.

        Returns None when no ioeventfd matches (the caller takes a heavyweight exit).
        """
        mu = self._mu
        mu.acquire()
        try:
            lst = self._by_addr.get((space, addr))
            if not lst:
                return None
            for p in lst:
                if p.length and (p.length != size or (p.datamatch is not None and p.datamatch != value)):
                    continue
                dropped = p.drop_all or p.drop_next > 0
                if dropped:
                    if p.drop_next:
                        p.drop_next -= 1
                    p.dropped += 1
                else:
                    os.eventfd_write(p.fd, 1)
                p.hits += 1
                if self._on_hit is not None:
                    self._on_hit(p, value, dropped)
                return p
            return None
        finally:
            mu.release()
