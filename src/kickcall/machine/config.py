"""Machine configuration: a TOML file, validated key by key.

Every problem is a ``ConfigError`` naming the key (``device[1].queues``) and what is wrong with it.
The built-in default is one virtio-blk on a temporary image and one virtio-net on loopback.

Example::

    [machine]
    ram = "64M"
    vcpus = 2
    guest = "process"        # or "thread" (in-process, for unit tests)
    hypervisor = "kvm"       # or "xen": pirqs and event channels, no irqfd (docs/xen.md)
    nr-pirqs = 56            # xen: the domain's pirq table (24 GSIs + extra_guest_irqs)

    [[device]]
    type = "virtio-blk"
    id = "blk0"
    size = "16M"             # a temporary image of this size (or: image = "disk.img")
    queues = 2
    ioeventfd = true

    [[device]]
    type = "virtio-net"
    id = "net0"
    backend = "loopback"     # or "socketpair"
    queue-pairs = 2

    [[device]]
    type = "vfio-user"       # a passthrough PCI function behind a vfio-user server
    id = "nic0"
    socket = "/run/nic0.sock"
    dma = "fd"               # or "message": no fd, the server uses DMA_READ/DMA_WRITE
    x-msix-noresize = false  # true: the old MSI-X path (disable + re-enable per new vector)

    [[device]]
    type = "pcie-root-port"  # a PCIe Root Port with AER (docs/aer.md); its secondary bus is
    id = "rp0"               # where a passthrough card with aer = true must sit, alone

    [[device]]
    type = "vfio-user"
    id = "card0fn0"
    socket = "/run/card0-fn0.sock"
    bus = "rp0"              # below the root port (slot 0 there), function 0..7
    function = 0
    aer = true               # forward non-fatal errors to the guest, stop the VM on fatal ones

    [workload.blk]
    depth = 16
    read-ratio = 0.5

    [workload.net]
    max-payload = 1400
"""

from __future__ import annotations

import builtins

import os
import re
import reprlib
import stat
import tomllib
from dataclasses import dataclass, field
from typing import Any

from ..memory import parse_size

__all__ = ["ConfigError", "MachineConfig", "DeviceConfig", "load_config", "parse_config", "default_config",
           "DEFAULT_TOML", "reference_toml", "Key"]

DEFAULT_TOML = """\
[machine]
name = "default"
ram = "64M"
vcpus = 2
guest = "process"

[[device]]
type = "virtio-blk"
id = "blk0"
size = "16M"
queues = 2

[[device]]
type = "virtio-net"
id = "net0"
backend = "loopback"
queue-pairs = 2

[workload.blk]
depth = 16
block-size = 4096
read-ratio = 0.5

[workload.net]
"""


class ConfigError(ValueError):
    """A bad configuration: names the key and the problem."""

    def __init__(self, key: str, problem: str, source: str = "") -> None:
        self.key = key
        self.problem = problem
        self.source = source
        where = f"{source}: " if source else ""
        super().__init__(f"{where}{key}: {problem}" if key else f"{where}{problem}")


@dataclass
class DeviceConfig:
    type: str
    id: str
    slot: int | None = None
    ioeventfd: bool = True
    irqfd: bool = True
    msix: bool = True
    queue_size: int = 128
    # virtio-blk
    image: str = ""
    size: int = 16 << 20
    queues: int = 1
    read_only: bool = False
    allow_write: bool = False  # a user's image (image = "path") is only read unless this is set
    aio: str = "auto"
    serial: str = ""
    # virtio-net: loopback | socketpair; virtio-blk: file | vhost-user
    backend: str = "loopback"
    queue_pairs: int = 1
    socket: str = ""  # virtio-blk with backend = "vhost-user": the back-end's socket
    inflight: bool = True  # vhost-user: negotiate INFLIGHT_SHMFD when the back-end offers it
    # vfio-user: how guest RAM reaches the server ("fd": DMA_MAP with the memfd; "message":
    # DMA_READ/DMA_WRITE), and the switch that forces the old NORESIZE MSI-X path
    dma: str = "fd"
    x_msix_noresize: bool = False
    # placement: on the root bus (bus = "") or on the secondary bus of a pcie-root-port
    bus: str = ""
    function: int = 0
    # vfio-user: forward the host's non-fatal AER errors to the guest, stop on fatal ones
    aer: bool = False


@dataclass
class MachineConfig:
    name: str = "default"
    ram: int = 64 << 20
    vcpus: int = 2
    guest: str = "process"
    max_irq_routes: int = 4096
    hypervisor: str = "kvm"
    nr_pirqs: int = 56
    devices: list[DeviceConfig] = field(default_factory=list)
    workload_blk: dict | None = None
    workload_net: dict | None = None
    source: str = ""


# ---------------------------------------------------------------------------------------------
# The key table: every key the parser accepts, with its type, default, range or choices and help.
# parse_config reads each key through its Key (``_V.take``), and reference_toml() prints the same
# table, so the reference cannot drift from what the parser applies.
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Key:
    """One config key: ``kind`` is "int", "float", "bool", "str" or "size" (bytes, or "64M").

    ``default`` None means the parser chooses (``auto`` says how) or the key is required
    (``required``).  ``example`` is shown, commented out, where the default cannot be (a path);
    ``rule`` is a constraint beyond the range ("a power of two")."""

    name: str
    kind: str
    default: Any
    help: str
    lo: int | float | None = None
    hi: int | float | None = None
    choices: tuple[str, ...] | None = None
    auto: str = ""
    required: bool = False
    example: Any = None
    rule: str = ""

    def describe(self) -> str:
        """The key's type and bounds, as the reference prints them ("integer 1..16")."""
        if self.choices is not None:
            s = "one of " + ", ".join(f'"{c}"' for c in self.choices)
        elif self.kind == "size":
            s = f"size {_size_text(int(self.lo or 0))}..{_size_text(int(self.hi or 0))} (bytes, or \"64M\", \"1G\")"
        elif self.kind == "int":
            s = f"integer {self.lo}..{self.hi}"
        elif self.kind == "float":
            s = f"number {self.lo}..{self.hi}"
        elif self.kind == "bool":
            s = "true or false"
        else:
            s = "string"
        if self.rule:
            s += f", {self.rule}"
        return s

    def default_text(self) -> str:
        """The default as the reference prints it."""
        if self.required:
            return "required"
        if self.default is None:
            return self.auto
        shown = _toml_value(self, self.default)
        return f"{shown} ({self.auto})" if self.auto else shown


def _size_text(n: int) -> str:
    for suffix, shift in (("G", 30), ("M", 20), ("K", 10)):
        if n and n % (1 << shift) == 0:
            return f"{n >> shift}{suffix}"
    return str(n)


def _toml_value(k: Key, v: Any) -> str:
    if k.kind == "size":
        return f'"{_size_text(int(v))}"'
    if k.kind == "bool":
        return "true" if v else "false"
    if k.kind == "str":
        return '"' + str(v).replace("\\", "\\\\").replace('"', '\\"') + '"'
    return repr(v)


def _keys(*ks: Key) -> dict[str, Key]:
    return {k.name: k for k in ks}


#: [machine]
MACHINE_KEYS = _keys(
    Key("name", "str", "default", "a label for the machine (QMP query-name)"),
    Key("ram", "size", 64 << 20, "guest RAM (one memfd, shared with vhost-user and vfio-user back-ends)",
        8 << 20, 4 << 30),
    Key("vcpus", "int", 2, "vCPUs the guest runs its queues on", 1, 16),
    Key("guest", "str", "process", "where the guest runs: a child process, or threads of the VMM "
        "process (for unit tests)", choices=("process", "thread")),
    Key("max-irq-routes", "int", 4096, "kvm: the GSI routing table's size (KVM_MAX_IRQ_ROUTES)", 32, 4096),
    Key("hypervisor", "str", "kvm", "kvm (ioeventfd, irqfd, MSI routes) or xen (pirqs and event channels, "
        "no irqfd; docs/xen.md)", choices=("kvm", "xen")),
    Key("nr-pirqs", "int", 56, "xen: the domain's pirq table (24 GSIs + extra_guest_irqs)", 25, 4096),
)

DEVICE_TYPES = ("virtio-blk", "virtio-net", "vfio-user", "pcie-root-port")

#: keys every [[device]] takes
DEVICE_KEYS = _keys(
    Key("type", "str", None, "the device model", choices=DEVICE_TYPES, required=True),
    Key("id", "str", None, "the device's id in QMP, HMP, --json and metrics: a letter, then up to 31 "
        "letters, digits, '_', '.' or '-'", auto="blk<N>, net<N>, vfio<N> or rp<N> (N: the device's index)"),
)

#: placement keys of every device but a pcie-root-port
PLACEMENT_KEYS = _keys(
    Key("bus", "str", "", "the id of a pcie-root-port to sit below (slot 0 of its secondary bus)",
        example="rp0", auto="the root bus"),
    Key("slot", "int", None, "the PCI slot on the root bus (below a root port: 0 only)", 1, 31,
        auto="the next free slot", example=1),
    Key("function", "int", 0, "below a root port: the PCI function (on the root bus: not allowed)", 0, 7,
        example=0),
)

#: keys of both virtio devices
VIRTIO_KEYS = _keys(
    Key("ioeventfd", "bool", True, "kicks through an ioeventfd (KVM_IOEVENTFD) rather than an MMIO exit"),
    Key("irqfd", "bool", True, "calls through an irqfd (KVM_IRQFD) rather than the VMM injecting"),
    Key("msix", "bool", True, "MSI-X vectors per queue; false: INTx (pin A)"),
)

BLK_KEYS = _keys(
    Key("queue-size", "int", 128, "descriptors per virtqueue", 2, 1024, rule="a power of two"),
    Key("backend", "str", "file", "who serves the requests: the VMM on an image file, or a vhost-user "
        "back-end", choices=("file", "vhost-user")),
    Key("queues", "int", 1, "request virtqueues (VIRTIO_BLK_F_MQ)", 1, 1024),
)

BLK_FILE_KEYS = _keys(
    Key("image", "str", "", "a raw image to serve (only read unless allow-write); absent: a temporary "
        "image of `size`", example="disk.img", auto="a temporary image"),
    Key("size", "size", 16 << 20, "the temporary image's size (ignored with image)", 64 << 10, 64 << 30,
        rule="a multiple of 4096"),
    Key("read-only", "bool", False, "offer VIRTIO_BLK_F_RO"),
    Key("allow-write", "bool", False, "let the workload write to a user's image (image = \"path\")"),
    Key("aio", "str", "auto", "how the VMM does the I/O", choices=("auto", "threads", "sync")),
    Key("serial", "str", "", "VIRTIO_BLK_T_GET_ID's answer", rule="at most 20 characters"),
)

BLK_VHOST_KEYS = _keys(
    Key("socket", "str", None, "the vhost-user back-end's Unix socket (shorter than 108 bytes)",
        required=True, example="/run/blk1.sock"),
    Key("inflight", "bool", True, "negotiate VHOST_USER_PROTOCOL_F_INFLIGHT_SHMFD when offered"),
)

NET_KEYS = _keys(
    Key("queue-size", "int", 256, "descriptors per virtqueue", 2, 1024, rule="a power of two"),
    Key("backend", "str", "loopback", "where transmitted frames go: straight back to the receive queue, "
        "or through a socketpair", choices=("loopback", "socketpair")),
    Key("queue-pairs", "int", 1, "receive/transmit queue pairs (VIRTIO_NET_F_MQ)", 1, 8),
)

VFIO_KEYS = _keys(
    Key("socket", "str", None, "the vfio-user server's Unix socket (shorter than 108 bytes)",
        required=True, example="/run/nic0.sock"),
    Key("dma", "str", "fd", "how guest RAM reaches the server: DMA_MAP with the memfd, or "
        "DMA_READ/DMA_WRITE messages", choices=("fd", "message")),
    Key("x-msix-noresize", "bool", False, "the old MSI-X path (disable and re-enable per new vector)"),
    Key("irqfd", "bool", True, "the server's interrupts through irqfds rather than the VMM injecting"),
    Key("aer", "bool", False, "forward the host's non-fatal AER errors to the guest, stop the VM on fatal "
        "ones (below a pcie-root-port, alone on its bus)"),
)

WORKLOAD_BLK_KEYS = _keys(
    Key("depth", "int", 16, "requests in flight per queue", 1, 256),
    Key("block-size", "int", 4096, "bytes per request", 512, 1 << 20, rule="a multiple of 512"),
    Key("read-ratio", "float", 0.5, "the share of reads (the rest are writes)", 0.0, 1.0),
    Key("seed", "int", 1, "the random generator's seed (the same seed, the same requests)", 0, 2**31),
    Key("stall-timeout", "float", 10.0, "seconds without progress on a queue before the run fails", 0.5, 3600.0),
)

WORKLOAD_NET_KEYS = _keys(
    Key("min-payload", "int", 32, "the smallest frame payload", 16, 4000, rule="at most max-payload"),
    Key("max-payload", "int", 1400, "the largest frame payload", 16, 4000),
    Key("seed", "int", 2, "the random generator's seed", 0, 2**31),
    Key("stall-timeout", "float", 10.0, "seconds without progress on a queue before the run fails", 0.5, 3600.0),
)


def device_keys(type_: str, backend: str = "") -> dict[str, Key]:
    """Every key a ``[[device]]`` of this type (and back-end, for virtio-blk) accepts."""
    if type_ == "pcie-root-port":
        return dict(DEVICE_KEYS)
    ks = {**DEVICE_KEYS, **PLACEMENT_KEYS}
    if type_ == "vfio-user":
        return {**ks, **VFIO_KEYS}
    if type_ == "virtio-net":
        return {**ks, **VIRTIO_KEYS, **NET_KEYS}
    ks = {**ks, **VIRTIO_KEYS, **BLK_KEYS}
    return {**ks, **(BLK_VHOST_KEYS if backend == "vhost-user" else BLK_FILE_KEYS)}


_REPR = reprlib.Repr()
_REPR.maxlevel, _REPR.maxstring, _REPR.maxother, _REPR.maxlist, _REPR.maxdict = 3, 60, 60, 6, 4


def _show(v: Any) -> str:
    """A bounded repr of a config value (a hostile file may nest arrays 100,000 deep)."""
    return _REPR.repr(v)


_ID = re.compile(r"^[A-Za-z][A-Za-z0-9_.-]{0,31}$")


class _V:
    """Typed getters over one TOML table that report the full key path."""

    def __init__(self, table: Any, path: builtins.str, source: builtins.str) -> None:
        if not isinstance(table, dict):
            raise ConfigError(path, f"must be a table, not {type(table).__name__}", source)
        self.t = table
        self.path = path
        self.source = source
        self.used: set[str] = set()

    def key(self, k: builtins.str) -> builtins.str:
        return f"{self.path}.{k}" if self.path else k

    def err(self, k: builtins.str, problem: builtins.str) -> ConfigError:
        return ConfigError(self.key(k), problem, self.source)

    def get(self, k: builtins.str, default: Any) -> Any:
        self.used.add(k)
        return self.t.get(k, default)

    def int(self, k: builtins.str, default: builtins.int, lo: builtins.int, hi: builtins.int) -> builtins.int:
        v = self.get(k, default)
        if isinstance(v, bool) or not isinstance(v, int):
            raise self.err(k, f"must be an integer, got {_show(v)}")
        if not lo <= v <= hi:
            raise self.err(k, f"must be between {lo} and {hi}, got {v}")
        return v

    def bool(self, k: builtins.str, default: bool) -> bool:
        v = self.get(k, default)
        if not isinstance(v, bool):
            raise self.err(k, f"must be true or false, got {_show(v)}")
        return v

    def str(self, k: builtins.str, default: builtins.str, choices: tuple[builtins.str, ...] | None = None) -> builtins.str:
        v = self.get(k, default)
        if not isinstance(v, str):
            raise self.err(k, f"must be a string, got {_show(v)}")
        if choices is not None and v not in choices:
            raise self.err(k, f"must be one of {', '.join(repr(c) for c in choices)}, got {_show(v)}")
        return v

    def float(self, k: builtins.str, default: builtins.float, lo: builtins.float, hi: builtins.float) -> builtins.float:
        v = self.get(k, default)
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise self.err(k, f"must be a number, got {_show(v)}")
        if not lo <= v <= hi:
            raise self.err(k, f"must be between {lo} and {hi}, got {v}")
        return float(v)

    def size(self, k: builtins.str, default: builtins.int, lo: builtins.int, hi: builtins.int) -> builtins.int:
        v = self.get(k, default)
        try:
            n = parse_size(v)
        except ValueError as e:
            raise self.err(k, str(e)) from None
        if not lo <= n <= hi:
            raise self.err(k, f"must be between {lo} and {hi} bytes, got {n}")
        return n

    def take(self, k: Key, default: Any = None, lo: Any = None, hi: Any = None) -> Any:
        """Read key *k* as its table entry says; *default*, *lo*, *hi* override the entry's (an id's
        default is per index, a slot below a root port may only be 0)."""
        d = k.default if default is None else default
        lo = k.lo if lo is None else lo
        hi = k.hi if hi is None else hi
        if k.kind == "int":
            return self.int(k.name, d, lo, hi)
        if k.kind == "float":
            return self.float(k.name, d, lo, hi)
        if k.kind == "size":
            return self.size(k.name, d, lo, hi)
        if k.kind == "bool":
            return self.bool(k.name, d)
        return self.str(k.name, "" if d is None else d, k.choices)

    def done(self) -> None:
        extra = sorted(set(self.t) - self.used)
        if extra:
            raise self.err(extra[0], "unknown key")


def parse_config(text: str, source: str = "<config>") -> MachineConfig:
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError("", f"invalid TOML: {e}", source) from None
    except RecursionError:  # tomllib parses nested arrays and inline tables recursively
        raise ConfigError("", "invalid TOML: nested too deeply", source) from None
    top = _V(data, "", source)
    cfg = MachineConfig(source=source)
    m = _V(top.get("machine", {}), "machine", source)
    cfg.name = m.take(MACHINE_KEYS["name"])
    cfg.ram = m.take(MACHINE_KEYS["ram"])
    cfg.vcpus = m.take(MACHINE_KEYS["vcpus"])
    cfg.guest = m.take(MACHINE_KEYS["guest"])
    cfg.max_irq_routes = m.take(MACHINE_KEYS["max-irq-routes"])
    cfg.hypervisor = m.take(MACHINE_KEYS["hypervisor"])
    cfg.nr_pirqs = m.take(MACHINE_KEYS["nr-pirqs"])
    m.done()
    devs = top.get("device", [])
    if not isinstance(devs, list):
        raise ConfigError("device", "must be an array of tables ([[device]])", source)
    ids: set[str] = set()
    slots: set[int] = set()
    below: set[tuple[str, int]] = set()
    for i, raw in enumerate(devs):
        d = _V(raw, f"device[{i}]", source)
        t = d.take(DEVICE_KEYS["type"])
        default_id = {"vfio-user": f"vfio{i}", "pcie-root-port": f"rp{i}"}.get(t, f"{t.split('-')[1]}{i}")
        dc = DeviceConfig(type=t, id=d.take(DEVICE_KEYS["id"], default_id))
        if not _ID.match(dc.id):
            raise d.err("id", f"must be a letter followed by letters, digits, '_', '.' or '-', got {dc.id!r}")
        if dc.id in ids:
            raise d.err("id", f"duplicate device id {dc.id!r}")
        ids.add(dc.id)
        if t != "pcie-root-port":
            dc.bus = d.take(PLACEMENT_KEYS["bus"])
        if dc.bus:
            if "slot" in raw and d.take(PLACEMENT_KEYS["slot"], 0, lo=0) != 0:
                raise d.err("slot", "a root port's link has one device: slot 0 (choose the function)")
            dc.slot = 0
            dc.function = d.take(PLACEMENT_KEYS["function"])
            if (dc.bus, dc.function) in below:
                raise d.err("function", f"function {dc.function} on bus {dc.bus!r} is already used")
            below.add((dc.bus, dc.function))
        else:
            if "function" in raw:
                raise d.err("function", "functions other than 0 are for devices below a root port (bus = \"...\")")
            if "slot" in raw:
                dc.slot = d.take(PLACEMENT_KEYS["slot"], 0)
                if dc.slot in slots:
                    raise d.err("slot", f"slot {dc.slot} is already used")
                slots.add(dc.slot)
        if t == "pcie-root-port":
            d.done()
            cfg.devices.append(dc)
            continue
        if t == "vfio-user":
            dc.socket = d.take(VFIO_KEYS["socket"])
            if not dc.socket:
                raise d.err("socket", "a vfio-user device needs the path of its server's socket")
            if len(dc.socket.encode()) > 107:
                raise d.err("socket", "Unix socket paths must be shorter than 108 bytes")
            dc.dma = d.take(VFIO_KEYS["dma"])
            dc.x_msix_noresize = d.take(VFIO_KEYS["x-msix-noresize"])
            dc.irqfd = d.take(VFIO_KEYS["irqfd"])
            dc.aer = d.take(VFIO_KEYS["aer"])
            d.done()
            cfg.devices.append(dc)
            continue
        dc.ioeventfd = d.take(VIRTIO_KEYS["ioeventfd"])
        dc.irqfd = d.take(VIRTIO_KEYS["irqfd"])
        dc.msix = d.take(VIRTIO_KEYS["msix"])
        dc.queue_size = d.take((BLK_KEYS if t == "virtio-blk" else NET_KEYS)["queue-size"])
        if dc.queue_size & (dc.queue_size - 1):
            raise d.err("queue-size", f"must be a power of two, got {dc.queue_size}")
        if t == "virtio-blk":
            dc.backend = d.take(BLK_KEYS["backend"])
            dc.queues = d.take(BLK_KEYS["queues"])
            if dc.backend == "vhost-user":
                dc.socket = d.take(BLK_VHOST_KEYS["socket"])
                if not dc.socket:
                    raise d.err("socket", "a vhost-user back-end needs the path of its socket")
                if len(dc.socket.encode()) > 107:
                    raise d.err("socket", "Unix socket paths must be shorter than 108 bytes")
                dc.inflight = d.take(BLK_VHOST_KEYS["inflight"])
            else:
                dc.image = d.take(BLK_FILE_KEYS["image"])
                dc.size = d.take(BLK_FILE_KEYS["size"])
                if dc.size % 4096:
                    raise d.err("size", "must be a multiple of 4096")
                dc.read_only = d.take(BLK_FILE_KEYS["read-only"])
                dc.allow_write = d.take(BLK_FILE_KEYS["allow-write"])
                if dc.allow_write and not dc.image:
                    raise d.err("allow-write", "applies to a user's image (image = \"path\"); "
                                               "a temporary image is always writable")
                dc.aio = d.take(BLK_FILE_KEYS["aio"])
                dc.serial = d.take(BLK_FILE_KEYS["serial"])
                if len(dc.serial) > 20:
                    raise d.err("serial", "must be at most 20 characters")
        else:
            dc.backend = d.take(NET_KEYS["backend"])
            dc.queue_pairs = d.take(NET_KEYS["queue-pairs"])
        d.done()
        cfg.devices.append(dc)
    wl = _V(top.get("workload", {}), "workload", source)
    if "blk" in wl.t:
        b = _V(wl.get("blk", {}), "workload.blk", source)
        cfg.workload_blk = {
            k.name.replace("-", "_"): b.take(k) for k in WORKLOAD_BLK_KEYS.values()
        }
        if cfg.workload_blk["block_size"] % 512:
            raise b.err("block-size", "must be a multiple of 512")
        b.done()
    if "net" in wl.t:
        n = _V(wl.get("net", {}), "workload.net", source)
        cfg.workload_net = {
            k.name.replace("-", "_"): n.take(k) for k in WORKLOAD_NET_KEYS.values()
        }
        if cfg.workload_net["min_payload"] > cfg.workload_net["max_payload"]:
            raise n.err("min-payload", "must not exceed max-payload")
        n.done()
    wl.done()
    top.done()
    if not cfg.devices:
        raise ConfigError("device", "a machine needs at least one [[device]]", source)
    ports = {d.id for d in cfg.devices if d.type == "pcie-root-port"}
    for i, dc in enumerate(cfg.devices):
        if dc.bus and dc.bus not in ports:
            raise ConfigError(f"device[{i}].bus", f"{dc.bus!r} is not the id of a pcie-root-port", source)
    return cfg


#: a machine config is a few hundred bytes; anything past this is not one
MAX_CONFIG_BYTES = 1 << 20


def load_config(path: str) -> MachineConfig:
    """Read and check a config file.  Only a regular file is read (a FIFO would block, /dev/zero
    never ends), and at most MAX_CONFIG_BYTES of it."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK | os.O_NOCTTY)
    except OSError as e:
        raise ConfigError("", f"cannot read config: {e.strerror}", path) from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            kind = ("a FIFO" if stat.S_ISFIFO(st.st_mode) else "a character device" if stat.S_ISCHR(st.st_mode)
                    else "a directory" if stat.S_ISDIR(st.st_mode) else "not a regular file")
            raise ConfigError("", f"cannot read config: it is {kind}", path)
        chunks = []
        total = 0
        while True:
            chunk = os.read(fd, 65536)
            if not chunk:
                break
            total += len(chunk)
            if total > MAX_CONFIG_BYTES:
                raise ConfigError("", f"larger than {MAX_CONFIG_BYTES} bytes: not a machine config", path)
            chunks.append(chunk)
        raw = b"".join(chunks)
    except OSError as e:
        raise ConfigError("", f"cannot read config: {e.strerror}", path) from None
    finally:
        os.close(fd)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise ConfigError("", "not UTF-8 text", path) from None
    return parse_config(text, path)


def default_config() -> MachineConfig:
    return parse_config(DEFAULT_TOML, "<built-in default>")


# (title, table header, keys, values shown instead of defaults, whole block commented out)
_RefBlock = tuple[str, str, dict[str, Key], dict[str, Any], bool]


def _reference_blocks() -> list[_RefBlock]:
    return [
        ("the machine", "[machine]", MACHINE_KEYS, {}, False),
        ("virtio-blk served by the VMM on an image file", "[[device]]", device_keys("virtio-blk", "file"),
         {"type": "virtio-blk", "id": "blk0"}, False),
        ("virtio-net", "[[device]]", device_keys("virtio-net"), {"type": "virtio-net", "id": "net0"}, False),
        ("virtio-blk served by a vhost-user back-end (kickcall vhost-user-blk, or QEMU's "
         "storage daemon): needs its socket", "[[device]]", device_keys("virtio-blk", "vhost-user"),
         {"type": "virtio-blk", "id": "blk1", "backend": "vhost-user"}, True),
        ("a PCIe Root Port with AER (docs/aer.md): its secondary bus takes one device (bus = \"rp0\")",
         "[[device]]", device_keys("pcie-root-port"), {"type": "pcie-root-port", "id": "rp0"}, False),
        ("a passthrough PCI function behind a vfio-user server (kickcall vfio-user-server, "
         "docs/vfio.md): needs its socket", "[[device]]", device_keys("vfio-user"),
         {"type": "vfio-user", "id": "nic0"}, True),
        ("the block workload (a section present: the run drives every virtio-blk)", "[workload.blk]",
         WORKLOAD_BLK_KEYS, {}, False),
        ("the network workload (a section present: the run drives every virtio-net)", "[workload.net]",
         WORKLOAD_NET_KEYS, {}, False),
    ]


def reference_toml(all_blocks: bool = False) -> str:
    """The full config reference, generated from the key table: every key the parser accepts, grouped
    by table and device type, each with its help, its type and range or choices, and its default.

    It parses as a machine config.  Blocks that need a path of the user's (a back-end's socket) are
    commented out, and so are keys whose value is a path or a placement (image, bus, slot,
    function); ``all_blocks=True`` prints those blocks uncommented (tests parse both)."""
    out = [
        "# kickcall machine config: the full reference (`kickcall config`).",
        "# Every key the config accepts, with its type, range or choices, and default; a key left out",
        "# takes its default.  Blocks that need a socket of yours are commented out, and so are keys whose",
        "# value is a path or a placement: uncomment and edit them.  `kickcall config --check FILE`",
        "# validates a file, `kickcall run FILE` runs it.",
    ]
    for title, header, keys, values, commented in _reference_blocks():
        hide = commented and not all_blocks
        pre = "# " if hide else ""
        out += ["", f"# ---- {title} ----", pre + header]
        for k in keys.values():
            out.append(f"{pre}# {k.help}")
            out.append(f"{pre}# {k.describe()}; default {k.default_text()}")
            if k.name in values:
                out.append(f"{pre}{k.name} = {_toml_value(k, values[k.name])}")
            elif k.example is not None and k.required:
                out.append(f"{pre}{k.name} = {_toml_value(k, k.example)}")
            elif k.example is not None:
                out.append(f"{pre}# {k.name} = {_toml_value(k, k.example)}")
            else:
                out.append(f"{pre}{k.name} = {_toml_value(k, k.default)}")
    return "\n".join(out) + "\n"
