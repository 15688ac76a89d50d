#!/usr/bin/env bash
# Installs what sgw needs on a fresh Debian or Ubuntu machine, idempotently:
#   system packages (python3-venv, openssl, mosquitto, prometheus/promtool, systemd-analyze, postgresql) and a
#   venv in .venv.
# Sourced by scripts/test and scripts/demo. Set SGW_SKIP_APT=1 to skip the apt step.
set -euo pipefail
SGW_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export SGW_ROOT

sgw_say() { printf '[sgw] %s\n' "$*" >&2; }

sgw_apt_install() {
    # $@: packages; installs only the missing ones, with sudo when not root.
    local missing=()
    for p in "$@"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
    done
    [ "${#missing[@]}" -eq 0 ] && return 0
    if [ "${SGW_SKIP_APT:-0}" = "1" ]; then
        sgw_say "missing system packages ${missing[*]} but SGW_SKIP_APT=1; continuing"
        return 0
    fi
    local sudo=""
    [ "$(id -u)" -ne 0 ] && sudo="sudo"
    sgw_say "installing system packages with apt-get: ${missing[*]}"
    $sudo env DEBIAN_FRONTEND=noninteractive apt-get update -qq
    $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
}

sgw_bootstrap() {
    # $1: "test" adds the tools the test suite drives (promtool, systemd-analyze, dev extras).
    local mode="${1:-run}"
    local pkgs=(mosquitto mosquitto-clients openssl ca-certificates)
    # postgresql: the store tests run a throwaway cluster (initdb/pg_ctl, tests/support/postgres.py).
    [ "$mode" = "test" ] && pkgs+=(prometheus systemd postgresql)
    command -v python3 >/dev/null || pkgs+=(python3)
    python3 -c 'import ensurepip, venv' 2>/dev/null || pkgs+=(python3-venv)
    sgw_apt_install "${pkgs[@]}"
    python3 -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else 1)' \
        || { sgw_say "sgw needs Python >= 3.11 (found $(python3 -V 2>&1)); install it and retry"; exit 1; }
    local venv="$SGW_ROOT/.venv"
    if [ ! -x "$venv/bin/python" ]; then
        sgw_say "creating the virtual environment in $venv"
        python3 -m venv "$venv"
    fi
    local extra=""
    [ "$mode" = "test" ] && extra="[dev]"
    # A stamp keeps re-runs fast: reinstall only when pyproject.toml changed.
    local stamp="$venv/.sgw-installed-$mode"
    if [ ! -f "$stamp" ] || [ "$SGW_ROOT/pyproject.toml" -nt "$stamp" ]; then
        sgw_say "installing sgw$extra into the venv (pip)"
        "$venv/bin/python" -m pip install -q --upgrade pip
        "$venv/bin/python" -m pip install -q -e "$SGW_ROOT$extra"
        touch "$stamp"
    fi
    export PATH="$venv/bin:$PATH"
}
