"""The monitor's commands, with QEMU's names, argument names and field names where QEMU has them.

QEMU's read-only virtio introspection (``x-query-virtio*``, 7.2) and ``query-pci``, the run-state
commands, trace events, and the kick/call debug interface seed 000 asked for, done safely:

* ``x-query-pci-msix {dev}``, ``x-query-device-notifiers {dev}`` -- data first, read without
  consuming anything (eventfd counters come from fdinfo);
* ``x-debug-device-event {dev, event, queue, *force}`` -- a kick takes the path the guest's notify
  write would take; a call goes through the vector as the device's would, so a masked vector
  gets its PBA bit, unless ``force``; every injection is counted, logged and announced
  (``X_DEVICE_EVENT_INJECTED``);
* ``x-debug-device-notifier-write {dev, id}`` -- EventNotifier level, as proposed in the thread;
* ``x-debug-fault {dev, *queue, *path, *action, *fault}`` -- the device's fault registry
  (``kickcall.faults``): with ``dev`` alone, list every fault (name, kind, effect, actions,
  state); ``queue``, ``path`` (kick|call|complete) and ``action`` lose kicks, calls or
  completions on purpose; ``fault`` names any registered fault (``action``: drop-next, drop-all,
  clear for a lost event, off or on for a fix; ``queue`` when the fault is per queue).

``human-monitor-command`` runs the same handlers as text commands (``info pci``, ``info virtio``,
``info virtio-queue-status``, ``info notifiers``, ``info msix``, the debug commands, ``stop``,
``cont``, ``quit``).

Run state as QEMU 7.2 changes it: the server runs one handler at a time (``kickcall.monitor.server``),
so reading the state, changing it and emitting its event is one step.  ``stop`` on a running VM
emits STOP, on a paused one nothing; ``cont`` on a paused VM emits RESUME, on a running one
nothing; both reply ``{}`` either way.  ``quit`` (QMP, or HMP ``quit``/``q`` through
``human-monitor-command``) emits SHUTDOWN (guest false, reason ``host-qmp-quit``) once and replies
``{}`` (HMP: ``""``, as QEMU 7.2); then the target quits (the process exits) and no other command
is executed, so a second ``quit`` that was waiting gets no reply and no second SHUTDOWN.
"""

from __future__ import annotations

import logging
import os
import shlex
import time
from typing import Any, Callable, TypedDict

from .. import trace
from ..faults import PROCESS, FaultAction, FaultError
from ..pci.aer import AER_ERROR_NAMES, AerErrFlag, AerParseError, PCIEAERErr, parse_error_status
from .schema import Arg, CommandRegistry, QMPError
from .server import QMPServer
from .target import DeviceView, Target, TargetError

__all__ = ["build_registry", "HMP_COMMANDS"]

log = logging.getLogger("kickcall.monitor")
_t_inject = trace.event("x_debug_device_event", "the operator injected a kick, a call or a notifier write")

class _Bounds(TypedDict):
    min: int
    max: int


U16: _Bounds = {"min": 0, "max": 0xFFFF}
PATH_ACTIONS = ("drop-next", "drop-all", "clear")  # x-debug-fault's actions for a queue's path

# Test-only: seconds that stop, cont and quit wait between reading the run state and changing it
# (quit: between announcing SHUTDOWN and requesting the quit); 0, no wait, in production.
# tests/test_qmp_one_at_a_time.py sets it in a kickcall process it starts, so that two handlers
# running at once (the server's serialisation switched off) overlap every time instead of now and
# then; with the handlers serialised it only makes them slower.
TEST_RACE_WINDOW = 0.0


# The monitor's process-wide fixes (docs/faults.md; tests switch them off to see the old behaviour):
ACCEPT_QDEV_ID = PROCESS.switch(
    "monitor-accept-qdev-id", "off: the x-query-virtio* commands take only a VirtIODevice's QOM path (\"Path blk0 is "
    "not a VirtIODevice\" for a device's id) and the commands that take an id refuse the qdev's QOM path")
HMP_PLAIN_TEXT = PROCESS.switch(
    "hmp-plain-text", "off: HMP answers print Python reprs (a dict, True, None) and key: value dumps of the "
    "QMP reply instead of QEMU 7.2's text")
HMP_INFO_HELP = PROCESS.switch(
    "hmp-info-help", "off: 'info' alone, 'info version' and an info subcommand missing its arguments answer "
    "\"unknown command\"")


def _race_window() -> None:
    if TEST_RACE_WINDOW > 0:
        time.sleep(TEST_RACE_WINDOW)


class _Ctx:
    def __init__(self, target: Target) -> None:
        self.target = target
        self.server: QMPServer | None = None
        self.injections = 0
        # per (device id, queue): operator injections by kind ("kick", "call", "forced", "notifier")
        self.injected: dict[tuple[str, int], dict[str, int]] = {}

    def count(self, dev: str, queue: int, kind: str) -> None:
        if kind != "forced":  # (a forced call is also counted as a call)
            self.injections += 1
        if _t_inject.enabled:
            _t_inject.emit(dev=dev, queue=queue, kind=kind)
        d = self.injected.setdefault((dev, queue), {"kick": 0, "call": 0, "forced": 0, "notifier": 0})
        d[kind] += 1

    def emit(self, event: str, data: dict) -> None:
        if self.server is not None:
            self.server.emit(event, data)

    # -- lookups ----------------------------------------------------------------------------------
    @staticmethod
    def _qdev_path(d: DeviceView) -> str:
        """The QOM path of the qdev itself: a VirtIODevice's parent (``/machine/peripheral/blk0``
        for ``/machine/peripheral/blk0/virtio-backend``), else the device's path."""
        head, _, tail = d.path.rpartition("/")
        return head if tail == "virtio-backend" and head else d.path

    def find(self, name: str) -> DeviceView | None:
        """The device *name* designates: its qdev id, its path or (ACCEPT_QDEV_ID.fix_on) its qdev's QOM path."""
        for d in self.target.devices():
            if name in (d.id, d.path) or (ACCEPT_QDEV_ID.fix_on and name == self._qdev_path(d)):
                return d
        return None

    def by_path(self, path: str, what: str = "VirtIODevice") -> DeviceView:
        """x-query-virtio*'s ``path``: the VirtIODevice's QOM path or (ACCEPT_QDEV_ID.fix_on, kickcall's
        extension) its qdev id; anything else gets QEMU's text (``what``: QEMU 7.2 says "VirtIO
        device" in x-query-virtio-queue-element, "VirtIODevice" elsewhere)."""
        for d in self.target.devices():
            if d.path == path or (ACCEPT_QDEV_ID.fix_on and d.id == path):
                return d
        raise QMPError(f"Path {path} is not a {what}")

    def by_dev(self, dev: str) -> DeviceView:
        d = self.find(dev)
        if d is None:
            raise QMPError(f"Device '{dev}' not found", "DeviceNotFound")
        return d

    def qdev_id(self, name: str) -> str:
        """*name* as a qdev id, for the commands that look devices up by id in the target
        (pcie_aer_inject_error, x-query-pci-aer): a device's path becomes its id, and so does a
        user-created device's QOM path ``/machine/peripheral/<id>`` (a root port is no DeviceView)."""
        if not ACCEPT_QDEV_ID.fix_on:
            return name
        d = self.find(name)
        if d is not None:
            return d.id
        head, _, tail = name.rpartition("/")
        return tail if head == "/machine/peripheral" and tail else name

    @staticmethod
    def queue(d: DeviceView, queue: int) -> int:
        if not 0 <= queue < d.num_queues():
            raise QMPError(f"Invalid virtqueue number {queue}")
        return queue


def _wrap(fn: Callable) -> Callable:
    def call(**kw):
        try:
            return fn(**kw)
        except TargetError as e:
            raise QMPError(e.desc, e.cls) from None

    call.__doc__ = fn.__doc__
    return call


def build_registry(target: Target, *, extra: dict[str, tuple[Callable, list[Arg]]] | None = None
                   ) -> tuple[CommandRegistry, Callable[[QMPServer], None]]:
    """The registry for *target*, and a function to call with the server once it exists (events)."""
    c = _Ctx(target)
    r = CommandRegistry()

    def add(name: str, fn: Callable, *args: Arg, doc: str = "") -> None:
        r.add(name, _wrap(fn), list(args), doc or (fn.__doc__ or "").strip().split("\n")[0])

    # -- run state ---------------------------------------------------------------------------------
    def query_status() -> dict:
        st = target.run_state()
        return {"status": st, "singlestep": False, "running": st == "running"}

    # check, change, announce: one step, since handlers run one at a time (QEMU: under the BQL)
    def stop() -> None:
        if target.run_state() == "running":
            _race_window()
            target.stop()
            c.emit("STOP", {})

    def cont() -> None:
        if target.run_state() != "running":
            _race_window()
            target.cont()
            c.emit("RESUME", {})

    def system_reset() -> None:
        target.system_reset()
        c.emit("RESET", {"guest": False, "reason": "host-qmp-system-reset"})

    def quit_() -> None:
        """QEMU's qmp_quit: one SHUTDOWN; the target quits once the reply is on its way (QMP quit
        and HMP quit alike: the server runs the action after the reply of the running command)."""
        srv = c.server
        if srv is not None and srv.quitting:
            return  # a quit is under way: not a second SHUTDOWN
        c.emit("SHUTDOWN", {"guest": False, "reason": "host-qmp-quit"})
        _race_window()
        if srv is None:
            target.quit()
        else:
            srv.request_quit(target.quit)

    add("query-status", query_status, doc="the run state")
    add("stop", stop, doc="pause the guest's vCPUs and the devices")
    add("cont", cont, doc="resume")
    add("system_reset", system_reset, doc="reset the machine")
    add("quit", quit_, doc="stop the machine (or the back-end) and exit")

    # -- PCI and virtio introspection (QEMU 7.2's names) --------------------------------------------
    def query_pci() -> list:
        devs = [i for d in target.devices() if (i := d.pci_info()) is not None]
        buses = sorted({0} | {int(i.get("bus", 0)) for i in devs})
        return [{"bus": b, "devices": sorted((i for i in devs if int(i.get("bus", 0)) == b),
                                             key=lambda x: (x["slot"], x["function"]))} for b in buses]

    def x_query_virtio() -> list:
        return [{"path": d.path, "name": d.type_name} for d in target.devices() if d.virtio]

    def x_query_virtio_status(path: str) -> dict:
        return c.by_path(path).virtio_status()

    def x_query_virtio_queue_status(path: str, queue: int) -> dict:
        d = c.by_path(path)
        out = d.queue_status(c.queue(d, queue))
        # kickcall: what the operator injected here (an injected event is never mistaken for the guest's)
        out["x-injected"] = dict(c.injected.get((d.id, queue), {"kick": 0, "call": 0, "forced": 0, "notifier": 0}))
        return out

    def x_query_virtio_vhost_queue_status(path: str, queue: int) -> dict:
        d = c.by_path(path)
        if not 0 <= queue < d.num_queues():
            raise QMPError(f"Invalid vhost virtqueue number {queue}")  # QEMU's text
        return d.vhost_queue_status(queue)

    def x_query_virtio_queue_element(path: str, queue: int, index: int | None = None) -> dict:
        d = c.by_path(path, "VirtIO device")  # (sic: QEMU 7.2's text for this command)
        return d.queue_element(c.queue(d, queue), index)

    add("query-pci", query_pci, doc="PCI devices")
    add("x-query-virtio", x_query_virtio, doc="virtio devices")
    add("x-query-virtio-status", x_query_virtio_status, Arg("path", "str"), doc="a virtio device's status")
    add("x-query-virtio-queue-status", x_query_virtio_queue_status, Arg("path", "str"), Arg("queue", "int", **U16),
        doc="a virtqueue's state, read without touching it")
    add("x-query-virtio-vhost-queue-status", x_query_virtio_vhost_queue_status, Arg("path", "str"),
        Arg("queue", "int", **U16), doc="a vhost virtqueue's state (never sends GET_VRING_BASE)")
    add("x-query-virtio-queue-element", x_query_virtio_queue_element, Arg("path", "str"),
        Arg("queue", "int", **U16), Arg("index", "int", optional=True, **U16),
        doc="a descriptor chain, read without popping it")

    # -- notifiers, MSI-X and injection (seed 000, done safely) ------------------------------------
    def x_query_pci_msix(dev: str) -> dict:
        return c.by_dev(dev).msix()

    def x_query_vfio(dev: str) -> dict:
        return c.by_dev(dev).vfio()

    def x_query_device_notifiers(dev: str) -> list:
        return c.by_dev(dev).notifiers()

    def x_debug_device_notifier_write(dev: str, id: int) -> dict:
        d = c.by_dev(dev)
        out = d.notifier_write(id)
        c.count(d.id, out.get("queue", -1), "notifier")
        log.warning("monitor: notifier %d of %s written by the operator", id, d.id)
        c.emit("X_DEVICE_EVENT_INJECTED", {"dev": d.id, "queue": out.get("queue", -1), "event": "notifier",
                                           "forced": True, "path": f"notifier:{out.get('role', '?')}"})
        return out

    def x_debug_device_event(dev: str, event: str, queue: int, force: bool = False) -> dict:
        d = c.by_dev(dev)
        c.queue(d, queue)
        out = d.inject(event, queue, force)
        c.count(d.id, queue, event)
        if out.get("forced"):
            c.count(d.id, queue, "forced")
        log.warning("monitor: %s injected on %s queue %d (path %s%s)", event, d.id, queue, out["path"],
                    ", forced" if out.get("forced") else "")
        c.emit("X_DEVICE_EVENT_INJECTED", {"dev": d.id, "queue": queue, "event": event,
                                           "forced": bool(out.get("forced")), "path": out["path"]})
        return out

    def x_debug_fault(dev: str, queue: int | None = None, path: str | None = None, action: str | None = None,
                      fault: str | None = None) -> dict:
        owner = c.target.fault_owners().get(dev) if c.find(dev) is None else None
        if owner is not None:  # faults of no one device (a machine's): no queues, no paths
            if path is not None or queue is not None:
                raise QMPError(f"'{dev}' has no queues: give 'fault' and 'action'")
            if fault is None and action is None:
                return {"dev": dev, "faults": owner.describe()}
            if fault is None or action is None:
                raise QMPError("Parameter 'fault' or 'action' is missing")
            try:
                out = owner.arm(fault, action)
            except FaultError as e:
                raise QMPError(str(e)) from None
            log.warning("monitor: fault %s %s on %s", fault, action, dev)
            return out
        d = c.by_dev(dev)
        if path is None and fault is None and action is None and queue is None:
            return {"dev": d.id, "faults": d.faults()}
        if path is not None and fault is not None:
            raise QMPError("give either 'path' or 'fault', not both")
        if action is None:
            raise QMPError("Parameter 'action' is missing")
        if path is not None:
            if queue is None:
                raise QMPError("Parameter 'queue' is missing")
            if action not in PATH_ACTIONS:
                raise QMPError(f"Parameter 'action' does not accept value '{action}' with 'path'")
            c.queue(d, queue)
            out = d.fault(queue, path, action)
            log.warning("monitor: fault %s on the %s path of %s queue %d", action, path, d.id, queue)
            return out
        if fault is None:
            raise QMPError("Parameter 'path' or 'fault' is missing")
        if queue is not None:
            c.queue(d, queue)
        out = d.set_fault(fault, action, queue)
        log.warning("monitor: fault %s %s on %s%s", fault, action, d.id, "" if queue is None else f" queue {queue}")
        return out

    add("x-query-pci-msix", x_query_pci_msix, Arg("dev", "str"),
        doc="MSI-X table entries, function and vector masks, PBA, vector use, bound notifiers")
    add("x-query-vfio", x_query_vfio, Arg("dev", "str"),
        doc="a passthrough device: IRQ indexes, vector wiring, SET_IRQS counts, the MSI-X path, the host pool")
    add("x-query-device-notifiers", x_query_device_notifiers, Arg("dev", "str"),
        doc="every notifier of a device, counters read without consuming")
    add("x-debug-device-notifier-write", x_debug_device_notifier_write, Arg("dev", "str"), Arg("id", "int", min=0,
        max=2**31), doc="write one notifier (EventNotifier level)")
    add("x-debug-device-event", x_debug_device_event, Arg("dev", "str"), Arg("event", "str", enum=("kick", "call")),
        Arg("queue", "int", **U16), Arg("force", "bool", optional=True),
        doc="kick or call a queue on purpose (a masked vector gets its PBA bit unless force)")
    add("x-debug-fault", x_debug_fault, Arg("dev", "str"), Arg("queue", "int", optional=True, **U16),
        Arg("path", "str", optional=True, enum=("kick", "call", "complete")),
        Arg("action", "str", optional=True, enum=tuple(a.value for a in FaultAction)),
        Arg("fault", "str", optional=True),
        doc="list the device's faults, or switch one (lose kicks, calls or completions; turn a fix off)")

    # -- PCIe AER (QEMU's pcie_aer_inject_error, as a QMP command of the same arguments) --------------------
    def x_pcie_aer_inject_error(id: str, error_status: str, advisory_non_fatal: bool | None = None,
                                correctable: bool | None = None, header0: int | None = None,
                                header1: int | None = None, header2: int | None = None, header3: int | None = None,
                                prefix0: int | None = None, prefix1: int | None = None, prefix2: int | None = None,
                                prefix3: int | None = None) -> dict:
        view = target.aer_device(c.qdev_id(id))
        try:
            status, is_cor = parse_error_status(error_status)
        except AerParseError as e:
            raise QMPError(str(e)) from None
        if error_status in AER_ERROR_NAMES:
            if correctable is not None:
                raise QMPError("-c is only valid with numeric error status")
        else:
            is_cor = bool(correctable)
        flags = AerErrFlag(0)
        if is_cor:
            flags |= AerErrFlag.IS_CORRECTABLE
        if advisory_non_fatal:
            flags |= AerErrFlag.MAYBE_ADVISORY
        hdr = (header0, header1, header2, header3)
        pfx = (prefix0, prefix1, prefix2, prefix3)
        if header0 is not None:
            flags |= AerErrFlag.HEADER_VALID
        if prefix0 is not None:
            flags |= AerErrFlag.TLP_PREFIX_PRESENT
        err = PCIEAERErr(status, flags, header=tuple(v or 0 for v in hdr),  # type: ignore[arg-type]  # 4-tuple
                         prefix=tuple(v or 0 for v in pfx))  # type: ignore[arg-type]  # 4-tuple
        out = view.aer_inject(err)
        rc = int(out.get("rc", 0))
        if rc < 0:
            raise QMPError(f"failed to inject error: {os.strerror(-rc)}")
        log.warning("monitor: AER error %s injected into %s", error_status, id)
        return {"id": view.id, **{k: v for k, v in out.items() if k != "rc"}}

    def x_query_pci_aer(dev: str) -> dict:
        return target.aer_device(c.qdev_id(dev)).aer_status()

    add("x-pcie-aer-inject-error", x_pcie_aer_inject_error, Arg("id", "str"), Arg("error_status", "str"),
        Arg("advisory_non_fatal", "bool", optional=True), Arg("correctable", "bool", optional=True),
        *(Arg(f"header{i}", "int", optional=True, min=0, max=0xFFFFFFFF) for i in range(4)),
        *(Arg(f"prefix{i}", "int", optional=True, min=0, max=0xFFFFFFFF) for i in range(4)),
        doc="inject a PCIe AER error (HMP pcie_aer_inject_error's arguments)")
    add("x-query-pci-aer", x_query_pci_aer, Arg("dev", "str"),
        doc="a function's AER registers, last header log, recovery state and history, ERR eventfd counter")

    # -- trace events ----------------------------------------------------------------------------------
    def _trace_list(pattern: str | None) -> list:
        import fnmatch

        return [{"name": e.name, "state": "enabled" if e.enabled else "disabled", "vcpu": False}
                for e in trace.events() if pattern is None or fnmatch.fnmatchcase(e.name, pattern)]

    def _check_events(name: str) -> None:
        # QEMU's check_events: a name without '*' must exist; a pattern may match nothing
        if "*" not in name and not _trace_list(name):
            raise QMPError(f'unknown event "{name}"')

    def trace_event_list(name: str | None = None) -> list:
        return _trace_list(name)

    def trace_event_get_state(name: str, vcpu: int | None = None) -> list:
        _check_events(name)
        return _trace_list(name)

    def trace_event_set_state(name: str, enable: bool, ignore_unavailable: bool | None = None,
                              vcpu: int | None = None) -> None:
        _check_events(name)
        trace.set_state(name, enable)

    add("trace-event-list", trace_event_list, Arg("name", "str", optional=True), doc="trace events")
    add("trace-event-get-state", trace_event_get_state, Arg("name", "str"), Arg("vcpu", "int", optional=True))
    add("trace-event-set-state", trace_event_set_state, Arg("name", "str"), Arg("enable", "bool"),
        Arg("ignore-unavailable", "bool", optional=True), Arg("vcpu", "int", optional=True))

    # -- HMP ---------------------------------------------------------------------------------------
    def human_monitor_command(command_line: str, cpu_index: int | None = None) -> str:
        try:
            return _hmp(r, command_line)
        except QMPError as e:
            return f"Error: {e.desc}\r\n"

    add("human-monitor-command", human_monitor_command, Arg("command-line", "str"),
        Arg("cpu-index", "int", optional=True), doc="run an HMP command; returns its text")

    for name, (fn, args) in (extra or {}).items():
        add(name, fn, *args)

    def attach(server: QMPServer) -> None:
        c.server = server

    return r, attach


# ---------------------------------------------------------------------------------------------------
# HMP: the same handlers, as text
# ---------------------------------------------------------------------------------------------------
# The info subcommands: (name, parameters, help), QEMU 7.2's words for the ones QEMU has ("path"
# here also takes a device's qdev id: ACCEPT_QDEV_ID.fix_on).  A parameter's kind is in _INFO_PARAM_KIND.
_INFO_TABLE: tuple[tuple[str, str, str], ...] = (
    ("counters", "", "show every device's kicks and calls by path, vectors and the program's other counters"),
    ("msix", "dev", "show a device's MSI-X table, masks, PBA and bound notifiers"),
    ("notifiers", "dev", "show a device's notifiers and their counters"),
    ("pci", "", "show PCI info"),
    ("pci-aer", "dev", "show a function's AER registers, recovery state and history"),
    ("pirqs", "", "show a Xen domain's pirqs, the device models' claims and the conflicts (machine)"),
    ("status", "", "show the current VM status (running|paused)"),
    ("trace-events", "[name]", "show available trace-events & their state (name: event name pattern)"),
    ("version", "", "show the version (kickcall's, printed as QEMU prints its own)"),
    ("virtio", "", "List all available virtio devices"),
    ("virtio-queue-element", "path queue [index]", "Display element of a given virtio queue"),
    ("virtio-queue-status", "path queue", "Display status of a given virtio queue"),
    ("virtio-status", "path", "Display status of a given virtio device"),
    ("virtio-vhost-queue-status", "path queue", "Display status of a given vhost queue"),
)
_INFO_PARAM_KIND = {"dev": "s", "path": "s", "name": "s", "queue": "i", "index": "i"}  # s: string, i: integer
_INFO_HELP = "show various information about the system state"  # QEMU's, for "info [subcommand]"

HMP_COMMANDS = {
    "info": _INFO_HELP,
    **{f"info {n} {p}".rstrip(): h for n, p, h in _INFO_TABLE},
    "trace-event NAME on|off": "enable or disable trace events",
    "x-debug-device-event DEV kick|call QUEUE [force]": "kick or call a queue on purpose",
    "x-debug-device-notifier-write DEV ID": "write one notifier",
    "x-debug-fault DEV QUEUE kick|call|complete drop-next|drop-all|clear":
        "lose kicks or calls, or hold completions (a back-end's), on purpose",
    "x-debug-fault DEV": "list the device's faults and their state",
    "pcie_aer_inject_error [-a] [-c] id <error_status> [<tlp header> [<tlp header prefix>]]":
        "inject pcie aer error (-a advisory non fatal, -c correctable; error string or 32bit; header/prefix 32bit x 4)",
    "x-debug-fault DEV FAULT on|off|drop-next|drop-all|clear [QUEUE]": "switch a registered fault",
    "stop": "pause (or s)", "cont": "resume (or c)", "system_reset": "reset",
    "quit": "the machine or back-end exits (or q)",
    "help": "this list (help info: the info subcommands; help CMD: one command)",
}


def _help_line(key: str, text: str) -> str:
    """One line of HMP ``help`` as QEMU prints it: ``name params -- text`` (two spaces when the
    command takes no parameters: ``info pci  -- show PCI info``)."""
    words = key.split(" ")
    if key == "info":
        return f"info [subcommand] -- {text}"
    n = 2 if words[0] == "info" else 1
    return f"{' '.join(words[:n])} {' '.join(words[n:])} -- {text}"


def _help(topic: list[str]) -> str:
    """``help``, ``help info``, ``help info SUB``, ``help CMD`` (QEMU's help_cmd)."""
    if not topic:
        keys = list(HMP_COMMANDS)
    elif topic == ["info"] and HMP_INFO_HELP.fix_on:
        keys = [k for k in HMP_COMMANDS if k.startswith("info ")]
    else:
        want = " ".join(topic)
        keys = [k for k in HMP_COMMANDS if k == want or k.startswith(want + " ")]
        if topic[0] != "info":
            keys = [k for k in keys if not k.startswith("info ")]
        if not keys:
            return f"unknown command: '{want}'\r\n"
    return "".join(_help_line(k, HMP_COMMANDS[k]) + "\r\n" for k in keys)


def _info_usage(sub: str, rest: list[str]) -> str | None:
    """QEMU's parser texts for an info subcommand's arguments (missing, extraneous, not a number),
    or None when they fit its parameters."""
    params = next((p for n, p, _ in _INFO_TABLE if n == sub), None)
    if params is None:
        return None
    spec = [(x.strip("[]"), x.startswith("[")) for x in params.split()]
    err = None
    if len(rest) > len(spec):
        err = f"{sub}: extraneous characters at the end of line"
    for i, (name, optional) in enumerate(spec):
        if err is not None:
            break
        kind = _INFO_PARAM_KIND.get(name, "s")
        if i >= len(rest):
            if not optional:
                err = f"{sub}: string expected" if kind == "s" else "unexpected end of expression"
            break
        if kind == "i":
            try:
                int(rest[i], 0)
            except ValueError:
                bad = next((ch for ch in rest[i] if not ch.isdigit() and ch not in "+-"), rest[i][:1])
                err = f"invalid char '{bad}' in expression"
    if err is None:
        return None
    return f'{err}\r\nTry "help info {sub}" for more information\r\n'


def _val(v: object) -> str:
    """A QMP value as HMP text: true/false, "-" for none, lists as words, never a Python repr."""
    if not HMP_PLAIN_TEXT.fix_on:
        return str(v)
    if isinstance(v, bool):
        return "true" if v else "false"
    if v is None:
        return "-"
    if isinstance(v, dict):
        return " ".join(f"{k}={_val(x)}" for k, x in v.items()) or "-"
    if isinstance(v, (list, tuple)):
        return ", ".join(_val(x) for x in v) or "-"
    return str(v)


def _format_faults(faults: list[dict]) -> str:
    """HMP's listing of a device's faults: one line each, then its per-queue state."""
    lines = []
    for f in faults:
        st = f.get("state", {})
        if "fix" in st:
            now = f"fix {st['fix']}"
        else:
            qs = st.get("queues", [])
            now = ", ".join(f"q{q['queue']}: next {q.get('drop-next', 0)}{' all' if q.get('drop-all') else ''}"
                            f" dropped {q.get('dropped', 0)}" for q in qs) or "not armed"
        lines.append(f"{f['name']} ({f['kind']}): {now}\r\n    {f['effect']}")
    return "".join(x + "\r\n" for x in lines) or "no faults\r\n"


_HMP_ALIASES = {"s": "stop", "c": "cont", "q": "quit"}  # QEMU's HMP short names


def _call(r: CommandRegistry, command: str, /, **args):
    cmd = r.commands[command]  # (positional-only: trace-event-* have an argument called "name")
    return cmd.handler(**r.check_args(cmd, args))


def _int(s: str, what: str) -> int:
    try:
        return int(s, 0)
    except ValueError:
        raise QMPError(f"{what}: '{s}' is not a number") from None


def _fmt_kv(d: dict, indent: str = "  ") -> str:
    lines = []
    for k, v in d.items():
        if isinstance(v, dict) and (v or not HMP_PLAIN_TEXT.fix_on):
            lines.append(f"{indent}{k}:")
            lines.append(_fmt_kv(v, indent + "  "))
        elif isinstance(v, list) and v and isinstance(v[0], dict):
            lines.append(f"{indent}{k}:")
            for x in v:
                lines.append(f"{indent}  - " + ", ".join(f"{a}={_val(b)}" for a, b in x.items()))
        elif HMP_PLAIN_TEXT.fix_on and isinstance(v, list) and len(v) > 1 and all(isinstance(x, str) for x in v):
            lines.append(f"{indent}{k}:")  # (QEMU prints feature and status names one a line)
            lines.extend(f"{indent}  {x}" for x in v)
        else:
            lines.append(f"{indent}{k}: {_val(v)}")
    return "\n".join(lines)


def _fault_text(res: dict, action: str) -> str:
    """What x-debug-fault did, as HMP text: armed/cleared, and the counts the owner reported."""
    if not HMP_PLAIN_TEXT.fix_on:
        return str(res)
    state = {"drop-next": "armed", "drop-all": "armed for every event", "clear": "cleared"}.get(action, action)
    counts = [f"{k.replace('-', ' ')} {_val(res[k])}" for k in ("dropped-so-far", "completed", "discarded", "held")
              if k in res]
    return state + (f" ({', '.join(counts)})" if counts else "")


# -- QEMU 7.2's HMP layouts ----------------------------------------------------------------------------
# The info commands QEMU has print QEMU 7.2's text (labels, alignment, number formats) from the same
# QMP reply QEMU's hmp_* functions print from; what kickcall adds comes after QEMU's lines, under a
# "kickcall:" heading (queue and element fields) or after the device's `id` line (info pci: MSI-X),
# so that a reader of QEMU's text finds every line where QEMU puts it.  HMP_PLAIN_TEXT off: the old
# key: value dumps.
_U64 = (1 << 64) - 1


def _crlf(text: str) -> str:
    return text.replace("\n", "\r\n")


def _pci_device_text(dv: dict) -> str:
    """One device of ``info pci`` (QEMU's hmp_info_pci_device, 7.2): the bus/device/function line,
    the class and ids, the subsystem, IRQ and pin letter, the BARs (an unassigned BAR's address is
    QEMU's PCI_BAR_UNMAPPED, -1, printed as 7.2 prints it), the qdev id."""
    qemu = HMP_PLAIN_TEXT.fix_on
    cls = dv.get("class_info", {})
    ident = dv.get("id", {})
    desc = cls.get("desc") or f"Class {cls.get('class', 0):04d}"  # (QEMU: "Class %04" PRId64, decimal)
    out = (f"  Bus {dv.get('bus', 0):2d}, device {dv.get('slot', 0):3d}, function {dv.get('function', 0)}:\n"
           f"    {desc}: PCI device {ident.get('vendor', 0):04x}:{ident.get('device', 0):04x}\n")
    if qemu and "subsystem" in ident and "subsystem-vendor" in ident:
        out += f"      PCI subsystem {ident['subsystem-vendor']:04x}:{ident['subsystem']:04x}\n"
    if "irq" in dv:
        pin = int(dv.get("irq_pin", 0))
        out += (f"      IRQ {dv['irq']}, pin {chr(ord('A') + pin - 1)}\n" if qemu and pin
                else f"      IRQ {dv['irq']}, pin {pin}.\n")
    for reg in dv.get("regions", []):
        addr = int(reg["address"]) & _U64
        last = (addr + int(reg["size"]) - 1) & _U64
        if reg["type"] == "io":
            out += f"      BAR{reg['bar']}: I/O at 0x{addr:04x} [0x{last:04x}].\n"
        else:
            kind = f"{64 if reg.get('mem_type_64') else 32} bit{' prefetchable' if reg.get('prefetch') else ''}"
            out += f"      BAR{reg['bar']}: {kind} memory at 0x{addr:08x} [0x{last:08x}].\n"
    return out + f"      id \"{dv.get('qdev_id', '')}\"\n"


def _tab_list(items: list) -> str:
    """QEMU's hmp_virtio_dump_*: one tab-indented line per name, a comma after all but the last."""
    return ",\n".join(f"\t{x}" for x in items) + "\n"


def _features_text(f: dict) -> str:
    out = _tab_list(f.get("transports", []))
    if f.get("dev-features"):
        out += _tab_list(f["dev-features"])
    if "unknown-dev-features" in f:
        out += f"  unknown-features(0x{f['unknown-dev-features']:016x})\n"
    return out


def _extras(d: dict, shown: set[str]) -> str:
    """The reply's fields QEMU does not print, under a ``kickcall:`` heading (nothing if none)."""
    rest = {k: v for k, v in d.items() if k not in shown}
    return f"  kickcall:\n{_fmt_kv(rest, '    ')}\n" if rest else ""


def _tf(v: object) -> str:
    return "true" if v else "false"


_VIRTIO_STATUS_ROWS = (  # (QEMU's label, the VirtioStatus member), in hmp_virtio_status's order
    ("device_id", "device-id"), ("vhost_started", "vhost-started"), ("bus_name", "bus-name"),
    ("broken", "broken"), ("disabled", "disabled"), ("disable_legacy_check", "disable-legacy-check"),
    ("started", "started"), ("use_started", "use-started"), ("start_on_kick", "start-on-kick"),
    ("use_guest_notifier_mask", "use-guest-notifier-mask"), ("vm_running", "vm-running"), ("num_vqs", "num-vqs"),
    ("queue_sel", "queue-sel"), ("isr", "isr"), ("endianness", "device-endian"))


def _virtio_status_text(path: str, s: dict) -> str:
    """``info virtio-status PATH`` as QEMU 7.2's hmp_virtio_status prints it (no ``VHost:`` block:
    kickcall's reply has no ``vhost-dev``, so no "(vhost)" after the name either)."""
    out = f"{path}:\n  {'device_name:':<25}{s.get('name', '')} {'(vhost)' if s.get('vhost-dev') else ''}\n"
    for label, key in _VIRTIO_STATUS_ROWS:
        v = s.get(key)
        text = _tf(v) if isinstance(v, bool) else "(null)" if v is None else str(v)
        out += f"  {label + ':':<25}{text}\n"
    st = s.get("status", {})
    out += "  status:\n" + _tab_list(st.get("statuses", []))
    if "unknown-statuses" in st:
        out += f"  unknown-statuses(0x{st['unknown-statuses']:016x})\n"
    for label, key in (("Guest features", "guest-features"), ("Host features", "host-features"),
                       ("Backend features", "backend-features")):
        out += f"  {label}:\n" + _features_text(s.get(key, {}))
    shown = {k for _, k in _VIRTIO_STATUS_ROWS} | {"name", "status", "guest-features", "host-features",
                                                   "backend-features", "vhost-dev"}
    return out + _extras(s, shown)


def _queue_status_text(path: str, s: dict) -> str:
    """``info virtio-queue-status PATH QUEUE`` as QEMU 7.2's hmp_virtio_queue_status prints it
    (last_avail_idx and shadow_avail_idx only when the reply has them: a vhost queue's back-end
    owns them), then kickcall's ring fields and counters under ``kickcall:``."""
    def row(label: str, v: object) -> str:
        return f"  {label + ':':<22}{_tf(v) if isinstance(v, bool) else _val(v)}\n"

    out = f"{path}:\n" + row("device_name", s.get("name", "")) + row("queue_index", s.get("queue-index"))
    out += row("inuse", s.get("inuse")) + row("used_idx", s.get("used-idx"))
    out += row("signalled_used", s.get("signalled-used")) + row("signalled_used_valid", s.get("signalled-used-valid"))
    for label, key in (("last_avail_idx", "last-avail-idx"), ("shadow_avail_idx", "shadow-avail-idx")):
        if key in s:
            out += row(label, s[key])
    out += "  VRing:\n"
    for label, key in (("num", "vring-num"), ("num_default", "vring-num-default"), ("align", "vring-align")):
        out += f"    {label + ':':<14}{_val(s.get(key))}\n"
    for label, key in (("desc", "vring-desc"), ("avail", "vring-avail"), ("used", "vring-used")):
        out += f"    {label + ':':<14}0x{int(s.get(key) or 0):016x}\n"
    shown = {"name", "queue-index", "inuse", "used-idx", "signalled-used", "signalled-used-valid", "last-avail-idx",
             "shadow-avail-idx", "vring-num", "vring-num-default", "vring-align", "vring-desc", "vring-avail",
             "vring-used"}
    return out + _extras(s, shown)


def _vhost_queue_status_text(path: str, s: dict) -> str:
    """``info virtio-vhost-queue-status PATH QUEUE`` as QEMU 7.2's hmp_vhost_queue_status prints it."""
    out = f"{path}:\n  {'device_name:':<22}{s.get('name', '')} (vhost)\n"
    out += f"  {'kick:':<22}{s.get('kick')}\n  {'call:':<22}{s.get('call')}\n  VRing:\n"
    out += f"    {'num:':<13}{s.get('num')}\n"
    for ring in ("desc", "avail", "used"):
        out += (f"    {ring + ':':<13}0x{int(s.get(ring) or 0):016x}\n"
                f"    {ring + '_phys:':<13}0x{int(s.get(ring + '-phys') or 0):016x}\n"
                f"    {ring + '_size:':<13}{s.get(ring + '-size')}\n")
    shown = {"name", "kick", "call", "num"} | {f"{r}{x}" for r in ("desc", "avail", "used")
                                               for x in ("", "-phys", "-size")}
    return out + _extras(s, shown)


def _queue_element_text(path: str, e: dict) -> str:
    """``info virtio-queue-element PATH QUEUE [INDEX]`` as QEMU 7.2's hmp_virtio_queue_element prints
    it; the descriptors in chain order (QEMU 7.2's reply lists them last first), then kickcall's
    ``error`` (a chain the device would refuse) under ``kickcall:``."""
    out = f"{path}:\n  device_name: {e.get('name', '')}\n  index:   {e.get('index')}\n  desc:\n    descs:\n"
    descs = []
    for d in e.get("descs", []):
        flags = d.get("flags") or []
        descs.append(f"        addr 0x{int(d.get('addr', 0)):x} len {d.get('len')}"
                     + (f" ({', '.join(flags)})" if flags else ""))
    out += ",\n".join(descs) + "\n"
    av, used = e.get("avail", {}), e.get("used", {})
    out += (f"  avail:\n    flags: {av.get('flags')}\n    idx:   {av.get('idx')}\n    ring:  {av.get('ring')}\n"
            f"  used:\n    flags: {used.get('flags')}\n    idx:   {used.get('idx')}\n")
    return out + _extras(e, {"name", "index", "descs", "avail", "used"})


def _hmp(r: CommandRegistry, line: str) -> str:  # noqa: C901 - one dispatch table
    try:
        argv = shlex.split(line)
    except ValueError as e:
        raise QMPError(f"cannot parse '{line}': {e}") from None
    if not argv:
        return ""
    w = argv[0]
    a = argv[1:]
    out = ""
    if w == "help" or w == "?":
        return _help(a)
    if w == "info" and not a and HMP_INFO_HELP.fix_on:
        return _help(["info"])  # QEMU: `info` alone prints the info subcommands
    if w == "info" and a:
        sub = a[0]
        rest = a[1:]
        if HMP_INFO_HELP.fix_on:
            usage = _info_usage(sub, rest)
            if usage is not None:
                return usage
            if sub == "version" and "query-version" in r.commands:
                v = _call(r, "query-version")  # QEMU's hmp_info_version: "%d.%d.%d%s", package
                q = v.get("qemu", {})
                return f"{q.get('major', 0)}.{q.get('minor', 0)}.{q.get('micro', 0)}{v.get('package', '')}\r\n"
        if sub == "pci":
            for bus in _call(r, "query-pci"):
                for dv in bus["devices"]:
                    out += _pci_device_text(dv)
                    try:
                        m = _call(r, "x-query-pci-msix", dev=dv["qdev_id"])
                    except QMPError:
                        continue
                    out += _msix_text(m, "      ")  # kickcall: after QEMU's lines, the MSI-X table (info msix DEV)
            return out.replace("\n", "\r\n")
        if sub == "virtio":
            for d in _call(r, "x-query-virtio"):
                out += f"{d['path']} [{d['name']}]\n"
            if not out and HMP_PLAIN_TEXT.fix_on:
                out = "No VirtIO devices\n"  # QEMU's hmp_virtio_query
            return out.replace("\n", "\r\n")
        if sub == "status":
            st = _call(r, "query-status")
            return f"VM status: {st['status']}\r\n"
        if sub in ("virtio-status",) and len(rest) == 1:
            d = _call(r, "x-query-virtio-status", path=rest[0])
            return _crlf(_virtio_status_text(rest[0], d) if HMP_PLAIN_TEXT.fix_on else _fmt_kv(d) + "\n")
        if sub in ("virtio-queue-status", "virtio-vhost-queue-status") and len(rest) == 2:
            d = _call(r, f"x-query-{sub}", path=rest[0], queue=_int(rest[1], "queue"))
            if not HMP_PLAIN_TEXT.fix_on:
                return _crlf(_fmt_kv(d) + "\n")
            if sub == "virtio-queue-status":
                return _crlf(_queue_status_text(rest[0], d))
            return _crlf(_vhost_queue_status_text(rest[0], d))
        if sub == "virtio-queue-element" and len(rest) in (2, 3):
            kw = {"path": rest[0], "queue": _int(rest[1], "queue")}
            if len(rest) == 3:
                kw["index"] = _int(rest[2], "index")
            d = _call(r, "x-query-virtio-queue-element", **kw)
            return _crlf(_queue_element_text(rest[0], d) if HMP_PLAIN_TEXT.fix_on else _fmt_kv(d) + "\n")
        if sub == "notifiers" and len(rest) == 1:
            rows = _call(r, "x-query-device-notifiers", dev=rest[0])
            out = (f"{'id':>4} {'role':<7} {'queue':>5} {'vector':>6} {'fd':>4} {'pending':>8} {'fd-writes':>10} "
                   f"{'lifetime':>10}  name\n")
            scopes = set()
            for n in rows:
                cell = {k: _val(n.get(k)) if HMP_PLAIN_TEXT.fix_on else n.get(k, "-")
                        for k in ("queue", "vector", "pending", "fd-writes", "lifetime")}
                scopes.add(n.get("scope"))
                out += (f"{n['id']:>4} {n['role']:<7} {cell['queue']:>5} {cell['vector']:>6} "
                        f"{n['fd']:>4} {cell['pending']:>8} {cell['fd-writes']:>10} {cell['lifetime']:>10}  {n['name']}"
                        f"{('  (' + n['note'] + ')') if n.get('note') else ''}\n")
            # what each count covers, said once
            fdw = ("this connection's fd (a front-end hands new fds on every connection)" if "connection" in scopes
                   else "this notifier since it was created")
            out += (f"fd-writes: writes to {fdw}; lifetime: the queue's kicks (host) or calls (guest), every "
                    f"path, since the {'back-end' if 'connection' in scopes else 'device'} started\n")
            return out.replace("\n", "\r\n")
        if sub == "msix" and len(rest) == 1:
            return _msix_text(_call(r, "x-query-pci-msix", dev=rest[0]), "").replace("\n", "\r\n")
        if sub == "pci-aer" and len(rest) == 1:
            return _fmt_kv(_call(r, "x-query-pci-aer", dev=rest[0])).replace("\n", "\r\n") + "\r\n"
        if sub == "trace-events":
            rows = _call(r, "trace-event-list", **({"name": rest[0]} if rest else {}))
            return "".join(f"{x['name']} : state {1 if x['state'] == 'enabled' else 0}\r\n" for x in rows)
        return f"unknown command: 'info {' '.join(a)}'\r\n"  # QEMU's HMP text
    if w == "pcie_aer_inject_error":
        return _hmp_aer_inject(r, a)
    if w == "trace-event" and len(a) == 2 and a[1] in ("on", "off"):
        _call(r, "trace-event-set-state", name=a[0], enable=a[1] == "on")
        return ""
    if w == "x-debug-device-event" and len(a) in (3, 4):
        if len(a) == 4 and a[3] != "force":
            raise QMPError("the fourth argument can only be 'force'")
        res = _call(r, "x-debug-device-event", dev=a[0], event=a[1], queue=_int(a[2], "queue"), force=len(a) == 4)
        return f"{a[1]} injected on queue {a[2]} of {a[0]} through {res['path']}" + \
            (" (forced past the mask)" if res.get("forced") else "") + "\r\n"
    if w == "x-debug-device-notifier-write" and len(a) == 2:
        res = _call(r, "x-debug-device-notifier-write", dev=a[0], id=_int(a[1], "id"))
        return f"notifier {a[1]} ({res.get('role', '?')}) written\r\n"
    if w == "x-debug-fault" and len(a) == 4 and a[2] in ("kick", "call", "complete"):
        res = _call(r, "x-debug-fault", dev=a[0], queue=_int(a[1], "queue"), path=a[2], action=a[3])
        return f"fault {a[3]} on the {a[2]} path of queue {a[1]}: {_fault_text(res, a[3])}\r\n"
    if w == "x-debug-fault" and len(a) == 1:
        res = _call(r, "x-debug-fault", dev=a[0])
        return _format_faults(res["faults"])
    if w == "x-debug-fault" and len(a) in (3, 4):
        qa = {"queue": _int(a[3], "queue")} if len(a) == 4 else {}
        res = _call(r, "x-debug-fault", dev=a[0], fault=a[1], action=a[2], **qa)
        if "fix" in res:
            return f"fault {a[1]}: fix {res['fix']}\r\n"
        where = f" on queue {res.get('queue', a[3] if len(a) == 4 else '-')}"
        return f"fault {a[1]} {a[2]}{where}: {_fault_text(res, a[2])}\r\n"
    w = _HMP_ALIASES.get(w, w)
    if w in ("stop", "cont", "system_reset", "quit") and not a:
        _call(r, w)
        return ""
    return f"unknown command: '{line.strip()}'\r\n"


def _hmp_aer_inject(r: CommandRegistry, a: list[str]) -> str:
    """``pcie_aer_inject_error [-a] [-c] id <error_status> [h0 h1 h2 h3 [p0 p1 p2 p3]]``."""
    kw: dict = {}
    while a and a[0].startswith("-") and len(a[0]) > 1 and not a[0][1:].isdigit():
        for ch in a[0][1:]:
            if ch == "a":
                kw["advisory_non_fatal"] = True
            elif ch == "c":
                kw["correctable"] = True
            else:
                raise QMPError(f"invalid option '-{ch}'")
        a = a[1:]
    if len(a) < 2:
        raise QMPError("Parameter 'id' is missing" if not a else "Parameter 'error_status' is missing")
    rest = a[2:]
    if len(rest) > 8:
        raise QMPError("too many arguments")
    for i, v in enumerate(rest):
        try:
            n = int(v, 0)
        except ValueError:
            raise QMPError(f"invalid number '{v}'") from None
        if not 0 <= n <= 0xFFFFFFFF:
            raise QMPError("integer is for 32-bit values")
        kw[f"header{i}" if i < 4 else f"prefix{i - 4}"] = n
    res = _call(r, "x-pcie-aer-inject-error", id=a[0], error_status=a[1], **kw)
    return (f"OK id: {a[0]} root bus: {res.get('root-bus', 'pcie.0')}, bus: {res.get('bus', 0):x} "
            f"devfn: {res.get('devfn', 0) >> 3:x}.{res.get('devfn', 0) & 7:x}\r\n")


def _msix_text(m: dict, ind: str) -> str:
    out = (f"{ind}MSI-X: {'enabled' if m['enabled'] else 'disabled'}, function "
           f"{'masked' if m['function-masked'] else 'unmasked'}, {m['table-size']} vectors\n")
    for e in m["entries"]:
        if not e["use-count"] and not e["pending"] and not e["address"]:
            continue
        bound = ", ".join(f"{b['role']}:q{b['queue']}{'(irqfd)' if b.get('irqfd') else ''}"
                          for b in e.get("notifiers", []))
        out += (f"{ind}  vector {e['vector']:3d}: addr 0x{e['address']:x} data 0x{e['data']:x} "
                f"{'MASKED' if e['masked'] else 'unmasked'} {'PENDING' if e['pending'] else ''} "
                f"use {e['use-count']} sent {e['sent']} pended {e['pended']}"
                f"{(' [' + bound + ']') if bound else ''}\n")
    return out


def add_hmp_info(reg: CommandRegistry, sub: str, command: str, fmt: Callable[[Any], str]) -> None:
    """HMP ``info SUB`` (no arguments) answered by formatting QMP *command*'s reply with *fmt*, on
    top of the generic HMP (``human-monitor-command``); every other line goes on to it.  Nothing
    happens when the registry has no such QMP command."""
    cmd = reg.commands.get("human-monitor-command")
    query = reg.commands.get(command)
    if cmd is None or query is None:
        return
    inner = cmd.handler
    handler = query.handler

    def human_monitor_command(**kw: object) -> str:
        if str(kw.get("command_line", "")).split() == ["info", sub]:
            try:
                return fmt(handler()).replace("\n", "\r\n")
            except QMPError as e:
                return f"Error: {e.desc}\r\n"
        return inner(**kw)

    reg.add(cmd.name, human_monitor_command, cmd.args, cmd.doc, cmd.unstable)
