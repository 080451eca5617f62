"""``kickcall bench ...`` runs end to end (--quick) and reports what its figures rest on: every sample
taken, zero data errors, the paths it claims to measure actually taken.  No figure is asserted
against a threshold (performance lives in BENCHMARKS.md, not in tests)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess

import pytest

from helpers import SRC, kickcall_argv

pytestmark = pytest.mark.slow

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _bench(*args: str, timeout: float = 300) -> dict:
    env = dict(os.environ, PYTHONPATH=SRC + os.pathsep + os.environ.get("PYTHONPATH", ""))
    p = subprocess.run(kickcall_argv("bench", *args, "--quick", "--json"), capture_output=True, text=True,
                       timeout=timeout, env=env, stdin=subprocess.DEVNULL)
    assert p.returncode == 0, p.stderr[-3000:]
    return json.loads(p.stdout)


def test_bench_notify_takes_every_path_it_names(workdir):
    r = _bench("notify")
    n = r["iterations"]
    for path in ("floor", "floor_separate_processes", "kick_ioeventfd", "kick_heavyweight", "call_irqfd"):
        assert r[path]["n"] == n, (path, r[path])
        assert 0 < r[path]["p50_us"] <= r[path]["p99_us"], (path, r[path])
    on, off = r["iops_ioeventfd_on"], r["iops_ioeventfd_off"]
    assert on["errors"] == 0 and off["errors"] == 0
    assert on["ops"] > 0 and off["ops"] > 0
    # ioeventfd on: every kick a lightweight exit; off: every kick a heavyweight MMIO exit
    assert on["kicks"] > 0 and on["mmio_exits"] == 0
    assert off["kicks"] > 0 and off["mmio_exits"] == off["kicks"]
    assert len(r["per_round"]) == r["rounds"]
    assert set(r["ratios"]) >= {"kick_ioeventfd_over_floor_p50", "iops_on_over_off"}


def test_bench_notify_write_replaces_only_its_own_section(workdir):
    md = os.path.join(workdir, "BENCHMARKS.md")
    shutil.copy(os.path.join(ROOT, "BENCHMARKS.md"), md)
    before = open(md).read()
    env = dict(os.environ, PYTHONPATH=SRC + os.pathsep + os.environ.get("PYTHONPATH", ""))
    p = subprocess.run(kickcall_argv("bench", "notify", "--quick", "--write", md), capture_output=True, text=True,
                       timeout=300, env=env, stdin=subprocess.DEVNULL)
    assert p.returncode == 0, p.stderr[-3000:]
    after = open(md).read()
    start, end = "<!-- bench notify: begin -->", "<!-- bench notify: end -->"
    assert after.count(start) == 1 and after.count(end) == 1
    outside = lambda t: t[:t.index(start)] + t[t.index(end):]  # noqa: E731
    assert outside(after) == outside(before)  # the other sections and the hand-written notes survive
    assert after != before and "kickcall bench notify" in after[after.index(start):after.index(end)]
    # the terminal gets text, not Markdown: no HTML markers, no emphasis, no table rules
    assert "<!--" not in p.stdout and "**" not in p.stdout and "|---" not in p.stdout, p.stdout[:2000]
    assert "kick_ioeventfd" in p.stdout or "ioeventfd" in p.stdout
    # no fixed prose a run's own figures can contradict: the reference's range is this run's
    block = after[after.index(start):after.index(end)]
    assert "~2 µs" not in block and "ranged from" in block


def test_markdown_to_text():
    from kickcall.bench import markdown_to_text

    md = "<!-- x: begin -->\n### Title\n\n| a | bb |\n|---|---:|\n| ccc | d |\n\nRatio **2.0x** `mb()`\n<!-- x: end -->\n"
    assert markdown_to_text(md) == "Title\n\na    bb\nccc  d\n\nRatio 2.0x mb()\n"


def test_bench_monitor_books_balance(workdir):
    r = _bench("monitor")
    assert r["errors"] == 0
    assert r["kicks_matched_consumed"] is True and r["doorbells"] > 0
    for mode in ("quiet", "diagnose", "watched"):
        assert r[mode]["ops"] > 0 and r[mode]["errors"] == 0, (mode, r[mode])
    assert r["watched"]["samples_per_s"] > r["diagnose"]["samples_per_s"] > 0


def test_bench_vhost_user_drives_both_back_ends(workdir):
    r = _bench("vhost-user")
    assert set(r["runs"]) == {"qsd-1", "kickcall-1", "qsd-16", "kickcall-16"}
    for name, runs in r["runs"].items():
        for run in runs:
            assert run["error_count"] == 0 and run["duplicates"] == 0, (name, run["errors"])
            assert run["ops"] > 0 and run["reads"] == run["ops"], (name, run)
    assert set(r["ratios"]) == {"python_over_c_depth1", "python_over_c_depth16"}
