"""Passthrough interrupts end to end, across three processes: ``kickcall vfio-user-server`` (the
host function behind vfio-pci's rules), the VMM (``type = "vfio-user"``: the vfio-user client that
emulates the guest's MSI-X table) and the guest (the kickcall-nic driver in guest/nic.py).

Interrupts are counted by completion records, never by eventfd signals (signals coalesce, and
the device raises one interrupt per batch of records): a record left unconsumed a fixed time after
the traffic stopped, with no interrupt pending anywhere (guest PBA clear, host PBA clear), is a
lost interrupt.

* the dynamic path (QEMU 8.2 on Linux 6.5) loses nothing and raises no INTx while the guest brings
  vectors up one by one; the old NORESIZE path (disable MSI-X, re-enable with one more vector)
  loses the interrupts the server fires inside that window (``fire-in-msix-disable-window``), and
  the dynamic test fails when the client is switched to the NORESIZE behaviour
  (``x-msix-noresize``);
* growth from 1 to 2048 vectors on the dynamic path: the fd -1 enable, then exactly one
  SET_IRQS(start=v, count=1) per vector, host MSI-X never disabled, nothing lost meanwhile;
* host vector exhaustion on a guest's unmask stops the VM with an event on both paths;
* a mask/unmask storm on a passthrough vector: nothing delivered while masked, at most one
  delivery per unmask, nothing lost;
* INTx passthrough: delivered, automasked, unmasked through the unmask eventfd, no storm.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from dataclasses import dataclass
from typing import Any, Iterator

import pytest

from helpers import machine_toml, wait_for
from kickcall.machine.config import parse_config
from kickcall.machine.machine import Machine
from kickcall.monitor.client import QMPClient
from vfio_env import host_view, monitor, vfio_server

#: after the traffic stops, a record still unconsumed this long with nothing pending is lost
SETTLE = 2.0


@dataclass
class Rig:
    m: Machine
    slot: int
    qmp: str  # the server's monitor
    mqmp: str  # the machine's monitor

    def g(self, cmd: str, **kw: Any) -> dict:
        return self.m.guest_cmd({"cmd": cmd, "slot": self.slot, **kw}, timeout=120)

    @property
    def dev(self):
        return self.m.passthrough["nic0"]

    def stats(self) -> dict:
        return self.g("nic-stats")

    def host(self) -> dict:
        return host_view(self.qmp)

    def lost(self) -> int:
        """Records unconsumed with no interrupt pending: wait SETTLE, then read the rings (nothing
        consumed) and the pending bits on both sides."""
        time.sleep(SETTLE)  # the "fixed time after it was written" of the definition
        unconsumed = sum(q["unconsumed"] for q in self.g("nic-unconsumed")["queues"])
        st = self.stats()
        h = self.host()
        pending = st["pba"] != 0 or h["host"]["msix-pba"].strip("0") != ""
        return 0 if pending else unconsumed


@contextlib.contextmanager
def passthrough(workdir: str, *server_args: str, extra: str = "", msix: bool = True,
                guest: str = "process") -> Iterator[Rig]:
    with vfio_server(workdir, *server_args) as (_p, sock, qmp):
        dev = f'[[device]]\ntype = "vfio-user"\nid = "nic0"\nsocket = "{sock}"\n{extra}\n'
        m = Machine(parse_config(machine_toml(guest=guest, vcpus=2, devices=dev), "<test>"))
        try:
            m.start(boot=True, msix=msix)
            mqmp = os.path.join(workdir, "m.qmp")
            m.start_monitor(mqmp)
            yield Rig(m, m.passthrough["nic0"].devfn >> 3, qmp, mqmp)
        finally:
            m.stop()


def _grow_under_traffic(r: Rig, active: int, first: int, last: int) -> None:
    """Queues 0..active-1 up and generating; then entries first..last-2 brought up one by one
    (each its own guest command, so the traffic runs in between); then the traffic stops, every
    record is consumed, and the last entry comes up with nothing after it: whatever the device
    raises while that entry comes up is the last interrupt its queue gets."""
    for q in range(active):
        r.g("nic-request-irq", queue=q)
    for q in range(active):
        r.g("nic-generate", queue=q, n=0, rate=3000)
    for e in range(first, last - 1):
        r.g("nic-bring-up", first=e, count=1)
        r.g("nic-generate", queue=e % active, n=16)
    for q in range(active):
        r.g("nic-generate", queue=q, n=0, rate=0)
    wait_for(lambda: all(u["unconsumed"] == 0 for u in r.g("nic-unconsumed")["queues"]), 30, "a quiet device")
    r.g("nic-bring-up", first=last - 1, count=1)


@pytest.mark.parametrize("client_path", ["dynamic", "x-msix-noresize"])
def test_dynamic_path_loses_nothing_while_vectors_come_up(workdir, client_path):
    """K=4 queues produce records while the guest brings entries 4..11 up one by one.  Dynamic:
    every record consumed, no INTx.  With the client switched to the NORESIZE behaviour (and the
    server firing the active vectors inside each disable->re-enable window), records are lost."""
    extra = "x-msix-noresize = true\n" if client_path != "dynamic" else ""
    with passthrough(workdir, "--vectors", "16", extra=extra) as r:
        with monitor(r.qmp) as mon:
            mon.execute("x-debug-fault", {"dev": "nic0", "fault": "fire-in-msix-disable-window", "action": "on"})
        _grow_under_traffic(r, 4, 4, 12)
        lost = r.lost()
        st, h = r.stats(), r.host()
        written = sum(q["records-written"] for q in h["nic"]["queues"])
        consumed = sum(q["records"] for q in st["queues"])
        assert written > 0 and all(q["gaps"] == 0 for q in st["queues"])
        if client_path == "dynamic":
            assert lost == 0 and consumed == written, (lost, consumed, written)
            assert h["host"]["intx-unhandled"] == 0 and st["intx-unexpected"] == 0
            assert h["host"]["counts"].get("msix-disables", 0) == 0
        else:
            # every window fired: its records were written while MSI-X was off, their interrupts
            # went to the unhandled INTx, and nothing came after them
            assert h["host"]["counts"].get("msix-disables", 0) >= 1
            assert h["host"]["intx-unhandled"] >= 1
            assert lost >= 4 and consumed < written, (lost, consumed, written)  # the last window: one per queue


def test_growth_to_2048_vectors_on_the_dynamic_path(workdir):
    n = 2048
    with passthrough(workdir, "--vectors", str(n), "--host-irqs", "4096") as r:
        for q in range(4):
            r.g("nic-request-irq", queue=q)
        for q in range(4):
            r.g("nic-generate", queue=q, n=0, rate=500)
        step = 64
        for e in range(4, n, step):
            r.g("nic-bring-up", first=e, count=min(step, n - e))
        for q in range(4):
            r.g("nic-generate", queue=q, n=0, rate=0)
        lost = r.lost()
        vmm = r.dev.query_vfio()["set-irqs"]
        h = r.host()["host"]
        assert vmm["enable-no-vector"] == 1 and vmm["vector-add"] == n, vmm
        assert vmm["index-disable"] == 0 and vmm["index-enable-all"] == 0
        # on the host: n+1 MSI-X SET_IRQS (the fd -1 enable and one per vector), each count 1, all
        # accepted; every vector assigned exactly once (none touched another's); MSI-X never off
        assert h["set-irqs"]["by-kind"]["MSIX/TRIGGER/EVENTFD"] == n + 1
        assert h["counts"]["vector-assigns"] == n and h["counts"].get("msix-disables", 0) == 0
        assert h["counts"]["msix-enables"] == 1
        assert len(h["vectors"]) == n and all(v["trigger-fd"] is not None for v in h["vectors"])
        st = r.stats()
        assert lost == 0 and all(q["gaps"] == 0 and q["records"] > 0 for q in st["queues"][:4])


def test_noresize_growth_stops_at_max_msg_fds(workdir):
    """The old path re-enables the whole set in one SET_IRQS, one fd per vector: it cannot go past
    the server's max_msg_fds (vfio-user has no -1 holes in an fd array).  It stops with a clear
    error -- the VM stopped, the event naming the vector -- before it disables anything."""
    with passthrough(workdir, "--vectors", "64", "--max-msg-fds", "8", extra="x-msix-noresize = true\n") as r:
        for q in range(2):
            r.g("nic-request-irq", queue=q)
        t = threading.Thread(target=lambda: r.g("nic-bring-up", first=2, count=7))  # entries 2..8
        t.start()
        try:
            wait_for(lambda: any(e["event"] == "X_VFIO_IRQ_FATAL" for e in r.m.events), 60, "the fatal event")
            assert r.dev.fatal["vector"] == 8 and r.dev.fatal["errno"] == 7  # E2BIG: 9 fds > 8
            assert not r.m.running
            h = r.host()["host"]
            vmm = r.dev.query_vfio()["set-irqs"]
            assert len(h["vectors"]) == 8 and h["irq-type"] == "MSIX"  # grew to 8 and stopped there, intact
            assert h["counts"]["msix-disables"] == vmm["index-disable"] >= 6  # one teardown per growth step
        finally:
            r.m.resume()
            t.join(60)


@pytest.mark.parametrize("path", ["dynamic", "noresize"])
def test_host_exhaustion_on_unmask_stops_the_vm_with_an_event(workdir, path):
    args = ["--vectors", "8", "--host-irqs", "2"] + (["--no-dynamic-msix"] if path == "noresize" else [])
    with passthrough(workdir, *args) as r:
        with QMPClient(r.mqmp, timeout=60) as mon:
            mon.connect()
            r.g("nic-request-irq", queue=0)
            r.g("nic-request-irq", queue=1)
            done: list[object] = []
            t = threading.Thread(target=lambda: done.append(r.g("nic-request-irq", queue=3)))
            t.start()  # the fd -1 enable took one host vector (vector 0 uses it), vector 1 the other: 3 finds none
            seen: list[dict] = []

            def fatal_seen() -> bool:
                mon.execute("query-status")  # events arrive with replies: this client reads on demand
                seen.extend(mon.events())
                return any(e["event"] == "X_VFIO_IRQ_FATAL" for e in seen)

            try:
                wait_for(fatal_seen, 60, "the event")
                ev = next(e for e in seen if e["event"] == "X_VFIO_IRQ_FATAL")
                assert ev["data"]["device"] == "nic0" and ev["data"]["vector"] == 3, ev
                assert mon.execute("query-status")["status"] == "paused"
                why = mon.execute("x-query-vfio", {"dev": "nic0"}) if _has_vfio_view(mon) else r.dev.query_vfio()
                assert why["fatal"]["vector"] == 3 and why["fatal"]["errno"] == 28  # ENOSPC
                hv = r.host()["host"]
                assert hv["last-refusal"] is not None and hv["last-refusal"]["available"] == 0 + 2 * (path == "noresize")
                if path == "dynamic":  # vector 3 alone was refused; 0 and 1 keep their host vectors
                    assert hv["pool"]["free"] == 0 and {v["vector"] for v in hv["vectors"]} >= {0, 1}
                else:  # the old path had already torn the set down: the re-enable with 4 found 2
                    assert hv["pool"]["free"] == 2 and hv["irq-type"] == "none"
                mon.execute("cont")  # nothing hangs: the guest's unmask completes once the VM runs
                t.join(60)
                assert not t.is_alive() and done
            finally:
                if t.is_alive():
                    mon.execute("cont")
                    t.join(60)


def _has_vfio_view(mon: QMPClient) -> bool:
    try:
        mon.execute("x-query-vfio", {"dev": "nic0"})
        return True
    except Exception:  # the machine's monitor does not list passthrough devices (yet)
        return False


def test_mask_unmask_storm_on_a_passthrough_vector(workdir):
    with passthrough(workdir, "--vectors", "8") as r:
        r.g("nic-request-irq", queue=0)
        r.g("nic-generate", queue=0, n=1)
        wait_for(lambda: r.stats()["queues"][0]["records"] == 1, 30, "the first record")
        for i in range(25):
            before = r.stats()
            r.g("nic-mask", entry=0, masked=True)
            produce = i % 2 == 0
            if produce:
                r.g("nic-generate", queue=0, n=3)
                wait_for(lambda: r.dev.query_pci_msix()["guest"]["entries"][0]["pending"], 30, "the PBA bit")
            mid = r.stats()
            assert mid["interrupts"]["0"] == before["interrupts"]["0"]  # nothing delivered while masked
            assert mid["queues"][0]["records"] == before["queues"][0]["records"]
            r.g("nic-mask", entry=0, masked=False)
            if produce:
                wait_for(lambda: r.stats()["queues"][0]["records"] == before["queues"][0]["records"] + 3, 30,
                         "the records after the unmask")
            after = r.stats()
            assert after["interrupts"]["0"] - before["interrupts"]["0"] == (1 if produce else 0)
        assert r.lost() == 0
        assert r.stats()["queues"][0]["records"] == 1 + 3 * 13


def test_intx_passthrough_level_automask_unmask_eventfd_no_storm(workdir):
    with passthrough(workdir, "--vectors", "8", msix=False) as r:
        assert r.stats()["mode"] == "intx"
        r.g("nic-enable", queue=0)
        for i in range(10):
            r.g("nic-generate", queue=0, n=2)
            wait_for(lambda: r.stats()["queues"][0]["records"] == 2 * (i + 1), 30, "records through INTx")
        time.sleep(SETTLE)
        view = r.host()
        st, h, nq = r.stats(), view["host"], view["nic"]["queues"][0]
        vmm = r.dev.query_vfio()["intx"]
        assert st["intx-interrupts"] >= 1 and st["queues"][0]["records"] == 20
        # each host interrupt was automasked and came back only after the unmask eventfd.  QEMU's
        # userspace EOI happens on the handler's first BAR access -- its INT_STATUS read, before the
        # read clears the level -- so a line still high fires once more after the unmask, and then
        # the handler finds nothing: at most two interrupts per raise of the line, never a storm
        automasks, raises = h["counts"]["intx-automasks"], nq["to-intx"]
        assert automasks > 0, "no INTx reached the host's handler"
        assert automasks == vmm["interrupts"], (automasks, vmm)  # every host interrupt reached the VMM
        assert raises <= 20, nq  # the device raised its line at most once per record written
        assert automasks <= 2 * raises, (automasks, raises)  # bounded: no storm
        assert vmm["unmask-writes"] == vmm["eois"] and vmm["eois"] > 0, vmm
        unmasks = h["counts"]["intx-unmask-eventfd"]
        assert unmasks > 0, "the host never unmasked through the eventfd"
        assert unmasks <= vmm["unmask-writes"], (unmasks, vmm)  # eventfd writes may coalesce, never multiply
        assert r.lost() == 0


def test_req_the_host_asks_for_the_device_back(workdir):
    """vfio-pci's REQ: the server signals it; the VMM asks the guest to unplug the function (its
    driver lets go), then closes its vfio-user connection and takes the function off the bus;
    DEVICE_DELETED says so, and the server is free for the next client."""
    with passthrough(workdir, "--vectors", "8") as r:
        r.g("nic-request-irq", queue=0)
        assert r.dev.query_vfio()["req"]["registered"]
        with monitor(r.qmp) as mon:
            assert mon.execute("x-vfio-request-release", {"dev": "nic0"}) == {"signalled": True}
        wait_for(lambda: any(e["event"] == "DEVICE_DELETED" for e in r.m.events), 60, "DEVICE_DELETED")
        ev = next(e for e in r.m.events if e["event"] == "DEVICE_DELETED")
        assert ev["data"]["device"] == "nic0"
        assert "nic0" not in r.m.passthrough and r.m.bus.find("nic0") is None
        wait_for(lambda: not r.host()["server"]["connected"], 30, "the VMM to let go")
        h = r.host()["host"]
        assert h["req"]["requests"] == 1 and h["vectors"] == [] and h["pool"]["free"] == h["pool"]["size"]
        devs = r.m.guest_cmd({"cmd": "stats"}, timeout=60)
        assert all(d.get("kind") != "kickcall-nic" for d in devs.get("devices", [])), devs
