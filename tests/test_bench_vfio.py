"""``kickcall bench vfio --quick`` runs end to end (three processes: the vfio-user server, the VMM,
the guest) and its figures agree with each other: every record the device wrote was consumed, the
guest never counts more interrupts than the device sent, the dynamic path grows with one SET_IRQS
per vector and never disables host MSI-X, the NORESIZE path stops where one message can no longer
carry the fds.  No figure is compared with a threshold of time (performance lives in
BENCHMARKS.md)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess

import pytest

from helpers import SRC, kickcall_argv
from kickcall.bench_vfio import VFIO_BLOCK_END, VFIO_BLOCK_START, render_vfio

pytestmark = pytest.mark.slow

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
START, END = VFIO_BLOCK_START, VFIO_BLOCK_END


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, str, str]:
    """One quick run with --json and --write on a copy of BENCHMARKS.md: (result, before, after)."""
    md = str(tmp_path_factory.mktemp("kcbv") / "BENCHMARKS.md")
    shutil.copy(os.path.join(ROOT, "BENCHMARKS.md"), md)
    before = open(md).read()
    env = dict(os.environ, PYTHONPATH=SRC + os.pathsep + os.environ.get("PYTHONPATH", ""))
    p = subprocess.run(kickcall_argv("bench", "vfio", "--quick", "--json", "--write", md), capture_output=True,
                       text=True, timeout=600, env=env, stdin=subprocess.DEVNULL)
    assert p.returncode == 0, p.stderr[-3000:]
    return json.loads(p.stdout), before, open(md).read()


def test_throughput_counts_agree(run: tuple[dict, str, str]) -> None:
    t = run[0]["throughput"]
    want = t["queues"] * t["records-per-queue"] * t["passes"]
    assert t["records"] == t["device-written"] == want  # every record written was consumed, none twice
    assert t["gaps"] == 0 and t["intx-unexpected"] == 0
    # one MSI-X message per batch of at most 64; the guest's eventfd coalesces: never more interrupts than sent
    assert t["device-msix-sent"] == t["device-batches"] >= want / 64
    assert 0 < t["interrupts"] <= t["device-msix-sent"]
    assert t["interrupts"] == sum(t["guest-interrupts-by-entry"].values())
    assert all(n > 0 for n in t["guest-interrupts-by-entry"].values())  # every queue's vector was taken
    assert t["records-per-s"] > 0 and t["interrupts-per-s"] > 0
    assert t["records-per-s"] / t["interrupts-per-s"] == pytest.approx(t["records-per-interrupt"])


def test_latency_takes_every_path_it_names(run: tuple[dict, str, str]) -> None:
    lat = run[0]["latency"]
    for path in ("floor", "irqfd", "irqfd-vmm-idle", "server-raise"):
        s = lat[path]
        assert s["n"] == lat["iterations"], (path, s)
        assert 0 < s["p50-us"] <= s["p99-us"], (path, s)
    assert len(lat["per-round"]) == lat["rounds"]
    assert lat["ratios"]["server-share-p50-us"] == pytest.approx(
        lat["server-raise"]["p50-us"] - lat["irqfd-vmm-idle"]["p50-us"])


def test_dynamic_growth_one_set_irqs_per_vector_nothing_lost(run: tuple[dict, str, str]) -> None:
    g = run[0]["growth"]["dynamic"]
    added = g["target"] - g["start-vectors"]
    assert g["path"] == "dynamic" and g["stopped"] is None and g["vectors-reached"] == g["target"]
    vm = g["set-irqs-vmm"]
    assert vm["vector-add"] == added and g["set-irqs-messages"] == added
    assert vm["index-disable"] == vm["index-enable-all"] == 0
    assert g["set-irqs-host"].get("MSIX/TRIGGER/EVENTFD") == added and g["set-irqs-host-errors"] == {}
    assert g["host-msix-disables"] == 0 and g["host-vectors"] == g["target"]
    assert g["records-written"] > 0 and g["records-lost"] == g["unconsumed-in-rings"] == 0
    assert g["records-consumed"] == g["records-written"]
    assert g["interrupts-to-intx"] == g["interrupts-lost-on-disable"] == g["guest-intx-unexpected"] == 0
    assert g["interrupts-raised"] == g["interrupts-sent"] > 0
    assert g["fault-fire-in-msix-disable-window"]["on"] is False
    ends = [s["to"] for s in g["steps"]]
    assert [s["from"] for s in g["steps"]] == [g["start-vectors"], *ends[:-1]] and ends[-1] == g["target"]


def test_noresize_growth_stops_at_max_msg_fds(run: tuple[dict, str, str]) -> None:
    g = run[0]["growth"]["noresize"]
    limit = min(g["max-msg-fds"], 253)
    assert g["path"] == "noresize" and g["noresize-reason"] == "host-flag"
    assert g["vectors-reached"] == limit < g["target"]
    assert g["stopped"]["vector"] == limit and g["stopped"]["error"] == "E2BIG"
    assert "max_msg_fds" in g["stopped"]["reason"]
    grown = limit - g["start-vectors"]
    vm = g["set-irqs-vmm"]
    # the old way: each new vector disables the index and re-enables it with every fd in one message
    assert vm["index-disable"] == vm["index-enable-all"] == g["host-msix-disables"] == grown
    assert vm["vector-add"] == 0 and g["set-irqs-messages"] == 2 * grown
    assert g["records-consumed"] + g["records-lost"] == g["records-written"] > 0
    assert g["unconsumed-in-rings"] <= g["records-lost"]
    assert g["fault-fire-in-msix-disable-window"]["on"] is False
    # every interrupt the device raised is accounted for: sent, latched in the PBA (sent on unmask,
    # counted in both), or raised while host MSI-X was off (to INTx, where nobody listens)
    assert g["interrupts-raised"] == (g["interrupts-sent"] - g["interrupts-delivered-on-unmask"]
                                      + g["interrupts-pended"] + g["interrupts-to-intx"])
    assert g["host-intx-unhandled"] <= g["interrupts-to-intx"]


def test_write_replaces_only_its_own_section(run: tuple[dict, str, str]) -> None:
    _r, before, after = run
    assert after.count(START) == 1 and after.count(END) == 1
    block = after[after.index(START):after.index(END)]
    assert "kickcall bench vfio" in block and "Machine:" in block
    if START in before:
        outside = lambda t: t[:t.index(START)] + t[t.index(END):]  # noqa: E731
        assert outside(after) == outside(before)
    else:
        assert after.startswith(before.rstrip("\n"))


def _in_memory(v):
    """The --json document (kebab-case) back in the shape the bench keeps in memory (snake_case keys)."""
    if isinstance(v, dict):
        return {(k.replace("-", "_") if isinstance(k, str) else k): _in_memory(x) for k, x in v.items()}
    if isinstance(v, list):
        return [_in_memory(x) for x in v]
    return v


def test_stdout_table_is_plain_text(run: tuple[dict, str, str]) -> None:
    text = render_vfio(_in_memory(run[0]))
    for marker in ("|---", "<!--", "**", "`", "## "):
        assert marker not in text, marker
    for label in ("records/s", "interrupts/s", "floor", "irqfd", "host function", "dynamic", "NORESIZE"):
        assert label in text, label
