"""``kickcall vhost-user-test``: a data-verified block workload against any vhost-user-blk back-end.

Its output follows fio's: the job's parameters first (one line), a progress line with the ETA on a
terminal (stderr, rewritten in place; nothing when stderr is not a terminal), then the results with
the clat percentile ladder (p1 ... p99.99) and a log2 latency histogram.  ``--log FILE`` writes one
JSON object a line per interval (NDJSON) as the run goes; the file is created owner-only and never
over an existing one.  Ctrl-C during the run stops submitting, lets what is in flight complete and
be checked, prints the partial results and exits 130 (a second Ctrl-C abandons what is in flight).
"""

from __future__ import annotations

import argparse
import json
import shutil
import signal
import sys
import threading
import time
from typing import IO, Callable

from ..counters import kebab_tree
from ..drive.latency import format_ladder, format_log2, open_log, write_record
from ..drive.vhost_user_blk import BlkVerifyWorkload, DriverError, run_test
from ..vhost_user.frontend import BackendGone
from ..vhost_user.protocol import ProtocolError

PROG = "kickcall vhost-user-test"


def _ranged(kind: type, lo: float | None = None, hi: float | None = None, *, lo_open: bool = False,
            check: Callable[[float], str | None] | None = None) -> Callable[[str], float]:
    """An argparse type: *kind* within [lo, hi] (lo excluded with *lo_open*); argparse names the
    option in its message (``argument --depth: must be 1..1024, got 0``)."""
    def conv(text: str) -> float:
        try:
            v = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not {'an integer' if kind is int else 'a number'}: {text!r}") from None
        if v != v or (lo is not None and (v <= lo if lo_open else v < lo)) or (hi is not None and v > hi):
            if lo_open:
                rng = f"> {lo}" if hi is None else f"in ({lo}, {hi}]"
            else:
                rng = f"{lo}..{hi}" if hi is not None else f">= {lo}"
            raise argparse.ArgumentTypeError(f"must be {rng}, got {text}")
        why = check(v) if check is not None else None
        if why:
            raise argparse.ArgumentTypeError(f"{why}, got {text}")
        return v
    conv.__name__ = kind.__name__
    return conv


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--socket", required=True, metavar="PATH",
                   help="the back-end's vhost-user socket (required; no default)")
    p.add_argument("--queues", type=_ranged(int, 1, 64), default=1, metavar="N",
                   help="request queues to drive, one submitter thread each, 1..64 (default: %(default)s)")
    p.add_argument("--depth", type=_ranged(int, 1, 1024), default=16, metavar="N",
                   help="requests in flight, shared among the queues, 1..1024 (default: %(default)s)")
    p.add_argument("--block-size", type=_ranged(int, 512, 1 << 20, check=lambda v: "must be a multiple of 512"
                                                if v % 512 else None),
                   default=4096, metavar="BYTES",
                   help="bytes per request, a multiple of 512 up to 1 MiB (default: %(default)s)")
    p.add_argument("--read-ratio", type=_ranged(float, 0.0, 1.0), default=0.5, metavar="R",
                   help="share of reads, 0..1; the rest are writes (default: %(default)s)")
    p.add_argument("--duration", type=_ranged(float, 0.0, 86400.0, lo_open=True), default=5.0, metavar="SECONDS",
                   help="how long the workload runs, after the prefill (default: %(default)s)")
    p.add_argument("--blocks", type=_ranged(int, 1, 1 << 24), default=256, metavar="N",
                   help="working set in blocks, prefilled, then verified; capped by the capacity "
                        "(default: %(default)s)")
    p.add_argument("--queue-size", type=_ranged(int, 1, 32768, check=lambda v: "must be a power of two"
                                                if int(v) & (int(v) - 1) else None),
                   default=128, metavar="N", help="descriptors per virtqueue, a power of two (default: %(default)s)")
    p.add_argument("--seed", type=_ranged(int, 0, (1 << 63) - 1), default=1, metavar="N",
                   help="seed of the block and read/write choices (default: %(default)s)")
    p.add_argument("--no-inflight", action="store_true",
                   help="do not negotiate INFLIGHT_SHMFD (default: negotiated when offered)")
    p.add_argument("--connect-wait", type=_ranged(float, 0.0, 3600.0), default=10.0, metavar="SECONDS",
                   help="seconds to wait for the socket (default: %(default)s)")
    p.add_argument("--log", metavar="FILE", default=None,
                   help="write per-interval results to FILE as NDJSON, one JSON object a line; FILE must "
                        "not exist (default: no log)")
    p.add_argument("--log-interval", type=_ranged(float, 0.05, 3600.0), default=1.0, metavar="SECONDS",
                   help="interval of --log lines and of the progress line (default: %(default)s)")
    p.add_argument("--json", action="store_true",
                   help="print the results as one JSON document; the job line goes to stderr (default: text)")


def job_line(a: argparse.Namespace) -> str:
    """The job's parameters on one line, as fio echoes its job."""
    rw = "randread" if a.read_ratio >= 1 else "randwrite" if a.read_ratio <= 0 else "randrw"
    return (f"vhost-user-test: socket={a.socket}, rw={rw}, rwmixread={a.read_ratio * 100:g}%, bs={a.block_size}, "
            f"iodepth={a.depth}, queues={a.queues}, queue-size={a.queue_size}, blocks={a.blocks}, "
            f"duration={a.duration:g}s, seed={a.seed}, inflight={'off' if a.no_inflight else 'on'}, "
            f"log={a.log or '-'}")


def _job(a: argparse.Namespace) -> dict:
    return {"socket": a.socket, "queues": a.queues, "depth": a.depth, "block-size": a.block_size,
            "read-ratio": a.read_ratio, "duration": a.duration, "blocks": a.blocks, "queue-size": a.queue_size,
            "seed": a.seed, "inflight": not a.no_inflight, "log": a.log, "log-interval": a.log_interval}


class _Progress:
    """Per-interval output: the NDJSON log line and, on a terminal, the progress line."""

    def __init__(self, a: argparse.Namespace, log: IO[str] | None, tty: bool) -> None:
        self.a = a
        self.log = log
        self.tty = tty
        self.last = 0.0
        self.shown = False

    def tick(self, wl: BlkVerifyWorkload, elapsed: float) -> None:
        iv = wl.interval()
        dt = max(1e-9, elapsed - self.last)
        self.last = elapsed
        rec = {"time": round(time.time(), 3), "elapsed": round(elapsed, 3), "interval": round(dt, 3),
               "read-iops": round(iv["reads"] / dt, 1), "write-iops": round(iv["writes"] / dt, 1),
               "reads": iv["reads"], "writes": iv["writes"], "lat-us-mean": iv["lat-us-mean"],
               "lat-us-max": iv["lat-us-max"], "lat-us-percentiles": iv["lat-us-percentiles"],
               "ops-total": wl.ops, "errors": len(wl.errors)}
        if self.log is not None:
            write_record(self.log, rec)
        if self.tty:
            left = max(0.0, self.a.duration - elapsed)
            pct = min(100.0, 100.0 * elapsed / self.a.duration)
            line = (f"[{elapsed:.0f}s/{self.a.duration:g}s {pct:3.0f}% ETA {left:.0f}s] "
                    f"read {rec['read-iops']:.0f} IOPS, write {rec['write-iops']:.0f} IOPS, "
                    f"p99 {iv['lat-us-percentiles']['99.00']:.0f} us, errors {rec['errors']}")
            width = shutil.get_terminal_size((80, 24)).columns - 1
            sys.stderr.write("\r" + line[:width].ljust(width))
            sys.stderr.flush()
            self.shown = True

    def finish(self, wl: BlkVerifyWorkload | None) -> None:
        """The last, partial interval into the log; the progress line wiped."""
        self.tty = False
        if wl is not None and wl.started.is_set() and self.log is not None and wl.elapsed > self.last:
            self.tick(wl, wl.elapsed)
        if self.shown:
            width = shutil.get_terminal_size((80, 24)).columns - 1
            sys.stderr.write("\r" + " " * width + "\r")
            sys.stderr.flush()


def _report(r: dict, a: argparse.Namespace, interrupted: bool) -> None:
    el = r.get("elapsed") or a.duration
    print(f"back-end: serial {r['serial']!r}, {r['capacity_sectors']} sectors, {r['queues']} queue(s)")
    if interrupted:
        print(f"interrupted after {el:.1f} s: partial results (what completed was checked)")
    print(f"{r['ops']} verified ops ({r['reads']} reads, {r['writes']} writes) in {el:.1f} s: "
          f"{r['iops']:.0f} IOPS; latency p50 {r['lat_us_p50']:.0f} us, p90 {r['lat_us_p90']:.0f} us, "
          f"p99 {r['lat_us_p99']:.0f} us")
    lat = r["latency"]
    print(f"    clat (usec): min={lat['min-us']:.0f}, max={lat['max-us']:.0f}, avg={lat['mean-us']:.1f}, "
          f"samples={lat['count']}")
    for line in format_ladder(lat["percentiles-us"]) + format_log2(lat["log2-histogram-us"]):
        print(line)
    print(f"spurious calls {r['spurious_calls']}, out-of-order completions {r['out_of_order']}, "
          f"reconnects {r['reconnects']}")
    print(f"errors: {r['error_count']}")
    for err in r["errors"]:
        print(f"  {err}")


#: Ctrl-C's exit status (README, "Exit status"; the same as ``kickcall.cli.EXIT_INTERRUPTED``,
#: which this layer may not import)
EXIT_INTERRUPTED = 130


def main(a: argparse.Namespace) -> int:
    """Run the job.  SIGINT is handled here while the job runs (the previous handler is restored
    on return): before the workload starts it is cli's plain interruption; during the run the
    first Ctrl-C stops the workload gracefully and the partial results are printed (exit 130),
    a second abandons the requests in flight."""
    log = open_log(a.log) if a.log else None  # a refusal (exists) is cli's exit 2, before anything runs
    print(job_line(a), file=sys.stderr if a.json else sys.stdout, flush=True)
    tty = sys.stderr.isatty()
    prog = _Progress(a, log, tty)
    state: dict = {"wl": None, "interrupted": False, "raised": False}

    def on_sigint(signum: int, frame: object) -> None:
        wl = state["wl"]
        if wl is None or not wl.started.is_set():
            signal.signal(signal.SIGINT, signal.SIG_IGN)  # as cli: one interruption, a bounded clean-up
            state["raised"] = True
            raise KeyboardInterrupt
        if not state["interrupted"]:
            state["interrupted"] = True
            wl.stop_event.set()
        else:
            wl.aborted.set()

    in_main = threading.current_thread() is threading.main_thread()
    old = signal.signal(signal.SIGINT, on_sigint) if in_main else None
    try:
        try:
            r = run_test(a.socket, depth=a.depth, block_size=a.block_size, duration=a.duration,
                         read_ratio=a.read_ratio, queues=a.queues, nblocks=a.blocks, queue_size=a.queue_size,
                         use_inflight=not a.no_inflight, connect_wait=a.connect_wait, seed=a.seed,
                         tick=prog.tick if (log is not None or tty) else None, interval=a.log_interval,
                         on_workload=lambda wl: state.__setitem__("wl", wl))
        except (BackendGone, ProtocolError, DriverError, OSError) as e:
            prog.finish(None)
            print(f"{PROG}: {e}", file=sys.stderr)
            return 1
        prog.finish(state["wl"])
    finally:
        if in_main:
            signal.signal(signal.SIGINT, signal.SIG_IGN if state["interrupted"] or state["raised"] else old)
        if log is not None:
            log.close()
    interrupted = bool(state["interrupted"])
    if a.json:
        r["job"] = _job(a)
        r["interrupted"] = interrupted
        print(json.dumps(kebab_tree(r), indent=1))  # kebab-case throughout, as QMP's
    else:
        _report(r, a, interrupted)
    sys.stdout.flush()
    if interrupted:
        print("kickcall: interrupted", file=sys.stderr, flush=True)
        return EXIT_INTERRUPTED
    return 1 if r["error_count"] or r["ops"] == 0 else 0
