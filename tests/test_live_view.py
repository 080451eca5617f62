"""``kickcall run``'s views: the live view in a real pseudo-terminal, the plain lines, the summary.

The live view runs in a child process on a pty (TERM set, the window size set with TIOCSWINSZ);
the child renders a scripted sequence of counters documents and, on request, dumps what curses holds
on the screen (``LiveView.screen()``: each row's text from ``instr`` and each cell's attributes from
``inch``) to a side file, which the test reads.  The pty's output is drained all along (curses would
block on a full pty otherwise).
"""

from __future__ import annotations

import curses
import fcntl
import json
import os
import pty
import signal
import struct
import sys
import termios
import time
from pathlib import Path

import pytest

from kickcall.machine.view import PlainView, rates, summary_lines

SRC = str(Path(__file__).resolve().parent.parent / "src")

# ---------------------------------------------------------------------------------------------
# counters documents (counters-doc.md, schema 1), made by hand


def queue(n: int, *, kicks: int = 0, calls: int = 0, inuse: int = 0, vector: int | None = None,
          masked: bool | None = False, pending: bool | None = False, mode: str = "msix",
          kick_path: str = "ioeventfd", call_path: str = "irqfd") -> dict:
    vec = (n + 1 if mode == "msix" else 0xFFFF) if vector is None else vector
    if mode == "intx":
        masked = pending = None
        call_path = "intx"
    return {"queue": n, "vector": vec, "masked": masked, "pending": pending, "irq-mode": mode,
            "kicks": kicks, "kicks-by-path": {kick_path: kicks} if kicks else {},
            "calls": calls, "calls-by-path": {call_path: calls} if calls else {},
            "calls-suppressed": 0, "inuse": inuse, "irqfd": call_path == "irqfd", "polled": False,
            "handled-by": "vmm"}


def device(dev_id: str, queues: list[dict], *, mode: str = "msix", broken: bool = False) -> dict:
    return {"id": dev_id, "path": f"/machine/peripheral/{dev_id}", "type": "virtio-blk", "handled-by": "vmm",
            "slot": 1, "status": 15, "broken": broken, "ioeventfd": True, "irq-mode": mode, "queues": queues}


def doc(t: float, devices: list[dict], *, running: bool = True) -> dict:
    return {"schema": 1, "program": "kickcall-run", "time": t, "running": running,
            "devices": {d["id"]: d for d in devices},
            "hv": {"ioeventfd-writes": int(100 * t), "irqfd-injections": int(90 * t), "msi-injections": 7,
                   "mmio-exits": 3, "pio-exits": 2},
            "exits": {"mmio-write": 132, "pio-read": 8}}


def scripted_docs() -> list[dict]:
    """Two documents a second apart: blk0 q0 healthy, blk0 q1 masked with its pending bit set,
    net0 q0 stalled (3 in flight, no call), net0 q1 healthy, intx0 on INTx, bad0 broken."""
    def at(t: float, k: int) -> dict:
        return doc(t, [
            device("blk0", [queue(0, kicks=1000 * k, calls=990 * k, inuse=2),
                            queue(1, kicks=10 * k, calls=5, masked=True, pending=True)]),
            device("net0", [queue(0, kicks=50 * k, calls=40, inuse=3),
                            queue(1, kicks=20 * k, calls=20 * k, inuse=1)]),
            device("intx0", [queue(0, kicks=30 * k, calls=30 * k, inuse=1, mode="intx")], mode="intx"),
            device("bad0", [queue(0, kicks=7, calls=7)], broken=True),
        ])
    return [at(1.0, 1), at(2.0, 2)]


# ---------------------------------------------------------------------------------------------
# the child on a pty

CHILD = r"""
import json, os, sys, termios
from kickcall.machine.view import LiveView
cfg = json.loads(os.environ["KC_VIEW_SCRIPT"])
side = open(cfg["side"], "a")
def dump(event, view):
    side.write(json.dumps({"event": event, "size": view.size(), "screen": view.screen()}) + "\n")
    side.flush()
before = termios.tcgetattr(0)
try:
    with LiveView(**cfg["options"]) as view:
        for d in cfg["docs"]:
            view.update(d)
        dump("render", view)
        resizes = 0
        while True:
            k = view.poll_key(0.05)
            if view.resizes != resizes:
                resizes = view.resizes
                dump("resized", view)
            if k == "d":
                dump("dump", view)
            elif k == "q":
                break
            elif k == "x":
                raise RuntimeError("the run loop failed")
finally:
    side.write(json.dumps({"event": "closed", "restored": termios.tcgetattr(0) == before}) + "\n")
    side.flush()
"""


def set_size(fd: int, rows: int, cols: int) -> None:
    fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))


class PtyChild:
    """A child python on a pty running CHILD; its screen dumps are read from a side file."""

    def __init__(self, tmp: Path, *, term: str = "xterm-256color", options: dict | None = None,
                 rows: int = 30, cols: int = 80, docs: list[dict] | None = None) -> None:
        self.side = tmp / "side.ndjson"
        self.side.write_text("")
        self.seen = 0
        self.output = b""
        env = dict(os.environ, TERM=term, PYTHONPATH=SRC,
                   KC_VIEW_SCRIPT=json.dumps({"side": str(self.side),
                                              "docs": scripted_docs() if docs is None else docs,
                                              "options": options or {}}))
        self.pid, self.fd = pty.fork()
        if self.pid == 0:  # the child: a session leader whose controlling terminal is the pty
            try:
                set_size(0, rows, cols)
                os.execve(sys.executable, [sys.executable, "-c", CHILD], env)
            finally:
                os._exit(127)

    def drain(self) -> None:
        import select

        while select.select([self.fd], [], [], 0)[0]:
            try:
                b = os.read(self.fd, 65536)
            except OSError:  # EIO: the child closed the pty
                return
            if not b:
                return
            self.output += b

    def event(self, name: str, timeout: float = 60.0) -> dict:
        """The next *name* event the child wrote (waits on it; the pty is drained meanwhile)."""
        deadline = time.monotonic() + timeout
        while True:
            self.drain()
            lines = self.side.read_text().splitlines()
            for i in range(self.seen, len(lines)):
                ev = json.loads(lines[i])
                if ev["event"] == name:
                    self.seen = i + 1
                    return ev
            if time.monotonic() > deadline:
                raise AssertionError(f"no {name!r} from the child in {timeout}s; it wrote: "
                                     f"{self.output[-2000:]!r}")
            time.sleep(0.01)

    def send(self, data: bytes) -> None:
        os.write(self.fd, data)

    def resize(self, rows: int, cols: int) -> None:
        set_size(self.fd, rows, cols)  # the kernel signals the foreground group; and once more:
        os.kill(self.pid, signal.SIGWINCH)

    def close(self) -> int:
        deadline = time.monotonic() + 60
        while True:
            self.drain()
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                os.close(self.fd)
                return os.waitstatus_to_exitcode(status)
            if time.monotonic() > deadline:
                os.kill(self.pid, signal.SIGKILL)
                os.waitpid(self.pid, 0)
                os.close(self.fd)
                raise AssertionError("the child did not exit")
            time.sleep(0.01)


@pytest.fixture
def child_on_pty(tmp_path):
    made: list[PtyChild] = []

    def start(**kw) -> PtyChild:
        c = PtyChild(tmp_path, **kw)
        made.append(c)
        return c
    yield start
    for c in made:
        try:
            os.kill(c.pid, signal.SIGKILL)
            os.waitpid(c.pid, 0)
            os.close(c.fd)
        except (ProcessLookupError, ChildProcessError, OSError):
            pass


def rows_of(ev: dict) -> list[tuple[str, list[int]]]:
    return [(text, attrs) for text, attrs in ev["screen"]]


def queue_row(ev: dict, dev: str, q: int) -> tuple[str, list[int]]:
    for text, attrs in rows_of(ev):
        f = text.split()
        if len(f) > 1 and f[0] == dev and f[1] == str(q):
            return text, attrs
    raise AssertionError(f"no row for {dev} q{q} on the screen:\n" + "\n".join(t for t, _ in rows_of(ev)))


def header(ev: dict) -> list[str]:
    return next(t.split() for t, _ in rows_of(ev) if t.split()[:2] == ["device", "queue"])


HIGHLIGHT = curses.A_REVERSE | curses.A_BOLD | curses.A_UNDERLINE | curses.A_COLOR


# ---------------------------------------------------------------------------------------------
# the live view


@pytest.mark.parametrize("fit", [True, False])
def test_the_live_view_fits_80_columns_with_every_essential_column(child_on_pty, fit):
    c = child_on_pty(options={"fit": fit})
    ev = c.event("render")
    c.send(b"q")
    assert c.event("closed")["restored"]
    assert c.close() == 0
    assert ev["size"] == [30, 80]
    screen = rows_of(ev)
    assert len(screen) == 30 and all(len(t) <= 80 for t, _ in screen)  # curses' own rows
    # every queue row is whole: device, queue, kicks/s, calls/s, in flight, vector, irq, pend, path
    expect = {("blk0", 0): ["blk0", "0", "1000", "990", "2", "1", "unmasked", "no", "ioeventfd/irqfd"],
              ("blk0", 1): ["blk0", "1", "10", "0", "0", "2", "masked", "yes", "ioeventfd/irqfd"],
              ("net0", 0): ["net0", "0", "50", "0", "3", "1", "unmasked", "no", "ioeventfd/irqfd"],
              ("intx0", 0): ["intx0", "0", "30", "30", "1", "-", "intx", "-", "ioeventfd/intx"]}
    try:
        got = {k: queue_row(ev, *k)[0].split() for k in expect}
    except AssertionError:
        if fit:
            raise
        return  # unfitted, the rows wrapped into each other
    if fit:
        assert got == expect
        assert header(ev)[:9] == ["device", "queue", "kicks/s", "calls/s", "in", "flight", "vec", "irq", "pend"]
        hv = screen[-1][0].rstrip()
        assert hv == "hv: ioeventfd-writes=200  irqfd-injections=180  msi-injections=7  exits=140", hv
        assert any(t.startswith("! net0 q0: stalled, 3 in flight") for t, _ in screen)
        assert any(t.startswith("! bad0: device broken") for t, _ in screen)
    else:
        assert got != expect


@pytest.mark.parametrize("term,colour", [("xterm-256color", True), ("vt100", False)])
@pytest.mark.parametrize("highlight", [True, False])
def test_masked_pending_stalled_and_broken_rows_are_highlighted(child_on_pty, term, colour, highlight):
    c = child_on_pty(term=term, options={"highlight": highlight})
    ev = c.event("render")
    c.send(b"q")
    assert c.close() == 0

    def cells(dev: str, q: int, word: str | None = None) -> list[int]:
        text, attrs = queue_row(ev, dev, q)
        if word is None:
            return attrs[:len(text.rstrip())]
        i = text.index(word)
        return attrs[i:i + len(word)]

    healthy = cells("blk0", 0) + cells("net0", 1) + cells("intx0", 0)
    assert not any(a & HIGHLIGHT for a in healthy)
    marked = {"masked vector": cells("blk0", 1, "masked"), "pending bit": cells("blk0", 1, "yes"),
              "stalled queue": cells("net0", 0), "broken device": cells("bad0", 0)}
    for what, attrs in marked.items():
        if not highlight:
            assert not any(a & HIGHLIGHT for a in attrs), what
            continue
        assert all(a & HIGHLIGHT for a in attrs), (what, attrs)
        # colour where the terminal has colours, bold/reverse video where it has none
        assert all(bool(a & curses.A_COLOR) == colour for a in attrs), (what, term)
        if not colour:
            assert all(a & (curses.A_BOLD | curses.A_REVERSE) for a in attrs), what
    # the stalled row stands out as a whole, the masked row only in its irq/pend cells
    if highlight:
        assert not any(a & HIGHLIGHT for a in cells("blk0", 1, "ioeventfd/irqfd"))


@pytest.mark.parametrize("follow", [True, False])
def test_a_resize_is_followed(child_on_pty, follow):
    c = child_on_pty(options={"follow_resize": follow})
    before = c.event("render")
    assert "kicks" not in header(before)  # the lifetime totals need more than 80 columns
    c.resize(30, 100)
    after = c.event("resized")
    c.send(b"q")
    assert c.close() == 0
    assert all(len(t) <= 100 for t, _ in rows_of(after))
    longest = max(len(t.rstrip()) for t, _ in rows_of(after))
    if follow:
        assert after["size"] == [30, 100]
        assert header(after)[9:] == ["kicks", "calls", "path"]  # two columns more
        assert 80 < longest <= 100
        assert queue_row(after, "blk0", 0)[0].split()[8:] == ["2000", "1980", "ioeventfd/irqfd"]
        c2 = child_on_pty(options={}, cols=60)  # and a narrow one drops the lowest-priority columns
        narrow = c2.event("render")
        c2.send(b"q")
        assert c2.close() == 0
        assert header(narrow) == ["device", "queue", "kicks/s", "calls/s", "in", "flight", "irq", "path"]
        assert max(len(t.rstrip()) for t, _ in rows_of(narrow)) <= 60
    else:
        assert after["size"] == [30, 80] and "kicks" not in header(after) and longest <= 80


@pytest.mark.parametrize("how", ["exception", "ctrl-c", "q"])
def test_the_terminal_is_restored(child_on_pty, how):
    c = child_on_pty()
    c.event("render")
    c.send({"exception": b"x", "ctrl-c": b"\x03", "q": b"q"}[how])
    closed = c.event("closed")
    rc = c.close()
    assert closed["restored"]  # the termios modes the child started with (cbreak/noecho undone)
    assert b"\x1b[?1049l" in c.output  # xterm's alternate screen left (endwin)
    # Python ends on an uncaught KeyboardInterrupt by SIGINT, as a shell expects
    assert rc == {"exception": 1, "ctrl-c": -signal.SIGINT, "q": 0}[how]


def test_key_q_and_p_are_read_by_the_view(child_on_pty):
    c = child_on_pty()
    c.event("render")
    c.send(b"pd")  # p is returned to the caller (the child ignores it), then d dumps
    c.event("dump")
    c.send(b"q")
    assert c.event("closed")["restored"]
    assert c.close() == 0


# ---------------------------------------------------------------------------------------------
# plain lines, irq state, summary


def test_intx_is_intx_and_no_vector_is_only_an_msix_queue_without_a_vector():
    d = doc(0.0, [device("intx0", [queue(0, mode="intx")], mode="intx"),
                  device("msix0", [queue(0, vector=0xFFFF, masked=False), queue(1, masked=True)])])
    r = rates(None, d)
    assert [x["mask"] for x in r["intx0"]] == ["intx"]
    assert [x["mask"] for x in r["msix0"]] == ["no-vector", "masked"]
    assert r["intx0"][0]["vector"] == 0xFFFF  # INTx has no vector either: still "intx"
    # a document without the optional keys ("pending", "handled-by") is shown too
    q = queue(0)
    del q["pending"], q["handled-by"]
    assert rates(None, doc(0.0, [device("old0", [q])]))["old0"][0]["mask"] == "unmasked"


@pytest.mark.parametrize("width", [80, None])
def test_plain_lines_fit_80_columns(width):
    import io

    out = io.StringIO()
    v = PlainView(out, width=width)
    big = [queue(n, kicks=123456 * k, calls=123000 * k, inuse=n) for n in range(4) for k in (1,)]
    long_id = "a-rather-long-device-id-0"
    docs = [doc(1.0, [device("blk0", [queue(0, kicks=1000, calls=990, inuse=3)]), device("net0", big),
                      device(long_id, [queue(0, vector=0xFFFF)]),
                      device("intx0", [queue(0, mode="intx", kicks=5, calls=5)], mode="intx")]),
            doc(3.0, [device("blk0", [queue(0, kicks=3468, calls=3450, inuse=3)]),
                      device("net0", [queue(n, kicks=2 * 123456 * 1000, calls=2 * 123000 * 1000, inuse=n)
                                      for n in range(4)]),
                      device(long_id, [queue(0, vector=0xFFFF)]),
                      device("intx0", [queue(0, mode="intx", kicks=9, calls=9)], mode="intx")])]
    for d in docs:
        v.update(d)
    lines = out.getvalue().splitlines()
    assert "\x1b" not in out.getvalue()
    if width is None:
        assert max(len(x) for x in lines) > 80  # a four-queue device on one line
        return
    assert max(len(x) for x in lines) <= 80, [x for x in lines if len(x) > 80]
    assert "t=   2.0s blk0 q0 k/s=1234 c/s=1230 inflt=3 vec=1 unmasked ioeventfd/irqfd" in lines
    assert sum(1 for x in lines if x.startswith("t=   2.0s net0 q")) == 4  # one line per queue
    assert any(x.startswith("t=   2.0s a-rather-lon q0 ") and " no-vector " in x for x in lines)
    assert any(x.startswith("t=   2.0s intx0 q0 ") and " vec=- intx " in x for x in lines)
    assert any(" k/s=123.4M " in x for x in lines)  # a rate too wide for its field is scaled


def test_summary_lines_fit_80_columns_and_take_results_by_device_id():
    d = scripted_docs()[1]
    d["devices"]["blk0"]["queues"][0]["kicks-by-path"] = {"ioeventfd": 1990, "mmio": 10}
    results = {"blk0": {"device": "blk0", "kind": "blk", "ops": 20000, "reads": 10000, "writes": 10000,
                        "iops": 3333.3, "lat-us-p50": 12.0, "lat-us-p99": 45.0, "error-count": 1,
                        "errors": ["sector 12345 of blk0 read back 0x00 where 0x5a was written " * 3]},
               "net0": {"device": "net0", "kind": "net", "ops": 500, "pps": 250.0, "lat-us-p50": 30.0,
                        "lat-us-p99": 90.0, "error-count": 0, "errors": []}}
    lines = summary_lines(d, results)
    assert max(len(x) for x in lines) <= 80, [x for x in lines if len(x) > 80]
    text = "\n".join(lines)
    assert "      kicks by path: ioeventfd=1990 mmio=10" in lines
    i = lines.index("  blk0 (blk): 20000 ops (10000 reads, 10000 writes), 3333 IOPS, p50 12 us,")
    assert lines[i + 1:i + 3] == ["    p99 45 us, data errors 1",
                                  "    error: sector 12345 of blk0 read back 0x00 where 0x5a was written sector"]
    assert "  net0 (net): 500 ping-pongs, 250/s, p50 30 us, p99 90 us, payload errors 0" in lines
    assert "ioeventfd-writes=200" in text and "exits: total=140 mmio-write=132 pio-read=8" in lines
    assert any(x.split()[:2] == ["intx0", "0"] and "intx" in x.split() for x in lines)
    assert summary_lines({"devices": {"x": {"queues": [{"queue": "bad"}]}}, "hv": None}, {"x": None})  # no raise


def test_kickcall_run_on_a_terminal_shows_the_view_quits_on_q_and_restores_the_terminal():
    """The whole of ``kickcall run`` on an 80x30 pty: the curses view comes up (alternate screen),
    ``q`` ends the run long before its duration, the terminal's modes are back, the summary follows."""
    import select

    pid, fd = pty.fork()
    if pid == 0:
        try:
            set_size(0, 30, 80)
            os.execve(sys.executable, [sys.executable, "-m", "kickcall", "run", "--duration", "300",
                                       "--trace", "virtio_queue_notify"],
                      dict(os.environ, TERM="xterm-256color", PYTHONPATH=SRC))
        finally:
            os._exit(127)
    out = b""
    try:
        deadline = time.monotonic() + 120
        sent = False
        while True:
            assert time.monotonic() < deadline, out[-2000:]
            if select.select([fd], [], [], 0.05)[0]:
                try:
                    b = os.read(fd, 65536)
                except OSError:
                    b = b""
                if not b:
                    break
                out += b
            if not sent and b"in flight" in out and b"hv: " in out:  # the table and its footer are up
                os.write(fd, b"q")
                sent = True
        _, status = os.waitpid(pid, 0)
        after = termios.tcgetattr(fd)  # the pty's modes (Linux: the master reports the slave's)
    finally:
        try:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
        except (ProcessLookupError, ChildProcessError):
            pass
        os.close(fd)
    assert os.waitstatus_to_exitcode(status) == 0, out[-3000:]
    assert b"\x1b[?1049h" in out and b"\x1b[?1049l" in out  # curses' alternate screen, left at the end
    assert after[3] & termios.ICANON and after[3] & termios.ECHO  # cbreak/noecho undone (a pty starts cooked)
    tail = out[out.rfind(b"\x1b[?1049l"):].decode(errors="replace")
    assert "per-queue counters (lifetime):" in tail and "Traceback" not in out.decode(errors="replace")
    # the trace lines made while the view was up were kept off its screen and written after it
    assert tail.count("virtio_queue_notify") > 10, tail[:2000]


def test_hostile_documents_never_raise():
    """The view renders whatever a document holds (wrong types, missing keys) without a traceback."""
    import io

    from hypothesis import given
    from hypothesis import strategies as st

    leaf = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70), st.floats(), st.text(max_size=30))
    value = st.recursive(leaf, lambda kids: st.one_of(st.lists(kids, max_size=4),
                                                      st.dictionaries(st.text(max_size=12), kids, max_size=4)),
                         max_leaves=12)
    qkeys = st.sampled_from(["queue", "vector", "masked", "pending", "irq-mode", "kicks", "calls", "inuse",
                             "kicks-by-path", "calls-by-path", "calls-suppressed", "irqfd", "handled-by"])
    q = st.dictionaries(qkeys, value, max_size=13)
    dev = st.fixed_dictionaries({"queues": st.one_of(st.lists(q, max_size=3), value)},
                                optional={"broken": value, "irq-mode": value, "handled-by": value})
    d = st.fixed_dictionaries({"time": st.one_of(st.floats(0, 1e6), value), "running": value,
                               "devices": st.one_of(st.dictionaries(st.text(max_size=20), dev, max_size=3), value)},
                              optional={"hv": value, "exits": value})

    @given(d, d, value)
    def check(a, b, results):
        v = PlainView(io.StringIO())
        v.update(a)
        v.update(b)
        assert all(len(x) <= 80 for x in v.lines(b))
        summary_lines(b, results if isinstance(results, (dict, list)) else {})

    check()
