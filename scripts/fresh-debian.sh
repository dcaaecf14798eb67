#!/usr/bin/env bash
# Runs the README's Quick start (or a given command) on a brand-new Debian root, as a first-time
# user would: debootstrap (default variant + git + ca-certificates, nothing else), the repository
# cloned at its committed HEAD into /root/..., a fresh-machine environment. A development machine
# with extra Pythons, make, 0755 folders or a warm .venv hides exactly what breaks there.
#
#   scripts/fresh-debian.sh [--release bookworm|trixie] [--path DIR] [--keep] [-- COMMAND...]
#   scripts/fresh-debian.sh --print-quickstart     # the README's Quick start lines, one a line
#
# Only what a machine needs to reach the same registries is carried over from this host: its CA
# store, apt proxy/Check-Valid-Until settings, pip settings, resolv.conf. Everything runs in a
# private PID and mount namespace, so every process it starts dies and every mount vanishes
# when it ends; the trap cleans up explicitly as well. Needs root.
set -euo pipefail

readonly DEBIAN_PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
readonly CACHE_DIR=${FRESH_DEBIAN_CACHE:-/var/cache/packit-broker}
readonly CACHE_MAX_AGE_DAYS=7
# Environment a CI job or a proxied machine sets for pip and HTTP; passed on when set.
readonly PASSED_ENV=(CI PIP_CERT PIP_INDEX_URL PIP_EXTRA_INDEX_URL PIP_DEFAULT_TIMEOUT
  http_proxy https_proxy no_proxy HTTP_PROXY HTTPS_PROXY NO_PROXY)

SELF=$(readlink -f "${BASH_SOURCE[0]}")
readonly SELF

say() { printf 'fresh-debian: %s\n' "$*" >&2; }
die() {
  say "error: $*"
  exit 2
}
now() { date +%s.%N; }
since() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.1f", b - a }'; }

usage() {
  sed -n '7,8s/^# \{0,3\}//p' "$SELF" >&2
  exit 2
}

# --- the README's Quick start ------------------------------------------------------------------

# The shell lines of the first fenced block under "## Quick start" in the committed README,
# verbatim (blank and comment lines skipped).
quickstart_lines() {
  local repo=$1
  git -C "$repo" show HEAD:README.md | tr -d '\r' | awk '
    /^## / { inqs = ($0 ~ /^## +Quick start *$/); next }
    inqs && /^```/ { if (fence) exit; fence = 1; next }
    inqs && fence && NF && $1 !~ /^#/ { print }
  '
}

# --- the host's mirrors ------------------------------------------------------------------------

# Prints "MAIN_URI SECURITY_URI" from this machine's apt sources (deb822 and one-line formats).
host_mirrors() {
  local files=() f
  for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list /etc/apt/sources.list.d/*.sources; do
    [ -f "$f" ] && files+=("$f")
  done
  [ ${#files[@]} -gt 0 ] || die "no apt sources on this machine (/etc/apt/sources.list{,.d}); cannot tell which Debian mirror to use"
  awk '
    function take(uri, suite) {
      if (suite ~ /-security$/) { if (sec == "") sec = uri } else if (main == "") main = uri
    }
    function flush(   n, s, i) {
      if (types ~ /(^| )deb( |$)/ && enabled != "no" && uri != "") {
        n = split(suites, s, " "); for (i = 1; i <= n; i++) take(uri, s[i])
      }
      types = ""; uri = ""; suites = ""; enabled = ""
    }
    FNR == 1 { flush() }
    FILENAME ~ /\.sources$/ {
      if ($0 ~ /^[ \t]*$/) { flush(); next }
      if ($0 ~ /^#/) next
      key = tolower($1); sub(/:$/, "", key); $1 = ""; sub(/^ +/, "")
      if (key == "types") types = $0
      else if (key == "uris") { split($0, u, " "); uri = u[1] }
      else if (key == "suites") suites = $0
      else if (key == "enabled") enabled = tolower($0)
      next
    }
    $1 == "deb" {
      i = 2
      if ($2 ~ /^\[/) { while (i <= NF && $i !~ /\]$/) i++; i++ }
      take($i, $(i + 1))
    }
    END { flush(); print main, sec }
  ' "${files[@]}"
}

# --- the pristine root, cached as a tarball ----------------------------------------------------

ensure_debootstrap() {
  command -v debootstrap >/dev/null && return
  say "installing debootstrap with apt"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends debootstrap >/dev/null ||
    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends debootstrap; }
}

compressor() { if command -v zstd >/dev/null; then echo zst; else echo gz; fi; }

# Builds the pristine root of $1 into the tarball $2 (debootstrap inside its own mount namespace,
# so the /proc and /sys it mounts cannot outlive it).
build_pristine() {
  local release=$1 tarball=$2 main sec work start
  read -r main sec < <(host_mirrors)
  [ -n "$main" ] || die "no Debian mirror found in this machine's apt sources"
  [ -n "$sec" ] || { sec="${main%/debian}/debian-security"; say "no security mirror in apt sources; using $sec"; }
  ensure_debootstrap
  work=$(mktemp -d "$CACHE_DIR/build-$release.XXXXXX")
  # shellcheck disable=SC2064 # expand now: the path is fixed
  trap "rm -rf --one-file-system '$work'" EXIT
  say "building a pristine $release root with debootstrap from $main (log: $work/debootstrap.log)"
  start=$(now)
  if ! unshare --mount --propagation private -- \
    debootstrap --include=git,ca-certificates "$release" "$work/root" "$main" >"$work/debootstrap.log" 2>&1; then
    tail -n 30 "$work/debootstrap.log" >&2
    die "debootstrap $release from $main failed (see above)"
  fi
  say "timing: debootstrap $release took $(since "$start")s"
  rm -f "$work/root/etc/apt/sources.list"
  cat >"$work/root/etc/apt/sources.list.d/debian.sources" <<EOF
Types: deb
URIs: $main
Suites: $release $release-updates
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Types: deb
URIs: $sec
Suites: $release-security
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
EOF
  start=$(now)
  if [ "${tarball##*.}" = zst ]; then
    tar --numeric-owner --xattrs -C "$work/root" -cf - . | zstd -q -T0 -3 -o "$work/root.tar"
  else
    tar --numeric-owner --xattrs -C "$work/root" -czf "$work/root.tar" .
  fi
  mv "$work/root.tar" "$tarball"
  say "timing: packing $tarball took $(since "$start")s"
  rm -rf --one-file-system "$work"
  trap - EXIT
}

# Prints the path of a pristine tarball of $1 younger than a week, building it if needed.
pristine_tarball() {
  local release=$1 tarball
  mkdir -p "$CACHE_DIR"
  tarball="$CACHE_DIR/debian-$release.tar.$(compressor)"
  exec 9>"$CACHE_DIR/.lock-$release"
  flock 9 # two runs at once build it once
  if [ -z "$(find "$tarball" -maxdepth 0 -mtime "-$CACHE_MAX_AGE_DAYS" 2>/dev/null)" ]; then
    (build_pristine "$release" "$tarball") >&2
  fi
  exec 9>&-
  echo "$tarball"
}

# --- one fresh copy ----------------------------------------------------------------------------

unpack() {
  local tarball=$1 root=$2
  mkdir "$root"
  if [ "${tarball##*.}" = zst ]; then
    zstd -q -dc "$tarball" | tar --numeric-owner --xattrs -xpf - -C "$root"
  else
    tar --numeric-owner --xattrs -xpzf "$tarball" -C "$root"
  fi
}

# /etc/pip.conf without the entries that point to local paths the fresh root does not have
# (a host's wheel folder would make the install depend on this machine).
filter_pip_conf() {
  local root=$1 line key value drop=0
  while IFS= read -r line || [ -n "$line" ]; do
    if [[ $line =~ ^[[:space:]]+([^[:space:]].*)$ ]] && [ -n "${key:-}" ]; then
      value=${BASH_REMATCH[1]} # continuation of a multi-line value
    elif [[ $line =~ ^([A-Za-z0-9_.-]+)[[:space:]]*[=:][[:space:]]*(.*)$ ]]; then
      key=${BASH_REMATCH[1]} value=${BASH_REMATCH[2]} drop=0
    else
      key="" value=""
      printf '%s\n' "$line"
      continue
    fi
    value=${value#file://}
    if [[ $value == /* ]] && [ ! -e "$root$value" ]; then
      say "not carrying over /etc/pip.conf's $key = $value (no such path in the fresh root)"
      drop=1
    fi
    [ "$drop" = 1 ] || printf '%s\n' "$line"
  done </etc/pip.conf
}

# What this machine needs to reach the same mirrors and registries, and nothing else.
carry_over_host_settings() {
  local root=$1 f
  mkdir -p "$root/usr/local/share/ca-certificates"
  for f in /usr/local/share/ca-certificates/*.crt; do
    [ -e "$f" ] && cp "$f" "$root/usr/local/share/ca-certificates/"
  done
  apt-config dump 2>/dev/null |
    grep -E -i '^Acquire::((https?|ftp)::Proxy|Check-Valid-Until|Check-Date)' \
      >"$root/etc/apt/apt.conf.d/99fresh-debian-host" || rm -f "$root/etc/apt/apt.conf.d/99fresh-debian-host"
  if [ -f /etc/pip.conf ]; then filter_pip_conf "$root" >"$root/etc/pip.conf"; fi
  rm -f "$root/etc/resolv.conf"
  cp -L /etc/resolv.conf "$root/etc/resolv.conf"
  printf '127.0.0.1\tlocalhost %s\n::1\t\tlocalhost ip6-localhost ip6-loopback\n' \
    "$(hostname)" >"$root/etc/hosts"
}

# The repository's committed HEAD, cloned like CI would (nothing uncommitted comes along).
clone_repo() {
  local repo=$1 dest=$2 sha branch dirty
  sha=$(git -C "$repo" rev-parse HEAD)
  branch=$(git -C "$repo" symbolic-ref -q --short HEAD || true)
  dirty=$(git -C "$repo" status --porcelain --untracked-files=no | wc -l)
  [ "$dirty" = 0 ] || say "note: $dirty uncommitted change(s) in $repo are not in the fresh root"
  (umask 022 && mkdir -p "$(dirname "$dest")")
  git clone -q --no-hardlinks --no-checkout "$repo" "$dest"
  if [ -n "$branch" ]; then git -C "$dest" checkout -q -B "$branch" "$sha"; else git -C "$dest" checkout -q --detach "$sha"; fi
  say "cloned $repo at ${sha:0:12}${branch:+ ($branch)} into ${dest#"$ROOT"}"
}

# --- inside the namespaces (pid 1 of a new PID namespace, private mounts) ----------------------

# shellcheck disable=SC2317 # run by a trap
inner_cleanup() {
  local rc=$? m
  trap - EXIT INT TERM
  disown -a 2>/dev/null || true # no "Killed" job notices for what follows
  kill -KILL -1 2>/dev/null || true # every process of this PID namespace but pid 1 (us)
  wait 2>/dev/null || true
  for ((m = ${#MOUNTED[@]} - 1; m >= 0; m--)); do
    umount "${MOUNTED[m]}" 2>/dev/null || umount -R "${MOUNTED[m]}" 2>/dev/null || umount -l "${MOUNTED[m]}" || true
  done
  exit "$rc"
}

mnt() {
  local target=$1
  shift
  mount "$@" "$target"
  MOUNTED+=("$target")
}

mount_system_dirs() {
  local root=$1 release=$2 n
  # / must be a mount point, as on a real machine: `ip netns exec` / `ip -n` begin with
  # `mount --make-rslave /`, which fails with EINVAL on a plain chroot folder.
  mnt "$root" --bind "$root"
  mnt "$root/proc" -t proc -o nosuid,nodev,noexec proc
  mnt "$root/sys" -t sysfs -o ro,nosuid,nodev,noexec sysfs
  # The control groups, as a booted machine has them: podman's runtime (the image test) needs
  # them. Each sub-mount of a cgroup v1 tree is unmounted with the tree (umount -l, then -R).
  if mountpoint -q /sys/fs/cgroup; then mnt "$root/sys/fs/cgroup" --rbind /sys/fs/cgroup; fi
  # A /dev of its own: the usual nodes bound from the host, its own ptys and shared memory.
  mnt "$root/dev" -t tmpfs -o mode=0755,nosuid dev
  for n in null zero full random urandom tty; do
    touch "$root/dev/$n"
    mnt "$root/dev/$n" --bind "/dev/$n"
  done
  ln -s /proc/self/fd "$root/dev/fd"
  ln -s /proc/self/fd/0 "$root/dev/stdin"
  ln -s /proc/self/fd/1 "$root/dev/stdout"
  ln -s /proc/self/fd/2 "$root/dev/stderr"
  mkdir "$root/dev/pts" "$root/dev/shm"
  mnt "$root/dev/pts" -t devpts -o newinstance,ptmxmode=0666,mode=0620,gid=5,nosuid,noexec devpts
  ln -s pts/ptmx "$root/dev/ptmx"
  mnt "$root/dev/shm" -t tmpfs -o mode=1777,nosuid,nodev shm
  # Debian 13 mounts /tmp as a tmpfs by default; the rig's temp folders live there.
  if [ "$release" != bookworm ]; then mnt "$root/tmp" -t tmpfs -o mode=1777,nosuid,nodev tmpfs; fi
}

# Runs in the fresh root as root, in the clone, with a fresh machine's environment.
in_root() {
  local envs=(HOME=/root PATH="$DEBIAN_PATH" LANG=C.UTF-8 SHELL=/bin/bash USER=root LOGNAME=root) v
  [ -n "${TERM:-}" ] && envs+=(TERM="$TERM")
  for v in "${PASSED_ENV[@]}"; do
    if [ -n "${!v+x}" ]; then
      if [ "$v" = PIP_CERT ] && [ ! -e "$ROOT${!v}" ]; then
        say "not passing PIP_CERT=${!v} (no such file in the fresh root)"
        continue
      fi
      envs+=("$v=${!v}")
    fi
  done
  # In the background so a signal's trap runs at once (bash defers traps until a foreground
  # command ends); with SIGINT/SIGQUIT back to default, which bash ignores for background jobs.
  # shellcheck disable=SC2016 # $1 and $@ belong to the inner sh
  env --default-signal=INT,QUIT -i "${envs[@]}" \
    chroot "$ROOT" /bin/sh -c 'cd "$1" && shift && exec "$@"' sh "$CLONE" "$@" <&0 &
  wait "$!"
}

inner_main() {
  ROOT=$1 CLONE=$2 RELEASE=$3 MODE=$4
  shift 4
  # The cleanup kills every process it can see: only ever as pid 1 of its own PID namespace.
  [ $$ = 1 ] || die "--inner is internal: it runs as pid 1 of the namespace main() creates"
  MOUNTED=()
  trap inner_cleanup EXIT
  trap 'exit 130' INT
  trap 'exit 143' TERM
  mount_system_dirs "$ROOT" "$RELEASE"
  local out
  out=$(env -i PATH="$DEBIAN_PATH" chroot "$ROOT" update-ca-certificates 2>&1) ||
    die "update-ca-certificates failed in the fresh root: $out"
  local start rc=0 cmd
  if [ "$MODE" = argv ]; then
    start=$(now)
    in_root "$@" || rc=$?
    printf 'fresh-debian[%s]: timing: [%s] exited %d after %ss\n' "$RELEASE" "$*" "$rc" "$(since "$start")"
    exit "$rc"
  fi
  for cmd in "$@"; do
    start=$(now)
    in_root /bin/sh -c "$cmd" || rc=$?
    printf 'fresh-debian[%s]: timing: [%s] exited %d after %ss\n' "$RELEASE" "$cmd" "$rc" "$(since "$start")"
    [ "$rc" = 0 ] || exit "$rc"
  done
}

# --- on the host -------------------------------------------------------------------------------

# shellcheck disable=SC2317 # run by a trap
outer_cleanup() {
  local rc=$?
  trap - EXIT INT TERM
  if [ -n "${TMP_PARENT:-}" ] && [ -d "$TMP_PARENT" ]; then
    # The mounts live in the child's namespace only; refuse to delete anything still mounted.
    if awk -v p="$TMP_PARENT/" 'index($5, p) == 1 { found = 1 } END { exit !found }' /proc/self/mountinfo; then
      say "mounts remain under $TMP_PARENT; not removing it"
      [ "$rc" != 0 ] || rc=1
    elif [ "$KEEP" = 1 ]; then
      say "kept the root: $ROOT (clone at $CLONE; chroot '$ROOT' to look around)"
    else
      local start
      start=$(now)
      rm -rf --one-file-system "$TMP_PARENT"
      say "timing: removing the root took $(since "$start")s"
    fi
  fi
  exit "$rc"
}

# pid 1 of a new PID namespace (the kernel kills the rest when it ends) with private mounts.
# In the background for the same reason as in_root; `unshare --fork` itself ignores INT and TERM.
in_namespaces() {
  env --default-signal=INT,QUIT unshare --pid --fork --kill-child --mount --propagation private -- \
    bash "$SELF" --inner "$ROOT" "$CLONE" "$@" <&0 &
  NAMESPACE_PID=$!
  wait "$NAMESPACE_PID"
}

# Interrupted: pid 1 of the namespace cleans up (its trap), then the root is removed.
# shellcheck disable=SC2317 # run by a trap
on_signal() {
  local rc=$1 pid1
  if [ -n "${NAMESPACE_PID:-}" ] && kill -0 "$NAMESPACE_PID" 2>/dev/null; then
    pid1=$(pgrep -P "$NAMESPACE_PID" || true)
    [ -z "$pid1" ] || kill -TERM "$pid1" 2>/dev/null || true
    while kill -0 "$NAMESPACE_PID" 2>/dev/null; do wait "$NAMESPACE_PID" || true; done
  fi
  exit "$rc"
}

main() {
  local release=bookworm path=/root/packit-broker cmd=() repo tarball start lines=() rc=0
  KEEP=0
  while [ $# -gt 0 ]; do
    case $1 in
      --release) release=${2:?--release needs bookworm or trixie}; shift 2 ;;
      --path) path=${2:?--path needs an absolute folder}; shift 2 ;;
      --keep) KEEP=1; shift ;;
      --print-quickstart) repo=$(git -C "$(dirname "$SELF")" rev-parse --show-toplevel); quickstart_lines "$repo"; return ;;
      --) shift; cmd=("$@"); break ;;
      -h | --help) usage ;;
      *) say "unknown argument: $1"; usage ;;
    esac
  done
  case $release in bookworm | trixie) ;; *) die "--release must be bookworm or trixie, not '$release'" ;; esac
  [[ $path == /?* && $path != *//* && "/$path/" != */../* && "/$path/" != */./* ]] ||
    die "--path must be an absolute, normalized folder (got '$path')"
  [ "$(id -u)" = 0 ] || die "needs root (debootstrap, chroot, mounts): run it with sudo"
  repo=$(git -C "$(dirname "$SELF")" rev-parse --show-toplevel)

  if [ ${#cmd[@]} -eq 0 ]; then
    mapfile -t lines < <(quickstart_lines "$repo")
    [ ${#lines[@]} -gt 0 ] ||
      die "no commands found in the fenced block under '## Quick start' in $repo/README.md (committed HEAD)"
    say "Quick start commands from README.md: $(printf '[%s] ' "${lines[@]}")"
  fi

  tarball=$(pristine_tarball "$release")
  TMP_PARENT=$(mktemp -d "${TMPDIR:-/var/tmp}/fresh-debian-$release.XXXXXX")
  ROOT="$TMP_PARENT/root" CLONE="$path"
  trap outer_cleanup EXIT
  trap 'on_signal 130' INT
  trap 'on_signal 143' TERM
  start=$(now)
  unpack "$tarball" "$ROOT"
  say "timing: unpacking $(basename "$tarball") took $(since "$start")s"
  start=$(now)
  carry_over_host_settings "$ROOT"
  clone_repo "$repo" "$ROOT$path"
  say "timing: host settings and clone took $(since "$start")s"

  if [ ${#cmd[@]} -gt 0 ]; then
    in_namespaces "$release" argv "${cmd[@]}" || rc=$?
  else
    in_namespaces "$release" lines "${lines[@]}" || rc=$?
  fi
  exit "$rc"
}

# Both branches end in exit: bash reads a script as it goes, so a run must never read past this
# block (a `git pull` during a run would otherwise execute whatever the new file has there).
if [ "${1:-}" = --inner ]; then
  shift
  inner_main "$@"
  exit "$?"
else
  main "$@"
  exit "$?"
fi
