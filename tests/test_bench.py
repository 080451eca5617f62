"""``kickcall bench ...`` runs end to end (--quick) and reports what its figures rest on: every sample
taken, zero data errors, the paths it claims to measure actually taken.  No figure is asserted
against a threshold (performance lives in BENCHMARKS.md, not in tests)."""

from __future__ import annotations

import json
import os
import re
import shutil
import stat
import subprocess
import xml.etree.ElementTree as ET

import pytest

from helpers import SRC, interrupt_when, kickcall_argv, run_with_stderr_on_pty, spawn, stop_process, wait_for
from kickcall.drive.latency import LADDER, ladder_key

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
    for path in ("floor", "floor-separate-processes", "kick-ioeventfd", "kick-heavyweight", "call-irqfd"):
        assert r[path]["n"] == n, (path, r[path])
        assert 0 < r[path]["p50-us"] <= r[path]["p99-us"], (path, r[path])
    on, off = r["iops-ioeventfd-on"], r["iops-ioeventfd-off"]
    assert on["errors"] == 0 and off["errors"] == 0
    assert on["ops"] > 0 and off["ops"] > 0
    # ioeventfd on: every kick a lightweight exit; off: every kick a heavyweight MMIO exit
    assert on["kicks"] > 0 and on["mmio-exits"] == 0
    assert off["kicks"] > 0 and off["mmio-exits"] == off["kicks"]
    assert len(r["per-round"]) == r["rounds"]
    assert set(r["ratios"]) >= {"kick-ioeventfd-over-floor-p50", "iops-on-over-off"}


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
    assert "kick-ioeventfd" in p.stdout or "ioeventfd" in p.stdout
    # no fixed prose a run's own figures can contradict: the reference's range is this run's
    block = after[after.index(start):after.index(end)]
    assert "~2 µs" not in block and "ranged from" in block
    # the histograms as pictures: one SVG per latency path, beside the file, linked from the section
    links = re.findall(r"!\[[^]]+\]\((docs/bench/notify-[a-z-]+\.svg)\)", block)
    assert len(links) == 5, block
    for link in links:
        root = ET.parse(os.path.join(workdir, link)).getroot()
        bars = [e for e in root.iter("{http://www.w3.org/2000/svg}rect") if e.get("class") == "bar"]
        assert bars and sum(1 for b in bars if float(b.get("width", "0")) > 0) >= 1


def test_markdown_to_text():
    from kickcall.bench import markdown_to_text

    md = "<!-- x: begin -->\n### Title\n\n| a | bb |\n|---|---:|\n| ccc | d |\n\nRatio **2.0x** `mb()`\n<!-- x: end -->\n"
    assert markdown_to_text(md) == "Title\n\na    bb\nccc  d\n\nRatio 2.0x mb()\n"


def test_bench_monitor_books_balance(workdir):
    r = _bench("monitor")
    assert r["errors"] == 0
    assert r["kicks-matched-consumed"] is True and r["doorbells"] > 0
    for mode in ("quiet", "diagnose", "watched"):
        assert r[mode]["ops"] > 0 and r[mode]["errors"] == 0, (mode, r[mode])
    assert r["watched"]["samples-per-s"] > r["diagnose"]["samples-per-s"] > 0


VU_KINDS = ("kickcall", "kickcall-poll", "qsd", "qsd-iothread")
VU_PLACEMENTS = ("same-cpu", "cross-cpu")


def test_bench_vhost_user_drives_every_back_end_on_both_placements(workdir):
    """Issue 14: one run has every (back-end, placement, depth) cell, each with positive figures and
    CPU per 1000 requests, the ratios per placement, and the instrument's own cost.  A back-end mode
    that does not start (qemu-storage-daemon's iothread on an old QEMU) is accepted only with its reason."""
    r = _bench("vhost-user")
    missing = r["unavailable"]
    assert set(missing) <= {"qsd-iothread"}, missing  # kickcall's and QSD's main loop must run
    for kind, why in missing.items():
        assert kind in why and "did not start" in why, why
    for name, runs in r["runs"].items():
        for run in runs:
            assert run["error-count"] == 0 and run["duplicates"] == 0, (name, run["errors"])
            assert run["ops"] > 0 and run["reads"] == run["ops"], (name, run)
    cells = {(c["back-end"], c["placement"], c["depth"]): c for c in r["cells"]}
    want = {(k, pl, d) for k in VU_KINDS if k not in missing for pl in VU_PLACEMENTS for d in (1, 16)}
    assert set(cells) == want, sorted(set(cells) ^ want)
    for key, c in cells.items():
        assert c["ops"] > 0 and c["iops"] > 0 and 0 < c["p50-us"] <= c["p99-us"], (key, c)
        assert c["backend-cpu-s-per-1000"] > 0 and c["frontend-cpu-s-per-1000"] > 0, (key, c)
        assert c["passes"] == r["passes"] == 1, (key, c)
    assert r["poll-max-us"] == 300 and r["job"]["poll-max-us"] == "300"
    ratios = r["ratios"]
    assert set(ratios) == set(VU_PLACEMENTS) | ({"missing"} if missing else set())
    names = {f"{kc}-over-{q}" for kc in ("kickcall", "kickcall-poll") for q in ("qsd", "qsd-iothread")}
    for pl in VU_PLACEMENTS:
        for what in ("depth1-p50", "depth16-iops"):
            assert set(ratios[pl][what]) == names, ratios[pl]
            for name, x in ratios[pl][what].items():
                if "qsd-iothread" in name and missing:
                    assert x is None
                else:
                    assert x is not None and x > 0, (pl, what, name, x)
    ins = r["instrument"]
    for pl in VU_PLACEMENTS:
        for fe in ("instrument", "minimal"):
            x = ins[pl][fe]
            assert x["ops"] > 0 and 0 < x["p50-us"] <= x["p99-us"] and x["frontend-cpu-s-per-1000"] > 0, (pl, fe, x)
        assert ins[pl]["p50-ratio"] > 0
    assert r["profile"], "the polling back-end's profile is empty"


@pytest.mark.parametrize("null", [True, False], ids=["null", "image"])
def test_vhost_user_blk_null_reads_zeroes_and_discards_writes(workdir, null):
    """The instrument's null back-end (``vhost-user-blk --null``): reads return zeroes without
    touching the image, writes are discarded; without --null the same requests read and write the image."""
    from helpers import start_vhost_user_blk
    from kickcall.drive.vhost_user_blk import VhostUserBlkDriver
    from kickcall.virtio.blk import BLK_T_IN, BLK_T_OUT, make_image

    img = os.path.join(workdir, "n.img")
    make_image(img, 1 << 20)
    with open(img, "rb") as f:
        before = f.read()
    assert before[:4096] != bytes(4096)
    sock = os.path.join(workdir, "n.sock")
    p = start_vhost_user_blk(sock, img, *(["--null"] if null else []))
    try:
        drv = VhostUserBlkDriver(sock, reconnect=False)
        try:
            drv.connect(wait=10)
            st, data = drv.io(BLK_T_IN, 0, 4096)
            assert st == 0 and (data == bytes(4096)) == null
            assert data == (bytes(4096) if null else before[:4096])
            st, _ = drv.io(BLK_T_OUT, 8, 4096, b"\xab" * 4096)
            assert st == 0
            st, data = drv.io(BLK_T_IN, 8, 4096)
            assert st == 0 and data == (bytes(4096) if null else b"\xab" * 4096)
        finally:
            drv.close()
    finally:
        stop_process(p)
    with open(img, "rb") as f:
        after = f.read()
    assert (after == before) == null


def _vu_result(unavailable: dict[str, str]) -> dict:
    from kickcall.bench import (VU_BACKENDS, VU_DEPTHS, VU_PLACEMENTS as PL, _vu_cells, _vu_ratios,
                                machine_description, vu_key)

    run = {"ops": 1000, "elapsed": 1.0, "lat_us_p50": 50.0, "lat_us_p99": 90.0, "backend_cpu_s": 0.05,
           "frontend_cpu_s": 0.07, "spurious_calls": 0}
    runs = {vu_key(k, pl, d): [dict(run)] for k, _ in VU_BACKENDS if k not in unavailable for pl, _ in PL
            for d in VU_DEPTHS}
    cells = _vu_cells(runs)
    fe = {"ops": 100, "p50_us": 20.0, "p99_us": 40.0, "iops": 100.0, "frontend_cpu_s_per_1000": 0.01}
    ins: dict = {"seconds_per_run": 1.0, "passes": 1, "back_end": "null"}
    for pl, _ in PL:
        ins[pl] = {"instrument": dict(fe, p50_us=22.0), "minimal": fe, "p50_ratio": 1.1, "p50_extra_us": 2.0}
    return {"machine": machine_description(), "seconds_per_run": 1.0, "passes": 1, "poll_max_us": 300.0,
            "placements": dict(PL), "pinned": True, "runs": runs, "unavailable": unavailable, "cells": cells,
            "ratios": _vu_ratios(cells, unavailable), "instrument": ins, "profile": [], "qsd_version": "7.2"}


@pytest.mark.parametrize("iothread", ["ran", "did not start"])
def test_vhost_user_table_and_ratios_say_what_did_not_run(iothread):
    from kickcall.bench import markdown_to_text, render_vhost_user

    why = {} if iothread == "ran" else {"qsd-iothread": "qsd-iothread did not start: no such option"}
    r = _vu_result(why)
    assert len(r["cells"]) == (16 if not why else 12)
    cell = r["cells"][0]
    assert cell["backend_cpu_s_per_1000"] == pytest.approx(0.05) and cell["frontend_cpu_s_per_1000"] == pytest.approx(0.07)
    ra = r["ratios"]
    for pl in ("same-cpu", "cross-cpu"):
        assert ra[pl]["depth1_p50"]["kickcall-poll_over_qsd"] == pytest.approx(1.0)
        assert (ra[pl]["depth16_iops"]["kickcall_over_qsd-iothread"] is None) == bool(why)
    assert ("missing" in ra) == bool(why)
    text = markdown_to_text(render_vhost_user(r))
    rows = [ln for ln in text.splitlines() if ln.startswith(("kickcall vhost-user-blk", "qemu-storage-daemon"))]
    assert len(rows) == 16, text  # every cell has a row, a missing one with dashes
    assert "1.10x same-cpu" in text and "1.10x cross-cpu" in text, text
    if why:
        assert "qsd-iothread not measured: qsd-iothread did not start: no such option" in text, text
        assert sum(1 for ln in rows if ln.split()[-5:] == ["-"] * 5) == 4, rows
    else:
        assert "not measured" not in text


# -- fio-grade output (issue 13, item 3) ---------------------------------------------------------------------
LADDER_LABELS = [f"{p:5.2f}th=[".strip() for p in LADDER]
NOTIFY_KEYS = ["floor", "floor-separate-processes", "kick-ioeventfd", "kick-heavyweight", "call-irqfd"]


def _env() -> dict:
    return dict(os.environ, PYTHONPATH=SRC + os.pathsep + os.environ.get("PYTHONPATH", ""))


def _log_lines(path: str) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        text = f.read()
    assert text.endswith("\n"), "the last line of the log is incomplete"
    return [json.loads(line) for line in text.splitlines()]


def _check_latency_blocks(out: str, n_paths: int) -> None:
    """fio's block per latency path: the clat line, the whole ladder, the log2 histogram."""
    assert out.count("clat percentiles (usec):") == n_paths, out
    assert out.count("lat histogram (usec, log2):") == n_paths, out
    for label in LADDER_LABELS:
        assert len(re.findall(r"(?<![\d.])" + re.escape(label), out)) == n_paths, (label, out)
    buckets = re.findall(r"^\s+\[\s*(\d+),\s*(\d+)\)\s+(\d+)\s", out, re.M)
    assert buckets and all(int(hi) == max(1, 2 * int(lo)) for lo, hi, _ in buckets), out


def _check_round(rec: dict) -> None:
    assert rec["bench"] == "notify" and rec["record"] == "round", rec
    assert sorted(rec["paths"]) == sorted(NOTIFY_KEYS), rec
    for s in rec["paths"].values():
        assert list(s["percentiles-us"]) == [ladder_key(p) for p in LADDER]
        assert s["n"] > 0 and 0 < s["min-us"] <= s["percentiles-us"]["50.00"] <= s["max-us"]


def test_bench_notify_job_line_ladder_histogram_and_log(workdir):
    log = os.path.join(workdir, "notify.ndjson")
    p = subprocess.run(kickcall_argv("bench", "notify", "--quick", "--rounds", "2", "--log", log),
                       capture_output=True, text=True, timeout=300, env=_env(), stdin=subprocess.DEVNULL)
    assert p.returncode == 0, p.stderr[-3000:]
    job = p.stdout.splitlines()[0]  # the job's parameters come first, before any figure
    assert job.startswith("bench notify: rounds=2, "), job
    for part in ("samples-per-round=150", "samples-per-path=300", "quick=yes", f"log={log}", "write=-"):
        assert part in job, (part, job)
    _check_latency_blocks(p.stdout, len(NOTIFY_KEYS))
    assert "floor: eventfd, guest vCPU thread -> VMM IOThread: 300 samples" in p.stdout
    # not a terminal: no progress line
    assert "\r" not in p.stderr and "ETA" not in p.stderr, p.stderr
    assert stat.S_IMODE(os.stat(log).st_mode) == 0o600
    recs = _log_lines(log)
    rounds = [r for r in recs if r["record"] == "round"]
    iops = [r for r in recs if r["record"] == "iops"]
    assert [r["round"] for r in rounds] == [1, 2] and len(iops) == 4 and len(recs) == 6
    for r in rounds:
        _check_round(r)
    assert sorted((r["ioeventfd"], r["pass"]) for r in iops) == [(False, 1), (False, 2), (True, 1), (True, 2)]
    assert all(r["errors"] == 0 and r["ops"] > 0 for r in iops)


def test_bench_json_carries_the_job_and_the_ladder(workdir):
    r = _bench("notify", "--rounds", "1")
    assert r["job"]["rounds"] == 1 and r["interrupted"] is False
    for key in ("floor", "kick-ioeventfd", "call-irqfd"):
        s = r[key]
        assert list(s["percentiles-us"]) == [ladder_key(p) for p in LADDER]
        vals = list(s["percentiles-us"].values())
        assert vals == sorted(vals)
        assert sum(b["count"] for b in s["log2-histogram-us"]) == s["n"] == r["iterations"]


def test_bench_progress_line_on_a_terminal_only(workdir):
    rc, out, err = run_with_stderr_on_pty(kickcall_argv("bench", "notify", "--quick", "--rounds", "3"))
    assert rc == 0, err
    assert "ETA" in err and "\r" in err and "round 3/3" in err, err
    # rewritten in place, never wider than the terminal (80 columns by default)
    progress = [line for seg in err.split("\r") for line in seg.split("\n") if "ETA" in line]
    assert len(progress) >= 3 and all(len(line) <= 80 for line in progress), progress
    assert "ETA" not in out.decode()


@pytest.mark.parametrize("json_out", [False, True], ids=["text", "json"])
def test_bench_ctrl_c_prints_the_partial_results_and_exits_130(workdir, json_out):
    log = os.path.join(workdir, "int.ndjson")
    md = os.path.join(workdir, "B.md")
    out_path, err_path = os.path.join(workdir, "out"), os.path.join(workdir, "err")
    argv = ["bench", "notify", "--quick", "--rounds", "100000", "--log", log, "--write", md]
    with open(out_path, "w") as out, open(err_path, "w") as err:
        p = spawn(kickcall_argv(*argv, *(["--json"] if json_out else [])), stdout=out, stderr=err)
    job_path = err_path if json_out else out_path  # with --json, stdout is the document alone
    try:
        wait_for(lambda: p.poll() is not None or os.path.getsize(job_path) > 0, 120, "the job line")
        with open(job_path) as f:
            assert f.read().startswith("bench notify: rounds=100000")
    except BaseException:
        stop_process(p)
        raise
    stdout, stderr = interrupt_when(p, lambda: os.path.exists(log) and len(_complete(log)) >= 2,
                                    "two rounds in the log", out_path, err_path)
    if json_out:
        doc = json.loads(stdout)
        recs = _log_lines(log)
        assert doc["interrupted"] is True and doc["job"]["rounds"] == 100000 and doc["records"] == recs
        per = recs[0]["paths"]["floor"]["n"]
        for key in ("floor", "kick-ioeventfd", "call-irqfd"):
            s = doc["latency"][key]
            assert s["n"] == len(recs) * per and list(s["percentiles-us"]) == [ladder_key(p) for p in LADDER]
            assert sum(b["count"] for b in s["log2-histogram-us"]) == s["n"]
        assert not os.path.exists(md)
        return
    m = re.search(r"interrupted after [\d.]+ s: partial results, (\d+) complete round\(s\) or run\(s\); "
                  + re.escape(md) + " not updated", stdout)
    assert m, stdout
    recs = _log_lines(log)  # every line complete
    for r in recs:
        _check_round(r)
    n = len(recs)
    assert int(m.group(1)) == n >= 2
    assert len(re.findall(r"^  round \d+/100000: p50 floor", stdout, re.M)) == n
    _check_latency_blocks(stdout, len(NOTIFY_KEYS))
    # the partial figures are the complete rounds', each path's samples counted once
    per = recs[0]["paths"]["floor"]["n"]
    assert f"floor: eventfd, guest vCPU thread -> VMM IOThread: {n * per} samples" in stdout, stdout
    assert not os.path.exists(md) and not os.path.exists(os.path.join(workdir, "docs"))


def _complete(path: str) -> list[str]:
    with open(path, encoding="utf-8") as f:
        return f.read().split("\n")[:-1]


@pytest.mark.parametrize("bench", ["notify", "vhost-user", "monitor", "vfio"])
def test_a_bad_value_names_the_option(workdir, bench):
    cases = [("--write", workdir), ("--write", os.path.join(workdir, "no", "such", "B.md"))]
    if bench == "notify":
        cases += [("--rounds", "0"), ("--rounds", "100001"), ("--rounds", "x")]
    if bench == "vhost-user":
        cases += [("--poll-max-us", "0"), ("--poll-max-us", "1000001"), ("--poll-max-us", "x")]
    for option, value in cases:
        p = subprocess.run(kickcall_argv("bench", bench, option, value), capture_output=True, text=True, timeout=60,
                           env=_env(), stdin=subprocess.DEVNULL)
        assert p.returncode == 2, (option, value, p.stdout, p.stderr)
        last = p.stderr.strip().splitlines()[-1]
        assert f"argument {option}: " in last and value in last and "Traceback" not in p.stderr, last
        assert p.stdout == ""  # refused before anything ran: not even the job line
    existing = os.path.join(workdir, "existing.ndjson")
    with open(existing, "w") as f:
        f.write("someone else's\n")
    link = os.path.join(workdir, "link.ndjson")
    if not os.path.lexists(link):
        os.symlink(os.path.join(workdir, "target"), link)
    for path in (existing, link):
        p = subprocess.run(kickcall_argv("bench", bench, "--log", path), capture_output=True, text=True, timeout=60,
                           env=_env(), stdin=subprocess.DEVNULL)
        assert p.returncode == 2, p.stderr
        (line,) = p.stderr.strip().splitlines()
        assert path in line and "--log" in line and "exists" in line, line
        assert p.stdout == ""
    with open(existing) as f:
        assert f.read() == "someone else's\n"
    assert not os.path.exists(os.path.join(workdir, "target"))


@pytest.mark.parametrize("bench", ["notify", "vhost-user", "monitor", "vfio"])
def test_every_option_has_help_with_its_default(bench):
    p = subprocess.run(kickcall_argv("bench", bench, "--help"), capture_output=True, text=True, timeout=60,
                       env=_env(), stdin=subprocess.DEVNULL)
    assert p.returncode == 0
    blocks: dict[str, str] = {}
    current = None
    for line in p.stdout.split("options:", 1)[1].splitlines():
        mm = re.match(r"^  (-\S+)", line)
        if mm:
            current = mm.group(1).rstrip(",")
            blocks[current] = line
        elif current and line.startswith("   "):
            blocks[current] += " " + line.strip()
    own = ["--json", "--write", "--quick", "--log"] + (["--rounds"] if bench == "notify" else []) + (
        ["--poll-max-us"] if bench == "vhost-user" else [])
    for opt in own:
        assert opt in blocks, (opt, sorted(blocks))
        assert "default" in blocks[opt], blocks[opt]
    if bench == "notify":
        assert "1..100000" in blocks["--rounds"]
    if bench == "vhost-user":
        assert "1..1000000" in blocks["--poll-max-us"] and "default 300" in blocks["--poll-max-us"]


def test_svg_histogram_has_a_bar_per_bucket():
    from kickcall.drive.latency import LatencyHistogram, svg_log2

    h = LatencyHistogram()
    for ns in (300, 1500, 1700, 2500, 9000, 9100, 70000, 3_000_000):  # buckets [0,1) .. [2048,4096), gaps in between
        h.record(ns)
    buckets = h.log2_buckets()
    assert len(buckets) == 13 and sum(b["count"] for b in buckets) == h.n
    root = ET.fromstring(svg_log2(buckets, "a <title> & more"))
    assert root.tag == "{http://www.w3.org/2000/svg}svg"
    bars = [e for e in root.iter("{http://www.w3.org/2000/svg}rect") if e.get("class") == "bar"]
    assert len(bars) == len(buckets)
    widths = [float(b.get("width", "nan")) for b in bars]
    top = max(b["count"] for b in buckets)
    # the widest bar is the fullest bucket, an empty bucket has no width, widths follow the counts
    assert [w == max(widths) for w in widths] == [b["count"] == top for b in buckets]
    assert [w == 0 for w in widths] == [b["count"] == 0 for b in buckets]
    per_count = [w / b["count"] for w, b in zip(widths, buckets, strict=True) if b["count"]]
    assert max(per_count) == pytest.approx(min(per_count), rel=0.01)


def test_histograms_folded_round_by_round_equal_one_histogram():
    """bench folds each round's histogram into the run's (LatencyHistogram.add): the same figures as
    recording every latency into one."""
    from kickcall.drive.latency import LatencyHistogram

    xs = [(i * 7919) % 50000 + 300 for i in range(3000)]
    one = LatencyHistogram().record_all(xs)
    total = LatencyHistogram()
    for k in range(0, len(xs), 250):
        total.add(LatencyHistogram().record_all(xs[k:k + 250]))
    total.add(LatencyHistogram())  # an empty round changes nothing
    assert total.summary() == one.summary()
    assert (total.n, total.min_ns, total.max_ns) == (3000, min(xs), max(xs))
