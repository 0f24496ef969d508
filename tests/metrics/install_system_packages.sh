#!/usr/bin/env bash
# Install the system packages that the `system` tests of tests/metrics need:
#   prometheus (the real server the scrape test starts) and chromium (the headless browser
#   that loads the dashboard). Idempotent: does nothing when both binaries are already there.
# Fails loudly: any apt error, or a binary still missing afterwards, exits non-zero.
set -euo pipefail

need=()
command -v prometheus >/dev/null 2>&1 || need+=(prometheus)
command -v chromium >/dev/null 2>&1 || need+=(chromium)

if [ "${#need[@]}" -eq 0 ]; then
    echo "install_system_packages: prometheus and chromium already installed"
    exit 0
fi

SUDO=""
if [ "$(id -u)" -ne 0 ]; then
    command -v sudo >/dev/null 2>&1 || {
        echo "install_system_packages: need root (or sudo) to apt-get install ${need[*]}" >&2
        exit 1
    }
    SUDO="sudo"
fi

echo "install_system_packages: installing ${need[*]}"
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -q
# --no-install-recommends keeps chromium's footprint small; the tests need no extras.
$SUDO apt-get install -y -q --no-install-recommends "${need[@]}"

for bin in prometheus chromium; do
    command -v "$bin" >/dev/null 2>&1 || {
        echo "install_system_packages: '$bin' is still not on PATH after apt-get install" >&2
        exit 1
    }
done
prometheus --version 2>&1 | head -n 1
chromium --version
