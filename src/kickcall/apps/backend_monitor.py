"""The monitor of ``kickcall vhost-user-blk``: the device as the back-end sees it.

Queue state is read from the shared ring memory (single 16-bit loads) and the back-end's own
counters; the kick, call and err fds are listed with their eventfd counters (read without
consuming).  A kick processes the queue as if its kick fd had fired; a call writes the call fd --
the front-end's masking still applies (a back-end cannot force past it).  Faults act inside the
back-end: a dropped kick is consumed and ignored, a dropped call is never written.

Each queue's status carries its lifecycle (``ring-state``: no-front-end, not-set-up, not-started,
started, disabled, stopped), the GET_VRING_BASE count (``get-vring-base``, since the back-end
started), the front-end (``front-end``), its ``kick-fd`` and ``call-fd`` (-1: none), and how old the
oldest request in flight is (``oldest-inflight-ms``) and how long requests have been taking
(``completion-ms``).  A kick injection is refused where a back-end must not process the ring --
above all one the front-end stopped with GET_VRING_BASE (the ``refuse-stopped-ring`` fix) -- and a call
injection where there is no call fd, each saying why.

Faults live in the back-end's registry (``VhostUserBackend.faults``): the monitor's
``x-debug-fault DEV QUEUE PATH ACTION`` arms ``lose-kick`` (path ``kick``), ``lose-call``
(``call``) or ``hold-completion`` (``complete``); ``faults()`` lists every fault of the registry
with its effect and state, fixes (``refuse-stopped-ring`` and the back-end's own) included, and
``set_fault`` arms or switches any of them by name.

The ``complete`` fault path holds completions: a held request was taken (popped) and its I/O
done, but it is never pushed to the used ring -- a back-end that never completes a request.
``drop-next`` holds the next completion of the queue, ``drop-all`` every one until ``clear``.
``clear`` completes the held requests (status written, used ring, call) if the ring is started,
and otherwise discards them (the driver never sees them complete; they stay in the inflight
region for a back-end that reconnects): the reply says how many went each way.
"""

from __future__ import annotations

from ..faults import FaultError, FaultRegistry, QueueDrop
from ..monitor.target import AerView, DeviceView, TargetError
from ..vhost_user.backend import RingRefused, RingState, VhostUserBackend
from ..virtio.blk import VirtIOBlk
from ..virtio.device import DEVICE_NEEDS_RESET
from ..virtio.layout import (
    avail_size,
    desc_table_size,
    read_ring_fields,
    used_size,
)

__all__ = ["BackendTarget", "BackendDevice", "REFUSE_STOPPED_RING", "FAULT_PATHS"]

# a fix of the monitor, in the back-end's registry; off: a kick injection marks the ring started
# and processes it whatever its state -- a ring the front-end stopped with GET_VRING_BASE included
# (what the monitor did before)
REFUSE_STOPPED_RING = "refuse-stopped-ring"

# x-debug-fault's paths -> the back-end's faults that lose (or hold) that path's events
FAULT_PATHS = {"kick": "lose-kick", "call": "lose-call", "complete": "hold-completion"}


class BackendDevice:
    type_name = "vhost-user-blk"
    virtio = True

    def __init__(self, backend: VhostUserBackend) -> None:
        self.b = backend
        self.loop = backend.loop
        self.id = backend.name
        self.path = f"/{backend.name}"
        reg = backend.faults
        if REFUSE_STOPPED_RING not in reg:  # (a second monitor of the same back-end shares it)
            reg.switch(REFUSE_STOPPED_RING, "off: a kick injection processes a ring whatever its state, one "
                       "the front-end stopped with GET_VRING_BASE included")
        dev = backend.device
        if isinstance(dev, VirtIOBlk) and "hold-completion" not in reg:  # a device that can hold completions
            hold = reg.queue_drop("hold-completion", "a request whose I/O is done is never pushed to the used "
                                  "ring (a back-end that never completes it); clear completes or discards them")
            dev.hold_completion = lambda vq: hold.take(vq.index)

    def _run(self, fn):
        return self.loop.run_sync(fn)

    def num_queues(self) -> int:
        return len(self.b.vrings)

    def virtio_status(self) -> dict:
        def f() -> dict:
            d = self.b.device.status_info()
            d["name"] = self.type_name
            d["vhost-started"] = any(v.started for v in self.b.vrings)
            d["x-vhost-user"] = {k: v for k, v in self.b.status().items() if k != "queues"}
            return d

        return self._run(f)

    def _u16(self, gpa: int) -> int | None:
        mem = self.b.memory
        if mem is None:
            return None
        try:
            return mem.read_u16_atomic(gpa)
        except ValueError:
            return None

    def queue_status(self, queue: int) -> dict:
        def f() -> dict:
            v = self.b.vrings[queue]
            q = self.b.device.queues[queue]
            d = q.status()
            d["name"] = self.type_name  # QEMU: the VirtIODevice's name, not the queue's
            d["vring-num"] = v.num or q.num
            mapped = v.addr is not None and self.b.memory is not None
            d.update(read_ring_fields(self._u16, q.avail, q.used, q.num, mapped=mapped))
            d.update({
                "event-idx": q.event_idx, "started": v.started, "enabled": v.enabled,
                "kicks": v.kicks, "calls": v.calls, "calls-without-fd": v.calls_without_fd,
                "ring-state": self.b.ring_state(queue).value,
                "get-vring-base": v.get_vring_base,
                "front-end": self.b.peer if self.b.conn is not None else "",
                "kick-fd": v.kick.fd if v.kick is not None else -1,
                "call-fd": v.call.fd if v.call is not None else -1,
                "needs-reset": bool(self.b.device.status & DEVICE_NEEDS_RESET),
                "device-resets": self.b.device_resets,
            })
            d.update(q.timing())
            return d

        return self._run(f)

    def vhost_queue_status(self, queue: int) -> dict:
        def f() -> dict:
            v = self.b.vrings[queue]
            q = self.b.device.queues[queue]
            if v.addr is None:
                raise TargetError("Error: vhost device has not started yet")
            desc, used, avail = v.addr
            n = q.num
            return {"name": self.type_name, "kick": v.kick.fd if v.kick else -1, "call": v.call.fd if v.call else -1,
                    "desc": desc, "avail": avail, "used": used, "num": n, "desc-phys": q.desc,
                    "desc-size": desc_table_size(n), "avail-phys": q.avail, "avail-size": avail_size(n),
                    "used-phys": q.used, "used-size": used_size(n)}

        return self._run(f)

    def queue_element(self, queue: int, index: int | None) -> dict:
        """QEMU's x-query-virtio-queue-element: *index* is a position in the avail ring (modulo the
        queue size; default: the back-end's next position), the element is the chain whose head
        that ring slot holds."""
        def f() -> dict:
            v = self.b.vrings[queue]
            q = self.b.device.queues[queue]
            mem = self.b.memory
            if v.addr is None or mem is None:
                raise TargetError(f"virtqueue {queue} is not set up")
            try:  # the device's own walker: a chain it would refuse shows its valid prefix and an "error"
                return q.queue_element(q.get_last_avail_idx() if index is None else index, mem, self.type_name)
            except ValueError as e:
                raise TargetError(str(e)) from None

        return self._run(f)

    def pci_info(self) -> None:
        return None

    def vfio(self) -> dict:
        raise TargetError(f"{self.id} is not a passthrough (vfio) device")

    def msix(self) -> dict:
        raise TargetError("a vhost-user back-end has no MSI-X: the front-end owns the vectors")

    def notifiers(self) -> list[dict]:
        def f() -> list[dict]:
            out = []
            for e in self.b.registry.entries(self.b.name):
                d = e.describe()
                v = self.b.vrings[e.queue] if e.queue is not None and e.queue < len(self.b.vrings) else None
                # two scopes, both labelled: the fd's counters are this connection's (a front-end
                # hands new fds on every connection), the queue's count is the back-end's lifetime
                d["scope"] = "connection"
                if v is not None and e.role.value == "host":
                    d["fd-writes"] = d.get("total", 0)  # we are the kick fd's only reader
                    d["kicks-handled"] = v.kicks
                    d["lifetime"] = v.kicks
                if v is not None and e.role.value == "guest":
                    # the front-end (its irqfd) reads the call fd: "total" sees only what is still
                    # pending there, our own writes are "sets"
                    d["fd-writes"] = d.get("sets", 0)
                    d["calls-written"] = v.calls
                    d["lifetime"] = v.calls
                out.append(d)
            return sorted(out, key=lambda d: d["id"])

        return self._run(f)

    def notifier_write(self, id: int) -> dict:
        def f() -> dict:
            e = self.b.registry.get(id)
            if e is None or e.owner != self.b.name or e.notifier.closed:
                raise TargetError(f"the back-end has no notifier {id}")
            e.notifier.set()
            return {"id": id, "role": e.role.value, "queue": -1 if e.queue is None else e.queue}

        return self._run(f)

    def inject(self, event: str, queue: int, force: bool) -> dict:
        if force:
            raise TargetError("a back-end cannot force a call past the front-end's mask: its call fd is all it has")

        def f() -> dict:
            try:
                if event == "kick":
                    self.b.process_ring(queue, check=self.b.faults.fix_on(REFUSE_STOPPED_RING))
                    return {"path": "backend-process", "forced": False}
                self.b.call_ring(queue)
            except RingRefused as e:
                raise TargetError(e.why) from None
            return {"path": "call-fd", "forced": False}

        return self._run(f)

    def faults(self) -> list[dict]:
        """Every fault of the back-end's registry: name, kind, effect, actions, state."""
        return self.b.faults.describe()

    def set_fault(self, name: str, action: str, queue: int | None) -> dict:
        """Arm, clear or switch the back-end's fault *name* (``FaultRegistry.arm``)."""
        if name == "hold-completion" and action == "clear" and queue is not None:
            return self.fault(queue, "complete", action)  # held requests are completed or discarded too
        try:
            return self.b.faults.arm(name, action, queue)
        except FaultError as e:
            raise TargetError(str(e)) from None

    def _drop_fault(self, path: str) -> QueueDrop:
        name = FAULT_PATHS.get(path)
        if name is None:
            raise TargetError(f"no fault path {path!r} (kick, call or complete)")
        try:
            f = self.b.faults.get(name)
        except FaultError:
            raise TargetError(f"a {self.b.device.type_name} device cannot hold its completions") from None
        assert isinstance(f, QueueDrop)
        return f

    def _arm(self, f: QueueDrop, path: str, queue: int, action: str) -> dict:
        try:
            out = self.b.faults.arm(f.name, action, queue)
        except FaultError as e:
            raise TargetError(str(e)) from None
        return {"path": path, "action": out["action"], "dropped-so-far": out["dropped-so-far"]}

    def fault(self, queue: int, path: str, action: str) -> dict:
        """x-debug-fault: lose (kick, call) or hold (complete) the next or every event of *path* on
        *queue*, or stop (clear)."""
        f = self._drop_fault(path)
        if path != "complete":
            return self._arm(f, path, queue, action)
        dev = self.b.device
        assert isinstance(dev, VirtIOBlk)  # the one device that can hold its completions

        def g() -> dict:
            out = self._arm(f, path, queue, action)
            if action == "clear":
                started = self.b.ring_state(queue) == RingState.STARTED
                done, gone = dev.release_held(queue, complete=started)
                out.update({"completed": done, "discarded": gone})
            out["held"] = dev.held(queue)
            return out

        return self._run(g)


class BackendTarget:
    def __init__(self, backend: VhostUserBackend, on_quit) -> None:
        self.name = backend.name
        self._dev = BackendDevice(backend)
        self._on_quit = on_quit

    def run_state(self) -> str:
        return "running"

    def stop(self) -> None:
        raise TargetError("a back-end has no vCPUs to stop: the front-end stops its rings")

    def cont(self) -> None:
        raise TargetError("a back-end has no vCPUs to resume")

    def system_reset(self) -> None:
        raise TargetError("a back-end cannot reset the machine: the front-end resets the device")

    def quit(self) -> None:
        self._on_quit()

    def devices(self) -> list[DeviceView]:
        return [self._dev]

    def fault_owners(self) -> "dict[str, FaultRegistry]":
        return {}  # every fault here is the device's

    def aer_device(self, id: str) -> AerView:
        """A vhost-user back-end has no PCI functions."""
        if any(d.id == id for d in self.devices()):
            raise TargetError(f"device '{id}' is not a PCIe device")
        raise TargetError(f"device '{id}' not found", "DeviceNotFound")
