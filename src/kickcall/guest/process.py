"""Entry point of the guest process: ``python -m kickcall.guest.process --channel-fd N``.

The guest is its own process: its only links to the VMM are the hypervisor channel (inherited
fd), the shared RAM and counter page (memfds received over it) and eventfds received over it.
It dies with its parent (PR_SET_PDEATHSIG) and exits when the VMM sends SHUTDOWN.
"""

from __future__ import annotations

import argparse
import ctypes
import logging
import os
import signal
import socket
import sys
import threading

from ..crash import OneLineFormatter, thread_excepthook
from ..hv.kernel import KernelHV
from .os import GuestOS

PR_SET_PDEATHSIG = 1


def die_with_parent(parent_pid: int) -> None:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except OSError:
        pass
    if os.getppid() != parent_pid:  # the parent died before prctl took effect
        os._exit(1)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="kickcall-guest")
    ap.add_argument("--channel-fd", type=int, required=True)
    ap.add_argument("--parent", type=int, default=0)
    ap.add_argument("--queue-size", type=int, default=0)
    ap.add_argument("--log-level", default="WARNING")
    a = ap.parse_args(argv)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(OneLineFormatter("guest[%(process)d] %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=a.log_level, handlers=[handler])
    threading.excepthook = thread_excepthook  # no traceback on the terminal from the guest either
    if a.parent:
        die_with_parent(a.parent)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the VMM's to handle
    sock = socket.socket(fileno=a.channel_fd)
    hv = KernelHV(sock, name="guest").start()
    try:
        hv.wait_ready(60)
    except TimeoutError:
        return 2
    gos = GuestOS(hv, queue_size=a.queue_size or None)
    hv.shutdown_requested.wait()
    gos.shutdown()
    hv.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
