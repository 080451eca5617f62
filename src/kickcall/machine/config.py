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
           "DEFAULT_TOML"]

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
    cfg.name = m.str("name", "default")
    cfg.ram = m.size("ram", 64 << 20, 8 << 20, 4 << 30)
    cfg.vcpus = m.int("vcpus", 2, 1, 16)
    cfg.guest = m.str("guest", "process", ("process", "thread"))
    cfg.max_irq_routes = m.int("max-irq-routes", 4096, 32, 4096)
    cfg.hypervisor = m.str("hypervisor", "kvm", ("kvm", "xen"))
    cfg.nr_pirqs = m.int("nr-pirqs", 56, 25, 4096)
    m.done()
    devs = top.get("device", [])
    if not isinstance(devs, list):
        raise ConfigError("device", "must be an array of tables ([[device]])", source)
    ids: set[str] = set()
    slots: set[int] = set()
    below: set[tuple[str, int]] = set()
    for i, raw in enumerate(devs):
        d = _V(raw, f"device[{i}]", source)
        t = d.str("type", "", ("virtio-blk", "virtio-net", "vfio-user", "pcie-root-port"))
        default_id = {"vfio-user": f"vfio{i}", "pcie-root-port": f"rp{i}"}.get(t, f"{t.split('-')[1]}{i}")
        dc = DeviceConfig(type=t, id=d.str("id", default_id))
        if not _ID.match(dc.id):
            raise d.err("id", f"must be a letter followed by letters, digits, '_', '.' or '-', got {dc.id!r}")
        if dc.id in ids:
            raise d.err("id", f"duplicate device id {dc.id!r}")
        ids.add(dc.id)
        if t != "pcie-root-port":
            dc.bus = d.str("bus", "")
        if dc.bus:
            if "slot" in raw and d.int("slot", 0, 0, 31) != 0:
                raise d.err("slot", "a root port's link has one device: slot 0 (choose the function)")
            dc.slot = 0
            dc.function = d.int("function", 0, 0, 7)
            if (dc.bus, dc.function) in below:
                raise d.err("function", f"function {dc.function} on bus {dc.bus!r} is already used")
            below.add((dc.bus, dc.function))
        else:
            if "function" in raw:
                raise d.err("function", "functions other than 0 are for devices below a root port (bus = \"...\")")
            if "slot" in raw:
                dc.slot = d.int("slot", 0, 1, 31)
                if dc.slot in slots:
                    raise d.err("slot", f"slot {dc.slot} is already used")
                slots.add(dc.slot)
        if t == "pcie-root-port":
            d.done()
            cfg.devices.append(dc)
            continue
        if t == "vfio-user":
            dc.socket = d.str("socket", "")
            if not dc.socket:
                raise d.err("socket", "a vfio-user device needs the path of its server's socket")
            if len(dc.socket.encode()) > 107:
                raise d.err("socket", "Unix socket paths must be shorter than 108 bytes")
            dc.dma = d.str("dma", "fd", ("fd", "message"))
            dc.x_msix_noresize = d.bool("x-msix-noresize", False)
            dc.irqfd = d.bool("irqfd", True)
            dc.aer = d.bool("aer", False)
            d.done()
            cfg.devices.append(dc)
            continue
        dc.ioeventfd = d.bool("ioeventfd", True)
        dc.irqfd = d.bool("irqfd", True)
        dc.msix = d.bool("msix", True)
        dc.queue_size = d.int("queue-size", 128 if t == "virtio-blk" else 256, 2, 1024)
        if dc.queue_size & (dc.queue_size - 1):
            raise d.err("queue-size", f"must be a power of two, got {dc.queue_size}")
        if t == "virtio-blk":
            dc.backend = d.str("backend", "file", ("file", "vhost-user"))
            dc.queues = d.int("queues", 1, 1, 16)
            if dc.backend == "vhost-user":
                dc.socket = d.str("socket", "")
                if not dc.socket:
                    raise d.err("socket", "a vhost-user back-end needs the path of its socket")
                if len(dc.socket.encode()) > 107:
                    raise d.err("socket", "Unix socket paths must be shorter than 108 bytes")
                dc.inflight = d.bool("inflight", True)
            else:
                dc.image = d.str("image", "")
                dc.size = d.size("size", 16 << 20, 64 << 10, 64 << 30)
                if dc.size % 4096:
                    raise d.err("size", "must be a multiple of 4096")
                dc.read_only = d.bool("read-only", False)
                dc.allow_write = d.bool("allow-write", False)
                if dc.allow_write and not dc.image:
                    raise d.err("allow-write", "applies to a user's image (image = \"path\"); "
                                               "a temporary image is always writable")
                dc.aio = d.str("aio", "auto", ("auto", "threads", "sync"))
                dc.serial = d.str("serial", "")
                if len(dc.serial) > 20:
                    raise d.err("serial", "must be at most 20 characters")
        else:
            dc.backend = d.str("backend", "loopback", ("loopback", "socketpair"))
            dc.queue_pairs = d.int("queue-pairs", 1, 1, 8)
        d.done()
        cfg.devices.append(dc)
    wl = _V(top.get("workload", {}), "workload", source)
    if "blk" in wl.t:
        b = _V(wl.get("blk", {}), "workload.blk", source)
        cfg.workload_blk = {
            "depth": b.int("depth", 16, 1, 256),
            "block_size": b.int("block-size", 4096, 512, 1 << 20),
            "read_ratio": b.float("read-ratio", 0.5, 0.0, 1.0),
            "seed": b.int("seed", 1, 0, 2**31),
            "stall_timeout": b.float("stall-timeout", 10.0, 0.5, 3600.0),
        }
        if cfg.workload_blk["block_size"] % 512:
            raise b.err("block-size", "must be a multiple of 512")
        b.done()
    if "net" in wl.t:
        n = _V(wl.get("net", {}), "workload.net", source)
        cfg.workload_net = {
            "min_payload": n.int("min-payload", 32, 16, 4000),
            "max_payload": n.int("max-payload", 1400, 16, 4000),
            "seed": n.int("seed", 2, 0, 2**31),
            "stall_timeout": n.float("stall-timeout", 10.0, 0.5, 3600.0),
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
