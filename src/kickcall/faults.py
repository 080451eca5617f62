"""Fault injection in one place: one registry of named faults per device.

kickcall shows every known failure of the kick and call paths on purpose, and shows each fix
surviving it.  Two kinds of fault do that, and both live in a device's ``FaultRegistry``:

* **injected** (``FaultKind.INJECTED``) -- lose the next N events, or all of them, of one path of
  one queue: a kick, a call, a completion.  An operator arms one from the monitor
  (``x-debug-fault``) to rehearse a hang; a test arms one to prove diagnose names it.
  ``QueueDrop`` keeps the counts; a device whose events are dropped elsewhere (the machine's
  kicks and calls are dropped inside the hypervisor, by its ioeventfds and irqfds) subclasses
  ``Fault`` and forwards ``arm``.
* **fix-off** (``FaultKind.FIX_OFF``) -- a fix that is on unless switched off, to show what it
  prevents (the seed-002 test-and-clear on deassign, the back-end's per-message deadline, ...).
  ``Switch`` is one of those; code asks ``registry.fix_on(NAME)``.

Every fault has a name (lower case, dashes) and a one-line effect, which the monitor lists
(``x-debug-fault`` with no fault named) and docs/faults.md documents.  Tests arm and switch faults
through the registry or the monitor, never by patching module globals.
"""

from __future__ import annotations

import re
import threading
from enum import StrEnum
from typing import Iterator

__all__ = ["FaultKind", "FaultAction", "FaultError", "FaultErrorKind", "Fault", "Switch", "QueueDrop",
           "FaultRegistry", "PROCESS"]

_NAME = re.compile(r"[a-z][a-z0-9-]{1,40}\Z")


class FaultKind(StrEnum):
    INJECTED = "injected"  # a failure switched on on purpose
    FIX_OFF = "fix-off"  # a fix that can be switched off to show what it prevents


class FaultAction(StrEnum):
    DROP_NEXT = "drop-next"  # INJECTED: lose the next event of the path (repeatable: counts up)
    DROP_ALL = "drop-all"  # INJECTED: lose every event of the path until cleared
    CLEAR = "clear"  # INJECTED: stop losing events
    FIX_OFF = "off"  # FIX_OFF: switch the fix off
    FIX_ON = "on"  # FIX_OFF: switch the fix back on


class FaultErrorKind(StrEnum):
    UNKNOWN_FAULT = "unknown-fault"
    BAD_ACTION = "bad-action"
    BAD_QUEUE = "bad-queue"
    DUPLICATE = "duplicate"
    BAD_NAME = "bad-name"
    UNSUPPORTED = "unsupported"  # the fault exists but cannot act now (e.g. no irqfd to drop on)


class FaultError(Exception):
    """A fault request that cannot be honoured; ``kind`` says why."""

    def __init__(self, kind: FaultErrorKind, msg: str) -> None:
        super().__init__(msg)
        self.kind = kind


class Fault:
    """A named fault of one device.  Subclasses implement ``arm`` and ``state``."""

    kind: FaultKind = FaultKind.INJECTED
    actions: tuple[FaultAction, ...] = ()
    per_queue = False

    def __init__(self, name: str, effect: str) -> None:
        if not _NAME.match(name):
            raise FaultError(FaultErrorKind.BAD_NAME, f"bad fault name {name!r}")
        self.name = name
        self.effect = effect

    def arm(self, action: FaultAction, queue: int | None = None) -> dict:
        """Apply *action* (for *queue* when the fault is per queue); returns what it did."""
        raise NotImplementedError

    def state(self) -> dict:
        """The fault's current state, for the monitor's listing."""
        raise NotImplementedError

    def describe(self) -> dict:
        return {"name": self.name, "kind": self.kind.value, "effect": self.effect,
                "actions": [a.value for a in self.actions], "per-queue": self.per_queue, "state": self.state()}

    def _check(self, action: FaultAction) -> None:
        if action not in self.actions:
            raise FaultError(FaultErrorKind.BAD_ACTION, f"fault {self.name} takes {', '.join(a.value for a in self.actions)}"
                             f", not {action.value}")


class Switch(Fault):
    """A fix that is on unless switched off (thread-safe to read from any thread)."""

    kind = FaultKind.FIX_OFF
    actions = (FaultAction.FIX_OFF, FaultAction.FIX_ON)

    def __init__(self, name: str, effect: str) -> None:
        super().__init__(name, effect)
        self.fix_on = True

    def arm(self, action: FaultAction, queue: int | None = None) -> dict:
        self._check(action)
        self.fix_on = action is FaultAction.FIX_ON
        return {"fault": self.name, "action": action.value, "fix": "on" if self.fix_on else "off"}

    def state(self) -> dict:
        return {"fix": "on" if self.fix_on else "off"}


class QueueDrop(Fault):
    """Lose the next N events, or every event, of one path of one queue (kept in this process).

    ``take(queue)`` is asked at the notification point: True means "drop this one", and counts it.
    """

    kind = FaultKind.INJECTED
    actions = (FaultAction.DROP_NEXT, FaultAction.DROP_ALL, FaultAction.CLEAR)
    per_queue = True

    def __init__(self, name: str, effect: str) -> None:
        super().__init__(name, effect)
        self._mu = threading.Lock()
        self._next: dict[int, int] = {}
        self._all: set[int] = set()
        self._dropped: dict[int, int] = {}

    def arm(self, action: FaultAction, queue: int | None = None) -> dict:
        self._check(action)
        if queue is None or queue < 0:
            raise FaultError(FaultErrorKind.BAD_QUEUE, f"fault {self.name} needs a queue")
        with self._mu:
            if action is FaultAction.DROP_NEXT:
                self._next[queue] = self._next.get(queue, 0) + 1
            elif action is FaultAction.DROP_ALL:
                self._all.add(queue)
            else:
                self._next.pop(queue, None)
                self._all.discard(queue)
            return {"fault": self.name, "queue": queue, "action": action.value,
                    "dropped-so-far": self._dropped.get(queue, 0)}

    def take(self, queue: int) -> bool:
        """True if this event of *queue* must be dropped (and counts it)."""
        if not self._next and not self._all:  # the common case: nothing armed, no lock
            return False
        with self._mu:
            n = self._next.get(queue, 0)
            if queue not in self._all and not n:
                return False
            if n:
                self._next[queue] = n - 1
                if n == 1:
                    del self._next[queue]
            self._dropped[queue] = self._dropped.get(queue, 0) + 1
            return True

    def dropped(self, queue: int) -> int:
        with self._mu:
            return self._dropped.get(queue, 0)

    def state(self) -> dict:
        with self._mu:
            qs = sorted(set(self._next) | self._all | set(self._dropped))
            return {"queues": [{"queue": q, "drop-next": self._next.get(q, 0), "drop-all": q in self._all,
                                "dropped": self._dropped.get(q, 0)} for q in qs]}


class FaultRegistry:
    """The named faults of one device (or one back-end), in registration order."""

    def __init__(self, owner: str) -> None:
        self.owner = owner
        self._faults: dict[str, Fault] = {}

    def add(self, fault: Fault) -> Fault:
        if fault.name in self._faults:
            raise FaultError(FaultErrorKind.DUPLICATE, f"{self.owner}: fault {fault.name} registered twice")
        self._faults[fault.name] = fault
        return fault

    def switch(self, name: str, effect: str) -> Switch:
        """Register a fix that can be switched off."""
        s = Switch(name, effect)
        self.add(s)
        return s

    def queue_drop(self, name: str, effect: str) -> QueueDrop:
        """Register a per-queue "lose events" fault."""
        d = QueueDrop(name, effect)
        self.add(d)
        return d

    def get(self, name: str) -> Fault:
        f = self._faults.get(name)
        if f is None:
            raise FaultError(FaultErrorKind.UNKNOWN_FAULT,
                             f"{self.owner} has no fault {name!r} (it has: {', '.join(self._faults) or 'none'})")
        return f

    def fix_on(self, name: str) -> bool:
        """Is the fix *name* on?  (A registered ``Switch``; KeyError-free: unknown is a FaultError.)"""
        f = self.get(name)
        if not isinstance(f, Switch):
            raise FaultError(FaultErrorKind.BAD_ACTION, f"fault {name} is not a fix that switches")
        return f.fix_on

    def set_fix(self, name: str, on: bool) -> None:
        self.get(name).arm(FaultAction.FIX_ON if on else FaultAction.FIX_OFF)

    def arm(self, name: str, action: str, queue: int | None = None) -> dict:
        """Apply *action* (a FaultAction value) to fault *name*: what the monitor calls."""
        try:
            a = FaultAction(action)
        except ValueError:
            raise FaultError(FaultErrorKind.BAD_ACTION, f"unknown fault action {action!r}") from None
        return self.get(name).arm(a, queue)

    def __iter__(self) -> Iterator[Fault]:
        return iter(list(self._faults.values()))

    def __contains__(self, name: object) -> bool:
        return name in self._faults

    def describe(self) -> list[dict]:
        """Every fault with its kind, effect, actions and state (the monitor's listing)."""
        return [f.describe() for f in self]


# The fixes that belong to no one device but to a part every device of the process shares (guest
# memory, the monitor server, thread naming, diagnose's query guard, image locking).  Each module
# registers its switch here at import; tests turn one off through it (``PROCESS.set_fix``, or
# ``monkeypatch.setattr(PROCESS.get(NAME), "fix_on", False)``), never by patching a module global.
PROCESS = FaultRegistry("process")
