"""Every monitor command, through the real client library (``qemu.qmp``), against the two monitors
kickcall has: a machine's (``Machine.start_monitor``) and the vhost-user back-end program's
(``kickcall vhost-user-blk --qmp``), with a kickcall machine as the back-end's front-end so the
back-end's rings are live.

What is asserted is behaviour: an injected kick gets the queue processed, an injected call raises
the guest's interrupt count (or, on a masked vector, the PBA bit and nothing else), a dropped kick
leaves avail.idx ahead of the device and an injection recovers it, a dropped call leaves a
completion the guest never hears of -- and queries never change anything: an eventfd count that
nobody can consume (the guest process is stopped) survives a burst of every query, and a vhost
back-end's ring keeps running (no GET_VRING_BASE, in fact no message at all).

The schema test compares kickcall's commands with those of a real QEMU 7.2 (``query-qmp-schema``
of ``qemu-system-x86_64 -M none``): argument names, types and optionality, and every member QEMU
marks mandatory present in kickcall's replies with the right JSON type.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import subprocess
import tempfile

import pytest
from qemu.qmp import EventListener, ExecuteError, QMPClient

from helpers import (blk, guest_irq_count, guest_vector_of, machine_toml, running_machine, spawn, start_vhost_user_blk,
                     stop_process, wait_for, wait_for_listener)
from kickcall import trace
from kickcall.faults import FaultError, FaultErrorKind
from kickcall.monitor.commands import HMP_COMMANDS
from kickcall.virtio.blk import make_image

pytestmark = pytest.mark.slow

BLK0 = "/machine/peripheral/blk0/virtio-backend"
VBLK = "/machine/peripheral/vblk/virtio-backend"
BE_DEV = "vhost-user-blk"  # the back-end's device: its qdev-like id ...
BE_PATH = "/vhost-user-blk"  # ... and its path

MACHINE_COMMANDS = {
    "qmp_capabilities", "query-version", "query-commands", "query-status", "stop", "cont", "system_reset", "quit",
    "query-pci", "x-query-virtio", "x-query-virtio-status", "x-query-virtio-queue-status",
    "x-query-virtio-vhost-queue-status", "x-query-virtio-queue-element", "x-query-pci-msix", "x-query-vfio",
    "x-query-device-notifiers", "x-debug-device-notifier-write", "x-debug-device-event", "x-debug-fault",
    "trace-event-list", "trace-event-get-state", "trace-event-set-state", "human-monitor-command",
    "x-query-xen-pirqs", "x-pcie-aer-inject-error", "x-query-pci-aer", "x-query-kickcall-counters",
}
BACKEND_COMMANDS = (MACHINE_COMMANDS - {"x-query-xen-pirqs"}) | {"x-query-vhost-user-backend"}


# ---------------------------------------------------------------------------------------------------
# qemu.qmp, driven synchronously
# ---------------------------------------------------------------------------------------------------
class Mon:
    """A ``qemu.qmp.QMPClient`` on its own event loop; every call runs the loop until it is done
    (events received meanwhile are queued in a listener)."""

    def __init__(self, path: str) -> None:
        self.loop = asyncio.new_event_loop()
        self.client = QMPClient("kickcall-test")
        self.events = EventListener()
        self.client.register_listener(self.events)
        self._run(self.client.connect(path))

    def _run(self, coro, timeout: float = 60.0):
        return self.loop.run_until_complete(asyncio.wait_for(coro, timeout))

    def __call__(self, cmd: str, **args):
        return self._run(self.client.execute(cmd, {k.replace("_", "-"): v for k, v in args.items()} or None))

    def hmp(self, line: str) -> str:
        return self("human-monitor-command", command_line=line)

    def fails(self, cmd: str, **args) -> ExecuteError:
        with pytest.raises(ExecuteError) as ei:
            self(cmd, **args)
        return ei.value

    def clear_events(self) -> None:
        self.events.clear()

    def event(self, name: str, timeout: float = 20.0) -> dict:
        """The next event called *name* (others are skipped); its data."""
        async def get():
            while True:
                ev = await self.events.get()
                if ev["event"] == name:
                    return dict(ev.get("data", {}))

        return self._run(get(), timeout)

    def close(self) -> None:
        try:
            self._run(self.client.disconnect(), 10)
        finally:
            self.loop.close()


def publish_unkicked(g, status) -> tuple[dict, dict]:
    """Publish a request without ringing the doorbell, once the device is idle; return it and the
    queue status that shows it published and not taken.

    A device re-reads avail.idx when it re-enables notifications at the end of its handler, and
    takes whatever it finds there, kick or no kick.  Under load that handler may still be running
    after its completion reached the guest, and would take a request published now.  ``status``
    is a query that runs serialised with the device's handlers (under the machine's big lock, or
    on the back-end's loop): once it has returned, the handler has finished and only a kick starts
    the device again."""
    status()
    r = g.submit(kick=False)
    q = status()
    assert q["avail-idx"] == (q["last-avail-idx"] + 1) & 0xFFFF, q
    return r, q


def by_role(notifiers: list[dict], role: str, queue: int = 0) -> dict:
    (n,) = [x for x in notifiers if x["role"] == role and x.get("queue") == queue]
    return n


@contextlib.contextmanager
def guest_stopped(m):
    """SIGSTOP the guest process: nobody consumes its irqfds while it is stopped."""
    os.kill(m.guest_pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(m.guest_pid, signal.SIGCONT)


class Guest:
    """The guest side of one virtio-blk device, through the guest OS's commands."""

    def __init__(self, m, dev: str, queue_entry: int) -> None:
        self.m = m
        self.slot = m.slot(dev)
        self.entry = queue_entry  # queue 0's MSI-X table entry
        self.vec = guest_vector_of(m, dev, queue_entry)  # the CPU vector the guest programmed into it

    def submit(self, *, kick: bool = True, sector: int = 64) -> dict:
        return self.m.guest_cmd({"cmd": "blk-submit", "slot": self.slot, "op": "write", "sector": sector,
                                 "nbytes": 4096, "fill": 0x5A, "kick": kick})

    def wait(self, rid: int, timeout: float = 30.0) -> dict:
        return self.m.guest_cmd({"cmd": "blk-wait", "id": rid, "timeout": timeout}, timeout=timeout + 30)

    def io(self, sector: int = 8) -> dict:
        r = self.m.guest_cmd({"cmd": "blk-io", "slot": self.slot, "op": "read", "sector": sector, "nbytes": 4096})
        assert r["status"] == 0
        return r

    def irqs(self) -> int:
        return guest_irq_count(self.m, self.vec)

    def mask(self, masked: bool) -> None:
        self.m.guest_cmd({"cmd": "msix-mask", "slot": self.slot, "entry": self.entry, "masked": masked})

    def pba(self) -> int:
        return self.m.guest_cmd({"cmd": "read-pba", "slot": self.slot})["pba"]


# ---------------------------------------------------------------------------------------------------
# fixtures: a machine with a virtio-blk; a back-end program with a machine as its front-end
# ---------------------------------------------------------------------------------------------------


class VM:
    def __init__(self, m, mon: Mon) -> None:
        self.m = m
        self.mon = mon
        self.vector = mon("x-query-virtio-queue-status", path=BLK0, queue=0)["vector"]
        self.guest = Guest(m, "blk0", self.vector)

    def qs(self, path: str = BLK0) -> dict:
        return self.mon("x-query-virtio-queue-status", path=path, queue=0)

    def notifiers(self) -> list[dict]:
        return self.mon("x-query-device-notifiers", dev="blk0")

    def msix_entry(self) -> dict:
        return self.mon("x-query-pci-msix", dev="blk0")["entries"][self.vector]


@pytest.fixture
def vm(workdir):
    with running_machine(machine_toml(devices=blk("blk0", size="4M"))) as m:
        path = os.path.join(workdir, "m.qmp")
        m.start_monitor(path)
        mon = Mon(path)
        try:
            yield VM(m, mon)
        finally:
            mon.close()


def vhost_toml(sock: str) -> str:
    return f"""
[machine]
vcpus = 2
[[device]]
type = "virtio-blk"
id = "vblk"
backend = "vhost-user"
socket = "{sock}"
queues = 1
"""


class Rig:
    """``kickcall vhost-user-blk`` in its own process (monitor: ``be``) serving the machine's vblk
    (the machine's monitor: ``fe``)."""

    def __init__(self, m, fe: Mon, be: Mon, proc) -> None:
        self.m = m
        self.fe = fe
        self.be = be
        self.proc = proc
        self.vector = fe("x-query-virtio-queue-status", path=VBLK, queue=0)["vector"]
        self.guest = Guest(m, "vblk", self.vector)

    def bqs(self) -> dict:
        return self.be("x-query-virtio-queue-status", path=BE_PATH, queue=0)

    def fqs(self) -> dict:
        return self.fe("x-query-virtio-queue-status", path=VBLK, queue=0)

    def messages(self) -> dict:
        return self.be("x-query-vhost-user-backend")["messages"]


@pytest.fixture
def vhost(workdir):
    img = os.path.join(workdir, "d.img")
    make_image(img, 8 << 20)
    sock, bq, fq = (os.path.join(workdir, n) for n in ("vu.sock", "be.qmp", "fe.qmp"))
    proc = start_vhost_user_blk(sock, img, "--qmp", bq)
    mons: list[Mon] = []
    try:
        wait_for_listener(bq, proc)
        with running_machine(vhost_toml(sock)) as m:
            m.start_monitor(fq)
            mons.append(Mon(fq))
            mons.append(Mon(bq))
            yield Rig(m, mons[0], mons[1], proc)
    finally:
        for mon in mons:
            try:
                mon.close()
            except Exception:
                pass  # a back-end told to quit has gone
        stop_process(proc)


@pytest.fixture(scope="module")
def qemu_schema():
    """QEMU 7.2's own schema (query-qmp-schema), by name."""
    if shutil.which("qemu-system-x86_64") is None:
        raise AssertionError("qemu-system-x86_64 is missing: run ./install.sh")
    d = tempfile.mkdtemp(prefix="kcq")
    path = os.path.join(d, "qmp")
    p = spawn(["qemu-system-x86_64", "-M", "none", "-nodefaults", "-display", "none",
               "-qmp", f"unix:{path},server=on,wait=off"], stdout=subprocess.DEVNULL)
    mon = None
    try:
        wait_for_listener(path, p)
        mon = Mon(path)
        version = mon("query-version")["qemu"]
        schema = {e["name"]: e for e in mon("query-qmp-schema")}
        yield version, schema
    finally:
        if mon is not None:
            mon.close()
        stop_process(p)
        shutil.rmtree(d, ignore_errors=True)


# ---------------------------------------------------------------------------------------------------
# schema: kickcall's commands against QEMU 7.2's
# ---------------------------------------------------------------------------------------------------
SHARED = ("query-version", "query-status", "stop", "cont", "system_reset", "quit", "query-pci", "x-query-virtio",
          "x-query-virtio-status", "x-query-virtio-queue-status", "x-query-virtio-vhost-queue-status",
          "x-query-virtio-queue-element", "trace-event-get-state", "trace-event-set-state", "human-monitor-command")
KICKCALL_ONLY = ("trace-event-list", "x-query-xen-pirqs", "x-query-pci-msix", "x-query-vfio", "x-query-device-notifiers", "x-debug-device-event",
                 "x-debug-device-notifier-write", "x-debug-fault", "x-query-vhost-user-backend",
                 "x-pcie-aer-inject-error", "x-query-pci-aer", "x-query-kickcall-counters")

# Fields kickcall leaves out of a reply.  Each must be optional in QEMU's schema (the conformance
# check below fails otherwise); the reasons:
OMISSIONS = {
    # a vhost queue's position lives in the back-end: QEMU reads it with GET_VRING_BASE, which stops
    # the ring.  kickcall reports avail_event (EVENT_IDX) as last-avail-idx instead, or nothing.
    ("x-query-virtio-queue-status", "vhost", "shadow-avail-idx"),
    ("x-query-virtio-queue-status", "vhost without EVENT_IDX (no avail_event to read)", "last-avail-idx"),
    # only when the device has a vhost_dev: kickcall has no vhost_dev internals to show
    ("x-query-virtio-status", "any", "vhost-dev"),
    # PCI bridges: kickcall's bus has none
    ("query-pci", "any", "pci_bridge"),
}


def conforms(schema: dict, tname: str, value, where: str) -> list[str]:
    """What is wrong with *value* as QEMU's type *tname* (mandatory members, JSON types, enums)."""
    t = schema[tname]
    mt = t["meta-type"]
    if mt == "builtin":
        jt = t["json-type"]
        ok = {"string": lambda v: isinstance(v, str), "boolean": lambda v: isinstance(v, bool),
              "int": lambda v: isinstance(v, int) and not isinstance(v, bool),
              "number": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
              "null": lambda v: v is None, "value": lambda v: True}[jt](value)
        return [] if ok else [f"{where}: {value!r} is not a JSON {jt}"]
    if mt == "enum":
        return [] if value in t["values"] else [f"{where}: {value!r} is not one of {t['values']}"]
    if mt == "array":
        if not isinstance(value, list):
            return [f"{where}: {value!r} is not an array"]
        return [e for i, x in enumerate(value) for e in conforms(schema, t["element-type"], x, f"{where}[{i}]")]
    if mt == "alternate":
        if any(not conforms(schema, m["type"], value, where) for m in t["members"]):
            return []
        return [f"{where}: {value!r} matches no branch of {tname}"]
    assert mt == "object", mt
    if not isinstance(value, dict):
        return [f"{where}: {value!r} is not an object"]
    members = list(t["members"])
    for var in t.get("variants", []):
        if value.get(t["tag"]) == var["case"]:
            members += schema[var["type"]]["members"]
    errs = []
    for m in members:
        if m["name"] not in value:
            if "default" not in m:
                errs.append(f"{where}: mandatory member '{m['name']}' is missing")
            continue
        errs += conforms(schema, m["type"], value[m["name"]], f"{where}.{m['name']}")
    return errs


def qemu_args(schema: dict, cmd: str) -> dict[str, tuple[str, bool]]:
    """QEMU's arguments of *cmd*: name -> (builtin type, optional)."""
    members = schema[schema[cmd]["arg-type"]]["members"]
    return {a["name"]: (a["type"], "default" in a) for a in members}


def _example_args(cmd: str, path: str) -> dict:
    """Every argument QEMU's schema gives *cmd*, optional ones too."""
    return {
        "x-query-virtio-status": {"path": path},
        "x-query-virtio-queue-status": {"path": path, "queue": 0},
        "x-query-virtio-vhost-queue-status": {"path": path, "queue": 0},
        "x-query-virtio-queue-element": {"path": path, "queue": 0, "index": 0},
        "trace-event-get-state": {"name": "virtio_queue_notify", "vcpu": 0},
        "trace-event-set-state": {"name": "virtio_queue_notify", "enable": False, "ignore-unavailable": True,
                                  "vcpu": 0},
    }.get(cmd, {})


def test_schema_matches_qemu_7_2(vm, vhost, qemu_schema):
    version, schema = qemu_schema
    assert (version["major"], version["minor"]) == (7, 2), f"the schema test is pinned to QEMU 7.2, not {version}"
    reg = vm.m.qmp.registry.commands
    # -- arguments: same names, same types, same optionality; the unstable feature where QEMU has it
    for cmd in SHARED:
        assert cmd in schema, f"QEMU 7.2 has no {cmd}"
        ours = {a.name: (a.type, a.optional) for a in reg[cmd].args}
        assert ours == qemu_args(schema, cmd), f"{cmd}: arguments differ from QEMU's"
        assert reg[cmd].unstable == ("unstable" in schema[cmd].get("features", [])), cmd
    for cmd in KICKCALL_ONLY:
        assert cmd not in schema, f"QEMU has {cmd} now: compare it here"
        assert cmd.startswith("x-") or cmd == "trace-event-list"
    for cmd in reg:
        assert cmd in SHARED or cmd in KICKCALL_ONLY or cmd in ("query-commands", "qmp_capabilities"), \
            f"{cmd}: say whether QEMU has it"

    # -- replies: every member QEMU makes mandatory, with QEMU's JSON type.  The same arguments a
    #    QEMU client would send (optional ones too) go through qemu.qmp to each monitor.
    vm.guest.io()  # a ring with some history
    vhost.guest.io()
    targets = [
        ("machine virtio-blk", vm.mon, BLK0,
         SHARED),
        ("machine vhost-user-blk front-end", vhost.fe, VBLK,
         ("x-query-virtio-status", "x-query-virtio-queue-status", "x-query-virtio-vhost-queue-status",
          "x-query-virtio-queue-element", "query-pci")),
        ("vhost-user-blk back-end", vhost.be, BE_PATH,
         ("query-version", "query-status", "query-pci", "x-query-virtio", "x-query-virtio-status",
          "x-query-virtio-queue-status", "x-query-virtio-vhost-queue-status", "x-query-virtio-queue-element",
          "trace-event-get-state", "trace-event-set-state")),
    ]
    checked = 0
    for what, mon, path, cmds in targets:
        for cmd in cmds:
            if cmd in ("stop", "cont", "system_reset", "quit", "human-monitor-command"):
                continue  # no reply to check (empty object, or a string): behaviour is tested below
            if cmd == "x-query-virtio-vhost-queue-status" and path == BLK0:
                continue  # QEMU refuses it too on a device without vhost ("vhost device has not started yet")
            args = _example_args(cmd, path)
            reply = mon(cmd, **args)
            errs = conforms(schema, schema[cmd]["ret-type"], reply, f"{what}: {cmd}")
            assert not errs, "\n".join(errs)
            checked += 1
            if cmd == "x-query-virtio-queue-element":  # and the default: the head of the queue
                reply = mon(cmd, path=path, queue=0)
                assert not conforms(schema, schema[cmd]["ret-type"], reply, cmd)
    assert checked == 9 + 5 + 10
    # the documented omissions are optional in QEMU's schema (or conformance above would fail), and
    # the vhost front-end does omit its shadow index (it never asks the back-end)
    assert "shadow-avail-idx" not in vhost.fqs()
    for cmd, _where, field in OMISSIONS:
        member = find_member(schema, schema[cmd]["ret-type"], field)
        assert member is not None, f"QEMU's {cmd} has no {field}: drop it from OMISSIONS"
        assert "default" in member, f"{cmd}.{field} is mandatory in QEMU: kickcall must send it"


def find_member(schema: dict, tname: str, field: str, seen: set | None = None) -> dict | None:
    """The member called *field* anywhere in the type *tname*."""
    seen = set() if seen is None else seen
    if tname in seen:
        return None
    seen.add(tname)
    t = schema[tname]
    if t["meta-type"] == "array":
        return find_member(schema, t["element-type"], field, seen)
    for m in t.get("members", []) if t["meta-type"] == "object" else []:
        if m["name"] == field:
            return m
        found = find_member(schema, m["type"], field, seen)
        if found is not None:
            return found
    return None


# ---------------------------------------------------------------------------------------------------
# a machine's monitor
# ---------------------------------------------------------------------------------------------------
def test_machine_introspection_and_hmp(vm):
    m, mon = vm.m, vm.mon
    p = m.device("blk0")
    assert {c["name"] for c in mon("query-commands")} == MACHINE_COMMANDS
    v = mon("query-version")
    assert v == dict(mon.client.greeting.QMP.version) and v["package"].startswith("kickcall")
    assert mon("query-status") == {"status": "running", "singlestep": False, "running": True}

    # query-pci: what the guest enumerated
    (bus,) = mon("query-pci")
    (dev,) = bus["devices"]
    assert dev["qdev_id"] == "blk0" and dev["slot"] == m.slot("blk0")
    assert (dev["id"]["vendor"], dev["id"]["device"]) == (0x1AF4, 0x1042)
    assert dev["class_info"]["class"] == 0x0100
    bars = {r["bar"]: r for r in dev["regions"]}
    assert bars[4]["address"] == p.bars[4].mapped_at and bars[4]["mem_type_64"]

    assert mon("x-query-virtio") == [{"path": BLK0, "name": "virtio-blk"}]
    st = mon("x-query-virtio-status", path=BLK0)
    assert st["name"] == "virtio-blk" and st["device-id"] == 2 and st["num-vqs"] == 1 and st["started"]
    assert any(s.startswith("VIRTIO_CONFIG_S_DRIVER_OK") for s in st["status"]["statuses"])
    assert any(f.startswith("VIRTIO_RING_F_EVENT_IDX") for f in st["guest-features"]["transports"])
    assert not st["vhost-started"]

    # a queue after some I/O: the ring and the device agree
    g = vm.guest
    g.io()
    g.io(sector=16)
    q = vm.qs()
    assert q["name"] == "virtio-blk" and q["queue-index"] == 0 and q["event-idx"]
    assert q["avail-idx"] == q["last-avail-idx"] == q["shadow-avail-idx"] == q["used-idx"] == q["used-idx-ring"]
    assert q["avail-idx"] >= 2 and q["inuse"] == 0 and q["kicks"] >= 2 and q["calls"] >= 2
    assert q["vector"] == p.vdev.queues[0].vector
    err = mon.fails("x-query-virtio-vhost-queue-status", path=BLK0, queue=0)
    assert "vhost device has not started yet" in str(err)

    # x-query-virtio-queue-element: a published, not yet kicked request, read without popping it
    r, q = publish_unkicked(g, vm.qs)
    el = mon("x-query-virtio-queue-element", path=BLK0, queue=0)  # default: the device's next position
    same = mon("x-query-virtio-queue-element", path=BLK0, queue=0, index=q["last-avail-idx"])
    wrapped = mon("x-query-virtio-queue-element", path=BLK0, queue=0, index=q["last-avail-idx"] + q["vring-num"])
    assert el == same == wrapped  # QEMU's index: a position in the avail ring, modulo the queue size
    assert el["avail"] == {"flags": q["avail-flags"], "idx": q["avail-idx"], "ring": el["index"]}
    assert el["used"] == {"flags": q["used-flags"], "idx": q["used-idx-ring"]}
    chain = [d for d in el["descs"] if "indirect" not in d["flags"]]
    assert [d["len"] for d in chain] == [16, 4096, 1]  # header, data, status
    assert chain[-1]["flags"] == ["write"] and "write" not in chain[1]["flags"]  # a write request
    q2 = vm.qs()
    assert q2 == q, "reading an element changed the queue"
    mon("x-debug-device-event", dev="blk0", event="kick", queue=0)
    assert g.wait(r["id"])["completed"]
    prev = mon("x-query-virtio-queue-element", path=BLK0, queue=0, index=(q["avail-idx"] - 1) & 0xFFFF)
    assert prev["index"] == el["index"]  # the slot the request went through, now used

    # MSI-X and notifiers
    mx = mon("x-query-pci-msix", dev="blk0")
    assert mx["enabled"] and not mx["function-masked"] and mx["table-size"] == p.msix.nvectors
    assert mx["config-vector"] == p.config_vector
    ent = mx["entries"][vm.vector]
    assert not ent["masked"] and not ent["pending"] and ent["use-count"] >= 1
    (bound,) = ent["notifiers"]
    assert bound["queue"] == 0 and bound["irqfd"] and not bound["polled"]
    ns = vm.notifiers()
    host, guest = by_role(ns, "host"), by_role(ns, "guest")
    assert guest["vector"] == vm.vector and guest["fd"] == bound["fd"]
    assert host["writes"] >= 2 and host["last-writer-pid"] == m.guest_pid  # the guest's doorbell writes
    assert all(n["owner"] == BLK0 for n in ns)

    # HMP: the same handlers as text
    out = mon.hmp("info pci")
    assert 'id "blk0"' in out and "1af4:1042" in out and "MSI-X: enabled" in out and "[guest:q0(irqfd)]" in out
    assert f"BAR4: 64 bit prefetchable memory at 0x{p.bars[4].mapped_at:08x}" in out
    assert mon.hmp("info virtio") == f"{BLK0} [virtio-blk]\r\n"
    assert "VIRTIO_CONFIG_S_DRIVER_OK" in mon.hmp(f"info virtio-status {BLK0}")
    qtext = mon.hmp(f"info virtio-queue-status {BLK0} 0")
    qnow = vm.qs()
    assert f"avail-idx: {qnow['avail-idx']}\r\n" in qtext and f"used-idx-ring: {qnow['used-idx-ring']}\r\n" in qtext
    assert f"\r\n  index:   {el['index']}\r\n" in mon.hmp(f"info virtio-queue-element {BLK0} 0 {q['last-avail-idx']}")
    ntext = mon.hmp("info notifiers blk0")
    for n in vm.notifiers():
        assert f"{n['name']}" in ntext and f" {n['fd']} " in ntext
    assert f"vector {vm.vector:3d}: addr 0x{ent['address']:x}" in mon.hmp("info msix blk0")
    assert mon.hmp("info status") == "VM status: running\r\n"
    helptext = mon.hmp("help")
    assert all(k in helptext for k in HMP_COMMANDS)
    assert mon.hmp("info notifiers nope") == "Error: Device 'nope' not found\r\n"
    assert mon.hmp("info virtio-queue-status /nope 0") == "Error: Path /nope is not a VirtIODevice\r\n"
    assert mon.hmp("frobnicate") == "unknown command: 'frobnicate'\r\n"

    # errors, with QEMU's classes and texts
    for cmd, args in (("x-query-pci-msix", {}), ("x-query-device-notifiers", {}),
                      ("x-debug-device-event", {"event": "kick", "queue": 0}),
                      ("x-debug-fault", {"queue": 0, "path": "kick", "action": "clear"}),
                      ("x-debug-device-notifier-write", {"id": 1})):
        e = mon.fails(cmd, dev="nope", **args)
        assert e.error_class == "DeviceNotFound" and str(e) == "Device 'nope' not found"
    for cmd, args in (("x-query-virtio-status", {}), ("x-query-virtio-queue-status", {"queue": 0}),
                      ("x-query-virtio-vhost-queue-status", {"queue": 0}),
                      ("x-query-virtio-queue-element", {"queue": 0})):
        what = "VirtIO device" if cmd == "x-query-virtio-queue-element" else "VirtIODevice"  # (QEMU 7.2's texts)
        for bad in ("/nope", "/machine/peripheral/blk0"):  # not the proxy: the VirtIODevice's path (or its id)
            e = mon.fails(cmd, path=bad, **args)
            assert e.error_class == "GenericError" and str(e) == f"Path {bad} is not a {what}"
    assert str(mon.fails("x-query-virtio-queue-status", path=BLK0, queue=1)) == "Invalid virtqueue number 1"
    assert str(mon.fails("x-query-virtio-queue-element", path=BLK0, queue=7)) == "Invalid virtqueue number 7"
    assert str(mon.fails("x-query-virtio-vhost-queue-status", path=BLK0, queue=3)) == \
        "Invalid vhost virtqueue number 3"
    assert str(mon.fails("x-debug-device-event", dev="blk0", event="kick", queue=1)) == "Invalid virtqueue number 1"
    assert str(mon.fails("x-debug-fault", dev="blk0", queue=2, path="call", action="clear")) == \
        "Invalid virtqueue number 2"
    assert str(mon.fails("x-query-virtio-queue-status", path=BLK0, queue=70000)) == \
        "Parameter 'queue' expects uint16_t"
    assert str(mon.fails("x-debug-device-event", dev="blk0", event="poke", queue=0)) == \
        "Parameter 'event' does not accept value 'poke'"
    assert "no notifier 999" in str(mon.fails("x-debug-device-notifier-write", dev="blk0", id=999))
    assert mon.fails("query-nothing").error_class == "CommandNotFound"


def test_machine_run_state_and_a_kick_deferred_while_paused(vm):
    m, mon, g = vm.m, vm.mon, vm.guest
    r = g.submit(kick=False)
    mon.clear_events()
    assert mon("stop") == {}
    assert mon.event("STOP") == {}
    assert mon("query-status") == {"status": "paused", "singlestep": False, "running": False}
    assert mon("stop") == {}  # stop on a paused machine: nothing to do, as in QEMU
    assert not m.running
    st = mon("x-query-virtio-status", path=BLK0)
    assert not st["vm-running"]
    # the ioeventfds are down while paused: the injected kick takes the notify write's slow path,
    # and the device defers it -- nothing is processed until cont
    q0 = vm.qs()
    out = mon("x-debug-device-event", dev="blk0", event="kick", queue=0)
    assert out == {"path": "mmio", "forced": False}
    q1 = vm.qs()
    assert q1["kicks"] == q0["kicks"] + 1
    assert q1["last-avail-idx"] == q0["last-avail-idx"] != q1["avail-idx"]
    assert mon("cont") == {}
    assert mon.event("RESUME") == {}
    assert mon("query-status")["status"] == "running"
    assert g.wait(r["id"])["completed"]
    q2 = vm.qs()
    assert q2["last-avail-idx"] == q2["avail-idx"] == q2["used-idx"]
    assert mon("cont") == {}  # cont on a running machine: nothing to do


def test_machine_system_reset(vm):
    m, mon, g = vm.m, vm.mon, vm.guest
    for s in range(4):
        g.io(sector=8 * s)
    assert vm.qs()["used-idx"] >= 4
    mon.clear_events()
    assert mon("system_reset") == {}
    assert mon.event("RESET") == {"guest": False, "reason": "host-qmp-system-reset"}
    assert mon("query-status")["status"] == "running"
    # the device was reset and the guest drove it up again: fresh rings, DRIVER_OK
    st = mon("x-query-virtio-status", path=BLK0)
    assert any(s.startswith("VIRTIO_CONFIG_S_DRIVER_OK") for s in st["status"]["statuses"])
    q = vm.qs()
    assert q["used-idx"] == q["last-avail-idx"] == q["avail-idx"] < 4
    assert mon("x-query-pci-msix", dev="blk0")["enabled"]
    vm.guest = Guest(m, "blk0", q["vector"])
    vm.guest.io()
    assert vm.qs()["used-idx"] == q["used-idx"] + 1


def test_machine_quit(vm):
    mon = vm.mon
    mon.clear_events()
    assert mon("quit") == {}  # the reply comes first ...
    assert mon.event("SHUTDOWN") == {"guest": False, "reason": "host-qmp-quit"}
    wait_for(vm.m.quit_requested.is_set, 10, "the machine to be asked to quit")  # ... then the quit


def test_machine_kick_and_call_injection(vm):
    mon, g = vm.mon, vm.guest
    g.io()  # the queue is set up and has run

    # kick: what the guest's notify write would do -- the queue is processed
    r, q0 = publish_unkicked(g, vm.qs)
    host0 = by_role(vm.notifiers(), "host")
    mon.clear_events()
    assert mon("x-debug-device-event", dev="blk0", event="kick", queue=0) == {"path": "ioeventfd", "forced": False}
    assert mon.event("X_DEVICE_EVENT_INJECTED") == {"dev": "blk0", "queue": 0, "event": "kick", "forced": False,
                                                     "path": "ioeventfd"}
    assert g.wait(r["id"])["completed"]
    q1 = vm.qs()
    assert q1["last-avail-idx"] == q1["used-idx-ring"] == q0["avail-idx"]
    assert q1["kicks"] == q0["kicks"] + 1
    host1 = by_role(vm.notifiers(), "host")
    assert host1["total"] == host0["total"] + 1 and host1["writes"] == host0["writes"]  # not a doorbell write

    # call on an unmasked vector: one more interrupt in the guest
    n0 = g.irqs()
    mon.clear_events()
    assert mon("x-debug-device-event", dev="blk0", event="call", queue=0) == {"path": "irqfd", "forced": False}
    assert mon.event("X_DEVICE_EVENT_INJECTED") == {"dev": "blk0", "queue": 0, "event": "call", "forced": False,
                                                     "path": "irqfd"}
    wait_for(lambda: g.irqs() == n0 + 1, 20, "the injected call's interrupt")

    # call on a masked vector: the PBA bit, no interrupt
    g.mask(True)
    e0 = vm.msix_entry()
    assert e0["masked"] and not e0["pending"]
    (bound,) = e0["notifiers"]
    assert not bound["irqfd"] and bound["polled"]  # irqfd off while masked, the VMM polls
    mon.clear_events()
    assert mon("x-debug-device-event", dev="blk0", event="call", queue=0) == {"path": "pba", "forced": False}
    assert mon.event("X_DEVICE_EVENT_INJECTED")["path"] == "pba"
    e1 = vm.msix_entry()
    assert e1["pending"] and e1["pended"] == e0["pended"] + 1 and e1["sent"] == e0["sent"]
    assert g.pba() >> vm.vector & 1, "the guest does not see the PBA bit"
    assert "PENDING" in mon.hmp("info msix blk0")

    # force: exactly one interrupt past the mask, the PBA bit stays
    mon.clear_events()
    assert mon("x-debug-device-event", dev="blk0", event="call", queue=0, force=True) == \
        {"path": "msi-forced", "forced": True}
    assert mon.event("X_DEVICE_EVENT_INJECTED") == {"dev": "blk0", "queue": 0, "event": "call", "forced": True,
                                                     "path": "msi-forced"}
    wait_for(lambda: g.irqs() == n0 + 2, 20, "the forced interrupt")
    e2 = vm.msix_entry()
    assert e2["sent"] == e1["sent"] + 1 and e2["pending"] and e2["masked"]

    # unmask: the pending call is delivered once, the bit clears
    g.mask(False)
    e3 = vm.msix_entry()
    assert not e3["masked"] and not e3["pending"]
    assert e3["unmask-delivered"] == e2["unmask-delivered"] + 1 and e3["sent"] == e2["sent"] + 1
    wait_for(lambda: g.irqs() == n0 + 3, 20, "the pending interrupt, on unmask")
    assert not g.pba() >> vm.vector & 1
    # an unmasked call after that: one more, and no interrupt beyond the ones counted (the masked
    # call did not get through on its own)
    mon("x-debug-device-event", dev="blk0", event="call", queue=0)
    wait_for(lambda: g.irqs() == n0 + 4, 20, "the last interrupt")
    g.io()
    assert g.irqs() == n0 + 5

    # the EventNotifier level: write the queue's host notifier, the queue is processed
    r = g.submit(kick=False)
    host = by_role(vm.notifiers(), "host")
    mon.clear_events()
    out = mon("x-debug-device-notifier-write", dev="blk0", id=host["id"])
    assert out == {"id": host["id"], "role": "host", "queue": 0}
    assert mon.event("X_DEVICE_EVENT_INJECTED") == {"dev": "blk0", "queue": 0, "event": "notifier", "forced": True,
                                                     "path": "notifier:host"}
    assert g.wait(r["id"])["completed"]

    # and through HMP
    r = g.submit(kick=False)
    mon.clear_events()
    assert mon.hmp("x-debug-device-event blk0 kick 0") == "kick injected on queue 0 of blk0 through ioeventfd\r\n"
    assert mon.event("X_DEVICE_EVENT_INJECTED")["event"] == "kick"
    assert g.wait(r["id"])["completed"]
    n = g.irqs()
    assert mon.hmp("x-debug-device-event blk0 call 0 force") == "call injected on queue 0 of blk0 through irqfd\r\n"
    wait_for(lambda: g.irqs() == n + 1, 20, "the HMP call")
    assert mon.hmp(f"x-debug-device-notifier-write blk0 {host['id']}") == f"notifier {host['id']} (host) written\r\n"
    assert mon.hmp("x-debug-device-event blk0 kick 0 now") == "Error: the fourth argument can only be 'force'\r\n"


def test_machine_fault_injection(vm):
    m, mon, g = vm.m, vm.mon, vm.guest
    g.io()

    # drop-next on the kick path: the hypervisor matches the guest's doorbell write and loses it
    assert mon("x-debug-fault", dev="blk0", queue=0, path="kick", action="drop-next") == \
        {"path": "kick", "action": "drop-next", "matched": 1}
    h0 = by_role(vm.notifiers(), "host")
    r = g.submit()
    assert r["kicked"]
    h1 = by_role(vm.notifiers(), "host")
    assert h1["writes"] == h0["writes"] + 1 and h1["total"] == h0["total"]  # written, never signalled
    q = vm.qs()
    assert q["avail-idx"] == (q["last-avail-idx"] + 1) & 0xFFFF  # the device is one behind ...
    assert q["avail-event"] == q["last-avail-idx"]  # ... and still waits for a kick at its position
    # an injected kick recovers the queue
    mon("x-debug-device-event", dev="blk0", event="kick", queue=0)
    assert g.wait(r["id"])["completed"]
    q = vm.qs()
    assert q["last-avail-idx"] == q["avail-idx"] == q["used-idx-ring"]
    # drop-next was for one write only
    r = g.submit()
    assert r["kicked"] and g.wait(r["id"])["completed"]

    # drop-all: every doorbell write is lost until clear; with EVENT_IDX the guest even stops
    # ringing (the device never moved avail_event) -- the classic lost-kick hang
    mon("x-debug-fault", dev="blk0", queue=0, path="kick", action="drop-all")
    h0 = by_role(vm.notifiers(), "host")
    rs = [g.submit(sector=64 + 8 * i) for i in range(3)]
    h1 = by_role(vm.notifiers(), "host")
    assert rs[0]["kicked"]
    assert h1["writes"] - h0["writes"] == sum(x["kicked"] for x in rs) and h1["total"] == h0["total"]
    q = vm.qs()
    assert (q["avail-idx"] - q["last-avail-idx"]) & 0xFFFF == 3
    mon("x-debug-fault", dev="blk0", queue=0, path="kick", action="clear")
    mon("x-debug-device-event", dev="blk0", event="kick", queue=0)
    assert all(g.wait(x["id"])["completed"] for x in rs)
    r = g.submit()
    assert r["kicked"] and g.wait(r["id"])["completed"]  # cleared: doorbells work again

    # drop-next on the call path: the device completes the request and calls, the hypervisor
    # loses the irqfd's interrupt, the guest never hears of the completion
    dropped0 = m.vm.stats.globals()["irqfd_dropped"]
    assert mon("x-debug-fault", dev="blk0", queue=0, path="call", action="drop-next")["matched"] == 1
    n0 = g.irqs()
    gn0 = by_role(vm.notifiers(), "guest")
    r = g.submit()
    wait_for(lambda: m.vm.stats.globals()["irqfd_dropped"] == dropped0 + 1, 20, "the call to be dropped")
    q = vm.qs()
    assert q["used-idx-ring"] == q["avail-idx"]  # completed by the device ...
    assert q["calls"] >= 1 and by_role(vm.notifiers(), "guest")["sets"] == gn0["sets"] + 1  # ... which called
    assert g.irqs() == n0  # ... and no interrupt
    assert q["used-event"] != q["used-idx-ring"]  # the guest has not consumed it
    assert not g.wait(r["id"], timeout=0.3)["completed"]
    # an injected call recovers it
    mon("x-debug-device-event", dev="blk0", event="call", queue=0)
    assert g.wait(r["id"])["completed"]
    assert g.irqs() == n0 + 1

    # drop-all on the call path catches the operator's call too (it goes through the irqfd); clear
    mon("x-debug-fault", dev="blk0", queue=0, path="call", action="drop-all")
    mon("x-debug-device-event", dev="blk0", event="call", queue=0)
    wait_for(lambda: m.vm.stats.globals()["irqfd_dropped"] == dropped0 + 2, 20, "the injected call to be dropped")
    mon("x-debug-fault", dev="blk0", queue=0, path="call", action="clear")
    mon("x-debug-device-event", dev="blk0", event="call", queue=0)
    wait_for(lambda: g.irqs() == n0 + 2, 20, "the call after clear")
    g.io()

    # HMP, and what cannot be faulted: a masked vector has no irqfd
    assert "drop-next on the kick path of queue 0" in mon.hmp("x-debug-fault blk0 0 kick drop-next")
    mon("x-debug-fault", dev="blk0", queue=0, path="kick", action="clear")
    g.mask(True)
    try:
        assert "no irqfd now" in str(mon.fails("x-debug-fault", dev="blk0", queue=0, path="call", action="drop-next"))
    finally:
        g.mask(False)
    g.io()


MACHINE_BLK_FAULTS = {"restore-notify-on-error": "fix-off", "deassign-test-and-clear": "fix-off",
                      "lose-kick": "injected", "lose-call": "injected"}


def test_machine_fault_registry(vm):
    """``x-debug-fault {dev}`` lists the device's registry; a fault named there acts as its path
    form does (a kick lost in the hypervisor), its state is shown, and a fix switches off and on."""
    m, mon, g = vm.m, vm.mon, vm.guest
    g.io()
    listed = mon("x-debug-fault", dev="blk0")
    assert listed["dev"] == "blk0"
    assert {f["name"]: f["kind"] for f in listed["faults"]} == MACHINE_BLK_FAULTS
    assert all(f["effect"] and f["actions"] for f in listed["faults"])

    # lose-kick by name: the doorbell write is matched and lost, the listing shows it dropped
    out = mon("x-debug-fault", dev="blk0", fault="lose-kick", action="drop-next", queue=0)
    assert out["matched"] == 1
    r = g.submit()
    assert r["kicked"]
    q = vm.qs()
    assert q["avail-idx"] == (q["last-avail-idx"] + 1) & 0xFFFF
    (lk,) = [f for f in mon("x-debug-fault", dev="blk0")["faults"] if f["name"] == "lose-kick"]
    assert lk["state"]["queues"] == [{"queue": 0, "drop-next": 0, "drop-all": False, "dropped": 1}]
    mon("x-debug-device-event", dev="blk0", event="kick", queue=0)
    assert g.wait(r["id"])["completed"]

    # lose-call by name: the device calls, the hypervisor's irqfd loses it
    dropped0 = m.vm.stats.globals()["irqfd_dropped"]
    assert mon("x-debug-fault", dev="blk0", fault="lose-call", action="drop-next", queue=0)["matched"] == 1
    n0 = g.irqs()
    r = g.submit()
    wait_for(lambda: m.vm.stats.globals()["irqfd_dropped"] == dropped0 + 1, 20, "the call to be dropped")
    assert not g.wait(r["id"], timeout=0.3)["completed"] and g.irqs() == n0
    (lc,) = [f for f in mon("x-debug-fault", dev="blk0")["faults"] if f["name"] == "lose-call"]
    assert lc["state"]["queues"] == [{"queue": 0, "drop-next": 0, "drop-all": False, "dropped": 1}]
    mon("x-debug-device-event", dev="blk0", event="call", queue=0)
    assert g.wait(r["id"])["completed"]

    # a fix switched off by name reaches the device's code, and back on
    sw = m.device("blk0").vdev.faults
    assert mon("x-debug-fault", dev="blk0", fault="deassign-test-and-clear", action="off")["fix"] == "off"
    assert not sw.fix_on("deassign-test-and-clear")
    (d,) = [f for f in mon("x-debug-fault", dev="blk0")["faults"] if f["name"] == "deassign-test-and-clear"]
    assert d["state"] == {"fix": "off"}
    mon("x-debug-fault", dev="blk0", fault="deassign-test-and-clear", action="on")
    assert sw.fix_on("deassign-test-and-clear")

    # refusals: unknown fault, an action the fault does not take, no queue for a per-queue fault,
    # both forms at once; nothing changed by any of them
    for args in ({"fault": "no-such-fault", "action": "off"},
                 {"fault": "deassign-test-and-clear", "action": "drop-next"},
                 {"fault": "lose-kick", "action": "drop-next"},
                 {"fault": "lose-kick", "path": "kick", "queue": 0, "action": "drop-next"},
                 {"path": "kick", "queue": 0, "action": "off"},
                 {"queue": 0}):
        e = mon.fails("x-debug-fault", dev="blk0", **args)
        assert e.error_class == "GenericError", args
    assert {f["name"]: f["state"] for f in mon("x-debug-fault", dev="blk0")["faults"]}["deassign-test-and-clear"] \
        == {"fix": "on"}
    r = g.submit()
    assert r["kicked"] and g.wait(r["id"])["completed"]

    # a fault that cannot act now says so by kind: a masked vector has no irqfd to drop calls on
    g.mask(True)
    try:
        with pytest.raises(FaultError) as ei:
            sw.arm("lose-call", "drop-next", 0)
        assert ei.value.kind is FaultErrorKind.UNSUPPORTED
        with pytest.raises(FaultError) as ei:
            sw.arm("lose-call", "drop-next", 7)
        assert ei.value.kind is FaultErrorKind.BAD_QUEUE
    finally:
        g.mask(False)
    g.io()

    # HMP: the listing, and a fault by name
    text = mon.hmp("x-debug-fault blk0")
    assert all(name in text for name in MACHINE_BLK_FAULTS)
    assert "fix off" in mon.hmp("x-debug-fault blk0 restore-notify-on-error off")
    assert "restore-notify-on-error (fix-off): fix off" in mon.hmp("x-debug-fault blk0")
    mon.hmp("x-debug-fault blk0 restore-notify-on-error on")
    assert sw.fix_on("restore-notify-on-error")


def test_machine_queries_change_nothing(vm):
    """Snapshots of every notifier, the queue, MSI-X and the device around a burst of every query:
    nothing moves.  An eventfd count that nobody else can consume (the guest process, whose
    hypervisor reads the irqfd, is stopped) survives it, and a published request stays unprocessed."""
    m, mon, g = vm.m, vm.mon, vm.guest
    for s in range(3):
        g.io(sector=8 * s)
    r, _ = publish_unkicked(g, vm.qs)  # published, not kicked
    n0 = g.irqs()

    def snapshot():
        return (vm.notifiers(), vm.qs(), mon("x-query-pci-msix", dev="blk0"),
                mon("x-query-virtio-status", path=BLK0), mon("query-pci"), mon("query-status"))

    with guest_stopped(m):
        assert mon("x-debug-device-event", dev="blk0", event="call", queue=0)["path"] == "irqfd"
        before = snapshot()
        gn = by_role(before[0], "guest")
        assert gn["pending"] == 1, "the call must sit in the irqfd's eventfd"
        q = before[1]
        for _ in range(3):
            mon("query-version")
            mon("query-status")
            mon("query-commands")
            mon("query-pci")
            mon("x-query-virtio")
            mon("x-query-virtio-status", path=BLK0)
            mon("x-query-virtio-queue-status", path=BLK0, queue=0)
            mon("x-query-virtio-queue-element", path=BLK0, queue=0)
            for i in range(q["vring-num"] // 16):
                mon("x-query-virtio-queue-element", path=BLK0, queue=0, index=i)
            mon.fails("x-query-virtio-vhost-queue-status", path=BLK0, queue=0)
            mon("x-query-pci-msix", dev="blk0")
            mon("x-query-device-notifiers", dev="blk0")
            mon("trace-event-list")
            mon("trace-event-get-state", name="virtio_*")
            for line in ("info pci", "info virtio", f"info virtio-status {BLK0}",
                         f"info virtio-queue-status {BLK0} 0", f"info virtio-queue-element {BLK0} 0",
                         "info notifiers blk0", "info msix blk0", "info status", "info trace-events", "help"):
                mon.hmp(line)
        after = snapshot()
        assert after == before
    # the guest runs again: its hypervisor consumes the call, the guest takes it
    wait_for(lambda: by_role(vm.notifiers(), "guest")["pending"] == 0, 20, "the irqfd to be consumed")
    wait_for(lambda: g.irqs() == n0 + 1, 20, "the interrupt")
    # the request the queries looked at is still there to be processed
    q = vm.qs()
    assert q["avail-idx"] == (q["last-avail-idx"] + 1) & 0xFFFF
    mon("x-debug-device-event", dev="blk0", event="kick", queue=0)
    assert g.wait(r["id"])["completed"]


def test_trace_events(vm):
    mon, g = vm.mon, vm.guest
    saved = {e.name: e.enabled for e in trace.events()}
    try:
        names = [e["name"] for e in mon("trace-event-list")]
        assert "virtio_queue_notify" in names and "msix_notify" in names and names == sorted(names)
        assert mon("trace-event-list", name="msix_*") == mon("trace-event-get-state", name="msix_*")
        assert all(e["name"].startswith("msix_") for e in mon("trace-event-get-state", name="msix_*"))
        assert mon("trace-event-get-state", name="virtio_queue_notify") == \
            [{"name": "virtio_queue_notify", "state": "disabled", "vcpu": False}]
        e = mon.fails("trace-event-get-state", name="no_such_event")
        assert e.error_class == "GenericError" and str(e) == 'unknown event "no_such_event"'
        assert mon("trace-event-get-state", name="no_such_*") == []  # a pattern may match nothing (QEMU)
        assert str(mon.fails("trace-event-set-state", name="no_such_event", enable=True)) == \
            'unknown event "no_such_event"'
        assert mon("trace-event-set-state", name="no_such_*", enable=True) == {}

        # enabled, the kick path records; disabled, it does not
        trace.clear_records()
        assert mon("trace-event-set-state", name="virtio_queue_notify", enable=True) == {}
        assert mon("trace-event-get-state", name="virtio_queue_notify")[0]["state"] == "enabled"
        r = g.submit(kick=False)
        mon("x-debug-device-event", dev="blk0", event="kick", queue=0)
        assert g.wait(r["id"])["completed"]
        recs = trace.records(["virtio_queue_notify"])
        assert len(recs) == 1 and recs[0][3]["path"] == "ioeventfd"
        assert mon.hmp("info trace-events virtio_queue_notify") == "virtio_queue_notify : state 1\r\n"
        assert mon.hmp("trace-event virtio_queue_notify off") == ""
        assert mon("trace-event-get-state", name="virtio_queue_notify")[0]["state"] == "disabled"
        r = g.submit(kick=False)
        mon("x-debug-device-event", dev="blk0", event="kick", queue=0)
        assert g.wait(r["id"])["completed"]
        assert len(trace.records(["virtio_queue_notify"])) == 1
        # every injection is traced (x_debug_device_event), with the queue and the kind
        mon("trace-event-set-state", name="x_debug_device_event", enable=True)
        mon("x-debug-device-event", dev="blk0", event="kick", queue=0)
        (rec,) = trace.records(["x_debug_device_event"])
        assert rec[3] == {"dev": "blk0", "queue": 0, "kind": "kick"}
        # globs set several at once
        mon("trace-event-set-state", name="msix_*", enable=True)
        assert {e["state"] for e in mon("trace-event-get-state", name="msix_*")} == {"enabled"}
        mon("trace-event-set-state", name="msix_*", enable=False, ignore_unavailable=True)
        assert {e["state"] for e in mon("trace-event-get-state", name="msix_*")} == {"disabled"}
    finally:
        for e in trace.events():
            e.enabled = saved.get(e.name, False)
        trace.clear_records()


# ---------------------------------------------------------------------------------------------------
# the vhost-user back-end program's monitor, with a machine as its front-end
# ---------------------------------------------------------------------------------------------------
def test_backend_introspection(vhost):
    be, fe, g = vhost.be, vhost.fe, vhost.guest
    assert {c["name"] for c in be("query-commands")} == BACKEND_COMMANDS
    assert be("query-version") == dict(be.client.greeting.QMP.version)
    assert be("query-status") == {"status": "running", "singlestep": False, "running": True}
    for cmd, text in (("stop", "no vCPUs to stop"), ("system_reset", "cannot reset")):
        e = be.fails(cmd)
        assert e.error_class == "GenericError" and text in str(e)
    assert be("cont") == {}  # always running: nothing to resume, as QEMU's cont on a running VM
    assert be("query-pci") == [{"bus": 0, "devices": []}]  # the front-end owns the PCI function
    assert be("x-query-virtio") == [{"path": BE_PATH, "name": "vhost-user-blk"}]
    g.io()
    st = be("x-query-virtio-status", path=BE_PATH)
    assert st["device-id"] == 2 and st["vhost-started"] and st["x-vhost-user"]["connected"]
    assert any(f.startswith("VIRTIO_RING_F_EVENT_IDX") for f in st["guest-features"]["transports"])

    q = vhost.bqs()
    assert q["name"] == "vhost-user-blk" and q["started"] and q["enabled"] and q["event-idx"]
    assert q["avail-idx"] == q["last-avail-idx"] == q["used-idx"] == q["used-idx-ring"] >= 1
    assert q["kicks"] >= 1 and q["calls"] >= 1 and q["calls-without-fd"] == 0
    # both sides describe the same ring
    fvq = fe("x-query-virtio-vhost-queue-status", path=VBLK, queue=0)
    bvq = be("x-query-virtio-vhost-queue-status", path=BE_PATH, queue=0)
    for k in ("desc", "avail", "used", "num", "desc-phys", "avail-phys", "used-phys", "desc-size", "used-size"):
        assert fvq[k] == bvq[k], k
    assert bvq["desc-phys"] == q["vring-desc"] and bvq["num"] == q["vring-num"]
    fq = vhost.fqs()
    assert "shadow-avail-idx" not in fq and fq["last-avail-idx"] == q["last-avail-idx"]  # from avail_event
    # the VMM handles no kick of an offloaded queue, but counts every one (the hypervisor's count of
    # the doorbell writes, and its own start kick): writes >= the back-end's reads
    assert fq["used-idx"] == q["used-idx"] and fq["kicks"] >= q["kicks"] >= 1
    assert fe("x-query-virtio-status", path=VBLK)["vhost-started"]

    # the back-end's eventfds: its kick, call and err fds
    ns = be("x-query-device-notifiers", dev=BE_DEV)
    assert {n["role"] for n in ns} == {"host", "guest", "err"}
    assert by_role(ns, "host")["fd"] == bvq["kick"] and by_role(ns, "guest")["fd"] == bvq["call"]
    assert by_role(ns, "host")["kicks-handled"] == q["kicks"] and by_role(ns, "guest")["calls-written"] == q["calls"]
    # ... the same eventfds the front-end hands it
    fns = fe("x-query-device-notifiers", dev="vblk")
    assert by_role(fns, "host")["fd"] == fvq["kick"]
    # every doorbell write the hypervisor matched reached the back-end's kick fd (consumed + pending)
    # (and the VMM's own writes of it: the kick it hands over signalled when the ring starts)
    assert by_role(fns, "host")["sets"] >= 1
    assert by_role(fns, "host")["writes"] + by_role(fns, "host")["sets"] == by_role(ns, "host")["total"] >= q["kicks"]

    info = be("x-query-vhost-user-backend")
    assert info["connected"] and info["connections"] == 1 and info["disconnects"] == 0
    assert info["queues"][0]["started"] and info["queues"][0]["kicks"] == q["kicks"]
    assert info["messages"]["SET_VRING_KICK"] >= 1 and "GET_VRING_BASE" not in info["messages"]

    el = be("x-query-virtio-queue-element", path=BE_PATH, queue=0, index=(q["avail-idx"] - 1) & 0xFFFF)
    fel = fe("x-query-virtio-queue-element", path=VBLK, queue=0, index=(q["avail-idx"] - 1) & 0xFFFF)
    assert el["descs"] == fel["descs"] and el["index"] == fel["index"] and el["avail"] == fel["avail"]

    e = be.fails("x-query-pci-msix", dev=BE_DEV)
    assert "no MSI-X" in str(e)
    assert str(be.fails("x-query-device-notifiers", dev="nope")) == "Device 'nope' not found"
    assert be.fails("x-query-device-notifiers", dev="nope").error_class == "DeviceNotFound"
    assert str(be.fails("x-query-virtio-status", path="/machine")) == "Path /machine is not a VirtIODevice"
    assert str(be.fails("x-query-virtio-queue-status", path=BE_PATH, queue=1)) == "Invalid virtqueue number 1"
    assert str(be.fails("x-query-virtio-queue-element", path=BE_PATH, queue=1)) == "Invalid virtqueue number 1"
    assert str(be.fails("x-query-virtio-vhost-queue-status", path=BE_PATH, queue=1)) == \
        "Invalid vhost virtqueue number 1"
    assert "cannot force" in str(be.fails("x-debug-device-event", dev=BE_DEV, event="call", queue=0, force=True))

    # HMP on the back-end
    assert be.hmp("info virtio") == f"{BE_PATH} [vhost-user-blk]\r\n"
    assert be.hmp("info pci") == ""
    assert "vhost-user-blk.vq0.kick" in be.hmp(f"info notifiers {BE_DEV}")
    assert "kicks: " in be.hmp(f"info virtio-queue-status {BE_PATH} 0")
    assert f"\r\n    num:         {q['vring-num']}\r\n" in be.hmp(f"info virtio-vhost-queue-status {BE_PATH} 0")
    assert all(k in be.hmp("help") for k in HMP_COMMANDS)
    assert be.hmp("info msix vhost-user-blk").startswith("Error: a vhost-user back-end has no MSI-X")
    assert be.hmp("stop").startswith("Error: a back-end has no vCPUs")
    # trace events live in the back-end's process: set and read back there
    assert be("trace-event-set-state", name="virtqueue_pop", enable=True) == {}
    assert be("trace-event-get-state", name="virtqueue_pop") == \
        [{"name": "virtqueue_pop", "state": "enabled", "vcpu": False}]
    be("trace-event-set-state", name="virtqueue_pop", enable=False)
    assert str(be.fails("trace-event-get-state", name="nope")) == 'unknown event "nope"'
    assert any(e["name"] == "virtqueue_pop" for e in be("trace-event-list"))


def test_backend_kick_call_injection_and_masking(vhost):
    be, fe, g = vhost.be, vhost.fe, vhost.guest
    g.io()

    # kick injected in the back-end: the queue is processed as if its kick fd had fired
    r, q0 = publish_unkicked(g, vhost.bqs)
    be.clear_events()
    assert be("x-debug-device-event", dev=BE_DEV, event="kick", queue=0) == {"path": "backend-process",
                                                                              "forced": False}
    assert be.event("X_DEVICE_EVENT_INJECTED") == {"dev": BE_DEV, "queue": 0, "event": "kick", "forced": False,
                                                    "path": "backend-process"}
    assert g.wait(r["id"])["completed"]
    q1 = vhost.bqs()
    assert q1["last-avail-idx"] == q1["used-idx"] == q0["avail-idx"] and q1["kicks"] == q0["kicks"]

    # kick injected in the front-end: it writes the back-end's kick fd (the vhost host notifier)
    r = g.submit(kick=False)
    fe.clear_events()
    assert fe("x-debug-device-event", dev="vblk", event="kick", queue=0) == {"path": "vhost-kick", "forced": False}
    assert fe.event("X_DEVICE_EVENT_INJECTED")["path"] == "vhost-kick"
    assert g.wait(r["id"])["completed"]
    assert vhost.bqs()["kicks"] == q1["kicks"] + 1

    # the back-end's kick notifier written at the EventNotifier level: its loop sees a kick
    r = g.submit(kick=False)
    kick_n = by_role(be("x-query-device-notifiers", dev=BE_DEV), "host")
    k0 = vhost.bqs()["kicks"]
    be.clear_events()
    assert be("x-debug-device-notifier-write", dev=BE_DEV, id=kick_n["id"]) == \
        {"id": kick_n["id"], "role": "host", "queue": 0}
    assert be.event("X_DEVICE_EVENT_INJECTED") == {"dev": BE_DEV, "queue": 0, "event": "notifier", "forced": True,
                                                    "path": "notifier:host"}
    assert g.wait(r["id"])["completed"]
    assert vhost.bqs()["kicks"] == k0 + 1
    assert "no notifier 999" in str(be.fails("x-debug-device-notifier-write", dev=BE_DEV, id=999))

    # call injected in the back-end: its call fd, the front-end's irqfd, the guest's interrupt
    n0 = g.irqs()
    c0 = vhost.bqs()["calls"]
    be.clear_events()
    assert be("x-debug-device-event", dev=BE_DEV, event="call", queue=0) == {"path": "call-fd", "forced": False}
    assert be.event("X_DEVICE_EVENT_INJECTED")["event"] == "call"
    wait_for(lambda: g.irqs() == n0 + 1, 20, "the back-end's call to interrupt the guest")
    assert vhost.bqs()["calls"] == c0 + 1

    # masked: the front-end has switched the back-end's call fd to its masked notifier and polls
    # it into the PBA; the back-end cannot force past that, the front-end can
    g.mask(True)
    mx0 = fe("x-query-pci-msix", dev="vblk")["entries"][vhost.vector]
    assert mx0["masked"] and not mx0["pending"]
    be("x-debug-device-event", dev=BE_DEV, event="call", queue=0)
    wait_for(lambda: fe("x-query-pci-msix", dev="vblk")["entries"][vhost.vector]["pending"], 20, "the PBA bit")
    assert g.pba() >> vhost.vector & 1
    assert be.fails("x-debug-device-event", dev=BE_DEV, event="call", queue=0, force=True).error_class == \
        "GenericError"
    assert fe("x-debug-device-event", dev="vblk", event="call", queue=0) == {"path": "pba", "forced": False}
    assert fe("x-debug-device-event", dev="vblk", event="call", queue=0, force=True) == \
        {"path": "msi-forced", "forced": True}
    wait_for(lambda: g.irqs() == n0 + 2, 20, "the forced interrupt")
    g.mask(False)
    wait_for(lambda: g.irqs() == n0 + 3, 20, "the pending interrupt, once, on unmask")
    assert not fe("x-query-pci-msix", dev="vblk")["entries"][vhost.vector]["pending"]
    g.io()
    assert g.irqs() == n0 + 4


def test_backend_faults(vhost):
    be, fe, g = vhost.be, vhost.fe, vhost.guest
    g.io()

    # drop-next on the kick path: the back-end consumes the kick and ignores it
    assert be("x-debug-fault", dev=BE_DEV, queue=0, path="kick", action="drop-next") == \
        {"path": "kick", "action": "drop-next", "dropped-so-far": 0}
    k0 = vhost.bqs()["kicks"]
    r = g.submit()
    assert r["kicked"]
    wait_for(lambda: vhost.bqs()["kicks"] == k0 + 1, 20, "the back-end to consume the kick")
    q = vhost.bqs()
    assert q["avail-idx"] == (q["last-avail-idx"] + 1) & 0xFFFF  # the back-end is one behind
    fq = vhost.fqs()  # the front-end sees it too, without asking the back-end
    assert fq["avail-idx"] == (fq["last-avail-idx"] + 1) & 0xFFFF and fq["avail-event"] == q["last-avail-idx"]
    # the front-end's injection writes the kick fd again: recovered
    fe("x-debug-device-event", dev="vblk", event="kick", queue=0)
    assert g.wait(r["id"])["completed"]
    q = vhost.bqs()
    assert q["last-avail-idx"] == q["avail-idx"] == q["used-idx"]

    # drop-all on the kick path, then clear
    be("x-debug-fault", dev=BE_DEV, queue=0, path="kick", action="drop-all")
    k0 = vhost.bqs()["kicks"]
    r = g.submit()
    wait_for(lambda: vhost.bqs()["kicks"] == k0 + 1, 20, "the dropped kick")
    fe("x-debug-device-event", dev="vblk", event="kick", queue=0)  # dropped as well
    wait_for(lambda: vhost.bqs()["kicks"] == k0 + 2, 20, "the second dropped kick")
    q = vhost.bqs()
    assert q["avail-idx"] != q["last-avail-idx"]
    assert be("x-debug-fault", dev=BE_DEV, queue=0, path="kick", action="clear")["dropped-so-far"] == 3
    fe("x-debug-device-event", dev="vblk", event="kick", queue=0)
    assert g.wait(r["id"])["completed"]

    # drop-next on the call path: the back-end completes the request and never writes its call fd
    be("x-debug-fault", dev=BE_DEV, queue=0, path="call", action="drop-next")
    n0 = g.irqs()
    c0 = vhost.bqs()["calls"]
    r = g.submit()
    wait_for(lambda: vhost.bqs()["used-idx-ring"] == vhost.bqs()["avail-idx"], 20, "the back-end to complete it")
    q = vhost.bqs()
    assert q["calls"] == c0 and q["used-idx"] == q["avail-idx"]
    assert q["used-event"] != q["used-idx-ring"]  # the guest has not seen the completion
    assert g.irqs() == n0
    assert not g.wait(r["id"], timeout=0.3)["completed"]
    # the back-end's injected call recovers it
    be("x-debug-device-event", dev=BE_DEV, event="call", queue=0)
    assert g.wait(r["id"])["completed"]
    assert g.irqs() == n0 + 1
    assert "cleared (dropped so far " in be.hmp(f"x-debug-fault {BE_DEV} 0 call clear")
    g.io()


def test_backend_queries_never_stop_the_ring(vhost):
    """No query on either side sends the back-end anything (QEMU's x-query-virtio-queue-status
    would send GET_VRING_BASE, which stops the ring): with I/O running the ring keeps going, and
    when idle an eventfd count no one can consume survives every query."""
    m, be, fe, g = vhost.m, vhost.be, vhost.fe, vhost.guest

    def burst():
        for _ in range(2):
            for mon, path, dev in ((fe, VBLK, "vblk"), (be, BE_PATH, BE_DEV)):
                mon("query-status")
                mon("query-pci")
                mon("x-query-virtio")
                mon("x-query-virtio-status", path=path)
                mon("x-query-virtio-queue-status", path=path, queue=0)
                mon("x-query-virtio-vhost-queue-status", path=path, queue=0)
                mon("x-query-virtio-queue-element", path=path, queue=0)
                mon("x-query-virtio-queue-element", path=path, queue=0, index=5)
                mon("x-query-device-notifiers", dev=dev)
                mon("trace-event-get-state", name="virtio_*")
                for line in (f"info virtio-status {path}", f"info virtio-queue-status {path} 0",
                             f"info virtio-vhost-queue-status {path} 0", f"info virtio-queue-element {path} 0",
                             f"info notifiers {dev}", "info pci", "info virtio"):
                    mon.hmp(line)
            fe("x-query-pci-msix", dev="vblk")
            be("x-query-vhost-user-backend")

    # with a workload running
    m.start_workload(blk={"depth": 8, "read_ratio": 0.5, "stall_timeout": 20.0})
    try:
        wait_for(lambda: vhost.bqs()["used-idx"] > 50, 30, "I/O through the back-end")
        msgs0 = vhost.messages()
        used0 = vhost.bqs()["used-idx"]
        burst()
        assert vhost.messages() == msgs0  # not one message, GET_VRING_BASE least of all
        q = vhost.bqs()
        assert q["started"] and q["enabled"]
        wait_for(lambda: (vhost.bqs()["used-idx"] - used0) & 0xFFFF > 50, 30, "the ring to keep running")
    finally:
        (res,) = m.stop_workload()
    assert res["error_count"] == 0, res["errors"]

    # idle, with a call pending in the irqfd of a stopped guest
    n0 = g.irqs()
    with guest_stopped(m):
        be("x-debug-device-event", dev=BE_DEV, event="call", queue=0)

        def snapshot():
            return (be("x-query-device-notifiers", dev=BE_DEV), fe("x-query-device-notifiers", dev="vblk"),
                    vhost.bqs(), vhost.fqs(), be("x-query-vhost-user-backend"),
                    fe("x-query-pci-msix", dev="vblk"))

        before = snapshot()
        assert by_role(before[0], "guest")["pending"] == 1 and by_role(before[1], "guest")["pending"] == 1
        burst()
        assert snapshot() == before
    wait_for(lambda: g.irqs() == n0 + 1, 20, "the call, once the guest runs")
    assert by_role(be("x-query-device-notifiers", dev=BE_DEV), "guest")["pending"] == 0
    g.io()


def test_backend_quit(vhost):
    be = vhost.be
    be.clear_events()
    assert be("quit") == {}
    assert be.event("SHUTDOWN") == {"guest": False, "reason": "host-qmp-quit"}
    vhost.proc.wait(20)
    assert vhost.proc.returncode == 0
    dev = vhost.m.device("vblk").vdev
    wait_for(lambda: dev.disconnects == 1, 20, "the front-end to notice the back-end left")

