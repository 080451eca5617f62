"""The monitor: a QMP server in QEMU's wire format, its command registry, and the commands.

One concept per module: ``json_stream`` (QMP input: QEMU's JSON dialect, read incrementally),
``encoder`` (QMP output as QEMU prints it), ``schema`` (commands, their argument schemas and
``QMPError``), ``server`` (the asyncio QMP server), ``commands`` (the commands themselves),
``client`` (a synchronous client), ``shell`` (qmp-shell) and ``target`` (what the commands act on)."""

from .schema import Arg, CommandRegistry, QMPError
from .server import QMPServer

__all__ = ["Arg", "CommandRegistry", "QMPError", "QMPServer"]
