"""The host kernel's PCIe error recovery, in the vfio-user server: Linux's AER service driver and
``pcie_do_recovery``, over a card of kickcall-nic functions below one root port.

Topology (``HostCard``, built by ``build_card``): the host's root bus 0 holds a PCIe Root Port
(``kickcall.pci.bridge.PCIERootPort``) at 0000:00:1c.0 whose secondary bus 1 holds the card's
functions 0000:01:00.0 .. 01:00.(N-1) (function 0's header type has the multi-function bit when
N > 1), each a ``NicFunction`` with the AER capability at 0x100, bound to vfio-pci
(``VfioPciDevice``).  The host "firmware" enables error reporting as Linux does: Device Control
CERE|NFERE|FERE|URRE on every function and on the port, SERR forwarding in the port's Bridge
Control, and all three enables of the port's Root Error Command.  The port's AER interrupt (INTx:
the host has no guest) wakes the AER service's thread.

The AER service (``HostAerService``, thread ``kc-aer``), as ``aer_isr`` / ``aer_isr_one_error``:

1. read the port's Root Error Status and Error Source Identification, clear the status (RW1C);
2. find the source function: the requester id the port recorded (and, with a MULTI bit, every
   function below the port whose AER status is set: ``find_source_device``);
3. read its AER status and severity; correctable: log it and clear it;
4. uncorrectable: ``pcie_do_recovery(bridge = the root port, state = io_frozen if fatal else
   io_normal)`` in Linux's current order (``kickcall.pci.recovery``'s docstring):
   ``error_detected`` to the driver of every function below the port (vfio-pci: signals ERR,
   votes CAN_RECOVER, latches the AER registers into the user's view), votes merged with
   ``merge_result``; frozen -> ``reset_subordinates``: a secondary bus reset of the port;
   CAN_RECOVER -> ``mmio_enabled``; NEED_RESET -> ``slot_reset``; not RECOVERED -> failed (every
   driver gets ``io_perm_failure``: the functions are failed); else ``resume`` to every driver and
   the AER status is cleared.

The link reset (``secondary_bus_reset``): every function's config is saved (``pci_save_state``)
and its user's accesses gated (``VfioPciDevice.gate_close``); the port's Bridge Control Secondary
Bus Reset is set (every function below resets through ``PCIBus.reset``) and the link is down for
``link_reset_ms``; the bit is cleared and the host waits for the devices to come back, polling
each function's vendor id (all-F's while its link is down) for at most ``link_ready_timeout_ms``
(``pci_bridge_wait_for_secondary_bus``); then every function's config and its user's interrupt
setup are restored.  A device that never comes back fails the recovery: ``io_perm_failure``.

Switches and faults (``faults``, owner ``host``; the same objects are listed on every function's
registry, so ``x-debug-fault nic0`` shows them too):

* ``aer-host-link-reset`` (on): off = Cao's 2016 RFC: the host skips the link reset for functions
  bound to vfio-pci and trusts the user to reset -- a fatal error on a function whose client
  ignores ERR leaves it frozen;
* ``link-never-returns`` (injected, ``on``/``off``): the link does not come back after a secondary
  bus reset.

Every step is a trace event (``pcie_recovery_step``: port, function, step, result) and an entry
in the recovery's record; the last ``HISTORY`` recoveries are kept with their times, the result
codes (Linux's numbers), and per function the queues' PRODUCER at ``error_detected`` (what the
function had completed before the error: its records stay in memory).

Hot reset (kickcall's vfio-user extension, docs/vfio-user-hot-reset.md): ``HotResetDomain`` holds
the card's endpoints (``HotResetEndpoint``, one per function's ``VfioUserServer``) and checks
vfio-pci's ownership rule before it asks the service for a secondary bus reset.

Locking: ``port_mu`` guards the port's registers (and is held around an injection, whose message
lands in them); ``reset_mu`` (an RLock) serializes whole recoveries and bus resets.  Order:
``reset_mu`` -> ``port_mu`` -> a function's lock; a function's gate lock is a leaf.  A user
access waits at the gate holding no lock.
"""

from __future__ import annotations

import errno
import hmac
import logging
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable

from .. import trace
from ..faults import Fault, FaultAction, FaultKind, FaultRegistry
from ..memory import AddressSpace
from ..pci import regs as R
from ..pci.aer import (PCI_ERR_COR_STATUS, PCI_ERR_ROOT_COMMAND, PCI_ERR_ROOT_CMD_COR_EN,
                       PCI_ERR_ROOT_CMD_FATAL_EN, PCI_ERR_ROOT_CMD_NONFATAL_EN, PCI_ERR_ROOT_COR_RCV,
                       PCI_ERR_ROOT_ERR_SRC, PCI_ERR_ROOT_FATAL_RCV, PCI_ERR_ROOT_MULTI_COR_RCV,
                       PCI_ERR_ROOT_MULTI_UNCOR_RCV, PCI_ERR_ROOT_STATUS, PCI_ERR_ROOT_UNCOR_RCV,
                       PCI_ERR_UNCOR_MASK, PCI_EXP_DEVCTL_CERE, PCI_EXP_DEVCTL_FERE, PCI_EXP_DEVCTL_NFERE,
                       PCI_EXP_DEVCTL_URRE, AerMessage, decode_status)
from ..pci.bridge import PCIERootPort
from ..pci.bus import PCIBus
from ..pci.device import PCIDevice
from ..pci.recovery import PciChannelState, PciErsResult, RecoveryStep, merge_result
from ..threads import start_thread
from .host import HostIrqPool, RecoveryState, VfioError, VfioPciDevice, VfioReason
from .nic import NicFunction
from .protocol import PciAddress

__all__ = ["HostCard", "build_card", "HostAerService", "HotResetDomain", "HotResetEndpoint",
           "LinkNeverReturns", "SWITCH_HOST_LINK_RESET", "FAULT_LINK_NEVER_RETURNS", "ROOT_PORT_DEVFN",
           "DEFAULT_LINK_RESET_MS", "DEFAULT_LINK_READY_TIMEOUT_MS", "MAX_FUNCTIONS"]

log = logging.getLogger("kickcall.vfio.host_aer")

_t_step = trace.event("pcie_recovery_step", "a step of the host's PCIe error recovery (pcie_do_recovery)")
_t_cor = trace.event("pcie_aer_correctable", "the host's AER service logged and cleared a correctable error")
_t_hot = trace.event("vfio_pci_hot_reset", "a client's hot reset: a secondary bus reset of the card's port")

SWITCH_HOST_LINK_RESET = "aer-host-link-reset"
FAULT_LINK_NEVER_RETURNS = "link-never-returns"
ROOT_PORT_DEVFN = 0xE0  # 00:1c.0
ROOT_PORT_ID = "rp0"
DEFAULT_LINK_RESET_MS = 100
DEFAULT_LINK_READY_TIMEOUT_MS = 2000
MAX_FUNCTIONS = 8
#: recoveries kept in the history
HISTORY = 32
#: the vendor id poll while waiting for the link (pci_dev_wait polls too)
_POLL_S = 0.005


class LinkNeverReturns(Fault):
    """``link-never-returns``: after a secondary bus reset the link stays down (the devices never
    answer their vendor id again).  Actions ``on`` and ``off``."""

    kind = FaultKind.INJECTED
    actions = (FaultAction.FIX_ON, FaultAction.FIX_OFF)  # values "on" / "off": the fault, not a fix

    def __init__(self) -> None:
        super().__init__(FAULT_LINK_NEVER_RETURNS, "on: after a secondary bus reset of the card's port the link "
                         "never comes back (its functions read all-F's; the recovery fails, they are failed)")
        self.on = False
        self.fired = 0

    def arm(self, action: FaultAction, queue: int | None = None) -> dict:
        self._check(action)
        self.on = action is FaultAction.FIX_ON
        return {"fault": self.name, "action": action.value, "on": self.on}

    def state(self) -> dict:
        return {"on": self.on, "fired": self.fired}


@dataclass
class HostCard:
    """The host's PCIe topology: root bus 0, the root port, the card's functions on bus 1."""

    root: PCIBus
    port: PCIERootPort
    functions: list[VfioPciDevice]

    @property
    def port_address(self) -> PciAddress:
        return PciAddress(0, 0, self.port.devfn)

    def address(self, i: int) -> PciAddress:
        nic = self.functions[i].nic
        bus = nic.bus.number if nic.bus is not None else 0
        return PciAddress(0, bus, nic.devfn)


def _enable_reporting(dev: PCIDevice) -> None:
    """What Linux does at enumeration (``pci_aer_init``/``pcie_aer_enable``): Device Control's
    four reporting enables."""
    if dev.exp_cap:
        off = dev.exp_cap + R.PCI_EXP_DEVCTL
        dev.config_write(off, dev.get16(off) | PCI_EXP_DEVCTL_CERE | PCI_EXP_DEVCTL_NFERE | PCI_EXP_DEVCTL_FERE
                         | PCI_EXP_DEVCTL_URRE, 2)


def build_card(n: int, *, queues: int = 4, vectors: int = 16, msi_vectors: int = 32, pcie: bool = True,
               pool: HostIrqPool, dynamic_msix: bool = True, start: bool = True) -> HostCard:
    """A card of *n* kickcall-nic functions below a host root port, each bound to vfio-pci
    (``nic0`` .. ``nic<n-1>``), error reporting enabled as Linux enables it."""
    if not 1 <= n <= MAX_FUNCTIONS:
        raise ValueError(f"a card has 1..{MAX_FUNCTIONS} functions")
    mem, io = AddressSpace("host-memory"), AddressSpace("host-io")
    root = PCIBus(mem, io)
    port = PCIERootPort("rp0", mem, io, secondary=1, msix=False)
    root.add_device(port, ROOT_PORT_DEVFN >> 3, ROOT_PORT_DEVFN & 7)
    port.config_write(R.PCI_BRIDGE_CONTROL, port.bridge_control | R.PCI_BRIDGE_CTL_SERR, 2)
    _enable_reporting(port)
    port.config_write(port.aer_cap.offset + PCI_ERR_ROOT_COMMAND,
                      PCI_ERR_ROOT_CMD_COR_EN | PCI_ERR_ROOT_CMD_NONFATAL_EN | PCI_ERR_ROOT_CMD_FATAL_EN, 4)
    functions: list[VfioPciDevice] = []
    for i in range(n):
        nic = NicFunction("kickcall-nic" if n == 1 else f"kickcall-nic.{i}", queues=queues, vectors=vectors,
                          msi_vectors=msi_vectors, pcie=pcie)
        if pcie:
            nic.add_aer_cap()
        if i == 0 and n > 1:
            nic.set_config(R.PCI_HEADER_TYPE, nic.config[R.PCI_HEADER_TYPE] | 0x80, 1)
        port.secondary_bus.add_device(nic, 0, i)
        _enable_reporting(nic)
        functions.append(VfioPciDevice(nic, pool, dynamic_msix=dynamic_msix, name=f"nic{i}", start=start))
    return HostCard(root, port, functions)


def _res(r: PciErsResult | None) -> str:
    return "none" if r is None else f"{r.name}({int(r)})"


class HostAerService:
    """Linux's AER service driver on the host root port, and ``pcie_do_recovery`` (see the module
    docstring).  ``start()`` runs ``kc-aer``; ``stop()`` ends it."""

    def __init__(self, card: HostCard, *, link_reset_ms: int = DEFAULT_LINK_RESET_MS,
                 link_ready_timeout_ms: int = DEFAULT_LINK_READY_TIMEOUT_MS) -> None:
        self.card = card
        self.port = card.port
        self.link_reset_ms = link_reset_ms
        self.link_ready_timeout_ms = link_ready_timeout_ms
        self.port_mu = threading.Lock()
        self.reset_mu = threading.RLock()
        self.faults = FaultRegistry("host")
        self.link_reset_switch = self.faults.switch(
            SWITCH_HOST_LINK_RESET, "off: Cao's 2016 RFC: on a fatal error the host skips the link reset of "
            "functions bound to vfio-pci and trusts the user to reset (a client that ignores ERR leaves the "
            "function frozen, all-F's, for the next client)")
        self.never_returns = LinkNeverReturns()
        self.faults.add(self.never_returns)
        for v in card.functions:  # the same switches, listed on each function's registry too
            v.faults.add(self.link_reset_switch)
            v.faults.add(self.never_returns)
            v.bus_reset_request = self.request_bus_reset
        self.state = RecoveryState.IDLE
        self.history: list[dict] = []
        self.correctable: list[dict] = []
        self.counts: dict[str, int] = {"interrupts": 0, "correctable": 0, "uncorrectable": 0, "recoveries": 0,
                                       "recovered": 0, "failed": 0, "bus-resets": 0, "hot-resets": 0}
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._mu = threading.Lock()  # history, counts, state (a leaf)
        self._seq = 0
        prev = self.port.aer_cap.notify

        def notify(msg: AerMessage) -> None:
            if prev is not None:
                prev(msg)
            self._interrupt(msg)
        self.port.aer_cap.notify = notify

    # -- life cycle ---------------------------------------------------------------------------------
    def start(self) -> "HostAerService":
        self._thread = start_thread(self._main, "kc-aer")
        return self

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        t, self._thread = self._thread, None
        if t is not None and t is not threading.current_thread():
            t.join(30)

    # -- injection (the monitor's) -------------------------------------------------------------------
    def inject(self, dev: PCIDevice, err: Any) -> int:
        """``pcie_aer_inject_error`` into *dev* (a function of the card, or the port): the
        message reaches the port at once; the recovery runs on ``kc-aer``."""
        with self.port_mu:
            if isinstance(dev, NicFunction):
                return dev.inject_error(err)
            if dev.aer is None:
                return -errno.ENOSYS
            return dev.aer.inject(err)

    def _interrupt(self, msg: AerMessage) -> None:
        """The port's AER interrupt (``aer_irq``): wake ``kc-aer`` (port_mu is held)."""
        self.count("interrupts")
        self._wake.set()

    # -- kc-aer ---------------------------------------------------------------------------------------
    def _main(self) -> None:
        while not self._stop.is_set():
            self._wake.wait()
            self._wake.clear()
            if self._stop.is_set():
                return
            try:
                while self._handle_root():
                    pass
            except Exception:  # noqa: BLE001 -- the service must outlive one bad recovery
                log.exception("host AER service: handling an error failed")

    def _handle_root(self) -> bool:
        """``aer_isr_one_error``: one read-and-clear of the port's Root Error Status; False when
        there was nothing."""
        aer = self.port.aer_cap
        with self.port_mu:
            st = aer.get(PCI_ERR_ROOT_STATUS) & 0x7F
            src = aer.get(PCI_ERR_ROOT_ERR_SRC)
            if not st:
                return False
            self.port.config_write(aer.offset + PCI_ERR_ROOT_STATUS, st, 4)  # RW1C
        if st & PCI_ERR_ROOT_COR_RCV:
            for dev in self._sources(src & 0xFFFF, bool(st & PCI_ERR_ROOT_MULTI_COR_RCV), correctable=True):
                self._handle_correctable(dev)
        if st & PCI_ERR_ROOT_UNCOR_RCV:
            fatal = bool(st & PCI_ERR_ROOT_FATAL_RCV)
            devs = self._sources(src >> 16, bool(st & PCI_ERR_ROOT_MULTI_UNCOR_RCV), correctable=False)
            self._handle_uncorrectable(devs, fatal, src >> 16)
        return True

    def _below(self) -> list[PCIDevice]:
        return self.port.secondary_bus.walk()

    def _sources(self, rid: int, multi: bool, *, correctable: bool) -> list[PCIDevice]:
        """``find_source_device``: the function with requester id *rid*; with MULTI, every
        function (and the port) whose status of that class is set."""
        out: list[PCIDevice] = []
        for d in [self.port, *self._below()]:
            if d.aer is None:
                continue
            has = d.aer.cor_status if correctable else d.aer.uncor_status
            if d.requester_id() == rid or (multi and has):
                out.append(d)
        return out

    def _handle_correctable(self, dev: PCIDevice) -> None:
        assert dev.aer is not None
        aer = dev.aer
        lock = dev.lock if isinstance(dev, NicFunction) else self.port_mu
        with lock:
            status = aer.cor_status
            if status:
                dev.set_config(aer.offset + PCI_ERR_COR_STATUS, 0, 4)  # the host's RW1C write, all bits
        names = decode_status(status, True)
        entry = {"time": time.time(), "function": self._id_of(dev), "status": status, "errors": names}
        with self._mu:
            self.counts["correctable"] += 1
            self.correctable.append(entry)
            del self.correctable[:-HISTORY]
        _t_cor.emit(port=self.port.name, function=self._id_of(dev), status=hex(status))
        log.info("host AER: %s: corrected error %s (%#x), cleared", self._id_of(dev),
                 ",".join(names) or "?", status)

    def _handle_uncorrectable(self, devs: list[PCIDevice], fatal_rcv: bool, rid: int) -> None:
        status, fatal = 0, fatal_rcv
        for d in devs:
            assert d.aer is not None
            st = d.aer.uncor_status & ~d.aer.get(PCI_ERR_UNCOR_MASK)
            status |= st
            if st & d.aer.severity:
                fatal = True
        with self._mu:
            self.counts["uncorrectable"] += 1
        source = self._id_of(devs[0]) if devs else f"{rid >> 8:02x}:{(rid & 0xFF) >> 3:02x}.{rid & 7}"
        self.pcie_do_recovery(PciChannelState.FROZEN if fatal else PciChannelState.NORMAL,
                              source=source, status=status)

    def _id_of(self, dev: PCIDevice) -> str:
        if dev is self.port:
            return ROOT_PORT_ID
        for v in self.card.functions:
            if v.nic is dev:
                return v.name
        return dev.name

    # -- pcie_do_recovery -----------------------------------------------------------------------------
    def _step(self, rec: dict, step: RecoveryStep, function: str | None, result: PciErsResult | None,
              **extra: Any) -> None:
        e = {"step": step.value, "function": function, "result": _res(result),
             "t-ms": round((time.monotonic() - rec["_t0"]) * 1000.0, 1), **extra}
        rec["steps"].append(e)
        _t_step.emit(port=self.port.name, function=function or "*", step=step.value, result=_res(result))

    def count(self, what: str) -> None:
        with self._mu:
            self.counts[what] = self.counts.get(what, 0) + 1

    def _set_state(self, s: RecoveryState) -> None:
        with self._mu:
            self.state = s

    def pcie_do_recovery(self, state: PciChannelState, *, source: str, status: int = 0) -> dict:
        """Recover every function below the port (see the module docstring); returns the record."""
        with self._mu:
            self._seq += 1
            self.counts["recoveries"] += 1
            rec: dict[str, Any] = {"id": self._seq, "port": f"0000:00:{ROOT_PORT_DEVFN >> 3:02x}.0", "source": source,
                                   "status": status, "errors": decode_status(status, False),
                                   "state": state.value, "started": time.time(), "steps": [],
                                   "producers-at-error": {}, "result": None, "_t0": time.monotonic()}
        vdevs = list(self.card.functions)
        log.warning("host AER: %s uncorrectable error %s on %s: recovering the devices below %s",
                    "fatal" if state is PciChannelState.FROZEN else "non-fatal", ",".join(rec["errors"]) or "?",
                    source, self.port.name)
        with self.reset_mu:
            self._set_state(RecoveryState.RECOVERING)
            for v in vdevs:
                v.set_recovery_state(RecoveryState.RECOVERING)
            result = PciErsResult.CAN_RECOVER
            ok = True
            try:
                for v in vdevs:  # report_error_detected
                    rec["producers-at-error"][v.name] = v.nic.producers()
                    r = v.error_detected(state)
                    result = merge_result(result, r)
                    self._step(rec, RecoveryStep.ERROR_DETECTED, v.name, r, state=state.value)
                if state is PciChannelState.FROZEN:  # reset_subordinates
                    if self.link_reset_switch.fix_on:
                        for v in vdevs:
                            v.gate_close()
                        ok = self._link_reset(rec, user_reset=False)
                        self._step(rec, RecoveryStep.LINK_RESET, None,
                                   PciErsResult.RECOVERED if ok else PciErsResult.DISCONNECT)
                    else:
                        self._step(rec, RecoveryStep.LINK_RESET, None, None,
                                   skipped=f"{SWITCH_HOST_LINK_RESET} is off: the user is trusted to reset")
                if ok and result is PciErsResult.CAN_RECOVER:
                    result = PciErsResult.RECOVERED
                    for v in vdevs:
                        r = v.mmio_enabled()
                        result = merge_result(result, r)
                        self._step(rec, RecoveryStep.MMIO_ENABLED, v.name, r)
                elif ok and result is PciErsResult.NEED_RESET:
                    result = PciErsResult.RECOVERED
                    for v in vdevs:
                        r = v.slot_reset()
                        result = merge_result(result, r)
                        self._step(rec, RecoveryStep.SLOT_RESET, v.name, r)
                if not ok or result is not PciErsResult.RECOVERED:
                    result = PciErsResult.DISCONNECT if not ok else result
                    for v in vdevs:  # report_perm_failure_detected
                        v.error_detected(PciChannelState.PERM_FAILURE)
                        self._step(rec, RecoveryStep.FAILED, v.name, result, state=PciChannelState.PERM_FAILURE.value)
                    log.error("host AER: recovery of the devices below %s failed: they are failed", self.port.name)
                else:
                    for v in vdevs:  # report_resume, then the status cleared
                        v.resume()
                        self._step(rec, RecoveryStep.RESUME, v.name, None)
                    self._clear_status(vdevs)
                    self._step(rec, RecoveryStep.RECOVERED, None, result)
                    log.warning("host AER: the devices below %s recovered", self.port.name)
            finally:
                for v in vdevs:
                    v.gate_open()
                self._set_state(RecoveryState.IDLE)
        rec["result"] = _res(result)
        rec["code"] = int(result)
        rec["recovered"] = ok and result is PciErsResult.RECOVERED
        rec["duration-ms"] = round((time.monotonic() - rec.pop("_t0")) * 1000.0, 1)
        with self._mu:
            self.counts["recovered" if rec["recovered"] else "failed"] += 1
            self.history.append(rec)
            del self.history[:-HISTORY]
        return rec

    def _clear_status(self, vdevs: list[VfioPciDevice]) -> None:
        """``pcie_clear_device_status`` and ``pci_aer_clear_nonfatal_status``: the live registers
        (a function whose link is still down cannot be written)."""
        for v in vdevs:
            with v.lock:
                if v.nic.aer is not None and v.nic.accessible:
                    v.nic.aer.clear_status()
        with self.port_mu:
            self.port.aer_cap.clear_status()

    # -- the link reset ---------------------------------------------------------------------------------
    def _link_reset(self, rec: dict | None, *, user_reset: bool) -> bool:
        """A secondary bus reset of the port, the link down for ``link_reset_ms``, then the wait
        for every function's vendor id (gates closed by the caller).  True: all came back (their
        config and interrupt setup restored)."""
        vdevs = list(self.card.functions)
        saved = [(v, v.prepare_bus_reset()) for v in vdevs]
        self._set_state(RecoveryState.LINK_DOWN)
        for v in vdevs:
            v.nic.set_link(False)
        with self.port_mu:
            bc = self.port.bridge_control
            self.port.config_write(R.PCI_BRIDGE_CONTROL, bc | R.PCI_BRIDGE_CTL_BUS_RESET, 2)
        with self._mu:
            self.counts["bus-resets"] += 1
        self._stop.wait(self.link_reset_ms / 1000.0)  # Trst and link training: the modelled link-down time
        with self.port_mu:
            self.port.config_write(R.PCI_BRIDGE_CONTROL, bc & ~R.PCI_BRIDGE_CTL_BUS_RESET, 2)
        if self.never_returns.on:
            self.never_returns.fired += 1
        else:
            for v in vdevs:
                v.nic.set_link(True)
        t0 = time.monotonic()
        deadline = t0 + self.link_ready_timeout_ms / 1000.0
        pending = list(vdevs)
        while True:  # pci_bridge_wait_for_secondary_bus / pci_dev_wait
            pending = [v for v in pending if v.nic.config_read(R.PCI_VENDOR_ID, 2) == 0xFFFF]
            if not pending or time.monotonic() >= deadline or self._stop.is_set():
                break
            self._stop.wait(_POLL_S)
        waited = round((time.monotonic() - t0) * 1000.0, 1)
        if pending:
            log.error("host AER: %s did not come back after the secondary bus reset (%d ms)",
                      ", ".join(v.name for v in pending), self.link_ready_timeout_ms)
            if rec is not None:
                rec["not-back"] = [v.name for v in pending]
            return False
        for v, sv in saved:
            v.bus_reset_done(sv, user_reset=user_reset)
        if rec is not None:
            rec["link-ready-ms"] = waited
        return True

    def secondary_bus_reset(self, reason: str, *, user_reset: bool = False) -> bool:
        """A secondary bus reset outside a recovery (a release, a hot reset): gates closed around
        it; a device that never comes back is failed (``io_perm_failure`` to every driver)."""
        vdevs = list(self.card.functions)
        with self.reset_mu:
            log.info("host: secondary bus reset of %s: %s", self.port.name, reason)
            for v in vdevs:
                v.gate_close()
            ok = False
            try:
                ok = self._link_reset(None, user_reset=user_reset)
                if not ok:
                    for v in vdevs:
                        v.error_detected(PciChannelState.PERM_FAILURE)
            finally:
                for v in vdevs:
                    v.gate_open()
                self._set_state(RecoveryState.IDLE)
        return ok

    def request_bus_reset(self, reason: str) -> bool:
        """``VfioPciDevice.bus_reset_request``: reset a frozen function on release."""
        return self.secondary_bus_reset(reason)

    # -- view ---------------------------------------------------------------------------------------
    def describe(self) -> dict:
        with self._mu:
            return {"port": self.port.name, "state": self.state.value, "counts": dict(self.counts),
                    "link-reset-ms": self.link_reset_ms, "link-ready-timeout-ms": self.link_ready_timeout_ms,
                    "history": [dict(h) for h in self.history], "correctable": list(self.correctable),
                    "faults": self.faults.describe()}

    def port_status(self) -> dict:
        """``x-query-pci-aer rp0``: the port's AER registers and bridge, and the recoveries."""
        with self.port_mu:
            aer = self.port.aer_cap.describe()
            bridge = self.port.describe()
        return {"device": ROOT_PORT_ID, "kind": "pcie-root-port", "bdf": str(self.card.port_address),
                "aer": aer, "bridge": bridge, "aer-interrupts": self.port.aer_interrupts,
                "recovery": self.describe()}

    def function_status(self, v: VfioPciDevice, address: PciAddress) -> dict:
        """``x-query-pci-aer nicN``: the live registers, the user's latched view, the last header
        log, the recovery state and history, the ERR eventfd counter, unhandled, hot resets."""
        with v.lock:
            live = v.nic.aer.describe() if v.nic.aer is not None else None
            producers = v.nic.producers()
            frozen, link = v.nic.error_frozen, v.nic.link_up
        st = v.aer_state()
        rec = self.describe()
        return {"device": v.name, "kind": "host-function", "bdf": str(address), "driver": "vfio-pci",
                "aer": live, "user-view": st["latched"] or "live",
                "last-header-log": (st["latched"] or live or {}).get("header-log"),
                "recovery-state": st["recovery-state"], "unhandled": st["unhandled"], "failed": st["failed"],
                "frozen": frozen, "link-up": link, "err-eventfd": st["err-eventfd"], "hot-resets": st["hot-resets"],
                "gate": st["gate"], "producers": producers,
                "recovery": {"state": rec["state"], "history": rec["history"], "counts": rec["counts"]}}


# -- kickcall's hot reset extension: vfio-pci's ownership rule ------------------------------------------
class HotResetEndpoint:
    """One function's side of the card's hot reset (``VfioUserServer(hot_reset=...)``)."""

    def __init__(self, domain: "HotResetDomain", index: int) -> None:
        self.domain = domain
        self.index = index
        self.address = domain.card.address(index)

    def devices(self) -> list[PciAddress]:
        """Every function a secondary bus reset of the port resets (this one included)."""
        return [self.domain.card.address(i) for i in range(len(self.domain.card.functions))]

    def hot_reset(self, tokens: list[bytes], own_token: bytes) -> None:
        self.domain.hot_reset(self.index, tokens, own_token)


class HotResetDomain:
    """The card's hot reset: every function must be held by a connected client whose token is in
    the request (the sender's own connection counts without its token), else EPERM; then one
    secondary bus reset of the port, counted."""

    def __init__(self, card: HostCard, service: HostAerService) -> None:
        self.card = card
        self.service = service
        self.holders: list[Callable[[], bytes | None]] = [lambda: None for _ in card.functions]
        self.resets = 0
        self.refused = 0

    def endpoint(self, index: int) -> HotResetEndpoint:
        return HotResetEndpoint(self, index)

    def set_holder(self, index: int, token_of: Callable[[], bytes | None]) -> None:
        """*token_of*: the token of the client holding function *index* now (None: nobody)."""
        self.holders[index] = token_of

    def hot_reset(self, index: int, tokens: list[bytes], own_token: bytes) -> None:
        for i, v in enumerate(self.card.functions):
            held = self.holders[i]()
            if held is None:
                self.refused += 1
                raise VfioError(errno.EPERM, f"hot reset: {v.name} ({self.card.address(i)}) is not held by a client",
                                VfioReason.WRONG_STATE)
            if i == index:
                if not hmac.compare_digest(held, own_token):
                    self.refused += 1
                    raise VfioError(errno.EPERM, "hot reset: the sender's connection is not the holder",
                                    VfioReason.WRONG_STATE)
                continue
            if not any(hmac.compare_digest(held, t) for t in tokens):
                self.refused += 1
                raise VfioError(errno.EPERM, f"hot reset: no proof of owning {v.name} ({self.card.address(i)})",
                                VfioReason.WRONG_STATE)
        for v in self.card.functions:  # a recovery in progress: wait for it (EIO if a device failed)
            v.gate_wait("hot reset")
        if not self.service.secondary_bus_reset(f"hot reset through {self.card.functions[index].name}",
                                                 user_reset=True):
            raise VfioError(errno.EIO, "hot reset: the devices did not come back", VfioReason.NO_DEVICE)
        self.resets += 1
        self.service.count("hot-resets")
        _t_hot.emit(port=self.service.port.name, via=self.card.functions[index].name, functions=len(self.card.functions))
