#!/usr/bin/env bash
# Build a static fio for the Linux kit's guests, from Debian's source package.
#
# Usage: scripts/build-fio.sh [OUTDIR]     (default: <repo>/build/fio)
#
# Produces OUTDIR/fio: one static binary with fio's built-in engines (psync,
# io_uring: no libaio or liburing needed) and nothing that needs a library at
# run time. Debian's own fio links 64 libraries (Ceph, RDMA, PMEM, ...), 80 MB
# that the kit's initramfs would carry into every guest boot; this one is about
# 4 MB. It is built for plain x86-64 (--disable-native): the nested tier's
# guests run on QEMU's qemu64 CPU model.
#
# The source comes from Debian's deb-src archive through a private apt state
# (the system's apt configuration is left alone). Idempotent: skipped when
# OUTDIR/fio exists and is newer than this script.
set -euo pipefail

SCRIPT="$(readlink -f "${BASH_SOURCE[0]}")"
REPO_ROOT="$(cd "$(dirname "$SCRIPT")/.." && pwd)"
OUT="${1:-$REPO_ROOT/build/fio}"
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"

say() { printf 'build-fio: %s\n' "$*" >&2; }
die() { printf 'build-fio: error: %s\n' "$*" >&2; exit 1; }
TMP="$(mktemp -d "${TMPDIR:-/tmp}/build-fio.XXXXXX")"
trap 'rm -rf "$TMP"' EXIT
# shellcheck source=lib/apt.sh
source "$REPO_ROOT/scripts/lib/apt.sh"

if [[ -x "$OUT/fio" && "$OUT/fio" -nt "$SCRIPT" ]]; then
    say "up to date: $OUT/fio ($("$OUT/fio" --version))"
    exit 0
fi

need_tool gcc gcc
need_tool make make

CODENAME=$(sed -n 's/^VERSION_CODENAME=//p' /etc/os-release 2>/dev/null | tr -d '"')
apt="$TMP/apt"
mkdir -p "$apt/lists/partial" "$apt/cache/archives/partial" "$TMP/src"
chmod 755 "$TMP" "$TMP/src"
APT=(-o "Dir::Etc::SourceList=$apt/sources.list" -o Dir::Etc::SourceParts=/dev/null
    -o "Dir::State::Lists=$apt/lists" -o "Dir::Cache=$apt/cache" -o APT::Sandbox::User=root)
echo "deb-src [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://deb.debian.org/debian ${CODENAME:-bookworm} main" \
    >"$apt/sources.list"
say "fetching fio's source package (${CODENAME:-bookworm})"
quiet apt-get "${APT[@]}" update -qq
(cd "$TMP/src" && quiet apt-get "${APT[@]}" source --download-only -qq fio)
orig=$(ls "$TMP"/src/fio_*.orig.tar.* | head -n1)
[[ -f "$orig" ]] || die "no fio source tarball"
tar -xf "$orig" -C "$TMP/src"
dir=$(find "$TMP/src" -mindepth 1 -maxdepth 1 -type d -name 'fio*' | head -n1)

say "building $(basename "$dir") (static, generic x86-64)"
(
    cd "$dir"
    quiet ./configure --build-static --disable-native --disable-numa --disable-rdma --disable-rados \
        --disable-rbd --disable-http --disable-gfapi --disable-pmem --disable-xnvme --disable-libzbc \
        --disable-tcmalloc --disable-shm --extra-cflags="-march=x86-64 -mtune=generic"
    quiet make -j"${FIO_JOBS:-$(nproc)}" fio
)
install -m 0755 "$dir/fio" "$OUT/fio.tmp"
strip "$OUT/fio.tmp"
# A static binary or nothing: the kit has no library for it to load.
if ldd "$OUT/fio.tmp" 2>&1 | grep -q '=>'; then
    die "fio came out dynamically linked"
fi
mv "$OUT/fio.tmp" "$OUT/fio"
say "built $OUT/fio ($("$OUT/fio" --version), $(du -h "$OUT/fio" | cut -f1))"
