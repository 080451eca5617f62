"""Helper processes kickcall starts (a machine's guest, a benchmark's peers): Ctrl-C is the parent's.

A terminal's Ctrl-C goes to the whole foreground process group.  A helper process must not die
of it on its own -- the parent decides when and how its helpers stop, and cleans up after them --
so helpers run in a process group of their own.  That alone leaves a window: between ``fork()``
and the child's ``setpgid()`` the child is still in the parent's group, a SIGINT sent to the group
then is pending in it, and after ``exec()`` (handlers reset to the default) it kills the new
program before its first line -- silently.  :func:`start_helper` blocks SIGINT in the calling
thread around the spawn: the child inherits the blocked mask, so such a SIGINT stays pending
until the helper decides (kickcall's helpers ignore SIGINT, which discards it); the parent's own
Ctrl-C in that window is delivered to the parent once the spawn returns, not lost.
"""

from __future__ import annotations

import signal
import subprocess
from typing import Any

__all__ = ["start_helper"]


def start_helper(argv: list[str], **kw: Any) -> subprocess.Popen:
    """``subprocess.Popen(argv, process_group=0, **kw)`` with SIGINT blocked across the spawn."""
    kw.setdefault("process_group", 0)
    old = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        return subprocess.Popen(argv, **kw)
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)
