"""What ``kickcall run`` shows: per queue kicks/s, calls/s, in flight, vector, mask state and path.

Both views render the counters document (schema 1: ``devices`` keyed by id, each with ``queues``;
``hv`` and ``exits`` global; kebab-case keys) and compute rates from two documents.

``LiveView`` is a full-screen table on curses (the standard library's binding of ncurses): it fits
the terminal's width (lower-priority columns are dropped, the path column shrinks, nothing wraps),
follows resizes (``KEY_RESIZE``, which ncurses delivers on ``SIGWINCH``), uses colour only when the
terminal has colours (bold and reverse video otherwise), highlights a masked vector, a pending bit
(the vector's PBA bit), a stalled queue (requests in flight and no call since the previous document
while running) and a broken device, and reads the keys (``q``, ``p``) itself.  The terminal is
restored (``endwin``) by ``close()``, which the context manager calls on any exception.

``PlainView`` prints one line per device per period (one per queue when a device's queues do not
fit on one line), no wider than 80 columns, for logs and pipes; it writes no escape sequence.
"""

from __future__ import annotations

import curses
import os
import sys
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from types import TracebackType
from typing import Any, TextIO

__all__ = ["LiveView", "PlainView", "ViewError", "rates", "summary_lines"]

NO_VECTOR = 0xFFFF  # VIRTIO_MSI_NO_VECTOR


class ViewError(Exception):
    """The live view cannot run here (*kind*: "terminal" -- no usable terminal description)."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


def _num(x: object) -> float:
    """A counter as a number (a missing or non-numeric value counts as 0: the view never raises)."""
    return x if isinstance(x, (int, float)) and not isinstance(x, bool) else 0


def _int(x: object) -> int:
    try:
        return int(_num(x))
    except (ValueError, OverflowError):  # NaN, infinity
        return 0


def _mapping(x: object) -> Mapping[str, Any]:
    return x if isinstance(x, Mapping) else {}


def _list(x: object) -> list:
    return x if isinstance(x, list) else []


def _mask_state(q: Mapping[str, Any], dev_mode: object = None) -> str:
    """"intx" for a queue whose calls go on INTx (``irq-mode``), "no-vector" for an MSI-X queue with
    VIRTIO_MSI_NO_VECTOR, else the vector's MSI-X mask bit ("masked" / "unmasked")."""
    mode = q.get("irq-mode") or dev_mode
    if mode == "intx":
        return "intx"
    if q.get("vector", NO_VECTOR) == NO_VECTOR:
        return "no-vector"
    masked = q.get("masked")
    if masked is None:
        return "intx" if mode is None else "-"  # no mode named: an older document's INTx queue
    return "masked" if masked else "unmasked"


def _dominant(cur: Mapping[str, Any], prev: Mapping[str, Any] | None) -> str | None:
    """The path that carried the most since *prev* (or, with nothing since, over the lifetime)."""
    if prev is not None:
        d = {k: _num(v) - _num(prev.get(k, 0)) for k, v in cur.items()}
        best = max((k for k in d if d[k] > 0), key=lambda k: d[k], default=None)
        if best is not None:
            return best
    return max((k for k in cur if _num(cur[k]) > 0), key=lambda k: _num(cur[k]), default=None)


def _path(q: Mapping[str, Any], pq: Mapping[str, Any] | None) -> str:
    """``kick-path/call-path`` (KickPath/CallPath values), e.g. ``ioeventfd/irqfd``."""
    kick = _dominant(_mapping(q.get("kicks-by-path")), _mapping(pq.get("kicks-by-path")) if pq else None)
    call = _dominant(_mapping(q.get("calls-by-path")), _mapping(pq.get("calls-by-path")) if pq else None)
    if call is None:
        call = "irqfd" if q.get("irqfd") else ("polled" if q.get("polled") else None)
    if kick is None and call is None:
        return "-"
    return f"{kick or '-'}/{call or '-'}"


def rates(prev: dict | None, cur: dict) -> dict[str, list[dict]]:
    """Per device, per queue: kicks/s and calls/s between two documents, plus current state.

    A queue is *stalled* when it has requests in flight and made no call since the previous
    document, both documents taken while running.
    """
    out: dict[str, list[dict]] = {}
    dt = _num(cur.get("time")) - _num(prev.get("time")) if prev else 0.0
    running = bool(cur.get("running", True)) and bool(prev.get("running", True)) if prev else False
    pdevs = _mapping(prev.get("devices")) if prev else {}
    for name, d in _mapping(cur.get("devices")).items():
        d = _mapping(d)
        pd = _mapping(pdevs.get(name))
        pqs = {_int(pq.get("queue")): pq for pq in _list(pd.get("queues")) if isinstance(pq, Mapping)}
        rows = []
        for q in _list(d.get("queues")):
            if not isinstance(q, Mapping):
                continue
            pq = pqs.get(_int(q.get("queue"))) if prev else None
            kr = cr = 0.0
            if pq is not None and dt > 0:
                kr = (_num(q.get("kicks")) - _num(pq.get("kicks"))) / dt
                cr = (_num(q.get("calls")) - _num(pq.get("calls"))) / dt
            inflight = _int(q.get("inuse"))
            stalled = (running and pq is not None and inflight > 0
                       and _num(q.get("calls")) == _num(pq.get("calls")))
            rows.append({"device": str(name), "queue": _int(q.get("queue")), "kicks_s": kr, "calls_s": cr,
                         "inflight": inflight, "vector": q.get("vector", NO_VECTOR),
                         "mask": _mask_state(q, d.get("irq-mode")), "masked": q.get("masked") is True,
                         "pending": q.get("pending"), "path": _path(q, pq),
                         "kicks": _int(q.get("kicks")), "calls": _int(q.get("calls")),
                         "suppressed": _int(q.get("calls-suppressed")),
                         "handled-by": str(q.get("handled-by") or d.get("handled-by") or "-"),
                         "stalled": stalled, "broken": d.get("broken") is True})
        out[str(name)] = rows
    return out


def _vec(v: object) -> str:
    return "-" if v == NO_VECTOR or not isinstance(v, int) else str(v)


def _rate(v: float, w: int) -> str:
    """A rate in *w* characters: 12345, then 123.4k, 12.3M (top's way of keeping a column)."""
    s = f"{v:.0f}"
    if len(s) <= w:
        return s
    for div, unit in ((1e3, "k"), (1e6, "M"), (1e9, "G"), (1e12, "T")):
        if v / div < 999.95:
            s = f"{v / div:.1f}{unit}"
            return s if len(s) <= w else f"{v / div:.0f}{unit}"
    return s


def _fit(s: str, width: int) -> str:
    return s if len(s) <= width else s[:max(0, width)]


# ---------------------------------------------------------------------------------------------
# plain lines


class PlainView:
    """One line per device per period (``t=  2.0s blk0 q0 k/s=.. c/s=.. inflt=.. vec=.. unmasked
    ioeventfd/irqfd``); a device whose queues do not fit on one line gets one line per queue.

    *width*: the longest line (80); ``None`` prints every device on one line however long.
    """

    ID_MAX = 12  # longer device ids are cut

    def __init__(self, out: TextIO = sys.stdout, width: int | None = 80) -> None:
        self.out = out
        self.width = width
        self.prev: dict | None = None
        self.t0: float | None = None

    @staticmethod
    def _queue(x: dict) -> str:
        flags = "".join(f" {f}" for f, on in (("pending", x["pending"] is True), ("STALLED", x["stalled"]),
                                              ("BROKEN", x["broken"])) if on)
        return (f"q{x['queue']} k/s={_rate(x['kicks_s'], 7)} c/s={_rate(x['calls_s'], 7)} "
                f"inflt={x['inflight']} vec={_vec(x['vector'])} {x['mask']}{flags} {x['path']}")

    def lines(self, snap: dict, note: str = "") -> list[str]:
        """The lines for *snap* (rates against the previous document given)."""
        if self.t0 is None:
            self.t0 = _num(snap.get("time"))
        r = rates(self.prev, snap)
        self.prev = snap
        t = f"t={_num(snap.get('time')) - self.t0:6.1f}s"
        if not snap.get("running", True):
            t += " paused"
        out = []
        for name, rows in r.items():
            dev = name if self.width is None else name[:self.ID_MAX]
            one = f"{t} {dev} " + " | ".join(self._queue(x) for x in rows)
            if self.width is None or len(one) <= self.width or len(rows) <= 1:
                out.append(one if self.width is None else _fit(one, self.width))
            else:
                out += [_fit(f"{t} {dev} {self._queue(x)}", self.width) for x in rows]
        if note:
            out.append(f"{t} {note}" if self.width is None else _fit(f"{t} {note}", self.width))
        return out

    def update(self, snap: dict, note: str = "") -> None:
        try:
            for line in self.lines(snap, note):
                print(line, file=self.out, flush=True)
        except (OSError, ValueError):  # a closed pipe: the run goes on
            pass

    def close(self) -> None:
        pass


# ---------------------------------------------------------------------------------------------
# the live view


@dataclass(frozen=True)
class _Col:
    key: str
    header: str
    width: int
    right: bool = True


_DEVICE_MIN, _DEVICE_MAX, _PATH_MIN, _PATH_MAX = 6, 12, 5, 24
# the columns an 80-column terminal shows; "device" is sized to the ids and "path" takes the rest
_ESSENTIAL = [_Col("queue", "queue", 5), _Col("kicks_s", "kicks/s", 8), _Col("calls_s", "calls/s", 8),
              _Col("inflight", "in flight", 9), _Col("vector", "vec", 4), _Col("mask", "irq", 9, False),
              _Col("pending", "pend", 4, False)]
_DROP_ORDER = ["pending", "vector"]  # on a narrower terminal (the irq cell still shows a pending bit)
# shown, in this order, when the terminal is wide enough
_OPTIONAL = [_Col("kicks", "kicks", 10), _Col("calls", "calls", 10), _Col("suppressed", "suppr", 8),
             _Col("handled-by", "by", 10, False)]


def _cell(x: dict, key: str, width: int) -> str:
    v = x.get(key)
    if key in ("kicks_s", "calls_s"):
        return _rate(_num(v), width)
    if key == "vector":
        return _vec(v)
    if key == "pending":
        return "-" if v is None else ("yes" if v else "no")
    return str(v)


class LiveView:
    """A full-screen table on curses; ``poll_key()`` reads ``q``/``p`` and follows resizes.

    *fit*: lay the table out to the terminal's width (off: every column at its natural width, as
    before, so lines wrap).  *highlight*: masked vectors, pending bits, stalled queues and broken
    devices in colour or bold/reverse (off: plain).  *follow_resize*: re-lay out on ``KEY_RESIZE``
    (off: keep the width the view started with).  *fd*: the terminal (stdout's).
    """

    def __init__(self, out: TextIO = sys.stdout, title: str = "kickcall", *, fit: bool = True,
                 highlight: bool = True, follow_resize: bool = True, fd: int | None = None) -> None:
        self.title = title
        self.fit = fit
        self.highlight = highlight
        self.follow_resize = follow_resize
        self.prev: dict | None = None
        self.t0: float | None = None
        self.last: tuple[dict, dict[str, list[dict]], str] | None = None
        self.prev_time: float | None = None
        self.resizes = 0  # KEY_RESIZEs seen (followed or not)
        self.colour = False
        fd = out.fileno() if fd is None else fd
        try:
            curses.setupterm(os.environ.get("TERM"), fd)  # raises where initscr() would exit the process
        except curses.error as e:
            raise ViewError("terminal", f"no usable terminal ({os.environ.get('TERM')!r}): {e}") from e
        self.scr: Any = curses.initscr()
        try:
            curses.noecho()
            curses.cbreak()  # keys one at a time; Ctrl-C still sends SIGINT
            self.scr.keypad(True)
            try:
                curses.curs_set(0)
            except curses.error:
                pass
            self._init_attrs()
            self.height, self.width = self.scr.getmaxyx()
        except BaseException:
            self.close()
            raise

    def _init_attrs(self) -> None:
        self.attr = {"masked": 0, "pending": 0, "stalled": 0, "broken": 0}
        self.header_attr = curses.A_REVERSE
        if not self.highlight:
            return
        if curses.has_colors():
            curses.start_color()
            bg = -1
            try:
                curses.use_default_colors()
            except curses.error:
                bg = curses.COLOR_BLACK
            curses.init_pair(1, curses.COLOR_YELLOW, bg)
            curses.init_pair(2, curses.COLOR_MAGENTA, bg)
            curses.init_pair(3, curses.COLOR_BLACK, curses.COLOR_YELLOW)
            curses.init_pair(4, curses.COLOR_WHITE, curses.COLOR_RED)
            self.colour = True
            self.attr = {"masked": curses.color_pair(1) | curses.A_BOLD,
                         "pending": curses.color_pair(2) | curses.A_BOLD,
                         "stalled": curses.color_pair(3), "broken": curses.color_pair(4) | curses.A_BOLD}
        else:
            self.attr = {"masked": curses.A_BOLD, "pending": curses.A_BOLD | curses.A_UNDERLINE,
                         "stalled": curses.A_REVERSE, "broken": curses.A_REVERSE | curses.A_BOLD}

    # -- context manager: the terminal is restored whatever happens
    def __enter__(self) -> LiveView:
        return self

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def close(self) -> None:
        """Restore the terminal (``endwin``); idempotent."""
        scr, self.scr = getattr(self, "scr", None), None
        if scr is None:
            return
        for undo in (lambda: scr.keypad(False), curses.echo, curses.nocbreak, lambda: curses.curs_set(1)):
            try:
                undo()
            except curses.error:
                pass
        try:
            curses.endwin()
        except curses.error:
            pass

    # -- layout
    def layout(self, rows: dict[str, list[dict]], width: int) -> list[_Col]:
        """The columns for *width*: the essential ones (80 columns show them all), the optional
        ones while they fit, the path column taking what is left (at least _PATH_MIN)."""
        ids = [n for n in rows] or ["device"]
        dev = _Col("device", "device", max(_DEVICE_MIN, min(_DEVICE_MAX, max(len(n) for n in ids))), False)
        paths = [x["path"] for rs in rows.values() for x in rs] or ["path"]
        path_pref = min(_PATH_MAX, max(len("path"), *(len(p) for p in paths)))
        if not self.fit:
            return [dev, *_ESSENTIAL, *_OPTIONAL, _Col("path", "path", max(path_pref, max(len(p) for p in paths)),
                                                       False)]
        cols = [dev, *_ESSENTIAL]
        used = sum(c.width + 1 for c in cols)
        for key in _DROP_ORDER:
            if used + _PATH_MIN <= width:
                break
            c = next(c for c in cols if c.key == key)
            cols.remove(c)
            used -= c.width + 1
        for c in _OPTIONAL:
            if used + c.width + 1 + path_pref <= width:
                cols.append(c)
                used += c.width + 1
        return [*cols, _Col("path", "path", max(_PATH_MIN, min(path_pref, width - used)), False)]

    def _row(self, cols: list[_Col], x: dict) -> list[tuple[str, int]]:
        """The cells of one queue's row, each with its attribute (a separator carries the row's)."""
        row_attr = self.attr["broken"] if x["broken"] else (self.attr["stalled"] if x["stalled"] else 0)
        cells: list[tuple[str, int]] = []
        for i, c in enumerate(cols):
            text = x["device"][:c.width] if c.key == "device" else _cell(x, c.key, c.width)
            if self.fit:
                text = text[:c.width]
            text = text.rjust(c.width) if c.right else text.ljust(c.width)
            a = row_attr
            if c.key == "mask" and (x["masked"] or x["pending"] is True):
                a |= self.attr["masked"] if x["masked"] else self.attr["pending"]
            if c.key == "pending" and x["pending"] is True:
                a |= self.attr["pending"]
            cells.append((text, a))
            if i < len(cols) - 1:
                cells.append((" ", row_attr))
        return cells

    def _alerts(self, rows: dict[str, list[dict]], dt: float) -> list[tuple[str, int]]:
        out = []
        for name, rs in rows.items():
            if any(x["broken"] for x in rs):
                out.append((f"! {name}: device broken (needs reset)", self.attr["broken"]))
            for x in rs:
                if x["stalled"] and not x["broken"]:
                    out.append((f"! {name} q{x['queue']}: stalled, {x['inflight']} in flight and no call "
                                f"in {dt:.1f}s", self.attr["stalled"]))
        return out

    @staticmethod
    def hv_line(snap: dict, width: int) -> str:
        """The hypervisor's counters (kebab-case, as ``--json`` and QMP name them), fitting *width*."""
        hv = _mapping(snap.get("hv"))
        exits = sum(_int(v) for v in _mapping(snap.get("exits")).values())
        w, i, m = (_int(hv.get(k)) for k in ("ioeventfd-writes", "irqfd-injections", "msi-injections"))
        for s in (f"hv: ioeventfd-writes={w}  irqfd-injections={i}  msi-injections={m}  exits={exits}",
                  f"hv: ioeventfd-writes={w} irqfd-injections={i} msi-injections={m} exits={exits}",
                  f"hv: ioeventfd={w} irqfd={i} msi={m} exits={exits}"):
            if len(s) <= width:
                return s
        return s[:width]

    def _put(self, y: int, x: int, text: str, attr: int = 0) -> int:
        """Write *text* at (y, x), cut at the terminal's edge when fitting; the next x."""
        if self.scr is None:
            return x
        h, w = self.scr.getmaxyx()
        if y >= h or (self.fit and x >= w):
            return x
        try:
            if self.fit:
                self.scr.addnstr(y, x, text, w - x, attr)
            else:
                self.scr.addstr(y, x, text, attr)  # wraps (the layout before issue 13)
        except curses.error:
            pass  # the bottom-right cell (the cursor cannot advance past it), or off-screen when wrapping
        return x + len(text)

    def draw(self) -> None:
        """Redraw the last document (after a resize, a pause, an update)."""
        if self.scr is None or self.last is None:
            return
        snap, rows, note = self.last
        h, w = self.scr.getmaxyx()
        width = w if self.follow_resize else min(w, self.width)
        self.scr.erase()
        t = _num(snap.get("time")) - (self.t0 or 0.0)
        state = "RUNNING" if snap.get("running", True) else "PAUSED"
        title = f"{snap.get('program', self.title)}  t={t:.1f}s  {state}  [p] pause/resume  [q] quit"
        if note:
            title += f"  {note}"
        self._put(0, 0, _fit(title, width) if self.fit else title, curses.A_BOLD if self.highlight else 0)
        cols = self.layout(rows, width)
        hdr = " ".join(c.header.rjust(c.width) if c.right else c.header.ljust(c.width) for c in cols)
        self._put(2, 0, (hdr[:width].ljust(width)) if self.fit else hdr, self.header_attr)
        dt = _num(snap.get("time")) - _num(self.prev_time) if self.prev_time is not None else 0.0
        alerts = self._alerts(rows, dt)
        footer_y = h - 1
        room = max(0, footer_y - 3 - len(alerts) - (1 if alerts else 0))  # table rows above alerts, footer
        flat = [x for rs in rows.values() for x in rs]
        shown = flat if len(flat) <= room else flat[:max(0, room - 1)]
        y = 3
        for x in shown:
            cx = 0
            for text, a in self._row(cols, x):
                cx = self._put(y, cx, text, a)
            y += 1
        if len(shown) < len(flat) and room:
            self._put(y, 0, _fit(f"... {len(flat) - len(shown)} more queues (a taller terminal shows them)",
                                 width))
            y += 1
        ay = max(y + 1, footer_y - len(alerts))
        for text, a in alerts:
            if ay < footer_y:
                self._put(ay, 0, _fit(text, width), a)
            ay += 1
        if footer_y > 2:
            self._put(footer_y, 0, self.hv_line(snap, width) if self.fit else self.hv_line(snap, 10 ** 6))
        self.scr.noutrefresh()
        curses.doupdate()

    def update(self, snap: dict, note: str = "") -> None:
        """Render *snap* (rates against the previous document)."""
        if self.scr is None:
            return
        if self.t0 is None:
            self.t0 = _num(snap.get("time"))
        rows = rates(self.prev, snap)
        self.prev_time = _num(self.prev.get("time")) if self.prev else None
        self.prev = snap
        self.last = (snap, rows, note)
        try:
            self.draw()
        except curses.error:
            pass

    def poll_key(self, timeout: float) -> str | None:
        """Wait up to *timeout* seconds for a key; a resize is followed (the table redrawn) meanwhile.
        ``None`` when no key came (or a signal cut the wait short)."""
        if self.scr is None:
            time.sleep(max(0.0, timeout))
            return None
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            self.scr.timeout(max(0, int(left * 1000)))
            try:
                ch = self.scr.getch()
            except curses.error:
                ch = -1
            if ch == curses.KEY_RESIZE:
                self.resized()
            elif 0 <= ch < 256:
                return chr(ch)
            elif ch == -1:
                return None
            if time.monotonic() >= deadline:
                return None

    def resized(self) -> None:
        """The terminal changed size (``KEY_RESIZE``): lay the table out again."""
        if self.scr is None:
            return
        self.resizes += 1
        if self.follow_resize:
            try:
                curses.update_lines_cols()
            except curses.error:
                pass
            self.height, self.width = self.scr.getmaxyx()
        self.scr.clear()  # a full repaint: the terminal may have reflowed the old lines
        try:
            self.draw()
        except curses.error:
            pass

    def size(self) -> tuple[int, int]:
        """(rows, columns) the view lays out for."""
        return self.height, self.width

    def screen(self) -> list[tuple[str, list[int]]]:
        """What curses holds on the screen: each row's text and each cell's attributes
        (``inch() & A_ATTRIBUTES``), for a screenshot or a test."""
        if self.scr is None:
            return []
        h, w = self.scr.getmaxyx()
        out = []
        for y in range(h):
            text = self.scr.instr(y, 0, w).decode("utf-8", "replace")
            attrs = [self.scr.inch(y, x) & curses.A_ATTRIBUTES for x in range(w)]
            out.append((text, attrs))
        return out


# ---------------------------------------------------------------------------------------------
# the end-of-run summary


def _wrap(head: str, parts: Iterable[str], width: int, indent: str) -> list[str]:
    """*head* followed by *parts* joined with spaces, continued on *indent*-ed lines at *width*."""
    lines, cur, fresh = [], head, not head.strip()
    for p in parts:
        if not fresh and len(cur) + 1 + len(p) > width:
            lines.append(cur)
            cur = indent + p
        else:
            cur += p if fresh else " " + p
        fresh = False
    lines.append(cur)
    return lines


def summary_lines(snap: dict, results: Mapping[str, Mapping[str, Any]] | Iterable[Mapping[str, Any]],
                  width: int = 80) -> list[str]:
    """The end of a run: each queue's lifetime counters by path, the hypervisor's, the workload's
    results (keyed by device id, kebab-case).  Lines fit *width* (a long error message wraps)."""
    lines = ["", "per-queue counters (lifetime):",
             f"  {'device':<12} {'queue':>5} {'kicks':>10} {'calls':>10} {'suppr':>8} {'vec':>5} {'irq':<9} by"]
    for name, d in _mapping(snap.get("devices")).items():
        d = _mapping(d)
        for q in _list(d.get("queues")):
            if not isinstance(q, Mapping):
                continue
            lines.append(f"  {str(name)[:12]:<12} {_int(q.get('queue')):>5} {_int(q.get('kicks')):>10} "
                         f"{_int(q.get('calls')):>10} {_int(q.get('calls-suppressed')):>8} "
                         f"{_vec(q.get('vector', NO_VECTOR)):>5} {_mask_state(q, d.get('irq-mode')):<9} "
                         f"{q.get('handled-by') or d.get('handled-by') or '-'}")
            for what in ("kicks", "calls"):
                by = _mapping(q.get(f"{what}-by-path"))
                parts = [f"{k}={_int(v)}" for k, v in sorted(by.items())] or ["-"]
                lines += _wrap(f"      {what} by path:", parts, width, " " * 21)
    hv = _mapping(snap.get("hv"))
    lines += _wrap("hypervisor:", [f"{k}={_int(v)}" for k, v in sorted(hv.items())] or ["-"], width, "  ")
    exits = _mapping(snap.get("exits"))
    lines += _wrap(f"exits: total={sum(_int(v) for v in exits.values())}",
                   [f"{k}={_int(v)}" for k, v in sorted(exits.items())], width, "  ")
    lines.append("workload:")
    items = list(results.items()) if isinstance(results, Mapping) else \
        [(str(_mapping(r).get("device", "?")), r) for r in results]
    for dev, r in items:
        r = _mapping(r)
        p50, p99 = _num(r.get("lat-us-p50")), _num(r.get("lat-us-p99"))
        if r.get("kind") == "blk":
            parts = [f"{_int(r.get('ops'))} ops ({_int(r.get('reads'))} reads, {_int(r.get('writes'))} writes),",
                     f"{_num(r.get('iops')):.0f} IOPS,", f"p50 {p50:.0f} us,", f"p99 {p99:.0f} us,",
                     f"data errors {_int(r.get('error-count'))}"]
        else:
            parts = [f"{_int(r.get('ops'))} ping-pongs,", f"{_num(r.get('pps')):.0f}/s,", f"p50 {p50:.0f} us,",
                     f"p99 {p99:.0f} us,", f"payload errors {_int(r.get('error-count'))}"]
        lines += _wrap(f"  {dev} ({r.get('kind', '?')}):", parts, width, "    ")
        for e in _list(r.get("errors")):
            lines += _wrap("    error:", str(e).split(), width, "      ")
    return lines
