#!/usr/bin/env bash
# Prepare the base images that Tandem's compose stack builds on, on a machine
# that cannot pull them from a registry.
#
#   scripts/prepare_offline_images.sh          (or: make compose-images)
#
# For each of the Python base (BASE_IMAGE, default python:3.11-slim) and the
# Redis image (REDIS_IMAGE, default redis:7): if the image is already there,
# or `docker pull` gets it, nothing is done. Otherwise a local stand-in is
# built from Debian's packages and tagged under that same name, so that
# `docker compose build` and `up` need no registry and no other setting:
#
#   1. a minimal Debian bookworm root filesystem (debootstrap --variant=minbase),
#      cached as a tarball under TANDEM_IMAGE_CACHE (default
#      /var/cache/tandem-images) so that reruns skip it;
#   2. `docker import` of that tarball: a Debian base image;
#   3. FROM that base, `apt-get install` of python3 + venv (Debian's Python is
#      3.11, as in python:3.11-slim) or of redis-server (Redis 7).
#
# The Python stand-in trusts this machine's CA bundle (HOST_CA_BUNDLE, default
# /etc/ssl/certs/ca-certificates.crt): where the registries are reached
# through a TLS-intercepting proxy, pip in the image build needs it. That is
# a property of this machine, which is why it is added here, in a local
# image, and never in the Dockerfile or in an image meant for publishing.
#
# Idempotent: a rerun with the images present does nothing; FORCE=1 rebuilds
# the stand-ins (from the cached root filesystem). Needs root for debootstrap
# (installed with apt-get when missing) and a running Docker engine.
set -euo pipefail

PYTHON_IMAGE="${BASE_IMAGE:-python:3.11-slim}"
REDIS_IMAGE="${REDIS_IMAGE:-redis:7}"
CACHE_DIR="${TANDEM_IMAGE_CACHE:-/var/cache/tandem-images}"
SUITE="${DEBIAN_SUITE:-bookworm}"
MIRROR="${DEBIAN_MIRROR:-http://deb.debian.org/debian}"
SECURITY_MIRROR="${DEBIAN_SECURITY_MIRROR:-http://deb.debian.org/debian-security}"
HOST_CA_BUNDLE="${HOST_CA_BUNDLE:-/etc/ssl/certs/ca-certificates.crt}"
PULL_TIMEOUT="${PULL_TIMEOUT:-60}"
FORCE="${FORCE:-0}"
DEBIAN_IMAGE="tandem-local/debian:${SUITE}"
STANDIN_LABEL="org.tandem.standin"

say() { echo "prepare-images: $*"; }
die() { echo "prepare-images: error: $*" >&2; exit 1; }

have_image() { docker image inspect "$1" >/dev/null 2>&1; }
is_standin() { [ "$(docker image inspect -f "{{ index .Config.Labels \"$STANDIN_LABEL\" }}" "$1" 2>/dev/null)" = "true" ]; }

# Present, or pulled within PULL_TIMEOUT seconds.
available() {
    local image=$1
    if have_image "$image" && { [ "$FORCE" != 1 ] || ! is_standin "$image"; }; then
        say "$image is present"
        return 0
    fi
    [ "$FORCE" = 1 ] && have_image "$image" && return 1
    say "pulling $image (at most ${PULL_TIMEOUT}s)"
    if timeout "$PULL_TIMEOUT" docker pull -q "$image" >/dev/null 2>&1; then
        say "pulled $image"
        return 0
    fi
    say "$image cannot be pulled here: building a local stand-in"
    return 1
}

docker info >/dev/null 2>&1 || die "no Docker engine answers (docker info failed)"

need_python=0 need_redis=0
available "$PYTHON_IMAGE" || need_python=1
available "$REDIS_IMAGE" || need_redis=1
if [ $need_python = 0 ] && [ $need_redis = 0 ]; then
    say "nothing to do"
    exit 0
fi

# ---------------------------------------------------------------- the Debian base
rootfs_tar="$CACHE_DIR/debian-$SUITE-minbase.tar"
if ! have_image "$DEBIAN_IMAGE" || [ "$FORCE" = 1 ]; then
    if [ ! -s "$rootfs_tar" ]; then
        [ "$(id -u)" = 0 ] || die "debootstrap needs root (or put a rootfs tarball at $rootfs_tar)"
        if ! command -v debootstrap >/dev/null; then
            say "installing debootstrap"
            apt-get update -qq
            DEBIAN_FRONTEND=noninteractive apt-get install -y -qq debootstrap >/dev/null
        fi
        mkdir -p "$CACHE_DIR"
        rootfs="$(mktemp -d "$CACHE_DIR/rootfs.XXXXXX")"
        trap 'rm -rf "$rootfs" "$rootfs_tar.partial"' EXIT
        say "debootstrap $SUITE (minbase) from $MIRROR"
        started=$SECONDS
        debootstrap --variant=minbase --include=ca-certificates,passwd \
            "$SUITE" "$rootfs" "$MIRROR" >"$CACHE_DIR/debootstrap.log" 2>&1 \
            || { tail -20 "$CACHE_DIR/debootstrap.log" >&2; die "debootstrap failed (log: $CACHE_DIR/debootstrap.log)"; }
        cat >"$rootfs/etc/apt/sources.list" <<EOF
deb $MIRROR $SUITE main
deb $MIRROR $SUITE-updates main
deb $SECURITY_MIRROR $SUITE-security main
EOF
        # As Docker's Debian images do: no caches, no docs, no services started by apt.
        rm -rf "$rootfs"/var/lib/apt/lists/* "$rootfs"/var/cache/apt/*.bin "$rootfs"/var/cache/apt/archives/*.deb
        printf '#!/bin/sh\nexit 101\n' >"$rootfs/usr/sbin/policy-rc.d"
        chmod +x "$rootfs/usr/sbin/policy-rc.d"
        tar --numeric-owner -C "$rootfs" -cf "$rootfs_tar.partial" .
        mv "$rootfs_tar.partial" "$rootfs_tar"
        rm -rf "$rootfs"
        trap - EXIT
        say "root filesystem cached at $rootfs_tar ($((SECONDS - started)) s)"
    else
        say "using the cached root filesystem $rootfs_tar"
    fi
    docker import --change 'CMD ["bash"]' --change "LABEL $STANDIN_LABEL=true" \
        "$rootfs_tar" "$DEBIAN_IMAGE" >/dev/null
    say "imported $DEBIAN_IMAGE"
fi

# ---------------------------------------------------------------- the stand-ins
context="$(mktemp -d)"
trap 'rm -rf "$context"' EXIT

build_standin() {   # image, Dockerfile text (read from stdin)
    local image=$1 started=$SECONDS
    cat >"$context/Dockerfile"
    say "building $image"
    docker build --network host --pull=false -q -t "$image" "$context" >/dev/null \
        || die "building the stand-in $image failed"
    say "built $image ($((SECONDS - started)) s)"
}

if [ $need_python = 1 ]; then
    [ -s "$HOST_CA_BUNDLE" ] || die "no CA bundle at $HOST_CA_BUNDLE"
    cp "$HOST_CA_BUNDLE" "$context/ca-certificates.crt"
    build_standin "$PYTHON_IMAGE" <<EOF
FROM $DEBIAN_IMAGE
RUN apt-get update \\
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \\
        python3 python3-venv python-is-python3 \\
    && rm -rf /var/lib/apt/lists/*
# This machine's CA bundle (see scripts/prepare_offline_images.sh): local only.
COPY ca-certificates.crt /etc/ssl/certs/ca-certificates.crt
ENV PIP_CERT=/etc/ssl/certs/ca-certificates.crt LANG=C.UTF-8
LABEL $STANDIN_LABEL=true \\
      org.opencontainers.image.description="local stand-in for $PYTHON_IMAGE: Debian $SUITE's Python 3.11"
CMD ["python3"]
EOF
    rm -f "$context/ca-certificates.crt"
fi

if [ $need_redis = 1 ]; then
    # Like the official image: user redis, data in /data (a volume), redis-server by default.
    build_standin "$REDIS_IMAGE" <<EOF
FROM $DEBIAN_IMAGE
RUN apt-get update \\
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends redis-server \\
    && rm -rf /var/lib/apt/lists/* \\
    && mkdir -p /data && chown redis:redis /data
VOLUME /data
WORKDIR /data
USER redis
EXPOSE 6379
LABEL $STANDIN_LABEL=true \\
      org.opencontainers.image.description="local stand-in for $REDIS_IMAGE: Debian $SUITE's redis-server"
CMD ["redis-server", "--bind", "0.0.0.0", "--protected-mode", "no"]
EOF
fi
say "done"
