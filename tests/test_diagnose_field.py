"""``kickcall diagnose`` pointed at the VM's own QMP socket, as an operator with a hung VM would:
real QEMU 7.2 (TCG) booting a Linux guest whose two disks are vhost-user-blk devices served by two
``kickcall vhost-user-blk --qmp`` back-ends.  The guest writes, reads back and checks a pattern on
both disks in a loop, with a reader on each disk keeping its queue busy.

Every run goes through a recording proxy that checks each command (and HMP line) against the
documented per-target table; the back-ends count every vhost-user message they receive, so a
query that stopped a ring (GET_VRING_BASE) cannot go unnoticed.  The tests share one guest and run
in file order; the last ones stop a ring on purpose."""

from __future__ import annotations

import json
import os
import random
import re
import subprocess
import sys
import tempfile

import pytest

from helpers import start_vhost_user_blk, stop_process, wait_for
from kickcall.monitor.client import QMPClient
from kickcall.peers import require_peers
from kickcall.peers.guest_image import build_initramfs, make_init
from kickcall.peers.qemu import QemuVM, VhostUserBlk, kernel_cmdline
from kickcall.virtio.blk import make_image
from qmp_proxy import RecordingProxy, check

pytestmark = pytest.mark.slow

BOOT = 240.0
STOP_BLOCK = 1

GUEST = r"""
i=0; while { [ ! -b /dev/vda ] || [ ! -b /dev/vdb ]; } && [ $i -lt 300 ]; do sleep 0.1; i=$((i+1)); done
[ -b /dev/vdb ] || echo "KC-NO-VDB"
for d in vda vdb; do
  ( while true; do dd if=/dev/$d of=/dev/null bs=4096 count=32 iflag=direct 2>/dev/null || sleep 0.2; done ) &
done
n=0; bad=0
while [ $n -lt 100000 ]; do
  if dd if=/dev/vda bs=4096 skip=__STOP__ count=1 iflag=direct 2>/dev/null | grep -q KC-STOP; then break; fi
  for d in vda vdb; do
    b=$((64 + (n % 32) * 8))
    yes "KC-ROUND-$n-$d-$KC_TAG" | head -c 32768 > /tmp/p
    want=$(md5sum < /tmp/p | cut -d' ' -f1)
    dd if=/tmp/p of=/dev/$d bs=4096 seek=$b oflag=direct 2>/dev/null
    got=$(dd if=/dev/$d bs=4096 skip=$b count=8 iflag=direct 2>/dev/null | md5sum | cut -d' ' -f1)
    if [ "$got" = "$want" ]; then echo "KC-ROUND $n $d ok"; else echo "KC-ROUND $n $d BAD"; bad=$((bad+1)); fi
  done
  n=$((n+1))
done
kill %1 %2 2>/dev/null
echo "KC-DONE rounds=$n bad=$bad"
""".replace("__STOP__", str(STOP_BLOCK))

WRAP = ("import sys, kickcall.diagnose.targets, kickcall.cli; from kickcall.faults import PROCESS; "
        "PROCESS.set_fix('forbid-vhost-queue-status', {forbid}); "
        "sys.exit(kickcall.cli.main(sys.argv[1:]))")


class Rig:
    def __init__(self, d: str) -> None:
        self.d = d
        self.vm: QemuVM | None = None
        self.be: dict[str, object] = {}
        self.img: dict[str, str] = {}
        self.bqmp: dict[str, str] = {}
        self.qmp = os.path.join(d, "vm.qmp")
        self.paths: dict[str, str] = {}  # disk -> QEMU's virtio-backend path

    def rounds(self, disk: str) -> tuple[int, int]:
        ok = bad = 0
        for ln in list(self.vm.lines):
            m = re.match(rf"KC-ROUND \d+ {disk} (ok|BAD)", ln)
            if m:
                ok, bad = (ok + 1, bad) if m.group(1) == "ok" else (ok, bad + 1)
        return ok, bad

    def wait_rounds(self, disk: str, n: int, timeout: float = BOOT) -> None:
        start = self.rounds(disk)[0]
        wait_for(lambda: self.rounds(disk)[0] >= start + n or not self.vm.running(), timeout,
                 f"{n} more guest I/O rounds on {disk}")
        assert self.vm.running(), self.vm.describe()
        assert self.rounds(disk)[1] == 0, "a data check failed in the guest"

    def backend(self, disk: str) -> dict:
        with QMPClient(self.bqmp[disk]).connect() as c:
            return c.execute("x-query-vhost-user-backend")

    def vhost_view(self, disk: str) -> dict:
        """The back-end's own view of its ring (addresses as it received and mapped them)."""
        with QMPClient(self.bqmp[disk]).connect() as c:
            (dev,) = c.execute("x-query-virtio")
            return c.execute("x-query-virtio-vhost-queue-status", {"path": dev["path"], "queue": 0})

    def get_vring_base(self, disk: str) -> int:
        return self.backend(disk)["messages"].get("GET_VRING_BASE", 0)


def diagnose(*args: str, forbid: bool = True, timeout: float = 120) -> tuple[int, dict, str]:
    argv = [sys.executable, "-c", WRAP.format(forbid=forbid), "diagnose", "--json", *args]
    p = subprocess.run(argv, capture_output=True, text=True, timeout=timeout,
                       env=dict(os.environ, PYTHONPATH=os.path.join(os.path.dirname(__file__), "..", "src")))
    assert p.returncode in (0, 1, 2), p.stderr
    return p.returncode, json.loads(p.stdout), p.stderr


@pytest.fixture(scope="module")
def rig():
    assets = require_peers()
    initrd = build_initramfs(make_init(GUEST), None, assets)
    d = tempfile.mkdtemp(prefix="kc")
    r = Rig(d)
    try:
        devs = []
        for disk in ("vda", "vdb"):
            r.img[disk] = os.path.join(d, f"{disk}.img")
            make_image(r.img[disk], 4 << 20)
            sock, r.bqmp[disk] = os.path.join(d, f"{disk}.sock"), os.path.join(d, f"{disk}.qmp")
            r.be[disk] = start_vhost_user_blk(sock, r.img[disk], "--qmp", r.bqmp[disk])
            devs.append(VhostUserBlk(sock, num_queues=1, extra=f",id={disk}-dev"))
        wait_for(lambda: all(os.path.exists(p) for p in r.bqmp.values()), 30, "the back-ends' monitors")
        r.vm = QemuVM(assets.kernel, initrd, kernel_cmdline("field", tag=os.urandom(4).hex()), smp=1,
                      vhost_user_blk=devs, qmp_path=r.qmp)
        r.vm.start()
        r.wait_rounds("vdb", 2)
        with QMPClient(r.qmp).connect() as c:
            for dv in c.execute("x-query-virtio"):
                for disk in ("vda", "vdb"):
                    if f"/{disk}-dev/" in dv["path"]:
                        r.paths[disk] = dv["path"]
        assert set(r.paths) == {"vda", "vdb"}, r.paths
        yield r
    finally:
        if r.vm is not None:
            r.vm.stop()
        for p in r.be.values():
            stop_process(p)
        for f in os.listdir(d):
            os.unlink(os.path.join(d, f))
        os.rmdir(d)


def test_fifty_runs_on_qemus_own_monitor_never_stop_a_ring(rig):
    """The issue's first item: 50 runs against QEMU's QMP; no GET_VRING_BASE, data intact, healthy,
    and QEMU-side evidence that matches each back-end's own view."""
    base = {d: rig.get_vring_base(d) for d in ("vda", "vdb")}
    view = {d: rig.vhost_view(d) for d in ("vda", "vdb")}
    before = {d: rig.rounds(d)[0] for d in ("vda", "vdb")}
    prox = os.path.join(rig.d, "p.qmp")
    with RecordingProxy(prox, rig.qmp) as p:
        for i in range(50):
            rc, rep, err = diagnose("--qmp", prox, "--samples", "3", "--interval", "0.15")
            assert rc == 0, (i, err, json.dumps(rep, indent=1))
            (t,) = rep["targets"]
            assert t["kind"] == "qemu" and t["version"].startswith("7.2"), t
            for disk in ("vda", "vdb"):
                (q,) = [q for q in rep["queues"] if q["path"] == rig.paths[disk]]
                assert q["verdict"] == "healthy", (i, q)
                f, v = q["facts"], view[disk]
                assert (f["vring-desc"], f["vring-avail"], f["vring-used"], f["vring-num"]) == \
                    (v["desc-phys"], v["avail-phys"], v["used-phys"], v["num"]), (f, v)
                assert f["user-addresses"] == [v["desc"], v["avail"], v["used"]]
                assert isinstance(f["avail-idx"], int) and isinstance(f["used-idx"], int)
                assert (f["avail-idx"] - f["used-idx"]) & 0xFFFF <= v["num"]
                assert any("notifier counters" in u for u in q["unknown"]), q["unknown"]
        assert check(p.sent, "qemu") == [], check(p.sent, "qemu")
        sent = {s.command for s in p.sent}
        assert "x-query-virtio-queue-status" not in sent and "human-monitor-command" in sent
    assert {d: rig.get_vring_base(d) for d in ("vda", "vdb")} == base
    for disk in ("vda", "vdb"):
        assert rig.rounds(disk)[0] > before[disk] and rig.rounds(disk)[1] == 0
    rig.wait_rounds("vda", 1, 60)


def test_busy_qemu_monitor_is_named_with_qemus_pid(rig):
    with QMPClient(rig.qmp).connect() as holder:  # another client (libvirt) holds QEMU's only monitor
        rc, rep, _ = diagnose("--qmp", rig.qmp, "--timeout", "3")
        holder.execute("query-status")
    (t,) = rep["targets"]
    assert rc == 2 and t["problem"] == "busy" and t["pid"] == rig.vm.pid, t
    assert "one QMP client at a time" in t["detail"]


def test_paused_vm_is_paused_on_both_sides(rig):
    """`stop` on QEMU stops its vhost rings (GET_VRING_BASE): from the back-ends' side that is a
    stopped ring; with QEMU's monitor given too it is what it is, a paused VM."""
    with QMPClient(rig.qmp).connect() as c:
        c.execute("stop")
    try:
        rc, rep, err = diagnose("--qmp", rig.bqmp["vda"], "--qmp", rig.qmp, "--qmp", rig.bqmp["vdb"],
                                "--interval", "0.2")
        assert rc == 0, (err, json.dumps(rep, indent=1))
        assert rep["queues"] and all(q["verdict"] == "paused" and q["severity"] == "info" for q in rep["queues"]), \
            json.dumps(rep["queues"], indent=1)
        backend_side = [q for q in rep["queues"] if q["target"] != rig.qmp]
        assert len(backend_side) == 2 and all("is paused" in q["evidence"][0] for q in backend_side)
    finally:
        with QMPClient(rig.qmp).connect() as c:
            c.execute("cont")
    rig.wait_rounds("vdb", 1, 120)


def test_joined_verdict_names_the_faulty_device_and_queue(rig):
    """Two back-ends, the sockets in shuffled order, a call lost on one back-end's queue."""
    rig.wait_rounds("vdb", 1, 60)
    with QMPClient(rig.bqmp["vdb"]).connect() as c:
        (dev,) = c.execute("x-query-virtio")
        c.execute("x-debug-fault", {"dev": dev["path"], "queue": 0, "path": "call", "action": "drop-next"})
    socks = [rig.qmp, rig.bqmp["vda"], rig.bqmp["vdb"]]
    stalled = None
    for _attempt in range(2):
        random.shuffle(socks)
        args = [a for s in socks for a in ("--qmp", s)]
        rc, rep, err = diagnose(*args, "--interval", "0.3")
        probs = [q for q in rep["queues"] if q["severity"] == "problem"]
        if probs:
            break
    assert rc == 1, (err, json.dumps(rep, indent=1))
    (q,) = probs
    assert q["path"] == rig.paths["vdb"] and q["queue"] == 0 and q["target"] == rig.qmp, q
    assert q["joined"]["target"] == rig.bqmp["vdb"] and q["verdict"] == "lost call", q
    assert any("past used_event" in e for e in q["evidence"]) and any(e.startswith("QEMU (") for e in q["evidence"])
    # exactly one verdict per ring: the back-ends' queues are not reported again on their own
    assert sorted((x["path"], x["queue"]) for x in rep["queues"]) == sorted((rig.paths[d], 0) for d in ("vda", "vdb"))
    (other,) = [x for x in rep["queues"] if x["path"] == rig.paths["vda"]]
    assert other["severity"] != "problem" and other["joined"]["target"] == rig.bqmp["vda"]
    # QEMU's view alone names the same ring, says what QEMU does not expose, and does not act
    rc, rep, err = diagnose("--qmp", rig.qmp, "--dev", "vdb-dev", "--interval", "0.3", "--fix")
    (qq,) = rep["queues"]
    assert rc == 1 and qq["verdict"] == "lost call" and qq["joined"] is None, qq
    assert not qq["fix-result"]["injected"] and "no safe way" in qq["fix-result"]["reason"]
    assert any("notifier counters" in u for u in qq["unknown"])
    stalled = rig.rounds("vdb")[0]
    # --fix: the joined queue's fix goes to its back-end
    rc, rep, err = diagnose(*args, "--fix", "--interval", "0.3")
    (q,) = [x for x in rep["queues"] if x["path"] == rig.paths["vdb"]]
    assert q["fix-result"]["injected"] and q["fix-result"]["moved"], (q, err)
    assert rc == 0
    wait_for(lambda: rig.rounds("vdb")[0] > stalled + 1, 120, "vdb's I/O after the fix")
    assert rig.rounds("vdb")[1] == 0


def test_ring_stopped_behind_qemus_back(rig):
    """What the old diagnose did: x-query-virtio-queue-status on a vhost device.  QEMU stops the
    ring (GET_VRING_BASE); diagnose names it a stopped ring from both sides, never a lost kick or
    call, and --fix refuses to make the back-end process it."""
    base = rig.get_vring_base("vda")
    with QMPClient(rig.qmp).connect() as c:
        c.execute("x-query-virtio-queue-status", {"path": rig.paths["vda"], "queue": 0})
    assert rig.get_vring_base("vda") == base + 1
    for args in (["--qmp", rig.bqmp["vda"]], ["--qmp", rig.bqmp["vda"], "--qmp", rig.qmp, "--dev", "vda-dev"]):
        rc, rep, err = diagnose(*args, "--fix", "--interval", "0.3")
        (q,) = rep["queues"]
        assert q["path"] == (rig.paths["vda"] if "--dev" in args else q["path"]), q
        assert q["verdict"] == "ring stopped", json.dumps(q, indent=1)
        assert any("GET_VRING_BASE" in e for e in q["evidence"])
        assert not q["fix-result"]["injected"] and "refused" in q["fix-result"]["reason"]
    assert rig.get_vring_base("vda") == base + 1  # diagnose itself sent nothing that stops a ring
    # the advice diagnose gives is true: stop + cont on QEMU's monitor sets the ring up again
    assert "`stop` then `cont`" in q["fix-result"]["reason"], q["fix-result"]
    stalled = rig.rounds("vda")[0]
    with QMPClient(rig.qmp).connect() as c:
        c.execute("stop")
        c.execute("cont")
    rig.wait_rounds("vda", 2, 120)
    assert rig.rounds("vda")[0] > stalled
    rc, rep, err = diagnose("--qmp", rig.bqmp["vda"], "--interval", "0.2")
    (q,) = rep["queues"]
    assert q["verdict"] in ("healthy", "slow"), q


def test_with_the_forbidden_query_allowed_the_first_item_fails(rig):
    """The fix switched off (FORBID_VHOST_QUEUE_STATUS = False): diagnose queries the vhost device
    as it used to; QEMU stops the ring, and the recording proxy flags the query."""
    base = rig.get_vring_base("vdb")
    prox = os.path.join(rig.d, "p2.qmp")
    with RecordingProxy(prox, rig.qmp) as p:
        diagnose("--qmp", prox, "--samples", "2", "--interval", "0.15", forbid=False)
        bad = check(p.sent, "qemu")
    assert rig.get_vring_base("vdb") > base, "the forbidden query stopped no ring?"
    assert any(b.startswith("x-query-virtio-queue-status") for b in bad), bad
    with QMPClient(rig.qmp).connect() as c:  # leave the guest running for the module's teardown
        c.execute("stop")
        c.execute("cont")
