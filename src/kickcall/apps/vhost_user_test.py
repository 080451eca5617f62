"""``kickcall vhost-user-test``: a data-verified block workload against any vhost-user-blk back-end."""

from __future__ import annotations

import argparse
import json
import sys

from ..drive.vhost_user_blk import DriverError, run_test
from ..vhost_user.frontend import BackendGone
from ..vhost_user.protocol import ProtocolError


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--socket", required=True, help="the back-end's vhost-user socket")
    p.add_argument("--depth", type=int, default=16)
    p.add_argument("--block-size", type=int, default=4096)
    p.add_argument("--duration", type=float, default=5.0)
    p.add_argument("--read-ratio", type=float, default=0.5)
    p.add_argument("--queues", type=int, default=1)
    p.add_argument("--blocks", type=int, default=256, help="working set in blocks (prefilled, then verified)")
    p.add_argument("--queue-size", type=int, default=128)
    p.add_argument("--no-inflight", action="store_true", help="do not negotiate INFLIGHT_SHMFD")
    p.add_argument("--connect-wait", type=float, default=10.0, help="seconds to wait for the socket")
    p.add_argument("--json", action="store_true")


def main(a: argparse.Namespace) -> int:
    if a.block_size % 512 or not 1 <= a.depth <= 1024 or not 0 <= a.read_ratio <= 1 or a.duration <= 0 \
            or not 1 <= a.queues <= 64 or a.queue_size & (a.queue_size - 1) or a.blocks < 1:
        print("kickcall vhost-user-test: bad workload parameters", file=sys.stderr)
        return 2
    try:
        r = run_test(a.socket, depth=a.depth, block_size=a.block_size, duration=a.duration, read_ratio=a.read_ratio,
                     queues=a.queues, nblocks=a.blocks, queue_size=a.queue_size, use_inflight=not a.no_inflight,
                     connect_wait=a.connect_wait)
    except (BackendGone, ProtocolError, DriverError, OSError) as e:
        print(f"kickcall vhost-user-test: {e}", file=sys.stderr)
        return 1
    if a.json:
        print(json.dumps(r, indent=1))
    else:
        print(f"back-end: serial {r['serial']!r}, {r['capacity_sectors']} sectors, {r['queues']} queue(s)")
        print(f"{r['ops']} verified ops ({r['reads']} reads, {r['writes']} writes) in {a.duration:.1f} s: "
              f"{r['iops']:.0f} IOPS; latency p50 {r['lat_us_p50']:.0f} us, p90 {r['lat_us_p90']:.0f} us, "
              f"p99 {r['lat_us_p99']:.0f} us")
        print(f"spurious calls {r['spurious_calls']}, out-of-order completions {r['out_of_order']}, "
              f"reconnects {r['reconnects']}")
        print(f"errors: {r['error_count']}")
        for err in r["errors"]:
            print(f"  {err}")
    return 1 if r["error_count"] or r["ops"] == 0 else 0
