"""PCIe AER: the extended capability's registers, ``AERCap.inject`` (QEMU's ``pcie_aer_inject_error``),
the error message climbing bridges to a Root Port and its interrupt, bridges (bus numbers, config
routing, the ECAM window, Secondary Bus Reset, INTx swizzling), Linux's ``merge_result`` and
``parse_error_status`` (QEMU's names and ``qemu_strtoui``).

Unit tests: no processes, no machine.  Register values are QEMU's (``include/hw/pci/pcie_regs.h``)
and Linux's (``include/uapi/linux/pci_regs.h``), written out here as numbers so that a wrong
constant in ``kickcall.pci.aer`` fails a test instead of agreeing with itself.
"""

from __future__ import annotations

import errno
import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from kickcall.memory import AddressSpace
from kickcall.pci import PCIBus, PCIDevice, PCIHost
from kickcall.pci import regs as R
from kickcall.pci.aer import (AERCap, AerErrFlag, AerMessage, AerParseError, AerSeverity, PCIEAERErr,
                              parse_error_status)
from kickcall.pci.bridge import PCIBridge, PCIERootPort
from kickcall.pci.recovery import PciErsResult, merge_result

# -- the numbers, from QEMU / Linux ------------------------------------------------------------------------
A = 0x100  # the AER capability's offset
UNCOR_STATUS, UNCOR_MASK, UNCOR_SEVER = A + 0x04, A + 0x08, A + 0x0C
COR_STATUS, COR_MASK, ERR_CAP, HEADER_LOG = A + 0x10, A + 0x14, A + 0x18, A + 0x1C
ROOT_COMMAND, ROOT_STATUS, ERR_SRC = A + 0x2C, A + 0x30, A + 0x34
UNC_SUPPORTED, COR_SUPPORTED = 0x03FFF030, 0x0000F1C1
SEVERITY_DEFAULT, COR_MASK_DEFAULT = 0x00462030, 0x0000E000

DLP, POISON_TLP, MALF_TLP, ECRC, UNSUP = 0x10, 0x1000, 0x40000, 0x80000, 0x100000
RCVR, BAD_TLP, ADV_NONFATAL, INTERNAL = 0x1, 0x40, 0x2000, 0x4000

CERE, NFERE, FERE, URRE = 0x1, 0x2, 0x4, 0x8  # Device Control
CED, NFED, FED, URD = 0x1, 0x2, 0x4, 0x8  # Device Status
COR_EN, NONFATAL_EN, FATAL_EN = 0x1, 0x2, 0x4  # Root Error Command
COR_RCV, MULTI_COR_RCV, UNCOR_RCV, MULTI_UNCOR_RCV = 0x01, 0x02, 0x04, 0x08  # Root Error Status
FIRST_FATAL, NONFATAL_RCV, FATAL_RCV = 0x10, 0x20, 0x40
SERR = 0x100  # PCI_COMMAND_SERR
BCTL_SERR, BCTL_BUS_RESET = 0x02, 0x40
SEC_STATUS_RCV_SYSTEM_ERROR = 0x4000

COR_F = AerErrFlag.IS_CORRECTABLE
ADV_F = AerErrFlag.MAYBE_ADVISORY
HDR_F = AerErrFlag.HEADER_VALID

QEMU_NAMES = {  # pcie_aer_error_list: name -> (value, correctable)
    "DLP": (0x00000010, False), "SDN": (0x00000020, False), "POISON_TLP": (0x00001000, False),
    "FCP": (0x00002000, False), "COMP_TIME": (0x00004000, False), "COMP_ABORT": (0x00008000, False),
    "UNX_COMP": (0x00010000, False), "RX_OVER": (0x00020000, False), "MALF_TLP": (0x00040000, False),
    "ECRC": (0x00080000, False), "UNSUP": (0x00100000, False), "ACSV": (0x00200000, False),
    "INTN": (0x00400000, False), "MCBTLP": (0x00800000, False), "ATOP_EBLOCKED": (0x01000000, False),
    "TLP_PRF_BLOCKED": (0x02000000, False),
    "RCVR": (0x00000001, True), "BAD_TLP": (0x00000040, True), "BAD_DLLP": (0x00000080, True),
    "REP_ROLL": (0x00000100, True), "REP_TIMER": (0x00001000, True), "ADV_NONFATAL": (0x00002000, True),
    "INTERNAL": (0x00004000, True), "HL_OVERFLOW": (0x00008000, True),
}

MSI_ADDR, MSI_DATA = 0xFEE00000, 0x4041
PORT_BAR0 = 0xFE100000


class Endpoint(PCIDevice):
    """A PCIe endpoint with AER that counts its resets."""

    def __init__(self, name: str, *, aer: bool = True, pin: int = 1) -> None:
        super().__init__(name, vendor_id=0x1AF4, device_id=0x1042, class_code=0x020000, pcie=True,
                         interrupt_pin=pin)
        if aer:
            self.add_aer_cap()

    # register helpers (the guest's view: config_write with its masks)
    def w(self, off: int, value: int, size: int = 4) -> None:
        self.config_write(off, value, size)

    def r(self, off: int, size: int = 4) -> int:
        return self.config_read(off, size)

    def devctl(self, v: int) -> None:
        self.w(self.exp_cap + R.PCI_EXP_DEVCTL, v, 2)

    def devsta(self) -> int:
        return self.r(self.exp_cap + R.PCI_EXP_DEVSTA, 2)


class Rig:
    """Bus 0 with a host bridge (CF8/CFC and ECAM), recording INTx lines and MSIs."""

    def __init__(self) -> None:
        self.memory = AddressSpace("memory")
        self.io = AddressSpace("io")
        self.lines: list[tuple[int, int]] = []
        self.msis: list[tuple[int, int]] = []
        self.bus = PCIBus(self.memory, self.io, irq_line=lambda g, lv: self.lines.append((g, lv)),
                          msi_sink=lambda a, d: self.msis.append((a, d)))
        self.host = PCIHost(self.bus)

    def port(self, name: str = "rp0", slot: int = 1, secondary: int = 1, *, msix: bool = True,
             serr: bool = True, root_cmd: int = COR_EN | NONFATAL_EN | FATAL_EN) -> PCIERootPort:
        p = PCIERootPort(name, self.memory, self.io, secondary=secondary, msix=msix)
        self.bus.add_device(p, slot)
        if serr:
            p.config_write(R.PCI_BRIDGE_CONTROL, BCTL_SERR, 2)
        p.config_write(ROOT_COMMAND, root_cmd, 4)
        return p

    def endpoint(self, name: str = "ep", bus: PCIBus | None = None, slot: int = 0, fn: int = 0, *,
                 devctl: int = CERE | NFERE | FERE | URRE, **kw) -> Endpoint:
        d = Endpoint(name, **kw)
        (bus or self.bus).add_device(d, slot, fn)
        d.devctl(devctl)
        return d


def aer(d: PCIDevice) -> AERCap:
    assert d.aer is not None
    return d.aer


def inject(d: PCIDevice, status: int, flags: AerErrFlag = AerErrFlag(0), header=(0, 0, 0, 0)) -> int:
    return aer(d).inject(PCIEAERErr(status, flags, header=header))


@pytest.fixture
def rig() -> Rig:
    return Rig()


@pytest.fixture
def topo(rig: Rig):
    """A root port at 00:01.0 with bus 1 behind it, an endpoint at 01:00.0 (requester id 0x0100)."""
    port = rig.port()
    ep = rig.endpoint(bus=port.secondary_bus)
    return rig, port, ep


# =========================================================================================================
# the capability's registers
# =========================================================================================================
def test_capability_header_and_defaults():
    d = Endpoint("ep")
    hdr = d.r(A)
    assert hdr & 0xFFFF == 0x0001 and (hdr >> 16) & 0xF == 2  # PCI_EXT_CAP_ID_ERR, version 2
    assert d.r(UNCOR_SEVER) == SEVERITY_DEFAULT
    assert d.r(COR_MASK) == COR_MASK_DEFAULT
    assert d.r(UNCOR_MASK) == 0 and d.r(UNCOR_STATUS) == 0 and d.r(COR_STATUS) == 0
    assert [d.r(HEADER_LOG + 4 * i) for i in range(4)] == [0, 0, 0, 0]


def test_status_registers_are_rw1c():
    d = Endpoint("ep")
    d.w(UNCOR_STATUS, 0xFFFFFFFF)
    d.w(COR_STATUS, 0xFFFFFFFF)
    assert d.r(UNCOR_STATUS) == 0 and d.r(COR_STATUS) == 0, "software can never set a status bit"
    assert inject(d, POISON_TLP) == 0 and inject(d, ECRC) == 0
    assert inject(d, RCVR, COR_F) == 0 and inject(d, BAD_TLP, COR_F) == 0
    assert d.r(UNCOR_STATUS) == POISON_TLP | ECRC and d.r(COR_STATUS) == RCVR | BAD_TLP
    d.w(UNCOR_STATUS, 0)
    d.w(COR_STATUS, 0)
    assert d.r(UNCOR_STATUS) == POISON_TLP | ECRC and d.r(COR_STATUS) == RCVR | BAD_TLP, "writing 0 changes nothing"
    d.w(UNCOR_STATUS, POISON_TLP)
    d.w(COR_STATUS, BAD_TLP)
    assert d.r(UNCOR_STATUS) == ECRC and d.r(COR_STATUS) == RCVR, "writing 1 clears exactly that bit"
    d.w(UNCOR_STATUS + 2, ECRC >> 16, 2)  # a 16-bit write of the upper half
    assert d.r(UNCOR_STATUS) == 0


def test_mask_and_severity_registers_are_writable_within_the_supported_bits():
    d = Endpoint("ep")
    for reg, supported in ((UNCOR_MASK, UNC_SUPPORTED), (UNCOR_SEVER, UNC_SUPPORTED), (COR_MASK, COR_SUPPORTED)):
        d.w(reg, 0xFFFFFFFF)
        assert d.r(reg) == supported, hex(reg)
        d.w(reg, 0)
        assert d.r(reg) == 0, hex(reg)
    d.w(UNCOR_SEVER, POISON_TLP)
    assert d.r(UNCOR_SEVER) == POISON_TLP


def test_header_log_and_root_registers_are_read_only_where_they_should_be():
    d = Endpoint("ep")
    assert inject(d, POISON_TLP, HDR_F, header=(0x11, 0x22, 0x33, 0x44)) == 0
    for i in range(4):
        d.w(HEADER_LOG + 4 * i, 0xDEADBEEF)
    assert [d.r(HEADER_LOG + 4 * i) for i in range(4)] == [0x11, 0x22, 0x33, 0x44]
    fep = d.r(ERR_CAP) & 0x1F
    d.w(ERR_CAP, 0x1F)
    assert d.r(ERR_CAP) & 0x1F == fep == 12, "the First Error Pointer is read-only"
    # an endpoint has no root registers: they do not take writes
    d.w(ROOT_COMMAND, 0x7)
    assert d.r(ROOT_COMMAND) == 0


def test_root_port_registers(rig: Rig):
    p = rig.port(root_cmd=0)
    p.config_write(ROOT_COMMAND, 0xFFFFFFFF, 4)
    assert p.config_read(ROOT_COMMAND, 4) == COR_EN | NONFATAL_EN | FATAL_EN
    p.config_write(ROOT_STATUS, 0xFFFFFFFF, 4)
    assert p.config_read(ROOT_STATUS, 4) == 0, "Root Error Status cannot be set by software"
    p.config_write(ERR_SRC, 0xFFFFFFFF, 4)
    assert p.config_read(ERR_SRC, 4) == 0, "Error Source Identification is read-only"


# =========================================================================================================
# inject(): the checks
# =========================================================================================================
@pytest.mark.parametrize("status,flags", [
    (0x3, AerErrFlag(0)),  # no supported uncorrectable bit in it
    (0, AerErrFlag(0)),
    (0x1, AerErrFlag(0)),  # Undefined (QEMU's old TRAIN): not supported
    (POISON_TLP | ECRC, AerErrFlag(0)),  # two bits
    (0xFFFFFFFF, AerErrFlag(0)),
    (0x2, COR_F),  # bit 1 is not a correctable error
    (POISON_TLP, COR_F | ADV_F),  # 0x1000 is REP_TIMER when correctable: this one is accepted ...
])
def test_inject_einval_unless_exactly_one_supported_bit(status, flags):
    if status == POISON_TLP:
        status = POISON_TLP | RCVR  # ... so make it two correctable bits
    d = Endpoint("ep")
    before = bytes(d.config)
    assert inject(d, status, flags) == -errno.EINVAL
    assert bytes(d.config) == before, "a refused injection changes no register"
    assert aer(d).history == [] and aer(d).counters.injected == 0


def test_inject_masks_before_the_one_bit_check():
    d = Endpoint("ep")
    d.devctl(NFERE)
    assert inject(d, UNSUP | 0x1) == 0, "0x00100001: the unsupported bit 0 is dropped, UNSUP remains"
    assert d.r(UNCOR_STATUS) == UNSUP
    assert d.devsta() & URD, "it is an Unsupported Request"
    assert inject(d, 0x3, COR_F) == 0, "correctable 0x3 -> RCVR (bit 1 is not supported)"
    assert d.r(COR_STATUS) == RCVR


def test_inject_enosys_without_the_pcie_capability():
    d = Endpoint("ep")
    d.exp_cap = 0  # what QEMU's pci_is_express() tests: no PCI Express capability
    assert inject(d, POISON_TLP) == -errno.ENOSYS
    assert d.r(UNCOR_STATUS) == 0


# =========================================================================================================
# inject(): what it records
# =========================================================================================================
def test_correctable_error(topo):
    rig, port, ep = topo
    assert inject(ep, BAD_TLP, COR_F) == 0
    assert ep.r(COR_STATUS) == BAD_TLP and ep.r(UNCOR_STATUS) == 0
    assert ep.devsta() == CED
    assert ep.r(ERR_CAP) & 0x1F == 0, "a correctable error has no First Error Pointer"
    assert aer(port).counters.received == {"correctable": 1, "non-fatal": 0, "fatal": 0}


@pytest.mark.parametrize("status,devsta,sev", [
    (POISON_TLP, NFED, "non-fatal"), (DLP, FED, "fatal"), (UNSUP, NFED | URD, "non-fatal"), (ECRC, NFED, "non-fatal"),
])
def test_uncorrectable_error_by_default_severity(topo, status, devsta, sev):
    rig, port, ep = topo
    assert inject(ep, status) == 0
    assert ep.r(UNCOR_STATUS) == status and ep.r(COR_STATUS) == 0
    assert ep.devsta() == devsta
    assert aer(port).counters.received[sev] == 1 and sum(aer(port).counters.received.values()) == 1
    assert aer(ep).history[-1]["severity"] == sev


def test_the_severity_register_decides_fatal_or_not(topo):
    rig, port, ep = topo
    ep.w(UNCOR_SEVER, POISON_TLP)  # POISON_TLP fatal, DLP (fatal by default) non-fatal
    assert inject(ep, POISON_TLP) == 0
    assert ep.devsta() & FED and not ep.devsta() & NFED
    assert aer(port).counters.received["fatal"] == 1
    assert inject(ep, DLP) == 0
    assert ep.devsta() & NFED
    assert aer(port).counters.received["non-fatal"] == 1


def test_a_masked_error_sets_its_status_only(topo):
    rig, port, ep = topo
    ep.w(UNCOR_MASK, POISON_TLP)
    ep.w(R.PCI_COMMAND, SERR, 2)
    assert inject(ep, POISON_TLP, HDR_F, header=(1, 2, 3, 4)) == 0
    assert ep.r(UNCOR_STATUS) == POISON_TLP
    assert ep.r(ERR_CAP) & 0x1F == 0 and [ep.r(HEADER_LOG + 4 * i) for i in range(4)] == [0] * 4, \
        "a masked error is not logged"
    assert aer(ep).history[-1]["message"] is False
    assert sum(aer(port).counters.received.values()) == 0 and ep.aer_messages_dropped == 0, "no message at all"
    # INTERNAL is masked by default in the correctable mask
    assert inject(ep, INTERNAL, COR_F) == 0
    assert ep.r(COR_STATUS) == INTERNAL and sum(aer(port).counters.received.values()) == 0
    # unmasked, the same error is reported
    ep.w(COR_MASK, 0)
    assert inject(ep, INTERNAL, COR_F) == 0
    assert aer(port).counters.received["correctable"] == 1


def test_first_error_pointer_and_header_log_only_for_the_first_unmasked_error():
    d = Endpoint("ep")
    assert inject(d, POISON_TLP, HDR_F, header=(0xA1, 0xA2, 0xA3, 0xA4)) == 0
    assert d.r(ERR_CAP) & 0x1F == 12  # POISON_TLP is bit 12
    assert [d.r(HEADER_LOG + 4 * i) for i in range(4)] == [0xA1, 0xA2, 0xA3, 0xA4]
    # a second, different error while the first is still logged: status only
    assert inject(d, ECRC, HDR_F, header=(0xB1, 0xB2, 0xB3, 0xB4)) == 0
    assert d.r(UNCOR_STATUS) == POISON_TLP | ECRC
    assert d.r(ERR_CAP) & 0x1F == 12 and [d.r(HEADER_LOG + 4 * i) for i in range(4)] == [0xA1, 0xA2, 0xA3, 0xA4]
    # software clears the logged error's status: the next error is logged
    d.w(UNCOR_STATUS, POISON_TLP)
    assert inject(d, DLP, HDR_F, header=(0xD1, 0xD2, 0xD3, 0xD4)) == 0
    assert d.r(ERR_CAP) & 0x1F == 4
    assert [d.r(HEADER_LOG + 4 * i) for i in range(4)] == [0xD1, 0xD2, 0xD3, 0xD4]


@pytest.mark.parametrize("locked", [True, False])
def test_a_repeat_of_the_logged_error_does_not_overwrite_the_header_log(locked):
    d = Endpoint("ep", aer=False)
    AERCap(d, header_log_locked=locked)
    assert inject(d, POISON_TLP, HDR_F, header=(0xA1, 0xA2, 0xA3, 0xA4)) == 0
    assert inject(d, POISON_TLP, HDR_F, header=(0xC1, 0xC2, 0xC3, 0xC4)) == 0
    log = [d.r(HEADER_LOG + 4 * i) for i in range(4)]
    if locked:
        assert log == [0xA1, 0xA2, 0xA3, 0xA4], \
            "the header log is locked while the status bit the First Error Pointer names is set"
    else:
        assert log == [0xC1, 0xC2, 0xC3, 0xC4]  # the bug: the first occurrence's header is lost


def test_advisory_non_fatal(topo):
    rig, port, ep = topo
    assert inject(ep, POISON_TLP, ADV_F) == 0
    assert ep.r(UNCOR_STATUS) == POISON_TLP, "the uncorrectable status is set"
    assert ep.r(COR_STATUS) == ADV_NONFATAL
    assert ep.devsta() == CED, "reported as a correctable error, not a non-fatal one"
    assert aer(ep).history[-1]["severity"] == "correctable"
    assert sum(aer(port).counters.received.values()) == 0, "ADV_NONFATAL is masked by default"
    ep.w(COR_MASK, 0)
    assert inject(ep, ECRC, ADV_F) == 0
    assert aer(port).counters.received == {"correctable": 1, "non-fatal": 0, "fatal": 0}
    # a fatal error is never advisory
    assert inject(ep, DLP, ADV_F) == 0
    assert ep.devsta() & FED and aer(port).counters.received["fatal"] == 1


@pytest.mark.parametrize("honours", [True, False])
def test_advisory_non_fatal_masked_uncorrectable_is_not_logged(honours):
    """QEMU's pcie_aer_inject_cor_error: the advisory error's header is recorded only when the
    uncorrectable error is not masked in the Uncorrectable Error Mask."""
    d = Endpoint("ep", aer=False)
    AERCap(d, advisory_honours_mask=honours)
    d.w(COR_MASK, 0)
    d.w(UNCOR_MASK, POISON_TLP)
    assert inject(d, POISON_TLP, ADV_F | HDR_F, header=(9, 9, 9, 9)) == 0
    assert d.r(UNCOR_STATUS) == POISON_TLP and d.r(COR_STATUS) == ADV_NONFATAL
    logged = (d.r(ERR_CAP) & 0x1F, [d.r(HEADER_LOG + 4 * i) for i in range(4)])
    assert logged == ((0, [0] * 4) if honours else (12, [9] * 4))
    # unmasked, the advisory error is logged
    d.w(UNCOR_MASK, 0)
    d.w(UNCOR_STATUS, POISON_TLP)
    assert inject(d, ECRC, ADV_F | HDR_F, header=(7, 7, 7, 7)) == 0
    assert d.r(ERR_CAP) & 0x1F == 19 and [d.r(HEADER_LOG + 4 * i) for i in range(4)] == [7] * 4


@pytest.mark.parametrize("rw1c", [True, False])
def test_device_status_error_bits_are_rw1c_and_reset(rw1c):
    d = Endpoint("ep", aer=False)
    AERCap(d, devsta_rw1c=rw1c)
    assert inject(d, UNSUP) == 0 and inject(d, RCVR, COR_F) == 0 and inject(d, DLP) == 0
    assert d.devsta() == CED | NFED | FED | URD
    d.w(d.exp_cap + R.PCI_EXP_DEVSTA, NFED | URD, 2)
    assert d.devsta() == (CED | FED if rw1c else CED | NFED | FED | URD), "software clears what it writes 1 to"
    d.w(d.exp_cap + R.PCI_EXP_DEVSTA, 0xFFFF, 2)
    assert d.devsta() == (0 if rw1c else CED | NFED | FED | URD), "and cannot set anything"
    inject(d, POISON_TLP)
    d.reset()
    assert (d.devsta() == 0) is rw1c, "a reset clears them"
    assert d.r(UNCOR_STATUS) == 0


# =========================================================================================================
# when a message is sent
# =========================================================================================================
@pytest.mark.parametrize("status,flags,cmd,devctl,sent", [
    (BAD_TLP, COR_F, 0, 0, False),
    (BAD_TLP, COR_F, SERR, 0, False),  # SERR is for uncorrectable errors only
    (BAD_TLP, COR_F, 0, CERE, True),
    (POISON_TLP, AerErrFlag(0), 0, 0, False),
    (POISON_TLP, AerErrFlag(0), 0, FERE | CERE, False),  # the non-fatal enable is what counts
    (POISON_TLP, AerErrFlag(0), 0, NFERE, True),
    (POISON_TLP, AerErrFlag(0), SERR, 0, True),
    (DLP, AerErrFlag(0), 0, NFERE, False),
    (DLP, AerErrFlag(0), 0, FERE, True),
    (DLP, AerErrFlag(0), SERR, 0, True),
    (UNSUP, AerErrFlag(0), 0, NFERE, False),  # an Unsupported Request also needs URRE ...
    (UNSUP, AerErrFlag(0), 0, NFERE | URRE, True),
    (UNSUP, AerErrFlag(0), SERR, 0, True),  # ... or SERR
])
def test_message_only_when_reporting_is_enabled(rig: Rig, status, flags, cmd, devctl, sent):
    port = rig.port()
    ep = rig.endpoint(bus=port.secondary_bus, devctl=devctl)
    ep.w(R.PCI_COMMAND, cmd, 2)
    assert inject(ep, status, flags) == 0
    assert aer(ep).history[-1]["message"] is sent
    assert (sum(aer(port).counters.received.values()) == 1) is sent
    assert (port.config_read(ROOT_STATUS, 4) != 0) is sent


def test_a_message_climbs_only_with_serr_forwarding(rig: Rig):
    port = rig.port(serr=False)
    ep = rig.endpoint(bus=port.secondary_bus)
    assert inject(ep, BAD_TLP, COR_F) == 0
    assert port.config_read(R.PCI_SEC_STATUS, 2) & SEC_STATUS_RCV_SYSTEM_ERROR == 0, \
        "a correctable message does not set Received System Error"
    assert inject(ep, POISON_TLP) == 0
    assert port.config_read(R.PCI_SEC_STATUS, 2) & SEC_STATUS_RCV_SYSTEM_ERROR, \
        "an uncorrectable message sets Received System Error even when not forwarded"
    assert port.config_read(ROOT_STATUS, 4) == 0 and sum(aer(port).counters.received.values()) == 0
    assert ep.aer_messages_dropped == 2 and aer(ep).counters.messages_blocked == 2
    # RW1C
    port.config_write(R.PCI_SEC_STATUS, SEC_STATUS_RCV_SYSTEM_ERROR, 2)
    assert port.config_read(R.PCI_SEC_STATUS, 2) & SEC_STATUS_RCV_SYSTEM_ERROR == 0
    # forwarding on: it arrives
    port.config_write(R.PCI_BRIDGE_CONTROL, BCTL_SERR, 2)
    ep.w(UNCOR_STATUS, POISON_TLP)
    assert inject(ep, POISON_TLP) == 0
    assert port.config_read(ROOT_STATUS, 4) == UNCOR_RCV | NONFATAL_RCV
    assert ep.aer_messages_dropped == 2


def test_a_message_climbs_two_bridges(rig: Rig):
    port = rig.port()
    br = PCIBridge("br", rig.memory, rig.io, secondary=2)
    port.secondary_bus.add_device(br, 0)
    port.config_write(R.PCI_SUBORDINATE_BUS, 2, 1)
    ep = rig.endpoint(bus=br.secondary_bus, slot=3)
    assert ep.requester_id() == 0x0218
    assert inject(ep, POISON_TLP) == 0
    assert port.config_read(ROOT_STATUS, 4) == 0 and ep.aer_messages_dropped == 1, "the inner bridge does not forward"
    assert br.config_read(R.PCI_SEC_STATUS, 2) & SEC_STATUS_RCV_SYSTEM_ERROR
    br.config_write(R.PCI_BRIDGE_CONTROL, BCTL_SERR, 2)
    assert inject(ep, DLP) == 0
    assert port.config_read(ROOT_STATUS, 4) == UNCOR_RCV | FATAL_RCV | FIRST_FATAL
    assert port.config_read(ERR_SRC, 4) >> 16 == 0x0218


def test_a_device_on_bus_0_has_no_root_port_to_reach(rig: Rig):
    ep = rig.endpoint(slot=4)
    assert inject(ep, POISON_TLP) == 0, "the injection itself succeeds"
    assert ep.aer_messages_dropped == 1
    assert ep.aer_send(AerMessage(AerSeverity.CORRECTABLE, ep.requester_id())) is False
    assert ep.aer_messages_dropped == 2


def test_root_error_status_and_error_source(rig: Rig):
    port = rig.port(root_cmd=0)
    f0 = rig.endpoint("f0", bus=port.secondary_bus, fn=0)
    f1 = rig.endpoint("f1", bus=port.secondary_bus, fn=1)
    assert (f0.requester_id(), f1.requester_id()) == (0x0100, 0x0101)

    def st() -> int:
        return port.config_read(ROOT_STATUS, 4) & 0x7F

    def src() -> tuple[int, int]:
        v = port.config_read(ERR_SRC, 4)
        return v & 0xFFFF, v >> 16

    inject(f1, BAD_TLP, COR_F)
    assert st() == COR_RCV and src() == (0x0101, 0)
    inject(f0, RCVR, COR_F)
    assert st() == COR_RCV | MULTI_COR_RCV and src() == (0x0101, 0), "the first ERR_COR's source is kept"
    inject(f0, POISON_TLP)
    assert st() == COR_RCV | MULTI_COR_RCV | UNCOR_RCV | NONFATAL_RCV and src() == (0x0101, 0x0100)
    inject(f1, DLP)
    assert st() == COR_RCV | MULTI_COR_RCV | UNCOR_RCV | NONFATAL_RCV | MULTI_UNCOR_RCV | FATAL_RCV, \
        "not the first uncorrectable: no FIRST_FATAL"
    assert src() == (0x0101, 0x0100)
    port.config_write(ROOT_STATUS, 0x7F, 4)
    assert st() == 0
    inject(f1, MALF_TLP)  # fatal by default
    assert st() == UNCOR_RCV | FATAL_RCV | FIRST_FATAL and src()[1] == 0x0101


def test_the_root_port_records_its_own_errors(rig: Rig):
    port = rig.port()
    port.config_write(port.exp_cap + R.PCI_EXP_DEVCTL, CERE | NFERE | FERE, 2)
    assert aer(port).inject(PCIEAERErr(POISON_TLP)) == 0
    assert port.config_read(UNCOR_STATUS, 4) == POISON_TLP
    assert port.config_read(ROOT_STATUS, 4) == UNCOR_RCV | NONFATAL_RCV
    assert port.config_read(ERR_SRC, 4) >> 16 == port.requester_id() == 0x0008


# =========================================================================================================
# the root port's AER interrupt
# =========================================================================================================
def _msix_program(rig: Rig, port: PCIERootPort) -> None:
    assert port.msix is not None
    port.config_write(R.PCI_BASE_ADDRESS_0, PORT_BAR0, 4)
    port.config_write(R.PCI_COMMAND, R.PCI_COMMAND_MEMORY | R.PCI_COMMAND_MASTER, 2)
    rig.memory.write(PORT_BAR0 + 0, MSI_ADDR, 4)
    rig.memory.write(PORT_BAR0 + 4, 0, 4)
    rig.memory.write(PORT_BAR0 + 8, MSI_DATA, 4)
    rig.memory.write(PORT_BAR0 + 12, 0, 4)  # unmask vector 0
    cap = port.msix.cap
    port.config_write(cap + R.PCI_MSIX_FLAGS, R.PCI_MSIX_FLAGS_ENABLE, 2)


def test_aer_interrupt_through_msix_vector_0(rig: Rig):
    port = rig.port(root_cmd=COR_EN)
    ep = rig.endpoint(bus=port.secondary_bus)
    _msix_program(rig, port)
    inject(ep, BAD_TLP, COR_F)
    assert rig.msis == [(MSI_ADDR, MSI_DATA)] and port.aer_interrupts == 1
    inject(ep, RCVR, COR_F)
    assert rig.msis == [(MSI_ADDR, MSI_DATA)], "not the first of its class: no second interrupt"
    inject(ep, POISON_TLP)
    assert len(rig.msis) == 1, "ERR_NONFATAL is not enabled in Root Error Command"
    assert port.config_read(ROOT_STATUS, 4) & NONFATAL_RCV
    port.config_write(ROOT_STATUS, 0x7F, 4)
    port.config_write(ROOT_COMMAND, COR_EN | NONFATAL_EN, 4)
    inject(ep, ECRC)
    assert rig.msis == [(MSI_ADDR, MSI_DATA)] * 2 and port.aer_interrupts == 2
    ep.w(UNCOR_STATUS, ECRC)
    inject(ep, ECRC)
    assert len(rig.msis) == 2, "UNCOR_RCV is still set: not the first uncorrectable"
    port.config_write(ROOT_STATUS, 0x7F, 4)
    inject(ep, ECRC)
    assert rig.msis == [(MSI_ADDR, MSI_DATA)] * 3 and port.aer_interrupts == 3
    assert rig.lines == [], "no INTx while MSI-X is enabled"


def test_aer_interrupt_through_intx_dropped_when_root_status_is_cleared(rig: Rig):
    port = rig.port(root_cmd=FATAL_EN, msix=False)
    ep = rig.endpoint(bus=port.secondary_bus)
    gsi = PCIBus.intx_gsi(1, 1)  # slot 1, INTA of the port on bus 0
    inject(ep, POISON_TLP)
    assert rig.lines == [], "non-fatal is not enabled"
    port.config_write(ROOT_STATUS, 0x7F, 4)
    inject(ep, DLP)
    assert rig.lines == [(gsi, 1)] and port.aer_interrupts == 1
    assert rig.msis == []
    port.config_write(ROOT_STATUS, COR_RCV, 4)  # clears nothing that is set
    assert rig.lines == [(gsi, 1)]
    port.config_write(ROOT_STATUS, 0x7F, 4)
    assert rig.lines == [(gsi, 1), (gsi, 0)]


@pytest.mark.parametrize("level", [True, False])
def test_intx_is_a_level_of_enabled_received_classes(rig: Rig, level: bool):
    """QEMU's pcie_aer_root_write_config in INTx mode: the line is (Root Error Command & the classes
    received in Root Error Status) after every write."""
    port = PCIERootPort("rp0", rig.memory, rig.io, secondary=1, msix=False, intx_follows_root_command=level)
    rig.bus.add_device(port, 1)
    port.config_write(R.PCI_BRIDGE_CONTROL, BCTL_SERR, 2)
    port.config_write(ROOT_COMMAND, FATAL_EN, 4)
    ep = rig.endpoint(bus=port.secondary_bus)
    gsi = PCIBus.intx_gsi(1, 1)
    inject(ep, BAD_TLP, COR_F)  # received, not enabled
    inject(ep, DLP)
    assert rig.lines == [(gsi, 1)]
    # the handler clears what it handled (the fatal bits); a correctable one it does not enable stays
    port.config_write(ROOT_STATUS, UNCOR_RCV | FATAL_RCV | FIRST_FATAL, 4)
    assert port.config_read(ROOT_STATUS, 4) == COR_RCV
    if not level:
        assert rig.lines == [(gsi, 1)]  # the bug: the line stays up for nothing enabled
        return
    assert rig.lines == [(gsi, 1), (gsi, 0)]
    port.config_write(ROOT_COMMAND, FATAL_EN | COR_EN, 4)
    assert rig.lines[-1] == (gsi, 1), "enabling a class already received raises the line"
    port.config_write(ROOT_COMMAND, FATAL_EN, 4)
    assert rig.lines[-1] == (gsi, 0), "disabling it drops the line"
    assert port.aer_interrupts == 1


# =========================================================================================================
# bridges: bus numbers, config routing, ECAM, Secondary Bus Reset, INTx
# =========================================================================================================
def test_bridge_bus_numbers_and_config_routing(rig: Rig):
    port = rig.port(secondary=1)
    ep = rig.endpoint(bus=port.secondary_bus, slot=2, fn=3)
    assert port.config_read(R.PCI_HEADER_TYPE, 1) & 0x7F == R.PCI_HEADER_TYPE_BRIDGE
    assert port.config_read(R.PCI_SECONDARY_BUS, 1) == 1 and port.config_read(R.PCI_SUBORDINATE_BUS, 1) == 1
    assert port.secondary_bus.number == 1 and port.secondary_bus.parent is port
    devfn = 2 << 3 | 3
    assert rig.bus.config_read(1, devfn, R.PCI_VENDOR_ID, 2) == 0x1AF4
    assert rig.bus.config_read(1, 0, R.PCI_VENDOR_ID, 2) == 0xFFFF, "an empty slot"
    assert rig.bus.config_read(7, devfn, R.PCI_VENDOR_ID, 4) == 0xFFFFFFFF, "a bus nobody decodes"
    rig.bus.config_write(1, devfn, R.PCI_INTERRUPT_LINE, 0x55, 1)
    assert ep.config[R.PCI_INTERRUPT_LINE] == 0x55
    assert ep.requester_id() == 0x0113
    # software renumbers the bridge
    port.config_write(R.PCI_SECONDARY_BUS, 5, 1)
    port.config_write(R.PCI_SUBORDINATE_BUS, 5, 1)
    assert port.secondary_bus.number == 5 and rig.bus.find_bus(5) is port.secondary_bus
    assert rig.bus.find_bus(1) is None
    assert rig.bus.config_read(1, devfn, R.PCI_VENDOR_ID, 2) == 0xFFFF
    assert rig.bus.config_read(5, devfn, R.PCI_VENDOR_ID, 2) == 0x1AF4
    assert ep.requester_id() == 0x0513


def test_ecam_window_reaches_extended_config_below_a_bridge(rig: Rig):
    port = rig.port(secondary=1)
    ep = rig.endpoint(bus=port.secondary_bus, slot=0, fn=2)

    def ecam(bus: int, devfn: int, off: int) -> int:
        return R.PCIE_MMCFG_BASE | bus << 20 | devfn << 12 | off

    assert rig.memory.read(ecam(1, 2, A), 4) & 0xFFFF == 0x0001, "the AER header through ECAM"
    assert rig.memory.read(ecam(1, 2, UNCOR_SEVER), 4) == SEVERITY_DEFAULT
    rig.memory.write(ecam(1, 2, UNCOR_MASK), POISON_TLP, 4)
    assert ep.r(UNCOR_MASK) == POISON_TLP
    inject(ep, ECRC)
    assert rig.memory.read(ecam(1, 2, UNCOR_STATUS), 4) == ECRC
    rig.memory.write(ecam(1, 2, UNCOR_STATUS), ECRC, 4)  # RW1C through ECAM
    assert ep.r(UNCOR_STATUS) == 0
    # the port's own root registers, on bus 0
    assert rig.memory.read(ecam(0, port.devfn, ROOT_COMMAND), 4) == COR_EN | NONFATAL_EN | FATAL_EN
    assert rig.memory.read(ecam(1, 0, 0), 4) == 0xFFFFFFFF, "nothing at 01:00.0"
    assert rig.memory.read(ecam(1, 2, 0xFFE), 4) == 0xFFFFFFFF, "an access crossing the function's 4 KiB"
    # the legacy mechanism #1 reaches the first 256 bytes of the same function
    rig.io.write(0xCF8, 0x80000000 | 1 << 16 | 2 << 8 | R.PCI_VENDOR_ID, 4)
    assert rig.io.read(0xCFC, 2) == 0x1AF4


def test_secondary_bus_reset_resets_every_function_below_hooks_first_once(rig: Rig):
    port = rig.port()
    f0 = rig.endpoint("f0", bus=port.secondary_bus, fn=0)
    f1 = rig.endpoint("f1", bus=port.secondary_bus, fn=1)
    br = PCIBridge("br", rig.memory, rig.io, secondary=2)
    port.secondary_bus.add_device(br, 1)
    port.config_write(R.PCI_SUBORDINATE_BUS, 2, 1)
    deep = rig.endpoint("deep", bus=br.secondary_bus)
    below = (f0, f1, br, deep)
    calls: list[tuple[str, tuple[int, ...]]] = []
    port.secondary_bus.reset_hooks.append(lambda b: calls.append(("bus1", tuple(d.reset_count for d in below))))
    br.secondary_bus.reset_hooks.append(lambda b: calls.append(("bus2", tuple(d.reset_count for d in below))))
    inject(f0, POISON_TLP)
    f1.w(R.PCI_COMMAND, SERR, 2)
    port_resets = port.reset_count

    port.config_write(R.PCI_BRIDGE_CONTROL, BCTL_SERR | BCTL_BUS_RESET, 2)
    assert [d.reset_count for d in below] == [1, 1, 1, 1]
    assert calls[0] == ("bus1", (0, 0, 0, 0)), "the bus hooks run before any function is reset"
    assert [c[0] for c in calls] == ["bus1", "bus2"], "each bus's hooks once"
    assert port.secondary_bus_resets == 1 and port.reset_count == port_resets, "the bridge itself is not reset"
    assert f0.r(UNCOR_STATUS) == 0 and f0.devsta() == 0, "the AER status of a reset function is cleared"
    assert f1.r(R.PCI_COMMAND, 2) == 0
    # the bit stays set: writing it again is no new edge
    port.config_write(R.PCI_BRIDGE_CONTROL, BCTL_SERR | BCTL_BUS_RESET, 2)
    assert [d.reset_count for d in below] == [1, 1, 1, 1] and len(calls) == 2
    assert port.config_read(R.PCI_BRIDGE_CONTROL, 2) & BCTL_BUS_RESET
    # Linux's pci_reset_secondary_bus: clear, then set again -> a second reset
    port.config_write(R.PCI_BRIDGE_CONTROL, BCTL_SERR, 2)
    assert [d.reset_count for d in below] == [1, 1, 1, 1]
    port.config_write(R.PCI_BRIDGE_CONTROL, BCTL_SERR | BCTL_BUS_RESET, 2)
    assert [d.reset_count for d in below] == [2, 2, 2, 2] and port.secondary_bus_resets == 2


def test_intx_swizzling_below_a_bridge_and_the_wire_or(rig: Rig):
    port = rig.port(slot=1)
    a = rig.endpoint("a", bus=port.secondary_bus, slot=0, pin=1)
    b = rig.endpoint("b", bus=port.secondary_bus, slot=2, pin=2)
    # pin' = (pin - 1 + slot) % 4 + 1 at the bridge, then the bridge's slot on bus 0
    assert port.secondary_bus.route_intx(a) == PCIBus.intx_gsi(1, 1) == 17
    assert port.secondary_bus.route_intx(b) == PCIBus.intx_gsi(1, (2 - 1 + 2) % 4 + 1) == 16
    assert a.config[R.PCI_INTERRUPT_LINE] == 17 and b.config[R.PCI_INTERRUPT_LINE] == 16
    c = rig.endpoint("c", slot=5, pin=1)  # on bus 0: 16 + (5 + 0) % 4 = 17, the same GSI as a
    assert rig.bus.route_intx(c) == 17
    a.set_irq(1)
    assert rig.lines == [(17, 1)]
    c.set_irq(1)
    assert rig.lines == [(17, 1)], "the line is already up"
    a.set_irq(0)
    assert rig.lines == [(17, 1)], "c still holds it"
    b.set_irq(1)
    assert rig.lines == [(17, 1), (16, 1)]
    c.set_irq(0)
    assert rig.lines == [(17, 1), (16, 1), (17, 0)]
    b.w(R.PCI_COMMAND, R.PCI_COMMAND_INTX_DISABLE, 2)
    assert rig.lines[-1] == (16, 0), "INTx Disable drops the pin"


# =========================================================================================================
# recovery.merge_result
# =========================================================================================================
#: Linux's merge_result written out as its outcome matrix (rows: the vote so far, columns: the new
#: vote; N NONE, C CAN_RECOVER, R NEED_RESET, D DISCONNECT, V RECOVERED, X NO_AER_DRIVER)
_MERGE_MATRIX = """
     N C R D V X
  N  N N N N N X
  C  C C R D V X
  R  R R R R R X
  D  D D R D D X
  V  V C R D V X
  X  X X X X X X
"""
_LETTER = {"N": PciErsResult.NONE, "C": PciErsResult.CAN_RECOVER, "R": PciErsResult.NEED_RESET,
           "D": PciErsResult.DISCONNECT, "V": PciErsResult.RECOVERED, "X": PciErsResult.NO_AER_DRIVER}


def _matrix() -> dict[tuple[PciErsResult, PciErsResult], PciErsResult]:
    head, *rows = [line.split() for line in _MERGE_MATRIX.strip().splitlines()]
    return {(_LETTER[r[0]], _LETTER[col]): _LETTER[v] for r in rows for col, v in zip(head, r[1:], strict=True)}


def test_pci_ers_result_numbers_are_linuxs():
    assert [(r.name, int(r)) for r in PciErsResult] == [
        ("NONE", 1), ("CAN_RECOVER", 2), ("NEED_RESET", 3), ("DISCONNECT", 4), ("RECOVERED", 5),
        ("NO_AER_DRIVER", 6)]


@pytest.mark.parametrize("orig", list(PciErsResult))
@pytest.mark.parametrize("new", list(PciErsResult))
def test_merge_result_table(orig, new):
    assert merge_result(orig, new) is _matrix()[(orig, new)]


def test_merge_result_named_cases():
    E = PciErsResult
    assert merge_result(E.CAN_RECOVER, E.NO_AER_DRIVER) is E.NO_AER_DRIVER
    assert merge_result(E.NO_AER_DRIVER, E.CAN_RECOVER) is E.NO_AER_DRIVER
    assert merge_result(E.NEED_RESET, E.NONE) is E.NEED_RESET
    assert merge_result(E.CAN_RECOVER, E.NEED_RESET) is E.NEED_RESET
    assert merge_result(E.RECOVERED, E.DISCONNECT) is E.DISCONNECT
    assert merge_result(E.DISCONNECT, E.NEED_RESET) is E.NEED_RESET
    assert merge_result(E.DISCONNECT, E.CAN_RECOVER) is E.DISCONNECT
    assert merge_result(E.NEED_RESET, E.CAN_RECOVER) is E.NEED_RESET
    assert merge_result(E.NONE, E.CAN_RECOVER) is E.NONE


# =========================================================================================================
# parse_error_status
# =========================================================================================================
def test_every_name_of_qemus_table():
    assert len(QEMU_NAMES) == 24
    for name, want in QEMU_NAMES.items():
        assert parse_error_status(name) == want, name


@pytest.mark.parametrize("text,value", [
    ("0x1000", 0x1000), ("0X1000", 0x1000), ("0x0", 0), ("010", 8), ("0", 0), ("00", 0), ("4096", 4096),
    ("4294967295", 0xFFFFFFFF), ("0xffffffff", 0xFFFFFFFF), ("-1", 0xFFFFFFFF), ("-0x10", 0xFFFFFFF0),
    ("-4294967295", 1), ("+16", 16), (" 16", 16), ("\t0x10", 16),
])
def test_numbers_in_base_0_as_strtoul(text, value):
    assert parse_error_status(text) == (value, False)


@pytest.mark.parametrize("text", [
    "", " ", "BOGUS", "poison_tlp", "POISON_TLP ", "0x", "-", "+", "--1", "+-1", "0x100000000", "4294967296",
    "-4294967296", "08", "0x1g", "12abc", "1.5", "0x-5", "1e3", "0b1",
])
def test_junk_is_refused_with_qemus_text(text):
    with pytest.raises(AerParseError) as ei:
        parse_error_status(text)
    assert str(ei.value) == f"invalid error status value '{text}'"


@given(st.text(max_size=24) | st.from_regex(r"\A\s*[+-]?(0[xX]|0)?[0-9a-fA-F_ +-]{0,10}\Z"))
def test_parse_never_raises_anything_else(text):
    try:
        value, cor = parse_error_status(text)
    except AerParseError as e:
        assert str(e) == f"invalid error status value '{text}'"
        return
    if text in QEMU_NAMES:
        assert (value, cor) == QEMU_NAMES[text]
        return
    assert 0 <= value <= 0xFFFFFFFF and cor is False


# what C's strtoul reads whole and Python's int also takes: refused (strict, the default), taken without
NOT_STRTOUL = ["16 ", "0x 5", "0x+5", "0x0x10", "0o17", "1_000", "0x1_000", "\u0663", "0x\u0663", "1\u00a0"]


@pytest.mark.parametrize("strict", [True, False])
@pytest.mark.parametrize("text", NOT_STRTOUL)
def test_only_what_strtoul_reads_whole(text, strict):
    if strict:
        with pytest.raises(AerParseError) as ei:
            parse_error_status(text)
        assert str(ei.value) == f"invalid error status value '{text}'"
    else:
        value, cor = parse_error_status(text, strict=False)  # the bug: Python's int() grammar
        assert cor is False and 0 <= value <= 0xFFFFFFFF


STRTOUL = re.compile(r"[ \t\n\v\f\r]*[+-]?(0[xX][0-9a-fA-F]+|0[0-7]*|[1-9][0-9]*)")


@given(st.text(max_size=24) | st.from_regex(r"\A\s*[+-]?(0[xX]|0)?[0-9a-fA-F_ +-]{0,10}\Z"))
def test_parse_accepts_only_numbers_strtoul_reads_whole(text):
    try:
        value, cor = parse_error_status(text)
    except AerParseError:
        return
    if text in QEMU_NAMES:
        return
    assert STRTOUL.fullmatch(text) and text.isascii(), f"{text!r} is not a number strtoul reads whole"
    body = text.lstrip(" \t\n\v\f\r")
    neg, digits = body.startswith("-"), body.lstrip("+-")
    n = int(digits, 16) if digits[:2].lower() == "0x" else int(digits, 8) if digits.startswith("0") else int(digits)
    assert value == (-n if neg else n) & 0xFFFFFFFF and cor is False


# =========================================================================================================
# properties of inject()
# =========================================================================================================
_flags = st.integers(0, 0xF).map(AerErrFlag)
_u32 = st.integers(0, 0xFFFFFFFF)


@given(st.lists(st.tuples(_u32 | st.sampled_from([POISON_TLP, DLP, UNSUP, RCVR, BAD_TLP, INTERNAL, UNSUP | 1]),
                          _flags, st.tuples(_u32, _u32, _u32, _u32)), max_size=12),
       st.integers(0, 0xF), st.booleans(), _u32, _u32)
def test_inject_returns_0_or_errno_and_registers_gain_only_supported_bits(errs, devctl, serr, umask, sever):
    rig = Rig()
    port = rig.port()
    ep = rig.endpoint(bus=port.secondary_bus, devctl=devctl)
    ep.w(R.PCI_COMMAND, SERR if serr else 0, 2)
    ep.w(UNCOR_MASK, umask)
    ep.w(UNCOR_SEVER, sever)
    for status, flags, header in errs:
        before_u, before_c = ep.r(UNCOR_STATUS), ep.r(COR_STATUS)
        rc = aer(ep).inject(PCIEAERErr(status, flags, header=header))
        assert rc in (0, -errno.EINVAL)
        u, c = ep.r(UNCOR_STATUS), ep.r(COR_STATUS)
        assert u & ~UNC_SUPPORTED == 0 and c & ~COR_SUPPORTED == 0
        assert u & before_u == before_u and c & before_c == before_c, "status bits are only ever added"
        if rc:
            assert (u, c) == (before_u, before_c)
        else:
            assert bin(u ^ before_u).count("1") <= 1 and bin(c ^ before_c).count("1") <= 1
        assert port.config_read(ROOT_STATUS, 4) & ~0x7F == 0


def test_the_root_port_rejects_being_a_root_for_a_non_root_capability():
    d = Endpoint("ep")
    with pytest.raises(ValueError):
        aer(d).root_receive(AerMessage(AerSeverity.FATAL, 0))
