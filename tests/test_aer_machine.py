"""PCIe AER on a passthrough card, end to end (seed 004): a ``kickcall vfio-user-server`` card of
one or two functions below the host's root port, a machine with a virtual root port and the card's
functions below it (``aer = true``), the guest's AER driver and the kickcall-nic driver.

* the topology rules of ``aer = true`` (every function of the card in this VM, alone on one bus
  below one root port): the machine refuses to start and says why;
* a guest's secondary bus reset of the card's bus is one host hot reset for the whole card (the
  machine's ``card-hot-reset``; off: one DEVICE_RESET per function);
* a non-fatal error injected on the host during DMA traffic is forwarded through the virtual root
  port and the guest recovers the function; the records check out (off: without ``aer`` the VM
  stops);
* a fatal error stops the VM with an event naming the device, the host did its link reset, and
  every completion the host wrote before the error is in guest memory, and none it did not write.

Completions are counted by the device's sequence-numbered records.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
from typing import Any, Iterator

import pytest

from helpers import SRC, kickcall_argv, machine_toml, wait_for
from kickcall.machine.config import parse_config
from kickcall.machine.machine import CARD_HOT_RESET, Machine, MachineError
from kickcall.vfio import nic as N
from vfio_env import monitor, vfio_card

pytestmark = pytest.mark.slow


@contextlib.contextmanager
def card_server(workdir: str, functions: int, *args: str) -> Iterator[tuple[Any, list[str], str]]:
    """A card of *functions* kickcall-nic functions (2 queues, 4 vectors each): (process, sockets, qmp)."""
    with vfio_card(workdir, functions, "--queues", "2", "--vectors", "4", *args) as card:
        yield card


def host_hmp(qmp: str, line: str) -> str:
    with monitor(qmp) as c:
        return str(c.execute("human-monitor-command", {"command-line": line}))


def host_aer(qmp: str, dev: str = "nic0") -> dict:
    with monitor(qmp) as c:
        return c.execute("x-query-pci-aer", {"dev": dev})


ROOT_PORT = '[[device]]\ntype = "pcie-root-port"\nid = "rp0"\n'


def fn(id: str, sock: str, *, function: int | None = 0, aer: bool = True, bus: str | None = "rp0") -> str:
    out = f'[[device]]\ntype = "vfio-user"\nid = "{id}"\nsocket = "{sock}"\naer = {"true" if aer else "false"}\n'
    if bus:
        out += f'bus = "{bus}"\n'
    if bus and function is not None:
        out += f"function = {function}\n"
    return out


def build(devices: str, guest: str = "thread") -> Machine:
    return Machine(parse_config(machine_toml(vcpus=1, guest=guest, devices=devices), "<test>"))


# -- the topology rules -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("case", ["missing-function", "two-buses", "not-below-a-port", "stranger-on-the-bus",
                                  "aer-off-on-a-sibling"])
def test_aer_topology_rules_refuse_with_a_reason(workdir, case):
    with card_server(workdir, 2) as (_p, socks, _qmp):
        devices = {
            "missing-function": ROOT_PORT + fn("a", socks[0]),
            "two-buses": ROOT_PORT + fn("a", socks[0]) + fn("b", socks[1], bus=None),
            "not-below-a-port": fn("a", socks[0], bus=None) + fn("b", socks[1], bus=None),
            "stranger-on-the-bus": ROOT_PORT + fn("a", socks[0]) + fn("b", socks[1], function=1)
            + '[[device]]\ntype = "virtio-blk"\nid = "blk0"\nsize = "1M"\nbus = "rp0"\nfunction = 2\n',
            "aer-off-on-a-sibling": ROOT_PORT + fn("a", socks[0]) + fn("b", socks[1], function=1, aer=False),
        }[case]
        want = {
            "missing-function": "host function 0000:01:00.1 is not",
            "two-buses": "must sit on one virtual bus",
            "not-below-a-port": "must sit below a pcie-root-port",
            "stranger-on-the-bus": "blk0 is not one",
            "aer-off-on-a-sibling": "it needs aer = true too",
        }[case]
        with pytest.raises(MachineError) as ei:
            build(devices)
        assert want in str(ei.value), str(ei.value)
        assert "aer = true" in str(ei.value)
        # the refused machine let go of the card: a valid one now starts on the same server
        m = build(ROOT_PORT + fn("a", socks[0]) + fn("b", socks[1], function=1))
        try:
            assert set(m.card_resets) == {"rp0"}
            assert sorted(m.card_resets["rp0"].describe()["functions"]) == ["a", "b"]
        finally:
            m.stop()


# -- a guest's bus reset is one host hot reset ------------------------------------------------------------------

def _device_resets(qmp: str, dev: str) -> int:
    with monitor(qmp) as c:
        v = c.execute("x-query-vfio", {"dev": dev})
    return int(v["host"]["counts"].get("device-resets", 0))


@pytest.mark.parametrize("fix", ["on", "off"])
def test_a_guest_bus_reset_is_one_host_hot_reset_for_the_card(workdir, fix):
    with card_server(workdir, 2) as (_p, socks, qmp):
        m = build(ROOT_PORT + fn("a", socks[0]) + fn("b", socks[1], function=1), guest="process")
        try:
            m.faults.set_fix(CARD_HOT_RESET, fix == "on")
            m.start(boot=True)
            port = m.root_ports["rp0"]
            before = [_device_resets(qmp, d) for d in ("nic0", "nic1")]
            hot0 = host_aer(qmp)["hot-resets"]
            # the guest resets the secondary bus of rp0 (Bridge Control SBR), as Linux's pci_reset_bus
            m.guest_cmd({"cmd": "pci-bus-reset", "slot": m.guest_slot(port)}, timeout=60)
            assert port.secondary_bus_resets == 1
            hot = host_aer(qmp)["hot-resets"] - hot0
            resets = [_device_resets(qmp, d) - b for d, b in zip(("nic0", "nic1"), before, strict=True)]
            if fix == "on":
                assert hot == 1, "one host hot reset for the whole card"
                assert resets == [0, 0], "no function reset on its own (an FLR is not a link reset)"
                assert m.card_resets["rp0"].resets == 1
            else:
                assert hot == 0
                assert resets == [1, 1], "the naive VMM: one DEVICE_RESET per function"
            # both functions answer the guest after the reset (never all-F's)
            for name in ("a", "b"):
                slot = m.guest_slot(m.passthrough[name])
                got = m.guest_cmd({"cmd": "pci-config-read", "slot": slot, "offset": 0, "size": 4})["value"]
                assert got == 0x1100_1B36, hex(got)
        finally:
            m.stop()


# -- errors during traffic ----------------------------------------------------------------------------------------

def _records(m: Machine, slot: int) -> list[dict]:
    return m.guest_cmd({"cmd": "nic-stats", "slot": slot}, timeout=60)["queues"]


def _start_traffic(m: Machine, slot: int, rate: int) -> None:
    for q in range(2):
        m.guest_cmd({"cmd": "nic-request-irq", "slot": slot, "queue": q}, timeout=60)
    for q in range(2):
        m.guest_cmd({"cmd": "nic-generate", "slot": slot, "queue": q, "n": 0, "rate": rate}, timeout=60)


def _events(m: Machine, name: str) -> list[dict]:
    return [e for e in m.events if e["event"] == name]


@pytest.mark.parametrize("aer", ["forwarded", "no-aer"])
def test_a_non_fatal_error_during_traffic_is_forwarded_and_the_guest_recovers(workdir, aer):
    with card_server(workdir, 1) as (_p, socks, qmp):
        m = build(ROOT_PORT + fn("nic", socks[0], aer=aer == "forwarded"), guest="process")
        try:
            m.start(boot=True)
            dev = m.passthrough["nic"]
            slot = m.guest_slot(dev)
            _start_traffic(m, slot, 2000)
            wait_for(lambda: all(q["records"] >= 100 for q in _records(m, slot)), 60, "traffic")
            out = host_hmp(qmp, "pcie_aer_inject_error nic0 POISON_TLP")
            assert out.startswith("OK id: nic0 root bus: pcie.0, bus: 1 devfn: 0.0"), out
            ev = wait_for(lambda: _events(m, "X_VFIO_AER_ERROR"), 60, "the VMM's AER event")[0]["data"]
            assert ev["device"] == "nic" and ev["severity"] == "non-fatal" and "POISON_TLP" in ev["errors"]
            if aer == "no-aer":
                assert ev["action"] == "stop"
                wait_for(lambda: not m.running, 60, "the VM stopped")
                assert _events(m, "STOP")
                return
            assert ev["action"] == "forwarded"
            # the guest's AER driver took it from the virtual root port and recovered the function
            wait_for(lambda: m.guest_cmd({"cmd": "aer-stats"}, timeout=60)["ports"][0]["counters"]["recovered"] >= 1,
                     60, "the guest's recovery")
            wait_for(lambda: dev.aer_state() == "idle", 60, "the guest cleared the error")
            assert m.running
            base = [q["records"] for q in _records(m, slot)]
            wait_for(lambda: all(q["records"] >= b + 100 for q, b in zip(_records(m, slot), base, strict=True)), 60,
                     "traffic after the recovery")
            for q in _records(m, slot):
                assert q["gaps"] == 0 and q["bad-records"] == 0, q
            st = m.guest_cmd({"cmd": "nic-stats", "slot": slot}, timeout=60)
            assert st["error-handling"]["all-f-reads"] == 0
            assert st["error-handling"]["errors-detected"].get("io_normal", 0) >= 1
        finally:
            m.stop()


def _ring_seqs(m: Machine, ring: int, size: int, queue: int) -> list[int]:
    out = []
    for i in range(size):
        seq, q, _v, _f = N.RECORD.unpack(m.memory.read(ring + i * N.RECORD.size, N.RECORD.size))
        out.append(seq if q == queue else 0)
    return out


@pytest.mark.parametrize("link_reset", ["on", "off"])
def test_a_fatal_error_stops_the_vm_and_no_completion_is_lost_silently(workdir, link_reset):
    with card_server(workdir, 1) as (_p, socks, qmp):
        if link_reset == "off":  # Cao's RFC: the host trusts the user to reset the link
            with monitor(qmp) as c:
                c.execute("x-debug-fault", {"dev": "host", "fault": "aer-host-link-reset", "action": "off"})
        m = build(ROOT_PORT + fn("nic", socks[0]), guest="process")
        try:
            m.start(boot=True)
            dev = m.passthrough["nic"]
            slot = m.guest_slot(dev)
            _start_traffic(m, slot, 2000)
            wait_for(lambda: all(q["records"] >= 100 for q in _records(m, slot)), 60, "traffic")
            rings = {q["queue"]: (q["ring"], q["size"]) for q in _records(m, slot)}
            out = host_hmp(qmp, "pcie_aer_inject_error nic0 DLP")
            assert out.startswith("OK id: nic0"), out
            ev = wait_for(lambda: _events(m, "X_VFIO_AER_ERROR"), 60, "the VMM's AER event")[0]["data"]
            assert ev == {**ev, "device": "nic", "severity": "fatal", "action": "stop"}
            wait_for(lambda: not m.running, 60, "the VM stopped")
            assert _events(m, "STOP")
            if link_reset == "on":
                # diagnose: a VM stopped for a PCIe error, not a lost interrupt
                mqmp = os.path.join(workdir, "m.qmp")
                m.start_monitor(mqmp)
                p = subprocess.run(kickcall_argv("diagnose", "--qmp", mqmp, "--json", "--interval", "0.25"),
                                   capture_output=True, text=True, timeout=120, env=dict(os.environ, PYTHONPATH=SRC))
                assert "Traceback" not in p.stderr and p.returncode == 1, p.stderr
                vs = [q for q in json.loads(p.stdout)["queues"] if q["path"] == "nic"]
                assert vs and all(q["verdict"] == "PCIe error recovery" and q["severity"] == "problem" for q in vs), vs
            # the host did its link reset and recovered on its own
            def recovered() -> dict | None:
                a = host_aer(qmp)
                hist = a["recovery"]["history"]
                return a if a["recovery"]["state"] in ("idle", "failed") and hist and hist[-1]["result"] else None

            st = wait_for(recovered, 60, "the host's recovery")
            rec = st["recovery"]["history"][-1]
            steps = [s["step"] for s in rec["steps"] if not s.get("skipped")]
            if link_reset == "off":
                # the VM is stopped and the host did nothing: the function stays frozen for whoever comes next
                assert "link_reset" not in steps
                assert host_aer(qmp)["frozen"] is True
                return
            assert "link_reset" in steps and rec["result"].startswith("RECOVERED"), rec
            assert host_aer(qmp)["frozen"] is False
            # what the host says it wrote before the error is exactly what guest memory holds
            for queue, produced in enumerate(rec["producers-at-error"]["nic0"]):
                ring, size = rings[queue]
                seqs = _ring_seqs(m, ring, size, queue)
                assert produced >= 100
                want = {i % size: i + 1 for i in range(max(0, produced - size), produced)}
                assert {i: seqs[i] for i in want} == want, f"queue {queue}: a completion is missing"
                assert max(seqs) == produced, f"queue {queue}: guest memory holds a record the host did not write"
        finally:
            m.stop()


def test_the_machine_refuses_aer_on_a_server_without_the_extension(workdir):
    """A peer that never announced kickcall's hot reset is never sent it: ``aer = true`` there
    cannot keep its promise (a guest's bus reset could not reach the card), so the machine says so."""
    with card_server(workdir, 1) as (_p, socks, _qmp):
        from kickcall.vfio import client as C

        orig = C.VfioUserClient.__init__

        def no_ext(self, *a, **kw):  # a client that does not know the extension
            kw["propose_hot_reset"] = False
            orig(self, *a, **kw)

        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(C.VfioUserClient, "__init__", no_ext)
            with pytest.raises(MachineError, match="does not offer it"):
                build(ROOT_PORT + fn("nic", socks[0]))
