"""The virtio-pci transport on its own (no machine): capabilities, common config, vector read-back,
feature negotiation, ISR read-to-clear, the per-queue records the proxy owns and the kick/call
paths it counts, and hostile register writes."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from kickcall.memory import AddressSpace, GuestMemory
from kickcall.pci import regs as R
from kickcall.pci.bus import PCIBus
from kickcall.pci.msix import MsixNotifyOutcome
from kickcall.virtio.blk import VirtIOBlk, make_image
from kickcall.virtio.pci import (
    C_DF, C_DFSELECT, C_GF, C_GFSELECT, C_MSIX, C_NUMQ, C_Q_DESCLO, C_Q_ENABLE, C_Q_MSIX, C_Q_NOFF,
    C_Q_SELECT, C_Q_SIZE, C_STATUS, QUEUE_MEM_MULT, VirtIOPCIProxy, VirtIOPCIQueue,
)
from kickcall.virtio.paths import CallPath, KickPath

BAR4 = 0xE000_0000
BAR1 = 0xE001_0000


class Rig:
    def __init__(self, tmpdir: str, nvec: int | None = None, **proxy_kw) -> None:
        img = f"{tmpdir}/d.img"
        make_image(img, 1 << 20)
        self.mem = GuestMemory.create(1 << 20)
        self.mmio = AddressSpace("memory")
        self.io = AddressSpace("io")
        self.lines: list = []
        self.msis: list = []
        self.bus = PCIBus(self.mmio, self.io, irq_line=lambda g, lvl: self.lines.append((g, lvl)),
                          msi_sink=lambda a, d: self.msis.append((a, d)))
        self.vdev = VirtIOBlk("blk0", img, num_queues=2, queue_size=64, aio="sync")
        self.vdev.mem = self.mem
        self.p = VirtIOPCIProxy(self.vdev, msix_vectors=nvec, **proxy_kw)
        self.bus.add_device(self.p, 3)
        self.p.config_write(R.PCI_BASE_ADDRESS_0 + 16, BAR4, 4)
        self.p.config_write(R.PCI_BASE_ADDRESS_0 + 20, 0, 4)
        self.p.config_write(R.PCI_BASE_ADDRESS_0 + 4, BAR1, 4)
        self.p.config_write(R.PCI_COMMAND, R.PCI_COMMAND_MEMORY | R.PCI_COMMAND_MASTER, 2)

    def w(self, off: int, v: int, size: int) -> None:
        self.mmio.write(BAR4 + off, v, size)

    def r(self, off: int, size: int) -> int:
        return self.mmio.read(BAR4 + off, size)

    def close(self) -> None:
        self.vdev.close()
        self.vdev.release_rings()
        self.mem.close()


@pytest.fixture
def rig(tmp_path):
    r = Rig(str(tmp_path))
    yield r
    r.close()


def test_ids_and_vendor_capabilities(rig):
    p = rig.p
    assert p.get16(R.PCI_VENDOR_ID) == 0x1AF4 and p.get16(R.PCI_DEVICE_ID) == 0x1042
    caps = {}
    off = p.config[R.PCI_CAPABILITY_LIST]
    while off:
        if p.config[off] == R.PCI_CAP_ID_VNDR:
            cfg_type, bar = p.config[off + 3], p.config[off + 4]
            offset, length = struct.unpack_from("<II", p.config, off + 8)
            caps[cfg_type] = (bar, offset, length, off)
        off = p.config[off + 1]
    assert set(caps) == {1, 2, 3, 4}
    assert all(c[0] == 4 for c in caps.values())
    notify_off = caps[2][3]
    assert struct.unpack_from("<I", p.config, notify_off + 16)[0] == 4  # notify_off_multiplier
    assert p.find_capability(R.PCI_CAP_ID_MSIX) and p.find_capability(R.PCI_CAP_ID_EXP)


def test_feature_negotiation(rig):
    rig.w(C_DFSELECT, 1, 4)
    assert rig.r(C_DF, 4) & 1  # VIRTIO_F_VERSION_1 (bit 32)
    rig.w(C_STATUS, 1 | 2, 1)
    # ask for a feature the device does not offer: FEATURES_OK does not stick
    rig.w(C_GFSELECT, 0, 4)
    rig.w(C_GF, 1 << 31, 4)
    rig.w(C_GFSELECT, 1, 4)
    rig.w(C_GF, 1, 4)
    rig.w(C_STATUS, 1 | 2 | 8, 1)
    assert not rig.r(C_STATUS, 1) & 8
    rig.w(C_GFSELECT, 0, 4)
    rig.w(C_GF, 1 << 29, 4)  # EVENT_IDX
    rig.w(C_STATUS, 1 | 2 | 8, 1)
    assert rig.r(C_STATUS, 1) & 8
    assert rig.vdev.queues[0].event_idx


def test_vector_read_back_refuses_a_vector_the_table_does_not_have(rig):
    assert rig.r(C_NUMQ, 2) == 2
    rig.w(C_MSIX, 0, 2)
    assert rig.r(C_MSIX, 2) == 0 and rig.p.msix.use_count[0] == 1
    rig.w(C_Q_SELECT, 1, 2)
    rig.w(C_Q_MSIX, 2, 2)
    assert rig.r(C_Q_MSIX, 2) == 2
    rig.w(C_Q_MSIX, 99, 2)  # beyond the 3-entry table
    assert rig.r(C_Q_MSIX, 2) == 0xFFFF and rig.p.msix.use_count[2] == 0
    assert rig.r(C_Q_NOFF, 2) == 1
    rig.w(C_Q_SELECT, 7, 2)  # no such queue: reads as size 0
    assert rig.r(C_Q_SIZE, 2) == 0


def test_no_msix_means_no_vector_and_intx_with_isr_read_to_clear(tmp_path):
    r = Rig(str(tmp_path), nvec=0)
    try:
        assert r.p.msix is None
        r.w(C_MSIX, 0, 2)
        assert r.r(C_MSIX, 2) == 0xFFFF
        q = r.vdev.queues[0]
        r.p.notify_queue(q)
        assert r.lines[-1][1] == 1 and r.p.irq_level == 1
        assert r.r(0x1000, 1) == 1  # ISR: queue interrupt
        assert r.lines[-1][1] == 0 and r.p.irq_level == 0
        assert r.r(0x1000, 1) == 0  # read-to-clear
        r.p.notify_config()
        assert r.r(0x1000, 1) == 2
    finally:
        r.close()


def test_queue_registers_ignore_writes_once_enabled(rig):
    rig.w(C_Q_SELECT, 0, 2)
    rig.w(C_Q_SIZE, 32, 2)
    rig.w(C_Q_DESCLO, 0x4000, 4)
    rig.w(C_Q_ENABLE, 1, 2)
    rig.w(C_Q_SIZE, 16, 2)
    rig.w(C_Q_DESCLO, 0x8000, 4)
    q = rig.vdev.queues[0]
    assert q.num == 32 and q.desc == 0x4000 and q.enabled


def test_msix_use_counts_follow_vector_assignment_and_reset(rig):
    rig.w(C_Q_SELECT, 0, 2)
    rig.w(C_Q_MSIX, 1, 2)
    rig.w(C_Q_SELECT, 1, 2)
    rig.w(C_Q_MSIX, 1, 2)
    assert rig.p.msix.use_count[1] == 2
    rig.w(C_Q_MSIX, 2, 2)
    assert rig.p.msix.use_count[1] == 1 and rig.p.msix.use_count[2] == 1
    rig.w(C_STATUS, 0, 1)  # reset releases every vector
    assert rig.p.msix.use_count == [0, 0, 0]
    assert all(q.vector == 0xFFFF for q in rig.vdev.queues)


class FakeVM:
    """The two things the proxy asks of the hypervisor for the call path: irqfd (de)assignment,
    recorded, and MSI routes (one GSI per vector)."""

    def __init__(self) -> None:
        self.irqfds: list[tuple[int, bool]] = []  # (gsi, deassign)
        self.next_gsi = 40

    def irqfd(self, notifier, gsi: int, *, deassign: bool = False) -> dict:
        self.irqfds.append((gsi, deassign))
        return {}

    # MsiRoutes
    def add(self, address: int, data: int) -> int:
        self.next_gsi += 1
        return self.next_gsi

    def update(self, gsi: int, address: int, data: int) -> bool:
        return False

    def release(self, gsi: int) -> None:
        pass

    def commit(self) -> None:
        pass


MSIX_CTRL_OFF = R.PCI_MSIX_ENTRY_VECTOR_CTRL


def _driver_ok(r: Rig, vector: int) -> None:
    """The driver's bring-up of queue 0 with MSI-X *vector* (MSI-X enabled first, as Linux does)."""
    cap = r.p.msix.cap
    r.p.config_write(cap + R.PCI_MSIX_FLAGS, R.PCI_MSIX_FLAGS_ENABLE, 2)
    r.w(C_STATUS, 1 | 2, 1)
    r.w(C_GFSELECT, 1, 4)
    r.w(C_GF, 1, 4)  # VIRTIO_F_VERSION_1
    r.w(C_STATUS, 1 | 2 | 8, 1)
    r.w(C_Q_SELECT, 0, 2)
    r.w(C_Q_SIZE, 16, 2)
    r.w(C_Q_DESCLO, 0x4000, 4)
    r.w(C_Q_MSIX, vector, 2)
    r.w(C_Q_ENABLE, 1, 2)
    r.w(C_STATUS, 1 | 2 | 8 | 4, 1)


def _vector_mask(r: Rig, v: int, masked: bool) -> None:
    r.mmio.write(BAR1 + v * R.PCI_MSIX_ENTRY_SIZE + MSIX_CTRL_OFF, int(masked), 4)


def test_the_proxy_owns_each_queue_s_record_through_bind_mask_unmask_and_reset(tmp_path):
    """gsi / irqfd / polled live in the proxy's VirtIOPCIQueue (not on the VirtQueue), follow the
    vector's mask, and the calls are counted by path with CallPath members."""
    vm = FakeVM()
    r = Rig(str(tmp_path), vm=vm, routes=vm, ioeventfd=False)
    try:
        q = r.vdev.queues[0]
        assert r.p.queue_state(0) == VirtIOPCIQueue(0)
        _driver_ok(r, 1)
        st = r.p.queue_state(0)
        # vectors come out of reset masked: no irqfd, the VMM polls the guest notifier
        assert st.gsi is not None and not st.irqfd and st.polled and q.guest_notifier is not None
        assert not hasattr(q, "_gsi")  # nothing attached to the foreign object
        gsi = st.gsi
        r.p.notify_queue(q)
        _vector_mask(r, 1, False)
        st = r.p.queue_state(0)
        assert st == VirtIOPCIQueue(0, gsi=gsi, irqfd=True, polled=False) and vm.irqfds == [(gsi, False)]
        r.p.notify_queue(q)
        _vector_mask(r, 1, True)
        assert r.p.queue_state(0) == VirtIOPCIQueue(0, gsi=gsi, irqfd=False, polled=True)
        assert vm.irqfds == [(gsi, False), (gsi, True)]
        assert q.calls_by_path == {"masked-poll": 1, "irqfd": 1}
        assert set(map(type, q.calls_by_path)) == {CallPath}
        info = r.p.queue_info(q)
        assert info["irqfd"] is False and info["polled"] is True
        # a reader's copy is a copy: the proxy's record does not change with it
        st = r.p.queue_state(0)
        st.irqfd = True
        assert not r.p.queue_state(0).irqfd
        r.w(C_STATUS, 0, 1)  # reset: the guest notifier is unbound, the record cleared
        assert r.p.queue_state(0) == VirtIOPCIQueue(0)
    finally:
        r.close()


def test_calls_without_irqfd_are_counted_as_msi_pba_and_intx(tmp_path):
    r = Rig(str(tmp_path), ioeventfd=False)
    try:
        q = r.vdev.queues[0]
        _driver_ok(r, 1)
        assert q.guest_notifier is None and r.p.queue_state(0).gsi is None  # no VM: no irqfd
        r.p.notify_queue(q)  # masked: the PBA
        _vector_mask(r, 1, False)  # the unmask delivers it
        r.p.notify_queue(q)
        assert q.calls_by_path == {CallPath.PBA: 1, CallPath.MSI: 1} and len(r.msis) == 2
        r.p.config_write(r.p.msix.cap + R.PCI_MSIX_FLAGS, 0, 2)  # MSI-X off
        r.p.notify_queue(q)
        assert q.calls_by_path[CallPath.INTX] == 1 and r.p.irq_level == 1
        assert r.p.msix.notify(1) is MsixNotifyOutcome.DISABLED
        assert not MsixNotifyOutcome.DISABLED.delivered and MsixNotifyOutcome.PENDED.delivered
    finally:
        r.close()


def test_a_doorbell_write_without_ioeventfd_is_a_heavyweight_kick(tmp_path):
    r = Rig(str(tmp_path), ioeventfd=False)
    try:
        q = r.vdev.queues[0]
        _driver_ok(r, 0)
        r.w(0x3000 + QUEUE_MEM_MULT * 0, 0, 2)  # the guest's doorbell write: an MMIO exit
        r.p.notify_write(QUEUE_MEM_MULT * 0, 0, 2)  # the same handler, called as the monitor does
        r.p.notify_write(QUEUE_MEM_MULT * 9, 9, 2)  # no such queue: ignored
        assert q.kicks == 2 and q.kicks_by_path == {"mmio": 2}
        assert list(q.kicks_by_path) == [KickPath.MMIO] and type(next(iter(q.kicks_by_path))) is KickPath
    finally:
        r.close()


OFFSETS = st.one_of(st.integers(0, 0x40), st.integers(0x1000, 0x1004), st.integers(0x2000, 0x2040),
                    st.integers(0x3000, 0x3010), st.integers(0, 0x3FFF))


@given(st.lists(st.tuples(OFFSETS, st.sampled_from([1, 2, 4, 8]), st.integers(0, 2**64 - 1)), max_size=60))
def test_hostile_register_writes_never_break_the_transport(tmp_path_factory, writes):
    """Any sequence of guest writes to the virtio BAR and MSI-X BAR: no exception escapes, the
    device never leaves a queue enabled with a size that is not a power of two, and a reset
    brings everything back."""
    r = Rig(str(tmp_path_factory.mktemp("h")))
    try:
        for off, size, value in writes:
            r.w(off, value & ((1 << (8 * size)) - 1), size)
            r.mmio.write(BAR1 + (off & 0xFFF), value & ((1 << (8 * size)) - 1), size)
            r.r(off, size)
        for q in r.vdev.queues:
            assert q.num & (q.num - 1) == 0 and 1 <= q.num <= q.num_max
        r.w(C_STATUS, 0, 1)
        assert r.vdev.status == 0 and not any(q.enabled for q in r.vdev.queues)
        assert all(u == 0 for u in r.p.msix.use_count)
    finally:
        r.close()
