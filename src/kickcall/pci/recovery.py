"""PCIe error recovery: Linux's ``pci_error_handlers`` vocabulary and ``pcie_do_recovery``'s vote.

Both kernels kickcall models recover the same way -- the host's (``kickcall.vfio.host_aer``, in the
vfio-user server) and the guest's (``kickcall.guest.aer``):

1. the bridge: the port the error was reported on (a Root Port), or the upstream bridge of the
   function that reported it;
2. ``error_detected(state)`` to every driver below the bridge (``io_normal`` for a non-fatal
   error, ``io_frozen`` for a fatal one); the votes merge (``merge_result``); a function whose
   driver has no handlers votes ``NO_AER_DRIVER``;
3. frozen: reset the link (a secondary bus reset of the bridge resets every function below it);
4. ``CAN_RECOVER`` -> ``mmio_enabled`` to every driver; ``NEED_RESET`` -> ``slot_reset``;
5. not ``RECOVERED`` -> the functions are failed (``io_perm_failure``);
6. else ``resume`` to every driver, and the AER status is cleared.

The numbers are Linux's (``include/linux/pci.h``).
"""

from __future__ import annotations

import enum
from typing import Protocol

__all__ = ["PciErsResult", "PciChannelState", "merge_result", "PciErrorHandlers", "RecoveryStep"]


class PciErsResult(enum.IntEnum):
    """``enum pci_ers_result``."""

    NONE = 1
    CAN_RECOVER = 2
    NEED_RESET = 3
    DISCONNECT = 4
    RECOVERED = 5
    NO_AER_DRIVER = 6


class PciChannelState(enum.StrEnum):
    """``pci_channel_state_t``."""

    NORMAL = "io_normal"
    FROZEN = "io_frozen"
    PERM_FAILURE = "io_perm_failure"


class RecoveryStep(enum.StrEnum):
    """The steps of a recovery, as trace events and history entries name them."""

    ERROR_DETECTED = "error_detected"
    LINK_RESET = "link_reset"
    MMIO_ENABLED = "mmio_enabled"
    SLOT_RESET = "slot_reset"
    RESUME = "resume"
    FAILED = "failed"
    RECOVERED = "recovered"


def merge_result(orig: PciErsResult, new: PciErsResult) -> PciErsResult:
    """``merge_result``: NO_AER_DRIVER dominates; NONE changes nothing; CAN_RECOVER and RECOVERED
    take the new vote; DISCONNECT becomes NEED_RESET when a driver asks for a reset."""
    if new is PciErsResult.NO_AER_DRIVER:
        return PciErsResult.NO_AER_DRIVER
    if new is PciErsResult.NONE:
        return orig
    if orig in (PciErsResult.CAN_RECOVER, PciErsResult.RECOVERED):
        return new
    if orig is PciErsResult.DISCONNECT and new is PciErsResult.NEED_RESET:
        return PciErsResult.NEED_RESET
    return orig


class PciErrorHandlers(Protocol):
    """``struct pci_error_handlers`` of a driver bound to a function."""

    def error_detected(self, state: PciChannelState) -> PciErsResult: ...

    def mmio_enabled(self) -> PciErsResult: ...

    def slot_reset(self) -> PciErsResult: ...

    def resume(self) -> None: ...
