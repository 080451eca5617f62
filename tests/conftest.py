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
