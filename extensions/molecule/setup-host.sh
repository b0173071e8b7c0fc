#!/usr/bin/env bash
# Install the host packages molecule's podman driver needs (Debian/Ubuntu hosts).
# Idempotent and non-interactive: safe to call on every run, as root or via CI.
set -euo pipefail

packages=(podman runc debootstrap netavark aardvark-dns iptables)

missing=()
for pkg in "${packages[@]}"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" \
        || missing+=("$pkg")
done
if ((${#missing[@]} == 0)); then
    exit 0
fi

if ((EUID != 0)); then
    echo "setup-host: missing ${missing[*]}; run as root to install them" >&2
    exit 1
fi

export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
echo "setup-host: installed ${missing[*]}"
