#!/bin/sh
# Installs what nix-deploy's demo, tests and benchmarks need on Debian:
# Nix (the coordinator's own, Debian's nix-bin) and OpenSSH (client for us,
# server for the local test hosts). Idempotent; needs root for apt-get.
set -eu
missing=""
command -v nix >/dev/null 2>&1 || missing="$missing nix-bin"
command -v ssh >/dev/null 2>&1 || missing="$missing openssh-client"
[ -x /usr/sbin/sshd ] || missing="$missing openssh-server"
command -v unshare >/dev/null 2>&1 || missing="$missing util-linux"
command -v ssh-keygen >/dev/null 2>&1 || missing="$missing openssh-client"
if [ -n "$missing" ]; then
    if [ "$(id -u)" != 0 ]; then
        echo "setup: missing packages:$missing; run as root (or install them) first" >&2
        exit 1
    fi
    echo "setup: installing$missing" >&2
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $missing >/dev/null
fi
if [ "$(id -u)" != 0 ]; then
    echo "setup: the local test hosts need root (mount namespaces, sshd); run as root" >&2
    exit 1
fi
