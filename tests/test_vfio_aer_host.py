"""The host's side of PCIe error recovery for passthrough functions (issue 12, seed 004), in a real
``kickcall vfio-user-server`` process driven by kickcall's vfio-user client (no VMM):

* injection through the server's QMP (``x-pcie-aer-inject-error``, QEMU's arguments); the host's
  AER service (``kc-aer``) logs and clears a correctable error, and recovers an uncorrectable one
  with ``pcie_do_recovery``'s steps and Linux's result codes, kept in the recovery history;
* vfio-pci's part: the ERR eventfd fires, the AER registers are latched into the user's CONFIG
  view and cleared there by the user's RW1C write;
* a fatal error: a secondary bus reset of the host port resets every function of a 2-function
  card, and what the function completed before the error is recorded;
* a client that never registered ERR: the host still resets (``aer-host-link-reset``), the next
  client gets a working device; an unhandled error on release: the function is reset first
  (``aer-reset-on-release``);
* accesses racing the link reset wait, then succeed, never all-F's (``aer-access-gate``); a link
  that never returns (``link-never-returns``) fails them with EIO within the bound;
* kickcall's hot reset extension: INFO, vfio-pci's ownership rule (EPERM), one secondary bus
  reset counted once, never offered to a client that did not propose it, hostile payloads.
"""

from __future__ import annotations

import errno
import mmap
import os
import struct
import threading

import pytest

from helpers import wait_for
from kickcall.pci.aer import UNC
from kickcall.vfio import nic as N
from kickcall.vfio.client import VfioRequestError, VfioUserClient
from kickcall.vfio.protocol import HotReset, PciAddress, VfioUserCommand
from kickcall.vfio.uapi import VfioIrqSetFlag as F
from kickcall.vfio.uapi import VfioPciIrqIndex as IX
from vfio_env import NicRegs, aer_inject, aer_status, host_view, qmp_call, records, set_fault, vfio_card, vfio_server

TRIGGER = F.DATA_EVENTFD | F.ACTION_TRIGGER
CONFIG = 7
AER_UNCOR_STATUS = 0x104
AER_COR_STATUS = 0x110
AER_HEADER_LOG = 0x11C
ALL_F = 0xFFFFFFFF
RING = 0x100000


def cfg32(c: VfioUserClient, off: int) -> int:
    return int(struct.unpack("<I", c.region_read(CONFIG, off, 4))[0])


def recoveries(qmp: str, dev: str = "nic0") -> list[dict]:
    return aer_status(qmp, dev)["recovery"]["history"]


def wait_recovery(qmp: str, n: int = 1, dev: str = "nic0") -> dict:
    wait_for(lambda: len(recoveries(qmp, dev)) >= n, 60, f"recovery {n} in the history")
    return recoveries(qmp, dev)[n - 1]


def steps(rec: dict) -> list[tuple[str, str | None, str]]:
    return [(s["step"], s["function"], s["result"]) for s in rec["steps"]]


class Guest:
    """A client with memory mapped by fd (its DMA never needs the connection thread)."""

    def __init__(self, sock: str, **kw) -> None:
        self.c = VfioUserClient(sock, **kw)
        self.fd = os.memfd_create("client-ram")
        os.ftruncate(self.fd, 1 << 20)
        self.mem = mmap.mmap(self.fd, 1 << 20)
        self.c.dma_map(RING, 1 << 20, self.fd, 0)
        self.regs = NicRegs(self.c)

    def traffic(self, n: int) -> None:
        self.regs.bus_master()
        self.regs.setup_queue(0, RING, 256, 0)
        self.regs.doorbell(0, n)
        wait_for(lambda: self.regs.producer(0) == n, 60, f"{n} records")

    def register_err(self) -> int:
        efd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self.c.set_irqs(IX.ERR, TRIGGER, 0, 1, fds=[efd])
        return efd

    def close(self) -> None:
        self.c.close()
        self.mem.close()
        os.close(self.fd)


def _eventfd_count(fd: int) -> int:
    try:
        return os.eventfd_read(fd)
    except BlockingIOError:
        return 0


# -- the AER service: correctable, non-fatal, fatal -------------------------------------------------------
def test_a_correctable_error_is_logged_and_cleared_by_the_host_without_a_recovery(workdir):
    with vfio_server(workdir) as (_p, sock, qmp):
        g = Guest(sock)
        try:
            efd = g.register_err()
            out = aer_inject(qmp, "nic0", "BAD_TLP")
            assert out["bus"] == 1 and out["devfn"] == 0 and out["root-bus"] == "pcie.0"
            wait_for(lambda: aer_status(qmp)["recovery"]["counts"]["correctable"] == 1, 60, "the correctable error")
            st = aer_status(qmp)
            assert st["aer"]["cor-status"] == 0  # the host cleared it
            assert st["recovery"]["history"] == [] and st["recovery-state"] == "idle"
            assert st["user-view"] == "live" and not st["unhandled"]
            rp = aer_status(qmp, "rp0")
            assert rp["aer"]["root-status"] == 0 and rp["aer"]["received"]["correctable"] == 1
            assert rp["recovery"]["correctable"][0]["errors"] == ["BAD_TLP"]
            assert _eventfd_count(efd) == 0  # ERR is for uncorrectable errors
            assert cfg32(g.c, AER_COR_STATUS) == 0
            os.close(efd)
        finally:
            g.close()


def test_a_non_fatal_error_signals_err_latches_the_status_for_the_user_and_the_user_clears_it(workdir):
    with vfio_server(workdir) as (_p, sock, qmp):
        g = Guest(sock)
        try:
            efd = g.register_err()
            g.traffic(8)
            aer_inject(qmp, "nic0", "COMP_TIME", header0=0x4A000001, header1=0x0100000F, header2=0xFEE00000,
                       header3=0x12345678)
            rec = wait_recovery(qmp)
            assert rec["state"] == "io_normal" and rec["errors"] == ["COMP_TIME"] and rec["source"] == "nic0"
            assert steps(rec) == [("error_detected", "nic0", "CAN_RECOVER(2)"), ("mmio_enabled", "nic0", "RECOVERED(5)"),
                                  ("resume", "nic0", "none"), ("recovered", None, "RECOVERED(5)")]
            assert rec["result"] == "RECOVERED(5)" and rec["code"] == 5 and rec["recovered"]
            assert rec["producers-at-error"]["nic0"][0] == 8
            wait_for(lambda: _eventfd_count(efd) > 0 or None, 30, "the ERR eventfd")
            st = aer_status(qmp)
            assert st["aer"]["uncor-status"] == 0  # the host cleared the live status at resume...
            assert st["unhandled"] and st["user-view"]["uncor-status"] == UNC.COMP_TIME  # ...the user's is latched
            assert st["err-eventfd"]["signals"] == 1
            # the user reads it in its CONFIG region
            assert cfg32(g.c, AER_UNCOR_STATUS) == UNC.COMP_TIME
            assert [cfg32(g.c, AER_HEADER_LOG + 4 * i) for i in range(4)] == [0x4A000001, 0x0100000F, 0xFEE00000,
                                                                              0x12345678]
            # a non-fatal error leaves the function working
            assert g.regs.r32(N.REG_ID) == N.NIC_ID_MAGIC
            g.regs.doorbell(0, 4)
            wait_for(lambda: g.regs.producer(0) == 12, 60, "records after the non-fatal error")
            # the user's RW1C write clears it: handled
            g.c.region_write(CONFIG, AER_UNCOR_STATUS, struct.pack("<I", UNC.COMP_TIME))
            assert cfg32(g.c, AER_UNCOR_STATUS) == 0
            assert not aer_status(qmp)["unhandled"]
            os.close(efd)
        finally:
            g.close()


def test_a_fatal_error_resets_every_function_of_a_two_function_card(workdir):
    with vfio_card(workdir, 2) as (_p, socks, qmp):
        g0, g1 = Guest(socks[0]), Guest(socks[1])
        try:
            efd0, efd1 = g0.register_err(), g1.register_err()
            g0.traffic(10)
            resets_before = [host_view(qmp, d)["nic"]["resets"] for d in ("nic0", "nic1")]
            assert cfg32(g0.c, 0x0C) >> 16 & 0x80  # function 0's header type: multi-function
            out = aer_inject(qmp, "nic0", "DLP")  # DLP is fatal by the default severity
            assert (out["bus"], out["devfn"]) == (1, 0)
            rec = wait_recovery(qmp)
            assert rec["state"] == "io_frozen" and rec["recovered"] and rec["result"] == "RECOVERED(5)"
            assert steps(rec) == [
                ("error_detected", "nic0", "CAN_RECOVER(2)"), ("error_detected", "nic1", "CAN_RECOVER(2)"),
                ("link_reset", None, "RECOVERED(5)"),
                ("mmio_enabled", "nic0", "RECOVERED(5)"), ("mmio_enabled", "nic1", "RECOVERED(5)"),
                ("resume", "nic0", "none"), ("resume", "nic1", "none"), ("recovered", None, "RECOVERED(5)")]
            assert rec["producers-at-error"] == {"nic0": [10, 0, 0, 0], "nic1": [0, 0, 0, 0]}
            # every function below the port was reset by the one secondary bus reset
            assert aer_status(qmp, "rp0")["bridge"]["secondary-bus-resets"] == 1
            assert [host_view(qmp, d)["nic"]["resets"] for d in ("nic0", "nic1")] == [r + 1 for r in resets_before]
            # both users were told, and the records written before the error are still in memory
            assert _eventfd_count(efd0) > 0 and _eventfd_count(efd1) > 0
            assert [r[0] for r in records(g0.mem, 10)] == list(range(1, 11))
            # the device is back: real values, its queues reset, its config (bus master) restored
            assert g0.regs.r32(N.REG_ID) == N.NIC_ID_MAGIC and g0.regs.r32(g0.regs.q(0, N.Q_ENABLE)) == 0
            assert int.from_bytes(g0.c.region_read(CONFIG, 4, 2), "little") & 0x4
            assert cfg32(g0.c, AER_UNCOR_STATUS) == UNC.DLP  # latched for the user
            st = aer_status(qmp)
            assert st["recovery-state"] == "idle" and not st["frozen"] and st["link-up"]
            os.close(efd0)
            os.close(efd1)
        finally:
            g0.close()
            g1.close()


# -- a client that ignores ERR; release with an unhandled error --------------------------------------------
@pytest.mark.parametrize("link_reset", [True, False], ids=["host-link-reset", "cao-rfc-no-host-reset"])
def test_a_client_that_never_registered_err_the_host_still_resets_and_the_next_client_gets_a_working_device(
        workdir, link_reset):
    with vfio_server(workdir) as (_p, sock, qmp):
        # only the host's link reset is under test here (not the reset on release)
        set_fault(qmp, "nic0", "aer-reset-on-release", "off")
        if not link_reset:
            set_fault(qmp, "host", "aer-host-link-reset", "off")
        g = Guest(sock)
        try:
            g.traffic(3)
            aer_inject(qmp, "nic0", "MALF_TLP")
            rec = wait_recovery(qmp)
            link = [s for s in rec["steps"] if s["step"] == "link_reset"]
            assert len(link) == 1 and rec["recovered"]
            assert aer_status(qmp)["err-eventfd"]["no-trigger"] >= 1  # nobody to tell
            ident = g.regs.r32(N.REG_ID)
        finally:
            g.close()
        wait_for(lambda: not host_view(qmp)["server"]["connected"], 30, "the client gone")
        nxt = VfioUserClient(sock)
        try:
            vendor = int.from_bytes(nxt.region_read(CONFIG, 0, 2), "little")
            ident2 = NicRegs(nxt).r32(N.REG_ID)
        finally:
            nxt.close()
        if link_reset:
            assert link[0]["result"] == "RECOVERED(5)"
            assert ident == N.NIC_ID_MAGIC and (vendor, ident2) == (N.NIC_VENDOR_ID, N.NIC_ID_MAGIC)
        else:  # Cao's RFC: the host trusted the user, who never reset: frozen for the next client
            assert link[0]["result"] == "none" and "skipped" in link[0]
            assert ident == ALL_F and (vendor, ident2) == (0xFFFF, ALL_F)


@pytest.mark.parametrize("reset_on_release", [True, False], ids=["reset-on-release", "no-reset"])
def test_a_frozen_function_released_with_an_unhandled_error_gets_a_bus_reset(workdir, reset_on_release):
    """Cao's RFC on the host (no link reset of its own) and a client that ignores the fatal error:
    the release still gives the next client a working function, by a secondary bus reset (an FLR
    does not reach a function whose link is down)."""
    with vfio_server(workdir) as (_p, sock, qmp):
        set_fault(qmp, "host", "aer-host-link-reset", "off")
        if not reset_on_release:
            set_fault(qmp, "nic0", "aer-reset-on-release", "off")
        g = Guest(sock)
        try:
            aer_inject(qmp, "nic0", "SDN")
            wait_recovery(qmp)
            assert g.regs.r32(N.REG_ID) == ALL_F and aer_status(qmp)["frozen"]
        finally:
            g.close()
        wait_for(lambda: not host_view(qmp)["server"]["connected"], 30, "the client gone")
        nxt = VfioUserClient(sock)
        try:
            ident, status = NicRegs(nxt).r32(N.REG_ID), cfg32(nxt, AER_UNCOR_STATUS)
        finally:
            nxt.close()
        counts = host_view(qmp)["host"]["counts"]
        if reset_on_release:
            assert (ident, status) == (N.NIC_ID_MAGIC, 0)
            assert counts["release-bus-resets"] == 1 and aer_status(qmp, "rp0")["bridge"]["secondary-bus-resets"] == 1
        else:
            assert ident == ALL_F and "release-bus-resets" not in counts


@pytest.mark.parametrize("reset_on_release", [True, False], ids=["reset-on-release", "no-reset"])
def test_an_unhandled_error_is_reset_before_the_next_client(workdir, reset_on_release):
    with vfio_server(workdir) as (_p, sock, qmp):
        if not reset_on_release:
            set_fault(qmp, "nic0", "aer-reset-on-release", "off")
        g = Guest(sock)
        try:
            efd = g.register_err()
            aer_inject(qmp, "nic0", "COMP_TIME")
            wait_recovery(qmp)
            assert cfg32(g.c, AER_UNCOR_STATUS) == UNC.COMP_TIME and aer_status(qmp)["unhandled"]
            os.close(efd)
        finally:
            g.close()  # without looking at the error
        wait_for(lambda: not host_view(qmp)["server"]["connected"], 30, "the client gone")
        flr = host_view(qmp)["nic"]["flr"]
        nxt = VfioUserClient(sock)
        try:
            stale = cfg32(nxt, AER_UNCOR_STATUS)
        finally:
            nxt.close()
        if reset_on_release:
            assert stale == 0 and flr == 1 and not aer_status(qmp)["unhandled"]
        else:
            assert stale == UNC.COMP_TIME and flr == 0  # the next client sees the last one's error


# -- accesses racing the link reset ----------------------------------------------------------------------------
@pytest.mark.parametrize("gate", [True, False], ids=["gate", "no-gate"])
def test_accesses_during_the_link_reset_wait_then_succeed_never_all_fs(workdir, gate):
    # a long link-down window, so that the accesses below are surely issued inside it
    with vfio_server(workdir, "--link-reset-ms", "4000") as (_p, sock, qmp):
        if not gate:
            set_fault(qmp, "nic0", "aer-access-gate", "off")
        g = Guest(sock)
        try:
            efd = g.register_err()
            g.traffic(2)
            aer_inject(qmp, "nic0", "DLP")
            wait_for(lambda: aer_status(qmp)["recovery-state"] == "link-down", 60, "the link reset")
            got: dict[str, object] = {}

            def read() -> None:
                got["id"] = g.regs.r32(N.REG_ID)
                got["vendor"] = int.from_bytes(g.c.region_read(CONFIG, 0, 2), "little")

            def set_irqs() -> None:
                g.c.set_irqs(IX.ERR, TRIGGER, 0, 1, fds=[efd])
                got["set-irqs"] = "ok"

            def reset() -> None:
                g.c.reset()
                got["reset"] = "ok"

            ts = [threading.Thread(target=f) for f in (read, set_irqs, reset)]
            for t in ts:
                t.start()
            for t in ts:
                t.join(60)
            st = aer_status(qmp)
            if gate:
                assert got == {"id": N.NIC_ID_MAGIC, "vendor": N.NIC_VENDOR_ID, "set-irqs": "ok", "reset": "ok"}
                assert st["gate"]["waits"] >= 1 and st["gate"]["refused"] == 0
            else:
                assert got["id"] == ALL_F and got["vendor"] == 0xFFFF  # read while the link was down
                assert st["gate"]["waits"] == 0
            wait_recovery(qmp)
            os.close(efd)
        finally:
            g.close()


@pytest.mark.parametrize("gate", [True, False], ids=["gate", "no-gate"])
def test_a_link_that_never_returns_fails_the_accesses_with_eio_and_the_device_is_failed(workdir, gate):
    args = ("--link-reset-ms", "50", "--link-ready-timeout-ms", "500", "--recovery-wait-ms", "5000")
    with vfio_server(workdir, *args) as (_p, sock, qmp):
        set_fault(qmp, "host", "link-never-returns", "on")
        if not gate:
            set_fault(qmp, "nic0", "aer-access-gate", "off")
        g = Guest(sock)
        try:
            aer_inject(qmp, "nic0", "DLP")
            wait_for(lambda: aer_status(qmp)["recovery-state"] in ("link-down", "failed"), 60, "the link reset")
            if gate:
                for call in (lambda: g.regs.r32(N.REG_ID), lambda: g.c.set_irqs(IX.MSIX, TRIGGER, 0, 0, fds=[]),
                             g.c.reset, lambda: g.c.region_write(0, 0x110, b"\0\0\0\0")):
                    with pytest.raises(VfioRequestError) as ei:
                        call()
                    assert ei.value.errno == errno.EIO  # an error, not the client's 30 s timeout
            else:
                assert g.regs.r32(N.REG_ID) == ALL_F
            rec = wait_recovery(qmp)
            assert not rec["recovered"] and rec["result"] == "DISCONNECT(4)" and rec["not-back"] == ["nic0"]
            assert ("link_reset", None, "DISCONNECT(4)") in steps(rec)
            assert ("failed", "nic0", "DISCONNECT(4)") in steps(rec)
            if gate:  # and later
                with pytest.raises(VfioRequestError) as ei:
                    g.c.region_read(CONFIG, 0, 4)
                assert ei.value.errno == errno.EIO
            st = aer_status(qmp)
            assert st["failed"] and st["recovery-state"] == "failed"
            assert st["gate"]["refused"] == (5 if gate else 0)
        finally:
            g.close()


# -- kickcall's hot reset extension -----------------------------------------------------------------------------
def test_hot_reset_info_lists_every_function_of_the_card(workdir):
    with vfio_card(workdir, 2) as (_p, socks, qmp):
        c0, c1 = VfioUserClient(socks[0]), VfioUserClient(socks[1])
        try:
            assert c0.hot_reset_offer is not None and c1.hot_reset_offer is not None
            assert str(c0.hot_reset_offer.address) == "0000:01:00.0"
            assert str(c1.hot_reset_offer.address) == "0000:01:00.1"
            assert c0.hot_reset_offer.token != c1.hot_reset_offer.token
            assert c0.hot_reset_info() == c1.hot_reset_info() == [PciAddress(0, 1, 0), PciAddress(0, 1, 1)]
        finally:
            c0.close()
            c1.close()


def test_hot_reset_requires_every_function_held_and_resets_the_bus_once(workdir):
    with vfio_card(workdir, 2) as (_p, socks, qmp):
        g0 = Guest(socks[0])
        try:
            assert g0.c.hot_reset_offer is not None
            with pytest.raises(VfioRequestError) as ei:  # function 1 is held by nobody
                g0.c.hot_reset([])
            assert ei.value.errno == errno.EPERM
            g1 = Guest(socks[1])
            try:
                assert g1.c.hot_reset_offer is not None
                for tokens in ([], [os.urandom(16)], [g0.c.hot_reset_offer.token]):  # no proof for function 1
                    with pytest.raises(VfioRequestError) as ei:
                        g0.c.hot_reset(tokens)
                    assert ei.value.errno == errno.EPERM
                assert aer_status(qmp, "rp0")["bridge"]["secondary-bus-resets"] == 0
                # the user's interrupt setup survives the reset (save/restore around it)
                efd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
                g0.c.set_irqs(IX.MSIX, TRIGGER, 0, 1, fds=[efd])
                g0.traffic(5)
                resets = [host_view(qmp, d)["nic"]["resets"] for d in ("nic0", "nic1")]
                g0.c.hot_reset([g0.c.hot_reset_offer.token, g1.c.hot_reset_offer.token])
                rp = aer_status(qmp, "rp0")
                assert rp["bridge"]["secondary-bus-resets"] == 1 and rp["recovery"]["counts"]["hot-resets"] == 1
                assert [host_view(qmp, d)["nic"]["resets"] for d in ("nic0", "nic1")] == [r + 1 for r in resets]
                assert aer_status(qmp, "nic0")["hot-resets"] == 1 and aer_status(qmp, "nic1")["hot-resets"] == 1
                v = host_view(qmp)
                assert v["host"]["irq-type"] == "MSIX" and v["nic"]["msix"]["enabled"]
                _eventfd_count(efd)
                g0.traffic(3)  # the queue is reset with the function; set up again, its interrupt arrives
                wait_for(lambda: _eventfd_count(efd) > 0 or None, 30, "the MSI-X interrupt after the hot reset")
                g1.c.hot_reset([g0.c.hot_reset_offer.token])  # the sender's own token may be left out
                assert aer_status(qmp, "rp0")["bridge"]["secondary-bus-resets"] == 2
                os.close(efd)
            finally:
                g1.close()
        finally:
            g0.close()


def test_a_client_that_does_not_propose_the_capability_is_never_offered_it_and_the_commands_are_unknown(workdir):
    with vfio_card(workdir, 2) as (_p, socks, _qmp):
        old, c1 = VfioUserClient(socks[0], propose_hot_reset=False), VfioUserClient(socks[1])
        try:
            assert old.hot_reset_offer is None and not old.server_caps.extensions
            for cmd, payload in ((VfioUserCommand.X_KICKCALL_PCI_HOT_RESET_INFO, struct.pack("<III", 12, 0, 0)),
                                 (VfioUserCommand.X_KICKCALL_PCI_HOT_RESET, HotReset([]).encode())):
                with pytest.raises(VfioRequestError) as ei:
                    old.request(cmd, payload)
                assert ei.value.errno == errno.EINVAL
            # and function 0 held by a client that cannot prove it: no hot reset for the other one either
            with pytest.raises(VfioRequestError) as ei:
                c1.hot_reset([])
            assert ei.value.errno == errno.EPERM
            assert old.get_device_info().num_irqs == 5
        finally:
            old.close()
            c1.close()


@pytest.mark.parametrize("cmd,payload", [
    (VfioUserCommand.X_KICKCALL_PCI_HOT_RESET_INFO, b""),
    (VfioUserCommand.X_KICKCALL_PCI_HOT_RESET_INFO, b"\x01\x02\x03"),
    (VfioUserCommand.X_KICKCALL_PCI_HOT_RESET_INFO, struct.pack("<III", 12, 1, 0)),
    (VfioUserCommand.X_KICKCALL_PCI_HOT_RESET_INFO, struct.pack("<III", 999, 0, 0)),
    (VfioUserCommand.X_KICKCALL_PCI_HOT_RESET_INFO, struct.pack("<III", 20, 0, 1) + b"\xff" * 8),
    (VfioUserCommand.X_KICKCALL_PCI_HOT_RESET, b""),
    (VfioUserCommand.X_KICKCALL_PCI_HOT_RESET, struct.pack("<III", 12, 1, 0)),
    (VfioUserCommand.X_KICKCALL_PCI_HOT_RESET, struct.pack("<III", 28, 0, 1) + b"\0" * 15),
    (VfioUserCommand.X_KICKCALL_PCI_HOT_RESET, struct.pack("<III", 12, 0, 0xFFFFFFFF)),
    (VfioUserCommand.X_KICKCALL_PCI_HOT_RESET, struct.pack("<III", 0xFFFFFFFF, 0, 2) + b"\0" * 32),
], ids=["info-empty", "info-short", "info-flags", "info-argsz", "info-count", "reset-empty", "reset-flags",
        "reset-short-token", "reset-count", "reset-argsz"])
def test_hostile_hot_reset_payloads_get_an_error_reply_and_the_server_carries_on(workdir, cmd, payload):
    with vfio_card(workdir, 2) as (p, socks, qmp):
        c = VfioUserClient(socks[0])
        try:
            with pytest.raises(VfioRequestError) as ei:
                c.request(cmd, payload)
            assert ei.value.errno in (errno.EINVAL, errno.EPERM)
            assert c.get_device_info().num_irqs == 5 and c.hot_reset_info()  # the connection carries on
            assert p.poll() is None
            assert aer_status(qmp, "rp0")["bridge"]["secondary-bus-resets"] == 0
        finally:
            c.close()


def test_the_monitor_lists_every_function_and_the_port(workdir):
    with vfio_card(workdir, 3) as (_p, socks, qmp):
        for i in range(3):
            st = aer_status(qmp, f"nic{i}")
            assert st["bdf"] == f"0000:01:00.{i}" and st["driver"] == "vfio-pci"
        assert aer_status(qmp, "rp0")["bdf"] == "0000:00:1c.0"
        assert {f["name"] for f in qmp_call(qmp, "x-debug-fault", {"dev": "host"})["faults"]} == \
            {"aer-host-link-reset", "link-never-returns"}
        assert host_view(qmp, "nic2")["aer"]["recovery-state"] == "idle"
        # HMP, QEMU's syntax, through the same seam
        out = qmp_call(qmp, "human-monitor-command", {"command-line": "pcie_aer_inject_error -c nic2 0x40"})
        assert "error" not in str(out).lower()
        wait_for(lambda: aer_status(qmp, "nic2")["recovery"]["counts"]["correctable"] == 1, 60, "the HMP injection")
        info = qmp_call(qmp, "human-monitor-command", {"command-line": "info pci-aer nic2"})
        assert "nic2" in str(info)
