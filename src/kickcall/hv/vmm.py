"""The VMM's handle on the software hypervisor: ``VM`` (the KVM VM fd, in effect).

* ioctls -- ``ioeventfd``, ``irqfd``, ``set_gsi_routing``, ``signal_msi``, ``irq_line``,
  ``pause_vcpus`` / ``resume_vcpus`` -- each sent over the hypervisor channel and acknowledged
  only when it has taken effect in the kernel half;
* heavyweight exits from the guest's vCPUs, each handled on a VMM vCPU thread (as QEMU's vCPU
  threads handle KVM_EXIT_MMIO) while the guest vCPU waits;
* ``MsiRoutes``: the GSI allocator for MSI routes (QEMU's kvm_irqchip_add_msi_route + commit),
  with the route limit and a clear error when it is exhausted;
* the shared counter page (``HvStats``), read without asking the guest.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import queue
import socket
import threading
import time
from typing import Callable

from ..memory import GuestMemory
from ..notify import EventNotifierLike
from . import abi
from .abi import EXIT, EXIT_REPLY, IRQ_LINE, MSI, REPLY_STATUS, ChannelClosed, HypervisorError
from .channel import Channel
from .routing import IrqchipRoute, MsiRoute, Route
from .stats import HvStats
from ..threads import named_thread

__all__ = ["VM", "MsiRoutes", "ExitHandler"]

log = logging.getLogger("kickcall.hv.vmm")


ExitHandler = Callable[[int, int, int, int, int], int]  # code, addr, value, size, vcpu -> value


class _ExitRecord:
    __slots__ = ("seq", "code", "addr", "value", "size", "pid", "tid", "t_ns", "vcpu")
    seq: int
    code: int
    addr: int
    value: int
    size: int
    pid: int
    tid: int
    t_ns: int
    vcpu: int


_MAX_RETIRED = 4096


class VM:
    """The VMM side of the hypervisor channel."""

    def __init__(self, sock: socket.socket, memory: GuestMemory, nvcpus: int, *,
                 exit_handler: ExitHandler | None = None,
                 event_handler: Callable[[dict], None] | None = None,
                 max_routes: int = abi.KVM_MAX_IRQ_ROUTES,
                 on_guest_gone: Callable[[], None] | None = None,
                 name: str = "vm", ioctl_timeout: float = 30.0, hypervisor: str = "kvm",
                 xen_domid: int = 1, xen_nr_pirqs: int | None = None) -> None:
        self.name = name
        self.hypervisor = hypervisor
        self.xen_domid = xen_domid
        self.xen_nr_pirqs = xen_nr_pirqs
        self.memory = memory
        self.nvcpus = nvcpus
        self.stats = HvStats()
        self.exit_handler = exit_handler
        self.event_handler = event_handler
        self.on_guest_gone = on_guest_gone
        self.max_routes = max_routes
        self.ioctl_timeout = ioctl_timeout
        self.guest_pid: int | None = None
        self.guest_gone = threading.Event()
        self.ioctl_counts: dict[str, int] = {}
        self.exit_counts: dict[str, int] = {}
        self.last_exit: dict[int, tuple[int, int]] = {}  # vcpu -> (pid, tid) seen in its last exit
        self._ioeventfd_slots: dict[tuple, int] = {}
        # per notifier ident: the hits of its deassigned ioeventfds (the hypervisor's count at the
        # deassign), until ioeventfd_writes(retire=True) takes them
        self._retired_writes: dict[int, int] = {}
        self._workers: dict[int, tuple[queue.SimpleQueue, threading.Thread]] = {}
        self._wmu = threading.Lock()
        self._stopping = False
        self.exit_hook: Callable[[_ExitRecord], None] | None = None  # tests: observe each exit
        self.channel = Channel(sock, f"{name}-hv", on_request=self._on_exit,
                               on_message=self._on_message, on_close=self._on_close)

    # -- life cycle ---------------------------------------------------------------------------------
    def start(self) -> None:
        self.channel.start()
        regions, fds = self.memory.layout()
        req = {"regions": regions, "nblocks": len(fds), "nvcpus": self.nvcpus, "max_routes": self.max_routes,
               "hypervisor": self.hypervisor}
        if self.hypervisor == "xen":
            req["domid"] = self.xen_domid
            if self.xen_nr_pirqs is not None:
                req["nr_pirqs"] = self.xen_nr_pirqs
        rep = self._ioctl(abi.IOCTL_SET_MEMORY, req, fds=fds + [self.stats.fd])
        self.guest_pid = int(rep.get("pid", 0)) or None

    def shutdown(self, timeout: float = 10.0) -> None:
        """Ask the guest to shut down (acknowledged), then stop the exit workers."""
        if not self.channel.closed:
            try:
                self._ioctl(abi.IOCTL_SHUTDOWN, {}, timeout=timeout)
            except (ChannelClosed, TimeoutError, HypervisorError):
                pass
        self.stop_workers()

    def stop_workers(self) -> None:
        self._stopping = True
        with self._wmu:
            workers = list(self._workers.values())
            self._workers.clear()
        for q, _t in workers:
            q.put(None)
        for _q, t in workers:
            if t is not threading.current_thread():
                t.join(10)

    def close(self) -> None:
        self.stop_workers()
        self.channel.close()
        self.stats.close()

    def _on_close(self) -> None:
        self.guest_gone.set()
        if self.on_guest_gone is not None:
            try:
                self.on_guest_gone()
            except Exception:
                log.exception("on_guest_gone failed")

    # -- ioctls -------------------------------------------------------------------------------------
    def _ioctl(self, code: int, req: dict | None = None, *, raw: bytes | None = None,
               fds: list[int] | tuple[int, ...] = (), timeout: float | None = None) -> dict:
        name = abi.IOCTL_NAMES.get(code, str(code))
        self.ioctl_counts[name] = self.ioctl_counts.get(name, 0) + 1
        payload = raw if raw is not None else json.dumps(req or {}).encode()
        rep, rfds = self.channel.request(code, payload, fds,
                                         timeout=self.ioctl_timeout if timeout is None else timeout)
        for fd in rfds:
            os.close(fd)
        if len(rep) < REPLY_STATUS.size:
            raise HypervisorError(errno.EPROTO, f"short reply to {name}")
        (status,) = REPLY_STATUS.unpack_from(rep)
        body = json.loads(rep[REPLY_STATUS.size:].decode()) if len(rep) > REPLY_STATUS.size else {}
        if status < 0:
            raise HypervisorError(-status, f"{name}: {body.get('error', os.strerror(-status))}")
        return body or {}

    def ioeventfd(self, *, space: str, addr: int, length: int, notifier: EventNotifierLike,
                  datamatch: int | None = None, deassign: bool = False) -> int:
        """KVM_IOEVENTFD: bind (or unbind) *notifier* to guest writes at *addr*; returns the stats slot."""
        req = {"space": space, "addr": addr, "length": length, "ident": notifier.ident,
               "deassign": deassign}
        if datamatch is not None:
            req["datamatch"] = datamatch
        key = (space, addr, length, datamatch, notifier.ident)
        if deassign:
            rep = self._ioctl(abi.IOCTL_IOEVENTFD, req)
            self._ioeventfd_slots.pop(key, None)
            ident = notifier.ident
            self._retired_writes[ident] = self._retired_writes.get(ident, 0) + int(rep.get("hits", 0))
            while len(self._retired_writes) > _MAX_RETIRED:  # nobody took the oldest: forget it
                del self._retired_writes[next(iter(self._retired_writes))]
        else:
            rep = self._ioctl(abi.IOCTL_IOEVENTFD, req, fds=[notifier.fileno()])
            self._ioeventfd_slots[key] = int(rep["slot"])
        return int(rep["slot"])

    def ioeventfd_slot(self, space: str, addr: int, length: int, datamatch: int | None,
                       notifier: EventNotifierLike) -> int | None:
        return self._ioeventfd_slots.get((space, addr, length, datamatch, notifier.ident))

    def ioeventfd_stats(self, space: str, addr: int, length: int, datamatch: int | None,
                        notifier: EventNotifierLike) -> dict | None:
        slot = self.ioeventfd_slot(space, addr, length, datamatch, notifier)
        return None if slot is None else self.stats.ioeventfd(slot)

    def ioeventfd_writes(self, notifier: EventNotifierLike, *, retire: bool = False) -> int:
        """Every guest write the hypervisor matched on *notifier*'s ioeventfds: the live ones' hit
        counters (the shared stats page) plus the counts their deassigns returned.  With *retire*
        the deassigned ones' count is handed over and forgotten (the caller keeps the total)."""
        ident = notifier.ident
        live = sum(self.stats.ioeventfd(slot)["hits"]
                   for key, slot in list(self._ioeventfd_slots.items()) if key[4] == ident)
        old = self._retired_writes.pop(ident, 0) if retire else self._retired_writes.get(ident, 0)
        return live + old

    # EventfdListener for memory.AddressSpace
    def eventfd_add(self, space: str, addr: int, length: int, datamatch: int | None,
                    notifier: EventNotifierLike) -> None:
        self.ioeventfd(space=space, addr=addr, length=length, notifier=notifier, datamatch=datamatch)

    def eventfd_del(self, space: str, addr: int, length: int, datamatch: int | None,
                    notifier: EventNotifierLike) -> None:
        self.ioeventfd(space=space, addr=addr, length=length, notifier=notifier, datamatch=datamatch,
                       deassign=True)

    def irqfd(self, notifier: EventNotifierLike, gsi: int, *, deassign: bool = False) -> dict:
        """KVM_IRQFD: writes to *notifier* inject GSI *gsi* (or stop doing so)."""
        req = {"gsi": gsi, "ident": notifier.ident, "deassign": deassign}
        if deassign:
            return self._ioctl(abi.IOCTL_IRQFD, req)
        return self._ioctl(abi.IOCTL_IRQFD, req, fds=[notifier.fileno()])

    def set_gsi_routing(self, routes: list[Route]) -> None:
        self._ioctl(abi.IOCTL_SET_GSI_ROUTING, {"routes": [r.to_json() for r in routes]})

    def signal_msi(self, address: int, data: int) -> bool:
        """KVM_SIGNAL_MSI: inject one MSI message (the userspace path, no irqfd)."""
        rep = self._ioctl(abi.IOCTL_SIGNAL_MSI, raw=MSI.pack(address, data))
        return bool(rep.get("delivered"))

    def irq_line(self, gsi: int, level: int) -> None:
        """KVM_IRQ_LINE: set an IOAPIC pin's level (INTx)."""
        self._ioctl(abi.IOCTL_IRQ_LINE, raw=IRQ_LINE.pack(gsi, 1 if level else 0))

    def pause_vcpus(self, timeout: float = 20.0) -> None:
        self._ioctl(abi.IOCTL_PAUSE_VCPUS, {"timeout": timeout}, timeout=timeout + 10)

    def resume_vcpus(self) -> None:
        self._ioctl(abi.IOCTL_RESUME_VCPUS, {})

    def fault(self, target: str, notifier: EventNotifierLike, action: str) -> dict:
        """Drop kicks (``ioeventfd``) or calls (``irqfd``) inside the hypervisor."""
        return self._ioctl(abi.IOCTL_FAULT, {"target": target, "ident": notifier.ident, "action": action})

    # -- the Xen flavour: the device model's hypercalls (privcmd) --------------------------------------
    def xen_physdev_op(self, cmd: int, arg: dict, *, fd: int | None = None, owner: dict | None = None) -> dict:
        """HYPERVISOR_physdev_op for this domain, as the device model (QEMU's ``xc_physdev_*``).
        Returns ``{"rc": 0 or -errno, "arg": the structure with its OUT fields}``: Xen's answer,
        not an exception.  *fd*: a map's host interrupt (the domain polls a dup of it)."""
        return self._ioctl(abi.IOCTL_XEN_PHYSDEV_OP, {"cmd": int(cmd), "arg": arg, "owner": owner or {}},
                           fds=[fd] if fd is not None else [])

    def xen_query(self) -> dict:
        """The domain's pirqs, event channels, counters and console (read-only)."""
        return self._ioctl(abi.IOCTL_XEN_QUERY, {})

    def guest_cmd(self, cmd: dict, timeout: float | None = 60.0) -> dict:
        """Run a command in the guest OS (on one of its vCPUs) and return its result."""
        return self._ioctl(abi.IOCTL_GUEST_CMD, cmd, timeout=timeout)

    # -- exits ----------------------------------------------------------------------------------------
    def _on_exit(self, code: int, vcpu: int, seq: int, payload: bytes, fds: list[int]) -> None:
        for fd in fds:
            os.close(fd)
        if code not in abi.EXIT_NAMES or len(payload) < EXIT.size:
            self.channel.reply(seq, code, EXIT_REPLY.pack(0))
            return
        r = _ExitRecord()
        r.seq, r.code, r.vcpu = seq, code, vcpu
        r.addr, r.value, r.size, r.pid, r.tid, r.t_ns = EXIT.unpack_from(payload)
        if r.size not in (1, 2, 4, 8) or not 0 <= vcpu <= self.nvcpus:  # hostile or broken guest
            self.channel.protocol_errors += 1
            self.channel.reply(seq, code, EXIT_REPLY.pack(0))
            return
        w = self._workers.get(vcpu)
        if w is None:
            with self._wmu:
                if self._stopping:
                    self.channel.reply(seq, code, EXIT_REPLY.pack((1 << (8 * r.size)) - 1))
                    return
                w = self._workers.get(vcpu)
                if w is None:
                    q: queue.SimpleQueue = queue.SimpleQueue()
                    t = named_thread(self._worker, f"kc-vcpu{vcpu}", args=(vcpu, q))
                    w = self._workers[vcpu] = (q, t)
                    t.start()
        w[0].put(r)

    def _worker(self, vcpu: int, q: queue.SimpleQueue) -> None:
        names = abi.EXIT_NAMES
        while True:
            r = q.get()
            if r is None:
                return
            n = names[r.code]
            self.exit_counts[n] = self.exit_counts.get(n, 0) + 1
            self.last_exit[vcpu] = (r.pid, r.tid)
            if self.exit_hook is not None:
                self.exit_hook(r)
            value = 0
            try:
                if self.exit_handler is not None:
                    value = self.exit_handler(r.code, r.addr, r.value, r.size, vcpu) or 0
            except Exception:
                log.exception("%s exit at %#x failed", n, r.addr)
                value = (1 << (8 * r.size)) - 1 if r.code in (abi.EXIT_MMIO_READ, abi.EXIT_PIO_READ) else 0
            try:
                self.channel.reply(r.seq, r.code, EXIT_REPLY.pack(value & ((1 << 64) - 1)))
            except ChannelClosed:
                return

    def _on_message(self, code: int, vcpu: int, payload: bytes, fds: list[int]) -> None:
        for fd in fds:
            os.close(fd)
        if code != abi.MSG_GUEST_EVENT:
            return
        try:
            ev = json.loads(payload.decode())
        except ValueError:
            log.warning("malformed guest event dropped")
            return
        if self.event_handler is not None and isinstance(ev, dict):
            self.event_handler(ev)


class MsiRoutes:
    """GSI allocation for MSI routes, committed as one table (QEMU: add_msi_route + commit)."""

    FIRST_MSI_GSI = abi.NR_IOAPIC_PINS

    def __init__(self, vm: VM, limit: int | None = None) -> None:
        self.vm = vm
        self.limit = vm.max_routes if limit is None else limit
        self._mu = threading.Lock()
        self._routes: dict[int, MsiRoute] = {}
        self.commits = 0

    def add(self, address: int, data: int) -> int:
        with self._mu:
            # the 24 IOAPIC pins hold routes too, so MSI routes get limit - 24
            if len(self._routes) + self.FIRST_MSI_GSI >= self.limit:
                raise HypervisorError(
                    errno.ENOSPC,
                    f"no free GSI route: all {self.limit} routes are in use (KVM_MAX_IRQ_ROUTES)")
            gsi = self.FIRST_MSI_GSI
            while gsi in self._routes:
                gsi += 1
            self._routes[gsi] = MsiRoute(gsi, address, data)
            return gsi

    def update(self, gsi: int, address: int, data: int) -> bool:
        with self._mu:
            old = self._routes.get(gsi)
            if old is None:
                raise KeyError(gsi)
            if old.address == address and old.data == data:
                return False
            self._routes[gsi] = MsiRoute(gsi, address, data)
            return True

    def release(self, gsi: int) -> None:
        with self._mu:
            self._routes.pop(gsi, None)

    def get(self, gsi: int) -> MsiRoute | None:
        with self._mu:
            return self._routes.get(gsi)

    def commit(self) -> None:
        with self._mu:
            routes: list[Route] = [IrqchipRoute(p, p) for p in range(abi.NR_IOAPIC_PINS)]
            routes += sorted(self._routes.values(), key=lambda r: r.gsi)
        self.vm.set_gsi_routing(routes)
        self.commits += 1

    def __len__(self) -> int:
        with self._mu:
            return len(self._routes)


def exit_latency_ns(record: _ExitRecord) -> int:
    return time.monotonic_ns() - record.t_ns
