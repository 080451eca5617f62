"""The passthrough device in the VMM (kickcall.vfio.pci): a machine with a vfio-user device served
by the real VfioUserServer, QEMU 8.2's MSI-X design against the old NORESIZE path.

The host side is tests/vfio_fake_host.py, a stand-in until the real host model lands (swap
``FakeHost`` for it in ``vfio_machine``).  Guest actions run on a vCPU through the guest
kernel's PCI helpers, so every config and BAR access really leaves through the hypervisor.
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
from kickcall.vfio import pci as vfio_pci
from kickcall.vfio.server import VfioUserServer
from kickcall.vfio.uapi import VfioIrqSetFlag as F

from helpers import machine_toml, wait_for
from vfio_fake_host import FakeHost, SetIrqsCall

EVENTFD_TRIGGER = int(F.DATA_EVENTFD | F.ACTION_TRIGGER)
NONE_TRIGGER = int(F.DATA_NONE | F.ACTION_TRIGGER)


class Rig:
    """A running machine, its passthrough device, the host behind it, and guest helpers."""

    def __init__(self, m: Machine, host: FakeHost, server: VfioUserServer) -> None:
        self.m = m
        self.host = host
        self.server = server
        self.dev = m.passthrough["nic0"]
        assert m.guest_os is not None
        self.k = m.guest_os.k
        self.pci: GuestPciDev = m.guest_os.devs[self.dev.devfn >> 3].pci
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
def vfio_machine(workdir: str, *, host: FakeHost | None = None, max_msg_fds: int = 16,
                 extra: str = "") -> Iterator[Rig]:
    host = host or FakeHost()
    sock = os.path.join(workdir, "vfu.sock")
    server = VfioUserServer(sock, host, max_msg_fds=max_msg_fds).start()
    dev = f'[[device]]\ntype = "vfio-user"\nid = "nic0"\nsocket = "{sock}"\n{extra}\n'
    m = Machine(parse_config(machine_toml(guest="thread", vcpus=2, devices=dev), "<test>"))
    try:
        m.start(boot=True)
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
        else:
            assert new == [(NONE_TRIGGER, 0, 0, 0), (EVENTFD_TRIGGER, 0, 4, 4)]
            assert r.dev.query_vfio()["noresize-reason"] == "x-msix-noresize"
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
    host = FakeHost(noresize=host_flag)
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
    with vfio_machine(workdir, host=FakeHost(noresize=True), max_msg_fds=4) as r:
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


@pytest.mark.parametrize("noresize", [False, True], ids=["dynamic", "noresize"])
def test_host_exhaustion_on_unmask_stops_the_vm(workdir: str, noresize: bool) -> None:
    """SET_IRQS answered ENOSPC on a guest's unmask: the VM stops, the QMP event names the device
    and the vector, x-query-vfio says why, and the guest's access returned (nothing hangs)."""
    with vfio_machine(workdir, host=FakeHost(noresize=noresize, host_irqs=2)) as r:
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
    """MSI-X off: the host's INTx reaches the guest's line; the guest's next BAR access is the EOI
    (line lowered, host unmasked, before the access itself, as QEMU's vfio_intx_eoi); a level
    still high fires again once per EOI, and once it is low nothing more comes (no storm)."""
    with vfio_machine(workdir) as r:
        assert r.host.mode == "intx" and r.dev.intx_on
        bar0 = r.pci.bar_addr(0)
        r.guest(lambda: r.pci.set_master(True))
        r.host.fire(0)
        wait_for(lambda: r.dev.intx_pending, what="INTx asserted")
        assert r.dev.irq_level == 1
        r.guest(lambda: r.k.readl(bar0 + 4))  # not the status register: the level stays high
        assert r.dev.intx_eois == 1
        wait_for(lambda: r.dev.intx_pending, what="INTx asserted again (level)")
        r.guest(lambda: r.k.readl(bar0))  # EOI (the level is still high: one more), then the status read lowers it
        wait_for(lambda: r.dev.intx_pending, what="the last assertion")
        r.guest(lambda: r.k.readl(bar0 + 4))  # EOI with the level low: quiet
        assert not r.dev.intx_pending and r.dev.irq_level == 0
        unmasks = [c for c in r.host.calls if c.index == 0 and c.flags == int(F.DATA_NONE | F.ACTION_UNMASK)]
        assert len(unmasks) == 3
        assert r.host.intx_fired == 3 and r.dev.intx_interrupts == 3 and r.dev.intx_eois == 3
        assert r.dev.query_vfio()["intx"]["eventfd"]["pending"] == 0


def test_bar_access_paths(workdir: str) -> None:
    """BAR0: registers forwarded by REGION_READ/WRITE, the sparse area served from the mapping,
    the MSI-X table emulated by the VMM (never sent to the server)."""
    with vfio_machine(workdir) as r:
        bar0 = r.pci.bar_addr(0)
        r.guest(lambda: r.k.writel(bar0 + 0x10, 0xCAFE))
        assert r.host.regs[0x10:0x14] == (0xCAFE).to_bytes(4, "little")
        r.guest(lambda: r.k.writel(bar0 + 0x1008, 0xBEEF))
        assert os.pread(r.host.mmap_fd, 4, 0x1008) == (0xBEEF).to_bytes(4, "little")
        os.pwrite(r.host.mmap_fd, (0x1234).to_bytes(4, "little"), 0x1010)
        assert r.guest(lambda: r.k.readl(bar0 + 0x1010)) == 0x1234
        r.guest(lambda: r.k.writel(bar0 + 0x2000, 0xFEE00000))
        assert r.dev.msix.table[0:4] == (0xFEE00000).to_bytes(4, "little")
        q = r.dev.query_vfio()
        assert q["regions"][0]["mmapped"] == [{"offset": 0x1000, "size": 0x1000}]
        assert q["max-msg-fds"] == 16 and q["twin-socket"] is True


def test_reset_disables_interrupts_then_resets(workdir: str) -> None:
    """system_reset: MSI-X disabled in the host, DEVICE_RESET, INTx back on; the guest's view
    comes back masked."""
    with vfio_machine(workdir) as r:
        r.enable_msix()
        r.request(0)
        r.m.system_reset()
        assert r.host.resets == 1
        kinds = r.dev.set_irqs_counts
        assert kinds["index-disable"] == 1 and kinds["intx-enable"] == 2
        assert r.host.mode == "intx" and r.host.msix_fds == {}
        assert not r.dev.msix.enabled and r.dev.msix.entry_masked(0)
        assert all(not v.use and v.interrupt is None for v in r.dev.vectors)


def test_guest_flr_is_device_reset(workdir: str) -> None:
    with vfio_machine(workdir) as r:
        r.enable_msix()
        r.request(0)
        r.guest(r.pci.flr)
        assert r.host.resets == 1 and r.dev.flr_count == 1
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
    """Machine stop: the host's fds closed (client gone), every notifier, mapping and socket of the
    VMM's side closed.  (Known, outside this file: VfioUserServer does not close the dup of a
    region's fd it sends with a GET_REGION_INFO reply; those are the only fds allowed to remain.)"""
    base = _fds()
    host = FakeHost()
    with vfio_machine(workdir, host=host) as r:
        r.enable_msix()
        for v in range(4):
            r.request(v)
        assert len(r.dev.registry.entries(owner="nic0")) >= 8

    def leftover() -> dict[str, str]:
        return {k: v for k, v in _fds().items()
                if (k not in base or base[k] != v) and "kc-fake-bar0" not in v}

    assert host.msix_fds == {}
    wait_for(lambda: not leftover(), what="every fd closed")
