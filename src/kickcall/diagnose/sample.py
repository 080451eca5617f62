"""Samples of a monitor's view of every virtqueue, taken with queries that change nothing.

Two samplers fill the same :class:`QueueSample` fields, so one set of rules judges both:

* :class:`Sampler` (a kickcall machine or back-end): ``x-query-virtio-queue-status`` carries the
  ring as read from guest memory, the device's position and the ring's lifecycle;
  ``x-query-device-notifiers`` the eventfd counters; ``x-query-pci-msix`` (a machine) the vector.
  A machine's passthrough (vfio-user) functions, found with ``query-pci`` and ``x-query-vfio``, are
  sampled per MSI-X vector (:class:`VectorSample`): where the host's trigger points, both eventfds'
  counters (peeked), the guest's mask and PBA bit, and the hypervisor's injection and drop counts
  for the vector's irqfd -- all from ``x-query-pci-msix``.
* :class:`QemuSampler` (QEMU 7.2 and later): the device's QOM type decides how a queue is read.
  An emulated device answers ``x-query-virtio-queue-status`` (QEMU's own ring state); a vhost
  device never gets that query (it would stop the ring) -- its ring addresses come from
  ``x-query-virtio-vhost-queue-status``.  The driver's side of either (avail.idx, used.idx,
  used_event, avail_event, flags) is read from guest memory with HMP ``xp``.  QEMU exposes no
  notifier counters and no MSI-X state: those stay unknown.

The fault injector's state is never asked for: a fault is found from its effects, as a real bug
would be.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, field
from typing import Any, Protocol

from ..virtio.layout import avail_event_addr, used_event_addr
from . import targets
from .targets import is_vhost_type

__all__ = ["QueueSample", "VectorSample", "DeviceSample", "Sample", "Sampler", "QemuSampler", "Monitor", "parse_xp",
           "SampleError", "UnknownSelection", "parse_mtree_ram"]


class Monitor(Protocol):
    """What a sampler needs of a QMP client (kickcall.monitor.client.QMPClient has it)."""

    def execute(self, command: str, arguments: dict | None = None) -> Any: ...


class UnknownSelection(LookupError):
    """--dev or --queue names nothing the target has."""


class SampleError(RuntimeError):
    """The target answered something a sample cannot be made of."""


# ring and notifier fields that say where a queue stands; any change between two samples is progress
STATE_FIELDS = ("avail-idx", "last-avail-idx", "used-idx", "used-idx-ring", "used-event", "avail-event",
                "avail-flags", "used-flags", "inuse", "kicks", "calls", "ring-state", "kick-fd", "call-fd")
NOTIFIER_FIELDS = ("pending", "total", "sets", "writes", "consumed")


@dataclass
class QueueSample:
    queue: int
    status: dict  # the ring as seen: avail-idx, last-avail-idx, used-idx-ring, used-event, ... (see STATE_FIELDS)
    notifiers: list[dict] = field(default_factory=list)  # this queue's notifiers (kickcall targets)
    vector: int | None = None
    msix_entry: dict | None = None  # the vector's MSI-X entry (None: no MSI-X view)
    function_masked: bool | None = None
    unknown: list[str] = field(default_factory=list)  # what this target does not expose
    source: list[str] = field(default_factory=list)  # where the fields came from (for the evidence)

    def key(self) -> str:
        """Everything that moves when the queue makes progress (or its notifiers fire)."""
        ring = tuple(self.status.get(k) for k in STATE_FIELDS)
        nots = tuple(sorted((str(n.get("role")), str(n.get("id")), tuple(str(n.get(k)) for k in NOTIFIER_FIELDS))
                            for n in self.notifiers if isinstance(n, dict)))
        msix = None
        if self.msix_entry is not None:
            msix = (self.msix_entry.get("masked"), self.msix_entry.get("pending"), self.msix_entry.get("sent"),
                    self.msix_entry.get("pended"), self.function_masked)
        return repr((ring, nots, msix))

    def notifier(self, role: str) -> dict | None:
        for n in self.notifiers:
            if isinstance(n, dict) and n.get("role") == role:
                return n
        return None

    def ring_addresses(self) -> tuple | None:
        """(desc, avail, used) as the front-end's user addresses (the vhost-user join key)."""
        a = self.status.get("x-user-addresses")
        if isinstance(a, list | tuple) and len(a) == 3 and all(_num(x) is not None for x in a):
            return tuple(a)
        return None


# a passthrough vector's fields (VectorSample.status): where it stands; any change is movement
VECTOR_FIELDS = ("guest-msix-enabled", "host-msix-enabled", "use", "trigger", "gsi", "masked", "function-masked",
                 "pending", "irqfd-pending", "interrupt-pending", "userspace-interrupts", "injections", "dropped",
                 "fatal", "pirq", "pirq-conflict", "aer-state")


@dataclass
class VectorSample(QueueSample):
    """One MSI-X vector of a passthrough function (``queue`` is the vector number; ``status``
    holds :data:`VECTOR_FIELDS`)."""

    def key(self) -> str:
        return repr(tuple(repr(self.status.get(k)) for k in VECTOR_FIELDS))


@dataclass
class DeviceSample:
    path: str
    name: str
    statuses: list[str] | None  # None: this target does not know the driver's status
    queues: list[QueueSample]  # a passthrough function: its MSI-X vectors (VectorSample)
    msix_enabled: bool | None = None
    qom_type: str = ""
    vhost: bool = False
    passthrough: bool = False  # a vfio-user function (its "queues" are MSI-X vectors)


@dataclass
class Sample:
    time: float
    run_state: str
    devices: dict[str, DeviceSample]


def _safe(mon: Monitor, cmd: str, args: dict | None = None) -> Any:
    from ..monitor.client import QMPCommandError

    try:
        return mon.execute(cmd, args)
    except QMPCommandError:
        return None


def _num(v: object) -> int | None:
    return v if isinstance(v, int) and not isinstance(v, bool) else None


def _select(devs: Any, dev: str | None) -> list[dict]:
    out = [d for d in devs if isinstance(d, dict) and isinstance(d.get("path"), str)] if isinstance(devs, list) else []
    if dev is not None:
        out = [d for d in out if dev == d["path"] or dev in d["path"].strip("/").split("/")]
    return out


def _statuses(vs: dict) -> list[str]:
    st = vs.get("status")
    lst = st.get("statuses") if isinstance(st, dict) else None
    return [str(x) for x in lst] if isinstance(lst, list) else []


def _last_aer_event(aer: dict | None) -> dict | None:
    """The VMM's last PCIe error event for the function (``x-query-pci-aer`` ``events``)."""
    evs = aer.get("events") if aer is not None else None
    if isinstance(evs, list) and evs and isinstance(evs[-1], dict):
        return {k: evs[-1].get(k) for k in ("severity", "action", "errors", "uncor-status")}
    return None


class Sampler:
    """Takes samples of every (or the selected) virtio device of one kickcall monitor."""

    def __init__(self, mon: Monitor, *, dev: str | None = None, queue: int | None = None) -> None:
        self.mon = mon
        self.dev = dev
        self.queue = queue
        self.addresses = False  # a back-end: ask for the ring's user addresses (the join key)

    def devices(self) -> list[dict]:
        return _select(self.mon.execute("x-query-virtio") or [], self.dev)

    def passthrough(self) -> dict[str, DeviceSample]:
        """The machine's passthrough functions (the PCI devices that answer ``x-query-vfio``), one
        :class:`VectorSample` per MSI-X vector the guest or the host has used."""
        out: dict[str, DeviceSample] = {}
        pci = _safe(self.mon, "query-pci")
        ids = [d.get("qdev_id") for bus in pci if isinstance(bus, dict) and isinstance(bus.get("devices"), list)
               for d in bus["devices"] if isinstance(d, dict)] if isinstance(pci, list) else []
        vfs: dict[str, dict] = {}
        for dev in ids:
            if not isinstance(dev, str) or not dev:
                continue
            vf = _safe(self.mon, "x-query-vfio", {"dev": dev})
            if isinstance(vf, dict):  # (anything else: not a passthrough function)
                vfs[dev] = vf
        conflicts: list[dict] = []
        if any(isinstance(vf.get("xen"), dict) and vf["xen"].get("enabled") for vf in vfs.values()):
            xen = _safe(self.mon, "x-query-xen-pirqs")  # asked only of a Xen domain
            if isinstance(xen, dict) and isinstance(xen.get("conflicts"), list):
                conflicts = [c for c in xen["conflicts"] if isinstance(c, dict)]
        for dev, vf in vfs.items():
            msix = _safe(self.mon, "x-query-pci-msix", {"dev": dev})
            aer = _safe(self.mon, "x-query-pci-aer", {"dev": dev})
            out[dev] = DeviceSample(dev, "vfio-user-pci", None,
                                    self._vectors(vf, msix, dev, conflicts, aer if isinstance(aer, dict) else None),
                                    bool(msix.get("enabled")) if isinstance(msix, dict) else None, passthrough=True)
        return out

    @staticmethod
    def _conflict(conflicts: list[dict], dev: str, v: int) -> dict | None:
        """The pirq conflict (``x-query-xen-pirqs``) that names *dev*'s vector *v*, if any."""
        for c in conflicts:
            claims = c.get("claims")
            if isinstance(claims, list) and any(isinstance(x, dict) and x.get("device") == dev and
                                                x.get("vector") == v for x in claims):
                return {"pirq": c.get("pirq"), "text": str(c.get("text", "")),
                        "claims": [x for x in claims if isinstance(x, dict)]}
        return None

    def _vectors(self, vf: dict, msix: Any, dev: str = "", conflicts: list[dict] | None = None,
                 aer: dict | None = None) -> list[QueueSample]:
        if not isinstance(msix, dict) or not isinstance(msix.get("host"), dict):
            return []
        host = msix["host"]
        ents = msix.get("entries")
        entries: list = ents if isinstance(ents, list) else []
        fatal = vf.get("fatal") if isinstance(vf.get("fatal"), dict) else None
        out: list[QueueSample] = []
        for hv in host.get("vectors") or []:
            if not isinstance(hv, dict) or _num(hv.get("vector")) is None:
                continue
            v = hv["vector"]
            if self.queue is not None and v != self.queue:
                continue
            e = entries[v] if v < len(entries) and isinstance(entries[v], dict) else {}
            irqfd: dict = hv["irqfd"] if isinstance(hv.get("irqfd"), dict) else {}
            intr: dict = hv["interrupt"] if isinstance(hv.get("interrupt"), dict) else {}
            hyp = hv.get("hypervisor") if isinstance(hv.get("hypervisor"), dict) else None
            st = {"guest-msix-enabled": msix.get("enabled"), "host-msix-enabled": host.get("enabled"),
                  "use": hv.get("use"), "trigger": hv.get("trigger"), "gsi": hv.get("gsi"),
                  "masked": e.get("masked"), "function-masked": msix.get("function-masked"),
                  "pending": e.get("pending"), "irqfd-pending": irqfd.get("pending"),
                  "interrupt-pending": intr.get("pending"), "userspace-interrupts": hv.get("userspace-interrupts"),
                  "injections": hyp.get("injections") if hyp else None,
                  "dropped": hyp.get("dropped") if hyp else None,
                  "fatal": fatal if fatal is not None and fatal.get("vector") == v else None,
                  "path": host.get("path"), "pirq": hv.get("pirq"),
                  "pirq-conflict": self._conflict(conflicts or [], dev, v),
                  "aer-state": aer.get("state") if aer is not None else None,
                  "aer-last": _last_aer_event(aer)}
            unknown = ["whether the guest's driver has work waiting on this vector (device-specific: the records in "
                       "guest memory and the device's consumer register, which diagnose does not read)",
                       "the host function's side (which interrupts it raised): the vfio-user server's own monitor has "
                       "it, diagnose does not join it"]
            if hyp is None:
                unknown.append("the hypervisor's injection and drop counts for this vector (no irqfd bound to it)")
            out.append(VectorSample(v, st, unknown=unknown, source=[
                "the machine's x-query-pci-msix (the guest's table and PBA, the host's trigger, eventfd counters "
                "peeked, the hypervisor's per-GSI counts) and x-query-vfio"]))
        return out

    def sample(self) -> Sample:
        st = self.mon.execute("query-status") or {}
        out: dict[str, DeviceSample] = {} if self.addresses else self.passthrough()
        for d in self.devices():
            path = d["path"]
            if path.strip("/").split("/")[-1] in out:
                continue  # a passthrough function (listed by a monitor that lists every device)
            vs = _safe(self.mon, "x-query-virtio-status", {"path": path})
            vs = vs if isinstance(vs, dict) else {}
            nvqs = _num(vs.get("num-vqs")) or 0
            statuses: list[str] | None = _statuses(vs)
            if self.addresses:  # a back-end sees no driver status (only what it set itself: NEEDS_RESET)
                statuses = [x for x in statuses or [] if "NEEDS_RESET" in x] or None
            nots = _safe(self.mon, "x-query-device-notifiers", {"dev": path}) or []
            nots = [n for n in nots if isinstance(n, dict)] if isinstance(nots, list) else []
            msix = None if self.addresses else _safe(self.mon, "x-query-pci-msix", {"dev": path})
            queues = []
            for q in range(min(nvqs, 1024)):
                if self.queue is not None and q != self.queue:
                    continue
                qs = _safe(self.mon, "x-query-virtio-queue-status", {"path": path, "queue": q})
                if not isinstance(qs, dict):
                    continue
                qs = {k: v for k, v in qs.items() if not k.startswith("x-") or k == "x-injected"}
                if self.addresses:
                    vq = _safe(self.mon, "x-query-virtio-vhost-queue-status", {"path": path, "queue": q})
                    if isinstance(vq, dict) and all(_num(vq.get(k)) is not None for k in ("desc", "avail", "used")):
                        qs["x-user-addresses"] = [vq["desc"], vq["avail"], vq["used"]]
                s = QueueSample(q, qs, [n for n in nots if n.get("queue") == q],
                                source=["the monitor's x-query-virtio-queue-status (ring read from guest memory)"])
                vec = qs.get("vector")
                if isinstance(vec, int) and vec != 0xFFFF:
                    s.vector = vec
                if isinstance(msix, dict) and msix.get("enabled") and s.vector is not None:
                    ents = msix.get("entries") or []
                    if isinstance(ents, list) and s.vector < len(ents) and isinstance(ents[s.vector], dict):
                        s.msix_entry = ents[s.vector]
                        s.function_masked = bool(msix.get("function-masked"))
                queues.append(s)
            out[path] = DeviceSample(path, str(d.get("name", "?")), statuses, queues,
                                     None if not isinstance(msix, dict) else bool(msix.get("enabled")),
                                     vhost=self.addresses)
        status = st.get("status") if isinstance(st, dict) else None
        return Sample(time.monotonic(), status if isinstance(status, str) else "unknown", out)


_XP_VALUE = re.compile(r"0x([0-9a-fA-F]+)")


def parse_xp(text: Any, count: int) -> list[int] | None:
    """The values of an HMP ``xp /Nhx ADDR`` reply ("0000000000001000: 0x0001 0x0002\\r\\n"), or
    None when QEMU could not read the address (its reply then carries no value)."""
    if not isinstance(text, str):
        return None
    vals: list[int] = []
    for line in text.splitlines():
        if ":" not in line:
            continue
        _addr, _, rest = line.partition(":")
        vals.extend(int(m.group(1), 16) for m in _XP_VALUE.finditer(rest))
    return vals[:count] if len(vals) >= count else None


_MTREE_RANGE = re.compile(r"^\s*([0-9a-fA-F]+)-([0-9a-fA-F]+) \(prio -?\d+, ram\)")


def parse_mtree_ram(text: Any) -> list[tuple[int, int]]:
    """The RAM ranges ([start, end)) of the flat view of address space "memory" in HMP
    ``info mtree -f`` output; empty when the text is not that."""
    if not isinstance(text, str):
        return []
    out: list[tuple[int, int]] = []
    for view in text.split("FlatView")[1:]:
        lines = view.splitlines()
        if not any(ln.strip().startswith('AS "memory"') for ln in lines):
            continue
        for ln in lines:
            m = _MTREE_RANGE.match(ln)
            if m:
                lo, hi = int(m.group(1), 16), int(m.group(2), 16) + 1
                if out and out[-1][1] == lo:
                    out[-1] = (out[-1][0], hi)
                else:
                    out.append((lo, hi))
        break
    return out


def _has_feature(vs: dict, name: str) -> bool | None:
    gf = vs.get("guest-features")
    if not isinstance(gf, dict):
        return None
    for k in ("transports", "dev-features"):
        lst = gf.get(k)
        if isinstance(lst, list) and any(isinstance(x, str) and x.split(":")[0].strip() == name for x in lst):
            return True
    return False


QEMU_UNKNOWN = ["notifier counters (QEMU exposes no eventfd state over QMP)",
                "MSI-X masks and pending bits (QEMU has no MSI-X query)"]


class QemuSampler:
    """Samples of QEMU's virtio devices, taken so that no query reaches a vhost back-end."""

    def __init__(self, mon: Monitor, *, dev: str | None = None, queue: int | None = None,
                 emulated_paths: set[str] | None = None) -> None:
        self.mon = mon
        self.dev = dev
        self.queue = queue
        self.types: dict[str, str] = {}  # path -> QOM type (learnt once: a device's type never changes)
        self._ram: list[tuple[int, int]] | None = None
        self.outside_ram = 0  # ring reads refused: the address was not guest RAM
        self.emulated_paths = emulated_paths if emulated_paths is not None else set()

    def _type(self, path: str) -> str:
        """The device's QOM type, asked in every sample: a device can be unplugged and another plugged
        under the same id between two rounds of --watch (and a cached "emulated" would then send
        x-query-virtio-queue-status to a vhost device)."""
        t = _safe(self.mon, "qom-get", {"path": path, "property": "type"})
        self.types[path] = t if isinstance(t, str) else ""
        if is_vhost_type(self.types[path]):
            self.emulated_paths.discard(path)
        else:
            self.emulated_paths.add(path)
        return self.types[path]

    def ram(self) -> list[tuple[int, int]]:
        """Guest RAM as QEMU's flat memory map lists it ([start, end) ranges), read once."""
        if self._ram is None:
            self._ram = parse_mtree_ram(_safe(self.mon, "human-monitor-command", {"command-line": "info mtree -f"}))
        return self._ram

    def _xp(self, addr: int, count: int) -> list[int] | None:
        """*count* 16-bit words at guest-physical *addr* -- only inside guest RAM: xp on a device
        register is a real MMIO read (it can clear an ISR), and a ring address is the guest's to set."""
        end = addr + 2 * count
        if not any(lo <= addr and end <= hi for lo, hi in self.ram()):
            self.outside_ram += 1
            return None
        out = _safe(self.mon, "human-monitor-command", {"command-line": f"xp /{count}hx {addr:#x}"})
        return parse_xp(out, count)

    def _memory(self, desc_avail_used: tuple[int, ...], num: int) -> dict:
        """The driver's and the device's indices in guest memory (None where unreadable)."""
        _desc, avail, used = desc_avail_used
        # the device's side first: read later, the driver's avail.idx is never behind the used.idx
        # read (the reads are separate HMP commands, and the rings move between them)
        none: list[int | None] = [None, None]
        u: list[int] | list[int | None] = self._xp(used, 2) or none
        ae = self._xp(avail_event_addr(used, num), 1) if num else None
        a: list[int] | list[int | None] = self._xp(avail, 2) or none
        ue = self._xp(used_event_addr(avail, num), 1) if num else None
        out: dict[str, object] = {"avail-flags": a[0], "avail-idx": a[1], "used-flags": u[0], "used-idx-ring": u[1],
               "used-event": ue[0] if ue else None, "avail-event": ae[0] if ae else None}
        if a[1] is None or u[1] is None:
            out["x-unread-reason"] = ("QEMU's memory map could not be read, so guest memory is not read" if not self.ram()
                                      else "the ring lies outside guest RAM: not read (xp there would be a device "
                                      "access)")
        return out

    def sample(self) -> Sample:
        st = self.mon.execute("query-status") or {}
        out: dict[str, DeviceSample] = {}
        devs = _select(self.mon.execute("x-query-virtio") or [], self.dev)
        present = {d["path"] for d in devs}
        for gone in set(self.types) - present:
            del self.types[gone]
            self.emulated_paths.discard(gone)
        for d in devs:
            path = d["path"]
            qtype = self._type(path)
            # (the switch off: every device is queried as if QEMU ran its ring -- what diagnose used to do)
            vhost = is_vhost_type(qtype) and targets.FORBID_VHOST_QUEUE_STATUS.fix_on
            vs = _safe(self.mon, "x-query-virtio-status", {"path": path}) or {}
            if not isinstance(vs, dict):
                vs = {}
            statuses = _statuses(vs)
            nvqs = _num(vs.get("num-vqs")) or 0
            event_idx = _has_feature(vs, "VIRTIO_RING_F_EVENT_IDX")
            queues = []
            for q in range(min(nvqs, 1024)):
                if self.queue is not None and q != self.queue:
                    continue
                s = self._vhost_queue(path, q, vs) if vhost else self._emulated_queue(path, q)
                if s is None:
                    continue
                s.status["event-idx"] = bool(event_idx)
                # a vhost-user back-end (libvhost-user, QEMU's, kickcall's) writes avail_event as it takes
                # buffers; kernel vhost only when it re-enables notifications
                s.status["x-avail-event-tracks"] = qtype.startswith("vhost-user-")
                s.unknown = list(QEMU_UNKNOWN)
                queues.append(s)
            out[path] = DeviceSample(path, str(d.get("name", "?")), statuses, queues, None, qtype, vhost)
        status = st.get("status") if isinstance(st, dict) else None
        return Sample(time.monotonic(), status if isinstance(status, str) else "unknown", out)

    def _emulated_queue(self, path: str, q: int) -> QueueSample | None:
        qs = _safe(self.mon, "x-query-virtio-queue-status", {"path": path, "queue": q})
        if not isinstance(qs, dict):
            return None
        num = _num(qs.get("vring-num")) or 0
        addrs = tuple(_num(qs.get(k)) or 0 for k in ("vring-desc", "vring-avail", "vring-used"))
        status: dict = {"vring-num": num, "inuse": _num(qs.get("inuse")), "last-avail-idx": _num(qs.get("last-avail-idx")),
                        "used-idx": _num(qs.get("used-idx")), "signalled-used": _num(qs.get("signalled-used")),
                        "vring-desc": addrs[0], "vring-avail": addrs[1], "vring-used": addrs[2]}
        if addrs[1] and addrs[2] and num:
            status.update(self._memory(addrs, num))
            status["ring-state"] = "started"
        else:
            status["ring-state"] = "not-set-up"
        return QueueSample(q, status, source=["QEMU's x-query-virtio-queue-status (QEMU runs this ring)",
                                              "guest memory through HMP xp"])

    def _vhost_queue(self, path: str, q: int, vs: dict) -> QueueSample | None:
        status: dict = {"vring-num": 0}
        src = ["QEMU's x-query-virtio-vhost-queue-status (a vhost device: its ring is never queried with "
               "x-query-virtio-queue-status, which would stop it)"]
        if not vs.get("vhost-started"):
            status["ring-state"] = "not-started"
            status["x-qemu-vhost-started"] = False
            return QueueSample(q, status, source=src)
        vq = _safe(self.mon, "x-query-virtio-vhost-queue-status", {"path": path, "queue": q})
        if not isinstance(vq, dict):
            status["ring-state"] = "not-started"
            return QueueSample(q, status, source=src)
        num = _num(vq.get("num")) or 0
        phys = tuple(_num(vq.get(k)) or 0 for k in ("desc-phys", "avail-phys", "used-phys"))
        status.update({"vring-num": num, "vring-desc": phys[0], "vring-avail": phys[1], "vring-used": phys[2],
                       "last-avail-idx": None, "x-qemu-vhost-started": True})
        # (vq's kick and call fields are always 0 on QEMU 7.2: they say nothing about the fds)
        if all(_num(vq.get(k)) is not None for k in ("desc", "avail", "used")):
            status["x-user-addresses"] = [vq["desc"], vq["avail"], vq["used"]]
        if phys[1] and phys[2] and num:
            status.update(self._memory(phys, num))
            status["ring-state"] = "started"
        else:
            status["ring-state"] = "not-set-up"
        return QueueSample(q, status, source=src + ["guest memory through HMP xp"])
