"""Ownership of paths: kickcall changes or removes only what it created itself, in this run.

A Unix socket path (a vhost-user back-end's, a QMP monitor's) is *claimed* before anything is
bound: the claim takes ``PATH.lock`` with ``flock`` (so two kickcall instances cannot race through
the check), then looks at what is at ``PATH``:

* nothing -> free;
* a socket nobody accepts on (``connect()`` gets ``ECONNREFUSED``) -> a dead socket left by a
  process that died: taken over;
* a live socket, a symlink (dangling or not), a regular file, a directory, a FIFO, anything
  else -> refused with the path named, and nothing is touched.

QEMU and qemu-storage-daemon unlink whatever is at the path; kickcall does better.  Once bound,
the socket's inode is remembered, and on release the path is unlinked only if it still names that
inode (someone may have replaced it meanwhile).  The lock file is removed only if this claim
created it, and only while it still holds the lock on that very file.

Only :func:`claim_socket_path` (check) and :meth:`SocketClaim.bind` (take) change anything, and
they change only ``PATH`` and ``PATH.lock``.
"""

from __future__ import annotations

import enum
import errno
import fcntl
import os
import socket
import stat

__all__ = ["RefusalKind", "PathRefused", "SocketClaim", "claim_socket_path", "SUN_PATH_MAX", "temp_dir"]

SUN_PATH_MAX = 107  # sockaddr_un.sun_path holds 108 bytes with the terminating NUL


class RefusalKind(enum.Enum):
    """Why kickcall refused to take or open a path."""

    EXISTS = "exists"              # a regular file, a directory, a FIFO ... that is not ours to replace
    SYMLINK = "symlink"            # a symbolic link (dangling or not): never followed, never replaced
    LIVE_SOCKET = "live-socket"    # a server accepts connections on it
    IN_USE = "in-use"              # another kickcall holds the path's lock
    TOO_LONG = "too-long"          # longer than a Unix socket address can hold
    NO_ACCESS = "no-access"        # the directory is missing or not writable
    NOT_REGULAR = "not-regular"    # an image or config that is a FIFO, a character device, a socket
    IMAGE_LOCKED = "image-locked"  # another process (QEMU, kickcall) holds a conflicting image lock
    TOO_LARGE = "too-large"        # a config file past its size limit


class PathRefused(Exception):
    """kickcall will not use this path; ``str()`` is one line naming the path and why."""

    def __init__(self, path: str, kind: RefusalKind, detail: str) -> None:
        self.path = path
        self.kind = kind
        self.detail = detail
        super().__init__(f"{path}: {detail}")


def _socket_is_live(path: str) -> bool | None:
    """True: a server accepts on *path*; False: nobody does (ECONNREFUSED); None: cannot tell."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.setblocking(False)
        s.connect(path)
        return True
    except ConnectionRefusedError:
        return False
    except BlockingIOError:  # EAGAIN: the listener's backlog is full -- it is alive
        return True
    except OSError:
        return None
    finally:
        s.close()


def _holder_pid(fd: int) -> str:
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        raw = os.read(fd, 32).strip()
    except OSError:
        return ""
    return raw.decode() if raw.isdigit() else ""


class SocketClaim:
    """The right to bind a Unix socket at *path* for this run (see the module docstring).

    ``SocketClaim(path)`` checks and locks, touching nothing else; :meth:`bind` creates the socket
    (mode 0600) and listens; :meth:`release` removes what this claim created.  Usable as a
    context manager.
    """

    def __init__(self, path: str) -> None:
        self.path = path
        self.lock_path = path + ".lock"
        self._lock_fd: int | None = None
        self._lock_created = False
        self._lock_ino: tuple[int, int, int] | None = None
        self._bound_ino: tuple[int, int, int] | None = None
        self._takeover = False
        self.sock: socket.socket | None = None
        if len(os.fsencode(path)) > SUN_PATH_MAX:
            raise PathRefused(path, RefusalKind.TOO_LONG,
                              f"a Unix socket path must be shorter than {SUN_PATH_MAX + 1} bytes")
        self._lock()
        try:
            self._check()
        except BaseException:
            self._unlock()
            raise

    # -- the lock file -------------------------------------------------------------------------------
    def _lock(self) -> None:
        flags = os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK
        for _ in range(16):  # the file can be unlinked by its creator between our open and our flock
            created = False
            try:
                fd = os.open(self.lock_path, flags | os.O_CREAT | os.O_EXCL, 0o600)
                created = True
            except FileExistsError:
                try:
                    fd = os.open(self.lock_path, flags)
                except FileNotFoundError:
                    continue
                except OSError as e:
                    raise self._lock_error(e) from None
            except OSError as e:
                raise self._lock_error(e) from None
            locked = False
            try:
                st = os.fstat(fd)
                if not stat.S_ISREG(st.st_mode):
                    raise PathRefused(self.lock_path, RefusalKind.EXISTS, "exists and is not a lock file")
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    locked = True
                except BlockingIOError:
                    pid = _holder_pid(fd)
                    who = f" (pid {pid})" if pid else ""
                    raise PathRefused(self.path, RefusalKind.IN_USE,
                                      f"in use: another process{who} holds {self.lock_path}") from None
                try:
                    now = os.lstat(self.lock_path)
                except FileNotFoundError:
                    now = None
                if now is None or (now.st_dev, now.st_ino) != (st.st_dev, st.st_ino):
                    os.close(fd)  # we locked a file its creator has just removed: start again
                    continue
            except BaseException:
                # remove a lock file we created only if we hold its lock: another process that
                # locked it between our create and our flock holds it now, and unlinking it would
                # let a third one lock a fresh file beside it
                if created and locked:
                    try:
                        os.unlink(self.lock_path)
                    except OSError:
                        pass
                os.close(fd)
                raise
            if not created and st.st_size == 0:
                # empty: made by a racer that lost the lock before writing its pid (a lock file
                # from an earlier run names its process) -- ours to remove, then
                created = True
            if created:
                os.write(fd, b"%d\n" % os.getpid())
                st = os.fstat(fd)
            self._lock_fd = fd
            self._lock_created = created
            self._lock_ino = (st.st_dev, st.st_ino, st.st_ctime_ns)
            return
        raise PathRefused(self.path, RefusalKind.IN_USE, f"{self.lock_path} keeps changing under us")

    def _lock_error(self, e: OSError) -> PathRefused:
        if e.errno == errno.ELOOP:
            return PathRefused(self.lock_path, RefusalKind.SYMLINK, "is a symbolic link; refusing to follow it")
        if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOENT, errno.ENOTDIR):
            d = os.path.dirname(os.path.abspath(self.path))
            return PathRefused(self.path, RefusalKind.NO_ACCESS,
                               f"cannot create files in {d}: {e.strerror}")
        if e.errno == errno.EISDIR:
            return PathRefused(self.lock_path, RefusalKind.EXISTS, "is a directory")
        return PathRefused(self.lock_path, RefusalKind.NO_ACCESS, e.strerror or str(e))

    def _unlock(self) -> None:
        fd = self._lock_fd
        if fd is None:
            return
        self._lock_fd = None
        if self._lock_created:
            try:  # unlink while still holding the lock, and only the file we created
                st = os.lstat(self.lock_path)
                if (st.st_dev, st.st_ino, st.st_ctime_ns) == self._lock_ino:
                    os.unlink(self.lock_path)
            except OSError:
                pass
        os.close(fd)

    # -- the path itself -----------------------------------------------------------------------------
    def _check(self) -> None:
        try:
            st = os.lstat(self.path)
        except FileNotFoundError:
            d = os.path.dirname(os.path.abspath(self.path))
            if not os.access(d, os.W_OK | os.X_OK):
                raise PathRefused(self.path, RefusalKind.NO_ACCESS, f"cannot create files in {d}") from None
            return
        except OSError as e:
            raise PathRefused(self.path, RefusalKind.NO_ACCESS, e.strerror or str(e)) from None
        if stat.S_ISLNK(st.st_mode):
            raise PathRefused(self.path, RefusalKind.SYMLINK,
                              "is a symbolic link; refusing to replace it (remove it yourself if it is stale)")
        if not stat.S_ISSOCK(st.st_mode):
            kind = "a directory" if stat.S_ISDIR(st.st_mode) else (
                "a regular file" if stat.S_ISREG(st.st_mode) else "not a socket")
            raise PathRefused(self.path, RefusalKind.EXISTS, f"exists and is {kind}; refusing to replace it")
        live = _socket_is_live(self.path)
        if live is None:
            raise PathRefused(self.path, RefusalKind.EXISTS,
                              "is a socket whose state cannot be checked; refusing to replace it")
        if live:
            raise PathRefused(self.path, RefusalKind.LIVE_SOCKET,
                              "a server is listening on this socket; refusing to take it over")
        self._takeover = True  # a dead socket: a process that died left it

    # -- taking and giving back ------------------------------------------------------------------------
    def bind(self, backlog: int = 1) -> socket.socket:
        """Create the socket at the path (mode 0600), listening, non-blocking."""
        if self._lock_fd is None:
            raise RuntimeError("claim already released")
        if self.sock is not None:
            return self.sock
        if self._takeover:
            # still under our lock: check again that it is the dead socket we looked at
            self._check()
            try:
                os.unlink(self.path)
            except FileNotFoundError:
                pass
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old = os.umask(0o177)
        try:
            s.bind(self.path)
        except OSError as e:
            s.close()
            kind = RefusalKind.EXISTS if e.errno == errno.EADDRINUSE else RefusalKind.NO_ACCESS
            raise PathRefused(self.path, kind, f"cannot bind: {e.strerror}") from None
        finally:
            os.umask(old)
        os.chmod(self.path, 0o600)
        st = os.lstat(self.path)
        self._bound_ino = (st.st_dev, st.st_ino, st.st_ctime_ns)
        s.listen(backlog)
        s.setblocking(False)
        self.sock = s
        return s

    @property
    def bound(self) -> bool:
        return self._bound_ino is not None

    def owns_path(self) -> bool:
        """Whether the path still names the socket this claim created."""
        if self._bound_ino is None:
            return False
        try:
            st = os.lstat(self.path)
        except OSError:
            return False
        # inode numbers are reused at once (tmpfs): the change time and the type tell a newcomer apart
        return stat.S_ISSOCK(st.st_mode) and (st.st_dev, st.st_ino, st.st_ctime_ns) == self._bound_ino

    def release(self) -> None:
        """Close nothing the caller owns; remove the socket file and lock file if this claim created them."""
        if self.owns_path():
            try:
                os.unlink(self.path)
            except OSError:
                pass
        self._bound_ino = None
        self._unlock()

    def __enter__(self) -> "SocketClaim":
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def claim_socket_path(path: str) -> SocketClaim:
    """Check and lock *path* for a Unix socket this run will create; raises :class:`PathRefused`."""
    return SocketClaim(path)


def temp_dir() -> str:
    """Where kickcall makes its temporary directories: ``$TMPDIR`` (then ``$TEMP``, ``$TMP``,
    ``/tmp``, ``/var/tmp``), the first that is a writable directory.

    Unlike ``tempfile.gettempdir()`` on its first call, this creates nothing: the standard library
    probes each candidate by creating and deleting a file with a random name in it, which a Ctrl-C
    at the wrong moment leaves behind in the user's directory.
    """
    for cand in (os.environ.get("TMPDIR"), os.environ.get("TEMP"), os.environ.get("TMP"), "/tmp", "/var/tmp"):
        if cand and os.path.isdir(cand) and os.access(cand, os.W_OK | os.X_OK):
            return os.path.abspath(cand)
    return os.getcwd()
