"""Shared test setup: the hypothesis CI profile and machine fixtures."""

from __future__ import annotations

import os
import shutil
import tempfile

import pytest

from hypothesis import HealthCheck, settings

settings.register_profile(
    "ci",
    deadline=None,
    max_examples=int(os.environ.get("KICKCALL_HYPOTHESIS_EXAMPLES", "200")),
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


@pytest.fixture
def workdir():
    """A short temporary directory (Unix socket paths must stay under 108 bytes), removed after."""
    d = tempfile.mkdtemp(prefix="kc")
    yield d
    shutil.rmtree(d, ignore_errors=True)


# -- every kickcall process the suite starts reports an internal error (exit 70, or an uncaught
#    exception in a thread) as a crash report in KICKCALL_CRASH_DIR: any report fails the test
#    during which it appeared, with its text
CRASH_DIR = tempfile.mkdtemp(prefix="kickcall-crashes-")
os.environ["KICKCALL_CRASH_DIR"] = CRASH_DIR


def _crash_reports() -> set[str]:
    try:
        return {n for n in os.listdir(CRASH_DIR) if n.startswith("kickcall-crash-")}
    except FileNotFoundError:
        return set()


@pytest.fixture(autouse=True)
def no_crash_reports(request):
    before = _crash_reports()
    yield
    new = sorted(_crash_reports() - before)
    if new and not request.node.get_closest_marker("crash_reports_expected"):
        texts = []
        for n in new:
            with open(os.path.join(CRASH_DIR, n)) as f:
                texts.append(f"--- {n}\n{f.read()}")
            os.unlink(os.path.join(CRASH_DIR, n))
        pytest.fail("kickcall reported an internal error (exit 70):\n" + "\n".join(texts), pytrace=False)


def pytest_sessionfinish(session, exitstatus):
    shutil.rmtree(CRASH_DIR, ignore_errors=True)
