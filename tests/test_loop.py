"""IOThread: fd handlers, removal semantics, context lock, bottom halves, timers, stop."""

from __future__ import annotations

import os
import threading

import pytest

from kickcall.loop import IOThread, LoopStopped
from helpers import fd_count, wait_for

CEIL = 10.0


@pytest.fixture
def efd():
    fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
    try:
        yield fd
    finally:
        os.close(fd)


@pytest.fixture
def loop():
    lp = IOThread("test-loop").start()
    try:
        yield lp
    finally:
        lp.stop()


def drain(fd: int) -> int:
    try:
        return os.eventfd_read(fd)
    except BlockingIOError:
        return 0


# -- fd handlers --------------------------------------------------------------------------------------

def test_fd_handler_runs_on_the_loop_thread(loop, efd):
    seen = []
    ran = threading.Event()

    def h():
        seen.append((drain(efd), threading.current_thread().name, loop.in_thread()))
        ran.set()

    loop.set_fd_handler(efd, h)
    assert loop.has_fd_handler(efd)
    assert not loop.in_thread()
    os.eventfd_write(efd, 3)
    assert ran.wait(CEIL)
    assert seen[0] == (3, "test-loop", True)
    assert loop.dispatches >= 1


def test_set_fd_handler_twice_replaces_handler(loop, efd):
    got = []
    done = threading.Event()
    loop.set_fd_handler(efd, lambda: got.append(("old", drain(efd))))
    loop.set_fd_handler(efd, lambda: (got.append(("new", drain(efd))), done.set()))
    os.eventfd_write(efd, 1)
    assert done.wait(CEIL)
    assert got == [("new", 1)]


def test_remove_waits_for_running_handler(loop, efd):
    entered = threading.Event()
    release = threading.Event()
    finished = threading.Event()

    def h():
        drain(efd)
        entered.set()
        release.wait(CEIL)
        finished.set()

    loop.set_fd_handler(efd, h)
    os.eventfd_write(efd, 1)
    assert entered.wait(CEIL)

    result = []
    removed = threading.Event()

    def remover():
        result.append(loop.remove_fd_handler(efd))
        removed.set()

    t = threading.Thread(target=remover, name="remover")
    t.start()
    try:
        # remove_fd_handler holds the loop's lock from popping the handler until it waits for
        # the running handler: once has_fd_handler() (same lock) sees it gone, the remover is
        # inside that wait -- or has wrongly returned.
        wait_for(lambda: not loop.has_fd_handler(efd), what="the remover to unregister the fd")
        assert not removed.is_set(), "remove_fd_handler returned while the handler was still running"
        assert not finished.is_set()
        assert t.is_alive()
    finally:
        release.set()
        assert removed.wait(CEIL)
        t.join(CEIL)
    assert not t.is_alive()
    assert finished.is_set()  # it returned only after the handler had finished
    assert result == [True]
    assert loop.remove_fd_handler(efd) is False


def test_remove_from_inside_the_handler(loop, efd):
    result = []
    done = threading.Event()

    def h():
        drain(efd)
        result.append(loop.remove_fd_handler(efd))
        done.set()

    loop.set_fd_handler(efd, h)
    os.eventfd_write(efd, 1)
    assert done.wait(CEIL), "remove_fd_handler from its own handler deadlocked"
    assert result == [True]
    assert not loop.has_fd_handler(efd)
    # the loop still works, and the removed handler is not called again
    os.eventfd_write(efd, 1)
    assert loop.run_sync(lambda: 42) == 42
    assert result == [True]
    assert drain(efd) == 1


def test_remove_while_holding_context_lock_does_not_wait(efd):
    lock = threading.RLock()
    loop = IOThread("locked-loop", lock=lock).start()
    try:
        calls = []
        loop.set_fd_handler(efd, lambda: calls.append(drain(efd)))
        outcome = []
        done = threading.Event()

        def holder():
            with lock:
                os.eventfd_write(efd, 1)  # the loop wakes but cannot run a handler: we hold the lock
                outcome.append(loop.remove_fd_handler(efd))
                done.set()

        t = threading.Thread(target=holder)
        t.start()
        try:
            assert done.wait(CEIL), "remove_fd_handler under the context lock waited (deadlock)"
        finally:
            t.join(CEIL)
        assert outcome == [True]
        # after the lock is released, the loop makes a pass; the removed handler never ran
        assert loop.run_sync(lambda: "pass") == "pass"
        assert calls == []
        assert drain(efd) == 1
    finally:
        loop.stop()


def test_context_lock_is_held_while_handlers_run(efd):
    lock = threading.RLock()
    loop = IOThread("locked-loop2", lock=lock).start()
    try:
        owned = []
        done = threading.Event()

        def h():
            drain(efd)
            # an RLock held by this thread can be re-acquired without blocking; by another, not
            owned.append(lock._is_owned())
            done.set()

        loop.set_fd_handler(efd, h)
        os.eventfd_write(efd, 1)
        assert done.wait(CEIL)
        assert owned == [True]
        assert loop.run_sync(lambda: lock._is_owned()) is True
    finally:
        loop.stop()


# -- bottom halves and timers -------------------------------------------------------------------------

def test_bottom_halves_run_in_order_on_the_loop(loop):
    order = []
    threads = set()
    for i in range(100):
        loop.schedule(lambda i=i: (order.append(i), threads.add(threading.current_thread().name)))
    loop.run_sync(lambda: None)
    assert order == list(range(100))
    assert threads == {"test-loop"}
    assert loop.bh_runs >= 100


def test_bottom_half_scheduled_from_a_bottom_half(loop):
    order = []
    done = threading.Event()

    def first():
        order.append("first")
        loop.schedule(lambda: (order.append("nested"), done.set()))

    # queue both from the loop thread, so the loop cannot run "first" before "second" is queued
    loop.run_sync(lambda: (loop.schedule(first), loop.schedule(lambda: order.append("second"))))
    assert done.wait(CEIL)
    assert order == ["first", "second", "nested"]


def test_timers_fire_and_cancel_prevents_firing(loop):
    fired = []
    last = threading.Event()
    loop.call_later(0.01, fired.append, "a")
    cancelled = loop.call_later(0.02, fired.append, "cancelled")
    loop.call_later(0.0, fired.append, "zero")
    cancelled.cancel()
    # a later timer: once it has fired, the cancelled one's time has passed too
    loop.call_later(0.05, lambda: (fired.append("last"), last.set()))
    assert last.wait(CEIL)
    assert "cancelled" not in fired
    assert sorted(fired) == ["a", "last", "zero"]
    assert fired[-1] == "last"  # due last (its deadline is the latest)


def test_timer_args_and_thread(loop):
    got = []
    ev = threading.Event()
    loop.call_later(0.001, lambda a, b: (got.append((a, b, loop.in_thread())), ev.set()), 1, "x")
    assert ev.wait(CEIL)
    assert got == [(1, "x", True)]


def test_run_sync_returns_value_and_reraises(loop):
    assert loop.run_sync(lambda a, b: a * b, 6, 7) == 42
    assert loop.run_sync(lambda: threading.current_thread().name) == "test-loop"

    class Boom(Exception):
        pass

    err = Boom("from the loop")

    def raiser():
        raise err

    with pytest.raises(Boom) as ei:
        loop.run_sync(raiser)
    assert ei.value is err
    assert loop.run_sync(lambda: "still alive") == "still alive"


def test_run_sync_from_the_loop_thread_runs_inline(loop):
    assert loop.run_sync(lambda: loop.run_sync(lambda: 5) + 1) == 6


# -- errors ---------------------------------------------------------------------------------------------

def test_raising_handler_does_not_kill_the_loop(loop, efd):
    other = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
    try:
        bad_runs = []
        good = threading.Event()

        def bad():
            bad_runs.append(drain(efd))
            raise RuntimeError("handler failure (expected by the test)")

        def good_h():
            drain(other)
            good.set()

        loop.set_fd_handler(efd, bad)
        loop.set_fd_handler(other, good_h)
        errors0 = loop.errors
        os.eventfd_write(efd, 1)
        wait_for(lambda: loop.errors == errors0 + 1, what="the error to be counted")
        assert loop.running
        os.eventfd_write(other, 1)
        assert good.wait(CEIL)
        os.eventfd_write(efd, 1)
        wait_for(lambda: loop.errors == errors0 + 2, what="the second error")
        assert bad_runs == [1, 1]
        assert loop.run_sync(lambda: 1) == 1
        loop.remove_fd_handler(other)
    finally:
        os.close(other)


def test_raising_bottom_half_and_timer_do_not_stop_later_ones(loop):
    order = []

    def boom():
        raise ValueError("bh failure (expected by the test)")

    errors0 = loop.errors
    loop.schedule(boom)
    loop.schedule(order.append, "after-bh")
    loop.call_later(0.0, boom)
    ev = threading.Event()
    loop.call_later(0.01, lambda: (order.append("after-timer"), ev.set()))
    assert ev.wait(CEIL)
    assert order == ["after-bh", "after-timer"]
    assert loop.errors == errors0 + 2


# -- stop -----------------------------------------------------------------------------------------------

def test_stop_leaves_nothing_behind_and_is_idempotent(efd):
    before_fds = fd_count()
    loop = IOThread("stop-me")
    assert fd_count() == before_fds + 2  # the epoll fd and the wake eventfd
    loop.start()
    assert loop.running
    assert any(t.name == "stop-me" for t in threading.enumerate())
    thread = loop._thread
    loop.set_fd_handler(efd, lambda: drain(efd))
    loop.call_later(3600, lambda: None)
    loop.schedule(lambda: None)
    loop.stop()
    assert not thread.is_alive()
    assert not loop.running
    assert not any(t.name == "stop-me" for t in threading.enumerate())
    assert fd_count() == before_fds
    loop.stop()  # idempotent
    loop.stop()
    assert fd_count() == before_fds
    # everything that would need the loop refuses
    with pytest.raises(LoopStopped):
        loop.schedule(lambda: None)
    with pytest.raises(LoopStopped):
        loop.call_later(0.0, lambda: None)
    with pytest.raises(LoopStopped):
        loop.set_fd_handler(efd, lambda: None)
    with pytest.raises(LoopStopped):
        loop.run_sync(lambda: None)


def test_stop_without_start_closes_fds():
    before = fd_count()
    loop = IOThread("never-started")
    loop.stop()
    assert fd_count() == before
    loop.stop()
    with pytest.raises(LoopStopped):
        loop.schedule(lambda: None)


def test_start_twice_is_one_thread():
    loop = IOThread("once")
    try:
        loop.start()
        t = loop._thread
        assert loop.start() is loop
        assert loop._thread is t
        assert sum(1 for x in threading.enumerate() if x.name == "once") == 1
    finally:
        loop.stop()
