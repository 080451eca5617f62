"""``kickcall diagnose`` on a vhost-user back-end's monitor, in the states an on-call engineer meets:
no front-end yet, a slow back-end (2.5 s per request: "slow", never "not processing"), and one
that never completes a request ("not processing" once the request is older than --window, within
--window + --timeout).  The back-end is ``kickcall vhost-user-blk`` in its own process, the
front-end ``kickcall vhost-user-test`` (data-verified) in another.  A stopped ring and a SIGSTOPped
back-end are in test_diagnose_field.py and test_diagnose_targets.py."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time

import pytest

from helpers import kickcall_argv, spawn, start_vhost_user_blk, stop_process, wait_for
from kickcall.monitor.client import QMPClient
from kickcall.virtio.blk import make_image
from qmp_proxy import RecordingProxy, check

pytestmark = pytest.mark.slow

SRC = os.path.join(os.path.dirname(__file__), "..", "src")


def diagnose(*args: str) -> tuple[int, dict, str, float]:
    t0 = time.monotonic()
    p = subprocess.run(kickcall_argv("diagnose", "--json", "--interval", "0.25", *args), capture_output=True,
                       text=True, timeout=180, env=dict(os.environ, PYTHONPATH=SRC))
    assert p.returncode in (0, 1, 2), p.stderr
    return p.returncode, json.loads(p.stdout), p.stderr, time.monotonic() - t0


def _queue(c: QMPClient) -> dict:
    (dev,) = c.execute("x-query-virtio")
    return c.execute("x-query-virtio-queue-status", {"path": dev["path"], "queue": 0})


def test_no_front_end(workdir):
    img, sock, qmp = (os.path.join(workdir, n) for n in ("d.img", "vb.sock", "be.qmp"))
    make_image(img, 1 << 20)
    be = start_vhost_user_blk(sock, img, "--qmp", qmp)
    try:
        wait_for(lambda: os.path.exists(qmp), 30, "the monitor")
        with RecordingProxy(os.path.join(workdir, "p.qmp"), qmp) as p:
            rc, rep, err, _ = diagnose("--qmp", p.path, "--fix")
        assert p.sent and check(p.sent, "kickcall-backend", fix=True) == []
        (q,) = rep["queues"]
        assert rc == 0 and q["verdict"] == "no front-end" and q["severity"] == "info", (err, q)
        assert rep["targets"][0]["kind"] == "kickcall-backend"
    finally:
        stop_process(be)


def test_slow_backend_is_slow_never_not_processing(workdir):
    img, sock, qmp = (os.path.join(workdir, n) for n in ("d.img", "vb.sock", "be.qmp"))
    make_image(img, 1 << 20)
    be = start_vhost_user_blk(sock, img, "--qmp", qmp, "--io-delay-ms", "2500", "--io-delay-fixed")
    fe = spawn(kickcall_argv("vhost-user-test", "--socket", sock, "--depth", "1", "--blocks", "2",
                             "--duration", "600"), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        with QMPClient(qmp).connect(wait=30) as c:
            wait_for(lambda: (_queue(c).get("completion-ms") or {}).get("count", 0) >= 2, 60, "two slow completions")
        verdicts = []
        for _ in range(4):
            rc, rep, err, _t = diagnose("--qmp", qmp)
            (q,) = rep["queues"]
            verdicts.append(q["verdict"])
            assert q["verdict"] != "not processing", json.dumps(q, indent=1)
            if q["verdict"] == "slow":
                assert rc == 0 and q["severity"] == "info"
                assert 0 <= q["facts"]["oldest-request-s"] <= 5, q
                assert any("completions took" in e for e in q["evidence"]), q["evidence"]
        assert verdicts.count("slow") >= 3, verdicts  # a request is in flight nearly all the time
    finally:
        stop_process(fe)
        stop_process(be)


def test_backend_that_never_completes_is_not_processing(workdir):
    img, sock, qmp = (os.path.join(workdir, n) for n in ("d.img", "vb.sock", "be.qmp"))
    make_image(img, 1 << 20)
    be = start_vhost_user_blk(sock, img, "--qmp", qmp)
    fe = spawn(kickcall_argv("vhost-user-test", "--socket", sock, "--depth", "2", "--blocks", "8",
                             "--duration", "25", "--json"), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        with QMPClient(qmp).connect(wait=30) as c:
            (dev,) = c.execute("x-query-virtio")
            wait_for(lambda: (_queue(c).get("completion-ms") or {}).get("count", 0) > 50, 60, "I/O")
            c.execute("x-debug-fault", {"dev": dev["path"], "queue": 0, "path": "complete", "action": "drop-all"})
            wait_for(lambda: _queue(c).get("oldest-inflight-ms") is not None, 30, "a held request")
            with RecordingProxy(os.path.join(workdir, "p.qmp"), qmp) as p:
                rc, rep, err, took = diagnose("--qmp", p.path, "--window", "2", "--timeout", "8", "--fix")
            assert check(p.sent, "kickcall-backend", fix=True) == []
            (q,) = rep["queues"]
            assert rc == 1 and q["verdict"] == "not processing", json.dumps(q, indent=1)
            assert q["facts"]["oldest-request-s"] >= 2 and "target's own clock" in " ".join(q["evidence"])
            assert not q["fix-result"]["injected"]
            assert took < 2 + 8 + 30  # window + timeout (+ start-up), never an open-ended wait
            c.execute("x-debug-fault", {"dev": dev["path"], "queue": 0, "path": "complete", "action": "clear"})
        out, err = fe.communicate(timeout=120)
        assert fe.returncode == 0, err  # the held requests completed: nothing lost, data verified
    finally:
        stop_process(fe)
        stop_process(be)


def test_front_end_that_stopped_reading_is_named(workdir):
    """The back-end signalled; its front-end (SIGSTOPped) never reads the call fd.  Not a lost call
    (another call would not help): the front-end is named with its pid and state."""
    img, sock, qmp = (os.path.join(workdir, n) for n in ("d.img", "vb.sock", "be.qmp"))
    make_image(img, 1 << 20)
    # every I/O takes 300 ms: the front-end is stopped while a request is in flight, so the back-end
    # completes it and signals after the front-end stopped (under load, stopping it between a
    # completion and its next request would leave nothing to signal: an idle queue)
    be = start_vhost_user_blk(sock, img, "--qmp", qmp, "--io-delay-ms", "300", "--io-delay-fixed")
    fe = spawn(kickcall_argv("vhost-user-test", "--socket", sock, "--depth", "1", "--blocks", "2",
                             "--duration", "600"), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        with QMPClient(qmp).connect(wait=30) as c:
            wait_for(lambda: (_queue(c).get("completion-ms") or {}).get("count", 0) >= 3, 60, "I/O")
            (dev,) = c.execute("x-query-virtio")

            def call_pending() -> int:
                ns = c.execute("x-query-device-notifiers", {"dev": dev["path"]})
                return sum(n.get("pending", 0) for n in ns if n.get("role") == "guest" and n.get("queue") == 0)

            for _attempt in range(10):  # stop it with a request in flight (rarely missed: then again)
                wait_for(lambda: _queue(c).get("oldest-inflight-ms") is not None, 30, "a request in flight")
                os.kill(fe.pid, signal.SIGSTOP)
                wait_for(lambda: open(f"/proc/{fe.pid}/stat").read().rsplit(")", 1)[1].split()[0] == "T", 10,
                         "SIGSTOP")
                wait_for(lambda: _queue(c).get("inuse") == 0, 30, "the request to complete")
                if call_pending():
                    break
                os.kill(fe.pid, signal.SIGCONT)
            assert call_pending(), "never stopped the front-end with a request in flight"
        rc, rep, err, _ = diagnose("--qmp", qmp, "--fix")
        (q,) = rep["queues"]
        assert rc == 1 and q["verdict"] == "call not read", json.dumps(q, indent=1)
        assert any(f"pid {fe.pid}, state T" in e for e in q["evidence"]), q["evidence"]
        assert not q["fix-result"]["injected"]
    finally:
        os.kill(fe.pid, signal.SIGCONT)
        stop_process(fe)
        stop_process(be)
