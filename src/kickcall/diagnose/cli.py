"""The ``kickcall diagnose`` command line."""

from __future__ import annotations

import argparse
import json
import sys
import time

from ..monitor.client import QMPClient, QMPCommandError, QMPConnectionError
from .run import apply_fixes, diagnose, format_report

__all__ = ["add_arguments", "main"]


def _pos_float(v: str) -> float:
    try:
        f = float(v)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{v}' is not a number") from None
    if not 0 < f <= 3600:
        raise argparse.ArgumentTypeError(f"{v} is out of range (0, 3600]")
    return f


def _samples(v: str) -> int:
    try:
        n = int(v)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{v}' is not a whole number") from None
    if not 2 <= n <= 1000:
        raise argparse.ArgumentTypeError(f"{v} is out of range [2, 1000]")
    return n


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--qmp", required=True, metavar="PATH", help="the monitor socket (a kickcall machine's or a "
                   "`kickcall vhost-user-blk --qmp` back-end's)")
    p.add_argument("--dev", help="only this device (id or QOM path)")
    p.add_argument("--queue", type=int, help="only this queue")
    p.add_argument("--samples", type=_samples, default=4, help="equal samples needed for a verdict (default 4)")
    p.add_argument("--interval", type=_pos_float, default=0.5, help="seconds between samples (default 0.5)")
    p.add_argument("--timeout", type=_pos_float, default=15.0, help="give up sampling after this long (default 15)")
    p.add_argument("--watch", action="store_true", help="diagnose again and again until Ctrl-C")
    p.add_argument("--count", type=int, help="with --watch: stop after this many rounds")
    p.add_argument("--fix", action="store_true", help="inject the event each verdict calls for, confirm it moved")
    p.add_argument("--force", action="store_true", help="with --fix: deliver past a vector the guest masked "
                   "(one message, logged and announced)")
    p.add_argument("--json", action="store_true", help="print the report as JSON")


def main(a: argparse.Namespace) -> int:
    if a.force and not a.fix:
        print("kickcall diagnose: --force only makes sense with --fix", file=sys.stderr)
        return 2
    try:
        mon = QMPClient(a.qmp, timeout=30).connect()
    except (QMPConnectionError, OSError) as e:
        print(f"kickcall diagnose: {e}", file=sys.stderr)
        return 2
    target = f"{a.qmp} ({mon.greeting.get('version', {}).get('package', '?')})"
    rc = 0
    rounds = 0
    try:
        while True:
            rep = diagnose(mon, target=target, samples=a.samples, interval=a.interval, max_time=a.timeout,
                           dev=a.dev, queue=a.queue)
            if a.fix:
                apply_fixes(mon, rep, force=a.force, log=lambda s: print(s, file=sys.stderr, flush=True))
            if a.json:
                print(json.dumps(rep.as_dict(), indent=1), flush=True)
            else:
                print(format_report(rep), flush=True)
            rc = 1 if rep.unresolved() else 0
            rounds += 1
            if not a.watch or (a.count is not None and rounds >= a.count):
                break
            time.sleep(a.interval)
    except KeyboardInterrupt:
        pass
    except (QMPConnectionError, QMPCommandError, OSError) as e:
        print(f"kickcall diagnose: {e}", file=sys.stderr)
        rc = 2
    finally:
        mon.close()
    return rc
