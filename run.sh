#!/usr/bin/env bash
# kiosk-fleet: the two set-up commands.
#   ./run.sh demo   broker + fleet server + a simulated fleet of terminals (Ctrl-C stops)
#   ./run.sh test   the whole test suite (extra arguments go to pytest)
#   ./run.sh dist   the agent and server wheels (+ the agent's hash-pinned dependency lock) into dist/
# Both install what they need first (Debian packages, a Python venv in .venv), idempotently.
set -euo pipefail
cd "$(dirname "$0")"

PY=${PYTHON:-python3}
VENV=.venv
SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"

apt_install() {
    local missing=()
    for pkg in "$@"; do
        # "install ok installed" only: a removed package keeps a dpkg record with its config files
        [ "$(dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null)" = "install ok installed" ] || missing+=("$pkg")
    done
    [ ${#missing[@]} -eq 0 ] && return 0
    echo "installing Debian packages: ${missing[*]}"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
}

ensure_system() {
    local pkgs=(mosquitto)
    # tests also run Prometheus (promtool, a real scrape) and Chromium for the console, with a
    # Chinese font so the console's screenshots show characters rather than boxes
    [ "${1:-}" = test ] && pkgs+=(mosquitto-clients prometheus chromium fonts-wqy-microhei)
    apt_install "${pkgs[@]}"
    if ! "$PY" -c 'import venv, ensurepip' >/dev/null 2>&1; then
        apt_install python3-venv
    fi
}

ensure_venv() {
    local extras=$1 stamp="$VENV/.installed-$1"
    if [ ! -x "$VENV/bin/python" ]; then
        "$PY" -m venv "$VENV"
    fi
    # Reinstall only when the dependency list changed.
    local want
    want=$(sha256sum pyproject.toml | cut -c1-16)
    if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
        echo "installing Python dependencies into $VENV ($extras)"
        # pip and the build backend are chatty: keep their output in a log, show it on failure
        if ! { "$VENV/bin/python" -m pip install -q --upgrade pip &&
               "$VENV/bin/python" -m pip install -q -e ".[$extras]"; } >"$VENV/install.log" 2>&1; then
            tail -n 40 "$VENV/install.log" >&2
            echo "installing Python dependencies failed; full log: $VENV/install.log" >&2
            exit 1
        fi
        echo "$want" > "$stamp"
    fi
}

cmd=${1:-help}
shift || true
case "$cmd" in
    demo)
        ensure_system demo
        ensure_venv server
        exec "$VENV/bin/fleet-demo" "$@"
        ;;
    test)
        ensure_system test
        ensure_venv server,dev,face
        exec "$VENV/bin/python" -m pytest "$@"
        ;;
    dist)
        ensure_venv server,dev
        exec "$VENV/bin/python" -m fleet_dev.dist "$@"
        ;;
    *)
        sed -n '2,6p' "$0"
        exit 2
        ;;
esac
