"""Threads are named (Python and kernel), and every thread of kickcall's processes is listed in
docs/threads.md (issue 9, item 5)."""

from __future__ import annotations

import concurrent.futures
import os
import re
import subprocess
import threading

import pytest

from helpers import kickcall_argv, spawn, start_vhost_user_blk, stop_process, wait_for, wait_for_listener
from kickcall.faults import PROCESS
from kickcall import threads
from kickcall.monitor.client import QMPClient

DOC = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "docs", "threads.md")

def _own_comm(t: threading.Thread) -> str:
    with open(f"/proc/self/task/{t.native_id}/comm") as f:
        return f.read().strip()


@pytest.mark.parametrize("set_os_name", [True, False])
def test_a_named_thread_has_its_name_in_the_kernel(monkeypatch, set_os_name):
    """Python's threading.Thread(name=...) leaves the kernel name unset; kickcall.threads sets it."""
    monkeypatch.setattr(PROCESS.get("name-os-threads"), "fix_on", set_os_name)
    seen: dict[str, str] = {}
    go = threading.Event()

    def body() -> None:
        seen["comm"] = _own_comm(threading.current_thread())
        go.wait(30)

    t = threads.start_thread(body, "kc-test7")
    try:
        wait_for(lambda: "comm" in seen, 30, "the thread to read its name")
        assert t.name == "kc-test7" and t.daemon
        if set_os_name:
            assert seen["comm"] == "kc-test7"
        else:
            assert seen["comm"] != "kc-test7"
    finally:
        go.set()
        t.join(30)


@pytest.mark.parametrize("set_os_name", [True, False])
def test_pool_workers_are_named(monkeypatch, set_os_name):
    monkeypatch.setattr(PROCESS.get("name-os-threads"), "fix_on", set_os_name)
    barrier = threading.Barrier(3, timeout=30)

    def work() -> tuple[str, str]:
        barrier.wait()  # three workers at once, so three threads exist
        return threading.current_thread().name, _own_comm(threading.current_thread())

    with threads.named_pool("kc-pool", 3) as pool:
        got = sorted(pool.map(lambda _: work(), range(3)))
    assert [py for py, _ in got] == ["kc-pool0", "kc-pool1", "kc-pool2"]
    if set_os_name:
        assert [comm for _, comm in got] == ["kc-pool0", "kc-pool1", "kc-pool2"]
    else:
        assert not any(comm.startswith("kc-pool") for _, comm in got)


def test_names_the_kernel_would_cut_are_refused():
    with pytest.raises(threads.ThreadNameError):
        threads.named_thread(lambda: None, "kc-" + "x" * 13)  # 16 bytes
    with pytest.raises(threads.ThreadNameError):
        threads.pool_initializer("kc-qmp-exec-xy", 11)  # worker 10 would be kc-qmp-exec-xy10: 16 bytes
    with pytest.raises(threads.ThreadNameError):
        threads.named_thread(lambda: None, "")
    threads.pool_initializer("kc-qmp-exec", 8)  # the monitor's executor: kc-qmp-exec0..7
    assert isinstance(threads.named_pool("kc-x", 1), concurrent.futures.ThreadPoolExecutor)


# -- the inventory ----------------------------------------------------------------------------------
def documented_names(path: str = DOC) -> list[re.Pattern[str]]:
    """The names in the first column of docs/threads.md's tables (`kc-vcpu<N>` -> kc-vcpu[0-9]+)."""
    pats = []
    with open(path) as f:
        for line in f:
            if not line.startswith("|"):
                continue
            first = line.split("|")[1]
            for name in re.findall(r"`([^`]+)`", first):
                parts = re.split(r"<N>", name)
                pats.append(re.compile("[0-9]+".join(re.escape(p) for p in parts) + r"\Z"))
    return pats


def test_the_document_parses():
    pats = documented_names()
    names = ["kc-loop", "kc-vcpu0", "kc-vcpu12", "kc-aio3", "kc-hvchan", "kc-qmp", "kc-qmp-exec7", "kc-be-req",
             "kc-cpu1-task"]
    for n in names:
        assert any(p.match(n) for p in pats), n
    for n in ["kc-vcpu", "kc-vcpux", "python", "kc-loop2"]:
        assert not any(p.match(n) for p in pats), n
    with open(DOC) as f:  # every documented name fits the kernel's limit, with a two-digit index
        for line in f:
            if line.startswith("| `"):
                for name in re.findall(r"`([^`]+)`", line.split("|")[1]):
                    threads.check_name(name.replace("<N>", "99"))


def task_comms(pid: int) -> dict[int, str]:
    out = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/comm") as f:
                out[int(tid)] = f.read().strip()
        except OSError:  # the thread ended meanwhile
            pass
    return out


def children(pid: int) -> list[int]:
    kids = []
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/children") as f:
                kids += [int(x) for x in f.read().split()]
        except OSError:
            pass
    return kids


def undocumented(pid: int, pats: list[re.Pattern[str]]) -> list[str]:
    """Names of threads other than the main thread that docs/threads.md does not list."""
    bad: list[str] = []
    for tid, comm in sorted(task_comms(pid).items()):
        if tid == pid:  # the main thread keeps the process's name
            continue
        if not any(p.match(comm) for p in pats):
            bad.append(comm)
    return bad


def test_every_thread_of_a_machine_and_a_backend_is_documented(workdir):
    """A `kickcall run --qmp` machine with a local virtio-blk (aio threads), a socketpair
    virtio-net (echo peer) and a vhost-user disk served by `kickcall vhost-user-blk --qmp`; both
    monitors connected and used; then every thread of the VMM, its guest process and the back-end
    must carry a name the threads document lists."""
    img, sock, be_qmp, m_qmp, cfg, vsock, v_qmp = (os.path.join(workdir, n) for n in
                                                   ("disk.img", "vblk.sock", "be.qmp", "m.qmp", "m.toml", "nic.sock",
                                                    "nic.qmp"))
    with open(img, "wb") as f:
        f.truncate(4 << 20)
    with open(cfg, "w") as f:
        f.write(f"""
[machine]
ram = "64M"
vcpus = 2
guest = "process"
[[device]]
type = "virtio-blk"
id = "blk0"
size = "4M"
queues = 2
[[device]]
type = "virtio-net"
id = "net0"
backend = "socketpair"
[[device]]
type = "virtio-blk"
id = "vblk"
backend = "vhost-user"
socket = "{sock}"
[[device]]
type = "vfio-user"
id = "nic0"
socket = "{vsock}"
""")
    pats = documented_names()
    be_log, vm_log = open(os.path.join(workdir, "be.log"), "wb"), open(os.path.join(workdir, "vm.log"), "wb")
    be = start_vhost_user_blk(sock, img, "--qmp", be_qmp, stdout=be_log, stderr=subprocess.STDOUT)
    vfu = spawn(kickcall_argv("vfio-user-server", "--socket", vsock, "--qmp", v_qmp), stdout=subprocess.DEVNULL)
    vm = None
    try:
        wait_for_listener(be_qmp, be)
        wait_for_listener(v_qmp, vfu)
        vm = spawn(kickcall_argv("run", cfg, "--plain", "--duration", "300", "--qmp", m_qmp),
                   stdout=vm_log, stderr=subprocess.STDOUT)
        wait_for_listener(m_qmp, vm, 120)
        with QMPClient(be_qmp).connect() as cb, QMPClient(m_qmp).connect() as cm:
            assert cb.execute("query-status")["status"] == "running"  # type: ignore[index]
            wait_for(lambda: cm.execute("query-status")["status"] == "running", 120,  # type: ignore[index]
                     "the machine to run")
            # the machine has booted and its workload runs: its vCPU exits, the back-end's
            # BACKEND_REQ channel and the guest's tasks exist
            guests = wait_for(lambda: children(vm.pid), 60, "the guest process")
            wait_for(lambda: any(re.fullmatch(r"kc-vcpu[0-9]+", c) for c in task_comms(vm.pid).values()), 120,
                     "a VMM vCPU thread")
            seen: dict[str, list[str]] = {}
            with QMPClient(v_qmp).connect() as cv:  # the server's monitor in use too
                cv.execute("x-query-vfio", {"dev": "nic0"})
            for who, pid in [("VMM", vm.pid), ("back-end", be.pid), ("vfio-user server", vfu.pid)] + \
                    [("guest", g) for g in guests]:
                comms = task_comms(pid)
                seen[who] = sorted(comms.values())
                bad = undocumented(pid, pats)
                assert not bad, (f"{who} (pid {pid}) has threads docs/threads.md does not list: {bad}; "
                                 f"all: {seen[who]}")
            assert "kc-loop" in seen["VMM"] and "kc-loop" in seen["back-end"], seen
            assert "kc-qmp" in seen["VMM"] and "kc-qmp" in seen["back-end"], seen  # both monitors served
            assert any(c.startswith("kc-qmp-exec") for c in seen["VMM"] + seen["back-end"]), seen
            assert "kc-hvchan" in seen["VMM"] and any("kc-hvchan" in seen[w] for w in seen if w == "guest"), seen
            assert "kc-be-req" in seen["VMM"] and "kc-net-peer" in seen["VMM"], seen
            assert any(c.startswith("kc-aio") for c in seen["VMM"]), seen
            assert "kc-vfu-client" in seen["VMM"] and "kc-vfu-twin" in seen["VMM"], seen
            assert {"kc-vfu-accept", "kc-vfu-conn", "kc-nic-engine", "kc-qmp"} <= set(seen["vfio-user server"]), seen
    finally:
        if vm is not None:
            stop_process(vm, 30)
        stop_process(be, 30)
        stop_process(vfu, 30)
        be_log.close()
        vm_log.close()
