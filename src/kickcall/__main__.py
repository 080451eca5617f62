"""``python -m kickcall``: the ``kickcall`` command."""

import _signal  # type: ignore[import-not-found]  # the C module (no stubs): importing it takes no time
import os as _os


def _interrupted_while_starting(signum: int, frame: object) -> None:
    """Ctrl-C before the command is set up (imports take a few tens of ms): nothing to clean.
    (A Ctrl-C during the interpreter's own start-up, before this line runs, is Python's.)"""
    _os.write(2, b"kickcall: interrupted\n")
    _os._exit(130)


_signal.signal(_signal.SIGINT, _interrupted_while_starting)

import sys  # noqa: E402  (after the handler: a Ctrl-C during the imports must not print a traceback)

from .cli import main  # noqa: E402

sys.exit(main())
