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
