"""Helpers for machine-level tests: build a machine from TOML text, wait on conditions."""

from __future__ import annotations

import os
import time
from contextlib import contextmanager
from typing import Callable, Iterator

from kickcall.machine import Machine, parse_config


def wait_for(pred: Callable[[], object], timeout: float = 20.0, what: str = "condition") -> object:
    """Poll *pred* until it returns something truthy (never a fixed sleep)."""
    deadline = time.monotonic() + timeout
    while True:
        v = pred()
        if v:
            return v
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.002)


def fd_count() -> int:
    """How many fds this process has open (tests check nothing leaks)."""
    return len(os.listdir("/proc/self/fd"))


BLK = """
[[device]]
type = "virtio-blk"
id = "{id}"
size = "{size}"
queues = {queues}
ioeventfd = {ioeventfd}
irqfd = {irqfd}
msix = {msix}
"""


def machine_toml(*, vcpus: int = 2, guest: str = "process", devices: str = "", ram: str = "64M") -> str:
    return f"""
[machine]
ram = "{ram}"
vcpus = {vcpus}
guest = "{guest}"
{devices}
"""


def blk(id: str = "blk0", *, size: str = "4M", queues: int = 1, ioeventfd: bool = True, irqfd: bool = True,
        msix: bool = True) -> str:
    return BLK.format(id=id, size=size, queues=queues, ioeventfd=str(ioeventfd).lower(),
                      irqfd=str(irqfd).lower(), msix=str(msix).lower())


@contextmanager
def running_machine(toml: str, *, boot: bool = True, msix: bool = True) -> Iterator[Machine]:
    m = Machine(parse_config(toml, "<test>"))
    try:
        m.start(boot=boot, msix=msix)
        yield m
    finally:
        m.stop()
        if m.guest_proc is not None:
            assert m.guest_proc.poll() is not None, "the guest process outlived its machine"


def guest_irq_count(m: Machine, vector: int) -> int:
    """How many times the guest took the interrupt on CPU vector *vector* (all CPUs)."""
    for d in m.guest_stats()["interrupts"]:
        if d["vector"] == vector:
            return sum(d["counts"])
    return 0


def guest_vector_of(m: Machine, dev_id: str, msix_entry: int) -> int:
    """The CPU vector the guest programmed into an MSI-X entry (its Message Data)."""
    p = m.device(dev_id)
    assert p.msix is not None
    return p.msix.get_message(msix_entry)[1] & 0xFF


def me() -> int:
    return os.getpid()
