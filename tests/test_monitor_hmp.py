"""The monitor's small inconsistencies (issue 13): a device named by its qdev id or its QOM path in
every command, HMP answers as text (never a Python repr), and ``info`` / ``info version`` / an info
subcommand without its arguments answered as QEMU 7.2 answers them.

A real machine (thread guest, a virtio-blk and a PCIe root port), its monitor on a Unix socket,
kickcall's own QMP client, HMP through ``human-monitor-command``.  Each fix has a switch in
``kickcall.monitor.commands`` (process-wide switches monitor-accept-qdev-id, hmp-plain-text, hmp-info-help); the ``off`` variants
turn it off and see the old behaviour come back.  The texts QEMU has were taken from
qemu-system-x86_64 7.2 (``-M none -monitor stdio``).
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from helpers import blk, machine_toml, running_machine
from kickcall import __version__
from kickcall.monitor import commands
from kickcall.monitor.client import QMPClient, QMPCommandError

pytestmark = pytest.mark.slow

BLK0 = "/machine/peripheral/blk0/virtio-backend"
PROXY = "/machine/peripheral/blk0"  # the virtio-blk-pci qdev itself: not a VirtIODevice
PORT = """
[[device]]
type = "pcie-root-port"
id = "rp0"
"""


class Mon:
    def __init__(self, c: QMPClient) -> None:
        self.c = c

    def __call__(self, cmd: str, **args):
        return self.c.execute(cmd, args or None)

    def fails(self, cmd: str, **args) -> QMPCommandError:
        with pytest.raises(QMPCommandError) as ei:
            self(cmd, **args)
        return ei.value

    def error(self, cmd: str, **args) -> tuple[str, str]:
        e = self.fails(cmd, **args)
        return e.cls, e.desc

    def hmp(self, line: str) -> str:
        return self.c.execute("human-monitor-command", {"command-line": line})


@pytest.fixture(scope="module")
def mon() -> Iterator[Mon]:
    import shutil
    import tempfile

    d = tempfile.mkdtemp(prefix="kc")
    try:
        with running_machine(machine_toml(guest="thread", vcpus=1, devices=PORT + blk("blk0"))) as m:
            path = os.path.join(d, "m.qmp")
            m.start_monitor(path)
            with QMPClient(path, timeout=30).connect(wait=30) as c:
                yield Mon(c)
    finally:
        shutil.rmtree(d, ignore_errors=True)


# ---------------------------------------------------------------------------------------------------
# 1. a device's id and its path, everywhere
# ---------------------------------------------------------------------------------------------------
def test_virtio_queries_take_the_id_and_the_path(mon):
    assert mon("x-query-virtio-status", path="blk0") == mon("x-query-virtio-status", path=BLK0)
    by_id = mon("x-query-virtio-queue-status", path="blk0", queue=0)
    by_path = mon("x-query-virtio-queue-status", path=BLK0, queue=0)
    assert by_id["name"] == by_path["name"] == "virtio-blk" and by_id["queue-index"] == 0
    assert by_id["vring-num"] == by_path["vring-num"]
    assert mon("x-query-virtio-queue-element", path="blk0", queue=0)["index"] == \
        mon("x-query-virtio-queue-element", path=BLK0, queue=0)["index"]
    assert mon.error("x-query-virtio-vhost-queue-status", path="blk0", queue=0) == \
        mon.error("x-query-virtio-vhost-queue-status", path=BLK0, queue=0)  # not vhost: the same error
    # HMP: the id and the path alike
    assert "\r\n  queue_index:          0\r\n" in mon.hmp("info virtio-queue-status blk0 0")
    assert "\r\n  queue_index:          0\r\n" in mon.hmp(f"info virtio-queue-status {BLK0} 0")
    assert "VIRTIO_CONFIG_S_DRIVER_OK" in mon.hmp("info virtio-status blk0")


def test_a_path_that_is_no_virtio_device_keeps_qemus_text(mon):
    for bad in ("/nope", PROXY, "nope"):
        for cmd, args in (("x-query-virtio-status", {}), ("x-query-virtio-queue-status", {"queue": 0}),
                          ("x-query-virtio-vhost-queue-status", {"queue": 0})):
            assert mon.error(cmd, path=bad, **args) == ("GenericError", f"Path {bad} is not a VirtIODevice")
        assert mon.error("x-query-virtio-queue-element", path=bad, queue=0) == \
            ("GenericError", f"Path {bad} is not a VirtIO device")  # (sic: QEMU 7.2's words here)
    assert mon.hmp("info virtio-queue-status /nope 0") == "Error: Path /nope is not a VirtIODevice\r\n"


def test_dev_commands_take_the_id_the_path_and_the_qdev_path(mon):
    for name in ("blk0", BLK0, PROXY):
        assert mon("x-query-pci-msix", dev=name)["table-size"] >= 2, name
        assert {n["name"] for n in mon("x-query-device-notifiers", dev=name)} == \
            {n["name"] for n in mon("x-query-device-notifiers", dev="blk0")}
        assert {f["name"] for f in mon("x-debug-fault", dev=name)["faults"]} >= {"lose-kick", "lose-call"}
        assert "MSI-X: enabled" in mon.hmp(f"info msix {name}")
    assert mon.error("x-query-pci-msix", dev="/machine/peripheral/nope") == \
        ("DeviceNotFound", "Device '/machine/peripheral/nope' not found")
    # a root port is no DeviceView: its QOM path is still its id's
    assert mon("x-query-pci-aer", dev="/machine/peripheral/rp0") == mon("x-query-pci-aer", dev="rp0")


@pytest.mark.parametrize("fix", ["on", "off"])
def test_the_id_switch(mon, monkeypatch, fix):
    monkeypatch.setattr(commands.ACCEPT_QDEV_ID, "fix_on", fix == "on")
    if fix == "on":
        assert mon.hmp("info virtio-queue-status blk0 0").startswith("blk0:\r\n  device_name:          virtio-blk\r\n")
        assert "table-size" in mon("x-query-pci-msix", dev=PROXY)
    else:  # the inconsistency comes back
        assert mon.hmp("info virtio-queue-status blk0 0") == "Error: Path blk0 is not a VirtIODevice\r\n"
        assert mon.error("x-query-pci-msix", dev=PROXY) == ("DeviceNotFound", f"Device '{PROXY}' not found")
    assert "blk0" in mon.hmp("info notifiers blk0")  # the id always worked here


# ---------------------------------------------------------------------------------------------------
# 2. HMP answers are text
# ---------------------------------------------------------------------------------------------------
HMP_LINES = ("help", "info", "info version", "info pci", "info virtio", "info status", f"info virtio-status {BLK0}",
             "info virtio-status blk0", "info virtio-queue-status blk0 0", f"info virtio-queue-element {BLK0} 0",
             "info notifiers blk0", "info msix blk0", "info pci-aer rp0", "info trace-events virtio_queue_*",
             "x-debug-fault blk0", "x-debug-fault blk0 0 kick drop-next", "x-debug-fault blk0 0 kick clear",
             "x-debug-fault blk0 0 call drop-all", "x-debug-fault blk0 0 call clear",
             "x-debug-fault blk0 lose-kick drop-next 0", "x-debug-fault blk0 lose-kick clear 0",
             "x-debug-fault blk0 restore-notify-on-error off", "x-debug-fault blk0 restore-notify-on-error on")


def _reprs(text: str) -> list[str]:
    return [w for w in ("{", "}", "True", "False", "None", "['", "':") if w in text]


@pytest.mark.parametrize("fix", ["on", "off"])
def test_no_python_repr_in_any_hmp_answer(mon, monkeypatch, fix):
    monkeypatch.setattr(commands.HMP_PLAIN_TEXT, "fix_on", fix == "on")
    found = {line: r for line in HMP_LINES if (r := _reprs(mon.hmp(line)))}
    if fix == "on":
        assert found == {}
    else:  # the dict of x-debug-fault and the True/None of the key: value dumps come back
        assert "x-debug-fault blk0 0 kick drop-next" in found
        assert "info virtio-queue-status blk0 0" in found


def test_readable_fault_answers(mon):
    assert mon.hmp("x-debug-fault blk0 0 kick drop-next") == "fault drop-next on the kick path of queue 0: armed\r\n"
    assert mon.hmp("x-debug-fault blk0 0 kick clear") == "fault clear on the kick path of queue 0: cleared\r\n"
    assert mon.hmp("x-debug-fault blk0 lose-call drop-all 0") == \
        "fault lose-call drop-all on queue 0: armed for every event (dropped so far 0)\r\n"
    assert mon.hmp("x-debug-fault blk0 lose-call clear 0") == \
        "fault lose-call clear on queue 0: cleared (dropped so far 0)\r\n"


def test_key_value_dumps_print_true_false_and_a_dash(mon):
    text = mon.hmp("info virtio-queue-status blk0 0")
    q = mon("x-query-virtio-queue-status", path="blk0", queue=0)
    # QEMU 7.2's line for its own flag; kickcall's fields under "kickcall:", after QEMU's lines
    assert f"\r\n  signalled_used_valid: {'true' if q['signalled-used-valid'] else 'false'}\r\n" in text
    extra = text.split("\r\n  kickcall:\r\n", 1)[1]
    checked = 0
    for k, v in q.items():
        if k == "signalled-used-valid":
            continue
        if isinstance(v, bool):
            assert f"    {k}: {'true' if v else 'false'}\r\n" in extra, k
        elif v is None:
            assert f"    {k}: -\r\n" in extra, k
        checked += isinstance(v, bool) or v is None
    assert checked  # (the assertions above ran at least once)


# ---------------------------------------------------------------------------------------------------
# 3. info, info version, info subcommands without their arguments
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("fix", ["on", "off"])
def test_info_alone_and_info_version(mon, monkeypatch, fix):
    monkeypatch.setattr(commands.HMP_INFO_HELP, "fix_on", fix == "on")
    if fix == "off":
        assert mon.hmp("info") == "unknown command: 'info'\r\n"
        assert mon.hmp("info version") == "unknown command: 'info version'\r\n"
        assert mon.hmp("info virtio-queue-status") == "unknown command: 'info virtio-queue-status'\r\n"
        return
    lines = mon.hmp("info").split("\r\n")
    assert lines[-1] == "" and all(x.startswith("info ") and " -- " in x for x in lines[:-1])
    assert "info pci  -- show PCI info" in lines  # QEMU's line, two spaces when no parameters
    assert "info virtio-queue-status path queue -- Display status of a given virtio queue" in lines
    assert "info virtio-queue-element path queue [index] -- Display element of a given virtio queue" in lines
    assert {x.split()[1] for x in lines[:-1]} == {k.split()[1] for k in commands.HMP_COMMANDS if k.startswith("info ")}
    v = mon("query-version")
    q = v["qemu"]
    assert mon.hmp("info version") == f"{q['major']}.{q['minor']}.{q['micro']}{v['package']}\r\n"  # hmp_info_version
    assert v["package"] == f"kickcall {__version__}"


@pytest.mark.parametrize("line, text", [
    # QEMU 7.2's parser texts, as qemu-system-x86_64 -M none -monitor stdio prints them
    ("info virtio-queue-status", "virtio-queue-status: string expected"),
    ("info virtio-queue-status blk0", "unexpected end of expression"),
    ("info virtio-queue-status blk0 zz", "invalid char 'z' in expression"),
    ("info virtio-status", "virtio-status: string expected"),
    ("info virtio-queue-element", "virtio-queue-element: string expected"),
    ("info virtio-queue-element blk0 0 1 2", "virtio-queue-element: extraneous characters at the end of line"),
    ("info virtio-vhost-queue-status blk0", "unexpected end of expression"),
    ("info pci x", "pci: extraneous characters at the end of line"),
    ("info notifiers", "notifiers: string expected"),
    ("info msix", "msix: string expected"),
    ("info pci-aer", "pci-aer: string expected"),
])
def test_info_without_its_arguments(mon, line, text):
    sub = line.split()[1]
    assert mon.hmp(line) == f'{text}\r\nTry "help info {sub}" for more information\r\n'
    usage = mon.hmp(f"help info {sub}")  # what the hint points at: the arguments, named
    (key,) = [k for k in commands.HMP_COMMANDS if k.split()[:2] == ["info", sub]]
    assert usage == f"{key}{'  ' if key == f'info {sub}' else ' '}-- {commands.HMP_COMMANDS[key]}\r\n"


def test_help_lists_every_command_and_unknown_stays_unknown(mon):
    text = mon.hmp("help")
    assert all(k in text for k in commands.HMP_COMMANDS)
    assert "info [subcommand] -- show various information about the system state\r\n" in text
    assert mon.hmp("help stop") == "stop  -- pause (or s)\r\n"
    assert mon.hmp("help nosuch") == "unknown command: 'nosuch'\r\n"
    assert mon.hmp("info nosuch") == "unknown command: 'info nosuch'\r\n"
