"""What ``kickcall diagnose`` is talking to, and the only queries it may send there.

A monitor is identified from what it says unasked or when asked something harmless: the QMP
greeting, ``query-version`` and ``query-commands``.  From then on every command (and every HMP
line passed through ``human-monitor-command``) goes through a :class:`GuardedMonitor` that sends
only what :data:`ALLOWED` lists for that kind of target -- each entry with the reason it cannot
change what it observes.  The table is printed in docs/diagnose.md; a test checks the two agree
and a recording proxy checks diagnose's traffic against the documented table.

The one query that must never reach QEMU for a vhost device is ``x-query-virtio-queue-status``:
QEMU answers it for a started vhost device with ``vhost_get_vring_base``, i.e. a GET_VRING_BASE
to the back-end, which stops the ring (the guest's I/O hangs).  Whether a device is a vhost device
is decided by its QOM type, never by its state at query time (the guest can start the ring between
two queries); a type kickcall does not know to be emulated-only is treated as vhost.
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass
from typing import Any, Protocol

from ..faults import PROCESS

__all__ = ["TargetKind", "TargetInfo", "AllowedQuery", "ALLOWED", "HANDSHAKE", "EMULATED_ONLY_TYPES",
           "is_vhost_type", "identify", "GuardedMonitor", "ForbiddenQuery", "allowed_table",
           "FORBID_VHOST_QUEUE_STATUS"]

# the fix of issue 8: never x-query-virtio-queue-status on a QEMU vhost device.  Off (tests only):
# diagnose queries every device the same way again, as it used to -- and stops vhost rings.
FORBID_VHOST_QUEUE_STATUS = PROCESS.switch(
    "forbid-vhost-queue-status", "off: diagnose sends x-query-virtio-queue-status to QEMU's vhost devices too, "
    "which stops their vhost rings")


class TargetKind(enum.Enum):
    KICKCALL_MACHINE = "kickcall-machine"  # kickcall run --qmp
    KICKCALL_BACKEND = "kickcall-backend"  # kickcall vhost-user-blk --qmp
    QEMU = "qemu"  # a QEMU system emulator with the virtio queries (7.2 and later)
    QEMU_WITHOUT_VIRTIO_QUERIES = "qemu-without-virtio-queries"  # older than 7.2
    QEMU_STORAGE_DAEMON = "qemu-storage-daemon"
    UNKNOWN = "unknown"


class Proto(Protocol):
    def execute(self, command: str, arguments: dict | None = None) -> Any: ...


@dataclass(frozen=True)
class AllowedQuery:
    command: str
    reason: str
    hmp: str | None = None  # human-monitor-command: the full command line must match this regex
    argument: tuple[str, str] | None = None  # (name, value) the command is only allowed with
    emulated_only: bool = False  # only on a device whose QOM type is emulated-only (never vhost)
    fix_only: bool = False  # only with --fix


@dataclass(frozen=True)
class TargetInfo:
    kind: TargetKind
    version: str  # "7.2.22", "kickcall 0.8.0", ...
    package: str
    major_minor: tuple[int, int] | None


# sent to every monitor before it is identified: they read and change nothing
HANDSHAKE = (
    AllowedQuery("qmp_capabilities", "leaves negotiation mode (every QMP client sends it first)"),
    AllowedQuery("query-version", "returns the version the greeting already announced"),
    AllowedQuery("query-commands", "lists the commands the monitor accepts"),
)

_XP = r"xp /[1-9][0-9]{0,2}h[xu] 0x[0-9a-f]{1,16}"

_KICKCALL_COMMON = (
    AllowedQuery("query-status", "the run state"),
    AllowedQuery("x-query-virtio", "lists virtio devices"),
    AllowedQuery("x-query-virtio-status", "a device's status and features, from fields kickcall keeps"),
    AllowedQuery("x-query-virtio-queue-status", "kickcall's implementation reads the ring with single 16-bit "
                  "loads and never sends GET_VRING_BASE"),
    AllowedQuery("x-query-device-notifiers", "eventfd counters read from /proc/self/fdinfo, never by read()"),
    AllowedQuery("x-debug-device-event", "with --fix only: injects the one kick or call a verdict names "
                 "(refused on a stopped ring; never past a guest's mask without --force)", fix_only=True),
)

ALLOWED: dict[TargetKind, tuple[AllowedQuery, ...]] = {
    TargetKind.KICKCALL_MACHINE: _KICKCALL_COMMON + (
        AllowedQuery("x-query-pci-msix", "the MSI-X table, masks and PBA as the device model holds them; for a "
                     "passthrough function also the host's view: its triggers, eventfd counters read from fdinfo, the "
                     "hypervisor's per-GSI counts read from its stats page"),
        AllowedQuery("query-pci", "lists the PCI functions from the device models' copies of their config space (no "
                     "config cycle reaches a device or a vfio-user server)"),
        AllowedQuery("x-query-vfio", "a passthrough function's IRQ wiring, SET_IRQS counts and limits, from fields "
                     "the VMM keeps (no message to the vfio-user server)"),
        AllowedQuery("x-query-xen-pirqs", "a Xen domain's pirq table read by the hypervisor's query (no hypercall "
                     "is made) joined with the pirqs the device models' MSI-X entries name and map"),
        AllowedQuery("x-query-pci-aer", "a PCIe function's AER registers from the device model's copy of its config "
                     "space, the VMM's error events and the ERR eventfd's counter read from fdinfo (no message to "
                     "the vfio-user server, nothing consumed)"),
    ),
    TargetKind.KICKCALL_BACKEND: _KICKCALL_COMMON + (
        AllowedQuery("x-query-virtio-vhost-queue-status", "the ring addresses the front-end sent (to join a "
                     "back-end's queue with QEMU's by address); read from the back-end's own fields"),
    ),
    TargetKind.QEMU: (
        AllowedQuery("query-status", "the run state (running, paused, ...)"),
        AllowedQuery("x-query-virtio", "lists virtio devices (path and name)"),
        AllowedQuery("qom-get", "only the `type` property: the device's QOM type decides whether it is a vhost "
                     "device (a plain string getter)", argument=("property", "type")),
        AllowedQuery("x-query-virtio-status", "copies fields of the VirtIODevice (and of its vhost_dev): no "
                     "message to a back-end"),
        AllowedQuery("x-query-virtio-vhost-queue-status", "copies fields of the vhost_virtqueue (fds, addresses, "
                     "size): no message to a back-end"),
        AllowedQuery("x-query-virtio-queue-status", "only on emulated devices (QOM type known to have no vhost "
                     "back-end): for a vhost device QEMU sends GET_VRING_BASE, which stops the ring",
                     emulated_only=True),
        AllowedQuery("human-monitor-command", "`info mtree -f`: prints QEMU's flat memory map, so that xp only "
                     "ever reads guest RAM (xp on a device register is a real MMIO read: it can clear an ISR)",
                     hmp=r"info mtree -f"),
        AllowedQuery("human-monitor-command", "only `xp /Nhx ADDR` (N <= 999) inside guest RAM: reads the rings' "
                     "idx, flags, used_event and avail_event without writing them", hmp=_XP),
    ),
    TargetKind.QEMU_WITHOUT_VIRTIO_QUERIES: (
        AllowedQuery("query-status", "the run state"),
    ),
    TargetKind.QEMU_STORAGE_DAEMON: (
        AllowedQuery("query-block-exports", "lists the exports (vhost-user-blk among them)"),
    ),
    TargetKind.UNKNOWN: (),
}

# QOM types whose rings QEMU itself runs (no vhost variant of the same type exists): the only
# devices on which x-query-virtio-queue-status is sent.  virtio-net-device (vhost=on netdevs,
# vhost-user, vhost-vdpa) and virtio-crypto-device (cryptodev-vhost-user) are not here: QEMU does
# not say over QMP which back-end a netdev or cryptodev has.
EMULATED_ONLY_TYPES = frozenset({
    "virtio-blk-device", "virtio-scsi-device", "virtio-serial-device", "virtio-rng-device",
    "virtio-balloon-device", "virtio-9p-device", "virtio-gpu-device", "virtio-keyboard-device",
    "virtio-mouse-device", "virtio-tablet-device", "virtio-iommu-device", "virtio-mem", "virtio-pmem",
})


def is_vhost_type(qom_type: str | None) -> bool:
    """True unless the type is known to be emulated by QEMU alone (unknown counts as vhost)."""
    return qom_type not in EMULATED_ONLY_TYPES


class ForbiddenQuery(RuntimeError):
    """diagnose tried to send something its table does not allow there: a bug, never sent."""


def _version(v: Any) -> tuple[str, str, tuple[int, int] | None]:
    if not isinstance(v, dict):
        return "?", "", None
    q: dict = v["qemu"] if isinstance(v.get("qemu"), dict) else {}
    pkg: str = v["package"] if isinstance(v.get("package"), str) else ""
    try:
        mm = (int(q["major"]), int(q["minor"]))
        ver = f"{q['major']}.{q['minor']}.{q.get('micro', 0)}"
    except (KeyError, TypeError, ValueError):
        mm, ver = None, "?"
    return ver, pkg.strip(), mm


def identify(greeting: dict, version: Any, commands: Any) -> TargetInfo:
    """The kind of monitor, from its greeting, query-version and query-commands replies."""
    names = {c.get("name") for c in commands if isinstance(c, dict)} if isinstance(commands, list) else set()
    ver, pkg, mm = _version(version if isinstance(version, dict) else greeting.get("version"))
    if pkg.startswith("kickcall"):
        kind = TargetKind.KICKCALL_BACKEND if "x-query-vhost-user-backend" in names else TargetKind.KICKCALL_MACHINE
        return TargetInfo(kind, pkg, pkg, mm)
    if "query-status" in names:
        kind = TargetKind.QEMU if "x-query-virtio" in names else TargetKind.QEMU_WITHOUT_VIRTIO_QUERIES
        return TargetInfo(kind, ver, pkg, mm)
    if "query-block-exports" in names:
        return TargetInfo(TargetKind.QEMU_STORAGE_DAEMON, ver, pkg, mm)
    return TargetInfo(TargetKind.UNKNOWN, ver, pkg, mm)


class GuardedMonitor:
    """A monitor that sends only what :data:`ALLOWED` lists for its target kind.

    ``vhost_paths`` and ``emulated_paths`` hold what diagnose learnt of each device's QOM type; a
    query marked ``emulated_only`` goes only to a path in ``emulated_paths``."""

    def __init__(self, mon: Proto, kind: TargetKind, *, fix: bool = False) -> None:
        self.mon = mon
        self.kind = kind
        self.fix = fix
        self.emulated_paths: set[str] = set()
        self.sent: list[tuple[str, dict | None]] = []

    def allowed(self, command: str, arguments: dict | None) -> AllowedQuery | None:
        for q in HANDSHAKE + ALLOWED.get(self.kind, ()):
            if q.command != command:
                continue
            if q.fix_only and not self.fix:
                continue
            args = arguments or {}
            if q.argument is not None and args.get(q.argument[0]) != q.argument[1]:
                continue
            if q.hmp is not None and not re.fullmatch(q.hmp, str(args.get("command-line", ""))):
                continue
            if q.emulated_only and FORBID_VHOST_QUEUE_STATUS.fix_on and args.get("path") not in self.emulated_paths:
                continue
            return q
        return None

    def execute(self, command: str, arguments: dict | None = None) -> Any:
        if self.allowed(command, arguments) is None:
            raise ForbiddenQuery(f"diagnose does not send {command} {arguments or ''} to a {self.kind.value} monitor")
        self.sent.append((command, arguments))
        return self.mon.execute(command, arguments)


def allowed_table() -> str:
    """The per-target table of docs/diagnose.md (Markdown), generated from :data:`ALLOWED`."""
    rows = ["| target | command | only | why it changes nothing |", "|---|---|---|---|"]
    for q in HANDSHAKE:
        rows.append(f"| every monitor | `{q.command}` | | {q.reason} |")
    for kind, queries in ALLOWED.items():
        for q in queries:
            only = []
            if q.argument:
                only.append(f"`{q.argument[0]}={q.argument[1]}`")
            if q.hmp:
                only.append(f"HMP line matching `{q.hmp}`")
            if q.emulated_only:
                only.append("emulated devices")
            if q.fix_only:
                only.append("`--fix`")
            rows.append(f"| {kind.value} | `{q.command}` | {', '.join(only)} | {q.reason} |")
    return "\n".join(rows)
