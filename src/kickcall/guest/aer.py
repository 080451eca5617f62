"""The guest kernel's PCIe AER port service and its error recovery (Linux's
``drivers/pci/pcie/aer.c`` and ``drivers/pci/pcie/err.c``, in kickcall's own words).

At boot (``AerService.probe``, after enumeration), for every PCIe Root Port (PCI Express
capability of type 4) with the AER extended capability:

* SERR forwarding on in its Bridge Control (``pci_configure_serr``): an error message from below
  climbs only through a bridge that forwards it;
* Device Control's CERE|NFERE|FERE|URRE on the port and on every PCIe function below it that has
  AER (``pci_aer_init``): a function reports an error only when its class is enabled;
* the port's AER interrupt: its MSI-X vector (INTx when it has none), ``request_irq``;
* Root Error Command COR_EN|NONFATAL_EN|FATAL_EN (``aer_enable_rootport``).

Where the work runs.  Guest interrupt handlers run on the hypervisor's single interrupt thread
(``kc-irq``: ``Irqchip.deliver`` calls ``GuestKernel.do_irq``), one handler at a time, for every
device.  The AER irq handler (``aer_irq``) therefore does only what Linux's hard irq handler
does: it reads Root Error Status, returns IRQ_NONE when no error was received, reads the Error
Source register, writes the status back (RW1C) and queues (status, source) in the port's bounded
fifo -- three ECAM accesses, no CF8/CFC lock, no wait.  The recovery is the threaded half
(``aer_isr``): it runs as a guest task on a vCPU (``GuestKernel.run_on``), started by the
handler when no task is draining the fifo.  Done inside the handler it would deadlock or stall
the vCPU: a recovery waits (Trst, the functions coming back after a secondary bus reset), the
drivers' ``slot_reset`` re-enables MSI-X, which makes the VMM reprogram irqfds whose handlers run
on that same interrupt thread, and no interrupt -- not even the drivers' own -- would be
delivered while it ran.

The work, per queued error (``aer_isr_one_error``): correctable first, then uncorrectable (the
first fatal decides the severity); the source is the function whose requester id (``bus << 8 |
devfn``) the Error Source register named, at or below the port (else a function below it with
its status set, ``find_source_device``); its AER status is read (uncorrectable status & ~mask,
the severity register; correctable status & ~mask) and printed in Linux's words
("PCIe Bus Error: severity=..., type=..., (Requester ID)").  Correctable: the status is cleared,
nothing else.  Uncorrectable: ``pcie_do_recovery`` on the bridge above the source (the source
itself when it is a port) with ``io_frozen`` for a fatal error, ``io_normal`` otherwise, in the
order of ``kickcall.pci.recovery``: error_detected to every function below the bridge (votes
merged; a function without handlers votes NO_AER_DRIVER, a bridge NONE), frozen -> the link reset
(``aer_root_reset``: the port's Root Error Command off, Secondary Bus Reset set, held 2 ms,
cleared, then the functions below polled until their vendor id reads other than 0xFFFF, bounded,
the command back on), CAN_RECOVER -> mmio_enabled, NEED_RESET -> slot_reset, not RECOVERED ->
error_detected(io_perm_failure) to the drivers (the functions are failed), else resume and the
source's AER status (RW1C) and its Device Status error bits are cleared (a failed recovery leaves
them set, as Linux does).

Every step is printk'ed and recorded in the port's bounded history; ``AerService.stats`` (guest
command ``aer-stats``) shows per port the counters, the history and the last error, and per
function the errors it was the source of.  ``native=False`` (guest command ``aer-config``) is a
kernel that does not own AER (``pcie_ports=compat``, firmware first): nothing is enabled, errors
are never handled and their statuses stay set.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from typing import Callable

from ..pci import regs as R
from ..pci.aer import (
    PCI_ERR_COR_MASK, PCI_ERR_COR_STATUS, PCI_ERR_ROOT_CMD_COR_EN, PCI_ERR_ROOT_CMD_FATAL_EN,
    PCI_ERR_ROOT_CMD_NONFATAL_EN, PCI_ERR_ROOT_COMMAND, PCI_ERR_ROOT_COR_RCV, PCI_ERR_ROOT_ERR_SRC,
    PCI_ERR_ROOT_FIRST_FATAL, PCI_ERR_ROOT_MULTI_COR_RCV, PCI_ERR_ROOT_MULTI_UNCOR_RCV, PCI_ERR_ROOT_STATUS,
    PCI_ERR_ROOT_UNCOR_RCV, PCI_ERR_UNCOR_MASK, PCI_ERR_UNCOR_SEVER, PCI_ERR_UNCOR_STATUS, PCI_EXP_DEVCTL_CERE,
    PCI_EXP_DEVCTL_FERE, PCI_EXP_DEVCTL_NFERE, PCI_EXP_DEVCTL_URRE, PCI_EXP_DEVSTA_CED, PCI_EXP_DEVSTA_FED,
    PCI_EXP_DEVSTA_NFED, PCI_EXP_DEVSTA_URD, PCI_EXT_CAP_ID_ERR, AerSeverity, decode_status,
)
from ..pci.recovery import PciChannelState, PciErsResult, RecoveryStep, merge_result
from .kernel import PCI_IRQ_INTX, PCI_IRQ_MSIX, GuestKernel, GuestPciDev

__all__ = ["AerService", "AerPort", "AER_FIFO_SIZE", "RESET_READY_TIMEOUT", "HISTORY_SIZE"]

log = logging.getLogger("kickcall.guest.aer")

#: errors a port queues between its irq handler and the recovery task (Linux's kfifo of
#: AER_ERROR_SOURCES_MAX); more are counted in ``fifo-overflow`` and dropped
AER_FIFO_SIZE = 128
#: history entries kept per port
HISTORY_SIZE = 128
#: how long the functions below a port may take to answer config reads after a secondary bus
#: reset (Linux waits up to PCIE_RESET_READY_POLL_MS, 60 s; a model device is quicker)
RESET_READY_TIMEOUT = 10.0
#: Trst: how long Secondary Bus Reset is held (``pci_reset_secondary_bus``: at least 1 ms; 2 ms)
SBR_HOLD_MS = 2.0

_SEVERITY_TEXT = {
    AerSeverity.CORRECTABLE: "Correctable",
    AerSeverity.NONFATAL: "Uncorrectable (Non-Fatal)",
    AerSeverity.FATAL: "Uncorrectable (Fatal)",
}
_PHYSICAL = 0x00000001  # COR RCVR
_DATA_LINK = 0x00000010 | 0x00000040 | 0x00000080 | 0x00000100 | 0x00001000  # UNC DLP, COR BAD_TLP..REP_TIMER


def _layer(status: int) -> str:
    """``AER_GET_LAYER_ERROR``."""
    if status & _PHYSICAL:
        return "Physical Layer"
    if status & _DATA_LINK:
        return "Data Link Layer"
    return "Transaction Layer"


def _bdf(rid: int) -> str:
    return f"0000:{rid >> 8:02x}:{(rid >> 3) & 0x1F:02x}.{rid & 7}"


class _FnStats:
    """What the service saw of one function (the source of errors, or a function recovered)."""

    def __init__(self, pci: GuestPciDev) -> None:
        self.pci = pci
        self.errors = {s.value: 0 for s in AerSeverity}
        self.last_error: dict | None = None
        self.state = PciChannelState.NORMAL.value
        self.votes: list[str] = []

    def describe(self) -> dict:
        return {"id": self.pci.requester_id, "bdf": _bdf(self.pci.requester_id), "vendor": self.pci.vendor,
                "device": self.pci.device, "errors": dict(self.errors), "last-error": self.last_error,
                "channel-state": self.state, "has-handlers": self.pci.err_handlers is not None,
                "last-votes": list(self.votes)}


class AerPort:
    """One Root Port the service owns: its AER capability offset, irq, fifo, counters, history."""

    def __init__(self, pci: GuestPciDev, aer: int) -> None:
        self.pci = pci
        self.aer = aer
        self.irq: int | None = None
        self.irq_mode = "none"
        self.handler: Callable[[int], bool] | None = None
        self.fifo: collections.deque[tuple[int, int]] = collections.deque()
        self.counters: dict[str, int] = {
            "interrupts": 0, "spurious-interrupts": 0, "fifo-overflow": 0, "correctable": 0, "non-fatal": 0,
            "fatal": 0, "multiple": 0, "source-not-found": 0, "recoveries": 0, "recovered": 0, "failed": 0,
            "link-resets": 0, "link-reset-timeouts": 0, "not-ready-polls": 0, "status-all-f": 0,
        }
        self.history: collections.deque[dict] = collections.deque(maxlen=HISTORY_SIZE)
        self.last_error: dict | None = None
        self.recovering = False
        self.root_command = 0
        self.serr_forwarding = False

    @property
    def rid(self) -> int:
        return self.pci.requester_id

    def describe(self) -> dict:
        return {"id": self.rid, "bdf": _bdf(self.rid), "aer-offset": self.aer, "secondary-bus": self.pci.secondary,
                "irq": self.irq, "irq-mode": self.irq_mode, "root-command": self.root_command,
                "serr-forwarding": self.serr_forwarding, "recovering": self.recovering,
                "queued": len(self.fifo), "counters": dict(self.counters), "last-error": self.last_error,
                "history": list(self.history)}


class AerService:
    """The AER port service driver of the guest kernel: one per kernel, every root port with AER."""

    def __init__(self, k: GuestKernel, *, native: bool = True) -> None:
        self.k = k
        self.native = native
        """False: the kernel does not own AER (``pcie_ports=compat``): nothing is enabled at
        boot, a running service is switched off (Root Error Command cleared, irq freed)."""
        self.ports: list[AerPort] = []
        self.functions: dict[int, _FnStats] = {}
        self._mu = threading.Lock()
        self._worker = False
        self.worker_errors = 0
        self.ready_timeout = RESET_READY_TIMEOUT

    # -- boot ---------------------------------------------------------------------------------------------
    def probe(self, devs: list[GuestPciDev]) -> list[AerPort]:
        """Find the root ports with AER among *devs* (the enumeration's list) and, if native,
        bring the service up on each.  Returns the ports found."""
        self.ports = []
        self.functions = {}
        for d in devs:
            if not d.is_bridge or d.pcie_type != R.PCI_EXP_TYPE_ROOT_PORT:
                continue
            off = d.find_ext_capability(PCI_EXT_CAP_ID_ERR)
            if not off:
                self.k.printk(f"{d!r}: root port without AER")
                continue
            port = AerPort(d, off)
            self.ports.append(port)
            for f in [d, *self.below(d)]:
                self.functions[f.requester_id] = _FnStats(f)
            self.k.printk(f"{d!r}: AER: root port, AER capability at {off:#x}, {len(self.below(d))} function(s) below")
        if self.native:
            for p in self.ports:
                self._enable_port(p)
        return self.ports

    def forget(self) -> None:
        """After a platform reset: the handlers freed and the ports' vectors forgotten (the
        devices lost them); ``probe`` starts again."""
        for p in self.ports:
            if p.irq is not None and p.handler is not None:
                self.k.free_irq(p.irq, p.handler)
            p.pci.release_vectors()
        self.ports = []
        self.functions = {}

    def set_native(self, native: bool) -> None:
        """Switch the service on (as at boot) or off (Root Error Command cleared, irq freed)."""
        if native == self.native:
            return
        self.native = native
        for p in self.ports:
            if native:
                self._enable_port(p)
            else:
                self._disable_port(p)

    def below(self, bridge: GuestPciDev) -> list[GuestPciDev]:
        """Every function below *bridge*, depth first (``pci_walk_bridge`` on its subordinate bus)."""
        out = []
        for d in self.k.pci_devices:
            p = d.parent
            while p is not None and p is not bridge:
                p = p.parent
            if p is bridge:
                out.append(d)
        return out

    def _enable_port(self, p: AerPort) -> None:
        d = p.pci
        # pci_configure_serr: forward SERR from the secondary side
        ctl = d.read_config(R.PCI_BRIDGE_CONTROL, 2)
        d.write_config(R.PCI_BRIDGE_CONTROL, ctl | R.PCI_BRIDGE_CTL_SERR, 2)
        p.serr_forwarding = bool(d.read_config(R.PCI_BRIDGE_CONTROL, 2) & R.PCI_BRIDGE_CTL_SERR)
        # pci_aer_init: reporting enables on the port and every PCIe function below with AER
        for f in [d, *self.below(d)]:
            if f.exp_cap and f.find_ext_capability(PCI_EXT_CAP_ID_ERR):
                off = f.exp_cap + R.PCI_EXP_DEVCTL
                en = PCI_EXP_DEVCTL_CERE | PCI_EXP_DEVCTL_NFERE | PCI_EXP_DEVCTL_FERE | PCI_EXP_DEVCTL_URRE
                f.write_config(off, f.read_config(off, 2) | en, 2)
                self.k.printk(f"{f!r}: AER: error reporting enabled")
        # the port's interrupt: MSI-X vector 0, else INTx; an MSI is a write upstream of the
        # port, hence Bus Master (pcie_portdrv_probe: pci_set_master)
        d.set_master(True)
        if p.irq is None:
            d.alloc_irq_vectors(1, 1, PCI_IRQ_MSIX | PCI_IRQ_INTX)
            p.irq = d.irq_vector(0)
            p.irq_mode = "msix" if d.irq_mode == PCI_IRQ_MSIX else "intx" if d.irq_mode == PCI_IRQ_INTX else "?"
        p.handler = self._irq_handler(p)  # kept for free_irq
        self.k.request_irq(p.irq, p.handler, "aerdrv")
        # aer_enable_rootport: clear what was received before, then enable the classes
        st = d.read_config(p.aer + PCI_ERR_ROOT_STATUS, 4)
        if st not in (0, 0xFFFFFFFF):
            d.write_config(p.aer + PCI_ERR_ROOT_STATUS, st, 4)
        cmd = PCI_ERR_ROOT_CMD_COR_EN | PCI_ERR_ROOT_CMD_NONFATAL_EN | PCI_ERR_ROOT_CMD_FATAL_EN
        d.write_config(p.aer + PCI_ERR_ROOT_COMMAND, cmd, 4)
        p.root_command = d.read_config(p.aer + PCI_ERR_ROOT_COMMAND, 4)
        self.k.printk(f"{d!r}: AER: enabled with IRQ {p.irq} ({p.irq_mode}), root error command {p.root_command:#x}")

    def _disable_port(self, p: AerPort) -> None:
        d = p.pci
        d.write_config(p.aer + PCI_ERR_ROOT_COMMAND, 0, 4)
        p.root_command = d.read_config(p.aer + PCI_ERR_ROOT_COMMAND, 4)
        if p.irq is not None and p.handler is not None:
            self.k.free_irq(p.irq, p.handler)
            p.handler = None
        self.k.printk(f"{d!r}: AER: disabled (the OS does not own AER)")

    # -- the irq handler (interrupt context) ----------------------------------------------------------------
    def _irq_handler(self, p: AerPort) -> Callable[[int], bool]:
        def aer_irq(_irq: int) -> bool:
            """``aer_irq``: read and clear Root Error Status, queue the source, wake the thread."""
            d = p.pci
            st = d.read_config(p.aer + PCI_ERR_ROOT_STATUS, 4)
            if st == 0xFFFFFFFF:
                p.counters["status-all-f"] += 1
                return False
            if not st & (PCI_ERR_ROOT_COR_RCV | PCI_ERR_ROOT_UNCOR_RCV):
                p.counters["spurious-interrupts"] += 1
                return False
            src = d.read_config(p.aer + PCI_ERR_ROOT_ERR_SRC, 4)
            d.write_config(p.aer + PCI_ERR_ROOT_STATUS, st, 4)
            p.counters["interrupts"] += 1
            with self._mu:
                if len(p.fifo) >= AER_FIFO_SIZE:
                    p.counters["fifo-overflow"] += 1
                    return True
                p.fifo.append((st, src))
                start = not self._worker
                self._worker = True
            if start:
                self.k.run_on(0, self._aer_isr)
            return True
        return aer_irq

    # -- the threaded half ---------------------------------------------------------------------------------
    def _aer_isr(self) -> None:
        """``aer_isr``: drain every port's fifo, one error at a time (recoveries never overlap)."""
        while True:
            with self._mu:
                item = next(((p, p.fifo.popleft()) for p in self.ports if p.fifo), None)
                if item is None:
                    self._worker = False
                    return
            p, (st, src) = item
            try:
                self._isr_one_error(p, st, src)
            except Exception as e:  # a broken recovery must not kill the service
                self.worker_errors += 1
                log.warning("AER: handling an error on %r failed: %s", p.pci, e, exc_info=True)
                self.k.printk(f"{p.pci!r}: AER: error handling failed: {type(e).__name__}: {e}")

    def _isr_one_error(self, p: AerPort, st: int, src: int) -> None:
        """``aer_isr_one_error``: the correctable part, then the uncorrectable part."""
        if st & PCI_ERR_ROOT_COR_RCV:
            multi = bool(st & PCI_ERR_ROOT_MULTI_COR_RCV)
            self.k.printk(f"{p.pci!r}: AER: {'Multiple ' if multi else ''}Correctable error message received "
                          f"from {_bdf(src & 0xFFFF)}")
            self._handle(p, AerSeverity.CORRECTABLE, src & 0xFFFF, multi)
        if st & PCI_ERR_ROOT_UNCOR_RCV:
            multi = bool(st & PCI_ERR_ROOT_MULTI_UNCOR_RCV)
            sev = AerSeverity.FATAL if st & PCI_ERR_ROOT_FIRST_FATAL else AerSeverity.NONFATAL
            self.k.printk(f"{p.pci!r}: AER: {'Multiple ' if multi else ''}{_SEVERITY_TEXT[sev]} error message "
                          f"received from {_bdf(src >> 16)}")
            self._handle(p, sev, src >> 16, multi)

    def _find_source(self, p: AerPort, rid: int, sev: AerSeverity) -> GuestPciDev | None:
        """``find_source_device``: the function named by the id, else one below the port whose
        status shows an error of that class."""
        cands = [p.pci, *self.below(p.pci)]
        for f in cands:
            if f.requester_id == rid:
                return f
        for f in cands:
            off = f.find_ext_capability(PCI_EXT_CAP_ID_ERR) if f.exp_cap else 0
            if not off:
                continue
            reg = PCI_ERR_COR_STATUS if sev is AerSeverity.CORRECTABLE else PCI_ERR_UNCOR_STATUS
            v = f.read_config(off + reg, 4)
            if v not in (0, 0xFFFFFFFF):
                return f
        return None

    def _fn(self, f: GuestPciDev) -> _FnStats:
        fs = self.functions.get(f.requester_id)
        if fs is None or fs.pci is not f:
            fs = self.functions[f.requester_id] = _FnStats(f)
        return fs

    def _record(self, p: AerPort, step: str, **fields: object) -> None:
        p.history.append({"time": round(time.time(), 6), "step": step, **fields})

    def _handle(self, p: AerPort, sev: AerSeverity, rid: int, multi: bool) -> None:
        p.counters[sev.value] += 1
        if multi:
            p.counters["multiple"] += 1
        src = self._find_source(p, rid, sev)
        if src is None:
            p.counters["source-not-found"] += 1
            self.k.printk(f"{p.pci!r}: AER: can't find device of ID{rid:04x}")
            self._record(p, "source-not-found", id=rid, severity=sev.value)
            return
        off = src.find_ext_capability(PCI_EXT_CAP_ID_ERR)
        info: dict = {"id": src.requester_id, "bdf": _bdf(src.requester_id), "severity": sev.value,
                      "multiple": multi}
        if off:
            if sev is AerSeverity.CORRECTABLE:
                status = src.read_config(off + PCI_ERR_COR_STATUS, 4)
                mask = src.read_config(off + PCI_ERR_COR_MASK, 4)
                info.update(status=status, mask=mask)
                if status == 0xFFFFFFFF:
                    p.counters["status-all-f"] += 1
                shown = status & ~mask
            else:
                status = src.read_config(off + PCI_ERR_UNCOR_STATUS, 4)
                mask = src.read_config(off + PCI_ERR_UNCOR_MASK, 4)
                sever = src.read_config(off + PCI_ERR_UNCOR_SEVER, 4)
                info.update(status=status, mask=mask, severity_reg=sever)
                if status == 0xFFFFFFFF:
                    p.counters["status-all-f"] += 1
                shown = status & ~mask
            info["errors"] = decode_status(shown, sev is AerSeverity.CORRECTABLE)
            self.k.printk(f"{src!r}: PCIe Bus Error: severity={_SEVERITY_TEXT[sev]}, type={_layer(shown)}, "
                          f"(Requester ID), id={src.requester_id:04x}")
            self.k.printk(f"{src!r}:   device [{src.vendor:04x}:{src.device:04x}] error status/mask="
                          f"{status:08x}/{mask:08x} {' '.join(info['errors'])}")
        else:
            self.k.printk(f"{src!r}: PCIe Bus Error: severity={_SEVERITY_TEXT[sev]}, type=Unaccessible, "
                          f"(Unregistered Agent ID), id={src.requester_id:04x}")
        p.last_error = info
        fs = self._fn(src)
        fs.errors[sev.value] += 1
        fs.last_error = info
        self._record(p, "error", **info)
        if sev is AerSeverity.CORRECTABLE:
            if off:  # handle_error_source: a correctable error is cleared, nothing else
                src.write_config(off + PCI_ERR_COR_STATUS, info["status"] & 0xFFFFFFFF, 4)
            self._record(p, "cleared", id=src.requester_id, severity=sev.value)
            self.k.printk(f"{src!r}: AER: correctable error cleared")
            return
        state = PciChannelState.FROZEN if sev is AerSeverity.FATAL else PciChannelState.NORMAL
        result = self.do_recovery(p, src, state)
        if result is PciErsResult.RECOVERED:  # as Linux: a failed recovery leaves the status for a look
            self._clear_source(src, off)
            self._record(p, "status-cleared", id=src.requester_id)

    def _clear_source(self, src: GuestPciDev, off: int) -> None:
        """``pci_aer_clear_*_status`` and ``pcie_clear_device_status``: RW1C writes of what is set."""
        if off:
            st = src.read_config(off + PCI_ERR_UNCOR_STATUS, 4)
            if st not in (0, 0xFFFFFFFF):
                src.write_config(off + PCI_ERR_UNCOR_STATUS, st, 4)
        if src.exp_cap:
            sta = PCI_EXP_DEVSTA_CED | PCI_EXP_DEVSTA_NFED | PCI_EXP_DEVSTA_FED | PCI_EXP_DEVSTA_URD
            src.write_config(src.exp_cap + R.PCI_EXP_DEVSTA, sta, 2)

    # -- pcie_do_recovery -----------------------------------------------------------------------------------
    def do_recovery(self, p: AerPort, dev: GuestPciDev, state: PciChannelState) -> PciErsResult:
        """``pcie_do_recovery(dev, state, aer_root_reset)`` with the port *p* above."""
        t = dev.pcie_type
        bridge = dev if dev.is_bridge and t in (R.PCI_EXP_TYPE_ROOT_PORT, R.PCI_EXP_TYPE_DOWNSTREAM) else dev.parent
        if bridge is None:
            bridge = p.pci
        fns = self.below(bridge) if bridge.secondary else [bridge]
        p.counters["recoveries"] += 1
        p.recovering = True
        self._record(p, "recovery-start", bridge=_bdf(bridge.requester_id), state=state.value,
                     functions=[_bdf(f.requester_id) for f in fns])
        self.k.printk(f"{bridge!r}: AER: broadcast error_detected message ({state.value})")
        try:
            status = PciErsResult.CAN_RECOVER
            status = self._report_detected(p, fns, state, status)
            if state is PciChannelState.FROZEN:
                if self.reset_subordinates(p, bridge) is not PciErsResult.RECOVERED:
                    self.k.printk(f"{bridge!r}: AER: subordinate device reset failed")
                    return self._failed(p, bridge, fns, PciErsResult.DISCONNECT)
            if status is PciErsResult.CAN_RECOVER:
                status = PciErsResult.RECOVERED
                self.k.printk(f"{bridge!r}: AER: broadcast mmio_enabled message")
                status = self._report(p, fns, RecoveryStep.MMIO_ENABLED, status)
            if status is PciErsResult.NEED_RESET:
                status = PciErsResult.RECOVERED
                self.k.printk(f"{bridge!r}: AER: broadcast slot_reset message")
                status = self._report(p, fns, RecoveryStep.SLOT_RESET, status)
            if status is not PciErsResult.RECOVERED:
                return self._failed(p, bridge, fns, status)
            self.k.printk(f"{bridge!r}: AER: broadcast resume message")
            for f in fns:
                self._fn(f).state = PciChannelState.NORMAL.value
                h = f.err_handlers
                if h is not None:
                    h.resume()
                    self._record(p, RecoveryStep.RESUME.value, id=_bdf(f.requester_id))
            p.counters["recovered"] += 1
            self._record(p, RecoveryStep.RECOVERED.value, bridge=_bdf(bridge.requester_id), result=status.name)
            self.k.printk(f"{bridge!r}: AER: device recovery successful")
            return status
        finally:
            p.recovering = False

    def _report_detected(self, p: AerPort, fns: list[GuestPciDev], state: PciChannelState,
                         status: PciErsResult) -> PciErsResult:
        """``report_error_detected`` on each function; the votes merged."""
        for f in fns:
            fs = self._fn(f)
            fs.state = state.value
            h = f.err_handlers
            if h is None:
                vote = PciErsResult.NONE if f.is_bridge else PciErsResult.NO_AER_DRIVER
                if vote is PciErsResult.NO_AER_DRIVER:
                    self.k.printk(f"{f!r}: AER: can't recover (no error_detected callback)")
            else:
                vote = h.error_detected(state)
            fs.votes = [f"{RecoveryStep.ERROR_DETECTED.value}={vote.name}"]
            status = merge_result(status, vote)
            self._record(p, RecoveryStep.ERROR_DETECTED.value, id=_bdf(f.requester_id), state=state.value,
                         vote=vote.name, merged=status.name)
            self.k.printk(f"{f!r}: AER: error_detected({state.value}) -> {vote.name}")
        return status

    def _report(self, p: AerPort, fns: list[GuestPciDev], step: RecoveryStep, status: PciErsResult) -> PciErsResult:
        """``report_mmio_enabled`` / ``report_slot_reset``: only drivers with handlers vote."""
        for f in fns:
            h = f.err_handlers
            if h is None:
                continue
            vote = h.mmio_enabled() if step is RecoveryStep.MMIO_ENABLED else h.slot_reset()
            self._fn(f).votes.append(f"{step.value}={vote.name}")
            status = merge_result(status, vote)
            self._record(p, step.value, id=_bdf(f.requester_id), vote=vote.name, merged=status.name)
            self.k.printk(f"{f!r}: AER: {step.value} -> {vote.name}")
        return status

    def _failed(self, p: AerPort, bridge: GuestPciDev, fns: list[GuestPciDev], status: PciErsResult) -> PciErsResult:
        """Recovery failed: the functions are failed, their drivers told (``io_perm_failure``)."""
        for f in fns:
            self._fn(f).state = PciChannelState.PERM_FAILURE.value
            h = f.err_handlers
            if h is not None:
                h.error_detected(PciChannelState.PERM_FAILURE)
        p.counters["failed"] += 1
        self._record(p, RecoveryStep.FAILED.value, bridge=_bdf(bridge.requester_id), result=status.name)
        self.k.printk(f"{bridge!r}: AER: device recovery failed ({status.name})")
        return status

    def reset_subordinates(self, p: AerPort, bridge: GuestPciDev) -> PciErsResult:
        """``aer_root_reset``: the port's AER interrupt classes off, a secondary bus reset of
        *bridge* (set, Trst, clear), then wait for every function below to answer config reads
        (vendor id not 0xFFFF) within ``ready_timeout``; Root Error Status cleared, the command
        restored.  RECOVERED, or DISCONNECT when a function never came back."""
        d = p.pci
        d.write_config(p.aer + PCI_ERR_ROOT_COMMAND, 0, 4)
        fns = self.below(bridge)
        ctl = bridge.read_config(R.PCI_BRIDGE_CONTROL, 2)
        bridge.write_config(R.PCI_BRIDGE_CONTROL, ctl | R.PCI_BRIDGE_CTL_BUS_RESET, 2)
        self.k.msleep(SBR_HOLD_MS)
        bridge.write_config(R.PCI_BRIDGE_CONTROL, ctl & ~R.PCI_BRIDGE_CTL_BUS_RESET, 2)
        p.counters["link-resets"] += 1
        self._record(p, RecoveryStep.LINK_RESET.value, bridge=_bdf(bridge.requester_id),
                     functions=[_bdf(f.requester_id) for f in fns])
        self.k.printk(f"{bridge!r}: AER: secondary bus reset")
        result = PciErsResult.RECOVERED
        deadline = time.monotonic() + self.ready_timeout
        delay = 1.0
        for f in fns:  # pci_bridge_wait_for_secondary_bus / pci_dev_wait
            while f.read_config(R.PCI_VENDOR_ID, 2) == 0xFFFF:
                p.counters["not-ready-polls"] += 1
                if time.monotonic() >= deadline:
                    p.counters["link-reset-timeouts"] += 1
                    self.k.printk(f"{f!r}: AER: not ready {self.ready_timeout:.0f}s after bus reset; giving up")
                    result = PciErsResult.DISCONNECT
                    break
                self.k.msleep(delay)
                delay = min(delay * 2, 100.0)
        st = d.read_config(p.aer + PCI_ERR_ROOT_STATUS, 4)
        if st not in (0, 0xFFFFFFFF):
            d.write_config(p.aer + PCI_ERR_ROOT_STATUS, st, 4)
        if self.native:
            d.write_config(p.aer + PCI_ERR_ROOT_COMMAND, PCI_ERR_ROOT_CMD_COR_EN | PCI_ERR_ROOT_CMD_NONFATAL_EN
                           | PCI_ERR_ROOT_CMD_FATAL_EN, 4)
        self._record(p, "link-ready", result=result.name)
        self.k.printk(f"{bridge!r}: AER: Root Port link has been reset ({result.name})")
        return result

    # -- view ---------------------------------------------------------------------------------------------
    def stats(self) -> dict:
        return {"native": self.native, "worker-running": self._worker, "worker-errors": self.worker_errors,
                "ports": [p.describe() for p in self.ports],
                "functions": {f"{rid:04x}": fs.describe() for rid, fs in sorted(self.functions.items())}}

