"""The guest of the real-peer tests: a Debian cloud kernel plus a busybox initramfs built in Python.

``./install.sh`` downloads the kernel and busybox-static packages, unpacks them into a cache outside
the checkout and writes ``<cache>/guest/manifest.json``; :func:`load_manifest` reads it. The
initramfs is a gzip'd newc cpio written here (no ``cpio`` binary, no root, no ``mknod``) and cached
under ``<cache>/initramfs/`` by a hash of everything that goes into it.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import lzma
import os
import stat
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

INSTALL_HINT = "run ./install.sh"

#: The virtio modules the guest needs for a virtio-blk disk, in the order they must be insmod'ed
#: (the Debian .deb has no modules.dep), with their paths under ``<modules_dir>/kernel/drivers/``.
VIRTIO_BLK_MODULES: tuple[tuple[str, str], ...] = (
    ("virtio_ring", "virtio/virtio_ring"),
    ("virtio", "virtio/virtio"),
    ("virtio_pci_modern_dev", "virtio/virtio_pci_modern_dev"),
    ("virtio_pci_legacy_dev", "virtio/virtio_pci_legacy_dev"),
    ("virtio_pci", "virtio/virtio_pci"),
    ("virtio_blk", "block/virtio_blk"),
)

DIRECTORIES = ("bin", "dev", "proc", "sys", "lib", "lib/modules", "tmp", "sbin", "usr", "usr/bin",
               "usr/sbin", "mnt")

# The shell text every guest /init starts with. It leaves, for each kernel parameter kc.NAME=VALUE,
# a shell variable KC_NAME=VALUE (NAME upper-cased, '.' and '-' turned into '_'; KC_MODE defaults to
# "hello"), and prints "KICKCALL-READY mode=<mode>" once the modules are in.
STANDARD_INIT_PRELUDE = r"""#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/bin:/sbin:/usr/bin:/usr/sbin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
echo "KICKCALL-INIT uptime=$(cut -d' ' -f1 /proc/uptime)"
KC_MODE=hello
for a in $(cat /proc/cmdline); do
  case "$a" in
    kc.*=*)
      k=${a%%=*}; k=${k#kc.}; v=${a#*=}
      k=$(echo "$k" | tr 'a-z.-' 'A-Z__')
      case "$k" in ''|*[!A-Z0-9_]*) echo "KICKCALL-BAD-PARAM $a"; continue;; esac
      eval "KC_$k=\$v"
      ;;
  esac
done
for m in virtio_ring virtio virtio_pci_modern_dev virtio_pci_legacy_dev virtio_pci virtio_blk; do
  insmod /lib/modules/$m.ko || echo "KICKCALL-INSMOD-FAILED $m"
done
echo "KICKCALL-READY mode=$KC_MODE uptime=$(cut -d' ' -f1 /proc/uptime)"
"""

#: The end of every guest /init: with ``-no-reboot`` QEMU then exits 0 by itself.
STANDARD_INIT_EPILOGUE = r"""
echo "KICKCALL-POWEROFF uptime=$(cut -d' ' -f1 /proc/uptime)"
sync
poweroff -f
"""


def make_init(body: str) -> str:
    """A complete /init: the standard prelude, *body*, then the power-off."""
    return STANDARD_INIT_PRELUDE + body.rstrip("\n") + "\n" + STANDARD_INIT_EPILOGUE


class PeerMissing(RuntimeError):
    """A real peer (QEMU, qemu-storage-daemon, the guest kernel or busybox) is not installed."""


@dataclass(frozen=True)
class GuestAssets:
    kernel: str
    modules_dir: str
    krel: str
    busybox: str
    manifest: str = ""
    extra: dict = field(default_factory=dict, compare=False)

    def module_path(self, relpath: str) -> str:
        """The file of a module given as ``<dir>/<name>`` under kernel/drivers (any supported suffix)."""
        base = os.path.join(self.modules_dir, "kernel", "drivers", relpath)
        for suffix in (".ko", ".ko.xz", ".ko.zst", ".ko.gz"):
            if os.path.exists(base + suffix):
                return base + suffix
        raise PeerMissing(f"kernel module {relpath}.ko (or .ko.xz) not found under {self.modules_dir}; "
                          f"{INSTALL_HINT}")


def cache_root() -> Path:
    """``$KICKCALL_CACHE``, else ``$XDG_CACHE_HOME/kickcall``, else ``~/.cache/kickcall`` (as install.sh)."""
    env = os.environ.get("KICKCALL_CACHE")
    if env:
        return Path(env)
    xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(xdg) / "kickcall"


def manifest_path() -> Path:
    return cache_root() / "guest" / "manifest.json"


def load_manifest(path: str | os.PathLike | None = None) -> GuestAssets:
    """The guest kernel, modules and busybox that install.sh put in the cache."""
    p = Path(path) if path is not None else manifest_path()
    try:
        with open(p) as f:
            m = json.load(f)
    except FileNotFoundError:
        raise PeerMissing(f"guest manifest {p} is missing (no guest kernel/busybox downloaded); "
                          f"{INSTALL_HINT}") from None
    except (OSError, ValueError) as e:
        raise PeerMissing(f"guest manifest {p} is unreadable ({e}); {INSTALL_HINT}") from None
    missing = [k for k in ("kernel", "modules_dir", "krel", "busybox") if not m.get(k)]
    if missing:
        raise PeerMissing(f"guest manifest {p} lacks {', '.join(missing)}; {INSTALL_HINT}")
    for k in ("kernel", "modules_dir", "busybox"):
        if not os.path.exists(m[k]):
            raise PeerMissing(f"guest {k} {m[k]} (from {p}) does not exist; {INSTALL_HINT}")
    extra = {k: v for k, v in m.items() if k not in ("kernel", "modules_dir", "krel", "busybox")}
    return GuestAssets(kernel=m["kernel"], modules_dir=m["modules_dir"], krel=m["krel"],
                       busybox=m["busybox"], manifest=str(p), extra=extra)


def read_module(path: str) -> bytes:
    """A module's ELF bytes; .ko.xz and .ko.gz are decompressed, .ko.zst is refused."""
    if path.endswith(".zst"):
        raise PeerMissing(f"{path} is zstd-compressed and Python's standard library cannot decompress it; "
                          "busybox insmod needs a plain .ko (teach kickcall.peers.guest_image to unpack it "
                          "or install zstd support)")
    with open(path, "rb") as f:
        data = f.read()
    if path.endswith(".xz"):
        return lzma.decompress(data)
    if path.endswith(".gz"):
        return gzip.decompress(data)
    return data


# --- newc cpio ------------------------------------------------------------------------------------

_TRAILER = "TRAILER!!!"


def _pad4(n: int) -> int:
    return (4 - n % 4) % 4


class CpioWriter:
    """A newc ("070701") cpio archive written entry by entry; names have no leading '/'."""

    def __init__(self, out: io.BufferedIOBase):
        self._out = out
        self._ino = 0
        self._closed = False

    def _record(self, name: str, mode: int, data: bytes = b"", nlink: int = 1,
                rdev: tuple[int, int] = (0, 0)) -> None:
        name = name.lstrip("/")
        self._ino += 1
        raw_name = name.encode() + b"\0"
        fields = (self._ino, mode, 0, 0, nlink, 0, len(data), 0, 0, rdev[0], rdev[1], len(raw_name), 0)
        hdr = b"070701" + b"".join(b"%08X" % v for v in fields)
        self._out.write(hdr + raw_name + b"\0" * _pad4(len(hdr) + len(raw_name)))
        self._out.write(data + b"\0" * _pad4(len(data)))

    def directory(self, name: str, perm: int = 0o755) -> None:
        self._record(name, stat.S_IFDIR | perm, nlink=2)

    def file(self, name: str, data: bytes, perm: int = 0o644) -> None:
        self._record(name, stat.S_IFREG | perm, data)

    def chardev(self, name: str, major: int, minor: int, perm: int = 0o600) -> None:
        self._record(name, stat.S_IFCHR | perm, rdev=(major, minor))

    def symlink(self, name: str, target: str) -> None:
        self._record(name, stat.S_IFLNK | 0o777, target.encode())

    def close(self) -> None:
        if not self._closed:
            self._record(_TRAILER, 0, nlink=1)
            self._closed = True


def parse_cpio(data: bytes) -> list[dict]:
    """Parse a (decompressed) newc archive back into entries, trailer included; for tests and checks."""
    out = []
    off = 0
    while True:
        if data[off:off + 6] != b"070701":
            raise ValueError(f"bad newc magic {data[off:off + 6]!r} at offset {off}")
        vals = [int(data[off + 6 + 8 * i: off + 14 + 8 * i], 16) for i in range(13)]
        (ino, mode, uid, gid, nlink, mtime, filesize, devmajor, devminor, rdevmajor, rdevminor,
         namesize, check) = vals
        name_start = off + 110
        name = data[name_start:name_start + namesize - 1].decode()
        if data[name_start + namesize - 1] != 0:
            raise ValueError(f"name of entry at {off} is not NUL-terminated")
        data_start = name_start + namesize
        data_start += _pad4(data_start)
        body = data[data_start:data_start + filesize]
        out.append(dict(name=name, ino=ino, mode=mode, uid=uid, gid=gid, nlink=nlink, mtime=mtime,
                        data=body, rdevmajor=rdevmajor, rdevminor=rdevminor, check=check))
        off = data_start + filesize
        off += _pad4(off)
        if name == _TRAILER:
            return out
        if off >= len(data):
            raise ValueError("archive ends without a TRAILER!!! record")


# --- the initramfs --------------------------------------------------------------------------------

_FORMAT_VERSION = b"kickcall-initramfs-1"


def _normalise_extra(extra_files: dict | None) -> list[tuple[str, bytes, int]]:
    out = []
    for name, val in sorted((extra_files or {}).items()):
        if isinstance(val, tuple):
            data, perm = val
        else:
            data = val
            top = name.lstrip("/").split("/", 1)[0]
            perm = 0o755 if top in ("bin", "sbin") or data.startswith(b"#!") else 0o644
        if isinstance(data, str):
            data = data.encode()
        name = name.lstrip("/")
        if not name or ".." in name.split("/"):
            raise ValueError(f"bad initramfs file name {name!r}")
        out.append((name, bytes(data), perm))
    return out


PRUNE_AFTER_S = 14 * 24 * 3600


def _prune(cdir: Path, keep: Path) -> None:
    """Drop cached images not written for PRUNE_AFTER_S (they are rebuilt in ~0.1 s when needed)."""
    cutoff = time.time() - PRUNE_AFTER_S
    for p in cdir.glob("initramfs-*.cpio.gz"):
        try:
            if p != keep and p.stat().st_mtime < cutoff:
                p.unlink()
        except FileNotFoundError:
            pass


def build_initramfs(init_script: str, out_path: str | os.PathLike | None = None,
                    assets: GuestAssets | None = None, extra_files: dict | None = None, *,
                    cache_dir: str | os.PathLike | None = None) -> str:
    """Build (or take from the cache) the gzip'd newc initramfs with *init_script* as /init.

    The image is kept in *cache_dir* (default ``<cache>/initramfs``) under a name derived from a hash of
    all its inputs, so a second call with the same inputs returns the same file without rebuilding it.
    With *out_path* a copy is also placed there and that path is returned; otherwise the cached path is
    returned. *extra_files* maps archive paths to bytes (mode 0755 under bin/ and sbin/ or with a
    ``#!``, else 0644) or to ``(bytes, mode)``.
    """
    assets = assets if assets is not None else load_manifest()
    with open(assets.busybox, "rb") as f:
        busybox = f.read()
    modules = [(name, read_module(assets.module_path(rel))) for name, rel in VIRTIO_BLK_MODULES]
    extra = _normalise_extra(extra_files)
    init = init_script.encode()

    h = hashlib.sha256(_FORMAT_VERSION)
    for part in ([b"init", init, b"busybox", busybox]
                 + [x for name, data in modules for x in (name.encode(), data)]
                 + [x for name, data, perm in extra for x in (name.encode(), b"%o" % perm, data)]):
        h.update(b"%d:" % len(part))
        h.update(part)
    key = h.hexdigest()[:32]

    cdir = Path(cache_dir) if cache_dir is not None else cache_root() / "initramfs"
    cdir.mkdir(parents=True, exist_ok=True)
    cached = cdir / f"initramfs-{key}.cpio.gz"
    if not cached.exists():
        buf = io.BytesIO()
        w = CpioWriter(buf)
        dirs = set(DIRECTORIES)
        for name, _data, _perm in extra:
            parts = name.split("/")[:-1]
            dirs.update("/".join(parts[:i + 1]) for i in range(len(parts)))
        for d in sorted(dirs, key=lambda d: (d.count("/"), d)):
            w.directory(d, 0o1777 if d == "tmp" else 0o755)
        w.chardev("dev/console", 5, 1, 0o600)
        w.chardev("dev/null", 1, 3, 0o666)
        w.file("bin/busybox", busybox, 0o755)
        for name, data in modules:
            w.file(f"lib/modules/{name}.ko", data, 0o644)
        w.file("init", init, 0o755)
        for name, data, perm in extra:
            w.file(name, data, perm)
        w.close()
        fd, tmp = tempfile.mkstemp(prefix=".initramfs-", dir=cdir)
        try:
            with os.fdopen(fd, "wb") as f:
                # mtime=0: the same inputs give byte-identical images
                with gzip.GzipFile(fileobj=f, mode="wb", compresslevel=6, mtime=0) as gz:
                    gz.write(buf.getvalue())
            os.replace(tmp, cached)
        except BaseException:
            try:
                os.unlink(tmp)
            except FileNotFoundError:
                pass
            raise
        _prune(cdir, keep=cached)
    if out_path is None:
        return str(cached)
    out = Path(out_path)
    if out.resolve() != cached.resolve():
        tmp_out = out.with_name(out.name + ".tmp")
        with open(cached, "rb") as src, open(tmp_out, "wb") as dst:
            dst.write(src.read())
        os.replace(tmp_out, out)
    return str(out)
