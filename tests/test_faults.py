"""Fault injection in one place (``kickcall.faults``): the registry's own rules, and docs/faults.md
checked against every registry the product has -- each device kind of a machine (a passthrough
vfio-user function included) and the vhost-user back-end, listed through their real monitors (``x-debug-fault {dev}``), and the process-wide one.
Every fault the documentation lists names the test that shows its effect; this file checks that
test exists and is about that fault."""

from __future__ import annotations

import ast
import importlib
import os
import pkgutil
import re
from pathlib import Path

import pytest

import kickcall

from helpers import machine_toml, blk, running_machine, start_vhost_user_blk, stop_process, wait_for_listener
from kickcall.apps.backend_monitor import FAULT_PATHS
from kickcall.faults import (PROCESS, FaultAction, FaultError, FaultErrorKind, FaultKind, FaultRegistry, QueueDrop,
                             Switch)
from kickcall.monitor.client import QMPClient
from kickcall.virtio.blk import make_image
from vfio_env import vfio_server

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "faults.md"


# -- the registry ----------------------------------------------------------------------------------------
def test_a_switch_is_on_until_switched_off_and_refuses_drop_actions():
    r = FaultRegistry("dev0")
    s = r.switch("some-fix", "off: something breaks")
    assert isinstance(s, Switch) and s.kind is FaultKind.FIX_OFF and r.fix_on("some-fix")
    assert r.arm("some-fix", "off") == {"fault": "some-fix", "action": "off", "fix": "off"}
    assert not r.fix_on("some-fix") and not s.fix_on
    r.set_fix("some-fix", True)
    assert r.fix_on("some-fix")
    with pytest.raises(FaultError) as ei:
        r.arm("some-fix", "drop-next")
    assert ei.value.kind is FaultErrorKind.BAD_ACTION


def test_a_queue_drop_loses_exactly_what_it_was_armed_for():
    r = FaultRegistry("dev0")
    d = r.queue_drop("lose-thing", "drop things")
    assert isinstance(d, QueueDrop) and d.kind is FaultKind.INJECTED
    assert not d.take(0)  # nothing armed: nothing dropped
    d.arm(FaultAction.DROP_NEXT, 0)
    d.arm(FaultAction.DROP_NEXT, 0)
    assert [d.take(1), d.take(0), d.take(0), d.take(0)] == [False, True, True, False]
    d.arm(FaultAction.DROP_ALL, 2)
    assert all(d.take(2) for _ in range(5)) and not d.take(0)
    assert r.arm("lose-thing", "clear", 2)["dropped-so-far"] == 5
    assert not d.take(2)
    assert d.state() == {"queues": [{"queue": 0, "drop-next": 0, "drop-all": False, "dropped": 2},
                                    {"queue": 2, "drop-next": 0, "drop-all": False, "dropped": 5}]}
    with pytest.raises(FaultError) as ei:
        d.arm(FaultAction.DROP_NEXT)
    assert ei.value.kind is FaultErrorKind.BAD_QUEUE


@pytest.mark.parametrize("call,kind", [
    (lambda r: r.switch("dup", "x"), FaultErrorKind.DUPLICATE),
    (lambda r: r.get("nope"), FaultErrorKind.UNKNOWN_FAULT),
    (lambda r: r.arm("dup", "explode"), FaultErrorKind.BAD_ACTION),
    (lambda r: r.switch("Bad Name", "x"), FaultErrorKind.BAD_NAME),
    (lambda r: r.fix_on("drops"), FaultErrorKind.BAD_ACTION),
])
def test_registry_errors_carry_a_kind(call, kind):
    r = FaultRegistry("dev0")
    r.switch("dup", "x")
    r.queue_drop("drops", "y")
    with pytest.raises(FaultError) as ei:
        call(r)
    assert ei.value.kind is kind


# -- the documentation against the code --------------------------------------------------------------------
ROW = re.compile(r"^\| *`(?P<name>[a-z0-9-]+)` *\| *(?P<kind>[a-z-]+) *\| *(?P<owner>[^|]+?) *\| *(?P<effect>[^|]+?) *"
                 r"\| *(?P<tests>[^|]+?) *\|$")


def doc_rows() -> list[dict]:
    rows = [m.groupdict() for m in map(ROW.match, DOC.read_text().splitlines()) if m]
    assert rows, "docs/faults.md has no fault table"
    return rows


def code_rows(workdir: str) -> set[tuple[str, str, str, str]]:
    """(owner, name, kind, effect) of every fault, from the registries themselves."""
    for mod in pkgutil.walk_packages(kickcall.__path__, "kickcall."):  # every module registers its PROCESS faults
        if mod.name != "kickcall.__main__":
            importlib.import_module(mod.name)
    out = {("process", f.name, f.kind.value, f.effect) for f in PROCESS}
    img = os.path.join(workdir, "d.img")
    make_image(img, 8 << 20)
    sock, qmp = os.path.join(workdir, "s"), os.path.join(workdir, "be.qmp")
    be = start_vhost_user_blk(sock, img, "--qmp", qmp)
    try:
        wait_for_listener(qmp, be)
        toml = machine_toml(devices=blk("blk0") + '[[device]]\ntype = "virtio-net"\nid = "net0"\n'
                            f'[[device]]\ntype = "virtio-blk"\nid = "vblk"\nbackend = "vhost-user"\nsocket = "{sock}"\n')
        with running_machine(toml, boot=False) as m:
            m.start_monitor(os.path.join(workdir, "m.qmp"))
            with QMPClient(os.path.join(workdir, "m.qmp")).connect(wait=30) as c:
                for dev, owner in (("blk0", "virtio-blk"), ("net0", "virtio-net"), ("vblk", "vhost-user-blk")):
                    for f in c.execute("x-debug-fault", {"dev": dev})["faults"]:
                        out.add((owner, f["name"], f["kind"], f["effect"]))
            with QMPClient(qmp).connect(wait=30) as c:
                (d,) = c.execute("x-query-virtio")
                for f in c.execute("x-debug-fault", {"dev": d["path"]})["faults"]:
                    out.add(("back-end", f["name"], f["kind"], f["effect"]))
    finally:
        stop_process(be)
    with vfio_server(workdir) as (_p, vsock, vqmp):
        with QMPClient(vqmp).connect(wait=30) as c:
            for f in c.execute("x-debug-fault", {"dev": "nic0"})["faults"]:
                out.add(("vfio-user server", f["name"], f["kind"], f["effect"]))
        # the machine's passthrough function (type "vfio-user"), served by that server
        toml = machine_toml(devices=f'[[device]]\ntype = "vfio-user"\nid = "pt0"\nsocket = "{vsock}"\n')
        with running_machine(toml, boot=False) as m:
            m.start_monitor(os.path.join(workdir, "pt.qmp"))
            with QMPClient(os.path.join(workdir, "pt.qmp")).connect(wait=30) as c:
                for f in c.execute("x-debug-fault", {"dev": "pt0"})["faults"]:
                    out.add(("vfio-user", f["name"], f["kind"], f["effect"]))
                for f in c.execute("x-debug-fault", {"dev": "machine"})["faults"]:  # faults of no one device
                    out.add(("machine", f["name"], f["kind"], f["effect"]))
    return out


@pytest.mark.slow
def test_the_documented_faults_are_the_registered_faults(workdir):
    code = code_rows(workdir)
    doc = {(r["owner"], r["name"], r["kind"], r["effect"]) for r in doc_rows()}
    missing = sorted(code - doc)
    extra = sorted(doc - code)
    assert not missing and not extra, (
        "docs/faults.md and the registries disagree.\nrows the doc lacks:\n" +
        "\n".join(f"| `{n}` | {k} | {o} | {e} | tests/... |" for o, n, k, e in missing) +
        "\nrows the code lacks:\n" + "\n".join(map(str, extra)))


def test_every_documented_fault_names_a_test_of_its_effect():
    """Each row's "shown by" cell names test functions (tests/FILE.py::NAME); each exists, and its
    file is about this fault: the fault's name, or the Python name of its switch, appears in it."""
    for r in doc_rows():
        refs = re.findall(r"`(tests/[\w/]+\.py)::(\w+)`", r["tests"])
        assert refs, f"fault {r['name']} names no test"
        switch_names = re.findall(r"`([A-Za-z_][\w.]*)`", r["effect"])
        for path, fn in refs:
            src = (ROOT / path).read_text()
            names = {n.name for n in ast.walk(ast.parse(src)) if isinstance(n, ast.FunctionDef)}
            assert fn in names, f"{path} has no {fn} (named for fault {r['name']})"
            fsrc = next(ast.get_source_segment(src, n) or "" for n in ast.walk(ast.parse(src))
                        if isinstance(n, ast.FunctionDef) and n.name == fn)
            aliases = {f'"{p}"' for p, name in FAULT_PATHS.items() if name == r["name"]}  # x-debug-fault's path form
            assert r["name"] in src or any(s.split(".")[-1] in src for s in switch_names) or \
                any(a in fsrc for a in aliases), f"{path} never mentions fault {r['name']}"
