"""``kickcall diagnose``: tell a lost kick from a lost call (seed 000's question) from the outside.

It talks to QEMU (7.2 and later), a kickcall machine or a kickcall vhost-user back-end with
queries known to change nothing on that kind of target (:mod:`.targets`), judges each virtqueue
from several samples (:mod:`.verdict`), joins a QEMU vhost device with its back-end's view, and
with ``--fix`` injects the one event the verdict calls for where the target has a safe way to --
never unmasking a vector the guest owns, never kicking a ring its front-end stopped.
"""

from .run import Report, TargetSession, apply_fixes, diagnose, exit_status, format_report
from .targets import ALLOWED, TargetKind, identify
from .verdict import Verdict, VerdictKind, judge, judge_state

__all__ = ["ALLOWED", "Report", "TargetKind", "TargetSession", "Verdict", "VerdictKind", "apply_fixes", "diagnose",
           "exit_status", "format_report", "identify", "judge", "judge_state"]
