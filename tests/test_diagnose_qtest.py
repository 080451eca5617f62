"""``kickcall diagnose`` on QEMU-emulated virtio-blk, the test playing the driver over QEMU's qtest
protocol (:mod:`kickcall.peers.qtest`): real QEMU 7.2 runs the device, the test decides exactly
what the driver does.  A buffer published without a notify is a lost kick; a completion whose
interrupt the driver never acts on (used.idx past its used_event, not consumed) is a lost call;
a driver doing verified I/O is healthy; a quiet one idle.  Every command diagnose sends goes
through the recording proxy and is checked against the documented table for QEMU."""

from __future__ import annotations

import json
import os
import signal
import subprocess

import pytest

from helpers import kickcall_argv, spawn, stop_process, wait_for
from kickcall.peers.qtest import QtestBlkIo, HealthyWorkload, QtestVM, VirtioBlkQtestDriver
from qmp_proxy import RecordingProxy, check

SRC = os.path.join(os.path.dirname(__file__), "..", "src")


def _data(tag: str) -> bytes:
    return (f"kc-diag-{tag}-".encode() * 600)[:4096]


@pytest.fixture
def emu(workdir):
    vm = QtestVM(workdir, event_idx=True)
    vm.start()
    try:
        drv = VirtioBlkQtestDriver(vm.session, event_idx=True).setup()
        drv.io([QtestBlkIo.write(8, _data("warm"))])  # one round trip: QEMU's avail_event and used_event set
        drv.consume(update_used_event=True)
        with RecordingProxy(os.path.join(workdir, "p.qmp"), vm.qmp_path) as proxy:
            yield vm, drv, proxy
            assert check(proxy.sent, "qemu") == [], check(proxy.sent, "qemu")
            sent = {s.command for s in proxy.sent}
            # an emulated device is the one place QEMU's own ring state may be asked for
            assert "x-query-virtio-queue-status" in sent and "x-query-virtio-queue-element" not in sent
    finally:
        vm.stop()


def diagnose(proxy: RecordingProxy, *args: str) -> tuple[int, dict]:
    p = subprocess.run(kickcall_argv("diagnose", "--qmp", proxy.path, "--json", "--interval", "0.2", *args),
                       capture_output=True, text=True, timeout=120, env=dict(os.environ, PYTHONPATH=SRC))
    assert p.returncode in (0, 1), p.stderr
    rep = json.loads(p.stdout)
    assert rep["targets"][0]["kind"] == "qemu"
    return p.returncode, rep


def _blk(rep: dict, vm: QtestVM) -> dict:
    (q,) = [q for q in rep["queues"] if q["path"] == vm.blk_qom_path]
    return q


def test_idle_and_healthy(emu):
    vm, drv, proxy = emu
    rc, rep = diagnose(proxy)
    q = _blk(rep, vm)
    assert rc == 0 and q["verdict"] == "idle", q
    assert q["facts"]["used-idx"] == drv.used_idx() and q["facts"]["avail-idx"] == drv.avail_idx
    with HealthyWorkload(drv) as w:
        w.wait_rounds(5)
        rc, rep = diagnose(proxy)
        q = _blk(rep, vm)
        assert rc == 0 and q["verdict"] == "healthy", q
        w.wait_rounds(w.rounds + 5)


def test_published_buffer_without_a_notify_is_a_lost_kick(emu):
    vm, drv, proxy = emu
    drv.publish([QtestBlkIo.write(16, _data("k"))], notify=False)
    rc, rep = diagnose(proxy, "-v", "--fix")
    q = _blk(rep, vm)
    assert rc == 1 and q["verdict"] == "lost kick", json.dumps(q, indent=1)
    ev = " ".join(q["evidence"])
    assert "1 buffer(s) made available and not taken" in ev and "had to kick" in ev
    assert q["facts"]["avail-idx"] == drv.avail_idx and q["facts"]["last-avail-idx"] == drv.avail_idx - 1
    assert any("notifier counters" in u for u in q["unknown"]) and any("MSI-X" in u for u in q["unknown"])
    # QEMU has no safe way to inject a kick: diagnose says so rather than act
    assert not q["fix-result"]["injected"] and "no safe way" in q["fix-result"]["reason"]
    drv.notify()  # the driver's kick after all: the request completes
    drv.wait_used(1)
    (c,) = drv.consume()
    assert c.status == 0
    rc, rep = diagnose(proxy)
    assert _blk(rep, vm)["verdict"] == "idle"


def test_completion_whose_interrupt_is_withheld_is_a_lost_call(emu):
    vm, drv, proxy = emu
    drv.ack_interrupt()
    before = drv.used_idx()
    drv.publish([QtestBlkIo.write(24, _data("c"))], notify=True)
    drv.wait_used(1)  # QEMU completed it and signalled; the driver never acts on the interrupt
    rc, rep = diagnose(proxy, "-v")
    q = _blk(rep, vm)
    assert rc == 1 and q["verdict"] == "lost call", json.dumps(q, indent=1)
    assert any(f"used.idx {before + 1} is past used_event {before}" in e for e in q["evidence"]), q["evidence"]
    assert q["fix"] == "call"
    drv.consume(update_used_event=True)  # the driver catches up
    rc, rep = diagnose(proxy)
    assert rc == 0 and _blk(rep, vm)["verdict"] == "idle"


def test_request_stuck_in_the_block_layer_is_not_processing(workdir):
    """QEMU took the request (last-avail-idx moved) and its storage never answers: the disk is an
    NBD export of qemu-storage-daemon, which is SIGSTOPped.  "not processing" once the request is
    older than --window (diagnose's own observation: QEMU does not say when it took it)."""
    img, nbd = os.path.join(workdir, "nbd.img"), os.path.join(workdir, "nbd.sock")
    with open(img, "wb") as f:
        f.truncate(16 << 20)
    qsd = spawn(["qemu-storage-daemon", "--blockdev", f"driver=file,node-name=file0,filename={img}",
                 "--blockdev", "driver=raw,node-name=disk0,file=file0",
                 "--nbd-server", f"addr.type=unix,addr.path={nbd}",
                 "--export", "type=nbd,id=exp0,node-name=disk0,name=disk,writable=on"],
                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    vm = None
    try:
        wait_for(lambda: os.path.exists(nbd) or qsd.poll() is not None, 30, "the NBD server")
        assert qsd.poll() is None, qsd.stderr.read()
        vm = QtestVM(workdir, blockdev=f"driver=nbd,node-name=disk0,server.type=unix,server.path={nbd},export=disk")
        vm.start()
        drv = VirtioBlkQtestDriver(vm.session, event_idx=True).setup()
        drv.io([QtestBlkIo.write(8, _data("nbd"))])
        drv.consume(update_used_event=True)
        os.kill(qsd.pid, signal.SIGSTOP)
        drv.publish([QtestBlkIo.read(8, 4096, _data("nbd"))], notify=True)
        with RecordingProxy(os.path.join(workdir, "p.qmp"), vm.qmp_path) as proxy:
            rc, rep = diagnose(proxy, "--window", "2", "--timeout", "10", "-v")
            assert check(proxy.sent, "qemu") == []
        q = _blk(rep, vm)
        assert rc == 1 and q["verdict"] == "not processing", json.dumps(q, indent=1)
        assert "1 request(s) taken by the device and not completed" in q["evidence"]
        assert q["facts"]["oldest-request-s"] >= 2 and any("may be older" in e for e in q["evidence"])
        os.kill(qsd.pid, signal.SIGCONT)
        drv.wait_used(1)
        (c,) = drv.consume()
        assert c.status == 0 and c.data == _data("nbd")
    finally:
        os.kill(qsd.pid, signal.SIGCONT)
        if vm is not None:
            vm.stop()
        stop_process(qsd)
