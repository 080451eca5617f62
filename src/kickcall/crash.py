"""Internal errors, said in one line: crash reports instead of Python tracebacks.

Every kickcall process (the ``kickcall`` command, a machine's guest process) reports what it did
not expect -- an uncaught exception, in the main thread or any other, or a logged traceback --
as one line on stderr and the traceback in a file: ``$KICKCALL_CRASH_DIR`` (the test suite sets
it and fails a test during which a report appeared), else the temporary directory.  Reports are
new files (O_EXCL, mode 0600); nothing is ever overwritten.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
import traceback

from . import __version__
from .ownership import temp_dir

__all__ = ["crash_report", "thread_excepthook", "OneLineFormatter"]


def crash_report(what: str, text: str) -> str:
    """Write a crash report (mode 0600, a new file) and return its path; '' if it cannot be written."""
    d = os.environ.get("KICKCALL_CRASH_DIR") or temp_dir()
    stamp = time.strftime("%Y%m%d-%H%M%S")
    for n in range(100):
        path = os.path.join(d, f"kickcall-crash-{stamp}-{os.getpid()}{'-' + str(n) if n else ''}.txt")
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
        except FileExistsError:
            continue
        except OSError:
            return ""
        with os.fdopen(fd, "w") as f:
            f.write(f"kickcall {__version__} crash report\nwhat: {what}\nargv: {sys.argv!r}\npid: {os.getpid()}\n\n")
            f.write(text)
        return path
    return ""


def thread_excepthook(args: threading.ExceptHookArgs) -> None:
    """An exception nobody caught in a thread: one line and a crash report, never a traceback."""
    if args.exc_type is SystemExit:
        return
    text = "".join(traceback.format_exception(args.exc_type, args.exc_value, args.exc_traceback))
    name = args.thread.name if args.thread is not None else "?"
    path = crash_report(f"uncaught exception in thread {name}", text)
    print(f"kickcall: internal error in thread {name}: {args.exc_type.__name__}: {args.exc_value}"
          f"{' (crash report: ' + path + ')' if path else ''}", file=sys.stderr, flush=True)


class OneLineFormatter(logging.Formatter):
    """Log records with a traceback print one line; the traceback goes to a file named in it
    (when ``$KICKCALL_CRASH_DIR`` is set; a logged traceback is not a crash, so it makes no
    report of its own)."""

    def formatException(self, ei) -> str:  # noqa: N802 (logging's name)
        import tempfile

        text = "".join(traceback.format_exception(*ei))
        d = os.environ.get("KICKCALL_CRASH_DIR")
        path = ""
        if d:
            try:
                fd, path = tempfile.mkstemp(prefix="kickcall-traceback-", suffix=".txt", dir=d)
                with os.fdopen(fd, "w") as f:
                    f.write(text)
            except OSError:
                path = ""
        exc = ei[1]
        return f"  ({type(exc).__name__}: {exc}{'; traceback in ' + path if path else ''})"

    def format(self, record: logging.LogRecord) -> str:
        s = super().format(record)
        return s.replace("\n  (", " (")
