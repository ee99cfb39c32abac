#!/usr/bin/env bash
# Build a Linux guest kit for skvm from Debian packages.
#
# Usage: scripts/linux-kit.sh [OUTDIR]     (default: <repo>/build/linux-kit)
#
# Produces in OUTDIR:
#   vmlinux            uncompressed x86-64 ELF kernel (extracted from the bzImage)
#   bzImage            the Debian /boot/vmlinuz-* as shipped
#   initramfs.cpio.gz  busybox-static, mkfs.ext4, a static fio (scripts/build-fio.sh) and
#                      the modules for skvm's devices and ext4 (with their dependencies,
#                      from scripts/kernel-modules.sh); /init loads them, runs the test
#                      that `skvm-test=NAME` on the command line names (cpus, devices,
#                      virtio-mem, reboot, fio; see the init below), prints
#                      SKVM-LINUX-INIT-OK and powers off
#   kit.env            KERNEL_VERSION, VMLINUX, BZIMAGE, INITRAMFS, PVH_NOTE (sourceable)
#
# Idempotent: each step is skipped when its outputs exist and are newer than this
# script. Delete OUTDIR (or touch this script) to force a rebuild.
set -euo pipefail

SCRIPT="$(readlink -f "${BASH_SOURCE[0]}")"
REPO_ROOT="$(cd "$(dirname "$SCRIPT")/.." && pwd)"
OUT="${1:-$REPO_ROOT/build/linux-kit}"
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"

START_NS=$(date +%s%N)
TMP="$(mktemp -d "${TMPDIR:-/tmp}/linux-kit.XXXXXX")"
chmod 755 "$TMP"    # let apt's _apt user write downloads here
trap 'rm -rf "$TMP"' EXIT

VMLINUX="$OUT/vmlinux"
BZIMAGE="$OUT/bzImage"
INITRAMFS="$OUT/initramfs.cpio.gz"
KITENV="$OUT/kit.env"
KREL_FILE="$OUT/kernel-release"

say() { printf 'linux-kit: %s\n' "$*" >&2; }
die() { printf 'linux-kit: error: %s\n' "$*" >&2; exit 1; }

# shellcheck source=lib/apt.sh
source "$REPO_ROOT/scripts/lib/apt.sh"

# fresh FILE...: all files exist and are newer than this script.
fresh() {
    local f
    for f in "$@"; do
        [[ -s "$f" && "$f" -nt "$SCRIPT" ]] || return 1
    done
}

# Byte-level helpers.
u8()  { od -An -tu1 -j "$2" -N1 "$1" | tr -d ' \n'; }
u32() { od -An -tu4 --endian=little -j "$2" -N4 "$1" | tr -d ' \n'; }
hexat() { od -An -tx1 -j "$2" -N "$3" "$1" | tr -d ' \n'; }
is_elf() { [[ -s "$1" && "$(hexat "$1" 0 4)" == "7f454c46" ]]; }

# decompress FMT < in > out   (trailing garbage errors are tolerated by callers)
decompress() {
    case "$1" in
        gzip)  gzip -dc ;;
        xz)    xz -dc ;;
        lzma)  xz -dc --format=lzma ;;
        zstd)  zstd -dcq ;;
        bzip2) bzip2 -dc ;;
        lz4)   lz4 -dcq ;;
        lzo)   lzop -dc ;;
        *) return 1 ;;
    esac
}

tool_for() {
    case "$1" in
        gzip) need_tool gzip gzip ;;
        xz|lzma) need_tool xz xz-utils ;;
        zstd) need_tool zstd zstd ;;
        bzip2) need_tool bzip2 bzip2 ;;
        lz4) need_tool lz4 lz4 ;;
        lzo) need_tool lzop lzop ;;
    esac
}

# Magic signatures, as in the kernel's scripts/extract-vmlinux.
declare -A MAGIC=(
    [gzip]='\x1f\x8b\x08'
    [xz]='\xfd\x37\x7a\x58\x5a\x00'
    [bzip2]='BZh'
    [lzma]='\x5d\x00\x00\x00'
    [lzo]='\x89\x4c\x5a'
    [lz4]='\x02\x21\x4c\x18'
    [zstd]='\x28\xb5\x2f\xfd'
)

# try_at IMG OFFSET FMT [LEN]: decompress from OFFSET; succeed if result is an ELF.
try_at() {
    local img=$1 off=$2 fmt=$3 len=${4:-}
    tool_for "$fmt"
    if [[ -n "$len" ]]; then
        tail -c "+$((off + 1))" "$img" | head -c "$len" | decompress "$fmt" >"$TMP/vmlinux" 2>/dev/null || true
    else
        tail -c "+$((off + 1))" "$img" | decompress "$fmt" >"$TMP/vmlinux" 2>/dev/null || true
    fi
    is_elf "$TMP/vmlinux"
}

# extract_vmlinux BZIMAGE: leave the ELF in $TMP/vmlinux, print the format used.
extract_vmlinux() {
    local img=$1 fmt off hdr
    # Fast path: boot protocol >= 2.08 tells where the payload is.
    hdr=$(hexat "$img" $((0x202)) 4)
    if [[ "$hdr" == "48647253" ]]; then   # "HdrS"
        local setup_sects payload_off payload_len
        setup_sects=$(u8 "$img" $((0x1f1)))
        [[ "$setup_sects" -eq 0 ]] && setup_sects=4
        payload_off=$(u32 "$img" $((0x248)))
        payload_len=$(u32 "$img" $((0x24c)))
        off=$(( (setup_sects + 1) * 512 + payload_off ))
        for fmt in "${!MAGIC[@]}"; do
            local m; m=$(printf '%b' "${MAGIC[$fmt]}" | od -An -tx1 | tr -d ' \n')
            if [[ "$(hexat "$img" "$off" $(( ${#m} / 2 )))" == "$m" ]] \
                && try_at "$img" "$off" "$fmt" "$payload_len"; then
                echo "$fmt@$off"; return 0
            fi
        done
    fi
    # Fallback: scan for every known magic, like scripts/extract-vmlinux.
    for fmt in xz gzip zstd lz4 bzip2 lzma lzo; do
        while IFS=: read -r off _; do
            [[ -n "$off" ]] || continue
            if try_at "$img" "$off" "$fmt"; then echo "$fmt@$off(scan)"; return 0; fi
        done < <(LC_ALL=C grep -obUaP "${MAGIC[$fmt]}" "$img" 2>/dev/null || true)
    done
    return 1
}

# The modules the guest's init loads (with their dependencies): virtio-mmio
# and the drivers for skvm's devices, and ext4 with the checksum it needs
# (the generic one: the emulated CPUs of the nested tier lack SSE4.2).
GUEST_MODULES=(virtio_mmio virtio_blk virtio_rng virtio_mem ext4 crc32c_generic)

# add_program ROOT BINARY DEST: copy a dynamic binary to ROOT/DEST with the
# libraries it loads (and the loader), at their own paths.
add_program() {
    local root=$1 bin=$2 dest=$3 lib
    install -D -m 0755 "$bin" "$root$dest"
    for lib in $(ldd "$bin" | grep -oE '/[^ ]+'); do
        [[ -e "$root$lib" ]] || install -D -m 0755 "$lib" "$root$lib"
    done
}

# ---------------------------------------------------------------------------
# Step 1: tools
say "[1/5] checking tools"
need_tool apt-get apt
need_tool dpkg-deb dpkg
need_tool cpio cpio
need_tool gzip gzip
need_tool readelf binutils
need_tool od coreutils

# ---------------------------------------------------------------------------
# Steps 2+3: kernel (download, extract bzImage, extract vmlinux)
if fresh "$VMLINUX" "$BZIMAGE" "$KREL_FILE" "$OUT/modules/extracted"; then
    say "[2/5] kernel packages: up to date, skipping download"
    say "[3/5] vmlinux: up to date ($(cat "$KREL_FILE"))"
else
    has_candidate linux-image-amd64 || apt_update_once
    KPKG=$(apt-cache depends linux-image-amd64 2>/dev/null \
        | awk '$1 ~ /Depends:$/ && $2 ~ /^linux-image-[0-9].*-amd64(-unsigned)?$/ {print $2; exit}')
    [[ -n "$KPKG" ]] || die "cannot resolve the package linux-image-amd64 depends on"
    KPKG=${KPKG%-unsigned}
    # Prefer the unsigned image when it exists (identical kernel, no PE signature).
    if has_candidate "$KPKG-unsigned"; then KPKG="$KPKG-unsigned"; fi
    has_candidate busybox-static || apt_update_once
    say "[2/5] downloading $KPKG and busybox-static"
    (cd "$TMP" && quiet apt-get download -qq "$KPKG" busybox-static)
    KDEB=$(ls "$TMP"/linux-image-*.deb)
    mkdir -p "$TMP/kernel"
    # Only /boot and the modules the guest loads are needed; skip writing the ~400 MB of modules to disk.
    dpkg-deb --fsys-tarfile "$KDEB" | tar -x -C "$TMP/kernel" --wildcards './boot/vmlinuz-*'
    rm -rf "$OUT/modules"
    need_tool strings binutils
    need_tool xz xz-utils
    "$REPO_ROOT/scripts/kernel-modules.sh" "$KDEB" "$OUT/modules" "${GUEST_MODULES[@]}"
    cp "$OUT/modules/load-order" "$OUT/modules/extracted"
    VMLINUZ=$(ls "$TMP"/kernel/boot/vmlinuz-* | head -n1)
    [[ -f "$VMLINUZ" ]] || die "no /boot/vmlinuz-* in $KDEB"
    KREL=${VMLINUZ##*/vmlinuz-}

    say "[3/5] extracting vmlinux from vmlinuz-$KREL"
    FOUND=$(extract_vmlinux "$VMLINUZ") || die "could not find a compressed ELF payload in $VMLINUZ"
    readelf -h "$TMP/vmlinux" >"$TMP/elfh" 2>&1 || die "readelf -h failed on extracted vmlinux"
    grep -q 'Class:.*ELF64' "$TMP/elfh" && grep -q 'Machine:.*X86-64' "$TMP/elfh" \
        || { cat "$TMP/elfh" >&2; die "extracted vmlinux is not an x86-64 ELF64"; }
    say "      payload $FOUND -> ELF64 x86-64"
    cp "$VMLINUZ" "$BZIMAGE.tmp" && mv "$BZIMAGE.tmp" "$BZIMAGE"
    mv "$TMP/vmlinux" "$VMLINUX.tmp" && mv "$VMLINUX.tmp" "$VMLINUX"
    printf '%s\n' "$KREL" >"$KREL_FILE"
fi
KREL=$(cat "$KREL_FILE")

# PVH entry point: an ELF note of owner "Xen", type 0x12 (XEN_ELFNOTE_PHYS32_ENTRY).
if readelf -Wn "$VMLINUX" 2>/dev/null | grep -Eq '^[[:space:]]*Xen[[:space:]].*(\(0x0*12\)|PHYS32_ENTRY)'; then
    PVH_NOTE=yes
else
    PVH_NOTE=no
fi

# ---------------------------------------------------------------------------
# Step 4: initramfs
FIO="$REPO_ROOT/build/fio/fio"
"$REPO_ROOT/scripts/build-fio.sh" "$(dirname "$FIO")"
if fresh "$INITRAMFS" && [[ "$INITRAMFS" -nt "$FIO" ]]; then
    say "[4/5] initramfs: up to date"
else
    say "[4/5] building initramfs"
    BBDEB=$(ls "$TMP"/busybox-static_*.deb 2>/dev/null || true)
    if [[ -z "$BBDEB" ]]; then
        has_candidate busybox-static || apt_update_once
        (cd "$TMP" && quiet apt-get download -qq busybox-static)
        BBDEB=$(ls "$TMP"/busybox-static_*.deb)
    fi
    mkdir -p "$TMP/bb"
    dpkg-deb -x "$BBDEB" "$TMP/bb"
    BB="$TMP/bb/bin/busybox"
    [[ -x "$BB" ]] || die "busybox binary not found in $BBDEB"

    R="$TMP/root"
    mkdir -p "$R"/{bin,sbin,usr/bin,usr/sbin,proc,sys,dev,tmp,root,etc,lib/modules}
    while read -r m; do cp "$OUT/modules/$m.ko" "$R/lib/modules/"; done <"$OUT/modules/load-order"
    cp "$OUT/modules/load-order" "$R/lib/modules/"
    # mkfs.ext4 from the host's e2fsprogs, with its libraries (busybox makes only ext2).
    need_tool mke2fs e2fsprogs
    add_program "$R" "$(command -v mke2fs)" /sbin/mkfs.ext4
    [[ -f /etc/mke2fs.conf ]] && cp /etc/mke2fs.conf "$R/etc/"
    install -m 0755 "$FIO" "$R/bin/fio"
    chmod 1777 "$R/tmp"
    install -m 0755 "$BB" "$R/bin/busybox"
    # Applet symlinks: ask busybox (it is static x86-64) or fall back to a fixed list.
    if APPLETS=$("$BB" --list-full 2>/dev/null) && [[ -n "$APPLETS" ]]; then :; else
        APPLETS=$(printf 'bin/%s\n' sh ash mount umount echo cat ls mkdir mknod dmesg \
            uname sleep poweroff reboot halt sync ps kill true false grep)
    fi
    while read -r a; do
        [[ -n "$a" && "$a" != bin/busybox && ! -e "$R/$a" && ! -L "$R/$a" ]] || continue
        mkdir -p "$R/$(dirname "$a")"
        ln -s /bin/busybox "$R/$a"
    done <<<"$APPLETS"
    for a in sh mount poweroff echo; do [[ -L "$R/bin/$a" ]] || ln -s busybox "$R/bin/$a"; done

    cat >"$R/init" <<'EOF'
#!/bin/sh
# The kit's init: load the modules, run the test the command line names
# (skvm-test=NAME), print the init marker and power off.
export PATH=/bin:/sbin:/usr/bin:/usr/sbin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null
say() { echo "$1" >/dev/console; }
for m in $(cat /lib/modules/load-order); do
    insmod /lib/modules/$m.ko || say "SKVM-LINUX-FAIL insmod $m"
done
# wait_for PATH: device nodes appear as drivers probe (up to 10 s).
wait_for() {
    n=0
    while [ ! -e "$1" ] && [ $n -lt 100 ]; do sleep 0.1; n=$((n + 1)); done
    [ -e "$1" ] || say "SKVM-LINUX-FAIL no $1"
}
# disk_of SECTORS: the virtio disk of that size (the host picks distinct sizes).
disk_of() {
    for d in /sys/block/vd*; do
        [ "$(cat "$d/size")" = "$1" ] && { echo "/dev/${d##*/}"; return; }
    done
    say "SKVM-LINUX-FAIL no disk of $1 sectors"
}
# A filesystem through Linux's virtio-blk driver, for the host to check.
test_ext4() {
    mkfs.ext4 -q -F -L skvm "$1" || say "SKVM-LINUX-FAIL mkfs.ext4"
    mkdir -p /mnt && mount -t ext4 "$1" /mnt || say "SKVM-LINUX-FAIL mount"
    echo "written by Linux under skvm" >/mnt/hello.txt
    mkdir /mnt/dir
    dd if=/dev/urandom of=/mnt/dir/random.bin bs=1M count=8 2>/dev/null
    say "SKVM-LINUX-MD5 $(md5sum /mnt/dir/random.bin | cut -d' ' -f1)"
    sync
    umount /mnt || say "SKVM-LINUX-FAIL umount"
    say "SKVM-LINUX-EXT4-DONE"
}
test_readonly() {
    say "SKVM-LINUX-RO $(cat /sys/block/${1##*/}/ro)"
    say "SKVM-LINUX-RO-READ $(dd if="$1" bs=4096 count=1 2>/dev/null | md5sum | cut -d' ' -f1)"
    if dd if=/dev/zero of="$1" bs=4096 count=1 conv=fsync 2>/dev/null; then
        say "SKVM-LINUX-RO-WRITE accepted"
    else
        say "SKVM-LINUX-RO-WRITE refused"
    fi
}
test_rng() {
    wait_for /dev/hwrng
    say "SKVM-LINUX-RNG-CURRENT $(cat /sys/class/misc/hw_random/rng_current)"
    say "SKVM-LINUX-RNG-BYTES $(dd if=/dev/hwrng bs=4096 count=1 2>/dev/null | wc -c)"
    say "SKVM-LINUX-RNG-SAMPLE $(dd if=/dev/hwrng bs=16 count=1 2>/dev/null | od -An -tx1 | tr -d ' \n')"
}
test=$(sed -n 's/.*skvm-test=\([a-z0-9-]*\).*/\1/p' /proc/cmdline)
case "$test" in
cpus)
    say "SKVM-LINUX-CPUS $(grep -c ^processor /proc/cpuinfo)"
    ;;
devices)
    # A 64 MiB disk for ext4, an 8 MiB read-only one, and virtio-rng.
    wait_for /dev/vdb
    test_ext4 "$(disk_of 131072)"
    test_readonly "$(disk_of 16384)"
    test_rng
    ;;
virtio-mem)
    # Follow the host: memory plugged comes online and holds a 560 MiB file
    # (more than the boot RAM could), then goes away when the host asks.
    memtotal() { awk '/MemTotal/ {print $2}' /proc/meminfo; }
    # await_memtotal CMP KB: wait up to 10 minutes for MemTotal CMP KB.
    await_memtotal() {
        n=0
        while [ $n -lt 600 ] && ! [ "$(memtotal)" "$1" "$2" ]; do sleep 1; n=$((n + 1)); done
        [ "$(memtotal)" "$1" "$2" ]
    }
    before=$(memtotal)
    say "SKVM-LINUX-MEM-READY MemTotal=${before}kB"
    if await_memtotal -gt $((before + 200000)); then
        say "SKVM-LINUX-MEM-ONLINE MemTotal=$(memtotal)kB"
        mkdir -p /big && mount -t tmpfs -o size=600M tmpfs /big
        if dd if=/dev/zero of=/big/fill bs=1M count=560 2>/dev/null; then
            say "SKVM-LINUX-MEM-USED 560 MiB"
        else
            say "SKVM-LINUX-FAIL writing 560 MiB"
        fi
        rm /big/fill
        umount /big
        say "SKVM-LINUX-MEM-RELEASED"
        await_memtotal -lt $((before + 100000)) && say "SKVM-LINUX-MEM-SHRUNK MemTotal=$(memtotal)kB"
    fi
    ;;
reboot)
    say "SKVM-LINUX-REBOOTING"
    reboot -f
    ;;
fio)
    # One fio job on the first disk through Linux's virtio-blk driver, its
    # JSON report between markers for `skvm bench --linux`:
    # fio=RW,BLOCKSIZE,IODEPTH,IOS (for example fio=randread,4k,32,20000).
    IFS=, read -r rw bs qd ios <<ARGS
$(sed -n 's/.*[[:space:]]fio=\([a-z0-9,]*\).*/\1/p' /proc/cmdline)
ARGS
    wait_for /dev/vda
    engine=io_uring
    [ "$qd" = 1 ] && engine=psync
    say "SKVM-FIO-BEGIN"
    fio --name=skvm --filename=/dev/vda --direct=1 --ioengine=$engine --rw="$rw" --bs="$bs" \
        --iodepth="$qd" --number_ios="$ios" --randrepeat=0 --norandommap --output-format=json \
        >/dev/console 2>&1 || say "SKVM-LINUX-FAIL fio"
    say "SKVM-FIO-END"
    ;;
esac
say "SKVM-LINUX-INIT-OK $(uname -r)"
sync
poweroff -f
# If poweroff somehow returns, do not let init exit (that panics the kernel).
while :; do sleep 1; done
EOF
    chmod 0755 "$R/init"
    # Early console before devtmpfs is mounted (needs root; harmless if it fails).
    mknod -m 600 "$R/dev/console" c 5 1 2>/dev/null || say "      (could not mknod dev/console; relying on devtmpfs)"

    (cd "$R" && find . -mindepth 1 | LC_ALL=C sort | cpio -o -H newc -R 0:0 --quiet) \
        | gzip -9n >"$INITRAMFS.tmp"
    mv "$INITRAMFS.tmp" "$INITRAMFS"
fi

# ---------------------------------------------------------------------------
# Step 5: kit.env
say "[5/5] writing kit.env"
cat >"$KITENV.tmp" <<EOF
KERNEL_VERSION=$KREL
VMLINUX=$VMLINUX
BZIMAGE=$BZIMAGE
INITRAMFS=$INITRAMFS
PVH_NOTE=$PVH_NOTE
EOF
mv "$KITENV.tmp" "$KITENV"

size() { numfmt --to=iec --suffix=B "$(stat -c %s "$1")"; }
END_NS=$(date +%s%N)
ELAPSED=$(( (END_NS - START_NS) / 1000000 ))
printf 'linux-kit: done in %d.%03ds: kernel %s, vmlinux %s, bzImage %s, initramfs %s, PVH note %s -> %s\n' \
    $((ELAPSED / 1000)) $((ELAPSED % 1000)) "$KREL" "$(size "$VMLINUX")" "$(size "$BZIMAGE")" \
    "$(size "$INITRAMFS")" "$PVH_NOTE" "$OUT" >&2
