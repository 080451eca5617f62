"""Seed 001 end to end: the cached-pirq reuse against the device model that unmaps on disable.

A Xen machine (``hypervisor = "xen"``, a small pirq table) with NVMe-like controllers -- kickcall-nic
functions, each served by its own ``kickcall vfio-user-server`` process -- driven by the guest's
NVMe probe pattern (``guest/nvme.py``).  Device event records decide what was lost and what reached
the wrong controller: a record never consumed is a lost interrupt; a handler that ran while its
controller had raised nothing (records are generated one at a time, each waited for) is an
interrupt delivered to the wrong device.  Event-channel counts would not do: events coalesce.

The switches: the machine's ``xen-fresh-pirq`` (the guest's 2017 fix, c74fd80f2f41; off: the
2010 read-back of af42b8d12f8a) and each passthrough function's ``xen-unmap-on-disable`` (QEMU >=
2.1.0, c976437c7dba; off: the older device model that keeps its mappings).
"""

from __future__ import annotations

import contextlib
import os
from typing import Any, Iterator

import pytest

from kickcall.machine import Machine, parse_config
from kickcall.monitor.client import QMPClient

from helpers import machine_toml
from vfio_env import vfio_server

NR_PIRQS = 32  # MSI pirqs 24..31: eight, handed out top-down
FIRST_MSI_PIRQ = 24


class Rig:
    def __init__(self, m: Machine, mqmp: str, n: int) -> None:
        self.m = m
        self.mqmp = mqmp
        self.names = [f"nic{i}" for i in range(n)]
        self.slot = {name: m.passthrough[name].devfn >> 3 for name in self.names}

    def g(self, name: str, cmd: str, **kw: Any) -> dict:
        return self.m.guest_cmd({"cmd": cmd, "slot": self.slot[name], **kw}, timeout=120)

    def qmp(self, cmd: str, args: dict | None = None) -> Any:
        with QMPClient(self.mqmp, timeout=60).connect() as c:
            return c.execute(cmd, args or {})

    def pirqs(self) -> dict:
        return self.qmp("x-query-xen-pirqs")

    def free_count(self) -> int:
        return int(self.pirqs()["hypervisor"]["free-count"])

    def set_guest_fix(self, on: bool) -> None:
        out = self.qmp("x-debug-fault", {"dev": "machine", "fault": "xen-fresh-pirq", "action": "on" if on else "off"})
        assert out["guest"]["sent"] is True, out

    def set_unmap_on_disable(self, on: bool) -> None:
        for name in self.names:
            self.qmp("x-debug-fault", {"dev": name, "fault": "xen-unmap-on-disable", "action": "on" if on else "off"})

    def conflicted_pirqs(self) -> set[int]:
        return {c["pirq"] for c in self.pirqs()["conflicts"]}


@contextlib.contextmanager
def xen_rig(workdir: str, n: int, *, queues: int = 2) -> Iterator[Rig]:
    with contextlib.ExitStack() as st:
        devs = ""
        for i in range(n):
            _p, sock, _q = st.enter_context(vfio_server(workdir, "--vectors", "4", "--queues", str(queues),
                                                        name=f"vfu{i}"))
            devs += f'[[device]]\ntype = "vfio-user"\nid = "nic{i}"\nsocket = "{sock}"\n'
        toml = machine_toml(vcpus=2, devices=f'hypervisor = "xen"\nnr-pirqs = {NR_PIRQS}\n' + devs)
        m = Machine(parse_config(toml, "<test>"))
        st.callback(m.stop)
        m.start(boot=True)
        mqmp = os.path.join(workdir, "m.qmp")
        m.start_monitor(mqmp)
        yield Rig(m, mqmp, n)


@pytest.mark.parametrize("fix", [True, False], ids=["fresh-pirq", "reuse-cached-pirq"])
def test_scripted_interleaving_gives_one_pirq_to_two_controllers_only_with_the_reuse_variant(
        workdir: str, fix: bool) -> None:
    """A enables (one vector), A disables (the device model unmaps its pirq), B's get_free_pirq is
    handed A's pirq, A enables again.  The 2010 guest reuses the pirq it reads back from A's MSI-X
    entry: Xen answers A's map with a warning and success, the pirq is claimed by A and B, A's
    interrupts are lost; when A reloads, the pirq's event channel is still B's, so A's interrupt
    runs B's handler (the wrong controller) and A's record is never consumed.  With the 2017 fix
    the same script is clean."""
    with xen_rig(workdir, 2) as r:
        if not fix:
            r.set_guest_fix(False)
        (pa,) = r.g("nic0", "nvme-alloc", nvec=1)["pirqs"]
        assert pa == NR_PIRQS - 1  # top-down
        r.g("nic0", "nvme-request")
        assert r.g("nic0", "nvme-io", queue=0, n=1)["consumed"] == 1
        r.g("nic0", "nvme-free")  # MSI-X off: the device model unmaps pa (QEMU >= 2.1.0)
        assert pa in r.pirqs()["hypervisor"]["free"]
        (pb,) = r.g("nic1", "nvme-alloc", nvec=1)["pirqs"]
        assert pb == pa  # the pirq just freed is the next one handed out
        (pa2,) = r.g("nic0", "nvme-alloc", nvec=1)["pirqs"]
        r.g("nic1", "nvme-request")
        r.g("nic0", "nvme-request")
        b_io = r.g("nic1", "nvme-io", queue=0, n=1, timeout=3)
        a_io = r.g("nic0", "nvme-io", queue=0, n=1, timeout=3)
        claimed = r.conflicted_pirqs()
        # A unloads and loads again: its fresh get_free_pirq (both variants: A's entry is reset by
        # nothing, but the guest frees and reallocates) meets the event channel B still holds
        r.g("nic0", "nvme-free")
        (pa3,) = r.g("nic0", "nvme-alloc", nvec=1)["pirqs"]
        r.g("nic0", "nvme-request")
        a_io2 = r.g("nic0", "nvme-io", queue=0, n=1, timeout=3)
        info = r.m.guest_cmd({"cmd": "xen-info"})
        if fix:
            assert pa2 != pa
            assert claimed == set()
            assert (b_io["consumed"], b_io["lost"], a_io["consumed"], a_io["lost"]) == (1, 0, 1, 0)
            assert (a_io2["consumed"], a_io2["lost"], a_io2["wrong_device"]) == (1, 0, 0)
            assert info["bind_failures"] == 0
        else:
            assert pa2 == pa  # read back from A's MSI-X entry: "msi already bound to pirq"
            assert claimed == {pa}  # one pirq, two controllers (x-query-xen-pirqs' conflicts)
            assert (b_io["consumed"], b_io["lost"]) == (1, 0)  # B keeps the pirq's mapping and port
            assert (a_io["consumed"], a_io["lost"]) == (0, 1)  # A's host interrupt is mapped nowhere
            assert info["bind_failures"] >= 1  # A's EVTCHNOP_bind_pirq: -EEXIST, only a warning
            assert pa3 == pa  # A's unload unmapped the pirq -- B's mapping -- so it is free again
            assert (a_io2["consumed"], a_io2["lost"]) == (0, 1)
            assert a_io2["wrong_device"] >= 1  # A's interrupt ran B's handler
        assert r.g("nic1", "nvme-stats")["wrong_device"] == (0 if fix else a_io2["wrong_device"])


def _stress(r: Rig, cycles: int, timeout: float, cmd_timeout: float = 1200) -> dict:
    slots = [r.slot[n] for n in r.names]
    return r.m.guest_cmd({"cmd": "xen-msi-stress", "slots": slots, "nq": 2, "cycles": cycles, "seed": 11,
                          "timeout": timeout}, timeout=cmd_timeout)


@pytest.mark.slow
def test_ten_thousand_load_unload_cycles_on_three_controllers_with_the_fix(workdir: str) -> None:
    """Three controllers, two vectors each, eight MSI pirqs: probe pattern, a record per queue and
    unload, interleaved at random, 10,000 cycles in all.  No conflict, no interrupt to the wrong
    controller, none lost, and the free pool is back to its size."""
    with xen_rig(workdir, 3) as r:
        free0 = r.free_count()
        out = _stress(r, 10_000, 5.0)
        assert out["errors"] == []
        assert out["cycles"] == 10_000
        assert (out["conflicts"], out["wrong_device"], out["lost"]) == (0, 0, 0), out
        assert r.conflicted_pirqs() == set()
        assert r.free_count() == free0


def test_the_same_stress_with_the_reuse_variant_conflicts(workdir: str) -> None:
    """The stress with the fix switched off: the 2010 guest soon hands one pirq to two controllers
    and interrupts are lost or reach the wrong one."""
    with xen_rig(workdir, 3) as r:
        r.set_guest_fix(False)
        out = _stress(r, 150, 0.5, cmd_timeout=120)
        assert out["conflicts"] > 0, out
        assert out["wrong_device"] + out["lost"] > 0, out


@pytest.mark.parametrize("fix", [True, False], ids=["fresh-pirq", "reuse-cached-pirq"])
def test_the_older_device_model_keeps_mappings_the_reuse_works_and_the_fix_fails_and_leaks(
        workdir: str, fix: bool) -> None:
    """QEMU before 2.1.0 (``xen-unmap-on-disable`` off) keeps a function's pirqs across a disable
    and never remaps an entry that has one.  The 2010 guest reuses its pirq: load/unload works and
    the pool stays the same.  The fixed guest asks for a fresh pirq that is never mapped: the
    reloaded controller's interrupts are lost, and each cycle leaks a pirq -- the compatibility
    cost the seed thread accepted (Xen 4.4 and older)."""
    with xen_rig(workdir, 1) as r:
        r.set_unmap_on_disable(False)
        if not fix:
            r.set_guest_fix(False)
        (p0,) = r.g("nic0", "nvme-alloc", nvec=1)["pirqs"]
        r.g("nic0", "nvme-request")
        assert r.g("nic0", "nvme-io", queue=0, n=1)["consumed"] == 1
        r.g("nic0", "nvme-free")
        assert p0 not in r.pirqs()["hypervisor"]["free"]  # still mapped: nobody unmapped it
        free1 = r.free_count()
        results = []
        for _ in range(3):
            (p,) = r.g("nic0", "nvme-alloc", nvec=1)["pirqs"]
            r.g("nic0", "nvme-request")
            results.append((p, r.g("nic0", "nvme-io", queue=0, n=1, timeout=2)))
            r.g("nic0", "nvme-free")
        if fix:
            assert [p for p, _ in results] == [p0 - 1, p0 - 2, p0 - 3]  # fresh each time, never given back
            assert all((io["consumed"], io["lost"]) == (0, 1) for _, io in results)
            assert r.free_count() == free1 - 3  # the leak
        else:
            assert [p for p, _ in results] == [p0, p0, p0]
            assert all((io["consumed"], io["lost"]) == (1, 0) for _, io in results)
            assert r.free_count() == free1
