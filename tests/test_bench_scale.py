"""``kickcall bench scale --quick`` runs end to end: every curve is there with its points, every
value is positive, every curve has its linearity verdict; ``--write`` puts the section in a copy
of BENCHMARKS.md and ``--log`` writes one JSON object per point.  No figure is compared with a
threshold of time (performance lives in BENCHMARKS.md)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess

import pytest

from helpers import SRC, kickcall_argv
from kickcall.bench_scale import SCALE_BLOCK_END, SCALE_BLOCK_START, scale_plan, verdict

pytestmark = pytest.mark.slow

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CURVES = {"queues-setup", "queues-vmm-rss", "queues-guest-rss", "vectors-setup", "vectors-vmm-rss",
          "vectors-guest-rss", "vmm-vectors-batched", "vmm-vectors-per-vector-commit", "diagnose-sample",
          "msix-query", "kick-latency"}


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, str, str, list[dict]]:
    d = tmp_path_factory.mktemp("kcbs")
    md = str(d / "BENCHMARKS.md")
    shutil.copy(os.path.join(ROOT, "BENCHMARKS.md"), md)
    before = open(md).read()
    log = str(d / "scale.ndjson")
    env = dict(os.environ, PYTHONPATH=SRC + os.pathsep + os.environ.get("PYTHONPATH", ""))
    p = subprocess.run(kickcall_argv("bench", "scale", "--quick", "--json", "--write", md, "--log", log),
                       capture_output=True, text=True, timeout=600, env=env, stdin=subprocess.DEVNULL)
    assert p.returncode == 0, p.stderr[-3000:]
    with open(log) as f:
        recs = [json.loads(line) for line in f]
    return json.loads(p.stdout), before, open(md).read(), recs


def test_every_curve_with_its_points_and_verdict(run: tuple[dict, str, str, list[dict]]) -> None:
    r = run[0]
    assert r["interrupted"] is False and r["job"]["quick"] == "yes"
    curves = {c["name"]: c for c in r["curves"]}
    assert set(curves) == CURVES
    plan = scale_plan(True)
    want = {"queues-setup": plan["queues"], "vectors-setup": plan["vectors"],
            "vmm-vectors-batched": plan["vmm_vectors"], "diagnose-sample": plan["queues"],
            "msix-query": [n + 1 for n in plan["queues"]], "kick-latency": [1, 1024]}
    for name, c in curves.items():
        assert c["verdict"], name
        assert c["points"] and all(p["value"] > 0 for p in c["points"]), (name, c["points"])
        if name in want:
            assert [p["n"] for p in c["points"]] == want[name], name


def test_routing_commits_counted(run: tuple[dict, str, str, list[dict]]) -> None:
    """The machine-level vectors: one KVM_SET_GSI_ROUTING whatever the number of vectors; the
    VMM-level comparison: one for the batch, n when committing after each route."""
    r = run[0]
    assert set(r["commits"].values()) == {1}
    for p in r["points"]["vmm-vectors"]:
        assert p["vectors-commits"] == 1
    for p in r["points"]["vmm-vectors-per-vector-commit"]:
        assert p["vectors-commits"] == p["n"]
    for p in r["points"]["vectors"]:
        assert p["irqfds"] == p["queues"]


def test_write_and_log(run: tuple[dict, str, str, list[dict]]) -> None:
    _r, before, after, recs = run
    assert SCALE_BLOCK_START in after and SCALE_BLOCK_END in after
    section = after[after.index(SCALE_BLOCK_START):]
    assert "Machine:" in section and "Verdicts:" in section
    rest = after.replace(after[after.index(SCALE_BLOCK_START):after.index(SCALE_BLOCK_END) + len(SCALE_BLOCK_END)],
                         "").rstrip()
    assert before.rstrip().startswith(rest[:200])  # the other sections are left as they were
    kinds = {x["record"] for x in recs}
    assert kinds == {"point", "kick"}
    assert all(x["bench"] == "scale" for x in recs)


def test_verdicts() -> None:
    """The verdict's arithmetic: linear, quadratic, flat."""
    xs = [1.0, 16.0, 64.0, 1024.0]
    assert verdict(xs, [10 + 2 * x for x in xs], "ms")["verdict"] == "linear or better"
    q = verdict(xs, [10 + x * x / 100 for x in xs], "ms", why_not="because")
    assert q["verdict"] == "superlinear" and q["note"] == "because" and q["ratio"] > 2
    assert verdict(xs, [100.0, 101.0, 100.5, 102.0], "ms")["verdict"].startswith("flat")
