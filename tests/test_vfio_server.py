"""``kickcall vfio-user-server`` in its own process, driven by kickcall's vfio-user client.

* DMA to a window mapped without an fd goes by DMA_WRITE messages, on the twin socket or on the
  main socket between a client's commands and their replies, and nothing deadlocks;
* an eventfd array longer than the server's ``max_msg_fds`` is split as QEMU's client splits it
  and every piece lands where it belongs;
* a client killed with SIGKILL mid-traffic: the server unmaps its DMA, closes its fds and frees
  its host vectors; the device state is kept for the next client (the specification's rule), or
  reset with ``--reset-on-disconnect`` (vfio-pci's release rule);
* one client at a time.

The specification-only client's tests (tests/test_vfio_spec_server.py) cover the wire rules.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import textwrap

import pytest

from helpers import SRC, wait_for
from kickcall.vfio import nic as N
from kickcall.vfio.client import VfioUserClient
from kickcall.vfio.uapi import VfioIrqSetFlag as F
from kickcall.vfio.uapi import VfioPciIrqIndex as IX
from vfio_env import NicRegs, host_view, process_fd_count, records, vfio_server

TRIGGER = F.DATA_EVENTFD | F.ACTION_TRIGGER


class BytesMemory:
    """Client memory for DMA_READ / DMA_WRITE: one bytearray at a base address."""

    def __init__(self, base: int, size: int) -> None:
        self.base = base
        self.buf = bytearray(size)
        self.writes = 0

    def read(self, addr: int, n: int) -> bytes:
        off = addr - self.base
        if off < 0 or off + n > len(self.buf):
            raise ValueError("outside client memory")
        return bytes(self.buf[off:off + n])

    def write(self, addr: int, data: bytes) -> None:
        off = addr - self.base
        if off < 0 or off + len(data) > len(self.buf):
            raise ValueError("outside client memory")
        self.buf[off:off + len(data)] = data
        self.writes += 1


@pytest.mark.parametrize("twin", [True, False], ids=["twin-socket", "main-socket"])
def test_dma_by_message_while_client_commands_are_pending(workdir, twin):
    args = [] if twin else ["--no-twin-socket"]
    mem = BytesMemory(0x10000, 0x10000)
    with vfio_server(workdir, *args) as (_p, sock, qmp):
        c = VfioUserClient(sock, memory=mem)
        try:
            assert (c.twin is not None) == twin
            c.dma_map(0x10000, 0x10000)  # no fd: the server must use DMA_WRITE messages
            regs = NicRegs(c)
            regs.bus_master()
            regs.setup_queue(0, 0x10000, 1024, 0)
            efd = os.eventfd(0, os.EFD_NONBLOCK)
            try:
                c.set_irqs(IX.MSIX, TRIGGER, 0, 1, fds=[efd])
                regs.doorbell(0, 1000)
                # keep client commands in flight while the server's DMA_WRITEs arrive
                wait_for(lambda: regs.producer(0) == 1000, 120, "1000 records by DMA_WRITE")
            finally:
                os.close(efd)
            got = records(mem.buf, 1000)
            assert [r[0] for r in got] == list(range(1, 1001))
            assert mem.writes >= 1000 // N.NicFunction.BATCH
            assert c.stats["dma-write"] == mem.writes
            srv = host_view(qmp)["server"]
            assert srv["stats"]["dma_messages"] >= mem.writes and srv["stats"]["framing_errors"] == 0
        finally:
            c.close()


def test_eventfd_array_split_by_max_msg_fds(workdir):
    n = 40
    with vfio_server(workdir, "--vectors", str(n), "--max-msg-fds", "4") as (_p, sock, qmp):
        c = VfioUserClient(sock)
        efds = [os.eventfd(0, os.EFD_NONBLOCK) for _ in range(n)]
        try:
            assert c.server_caps.max_msg_fds == 4
            fds = [-1 if v in (5, 6, 7, 8, 9, 20) else efds[v] for v in range(n)]
            msgs = c.set_irqs(IX.MSIX, TRIGGER, 0, n, fds=fds)
            # runs: 0-4 (5 fds: 4+1), 5-9 (-1 x5: 4+1), 10-19 (10: 4+4+2), 20 (-1), 21-39 (19: 4*4+3)
            assert msgs == 2 + 2 + 3 + 1 + 5
            host = host_view(qmp)["host"]
            wired = {v["vector"] for v in host["vectors"] if v["trigger-fd"] is not None}
            assert wired == {v for v in range(n) if fds[v] != -1}
            assert host["set-irqs"]["by-result"].get("ok") == msgs, host["set-irqs"]
        finally:
            c.close()
            for fd in efds:
                os.close(fd)


CLIENT = textwrap.dedent("""
    import mmap, os, sys, time
    from kickcall.vfio.client import VfioUserClient
    from kickcall.vfio.uapi import VfioIrqSetFlag as F
    sys.path.insert(0, sys.argv[2])
    from vfio_env import NicRegs
    c = VfioUserClient(sys.argv[1])
    _info, bar4 = c.get_region_info(4)  # the BAR4 memfd comes with it (a dup the server must not keep)
    mem = os.memfd_create("guest-ram"); os.ftruncate(mem, 1 << 20)
    c.dma_map(0x100000, 1 << 20, mem, 0)
    regs = NicRegs(c)
    regs.bus_master()
    fds = [os.eventfd(0, os.EFD_NONBLOCK) for _ in range(4)]
    c.set_irqs(2, F.DATA_EVENTFD | F.ACTION_TRIGGER, 0, 4, fds=fds)
    for q in range(4):
        regs.setup_queue(q, 0x100000 + q * 0x10000, 256, q)
        regs.w32(regs.q(q, 0x20), 2000)  # RATE: records keep coming; nobody consumes: the rings fill
    print("ready", flush=True)
    time.sleep(3600)
""")


def _start_client(sock: str) -> subprocess.Popen:
    tests_dir = os.path.dirname(os.path.abspath(__file__))
    p = subprocess.Popen([sys.executable, "-c", CLIENT, sock, tests_dir], stdout=subprocess.PIPE,
                         env=dict(os.environ, PYTHONPATH=SRC), process_group=0)
    assert p.stdout is not None
    line = p.stdout.readline()
    assert line.strip() == b"ready", line
    return p


@pytest.mark.parametrize("reset", [False, True], ids=["keep-state", "reset-on-disconnect"])
def test_client_killed_mid_traffic(workdir, reset):
    args = ["--vectors", "8", "--host-irqs", "8"] + (["--reset-on-disconnect"] if reset else [])
    with vfio_server(workdir, *args) as (p, sock, qmp):
        baseline = process_fd_count(p.pid)
        cl = _start_client(sock)
        try:
            wait_for(lambda: all(q["producer"] > 0 for q in host_view(qmp)["nic"]["queues"]), 60, "traffic")
            busy = host_view(qmp)
            assert busy["server"]["client"]["dma"] and len(busy["host"]["vectors"]) == 4
            assert busy["host"]["pool"]["free"] == 4
        finally:
            cl.send_signal(signal.SIGKILL)
            cl.wait(30)
            if cl.stdout is not None:
                cl.stdout.close()
        wait_for(lambda: not host_view(qmp)["server"]["connected"], 30, "the server noticing the client is gone")
        after = host_view(qmp)
        host = after["host"]
        assert "client" not in after["server"]  # its DMA windows went with it
        assert host["vectors"] == [] and host["irq-type"] == "none"  # fds closed, vectors freed
        assert host["pool"]["free"] == 8
        wait_for(lambda: process_fd_count(p.pid) == baseline, 30, "the server's fds back to the baseline")
        # what the next client finds
        c = VfioUserClient(sock)
        try:
            regs = NicRegs(c)
            ring_lo = regs.r32(regs.q(1, N.Q_RING_LO))
            enable = regs.r32(regs.q(1, N.Q_ENABLE))
            cmd = int.from_bytes(c.region_read(7, 4, 2), "little")
            view = host_view(qmp)
        finally:
            c.close()
        msix = view["nic"]["msix"]
        assert not msix["enabled"] and view["host"]["msix-pba"].strip("0") == ""  # freed: MSI-X off, PBA clear
        if reset:
            assert (ring_lo, enable, cmd & 0x4) == (0, 0, 0)  # config and registers at reset values
            assert all(q["producer"] == 0 for q in view["nic"]["queues"])
            assert all(e["masked"] for e in msix["vectors"])
        else:
            assert (ring_lo, enable, cmd & 0x4) == (0x110000, 1, 0x4)  # state kept for a reconnect
            assert all(q["producer"] > 0 for q in view["nic"]["queues"])
        assert view["host"]["pool"]["free"] == 8


def test_one_client_at_a_time(workdir):
    with vfio_server(workdir) as (_p, sock, qmp):
        c = VfioUserClient(sock)
        try:
            s2 = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s2.settimeout(30)
            s2.connect(sock)
            assert s2.recv(16) == b""  # closed at once: not left hanging in VERSION
            s2.close()
            assert c.get_device_info().num_irqs == 5  # the first client carries on
            wait_for(lambda: host_view(qmp)["server"]["stats"]["refused_clients"] == 1, 30, "the refusal counted")
        finally:
            c.close()


def test_the_servers_monitor_shows_the_host_side_and_injects(workdir):
    """x-query-vfio and x-query-pci-msix show the host's side; x-debug-device-event raises a
    queue's interrupt on its vector (to the client's eventfd, or the PBA of a vector with no
    trigger); x-vfio-request-release signals REQ; virtio queries are refused clearly."""
    from kickcall.monitor.client import QMPCommandError
    from vfio_env import monitor

    with vfio_server(workdir, "--vectors", "4") as (_p, sock, qmp):
        c = VfioUserClient(sock)
        efd, req = os.eventfd(0, os.EFD_NONBLOCK), os.eventfd(0, os.EFD_NONBLOCK)
        try:
            regs = NicRegs(c)
            regs.w32(regs.q(1, N.Q_VECTOR), 2)
            c.set_irqs(IX.MSIX, TRIGGER, 2, 1, fds=[efd])  # enables MSI-X with 3 vectors, vector 2 wired
            c.set_irqs(IX.REQ, TRIGGER, 0, 1, fds=[req])
            with monitor(qmp) as mon:
                v = mon.execute("x-query-vfio", {"dev": "nic0"})
                assert v["host"]["irq-type"] == "MSIX" and v["host"]["path"] == "dynamic"
                wired = {x["vector"]: x for x in v["host"]["vectors"]}
                assert wired[2]["trigger-fd"] is not None and wired[2]["eventfd-count"] == 0
                assert v["server"]["client"]["negotiated"] and v["server"]["client"]["twin-socket"]
                out = mon.execute("x-debug-device-event", {"dev": "nic0", "event": "call", "queue": 1})
                assert out["vector"] == 2
                wait_for(lambda: mon.execute("x-query-vfio", {"dev": "nic0"})["host"]["vectors"][2]["eventfd-count"] == 1,
                         30, "the injected interrupt in the client's eventfd (read without consuming it)")
                assert os.eventfd_read(efd) == 1
                regs.w32(regs.q(0, N.Q_VECTOR), 0)  # vector 0: allocated by the enable, no trigger
                mon.execute("x-debug-device-event", {"dev": "nic0", "event": "call", "queue": 0})
                mx = mon.execute("x-query-pci-msix", {"dev": "nic0"})
                assert mx["view"] == "host" and mx["enabled"] and mx["entries"][0]["pending"]  # latched
                assert mon.execute("x-vfio-request-release", {"dev": "nic0"}) == {"signalled": True}
                assert os.eventfd_read(req) == 1
                with pytest.raises(QMPCommandError) as ei:
                    mon.execute("x-query-virtio-status", {"path": "/machine/host/nic0"})
                assert "not a VirtIODevice" in str(ei.value)
        finally:
            c.close()
            os.close(efd)
            os.close(req)
