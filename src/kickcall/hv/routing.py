"""GSI routing (KVM_SET_GSI_ROUTING) and x86 MSI message decoding.

GSIs 0..23 are the IOAPIC pins (IRQCHIP routes, for INTx); MSI routes take any GSI up to the route
limit (``KVM_MAX_IRQ_ROUTES`` = 4096 by default).  ``set_gsi_routing`` replaces the whole table, as
KVM's ioctl does, and refuses a table larger than the limit with a clear error.
"""

from __future__ import annotations

import errno
import threading
from dataclasses import dataclass

from .abi import KVM_MAX_IRQ_ROUTES, NR_IOAPIC_PINS, HypervisorError

__all__ = ["MsiRoute", "IrqchipRoute", "GsiRouting", "decode_msi", "msi_address", "BadMsi"]

MSI_ADDR_BASE = 0xFEE00000
MSI_ADDR_MASK = 0xFFF00000


class BadMsi(ValueError):
    pass


def msi_address(dest_apic_id: int) -> int:
    """The x86 MSI address targeting local APIC *dest_apic_id* (physical destination mode)."""
    return MSI_ADDR_BASE | ((dest_apic_id & 0xFF) << 12)


def decode_msi(address: int, data: int) -> tuple[int, int]:
    """(destination APIC id, vector) of an x86 MSI message; BadMsi if it is not one."""
    if (address & MSI_ADDR_MASK) != MSI_ADDR_BASE or address >> 32:
        raise BadMsi(f"MSI address {address:#x} is not in the 0xfee00000 window")
    vector = data & 0xFF
    mode = (data >> 8) & 0x7
    if mode not in (0, 1):  # fixed, lowest priority
        raise BadMsi(f"MSI delivery mode {mode} not supported")
    if vector < 16:
        raise BadMsi(f"MSI vector {vector} is reserved")
    return (address >> 12) & 0xFF, vector


@dataclass(frozen=True)
class MsiRoute:
    gsi: int
    address: int
    data: int

    def to_json(self) -> dict:
        return {"gsi": self.gsi, "type": "msi", "address": self.address, "data": self.data}


@dataclass(frozen=True)
class IrqchipRoute:
    gsi: int
    pin: int

    def to_json(self) -> dict:
        return {"gsi": self.gsi, "type": "irqchip", "pin": self.pin}


Route = MsiRoute | IrqchipRoute


def route_from_json(d: dict) -> Route:
    t = d.get("type")
    if t == "msi":
        return MsiRoute(int(d["gsi"]), int(d["address"]), int(d["data"]))
    if t == "irqchip":
        return IrqchipRoute(int(d["gsi"]), int(d["pin"]))
    raise HypervisorError(errno.EINVAL, f"unknown route type {t!r}")


class GsiRouting:
    """The kernel's routing table: GSI -> route."""

    def __init__(self, max_routes: int = KVM_MAX_IRQ_ROUTES) -> None:
        self.max_routes = max_routes
        self._mu = threading.Lock()
        self._routes: dict[int, Route] = {
            pin: IrqchipRoute(pin, pin) for pin in range(NR_IOAPIC_PINS)
        }

    def set(self, routes: list[Route]) -> None:
        if len(routes) > self.max_routes:
            raise HypervisorError(
                errno.EINVAL,
                f"{len(routes)} GSI routes exceed the limit of {self.max_routes} (KVM_MAX_IRQ_ROUTES)")
        table: dict[int, Route] = {}
        for r in routes:
            if not 0 <= r.gsi < self.max_routes:
                raise HypervisorError(errno.EINVAL, f"GSI {r.gsi} outside 0..{self.max_routes - 1}")
            if isinstance(r, IrqchipRoute) and not 0 <= r.pin < NR_IOAPIC_PINS:
                raise HypervisorError(errno.EINVAL, f"IOAPIC pin {r.pin} does not exist")
            if r.gsi in table:
                raise HypervisorError(errno.EINVAL, f"GSI {r.gsi} routed twice")
            table[r.gsi] = r
        with self._mu:
            self._routes = table

    def lookup(self, gsi: int) -> Route | None:
        with self._mu:
            return self._routes.get(gsi)

    def routes(self) -> list[Route]:
        with self._mu:
            return sorted(self._routes.values(), key=lambda r: r.gsi)

    def __len__(self) -> int:
        with self._mu:
            return len(self._routes)
