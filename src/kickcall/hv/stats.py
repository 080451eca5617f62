"""The hypervisor's counters, in a memfd page shared by the VMM and the guest process.

Like KVM's binary stats fd: the kernel side (in the guest process) writes them where the event
happens -- a vCPU's exits, an ioeventfd hit with the PID and TID of the writer, an irqfd
injection -- and the VMM reads them without asking anyone and without disturbing anything.
Each counter has a single writer (a vCPU its own row, the ioeventfd table under its lock, the
interrupt controller under its lock), so plain u64 stores suffice.
"""

from __future__ import annotations

import mmap
import os

__all__ = ["HvStats", "VCPU_FIELDS", "IOEVENTFD_FIELDS", "GSI_FIELDS", "GLOBAL_FIELDS"]

MAGIC = 0x6B69636B63616C6C  # "kickcall"
VERSION = 1
MAX_VCPUS = 64  # + 1 row for interrupt context
MAX_IOEVENTFDS = 1024
MAX_GSI = 4096

GLOBAL_FIELDS = (
    "irqfd_injections", "msi_injections", "irq_line_changes", "no_route_drops", "bad_msi_drops",
    "irqfd_dropped", "ioeventfd_writes", "ioeventfd_dropped", "mmio_exits", "pio_exits",
    "interrupts_delivered", "interrupts_held_while_paused",
    # an MSI delivered to a local APIC (KVM's path; under Xen only a message with a vector takes it)
    "msi_lapic_deliveries",
    # the Xen flavour (hv/xen.py)
    "xen_evtchn_set_pending", "xen_evtchn_pending_masked", "xen_upcalls", "xen_pirq_events",
    "xen_emulated_msis", "xen_pirq_drops",
)
VCPU_FIELDS = (
    "mmio_write_exits", "mmio_read_exits", "pio_write_exits", "pio_read_exits", "ioeventfd_writes",
    "halts", "pauses", "interrupts", "last_pid", "last_tid", "exit_ns_total",
)
IOEVENTFD_FIELDS = ("hits", "dropped", "last_pid", "last_tid", "last_ns", "last_value", "in_use")
GSI_FIELDS = ("injections", "dropped")

_HDR_WORDS = 8
_GLOBAL_WORDS = 32
_VCPU_WORDS = 16
_IOE_WORDS = 8
_GSI_WORDS = 2

_OFF_GLOBAL = _HDR_WORDS
_OFF_VCPU = _OFF_GLOBAL + _GLOBAL_WORDS
_OFF_IOE = _OFF_VCPU + (MAX_VCPUS + 1) * _VCPU_WORDS
_OFF_GSI = _OFF_IOE + MAX_IOEVENTFDS * _IOE_WORDS
_TOTAL_WORDS = _OFF_GSI + MAX_GSI * _GSI_WORDS
SIZE = _TOTAL_WORDS * 8

_G = {n: i for i, n in enumerate(GLOBAL_FIELDS)}
_V = {n: i for i, n in enumerate(VCPU_FIELDS)}
_I = {n: i for i, n in enumerate(IOEVENTFD_FIELDS)}
_S = {n: i for i, n in enumerate(GSI_FIELDS)}


class HvStats:
    """Typed access to the shared counter page."""

    def __init__(self, fd: int | None = None) -> None:
        create = fd is None
        if fd is None:
            fd = os.memfd_create("kickcall-hv-stats", os.MFD_CLOEXEC)
            os.ftruncate(fd, SIZE)
        self.fd: int = fd
        self._mm = mmap.mmap(fd, SIZE, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        self.w = memoryview(self._mm).cast("Q")
        if create:
            self.w[0] = MAGIC
            self.w[1] = VERSION
            self.w[2] = MAX_VCPUS
            self.w[3] = MAX_IOEVENTFDS
            self.w[4] = MAX_GSI
        elif self.w[0] != MAGIC or self.w[1] != VERSION:
            self.close()
            raise ValueError("not a kickcall hypervisor stats page")

    def close(self) -> None:
        if self.w is not None:
            self.w.release()
            self.w = None  # type: ignore[assignment]
            self._mm.close()
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    # -- indices (the writers use these with ``w[...] += 1``) -------------------------------------
    @staticmethod
    def g(name: str) -> int:
        return _OFF_GLOBAL + _G[name]

    @staticmethod
    def v(cpu: int, name: str) -> int:
        if not 0 <= cpu <= MAX_VCPUS:
            raise IndexError(cpu)
        return _OFF_VCPU + cpu * _VCPU_WORDS + _V[name]

    @staticmethod
    def i(slot: int, name: str) -> int:
        return _OFF_IOE + slot * _IOE_WORDS + _I[name]

    @staticmethod
    def s(gsi: int, name: str) -> int:
        return _OFF_GSI + gsi * _GSI_WORDS + _S[name]

    # -- readers --------------------------------------------------------------------------------
    def globals(self) -> dict[str, int]:
        """The global counters.  ``mmio_exits`` and ``pio_exits`` are the sums of the vCPUs' own
        rows (read and write exits; the interrupt-context row included): each exit is counted
        once, where it happens, by its vCPU."""
        out = {n: self.w[self.g(n)] for n in GLOBAL_FIELDS}
        rows = range(MAX_VCPUS + 1)
        out["mmio_exits"] = sum(self.w[self.v(c, "mmio_write_exits")] + self.w[self.v(c, "mmio_read_exits")]
                                for c in rows)
        out["pio_exits"] = sum(self.w[self.v(c, "pio_write_exits")] + self.w[self.v(c, "pio_read_exits")]
                               for c in rows)
        return out

    def vcpu(self, cpu: int) -> dict[str, int]:
        return {n: self.w[self.v(cpu, n)] for n in VCPU_FIELDS}

    def ioeventfd(self, slot: int) -> dict[str, int]:
        return {n: self.w[self.i(slot, n)] for n in IOEVENTFD_FIELDS}

    def gsi(self, gsi: int) -> dict[str, int]:
        return {n: self.w[self.s(gsi, n)] for n in GSI_FIELDS}

    def reset_ioeventfd_slot(self, slot: int) -> None:
        for n in IOEVENTFD_FIELDS:
            self.w[self.i(slot, n)] = 0
