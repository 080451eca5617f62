"""``pcie_aer_inject_error`` (HMP, QEMU's syntax) and ``x-pcie-aer-inject-error`` (QMP, the same
arguments), ``x-query-pci-aer`` / ``info pci-aer``, against a running machine with a virtual PCIe
root port: QEMU's answers and error texts, the registers the injection changed, hostile arguments
answered with errors (never a traceback), the monitor and the VM carrying on.

HMP goes through ``kickcall shell`` once (a process guest), and through ``human-monitor-command``
with kickcall's own client (``kickcall.monitor.client.QMPClient``) for the rest.
"""

from __future__ import annotations

import os
import subprocess

import pytest

from helpers import blk, kickcall_argv, machine_toml, running_machine
from kickcall.monitor.client import QMPClient, QMPCommandError

pytestmark = pytest.mark.slow

PORTS = """
[[device]]
type = "pcie-root-port"
id = "rp0"

[[device]]
type = "pcie-root-port"
id = "rp1"
"""

POISON_TLP, DLP, BAD_TLP = 0x1000, 0x10, 0x40


def _toml(guest: str) -> str:
    return machine_toml(guest=guest, vcpus=1, devices=PORTS + blk("blk0"))


class Mon:
    """A QMP connection with HMP and error helpers."""

    def __init__(self, c: QMPClient) -> None:
        self.c = c

    def __call__(self, cmd: str, **args):
        return self.c.execute(cmd, args or None)

    def hmp(self, line: str) -> str:
        return self.c.execute("human-monitor-command", {"command-line": line})

    def fails(self, cmd: str, **args) -> QMPCommandError:
        with pytest.raises(QMPCommandError) as ei:
            self.c.execute(cmd, args)
        return ei.value

    def aer(self, dev: str) -> dict:
        return self("x-query-pci-aer", dev=dev)["aer"]

    def running(self) -> bool:
        return self("query-status")["status"] == "running"


def _no_guest_aer(m) -> None:
    """The guest's AER service off (``pcie_ports=compat``): what an injection sets stays set for
    the monitor to show (the guest's recovery is tests/test_guest_aer.py's)."""
    assert m.guest_cmd({"cmd": "aer-config", "native": False}, timeout=60)["native"] is False


@pytest.fixture(scope="module")
def vm():
    import shutil
    import tempfile

    d = tempfile.mkdtemp(prefix="kc")
    qmp = os.path.join(d, "m.qmp")
    try:
        with running_machine(_toml("thread")) as m:
            _no_guest_aer(m)
            m.start_monitor(qmp)
            with QMPClient(qmp, timeout=60).connect(wait=30) as c:
                yield m, Mon(c)
    finally:
        shutil.rmtree(d, ignore_errors=True)


def _ok_line(m, dev_id: str) -> str:
    port = m.root_ports[dev_id]
    return f"OK id: {dev_id} root bus: pcie.0, bus: 0 devfn: {port.devfn >> 3:x}.{port.devfn & 7:x}\r\n"


# ---------------------------------------------------------------------------------------------------------
# HMP through kickcall shell (a process guest)
# ---------------------------------------------------------------------------------------------------------
def test_hmp_through_kickcall_shell(workdir):
    qmp = os.path.join(workdir, "m.qmp")
    with running_machine(_toml("process")) as m:
        assert m.guest_proc is not None
        _no_guest_aer(m)
        m.start_monitor(qmp)
        lines = "\n".join([
            "pcie_aer_inject_error rp0 POISON_TLP",
            "pcie_aer_inject_error nosuch POISON_TLP",
            "pcie_aer_inject_error -c rp0 RCVR",
            "pcie_aer_inject_error rp0 0x3000",
            "info pci-aer rp0",
            "query-status",
        ]) + "\n"
        p = subprocess.run(kickcall_argv("shell", qmp), input=lines, capture_output=True, text=True, timeout=120,
                           env=dict(os.environ, XDG_STATE_HOME=workdir))
        assert p.returncode == 0, p.stderr
        out = p.stdout.replace("\r\n", "\n")
        assert _ok_line(m, "rp0").replace("\r\n", "\n") in out
        assert "Error: device 'nosuch' not found\n" in out
        assert "Error: -c is only valid with numeric error status\n" in out
        assert "Error: failed to inject error: Invalid argument\n" in out
        assert f"uncor-status: {POISON_TLP}\n" in out
        assert '"status": "running"' in out
        assert "Traceback" not in out + p.stderr
        assert m.guest_proc.poll() is None, "the guest is alive"
        assert m.root_ports["rp0"].aer_cap.uncor_status == POISON_TLP


# ---------------------------------------------------------------------------------------------------------
# HMP through human-monitor-command
# ---------------------------------------------------------------------------------------------------------
def test_hmp_inject_and_query(vm):
    m, mon = vm
    before = len(mon.aer("rp0")["history"])
    assert mon.hmp("pcie_aer_inject_error rp0 POISON_TLP") == _ok_line(m, "rp0")
    a = mon.aer("rp0")
    assert a["uncor-status"] & POISON_TLP
    assert len(a["history"]) == before + 1
    h = a["history"][-1]
    assert h["status"] == POISON_TLP and h["severity"] == "non-fatal"
    assert h["source-id"] == m.root_ports["rp0"].requester_id()
    assert mon.running()


def test_hmp_correctable_numeric_and_header_log(vm):
    m, mon = vm
    assert mon.hmp("pcie_aer_inject_error -c rp0 0x40") == _ok_line(m, "rp0")
    a = mon.aer("rp0")
    assert a["cor-status"] & BAD_TLP and a["history"][-1]["severity"] == "correctable"
    # rp1 has no error logged yet: its header log takes the four numbers
    assert mon.hmp("pcie_aer_inject_error rp1 DLP 0x11 0x22 0x33 4294967295") == _ok_line(m, "rp1")
    a = mon.aer("rp1")
    assert a["uncor-status"] == DLP and a["first-error-pointer"] == 4
    assert a["header-log"] == ["00000011", "00000022", "00000033", "ffffffff"]
    assert a["history"][-1]["severity"] == "fatal"
    assert mon.running(), "a fatal error on a root port with nothing below it does not stop the VM"


@pytest.mark.parametrize("line,error", [
    ("pcie_aer_inject_error nosuch POISON_TLP", "device 'nosuch' not found"),
    ("pcie_aer_inject_error blk0 POISON_TLP", "device 'blk0' is not a PCIe device"),
    ("pcie_aer_inject_error rp0 BOGUS", "invalid error status value 'BOGUS'"),
    ("pcie_aer_inject_error rp0 poison_tlp", "invalid error status value 'poison_tlp'"),
    ("pcie_aer_inject_error rp0 0x100000000", "invalid error status value '0x100000000'"),
    ("pcie_aer_inject_error rp0 '0x 1000'", "invalid error status value '0x 1000'"),  # strtoul stops at the blank
    ("pcie_aer_inject_error rp0 1_000", "invalid error status value '1_000'"),
    ("pcie_aer_inject_error -c rp0 RCVR", "-c is only valid with numeric error status"),
    ("pcie_aer_inject_error -a -c rp0 RCVR", "-c is only valid with numeric error status"),
    ("pcie_aer_inject_error rp0 0x3000", "failed to inject error: Invalid argument"),
    ("pcie_aer_inject_error rp0 0x1", "failed to inject error: Invalid argument"),
    ("pcie_aer_inject_error rp0 -1", "failed to inject error: Invalid argument"),
    ("pcie_aer_inject_error -c rp0 0x1000000", "failed to inject error: Invalid argument"),
])
def test_hmp_qemus_error_texts(vm, line, error):
    m, mon = vm
    before = mon.aer("rp0")
    assert mon.hmp(line) == f"Error: {error}\r\n"
    after = mon.aer("rp0")
    assert (after["uncor-status"], after["cor-status"], len(after["history"])) == \
        (before["uncor-status"], before["cor-status"], len(before["history"])), "nothing was injected"


@pytest.mark.parametrize("line", [
    "pcie_aer_inject_error rp0 DLP 1 2 3 4 5 6 7 8 9",  # more than 4 header + 4 prefix numbers
    "pcie_aer_inject_error rp0 DLP 0x100000000",  # a 33-bit header
    "pcie_aer_inject_error rp0 DLP 1 2 3 4 0x1ffffffff",  # a 33-bit prefix
    "pcie_aer_inject_error rp0 DLP -1",
    "pcie_aer_inject_error rp0 DLP nonsense",
    "pcie_aer_inject_error -x rp0 DLP",
    "pcie_aer_inject_error",
    "pcie_aer_inject_error rp0",
    "pcie_aer_inject_error rp0 'unterminated",
    "pcie_aer_inject_error rp0 ''",
    "pcie_aer_inject_error '' DLP",
    "pcie_aer_inject_error rp0 DLP\x00",
    "info pci-aer",
    "info pci-aer nosuch",
    "info pci-aer blk0",
])
def test_hmp_hostile_arguments_get_an_error_never_a_traceback(vm, line):
    m, mon = vm
    before = mon.aer("rp0")["history"]
    out = mon.hmp(line)
    assert (out.startswith(("Error: ", "unknown command")) or "\r\nTry \"help " in out) and "Traceback" not in out, out
    assert mon.aer("rp0")["history"] == before
    assert mon.running(), "the monitor carries on"


def test_info_pci_aer_prints_the_registers(vm):
    m, mon = vm
    out = mon.hmp("info pci-aer rp0")
    for field in ("device: rp0", "uncor-status:", "uncor-mask:", f"uncor-severity: {0x00462030}", "cor-status:",
                  f"cor-mask: {0xE000}", "header-log:", "root-command:", "root-status:", "error-source:", "history:"):
        assert field in out, field
    assert out.endswith("\r\n") and "Traceback" not in out


# ---------------------------------------------------------------------------------------------------------
# QMP x-pcie-aer-inject-error: the same arguments, the same answers
# ---------------------------------------------------------------------------------------------------------
def test_qmp_inject(vm):
    m, mon = vm
    port = m.root_ports["rp0"]
    r = mon("x-pcie-aer-inject-error", id="rp0", error_status="ECRC")
    assert r == {"id": "rp0", "root-bus": "pcie.0", "bus": 0, "devfn": port.devfn}
    assert mon.aer("rp0")["uncor-status"] & 0x80000
    r = mon("x-pcie-aer-inject-error", id="rp0", error_status="0x1", correctable=True)  # RCVR
    assert r["id"] == "rp0" and mon.aer("rp0")["cor-status"] & 0x1
    r = mon("x-pcie-aer-inject-error", id="rp0", error_status="COMP_TIME", advisory_non_fatal=True)
    a = mon.aer("rp0")
    assert a["uncor-status"] & 0x4000 and a["cor-status"] & 0x2000 and a["history"][-1]["severity"] == "correctable"
    assert mon.running()


@pytest.mark.parametrize("args,cls,desc", [
    ({"id": "nosuch", "error_status": "POISON_TLP"}, "DeviceNotFound", "device 'nosuch' not found"),
    ({"id": "blk0", "error_status": "POISON_TLP"}, "GenericError", "device 'blk0' is not a PCIe device"),
    ({"id": "rp0", "error_status": "BOGUS"}, "GenericError", "invalid error status value 'BOGUS'"),
    ({"id": "rp0", "error_status": ""}, "GenericError", "invalid error status value ''"),
    ({"id": "rp0", "error_status": "RCVR", "correctable": True}, "GenericError",
     "-c is only valid with numeric error status"),
    ({"id": "rp0", "error_status": "0x3000"}, "GenericError", "failed to inject error: Invalid argument"),
    ({"id": "rp0", "error_status": "0x2", "correctable": True}, "GenericError",
     "failed to inject error: Invalid argument"),
    # hostile types: QMP's own type errors
    ({"id": "rp0", "error_status": 4096}, "GenericError", "Invalid parameter type for 'error_status', expected: string"),
    ({"id": 5, "error_status": "DLP"}, "GenericError", "Invalid parameter type for 'id', expected: string"),
    ({"id": "rp0", "error_status": "DLP", "header0": "0x11"}, "GenericError", "Parameter 'header0' expects uint64"),
    ({"id": "rp0", "error_status": "DLP", "header0": 2**32}, "GenericError", "Parameter 'header0' expects uint32_t"),
    ({"id": "rp0", "error_status": "DLP", "prefix3": -1}, "GenericError", "Parameter 'prefix3' expects uint32_t"),
    ({"id": "rp0", "error_status": "DLP", "correctable": "yes"}, "GenericError",
     "Invalid parameter type for 'correctable', expected: boolean"),
    ({"id": "rp0", "error_status": "DLP", "header4": 1}, "GenericError", "Parameter 'header4' is unexpected"),
    ({"id": "rp0"}, "GenericError", "Parameter 'error_status' is missing"),
])
def test_qmp_errors(vm, args, cls, desc):
    m, mon = vm
    before = mon.aer("rp0")["history"]
    e = mon.fails("x-pcie-aer-inject-error", **args)
    assert (e.cls, e.desc) == (cls, desc)
    assert mon.aer("rp0")["history"] == before
    assert mon.running(), "the monitor carries on"


def test_qmp_query_errors(vm):
    m, mon = vm
    e = mon.fails("x-query-pci-aer", dev="nosuch")
    assert (e.cls, e.desc) == ("DeviceNotFound", "device 'nosuch' not found")
    e = mon.fails("x-query-pci-aer", dev="blk0")
    assert (e.cls, e.desc) == ("GenericError", "device 'blk0' is not a PCIe device")
    e = mon.fails("x-query-pci-aer", dev=["rp0"])
    assert e.cls == "GenericError" and "'dev'" in e.desc
    assert mon.running()


def test_qmp_and_hmp_give_the_same_answers(vm):
    m, mon = vm
    cases = [
        ("nosuch POISON_TLP", {"id": "nosuch", "error_status": "POISON_TLP"}),
        ("blk0 DLP", {"id": "blk0", "error_status": "DLP"}),
        ("rp0 NOPE", {"id": "rp0", "error_status": "NOPE"}),
        ("-c rp0 BAD_TLP", {"id": "rp0", "error_status": "BAD_TLP", "correctable": True}),
        ("rp0 0x00003000", {"id": "rp0", "error_status": "0x00003000"}),
    ]
    for hmp_args, qmp_args in cases:
        text = mon.hmp(f"pcie_aer_inject_error {hmp_args}")
        e = mon.fails("x-pcie-aer-inject-error", **qmp_args)
        assert text == f"Error: {e.desc}\r\n", hmp_args
