"""Completion latencies as fio reports them: a percentile ladder and a log2 histogram.

Every latency goes into a log-linear histogram (64 buckets per power of two of nanoseconds, so a
percentile is within 1/64 of the value, ~1.6 %, as fio's ``clat percentiles`` are) and into a log2
histogram of microseconds (``[0,1) [1,2) [2,4) ...`` µs, fio's ``lat (usec)`` distribution).  Memory
is bounded whatever the run's length; nothing is sampled away.

Also here, shared by the load tools (``kickcall vhost-user-test``, ``kickcall bench``): the NDJSON
per-interval log (:func:`open_log`, :func:`write_record`) and a standard-library SVG picture of the
log2 histogram (:func:`svg_log2`) for BENCHMARKS.md.
"""

from __future__ import annotations

import json
import os
import threading
from typing import IO
from xml.sax.saxutils import escape

from ..ownership import PathRefused, RefusalKind

__all__ = ["LatencyHistogram", "LADDER", "ladder_key", "format_ladder", "format_log2", "open_log", "write_record",
           "svg_log2"]

# fio's default clat percentile list
LADDER: tuple[float, ...] = (1, 5, 10, 20, 30, 40, 50, 60, 70, 80, 90, 95, 99, 99.5, 99.9, 99.95, 99.99)

_SUB_BITS = 6
_SUB = 1 << _SUB_BITS  # buckets per power of two


def ladder_key(p: float) -> str:
    """The key of percentile *p* in JSON and NDJSON: fio's spelling, ``"99.90"``."""
    return f"{p:.2f}"


def _index(ns: int) -> int:
    if ns < _SUB:
        return ns
    e = ns.bit_length() - 1  # >= _SUB_BITS
    return (e - _SUB_BITS + 1) * _SUB + ((ns >> (e - _SUB_BITS)) & (_SUB - 1))


def _bucket_mid(idx: int) -> float:
    """The middle of bucket *idx*, in ns."""
    if idx < _SUB:
        return float(idx)
    e = idx // _SUB + _SUB_BITS - 1
    lo = (_SUB + idx % _SUB) << (e - _SUB_BITS)
    width = 1 << (e - _SUB_BITS)
    return lo + (width - 1) / 2


class LatencyHistogram:
    """Latencies in nanoseconds; :meth:`record` is safe from several threads."""

    def __init__(self) -> None:
        self._mu = threading.Lock()
        self.counts: dict[int, int] = {}
        self.log2_us: list[int] = [0] * 48
        self.n = 0
        self.total_ns = 0
        self.min_ns = 0
        self.max_ns = 0

    def record(self, ns: int) -> None:
        ns = max(0, int(ns))
        i = _index(ns)
        b = min(len(self.log2_us) - 1, (ns // 1000).bit_length())
        with self._mu:
            self.counts[i] = self.counts.get(i, 0) + 1
            self.log2_us[b] += 1
            if not self.n or ns < self.min_ns:
                self.min_ns = ns
            if ns > self.max_ns:
                self.max_ns = ns
            self.n += 1
            self.total_ns += ns

    def record_all(self, ns: "list[int]") -> LatencyHistogram:
        """Record every latency of *ns*; returns self."""
        for x in ns:
            self.record(x)
        return self

    def copy(self) -> LatencyHistogram:
        """A consistent copy of what was recorded so far (taken under the lock)."""
        out = LatencyHistogram()
        with self._mu:
            out.counts, out.log2_us = dict(self.counts), list(self.log2_us)
            out.n, out.total_ns, out.min_ns, out.max_ns = self.n, self.total_ns, self.min_ns, self.max_ns
        return out

    def add(self, other: LatencyHistogram) -> None:
        """Fold *other*'s latencies into this histogram (a round's into the run's total)."""
        o = other.copy()
        if not o.n:
            return
        with self._mu:
            for i, c in o.counts.items():
                self.counts[i] = self.counts.get(i, 0) + c
            for i, c in enumerate(o.log2_us):
                self.log2_us[i] += c
            if not self.n or o.min_ns < self.min_ns:
                self.min_ns = o.min_ns
            self.max_ns = max(self.max_ns, o.max_ns)
            self.n += o.n
            self.total_ns += o.total_ns

    def take(self) -> LatencyHistogram:
        """A copy of what was recorded, and this histogram emptied (an interval's latencies)."""
        out = LatencyHistogram()
        with self._mu:
            out.counts, self.counts = self.counts, {}
            out.log2_us, self.log2_us = self.log2_us, [0] * len(self.log2_us)
            out.n, out.total_ns, out.min_ns, out.max_ns = self.n, self.total_ns, self.min_ns, self.max_ns
            self.n = self.total_ns = self.min_ns = self.max_ns = 0
        return out

    def percentile_ns(self, p: float) -> float:
        """The latency below which *p* percent of the recorded ones are (0 when none are)."""
        with self._mu:
            if not self.n:
                return 0.0
            rank = max(1, -(-self.n * p // 100))  # ceil, at least the first sample
            cum = 0
            for i in sorted(self.counts):
                cum += self.counts[i]
                if cum >= rank:
                    return min(max(_bucket_mid(i), float(self.min_ns)), float(self.max_ns))
            return float(self.max_ns)

    def ladder_us(self, points: tuple[float, ...] = LADDER) -> dict[str, float]:
        """``{"1.00": µs, ..., "99.99": µs}``."""
        return {ladder_key(p): round(self.percentile_ns(p) / 1000.0, 3) for p in points}

    def mean_us(self) -> float:
        return self.total_ns / self.n / 1000.0 if self.n else 0.0

    def log2_buckets(self) -> list[dict]:
        """Non-empty range of the log2 histogram: ``[{"lo-us": 0, "hi-us": 1, "count": n}, ...]``
        (``lo-us`` inclusive, ``hi-us`` exclusive), from the first to the last non-empty bucket."""
        with self._mu:
            counts = list(self.log2_us)
        used = [i for i, c in enumerate(counts) if c]
        if not used:
            return []
        return [{"lo-us": 0 if i == 0 else 1 << (i - 1), "hi-us": 1 << i, "count": counts[i]}
                for i in range(used[0], used[-1] + 1)]

    def summary(self) -> dict:
        """The JSON shape of the whole: count, min/mean/max, the ladder and the log2 histogram."""
        return {"count": self.n, "min-us": self.min_ns / 1000.0, "mean-us": round(self.mean_us(), 3),
                "max-us": self.max_ns / 1000.0, "percentiles-us": self.ladder_us(),
                "log2-histogram-us": self.log2_buckets()}


def format_ladder(ladder: dict[str, float], indent: str = "    ", digits: int = 0) -> list[str]:
    """fio's ``clat percentiles (usec):`` block, four to a line (*digits* after the point: 1 for
    latencies of a few µs)."""
    cells = [f"{float(k):5.2f}th=[{v:>7.{digits}f}]" for k, v in ladder.items()]
    lines = [f"{indent}clat percentiles (usec):"]
    for i in range(0, len(cells), 4):
        lines.append(f"{indent} | " + ", ".join(cells[i:i + 4]) + ("," if i + 4 < len(cells) else ""))
    return lines


def format_log2(buckets: list[dict], indent: str = "    ", bar: int = 40) -> list[str]:
    """The log2 histogram, one bucket a line: range in µs, count, share and a bar."""
    total = sum(b["count"] for b in buckets)
    if not total:
        return [f"{indent}lat histogram (usec, log2): no completions"]
    top = max(b["count"] for b in buckets)
    lines = [f"{indent}lat histogram (usec, log2):"]
    for b in buckets:
        share = 100.0 * b["count"] / total
        n = round(bar * b["count"] / top) if b["count"] else 0
        lines.append(f"{indent} [{b['lo-us']:>7}, {b['hi-us']:>7}) {b['count']:>9} {share:6.2f}% {'#' * n}")
    return lines


# -- the per-interval log (NDJSON) ----------------------------------------------------------------------
def open_log(path: str, option: str = "--log") -> IO[str]:
    """Create *path* for an NDJSON log: owner-only (0600), never over anything that exists
    (kickcall changes only what it created), never through a symlink.  A refusal is a
    :class:`PathRefused` naming the path and *option*."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    except FileExistsError:
        kind = RefusalKind.SYMLINK if os.path.islink(path) else RefusalKind.EXISTS
        raise PathRefused(path, kind, f"exists; {option} never overwrites a file (choose a new name)") from None
    except OSError as e:
        raise PathRefused(path, RefusalKind.NO_ACCESS, f"{option}: cannot create the log: {e.strerror}") from None
    return os.fdopen(fd, "w", encoding="utf-8")


def write_record(f: IO[str], rec: dict) -> None:
    """One JSON object, one line, one write, flushed: a reader (``tail -f``, ``jq``) never sees
    half a line, and an interrupted run leaves only complete lines."""
    f.write(json.dumps(rec, separators=(",", ":")) + "\n")
    f.flush()


# -- a picture of the log2 histogram (SVG, standard library only) ---------------------------------------
def svg_log2(buckets: list[dict], title: str, width: int = 640, bar_h: int = 18) -> str:
    """The log2 histogram (:meth:`LatencyHistogram.log2_buckets`) as a horizontal bar chart in SVG:
    one ``<rect class="bar">`` per bucket (empty buckets in the range included, with zero width),
    its range in µs on the left, its count and share on the right."""
    total = sum(b["count"] for b in buckets)
    top = max((b["count"] for b in buckets), default=0)
    label_w, right_w, pad = 120, 130, 8
    plot_w = width - label_w - right_w - 2 * pad
    head = 28
    height = head + len(buckets) * (bar_h + 4) + pad
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
           f'viewBox="0 0 {width} {height}" font-family="monospace" font-size="12">',
           f"<title>{escape(title)}</title>",
           f'<rect x="0" y="0" width="{width}" height="{height}" fill="white"/>',
           f'<text x="{pad}" y="18" font-weight="bold">{escape(title)}</text>']
    for i, b in enumerate(buckets):
        y = head + i * (bar_h + 4)
        w = round(plot_w * b["count"] / top, 1) if top else 0
        share = 100.0 * b["count"] / total if total else 0.0
        out.append(f'<text x="{pad + label_w - 6}" y="{y + bar_h - 5}" text-anchor="end">'
                   f'[{b["lo-us"]}, {b["hi-us"]}) µs</text>')
        out.append(f'<rect class="bar" x="{pad + label_w}" y="{y}" width="{w}" height="{bar_h}" fill="#4a7ab5">'
                   f'<title>{b["count"]} ({share:.2f}%)</title></rect>')
        out.append(f'<text x="{pad + label_w + plot_w + 6}" y="{y + bar_h - 5}">{b["count"]} ({share:.2f}%)</text>')
    out.append("</svg>")
    return "\n".join(out) + "\n"
