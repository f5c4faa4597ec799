#!/usr/bin/env bash
# Install the system packages diffmas can use but does not strictly need (bubblewrap, chromium, libjemalloc2):
#
# bubblewrap (`bwrap`), which diffmas.sandbox uses to isolate
# model-written code (read-only root, private /tmp, no network, own PID
# namespace). Without it the sandbox falls back to rlimits + an unprivileged
# uid, so this script only warns when it cannot install anything: it must never
# break a setup on a machine without apt or without root.
#
# Idempotent: does nothing when every tool is already present.
set -u

warn() { printf 'setup-system: warning: %s\n' "$*" >&2; }
info() { printf 'setup-system: %s\n' "$*"; }

# Command name -> Debian package that provides it. chromium + chromium-driver: the headless browser that
# tests/test_html_report.py drives (selenium) to check the self-contained HTML report; the test skips without them.
declare -A WANTED=([bwrap]=bubblewrap [chromium]=chromium [chromedriver]=chromium-driver)

missing=()
for cmd in "${!WANTED[@]}"; do
    if command -v "$cmd" >/dev/null 2>&1; then
        info "$cmd already installed ($(command -v "$cmd"))"
    else
        missing+=("${WANTED[$cmd]}")
    fi
done

# libjemalloc2: the allocator diffmas' command line restarts itself with (diffmas/memory.py; docs/benchmarks.md, P8:
# as fast as glibc's defaults, about as lean as mapping every block on its own). A library, not a command.
if compgen -G "/usr/lib/*-linux-gnu/libjemalloc.so.2" >/dev/null || [ -e /usr/lib64/libjemalloc.so.2 ]; then
    info "libjemalloc2 already installed"
else
    missing+=(libjemalloc2)
fi

if [ "${#missing[@]}" -eq 0 ]; then
    exit 0
fi

if [ "$(id -u)" -ne 0 ]; then
    warn "not root; cannot install: ${missing[*]} (run: sudo apt-get install ${missing[*]})"
    warn "without bwrap the code sandbox falls back to rlimits-only isolation; without chromium the HTML report browser test is skipped"
    exit 0
fi

if ! command -v apt-get >/dev/null 2>&1; then
    warn "apt-get not available; cannot install: ${missing[*]}"
    warn "without bwrap the code sandbox falls back to rlimits-only isolation; without chromium the HTML report browser test is skipped"
    exit 0
fi

export DEBIAN_FRONTEND=noninteractive

# Only refresh the package index when the package is not known yet: an
# `apt-get update` is slow and needs the network, so skip it when possible.
need_update=0
for pkg in "${missing[@]}"; do
    if ! apt-cache show "$pkg" >/dev/null 2>&1; then
        need_update=1
    fi
done
if [ "$need_update" -eq 1 ]; then
    info "running apt-get update"
    apt-get update -qq || warn "apt-get update failed; trying the install anyway"
fi

info "installing: ${missing[*]}"
if apt-get install -y -qq --no-install-recommends "${missing[@]}"; then
    info "installed: ${missing[*]}"
else
    warn "apt-get install ${missing[*]} failed"
    warn "without bwrap the code sandbox falls back to rlimits-only isolation; without chromium the HTML report browser test is skipped"
fi
exit 0
