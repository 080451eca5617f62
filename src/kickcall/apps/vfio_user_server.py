"""``kickcall vfio-user-server``: a host PCIe function (kickcall-nic) behind vfio-pci's rules, served
over vfio-user to one client (a VMM) at a time.

The function and the host kernel model run in this process: ``kickcall.vfio.nic.NicFunction``
(config space, BARs, completion queues that write records by DMA and raise their interrupts),
``kickcall.vfio.host.VfioPciDevice`` (vfio-pci's GET_IRQ_INFO, SET_IRQS, reset and release rules)
with a finite pool of host interrupt vectors (``--host-irqs``), and
``kickcall.vfio.server.VfioUserServer`` on the socket (mode 0600; an existing live socket or a
file kickcall did not create is refused).

Several ``--socket`` (up to 8): one card of that many functions (the same --queues/--vectors/...
for all), each function its own vfio-user endpoint on its own socket, one client at a time each.
The host's topology is a root port at 0000:00:1c.0 with the card's functions at 0000:01:00.0 ..
01:00.(N-1) (monitor ids ``nic0`` ..); the host's PCIe error recovery runs here
(``kickcall.vfio.host_aer``: ``--link-reset-ms``, ``--link-ready-timeout-ms``), and vfio-pci's
access gate waits at most ``--recovery-wait-ms``.  The ready line lists the functions
(``"functions": [{"socket", "bdf", "id"}, ...]``).

``--qmp PATH`` adds a monitor with the host's side: ``x-query-vfio``, ``x-query-pci-msix`` (the
function's own table, PBA and enable bits as the host kernel programmed them),
``x-query-device-notifiers`` (the trigger eventfds the client passed, counters read without
consuming), ``x-debug-device-event {dev, event: call, queue}`` (the queue's vector is raised: a host
interrupt, delivered by whatever the host's state says),
``x-debug-fault`` (``fire-in-msix-disable-window``, the AER switches; owner ``host``),
``x-pcie-aer-inject-error`` / ``x-query-pci-aer`` (``nic0``.., ``rp0``), ``x-vfio-request-release`` (REQ: ask the
client to let go of the device), ``x-query-kickcall-counters`` / HMP ``info counters``, ``quit``.

``--metrics [ADDR:]PORT`` serves the same counters document in the Prometheus text format
(``kickcall.metrics``; loopback unless an address is given); the ready line gains ``"metrics"``,
the URL.
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import threading

from ..metrics import MetricsServer, bind_metrics, listen_arg
from ..ownership import PathRefused, SocketClaim

log = logging.getLogger("kickcall.vfio-user-server")

PROG = "kickcall vfio-user-server"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--socket", required=True, action="append", metavar="PATH",
                   help="listen on this Unix socket (created mode 0600); repeat for each function of a "
                        "multi-function card (up to 8)")
    p.add_argument("--device", choices=("nic",), default="nic", help="the host function (default nic: kickcall-nic)")
    p.add_argument("--queues", type=int, default=4, help="completion queues of the function (1..32, default 4)")
    p.add_argument("--vectors", type=int, default=16, help="MSI-X table size (1..2048, default 16)")
    p.add_argument("--msi-vectors", type=int, default=32, help="MSI Multiple Message Capable (1..32, default 32)")
    p.add_argument("--host-irqs", type=int, default=256,
                   help="host interrupt vectors available to the function (default 256; fewer than "
                        "--vectors to show exhaustion)")
    p.add_argument("--no-dynamic-msix", action="store_true",
                   help="report MSI-X with NORESIZE (a host before Linux 6.5): vectors cannot be added in place")
    p.add_argument("--no-pcie", action="store_true", help="a conventional PCI function (no ERR index, no FLR)")
    p.add_argument("--reset-on-disconnect", action="store_true",
                   help="vfio-pci's release rule: reset the function and free its vectors before the next client")
    p.add_argument("--max-msg-fds", type=int, default=16,
                   help="fds the server takes with one message (1..253, default 16): the client splits larger "
                        "SET_IRQS eventfd arrays")
    p.add_argument("--no-twin-socket", action="store_true", help="do not offer a twin socket for DMA_READ/DMA_WRITE")
    p.add_argument("--link-reset-ms", type=int, default=100,
                   help="how long the link is down in a secondary bus reset of the host port (default 100)")
    p.add_argument("--link-ready-timeout-ms", type=int, default=2000,
                   help="how long the host waits for the devices after a secondary bus reset (default 2000)")
    p.add_argument("--recovery-wait-ms", type=int, default=10000,
                   help="how long a client's access waits while the host resets the link (default 10000; "
                        "below the client's 30 s reply timeout)")
    p.add_argument("--qmp", metavar="PATH", help="a QMP monitor (the host's side) on this Unix socket")
    p.add_argument("--metrics", metavar="[ADDR:]PORT", type=listen_arg,
                   help="serve Prometheus metrics on http://ADDR:PORT/metrics (PORT alone: loopback; 0: a free "
                        "port, printed; another address only when given, with a warning)")
    p.add_argument("--trace", action="append", default=[], metavar="PATTERN",
                   help="enable trace events (vfio_user_*, msix_*); to stderr")


def _check(a: argparse.Namespace) -> str | None:
    if not 1 <= a.queues <= 32:
        return "--queues must be 1..32"
    if not 1 <= a.vectors <= 2048:
        return "--vectors must be 1..2048"
    if a.msi_vectors not in (1, 2, 4, 8, 16, 32):
        return "--msi-vectors must be 1, 2, 4, 8, 16 or 32"
    if not 1 <= a.host_irqs <= 65536:
        return "--host-irqs must be 1..65536"
    if not 1 <= a.max_msg_fds <= 253:
        return "--max-msg-fds must be 1..253"
    if not 1 <= len(a.socket) <= 8:
        return "--socket: 1..8 functions"
    if len(set(a.socket)) != len(a.socket):
        return "--socket: each function needs its own socket"
    if not 0 <= a.link_reset_ms <= 60000:
        return "--link-reset-ms must be 0..60000"
    if not 0 <= a.link_ready_timeout_ms <= 60000:
        return "--link-ready-timeout-ms must be 0..60000"
    if not 0 <= a.recovery_wait_ms < 30000:
        return "--recovery-wait-ms must be 0..29999 (below the client's 30 s reply timeout)"
    return None


def run(a: argparse.Namespace) -> int:
    from .. import trace
    from ..vfio.host import HostIrqPool
    from ..vfio.host_aer import HostAerService, HotResetDomain, build_card
    from ..vfio.server import VfioUserServer

    bad = _check(a)
    if bad:
        print(f"{PROG}: {bad}", file=sys.stderr)
        return 2
    for pat in a.trace:
        if not trace.set_state(pat, True):
            print(f"{PROG}: --trace {pat}: no such trace event", file=sys.stderr)
            return 2
    if a.trace:
        trace.add_sink(lambda rec: print(trace.format_record(rec), file=sys.stderr, flush=True))
    claims: list[SocketClaim] = []
    try:
        for path in a.socket:
            claims.append(SocketClaim(path))
        qclaim = SocketClaim(a.qmp) if a.qmp else None
        if qclaim is not None:
            claims.append(qclaim)
    except PathRefused as e:
        for c in claims:
            c.release()
        print(f"{PROG}: {e}", file=sys.stderr)
        return 1
    metrics: MetricsServer | None = None
    if a.metrics is not None:
        try:
            metrics = bind_metrics(a.metrics, program="vfio-user-server", prog=PROG)
        except OSError as e:
            for c in claims:
                c.release()
            print(f"{PROG}: --metrics {e}", file=sys.stderr)
            return 2
    card = build_card(len(a.socket), queues=a.queues, vectors=a.vectors, msi_vectors=a.msi_vectors,
                      pcie=not a.no_pcie, pool=HostIrqPool(a.host_irqs), dynamic_msix=not a.no_dynamic_msix)
    aer = HostAerService(card, link_reset_ms=a.link_reset_ms, link_ready_timeout_ms=a.link_ready_timeout_ms)
    domain = HotResetDomain(card, aer)
    servers: list[VfioUserServer] = []
    for i, (path, host) in enumerate(zip(a.socket, card.functions, strict=True)):
        host.recovery_wait_ms = a.recovery_wait_ms
        srv = VfioUserServer(path, host, reset_on_disconnect=a.reset_on_disconnect, max_msg_fds=a.max_msg_fds,
                             offer_twin_socket=not a.no_twin_socket, claim=claims[i], hot_reset=domain.endpoint(i))
        domain.set_holder(i, srv.hot_reset_token)
        servers.append(srv)
    done = threading.Event()
    qmp = None
    try:
        aer.start()
        for srv in servers:
            srv.start()
        if qclaim is not None:
            from ..monitor import QMPServer
            from ..counters import format_counters
            from ..monitor.commands import add_hmp_info, build_registry
            from .vfio_host_monitor import HostTarget, extra_commands

            target = HostTarget(card.functions, servers, on_quit=done.set, aer=aer)
            reg, attach = build_registry(target, extra=extra_commands(target))
            add_hmp_info(reg, "counters", "x-query-kickcall-counters", format_counters)
            qmp = QMPServer(reg, path=a.qmp, name="vfio-user-server", claim=qclaim)
            attach(qmp)
            qmp.start()
        if metrics is not None:
            from .vfio_host_monitor import host_counters

            metrics.set_source(lambda: [host_counters(card.functions)])
            metrics.start()
            print(f"{PROG}: metrics on {metrics.url}", file=sys.stderr, flush=True)
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: done.set())
        functions = [{"socket": path, "bdf": str(card.address(i)), "id": card.functions[i].name}
                     for i, path in enumerate(a.socket)]
        print(json.dumps({"ready": True, "socket": a.socket[0], "qmp": a.qmp, "pid": __import__("os").getpid(),
                          "dynamic-msix": not a.no_dynamic_msix, "host-irqs": a.host_irqs,
                          "functions": functions, "metrics": metrics.url if metrics is not None else None}),
              flush=True)
        done.wait()
    finally:
        if metrics is not None:
            metrics.stop()
        if qmp is not None:
            qmp.stop()
        for srv in servers:
            srv.stop()
        aer.stop()
        for host in card.functions:
            host.close()
        for c in claims:
            c.release()
    return 0
