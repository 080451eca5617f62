"""``kickcall diagnose`` and PCIe errors on a passthrough function: a function whose error the VMM
forwarded and the guest is still recovering, or a VM the VMM stopped for an error, is said to be
in PCIe error recovery -- never a lost interrupt, and no event is offered as a fix."""

from __future__ import annotations

import pytest

from kickcall.diagnose.sample import DeviceSample, Sample, VectorSample
from kickcall.diagnose.verdict import Severity, judge, judge_vector_state

BASE = {"guest-msix-enabled": True, "host-msix-enabled": True, "use": True, "trigger": "irqfd", "gsi": 24,
        "masked": False, "function-masked": False, "pending": False, "irqfd-pending": 0, "interrupt-pending": 0,
        "userspace-interrupts": 0, "injections": 5, "dropped": 0, "fatal": None, "path": "dynamic",
        "aer-state": "idle", "aer-last": None}
NONFATAL = {"severity": "non-fatal", "action": "forwarded", "errors": ["POISON_TLP"], "uncor-status": 0x1000}
FATAL = {"severity": "fatal", "action": "stop", "errors": ["DLP"], "uncor-status": 0x10}


@pytest.mark.parametrize("state,last,want", [
    ("guest-recovering", NONFATAL, "PCIe error recovery"),
    ("idle", NONFATAL, "healthy"),  # recovered: the guest cleared the status
    ("idle", None, "healthy"),
])
def test_a_forwarded_error_being_recovered_is_not_a_lost_interrupt(state, last, want):
    # the irqfd unread in every sample would otherwise say "host interrupt not delivered"
    st = dict(BASE, **{"aer-state": state, "aer-last": last, "irqfd-pending": 0})
    v = judge_vector_state(VectorSample(0, st), VectorSample(0, dict(BASE)), 2.0, stable=True)
    assert str(v.kind) == want, v.evidence
    if want == "PCIe error recovery":
        assert v.severity is Severity.INFO and v.fix is None
        assert "POISON_TLP" in " ".join(v.evidence) and "not a lost interrupt" in " ".join(v.evidence)


@pytest.mark.parametrize("state,run_state,want,severity", [
    ("vm-stopped", "internal-error", "PCIe error recovery", Severity.PROBLEM),
    ("idle", "internal-error", "paused", Severity.PROBLEM),  # stopped for another reason
    ("idle", "paused", "paused", Severity.INFO),
])
def test_a_vm_stopped_for_a_pcie_error_says_so(state, run_state, want, severity):
    st = dict(BASE, **{"aer-state": state, "aer-last": FATAL if state == "vm-stopped" else None})
    samples = [Sample(float(t), run_state, {"nic": DeviceSample("nic", "vfio-user-pci", None,
                                                                 [VectorSample(0, st)], True, passthrough=True)})
               for t in range(3)]
    v = judge(samples, "nic", 0, 2)
    assert str(v.kind) == want, v.evidence
    assert v.severity is severity
    if want == "PCIe error recovery":
        text = " ".join(v.evidence)
        assert "fatal (DLP)" in text and "stopped the VM" in text and v.fix is None
