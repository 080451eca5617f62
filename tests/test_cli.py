"""The ``kickcall`` command, run as a user runs it (a separate process)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow

SRC = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "src")


def kickcall(*args: str, timeout: float = 120, **kw) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=SRC)
    return subprocess.run([sys.executable, "-m", "kickcall", *args], capture_output=True, text=True,
                          timeout=timeout, env=env, stdin=subprocess.DEVNULL, **kw)


def test_run_default_machine_passes_data_checks_and_prints_per_queue_counters():
    r = kickcall("run", "--duration", "3")
    assert r.returncode == 0, r.stdout + r.stderr
    out = r.stdout
    assert "per-queue counters (lifetime):" in out
    rows = {tuple(x.split()[:2]) for x in out.splitlines() if x.startswith(("  blk0 ", "  net0 "))}
    assert {("blk0", "0"), ("blk0", "1"), ("net0", "0"), ("net0", "3")} <= rows, out
    assert "data errors 0" in out and "payload errors 0" in out
    assert "all data checks passed" in out
    assert "t=" in out  # periodic lines when not on a terminal


def test_run_json_output():
    r = kickcall("run", "--duration", "2", "--json", "--pause-at", "0.5", "--pause-for", "0.3")
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["schema"] == 1 and doc["program"] == "kickcall-run"
    assert {x["kind"] for x in doc["results"].values()} == {"blk", "net"}
    assert set(doc["results"]) == {"blk0", "net0"}  # keyed by device id, not "slot 1"
    assert all(x["error-count"] == 0 for x in doc["results"].values())
    assert doc["devices"]["blk0"]["queues"][0]["kicks"] > 0


def _keys(v, path=""):
    if isinstance(v, dict):
        for k, x in v.items():
            yield path + "/" + str(k)
            yield from _keys(x, path + "/" + str(k))
    elif isinstance(v, list):
        for x in v:
            yield from _keys(x, path + "[]")


def test_run_json_is_kebab_case_throughout():
    """One data shape: every key of ``run --json`` is kebab-case, as QMP's are."""
    r = kickcall("run", "--duration", "1", "--json")
    assert r.returncode == 0, r.stderr
    bad = [k for k in _keys(json.loads(r.stdout)) if "_" in k.rsplit("/", 1)[-1]]
    assert not bad, bad[:10]


def test_bad_config_file_gets_a_clear_message(tmp_path):
    p = tmp_path / "m.toml"
    p.write_text('[machine]\nvcpus = 0\n[[device]]\ntype = "virtio-blk"\n')
    r = kickcall("run", str(p), "--duration", "1")
    assert r.returncode == 2
    assert f"config error: {p}: machine.vcpus: must be between 1 and 16, got 0" in r.stderr
    assert "Traceback" not in r.stderr


def test_config_check_and_default(tmp_path):
    r = kickcall("config")
    assert r.returncode == 0 and "[machine]" in r.stdout
    p = tmp_path / "d.toml"
    p.write_text(r.stdout)
    r = kickcall("config", "--check", str(p))
    assert r.returncode == 0 and "ok" in r.stdout


def test_bad_arguments_are_refused():
    r = kickcall("run", "--duration", "-1")
    assert r.returncode == 2 and "must be positive" in r.stderr


def test_sigint_stops_cleanly_with_results():
    env = dict(os.environ, PYTHONPATH=SRC)
    proc = subprocess.Popen([sys.executable, "-m", "kickcall", "run", "--duration", "60"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env, stdin=subprocess.DEVNULL)
    try:
        # wait for the first periodic line: the machine is up and running the workload
        line = proc.stdout.readline()
        assert "machine 'default' up" in line
        line = proc.stdout.readline()
        assert line.startswith("t=")
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err
    assert "all data checks passed" in out


# -- issue 13, a first step: logging, tracing and a run without a workload ---------------------------------------
def test_log_level_anywhere_and_in_any_case(tmp_path):
    for args in (["--log-level", "info", "config"], ["config", "--log-level", "Debug"],
                 ["--log-level", "error", "config", "--log-level", "WARNING"]):
        r = kickcall(*args)
        assert r.returncode == 0 and "[machine]" in r.stdout, (args, r.stderr)
    r = kickcall("config", "--log-level", "loud")
    assert r.returncode == 2
    assert "argument --log-level: 'loud' is not a log level (debug, info, warning, error)" in r.stderr


def test_trace_help_lists_the_events_and_builds_nothing():
    r = kickcall("run", "--trace", "help")
    assert r.returncode == 0, r.stderr
    names = [line.split(":")[0] for line in r.stdout.splitlines()]
    assert "msix_notify" in names and "pcie_aer_inject" in names and names == sorted(names)
    assert "machine" not in r.stdout + r.stderr  # no machine was built


def test_a_run_without_a_workload_says_so_and_a_trace_pattern_that_matches_nothing_warns(tmp_path):
    cfg = tmp_path / "m.toml"
    cfg.write_text('[machine]\nvcpus = 1\nguest = "thread"\n[[device]]\ntype = "virtio-blk"\nid = "blk0"\n'
                   'size = "1M"\n')
    r = kickcall("run", str(cfg), "--duration", "0.5", "--trace", "nosuch*", "--trace", "msix_notify")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "no workload ran (the config has no [workload] section): nothing to check" in r.stdout
    assert "all data checks passed" not in r.stdout
    assert "--trace nosuch*: matches no trace event (kickcall run --trace help lists them)" in r.stderr
    assert "--trace msix_notify: matches" not in r.stderr


def test_run_json_exit_counters_count(tmp_path):
    """``hv.mmio_exits`` / ``hv.pio_exits`` are the vCPUs' own exit counts, and agree with the
    VMM's count of the exits it served (they were never incremented)."""
    cfg = tmp_path / "m.toml"
    cfg.write_text('[machine]\nvcpus = 1\nguest = "thread"\n[[device]]\ntype = "virtio-blk"\nid = "blk0"\n'
                   'size = "1M"\n')
    r = kickcall("run", str(cfg), "--duration", "0.3", "--json")
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    ex = doc["exits"]
    mmio = ex.get("mmio-read", 0) + ex.get("mmio-write", 0)
    pio = ex.get("pio-read", 0) + ex.get("pio-write", 0)
    assert mmio > 0 and pio > 0, ex  # the boot enumerates PCI (CF8/CFC) and sets up the device (MMIO)
    assert abs(doc["hv"]["mmio-exits"] - mmio) <= 4 and abs(doc["hv"]["pio-exits"] - pio) <= 4, (doc["hv"], ex)


def test_a_missing_vhost_user_socket_is_said_and_fails_after_the_connect_timeout(tmp_path):
    sock = tmp_path / "nobody.sock"
    cfg = tmp_path / "m.toml"
    cfg.write_text('[machine]\nvcpus = 1\nguest = "thread"\n[[device]]\ntype = "virtio-blk"\nid = "blk0"\n'
                   f'backend = "vhost-user"\nsocket = "{sock}"\n')
    r = kickcall("run", str(cfg), "--duration", "1", "--connect-timeout", "0.5")
    assert r.returncode == 2, r.stdout + r.stderr
    assert f"waiting for the back-end at {sock} (up to 0.5 s)" in r.stderr
    assert f"cannot connect to the back-end at {sock} after waiting 0.5 s: No such file or directory" in r.stderr
    assert r.stderr.count("waiting for the back-end") == 1
    assert "Traceback" not in r.stderr


def test_an_intx_device_is_shown_as_intx(tmp_path):
    """With ``msix = false`` the queues' calls go on INTx: the view says so (it said no-vector)."""
    from kickcall.machine.view import rates

    cfg = tmp_path / "m.toml"
    cfg.write_text('[machine]\nvcpus = 1\nguest = "thread"\n[[device]]\ntype = "virtio-blk"\nid = "blk0"\n'
                   'size = "1M"\nmsix = false\n[workload.blk]\ndepth = 2\n')
    r = kickcall("run", str(cfg), "--duration", "0.5", "--json")
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    q0 = doc["devices"]["blk0"]["queues"][0]
    assert q0["irq-mode"] == "intx" and q0["calls"] > 0, q0
    row = rates(None, {"time": 0.0, "devices": doc["devices"]})["blk0"][0]
    assert row["mask"] == "intx"
