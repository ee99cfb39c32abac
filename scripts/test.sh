#!/usr/bin/env bash
# Sets up a fresh machine and runs skvm's checks: format, lints, and the
# test suite. `--slow` adds the slow tier (full Linux boots).
set -euo pipefail
cd "$(dirname "$0")/.."

slow=0
for arg in "$@"; do
    case "$arg" in
        --slow) slow=1 ;;
        *) echo "usage: $0 [--slow]" >&2; exit 2 ;;
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
    echo "test: NOT RUN: slow tier (bzImage banner, full Linux boot to its init marker, Linux virtio_mem onlining plugged memory); ./scripts/test.sh --slow runs it" >&2
fi
if [ -d /sys/module/kvm_pvm ]; then
    echo "test: note: /dev/kvm is PVM here; Linux was checked to its first serial lines only (it cannot reach userspace on PVM)" >&2
fi
echo "test: all passed in $(( $(date +%s) - start )) s" >&2
