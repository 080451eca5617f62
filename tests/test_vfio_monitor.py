"""A passthrough (vfio-user) function on the machine's monitor, its faults, and ``kickcall diagnose``
naming a vector whose host interrupt never reached the guest.

Every test runs a real ``kickcall vfio-user-server`` process (tests/vfio_env.py) behind a machine
whose guest runs the kickcall-nic driver (guest commands ``nic-request-irq``, ``nic-generate``,
``nic-unconsumed``), and talks to the machine's monitor through ``qemu.qmp`` as an operator would.
What is asserted is behaviour: an injected host interrupt on an unmasked vector gets the guest's
handler to consume the record the device wrote, on a masked one it sets the PBA bit and nothing
else; queries consume nothing (an eventfd count the hypervisor cannot read survives every query);
``lose-host-interrupt`` leaves a record unconsumed and diagnose names the device and the vector.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
from dataclasses import dataclass
from typing import Any, Iterator

import pytest
from qemu.qmp import ExecuteError, QMPClient

from helpers import kickcall_argv, machine_toml, wait_for
from kickcall.machine import Machine, parse_config
from kickcall.vfio import nic as N
from vfio_env import host_view, vfio_server

pytestmark = pytest.mark.slow

DEV = "nic0"


class Mon:
    """A ``qemu.qmp.QMPClient`` on its own event loop, driven synchronously."""

    def __init__(self, path: str) -> None:
        self.loop = asyncio.new_event_loop()
        self.client = QMPClient("kickcall-test")
        self._run(self.client.connect(path))

    def _run(self, coro: Any, timeout: float = 60.0) -> Any:
        return self.loop.run_until_complete(asyncio.wait_for(coro, timeout))

    def __call__(self, cmd: str, **args: Any) -> Any:
        return self._run(self.client.execute(cmd, {k.replace("_", "-"): v for k, v in args.items()} or None))

    def hmp(self, line: str) -> str:
        return str(self("human-monitor-command", command_line=line))

    def fails(self, cmd: str, **args: Any) -> ExecuteError:
        with pytest.raises(ExecuteError) as ei:
            self(cmd, **args)
        return ei.value

    def close(self) -> None:
        self._run(self.client.disconnect())
        self.loop.close()


@dataclass
class Rig:
    m: Machine
    mon: Mon
    qmp: str  # the machine's monitor socket
    host_qmp: str  # the vfio-user server's monitor socket
    slot: int

    @property
    def dev(self) -> Any:
        return self.m.passthrough[DEV]

    def guest(self, cmd: str, **args: Any) -> Any:
        return self.m.guest_cmd({"cmd": cmd, "slot": self.slot, **args})

    def unconsumed(self, queue: int) -> int:
        (q,) = [q for q in self.guest("nic-unconsumed")["queues"] if q["queue"] == queue]
        return int(q["unconsumed"])

    def records(self, queue: int) -> int:
        return int(self.guest("nic-stats")["queues"][queue]["records"])

    def interrupts(self, entry: int) -> int:
        return int(self.guest("nic-stats")["interrupts"].get(str(entry), 0))


@contextlib.contextmanager
def rig(workdir: str, *server_args: str) -> Iterator[Rig]:
    """A machine with one vfio-user function (``nic0``) served by its own server process, booted
    (the guest's kickcall-nic driver enabled MSI-X with every entry masked), with its monitor."""
    with vfio_server(workdir, "--vectors", "8", *server_args) as (_p, sock, host_qmp):
        dev = f'[[device]]\ntype = "vfio-user"\nid = "{DEV}"\nsocket = "{sock}"\n'
        m = Machine(parse_config(machine_toml(vcpus=2, devices=dev), "<test>"))
        mon = None
        try:
            m.start(boot=True)
            qmp = os.path.join(workdir, "m.qmp")
            m.start_monitor(qmp)
            mon = Mon(qmp)
            yield Rig(m, mon, qmp, host_qmp, m.passthrough[DEV].devfn >> 3)
        finally:
            if mon is not None:
                mon.close()
            m.stop()


# ---------------------------------------------------------------------------------------------------
# 1. the monitor shows the passthrough function
# ---------------------------------------------------------------------------------------------------
def test_query_pci_and_info_pci_list_the_passthrough_function_with_its_bars(workdir: str) -> None:
    with rig(workdir) as r:
        (bus,) = r.mon("query-pci")
        (d,) = [d for d in bus["devices"] if d["qdev_id"] == DEV]
        assert d["slot"] == r.slot
        assert (d["id"]["vendor"], d["id"]["device"]) == (N.NIC_VENDOR_ID, N.NIC_DEVICE_ID)
        bars = {b["bar"]: b for b in d["regions"]}
        assert bars and all(b["address"] != -1 and b["size"] > 0 for b in bars.values())
        assert {b["bar"]: b["size"] for b in d["regions"]} == {i: b.size for i, b in enumerate(r.dev.bars) if b}
        text = r.mon.hmp("info pci")
        assert f'id "{DEV}"' in text and "MSI-X: enabled" in text
        assert f"PCI device {N.NIC_VENDOR_ID:04x}:{N.NIC_DEVICE_ID:04x}" in text
        assert all(v["name"] != "vfio-user-pci" for v in r.mon("x-query-virtio"))  # QEMU lists VirtIODevices only


def test_msix_and_vfio_queries_give_both_views(workdir: str) -> None:
    with rig(workdir) as r:
        r.guest("nic-request-irq", queue=1)
        m = r.mon("x-query-pci-msix", dev=DEV)
        assert m["passthrough"] and m["enabled"] and m["table-size"] == 8
        assert not m["entries"][1]["masked"] and m["entries"][2]["masked"]
        host = m["host"]
        assert host["enabled"] and host["path"] == "dynamic"
        (v1,) = [v for v in host["vectors"] if v["vector"] == 1]
        assert v1["trigger"] == "irqfd" and v1["trigger-fd"] == v1["irqfd"]["fd"] and v1["gsi"] >= 0
        assert v1["irqfd"]["pending"] == 0 and v1["hypervisor"] == {"gsi": v1["gsi"], "injections": 0, "dropped": 0}
        vf = r.mon("x-query-vfio", dev=DEV)
        assert vf["dev"] == DEV and vf["msix-enabled"] and vf["path"] == "dynamic"
        assert vf["set-irqs"]["enable-no-vector"] == 1 and vf["set-irqs"]["vector-add"] == 1
        assert vf["max-msg-fds"] > 0 and vf["irq-info"]["msix"]["count"] == 8
        # a virtio device's queries name it as what it is not
        for cmd, args in (("x-query-virtio-status", {}), ("x-query-virtio-queue-status", {"queue": 0}),
                          ("x-query-virtio-queue-element", {"queue": 0})):
            e = r.mon.fails(cmd, path=f"/machine/peripheral/{DEV}", **args)
            assert "is not a VirtIODevice" in str(e) and "x-query-vfio" in str(e)


def test_notifiers_list_every_eventfd_and_queries_consume_nothing(workdir: str) -> None:
    """Each vector's irqfd-bound and "interrupt" eventfds, with the one the host's trigger points at
    marked, and the INTx trigger.  A host interrupt the hypervisor cannot read (the guest process,
    which runs the hypervisor, is stopped) stays counted in the irqfd eventfd through a burst of
    every query, and is delivered once the guest runs again."""
    with rig(workdir) as r:
        r.guest("nic-request-irq", queue=0)
        rows = r.mon("x-query-device-notifiers", dev=DEV)
        v0 = {n["role"]: n for n in rows if n.get("vector") == 0}
        assert set(v0) == {"guest", "masked"}
        assert v0["guest"]["host-trigger"] and not v0["masked"]["host-trigger"]
        assert v0["guest"]["gsi"] >= 0 and v0["guest"]["injections"] == 0 and v0["guest"]["dropped"] == 0
        assert all(n["owner"] == DEV and "pending" in n for n in rows)
        before = r.interrupts(0)
        assert r.m.guest_proc is not None
        r.m.guest_proc.send_signal(signal.SIGSTOP)
        try:
            r.mon("x-debug-device-event", dev=DEV, event="call", queue=0)
            sent = server_commands(r)
            for _ in range(3):
                for cmd in ("query-pci", "x-query-pci-msix", "x-query-vfio", "x-query-device-notifiers",
                            "x-debug-fault"):
                    r.mon(cmd, **({} if cmd == "query-pci" else {"dev": DEV}))
                for line in ("info pci", f"info msix {DEV}", f"info notifiers {DEV}", f"x-debug-fault {DEV}"):
                    r.mon.hmp(line)
            (irqfd,) = [n for n in r.mon("x-query-device-notifiers", dev=DEV) if n.get("vector") == 0
                        and n["role"] == "guest"]
            assert irqfd["pending"] == 1 and irqfd["injections"] == 0
            (hv0,) = [v for v in r.mon("x-query-pci-msix", dev=DEV)["host"]["vectors"] if v["vector"] == 0]
            assert hv0["irqfd"]["pending"] == 1
            assert server_commands(r) == sent, "a query sent the vfio-user server a message"
        finally:
            r.m.guest_proc.send_signal(signal.SIGCONT)
        wait_for(lambda: r.interrupts(0) == before + 1, what="the interrupt, once the hypervisor runs")
        (irqfd,) = [n for n in r.mon("x-query-device-notifiers", dev=DEV) if n.get("vector") == 0
                    and n["role"] == "guest"]
        assert irqfd["pending"] == 0 and irqfd["injections"] == 1


def test_injected_host_interrupt_reaches_an_unmasked_vector_and_pends_on_a_masked_one(workdir: str) -> None:
    with rig(workdir) as r:
        r.guest("nic-request-irq", queue=0)
        before = r.interrupts(0)
        out = r.mon("x-debug-device-event", dev=DEV, event="call", queue=0)
        assert out == {"path": "irqfd", "forced": False, "host-trigger": "irqfd"}
        wait_for(lambda: r.interrupts(0) == before + 1, what="the injected interrupt in the guest")
        n = r.mon("x-query-device-notifiers", dev=DEV)
        (irqfd,) = [x for x in n if x.get("vector") == 0 and x["role"] == "guest"]
        assert irqfd["injections"] == 1
        # masked: the trigger was switched to the VMM's eventfd, the interrupt becomes the PBA bit
        r.guest("nic-mask", entry=0, masked=True)
        out = r.mon("x-debug-device-event", dev=DEV, event="call", queue=0)
        assert out == {"path": "pba", "forced": False, "host-trigger": "interrupt"}
        wait_for(lambda: r.mon("x-query-pci-msix", dev=DEV)["entries"][0]["pending"], what="the PBA bit")
        assert r.interrupts(0) == before + 1
        r.guest("nic-mask", entry=0, masked=False)
        wait_for(lambda: r.interrupts(0) == before + 2, what="the pending interrupt on unmask")
        # a vector the guest never brought up is not wired in the host: vfio-pci would drop it
        e = r.mon.fails("x-debug-device-event", dev=DEV, event="call", queue=5)
        assert "not wired in the host" in str(e)
        e = r.mon.fails("x-debug-device-event", dev=DEV, event="kick", queue=0)
        assert "passthrough" in str(e)


# ---------------------------------------------------------------------------------------------------
# 2 + 3. lose-host-interrupt, and kickcall diagnose naming the vector
# ---------------------------------------------------------------------------------------------------
def diagnose(qmp: str, *args: str) -> tuple[int, Any]:
    p = subprocess.run(kickcall_argv("diagnose", "--qmp", qmp, "--interval", "0.25", *args),
                       capture_output=True, text=True, timeout=120,
                       env=dict(os.environ, PYTHONPATH=os.path.join(os.path.dirname(__file__), "..", "src")))
    assert p.returncode in (0, 1), p.stderr
    assert "Traceback" not in p.stderr
    return p.returncode, json.loads(p.stdout) if "--json" in args else p.stdout


def server_commands(r: Rig) -> int:
    """Commands the vfio-user server has received from the VMM (its own monitor says)."""
    return int(host_view(r.host_qmp)["server"]["stats"]["commands"])


def hv_counts(r: Rig, vector: int) -> dict:
    (v,) = [v for v in r.mon("x-query-pci-msix", dev=DEV)["host"]["vectors"] if v["vector"] == vector]
    return dict(v["hypervisor"])


@pytest.mark.parametrize("armed", [True, False], ids=["lose-host-interrupt", "fault-off"])
def test_lost_host_interrupt_is_named_by_diagnose(workdir: str, armed: bool) -> None:
    """The guest brings queue 0's vector up and the device writes one record and raises it.  With
    ``lose-host-interrupt`` armed the hypervisor drops the irqfd injection: the record stays
    unconsumed, and ``kickcall diagnose`` names nic0's vector 0 (exit 1) without changing anything.
    With the fault off the same run is healthy (exit 0)."""
    with rig(workdir) as r:
        r.guest("nic-request-irq", queue=0)
        if armed:
            out = r.mon("x-debug-fault", dev=DEV, fault="lose-host-interrupt", queue=0, action="drop-all")
            assert out["matched"] == 1
        r.guest("nic-generate", queue=0, n=1)
        if armed:
            wait_for(lambda: hv_counts(r, 0)["dropped"] == 1, what="the hypervisor's drop")
            assert r.unconsumed(0) == 1 and r.records(0) == 0 and r.interrupts(0) == 0
        else:
            wait_for(lambda: r.records(0) == 1, what="the record consumed by the guest's handler")
            assert r.unconsumed(0) == 0
        before = (r.mon("x-query-vfio", dev=DEV)["set-irqs"], r.guest("nic-stats"), hv_counts(r, 0),
                  server_commands(r))
        rc, rep = diagnose(r.qmp, "--json")
        rc_text, text = diagnose(r.qmp)
        assert (r.mon("x-query-vfio", dev=DEV)["set-irqs"], r.guest("nic-stats"), hv_counts(r, 0),
                server_commands(r)) == before, \
            "diagnose changed something"
        (v0,) = [q for q in rep["queues"] if q["path"] == DEV and q.get("vector") == 0]
        if not armed:
            assert (rc, rc_text) == (0, 0) and v0["verdict"] == "healthy", v0
            assert f"{DEV} v0: healthy" in text
            return
        assert (rc, rc_text) == (1, 1)
        assert v0["verdict"] == "host interrupt not delivered" and v0["severity"] == "problem", v0
        assert v0["facts"]["dropped"] == 1 and v0["facts"]["trigger"] == "irqfd"
        assert any("dropped 1 injection" in e for e in v0["evidence"])
        assert any("consumer register" in u for u in v0["unknown"])  # what it cannot see, said
        assert f"{DEV} v0: HOST INTERRUPT NOT DELIVERED" in text
        # the operator's side: the fault's listing shows the drop; cleared, one host interrupt recovers
        (f,) = [f for f in r.mon("x-debug-fault", dev=DEV)["faults"] if f["name"] == "lose-host-interrupt"]
        assert f["state"]["queues"] == [{"queue": 0, "drop-next": 0, "drop-all": True, "dropped": 1}]
        r.mon("x-debug-fault", dev=DEV, fault="lose-host-interrupt", queue=0, action="clear")
        r.mon("x-debug-device-event", dev=DEV, event="call", queue=0)
        wait_for(lambda: r.records(0) == 1, what="the record, after one injected host interrupt")
        assert r.unconsumed(0) == 0


@pytest.mark.parametrize("emulate", [True, False], ids=["mask-emulated", "emulate-msix-mask-off"])
def test_masked_vector_with_a_host_interrupt_pending_is_named_by_diagnose(workdir: str, emulate: bool) -> None:
    """The guest masks queue 0's vector and the device raises it: the VMM's mask emulation keeps
    the interrupt in the PBA, and diagnose says the vector is masked with an event pending.  With
    the device's ``emulate-msix-mask`` fix off the interrupt reaches the masked vector, and diagnose
    names the mask the host's trigger ignores."""
    with rig(workdir) as r:
        r.mon("x-debug-fault", dev=DEV, fault="emulate-msix-mask", action="on" if emulate else "off")
        r.guest("nic-request-irq", queue=0)
        r.guest("nic-mask", entry=0, masked=True)
        r.guest("nic-generate", queue=0, n=1)
        if emulate:
            wait_for(lambda: r.mon("x-query-pci-msix", dev=DEV)["entries"][0]["pending"], what="the PBA bit")
            assert r.unconsumed(0) == 1 and r.interrupts(0) == 0
        else:
            wait_for(lambda: r.interrupts(0) == 1, what="the interrupt, past the guest's mask")
            assert not r.mon("x-query-pci-msix", dev=DEV)["entries"][0]["pending"]
        rc, rep = diagnose(r.qmp, "--json")
        (v0,) = [q for q in rep["queues"] if q["path"] == DEV and q.get("vector") == 0]
        assert rc == 1 and v0["severity"] == "problem"
        if emulate:
            assert v0["verdict"] == "vector masked with an event pending" and v0["facts"]["trigger"] == "interrupt"
            assert v0["facts"]["pending"] is True
        else:
            assert v0["verdict"] == "vector mask not honoured" and v0["facts"]["trigger"] == "irqfd"


def test_lose_host_interrupt_from_the_monitor_drops_exactly_what_it_was_armed_for(workdir: str) -> None:
    """``x-debug-fault`` on the passthrough function: the listing has both faults; the path form
    (``path: call``) arms ``lose-host-interrupt``; drop-next loses one host interrupt in the
    hypervisor and the next gets through; a vector with no irqfd, and the kick path, are refused."""
    with rig(workdir) as r:
        names = {f["name"]: f for f in r.mon("x-debug-fault", dev=DEV)["faults"]}
        assert names["emulate-msix-mask"]["kind"] == "fix-off" and names["emulate-msix-mask"]["state"] == {"fix": "on"}
        assert names["lose-host-interrupt"]["kind"] == "injected" and names["lose-host-interrupt"]["per-queue"]
        r.guest("nic-request-irq", queue=2)
        assert r.mon("x-debug-fault", dev=DEV, queue=2, path="call", action="drop-next")["matched"] == 1
        r.mon("x-debug-device-event", dev=DEV, event="call", queue=2)
        wait_for(lambda: hv_counts(r, 2)["dropped"] == 1, what="the dropped injection")
        assert r.interrupts(2) == 0
        assert "through irqfd" in r.mon.hmp(f"x-debug-device-event {DEV} call 2")
        wait_for(lambda: r.interrupts(2) == 1, what="the next host interrupt")
        assert hv_counts(r, 2) == {"gsi": hv_counts(r, 2)["gsi"], "injections": 1, "dropped": 1}
        assert "q2: next 0 dropped 1" in r.mon.hmp(f"x-debug-fault {DEV}")
        e = r.mon.fails("x-debug-fault", dev=DEV, fault="lose-host-interrupt", queue=3, action="drop-all")
        assert "has no irqfd now" in str(e)
        e = r.mon.fails("x-debug-fault", dev=DEV, queue=2, path="kick", action="drop-all")
        assert "lose-host-interrupt" in str(e)
        e = r.mon.fails("x-debug-fault", dev=DEV, fault="lose-host-interrupt", queue=8, action="drop-all")
        assert "Invalid virtqueue number 8" in str(e)  # (the monitor's range check: 8 vectors)


# ---------------------------------------------------------------------------------------------------
# the vector rules on their own
# ---------------------------------------------------------------------------------------------------
BASE = {"guest-msix-enabled": True, "host-msix-enabled": True, "use": True, "trigger": "irqfd", "gsi": 24,
        "masked": False, "function-masked": False, "pending": False, "irqfd-pending": 0, "interrupt-pending": 0,
        "userspace-interrupts": 0, "injections": 5, "dropped": 0, "fatal": None, "path": "dynamic"}


@pytest.mark.parametrize("change,first,verdict", [
    ({}, {}, "healthy"),
    ({"dropped": 2}, {"dropped": 2}, "host interrupt not delivered"),  # dropped before, nothing delivered since
    ({"dropped": 2, "injections": 9}, {"dropped": 2}, "healthy"),  # dropped before, delivered since
    ({"dropped": 3}, {"dropped": 2, "injections": 4}, "host interrupt not delivered"),  # dropped while watched
    ({"irqfd-pending": 1}, {}, "host interrupt not delivered"),  # nobody reads the irqfd
    ({"trigger": "interrupt", "masked": True, "interrupt-pending": 2}, {}, "host interrupt not delivered"),
    ({"trigger": "interrupt", "masked": True, "pending": True}, {}, "vector masked with an event pending"),
    ({"trigger": "interrupt", "function-masked": True, "pending": True}, {}, "vector masked with an event pending"),
    ({"trigger": "irqfd", "masked": True}, {}, "vector mask not honoured"),
    ({"trigger": "none", "masked": False}, {}, "host interrupt not delivered"),  # unmasked, not wired
    ({"trigger": "none", "masked": True}, {}, "ring not set up"),
    ({"fatal": {"vector": 0, "error": "ENOSPC", "reason": "no host vector"}}, {}, "host interrupt not delivered"),
    ({"host-msix-enabled": False}, {}, "ring not set up"),
    ({"injections": None, "dropped": None, "trigger": "interrupt"}, {}, "healthy"),
], ids=["healthy", "dropped-before", "dropped-then-delivered", "dropped-while-watched", "irqfd-unread",
        "vmm-eventfd-unread", "masked-pba", "function-masked-pba", "mask-not-honoured", "unmasked-not-wired",
        "masked-not-wired", "fatal", "host-msix-off", "no-irqfd"])
def test_vector_rules(change: dict, first: dict, verdict: str) -> None:
    from kickcall.diagnose.sample import VectorSample
    from kickcall.diagnose.verdict import judge_vector_state

    last = VectorSample(0, dict(BASE, **change), unknown=["x"])
    v = judge_vector_state(last, VectorSample(0, dict(BASE, **first)), 2.0, stable=True)
    assert str(v.kind) == verdict, v.evidence
    assert v.fix is None and v.unknown == ["x"] and v.evidence[0].startswith("MSI-X vector 0")
