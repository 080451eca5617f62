#!/usr/bin/env bash
# Install everything kickcall and its tests need on Debian 12, into ./.venv.
# Idempotent and quick when everything is already there.
set -euo pipefail
cd "$(dirname "$0")"

SUDO=""
if [ "$(id -u)" != 0 ] && command -v sudo >/dev/null 2>&1; then SUDO="sudo"; fi

retry() {  # retry a download-ish command a few times
  local n=0
  until "$@"; do
    n=$((n + 1))
    if [ "$n" -ge 4 ]; then echo "install: giving up on: $*" >&2; return 1; fi
    echo "install: retrying ($n): $*" >&2
    sleep $((n * 3))
  done
}

apt_install() {  # apt_install PKG... (only the missing ones)
  local missing=()
  for p in "$@"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
  [ "${#missing[@]}" -eq 0 ] && return 0
  echo "install: apt-get install ${missing[*]}" >&2
  retry $SUDO env DEBIAN_FRONTEND=noninteractive apt-get update -qq
  retry $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}"
}

# 1. a Python >= 3.11 with venv
PY=""
for cand in python3.13 python3.12 python3.11 python3; do
  if command -v "$cand" >/dev/null 2>&1 &&
     "$cand" -c 'import sys, venv, ensurepip; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
    PY="$cand"; break
  fi
done
if [ -z "$PY" ]; then
  apt_install python3 python3-venv python3-pip
  PY=python3
fi

# 2. the virtual environment and the Python packages (pyproject.toml: prometheus_client at run time,
#    pytest + hypothesis for the tests)
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
stamp=".venv/.kickcall-installed"
want="$(sha256sum pyproject.toml | cut -d' ' -f1)"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ] || ! .venv/bin/python -c 'import kickcall' 2>/dev/null; then
  retry .venv/bin/python -m pip install -q --disable-pip-version-check -e '.[test]'
  echo "$want" > "$stamp"
fi

# 3. the real peers (tests/test_peers.py, kickcall.peers): QEMU + qemu-storage-daemon from apt, and a
#    guest (Debian cloud kernel + static busybox) downloaded and unpacked into a cache OUTSIDE the
#    checkout; nothing of the guest is installed into the system. KICKCALL_NO_PEERS=1 skips this.
if [ "${KICKCALL_NO_PEERS:-0}" != 1 ]; then
  apt_install qemu-system-x86   # pulls qemu-system-common: /usr/bin/qemu-storage-daemon
  for b in qemu-system-x86_64 qemu-storage-daemon; do
    command -v "$b" >/dev/null 2>&1 || { echo "install: $b missing after installing qemu-system-x86" >&2; exit 1; }
  done

  CACHE="${KICKCALL_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/kickcall}"
  GUEST="$CACHE/guest"
  MANIFEST="$GUEST/manifest.json"
  manifest_ok() {  # the manifest exists and every file it names exists
    [ -f "$MANIFEST" ] && .venv/bin/python - "$MANIFEST" <<'PYEOF'
import json, os, sys
m = json.load(open(sys.argv[1]))
ok = all(isinstance(m.get(k), str) and os.path.exists(m[k]) for k in ("kernel", "modules_dir", "busybox"))
sys.exit(0 if ok and m.get("krel") else 1)
PYEOF
  }
  if ! manifest_ok; then
    mkdir -p "$CACHE/debs" "$GUEST"
    rm -rf "$GUEST"/.unpack.*   # left by an interrupted run
    apt_lists_present() { compgen -G '/var/lib/apt/lists/*_Packages*' >/dev/null; }
    resolve_kernel() {  # the concrete package behind the cloud kernel metapackage, e.g. linux-image-6.1.0-56-cloud-amd64
      apt-cache depends linux-image-cloud-amd64 2>/dev/null | awk '/Depends: linux-image/{print $2; exit}'
    }
    apt_update() { retry $SUDO env DEBIAN_FRONTEND=noninteractive apt-get update -qq; }
    download() {  # download PKG... into the deb cache (apt-get download needs no root); quiet unless it fails
      local log; log="$(mktemp)"
      if (cd "$CACHE/debs" && apt-get download -q "$@") >"$log" 2>&1; then rm -f "$log"; return 0; fi
      cat "$log" >&2; rm -f "$log"; return 1
    }
    apt_lists_present || apt_update
    KPKG="$(resolve_kernel)"
    if [ -z "$KPKG" ]; then apt_update; KPKG="$(resolve_kernel)"; fi
    [ -n "$KPKG" ] || { echo "install: cannot resolve linux-image-cloud-amd64 to a kernel package" >&2; exit 1; }
    # the distribution keeps only its newest kernel build: when the package lists are stale the
    # resolved name can be gone from the mirror, so refresh the lists once and resolve again
    if ! download "$KPKG" busybox-static; then
      echo "install: download of $KPKG failed; refreshing the package lists" >&2
      apt_update
      KPKG="$(resolve_kernel)"
      [ -n "$KPKG" ] || { echo "install: cannot resolve linux-image-cloud-amd64 to a kernel package" >&2; exit 1; }
      retry download "$KPKG" busybox-static
    fi
    KDEB="$(ls -t "$CACHE/debs/${KPKG}"_*.deb | head -1)"
    BDEB="$(ls -t "$CACHE/debs"/busybox-static_*.deb | head -1)"
    echo "install: guest kernel $KPKG ($(basename "$KDEB")), busybox $(basename "$BDEB")" >&2

    tmp="$(mktemp -d "$GUEST/.unpack.XXXXXX")"
    trap 'rm -rf "$tmp"' EXIT
    dpkg-deb -x "$KDEB" "$tmp/kernel"
    KREL="$(ls "$tmp/kernel/lib/modules" | head -1)"
    [ -n "$KREL" ] && [ -f "$tmp/kernel/boot/vmlinuz-$KREL" ] ||
      { echo "install: $KDEB holds no boot/vmlinuz-<krel> + lib/modules/<krel>" >&2; exit 1; }
    dpkg-deb -x "$BDEB" "$tmp/busybox"
    [ -x "$tmp/busybox/bin/busybox" ] || { echo "install: $BDEB holds no bin/busybox" >&2; exit 1; }
    rm -rf "${GUEST:?}/$KREL" "$GUEST/busybox"
    mv "$tmp/kernel" "$GUEST/$KREL"
    mv "$tmp/busybox" "$GUEST/busybox"
    rm -rf "$tmp"; trap - EXIT
    .venv/bin/python - "$MANIFEST" "$GUEST" "$KREL" "$KPKG" "$(basename "$KDEB")" "$(basename "$BDEB")" <<'PYEOF'
import json, os, sys
manifest, guest, krel, kpkg, kdeb, bdeb = sys.argv[1:]
root = os.path.join(os.path.abspath(guest), krel)
m = {
    "kernel": os.path.join(root, "boot", "vmlinuz-" + krel),
    "modules_dir": os.path.join(root, "lib", "modules", krel),
    "krel": krel,
    "busybox": os.path.join(os.path.abspath(guest), "busybox", "bin", "busybox"),
    "kernel_package": kpkg,
    "kernel_deb": kdeb,
    "busybox_deb": bdeb,
}
with open(manifest + ".tmp", "w") as f:
    json.dump(m, f, indent=2)
    f.write("\n")
os.replace(manifest + ".tmp", manifest)
PYEOF
    # keep only what the manifest uses: older kernels' debs and unpacked trees go
    find "$CACHE/debs" -name '*.deb' ! -name "$(basename "$KDEB")" ! -name "$(basename "$BDEB")" -delete
    find "$GUEST" -mindepth 1 -maxdepth 1 -type d ! -name busybox ! -name "$KREL" ! -name '.*' \
      -exec rm -rf {} +
  fi
  manifest_ok || { echo "install: guest manifest $MANIFEST is not usable" >&2; exit 1; }
fi
echo "install: ok ($(.venv/bin/python --version))" >&2
