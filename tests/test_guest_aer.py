"""The guest's AER port service and the kickcall-nic driver's error handlers, end to end.

A machine with a PCIe Root Port (``type = "pcie-root-port"``, id rp0) and a vfio-user
kickcall-nic below it (``bus = "rp0"``: bus 1, device 0), its host function in a real
``kickcall vfio-user-server`` process, the guest in its own process.  Errors are injected at the
VMM side through the machine's monitor (``x-pcie-aer-inject-error``, QEMU's
``pcie_aer_inject_error``) into the root port's own AER capability -- the port as the source:
error_detected goes to every function below it -- or into the passthrough function's emulated AER
capability (the device has ``aer = true``).

What is asserted is the guest's behaviour, through its counters (``aer-stats``, ``nic-stats``)
and the device's sequence-numbered records: the port found and set up (SERR forwarding, Root
Error Command); a non-fatal error during traffic -> error_detected(io_normal) = CAN_RECOVER ->
mmio_enabled -> resume, records checked in order, no all-F's config reads; a fatal error -> the
guest's secondary bus reset of rp0, slot_reset re-initialises the nic, the traffic resumes with
its seq numbers restarted at 1; a correctable error -> logged and cleared, no recovery.

Each guarantee is shown failing with its switch off (guest command ``aer-config``):
``native = false`` (no AER service: the error is never handled, the statuses stay set) and
``restore_after_reset = false`` (slot_reset re-initialises nothing: no traffic after a fatal
recovery).
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import Any, Iterator

import pytest

from helpers import machine_toml, stop_process, wait_for
from kickcall.machine.config import parse_config
from kickcall.machine.machine import Machine
from kickcall.pci import regs as R
from kickcall.pci.aer import PCI_ERR_ROOT_CMD_COR_EN, PCI_ERR_ROOT_CMD_FATAL_EN, PCI_ERR_ROOT_CMD_NONFATAL_EN
from vfio_env import host_view, monitor, vfio_server

pytestmark = pytest.mark.slow

ROOT_CMD_ALL = PCI_ERR_ROOT_CMD_COR_EN | PCI_ERR_ROOT_CMD_NONFATAL_EN | PCI_ERR_ROOT_CMD_FATAL_EN
QUEUES = (0, 1)
RATE = 2000  # records/s per queue while traffic runs


@dataclass
class Rig:
    m: Machine
    slot: int  # the nic, as guest commands address it (bus 1 << 8 | devfn)
    mqmp: str  # the machine's monitor
    host_qmp: str  # the vfio-user server's monitor
    server: Any  # the vfio-user server's process

    def g(self, cmd: str, **kw: Any) -> dict:
        return self.m.guest_cmd({"cmd": cmd, **kw}, timeout=120)

    def nic(self) -> dict:
        return self.g("nic-stats", slot=self.slot)

    def aer(self) -> dict:
        return self.g("aer-stats")

    def port(self) -> dict:
        (p,) = self.aer()["ports"]
        return p

    def fn(self, rid: int) -> dict:
        return self.aer()["functions"][f"{rid:04x}"]

    def inject(self, dev: str, status: str, *, correctable: bool = False) -> dict:
        args: dict[str, Any] = {"id": dev, "error_status": status}
        if correctable:
            args["correctable"] = True
        with monitor(self.mqmp) as mon:
            return mon.execute("x-pcie-aer-inject-error", args)

    def vmm_aer(self, dev: str) -> dict:
        with monitor(self.mqmp) as mon:
            return mon.execute("x-query-pci-aer", {"dev": dev})

    def records(self) -> int:
        return sum(q["records"] for q in self.nic()["queues"])

    def start_traffic(self) -> None:
        for q in QUEUES:
            self.g("nic-request-irq", slot=self.slot, queue=q)
        for q in QUEUES:
            self.g("nic-generate", slot=self.slot, queue=q, n=0, rate=RATE)

    def stop_traffic(self) -> None:
        for q in QUEUES:
            self.g("nic-generate", slot=self.slot, queue=q, n=0, rate=0)

    def flowing(self, more: int = 200, timeout: float = 60.0) -> bool:
        """Records keep arriving: *more* within *timeout* seconds."""
        base = self.records()
        try:
            wait_for(lambda: self.records() >= base + more, timeout, "records flowing")
        except (AssertionError, TimeoutError):
            return False
        return True

    def checks_pass(self) -> None:
        """The driver's record checks (nothing out of order, no record overwritten), and the
        guest's view agrees with the host's once the traffic stopped: per queue, every record the
        device wrote (its count survives a function reset) was consumed, and the next seq the
        driver expects follows the device's last one."""
        st = self.nic()
        assert all(q["gaps"] == 0 and q["bad-records"] == 0 for q in st["queues"]), st["queues"]

        def agree() -> bool:
            g = {q["queue"]: q for q in self.nic()["queues"]}
            h = {q["queue"]: q for q in host_view(self.host_qmp)["nic"]["queues"]}
            return all(g[q]["records"] == h[q]["records-written"] and g[q]["next-seq"] == h[q]["seq"] + 1
                       for q in QUEUES)
        wait_for(agree, 60, "the guest's records to match the host's")


@contextlib.contextmanager
def aer_rig(workdir: str, *, guest: str = "process") -> Iterator[Rig]:
    with vfio_server(workdir, "--vectors", "8") as (server, sock, qmp):
        devs = ('[[device]]\ntype = "pcie-root-port"\nid = "rp0"\n\n'
                f'[[device]]\ntype = "vfio-user"\nid = "nic0"\nsocket = "{sock}"\nbus = "rp0"\naer = true\n')
        m = Machine(parse_config(machine_toml(guest=guest, vcpus=2, devices=devs), "<test>"))
        try:
            m.start(boot=True)
            mqmp = os.path.join(workdir, "m.qmp")
            m.start_monitor(mqmp)
            yield Rig(m, m.guest_slot(m.passthrough["nic0"]), mqmp, qmp, server)
        finally:
            m.stop()
            if m.guest_proc is not None:
                assert m.guest_proc.poll() is not None, "the guest process outlived its machine"


def _rp_rid(r: Rig) -> int:
    rp = r.m.root_ports["rp0"]
    return rp.requester_id()


# -- boot ----------------------------------------------------------------------------------------------------
def test_boot_finds_the_port_and_the_nic_below_it(workdir):
    with aer_rig(workdir) as r:
        boot = r.m.boot_info
        nic = next(d for d in boot["devices"] if d["kind"] == "kickcall-nic")
        assert nic["bus"] == 1 and nic["slot"] == r.slot == 1 << 8
        (port,) = boot["aer-ports"]
        assert port["secondary-bus"] == 1 and port["irq-mode"] == "msix" and port["irq"] is not None
        assert port["root-command"] == ROOT_CMD_ALL and port["serr-forwarding"]
        # the VMM's view of the port agrees: Root Error Command and SERR forwarding set by the guest
        rp = r.m.root_ports["rp0"]
        assert rp.aer_cap.get(0x2C) == ROOT_CMD_ALL
        assert rp.bridge_control & R.PCI_BRIDGE_CTL_SERR
        assert rp.msix is not None and rp.msix.enabled
        functions = r.aer()["functions"]
        assert f"{_rp_rid(r):04x}" in functions and f"{r.slot:04x}" in functions
        assert functions[f"{r.slot:04x}"]["has-handlers"]


# -- non-fatal during traffic -----------------------------------------------------------------------------------
@pytest.mark.parametrize("native", [True, False], ids=["aer-native", "aer-off"])
def test_nonfatal_error_during_traffic_recovers(workdir, native):
    """A non-fatal error on rp0 while records flow: error_detected(io_normal) -> CAN_RECOVER ->
    mmio_enabled -> resume; the traffic goes on, the checks pass, no all-F's reads, the port's
    status cleared.  Without the AER service (native off) nothing handles it: no recovery, the
    port's Root Error Status and uncorrectable status stay set."""
    with aer_rig(workdir) as r:
        if not native:
            assert r.g("aer-config", native=False)["native"] is False
            assert r.m.root_ports["rp0"].aer_cap.get(0x2C) == 0
        r.start_traffic()
        assert r.flowing()
        res = r.inject("rp0", "COMP_TIME")  # non-fatal by the default severity
        assert res == {"id": "rp0", "root-bus": "pcie.0", "bus": 0, "devfn": r.m.root_ports["rp0"].devfn}
        if native:
            wait_for(lambda: r.port()["counters"]["recovered"] == 1, 60, "the recovery")
            assert r.flowing()
            r.stop_traffic()
            r.checks_pass()
            port = r.port()
            assert port["counters"]["non-fatal"] == 1 and port["counters"]["failed"] == 0
            assert port["counters"]["link-resets"] == 0
            steps = [h["step"] for h in port["history"]]
            assert steps.index("error_detected") < steps.index("mmio_enabled") < steps.index("resume")
            assert "slot_reset" not in steps
            eh = r.nic()["error-handling"]
            assert eh["errors-detected"]["io_normal"] == 1 and eh["errors-detected"]["io_frozen"] == 0
            assert eh["mmio-enabled"] == 1 and eh["recoveries"] == 1 and eh["slot-resets"] == 0
            assert eh["all-f-reads"] == 0 and eh["io-state"] == "normal"
            assert eh["last-seen"]["vendor"] == 0x1B36
            vmm = r.vmm_aer("rp0")["aer"]
            assert vmm["uncor-status"] == 0 and vmm["root-status"] == 0
        else:
            # the port received it (the VMM's counters) but no interrupt, no handling
            wait_for(lambda: r.vmm_aer("rp0")["aer"]["received"]["non-fatal"] == 1, 30, "the message")
            assert r.flowing()  # the device itself is fine
            r.stop_traffic()
            port = r.port()
            assert port["counters"]["interrupts"] == 0 and port["counters"]["recoveries"] == 0
            assert r.nic()["error-handling"]["errors-detected"]["io_normal"] == 0
            vmm = r.vmm_aer("rp0")["aer"]
            assert vmm["uncor-status"] != 0 and vmm["root-status"] != 0


# -- fatal: secondary bus reset, slot_reset ------------------------------------------------------------------------
@pytest.mark.parametrize("restore", [True, False], ids=["restore", "restore-after-reset-off"])
def test_fatal_error_resets_the_bus_and_traffic_resumes(workdir, restore):
    """A fatal error on rp0 during traffic: error_detected(io_frozen) = NEED_RESET, the guest's
    secondary bus reset of rp0 (the VMM resets the nic), slot_reset re-initialises the nic,
    resume; records flow again with the seq numbers restarted at 1 and the checks pass.  With
    the re-initialisation switched off the recovery "succeeds" but nothing flows any more."""
    with aer_rig(workdir) as r:
        if not restore:
            assert r.g("aer-config", restore_after_reset=False)["restore-after-reset"] is False
        r.start_traffic()
        assert r.flowing()
        resets0 = r.m.root_ports["rp0"].secondary_bus_resets
        assert r.inject("rp0", "SDN")["id"]  # Surprise Down: fatal by default
        wait_for(lambda: r.port()["counters"]["recovered"] + r.port()["counters"]["failed"] >= 1, 60,
                 "the recovery")
        port = r.port()
        assert port["counters"]["fatal"] == 1 and port["counters"]["recovered"] == 1
        assert port["counters"]["link-resets"] == 1 and port["counters"]["link-reset-timeouts"] == 0
        assert r.m.root_ports["rp0"].secondary_bus_resets == resets0 + 1
        steps = [h["step"] for h in port["history"]]
        assert steps.index("error_detected") < steps.index("link_reset") < steps.index("slot_reset") \
            < steps.index("resume")
        assert "mmio_enabled" not in steps
        eh = r.nic()["error-handling"]
        assert eh["errors-detected"]["io_frozen"] == 1 and eh["slot-resets"] == 1 and eh["all-f-reads"] == 0
        if restore:
            assert r.flowing()
            r.stop_traffic()
            r.checks_pass()
            st = r.nic()
            assert st["error-handling"]["seq-restarts"] >= 1
            assert all(q["enabled"] for q in st["queues"] if q["queue"] in QUEUES)
            vmm = r.vmm_aer("rp0")["aer"]
            assert vmm["uncor-status"] == 0 and vmm["root-status"] == 0
        else:
            assert not r.flowing(more=50, timeout=5.0)


# -- correctable -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("native", [True, False], ids=["aer-native", "aer-off"])
def test_correctable_error_is_logged_and_cleared(workdir, native):
    with aer_rig(workdir) as r:
        if not native:
            r.g("aer-config", native=False)
        rp = r.m.root_ports["rp0"]
        # the correctable mask's defaults hide ADV_NONFATAL/INTERNAL/HL_OVERFLOW: BAD_TLP is reported
        assert r.inject("rp0", "BAD_TLP")["id"]  # a correctable error by its name
        if native:
            wait_for(lambda: r.port()["counters"]["correctable"] == 1, 30, "the correctable error")
            wait_for(lambda: r.vmm_aer("rp0")["aer"]["cor-status"] == 0, 30, "the status cleared")
            port = r.port()
            assert port["counters"]["recoveries"] == 0
            assert port["last-error"]["severity"] == "correctable" and port["last-error"]["errors"] == ["BAD_TLP"]
            assert r.fn(_rp_rid(r))["errors"]["correctable"] == 1
            assert r.nic()["error-handling"]["errors-detected"] == {"io_normal": 0, "io_frozen": 0,
                                                                    "io_perm_failure": 0}
            assert rp.aer_cap.get(0x30) == 0
        else:
            wait_for(lambda: r.vmm_aer("rp0")["aer"]["received"]["correctable"] == 1, 30, "the message")
            assert r.port()["counters"]["correctable"] == 0
            assert r.vmm_aer("rp0")["aer"]["cor-status"] != 0


# -- the passthrough function as the source ------------------------------------------------------------------------
def test_nonfatal_error_on_the_passthrough_function(workdir):
    """The source is the nic itself (its emulated AER capability in the VMM): the guest finds it
    by requester id (01:00.0), the same recovery as above (the VMM emulates the AER capability:
    ``aer = true``)."""
    with aer_rig(workdir) as r:
        assert r.m.passthrough["nic0"].aer is not None
        r.start_traffic()
        assert r.flowing()
        assert r.inject("nic0", "COMP_TIME")["id"]
        wait_for(lambda: r.port()["counters"]["recovered"] == 1, 60, "the recovery")
        assert r.flowing()
        r.stop_traffic()
        r.checks_pass()
        fn = r.fn(r.slot)
        assert fn["errors"]["non-fatal"] == 1 and fn["last-error"]["errors"] == ["COMP_TIME"]
        assert r.nic()["error-handling"]["all-f-reads"] == 0
        assert r.vmm_aer("nic0")["aer"]["uncor-status"] == 0


# -- a device that answers all-F's: counted, the recovery fails, the driver lets go --------------------------------
def test_all_f_reads_are_counted_and_a_dead_device_is_failed(workdir):
    """The host function is gone (its server stopped): every config read of it answers all-F's.
    What the VMM must never let happen during a recovery, made to happen: error_detected reads
    0xFFFF (counted in all-f-reads, the vote is NEED_RESET), slot_reset finds nothing
    (DISCONNECT), the recovery fails, the driver is told io_perm_failure and touches the device no
    more.  The counter the other tests require to be 0 is shown to count."""
    with aer_rig(workdir) as r:
        r.start_traffic()
        assert r.flowing()
        stop_process(r.server)
        r.inject("rp0", "COMP_TIME")
        wait_for(lambda: r.port()["counters"]["failed"] == 1, 60, "the failed recovery")
        port = r.port()
        assert port["counters"]["recovered"] == 0
        assert [h["step"] for h in port["history"]][-1] == "failed"
        eh = r.nic()["error-handling"]
        assert eh["all-f-reads"] >= 2 and eh["last-seen"]["vendor"] == 0xFFFF
        assert eh["errors-detected"]["io_perm_failure"] == 1 and eh["dead"]
        skipped = eh["mmio-skipped"]
        r.g("nic-generate", slot=r.slot, queue=0, n=1)
        assert r.nic()["error-handling"]["mmio-skipped"] == skipped + 1
        # a failed recovery leaves the port's status for a look, as Linux does
        assert r.vmm_aer("rp0")["aer"]["uncor-status"] != 0
