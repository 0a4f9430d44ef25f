#!/usr/bin/env bash
# Base images for machines that cannot pull from Docker Hub: Debian bookworm root
# filesystems made with debootstrap from Debian's own mirror, then `docker import`ed.
#
#   narthex-base/python:3.11-bookworm   python3 (3.11) + ca-certificates: the services' base
#   narthex-base/infra:bookworm         + redis-server, postgresql, prometheus: the infra base
#   narthex-base/uv:<version>           the uv binary alone (stands in for ghcr.io/astral-sh/uv)
#
# Idempotent: an image that already exists is kept (FORCE=1 rebuilds). Needs root, debootstrap
# and a running dockerd. With registry access none of this is needed: the Dockerfiles'
# defaults are python:3.11-slim-bookworm, debian:bookworm-slim and ghcr.io/astral-sh/uv.
set -euo pipefail

DOCKER=${DOCKER:-docker}
MIRROR=${MIRROR:-http://deb.debian.org/debian}
SUITE=bookworm
WORK=${WORK:-/var/tmp/narthex-rootfs}
FORCE=${FORCE:-0}
UV_VERSION=${UV_VERSION:-0.13.9}
PYTHON_IMAGE=narthex-base/python:3.11-bookworm
INFRA_IMAGE=narthex-base/infra:bookworm
UV_IMAGE=narthex-base/uv:${UV_VERSION}

have() { [[ $FORCE != 1 ]] && "$DOCKER" image inspect "$1" >/dev/null 2>&1; }

# One root filesystem: minbase + the packages named, apt lists and caches dropped.
rootfs() {
    local dir=$1 include=$2
    rm -rf "$dir"
    debootstrap --variant=minbase --cache-dir="$WORK/cache" --include="$include" \
        "$SUITE" "$dir" "$MIRROR" >"$dir.log" 2>&1 || { tail -20 "$dir.log"; return 1; }
    # Packages' maintainer scripts must not start daemons in a chroot, nor later in a build.
    printf '#!/bin/sh\nexit 101\n' >"$dir/usr/sbin/policy-rc.d"
    chmod 0755 "$dir/usr/sbin/policy-rc.d"
    rm -rf "$dir"/var/lib/apt/lists/* "$dir"/var/cache/apt/*.bin "$dir"/var/cache/apt/archives/*.deb
    printf 'deb %s %s main\n' "$MIRROR" "$SUITE" >"$dir/etc/apt/sources.list"
}

import() {
    local dir=$1 image=$2
    shift 2
    tar -C "$dir" -c . | "$DOCKER" import "$@" - "$image" >/dev/null
    echo "imported $image ($("$DOCKER" image inspect -f '{{.Size}}' "$image") bytes)"
}

mkdir -p "$WORK/cache"
common=(--change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin'
    --change 'ENV LANG=C.UTF-8' --change 'CMD ["bash"]')

if ! have "$PYTHON_IMAGE"; then
    rootfs "$WORK/python" python3,ca-certificates
    # python:3.11-slim names its interpreter `python` too; the Dockerfiles rely on neither.
    ln -sf python3 "$WORK/python/usr/bin/python"
    import "$WORK/python" "$PYTHON_IMAGE" "${common[@]}"
fi &
pids=($!)
if ! have "$INFRA_IMAGE"; then
    rootfs "$WORK/infra" ca-certificates,redis-server,postgresql,prometheus
    import "$WORK/infra" "$INFRA_IMAGE" "${common[@]}"
fi &
pids+=($!)
for pid in "${pids[@]}"; do wait "$pid"; done

if ! have "$UV_IMAGE"; then
    uv=${UV:-$(command -v uv)}
    [[ $("$uv" --version) == "uv $UV_VERSION"* ]] || {
        echo "uv on PATH is $("$uv" --version), want $UV_VERSION" >&2
        exit 1
    }
    rm -rf "$WORK/uv" && mkdir -p "$WORK/uv" && cp "$uv" "$WORK/uv/uv"
    import "$WORK/uv" "$UV_IMAGE"
fi
