"""PCIe Advanced Error Reporting: the extended capability, error injection, and the error message
that climbs to the Root Port (the semantics of QEMU's ``hw/pci/pcie_aer.c``, in kickcall's code).

The capability (``PCI_EXT_CAP_ID_ERR``, 0x48 bytes at an extended offset, 0x100 by default):

=========  ===========================  ======================================================
offset     register                     access
=========  ===========================  ======================================================
0x04       Uncorrectable Error Status   RW1C (supported bits)
0x08       Uncorrectable Error Mask     RW
0x0C       Uncorrectable Error Severity RW, 1 = fatal (QEMU's defaults: DLP, SDN, FCP,
                                        RX_OVER, MALF_TLP, INTN)
0x10       Correctable Error Status     RW1C
0x14       Correctable Error Mask       RW (default: ADV_NONFATAL, INTERNAL, HL_OVERFLOW)
0x18       Capabilities and Control     First Error Pointer (RO), ECRC capable/enable
0x1C       Header Log                   RO, 4 dwords: the TLP header of the first error
0x2C       Root Error Command           RW (root ports): COR_EN, NONFATAL_EN, FATAL_EN
0x30       Root Error Status            RW1C (root ports): received ERR_COR / ERR_NONFATAL /
                                        ERR_FATAL, multiple, first fatal
0x34       Error Source Identification  RO (root ports): requester id of the first ERR_COR
                                        (15:0) and of the first uncorrectable (31:16)
0x38       TLP Prefix Log               RO
=========  ===========================  ======================================================

``AERCap.inject`` is ``pcie_aer_inject_error``: the status must be exactly one supported bit
(``-EINVAL`` otherwise), a function without the PCIe capability answers ``-ENOSYS``.  Correctable:
DEVSTA.CED and the correctable status; uncorrectable: DEVSTA.FED or NFED by the severity register,
the status bit, the First Error Pointer and the header log (only when no earlier uncorrectable
error is still logged).  A masked error sets only its status bit.  A message (ERR_COR,
ERR_NONFATAL, ERR_FATAL) is sent only when the function's Command SERR or the Device Control
reporting enable of that class is set, and it climbs: every bridge on the way must have SERR
forwarding on in its Bridge Control (``PCI_BRIDGE_CTL_SERR``), the Root Port records it in its
Root Error Status and Error Source registers and, when its Root Error Command enables that class
and it is the first of its class, raises its AER interrupt (``RootPortNotify``).
"""

from __future__ import annotations

import enum
import errno
import re
import struct
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable

from .. import trace
from . import regs as R

if TYPE_CHECKING:
    from .device import PCIDevice

__all__ = [
    "PCI_EXT_CAP_ID_ERR", "AER_OFFSET", "PCI_ERR_SIZEOF", "AerSeverity", "AerErrFlag", "PCIEAERErr", "AERCap",
    "AER_ERROR_NAMES", "AerParseError", "parse_error_status", "error_names", "AerMessage",
    "UNC", "COR", "PCI_ERR_UNC_SUPPORTED", "PCI_ERR_COR_SUPPORTED", "PCI_ERR_UNC_SEVERITY_DEFAULT",
    "PCI_ERR_COR_MASK_DEFAULT", "decode_status",
]

_t_inject = trace.event("pcie_aer_inject", "an AER error was injected into a function's capability")
_t_msg = trace.event("pcie_aer_msg", "an AER error message climbed towards the root port")
_t_root = trace.event("pcie_aer_root_notify", "a root port received an AER message (and raised its interrupt)")

PCI_EXT_CAP_ID_ERR = 0x0001
AER_OFFSET = 0x100
PCI_ERR_SIZEOF = 0x48

PCI_ERR_UNCOR_STATUS = 0x04
PCI_ERR_UNCOR_MASK = 0x08
PCI_ERR_UNCOR_SEVER = 0x0C
PCI_ERR_COR_STATUS = 0x10
PCI_ERR_COR_MASK = 0x14
PCI_ERR_CAP = 0x18
PCI_ERR_CAP_FEP_MASK = 0x1F
PCI_ERR_CAP_ECRC_GENC = 0x20
PCI_ERR_CAP_ECRC_GENE = 0x40
PCI_ERR_CAP_ECRC_CHKC = 0x80
PCI_ERR_CAP_ECRC_CHKE = 0x100
PCI_ERR_HEADER_LOG = 0x1C
PCI_ERR_ROOT_COMMAND = 0x2C
PCI_ERR_ROOT_CMD_COR_EN = 0x1
PCI_ERR_ROOT_CMD_NONFATAL_EN = 0x2
PCI_ERR_ROOT_CMD_FATAL_EN = 0x4
PCI_ERR_ROOT_STATUS = 0x30
PCI_ERR_ROOT_COR_RCV = 0x01
PCI_ERR_ROOT_MULTI_COR_RCV = 0x02
PCI_ERR_ROOT_UNCOR_RCV = 0x04
PCI_ERR_ROOT_MULTI_UNCOR_RCV = 0x08
PCI_ERR_ROOT_FIRST_FATAL = 0x10
PCI_ERR_ROOT_NONFATAL_RCV = 0x20
PCI_ERR_ROOT_FATAL_RCV = 0x40
PCI_ERR_ROOT_ERR_SRC = 0x34
PCI_ERR_TLP_PREFIX_LOG = 0x38

# PCIe capability: Device Control reporting enables, Device Status detected bits
PCI_EXP_DEVCTL_CERE = 0x0001
PCI_EXP_DEVCTL_NFERE = 0x0002
PCI_EXP_DEVCTL_FERE = 0x0004
PCI_EXP_DEVCTL_URRE = 0x0008
PCI_EXP_DEVSTA_CED = 0x0001
PCI_EXP_DEVSTA_NFED = 0x0002
PCI_EXP_DEVSTA_FED = 0x0004
PCI_EXP_DEVSTA_URD = 0x0008


class UNC(enum.IntFlag):
    """Uncorrectable error status bits (``PCI_ERR_UNC_*``)."""

    DLP = 0x00000010
    SDN = 0x00000020
    POISON_TLP = 0x00001000
    FCP = 0x00002000
    COMP_TIME = 0x00004000
    COMP_ABORT = 0x00008000
    UNX_COMP = 0x00010000
    RX_OVER = 0x00020000
    MALF_TLP = 0x00040000
    ECRC = 0x00080000
    UNSUP = 0x00100000
    ACSV = 0x00200000
    INTN = 0x00400000
    MCBTLP = 0x00800000
    ATOP_EBLOCKED = 0x01000000
    TLP_PRF_BLOCKED = 0x02000000


class COR(enum.IntFlag):
    """Correctable error status bits (``PCI_ERR_COR_*``)."""

    RCVR = 0x00000001
    BAD_TLP = 0x00000040
    BAD_DLLP = 0x00000080
    REP_ROLL = 0x00000100
    REP_TIMER = 0x00001000
    ADV_NONFATAL = 0x00002000
    INTERNAL = 0x00004000
    HL_OVERFLOW = 0x00008000


PCI_ERR_UNC_SUPPORTED = int(sum(UNC))
PCI_ERR_COR_SUPPORTED = int(sum(COR))
PCI_ERR_UNC_SEVERITY_DEFAULT = int(UNC.DLP | UNC.SDN | UNC.FCP | UNC.RX_OVER | UNC.MALF_TLP | UNC.INTN)
PCI_ERR_COR_MASK_DEFAULT = int(COR.ADV_NONFATAL | COR.INTERNAL | COR.HL_OVERFLOW)

#: the names QEMU's ``pcie_aer_inject_error`` takes ("same to linux aer-injection tool"):
#: name -> (status bit, correctable)
AER_ERROR_NAMES: dict[str, tuple[int, bool]] = {
    **{m.name: (int(m.value), False) for m in UNC if m.name},
    **{m.name: (int(m.value), True) for m in COR if m.name},
}


def error_names() -> list[str]:
    return list(AER_ERROR_NAMES)


class AerSeverity(enum.StrEnum):
    """The class of an AER message (ERR_COR, ERR_NONFATAL, ERR_FATAL)."""

    CORRECTABLE = "correctable"
    NONFATAL = "non-fatal"
    FATAL = "fatal"

    @property
    def uncorrectable(self) -> bool:
        return self is not AerSeverity.CORRECTABLE


class AerErrFlag(enum.IntFlag):
    """``PCIEAERErr.flags``."""

    IS_CORRECTABLE = 0x1
    MAYBE_ADVISORY = 0x2
    HEADER_VALID = 0x4
    TLP_PREFIX_PRESENT = 0x8


@dataclass
class PCIEAERErr:
    """One error to inject (QEMU's ``PCIEAERErr``): *status* one status bit, *source_id* the
    requester id (bus << 8 | devfn; filled from the function when 0), the header log dwords."""

    status: int
    flags: AerErrFlag = AerErrFlag(0)
    source_id: int = 0
    header: tuple[int, int, int, int] = (0, 0, 0, 0)
    prefix: tuple[int, int, int, int] = (0, 0, 0, 0)

    @property
    def correctable(self) -> bool:
        return bool(self.flags & AerErrFlag.IS_CORRECTABLE)


class AerParseError(ValueError):
    """A bad error_status argument (the text is QEMU's message)."""


#: what ``strtoul(text, &end, 0)`` reads whole (``qemu_strtoui`` with no end pointer): C's
#: white space, one sign, then 0x + hex digits, 0 + octal digits, or decimal digits -- ASCII only
_STRTOUL_WHOLE = re.compile(r"[ \t\n\v\f\r]*[+-]?(0[xX][0-9a-fA-F]+|0[0-7]*|[1-9][0-9]*)", re.ASCII)


def parse_error_status(text: str, *, strict: bool = True) -> tuple[int, bool]:
    """``pcie_aer_parse_error_string`` and the numeric fallback of the HMP command: a name of
    ``AER_ERROR_NAMES`` (exact, case-sensitive) -> (bit, correctable); else a number as
    ``qemu_strtoui(text, NULL, 0)`` reads it (0x.. hex, 0.. octal, decimal; a leading minus
    negates in 32 bits, as strtoul does) -> (value, False); else ``AerParseError`` with QEMU's text.

    *strict* (the default) accepts only what strtoul reads whole; off, Python's ``int`` decides the
    digits and also takes what C does not (``1_000``, ``0o17``, ``0x0x10``, ``0x 5``, ``16 ``,
    non-ASCII digits) -- kept only so that a test can show the difference."""
    hit = AER_ERROR_NAMES.get(text)
    if hit is not None:
        return hit
    try:
        if strict and not _STRTOUL_WHOLE.fullmatch(text):
            raise ValueError
        s = text.lstrip(" \t\n\v\f\r")
        neg = s.startswith("-")
        if s[:1] in "+-" and s:
            s = s[1:]
        if not s or s[0] in "+- ":
            raise ValueError
        if s.lower().startswith("0x") and len(s) > 2:
            v = int(s[2:], 16)
        elif s.startswith("0"):
            v = int(s, 8)
        else:
            v = int(s, 10)
        if v >> 32:
            raise ValueError
    except ValueError:
        raise AerParseError(f"invalid error status value '{text}'") from None
    return (-v if neg else v) & 0xFFFFFFFF, False


@dataclass
class AerMessage:
    """An error message on its way to the root port."""

    severity: AerSeverity
    source_id: int


@dataclass
class _Log:
    header: tuple[int, int, int, int]
    status: int


RootPortNotify = Callable[[AerMessage], None]


@dataclass
class AerCounters:
    injected: int = 0
    messages_sent: int = 0
    messages_blocked: int = 0
    received: dict[str, int] = field(default_factory=lambda: {s.value: 0 for s in AerSeverity})
    interrupts: int = 0


class AERCap:
    """The AER extended capability of *dev* (which must have the PCIe capability).  *root_port*:
    the Root Error Command/Status and Error Source registers are live and ``notify`` is called
    when a received message must raise the port's AER interrupt.

    *header_log_locked*: the First Error Pointer and the Header Log keep the first unmasked
    uncorrectable error while its status bit is set, a repeat of the same error included (off: a
    repeat overwrites them).  *advisory_honours_mask*: an advisory non-fatal error whose
    uncorrectable bit is masked in the Uncorrectable Error Mask is not logged, as QEMU's
    ``pcie_aer_inject_cor_error`` (off: it is).  *devsta_rw1c*: the Device Status error bits this
    capability sets (CED, NFED, FED, URD) are RW1C for software and cleared by a reset, as the PCIe
    spec has them (off: software could never clear them and they survived resets).  These are
    fixes, switchable only so that tests can show what breaks without them."""

    def __init__(self, dev: "PCIDevice", offset: int = AER_OFFSET, *, root_port: bool = False,
                 notify: RootPortNotify | None = None, next_cap: int = 0, header_log_locked: bool = True,
                 advisory_honours_mask: bool = True, devsta_rw1c: bool = True) -> None:
        if dev.config_size < 4096:
            raise ValueError(f"{dev.name}: AER needs a PCIe (4 KiB) configuration space")
        if offset < 0x100 or offset + PCI_ERR_SIZEOF > 4096 or offset % 4:
            raise ValueError(f"{dev.name}: bad AER capability offset {offset:#x}")
        self.dev = dev
        self.offset = offset
        self.root_port = root_port
        self.notify = notify
        self.header_log_locked = header_log_locked
        self.advisory_honours_mask = advisory_honours_mask
        self.devsta_rw1c = devsta_rw1c
        self.counters = AerCounters()
        self.history: list[dict] = []
        dev.set_config(offset, PCI_EXT_CAP_ID_ERR | 2 << 16 | (next_cap & 0xFFC) << 20, 4)
        self._init_registers()
        dev.aer = self

    def _init_registers(self) -> None:
        o, d = self.offset, self.dev
        if self.devsta_rw1c and d.exp_cap:
            bits = PCI_EXP_DEVSTA_CED | PCI_EXP_DEVSTA_NFED | PCI_EXP_DEVSTA_FED | PCI_EXP_DEVSTA_URD
            sta = d.get16(d.exp_cap + R.PCI_EXP_DEVSTA)
            w1c = struct.unpack_from("<H", d.w1cmask, d.exp_cap + R.PCI_EXP_DEVSTA)[0]
            d.set_config(d.exp_cap + R.PCI_EXP_DEVSTA, sta & ~bits, 2, w1cmask=w1c | bits)
        d.set_config(o + PCI_ERR_UNCOR_STATUS, 0, 4, wmask=0, w1cmask=PCI_ERR_UNC_SUPPORTED)
        d.set_config(o + PCI_ERR_UNCOR_MASK, 0, 4, wmask=PCI_ERR_UNC_SUPPORTED)
        d.set_config(o + PCI_ERR_UNCOR_SEVER, PCI_ERR_UNC_SEVERITY_DEFAULT, 4, wmask=PCI_ERR_UNC_SUPPORTED)
        d.set_config(o + PCI_ERR_COR_STATUS, 0, 4, wmask=0, w1cmask=PCI_ERR_COR_SUPPORTED)
        d.set_config(o + PCI_ERR_COR_MASK, PCI_ERR_COR_MASK_DEFAULT, 4, wmask=PCI_ERR_COR_SUPPORTED)
        d.set_config(o + PCI_ERR_CAP, PCI_ERR_CAP_ECRC_GENC | PCI_ERR_CAP_ECRC_CHKC, 4,
                     wmask=PCI_ERR_CAP_ECRC_GENE | PCI_ERR_CAP_ECRC_CHKE)
        for i in range(4):
            d.set_config(o + PCI_ERR_HEADER_LOG + 4 * i, 0, 4, wmask=0)
            d.set_config(o + PCI_ERR_TLP_PREFIX_LOG + 4 * i, 0, 4, wmask=0)
        if self.root_port:
            d.set_config(o + PCI_ERR_ROOT_COMMAND, 0, 4, wmask=PCI_ERR_ROOT_CMD_COR_EN | PCI_ERR_ROOT_CMD_NONFATAL_EN
                         | PCI_ERR_ROOT_CMD_FATAL_EN)
            d.set_config(o + PCI_ERR_ROOT_STATUS, 0, 4, wmask=0, w1cmask=0x7F)
            d.set_config(o + PCI_ERR_ROOT_ERR_SRC, 0, 4, wmask=0)

    def reset(self) -> None:
        """A conventional reset: the sticky bits would survive a hot reset on real hardware, but
        the status a recovery clears is the point here -- registers go back to their defaults."""
        self._init_registers()

    # -- registers ---------------------------------------------------------------------------------
    def get(self, reg: int) -> int:
        return self.dev.get32(self.offset + reg)

    def _set(self, reg: int, v: int) -> None:
        struct.pack_into("<I", self.dev.config, self.offset + reg, v & 0xFFFFFFFF)

    @property
    def uncor_status(self) -> int:
        return self.get(PCI_ERR_UNCOR_STATUS)

    @property
    def cor_status(self) -> int:
        return self.get(PCI_ERR_COR_STATUS)

    @property
    def severity(self) -> int:
        return self.get(PCI_ERR_UNCOR_SEVER)

    def header_log(self) -> tuple[int, int, int, int]:
        return tuple(self.get(PCI_ERR_HEADER_LOG + 4 * i) for i in range(4))  # type: ignore[return-value]

    def severity_of(self, status: int) -> AerSeverity:
        """The class an uncorrectable *status* bit reports as, by the severity register."""
        return AerSeverity.FATAL if status & self.severity else AerSeverity.NONFATAL

    def clear_status(self) -> None:
        """What a recovery's end does (``pci_aer_clear_nonfatal_status`` and the fatal/correctable
        ones): every status bit cleared, the device status detected bits too."""
        self._set(PCI_ERR_UNCOR_STATUS, 0)
        self._set(PCI_ERR_COR_STATUS, 0)
        self._set(PCI_ERR_CAP, self.get(PCI_ERR_CAP) & ~PCI_ERR_CAP_FEP_MASK)
        exp = self.dev.exp_cap
        if exp:
            sta = self.dev.get16(exp + R.PCI_EXP_DEVSTA)
            struct.pack_into("<H", self.dev.config, exp + R.PCI_EXP_DEVSTA,
                             sta & ~(PCI_EXP_DEVSTA_CED | PCI_EXP_DEVSTA_NFED | PCI_EXP_DEVSTA_FED | PCI_EXP_DEVSTA_URD))

    # -- injection (pcie_aer_inject_error) ---------------------------------------------------------------
    def inject(self, err: PCIEAERErr) -> int:
        """Inject *err*; 0, or -errno as QEMU's ``pcie_aer_inject_error``.  The message, if one is
        sent, is delivered before this returns."""
        d = self.dev
        if not d.exp_cap:
            return -errno.ENOSYS
        status = err.status & (PCI_ERR_COR_SUPPORTED if err.correctable else PCI_ERR_UNC_SUPPORTED)
        if not status or status & (status - 1):
            return -errno.EINVAL
        source = err.source_id or d.requester_id()
        self.counters.injected += 1
        devctl = d.get16(d.exp_cap + R.PCI_EXP_DEVCTL)
        sev: AerSeverity
        if err.correctable:
            sev = AerSeverity.CORRECTABLE
            send = self._record_cor(status, devctl)
        else:
            sev = self.severity_of(status)
            if sev is AerSeverity.NONFATAL and err.flags & AerErrFlag.MAYBE_ADVISORY:
                # advisory non-fatal: the uncorrectable status, reported as a correctable error
                if not (self.advisory_honours_mask and self.get(PCI_ERR_UNCOR_MASK) & status):
                    self._log_header(status, err)
                self._set(PCI_ERR_UNCOR_STATUS, self.uncor_status | status)
                sev = AerSeverity.CORRECTABLE
                send = self._record_cor(COR.ADV_NONFATAL, devctl)
            else:
                send = self._record_uncor(status, sev, err, devctl)
        entry = {"status": status, "severity": sev.value, "source-id": source, "message": send}
        self.history.append(entry)
        del self.history[:-32]
        _t_inject.emit(dev=d.name, status=hex(status), severity=sev.value, message=send)
        if send:
            d.aer_send(AerMessage(sev, source))
        return 0

    def _devsta_or(self, bits: int) -> None:
        d = self.dev
        off = d.exp_cap + R.PCI_EXP_DEVSTA
        struct.pack_into("<H", d.config, off, d.get16(off) | bits)

    def _record_cor(self, status: int, devctl: int) -> bool:
        self._devsta_or(PCI_EXP_DEVSTA_CED)
        self._set(PCI_ERR_COR_STATUS, self.cor_status | status)
        if self.get(PCI_ERR_COR_MASK) & status:
            return False
        return bool(devctl & PCI_EXP_DEVCTL_CERE)

    def _log_header(self, status: int, err: PCIEAERErr) -> None:
        cap = self.get(PCI_ERR_CAP)
        fep = cap & PCI_ERR_CAP_FEP_MASK
        if fep and self.uncor_status & (1 << fep) and (self.header_log_locked or (1 << fep) != status):
            return  # an earlier error is still logged (no multi-header recording)
        self._set(PCI_ERR_CAP, (cap & ~PCI_ERR_CAP_FEP_MASK) | (status.bit_length() - 1))
        for i, h in enumerate(err.header):
            self._set(PCI_ERR_HEADER_LOG + 4 * i, h)
        if err.flags & AerErrFlag.TLP_PREFIX_PRESENT:
            for i, p in enumerate(err.prefix):
                self._set(PCI_ERR_TLP_PREFIX_LOG + 4 * i, p)

    def _record_uncor(self, status: int, sev: AerSeverity, err: PCIEAERErr, devctl: int) -> bool:
        self._devsta_or(PCI_EXP_DEVSTA_FED if sev is AerSeverity.FATAL else PCI_EXP_DEVSTA_NFED)
        if status == UNC.UNSUP:
            self._devsta_or(PCI_EXP_DEVSTA_URD)
        masked = bool(self.get(PCI_ERR_UNCOR_MASK) & status)
        if not masked:
            self._log_header(status, err)
        self._set(PCI_ERR_UNCOR_STATUS, self.uncor_status | status)
        if masked:
            return False
        if self.dev.get16(R.PCI_COMMAND) & R.PCI_COMMAND_SERR:
            return True
        if status == UNC.UNSUP and not devctl & PCI_EXP_DEVCTL_URRE:
            return False
        return bool(devctl & (PCI_EXP_DEVCTL_FERE if sev is AerSeverity.FATAL else PCI_EXP_DEVCTL_NFERE))

    # -- root port (pcie_aer_msg_root_port) ------------------------------------------------------------------
    def root_receive(self, msg: AerMessage) -> bool:
        """A message reached this root port: Root Error Status and Error Source updated; True when
        the port raised its AER interrupt (``notify``)."""
        if not self.root_port:
            raise ValueError(f"{self.dev.name} is not a root port")
        st = self.get(PCI_ERR_ROOT_STATUS)
        cmd = self.get(PCI_ERR_ROOT_COMMAND)
        src = self.get(PCI_ERR_ROOT_ERR_SRC)
        self.counters.received[msg.severity.value] += 1
        fire = False
        if msg.severity is AerSeverity.CORRECTABLE:
            if st & PCI_ERR_ROOT_COR_RCV:
                st |= PCI_ERR_ROOT_MULTI_COR_RCV
            else:
                src = (src & 0xFFFF0000) | msg.source_id
                fire = bool(cmd & PCI_ERR_ROOT_CMD_COR_EN)
            st |= PCI_ERR_ROOT_COR_RCV
        else:
            fatal = msg.severity is AerSeverity.FATAL
            if fatal and not st & PCI_ERR_ROOT_FATAL_RCV and not st & PCI_ERR_ROOT_UNCOR_RCV:
                st |= PCI_ERR_ROOT_FIRST_FATAL
            st |= PCI_ERR_ROOT_FATAL_RCV if fatal else PCI_ERR_ROOT_NONFATAL_RCV
            if st & PCI_ERR_ROOT_UNCOR_RCV:
                st |= PCI_ERR_ROOT_MULTI_UNCOR_RCV
            else:
                src = (src & 0xFFFF) | msg.source_id << 16
                fire = bool(cmd & (PCI_ERR_ROOT_CMD_FATAL_EN if fatal else PCI_ERR_ROOT_CMD_NONFATAL_EN))
            st |= PCI_ERR_ROOT_UNCOR_RCV
        self._set(PCI_ERR_ROOT_STATUS, st)
        self._set(PCI_ERR_ROOT_ERR_SRC, src)
        _t_root.emit(port=self.dev.name, severity=msg.severity.value, source=hex(msg.source_id), interrupt=fire)
        if fire:
            self.counters.interrupts += 1
            if self.notify is not None:
                self.notify(msg)
        return fire

    # -- view ------------------------------------------------------------------------------------------------
    def describe(self) -> dict:
        out: dict = {
            "offset": self.offset,
            "uncor-status": self.uncor_status, "uncor-mask": self.get(PCI_ERR_UNCOR_MASK),
            "uncor-severity": self.severity, "cor-status": self.cor_status, "cor-mask": self.get(PCI_ERR_COR_MASK),
            "first-error-pointer": self.get(PCI_ERR_CAP) & PCI_ERR_CAP_FEP_MASK,
            "header-log": [f"{h:08x}" for h in self.header_log()],
            "injected": self.counters.injected, "history": list(self.history),
        }
        if self.root_port:
            out.update({"root-command": self.get(PCI_ERR_ROOT_COMMAND), "root-status": self.get(PCI_ERR_ROOT_STATUS),
                        "error-source": self.get(PCI_ERR_ROOT_ERR_SRC), "received": dict(self.counters.received),
                        "interrupts": self.counters.interrupts})
        return out


def decode_status(status: int, correctable: bool) -> list[str]:
    """The names of the bits set in *status*."""
    flags = COR if correctable else UNC
    return [m.name for m in flags if m.name and status & m.value]
