"""Prometheus metrics from counters documents (``kickcall.counters``), with the official client.

Every program that counts notifications answers QMP ``x-query-kickcall-counters`` with a counters
document; this module renders one or more of those documents into Prometheus metric families
(``CountersCollector``, a ``prometheus_client`` custom collector on a registry of its own, never
the client's global default registry), serves them over HTTP (``MetricsServer``: ``GET /metrics``
in the Prometheus text format, or OpenMetrics when the scraper asks for it) and writes them to a
file for node-exporter's textfile collector (``write_textfile``: a temporary file in the same
directory, then a rename).

The families and their labels are listed in README.md ("Metrics"); tests/test_metrics.py checks
that list against a scrape.  A document is read once per scrape, so every sample of one scrape
comes from one snapshot, and the values are the ones QMP reports for that snapshot.  A document
with missing keys or values of the wrong type (an older or a hostile program) loses only the
entries that cannot be read: collecting never raises.

The listening rule is the monitor's TCP rule: loopback unless the user names another address
(``parse_listen``: ``PORT`` and ``127.0.0.1:PORT`` bind loopback; ``0.0.0.0:PORT`` only because
the user wrote it, and the caller then warns).
"""

from __future__ import annotations

import argparse
import ipaddress
import logging
import math
import os
import socket
import socketserver
import stat
import sys
import tempfile
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any, NamedTuple
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer

from prometheus_client import generate_latest
from prometheus_client.exposition import make_wsgi_app
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import CollectorRegistry

from .counters import COUNTERS_SCHEMA
from .threads import named_thread, start_thread

__all__ = ["Labelled", "Source", "CountersCollector", "registry_for", "render", "MetricsAddressError",
           "parse_listen", "listen_arg", "is_loopback", "MetricsBindError", "MetricsServer", "bind_metrics", "TextfileError", "write_textfile", "METRICS_PATH", "MAX_REQUESTS"]

log = logging.getLogger("kickcall.metrics")

METRICS_PATH = "/metrics"
MAX_REQUESTS = 8  # scrapes served at once; a further connection is closed at once (a stuck client holds one)
REQUEST_TIMEOUT = 10.0  # seconds a scraper may take to send its request or read the answer


class Labelled(NamedTuple):
    """A counters document with labels added to every one of its samples (``kickcall metrics``
    adds ``target``, the QMP socket it came from, so that two back-ends on one host stay apart)."""

    labels: Mapping[str, str]
    doc: Mapping[str, Any]


#: what a collector reads once per scrape: counters documents, each bare or with extra labels
Source = Callable[[], Sequence[Mapping[str, Any] | Labelled]]


def _num(v: object) -> float | None:
    """*v* as a sample value, or None when it is not a finite number (bool counts as 0/1)."""
    if isinstance(v, bool):
        return float(v)
    if isinstance(v, (int, float)) and math.isfinite(v):
        return float(v)
    return None


def _count(v: object) -> float | None:
    """*v* as a counter's value: a finite number >= 0 (not a bool)."""
    if isinstance(v, bool):
        return None
    n = _num(v)
    return n if n is not None and n >= 0 else None


def _label(v: object) -> str:
    return v if isinstance(v, str) else str(v)


class _Families:
    """The families of one scrape, each with a fixed label set; a label set seen twice in one
    family is dropped (a hostile document with two queues numbered alike)."""

    def __init__(self, extra: Sequence[str]) -> None:
        self.extra = tuple(extra)
        self.fams: dict[str, Metric] = {}
        self.labelnames: dict[str, tuple[str, ...]] = {}
        self.seen: dict[str, set[tuple[str, ...]]] = {}

    def define(self, kind: str, name: str, doc: str, labels: Sequence[str]) -> None:
        names = (*labels, *self.extra)
        fam: Metric
        if kind == "counter":
            fam = CounterMetricFamily(name, doc, labels=names)
        else:
            fam = GaugeMetricFamily(name, doc, labels=names)
        self.fams[name] = fam
        self.labelnames[name] = names
        self.seen[name] = set()

    def add(self, name: str, labels: Sequence[object], value: float | None, extra: Sequence[str]) -> None:
        if value is None:
            return
        key = tuple(_label(x) for x in labels) + tuple(extra)
        if len(key) != len(self.labelnames[name]) or key in self.seen[name]:
            return
        self.seen[name].add(key)
        fam = self.fams[name]
        assert isinstance(fam, (CounterMetricFamily, GaugeMetricFamily))
        fam.add_metric(list(key), value)


# (kind, name, help, labels): the README's "Metrics" table lists the same
FAMILIES: list[tuple[str, str, str, tuple[str, ...]]] = [
    ("gauge", "kickcall_up", "1 for each counters document read for this scrape; 0 when the program could not "
     "produce one", ("program",)),
    ("gauge", "kickcall_counters_schema", "the counters document's schema version (kickcall.counters; this "
     f"exporter reads schema {COUNTERS_SCHEMA})", ("program",)),
    ("gauge", "kickcall_running", "1 when the program's vCPUs/queues run, 0 when paused", ("program",)),
    ("gauge", "kickcall_device_info", "1 per device, with its type, who handles its queues and its interrupt mode",
     ("program", "device", "type", "handled_by", "irq_mode")),
    ("gauge", "kickcall_device_broken", "1 when the device is marked broken (virtio NEEDS_RESET, a frozen function)",
     ("program", "device")),
    ("counter", "kickcall_kicks_total", "kicks (guest to device notifications) by the path they took",
     ("program", "device", "queue", "path")),
    ("counter", "kickcall_calls_total", "calls (device to guest notifications) by the path they took",
     ("program", "device", "queue", "path")),
    ("counter", "kickcall_calls_suppressed_total", "calls the device did not send (the driver's event index or "
     "NO_INTERRUPT flag said so)", ("program", "device", "queue")),
    ("counter", "kickcall_calls_without_fd_total", "calls a vhost-user back-end had to make with no call fd set",
     ("program", "device", "queue")),
    ("gauge", "kickcall_queue_inflight", "requests popped from the queue and not yet completed",
     ("program", "device", "queue")),
    ("counter", "kickcall_polled_requests_total", "requests a polling back-end found in the avail ring without a "
     "kick", ("program", "device", "queue")),
    ("counter", "kickcall_poll_events_total", "the back-end loop's adaptive polling: rounds, phases, successes, "
     "recheck-hits, grows, shrinks", ("program", "device", "event")),
    ("counter", "kickcall_poll_seconds_total", "time the back-end loop spent polling", ("program", "device")),
    ("gauge", "kickcall_poll_window_seconds", "the polling window now (which=current) and its bound (which=max)",
     ("program", "device", "which")),
    ("gauge", "kickcall_queue_info", "1 per queue, with its interrupt mode, who handles it and the back-end's "
     "ring state (empty where there is none)", ("program", "device", "queue", "irq_mode", "handled_by", "ring_state")),
    ("gauge", "kickcall_queue_ring_index", "a ring index of the queue (a vfio-user function's producer and "
     "consumer)", ("program", "device", "queue", "index")),
    ("gauge", "kickcall_msix_vector_masked", "1 when the queue's MSI-X vector is masked (only where a vector "
     "applies)", ("program", "device", "queue", "vector")),
    ("gauge", "kickcall_msix_vector_pending", "1 when the queue's MSI-X vector has its PBA bit set (only where a "
     "vector applies)", ("program", "device", "queue", "vector")),
    ("gauge", "kickcall_backend_connected", "1 while a vhost-user front-end is connected", ("program", "device")),
    ("counter", "kickcall_backend_connections_total", "front-end connections the back-end accepted",
     ("program", "device")),
    ("counter", "kickcall_backend_reconnects_total", "connections after the first", ("program", "device")),
    ("counter", "kickcall_backend_disconnects_total", "front-end connections that ended", ("program", "device")),
    ("counter", "kickcall_backend_protocol_errors_total", "vhost-user messages refused as malformed or out of order",
     ("program", "device")),
    ("counter", "kickcall_hypervisor_events_total", "the hypervisor's global counters (ioeventfd writes, irqfd "
     "injections, MSI injections, MMIO/PIO exits, ...)", ("program", "event")),
    ("counter", "kickcall_exits_total", "heavyweight exits to the VMM by kind", ("program", "kind")),
]


def _render_doc(f: _Families, doc: Mapping[str, Any], extra: Sequence[str]) -> None:
    program = doc.get("program")
    program = program if isinstance(program, str) else "unknown"
    f.add("kickcall_up", [program], 1.0, extra)
    f.add("kickcall_counters_schema", [program], _num(doc.get("schema")), extra)
    f.add("kickcall_running", [program], _num(doc.get("running")) if isinstance(doc.get("running"), bool) else None,
          extra)
    devices = doc.get("devices")
    for dev_id, d in (devices.items() if isinstance(devices, Mapping) else ()):
        if not isinstance(d, Mapping):
            continue
        dev = _label(dev_id)
        f.add("kickcall_device_info", [program, dev, _label(d.get("type", "")), _label(d.get("handled-by", "")),
                                       _label(d.get("irq-mode", ""))], 1.0, extra)
        if isinstance(d.get("broken"), bool):
            f.add("kickcall_device_broken", [program, dev], float(d["broken"]), extra)
        if isinstance(d.get("connected"), bool):
            f.add("kickcall_backend_connected", [program, dev], float(d["connected"]), extra)
        for key, fam in (("connections", "kickcall_backend_connections_total"),
                         ("reconnects", "kickcall_backend_reconnects_total"),
                         ("disconnects", "kickcall_backend_disconnects_total"),
                         ("protocol-errors", "kickcall_backend_protocol_errors_total")):
            if key in d:
                f.add(fam, [program, dev], _count(d[key]), extra)
        poll = d.get("polling")
        if isinstance(poll, Mapping):
            for event in ("rounds", "phases", "successes", "recheck-hits", "grows", "shrinks"):
                if event in poll:
                    f.add("kickcall_poll_events_total", [program, dev, event], _count(poll[event]), extra)
            ns = _count(poll.get("poll-ns"))
            f.add("kickcall_poll_seconds_total", [program, dev], None if ns is None else ns / 1e9, extra)
            for key, which in (("window-ns", "current"), ("poll-max-ns", "max")):
                v = _count(poll.get(key))
                f.add("kickcall_poll_window_seconds", [program, dev, which], None if v is None else v / 1e9, extra)
        queues = d.get("queues")
        for q in (queues if isinstance(queues, list) else ()):
            if isinstance(q, Mapping):
                _render_queue(f, program, dev, q, extra)
    for key, fam in (("hv", "kickcall_hypervisor_events_total"), ("exits", "kickcall_exits_total")):
        counts = doc.get(key)
        for name, v in (counts.items() if isinstance(counts, Mapping) else ()):
            f.add(fam, [program, _label(name)], _count(v), extra)


def _render_queue(f: _Families, program: str, dev: str, q: Mapping[str, Any], extra: Sequence[str]) -> None:
    qi = q.get("queue")
    if isinstance(qi, bool) or not isinstance(qi, int):
        return
    base = [program, dev, str(qi)]
    for key, fam in (("kicks-by-path", "kickcall_kicks_total"), ("calls-by-path", "kickcall_calls_total")):
        by_path = q.get(key)
        for path, v in (by_path.items() if isinstance(by_path, Mapping) else ()):
            f.add(fam, [*base, _label(path)], _count(v), extra)
    for key, fam in (("calls-suppressed", "kickcall_calls_suppressed_total"),
                     ("calls-without-fd", "kickcall_calls_without_fd_total"),
                     ("polled-requests", "kickcall_polled_requests_total")):
        if key in q:
            f.add(fam, base, _count(q[key]), extra)
    if "inuse" in q:
        f.add("kickcall_queue_inflight", base, _num(q["inuse"]) if not isinstance(q["inuse"], bool) else None, extra)
    ring_state = q.get("ring-state")
    f.add("kickcall_queue_info", [*base, _label(q.get("irq-mode", "")), _label(q.get("handled-by", "")),
                                  ring_state if isinstance(ring_state, str) else ""], 1.0, extra)
    idx = q.get("ring-indices")
    for name, v in (idx.items() if isinstance(idx, Mapping) else ()):
        f.add("kickcall_queue_ring_index", [*base, _label(name)], _count(v), extra)
    vector = q.get("vector")
    if isinstance(vector, int) and not isinstance(vector, bool):
        for key, fam in (("masked", "kickcall_msix_vector_masked"), ("pending", "kickcall_msix_vector_pending")):
            if isinstance(q.get(key), bool):  # null: no MSI-X vector applies (INTx, a back-end's call fd)
                f.add(fam, [*base, str(vector)], float(q[key]), extra)


class CountersCollector:
    """A ``prometheus_client`` custom collector: each ``collect()`` reads *source* once (a list of
    counters documents) and renders them into the families of ``FAMILIES``.

    *program*: the name ``kickcall_up`` carries (with the value 0) when *source* raises -- the
    program cannot produce its document (it is stopping): the scrape still answers, and says so."""

    def __init__(self, source: Source, *, program: str = "kickcall") -> None:
        self.source = source
        self.program = program

    def describe(self) -> list[Metric]:
        """Nothing: the registry must not call ``collect()`` (and with it the program) to learn the
        names when the collector is registered."""
        return []

    def collect(self) -> Iterator[Metric]:
        try:
            docs = list(self.source())
        except Exception as e:  # the program's own failure: reported as up 0, never a failed scrape
            log.warning("metrics: cannot read the counters: %s", e)
            docs = None
        extra_names: list[str] = []
        for item in docs or ():
            if isinstance(item, Labelled):
                for k in item.labels:
                    if k not in extra_names:
                        extra_names.append(k)
        f = _Families(extra_names)
        for kind, name, helptext, labelnames in FAMILIES:
            f.define(kind, name, helptext, labelnames)
        if docs is None:
            f.add("kickcall_up", [self.program], 0.0, [""] * len(extra_names))
        for item in docs or ():
            labels: Mapping[str, str] = {}
            doc: object = item
            if isinstance(item, Labelled):
                labels, doc = item.labels, item.doc
            if not isinstance(doc, Mapping):
                continue
            extra = [_label(labels.get(k, "")) for k in extra_names]
            _render_doc(f, doc, extra)
        for m in f.fams.values():
            if m.samples:
                yield m


def registry_for(source: Source, *, program: str = "kickcall") -> CollectorRegistry:
    """A fresh registry holding one ``CountersCollector`` (and nothing else: no process or
    platform collectors; the program's own numbers are what a fleet dashboard needs)."""
    reg = CollectorRegistry(auto_describe=False)
    reg.register(CountersCollector(source, program=program))
    return reg


def render(docs: Sequence[Mapping[str, Any] | Labelled]) -> bytes:
    """The Prometheus text format of *docs* (``generate_latest`` on a registry of their own)."""
    return generate_latest(registry_for(lambda: docs))


# -- where to listen ---------------------------------------------------------------------------------
class MetricsAddressError(ValueError):
    """A ``--metrics`` value that is not ``PORT`` or ``ADDRESS:PORT`` (an IP address)."""

    kind = "bad-address"


def is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def parse_listen(text: str) -> tuple[str, int]:
    """``PORT``, ``ADDRESS:PORT`` or ``[IPv6]:PORT`` -> (address, port).  A port alone listens on
    127.0.0.1; ``localhost`` is 127.0.0.1.  Port 0 picks a free port."""
    host, sep, port = text.rpartition(":")
    if not sep:
        host, port = "127.0.0.1", text
    elif host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif ":" in host:
        raise MetricsAddressError(f"'{text}': write an IPv6 address in brackets, as [::1]:PORT")
    if not port.isdigit() or not 0 <= int(port) <= 65535:
        raise MetricsAddressError(f"'{text}': the port must be 0..65535 (0: any free port)")
    if host == "localhost":
        host = "127.0.0.1"
    try:
        ipaddress.ip_address(host)
    except ValueError:
        raise MetricsAddressError(f"'{text}': '{host}' is not an IP address (give PORT for loopback, or "
                                  f"ADDRESS:PORT)") from None
    return host, int(port)


def listen_arg(text: str) -> tuple[str, int]:
    """``parse_listen`` as an argparse ``type`` (argparse names the option in its error)."""
    try:
        return parse_listen(text)
    except MetricsAddressError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


class MetricsBindError(OSError):
    """The endpoint's address cannot be bound (in use, not an address of this host); the message
    names the address."""

    kind = "bind"


# -- the HTTP endpoint -------------------------------------------------------------------------------
class _QuietHandler(WSGIRequestHandler):
    """No access log on stderr (a scrape every 15 s would drown the program's own output)."""

    timeout = REQUEST_TIMEOUT

    def log_message(self, format: str, *args: Any) -> None:
        pass


class _Server(WSGIServer):
    """wsgiref's server with a bounded, named thread per scrape (``kc-metrics-req``), joined on close."""

    daemon_threads = False
    allow_reuse_address = True

    def __init__(self, addr: tuple[str, int], family: socket.AddressFamily) -> None:
        self.address_family = family
        self._mu = threading.Lock()
        self._requests: list[threading.Thread] = []
        super().__init__(addr, _QuietHandler)

    def server_bind(self) -> None:
        # HTTPServer.server_bind asks the resolver for the host's FQDN: skipped (a slow or absent DNS
        # would delay the program's start); the WSGI environ gets the address as the server name
        socketserver.TCPServer.server_bind(self)
        host, port = self.server_address[:2]
        self.server_name = str(host)
        self.server_port = int(port)
        self.setup_environ()

    def process_request(self, request: Any, client_address: Any) -> None:
        with self._mu:
            self._requests = [t for t in self._requests if t.is_alive()]
            if len(self._requests) >= MAX_REQUESTS:
                self.shutdown_request(request)
                return
            t = named_thread(self._one, "kc-metrics-req", args=(request, client_address), daemon=True)
            self._requests.append(t)
        t.start()

    def _one(self, request: Any, client_address: Any) -> None:
        try:
            self.finish_request(request, client_address)
        except Exception:  # a client that went away mid-answer: nothing to tell anyone
            pass
        finally:
            self.shutdown_request(request)

    def join_requests(self, timeout: float) -> None:
        with self._mu:
            threads = list(self._requests)
        for t in threads:
            t.join(timeout)


class MetricsServer:
    """``GET /metrics`` on *addr*:*port* (TCP), answered from *source* (a callable returning
    counters documents) by ``prometheus_client``'s WSGI app on a registry of its own.

    Binds in the constructor (an ``OSError`` names the address: in use, not local, ...), serves
    once ``start()`` is called, on the thread ``kc-metrics`` (each scrape on a ``kc-metrics-req``,
    at most ``MAX_REQUESTS`` at once).  ``stop()`` closes the socket and joins every thread.  Any
    other path answers 404; ``/`` points to ``/metrics``."""

    def __init__(self, addr: str, port: int, source: Source, *, program: str = "kickcall") -> None:
        family = socket.AF_INET6 if ":" in addr else socket.AF_INET
        self._collector = CountersCollector(source, program=program)
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(self._collector)
        app = make_wsgi_app(self.registry)

        def routed(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
            path = environ.get("PATH_INFO", "")
            if path == METRICS_PATH:
                out: Iterable[bytes] = app(environ, start_response)
                return out
            body = (b'<html><body><a href="/metrics">/metrics</a></body></html>\n' if path == "/" else
                    b"not found: kickcall serves /metrics\n")
            start_response("200 OK" if path == "/" else "404 Not Found",
                           [("Content-Type", "text/html" if path == "/" else "text/plain"),
                            ("Content-Length", str(len(body)))])
            return [body]

        try:
            self._server = _Server((addr, port), family)
        except OSError as e:
            err = MetricsBindError(f"{_hostport(addr, port)}: {e.strerror or e}")
            err.errno = e.errno
            raise err from None
        self._server.set_app(routed)
        self.addr = addr
        self.port = int(self._server.server_address[1])
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"http://{_hostport(self.addr, self.port)}{METRICS_PATH}"

    @property
    def sockname(self) -> tuple[str, int]:
        """The address the socket is bound to (host, port)."""
        host, port = self._server.server_address[:2]
        return str(host), int(port)

    def set_source(self, source: Source) -> None:
        """Read the counters from *source* from the next scrape on (a program binds its port before
        it builds what it will count, so that a port in use is refused before anything starts)."""
        self._collector.source = source

    def start(self) -> "MetricsServer":
        if self._thread is None:
            self._thread = start_thread(self._server.serve_forever, "kc-metrics", kwargs={"poll_interval": 0.5})
        return self

    def stop(self) -> None:
        """Stop serving, close the socket, wait for the threads (a scrape in progress ends within
        ``REQUEST_TIMEOUT``)."""
        if self._thread is not None:
            self._server.shutdown()
            self._thread.join()
            self._thread = None
        self._server.server_close()
        self._server.join_requests(REQUEST_TIMEOUT + 5)

    def __enter__(self) -> "MetricsServer":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _hostport(addr: str, port: int) -> str:
    return f"[{addr}]:{port}" if ":" in addr else f"{addr}:{port}"


def _not_yet() -> Sequence[Mapping[str, Any]]:
    raise RuntimeError("the program is starting")


def bind_metrics(listen: tuple[str, int], *, program: str, prog: str = "kickcall",
                 source: Source | None = None) -> MetricsServer:
    """A ``MetricsServer`` bound to *listen* (``listen_arg``'s result), not serving yet: the caller
    sets its source (``set_source``) once the program is built, then ``start()``s it.  An address
    that is not loopback was asked for by name (``parse_listen`` gives loopback otherwise): it is
    bound, with a warning on stderr.  ``OSError`` (in use, not an address of this host) names
    the address."""
    host, port = listen
    if not is_loopback(host):
        print(f"{prog}: warning: --metrics {_hostport(host, port)} is not a loopback address: anyone who can "
              f"reach this host on that port can read the counters (there is no authentication)",
              file=sys.stderr, flush=True)
    return MetricsServer(host, port, source if source is not None else _not_yet, program=program)


# -- a file for node-exporter's textfile collector ---------------------------------------------------
class TextfileError(OSError):
    """The output file cannot be written as asked (a symbolic link, a directory, no such directory)."""

    kind = "refused"


def write_textfile(path: str, data: bytes) -> None:
    """Write *data* to *path* atomically: a temporary file in the same directory, flushed to disk,
    then renamed over *path*, so that a reader (node-exporter) sees the old file or the new one,
    never half of one.  A *path* that is a symbolic link is refused (neither followed nor
    replaced); so is a directory.  The file's mode is 0644 less the umask (the collector runs as
    another user)."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        st = None
    if st is not None and stat.S_ISLNK(st.st_mode):
        raise TextfileError(f"{path} is a symbolic link: refusing to write through it")
    if st is not None and not stat.S_ISREG(st.st_mode):
        raise TextfileError(f"{path} exists and is not a regular file")
    d = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=d, prefix="." + os.path.basename(path) + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o644 & ~umask)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise

