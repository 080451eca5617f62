"""EventNotifier (a real eventfd) and NotifierRegistry."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from helpers import fd_count
from kickcall.notify import (
    EventNotifier,
    NotifierError,
    NotifierRegistry,
    Role,
    peek_fd,
    read_fdinfo,
)


@pytest.fixture
def notifier():
    n = EventNotifier("test")
    try:
        yield n
    finally:
        n.close()


# -- the doorbell ---------------------------------------------------------------------------------

def test_set_values_sum_and_test_and_clear_consumes(notifier):
    n = notifier
    assert n.test_and_clear() == 0  # nothing pending: 0, not an exception
    n.set(3)
    n.set(2)
    assert n.test_and_clear() == 5
    assert n.test_and_clear() == 0
    assert (n.sets, n.set_value, n.consumed, n.clears) == (2, 5, 5, 1)


def test_default_set_adds_one(notifier):
    notifier.set()
    notifier.set()
    assert notifier.test_and_clear() == 2


def test_peek_does_not_consume(notifier):
    n = notifier
    assert n.peek() == 0
    n.set(3)
    n.set(4)
    assert n.peek() == 7
    assert n.peek() == 7
    assert n.test_and_clear() == 7
    assert n.peek() == 0
    assert n.consumed == 7


def test_initval_is_visible_to_peek():
    with EventNotifier("init", initval=9) as n:
        assert n.peek() == 9
        assert n.test_and_clear() == 9


def test_fd_is_a_real_nonblocking_eventfd(notifier):
    n = notifier
    assert not os.get_blocking(n.fd)
    assert "eventfd-count" in read_fdinfo(n.fd)
    os.eventfd_write(n.fd, 6)  # a write by someone else through the same fd
    assert n.peek() == 6
    assert peek_fd(n.fd) == 6
    assert n.total() == 6
    assert n.test_and_clear() == 6
    with pytest.raises(BlockingIOError):  # non-blocking: an empty eventfd does not block
        os.eventfd_read(n.fd)


def test_peek_and_total_count_writes_by_another_process(notifier):
    n = notifier
    n.set(2)
    assert n.test_and_clear() == 2
    code = "import os, sys; os.eventfd_write(int(sys.argv[1]), 7); os.eventfd_write(int(sys.argv[1]), 4)"
    proc = subprocess.run([sys.executable, "-c", code, str(n.fd)], pass_fds=(n.fd,), timeout=30)
    assert proc.returncode == 0
    assert n.peek() == 11
    assert n.sets == 1 and n.set_value == 2  # the other process's writes are not "our" sets
    assert n.total() == 2 + 11
    assert n.test_and_clear() == 11
    assert n.total() == 13


def test_peek_fd_of_another_process():
    n = EventNotifier("child-side", initval=0)
    try:
        # the child inherits the eventfd at the same number and sleeps until told to go
        r, w = os.pipe()
        code = "import sys, os; sys.stdin.read(1)"
        proc = subprocess.Popen([sys.executable, "-c", code], stdin=r, pass_fds=(n.fd,))
        os.close(r)
        try:
            n.set(5)
            assert peek_fd(n.fd, proc.pid) == 5  # the same eventfd context, seen in the child
            assert read_fdinfo(n.fd, proc.pid)["eventfd-id"] == read_fdinfo(n.fd)["eventfd-id"]
        finally:
            os.write(w, b"x")
            os.close(w)
            assert proc.wait(30) == 0
    finally:
        n.close()


def test_counters_dict(notifier):
    n = notifier
    n.set(4)
    n.test_and_clear()
    n.set(1)
    c = n.counters()
    assert c == {"sets": 2, "set-value": 5, "consumed": 4, "clears": 1, "pending": 1, "total": 5}


# -- identity ---------------------------------------------------------------------------------------

def test_identity_is_checked_on_this_kernel(notifier):
    info = read_fdinfo(notifier.fd)
    assert "eventfd-id" in info
    assert notifier.identity_checked is True
    assert notifier.ident == int(info["eventfd-id"])


def test_two_eventfds_share_ino_but_not_eventfd_id():
    with EventNotifier("a") as a, EventNotifier("b") as b:
        ia, ib = read_fdinfo(a.fd), read_fdinfo(b.fd)
        assert ia["ino"] == ib["ino"]  # why ino alone cannot tell them apart
        assert ia["eventfd-id"] != ib["eventfd-id"]
        assert a.ident != b.ident


def _replace_fd_with(fd: int, other: int) -> None:
    if other != fd:
        os.dup2(other, fd)
        os.close(other)


def test_peek_refuses_an_fd_number_reused_by_another_eventfd():
    """The common case: the old eventfd is freed and the next one created takes both its fd number
    and (the kernel's eventfd ida hands out the lowest free id) its eventfd-id.  peek() must not
    report the new eventfd's counter as the old notifier's."""
    n = EventNotifier("victim")
    try:
        n.set(4)
        assert n.peek() == 4  # opens and keeps the fdinfo file of fd n.fd
        fd = n.fd
        os.close(fd)  # closed behind the notifier's back
        _replace_fd_with(fd, os.eventfd(9, os.EFD_CLOEXEC))
        assert read_fdinfo(fd)["ino"] == n._ino  # all eventfds share one inode
        assert peek_fd(fd) == 9  # fd now names a different eventfd
        with pytest.raises(NotifierError):
            n.peek()
    finally:
        n.close()  # closes the replacement eventfd at that number, and the fdinfo fd


def test_peek_refuses_reused_fd_number_when_eventfd_id_differs():
    n = EventNotifier("victim2")
    try:
        n.set(4)
        assert n.peek() == 4
        fd = n.fd
        old_ident = n.ident
        os.close(fd)
        filler = os.eventfd(0, os.EFD_CLOEXEC)  # takes the freed eventfd-id (and maybe the number)
        other = os.eventfd(9, os.EFD_CLOEXEC)  # a fresh id
        try:
            assert int(read_fdinfo(other)["eventfd-id"]) != old_ident
            os.dup2(other, fd)  # closes filler if it sat at fd
        finally:
            os.close(other)
            if filler != fd:
                os.close(filler)
        assert peek_fd(fd) == 9
        with pytest.raises(NotifierError):
            n.peek()
        with pytest.raises(NotifierError):
            n.total()
        assert n.counters()["pending"] == -1
    finally:
        n.close()


def test_close_closes_eventfd_and_fdinfo_fd():
    before = fd_count()
    n = EventNotifier("c")
    assert fd_count() == before + 2  # the eventfd and the private dup that pins its context
    n.set(1)
    assert n.peek() == 1
    assert fd_count() == before + 3  # the kept-open /proc/self/fdinfo/<fd>
    n.close()
    assert fd_count() == before
    assert n.closed
    with pytest.raises(NotifierError):
        n.fileno()
    with pytest.raises(NotifierError):
        n.peek()
    n.close()  # idempotent
    assert fd_count() == before


def test_context_manager_closes():
    before = fd_count()
    with EventNotifier("cm") as n:
        n.peek()
    assert n.closed
    assert fd_count() == before


def test_adopt_takes_an_eventfd():
    before = fd_count()
    fd = os.eventfd(5)
    n = EventNotifier.adopt(fd, "adopted")
    try:
        assert n.fd == fd
        assert not os.get_blocking(fd)
        assert n.peek() == 5
        assert n.test_and_clear() == 5
    finally:
        n.close()
    assert fd_count() == before


def test_adopt_of_a_pipe_is_refused_without_leaking():
    r, w = os.pipe()
    try:
        before = fd_count()
        with pytest.raises(NotifierError):
            EventNotifier.adopt(r, "pipe")
        assert fd_count() == before  # refused: not adopted, still the caller's (who closes it once)
        os.close(r)
        with pytest.raises(NotifierError):
            peek_fd(w)
    finally:
        os.close(w)


def test_adopt_of_a_memfd_is_refused():
    before = fd_count()
    fd = os.memfd_create("not-an-eventfd", os.MFD_CLOEXEC)
    with pytest.raises(NotifierError):
        EventNotifier.adopt(fd)
    assert fd_count() == before + 1  # refused, so not adopted: the caller still owns it
    os.close(fd)  # and closing it once is correct (a double close would raise EBADF here)
    assert fd_count() == before


# -- registry -----------------------------------------------------------------------------------------

@pytest.fixture
def three():
    ns = [EventNotifier("kick0"), EventNotifier("call0"), EventNotifier("net-kick")]
    try:
        yield ns
    finally:
        for n in ns:
            n.close()


def test_registry_register_entries_and_snapshot(three):
    kick, call, other = three
    reg = NotifierRegistry()
    e1 = reg.register(kick, "blk0", Role.HOST, queue=0)
    e2 = reg.register(call, "blk0", "guest", vector=1, note="irqfd")
    e3 = reg.register(other, "net0", Role.HOST, queue=1)
    assert len(reg) == 3
    assert e2.role is Role.GUEST
    assert [e.id for e in reg.entries("blk0")] == [e1.id, e2.id]
    assert reg.entries("net0") == [e3]
    assert reg.entries("nobody") == []
    assert reg.get(e3.id) is e3
    assert {e.id for e in reg} == {e1.id, e2.id, e3.id}

    kick.set(3)
    kick.test_and_clear()
    kick.set(2)
    snap = {d["id"]: d for d in reg.snapshot("blk0")}
    assert set(snap) == {e1.id, e2.id}
    d1 = snap[e1.id]
    assert d1["owner"] == "blk0"
    assert d1["role"] == "host"
    assert d1["queue"] == 0
    assert "vector" not in d1
    assert d1["fd"] == kick.fd
    assert d1["name"] == "kick0"
    assert d1["pending"] == 2
    assert d1["total"] == 5
    d2 = snap[e2.id]
    assert d2["role"] == "guest"
    assert d2["vector"] == 1
    assert "queue" not in d2
    assert d2["note"] == "irqfd"
    assert d2["pending"] == 0 and d2["total"] == 0


def test_registry_snapshot_of_closed_notifier_has_no_counters():
    reg = NotifierRegistry()
    n = EventNotifier("gone")
    e = reg.register(n, "dev", Role.CONFIG)
    n.close()
    (d,) = reg.snapshot()
    assert d["id"] == e.id
    assert d["fd"] == -1
    assert "pending" not in d


def test_registry_unregister_forms_and_ids_never_reused(three):
    kick, call, other = three
    reg = NotifierRegistry()
    e1 = reg.register(kick, "a", Role.HOST)
    e2 = reg.register(call, "a", Role.GUEST)
    e3 = reg.register(other, "b", Role.ERR)
    reg.unregister(e1)  # by entry
    reg.unregister(call)  # by notifier
    reg.unregister(e3.id)  # by id
    assert len(reg) == 0
    reg.unregister(12345)  # unknown: no error
    e4 = reg.register(kick, "a", Role.HOST)
    assert e4.id not in (e1.id, e2.id, e3.id)
    assert e4.id > e3.id
    reg.unregister(e4)
    e5 = reg.register(kick, "a", Role.HOST)
    assert e5.id > e4.id
    assert [e.id for e in reg.entries()] == [e5.id]


def test_registry_update(three):
    kick = three[0]
    reg = NotifierRegistry()
    e = reg.register(kick, "a", Role.GUEST, vector=0)
    reg.update(kick, role=Role.MASKED, vector=3)
    assert e.role is Role.MASKED and e.vector == 3
    assert reg.snapshot()[0]["role"] == "masked"


def test_registry_rejects_unknown_role(three):
    reg = NotifierRegistry()
    with pytest.raises(ValueError):
        reg.register(three[0], "a", "doorbell")
    assert len(reg) == 0
