#!/usr/bin/env bash
# Build the Debian bookworm systemd image molecule scenarios boot, from Debian
# packages only (no container registry needed). Skipped when the image exists;
# set PGOPS_REBUILD_IMAGE=1 to force a rebuild.
set -euo pipefail

image="${PGOPS_BASE_IMAGE:-localhost/pgops-bookworm-systemd:latest}"
suite="${PGOPS_BASE_SUITE:-bookworm}"
mirror="${PGOPS_DEBIAN_MIRROR:-}"   # empty: debootstrap's default mirror

if [[ "${PGOPS_REBUILD_IMAGE:-0}" != 1 ]] && podman image exists "$image"; then
    exit 0
fi

rootfs="$(mktemp -d)"
trap 'rm -rf "$rootfs"' EXIT

# python3 for Ansible, systemd as PID 1, dbus so systemctl talks to it,
# ca-certificates so apt/pip over HTTPS work inside.
debootstrap --variant=minbase \
    --include=systemd,systemd-sysv,dbus,python3,python3-apt,ca-certificates,procps,iproute2 \
    "$suite" "$rootfs" ${mirror:+"$mirror"} >/dev/null

# Units that fail or make no sense in a container.
for unit in getty.target console-getty.service systemd-firstboot.service \
    systemd-udevd.service systemd-udev-trigger.service systemd-remount-fs.service \
    sys-kernel-config.mount sys-kernel-debug.mount sys-kernel-tracing.mount; do
    ln -sf /dev/null "$rootfs/etc/systemd/system/$unit"
done
# Keep images small and apt quiet.
rm -rf "$rootfs"/var/lib/apt/lists/* "$rootfs"/var/cache/apt/archives/*.deb
: >"$rootfs/etc/machine-id"

tar -C "$rootfs" -c . | podman import \
    --change 'CMD=["/sbin/init"]' \
    --change 'ENV=container=podman' \
    --change 'STOPSIGNAL=SIGRTMIN+3' \
    --quiet - "$image" >/dev/null
echo "build-base-image: built $image"
