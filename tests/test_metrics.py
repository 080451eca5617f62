"""Prometheus metrics (issue 13, item 4): a scrape over HTTP, parsed with the Prometheus client's own
parser, has the families and labels README.md documents, with the values QMP
``x-query-kickcall-counters`` reports at the same moment; ``kickcall metrics --qmp`` prints the
same; the endpoint listens on loopback unless another address is written out."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from prometheus_client.parser import text_string_to_metric_families

from kickcall.metrics import (CountersCollector, Labelled, MetricsAddressError, TextfileError, bind_metrics,
                              parse_listen, render, write_textfile)
from kickcall.monitor.client import QMPClient

from helpers import (blk, kickcall_argv, machine_toml, running_machine, spawn, start_vhost_user_blk, stop_process,
                     wait_for, wait_for_listener)

README = Path(__file__).resolve().parent.parent / "README.md"

Key = tuple[str, frozenset[tuple[str, str]]]


def parse(text: str) -> dict[Key, float]:
    """Every sample of a Prometheus text exposition, by (sample name, labels), read with the client's
    own parser; a sample seen twice fails (the exposition would be invalid)."""
    out: dict[Key, float] = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            k = (s.name, frozenset(s.labels.items()))
            assert k not in out, f"duplicate sample {k}"
            out[k] = s.value
    return out


def scrape(url: str) -> str:
    with urllib.request.urlopen(url, timeout=30) as r:
        assert r.status == 200
        return r.read().decode()


def readme_families() -> dict[str, tuple[str, set[str], str]]:
    """README's "Metrics" table: sample name -> (type, labels, programs)."""
    text = README.read_text()
    section = text[text.index("\n## Metrics\n"):]
    section = section[:section.index("\n## ", 5)]
    out = {}
    for m in re.finditer(r"^\| `(kickcall_\w+)` \| (\w+) \| ([^|]+) \|.*\| ([^|]+) \|$", section, re.M):
        out[m.group(1)] = (m.group(2), {x.strip() for x in m.group(3).split(",")}, m.group(4).strip())
    assert len(out) >= 15, "README's Metrics table was not found"
    return out


def check_readme_families(samples: dict[Key, float], program: str, *, extra: frozenset[str] = frozenset(),
                          absent_ok: frozenset[str] = frozenset()) -> None:
    """Every family README lists for *program* is in the scrape (but *absent_ok*), with exactly the
    documented labels; and the scrape has no family README does not list."""
    short = {"kickcall-run": "run"}.get(program, program)
    names = {name for name, _ in samples}
    for name, (_typ, labels, programs) in readme_families().items():
        if programs != "all" and short not in {p.strip() for p in programs.split(",")}:
            continue
        assert name in names or name in absent_ok, f"{name} (README) is not in the scrape of {program}"
        for n, ls in samples:
            if n == name:
                assert {k for k, _ in ls} == labels | extra, (name, ls)
    assert names <= set(readme_families()), names - set(readme_families())


def expected(doc: dict[str, Any], program: str) -> dict[Key, float]:
    """What a scrape must say for a counters document, read from the document key by key (written
    out here, not with the exporter's code)."""
    out: dict[Key, float] = {}

    def put(name: str, value: float, **labels: object) -> None:
        out[(name, frozenset({"program": program, **{k: str(v) for k, v in labels.items()}}.items()))] = float(value)

    for dev, d in doc["devices"].items():
        put("kickcall_device_broken", d["broken"], device=dev)
        for key in ("connections", "reconnects", "disconnects", "protocol-errors"):
            if key in d:
                put(f"kickcall_backend_{key.replace('-', '_')}_total", d[key], device=dev)
        for q in d["queues"]:
            qi = q["queue"]
            for path, n in q.get("kicks-by-path", {}).items():
                put("kickcall_kicks_total", n, device=dev, queue=qi, path=path)
            for path, n in q.get("calls-by-path", {}).items():
                put("kickcall_calls_total", n, device=dev, queue=qi, path=path)
            if "calls-suppressed" in q:
                put("kickcall_calls_suppressed_total", q["calls-suppressed"], device=dev, queue=qi)
            if "inuse" in q:
                put("kickcall_queue_inflight", q["inuse"], device=dev, queue=qi)
            if q.get("masked") is not None:
                put("kickcall_msix_vector_masked", q["masked"], device=dev, queue=qi, vector=q["vector"])
                put("kickcall_msix_vector_pending", q["pending"], device=dev, queue=qi, vector=q["vector"])
    for event, n in doc.get("hv", {}).items():
        put("kickcall_hypervisor_events_total", n, event=event)
    for kind, n in doc.get("exits", {}).items():
        put("kickcall_exits_total", n, kind=kind)
    return out


def assert_agrees(samples: dict[Key, float], doc: dict[str, Any], program: str) -> None:
    """The scrape has every number of *doc*, equal, and no number of those families *doc* lacks."""
    want = expected(doc, program)
    got = {k: v for k, v in samples.items() if k[0] in {n for n, _ in want}}
    assert got == want


def frozen(doc: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in doc.items() if k != "time"}


# -- 1. the collector on hand-made documents ---------------------------------------------------------
DOC = {
    "schema": 1, "program": "kickcall-run", "time": 1.0, "running": True,
    "devices": {
        "blk0": {"id": "blk0", "type": "virtio-blk", "handled-by": "vmm", "irq-mode": "msix", "broken": False,
                 "queues": [{"queue": 0, "vector": 1, "masked": True, "pending": True, "irq-mode": "msix",
                             "kicks": 12, "kicks-by-path": {"ioeventfd": 10, "mmio": 2},
                             "calls": 7, "calls-by-path": {"irqfd": 5, "pba": 2},
                             "calls-suppressed": 3, "inuse": 4, "handled-by": "vmm",
                             "ring-indices": {"avail-idx": 40, "used-idx": 36, "last-avail-idx": 40}}]},
        "blk1": {"id": "blk1", "type": "virtio-blk", "handled-by": "vmm", "irq-mode": "intx", "broken": True,
                 "queues": [{"queue": 0, "vector": 65535, "masked": None, "pending": None, "irq-mode": "intx",
                             "kicks-by-path": {"mmio": 1}, "calls-by-path": {"intx": 1},
                             "calls-suppressed": 0, "inuse": 0, "handled-by": "vmm"}]},
        "vblk": {"id": "vblk", "type": "virtio-blk", "handled-by": "vhost-user", "connected": True,
                 "connections": 3, "reconnects": 2, "disconnects": 2, "protocol-errors": 1, "broken": False,
                 "queues": [{"queue": 0, "vector": None, "masked": None, "pending": None, "irq-mode": "call-fd",
                             "kicks-by-path": {"kick-fd": 9, "self-kick": 1}, "calls-by-path": {"call-fd": 8},
                             "calls-without-fd": 1, "calls-suppressed": 0, "inuse": 2,
                             "ring-state": "started", "handled-by": "vhost-user"}]},
    },
    "hv": {"ioeventfd-writes": 10, "mmio-exits": 3}, "exits": {"mmio-write": 3},
}


def test_a_document_renders_and_parses_back_with_its_values():
    samples = parse(render([DOC]).decode())
    assert_agrees(samples, DOC, "kickcall-run")
    lab = {"program": "kickcall-run", "device": "vblk", "queue": "0"}
    assert samples[("kickcall_calls_without_fd_total", frozenset(lab.items()))] == 1
    assert samples[("kickcall_queue_info", frozenset(dict(lab, irq_mode="call-fd", handled_by="vhost-user",
                                                          ring_state="started").items()))] == 1
    assert samples[("kickcall_up", frozenset({"program": "kickcall-run"}.items()))] == 1
    assert samples[("kickcall_counters_schema", frozenset({"program": "kickcall-run"}.items()))] == 1
    # INTx: no MSI-X vector applies, so no mask or pending sample for blk1
    assert not [k for k in samples if k[0].startswith("kickcall_msix") and ("device", "blk1") in k[1]]
    # every family README lists with "all"/"run" is there, with its labels
    check_readme_families(samples, "kickcall-run")


def test_labelled_documents_stay_apart():
    """Two back-ends on one host have the same program and device id: ``target`` keeps them apart."""
    be = {"schema": 1, "program": "vhost-user-blk", "running": True,
          "devices": {"vhost-user-blk": {"connections": 1, "queues": [{"queue": 0, "kicks-by-path": {"kick-fd": 1}}]}}}
    be2 = json.loads(json.dumps(be))
    be2["devices"]["vhost-user-blk"]["queues"][0]["kicks-by-path"]["kick-fd"] = 5
    samples = parse(render([Labelled({"target": "/a"}, be), Labelled({"target": "/b"}, be2)]).decode())
    kicks = {dict(ls)["target"]: v for (n, ls), v in samples.items() if n == "kickcall_kicks_total"}
    assert kicks == {"/a": 1, "/b": 5}


HOSTILE: list[Any] = [
    None, 3, "x", [], {}, {"devices": None}, {"devices": []}, {"devices": {"a": None}},
    {"devices": {"a": {"queues": None}}}, {"devices": {"a": {"queues": [None, 1, "q", {}]}}},
    {"devices": {"a": {"queues": [{"queue": "0"}, {"queue": True}, {"queue": 0, "kicks-by-path": [1]}]}}},
    {"devices": {"a": {"queues": [{"queue": 0, "kicks-by-path": {"x": -1, "y": "7", "z": float("nan"),
                                                                  "w": True, "ok": 2}}]}}},
    {"devices": {"a": {"queues": [{"queue": 0, "vector": "1", "masked": "yes", "inuse": [], "ring-state": 3}]}}},
    {"devices": {"a": {"queues": [{"queue": 0, "kicks-by-path": {"p": 1}}, {"queue": 0, "kicks-by-path": {"p": 2}}]}}},
    {"schema": "one", "program": 7, "running": "yes", "hv": [1], "exits": {"k": None, 3: 4}},
    {"devices": {"a": {"connections": "3", "protocol-errors": -2, "broken": "no"}}},
]


@pytest.mark.parametrize("doc", HOSTILE, ids=range(len(HOSTILE)))
def test_hostile_documents_lose_only_the_bad_entries(doc):
    samples = parse(render([doc]).decode())  # never raises, and the text parses
    for (name, _), v in samples.items():
        if name.endswith("_total"):
            assert v >= 0
    if isinstance(doc, dict) and isinstance(doc.get("devices"), dict) and "a" in doc["devices"]:
        a = doc["devices"]["a"]
        if isinstance(a, dict) and isinstance(a.get("queues"), list) and a["queues"] and \
                isinstance(a["queues"][0], dict) and isinstance(a["queues"][0].get("kicks-by-path"), dict):
            kicks = {dict(ls)["path"]: v for (n, ls), v in samples.items() if n == "kickcall_kicks_total"}
            # the first of two queues numbered alike wins; bad values are skipped, good ones kept
            assert kicks.get("ok", kicks.get("p")) in (2, 1)
            assert "x" not in kicks and "y" not in kicks and "z" not in kicks and "w" not in kicks


JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=5),
                    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
                    max_leaves=20)


@given(st.fixed_dictionaries({"devices": st.dictionaries(st.text(max_size=4), st.fixed_dictionaries(
    {"queues": st.lists(st.dictionaries(st.sampled_from(["queue", "vector", "masked", "pending", "kicks-by-path",
                                                         "calls-by-path", "inuse", "ring-state", "ring-indices"]),
                                        JSON), max_size=3)}, optional={"connections": JSON, "broken": JSON}),
    max_size=3)}, optional={"hv": JSON, "exits": JSON, "schema": JSON, "program": JSON, "running": JSON}))
def test_any_json_document_renders_to_a_valid_exposition(doc):
    parse(render([doc]).decode())


def test_a_source_that_fails_reports_up_0():
    def broken() -> list:
        raise RuntimeError("stopping")

    samples = parse(render([]).decode())
    assert samples == {}
    from prometheus_client import generate_latest
    from prometheus_client.registry import CollectorRegistry

    reg = CollectorRegistry(auto_describe=False)
    reg.register(CountersCollector(broken, program="vhost-user-blk"))
    assert parse(generate_latest(reg).decode()) == {("kickcall_up", frozenset({"program": "vhost-user-blk"}.items())): 0}


# -- 5. where the endpoint listens -------------------------------------------------------------------
@pytest.mark.parametrize("text,want", [("9100", ("127.0.0.1", 9100)), ("0", ("127.0.0.1", 0)),
                                       ("127.0.0.1:9100", ("127.0.0.1", 9100)), ("[::1]:9", ("::1", 9)),
                                       ("localhost:7", ("127.0.0.1", 7)), ("0.0.0.0:9100", ("0.0.0.0", 9100))])
def test_listen_addresses(text, want):
    assert parse_listen(text) == want


@pytest.mark.parametrize("text", ["", "x", "70000", "1.2.3:80", "host.example:80", "::1:80", "127.0.0.1:", "-1"])
def test_bad_listen_addresses_are_refused(text):
    with pytest.raises(MetricsAddressError):
        parse_listen(text)


def test_a_port_alone_binds_loopback_and_only_an_explicit_address_binds_elsewhere(capsys):
    srv = bind_metrics(parse_listen("0"), program="t", source=lambda: [DOC]).start()
    try:
        assert srv.sockname[0] == "127.0.0.1"
        assert capsys.readouterr().err == ""  # loopback: no warning
        assert parse(scrape(srv.url)) == parse(render([DOC]).decode())
        with pytest.raises(urllib.error.HTTPError) as e:
            scrape(srv.url.replace("/metrics", "/other"))
        assert e.value.code == 404
    finally:
        srv.stop()
    assert not [t for t in threading.enumerate() if t.name.startswith("kc-metrics")]
    srv = bind_metrics(parse_listen("0.0.0.0:0"), program="t", source=lambda: [DOC])
    try:
        assert srv.sockname[0] == "0.0.0.0"
        err = capsys.readouterr().err
        assert "warning: --metrics 0.0.0.0:0 is not a loopback address" in err
    finally:
        srv.stop()


def test_a_port_in_use_and_a_bad_address_name_the_option(workdir):
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen()
    try:
        port = s.getsockname()[1]
        with pytest.raises(OSError, match=f"127.0.0.1:{port}"):
            bind_metrics(("127.0.0.1", port), program="t")
        img = os.path.join(workdir, "d.img")
        with open(img, "wb") as f:
            f.truncate(1 << 20)
        r = subprocess.run(kickcall_argv("vhost-user-blk", "--socket-path", os.path.join(workdir, "s"), "--blk-file",
                                         img, "--metrics", f"127.0.0.1:{port}"),
                           capture_output=True, text=True, timeout=60, env=_env())
        assert r.returncode == 2 and f"--metrics 127.0.0.1:{port}" in r.stderr, r.stderr
        assert not os.path.exists(os.path.join(workdir, "s"))  # refused before the back-end listened
    finally:
        s.close()
    r = subprocess.run(kickcall_argv("run", "--metrics", "10.0.0.1.5:80"), capture_output=True, text=True,
                       timeout=60, env=_env())
    assert r.returncode == 2 and "argument --metrics" in r.stderr and "Traceback" not in r.stderr


def _env() -> dict[str, str]:
    from helpers import SRC

    return dict(os.environ, PYTHONPATH=SRC + os.pathsep + os.environ.get("PYTHONPATH", ""))


# -- 2. a machine: the scrape and QMP at one frozen moment -------------------------------------------
def test_machine_scrape_agrees_with_qmp_at_a_frozen_moment(workdir):
    """blk0 with MSI-X, blk1 with INTx: run the workload, stop it, wait until the counters stand
    still, then scrape over HTTP and ask QMP: the same numbers, every family README lists for run."""
    toml = machine_toml(devices=blk("blk0") + blk("blk1", msix=False)) + "\n[workload.blk]\ndepth = 4\n"
    qmp = os.path.join(workdir, "m.qmp")
    with running_machine(toml) as m:
        m.start_monitor(qmp)
        srv = bind_metrics(parse_listen("127.0.0.1:0"), program="kickcall-run", source=lambda: [m.counters()]).start()
        try:
            m.start_workload()
            wait_for(lambda: all(q["calls"] > 0 for d in m.counters()["devices"].values() for q in d["queues"][:1]),
                     60, "calls on both devices")
            m.stop_workload()
            wait_for(lambda: frozen(m.counters()) == frozen(m.counters()), 60, "the counters to stand still")
            samples = parse(scrape(srv.url))
            with QMPClient(qmp).connect() as c:
                doc = c.execute("x-query-kickcall-counters")
            # the kickcall metrics command, at the same moment, says the same (less its target label)
            r = subprocess.run(kickcall_argv("metrics", "--qmp", qmp), capture_output=True, text=True, timeout=60,
                               env=_env())
        finally:
            srv.stop()
    assert r.returncode == 0, r.stderr
    assert_agrees(samples, doc, "kickcall-run")
    check_readme_families(samples, "kickcall-run")
    assert samples[("kickcall_queue_info", frozenset({"program": "kickcall-run", "device": "blk1", "queue": "0",
                                                      "irq_mode": "intx", "handled_by": "vmm",
                                                      "ring_state": ""}.items()))] == 1
    assert not [k for k in samples if k[0].startswith("kickcall_msix") and ("device", "blk1") in k[1]]
    assert sum(v for (n, _), v in samples.items() if n == "kickcall_kicks_total") > 0
    assert sum(v for (n, _), v in samples.items() if n == "kickcall_calls_total") > 0
    cmd = parse(r.stdout)
    assert {(n, frozenset((k, v) for k, v in ls if k != "target")): v for (n, ls), v in cmd.items()} == samples
    assert all(dict(ls)["target"] == qmp for _, ls in cmd)


def test_kickcall_run_metrics_while_it_runs(workdir):
    """``kickcall run --metrics 127.0.0.1:0 --qmp``: a scrape taken between two QMP queries of a
    running machine lies between them, counter by counter; the endpoint goes away with the program."""
    qmp = os.path.join(workdir, "m.qmp")
    err = open(os.path.join(workdir, "err"), "w+")
    p = spawn(kickcall_argv("run", "--plain", "--duration", "300", "--qmp", qmp, "--metrics", "127.0.0.1:0"),
              stdout=subprocess.DEVNULL, stderr=err)
    try:
        url = wait_for(lambda: _url(err, p), 120, "the metrics line")
        assert isinstance(url, str) and url.startswith("http://127.0.0.1:")
        wait_for_listener(qmp, p)
        with QMPClient(qmp).connect() as c:
            wait_for(lambda: sum(q["kicks"] for d in c.execute("x-query-kickcall-counters")["devices"].values()
                                 for q in d["queues"]) > 0, 60, "kicks")
            before = expected(c.execute("x-query-kickcall-counters"), "kickcall-run")
            samples = parse(scrape(url))
            after = expected(c.execute("x-query-kickcall-counters"), "kickcall-run")
        check_readme_families(samples, "kickcall-run")
        for k, v in samples.items():
            if k[0].endswith("_total") and k in after:
                assert before.get(k, 0) <= v <= after[k], k
        assert stop_process(p, 60) == 0
        with pytest.raises(urllib.error.URLError):
            scrape(url)
    finally:
        stop_process(p)
        err.close()


def _url(err, p) -> str | None:
    if p.poll() is not None:
        err.seek(0)
        raise AssertionError(f"exited with {p.returncode}: {err.read()}")
    err.seek(0)
    m = re.search(r"metrics on (http://\S+/metrics)", err.read())
    return m.group(1) if m else None


# -- 3, 4. the vhost-user back-end, and kickcall metrics --------------------------------------------
@pytest.fixture
def backend(workdir):
    img = os.path.join(workdir, "d.img")
    with open(img, "wb") as f:
        f.truncate(4 << 20)
    sock, qmp = os.path.join(workdir, "vblk.sock"), os.path.join(workdir, "be.qmp")
    err = open(os.path.join(workdir, "be.err"), "w+")
    p = start_vhost_user_blk(sock, img, "--qmp", qmp, "--metrics", "127.0.0.1:0", stderr=err)
    try:
        url = wait_for(lambda: _url(err, p), 60, "the metrics line")
        wait_for_listener(qmp, p)
        yield sock, qmp, url
    finally:
        stop_process(p)
        err.close()


def test_backend_scrape_agrees_with_qmp_and_kickcall_metrics(backend, workdir):
    """A front-end did its work and went away: the back-end's counters stand still; its scrape, its
    QMP document and ``kickcall metrics --qmp`` (stdout and ``-o FILE``) agree."""
    sock, qmp, url = backend
    r = subprocess.run(kickcall_argv("vhost-user-test", "--socket", sock, "--duration", "0.5", "--blocks", "16"),
                       capture_output=True, text=True, timeout=120, env=_env())
    assert r.returncode == 0, r.stdout + r.stderr
    with QMPClient(qmp).connect() as c:
        wait_for(lambda: not c.execute("x-query-kickcall-counters")["devices"]["vhost-user-blk"]["connected"], 60,
                 "the front-end to go")
        samples = parse(scrape(url))
        doc = c.execute("x-query-kickcall-counters")
    assert_agrees(samples, doc, "vhost-user-blk")
    check_readme_families(samples, "vhost-user-blk")
    dev = frozenset({"program": "vhost-user-blk", "device": "vhost-user-blk"}.items())
    assert samples[("kickcall_backend_connections_total", dev)] == 1
    assert samples[("kickcall_backend_connected", dev)] == 0
    kicks = {dict(ls)["path"]: v for (n, ls), v in samples.items() if n == "kickcall_kicks_total"}
    assert kicks.get("kick-fd", 0) > 0
    out = subprocess.run(kickcall_argv("metrics", "--qmp", qmp), capture_output=True, text=True, timeout=60,
                         env=_env())
    assert out.returncode == 0, out.stderr
    cmd = parse(out.stdout)
    assert {(n, frozenset((k, v) for k, v in ls if k != "target")): v for (n, ls), v in cmd.items()} == samples
    prom = os.path.join(workdir, "kickcall.prom")
    r = subprocess.run(kickcall_argv("metrics", "--qmp", qmp, "-o", prom), capture_output=True, text=True,
                       timeout=60, env=_env())
    assert r.returncode == 0 and r.stdout == "", r.stderr
    assert parse(Path(prom).read_text()) == cmd
    assert not [n for n in os.listdir(workdir) if n.endswith(".tmp")]


def test_kickcall_metrics_fails_naming_the_socket(workdir):
    nope = os.path.join(workdir, "nope.qmp")
    r = subprocess.run(kickcall_argv("metrics", "--qmp", nope), capture_output=True, text=True, timeout=60,
                       env=_env())
    assert r.returncode == 1 and nope in r.stderr and r.stdout == "" and "Traceback" not in r.stderr
    fake = os.path.join(workdir, "qemu.qmp")
    with _FakeQemu(fake):
        r = subprocess.run(kickcall_argv("metrics", "--qmp", fake), capture_output=True, text=True, timeout=60,
                           env=_env())
    assert r.returncode == 1 and fake in r.stderr and "no x-query-kickcall-counters" in r.stderr, r.stderr


class _FakeQemu:
    """A monitor that greets as QEMU does and has no x-query-kickcall-counters (CommandNotFound)."""

    def __init__(self, path: str) -> None:
        self.s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.s.bind(path)
        self.s.listen()
        self.t = threading.Thread(target=self._serve, daemon=True)

    def _serve(self) -> None:
        c, _ = self.s.accept()
        with c:
            f = c.makefile("rwb")
            f.write(b'{"QMP": {"version": {"qemu": {"micro": 0, "minor": 2, "major": 7}}, "capabilities": []}}\r\n')
            f.flush()
            for line in f:
                req = json.loads(line)
                if req["execute"] == "qmp_capabilities":
                    reply: dict = {"return": {}}
                else:
                    reply = {"error": {"class": "CommandNotFound",
                                       "desc": f"The command {req['execute']} has not been found"}}
                f.write(json.dumps(dict(reply, id=req.get("id"))).encode() + b"\r\n")
                f.flush()

    def __enter__(self) -> "_FakeQemu":
        self.t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.s.close()
        self.t.join(30)


def test_textfile_refuses_a_symlink_and_replaces_atomically(workdir):
    target = os.path.join(workdir, "elsewhere")
    Path(target).write_text("keep")
    link = os.path.join(workdir, "k.prom")
    os.symlink(target, link)
    with pytest.raises(TextfileError, match="symbolic link"):
        write_textfile(link, b"x 1\n")
    assert Path(target).read_text() == "keep" and os.path.islink(link)
    path = os.path.join(workdir, "m.prom")
    write_textfile(path, b"a 1\n")
    write_textfile(path, b"a 2\n")
    assert Path(path).read_text() == "a 2\n" and sorted(os.listdir(workdir)) == ["elsewhere", "k.prom", "m.prom"]
    r = subprocess.run(kickcall_argv("metrics", "--qmp", os.path.join(workdir, "none"), "-o", link),
                       capture_output=True, text=True, timeout=60, env=_env())
    assert r.returncode == 1  # the target is checked first; nothing is written
    assert Path(target).read_text() == "keep"


# -- the vfio-user server ----------------------------------------------------------------------------
def test_vfio_user_server_metrics(workdir):
    """The server's counters document (no client: nothing moves) scraped and queried agree; its
    ready line names the endpoint."""
    sock, qmp = os.path.join(workdir, "nic.sock"), os.path.join(workdir, "nic.qmp")
    p = spawn(kickcall_argv("vfio-user-server", "--socket", sock, "--qmp", qmp, "--metrics", "0", "--queues", "2"),
              stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    try:
        assert p.stdout is not None
        ready = json.loads(p.stdout.readline())
        url = ready["metrics"]
        assert url.startswith("http://127.0.0.1:")
        wait_for_listener(qmp, p)
        samples = parse(scrape(url))
        with QMPClient(qmp).connect() as c:
            doc = c.execute("x-query-kickcall-counters")
            hmp = c.execute("human-monitor-command", {"command-line": "info counters"})
        assert_agrees(samples, doc, "vfio-user-server")
        # no client: MSI-X is off and no interrupt was raised, so no call and no vector state yet
        check_readme_families(samples, "vfio-user-server", absent_ok=frozenset({
            "kickcall_calls_total", "kickcall_msix_vector_masked", "kickcall_msix_vector_pending"}))
        assert "nic0" in hmp
        ring = {(dict(ls)["queue"], dict(ls)["index"]) for (n, ls) in samples if n == "kickcall_queue_ring_index"}
        assert ring == {(q, i) for q in ("0", "1") for i in ("producer", "consumer")}
    finally:
        stop_process(p)
        if p.stdout is not None:
            p.stdout.close()


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
