"""``kickcall vhost-user-blk``: a vhost-user-blk back-end that QEMU (or libvirt) can launch.

Follows the back-end program conventions of vhost-user.rst: ``--socket-path`` or ``--fd`` (an
already listening socket), ``--print-capabilities``, and the block type's ``--blk-file`` and
``--read-only``.  ``--qmp PATH`` adds a QMP monitor (query-status, quit).  ``--metrics [ADDR:]PORT``
serves the back-end's counters document in the Prometheus text format (``kickcall.metrics``;
loopback unless an address is given).

Fault knobs for tests of slow and stuck back-ends: ``--io-delay-ms N`` stalls each I/O a random
0..N ms, or exactly N ms with ``--io-delay-fixed``; a stall never delays the exit (SIGTERM, SIGINT
or the monitor's quit end it at once: the ``cancel-io-delay-on-stop`` fix).  The monitor's
``x-debug-fault DEV QUEUE complete drop-all`` makes a back-end that never completes a request.

``--x-fix-off NAME`` (repeatable; for tests and demonstrations, not in the main help) starts the
back-end with one of its fixes switched off -- a ``Switch`` of the back-end's fault registry
(``VhostUserBackend.faults``: the back-end's own, ``refuse-stopped-ring`` with ``--qmp``, and
``cancel-io-delay-on-stop``).  An unknown name is refused (exit 2), naming the ones there are.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import signal
import sys
import threading

from ..counters import counters_doc, format_counters
from ..faults import FaultError
from ..loop import IOThread
from ..metrics import MetricsServer, bind_metrics, listen_arg
from ..monitor import QMPServer
from ..vhost_user.backend import DEFAULT_PROTOCOL_FEATURES, VhostUserBackend
from ..ownership import PathRefused, SocketClaim
from ..vhost_user.protocol import ProtocolFeature
from ..virtio.blk import VirtIOBlk
from ..virtio.image import ImageFile, open_image

log = logging.getLogger("kickcall.vhost-user-blk")

CAPABILITIES = {"type": "block", "features": ["blk-file", "read-only"]}

# a fix in the back-end's fault registry, on by default; off: a stopping back-end waits for every I/O
# stalled by --io-delay-ms to sleep its full delay (a queue of them, a few at a time on the aio
# workers) before it exits
CANCEL_IO_DELAY_ON_STOP = "cancel-io-delay-on-stop"


POLL_MAX_US = 0.0  # --poll-max-us's default (see docs/backend-api.md, "Adaptive polling")


def add_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_mutually_exclusive_group()
    g.add_argument("--socket-path", help="listen on this Unix socket (created with mode 0600)")
    g.add_argument("--fd", type=int, help="serve on this already listening socket fd")
    p.add_argument("--print-capabilities", action="store_true", help="print the back-end's capabilities and exit")
    p.add_argument("--blk-file", help="the raw image to serve")
    p.add_argument("--read-only", action="store_true")
    p.add_argument("--num-queues", type=int, default=1, help="queues offered (default 1)")
    p.add_argument("--max-queue-size", type=int, default=1024, help="largest queue size accepted (default 1024)")
    p.add_argument("--serial", default="", help="the get-id string (default: the image's name)")
    p.add_argument("--qmp", metavar="PATH", help="a QMP monitor on this Unix socket")
    p.add_argument("--metrics", metavar="[ADDR:]PORT", type=listen_arg,
                   help="serve Prometheus metrics on http://ADDR:PORT/metrics (PORT alone: loopback; 0: a free "
                        "port, printed; another address only when given, with a warning)")
    p.add_argument("--no-mem-slots", action="store_true",
                   help="do not offer CONFIGURE_MEM_SLOTS (the front-end then uses SET_MEM_TABLE)")
    p.add_argument("--no-inflight", action="store_true", help="do not offer INFLIGHT_SHMFD")
    p.add_argument("--aio", choices=("auto", "threads", "sync"), default="auto",
                   help="auto: inline when a request is alone, a thread pool when they overlap, except reads "
                        "the page cache holds (served inline with RWF_NOWAIT); default auto")
    p.add_argument("--no-inline-cached", action="store_true",
                   help="with --aio auto, hand every overlapping read to the thread pool, cached or not "
                        "(what auto did before; for comparisons)")
    p.add_argument("--poll-max-us", type=float, default=POLL_MAX_US, metavar="N",
                   help="adaptive polling: poll the rings for up to N microseconds before sleeping on the kick "
                        f"fds, the window self-tuning as QEMU's poll-max-ns (0 disables; default {POLL_MAX_US:g})")
    p.add_argument("--null", action="store_true",
                   help="a null device: reads return zeroes without touching the image, writes are discarded "
                        "(the front-end's own cost, as QEMU's null-co; default: off)")
    p.add_argument("--profile", metavar="FILE", help="cProfile the back-end's loop thread; stats to FILE on exit")
    p.add_argument("--trace", action="append", default=[], metavar="PATTERN",
                   help="enable trace events (QEMU's names and globs: vhost_user_read, virtio_*); to stderr")
    p.add_argument("--io-delay-ms", type=float, default=0.0,
                   help="fault knob: stall each I/O a random 0..N ms (completions then come out of order)")
    p.add_argument("--io-delay-fixed", action="store_true",
                   help="with --io-delay-ms N: every I/O takes exactly N ms (a slow back-end)")
    p.add_argument("--no-self-kick", action="store_true",
                   help="fault knob: after a reconnect, do not kick a ring that shows work (a kick the "
                        "previous back-end consumed is then lost unless the front-end kicks)")
    # for tests and demonstrations: hidden from the help
    p.add_argument("--x-fix-off", action="append", default=[], metavar="NAME", help=argparse.SUPPRESS)


PROG = "kickcall vhost-user-blk"


def backend_counters(backend: VhostUserBackend) -> dict:
    """The back-end's counters document (``kickcall.counters``), read on its loop thread: the
    same for QMP ``x-query-kickcall-counters``, HMP ``info counters`` and ``--metrics``."""
    return counters_doc("vhost-user-blk", backend.loop.run_sync(lambda: {backend.name: backend.counters()}))


def main(a: argparse.Namespace) -> int:
    """Serve until SIGTERM/SIGINT or the monitor's quit.  Exit 0, or 2 with one line naming what
    was refused: every path it will bind (``--socket-path``, ``--qmp``) and the image are checked
    before anything is created, so a refusal leaves nothing behind and takes nothing away."""
    if a.print_capabilities:
        print(json.dumps(CAPABILITIES))
        return 0
    if not a.blk_file:
        print(f"{PROG}: --blk-file is required", file=sys.stderr)
        return 2
    if a.socket_path is None and a.fd is None:
        print(f"{PROG}: give --socket-path or --fd", file=sys.stderr)
        return 2
    if not 1 <= a.num_queues <= 64 or a.max_queue_size & (a.max_queue_size - 1) or not 1 <= a.max_queue_size <= 1024:
        print(f"{PROG}: --num-queues must be 1..64 and --max-queue-size a power of two up to 1024",
              file=sys.stderr)
        return 2
    if a.io_delay_ms < 0 or a.io_delay_fixed and not a.io_delay_ms > 0:
        print(f"{PROG}: --io-delay-ms must be >= 0, and > 0 with --io-delay-fixed", file=sys.stderr)
        return 2
    if not 0 <= a.poll_max_us <= 1_000_000:
        print(f"{PROG}: --poll-max-us must be 0..1000000", file=sys.stderr)
        return 2
    if a.qmp and a.socket_path and os.path.abspath(a.qmp) == os.path.abspath(a.socket_path):
        print(f"{PROG}: --qmp and --socket-path name the same path", file=sys.stderr)
        return 2
    claims: list[SocketClaim] = []
    image: ImageFile | None = None
    try:
        try:  # 1. check and lock every path, create nothing
            sock_claim = SocketClaim(a.socket_path) if a.socket_path else None
            if sock_claim is not None:
                claims.append(sock_claim)
            qmp_claim = SocketClaim(a.qmp) if a.qmp else None
            if qmp_claim is not None:
                claims.append(qmp_claim)
            image = open_image(a.blk_file, writable=not a.read_only)
        except PathRefused as e:
            which = "--qmp " if a.qmp and e.path in (a.qmp, a.qmp + ".lock") else (
                "--socket-path " if a.socket_path and e.path in (a.socket_path, a.socket_path + ".lock") else
                "--blk-file ")
            print(f"{PROG}: {which}{e}", file=sys.stderr)
            return 2
        return _serve(a, sock_claim, qmp_claim, image)
    finally:
        if image is not None:
            image.close()  # a no-op once the device owns it and has closed it
        for c in claims:
            c.release()


def _serve(a: argparse.Namespace, sock_claim: SocketClaim | None, qmp_claim: SocketClaim | None,
           image: ImageFile) -> int:
    loop = IOThread("vhost-user-blk", profile_path=a.profile, thread_name="kc-loop",
                    poll_max_ns=int(a.poll_max_us * 1000))
    dev = VirtIOBlk("vhost-user-blk", image, num_queues=a.num_queues, queue_size=a.max_queue_size,
                    read_only=a.read_only, serial=a.serial or os.path.basename(a.blk_file)[:20], aio=a.aio,
                    loop=loop, inline_cached=not a.no_inline_cached, null=a.null)
    if a.io_delay_ms > 0 and a.io_delay_fixed:
        fixed = a.io_delay_ms / 1000.0
        dev.io_delay = lambda: fixed
    elif a.io_delay_ms > 0:
        rng = random.Random()
        dev.io_delay = lambda: rng.uniform(0, a.io_delay_ms) / 1000.0
    pf = DEFAULT_PROTOCOL_FEATURES
    if a.no_mem_slots:
        pf &= ~(1 << ProtocolFeature.CONFIGURE_MEM_SLOTS)
    if a.no_inflight:
        pf &= ~(1 << ProtocolFeature.INFLIGHT_SHMFD)
    from .. import trace

    for pat in a.trace:
        if not trace.set_state(pat, True):
            print(f"{PROG}: --trace {pat}: no such trace event", file=sys.stderr)
            dev.close()
            return 2
    done = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda s, f: done.set())
    try:  # 2. take what was checked
        backend = VhostUserBackend(dev, listen_fd=a.fd, claim=sock_claim, loop=loop, name="vhost-user-blk",
                                   protocol_features=pf)
    except (OSError, PathRefused) as e:
        print(f"{PROG}: cannot listen: {e}", file=sys.stderr)
        dev.close()
        return 2
    if a.no_self_kick:  # (the same as --x-fix-off self-kick-after-reconnect)
        backend.faults.set_fix("self-kick-after-reconnect", False)
    cancel_io_delay = backend.faults.switch(
        CANCEL_IO_DELAY_ON_STOP, "off: a stopping back-end waits for every I/O stalled by --io-delay-ms to sleep "
        "its full delay before it exits")
    if a.trace:
        trace.add_sink(lambda rec: print(trace.format_record(rec), file=sys.stderr, flush=True))
    qmp = None
    target = None
    metrics: MetricsServer | None = None
    if qmp_claim is not None:
        from .backend_monitor import BackendTarget

        target = BackendTarget(backend, done.set)  # registers the monitor's faults
    loop.start()
    try:
        for name in a.x_fix_off:  # before start(): no front-end is served with the fix still on
            try:
                backend.faults.set_fix(name, False)
            except FaultError as e:
                print(f"{PROG}: --x-fix-off {name}: {e}", file=sys.stderr)
                return 2
        if a.metrics is not None:  # bound before the back-end serves: a port in use is refused first
            try:
                metrics = bind_metrics(a.metrics, program="vhost-user-blk", prog=PROG,
                                       source=lambda: [backend_counters(backend)])
            except OSError as e:
                print(f"{PROG}: --metrics {e}", file=sys.stderr)
                return 2
        backend.start()
        if target is not None:
            from ..monitor.commands import add_hmp_info, build_registry

            reg, attach = build_registry(target, extra={
                "x-query-vhost-user-backend": (lambda: loop.run_sync(
                    lambda: dict(backend.status(), messages=dict(backend.message_counts))), []),
                "x-query-kickcall-counters": (lambda: backend_counters(backend), []),
            })
            add_hmp_info(reg, "counters", "x-query-kickcall-counters", format_counters)
            qmp = QMPServer(reg, claim=qmp_claim, name="vhost-user-blk")
            attach(qmp)
            qmp.start()
        if metrics is not None:
            metrics.start()
            print(f"{PROG}: metrics on {metrics.url}", file=sys.stderr, flush=True)
        where = a.socket_path or f"fd {a.fd}"
        print(f"{PROG}: serving {a.blk_file} on {where}", file=sys.stderr, flush=True)
        while not done.wait(1.0):  # a timed wait, so that signals are handled promptly
            pass
    finally:
        if metrics is not None:
            metrics.stop()
        if cancel_io_delay.fix_on:
            dev.cancel_io_delays()  # requests sleeping in --io-delay-ms finish now: the drain is prompt
        backend.stop()
        loop.stop()
        dev.close()
        if qmp is not None:
            qmp.stop()
    return 0
