"""Real QEMU 7.2's emulated virtio-blk driven deterministically by a Python driver over qtest
(:mod:`kickcall.peers.qtest`): data goes through, a request published without a notify stays
untaken until the notify, QEMU's avail_event tracks with EVENT_IDX, and what QMP's virtio queries
and HMP ``xp`` show agrees with the ring in guest memory."""

from __future__ import annotations

import os
import re

import pytest

from helpers import wait_for
from kickcall.peers.qtest import (
    QtestBlkIo,
    HealthyWorkload,
    QtestError,
    QtestErrorKind,
    QtestVM,
    VirtioBlkQtestDriver,
    vring_need_event,
)


OBSERVE_ROUNDS = 20  # QMP round trips during which an un-notified request must stay untaken


def _data(tag: str, n: int = 4096) -> bytes:
    return (f"kc-qtest-{tag}-".encode() * (n // 8 + 1))[:n]


def _queue_status(vm: QtestVM) -> dict:
    with vm.qmp() as q:
        return q.execute("x-query-virtio-queue-status", {"path": vm.blk_qom_path, "queue": 0})


def _xp_halfwords(text: str) -> list[int]:
    """The values in HMP ``xp /Nhx`` output: lines ``<16 hex digits>: 0x0002 0x0000 ...``."""
    out: list[int] = []
    for ln in text.splitlines():
        m = re.fullmatch(r"[0-9a-f]{16}:((?: 0x[0-9a-f]{4})+)", ln.strip())
        if m is None:
            raise AssertionError(f"unexpected xp line {ln!r}")
        out += [int(w, 16) for w in m.group(1).split()]
    return out


@pytest.fixture
def vm_factory(workdir):
    vms: list[QtestVM] = []

    def make(**kw) -> QtestVM:
        vm = QtestVM(workdir, **kw)
        vms.append(vm)
        vm.start()
        return vm

    yield make
    for vm in vms:
        vm.stop()
        assert not vm.running()


def _driver(vm: QtestVM, **kw) -> VirtioBlkQtestDriver:
    return VirtioBlkQtestDriver(vm.session, event_idx=vm.event_idx, **kw).setup()


def test_vring_need_event():
    assert vring_need_event(5, 6, 5)  # the device waits for index 5: moving 5 -> 6 crosses it
    assert not vring_need_event(7, 6, 5)  # it waits for a later index
    assert vring_need_event(3, 6, 2)  # several added since the last kick
    assert not vring_need_event(1, 6, 2)  # it has not caught up with the last kick: no new kick
    assert vring_need_event(0xFFFF, 0, 0xFFFF)  # across the 16-bit wrap
    assert not vring_need_event(0, 0, 0)  # nothing added


@pytest.mark.parametrize("event_idx", [True, False], ids=["event-idx", "no-event-idx"])
def test_data_written_through_the_driver_reads_back(vm_factory, event_idx):
    vm = vm_factory(event_idx=event_idx)
    drv = _driver(vm)
    assert drv.event_idx is event_idx
    assert drv.capacity == vm.disk_size // 512
    writes = [QtestBlkIo.write(64 + 8 * i, _data(f"w{i}")) for i in range(4)]
    done = drv.io(writes)
    assert [c.status for c in done] == [0] * 4 and all(c.used_len == 1 for c in done)
    with open(vm.disk_path, "rb") as f:  # what QEMU wrote to the image file, read independently
        for r in writes:
            f.seek(r.sector * 512)
            assert f.read(len(r.data)) == r.data
    done = drv.io([QtestBlkIo.read(r.sector, len(r.data), r.data) for r in writes])
    assert [c.data for c in done] == [r.data for r in writes]
    assert all(c.used_len == 4096 + 1 for c in done)  # data + status byte
    # a read that does not match is reported as such
    with pytest.raises(QtestError) as ei:
        drv.io([QtestBlkIo.read(64, 4096, _data("other"))])
    assert ei.value.kind is QtestErrorKind.DATA
    st = drv.state()
    assert st["used_idx"] == st["avail_idx"] == st["last_used"] == 9 and st["in_flight"] == 0
    assert st["interrupt_pending"]  # completions were signalled through MSI-X into the RAM word


@pytest.mark.parametrize("notify", [False, True], ids=["no-notify", "notify"])
@pytest.mark.parametrize("event_idx", [True, False], ids=["event-idx", "no-event-idx"])
def test_published_request_waits_for_the_notify(vm_factory, event_idx, notify):
    """Without a notify QEMU does not take the request: over many QMP round trips last-avail-idx
    stays behind the driver's avail.idx and used.idx does not move; the notify makes it complete.
    (The ``notify`` variant shows the observation can tell the two apart.)"""
    vm = vm_factory(event_idx=event_idx)
    drv = _driver(vm)
    drv.io([QtestBlkIo.write(8, _data("before"))])
    kicked = drv.publish([QtestBlkIo.read(8, 4096, _data("before"))], notify=notify)
    assert kicked is notify
    if notify:
        wait_for(lambda: _queue_status(vm)["used-idx"] == 2, 30, "the kicked request to complete")
    for _ in range(OBSERVE_ROUNDS):
        st = _queue_status(vm)
        taken = st["last-avail-idx"] == drv.avail_idx
        assert taken is notify, st
        assert (st["used-idx"] == 2) is notify, st
        assert (drv.used_idx() == 2) is notify
    if event_idx:
        assert drv.avail_event() == (2 if notify else 1)
    if not notify:
        drv.notify()
    drv.wait_used(1)
    [c] = drv.consume()
    assert c.status == 0 and c.data == _data("before")
    st = _queue_status(vm)
    assert st["last-avail-idx"] == st["used-idx"] == drv.avail_idx == 2


def test_avail_event_tracks_with_event_idx(vm_factory):
    vm = vm_factory(event_idx=True)
    drv = _driver(vm)
    for n in range(1, 6):
        assert drv.publish([QtestBlkIo.write(8 * n, _data(f"e{n}"))] * 1, notify=True)
        drv.wait_used(1)
        assert drv.avail_event() == drv.avail_idx == n  # QEMU took everything up to avail.idx
        drv.consume(update_used_event=True)
        assert drv.used_event() == n
    # two un-notified requests: QEMU's avail_event stays where it was; one kick covers both
    drv.publish([QtestBlkIo.write(100, _data("a"))], notify=False)
    drv.publish([QtestBlkIo.write(108, _data("b"))], notify=False)
    assert drv.avail_event() == 5
    assert drv.kick()
    drv.wait_used(2)
    assert drv.avail_event() == 7
    assert len(drv.consume()) == 2


def test_without_event_idx_qemu_leaves_the_event_fields_alone(vm_factory):
    vm = vm_factory(event_idx=False)
    drv = _driver(vm)
    for n in range(3):
        drv.io([QtestBlkIo.write(8 * n, _data(f"n{n}"))])
    assert drv.avail_event() == 0 and drv.used_event() == 0 and drv.used_flags() == 0
    st = _queue_status(vm)
    assert st["signalled-used-valid"] is False and st["used-idx"] == 3


def test_qmp_queue_status_agrees_with_guest_memory(vm_factory):
    vm = vm_factory(event_idx=True)
    drv = _driver(vm, queue_size=32)
    drv.io([QtestBlkIo.write(8 * i, _data(f"q{i}")) for i in range(3)])
    drv.publish([QtestBlkIo.read(0, 4096)], notify=False)
    st = _queue_status(vm)
    assert (st["vring-desc"], st["vring-avail"], st["vring-used"]) == (drv.desc, drv.avail, drv.used)
    assert st["vring-num"] == drv.num == 32 and st["vring-num-default"] == 256
    assert st["used-idx"] == drv.used_idx() == 3
    assert st["last-avail-idx"] == drv.avail_event() == 3 and drv.avail_idx == 4
    assert st["shadow-avail-idx"] == 3 and st["inuse"] == 0
    assert st["signalled-used-valid"] and st["signalled-used"] == 3
    with vm.qmp() as q:
        [dev] = [d for d in q.execute("x-query-virtio") if d["path"] == vm.blk_qom_path]
        assert dev["name"] == "virtio-blk"
        assert q.execute("qom-get", {"path": vm.blk_qom_path, "property": "type"}) == "virtio-blk-device"
        status = q.execute("x-query-virtio-status", {"path": vm.blk_qom_path})
        assert status["started"] and not status["vhost-started"] and status["vm-running"]
        hmp = lambda a, n: _xp_halfwords(q.execute("human-monitor-command", {"command-line": f"xp /{n}hx {a:#x}"}))
        assert hmp(drv.avail + 2, 1) == [4]  # avail.idx as the driver wrote it
        assert hmp(drv.used + 2, 1) == [3]
        assert hmp(drv.avail, 4) == [0, 4, 0, 3]  # flags, idx, ring[0], ring[1] (heads 0 and 3)
        assert hmp(drv.avail + 4 + 2 * drv.num, 1) == [drv.used_event()]
        assert hmp(drv.used + 4 + 8 * drv.num, 1) == [drv.avail_event()]
        out = q.execute("human-monitor-command", {"command-line": "xp /1hx 0x40000000"})
        assert out.strip() == "0000000040000000: Cannot access memory"  # outside the 64 MiB of RAM
        # the element query reads the avail ring into QEMU's shadow index; nothing else moves
        el = q.execute("x-query-virtio-queue-element", {"path": vm.blk_qom_path, "queue": 0})
        assert el["avail"] == {"idx": 4, "flags": 0, "ring": 9} and el["index"] == 9
        assert el["used"] == {"idx": 3, "flags": 0}
    st2 = _queue_status(vm)
    assert st2["shadow-avail-idx"] == 4
    assert {k: v for k, v in st2.items() if k != "shadow-avail-idx"} == \
        {k: v for k, v in st.items() if k != "shadow-avail-idx"}
    assert drv.used_idx() == 3  # still not taken: the element query is not a notify
    drv.notify()
    drv.wait_used(1)
    [c] = drv.consume()
    assert c.status == 0 and c.data == _data("q0")


def test_masked_vector_holds_the_interrupt_in_the_pba(vm_factory):
    vm = vm_factory()
    drv = _driver(vm)
    drv.ack_interrupt()
    drv.set_vector_masked(1, True)
    drv.publish([QtestBlkIo.write(8, _data("m"))])
    drv.wait_used(1)
    assert drv.vector_pending(1) and not drv.interrupt_pending(1)
    assert _queue_status(vm)["signalled-used"] == 1  # QEMU counts it as signalled all the same
    drv.set_vector_masked(1, False)
    assert drv.interrupt_pending(1) and not drv.vector_pending(1)
    drv.consume()


def test_healthy_workload_while_qmp_watches(vm_factory):
    vm = vm_factory(qmp_sockets=2)
    drv = _driver(vm)
    w = HealthyWorkload(drv, depth=2).start()
    try:
        w.wait_rounds(3)
        seen = []
        with vm.qmp(1) as q:  # the second socket, as kickcall diagnose would use
            for _ in range(OBSERVE_ROUNDS):
                st = q.execute("x-query-virtio-queue-status", {"path": vm.blk_qom_path, "queue": 0})
                assert (st["vring-desc"], st["vring-avail"], st["vring-used"]) == (drv.desc, drv.avail, drv.used)
                assert 0 <= (st["last-avail-idx"] - st["used-idx"]) & 0xFFFF <= 2
                seen.append(st["used-idx"])
        assert w.wait_rounds(w.rounds + 2) > 3
    finally:
        rounds = w.stop()
    assert len(set(seen)) > 1  # the queue moved while it was watched
    st = drv.state()
    assert st["in_flight"] == 0 and st["used_idx"] == st["avail_idx"] == rounds * 4


def test_session_errors_carry_a_kind(vm_factory):
    vm = vm_factory()
    with pytest.raises(QtestError) as ei:
        vm.session.command("clock_step")  # no qtest accelerator: QEMU 7.2 answers FAIL Unknown command
    assert ei.value.kind is QtestErrorKind.PROTOCOL and "Unknown command" in str(ei.value)
    assert vm.session.readl(0) == 0  # still in step after a FAIL
    with pytest.raises(QtestError) as ei:
        VirtioBlkQtestDriver(vm.session, slot=7).setup()  # nothing there
    assert ei.value.kind is QtestErrorKind.NOT_FOUND
    drv = _driver(vm)
    with pytest.raises(QtestError) as ei:
        drv.publish([QtestBlkIo.write(drv.capacity, _data("x"))])
    assert ei.value.kind is QtestErrorKind.USAGE
    with pytest.raises(QtestError) as ei:
        drv.publish([QtestBlkIo.write(0, _data("x"))] * (drv.num // 3 + 1), notify=False)
    assert ei.value.kind is QtestErrorKind.RING
    with pytest.raises(QtestError) as ei:
        drv.wait_used(1, timeout=0.2)
    assert ei.value.kind is QtestErrorKind.TIMEOUT
    os.kill(vm.pid, 9)
    with pytest.raises(QtestError) as ei:
        drv.used_idx()
    assert ei.value.kind is QtestErrorKind.CLOSED
