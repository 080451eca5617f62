"""IOThread: an epoll event loop on its own thread (QEMU's AioContext / iothread).

* fd handlers are added and removed from any thread; ``remove_fd_handler`` does not return while
  that handler is still running (unless called from the handler itself, on the loop thread);
* bottom halves (``schedule``) run on the loop thread, in order, after the fd handlers of a pass;
* timers (``call_later``) run on the loop thread when due;
* an optional *context lock* (the machine's big lock) is held while handlers, bottom halves and
  timers run, so a thread that holds it knows no handler of this loop is running;
* ``stop()`` joins the thread and closes the epoll fd and the wake eventfd: nothing is left behind.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import os
import select
import threading
import time
from collections import deque
from typing import Any, Callable

from .threads import named_thread

__all__ = ["IOThread", "Timer", "LoopStopped"]

log = logging.getLogger("kickcall.loop")


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
                 thread_name: str | None = None) -> None:
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
    def set_fd_handler(self, fd: int, handler: Callable[[], None], events: int = select.EPOLLIN) -> None:
        """Call *handler()* on the loop thread whenever *fd* is readable (level-triggered), or for
        whatever other epoll *events* are asked (EPOLLRDHUP: the peer hung up)."""
        with self._mu:
            if self._stopping:
                raise LoopStopped(self.name)
            if fd in self._handlers:
                self._handlers[fd] = handler
                self._ep.modify(fd, events)
                return
            self._handlers[fd] = handler
            self._ep.register(fd, events)

    def remove_fd_handler(self, fd: int) -> bool:
        """Stop watching *fd*.  Returns only once the handler is not running (from another thread).

        Must be called before *fd* is closed.  Returns False if no handler was registered.

        The loop publishes ``_running_fd`` and then re-checks that the handler is still registered
        before calling it; we unpublish the handler and then check ``_running_fd``.  Either the
        loop sees the removal and skips the call, or we see it running and wait for it.
        """
        with self._mu:
            had = self._handlers.pop(fd, None) is not None
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
        while not self._stopping:
            try:
                events = ep.poll(self._next_timeout())
            except InterruptedError:
                continue
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
