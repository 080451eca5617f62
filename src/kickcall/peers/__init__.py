"""Real external peers for tests: QEMU (TCG), qemu-storage-daemon, and a busybox guest.

Everything here is standard library only. ``./install.sh`` installs QEMU from apt and puts the guest
kernel and busybox in a cache outside the checkout (see :mod:`kickcall.peers.guest_image`).
"""

from __future__ import annotations

import shutil

from .guest_image import (
    STANDARD_INIT_EPILOGUE,
    STANDARD_INIT_PRELUDE,
    VIRTIO_BLK_MODULES,
    GuestAssets,
    PeerMissing,
    build_initramfs,
    cache_root,
    load_manifest,
    make_init,
    parse_cpio,
)
from .qemu import PeerError, PeerTimeout, QemuVM, VhostUserBlk, kernel_cmdline, open_qmp
from .qsd import QSD

__all__ = [
    "GuestAssets", "PeerError", "PeerMissing", "PeerTimeout", "QSD", "QemuVM",
    "STANDARD_INIT_EPILOGUE", "STANDARD_INIT_PRELUDE", "VIRTIO_BLK_MODULES", "VhostUserBlk",
    "build_initramfs", "cache_root", "kernel_cmdline", "load_manifest", "make_init", "open_qmp", "parse_cpio",
    "peers_available", "require_peers",
]


def peers_available() -> str | None:
    """None when QEMU, qemu-storage-daemon, the guest kernel, its virtio modules and busybox are all
    there; otherwise a reason (ending in "run ./install.sh")."""
    try:
        require_peers()
    except PeerMissing as e:
        return str(e)
    return None


def require_peers() -> GuestAssets:
    """The guest assets; raises PeerMissing naming the first thing missing."""
    from .qemu import QEMU_BINARY
    from .qsd import QSD_BINARY

    for b in (QEMU_BINARY, QSD_BINARY):
        if shutil.which(b) is None:
            raise PeerMissing(f"{b} is not installed (Debian package qemu-system-x86); run ./install.sh")
    assets = load_manifest()
    for _name, rel in VIRTIO_BLK_MODULES:
        assets.module_path(rel)
    return assets
