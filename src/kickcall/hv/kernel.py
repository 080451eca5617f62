"""The kernel half of the software hypervisor: what KVM does, running in the guest's process.

The guest's vCPUs are threads of the guest process.  When a vCPU writes to an address:

* an ioeventfd matches -> the eventfd is written right here and the vCPU carries on
  (a *lightweight* exit: the VMM is not involved);
* otherwise -> a *heavyweight* exit: the request goes over the hypervisor channel to the VMM,
  whose MMIO/PIO handler runs while this vCPU waits for the reply.

Interrupts come in through irqfds (eventfds polled here, routed by GSI to an MSI message or an
IOAPIC pin), KVM_SIGNAL_MSI and KVM_IRQ_LINE.  The in-kernel irqchip (one local APIC per vCPU and
an IOAPIC) keeps them pending while the vCPUs are paused and hands them to the guest OS's
interrupt entry (``set_interrupt_handler``) on the interrupt-context thread.

Every ioctl from the VMM is acknowledged only once it has taken effect: when a deassign returns
to the VMM, no vCPU can still write the old eventfd.
"""

from __future__ import annotations

import errno
import functools
import json
import logging
import os
import socket
import threading
import time
from dataclasses import dataclass
from typing import Callable

from ..loop import IOThread
from ..memory import GuestMemory
from . import abi
from .abi import (
    EXIT,
    EXIT_REPLY,
    IRQ_LINE,
    MSI,
    REPLY_STATUS,
    SPACE_MMIO,
    SPACE_PIO,
    HypervisorError,
)
from .channel import Channel
from .ioeventfd import Ioeventfd, IoeventfdTable
from .routing import BadMsi, GsiRouting, IrqchipRoute, MsiRoute, decode_msi, route_from_json
from .stats import HvStats, MAX_VCPUS
from .xen import DEFAULT_NR_PIRQS, Caller, XenHypervisor
from .xen_abi import PhysdevGetFreePirq, PhysdevMapPirq, PhysdevOp, PhysdevUnmapPirq
from ..threads import start_thread

__all__ = ["KernelHV", "Vcpu", "Irqchip", "VcpuState"]

log = logging.getLogger("kickcall.hv.kernel")


_SIZES = (1, 2, 4, 8)
_MASKS = {1: 0xFF, 2: 0xFFFF, 4: 0xFFFFFFFF, 8: 0xFFFFFFFFFFFFFFFF}


class VcpuState:
    RUNNING = "running"
    PARKED = "parked"  # stopped at a pause point
    HALTED = "halted"  # waiting for an interrupt
    EXIT = "exit"  # in a heavyweight exit, waiting for the VMM
    IDLE = "idle"  # no guest code to run


class Vcpu:
    """One virtual CPU.  Guest code running on a vCPU thread reaches devices through it."""

    def __init__(self, kernel: "KernelHV", index: int) -> None:
        self.kernel = kernel
        self.index = index
        self.state = VcpuState.IDLE
        self.tid = 0
        st = kernel.stats
        self._ix_ioe = st.v(index, "ioeventfd_writes")
        self._ix_mw = st.v(index, "mmio_write_exits")
        self._ix_mr = st.v(index, "mmio_read_exits")
        self._ix_pw = st.v(index, "pio_write_exits")
        self._ix_pr = st.v(index, "pio_read_exits")
        self._ix_pid = st.v(index, "last_pid")
        self._ix_tid = st.v(index, "last_tid")
        self._ix_ns = st.v(index, "exit_ns_total")

    # -- guest memory-mapped and port I/O ------------------------------------------------------------
    def mmio_write(self, addr: int, value: int, size: int) -> None:
        self._write(SPACE_MMIO, abi.EXIT_MMIO_WRITE, self._ix_mw, addr, value, size)

    def pio_write(self, port: int, value: int, size: int) -> None:
        self._write(SPACE_PIO, abi.EXIT_PIO_WRITE, self._ix_pw, port, value, size)

    def mmio_read(self, addr: int, size: int) -> int:
        return self._read(abi.EXIT_MMIO_READ, self._ix_mr, addr, size)

    def pio_read(self, port: int, size: int) -> int:
        return self._read(abi.EXIT_PIO_READ, self._ix_pr, port, size)

    def _write(self, space: str, code: int, ix: int, addr: int, value: int, size: int) -> None:
        if size not in _SIZES:
            raise ValueError(f"access size {size}")
        value &= _MASKS[size]
        k = self.kernel
        if k.vcpu_ctl.paused:
            k.vcpu_ctl.point(self)
        if k.ioeventfds.write(space, addr, size, value) is not None:
            k.stats.w[self._ix_ioe] += 1
            return
        k.stats.w[ix] += 1
        self._exit(code, addr, value, size)

    def _read(self, code: int, ix: int, addr: int, size: int) -> int:
        if size not in (1, 2, 4, 8):
            raise ValueError(f"access size {size}")
        k = self.kernel
        if k.vcpu_ctl.paused:
            k.vcpu_ctl.point(self)
        k.stats.w[ix] += 1
        return self._exit(code, addr, 0, size)

    def _exit(self, code: int, addr: int, value: int, size: int) -> int:
        k = self.kernel
        pid = os.getpid()
        tid = threading.get_native_id()
        w = k.stats.w
        w[self._ix_pid] = pid
        w[self._ix_tid] = tid
        t0 = time.monotonic_ns()
        prev = self.state
        self.state = VcpuState.EXIT
        try:
            rep, fds = k.channel.request(code, EXIT.pack(addr, value, size, pid, tid, t0), vcpu=self.index)
        finally:
            self.state = prev
        for fd in fds:
            os.close(fd)
        w[self._ix_ns] += time.monotonic_ns() - t0
        if k.vcpu_ctl.paused:
            k.vcpu_ctl.point(self)
        return EXIT_REPLY.unpack(rep)[0] if len(rep) >= EXIT_REPLY.size else (1 << (8 * size)) - 1

    # -- scheduling states ------------------------------------------------------------------------------
    def enter_guest(self) -> None:
        """The vCPU thread starts running guest code."""
        self.tid = threading.get_native_id()
        self.state = VcpuState.RUNNING
        if self.kernel.vcpu_ctl.paused:
            self.kernel.vcpu_ctl.point(self)

    def leave_guest(self) -> None:
        self.state = VcpuState.IDLE

    def halt_wait(self, wait: Callable[[], bool]) -> bool:
        """Halt until *wait()* returns (it blocks until an interrupt handler wakes this vCPU)."""
        self.kernel.stats.w[self.kernel.stats.v(self.index, "halts")] += 1
        prev = self.state
        self.state = VcpuState.HALTED
        try:
            return wait()
        finally:
            self.state = prev
            if self.kernel.vcpu_ctl.paused:
                self.kernel.vcpu_ctl.point(self)


class VcpuControl:
    """Pause and resume of all vCPUs, acknowledged once none of them runs guest code."""

    def __init__(self, kernel: "KernelHV") -> None:
        self.kernel = kernel
        self.paused = False
        self._cond = threading.Condition()
        self.paused_total_ns = 0
        self._paused_since = 0

    def guest_ns(self) -> int:
        """A clock that stands still while the vCPUs are paused (guest time)."""
        now = time.monotonic_ns()
        p = self.paused_total_ns
        if self.paused:
            p += now - self._paused_since
        return now - p

    def point(self, vcpu: Vcpu) -> None:
        """A pause point: a paused vCPU parks here until resumed."""
        with self._cond:
            if not self.paused:
                return
            self.kernel.stats.w[self.kernel.stats.v(vcpu.index, "pauses")] += 1
            prev = vcpu.state
            vcpu.state = VcpuState.PARKED
            while self.paused:
                self._cond.wait()
            vcpu.state = prev if prev != VcpuState.PARKED else VcpuState.RUNNING

    def pause(self, timeout: float = 20.0) -> None:
        with self._cond:
            if not self.paused:
                self._paused_since = time.monotonic_ns()
            self.paused = True
        self.kernel.irqchip.set_paused(True)
        deadline = time.monotonic() + timeout
        while True:
            cpus = self.kernel.all_contexts()
            if not any(c.state == VcpuState.RUNNING for c in cpus):
                break
            if time.monotonic() > deadline:
                running = [c.index for c in cpus if c.state == VcpuState.RUNNING]
                raise HypervisorError(errno.ETIMEDOUT, f"vCPUs {running} did not stop within {timeout}s")
            time.sleep(0.0005)

    def resume(self) -> None:
        with self._cond:
            if self.paused:
                self.paused_total_ns += time.monotonic_ns() - self._paused_since
            self.paused = False
            self._cond.notify_all()
        self.kernel.irqchip.set_paused(False)


@dataclass
class _Irqfd:
    fd: int
    gsi: int
    ident: int
    count: int = 0
    drop_next: int = 0
    drop_all: bool = False
    dropped: int = 0


@dataclass
class _RedirEntry:
    vector: int = 0
    dest: int = 0
    masked: bool = True
    level: bool = False
    remote_irr: bool = False


class Irqchip:
    """In-kernel irqchip: a local APIC per vCPU (pending vectors) and a 24-pin IOAPIC."""

    def __init__(self, kernel: "KernelHV", nvcpus: int, loop: IOThread) -> None:
        self.kernel = kernel
        self.nvcpus = nvcpus
        self.loop = loop
        self._mu = threading.Lock()
        self.irr: list[set[int]] = [set() for _ in range(nvcpus)]
        self.ioapic = [_RedirEntry() for _ in range(abi.NR_IOAPIC_PINS)]
        self.pins = [0] * abi.NR_IOAPIC_PINS
        self.paused = False
        self.handler: Callable[[int, int], None] | None = None
        self._delivering = False

    def set_paused(self, paused: bool) -> None:
        with self._mu:
            self.paused = paused
        if not paused:
            self._kick()

    # -- sources ------------------------------------------------------------------------------------
    def msi(self, address: int, data: int) -> bool:
        st = self.kernel.stats
        try:
            dest, vector = decode_msi(address, data)
        except BadMsi as e:
            st.w[st.g("bad_msi_drops")] += 1
            log.warning("dropped MSI: %s", e)
            return False
        st.w[st.g("msi_lapic_deliveries")] += 1
        self.raise_vector(dest % self.nvcpus, vector)
        return True

    def set_pin(self, pin: int, level: int) -> None:
        with self._mu:
            old = self.pins[pin]
            self.pins[pin] = 1 if level else 0
            e = self.ioapic[pin]
            fire = bool(level) and not e.masked and (not e.level or not e.remote_irr) and (
                e.level or not old)
            if fire and e.level:
                e.remote_irr = True
        if fire:
            self.raise_vector(e.dest % self.nvcpus, e.vector)

    def program(self, pin: int, vector: int, dest: int = 0, masked: bool = False,
                level: bool = True) -> None:
        with self._mu:
            self.ioapic[pin] = _RedirEntry(vector, dest, masked, level, False)
            fire = self.pins[pin] and not masked and level
            if fire:
                self.ioapic[pin].remote_irr = True
        if fire:
            self.raise_vector(dest % self.nvcpus, vector)

    def raise_vector(self, cpu: int, vector: int) -> None:
        with self._mu:
            self.irr[cpu].add(vector)
            if self.paused:
                st = self.kernel.stats
                st.w[st.g("interrupts_held_while_paused")] += 1
        # Delivery is always a callback of its own, never part of the source's handler: a guest
        # ISR does MMIO (a heavyweight exit that may wait for the VMM's big lock), and the VMM
        # deassigning an irqfd or unmapping a pirq under that lock waits for the source's fd
        # handler to return -- inline delivery made the two wait for each other.
        self._kick()

    def _kick(self) -> None:
        try:
            self.loop.schedule(self.deliver)
        except Exception:
            pass

    # -- delivery (interrupt context, on the loop thread) ---------------------------------------------
    def deliver(self) -> None:
        if self._delivering:  # an ISR raised another interrupt: the outer loop delivers it
            return
        st = self.kernel.stats
        self._delivering = True
        budget = 256  # then yield the loop (a stuck level-triggered line must not starve it)
        try:
            while True:
                budget -= 1
                if budget < 0:
                    self._kick()
                    return
                with self._mu:
                    if self.paused:
                        return
                    item = None
                    for cpu in range(self.nvcpus):
                        if self.irr[cpu]:
                            v = max(self.irr[cpu])
                            self.irr[cpu].discard(v)
                            item = (cpu, v)
                            break
                if item is None:
                    return
                cpu, vector = item
                st.w[st.g("interrupts_delivered")] += 1
                st.w[st.v(cpu, "interrupts")] += 1
                h = self.handler
                irqv = self.kernel.irq_vcpu
                irqv.state = VcpuState.RUNNING
                try:
                    if h is not None:
                        h(cpu, vector)
                except Exception:
                    log.exception("interrupt handler for vector %d failed", vector)
                finally:
                    irqv.state = VcpuState.IDLE
                self._eoi(vector)
        finally:
            self._delivering = False

    def _eoi(self, vector: int) -> None:
        refire = []
        with self._mu:
            for pin, e in enumerate(self.ioapic):
                if e.level and e.remote_irr and e.vector == vector:
                    e.remote_irr = False
                    if self.pins[pin] and not e.masked:
                        e.remote_irr = True
                        refire.append((e.dest % self.nvcpus, e.vector))
        for cpu, v in refire:
            with self._mu:
                self.irr[cpu].add(v)

    def pending(self) -> list[list[int]]:
        with self._mu:
            return [sorted(s) for s in self.irr]


class KernelHV:
    """The hypervisor's kernel half, in the guest's process (or in-process for unit tests)."""

    def __init__(self, sock: socket.socket, *, name: str = "guest-kvm") -> None:
        self.name = name
        self.memory: GuestMemory | None = None
        self.stats: HvStats = None  # type: ignore[assignment]
        self.nvcpus = 0
        self.vcpus: list[Vcpu] = []
        self.irq_vcpu: Vcpu = None  # type: ignore[assignment]
        self._contexts: list[Vcpu] = []
        self._ctx_mu = threading.Lock()
        self.routing = GsiRouting()
        self.ioeventfds = IoeventfdTable(on_hit=self._on_ioeventfd_hit)
        self._irqfds: dict[int, _Irqfd] = {}
        self._irqfd_mu = threading.Lock()
        self._gsi_mu = threading.Lock()
        self.irq_loop = IOThread(f"{name}-irq", thread_name="kc-irq")
        self.irqchip: Irqchip = None  # type: ignore[assignment]
        #: the Xen flavour's domain (pirqs, event channels), None under KVM semantics
        self.xen: XenHypervisor | None = None
        self.vcpu_ctl = VcpuControl(self)
        self.ready = threading.Event()
        self.shutdown_requested = threading.Event()
        self.command_handler: Callable[[int, dict], None] | None = None
        self.os_ready = threading.Event()  # set by the guest OS once it takes commands
        self.on_shutdown: Callable[[], None] | None = None
        self.channel = Channel(sock, name, on_request=self._on_request, on_close=self._on_close)
        self._pid = os.getpid()

    def start(self) -> "KernelHV":
        self.channel.start()
        return self

    def wait_ready(self, timeout: float = 30.0) -> None:
        if not self.ready.wait(timeout):
            raise TimeoutError("the VMM never set up guest memory")

    def close(self) -> None:
        self.channel.close()
        if self.xen is not None:
            self.xen.close()
        if self.irq_loop.running:
            with self._irqfd_mu:
                irqfds = list(self._irqfds.values())
                self._irqfds.clear()
            for i in irqfds:
                self.irq_loop.remove_fd_handler(i.fd)
                os.close(i.fd)
            self.irq_loop.stop()
        for e in self.ioeventfds.entries():
            try:
                self.ioeventfds.deassign(e.space, e.addr, e.length, e.datamatch, e.ident)
            except HypervisorError:
                pass
            os.close(e.fd)
        if self.memory is not None:
            self.memory.close()
            self.memory = None
        if self.stats is not None:
            self.stats.close()
            self.stats = None  # type: ignore[assignment]

    def _on_close(self) -> None:
        self.shutdown_requested.set()
        if self.on_shutdown is not None:
            self.on_shutdown()

    # -- to the VMM ---------------------------------------------------------------------------------
    def send_event(self, event: dict) -> None:
        """A one-way message from the guest OS to the VMM (boot progress, workload results)."""
        self.channel.send(abi.MSG_GUEST_EVENT, json.dumps(event).encode())

    def reply_command(self, seq: int, result: dict, error: str | None = None) -> None:
        if error is not None:
            self._reply_err(seq, abi.IOCTL_GUEST_CMD, errno.EIO, error)
        else:
            self._reply_ok(seq, abi.IOCTL_GUEST_CMD, result)

    # -- ioctls ---------------------------------------------------------------------------------------
    def _reply_ok(self, seq: int, code: int, result: object = None) -> None:
        """An ioctl's success, with its result (any JSON value) when it has one."""
        body = REPLY_STATUS.pack(0) + (json.dumps(result).encode() if result is not None else b"")
        self.channel.reply(seq, code, body)

    def _reply_err(self, seq: int, code: int, err: int, msg: str) -> None:
        self.channel.reply(seq, code, REPLY_STATUS.pack(-err) + json.dumps({"error": msg}).encode())

    def _on_request(self, code: int, vcpu: int, seq: int, payload: bytes, fds: list[int]) -> None:
        try:
            result = self._ioctl(code, seq, payload, fds)
        except HypervisorError as e:
            for fd in fds:
                try:
                    os.close(fd)
                except OSError:
                    pass
            self._reply_err(seq, code, e.err, e.strerror or str(e))
            return
        except Exception as e:  # a malformed request must not take the kernel down
            log.exception("ioctl %s failed", abi.IOCTL_NAMES.get(code, code))
            for fd in fds:
                try:
                    os.close(fd)
                except OSError:
                    pass
            self._reply_err(seq, code, errno.EINVAL, f"{type(e).__name__}: {e}")
            return
        if result is not _DEFERRED:
            self._reply_ok(seq, code, result)

    def _ioctl(self, code: int, seq: int, payload: bytes, fds: list[int]) -> object:
        if code == abi.IOCTL_SIGNAL_MSI:
            addr, data = MSI.unpack_from(payload)
            st = self.stats
            st.w[st.g("msi_injections")] += 1
            if self.xen is not None:  # XEN_DMOP_inject_msi: a pirq message goes to its event channel
                return {"delivered": self.xen.inject_msi(addr, data)}
            return {"delivered": self.irqchip.msi(addr, data)}
        if code == abi.IOCTL_IRQ_LINE:
            gsi, level = IRQ_LINE.unpack_from(payload)
            if gsi >= abi.NR_IOAPIC_PINS:
                raise HypervisorError(errno.EINVAL, f"IRQ line {gsi} is not an IOAPIC pin")
            st = self.stats
            st.w[st.g("irq_line_changes")] += 1
            self.irqchip.set_pin(gsi, level)
            return None
        try:
            req = json.loads(payload.decode()) if payload else {}
        except (UnicodeDecodeError, ValueError) as e:
            raise HypervisorError(errno.EINVAL, f"malformed request: {e}") from None
        if code == abi.IOCTL_SET_MEMORY:
            return self._set_memory(req, fds)
        if self.memory is None:
            raise HypervisorError(errno.EINVAL, "guest memory is not set up yet")
        if code == abi.IOCTL_IOEVENTFD:
            return self._ioeventfd(req, fds)
        if code == abi.IOCTL_IRQFD:
            if self.xen is not None:
                raise HypervisorError(errno.ENOSYS, "Xen has no irqfd: interrupts go through pirqs and event channels")
            return self._irqfd(req, fds)
        if code in (abi.IOCTL_XEN_PHYSDEV_OP, abi.IOCTL_XEN_QUERY):
            return self._xen_ioctl(code, req, fds)
        if code == abi.IOCTL_SET_GSI_ROUTING:
            self.routing.set([route_from_json(r) for r in req.get("routes", [])])
            return {"routes": len(self.routing)}
        if code == abi.IOCTL_PAUSE_VCPUS:
            self.vcpu_ctl.pause(float(req.get("timeout", 20.0)))
            return None
        if code == abi.IOCTL_RESUME_VCPUS:
            self.vcpu_ctl.resume()
            return None
        if code == abi.IOCTL_FAULT:
            return self._fault(req)
        if code == abi.IOCTL_GUEST_CMD:
            if self.command_handler is None:  # the guest OS is still coming up
                start_thread(self._deferred_cmd, "kc-hv-cmd", args=(seq, req))
            else:
                self.command_handler(seq, req)
            return _DEFERRED
        if code == abi.IOCTL_SHUTDOWN:
            self._reply_ok(seq, code, None)  # acknowledge first: the process exits right after
            self.shutdown_requested.set()
            if self.on_shutdown is not None:
                start_thread(self.on_shutdown, "kc-shutdown")
            return _DEFERRED
        raise HypervisorError(errno.ENOTTY, f"unknown ioctl {code}")

    def _xen_ioctl(self, code: int, req: dict, fds: list[int]) -> dict:
        x = self.xen
        if x is None:
            raise HypervisorError(errno.ENOSYS, "not a Xen domain (hypervisor = \"kvm\")")
        if code == abi.IOCTL_XEN_QUERY:
            if fds:
                raise HypervisorError(errno.EINVAL, "a query carries no fd")
            return x.query()
        if len(fds) > 1:
            raise HypervisorError(errno.EINVAL, "at most one fd (the host interrupt of a map)")
        fd = fds[0] if fds else None
        try:
            if not isinstance(req, dict):
                raise TypeError("the request must be an object")
            cmd = int(req["cmd"])
            a = req.get("arg", {})
            if not isinstance(a, dict):
                raise TypeError("arg must be an object")
            if cmd == PhysdevOp.MAP_PIRQ:
                arg: object = PhysdevMapPirq(**{k: int(v) for k, v in a.items()})
            elif cmd == PhysdevOp.UNMAP_PIRQ:
                arg = PhysdevUnmapPirq(**{k: int(v) for k, v in a.items()})
            elif cmd == PhysdevOp.GET_FREE_PIRQ:
                arg = PhysdevGetFreePirq(**{k: int(v) for k, v in a.items()})
            else:
                arg = None
            owner = req.get("owner") or {}
            if not isinstance(owner, dict):
                raise TypeError("owner must be an object")
        except (KeyError, TypeError, ValueError, OverflowError) as e:
            if fd is not None:
                os.close(fd)
            raise HypervisorError(errno.EINVAL, f"malformed physdev_op: {e}") from None
        rc = x.physdev_op(cmd, arg, caller=Caller.DEVICE_MODEL, fd=fd,
                          owner={str(k): v for k, v in owner.items() if isinstance(v, (str, int))})
        return {"rc": rc, "arg": vars(arg) if arg is not None else {}}

    def _deferred_cmd(self, seq: int, req: dict) -> None:
        if self.os_ready.wait(30) and self.command_handler is not None:
            self.command_handler(seq, req)
        else:
            self._reply_err(seq, abi.IOCTL_GUEST_CMD, errno.ENOSYS, "no guest OS is running")

    def _set_memory(self, req: dict, fds: list[int]) -> dict:
        if self.memory is not None:
            raise HypervisorError(errno.EEXIST, "guest memory is already set up")
        nvcpus = int(req["nvcpus"])
        if not 1 <= nvcpus <= MAX_VCPUS:
            raise HypervisorError(errno.EINVAL, f"{nvcpus} vCPUs (1..{MAX_VCPUS})")
        nblocks = int(req["nblocks"])
        if len(fds) != nblocks + 1:
            raise HypervisorError(errno.EINVAL, f"expected {nblocks + 1} fds, got {len(fds)}")
        hv = req.get("hypervisor", "kvm")  # checked before the fds are taken: a refusal leaves them to the caller
        if hv not in ("kvm", "xen"):
            raise HypervisorError(errno.EINVAL, f"unknown hypervisor {hv!r} (kvm or xen)")
        if hv == "xen":
            try:
                domid, nr_pirqs = int(req.get("domid", 1)), int(req.get("nr_pirqs", DEFAULT_NR_PIRQS))
                XenHypervisor.check_params(domid, nr_pirqs)
            except (TypeError, ValueError, OverflowError) as e:
                raise HypervisorError(errno.EINVAL, f"Xen domain: {e}") from None
        self.stats = HvStats(fds[-1])
        self.memory = GuestMemory.from_layout(req["regions"], fds[:-1])
        self.nvcpus = nvcpus
        self.vcpus = [Vcpu(self, i) for i in range(nvcpus)]
        self.irq_vcpu = Vcpu(self, nvcpus)
        self.irqchip = Irqchip(self, nvcpus, self.irq_loop)
        if "max_routes" in req:
            self.routing = GsiRouting(int(req["max_routes"]))
        if hv == "xen":
            self.xen = XenHypervisor(self.memory, domid=domid, nr_pirqs=nr_pirqs, nvcpus=nvcpus,
                                     raise_vector=self.irqchip.raise_vector, deliver_msi=self.irqchip.msi,
                                     loop=self.irq_loop, stats=self.stats)
        self.irq_loop.start()
        self.ready.set()
        return {"pid": self._pid}

    def _on_ioeventfd_hit(self, e: Ioeventfd, value: int, dropped: bool) -> None:
        st = self.stats
        w = st.w
        w[st.i(e.slot, "hits")] += 1
        w[st.i(e.slot, "last_pid")] = self._pid
        w[st.i(e.slot, "last_tid")] = threading.get_native_id()
        w[st.i(e.slot, "last_ns")] = time.monotonic_ns()
        w[st.i(e.slot, "last_value")] = value
        w[st.g("ioeventfd_writes")] += 1
        if dropped:
            w[st.i(e.slot, "dropped")] += 1
            w[st.g("ioeventfd_dropped")] += 1

    def _ioeventfd(self, req: dict, fds: list[int]) -> dict:
        space = req["space"]
        addr = int(req["addr"])
        length = int(req["length"])
        dm = req.get("datamatch")
        dm = None if dm is None else int(dm)
        ident = int(req["ident"])
        if req.get("deassign"):
            if fds:
                raise HypervisorError(errno.EINVAL, "deassign carries no fd")
            e = self.ioeventfds.deassign(space, addr, length, dm, ident)
            os.close(e.fd)
            return {"slot": e.slot, "hits": e.hits}
        if len(fds) != 1:
            raise HypervisorError(errno.EBADF, "assign needs exactly one eventfd")
        e = self.ioeventfds.assign(space, addr, length, dm, fds[0], ident)
        self.stats.reset_ioeventfd_slot(e.slot)
        self.stats.w[self.stats.i(e.slot, "in_use")] = 1
        return {"slot": e.slot}

    def _irqfd(self, req: dict, fds: list[int]) -> dict:
        gsi = int(req["gsi"])
        ident = int(req["ident"])
        if not 0 <= gsi < self.routing.max_routes:
            raise HypervisorError(errno.EINVAL, f"GSI {gsi} out of range")
        if req.get("deassign"):
            with self._irqfd_mu:
                i = self._irqfds.get(ident)
                if i is None or i.gsi != gsi:
                    return {"found": False}
                del self._irqfds[ident]
            self.irq_loop.remove_fd_handler(i.fd)  # waits if the handler is running
            os.close(i.fd)
            return {"found": True, "count": i.count}
        if len(fds) != 1:
            raise HypervisorError(errno.EBADF, "assign needs exactly one eventfd")
        with self._irqfd_mu:
            if ident in self._irqfds:
                raise HypervisorError(errno.EBUSY, "that eventfd is already an irqfd")
            i = _Irqfd(fds[0], gsi, ident)
            self._irqfds[ident] = i
        os.set_blocking(i.fd, False)
        # level-triggered: a value already pending in the eventfd is injected at once, as KVM does
        self.irq_loop.set_fd_handler(i.fd, functools.partial(self._irqfd_ready, i))
        return {"found": True}

    def _irqfd_ready(self, i: _Irqfd) -> None:
        try:
            v = os.eventfd_read(i.fd)
        except (BlockingIOError, OSError):
            return
        i.count += v
        st = self.stats
        if i.drop_all or i.drop_next:
            if i.drop_next:
                i.drop_next -= 1
            i.dropped += 1
            st.w[st.g("irqfd_dropped")] += 1
            st.w[st.s(i.gsi, "dropped")] += 1
            return
        st.w[st.g("irqfd_injections")] += 1
        self.inject_gsi(i.gsi)

    def inject_gsi(self, gsi: int) -> None:
        st = self.stats
        r = self.routing.lookup(gsi)
        if r is None:
            st.w[st.g("no_route_drops")] += 1
            return
        with self._gsi_mu:
            st.w[st.s(gsi, "injections")] += 1
        if isinstance(r, MsiRoute):
            self.irqchip.msi(r.address, r.data)
        elif isinstance(r, IrqchipRoute):
            self.irqchip.set_pin(r.pin, 1)
            self.irqchip.set_pin(r.pin, 0)

    def _fault(self, req: dict) -> dict:
        target = req.get("target")
        action = req.get("action")
        ident = int(req.get("ident", -1))
        if action not in ("drop-next", "drop-all", "clear", "query"):
            raise HypervisorError(errno.EINVAL, f"unknown fault action {action!r}")
        objs: list = []
        if target == "ioeventfd":
            objs = [e for e in self.ioeventfds.entries() if e.ident == ident]
        elif target == "irqfd":
            with self._irqfd_mu:
                objs = [i for i in self._irqfds.values() if i.ident == ident]
        else:
            raise HypervisorError(errno.EINVAL, f"unknown fault target {target!r}")
        if not objs:
            raise HypervisorError(errno.ENOENT, f"no {target} for eventfd {ident}")
        if action == "query":  # read the drop state without changing it (the monitor's fault listing)
            return {"matched": len(objs), "dropped": sum(o.dropped for o in objs),
                    "drop-next": sum(o.drop_next for o in objs), "drop-all": any(o.drop_all for o in objs)}
        for o in objs:
            if action == "drop-next":
                o.drop_next += 1
            elif action == "drop-all":
                o.drop_all = True
            else:
                o.drop_next = 0
                o.drop_all = False
        return {"matched": len(objs), "dropped": sum(o.dropped for o in objs)}

    # -- guest OS side -----------------------------------------------------------------------------
    def vcpu_context(self, index: int) -> Vcpu:
        """An execution context on vCPU *index* for one guest thread (pause waits for it too)."""
        if not 0 <= index < self.nvcpus:
            raise ValueError(f"no vCPU {index}")
        ctx = Vcpu(self, index)
        with self._ctx_mu:
            self._contexts.append(ctx)
        return ctx

    def release_context(self, ctx: Vcpu) -> None:
        with self._ctx_mu:
            try:
                self._contexts.remove(ctx)
            except ValueError:
                pass

    def all_contexts(self) -> list[Vcpu]:
        with self._ctx_mu:
            return list(self.vcpus) + [self.irq_vcpu] + list(self._contexts)

    def set_interrupt_handler(self, fn: Callable[[int, int], None]) -> None:
        self.irqchip.handler = fn

    def irqfd_list(self) -> list[dict]:
        with self._irqfd_mu:
            return [{"gsi": i.gsi, "ident": i.ident, "count": i.count, "dropped": i.dropped}
                    for i in self._irqfds.values()]


_DEFERRED = object()
