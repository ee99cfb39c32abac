#!/usr/bin/env bash
# The nested Linux test tier. Where /dev/kvm cannot run a Linux guest to
# userspace (PVM hosts), boot Debian's kernel as "L1" under QEMU's software
# emulation with an emulated AMD SVM, load KVM inside L1, and run skvm's
# tests there: the slow full-Linux-boot tests and the rest of the suite.
#
# Usage: scripts/linux-tier.sh [options]
#   --only linux        only the slow Linux tests (the linux_boot binary with --ignored)
#   --only others       only the other test binaries, run normally (no --ignored)
#   --only BINARY       only the test binary BINARY (e.g. devices), run normally
#                       (default: linux, then others)
#   --filter NAME       hand NAME to every selected test binary as its test filter
#   --test-threads N    libtest threads (default: 1 for the Linux tests, 2 for the others)
#   --timeout SECS      limit per test binary inside L1 (default 2400)
#   --tier-timeout SECS limit for one L1 boot with all its tests (default 14400)
#   --no-build          skip cargo: reuse the binaries of the last successful build
#   --exec SCRIPT       instead of the tests, run the shell script SCRIPT in L1
#                       (busybox sh; for chasing a hang by hand)
#   --bench quick|full  instead of the tests, run `skvm bench --linux` in L1 (fio in
#                       L2 Linux guests, every memory mode); the table goes to
#                       build/linux-tier/bench/linux.md
#   -h, --help          this text
#
# Examples: scripts/linux-tier.sh                  (everything, about 15 min)
#           scripts/linux-tier.sh --only linux --filter slow_linux_sees_two_vcpus
#           scripts/linux-tier.sh --only devices --no-build
#
# Output: L1's serial console streamed to stderr ("L1| " prefix) and kept in
# build/linux-tier/logs/; a summary table; exit status 0 only when every
# selected binary passed. Each binary prints `TIER-RESULT <binary> PASS|FAIL|TIMEOUT <secs>`.
# If L1's userspace prints nothing for 120 s (TIER_STALL_SECS; L1 prints a
# heartbeat every 60 s) QEMU is killed and the binaries without a result run
# again once ("STALL"); likewise after a kernel panic in L1.
#
# L1 has 1 vCPU and ticks periodically: see run_l1 for what 2 vCPUs and
# one-shot timers did. To experiment: TIER_L1_SMP=2, TIER_L1_CPU=<qemu -cpu>,
# TIER_L1_APPEND=<more of L1's command line>.
#
# Cached under build/linux-tier/: QEMU 10 from Debian's bookworm-backports
# (fetched with a private apt state, the system's apt configuration is left
# alone), the kernel's KVM modules, busybox, the L1 initramfs (rebuilt when
# any file in it changes). Only Debian packages are downloaded.
set -euo pipefail

SCRIPT="$(readlink -f "${BASH_SOURCE[0]}")"
REPO_ROOT="$(cd "$(dirname "$SCRIPT")/.." && pwd)"
T="$REPO_ROOT/build/linux-tier"
KIT="$REPO_ROOT/build/linux-kit"

say() { printf 'linux-tier: %s\n' "$*" >&2; }
die() { printf 'linux-tier: error: %s\n' "$*" >&2; exit 1; }
warn() { printf 'linux-tier: WARNING: %s\n' "$*" >&2; }
# usage: the options (to stderr, status 2); with 0, the whole header (to stdout).
usage() {
    if [[ ${1:-2} == 0 ]]; then
        sed -n '2,/^set -euo/{/^#/p}' "$SCRIPT" | sed 's/^# \{0,1\}//'
        exit 0
    fi
    sed -n '/^# Usage:/,/^#   -h/p' "$SCRIPT" | sed 's/^# \{0,1\}//' >&2
    exit 2
}

ONLY=all FILTER="" THREADS="" BIN_TIMEOUT=2400 TIER_TIMEOUT=14400 BUILD=1 EXEC="" BENCH=""
STALL_SECS=${TIER_STALL_SECS:-120}
# For experiments: L1's CPU model and count, and more of its command line.
L1_CPU=${TIER_L1_CPU:-qemu64,+svm,+npt} L1_SMP=${TIER_L1_SMP:-1} L1_APPEND=${TIER_L1_APPEND:-}
while (($#)); do
    case "$1" in
        --only) [[ $# -ge 2 ]] || usage; ONLY=$2; shift 2 ;;
        --filter) [[ $# -ge 2 ]] || usage; FILTER=$2; shift 2 ;;
        --test-threads) [[ $# -ge 2 && $2 =~ ^[1-9][0-9]*$ ]] || usage; THREADS=$2; shift 2 ;;
        --timeout) [[ $# -ge 2 && $2 =~ ^[1-9][0-9]*$ ]] || usage; BIN_TIMEOUT=$2; shift 2 ;;
        --tier-timeout) [[ $# -ge 2 && $2 =~ ^[1-9][0-9]*$ ]] || usage; TIER_TIMEOUT=$2; shift 2 ;;
        --no-build) BUILD=0; shift ;;
        --exec) [[ $# -ge 2 && -f $2 ]] || usage; EXEC=$(readlink -f "$2"); shift 2 ;;
        --bench) [[ $# -ge 2 && $2 =~ ^(quick|full)$ ]] || usage; BENCH=$2; shift 2 ;;
        -h|--help) usage 0 ;;
        *) printf 'linux-tier: unknown argument: %s\n' "$1" >&2; usage ;;
    esac
done
[[ $FILTER =~ ^[A-Za-z0-9_:.-]*$ ]] || die "--filter takes a test name (letters, digits, _ : . -)"

mkdir -p "$T/logs"
exec 9>"$T/.lock"
flock -n 9 || die "another linux-tier.sh is running (lock $T/.lock)"

TMP="$(mktemp -d "${TMPDIR:-/tmp}/linux-tier.XXXXXX")"
QPID="" RPID=""
cleanup() {
    # Never leave QEMU behind.
    if [[ -n $QPID ]] && kill -0 "$QPID" 2>/dev/null; then kill -KILL "$QPID" 2>/dev/null || true; fi
    if [[ -n $RPID ]] && kill -0 "$RPID" 2>/dev/null; then kill "$RPID" 2>/dev/null || true; fi
    rm -rf "$TMP"
    rm -f "${SCRATCH:-}"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

START=$(date +%s)
# shellcheck source=lib/apt.sh
source "$REPO_ROOT/scripts/lib/apt.sh"
# download DIR PKG...: apt-get download into DIR with the system's apt sources.
download() {
    local dir=$1 p; shift
    for p in "$@"; do has_candidate "${p%%=*}" || apt_update_once; done
    mkdir -p "$dir"
    chmod 755 "$dir"
    (cd "$dir" && quiet apt-get download -qq "$@")
}

say "[1/7] tools and the L2 Linux kit"
need_tool jq jq
need_tool cpio cpio
need_tool dpkg-deb dpkg
need_tool ldd libc-bin
need_tool xz xz-utils
need_tool mke2fs e2fsprogs    # L1's scratch disk, and e2fsck/debugfs for the tests in L1
command -v cargo >/dev/null || die "cargo not found (scripts/setup.sh installs Rust)"
"$REPO_ROOT/scripts/linux-kit.sh"
# shellcheck source=/dev/null
source "$KIT/kit.env"
[[ -n ${KERNEL_VERSION:-} && -s $BZIMAGE ]] || die "the kit ($KIT/kit.env) has no kernel"
CODENAME=$(sed -n 's/^VERSION_CODENAME=//p' /etc/os-release 2>/dev/null | tr -d '"')

# ---------------------------------------------------------------------------
# QEMU 10. Debian 12's QEMU 7.2 hangs L1 under heavy VM churn with -smp 2
# (stale translated code); 10.0 from bookworm-backports does not.
QDIR="$T/qemu"
qemu_major() { "$@" --version 2>/dev/null | sed -n 's/^QEMU emulator version \([0-9]*\).*/\1/p'; }
QEMU=() QEMU_ENV=()
setup_backports_qemu() {
    local apt="$T/apt" sim pkgs=() name ver
    rm -rf "$QDIR" "$apt"
    mkdir -p "$apt/lists/partial" "$apt/cache/archives/partial" "$apt/debs"
    chmod 755 "$apt/debs"
    # A private apt state: the system's sources and lists are not touched.
    local -a APT=(-o "Dir::Etc::SourceList=$apt/sources.list" -o Dir::Etc::SourceParts=/dev/null
        -o "Dir::State::Lists=$apt/lists" -o "Dir::Cache=$apt/cache" -o APT::Sandbox::User=root)
    local suite=${CODENAME:-bookworm}-backports key=/usr/share/keyrings/debian-archive-keyring.gpg
    echo "deb [signed-by=$key] http://deb.debian.org/debian $suite main" >"$apt/sources.list"
    quiet apt-get "${APT[@]}" update -qq
    # Which packages the installed system lacks for QEMU from backports: simulate the install.
    if ! sim=$(apt-get "${APT[@]}" -s -qq install --no-install-recommends -t "$suite" \
        qemu-system-x86 qemu-system-data 2>&1); then
        # Some dependency is not installed and not in backports: add the release itself.
        {
            echo "deb [signed-by=$key] http://deb.debian.org/debian $CODENAME $CODENAME-updates main"
            echo "deb [signed-by=$key] http://deb.debian.org/debian-security $CODENAME-security main"
        } >>"$apt/sources.list"
        quiet apt-get "${APT[@]}" update -qq
        sim=$(apt-get "${APT[@]}" -s -qq install --no-install-recommends -t "$suite" \
            qemu-system-x86 qemu-system-data 2>&1) || { echo "$sim" >&2; return 1; }
    fi
    while read -r name ver; do
        case "$name" in
            # Never shadow the host's C library with another one.
            libc6|libc-bin|libc6-dev) warn "QEMU from backports wants $name $ver; the host's is kept" ;;
            *) pkgs+=("$name=$ver") ;;
        esac
    done < <(sed -n 's/^Inst \([^ ]*\) .*(\([^ ]*\) .*/\1 \2/p' <<<"$sim")
    ((${#pkgs[@]})) || { say "      apt sees nothing to fetch for QEMU from $suite"; return 1; }
    say "      downloading ${pkgs[*]}"
    (cd "$apt/debs" && quiet apt-get "${APT[@]}" download -qq "${pkgs[@]}")
    mkdir -p "$QDIR"
    local deb
    for deb in "$apt/debs"/*.deb; do dpkg-deb -x "$deb" "$QDIR"; done
    rm -rf "$apt/debs"
}
use_private_qemu() {
    local libs="$QDIR/usr/lib/x86_64-linux-gnu"
    QEMU_ENV=("LD_LIBRARY_PATH=$libs${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}" "QEMU_MODULE_DIR=$libs/qemu")
    QEMU=("$QDIR/usr/bin/qemu-system-x86_64" -L "$QDIR/usr/share/qemu" -L "$QDIR/usr/share/seabios")
}
say "[2/7] QEMU 10"
SYS_QEMU=$(command -v qemu-system-x86_64 || true)
if [[ -n $SYS_QEMU && $(qemu_major "$SYS_QEMU") -ge 10 ]]; then
    QEMU=("$SYS_QEMU")
else
    use_private_qemu
    if [[ $(env "${QEMU_ENV[@]}" "${QEMU[0]}" --version 2>/dev/null | head -n1) != *" version 10."* ]]; then
        say "      fetching qemu-system-x86 from ${CODENAME:-bookworm}-backports"
        setup_backports_qemu || true
    fi
    if [[ $(env "${QEMU_ENV[@]}" "${QEMU[0]}" --version 2>/dev/null | head -n1) != *" version 10."* ]]; then
        [[ -n $SYS_QEMU ]] || die "no QEMU 10 from backports and no system QEMU"
        warn "################################################################"
        warn "no QEMU 10 from backports: falling back to $SYS_QEMU ($(qemu_major "$SYS_QEMU").x)."
        warn "QEMU 7.2 is known to HANG L1 under heavy VM churn with -smp 2; expect STALLs."
        warn "################################################################"
        QEMU=("$SYS_QEMU") QEMU_ENV=()
    fi
fi
say "      $(env "${QEMU_ENV[@]}" "${QEMU[0]}" --version | head -n1)"

# ---------------------------------------------------------------------------
# L1's modules from the kit kernel's own package, with their dependencies
# (kvm-amd needs ccp), in load order: KVM, and virtio-blk with ext4 for the temp dir
# on a scratch disk (tmpfs has no O_DIRECT before Linux 6.6; the generic
# crc32c because the emulated CPU lacks SSE4.2).
L1_MODULES=(kvm_amd virtio_pci virtio_blk ext4 crc32c_generic)
MODDIR="$T/modules/$KERNEL_VERSION"
say "[3/7] L1 modules for $KERNEL_VERSION"
if [[ ! -s $MODDIR/load-order || $(cat "$MODDIR/wanted" 2>/dev/null) != "${L1_MODULES[*]}" ]]; then
    KPKG="linux-image-$KERNEL_VERSION"
    has_candidate "$KPKG-unsigned" || apt_update_once
    if has_candidate "$KPKG-unsigned"; then KPKG="$KPKG-unsigned"; fi
    has_candidate "$KPKG" || die "apt has no $KPKG (the kit's kernel); rerun scripts/linux-kit.sh after deleting build/linux-kit"
    say "      downloading $KPKG"
    download "$TMP/k" "$KPKG"
    KDEB=$(ls "$TMP"/k/*.deb)
    rm -rf "$MODDIR.tmp"
    need_tool strings binutils
    "$REPO_ROOT/scripts/kernel-modules.sh" "$KDEB" "$MODDIR.tmp" "${L1_MODULES[@]}"
    echo "${L1_MODULES[*]}" >"$MODDIR.tmp/wanted"
    rm -rf "$MODDIR"
    mv "$MODDIR.tmp" "$MODDIR"
    rm -rf "$TMP/k"
fi
say "      $(tr '\n' ' ' <"$MODDIR/load-order")"

# busybox-static: L1's shell and tools.
BUSYBOX="$T/busybox"
if [[ ! -x $BUSYBOX ]]; then
    download "$TMP/bb" busybox-static
    dpkg-deb -x "$TMP"/bb/busybox-static_*.deb "$TMP/bb/x"
    install -m 0755 "$TMP/bb/x/bin/busybox" "$BUSYBOX"
fi

# ---------------------------------------------------------------------------
cd "$REPO_ROOT"
if ((BUILD)); then
    say "[4/7] building the tests (cargo test --release --no-run)"
    if ! cargo test --release --locked --workspace --no-run --message-format=json >"$TMP/cargo.json"; then
        jq -r 'select(.reason == "compiler-message" and .message.level == "error") | .message.rendered' \
            "$TMP/cargo.json" >&2 || true
        die "cargo test --no-run failed"
    fi
    cp "$TMP/cargo.json" "$T/cargo.json"
else
    say "[4/7] --no-build: the binaries of the last successful build"
    [[ -s $T/cargo.json ]] || die "--no-build: no earlier successful build recorded in $T/cargo.json"
    cp "$T/cargo.json" "$TMP/cargo.json"
fi
# name kind executable package-dir, one test binary a line
jq -r 'select(.reason == "compiler-artifact" and .profile.test and .executable != null)
    | [.target.name, .target.kind[0], .executable, (.manifest_path | sub("/Cargo.toml$"; ""))] | @tsv' \
    "$TMP/cargo.json" | sort -u >"$TMP/tests.tsv"
[[ -s $TMP/tests.tsv ]] || die "cargo built no test binaries"
grep -q "^linux_boot	test	" "$TMP/tests.tsv" || die "no linux_boot test binary in cargo's output"
# Built programs (skvm: CARGO_BIN_EXE_skvm) and files build scripts told rustc
# about (the test guest: SKVM_TEST_GUEST). Tests use these absolute paths.
{
    jq -r 'select(.reason == "compiler-artifact" and (.profile.test | not) and .executable != null) | .executable' \
        "$TMP/cargo.json"
    jq -r 'select(.reason == "build-script-executed") | .env[] | .[1] | select(startswith("/"))' "$TMP/cargo.json"
} | sort -u >"$TMP/built.list"

# ---------------------------------------------------------------------------
# The plan: which binaries L1 runs, each `name|timeout|cwd|command`.
plan_line() { # name cwd exe threads [args...]
    local name=$1 cwd=$2 exe=$3 threads=$4; shift 4
    printf '%s|%s|%s|%s --color never --test-threads=%s%s%s\n' "$name" "$BIN_TIMEOUT" "$cwd" "$exe" \
        "${THREADS:-$threads}" "${*:+ $*}" "${FILTER:+ $FILTER}"
}
: >"$TMP/plan"
while IFS=$'\t' read -r name kind exe dir; do
    label=$name
    [[ $kind == test ]] || label="${name}[$kind]"
    case "$ONLY" in
        all|linux) if [[ $name == linux_boot ]]; then
            plan_line "linux_boot[ignored]" "$dir" "$exe" 1 --ignored >>"$TMP/plan.linux"
        fi ;;
    esac
    case "$ONLY" in
        all|others) plan_line "$label" "$dir" "$exe" 2 >>"$TMP/plan.others" ;;
        "$name"|"$label") plan_line "$label" "$dir" "$exe" 2 >>"$TMP/plan.others" ;;
    esac
done <"$TMP/tests.tsv"
cat "$TMP/plan.linux" "$TMP/plan.others" 2>/dev/null >"$TMP/plan" || true
if [[ -n $EXEC ]]; then echo "exec|$BIN_TIMEOUT|/|sh /tier/exec.sh" >"$TMP/plan"; fi
if [[ -n $BENCH ]]; then
    skvm_exe=$(grep -m1 '/target/release/skvm$' "$TMP/built.list") || die "cargo built no skvm binary"
    echo "bench-linux|$BIN_TIMEOUT|$REPO_ROOT|$skvm_exe bench --linux $([[ $BENCH == quick ]] && echo --quick)" \
        "--linux-kit $KIT --out /scratch/linux-bench" >"$TMP/plan"
fi
[[ -s $TMP/plan ]] || die "--only $ONLY selects no test binary (binaries: $(cut -f1 "$TMP/tests.tsv" | paste -sd' '))"

# ---------------------------------------------------------------------------
say "[5/7] L1 initramfs"
# Every file that goes in: "source<TAB>path in L1".
LIST="$TMP/files.tsv"
: >"$LIST"
add() { printf '%s\t%s\n' "$1" "${2:-$1}" >>"$LIST"; }
# add_elf FILE [DEST]: a program and the shared libraries it loads (with the loader).
add_elf() {
    local f=$1 lib
    add "$f" "${2:-$f}"
    while read -r lib; do
        if [[ -n $lib ]]; then add "$lib"; fi
    done < <(ldd "$f" 2>/dev/null | awk '
        /=> not found/ {print "NOTFOUND:" $1; next}
        $2 == "=>" && $3 ~ /^\// {print $3; next}
        $1 ~ /^\// {print $1}')
}
cut -f3 "$TMP/tests.tsv" | while read -r exe; do add_elf "$exe"; done
while read -r f; do
    [[ -f $f ]] || continue
    if [[ $(head -c4 "$f" | od -An -tx1 | tr -d ' \n') == 7f454c46 && -x $f ]]; then add_elf "$f"; else add "$f"; fi
done <"$TMP/built.list"
# The source tree: tests read files under CARGO_MANIFEST_DIR (docs, the kit's kit.env).
if git -C "$REPO_ROOT" rev-parse --is-inside-work-tree >/dev/null 2>&1; then
    git -C "$REPO_ROOT" ls-files -z --cached --others --exclude-standard | while IFS= read -r -d '' f; do
        if [[ -f $REPO_ROOT/$f && ! -L $REPO_ROOT/$f ]]; then add "$REPO_ROOT/$f"; fi
    done
else
    warn "not a git checkout: copying only docs/ of the source tree"
    find "$REPO_ROOT/docs" -type f | while read -r f; do add "$f"; done
fi
find "$KIT" -type f | while read -r f; do add "$f"; done
# The study's host-disk group runs the host's fio: in L1, the kit's static one.
add "$REPO_ROOT/build/fio/fio" /usr/bin/fio
# Host tools the tests run.
SYSPATH=/usr/sbin:/usr/bin:/sbin:/bin
# (e2fsprogs is installed above; objdump and iasl come with scripts/setup.sh.)
for tool in e2fsck debugfs mke2fs mkfs.ext4 objdump iasl; do
    if ! p=$(PATH=$SYSPATH command -v "$tool"); then
        warn "$tool not on this host: tests that run it will fail in L1"
        continue
    fi
    add_elf "$(readlink -f "$p")" "/usr/sbin/${tool}"
done
if [[ -f /etc/mke2fs.conf ]]; then add /etc/mke2fs.conf; fi
# python3 for tests/api.rs (a client of another user): the interpreter and
# only the standard modules a socket client imports.
if PY=$(PATH=$SYSPATH command -v python3); then
    add_elf "$(readlink -f "$PY")" /usr/bin/python3
    "$PY" -c 'import sys, socket, encodings, encodings.utf_8, encodings.latin_1, encodings.aliases
for m in list(sys.modules.values()):
    f = getattr(m, "__file__", None)
    if f: print(f)' | while read -r f; do
        case "$f" in */__init__.py) find "$(dirname "$f")" -maxdepth 1 -name '*.py' | while read -r g; do add "$g"; done ;; *) add "$f" ;; esac
    done
else
    warn "no python3 on this host: tests/api.rs's other-user client will fail in L1"
fi
if grep -q '^NOTFOUND:' "$LIST"; then
    die "missing shared libraries: $(grep -o 'NOTFOUND:[^	]*' "$LIST" | sort -u | tr '\n' ' ')"
fi
while read -r m; do add "$MODDIR/$m.ko" "/tier/modules/$m.ko"; done <"$MODDIR/load-order"
add "$MODDIR/load-order" /tier/modules/load-order
add "$BUSYBOX" /usr/bin/busybox
sort -u -t $'\t' -k2,2 "$LIST" -o "$LIST"

write_init() {
    # Stage 1. pivot_root (skvm's sandbox) fails while / is the initramfs, so
    # everything moves to a tmpfs first.
    cat >"$1/init" <<'EOF'
#!/bin/sh
export PATH=/usr/sbin:/usr/bin:/sbin:/bin
mount -t proc proc /proc
echo "TIER-STAGE1 uptime=$(cut -d' ' -f1 /proc/uptime)" >/dev/console
mkdir -p /newroot
mount -t tmpfs -o mode=0755,size=90% tmpfs /newroot
for d in /*; do
    case "$d" in /newroot|/proc|/sys|/dev) ;; *) cp -a "$d" /newroot/ ;; esac
done
mkdir -p /newroot/proc /newroot/sys /newroot/dev
umount /proc
exec switch_root /newroot /tier/init2
EOF
    # Stage 2: mounts, KVM, the plan, one result line per binary, power off.
    cat >"$1/tier/init2" <<'EOF'
#!/bin/sh
export PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME=/root RUST_BACKTRACE=1 TERM=dumb
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
exec </dev/null >/dev/console 2>&1
mkdir -p /dev/pts /dev/shm /tmp /scratch /run /root /sys/fs/cgroup
mount -t devpts -o gid=5,mode=620,ptmxmode=666 devpts /dev/pts
mount -t tmpfs -o mode=1777 tmpfs /dev/shm
mount -t tmpfs -o mode=0755 tmpfs /run
# cgroup2 only to find and kill what a test binary leaves running.
mount -t cgroup2 cgroup2 /sys/fs/cgroup 2>/dev/null
hostname l1
ln -s /proc/self/mounts /etc/mtab
ip link set lo up 2>/dev/null
ulimit -n 65536
up() { cut -d' ' -f1 /proc/uptime; }
echo "TIER-INIT uptime=$(up) kernel=$(uname -r) cpus=$(grep -c ^processor /proc/cpuinfo) mem=$(awk '/MemTotal/ {print $2}' /proc/meminfo)kB clocksource=$(cat /sys/devices/system/clocksource/clocksource0/current_clocksource)"
for m in $(cat /tier/modules/load-order); do
    insmod /tier/modules/$m.ko || echo "TIER-FATAL insmod $m.ko failed: $(dmesg | tail -n 3 | tr '\n' ' ')"
done
# The tests' temp dir (TMPDIR) on the scratch disk (ext4, like the host's:
# O_DIRECT works), else tmpfs. Not over /tmp: the checkout may live there.
i=0; while [ ! -b /dev/vda ] && [ $i -lt 50 ]; do sleep 0.1; i=$((i + 1)); done
if ! mount -t ext4 -o noatime,discard /dev/vda /scratch; then
    echo "TIER-WARNING no scratch disk: the temp dir is tmpfs, which has no O_DIRECT on Linux $(uname -r)"
    mount -t tmpfs -o size=85% tmpfs /scratch
fi
chmod 1777 /tmp /scratch
export TMPDIR=/scratch
if [ ! -c /dev/kvm ]; then
    echo "TIER-FATAL no /dev/kvm in L1: $(dmesg | grep -iE 'kvm|svm' | tail -n 5 | tr '\n' ' ')"
    poweroff -f
fi
# The kernel's symbols for the host, who names where L1's CPUs are if it stalls.
grep ' [tT] ' /proc/kallsyms >/scratch/.tier-kallsyms
sync
# Kernel warnings on the console from now on, with every CPU's stack on a lockup.
dmesg -n 7
echo 1 >/proc/sys/kernel/softlockup_all_cpu_backtrace
echo "TIER-BOOTED uptime=$(up) kvm: $(dmesg | grep -iE 'nested paging|kvm' | tail -n 2 | tr '\n' ' ')"
# A heartbeat shows the host that L1 is alive while a test is silent, and
# which threads used the CPU since the last one: user, system and guest
# (a vCPU in KVM_RUN) seconds, so a hang says whether the guest or skvm spins.
( : >/run/hb.prev
  while sleep 60; do
    cat /proc/[0-9]*/task/[0-9]*/stat 2>/dev/null >/run/hb.now
    top=$(awk 'FILENAME == "/run/hb.prev" { prev[$1] = $2; next }
        { r = substr($0, match($0, /\) [A-Z] /) + 2); split(r, a, " ")
          c = substr($0, index($0, "(") + 1); c = substr(c, 1, match(c, /\) [A-Z] /) - 1)
          t = a[12] + a[13]; d = t - prev[$1]; now[$1] = t
          if (d > 50) printf "%d %s/%d:%s u%.1f s%.1f g%.1f\n", d, c, $1, a[1], a[12] / 100, a[13] / 100, a[41] / 100 }
        END { for (k in now) print k, now[k] >"/run/hb.prev" }' /run/hb.prev /run/hb.now | sort -rn | head -n 3 | cut -d' ' -f2- | tr '\n' ' ')
    echo "TIER-HEARTBEAT uptime=$(up) load=$(cut -d' ' -f1-3 /proc/loadavg) MemAvailable=$(awk '/MemAvailable/ {print $2}' /proc/meminfo)kB busiest (total u/s/g secs): ${top:-none}"
  done ) &
HB=$!
n=0
while IFS='|' read -r name tmo cwd cmd <&3; do
    [ -n "$name" ] || continue
    n=$((n + 1))
    cg=/sys/fs/cgroup/t$n
    mkdir -p $cg 2>/dev/null
    echo "TIER-START $name: $cmd"
    t0=$(up)
    cd "$cwd"
    # shellcheck disable=SC2086
    sh -c 'echo $$ >"$1/cgroup.procs" 2>/dev/null; shift; exec "$@"' sh $cg timeout "$tmo" $cmd </dev/null
    rc=$?
    cd /
    secs=$(awk -v a="$t0" -v b="$(up)" 'BEGIN {printf "%.1f", b - a}')
    if [ "$rc" = 0 ]; then res=PASS
    elif [ "$rc" -ge 128 ] && awk -v s="$secs" -v t="$tmo" 'BEGIN {exit !(s >= t - 1)}'; then res=TIMEOUT
    else res=FAIL; fi
    # What the binary started must be gone (busybox timeout's watcher takes up
    # to 1 s). cgroup files have no size: read them.
    i=0; while [ -n "$(cat $cg/cgroup.procs 2>/dev/null)" ] && [ $i -lt 30 ]; do sleep 0.1; i=$((i + 1)); done
    if [ -n "$(cat $cg/cgroup.procs 2>/dev/null)" ]; then
        echo "TIER-STRAYS $name left running:"
        for p in $(cat $cg/cgroup.procs); do echo "  $p $(tr '\0' ' ' </proc/$p/cmdline 2>/dev/null)"; done
        echo 1 >$cg/cgroup.kill
        i=0; while [ -n "$(cat $cg/cgroup.procs)" ] && [ $i -lt 50 ]; do sleep 0.1; i=$((i + 1)); done
    fi
    rmdir $cg 2>/dev/null
    find /scratch -mindepth 1 -maxdepth 1 ! -name .tier-kallsyms -exec rm -rf {} \; 2>/dev/null
    echo "TIER-RESULT $name $res $secs rc=$rc"
done 3</tier/plan
kill $HB 2>/dev/null
echo "TIER-DONE $n uptime=$(up)"
sync
poweroff -f
while :; do sleep 1; done
EOF
    chmod 0755 "$1/init" "$1/tier/init2"
}

BASE="$T/initramfs.cpio.gz"
# By content: linux-kit.sh rewrites kit.env on every run.
SIG=$( { sha256sum "$SCRIPT"; cut -f1 "$LIST" | tr '\n' '\0' | xargs -0 sha256sum; cat "$LIST"; } | sha256sum | cut -d' ' -f1)
if [[ -s $BASE && -f $T/initramfs.sig && $(cat "$T/initramfs.sig") == "$SIG" ]]; then
    say "      up to date ($(du -h "$BASE" | cut -f1))"
else
    R="$T/root"
    rm -rf "$R"
    mkdir -p "$R"/usr/{bin,sbin,lib,lib64} "$R"/{proc,sys,dev,tmp,root,etc,tier}
    # Merged /usr, as on the host: library paths from ldd land where they are looked for.
    for d in bin sbin lib lib64; do ln -s "usr/$d" "$R/$d"; done
    while IFS=$'\t' read -r src dst; do
        mkdir -p "$R$(dirname "$dst")"
        cp -L --preserve=mode "$src" "$R$dst"
    done <"$LIST"
    "$BUSYBOX" --list-full | while read -r a; do
        [[ -e $R/$a || -L $R/$a ]] || ln -s /usr/bin/busybox "$R/$a"
    done
    echo 'root:x:0:0:root:/root:/bin/sh' >"$R/etc/passwd"
    echo 'nobody:x:65534:65534:nobody:/nonexistent:/bin/false' >>"$R/etc/passwd"
    printf 'root:x:0:\ntty:x:5:\nnogroup:x:65534:\n' >"$R/etc/group"
    write_init "$R"
    mknod -m 600 "$R/dev/console" c 5 1
    (cd "$R" && find . -mindepth 1 | LC_ALL=C sort | cpio -o -H newc -R 0:0 --quiet) | gzip -6n >"$BASE.tmp"
    mv "$BASE.tmp" "$BASE"
    echo "$SIG" >"$T/initramfs.sig"
    rm -rf "$R"
    say "      built: $(wc -l <"$LIST") files, $(du -h "$BASE" | cut -f1)"
fi

# ---------------------------------------------------------------------------
# where_are_the_cpus MONITOR_LOG: each L1 CPU's RIP, with its kernel function
# (from L1's /proc/kallsyms, which L1 leaves on the scratch disk; L1 runs
# nokaslr, so one copy serves every boot), and whether it halts.
where_are_the_cpus() {
    local line rip sym syms="$T/l1-kallsyms.$KERNEL_VERSION"
    if [[ ! -s $syms ]]; then
        debugfs -R "dump /.tier-kallsyms $syms.tmp" "$SCRATCH" >/dev/null 2>&1 || true
        LC_ALL=C sort "$syms.tmp" 2>/dev/null >"$syms" || true
        rm -f "$syms.tmp"
    fi
    grep -o 'RIP=[0-9a-f]* .*HLT=[01]' "$1" 2>/dev/null | while read -r line; do
        rip=${line%% *}
        rip=${rip#RIP=}
        sym=$(awk -v a="$rip" '$1 > a { exit } { s = $3 } END { print s }' "$syms" 2>/dev/null)
        say "      L1 CPU: RIP $rip in ${sym:-?} (${line##* })"
    done
}

# run_l1 ATTEMPT PLAN: boot L1 with PLAN appended as a second cpio; sets OUTCOME.
STAMP=$(date +%Y%m%d-%H%M%S)
SCRATCH="$T/scratch.img"
OUTCOME=""
run_l1() {
    local attempt=$1 plan=$2 serial="$T/logs/$STAMP-attempt$1.log" qerr="$T/logs/$STAMP-attempt$1.qemu.err"
    mkdir -p "$TMP/p$attempt/tier"
    cp "$plan" "$TMP/p$attempt/tier/plan"
    if [[ -n $EXEC ]]; then cp "$EXEC" "$TMP/p$attempt/tier/exec.sh"; fi
    (cd "$TMP/p$attempt" && find tier | cpio -o -H newc -R 0:0 --quiet) | gzip -n >"$TMP/plan.cpio.gz"
    cat "$BASE" "$TMP/plan.cpio.gz" >"$TMP/initrd"
    rm -f "$serial"
    : >"$serial"
    ln -sfn "$(basename "$serial")" "$T/logs/latest.log"
    say "attempt $attempt: booting L1 ($(wc -l <"$plan") test binaries); log $serial"
    local t0 now last_change mon="$TMP/mon.$attempt" progress="$TMP/progress.$attempt"
    # L1's temp dir: a fresh sparse ext4 image (holes punched as L1 deletes files).
    rm -f "$SCRATCH"
    truncate -s 16G "$SCRATCH"
    quiet mke2fs -q -F -t ext4 -O ^has_journal -E nodiscard "$SCRATCH"
    t0=$(date +%s)
    # What QEMU 10's emulated SVM did to L1 here (2026-11-30), and why L1 has
    # 1 vCPU and periodic ticks (nohz=off highres=off):
    # - 2 vCPUs: under VM churn (the study, devices and supervision tests) L1
    #   panicked in a skvm vcpu0 thread, "corrupted stack end detected inside
    #   scheduler", in about half the boots; L2 guests stopped mid-line (their
    #   vCPU looping inside L1's KVM) or triple-faulted. Periodic ticks made
    #   it rarer, not gone.
    # - 1 vCPU with one-shot timers: L1 lost its timer interrupt and halted
    #   for good (both attempts of a run).
    # - 1 vCPU, periodic ticks: no panic, stall or guest crash in a whole
    #   tier, at about the same speed (the host has 2 cores to share anyway).
    # nokaslr: L1's kallsyms from one boot serves every boot.
    # A monitor on two FIFOs, to ask QEMU where L1's CPUs are when it stalls.
    mkfifo "$mon.in" "$mon.out"
    : >"$progress"
    env "${QEMU_ENV[@]}" "${QEMU[@]}" -accel tcg,thread=multi -cpu "$L1_CPU" -smp "$L1_SMP" -m 6G \
        -nodefaults -display none -no-reboot -monitor "pipe:$mon" -serial "file:$serial" \
        -drive "file=$SCRATCH,if=virtio,format=raw,cache=unsafe,discard=unmap" \
        -kernel "$BZIMAGE" -initrd "$TMP/initrd" \
        -append "console=ttyS0 panic=-1 loglevel=4 nokaslr nohz=off highres=off $L1_APPEND" 2>"$qerr" &
    QPID=$!
    cat "$mon.out" >"$T/logs/$STAMP-attempt$attempt.monitor.log" 2>/dev/null &
    MPID=$!
    # Stream the console with a prefix. Progress is userspace output (the tests,
    # L1's heartbeat): kernel lines ("[ 12.3] ...") do not count, a hung L1
    # keeps printing soft-lockup reports.
    tail -n +1 -F --pid="$QPID" "$serial" 2>/dev/null | while IFS= read -r line; do
        line=${line%$'\r'}
        printf 'L1| %s\n' "$line" >&2
        [[ $line =~ ^\[\ *[0-9]+\.[0-9]+\] ]] || : >"$progress"
        if [[ $line == TIER-BOOTED* ]]; then echo "$(($(date +%s) - t0))" >"$TMP/booted.$attempt"; fi
    done &
    RPID=$!
    OUTCOME=exited
    while kill -0 "$QPID" 2>/dev/null; do
        sleep 2
        now=$(date +%s)
        last_change=$(stat -c %Y "$progress")
        if ((now - last_change >= STALL_SECS)); then
            OUTCOME=stall
            say "STALL: no output from L1's userspace for $((now - last_change)) s; asking QEMU where the CPUs are, then killing it"
            printf 'info cpus\ninfo registers -a\n' >"$mon.in" || true
            sleep 3
            where_are_the_cpus "$T/logs/$STAMP-attempt$attempt.monitor.log"
            kill -KILL "$QPID" 2>/dev/null || true
            break
        fi
        if ((now - t0 >= TIER_TIMEOUT)); then
            OUTCOME=tier-timeout
            say "TIER TIMEOUT: L1 ran for $((now - t0)) s (--tier-timeout $TIER_TIMEOUT); killing QEMU"
            kill -KILL "$QPID" 2>/dev/null || true
            break
        fi
    done
    local rc=0
    wait "$QPID" 2>/dev/null || rc=$?
    QPID=""
    wait "$RPID" 2>/dev/null || true
    RPID=""
    wait "$MPID" 2>/dev/null || true
    if [[ $OUTCOME == exited && $rc -ne 0 ]]; then
        say "QEMU exited with status $rc: $(tail -n 5 "$qerr" | tr '\n' ' ')"
    fi
    tr -d '\r' <"$serial" >"$serial.clean" && mv "$serial.clean" "$serial"
    # The monitor echoes what it is sent with terminal escapes: keep its answers.
    local monlog="$T/logs/$STAMP-attempt$attempt.monitor.log"
    if [[ -f $monlog ]]; then sed -i '/\x1b\[/d' "$monlog"; fi
    SERIALS+=("$serial")
}

say "[6/7] running the tests in L1 (QEMU TCG, $L1_SMP vCPU, 6 GiB)"
avail=$(awk '/MemAvailable/ {print int($2 / 1048576)}' /proc/meminfo)
if ((avail < 7)); then warn "only ${avail} GiB of memory available here; L1 takes up to 6 GiB"; fi
SERIALS=()
declare -A RESULT=() SECS=() NOTE=()
cut -d'|' -f1 "$TMP/plan" >"$TMP/names"
cp "$TMP/plan" "$TMP/plan.1"
for attempt in 1 2; do
    run_l1 "$attempt" "$TMP/plan.$attempt"
    serial=${SERIALS[-1]}
    if [[ $OUTCOME == exited ]] && grep -q 'Kernel panic - not syncing' "$serial"; then OUTCOME=panic; fi
    while read -r _tag name res secs _rest; do
        RESULT[$name]=$res SECS[$name]=$secs
        if ((attempt > 1)); then NOTE[$name]="${NOTE[$name]:+${NOTE[$name]}; }run in attempt 2"; fi
    done < <(grep '^TIER-RESULT ' "$serial")
    grep '^TIER-FATAL' "$serial" >&2 || true
    case "$OUTCOME" in
        stall) why="STALL: no output from L1 for ${STALL_SECS}s" ;;
        panic) why="L1 PANIC: $(grep -m1 -o 'Kernel panic - not syncing.*' "$serial")" ;;
        *) break ;;
    esac
    # The binary that was running when L1 stopped, and what never ran, go again once.
    running=$(grep '^TIER-START ' "$serial" | tail -n1 | sed 's/^TIER-START \([^:]*\):.*/\1/')
    if [[ -n $running && -z ${RESULT[$running]:-} ]]; then NOTE[$running]="$why (attempt $attempt)"; fi
    : >"$TMP/plan.$((attempt + 1))"
    while IFS='|' read -r name rest; do
        [[ -n ${RESULT[$name]:-} ]] || printf '%s|%s\n' "$name" "$rest" >>"$TMP/plan.$((attempt + 1))"
    done <"$TMP/plan"
    [[ $attempt -lt 2 && -s $TMP/plan.$((attempt + 1)) ]] || break
    say "$why; retrying once the $(wc -l <"$TMP/plan.$((attempt + 1))") binaries without a result"
done

# ---------------------------------------------------------------------------
say "[7/7] summary"
fail=0
{
    printf '%-32s %-8s %9s  %s\n' BINARY RESULT SECONDS NOTE
    while read -r name; do
        res=${RESULT[$name]:-}
        if [[ -z $res ]]; then
            case "$OUTCOME" in
                stall) res=STALL ;;
                panic) res=L1-PANIC ;;
                tier-timeout) res=TIER-TIMEOUT ;;
                *) res=MISSING ;;
            esac
        fi
        [[ $res == PASS ]] || fail=1
        printf '%-32s %-8s %9s  %s\n' "$name" "$res" "${SECS[$name]:--}" "${NOTE[$name]:-}"
    done <"$TMP/names"
} >"$TMP/summary"
boot_secs=$(cat "$TMP/booted.1" 2>/dev/null || echo '?')
l1_up=$(sed -n 's/^TIER-BOOTED uptime=\([^ ]*\).*/\1/p' "${SERIALS[0]}" | head -n1)
total=$(($(date +%s) - START))
cat "$TMP/summary" >&2
printf 'L1 boot to KVM ready: %s s from QEMU start (L1 uptime %s s); whole tier %d s (%d min); logs: %s\n' \
    "$boot_secs" "${l1_up:-?}" "$total" $((total / 60)) "${SERIALS[*]}" >&2
if grep -qE 'soft lockup|self-detected stall|hung_task|Out of memory|Kernel panic' "${SERIALS[@]}"; then
    warn "L1's kernel complained (lockup, RCU stall, OOM or panic): grep the logs above"
fi
if [[ -n $BENCH ]]; then
    mkdir -p "$T/bench"
    # The table skvm printed, without the kernel's lines that may interleave.
    sed -n '/^## fio in a Linux guest/,/^skvm bench --linux:/p' "${SERIALS[@]}" | grep -v '^\[ *[0-9]' \
        >"$T/bench/linux.md" || true
    if [[ -s $T/bench/linux.md ]]; then
        say "fio in L2 Linux guests, in L1 (QEMU TCG): $T/bench/linux.md"
        cat "$T/bench/linux.md" >&2
    else
        warn "no table from skvm bench --linux"
    fi
fi
if ((fail)); then
    say "FAILED"
    exit 1
fi
say "all passed"
