#!/usr/bin/env bash
# Install the Debian packages the tests need (promtool and prometheus for the deploy checks, chromium for the
# web page's headless-browser test); idempotent.
#
# Only what is missing is installed: a machine that already has the binaries runs no apt at all.
# Works as root, or through sudo when not root; says plainly what to do when it can do neither.
set -euo pipefail

# binary -> Debian package that ships it. Debian's `prometheus` ships both prometheus and promtool.
declare -A WANT=(
    [prometheus]=prometheus
    [promtool]=prometheus
    [chromium]=chromium
)

missing_pkgs=()
for bin in "${!WANT[@]}"; do
    if ! command -v "$bin" >/dev/null 2>&1; then
        pkg="${WANT[$bin]}"
        [[ " ${missing_pkgs[*]-} " == *" $pkg "* ]] || missing_pkgs+=("$pkg")
    fi
done

if [[ ${#missing_pkgs[@]} -eq 0 ]]; then
    echo "install-system-deps: all present ($(command -v promtool), $(command -v prometheus), $(command -v chromium))"
    exit 0
fi

if ! command -v apt-get >/dev/null 2>&1; then
    echo "install-system-deps: need Debian package(s) ${missing_pkgs[*]} but apt-get is not available;" >&2
    echo "  install them with your system's package manager (promtool, prometheus and chromium on PATH)." >&2
    exit 1
fi

if [[ $(id -u) -eq 0 ]]; then
    SUDO=()
elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
    SUDO=(sudo -n)
else
    echo "install-system-deps: need root to install ${missing_pkgs[*]}; run as root or with passwordless sudo:" >&2
    echo "  sudo apt-get update && sudo apt-get install -y --no-install-recommends ${missing_pkgs[*]}" >&2
    exit 1
fi

echo "install-system-deps: installing ${missing_pkgs[*]}"
export DEBIAN_FRONTEND=noninteractive
"${SUDO[@]}" apt-get update -qq
"${SUDO[@]}" apt-get install -y --no-install-recommends "${missing_pkgs[@]}"

# Debian's package starts a system prometheus where an init system runs; the tests start their own
# on a free loopback port, so a system one is only noise. Stop it if it got started (no-op in containers).
if command -v systemctl >/dev/null 2>&1 && systemctl is-active --quiet prometheus 2>/dev/null; then
    "${SUDO[@]}" systemctl disable --now prometheus >/dev/null 2>&1 || true
fi

for bin in "${!WANT[@]}"; do
    if ! command -v "$bin" >/dev/null 2>&1; then
        echo "install-system-deps: $bin still missing after installing ${WANT[$bin]}" >&2
        exit 1
    fi
done
echo "install-system-deps: done ($(promtool --version 2>&1 | head -n1))"
