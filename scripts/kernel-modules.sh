#!/usr/bin/env bash
# Extract kernel modules, with everything they depend on, from a Debian
# linux-image package.
#
# Usage: scripts/kernel-modules.sh DEB OUTDIR MODULE...
#
# Writes OUTDIR/NAME.ko (decompressed) for each module and its dependencies,
# and OUTDIR/load-order: one name a line, dependencies first, for insmod.
# A module the kernel has built in is not in the package: it is an error to
# ask for one (the caller should know its kernel's config).
set -euo pipefail

die() { printf 'kernel-modules: error: %s\n' "$*" >&2; exit 1; }
(($# >= 3)) || die "usage: $0 DEB OUTDIR MODULE..."
DEB=$1 OUT=$2
shift 2
[[ -s $DEB ]] || die "no package at $DEB"
command -v strings >/dev/null || die "strings (binutils) is needed"

WORK=$(mktemp -d "${TMPDIR:-/tmp}/kernel-modules.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
mkdir -p "$OUT"
dpkg-deb -c "$DEB" | awk '{print $NF}' | grep -E '\.ko(\.xz|\.zst)?$' >"$WORK/list"

# path_of NAME: the module's path in the package ('-' and '_' are one).
path_of() {
    awk -v n="${1//-/_}" '{f=$0; sub(/.*\//, "", f); sub(/\.ko.*$/, "", f); gsub(/-/, "_", f); if (f == n) {print; exit}}' \
        "$WORK/list"
}

declare -A DEPS=()
wanted=("$@")
# Extract in rounds, one pass over the package each, until no new dependency appears.
while ((${#wanted[@]})); do
    paths=()
    for name in "${wanted[@]}"; do
        name=${name//-/_}
        [[ -z ${DEPS[$name]+set} ]] || continue
        path=$(path_of "$name")
        [[ -n $path ]] || die "module $name is not in $DEB (built in, or misspelt?)"
        DEPS[$name]=""
        paths+=("$path")
    done
    ((${#paths[@]})) || break
    dpkg-deb --fsys-tarfile "$DEB" | tar -x -C "$WORK" "${paths[@]}"
    wanted=()
    for path in "${paths[@]}"; do
        name=${path##*/}
        name=${name%%.ko*}
        name=${name//-/_}
        case "$path" in
            *.xz) xz -dc "$WORK/$path" >"$OUT/$name.ko" ;;
            *.zst) zstd -qdc "$WORK/$path" >"$OUT/$name.ko" ;;
            *) cp "$WORK/$path" "$OUT/$name.ko" ;;
        esac
        deps=$(strings "$OUT/$name.ko" | sed -n 's/^depends=//p' | head -n1)
        DEPS[$name]=${deps//,/ }
        read -ra more <<<"${DEPS[$name]}"
        wanted+=("${more[@]}")
    done
done

# Dependencies first (a depth-first walk from each module asked for).
declare -A PLACED=()
order=()
place() {
    local dep
    [[ -z ${PLACED[$1]+set} ]] || return 0
    PLACED[$1]=1
    for dep in ${DEPS[$1]}; do place "${dep//-/_}"; done
    order+=("$1")
}
for name in "$@"; do place "${name//-/_}"; done
printf '%s\n' "${order[@]}" >"$OUT/load-order"
