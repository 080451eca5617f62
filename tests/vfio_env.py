"""Shared test setup for the vfio-user tests: a ``kickcall vfio-user-server`` process with its
monitor, and the NIC's registers driven through a client."""

from __future__ import annotations

import contextlib
import os
import struct
from typing import Any, Iterator

from helpers import kickcall_argv, spawn, stop_process, wait_for_listener
from kickcall.monitor.client import QMPClient
from kickcall.vfio import nic as N

NIC = "nic0"  # the server's device id on its monitor


@contextlib.contextmanager
def vfio_server(workdir: str, *args: str, name: str = "vfu") -> Iterator[tuple[Any, str, str]]:
    """(process, socket, qmp socket) of a running server; stopped and reaped at the end."""
    sock = os.path.join(workdir, f"{name}.sock")
    qmp = os.path.join(workdir, f"{name}.qmp")
    p = spawn(kickcall_argv("vfio-user-server", "--socket", sock, "--qmp", qmp, *args))
    try:
        wait_for_listener(sock, p)
        wait_for_listener(qmp, p)
        yield p, sock, qmp
    finally:
        stop_process(p)


@contextlib.contextmanager
def monitor(qmp: str) -> Iterator[QMPClient]:
    c = QMPClient(qmp, timeout=30)
    c.connect()
    try:
        yield c
    finally:
        c.close()


@contextlib.contextmanager
def vfio_card(workdir: str, functions: int, *args: str, name: str = "card") -> Iterator[tuple[Any, list[str], str]]:
    """(process, sockets, qmp socket) of a server holding a card of *functions* functions (one
    ``--socket`` each: nic0 .. on the monitor); stopped and reaped at the end."""
    socks = [os.path.join(workdir, f"{name}{i}.sock") for i in range(functions)]
    qmp = os.path.join(workdir, f"{name}.qmp")
    argv = ["vfio-user-server", "--qmp", qmp]
    for s in socks:
        argv += ["--socket", s]
    p = spawn(kickcall_argv(*argv, *args))
    try:
        for s in socks:
            wait_for_listener(s, p)
        wait_for_listener(qmp, p)
        yield p, socks, qmp
    finally:
        stop_process(p)


def qmp_call(qmp: str, command: str, args: dict | None = None) -> Any:
    """One QMP command on the server's monitor."""
    with monitor(qmp) as m:
        return m.execute(command, args or {})


def aer_inject(qmp: str, dev: str, status: str, **kw: Any) -> dict:
    """``x-pcie-aer-inject-error`` (QEMU's pcie_aer_inject_error arguments)."""
    return qmp_call(qmp, "x-pcie-aer-inject-error", {"id": dev, "error_status": status, **kw})


def aer_status(qmp: str, dev: str = NIC) -> dict:
    """``x-query-pci-aer``."""
    return qmp_call(qmp, "x-query-pci-aer", {"dev": dev})


def set_fault(qmp: str, dev: str, fault: str, action: str) -> dict:
    """``x-debug-fault`` with a fault and an action (dev ``host``: the host's AER switches)."""
    return qmp_call(qmp, "x-debug-fault", {"dev": dev, "fault": fault, "action": action})


def host_view(qmp: str, dev: str = NIC) -> dict:
    with monitor(qmp) as m:
        return m.execute("x-query-vfio", {"dev": dev})


def process_fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


class NicRegs:
    """BAR0 and config accesses through anything with region_read/region_write (kickcall's client)."""

    def __init__(self, client: Any) -> None:
        self.c = client

    def r32(self, off: int) -> int:
        return int(struct.unpack("<I", self.c.region_read(0, off, 4))[0])

    def w32(self, off: int, v: int) -> None:
        self.c.region_write(0, off, struct.pack("<I", v))

    def q(self, queue: int, reg: int) -> int:
        return N.QUEUE_BASE + N.QUEUE_STRIDE * queue + reg

    def bus_master(self) -> None:
        cmd = struct.unpack("<H", self.c.region_read(7, 4, 2))[0]
        self.c.region_write(7, 4, struct.pack("<H", cmd | 0x4))

    def setup_queue(self, queue: int, ring: int, size: int, vector: int) -> None:
        self.w32(self.q(queue, N.Q_RING_LO), ring & 0xFFFFFFFF)
        self.w32(self.q(queue, N.Q_RING_HI), ring >> 32)
        self.w32(self.q(queue, N.Q_SIZE), size)
        self.w32(self.q(queue, N.Q_VECTOR), vector)
        self.w32(self.q(queue, N.Q_ENABLE), 1)

    def doorbell(self, queue: int, n: int) -> None:
        self.w32(self.q(queue, N.Q_DOORBELL), n)

    def producer(self, queue: int) -> int:
        return self.r32(self.q(queue, N.Q_PRODUCER))


def records(buf: bytes | bytearray | memoryview, n: int, offset: int = 0) -> list[tuple[int, int, int, int]]:
    return [N.RECORD.unpack_from(buf, offset + 16 * i) for i in range(n)]
