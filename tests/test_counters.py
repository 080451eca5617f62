"""Issue 13's one source of truth for counters: every kick and call counted where it happens,
whoever handled it, and the same numbers on every surface.

A machine with three virtio-blk devices -- one the VMM serves with MSI-X (``blk0``), one whose
queues kickcall's vhost-user back-end serves in another process (``vblk``), one on INTx
(``blk1``, ``msix = false``) -- runs a workload; once it has stopped the counters are frozen and
``Machine.counters()``, QMP ``x-query-kickcall-counters``, HMP ``info counters``, QMP
``x-query-virtio-queue-status`` and the back-end's own document are compared.
"""

from __future__ import annotations

import os
import re

import pytest

from helpers import blk, machine_toml, running_machine, start_vhost_user_blk, stop_process, wait_for, \
    wait_for_listener
from kickcall.counters import COUNTERS_SCHEMA, format_counters
from kickcall.machine.view import summary_lines
from kickcall.metrics import MetricsServer
from test_live_view import PtyChild
from test_metrics import parse, scrape
from kickcall.monitor.client import QMPClient
from kickcall.virtio.blk import make_image

pytestmark = pytest.mark.slow

VHOST = """
[[device]]
type = "virtio-blk"
id = "vblk"
backend = "vhost-user"
socket = "{sock}"
"""


def _qmp(path: str) -> QMPClient:
    c = QMPClient(path)
    c.connect(wait=30)
    return c


def _queue_lines(text: str) -> dict[tuple[str, int], tuple[int, int]]:
    """(device, queue) -> (kicks, calls) from HMP ``info counters``."""
    out: dict[tuple[str, int], tuple[int, int]] = {}
    dev = None
    for line in text.splitlines():
        m = re.match(r"^(\S+): ", line)
        if m and not line.startswith(" "):
            dev = m.group(1)
        m = re.match(r"^  q(\d+): kicks (\d+) \(.*\) calls (\d+) ", line)
        if m and dev is not None:
            out[(dev, int(m.group(1)))] = (int(m.group(2)), int(m.group(3)))
    return out


def _without_time(doc: dict) -> dict:
    return {k: v for k, v in doc.items() if k != "time"}


@pytest.fixture
def three_devices(workdir):
    img = os.path.join(workdir, "d.img")
    make_image(img, 8 << 20)
    sock = os.path.join(workdir, "vu.sock")
    be_qmp = os.path.join(workdir, "be.qmp")
    be = start_vhost_user_blk(sock, img, "--qmp", be_qmp)
    try:
        wait_for_listener(be_qmp, be)
        toml = machine_toml(vcpus=2, devices=blk("blk0") + blk("blk1", msix=False) + VHOST.format(sock=sock))
        with running_machine(toml) as m:
            mon = os.path.join(workdir, "m.qmp")
            m.start_monitor(mon)
            yield m, mon, be_qmp
    finally:
        stop_process(be)


def _view_rows(screen: list, devices: set[str]) -> dict[tuple[str, int], tuple[int, int]]:
    """(device, queue) -> (kicks, calls) as the live view's screen shows them (its wide layout has
    the lifetime columns ``kicks`` and ``calls``)."""
    texts = [row[0] for row in screen]
    (hdr,) = [t for t in texts if t.split()[:2] == ["device", "queue"]]
    cols = hdr.replace("in flight", "in-flight").split()
    ki, ci = cols.index("kicks"), cols.index("calls")
    out = {}
    for t in texts:
        f = t.split()
        if f and f[0] in devices and len(f) == len(cols):
            out[(f[0], int(f[1]))] = (int(f[ki]), int(f[ci]))
    return out


def _metric_counts(samples: dict, family: str) -> dict[tuple[str, int, str], float]:
    out = {}
    for (name, labels), v in samples.items():
        if name == family:
            d = dict(labels)
            out[(d["device"], int(d["queue"]), d["path"])] = v
    return out


def test_counters_agree_on_every_surface_and_count_every_path(three_devices, tmp_path):
    m, mon, be_qmp = three_devices
    m.start_workload(blk={"depth": 4})

    def busy() -> bool:
        devs = m.counters()["devices"]
        return all(devs[d]["queues"][0]["calls"] > 100 for d in ("blk0", "blk1", "vblk"))

    wait_for(busy, 90, "calls on every device")
    results = m.workload_report(m.stop_workload())
    assert all(r["error-count"] == 0 for r in results.values()), results
    assert set(results) == {"blk0", "blk1", "vblk"}

    doc = m.counters()  # frozen: the workload has stopped and every request completed
    c = _qmp(mon)
    b = _qmp(be_qmp)
    try:
        qmp = c.execute("x-query-kickcall-counters")
        hmp = c.execute("human-monitor-command", {"command-line": "info counters"})
        status = {d: c.execute("x-query-virtio-queue-status", {"path": d, "queue": 0})
                  for d in ("blk0", "blk1", "vblk")}
        be = b.execute("x-query-kickcall-counters")
        be_hmp = b.execute("human-monitor-command", {"command-line": "info counters"})
    finally:
        c.close()
        b.close()

    assert qmp["schema"] == doc["schema"] == COUNTERS_SCHEMA and qmp["program"] == "kickcall-run"
    # QMP is the same document, value for value (only the time stamp moved)
    assert _without_time(qmp) == _without_time(doc)
    # HMP prints the same numbers, per device and queue
    assert hmp.replace("\r\n", "\n") == format_counters(qmp)
    lines = _queue_lines(hmp.replace("\r\n", "\n"))
    for dev, d in doc["devices"].items():
        for q in d["queues"]:
            assert lines[(dev, q["queue"])] == (q["kicks"], q["calls"]), (dev, q)
            # one source: the totals are the sums of the paths
            assert q["kicks"] == sum(q["kicks-by-path"].values()) and q["calls"] == sum(q["calls-by-path"].values())
        # and QEMU's queue status says the same
        assert (status[dev]["kicks"], status[dev]["calls"]) == (d["queues"][0]["kicks"], d["queues"][0]["calls"])

    # the VMM's device: its own kicks and irqfd calls
    q = doc["devices"]["blk0"]["queues"][0]
    assert q["kicks-by-path"].get("ioeventfd", 0) > 0 and q["calls-by-path"].get("irqfd", 0) > 0, q
    assert q["irq-mode"] == "msix" and q["masked"] is False and q["pending"] is False and q["handled-by"] == "vmm"

    # the INTx device: shown as INTx, its calls on the INTx path, no vector state to show
    d1 = doc["devices"]["blk1"]
    q = d1["queues"][0]
    assert d1["irq-mode"] == "intx" and q["irq-mode"] == "intx", d1
    assert q["calls-by-path"].get("intx", 0) > 0 and q["masked"] is None and q["pending"] is None, q

    # the vhost-user device: the VMM never handles a kick or a call, the hypervisor counts them
    dv = doc["devices"]["vblk"]
    q = dv["queues"][0]
    assert dv["handled-by"] == "vhost-user" and q["handled-by"] == "vhost-user"
    assert q["kicks-by-path"].get("vhost-user", 0) > 0 and q["calls-by-path"].get("vhost-irqfd", 0) > 0, q
    # ... and they square with the back-end's own counts: doorbell writes >= kick-fd reads (an
    # eventfd read takes every write since the last one), calls written >= calls injected
    (bdev,) = be["devices"].values()
    bq = bdev["queues"][0]
    assert be["schema"] == COUNTERS_SCHEMA and be["program"] == "vhost-user-blk"
    # (every write into the kick fd: the guest's doorbells, and the VMM's start kick "vhost-start")
    assert 0 < bq["kicks-by-path"]["kick-fd"] <= q["kicks"], (bq, q)
    assert q["kicks-by-path"].get("vhost-start", 0) >= 1, q
    assert 0 < q["calls"] <= bq["calls"], (bq, q)
    assert bdev["connections"] == 1 and bdev["reconnects"] == 0 and bdev["protocol-errors"] == 0
    assert _queue_lines(be_hmp.replace("\r\n", "\n"))[(bdev["id"], 0)] == (bq["kicks"], bq["calls"])

    # the metrics: scraped over HTTP, parsed with the Prometheus client's parser, path by path
    with MetricsServer("127.0.0.1", 0, lambda: [m.counters()], program="kickcall-run") as ms:
        ms.start()
        samples = parse(scrape(ms.url))
    kicks = _metric_counts(samples, "kickcall_kicks_total")
    calls = _metric_counts(samples, "kickcall_calls_total")
    for dev, d in doc["devices"].items():
        for q in d["queues"]:
            for path, n in q["kicks-by-path"].items():
                assert kicks[(dev, q["queue"], path)] == n, (dev, q["queue"], path)
            for path, n in q["calls-by-path"].items():
                assert calls[(dev, q["queue"], path)] == n, (dev, q["queue"], path)
    assert len(kicks) == sum(len(q["kicks-by-path"]) for d in doc["devices"].values() for q in d["queues"])
    assert len(calls) == sum(len(q["calls-by-path"]) for d in doc["devices"].values() for q in d["queues"])

    # the live view: the frozen document on a 140-column pseudo-terminal (its wide layout shows the
    # lifetime kicks and calls), and the run's end-of-run summary
    child = PtyChild(tmp_path, cols=140, docs=[doc])
    try:
        screen = child.event("render")["screen"]
        child.send(b"q")
        assert child.close() == 0
    finally:
        try:
            os.kill(child.pid, 9)
        except ProcessLookupError:
            pass
    shown = _view_rows(screen, set(doc["devices"]))
    want = {(dev, q["queue"]): (q["kicks"], q["calls"]) for dev, d in doc["devices"].items() for q in d["queues"]}
    assert shown == want
    summary = "\n".join(summary_lines(doc, results))
    for (dev, qi), (k, c) in want.items():
        assert re.search(rf"^  {dev}\s+{qi}\s+{k}\s+{c}\s", summary, re.M), (dev, qi, summary)

    # the hypervisor's exit counters count
    assert doc["hv"]["mmio-exits"] > 0 and doc["hv"]["pio-exits"] > 0
    assert doc["hv"]["mmio-exits"] == sum(v for k, v in doc["exits"].items() if k.startswith("mmio"))


def test_vhost_counts_survive_a_vring_restart(three_devices):
    """The hypervisor's count of a deassigned ioeventfd is kept (its deassign returns it): a pause
    and resume, which stops and restarts the back-end's rings, loses none of the counted kicks."""
    m, _mon, _be = three_devices
    m.start_workload(blk={"depth": 2})
    wait_for(lambda: m.counters()["devices"]["vblk"]["queues"][0]["kicks"] > 50, 60, "vhost kicks")
    m.stop_workload()
    before = m.counters()["devices"]["vblk"]["queues"][0]
    m.pause()
    paused = m.counters()["devices"]["vblk"]["queues"][0]
    m.resume()
    after = m.counters()["devices"]["vblk"]["queues"][0]
    assert paused["kicks"] >= before["kicks"] and after["kicks"] >= before["kicks"], (before, paused, after)
    assert after["calls"] >= before["calls"], (before, after)


def test_run_json_counts_every_device_and_path(workdir):
    """``kickcall run --json`` on the same three devices: the document it prints counts the work on
    each, on the path each took (the vhost-user device's through the hypervisor)."""
    import json
    import subprocess

    from helpers import kickcall_argv

    img = os.path.join(workdir, "d.img")
    make_image(img, 8 << 20)
    sock = os.path.join(workdir, "vu.sock")
    be = start_vhost_user_blk(sock, img)
    try:
        cfg = os.path.join(workdir, "m.toml")
        with open(cfg, "w") as f:
            f.write(machine_toml(vcpus=2, devices=blk("blk0") + blk("blk1", msix=False) + VHOST.format(sock=sock))
                    + "\n[workload.blk]\ndepth = 4\n")
        r = subprocess.run(kickcall_argv("run", cfg, "--duration", "2", "--json"), capture_output=True, text=True,
                           timeout=300)
    finally:
        stop_process(be)
    assert r.returncode == 0, r.stderr[-3000:]
    doc = json.loads(r.stdout)
    assert doc["schema"] == COUNTERS_SCHEMA and set(doc["results"]) == {"blk0", "blk1", "vblk"}
    devs = doc["devices"]
    assert devs["blk0"]["queues"][0]["calls-by-path"].get("irqfd", 0) > 0
    assert devs["blk1"]["queues"][0]["calls-by-path"].get("intx", 0) > 0
    vq = devs["vblk"]["queues"][0]
    assert vq["kicks-by-path"].get("vhost-user", 0) > 0 and vq["calls-by-path"].get("vhost-irqfd", 0) > 0, vq
    for d in devs.values():
        for q in d["queues"]:
            assert q["kicks"] == sum(q["kicks-by-path"].values()) > 0
            assert q["calls"] == sum(q["calls-by-path"].values()) > 0
