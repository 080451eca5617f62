"""The virtio-pci transport on its own (no machine): capabilities, common config, vector read-back,
feature negotiation, ISR read-to-clear, and hostile register writes."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from kickcall.memory import AddressSpace, GuestMemory
from kickcall.pci import regs as R
from kickcall.pci.bus import PCIBus
from kickcall.virtio.blk import VirtIOBlk, make_image
from kickcall.virtio.pci import (
    C_DF, C_DFSELECT, C_GF, C_GFSELECT, C_MSIX, C_NUMQ, C_Q_DESCLO, C_Q_ENABLE, C_Q_MSIX, C_Q_NOFF,
    C_Q_SELECT, C_Q_SIZE, C_STATUS, VirtIOPCIProxy,
)

BAR4 = 0xE000_0000
BAR1 = 0xE001_0000


class Rig:
    def __init__(self, tmpdir: str, nvec: int | None = None) -> None:
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
        self.p = VirtIOPCIProxy(self.vdev, msix_vectors=nvec)
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
