"""Completion latencies as fio reports them: a percentile ladder and a log2 histogram.

Every latency goes into a log-linear histogram (64 buckets per power of two of nanoseconds, so a
percentile is within 1/64 of the value, ~1.6 %, as fio's ``clat percentiles`` are) and into a log2
histogram of microseconds (``[0,1) [1,2) [2,4) ...`` µs, fio's ``lat (usec)`` distribution).  Memory
is bounded whatever the run's length; nothing is sampled away.
"""

from __future__ import annotations

import threading

__all__ = ["LatencyHistogram", "LADDER", "ladder_key", "format_ladder", "format_log2"]

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


def format_ladder(ladder: dict[str, float], indent: str = "    ") -> list[str]:
    """fio's ``clat percentiles (usec):`` block, four to a line."""
    cells = [f"{float(k):5.2f}th=[{v:>7.0f}]" for k, v in ladder.items()]
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
