"""EventNotifier over a real Linux eventfd, and the registry of every notifier of a machine.

An ``EventNotifier`` is QEMU's name for an eventfd used as a doorbell.  ``set()`` adds to the
counter, ``test_and_clear()`` consumes it (the only reading QEMU has), and ``peek()`` reads it
*without consuming it* from the ``eventfd-count:`` line of ``/proc/self/fdinfo/<fd>`` -- the
non-destructive view an operator needs on a live, hung device.

fd numbers are reused by the kernel, so a kept-open fdinfo file could silently start describing
another file.  Every eventfd shares the one anonymous inode (``ino:`` is the same for all of them),
so the identity check uses ``eventfd-id:`` (kernels >= 6.0) together with ``ino:``.  The kernel
recycles eventfd ids as soon as an eventfd is freed, so each notifier also keeps a private
duplicate of its fd: the eventfd context (and with it its id) lives as long as the notifier, and
an fd number that was closed behind the notifier's back and reused by a new eventfd shows a
different id.  On older kernels only ``ino:`` can be checked (``identity_checked`` is False).
"""

from __future__ import annotations

import enum
import itertools
import os
import threading
from dataclasses import dataclass
from typing import Iterator, Protocol

__all__ = [
    "EventNotifier",
    "NotifierError",
    "NotifierRegistry",
    "NotifierEntry",
    "Role",
    "read_fdinfo",
    "peek_fd",
]

EFD_FLAGS = os.EFD_NONBLOCK | os.EFD_CLOEXEC


class NotifierError(OSError):
    """A notifier's fd no longer refers to the eventfd it was created for, or it is closed."""


class Role(str, enum.Enum):
    """What a notifier carries, in the vocabulary of QEMU and vhost."""

    HOST = "host"  # kick: driver -> device (ioeventfd, vhost kick fd)
    GUEST = "guest"  # call: device -> driver (irqfd, vhost call fd)
    MASKED = "masked"  # call while the vector is masked: polled by the VMM into the PBA
    CONFIG = "config"  # config-change interrupt
    ERR = "err"  # vhost-user SET_VRING_ERR
    REQ = "req"  # device request (VFIO REQ)


def _parse_fdinfo(data: bytes) -> dict[str, str]:
    out: dict[str, str] = {}
    for line in data.split(b"\n"):
        k, sep, v = line.partition(b":")
        if sep:
            out[k.decode("ascii", "replace").strip()] = v.decode("ascii", "replace").strip()
    return out


def read_fdinfo(fd: int, pid: int | None = None) -> dict[str, str]:
    """Return the fdinfo fields of *fd* (of process *pid*, default this one)."""
    path = f"/proc/{'self' if pid is None else pid}/fdinfo/{fd}"
    with open(path, "rb") as f:
        return _parse_fdinfo(f.read())


def peek_fd(fd: int, pid: int | None = None) -> int:
    """Read the counter of eventfd *fd* (of process *pid*) without consuming it."""
    info = read_fdinfo(fd, pid)
    if "eventfd-count" not in info:
        raise NotifierError(f"fd {fd} is not an eventfd")
    return int(info["eventfd-count"], 16)


_fallback_ids = itertools.count(1 << 40)


class EventNotifierLike(Protocol):
    """What the memory and hypervisor layers need of a notifier: its fd and a stable identity
    (EventNotifier has both; KVM would take the fd)."""

    def fileno(self) -> int: ...

    @property
    def ident(self) -> int: ...


class EventNotifier:
    """A real Linux eventfd used as a doorbell (QEMU ``EventNotifier``).

    Counters: ``sets`` is how many times this object wrote it, ``set_value`` the sum it wrote,
    ``consumed`` the sum read back by ``test_and_clear``, ``clears`` how many ``test_and_clear``
    calls found it set -- all monotonic.  ``total()`` = consumed + current peek counts every write
    whoever made it, as long as this process is the only reader (an ioeventfd the VMM consumes, a
    back-end's kick fd).  For an fd another process reads (an irqfd the hypervisor consumes, a
    call fd QEMU reads) ``total()`` is not a running total: the other reader's reads are invisible
    here, and it drops when they happen; use ``sets`` and the hypervisor's own counts there.
    """

    __slots__ = (
        "_fd",
        "name",
        "sets",
        "set_value",
        "consumed",
        "clears",
        "_info_fd",
        "_ino",
        "_efd_id",
        "_fallback_id",
        "_pin",
        "_mu",
        "__weakref__",
    )

    def __init__(self, name: str = "", *, fd: int | None = None, initval: int = 0) -> None:
        if fd is None:
            fd = os.eventfd(initval, EFD_FLAGS)
        else:
            os.set_blocking(fd, False)
        self._fd = fd
        self.name = name
        self.sets = 0
        self.set_value = 0
        self.consumed = 0
        self.clears = 0
        self._info_fd: int | None = None
        self._mu = threading.Lock()
        self._fallback_id: int | None = None
        self._pin = -1
        info = read_fdinfo(fd)
        if "eventfd-count" not in info:
            self._fd = -1  # not adopted: the fd stays the caller's to close
            raise NotifierError(f"fd {fd} is not an eventfd")
        self._ino = info.get("ino")
        self._efd_id = info.get("eventfd-id")  # None on kernels before 6.0
        self._pin = os.dup(fd)  # keeps the eventfd context, and so its id, alive with the notifier
        os.set_inheritable(self._pin, False)

    # -- identity ---------------------------------------------------------------------------
    @classmethod
    def adopt(cls, fd: int, name: str = "") -> "EventNotifier":
        """Wrap an eventfd received from elsewhere (SCM_RIGHTS); the notifier owns it from now on."""
        return cls(name, fd=fd)

    def fileno(self) -> int:
        if self._fd < 0:
            raise NotifierError(f"notifier {self.name!r} is closed")
        return self._fd

    @property
    def fd(self) -> int:
        return self._fd

    @property
    def closed(self) -> bool:
        return self._fd < 0

    @property
    def ident(self) -> int:
        """A system-wide identity of the eventfd context (``eventfd-id``), the same in every
        process that holds a copy of the fd.  Falls back to a process-unique number."""
        if self._efd_id is not None:
            return int(self._efd_id)
        with self._mu:
            if self._fallback_id is None:
                self._fallback_id = next(_fallback_ids)
            return self._fallback_id

    @property
    def identity_checked(self) -> bool:
        """True when peek() can tell this eventfd from any other (the kernel shows eventfd-id)."""
        return self._efd_id is not None

    # -- the doorbell -----------------------------------------------------------------------
    def set(self, value: int = 1) -> None:
        """Ring the doorbell (``event_notifier_set``)."""
        # the write happens under the lock close() takes to retire the fd: a set racing a close
        # either writes the live eventfd or finds it closed -- never writes a closed fd number,
        # which the kernel may already have given to another file
        with self._mu:
            fd = self._fd
            if fd < 0:
                raise NotifierError(f"notifier {self.name!r} is closed")
            os.eventfd_write(fd, value)
            self.sets += 1
            self.set_value += value

    def test_and_clear(self) -> int:
        """Consume the counter; return the value consumed (0 when it was not set)."""
        fd = self._fd
        if fd < 0:
            raise NotifierError(f"notifier {self.name!r} is closed")
        try:
            v = os.eventfd_read(fd)
        except BlockingIOError:
            return 0
        mu = self._mu
        mu.acquire()
        self.consumed += v
        self.clears += 1
        mu.release()
        return v

    def peek(self) -> int:
        """The current counter, read without consuming it (``/proc/self/fdinfo``)."""
        fd = self.fileno()
        info_fd = self._info_fd
        if info_fd is None:
            info_fd = os.open(f"/proc/self/fdinfo/{fd}", os.O_RDONLY | os.O_CLOEXEC)
            with self._mu:
                if self._info_fd is None:
                    self._info_fd = info_fd
                else:
                    os.close(info_fd)
                    info_fd = self._info_fd
        try:
            data = os.pread(info_fd, 512, 0)
        except OSError as e:  # the fd number was closed behind our back
            raise NotifierError(f"notifier {self.name!r}: fdinfo of fd {fd} unreadable: {e}") from e
        info = _parse_fdinfo(data)
        if info.get("ino") != self._ino or info.get("eventfd-id") != self._efd_id:
            raise NotifierError(f"notifier {self.name!r}: fd {fd} now refers to another file")
        try:
            return int(info["eventfd-count"], 16)
        except KeyError:
            raise NotifierError(f"notifier {self.name!r}: fd {fd} is no longer an eventfd") from None

    def is_semaphore(self) -> bool | None:
        """True when the eventfd was created with EFD_SEMAPHORE (a read takes 1, not the whole
        counter, so the fd stays readable), as ``eventfd-semaphore:`` in fdinfo says; None on a
        kernel whose fdinfo does not show it."""
        info = read_fdinfo(self.fileno())
        v = info.get("eventfd-semaphore")
        return None if v is None else v.strip() not in ("0", "")

    def total(self) -> int:
        """Every value ever written to the eventfd by anyone: consumed + pending."""
        return self.consumed + self.peek()

    def counters(self) -> dict[str, int]:
        try:
            pending = self.peek()
        except (NotifierError, OSError):
            pending = -1
        with self._mu:
            return {
                "sets": self.sets,
                "set-value": self.set_value,
                "consumed": self.consumed,
                "clears": self.clears,
                "pending": pending,
                "total": self.consumed + max(pending, 0),
            }

    def close(self) -> None:
        """Close the eventfd and the kept-open fdinfo file with it."""
        with self._mu:
            fd, self._fd = self._fd, -1
            info_fd, self._info_fd = self._info_fd, None
            pin, self._pin = self._pin, -1
        if info_fd is not None:
            os.close(info_fd)
        if fd >= 0:
            try:
                os.close(fd)
            except OSError:  # closed behind our back
                pass
        if pin >= 0:
            os.close(pin)

    def __enter__(self) -> "EventNotifier":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"EventNotifier({self.name!r}, fd={self._fd})"


@dataclass
class NotifierEntry:
    """One notifier of a machine, as the registry (and the monitor) sees it."""

    id: int
    owner: str
    role: Role
    notifier: EventNotifier
    queue: int | None = None
    vector: int | None = None
    note: str = ""

    def describe(self) -> dict:
        d: dict = {
            "id": self.id,
            "owner": self.owner,
            "role": self.role.value,
            "name": self.notifier.name,
            "fd": self.notifier.fd,
        }
        if self.queue is not None:
            d["queue"] = self.queue
        if self.vector is not None:
            d["vector"] = self.vector
        if self.note:
            d["note"] = self.note
        if not self.notifier.closed:
            d.update(self.notifier.counters())
        return d


class NotifierRegistry:
    """Every notifier of a machine: id (never reused), owner device, role, queue or vector."""

    def __init__(self) -> None:
        self._mu = threading.Lock()
        self._ids = itertools.count(1)
        self._entries: dict[int, NotifierEntry] = {}

    def register(
        self,
        notifier: EventNotifier,
        owner: str,
        role: Role,
        *,
        queue: int | None = None,
        vector: int | None = None,
        note: str = "",
    ) -> NotifierEntry:
        with self._mu:
            e = NotifierEntry(next(self._ids), owner, Role(role), notifier, queue, vector, note)
            self._entries[e.id] = e
            return e

    def unregister(self, entry_or_notifier: NotifierEntry | EventNotifier | int) -> None:
        with self._mu:
            if isinstance(entry_or_notifier, int):
                self._entries.pop(entry_or_notifier, None)
                return
            if isinstance(entry_or_notifier, NotifierEntry):
                self._entries.pop(entry_or_notifier.id, None)
                return
            for k, e in list(self._entries.items()):
                if e.notifier is entry_or_notifier:
                    del self._entries[k]

    def update(self, notifier: EventNotifier, **fields: object) -> None:
        with self._mu:
            for e in self._entries.values():
                if e.notifier is notifier:
                    for k, v in fields.items():
                        setattr(e, k, v)

    def get(self, id: int) -> NotifierEntry | None:
        with self._mu:
            return self._entries.get(id)

    def entries(self, owner: str | None = None) -> list[NotifierEntry]:
        with self._mu:
            es = list(self._entries.values())
        return [e for e in es if owner is None or e.owner == owner]

    def __iter__(self) -> Iterator[NotifierEntry]:
        return iter(self.entries())

    def __len__(self) -> int:
        with self._mu:
            return len(self._entries)

    def snapshot(self, owner: str | None = None) -> list[dict]:
        return [e.describe() for e in self.entries(owner)]
