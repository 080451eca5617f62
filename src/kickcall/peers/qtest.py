"""A deterministic virtio-blk *driver* played by Python against real QEMU through the qtest protocol.

QEMU's qtest server (``-qtest CHARDEV``) takes one text command per line and answers one line:
``OK [value]`` or ``FAIL reason``; asynchronous ``IRQ raise|lower N`` lines arrive only after
``irq_intercept_in``. The commands used here (checked against QEMU 7.2 on Debian 12):

- port I/O ``outb/outw/outl PORT VALUE`` and ``inb/inw/inl PORT`` (``OK 0x12378086``);
- guest memory ``readb/readw/readl/readq ADDR`` (``OK 0x%016x``), ``writeb/w/l/q ADDR VALUE``,
  ``b64read ADDR LEN`` (``OK <base64>``) and ``b64write ADDR LEN <base64>`` (``OK``).

Memory accesses go through QEMU's system address space exactly as a CPU's would (RAM, or a device's
MMIO handler, synchronously under the BQL). A malformed number makes QEMU abort (it asserts), so
only this module formats commands.

**Accelerator.** Debian's QEMU 7.2 does not ship the qtest accelerator module (``-accel qtest``
fails with ``invalid accelerator qtest``; ``-accel help`` lists tcg and kvm) although the qtest
server is built in. :class:`QtestVM` therefore runs ``-accel tcg`` with a 64 KiB firmware whose
reset vector is ``cli; hlt; jmp $-1``: the only vCPU halts with interrupts off before touching
anything, so the test is the only driver, while the run state is ``running`` as on a production
VM. Without the qtest accelerator there is no ``clock_step`` (``FAIL Unknown command``) and none
is needed: the virtual clock runs, and virtio-blk does its work in QEMU's main loop — under TCG
virtio-pci has no ioeventfd, so a notify write runs the queue handler inside the qtest command,
and the block layer's completion arrives from its thread pool on a bottom half shortly after.

**Machine.** ``pc`` (i440fx): every device sits on bus 0 behind the host bridge with no root
ports, configuration space is reached through 0xcf8/0xcfc, there is no MMCONFIG window to keep
clear, and with ``-nodefaults`` the machine has nothing else the driver has to step around.
Memory BARs are placed from 0xe0000000 (inside i440fx's 32-bit PCI hole whatever the RAM size
below 3.5 GiB); I/O BARs (the transitional device's legacy BAR 0) are never programmed and I/O
decoding stays off. RAM is a shared memfd so a vhost-user device can be attached next to the
emulated one (:class:`~kickcall.peers.qemu.VhostUserBlk` in *vhost_user_blk*).

**Interrupts.** MSI-X, with each vector's message address pointed at a word of guest RAM (the
trick libqos uses): without an interrupt controller in the way, QEMU's MSI-X write of the message
data lands in that word, so "an interrupt was delivered" is ``readl(word) != 0`` and the driver
acknowledges by writing 0. Deliveries between two acknowledgements coalesce (as edge interrupts
do). INTx is not used (i440fx's PIRQ routing is programmed by firmware, which does not run).
"""

from __future__ import annotations

import base64
import enum
import os
import socket
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from ..monitor.client import QMPClient
from ..threads import named_thread
from ..virtio.blk import BLK_S_OK as VIRTIO_BLK_S_OK
from ..virtio.blk import BLK_T_IN as VIRTIO_BLK_T_IN
from ..virtio.blk import BLK_T_OUT as VIRTIO_BLK_T_OUT
from ..virtio.blk import HDR as BLK_HDR
from ..virtio.blk import SECTOR
from ..virtio.ring import VRING_DESC_F_NEXT, VRING_DESC_F_WRITE, VRING_USED_F_NO_NOTIFY, vring_need_event
from ..virtio.layout import (
    DESC,
    USED_ELEM,
    USED_ELEM_SIZE,
    avail_event_addr,
    avail_idx_addr,
    avail_ring_addr,
    avail_size,
    desc_addr,
    desc_table_size,
    used_elem_addr,
    used_event_addr,
    used_flags_addr,
    used_idx_addr,
    used_size,
)
from .qemu import QEMU_BINARY, ManagedProcess, PeerError, VhostUserBlk, check_socket_path, open_qmp, qmp_quit

__all__ = [
    "BlkCompletion", "QtestBlkIo", "HealthyWorkload", "QtestError", "QtestErrorKind", "QtestSession",
    "QtestVM", "VirtioBlkQtestDriver", "halt_firmware", "vring_need_event",
]


class QtestErrorKind(enum.Enum):
    """What went wrong, for callers that branch on it."""
    CLOSED = "closed"  # the qtest connection ended (QEMU exited) or is unusable after a timeout
    TIMEOUT = "timeout"  # QEMU did not answer, or the awaited ring change did not happen in time
    PROTOCOL = "protocol"  # a FAIL reply, or a reply this client cannot parse
    NOT_FOUND = "not-found"  # no virtio-blk function at the address, or a virtio-pci capability missing
    NEGOTIATION = "negotiation"  # a feature or queue the driver needs was refused
    RING = "ring"  # the driver's ring is full, or the device used an id the driver did not publish
    DATA = "data"  # a request completed with a bad status, or read back other data than expected
    USAGE = "usage"  # the caller asked for something invalid (a misaligned request, beyond capacity)


class QtestError(PeerError):
    """A qtest session or the driver on it failed; ``kind`` says how."""

    def __init__(self, kind: QtestErrorKind, message: str):
        super().__init__(f"{kind.value}: {message}")
        self.kind = kind


# --- the qtest wire ---------------------------------------------------------------------------------

class QtestSession:
    """The client end of QEMU's qtest socket: one command at a time (thread-safe), ``IRQ`` lines kept
    aside in :attr:`irq_events`. A timeout leaves the stream out of step, so it closes the session."""

    def __init__(self, sock: socket.socket, timeout: float = 10.0):
        self.sock = sock
        self.timeout = timeout
        self.irq_events: list[str] = []
        self.commands = 0
        self._buf = b""
        self._lock = threading.Lock()
        self._broken: str | None = None

    @property
    def closed(self) -> bool:
        return self._broken is not None

    def close(self) -> None:
        with self._lock:
            if self._broken is None:
                self._broken = "closed by the client"
            try:
                self.sock.close()
            except OSError:
                pass

    def _fail(self, kind: QtestErrorKind, why: str) -> QtestError:
        self._broken = why
        try:
            self.sock.close()
        except OSError:
            pass
        return QtestError(kind, why)

    def _read_line(self, deadline: float, cmd: str) -> str:
        while b"\n" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0:
                raise self._fail(QtestErrorKind.TIMEOUT, f"no reply to {cmd!r} within {self.timeout:.1f} s")
            self.sock.settimeout(left)
            try:
                chunk = self.sock.recv(65536)
            except TimeoutError:
                continue
            except OSError as e:
                raise self._fail(QtestErrorKind.CLOSED, f"qtest connection failed during {cmd!r}: {e}") from None
            if not chunk:
                raise self._fail(QtestErrorKind.CLOSED, f"QEMU closed the qtest connection during {cmd!r}")
            self._buf += chunk
        line, self._buf = self._buf.split(b"\n", 1)
        return line.decode("ascii", "replace").rstrip("\r")

    def command(self, line: str, timeout: float | None = None) -> str:
        """Send one command; the text after ``OK`` (may be empty). ``FAIL`` raises PROTOCOL."""
        with self._lock:
            if self._broken is not None:
                raise QtestError(QtestErrorKind.CLOSED, f"qtest session unusable ({self._broken}); "
                                 f"cannot send {line!r}")
            deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
            try:
                self.sock.sendall(line.encode("ascii") + b"\n")
            except OSError as e:
                raise self._fail(QtestErrorKind.CLOSED, f"cannot send {line!r}: {e}") from None
            self.commands += 1
            while True:
                reply = self._read_line(deadline, line)
                if reply.startswith("IRQ "):
                    self.irq_events.append(reply)
                    continue
                break
        word, _, rest = reply.partition(" ")
        if word == "OK":
            return rest
        if word == "FAIL":
            raise QtestError(QtestErrorKind.PROTOCOL, f"QEMU refused {line!r}: {rest}")
        raise QtestError(QtestErrorKind.PROTOCOL, f"unexpected reply to {line!r}: {reply!r}")

    def _value(self, line: str) -> int:
        rest = self.command(line)
        try:
            return int(rest.split()[0], 16)
        except (ValueError, IndexError):
            raise QtestError(QtestErrorKind.PROTOCOL, f"reply to {line!r} is not a number: {rest!r}") from None

    # -- port I/O
    def outb(self, port: int, v: int) -> None:
        self.command(f"outb {port:#x} {v & 0xff:#x}")

    def outw(self, port: int, v: int) -> None:
        self.command(f"outw {port:#x} {v & 0xffff:#x}")

    def outl(self, port: int, v: int) -> None:
        self.command(f"outl {port:#x} {v & 0xffffffff:#x}")

    def inb(self, port: int) -> int:
        return self._value(f"inb {port:#x}")

    def inw(self, port: int) -> int:
        return self._value(f"inw {port:#x}")

    def inl(self, port: int) -> int:
        return self._value(f"inl {port:#x}")

    # -- memory (guest-physical, through the system address space)
    def readb(self, addr: int) -> int:
        return self._value(f"readb {addr:#x}")

    def readw(self, addr: int) -> int:
        return self._value(f"readw {addr:#x}")

    def readl(self, addr: int) -> int:
        return self._value(f"readl {addr:#x}")

    def readq(self, addr: int) -> int:
        return self._value(f"readq {addr:#x}")

    def writeb(self, addr: int, v: int) -> None:
        self.command(f"writeb {addr:#x} {v & 0xff:#x}")

    def writew(self, addr: int, v: int) -> None:
        self.command(f"writew {addr:#x} {v & 0xffff:#x}")

    def writel(self, addr: int, v: int) -> None:
        self.command(f"writel {addr:#x} {v & 0xffffffff:#x}")

    def writeq(self, addr: int, v: int) -> None:
        self.command(f"writeq {addr:#x} {v & 0xffffffffffffffff:#x}")

    def memread(self, addr: int, length: int) -> bytes:
        if length <= 0:
            return b""
        rest = self.command(f"b64read {addr:#x} {length:#x}")
        try:
            data = base64.b64decode(rest.strip(), validate=True)
        except ValueError:
            raise QtestError(QtestErrorKind.PROTOCOL, f"b64read reply is not base64: {rest[:60]!r}") from None
        if len(data) != length:
            raise QtestError(QtestErrorKind.PROTOCOL, f"b64read {length} bytes returned {len(data)}")
        return data

    def memwrite(self, addr: int, data: bytes) -> None:
        if data:
            self.command(f"b64write {addr:#x} {len(data):#x} {base64.b64encode(data).decode('ascii')}")


# --- QEMU under qtest ---------------------------------------------------------------------------------

def halt_firmware() -> bytes:
    """A 64 KiB x86 BIOS image whose reset vector (0xffff0) is ``cli; hlt; jmp $-1``."""
    img = bytearray(b"\xf4" * 0x10000)
    img[0xfff0:0xfff4] = b"\xfa\xf4\xeb\xfd"
    return bytes(img)


class QtestVM(ManagedProcess):
    """``qemu-system-x86_64 -M pc`` with a halted vCPU, a qtest socket, QMP socket(s), memfd RAM, and an
    emulated ``virtio-blk-pci`` (id ``vblk0`` at slot :attr:`BLK_SLOT`) on a raw image in *workdir*.

    The test listens on the qtest socket and QEMU connects to it (as libqtest does). ``qmp_paths``
    are QEMU-side servers; QEMU serves one client per socket at a time, so give ``qmp_sockets=2``
    when a test and ``kickcall diagnose`` both need one. Always ``stop()`` (or use ``with``).
    """

    kind = "qemu-qtest"
    BLK_SLOT = 4
    BLK_ID = "vblk0"

    def __init__(self, workdir: str, *, disk_size: int = 16 << 20, mem_mb: int = 64, event_idx: bool = True,
                 blk_extra: str = "", qmp_sockets: int = 1, vhost_user_blk: Sequence[VhostUserBlk] = (),
                 extra_args: Sequence[str] = (), binary: str = QEMU_BINARY, timeout: float = 30.0,
                 blockdev: str | None = None):
        super().__init__()
        if "," in workdir:
            raise ValueError(f"workdir {workdir!r} contains a comma (QEMU option syntax)")
        self.workdir = workdir
        self.disk_path = os.path.join(workdir, "qtest-disk.img")
        self.disk_size = disk_size
        self.mem_mb = mem_mb
        self.event_idx = event_idx
        self.blk_extra = blk_extra
        # the emulated disk's -blockdev (its node-name must be disk0); default: a raw file in workdir
        self.blockdev = blockdev
        self.qtest_path = check_socket_path(os.path.join(workdir, "qtest.sock"))
        self.qmp_paths = [check_socket_path(os.path.join(workdir, f"qmp{i}.sock")) for i in range(max(1, qmp_sockets))]
        self.vhost_user_blk = list(vhost_user_blk)
        for d in self.vhost_user_blk:
            check_socket_path(d.socket)
        self.extra_args = list(extra_args)
        self.binary = binary
        self.timeout = timeout
        self.session: QtestSession | None = None

    @property
    def qmp_path(self) -> str:
        return self.qmp_paths[0]

    @property
    def blk_qom_path(self) -> str:
        """The virtio device's QOM path, as ``x-query-virtio`` reports it."""
        return f"/machine/peripheral/{self.BLK_ID}/virtio-backend"

    def command(self) -> list[str]:
        m = f"{self.mem_mb}M"
        argv = [self.binary, "-machine", "pc", "-accel", "tcg", "-nodefaults", "-display", "none",
                "-bios", os.path.join(self.workdir, "qtest-halt.bin"), "-m", m,
                "-object", f"memory-backend-memfd,id=mem,size={m},share=on", "-machine", "memory-backend=mem",
                "-qtest", f"unix:{self.qtest_path}", "-qtest-log", "none"]
        for p in self.qmp_paths:
            argv += ["-qmp", f"unix:{p},server=on,wait=off"]
        argv += ["-blockdev", self.blockdev or f"driver=file,filename={self.disk_path},node-name=disk0",
                 "-device", f"virtio-blk-pci,drive=disk0,id={self.BLK_ID},addr={self.BLK_SLOT:#x},num-queues=1,"
                            f"event_idx={'on' if self.event_idx else 'off'}{self.blk_extra}"]
        for i, d in enumerate(self.vhost_user_blk):
            chardev = f"socket,id=vuc{i},path={d.socket}"
            if d.reconnect is not None:
                chardev += f",reconnect={int(d.reconnect)}"
            argv += ["-chardev", chardev, "-device",
                     f"vhost-user-blk-pci,chardev=vuc{i},id=vublk{i},addr={self.BLK_SLOT + 1 + i:#x},"
                     f"num-queues={d.num_queues}{d.extra}"]
        return argv + self.extra_args

    def start(self) -> QtestVM:
        """Start QEMU and accept its qtest connection (bounded by *timeout*); on failure QEMU is stopped."""
        try:
            return self._start()
        except BaseException:
            self.stop()
            raise

    def _start(self) -> QtestVM:
        for p in (self.qtest_path, *self.qmp_paths):  # never remove what someone else made
            if os.path.lexists(p):
                raise QtestError(QtestErrorKind.USAGE, f"{p} already exists: give a workdir of your own")
        fw, blob = os.path.join(self.workdir, "qtest-halt.bin"), halt_firmware()
        if os.path.lexists(fw):  # another QtestVM in this workdir wrote it; anything else is not ours
            with open(fw, "rb") as f:
                if f.read() != blob:
                    raise QtestError(QtestErrorKind.USAGE, f"{fw} exists and is not the halt firmware")
        else:
            with open(fw, "xb") as f:
                f.write(blob)
        if not os.path.exists(self.disk_path):
            with open(self.disk_path, "wb") as f:
                f.truncate(self.disk_size)
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            listener.bind(self.qtest_path)
            listener.listen(1)
            self._spawn(self.command())
            deadline = time.monotonic() + self.timeout
            while True:
                listener.settimeout(0.1)
                try:
                    conn, _ = listener.accept()
                    break
                except TimeoutError:
                    pass
                if not self.running():
                    raise QtestError(QtestErrorKind.CLOSED, "QEMU exited before connecting to the qtest "
                                     "socket\n" + self.describe())
                if time.monotonic() > deadline:
                    raise QtestError(QtestErrorKind.TIMEOUT, f"QEMU did not connect to the qtest socket within "
                                     f"{self.timeout:.0f} s\n" + self.describe())
        finally:
            listener.close()
            os.unlink(self.qtest_path)
        self.session = QtestSession(conn, timeout=self.timeout)
        return self

    def qmp(self, index: int = 0, timeout: float = 5.0) -> QMPClient:
        """A new QMP connection on ``qmp_paths[index]`` (one client per socket); close it when done."""
        return open_qmp(self.qmp_paths[index], timeout, alive=self.running)

    def _polite_stop(self, timeout: float) -> bool:
        for p in self.qmp_paths:  # a socket whose one client slot is taken never greets: try the next
            if os.path.exists(p) and qmp_quit(p, min(timeout, 2.0)):
                return True
        return False

    def stop(self, grace: float = 10.0) -> int | None:
        if self.session is not None:
            self.session.close()
        return super().stop(grace)


# --- the virtio-blk driver ------------------------------------------------------------------------------

PCI_VENDOR_REDHAT_QUMRANET = 0x1AF4
VIRTIO_BLK_DEVICE_IDS = (0x1001, 0x1042)  # transitional, modern
CFG_ADDR, CFG_DATA = 0xCF8, 0xCFC
MMIO_BASE, MMIO_LIMIT = 0xE000_0000, 0xFEC0_0000  # inside i440fx's PCI hole, below the IOAPIC
MMIO_WINDOW = 1 << 20  # BARs of the function at slot N go to MMIO_BASE + N MiB (virtio-blk needs 20 KiB)
RAM_FIRST, RAM_WINDOW = 1 << 20, 1 << 20  # the driver for slot N allocates in [1 + N, 2 + N) MiB of RAM

# virtio 1.x feature bits and status
VIRTIO_F_VERSION_1 = 1 << 32
VIRTIO_RING_F_EVENT_IDX = 1 << 29
S_ACKNOWLEDGE, S_DRIVER, S_DRIVER_OK, S_FEATURES_OK, S_NEEDS_RESET, S_FAILED = 1, 2, 4, 8, 64, 128
VIRTIO_MSI_NO_VECTOR = 0xFFFF

# virtio_pci_common_cfg offsets
CC_DFSELECT, CC_DF, CC_GFSELECT, CC_GF = 0x00, 0x04, 0x08, 0x0C
CC_MSIX_CONFIG, CC_NUM_QUEUES, CC_STATUS = 0x10, 0x12, 0x14
CC_Q_SELECT, CC_Q_SIZE, CC_Q_MSIX, CC_Q_ENABLE, CC_Q_NOFF = 0x16, 0x18, 0x1A, 0x1C, 0x1E
CC_Q_DESC, CC_Q_AVAIL, CC_Q_USED = 0x20, 0x28, 0x30

STATUS_SENTINEL = 0xA5  # written into the status byte at publish; the device overwrites it


@dataclass(frozen=True)
class QtestBlkIo:
    """One virtio-blk request: a write of *data* at *sector*, or a read of *length* bytes (whose
    result, when *expect* is given, must equal it)."""
    op: int
    sector: int
    data: bytes = field(default=b"", repr=False)
    length: int = 0
    expect: bytes | None = field(default=None, repr=False)

    @classmethod
    def write(cls, sector: int, data: bytes) -> QtestBlkIo:
        return cls(VIRTIO_BLK_T_OUT, sector, bytes(data), len(data))

    @classmethod
    def read(cls, sector: int, length: int, expect: bytes | None = None) -> QtestBlkIo:
        return cls(VIRTIO_BLK_T_IN, sector, b"", length, expect)


@dataclass
class BlkCompletion:
    """A reaped used entry: its request, the device's status byte and used length, the data read."""
    request: QtestBlkIo
    head: int
    status: int
    used_len: int
    data: bytes = field(default=b"", repr=False)


@dataclass
class _Cap:
    bar: int
    offset: int
    length: int
    extra: int = 0  # notify_off_multiplier for the notify capability


@dataclass
class _Slot:
    head: int
    hdr: int  # 16-byte header, then the status byte at hdr + 16
    buf: int
    request: QtestBlkIo | None = None
    published_at: float = 0.0


@dataclass
class _Msix:
    table: int
    size: int
    pba: int
    words: dict[int, int] = field(default_factory=dict)  # vector -> guest RAM word the message lands in


class VirtioBlkQtestDriver:
    """A virtio-blk driver for one function on bus 0: modern virtio-pci, queue 0 as a split ring.

    ``setup()`` does the driver's part of initialisation (reset, ACKNOWLEDGE|DRIVER, features
    VERSION_1 [+ RING_EVENT_IDX], FEATURES_OK, MSI-X, queue 0, DRIVER_OK). Requests use fixed
    3-descriptor chains (header, data, status); ``num // 3`` may be in flight. Everything is guarded
    by one lock, so a :class:`HealthyWorkload` thread and the test can share the driver.
    """

    def __init__(self, session: QtestSession, *, slot: int = QtestVM.BLK_SLOT, queue_size: int = 64,
                 event_idx: bool = True, max_request_bytes: int = 16384, ram_base: int | None = None,
                 ram_size: int = RAM_WINDOW, mmio_base: int | None = None, timeout: float = 30.0):
        if not 0 <= slot < 32:
            raise QtestError(QtestErrorKind.USAGE, f"PCI slot {slot} is not 0..31")
        self.qt = session
        self.slot = slot
        self.want_num = queue_size
        self.want_event_idx = event_idx
        self.max_request_bytes = max_request_bytes
        self.timeout = timeout
        # each slot has its own guest-RAM and MMIO windows, so drivers for two functions never overlap
        base = RAM_FIRST + slot * RAM_WINDOW if ram_base is None else ram_base
        self._ram_next, self._ram_limit = base, base + ram_size
        self._mmio_next = MMIO_BASE + slot * MMIO_WINDOW if mmio_base is None else mmio_base
        self._mmio_limit = min(MMIO_LIMIT, self._mmio_next + MMIO_WINDOW) if mmio_base is None else MMIO_LIMIT
        self._lock = threading.RLock()
        self.bars: dict[int, int] = {}
        self.caps: dict[int, _Cap] = {}
        self.msix: _Msix | None = None
        self._msix_cap = 0
        self.features = 0
        self.device_features = 0
        self.num = 0
        self.desc = self.avail = self.used = 0
        self.notify_addr = 0
        self.capacity = 0
        self._avail_idx = 0  # the driver's shadow of avail.idx
        self._last_used = 0
        self._added_since_kick = 0
        self.notifies = 0
        self._free: list[_Slot] = []
        self._by_head: dict[int, _Slot] = {}

    # -- guest RAM allocator (bump; the driver never frees)
    def alloc(self, size: int, align: int = 16) -> int:
        addr = (self._ram_next + align - 1) & ~(align - 1)
        if addr + size > self._ram_limit:
            raise QtestError(QtestErrorKind.USAGE, f"guest RAM allocator exhausted ({size} bytes at {addr:#x})")
        self._ram_next = addr + size
        return addr

    # -- PCI configuration space through 0xcf8/0xcfc
    def _cfg_addr(self, off: int, fn: int = 0) -> int:
        return 0x8000_0000 | (self.slot << 11) | (fn << 8) | (off & 0xFC)

    def cfg_read(self, off: int, size: int = 4) -> int:
        self.qt.outl(CFG_ADDR, self._cfg_addr(off))
        port = CFG_DATA + (off & 3)
        return {1: self.qt.inb, 2: self.qt.inw, 4: self.qt.inl}[size](port)

    def cfg_write(self, off: int, value: int, size: int = 4) -> None:
        self.qt.outl(CFG_ADDR, self._cfg_addr(off))
        port = CFG_DATA + (off & 3)
        {1: self.qt.outb, 2: self.qt.outw, 4: self.qt.outl}[size](port, value)

    def _program_bars(self) -> None:
        bar = 0
        while bar < 6:
            off = 0x10 + 4 * bar
            orig = self.cfg_read(off)
            if orig & 1:  # an I/O BAR (legacy virtio): left unprogrammed, I/O decoding stays off
                bar += 1
                continue
            is64 = (orig >> 1) & 3 == 2
            self.cfg_write(off, 0xFFFF_FFFF)
            lo = self.cfg_read(off)
            size = (~(lo & ~0xF) + 1) & 0xFFFF_FFFF
            if is64:
                self.cfg_write(off + 4, 0xFFFF_FFFF)
                hi = self.cfg_read(off + 4)
                size = ((~((hi << 32) | (lo & ~0xF))) + 1) & 0xFFFF_FFFF_FFFF_FFFF
            if lo == 0 or size == 0:
                self.cfg_write(off, 0)
                bar += 2 if is64 else 1
                continue
            addr = (self._mmio_next + size - 1) & ~(size - 1)
            if addr + size > self._mmio_limit:
                raise QtestError(QtestErrorKind.USAGE, f"no room for BAR {bar} ({size:#x} bytes)")
            self._mmio_next = addr + size
            self.cfg_write(off, addr & 0xFFFF_FFFF)
            if is64:
                self.cfg_write(off + 4, addr >> 32)
            self.bars[bar] = addr
            bar += 2 if is64 else 1

    def _walk_caps(self) -> None:
        if not self.cfg_read(0x06, 2) & 0x10:
            raise QtestError(QtestErrorKind.NOT_FOUND, f"00:{self.slot:02x}.0 has no capability list")
        ptr, seen = self.cfg_read(0x34, 1) & 0xFC, 0
        while ptr and seen < 48:
            seen += 1
            cap_id, nxt = self.cfg_read(ptr, 1), self.cfg_read(ptr + 1, 1) & 0xFC
            if cap_id == 0x09:  # vendor-specific: struct virtio_pci_cap
                cfg_type, bar = self.cfg_read(ptr + 3, 1), self.cfg_read(ptr + 4, 1)
                if cfg_type in (1, 2, 3, 4) and cfg_type not in self.caps:
                    extra = self.cfg_read(ptr + 16) if cfg_type == 2 else 0
                    self.caps[cfg_type] = _Cap(bar, self.cfg_read(ptr + 8), self.cfg_read(ptr + 12), extra)
            elif cap_id == 0x11:  # MSI-X
                ctrl, table = self.cfg_read(ptr + 2, 2), self.cfg_read(ptr + 4)
                if (table & 7) not in self.bars:
                    raise QtestError(QtestErrorKind.NOT_FOUND, f"MSI-X table in unprogrammed BAR {table & 7}")
                pba = self.cfg_read(ptr + 8)
                if (pba & 7) not in self.bars:
                    raise QtestError(QtestErrorKind.NOT_FOUND, f"MSI-X PBA in unprogrammed BAR {pba & 7}")
                self.msix = _Msix(self.bars[table & 7] + (table & ~7), (ctrl & 0x7FF) + 1,
                                  self.bars[pba & 7] + (pba & ~7))
                self._msix_cap = ptr
            ptr = nxt
        for t, name in ((1, "common"), (2, "notify"), (3, "isr"), (4, "device")):
            if t not in self.caps or self.caps[t].bar not in self.bars:
                raise QtestError(QtestErrorKind.NOT_FOUND, f"no usable virtio-pci {name} configuration "
                                 f"capability (the device is legacy-only?)")

    def _cap_addr(self, t: int) -> int:
        c = self.caps[t]
        return self.bars[c.bar] + c.offset

    # common configuration accessors
    def _cc_w(self, off: int, v: int, size: int) -> None:
        a = self._cap_addr(1) + off
        {1: self.qt.writeb, 2: self.qt.writew, 4: self.qt.writel}[size](a, v)

    def _cc_r(self, off: int, size: int) -> int:
        a = self._cap_addr(1) + off
        return {1: self.qt.readb, 2: self.qt.readw, 4: self.qt.readl}[size](a)

    def status(self) -> int:
        """The device status byte."""
        return self._cc_r(CC_STATUS, 1)

    def setup(self) -> VirtioBlkQtestDriver:
        """Find the function, program it, negotiate, set up queue 0 and MSI-X, DRIVER_OK."""
        with self._lock:
            ident = self.cfg_read(0)
            if ident & 0xFFFF != PCI_VENDOR_REDHAT_QUMRANET or ident >> 16 not in VIRTIO_BLK_DEVICE_IDS:
                raise QtestError(QtestErrorKind.NOT_FOUND, f"00:{self.slot:02x}.0 is {ident:#010x}, not virtio-blk")
            self._program_bars()
            self.cfg_write(0x04, 0x0006, 2)  # memory space + bus master; I/O space off
            self._walk_caps()
            self._cc_w(CC_STATUS, 0, 1)
            deadline = time.monotonic() + self.timeout
            while self.status() != 0:
                if time.monotonic() > deadline:
                    raise QtestError(QtestErrorKind.TIMEOUT, "device reset did not complete")
                time.sleep(0.001)
            self._cc_w(CC_STATUS, S_ACKNOWLEDGE | S_DRIVER, 1)
            feats = 0
            for sel in (0, 1):
                self._cc_w(CC_DFSELECT, sel, 4)
                feats |= self._cc_r(CC_DF, 4) << (32 * sel)
            self.device_features = feats
            if not feats & VIRTIO_F_VERSION_1:
                raise QtestError(QtestErrorKind.NEGOTIATION, f"device does not offer VERSION_1 ({feats:#x})")
            want = VIRTIO_F_VERSION_1 | (VIRTIO_RING_F_EVENT_IDX if self.want_event_idx else 0)
            self.features = feats & want
            for sel in (0, 1):
                self._cc_w(CC_GFSELECT, sel, 4)
                self._cc_w(CC_GF, (self.features >> (32 * sel)) & 0xFFFF_FFFF, 4)
            self._cc_w(CC_STATUS, S_ACKNOWLEDGE | S_DRIVER | S_FEATURES_OK, 1)
            if not self.status() & S_FEATURES_OK:
                raise QtestError(QtestErrorKind.NEGOTIATION, f"device refused features {self.features:#x}")
            self.capacity = self.qt.readq(self._cap_addr(4))  # struct virtio_blk_config.capacity
            self._setup_msix()
            self._setup_queue()
            self._cc_w(CC_STATUS, S_ACKNOWLEDGE | S_DRIVER | S_FEATURES_OK | S_DRIVER_OK, 1)
        return self

    def _setup_msix(self) -> None:
        if self.msix is None:
            raise QtestError(QtestErrorKind.NOT_FOUND, "the function has no MSI-X capability")
        for vec in range(min(2, self.msix.size)):
            word = self.alloc(4, 4)
            self.qt.writel(word, 0)
            e = self.msix.table + 16 * vec
            self.qt.writel(e, word & 0xFFFF_FFFF)
            self.qt.writel(e + 4, word >> 32)
            self.qt.writel(e + 8, 0x4B43_0000 | vec)  # "KC" + vector: never 0, so a delivery is visible
            self.qt.writel(e + 12, 0)  # unmasked
            self.msix.words[vec] = word
        ctrl = self.cfg_read(self._msix_cap + 2, 2)
        self.cfg_write(self._msix_cap + 2, (ctrl | 0x8000) & ~0x4000, 2)  # enable, function unmasked
        self._cc_w(CC_MSIX_CONFIG, 0, 2)
        if self._cc_r(CC_MSIX_CONFIG, 2) != 0:
            raise QtestError(QtestErrorKind.NEGOTIATION, "device refused MSI-X vector 0 for configuration changes")

    def _setup_queue(self) -> None:
        self._cc_w(CC_Q_SELECT, 0, 2)
        qmax = self._cc_r(CC_Q_SIZE, 2)
        if qmax == 0:
            raise QtestError(QtestErrorKind.NEGOTIATION, "queue 0 does not exist")
        num = min(self.want_num, qmax)
        if num < 3 or num & (num - 1):
            raise QtestError(QtestErrorKind.USAGE, f"queue size {num} (device maximum {qmax}) is not a power of 2 >= 4")
        self.num = num
        self._cc_w(CC_Q_SIZE, num, 2)
        self.desc = self.alloc(desc_table_size(num), 4096)
        self.avail = self.alloc(avail_size(num), 4096)
        self.used = self.alloc(used_size(num), 4096)
        for a, n in ((self.desc, desc_table_size(num)), (self.avail, avail_size(num)), (self.used, used_size(num))):
            self.qt.memwrite(a, bytes(n))
        for off, a in ((CC_Q_DESC, self.desc), (CC_Q_AVAIL, self.avail), (CC_Q_USED, self.used)):
            self._cc_w(off, a & 0xFFFF_FFFF, 4)
            self._cc_w(off + 4, a >> 32, 4)
        self._cc_w(CC_Q_MSIX, 1, 2)
        if self._cc_r(CC_Q_MSIX, 2) != 1:
            raise QtestError(QtestErrorKind.NEGOTIATION, "device refused MSI-X vector 1 for queue 0")
        noff = self._cc_r(CC_Q_NOFF, 2)
        self.notify_addr = self._cap_addr(2) + noff * self.caps[2].extra
        self._cc_w(CC_Q_ENABLE, 1, 2)
        for i in range(num // 3):
            hdr = self.alloc(32, 16)
            buf = self.alloc(self.max_request_bytes, 512)
            s = _Slot(3 * i, hdr, buf)
            self._free.append(s)
            self._by_head[s.head] = s

    # -- ring accessors
    @property
    def event_idx(self) -> bool:
        return bool(self.features & VIRTIO_RING_F_EVENT_IDX)

    @property
    def avail_idx(self) -> int:
        """The driver's avail.idx (what it last wrote)."""
        return self._avail_idx

    @property
    def last_used(self) -> int:
        """The used index the driver has consumed up to."""
        return self._last_used

    @property
    def in_flight(self) -> int:
        return len(self._by_head) - len(self._free)

    def avail_idx_mem(self) -> int:
        return self.qt.readw(avail_idx_addr(self.avail))

    def used_idx(self) -> int:
        """used.idx in guest memory (what the device has completed up to)."""
        return self.qt.readw(used_idx_addr(self.used))

    def used_flags(self) -> int:
        return self.qt.readw(used_flags_addr(self.used))

    def used_event(self) -> int:
        """avail->ring[num]: the driver's used_event (meaningful with EVENT_IDX)."""
        return self.qt.readw(used_event_addr(self.avail, self.num))

    def set_used_event(self, value: int) -> None:
        self.qt.writew(used_event_addr(self.avail, self.num), value)

    def avail_event(self) -> int:
        """used->ring[num]: the device's avail_event (QEMU writes it with EVENT_IDX)."""
        return self.qt.readw(avail_event_addr(self.used, self.num))

    def interrupt_pending(self, vector: int = 1) -> bool:
        """Has an MSI-X message for *vector* (1: queue 0, 0: configuration) landed since the last ack?"""
        if self.msix is None or vector not in self.msix.words:
            return False
        return self.qt.readl(self.msix.words[vector]) != 0

    def ack_interrupt(self, vector: int = 1) -> None:
        if self.msix is not None and vector in self.msix.words:
            self.qt.writel(self.msix.words[vector], 0)

    def set_vector_masked(self, vector: int, masked: bool) -> None:
        """Mask or unmask an MSI-X vector in the table (a masked vector's messages stay pending in the
        PBA and are sent when it is unmasked: the way a driver withholds its own interrupt)."""
        if self.msix is None or not 0 <= vector < self.msix.size:
            raise QtestError(QtestErrorKind.USAGE, f"no MSI-X vector {vector}")
        self.qt.writel(self.msix.table + 16 * vector + 12, 1 if masked else 0)

    def vector_pending(self, vector: int = 1) -> bool:
        """The vector's bit in the MSI-X Pending Bit Array."""
        if self.msix is None or not 0 <= vector < self.msix.size:
            raise QtestError(QtestErrorKind.USAGE, f"no MSI-X vector {vector}")
        return bool(self.qt.readl(self.msix.pba + 4 * (vector // 32)) >> (vector % 32) & 1)

    def state(self) -> dict:
        """The driver's view and the ring in guest memory, as numbers (for evidence and assertions)."""
        with self._lock:
            return {
                "num": self.num, "desc": self.desc, "avail": self.avail, "used": self.used,
                "features": self.features, "event_idx": self.event_idx, "status": self.status(),
                "avail_idx": self._avail_idx, "avail_idx_mem": self.avail_idx_mem(),
                "used_idx": self.used_idx(), "last_used": self._last_used, "used_flags": self.used_flags(),
                "used_event": self.used_event(), "avail_event": self.avail_event(),
                "in_flight": self.in_flight, "notifies": self.notifies, "notify_addr": self.notify_addr,
                "interrupt_pending": self.interrupt_pending(1),
            }

    # -- requests
    def _check(self, r: QtestBlkIo) -> None:
        if r.op not in (VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT):
            raise QtestError(QtestErrorKind.USAGE, f"request type {r.op} is not a read or a write")
        if r.length <= 0 or r.length % SECTOR or r.length > self.max_request_bytes:
            raise QtestError(QtestErrorKind.USAGE, f"request length {r.length} is not a multiple of {SECTOR} "
                             f"in 1..{self.max_request_bytes}")
        if r.sector < 0 or r.sector + r.length // SECTOR > self.capacity:
            raise QtestError(QtestErrorKind.USAGE, f"sectors {r.sector}+{r.length // SECTOR} beyond the "
                             f"capacity {self.capacity}")
        if r.expect is not None and len(r.expect) != r.length:
            raise QtestError(QtestErrorKind.USAGE, "expected data length differs from the read length")

    def publish(self, requests: Iterable[QtestBlkIo], notify: bool = True) -> bool:
        """Put *requests* on the avail ring and bump avail.idx once. With *notify*, decide like Linux's
        ``virtqueue_kick_prepare`` (EVENT_IDX: ``vring_need_event(avail_event, new, old)`` over
        everything added since the last decision; otherwise ``!(used.flags & NO_NOTIFY)``) and notify
        if needed. True when the device was notified."""
        reqs = list(requests)
        for r in reqs:
            self._check(r)
        with self._lock:
            if len(reqs) > len(self._free):
                raise QtestError(QtestErrorKind.RING, f"{len(reqs)} request(s) but only {len(self._free)} "
                                 f"free descriptor chain(s) ({self.in_flight} in flight)")
            idx = self._avail_idx
            for r in reqs:
                s = self._free.pop(0)
                s.request, s.published_at = r, time.monotonic()
                if r.op == VIRTIO_BLK_T_OUT:
                    self.qt.memwrite(s.buf, r.data)
                self.qt.memwrite(s.hdr, BLK_HDR.pack(r.op, 0, r.sector) + bytes([STATUS_SENTINEL]))
                dflags = VRING_DESC_F_NEXT | (VRING_DESC_F_WRITE if r.op == VIRTIO_BLK_T_IN else 0)
                chain = DESC.pack(s.hdr, 16, VRING_DESC_F_NEXT, s.head + 1)
                chain += DESC.pack(s.buf, r.length, dflags, s.head + 2)
                chain += DESC.pack(s.hdr + 16, 1, VRING_DESC_F_WRITE, 0)
                self.qt.memwrite(desc_addr(self.desc, s.head), chain)
                self.qt.writew(avail_ring_addr(self.avail, idx % self.num), s.head)
                idx = (idx + 1) & 0xFFFF
            self.qt.writew(avail_idx_addr(self.avail), idx)  # publishes the entries (qtest serialises: no barrier needed)
            self._avail_idx = idx
            self._added_since_kick += len(reqs)
            if not notify:
                return False
            return self.kick()

    def kick(self) -> bool:
        """``virtqueue_kick``: notify if the device asked for it; True when it was notified."""
        with self._lock:
            new, old = self._avail_idx, (self._avail_idx - self._added_since_kick) & 0xFFFF
            self._added_since_kick = 0
            if self.event_idx:
                need = vring_need_event(self.avail_event(), new, old)
            else:
                need = not self.used_flags() & VRING_USED_F_NO_NOTIFY
            if need:
                self.notify()
            return need

    def notify(self) -> None:
        """Write the queue index to queue 0's notify address (unconditionally)."""
        with self._lock:
            self.qt.writew(self.notify_addr, 0)
            self.notifies += 1

    def wait_used(self, n: int = 1, timeout: float | None = None) -> int:
        """Wait until at least *n* used entries are there to consume; the used index. Polls guest memory."""
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        while True:
            u = self.used_idx()
            if (u - self._last_used) & 0xFFFF >= n:
                return u
            if time.monotonic() > deadline:
                raise QtestError(QtestErrorKind.TIMEOUT, f"used.idx {u} did not reach last_used {self._last_used}"
                                 f" + {n} within {self.timeout if timeout is None else timeout:.1f} s "
                                 f"(avail.idx {self._avail_idx})")
            time.sleep(0.0005)

    def consume(self, update_used_event: bool = True) -> list[BlkCompletion]:
        """Reap every used entry: check status OK, and for reads with *expect* the data; free the chains.
        With *update_used_event* (and EVENT_IDX) write used_event = the new last used index, as Linux's
        ``virtqueue_enable_cb_prepare`` does when it re-enables callbacks."""
        out: list[BlkCompletion] = []
        with self._lock:
            u = self.used_idx()
            pending = (u - self._last_used) & 0xFFFF
            if pending > self.num:
                raise QtestError(QtestErrorKind.RING, f"used.idx {u} is {pending} ahead of last_used "
                                 f"{self._last_used}, more than the ring's {self.num}")
            if pending:
                start = self._last_used % self.num
                first = min(pending, self.num - start)
                raw = self.qt.memread(used_elem_addr(self.used, start), USED_ELEM_SIZE * first)
                if pending > first:
                    raw += self.qt.memread(used_elem_addr(self.used, 0), USED_ELEM_SIZE * (pending - first))
                for i in range(pending):
                    head, used_len = USED_ELEM.unpack_from(raw, USED_ELEM_SIZE * i)
                    s = self._by_head.get(head)
                    if s is None or s.request is None:
                        raise QtestError(QtestErrorKind.RING, f"the device used id {head}, which is not an "
                                         f"in-flight chain head")
                    r = s.request
                    status = self.qt.readb(s.hdr + 16)
                    data = self.qt.memread(s.buf, r.length) if r.op == VIRTIO_BLK_T_IN else b""
                    s.request = None
                    self._free.append(s)
                    self._last_used = (self._last_used + 1) & 0xFFFF
                    c = BlkCompletion(r, head, status, used_len, data)
                    out.append(c)
                    if status != VIRTIO_BLK_S_OK:
                        raise QtestError(QtestErrorKind.DATA, f"request {'read' if r.op == 0 else 'write'} at "
                                         f"sector {r.sector} completed with status {status:#x}")
                    if r.expect is not None and data != r.expect:
                        bad = next(i for i in range(len(data)) if data[i] != r.expect[i])
                        raise QtestError(QtestErrorKind.DATA, f"read at sector {r.sector}: byte {bad} is "
                                         f"{data[bad]:#04x}, expected {r.expect[bad]:#04x}")
            if update_used_event and self.event_idx:
                self.set_used_event(self._last_used)
        return out

    def io(self, requests: Sequence[QtestBlkIo], timeout: float | None = None) -> list[BlkCompletion]:
        """Publish with a kick, wait for all of them, consume: synchronous I/O."""
        with self._lock:
            self.publish(requests, notify=True)
            self.wait_used(len(requests), timeout)
            return self.consume(True)


# --- a healthy background workload ----------------------------------------------------------------------

class HealthyWorkload:
    """A thread doing verified write + read-back rounds (``depth`` requests each) through the driver,
    with kicks and consumption, until ``stop()``; sectors cycle through ``[first, first + span)``."""

    def __init__(self, driver: VirtioBlkQtestDriver, *, first_sector: int = 2048, span: int = 256,
                 depth: int = 1, size: int = 4096, timeout: float = 30.0):
        self.driver = driver
        self.first, self.span, self.depth, self.size, self.timeout = first_sector, span, depth, size, timeout
        self.rounds = 0
        self.error: BaseException | None = None
        self._stop = threading.Event()
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None

    def start(self) -> HealthyWorkload:
        if self._thread is not None:
            raise QtestError(QtestErrorKind.USAGE, "workload already started")
        self._thread = named_thread(self._run, "kc-qtest-wl")
        self._thread.start()
        return self

    def _run(self) -> None:
        step = self.size // SECTOR
        n = 0
        try:
            while not self._stop.is_set():
                secs = [self.first + ((n * self.depth + i) * step) % self.span for i in range(self.depth)]
                datas = [(f"kc-healthy-{n}-{s}-".encode() * (self.size // 8 + 1))[:self.size] for s in secs]
                self.driver.io([QtestBlkIo.write(s, d) for s, d in zip(secs, datas, strict=True)], self.timeout)
                self.driver.io([QtestBlkIo.read(s, self.size, d) for s, d in zip(secs, datas, strict=True)], self.timeout)
                n += 1
                with self._cond:
                    self.rounds = n
                    self._cond.notify_all()
        except BaseException as e:  # reported by wait_rounds()/stop(), never lost in a thread
            with self._cond:
                self.error = e
                self._cond.notify_all()

    def wait_rounds(self, n: int, timeout: float = 60.0) -> int:
        """Wait until *n* rounds completed; raises the workload's error if it failed."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while self.rounds < n and self.error is None:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise QtestError(QtestErrorKind.TIMEOUT, f"workload did {self.rounds} of {n} rounds in {timeout} s")
                self._cond.wait(min(left, 1.0))
            if self.error is not None:
                raise self.error
            return self.rounds

    def stop(self, timeout: float = 60.0) -> int:
        """Stop after the current round; the number of rounds. Raises the workload's error if any."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():
                raise QtestError(QtestErrorKind.TIMEOUT, f"workload thread still running after {timeout} s")
        if self.error is not None:
            raise self.error
        return self.rounds

    def __enter__(self) -> HealthyWorkload:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
