#!/usr/bin/env bash
# Sets up a fresh machine and runs skvm's checks: format, lints, and the
# test suite. `--slow` adds the slow tier (full Linux boots); `--linux` then
# runs the nested Linux tier (scripts/linux-tier.sh: the tests inside a Linux
# under QEMU that has a real KVM, for hosts whose /dev/kvm is PVM).
set -euo pipefail
cd "$(dirname "$0")/.."

slow=0 linux=0
for arg in "$@"; do
    case "$arg" in
        --slow) slow=1 ;;
        --linux) linux=1 ;;
        *) echo "usage: $0 [--slow] [--linux]" >&2; exit 2 ;;
    esac
done

start=$(date +%s)
./scripts/setup.sh
./scripts/linux-kit.sh

echo "test: cargo fmt --check" >&2
cargo fmt --all -- --check
(cd tests/guest && cargo fmt -- --check)
echo "test: cargo clippy" >&2
cargo clippy --release --locked --workspace --all-targets -- -D warnings
(cd tests/guest && cargo clippy --release --locked -- -D warnings)
echo "test: cargo test" >&2
cargo test --release --locked --workspace
if ((slow)); then
    echo "test: slow tier" >&2
    cargo test --release --locked --workspace -- --ignored
else
    echo "test: NOT RUN: slow tier (bzImage banner and the 14 full Linux tests: boots, poweroff and reboot, 2 vCPUs, ext4, read-only disk, hwrng and virtio-mem resize through Linux's drivers in every mode); ./scripts/test.sh --slow runs them where Linux can boot, ./scripts/test.sh --linux in the nested tier" >&2
fi
if ((linux)); then
    echo "test: nested Linux tier (scripts/linux-tier.sh)" >&2
    ./scripts/linux-tier.sh
fi
if [ -d /sys/module/kvm_pvm ] && ((!linux)); then
    echo "test: note: /dev/kvm is PVM here; Linux was checked to its first serial lines only (it cannot reach userspace on PVM); ./scripts/test.sh --linux runs the tests inside a nested Linux with a real KVM" >&2
fi
echo "test: all passed in $(( $(date +%s) - start )) s" >&2
