"""Which QMP queries are safe to send to a real QEMU 7.2 whose vhost-user-blk disk is in use.

The facts ``kickcall diagnose`` must rest on (issue 8), measured on real QEMU 7.2 (TCG) booting a
Linux guest whose disk is a vhost-user-blk served by ``kickcall vhost-user-blk --qmp``.  The guest
writes and reads back a pattern in a loop (O_DIRECT, one request at a time), so a stopped ring
stalls it at once.  The instrument is the back-end's ``x-query-vhost-user-backend``: a count per
vhost-user message received (GET_VRING_BASE is the one that stops a ring).

- The queries diagnose may send to QEMU leave every message count unchanged and the guest's I/O
  going: query-version, query-commands, query-status, query-name, x-query-virtio,
  x-query-virtio-status, x-query-virtio-vhost-queue-status, query-pci, qom-get, qom-list, and HMP
  (human-monitor-command) ``xp``, ``info virtio``, ``info virtio-status``,
  ``info virtio-vhost-queue-status``, ``info mtree -f``.
- ``x-query-virtio-queue-status`` (and its HMP twin ``info virtio-queue-status``) on a vhost device
  QEMU has started sends GET_VRING_BASE: the back-end stops the ring (kick and call fds dropped)
  while QEMU still believes it started, and the guest's I/O hangs.  Its reply's ``last-avail-idx``
  is the return code of QEMU's vhost_get_vring_base() (0), not an index.  This is why diagnose must
  never send it to a vhost device, whatever the device's state looks like at query time: before the
  device started the same query takes QEMU's emulated path and sends nothing.
- QMP ``stop`` then ``cont`` restarts such a ring (QEMU stops and restarts its vhost device, and
  the restarted kick eventfd delivers the guest's pending kick), without any help from the
  back-end (it runs with ``--no-self-kick``): the request the guest published while the ring was
  stopped completes, and the data checks pass.
- ``x-query-virtio-vhost-queue-status`` on a vhost device that has not started (QEMU started with
  ``-S``; or paused) is an error: ``GenericError: Error: vhost device has not started yet``.  Its
  ``kick`` and ``call`` fields are always 0 (QEMU never fills them in): they say nothing.
- ``x-query-virtio`` names a vhost-user-blk device ``virtio-blk``; ``qom-get ... type`` on its
  virtio-backend path says ``vhost-user-blk`` (its parent: ``vhost-user-blk-pci``).
- QEMU and qemu-storage-daemon greet identically (``{"QMP": {"version": {"qemu": ..., "package":
  ...}, "capabilities": ["oob"]}}``); only query-commands tells them apart (QSD has no
  query-status, no x-query-virtio*, no human-monitor-command; it has query-block-exports).
- QEMU serves one QMP client per ``-qmp`` socket: a second client's connect() succeeds (the
  kernel's backlog), SO_PEERCRED names QEMU's pid, and it gets nothing -- no greeting, no reply to
  what it sends -- until the first client leaves; then the greeting and the replies arrive.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import struct
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import pytest

from helpers import spawn, start_vhost_user_blk, stop_process, wait_for
from kickcall.monitor.client import QMPClient, QMPCommandError
from kickcall.peers import require_peers
from kickcall.peers.guest_image import build_initramfs, make_init
from kickcall.peers.qemu import QemuVM, VhostUserBlk, kernel_cmdline
from kickcall.virtio.blk import make_image

pytestmark = pytest.mark.slow

BOOT = 180.0
NOT_STARTED = "Error: vhost device has not started yet"
# how long a stalled guest is watched for progress: a round takes a few tens of ms when the ring runs
STALL_WATCH = 5.0

GUEST = r"""
i=0; while [ ! -b /dev/vda ] && [ $i -lt 300 ]; do sleep 0.1; i=$((i+1)); done
[ -b /dev/vda ] || echo "KC-NO-VDA"
n=0; bad=0
while [ $n -lt 1000000 ]; do
  b=$((64 + (n % 32) * 8))
  yes "KC-ROUND-$n-$KC_TAG" | head -c 32768 > /tmp/p
  want=$(md5sum < /tmp/p | cut -d' ' -f1)
  dd if=/tmp/p of=/dev/vda bs=4096 seek=$b oflag=direct 2>/dev/null
  got=$(dd if=/dev/vda bs=4096 skip=$b count=8 iflag=direct 2>/dev/null | md5sum | cut -d' ' -f1)
  if [ "$got" = "$want" ]; then echo "KC-ROUND $n ok"; else echo "KC-ROUND $n BAD"; bad=$((bad+1)); fi
  n=$((n+1))
done
"""


@dataclass
class Env:
    vm: QemuVM
    be: subprocess.Popen
    qemu_qmp: str
    be_qmp: str
    path: str = ""  # the vhost-user-blk's virtio-backend QOM path
    early: dict = field(default_factory=dict)  # what was seen while QEMU was still paused (-S)

    def qemu(self) -> QMPClient:
        return QMPClient(self.qemu_qmp, timeout=30).connect(wait=30)

    def backend(self) -> dict:
        with QMPClient(self.be_qmp, timeout=30).connect(wait=30) as c:
            return c.execute("x-query-vhost-user-backend")

    def rounds(self) -> tuple[int, int]:
        """(rounds that passed their data check, rounds that failed it) so far."""
        ok = bad = 0
        for ln in list(self.vm.lines):
            m = re.match(r"KC-ROUND (\d+) (ok|BAD)", ln)
            if m:
                ok, bad = (ok + 1, bad) if m.group(2) == "ok" else (ok, bad + 1)
        return ok, bad

    def wait_rounds(self, n: int, timeout: float = 60.0) -> None:
        start = self.rounds()[0]
        wait_for(lambda: self.rounds()[0] >= start + n or not self.vm.running(), timeout,
                 f"{n} more guest I/O rounds")
        assert self.vm.running(), self.vm.describe()
        assert self.rounds()[1] == 0, "a data check failed"


def _diff(a: dict, b: dict) -> dict:
    """How each message count moved from *a* to *b* (only the ones that moved)."""
    return {k: b.get(k, 0) - a.get(k, 0) for k in sorted(set(a) | set(b)) if a.get(k, 0) != b.get(k, 0)}


def _xp16(q: QMPClient, addr: int) -> int:
    """A 16-bit word of guest memory, read through HMP ``xp`` (read-only)."""
    out = q.execute("human-monitor-command", {"command-line": f"xp /1hx {addr:#x}"})
    m = re.fullmatch(r"([0-9a-f]{16}): 0x([0-9a-f]{4})\r\n", out)
    assert m and int(m.group(1), 16) == addr, out
    return int(m.group(2), 16)


@pytest.fixture(scope="module")
def env() -> Iterator[Env]:
    """One guest boot for the module: QEMU starts paused (-S) so the not-yet-started state can be
    observed deterministically, then runs; the guest's I/O loop is going when tests begin."""
    assets = require_peers()
    initrd = build_initramfs(make_init(GUEST), None, assets)
    d = tempfile.mkdtemp(prefix="kc")
    img = os.path.join(d, "disk.img")
    make_image(img, 4 << 20)
    sock, be_qmp, qemu_qmp = (os.path.join(d, n) for n in ("vblk.sock", "be.qmp", "qemu.qmp"))
    # --no-self-kick: whatever restarts a stopped ring here is QEMU's doing, not a kickcall extension
    be = start_vhost_user_blk(sock, img, "--qmp", be_qmp, "--no-self-kick")
    vm = QemuVM(assets.kernel, initrd, kernel_cmdline("diag", tag=os.urandom(4).hex()), smp=1,
                vhost_user_blk=[VhostUserBlk(sock, num_queues=1)], qmp_path=qemu_qmp, extra_args=["-S"])
    e = Env(vm, be, qemu_qmp, be_qmp)
    try:
        vm.start()
        with e.qemu() as q:
            e.early["greeting"] = q.greeting
            e.early["query-version"] = q.execute("query-version")
            e.early["x-query-virtio"] = q.execute("x-query-virtio")
            (dev,) = e.early["x-query-virtio"]
            e.path = dev["path"]
            e.early["type"] = q.execute("qom-get", {"path": e.path, "property": "type"})
            parent = e.path.rsplit("/", 1)[0]
            e.early["parent-type"] = q.execute("qom-get", {"path": parent, "property": "type"})
            e.early["virtio-status"] = q.execute("x-query-virtio-status", {"path": e.path})
            try:
                e.early["vhost-queue-status"] = q.execute("x-query-virtio-vhost-queue-status",
                                                          {"path": e.path, "queue": 0})
            except QMPCommandError as err:
                e.early["vhost-queue-status-error"] = (err.cls, err.desc)
            m0 = e.backend()["messages"]
            e.early["queue-status"] = q.execute("x-query-virtio-queue-status", {"path": e.path, "queue": 0})
            e.early["queue-status-messages"] = _diff(m0, e.backend()["messages"])
            q.execute("cont")
        e.wait_rounds(3, BOOT)
        yield e
    finally:
        vm.stop()
        stop_process(be)
        shutil.rmtree(d, ignore_errors=True)


# -- identification ----------------------------------------------------------------------------------

def test_qemu_greeting_and_version(env: Env) -> None:
    g = env.early["greeting"]
    assert set(g) == {"version", "capabilities"} and g["capabilities"] == ["oob"], g
    assert (g["version"]["qemu"]["major"], g["version"]["qemu"]["minor"]) == (7, 2), g
    assert isinstance(g["version"]["package"], str)
    assert env.early["query-version"] == g["version"]


def test_a_vhost_user_blk_is_named_virtio_blk_and_typed_vhost_user_blk(env: Env) -> None:
    (dev,) = env.early["x-query-virtio"]
    assert dev["name"] == "virtio-blk"  # x-query-virtio does not say it is a vhost device
    assert dev["path"].endswith("/virtio-backend")
    assert env.early["type"] == "vhost-user-blk"  # qom-get path=<virtio-backend> property=type does
    assert env.early["parent-type"] == "vhost-user-blk-pci"
    with env.qemu() as q:
        text = q.execute("human-monitor-command", {"command-line": f"info virtio-status {env.path}"})
    assert "virtio-blk (vhost)" in text and re.search(r"vhost_started:\s+true", text), text


def test_vhost_queue_status_before_the_device_started_is_an_error(env: Env) -> None:
    assert "vhost-queue-status" not in env.early, env.early.get("vhost-queue-status")
    assert env.early["vhost-queue-status-error"] == ("GenericError", NOT_STARTED)
    st = env.early["virtio-status"]
    assert st["started"] is False and st["vhost-started"] is False


def test_queue_status_before_the_vhost_device_started_takes_the_emulated_path(env: Env) -> None:
    """The forbidden query is harmless only while the vhost device has not started: a decision by
    state at query time would be a race with the guest's driver."""
    rep = env.early["queue-status"]
    assert env.early["queue-status-messages"] == {}
    assert "shadow-avail-idx" in rep and rep["vring-avail"] == 0, rep


# -- the safe queries --------------------------------------------------------------------------------

SAFE: list[tuple[str, Callable[[str, dict], tuple[str, dict | None]]]] = [
    ("query-version", lambda p, v: ("query-version", None)),
    ("query-commands", lambda p, v: ("query-commands", None)),
    ("query-status", lambda p, v: ("query-status", None)),
    ("query-name", lambda p, v: ("query-name", None)),
    ("x-query-virtio", lambda p, v: ("x-query-virtio", None)),
    ("x-query-virtio-status", lambda p, v: ("x-query-virtio-status", {"path": p})),
    ("x-query-virtio-vhost-queue-status",
     lambda p, v: ("x-query-virtio-vhost-queue-status", {"path": p, "queue": 0})),
    ("query-pci", lambda p, v: ("query-pci", None)),
    ("qom-get-type", lambda p, v: ("qom-get", {"path": p, "property": "type"})),
    ("qom-list", lambda p, v: ("qom-list", {"path": p})),
    ("hmp-xp-avail-idx", lambda p, v: ("human-monitor-command",
                                       {"command-line": f"xp /1hx {v['avail-phys'] + 2:#x}"})),
    ("hmp-xp-used-idx", lambda p, v: ("human-monitor-command",
                                      {"command-line": f"xp /1hx {v['used-phys'] + 2:#x}"})),
    ("hmp-info-virtio", lambda p, v: ("human-monitor-command", {"command-line": "info virtio"})),
    ("hmp-info-virtio-status", lambda p, v: ("human-monitor-command",
                                             {"command-line": f"info virtio-status {p}"})),
    ("hmp-info-virtio-vhost-queue-status",
     lambda p, v: ("human-monitor-command", {"command-line": f"info virtio-vhost-queue-status {p} 0"})),
    ("hmp-info-mtree-f", lambda p, v: ("human-monitor-command", {"command-line": "info mtree -f"})),
]


@pytest.mark.parametrize("name,make", SAFE, ids=[n for n, _ in SAFE])
def test_safe_query_leaves_the_ring_and_the_guest_alone(
        env: Env, name: str, make: Callable[[str, dict], tuple[str, dict | None]]) -> None:
    with env.qemu() as q:
        vq = q.execute("x-query-virtio-vhost-queue-status", {"path": env.path, "queue": 0})
        env.wait_rounds(1)
        before = env.backend()
        assert before["queues"][0]["started"], before["queues"][0]
        cmd, args = make(env.path, vq)
        for _ in range(3):  # three times, with the guest's I/O going in between
            q.execute(cmd, args)
            moved = _diff(before["messages"], env.backend()["messages"])
            if moved:  # put the ring back for the next tests (see the stop + cont test), then fail
                q.execute("stop")
                q.execute("cont")
            assert moved == {}, f"{name} made QEMU send vhost-user messages: {moved}"
            env.wait_rounds(1)
    after = env.backend()
    assert _diff(before["messages"], after["messages"]) == {}, f"{name} made QEMU send vhost-user messages"
    q0 = after["queues"][0]
    assert q0["started"] and q0["kick-fd"] >= 0 and q0["call-fd"] >= 0, q0
    assert q0["last-avail-idx"] != before["queues"][0]["last-avail-idx"], "the ring did not move"


def test_vhost_queue_status_matches_the_backends_ring_and_its_kick_call_are_always_0(env: Env) -> None:
    with env.qemu() as q:
        vq = q.execute("x-query-virtio-vhost-queue-status", {"path": env.path, "queue": 0})
    assert vq["name"] == "virtio-blk" and vq["num"] == 128
    assert vq["kick"] == 0 and vq["call"] == 0, vq  # not fds: QEMU never fills them in
    assert vq["avail-phys"] - vq["desc-phys"] == 16 * vq["num"] and vq["used-phys"] > vq["avail-phys"], vq
    assert env.backend()["queues"][0]["num"] == vq["num"]


# -- the forbidden query, and the way back -----------------------------------------------------------

@pytest.mark.parametrize("form", ["qmp", "hmp"])
def test_queue_status_on_a_started_vhost_device_stops_its_ring_and_stop_cont_restarts_it(
        env: Env, form: str) -> None:
    """x-query-virtio-queue-status (or its HMP twin ``info virtio-queue-status``) on a started
    vhost-user-blk sends GET_VRING_BASE: the proof for issue 8 that diagnose must never send either
    there.  Then QMP stop + cont brings the ring back."""
    with env.qemu() as q:
        vq = q.execute("x-query-virtio-vhost-queue-status", {"path": env.path, "queue": 0})
        avail_idx, used_idx = vq["avail-phys"] + 2, vq["used-phys"] + 2
        env.wait_rounds(1)
        st0 = env.backend()
        assert st0["queues"][0]["started"]
        if form == "qmp":
            rep = q.execute("x-query-virtio-queue-status", {"path": env.path, "queue": 0})
        else:
            text = q.execute("human-monitor-command",
                             {"command-line": f"info virtio-queue-status {env.path} 0"})
        st1 = env.backend()
        # GET_VRING_BASE is a request with a reply: the back-end counted it before QEMU answered
        assert _diff(st0["messages"], st1["messages"]) == {"GET_VRING_BASE": 1}
        q1 = st1["queues"][0]
        assert not q1["started"] and q1["kick-fd"] == -1 and q1["call-fd"] == -1, q1
        assert q1["inuse"] == 0, q1  # the back-end finished its in-flight request before replying
        if form == "qmp":
            # QEMU's ring addresses, and last-avail-idx = vhost_get_vring_base()'s return code
            assert (rep["vring-desc"], rep["vring-avail"], rep["vring-used"]) == (
                vq["desc-phys"], vq["avail-phys"], vq["used-phys"]), rep
            assert rep["last-avail-idx"] == 0 and rep["inuse"] == 0, rep
            assert "shadow-avail-idx" not in rep, rep  # the vhost path
            # neither index is the back-end's: used-idx is QEMU's own copy, as of the vhost device's
            # last stop (0 since the driver's reset; the stale value after a stop + cont)
            assert rep["used-idx"] != q1["used-idx"], (rep, q1)
            if q1["last-avail-idx"] != 0:
                assert rep["last-avail-idx"] != q1["last-avail-idx"]
        else:
            assert re.search(r"\n  last_avail_idx:\s+0\r\n", text), text
            assert re.search(rf"\n    desc:\s+0x0*{vq['desc-phys']:x}\r\n", text), text
        # QEMU still believes the device started; its vhost queue view does not change
        assert q.execute("x-query-virtio-vhost-queue-status", {"path": env.path, "queue": 0}) == vq
        assert q.execute("x-query-virtio-status", {"path": env.path})["vhost-started"] is True
        assert q.execute("query-status")["status"] == "running"
        # the guest publishes its next request, kicks, and nobody takes it
        wait_for(lambda: _xp16(q, avail_idx) != _xp16(q, used_idx), 30, "the guest's next request")
        hung_avail, hung_used, hung_rounds = _xp16(q, avail_idx), _xp16(q, used_idx), env.rounds()[0]
        assert hung_used == q1["used-idx"] and (hung_avail - hung_used) & 0xFFFF >= 1
        with pytest.raises(AssertionError, match="timed out"):
            wait_for(lambda: env.rounds()[0] > hung_rounds or _xp16(q, used_idx) != hung_used,
                     STALL_WATCH, "guest I/O progress on a stopped ring")
        q2 = env.backend()["queues"][0]
        assert (q2["kicks"], q2["last-avail-idx"], q2["started"]) == (
            q1["kicks"], q1["last-avail-idx"], False)

        # stop: QEMU stops its vhost device (the ring is already stopped; it asks again)
        m_run = env.backend()["messages"]
        q.execute("stop")
        stop_expect = {"GET_VRING_BASE": 1, "SET_VRING_ENABLE": 1}
        wait_for(lambda: _diff(m_run, env.backend()["messages"]) == stop_expect, 30, "stop's messages")
        with pytest.raises(QMPCommandError) as err:
            q.execute("x-query-virtio-vhost-queue-status", {"path": env.path, "queue": 0})
        assert (err.value.cls, err.value.desc) == ("GenericError", NOT_STARTED)
        # cont: QEMU sets the ring up again from the index it was given, with fresh kick/call fds
        m_stopped = env.backend()["messages"]
        q.execute("cont")
        expect = {"SET_FEATURES": 2, "SET_INFLIGHT_FD": 1, "SET_VRING_NUM": 1, "SET_VRING_BASE": 1,
                  "SET_VRING_ADDR": 1, "SET_VRING_KICK": 1, "SET_VRING_CALL": 1, "SET_VRING_ENABLE": 1}
        try:
            wait_for(lambda: _diff(m_stopped, env.backend()["messages"]) == expect, 30, "cont's messages")
        except AssertionError:
            assert _diff(m_stopped, env.backend()["messages"]) == expect
        # the request published while the ring was stopped completes: QEMU's restarted kick eventfd
        # delivers the guest's kick (the back-end runs with --no-self-kick)
        wait_for(lambda: _xp16(q, used_idx) != hung_used, 60,
                 "the request published while the ring was stopped to complete")
        q3 = env.backend()["queues"][0]
        assert q3["started"] and q3["kick-fd"] >= 0 and q3["call-fd"] >= 0, q3
        assert q3["self-kicks"] == 0 and q3["kicks"] > q1["kicks"], q3
        assert q.execute("x-query-virtio-vhost-queue-status", {"path": env.path, "queue": 0}) == vq
    env.wait_rounds(5)  # asserts every data check passed
    assert env.backend()["protocol-errors"] == 0


# -- monitor sockets ---------------------------------------------------------------------------------

def _peer_pid(s: socket.socket) -> int:
    return struct.unpack("3i", s.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))[0]


def _read_lines(s: socket.socket, n: int) -> list[dict]:
    buf = b""
    while buf.count(b"\n") < n:
        chunk = s.recv(65536)
        if not chunk:
            break
        buf += chunk
    return [json.loads(ln) for ln in buf.split(b"\n") if ln.strip()]


def test_qemu_serves_one_qmp_client_at_a_time(env: Env) -> None:
    with env.qemu() as first:
        second = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            second.connect(env.qemu_qmp)  # accepted by the kernel's backlog, not by QEMU
            assert _peer_pid(second) == env.vm.pid  # the listener's credentials: QEMU's pid
            second.settimeout(2.0)
            with pytest.raises(TimeoutError):  # no greeting while the first client is connected
                second.recv(4096)
            second.sendall(b'{"execute": "qmp_capabilities", "id": "second"}\r\n')
            with pytest.raises(TimeoutError):  # and no reply either
                second.recv(4096)
            assert first.execute("query-status")["running"] is True  # the first is served meanwhile
            first.close()
            second.settimeout(30.0)
            greeting, reply = _read_lines(second, 2)
            assert greeting["QMP"]["version"]["qemu"]["major"] == 7, greeting
            assert reply == {"return": {}, "id": "second"}
        finally:
            second.close()


def test_qemu_storage_daemon_greets_like_qemu_and_is_told_apart_by_its_commands(env: Env) -> None:
    d = tempfile.mkdtemp(prefix="kc")
    mon = os.path.join(d, "qsd.qmp")
    p = spawn(["qemu-storage-daemon", "--chardev", f"socket,path={mon},server=on,wait=off,id=m",
               "--monitor", "chardev=m"])
    try:
        # (no probe connection first: QSD's chardev may drop a client that connects while it is still
        # tearing down the previous one; connect() retries while the socket refuses)
        wait_for(lambda: os.path.exists(mon) or p.poll() is not None, 30, "the QSD monitor socket")
        with QMPClient(mon, timeout=30).connect(wait=30) as c:
            g = c.greeting
            version = c.execute("query-version")
            names = {x["name"] for x in c.execute("query-commands")}
            exports = c.execute("query-block-exports")
            with pytest.raises(QMPCommandError) as err:
                c.execute("query-status")
    finally:
        stop_process(p)
        shutil.rmtree(d, ignore_errors=True)
    qemu_g = env.early["greeting"]
    assert set(g) == set(qemu_g) and g["capabilities"] == qemu_g["capabilities"] == ["oob"]
    assert g["version"] == qemu_g["version"] == version  # the same build: nothing in the greeting differs
    assert {"query-block-exports", "block-export-add", "query-named-block-nodes", "qom-get"} <= names
    assert not names & {"query-status", "query-name", "x-query-virtio", "x-query-virtio-status",
                        "x-query-virtio-queue-status", "x-query-virtio-vhost-queue-status", "query-pci",
                        "human-monitor-command"}, names
    assert exports == []
    assert (err.value.cls, err.value.desc) == (
        "CommandNotFound", "The command query-status has not been found")
    with env.qemu() as q:
        qemu_names = {x["name"] for x in q.execute("query-commands")}
    assert {"query-status", "x-query-virtio", "x-query-virtio-queue-status", "x-query-virtio-queue-element",
            "x-query-virtio-vhost-queue-status", "human-monitor-command"} <= qemu_names
    assert "query-block-exports" in qemu_names  # QEMU has it too: it does not identify QSD alone
