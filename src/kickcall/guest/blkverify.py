"""What a block workload may read back, and exactly where a read differs from it.

Every block a workload writes carries a header (magic ``KCBK``, block number, generation, CRC32
of the payload) and a payload derived from (block, generation).  What a block may hold when it is
read is the set of generations written to it in this run that may be on disk (the last one
completed, plus any still in flight), or -- if nothing was written to it yet in this run -- its
*initial content*, which depends on where the image came from:

* ``labels``: an image kickcall created: the first ``labelled`` bytes carry kickcall's sector
  labels, the rest is sparse and reads as zeros;
* ``file``: an image the user named: its content before the run, read from the image file itself
  (the reference; the workload never wrote those blocks, and the image lock keeps other writers
  away);
* ``unknown``: an external back-end's image, whose content nobody told us: the first read of a
  block is remembered, and every later read must return the same bytes until the workload writes.

Nothing is ever assumed about content kickcall did not write or create.  A mismatch is reported
per 512-byte sector against the closest acceptable content, so a single flipped byte on disk is
named as exactly its sector.
"""

from __future__ import annotations

import os
import random
import struct
import threading
import zlib
from typing import Any

__all__ = ["BLK_MAGIC", "BHDR", "SECTOR", "block_content", "initial_block", "BlockVerifier", "InitialContent"]

BLK_MAGIC = b"KCBK"
BHDR = struct.Struct("<4sQQI")  # magic, block, generation, crc32(payload)
SECTOR = 512
MAX_SECTORS_REPORTED = 4


def label(sector: int) -> bytes:
    return (b"SECTOR%010d" % sector).ljust(SECTOR, b".")


def initial_block(block: int, bs: int) -> bytes:
    """What an image kickcall created and labelled holds at *block* before anyone writes."""
    first = block * bs // SECTOR
    return b"".join(label(s) for s in range(first, first + bs // SECTOR))


def block_content(block: int, gen: int, bs: int) -> bytes:
    """What generation *gen* of *block* holds (header + payload)."""
    payload = random.Random(block * 1_000_003 + gen).randbytes(bs - BHDR.size)
    return BHDR.pack(BLK_MAGIC, block, gen, zlib.crc32(payload)) + payload


class InitialContent:
    """The content of a block before this run wrote it; ``None`` when it cannot be known."""

    def __init__(self, spec: dict[str, Any] | None, bs: int) -> None:
        spec = spec or {"kind": "unknown"}
        self.kind = str(spec.get("kind", "unknown"))
        self.bs = bs
        self.labelled = int(spec.get("labelled", 0))
        self.fd = -1
        if self.kind == "file":
            # the reference copy: opened read-only, never written, no lock (the device holds it)
            self.fd = os.open(str(spec["path"]), os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
        elif self.kind not in ("labels", "unknown"):
            raise ValueError(f"unknown initial content kind {self.kind!r}")

    def describe(self) -> str:
        return {"labels": "kickcall's label", "file": "the image's content before this run",
                "unknown": "what the first read returned"}[self.kind]

    def get(self, block: int) -> bytes | None:
        off = block * self.bs
        if self.kind == "labels":
            if off + self.bs <= self.labelled:
                return initial_block(block, self.bs)
            if off >= self.labelled:
                return bytes(self.bs)
            first = block * self.bs // SECTOR
            return b"".join(label(s) if (s + 1) * SECTOR <= self.labelled else bytes(SECTOR)
                            for s in range(first, first + self.bs // SECTOR))
        if self.kind == "file":
            data = os.pread(self.fd, self.bs, off)
            return data.ljust(self.bs, b"\0")
        return None

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class BlockVerifier:
    """The acceptable contents of every block, and the checks of reads against them.

    Generation 0 stands for the block's initial content.  ``write_submitted`` before a write is
    queued (the block may then hold either), ``write_completed`` once it completed (it holds only
    that one); ``check_read`` returns the errors of one read, ``[]`` when it is acceptable.
    """

    def __init__(self, bs: int, initial: InitialContent) -> None:
        self.bs = bs
        self.initial = initial
        self.acceptable: dict[int, set[int]] = {}
        self.first_read: dict[int, bytes] = {}
        self._mu = threading.Lock()

    def written_blocks(self) -> list[int]:
        with self._mu:
            return sorted(b for b, acc in self.acceptable.items() if acc - {0})

    def write_submitted(self, block: int, gen: int) -> None:
        with self._mu:
            self.acceptable.setdefault(block, {0}).add(gen)

    def write_completed(self, block: int, gen: int) -> None:
        with self._mu:
            self.acceptable[block] = {gen}
            self.first_read.pop(block, None)

    def check_read(self, block: int, data: bytes) -> list[str]:
        with self._mu:
            acc = set(self.acceptable.get(block, {0}))
        candidates: list[tuple[str, bytes]] = []
        for g in sorted(acc - {0}):
            candidates.append((f"generation {g} written in this run", block_content(block, g, self.bs)))
        if 0 in acc:
            init = self.initial.get(block)
            if init is None:
                with self._mu:
                    init = self.first_read.setdefault(block, bytes(data))
            candidates.append((self.initial.describe(), init))
        for _what, want in candidates:
            if data == want:
                return []
        return self._differences(block, data, candidates)

    def _differences(self, block: int, data: bytes, candidates: list[tuple[str, bytes]]) -> list[str]:
        best: tuple[list[int], str] | None = None
        for what, want in candidates:
            bad = [i for i in range(0, self.bs, SECTOR) if data[i:i + SECTOR] != want[i:i + SECTOR]]
            if best is None or len(bad) < len(best[0]):
                best = (bad, what)
        assert best is not None
        bad, what = best
        first = block * self.bs // SECTOR
        out = []
        for i in bad[:MAX_SECTORS_REPORTED]:
            want = dict(candidates)[what]
            byte = next(j for j in range(i, i + SECTOR) if data[j] != want[j])
            out.append(f"sector {first + i // SECTOR} (block {block}, first differing byte {byte - i}): "
                       f"differs from {what}")
        if len(bad) > MAX_SECTORS_REPORTED:
            out.append(f"block {block}: {len(bad) - MAX_SECTORS_REPORTED} more sectors differ from {what}")
        return out
