# Shell helpers for the scripts that fetch Debian packages (linux-kit.sh,
# linux-tier.sh). Source it after defining say MESSAGE, die MESSAGE and TMP
# (a scratch directory: quiet keeps a command's output in $TMP/log).

if [[ $(id -u) -eq 0 ]]; then SUDO=(); else SUDO=(sudo); fi

# quiet CMD...: run a command quietly; on failure show its output and die.
quiet() {
    if ! "$@" >"$TMP/log" 2>&1; then
        cat "$TMP/log" >&2
        die "command failed: $*"
    fi
}

APT_UPDATED=0
apt_update_once() {
    if ((APT_UPDATED == 0)); then
        say "apt-get update"
        quiet "${SUDO[@]}" apt-get update -qq
        APT_UPDATED=1
    fi
}

# has_candidate PKG: apt knows an installable version of PKG.
has_candidate() {
    local c
    c=$(apt-cache policy "$1" 2>/dev/null | awk '/Candidate:/ {print $2}')
    [[ -n $c && $c != "(none)" ]]
}

# need_tool CMD PKG: make sure CMD exists, installing Debian package PKG if not.
need_tool() {
    local cmd=$1 pkg=$2
    command -v "$cmd" >/dev/null 2>&1 && return 0
    has_candidate "$pkg" || apt_update_once
    say "installing $pkg (for $cmd)"
    quiet "${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$pkg"
    command -v "$cmd" >/dev/null 2>&1 || die "$cmd still missing after installing $pkg"
}
