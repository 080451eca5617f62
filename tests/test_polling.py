"""Adaptive polling (issue 14): the IOThread polls its handlers for a self-tuning window before it
sleeps (QEMU's poll-max-ns / poll-grow / poll-shrink), giving the GIL up between poll rounds; the
vhost-user back-end polls each started ring's avail index with the driver's notifications
suppressed, and when polling ends re-enables them and looks again -- so a request the driver
published while it still saw them suppressed (and so did not kick) is served (``poll-recheck``)."""

from __future__ import annotations

import os
import sys
import threading
from contextlib import contextmanager
from typing import Iterator

import pytest

from helpers import wait_for
from kickcall.loop import POLL_START_NS, IOThread, PollHandler, adjust_poll_window
from kickcall.virtio.blk import BLK_S_OK, BLK_T_IN, BLK_T_OUT, VirtIOBlk, make_image

MS = 1_000_000


# -- the IOThread ---------------------------------------------------------------------------------
class Probe:
    """A poll handler whose work is a counter another thread raises."""

    def __init__(self) -> None:
        self.work = 0
        self.done = 0
        self.polls = 0
        self.begins = 0
        self.ends = 0
        self.polling = threading.Event()

    def poll(self) -> bool:
        self.polls += 1
        return self.work > self.done

    def ready(self) -> None:
        self.done = self.work

    def begin(self) -> None:
        self.begins += 1
        self.polling.set()

    def end(self) -> bool:
        self.ends += 1
        self.polling.clear()
        return self.work > self.done

    def handler(self) -> PollHandler:
        return PollHandler(poll=self.poll, ready=self.ready, begin=self.begin, end=self.end)


@contextmanager
def polled_loop(max_ns: int, **kw) -> Iterator[tuple[IOThread, Probe]]:
    loop = IOThread("poll-test", poll_max_ns=max_ns, **kw)
    fd = os.eventfd(0, os.EFD_NONBLOCK)
    probe = Probe()
    loop.set_fd_handler(fd, lambda: os.eventfd_read(fd), poll=probe.handler())
    loop.start()
    try:
        yield loop, probe
    finally:
        loop.stop()
        os.close(fd)


def test_the_window_policy_is_qemus():
    mx = 32 * 1000
    assert adjust_poll_window(0, 10_000, mx) == POLL_START_NS  # an event soon after: start polling
    assert adjust_poll_window(4000, 10_000, mx) == 8000  # grown (doubled)...
    assert adjust_poll_window(16_000, 20_000, mx, grow=4) == mx  # ... by poll-grow, at most poll-max-ns
    assert adjust_poll_window(8000, 5000, mx) == 8000  # found within the window: kept
    assert adjust_poll_window(8000, mx + 1, mx) == 0  # longer than polling could pay: off (poll-shrink 0)
    assert adjust_poll_window(8000, mx + 1, mx, shrink=2) == 4000  # ... or divided by poll-shrink
    assert adjust_poll_window(mx, mx, mx) == mx


def test_the_window_grows_while_events_come_soon_and_shrinks_when_polling_cannot_pay():
    with polled_loop(10_000 * MS) as (loop, probe):  # every wait is "soon" against 10 s
        assert loop.poll_ns == 0
        for _ in range(4):
            loop.run_sync(lambda: None)
        assert loop.poll_ns >= 2 * POLL_START_NS and loop.poll_grows >= 2
        # a window that polls to its end and then sleeps waited longer than poll-max-ns: shrunk
        loop.run_sync(lambda: loop.set_poll_params(100 * MS, window_ns=100 * MS))
        wait_for(lambda: loop.poll_phases and not probe.polling.is_set() and probe.ends, 60, "a window to expire")
        shrinks = loop.poll_shrinks
        loop.run_sync(lambda: None)
        assert loop.poll_shrinks == shrinks + 1 and loop.poll_ns == 0


def test_work_found_while_polling_is_served_without_sleeping_and_keeps_the_window():
    with polled_loop(10_000 * MS) as (loop, probe):
        loop.run_sync(lambda: loop.set_poll_params(10_000 * MS, window_ns=5_000 * MS))
        wait_for(probe.polling.is_set, 60, "the loop to poll")
        probe.work += 1  # no fd is written: only polling can see it
        wait_for(lambda: probe.done == 1, 60, "polling to find the work")
        assert loop.poll_successes >= 1 and loop.poll_ns == 5_000 * MS
        loop.set_poll_params(0)  # polling off: the loop leaves polling mode (end() runs)
        loop.run_sync(lambda: None)
        wait_for(lambda: probe.ends == probe.begins, 60, "polling to end")
        c = loop.poll_counters()
        assert c["successes"] >= 1 and c["rounds"] >= 1 and c["poll-ns"] > 0


def test_poll_max_zero_never_polls():
    with polled_loop(0) as (loop, probe):
        for _ in range(20):
            loop.run_sync(lambda: None)
        probe.work += 1
        loop.run_sync(lambda: None)
        assert probe.polls == probe.begins == probe.ends == 0 and probe.done == 0
        assert loop.poll_counters() == {"poll-max-ns": 0, "window-ns": 0, "rounds": 0, "phases": 0, "successes": 0,
                                         "recheck-hits": 0, "poll-ns": 0, "grows": 0, "shrinks": 0}


@pytest.mark.parametrize("how", ["sched-yield", "sleep-0", "none"])
def test_the_poll_loop_gives_the_gil_to_other_threads(how):
    """The work only another Python thread can produce: with the GIL given up between rounds it
    is produced (and found) while the loop polls; without (and no forced switch: a huge switch
    interval) the other thread runs only once the window is over and the loop sleeps."""
    target = 20_000
    counter = [0]
    with polled_loop(60_000 * MS, poll_yield=how) as (loop, probe):

        def count() -> None:
            probe.polling.wait(60)
            while counter[0] < target:
                counter[0] += 1
            probe.work += 1

        t = threading.Thread(target=count)
        t.start()
        old = sys.getswitchinterval()
        sys.setswitchinterval(1000.0)
        try:
            window = 60_000 * MS if how != "none" else 1_000 * MS  # the bounded wait of the negative case
            loop.run_sync(lambda: loop.set_poll_params(60_000 * MS, window_ns=window))
            t.join(120)
        finally:
            sys.setswitchinterval(old)
        assert counter[0] == target
        if how != "none":
            wait_for(lambda: probe.done == 1, 60, "polling to find the other thread's work")
            assert loop.poll_successes == 1
        else:  # the counter ran only after the window: the loop was asleep, nothing polled it
            wait_for(lambda: probe.ends >= 1, 60, "the window to end")
            assert loop.poll_successes == 0 and probe.done == 0


def test_stop_while_polling_returns():
    with polled_loop(600_000 * MS) as (loop, probe):
        loop.run_sync(lambda: loop.set_poll_params(600_000 * MS, window_ns=600_000 * MS))
        wait_for(probe.polling.is_set, 60, "the loop to poll")
        loop.stop(timeout=30)  # raises if the 10-minute window held the thread
        assert not loop.running


# -- the vhost-user back-end ------------------------------------------------------------------------
@contextmanager
def backend_and_driver(workdir: str, poll_max_ns: int, *, event_idx: bool = True):
    from kickcall.drive.vhost_user_blk import VhostUserBlkDriver
    from kickcall.vhost_user.backend import VhostUserBackend

    img = os.path.join(workdir, "d.img")
    make_image(img, 4 << 20)
    loop = IOThread("be", poll_max_ns=poll_max_ns)
    dev = VirtIOBlk("blk0", img, queue_size=64, aio="threads", loop=loop)
    be = VhostUserBackend(dev, socket_path=os.path.join(workdir, "s"), loop=loop)
    loop.start()
    be.start()
    drv = VhostUserBlkDriver(be.socket_path or "", ram=16 << 20, queue_size=64, reconnect=False, event_idx=event_idx)
    try:
        drv.connect(wait=30)
        assert drv.event_idx == event_idx
        yield loop, be, drv
    finally:
        drv.close()
        be.stop()
        loop.stop()
        dev.close()


def _queue(be, loop) -> dict:
    return loop.run_sync(be.status)["queues"][0]


@pytest.mark.parametrize("event_idx", [True, False], ids=["event-idx", "no-notify"])
def test_requests_are_served_through_polling_with_fewer_kicks_and_none_lost(workdir, event_idx):
    with backend_and_driver(workdir, 20 * MS, event_idx=event_idx) as (loop, be, drv):
        n = 300
        for i in range(n):
            data = bytes([i % 251]) * 4096
            assert drv.io(BLK_T_OUT, 8 * (i % 32), 4096, data)[0] == BLK_S_OK
            st, back = drv.io(BLK_T_IN, 8 * (i % 32), 4096)
            assert st == BLK_S_OK and back == data
        q = _queue(be, loop)
        assert q["polled-requests"] > 0  # (how many, and how many kicks it saved, is timing: bench's business)
        assert q["used-idx"] == 2 * n
        c = loop.run_sync(be.counters)
        assert c["queues"][0]["polled-requests"] == q["polled-requests"]
        assert c["polling"]["successes"] > 0 and c["polling"]["poll-max-ns"] == 20 * MS
        assert drv.error is None


@pytest.mark.parametrize("event_idx", [True, False], ids=["event-idx", "no-notify"])
@pytest.mark.parametrize("recheck", [True, False], ids=["recheck", "fix-off"])
def test_a_request_published_as_polling_ends_is_served(workdir, recheck, event_idx):
    """The driver publishes a request at the moment the back-end leaves polling (the hook runs
    before notifications are re-enabled): it sees them suppressed and does not kick.  The re-check
    after re-enabling finds it; with the re-check off the back-end sleeps and the request stalls."""
    with backend_and_driver(workdir, 1_000 * MS, event_idx=event_idx) as (loop, be, drv):
        be.faults.set_fix("poll-recheck", recheck)
        assert drv.io(BLK_T_IN, 0, 512)[0] == BLK_S_OK  # the ring is started (by a kick)
        r = drv.new_req(4096)
        published = threading.Event()
        seen: list[dict] = []

        def hook(index: int) -> None:
            if index != 0 or published.is_set():
                return
            seen.append(_queue_now(be))
            assert drv.submit(0, [(r, BLK_T_IN, 8, 4096)]) == 1
            # no polling from now on: only the re-check (or a kick) can find the request, not a
            # later poll pass that some other wake-up of the loop would start
            loop.set_poll_params(0)
            published.set()

        be.poll_end_hook = hook
        # one window of 50 ms: set on the loop thread, after this pass's adjustment, so the next
        # pass polls it to its end (nothing to find) and then leaves polling
        loop.run_sync(lambda: loop.set_poll_params(1_000 * MS, window_ns=50 * MS))
        assert published.wait(60), "the loop never left polling"
        kicks = seen[0]["kicks"]
        assert seen[0]["polling"] is False  # the hook runs as polling ends
        if recheck:
            assert r.done.wait(30), "the request published as polling ended was not served"
            q = _queue(be, loop)
            assert q["kicks"] == kicks  # the driver did not kick: the re-check found it
            assert q["polled-requests"] >= 1
            assert loop.poll_recheck_hits >= 1
        else:
            assert not r.done.wait(2.0)  # the bounded wait: no kick is coming, the loop sleeps
            assert _queue(be, loop)["kicks"] == kicks
            drv.kicks[0].set()  # clean up: a kick serves it
            assert r.done.wait(30)
        assert r.status_val == BLK_S_OK
        drv.free_req(r)


def _queue_now(be) -> dict:
    """The queue's status from the loop thread itself (inside the hook)."""
    return be.status()["queues"][0]


@pytest.mark.parametrize("event_idx", [True, False], ids=["event-idx", "no-notify"])
@pytest.mark.parametrize("restore", [True, False], ids=["restore", "fix-off"])
def test_a_ring_left_suppressed_by_a_dead_poller_gets_its_kicks_back(workdir, restore, event_idx):
    """A back-end that dies while it polls leaves the ring's notifications suppressed (NO_NOTIFY,
    or avail_event far away), and the driver does not kick.  The next back-end -- with polling off
    -- re-enables them when it takes the ring's kick fd, so the driver's next request kicks and is
    served; with that switched off the request waits for a kick that never comes."""
    from kickcall.drive.vhost_user_blk import VhostUserBlkDriver
    from kickcall.vhost_user.backend import VhostUserBackend
    from kickcall.virtio.layout import avail_event_addr, avail_idx_addr, used_flags_addr
    from kickcall.virtio.queue import VRING_USED_F_NO_NOTIFY

    img = os.path.join(workdir, "d.img")
    make_image(img, 4 << 20)
    sock = os.path.join(workdir, "s")

    def backend() -> tuple[IOThread, VirtIOBlk, VhostUserBackend]:
        loop = IOThread("be", poll_max_ns=0)
        dev = VirtIOBlk("blk0", img, queue_size=64, aio="threads", loop=loop)
        be = VhostUserBackend(dev, socket_path=sock, loop=loop)
        be.faults.set_fix("restore-notifications-on-start", restore)
        loop.start()
        be.start()
        return loop, dev, be

    loop, dev, be = backend()
    drv = VhostUserBlkDriver(sock, ram=16 << 20, queue_size=64, reconnect=True, event_idx=event_idx)
    second = None
    try:
        drv.connect(wait=30)
        assert drv.io(BLK_T_IN, 0, 512)[0] == BLK_S_OK
        be.stop()  # the first back-end goes away...
        loop.stop()
        dev.close()
        # ... as one that died while polling would: the suppression is still in the ring
        vq = drv.vqs[0]
        if event_idx:
            drv.mem.write_u16(avail_event_addr(vq.used, vq.num), (drv.mem.read_u16(avail_idx_addr(vq.avail)) + 0x8000) & 0xFFFF)
        else:
            drv.mem.write_u16(used_flags_addr(vq.used), drv.mem.read_u16(used_flags_addr(vq.used)) | VRING_USED_F_NO_NOTIFY)
        second = backend()
        wait_for(lambda: drv.reconnects == 1, 60, "the driver reconnected")
        r = drv.new_req(4096)
        assert drv.submit(0, [(r, BLK_T_IN, 8, 4096)]) == 1
        if restore:
            assert r.done.wait(30), "the driver did not kick: the ring's notifications stayed suppressed"
        else:
            assert not r.done.wait(2.0)  # the bounded wait: no kick is coming
            drv.kicks[0].set()  # clean up: a kick serves it
            assert r.done.wait(30)
        assert r.status_val == BLK_S_OK
        drv.free_req(r)
    finally:
        drv.close()
        if second is not None:
            loop2, dev2, be2 = second
            be2.stop()
            loop2.stop()
            dev2.close()
        else:
            be.stop()
            loop.stop()
            dev.close()

