"""virtio-pci commits the MSI routes of a device's vectors once (QEMU: kvm_irqchip_add_msi_route
per vector, kvm_irqchip_commit_routes for the batch): KVM_SET_GSI_ROUTING sends the whole table,
so a commit per vector made n vectors cost 1 + 2 + ... + n routes sent.  The counts are asserted
(never time): one SET_GSI_ROUTING for any number of vectors at DRIVER_OK, one at teardown, and
every route is in the hypervisor's table before its irqfd is used (calls arrive by irqfd)."""

from __future__ import annotations

import pytest

from helpers import blk, guest_irq_count, guest_vector_of, machine_toml, running_machine, wait_for


@pytest.mark.parametrize("queues", [1, 32])
def test_one_routing_commit_for_all_vectors(queues: int) -> None:
    with running_machine(machine_toml(devices=blk(queues=queues))) as m:
        p = m.device("blk0")
        assert m.vm.ioctl_counts.get("IRQFD", 0) == queues  # every queue on its own vector's irqfd
        assert m.vm.ioctl_counts.get("SET_GSI_ROUTING", 0) == 1  # the old code: one per vector (32)
        for q in p.vdev.queues:
            st = p.queue_state(q.index)
            assert st.irqfd and st.gsi is not None
            assert m.routes.get(st.gsi) is not None
        # the routes reached the hypervisor before the irqfds were used: a call on each queue's guest
        # notifier is injected by the hypervisor (irqfd -> route) and taken by the guest on that vector
        for q in p.vdev.queues:
            assert q.guest_notifier is not None
            cpu_vec = guest_vector_of(m, "blk0", q.vector)
            before = guest_irq_count(m, cpu_vec)
            q.guest_notifier.set()
            wait_for(lambda v=cpu_vec, n=before: guest_irq_count(m, v) > n, 60,
                     f"queue {q.index}'s call through its irqfd")
        # teardown: the irqfds go, then the released routes are committed once
        before = m.vm.ioctl_counts.get("SET_GSI_ROUTING", 0)
        with m.bql:
            p.set_guest_notifiers(False)
        assert m.vm.ioctl_counts.get("SET_GSI_ROUTING", 0) - before == 1
        assert len(m.routes) == 0


def test_queue_limit_and_large_msix_table() -> None:
    """virtio-blk takes up to 1024 queues (QEMU's VIRTIO_QUEUE_MAX); a table past 128 vectors
    pushes the PBA after it instead of overlapping it (1025 vectors build)."""
    from kickcall.machine import ConfigError, Machine, parse_config

    with pytest.raises(ConfigError):
        parse_config(machine_toml(devices=blk(queues=1025)), "<test>")
    m = Machine(parse_config(machine_toml(devices=blk(queues=1024)), "<test>"))
    try:
        x = m.device("blk0").msix
        assert x is not None and x.nvectors == 1025
        assert x.pba_offset >= x.table_offset + 1025 * 16
    finally:
        m.stop()
