"""One of each concept (issue 9, item 2): source scans that fail when a concept gets a second
implementation in ``src/``.

Each concept has its own section below: a scanner (a pure function of a module's AST, so it can be
shown a planted duplicate) and test functions using it -- one asserting the tree holds exactly one
implementation and that its users import it, one proving the scanner finds a second one.  Add a new
concept (virtio-blk request type, ring offsets, chain walker, ...) as a new section of the same shape,
reusing ``src_modules()`` and ``imported_names()``.
"""

from __future__ import annotations

import ast
import functools
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

SRC = Path(__file__).resolve().parent.parent / "src"


# --- the source index shared by every concept ------------------------------------------------------

@dataclass(frozen=True)
class Module:
    name: str  # dotted, e.g. kickcall.peers.qemu
    path: Path
    tree: ast.Module

    @property
    def package(self) -> str:
        return self.name if self.path.name == "__init__.py" else self.name.rpartition(".")[0]


def parse_module(name: str, source: str, path: Path | None = None) -> Module:
    return Module(name, path or Path(name.replace(".", "/") + ".py"), ast.parse(source))


@functools.cache
def src_modules() -> tuple[Module, ...]:
    """Every module under src/, parsed once for all the scans."""
    out = []
    for p in sorted(SRC.rglob("*.py")):
        parts = list(p.relative_to(SRC).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out.append(parse_module(".".join(parts), p.read_text(), p))
    return tuple(out)


def imported_names(mod: Module) -> set[tuple[str, str]]:
    """(absolute module, name) for every ``from X import name`` in *mod*, relative imports resolved;
    (module, "") for ``import module``."""
    out: set[tuple[str, str]] = set()
    for node in ast.walk(mod.tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = mod.package.split(".")
                base = base[:len(base) - (node.level - 1)]
                absolute = ".".join(base + ([node.module] if node.module else []))
            else:
                absolute = node.module or ""
            out.update((absolute, a.name) for a in node.names)
        elif isinstance(node, ast.Import):
            out.update((a.name, "") for a in node.names)
    return out


def enclosing_scopes(tree: ast.AST) -> Iterator[tuple[ast.AST, list[ast.AST]]]:
    """Every node with the stack of classes and functions that contain it (outermost first)."""
    def walk(node: ast.AST, stack: list[ast.AST]) -> Iterator[tuple[ast.AST, list[ast.AST]]]:
        yield node, stack
        inner = stack + [node] if isinstance(node, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) else stack
        for child in ast.iter_child_nodes(node):
            yield from walk(child, inner)
    yield from walk(tree, [])


def owner_name(mod: Module, stack: list[ast.AST]) -> str:
    """The innermost class around a node (else its outermost function, else the module)."""
    scopes = [s for s in stack if isinstance(s, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))]
    classes = [s for s in scopes if isinstance(s, ast.ClassDef)]
    scope = classes[-1] if classes else (scopes[0] if scopes else None)
    return mod.name if scope is None else f"{mod.name}.{scope.name}"


# --- one synchronous QMP client: kickcall.monitor.client.QMPClient ---------------------------------

QMP_CLIENT = "kickcall.monitor.client.QMPClient"
QMP_CLIENT_MODULE, _, QMP_CLIENT_CLASS = QMP_CLIENT.rpartition(".")
_HAND_WRITTEN_COMMAND = re.compile(r'\{\s*"execute"\s*:')
_CLIENT_ANNOTATION = re.compile(r"\bQMP\b|QMP\w*Client")


def qmp_command_writers(mod: Module) -> set[str]:
    """Classes (or module-level functions) of *mod* that write a QMP command: a dict display with
    an ``"execute"`` key, ``dict(execute=...)``, ``msg["execute"] = ...``, or a hand-written
    ``{"execute": ...}`` string or bytes literal.  Reading a request's ``"execute"`` member (what a
    server does) is not writing one."""
    found = set()
    for node, stack in enclosing_scopes(mod.tree):
        hit = False
        if isinstance(node, ast.Dict):
            hit = any(isinstance(k, ast.Constant) and k.value == "execute" for k in node.keys)
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "dict":
            hit = any(k.arg == "execute" for k in node.keywords)
        elif isinstance(node, ast.Subscript) and isinstance(node.ctx, ast.Store):
            hit = isinstance(node.slice, ast.Constant) and node.slice.value == "execute"
        elif isinstance(node, ast.Constant) and isinstance(node.value, (str, bytes)):
            text = node.value.decode("latin-1") if isinstance(node.value, bytes) else node.value
            hit = bool(_HAND_WRITTEN_COMMAND.search(text))
        if hit:
            found.add(owner_name(mod, stack))
    return found


def _calls_execute_with_a_command(tree: ast.AST) -> bool:
    """Whether the code drives a monitor: ``x.execute("command-name", ...)`` on another object."""
    for node in ast.walk(tree):
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "execute"
                and node.args and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)
                and not (isinstance(node.func.value, ast.Name) and node.func.value.id == "self")):
            return True
    return False


def monitor_protocols(mod: Module) -> list[ast.ClassDef]:
    """``typing.Protocol`` classes of *mod* with an ``execute`` method: the module takes a monitor
    handed to it (QMPClient is what callers pass) instead of opening one."""
    out = []
    for node in ast.walk(mod.tree):
        if isinstance(node, ast.ClassDef) and any(
                (isinstance(b, ast.Name) and b.id == "Protocol") or (isinstance(b, ast.Attribute) and b.attr == "Protocol")
                for b in node.bases):
            if any(isinstance(f, ast.FunctionDef) and f.name == "execute" for f in node.body):
                out.append(node)
    return out


def needs_qmp_client(mod: Module) -> bool:
    """Whether *mod* opens or hands out QMP connections: a ``qmp()`` or ``open_qmp()`` function, a
    return annotation naming a QMP client (``QMP``, ``...Client``), a QMPClient construction, or commands executed on a monitor
    it did not receive through a Protocol."""
    for node in ast.walk(mod.tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            if node.name in ("qmp", "open_qmp"):
                return True
            if node.returns is not None and _CLIENT_ANNOTATION.search(ast.unparse(node.returns)):
                return True
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == QMP_CLIENT_CLASS:
            return True
    return _calls_execute_with_a_command(mod.tree) and not monitor_protocols(mod)


def test_exactly_one_qmp_client_in_src():
    writers = {w: m.name for m in src_modules() for w in qmp_command_writers(m)}
    assert set(writers) == {QMP_CLIENT}, (
        f"QMP commands are written outside {QMP_CLIENT}: {sorted(set(writers) - {QMP_CLIENT})}; "
        "use QMPClient (extend it if it lacks something)")


def test_every_module_that_needs_a_qmp_client_imports_qmpclient():
    users = [m for m in src_modules() if m.name != QMP_CLIENT_MODULE and needs_qmp_client(m)]
    # the peers' qmp(), qmp_quit and open_qmp, kickcall shell and diagnose at least
    assert {"kickcall.peers.qemu", "kickcall.peers.qsd", "kickcall.peers.qtest", "kickcall.monitor.shell",
            "kickcall.diagnose.run"} <= {m.name for m in users}, [m.name for m in users]
    missing = [m.name for m in users if (QMP_CLIENT_MODULE, QMP_CLIENT_CLASS) not in imported_names(m)]
    assert not missing, f"these modules use a QMP client without importing {QMP_CLIENT}: {missing}"


def test_monitor_protocols_are_met_by_qmpclient():
    """A module that takes its monitor through a Protocol gets a QMPClient from its caller: every
    method the Protocol names exists on QMPClient, with the Protocol's parameters."""
    import inspect

    from kickcall.monitor.client import QMPClient

    protocols = [(m, p) for m in src_modules() for p in monitor_protocols(m)]
    assert protocols, "the diagnose samplers take their monitor as a Protocol"
    for mod, proto in protocols:
        for f in proto.body:
            if isinstance(f, ast.FunctionDef):
                assert hasattr(QMPClient, f.name), f"{mod.name}.{proto.name}.{f.name}"
                have = inspect.signature(getattr(QMPClient, f.name)).parameters
                for a in f.args.args[1:] + f.args.kwonlyargs:
                    assert a.arg in have, f"{mod.name}.{proto.name}.{f.name}({a.arg}) is not on QMPClient"


def test_no_qmp_client_other_than_qmpclient_is_exported():
    import kickcall.peers
    import kickcall.peers.qemu

    for m in (kickcall.peers, kickcall.peers.qemu):
        assert not hasattr(m, "QMP") and not hasattr(m, "QMPError"), m.__name__


# the second clients the scans must find (the one removed from peers/qemu.py, and smaller ones)
PLANTED_CLIENTS = {
    "dict display": '''
class QMP:
    def execute(self, command, arguments=None):
        msg = {"execute": command}
        self.sock.sendall(json.dumps(msg).encode() + b"\\r\\n")
''',
    "subscript": '''
def send(sock, command):
    msg = {}
    msg["execute"] = command
    sock.sendall(json.dumps(msg).encode())
''',
    "dict call": '''
class Mon:
    def run(self, c):
        self.f.write(json.dumps(dict(execute=c)))
''',
    "hand-written bytes": '''
class Quitter:
    def quit(self):
        self.s.sendall(b'{"execute": "quit"}\\r\\n')
''',
}


def test_qmp_client_scan_finds_a_second_client():
    for what, source in PLANTED_CLIENTS.items():
        mod = parse_module("kickcall.planted", source)
        assert qmp_command_writers(mod), what
    # and a server reading a request's "execute" member is not a client
    server = parse_module("kickcall.srv", '''
class Server:
    def handle(self, obj):
        if "execute" not in obj:
            raise ValueError("QMP input lacks member 'execute'")
        return self.dispatch(obj["execute"], obj.get("arguments", {}))
''')
    assert qmp_command_writers(server) == set()


def test_qmp_user_scan_finds_a_module_that_does_not_import_qmpclient():
    mod = parse_module("kickcall.peers.other", '''
from .somewhere import Client

class Other:
    def qmp(self) -> Client:
        return Client(self.path)
''')
    assert needs_qmp_client(mod)
    assert (QMP_CLIENT_MODULE, QMP_CLIENT_CLASS) not in imported_names(mod)
    good = parse_module("kickcall.peers.other", "from ..monitor.client import QMPClient\n")
    assert (QMP_CLIENT_MODULE, QMP_CLIENT_CLASS) in imported_names(good)


# --- one driver-side virtio-blk request: kickcall.guest.blk_request.BlkRequest ---------------------
#
# The request header ``struct virtio_blk_outhdr {le32 type; le32 ioprio; le64 sector}`` is laid
# out once, by the device side (kickcall.virtio.blk.HDR); on the driver side one request type
# builds it (BlkRequest.prepare) and one path puts it on a ring and completes it
# (submit_requests, complete_requests), imported by both front-ends: the guest driver and the
# VM-less vhost-user front-end.

BLK_REQUEST = "kickcall.guest.blk_request.BlkRequest"
BLK_REQUEST_MODULE, _, BLK_REQUEST_CLASS = BLK_REQUEST.rpartition(".")
BLK_HDR_MODULE, BLK_HDR_NAME = "kickcall.virtio.blk", "HDR"
BLK_FRONT_ENDS = ("kickcall.guest.virtio_blk", "kickcall.drive.vhost_user_blk")
BLK_PATH = ("BlkRequest", "submit_requests", "complete_requests")

# Drivers that cannot use the shared path, each with the reason.  Listed, not silently skipped:
# test_blk_known_exceptions_are_still_real fails once one of them stops building its own header,
# so the entry goes with it.
BLK_HEADER_KNOWN = {
    "kickcall.peers.qtest.VirtioBlkQtestDriver":
        "drives QEMU's virtio-blk over qtest: guest RAM is reached by qtest memwrite, not mapped, so "
        "the shared path's Vring cannot serve it; it packs kickcall.virtio.blk.HDR itself into a "
        "qtest write",
    "kickcall.bench.minimal_frontend":
        "the bench's yardstick of vhost-user-test's own cost: the least Python per request a front-end "
        "can do (descriptors written once, one header store per request), so it cannot go through the "
        "shared request path whose cost it measures; it packs kickcall.virtio.blk.HDR itself",
}

_STRUCT_CALLS = {"Struct", "pack", "pack_into", "calcsize", "unpack", "unpack_from", "iter_unpack"}


def _expand_format(fmt: str) -> str:
    """A struct format without its byte-order mark and with counts expanded ('<2IQ' -> 'IIQ'); 'L'
    is 'I' with standard sizes."""
    fmt = fmt.lstrip("@=<>!").replace(" ", "")
    out, count = [], ""
    for ch in fmt:
        if ch.isdigit():
            count += ch
            continue
        out.append(("I" if ch == "L" else ch) * (int(count) if count and ch not in "sp" else 1))
        count = ""
    return "".join(out)


def is_blk_outhdr_format(fmt: str) -> bool:
    """Whether a struct format is virtio_blk_outhdr's layout -- two 32-bit words, one 64-bit --
    alone or with the status byte after it (vhost-user's ``IIQQQQ`` vring address is not one)."""
    return _expand_format(fmt) in ("IIQ", "IIQB")


def blk_header_layouts(mod: Module) -> set[str]:
    """Owners (class, else function, else module) in *mod* of a struct format that lays out a
    virtio-blk request header: ``struct.Struct/pack/pack_into(...)`` with the format 'IIQ' or
    'IIQB' (any byte order, counts expanded)."""
    found = set()
    for node, stack in enclosing_scopes(mod.tree):
        if (isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant)
                and isinstance(node.args[0].value, str)):
            f = node.func
            name = f.attr if isinstance(f, ast.Attribute) else f.id if isinstance(f, ast.Name) else ""
            if name in _STRUCT_CALLS and is_blk_outhdr_format(node.args[0].value):
                found.add(owner_name(mod, stack))
    return found


def _blk_hdr_aliases(mod: Module) -> set[str]:
    """Names under which *mod* holds a virtio-blk header struct: the device side's (``from
    ..virtio.blk import HDR [as X]``, or ``HDR`` itself in kickcall.virtio.blk), or one of its own
    (``X = struct.Struct("<IIQ")``)."""
    names = {BLK_HDR_NAME} if mod.name == BLK_HDR_MODULE else set()
    for node in ast.walk(mod.tree):
        if (isinstance(node, ast.Assign) and isinstance(node.value, ast.Call) and node.value.args
                and isinstance(node.value.args[0], ast.Constant) and isinstance(node.value.args[0].value, str)
                and is_blk_outhdr_format(node.value.args[0].value)):
            names.update(t.id for t in node.targets if isinstance(t, ast.Name))
        if isinstance(node, ast.ImportFrom):
            base = mod.package.split(".")
            base = base[:len(base) - (node.level - 1)] if node.level else []
            absolute = ".".join(base + ([node.module] if node.module else [])) if node.level else node.module
            if absolute == BLK_HDR_MODULE:
                names.update(a.asname or a.name for a in node.names if a.name == BLK_HDR_NAME)
    return names


def blk_header_builders(mod: Module) -> set[str]:
    """Owners in *mod* that build a virtio-blk request header: they pack the device side's header
    struct (``HDR.pack``/``pack_into`` under any alias) or lay one out themselves."""
    aliases = _blk_hdr_aliases(mod)
    found = set(blk_header_layouts(mod))
    for node, stack in enclosing_scopes(mod.tree):
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                and node.func.attr in ("pack", "pack_into") and isinstance(node.func.value, ast.Name)
                and node.func.value.id in aliases):
            found.add(owner_name(mod, stack))
    return found


def test_the_blk_request_header_is_laid_out_once():
    layouts = {o: m.name for m in src_modules() for o in blk_header_layouts(m)}
    assert set(layouts) - set(BLK_HEADER_KNOWN) == {BLK_HDR_MODULE}, (
        f"a virtio-blk request header is laid out outside {BLK_HDR_MODULE}.{BLK_HDR_NAME}: "
        f"{sorted(set(layouts) - set(BLK_HEADER_KNOWN) - {BLK_HDR_MODULE})}")


def test_exactly_one_driver_side_blk_request_builds_the_header():
    builders = {o for m in src_modules() for o in blk_header_builders(m)}
    builders -= {BLK_HDR_MODULE}  # the definition itself
    assert builders - set(BLK_HEADER_KNOWN) == {BLK_REQUEST}, (
        f"virtio-blk request headers are built outside {BLK_REQUEST}: "
        f"{sorted(builders - set(BLK_HEADER_KNOWN) - {BLK_REQUEST})}; use it (and submit_requests / "
        "complete_requests) instead")


def test_blk_known_exceptions_are_still_real():
    builders = {o for m in src_modules() for o in blk_header_builders(m)}
    stale = set(BLK_HEADER_KNOWN) - builders
    assert not stale, f"no longer builds its own virtio-blk header, drop it from BLK_HEADER_KNOWN: {sorted(stale)}"


def test_both_blk_front_ends_import_the_shared_request_path():
    mods = {m.name: m for m in src_modules()}
    for fe in BLK_FRONT_ENDS:
        have = imported_names(mods[fe])
        missing = [n for n in BLK_PATH if (BLK_REQUEST_MODULE, n) not in have]
        assert not missing, f"{fe} does not import {missing} from {BLK_REQUEST_MODULE}"
        classes = [n.name for n in ast.walk(mods[fe].tree) if isinstance(n, ast.ClassDef)]
        assert not [c for c in classes if "Req" in c], f"{fe} defines a request class of its own: {classes}"


def test_both_blk_front_ends_use_one_request_class_at_run_time():
    from kickcall.drive import vhost_user_blk
    from kickcall.guest import blk_request, virtio_blk

    assert virtio_blk.BlkRequest is blk_request.BlkRequest is vhost_user_blk.BlkRequest
    assert not hasattr(vhost_user_blk, "Req")  # the front-end's own request record is gone
    import kickcall.virtio.blk as device

    assert blk_request.BLK_OUTHDR is device.HDR


# the request types the two front-ends had before they shared one, and smaller variants
PLANTED_BLK_REQUESTS = {
    "the front-end's dataclass and header": '''
import struct
from dataclasses import dataclass
HDR = struct.Struct("<IIQ")

@dataclass(eq=False)
class Req:
    type: int
    sector: int
''',
    "a local header struct packed in a method": '''
import struct
HDR = struct.Struct("<IIQ")

class VhostUserBlkDriver:
    def submit(self, r, rtype, sector):
        self.mem.write(r.hdr, HDR.pack(rtype, 0, sector))
''',
    "the guest driver's prepare()": '''
from ..virtio.blk import HDR

class VirtioBlkDriver:
    def prepare(self, req, rtype, sector, nbytes):
        self.k.memory.write(req.hdr, HDR.pack(rtype, 0, sector))
''',
    "an alias, pack_into": '''
from kickcall.virtio.blk import HDR as H

def publish(mm, off, sector):
    H.pack_into(mm, off, 0, 0, sector)
''',
    "a hand-written format with counts": '''
import struct

class Other:
    def hdr(self, t, s):
        return struct.pack("=2I Q B", t, 0, s, 0xFF)
''',
}


def test_blk_request_scan_finds_a_second_builder():
    for what, source in PLANTED_BLK_REQUESTS.items():
        mod = parse_module("kickcall.drive.planted", source)
        assert blk_header_builders(mod), what
    local = parse_module("kickcall.drive.planted", PLANTED_BLK_REQUESTS["a local header struct packed in a method"])
    assert "kickcall.drive.planted.VhostUserBlkDriver" in blk_header_builders(local)
    # reading a header (what the device does) or another protocol's header is not building one
    other = parse_module("kickcall.vhost_user.x", '''
import struct
HDR = struct.Struct("=III")
from ..virtio.blk import HDR as BLK

def parse(b):
    return BLK.unpack(b), HDR.pack(1, 2, 3)
''')
    assert blk_header_builders(other) == set()
    assert is_blk_outhdr_format("<IIQ") and is_blk_outhdr_format("<LLQ") and is_blk_outhdr_format("<IIQB")
    assert not is_blk_outhdr_format("=IIQQQQ") and not is_blk_outhdr_format("=QHHHH")


def test_blk_front_end_scan_finds_a_front_end_without_the_shared_path():
    mod = parse_module("kickcall.drive.vhost_user_blk", "from ..guest.virtio_ring import Vring\n")
    assert (BLK_REQUEST_MODULE, "BlkRequest") not in imported_names(mod)
    good = parse_module("kickcall.drive.vhost_user_blk",
                        "from ..guest.blk_request import BlkRequest, complete_requests, submit_requests\n")
    assert {(BLK_REQUEST_MODULE, n) for n in BLK_PATH} <= imported_names(good)
