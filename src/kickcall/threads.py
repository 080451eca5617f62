"""Named threads: the Python name and the Linux task name (``comm``) set together.

Python's ``threading.Thread(name=...)`` names the thread for Python only: every thread of a
kickcall process shows up in ``/proc/<pid>/task/*/comm``, ``top -H``, ``ps -L``, ``perf`` and gdb
as the interpreter's name (``python``).  Every thread kickcall starts goes through this module,
which also sets the kernel's name for the thread (``prctl(PR_SET_NAME)``, as glibc's
``pthread_setname_np`` does for the calling thread), from the thread itself before it runs its
target.

Naming scheme (the whole inventory is in docs/threads.md): ``kc-`` + the thread's role + an index
where a process has several of the same role (``kc-loop``, ``kc-vcpu0``, ``kc-aio3``,
``kc-hvchan``, ``kc-qmp``, ``kc-qmp-exec2``).  The kernel keeps at most ``TASK_COMM_LEN - 1`` = 15
bytes, so a longer name is refused here (``ThreadNameError``) rather than cut short by the kernel,
which would leave names that the inventory does not list.  The main thread of a process keeps the
process's name: renaming it would rename the process for ``ps``/``pgrep``.
"""

from __future__ import annotations

import concurrent.futures
import ctypes
import itertools
import logging
import threading
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from .faults import PROCESS

__all__ = ["COMM_MAX", "PREFIX", "SET_OS_NAME", "ThreadNameError", "NamedThread", "check_name",
           "set_os_thread_name", "name_current_thread", "named_thread", "start_thread", "pool_initializer",
           "named_pool"]

log = logging.getLogger("kickcall.threads")

COMM_MAX = 15  # TASK_COMM_LEN (16) minus the terminating NUL
PREFIX = "kc-"  # every thread kickcall starts; the main thread keeps the process's name
_PR_SET_NAME = 15  # linux/prctl.h
# Test switch: False leaves the kernel's task name as Python leaves it (inherited from the thread
# that started the thread); tests/test_threads.py turns it off to show the names come back unset.
SET_OS_NAME = PROCESS.switch("name-os-threads", "off: threads keep the kernel task name they inherit, so "
                             "/proc/PID/task/*/comm no longer says which thread is which")

_prctl: Callable[..., int] | None = None
_prctl_looked_up = False
_lookup_mu = threading.Lock()


class ThreadNameError(ValueError):
    """A thread name the kernel would not keep as given (too long, not printable ASCII, empty).
    Raised where the thread is created: it is a bug in the caller, not a runtime condition."""


def check_name(name: str) -> str:
    """Return *name* if the kernel keeps it unchanged as a task name, else raise ``ThreadNameError``."""
    if not name or len(name.encode("utf-8")) > COMM_MAX or not name.isascii() or not name.isprintable():
        raise ThreadNameError(f"thread name {name!r}: must be 1 to {COMM_MAX} printable ASCII characters "
                              f"(the kernel's task name length)")
    return name


def _lookup_prctl() -> Callable[..., int] | None:
    global _prctl, _prctl_looked_up
    with _lookup_mu:
        if not _prctl_looked_up:
            _prctl_looked_up = True
            try:
                # dlopen(NULL): the symbols the process already has, libc's among them.  Not
                # ctypes.util.find_library("c"): it runs /sbin/ldconfig, and a Ctrl-C that kills
                # ldconfig sends it on to gcc with a NamedTemporaryFile in $TMPDIR, which a process
                # interrupted at that moment leaves behind (tests/test_signals.py saw it)
                libc = ctypes.CDLL(None, use_errno=True)
                _prctl = libc.prctl
            except (OSError, AttributeError) as e:  # not Linux/glibc: Python names only
                log.debug("no prctl(): thread names stay Python-only (%s)", e)
                _prctl = None
    return _prctl


def set_os_thread_name(name: str) -> bool:
    """Set the calling thread's kernel task name (``prctl(PR_SET_NAME)``); False if the platform
    has no such call or the kernel refused (the Python name is unaffected)."""
    raw = check_name(name).encode("ascii")
    fn = _lookup_prctl() if SET_OS_NAME.fix_on else None
    if fn is None:
        return False
    if fn(_PR_SET_NAME, ctypes.c_char_p(raw), 0, 0, 0) != 0:
        log.debug("prctl(PR_SET_NAME, %r) failed: errno %d", name, ctypes.get_errno())
        return False
    return True


def name_current_thread(name: str) -> None:
    """Give the calling thread *name*, in Python and in the kernel."""
    threading.current_thread().name = check_name(name)
    set_os_thread_name(name)


class NamedThread(threading.Thread):
    """A ``threading.Thread`` whose kernel task name is its Python name, set by the thread itself
    as it starts (``PR_SET_NAME`` names only the calling thread).  Daemon unless told otherwise."""

    def __init__(self, target: Callable[..., object], name: str, *, args: Iterable[Any] = (),
                 kwargs: Mapping[str, Any] | None = None, daemon: bool = True) -> None:
        super().__init__(target=target, name=check_name(name), args=args, kwargs=kwargs, daemon=daemon)

    def run(self) -> None:
        set_os_thread_name(self.name)
        super().run()


def named_thread(target: Callable[..., object], name: str, *, args: Iterable[Any] = (),
                 kwargs: Mapping[str, Any] | None = None, daemon: bool = True) -> NamedThread:
    """A named thread, not started yet (for a caller that records it before starting it)."""
    return NamedThread(target, name, args=args, kwargs=kwargs, daemon=daemon)


def start_thread(target: Callable[..., object], name: str, *, args: Iterable[Any] = (),
                 kwargs: Mapping[str, Any] | None = None, daemon: bool = True) -> NamedThread:
    """Start *target* on a new named thread (daemon by default) and return the thread."""
    t = NamedThread(target, name, args=args, kwargs=kwargs, daemon=daemon)
    t.start()
    return t


def pool_initializer(prefix: str, max_workers: int) -> Callable[[], None]:
    """An ``initializer`` for ``concurrent.futures.ThreadPoolExecutor`` that names its workers
    ``<prefix>0``, ``<prefix>1``, ... in the order they start.  A ThreadPoolExecutor never starts
    more than *max_workers* threads, so every name is checked here, when the pool is made."""
    if max_workers < 1:
        raise ValueError("max_workers must be at least 1")
    check_name(f"{prefix}{max_workers - 1}")
    ids = itertools.count()
    mu = threading.Lock()

    def init() -> None:
        with mu:
            i = next(ids)
        name_current_thread(f"{prefix}{min(i, max_workers - 1)}")

    return init


def named_pool(prefix: str, max_workers: int) -> concurrent.futures.ThreadPoolExecutor:
    """A ``ThreadPoolExecutor`` whose workers are named ``<prefix><N>`` (Python and kernel)."""
    return concurrent.futures.ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix=prefix,
                                                 initializer=pool_initializer(prefix, max_workers))
