"""``kickcall diagnose``: tell a lost kick from a lost call (seed 000's question) from the outside.

It talks to any kickcall monitor (a machine's or a vhost-user back-end's) with read-only queries,
judges each virtqueue from several equal samples, and with ``--fix`` injects the one event the
verdict calls for -- never unmasking a vector the guest owns.
"""

from .run import Report, apply_fixes, diagnose, format_report
from .verdict import Verdict, judge, judge_state

__all__ = ["Report", "Verdict", "apply_fixes", "diagnose", "format_report", "judge", "judge_state"]
