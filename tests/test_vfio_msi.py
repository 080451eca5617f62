"""MSI (not MSI-X) passthrough end to end, across three processes: ``kickcall vfio-user-server``
(the host function behind vfio-pci's rules), the VMM (``type = "vfio-user"``: the vfio-user
client that emulates the guest's MSI capability, QEMU's ``vfio_msi_enable`` /
``vfio_msi_disable`` / ``vfio_update_msi``) and the guest (the kickcall-nic driver re-probed in
MSI mode: ``pci_alloc_irq_vectors(PCI_IRQ_MSI)`` as ``msi_capability_init`` does it).

Interrupts are counted by completion records consumed by the guest's handlers, never by eventfd
signals.

* the guest enables MSI with 4 vectors: exactly one SET_IRQS(MSI, start 0, count 4,
  EVENTFD|TRIGGER) with 4 fds; records on queues 0..3 are consumed through MSI vectors 0..3; the
  host shows MSI with 4 vectors; the driver's unbind disables MSI (SET_IRQS count 0).  With MSI
  passthrough switched off (the device's ``msi-passthrough`` fix) the guest's Enable does not stick and the
  records are never consumed;
* per-vector masking (the mask bits, emulated as for MSI-X): a masked vector pends, unmask
  delivers once; with the ``emulate-msix-mask`` fix off, the interrupt reaches the masked vector;
* host exhaustion on the MSI enable stops the VM with ``X_VFIO_IRQ_FATAL``.
"""

from __future__ import annotations

import contextlib
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Iterator

import pytest

from helpers import machine_toml, wait_for
from kickcall.machine.config import parse_config
from kickcall.machine.machine import Machine
from kickcall.vfio import pci as vfio_pci
from kickcall.vfio.uapi import VfioIrqSetFlag, VfioPciIrqIndex
from vfio_env import host_view, vfio_server

EVENTFD_TRIGGER = VfioIrqSetFlag.DATA_EVENTFD | VfioIrqSetFlag.ACTION_TRIGGER
NONE_TRIGGER = VfioIrqSetFlag.DATA_NONE | VfioIrqSetFlag.ACTION_TRIGGER
#: how long records must stay unconsumed, with MSI off, to count as never delivered
SETTLE = 1.5


@dataclass
class Rig:
    m: Machine
    slot: int
    qmp: str  # the server's monitor
    calls: list[tuple[int, int, int, int, int]] = field(default_factory=list)  # (index, flags, start, count, nfds)

    def g(self, cmd: str, **kw: Any) -> dict:
        return self.m.guest_cmd({"cmd": cmd, "slot": self.slot, **kw}, timeout=120)

    @property
    def dev(self) -> vfio_pci.VFIOPCIDevice:
        return self.m.passthrough["nic0"]

    def stats(self) -> dict:
        return self.g("nic-stats")

    def msi_calls(self) -> list[tuple[int, int, int, int]]:
        """The VMM's SET_IRQS on the MSI index, as (flags, start, count, number of fds)."""
        return [(f, s, c, n) for i, f, s, c, n in self.calls if i == VfioPciIrqIndex.MSI]

    def records(self, q: int) -> int:
        return int(self.stats()["queues"][q]["records"])


@contextlib.contextmanager
def msi_rig(workdir: str, *server_args: str) -> Iterator[Rig]:
    """A machine with the server's function passed through, booted (the driver in MSI-X mode),
    every SET_IRQS the VMM sends recorded."""
    with vfio_server(workdir, *server_args) as (_p, sock, qmp):
        dev = f'[[device]]\ntype = "vfio-user"\nid = "nic0"\nsocket = "{sock}"\n'
        m = Machine(parse_config(machine_toml(guest="process", vcpus=2, devices=dev), "<test>"))
        try:
            m.start(boot=True)
            r = Rig(m, m.passthrough["nic0"].devfn >> 3, qmp)
            client = r.dev.client
            set_irqs = client.set_irqs

            def recording(index: int, flags: int, start: int, count: int, fds: list[int] | None = None) -> Any:
                r.calls.append((int(index), int(flags), start, count, len(fds or [])))
                return set_irqs(index, flags, start, count, fds=fds)
            client.set_irqs = recording  # type: ignore[method-assign]  # a recording wrapper, this test's own
            yield r
        finally:
            m.stop()


@pytest.mark.parametrize("msi", [True, False], ids=["msi-passthrough", "msi-passthrough-off"])
def test_msi_four_vectors_end_to_end(workdir: str, msi: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """The guest enables MSI with 4 vectors: one SET_IRQS(MSI, 0, 4) with 4 irqfd-bound eventfds;
    queue q's records are consumed by its handler through MSI vector q; the host shows MSI with 4
    vectors; the driver's unbind disables MSI with count 0 and INTx comes back.  With MSI
    passthrough off (Enable read-only, the old behaviour), nothing reaches the host's MSI index, and the
    records are never consumed."""
    with msi_rig(workdir, "--vectors", "8") as r:
        r.dev.faults.set_fix(vfio_pci.MSI_PASSTHROUGH_FIX, msi)
        r.g("nic-reprobe", mode="msi")
        for q in range(4):
            r.g("nic-request-irq", queue=q)
        for q in range(4):
            r.g("nic-generate", queue=q, n=200)
        view = r.dev.query_vfio()["msi"]
        if not msi:
            time.sleep(SETTLE)  # the definition of "never consumed": still there after SETTLE
            st = r.stats()
            assert r.msi_calls() == [] and not view["guest-enabled"] and not view["enabled"]  # Enable does not stick
            assert all(q["records"] == 0 for q in st["queues"][:4]), st
            assert sum(u["unconsumed"] for u in r.g("nic-unconsumed")["queues"]) == 800
            assert host_view(r.qmp)["host"]["irq-type"] != "MSI"
            return
        # exactly one enable: start 0, count 4, 4 fds; then one switch per vector as the guest
        # unmasks it (request_irq), each start v count 1
        calls = r.msi_calls()
        assert calls[0] == (EVENTFD_TRIGGER, 0, 4, 4), calls
        assert [c for c in calls if c[2] != 1] == [(EVENTFD_TRIGGER, 0, 4, 4)], calls
        assert sorted(c[1] for c in calls[1:]) == [0, 1, 2, 3] and all(c[3] == 1 for c in calls[1:])
        counts = r.dev.query_vfio()["set-irqs"]
        assert counts["msi-enable"] == 1 and counts["msi-vector-switch-to-irqfd"] == 4
        assert counts["enable-no-vector"] == 1 and counts["index-disable"] == 1  # MSI-X off first
        wait_for(lambda: all(q["records"] == 200 for q in r.stats()["queues"][:4]), 60, "every record consumed")
        st = r.stats()
        assert st["mode"] == "msi" and st["msi-vectors"] == 4
        assert all(st["interrupts"][str(v)] > 0 for v in range(4)), st["interrupts"]
        assert all(q["gaps"] == 0 for q in st["queues"]) and st["intx-unexpected"] == 0
        view = r.dev.query_vfio()["msi"]
        assert view["enabled"] and view["nr-vectors"] == 4 and view["mask"] & 0xF == 0
        assert [v["trigger"] for v in view["vectors"]] == ["irqfd"] * 4
        assert [v["message"][1] - view["data"] for v in view["vectors"]] == [0, 1, 2, 3]  # data | v
        h = host_view(r.qmp)["host"]
        assert h["irq-type"] == "MSI" and h["msi-nvec"] == 4
        assert [v["vector"] for v in h["vectors"]] == [0, 1, 2, 3]
        assert all(v["trigger-fd"] is not None for v in h["vectors"])
        assert r.dev.query_vfio()["intx"]["enabled"] is False
        # unbind: MSI disabled in the host with count 0, INTx back on
        r.g("nic-reprobe", mode="intx")
        assert r.msi_calls()[-1] == (NONE_TRIGGER, 0, 0, 0)
        assert r.dev.query_vfio()["set-irqs"]["msi-disable"] == 1
        h = host_view(r.qmp)["host"]
        assert h["irq-type"] == "INTX" and h["msi-nvec"] == 0 and h["vectors"] == []
        view = r.dev.query_vfio()
        assert not view["msi"]["enabled"] and view["msi"]["vectors"] == [] and view["intx"]["enabled"]


@pytest.mark.parametrize("emulate", [True, False], ids=["mask-emulated", "emulate-msix-mask-off"])
def test_masked_msi_vector_pends_and_unmask_delivers_once(workdir: str, emulate: bool) -> None:
    """vfio cannot mask MSI in the host: the guest's mask bit switches the vector's trigger to the
    VMM's eventfd; the host's interrupt while masked sets the capability's pending bit and nothing
    is delivered; unmask switches back and delivers exactly once.  With the ``emulate-msix-mask``
    fix off, the interrupt reaches the masked vector."""
    with msi_rig(workdir, "--vectors", "8") as r:
        r.dev.faults.set_fix(vfio_pci.MASK_EMULATION_FIX, emulate)
        r.g("nic-reprobe", mode="msi")
        for q in range(4):
            r.g("nic-request-irq", queue=q)
        r.g("nic-generate", queue=1, n=10)
        wait_for(lambda: r.records(1) == 10, 60, "queue 1's first records")
        before = r.stats()["interrupts"]["1"]
        n_calls = len(r.msi_calls())
        r.g("nic-mask", entry=1, masked=True)
        r.g("nic-generate", queue=1, n=5)
        if not emulate:
            assert len(r.msi_calls()) == n_calls  # the trigger stayed on the irqfd
            wait_for(lambda: r.records(1) == 15, 60, "the records, consumed while the vector is masked")
            assert r.stats()["interrupts"]["1"] > before
            return
        assert r.msi_calls()[n_calls:] == [(EVENTFD_TRIGGER, 1, 1, 1)]
        assert r.dev.query_vfio()["msi"]["vectors"][1]["trigger"] == "interrupt"
        wait_for(lambda: r.stats()["pba"] & (1 << 1), 60, "the pending bit")
        st = r.stats()
        assert st["interrupts"]["1"] == before and st["queues"][1]["records"] == 10  # nothing delivered
        assert sum(u["unconsumed"] for u in r.g("nic-unconsumed")["queues"]) == 5
        r.g("nic-mask", entry=1, masked=False)
        wait_for(lambda: r.records(1) == 15, 60, "the pending interrupt on unmask")
        st = r.stats()
        assert st["interrupts"]["1"] == before + 1 and st["pba"] == 0  # exactly once
        view = r.dev.query_vfio()
        assert view["msi"]["pending-delivered"] == 1 and view["msi"]["vectors"][1]["trigger"] == "irqfd"
        assert view["set-irqs"]["msi-vector-switch-to-userspace"] == 1
        r.g("nic-generate", queue=1, n=5)  # and back on the irqfd
        wait_for(lambda: r.records(1) == 20, 60, "the next records through the irqfd")
        assert r.dev.query_vfio()["msi"]["pending-delivered"] == 1


def test_host_exhaustion_on_msi_enable_stops_the_vm(workdir: str) -> None:
    """Two host vectors, the guest enables MSI with 4: the host refuses (ENOSPC, 2 available), the
    VM stops with X_VFIO_IRQ_FATAL naming the device and the MSI index, the host is left with MSI
    off and its pool full; nothing hangs once the VM runs again."""
    with msi_rig(workdir, "--vectors", "8", "--host-irqs", "2") as r:
        done: list[object] = []
        t = threading.Thread(target=lambda: done.append(r.g("nic-reprobe", mode="msi")))
        t.start()
        try:
            wait_for(lambda: any(e["event"] == "X_VFIO_IRQ_FATAL" for e in r.m.events), 60, "the fatal event")
            ev = next(e for e in r.m.events if e["event"] == "X_VFIO_IRQ_FATAL")["data"]
            assert ev["device"] == "nic0" and ev["index"] == "MSI" and ev["kind"] == "msi-enable", ev
            assert ev["errno"] == 28 and ev["path"] == "msi"  # ENOSPC
            wait_for(lambda: not r.m.running, 60, "the VM stopped")
            assert r.msi_calls() == [(EVENTFD_TRIGGER, 0, 4, 4)]
            view = r.dev.query_vfio()
            assert view["fatal"]["index"] == "MSI" and not view["msi"]["enabled"] and view["msi"]["vectors"] == []
            h = host_view(r.qmp)["host"]
            assert h["last-refusal"]["index"] == "MSI" and h["last-refusal"]["requested"] == 4
            assert h["last-refusal"]["available"] == 2 and h["pool"]["free"] == 2 and h["irq-type"] != "MSI"
        finally:
            r.m.resume()
            t.join(120)
        assert not t.is_alive() and done  # the guest's probe completed once the VM ran again
