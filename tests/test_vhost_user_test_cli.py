"""``kickcall vhost-user-test`` as a fio user expects it (issue 13, item 3): the job line first, options
with ranges and defaults, progress with an ETA on a terminal only, fio's clat percentile ladder and
a log2 histogram, ``--log`` NDJSON (0600, never over an existing file) and Ctrl-C giving the partial
results with exit 130.  The back-end is ``kickcall vhost-user-blk`` in its own process; the tool
runs as a process too."""

from __future__ import annotations

import json
import os
import re
import stat
import subprocess
from collections.abc import Iterator

import pytest

from helpers import SRC, interrupt_when, kickcall_argv, run_with_stderr_on_pty, spawn, start_vhost_user_blk, stop_process
from kickcall.drive.latency import LADDER, ladder_key
from kickcall.virtio.blk import make_image

LADDER_LABELS = [f"{p:5.2f}th=[".strip() for p in LADDER]
OWN_OPTIONS = ["--socket", "--queues", "--depth", "--block-size", "--read-ratio", "--duration", "--blocks",
               "--queue-size", "--seed", "--no-inflight", "--connect-wait", "--log", "--log-interval", "--json"]


@pytest.fixture
def backend(workdir: str) -> Iterator[str]:
    img = os.path.join(workdir, "d.img")
    make_image(img, 16 << 20)
    sock = os.path.join(workdir, "vb.sock")
    be = start_vhost_user_blk(sock, img, "--num-queues", "2")
    try:
        yield sock
    finally:
        stop_process(be)


def _run(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(kickcall_argv("vhost-user-test", *args), capture_output=True, text=True, timeout=timeout,
                          env=dict(os.environ, PYTHONPATH=SRC), stdin=subprocess.DEVNULL)


def _log_lines(path: str) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        text = f.read()
    assert text.endswith("\n"), "the last line of the log is incomplete"
    return [json.loads(line) for line in text.splitlines()]


def _check_interval(rec: dict) -> None:
    for k in ("time", "elapsed", "interval", "read-iops", "write-iops", "reads", "writes", "lat-us-percentiles",
              "errors"):
        assert k in rec, (k, rec)
    assert list(rec["lat-us-percentiles"]) == [ladder_key(p) for p in LADDER]
    assert rec["interval"] > 0 and rec["read-iops"] >= 0 and rec["write-iops"] >= 0 and rec["errors"] == 0


def _check_ladder_and_histogram(out: str) -> None:
    assert "clat percentiles (usec):" in out
    for label in LADDER_LABELS:
        assert label in out, (label, out)
    assert "lat histogram (usec, log2):" in out
    buckets = re.findall(r"^\s+\[\s*(\d+),\s*(\d+)\)\s+(\d+)\s", out, re.M)
    assert buckets and all(int(hi) == max(1, 2 * int(lo)) for lo, hi, _ in buckets), out


def test_job_line_ladder_histogram_and_the_interval_log(backend: str, workdir: str) -> None:
    log = os.path.join(workdir, "run.ndjson")
    r = _run("--socket", backend, "--queues", "2", "--depth", "8", "--duration", "1.5", "--seed", "7",
             "--log", log, "--log-interval", "0.25")
    assert r.returncode == 0, r.stdout + r.stderr
    first = r.stdout.splitlines()[0]
    assert first.startswith("vhost-user-test: socket=" + backend), first
    for part in ("rw=randrw", "rwmixread=50%", "bs=4096", "iodepth=8", "queues=2", "duration=1.5s", "seed=7",
                 f"log={log}"):
        assert part in first, (part, first)
    _check_ladder_and_histogram(r.stdout)
    # not a terminal: no progress line
    assert "\r" not in r.stderr and "ETA" not in r.stderr, r.stderr
    assert stat.S_IMODE(os.stat(log).st_mode) == 0o600
    recs = _log_lines(log)
    assert len(recs) >= 2
    for rec in recs:
        _check_interval(rec)
    # the intervals (the last one partial) add up to the totals the report gives
    m = re.search(r"(\d+) verified ops \((\d+) reads, (\d+) writes\)", r.stdout)
    assert m, r.stdout
    assert sum(x["reads"] for x in recs) == int(m.group(2)) and sum(x["writes"] for x in recs) == int(m.group(3))
    assert int(m.group(1)) > 0


def test_json_carries_the_job_the_ladder_and_the_histogram(backend: str) -> None:
    r = _run("--socket", backend, "--duration", "1", "--json")
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)  # stdout is the document alone; the job line went to stderr
    assert r.stderr.startswith("vhost-user-test: socket=")
    assert doc["job"]["depth"] == 16 and doc["job"]["socket"] == backend and doc["interrupted"] is False
    lat = doc["latency"]
    assert list(lat["percentiles-us"]) == [ladder_key(p) for p in LADDER]
    vals = list(lat["percentiles-us"].values())
    assert vals == sorted(vals) and vals[0] > 0
    assert sum(b["count"] for b in lat["log2-histogram-us"]) == lat["count"] == doc["ops"]


def test_progress_line_on_a_terminal_only(backend: str) -> None:
    rc, out, err = run_with_stderr_on_pty(kickcall_argv("vhost-user-test", "--socket", backend, "--duration", "1.5",
                                                        "--log-interval", "0.25"), timeout=120)
    assert rc == 0, err
    assert "ETA" in err and "\r" in err and "IOPS" in err, err
    # rewritten in place: no progress line ever ends a line of its own, and none is wider than 80
    assert all(len(seg) <= 80 for seg in err.split("\r")), err
    assert "ETA" not in out.decode()


def test_ctrl_c_prints_the_partial_results_and_exits_130(backend: str, workdir: str) -> None:
    log = os.path.join(workdir, "int.ndjson")
    out_path, err_path = os.path.join(workdir, "out"), os.path.join(workdir, "err")
    with open(out_path, "w") as out, open(err_path, "w") as err:
        p = spawn(kickcall_argv("vhost-user-test", "--socket", backend, "--duration", "300", "--log", log,
                                "--log-interval", "0.2"), stdout=out, stderr=err)
    stdout, stderr = interrupt_when(p, lambda: os.path.exists(log) and len(_complete_lines(log)) >= 2,
                                    "two interval lines in the log", out_path, err_path)
    assert "interrupted after" in stdout and "partial results" in stdout
    _check_ladder_and_histogram(stdout)
    assert "errors: 0" in stdout
    m = re.search(r"(\d+) verified ops \((\d+) reads, (\d+) writes\)", stdout)
    assert m and int(m.group(1)) > 0, stdout
    recs = _log_lines(log)  # every line complete
    assert len(recs) >= 2
    for rec in recs:
        _check_interval(rec)
    assert sum(x["reads"] for x in recs) == int(m.group(2)) and sum(x["writes"] for x in recs) == int(m.group(3))


def _complete_lines(path: str) -> list[str]:
    with open(path, encoding="utf-8") as f:
        return f.read().split("\n")[:-1]


@pytest.mark.parametrize("option,value", [("--depth", "0"), ("--depth", "1025"), ("--queues", "0"),
                                          ("--block-size", "1000"), ("--block-size", "x"), ("--read-ratio", "1.5"),
                                          ("--duration", "0"), ("--queue-size", "100"), ("--blocks", "0"),
                                          ("--log-interval", "0"), ("--connect-wait", "-1")])
def test_a_bad_value_names_the_option(workdir: str, option: str, value: str) -> None:
    r = _run("--socket", os.path.join(workdir, "nothing"), option, value)
    assert r.returncode == 2
    last = r.stderr.strip().splitlines()[-1]
    assert f"argument {option}: " in last and (f"got {value}" in last or repr(value) in last), last
    assert "bad workload parameters" not in r.stderr and "Traceback" not in r.stderr


def test_every_option_has_help_with_its_default() -> None:
    r = _run("--help")
    assert r.returncode == 0
    text = r.stdout.split("options:", 1)[1]
    blocks: dict[str, str] = {}
    current = None
    for line in text.splitlines():
        m = re.match(r"^  (-\S+)", line)
        if m:
            current = m.group(1).rstrip(",")
            blocks[current] = line
        elif current and line.startswith("   "):
            blocks[current] += " " + line.strip()
    for opt in OWN_OPTIONS:
        assert opt in blocks, (opt, sorted(blocks))
        assert "default" in blocks[opt], blocks[opt]


def test_log_never_overwrites_a_file(workdir: str) -> None:
    existing = os.path.join(workdir, "existing.ndjson")
    with open(existing, "w") as f:
        f.write("someone else's\n")
    link = os.path.join(workdir, "link.ndjson")
    os.symlink(os.path.join(workdir, "target"), link)
    for path in (existing, link):
        r = _run("--socket", os.path.join(workdir, "nothing"), "--connect-wait", "0.1", "--log", path)
        assert r.returncode == 2, r.stderr
        (line,) = r.stderr.strip().splitlines()
        assert path in line and "exists" in line, line
    with open(existing) as f:
        assert f.read() == "someone else's\n"
    assert not os.path.exists(os.path.join(workdir, "target"))
