"""The monitor: a QMP server in QEMU's wire format, its command registry, and the commands."""

from .qmp import Arg, CommandRegistry, QMPError, QMPServer

__all__ = ["Arg", "CommandRegistry", "QMPError", "QMPServer"]
