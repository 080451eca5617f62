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

# 2. the virtual environment and the Python packages (pyproject.toml: none at run time,
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
echo "install: ok ($(.venv/bin/python --version))" >&2
