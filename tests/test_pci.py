"""PCI: config space masks, BARs, INTx, MSI-X table/PBA/masks, FLR, the 0xCF8/0xCFC host bridge."""

from __future__ import annotations

import struct

import pytest

from kickcall.memory import AddressSpace, IORegion
from kickcall.pci import MSIX, PCIBus, PCIDevice, PCIHost
from kickcall.pci import regs as R
from kickcall.pci.msix import MsixNotifyOutcome as O

VENDOR = 0x1AF4
DEVICE = 0x1041
BAR0 = 0xFE000000
BAR1 = 0xFE001000
MSI_ADDR = 0xFEE01000


class RecordingDevice(PCIDevice):
    def __init__(self, *a, **kw) -> None:
        super().__init__(*a, **kw)
        self.bm_changes: list[bool] = []
        self.resets = 0

    def bus_master_changed(self, enabled: bool) -> None:
        self.bm_changes.append(enabled)

    def device_reset(self) -> None:
        self.resets += 1


class Rig:
    """A bus over two address spaces, with recording irq_line / msi_sink."""

    def __init__(self) -> None:
        self.memory = AddressSpace("memory")
        self.io = AddressSpace("io")
        self.lines: list[tuple[int, int]] = []
        self.msis: list[tuple[int, int]] = []
        self.bus = PCIBus(self.memory, self.io, irq_line=lambda g, lv: self.lines.append((g, lv)),
                          msi_sink=lambda a, d: self.msis.append((a, d)))
        self.bar_log: list[tuple] = []

    def device(self, name="dev", slot=1, *, pcie=False, msix=True, bar0=True) -> RecordingDevice:
        dev = RecordingDevice(name, vendor_id=VENDOR, device_id=DEVICE, class_code=0x010000,
                              revision=1, pcie=pcie)
        if bar0:
            def rd(off, size):
                self.bar_log.append(("r", name, off, size))
                return 0x5A5A5A5A

            def wr(off, value, size):
                self.bar_log.append(("w", name, off, value, size))

            dev.register_bar(0, IORegion(f"{name}-bar0", 4096, rd, wr))
        if msix:
            MSIX(dev, 4, bar_index=1)
        self.bus.add_device(dev, slot)
        return dev

    # guest config accesses
    def cfg_w(self, dev, off, value, size):
        self.bus.config_write(0, dev.devfn, off, value, size)

    def cfg_r(self, dev, off, size):
        return self.bus.config_read(0, dev.devfn, off, size)


@pytest.fixture
def rig():
    return Rig()


def cmd(rig, dev, bits):
    rig.cfg_w(dev, R.PCI_COMMAND, bits, 2)


def program_bars(rig, dev):
    rig.cfg_w(dev, R.PCI_BASE_ADDRESS_0, BAR0, 4)
    rig.cfg_w(dev, R.PCI_BASE_ADDRESS_0 + 4, BAR1, 4)


# -- config space -----------------------------------------------------------------------------------

def test_read_only_bytes_ignore_writes(rig):
    dev = rig.device()
    assert rig.cfg_r(dev, R.PCI_VENDOR_ID, 2) == VENDOR
    assert rig.cfg_r(dev, R.PCI_VENDOR_ID, 4) == DEVICE << 16 | VENDOR
    rig.cfg_w(dev, R.PCI_VENDOR_ID, 0xFFFFFFFF, 4)
    rig.cfg_w(dev, R.PCI_REVISION_ID, 0xFF, 1)
    rig.cfg_w(dev, R.PCI_INTERRUPT_PIN, 4, 1)
    assert rig.cfg_r(dev, R.PCI_VENDOR_ID, 4) == DEVICE << 16 | VENDOR
    assert rig.cfg_r(dev, R.PCI_REVISION_ID, 1) == 1
    assert rig.cfg_r(dev, R.PCI_INTERRUPT_PIN, 1) == 1
    # interrupt line is writable
    rig.cfg_w(dev, R.PCI_INTERRUPT_LINE, 0x0B, 1)
    assert rig.cfg_r(dev, R.PCI_INTERRUPT_LINE, 1) == 0x0B
    # outside config space: ignored / all ones
    assert dev.config_read(256, 4) == 0xFFFFFFFF
    dev.config_write(254, 0xFFFFFFFF, 4)


def test_status_w1c_bits(rig):
    dev = rig.device()
    w1c = R.PCI_STATUS_SIG_SYSTEM_ERROR | R.PCI_STATUS_DETECTED_PARITY
    st0 = dev.get16(R.PCI_STATUS)
    assert st0 & R.PCI_STATUS_CAP_LIST
    dev.set_config(R.PCI_STATUS, st0 | w1c, 2)
    rig.cfg_w(dev, R.PCI_STATUS, 0, 2)  # writing 0 changes nothing
    assert rig.cfg_r(dev, R.PCI_STATUS, 2) == st0 | w1c
    rig.cfg_w(dev, R.PCI_STATUS, R.PCI_STATUS_DETECTED_PARITY, 2)  # clears only that bit
    assert rig.cfg_r(dev, R.PCI_STATUS, 2) == st0 | R.PCI_STATUS_SIG_SYSTEM_ERROR
    rig.cfg_w(dev, R.PCI_STATUS, 0xFFFF, 2)  # read-only bits survive all ones
    assert rig.cfg_r(dev, R.PCI_STATUS, 2) == st0
    # a dword write to COMMAND|STATUS clears W1C bits in the upper half
    dev.set_config(R.PCI_STATUS, st0 | w1c, 2)
    rig.cfg_w(dev, R.PCI_COMMAND, R.PCI_STATUS_SIG_SYSTEM_ERROR << 16, 4)
    assert rig.cfg_r(dev, R.PCI_STATUS, 2) == st0 | R.PCI_STATUS_DETECTED_PARITY


def test_capability_list(rig):
    dev = rig.device(pcie=True)
    assert dev.exp_cap and dev.find_capability(R.PCI_CAP_ID_EXP) == dev.exp_cap
    assert dev.find_capability(R.PCI_CAP_ID_MSIX) == dev.msix.cap
    assert dev.find_capability(R.PCI_CAP_ID_MSI) == 0
    first = rig.cfg_r(dev, R.PCI_CAPABILITY_LIST, 1)
    assert first == dev.exp_cap
    assert rig.cfg_r(dev, first + 1, 1) == dev.msix.cap
    assert rig.cfg_r(dev, dev.msix.cap + 1, 1) == 0


# -- BARs -----------------------------------------------------------------------------------------

def test_bar_sizing(rig):
    dev = rig.device(msix=False, bar0=False)
    dev.register_bar(0, IORegion("m", 4096))
    dev.register_bar(2, IORegion("m64", 0x4000), mem64=True, prefetch=True)
    dev.register_bar(4, IORegion("io", 32), io=True)
    for off in range(R.PCI_BASE_ADDRESS_0, R.PCI_BASE_ADDRESS_0 + 24, 4):
        rig.cfg_w(dev, off, 0xFFFFFFFF, 4)
    assert rig.cfg_r(dev, 0x10, 4) == 0xFFFFF000  # ~(4096-1), 32-bit memory
    assert rig.cfg_r(dev, 0x18, 4) == (~(0x4000 - 1) & 0xFFFFFFF0) | 0x4 | 0x8
    assert rig.cfg_r(dev, 0x1C, 4) == 0xFFFFFFFF  # upper half of the 64-bit BAR
    assert rig.cfg_r(dev, 0x20, 4) == (~(32 - 1) & 0xFFFFFFFC) | R.PCI_BASE_ADDRESS_SPACE_IO
    assert rig.cfg_r(dev, 0x14, 4) == 0  # unimplemented BAR
    # low (type) bits are read-only
    rig.cfg_w(dev, 0x10, 0, 4)
    rig.cfg_w(dev, 0x18, 0, 4)
    assert rig.cfg_r(dev, 0x10, 4) == 0
    assert rig.cfg_r(dev, 0x18, 4) == 0xC


def test_bar_register_rejects_bad_sizes(rig):
    dev = PCIDevice("x", vendor_id=1, device_id=2, class_code=0)
    with pytest.raises(ValueError):
        dev.register_bar(0, IORegion("odd", 0x3000))
    with pytest.raises(ValueError):
        dev.register_bar(0, IORegion("tiny", 8))
    with pytest.raises(ValueError):
        dev.register_bar(5, IORegion("m64", 0x1000), mem64=True)


def test_bar_mapped_only_with_memory_bit_and_nonzero_address(rig):
    dev = rig.device(msix=False)
    mem = rig.memory
    cmd(rig, dev, R.PCI_COMMAND_MEMORY)  # enabled, but BAR still 0: not mapped
    assert list(mem.mappings()) == []
    cmd(rig, dev, 0)
    rig.cfg_w(dev, R.PCI_BASE_ADDRESS_0, BAR0, 4)  # programmed, decoding off: not mapped
    assert list(mem.mappings()) == []
    assert mem.read(BAR0, 4) == 0xFFFFFFFF
    cmd(rig, dev, R.PCI_COMMAND_MEMORY)
    assert list(mem.mappings()) == [(BAR0, 4096, "dev-bar0")]
    assert dev.bars[0].mapped_at == BAR0
    assert mem.read(BAR0 + 8, 4) == 0x5A5A5A5A
    mem.write(BAR0 + 0x10, 7, 2)
    assert rig.bar_log == [("r", "dev", 8, 4), ("w", "dev", 0x10, 7, 2)]
    # moving the BAR moves the mapping
    rig.cfg_w(dev, R.PCI_BASE_ADDRESS_0, BAR0 + 0x10000, 4)
    assert list(mem.mappings()) == [(BAR0 + 0x10000, 4096, "dev-bar0")]
    # clearing the memory bit unmaps
    cmd(rig, dev, 0)
    assert list(mem.mappings()) == []
    assert dev.bars[0].mapped_at is None
    # the IO bit alone does not map a memory BAR
    cmd(rig, dev, R.PCI_COMMAND_IO)
    assert list(mem.mappings()) == []
    # BAR written to 0 while decoding: unmapped
    cmd(rig, dev, R.PCI_COMMAND_MEMORY)
    assert len(list(mem.mappings())) == 1
    rig.cfg_w(dev, R.PCI_BASE_ADDRESS_0, 0, 4)
    assert list(mem.mappings()) == []


def test_io_bar_maps_in_io_space(rig):
    dev = rig.device(msix=False, bar0=False)
    dev.register_bar(2, IORegion("dev-io", 32), io=True)
    rig.cfg_w(dev, 0x18, 0xC040, 4)
    assert list(rig.io.mappings()) == []
    cmd(rig, dev, R.PCI_COMMAND_IO)
    assert list(rig.io.mappings()) == [(0xC040, 32, "dev-io")]
    assert list(rig.memory.mappings()) == []
    cmd(rig, dev, 0)
    assert list(rig.io.mappings()) == []


def test_sizing_probe_with_decoding_on_is_not_mapped(rig):
    """bar_address() documents that a sizing probe decodes nowhere.  With memory decoding on,
    writing all ones to a 32-bit BAR leaves 0xfffff000 in it; that must not be mapped."""
    dev = rig.device(msix=False)
    cmd(rig, dev, R.PCI_COMMAND_MEMORY)
    rig.cfg_w(dev, R.PCI_BASE_ADDRESS_0, 0xFFFFFFFF, 4)
    assert rig.cfg_r(dev, R.PCI_BASE_ADDRESS_0, 4) == 0xFFFFF000
    assert dev.bar_address(dev.bars[0]) is None
    assert list(rig.memory.mappings()) == []


def test_bus_master_changed_called_on_transitions(rig):
    dev = rig.device(msix=False)
    cmd(rig, dev, R.PCI_COMMAND_MEMORY)
    assert dev.bm_changes == []
    cmd(rig, dev, R.PCI_COMMAND_MEMORY | R.PCI_COMMAND_MASTER)
    assert dev.bm_changes == [True]
    assert dev.bus_master
    cmd(rig, dev, R.PCI_COMMAND_MASTER)  # unchanged master bit: not called
    assert dev.bm_changes == [True]
    cmd(rig, dev, 0)
    assert dev.bm_changes == [True, False]
    assert not dev.bus_master


# -- INTx ---------------------------------------------------------------------------------------------

def test_intx_level_and_intx_disable(rig):
    dev = rig.device(msix=False, slot=1)
    gsi = PCIBus.intx_gsi(1, 1)
    assert gsi == 17
    assert rig.cfg_r(dev, R.PCI_INTERRUPT_LINE, 1) == gsi
    dev.set_irq(1)
    assert rig.lines == [(gsi, 1)]
    dev.set_irq(1)  # no change on the wire
    assert rig.lines == [(gsi, 1)]
    assert rig.cfg_r(dev, R.PCI_STATUS, 2) & R.PCI_STATUS_INTERRUPT
    cmd(rig, dev, R.PCI_COMMAND_INTX_DISABLE)
    assert rig.lines == [(gsi, 1), (gsi, 0)]
    assert rig.cfg_r(dev, R.PCI_STATUS, 2) & R.PCI_STATUS_INTERRUPT  # device level still shown
    dev.set_irq(0)
    assert rig.lines == [(gsi, 1), (gsi, 0)]
    assert not rig.cfg_r(dev, R.PCI_STATUS, 2) & R.PCI_STATUS_INTERRUPT
    dev.set_irq(1)  # raised while disabled: the line stays low
    assert rig.lines == [(gsi, 1), (gsi, 0)]
    cmd(rig, dev, 0)  # re-enabled: the pending level shows on the line
    assert rig.lines == [(gsi, 1), (gsi, 0), (gsi, 1)]
    dev.set_irq(0)
    assert rig.lines[-1] == (gsi, 0)


def test_intx_shared_line_is_wire_ored(rig):
    a = rig.device("a", slot=1, msix=False)
    b = rig.device("b", slot=5, msix=False)
    gsi = PCIBus.intx_gsi(1, 1)
    assert PCIBus.intx_gsi(5, 1) == gsi
    a.set_irq(1)
    b.set_irq(1)
    assert rig.lines == [(gsi, 1)]
    a.set_irq(0)
    assert rig.lines == [(gsi, 1)]  # b still holds it
    b.set_irq(0)
    assert rig.lines == [(gsi, 1), (gsi, 0)]
    c = rig.device("c", slot=2, msix=False)
    c.set_irq(1)
    assert rig.lines[-1] == (PCIBus.intx_gsi(2, 1), 1)


def test_add_device_refuses_taken_slot(rig):
    rig.device("a", slot=3, msix=False)
    with pytest.raises(ValueError):
        rig.device("b", slot=3, msix=False)
    with pytest.raises(ValueError):
        rig.bus.add_device(PCIDevice("c", vendor_id=1, device_id=1, class_code=0), 32)


# -- MSI-X ------------------------------------------------------------------------------------------

class MsixRig:
    """A device with BAR0 + an MSI-X BAR1, both mapped, bus master on, vector notifiers recorded."""

    def __init__(self, rig: Rig, *, enable=True, master=True, pcie=False) -> None:
        self.rig = rig
        self.dev = rig.device(pcie=pcie)
        self.msix = self.dev.msix
        self.events: list[tuple] = []
        self.msix.set_vector_notifiers(
            lambda v, a, d: self.events.append(("unmask", v, a, d)),
            lambda v: self.events.append(("mask", v)),
            lambda first, end: self.events.append(("poll", first, end)))
        program_bars(rig, self.dev)
        bits = R.PCI_COMMAND_MEMORY | (R.PCI_COMMAND_MASTER if master else 0)
        cmd(rig, self.dev, bits)
        if enable:
            self.control(R.PCI_MSIX_FLAGS_ENABLE)

    def control(self, value):
        self.rig.cfg_w(self.dev, self.msix.cap + R.PCI_MSIX_FLAGS, value, 2)

    def entry_addr(self, v, field):
        return BAR1 + v * R.PCI_MSIX_ENTRY_SIZE + field

    def program(self, v, address=MSI_ADDR, data=None, masked=True):
        mem = self.rig.memory
        mem.write(self.entry_addr(v, R.PCI_MSIX_ENTRY_LOWER_ADDR), address & 0xFFFFFFFF, 4)
        mem.write(self.entry_addr(v, R.PCI_MSIX_ENTRY_UPPER_ADDR), address >> 32, 4)
        mem.write(self.entry_addr(v, R.PCI_MSIX_ENTRY_DATA), 0x40 + v if data is None else data, 4)
        if not masked:
            self.unmask(v)

    def unmask(self, v):
        self.rig.memory.write(self.entry_addr(v, R.PCI_MSIX_ENTRY_VECTOR_CTRL), 0, 4)

    def mask(self, v):
        self.rig.memory.write(self.entry_addr(v, R.PCI_MSIX_ENTRY_VECTOR_CTRL), 1, 4)

    def pba(self):
        return self.rig.memory.read(BAR1 + self.msix.pba_offset, 8)


@pytest.fixture
def mx(rig):
    return MsixRig(rig)


def test_msix_capability_and_bar(rig):
    m = MsixRig(rig, enable=False)
    cap = m.msix.cap
    assert rig.cfg_r(m.dev, cap, 1) == R.PCI_CAP_ID_MSIX
    assert rig.cfg_r(m.dev, cap + R.PCI_MSIX_FLAGS, 2) & R.PCI_MSIX_FLAGS_QSIZE == 3
    assert rig.cfg_r(m.dev, cap + R.PCI_MSIX_TABLE, 4) == 0 | 1  # offset 0, BIR 1
    assert rig.cfg_r(m.dev, cap + R.PCI_MSIX_PBA, 4) == 0x800 | 1
    assert (BAR1, 4096, "dev-msix") in list(rig.memory.mappings())
    # QSIZE is read-only
    m.control(0x07FF)
    assert rig.cfg_r(m.dev, cap + R.PCI_MSIX_FLAGS, 2) == 3


def test_msix_all_vectors_come_out_masked(mx):
    for v in range(4):
        assert mx.msix.entry_masked(v)
        assert mx.msix.is_masked(v)
        assert mx.rig.memory.read(mx.entry_addr(v, R.PCI_MSIX_ENTRY_VECTOR_CTRL), 4) == 1
    assert mx.pba() == 0


def test_msix_pending_on_masked_vector_then_unmask_delivers_once(mx, rig):
    m = mx
    m.program(0, data=0x41)
    assert m.msix.vector_use(0)
    assert m.msix.notify(0) is O.PENDED
    assert m.msix.notify(0) is O.PENDED  # still one pending bit
    assert rig.msis == []
    assert m.msix.is_pending(0)
    m.events.clear()
    assert m.pba() == 0b1  # the guest sees it through the BAR
    assert ("poll", 0, 4) in m.events  # and the poll notifier ran first
    m.events.clear()
    m.unmask(0)
    assert rig.msis == [(MSI_ADDR, 0x41)]
    assert not m.msix.is_pending(0)
    assert m.pba() == 0
    assert m.events[0] == ("unmask", 0, MSI_ADDR, 0x41)
    assert m.msix.unmask_delivered[0] == 1
    # unmasked now: notify sends directly
    assert m.msix.notify(0) is O.SENT
    assert rig.msis == [(MSI_ADDR, 0x41), (MSI_ADDR, 0x41)]
    # masking again: the mask notifier runs, and a notify pends
    m.events.clear()
    m.mask(0)
    assert m.events == [("mask", 0)]
    assert m.msix.notify(0) is O.PENDED
    assert len(rig.msis) == 2


def test_msix_upper_address_and_64bit_entry_write(mx, rig):
    m = mx
    m.msix.vector_use(2)
    # one 8-byte write of the address, as a 64-bit driver does
    rig.memory.write(m.entry_addr(2, 0), 0x1_FEE0_2000, 8)
    rig.memory.write(m.entry_addr(2, R.PCI_MSIX_ENTRY_DATA), 0x99, 4)
    assert m.msix.get_message(2) == (0x1_FEE0_2000, 0x99)
    assert rig.memory.read(m.entry_addr(2, 0), 8) == 0x1_FEE0_2000
    m.unmask(2)
    assert m.msix.notify(2) is O.SENT
    assert rig.msis == [(0x1_FEE0_2000, 0x99)]


def test_msix_unmask_with_bus_master_off_sends_nothing(rig):
    m = MsixRig(rig, master=False)
    m.program(1, data=0x51)
    m.msix.vector_use(1)
    assert m.msix.notify(1) is O.PENDED
    m.unmask(1)
    assert rig.msis == []
    assert rig.bus.msi_sent == 0
    # with bus master on, a notify on the (now unmasked) vector goes out
    cmd(rig, m.dev, R.PCI_COMMAND_MEMORY | R.PCI_COMMAND_MASTER)
    assert m.msix.notify(1) is O.SENT
    assert rig.msis == [(MSI_ADDR, 0x51)]
    assert rig.bus.msi_sent == 1


def test_msix_function_mask_pends_and_clearing_delivers_once(mx, rig):
    m = mx
    for v in range(4):
        m.program(v, masked=False)
    m.msix.vector_use(0)
    m.msix.vector_use(3)
    m.events.clear()
    m.control(R.PCI_MSIX_FLAGS_ENABLE | R.PCI_MSIX_FLAGS_MASKALL)
    assert sorted(m.events) == [("mask", 0), ("mask", 3)]  # only used vectors are told
    assert m.msix.notify(3) is O.PENDED
    assert m.msix.notify(3) is O.PENDED
    assert m.msix.notify(1) is O.UNUSED
    assert rig.msis == []
    assert m.pba() == 0b1000
    m.events.clear()
    m.control(R.PCI_MSIX_FLAGS_ENABLE)
    assert rig.msis == [(MSI_ADDR, 0x43)]
    assert m.pba() == 0
    assert sorted(e for e in m.events if e[0] == "unmask") == [
        ("unmask", 0, MSI_ADDR, 0x40), ("unmask", 3, MSI_ADDR, 0x43)]


def test_msix_unused_vector_does_nothing(mx, rig):
    m = mx
    m.program(2, masked=False)
    assert m.msix.notify(2) is O.UNUSED
    m.mask(2)
    assert m.msix.notify(2) is O.UNUSED
    assert not m.msix.is_pending(2)
    assert rig.msis == []
    assert m.msix.unused_drops == 2
    assert m.msix.notify(4) is O.INVALID
    assert m.msix.notify(-1) is O.INVALID


def test_msix_vector_unuse_of_last_user_clears_pending(mx):
    m = mx
    m.msix.vector_use(1)
    m.msix.vector_use(1)
    assert m.msix.notify(1) is O.PENDED
    m.msix.vector_unuse(1)
    assert m.msix.is_pending(1)  # one user left
    m.msix.vector_unuse(1)
    assert not m.msix.is_pending(1)
    assert m.pba() == 0
    m.msix.vector_unuse(1)  # no underflow
    assert m.msix.use_count[1] == 0
    assert m.msix.vector_use(9) is False


def test_msix_disabled_notify(rig):
    m = MsixRig(rig, enable=False)
    m.msix.vector_use(0)
    assert m.msix.notify(0) is O.DISABLED
    assert not m.msix.is_pending(0)
    assert m.msix.disabled_drops == 1
    assert rig.msis == []


def test_msix_notifiers_on_enable_and_disable(mx, rig):
    m = mx
    m.program(0, masked=False)
    m.msix.vector_use(0)
    m.events.clear()
    m.control(0)  # MSI-X disabled: the used unmasked vector becomes masked
    assert m.events == [("mask", 0)]
    m.events.clear()
    m.control(R.PCI_MSIX_FLAGS_ENABLE)
    assert m.events == [("unmask", 0, MSI_ADDR, 0x40)]
    m.events.clear()
    m.unmask(0)  # no transition: nothing
    m.program(1, masked=False)  # unused vector: notifiers not called
    assert m.events == []


def test_msix_pba_is_read_only(mx):
    m = mx
    m.msix.vector_use(0)
    m.msix.notify(0)
    m.rig.memory.write(BAR1 + m.msix.pba_offset, 0, 8)
    assert m.pba() == 1
    m.rig.memory.write(BAR1 + m.msix.pba_offset, 0xFF, 1)
    assert m.pba() == 1


def test_msix_reset_masks_everything_and_clears_pba(mx, rig):
    m = mx
    for v in range(4):
        m.program(v, masked=False)
    m.msix.vector_use(0)
    m.msix.vector_use(1)
    m.mask(1)
    assert m.msix.notify(1) is O.PENDED
    m.events.clear()
    m.msix.reset()
    assert m.events == [("mask", 0)]  # vector 0 was used and unmasked
    assert not m.msix.enabled
    assert m.pba() == 0
    for v in range(4):
        assert m.msix.entry_masked(v)
        assert m.msix.get_message(v) == (0, 0)
    assert rig.msis == []


def test_flr_through_pcie_capability(rig):
    m = MsixRig(rig, pcie=True)
    dev = m.dev
    m.program(0, masked=False)
    m.msix.vector_use(0)
    m.mask(0)
    m.msix.notify(0)
    assert len(list(rig.memory.mappings())) == 2
    dev.set_irq(1)
    gsi = PCIBus.intx_gsi(1, 1)
    assert rig.lines == [(gsi, 1)]
    devctl = dev.exp_cap + R.PCI_EXP_DEVCTL
    assert rig.cfg_r(dev, dev.exp_cap + R.PCI_EXP_DEVCAP, 4) & R.PCI_EXP_DEVCAP_FLR
    rig.cfg_w(dev, devctl, R.PCI_EXP_DEVCTL_BCR_FLR | 0x5, 2)
    assert dev.flr_count == 1
    assert dev.resets == 1
    assert rig.cfg_r(dev, R.PCI_COMMAND, 2) == 0
    assert rig.cfg_r(dev, devctl, 2) & R.PCI_EXP_DEVCTL_BCR_FLR == 0  # reads back 0
    assert rig.cfg_r(dev, devctl, 2) == 0x5  # the other bits were written
    assert list(rig.memory.mappings()) == []  # both BARs unmapped
    assert dev.bars[0].mapped_at is None
    assert rig.cfg_r(dev, R.PCI_BASE_ADDRESS_0, 4) == 0
    assert dev.bm_changes[-1] is False
    assert rig.lines == [(gsi, 1), (gsi, 0)]
    assert not m.msix.enabled and m.msix.pba[0] == 0
    # a write that does not set the FLR bit does not reset
    rig.cfg_w(dev, devctl, 0x1, 2)
    assert dev.flr_count == 1


def test_no_flr_without_pcie_cap(rig):
    dev = rig.device(msix=False)
    assert dev.exp_cap == 0
    rig.cfg_w(dev, 0x48, R.PCI_EXP_DEVCTL_BCR_FLR, 2)
    assert dev.flr_count == 0


# -- host bridge --------------------------------------------------------------------------------------

def test_pci_host_config_mechanism(rig):
    dev = rig.device(slot=3, msix=False)
    PCIHost(rig.bus)
    io = rig.io
    io.write(0xCF8, 0x80000000 | dev.devfn << 8 | R.PCI_VENDOR_ID, 4)
    assert io.read(0xCF8, 4) == 0x80000000 | dev.devfn << 8
    assert io.read(0xCFC, 4) == DEVICE << 16 | VENDOR
    assert io.read(0xCFC, 2) == VENDOR
    assert io.read(0xCFE, 2) == DEVICE  # byte offset within the data port
    # a write through the data port reaches the device
    io.write(0xCF8, 0x80000000 | dev.devfn << 8 | R.PCI_BASE_ADDRESS_0, 4)
    io.write(0xCFC, 0xFFFFFFFF, 4)
    assert io.read(0xCFC, 4) == 0xFFFFF000
    # nonexistent function and other bus
    io.write(0xCF8, 0x80000000 | (7 << 3) << 8, 4)
    assert io.read(0xCFC, 4) == 0xFFFFFFFF
    io.write(0xCF8, 0x80000000 | 1 << 16 | dev.devfn << 8, 4)
    assert io.read(0xCFC, 4) == 0xFFFFFFFF
    # enable bit clear: all ones
    io.write(0xCF8, dev.devfn << 8, 4)
    assert io.read(0xCFC, 4) == 0xFFFFFFFF


def test_bar_mapping_through_host_bridge(rig):
    dev = rig.device(slot=2, msix=False)
    PCIHost(rig.bus)
    io = rig.io

    def cfg(reg, value):
        io.write(0xCF8, 0x80000000 | dev.devfn << 8 | reg, 4)
        io.write(0xCFC, value, 4)

    cfg(R.PCI_BASE_ADDRESS_0, BAR0)
    cfg(R.PCI_COMMAND, R.PCI_COMMAND_MEMORY)
    assert rig.memory.read(BAR0, 4) == 0x5A5A5A5A
    assert struct.pack("<I", dev.get32(R.PCI_BASE_ADDRESS_0)) == struct.pack("<I", BAR0)
