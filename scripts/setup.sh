#!/usr/bin/env bash
# Prepares a fresh Debian machine to build and run skvm: host packages,
# a /dev/kvm check, and a release build (which also builds the test guest).
set -euo pipefail
cd "$(dirname "$0")/.."

log() { printf 'setup: %s\n' "$*" >&2; }

need_packages=()
command -v objdump >/dev/null || need_packages+=(binutils)
command -v cc >/dev/null || need_packages+=(gcc)
command -v iasl >/dev/null || need_packages+=(acpica-tools)  # tests check our ACPI tables with ACPICA
# The study's peer column (`skvm bench`); the tests run it with the quick preset.
command -v qemu-system-x86_64 >/dev/null || need_packages+=(qemu-system-x86)
# The study's host-disk group sets skvm beside the host's own fio on the same file.
command -v fio >/dev/null || need_packages+=(fio)
# The virtio-net tests: a network namespace and a tap (iproute2), pings both ways.
ip -V 2>/dev/null | grep -q iproute2 || need_packages+=(iproute2)
[[ -x /usr/bin/ping ]] || need_packages+=(iputils-ping)
if ((${#need_packages[@]})); then
    log "installing ${need_packages[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${need_packages[@]}" >/dev/null
fi

command -v cargo >/dev/null || { log "cargo not found: install a Rust toolchain (rustup) first"; exit 1; }
if [ ! -c /dev/kvm ]; then
    log "warning: /dev/kvm is missing; skvm builds but cannot run guests here"
elif [ -d /sys/module/kvm_pvm ]; then
    log "note: /dev/kvm is PVM (software nested virtualisation): guest ring 0 is emulated"
fi

log "building skvm and its test guest (release)"
cargo build --release --locked
log "ready: ./target/release/skvm run"
