"""MSI-X masking with a real guest: a call on a masked vector sets its PBA bit, the guest sees the
bit when it reads the PBA, no interrupt is delivered while masked, and unmasking delivers exactly
one interrupt (and clears the bit).  The guest completes requests only from its interrupt handler,
so a lost interrupt is a request that never completes."""

from __future__ import annotations

import pytest

from helpers import blk, guest_irq_count, guest_vector_of, machine_toml, running_machine, wait_for

pytestmark = pytest.mark.slow


def _masked_call_then_unmask(m, *, function_mask: bool, deliver_fix: bool = True) -> dict:
    p = m.device("blk0")
    q = p.vdev.queues[0]
    v = q.vector
    slot = m.slot("blk0")
    vec = guest_vector_of(m, "blk0", v)
    assert p.msix is not None
    p.msix.deliver_pending_on_unmask = deliver_fix
    n0 = guest_irq_count(m, vec)
    if function_mask:
        m.guest_cmd({"cmd": "msix-function-mask", "slot": slot, "masked": True})
    else:
        m.guest_cmd({"cmd": "msix-mask", "slot": slot, "entry": v, "masked": True})
    assert p.msix.is_masked(v)
    if p.irqfd_enabled:
        st = p.queue_state(q.index)
        assert not st.irqfd and st.polled and st.gsi is not None  # irqfd off, the VMM polls
    rep = m.guest_cmd({"cmd": "blk-submit", "slot": slot, "op": "read", "sector": 2, "nbytes": 512})
    wait_for(lambda: p.msix.is_pending(v), what="the masked call to set the PBA bit")
    pba = m.guest_cmd({"cmd": "read-pba", "slot": slot})["pba"]
    assert pba >> v & 1, f"guest PBA read {pba:#x} lacks vector {v}"
    assert guest_irq_count(m, vec) == n0, "an interrupt got through a masked vector"
    w = m.guest_cmd({"cmd": "blk-wait", "id": rep["id"], "timeout": 0.5})
    assert not w["completed"], "the request completed without an interrupt"
    sent0 = p.msix.sent[v]
    if function_mask:
        m.guest_cmd({"cmd": "msix-function-mask", "slot": slot, "masked": False})
    else:
        m.guest_cmd({"cmd": "msix-mask", "slot": slot, "entry": v, "masked": False})
    out = {"v": v, "vec": vec, "n0": n0, "rep": rep, "sent0": sent0}
    if not deliver_fix:
        return out
    w = m.guest_cmd({"cmd": "blk-wait", "id": rep["id"], "timeout": 20})
    assert w["completed"] and w["status"] == 0
    wait_for(lambda: guest_irq_count(m, vec) == n0 + 1, what="exactly one interrupt")
    assert not p.msix.is_pending(v)
    assert p.msix.sent[v] == sent0 + 1 and p.msix.unmask_delivered[v] >= 1
    if p.irqfd_enabled:
        st = p.queue_state(q.index)
        assert st.irqfd and not st.polled and st.gsi is not None
    # and the queue works normally again
    r = m.guest_cmd({"cmd": "blk-io", "slot": slot, "op": "read", "sector": 1, "nbytes": 512})
    assert r["status"] == 0 and bytes.fromhex(r["data"]).startswith(b"SECTOR0000000001")
    assert guest_irq_count(m, vec) == n0 + 2
    return out


@pytest.mark.parametrize("irqfd", [True, False], ids=["irqfd", "userspace-msi"])
@pytest.mark.parametrize("function_mask", [False, True], ids=["vector-mask", "function-mask"])
def test_masked_call_sets_pba_and_unmask_delivers_once(irqfd, function_mask):
    with running_machine(machine_toml(devices=blk("blk0", irqfd=irqfd))) as m:
        _masked_call_then_unmask(m, function_mask=function_mask)


def test_without_pending_delivery_the_interrupt_is_lost():
    """The switch that proves the test: with unmask-delivers-pending off, the completion never comes."""
    with running_machine(machine_toml(devices=blk("blk0"))) as m:
        out = _masked_call_then_unmask(m, function_mask=False, deliver_fix=False)
        w = m.guest_cmd({"cmd": "blk-wait", "id": out["rep"]["id"], "timeout": 2})
        assert not w["completed"]
        assert guest_irq_count(m, out["vec"]) == out["n0"]
        assert m.device("blk0").msix.is_pending(out["v"])


def test_masking_under_load_loses_no_completion():
    """Mask and unmask a busy queue's vector in a loop while the workload runs: every request
    completes (completions come only from the interrupt handler) and the data checks pass."""
    with running_machine(machine_toml(devices=blk("blk0", queues=1))) as m:
        p = m.device("blk0")
        q = p.vdev.queues[0]
        slot = m.slot("blk0")
        m.start_workload(blk={"depth": 8, "read_ratio": 0.5, "stall_timeout": 15.0})
        for _ in range(30):
            m.guest_cmd({"cmd": "msix-mask", "slot": slot, "entry": q.vector, "masked": True, "cpu": 1})
            m.guest_cmd({"cmd": "msix-mask", "slot": slot, "entry": q.vector, "masked": False, "cpu": 1})
        res = m.stop_workload()
        (r,) = [x for x in res if x["kind"] == "blk"]
        assert r["error_count"] == 0, r["errors"]
        assert r["ops"] > 0
        assert p.msix.pended[q.vector] > 0, "the loop never caught a call while masked"
        assert not p.msix.is_pending(q.vector)
