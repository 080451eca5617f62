"""There is one descriptor chain walker: ``kickcall.virtio.queue.walk_chain``.

The device's ``pop()`` and the monitors' ``x-query-virtio-queue-element`` (through
``VirtQueue.describe_chain``) both use it, so a monitor can no longer show a chain the device would
refuse as if it were fine (the monitors used to have their own, non-validating walker,
``ring.describe_chain``).

A source scan (ast) proves it: outside ``virtio/queue.py`` no module of src/kickcall

* reads a descriptor of the split ring (``DESC.unpack``/``unpack_from`` of the layout's ``struct
  vring_desc``, or a memory read at ``desc_addr(...)``), or
* tests a descriptor's NEXT/WRITE/INDIRECT flag (``flags & VRING_DESC_F_NEXT``: what following or
  classifying a chain takes).

One exception, for reads only: the guest driver (``guest/virtio_ring.py``) reads back the ``next``
field of descriptors *it* owns to keep its free list (Linux's ``virtqueue_add_split`` /
``detach_buf_split``) -- a driver's bookkeeping of its own table, not a walk of a chain a peer
wrote.  The scanner is shown to catch the walkers the tree used to have and to leave look-alikes
(the inflight region's own ``DESC`` struct, building a chain with ``|``) alone.
"""

from __future__ import annotations

import ast
import pathlib

import pytest

SRC = pathlib.Path(__file__).resolve().parent.parent / "src" / "kickcall"
WALKER = "virtio/queue.py"
RING_MODULES = {"kickcall.virtio.layout", "kickcall.virtio.ring"}
FLAG_NAMES = {"VRING_DESC_F_NEXT", "VRING_DESC_F_WRITE", "VRING_DESC_F_INDIRECT"}
UNPACKERS = {"unpack", "unpack_from", "iter_unpack"}
# module -> the findings it may have, and why
ALLOWED: dict[str, tuple[set[str], str]] = {
    WALKER: ({"reads a descriptor", "tests a descriptor flag"}, "the one chain walker"),
    "guest/virtio_ring.py": ({"reads a descriptor"},
                             "the driver's free list: it reads back `next` of descriptors it owns"),
}


def _package(rel: str) -> list[str]:
    """The package of the module at *rel* (relative to src/kickcall), as name parts."""
    return ["kickcall"] + rel.split("/")[:-1]


def _resolve(node: ast.ImportFrom, rel: str) -> str:
    if not node.level:
        return node.module or ""
    base = _package(rel)[:len(_package(rel)) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


class _Scan(ast.NodeVisitor):
    def __init__(self, rel: str) -> None:
        self.rel = rel
        self.desc_struct: set[str] = set()  # local names of the ring's DESC
        self.flags: set[str] = set()  # local names of the descriptor flags
        self.desc_addr: set[str] = set()  # local names of layout.desc_addr
        self.modules: set[str] = set()  # local names of kickcall.virtio.layout / .ring
        self.found: list[tuple[int, str]] = []

    # -- what names mean ----------------------------------------------------------------------------
    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        mod = _resolve(node, self.rel)
        for a in node.names:
            local = a.asname or a.name
            if mod in RING_MODULES:
                if a.name == "DESC":
                    self.desc_struct.add(local)
                elif a.name in FLAG_NAMES:
                    self.flags.add(local)
                elif a.name == "desc_addr":
                    self.desc_addr.add(local)
            elif f"{mod}.{a.name}" in RING_MODULES:
                self.modules.add(local)

    def visit_Import(self, node: ast.Import) -> None:
        for a in node.names:
            if a.name in RING_MODULES:
                self.modules.add(a.asname or a.name)

    def _is(self, node: ast.AST, names: set[str], attrs: set[str]) -> bool:
        if isinstance(node, ast.Name):
            return node.id in names
        if isinstance(node, ast.Attribute) and node.attr in attrs:
            return ast.unparse(node.value) in self.modules
        return False

    # -- what is done with them ---------------------------------------------------------------------
    def visit_Call(self, node: ast.Call) -> None:
        f = node.func
        if isinstance(f, ast.Attribute) and f.attr in UNPACKERS and self._is(f.value, self.desc_struct, {"DESC"}):
            self.found.append((node.lineno, "reads a descriptor"))
        name = f.attr if isinstance(f, ast.Attribute) else f.id if isinstance(f, ast.Name) else ""
        if name.startswith(("read", "memread")):
            for arg in node.args:
                if any(isinstance(n, ast.Call) and self._is(n.func, self.desc_addr, {"desc_addr"})
                       for n in ast.walk(arg)):
                    self.found.append((node.lineno, "reads a descriptor"))
        self.generic_visit(node)

    def visit_BinOp(self, node: ast.BinOp) -> None:
        if isinstance(node.op, ast.BitAnd) and any(self._is(x, self.flags, FLAG_NAMES) for x in (node.left, node.right)):
            self.found.append((node.lineno, "tests a descriptor flag"))
        self.generic_visit(node)


def chain_walking(source: str, rel: str) -> list[tuple[int, str]]:
    """(line, what) for each place the module at *rel* reads a ring descriptor or tests its flags."""
    s = _Scan(rel)
    s.visit(ast.parse(source))
    return sorted(s.found)


def _modules() -> list[tuple[str, pathlib.Path]]:
    return [(p.relative_to(SRC).as_posix(), p) for p in sorted(SRC.rglob("*.py"))]


def test_only_the_queue_module_walks_descriptor_chains() -> None:
    mods = _modules()
    assert len(mods) > 50 and WALKER in dict(mods)
    bad = [f"{rel}:{line}: {what}"
           for rel, p in mods
           for line, what in chain_walking(p.read_text(), rel)
           if what not in ALLOWED.get(rel, (set(), ""))[0]]
    assert not bad, "descriptor chains walked outside kickcall.virtio.queue (use VirtQueue.describe_chain " \
                    "or walk_chain):\n" + "\n".join(bad)


def test_the_scan_sees_the_walker_itself() -> None:
    """The scanner finds the real walker (so a blind scanner cannot pass the test above)."""
    found = {what for _line, what in chain_walking((SRC / WALKER).read_text(), WALKER)}
    assert found == {"reads a descriptor", "tests a descriptor flag"}
    driver = {what for _l, what in chain_walking((SRC / "guest/virtio_ring.py").read_text(), "guest/virtio_ring.py")}
    assert driver == {"reads a descriptor"}, "the allowance for the driver's free list is still needed"


# What the tree used to have (the monitors' own walker, and the device's walker had it been copied).
BEFORE = {
    "ring.describe_chain (virtio/ring.py)": ("virtio/ring.py", '''
from .layout import DESC, DESC_SIZE, desc_addr
VRING_DESC_F_NEXT = 1
def describe_chain(mem, desc, num, head, limit=256):
    i, table, tlen = head, desc, num
    while True:
        addr, length, flags, nxt = DESC.unpack(mem.read(desc_addr(table, i), DESC_SIZE))
        if not flags & VRING_DESC_F_NEXT or nxt >= tlen:
            break
        i = nxt
'''),
    "a monitor reading one descriptor's next field": ("machine/monitor.py", '''
from ..virtio.layout import desc_addr
def next_of(mem, q, i):
    return mem.read_u16(desc_addr(q.desc, i) + 14)
'''),
    "the walker copied, through the layout module": ("apps/backend_monitor.py", '''
from ..virtio import layout as L
from ..virtio.ring import VRING_DESC_F_INDIRECT as IND
def walk(tmm, toff, i):
    addr, length, flags, nxt = L.DESC.unpack_from(tmm, toff + L.DESC_SIZE * i)
    return flags & IND
'''),
    "absolute imports": ("diagnose/x.py", '''
import kickcall.virtio.layout
from kickcall.virtio.ring import VRING_DESC_F_WRITE
def f(b, flags):
    return kickcall.virtio.layout.DESC.unpack(b), VRING_DESC_F_WRITE & flags
'''),
}

UNRELATED = {
    "the inflight region's own DESC struct": ("vhost_user/inflight.py", '''
import struct
DESC = struct.Struct("=B5xHQ")
def f(mm, o):
    return DESC.unpack_from(mm, o)
'''),
    "a driver building a chain (flags set with |)": ("peers/qtest.py", '''
from ..virtio.layout import DESC, desc_addr
from ..virtio.ring import VRING_DESC_F_NEXT, VRING_DESC_F_WRITE
def put(qt, d, h, a):
    chain = DESC.pack(a, 16, VRING_DESC_F_NEXT, h + 1) + DESC.pack(a, 1, VRING_DESC_F_WRITE, 0)
    qt.memwrite(desc_addr(d, h), chain)
'''),
    "another struct's unpack": ("virtio/blk.py", '''
from .layout import USED_ELEM
def f(b):
    return USED_ELEM.unpack(b)
'''),
    "the monitors now": ("machine/monitor.py", '''
def queue_element(self, q, head):
    chain = q.describe_chain(head, mem=self.m.memory)
    return chain.qmp_descs()
'''),
}


@pytest.mark.parametrize("name", list(BEFORE))
def test_scanner_catches_the_walkers_the_tree_had(name: str) -> None:
    rel, src = BEFORE[name]
    assert chain_walking(src, rel), f"the scan misses {name}"


@pytest.mark.parametrize("name", list(UNRELATED))
def test_scanner_leaves_look_alikes_alone(name: str) -> None:
    rel, src = UNRELATED[name]
    assert chain_walking(src, rel) == []


def test_the_monitors_describe_chains_through_the_queue() -> None:
    """Both monitors build QEMU's VirtioQueueElement with VirtQueue.queue_element, and that goes
    through describe_chain (the device's walker)."""
    import inspect
    import textwrap

    from kickcall.virtio import queue, ring

    assert not hasattr(ring, "describe_chain")
    assert hasattr(queue.VirtQueue, "describe_chain") and hasattr(queue, "walk_chain")
    qe = ast.parse(textwrap.dedent(inspect.getsource(queue.VirtQueue.queue_element)))
    assert any(isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute) and n.func.attr == "describe_chain"
               for n in ast.walk(qe)), "VirtQueue.queue_element no longer walks through describe_chain"
    for rel in ("machine/monitor.py", "apps/backend_monitor.py"):
        calls = [n for n in ast.walk(ast.parse((SRC / rel).read_text()))
                 if isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute) and n.func.attr == "queue_element"
                 and not (isinstance(n.func.value, ast.Name) and n.func.value.id == "self")]
        assert calls, f"{rel} no longer builds its queue element through VirtQueue.queue_element"
