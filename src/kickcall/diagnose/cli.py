"""The ``kickcall diagnose`` command line.

Exit status: 0 no stalled queue; 1 a stalled queue that was not recovered; 2 nothing stalled was
found but a monitor could not be diagnosed (not there, busy, stopped, no virtio queries), or the
command line named an unknown --dev or --queue; 130 Ctrl-C.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

from .run import TargetSession, apply_fixes, diagnose, exit_status, format_report
from .sample import UnknownSelection
from .verdict import DEFAULT_WINDOW

__all__ = ["add_arguments", "main"]


def _pos_float(v: str) -> float:
    try:
        f = float(v)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{v}' is not a number") from None
    if not 0 < f <= 3600:
        raise argparse.ArgumentTypeError(f"{v} is out of range (0, 3600]")
    return f


def _int_range(lo: int, hi: int):
    def conv(v: str) -> int:
        try:
            n = int(v)
        except ValueError:
            raise argparse.ArgumentTypeError(f"'{v}' is not a whole number") from None
        if not lo <= n <= hi:
            raise argparse.ArgumentTypeError(f"{v} is out of range [{lo}, {hi}]")
        return n

    return conv


def _socket_path(v: str) -> str:
    if not v:
        raise argparse.ArgumentTypeError("an empty path")
    if len(os.fsencode(v)) > 107:
        raise argparse.ArgumentTypeError(f"{v!r} is longer than a Unix socket path can be (107 bytes)")
    return v


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--qmp", required=True, action="append", metavar="PATH", type=_socket_path,
                   help="a monitor socket: QEMU's (7.2+), a kickcall machine's or a `kickcall vhost-user-blk --qmp` "
                        "back-end's. Repeat it to diagnose several at once; a QEMU vhost device and its back-end's "
                        "monitor are joined into one verdict per queue")
    p.add_argument("--dev", help="only this device (id or QOM path)")
    p.add_argument("--queue", type=_int_range(0, 0xFFFF), help="only this queue")
    p.add_argument("--samples", type=_int_range(2, 1000), default=4,
                   help="equal samples needed for a verdict (default 4)")
    p.add_argument("--interval", type=_pos_float, default=0.5, help="seconds between samples (default 0.5)")
    p.add_argument("--window", type=_pos_float, default=DEFAULT_WINDOW,
                   help=f"a request taken and not completed for longer is 'not processing'; younger, 'slow' "
                        f"(default {DEFAULT_WINDOW:g} s)")
    p.add_argument("--timeout", type=_pos_float, default=15.0,
                   help="bounds each round, connecting included (default 15 s)")
    p.add_argument("-v", "--verbose", action="store_true", help="the evidence behind each verdict")
    p.add_argument("--watch", action="store_true", help="diagnose again and again until Ctrl-C")
    p.add_argument("--count", type=_int_range(1, 10**9), help="with --watch: stop after this many rounds")
    p.add_argument("--fix", action="store_true", help="inject the event each verdict calls for (kickcall "
                   "monitors only), confirm it moved")
    p.add_argument("--force", action="store_true", help="with --fix: deliver past a vector the guest masked "
                   "(one message, logged and announced)")
    p.add_argument("--json", action="store_true", help="the report as one JSON document (with --watch: one "
                   "line per round, NDJSON)")


def main(a: argparse.Namespace) -> int:
    if a.force and not a.fix:
        print("kickcall diagnose: --force only makes sense with --fix", file=sys.stderr)
        return 2
    if a.count is not None and not a.watch:
        print("kickcall diagnose: --count only makes sense with --watch", file=sys.stderr)
        return 2
    sockets = list(dict.fromkeys(a.qmp))
    sessions: list[TargetSession] = []
    rc = 0
    rounds = 0
    try:
        while True:
            t_end = time.monotonic() + a.timeout
            for s in sessions:
                if not s.live:  # a monitor that could not be read is tried afresh each round
                    s.close()
            sessions = [s if s.live else TargetSession(s.socket, fix=a.fix, dev=a.dev, queue=a.queue)
                        for s in sessions] or [TargetSession(p, fix=a.fix, dev=a.dev, queue=a.queue) for p in sockets]
            rep = diagnose(sessions, samples=a.samples, interval=a.interval, window=a.window, dev=a.dev,
                           queue=a.queue, deadline=t_end)
            if a.fix:
                apply_fixes(sessions, rep, force=a.force, confirm_timeout=min(10.0, a.timeout),
                            log=lambda s: print(s, file=sys.stderr, flush=True))
            rounds += 1
            if a.json:
                d = rep.as_dict()
                if a.watch:
                    d["round"] = rounds
                    print(json.dumps(d, separators=(",", ":")), flush=True)
                else:
                    print(json.dumps(d, indent=1), flush=True)
            else:
                print(format_report(rep, verbose=a.verbose), flush=True)
            rc = exit_status(rep)
            if not a.watch or (a.count is not None and rounds >= a.count):
                break
            time.sleep(a.interval)
    except UnknownSelection as e:
        print(f"kickcall diagnose: {e}", file=sys.stderr)
        return 2
    finally:  # (Ctrl-C: kickcall's entry point says "kickcall: interrupted" and exits 130)
        for s in sessions:
            s.close()
    return rc
