"""The package's layers, as docs/architecture.md lists them: no package imports one above it.

An AST scan of every ``import`` and ``from ... import`` in src/kickcall (relative imports
resolved, imports inside functions and under ``TYPE_CHECKING`` included: a lazy import still
couples two layers).  The order below is the documented one; a new package must be placed in it.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parent.parent / "src" / "kickcall"

# bottom up; a package may import its own layer's modules and anything below
LAYERS: list[tuple[str, ...]] = [
    ("__init__", "faults", "trace", "ownership", "child", "counters"),  # leaf utilities: import nothing of kickcall's above
    ("threads", "crash"),
    ("metrics",),  # the Prometheus exporter: counters documents in, text out (kickcall.counters, kickcall.threads)
    ("notify",),
    ("loop",),
    ("memory",),
    ("hv",),
    ("pci",),
    ("virtio",),
    ("vhost_user",),
    ("vfio",),
    ("guest",),
    ("drive",),
    ("monitor",),
    ("peers",),
    ("diagnose",),
    ("machine",),
    ("apps",),
    ("bench", "bench_vfio", "bench_scale"),
    ("cli",),
    ("__main__",),
]
RANK = {name: i for i, names in enumerate(LAYERS) for name in names}


def unit_of(path: Path) -> str:
    """The layer unit a file belongs to: its top-level package, or the module itself."""
    rel = path.relative_to(SRC).with_suffix("")
    return rel.parts[0]


def imported_units(path: Path, source: str | None = None) -> list[tuple[int, str]]:
    """(line, unit) of every kickcall unit *path* imports."""
    rel = list(path.relative_to(SRC).with_suffix("").parts)
    pkg = rel[:-1]  # the package the module is in (relative imports start here)
    if rel[-1] == "__init__":
        pkg = rel[:-1]
    out = []
    tree = ast.parse(source if source is not None else path.read_text())
    for n in ast.walk(tree):
        if isinstance(n, ast.ImportFrom):
            if n.level:
                base = pkg[:len(pkg) - (n.level - 1)] if n.level > 1 else pkg
                target = base + (n.module.split(".") if n.module else [])
                if target:
                    out.append((n.lineno, target[0]))
                else:  # from . import x (at the package root): each name is a unit
                    out.extend((n.lineno, a.name) for a in n.names)
            elif n.module and (n.module == "kickcall" or n.module.startswith("kickcall.")):
                parts = n.module.split(".")
                if len(parts) > 1:
                    out.append((n.lineno, parts[1]))
                else:
                    out.extend((n.lineno, a.name) for a in n.names)
        elif isinstance(n, ast.Import):
            for a in n.names:
                if a.name.startswith("kickcall."):
                    out.append((n.lineno, a.name.split(".")[1]))
    return out


def violations(files: list[Path]) -> list[str]:
    bad = []
    for p in files:
        me = unit_of(p)
        if me not in RANK:
            bad.append(f"{p.relative_to(SRC)}: {me} is in no layer of tests/test_layers.py (and docs/architecture.md)")
            continue
        for line, u in imported_units(p):
            if u == me:
                continue
            if u == "__version__":  # from .. import __version__: the package root
                u = "__init__"
            if u not in RANK:
                bad.append(f"{p.relative_to(SRC)}:{line}: imports {u}, which is in no layer")
            elif RANK[u] > RANK[me]:
                bad.append(f"{p.relative_to(SRC)}:{line}: {me} imports {u}, a layer above it")
    return bad


def test_no_package_imports_one_above_it():
    files = sorted(SRC.rglob("*.py"))
    assert len(files) > 60
    assert violations(files) == []


def test_every_package_is_in_a_layer_and_the_doc_lists_the_same_order():
    units = {unit_of(p) for p in SRC.rglob("*.py")}
    assert units <= set(RANK), sorted(units - set(RANK))
    doc = (SRC.parent.parent / "docs" / "architecture.md").read_text()
    # the doc's layer table lists every package under its kickcall.NAME, in this order
    named = [u for names in LAYERS for u in names if not u.startswith("__")]
    positions = [doc.find(f"`kickcall.{u}`") for u in named]
    assert all(p >= 0 for p in positions), [u for u, p in zip(named, positions, strict=True) if p < 0]
    ranks_in_doc = [RANK[u] for _, u in sorted(zip(positions, named, strict=True))]
    assert ranks_in_doc == sorted(ranks_in_doc), "docs/architecture.md lists the layers in another order"


@pytest.mark.parametrize("src,unit,expect", [
    ("from ..machine import Machine\n", "virtio/x.py", "virtio imports machine"),
    ("import kickcall.cli\n", "memory.py", "memory imports cli"),
    ("def f():\n    from ..apps import vhost_user_blk\n", "vhost_user/x.py", "vhost_user imports apps"),
])
def test_the_scan_catches_an_upward_import(tmp_path, monkeypatch, src, unit, expect):
    """A planted upward import (module level, absolute, or lazy inside a function) is reported."""
    fake = SRC / unit
    got = [f"{unit_of(fake)} imports {u}" for _, u in imported_units(fake, src) if RANK.get(u, -1) > RANK[unit_of(fake)]]
    assert got == [expect]
