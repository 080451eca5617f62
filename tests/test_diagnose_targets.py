"""``kickcall diagnose`` before any verdict: what it talks to, what it may send there, and what it says
when a monitor cannot be read (busy, stopped, silent, too old).  Peers here are kickcall's own
machine and back-end processes, plain listening sockets (a monitor held by another client looks
exactly like one that never accepts) and, for monitors kickcall cannot run (QEMU before 7.2), a
scripted QMP peer that says so in its greeting."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import threading
import time

import pytest

from helpers import kickcall_argv, running_machine, spawn, start_vhost_user_blk, stop_process, wait_for
from kickcall.faults import PROCESS
from kickcall.diagnose import targets
from kickcall.diagnose.sample import parse_xp
from kickcall.diagnose.targets import GuardedMonitor, TargetKind, identify
from kickcall.virtio.blk import make_image
from qmp_proxy import RecordingProxy, check, doc_rules

ONE_BLK = """
[machine]
vcpus = 1
[[device]]
type = "virtio-blk"
id = "blk0"
size = "4M"
queues = 1
[workload.blk]
depth = 4
stall-timeout = 600
"""

SRC = os.path.join(os.path.dirname(__file__), "..", "src")


def run_diagnose(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(kickcall_argv("diagnose", "--interval", "0.2", *args), capture_output=True, text=True,
                          timeout=timeout, env=dict(os.environ, PYTHONPATH=SRC))


# ----------------------------------------------------------------------------------------------------
# the table: code, documentation and a recording of real traffic agree
# ----------------------------------------------------------------------------------------------------
def test_documented_table_is_the_code_table():
    doc = open(os.path.join(os.path.dirname(__file__), "..", "docs", "diagnose.md")).read()
    table = doc.split("<!-- allowed-queries -->\n", 1)[1].split("\n<!-- /allowed-queries -->", 1)[0]
    assert table.strip() == targets.allowed_table().strip(), "docs/diagnose.md's table is out of date"
    _rules, types = doc_rules()
    assert types == set(targets.EMULATED_ONLY_TYPES)
    # the one query that stops a vhost ring is only ever allowed on emulated devices
    (qs,) = [q for q in targets.ALLOWED[TargetKind.QEMU] if q.command == "x-query-virtio-queue-status"]
    assert qs.emulated_only
    for kind in (TargetKind.QEMU, TargetKind.QEMU_STORAGE_DAEMON, TargetKind.QEMU_WITHOUT_VIRTIO_QUERIES):
        assert not {"x-query-virtio-queue-element", "x-debug-device-event", "stop", "cont", "system_reset", "quit"} \
            & {q.command for q in targets.ALLOWED[kind]}


QEMU72 = {"qemu": {"major": 7, "minor": 2, "micro": 22}, "package": "Debian 1:7.2+dfsg-7+deb12u18"}


@pytest.mark.parametrize("version,commands,kind", [
    (QEMU72, ["query-status", "x-query-virtio", "query-commands"], TargetKind.QEMU),
    ({"qemu": {"major": 6, "minor": 2, "micro": 0}, "package": ""}, ["query-status"],
     TargetKind.QEMU_WITHOUT_VIRTIO_QUERIES),
    (QEMU72, ["query-block-exports", "block-export-add"], TargetKind.QEMU_STORAGE_DAEMON),
    ({"qemu": {"major": 0, "minor": 8, "micro": 0}, "package": "kickcall 0.8.0"}, ["query-status", "x-query-virtio"],
     TargetKind.KICKCALL_MACHINE),
    ({"qemu": {"major": 0, "minor": 8, "micro": 0}, "package": "kickcall 0.8.0"},
     ["query-status", "x-query-vhost-user-backend"], TargetKind.KICKCALL_BACKEND),
    ({"qemu": {"major": 9, "minor": 0, "micro": 0}, "package": "other"}, ["query-something"], TargetKind.UNKNOWN),
    ("junk", "junk", TargetKind.UNKNOWN),
])
def test_identify(version, commands, kind):
    cmds = [{"name": c} for c in commands] if isinstance(commands, list) else commands
    assert identify({"version": version}, version, cmds).kind is kind


class _Rec:
    def __init__(self) -> None:
        self.sent: list[str] = []

    def execute(self, command, arguments=None):
        self.sent.append(command)
        return None


@pytest.mark.parametrize("forbid", [True, False])
def test_guard_never_sends_queue_status_to_a_vhost_device(monkeypatch, forbid):
    """The switch of the fix: off, the guard lets x-query-virtio-queue-status reach a vhost device."""
    monkeypatch.setattr(PROCESS.get("forbid-vhost-queue-status"), "fix_on", forbid)
    rec = _Rec()
    g = GuardedMonitor(rec, TargetKind.QEMU)
    g.emulated_paths.add("/machine/peripheral/emu/virtio-backend")
    g.execute("x-query-virtio-queue-status", {"path": "/machine/peripheral/emu/virtio-backend", "queue": 0})
    args = {"path": "/machine/peripheral/vblk/virtio-backend", "queue": 0}
    if forbid:
        with pytest.raises(targets.ForbiddenQuery):
            g.execute("x-query-virtio-queue-status", args)
    else:
        g.execute("x-query-virtio-queue-status", args)
    for cmd, a in [("stop", None), ("x-query-virtio-queue-element", {"path": "x", "queue": 0}),
                   ("human-monitor-command", {"command-line": "info registers"}),
                   ("human-monitor-command", {"command-line": "xp /1hx 0x1000; quit"}),
                   ("qom-get", {"path": "/machine", "property": "kernel"}), ("x-debug-device-event", {})]:
        with pytest.raises(targets.ForbiddenQuery):
            g.execute(cmd, a)
    assert rec.sent == ["x-query-virtio-queue-status"] * (1 if forbid else 2)


def test_parse_xp():
    assert parse_xp("0000000000001000: 0x0001 0x0002\r\n", 2) == [1, 2]
    assert parse_xp("00000000000ff000: 0xffff\r\n", 1) == [0xFFFF]
    assert parse_xp("Cannot access memory\r\n", 1) is None
    assert parse_xp(None, 1) is None and parse_xp("0: 0x1", 2) is None


@pytest.mark.slow
@pytest.mark.parametrize("fix", [False, True])
def test_recording_proxy_on_a_kickcall_machine(workdir, fix):
    """Every command diagnose sends to a kickcall machine is in the documented table for it."""
    qmp, prox = os.path.join(workdir, "m.qmp"), os.path.join(workdir, "p.qmp")
    with running_machine(ONE_BLK) as m:
        m.start_monitor(qmp)
        with RecordingProxy(prox, qmp) as p:
            if fix:  # a lost call, so that --fix has something to inject
                from kickcall.monitor.client import QMPClient

                m.start_workload(blk=dict(m.cfg.workload_blk), net=None)
                used = lambda: m.device("blk0").vdev.queues[0].used_idx  # noqa: E731
                wait_for(lambda: used() > 100, 30, "I/O")
                with QMPClient(qmp).connect() as c:
                    c.execute("x-debug-fault", {"dev": "blk0", "queue": 0, "path": "call", "action": "drop-next"})
            r = run_diagnose("--qmp", prox, "--json", *(["--fix"] if fix else []))
            assert r.returncode in (0, 1), r.stderr
            rep = json.loads(r.stdout)
            assert rep["targets"][0]["kind"] == "kickcall-machine"
            assert p.sent and check(p.sent, "kickcall-machine", fix=fix) == []
            assert ("x-debug-device-event" in {s.command for s in p.sent}) == (fix and rep["queues"][0]["verdict"]
                                                                              == "lost call")
            # and the table does bite: a command it does not list is caught
            from qmp_proxy import Sent
            assert check([Sent("system_reset", {})], "kickcall-machine") == ["system_reset {}"]
            assert check([Sent("x-debug-device-event", {})], "kickcall-machine", fix=False)
        if fix:
            m.stop_workload()


# ----------------------------------------------------------------------------------------------------
# monitors that cannot be read
# ----------------------------------------------------------------------------------------------------
def test_busy_monitor_is_named_with_its_process(workdir):
    """A socket that accepts and never greets: what QEMU's QMP looks like while another client holds
    it.  (QEMU itself: tests/test_diagnose_field.py.)"""
    path = os.path.join(workdir, "busy.qmp")
    ls = socket.socket(socket.AF_UNIX)
    ls.bind(path)
    ls.listen(4)  # never accepted: connect() succeeds through the backlog, no greeting ever comes
    try:
        r = run_diagnose("--qmp", path, "--timeout", "3", "--json")
        assert r.returncode == 2, r.stderr
        (t,) = json.loads(r.stdout)["targets"]
        assert t["problem"] == "busy" and t["pid"] == os.getpid(), t
        assert "one QMP client at a time" in t["detail"] and "second monitor" in t["detail"]
        r = run_diagnose("--qmp", path, "--timeout", "3")
        assert "BUSY" in r.stdout and f"pid {os.getpid()}" in r.stdout, r.stdout
    finally:
        ls.close()


def _scripted(path: str, greeting: dict | None, replies: dict) -> tuple[socket.socket, threading.Thread]:
    """A QMP peer that greets with *greeting* and answers commands from *replies* (None: never)."""
    ls = socket.socket(socket.AF_UNIX)
    ls.bind(path)
    ls.listen(4)

    def serve() -> None:
        while True:
            try:
                c, _ = ls.accept()
            except OSError:
                return
            with c:
                if greeting is not None:
                    c.sendall(json.dumps({"QMP": greeting}).encode() + b"\r\n")
                buf = b""
                dec = json.JSONDecoder()
                while True:
                    try:
                        d = c.recv(4096)
                    except OSError:
                        break
                    if not d:
                        break
                    buf += d
                    while buf.strip():
                        try:
                            obj, end = dec.raw_decode(buf.decode().lstrip())
                        except json.JSONDecodeError:
                            break
                        buf = buf.decode().lstrip()[end:].encode()
                        ans = replies.get(obj.get("execute"), {"error": {"class": "CommandNotFound", "desc": "no"}})
                        if ans is None:
                            continue  # greeted, and then silent
                        c.sendall(json.dumps(dict(ans, id=obj.get("id"))).encode() + b"\r\n")

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    return ls, t


def test_old_qemu_and_silent_monitors(workdir):
    old = {"version": {"qemu": {"major": 6, "minor": 2, "micro": 0}, "package": "Debian 1:6.2"}, "capabilities": []}
    p1, p2 = os.path.join(workdir, "old.qmp"), os.path.join(workdir, "silent.qmp")
    ls1, t1 = _scripted(p1, old, {"qmp_capabilities": {"return": {}}, "query-version": {"return": old["version"]},
                                  "query-commands": {"return": [{"name": "query-status"}]},
                                  "query-status": {"return": {"status": "running", "running": True}}})
    ls2, t2 = _scripted(p2, old, {"qmp_capabilities": {"return": {}}, "query-version": None})
    try:
        r = run_diagnose("--qmp", p1, "--qmp", p2, "--timeout", "3", "--json")
        assert r.returncode == 2, r.stderr
        ts = {t["socket"]: t for t in json.loads(r.stdout)["targets"]}
        assert ts[p1]["kind"] == "qemu-without-virtio-queries" and ts[p1]["problem"] == "no virtio queries"
        assert "7.2" in ts[p1]["detail"] and ts[p1]["run-state"] == "running"
        assert ts[p2]["problem"] == "not answering" and f"pid {os.getpid()}" in ts[p2]["detail"], ts[p2]
    finally:
        ls1.close()
        ls2.close()


@pytest.mark.slow
def test_stopped_backend_is_named_and_timeout_bounds_the_connection(workdir):
    img, sock, qmp = (os.path.join(workdir, n) for n in ("d.img", "vb.sock", "be.qmp"))
    make_image(img, 1 << 20)
    be = start_vhost_user_blk(sock, img, "--qmp", qmp)
    try:
        wait_for(lambda: os.path.exists(qmp), 30, "the back-end's monitor")
        os.kill(be.pid, signal.SIGSTOP)
        wait_for(lambda: open(f"/proc/{be.pid}/stat").read().rsplit(")", 1)[1].split()[0] == "T", 10, "SIGSTOP")
        r = run_diagnose("--qmp", qmp, "--timeout", "2", "--json")
        assert r.returncode == 2, r.stderr
        (t,) = json.loads(r.stdout)["targets"]
        assert t["problem"] == "process stopped" and t["pid"] == be.pid, t
        assert f"kill -CONT {be.pid}" in t["detail"]
        # a target SIGSTOPped after it greeted: the round is still bounded by --timeout
        os.kill(be.pid, signal.SIGCONT)
        t0 = time.monotonic()
        d = spawn(kickcall_argv("diagnose", "--qmp", qmp, "--timeout", "4", "--interval", "0.2", "--json",
                                "--samples", "1000"), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            time.sleep(0.5)  # let it connect; then the monitor stops answering mid-round
            os.kill(be.pid, signal.SIGSTOP)
            out, err = d.communicate(timeout=60)
        finally:
            stop_process(d)
        elapsed = time.monotonic() - t0
        assert d.returncode == 2, err
        (t,) = json.loads(out)["targets"]
        assert t["problem"] in ("process stopped", "not answering") and t["pid"] == be.pid, t
        assert elapsed < 60
    finally:
        os.kill(be.pid, signal.SIGCONT)
        stop_process(be)


# ----------------------------------------------------------------------------------------------------
# the command line
# ----------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_fleet_output_exit_statuses_and_ndjson(workdir):
    qmp = os.path.join(workdir, "m.qmp")
    with running_machine(ONE_BLK) as m:
        m.start_monitor(qmp)
        r = run_diagnose("--qmp", qmp, "--dev", "nosuch")
        assert r.returncode == 2 and "no virtio device 'nosuch'" in r.stderr and "blk0" in r.stderr, r.stderr
        r = run_diagnose("--qmp", qmp, "--dev", "blk0", "--queue", "7")
        assert r.returncode == 2 and "no queue 7" in r.stderr, r.stderr
        r = run_diagnose("--qmp", qmp, "--queue", "-1")
        assert r.returncode == 2 and "--queue" in r.stderr
        # a line per monitor, one per queue, then a summary; -v adds the evidence
        r = run_diagnose("--qmp", qmp, "--dev", "blk0")
        assert r.returncode == 0, r.stderr
        lines = r.stdout.strip().splitlines()
        assert len(lines) == 3 and lines[0] == f"{qmp}: kickcall-machine, running", r.stdout
        assert lines[1] == "  blk0 q0: idle -- nothing outstanding" and lines[2].endswith("no stalled queue among 1")
        r = run_diagnose("--qmp", qmp, "--dev", "blk0", "-v")
        assert len(r.stdout.strip().splitlines()) > 3 and "    - " in r.stdout
        # --watch --json: NDJSON, a round and a timestamp per line, numbers as numbers
        r = run_diagnose("--qmp", qmp, "--watch", "--json", "--count", "3", "--samples", "2")
        docs = [json.loads(x) for x in r.stdout.strip().splitlines()]
        assert [d["round"] for d in docs] == [1, 2, 3] and all(d["schema"] == 1 for d in docs)
        assert all(re.match(r"\d{4}-\d\d-\d\dT", d["time"]) for d in docs)
        q = docs[-1]["queues"][0]
        assert isinstance(q["facts"]["avail-idx"], int) and isinstance(q["facts"]["vring-num"], int)
        # Ctrl-C: 130, quietly
        d = spawn(kickcall_argv("diagnose", "--qmp", qmp, "--watch"), stdout=subprocess.PIPE,
                  stderr=subprocess.PIPE, text=True)
        try:
            wait_for(lambda: d.stdout.readline() != "", 60, "a first line")
            d.send_signal(signal.SIGINT)
            _out, err = d.communicate(timeout=60)
            assert d.returncode == 130 and "Traceback" not in err, err
        finally:
            stop_process(d)


@pytest.mark.slow
def test_qemu_storage_daemon_is_named_and_left_alone(workdir):
    """qemu-storage-daemon greets exactly as QEMU does; its command list tells them apart.  It has
    no ring state to read: diagnose lists its exports, says so, and sends nothing else."""
    from kickcall.peers.qsd import QSD

    img = os.path.join(workdir, "q.img")
    make_image(img, 1 << 20)
    with QSD(img, os.path.join(workdir, "qsd.sock"), qmp_path=os.path.join(workdir, "qsd.qmp")) as qsd:
        with RecordingProxy(os.path.join(workdir, "p.qmp"), qsd.qmp_path) as p:
            r = run_diagnose("--qmp", p.path, "--json", "--timeout", "5")
            assert check(p.sent, "qemu-storage-daemon") == [], check(p.sent, "qemu-storage-daemon")
        assert r.returncode == 2, r.stderr
        (t,) = json.loads(r.stdout)["targets"]
        assert t["kind"] == "qemu-storage-daemon" and t["problem"] == "no ring state", t
        assert "exp0 (vhost-user-blk" in t["detail"] and "front-end" in t["detail"], t


def test_paths_that_are_not_monitors(workdir):
    f, d = os.path.join(workdir, "disk.img"), os.path.join(workdir, "adir")
    open(f, "wb").close()
    os.mkdir(d)
    r = run_diagnose("--qmp", f, "--qmp", d, "--json", "--timeout", "3")
    assert r.returncode == 2, r.stderr
    ts = {t["socket"]: t for t in json.loads(r.stdout)["targets"]}
    assert ts[f]["problem"] == "not a socket" and "a regular file" in ts[f]["detail"]
    assert ts[d]["problem"] == "not a socket" and "a directory" in ts[d]["detail"]
    assert os.path.getsize(f) == 0 and os.listdir(d) == []  # nothing touched
    r = run_diagnose("--qmp", "")
    assert r.returncode == 2 and "empty path" in r.stderr
    r = run_diagnose("--qmp", "/tmp/" + "x" * 120)
    assert r.returncode == 2 and "107 bytes" in r.stderr


def test_full_backlog_is_busy_and_a_refused_handshake_is_not_qmp(workdir):
    path = os.path.join(workdir, "full.qmp")
    ls = socket.socket(socket.AF_UNIX)
    ls.bind(path)
    ls.listen(0)
    waiting = []
    try:
        for _ in range(4):  # fill the backlog: the next connect() would block
            c = socket.socket(socket.AF_UNIX)
            c.setblocking(False)
            try:
                c.connect(path)
                waiting.append(c)
            except BlockingIOError:
                c.close()
                break
        r = run_diagnose("--qmp", path, "--json", "--timeout", "3")
        assert r.returncode == 2, r.stderr
        (t,) = json.loads(r.stdout)["targets"]
        assert t["problem"] == "busy" and "backlog is full" in t["detail"], t
    finally:
        for c in waiting:
            c.close()
        ls.close()
    p2 = os.path.join(workdir, "rude.qmp")
    g = {"version": {"qemu": {"major": 7, "minor": 2, "micro": 0}, "package": ""}, "capabilities": []}
    ls2, _t = _scripted(p2, g, {})  # every command, qmp_capabilities included, is CommandNotFound
    try:
        r = run_diagnose("--qmp", p2, "--json", "--timeout", "3")
        assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
        (t,) = json.loads(r.stdout)["targets"]
        assert t["problem"] == "not a QMP monitor" and "qmp_capabilities" in t["detail"], t
    finally:
        ls2.close()


@pytest.mark.slow
def test_a_vhost_user_socket_given_as_the_monitor(workdir):
    """An easy mix-up: the back-end's vhost-user socket instead of its monitor.  It never greets;
    diagnose says it may not be a QMP socket, and the back-end is not disturbed."""
    img, sock = os.path.join(workdir, "d.img"), os.path.join(workdir, "vb.sock")
    make_image(img, 1 << 20)
    be = start_vhost_user_blk(sock, img)
    try:
        r = run_diagnose("--qmp", sock, "--json", "--timeout", "2")
        assert r.returncode == 2, r.stderr
        (t,) = json.loads(r.stdout)["targets"]
        assert t["problem"] == "busy" and "not a QMP socket" in t["detail"] and t["pid"] == be.pid, t
        assert be.poll() is None
    finally:
        stop_process(be)
