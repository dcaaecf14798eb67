#!/usr/bin/env bash
# Builds a Debian base image for the Containerfile without a registry: a minimal debootstrap
# root with Python (venv) and CA certificates, imported into podman. The image test uses it;
# so can a site whose builders reach Debian's mirror but no container registry.
#
#   scripts/image-base.sh [--release bookworm|trixie] [--mirror URI] [--tag NAME]
#
# Defaults: this machine's Debian release and the mirror its apt uses for it;
# tag localhost/packit-broker-base:RELEASE. The root trusts this machine's CA store (as
# scripts/fresh-debian.sh's roots do), so pip in the build reaches the index this machine
# reaches, through the same TLS proxy if there is one. Needs root (debootstrap) and podman.
set -euo pipefail

release=$(. /etc/os-release 2>/dev/null && echo "${VERSION_CODENAME:-}")
mirror="" tag=""
while [ $# -gt 0 ]; do
  case "$1" in
    --release) release=$2; shift 2 ;;
    --mirror) mirror=$2; shift 2 ;;
    --tag) tag=$2; shift 2 ;;
    *) sed -n '6p' "$0" | sed 's/^# *//' >&2; exit 2 ;;
  esac
done
[ -n "$release" ] || { echo "image-base: not Debian; give --release" >&2; exit 2; }
tag=${tag:-localhost/packit-broker-base:$release}
if [ -z "$mirror" ]; then
  mirror=$(apt-get indextargets --format '$(REPO_URI) $(CODENAME)' 2>/dev/null |
    awk -v r="$release" '$2 == r { print $1; exit }')
  mirror=${mirror:-http://deb.debian.org/debian/}
fi
for tool in debootstrap podman; do
  command -v "$tool" >/dev/null || { echo "image-base: $tool is missing: apt-get install $tool" >&2; exit 1; }
done

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
echo "image-base: debootstrap $release (minbase + python3-venv) from $mirror" >&2
if ! debootstrap --variant=minbase --include=python3-venv,ca-certificates \
  "$release" "$work/root" "$mirror" >"$work/debootstrap.log" 2>&1; then
  tail -n 30 "$work/debootstrap.log" >&2
  echo "image-base: debootstrap failed (above)" >&2
  exit 1
fi
cp /etc/ssl/certs/ca-certificates.crt "$work/root/etc/ssl/certs/ca-certificates.crt"
# What a container image leaves out: package caches and lists, logs, docs.
rm -rf "$work/root"/var/cache/apt/* "$work/root"/var/lib/apt/lists/* "$work/root"/var/log/* \
  "$work/root"/usr/share/doc/* "$work/root"/usr/share/man/* "$work/root"/usr/share/locale/*
tar -C "$work/root" --numeric-owner -c . |
  podman import --change 'CMD ["/bin/bash"]' - "$tag" >/dev/null
echo "$tag"
