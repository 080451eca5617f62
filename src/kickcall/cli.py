"""The ``kickcall`` command.

    kickcall run [CONFIG.toml] [--duration S] [--plain] [--interval S] [--pause-at S --pause-for S]
    kickcall bench notify [--json] [--write BENCHMARKS.md] [--quick] [--log FILE] [--rounds N]
    kickcall config [--check FILE]
    kickcall metrics --qmp SOCK [--qmp SOCK ...] [-o FILE]
"""

from __future__ import annotations

import argparse
import collections
import json
import logging
import os
import signal
import sys
import threading
import time

from . import __version__, trace
from .crash import OneLineFormatter, crash_report, thread_excepthook
from .ownership import PathRefused

__all__ = ["main"]


def _positive(v: str) -> float:
    try:
        f = float(v)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{v!r} is not a number") from None
    if f <= 0:
        raise argparse.ArgumentTypeError("must be positive")
    return f


def _loopback_hostport(v: str) -> tuple[str, int]:
    import ipaddress

    host, sep, port = v.rpartition(":")
    host = host.strip("[]")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise argparse.ArgumentTypeError(f"'{v}' is not HOST:PORT")
    try:
        ok = ipaddress.ip_address(host).is_loopback
    except ValueError:
        ok = False
    if not ok:
        raise argparse.ArgumentTypeError(f"'{host}' is not a loopback address: the monitor listens on loopback only")
    return host, int(port)


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="kickcall", description="The kick and call paths of virtual devices.")
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="run a machine and its workload")
    r.add_argument("config", nargs="?", help="machine TOML file (default: the built-in machine)")
    r.add_argument("--duration", type=_positive, help="seconds to run (default: until Ctrl-C on a terminal, "
                                                     "10 s otherwise)")
    r.add_argument("--plain", action="store_true", help="periodic lines instead of the live view")
    r.add_argument("--interval", type=_positive, default=1.0, help="seconds between updates (default 1)")
    r.add_argument("--pause-at", type=_positive, help="pause the machine after this many seconds")
    r.add_argument("--pause-for", type=_positive, default=1.0, help="how long to stay paused (default 1)")
    r.add_argument("--trace", action="append", default=[], metavar="PATTERN",
                   help="enable trace events matching PATTERN (QEMU names, globs allowed)")
    r.add_argument("--json", action="store_true", help="print the final counters and results as JSON")
    r.add_argument("--qmp", metavar="PATH", help="serve a QMP monitor on this Unix socket (mode 0600)")
    r.add_argument("--qmp-tcp", metavar="HOST:PORT", type=_loopback_hostport,
                   help="also serve the monitor on this loopback TCP address (127.0.0.1 or ::1 only)")
    from .metrics import listen_arg

    r.add_argument("--metrics", metavar="[ADDR:]PORT", type=listen_arg,
                   help="serve Prometheus metrics on http://ADDR:PORT/metrics (PORT alone: loopback; 0: a free "
                        "port, printed; another address only when given, with a warning)")
    r.add_argument("--connect-timeout", type=_positive, default=30.0, metavar="S",
                   help="seconds a vhost-user device waits for its back-end's socket (default 30)")
    r.add_argument("--allow-write", action="store_true",
                   help="let the workload write to the images the config names (image = \"path\"); "
                        "without it they are only read")
    b = sub.add_parser("bench", help="benchmarks")
    bs = b.add_subparsers(dest="bench", required=True)
    from . import bench as bench_cmd

    bench_cmd.add_arguments(bs.add_parser)
    from .apps import vhost_user_blk, vhost_user_test

    vb = sub.add_parser("vhost-user-blk", help="a vhost-user-blk back-end (for QEMU, libvirt, any front-end)")
    vhost_user_blk.add_arguments(vb)
    vt = sub.add_parser("vhost-user-test", help="a data-verified workload against any vhost-user-blk back-end")
    vhost_user_test.add_arguments(vt)
    from .apps import vfio_user_server

    vs = sub.add_parser("vfio-user-server", help="a host PCIe function behind vfio-pci's rules, served over vfio-user")
    vfio_user_server.add_arguments(vs)
    dg = sub.add_parser("diagnose", help="tell a lost kick from a lost call on a hung queue (and fix it)")
    from .diagnose import cli as diagnose_cli

    diagnose_cli.add_arguments(dg)
    sh = sub.add_parser("shell", help="an interactive monitor (HMP and QMP) on a kickcall socket")
    sh.add_argument("socket", help="the monitor's Unix socket")
    c = sub.add_parser("config", help="print the full config reference: every key, its default and range")
    c.add_argument("--check", metavar="FILE", help="validate a config file and exit")
    mt = sub.add_parser("metrics", help="print live targets' counters once in the Prometheus text format "
                                        "(for node-exporter's textfile collector)")
    mt.add_argument("--qmp", action="append", required=True, metavar="SOCK",
                    help="a kickcall monitor's Unix socket (run, vhost-user-blk, vfio-user-server); repeat for "
                         "several targets (each sample is labelled target=SOCK)")
    mt.add_argument("-o", "--output", metavar="FILE",
                    help="write FILE atomically (a temporary file in its directory, then a rename; a symbolic "
                         "link is refused) instead of standard output")
    mt.add_argument("--timeout", type=_positive, default=10.0, metavar="S",
                    help="seconds to wait for each monitor (default 10)")
    # every parser add_subparsers made, from the groups themselves: argparse has no public list of
    # a parser's subcommands (a new group of subcommands goes here too)
    _add_version([ap, *sub.choices.values(), *bs.choices.values()])
    _add_log_level(ap, [*sub.choices.values(), b, *bs.choices.values()])
    return ap


LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")


def _log_level(text: str) -> str:
    v = text.upper()
    if v not in LOG_LEVELS:
        raise argparse.ArgumentTypeError(f"'{text}' is not a log level ({', '.join(x.lower() for x in LOG_LEVELS)})")
    return v


def _add_log_level(top: argparse.ArgumentParser, subs: list[argparse.ArgumentParser]) -> None:
    """``--log-level`` before or after the subcommand, in any case (the last one given wins)."""
    helptext = "debug, info, warning (the default) or error; any case, anywhere on the command line"
    top.add_argument("--log-level", type=_log_level, default="WARNING", metavar="LEVEL", help=helptext)
    for p in dict.fromkeys(subs):
        p.add_argument("--log-level", type=_log_level, default=argparse.SUPPRESS, metavar="LEVEL", help=helptext)


def _add_version(parsers: list[argparse.ArgumentParser]) -> None:
    """``--version`` on the command and on every subcommand (each parser once: an alias maps to
    the same parser)."""
    for p in dict.fromkeys(parsers):
        p.add_argument("--version", action="version", version=f"kickcall {__version__}")


# -- exit statuses (README, "Exit status") ------------------------------------------------------------
EXIT_OK = 0           # done; for run: every data check passed; for diagnose: nothing stalled
EXIT_FAILED = 1       # the job ran and found a problem (data errors, a stall, a failed benchmark run)
EXIT_REFUSED = 2      # bad arguments or configuration, or a path refused (named on the one line printed)
EXIT_SOFTWARE = 70    # an internal error (a kickcall bug): one line and the path of a crash report
EXIT_INTERRUPTED = 130  # Ctrl-C (SIGINT)
EXIT_BROKEN_PIPE = 141  # the reader of our output went away
EXIT_TERMINATED = 143   # SIGTERM, where the command does not treat it as a request to stop cleanly


class Terminated(BaseException):
    """SIGTERM, raised in the main thread so that every clean-up (finally) runs."""


def _on_sigterm(signum: int, frame: object) -> None:
    raise Terminated()


def _on_sigint(signum: int, frame: object) -> None:
    """Ctrl-C: KeyboardInterrupt once; a second Ctrl-C while the first is being cleaned up is ignored
    (the clean-up is bounded, and an interrupted clean-up would leave files behind)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    """The ``kickcall`` command.  Never prints a Python traceback: see the EXIT_* statuses."""
    threading.excepthook = thread_excepthook
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, _on_sigint)
    if threading.current_thread() is threading.main_thread() and \
            signal.getsignal(signal.SIGTERM) == signal.SIG_DFL:
        signal.signal(signal.SIGTERM, _on_sigterm)
    rc = EXIT_SOFTWARE
    try:
        rc = _main(argv)
    except KeyboardInterrupt:
        print("kickcall: interrupted", file=sys.stderr, flush=True)
        rc = EXIT_INTERRUPTED
    except Terminated:
        print("kickcall: terminated", file=sys.stderr, flush=True)
        rc = EXIT_TERMINATED
    except BrokenPipeError:
        rc = EXIT_BROKEN_PIPE
        try:  # nothing more can be written there; keep Python from complaining at exit
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        except OSError:
            pass
    except PathRefused as e:
        print(f"kickcall: {e}", file=sys.stderr, flush=True)
        rc = EXIT_REFUSED
    except RuntimeError as e:
        from .peers.guest_image import PeerMissing

        if not isinstance(e, PeerMissing):
            rc = _internal_error(e)
        else:  # a real peer program this command needs is not installed
            print(f"kickcall: {e}", file=sys.stderr, flush=True)
            rc = EXIT_REFUSED
    except SystemExit:
        raise
    except Exception as e:
        rc = _internal_error(e)
    finally:
        if argv is None:  # the program itself: from here on it only exits, and a late Ctrl-C
            try:          # must not print a traceback from the interpreter's shutdown
                signal.signal(signal.SIGINT, signal.SIG_IGN)
                signal.signal(signal.SIGTERM, signal.SIG_IGN)
            except ValueError:  # not the main thread
                pass
    return rc


def _internal_error(e: BaseException) -> int:
    import traceback

    path = crash_report("uncaught exception", "".join(traceback.format_exception(e)))
    print(f"kickcall: internal error: {type(e).__name__}: {e}"
          f"{' (crash report: ' + path + ')' if path else ''}", file=sys.stderr, flush=True)
    return EXIT_SOFTWARE


class _HeldLines(logging.Handler):
    """Lines for stderr (log records, trace lines), written at once -- or, while the live view
    owns the terminal, kept (the last 1000) and written when it closes; the latest is the view's
    note."""

    def __init__(self) -> None:
        super().__init__()
        self.setFormatter(OneLineFormatter("%(levelname)s %(name)s: %(message)s"))
        self._lines: collections.deque[str] = collections.deque(maxlen=1000)
        self._dropped = 0
        self._holding = False
        self._saved: list[logging.Handler] = []
        self._mu = threading.Lock()

    def emit(self, record: logging.LogRecord) -> None:
        self.write(self.format(record))

    def write(self, line: str) -> None:
        with self._mu:
            if not self._holding:
                print(line, file=sys.stderr, flush=True)
                return
            if len(self._lines) == self._lines.maxlen:
                self._dropped += 1
            self._lines.append(line)

    def last(self) -> str:
        with self._mu:
            return self._lines[-1][:200] if self._lines else ""

    def hold(self) -> None:
        root = logging.getLogger()
        with self._mu:
            self._holding = True
            self._saved = list(root.handlers)
        for h in self._saved:
            root.removeHandler(h)
        root.addHandler(self)

    def release(self) -> None:
        with self._mu:
            if not self._holding:
                return
            self._holding = False
            lines, dropped = list(self._lines), self._dropped
            self._lines.clear()
        root = logging.getLogger()
        root.removeHandler(self)
        for h in self._saved:
            root.addHandler(h)
        if dropped:
            print(f"kickcall: {dropped} earlier log/trace lines of the live view's time were dropped",
                  file=sys.stderr)
        for line in lines:
            print(line, file=sys.stderr)
        sys.stderr.flush()


def _main(argv: list[str] | None = None) -> int:
    ap = _parser()
    a = ap.parse_args(argv)
    handler = logging.StreamHandler()
    handler.setFormatter(OneLineFormatter("%(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=a.log_level, handlers=[handler])
    if a.cmd == "run":
        return cmd_run(a)
    if a.cmd == "bench":
        from .bench import bench_main

        return bench_main(a)
    if a.cmd == "vhost-user-blk":
        from .apps import vhost_user_blk

        return vhost_user_blk.main(a)
    if a.cmd == "vfio-user-server":
        from .apps import vfio_user_server

        return vfio_user_server.run(a)
    if a.cmd == "vhost-user-test":
        from .apps import vhost_user_test

        return vhost_user_test.main(a)
    if a.cmd == "diagnose":
        from .diagnose import cli as diagnose_cli

        return diagnose_cli.main(a)
    if a.cmd == "shell":
        from .monitor import shell

        return shell.main(a.socket)
    if a.cmd == "metrics":
        return cmd_metrics(a)
    if a.cmd == "config":
        from .machine.config import ConfigError, load_config, reference_toml

        if a.check:
            try:
                load_config(a.check)
            except ConfigError as e:
                print(f"kickcall: config error: {e}", file=sys.stderr)
                return 2
            print(f"{a.check}: ok")
            return 0
        print(reference_toml(), end="")
        return 0
    return 2


def cmd_run(a: argparse.Namespace) -> int:
    from .machine import ConfigError, default_config, load_config

    try:
        cfg = load_config(a.config) if a.config else default_config()
    except ConfigError as e:
        print(f"kickcall: config error: {e}", file=sys.stderr)
        return EXIT_REFUSED
    if a.allow_write:
        for dc in cfg.devices:
            if dc.image:
                dc.allow_write = True
    # every path this run will bind is checked (and locked) before anything is built
    from .ownership import SocketClaim

    claim = None
    if a.qmp:
        try:
            claim = SocketClaim(a.qmp)
        except PathRefused as e:
            print(f"kickcall: --qmp {e}", file=sys.stderr)
            return EXIT_REFUSED
    metrics = None
    try:
        if a.metrics is not None:  # bound before the machine is built: a port in use is refused first
            from .metrics import bind_metrics

            try:
                metrics = bind_metrics(a.metrics, program="kickcall-run")
            except OSError as e:
                print(f"kickcall: --metrics {e}", file=sys.stderr)
                return EXIT_REFUSED
        return _run_machine(a, cfg, claim, metrics)
    finally:
        if metrics is not None:
            metrics.stop()
        if claim is not None:
            claim.release()


def cmd_metrics(a: argparse.Namespace) -> int:
    """``kickcall metrics``: each target's ``x-query-kickcall-counters``, once, as Prometheus text
    (every sample labelled ``target``, its socket).  A target that cannot be reached or has no such
    command fails the whole export (exit 1, naming the socket): nothing is written, so a textfile
    collector keeps the previous file rather than a partial one."""
    from .metrics import Labelled, render, write_textfile
    from .monitor.client import QMPClient, QMPCommandError, QMPConnectionError

    docs = []
    for sock in a.qmp:
        try:
            with QMPClient(sock, timeout=a.timeout) as c:
                c.connect()
                doc = c.execute("x-query-kickcall-counters")
        except QMPCommandError as e:
            why = ("has no x-query-kickcall-counters (not a kickcall monitor: QEMU and qemu-storage-daemon have "
                   "no counters document)" if e.cls == "CommandNotFound" else f"x-query-kickcall-counters failed: {e}")
            print(f"kickcall: metrics: --qmp {sock}: {why}", file=sys.stderr)
            return EXIT_FAILED
        except (QMPConnectionError, OSError) as e:
            print(f"kickcall: metrics: --qmp {sock}: cannot query the monitor: {e}", file=sys.stderr)
            return EXIT_FAILED
        if not isinstance(doc, dict) or "devices" not in doc:
            print(f"kickcall: metrics: --qmp {sock}: the answer is not a counters document", file=sys.stderr)
            return EXIT_FAILED
        docs.append(Labelled({"target": sock}, doc))
    text = render(docs)
    if a.output:
        try:
            write_textfile(a.output, text)
        except OSError as e:
            print(f"kickcall: metrics: -o {a.output}: {e.strerror or e}", file=sys.stderr)
            return EXIT_REFUSED
        return EXIT_OK
    sys.stdout.buffer.write(text)
    sys.stdout.flush()
    return EXIT_OK


def _run_machine(a: argparse.Namespace, cfg, claim, metrics=None) -> int:
    from .machine import Machine, MachineError
    from .machine.view import LiveView, PlainView, ViewError, summary_lines
    if "help" in a.trace:
        for ev in sorted(trace.events(), key=lambda e: e.name):
            print(f"{ev.name}: {ev.doc}")
        return EXIT_OK
    for pat in a.trace:
        if not trace.set_state(pat, True):
            print(f"kickcall: --trace {pat}: matches no trace event (kickcall run --trace help lists them)",
                  file=sys.stderr, flush=True)
    held = _HeldLines()  # stderr's lines while the live view owns the terminal
    if a.trace:
        trace.add_sink(lambda rec: held.write(trace.format_record(rec)))
    tty = sys.stdout.isatty() and sys.stdin.isatty() and not a.plain and not a.json
    duration = a.duration if a.duration is not None else (None if tty else 10.0)
    stop = threading.Event()
    toggle = threading.Event()

    def on_sigint(signum: int, frame: object) -> None:
        stop.set()

    old_int = signal.signal(signal.SIGINT, on_sigint)
    old_term = signal.signal(signal.SIGTERM, on_sigint)
    signal.signal(signal.SIGUSR1, lambda s, f: toggle.set())
    try:
        m = Machine(cfg, connect_timeout=a.connect_timeout)
    except (MachineError, OSError, ValueError) as e:
        signal.signal(signal.SIGINT, old_int)
        signal.signal(signal.SIGTERM, old_term)
        print(f"kickcall: cannot build the machine: {e}", file=sys.stderr)
        return EXIT_REFUSED
    view: LiveView | PlainView | None = None
    results: dict[str, dict] = {}
    rc = 0
    try:
        info = m.start()
        if a.qmp or a.qmp_tcp:
            srv = m.start_monitor(a.qmp, a.qmp_tcp, claim=claim)
            where = " and ".join(x for x in (a.qmp, a.qmp_tcp and f"{a.qmp_tcp[0]}:{srv.tcp_port}") if x)
            print(f"kickcall: QMP monitor on {where}", file=sys.stderr, flush=True)
        if metrics is not None:
            metrics.set_source(lambda: [m.counters()])
            metrics.start()
            print(f"kickcall: metrics on {metrics.url}", file=sys.stderr, flush=True)
        if not a.json and not tty:
            kinds = ", ".join(f"{d['kind']}@{d['slot']}" for d in info.get("devices", []))
            print(f"kickcall: machine {cfg.name!r} up: {cfg.vcpus} vCPUs, guest pid {m.guest_pid}, devices {kinds}",
                  flush=True)
        # the live view (curses: it reads q and p itself) once the messages above are out
        if tty:
            try:
                view = LiveView()
                held.hold()  # log and trace lines would scribble over the screen: kept, shown after
            except ViewError as e:
                print(f"kickcall: {e}: periodic lines instead", file=sys.stderr, flush=True)
                view = PlainView()
        else:
            view = PlainView(sys.stderr) if a.json else PlainView()
        m.start_workload()
        t0 = time.monotonic()
        paused_once = False
        pause_until = None
        next_tick = t0 + a.interval
        while not stop.is_set() and not m.quit_requested.is_set():
            now = time.monotonic()
            if duration is not None and now - t0 >= duration:
                break
            if a.pause_at is not None and not paused_once and now - t0 >= a.pause_at:
                m.pause()
                paused_once = True
                pause_until = now + a.pause_for
            if pause_until is not None and now >= pause_until:
                m.resume()
                pause_until = None
            if toggle.is_set():
                toggle.clear()
                m.resume() if not m.running else m.pause()
            wait = max(0.0, min(next_tick - now, 0.1))
            if isinstance(view, LiveView):
                k = view.poll_key(wait)  # a resize is followed meanwhile
                if k in ("q", "Q"):
                    break
                if k in ("p", "P"):
                    m.resume() if not m.running else m.pause()
            else:
                stop.wait(wait)
            if time.monotonic() >= next_tick:
                view.update(m.counters(), held.last())
                next_tick += a.interval
        results = m.workload_report(m.stop_workload())
        snap = m.counters()
    except (MachineError, OSError, TimeoutError) as e:
        print(f"kickcall: machine failed: {e}", file=sys.stderr)
        rc = 1
        snap = None
    finally:
        if view is not None:
            view.close()  # endwin: the terminal is restored whatever ended the run
        held.release()
        if metrics is not None:
            metrics.stop()  # no scrape reaches a stopping machine
        m.stop()
        signal.signal(signal.SIGINT, old_int)
        signal.signal(signal.SIGTERM, old_term)
    if snap is not None:
        errors = sum(r.get("error-count", 0) for r in results.values())
        if a.json:  # the counters document, with the workload's results keyed by device id
            print(json.dumps(dict(snap, results=results), indent=1))
        wanted = cfg.workload_blk is not None or cfg.workload_net is not None
        if not a.json:
            print("\n".join(summary_lines(snap, results)))
            if errors:
                print(f"kickcall: FAILED: {errors} data errors")
            elif results:
                print("kickcall: all data checks passed")
            elif wanted:
                print("kickcall: FAILED: the workload produced no results")
            else:
                print("kickcall: no workload ran (the config has no [workload] section): nothing to check")
        if errors or (wanted and not results):
            rc = 1
    return rc


if __name__ == "__main__":
    sys.exit(main())
