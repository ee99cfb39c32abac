#!/usr/bin/env bash
# Sets up a fresh machine and runs skvm's checks: format, lints, the test
# suite, then the tests that boot Linux to userspace. Where /dev/kvm is PVM
# (Linux cannot reach userspace on it) those run in the nested Linux tier
# (scripts/linux-tier.sh: the whole suite inside a Linux under QEMU that has
# a real KVM); elsewhere as the slow tier, directly.
#   --quick   skip the Linux tests (the fast suite alone, about 4 minutes)
#   --slow    the slow tier directly, even on a PVM host (where it fails)
#   --linux   the nested tier, even on a host with hardware virtualisation
set -euo pipefail
cd "$(dirname "$0")/.."

slow=0 linux=0 quick=0
for arg in "$@"; do
    case "$arg" in
        --quick) quick=1 ;;
        --slow) slow=1 ;;
        --linux) linux=1 ;;
        *) echo "usage: $0 [--quick] [--slow] [--linux]" >&2; exit 2 ;;
    esac
done
if ((!quick && !slow && !linux)); then
    if [ -d /sys/module/kvm_pvm ]; then linux=1; else slow=1; fi
fi

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
elif ((!linux)); then
    echo "test: NOT RUN (--quick): the slow tier (bzImage banner and the 15 full Linux tests: boots, poweroff and reboot, 2 vCPUs, ext4, read-only disk, hwrng, virtio-mem resize and fio through Linux's drivers in every mode)" >&2
fi
if ((linux)); then
    echo "test: nested Linux tier (scripts/linux-tier.sh)" >&2
    # Limits that keep a hung emulator well inside CI's 90 minutes. The
    # Linux tests' binary takes about 14 minutes in L1 on an Intel host and
    # about 27 on an AMD one (where QEMU's emulation of L1 is slower).
    ./scripts/linux-tier.sh --timeout 2400 --tier-timeout 3600
fi
if [ -d /sys/module/kvm_pvm ] && ((!linux)); then
    echo "test: note: /dev/kvm is PVM here; Linux was checked to its first serial lines only (it cannot reach userspace on PVM); without --quick the nested tier runs the Linux tests" >&2
fi
echo "test: all passed in $(( $(date +%s) - start )) s" >&2
