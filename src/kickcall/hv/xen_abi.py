"""Xen's public interface for pirqs and event channels: numbers, structures, the HVM MSI encoding.

Values follow Xen's public headers (MIT-licensed): ``xen/include/public/physdev.h``,
``event_channel.h``, ``xen.h`` (shared_info / vcpu_info), ``hvm/params.h``; the HVM MSI
encoding follows Linux's ``arch/x86/pci/xen.c`` (``xen_msi_compose_msg``) and Xen's
``hvm_inject_msi``.  The structures are the hypercalls' arguments with their IN and OUT fields:
a hypercall returns 0 or ``-errno`` and writes its OUT fields into the structure, as Xen's
``copy_to_guest`` does.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

__all__ = [
    "PhysdevOp", "EvtchnOp", "MapPirqType", "EvtchnStat", "DOMID_SELF", "NR_IRQS_GSI",
    "PhysdevMapPirq", "PhysdevUnmapPirq", "PhysdevGetFreePirq", "EvtchnBindPirq", "EvtchnBindIpi",
    "EvtchnClose", "EvtchnSend", "EvtchnUnmask", "EvtchnStatus", "compose_pirq_msi", "pirq_of_msi",
    "XEN_PIRQ_MSI_DATA", "SHARED_INFO_SIZE", "VCPU_INFO_SIZE", "EVTCHN_PENDING_OFF", "EVTCHN_MASK_OFF",
    "NR_EVENT_CHANNELS", "XEN_LEGACY_MAX_VCPUS", "HYPERVISOR_CALLBACK_VECTOR", "BIND_PIRQ_WILL_SHARE",
]


class PhysdevOp(enum.IntEnum):
    """``PHYSDEVOP_*`` (physdev.h)."""

    EOI = 12
    MAP_PIRQ = 13
    UNMAP_PIRQ = 14
    GET_FREE_PIRQ = 23


class EvtchnOp(enum.IntEnum):
    """``EVTCHNOP_*`` (event_channel.h)."""

    BIND_INTERDOMAIN = 0
    BIND_VIRQ = 1
    BIND_PIRQ = 2
    CLOSE = 3
    SEND = 4
    STATUS = 5
    ALLOC_UNBOUND = 6
    BIND_IPI = 7
    BIND_VCPU = 8
    UNMASK = 9
    RESET = 10


class MapPirqType(enum.IntEnum):
    """``MAP_PIRQ_TYPE_*`` (physdev.h)."""

    MSI = 0x0
    GSI = 0x1
    UNKNOWN = 0x2
    MSI_SEG = 0x3
    MULTI_MSI = 0x4


class EvtchnStat(enum.IntEnum):
    """``EVTCHNSTAT_*``: what ``EVTCHNOP_status`` says a port is."""

    CLOSED = 0
    UNBOUND = 1
    INTERDOMAIN = 2
    PIRQ = 3
    VIRQ = 4
    IPI = 5


DOMID_SELF = 0x7FF0
BIND_PIRQ_WILL_SHARE = 1
#: pirqs below this are GSIs (Xen's nr_irqs_gsi; kickcall's IOAPIC has 24 pins): MSI pirqs are
#: handed out top-down from ``nr_pirqs - 1`` to here
NR_IRQS_GSI = 24

# -- shared_info (xen.h, x86, 2-level event channels) --------------------------------------------
XEN_LEGACY_MAX_VCPUS = 32
VCPU_INFO_SIZE = 64  # evtchn_upcall_pending u8 @0, evtchn_upcall_mask u8 @1, evtchn_pending_sel u64 @8
VCPU_UPCALL_PENDING_OFF = 0
VCPU_UPCALL_MASK_OFF = 1
VCPU_PENDING_SEL_OFF = 8
EVTCHN_PENDING_OFF = XEN_LEGACY_MAX_VCPUS * VCPU_INFO_SIZE  # xen_ulong_t evtchn_pending[64]
EVTCHN_MASK_OFF = EVTCHN_PENDING_OFF + 64 * 8  # xen_ulong_t evtchn_mask[64]
NR_EVENT_CHANNELS = 64 * 64  # 2-level ABI on a 64-bit guest
SHARED_INFO_SIZE = 4096
#: the vector the upcall is injected on (HVM_PARAM_CALLBACK_IRQ, type vector; Linux uses 0xf3)
HYPERVISOR_CALLBACK_VECTOR = 0xF3

# -- the HVM MSI encoding (arch/x86/pci/xen.c) ------------------------------------------------------
_MSI_ADDR_BASE_LO = 0xFEE00000
_MSI_ADDR_DEST_ID_SHIFT = 12
_MSI_DATA_LEVEL_ASSERT = 1 << 14
_MSI_DATA_DELIVERY_MODE_3 = 3 << 8
#: edge, assert, delivery mode 3, vector 0: "the vector is irrelevant, set up a pirq"
XEN_PIRQ_MSI_DATA = _MSI_DATA_LEVEL_ASSERT | _MSI_DATA_DELIVERY_MODE_3


def compose_pirq_msi(pirq: int) -> tuple[int, int]:
    """The MSI message (64-bit address, data) a Linux HVM guest writes to ask for *pirq*
    (``xen_msi_compose_msg``): pirq bits 7:0 in the destination id, bits 31:8 in address_hi."""
    lo = _MSI_ADDR_BASE_LO | ((pirq & 0xFF) << _MSI_ADDR_DEST_ID_SHIFT)
    hi = pirq & 0xFFFFFF00
    return hi << 32 | lo, XEN_PIRQ_MSI_DATA


def pirq_of_msi(address: int, data: int) -> int | None:
    """The pirq an MSI message names (Xen's ``hvm_inject_msi`` / QEMU's ``msi_msix_setup``):
    a message whose vector is 0 carries one in its destination ids; None otherwise (a vector
    message for the LAPIC), and None for pirq 0 (unassigned)."""
    if data & 0xFF:
        return None
    pirq = ((address >> 32) & 0xFFFFFF00) | ((address >> _MSI_ADDR_DEST_ID_SHIFT) & 0xFF)
    return pirq or None


# -- hypercall arguments ----------------------------------------------------------------------------
@dataclass
class PhysdevMapPirq:
    """``struct physdev_map_pirq``; *pirq* IN (-1: any) and OUT."""

    domid: int
    type: int
    index: int = -1
    pirq: int = -1
    bus: int = 0
    devfn: int = 0
    entry_nr: int = 0
    table_base: int = 0


@dataclass
class PhysdevUnmapPirq:
    domid: int
    pirq: int


@dataclass
class PhysdevGetFreePirq:
    type: int
    pirq: int = 0  # OUT


@dataclass
class EvtchnBindPirq:
    pirq: int
    flags: int = 0
    port: int = 0  # OUT


@dataclass
class EvtchnBindIpi:
    vcpu: int = 0
    port: int = 0  # OUT


@dataclass
class EvtchnClose:
    port: int


@dataclass
class EvtchnSend:
    port: int


@dataclass
class EvtchnUnmask:
    port: int


@dataclass
class EvtchnStatus:
    port: int
    dom: int = DOMID_SELF
    status: int = 0  # OUT: EvtchnStat
    vcpu: int = 0  # OUT
    pirq: int = 0  # OUT (status PIRQ)
