"""Disk images for virtio-blk: opened safely, locked as QEMU locks them, created sparse.

Opening (:func:`open_image`):

* the path is opened with ``O_NONBLOCK`` first and ``fstat``-ed: only a regular file or a block
  device is accepted.  A FIFO would block ``open()`` for ever (and a read-only FIFO open never
  returns until a writer appears); a character device such as ``/dev/zero`` has no size.  Both are
  refused with the path named, before anything is read or written;
* the image is locked with **QEMU's image locking protocol** (block/file-posix.c): open-file-
  description (OFD) read locks on single bytes, one per permission held at ``100 + bit`` and one
  per permission *not shared* with others at ``200 + bit`` (bit 0 consistent read, bit 1 write).
  Like a QEMU guest device (``share-rw=off``), kickcall holds consistent-read (byte 100), write
  when writable (byte 101), and does not share write (byte 201): as seen in ``/proc/locks`` with
  QEMU 7.2, a read-write virtio-blk holds 100-101 and 201, a read-only one 100 and 201.  A
  conflict (another process writing, or refusing writers while we write) is a refusal, so
  kickcall and QEMU (or qemu-storage-daemon, or a second kickcall) never share an image for
  writing.

Creating (:func:`create_image`): ``O_CREAT | O_EXCL`` (never over an existing file), sparse
(``ftruncate``), and only the first *labelled* bytes carry kickcall's sector labels; the rest reads
as zeros without taking disk space.
"""

from __future__ import annotations

import errno
import fcntl
import os
import stat
import struct

from ..faults import PROCESS
from ..ownership import PathRefused, RefusalKind

__all__ = ["ImageFile", "open_image", "create_image", "sector_label", "SECTOR",
           "LOCK_PERM_BASE", "LOCK_SHARED_BASE", "PERM_CONSISTENT_READ", "PERM_WRITE", "IMAGE_LOCKING"]

SECTOR = 512
LOCK_PERM_BASE = 100    # QEMU's RAW_LOCK_PERM_BASE
LOCK_SHARED_BASE = 200  # QEMU's RAW_LOCK_SHARED_BASE
PERM_CONSISTENT_READ = 0  # bit numbers of BLK_PERM_CONSISTENT_READ and BLK_PERM_WRITE
PERM_WRITE = 1
_FLOCK = struct.Struct("hh4xqqi4x")  # struct flock on x86-64/aarch64 Linux: type, whence, start, len, pid

#: the switch for the image-locking fix (tests turn it off to show the unlocked sharing)
IMAGE_LOCKING = PROCESS.switch("image-locking", "off: images are opened without QEMU's OFD byte-range locks, "
                               "so two writers can share one image unnoticed")


def sector_label(sector: int) -> bytes:
    """kickcall's label of one 512-byte sector of an image it created."""
    return (b"SECTOR%010d" % sector).ljust(SECTOR, b".")


def _ofd(fd: int, cmd: int, ltype: int, byte: int) -> int:
    """One OFD lock operation on a single byte; returns the l_type the kernel reports."""
    raw = fcntl.fcntl(fd, cmd, _FLOCK.pack(ltype, os.SEEK_SET, byte, 1, 0))
    return _FLOCK.unpack(raw)[0]


class ImageFile:
    """An open image: ``fd``, ``size`` in bytes, ``writable``; ``close()`` drops the locks."""

    def __init__(self, path: str, fd: int, size: int, writable: bool, locked: bool) -> None:
        self.path = path
        self.fd = fd
        self.size = size
        self.writable = writable
        self.locked = locked

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)  # closing the open file description releases its OFD locks
            self.fd = -1

    def __enter__(self) -> "ImageFile":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _lock(fd: int, path: str, writable: bool) -> None:
    held = [PERM_CONSISTENT_READ] + ([PERM_WRITE] if writable else [])
    unshared = [PERM_WRITE]
    try:
        for p in held:
            _ofd(fd, fcntl.F_OFD_SETLK, fcntl.F_RDLCK, LOCK_PERM_BASE + p)
        for p in unshared:
            _ofd(fd, fcntl.F_OFD_SETLK, fcntl.F_RDLCK, LOCK_SHARED_BASE + p)
    except OSError as e:
        if e.errno in (errno.EAGAIN, errno.EACCES):
            raise PathRefused(path, RefusalKind.IMAGE_LOCKED,
                              "is locked by another process (QEMU's image locking)") from None
        if e.errno in (errno.EINVAL, errno.ENOLCK, errno.EOPNOTSUPP):
            return  # a file system without OFD locks: QEMU carries on without them too
        raise
    # then check, as QEMU does, both ways: nobody refuses what we take, nobody holds what we refuse
    for p in held:
        if _ofd(fd, fcntl.F_OFD_GETLK, fcntl.F_WRLCK, LOCK_SHARED_BASE + p) != fcntl.F_UNLCK:
            what = "write to" if p == PERM_WRITE else "read"
            raise PathRefused(path, RefusalKind.IMAGE_LOCKED,
                              f"is locked: another process (QEMU or kickcall) uses this image and does not "
                              f"let others {what} it")
    for p in unshared:
        if _ofd(fd, fcntl.F_OFD_GETLK, fcntl.F_WRLCK, LOCK_PERM_BASE + p) != fcntl.F_UNLCK:
            raise PathRefused(path, RefusalKind.IMAGE_LOCKED,
                              "is locked: another process (QEMU or kickcall) has it open for writing")


def open_image(path: str, *, writable: bool, lock: bool | None = None) -> ImageFile:
    """Open a raw image (a regular file or a block device) for a virtio-blk device.

    Raises :class:`PathRefused` for a missing path, a FIFO, a character device, a socket, a
    directory, or an image another process holds in a conflicting way.
    """
    flags = (os.O_RDWR if writable else os.O_RDONLY) | os.O_CLOEXEC | os.O_NONBLOCK | os.O_NOCTTY
    try:
        fd = os.open(path, flags)
    except OSError as e:
        if e.errno == errno.ENOENT:
            raise PathRefused(path, RefusalKind.NO_ACCESS, "no such file") from None
        if e.errno == errno.ENXIO:  # a FIFO opened for writing with no reader
            raise PathRefused(path, RefusalKind.NOT_REGULAR, "is a FIFO, not a disk image") from None
        if e.errno == errno.EISDIR:
            raise PathRefused(path, RefusalKind.NOT_REGULAR, "is a directory, not a disk image") from None
        raise PathRefused(path, RefusalKind.NO_ACCESS, e.strerror or str(e)) from None
    try:
        st = os.fstat(fd)
        if stat.S_ISREG(st.st_mode):
            size = st.st_size
        elif stat.S_ISBLK(st.st_mode):
            size = os.lseek(fd, 0, os.SEEK_END)
        else:
            kind = ("a FIFO" if stat.S_ISFIFO(st.st_mode) else "a character device" if stat.S_ISCHR(st.st_mode)
                    else "a socket" if stat.S_ISSOCK(st.st_mode) else "not a regular file")
            raise PathRefused(path, RefusalKind.NOT_REGULAR, f"is {kind}, not a disk image")
        fl = fcntl.fcntl(fd, fcntl.F_GETFL)
        fcntl.fcntl(fd, fcntl.F_SETFL, fl & ~os.O_NONBLOCK)
        do_lock = IMAGE_LOCKING.fix_on if lock is None else lock
        if do_lock:
            _lock(fd, path, writable)
    except BaseException:
        os.close(fd)
        raise
    return ImageFile(path, fd, size, writable, do_lock)


def create_image(path: str, size: int, *, labelled: int = 0, exclusive: bool = True) -> None:
    """Create a new sparse raw image of *size* bytes; label the first *labelled* bytes' sectors.

    With *exclusive* (kickcall's own temporary images) it never replaces anything: the file is
    created with ``O_EXCL``.  ``exclusive=False`` re-creates a file the caller owns (tests).
    """
    flags = os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW | (os.O_EXCL if exclusive else os.O_TRUNC)
    fd = os.open(path, flags, 0o600)
    try:
        os.ftruncate(fd, size)
        n = min(labelled, size) // SECTOR
        chunk = 2048  # sectors per write (1 MiB)
        for first in range(0, n, chunk):
            os.pwrite(fd, b"".join(sector_label(s) for s in range(first, min(n, first + chunk))),
                      first * SECTOR)
    finally:
        os.close(fd)
