"""MSI-X: the capability, the vector table and the Pending Bit Array in a BAR.

Semantics (PCI spec, as QEMU's hw/pci/msix.c implements them):

* a vector is masked when MSI-X is disabled, the function is masked (MASKALL), or its entry's
  Vector Control mask bit is set; all vectors come out of reset masked;
* ``notify(v)`` (``msix_notify``) on a masked vector sets its PBA bit and sends nothing;
  on an unmasked vector it sends the entry's message; it says which (``MsixNotifyOutcome``);
* unmasking a vector whose PBA bit is set sends exactly one message and clears the bit;
* the PBA is read-only to the guest; reading it first runs the *poll* notifier so that calls
  parked in eventfds (irqfd masked) show up as pending bits;
* vector use counts: a vector nobody uses is not signalled; dropping the last use clears its
  pending bit;
* vector notifiers (``set_vector_notifiers``): told when a used vector becomes masked or
  unmasked (this is where irqfds are deassigned and reassigned).
"""

from __future__ import annotations

import logging
import struct
from enum import StrEnum
from typing import TYPE_CHECKING, Callable

from ..memory import IORegion
from .. import trace
from . import regs as R

if TYPE_CHECKING:
    from .device import PCIDevice

__all__ = ["MSIX", "MsixNotifyOutcome"]

log = logging.getLogger("kickcall.pci.msix")

_t_notify = trace.event("msix_notify", "a device asked for a vector's interrupt")
_t_pend = trace.event("msix_set_pending", "a call on a masked vector set its PBA bit")
_t_unmask_deliver = trace.event("msix_unmask_deliver_pending", "unmask delivered a pending vector")
_t_mask = trace.event("msix_mask_update", "a vector's effective mask changed")
_t_write = trace.event("msix_write_config", "MSI-X control written")


class MsixNotifyOutcome(StrEnum):
    """What ``MSIX.notify`` (QEMU's ``msix_notify``) did with a call.

    Only ``SENT`` and ``PENDED`` keep the call: the message went out, or its pending bit waits for
    the unmask.  The others drop it, as ``msix_notify`` does (a vector out of range or not in use,
    MSI-X disabled).  A ``SENT`` message still goes through the bus, which drops it while Bus Master
    is off (``PCIBus.msi_send``; in QEMU the write to the disabled bus-master address space)."""

    SENT = "sent"
    PENDED = "pended"
    UNUSED = "unused"
    DISABLED = "disabled"
    INVALID = "invalid"

    @property
    def delivered(self) -> bool:
        """The call is not lost: sent, or parked in the PBA."""
        return self in (MsixNotifyOutcome.SENT, MsixNotifyOutcome.PENDED)


class MSIX:
    """MSI-X state of one PCI function; table at offset 0 and PBA at ``pba_offset`` of its BAR."""

    def __init__(self, dev: "PCIDevice", nvectors: int, bar_index: int, *,
                 table_offset: int = 0, pba_offset: int = 0x800) -> None:
        if not 1 <= nvectors <= 2048:
            raise ValueError("MSI-X supports 1..2048 vectors")
        table_size = nvectors * R.PCI_MSIX_ENTRY_SIZE
        pba_size = ((nvectors + 63) // 64) * 8
        if table_offset % 8 or pba_offset % 8:
            raise ValueError("MSI-X table and PBA offsets must be 8-byte aligned")
        if table_offset < pba_offset + pba_size and pba_offset < table_offset + table_size:
            raise ValueError("MSI-X table and PBA overlap")
        bar_size = 4096
        while bar_size < max(table_offset + table_size, pba_offset + pba_size):
            bar_size *= 2
        self.dev = dev
        self.nvectors = nvectors
        self.table_offset = table_offset
        self.pba_offset = pba_offset
        self.table = bytearray(table_size)
        self.pba = bytearray(pba_size)
        self.use_count = [0] * nvectors
        self.region = IORegion(f"{dev.name}-msix", bar_size, self._bar_read, self._bar_write)
        dev.register_bar(bar_index, self.region)
        self.cap = dev.add_capability(R.PCI_CAP_ID_MSIX, R.PCI_CAP_MSIX_SIZEOF)
        dev.set_config(self.cap + R.PCI_MSIX_FLAGS, nvectors - 1, 2,
                       wmask=R.PCI_MSIX_FLAGS_MASKALL | R.PCI_MSIX_FLAGS_ENABLE)
        dev.set_config(self.cap + R.PCI_MSIX_TABLE, table_offset | bar_index, 4)
        dev.set_config(self.cap + R.PCI_MSIX_PBA, pba_offset | bar_index, 4)
        dev.msix = self
        self._unmask_cb: Callable[[int, int, int], None] | None = None
        self._mask_cb: Callable[[int], None] | None = None
        self._poll_cb: Callable[[int, int], None] | None = None
        # counters, per vector
        self.notifies = [0] * nvectors
        self.sent = [0] * nvectors
        self.pended = [0] * nvectors
        self.unmask_delivered = [0] * nvectors
        self.unused_drops = 0
        self.disabled_drops = 0
        # The spec's rule: unmasking a vector with its pending bit set sends the message once.
        # Switchable only so that tests can show what breaks without it.
        self.deliver_pending_on_unmask = True
        self._mask_all_entries()

    # -- state ----------------------------------------------------------------------------------
    @property
    def control(self) -> int:
        return self.dev.get16(self.cap + R.PCI_MSIX_FLAGS)

    @property
    def enabled(self) -> bool:
        return bool(self.control & R.PCI_MSIX_FLAGS_ENABLE)

    @property
    def function_masked(self) -> bool:
        c = self.control
        return not (c & R.PCI_MSIX_FLAGS_ENABLE) or bool(c & R.PCI_MSIX_FLAGS_MASKALL)

    def entry_masked(self, v: int) -> bool:
        off = v * R.PCI_MSIX_ENTRY_SIZE + R.PCI_MSIX_ENTRY_VECTOR_CTRL
        return bool(self.table[off] & R.PCI_MSIX_ENTRY_CTRL_MASKBIT)

    def is_masked(self, v: int) -> bool:
        return self.function_masked or self.entry_masked(v)

    def get_message(self, v: int) -> tuple[int, int]:
        lo, hi, data = struct.unpack_from("<III", self.table, v * R.PCI_MSIX_ENTRY_SIZE)
        return (hi << 32) | lo, data

    def is_pending(self, v: int) -> bool:
        return bool(self.pba[v // 8] & (1 << (v % 8)))

    def set_pending(self, v: int) -> None:
        """Mark *v* pending (a call found parked in an eventfd while the vector was masked)."""
        if 0 <= v < self.nvectors and self.use_count[v]:
            self._set_pending(v)
            self.pended[v] += 1

    def _set_pending(self, v: int) -> None:
        self.pba[v // 8] |= 1 << (v % 8)

    def _clr_pending(self, v: int) -> None:
        self.pba[v // 8] &= ~(1 << (v % 8)) & 0xFF

    def _mask_all_entries(self) -> None:
        for v in range(self.nvectors):
            self.table[v * R.PCI_MSIX_ENTRY_SIZE + R.PCI_MSIX_ENTRY_VECTOR_CTRL] |= R.PCI_MSIX_ENTRY_CTRL_MASKBIT

    # -- vector use -------------------------------------------------------------------------------
    def vector_use(self, v: int) -> bool:
        if not 0 <= v < self.nvectors:
            return False
        self.use_count[v] += 1
        return True

    def vector_unuse(self, v: int) -> None:
        if not 0 <= v < self.nvectors or not self.use_count[v]:
            return
        self.use_count[v] -= 1
        if not self.use_count[v]:
            self._clr_pending(v)

    def set_vector_notifiers(self, unmask: Callable[[int, int, int], None] | None,
                             mask: Callable[[int], None] | None,
                             poll: Callable[[int, int], None] | None) -> None:
        """unmask(v, address, data), mask(v), poll(first, end): the owner's per-vector hooks."""
        self._unmask_cb, self._mask_cb, self._poll_cb = unmask, mask, poll

    # -- signalling -----------------------------------------------------------------------------
    def notify(self, v: int) -> MsixNotifyOutcome:
        """msix_notify: send vector *v*, or set its pending bit if masked.  Returns what happened.
        Big lock held (VMM)."""
        if not 0 <= v < self.nvectors:
            return MsixNotifyOutcome.INVALID
        self.notifies[v] += 1
        if _t_notify.enabled:
            _t_notify.emit(dev=self.dev.name, vector=v, masked=self.is_masked(v))
        if not self.enabled:
            self.disabled_drops += 1
            return MsixNotifyOutcome.DISABLED
        if not self.use_count[v]:
            self.unused_drops += 1
            return MsixNotifyOutcome.UNUSED
        if self.is_masked(v):
            self._set_pending(v)
            self.pended[v] += 1
            if _t_pend.enabled:
                _t_pend.emit(dev=self.dev.name, vector=v)
            return MsixNotifyOutcome.PENDED
        self._send(v)
        return MsixNotifyOutcome.SENT

    def _send(self, v: int) -> None:
        addr, data = self.get_message(v)
        self.sent[v] += 1
        self.dev.msi_send(addr, data)

    # -- mask transitions -------------------------------------------------------------------------------
    def snapshot_masks(self) -> list[bool]:
        return [self.is_masked(v) for v in range(self.nvectors)]

    def _handle_mask_update(self, v: int, was_masked: bool) -> None:
        is_masked = self.is_masked(v)
        if is_masked == was_masked:
            return
        if _t_mask.enabled:
            _t_mask.emit(dev=self.dev.name, vector=v, masked=is_masked)
        if self.use_count[v]:
            if is_masked and self._mask_cb is not None:
                self._mask_cb(v)
            elif not is_masked and self._unmask_cb is not None:
                addr, data = self.get_message(v)
                self._unmask_cb(v, addr, data)
        if not is_masked and self.is_pending(v) and self.deliver_pending_on_unmask:
            self._clr_pending(v)
            self.unmask_delivered[v] += 1
            if _t_unmask_deliver.enabled:
                _t_unmask_deliver.emit(dev=self.dev.name, vector=v)
            self._send(v)

    def config_written(self, addr: int, size: int, was: list[bool]) -> None:
        """After a config write: react if MSI-X control changed."""
        ctl = self.cap + R.PCI_MSIX_FLAGS
        if not (addr < ctl + 2 and ctl < addr + size):
            return
        if _t_write.enabled:
            _t_write.emit(dev=self.dev.name, control=self.control)
        for v in range(self.nvectors):
            self._handle_mask_update(v, was[v])

    def before_config_read(self) -> None:
        pass

    # -- the BAR ---------------------------------------------------------------------------------------
    def _bar_read(self, off: int, size: int) -> int:
        t0, t1 = self.table_offset, self.table_offset + len(self.table)
        p0, p1 = self.pba_offset, self.pba_offset + len(self.pba)
        if t0 <= off and off + size <= t1:
            return int.from_bytes(self.table[off - t0:off - t0 + size], "little")
        if p0 <= off and off + size <= p1:
            first = (off - p0) * 8
            if self._poll_cb is not None:
                self._poll_cb(first, min(first + size * 8, self.nvectors))
            return int.from_bytes(self.pba[off - p0:off - p0 + size], "little")
        return 0

    def _bar_write(self, off: int, value: int, size: int) -> None:
        t0 = self.table_offset
        if not (t0 <= off and off + size <= t0 + len(self.table)):
            return  # the PBA and the rest of the BAR are read-only
        rel = off - t0
        first = rel // R.PCI_MSIX_ENTRY_SIZE
        last = (rel + size - 1) // R.PCI_MSIX_ENTRY_SIZE
        was = {v: self.is_masked(v) for v in range(first, last + 1)}
        self.table[rel:rel + size] = value.to_bytes(size, "little")
        for v in range(first, last + 1):
            self._handle_mask_update(v, was[v])

    def reset(self) -> None:
        """msix_reset: disable, clear table and PBA, mask every vector."""
        was = self.snapshot_masks()
        self.dev.set_config(self.cap + R.PCI_MSIX_FLAGS, self.nvectors - 1, 2)
        self.table[:] = bytes(len(self.table))
        self.pba[:] = bytes(len(self.pba))
        self._mask_all_entries()
        for v in range(self.nvectors):
            self._handle_mask_update(v, was[v])

    def describe(self) -> dict:
        entries = []
        for v in range(self.nvectors):
            addr, data = self.get_message(v)
            entries.append({
                "vector": v, "address": addr, "data": data, "masked": self.entry_masked(v),
                "pending": self.is_pending(v), "use-count": self.use_count[v],
                "notifies": self.notifies[v], "sent": self.sent[v], "pended": self.pended[v],
                "unmask-delivered": self.unmask_delivered[v],
            })
        return {"enabled": self.enabled, "function-masked": bool(self.control & R.PCI_MSIX_FLAGS_MASKALL),
                "table-size": self.nvectors, "entries": entries}
