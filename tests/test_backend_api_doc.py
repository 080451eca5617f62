"""docs/backend-api.md is true: its worked example serves a real front-end over a real socket,
and every ``kickcall.`` name it lists exists in the package."""

from __future__ import annotations

import importlib
import os
import re

from test_backend_errors import MiniDriver

from kickcall.vhost_user.backend import VhostUserBackend

BACKEND = "kickcall.vhost_user.backend.VhostUserBackend"
DOC = os.path.join(os.path.dirname(__file__), "..", "docs", "backend-api.md")


def _doc() -> str:
    with open(DOC) as f:
        return f.read()


def _example() -> str:
    blocks = re.findall(r"```python\n(.*?)```", _doc(), re.S)
    assert len(blocks) == 1, "the document has one worked example"
    return blocks[0]


def _resolve(dotted: str) -> object:
    parts = dotted.split(".")
    for i in range(len(parts), 0, -1):  # the longest importable module, then attributes
        try:
            obj: object = importlib.import_module(".".join(parts[:i]))
        except ImportError:
            continue
        for attr in parts[i:]:
            obj = getattr(obj, attr)
        return obj
    raise ImportError(dotted)


def test_every_name_the_document_lists_exists():
    names = sorted(set(re.findall(r"`(kickcall(?:\.\w+)+)`", _doc())))
    assert len(names) > 40
    missing = []
    for n in names:
        if n.startswith(BACKEND + ".") and n.count(".") == BACKEND.count(".") + 1:
            continue  # the back-end's attributes: checked on an instance below
        try:
            _resolve(n)
        except (ImportError, AttributeError):
            missing.append(n)
    assert not missing, f"named in docs/backend-api.md, not in the package: {missing}"


def test_every_backend_name_the_document_lists_is_there_on_a_back_end(workdir):
    """The back-end's methods and the attributes its constructor sets, on a real back-end."""
    ns: dict = {}
    exec(compile(_example(), "docs/backend-api.md", "exec"), ns)
    be = VhostUserBackend(ns["UpperDevice"](), socket_path=os.path.join(workdir, "s")).start()
    try:
        listed = re.findall(r"`kickcall\.vhost_user\.backend\.VhostUserBackend\.(\w+)`", _doc())
        assert len(listed) > 10
        for n in listed:
            assert hasattr(be, n), n
    finally:
        be.stop()


def test_the_worked_example_serves_a_front_end(workdir):
    ns: dict = {}
    exec(compile(_example(), "docs/backend-api.md", "exec"), ns)
    sock = os.path.join(workdir, "s")
    backend = ns["serve"](sock)
    assert isinstance(backend, VhostUserBackend)
    d = MiniDriver(sock)
    try:
        d.connect()
        d.start()
        d.post(b"hello, vhost-user")
        assert d.reply() == b"HELLO, VHOST-USER"
        d.post(b"again")
        assert d.reply() == b"AGAIN"
        st = backend.loop.run_sync(backend.status)
        assert st["queues"][0]["kicks"] >= 2 and st["protocol-errors"] == 0 and st["internal-errors"] == 0
    finally:
        d.close()
        backend.stop()
