"""kickcall's HMP text side by side with real QEMU 7.2's (issue 13, item 5).

Two comparable devices in the same state: QEMU 7.2's ``virtio-blk-pci,disable-legacy=on`` (ids
1af4:1042, BAR1 MSI-X and BAR4 virtio regions, as kickcall's virtio-blk) and a kickcall machine's
virtio-blk, with the same id at the same slot.  Each has been set up by a driver (DRIVER_OK, queue 0
enabled, MSI-X) and has one request published in its avail ring and not kicked: QEMU's by
``kickcall.peers.qtest`` (QtestVM: a halted vCPU, the driver's config cycles and BAR writes over
qtest), kickcall's by its own guest.

Each listed HMP command runs on both through ``human-monitor-command``; the texts must have the same
lines -- labels, order, indentation, alignment, number formats -- after a small per-line
normalisation of what really differs between the two devices (addresses, counts, the IRQ line,
lists of feature and status names).  What kickcall prints on top of QEMU is cut off explicitly
below, with its reason.  With ``hmp-plain-text`` off (the old key dumps) the layouts differ.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from collections.abc import Iterator

import pytest
from qemu.qmp.legacy import QEMUMonitorProtocol

from helpers import blk, machine_toml, running_machine, wait_for
from kickcall.monitor import commands
from kickcall.peers.qtest import QtestBlkIo, QtestVM, VirtioBlkQtestDriver

pytestmark = pytest.mark.slow

QEMU = shutil.which("qemu-system-x86_64")


class Hmp:
    """human-monitor-command over a synchronous qemu.qmp client."""

    def __init__(self, path: str) -> None:
        self.qmp = QEMUMonitorProtocol(path)
        self.qmp.connect()
        self.qmp.settimeout(60)

    def __call__(self, line: str) -> str:
        return self.qmp.cmd("human-monitor-command", **{"command-line": line})

    def query(self, cmd: str, **args):
        return self.qmp.cmd(cmd, **args)

    def close(self) -> None:
        self.qmp.close()


# ---------------------------------------------------------------------------------------------------
# the two devices: QEMU 7.2's set up by kickcall's qtest driver, kickcall's by its own guest
# ---------------------------------------------------------------------------------------------------
DEV = QtestVM.BLK_ID  # "vblk0": kickcall's device gets the same id ...
SLOT = QtestVM.BLK_SLOT  # ... and the same slot
PATH = f"/machine/peripheral/{DEV}/virtio-backend"
QUEUE_SIZE = 128  # kickcall's virtio-blk queue size; the driver asks QEMU's for the same


@pytest.fixture(scope="module")
def qemu() -> Iterator[Hmp]:
    if QEMU is None:
        pytest.skip("qemu-system-x86_64 is missing (./install.sh installs QEMU 7.2)")
    d = tempfile.mkdtemp(prefix="kc")
    vm = QtestVM(d, blk_extra=",disable-legacy=on")  # modern only: 1af4:1042, no I/O BAR, as kickcall's
    mon = None
    try:
        vm.start()
        mon = Hmp(vm.qmp_path)
        v = mon.query("query-version")["qemu"]
        if (v["major"], v["minor"]) != (7, 2):
            pytest.skip(f"the texts compared are QEMU 7.2's; this is QEMU {v['major']}.{v['minor']}")
        assert vm.session is not None
        drv = VirtioBlkQtestDriver(vm.session, queue_size=QUEUE_SIZE).setup()
        assert not drv.publish([QtestBlkIo.write(64, b"\x5a" * 4096)], notify=False)
        yield mon
    finally:
        if mon is not None:
            mon.close()
        vm.stop()
        shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(scope="module")
def kc() -> Iterator[Hmp]:
    """A kickcall machine (process guest) with a virtio-blk at QEMU's id and slot, one request
    published and not kicked."""
    d = tempfile.mkdtemp(prefix="kc")
    try:
        with running_machine(machine_toml(devices=blk(DEV) + f"slot = {SLOT}\n")) as m:
            path = os.path.join(d, "m.qmp")
            m.start_monitor(path)
            mon = Hmp(path)
            try:
                st = mon.query("x-query-virtio-queue-status", path=PATH, queue=0)  # (serialised with the device)
                m.guest_cmd({"cmd": "blk-submit", "slot": SLOT, "op": "write", "sector": 64, "nbytes": 4096,
                             "fill": 0x5A, "kick": False})
                wait_for(lambda: mon.query("x-query-virtio-queue-status", path=PATH, queue=0)["avail-idx"]
                         == (st["avail-idx"] + 1) & 0xFFFF, 30, "the request in the avail ring")
                yield mon
            finally:
                mon.close()
    finally:
        shutil.rmtree(d, ignore_errors=True)


# ---------------------------------------------------------------------------------------------------
# normalisation: what really differs between the two devices
# ---------------------------------------------------------------------------------------------------
def lines_of(text: str) -> list[str]:
    """HMP text (CRLF line ends, as QEMU's monitor writes them) as lines."""
    assert text.endswith("\r\n") and "\n" not in text.replace("\r\n", ""), repr(text)
    return text[:-2].split("\r\n")


def _hex(m: re.Match) -> str:  # a hex number by its printed width (%016x, at least %08x, at least %04x)
    n = len(m.group(1))
    return "0x" + ("{16}" if n == 16 else "{8+}" if n >= 8 else "{4+}" if n >= 4 else "{n}")


PER_LINE = (
    (re.compile(r"^(      IRQ )\d+(, pin [A-D])$"), r"\1N\2"),  # the Interrupt Line a guest (or nobody) wrote
    (re.compile(r"^(  [a-z_]+: +)(?!virtio-blk)\S+$"), r"\1V"),  # label: value (bus_name, vm_running, counts...)
    (re.compile(r"^(    [a-z_]+: +)\d+$"), r"\1N"),  # VRing / avail / used numbers
    (re.compile(r"^(        addr )0x[0-9a-f]+ len \d+( \([a-z, ]+\))?(,?)$"), r"\1A len N\3"),  # a descriptor
    (re.compile(r"0x([0-9a-f]+)"), _hex),
)


def normalise(lines: list[str]) -> list[str]:
    out: list[str] = []
    for line in lines:
        for rx, sub in PER_LINE:
            line = rx.sub(sub, line)
        if line.startswith("\t"):  # a feature or status name: which ones, and how many, is the device's
            line = "\t{name}"
            if out and out[-1] == line:
                continue
        if line.startswith("        addr A len N"):  # the chain's descriptors: one line for the list
            line = "        addr A len N"
            if out and out[-1] == line:
                continue
        out.append(line)
    return out


def kickcall_part_cut(lines: list[str]) -> list[str]:
    """kickcall's additions cut off: the ``kickcall:`` block at the end of the virtio commands (ring
    fields read from guest memory, kick/call counters, injections, completion times, a refused
    chain's error) and, in ``info pci``, the MSI-X table after a device's ``id`` line."""
    if "  kickcall:" in lines:
        lines = lines[:lines.index("  kickcall:")]
    return [x for x in lines if not re.match(r"^      MSI-X: |^        vector +\d+: ", x)]


def pci_block(lines: list[str], qdev_id: str) -> list[str]:
    """One device of ``info pci``: from its ``  Bus`` line to its ``id`` line."""
    end = lines.index(f'      id "{qdev_id}"')
    start = max(i for i in range(end) if lines[i].startswith("  Bus "))
    return lines[start:end + 1]


def side_by_side(q: list[str], k: list[str]) -> str:
    w = max((len(x) for x in q), default=0)
    n = max(len(q), len(k))
    return "\n".join(f"{a:<{w}} | {b}" for a, b in zip(q + [""] * (n - len(q)), k + [""] * (n - len(k)), strict=True))


def same_layout(qemu_text: str, kc_text: str, *, pci: bool = False) -> tuple[bool, str]:
    q, k = lines_of(qemu_text), kickcall_part_cut(lines_of(kc_text))
    if pci:
        q, k = pci_block(q, DEV), pci_block(k, DEV)
    # QEMU 7.2 offers VIRTIO_F_RING_RESET (bit 40) and has no name for it; kickcall does not offer it
    q = [x for x in q if not re.fullmatch(r"  unknown-features\(0x[0-9a-f]{16}\)", x)]
    nq, nk = normalise(q), normalise(k)
    return nq == nk, side_by_side(nq, nk)


# ---------------------------------------------------------------------------------------------------
# the listed commands, side by side
# ---------------------------------------------------------------------------------------------------
LAYOUTS = {
    "info pci": ("info pci", "info pci"),
    "info virtio-status": (f"info virtio-status {PATH}", f"info virtio-status {PATH}"),
    "info virtio-queue-status": (f"info virtio-queue-status {PATH} 0", f"info virtio-queue-status {PATH} 0"),
    "info virtio-queue-element": (f"info virtio-queue-element {PATH} 0", f"info virtio-queue-element {PATH} 0"),
    "info virtio-queue-element INDEX": (f"info virtio-queue-element {PATH} 0 0",
                                        f"info virtio-queue-element {PATH} 0 0"),
}


@pytest.mark.parametrize("fix", ["on", "off"])
@pytest.mark.parametrize("name", list(LAYOUTS))
def test_layout_matches_qemu_7_2(qemu, kc, monkeypatch, name, fix):
    monkeypatch.setattr(commands.HMP_PLAIN_TEXT, "fix_on", fix == "on")
    qline, kline = LAYOUTS[name]
    same, table = same_layout(qemu(qline), kc(kline), pci=name == "info pci")
    if fix == "on":
        assert same, f"QEMU 7.2 | kickcall, normalised:\n{table}"
    else:  # the old key: value dumps (info pci: IRQ pin as a number, no subsystem line)
        assert not same


def test_info_pci_values_that_must_agree(qemu, kc):
    """Beyond the layout: the ids, class, subsystem, pin and BAR kinds are the same device's."""
    q, k = pci_block(lines_of(qemu("info pci")), DEV), pci_block(lines_of(kc("info pci")), DEV)
    assert q[1:3] == k[1:3] == ["    SCSI controller: PCI device 1af4:1042", "      PCI subsystem 1af4:1100"]
    assert re.fullmatch(r"      IRQ \d+, pin A", q[3]) and re.fullmatch(r"      IRQ \d+, pin A", k[3])
    assert [re.sub(r" at .*", "", x) for x in q[4:]] == [re.sub(r" at .*", "", x) for x in k[4:]] == \
        ["      BAR1: 32 bit memory", "      BAR4: 64 bit prefetchable memory", f'      id "{DEV}"']


def test_info_virtio_is_identical(qemu, kc):
    assert qemu("info virtio") == kc("info virtio") == f"{PATH} [virtio-blk]\r\n"


def test_queue_status_header_is_the_path_as_given(qemu, kc):
    """QEMU prints the path it was given; kickcall also takes the device's id (QEMU refuses it)."""
    assert qemu(f"info virtio-queue-status {DEV} 0") == f"Error: Path {DEV} is not a VirtIODevice\r\n"
    by_id = lines_of(kc(f"info virtio-queue-status {DEV} 0"))
    by_path = lines_of(kc(f"info virtio-queue-status {PATH} 0"))
    assert by_id[0] == f"{DEV}:" and by_path[0] == f"{PATH}:"
    assert lines_of(qemu(f"info virtio-queue-status {PATH} 0"))[0] == f"{PATH}:"
    assert by_id[1:9] == by_path[1:9]


def test_errors_are_qemus(qemu, kc):
    for line in (f"info virtio-vhost-queue-status {PATH} 0",  # not a vhost device
                 f"info virtio-queue-status {PATH} 5", f"info virtio-status /machine/peripheral/{DEV}",
                 "info virtio-queue-status"):
        assert qemu(line) == kc(line), line


def test_info_version_and_the_info_list(qemu, kc):
    rx = re.compile(r"(\d+)\.(\d+)\.(\d+)(\S.*)?\r\n")  # hmp_info_version: "%d.%d.%d%s\n", package
    assert rx.fullmatch(qemu("info version")) and rx.fullmatch(kc("info version"))
    q = {x.split()[1]: x for x in lines_of(qemu("info"))}
    k = {x.split()[1]: x for x in lines_of(kc("info"))}
    shared = [s for s in q if s in k]
    assert shared == [s for s in k if s in q]  # the same order (alphabetical, as QEMU's table)
    assert {"pci", "status", "version", "virtio", "virtio-status", "virtio-queue-status",
            "virtio-vhost-queue-status", "virtio-queue-element"} <= set(shared)
    # kickcall's own words: its version is kickcall's; trace-events has no [vcpu] (no vCPU threads to query)
    differ = {"version", "trace-events"}
    assert {s: k[s] for s in shared if s not in differ} == {s: q[s] for s in shared if s not in differ}


def test_status_and_feature_names_are_qemus(qemu, kc):
    """x-query-virtio-status's status and feature lists: QEMU 7.2's texts, in QEMU's order (its
    tables read backwards), for every name both devices show."""
    q = qemu.query("x-query-virtio-status", path=PATH)
    k = kc.query("x-query-virtio-status", path=PATH)
    assert k["status"]["statuses"] == q["status"]["statuses"]  # both drivers are at DRIVER_OK
    for which in ("host-features", "guest-features"):
        for part in ("transports", "dev-features"):
            qs, ks = q[which].get(part, []), k[which].get(part, [])
            qtext = {x.split(":")[0]: x for x in qs}
            common = [x for x in ks if x.split(":")[0] in qtext]
            assert common or which == "guest-features", (which, part)  # (QEMU's test driver takes no device feature)
            assert common == [qtext[x.split(":")[0]] for x in common], (which, part)  # same texts
            assert common == [x for x in qs if x in common], (which, part)  # same order
