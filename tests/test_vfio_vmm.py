"""The passthrough device in the VMM (kickcall.vfio.pci): a machine with a vfio-user device served
by the real VfioUserServer, QEMU 8.2's MSI-X design against the old NORESIZE path.

The host side is the real host model (``kickcall.vfio.host.VfioPciDevice`` over the kickcall-nic
function ``kickcall.vfio.nic.NicFunction``), wrapped by tests/vfio_recording_host.py only to record
each SET_IRQS it receives; the host's interrupts are the function's own (a queue raises its
vector).  Guest actions run on a vCPU through the guest kernel's PCI helpers, so every config and
BAR access really leaves through the hypervisor.
"""

from __future__ import annotations

import errno
import os
from contextlib import contextmanager
from typing import Any, Callable, Iterator

import pytest

from kickcall.guest.kernel import IRQ_HANDLED, PCI_IRQ_MSIX, GuestPciDev
from kickcall.machine import Machine, parse_config
from kickcall.monitor.client import QMPClient
from kickcall.vfio import nic as N
from kickcall.vfio import pci as vfio_pci
from kickcall.vfio.server import VfioUserServer
from kickcall.vfio.uapi import VfioIrqSetFlag as F
from kickcall.vfio.uapi import VfioPciIrqIndex

from helpers import machine_toml, wait_for
from vfio_recording_host import RecordingHost, SetIrqsCall

EVENTFD_TRIGGER = int(F.DATA_EVENTFD | F.ACTION_TRIGGER)
NONE_TRIGGER = int(F.DATA_NONE | F.ACTION_TRIGGER)
EVENTFD_UNMASK = int(F.DATA_EVENTFD | F.ACTION_UNMASK)
INTX, MSIX = int(VfioPciIrqIndex.INTX), int(VfioPciIrqIndex.MSIX)


class Rig:
    """A running machine, its passthrough device, the host behind it, and guest helpers."""

    def __init__(self, m: Machine, host: RecordingHost, server: VfioUserServer) -> None:
        self.m = m
        self.host = host
        self.server = server
        self.dev = m.passthrough["nic0"]
        assert m.guest_os is not None
        self.k = m.guest_os.k
        # the firmware's part of boot (BARs assigned, decoding on), and no driver: the test is the
        # driver (a booted guest would bind its kickcall-nic driver to the function)
        devs = self.guest(self.k.pci_enumerate)
        self.pci: GuestPciDev = next(d for d in devs if d.devfn == self.dev.devfn)
        self.irqs: dict[int, int] = {}

    def guest(self, fn: Callable[[], Any], timeout: float = 60.0) -> Any:
        """Run *fn* as guest code on vCPU 0 and wait for it (the guest never hangs on the VMM)."""
        return self.k.run_on(0, fn).result(timeout)

    def enable_msix(self, n: int | None = None) -> int:
        """What a driver's probe does: pci_set_master, then pci_alloc_irq_vectors (MSI-X enabled
        with every entry masked)."""
        def probe() -> int:
            self.pci.set_master(True)
            return self.pci.alloc_irq_vectors(1, n or self.host.nvectors, PCI_IRQ_MSIX)

        return self.guest(probe)

    def request(self, v: int) -> None:
        """request_irq on MSI-X entry *v* (the IRQ core unmasks the entry)."""
        self.request_async(v).result(60)

    def request_async(self, v: int) -> Any:
        irq = self.pci.irq_vector(v)
        self.irqs[v] = irq
        return self.k.run_on(0, lambda: self.k.request_irq(irq, lambda _i: IRQ_HANDLED, f"nic0-q{v}"))

    def mask(self, v: int, masked: bool) -> None:
        self.guest(lambda: self.pci.msix_mask(v, masked))

    def count(self, v: int) -> int:
        return sum(self.k.irqs[self.pci.irq_vector(v)].counts)

    def new_msix_calls(self, before: int) -> list[SetIrqsCall]:
        return self.host.msix_calls()[before:]


@contextmanager
def vfio_machine(workdir: str, *, host: RecordingHost | None = None, max_msg_fds: int = 16,
                 extra: str = "") -> Iterator[Rig]:
    host = host or RecordingHost()
    sock = os.path.join(workdir, "vfu.sock")
    server = VfioUserServer(sock, host, max_msg_fds=max_msg_fds).start()
    dev = f'[[device]]\ntype = "vfio-user"\nid = "nic0"\nsocket = "{sock}"\n{extra}\n'
    m = Machine(parse_config(machine_toml(guest="thread", vcpus=2, devices=dev), "<test>"))
    try:
        m.start(boot=False)
        yield Rig(m, host, server)
    finally:
        m.stop()
        server.stop()
        host.close()


def test_config_vfio_user_keys() -> None:
    from kickcall.machine.config import ConfigError

    cfg = parse_config('[[device]]\ntype = "vfio-user"\nsocket = "/tmp/x.sock"\ndma = "message"\n'
                       'x-msix-noresize = true\n')
    d = cfg.devices[0]
    assert (d.type, d.socket, d.dma, d.x_msix_noresize) == ("vfio-user", "/tmp/x.sock", "message", True)
    for text, key in [('[[device]]\ntype = "vfio-user"\n', "device[0].socket"),
                      ('[[device]]\ntype = "vfio-user"\nsocket = "s"\ndma = "shm"\n', "device[0].dma"),
                      ('[[device]]\ntype = "vfio-user"\nsocket = "s"\nx-msix-noresize = 1\n', "device[0].x-msix-noresize"),
                      ('[[device]]\ntype = "vfio-user"\nsocket = "s"\nqueues = 2\n', "device[0].queues")]:
        with pytest.raises(ConfigError) as ei:
            parse_config(text)
        assert ei.value.key == key


def test_msix_enable_all_masked_wires_no_vector(workdir: str) -> None:
    """MSI-X enable with every vector masked: exactly one SET_IRQS (MSIX, start 0, count 1, no fd)."""
    with vfio_machine(workdir) as r:
        assert r.host.msix_calls() == []
        r.enable_msix()
        calls = r.host.msix_calls()
        assert [(c.flags, c.start, c.count, c.nfds) for c in calls] == [(EVENTFD_TRIGGER, 0, 1, 0)]
        assert r.host.mode == "msix" and r.host.msix_fds == {}
        assert r.dev.set_irqs_counts["enable-no-vector"] == 1 and r.dev.msix_host_on
        # the host: one host vector (start + count), no trigger; the function's MSI-X on, DisINTx set
        assert [(h["vector"], h["trigger-fd"]) for h in r.host.describe()["vectors"]] == [(0, None)]
        assert r.host.nic.msix_enabled and r.host.nic.intx_disabled


@pytest.mark.parametrize("noresize_switch", [False, True], ids=["dynamic", "x-msix-noresize"])
def test_unmask_wires_exactly_one_vector(workdir: str, noresize_switch: bool) -> None:
    """Dynamic path: each first unmask is one SET_IRQS(start=v, count=1, one fd), no other vector
    touched, and the host's interrupt reaches the guest through the irqfd.  With the
    x-msix-noresize switch the old path comes back: the index is disabled and re-enabled."""
    extra = f"x-msix-noresize = {str(noresize_switch).lower()}"
    with vfio_machine(workdir, extra=extra) as r:
        r.enable_msix()
        r.request(0)
        r.host.fire(0)
        wait_for(lambda: r.count(0) == 1, what="vector 0's interrupt in the guest")
        before = len(r.host.msix_calls())
        r.request(3)
        new = [(c.flags, c.start, c.count, c.nfds) for c in r.new_msix_calls(before)]
        if not noresize_switch:
            assert new == [(EVENTFD_TRIGGER, 3, 1, 1)]
            assert sorted(r.host.msix_fds) == [0, 3]
            assert r.dev.set_irqs_counts["index-disable"] == 0
            assert r.dev.set_irqs_counts["vector-add"] == 2
            # the host allocated one vector in place for entry 3 and never released vector 0's trigger
            assert r.host.count("dynamic-allocs") == 1 and r.host.count("vector-deassigns") == 0
            assert r.host.pool.allocated == 2
        else:
            assert new == [(NONE_TRIGGER, 0, 0, 0), (EVENTFD_TRIGGER, 0, 4, 4)]
            assert r.dev.query_vfio()["noresize-reason"] == "x-msix-noresize"
            assert r.host.count("dynamic-allocs") == 0 and r.host.pool.allocated == 4
        for v, before_count in ((3, 0), (0, 1)):
            r.host.fire(v)
            wait_for(lambda v=v, b=before_count: r.count(v) == b + 1, what=f"vector {v}'s interrupt")
        view = r.dev.query_pci_msix()["host"]["vectors"]
        assert {h["vector"]: h["trigger"] for h in view if h["use"]} == {0: "irqfd", 3: "irqfd"}
        assert r.k.spurious == 0


@pytest.mark.parametrize("host_flag", [True, False], ids=["host-noresize", "switch"])
def test_noresize_path_disables_and_reenables(workdir: str, host_flag: bool) -> None:
    """The old path (host NORESIZE, or the switch): a vector past nr_vectors disables the index
    and re-enables it with v+1 eventfds in one SET_IRQS -- masked and unused vectors on the VMM's
    interrupt eventfds; a vector already within nr_vectors is switched alone."""
    host = RecordingHost(noresize=host_flag)
    extra = "" if host_flag else "x-msix-noresize = true"
    with vfio_machine(workdir, host=host, extra=extra) as r:
        r.enable_msix()
        r.request(2)
        calls = [(c.flags, c.start, c.count, c.nfds) for c in r.host.msix_calls()]
        assert calls == [(EVENTFD_TRIGGER, 0, 1, 0), (NONE_TRIGGER, 0, 0, 0), (EVENTFD_TRIGGER, 0, 3, 3)]
        assert r.dev.query_vfio()["noresize-reason"] == ("host-flag" if host_flag else "x-msix-noresize")
        assert r.dev.nr_vectors == 3
        view = {h["vector"]: h["trigger"] for h in r.dev.query_pci_msix()["host"]["vectors"]}
        assert view == {0: "interrupt", 1: "interrupt", 2: "irqfd"}
        before = len(r.host.msix_calls())
        r.request(1)  # within nr_vectors: one switch, nothing disabled
        assert [(c.start, c.count, c.nfds) for c in r.new_msix_calls(before)] == [(1, 1, 1)]
        assert r.dev.set_irqs_counts["vector-switch-to-irqfd"] == 1
        for v in (1, 2):
            r.host.fire(v)
            wait_for(lambda v=v: r.count(v) == 1, what=f"vector {v}'s interrupt")


def test_noresize_past_max_msg_fds_stops_with_clear_error(workdir: str) -> None:
    """The old path cannot carry more fds than one message takes: a clear error, the VM stopped,
    the index never disabled (the vectors in use keep working)."""
    with vfio_machine(workdir, host=RecordingHost(noresize=True), max_msg_fds=4) as r:
        r.enable_msix()
        r.request(3)  # 4 fds: fits
        before = len(r.host.msix_calls())
        fut = r.request_async(4)  # 5 fds: does not
        wait_for(lambda: not r.m.running, what="the VM to stop")
        r.m.resume()  # the guest's access had completed: the vCPU goes on
        fut.result(60)
        assert r.new_msix_calls(before) == []
        wait_for(lambda: any(e["event"] == "X_VFIO_IRQ_FATAL" for e in r.m.events), what="the fatal event")
        ev = next(e for e in r.m.events if e["event"] == "X_VFIO_IRQ_FATAL")["data"]
        assert (ev["device"], ev["vector"], ev["errno"], ev["path"]) == ("nic0", 4, errno.E2BIG, "noresize")
        assert "max_msg_fds" in ev["reason"]
        assert r.dev.query_vfio()["fatal"]["vector"] == 4
        assert sorted(r.host.msix_fds) == [0, 1, 2, 3]
        r.host.fire(3)  # the vectors in use keep working
        wait_for(lambda: r.count(3) == 1, what="vector 3's interrupt after the refusal")


@pytest.mark.parametrize("noresize", [False, True], ids=["dynamic", "noresize"])
def test_host_exhaustion_on_unmask_stops_the_vm(workdir: str, noresize: bool) -> None:
    """SET_IRQS answered ENOSPC on a guest's unmask: the VM stops, the QMP event names the device
    and the vector, x-query-vfio says why, and the guest's access returned (nothing hangs)."""
    with vfio_machine(workdir, host=RecordingHost(noresize=noresize, host_irqs=2)) as r:
        r.m.start_monitor(os.path.join(workdir, "qmp.sock"))
        qmp = QMPClient(os.path.join(workdir, "qmp.sock")).connect(wait=30)
        r.enable_msix()
        r.request(0)
        r.request(1)
        assert r.m.running and r.dev.fatal is None
        fut = r.request_async(2)  # the exit returns: the stop is handed to another thread
        wait_for(lambda: not r.m.running, what="the VM to stop")
        seen: list[dict] = []

        def qmp_event() -> bool:
            assert qmp.execute("query-status")["status"] == "paused"
            seen.extend(qmp.events())
            return any(e["event"] == "X_VFIO_IRQ_FATAL" for e in seen)

        wait_for(qmp_event, what="the QMP event")
        data = next(e for e in seen if e["event"] == "X_VFIO_IRQ_FATAL")["data"]
        assert (data["device"], data["vector"]) == ("nic0", 2)
        assert "STOP" in [e["event"] for e in seen]
        qmp.close()
        r.m.resume()
        fut.result(60)
        wait_for(lambda: any(e["event"] == "X_VFIO_IRQ_FATAL" for e in r.m.events), what="the fatal event")
        names = [e["event"] for e in r.m.events]
        assert names.index("STOP") < names.index("X_VFIO_IRQ_FATAL")
        ev = next(e for e in r.m.events if e["event"] == "X_VFIO_IRQ_FATAL")["data"]
        assert (ev["device"], ev["vector"], ev["errno"]) == ("nic0", 2, errno.ENOSPC)
        assert ev["path"] == ("noresize" if noresize else "dynamic")
        q = r.dev.query_vfio()
        assert q["fatal"]["errno"] == errno.ENOSPC and q["fatal"]["error"] == "ENOSPC"
        # the host's rule that refused: the dynamic path's one vector in place, or the NORESIZE
        # path's all-or-nothing re-enable with v+1 vectors
        refusal = r.host.describe()["last-refusal"]
        if noresize:
            assert refusal == {"index": "MSIX", "path": "enable", "requested": 3, "available": 2}
        else:
            assert refusal == {"index": "MSIX", "path": "dynamic", "vector": 2, "requested": 1, "available": 0}


@pytest.mark.parametrize("emulate", [True, False], ids=["mask-emulated", "emulate-msix-mask-off"])
def test_masked_vector_pends_and_unmask_delivers_once(workdir: str, emulate: bool) -> None:
    """vfio cannot mask in the host: on mask the trigger is switched to the VMM's eventfd; a host
    interrupt while masked sets the PBA bit and delivers nothing; unmask switches back and delivers
    exactly one.  With the emulation switched off (the device's ``emulate-msix-mask`` fix) the
    interrupt reaches the masked guest vector."""
    with vfio_machine(workdir) as r:
        r.dev.faults.set_fix(vfio_pci.MASK_EMULATION_FIX, emulate)
        r.enable_msix()
        r.request(1)
        before = len(r.host.msix_calls())
        r.mask(1, True)
        new = r.new_msix_calls(before)
        if not emulate:
            assert new == []
            r.host.fire(1)
            wait_for(lambda: r.count(1) == 1, what="the interrupt (delivered while masked)")
            assert not r.dev.msix.is_pending(1)
            return
        assert [(c.flags, c.start, c.count, c.nfds) for c in new] == [(EVENTFD_TRIGGER, 1, 1, 1)]
        assert r.dev.set_irqs_counts["vector-switch-to-userspace"] == 1
        for _ in range(3):  # coalesced: several host interrupts, one pending bit
            r.host.fire(1)
        wait_for(lambda: r.dev.msix.is_pending(1), what="the PBA bit")
        assert r.guest(lambda: r.pci.read_pba()) & (1 << 1)
        assert r.count(1) == 0
        r.mask(1, False)
        wait_for(lambda: r.count(1) == 1, what="the pending interrupt on unmask")
        assert not r.dev.msix.is_pending(1)
        assert r.dev.set_irqs_counts["vector-switch-to-irqfd"] == 1
        assert r.dev.vectors[1].interrupt is not None and r.dev.vectors[1].interrupt.peek() == 0
        r.host.fire(1)  # and back on the irqfd
        wait_for(lambda: r.count(1) == 2, what="the next interrupt through the irqfd")
        assert r.dev.msix.describe()["entries"][1]["unmask-delivered"] == 1


def test_function_mask_switches_every_wired_vector(workdir: str) -> None:
    """The MSI-X Function Mask masks every vector: each wired one goes to the VMM's eventfd, a host
    interrupt meanwhile pends, and clearing the mask switches back and delivers it once."""
    with vfio_machine(workdir) as r:
        r.enable_msix()
        r.request(0)
        r.request(2)
        r.guest(lambda: r.pci.msix_function_mask(True))
        assert r.dev.set_irqs_counts["vector-switch-to-userspace"] == 2
        r.host.fire(2)
        wait_for(lambda: r.dev.msix.is_pending(2), what="the PBA bit under the function mask")
        assert r.count(2) == 0
        r.guest(lambda: r.pci.msix_function_mask(False))
        wait_for(lambda: r.count(2) == 1, what="the pending interrupt")
        assert r.dev.set_irqs_counts["vector-switch-to-irqfd"] == 2 and r.count(0) == 0


def test_signal_left_in_userspace_eventfd_is_delivered_on_unmask(workdir: str) -> None:
    """A host interrupt that reached the VMM's eventfd but was not yet read when the guest unmasks
    becomes a pending bit and is delivered once (the main loop is held off to make it certain)."""
    with vfio_machine(workdir) as r:
        r.enable_msix()
        r.request(0)
        r.mask(0, True)
        vec = r.dev.vectors[0]
        assert vec.interrupt is not None
        with r.m.bql:  # the loop handler cannot run: the signal stays in the eventfd
            r.host.fire(0)
            wait_for(lambda: vec.interrupt is not None and vec.interrupt.peek() == 1, what="the parked signal")
            host_view = {h["vector"]: h for h in r.dev.query_pci_msix()["host"]["vectors"]}[0]
            assert host_view["trigger"] == "interrupt" and host_view["interrupt"]["pending"] == 1
            assert vec.interrupt.peek() == 1  # the view read the counter without consuming it
            # the guest's unmask arrives as an exit on another thread; it waits for the lock we hold
            fut = r.k.run_on(0, lambda: r.pci.msix_mask(0, False))
        fut.result(60)
        wait_for(lambda: r.count(0) == 1, what="exactly one delivery")
        assert r.dev.msix.describe()["entries"][0]["unmask-delivered"] == 1
        # nothing left anywhere that could deliver a second one
        assert not r.dev.msix.is_pending(0) and vec.interrupt.peek() == 0 and r.dev.msix.sent[0] == 1


@pytest.mark.parametrize("dma", ["fd", "message"])
def test_dma_reaches_guest_memory(workdir: str, dma: str) -> None:
    """dma = "message": the server reads and writes guest RAM by DMA_READ/DMA_WRITE messages that
    the client serves from guest memory; dma = "fd": through the memfd it mapped."""
    with vfio_machine(workdir, extra=f'dma = "{dma}"') as r:
        gpa = r.k.pages.alloc(4096)
        r.host.dma_write(gpa + 8, b"completion record 1")
        assert r.m.memory.read(gpa + 8, 19) == b"completion record 1"
        r.m.memory.write(gpa + 64, b"descriptor")
        assert r.host.dma_read(gpa + 64, 10) == b"descriptor"
        st = r.server.stats
        if dma == "message":
            assert st.dma_messages >= 2 and r.dev.ram_dma.writes >= 1 and r.dev.ram_dma.reads >= 1
        else:
            assert st.dma_messages == 0 and st.dma_mapped_accesses >= 2
        assert r.dev.query_vfio()["dma"] == dma


def test_intx_passthrough_and_userspace_eoi(workdir: str) -> None:
    """MSI-X off: the function's INTx (a queue raising while MSI and MSI-X are off sets its
    INT_STATUS bit: the level) reaches the guest's line through the host's trigger; the guest's
    next BAR access is the EOI (line lowered, then the host unmasked through the unmask eventfd
    registered with SET_IRQS(INTX, EVENTFD|UNMASK): vfio's virqfd, no message, as QEMU's
    vfio_intx_eoi with a resamplefd).  The level stays high until the guest reads INT_STATUS
    (read-to-clear): each EOI with the level high fires exactly once more (vfio-pci's unmask of
    an asserted line), and once the level is low an EOI is quiet (no storm)."""
    with vfio_machine(workdir) as r:
        assert r.host.mode == "intx" and r.dev.intx_on
        assert [(c.flags, c.start, c.count, c.nfds) for c in r.host.intx_calls()] == \
            [(EVENTFD_TRIGGER, 0, 1, 1), (EVENTFD_UNMASK, 0, 1, 1)]
        assert r.dev.set_irqs_counts["intx-unmask-eventfd"] == 1 and r.host.intx_unmask_fd() is not None
        bar0 = r.pci.bar_addr(0)
        r.guest(lambda: r.pci.set_master(True))
        r.host.fire(0)  # queue 0 raises: INT_STATUS bit 0, the pin; the host automasks and signals
        wait_for(lambda: r.dev.intx_pending, what="INTx asserted")
        assert r.dev.irq_level == 1 and r.host.intx_fired == 1
        for n in (2, 3):  # EOI with the level still high (the ID register, not INT_STATUS)
            assert r.guest(lambda: r.k.readl(bar0 + N.REG_ID)) == N.NIC_ID_MAGIC
            assert r.dev.intx_eois == n - 1
            wait_for(lambda n=n: r.dev.intx_interrupts == n and r.dev.intx_pending,
                     what=f"INTx asserted again after EOI {n - 1} (level still high)")
            assert r.host.intx_fired == n and r.host.count("intx-unmask-eventfd") == n - 1
        # EOI, then the read lowers the level.  The EOI's unmask runs on the host's virqfd thread
        # and the read on its server thread: if the unmask comes first the still-high level fires
        # once more (QEMU's synchronous userspace EOI always does), otherwise nothing fires
        assert r.guest(lambda: r.k.readl(bar0 + N.REG_INT_STATUS)) == 1 << 0
        wait_for(lambda: r.host.count("intx-unmask-eventfd") == 3, what="the host's unmask of EOI 3")
        fired = r.host.intx_fired
        assert fired in (3, 4)
        wait_for(lambda: r.dev.intx_interrupts == fired, what="the VMM to take what the host fired")
        if fired == 4:
            wait_for(lambda: r.dev.intx_pending, what="the last assertion")
            r.guest(lambda: r.k.readl(bar0 + N.REG_ID))  # EOI with the level low
            wait_for(lambda: r.host.count("intx-unmask-eventfd") == 4, what="the host's unmask of EOI 4")
        # quiet: the level is low, the host's line unmasked, nothing in flight anywhere
        assert r.host.intx_fired == fired and r.dev.intx_interrupts == fired
        assert not r.dev.intx_pending and r.dev.irq_level == 0
        h = r.host.describe()["intx"]
        assert not h["masked"] and not h["pin-asserted"] and h["eventfd-count"] == 0
        assert r.host.nic.int_status == 0
        assert r.dev.intx_eois == fired and r.dev.intx_unmask_writes == fired
        # the eventfd path only: no SET_IRQS(INTX, DATA_NONE|UNMASK) message
        assert [c for c in r.host.intx_calls() if c.action == F.ACTION_UNMASK and c.data == F.DATA_NONE] == []
        assert r.dev.set_irqs_counts["intx-unmask"] == 0
        assert r.dev.query_vfio()["intx"]["eventfd"]["pending"] == 0


def test_bar_access_paths(workdir: str) -> None:
    """BAR0 (the function's registers, trapped): forwarded by REGION_READ/WRITE; BAR4's sparse
    area (the function's memfd): served from the VMM's mapping, no message; BAR4's MSI-X table:
    emulated by the VMM, never sent to the server (the host's table is untouched)."""
    with vfio_machine(workdir) as r:
        nic = r.host.nic
        bar0, bar4 = r.pci.bar_addr(0), r.pci.bar_addr(N.MSIX_BAR)
        assert r.guest(lambda: r.k.readl(bar0 + N.REG_ID)) == N.NIC_ID_MAGIC
        assert r.guest(lambda: r.k.readl(bar0 + N.REG_NVEC)) == r.host.nvectors
        r.guest(lambda: r.k.writel(bar0 + N.QUEUE_BASE + N.Q_RING_LO, 0xCAFE000))
        assert nic.queues[0].ring_base == 0xCAFE000
        assert r.host.region_read(0, N.QUEUE_BASE + N.Q_RING_LO, 4) == (0xCAFE000).to_bytes(4, "little")
        (area, size), = nic.bar4_mmap_areas()
        commands = r.server.stats.commands
        r.guest(lambda: r.k.writel(bar4 + area + 0x100, 0xBEEF))
        assert os.pread(nic.bar4_memfd, 4, area + 0x100) == (0xBEEF).to_bytes(4, "little")
        os.pwrite(nic.bar4_memfd, (0x1234).to_bytes(4, "little"), area + 0x104)
        assert r.guest(lambda: r.k.readl(bar4 + area + 0x104)) == 0x1234
        r.guest(lambda: r.k.writel(bar4 + 0, 0xFEE00000))  # MSI-X table entry 0, address
        assert r.dev.msix.table[0:4] == (0xFEE00000).to_bytes(4, "little")
        assert r.server.stats.commands == commands  # none of the four reached the server
        assert nic.msix_entry(0)[0] == 0 and r.host.count("msix-table-writes-dropped") == 0
        q = r.dev.query_vfio()
        mmapped = {reg["index"]: reg["mmapped"] for reg in q["regions"]}
        assert mmapped == {0: [], N.MSIX_BAR: [{"offset": area, "size": size}]}
        assert q["max-msg-fds"] == 16 and q["twin-socket"] is True


def test_reset_disables_interrupts_then_resets(workdir: str) -> None:
    """system_reset: MSI-X disabled in the host before DEVICE_RESET, INTx (and its unmask
    eventfd) back on after it, every vector of the VMM's side freed, the host's vectors back in
    its pool.  The guest boots again after the reset and its kickcall-nic driver enables MSI-X
    with every entry masked: INTx off, one SET_IRQS with no fd, nothing wired."""
    with vfio_machine(workdir) as r:
        r.enable_msix()
        r.request(0)
        before = len(r.host.calls)
        r.m.system_reset()
        assert r.host.resets == 1
        (mark,) = r.host.reset_marks
        calls = [(c.index, c.flags, c.start, c.count, c.nfds) for c in r.host.calls]
        assert calls[before:mark] == [(MSIX, NONE_TRIGGER, 0, 0, 0)]
        assert calls[mark:] == [(INTX, EVENTFD_TRIGGER, 0, 1, 1), (INTX, EVENTFD_UNMASK, 0, 1, 1),
                                (INTX, NONE_TRIGGER, 0, 0, 0), (MSIX, EVENTFD_TRIGGER, 0, 1, 0)]
        kinds = r.dev.set_irqs_counts
        assert kinds["index-disable"] == 1 and kinds["intx-enable"] == 2
        assert r.host.count("msix-disables") == 1 and r.host.count("msix-enables") == 2
        assert r.host.mode == "msix" and r.host.msix_fds == {}
        pool = r.host.pool.describe()
        assert pool["allocated"] == 1 and pool["frees"] == 1
        assert r.dev.msix.enabled and all(r.dev.msix.entry_masked(v) for v in range(r.host.nvectors))
        assert all(not v.use and v.interrupt is None for v in r.dev.vectors)


def test_guest_flr_is_device_reset(workdir: str) -> None:
    """The guest's Initiate FLR is the VMM's: interrupts off, DEVICE_RESET (never a config write
    the host would act on), INTx back on."""
    with vfio_machine(workdir) as r:
        r.enable_msix()
        r.request(0)
        r.guest(r.pci.flr)
        assert r.host.resets == 1 and r.dev.flr_count == 1 and r.host.count("user-flr") == 0
        assert r.host.mode == "intx" and not r.dev.msix_host_on


def _fds() -> dict[str, str]:
    out = {}
    for f in os.listdir("/proc/self/fd"):
        try:
            out[f] = os.readlink(f"/proc/self/fd/{f}")
        except OSError:
            pass
    return out


def test_close_releases_everything(workdir: str) -> None:
    """Machine stop: the client goes away and the host releases the device (every trigger and the
    unmask and REQ eventfds closed, every host vector back in the pool, no DMA); every notifier,
    mapping and socket of the VMM's side closed; once the host is closed too, not one fd is left."""
    base = _fds()
    host = RecordingHost()
    with vfio_machine(workdir, host=host) as r:
        r.enable_msix()
        for v in range(4):
            r.request(v)
        assert len(r.dev.registry.entries(owner="nic0")) >= 8
        assert sorted(host.msix_fds) == [0, 1, 2, 3] and host.describe()["req"]["trigger-fd"] is not None
        r.m.stop()
        wait_for(lambda: host.count("releases") == 1, what="the host to release the device")
        d = host.describe()
        assert host.mode is None and host.msix_fds == {} and d["vectors"] == []
        assert (d["intx"]["trigger-fd"], d["intx"]["unmask-fd"], d["req"]["trigger-fd"]) == (None, None, None)
        assert host.pool.allocated == 0 and host.nic.dma is None

    def leftover() -> dict[str, str]:
        return {k: v for k, v in _fds().items() if k not in base or base[k] != v}

    wait_for(lambda: not leftover(), what="every fd closed")
