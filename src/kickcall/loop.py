"""IOThread: an epoll event loop on its own thread (QEMU's AioContext / iothread).

* fd handlers are added and removed from any thread; ``remove_fd_handler`` does not return while
  that handler is still running (unless called from the handler itself, on the loop thread);
* bottom halves (``schedule``) run on the loop thread, in order, after the fd handlers of a pass;
* timers (``call_later``) run on the loop thread when due;
* an optional *context lock* (the machine's big lock) is held while handlers, bottom halves and
  timers run, so a thread that holds it knows no handler of this loop is running;
* ``stop()`` joins the thread and closes the epoll fd and the wake eventfd: nothing is left behind.

Adaptive polling (QEMU's AioContext ``poll-max-ns``, ``poll-grow``, ``poll-shrink``): an fd handler
may carry a ``PollHandler`` -- a side-effect-free check (``poll``: is there work?), what to do when
it says yes (``ready``), and ``begin``/``end`` callbacks that suppress and re-enable the device's
notifications.  Before sleeping in epoll the loop runs the poll checks for up to its current window
(``poll_ns``); while they keep finding work the loop stays in polling mode (notifications stay
suppressed, epoll is only asked without waiting).  A window that ends without work calls every
``end``, which re-enables notifications and says whether work came in meanwhile (the check after
re-enabling that virtio requires); then the loop sleeps.  After each pass the window adapts to how
long the loop waited for something to happen (``block_ns``): within the window, kept; longer than
``poll_max_ns`` (polling could not have paid), shrunk (divided by ``poll_shrink``, or to 0 by
default); in between, grown (multiplied by ``poll_grow``, 2 by default, starting at 4 us, at most
``poll_max_ns``).  ``poll_max_ns`` 0 disables polling: the loop is exactly the plain epoll loop.

A busy poll in Python holds the GIL, which starves the process's other threads (the I/O workers
whose completions the loop is waiting for, the monitor): between poll rounds the loop gives the
GIL up (``poll_yield``: ``sched_yield`` by default, see ``POLL_YIELDS``).
"""

from __future__ import annotations

import functools
import heapq
import itertools
import logging
import os
import select
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Any, Callable, Literal

from . import trace

from .threads import named_thread

__all__ = ["IOThread", "Timer", "LoopStopped", "PollHandler", "adjust_poll_window", "PollYield", "POLL_YIELDS", "POLL_START_NS"]

log = logging.getLogger("kickcall.loop")
_t_poll_grow = trace.event("poll_grow", "an IOThread's polling window grew (QEMU's poll_grow)")
_t_poll_shrink = trace.event("poll_shrink", "an IOThread's polling window shrank (QEMU's poll_shrink)")

POLL_START_NS = 4000  # the first window after 0 (QEMU starts polling at 4 us)
# How the poll loop gives the GIL up between rounds: os.sched_yield() (the GIL is released around
# the syscall, and a runnable thread on this CPU runs), time.sleep(0) (released around a zero
# sleep), or not at all (other threads run only when the interpreter forces a switch, every
# sys.getswitchinterval() seconds).
PollYield = Literal["sched-yield", "sleep-0", "none"]
POLL_YIELDS: tuple[str, ...] = ("sched-yield", "sleep-0", "none")


def adjust_poll_window(ns: int, block_ns: int, max_ns: int, grow: int = 0, shrink: int = 0) -> int:
    """The next polling window after a pass that waited *block_ns* for something to do, polling
    included (QEMU's adjust_polling_time): found within the window *ns*, kept; a wait longer than
    *max_ns* (polling could not have paid), shrunk -- divided by *shrink*, or to 0 when it is 0;
    a wait between the two, grown -- multiplied by *grow* (0: 2), from 0 to ``POLL_START_NS``, at
    most *max_ns*."""
    if block_ns <= ns:
        return ns
    if block_ns > max_ns:
        return ns // shrink if shrink else 0
    if ns < max_ns:
        return min(max_ns, ns * (grow or 2) if ns else POLL_START_NS)
    return ns


@dataclass(frozen=True)
class PollHandler:
    """What an fd handler polls (QEMU's io_poll, io_poll_ready, io_poll_begin, io_poll_end).

    ``poll()`` says whether there is work, without side effects (a load of a ring index);
    ``ready()`` does the work it found.  ``begin()`` is called when the loop starts polling (the
    device suppresses its notifications); ``end()`` when it stops (the device re-enables them),
    and returns True if work came in meanwhile -- the check after re-enabling notifications that
    a driver racing with the re-enable needs: ``ready()`` is then called.  All run on the loop
    thread, under the loop's context lock if it has one."""

    poll: Callable[[], bool]
    ready: Callable[[], None]
    begin: Callable[[], None] | None = None
    end: Callable[[], bool] | None = None


class LoopStopped(RuntimeError):
    pass


class Timer:
    """A one-shot timer; ``cancel()`` from any thread."""

    __slots__ = ("when", "seq", "fn", "args", "cancelled")

    def __init__(self, when: float, seq: int, fn: Callable, args: tuple) -> None:
        self.when = when
        self.seq = seq
        self.fn = fn
        self.args = args
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True

    def __lt__(self, other: "Timer") -> bool:
        return (self.when, self.seq) < (other.when, other.seq)


class IOThread:
    """An epoll loop on its own thread."""

    def __init__(self, name: str = "iothread", lock: Any | None = None, profile_path: str | None = None,
                 thread_name: str | None = None, *, poll_max_ns: int = 0, poll_grow: int = 0, poll_shrink: int = 0,
                 poll_yield: PollYield = "sched-yield") -> None:
        self.name = name
        self.thread_name = thread_name or name  # the loop thread's name (Python and kernel; docs/threads.md)
        self.profile_path = profile_path  # cProfile the loop thread, stats written here on stop
        self._ctx_lock = lock
        self._ep = select.epoll()
        self._wake = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._ep.register(self._wake, select.EPOLLIN)
        self._mu = threading.Lock()
        self._idle = threading.Condition(self._mu)
        self._handlers: dict[int, Callable[[], None]] = {}
        self._running_fd: int | None = None
        self._removers = 0  # threads waiting in remove_fd_handler
        self._bhs: deque = deque()
        self._timers: list[Timer] = []
        self._seq = itertools.count()
        self._stopping = False
        self._thread: threading.Thread | None = None
        self.dispatches = 0  # fd handler runs
        self.bh_runs = 0
        self.errors = 0
        # adaptive polling (see the module's docstring)
        self._polls: dict[int, PollHandler] = {}
        self._poll_list: tuple[tuple[int, PollHandler], ...] = ()  # the loop's snapshot of _polls
        self._poll_started: list[tuple[int, PollHandler]] = []  # begin() ran, end() has not
        self.poll_max_ns = 0
        self.poll_grow = 0
        self.poll_shrink = 0
        self.poll_ns = 0  # the current window
        self.poll_yield: PollYield = poll_yield
        self.set_poll_params(poll_max_ns, poll_grow, poll_shrink)
        self.poll_rounds = 0  # rounds of poll checks (every handler's poll() once)
        self.poll_phases = 0  # times the loop polled before (instead of) sleeping
        self.poll_successes = 0  # poll phases that found work (the loop did not sleep)
        self.poll_recheck_hits = 0  # end() found work that came in while notifications were re-enabled
        self.poll_time_ns = 0  # time spent polling
        self.poll_grows = 0
        self.poll_shrinks = 0

    # -- life cycle ---------------------------------------------------------------------------
    def start(self) -> "IOThread":
        if self._thread is not None:
            return self
        self._thread = named_thread(self._run, self.thread_name)
        self._thread.start()
        return self

    def in_thread(self) -> bool:
        return threading.current_thread() is self._thread

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the loop, join its thread, close its fds.  Idempotent."""
        with self._mu:
            if self._stopping and self._thread is None:
                return
            self._stopping = True
        self._kick()
        t = self._thread
        if t is not None and not self.in_thread():
            t.join(timeout)
            if t.is_alive():
                raise RuntimeError(f"{self.name}: loop thread did not stop within {timeout}s")
        self._thread = None
        with self._mu:
            self._handlers.clear()
            self._polls.clear()
            self._poll_list = ()
            self._bhs.clear()
            self._timers.clear()
        if self._wake >= 0:
            self._ep.close()
            os.close(self._wake)
            self._wake = -1

    def _kick(self) -> None:
        w = self._wake
        if w >= 0:
            try:
                os.eventfd_write(w, 1)
            except OSError:
                pass

    # -- fd handlers ----------------------------------------------------------------------------
    def set_fd_handler(self, fd: int, handler: Callable[[], None], events: int = select.EPOLLIN, *,
                       poll: PollHandler | None = None) -> None:
        """Call *handler()* on the loop thread whenever *fd* is readable (level-triggered), or for
        whatever other epoll *events* are asked (EPOLLRDHUP: the peer hung up).  With *poll*, the
        loop also polls for the fd's work before sleeping (when polling is on: ``poll_max_ns``);
        setting the handler again without *poll* stops polling for it (its ``end()`` is not
        called: whoever replaces or removes a poll handler restores notifications as it needs)."""
        with self._mu:
            if self._stopping:
                raise LoopStopped(self.name)
            if poll is not None:
                self._polls[fd] = poll
            else:
                self._polls.pop(fd, None)
            self._poll_list = tuple(self._polls.items())
            if fd in self._handlers:
                self._handlers[fd] = handler
                self._ep.modify(fd, events)
                return
            self._handlers[fd] = handler
            self._ep.register(fd, events)

    def set_poll_params(self, max_ns: int, grow: int = 0, shrink: int = 0, window_ns: int | None = None) -> None:
        """QEMU's iothread properties ``poll-max-ns``, ``poll-grow`` (0: double), ``poll-shrink``
        (0: back to 0); *window_ns* sets the current window (at most *max_ns*).  Any thread; the
        loop uses them from its next pass.  ``max_ns`` 0 disables polling."""
        if max_ns < 0 or grow < 0 or shrink < 0:
            raise ValueError("poll parameters must not be negative")
        self.poll_max_ns = int(max_ns)
        self.poll_grow = int(grow)
        self.poll_shrink = int(shrink)
        if window_ns is not None:
            self.poll_ns = max(0, min(int(window_ns), self.poll_max_ns))
        elif self.poll_ns > self.poll_max_ns:
            self.poll_ns = self.poll_max_ns

    def poll_counters(self) -> dict[str, int]:
        """The polling counters (kebab-case, as the counters document has them)."""
        return {"poll-max-ns": self.poll_max_ns, "window-ns": self.poll_ns, "rounds": self.poll_rounds,
                "phases": self.poll_phases, "successes": self.poll_successes,
                "recheck-hits": self.poll_recheck_hits, "poll-ns": self.poll_time_ns,
                "grows": self.poll_grows, "shrinks": self.poll_shrinks}

    def remove_fd_handler(self, fd: int) -> bool:
        """Stop watching *fd*.  Returns only once the handler is not running (from another thread).

        Must be called before *fd* is closed.  Returns False if no handler was registered.

        The loop publishes ``_running_fd`` and then re-checks that the handler is still registered
        before calling it; we unpublish the handler and then check ``_running_fd``.  Either the
        loop sees the removal and skips the call, or we see it running and wait for it.
        """
        with self._mu:
            had = self._handlers.pop(fd, None) is not None
            if self._polls.pop(fd, None) is not None:
                self._poll_list = tuple(self._polls.items())
            if had:
                try:
                    self._ep.unregister(fd)
                except (OSError, ValueError):
                    pass
            if not self.in_thread():
                self._removers += 1
                try:
                    while self._running_fd == fd:
                        self._idle.wait(0.05)
                finally:
                    self._removers -= 1
        return had

    def has_fd_handler(self, fd: int) -> bool:
        with self._mu:
            return fd in self._handlers

    # -- bottom halves and timers ----------------------------------------------------------------
    def schedule(self, fn: Callable, *args: Any) -> None:
        """Run ``fn(*args)`` on the loop thread soon (a bottom half)."""
        with self._mu:
            if self._stopping:
                raise LoopStopped(self.name)
            self._bhs.append((fn, args))
        self._kick()

    def call_later(self, delay: float, fn: Callable, *args: Any) -> Timer:
        t = Timer(time.monotonic() + max(0.0, delay), next(self._seq), fn, args)
        with self._mu:
            if self._stopping:
                raise LoopStopped(self.name)
            heapq.heappush(self._timers, t)
        self._kick()
        return t

    def run_sync(self, fn: Callable, *args: Any, timeout: float | None = 30.0) -> Any:
        """Run ``fn(*args)`` on the loop thread and return its result (or raise its exception)."""
        if self.in_thread():
            return fn(*args)
        done = threading.Event()
        box: list = [None, None]

        def bh() -> None:
            try:
                box[0] = fn(*args)
            except BaseException as e:  # handed back to the caller
                box[1] = e
            finally:
                done.set()

        self.schedule(bh)
        if not done.wait(timeout):
            raise TimeoutError(f"{self.name}: run_sync timed out after {timeout}s")
        if box[1] is not None:
            raise box[1]
        return box[0]

    # -- the loop ---------------------------------------------------------------------------------
    def _next_timeout(self) -> float:
        if self._bhs:
            return 0.0
        if not self._timers:
            return -1.0
        with self._mu:
            if self._bhs:
                return 0.0
            while self._timers and self._timers[0].cancelled:
                heapq.heappop(self._timers)
            if not self._timers:
                return -1.0
            return max(0.0, self._timers[0].when - time.monotonic())

    def _run(self) -> None:
        if self.profile_path is None:
            self._loop()
            return
        import cProfile

        prof = cProfile.Profile()
        prof.enable()
        try:
            self._loop()
        finally:
            prof.disable()
            prof.dump_stats(self.profile_path)

    def _loop(self) -> None:
        wake = self._wake
        ep = self._ep
        lock = self._ctx_lock
        handlers = self._handlers
        now_ns = time.monotonic_ns
        while not self._stopping:
            timeout = self._next_timeout()
            adapt = False
            start = 0
            if (self.poll_max_ns or self._poll_started) and timeout != 0.0:
                adapt = self.poll_max_ns > 0 and bool(self._poll_list)
                start = now_ns()
                if self._poll_phase(timeout):
                    timeout = 0.0
            try:
                events = ep.poll(timeout)
            except InterruptedError:
                continue
            if adapt:
                self._adjust_poll(now_ns() - start)
            if lock is not None:
                lock.acquire()
            try:
                for fd, _ev in events:
                    if fd == wake:
                        try:
                            os.eventfd_read(wake)
                        except BlockingIOError:
                            pass
                        continue
                    h = handlers.get(fd)
                    if h is None:
                        continue
                    self._running_fd = fd
                    if handlers.get(fd) is not h:  # removed meanwhile: see remove_fd_handler
                        self._running_fd = None
                        continue
                    try:
                        h()
                    except Exception:
                        self.errors += 1
                        log.exception("%s: fd %d handler failed", self.name, fd)
                    finally:
                        self._running_fd = None
                        if self._removers:
                            with self._mu:
                                self._idle.notify_all()
                        self.dispatches += 1
                if self._bhs:
                    self._run_bhs()
                if self._timers:
                    self._run_timers()
            finally:
                if lock is not None:
                    lock.release()

    # -- adaptive polling ---------------------------------------------------------------------------
    def _poll_phase(self, timeout: float) -> bool:
        """Poll before sleeping (QEMU's try_poll_mode).  True: work was found (or a bottom half
        came), the loop must not sleep and stays in polling mode; False: polling has ended (every
        ``end()`` called), the loop may sleep."""
        ns = self.poll_ns
        if timeout >= 0:
            ns = min(ns, int(timeout * 1e9))
        if ns > 0 and self.poll_max_ns and self._poll_list:
            self.poll_phases += 1
            if self._run_poll_handlers(ns):
                return True
        return self._end_polling()

    def _guarded(self, fd: int, ph: PollHandler, fn: Callable[[], Any]) -> Any:
        """Call *fn* (one of *ph*'s callbacks) unless *fd*'s poll handler was removed meanwhile
        (the same hand-shake as fd handlers: see remove_fd_handler).  None if skipped or failed."""
        self._running_fd = fd
        try:
            if self._polls.get(fd) is not ph:
                return None
            return fn()
        except Exception:
            self.errors += 1
            log.exception("%s: fd %d poll handler failed", self.name, fd)
            return None
        finally:
            self._running_fd = None
            if self._removers:
                with self._mu:
                    self._idle.notify_all()

    def _begin_polling(self, handlers: tuple[tuple[int, PollHandler], ...]) -> None:
        have = {id(ph) for _fd, ph in self._poll_started}
        for fd, ph in handlers:
            if id(ph) in have:
                continue
            self._poll_started.append((fd, ph))
            if ph.begin is not None:
                self._guarded(fd, ph, ph.begin)

    def _run_poll_handlers(self, ns: int) -> bool:
        lock = self._ctx_lock
        now = time.monotonic_ns
        yld: Callable[[], Any] | None = None
        if self.poll_yield == "sched-yield":
            yld = os.sched_yield
        elif self.poll_yield == "sleep-0":
            yld = functools.partial(time.sleep, 0)
        start = now()
        deadline = start + ns
        progress = False
        rounds = 0
        begun: tuple | None = None
        try:
            while True:
                handlers = self._poll_list
                if lock is not None:
                    lock.acquire()
                try:
                    if handlers is not begun:
                        self._begin_polling(handlers)
                        begun = handlers
                    for fd, ph in handlers:
                        if self._guarded(fd, ph, ph.poll):
                            self._guarded(fd, ph, ph.ready)
                            progress = True
                finally:
                    if lock is not None:
                        lock.release()
                rounds += 1
                if progress or self._bhs or self._stopping or now() >= deadline:
                    break
                if yld is not None:
                    yld()  # give the GIL (and this CPU) to whoever waits for it
        finally:
            self.poll_rounds += rounds
            self.poll_time_ns += now() - start
        if progress:
            self.poll_successes += 1
            return True
        return bool(self._bhs) and not self._stopping

    def _end_polling(self) -> bool:
        """Leave polling mode: every ``end()`` (re-enable notifications, re-check); True if a
        re-check found work (it has been handed to ``ready()``: the loop must not sleep)."""
        if not self._poll_started:
            return False
        started, self._poll_started = self._poll_started, []
        lock = self._ctx_lock
        found = False
        if lock is not None:
            lock.acquire()
        try:
            for fd, ph in started:
                end = ph.end if ph.end is not None else ph.poll  # no end(): poll one last time
                if self._guarded(fd, ph, end):
                    self._guarded(fd, ph, ph.ready)
                    found = True
        finally:
            if lock is not None:
                lock.release()
        if found:
            self.poll_recheck_hits += 1
        return found

    def _adjust_poll(self, block_ns: int) -> None:
        ns = self.poll_ns
        new = adjust_poll_window(ns, block_ns, self.poll_max_ns, self.poll_grow, self.poll_shrink)
        if new == ns:
            return
        self.poll_ns = new
        if new > ns:
            self.poll_grows += 1
            ev = _t_poll_grow
        else:
            self.poll_shrinks += 1
            ev = _t_poll_shrink
        if ev.enabled:
            ev.emit(iothread=self.name, old=ns, new=new)

    def _run_bhs(self) -> None:
        while True:
            with self._mu:
                if not self._bhs:
                    return
                fn, args = self._bhs.popleft()
            try:
                fn(*args)
            except Exception:
                self.errors += 1
                log.exception("%s: bottom half %r failed", self.name, fn)
            self.bh_runs += 1

    def _run_timers(self) -> None:
        now = time.monotonic()
        while True:
            with self._mu:
                if not self._timers or self._timers[0].when > now:
                    return
                t = heapq.heappop(self._timers)
            if t.cancelled:
                continue
            try:
                t.fn(*t.args)
            except Exception:
                self.errors += 1
                log.exception("%s: timer %r failed", self.name, t.fn)
