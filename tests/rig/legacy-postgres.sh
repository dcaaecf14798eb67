#!/usr/bin/env bash
# Test-only: a PostgreSQL older than 17 (no direct TLS) for tests/integration/test_check_legacy_postgres.py.
#
# Debian 12: `apt-get install postgresql-15` (its system service is never started).
# Debian 13 and later have no PostgreSQL 15, so bookworm's packages (postgresql-15 and the
# libraries it links that a later release lacks or names differently) are downloaded with apt
# from the same mirror, using a private apt state (nothing in /etc/apt changes), and unpacked
# with `dpkg -x` into $DEST. The rig runs them from there with LD_LIBRARY_PATH
# (tests/rig/legacy_postgres.py). Idempotent.
set -euo pipefail

DEST=${LEGACY_POSTGRES_DEST:-/var/cache/packit-broker/legacy-postgresql-15}
BIN=/usr/lib/postgresql/15/bin

[ -x "$BIN/postgres" ] && exit 0
[ -x "$DEST$BIN/postgres" ] && exit 0

export DEBIAN_FRONTEND=noninteractive
if apt-cache show postgresql-15 >/dev/null 2>&1; then
  apt-get install -y -qq --no-install-recommends postgresql-15 >/dev/null
  exit 0
fi

# The mirror this machine's apt already uses (deb822 .sources or a one-line sources.list).
mirror=$(grep -rhoE '^URIs:\s*\S+' /etc/apt/sources.list.d/*.sources 2>/dev/null | grep -v security |
  head -n 1 | awk '{print $2}' || true)
[ -n "$mirror" ] || mirror=$(grep -hoE '^deb\s+(\[[^]]*\]\s+)?\S+' /etc/apt/sources.list 2>/dev/null |
  grep -v security | head -n 1 | awk '{print $NF}' || true)
[ -n "$mirror" ] || mirror=http://deb.debian.org/debian

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
mkdir -p "$work/lists/partial" "$work/archives/partial" "$work/debs"
touch "$work/status"
echo "deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] $mirror bookworm main" \
  >"$work/sources.list"
APT_OPTS=(
  -o "Dir::Etc::SourceList=$work/sources.list" -o "Dir::Etc::SourceParts=/dev/null"
  -o "Dir::State::Lists=$work/lists" -o "Dir::State::status=$work/status"
  -o "Dir::Cache::Archives=$work/archives" -o "Dir::Cache=$work" -o "APT::Get::List-Cleanup=0"
  -o "APT::Sandbox::User=root"
)
echo "legacy-postgres: fetching bookworm's postgresql-15 from $mirror into $DEST"
apt-get "${APT_OPTS[@]}" update -qq
(cd "$work/debs" && apt-get "${APT_OPTS[@]}" download -qq postgresql-15 libicu72 libldap-2.5-0 libpq5 libxml2)
rm -rf "$DEST.new"
mkdir -p "$DEST.new"
for deb in "$work"/debs/*.deb; do dpkg -x "$deb" "$DEST.new"; done

libdir="$DEST.new/usr/lib/$(uname -m)-linux-gnu"
missing=$(LD_LIBRARY_PATH=$libdir ldd "$DEST.new$BIN/postgres" "$DEST.new$BIN/initdb" |
  grep 'not found' || true)
if [ -n "$missing" ]; then
  echo "legacy-postgres: bookworm's PostgreSQL 15 still lacks libraries here:" >&2
  echo "$missing" >&2
  exit 1
fi
rm -rf "$DEST"
mv "$DEST.new" "$DEST"
chmod -R a+rX "$DEST"
chmod a+rx "$(dirname "$DEST")"
echo "legacy-postgres: ready in $DEST"
